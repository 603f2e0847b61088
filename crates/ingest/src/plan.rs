//! The dataset plan: the settings every case of a store is preprocessed with.
//!
//! As in nnU-Net, the plan is made once, from the whole dataset (median spacing, CT intensity
//! statistics over the foreground of every CT case), and then kept: re-runs and the watch daemon
//! preprocess new cases with the stored plan so that all cases of a store stay comparable.
//! `--replan` (or different ingest settings) makes a new plan and re-ingests every case.
//!
//! The plan also holds nnU-Net's `use_mask_for_norm` decision ([`MaskForNorm`]): from the median
//! over the cases of the crop box's share of the image, z-scored channels are normalised over
//! the non-zero mask (and served as 0 outside it) when cropping shrinks the median image below
//! 3/4, as nnU-Net's planner decides.

use std::collections::BTreeMap;

use patchflow_volume::{CtStats, Interp, MASK_FOR_NORM_MAX_RELATIVE_SIZE, NormScheme};
use serde::{Deserialize, Serialize};

/// CT intensity statistics of one channel, as stored in the plan.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CtPlan {
    /// 0.5th percentile of the foreground intensities.
    pub p00_5: f64,
    /// 99.5th percentile of the foreground intensities.
    pub p99_5: f64,
    /// Mean of the foreground intensities.
    pub mean: f64,
    /// Standard deviation of the foreground intensities.
    pub std: f64,
}

impl From<CtStats> for CtPlan {
    fn from(s: CtStats) -> Self {
        CtPlan {
            p00_5: s.p00_5,
            p99_5: s.p99_5,
            mean: s.mean,
            std: s.std,
        }
    }
}

impl From<CtPlan> for CtStats {
    fn from(s: CtPlan) -> Self {
        CtStats {
            p00_5: s.p00_5,
            p99_5: s.p99_5,
            mean: s.mean,
            std: s.std,
        }
    }
}

/// The settings a user chose on the command line that shape the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanSettings {
    /// Keep every case's own spacing (no resampling).
    pub keep_spacing: bool,
    /// Explicit target spacing `[z, y, x]` in mm, instead of the dataset's median.
    pub target_spacing: Option<[f64; 3]>,
    /// Image interpolation when resampling: `"cubic"` or `"linear"`.
    pub interp: String,
    /// Chunk shape `[z, y, x]` of the store.
    pub chunk_shape: [usize; 3],
    /// zstd level of the store's chunks.
    pub zstd_level: i32,
    /// Seed for class-location and intensity sampling.
    pub seed: u64,
}

/// nnU-Net's `use_mask_for_norm` decision for a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskForNorm {
    /// Median over the planned cases of (voxels of the non-zero crop box) / (voxels of the
    /// image): nnU-Net's fingerprint `median_relative_size_after_cropping`.
    pub median_relative_size_after_cropping: f64,
    /// The threshold below which z-scored channels use the mask (nnU-Net's 3/4).
    pub threshold: f64,
    /// Per channel name (modality) of the planned cases: whether it is normalised over the
    /// non-zero mask (z-scored channels when the median is below the threshold).
    pub use_mask_for_norm: BTreeMap<String, bool>,
}

impl MaskForNorm {
    /// The decision for a dataset whose cases' relative sizes after cropping are
    /// `relative_sizes` and whose channels are named `channel_names`; `None` without a finite
    /// relative size.
    pub fn decide<'a>(
        relative_sizes: &[f64],
        channel_names: impl IntoIterator<Item = &'a String>,
    ) -> Option<MaskForNorm> {
        let median = patchflow_volume::mask::median(relative_sizes)?;
        let applies = patchflow_volume::mask_for_norm_applies(median);
        let use_mask_for_norm = channel_names
            .into_iter()
            .map(|n| (n.clone(), applies && scheme_for(n) == NormScheme::ZScore))
            .collect();
        Some(MaskForNorm {
            median_relative_size_after_cropping: median,
            threshold: MASK_FOR_NORM_MAX_RELATIVE_SIZE,
            use_mask_for_norm,
        })
    }

    /// Whether some channel uses the mask.
    pub fn applies(&self) -> bool {
        self.use_mask_for_norm.values().any(|&m| m)
    }

    /// Whether channel `name` is normalised over the mask (a name not seen when planning
    /// follows the same rule: z-scored channels, when the median is below the threshold).
    pub fn channel_uses_mask(&self, name: &str) -> bool {
        match self.use_mask_for_norm.get(name) {
            Some(&m) => m,
            None => {
                self.median_relative_size_after_cropping < self.threshold
                    && scheme_for(name) == NormScheme::ZScore
            }
        }
    }

    /// One line for people: the decision, the channels and the median it came from.
    pub fn describe(&self) -> String {
        let median = self.median_relative_size_after_cropping;
        let masked: Vec<&str> = self
            .use_mask_for_norm
            .iter()
            .filter(|&(_, &m)| m)
            .map(|(n, _)| n.as_str())
            .collect();
        if masked.is_empty() {
            let why = if median < self.threshold {
                "no z-scored channel".to_string()
            } else {
                format!(
                    "cropping keeps {median:.3} of the median image, not below {}",
                    self.threshold
                )
            };
            format!(
                "use_mask_for_norm: no ({why}): channels are normalised over the whole crop box"
            )
        } else {
            format!(
                "use_mask_for_norm: yes for {} (cropping keeps {median:.3} of the median image, below {}): z-scored over the non-zero mask, 0 outside it",
                masked.join(", "),
                self.threshold
            )
        }
    }
}

/// The plan stored in the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetPlan {
    /// What the user asked for.
    pub settings: PlanSettings,
    /// Spacing every case is resampled to; `None` keeps each case's spacing.
    pub target_spacing: Option<[f64; 3]>,
    /// CT statistics per channel index, for channels that are CT in some case.
    pub ct_stats: BTreeMap<usize, CtPlan>,
    /// Number of cases the statistics were computed from.
    pub planned_from_cases: usize,
    /// nnU-Net's `use_mask_for_norm` decision; `None` when no planned case has a z-scored
    /// channel, and in plans made before patchflow knew the rule (left out of the JSON then, so
    /// such plans keep their digest; `--replan` decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_for_norm: Option<MaskForNorm>,
}

impl DatasetPlan {
    /// A stable 64-bit digest of the plan: a case ingested with another plan is stale.
    pub fn digest(&self) -> u64 {
        let json = serde_json::to_vec(self).unwrap_or_default();
        xxhash_rust::xxh3::xxh3_64(&json)
    }

    /// The interpolation to use for images.
    pub fn interp(&self) -> Interp {
        interp_from_name(&self.settings.interp)
    }

    /// The preprocessing plan for one case with these channel names.
    pub fn case_plan(&self, channel_names: &[String]) -> patchflow_volume::PreprocessPlan {
        let schemes: Vec<NormScheme> = channel_names.iter().map(|n| scheme_for(n)).collect();
        let ct_stats = schemes
            .iter()
            .enumerate()
            .map(|(c, s)| match s {
                NormScheme::Ct => self.ct_stats.get(&c).copied().map(CtStats::from),
                _ => None,
            })
            .collect();
        let use_mask_for_norm = match &self.mask_for_norm {
            Some(m) => channel_names
                .iter()
                .map(|n| m.channel_uses_mask(n))
                .collect(),
            None => Vec::new(),
        };
        patchflow_volume::PreprocessPlan {
            target_spacing: self.target_spacing,
            schemes,
            ct_stats,
            interp: self.interp(),
            seed: self.settings.seed,
            use_mask_for_norm,
        }
    }
}

/// Parses an interpolation name (`cubic` or `linear`).
pub fn interp_from_name(name: &str) -> Interp {
    if name.eq_ignore_ascii_case("linear") {
        Interp::Linear
    } else {
        Interp::Cubic
    }
}

/// The normalisation scheme for a channel name (its modality).
pub fn scheme_for(channel_name: &str) -> NormScheme {
    patchflow_volume::Modality::parse(channel_name).scheme()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_decision_follows_nnunets_planner() {
        let ch = names(&["T1", "CT", "noNorm"]);
        // Median of 0.2, 0.4, 0.9 is 0.4 < 3/4: z-scored channels only.
        let m = MaskForNorm::decide(&[0.9, 0.2, 0.4], &ch).unwrap();
        assert_eq!(m.median_relative_size_after_cropping, 0.4);
        assert!(m.applies());
        assert_eq!(
            m.use_mask_for_norm,
            BTreeMap::from([
                ("CT".to_string(), false),
                ("T1".to_string(), true),
                ("noNorm".to_string(), false)
            ])
        );
        assert!(
            m.channel_uses_mask("FLAIR"),
            "unseen z-scored names follow the rule"
        );
        assert!(m.describe().contains("yes for T1"), "{}", m.describe());
        // Even count: numpy's median is the mean of the middle two; 3/4 itself does not apply.
        let m = MaskForNorm::decide(&[0.5, 1.0, 1.0, 0.5], &ch).unwrap();
        assert_eq!(m.median_relative_size_after_cropping, 0.75);
        assert!(!m.applies());
        assert!(!m.channel_uses_mask("FLAIR"));
        assert!(m.describe().contains("not below 0.75"), "{}", m.describe());
        // CT only: nothing uses the mask, whatever the crop.
        let m = MaskForNorm::decide(&[0.1], &names(&["CT"])).unwrap();
        assert!(!m.applies());
        assert!(
            m.describe().contains("no z-scored channel"),
            "{}",
            m.describe()
        );
        assert_eq!(MaskForNorm::decide(&[], &ch), None);
    }

    fn plan(mask_for_norm: Option<MaskForNorm>) -> DatasetPlan {
        DatasetPlan {
            settings: PlanSettings {
                keep_spacing: true,
                target_spacing: None,
                interp: "cubic".into(),
                chunk_shape: [32, 32, 32],
                zstd_level: 1,
                seed: 1234,
            },
            target_spacing: None,
            ct_stats: BTreeMap::new(),
            planned_from_cases: 2,
            mask_for_norm,
        }
    }

    #[test]
    fn case_plans_carry_the_channels_that_use_the_mask() {
        let m = MaskForNorm::decide(&[0.3, 0.4], &names(&["CT", "T2"]));
        let p = plan(m).case_plan(&names(&["CT", "T2"]));
        assert_eq!(p.use_mask_for_norm, vec![false, true]);
        let p = plan(MaskForNorm::decide(&[0.9], &names(&["T2"]))).case_plan(&names(&["T2"]));
        assert_eq!(p.use_mask_for_norm, vec![false]);
        assert!(
            plan(None)
                .case_plan(&names(&["T2"]))
                .use_mask_for_norm
                .is_empty()
        );
    }

    #[test]
    fn plans_made_before_the_rule_keep_their_json_and_digest() {
        let old = plan(None);
        let json = serde_json::to_value(&old).unwrap();
        assert!(json.get("mask_for_norm").is_none(), "{json}");
        let back: DatasetPlan = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, old);
        assert_eq!(back.digest(), old.digest());
        let new = plan(MaskForNorm::decide(&[0.3], &names(&["T1"])));
        assert_ne!(new.digest(), old.digest());
        let back: DatasetPlan =
            serde_json::from_value(serde_json::to_value(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }
}

//! The dataset plan: the settings every case of a store is preprocessed with.
//!
//! As in nnU-Net, the plan is made once, from the whole dataset (median spacing, CT intensity
//! statistics over the foreground of every CT case), and then kept: re-runs and the watch daemon
//! preprocess new cases with the stored plan so that all cases of a store stay comparable.
//! `--replan` (or different ingest settings) makes a new plan and re-ingests every case.

use std::collections::BTreeMap;

use patchflow_volume::{CtStats, Interp, NormScheme};
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
        patchflow_volume::PreprocessPlan {
            target_spacing: self.target_spacing,
            schemes,
            ct_stats,
            interp: self.interp(),
            seed: self.settings.seed,
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

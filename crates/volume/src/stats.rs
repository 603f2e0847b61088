//! Dataset-level statistics for the planner: CT intensity statistics, median spacing, and the
//! mapping from a channel's modality name to its normalisation scheme.

use serde::{Deserialize, Serialize};

use crate::types::{NormScheme, Normalization};

/// Smallest standard deviation divided by, as nnU-Net does (`max(std, 1e-8)`).
pub const MIN_STD: f64 = 1.0e-8;

/// Foreground intensity statistics of a CT channel over the whole training set.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CtStats {
    /// 0.5th percentile (lower clip bound).
    pub p00_5: f64,
    /// 99.5th percentile (upper clip bound).
    pub p99_5: f64,
    /// Mean of the foreground samples.
    pub mean: f64,
    /// Population standard deviation of the foreground samples.
    pub std: f64,
}

impl CtStats {
    /// Statistics of pooled foreground samples: percentiles interpolated linearly between the
    /// closest ranks (numpy's default), mean and population standard deviation, all in `f64`.
    /// Non-finite samples are ignored; `None` when no finite sample is left.
    pub fn from_samples(samples: &[f32]) -> Option<CtStats> {
        let mut sorted: Vec<f64> = samples
            .iter()
            .filter(|v| v.is_finite())
            .map(|&v| f64::from(v))
            .collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_unstable_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let var = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Some(CtStats {
            p00_5: percentile(&sorted, 0.5),
            p99_5: percentile(&sorted, 99.5),
            mean,
            std: var.sqrt(),
        })
    }

    /// The CT normalisation these statistics define: clip to `[p00_5, p99_5]`, subtract the mean,
    /// multiply by `1 / max(std, 1e-8)`.
    pub fn normalization(&self) -> Normalization {
        Normalization {
            scheme: NormScheme::Ct,
            clip: Some([self.p00_5 as f32, self.p99_5 as f32]),
            mean: self.mean as f32,
            inv_std: (1.0 / self.std.max(MIN_STD)) as f32,
        }
    }
}

/// Percentile `q` (0–100) of sorted values, linear interpolation between closest ranks (numpy's
/// default method). Returns NaN for an empty slice.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = (q.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
            let lo = (pos.floor() as usize).min(n - 1);
            let hi = (lo + 1).min(n - 1);
            let frac = pos - lo as f64;
            sorted[lo] + (sorted[hi] - sorted[lo]) * frac
        }
    }
}

/// Per-axis median of voxel spacings (`[z, y, x]`), the mean of the two middle values for an even
/// count (numpy's median). nnU-Net resamples every case to this spacing. An empty list gives NaN.
pub fn median_spacing(spacings: &[[f64; 3]]) -> [f64; 3] {
    let mut out = [f64::NAN; 3];
    for (axis, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f64> = spacings.iter().map(|s| s[axis]).collect();
        v.sort_unstable_by(f64::total_cmp);
        *o = percentile(&v, 50.0);
    }
    out
}

/// Imaging modality of a channel, as named in `dataset.json`'s `channel_names`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    /// Computed tomography: intensities are physical (HU), normalised with dataset statistics.
    Ct,
    /// Magnetic resonance: arbitrary units, normalised per image.
    Mr,
    /// Channel whose values must be left as they are (nnU-Net's `noNorm`).
    NoNorm,
    /// Anything else: normalised per image, like MR.
    Other,
}

impl Modality {
    /// Parses a channel name case-insensitively: `CT`; `MR`/`MRI`; `noNorm`/`none`; anything
    /// else is [`Modality::Other`].
    pub fn parse(name: &str) -> Modality {
        let name = name.trim();
        if name.eq_ignore_ascii_case("ct") {
            Modality::Ct
        } else if name.eq_ignore_ascii_case("mr") || name.eq_ignore_ascii_case("mri") {
            Modality::Mr
        } else if name.eq_ignore_ascii_case("nonorm") || name.eq_ignore_ascii_case("none") {
            Modality::NoNorm
        } else {
            Modality::Other
        }
    }

    /// The normalisation nnU-Net applies to this modality.
    pub fn scheme(self) -> NormScheme {
        match self {
            Modality::Ct => NormScheme::Ct,
            Modality::Mr | Modality::Other => NormScheme::ZScore,
            Modality::NoNorm => NormScheme::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_stats_match_a_hand_computed_example() {
        // Sorted: 1 2 3 4 10 (n = 5).
        // p0.5: pos = 0.005 * 4 = 0.02 -> 1 + (2 - 1) * 0.02 = 1.02
        // p99.5: pos = 0.995 * 4 = 3.98 -> 4 + (10 - 4) * 0.98 = 9.88
        // mean = 20 / 5 = 4; var = (9 + 4 + 1 + 0 + 36) / 5 = 10
        let s = CtStats::from_samples(&[10.0, 3.0, 1.0, 4.0, 2.0]).unwrap();
        assert!((s.p00_5 - 1.02).abs() < 1e-12, "{s:?}");
        assert!((s.p99_5 - 9.88).abs() < 1e-12, "{s:?}");
        assert!((s.mean - 4.0).abs() < 1e-12);
        assert!((s.std - 10f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn ct_stats_edge_cases() {
        assert_eq!(CtStats::from_samples(&[]), None);
        assert_eq!(CtStats::from_samples(&[f32::NAN]), None);
        let s = CtStats::from_samples(&[5.0, f32::INFINITY]).unwrap();
        assert_eq!((s.p00_5, s.p99_5, s.mean, s.std), (5.0, 5.0, 5.0, 0.0));
        let n = s.normalization();
        assert_eq!(n.clip, Some([5.0, 5.0]));
        assert_eq!(n.inv_std, 1.0e8);
        assert_eq!(n.scheme, NormScheme::Ct);
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [0.0, 10.0, 20.0, 30.0];
        assert_eq!(percentile(&v, 0.0), 0.0);
        assert_eq!(percentile(&v, 100.0), 30.0);
        assert!((percentile(&v, 50.0) - 15.0).abs() < 1e-12);
        assert!((percentile(&v, 25.0) - 7.5).abs() < 1e-12);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn median_spacing_per_axis() {
        let m = median_spacing(&[[3.0, 1.0, 0.5], [1.0, 0.8, 0.7], [2.0, 0.9, 0.6]]);
        assert_eq!(m, [2.0, 0.9, 0.6]);
        let m = median_spacing(&[[3.0, 1.0, 1.0], [1.0, 0.5, 2.0]]);
        assert_eq!(m, [2.0, 0.75, 1.5]);
        assert!(median_spacing(&[]).iter().all(|v| v.is_nan()));
    }

    #[test]
    fn modality_names() {
        assert_eq!(Modality::parse("CT"), Modality::Ct);
        assert_eq!(Modality::parse("ct"), Modality::Ct);
        assert_eq!(Modality::parse("MRI"), Modality::Mr);
        assert_eq!(Modality::parse("mr"), Modality::Mr);
        assert_eq!(Modality::parse("noNorm"), Modality::NoNorm);
        assert_eq!(Modality::parse("T2"), Modality::Other);
        assert_eq!(Modality::parse("CT").scheme(), NormScheme::Ct);
        assert_eq!(Modality::parse("T1").scheme(), NormScheme::ZScore);
        assert_eq!(Modality::parse("MR").scheme(), NormScheme::ZScore);
        assert_eq!(Modality::parse("none").scheme(), NormScheme::None);
    }
}

//! What a client asks for: every transform with its probability and ranges.
//!
//! Every sub-specification defaults to "off" (`p = 0`) with nnU-Net's ranges, so a JSON request
//! that names only `{"mirror": {"p_per_axis": 0.5}}` turns on mirroring alone;
//! [`AugmentSpec::nnunet_default`] is nnU-Net v2's default training augmentation.
//!
//! Ranges are closed intervals `[lo, hi]`. Multiplicative factors (brightness, contrast, gamma)
//! are drawn as nnU-Net's `BGContrast` draws them: with probability one half below 1, otherwise
//! at least 1, each part uniform.

use serde::{Deserialize, Serialize};

use crate::AugmentError;

/// Rotation about the patch centre.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RotationSpec {
    /// Probability that a patch is rotated (all three angles are drawn together).
    pub p: f64,
    /// Angle range in radians about each array axis `[z, y, x]` (the angle about `z` turns the
    /// `y`-`x` plane). Each within `[-2π, 2π]`.
    pub angles: [[f64; 2]; 3],
}

/// nnU-Net's 3D rotation range: ±30° about every axis.
const DEG30: f64 = std::f64::consts::PI / 6.0;

impl Default for RotationSpec {
    fn default() -> Self {
        RotationSpec {
            p: 0.0,
            angles: [[-DEG30, DEG30]; 3],
        }
    }
}

/// Isotropic or per-axis zoom about the patch centre. A factor above 1 takes the patch from a
/// larger region (structures look smaller), as in nnU-Net.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalingSpec {
    /// Probability that a patch is scaled.
    pub p: f64,
    /// Factor range, within `[0.1, 10]`.
    pub range: [f64; 2],
    /// Draw one factor per axis instead of one for all axes (nnU-Net: one for all).
    pub per_axis: bool,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        ScalingSpec {
            p: 0.0,
            range: [0.7, 1.4],
            per_axis: false,
        }
    }
}

/// Elastic deformation: a smooth random displacement field added to the sampling grid before
/// the rotation and scaling (batchgeneratorsv2's order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ElasticSpec {
    /// Probability that a patch is deformed (nnU-Net: 0).
    pub p: f64,
    /// Smoothness: spacing of the field's random control points as a fraction of the patch edge,
    /// per axis, within `[0, 1]` (control points are at least one voxel apart).
    pub scale: [f64; 2],
    /// Largest displacement along an axis as a fraction of half the patch edge, within `[0, 1]`.
    pub magnitude: [f64; 2],
    /// Draw one smoothness for all axes instead of one per axis.
    pub same_scale_for_all_axes: bool,
}

impl Default for ElasticSpec {
    fn default() -> Self {
        ElasticSpec {
            p: 0.0,
            scale: [0.0, 0.2],
            magnitude: [0.0, 0.2],
            same_scale_for_all_axes: false,
        }
    }
}

/// Additive Gaussian noise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseSpec {
    /// Probability per patch.
    pub p: f64,
    /// Standard deviation range, `>= 0`. nnU-Net names this `noise_variance` but uses it as the
    /// standard deviation; so does patchflow, under its true name.
    pub std: [f64; 2],
    /// Probability per channel once the patch is selected.
    pub p_per_channel: f64,
    /// One standard deviation and one noise field for all channels (nnU-Net: yes).
    pub same_for_all_channels: bool,
}

impl Default for NoiseSpec {
    fn default() -> Self {
        NoiseSpec {
            p: 0.0,
            std: [0.0, 0.1],
            p_per_channel: 1.0,
            same_for_all_channels: true,
        }
    }
}

/// Separable Gaussian blur with reflective borders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlurSpec {
    /// Probability per patch.
    pub p: f64,
    /// Sigma range in voxels, within `[0, 16]`.
    pub sigma: [f64; 2],
    /// Probability per channel once the patch is selected (nnU-Net: 0.5).
    pub p_per_channel: f64,
    /// One sigma for all axes instead of one per axis (nnU-Net: per axis).
    pub same_for_all_axes: bool,
}

impl Default for BlurSpec {
    fn default() -> Self {
        BlurSpec {
            p: 0.0,
            sigma: [0.5, 1.0],
            p_per_channel: 0.5,
            same_for_all_axes: false,
        }
    }
}

/// A multiplicative factor per channel (brightness).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrightnessSpec {
    /// Probability per patch.
    pub p: f64,
    /// Factor range, `>= 0`.
    pub range: [f64; 2],
    /// Probability per channel once the patch is selected.
    pub p_per_channel: f64,
}

impl Default for BrightnessSpec {
    fn default() -> Self {
        BrightnessSpec {
            p: 0.0,
            range: [0.75, 1.25],
            p_per_channel: 1.0,
        }
    }
}

/// Contrast: values are scaled about the channel mean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContrastSpec {
    /// Probability per patch.
    pub p: f64,
    /// Factor range, `>= 0`.
    pub range: [f64; 2],
    /// Clip the result to the channel's range before the transform (nnU-Net: yes).
    pub preserve_range: bool,
    /// Probability per channel once the patch is selected.
    pub p_per_channel: f64,
}

impl Default for ContrastSpec {
    fn default() -> Self {
        ContrastSpec {
            p: 0.0,
            range: [0.75, 1.25],
            preserve_range: true,
            p_per_channel: 1.0,
        }
    }
}

/// Low-resolution simulation: nearest-neighbour downsampling by a zoom factor, then linear
/// upsampling back to the patch size (PyTorch's `nearest-exact` and `trilinear`,
/// `align_corners=False`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LowResSpec {
    /// Probability per patch.
    pub p: f64,
    /// Zoom range, within `(0, 1]`.
    pub zoom: [f64; 2],
    /// Probability per channel once the patch is selected (nnU-Net: 0.5).
    pub p_per_channel: f64,
    /// Axes `[z, y, x]` that are downsampled (nnU-Net's pseudo-2D setting leaves out `z`).
    pub axes: [bool; 3],
    /// Draw one zoom per axis instead of one for all axes (nnU-Net: one for all).
    pub per_axis: bool,
}

impl Default for LowResSpec {
    fn default() -> Self {
        LowResSpec {
            p: 0.0,
            zoom: [0.5, 1.0],
            p_per_channel: 0.5,
            axes: [true; 3],
            per_axis: false,
        }
    }
}

/// Gamma on the channel's range: `x -> ((x - min) / range)^gamma * range + min`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GammaSpec {
    /// Probability per patch.
    pub p: f64,
    /// Gamma range, within `(0, 100]`.
    pub gamma: [f64; 2],
    /// Restore the channel's mean and standard deviation afterwards (nnU-Net: yes).
    pub retain_stats: bool,
    /// Probability per channel once the patch is selected.
    pub p_per_channel: f64,
}

impl Default for GammaSpec {
    fn default() -> Self {
        GammaSpec {
            p: 0.0,
            gamma: [0.7, 1.5],
            retain_stats: true,
            p_per_channel: 1.0,
        }
    }
}

/// Mirroring per axis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorSpec {
    /// Probability that an enabled axis is flipped, independently per axis (nnU-Net: 0.5).
    pub p_per_axis: f64,
    /// Axes `[z, y, x]` that may be flipped. Datasets with left/right classes (and PGPS at small
    /// patch sizes) disable the left/right axis.
    pub axes: [bool; 3],
}

impl Default for MirrorSpec {
    fn default() -> Self {
        MirrorSpec {
            p_per_axis: 0.0,
            axes: [true; 3],
        }
    }
}

/// The whole augmentation of a request: every transform with its probability and ranges.
///
/// Transforms are applied in nnU-Net's order: rotation, scaling and elastic deformation (one
/// resampling), then Gaussian noise, Gaussian blur, brightness, contrast, low-resolution
/// simulation, inverted gamma, gamma, and mirroring (folded into the resampling: every intensity
/// transform commutes with a flip, exactly or in distribution).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentSpec {
    /// Rotation.
    pub rotation: RotationSpec,
    /// Scaling.
    pub scaling: ScalingSpec,
    /// Elastic deformation.
    pub elastic: ElasticSpec,
    /// Gaussian noise.
    pub noise: NoiseSpec,
    /// Gaussian blur.
    pub blur: BlurSpec,
    /// Multiplicative brightness.
    pub brightness: BrightnessSpec,
    /// Contrast.
    pub contrast: ContrastSpec,
    /// Low-resolution simulation.
    pub lowres: LowResSpec,
    /// Gamma applied to the negated image (nnU-Net's `p_invert_image = 1` instance).
    pub inverted_gamma: GammaSpec,
    /// Gamma.
    pub gamma: GammaSpec,
    /// Mirroring.
    pub mirror: MirrorSpec,
}

impl AugmentSpec {
    /// The name a daemon and its clients give [`AugmentSpec::nnunet_default`] on the wire
    /// (`Augmentation.preset`).
    pub const NNUNET_PRESET: &'static str = "nnunet";

    /// nnU-Net v2's default training augmentation for 3D patches (`nnUNetTrainer.
    /// get_training_transforms`): rotation 0.2 (±30° per axis), scaling 0.2 (0.7–1.4, one factor),
    /// no elastic deformation, noise 0.1 (std 0–0.1, shared by the channels), blur 0.2 (σ 0.5–1
    /// per axis, each channel 0.5), brightness 0.15 (0.75–1.25), contrast 0.15 (0.75–1.25,
    /// range preserved), low resolution 0.25 (zoom 0.5–1, each channel 0.5), inverted gamma 0.1
    /// and gamma 0.3 (0.7–1.5, statistics retained), mirroring of every axis with 0.5.
    pub fn nnunet_default() -> AugmentSpec {
        AugmentSpec {
            rotation: RotationSpec {
                p: 0.2,
                ..RotationSpec::default()
            },
            scaling: ScalingSpec {
                p: 0.2,
                ..ScalingSpec::default()
            },
            elastic: ElasticSpec::default(),
            noise: NoiseSpec {
                p: 0.1,
                ..NoiseSpec::default()
            },
            blur: BlurSpec {
                p: 0.2,
                ..BlurSpec::default()
            },
            brightness: BrightnessSpec {
                p: 0.15,
                ..BrightnessSpec::default()
            },
            contrast: ContrastSpec {
                p: 0.15,
                ..ContrastSpec::default()
            },
            lowres: LowResSpec {
                p: 0.25,
                ..LowResSpec::default()
            },
            inverted_gamma: GammaSpec {
                p: 0.1,
                ..GammaSpec::default()
            },
            gamma: GammaSpec {
                p: 0.3,
                ..GammaSpec::default()
            },
            mirror: MirrorSpec {
                p_per_axis: 0.5,
                axes: [true; 3],
            },
        }
    }

    /// The preset with mirroring disabled on some axes (e.g. `[true, true, false]` keeps
    /// left/right classes apart when `x` is the left/right axis).
    pub fn with_mirror_axes(mut self, axes: [bool; 3]) -> AugmentSpec {
        self.mirror.axes = axes;
        self
    }

    /// Checks every probability and range; the error names the field and the accepted limits.
    pub fn validate(&self) -> Result<(), AugmentError> {
        let tau = 2.0 * std::f64::consts::PI;
        prob("rotation.p", self.rotation.p)?;
        for r in &self.rotation.angles {
            range("rotation.angles", *r, -tau, tau, "[-2π, 2π] radians")?;
        }
        prob("scaling.p", self.scaling.p)?;
        range("scaling.range", self.scaling.range, 0.1, 10.0, "[0.1, 10]")?;
        prob("elastic.p", self.elastic.p)?;
        range("elastic.scale", self.elastic.scale, 0.0, 1.0, "[0, 1]")?;
        range(
            "elastic.magnitude",
            self.elastic.magnitude,
            0.0,
            1.0,
            "[0, 1]",
        )?;
        prob("noise.p", self.noise.p)?;
        prob("noise.p_per_channel", self.noise.p_per_channel)?;
        range("noise.std", self.noise.std, 0.0, 1e3, "[0, 1000]")?;
        prob("blur.p", self.blur.p)?;
        prob("blur.p_per_channel", self.blur.p_per_channel)?;
        range("blur.sigma", self.blur.sigma, 0.0, 16.0, "[0, 16] voxels")?;
        prob("brightness.p", self.brightness.p)?;
        prob("brightness.p_per_channel", self.brightness.p_per_channel)?;
        range(
            "brightness.range",
            self.brightness.range,
            0.0,
            1e3,
            "[0, 1000]",
        )?;
        prob("contrast.p", self.contrast.p)?;
        prob("contrast.p_per_channel", self.contrast.p_per_channel)?;
        range("contrast.range", self.contrast.range, 0.0, 1e3, "[0, 1000]")?;
        prob("lowres.p", self.lowres.p)?;
        prob("lowres.p_per_channel", self.lowres.p_per_channel)?;
        range("lowres.zoom", self.lowres.zoom, 0.0, 1.0, "(0, 1]")?;
        if self.lowres.zoom[0] <= 0.0 {
            return Err(AugmentError::spec(
                "lowres.zoom",
                format!(
                    "lower bound {} must be above 0; the range must lie in (0, 1]",
                    self.lowres.zoom[0]
                ),
            ));
        }
        for (name, g) in [
            ("inverted_gamma", &self.inverted_gamma),
            ("gamma", &self.gamma),
        ] {
            let (p, ppc, gamma) = if name == "gamma" {
                ("gamma.p", "gamma.p_per_channel", "gamma.gamma")
            } else {
                (
                    "inverted_gamma.p",
                    "inverted_gamma.p_per_channel",
                    "inverted_gamma.gamma",
                )
            };
            prob(p, g.p)?;
            prob(ppc, g.p_per_channel)?;
            range(gamma, g.gamma, 0.0, 100.0, "(0, 100]")?;
            if g.gamma[0] <= 0.0 {
                return Err(AugmentError::spec(
                    gamma,
                    format!(
                        "lower bound {} must be above 0; the range must lie in (0, 100]",
                        g.gamma[0]
                    ),
                ));
            }
        }
        prob("mirror.p_per_axis", self.mirror.p_per_axis)?;
        Ok(())
    }

    /// Whether any transform can fire.
    pub fn is_identity(&self) -> bool {
        let any_axis = self.mirror.axes.iter().any(|&a| a);
        [
            self.rotation.p,
            self.scaling.p,
            self.elastic.p,
            self.noise.p,
            self.blur.p,
            self.brightness.p,
            self.contrast.p,
            self.lowres.p,
            self.inverted_gamma.p,
            self.gamma.p,
        ]
        .iter()
        .all(|&p| p <= 0.0)
            && !(any_axis && self.mirror.p_per_axis > 0.0)
    }

    /// An upper bound of the source region ([`crate::source_box`]) any draw of this
    /// specification can need for `patch`: callers size buffers and enforce memory limits with
    /// it. Assumes a valid specification.
    pub fn max_source_shape(&self, patch: [usize; 3]) -> [usize; 3] {
        let spatial = self.rotation.p > 0.0 || self.scaling.p > 0.0 || self.elastic.p > 0.0;
        if !spatial {
            return patch;
        }
        let smax = if self.scaling.p > 0.0 {
            self.scaling.range[1].max(1.0)
        } else {
            1.0
        };
        // |R| entry bounds from the largest |sin| and |cos| over each angle range.
        let rot = if self.rotation.p > 0.0 {
            let sc: Vec<(f64, f64)> = self
                .rotation
                .angles
                .iter()
                .map(|r| sin_cos_max(*r))
                .collect();
            let m = |axis: usize| -> [[f64; 3]; 3] {
                let (s, c) = sc[axis];
                let mut r = [[0.0; 3]; 3];
                let (a, b) = match axis {
                    0 => (1, 2),
                    1 => (0, 2),
                    _ => (0, 1),
                };
                r[axis][axis] = 1.0;
                r[a][a] = c;
                r[b][b] = c;
                r[a][b] = s;
                r[b][a] = s;
                r
            };
            let prod = mat_mul(&m(2), &mat_mul(&m(1), &m(0)));
            prod.map(|row| row.map(|v| v.min(1.0)))
        } else {
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        };
        let half = patch.map(|p| (p as f64 - 1.0).max(0.0) / 2.0);
        let norm = half.iter().map(|h| h * h).sum::<f64>().sqrt();
        let emag = if self.elastic.p > 0.0 {
            patch.map(|p| self.elastic.magnitude[1] * p as f64 / 2.0)
        } else {
            [0.0; 3]
        };
        let enorm = emag.iter().map(|h| h * h).sum::<f64>().sqrt();
        let mut out = [0usize; 3];
        for i in 0..3 {
            let row: f64 = (0..3).map(|j| rot[i][j] * half[j]).sum();
            let erow: f64 = (0..3).map(|j| rot[i][j] * emag[j]).sum();
            // A rotation's row is a unit vector: its reach is also bounded by the half-diagonal.
            let reach = smax * (row.min(norm) + erow.min(enorm));
            out[i] = (2.0 * reach + 2.0 * crate::geometry::BOX_EPS).floor() as usize + 3;
            out[i] = out[i].max(patch[i]);
        }
        out
    }
}

fn mat_mul(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut r = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            r[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    r
}

/// Largest `|sin|` and `|cos|` over the angle interval `[lo, hi]`.
fn sin_cos_max([lo, hi]: [f64; 2]) -> (f64, f64) {
    use std::f64::consts::{FRAC_PI_2, PI};
    if hi - lo >= PI {
        return (1.0, 1.0);
    }
    let mut s = lo.sin().abs().max(hi.sin().abs());
    let mut c = lo.cos().abs().max(hi.cos().abs());
    // Extremes inside the interval: |sin| = 1 at π/2 + kπ, |cos| = 1 at kπ.
    let k_lo = ((lo - FRAC_PI_2) / PI).ceil();
    if FRAC_PI_2 + k_lo * PI <= hi {
        s = 1.0;
    }
    let k_lo = (lo / PI).ceil();
    if k_lo * PI <= hi {
        c = 1.0;
    }
    (s, c)
}

fn prob(field: &'static str, p: f64) -> Result<(), AugmentError> {
    if p.is_finite() && (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(AugmentError::spec(
            field,
            format!("probability {p} is outside [0, 1]"),
        ))
    }
}

fn range(
    field: &'static str,
    [lo, hi]: [f64; 2],
    min: f64,
    max: f64,
    limits: &str,
) -> Result<(), AugmentError> {
    if !(lo.is_finite() && hi.is_finite()) {
        return Err(AugmentError::spec(
            field,
            format!("range [{lo}, {hi}] is not finite; it must lie in {limits}"),
        ));
    }
    if lo > hi {
        return Err(AugmentError::spec(
            field,
            format!("range [{lo}, {hi}] is reversed (lower bound above upper bound)"),
        ));
    }
    if lo < min || hi > max {
        return Err(AugmentError::spec(
            field,
            format!("range [{lo}, {hi}] must lie in {limits}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_is_valid_and_matches_nnunet() {
        let s = AugmentSpec::nnunet_default();
        s.validate().unwrap();
        assert_eq!(s.rotation.p, 0.2);
        assert!((s.rotation.angles[0][1] - 30f64.to_radians()).abs() < 1e-12);
        assert_eq!(s.scaling.range, [0.7, 1.4]);
        assert_eq!(s.elastic.p, 0.0);
        assert_eq!((s.noise.p, s.noise.std), (0.1, [0.0, 0.1]));
        assert_eq!((s.blur.p, s.blur.p_per_channel), (0.2, 0.5));
        assert_eq!((s.brightness.p, s.contrast.p), (0.15, 0.15));
        assert_eq!((s.lowres.p, s.lowres.p_per_channel), (0.25, 0.5));
        assert_eq!((s.inverted_gamma.p, s.gamma.p), (0.1, 0.3));
        assert_eq!(s.mirror.p_per_axis, 0.5);
        assert!(!s.is_identity());
        assert!(AugmentSpec::default().is_identity());
        AugmentSpec::default().validate().unwrap();
    }

    #[test]
    fn validation_names_fields() {
        let field = |f: &dyn Fn(&mut AugmentSpec)| {
            let mut s = AugmentSpec::nnunet_default();
            f(&mut s);
            match s.validate() {
                Err(AugmentError::InvalidSpec { field, reason }) => {
                    assert!(!reason.is_empty());
                    field
                }
                other => panic!("expected an error, got {other:?}"),
            }
        };
        assert_eq!(field(&|s| s.rotation.p = 1.5), "rotation.p");
        assert_eq!(
            field(&|s| s.rotation.angles[1] = [0.0, 7.0]),
            "rotation.angles"
        );
        assert_eq!(field(&|s| s.scaling.range = [1.2, 0.8]), "scaling.range");
        assert_eq!(field(&|s| s.scaling.range = [0.0, 1.0]), "scaling.range");
        assert_eq!(field(&|s| s.noise.std = [0.0, f64::NAN]), "noise.std");
        assert_eq!(
            field(&|s| s.blur.p_per_channel = -0.1),
            "blur.p_per_channel"
        );
        assert_eq!(field(&|s| s.blur.sigma = [0.5, 40.0]), "blur.sigma");
        assert_eq!(field(&|s| s.lowres.zoom = [0.0, 1.0]), "lowres.zoom");
        assert_eq!(field(&|s| s.lowres.zoom = [0.5, 2.0]), "lowres.zoom");
        assert_eq!(field(&|s| s.gamma.gamma = [0.0, 1.0]), "gamma.gamma");
        assert_eq!(
            field(&|s| s.inverted_gamma.p = f64::INFINITY),
            "inverted_gamma.p"
        );
        assert_eq!(field(&|s| s.mirror.p_per_axis = 2.0), "mirror.p_per_axis");
        assert_eq!(
            field(&|s| s.elastic.magnitude = [0.0, 3.0]),
            "elastic.magnitude"
        );
    }

    #[test]
    fn serde_round_trip_and_partial_json() {
        let s = AugmentSpec::nnunet_default().with_mirror_axes([true, true, false]);
        let json = serde_json::to_string(&s).unwrap();
        let back: AugmentSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let partial: AugmentSpec =
            serde_json::from_str(r#"{"mirror": {"p_per_axis": 0.5}}"#).unwrap();
        assert_eq!(partial.mirror.p_per_axis, 0.5);
        assert_eq!(partial.rotation.p, 0.0);
        assert!(serde_json::from_str::<AugmentSpec>(r#"{"mirorr": {}}"#).is_err());
    }

    #[test]
    fn sin_cos_bounds() {
        let (s, c) = sin_cos_max([-DEG30, DEG30]);
        assert!((s - 0.5).abs() < 1e-12 && c == 1.0);
        let (s, c) = sin_cos_max([0.2, 1.7]);
        assert_eq!(s, 1.0);
        assert!((c - 0.2f64.cos()).abs() < 1e-12);
        assert_eq!(sin_cos_max([-4.0, 4.0]), (1.0, 1.0));
    }
}

//! What was drawn for one item: the values [`crate::draw`] picks and [`crate::apply`] applies.
//! Plain data; it must not draw or apply anything itself.

use serde::{Deserialize, Serialize};

/// Per-channel values: `None` where the transform skipped that channel.
pub type PerChannel<T> = Vec<Option<T>>;

/// The drawn elastic deformation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ElasticParams {
    /// Seed of the field's control-point values.
    pub seed: u64,
    /// Spacing of the control points per axis `[z, y, x]`, in voxels (at least 1).
    pub spacing: [f64; 3],
    /// Largest displacement per axis, in voxels.
    pub magnitude: [f64; 3],
}

/// The drawn Gaussian noise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseParams {
    /// Seed of the noise field(s).
    pub seed: u64,
    /// All selected channels receive the same field.
    pub same_field: bool,
    /// Standard deviation per channel.
    pub std: PerChannel<f64>,
}

/// The drawn contrast factors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContrastParams {
    /// Results are clipped to the channel's range before the transform.
    pub preserve_range: bool,
    /// Factor per channel.
    pub factor: PerChannel<f64>,
}

/// The drawn gamma values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GammaParams {
    /// The channel's mean and standard deviation are restored afterwards.
    pub retain_stats: bool,
    /// Gamma per channel.
    pub gamma: PerChannel<f64>,
}

/// Everything drawn for one item: which transforms fired and with which values. Applying the
/// same parameters to the same source gives the same patch, bit for bit.
///
/// A transform that did not fire is `None`; a transform that fired keeps one entry per channel,
/// `None` for the channels its per-channel probability skipped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AugmentParams {
    /// Rotation angles in radians about the array axes `[z, y, x]`.
    pub rotation: Option<[f64; 3]>,
    /// Scale factors per axis `[z, y, x]` (source offset = factor × output offset).
    pub scale: Option<[f64; 3]>,
    /// Elastic deformation.
    pub elastic: Option<ElasticParams>,
    /// Flipped axes `[z, y, x]`.
    pub mirror: [bool; 3],
    /// Gaussian noise.
    pub noise: Option<NoiseParams>,
    /// Blur sigmas per channel and axis `[z, y, x]`, in voxels.
    pub blur: Option<PerChannel<[f64; 3]>>,
    /// Brightness factor per channel.
    pub brightness: Option<PerChannel<f64>>,
    /// Contrast.
    pub contrast: Option<ContrastParams>,
    /// Low-resolution zoom per channel and axis `[z, y, x]` (1 on axes left alone).
    pub lowres: Option<PerChannel<[f64; 3]>>,
    /// Gamma on the negated image.
    pub inverted_gamma: Option<GammaParams>,
    /// Gamma.
    pub gamma: Option<GammaParams>,
}

impl AugmentParams {
    /// Whether the item is resampled (rotation, scaling or elastic deformation fired); if not,
    /// the source region is the patch itself.
    pub fn is_resampled(&self) -> bool {
        self.rotation.is_some() || self.scale.is_some() || self.elastic.is_some()
    }

    /// Whether the parameters change nothing.
    pub fn is_identity(&self) -> bool {
        !self.is_resampled()
            && !self.mirror.iter().any(|&m| m)
            && self.noise.is_none()
            && self.blur.is_none()
            && self.brightness.is_none()
            && self.contrast.is_none()
            && self.lowres.is_none()
            && self.inverted_gamma.is_none()
            && self.gamma.is_none()
    }
}

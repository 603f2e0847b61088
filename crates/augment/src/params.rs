//! What was drawn for one item, and the draw itself.

use serde::{Deserialize, Serialize};

use crate::rng::{Rng, around_one};
use crate::spec::AugmentSpec;

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

/// Sub-stream tags, one per transform (part of the format).
mod tag {
    pub const ROTATION: u64 = 1;
    pub const SCALING: u64 = 2;
    pub const ELASTIC: u64 = 3;
    pub const MIRROR: u64 = 4;
    pub const NOISE: u64 = 5;
    pub const BLUR: u64 = 6;
    pub const BRIGHTNESS: u64 = 7;
    pub const CONTRAST: u64 = 8;
    pub const LOWRES: u64 = 9;
    pub const INVERTED_GAMMA: u64 = 10;
    pub const GAMMA: u64 = 11;
}

/// Draws the parameters of one item of `channels` image channels and patch size `patch`
/// from `seed` (callers derive one seed per item, e.g. from the request seed, batch index and
/// item index).
///
/// Each transform draws from its own sub-stream of `seed`, so the values drawn for one transform
/// do not depend on which other transforms are enabled. `spec` should be valid
/// ([`AugmentSpec::validate`]); invalid probabilities behave as clamped to `[0, 1]`.
pub fn draw(spec: &AugmentSpec, seed: u64, patch: [usize; 3], channels: usize) -> AugmentParams {
    let mut out = AugmentParams::default();

    let mut r = Rng::sub(seed, tag::ROTATION);
    if r.chance(spec.rotation.p) {
        out.rotation = Some(spec.rotation.angles.map(|a| r.uniform(a)));
    }
    let mut r = Rng::sub(seed, tag::SCALING);
    if r.chance(spec.scaling.p) {
        let range = spec.scaling.range;
        out.scale = Some(if spec.scaling.per_axis {
            [r.uniform(range), r.uniform(range), r.uniform(range)]
        } else {
            [r.uniform(range); 3]
        });
    }
    let mut r = Rng::sub(seed, tag::ELASTIC);
    if r.chance(spec.elastic.p) {
        let e = &spec.elastic;
        let scales = if e.same_scale_for_all_axes {
            [r.uniform(e.scale); 3]
        } else {
            [r.uniform(e.scale), r.uniform(e.scale), r.uniform(e.scale)]
        };
        let mags = [
            r.uniform(e.magnitude),
            r.uniform(e.magnitude),
            r.uniform(e.magnitude),
        ];
        out.elastic = Some(ElasticParams {
            seed: r.next_u64(),
            spacing: [0, 1, 2].map(|a| (scales[a] * patch[a] as f64).max(1.0)),
            magnitude: [0, 1, 2].map(|a| mags[a] * patch[a] as f64 / 2.0),
        });
    }
    let mut r = Rng::sub(seed, tag::MIRROR);
    for a in 0..3 {
        // One draw per axis whether enabled or not, so disabling an axis keeps the others.
        let flip = r.chance(spec.mirror.p_per_axis);
        out.mirror[a] = flip && spec.mirror.axes[a];
    }

    let mut r = Rng::sub(seed, tag::NOISE);
    if r.chance(spec.noise.p) {
        let n = &spec.noise;
        let shared = r.uniform(n.std);
        let std = per_channel(&mut r, channels, n.p_per_channel, |r| {
            if n.same_for_all_channels {
                shared
            } else {
                r.uniform(n.std)
            }
        });
        out.noise = Some(NoiseParams {
            seed: r.next_u64(),
            same_field: n.same_for_all_channels,
            std,
        });
    }
    let mut r = Rng::sub(seed, tag::BLUR);
    if r.chance(spec.blur.p) {
        let b = &spec.blur;
        out.blur = Some(per_channel(&mut r, channels, b.p_per_channel, |r| {
            if b.same_for_all_axes {
                [r.uniform(b.sigma); 3]
            } else {
                [r.uniform(b.sigma), r.uniform(b.sigma), r.uniform(b.sigma)]
            }
        }));
    }
    let mut r = Rng::sub(seed, tag::BRIGHTNESS);
    if r.chance(spec.brightness.p) {
        let b = &spec.brightness;
        out.brightness = Some(per_channel(&mut r, channels, b.p_per_channel, |r| {
            around_one(r, b.range)
        }));
    }
    let mut r = Rng::sub(seed, tag::CONTRAST);
    if r.chance(spec.contrast.p) {
        let c = &spec.contrast;
        out.contrast = Some(ContrastParams {
            preserve_range: c.preserve_range,
            factor: per_channel(&mut r, channels, c.p_per_channel, |r| {
                around_one(r, c.range)
            }),
        });
    }
    let mut r = Rng::sub(seed, tag::LOWRES);
    if r.chance(spec.lowres.p) {
        let l = &spec.lowres;
        out.lowres = Some(per_channel(&mut r, channels, l.p_per_channel, |r| {
            let one = r.uniform(l.zoom);
            let mut z = [one; 3];
            if l.per_axis {
                z = [one, r.uniform(l.zoom), r.uniform(l.zoom)];
            }
            for (zoom, &on) in z.iter_mut().zip(&l.axes) {
                if !on {
                    *zoom = 1.0;
                }
            }
            z
        }));
    }
    for (t, g, slot) in [
        (
            tag::INVERTED_GAMMA,
            &spec.inverted_gamma,
            &mut out.inverted_gamma,
        ),
        (tag::GAMMA, &spec.gamma, &mut out.gamma),
    ] {
        let mut r = Rng::sub(seed, t);
        if r.chance(g.p) {
            *slot = Some(GammaParams {
                retain_stats: g.retain_stats,
                gamma: per_channel(&mut r, channels, g.p_per_channel, |r| {
                    around_one(r, g.gamma)
                }),
            });
        }
    }
    out
}

/// One entry per channel: the channel is selected with probability `p`, then `value` is drawn.
fn per_channel<T>(
    r: &mut Rng,
    channels: usize,
    p: f64,
    mut value: impl FnMut(&mut Rng) -> T,
) -> PerChannel<T> {
    (0..channels)
        .map(|_| if r.chance(p) { Some(value(r)) } else { None })
        .collect()
}

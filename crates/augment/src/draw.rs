//! The draw of one item's augmentation: every transform from its own sub-stream of the item's
//! seed. It owns the sub-stream tags, which are part of the format; it must not apply anything.

use crate::params::{
    AugmentParams, ContrastParams, ElasticParams, GammaParams, NoiseParams, PerChannel,
};
use crate::rng::{Rng, around_one};
use crate::spec::AugmentSpec;

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
    draw_spatial(spec, seed, patch, &mut out);
    draw_intensity(spec, seed, channels, &mut out);
    out
}

/// Rotation, scaling, elastic deformation and mirroring.
fn draw_spatial(spec: &AugmentSpec, seed: u64, patch: [usize; 3], out: &mut AugmentParams) {
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
}

/// The intensity transforms, per channel.
fn draw_intensity(spec: &AugmentSpec, seed: u64, channels: usize, out: &mut AugmentParams) {
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

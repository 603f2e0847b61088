//! nnU-Net's training augmentation as fast, deterministic CPU transforms on 3D patches.
//!
//! It owns the augmentation transforms, their parameters and their seeded draw. It must not read
//! stores or place crops: callers hand it the source region and the patch.
//!
//! nnU-Net v2's own data loader spends most of its CPU time in augmentation: about three patches
//! of 128³ per second per core with its default transforms, so a GPU needs a dozen worker
//! processes or more. patchflow applies the same transforms inside the sampler, per item, an
//! order of magnitude faster, so one or two cores keep a GPU busy:
//!
//! * rotation, scaling, elastic deformation and mirroring are **one** resampling pass (image
//!   trilinear, label nearest, so labels are never invented), reading a source region the caller
//!   fetched once ([`source_box`]); without a spatial transform the patch is a plain (mirrored)
//!   copy;
//! * intensity transforms run in nnU-Net's order (noise, blur, brightness, contrast,
//!   low-resolution simulation, inverted gamma, gamma) with pointwise affine steps folded
//!   together, a separable blur, and branch-free vectorisable math;
//! * nothing allocates per patch once a [`Scratch`] is warm;
//! * everything drawn for an item comes from its seed through a generator defined in this crate
//!   ([`draw`]), and the drawn values travel with the item ([`AugmentParams`]): the same seed
//!   gives the same patch on any machine and with any number of workers.
//!
//! Parallelism across the items of a batch is the caller's (the sampler runs one item per task).
//!
//! Differences from nnU-Net, by design: labels are resampled nearest-neighbour, where
//! batchgeneratorsv2 interpolates each label's mask linearly and keeps the strongest (smoother
//! borders, several times the cost); mirroring is folded into the resampling instead of running
//! last (every intensity transform commutes with a flip exactly, or in distribution for the noise
//! field and the low-resolution grid); random values come from this crate's generator, not
//! NumPy's, so the same seed does not reproduce an nnU-Net run.
//!
//! ```
//! use patchflow_augment::{AugmentSpec, Scratch, Source, Target, apply, draw, source_box};
//!
//! let spec = AugmentSpec::nnunet_default();
//! spec.validate().unwrap();
//! let patch = [16, 16, 16];
//! let params = draw(&spec, 42, patch, 1);
//! let (_offset, size) = source_box(&params, patch);
//! // The caller reads `size` voxels at patch origin + offset (image normalised, padded with 0,
//! // labels padded with the ignore value).
//! let n: usize = size.iter().product();
//! let image = vec![0.5f32; n];
//! let label = vec![1u8; n];
//! let mut out_image = vec![0f32; 16 * 16 * 16];
//! let mut out_label = vec![0u8; 16 * 16 * 16];
//! let mut scratch = Scratch::default();
//! apply(
//!     &params,
//!     &Source { image: &image, label: &label, shape: size },
//!     &mut Target { image: &mut out_image, label: &mut out_label, shape: patch },
//!     255,
//!     &mut scratch,
//! )
//! .unwrap();
//! assert!(out_label.iter().all(|&l| l == 1 || l == 255));
//! ```

mod draw;
mod error;
mod fastmath;
mod geometry;
mod intensity;
mod params;
mod rng;
mod simd;
mod spatial;
mod spec;

pub use draw::draw;
pub use error::AugmentError;
pub use geometry::source_box;
pub use params::{
    AugmentParams, ContrastParams, ElasticParams, GammaParams, NoiseParams, PerChannel,
};
pub use spec::{
    AugmentSpec, BlurSpec, BrightnessSpec, ContrastSpec, ElasticSpec, GammaSpec, LowResSpec,
    MirrorSpec, NoiseSpec, RotationSpec, ScalingSpec,
};

use intensity::{IntensityScratch, Pending};
use spatial::{Affine, SpatialScratch, Volumes};

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
}

/// A label element type: `u8` or `u16`.
pub trait Label:
    Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + sealed::Sealed
{
}
impl Label for u8 {}
impl Label for u16 {}

/// The source region of one item, as [`source_box`] sized it.
#[derive(Debug)]
pub struct Source<'a, L> {
    /// Normalised image `[C, sz, sy, sx]` (`0.0` where the region leaves the volume).
    pub image: &'a [f32],
    /// Labels `[sz, sy, sx]` (the ignore value where the region leaves the volume), or empty to
    /// produce no labels.
    pub label: &'a [L],
    /// `[sz, sy, sx]`: must equal the size [`source_box`] returns.
    pub shape: [usize; 3],
}

/// The output patch of one item.
#[derive(Debug)]
pub struct Target<'a, L> {
    /// Image `[C, pz, py, px]`.
    pub image: &'a mut [f32],
    /// Labels `[pz, py, px]`, or empty when the source has none.
    pub label: &'a mut [L],
    /// The patch size `[pz, py, px]`.
    pub shape: [usize; 3],
}

/// Working memory reused across calls: after the first few patches of a size, [`apply`] no
/// longer allocates. One per worker thread.
#[derive(Debug, Default)]
pub struct Scratch {
    spatial: SpatialScratch,
    intensity: IntensityScratch,
}

fn check_channels<T>(
    field: &'static str,
    v: &[Option<T>],
    channels: usize,
) -> Result<(), AugmentError> {
    if v.len() == channels {
        Ok(())
    } else {
        Err(AugmentError::params(
            field,
            format!("drawn for {} channel(s), the image has {channels}", v.len()),
        ))
    }
}

/// Applies `params` to one item: the spatial resampling from `src` into `out`, then the
/// intensity transforms on `out`'s image. Labels pass through the spatial part only; `ignore`
/// fills label voxels whose source lies outside the source region.
///
/// `src.shape` must be the size [`source_box`] gives for `params` and `out.shape`; the number of
/// channels is `out.image.len() / voxels(out.shape)` and must match `params` and `src.image`.
pub fn apply<L: Label>(
    params: &AugmentParams,
    src: &Source<'_, L>,
    out: &mut Target<'_, L>,
    ignore: L,
    scratch: &mut Scratch,
) -> Result<(), AugmentError> {
    if let Some(job) = prepare(params, src, out, ignore)? {
        simd::dispatch(Work { job, scratch });
    }
    Ok(())
}

/// Checks the buffers against the parameters; `None` when there is nothing to do.
fn prepare<'a, L: Label>(
    params: &'a AugmentParams,
    src: &Source<'a, L>,
    out: &'a mut Target<'_, L>,
    ignore: L,
) -> Result<Option<Job<'a, L>>, AugmentError> {
    let patch = out.shape;
    let n_out = voxels(patch)?;
    let (offset, size) = source_box(params, patch);
    if src.shape != size {
        return Err(AugmentError::shape(
            "source shape",
            format!(
                "{:?} given, the parameters need the region {size:?} at offset {offset:?}",
                src.shape
            ),
        ));
    }
    let n_src = voxels(size)?;
    if n_out == 0 {
        return Ok(None);
    }
    if !out.image.len().is_multiple_of(n_out) {
        return Err(AugmentError::shape(
            "output image",
            format!(
                "{} values is not a whole number of {patch:?} channels",
                out.image.len()
            ),
        ));
    }
    let channels = out.image.len() / n_out;
    if src.image.len() != channels * n_src {
        return Err(AugmentError::shape(
            "source image",
            format!(
                "{} values, expected {channels} channel(s) of {size:?}",
                src.image.len()
            ),
        ));
    }
    let with_label = !out.label.is_empty();
    if with_label && (out.label.len() != n_out || src.label.len() != n_src) {
        return Err(AugmentError::shape(
            "label",
            format!(
                "source {} and output {} labels, expected {n_src} and {n_out}",
                src.label.len(),
                out.label.len()
            ),
        ));
    }
    if let Some(n) = &params.noise {
        check_channels("noise.std", &n.std, channels)?;
    }
    if let Some(b) = &params.blur {
        check_channels("blur", b, channels)?;
    }
    if let Some(b) = &params.brightness {
        check_channels("brightness", b, channels)?;
    }
    if let Some(c) = &params.contrast {
        check_channels("contrast.factor", &c.factor, channels)?;
    }
    if let Some(l) = &params.lowres {
        check_channels("lowres", l, channels)?;
    }
    for (field, g) in [
        ("inverted_gamma.gamma", &params.inverted_gamma),
        ("gamma.gamma", &params.gamma),
    ] {
        if let Some(g) = g {
            check_channels(field, &g.gamma, channels)?;
        }
    }

    if n_src > i32::MAX as usize {
        return Err(AugmentError::shape(
            "source shape",
            format!("{size:?} holds more than 2^31 - 1 voxels"),
        ));
    }
    Ok(Some(Job {
        params,
        src_img: src.image,
        src_lab: if with_label { src.label } else { &[] },
        size,
        offset,
        out_img: &mut *out.image,
        out_lab: &mut *out.label,
        patch,
        channels,
        ignore,
    }))
}

/// One validated call of [`apply`].
struct Job<'a, L> {
    params: &'a AugmentParams,
    src_img: &'a [f32],
    src_lab: &'a [L],
    size: [usize; 3],
    offset: [i64; 3],
    out_img: &'a mut [f32],
    out_lab: &'a mut [L],
    patch: [usize; 3],
    channels: usize,
    ignore: L,
}

/// A [`Job`] with its scratch, as one unit of work for [`simd::dispatch`].
struct Work<'a, 's, L> {
    job: Job<'a, L>,
    scratch: &'s mut Scratch,
}

impl<L: Label> simd::Kernel for Work<'_, '_, L> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        run(self.job, self.scratch);
    }
}

#[inline(always)]
fn run<L: Label>(job: Job<'_, L>, scratch: &mut Scratch) {
    let Job {
        params,
        src_img,
        src_lab,
        size,
        offset,
        out_img,
        out_lab,
        patch,
        channels,
        ignore,
    } = job;
    let n_out: usize = patch.iter().product();
    // Spatial: one pass.
    let volumes = Volumes {
        src_img,
        src_lab,
        src_shape: size,
        out_img: &mut *out_img,
        out_lab,
        patch,
        channels,
        ignore,
    };
    if params.is_resampled() {
        let a = geometry::linear_part(params);
        let c_out = patch.map(|p| (p as f64 - 1.0).max(0.0) / 2.0);
        let map = Affine {
            a,
            c_src: [0, 1, 2].map(|i| c_out[i] - offset[i] as f64),
            c_out,
        };
        match &params.elastic {
            Some(e) => {
                spatial::elastic_field(
                    e.seed,
                    e.spacing,
                    e.magnitude,
                    patch,
                    &a,
                    &mut scratch.spatial,
                );
                spatial::resample_displaced(volumes, &map, &scratch.spatial);
            }
            None => spatial::resample(volumes, &map, &mut scratch.spatial),
        }
    } else {
        spatial::copy_mirrored(volumes, params.mirror);
    }

    // Intensity, channel by channel, in nnU-Net's order.
    for (c, data) in out_img.chunks_exact_mut(n_out).enumerate() {
        let mut pending = Pending::IDENTITY;
        if let Some(n) = &params.noise
            && let Some(Some(std)) = n.std.get(c)
            && *std > 0.0
        {
            let seed = if n.same_field {
                n.seed
            } else {
                n.seed ^ rng::mix(c as u64 + 1)
            };
            intensity::add_noise(data, *std as f32, seed);
        }
        if let Some(Some(sigma)) = params.blur.as_ref().and_then(|b| b.get(c)) {
            intensity::blur(data, patch, *sigma, &mut scratch.intensity);
        }
        if let Some(Some(f)) = params.brightness.as_ref().and_then(|b| b.get(c)) {
            intensity::brightness(*f as f32, &mut pending);
        }
        if let Some(cp) = &params.contrast
            && let Some(Some(f)) = cp.factor.get(c)
        {
            intensity::contrast(data, *f as f32, cp.preserve_range, &mut pending);
        }
        if let Some(Some(zoom)) = params.lowres.as_ref().and_then(|l| l.get(c)) {
            intensity::lowres(data, patch, *zoom, &pending, &mut scratch.intensity);
            pending = Pending::IDENTITY;
        }
        for (g, invert) in [(&params.inverted_gamma, true), (&params.gamma, false)] {
            if let Some(gp) = g
                && let Some(Some(gamma)) = gp.gamma.get(c)
            {
                intensity::gamma(data, *gamma as f32, invert, gp.retain_stats, &mut pending);
            }
        }
        intensity::materialize(data, &pending);
    }
}

fn voxels(shape: [usize; 3]) -> Result<usize, AugmentError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .ok_or_else(|| AugmentError::shape("shape", format!("{shape:?} overflows")))
}

#[cfg(test)]
mod tests;

//! Sliding-window inference with Gaussian importance weighting, as nnU-Net's
//! `predict_sliding_window_return_logits`.
//!
//! The volume is padded (constant 0, split evenly, the extra voxel after) to at least the patch;
//! windows are placed with [`sliding_window_steps`]; each window's logits are multiplied by
//! [`gaussian_importance`] and summed, and the sum is divided by the summed weights. A volume
//! that fits in one window therefore gets exactly one forward pass.

use tch::{Device, Kind, TchError, Tensor};

use crate::device::with_autocast;
use crate::unet::UNet;

/// nnU-Net's Gaussian sigma as a fraction of the patch edge.
pub const SIGMA_SCALE: f64 = 1.0 / 8.0;
/// nnU-Net's scaling of the Gaussian's peak.
pub const GAUSSIAN_PEAK: f64 = 10.0;
/// Truncation of the Gaussian kernel in sigmas (SciPy's `gaussian_filter` default).
const TRUNCATE: f64 = 4.0;

/// Start offsets of the windows along each axis (nnU-Net's `compute_steps_for_sliding_window`):
/// `n = ceil((size − patch) / (patch · step)) + 1` windows spread evenly from 0 to
/// `size − patch`, rounded half to even as NumPy does. Where rounding makes two windows coincide
/// (tiny patches and steps), the duplicate is dropped rather than weighted twice. `size` must be
/// at least `patch` on every axis (pad first).
pub fn sliding_window_steps(size: [usize; 3], patch: [usize; 3], step: f64) -> [Vec<usize>; 3] {
    std::array::from_fn(|a| {
        let (s, p) = (size[a], patch[a].max(1));
        if s <= p {
            return vec![0];
        }
        let target = p as f64 * step;
        let n = ((s - p) as f64 / target).ceil() as usize + 1;
        let max_step = (s - p) as f64;
        let actual = if n > 1 {
            max_step / (n - 1) as f64
        } else {
            0.0
        };
        let mut v: Vec<usize> = (0..n)
            .map(|i| (actual * i as f64).round_ties_even() as usize)
            .collect();
        v.dedup();
        v
    })
}

/// nnU-Net's importance map for a patch, `[Z, Y, X]` flattened: a delta at `patch / 2` blurred
/// by a Gaussian of sigma `patch · sigma_scale` (kernel truncated at 4 sigma, as SciPy's
/// `gaussian_filter`), scaled to a peak of [`GAUSSIAN_PEAK`], zeros replaced by the smallest
/// non-zero value.
pub fn gaussian_importance(patch: [usize; 3], sigma_scale: f64) -> Vec<f32> {
    let axis = |a: usize| -> Vec<f64> {
        let n = patch[a];
        let c = (n / 2) as f64;
        let sigma = n as f64 * sigma_scale;
        if sigma <= 0.0 {
            return (0..n).map(|i| if i == n / 2 { 1.0 } else { 0.0 }).collect();
        }
        let radius = (TRUNCATE * sigma + 0.5).floor();
        (0..n)
            .map(|i| {
                let d = i as f64 - c;
                if d.abs() > radius {
                    0.0
                } else {
                    (-0.5 * (d / sigma).powi(2)).exp()
                }
            })
            .collect()
    };
    let (wz, wy, wx) = (axis(0), axis(1), axis(2));
    let mut out = Vec::with_capacity(patch.iter().product());
    for &z in &wz {
        for &y in &wy {
            for &x in &wx {
                out.push((z * y * x * GAUSSIAN_PEAK) as f32);
            }
        }
    }
    let min_nonzero = out
        .iter()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(f32::INFINITY, f32::min);
    if min_nonzero.is_finite() {
        for v in &mut out {
            if *v == 0.0 {
                *v = min_nonzero;
            }
        }
    }
    out
}

/// Settings of sliding-window inference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlidingWindow {
    /// Window (patch) size `[z, y, x]`; each edge a multiple of the network's divisor.
    pub patch: [usize; 3],
    /// Overlap of neighbouring windows as a fraction of the patch, in `[0, 1)` (nnU-Net: 0.5).
    pub overlap: f64,
    /// Weight windows with the Gaussian importance map (nnU-Net: yes); else uniformly.
    pub gaussian: bool,
}

impl SlidingWindow {
    /// nnU-Net's settings for `patch`: overlap 0.5, Gaussian weighting.
    pub fn new(patch: [usize; 3]) -> SlidingWindow {
        SlidingWindow {
            patch,
            overlap: 0.5,
            gaussian: true,
        }
    }
}

/// Logits `[K, Z, Y, X]` (float32, on the CPU) of `image` `[C, Z, Y, X]` (any device).
///
/// Runs without gradients; `autocast` enables CUDA bf16 autocast for the forward passes. The
/// accumulators live on `device`.
///
/// # Errors
/// libtorch's error; an overlap outside `[0, 1)` is reported as a shape error.
pub fn sliding_window_logits(
    net: &UNet,
    image: &Tensor,
    sw: &SlidingWindow,
    device: Device,
    autocast: bool,
) -> Result<Tensor, TchError> {
    if !(0.0..1.0).contains(&sw.overlap) {
        return Err(TchError::Shape(format!(
            "overlap {} is outside [0, 1)",
            sw.overlap
        )));
    }
    let size = image.size();
    let &[_, z, y, x] = size.as_slice() else {
        return Err(TchError::Shape(format!(
            "image has shape {size:?}, expected [C, Z, Y, X]"
        )));
    };
    let shape = [z, y, x].map(|v| v.max(0) as usize);
    let patch = sw.patch;
    // Pad to at least the patch, half before and the rest after (nnU-Net's pad_nd_image).
    let mut pad_lo = [0usize; 3];
    let mut pad_hi = [0usize; 3];
    for a in 0..3 {
        let need = patch[a].saturating_sub(shape[a]);
        pad_lo[a] = need / 2;
        pad_hi[a] = need - need / 2;
    }
    let padded_shape: [usize; 3] = std::array::from_fn(|a| shape[a] + pad_lo[a] + pad_hi[a]);
    let padded = if pad_lo.iter().chain(&pad_hi).any(|&p| p > 0) {
        // constant_pad_nd lists pads from the last axis: [x_lo, x_hi, y_lo, y_hi, z_lo, z_hi].
        let pads: Vec<i64> = (0..3)
            .rev()
            .flat_map(|a| [pad_lo[a] as i64, pad_hi[a] as i64])
            .collect();
        image.f_constant_pad_nd(pads.as_slice())?
    } else {
        image.shallow_clone()
    };
    let padded = padded.f_to_device(device)?.f_to_kind(Kind::Float)?;

    let steps = sliding_window_steps(padded_shape, patch, 1.0 - sw.overlap);
    let weights = if sw.gaussian {
        gaussian_importance(patch, SIGMA_SCALE)
    } else {
        vec![1.0f32; patch.iter().product()]
    };
    let pz = patch.map(|v| v as i64);
    let weight = Tensor::f_from_slice(&weights)?
        .f_reshape([pz[0], pz[1], pz[2]])?
        .f_to_device(device)?;
    let k = net.config().num_classes;
    let ps = padded_shape.map(|v| v as i64);
    let acc = Tensor::f_zeros([k, ps[0], ps[1], ps[2]], (Kind::Float, device))?;
    let norm = Tensor::f_zeros([ps[0], ps[1], ps[2]], (Kind::Float, device))?;

    tch::no_grad(|| -> Result<(), TchError> {
        for &sz in &steps[0] {
            for &sy in &steps[1] {
                for &sx in &steps[2] {
                    let o = [sz as i64, sy as i64, sx as i64];
                    let window = padded
                        .f_narrow(1, o[0], pz[0])?
                        .f_narrow(2, o[1], pz[1])?
                        .f_narrow(3, o[2], pz[2])?
                        .f_unsqueeze(0)?;
                    let logits = with_autocast(autocast, || net.forward_full(&window))?;
                    let logits = logits.f_squeeze_dim(0)?.f_to_kind(Kind::Float)?;
                    let weighted = logits.f_mul(&weight)?;
                    let mut acc_view = acc
                        .f_narrow(1, o[0], pz[0])?
                        .f_narrow(2, o[1], pz[1])?
                        .f_narrow(3, o[2], pz[2])?;
                    let _ = acc_view.f_add_(&weighted)?;
                    let mut norm_view = norm
                        .f_narrow(0, o[0], pz[0])?
                        .f_narrow(1, o[1], pz[1])?
                        .f_narrow(2, o[2], pz[2])?;
                    let _ = norm_view.f_add_(&weight)?;
                }
            }
        }
        Ok(())
    })?;
    let out = acc.f_div(&norm.f_unsqueeze(0)?)?;
    let out = out
        .f_narrow(1, pad_lo[0] as i64, shape[0] as i64)?
        .f_narrow(2, pad_lo[1] as i64, shape[1] as i64)?
        .f_narrow(3, pad_lo[2] as i64, shape[2] as i64)?;
    out.f_to_device(Device::Cpu)?.f_contiguous()
}

/// The hard segmentation `[Z, Y, X]` (argmax over classes) of logits `[K, Z, Y, X]`.
pub fn argmax_labels(logits: &Tensor) -> Result<Vec<u16>, TchError> {
    let am = logits
        .f_argmax(0, false)?
        .f_to_kind(Kind::Int)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?
        .f_flatten(0, -1)?;
    let v = Vec::<i32>::try_from(&am)?;
    Ok(v.into_iter()
        .map(|c| u16::try_from(c).unwrap_or(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::{Model, UNetConfig};

    fn model() -> Model {
        tch::set_num_threads(1);
        let cfg = UNetConfig::from_pools([2, 2, 3], 2, 3, 4, 16, false);
        Model::new(&cfg, Device::Cpu, 3).unwrap()
    }

    /// A volume exactly one window large: one forward pass, logits × g / g.
    #[test]
    fn one_window_equals_one_forward_pass() {
        let m = model();
        let image = crate::unet::randn_in_turn(&[2, 8, 12, 16], (Kind::Float, Device::Cpu));
        let sw = SlidingWindow::new([8, 12, 16]);
        let got = sliding_window_logits(&m.net, &image, &sw, Device::Cpu, false).unwrap();
        let want = tch::no_grad(|| m.net.forward_full(&image.unsqueeze(0)))
            .unwrap()
            .squeeze_dim(0);
        assert_eq!(got.size(), vec![3, 8, 12, 16]);
        let diff = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * scale.max(1.0), "max difference {diff}");
        assert_eq!(argmax_labels(&got).unwrap(), argmax_labels(&want).unwrap());
    }

    /// A volume smaller than the window is padded with zeros, evenly, and cropped back: the
    /// same as one forward pass on the padded volume.
    #[test]
    fn a_small_volume_is_padded_into_one_window() {
        let m = model();
        let image = crate::unet::randn_in_turn(&[2, 5, 12, 13], (Kind::Float, Device::Cpu));
        let sw = SlidingWindow::new([8, 12, 16]);
        let got = sliding_window_logits(&m.net, &image, &sw, Device::Cpu, false).unwrap();
        // z: 3 missing → 1 before, 2 after; x: 3 missing → 1 before, 2 after.
        let padded = image.constant_pad_nd([1i64, 2, 0, 0, 1, 2]);
        let want = tch::no_grad(|| m.net.forward_full(&padded.unsqueeze(0)))
            .unwrap()
            .squeeze_dim(0)
            .narrow(1, 1, 5)
            .narrow(3, 1, 13);
        assert_eq!(got.size(), vec![3, 5, 12, 13]);
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * want.abs().max().double_value(&[]).max(1.0));
    }

    /// Several windows along x (steps 0, 7, 14 for 30 voxels and a 16-voxel window): voxels
    /// only the first window covers get exactly its logits, and the blend stays finite.
    #[test]
    fn voxels_covered_by_one_window_get_its_logits() {
        let m = model();
        let image = crate::unet::randn_in_turn(&[2, 8, 12, 30], (Kind::Float, Device::Cpu));
        let sw = SlidingWindow::new([8, 12, 16]);
        assert_eq!(
            sliding_window_steps([8, 12, 30], [8, 12, 16], 0.5)[2],
            vec![0, 7, 14]
        );
        let got = sliding_window_logits(&m.net, &image, &sw, Device::Cpu, false).unwrap();
        assert_eq!(got.size(), vec![3, 8, 12, 30]);
        let first = tch::no_grad(|| m.net.forward_full(&image.narrow(3, 0, 16).unsqueeze(0)))
            .unwrap()
            .squeeze_dim(0);
        let diff = (got.narrow(3, 0, 7) - first.narrow(3, 0, 7))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff <= 1e-5 * first.abs().max().double_value(&[]).max(1.0));
        assert!(bool::try_from(got.isfinite().all()).unwrap());
    }

    proptest::proptest! {
        /// Windows start at 0, end at the far edge, increase, and leave no voxel uncovered.
        #[test]
        fn windows_cover_every_voxel(
            size in proptest::array::uniform3(1usize..300),
            patch in proptest::array::uniform3(1usize..130),
            overlap in 0.0f64..0.9,
        ) {
            let padded: [usize; 3] = std::array::from_fn(|a| size[a].max(patch[a]));
            let steps = sliding_window_steps(padded, patch, 1.0 - overlap);
            for a in 0..3 {
                let st = &steps[a];
                proptest::prop_assert_eq!(st[0], 0);
                proptest::prop_assert_eq!(*st.last().unwrap(), padded[a] - patch[a]);
                for w in st.windows(2) {
                    proptest::prop_assert!(w[0] < w[1]);
                    proptest::prop_assert!(w[1] - w[0] <= patch[a]);
                }
            }
        }
    }

    #[test]
    fn steps_follow_nnunet() {
        // 160 voxels, patch 128, step 0.5 → ceil(32 / 64) + 1 = 2 windows: 0 and 32.
        assert_eq!(
            sliding_window_steps([160, 128, 300], [128, 128, 128], 0.5)[0],
            vec![0, 32]
        );
        // equal size → one window.
        assert_eq!(
            sliding_window_steps([160, 128, 300], [128, 128, 128], 0.5)[1],
            vec![0]
        );
        // 300: ceil(172 / 64) + 1 = 4 windows over 0..172: 0, 57.33, 114.67, 172 → rounded.
        assert_eq!(
            sliding_window_steps([160, 128, 300], [128, 128, 128], 0.5)[2],
            vec![0, 57, 115, 172]
        );
    }

    #[test]
    fn gaussian_peaks_in_the_centre_and_has_no_zeros() {
        let g = gaussian_importance([8, 16, 16], SIGMA_SCALE);
        let idx = |z: usize, y: usize, x: usize| (z * 16 + y) * 16 + x;
        assert!((g[idx(4, 8, 8)] - 10.0).abs() < 1e-5);
        let max = g.iter().copied().fold(f32::MIN, f32::max);
        assert_eq!(max, g[idx(4, 8, 8)]);
        assert!(g.iter().all(|&v| v > 0.0));
        // sigma 2 along x: one voxel off centre along x is exp(-1/8) of the peak.
        assert!((g[idx(4, 8, 9)] / g[idx(4, 8, 8)] - (-0.125f32).exp()).abs() < 1e-5);
        // corner: beyond 4 sigma along z (sigma 1, radius 4 ≥ |0 - 4|): still inside; the
        // minimum is at the corner.
        let min = g.iter().copied().fold(f32::MAX, f32::min);
        assert_eq!(min, g[idx(0, 0, 0)]);
    }
}

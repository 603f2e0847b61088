//! Separable resampling of 3D volumes to a new voxel spacing.
//!
//! Output voxel `d` along an axis of `n_in → n_out` voxels reads the input at the voxel-centre
//! aligned coordinate `s = (d + 0.5) · n_in / n_out − 0.5`, clamped to `[0, n_in − 1]` (edge
//! values are repeated). Images use linear or cubic convolution (Keys, `a = −0.5`) one axis at a
//! time; label maps use nearest neighbour (`floor((d + 0.5) · n_in / n_out)`) in one gather pass,
//! so they never gain a value they did not have. Tap positions and weights are computed once per
//! axis; the inner loops run over contiguous rows or planes and allocate nothing.

use serde::{Deserialize, Serialize};

use crate::types::LabelData;

/// Relative spacing difference below which an axis counts as already at the target spacing.
pub const SPACING_TOLERANCE: f64 = 1.0e-3;
/// Spacing ratio above which a case counts as anisotropic (nnU-Net's threshold).
pub const ANISOTROPY_THRESHOLD: f64 = 3.0;

/// Interpolation used for image channels.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interp {
    /// Linear interpolation (two taps per axis).
    Linear,
    /// Cubic convolution (Keys, `a = −0.5`; four taps per axis), nnU-Net's default order.
    #[default]
    Cubic,
}

/// One-dimensional kernel applied along an axis.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Nearest neighbour.
    Nearest,
    /// Linear.
    Linear,
    /// Cubic convolution (Keys, `a = −0.5`).
    Cubic,
}

impl From<Interp> for Kernel {
    fn from(i: Interp) -> Kernel {
        match i {
            Interp::Linear => Kernel::Linear,
            Interp::Cubic => Kernel::Cubic,
        }
    }
}

/// Whether any axis of `spacing` differs from `target` by more than [`SPACING_TOLERANCE`]
/// (relative).
pub fn needs_resampling(spacing: [f64; 3], target: [f64; 3]) -> bool {
    spacing
        .iter()
        .zip(&target)
        .any(|(&s, &t)| (s - t).abs() > SPACING_TOLERANCE * t.abs())
}

/// Shape after resampling: per axis `max(1, round(shape · spacing / target))`.
pub fn resampled_shape(shape: [usize; 3], spacing: [f64; 3], target: [f64; 3]) -> [usize; 3] {
    std::array::from_fn(|a| {
        let n = (shape[a] as f64 * spacing[a] / target[a]).round();
        if n.is_finite() && n >= 1.0 {
            n as usize
        } else {
            1
        }
    })
}

/// The axis nnU-Net treats separately (nearest neighbour for images) when resampling from
/// `spacing` to `target`: if either spacing is anisotropic (largest / smallest >
/// [`ANISOTROPY_THRESHOLD`]), its single coarsest axis; `None` when neither is, or when two axes
/// share the coarsest spacing.
pub fn low_resolution_axis(spacing: [f64; 3], target: [f64; 3]) -> Option<usize> {
    fn coarse_axis(s: [f64; 3]) -> Option<Option<usize>> {
        let max = s.iter().copied().fold(f64::MIN, f64::max);
        let min = s.iter().copied().fold(f64::MAX, f64::min);
        if !(min > 0.0 && max / min > ANISOTROPY_THRESHOLD) {
            return None;
        }
        let coarse: Vec<usize> = (0..3).filter(|&a| s[a] == max).collect();
        Some((coarse.len() == 1).then(|| coarse[0]))
    }
    coarse_axis(spacing)
        .or_else(|| coarse_axis(target))
        .flatten()
}

/// Source positions and weights of every output voxel along one axis.
struct Taps {
    /// Taps per output voxel.
    k: usize,
    /// `n_out × k` source indices.
    idx: Vec<usize>,
    /// `n_out × k` weights.
    w: Vec<f32>,
}

/// Keys cubic convolution kernel with `a = −0.5`.
fn keys(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x <= 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Nearest source index of each output voxel.
fn nearest_map(n_in: usize, n_out: usize) -> Vec<usize> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|d| (((d as f64 + 0.5) * scale).floor() as usize).min(n_in - 1))
        .collect()
}

fn taps(n_in: usize, n_out: usize, kernel: Kernel) -> Taps {
    if kernel == Kernel::Nearest {
        return Taps {
            k: 1,
            idx: nearest_map(n_in, n_out),
            w: vec![1.0; n_out],
        };
    }
    let scale = n_in as f64 / n_out as f64;
    let last = (n_in - 1) as f64;
    let k = if kernel == Kernel::Linear { 2 } else { 4 };
    let mut idx = Vec::with_capacity(n_out * k);
    let mut w = Vec::with_capacity(n_out * k);
    for d in 0..n_out {
        let s = ((d as f64 + 0.5) * scale - 0.5).clamp(0.0, last);
        let i0 = s.floor();
        let t = s - i0;
        let i0 = i0 as isize;
        let clamp = |i: isize| i.clamp(0, n_in as isize - 1) as usize;
        if kernel == Kernel::Linear {
            idx.extend([clamp(i0), clamp(i0 + 1)]);
            w.extend([(1.0 - t) as f32, t as f32]);
        } else {
            idx.extend([clamp(i0 - 1), clamp(i0), clamp(i0 + 1), clamp(i0 + 2)]);
            w.extend([keys(1.0 + t), keys(t), keys(1.0 - t), keys(2.0 - t)].map(|v| v as f32));
        }
    }
    Taps { k, idx, w }
}

/// Resamples a `f32` volume (`[z, y, x]`, C order) to `out_shape` with one kernel per axis
/// (`kernels[0]` for z). Axes whose size does not change are copied. Returns an empty vector
/// when `data` does not hold `shape`'s voxels or a shape has a zero extent.
pub fn resample_f32(
    data: &[f32],
    shape: [usize; 3],
    out_shape: [usize; 3],
    kernels: [Kernel; 3],
) -> Vec<f32> {
    if data.len() != shape.iter().product::<usize>() || shape.contains(&0) || out_shape.contains(&0)
    {
        return Vec::new();
    }
    let [nz, ny, nx] = shape;
    let [oz, oy, ox] = out_shape;
    let mut cur: Option<Vec<f32>> = None;
    if ox != nx {
        cur = Some(pass_x(data, nz * ny, nx, &taps(nx, ox, kernels[2])));
    }
    if oy != ny {
        let src = cur.as_deref().unwrap_or(data);
        cur = Some(pass_outer(src, nz, ny, ox, &taps(ny, oy, kernels[1])));
    }
    if oz != nz {
        let src = cur.as_deref().unwrap_or(data);
        cur = Some(pass_outer(src, 1, nz, oy * ox, &taps(nz, oz, kernels[0])));
    }
    cur.unwrap_or_else(|| data.to_vec())
}

/// Resamples along the contiguous axis: `rows × n_in` → `rows × n_out`.
fn pass_x(src: &[f32], rows: usize, n_in: usize, t: &Taps) -> Vec<f32> {
    match t.k {
        1 => pass_x_k::<1>(src, rows, n_in, t),
        2 => pass_x_k::<2>(src, rows, n_in, t),
        _ => pass_x_k::<4>(src, rows, n_in, t),
    }
}

fn pass_x_k<const K: usize>(src: &[f32], rows: usize, n_in: usize, t: &Taps) -> Vec<f32> {
    let n_out = t.idx.len() / K;
    let mut out = vec![0.0f32; rows * n_out];
    for (row, dst) in src.chunks_exact(n_in).zip(out.chunks_exact_mut(n_out)) {
        for ((d, idx), w) in dst
            .iter_mut()
            .zip(t.idx.chunks_exact(K))
            .zip(t.w.chunks_exact(K))
        {
            let mut acc = 0.0f32;
            for j in 0..K {
                acc += w[j] * row[idx[j]];
            }
            *d = acc;
        }
    }
    out
}

/// Resamples a middle axis: `[outer][n_in][inner]` → `[outer][n_out][inner]`, one weighted sum of
/// whole `inner`-long rows per output row (vectorises over `inner`).
fn pass_outer(src: &[f32], outer: usize, n_in: usize, inner: usize, t: &Taps) -> Vec<f32> {
    let n_out = t.idx.len() / t.k;
    let mut out = vec![0.0f32; outer * n_out * inner];
    for (block, dst_block) in src
        .chunks_exact(n_in * inner)
        .zip(out.chunks_exact_mut(n_out * inner))
    {
        for (d, dst) in dst_block.chunks_exact_mut(inner).enumerate() {
            let idx = &t.idx[d * t.k..(d + 1) * t.k];
            let w = &t.w[d * t.k..(d + 1) * t.k];
            for (&i, &wj) in idx.iter().zip(w) {
                if wj == 0.0 {
                    continue;
                }
                let row = &block[i * inner..(i + 1) * inner];
                for (o, &v) in dst.iter_mut().zip(row) {
                    *o += wj * v;
                }
            }
        }
    }
    out
}

/// Nearest-neighbour resampling of a label map to `out_shape` (one gather pass). Every output
/// value is a value of the input. Returns an empty map when `labels` does not hold `shape`'s
/// voxels or a shape has a zero extent.
pub fn resample_labels(labels: &LabelData, shape: [usize; 3], out_shape: [usize; 3]) -> LabelData {
    match labels {
        LabelData::U8(v) => LabelData::U8(gather_nearest(v, shape, out_shape)),
        LabelData::U16(v) => LabelData::U16(gather_nearest(v, shape, out_shape)),
    }
}

fn gather_nearest<T: Copy>(src: &[T], shape: [usize; 3], out_shape: [usize; 3]) -> Vec<T> {
    if src.len() != shape.iter().product::<usize>() || shape.contains(&0) || out_shape.contains(&0)
    {
        return Vec::new();
    }
    let [_, ny, nx] = shape;
    let mz = nearest_map(shape[0], out_shape[0]);
    let my = nearest_map(shape[1], out_shape[1]);
    let mx = nearest_map(shape[2], out_shape[2]);
    let mut out = Vec::with_capacity(out_shape.iter().product());
    for &z in &mz {
        for &y in &my {
            let row = &src[(z * ny + y) * nx..(z * ny + y + 1) * nx];
            out.extend(mx.iter().map(|&x| row[x]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ramp(shape: [usize; 3], f: impl Fn(f64, f64, f64) -> f64) -> Vec<f32> {
        let mut v = Vec::new();
        for z in 0..shape[0] {
            for y in 0..shape[1] {
                for x in 0..shape[2] {
                    v.push(f(z as f64, y as f64, x as f64) as f32);
                }
            }
        }
        v
    }

    #[test]
    fn shapes_and_tolerance() {
        assert_eq!(
            resampled_shape([20, 512, 512], [2.0, 0.977, 0.977], [2.0, 1.0, 1.0]),
            [20, 500, 500]
        );
        assert_eq!(
            resampled_shape([3, 10, 10], [1.0, 1.0, 1.0], [5.0, 1.0, 1.0]),
            [1, 10, 10]
        );
        assert_eq!(
            resampled_shape([1, 10, 10], [1.0, 1.0, 1.0], [50.0, 0.5, 2.0]),
            [1, 20, 5]
        );
        assert!(!needs_resampling([1.0, 2.0, 3.0], [1.0005, 2.0, 3.0]));
        assert!(needs_resampling([1.0, 2.0, 3.0], [1.002, 2.0, 3.0]));
    }

    #[test]
    fn anisotropic_axis() {
        assert_eq!(
            low_resolution_axis([5.0, 1.0, 1.0], [2.0, 1.0, 1.0]),
            Some(0)
        );
        assert_eq!(
            low_resolution_axis([2.0, 1.0, 1.0], [1.0, 1.0, 4.0]),
            Some(2)
        );
        assert_eq!(low_resolution_axis([2.0, 1.0, 1.0], [2.0, 1.0, 1.0]), None);
        // Two equally coarse axes: no separate treatment (as nnU-Net).
        assert_eq!(low_resolution_axis([4.0, 4.0, 1.0], [1.0, 1.0, 1.0]), None);
    }

    #[test]
    fn identity_when_shape_is_unchanged() {
        let shape = [3, 4, 5];
        let v = ramp(shape, |z, y, x| z * 100.0 + y * 10.0 + x + 0.25);
        for k in [Kernel::Nearest, Kernel::Linear, Kernel::Cubic] {
            assert_eq!(resample_f32(&v, shape, shape, [k; 3]), v);
        }
    }

    #[test]
    fn keys_weights_sum_to_one() {
        for t in [0.0, 0.1, 0.5, 0.9] {
            let s = keys(1.0 + t) + keys(t) + keys(1.0 - t) + keys(2.0 - t);
            assert!((s - 1.0).abs() < 1e-12);
        }
        assert_eq!(keys(0.0), 1.0);
        assert_eq!(keys(1.0), 0.0);
        assert_eq!(keys(2.0), 0.0);
    }

    /// Linear (and cubic) interpolation reproduce a linear ramp away from the clamped borders.
    #[test]
    fn ramp_is_reproduced_in_the_interior() {
        let shape = [12, 14, 16];
        let f = |z: f64, y: f64, x: f64| 3.0 * z - 2.0 * y + 0.5 * x + 7.0;
        let v = ramp(shape, f);
        for (out_shape, kernel) in [
            ([20, 9, 31], Kernel::Linear),
            ([7, 25, 10], Kernel::Linear),
            ([20, 9, 31], Kernel::Cubic),
        ] {
            let out = resample_f32(&v, shape, out_shape, [kernel; 3]);
            assert_eq!(out.len(), out_shape.iter().product::<usize>());
            let mut checked = 0;
            for oz in 0..out_shape[0] {
                for oy in 0..out_shape[1] {
                    for ox in 0..out_shape[2] {
                        let src = |d: usize, a: usize| {
                            (d as f64 + 0.5) * shape[a] as f64 / out_shape[a] as f64 - 0.5
                        };
                        let (sz, sy, sx) = (src(oz, 0), src(oy, 1), src(ox, 2));
                        // Interior: every tap lies inside the volume.
                        let inside = |s: f64, a: usize| s >= 1.0 && s <= shape[a] as f64 - 2.0;
                        if !(inside(sz, 0) && inside(sy, 1) && inside(sx, 2)) {
                            continue;
                        }
                        let got = out[(oz * out_shape[1] + oy) * out_shape[2] + ox];
                        let want = f(sz, sy, sx);
                        assert!(
                            (f64::from(got) - want).abs() < 1e-3,
                            "{kernel:?} {got} {want}"
                        );
                        checked += 1;
                    }
                }
            }
            assert!(checked > 100);
        }
    }

    #[test]
    fn nearest_axis_takes_source_slices() {
        // z upsampled 2x with nearest: every output slice equals a source slice.
        let shape = [3, 2, 2];
        let v = ramp(shape, |z, y, x| z * 10.0 + y * 2.0 + x);
        let out = resample_f32(
            &v,
            shape,
            [6, 2, 2],
            [Kernel::Nearest, Kernel::Cubic, Kernel::Cubic],
        );
        let slices: Vec<&[f32]> = out.chunks(4).collect();
        assert_eq!(slices[0], &v[0..4]);
        assert_eq!(slices[1], &v[0..4]);
        assert_eq!(slices[2], &v[4..8]);
        assert_eq!(slices[5], &v[8..12]);
    }

    #[test]
    fn bad_input_gives_empty_output() {
        assert!(resample_f32(&[1.0; 5], [1, 2, 3], [2, 2, 2], [Kernel::Linear; 3]).is_empty());
        assert!(resample_labels(&LabelData::U8(vec![1; 5]), [1, 2, 3], [2, 2, 2]).is_empty());
    }

    proptest! {
        #[test]
        fn nearest_never_invents_labels(
            shape in proptest::array::uniform3(1usize..9),
            out_shape in proptest::array::uniform3(1usize..13),
            raw in proptest::collection::vec(0u16..600, 1..64),
        ) {
            let n: usize = shape.iter().product();
            let v: Vec<u16> = (0..n).map(|i| raw[i % raw.len()] * 97 % 601).collect();
            let out = resample_labels(&LabelData::U16(v.clone()), shape, out_shape);
            prop_assert_eq!(out.len(), out_shape.iter().product::<usize>());
            let present: std::collections::HashSet<u16> = v.iter().copied().collect();
            for i in 0..out.len() {
                prop_assert!(present.contains(&out.get(i)));
            }
            if shape == out_shape {
                prop_assert_eq!(out, LabelData::U16(v));
            }
        }

        #[test]
        fn output_shape_and_range(
            shape in proptest::array::uniform3(1usize..8),
            out_shape in proptest::array::uniform3(1usize..11),
            raw in proptest::collection::vec(-100.0f32..100.0, 1..64),
        ) {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| raw[i % raw.len()]).collect();
            let (lo, hi) = v.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let out = resample_f32(&v, shape, out_shape, [Kernel::Linear; 3]);
            prop_assert_eq!(out.len(), out_shape.iter().product::<usize>());
            // Linear interpolation stays within the input range.
            for &o in &out {
                prop_assert!(o >= lo - 1e-3 && o <= hi + 1e-3);
            }
        }
    }
}

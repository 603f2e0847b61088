//! Intensity transforms on one channel of the output patch, in nnU-Net's order.
//!
//! Pointwise affine steps (brightness, contrast, the statistics restore of gamma) are not applied
//! one by one: they accumulate in a [`Pending`] map `x -> clamp(a·x + b)` whose statistics follow
//! from the data's, and the map is applied in the next pass that reads the data anyway (the
//! low-resolution copy, the gamma pass) or in one final pass.

use crate::fastmath::{NOISE_BLOCK, hash32, normal_block, pow01};
use crate::rng::mix;
use crate::spatial::grow;

/// `x -> clamp(a·x + b, lo, hi)`, computed in `f32` exactly in this order.
#[derive(Copy, Clone, Debug, PartialEq)]
pub(crate) struct Pending {
    pub a: f32,
    pub b: f32,
    pub clamp: Option<(f32, f32)>,
}

impl Pending {
    pub(crate) const IDENTITY: Pending = Pending {
        a: 1.0,
        b: 0.0,
        clamp: None,
    };

    pub(crate) fn is_identity(&self) -> bool {
        *self == Pending::IDENTITY
    }

    #[inline(always)]
    fn eval(&self, x: f32) -> f32 {
        let y = self.a * x + self.b;
        match self.clamp {
            Some((lo, hi)) => {
                let y = if y < lo { lo } else { y };
                if y > hi { hi } else { y }
            }
            None => y,
        }
    }
}

/// Applies `p` to `data` in place.
#[inline(always)]
pub(crate) fn materialize(data: &mut [f32], p: &Pending) {
    if p.is_identity() {
        return;
    }
    let (a, b) = (p.a, p.b);
    match p.clamp {
        None => data.iter_mut().for_each(|v| *v = a * *v + b),
        Some((lo, hi)) => data.iter_mut().for_each(|v| {
            let y = a * *v + b;
            let y = if y < lo { lo } else { y };
            *v = if y > hi { hi } else { y };
        }),
    }
}

/// Mean, unbiased standard deviation, minimum and maximum of a channel.
#[derive(Copy, Clone, Debug, PartialEq)]
pub(crate) struct Stats {
    pub mean: f64,
    pub std: f64,
    pub min: f32,
    pub max: f32,
}

impl Stats {
    /// The statistics of `a·x + b` (no clamp) given those of `x`.
    fn affine(&self, a: f32, b: f32) -> Stats {
        let (lo, hi) = (a * self.min + b, a * self.max + b);
        Stats {
            mean: a as f64 * self.mean + b as f64,
            std: (a as f64).abs() * self.std,
            min: lo.min(hi),
            max: lo.max(hi),
        }
    }
}

const LANES: usize = 16;
const STAT_BLOCK: usize = 2048;

/// Sums of `x − shift`, `(x − shift)²`, min and max: `f32` lanes within blocks, `f64` across
/// blocks (the lane layout is fixed, so the result does not depend on the vector width).
#[derive(Copy, Clone, Debug)]
struct Acc {
    shift: f32,
    n: usize,
    sum: f64,
    sq: f64,
    min: f32,
    max: f32,
}

impl Acc {
    #[inline(always)]
    fn new(shift: f32) -> Acc {
        Acc {
            shift,
            n: 0,
            sum: 0.0,
            sq: 0.0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }

    /// Accumulates one block (at most [`STAT_BLOCK`] values).
    #[inline(always)]
    fn block(&mut self, data: &[f32]) {
        let mut s = [0f32; LANES];
        let mut q = [0f32; LANES];
        let mut lo = [f32::INFINITY; LANES];
        let mut hi = [f32::NEG_INFINITY; LANES];
        let chunks = data.chunks_exact(LANES);
        let rest = chunks.remainder();
        for ch in chunks {
            for l in 0..LANES {
                let v = ch[l];
                let d = v - self.shift;
                s[l] += d;
                q[l] += d * d;
                lo[l] = if v < lo[l] { v } else { lo[l] };
                hi[l] = if v > hi[l] { v } else { hi[l] };
            }
        }
        for (l, &v) in rest.iter().enumerate() {
            let d = v - self.shift;
            s[l] += d;
            q[l] += d * d;
            lo[l] = if v < lo[l] { v } else { lo[l] };
            hi[l] = if v > hi[l] { v } else { hi[l] };
        }
        for l in 0..LANES {
            self.sum += s[l] as f64;
            self.sq += q[l] as f64;
            self.min = self.min.min(lo[l]);
            self.max = self.max.max(hi[l]);
        }
        self.n += data.len();
    }

    #[inline(always)]
    fn finish(&self) -> Stats {
        let n = self.n.max(1) as f64;
        let mean_d = self.sum / n;
        let var = if self.n > 1 {
            ((self.sq - self.sum * mean_d) / (n - 1.0)).max(0.0)
        } else {
            0.0
        };
        Stats {
            mean: self.shift as f64 + mean_d,
            std: var.sqrt(),
            min: self.min,
            max: self.max,
        }
    }
}

/// A shift close to the data (a few samples' mean), so the shifted sums do not cancel.
#[inline(always)]
fn pick_shift(data: &[f32]) -> f32 {
    if data.is_empty() {
        return 0.0;
    }
    let k = data.len();
    let picks = [0, k / 4, k / 2, 3 * k / 4, k - 1];
    let s: f32 = picks.iter().map(|&i| data[i]).sum();
    let m = s / picks.len() as f32;
    if m.is_finite() { m } else { 0.0 }
}

/// Statistics of `data`.
#[inline(always)]
pub(crate) fn stats(data: &[f32]) -> Stats {
    let mut acc = Acc::new(pick_shift(data));
    for block in data.chunks(STAT_BLOCK) {
        acc.block(block);
    }
    acc.finish()
}

/// Adds Gaussian noise of standard deviation `std` from the counter-based field `seed`.
#[inline(always)]
pub(crate) fn add_noise(data: &mut [f32], std: f32, seed: u64) {
    let mut a = [0f32; NOISE_BLOCK];
    let mut b = [0f32; NOISE_BLOCK];
    for (k, block) in data.chunks_mut(2 * NOISE_BLOCK).enumerate() {
        let key = mix(seed ^ mix(k as u64));
        normal_block(
            hash32(key as u32),
            hash32((key >> 32) as u32 ^ 0x9e37_79b9),
            &mut a,
            &mut b,
        );
        for ((pair, &na), &nb) in block.chunks_exact_mut(2).zip(&a).zip(&b) {
            pair[0] += std * na;
            pair[1] += std * nb;
        }
        let len = block.len();
        if len % 2 == 1
            && let Some(v) = block.last_mut()
        {
            *v += std * a[len / 2];
        }
    }
}

/// nnU-Net's Gaussian kernel for `sigma` (batchgeneratorsv2, truncation 6): `size` = the odd
/// number nearest to `6σ + 0.5`, taps `exp(−x²/2σ²)` at `x = −size/2 … size/2`, normalised.
pub(crate) fn gaussian_kernel(sigma: f64, out: &mut Vec<f32>) {
    out.clear();
    if !(sigma > 0.0 && sigma.is_finite()) {
        out.push(1.0);
        return;
    }
    let n = sigma * 6.0 + 0.5;
    let rounded = n.round_ties_even();
    let size = if rounded as i64 % 2 == 1 {
        rounded
    } else if n - rounded >= 0.0 {
        rounded + 1.0
    } else {
        rounded - 1.0
    }
    .max(1.0) as usize;
    let half = (size - 1) as f64 / 2.0;
    let pdf = |i: usize| {
        let x = (i as f64 - half) / sigma;
        (-0.5 * x * x).exp()
    };
    let total: f64 = (0..size).map(pdf).sum();
    out.extend((0..size).map(|i| (pdf(i) / total) as f32));
}

/// Index of `i` reflected into `0..n` (PyTorch's `reflect`: the edge is not repeated; repeated
/// reflection for kernels longer than the axis).
#[inline]
pub(crate) fn reflect(i: i64, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n as i64 - 1);
    let m = i.rem_euclid(period);
    (if m >= n as i64 { period - m } else { m }) as usize
}

/// Scratch of the intensity transforms.
#[derive(Debug, Default)]
pub(crate) struct IntensityScratch {
    vol: Vec<f32>,
    plane: Vec<f32>,
    row: Vec<f32>,
    kernel: Vec<f32>,
    border: Vec<usize>,
    lut: [Vec<(usize, usize, f32, f32)>; 3],
}

/// Separable Gaussian blur with sigmas `[z, y, x]` (reflective borders).
#[inline(always)]
pub(crate) fn blur(data: &mut [f32], shape: [usize; 3], sigma: [f64; 3], s: &mut IntensityScratch) {
    let [pz, py, px] = shape;
    let n = data.len();
    let plane_len = py * px;
    // x: each row through a padded copy.
    gaussian_kernel(sigma[2], &mut s.kernel);
    if s.kernel.len() > 1 {
        let k = &s.kernel;
        let r = k.len() / 2;
        let padded = grow(&mut s.row, px + 2 * r);
        // Reflected border positions, computed once per call.
        s.border.clear();
        s.border
            .extend((0..r).map(|i| reflect(i as i64 - r as i64, px)));
        s.border
            .extend((0..r).map(|i| reflect((px + i) as i64, px)));
        let border = &s.border;
        for row in data.chunks_exact_mut(px) {
            padded[r..r + px].copy_from_slice(row);
            for i in 0..r {
                padded[i] = row[border[i]];
                padded[r + px + i] = row[border[r + i]];
            }
            row.fill(0.0);
            for (t, &w) in k.iter().enumerate() {
                for (o, &v) in row.iter_mut().zip(&padded[t..t + px]) {
                    *o += w * v;
                }
            }
        }
    }
    // y: per plane, into the volume buffer.
    gaussian_kernel(sigma[1], &mut s.kernel);
    let vol = grow(&mut s.vol, n);
    if s.kernel.len() > 1 {
        let k = &s.kernel;
        let r = k.len() as i64 / 2;
        for (src, dst) in data
            .chunks_exact(plane_len)
            .zip(vol.chunks_exact_mut(plane_len))
        {
            for (y, orow) in dst.chunks_exact_mut(px).enumerate() {
                orow.fill(0.0);
                for (t, &w) in k.iter().enumerate() {
                    let sy = reflect(y as i64 + t as i64 - r, py);
                    for (o, &v) in orow.iter_mut().zip(&src[sy * px..(sy + 1) * px]) {
                        *o += w * v;
                    }
                }
            }
        }
    } else {
        vol.copy_from_slice(data);
    }
    // z: planes of the volume buffer back into the channel.
    gaussian_kernel(sigma[0], &mut s.kernel);
    if s.kernel.len() > 1 {
        let k = &s.kernel;
        let r = k.len() as i64 / 2;
        for (z, dst) in data.chunks_exact_mut(plane_len).enumerate() {
            dst.fill(0.0);
            for (t, &w) in k.iter().enumerate() {
                let sz = reflect(z as i64 + t as i64 - r, pz);
                for (o, &v) in dst
                    .iter_mut()
                    .zip(&vol[sz * plane_len..(sz + 1) * plane_len])
                {
                    *o += w * v;
                }
            }
        }
    } else {
        data.copy_from_slice(vol);
    }
}

/// The composite taps of one axis of the low-resolution simulation: output index → two indices
/// of the full-resolution channel and their weights (nearest-exact down to `m`, linear up with
/// `align_corners=False`, as PyTorch's `interpolate`).
fn lowres_axis(p: usize, zoom: f64, out: &mut Vec<(usize, usize, f32, f32)>) {
    out.clear();
    let m = ((p as f64 * zoom).round_ties_even() as usize).clamp(1, p.max(1));
    let down = p as f32 / m as f32; // nearest-exact scale (input / output)
    let near = |j: usize| (((j as f32 + 0.5) * down).floor() as usize).min(p - 1);
    let up = m as f32 / p as f32; // linear scale (input / output)
    for i in 0..p {
        let src = (up * (i as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(m - 1);
        let i1 = if i0 + 1 < m { i0 + 1 } else { i0 };
        let l1 = src - i0 as f32;
        out.push((near(i0), near(i1), 1.0 - l1, l1));
    }
}

/// Low-resolution simulation of one channel with zoom `[z, y, x]`; `pending` is applied on the
/// way into the working copy.
#[inline(always)]
pub(crate) fn lowres(
    data: &mut [f32],
    shape: [usize; 3],
    zoom: [f64; 3],
    pending: &Pending,
    s: &mut IntensityScratch,
) {
    let [_, py, px] = shape;
    let plane_len = py * px;
    for a in 0..3 {
        lowres_axis(shape[a], zoom[a], &mut s.lut[a]);
    }
    let src = grow(&mut s.vol, data.len());
    for (d, &v) in src.iter_mut().zip(data.iter()) {
        *d = pending.eval(v);
    }
    let plane = grow(&mut s.plane, plane_len);
    let row = grow(&mut s.row, px);
    let [lz, ly, lx] = &s.lut;
    for (dst, &(a, b, wa, wb)) in data.chunks_exact_mut(plane_len).zip(lz) {
        let (pa, pb) = (
            &src[a * plane_len..(a + 1) * plane_len],
            &src[b * plane_len..(b + 1) * plane_len],
        );
        for ((o, &u), &v) in plane.iter_mut().zip(pa).zip(pb) {
            *o = wa * u + wb * v;
        }
        for (orow, &(ya, yb, wya, wyb)) in dst.chunks_exact_mut(px).zip(ly) {
            let (ra, rb) = (
                &plane[ya * px..(ya + 1) * px],
                &plane[yb * px..(yb + 1) * px],
            );
            for ((o, &u), &v) in row.iter_mut().zip(ra).zip(rb) {
                *o = wya * u + wyb * v;
            }
            for (o, &(xa, xb, wxa, wxb)) in orow.iter_mut().zip(lx) {
                *o = wxa * row[xa] + wxb * row[xb];
            }
        }
    }
}

/// Gamma on the channel's range, the channel seen through `pending` (which this resets), negated
/// first and last when `invert`; with `retain_stats` the mean and standard deviation are restored
/// (as a new pending map).
#[inline(always)]
pub(crate) fn gamma(
    data: &mut [f32],
    g: f32,
    invert: bool,
    retain_stats: bool,
    pending: &mut Pending,
) {
    if pending.clamp.is_some() {
        materialize(data, pending);
        *pending = Pending::IDENTITY;
    }
    let (mut a, mut b) = (pending.a, pending.b);
    if invert {
        a = -a;
        b = -b;
    }
    let before = stats(data).affine(a, b);
    let (lo, range) = (before.min, before.max - before.min);
    let inv = 1.0 / range.max(1e-7);
    let mut acc = Acc::new(lo + 0.5 * range);
    for block in data.chunks_mut(STAT_BLOCK) {
        for v in block.iter_mut() {
            let u = a * *v + b;
            *v = pow01((u - lo) * inv, g) * range + lo;
        }
        acc.block(block);
    }
    let after = acc.finish();
    *pending = Pending::IDENTITY;
    if retain_stats {
        let k = (before.std / after.std.max(1e-7)) as f32;
        // (v − mean_after)·k + mean_before
        pending.a = k;
        pending.b = (before.mean - after.mean * k as f64) as f32;
    }
    if invert {
        pending.a = -pending.a;
        pending.b = -pending.b;
    }
}

/// Contrast about the channel mean with `factor`; with `preserve_range` the result is clipped to
/// the range the channel had before.
#[inline(always)]
pub(crate) fn contrast(data: &mut [f32], factor: f32, preserve_range: bool, pending: &mut Pending) {
    if pending.clamp.is_some() {
        materialize(data, pending);
        *pending = Pending::IDENTITY;
    }
    let st = stats(data).affine(pending.a, pending.b);
    let mean = st.mean as f32;
    // ((a·x + b) − mean)·f + mean
    pending.a *= factor;
    pending.b = (pending.b - mean) * factor + mean;
    pending.clamp = preserve_range.then_some((st.min, st.max));
}

/// Multiplies the channel by `factor >= 0`.
pub(crate) fn brightness(factor: f32, pending: &mut Pending) {
    pending.a *= factor;
    pending.b *= factor;
    if let Some((lo, hi)) = pending.clamp {
        pending.clamp = Some((lo * factor, hi * factor));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn kernel_sizes_follow_nnunet() {
        let mut k = Vec::new();
        for (sigma, size) in [(0.5, 3), (0.75, 5), (1.0, 7), (2.0, 13), (0.1, 1)] {
            gaussian_kernel(sigma, &mut k);
            assert_eq!(k.len(), size, "sigma {sigma}");
            let total: f32 = k.iter().sum();
            assert!((total - 1.0).abs() < 1e-6);
            for i in 0..k.len() / 2 {
                assert_eq!(k[i], k[k.len() - 1 - i]);
            }
        }
    }

    #[test]
    fn reflect_matches_pytorch() {
        // torch.nn.functional.pad([0..5), (3, 3), mode="reflect") = 3 2 1 | 0 1 2 3 4 | 3 2 1
        let got: Vec<usize> = (-3..8).map(|i| reflect(i, 5)).collect();
        assert_eq!(got, vec![3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
        assert_eq!(reflect(-4, 1), 0);
        assert_eq!(reflect(-3, 2), 1);
    }

    #[test]
    fn stats_are_exact_enough() {
        let data: Vec<f32> = (0..10_001)
            .map(|i| 1000.0 + ((i * 37) % 101) as f32 * 0.01)
            .collect();
        let st = stats(&data);
        let n = data.len() as f64;
        let mean = data.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!((st.mean - mean).abs() < 1e-6 * mean.abs());
        assert!(
            (st.std - var.sqrt()).abs() < 1e-4 * var.sqrt(),
            "{} {}",
            st.std,
            var.sqrt()
        );
        assert_eq!(st.min, 1000.0);
        assert_eq!(st.max, data.iter().cloned().fold(f32::MIN, f32::max));
    }

    #[test]
    fn lowres_tables_match_pytorch_examples() {
        // interpolate(size 4 → 2, nearest-exact) picks indices 1 and 3 (floor((j + .5) * 2)).
        // interpolate(2 → 4, linear, align_corners=False): sources -0.25→0, 0.25, 0.75, 1.25→i0=1.
        let mut lut = Vec::new();
        lowres_axis(4, 0.5, &mut lut);
        let expect = [
            (1, 3, 1.0, 0.0),
            (1, 3, 0.75, 0.25),
            (1, 3, 0.25, 0.75),
            (3, 3, 0.75, 0.25),
        ];
        for (got, want) in lut.iter().zip(expect) {
            assert_eq!((got.0, got.1), (want.0, want.1));
            assert!((got.2 - want.2).abs() < 1e-6 && (got.3 - want.3).abs() < 1e-6);
        }
        // Zoom 1 is the identity.
        lowres_axis(7, 1.0, &mut lut);
        for (i, t) in lut.iter().enumerate() {
            assert_eq!((t.0, t.2), (i, 1.0));
        }
    }
}

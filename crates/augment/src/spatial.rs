//! The spatial part: one resampling pass for rotation, scaling, elastic deformation and
//! mirroring (image trilinear, label nearest), or a plain (mirrored) copy when nothing moves.
//!
//! Source taps outside the source region contribute zero to the image and make the label the
//! ignore value, as PyTorch's `grid_sample(padding_mode="zeros")` does for the image.

use crate::Label;
use crate::rng::Rng;

/// Grows `v` to at least `n` elements (never shrinks, so a warm buffer never reallocates) and
/// returns its first `n`.
pub(crate) fn grow<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Shapes and buffers of one spatial pass.
pub(crate) struct Volumes<'a, L> {
    pub src_img: &'a [f32],
    pub src_lab: &'a [L],
    pub src_shape: [usize; 3],
    pub out_img: &'a mut [f32],
    pub out_lab: &'a mut [L],
    pub patch: [usize; 3],
    pub channels: usize,
    pub ignore: L,
}

/// Copies the patch (source shape = patch) flipping the `mirror` axes.
#[inline(always)]
pub(crate) fn copy_mirrored<L: Label>(v: Volumes<'_, L>, mirror: [bool; 3]) {
    let n: usize = v.patch.iter().product();
    for (src, dst) in v
        .src_img
        .chunks_exact(n)
        .zip(v.out_img.chunks_exact_mut(n))
        .take(v.channels)
    {
        mirror_copy(src, dst, v.patch, mirror);
    }
    if !v.out_lab.is_empty() {
        mirror_copy(v.src_lab, v.out_lab, v.patch, mirror);
    }
}

#[inline(always)]
fn mirror_copy<T: Copy>(src: &[T], dst: &mut [T], patch: [usize; 3], mirror: [bool; 3]) {
    let [pz, py, px] = patch;
    for (r, drow) in dst.chunks_exact_mut(px).enumerate() {
        let (z, y) = (r / py, r % py);
        let sz = if mirror[0] { pz - 1 - z } else { z };
        let sy = if mirror[1] { py - 1 - y } else { y };
        let start = (sz * py + sy) * px;
        let srow = &src[start..start + px];
        if mirror[2] {
            for (d, s) in drow.iter_mut().zip(srow.iter().rev()) {
                *d = *s;
            }
        } else {
            drow.copy_from_slice(srow);
        }
    }
}

/// The two trilinear taps of one axis: clamped indices and weights (zero for taps outside).
#[derive(Copy, Clone, Debug, Default)]
struct Taps {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

#[inline(always)]
fn taps(f: f32, n: usize) -> Taps {
    if !f.is_finite() {
        return Taps::default();
    }
    let fl = f.floor();
    let w = f - fl;
    let i0 = fl as i64;
    let i1 = i0 + 1;
    let ok0 = i0 >= 0 && (i0 as u64) < n as u64;
    let ok1 = i1 >= 0 && (i1 as u64) < n as u64;
    Taps {
        i0: if ok0 { i0 as usize } else { 0 },
        i1: if ok1 { i1 as usize } else { 0 },
        w0: if ok0 { 1.0 - w } else { 0.0 },
        w1: if ok1 { w } else { 0.0 },
    }
}

/// Nearest index of one axis, `None` outside.
#[inline(always)]
fn nearest(f: f32, n: usize) -> Option<usize> {
    if !f.is_finite() {
        return None;
    }
    let i = (f + 0.5).floor() as i64;
    (i >= 0 && (i as u64) < n as u64).then_some(i as usize)
}

/// Per-axis lookup tables of an axis-aligned mapping.
#[derive(Debug, Default)]
pub(crate) struct AxisTable {
    taps: Vec<Taps>,
    near: Vec<Option<usize>>,
}

impl AxisTable {
    fn fill(&mut self, len: usize, src_len: usize, f: impl Fn(usize) -> f32) {
        self.taps.clear();
        self.near.clear();
        for o in 0..len {
            let s = f(o);
            self.taps.push(taps(s, src_len));
            self.near.push(nearest(s, src_len));
        }
    }
}

/// The mapping of output voxels to source coordinates: `src = c_src + a · (o − c_out)`.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Affine {
    pub a: [[f64; 3]; 3],
    pub c_src: [f64; 3],
    pub c_out: [f64; 3],
}

impl Affine {
    /// Source coordinate of output voxel `(z, y, 0)` in `f32`, and the step along `x`.
    #[inline]
    fn row(&self, z: usize, y: usize) -> ([f32; 3], [f32; 3]) {
        let rel = [
            z as f64 - self.c_out[0],
            y as f64 - self.c_out[1],
            -self.c_out[2],
        ];
        let b = [0, 1, 2].map(|i| {
            (self.c_src[i] + self.a[i][0] * rel[0] + self.a[i][1] * rel[1] + self.a[i][2] * rel[2])
                as f32
        });
        let d = [0, 1, 2].map(|i| self.a[i][2] as f32);
        (b, d)
    }

    fn is_axis_aligned(&self) -> bool {
        (0..3).all(|i| (0..3).all(|j| i == j || self.a[i][j] == 0.0))
    }
}

/// Scratch of the spatial pass.
#[derive(Debug, Default)]
pub(crate) struct SpatialScratch {
    tables: [AxisTable; 3],
    row: Vec<f32>,
    field: Vec<f32>,
    lattice: Vec<f32>,
}

/// Resamples through `map` (no elastic field).
#[inline(always)]
pub(crate) fn resample<L: Label>(v: Volumes<'_, L>, map: &Affine, scratch: &mut SpatialScratch) {
    if map.is_axis_aligned() {
        resample_aligned(v, map, scratch);
    } else {
        resample_affine(v, map);
    }
}

/// Trilinear value of one channel at source coordinate `s`, with zero outside, and the nearest
/// label (`None` outside).
#[inline(always)]
fn sample_slow(src: &[f32], shape: [usize; 3], s: [f32; 3]) -> f32 {
    let (tz, ty, tx) = (
        taps(s[0], shape[0]),
        taps(s[1], shape[1]),
        taps(s[2], shape[2]),
    );
    let plane = shape[1] * shape[2];
    let mut acc = 0.0f32;
    for (iz, wz) in [(tz.i0, tz.w0), (tz.i1, tz.w1)] {
        for (iy, wy) in [(ty.i0, ty.w0), (ty.i1, ty.w1)] {
            let row = iz * plane + iy * shape[2];
            let w = wz * wy;
            acc += w * (tx.w0 * src[row + tx.i0] + tx.w1 * src[row + tx.i1]);
        }
    }
    acc
}

#[inline(always)]
fn label_slow<L: Label>(src: &[L], shape: [usize; 3], s: [f32; 3], ignore: L) -> L {
    match (
        nearest(s[0], shape[0]),
        nearest(s[1], shape[1]),
        nearest(s[2], shape[2]),
    ) {
        (Some(z), Some(y), Some(x)) => src[(z * shape[1] + y) * shape[2] + x],
        _ => ignore,
    }
}

/// Output tile of the rotated resampling `[z, y, x]`: its source footprint (about 45³ voxels
/// at ±30° and scale 1.4) stays in the core's L2 cache and TLB reach, where whole output rows
/// of a large rotated region would sweep through memory plane by plane.
const TILE: [usize; 3] = [16, 16, 32];

#[inline(always)]
fn resample_affine<L: Label>(v: Volumes<'_, L>, map: &Affine) {
    let Volumes {
        src_img,
        src_lab,
        src_shape: s,
        out_img,
        out_lab,
        patch: [pz, py, px],
        channels,
        ignore,
    } = v;
    let n_src = s[0] * s[1] * s[2];
    let n_out = pz * py * px;
    let lim = s.map(|n| n as f32 - 1.0);
    let with_label = !out_lab.is_empty();
    for z0 in (0..pz).step_by(TILE[0]) {
        for y0 in (0..py).step_by(TILE[1]) {
            for x0 in (0..px).step_by(TILE[2]) {
                let x1 = (x0 + TILE[2]).min(px);
                for z in z0..(z0 + TILE[0]).min(pz) {
                    for y in y0..(y0 + TILE[1]).min(py) {
                        let (b, d) = map.row(z, y);
                        let row_off = (z * py + y) * px;
                        // The coordinates are monotone in x, so the segment's end points bound
                        // every voxel of it.
                        let (first, last) = (x0 as f32, (x1 - 1) as f32);
                        let fast = (0..3).all(|i| {
                            let e0 = b[i] + first * d[i];
                            let e1 = b[i] + last * d[i];
                            e0.min(e1) >= 0.0 && e0.max(e1) < lim[i]
                        });
                        if fast && with_label && channels > 0 {
                            // Channel 0 and the labels share the coordinates.
                            row_fast_labelled(
                                &src_img[..n_src],
                                s,
                                b,
                                d,
                                x0..x1,
                                &mut out_img[row_off..row_off + px],
                                Some((src_lab, &mut out_lab[row_off..row_off + px])),
                            );
                            for c in 1..channels {
                                row_fast(
                                    &src_img[c * n_src..(c + 1) * n_src],
                                    s,
                                    b,
                                    d,
                                    x0..x1,
                                    &mut out_img[c * n_out + row_off..c * n_out + row_off + px],
                                );
                            }
                        } else if fast {
                            for c in 0..channels {
                                row_fast(
                                    &src_img[c * n_src..(c + 1) * n_src],
                                    s,
                                    b,
                                    d,
                                    x0..x1,
                                    &mut out_img[c * n_out + row_off..c * n_out + row_off + px],
                                );
                            }
                            if with_label {
                                labels_fast(
                                    src_lab,
                                    s,
                                    b,
                                    d,
                                    x0..x1,
                                    &mut out_lab[row_off..row_off + px],
                                );
                            }
                        } else {
                            for x in x0..x1 {
                                let xf = x as f32;
                                let f = [b[0] + xf * d[0], b[1] + xf * d[1], b[2] + xf * d[2]];
                                for c in 0..channels {
                                    out_img[c * n_out + row_off + x] =
                                        sample_slow(&src_img[c * n_src..(c + 1) * n_src], s, f);
                                }
                                if with_label {
                                    out_lab[row_off + x] = label_slow(src_lab, s, f, ignore);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Trilinear samples of one channel along `b + x·d` for `x` in `xs`, written to `out[x]`.
///
/// The caller guarantees that every coordinate of the segment lies in `[0, shape − 1)` on each
/// axis (checked at the end points; the coordinates are monotone in `x`) and that the source
/// has fewer than `i32::MAX` voxels. The loop has no bounds checks and 32-bit indices, so with
/// AVX2 it compiles to gathers.
#[inline(always)]
fn row_fast(
    src: &[f32],
    s: [usize; 3],
    b: [f32; 3],
    d: [f32; 3],
    xs: std::ops::Range<usize>,
    out: &mut [f32],
) {
    row_fast_labelled::<u8>(src, s, b, d, xs, out, None);
}

/// [`row_fast`], also writing the nearest labels of `labels = (source, output)` from the same
/// coordinates (nearest = floor + (fraction >= 0.5)).
#[inline(always)]
fn row_fast_labelled<L: Label>(
    src: &[f32],
    s: [usize; 3],
    b: [f32; 3],
    d: [f32; 3],
    xs: std::ops::Range<usize>,
    out: &mut [f32],
    mut labels: Option<(&[L], &mut [L])>,
) {
    let plane = (s[1] * s[2]) as i32;
    let row = s[2] as i32;
    let x0 = xs.start as i32;
    for (k, o) in out[xs.clone()].iter_mut().enumerate() {
        let xf = (x0 + k as i32) as f32;
        let fz = b[0] + xf * d[0];
        let fy = b[1] + xf * d[1];
        let fx = b[2] + xf * d[2];
        debug_assert!(fz >= 0.0 && fy >= 0.0 && fx >= 0.0);
        debug_assert!(fz < s[0] as f32 - 1.0 && fy < s[1] as f32 - 1.0 && fx < s[2] as f32 - 1.0);
        // SAFETY: the caller checked 0 <= f < shape - 1 on every axis, so each value is finite
        // and within i32; truncation of a non-negative value is its floor.
        let (iz, iy, ix) = unsafe {
            (
                fz.to_int_unchecked::<i32>(),
                fy.to_int_unchecked::<i32>(),
                fx.to_int_unchecked::<i32>(),
            )
        };
        let (wz, wy, wx) = (fz - iz as f32, fy - iy as f32, fx - ix as f32);
        let i000 = (iz * plane + iy * row + ix) as usize;
        let (i010, i100) = (i000 + row as usize, i000 + plane as usize);
        let i110 = i100 + row as usize;
        debug_assert!(i110 + 1 < src.len());
        // SAFETY: iz + 1 < sz, iy + 1 < sy and ix + 1 < sx, so the largest index,
        // (iz + 1)·plane + (iy + 1)·row + ix + 1, is below sz·sy·sx = src.len(); it fits in
        // i32 because the source has fewer than i32::MAX voxels.
        let (v000, v001, v010, v011, v100, v101, v110, v111) = unsafe {
            (
                *src.get_unchecked(i000),
                *src.get_unchecked(i000 + 1),
                *src.get_unchecked(i010),
                *src.get_unchecked(i010 + 1),
                *src.get_unchecked(i100),
                *src.get_unchecked(i100 + 1),
                *src.get_unchecked(i110),
                *src.get_unchecked(i110 + 1),
            )
        };
        let c00 = v000 + (v001 - v000) * wx;
        let c01 = v010 + (v011 - v010) * wx;
        let c10 = v100 + (v101 - v100) * wx;
        let c11 = v110 + (v111 - v110) * wx;
        let c0 = c00 + (c01 - c00) * wy;
        let c1 = c10 + (c11 - c10) * wy;
        *o = c0 + (c1 - c0) * wz;
        if let Some((lsrc, lout)) = labels.as_mut() {
            let n = i000
                + if wz >= 0.5 { plane as usize } else { 0 }
                + if wy >= 0.5 { row as usize } else { 0 }
                + usize::from(wx >= 0.5);
            debug_assert!(n < lsrc.len());
            // SAFETY: n <= i110 + 1, which is below src.len() = lsrc.len() (see above).
            let l = unsafe { *lsrc.get_unchecked(n) };
            lout[xs.start + k] = l;
        }
    }
}

/// Nearest labels along `b + x·d` for `x` in `xs` (same guarantees as [`row_fast`]).
#[inline(always)]
fn labels_fast<L: Label>(
    src: &[L],
    s: [usize; 3],
    b: [f32; 3],
    d: [f32; 3],
    xs: std::ops::Range<usize>,
    out: &mut [L],
) {
    let plane = (s[1] * s[2]) as i32;
    let row = s[2] as i32;
    let x0 = xs.start as i32;
    for (k, o) in out[xs].iter_mut().enumerate() {
        let xf = (x0 + k as i32) as f32;
        let fz = b[0] + xf * d[0] + 0.5;
        let fy = b[1] + xf * d[1] + 0.5;
        let fx = b[2] + xf * d[2] + 0.5;
        // SAFETY: as in `row_fast`, 0.5 <= f + 0.5 < shape - 0.5: finite and within i32.
        let (nz, ny, nx) = unsafe {
            (
                fz.to_int_unchecked::<i32>(),
                fy.to_int_unchecked::<i32>(),
                fx.to_int_unchecked::<i32>(),
            )
        };
        let i = (nz * plane + ny * row + nx) as usize;
        debug_assert!(i < src.len());
        // SAFETY: nz < sz, ny < sy, nx < sx, so i < sz·sy·sx = src.len().
        *o = unsafe { *src.get_unchecked(i) };
    }
}

#[inline(always)]
fn resample_aligned<L: Label>(v: Volumes<'_, L>, map: &Affine, scratch: &mut SpatialScratch) {
    let Volumes {
        src_img,
        src_lab,
        src_shape: s,
        out_img,
        out_lab,
        patch,
        channels,
        ignore,
    } = v;
    let [pz, py, px] = patch;
    let n_src = s[0] * s[1] * s[2];
    let n_out = pz * py * px;
    let plane = s[1] * s[2];
    for a in 0..3 {
        let (c_src, c_out, k) = (map.c_src[a], map.c_out[a], map.a[a][a]);
        scratch.tables[a].fill(patch[a], s[a], |o| (c_src + k * (o as f64 - c_out)) as f32);
    }
    let [tz, ty, tx] = &scratch.tables;
    let row = grow(&mut scratch.row, s[2]);
    for c in 0..channels {
        let src = &src_img[c * n_src..(c + 1) * n_src];
        let out = &mut out_img[c * n_out..(c + 1) * n_out];
        for (z, zt) in tz.taps.iter().enumerate() {
            for (y, yt) in ty.taps.iter().enumerate() {
                let r = |iz: usize, iy: usize| &src[iz * plane + iy * s[2]..][..s[2]];
                let (r00, r01, r10, r11) = (
                    r(zt.i0, yt.i0),
                    r(zt.i0, yt.i1),
                    r(zt.i1, yt.i0),
                    r(zt.i1, yt.i1),
                );
                let (a00, a01, a10, a11) =
                    (zt.w0 * yt.w0, zt.w0 * yt.w1, zt.w1 * yt.w0, zt.w1 * yt.w1);
                for ((((o, &v00), &v01), &v10), &v11) in
                    row.iter_mut().zip(r00).zip(r01).zip(r10).zip(r11)
                {
                    *o = a00 * v00 + a01 * v01 + a10 * v10 + a11 * v11;
                }
                let orow = &mut out[(z * py + y) * px..][..px];
                for (o, t) in orow.iter_mut().zip(&tx.taps) {
                    *o = t.w0 * row[t.i0] + t.w1 * row[t.i1];
                }
            }
        }
    }
    if !out_lab.is_empty() {
        for (z, nz) in tz.near.iter().enumerate() {
            for (y, ny) in ty.near.iter().enumerate() {
                let orow = &mut out_lab[(z * py + y) * px..][..px];
                match (nz, ny) {
                    (Some(nz), Some(ny)) => {
                        let srow = &src_lab[(nz * s[1] + ny) * s[2]..][..s[2]];
                        for (o, nx) in orow.iter_mut().zip(&tx.near) {
                            *o = match nx {
                                Some(i) => srow[*i],
                                None => ignore,
                            };
                        }
                    }
                    _ => orow.fill(ignore),
                }
            }
        }
    }
}

/// The elastic field for `patch`, as source-space displacements `A · e(o)` (three planes of
/// `patch` voxels: z, y and x components).
///
/// `e` interpolates random control-point values (uniform in `[-1, 1]`, spaced `spacing` voxels
/// apart) with smoothstep weights (continuous first derivatives), then each component is scaled
/// so that its largest absolute value is `magnitude` voxels.
#[inline(always)]
pub(crate) fn elastic_field(
    seed: u64,
    spacing: [f64; 3],
    magnitude: [f64; 3],
    patch: [usize; 3],
    a: &[[f64; 3]; 3],
    scratch: &mut SpatialScratch,
) {
    let n: usize = patch.iter().product();
    let nodes = [0, 1, 2].map(|k| {
        let h = spacing[k].max(1.0);
        ((patch[k].max(1) - 1) as f64 / h).floor() as usize + 2
    });
    let per: usize = nodes.iter().product();
    let lattice = grow(&mut scratch.lattice, 3 * per);
    for (d, comp) in lattice.chunks_exact_mut(per).enumerate() {
        let mut r = Rng::sub(seed, d as u64);
        for v in comp {
            *v = (2.0 * r.unit() - 1.0) as f32;
        }
    }
    let field = grow(&mut scratch.field, 3 * n);
    // Per-axis smoothstep taps of the lattice.
    let axis = |k: usize, o: usize| -> (usize, f32) {
        let t = o as f64 / spacing[k].max(1.0);
        let i = (t.floor() as usize).min(nodes[k] - 2);
        let f = (t - i as f64).clamp(0.0, 1.0);
        (i, (f * f * (3.0 - 2.0 * f)) as f32)
    };
    let mut peak = [0f32; 3];
    for z in 0..patch[0] {
        let (iz, wz) = axis(0, z);
        for y in 0..patch[1] {
            let (iy, wy) = axis(1, y);
            for x in 0..patch[2] {
                let (ix, wx) = axis(2, x);
                let o = (z * patch[1] + y) * patch[2] + x;
                for d in 0..3 {
                    let l = &lattice[d * per..(d + 1) * per];
                    let at = |a: usize, b: usize, c: usize| l[(a * nodes[1] + b) * nodes[2] + c];
                    let lerp = |p: f32, q: f32, w: f32| p + (q - p) * w;
                    let c00 = lerp(at(iz, iy, ix), at(iz, iy, ix + 1), wx);
                    let c01 = lerp(at(iz, iy + 1, ix), at(iz, iy + 1, ix + 1), wx);
                    let c10 = lerp(at(iz + 1, iy, ix), at(iz + 1, iy, ix + 1), wx);
                    let c11 = lerp(at(iz + 1, iy + 1, ix), at(iz + 1, iy + 1, ix + 1), wx);
                    let e = lerp(lerp(c00, c01, wy), lerp(c10, c11, wy), wz);
                    field[d * n + o] = e;
                    peak[d] = peak[d].max(e.abs());
                }
            }
        }
    }
    let gain = [0, 1, 2].map(|d| {
        if peak[d] > 0.0 {
            magnitude[d] / peak[d] as f64
        } else {
            0.0
        }
    });
    // To source space: A · diag(gain) · e.
    let m = [0, 1, 2].map(|i| [0, 1, 2].map(|j| (a[i][j] * gain[j]) as f32));
    for o in 0..n {
        let e = [field[o], field[n + o], field[2 * n + o]];
        for (i, mi) in m.iter().enumerate() {
            field[i * n + o] = mi[0] * e[0] + mi[1] * e[1] + mi[2] * e[2];
        }
    }
}

/// Resamples through `map` plus the displacement field left in `scratch` by [`elastic_field`].
#[inline(always)]
pub(crate) fn resample_displaced<L: Label>(
    v: Volumes<'_, L>,
    map: &Affine,
    scratch: &SpatialScratch,
) {
    let Volumes {
        src_img,
        src_lab,
        src_shape: s,
        out_img,
        out_lab,
        patch: [pz, py, px],
        channels,
        ignore,
    } = v;
    let n_src = s[0] * s[1] * s[2];
    let n_out = pz * py * px;
    let field = &scratch.field[..3 * n_out];
    let with_label = !out_lab.is_empty();
    for z in 0..pz {
        for y in 0..py {
            let (b, d) = map.row(z, y);
            let row_off = (z * py + y) * px;
            for x in 0..px {
                let o = row_off + x;
                let xf = x as f32;
                let f = [
                    b[0] + xf * d[0] + field[o],
                    b[1] + xf * d[1] + field[n_out + o],
                    b[2] + xf * d[2] + field[2 * n_out + o],
                ];
                for c in 0..channels {
                    out_img[c * n_out + o] =
                        sample_slow(&src_img[c * n_src..(c + 1) * n_src], s, f);
                }
                if with_label {
                    out_lab[o] = label_slow(src_lab, s, f, ignore);
                }
            }
        }
    }
}

/// The displacement field left by [`elastic_field`] (tests).
#[cfg(test)]
pub(crate) fn field_for_tests(scratch: &SpatialScratch, n: usize) -> &[f32] {
    &scratch.field[..n]
}

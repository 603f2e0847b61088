//! Each transform against a plain reference implementation, label and padding invariants, the
//! drawn probabilities and ranges, and determinism.

use super::*;
use proptest::prelude::*;
use std::f64::consts::{FRAC_PI_2, PI};

/// Test data generator independent of the crate's.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn unit(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 53) as f64
    }
}

fn random_volume(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Lcg(seed);
    (0..n).map(|_| r.unit() as f32 * 4.0 - 1.0).collect()
}

fn random_labels(n: usize, classes: &[u8], seed: u64) -> Vec<u8> {
    let mut r = Lcg(seed);
    (0..n)
        .map(|_| classes[(r.next() % classes.len() as u64) as usize])
        .collect()
}

fn idx(shape: [usize; 3], z: usize, y: usize, x: usize) -> usize {
    (z * shape[1] + y) * shape[2] + x
}

/// Runs `apply` with a source of the right size filled from `fill_img`/`fill_lab`.
struct Run {
    out_img: Vec<f32>,
    out_lab: Vec<u8>,
    src_img: Vec<f32>,
    src_lab: Vec<u8>,
    offset: [i64; 3],
    size: [usize; 3],
}

fn run(params: &AugmentParams, patch: [usize; 3], channels: usize, seed: u64) -> Run {
    let (offset, size) = source_box(params, patch);
    let n_src: usize = size.iter().product();
    let n_out: usize = patch.iter().product();
    let src_img = random_volume(channels * n_src, seed);
    let src_lab = random_labels(n_src, &[0, 1, 2, 7], seed ^ 99);
    let mut out_img = vec![f32::NAN; channels * n_out];
    let mut out_lab = vec![254u8; n_out];
    apply(
        params,
        &Source {
            image: &src_img,
            label: &src_lab,
            shape: size,
        },
        &mut Target {
            image: &mut out_img,
            label: &mut out_lab,
            shape: patch,
        },
        255,
        &mut Scratch::default(),
    )
    .expect("apply");
    Run {
        out_img,
        out_lab,
        src_img,
        src_lab,
        offset,
        size,
    }
}

#[test]
fn mirroring_is_exact() {
    let patch = [5, 6, 7];
    for m in 0..8 {
        let mirror = [m & 4 != 0, m & 2 != 0, m & 1 != 0];
        let params = AugmentParams {
            mirror,
            ..AugmentParams::default()
        };
        let r = run(&params, patch, 2, m as u64);
        assert_eq!(r.size, patch);
        let n = 5 * 6 * 7;
        for c in 0..2 {
            for z in 0..5 {
                for y in 0..6 {
                    for x in 0..7 {
                        let sz = if mirror[0] { 4 - z } else { z };
                        let sy = if mirror[1] { 5 - y } else { y };
                        let sx = if mirror[2] { 6 - x } else { x };
                        let o = idx(patch, z, y, x);
                        let s = idx(patch, sz, sy, sx);
                        assert_eq!(
                            r.out_img[c * n + o].to_bits(),
                            r.src_img[c * n + s].to_bits()
                        );
                        assert_eq!(r.out_lab[o], r.src_lab[s]);
                    }
                }
            }
        }
    }
}

/// Exact source voxel of output voxel `o` under a signed-permutation matrix, in doubled
/// coordinates (all integers): `2s = 2c + A (2o − 2c)`.
fn permuted_source(a: &[[f64; 3]; 3], patch: [usize; 3], o: [usize; 3]) -> [i64; 3] {
    let c2 = patch.map(|p| p as i64 - 1);
    let mut s = [0i64; 3];
    for i in 0..3 {
        let mut v = c2[i];
        for j in 0..3 {
            v += a[i][j] as i64 * (2 * o[j] as i64 - c2[j]);
        }
        assert_eq!(v % 2, 0, "not a voxel centre");
        s[i] = v / 2;
    }
    s
}

#[test]
fn quarter_turns_are_exact() {
    for patch in [[6, 6, 6], [7, 7, 7], [4, 6, 8]] {
        for axis in 0..3 {
            for quarter in [-1.0, 1.0, 2.0] {
                // Non-cubic patches only turn in planes of equal parity.
                let (p, q) = match axis {
                    0 => (1, 2),
                    1 => (0, 2),
                    _ => (0, 1),
                };
                if quarter != 2.0 && patch[p] % 2 != patch[q] % 2 {
                    continue;
                }
                for mirror in [[false; 3], [true, false, true]] {
                    let mut angles = [0.0; 3];
                    angles[axis] = quarter * FRAC_PI_2;
                    let params = AugmentParams {
                        rotation: Some(angles),
                        mirror,
                        ..AugmentParams::default()
                    };
                    let a = geometry::linear_part(&params);
                    assert!(a.iter().flatten().all(|v| v.fract() == 0.0), "{a:?}");
                    let r = run(&params, patch, 1, 5);
                    for z in 0..patch[0] {
                        for y in 0..patch[1] {
                            for x in 0..patch[2] {
                                let s = permuted_source(&a, patch, [z, y, x]);
                                let b = [0, 1, 2].map(|i| (s[i] - r.offset[i]) as usize);
                                let o = idx(patch, z, y, x);
                                let si = idx(r.size, b[0], b[1], b[2]);
                                assert_eq!(
                                    r.out_img[o].to_bits(),
                                    r.src_img[si].to_bits(),
                                    "{patch:?} axis {axis} quarter {quarter} at {z},{y},{x}"
                                );
                                assert_eq!(r.out_lab[o], r.src_lab[si]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Direct trilinear formula in `f64`: `Σ (1 − |s − i|)` weights over the eight neighbours,
/// zero outside the source.
fn trilinear_ref(src: &[f32], shape: [usize; 3], s: [f64; 3]) -> f64 {
    let f = s.map(f64::floor);
    let mut acc = 0.0;
    for dz in 0..2 {
        for dy in 0..2 {
            for dx in 0..2 {
                let i = [f[0] + dz as f64, f[1] + dy as f64, f[2] + dx as f64];
                let w: f64 = (0..3).map(|k| 1.0 - (s[k] - i[k]).abs()).product();
                let inside = (0..3).all(|k| i[k] >= 0.0 && i[k] < shape[k] as f64);
                if inside {
                    acc += w * src[idx(shape, i[0] as usize, i[1] as usize, i[2] as usize)] as f64;
                }
            }
        }
    }
    acc
}

fn source_coord(
    params: &AugmentParams,
    patch: [usize; 3],
    offset: [i64; 3],
    o: [usize; 3],
) -> [f64; 3] {
    let a = geometry::linear_part(params);
    let c = patch.map(|p| (p as f64 - 1.0) / 2.0);
    [0, 1, 2].map(|i| {
        c[i] - offset[i] as f64 + (0..3).map(|j| a[i][j] * (o[j] as f64 - c[j])).sum::<f64>()
    })
}

fn check_against_trilinear(params: &AugmentParams, patch: [usize; 3], channels: usize, seed: u64) {
    let r = run(params, patch, channels, seed);
    let n_out: usize = patch.iter().product();
    let n_src: usize = r.size.iter().product();
    let mut rng = Lcg(seed);
    for _ in 0..400 {
        let o = [0, 1, 2].map(|k| (rng.next() % patch[k] as u64) as usize);
        let s = source_coord(params, patch, r.offset, o);
        for c in 0..channels {
            let want = trilinear_ref(&r.src_img[c * n_src..(c + 1) * n_src], r.size, s);
            let got = r.out_img[c * n_out + idx(patch, o[0], o[1], o[2])] as f64;
            assert!(
                (got - want).abs() < 2e-4,
                "{params:?} at {o:?}: {got} vs {want}"
            );
        }
        // Nearest label, away from ties where f32 and f64 rounding may disagree.
        if s.iter().all(|v| (v - v.floor() - 0.5).abs() > 1e-3) {
            let n = s.map(|v| v.round());
            let inside = (0..3).all(|k| n[k] >= 0.0 && n[k] < r.size[k] as f64);
            let want = if inside {
                r.src_lab[idx(r.size, n[0] as usize, n[1] as usize, n[2] as usize)]
            } else {
                255
            };
            assert_eq!(
                r.out_lab[idx(patch, o[0], o[1], o[2])],
                want,
                "label at {o:?}"
            );
        }
    }
}

#[test]
fn affine_resample_matches_direct_trilinear() {
    let mut rng = Lcg(17);
    for case in 0..40u64 {
        let angle = |rng: &mut Lcg| (rng.unit() * 2.0 - 1.0) * PI;
        let rotation = (case % 4 != 0).then(|| [angle(&mut rng), angle(&mut rng), angle(&mut rng)]);
        let scale = (case % 3 != 0).then(|| {
            [
                0.6 + rng.unit() * 0.9,
                0.6 + rng.unit() * 0.9,
                0.6 + rng.unit() * 0.9,
            ]
        });
        let mirror = [case & 1 != 0, case & 2 != 0, case & 4 != 0];
        let params = AugmentParams {
            rotation,
            scale: scale.or(Some([1.3, 0.8, 1.0])),
            mirror,
            ..AugmentParams::default()
        };
        // Small patches, and patches spanning several tiles of the rotated resampling.
        let patch = if case % 5 == 4 {
            [18 + (case % 3) as usize, 33, 37]
        } else {
            [3 + (case % 5) as usize, 9, 4 + (case % 7) as usize]
        };
        check_against_trilinear(&params, patch, 1 + (case % 2) as usize, case);
    }
}

#[test]
fn slow_path_pads_with_zero_and_ignore() {
    // A source smaller than the mapping needs: taps outside read as 0 / ignore.
    let patch = [6, 7, 8];
    let params = AugmentParams {
        rotation: Some([0.3, -0.2, 0.5]),
        scale: Some([1.2; 3]),
        ..AugmentParams::default()
    };
    let a = geometry::linear_part(&params);
    let src_shape = [5, 5, 5];
    let n_src = 125;
    let src_img = random_volume(n_src, 3);
    let src_lab = random_labels(n_src, &[1, 2], 4);
    let n_out: usize = patch.iter().product();
    let mut out_img = vec![0f32; n_out];
    let mut out_lab = vec![0u8; n_out];
    let c_out = patch.map(|p| (p as f64 - 1.0) / 2.0);
    let map = spatial::Affine {
        a,
        c_src: [2.0, 2.0, 2.0],
        c_out,
    };
    spatial::resample(
        Volumes {
            src_img: &src_img,
            src_lab: &src_lab,
            src_shape,
            out_img: &mut out_img,
            out_lab: &mut out_lab,
            patch,
            channels: 1,
            ignore: 255u8,
        },
        &map,
        &mut SpatialScratch::default(),
    );
    let mut outside = 0;
    for z in 0..patch[0] {
        for y in 0..patch[1] {
            for x in 0..patch[2] {
                let o = [z, y, x];
                let s = [0, 1, 2].map(|i| {
                    2.0 + (0..3)
                        .map(|j| a[i][j] * (o[j] as f64 - c_out[j]))
                        .sum::<f64>()
                });
                let want = trilinear_ref(&src_img, src_shape, s);
                let got = out_img[idx(patch, z, y, x)] as f64;
                assert!((got - want).abs() < 2e-4, "{o:?}: {got} vs {want}");
                let n = s.map(|v| v.round());
                if (0..3).any(|k| n[k] < -0.5 || n[k] > 4.5)
                    && s.iter().all(|v| (v - v.floor() - 0.5).abs() > 1e-3)
                {
                    outside += 1;
                    assert_eq!(out_lab[idx(patch, z, y, x)], 255);
                }
            }
        }
    }
    assert!(outside > 0, "the test never left the source");
}

/// Direct 3D convolution with the three 1D kernels and reflective borders.
fn blur_ref(src: &[f32], shape: [usize; 3], sigma: [f64; 3]) -> Vec<f64> {
    let kernels: Vec<Vec<f32>> = sigma
        .iter()
        .map(|&s| {
            let mut k = Vec::new();
            intensity::gaussian_kernel(s, &mut k);
            k
        })
        .collect();
    let r = kernels
        .iter()
        .map(|k| (k.len() / 2) as i64)
        .collect::<Vec<_>>();
    let mut out = vec![0.0; src.len()];
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let mut acc = 0.0;
                for (tz, &wz) in kernels[0].iter().enumerate() {
                    let sz = intensity::reflect(z as i64 + tz as i64 - r[0], shape[0]);
                    for (ty, &wy) in kernels[1].iter().enumerate() {
                        let sy = intensity::reflect(y as i64 + ty as i64 - r[1], shape[1]);
                        for (tx, &wx) in kernels[2].iter().enumerate() {
                            let sx = intensity::reflect(x as i64 + tx as i64 - r[2], shape[2]);
                            acc += wz as f64
                                * wy as f64
                                * wx as f64
                                * src[idx(shape, sz, sy, sx)] as f64;
                        }
                    }
                }
                out[idx(shape, z, y, x)] = acc;
            }
        }
    }
    out
}

#[test]
fn blur_matches_direct_convolution() {
    for (shape, sigma) in [
        ([9, 10, 11], [0.5, 0.75, 1.0]),
        ([2, 3, 12], [1.0, 1.0, 0.6]),
        ([6, 1, 5], [0.0, 0.9, 2.0]),
    ] {
        let n: usize = shape.iter().product();
        let src = random_volume(n, 8);
        let params = AugmentParams {
            blur: Some(vec![Some(sigma)]),
            ..AugmentParams::default()
        };
        let r = run(&params, shape, 1, 8);
        assert_eq!(r.src_img, src);
        let want = blur_ref(&src, shape, sigma);
        for (g, w) in r.out_img.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() < 1e-5,
                "{shape:?} {sigma:?}: {g} vs {w}"
            );
        }
    }
}

/// nnU-Net's intensity chain in `f64`, one transform after the other, unfused.
fn intensity_ref(data: &[f32], shape: [usize; 3], p: &AugmentParams, c: usize) -> Vec<f64> {
    let mut v: Vec<f64> = data.iter().map(|&x| x as f64).collect();
    let n = v.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let std = |v: &[f64]| {
        let m = mean(v);
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    };
    let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if let Some(Some(sigma)) = p.blur.as_ref().map(|b| b[c]) {
        let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        v = blur_ref(&f, shape, sigma);
    }
    if let Some(Some(m)) = p.brightness.as_ref().map(|b| b[c]) {
        v.iter_mut().for_each(|x| *x *= m);
    }
    if let Some(cp) = &p.contrast
        && let Some(f) = cp.factor[c]
    {
        let (m, lo, hi) = (mean(&v), min(&v), max(&v));
        v.iter_mut().for_each(|x| {
            *x = (*x - m) * f + m;
            if cp.preserve_range {
                *x = x.clamp(lo, hi);
            }
        });
    }
    if let Some(Some(zoom)) = p.lowres.as_ref().map(|l| l[c]) {
        v = lowres_ref(&v, shape, zoom);
    }
    for (g, invert) in [(&p.inverted_gamma, true), (&p.gamma, false)] {
        if let Some(gp) = g
            && let Some(gamma) = gp.gamma[c]
        {
            if invert {
                v.iter_mut().for_each(|x| *x = -*x);
            }
            let (m0, s0) = (mean(&v), std(&v));
            let (lo, hi) = (min(&v), max(&v));
            let range = hi - lo;
            v.iter_mut()
                .for_each(|x| *x = ((*x - lo) / range.max(1e-7)).powf(gamma) * range + lo);
            if gp.retain_stats {
                let (m1, s1) = (mean(&v), std(&v));
                v.iter_mut()
                    .for_each(|x| *x = (*x - m1) * (s0 / s1.max(1e-7)) + m0);
            }
            if invert {
                v.iter_mut().for_each(|x| *x = -*x);
            }
        }
    }
    v
}

/// Downsampling with nearest-exact to `round(p · zoom)`, then trilinear upsampling
/// (`align_corners=False`), written out directly.
fn lowres_ref(v: &[f64], shape: [usize; 3], zoom: [f64; 3]) -> Vec<f64> {
    let m = [0, 1, 2].map(|a| ((shape[a] as f64 * zoom[a]).round_ties_even() as usize).max(1));
    let near = |a: usize, j: usize| {
        (((j as f64 + 0.5) * shape[a] as f64 / m[a] as f64).floor() as usize).min(shape[a] - 1)
    };
    let mut down = vec![0.0; m[0] * m[1] * m[2]];
    for z in 0..m[0] {
        for y in 0..m[1] {
            for x in 0..m[2] {
                down[idx(m, z, y, x)] = v[idx(shape, near(0, z), near(1, y), near(2, x))];
            }
        }
    }
    let lin = |a: usize, i: usize| {
        let s = ((i as f64 + 0.5) * m[a] as f64 / shape[a] as f64 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(m[a] - 1);
        let i1 = (i0 + 1).min(m[a] - 1);
        (i0, i1, s - i0 as f64)
    };
    let mut out = vec![0.0; v.len()];
    for z in 0..shape[0] {
        let (z0, z1, wz) = lin(0, z);
        for y in 0..shape[1] {
            let (y0, y1, wy) = lin(1, y);
            for x in 0..shape[2] {
                let (x0, x1, wx) = lin(2, x);
                let mut acc = 0.0;
                for (iz, fz) in [(z0, 1.0 - wz), (z1, wz)] {
                    for (iy, fy) in [(y0, 1.0 - wy), (y1, wy)] {
                        for (ix, fx) in [(x0, 1.0 - wx), (x1, wx)] {
                            acc += fz * fy * fx * down[idx(m, iz, iy, ix)];
                        }
                    }
                }
                out[idx(shape, z, y, x)] = acc;
            }
        }
    }
    out
}

#[test]
fn intensity_chain_matches_unfused_reference() {
    let shape = [7, 8, 9];
    let n: usize = shape.iter().product();
    let combos: Vec<AugmentParams> = vec![
        AugmentParams {
            brightness: Some(vec![Some(1.2), Some(0.8)]),
            ..AugmentParams::default()
        },
        AugmentParams {
            contrast: Some(ContrastParams {
                preserve_range: true,
                factor: vec![Some(1.25), Some(0.75)],
            }),
            ..AugmentParams::default()
        },
        AugmentParams {
            lowres: Some(vec![Some([0.5, 0.5, 0.5]), Some([1.0, 0.7, 0.6])]),
            ..AugmentParams::default()
        },
        AugmentParams {
            gamma: Some(GammaParams {
                retain_stats: true,
                gamma: vec![Some(0.7), Some(1.5)],
            }),
            ..AugmentParams::default()
        },
        AugmentParams {
            inverted_gamma: Some(GammaParams {
                retain_stats: false,
                gamma: vec![Some(1.3), None],
            }),
            ..AugmentParams::default()
        },
        // Everything at once: brightness and contrast stay pending through the low-res copy
        // and the gamma passes.
        AugmentParams {
            blur: Some(vec![Some([0.5, 1.0, 0.7]), None]),
            brightness: Some(vec![Some(1.1), Some(0.9)]),
            contrast: Some(ContrastParams {
                preserve_range: true,
                factor: vec![Some(1.2), Some(0.8)],
            }),
            lowres: Some(vec![None, Some([0.6; 3])]),
            inverted_gamma: Some(GammaParams {
                retain_stats: true,
                gamma: vec![Some(0.8), Some(1.4)],
            }),
            gamma: Some(GammaParams {
                retain_stats: true,
                gamma: vec![Some(1.4), Some(0.75)],
            }),
            ..AugmentParams::default()
        },
        AugmentParams {
            contrast: Some(ContrastParams {
                preserve_range: true,
                factor: vec![Some(1.25), Some(1.2)],
            }),
            gamma: Some(GammaParams {
                retain_stats: false,
                gamma: vec![Some(1.4), Some(0.75)],
            }),
            ..AugmentParams::default()
        },
    ];
    for (k, p) in combos.iter().enumerate() {
        let r = run(p, shape, 2, k as u64 + 40);
        for c in 0..2 {
            let src = &r.src_img[c * n..(c + 1) * n];
            let want = intensity_ref(src, shape, p, c);
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (i, (g, w)) in r.out_img[c * n..(c + 1) * n].iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() < 2e-5 * scale,
                    "combo {k} channel {c} voxel {i}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn noise_has_the_drawn_std_and_shared_fields() {
    let shape = [20, 30, 41];
    let n: usize = shape.iter().product();
    for same_field in [true, false] {
        let params = AugmentParams {
            noise: Some(NoiseParams {
                seed: 77,
                same_field,
                std: vec![Some(0.1), Some(0.1), None],
            }),
            ..AugmentParams::default()
        };
        let r = run(&params, shape, 3, 1);
        let diff = |c: usize| -> Vec<f64> {
            (0..n)
                .map(|i| r.out_img[c * n + i] as f64 - r.src_img[c * n + i] as f64)
                .collect()
        };
        let d0 = diff(0);
        let mean = d0.iter().sum::<f64>() / n as f64;
        let sd = (d0.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        // n = 24600: sd of the mean 0.1/157 = 6.4e-4, of the sd ~4.5e-4.
        assert!(mean.abs() < 3.2e-3, "{mean}");
        assert!((sd - 0.1).abs() < 2.3e-3, "{sd}");
        let d1 = diff(1);
        let same = d0.iter().zip(&d1).all(|(a, b)| (a - b).abs() < 1e-5);
        assert_eq!(same, same_field);
        assert!(diff(2).iter().all(|&v| v == 0.0));
    }
}

#[test]
fn elastic_deformation_is_smooth_bounded_and_keeps_labels() {
    let patch = [12, 14, 16];
    let params = AugmentParams {
        elastic: Some(ElasticParams {
            seed: 9,
            spacing: [4.0, 5.0, 3.0],
            magnitude: [1.5, 2.0, 1.0],
        }),
        ..AugmentParams::default()
    };
    let mut scratch = SpatialScratch::default();
    let a = geometry::linear_part(&params);
    spatial::elastic_field(9, [4.0, 5.0, 3.0], [1.5, 2.0, 1.0], patch, &a, &mut scratch);
    let n: usize = patch.iter().product();
    let field = spatial::field_for_tests(&scratch, 3 * n);
    for (d, mag) in [1.5f32, 2.0, 1.0].iter().enumerate() {
        let comp = &field[d * n..(d + 1) * n];
        let peak = comp.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((peak - mag).abs() < 1e-5, "component {d}: {peak}");
        // Control points 3 voxels apart along x: smoothstep interpolation changes by at most
        // 1.5 · (value difference) / 3 per voxel; the values span at most ±(peak / 0.86) here,
        // while white noise would jump by up to twice the peak.
        for z in 0..patch[0] {
            for y in 0..patch[1] {
                for x in 1..patch[2] {
                    let step = (comp[idx(patch, z, y, x)] - comp[idx(patch, z, y, x - 1)]).abs();
                    assert!(step <= 3.0 / 3.0 * mag / 0.86, "jump {step}");
                }
            }
        }
    }
    let r = run(&params, patch, 1, 4);
    assert!(r.out_lab.iter().all(|l| [0, 1, 2, 7, 255].contains(l)));
    assert!(r.out_img.iter().all(|v| v.is_finite()));
}

fn arb_params() -> impl Strategy<Value = AugmentParams> {
    (
        prop::option::of(prop::array::uniform3(-PI..PI)),
        prop::option::of(prop::array::uniform3(0.5f64..1.6)),
        prop::option::of((
            any::<u64>(),
            prop::array::uniform3(1.0f64..6.0),
            prop::array::uniform3(0.0f64..3.0),
        )),
        prop::array::uniform3(any::<bool>()),
    )
        .prop_map(|(rotation, scale, elastic, mirror)| AugmentParams {
            rotation,
            scale,
            elastic: elastic.map(|(seed, spacing, magnitude)| ElasticParams {
                seed,
                spacing,
                magnitude,
            }),
            mirror,
            ..AugmentParams::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nearest_labels_are_never_invented(
        params in arb_params(),
        patch in prop::array::uniform3(1usize..12),
        seed in any::<u64>(),
    ) {
        let (_, size) = source_box(&params, patch);
        let n_src: usize = size.iter().product();
        let n_out: usize = patch.iter().product();
        // Classes 3 and 9, with an "ignore" slab standing for padding on the low-z side.
        let mut src_lab = random_labels(n_src, &[3, 9], seed);
        for (i, l) in src_lab.iter_mut().enumerate() {
            if i / (size[1] * size[2]) < size[0] / 3 {
                *l = 255;
            }
        }
        let src_img = random_volume(n_src, seed);
        let mut out_img = vec![0f32; n_out];
        let mut out_lab = vec![0u8; n_out];
        apply(
            &params,
            &Source { image: &src_img, label: &src_lab, shape: size },
            &mut Target { image: &mut out_img, label: &mut out_lab, shape: patch },
            255,
            &mut Scratch::default(),
        ).unwrap();
        for &l in &out_lab {
            prop_assert!(l == 3 || l == 9 || l == 255, "label {}", l);
        }
        prop_assert!(out_img.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn ignore_padding_stays_ignore(
        params in arb_params(),
        patch in prop::array::uniform3(2usize..10),
        seed in any::<u64>(),
    ) {
        // Without elastic the nearest source voxel is known exactly: padding (ignore, image 0)
        // on the high-x half of the source must come out as ignore wherever it is the nearest.
        let params = AugmentParams { elastic: None, ..params };
        let (offset, size) = source_box(&params, patch);
        let n_src: usize = size.iter().product();
        let n_out: usize = patch.iter().product();
        let half = size[2] / 2;
        let mut src_lab = random_labels(n_src, &[0, 1], seed);
        let mut src_img = random_volume(n_src, seed);
        for i in 0..n_src {
            if i % size[2] >= half {
                src_lab[i] = 255;
                src_img[i] = 0.0;
            }
        }
        let mut out_img = vec![0f32; n_out];
        let mut out_lab = vec![0u8; n_out];
        apply(
            &params,
            &Source { image: &src_img, label: &src_lab, shape: size },
            &mut Target { image: &mut out_img, label: &mut out_lab, shape: patch },
            255,
            &mut Scratch::default(),
        ).unwrap();
        for z in 0..patch[0] {
            for y in 0..patch[1] {
                for x in 0..patch[2] {
                    let s = source_coord(&params, patch, offset, [z, y, x]);
                    if s.iter().any(|v| (v - v.floor() - 0.5).abs() < 1e-3) {
                        continue;
                    }
                    let nx = s[2].round();
                    let o = idx(patch, z, y, x);
                    if nx >= half as f64 {
                        prop_assert_eq!(out_lab[o], 255);
                    } else {
                        prop_assert!(out_lab[o] <= 1 || out_lab[o] == 255);
                    }
                    // Entirely inside the padding: image 0 as well.
                    if s[2] >= half as f64 + 1e-3 {
                        prop_assert_eq!(out_img[o], 0.0);
                    }
                }
            }
        }
    }
}

/// Binomial check: `hits` of `n` within 5 standard deviations of `n·p`.
fn assert_rate(name: &str, hits: usize, n: usize, p: f64) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt().max(1e-9);
    assert!(
        (hits as f64 - mean).abs() <= 5.0 * sd,
        "{name}: {hits} of {n}, expected {mean:.1} ± {sd:.1}"
    );
}

#[test]
fn preset_fires_at_its_probabilities_within_its_ranges() {
    let spec = AugmentSpec::nnunet_default();
    let n = 20_000usize;
    let channels = 2;
    let mut fired = [0usize; 10];
    let mut mirror = [0usize; 3];
    let mut per_channel = [(0usize, 0usize); 10];
    let deg30 = PI / 6.0 + 1e-12;
    let within = |v: f64, lo: f64, hi: f64| lo <= v && v <= hi;
    for i in 0..n as u64 {
        let p = draw(&spec, i.wrapping_mul(0x9E37_79B9), [64, 64, 64], channels);
        if let Some(a) = p.rotation {
            fired[0] += 1;
            assert!(a.iter().all(|v| v.abs() <= deg30), "{a:?}");
        }
        if let Some(s) = p.scale {
            fired[1] += 1;
            assert!(s.iter().all(|&v| within(v, 0.7, 1.4)) && s[0] == s[1] && s[1] == s[2]);
        }
        fired[2] += usize::from(p.elastic.is_some());
        for (count, &m) in mirror.iter_mut().zip(&p.mirror) {
            *count += usize::from(m);
        }
        let mut count = |k: usize, v: &[Option<()>]| {
            fired[k] += 1;
            per_channel[k].0 += v.iter().filter(|c| c.is_some()).count();
            per_channel[k].1 += v.len();
        };
        if let Some(nz) = &p.noise {
            assert!(nz.same_field);
            let stds: Vec<f64> = nz.std.iter().flatten().copied().collect();
            assert!(stds.iter().all(|&v| within(v, 0.0, 0.1) && v == stds[0]));
            count(3, &nz.std.iter().map(|c| c.map(|_| ())).collect::<Vec<_>>());
        }
        if let Some(b) = &p.blur {
            for s in b.iter().flatten() {
                assert!(s.iter().all(|&v| within(v, 0.5, 1.0)));
            }
            count(4, &b.iter().map(|c| c.map(|_| ())).collect::<Vec<_>>());
        }
        if let Some(b) = &p.brightness {
            assert!(b.iter().flatten().all(|&v| within(v, 0.75, 1.25)));
            count(5, &b.iter().map(|c| c.map(|_| ())).collect::<Vec<_>>());
        }
        if let Some(c) = &p.contrast {
            assert!(c.preserve_range);
            assert!(c.factor.iter().flatten().all(|&v| within(v, 0.75, 1.25)));
            count(
                6,
                &c.factor.iter().map(|c| c.map(|_| ())).collect::<Vec<_>>(),
            );
        }
        if let Some(l) = &p.lowres {
            for z in l.iter().flatten() {
                assert!(z.iter().all(|&v| within(v, 0.5, 1.0)) && z[0] == z[1] && z[1] == z[2]);
            }
            count(7, &l.iter().map(|c| c.map(|_| ())).collect::<Vec<_>>());
        }
        if let Some(g) = &p.inverted_gamma {
            assert!(g.retain_stats && g.gamma.iter().flatten().all(|&v| within(v, 0.7, 1.5)));
            count(
                8,
                &g.gamma.iter().map(|c| c.map(|_| ())).collect::<Vec<_>>(),
            );
        }
        if let Some(g) = &p.gamma {
            assert!(g.retain_stats && g.gamma.iter().flatten().all(|&v| within(v, 0.7, 1.5)));
            count(
                9,
                &g.gamma.iter().map(|c| c.map(|_| ())).collect::<Vec<_>>(),
            );
        }
    }
    let rates = [0.2, 0.2, 0.0, 0.1, 0.2, 0.15, 0.15, 0.25, 0.1, 0.3];
    let names = [
        "rotation",
        "scaling",
        "elastic",
        "noise",
        "blur",
        "brightness",
        "contrast",
        "lowres",
        "inverted gamma",
        "gamma",
    ];
    for k in 0..10 {
        assert_rate(names[k], fired[k], n, rates[k]);
    }
    for (a, &m) in mirror.iter().enumerate() {
        assert_rate(&format!("mirror axis {a}"), m, n, 0.5);
    }
    let channel_rates = [
        (3, 1.0),
        (4, 0.5),
        (5, 1.0),
        (6, 1.0),
        (7, 0.5),
        (8, 1.0),
        (9, 1.0),
    ];
    for (k, p) in channel_rates {
        let (hits, total) = per_channel[k];
        assert_rate(&format!("{} per channel", names[k]), hits, total, p);
    }
    // Brightness, contrast and gamma factors fall below 1 half of the time (BGContrast).
    let mut below = 0;
    let mut total = 0;
    for i in 0..n as u64 {
        if let Some(b) = draw(&spec, i, [8, 8, 8], 1).brightness {
            total += 1;
            below += usize::from(b[0].is_some_and(|v| v < 1.0));
        }
    }
    assert_rate("brightness below 1", below, total, 0.5);
}

#[test]
fn disabled_mirror_axes_never_flip_and_other_draws_stay() {
    let full = AugmentSpec::nnunet_default();
    let lr = full.clone().with_mirror_axes([true, true, false]);
    for seed in 0..2000u64 {
        let a = draw(&full, seed, [32; 3], 1);
        let b = draw(&lr, seed, [32; 3], 1);
        assert!(!b.mirror[2]);
        assert_eq!(a.mirror[..2], b.mirror[..2]);
        assert_eq!(a.rotation, b.rotation);
        assert_eq!(a.gamma, b.gamma);
    }
}

#[test]
fn elastic_spec_draws_in_range() {
    let spec = AugmentSpec {
        elastic: ElasticSpec {
            p: 1.0,
            ..ElasticSpec::default()
        },
        ..AugmentSpec::default()
    };
    for seed in 0..500 {
        let p = draw(&spec, seed, [40, 50, 60], 1);
        let e = p.elastic.expect("p = 1");
        for (a, patch) in [40.0, 50.0, 60.0].iter().enumerate() {
            assert!(e.spacing[a] >= 1.0 && e.spacing[a] <= 0.2 * patch + 1e-9);
            assert!(e.magnitude[a] >= 0.0 && e.magnitude[a] <= 0.1 * patch + 1e-9);
        }
    }
}

#[test]
fn same_seed_same_patch_reused_scratch_same_bits() {
    let spec = AugmentSpec {
        rotation: RotationSpec {
            p: 0.7,
            ..RotationSpec::default()
        },
        ..AugmentSpec::nnunet_default()
    };
    let patch = [10, 12, 14];
    let mut scratch = Scratch::default();
    let mut seen_resampled = false;
    for seed in 0..40u64 {
        let p1 = draw(&spec, seed, patch, 2);
        let p2 = draw(&spec, seed, patch, 2);
        assert_eq!(p1, p2);
        seen_resampled |= p1.is_resampled();
        let fresh = run(&p1, patch, 2, seed);
        // Same inputs through a scratch that served other sizes before.
        let (_, size) = source_box(&p1, patch);
        let mut out_img = vec![0f32; fresh.out_img.len()];
        let mut out_lab = vec![0u8; fresh.out_lab.len()];
        apply(
            &p1,
            &Source {
                image: &fresh.src_img,
                label: &fresh.src_lab,
                shape: size,
            },
            &mut Target {
                image: &mut out_img,
                label: &mut out_lab,
                shape: patch,
            },
            255,
            &mut scratch,
        )
        .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out_img), bits(&fresh.out_img), "seed {seed}");
        assert_eq!(out_lab, fresh.out_lab);
        // Warm the scratch with another size.
        let _ = run(
            &draw(&spec, seed + 1000, [5, 17, 3], 2),
            [5, 17, 3],
            2,
            seed,
        );
    }
    assert!(seen_resampled);
    assert_ne!(draw(&spec, 1, patch, 2), draw(&spec, 2, patch, 2));
}

#[test]
fn params_round_trip_through_json() {
    let spec = AugmentSpec {
        elastic: ElasticSpec {
            p: 1.0,
            ..ElasticSpec::default()
        },
        ..AugmentSpec::nnunet_default()
    };
    for seed in 0..50 {
        let p = draw(&spec, seed, [16, 16, 16], 2);
        let back: AugmentParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}

#[test]
fn mismatched_buffers_are_errors() {
    let params = AugmentParams {
        scale: Some([1.2; 3]),
        ..AugmentParams::default()
    };
    let patch = [4, 4, 4];
    let (_, size) = source_box(&params, patch);
    let n_src: usize = size.iter().product();
    let img = vec![0f32; n_src];
    let lab = vec![0u8; n_src];
    let mut out = vec![0f32; 64];
    let mut out_lab = vec![0u8; 64];
    let mut scratch = Scratch::default();
    let mut call = |shape: [usize; 3], img: &[f32], out: &mut [f32], out_lab: &mut [u8]| {
        apply(
            &params,
            &Source {
                image: img,
                label: &lab,
                shape,
            },
            &mut Target {
                image: out,
                label: out_lab,
                shape: patch,
            },
            255,
            &mut scratch,
        )
    };
    assert!(matches!(
        call(patch, &img, &mut out, &mut out_lab),
        Err(AugmentError::Shape {
            what: "source shape",
            ..
        })
    ));
    assert!(matches!(
        call(size, &img[1..], &mut out, &mut out_lab),
        Err(AugmentError::Shape { .. })
    ));
    assert!(matches!(
        call(size, &img, &mut out[..63], &mut out_lab),
        Err(AugmentError::Shape { .. })
    ));
    assert!(matches!(
        call(size, &img, &mut out, &mut out_lab[..10]),
        Err(AugmentError::Shape { .. })
    ));
    assert!(call(size, &img, &mut out, &mut out_lab).is_ok());
    // Parameters drawn for two channels, applied to one.
    let two = AugmentParams {
        gamma: Some(GammaParams {
            retain_stats: true,
            gamma: vec![Some(1.0), None],
        }),
        ..AugmentParams::default()
    };
    let r = apply(
        &two,
        &Source {
            image: &img[..64],
            label: &lab[..64],
            shape: patch,
        },
        &mut Target {
            image: &mut out,
            label: &mut out_lab,
            shape: patch,
        },
        255,
        &mut Scratch::default(),
    );
    assert!(matches!(
        r,
        Err(AugmentError::InvalidParams {
            field: "gamma.gamma",
            ..
        })
    ));
}

#[test]
fn max_source_shape_bounds_every_draw() {
    let spec = AugmentSpec {
        elastic: ElasticSpec {
            p: 0.3,
            ..ElasticSpec::default()
        },
        ..AugmentSpec::nnunet_default()
    };
    for patch in [[32, 48, 64], [128, 128, 128], [7, 1, 300]] {
        let bound = spec.max_source_shape(patch);
        for seed in 0..3000 {
            let p = draw(&spec, seed, patch, 1);
            let (_, size) = source_box(&p, patch);
            for a in 0..3 {
                assert!(size[a] <= bound[a], "{patch:?}: {size:?} > {bound:?}");
            }
        }
    }
    let no_spatial = AugmentSpec {
        rotation: RotationSpec::default(),
        scaling: ScalingSpec::default(),
        ..AugmentSpec::nnunet_default()
    };
    assert_eq!(no_spatial.max_source_shape([5, 6, 7]), [5, 6, 7]);
}

#[test]
fn wide_instruction_sets_give_the_same_bits() {
    // `apply` runs the AVX2 build where the CPU has it; the baseline build must agree bit for
    // bit (no contraction into FMA, fixed reduction order).
    let spec = AugmentSpec {
        rotation: RotationSpec {
            p: 0.8,
            ..RotationSpec::default()
        },
        elastic: ElasticSpec {
            p: 0.2,
            ..ElasticSpec::default()
        },
        noise: NoiseSpec {
            p: 0.5,
            ..NoiseSpec::default()
        },
        blur: BlurSpec {
            p: 0.5,
            ..BlurSpec::default()
        },
        lowres: LowResSpec {
            p: 0.5,
            ..LowResSpec::default()
        },
        gamma: GammaSpec {
            p: 0.5,
            ..GammaSpec::default()
        },
        ..AugmentSpec::nnunet_default()
    };
    let patch = [19, 34, 40];
    for seed in 0..12u64 {
        let params = draw(&spec, seed, patch, 2);
        let fast = run(&params, patch, 2, seed);
        let mut img = vec![0f32; fast.out_img.len()];
        let mut lab = vec![0u8; fast.out_lab.len()];
        let src = Source {
            image: &fast.src_img,
            label: &fast.src_lab,
            shape: fast.size,
        };
        let mut out = Target {
            image: &mut img,
            label: &mut lab,
            shape: patch,
        };
        let job = prepare(&params, &src, &mut out, 255u8).unwrap().unwrap();
        let mut scratch = Scratch::default();
        simd::baseline(Work {
            job,
            scratch: &mut scratch,
        });
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&img), bits(&fast.out_img), "seed {seed}");
        assert_eq!(lab, fast.out_lab);
    }
}

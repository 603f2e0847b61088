//! The spatial mapping of one item: output voxel → source coordinate, and the source region it
//! needs.
//!
//! Output voxel `o` (`[z, y, x]`, patch coordinates) samples the source at
//! `c + A · (o − c + e(o))` in patch-origin coordinates, where `c = (patch − 1) / 2` is the patch
//! centre, `e` the elastic displacement (zero without deformation) and `A = R₂ · R₁ · R₀ · S · F`:
//! `R_k` the rotation about array axis `k` by angle `k` (composed in the order of nnU-Net's
//! `create_affine_matrix_3d`), then the scaling and the mirroring. Without any spatial transform the mapping is the identity (or a
//! flip) and the source region is the patch itself.

use crate::params::AugmentParams;

/// Margin (voxels) added around the exact extent of the source coordinates, covering the
/// rounding of the `f32` coordinate arithmetic.
pub(crate) const BOX_EPS: f64 = 1e-2;

/// The linear part `A`, with entries within `1e-12` of `0` or `±1` snapped, so that rotations by
/// multiples of 90° map voxel centres exactly onto voxel centres.
pub(crate) fn linear_part(params: &AugmentParams) -> [[f64; 3]; 3] {
    let [a0, a1, a2] = params.rotation.unwrap_or([0.0; 3]);
    let (s0, c0) = a0.sin_cos();
    let (s1, c1) = a1.sin_cos();
    let (s2, c2) = a2.sin_cos();
    // About axis 0 (turns the y-x plane), axis 1 (z-x plane), axis 2 (z-y plane).
    let r0 = [[1.0, 0.0, 0.0], [0.0, c0, -s0], [0.0, s0, c0]];
    let r1 = [[c1, 0.0, s1], [0.0, 1.0, 0.0], [-s1, 0.0, c1]];
    let r2 = [[c2, -s2, 0.0], [s2, c2, 0.0], [0.0, 0.0, 1.0]];
    let r = mul(&r2, &mul(&r1, &r0));
    let scale = params.scale.unwrap_or([1.0; 3]);
    let mut a = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            let flip = if params.mirror[j] { -1.0 } else { 1.0 };
            a[i][j] = snap(r[i][j]) * scale[j] * flip;
        }
    }
    a
}

fn snap(v: f64) -> f64 {
    let r = v.round();
    if (v - r).abs() < 1e-12 && r.abs() <= 1.0 {
        r
    } else {
        v
    }
}

fn mul(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut r = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            r[i][j] = a[i][0] * b[0][j] + a[i][1] * b[1][j] + a[i][2] * b[2][j];
        }
    }
    r
}

/// The region of the source the caller must read for `params` and `patch`: its offset from the
/// patch origin (`[z, y, x]`, may be negative) and its size. Every source coordinate the patch
/// samples, with both trilinear neighbours, lies inside it, so a rotated or scaled patch has no
/// holes (voxels outside the volume are the caller's padding, as for a plain crop). Without
/// rotation, scaling or elastic deformation the region is the patch itself (`[0; 3]`, `patch`).
pub fn source_box(params: &AugmentParams, patch: [usize; 3]) -> ([i64; 3], [usize; 3]) {
    if !params.is_resampled() {
        return ([0; 3], patch);
    }
    let a = linear_part(params);
    let c = patch.map(|p| (p as f64 - 1.0).max(0.0) / 2.0);
    let mag = params.elastic.as_ref().map_or([0.0; 3], |e| e.magnitude);
    let mut offset = [0i64; 3];
    let mut size = [0usize; 3];
    for i in 0..3 {
        // Extent of A·(o − c) over the patch corners: per column, the larger of ± c_j.
        let reach: f64 = (0..3).map(|j| a[i][j].abs() * c[j]).sum();
        let bend: f64 = (0..3).map(|j| a[i][j].abs() * mag[j]).sum();
        let lo = (c[i] - reach - bend - BOX_EPS).floor();
        let hi = (c[i] + reach + bend + BOX_EPS).floor() + 1.0;
        offset[i] = lo as i64;
        size[i] = (hi - lo) as usize + 1;
    }
    (offset, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::FRAC_PI_2;

    #[test]
    fn identity_box_is_the_patch() {
        let p = AugmentParams {
            mirror: [true, false, true],
            ..AugmentParams::default()
        };
        assert_eq!(source_box(&p, [5, 6, 7]), ([0; 3], [5, 6, 7]));
    }

    #[test]
    fn scaled_box_covers_the_scaled_patch() {
        let p = AugmentParams {
            scale: Some([2.0; 3]),
            ..AugmentParams::default()
        };
        // Patch 11: c = 5, reach = 10 -> coordinates -5..15, box -6..16.
        let (o, s) = source_box(&p, [11, 11, 11]);
        assert_eq!(o, [-6; 3]);
        assert_eq!(s, [23; 3]);
    }

    #[test]
    fn quarter_turn_is_snapped() {
        let p = AugmentParams {
            rotation: Some([FRAC_PI_2, 0.0, 0.0]),
            ..AugmentParams::default()
        };
        let a = linear_part(&p);
        assert_eq!(a, [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]);
    }
}

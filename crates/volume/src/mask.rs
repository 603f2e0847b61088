//! nnU-Net's non-zero mask and `use_mask_for_norm`: which voxels of a cropped case lie outside
//! the hole-filled non-zero region, the label value that marks them, and the dataset rule that
//! decides whether z-scored channels are normalised over that mask only.
//!
//! What nnU-Net v2 does, and what this module reproduces:
//!
//! * `create_nonzero_mask` (`preprocessing/cropping/cropping.py`): a voxel is in the mask when
//!   any channel is non-zero there; holes are then filled with `scipy.ndimage.binary_fill_holes`
//!   (background components, 6-connected, that do not reach the border of the array).
//!   `crop_to_nonzero` crops to the mask's bounding box (the box of the non-zero voxels: filling
//!   holes never widens it) and sets the segmentation to −1 where it is 0 outside the mask.
//!   Filling holes inside the crop box gives the same mask as filling them on the whole volume:
//!   everything outside the box is background connected to the border, so a background voxel on
//!   the box's faces reaches the border either way.
//! * The fingerprint's `median_relative_size_after_cropping` is the median over the cases of
//!   cropped voxels / original voxels; the planner sets `use_mask_for_norm` for the z-scored
//!   channels when it is below 3/4 ([`mask_for_norm_applies`]).
//! * `ZScoreNormalization` with the mask takes mean and standard deviation over `seg >= 0` (the
//!   filled mask plus labelled voxels outside it) and normalises only there; the image keeps its
//!   value outside, which is 0 (no channel is non-zero outside the mask).
//! * Training replaces −1 by 0 (`RemoveLabelTansform(-1, 0)`).
//!
//! patchflow labels are unsigned, so the −1 is a stored *marker* value instead,
//! [`PreprocessedCase::outside_mask_label`](crate::PreprocessedCase::outside_mask_label): the
//! largest value below the label type's all-ones (the padding/ignore label) that is not a class
//! of the case ([`mark_outside_mask`]).

use crate::types::{Element, LabelData, VoxelData};

/// nnU-Net's threshold: z-scored channels use the non-zero mask when the dataset's median
/// relative size after cropping is below this fraction.
pub const MASK_FOR_NORM_MAX_RELATIVE_SIZE: f64 = 0.75;

/// Whether nnU-Net's planner sets `use_mask_for_norm` (for z-scored channels) given the median
/// relative size after cropping: `median < 3/4`.
pub fn mask_for_norm_applies(median_relative_size_after_cropping: f64) -> bool {
    median_relative_size_after_cropping < MASK_FOR_NORM_MAX_RELATIVE_SIZE
}

/// Voxels of the crop box over voxels of the original grid (nnU-Net's
/// `relative_size_after_cropping`); 1 for an empty grid.
pub fn relative_size_after_cropping(shape: [usize; 3], crop_box: [[usize; 2]; 3]) -> f64 {
    let original: f64 = shape.iter().map(|&n| n as f64).product();
    if original == 0.0 {
        return 1.0;
    }
    let cropped: f64 = crop_box
        .iter()
        .map(|&[s, e]| e.saturating_sub(s) as f64)
        .product();
    cropped / original
}

/// The median as numpy computes it (the mean of the two middle values for an even count);
/// `None` for no finite value. Non-finite values are left out.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// nnU-Net's `create_nonzero_mask` on one grid: `true` where any channel is non-zero, holes
/// filled (background not 6-connected to the grid's border becomes `true`). Every channel must
/// hold `product(shape)` voxels.
pub fn filled_nonzero_mask(channels: &[VoxelData], shape: [usize; 3]) -> Vec<bool> {
    let n: usize = shape.iter().product();
    let mut inside = vec![false; n];
    for data in channels {
        crate::with_voxels!(data, v => {
            for (m, x) in inside.iter_mut().zip(v.iter()) {
                *m |= x.to_f64() != 0.0;
            }
        });
    }
    fill_holes(&mut inside, shape);
    inside
}

/// `scipy.ndimage.binary_fill_holes` with its default structure (6-connectivity in 3D):
/// background voxels that cannot reach the border through 6-connected background become `true`.
fn fill_holes(inside: &mut [bool], shape: [usize; 3]) {
    let [nz, ny, nx] = shape;
    if inside.len() != nz * ny * nx || inside.is_empty() {
        return;
    }
    // Background reached from the border; indices fit u32 because volumes hold at most
    // MAX_VOXELS = 2^32 voxels.
    let mut reached = vec![false; inside.len()];
    let mut stack: Vec<u32> = Vec::new();
    let visit = |i: usize, reached: &mut [bool], stack: &mut Vec<u32>| {
        if !inside[i] && !reached[i] {
            reached[i] = true;
            stack.push(i as u32);
        }
    };
    for z in 0..nz {
        for y in 0..ny {
            let row = (z * ny + y) * nx;
            if z == 0 || z == nz - 1 || y == 0 || y == ny - 1 {
                for x in 0..nx {
                    visit(row + x, &mut reached, &mut stack);
                }
            } else {
                visit(row, &mut reached, &mut stack);
                visit(row + nx - 1, &mut reached, &mut stack);
            }
        }
    }
    let (sy, sz) = (nx, nx * ny);
    while let Some(i) = stack.pop() {
        let i = i as usize;
        let (z, r) = (i / sz, i % sz);
        let (y, x) = (r / sy, r % sy);
        if x > 0 {
            visit(i - 1, &mut reached, &mut stack);
        }
        if x + 1 < nx {
            visit(i + 1, &mut reached, &mut stack);
        }
        if y > 0 {
            visit(i - sy, &mut reached, &mut stack);
        }
        if y + 1 < ny {
            visit(i + sy, &mut reached, &mut stack);
        }
        if z > 0 {
            visit(i - sz, &mut reached, &mut stack);
        }
        if z + 1 < nz {
            visit(i + sz, &mut reached, &mut stack);
        }
    }
    for (m, r) in inside.iter_mut().zip(&reached) {
        *m = !r;
    }
}

/// The marker for voxels outside the mask: the largest value below the all-ones value of the
/// label's type (255 or 65535, the padding/ignore label) that is no class of `label`; `None`
/// when every such value is a class (only possible for `u8` labels using 1..=254).
pub fn outside_mask_label(label: &LabelData) -> Option<u16> {
    fn free<T: Copy + Into<u32>>(v: &[T], top: u32) -> Option<u16> {
        let mut present = vec![false; top as usize + 1];
        for &x in v {
            present[x.into() as usize] = true;
        }
        (1..top)
            .rev()
            .find(|&c| !present[c as usize])
            .map(|c| c as u16)
    }
    match label {
        LabelData::U8(v) => free(v, u32::from(u8::MAX)),
        LabelData::U16(v) => free(v, u32::from(u16::MAX)),
    }
}

/// Sets the voxels that are background (0) and outside `inside` to the marker
/// [`outside_mask_label`] chooses, as nnU-Net sets them to −1; returns the marked label and the
/// marker. A `u8` label whose every value 1..=254 is a class is widened to `u16` first.
/// Labelled voxels outside the mask keep their class (nnU-Net only marks `seg == 0`).
pub fn mark_outside_mask(label: LabelData, inside: &[bool]) -> (LabelData, u16) {
    let label = match outside_mask_label(&label) {
        Some(_) => label,
        None => match label {
            LabelData::U8(v) => LabelData::U16(v.into_iter().map(u16::from).collect()),
            wide => wide,
        },
    };
    // Widened labels hold at most 255 distinct values, so a u16 marker always exists.
    let marker = outside_mask_label(&label).unwrap_or(u16::MAX - 1);
    let label = match label {
        LabelData::U8(mut v) => {
            let m = marker as u8;
            for (l, &i) in v.iter_mut().zip(inside) {
                if *l == 0 && !i {
                    *l = m;
                }
            }
            LabelData::U8(v)
        }
        LabelData::U16(mut v) => {
            for (l, &i) in v.iter_mut().zip(inside) {
                if *l == 0 && !i {
                    *l = marker;
                }
            }
            LabelData::U16(v)
        }
    };
    (label, marker)
}

/// Mean and population standard deviation in `f64` (two passes) over the voxels whose label is
/// not `marker`: nnU-Net's statistics over `seg >= 0`. `(0, 0)` when no voxel qualifies.
pub(crate) fn mean_std_inside<T: Element>(v: &[T], label: &LabelData, marker: u16) -> (f64, f64) {
    let inside = |i: usize| label.get(i) != marker;
    let (mut n, mut sum) = (0u64, 0.0f64);
    for (i, x) in v.iter().enumerate() {
        if inside(i) {
            n += 1;
            sum += x.to_f64();
        }
    }
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = sum / n as f64;
    let var = v
        .iter()
        .enumerate()
        .filter(|&(i, _)| inside(i))
        .map(|(_, x)| (x.to_f64() - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference hole filling: repeat raster sweeps that spread "reaches the border" until
    /// nothing changes (a different algorithm from the stack flood above).
    fn fill_by_sweeps(mask: &[bool], shape: [usize; 3]) -> Vec<bool> {
        let [nz, ny, nx] = shape;
        let idx = |z: usize, y: usize, x: usize| (z * ny + y) * nx + x;
        let mut out = vec![false; mask.len()];
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    let border =
                        z == 0 || y == 0 || x == 0 || z + 1 == nz || y + 1 == ny || x + 1 == nx;
                    out[idx(z, y, x)] = border && !mask[idx(z, y, x)];
                }
            }
        }
        loop {
            let mut changed = false;
            for z in 0..nz {
                for y in 0..ny {
                    for x in 0..nx {
                        let i = idx(z, y, x);
                        if mask[i] || out[i] {
                            continue;
                        }
                        let near = (x > 0 && out[idx(z, y, x - 1)])
                            || (x + 1 < nx && out[idx(z, y, x + 1)])
                            || (y > 0 && out[idx(z, y - 1, x)])
                            || (y + 1 < ny && out[idx(z, y + 1, x)])
                            || (z > 0 && out[idx(z - 1, y, x)])
                            || (z + 1 < nz && out[idx(z + 1, y, x)]);
                        if near {
                            out[i] = true;
                            changed = true;
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        out.iter().map(|r| !r).collect()
    }

    #[test]
    fn a_closed_shell_is_filled_and_a_diagonal_gap_does_not_leak() {
        // A 7³ grid with a hollow 5³ shell (1..6): its inside (2..5) is a hole.
        let shape = [7, 7, 7];
        let idx = |z: usize, y: usize, x: usize| (z * 7 + y) * 7 + x;
        let mut v = vec![0u8; 343];
        for z in 1..6 {
            for y in 1..6 {
                for x in 1..6 {
                    let edge = [z, y, x].iter().any(|&c| c == 1 || c == 5);
                    if edge {
                        v[idx(z, y, x)] = 3;
                    }
                }
            }
        }
        let mask = filled_nonzero_mask(&[VoxelData::U8(v.clone())], shape);
        assert!(mask[idx(3, 3, 3)], "the hole is filled");
        assert!(!mask[idx(0, 3, 3)], "the border stays background");
        // Open the shell on one face: the inside now reaches the border.
        v[idx(3, 3, 1)] = 0;
        let mask = filled_nonzero_mask(&[VoxelData::U8(v.clone())], shape);
        assert!(!mask[idx(3, 3, 3)]);
        // Close it again but remove an edge voxel: only a diagonal (not 6-connected) path
        // would lead out, so the hole stays a hole as scipy's default structure says.
        v[idx(3, 3, 1)] = 3;
        v[idx(1, 1, 3)] = 0;
        let mask = filled_nonzero_mask(&[VoxelData::U8(v)], shape);
        assert!(mask[idx(3, 3, 3)]);
        assert!(
            !mask[idx(1, 1, 3)],
            "the edge voxel itself touches the outside"
        );
    }

    #[test]
    fn any_channel_counts_and_negative_or_float_values_are_non_zero() {
        let shape = [1, 1, 4];
        let a = VoxelData::I16(vec![0, -3, 0, 0]);
        let b = VoxelData::F32(vec![0.0, 0.0, 0.0, 0.5]);
        assert_eq!(
            filled_nonzero_mask(&[a, b], shape),
            vec![false, true, false, true]
        );
        let c = VoxelData::F32(vec![-0.0, 0.0, f32::NAN, 0.0]);
        assert_eq!(
            filled_nonzero_mask(&[c], shape),
            vec![false, false, true, false]
        );
    }

    #[test]
    fn the_rule_and_the_median_follow_numpy_and_the_planner() {
        assert!(mask_for_norm_applies(0.7499));
        assert!(!mask_for_norm_applies(0.75));
        assert_eq!(median(&[0.9, 0.1, 0.5]), Some(0.5));
        assert_eq!(median(&[0.9, 0.1, 0.5, 0.6]), Some(0.55));
        assert_eq!(median(&[]), None);
        let r = relative_size_after_cropping([10, 10, 10], [[0, 5], [2, 7], [0, 10]]);
        assert!((r - 0.25).abs() < 1e-15);
    }

    #[test]
    fn the_marker_avoids_classes_and_the_ignore_label() {
        assert_eq!(outside_mask_label(&LabelData::U8(vec![0, 1, 2])), Some(254));
        assert_eq!(
            outside_mask_label(&LabelData::U8(vec![0, 254, 255])),
            Some(253)
        );
        assert_eq!(
            outside_mask_label(&LabelData::U16(vec![0, 300])),
            Some(65534)
        );
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(outside_mask_label(&LabelData::U8(all.clone())), None);
        let inside = vec![false; 256];
        let (marked, m) = mark_outside_mask(LabelData::U8(all), &inside);
        assert_eq!(m, 65534);
        assert_eq!(
            marked.get(0),
            65534,
            "background outside the mask is marked"
        );
        assert_eq!(
            marked.get(7),
            7,
            "classes outside the mask keep their value"
        );
    }

    proptest! {
        #[test]
        fn hole_filling_matches_repeated_sweeps(
            nz in 1usize..7, ny in 1usize..7, nx in 1usize..7,
            bits in proptest::collection::vec(proptest::bool::weighted(0.65), 216),
        ) {
            let shape = [nz, ny, nx];
            let n = nz * ny * nx;
            let v: Vec<u8> = bits[..n].iter().map(|&b| u8::from(b)).collect();
            let raw: Vec<bool> = bits[..n].to_vec();
            let mask = filled_nonzero_mask(&[VoxelData::U8(v)], shape);
            prop_assert_eq!(mask, fill_by_sweeps(&raw, shape));
        }
    }
}

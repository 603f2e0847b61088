//! Label maps: reading with class-index validation, and the image/label grid check.

use std::path::Path;

use crate::error::VolumeError;
use crate::nifti::{VolumeKind, read_volume, read_volume_from, unflatten};
use crate::types::{Element, Geometry, LabelData, VoxelData};

/// Largest translation difference (mm) two grids may have and still count as the same.
pub const GRID_TRANSLATION_TOLERANCE_MM: f64 = 1.0e-3;
/// Largest relative difference of the affine's 3×3 part for two grids to count as the same.
pub const GRID_RELATIVE_TOLERANCE: f64 = 1.0e-4;

/// Reads a label map: a 3D NIfTI-1 file of non-negative integer class indices up to 65535.
///
/// Integer files are taken as they are; float files (and files with intensity scaling) are
/// accepted only when every value is integral. The result is [`LabelData::U8`] when the largest
/// class is at most 255, else [`LabelData::U16`]. A 4D file with more than one volume is an error.
pub fn read_label(path: &Path) -> Result<(Geometry, LabelData), VolumeError> {
    let raw = read_volume(path, VolumeKind::Label)?;
    let shape = raw.geometry.shape;
    let labels = to_labels(path, raw.data, shape)?;
    Ok((raw.geometry, labels))
}

/// Reads a label map from bytes already in memory, exactly as [`read_label`] reads a file (plain
/// or gzip, the same checks and limits); `name` stands for the file in errors.
pub fn read_label_bytes(bytes: &[u8], name: &Path) -> Result<(Geometry, LabelData), VolumeError> {
    let raw = read_volume_from(name, bytes, bytes.len() as u64, VolumeKind::Label)?;
    let shape = raw.geometry.shape;
    let labels = to_labels(name, raw.data, shape)?;
    Ok((raw.geometry, labels))
}

/// Converts voxels to class indices, rejecting anything that is not one.
pub(crate) fn to_labels(
    path: &Path,
    data: VoxelData,
    shape: [usize; 3],
) -> Result<LabelData, VolumeError> {
    let bad = |reason: &'static str, value: f64, index: usize| VolumeError::BadLabel {
        path: path.to_path_buf(),
        reason,
        value,
        voxel: unflatten(index, shape),
    };
    match data {
        VoxelData::U8(v) => Ok(LabelData::U8(v)),
        VoxelData::I8(v) => integer_labels(&v, bad),
        VoxelData::U16(v) => integer_labels(&v, bad),
        VoxelData::I16(v) => integer_labels(&v, bad),
        VoxelData::U32(v) => integer_labels(&v, bad),
        VoxelData::I32(v) => integer_labels(&v, bad),
        VoxelData::F32(v) => float_labels(&v, bad),
        VoxelData::F64(v) => float_labels(&v, bad),
    }
}

/// Integer labels: one pass for the range, one for the conversion.
fn integer_labels<T: Element + Into<i64>>(
    v: &[T],
    bad: impl Fn(&'static str, f64, usize) -> VolumeError,
) -> Result<LabelData, VolumeError> {
    let (mut lo, mut hi) = (0i64, 0i64);
    for &x in v {
        let x: i64 = x.into();
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo < 0 {
        let i = v.iter().position(|&x| x.into() < 0).unwrap_or(0);
        return Err(bad("negative", lo as f64, i));
    }
    if hi > i64::from(u16::MAX) {
        let i = v
            .iter()
            .position(|&x| x.into() > i64::from(u16::MAX))
            .unwrap_or(0);
        return Err(bad(
            "too large",
            v.get(i).map_or(hi as f64, |x| x.to_f64()),
            i,
        ));
    }
    if hi <= i64::from(u8::MAX) {
        Ok(LabelData::U8(v.iter().map(|&x| x.into() as u8).collect()))
    } else {
        Ok(LabelData::U16(v.iter().map(|&x| x.into() as u16).collect()))
    }
}

/// Float labels: every value must be a finite integer in `0..=65535`.
fn float_labels<T: Element>(
    v: &[T],
    bad: impl Fn(&'static str, f64, usize) -> VolumeError,
) -> Result<LabelData, VolumeError> {
    let mut hi = 0.0f64;
    for (i, &x) in v.iter().enumerate() {
        let x = x.to_f64();
        if !x.is_finite() || x.fract() != 0.0 {
            return Err(bad("non-integer", x, i));
        }
        if x < 0.0 {
            return Err(bad("negative", x, i));
        }
        if x > f64::from(u16::MAX) {
            return Err(bad("too large", x, i));
        }
        hi = hi.max(x);
    }
    if hi <= f64::from(u8::MAX) {
        Ok(LabelData::U8(v.iter().map(|&x| x.to_f64() as u8).collect()))
    } else {
        Ok(LabelData::U16(
            v.iter().map(|&x| x.to_f64() as u16).collect(),
        ))
    }
}

/// Checks that a label map lies on the image's voxel grid: same shape, and affines equal within
/// [`GRID_TRANSLATION_TOLERANCE_MM`] on the translation and [`GRID_RELATIVE_TOLERANCE`] (relative
/// to the column's length, i.e. the voxel size) on the 3×3 part. The error says which part
/// differs and by how much.
pub fn check_same_grid(
    image: &Geometry,
    label: &Geometry,
    image_path: &Path,
    label_path: &Path,
) -> Result<(), VolumeError> {
    match grid_difference(image, label) {
        None => Ok(()),
        Some(detail) => Err(VolumeError::GridMismatch {
            a: image_path.to_path_buf(),
            b: label_path.to_path_buf(),
            detail,
        }),
    }
}

/// Describes how two grids differ, or `None` when they match within tolerance.
pub(crate) fn grid_difference(a: &Geometry, b: &Geometry) -> Option<String> {
    if a.shape != b.shape {
        return Some(format!("shape [z,y,x] {:?} vs {:?}", a.shape, b.shape));
    }
    let translation: f64 = (0..3)
        .map(|r| (a.affine[r][3] - b.affine[r][3]).abs())
        .fold(0.0, f64::max);
    if translation.is_nan() || translation > GRID_TRANSLATION_TOLERANCE_MM {
        return Some(format!(
            "origin differs by {translation:.6} mm ({:?} vs {:?}; tolerance {GRID_TRANSLATION_TOLERANCE_MM} mm)",
            [a.affine[0][3], a.affine[1][3], a.affine[2][3]],
            [b.affine[0][3], b.affine[1][3], b.affine[2][3]],
        ));
    }
    let column_norm =
        |g: &Geometry, c: usize| (0..3).map(|r| g.affine[r][c].powi(2)).sum::<f64>().sqrt();
    let mut worst: Option<(f64, usize, usize)> = None;
    for c in 0..3 {
        let scale = column_norm(a, c)
            .max(column_norm(b, c))
            .max(f64::MIN_POSITIVE);
        for r in 0..3 {
            let rel = (a.affine[r][c] - b.affine[r][c]).abs() / scale;
            if (rel.is_nan() || rel > GRID_RELATIVE_TOLERANCE)
                && worst.is_none_or(|(w, _, _)| rel > w || rel.is_nan())
            {
                worst = Some((rel, r, c));
            }
        }
    }
    worst.map(|(rel, r, c)| {
        format!(
            "direction/spacing part of the affine differs: element [{r}][{c}] is {} vs {} (relative difference {rel:.2e}; tolerance {GRID_RELATIVE_TOLERANCE:e})",
            a.affine[r][c], b.affine[r][c]
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nifti::write_nifti;

    fn geometry(shape: [usize; 3]) -> Geometry {
        Geometry {
            shape,
            spacing: [2.0, 1.0, 1.0],
            affine: [
                [-1.0, 0.0, 0.0, 10.0],
                [0.0, 1.0, 0.0, -20.0],
                [0.0, 0.0, 2.0, 30.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        }
    }

    #[test]
    fn labels_of_every_integer_type() {
        let dir = tempfile::tempdir().unwrap();
        let g = geometry([2, 3, 4]);
        let values: Vec<i64> = (0..24).map(|i| (i % 5) * 3).collect();
        let cases = [
            VoxelData::I8(values.iter().map(|&v| v as i8).collect()),
            VoxelData::U16(values.iter().map(|&v| v as u16).collect()),
            VoxelData::I16(values.iter().map(|&v| v as i16).collect()),
            VoxelData::U32(values.iter().map(|&v| v as u32).collect()),
            VoxelData::I32(values.iter().map(|&v| v as i32).collect()),
            VoxelData::F32(values.iter().map(|&v| v as f32).collect()),
            VoxelData::F64(values.iter().map(|&v| v as f64).collect()),
        ];
        for data in cases {
            let path = dir.path().join(format!("l_{}.nii", data.dtype()));
            write_nifti(&path, &g, &data).unwrap();
            let (geo, labels) = read_label(&path).unwrap();
            assert_eq!(geo, g);
            let expected: Vec<u8> = values.iter().map(|&v| v as u8).collect();
            assert_eq!(labels, LabelData::U8(expected), "{}", data.dtype());
        }
    }

    #[test]
    fn labels_above_255_become_u16() {
        let dir = tempfile::tempdir().unwrap();
        let g = geometry([1, 2, 3]);
        let path = dir.path().join("l.nii.gz");
        write_nifti(&path, &g, &VoxelData::I32(vec![0, 1, 256, 65535, 7, 0])).unwrap();
        let (_, labels) = read_label(&path).unwrap();
        assert_eq!(labels, LabelData::U16(vec![0, 1, 256, 65535, 7, 0]));
    }

    #[test]
    fn non_integer_label_is_rejected_with_its_voxel() {
        let dir = tempfile::tempdir().unwrap();
        let g = geometry([2, 2, 3]);
        let path = dir.path().join("l.nii.gz");
        let mut v = vec![1.0f32; 12];
        v[7] = 2.5; // [z=1, y=0, x=1]
        write_nifti(&path, &g, &VoxelData::F32(v)).unwrap();
        let err = read_label(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                VolumeError::BadLabel {
                    reason: "non-integer",
                    voxel: [1, 0, 1],
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("non-integer label value 2.5 at voxel"),
            "{msg}"
        );
        assert!(msg.contains("l.nii.gz"), "{msg}");
    }

    #[test]
    fn nan_in_float_label_is_non_integer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.nii");
        let mut v = vec![0.0f64; 6];
        v[3] = f64::NAN;
        write_nifti(&path, &geometry([1, 2, 3]), &VoxelData::F64(v)).unwrap();
        assert!(matches!(
            read_label(&path),
            Err(VolumeError::BadLabel {
                reason: "non-integer",
                voxel: [0, 1, 0],
                ..
            })
        ));
    }

    #[test]
    fn negative_and_too_large_labels_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let g = geometry([1, 1, 3]);
        let path = dir.path().join("neg.nii");
        write_nifti(&path, &g, &VoxelData::I16(vec![0, -1, 2])).unwrap();
        assert!(matches!(
            read_label(&path),
            Err(VolumeError::BadLabel {
                reason: "negative",
                voxel: [0, 0, 1],
                ..
            })
        ));
        let path = dir.path().join("big.nii");
        write_nifti(&path, &g, &VoxelData::U32(vec![0, 3, 70000])).unwrap();
        assert!(matches!(
            read_label(&path),
            Err(VolumeError::BadLabel {
                reason: "too large",
                voxel: [0, 0, 2],
                ..
            })
        ));
    }

    #[test]
    fn four_d_label_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l4.nii");
        let g = geometry([1, 2, 2]);
        write_nifti(&path, &g, &VoxelData::U8(vec![0; 4])).unwrap();
        // Turn it into a 2×2×1×2 file with two volumes.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40..42].copy_from_slice(&4i16.to_le_bytes());
        bytes[48..50].copy_from_slice(&2i16.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        std::fs::write(&path, bytes).unwrap();
        let err = read_label(&path).unwrap_err();
        assert!(
            matches!(err, VolumeError::MultiVolume { volumes: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("single 3D volume"), "{err}");
    }

    #[test]
    fn same_grid_passes_within_tolerance() {
        let a = geometry([4, 5, 6]);
        let mut b = a.clone();
        b.affine[0][3] += 0.5e-3;
        b.affine[2][2] *= 1.0 + 0.5e-4;
        check_same_grid(&a, &b, Path::new("img.nii"), Path::new("lab.nii")).unwrap();
    }

    #[test]
    fn shape_mismatch_is_reported() {
        let a = geometry([4, 5, 6]);
        let b = geometry([4, 5, 7]);
        let err = check_same_grid(&a, &b, Path::new("img.nii"), Path::new("lab.nii")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("img.nii") && msg.contains("lab.nii"), "{msg}");
        assert!(msg.contains("shape") && msg.contains("[4, 5, 7]"), "{msg}");
    }

    #[test]
    fn origin_mismatch_is_reported_with_its_size() {
        let a = geometry([4, 5, 6]);
        let mut b = a.clone();
        b.affine[1][3] += 0.25;
        let err = check_same_grid(&a, &b, Path::new("i"), Path::new("l")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("origin differs by 0.250000 mm"), "{msg}");
    }

    #[test]
    fn direction_mismatch_is_reported_with_its_element() {
        let a = geometry([4, 5, 6]);
        let mut b = a.clone();
        b.affine[0][0] = 1.0; // flipped x axis
        let err = check_same_grid(&a, &b, Path::new("i"), Path::new("l")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("element [0][0]") && msg.contains("direction"),
            "{msg}"
        );
        let mut c = a.clone();
        c.affine[2][2] *= 1.0 + 1.0e-3;
        assert!(check_same_grid(&a, &c, Path::new("i"), Path::new("l")).is_err());
    }

    #[test]
    fn grid_mismatch_between_files_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.nii.gz");
        let lab = dir.path().join("lab.nii.gz");
        write_nifti(&img, &geometry([2, 3, 4]), &VoxelData::I16(vec![5; 24])).unwrap();
        let mut shifted = geometry([2, 3, 4]);
        shifted.affine[0][3] += 1.5;
        write_nifti(&lab, &shifted, &VoxelData::U8(vec![1; 24])).unwrap();
        let image = crate::nifti::read_nifti(&img).unwrap();
        let (label_geometry, _) = read_label(&lab).unwrap();
        let err = check_same_grid(&image.geometry, &label_geometry, &img, &lab).unwrap_err();
        assert!(err.to_string().contains("origin differs by 1.5"), "{err}");
    }
}

//! Validation on held-out cases (sliding window at the final patch, Dice per class) and the
//! export of predictions as NIfTI on each case's original grid.

use std::path::{Path, PathBuf};
use std::time::Instant;

use patchflow_volume::{LabelData, VoxelData, resample_labels, write_nifti};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

use crate::TrainerError;
use crate::data::{OriginalGrid, Volume, VolumeLoader};
use crate::error::TorchContext;
use crate::infer::{SlidingWindow, argmax_labels, sliding_window_logits};
use crate::loss::Confusion;
use crate::unet::UNet;

/// Dice of one validation case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseDice {
    /// Case id.
    pub id: String,
    /// Dice per class (index = class value, background included); `None` where the class is
    /// absent from both prediction and reference.
    pub dice: Vec<Option<f64>>,
    /// The prediction written for the case, when exported.
    pub prediction: Option<PathBuf>,
}

/// The result of one validation pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationReport {
    /// Per case.
    pub cases: Vec<CaseDice>,
    /// Per class, the mean over cases where the Dice is defined (`None`: nowhere).
    pub mean_dice: Vec<Option<f64>>,
    /// Mean of `mean_dice` over the foreground classes that are defined.
    pub mean_foreground_dice: Option<f64>,
    /// Wall time of the pass.
    pub seconds: f64,
}

/// Voxel counts of the hard segmentation (argmax) of `logits` `[B, K, Z, Y, X]` against
/// `label` `[B, 1, Z, Y, X]`, per foreground class, summed over the batch; voxels labelled
/// `ignore` count nowhere; background (class 0) is not counted. These are nnU-Net's
/// `validation_step` `tp_hard`, `fp_hard` and `fn_hard`; summed over an epoch's validation
/// batches, [`Confusion::dice`] of each class is its pseudo-Dice.
///
/// # Errors
/// libtorch's error (shapes that do not match).
pub fn batch_confusion(
    logits: &Tensor,
    label: &Tensor,
    num_classes: usize,
    ignore: u16,
) -> Result<Confusion, TchError> {
    tch::no_grad(|| {
        let pred = logits.f_argmax(1, false)?;
        let target = label.f_to_kind(Kind::Int64)?.f_squeeze_dim(1)?;
        let valid = target.f_ne(i64::from(ignore))?;
        let count = |t: &Tensor| -> Result<u64, TchError> {
            let n = t.f_sum(Kind::Int64)?.f_int64_value(&[])?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        let mut c = Confusion::new(num_classes);
        for k in 1..num_classes {
            let class = i64::try_from(k).unwrap_or(i64::MAX);
            let p = pred.f_eq(class)?.f_logical_and(&valid)?;
            let g = target.f_eq(class)?;
            c.tp[k] = count(&p.f_logical_and(&g)?)?;
            c.fp[k] = count(&p.f_logical_and(&g.f_logical_not()?)?)?;
            c.fn_[k] = count(&g.f_logical_and(&p.f_logical_not()?)?)?;
        }
        Ok(c)
    })
}

/// Maps a segmentation on the preprocessed grid back to the source grid: nearest-neighbour
/// resampling to the cropped source shape (when ingest resampled), then padding with
/// background to the full source shape at the crop box.
pub fn to_original_grid(
    seg: &[u16],
    shape: [usize; 3],
    original: &OriginalGrid,
    case: &str,
) -> Result<LabelData, TrainerError> {
    let bad = |reason: String| TrainerError::Case {
        case: case.to_string(),
        reason,
    };
    let n: usize = shape.iter().product();
    if seg.len() != n {
        return Err(bad(format!(
            "segmentation has {} voxels, shape {shape:?} needs {n}",
            seg.len()
        )));
    }
    let full = original.geometry.shape;
    let cb = original.crop_box;
    for a in 0..3 {
        if cb[a][0] >= cb[a][1] || cb[a][1] > full[a] {
            return Err(bad(format!(
                "crop box {cb:?} does not fit the original shape {full:?}"
            )));
        }
    }
    let cropped: [usize; 3] = std::array::from_fn(|a| cb[a][1] - cb[a][0]);
    let wide = seg.iter().any(|&v| v > 255);
    let labels = if wide {
        LabelData::U16(seg.to_vec())
    } else {
        LabelData::U8(seg.iter().map(|&v| v as u8).collect())
    };
    let labels = if cropped == shape {
        labels
    } else {
        let r = resample_labels(&labels, shape, cropped);
        if r.len() != cropped.iter().product::<usize>() {
            return Err(bad(format!("resampling {shape:?} to {cropped:?} failed")));
        }
        r
    };
    fn place<T: Copy + Default>(
        src: &[T],
        cropped: [usize; 3],
        full: [usize; 3],
        cb: [[usize; 2]; 3],
    ) -> Vec<T> {
        let mut out = vec![T::default(); full.iter().product()];
        for z in 0..cropped[0] {
            for y in 0..cropped[1] {
                let s = (z * cropped[1] + y) * cropped[2];
                let d = ((z + cb[0][0]) * full[1] + (y + cb[1][0])) * full[2] + cb[2][0];
                out[d..d + cropped[2]].copy_from_slice(&src[s..s + cropped[2]]);
            }
        }
        out
    }
    Ok(match labels {
        LabelData::U8(v) => LabelData::U8(place(&v, cropped, full, cb)),
        LabelData::U16(v) => LabelData::U16(place(&v, cropped, full, cb)),
    })
}

/// Writes `seg` (on the preprocessed grid `shape`) as `<dir>/<case>.nii.gz` on the original
/// grid: same shape and affine as the source image.
pub fn write_prediction(
    dir: &Path,
    case: &str,
    seg: &[u16],
    shape: [usize; 3],
    original: &OriginalGrid,
) -> Result<PathBuf, TrainerError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    let labels = to_original_grid(seg, shape, original, case)?;
    let path = dir.join(format!("{case}.nii.gz"));
    let data = match labels {
        LabelData::U8(v) => VoxelData::U8(v),
        LabelData::U16(v) => VoxelData::U16(v),
    };
    write_nifti(&path, &original.geometry, &data)?;
    Ok(path)
}

/// The image of a volume as a `[C, Z, Y, X]` tensor.
pub fn volume_tensor(v: &Volume) -> Result<Tensor, TrainerError> {
    let [z, y, x] = v.shape.map(|e| e as i64);
    Tensor::f_from_slice(&v.image)
        .and_then(|t| t.f_reshape([v.channels as i64, z, y, x]))
        .ctx(&format!("image of case {}", v.id))
}

/// Validates `net` on `cases`: sliding-window logits, argmax, Dice per class against the stored
/// label (on the preprocessed grid; ignore-label voxels excluded). When `export` is given,
/// writes each prediction there on the original grid (cases without a known original grid are
/// skipped with a warning).
#[allow(clippy::too_many_arguments)]
pub fn validate(
    net: &UNet,
    loader: &mut dyn VolumeLoader,
    cases: &[String],
    num_classes: usize,
    ignore_label: u16,
    sw: &SlidingWindow,
    device: Device,
    autocast: bool,
    export: Option<&Path>,
) -> Result<ValidationReport, TrainerError> {
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(cases.len());
    for id in cases {
        let v = loader.load(id)?;
        let image = volume_tensor(&v)?;
        let logits = sliding_window_logits(net, &image, sw, device, autocast)
            .ctx(&format!("sliding-window inference on case {id}"))?;
        let seg = argmax_labels(&logits).ctx(&format!("argmax of case {id}"))?;
        let mut conf = Confusion::new(num_classes);
        conf.add(&seg, &v.label, Some(ignore_label));
        let dice: Vec<Option<f64>> = (0..num_classes).map(|c| conf.dice(c)).collect();
        let prediction = match (export, &v.original) {
            (Some(dir), Some(orig)) => Some(write_prediction(dir, id, &seg, v.shape, orig)?),
            (Some(_), None) => {
                tracing::warn!(case = %id, "original grid unknown: prediction not exported");
                None
            }
            _ => None,
        };
        tracing::debug!(case = %id, ?dice, "validated");
        out.push(CaseDice {
            id: id.clone(),
            dice,
            prediction,
        });
    }
    let mean_dice: Vec<Option<f64>> = (0..num_classes)
        .map(|c| {
            let vals: Vec<f64> = out.iter().filter_map(|cd| cd.dice[c]).collect();
            (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
        })
        .collect();
    let fg: Vec<f64> = mean_dice.iter().skip(1).flatten().copied().collect();
    let mean_foreground_dice = (!fg.is_empty()).then(|| fg.iter().sum::<f64>() / fg.len() as f64);
    Ok(ValidationReport {
        cases: out,
        mean_dice,
        mean_foreground_dice,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_volume::Geometry;

    fn grid(shape: [usize; 3], crop_box: [[usize; 2]; 3]) -> OriginalGrid {
        OriginalGrid {
            geometry: Geometry {
                shape,
                spacing: [1.0; 3],
                affine: [
                    [1.0, 0.0, 0.0, 0.0],
                    [0.0, 1.0, 0.0, 0.0],
                    [0.0, 0.0, 1.0, 0.0],
                    [0.0, 0.0, 0.0, 1.0],
                ],
            },
            crop_box,
        }
    }

    #[test]
    fn uncropping_places_the_segmentation_at_the_crop_box() {
        let seg: Vec<u16> = (0..2 * 2 * 3).map(|i| (i % 3 + 1) as u16).collect();
        let g = grid([4, 5, 6], [[1, 3], [2, 4], [3, 6]]);
        let LabelData::U8(out) = to_original_grid(&seg, [2, 2, 3], &g, "c").unwrap() else {
            panic!("expected u8 labels");
        };
        assert_eq!(out.len(), 4 * 5 * 6);
        let at = |z: usize, y: usize, x: usize| out[(z * 5 + y) * 6 + x];
        assert_eq!(at(1, 2, 3), 1);
        assert_eq!(at(1, 2, 5), 3);
        assert_eq!(at(2, 3, 4), seg[(2 + 1) * 3 + 1] as u8);
        assert_eq!(at(0, 0, 0), 0);
        let nonzero = out.iter().filter(|&&v| v != 0).count();
        assert_eq!(nonzero, 12);
    }

    #[test]
    fn resampled_segmentation_goes_back_to_the_cropped_shape() {
        // Preprocessed grid half the size of the crop along x.
        let seg = vec![1u16; 2 * 2 * 2];
        let g = grid([2, 2, 8], [[0, 2], [0, 2], [2, 6]]);
        let LabelData::U8(out) = to_original_grid(&seg, [2, 2, 2], &g, "c").unwrap() else {
            panic!("expected u8 labels");
        };
        let row: Vec<u8> = out[0..8].to_vec();
        assert_eq!(row, vec![0, 0, 1, 1, 1, 1, 0, 0]);
    }

    /// Two items of 1×1×4 voxels, three classes, the last voxel of the second item ignored.
    #[test]
    fn batch_confusion_counts_like_nnunet() {
        // Predicted classes per voxel, as one-hot logits.
        let pred: [[i64; 4]; 2] = [[0, 1, 1, 2], [2, 2, 0, 1]];
        let truth: [[i64; 4]; 2] = [[0, 1, 2, 2], [2, 1, 0, 255]];
        let mut logits = vec![0f32; 2 * 3 * 4];
        for (b, row) in pred.iter().enumerate() {
            for (v, &k) in row.iter().enumerate() {
                logits[(b * 3 + k as usize) * 4 + v] = 5.0;
            }
        }
        let logits = Tensor::from_slice(&logits).reshape([2, 3, 1, 1, 4]);
        let label = Tensor::from_slice(truth.as_flattened()).reshape([2, 1, 1, 1, 4]);
        let c = batch_confusion(&logits, &label, 3, 255).unwrap();
        // Class 1: tp at (0,1); fp at (0,2); fn at (1,1). Class 2: tp at (0,3), (1,0); fp at
        // (1,1); fn at (0,2). The ignored voxel (predicted 1) counts nowhere.
        assert_eq!((c.tp[1], c.fp[1], c.fn_[1]), (1, 1, 1));
        assert_eq!((c.tp[2], c.fp[2], c.fn_[2]), (2, 1, 1));
        assert_eq!((c.tp[0], c.fp[0], c.fn_[0]), (0, 0, 0));
        assert_eq!(c.dice(0), None);
        assert!((c.dice(2).unwrap() - 4.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn bad_crop_box_is_an_error() {
        let g = grid([2, 2, 2], [[0, 3], [0, 2], [0, 2]]);
        assert!(to_original_grid(&[0; 12], [3, 2, 2], &g, "c").is_err());
    }
}

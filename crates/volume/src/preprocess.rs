//! nnU-Net v2 preprocessing of one case: crop to non-zero, normalise, resample, class locations.
//!
//! # What is stored: the representation rule
//!
//! The store keeps what [`preprocess`] returns, and the two paths differ on purpose:
//!
//! * **Not resampled** (no target spacing, or every axis already within 0.1% of it): the image
//!   keeps its *source intensities* and the normalisation is returned as a deferred
//!   [`Normalization`] (clip bounds in source units, mean, `inv_std = 1 / max(std, 1e-8)`), which
//!   readers apply with [`Normalization::apply`] when they serve a patch. Integer images are
//!   narrowed to the smallest of `u8`, `i8`, `u16`, `i16`, `i32` that holds their range (an
//!   `int32` CT with HU values becomes `i16`); float images are stored as `f32` (`f64` is
//!   narrowed to `f32`). This is lossless for integer data and halves bytes and decode time
//!   against storing `f32`, and the served values are exactly nnU-Net's.
//! * **Resampled**: as nnU-Net does, each channel is normalised first, in `f32` with exactly
//!   [`Normalization::apply`], then resampled; the result is stored as `f32` and the recorded
//!   normalisation is the identity (with the channel's scheme kept for information).
//!
//! Labels are cropped (and resampled with nearest neighbour) the same way; class counts and
//! sampled class locations are computed on the final label map.
//!
//! # nnU-Net's `use_mask_for_norm`
//!
//! When the plan sets [`PreprocessPlan::use_mask_for_norm`] for a (z-scored) channel, the case
//! is handled as nnU-Net's `crop_to_nonzero` and `ZScoreNormalization` do (see the
//! [`mask`](crate::mask) module): label voxels that are 0 outside the hole-filled non-zero mask
//! get the marker [`PreprocessedCase::outside_mask_label`] (nnU-Net's −1), the channel's mean and
//! standard deviation come from the voxels without the marker, and voxels with the marker keep
//! their stored value, 0. In the deferred form, readers serve such voxels as 0 (label and
//! masked channels) instead of applying the normalisation; resampled cases are normalised inside
//! the mask only, then resampled, with the marker resampled as a label, exactly in nnU-Net's
//! order crop → normalise → resample. Class counts count marker voxels as background (class 0,
//! which they are served as) and class locations never hold them.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::VolumeError;
use crate::label::grid_difference;
use crate::locations::{case_seed, class_locations_outside_mask};
use crate::nifti::{MAX_VOXELS, NiftiImage};
use crate::resample::{
    Interp, Kernel, low_resolution_axis, needs_resampling, resample_f32, resample_labels,
    resampled_shape,
};
use crate::stats::{CtStats, MIN_STD};
use crate::types::{Element, Geometry, LabelData, NormScheme, Normalization, VoxelData};

/// One training case as read from disk: image channels on one grid and their label map.
#[derive(Clone, Debug)]
pub struct CaseInput {
    /// Case identifier (file name stem without the channel suffix).
    pub id: String,
    /// Image channels, all on the same grid.
    pub channels: Vec<NiftiImage>,
    /// Channel names as in `dataset.json` (`"CT"`, `"T2"`, ...), one per channel.
    pub channel_names: Vec<String>,
    /// Label map on the channels' grid.
    pub label: LabelData,
    /// Grid of the label file.
    pub label_geometry: Geometry,
}

/// Dataset-wide preprocessing decisions, one entry per channel where it applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreprocessPlan {
    /// Spacing `[z, y, x]` to resample to; `None` keeps each case's spacing.
    pub target_spacing: Option<[f64; 3]>,
    /// Normalisation scheme per channel.
    pub schemes: Vec<NormScheme>,
    /// Dataset CT statistics per channel (required for [`NormScheme::Ct`] channels).
    pub ct_stats: Vec<Option<CtStats>>,
    /// Interpolation of image channels.
    pub interp: Interp,
    /// Seed for class-location sampling (mixed with the case identifier).
    pub seed: u64,
    /// nnU-Net's `use_mask_for_norm` per channel: normalise over the non-zero mask and keep 0
    /// outside it. Only z-scored channels may use it; empty means no channel does.
    #[serde(default)]
    pub use_mask_for_norm: Vec<bool>,
}

impl PreprocessPlan {
    /// Whether channel `c` is normalised over the non-zero mask.
    pub fn masked(&self, c: usize) -> bool {
        self.use_mask_for_norm.get(c).copied().unwrap_or(false)
    }
}

/// A preprocessed case, ready for the store.
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessedCase {
    /// Case identifier.
    pub id: String,
    /// Voxels per axis after cropping and resampling, `[z, y, x]`.
    pub shape: [usize; 3],
    /// Voxel spacing after resampling, `[z, y, x]` (mm).
    pub spacing: [f64; 3],
    /// Grid of the original image (before cropping).
    pub original: Geometry,
    /// Crop in original voxel indices, `[start, end)` per axis `z, y, x`.
    pub crop_box: [[usize; 2]; 3],
    /// Channels in their stored representation (see the module documentation).
    pub channels: Vec<VoxelData>,
    /// Normalisation each reader applies per channel (identity when already applied).
    pub norms: Vec<Normalization>,
    /// Channel names.
    pub channel_names: Vec<String>,
    /// Label map on the output grid.
    pub label: LabelData,
    /// Voxel count per class present (class 0 always included).
    pub class_voxels: BTreeMap<u16, u64>,
    /// Sampled voxel coordinates `[z, y, x]` per foreground class, sorted by flat index.
    pub class_locations: BTreeMap<u16, Vec<[u32; 3]>>,
    /// Whether the case was resampled (and so is stored normalised, as `f32`).
    pub resampled: bool,
    /// The label value marking voxels outside nnU-Net's non-zero mask (nnU-Net's −1), when some
    /// channel used the mask for its normalisation; never a class of this case nor the label
    /// type's all-ones value.
    pub outside_mask_label: Option<u16>,
}

/// Maps every variant of a [`VoxelData`] to the same variant.
macro_rules! map_voxels {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            VoxelData::U8($v) => VoxelData::U8($body),
            VoxelData::I8($v) => VoxelData::I8($body),
            VoxelData::U16($v) => VoxelData::U16($body),
            VoxelData::I16($v) => VoxelData::I16($body),
            VoxelData::U32($v) => VoxelData::U32($body),
            VoxelData::I32($v) => VoxelData::I32($body),
            VoxelData::F32($v) => VoxelData::F32($body),
            VoxelData::F64($v) => VoxelData::F64($body),
        }
    };
}

/// Preprocesses one case as nnU-Net v2 does: crop to the non-zero bounding box of all channels,
/// normalise per channel, resample to the plan's spacing (images cubic/linear, with nearest along
/// the coarse axis of anisotropic cases; labels nearest), then count classes and sample class
/// locations. See the module documentation for the stored representation.
///
/// A case whose resampled grid would exceed [`MAX_VOXELS`](crate::MAX_VOXELS) voxels is refused
/// with [`VolumeError::InvalidCase`] before anything is resampled.
pub fn preprocess(
    input: &CaseInput,
    plan: &PreprocessPlan,
) -> Result<PreprocessedCase, VolumeError> {
    validate(input, plan)?;
    let original = input.channels[0].geometry.clone();
    let shape = original.shape;

    let crop_box = nonzero_crop_box(input, shape);
    let cropped_shape = crop_box.map(|[s, e]| e - s);

    let target = plan
        .target_spacing
        .filter(|&t| needs_resampling(original.spacing, t));
    if let Some(t) = target {
        check_resampled_size(input, cropped_shape, original.spacing, t)?;
    }

    let cropped: Vec<VoxelData> = input
        .channels
        .iter()
        .map(|c| map_voxels!(&c.data, v => crop(v, shape, crop_box)))
        .collect();
    let label = match &input.label {
        LabelData::U8(v) => LabelData::U8(crop(v, shape, crop_box)),
        LabelData::U16(v) => LabelData::U16(crop(v, shape, crop_box)),
    };

    // nnU-Net's crop_to_nonzero: background outside the filled non-zero mask gets the marker.
    let (label, outside_mask_label) = if plan.use_mask_for_norm.contains(&true) {
        let inside = crate::mask::filled_nonzero_mask(&cropped, cropped_shape);
        let (label, marker) = crate::mask::mark_outside_mask(label, &inside);
        (label, Some(marker))
    } else {
        (label, None)
    };

    // Normalisation per channel, computed on the cropped image (over the mask where asked).
    let norms: Vec<Normalization> = cropped
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let mask = outside_mask_label
                .filter(|_| plan.masked(i))
                .map(|m| (&label, m));
            channel_normalization(input, plan, i, data, mask)
        })
        .collect::<Result<_, _>>()?;

    let (out_shape, spacing, channels, norms, label) = match target {
        None => {
            let channels = cropped.into_iter().map(narrow_for_storage).collect();
            (cropped_shape, original.spacing, channels, norms, label)
        }
        Some(target) => {
            let out_shape = resampled_shape(cropped_shape, original.spacing, target);
            let mut kernels = [Kernel::from(plan.interp); 3];
            if let Some(axis) = low_resolution_axis(original.spacing, target) {
                kernels[axis] = Kernel::Nearest;
            }
            let channels = cropped
                .iter()
                .zip(&norms)
                .enumerate()
                .map(|(i, (data, norm))| {
                    let mask = outside_mask_label
                        .filter(|_| plan.masked(i))
                        .map(|m| (&label, m));
                    let normalised = normalise_f32(data, norm, mask);
                    VoxelData::F32(resample_f32(&normalised, cropped_shape, out_shape, kernels))
                })
                .collect();
            let norms = norms
                .iter()
                .map(|n| Normalization {
                    scheme: n.scheme,
                    ..Normalization::IDENTITY
                })
                .collect();
            let label = resample_labels(&label, cropped_shape, out_shape);
            (out_shape, target, channels, norms, label)
        }
    };
    let (class_voxels, class_locations) = class_locations_outside_mask(
        &label,
        out_shape,
        case_seed(plan.seed, &input.id),
        outside_mask_label,
    );
    tracing::debug!(
        case = %input.id,
        ?crop_box,
        ?out_shape,
        resampled = target.is_some(),
        ?outside_mask_label,
        "preprocessed case"
    );
    Ok(PreprocessedCase {
        id: input.id.clone(),
        shape: out_shape,
        spacing,
        original,
        crop_box,
        channels,
        norms,
        channel_names: input.channel_names.clone(),
        label,
        class_voxels,
        class_locations,
        resampled: target.is_some(),
        outside_mask_label,
    })
}

/// The box `[[start, end); 3]` holding the non-zero voxels of all channels of a case of
/// `shape`, nnU-Net's crop (the whole volume when everything is zero).
fn nonzero_crop_box(input: &CaseInput, shape: [usize; 3]) -> [[usize; 2]; 3] {
    input
        .channels
        .iter()
        .filter_map(|c| crate::with_voxels!(&c.data, v => nonzero_bbox(v, shape)))
        .reduce(|a, b| std::array::from_fn(|i| [a[i][0].min(b[i][0]), a[i][1].max(b[i][1])]))
        .unwrap_or([[0, shape[0]], [0, shape[1]], [0, shape[2]]])
}

/// Refuses an output grid beyond the reader's limit before any large buffer exists (a voxel
/// size in the wrong unit, e.g. micrometres, would otherwise ask for terabytes): the grid
/// `cropped_shape` at `spacing` resampled to `target`.
fn check_resampled_size(
    input: &CaseInput,
    cropped_shape: [usize; 3],
    spacing: [f64; 3],
    target: [f64; 3],
) -> Result<(), VolumeError> {
    let out_shape = resampled_shape(cropped_shape, spacing, target);
    let out_voxels = out_shape
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n))
        .filter(|&v| v <= MAX_VOXELS);
    if out_voxels.is_none() {
        return Err(VolumeError::InvalidCase {
            case: input.id.clone(),
            reason: format!(
                "resampling the cropped grid {cropped_shape:?} from spacing {spacing:?} mm to {target:?} mm gives {out_shape:?} voxels, more than the limit of {MAX_VOXELS}; check the voxel size (pixdim) of {}",
                input.channels[0].path.display()
            ),
        });
    }
    Ok(())
}

/// Checks that the case and the plan fit together before any work is done.
fn validate(input: &CaseInput, plan: &PreprocessPlan) -> Result<(), VolumeError> {
    let invalid = |reason: String| VolumeError::InvalidCase {
        case: input.id.clone(),
        reason,
    };
    let Some(first) = input.channels.first() else {
        return Err(invalid("no image channel".into()));
    };
    let n = input.channels.len();
    if input.channel_names.len() != n {
        return Err(invalid(format!(
            "{} channel names for {n} channels",
            input.channel_names.len()
        )));
    }
    if plan.schemes.len() != n || plan.ct_stats.len() != n {
        return Err(invalid(format!(
            "the plan has {} schemes and {} CT statistics for {n} channels",
            plan.schemes.len(),
            plan.ct_stats.len()
        )));
    }
    if !plan.use_mask_for_norm.is_empty() && plan.use_mask_for_norm.len() != n {
        return Err(invalid(format!(
            "the plan has {} use_mask_for_norm entries for {n} channels",
            plan.use_mask_for_norm.len()
        )));
    }
    for (i, scheme) in plan.schemes.iter().enumerate() {
        if plan.masked(i) && *scheme != NormScheme::ZScore {
            return Err(invalid(format!(
                "channel {i} ({}) has use_mask_for_norm with {scheme:?} normalisation; only z-scored channels use the non-zero mask (as in nnU-Net)",
                input.channel_names[i]
            )));
        }
    }
    for (i, c) in input.channels.iter().enumerate() {
        if c.data.len() != c.geometry.voxels() {
            return Err(invalid(format!(
                "channel {i} ({}) holds {} voxels for shape {:?}",
                c.path.display(),
                c.data.len(),
                c.geometry.shape
            )));
        }
        if let Some(detail) = grid_difference(&first.geometry, &c.geometry) {
            return Err(VolumeError::GridMismatch {
                a: first.path.clone(),
                b: c.path.clone(),
                detail,
            });
        }
    }
    if input.label.len() != input.label_geometry.voxels() {
        return Err(invalid(format!(
            "the label holds {} voxels for shape {:?}",
            input.label.len(),
            input.label_geometry.shape
        )));
    }
    if let Some(detail) = grid_difference(&first.geometry, &input.label_geometry) {
        return Err(invalid(format!(
            "the label is not on the grid of {}: {detail}",
            first.path.display()
        )));
    }
    if first
        .geometry
        .spacing
        .iter()
        .any(|s| !(s.is_finite() && *s > 0.0))
    {
        return Err(invalid(format!(
            "spacing {:?} must be positive and finite",
            first.geometry.spacing
        )));
    }
    if let Some(t) = plan.target_spacing
        && t.iter().any(|s| !(s.is_finite() && *s > 0.0))
    {
        return Err(invalid(format!(
            "target spacing {t:?} must be positive and finite"
        )));
    }
    Ok(())
}

/// The normalisation of channel `i` (deferred form: source units). `mask`: the marked label and
/// its marker when the channel is normalised over the non-zero mask.
fn channel_normalization(
    input: &CaseInput,
    plan: &PreprocessPlan,
    i: usize,
    data: &VoxelData,
    mask: Option<(&LabelData, u16)>,
) -> Result<Normalization, VolumeError> {
    Ok(match plan.schemes[i] {
        NormScheme::Ct => {
            let stats = plan.ct_stats[i].ok_or_else(|| VolumeError::InvalidCase {
                case: input.id.clone(),
                reason: format!(
                    "channel {i} ({}) uses CT normalisation but the plan has no CT statistics for it",
                    input.channel_names[i]
                ),
            })?;
            stats.normalization()
        }
        NormScheme::ZScore => {
            let (mean, std) = match mask {
                Some((label, marker)) => {
                    crate::with_voxels!(data, v => crate::mask::mean_std_inside(v, label, marker))
                }
                None => crate::with_voxels!(data, v => mean_std(v)),
            };
            Normalization {
                scheme: NormScheme::ZScore,
                clip: None,
                mean: mean as f32,
                inv_std: (1.0 / std.max(MIN_STD)) as f32,
            }
        }
        NormScheme::None => Normalization {
            scheme: NormScheme::None,
            ..Normalization::IDENTITY
        },
    })
}

/// Mean and population standard deviation in `f64` (two passes, for accuracy).
fn mean_std<T: Element>(v: &[T]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().map(|x| x.to_f64()).sum::<f64>() / n;
    let var = v.iter().map(|x| (x.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Converts to `f32` and applies the normalisation with exactly [`Normalization::apply`]; with
/// `mask` (the marked label and its marker), voxels with the marker keep their value (0) as
/// nnU-Net's `image[mask] = ...` leaves them.
fn normalise_f32(
    data: &VoxelData,
    norm: &Normalization,
    mask: Option<(&LabelData, u16)>,
) -> Vec<f32> {
    match mask {
        None => {
            crate::with_voxels!(data, v => v.iter().map(|x| norm.apply(x.to_f64() as f32)).collect())
        }
        Some((label, marker)) => crate::with_voxels!(data, v => v
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let x = x.to_f64() as f32;
                if label.get(i) == marker { x } else { norm.apply(x) }
            })
            .collect()),
    }
}

/// Bounding box `[start, end)` per axis of the non-zero voxels, `None` when all are zero.
pub fn nonzero_bbox<T: Copy + Default + PartialEq>(
    data: &[T],
    shape: [usize; 3],
) -> Option<[[usize; 2]; 3]> {
    let [_, ny, nx] = shape;
    if nx == 0 || data.len() != shape.iter().product::<usize>() {
        return None;
    }
    let zero = T::default();
    let mut bbox: Option<[[usize; 2]; 3]> = None;
    for (r, row) in data.chunks_exact(nx).enumerate() {
        let Some(first) = row.iter().position(|&v| v != zero) else {
            continue;
        };
        let last = row.iter().rposition(|&v| v != zero).unwrap_or(first);
        let (z, y) = (r / ny, r % ny);
        let b = bbox.get_or_insert([[z, z + 1], [y, y + 1], [first, last + 1]]);
        b[0][1] = z + 1;
        b[1] = [b[1][0].min(y), b[1][1].max(y + 1)];
        b[2] = [b[2][0].min(first), b[2][1].max(last + 1)];
    }
    bbox
}

/// Copies the box `[start, end)` per axis out of a `[z, y, x]` volume, row by row.
pub fn crop<T: Copy>(data: &[T], shape: [usize; 3], bbox: [[usize; 2]; 3]) -> Vec<T> {
    let [_, ny, nx] = shape;
    let [[z0, z1], [y0, y1], [x0, x1]] = bbox;
    let mut out = Vec::with_capacity((z1 - z0) * (y1 - y0) * (x1 - x0));
    for z in z0..z1 {
        for y in y0..y1 {
            let start = (z * ny + y) * nx;
            out.extend_from_slice(&data[start + x0..start + x1]);
        }
    }
    out
}

/// The stored form of unresampled intensities: integers narrowed to the smallest of `u8`, `i8`,
/// `u16`, `i16`, `i32` that holds their range (`u32` values beyond `i32` stay `u32`), `f64`
/// narrowed to `f32`, `f32` unchanged.
pub fn narrow_for_storage(data: VoxelData) -> VoxelData {
    /// The narrowest integer form of integer voxels, `None` when not even `i32` holds them.
    fn narrowest<T: Element>(v: &[T]) -> Option<VoxelData> {
        // Every candidate type holds 0, so starting the range at 0 never changes the choice.
        let (lo, hi) = v.iter().fold((0.0f64, 0.0f64), |(lo, hi), x| {
            let x = x.to_f64();
            (lo.min(x), hi.max(x))
        });
        let fits = |min: f64, max: f64| lo >= min && hi <= max;
        Some(if fits(0.0, f64::from(u8::MAX)) {
            VoxelData::U8(v.iter().map(|x| x.to_f64() as u8).collect())
        } else if fits(f64::from(i8::MIN), f64::from(i8::MAX)) {
            VoxelData::I8(v.iter().map(|x| x.to_f64() as i8).collect())
        } else if fits(0.0, f64::from(u16::MAX)) {
            VoxelData::U16(v.iter().map(|x| x.to_f64() as u16).collect())
        } else if fits(f64::from(i16::MIN), f64::from(i16::MAX)) {
            VoxelData::I16(v.iter().map(|x| x.to_f64() as i16).collect())
        } else if fits(f64::from(i32::MIN), f64::from(i32::MAX)) {
            VoxelData::I32(v.iter().map(|x| x.to_f64() as i32).collect())
        } else {
            return None;
        })
    }
    match data {
        VoxelData::U8(_) | VoxelData::F32(_) => data,
        VoxelData::F64(v) => VoxelData::F32(v.iter().map(|&x| x as f32).collect()),
        _ => match crate::with_voxels!(&data, v => narrowest(v)) {
            Some(n) if n.dtype() != data.dtype() => n,
            _ => data,
        },
    }
}

/// A case whose channels are the given images and whose label is read from `label_path`; checks
/// the label grid against the first channel. A convenience for tools and tests.
pub fn load_case(
    id: &str,
    channel_paths: &[&Path],
    channel_names: &[&str],
    label_path: &Path,
) -> Result<CaseInput, VolumeError> {
    let channels = channel_paths
        .iter()
        .map(|p| crate::nifti::read_nifti(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (label_geometry, label) = crate::label::read_label(label_path)?;
    if let Some(first) = channels.first() {
        crate::label::check_same_grid(&first.geometry, &label_geometry, &first.path, label_path)?;
    }
    Ok(CaseInput {
        id: id.to_string(),
        channels,
        channel_names: channel_names.iter().map(|s| s.to_string()).collect(),
        label,
        label_geometry,
    })
}

#[cfg(test)]
mod tests;

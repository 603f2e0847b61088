//! Items with training augmentation: read the source region the drawn transforms need (image
//! normalised to `f32`, labels in the served type), apply them, convert into the batch buffer.

use std::sync::Mutex;

use patchflow_augment::{AugmentError, AugmentParams, Label, Scratch, Source, Target, apply};
use patchflow_store::ArrayId;
use patchflow_volume::DType;

use crate::SamplerError;
use crate::convert::{ImageRuns, LabelRuns, OutputDType, write_f32};
use crate::dataset::{CaseRef, Dataset};
use crate::outside::{MarkerLabel, OutsideMask};
use crate::request::{BatchRequest, ItemMeta};
use crate::visit::visit_into;

/// One item of an augmented batch: its placement and its slices of the batch buffers.
pub(crate) struct ItemTask<'a> {
    pub meta: &'a ItemMeta,
    /// `C * Z * Y * X` elements of the request's dtype.
    pub image: &'a mut [u8],
    /// `Z * Y * X` elements of the dataset's label dtype.
    pub label: &'a mut [u8],
}

/// Working buffers of one item; reused, so a warm sampler does not allocate per item.
#[derive(Debug, Default)]
pub(crate) struct ItemScratch {
    src_img: Vec<f32>,
    src_lab8: Vec<u8>,
    src_lab16: Vec<u16>,
    out_img: Vec<f32>,
    out_lab16: Vec<u16>,
    augment: Scratch,
}

/// Item scratch buffers shared by the worker threads (one is in use per running item).
#[derive(Debug, Default)]
pub(crate) struct ScratchPool {
    free: Mutex<Vec<ItemScratch>>,
}

/// Buffers kept for reuse at most; more concurrent items than this allocate and release theirs.
const MAX_POOLED: usize = 64;

impl ScratchPool {
    pub(crate) fn take(&self) -> ItemScratch {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.pop().unwrap_or_default()
    }

    pub(crate) fn give(&self, scratch: ItemScratch) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < MAX_POOLED {
            free.push(scratch);
        }
    }
}

fn grow<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Reads the source region of `task` from `view` (a case of `ds`), augments it and writes the
/// item into the batch buffers.
pub(crate) fn fill_item(
    ds: &Dataset,
    view: CaseRef<'_>,
    req: &BatchRequest,
    task: ItemTask<'_>,
    scratch: &mut ItemScratch,
) -> Result<(), SamplerError> {
    let meta = task.meta;
    let case_err = |reason: String| SamplerError::Case {
        case: meta.case_id.clone(),
        reason,
    };
    let params = meta.augment.as_ref().ok_or_else(|| {
        SamplerError::invalid(
            "augment",
            format!("item of case {} has no drawn augmentation", meta.case_id),
        )
    })?;
    let reader = view.reader;
    let channels = ds.num_channels();
    let patch = req.patch.axes();
    let (offset, size) = patchflow_augment::source_box(params, patch);
    let mut origin = [0i64; 3];
    for a in 0..3 {
        origin[a] = meta.origin[a]
            .checked_add(offset[a])
            .ok_or_else(|| case_err(format!("source region origin overflows on axis {a}")))?;
    }
    let n_src = size
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .and_then(|n| n.checked_mul(channels.max(1)).map(|_| n))
        .ok_or_else(|| case_err(format!("source region {size:?} overflows")))?;

    let ItemScratch {
        src_img,
        src_lab8,
        src_lab16,
        out_img,
        out_lab16,
        augment,
    } = scratch;
    let src_img = grow(src_img, channels * n_src);
    read_source_image(view, channels, (origin, size), src_img, &case_err)?;
    let outside = view.info.outside.as_ref();

    let runs = LabelRuns {
        stored: view.info.label_dtype,
        out: ds.label_dtype(),
        remap: view.info.label_remap,
    };
    let ignore = ds.ignore_label();
    let image_out = ImageOut {
        dtype: req.dtype,
        image: task.image,
        scratch: out_img,
    };
    let augmented = match ds.label_dtype() {
        DType::U16 => {
            let lab = grow(src_lab16, n_src);
            visit_into(
                reader,
                ArrayId::Label,
                origin,
                size,
                bytemuck::cast_slice_mut(lab),
                &runs,
            )?
            .map_err(|reason| case_err(format!("reading label: {reason}")))?;
            if let Some(o) = outside {
                o.zero_source(src_img, lab);
            }
            match bytemuck::try_cast_slice_mut::<u8, u16>(task.label) {
                Ok(out_lab) => augment_into(
                    params, src_img, lab, size, patch, image_out, out_lab, ignore, outside, augment,
                ),
                Err(_) => {
                    let n_out = task.label.len() / 2;
                    let tmp = grow(out_lab16, n_out);
                    let r = augment_into(
                        params, src_img, lab, size, patch, image_out, tmp, ignore, outside, augment,
                    );
                    for (d, v) in task.label.chunks_exact_mut(2).zip(tmp.iter()) {
                        d.copy_from_slice(&v.to_le_bytes());
                    }
                    r
                }
            }
        }
        _ => {
            let lab = grow(src_lab8, n_src);
            visit_into(reader, ArrayId::Label, origin, size, lab, &runs)?
                .map_err(|reason| case_err(format!("reading label: {reason}")))?;
            if let Some(o) = outside {
                o.zero_source(src_img, lab);
            }
            let ignore = u8::try_from(ignore).unwrap_or(u8::MAX);
            augment_into(
                params, src_img, lab, size, patch, image_out, task.label, ignore, outside, augment,
            )
        }
    };
    augmented.map_err(|e| case_err(format!("augmentation: {e}")))
}

/// Reads every image channel of the source box `(origin, size)` of `view`, normalised to `f32`,
/// into `out` (channel after channel, `size` voxels each).
fn read_source_image(
    view: CaseRef<'_>,
    channels: usize,
    (origin, size): ([i64; 3], [usize; 3]),
    out: &mut [f32],
    case_err: &dyn Fn(String) -> SamplerError,
) -> Result<(), SamplerError> {
    let n_src = out.len() / channels.max(1);
    for c in 0..channels {
        let Some(&(stored, norm)) = view.info.channels.get(c) else {
            return Err(case_err(format!("no image channel {c}")));
        };
        let array = ArrayId::Image(c);
        let out: &mut [u8] = bytemuck::cast_slice_mut(&mut out[c * n_src..(c + 1) * n_src]);
        macro_rules! read {
            ($t:ty) => {
                visit_into(
                    view.reader,
                    array,
                    origin,
                    size,
                    out,
                    &ImageRuns::<$t>::new(norm, OutputDType::F32),
                )
            };
        }
        let result = match stored {
            DType::U8 => read!(u8),
            DType::I8 => read!(i8),
            DType::U16 => read!(u16),
            DType::I16 => read!(i16),
            DType::U32 => read!(u32),
            DType::I32 => read!(i32),
            DType::F32 => read!(f32),
            DType::F64 => read!(f64),
        };
        result?.map_err(|reason| case_err(format!("reading {array}: {reason}")))?;
    }
    Ok(())
}

/// Where the augmented image goes: straight into the batch buffer when it is aligned `f32`,
/// otherwise through `scratch` and a conversion.
struct ImageOut<'a> {
    dtype: OutputDType,
    image: &'a mut [u8],
    scratch: &'a mut Vec<f32>,
}

/// Augments one item; with `outside`, the source image must already be 0 at the marker, and
/// the marker becomes label 0 after the transforms (nnU-Net's `RemoveLabelTansform(-1, 0)` at
/// the end of its pipeline).
#[allow(clippy::too_many_arguments)]
fn augment_into<L: Label + MarkerLabel>(
    params: &AugmentParams,
    src_img: &[f32],
    src_lab: &[L],
    size: [usize; 3],
    patch: [usize; 3],
    out: ImageOut<'_>,
    out_lab: &mut [L],
    ignore: L,
    outside: Option<&OutsideMask>,
    scratch: &mut Scratch,
) -> Result<(), AugmentError> {
    augment_spatial_and_intensity(
        params, src_img, src_lab, size, patch, out, out_lab, ignore, scratch,
    )?;
    if let Some(o) = outside {
        o.clear_label(out_lab);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn augment_spatial_and_intensity<L: Label>(
    params: &AugmentParams,
    src_img: &[f32],
    src_lab: &[L],
    size: [usize; 3],
    patch: [usize; 3],
    out: ImageOut<'_>,
    out_lab: &mut [L],
    ignore: L,
    scratch: &mut Scratch,
) -> Result<(), AugmentError> {
    let source = Source {
        image: src_img,
        label: src_lab,
        shape: size,
    };
    if out.dtype == OutputDType::F32
        && let Ok(direct) = bytemuck::try_cast_slice_mut::<u8, f32>(out.image)
    {
        return apply(
            params,
            &source,
            &mut Target {
                image: direct,
                label: out_lab,
                shape: patch,
            },
            ignore,
            scratch,
        );
    }
    let n = out.image.len() / out.dtype.size();
    let tmp = grow(out.scratch, n);
    apply(
        params,
        &source,
        &mut Target {
            image: tmp,
            label: out_lab,
            shape: patch,
        },
        ignore,
        scratch,
    )?;
    write_f32(tmp, out.dtype, out.image);
    Ok(())
}

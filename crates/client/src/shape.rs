//! The shape of a batch as its header announces it, checked once for every form a batch takes
//! (served, compact, in shared memory).

use patchflow_proto::v1 as pb;

pub use pb::{ImageDtype, LabelDtype};

/// Bytes per element of an image dtype.
pub fn image_dtype_size(dtype: ImageDtype) -> Option<usize> {
    match dtype {
        ImageDtype::F32 => Some(4),
        ImageDtype::F16 | ImageDtype::Bf16 => Some(2),
        ImageDtype::Unspecified => None,
    }
}

/// Bytes per element of a label dtype.
pub fn label_dtype_size(dtype: LabelDtype) -> Option<usize> {
    match dtype {
        LabelDtype::U8 => Some(1),
        LabelDtype::U16 => Some(2),
        LabelDtype::Unspecified => None,
    }
}

/// The shape of a batch as its header announces it, checked: what every batch, served or
/// compact, is handed out as.
pub(crate) struct Shape {
    /// Patch size `[z, y, x]`.
    pub patch: [usize; 3],
    /// Items (B).
    pub batch_size: usize,
    /// Image channels (C).
    pub channels: usize,
    /// Element type of the image buffer.
    pub dtype: ImageDtype,
    /// Element type of the label buffer.
    pub label_dtype: LabelDtype,
    /// Bytes per label element.
    pub label_size: usize,
    /// Bytes of the image buffer (`B * C * Z * Y * X` elements).
    pub image_bytes: usize,
    /// Bytes of the label buffer (`B * Z * Y * X` elements).
    pub label_bytes: usize,
}

impl Shape {
    /// The shape `header` of batch `index` announces, with one item description per item; an
    /// error names what is wrong with it.
    pub fn of(index: u64, header: &pb::BatchHeader) -> Result<Shape, String> {
        let patch: [usize; 3] = match header.patch_size.as_slice() {
            &[z, y, x] => [z as usize, y as usize, x as usize],
            other => {
                return Err(format!(
                    "batch {index}: patch size {other:?} is not [z, y, x]"
                ));
            }
        };
        let dtype = ImageDtype::try_from(header.dtype)
            .map_err(|_| format!("batch {index}: unknown image dtype {}", header.dtype))?;
        let label_dtype = LabelDtype::try_from(header.label_dtype)
            .map_err(|_| format!("batch {index}: unknown label dtype {}", header.label_dtype))?;
        let image_size = image_dtype_size(dtype)
            .ok_or_else(|| format!("batch {index}: image dtype is unspecified"))?;
        let label_size = label_dtype_size(label_dtype)
            .ok_or_else(|| format!("batch {index}: label dtype is unspecified"))?;
        let batch_size = header.batch_size as usize;
        if header.items.len() != batch_size {
            return Err(format!(
                "batch {index}: {} item descriptions for {batch_size} items",
                header.items.len()
            ));
        }
        let channels = header.channels as usize;
        let overflows = || format!("batch {index}: shape overflows");
        let voxels = patch
            .iter()
            .try_fold(batch_size, |acc, &p| acc.checked_mul(p))
            .ok_or_else(overflows)?;
        let image_bytes = voxels
            .checked_mul(channels)
            .and_then(|v| v.checked_mul(image_size))
            .ok_or_else(overflows)?;
        let label_bytes = voxels.checked_mul(label_size).ok_or_else(overflows)?;
        Ok(Shape {
            patch,
            batch_size,
            channels,
            dtype,
            label_dtype,
            label_size,
            image_bytes,
            label_bytes,
        })
    }

    /// Voxels of one patch.
    pub fn voxels(&self) -> usize {
        self.patch.iter().product()
    }
}

//! Batches received in a compact wire form (proto `WireOptions`), turned into the buffers a
//! daemon would otherwise have sent: items in their stored integer type normalised with
//! [`patchflow_volume::convert`] (the sampler's own conversion, so every voxel has the bits the
//! daemon's sampler gives), zstd label frames decompressed.
//!
//! The conversion is the caller's work: [`crate::BatchStream::next`] does it on the consumer's
//! side, not on the runtime's receive path, so lanes keep reading while a batch is converted.
//!
//! It owns the decoding of the compact forms; it must not check message order (the assembler
//! does) nor decide which forms to ask for ([`crate::ClientOptions::compact`]).

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use patchflow_proto::buffers::BufferPool;
use patchflow_proto::v1 as pb;
use patchflow_volume::convert::{OutputDType, convert_box, inside};
use patchflow_volume::{DType, NormScheme, Normalization};

use crate::batch::{Batch, ImageDtype, LabelDtype, finish, label_dtype_size};

/// A complete batch as it arrived: buffers in their wire form.
pub(crate) struct Received {
    /// Batch index.
    pub index: u64,
    header: pb::BatchHeader,
    image: Bytes,
    label: Bytes,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("index", &self.index)
            .field("image_bytes", &self.image.len())
            .field("label_bytes", &self.label.len())
            .finish_non_exhaustive()
    }
}

impl Received {
    /// A batch whose header says some part of it is compact.
    pub fn new(index: u64, header: pb::BatchHeader, image: Bytes, label: Bytes) -> Received {
        Received {
            index,
            header,
            image,
            label,
        }
    }

    /// Whether `header` announces a compact form (stored items or compressed labels).
    pub fn is_compact(header: &pb::BatchHeader) -> bool {
        header.label_encoding != pb::LabelEncoding::Raw as i32
            || header.items.iter().any(|i| i.stored.is_some())
    }

    /// Converts the batch into served buffers (taken from `pool`, to which they return when the
    /// caller drops the batch) and checks it as any batch is checked.
    pub fn finish(self, pool: &Arc<BufferPool>) -> Result<Batch, String> {
        let Received {
            index,
            mut header,
            image,
            label,
        } = self;
        let image = served_image(index, &header, &image, pool)?;
        let label = served_label(index, &header, &label, pool)?;
        header.image_bytes = image.len() as u64;
        header.label_bytes = label.len() as u64;
        header.label_encoding = pb::LabelEncoding::Raw as i32;
        for item in &mut header.items {
            item.stored = None;
        }
        finish(index, header, image, label)
    }
}

thread_local! {
    /// A decompression context per converting thread, reused: creating one costs more than
    /// decompressing a batch's labels.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Patch `[z, y, x]`, items and channels of `header`, checked.
fn geometry(index: u64, header: &pb::BatchHeader) -> Result<([usize; 3], usize, usize), String> {
    let patch: [usize; 3] = match header.patch_size.as_slice() {
        &[z, y, x] => [z as usize, y as usize, x as usize],
        other => {
            return Err(format!(
                "batch {index}: patch size {other:?} is not [z, y, x]"
            ));
        }
    };
    Ok((patch, header.batch_size as usize, header.channels as usize))
}

/// The element type of a stored item (integer types only: the daemon sends no other).
fn stored_dtype(index: u64, name: &str) -> Result<DType, String> {
    match name {
        "u8" => Ok(DType::U8),
        "i8" => Ok(DType::I8),
        "u16" => Ok(DType::U16),
        "i16" => Ok(DType::I16),
        other => Err(format!(
            "batch {index}: stored item type {other:?} is not one of u8, i8, u16, i16"
        )),
    }
}

/// A channel's normalisation as the sampler applies it (the scheme name does not enter the
/// formula).
fn norm_of(n: &pb::Normalization) -> Normalization {
    Normalization {
        scheme: match n.scheme.as_str() {
            "ct" => NormScheme::Ct,
            "zscore" => NormScheme::ZScore,
            _ => NormScheme::None,
        },
        clip: n.has_clip.then_some([n.clip_lo, n.clip_hi]),
        mean: n.mean,
        inv_std: n.inv_std,
    }
}

/// The image buffer as served: stored items converted, served items copied.
fn served_image(
    index: u64,
    header: &pb::BatchHeader,
    wire: &[u8],
    pool: &Arc<BufferPool>,
) -> Result<Bytes, String> {
    let (patch, batch, channels) = geometry(index, header)?;
    let out = match ImageDtype::try_from(header.dtype) {
        Ok(ImageDtype::F32) => OutputDType::F32,
        Ok(ImageDtype::F16) => OutputDType::F16,
        Ok(ImageDtype::Bf16) => OutputDType::BF16,
        _ => {
            return Err(format!(
                "batch {index}: image dtype {} is not f32, f16 or bf16",
                header.dtype
            ));
        }
    };
    if header.items.len() != batch {
        return Err(format!(
            "batch {index}: {} item descriptions for {batch} items",
            header.items.len()
        ));
    }
    let voxels = patch
        .iter()
        .try_fold(channels, |acc, &p| acc.checked_mul(p))
        .ok_or_else(|| format!("batch {index}: shape overflows"))?;
    let served_item = voxels * out.size();
    let total = served_item
        .checked_mul(batch)
        .ok_or_else(|| format!("batch {index}: shape overflows"))?;
    // Every byte is written below: a recycled buffer keeps its old bytes until then.
    let mut image = pool.take(total);
    if image.len() >= total {
        image.truncate(total);
    } else {
        image.resize(total, 0);
    }
    let mut offset = 0usize;
    let short = |need: usize| {
        format!(
            "batch {index}: the image buffer has {} bytes, its items need at least {need}",
            wire.len()
        )
    };
    for (item, dst) in header
        .items
        .iter()
        .zip(image.chunks_exact_mut(served_item.max(1)))
    {
        let Some(stored) = &item.stored else {
            let src = wire
                .get(offset..offset + served_item)
                .ok_or_else(|| short(offset + served_item))?;
            dst.copy_from_slice(src);
            offset += served_item;
            continue;
        };
        let dtype = stored_dtype(index, &stored.dtype)?;
        let shape: [usize; 3] = match stored.shape.as_slice() {
            &[z, y, x] => [z as usize, y as usize, x as usize],
            other => {
                return Err(format!(
                    "batch {index}: case shape {other:?} is not [z, y, x]"
                ));
            }
        };
        let origin: [i64; 3] = item.origin.as_slice().try_into().map_err(|_| {
            format!(
                "batch {index}: item origin {:?} is not [z, y, x]",
                item.origin
            )
        })?;
        if stored.normalization.len() != channels {
            return Err(format!(
                "batch {index}: {} normalisations for {channels} channels",
                stored.normalization.len()
            ));
        }
        let len = voxels * dtype.size();
        let src = wire
            .get(offset..offset + len)
            .ok_or_else(|| short(offset + len))?;
        offset += len;
        let region = inside(origin, patch, shape);
        let per_channel = len / channels.max(1);
        for ((s, d), n) in src
            .chunks_exact(per_channel.max(1))
            .zip(dst.chunks_exact_mut((served_item / channels.max(1)).max(1)))
            .zip(&stored.normalization)
        {
            convert_box(dtype, s, &norm_of(n), out, patch, &region, d)
                .map_err(|e| format!("batch {index}: stored item does not convert: {e:?}"))?;
        }
    }
    if offset != wire.len() {
        return Err(format!(
            "batch {index}: the image buffer has {} bytes, its items take {offset}",
            wire.len()
        ));
    }
    Ok(pool.share(image))
}

/// The label buffer as served: a zstd frame decompressed, a raw buffer copied.
fn served_label(
    index: u64,
    header: &pb::BatchHeader,
    wire: &Bytes,
    pool: &Arc<BufferPool>,
) -> Result<Bytes, String> {
    let (patch, batch, _) = geometry(index, header)?;
    let size = LabelDtype::try_from(header.label_dtype)
        .ok()
        .and_then(label_dtype_size)
        .ok_or_else(|| format!("batch {index}: unknown label dtype {}", header.label_dtype))?;
    let want = patch
        .iter()
        .try_fold(batch * size, |acc, &p| acc.checked_mul(p))
        .ok_or_else(|| format!("batch {index}: shape overflows"))?;
    match pb::LabelEncoding::try_from(header.label_encoding) {
        Ok(pb::LabelEncoding::Raw) => Ok(wire.clone()),
        Ok(pb::LabelEncoding::Zstd) => {
            let mut label = pool.take(want);
            label.clear();
            label.reserve(want);
            DECOMPRESSOR
                .with_borrow_mut(|d| {
                    let d = match d {
                        Some(d) => d,
                        None => d.insert(zstd::bulk::Decompressor::new()?),
                    };
                    d.decompress_to_buffer(wire, &mut label)
                })
                .map_err(|e| format!("batch {index}: the label frame does not decompress: {e}"))?;
            if label.len() != want {
                return Err(format!(
                    "batch {index}: the label frame holds {} bytes, expected {want}",
                    label.len()
                ));
            }
            Ok(pool.share(label))
        }
        Err(_) => Err(format!(
            "batch {index}: unknown label encoding {}",
            header.label_encoding
        )),
    }
}

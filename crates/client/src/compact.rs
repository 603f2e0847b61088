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
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use patchflow_proto::buffers::BufferPool;
use patchflow_proto::v1 as pb;
use patchflow_volume::convert::{
    OutputDType, STORED_TYPES, convert_box, expand_box, inside, region_voxels, sized,
};
use patchflow_volume::{DType, NormScheme, Normalization};

use crate::shape::Shape;

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
    /// caller drops the batch): its index, the header of the served batch, image and label, for
    /// the checks every batch goes through.
    pub fn convert(
        self,
        pool: &Arc<BufferPool>,
    ) -> Result<(u64, pb::BatchHeader, Bytes, Bytes), String> {
        let Received {
            index,
            mut header,
            image,
            label,
        } = self;
        let layout = Layout::of(index, &header)?;
        let image = layout.image(&image, pool)?;
        let label = layout.label(&header, &label, pool)?;
        header.image_bytes = image.len() as u64;
        header.label_bytes = label.len() as u64;
        header.label_encoding = pb::LabelEncoding::Raw as i32;
        for item in &mut header.items {
            item.stored = None;
        }
        Ok((index, header, image, label))
    }
}

thread_local! {
    /// A decompression context per converting thread, reused: creating one costs more than
    /// decompressing a batch's labels.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// An item sent in its stored type: what its conversion needs.
struct StoredPart {
    dtype: DType,
    norms: Vec<Normalization>,
    /// The part of the patch inside the case's volume: the only voxels that travel.
    region: [Range<usize>; 3],
}

/// The shape of a compact batch as its header announces it, checked once.
struct Layout {
    index: u64,
    patch: [usize; 3],
    channels: usize,
    /// Voxels of one patch.
    voxels: usize,
    out: OutputDType,
    label_size: usize,
    /// Per item: `Some` when it travels in its stored type.
    items: Vec<Option<StoredPart>>,
}

impl Layout {
    fn of(index: u64, header: &pb::BatchHeader) -> Result<Layout, String> {
        let shape = Shape::of(index, header)?;
        let (patch, channels) = (shape.patch, shape.channels);
        let out = match shape.dtype {
            pb::ImageDtype::F32 => OutputDType::F32,
            pb::ImageDtype::F16 => OutputDType::F16,
            pb::ImageDtype::Bf16 => OutputDType::BF16,
            pb::ImageDtype::Unspecified => {
                return Err(format!("batch {index}: image dtype is unspecified"));
            }
        };
        let items = header
            .items
            .iter()
            .map(|item| Self::stored_part(index, item, patch, channels))
            .collect::<Result<_, _>>()?;
        Ok(Layout {
            index,
            patch,
            channels,
            voxels: shape.voxels(),
            out,
            label_size: shape.label_size,
            items,
        })
    }

    fn stored_part(
        index: u64,
        item: &pb::ItemInfo,
        patch: [usize; 3],
        channels: usize,
    ) -> Result<Option<StoredPart>, String> {
        let Some(stored) = &item.stored else {
            return Ok(None);
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
        Ok(Some(StoredPart {
            dtype,
            norms: stored.normalization.iter().map(norm_of).collect(),
            region: inside(origin, patch, shape),
        }))
    }

    fn too_short(&self, what: &str, has: usize, need: usize) -> String {
        format!(
            "batch {}: the {what} buffer has {has} bytes, its items need at least {need}",
            self.index
        )
    }

    fn leftover(&self, what: &str, has: usize, used: usize) -> Result<(), String> {
        if has != used {
            return Err(format!(
                "batch {}: the {what} buffer has {has} bytes, its items take {used}",
                self.index
            ));
        }
        Ok(())
    }

    /// The image buffer as served: stored items converted, served items copied.
    fn image(&self, wire: &[u8], pool: &Arc<BufferPool>) -> Result<Bytes, String> {
        let served_channel = self.voxels * self.out.size();
        let served_item = served_channel * self.channels;
        // Every byte is written below: a recycled buffer keeps its old bytes until then.
        let len = served_item * self.items.len();
        let mut image = sized(pool.take(len), len, false);
        let mut offset = 0usize;
        for (part, dst) in self
            .items
            .iter()
            .zip(image.chunks_exact_mut(served_item.max(1)))
        {
            let Some(part) = part else {
                let src = wire
                    .get(offset..offset + served_item)
                    .ok_or_else(|| self.too_short("image", wire.len(), offset + served_item))?;
                dst.copy_from_slice(src);
                offset += served_item;
                continue;
            };
            // Only the region inside the volume travels, channel after channel.
            let per_channel = region_voxels(&part.region) * part.dtype.size();
            for (c, norm) in part.norms.iter().enumerate() {
                let src = wire
                    .get(offset..offset + per_channel)
                    .ok_or_else(|| self.too_short("image", wire.len(), offset + per_channel))?;
                offset += per_channel;
                let d = &mut dst[c * served_channel..(c + 1) * served_channel];
                convert_box(part.dtype, src, norm, self.out, self.patch, &part.region, d).map_err(
                    |e| format!("batch {}: stored item does not convert: {e:?}", self.index),
                )?;
            }
        }
        self.leftover("image", wire.len(), offset)?;
        Ok(pool.share(image))
    }

    /// The label buffer as served: a zstd frame decompressed, stored items' regions padded with
    /// the ignore label.
    fn label(
        &self,
        header: &pb::BatchHeader,
        wire: &Bytes,
        pool: &Arc<BufferPool>,
    ) -> Result<Bytes, String> {
        let index = self.index;
        let served_item = self.voxels * self.label_size;
        let sent: usize = self
            .items
            .iter()
            .map(|p| {
                p.as_ref()
                    .map_or(served_item, |p| region_voxels(&p.region) * self.label_size)
            })
            .sum();
        let raw = match pb::LabelEncoding::try_from(header.label_encoding) {
            Ok(pb::LabelEncoding::Raw) => wire.clone(),
            Ok(pb::LabelEncoding::Zstd) => {
                let mut label = pool.take(sent);
                label.clear();
                label.reserve(sent);
                DECOMPRESSOR
                    .with_borrow_mut(|d| {
                        let d = match d {
                            Some(d) => d,
                            None => d.insert(zstd::bulk::Decompressor::new()?),
                        };
                        d.decompress_to_buffer(wire, &mut label)
                    })
                    .map_err(|e| {
                        format!("batch {index}: the label frame does not decompress: {e}")
                    })?;
                if label.len() != sent {
                    return Err(format!(
                        "batch {index}: the label frame holds {} bytes, expected {sent}",
                        label.len()
                    ));
                }
                pool.share(label)
            }
            Err(_) => {
                return Err(format!(
                    "batch {index}: unknown label encoding {}",
                    header.label_encoding
                ));
            }
        };
        if self.items.iter().all(Option::is_none) {
            self.leftover("label", raw.len(), served_item * self.items.len())?;
            return Ok(raw);
        }
        let len = served_item * self.items.len();
        let mut label = sized(pool.take(len), len, false);
        let mut offset = 0usize;
        for (part, dst) in self
            .items
            .iter()
            .zip(label.chunks_exact_mut(served_item.max(1)))
        {
            let len = part
                .as_ref()
                .map_or(served_item, |p| region_voxels(&p.region) * self.label_size);
            let src = raw
                .get(offset..offset + len)
                .ok_or_else(|| self.too_short("label", raw.len(), offset + len))?;
            offset += len;
            match part {
                None => dst.copy_from_slice(src),
                Some(p) => expand_box(self.label_size, src, self.patch, &p.region, 0xFF, dst)
                    .map_err(|e| format!("batch {index}: stored item's labels: {e:?}"))?,
            }
        }
        self.leftover("label", raw.len(), offset)?;
        Ok(pool.share(label))
    }
}

/// The element type of a stored item (one of [`STORED_TYPES`]: the daemon sends no other).
fn stored_dtype(index: u64, name: &str) -> Result<DType, String> {
    STORED_TYPES
        .into_iter()
        .find(|d| d.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = STORED_TYPES.iter().map(|d| d.name()).collect();
            format!(
                "batch {index}: stored item type {name:?} is not one of {}",
                names.join(", ")
            )
        })
}

/// A channel's normalisation as the sampler applies it (the scheme name does not enter the
/// formula).
fn norm_of(n: &pb::Normalization) -> Normalization {
    Normalization {
        scheme: NormScheme::from_name(&n.scheme).unwrap_or(NormScheme::None),
        clip: n.has_clip.then_some([n.clip_lo, n.clip_hi]),
        mean: n.mean,
        inv_std: n.inv_std,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATCH: [usize; 3] = [2, 3, 4];

    fn norm() -> pb::Normalization {
        pb::Normalization {
            scheme: "ct".into(),
            has_clip: true,
            clip_lo: 10.0,
            clip_hi: 200.0,
            mean: 50.5,
            inv_std: 0.0371,
        }
    }

    /// Item 0 stored as `u8` (a 2×3×3 case, the patch one voxel to the right: its last two
    /// columns lie outside), item 1 served; labels compressed.
    fn received(stored_dtype: &str, image: Vec<u8>, label: Bytes) -> Received {
        let item = |i: u32, stored: Option<pb::StoredImage>| pb::ItemInfo {
            case_id: format!("c{i}"),
            case_index: i,
            origin: vec![0, 0, 1],
            stored,
            ..pb::ItemInfo::default()
        };
        let header = pb::BatchHeader {
            patch_size: PATCH.iter().map(|&p| p as u64).collect(),
            batch_size: 2,
            channels: 1,
            dtype: pb::ImageDtype::F32 as i32,
            label_dtype: pb::LabelDtype::U8 as i32,
            ignore_label: 255,
            image_bytes: image.len() as u64,
            label_bytes: label.len() as u64,
            items: vec![
                item(
                    0,
                    Some(pb::StoredImage {
                        dtype: stored_dtype.into(),
                        normalization: vec![norm()],
                        shape: vec![2, 3, 3],
                    }),
                ),
                item(1, None),
            ],
            label_encoding: pb::LabelEncoding::Zstd as i32,
        };
        Received::new(4, header, Bytes::from(image), label)
    }

    fn wire() -> (Vec<u8>, Vec<f32>, Vec<u8>) {
        // The part of item 0 inside its case: 2 × 3 × 2 voxels.
        let stored: Vec<u8> = (0..12u8).map(|v| v * 19).collect();
        let served: Vec<f32> = (0..24).map(|v| v as f32 * 0.5 - 3.0).collect();
        // Item 0's labels inside its case (12), then item 1's whole patch (24).
        let labels: Vec<u8> = (0..36u8).map(|v| v % 3).collect();
        (stored, served, labels)
    }

    #[test]
    fn stored_items_and_compressed_labels_become_the_served_buffers() {
        let (stored, served, labels) = wire();
        let mut image = stored.clone();
        image.extend(served.iter().flat_map(|v| v.to_le_bytes()));
        let frame = zstd::bulk::compress(&labels, 1).unwrap();
        let pool = BufferPool::new(4, 1 << 20);
        let (index, header, image, label) = received("u8", image, Bytes::from(frame))
            .convert(&pool)
            .unwrap();
        let batch = crate::batch::finish(index, header, image, label).unwrap();
        let values: Vec<f32> = batch
            .image
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n = norm_of(&norm());
        let mut inside_values = stored.iter();
        for (i, value) in values[..24].iter().enumerate() {
            // Patch x = 0..4 covers case x = 1..5 of a case 3 wide: x 0 and 1 inside.
            let want = if i % 4 < 2 {
                n.apply(f32::from(*inside_values.next().unwrap()))
            } else {
                0.0
            };
            assert_eq!(value.to_bits(), want.to_bits(), "voxel {i}");
        }
        assert_eq!(&values[24..], served.as_slice());
        let mut want_labels = Vec::new();
        let mut inside_labels = labels[..12].iter();
        for i in 0..24 {
            want_labels.push(if i % 4 < 2 {
                *inside_labels.next().unwrap()
            } else {
                255
            });
        }
        want_labels.extend_from_slice(&labels[12..]);
        assert_eq!(batch.label.as_ref(), want_labels.as_slice());
        assert_eq!(batch.index, 4);
        assert_eq!(batch.items.len(), 2);
    }

    #[test]
    fn broken_compact_batches_are_refused_with_the_reason() {
        let (stored, served, labels) = wire();
        let mut image = stored;
        image.extend(served.iter().flat_map(|v| v.to_le_bytes()));
        let frame = Bytes::from(zstd::bulk::compress(&labels, 1).unwrap());
        let pool = BufferPool::new(4, 1 << 20);
        let err = received("f32", image.clone(), frame.clone())
            .convert(&pool)
            .unwrap_err();
        assert!(err.contains("is not one of u8"), "{err}");
        let err = received("u8", image[..100].to_vec(), frame.clone())
            .convert(&pool)
            .unwrap_err();
        assert!(err.contains("the image buffer has 100 bytes"), "{err}");
        let mut longer = image.clone();
        longer.push(0);
        let err = received("u8", longer, frame).convert(&pool).unwrap_err();
        assert!(err.contains("its items take 108"), "{err}");
        let err = received("u8", image.clone(), Bytes::from_static(b"not zstd"))
            .convert(&pool)
            .unwrap_err();
        assert!(err.contains("does not decompress"), "{err}");
        let short = Bytes::from(zstd::bulk::compress(&labels[..30], 1).unwrap());
        let err = received("u8", image, short).convert(&pool).unwrap_err();
        assert!(err.contains("holds 30 bytes, expected 36"), "{err}");
    }
}

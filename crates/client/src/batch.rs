//! Batches as handed to the caller, and their reassembly from wire parts.

use bytes::Bytes;
use patchflow_proto::v1 as pb;

use std::sync::Arc;

use patchflow_proto::buffers::BufferPool;

use crate::compact::Received;
use crate::shape::Shape;

pub use pb::{ImageDtype, LabelDtype};

/// Placement of one item of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Case identifier.
    pub case_id: String,
    /// Position of the case in the dataset description.
    pub case_index: usize,
    /// Voxel index `[z, y, x]` of the patch's first voxel in the case (negative or beyond the
    /// volume where the patch is padded).
    pub origin: [i64; 3],
    /// Whether the crop was forced to contain a foreground voxel.
    pub forced_foreground: bool,
    /// Class the crop was centred on, if any.
    pub class: Option<u16>,
    /// The augmentation parameters applied to this item, as JSON (see the proto's `ItemInfo`);
    /// `None` without augmentation.
    pub augment_json: Option<String>,
}

/// One batch: contiguous little-endian buffers, ready to be viewed as tensors.
///
/// `image` is `[B, C, Z, Y, X]` in [`Batch::dtype`], `label` is `[B, 1, Z, Y, X]` in
/// [`Batch::label_dtype`], both row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Index of the batch in the stream's sequence.
    pub index: u64,
    /// Patch size `[z, y, x]`.
    pub patch: [usize; 3],
    /// Items (B).
    pub batch_size: usize,
    /// Image channels (C).
    pub channels: usize,
    /// Element type of `image`.
    pub dtype: ImageDtype,
    /// Element type of `label`.
    pub label_dtype: LabelDtype,
    /// Label value of padded voxels.
    pub ignore_label: u16,
    /// Image bytes.
    pub image: Bytes,
    /// Label bytes.
    pub label: Bytes,
    /// Placement of each item.
    pub items: Vec<Item>,
}

impl Batch {
    /// Shape of `image`: `[B, C, Z, Y, X]`.
    pub fn image_shape(&self) -> [usize; 5] {
        let [z, y, x] = self.patch;
        [self.batch_size, self.channels, z, y, x]
    }

    /// Shape of `label`: `[B, 1, Z, Y, X]`.
    pub fn label_shape(&self) -> [usize; 5] {
        let [z, y, x] = self.patch;
        [self.batch_size, 1, z, y, x]
    }
}

/// A complete batch as a lane hands it on: ready, or still in a compact wire form that the
/// consumer converts ([`Delivery::into_batch`]).
#[derive(Debug)]
pub(crate) enum Delivery {
    /// Buffers as served.
    Ready(Batch),
    /// Stored items or compressed labels to convert.
    Compact(Received),
}

impl Delivery {
    /// The batch index.
    pub fn index(&self) -> u64 {
        match self {
            Delivery::Ready(b) => b.index,
            Delivery::Compact(r) => r.index,
        }
    }

    /// The batch with served buffers (a compact one converted into buffers from `pool`).
    pub fn into_batch(self, pool: &Arc<BufferPool>) -> Result<Batch, String> {
        match self {
            Delivery::Ready(b) => Ok(b),
            Delivery::Compact(r) => {
                let (index, header, image, label) = r.convert(pool)?;
                finish(index, header, image, label)
            }
        }
    }
}

/// The delivery of a complete batch: compact when its header says so, checked otherwise.
fn complete(
    index: u64,
    header: pb::BatchHeader,
    image: Bytes,
    label: Bytes,
) -> Result<Delivery, String> {
    if Received::is_compact(&header) {
        return Ok(Delivery::Compact(Received::new(
            index, header, image, label,
        )));
    }
    finish(index, header, image, label).map(Delivery::Ready)
}

/// A batch being received in several parts.
struct Partial {
    index: u64,
    config_id: u64,
    parts: u32,
    next: u32,
    header: pb::BatchHeader,
    image: Vec<u8>,
    label: Vec<u8>,
}

/// Reassembles batches from the messages of one stream. Parts of a batch arrive consecutively.
pub(crate) struct Assembler {
    partial: Option<Partial>,
    max_batch_bytes: u64,
}

impl Assembler {
    /// An assembler that refuses batches above `max_batch_bytes`.
    pub fn new(max_batch_bytes: u64) -> Assembler {
        Assembler {
            partial: None,
            max_batch_bytes,
        }
    }

    /// Takes one message; returns `(config_id, batch)` when it completes a batch.
    pub fn push(&mut self, msg: pb::SampleResponse) -> Result<Option<(u64, Delivery)>, String> {
        if let Some(p) = &mut self.partial {
            if msg.index != p.index
                || msg.config_id != p.config_id
                || msg.part != p.next
                || msg.parts != p.parts
                || msg.header.is_some()
            {
                return Err(format!(
                    "expected part {} of {} of batch {}, got part {} of {} of batch {}",
                    p.next, p.parts, p.index, msg.part, msg.parts, msg.index
                ));
            }
            if (p.image.len() + msg.image.len()) as u64 > p.header.image_bytes
                || (p.label.len() + msg.label.len()) as u64 > p.header.label_bytes
            {
                return Err(format!(
                    "batch {}: parts carry more bytes than the header announced",
                    p.index
                ));
            }
            p.image.extend_from_slice(&msg.image);
            p.label.extend_from_slice(&msg.label);
            p.next += 1;
            if p.next < p.parts {
                return Ok(None);
            }
            let Some(p) = self.partial.take() else {
                return Ok(None);
            };
            let batch = complete(
                p.index,
                p.header,
                Bytes::from(p.image),
                Bytes::from(p.label),
            )?;
            return Ok(Some((p.config_id, batch)));
        }
        if msg.part != 0 {
            return Err(format!(
                "part {} of batch {} arrived without part 0",
                msg.part, msg.index
            ));
        }
        let header = msg
            .header
            .ok_or_else(|| format!("part 0 of batch {} has no header", msg.index))?;
        // The bytes on the wire, and for a compact batch the buffers it becomes.
        let shape = Shape::of(msg.index, &header)?;
        let total = header
            .image_bytes
            .saturating_add(header.label_bytes)
            .max((shape.image_bytes as u64).saturating_add(shape.label_bytes as u64));
        if total > self.max_batch_bytes {
            return Err(format!(
                "batch {} announces {total} bytes, above the client's limit of {}",
                msg.index, self.max_batch_bytes
            ));
        }
        if msg.parts <= 1 {
            let batch = complete(msg.index, header, msg.image, msg.label)?;
            return Ok(Some((msg.config_id, batch)));
        }
        let mut image = Vec::with_capacity(usize::try_from(header.image_bytes).unwrap_or(0));
        let mut label = Vec::with_capacity(usize::try_from(header.label_bytes).unwrap_or(0));
        image.extend_from_slice(&msg.image);
        label.extend_from_slice(&msg.label);
        self.partial = Some(Partial {
            index: msg.index,
            config_id: msg.config_id,
            parts: msg.parts,
            next: 1,
            header,
            image,
            label,
        });
        Ok(None)
    }
}

/// Checks a complete batch against its header and builds the caller's view of it.
pub(crate) fn finish(
    index: u64,
    header: pb::BatchHeader,
    image: Bytes,
    label: Bytes,
) -> Result<Batch, String> {
    let Shape {
        patch,
        batch_size,
        channels,
        dtype,
        label_dtype,
        image_bytes,
        label_bytes,
        ..
    } = Shape::of(index, &header)?;
    if image.len() != image_bytes || image.len() as u64 != header.image_bytes {
        return Err(format!(
            "batch {index}: image has {} bytes, expected {image_bytes} for {batch_size}x{channels}x{patch:?} {dtype:?}",
            image.len()
        ));
    }
    if label.len() != label_bytes || label.len() as u64 != header.label_bytes {
        return Err(format!(
            "batch {index}: label has {} bytes, expected {label_bytes} for {batch_size}x1x{patch:?} {label_dtype:?}",
            label.len()
        ));
    }
    let ignore_label = u16::try_from(header.ignore_label).map_err(|_| {
        format!(
            "batch {index}: ignore label {} is not 16-bit",
            header.ignore_label
        )
    })?;
    let mut items = Vec::with_capacity(batch_size);
    for item in header.items {
        let origin: [i64; 3] = item.origin.as_slice().try_into().map_err(|_| {
            format!(
                "batch {index}: item origin {:?} is not [z, y, x]",
                item.origin
            )
        })?;
        let class = item
            .class_value
            .map(u16::try_from)
            .transpose()
            .map_err(|_| format!("batch {index}: item class is not 16-bit"))?;
        items.push(Item {
            case_id: item.case_id,
            case_index: item.case_index as usize,
            origin,
            forced_foreground: item.forced_foreground,
            class,
            augment_json: (!item.augment_json.is_empty()).then_some(item.augment_json),
        });
    }
    Ok(Batch {
        index,
        patch,
        batch_size,
        channels,
        dtype,
        label_dtype,
        ignore_label,
        image,
        label,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(image: u64, label: u64) -> pb::BatchHeader {
        pb::BatchHeader {
            patch_size: vec![2, 3, 4],
            batch_size: 2,
            channels: 1,
            dtype: ImageDtype::F16 as i32,
            label_dtype: LabelDtype::U8 as i32,
            ignore_label: 255,
            image_bytes: image,
            label_bytes: label,
            items: (0..2)
                .map(|i| pb::ItemInfo {
                    case_id: format!("c{i}"),
                    case_index: i,
                    origin: vec![0, -1, 2],
                    forced_foreground: i == 1,
                    class_value: (i == 1).then_some(3),
                    augment_json: String::new(),
                    stored: None,
                })
                .collect(),
            label_encoding: 0,
        }
    }

    fn split(image: &[u8], label: &[u8], room: usize) -> Vec<pb::SampleResponse> {
        let all: Vec<u8> = image.iter().chain(label).copied().collect();
        let chunks: Vec<&[u8]> = all.chunks(room).collect();
        let parts = chunks.len() as u32;
        let mut offset = 0;
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let (start, end) = (offset, offset + c.len());
                offset = end;
                let il = image.len();
                pb::SampleResponse {
                    index: 5,
                    config_id: 1,
                    part: i as u32,
                    parts,
                    header: (i == 0).then(|| header(image.len() as u64, label.len() as u64)),
                    image: Bytes::copy_from_slice(&image[start.min(il)..end.min(il)]),
                    label: Bytes::copy_from_slice(
                        &label[start.saturating_sub(il)..end.saturating_sub(il)],
                    ),
                    shared: None,
                }
            })
            .collect()
    }

    #[test]
    fn reassembles_any_split() {
        let image: Vec<u8> = (0..96u32).map(|i| i as u8).collect();
        let label: Vec<u8> = (0..48u32).map(|i| (200 + i) as u8).collect();
        for room in [1, 7, 48, 96, 100, 144] {
            let mut asm = Assembler::new(1 << 20);
            let parts = split(&image, &label, room);
            let n = parts.len();
            let mut out = None;
            for (i, p) in parts.into_iter().enumerate() {
                let r = asm.push(p).unwrap();
                assert_eq!(r.is_some(), i + 1 == n, "room {room} part {i}");
                out = r.or(out);
            }
            let (cid, batch) = out.unwrap();
            let batch = batch.into_batch(&BufferPool::new(1, 1 << 20)).unwrap();
            assert_eq!(cid, 1);
            assert_eq!(batch.image.as_ref(), image.as_slice());
            assert_eq!(batch.label.as_ref(), label.as_slice());
            assert_eq!(batch.image_shape(), [2, 1, 2, 3, 4]);
            assert_eq!(batch.items[1].class, Some(3));
            assert_eq!(batch.items[0].origin, [0, -1, 2]);
        }
    }

    #[test]
    fn rejects_inconsistent_messages() {
        let image = vec![0u8; 96];
        let label = vec![0u8; 48];
        // A missing part.
        let mut parts = split(&image, &label, 50);
        parts.remove(1);
        let mut asm = Assembler::new(1 << 20);
        assert!(asm.push(parts[0].clone()).unwrap().is_none());
        assert!(
            asm.push(parts[1].clone())
                .unwrap_err()
                .contains("expected part 1")
        );
        // Sizes that do not match the shape.
        let mut parts = split(&image[..90], &label, 1000);
        let err = Assembler::new(1 << 20).push(parts.remove(0)).unwrap_err();
        assert!(err.contains("image has 90 bytes"), "{err}");
        // A batch above the client's limit.
        let parts = split(&image, &label, 1000);
        let err = Assembler::new(100).push(parts[0].clone()).unwrap_err();
        assert!(err.contains("above the client's limit"), "{err}");
        // A compact batch whose few wire bytes would become buffers above the limit.
        let mut part = split(&[0u8; 8], &[], 1000).remove(0);
        if let Some(h) = part.header.as_mut() {
            h.patch_size = vec![512, 512, 512];
            h.label_encoding = pb::LabelEncoding::Zstd as i32;
        }
        let err = Assembler::new(1 << 20).push(part).unwrap_err();
        assert!(err.contains("announces 805306368 bytes"), "{err}");
    }
}

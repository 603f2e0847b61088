//! Translation between the wire messages and the sampler's types: configurations in, batches
//! (split into parts) out. Every rejection names the field and the reason.
//!
//! It owns the wire forms only; it must not sample, track streams or decide status codes (those
//! are [`crate::error::StreamError`]'s).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use patchflow_proto::buffers::BufferPool;
use patchflow_proto::v1 as pb;
use patchflow_sampler::{
    AugmentSpec, Batch, BatchRequest, CompactBatch, ItemMeta, OutputDType, Patch, Policy,
    StoredItem,
};
use patchflow_store::MAX_CASE_ID_LEN;
use patchflow_volume::DType;
use prost::Message;

use crate::auth::check_name;
use crate::damage::ServedRequest;
use crate::error::StreamError;
use crate::registry::{Entry, Registry, label_dtype, normalization};
use crate::shm::Slot;
use crate::{Limits, config::MIN_MESSAGE_BYTES};

/// Foreground fraction used when a configuration names no policy (nnU-Net's default).
pub const DEFAULT_FOREGROUND_FRACTION: f64 = 0.33;

/// A validated stream configuration.
#[derive(Clone)]
pub(crate) struct StreamConfig {
    /// The dataset.
    pub entry: Arc<Entry>,
    /// What the sampler is asked for, narrowed to the cases still in service.
    pub request: Arc<ServedRequest>,
    /// First batch index, if the client named one.
    pub start_index: Option<u64>,
    /// Distance between consecutive indices.
    pub stride: u64,
    /// How the batches of this configuration go on the wire.
    pub wire: WireFormat,
}

/// What every batch of one configuration shares on the wire.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WireFormat {
    /// Image channels of the dataset.
    pub channels: usize,
    /// The dataset's ignore label.
    pub ignore_label: u16,
    /// Echoed in every batch.
    pub config_id: u64,
    /// Largest message; larger batches are split into parts.
    pub max_message_bytes: usize,
    /// The compact forms the stream asked for in its first message (the same for every
    /// configuration of the stream; [`stream_config`] leaves them off).
    pub compact: Compact,
}

/// The compact wire forms of a stream (proto `WireOptions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Compact {
    /// Qualifying items travel in their stored type.
    pub stored_image: bool,
    /// Label buffers travel as one zstd frame.
    pub zstd_labels: bool,
}

impl From<&pb::WireOptions> for Compact {
    fn from(w: &pb::WireOptions) -> Compact {
        Compact {
            stored_image: w.stored_image,
            zstd_labels: w.zstd_labels,
        }
    }
}

thread_local! {
    /// A compression context per worker thread, reused: creating one (and its tables) costs
    /// more than compressing a batch's labels.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd level of compressed label buffers. Label maps are mostly long runs: level 1 shrinks a
/// whole TotalSegmentator map 178-fold at about 5 GB/s; the faster negative levels saved no CPU
/// per patch in `patchflow bench peer`.
const LABEL_ZSTD_LEVEL: i32 = 1;

fn invalid(field: &'static str, reason: impl Into<String>) -> StreamError {
    StreamError::InvalidField {
        field,
        reason: reason.into(),
    }
}

fn invalid_name(reason: String) -> StreamError {
    StreamError::InvalidName {
        scope: "configuration",
        reason,
    }
}

/// Checks `config` against the registry and the limits and turns it into a sampler request.
pub(crate) fn stream_config(
    config: &pb::SampleConfig,
    registry: &Registry,
    limits: &Limits,
) -> Result<StreamConfig, StreamError> {
    // Names are identifiers: checked before anything is looked up.
    check_name("dataset", &config.dataset).map_err(invalid_name)?;
    for (i, id) in config.cases.iter().enumerate() {
        check_name(&format!("cases[{i}]"), id).map_err(invalid_name)?;
    }
    let entry = registry.find(&config.dataset)?;
    let augment = augment_spec(config.augmentation.as_ref())?;
    let patch = wire_patch(&config.patch_size)?;
    let policy = policy(config.policy.as_ref())?;
    let dtype = match pb::ImageDtype::try_from(config.dtype) {
        Ok(pb::ImageDtype::Unspecified | pb::ImageDtype::F32) => OutputDType::F32,
        Ok(pb::ImageDtype::F16) => OutputDType::F16,
        Ok(pb::ImageDtype::Bf16) => OutputDType::BF16,
        Err(_) => {
            return Err(invalid(
                "dtype",
                format!("unknown image dtype {}", config.dtype),
            ));
        }
    };
    let dataset = entry.dataset();
    let cases = if config.cases.is_empty() {
        None
    } else {
        let mut indices = Vec::with_capacity(config.cases.len());
        for id in &config.cases {
            let index = dataset
                .case_index(id)
                .ok_or_else(|| StreamError::UnknownCase {
                    dataset: config.dataset.clone(),
                    case: id.clone(),
                })?;
            indices.push(index);
        }
        Some(indices)
    };

    let request = BatchRequest {
        patch,
        batch: usize::try_from(config.batch_size).unwrap_or(usize::MAX),
        policy,
        crops_per_case: usize::try_from(config.crops_per_case.max(1)).unwrap_or(usize::MAX),
        dtype,
        seed: config.seed,
        cases,
        augment,
    };
    // Cases set aside (damaged data) are left out; a request for nothing else is refused here.
    let request = ServedRequest::new(request, &entry.set_aside)?;
    entry.sampler.validate(
        &*request.current(&entry.set_aside)?,
        &limits.sampler_limits(),
    )?;
    check_message_room(request.base(), dataset.num_channels(), limits)?;
    Ok(StreamConfig {
        entry: Arc::clone(entry),
        request: Arc::new(request),
        start_index: config.start_index,
        stride: config.index_stride.max(1),
        wire: WireFormat {
            channels: dataset.num_channels(),
            ignore_label: dataset.ignore_label(),
            config_id: config.config_id,
            max_message_bytes: limits.max_message_bytes,
            compact: Compact::default(),
        },
    })
}

/// The wire's patch size as the one validated patch type: three edges, each in
/// `1..=`[`patchflow_grid::MAX_PATCH_AXIS`].
fn wire_patch(values: &[i64]) -> Result<Patch, StreamError> {
    let &[z, y, x] = values else {
        return Err(invalid(
            "patch_size",
            format!(
                "needs 3 values [z, y, x], got {} ({values:?})",
                values.len()
            ),
        ));
    };
    let axes = [z, y, x];
    Patch::from_i64(axes).map_err(|source| StreamError::PatchSize { axes, source })
}

/// The sampler's placement policy for the wire's (unset: nnU-Net's oversampling).
fn policy(wire: Option<&pb::sample_config::Policy>) -> Result<Policy, StreamError> {
    Ok(match wire {
        None => Policy::ForegroundOversample {
            fraction: DEFAULT_FOREGROUND_FRACTION,
        },
        Some(pb::sample_config::Policy::Foreground(f)) => Policy::ForegroundOversample {
            fraction: f.fraction,
        },
        Some(pb::sample_config::Policy::Uniform(_)) => Policy::Uniform,
        Some(pb::sample_config::Policy::ClassWeights(w)) => {
            let mut weights = BTreeMap::new();
            for (&class, &weight) in &w.weights {
                let class = u16::try_from(class).map_err(|_| {
                    invalid(
                        "class_weights",
                        format!("class {class} is beyond the largest label value 65535"),
                    )
                })?;
                weights.insert(class, weight);
            }
            Policy::ClassWeights { weights }
        }
    })
}

/// Refuses a request whose batch header (one item description per item, in one message with
/// payload) could not fit the message limit.
fn check_message_room(
    request: &BatchRequest,
    channels: usize,
    limits: &Limits,
) -> Result<(), StreamError> {
    let item_bound = if request.augment.is_some() {
        ITEM_HEADER_BOUND + AUGMENT_JSON_BOUND * channels.max(1)
    } else {
        // A plain item may travel in its stored type, described with its normalisations.
        ITEM_HEADER_BOUND + STORED_IMAGE_BOUND + NORMALIZATION_BOUND * channels.max(1)
    };
    let header_bound = request.batch.saturating_mul(item_bound) + 2 * PART_OVERHEAD;
    let needed = header_bound.saturating_mul(2);
    if needed > limits.max_message_bytes {
        return Err(StreamError::MessageLimit {
            batch: request.batch,
            needed,
            limit: limits.max_message_bytes,
        });
    }
    Ok(())
}

/// A batch ready for the wire: its messages and its payload size.
pub(crate) struct EncodedBatch {
    /// Batch index.
    pub index: u64,
    /// Image + label bytes.
    pub bytes: u64,
    /// The messages, part 0 first.
    pub parts: Vec<pb::SampleResponse>,
    /// The shared-memory slot holding the buffers, on a shared-memory stream.
    pub slot: Option<Slot>,
}

fn wire_dtype(dtype: OutputDType) -> pb::ImageDtype {
    match dtype {
        OutputDType::F32 => pb::ImageDtype::F32,
        OutputDType::F16 => pb::ImageDtype::F16,
        OutputDType::BF16 => pb::ImageDtype::Bf16,
    }
}

/// Generous bound of the JSON of one item's augmentation parameters, per image channel (the
/// per-channel fields dominate; a one-channel item is about 600 bytes).
const AUGMENT_JSON_BOUND: usize = 2048;

/// Names of the augmentation presets a configuration may ask for.
pub const AUGMENT_PRESETS: [&str; 1] = [AugmentSpec::NNUNET_PRESET];

/// The sampler's augmentation for a wire `Augmentation`: `None` when unset or empty.
fn augment_spec(wire: Option<&pb::Augmentation>) -> Result<Option<AugmentSpec>, StreamError> {
    let Some(a) = wire else { return Ok(None) };
    if a.preset.is_empty() && a.spec_json.is_empty() && a.no_mirror_axes.is_empty() {
        return Ok(None);
    }
    let mut spec = if !a.spec_json.is_empty() {
        serde_json::from_str::<AugmentSpec>(&a.spec_json).map_err(|e| {
            invalid(
                "augmentation.spec_json",
                format!("not an augmentation spec: {e}"),
            )
        })?
    } else {
        match a.preset.as_str() {
            AugmentSpec::NNUNET_PRESET => AugmentSpec::nnunet_default(),
            "" => {
                return Err(invalid(
                    "augmentation",
                    "no_mirror_axes needs a preset or a spec_json to apply to",
                ));
            }
            other => {
                return Err(invalid(
                    "augmentation.preset",
                    format!(
                        "unknown augmentation preset {other:?} (known: {})",
                        AUGMENT_PRESETS.join(", ")
                    ),
                ));
            }
        }
    };
    if !a.no_mirror_axes.is_empty() {
        let mut axes = spec.mirror.axes;
        for &axis in &a.no_mirror_axes {
            let slot = axes.get_mut(axis as usize).ok_or_else(|| {
                invalid(
                    "augmentation.no_mirror_axes",
                    format!("axis {axis} does not exist (0 = z, 1 = y, 2 = x)"),
                )
            })?;
            *slot = false;
        }
        spec = spec.with_mirror_axes(axes);
    }
    Ok(Some(spec))
}

/// Upper bound of the encoded size of one item description (case id of at most
/// `MAX_CASE_ID_LEN` bytes, three origins, flags, tags and lengths).
const ITEM_HEADER_BOUND: usize = MAX_CASE_ID_LEN + 64;

/// Upper bound of the encoded size of an item's `StoredImage` without its normalisations (a
/// dtype name of at most 3 bytes, three shape values, tags and lengths).
const STORED_IMAGE_BOUND: usize = 48;

/// Upper bound of the encoded size of one channel's `Normalization` (a scheme name of at most 6
/// bytes, a flag, four floats, tags and lengths).
const NORMALIZATION_BOUND: usize = 40;

/// Room reserved in every message for the fields around the payload (index, part numbers,
/// field tags and lengths).
const PART_OVERHEAD: usize = 64;

/// Splits `batch` into messages of at most `wire.max_message_bytes` each (buffers are shared,
/// not copied; labels compressed when the stream asked for it).
pub(crate) fn encode_batch(
    batch: Batch,
    wire: &WireFormat,
    buffers: &Arc<BufferPool>,
) -> EncodedBatch {
    let lens = (batch.image.len(), batch.label.len());
    encode_parts(batch, None, lens, wire, buffers)
}

/// [`encode_batch`] for a batch in compact form: its stored items are described in the header.
pub(crate) fn encode_compact(
    compact: CompactBatch,
    wire: &WireFormat,
    buffers: &Arc<BufferPool>,
) -> EncodedBatch {
    let lens = (compact.image_len, compact.label_len);
    encode_parts(compact.batch, Some(compact.stored), lens, wire, buffers)
}

/// The first `len` bytes of the label buffer as they travel: compressed into one zstd frame when
/// the stream asked for it (the raw buffer goes back to the pool), shared as they are otherwise.
fn wire_label(
    label: Vec<u8>,
    len: usize,
    wire: &WireFormat,
    buffers: &Arc<BufferPool>,
) -> (Bytes, bool) {
    if wire.compact.zstd_labels {
        let compressed = COMPRESSOR.with_borrow_mut(|c| {
            let c = match c {
                Some(c) => c,
                None => c.insert(zstd::bulk::Compressor::new(LABEL_ZSTD_LEVEL)?),
            };
            c.compress(&label[..len])
        });
        match compressed {
            Ok(frame) => {
                drop(buffers.share(label));
                return (Bytes::from(frame), true);
            }
            Err(e) => tracing::warn!(error = %e, "label compression failed; sent raw"),
        }
    }
    (buffers.share(label).slice(..len), false)
}

/// Encodes the first `lens.0` bytes of the image and `lens.1` of the label of `batch`.
fn encode_parts(
    batch: Batch,
    stored: Option<Vec<Option<StoredItem>>>,
    lens: (usize, usize),
    wire: &WireFormat,
    buffers: &Arc<BufferPool>,
) -> EncodedBatch {
    let image = buffers.share(batch.image).slice(..lens.0);
    let (label, zstd) = wire_label(batch.label, lens.1, wire, buffers);
    let mut header = batch_header(
        batch.patch,
        batch.dtype,
        batch.label_dtype,
        batch.items,
        (image.len(), label.len()),
        wire,
    );
    if zstd {
        header.label_encoding = pb::LabelEncoding::Zstd as i32;
    }
    for (info, form) in header.items.iter_mut().zip(stored.into_iter().flatten()) {
        info.stored = form.map(|f| pb::StoredImage {
            dtype: f.dtype.name().to_owned(),
            normalization: f.norms.iter().map(normalization).collect(),
            shape: f.shape.iter().map(|&s| s as u64).collect(),
        });
    }
    // The header travels in part 0 only, but sizing every part with it keeps the split simple.
    let room = wire
        .max_message_bytes
        .max(MIN_MESSAGE_BYTES)
        .saturating_sub(header.encoded_len() + PART_OVERHEAD)
        .max(1);
    let total = image.len() + label.len();
    let parts = total.div_ceil(room).max(1);
    let mut out = Vec::with_capacity(parts);
    let mut header = Some(header);
    for part in 0..parts {
        let start = part * room;
        let end = (start + room).min(total);
        let img = image.slice(start.min(image.len())..end.min(image.len()));
        let lab = label.slice(
            start.saturating_sub(image.len()).min(label.len())
                ..end.saturating_sub(image.len()).min(label.len()),
        );
        out.push(pb::SampleResponse {
            index: batch.index,
            config_id: wire.config_id,
            part: part as u32,
            parts: parts as u32,
            header: header.take(),
            image: img,
            label: lab,
            shared: None,
        });
    }
    EncodedBatch {
        index: batch.index,
        bytes: total as u64,
        parts: out,
        slot: None,
    }
}

/// Everything about a batch but its voxels; `sizes` are the image and label buffer lengths.
pub(crate) fn batch_header(
    patch: Patch,
    dtype: OutputDType,
    labels: DType,
    items: Vec<ItemMeta>,
    sizes: (usize, usize),
    wire: &WireFormat,
) -> pb::BatchHeader {
    pb::BatchHeader {
        patch_size: patch.axes().iter().map(|&p| p as u64).collect(),
        batch_size: u32::try_from(items.len()).unwrap_or(u32::MAX),
        channels: u32::try_from(wire.channels).unwrap_or(u32::MAX),
        dtype: wire_dtype(dtype) as i32,
        label_dtype: label_dtype(labels) as i32,
        ignore_label: u32::from(wire.ignore_label),
        image_bytes: sizes.0 as u64,
        label_bytes: sizes.1 as u64,
        label_encoding: pb::LabelEncoding::Raw as i32,
        items: items
            .into_iter()
            .map(|item| pb::ItemInfo {
                case_id: item.case_id,
                case_index: u32::try_from(item.case).unwrap_or(u32::MAX),
                origin: item.origin.to_vec(),
                forced_foreground: item.forced_foreground,
                class_value: item.class.map(u32::from),
                augment_json: item
                    .augment
                    .as_ref()
                    .and_then(|p| serde_json::to_string(p).ok())
                    .unwrap_or_default(),
                stored: None,
            })
            .collect(),
    }
}

/// Batch `index` written into a shared-memory slot: one message with its `header`, naming the
/// slot, and no voxel bytes (the image comes first in the slot, the label right after it).
pub(crate) fn encode_shared(
    index: u64,
    header: pb::BatchHeader,
    slot: Slot,
    wire: &WireFormat,
) -> EncodedBatch {
    let shared = slot.reference().map(|r| pb::SharedBatch {
        slot: r.id,
        path: r.path,
        file_bytes: r.file_bytes,
        label_offset: header.image_bytes,
    });
    EncodedBatch {
        index,
        bytes: header.image_bytes + header.label_bytes,
        parts: vec![pb::SampleResponse {
            index,
            config_id: wire.config_id,
            part: 0,
            parts: 1,
            header: Some(header),
            image: Default::default(),
            label: Default::default(),
            shared,
        }],
        slot: Some(slot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_sampler::ItemMeta;
    use patchflow_volume::DType;

    fn batch(image: usize, label: usize) -> Batch {
        Batch {
            index: 7,
            patch: Patch::new([1, 2, 3]).unwrap(),
            dtype: OutputDType::F32,
            label_dtype: DType::U8,
            image: (0..image).map(|i| i as u8).collect(),
            label: (0..label).map(|i| (i * 7) as u8).collect(),
            items: vec![ItemMeta {
                case: 0,
                case_id: "c0".into(),
                origin: [-1, 0, 2],
                forced_foreground: true,
                class: Some(2),
                augment: None,
            }],
        }
    }

    fn wire(config_id: u64, max_message_bytes: usize) -> WireFormat {
        WireFormat {
            channels: 1,
            ignore_label: 255,
            config_id,
            max_message_bytes,
            compact: Compact::default(),
        }
    }

    fn reassemble(parts: &[pb::SampleResponse]) -> (Vec<u8>, Vec<u8>) {
        let mut image = Vec::new();
        let mut label = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.part as usize, i);
            assert_eq!(p.parts as usize, parts.len());
            assert_eq!(p.header.is_some(), i == 0);
            image.extend_from_slice(&p.image);
            label.extend_from_slice(&p.label);
        }
        (image, label)
    }

    #[test]
    fn small_batches_are_one_message() {
        let b = batch(1000, 300);
        let (img, lab) = (b.image.clone(), b.label.clone());
        let enc = encode_batch(b, &wire(9, 1 << 20), &BufferPool::new(4, 1 << 30));
        assert_eq!(enc.parts.len(), 1);
        assert_eq!(enc.bytes, 1300);
        let header = enc.parts[0].header.as_ref().unwrap();
        assert_eq!(header.image_bytes, 1000);
        assert_eq!(header.items[0].origin, vec![-1, 0, 2]);
        assert_eq!(header.items[0].class_value, Some(2));
        assert_eq!(enc.parts[0].config_id, 9);
        assert_eq!(reassemble(&enc.parts), (img, lab));
    }

    #[test]
    fn item_header_bound_holds_for_the_largest_item() {
        let item = pb::ItemInfo {
            case_id: "x".repeat(MAX_CASE_ID_LEN),
            case_index: u32::MAX,
            origin: vec![i64::MIN; 3],
            forced_foreground: true,
            class_value: Some(u32::from(u16::MAX)),
            augment_json: String::new(),
            stored: None,
        };
        let stored = pb::StoredImage {
            dtype: "u16".into(),
            normalization: Vec::new(),
            shape: vec![u64::MAX; 3],
        };
        assert!(stored.encoded_len() + 3 <= STORED_IMAGE_BOUND);
        let norm = pb::Normalization {
            scheme: "zscore".into(),
            has_clip: true,
            clip_lo: f32::MIN,
            clip_hi: f32::MAX,
            mean: f32::MAX,
            inv_std: f32::MAX,
        };
        assert!(norm.encoded_len() + 3 <= NORMALIZATION_BOUND);
        let header = pb::BatchHeader {
            patch_size: vec![u64::MAX; 3],
            batch_size: u32::MAX,
            channels: u32::MAX,
            dtype: 3,
            label_dtype: 2,
            ignore_label: 65535,
            image_bytes: u64::MAX,
            label_bytes: u64::MAX,
            items: vec![item.clone(); 10],
            label_encoding: pb::LabelEncoding::Zstd as i32,
        };
        // Repeated message field: tag + length prefix + body.
        assert!(item.encoded_len() + 3 <= ITEM_HEADER_BOUND);
        let fixed = pb::BatchHeader {
            items: Vec::new(),
            ..header.clone()
        };
        assert!(fixed.encoded_len() <= 2 * PART_OVERHEAD);
        assert!(header.encoded_len() <= 10 * ITEM_HEADER_BOUND + 2 * PART_OVERHEAD);
    }

    #[test]
    fn large_batches_split_within_the_limit_and_reassemble() {
        for (image, label) in [
            (300_000, 70_000),
            (65_000, 200_000),
            (0, 150_000),
            (131_000, 1),
        ] {
            let b = batch(image, label);
            let (img, lab) = (b.image.clone(), b.label.clone());
            let enc = encode_batch(b, &wire(0, MIN_MESSAGE_BYTES), &BufferPool::new(4, 1 << 30));
            assert!(enc.parts.len() > 1, "{image}+{label}");
            for p in &enc.parts {
                assert!(p.encoded_len() <= MIN_MESSAGE_BYTES, "{}", p.encoded_len());
            }
            assert_eq!(reassemble(&enc.parts), (img, lab));
        }
    }
}

//! Translation between the wire messages and the sampler's types: configurations in, batches
//! (split into parts) out. Every rejection names the field and the reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use patchflow_grid::{AXIS_NAMES, GridError};
use patchflow_proto::v1 as pb;
use patchflow_sampler::{AugmentSpec, Batch, BatchRequest, ItemMeta, OutputDType, Patch, Policy};
use patchflow_store::MAX_CASE_ID_LEN;
use patchflow_volume::DType;
use prost::Message;
use tonic::Status;

use crate::auth::check_name;
use crate::buffers::BufferPool;
use crate::damage::ServedRequest;
use crate::error::sampler_status;
use crate::registry::{Entry, Registry, label_dtype};
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
    /// Echoed in every batch.
    pub config_id: u64,
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid configuration: {field}: {reason}"))
}

fn invalid_configuration(reason: String) -> Status {
    Status::invalid_argument(format!("invalid configuration: {reason}"))
}

/// Why the wire patch `axes` is refused: the first offending axis, by its index.
fn patch_reason(axes: [i64; 3], err: &GridError) -> String {
    let index = |name: &str| AXIS_NAMES.iter().position(|&a| a == name).unwrap_or(0);
    match err {
        GridError::AxisTooLarge { axis, size, max } => format!(
            "axis {} ([z, y, x]) is {size}, the largest accepted is {max}",
            index(axis)
        ),
        GridError::ZeroAxis { axis } => {
            format!("axis {} ([z, y, x]) is 0, must be at least 1", index(axis))
        }
        // A negative edge: the first one.
        GridError::BadTriplet { .. } => {
            let (axis, value) = axes
                .iter()
                .enumerate()
                .find(|&(_, &v)| v < 0)
                .map_or((0, 0), |(a, &v)| (a, v));
            format!("axis {axis} ([z, y, x]) is {value}, must be at least 1")
        }
    }
}

/// Checks `config` against the registry and the limits and turns it into a sampler request.
pub(crate) fn stream_config(
    config: &pb::SampleConfig,
    registry: &Registry,
    limits: &Limits,
) -> Result<StreamConfig, Status> {
    // Names are identifiers: checked before anything is looked up.
    check_name("dataset", &config.dataset).map_err(invalid_configuration)?;
    for (i, id) in config.cases.iter().enumerate() {
        check_name(&format!("cases[{i}]"), id).map_err(invalid_configuration)?;
    }
    let entry = registry.get(&config.dataset).ok_or_else(|| {
        Status::not_found(format!(
            "unknown dataset {:?} (served: {})",
            config.dataset,
            registry.names()
        ))
    })?;
    let augment = augment_spec(config.augmentation.as_ref())?;

    if config.patch_size.len() != 3 {
        return Err(invalid(
            "patch_size",
            format!(
                "needs 3 values [z, y, x], got {} ({:?})",
                config.patch_size.len(),
                config.patch_size
            ),
        ));
    }
    let axes = [
        config.patch_size[0],
        config.patch_size[1],
        config.patch_size[2],
    ];
    let patch = Patch::from_i64(axes).map_err(|e| invalid("patch_size", patch_reason(axes, &e)))?;
    let batch = usize::try_from(config.batch_size).unwrap_or(usize::MAX);

    let policy = match &config.policy {
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
    };

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
            let index = dataset.case_index(id).ok_or_else(|| {
                Status::not_found(format!("dataset {:?} has no case {id:?}", config.dataset))
            })?;
            indices.push(index);
        }
        Some(indices)
    };

    let request = BatchRequest {
        patch,
        batch,
        policy,
        crops_per_case: usize::try_from(config.crops_per_case.max(1)).unwrap_or(usize::MAX),
        dtype,
        seed: config.seed,
        cases,
        augment,
    };
    // Cases set aside (damaged data) are left out; a request for nothing else is refused here.
    let request = ServedRequest::new(request, &entry.set_aside)?;
    entry
        .sampler
        .validate(
            &*request.current(&entry.set_aside)?,
            &limits.sampler_limits(),
        )
        .map_err(|e| sampler_status(&e))?;
    let base = request.base();
    // The batch header (one item description per item) travels in one message with payload.
    let item_bound = if base.augment.is_some() {
        ITEM_HEADER_BOUND + AUGMENT_JSON_BOUND * dataset.num_channels().max(1)
    } else {
        ITEM_HEADER_BOUND
    };
    let header_bound = base.batch.saturating_mul(item_bound) + 2 * PART_OVERHEAD;
    if header_bound.saturating_mul(2) > limits.max_message_bytes {
        return Err(Status::resource_exhausted(format!(
            "limit exceeded: a batch of {} items needs messages of up to {} bytes, the limit is {}",
            base.batch,
            header_bound.saturating_mul(2),
            limits.max_message_bytes
        )));
    }
    Ok(StreamConfig {
        entry: Arc::clone(entry),
        request: Arc::new(request),
        start_index: config.start_index,
        stride: config.index_stride.max(1),
        config_id: config.config_id,
    })
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
fn augment_spec(wire: Option<&pb::Augmentation>) -> Result<Option<AugmentSpec>, Status> {
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

/// Room reserved in every message for the fields around the payload (index, part numbers,
/// field tags and lengths).
const PART_OVERHEAD: usize = 64;

/// Splits `batch` into messages of at most `max_message_bytes` each (buffers are shared, not
/// copied).
pub(crate) fn encode_batch(
    batch: Batch,
    channels: usize,
    ignore_label: u16,
    config_id: u64,
    max_message_bytes: usize,
    buffers: &Arc<BufferPool>,
) -> EncodedBatch {
    let image = buffers.share(batch.image);
    let label = buffers.share(batch.label);
    let header = batch_header(
        batch.patch.axes(),
        batch.dtype,
        batch.label_dtype,
        batch.items,
        channels,
        ignore_label,
        (image.len(), label.len()),
    );
    // The header travels in part 0 only, but sizing every part with it keeps the split simple.
    let room = max_message_bytes
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
            config_id,
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
fn batch_header(
    patch: [usize; 3],
    dtype: OutputDType,
    labels: DType,
    items: Vec<ItemMeta>,
    channels: usize,
    ignore_label: u16,
    sizes: (usize, usize),
) -> pb::BatchHeader {
    pb::BatchHeader {
        patch_size: patch.iter().map(|&p| p as u64).collect(),
        batch_size: u32::try_from(items.len()).unwrap_or(u32::MAX),
        channels: u32::try_from(channels).unwrap_or(u32::MAX),
        dtype: wire_dtype(dtype) as i32,
        label_dtype: label_dtype(labels) as i32,
        ignore_label: u32::from(ignore_label),
        image_bytes: sizes.0 as u64,
        label_bytes: sizes.1 as u64,
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
            })
            .collect(),
    }
}

/// A batch written into a shared-memory slot: one message naming the slot, no voxel bytes.
pub(crate) fn encode_shared(
    batch: SharedBatch,
    channels: usize,
    ignore_label: u16,
    config_id: u64,
) -> EncodedBatch {
    let (image_bytes, label_bytes) = batch.sizes;
    let shared = batch.slot.reference().map(|r| pb::SharedBatch {
        slot: r.id,
        path: r.path,
        file_bytes: r.file_bytes,
        label_offset: image_bytes as u64,
    });
    let header = batch_header(
        batch.patch,
        batch.dtype,
        batch.label_dtype,
        batch.items,
        channels,
        ignore_label,
        batch.sizes,
    );
    EncodedBatch {
        index: batch.index,
        bytes: (image_bytes + label_bytes) as u64,
        parts: vec![pb::SampleResponse {
            index: batch.index,
            config_id,
            part: 0,
            parts: 1,
            header: Some(header),
            image: Default::default(),
            label: Default::default(),
            shared,
        }],
        slot: Some(batch.slot),
    }
}

/// A batch the sampler wrote into a shared-memory slot.
pub(crate) struct SharedBatch {
    /// Batch index.
    pub index: u64,
    /// Patch size.
    pub patch: [usize; 3],
    /// Image element type.
    pub dtype: OutputDType,
    /// Label element type.
    pub label_dtype: DType,
    /// Placement of each item.
    pub items: Vec<ItemMeta>,
    /// Image and label bytes, at the start of the slot one after the other.
    pub sizes: (usize, usize),
    /// The slot.
    pub slot: Slot,
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
        let enc = encode_batch(b, 1, 255, 9, 1 << 20, &BufferPool::new(4, 1 << 30));
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
        };
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
            let enc = encode_batch(
                b,
                1,
                255,
                0,
                MIN_MESSAGE_BYTES,
                &BufferPool::new(4, 1 << 30),
            );
            assert!(enc.parts.len() > 1, "{image}+{label}");
            for p in &enc.parts {
                assert!(p.encoded_len() <= MIN_MESSAGE_BYTES, "{}", p.encoded_len());
            }
            assert_eq!(reassemble(&enc.parts), (img, lab));
        }
    }
}

//! Case metadata, array identifiers, writer options and statistics.

use std::collections::BTreeMap;
use std::fmt;

use patchflow_volume::{DType, Geometry, LabelData, Normalization, PreprocessedCase, VoxelData};
use serde::{Deserialize, Serialize};

/// Per-channel metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelMeta {
    /// Channel name, e.g. `"CT"` or `"T2"`.
    pub name: String,
    /// Element type the channel is stored in.
    pub dtype: DType,
    /// Normalisation readers apply when converting stored values to network input.
    pub norm: Normalization,
}

/// Everything about one case except its voxels (stored as JSON in the file header).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseMeta {
    /// Identifier: `[A-Za-z0-9_.-]`, 1..=128 characters, not starting with `'.'`.
    pub id: String,
    /// Preprocessed grid, `[z, y, x]`.
    pub shape: [usize; 3],
    /// Preprocessed spacing in millimetres, `[z, y, x]`.
    pub spacing: [f64; 3],
    /// The source grid (shape, spacing, affine) before crop and resampling.
    pub original: Geometry,
    /// `[start, end)` per axis `[z, y, x]`, in original voxel indices.
    pub crop_box: [[usize; 2]; 3],
    /// Image channels, in order.
    pub channels: Vec<ChannelMeta>,
    /// Element type of the label map: `U8` or `U16`.
    pub label_dtype: DType,
    /// Class value to class name (may be empty).
    pub label_names: BTreeMap<u16, String>,
    /// Voxel count per class present (background 0 included).
    pub class_voxels: BTreeMap<u16, u64>,
    /// Label value to ignore in the loss (reserved; `None` from ingest for now).
    pub ignore_label: Option<u16>,
    /// The stored label value that marks voxels outside nnU-Net's non-zero mask (nnU-Net's seg
    /// value −1, where `use_mask_for_norm` applies); readers serve such voxels as label 0. It is
    /// never a class of the dataset, nor 255/65535. `None` when the case has no such voxels
    /// (every case not ingested from nnU-Net's preprocessed folders).
    #[serde(default)]
    pub outside_mask_label: Option<u16>,
}

impl CaseMeta {
    /// The metadata of a preprocessed case, its classes named by `label_names`.
    pub fn from_preprocessed(
        pre: &PreprocessedCase,
        label_names: BTreeMap<u16, String>,
    ) -> CaseMeta {
        CaseMeta {
            id: pre.id.clone(),
            shape: pre.shape,
            spacing: pre.spacing,
            original: pre.original.clone(),
            crop_box: pre.crop_box,
            channels: pre
                .channels
                .iter()
                .zip(&pre.norms)
                .zip(&pre.channel_names)
                .map(|((data, norm), name)| ChannelMeta {
                    name: name.clone(),
                    dtype: data.dtype(),
                    norm: *norm,
                })
                .collect(),
            label_dtype: pre.label.dtype(),
            label_names,
            class_voxels: pre.class_voxels.clone(),
            ignore_label: None,
            outside_mask_label: None,
        }
    }
}

/// Which array of a case.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ArrayId {
    /// Image channel with the given index.
    Image(usize),
    /// The label map.
    Label,
}

impl fmt::Display for ArrayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArrayId::Image(c) => write!(f, "image[{c}]"),
            ArrayId::Label => f.write_str("label"),
        }
    }
}

/// Default chunk shape `[z, y, x]`, chosen by the `store_read` benchmark (see benches/RESULTS.md).
pub const DEFAULT_CHUNK_SHAPE: [usize; 3] = [32, 32, 32];

/// Default zstd level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Writer options.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Chunk shape `[z, y, x]`; every axis > 0.
    pub chunk_shape: [usize; 3],
    /// zstd compression level (zstd's own range; negative levels are faster).
    pub zstd_level: i32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            chunk_shape: DEFAULT_CHUNK_SHAPE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// What [`write_case`](crate::write_case) wrote.
#[derive(Clone, Debug)]
pub struct WriteReport {
    /// Bytes of all arrays, uncompressed.
    pub raw_bytes: u64,
    /// Size of the written file.
    pub stored_bytes: u64,
}

/// The arrays of one case, borrowed.
pub struct CaseData<'a> {
    /// Metadata; its `shape`, channel dtypes and `label_dtype` must match the arrays.
    pub meta: &'a CaseMeta,
    /// One buffer per `meta.channels`, each of `product(shape)` voxels.
    pub channels: &'a [VoxelData],
    /// Label map of `product(shape)` voxels.
    pub label: &'a LabelData,
    /// Per foreground class, voxel coordinates `[z, y, x]`.
    pub class_locations: &'a BTreeMap<u16, Vec<[u32; 3]>>,
}

/// Size figures of one stored array.
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayStats {
    /// Which array.
    pub array: ArrayId,
    /// Element type.
    pub dtype: DType,
    /// Number of chunks.
    pub chunks: usize,
    /// Chunks stored as a single value (no payload).
    pub constant_chunks: usize,
    /// Chunks stored uncompressed because zstd did not shrink them.
    pub raw_chunks: usize,
    /// Uncompressed bytes.
    pub raw_bytes: u64,
    /// Bytes of chunk payloads in the file.
    pub stored_bytes: u64,
}

impl ArrayStats {
    /// `raw_bytes / stored_bytes` (infinite when every chunk is constant).
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.raw_bytes, self.stored_bytes)
    }
}

/// Size figures of one case file.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreStats {
    /// Per array, images first, label last.
    pub arrays: Vec<ArrayStats>,
    /// Uncompressed bytes of all arrays.
    pub raw_bytes: u64,
    /// Chunk payload bytes of all arrays.
    pub stored_bytes: u64,
    /// Size of the whole file (payloads, index, class locations, header).
    pub file_bytes: u64,
}

impl StoreStats {
    /// `raw_bytes / file_bytes`: the whole file counts, overhead included.
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.raw_bytes, self.file_bytes)
    }
}

fn ratio(raw: u64, stored: u64) -> f64 {
    if stored == 0 {
        f64::INFINITY
    } else {
        raw as f64 / stored as f64
    }
}

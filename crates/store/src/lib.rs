//! The on-disk chunk store of patchflow: one file per preprocessed case, holding every image
//! channel and the label map cut into zstd-compressed, checksummed chunks, a chunk index and
//! the class-location table used for foreground sampling.
//!
//! It owns the case file format, its reader, writer and chunk cache, and the manifest. It must
//! not preprocess, place patches or talk to the network, and never returns a voxel it could not
//! verify.
//!
//! Training reads many small-to-large boxes (PGPS grows patches from 32³ to 128³ and beyond) at
//! random places of many cases. The store exists so that such a read decodes only the chunks
//! the box touches, from a memory-mapped file, through a bounded cache shared by every reader,
//! and copies each voxel once. Files are written atomically, validated completely when opened
//! and checked chunk by chunk when decoded, so a damaged file yields an error naming the case
//! and chunk, never wrong voxels.
//!
//! The byte layout is specified in `FORMAT.md` beside this crate's manifest.

mod atomic;
mod cache;
mod error;
mod format;
mod manifest;
mod meta;
mod reader;
mod writer;

pub use patchflow_volume::{DType, Element, Geometry, LabelData, Normalization, VoxelData};

pub use atomic::{TEMP_MARKER, atomic_write, is_temp_file_name};
pub use cache::{CacheStats, ChunkCache};
pub use error::StoreError;
pub use format::FORMAT_VERSION;
pub use manifest::{
    CASE_FILE_EXTENSION, MANIFEST_FILE, MANIFEST_FORMAT, MAX_CASE_ID_LEN, Manifest, ManifestCase,
    case_file_name, validate_case_id,
};
pub use meta::{
    ArrayId, ArrayStats, CaseData, CaseMeta, ChannelMeta, DEFAULT_CHUNK_SHAPE, DEFAULT_ZSTD_LEVEL,
    StoreStats, WriteOptions, WriteReport,
};
pub use reader::{BoxRun, CaseReader, KERNEL_READAHEAD_ENV};
pub use writer::write_case;

#[cfg(test)]
mod tests;

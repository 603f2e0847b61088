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
//! A store lives in a local folder or in S3-compatible object storage (`s3://bucket/prefix`,
//! see [`StoreLocation`]), in the same format: case files are written whole (a local rename or
//! one object PUT) and the manifest after them, so a reader never sees half a dataset. Reads of
//! a remote case fetch its structure once and then only the chunk payloads a box needs, as
//! coalesced range requests, beneath the memory cache and an optional [`DiskCache`].
//!
//! The byte layout is specified in `FORMAT.md` beside this crate's manifest.

mod atomic;
mod cache;
mod disk_cache;
mod error;
mod format;
mod location;
mod manifest;
mod meta;
mod reader;
mod remote;
mod writer;

pub use patchflow_volume::{DType, Element, Geometry, LabelData, Normalization, VoxelData};

pub use atomic::{TEMP_MARKER, atomic_write, is_temp_file_name};
pub use cache::{CacheStats, ChunkCache};
pub use disk_cache::{DiskCache, DiskCacheStats};
pub use error::StoreError;
pub use format::FORMAT_VERSION;
pub use location::{ObjectLocation, S3_SCHEME, StoreLocation};
pub use manifest::{
    CASE_FILE_EXTENSION, MANIFEST_FILE, MANIFEST_FORMAT, MAX_CASE_ID_LEN, Manifest, ManifestCase,
    case_file_name, validate_case_id,
};
pub use meta::{
    ArrayId, ArrayStats, CaseData, CaseMeta, ChannelMeta, DEFAULT_CHUNK_SHAPE, DEFAULT_ZSTD_LEVEL,
    StoreStats, WriteOptions, WriteReport,
};
/// The object-storage client crate, for [`set_bucket_client`].
pub use object_store;
pub use reader::{BoxRun, COALESCE_GAP_BYTES, CaseReader, KERNEL_READAHEAD_ENV, MAX_RANGE_BYTES};
pub use remote::{
    MAX_REQUESTS_IN_FLIGHT, MAX_REQUESTS_PER_READ, MULTIPART_PART_BYTES, MULTIPART_THRESHOLD,
    ObjectLock, RemoteStats, bucket_stats, delete_object, get_object, install_crypto_provider,
    list_folders, list_objects, put_object, remote_stats, retry_config, set_bucket_client,
};
pub use writer::write_case;

#[cfg(test)]
mod tests;

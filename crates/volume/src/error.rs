//! The error type of this crate: every variant names the file (or the case) it is about and says
//! what was expected.

use std::path::PathBuf;

/// Everything that can go wrong while reading, checking, preprocessing or writing volumes.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The file could not be opened or read.
    #[error("{path}: cannot read file: {source}", path = path.display())]
    Io {
        /// File being read.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },

    /// The file could not be created or written.
    #[error("{path}: cannot write file: {source}", path = path.display())]
    Write {
        /// File being written.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },

    /// The gzip stream ends early or is damaged.
    #[error("{path}: gzip stream is truncated or corrupt ({source}); the file is damaged or was not fully copied", path = path.display())]
    Gzip {
        /// File being read.
        path: PathBuf,
        /// What the decompressor reported.
        source: std::io::Error,
    },

    /// The bytes are not a NIfTI-1 file.
    #[error("{path}: not a NIfTI-1 file: {reason}", path = path.display())]
    NotNifti {
        /// File being read.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// The file is a NIfTI-2 file, which is not supported.
    #[error("{path}: NIfTI-2 files are not supported; save the image as NIfTI-1 (for example with nibabel's Nifti1Image)", path = path.display())]
    Nifti2 {
        /// File being read.
        path: PathBuf,
    },

    /// The image does not have three spatial dimensions.
    #[error("{path}: {ndim}D image (dim = {dims:?}); a 3D volume is required", path = path.display())]
    NotThreeD {
        /// File being read.
        path: PathBuf,
        /// Number of dimensions in the header (`dim[0]`).
        ndim: usize,
        /// The dimensions `dim[1..=ndim]`.
        dims: Vec<u16>,
    },

    /// A 4D/5D file holds more than one 3D volume.
    #[error("{path}: file holds {volumes} 3D volumes (dim = {dims:?}); {hint}", path = path.display())]
    MultiVolume {
        /// File being read.
        path: PathBuf,
        /// Number of 3D volumes in the file.
        volumes: usize,
        /// The dimensions `dim[1..=ndim]`.
        dims: Vec<u16>,
        /// What to do instead.
        hint: &'static str,
    },

    /// The voxel type is not one patchflow reads.
    #[error("{path}: unsupported NIfTI datatype {name} (code {code}); supported: uint8, int8, uint16, int16, uint32, int32, float32, float64", path = path.display())]
    UnsupportedDatatype {
        /// File being read.
        path: PathBuf,
        /// NIfTI datatype code.
        code: i16,
        /// Name of the datatype.
        name: String,
    },

    /// A header field holds a value that cannot be used.
    #[error("{path}: invalid header field {field}: {reason}", path = path.display())]
    BadHeader {
        /// File being read.
        path: PathBuf,
        /// Header field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The file holds fewer voxel bytes than the header announces.
    #[error("{path}: voxel data is truncated: the header announces {expected} bytes of voxels from offset {offset}, the file holds {actual}", path = path.display())]
    TruncatedData {
        /// File being read.
        path: PathBuf,
        /// Offset of the voxel data (`vox_offset`).
        offset: usize,
        /// Bytes of voxel data the header announces.
        expected: usize,
        /// Bytes of voxel data present.
        actual: usize,
    },

    /// The image holds NaN or infinite values.
    #[error("{path}: image holds {count} NaN/Inf values (first at voxel [z,y,x] = {first:?}); fix or mask them before training", path = path.display())]
    NonFinite {
        /// File being read.
        path: PathBuf,
        /// Number of non-finite voxels.
        count: u64,
        /// First such voxel, `[z, y, x]`.
        first: [usize; 3],
    },

    /// A label map holds a value that is not a class index.
    #[error("{path}: {reason} label value {value} at voxel [z,y,x] = {voxel:?}; label maps must hold integers 0..=65535", path = path.display())]
    BadLabel {
        /// File being read.
        path: PathBuf,
        /// `"non-integer"`, `"negative"` or `"too large"`.
        reason: &'static str,
        /// The offending value.
        value: f64,
        /// Where it is, `[z, y, x]`.
        voxel: [usize; 3],
    },

    /// Two volumes that must share a voxel grid do not.
    #[error("{a} and {b} are not on the same voxel grid: {detail}", a = a.display(), b = b.display())]
    GridMismatch {
        /// First file (the image).
        a: PathBuf,
        /// Second file (the label or another channel).
        b: PathBuf,
        /// Which part differs and by how much.
        detail: String,
    },

    /// Data handed to a writer does not match its geometry, or cannot be stored in NIfTI-1.
    #[error("{path}: cannot write volume: {reason}", path = path.display())]
    InvalidVolume {
        /// File to be written.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A case handed to preprocessing is inconsistent.
    #[error("case {case}: {reason}")]
    InvalidCase {
        /// Case identifier.
        case: String,
        /// What is wrong.
        reason: String,
    },

    /// A JSON file could not be serialised.
    #[error("{path}: cannot write JSON: {source}", path = path.display())]
    Json {
        /// File being written.
        path: PathBuf,
        /// Serialiser error.
        source: serde_json::Error,
    },
}

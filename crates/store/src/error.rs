//! The error type of the store.

use std::path::PathBuf;

use patchflow_volume::DType;

/// Everything that can go wrong while writing, opening or reading a case file or the manifest.
///
/// Every variant names the file or case it concerns and what exactly is wrong.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An operating-system call on `path` failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid case file (or manifest): truncated, inconsistent or damaged.
    #[error("{path}: corrupt or invalid file: {reason}")]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong, with the offending field and value.
        reason: String,
    },
    /// The file was written by a newer (or unknown) version of the format.
    #[error(
        "{path}: format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The file concerned.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A stored chunk does not match its checksum; no data from it was returned.
    #[error("case {case}: checksum mismatch in {array} chunk [z,y,x] = {chunk:?}")]
    Checksum {
        /// Case identifier.
        case: String,
        /// Array name (`image[0]`, `label`).
        array: String,
        /// Chunk grid coordinates `[z, y, x]`.
        chunk: [usize; 3],
    },
    /// The case (or options) handed to the writer are inconsistent.
    #[error("case {case}: invalid input: {reason}")]
    InvalidInput {
        /// Case identifier (as given).
        case: String,
        /// What is wrong.
        reason: String,
    },
    /// A case identifier breaks the naming rule.
    #[error("invalid case id {id:?}: {reason}")]
    InvalidId {
        /// The identifier as given.
        id: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// The case has no such array.
    #[error("case {case}: no array {array} (the case has {channels} image channel(s) and a label)")]
    NoSuchArray {
        /// Case identifier.
        case: String,
        /// The array asked for.
        array: String,
        /// Number of image channels in the case.
        channels: usize,
    },
    /// A typed read asked for another element type than the one stored.
    #[error("case {case}: {array} is stored as {stored}, but {requested} was requested")]
    DTypeMismatch {
        /// Case identifier.
        case: String,
        /// Array name.
        array: String,
        /// Stored element type.
        stored: DType,
        /// Requested element type.
        requested: DType,
    },
    /// A box read was given a bad size or output buffer.
    #[error("case {case}: invalid box read of {array}: {reason}")]
    InvalidBox {
        /// Case identifier.
        case: String,
        /// Array name.
        array: String,
        /// What is wrong.
        reason: String,
    },
    /// A store location (`s3://bucket/prefix`) is malformed.
    #[error("invalid store location {location:?}: {reason}")]
    InvalidLocation {
        /// The location as given.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Object storage could not be used at all (client configuration, request runtime);
    /// failed requests on an object are [`StoreError::Io`] naming its `s3://` location.
    #[error("{location}: {reason}")]
    Remote {
        /// The bucket or object concerned.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// JSON (de)serialisation of a manifest or header failed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn input(case: &str, reason: impl Into<String>) -> Self {
        StoreError::InvalidInput {
            case: case.to_owned(),
            reason: reason.into(),
        }
    }
}

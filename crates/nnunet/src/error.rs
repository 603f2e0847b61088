//! The nnU-Net reader's error type: every error names the file and what in it is wrong.

use std::path::PathBuf;

/// Everything that can go wrong reading an nnU-Net preprocessed folder.
#[derive(Debug, thiserror::Error)]
pub enum NnunetError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is malformed: a field is out of range, a size does not add up, data is truncated.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the field and the limit).
        reason: String,
    },
    /// A file uses a feature this reader does not implement (a codec, a filter, a pickle opcode).
    #[error("{path}: unsupported: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature.
        what: String,
    },
    /// A pickle could not be read.
    #[error("{path}: pickle byte {offset}, opcode {opcode}: {reason}")]
    Pickle {
        /// The `.pkl` file.
        path: PathBuf,
        /// Byte offset of the opcode.
        offset: usize,
        /// The opcode's name (or its byte, when unknown).
        opcode: String,
        /// What is wrong.
        reason: String,
    },
    /// `nnUNetPlans.json` or `dataset.json` could not be understood.
    #[error("{path}: {reason}")]
    Plans {
        /// The JSON file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A case is inconsistent (shapes of data and seg differ, a label is out of range, ...).
    #[error("case {case}: {reason}")]
    Case {
        /// Case identifier.
        case: String,
        /// What is wrong.
        reason: String,
    },
}

impl NnunetError {
    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NnunetError::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error in `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        NnunetError::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An unsupported feature in `path`.
    pub fn unsupported(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        NnunetError::Unsupported {
            path: path.into(),
            what: what.into(),
        }
    }
}

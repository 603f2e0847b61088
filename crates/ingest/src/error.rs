//! The ingest crate's error type.

use std::path::PathBuf;

/// Everything that can stop ingest of a dataset or of one case.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// An ingest setting breaks its rule.
    #[error("invalid ingest setting {field}: {reason}")]
    Setting {
        /// The field of [`crate::IngestOptions`] or [`crate::PlanSettings`].
        field: &'static str,
        /// The value and the rule it breaks.
        reason: String,
    },
    /// The input is neither an nnU-Net raw dataset folder nor a TSV file of pairs.
    #[error("{path}: {reason}")]
    Input {
        /// The input path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `dataset.json` could not be understood.
    #[error("{path}: invalid dataset.json: {reason}")]
    DatasetJson {
        /// Path of `dataset.json`.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A TSV file is malformed.
    #[error("{path}, line {line}: {reason}")]
    Tsv {
        /// Path of the TSV file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A file of a case is missing.
    #[error("case {case}: missing {what} file {path}")]
    MissingFile {
        /// Case id.
        case: String,
        /// `"label"` or `"image channel N"`.
        what: String,
        /// The expected path.
        path: PathBuf,
    },
    /// Reading or preprocessing a volume failed.
    #[error(transparent)]
    Volume(#[from] patchflow_volume::VolumeError),
    /// Reading nnU-Net's preprocessed folder failed.
    #[error(transparent)]
    Nnunet(#[from] patchflow_nnunet::NnunetError),
    /// Writing or reading the store failed.
    #[error(transparent)]
    Store(#[from] patchflow_store::StoreError),
    /// A case is inconsistent with the dataset (e.g. a different number of channels).
    #[error("case {case}: {reason}")]
    Case {
        /// Case id.
        case: String,
        /// What is wrong.
        reason: String,
    },
    /// File system error outside the store format.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Ingest was interrupted by a signal before it finished.
    #[error("interrupted")]
    Interrupted,
}

impl IngestError {
    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IngestError::Io {
            path: path.into(),
            source,
        }
    }
}

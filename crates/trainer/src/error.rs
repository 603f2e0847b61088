//! The error type of the trainer.

use std::path::PathBuf;

/// Everything that can go wrong while training, validating or exporting.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// The offending field (command-line option or struct field).
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The curriculum refused the schedule or pooling.
    #[error(transparent)]
    Curriculum(#[from] patchflow_curriculum::CurriculumError),
    /// The in-process sampler failed.
    #[error(transparent)]
    Sampler(#[from] patchflow_sampler::SamplerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] patchflow_store::StoreError),
    /// Reading or writing a volume failed.
    #[error(transparent)]
    Volume(#[from] patchflow_volume::VolumeError),
    /// The client failed to reach a daemon, or a daemon refused or broke the stream.
    #[error("daemon {endpoint}: {source}")]
    Remote {
        /// The daemon address(es).
        endpoint: String,
        /// The client's error.
        #[source]
        source: patchflow_client::ClientError,
    },
    /// A daemon answered with something the trainer cannot use (a dataset description it cannot
    /// represent, a volume that is not the whole case), or the client could not be started.
    #[error("daemon {endpoint}: {reason}")]
    Daemon {
        /// The daemon address(es).
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
    /// A batch did not have the shape, element type or size the trainer asked for.
    #[error("batch {index}: {reason}")]
    BadBatch {
        /// Batch (global iteration) index.
        index: u64,
        /// What was wrong.
        reason: String,
    },
    /// A case could not be used for validation or export.
    #[error("case {case}: {reason}")]
    Case {
        /// Case identifier.
        case: String,
        /// What was wrong.
        reason: String,
    },
    /// libtorch reported an error.
    #[error("libtorch: {context}: {source}")]
    Torch {
        /// What the trainer was doing.
        context: String,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
    /// A checkpoint is missing, damaged or belongs to another run.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The plot could not be drawn or written.
    #[error("plot {path}: {reason}")]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The batch prefetch thread stopped.
    #[error("batch prefetch stopped: {0}")]
    Prefetch(String),
    /// CUDA was asked for but is not usable.
    #[error("device: {0}")]
    Device(String),
}

impl TrainerError {
    /// Wraps a libtorch error with what the trainer was doing.
    pub fn torch(context: impl Into<String>, source: tch::TchError) -> TrainerError {
        TrainerError::Torch {
            context: context.into(),
            source,
        }
    }

    /// Wraps an I/O error with the path involved.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> TrainerError {
        TrainerError::Io {
            path: path.into(),
            source,
        }
    }

    /// A configuration error.
    pub fn config(field: &'static str, reason: impl Into<String>) -> TrainerError {
        TrainerError::Config {
            field,
            reason: reason.into(),
        }
    }
}

/// Adds context to libtorch results.
pub(crate) trait TorchContext<T> {
    /// Maps a [`tch::TchError`] to [`TrainerError::Torch`] with `context`.
    fn ctx(self, context: &str) -> Result<T, TrainerError>;
}

impl<T> TorchContext<T> for Result<T, tch::TchError> {
    fn ctx(self, context: &str) -> Result<T, TrainerError> {
        self.map_err(|e| TrainerError::torch(context, e))
    }
}

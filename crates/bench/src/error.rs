//! The one error type of the benchmark crate.

use std::path::PathBuf;

/// Why a benchmark could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A setting is out of range.
    #[error("invalid setting {field}: {reason}")]
    Config {
        /// The setting (as on the command line).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A file or folder could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Generating the synthetic dataset failed.
    #[error("generating the dataset: {0}")]
    Volume(#[from] patchflow_volume::VolumeError),
    /// Ingesting the dataset failed.
    #[error("ingesting the dataset: {0}")]
    Ingest(#[from] patchflow_ingest::IngestError),
    /// Some cases failed to ingest.
    #[error("{failed} case(s) failed to ingest; first: {first}")]
    IngestCases {
        /// How many failed.
        failed: usize,
        /// The first failure, `case: reason`.
        first: String,
    },
    /// Opening or sampling the store failed.
    #[error("sampling: {0}")]
    Sampler(#[from] patchflow_sampler::SamplerError),
    /// A store operation failed.
    #[error("store: {0}")]
    Store(#[from] patchflow_store::StoreError),
    /// The daemon could not be started or stopped.
    #[error("daemon ({exe}): {reason}")]
    Daemon {
        /// The `patchflow` binary run as `serve`.
        exe: PathBuf,
        /// What happened, with the end of its log where there is one.
        reason: String,
    },
    /// The daemon answered with an error.
    #[error("client: {0}")]
    Client(#[from] patchflow_client::ClientError),
    /// A client or sampling task ended abnormally.
    #[error("a benchmark task failed: {0}")]
    Task(String),
    /// The benchmark was interrupted.
    #[error("interrupted")]
    Interrupted,
    /// Writing the JSON report failed.
    #[error("writing {path}: {source}")]
    Json {
        /// The report file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Drawing the plot failed.
    #[error(transparent)]
    Plot(#[from] patchflow_plot::PlotError),
}

impl BenchError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BenchError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

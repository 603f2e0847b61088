//! The sampler's error type.

use std::path::PathBuf;

use patchflow_store::StoreError;

/// Everything that can go wrong while opening a dataset or serving a batch.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// A request field is out of its domain (the server maps this to INVALID_ARGUMENT).
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest {
        /// The offending field, as named in [`crate::BatchRequest`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A request is well formed but larger than the configured limits allow.
    #[error("limit exceeded: {what} is {value}, the limit is {limit}")]
    LimitExceeded {
        /// What was measured (`"batch"`, `"patch voxels"`, `"batch bytes"`).
        what: &'static str,
        /// The requested amount.
        value: u64,
        /// The configured limit.
        limit: u64,
    },
    /// A store folder, manifest or case that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A store folder whose cases do not form one consistent dataset.
    #[error("dataset {path}: {reason}")]
    Dataset {
        /// The store folder or case file.
        path: PathBuf,
        /// What is inconsistent.
        reason: String,
    },
    /// A case that cannot serve the request (e.g. none of the weighted classes is present).
    #[error("case {case}: {reason}")]
    Case {
        /// Case identifier.
        case: String,
        /// Why it cannot serve the request.
        reason: String,
    },
    /// An error of the underlying chunk store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A feature the request asks for that this build does not provide yet.
    #[error("unimplemented: {0}")]
    Unimplemented(String),
}

impl SamplerError {
    /// Shorthand for [`SamplerError::InvalidRequest`].
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> SamplerError {
        SamplerError::InvalidRequest {
            field,
            reason: reason.into(),
        }
    }
}

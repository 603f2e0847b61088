//! The server's error type, and the single place where library errors become gRPC statuses.

use std::path::PathBuf;

use patchflow_sampler::SamplerError;
use patchflow_store::StoreError;
use tonic::{Code, Status};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A configuration field is unusable.
    #[error("invalid server configuration: {field}: {reason}")]
    Config {
        /// The offending field of [`crate::ServerConfig`] or [`crate::Limits`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A path given as a store is neither a store nor a folder of stores.
    #[error("{path}: not a store (no manifest.json) and no sub-folder holds a store")]
    NotAStore {
        /// The path as given.
        path: PathBuf,
    },
    /// Two stores would be served under the same dataset name.
    #[error("dataset name {name:?} is served twice: by {first} and by {second}")]
    DuplicateDataset {
        /// The dataset name (a store folder's name).
        name: String,
        /// The store registered first.
        first: PathBuf,
        /// The store that clashes with it.
        second: PathBuf,
    },
    /// A store could not be opened.
    #[error("cannot open store {path}: {source}")]
    Store {
        /// The store folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: SamplerError,
    },
    /// A file system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done (`"binding"`, `"reading folder"`, ...).
        what: &'static str,
        /// The path or address concerned.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The worker pool could not be created.
    #[error("cannot start {threads} sampling worker threads: {source}")]
    Pool {
        /// Threads asked for.
        threads: usize,
        /// The underlying error.
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    /// The reflection service could not load the descriptor set.
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed while serving.
    #[error("gRPC transport failed on {listener}: {source}")]
    Transport {
        /// The listener (`tcp 127.0.0.1:50051`, `unix /run/patchflow.sock`).
        listener: String,
        /// The underlying error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A bearer token is unusable (empty, too long, or with characters a header cannot carry).
    #[error("invalid token ({origin}): {reason}")]
    Token {
        /// Where the token came from (`token file /etc/patchflow/token`, ...).
        origin: String,
        /// What is wrong with it (never the token itself).
        reason: String,
    },
    /// A TLS file is unreadable or malformed, or the certificate and key do not fit together.
    #[error("TLS file {path}: {reason}")]
    Tls {
        /// The PEM file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A store folder's name cannot be a dataset name (requests name datasets by identifier).
    #[error(
        "{path}: the folder name {name:?} cannot be a dataset name: {reason} (rename the folder: \
         1 to 128 characters of A-Z a-z 0-9 _ . -, not starting with '.')"
    )]
    DatasetName {
        /// The store folder.
        path: PathBuf,
        /// Its name.
        name: String,
        /// Which rule the name breaks.
        reason: String,
    },
    /// A TCP listener on a non-loopback address without a token and without an explicit
    /// opt-out.
    #[error(
        "refusing to listen on {address} without a token: any host that reaches it could read \
         every served dataset. Set a token (patchflow serve: --token-file PATH or the \
         PATCHFLOW_TOKEN environment variable; ServerConfig::token; client certificates with \
         --tls-client-ca can be required on top of it), listen on a loopback address or a Unix \
         socket, or accept the risk with --insecure (ServerConfig::insecure)"
    )]
    Unprotected {
        /// The TCP address asked for.
        address: std::net::SocketAddr,
    },
    /// A background task of the server panicked or was cancelled.
    #[error("server task {task} ended abnormally: {reason}")]
    Task {
        /// The task.
        task: String,
        /// Why.
        reason: String,
    },
}

/// Maps a sampler error to the gRPC status a client sees.
///
/// Request errors keep their codes (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND,
/// UNIMPLEMENTED); damaged data is DATA_LOSS; everything else is the server's own failure.
pub fn sampler_status(err: &SamplerError) -> Status {
    let code = match err {
        SamplerError::InvalidRequest { .. } => Code::InvalidArgument,
        SamplerError::LimitExceeded { .. } => Code::ResourceExhausted,
        SamplerError::NotFound(_) => Code::NotFound,
        SamplerError::Unimplemented(_) => Code::Unimplemented,
        SamplerError::Case { .. } => Code::FailedPrecondition,
        SamplerError::Dataset { .. } => Code::Internal,
        SamplerError::Store(store) => return store_status(store),
    };
    Status::new(code, err.to_string())
}

/// Maps a store error to the gRPC status a client sees: damaged or unreadable files are
/// DATA_LOSS, I/O failures INTERNAL.
pub fn store_status(err: &StoreError) -> Status {
    let code = match err {
        StoreError::Corrupt { .. }
        | StoreError::Checksum { .. }
        | StoreError::UnsupportedVersion { .. }
        | StoreError::Json { .. } => Code::DataLoss,
        StoreError::Io { .. }
        | StoreError::InvalidInput { .. }
        | StoreError::InvalidId { .. }
        | StoreError::NoSuchArray { .. }
        | StoreError::DTypeMismatch { .. }
        | StoreError::InvalidBox { .. }
        | StoreError::InvalidLocation { .. }
        | StoreError::Remote { .. } => Code::Internal,
    };
    Status::new(code, err.to_string())
}

impl From<patchflow_proto::token::TokenError> for ServerError {
    fn from(e: patchflow_proto::token::TokenError) -> ServerError {
        ServerError::Token {
            origin: e.origin,
            reason: e.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_keep_their_codes() {
        let cases = [
            (
                SamplerError::InvalidRequest {
                    field: "batch",
                    reason: "must be at least 1".into(),
                },
                Code::InvalidArgument,
            ),
            (
                SamplerError::LimitExceeded {
                    what: "batch bytes",
                    value: 10,
                    limit: 5,
                },
                Code::ResourceExhausted,
            ),
            (SamplerError::NotFound("case x".into()), Code::NotFound),
            (
                SamplerError::Unimplemented("augmentation".into()),
                Code::Unimplemented,
            ),
            (
                SamplerError::Store(StoreError::Checksum {
                    case: "c1".into(),
                    array: "label".into(),
                    chunk: [0, 1, 2],
                }),
                Code::DataLoss,
            ),
            (
                SamplerError::Store(StoreError::Io {
                    path: PathBuf::from("/x"),
                    source: std::io::Error::other("disk gone"),
                }),
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let status = sampler_status(&err);
            assert_eq!(status.code(), code, "{err}");
            assert_eq!(status.message(), err.to_string());
        }
    }
}

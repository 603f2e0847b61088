//! The server's error types, and the single place where errors become gRPC statuses.

use std::path::PathBuf;

use patchflow_grid::{AXIS_NAMES, GridError};
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

/// Why an RPC is refused or a Sample stream ends. Every gRPC status the daemon sends is one
/// of these, turned into a status by the one mapping below ([`StreamError::code`]): a value
/// beyond a limit is RESOURCE_EXHAUSTED, a malformed one INVALID_ARGUMENT, damaged data
/// DATA_LOSS.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    /// A configuration field is malformed.
    #[error("invalid configuration: {field}: {reason}")]
    InvalidField {
        /// The field of `SampleConfig` (or of its augmentation).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A name in a request is not an identifier.
    #[error("invalid {scope}: {reason}")]
    InvalidName {
        /// `configuration` or `request`.
        scope: &'static str,
        /// The field, the name and the rule it breaks.
        reason: String,
    },
    /// The patch size has three edges but one of them is refused: zero or negative
    /// (malformed) or beyond the per-axis limit.
    #[error("{}", patch_message(*.axes, .source))]
    PatchSize {
        /// The edges as sent.
        axes: [i64; 3],
        /// Which rule of the patch type they break.
        source: GridError,
    },
    /// No served dataset has this name.
    #[error("unknown dataset {name:?} (served: {served})")]
    UnknownDataset {
        /// The name asked for.
        name: String,
        /// Every served dataset, comma-separated.
        served: String,
    },
    /// The dataset has no case of this id.
    #[error("dataset {dataset:?} has no case {case:?}")]
    UnknownCase {
        /// The dataset.
        dataset: String,
        /// The case id asked for.
        case: String,
    },
    /// A batch's header alone would not fit the message limit.
    #[error(
        "limit exceeded: a batch of {batch} items needs messages of up to {needed} bytes, the \
         limit is {limit}"
    )]
    MessageLimit {
        /// Items per batch.
        batch: usize,
        /// Bytes a message would need.
        needed: usize,
        /// The daemon's message limit.
        limit: usize,
    },
    /// The sampler refused the request or failed to serve it.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// A read met damaged data and set its case aside.
    #[error(
        "{source}; case {case} is now set aside: later batches of every stream are drawn from \
         the other cases until the daemon restarts"
    )]
    SetAsideNow {
        /// The data error.
        source: SamplerError,
        /// The case set aside.
        case: String,
    },
    /// Every case of the dataset is set aside.
    #[error(
        "dataset {dataset:?}: every case is set aside because its stored data is damaged \
         ({cases}); repair or re-ingest the case files and restart the daemon"
    )]
    EveryCaseSetAside {
        /// The dataset.
        dataset: String,
        /// The set-aside cases and why.
        cases: String,
    },
    /// Every case of the request's explicit list is set aside.
    #[error(
        "dataset {dataset:?}: every requested case is set aside because its stored data is \
         damaged ({cases}); request other cases, or repair the case files and restart the daemon"
    )]
    RequestedCasesSetAside {
        /// The dataset.
        dataset: String,
        /// The requested cases and why they were set aside.
        cases: String,
    },
    /// The daemon is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A job's result never came back.
    #[error("a sampling worker dropped its job")]
    WorkerLost,
    /// A sampling job panicked (the daemon carries on).
    #[error("a sampling job failed unexpectedly (panic: {message}); the daemon carries on")]
    JobPanicked {
        /// The panic's message.
        message: String,
    },
    /// A credit grant beyond the balance limit.
    #[error(
        "credit balance would be {balance}, the limit is {limit} (grant credits as batches arrive)"
    )]
    TooManyCredits {
        /// The balance the grant would make.
        balance: u64,
        /// The limit.
        limit: u32,
    },
    /// The next batch index does not exist.
    #[error("batch index {index} + stride {stride} overflows")]
    IndexOverflow {
        /// The last index.
        index: u64,
        /// The stream's stride.
        stride: u64,
    },
    /// Shared memory asked of a daemon that does not offer it.
    #[error(
        "this daemon does not offer shared memory (it was started without a shared-memory \
         folder); ask for batches inside the messages instead"
    )]
    NoSharedMemory,
    /// More shared-memory slots than the limit.
    #[error("shared_memory.slots is {asked}, the limit is {limit}")]
    TooManySlots {
        /// Slots asked for.
        asked: u32,
        /// The limit.
        limit: u32,
    },
    /// A client message that does not decode.
    #[error("unreadable SampleRequest: {0}")]
    UnreadableRequest(String),
    /// A client message over the size limit.
    #[error("SampleRequest too large: {0}")]
    RequestTooLarge(String),
    /// Every stream slot is taken.
    #[error("too many concurrent sample streams (limit {limit})")]
    TooManyStreams {
        /// The limit.
        limit: usize,
    },
    /// A request without the right credentials.
    #[error("{0}")]
    Unauthenticated(&'static str),
}

impl StreamError {
    /// The status code of this error: the daemon's one mapping of errors to codes.
    pub fn code(&self) -> Code {
        match self {
            StreamError::InvalidField { .. }
            | StreamError::InvalidName { .. }
            | StreamError::UnreadableRequest(_) => Code::InvalidArgument,
            StreamError::PatchSize { source, .. } if source.is_beyond_limit() => {
                Code::ResourceExhausted
            }
            StreamError::PatchSize { .. } => Code::InvalidArgument,
            StreamError::UnknownDataset { .. } | StreamError::UnknownCase { .. } => Code::NotFound,
            StreamError::MessageLimit { .. }
            | StreamError::TooManyCredits { .. }
            | StreamError::TooManySlots { .. }
            | StreamError::RequestTooLarge(_)
            | StreamError::TooManyStreams { .. } => Code::ResourceExhausted,
            StreamError::Sampler(err) | StreamError::SetAsideNow { source: err, .. } => {
                sampler_code(err)
            }
            StreamError::EveryCaseSetAside { .. } => Code::DataLoss,
            StreamError::RequestedCasesSetAside { .. } | StreamError::NoSharedMemory => {
                Code::FailedPrecondition
            }
            StreamError::ShuttingDown => Code::Unavailable,
            StreamError::WorkerLost | StreamError::JobPanicked { .. } => Code::Internal,
            StreamError::IndexOverflow { .. } => Code::OutOfRange,
            StreamError::Unauthenticated(_) => Code::Unauthenticated,
        }
    }
}

impl From<StreamError> for Status {
    fn from(err: StreamError) -> Status {
        Status::new(err.code(), err.to_string())
    }
}

/// The code of a sampler error: request errors keep their codes (INVALID_ARGUMENT,
/// RESOURCE_EXHAUSTED, NOT_FOUND, UNIMPLEMENTED); damaged data is DATA_LOSS; everything else is
/// the server's own failure.
fn sampler_code(err: &SamplerError) -> Code {
    match err {
        SamplerError::InvalidRequest { .. } => Code::InvalidArgument,
        SamplerError::LimitExceeded { .. } => Code::ResourceExhausted,
        SamplerError::NotFound(_) => Code::NotFound,
        SamplerError::Unimplemented(_) => Code::Unimplemented,
        SamplerError::Case { .. } => Code::FailedPrecondition,
        SamplerError::Dataset { .. } => Code::Internal,
        SamplerError::Store(store) => store_code(store),
    }
}

/// The code of a store error: damaged or unreadable files are DATA_LOSS, I/O failures INTERNAL.
fn store_code(err: &StoreError) -> Code {
    match err {
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
    }
}

/// The message of a refused patch: the first offending axis by its index. A malformed edge is
/// an invalid configuration, an edge beyond the per-axis limit a limit exceeded.
fn patch_message(axes: [i64; 3], err: &GridError) -> String {
    let index = |name: &str| AXIS_NAMES.iter().position(|&a| a == name).unwrap_or(0);
    match err {
        GridError::AxisTooLarge { axis, size, max } => format!(
            "limit exceeded: patch_size: axis {} ([z, y, x]) is {size}, the largest accepted is \
             {max} (ServerLimits.max_patch_axis)",
            index(axis)
        ),
        GridError::ZeroAxis { axis } => format!(
            "invalid configuration: patch_size: axis {} ([z, y, x]) is 0, must be at least 1",
            index(axis)
        ),
        // The patch type refuses a negative edge as a malformed triplet: name the first one.
        GridError::BadTriplet { reason, .. } => match axes.iter().position(|&v| v < 0) {
            Some(axis) => format!(
                "invalid configuration: patch_size: axis {axis} ([z, y, x]) is {}, must be at \
                 least 1",
                axes[axis]
            ),
            None => format!("invalid configuration: patch_size: {reason}"),
        },
    }
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
            let message = err.to_string();
            let status = Status::from(StreamError::from(err));
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }
}

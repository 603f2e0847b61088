//! The client's error type.

use tonic::{Code, Status};

/// Why a client call or stream failed. Every variant names the endpoint it concerns.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientError {
    /// No endpoint was given.
    #[error("no endpoint given")]
    NoEndpoints,
    /// An endpoint string could not be parsed.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server answered with an error status that retrying cannot fix (a bad request, an
    /// unknown dataset, a limit, damaged data, ...).
    #[error("{endpoint}: {code:?}: {message}", code = status.code(), message = status.message())]
    Server {
        /// The daemon.
        endpoint: String,
        /// Its answer.
        status: Status,
    },
    /// The daemon stayed unreachable (or kept failing) for every allowed attempt.
    #[error(
        "{endpoint}: gave up after {attempts} attempts; last error: {code:?}: {message}",
        code = last.code(),
        message = last.message()
    )]
    GaveUp {
        /// The daemon.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: Status,
    },
    /// The daemon sent something that breaks the protocol.
    #[error("{endpoint}: protocol error: {reason}")]
    Protocol {
        /// The daemon.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
    /// A stream configuration is unusable before it is even sent.
    #[error("invalid stream configuration: {field}: {reason}")]
    Config {
        /// The offending field of [`crate::StreamConfig`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The background task serving an endpoint is gone (the runtime is shutting down).
    #[error("{endpoint}: the stream's connection task stopped")]
    Closed {
        /// The daemon.
        endpoint: String,
    },
}

impl ClientError {
    /// The gRPC status code behind the error, when there is one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Server { status, .. } => Some(status.code()),
            ClientError::GaveUp { last, .. } => Some(last.code()),
            _ => None,
        }
    }

    /// The server's message, when there is one.
    pub fn message(&self) -> Option<&str> {
        match self {
            ClientError::Server { status, .. } => Some(status.message()),
            ClientError::GaveUp { last, .. } => Some(last.message()),
            _ => None,
        }
    }
}

/// Whether a failure may go away by reconnecting: the daemon is down or restarting, or the
/// connection broke. Refusals of the request itself are final.
pub(crate) fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted
    )
}

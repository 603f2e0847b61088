//! The client's error type.

use tonic::{Code, Status};

impl From<patchflow_proto::token::TokenError> for ClientError {
    fn from(e: patchflow_proto::token::TokenError) -> ClientError {
        ClientError::Credentials {
            origin: e.origin,
            reason: e.reason,
        }
    }
}

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
    /// Shared memory was asked for ([`crate::SharedMemory::On`]) and cannot be used.
    #[error("{endpoint}: shared memory: {reason}")]
    SharedMemory {
        /// The daemon.
        endpoint: String,
        /// Why (the file and what opening it reported).
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
    /// A token or TLS file is unreadable or unusable.
    #[error("invalid credentials ({origin}): {reason}")]
    Credentials {
        /// What was being read (`token file /etc/patchflow/token`, `TLS CA file ca.pem`, ...).
        origin: String,
        /// What is wrong (never the token itself).
        reason: String,
    },
    /// The TLS handshake with a daemon failed for a reason reconnecting cannot cure (an
    /// untrusted or mismatched certificate, a refused client certificate).
    #[error("{endpoint}: TLS handshake failed: {reason}")]
    Tls {
        /// The daemon.
        endpoint: String,
        /// What the TLS layer reported.
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
/// connection broke. Refusals of the request itself, and TLS handshakes refused for a
/// certificate, are final.
pub(crate) fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted
    ) && tls_failure(status).is_none()
}

/// TLS alerts by which a peer refuses a certificate (the names rustls prints).
const CERTIFICATE_ALERTS: [(&str, &str); 8] = [
    (
        "CertificateRequired",
        "the daemon requires a client certificate (TlsOptions::cert and ::key; patchflow-train: \
         --tls-cert and --tls-key)",
    ),
    (
        "BadCertificate",
        "the daemon refused the client certificate",
    ),
    (
        "UnsupportedCertificate",
        "the daemon refused the client certificate (is it issued for client authentication?)",
    ),
    (
        "CertificateRevoked",
        "the daemon refused the client certificate as revoked",
    ),
    (
        "CertificateExpired",
        "the daemon refused the client certificate as expired",
    ),
    (
        "CertificateUnknown",
        "the daemon refused the client certificate",
    ),
    (
        "UnknownCA",
        "the daemon does not trust the CA of the client certificate",
    ),
    (
        "AccessDenied",
        "the daemon denied access to this client certificate",
    ),
];

/// The reason of a TLS handshake that failed over a certificate (the daemon's, or ours as the
/// daemon judged it), with a hint at the fix; `None` for every other failure.
pub(crate) fn tls_failure(status: &Status) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
            && let Some(inner) = io.get_ref()
        {
            let text = inner.to_string();
            if text.starts_with("invalid peer certificate") {
                let hint = if text.contains("UnknownIssuer") {
                    " (trust the daemon's CA: TlsOptions::ca; patchflow-train: --tls-ca)"
                } else if text.contains("not valid for name") {
                    " (check the name on the certificate: TlsOptions::domain; patchflow-train: \
                     --tls-domain)"
                } else {
                    ""
                };
                return Some(format!("{text}{hint}"));
            }
            if let Some(alert) = text.strip_prefix("received fatal alert: ")
                && let Some((_, hint)) = CERTIFICATE_ALERTS.iter().find(|(name, _)| *name == alert)
            {
                return Some(format!("{text}: {hint}"));
            }
        }
        source = e.source();
    }
    None
}

/// The error a failed call ends with, once it is not retried (any more).
pub(crate) fn final_error(endpoint: &str, status: Status, attempts: u32) -> ClientError {
    if let Some(reason) = tls_failure(&status) {
        ClientError::Tls {
            endpoint: endpoint.to_owned(),
            reason,
        }
    } else if is_retryable(&status) {
        ClientError::GaveUp {
            endpoint: endpoint.to_owned(),
            attempts,
            last: status,
        }
    } else {
        ClientError::Server {
            endpoint: endpoint.to_owned(),
            status,
        }
    }
}

/// An error and its sources, joined (transport errors keep the useful part in a source).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let part = inner.to_string();
        // Wrappers often repeat their source's text.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}

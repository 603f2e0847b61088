//! Access control: the bearer token every RPC must carry, the TLS material of the TCP listener,
//! and the rule that names in requests are identifiers, never paths.
//!
//! The token check is one interceptor layered over the whole router, so the Patchflow service,
//! health checking and reflection are all covered by the same code path; no handler checks
//! credentials itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::ServerError;
use crate::error::StreamError;
use crate::metrics::Metrics;
pub use patchflow_proto::token::Secret;

/// Compares `given` with `expected` in time that depends only on the length of `expected`.
fn constant_time_eq(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, &e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= e ^ g;
    }
    std::hint::black_box(diff) == 0
}

/// Checks the `authorization: Bearer <token>` metadata of a request. The message never repeats
/// what the client sent.
fn check_bearer(metadata: &MetadataMap, token: &Secret) -> Result<(), &'static str> {
    let Some(value) = metadata.get("authorization") else {
        return Err(
            "missing credentials: this server requires an `authorization: Bearer <token>` header",
        );
    };
    let value = value.as_bytes();
    let split = value.iter().position(|&b| b == b' ').unwrap_or(value.len());
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err("unsupported credentials: the authorization header must be `Bearer <token>`");
    }
    let given = rest.trim_ascii();
    if constant_time_eq(token.expose().as_bytes(), given) {
        Ok(())
    } else {
        Err("invalid bearer token")
    }
}

/// The interceptor layered over every service of the router.
#[derive(Clone)]
pub(crate) struct Authenticator {
    token: Option<Secret>,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(token: Option<Secret>, metrics: Arc<Metrics>) -> Authenticator {
        Authenticator { token, metrics }
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        match check_bearer(request.metadata(), token) {
            Ok(()) => Ok(request),
            Err(reason) => {
                self.metrics.auth_refused.fetch_add(1, Ordering::Relaxed);
                let peer = request
                    .remote_addr()
                    .map_or_else(|| "local".to_owned(), |a| a.to_string());
                tracing::debug!(%peer, reason, "request refused");
                Err(StreamError::Unauthenticated(reason).into())
            }
        }
    }
}

/// Longest a client may take to complete its TLS handshake before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS material of the TCP listener, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client certificates. When set, every TCP client must present a
    /// certificate signed by one of them (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

fn tls_error(path: &Path, reason: impl Into<String>) -> ServerError {
    ServerError::Tls {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|e| tls_error(path, format!("cannot read: {e}")))
}

/// Reads a PEM file that must hold at least one certificate.
fn read_certificates(path: &Path) -> Result<Vec<u8>, ServerError> {
    let pem = read_pem(path)?;
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| tls_error(path, format!("malformed PEM: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(tls_error(
            path,
            "no certificate in it (expected a `-----BEGIN CERTIFICATE-----` PEM block)",
        ));
    }
    Ok(pem)
}

/// Reads a PEM file that must hold a private key.
fn read_key(path: &Path) -> Result<Vec<u8>, ServerError> {
    let pem = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => tls_error(
            path,
            "no private key in it (expected a `-----BEGIN PRIVATE KEY-----` PEM block)",
        ),
        other => tls_error(path, format!("malformed PEM: {other}")),
    })?;
    Ok(pem)
}

/// Loads and checks the TLS files; every problem names its file.
pub(crate) fn server_tls(files: &TlsFiles) -> Result<ServerTlsConfig, ServerError> {
    let cert = read_certificates(&files.cert)?;
    let key = read_key(&files.key)?;
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read_certificates(ca)?));
    }
    Ok(config)
}

/// Checks a name taken from a request (a dataset name or a case id) against the store's
/// identifier rule, before it is looked up anywhere. `field` names the request field.
pub(crate) fn check_name(field: &str, value: &str) -> Result<(), String> {
    patchflow_store::validate_case_id(value).map_err(|e| {
        let reason = match e {
            patchflow_store::StoreError::InvalidId { reason, .. } => reason,
            other => other.to_string(),
        };
        format!(
            "{field}: {} is not a valid name: {reason} (names are 1 to {} characters of \
             A-Z a-z 0-9 _ . - and do not start with '.')",
            shown(value),
            patchflow_store::MAX_CASE_ID_LEN
        )
    })
}

/// A request string as quoted in a message: escaped, and shortened when long.
fn shown(value: &str) -> String {
    const KEEP: usize = 48;
    if value.chars().count() > KEEP {
        let head: String = value.chars().take(KEEP).collect();
        format!("{head:?}...")
    } else {
        format!("{value:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn secret(s: &str) -> Secret {
        Secret::new(s).unwrap()
    }

    fn with_auth(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", MetadataValue::try_from(value).unwrap());
        m
    }

    #[test]
    fn constant_time_eq_matches_plain_equality() {
        let cases: [(&[u8], &[u8]); 6] = [
            (b"abc", b"abc"),
            (b"abc", b"abd"),
            (b"abc", b"ab"),
            (b"abc", b"abcd"),
            (b"abc", b""),
            (b"x", b"x"),
        ];
        for (a, b) in cases {
            assert_eq!(constant_time_eq(a, b), a == b, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn bearer_check_accepts_only_the_token() {
        let token = secret("s3cret-Token_1");
        assert!(check_bearer(&with_auth("Bearer s3cret-Token_1"), &token).is_ok());
        assert!(check_bearer(&with_auth("bearer s3cret-Token_1"), &token).is_ok());
        for bad in [
            "Bearer s3cret-Token_",
            "Bearer s3cret-Token_12",
            "Bearer",
            "Basic s3cret-Token_1",
            "s3cret-Token_1",
        ] {
            let err = check_bearer(&with_auth(bad), &token).unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
        }
        let err = check_bearer(&MetadataMap::new(), &token).unwrap_err();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn secrets_are_never_printed() {
        let s = secret("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn names_follow_the_store_identifier_rule() {
        for good in ["Dataset001_Liver", "case-1.a", "x"] {
            check_name("dataset", good).unwrap();
        }
        let long = "a".repeat(patchflow_store::MAX_CASE_ID_LEN + 1);
        for bad in [
            "",
            "../x",
            "/etc/passwd",
            "a/b",
            "a\0b",
            "a\u{7}b",
            "é",
            ".hidden",
            &long,
        ] {
            let err = check_name("dataset", bad).unwrap_err();
            assert!(err.starts_with("dataset: "), "{err}");
        }
        assert!(check_name("cases[0]", &long).unwrap_err().contains("..."));
    }

    #[test]
    fn tls_files_are_checked_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let files = TlsFiles {
            cert: junk.clone(),
            key: junk.clone(),
            client_ca: None,
        };
        let err = server_tls(&files).unwrap_err().to_string();
        assert!(
            err.contains("junk.pem") && err.contains("no certificate"),
            "{err}"
        );
        let files = TlsFiles {
            cert: dir.path().join("absent.pem"),
            ..files
        };
        let err = server_tls(&files).unwrap_err().to_string();
        assert!(
            err.contains("absent.pem") && err.contains("cannot read"),
            "{err}"
        );
    }
}

//! Credentials of a client: the bearer token sent with every call, and the TLS settings used
//! for `https://` endpoints.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{Request, Status};

use crate::ClientError;
pub use patchflow_proto::token::Secret;

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone)]
pub(crate) struct Credentials(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Credentials(bearer <redacted>)"
        } else {
            "Credentials(none)"
        })
    }
}

impl Credentials {
    pub(crate) fn new(token: Option<&Secret>) -> Result<Credentials, ClientError> {
        let Some(token) = token else {
            return Ok(Credentials(None));
        };
        let mut value =
            MetadataValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
                ClientError::Credentials {
                    origin: "the given token".into(),
                    reason: "cannot be sent as a header value".into(),
                }
            })?;
        // Keeps the header out of HPACK's shared tables.
        value.set_sensitive(true);
        Ok(Credentials(Some(value)))
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// TLS settings for `https://` endpoints (and for endpoints given without a scheme, when any
/// field is set). Files are PEM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificates to trust instead of the system's roots (a private CA, or the daemon's
    /// own self-signed certificate).
    pub ca: Option<PathBuf>,
    /// Client certificate chain, for daemons that require one (give `key` too).
    pub cert: Option<PathBuf>,
    /// Private key of the client certificate.
    pub key: Option<PathBuf>,
    /// Name to verify the daemon's certificate against, instead of the endpoint's host.
    pub domain: Option<String>,
}

impl TlsOptions {
    /// Whether any field is set (endpoints without a scheme then default to `https://`).
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.domain.is_some()
    }

    /// Loads and checks the files; every problem names its file.
    pub(crate) fn load(&self) -> Result<ClientTlsConfig, ClientError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => {
                config.ca_certificate(Certificate::from_pem(read_certificates(ca, "TLS CA file")?))
            }
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert = read_certificates(cert, "TLS client certificate file")?;
                let key = read_key(key)?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(ClientError::Config {
                    field: "tls",
                    reason: "a client certificate needs both its certificate and its key file"
                        .into(),
                });
            }
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::Credentials {
        origin: format!("{what} {}", path.display()),
        reason: format!("cannot read: {e}"),
    })
}

/// Reads a PEM file that must hold at least one certificate.
fn read_certificates(path: &Path, what: &str) -> Result<Vec<u8>, ClientError> {
    let pem = read_pem(path, what)?;
    let bad = |reason: String| ClientError::Credentials {
        origin: format!("{what} {}", path.display()),
        reason,
    };
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| bad(format!("malformed PEM: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(bad(
            "no certificate in it (expected a `-----BEGIN CERTIFICATE-----` PEM block)".into(),
        ));
    }
    Ok(pem)
}

/// Reads a PEM file that must hold a private key.
fn read_key(path: &Path) -> Result<Vec<u8>, ClientError> {
    let what = "TLS client key file";
    let pem = read_pem(path, what)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| ClientError::Credentials {
        origin: format!("{what} {}", path.display()),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key in it (expected a `-----BEGIN PRIVATE KEY-----` PEM block)".into()
            }
            other => format!("malformed PEM: {other}"),
        },
    })?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_add_the_bearer_header() {
        let token = Secret::new("t0k").unwrap();
        let mut with = Credentials::new(Some(&token)).unwrap();
        let request = with.call(Request::new(())).unwrap();
        let value = request.metadata().get("authorization").unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer t0k");
        assert!(!format!("{with:?}").contains("t0k"));
        let mut without = Credentials::new(None).unwrap();
        let request = without.call(Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn tls_files_are_checked_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\n!!!\n").unwrap();
        let options = TlsOptions {
            ca: Some(junk.clone()),
            ..TlsOptions::default()
        };
        let err = options.load().unwrap_err().to_string();
        assert!(err.contains("junk.pem"), "{err}");
        let options = TlsOptions {
            ca: Some(dir.path().join("absent.pem")),
            ..TlsOptions::default()
        };
        let err = options.load().unwrap_err().to_string();
        assert!(
            err.contains("absent.pem") && err.contains("cannot read"),
            "{err}"
        );
        let options = TlsOptions {
            cert: Some(junk),
            ..TlsOptions::default()
        };
        let err = options.load().unwrap_err().to_string();
        assert!(err.contains("both"), "{err}");
    }
}

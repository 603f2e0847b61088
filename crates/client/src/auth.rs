//! Credentials of a client: the bearer token sent with every call, and the TLS settings used
//! for `https://` endpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{Request, Status};

use crate::ClientError;

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// A bearer token. Its value is never printed: `Debug` shows `Secret(<redacted>)`.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// A token given directly (e.g. from the environment): 1 to [`MAX_TOKEN_BYTES`] visible
    /// ASCII characters without spaces.
    pub fn new(token: impl Into<String>) -> Result<Secret, ClientError> {
        Secret::checked(token.into(), "the given token")
    }

    /// Reads a token from `path`; one trailing line break (`\n` or `\r\n`) is dropped. An
    /// empty file, or one whose content is not a usable token, is an error naming the file.
    pub fn from_file(path: &Path) -> Result<Secret, ClientError> {
        let origin = format!("token file {}", path.display());
        let bytes = std::fs::read(path).map_err(|e| ClientError::Credentials {
            origin: origin.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ClientError::Credentials {
            origin: origin.clone(),
            reason: "not UTF-8 text".into(),
        })?;
        let token = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text)
            .to_owned();
        Secret::checked(token, &origin)
    }

    fn checked(token: String, origin: &str) -> Result<Secret, ClientError> {
        let bad = |reason: String| ClientError::Credentials {
            origin: origin.to_owned(),
            reason,
        };
        if token.is_empty() {
            return Err(bad("empty (a token needs at least one character)".into()));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(bad(format!(
                "{} bytes long, at most {MAX_TOKEN_BYTES} allowed",
                token.len()
            )));
        }
        if let Some(at) = token.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
            return Err(bad(format!(
                "byte {at} is a space, a control character or not ASCII (a token is visible \
                 ASCII characters only, so that it can travel in an HTTP header)"
            )));
        }
        Ok(Secret(token.into()))
    }
}

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
        let mut value = MetadataValue::try_from(format!("Bearer {}", token.0)).map_err(|_| {
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
    fn token_files_drop_one_line_break_and_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").unwrap();
        let s = Secret::from_file(&path).unwrap();
        assert_eq!(&*s.0, "abc");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        for bad in ["", "\n", "a b", "abc\n\n"] {
            std::fs::write(&path, bad).unwrap();
            let err = Secret::from_file(&path).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
        std::fs::write(&path, "\n").unwrap();
        let err = Secret::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

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

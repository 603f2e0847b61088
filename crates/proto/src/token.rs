//! The bearer token of the contract: every RPC of a daemon started with a token carries
//! `authorization: Bearer <token>`. The daemon and its clients read and check tokens by the same
//! rule, so they live with the contract.

use std::path::Path;
use std::sync::Arc;

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// A bearer token. Its value is never printed: `Debug` shows `Secret(<redacted>)`, and it has no
/// `Display` and no `PartialEq` (a daemon compares tokens in constant time).
#[derive(Clone)]
pub struct Secret(Arc<str>);

/// Why a token is unusable. Never quotes the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid token ({origin}): {reason}")]
pub struct TokenError {
    /// Where the token came from (`token file /etc/patchflow/token`, `the given token`, ...).
    pub origin: String,
    /// What is wrong with it.
    pub reason: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// A token given directly (e.g. from the environment): 1 to [`MAX_TOKEN_BYTES`] visible
    /// ASCII characters without spaces, so that it can travel in an HTTP header.
    pub fn new(token: impl Into<String>) -> Result<Secret, TokenError> {
        Secret::checked(token.into(), "the given token")
    }

    /// Reads a token from `path`; one trailing line break (`\n` or `\r\n`) is dropped. An
    /// unreadable or empty file, or one whose content is not a usable token, is an error
    /// naming the file.
    pub fn from_file(path: &Path) -> Result<Secret, TokenError> {
        let origin = format!("token file {}", path.display());
        let bad = |reason: String| TokenError {
            origin: origin.clone(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        let token = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text)
            .to_owned();
        Secret::checked(token, &origin)
    }

    /// The token itself, for the transport (a header, a constant-time comparison). Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn checked(token: String, origin: &str) -> Result<Secret, TokenError> {
        let bad = |reason: String| TokenError {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_drop_one_line_break_and_name_the_file() {
        let dir = std::env::temp_dir().join(format!("patchflow-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        for (content, ok) in [
            ("abc\n", true),
            ("abc\r\n", true),
            ("abc", true),
            ("\n", false),
            ("", false),
            ("abc\n\n", false),
            ("a b\n", false),
        ] {
            std::fs::write(&path, content).unwrap();
            match Secret::from_file(&path) {
                Ok(s) => {
                    assert!(ok, "{content:?} accepted");
                    assert_eq!(s.expose(), "abc");
                    assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
                }
                Err(e) => {
                    assert!(!ok, "{content:?} refused: {e}");
                    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
                    assert!(
                        !e.to_string().contains("abc"),
                        "the token is never quoted: {e}"
                    );
                }
            }
        }
        std::fs::write(&path, "\n").unwrap();
        assert!(
            Secret::from_file(&path)
                .unwrap_err()
                .reason
                .contains("empty")
        );
        let err = Secret::from_file(&dir.join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing") && err.reason.contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
        let long = "x".repeat(MAX_TOKEN_BYTES + 1);
        assert!(
            Secret::new(long)
                .unwrap_err()
                .reason
                .contains("at most 4096")
        );
        assert!(Secret::new("t\u{e9}").is_err());
    }
}

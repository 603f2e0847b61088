//! The bearer token of the contract: every RPC of a daemon started with a token carries
//! `authorization: Bearer <token>`. The daemon and its clients read and check tokens by the same
//! rule, and both binaries take it from the same places, so they live with the contract.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// The environment variable a command line takes the token from when no token file is given
/// (kept off the command line, where other users of the host could read it).
pub const TOKEN_ENV: &str = "PATCHFLOW_TOKEN";

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

    /// The token of a command line (`patchflow serve`, `patchflow-train`): read from `file`
    /// (`--token-file`) or taken from the [`TOKEN_ENV`] environment variable, not both; `None`
    /// when neither is given.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Secret>, TokenError> {
        Secret::from_file_or_value(file, std::env::var_os(TOKEN_ENV))
    }

    /// [`Secret::from_file_or_env`] with the environment's value given.
    fn from_file_or_value(
        file: Option<&Path>,
        env: Option<OsString>,
    ) -> Result<Option<Secret>, TokenError> {
        let from_env = format!("the {TOKEN_ENV} environment variable");
        match (file, env) {
            (Some(path), Some(_)) => Err(TokenError {
                origin: format!("token file {} and {from_env}", path.display()),
                reason: format!(
                    "give the token either in a file (--token-file) or in {TOKEN_ENV}, not both"
                ),
            }),
            (Some(path), None) => Secret::from_file(path).map(Some),
            (None, Some(value)) => {
                let value = value.into_string().map_err(|_| TokenError {
                    origin: from_env.clone(),
                    reason: "not UTF-8 text".into(),
                })?;
                Secret::checked(value, &from_env).map(Some)
            }
            (None, None) => Ok(None),
        }
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

    #[test]
    fn a_command_line_token_comes_from_a_file_or_the_environment_not_both() {
        let dir = std::env::temp_dir().join(format!("patchflow-token-cl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "from-file\n").unwrap();
        let env = |v: &str| Some(OsString::from(v));
        assert!(Secret::from_file_or_value(None, None).unwrap().is_none());
        let s = Secret::from_file_or_value(Some(&path), None)
            .unwrap()
            .unwrap();
        assert_eq!(s.expose(), "from-file");
        let s = Secret::from_file_or_value(None, env("from-env"))
            .unwrap()
            .unwrap();
        assert_eq!(s.expose(), "from-env");
        let both = Secret::from_file_or_value(Some(&path), env("from-env")).unwrap_err();
        assert!(both.reason.contains("not both"), "{both}");
        assert!(both.to_string().contains(TOKEN_ENV), "{both}");
        assert!(!both.to_string().contains("from-"), "never quoted: {both}");
        // An empty or unusable variable is an error naming it, not an absent token.
        let empty = Secret::from_file_or_value(None, env("")).unwrap_err();
        assert!(empty.origin.contains(TOKEN_ENV) && empty.reason.contains("empty"));
        let spaced = Secret::from_file_or_value(None, env("a b")).unwrap_err();
        assert!(!spaced.to_string().contains("a b"), "{spaced}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `patchflow serve` refuses to listen beyond loopback without a token unless told
//! `--insecure`, and says how to fix it.

mod common;

use std::process::{Command, Stdio};

use common::{phantom_store, s};

#[test]
fn non_loopback_listen_without_token_is_refused_with_the_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let store = phantom_store(dir.path(), 1, "16,24,24");
    let err = serve_fails(&store, &[]);
    assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
    assert!(
        err.contains("--insecure") && err.contains("--token-file"),
        "{err}"
    );

    // An empty token file is an error naming the file, before anything listens.
    let empty = dir.path().join("token");
    std::fs::write(&empty, "\n").unwrap();
    let err = serve_fails(&store, &["--token-file", s(&empty)]);
    assert!(err.contains(s(&empty)), "{err}");
}

/// Runs `patchflow serve STORE --listen 0.0.0.0:0 EXTRA` without a token in the environment,
/// asserts that it fails, and returns its standard error.
fn serve_fails(store: &std::path::Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_patchflow"))
        .args(["--quiet", "serve", s(store), "--listen", "0.0.0.0:0"])
        .args(extra)
        .env_remove("PATCHFLOW_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {extra:?} must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

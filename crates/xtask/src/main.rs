//! Project tasks behind `cargo xtask ...` (see `.cargo/config.toml`).
//!
//! The two commands the README gives for a fresh machine live here, so that each can install what
//! it needs before it runs: `cargo xtask demo` runs the main job end to end, `cargo xtask test`
//! runs every test (CI runs exactly this).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&root, &args[1..]),
        Some("demo") => demo(&root, &args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 demo [DIR]   generate a phantom dataset, ingest it and report (default DIR: demo-out)\n  \
                 test [ARGS]  run the whole test suite (extra ARGS go to cargo test)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or(manifest_dir)
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().map_err(|e| format!("could not start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

/// Runs every test of the workspace.
fn test(root: &Path, extra: &[String]) -> Result<(), String> {
    run(cargo()
        .current_dir(root)
        .args(["test", "--workspace", "--exclude", "xtask"])
        .args(extra))
}

/// The main job: phantom dataset → ingest → inspect, leaving everything under DIR.
fn demo(root: &Path, extra: &[String]) -> Result<(), String> {
    let out = root.join(extra.first().map(String::as_str).unwrap_or("demo-out"));
    run(cargo()
        .current_dir(root)
        .args(["build", "--release", "-p", "patchflow"]))?;
    let bin = root.join("target/release/patchflow");
    run(Command::new(&bin).arg("demo").arg("--out").arg(&out))
}

//! Project tasks behind `cargo xtask ...` (see `.cargo/config.toml`).
//!
//! It owns the project's developer tasks. No crate depends on it, and it holds no product logic:
//! it only builds, installs and runs what the other crates provide.
//!
//! The two commands the README gives for a fresh machine live here, so that each can install what
//! it needs before it runs: `cargo xtask demo` runs the main job end to end, `cargo xtask test`
//! runs every test (CI runs exactly this): the workspace's Rust tests, then the Python tests of
//! the `patchflow` package in the project's Python environment (see [`pyenv`]). Both first
//! install libtorch for the trainer (`cargo xtask libtorch`) when it is absent.

mod pyenv;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    let result = match args.first().map(String::as_str) {
        Some("test") => libtorch(&root).and_then(|()| test(&root, &args[1..])),
        Some("demo") => libtorch(&root).and_then(|()| demo(&root, &args[1..])),
        Some("libtorch") => libtorch(&root),
        Some("pyenv") => libtorch(&root).and_then(|()| {
            let py = pyenv::pyenv(&root)?;
            pyenv::install_wheel(&root, &py)?;
            eprintln!("pyenv: ready: {}", py.display());
            Ok(())
        }),
        Some("pytest") => libtorch(&root).and_then(|()| pyenv::pytest(&root, &args[1..])),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 demo [DIR]   phantom dataset -> ingest -> serve -> PGPS training -> report (default DIR: demo-out)\n  \
                 test [ARGS]  run the whole test suite: cargo test (extra ARGS go there), then pytest\n  \
                 libtorch     install libtorch for the trainer under target/ (if absent)\n  \
                 pyenv        build the Python environment target/pyenv with the patchflow wheel\n  \
                 pytest [ARGS] the Python tests only (extra ARGS go to pytest)"
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

/// A cargo command that sees the project's libtorch (also set by `.cargo/config.toml`; set
/// here too so that it holds whatever configuration the caller has).
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("LIBTORCH", libtorch_dir(&workspace_root()));
    cmd
}

/// The PyTorch wheel the trainer's `tch` binding is built against, and the two CUDA runtime
/// wheels its `libtorch_cuda.so` needs at link time. No CPU-only libtorch for Linux x86_64 is
/// published on PyPI; this set (about 540 MB) links and runs on CPU-only machines, and on GPU
/// machines once `libtorch_cuda.so` finds the rest of CUDA.
const LIBTORCH_WHEELS: [&str; 3] = [
    "torch==2.11.0",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cupti==13.0.85",
];

/// Where the wheels are installed (`pip install --target`).
pub(crate) fn libtorch_prefix(root: &Path) -> PathBuf {
    root.join("target").join("libtorch-py")
}

/// The libtorch folder tch builds against (`LIBTORCH`).
fn libtorch_dir(root: &Path) -> PathBuf {
    libtorch_prefix(root).join("torch")
}

/// Whether a complete install of the pinned torch is present.
fn libtorch_present(root: &Path) -> bool {
    let prefix = libtorch_prefix(root);
    prefix.join("torch-2.11.0.dist-info").is_dir()
        && libtorch_dir(root)
            .join("lib")
            .join("libtorch_cpu.so")
            .is_file()
        && libtorch_dir(root).join("include").is_dir()
}

/// Installs libtorch under `target/libtorch-py` unless it is already there. The wheels go to a
/// staging folder first, renamed into place only when pip succeeded, so an interrupted install
/// is redone rather than used.
fn libtorch(root: &Path) -> Result<(), String> {
    let prefix = libtorch_prefix(root);
    if libtorch_present(root) {
        eprintln!("libtorch: present in {}", prefix.display());
        return Ok(());
    }
    let staging = root.join("target").join("libtorch-py.partial");
    for dir in [&staging, &prefix] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| format!("could not remove {}: {e}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(root.join("target"))
        .map_err(|e| format!("could not create {}: {e}", root.join("target").display()))?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!(
        "libtorch: installing {} into {} (about 540 MB)",
        LIBTORCH_WHEELS.join(" "),
        prefix.display()
    );
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--no-deps",
            "--target",
        ])
        .arg(&staging)
        .args(LIBTORCH_WHEELS))
    .map_err(|e| {
        format!(
            "{e}\nlibtorch needs Python 3 with pip (e.g. `apt-get install python3-pip`); set \
             PYTHON to use another interpreter"
        )
    })?;
    std::fs::rename(&staging, &prefix).map_err(|e| {
        format!(
            "could not move {} to {}: {e}",
            staging.display(),
            prefix.display()
        )
    })?;
    if !libtorch_present(root) {
        return Err(format!(
            "pip finished but {} holds no usable libtorch",
            prefix.display()
        ));
    }
    Ok(())
}

pub(crate) fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("could not start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

/// Runs every test of the workspace, then the Python tests.
///
/// A failure reports the space left on the target folder's disk, since a full disk shows up as a
/// bare linker error.
fn test(root: &Path, extra: &[String]) -> Result<(), String> {
    let with_disk = |e: String| match free_space(&root.join("target")) {
        Some(free) => format!("{e} (disk space left for target/: {free})"),
        None => e,
    };
    let mut cmd = cargo();
    cmd.current_dir(root)
        // The Python package has no Rust tests (pytest runs them below, on the wheel maturin
        // builds): building it here too would only rebuild pyo3 for another configuration.
        .args([
            "test",
            "--workspace",
            "--exclude",
            "xtask",
            "--exclude",
            "patchflow-python",
        ])
        .args(extra);
    run(&mut cmd).map_err(with_disk)?;
    pyenv::pytest(root, &[]).map_err(with_disk)
}

/// Space left on the disk holding `dir`, as `df` prints it, if `df` can tell.
fn free_space(dir: &Path) -> Option<String> {
    let out = Command::new("df")
        .arg("-h")
        .arg("--output=avail")
        .arg(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().nth(1).map(|l| l.trim().to_string())
}

/// The main job: phantom dataset → ingest → serve → PGPS training → report, all under DIR.
fn demo(root: &Path, extra: &[String]) -> Result<(), String> {
    let out = root.join(extra.first().map(String::as_str).unwrap_or("demo-out"));
    run(cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "patchflow",
        "-p",
        "patchflow-trainer",
    ]))?;
    let bin = root.join("target/release/patchflow");
    run(Command::new(&bin)
        .arg("demo")
        .arg("--out")
        .arg(&out)
        .arg("--train-bin")
        .arg(root.join("target/release/patchflow-train")))
}

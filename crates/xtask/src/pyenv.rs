//! The project's Python environment and the Python test run.
//!
//! Several parts of the project test against Python tools (the `patchflow` package, and
//! whatever other engineers list in `crates/xtask/pyenv-requirements.txt`). They share ONE
//! environment: `target/pyenv` (or the interpreter named by `PATCHFLOW_PYTHON`). Building it:
//!
//! 1. a venv from `python3` (or `$PYTHON`) when absent;
//! 2. torch without a second download: the venv sees the PyPI torch wheel that
//!    `cargo xtask libtorch` installed for the trainer (`target/libtorch-py`, through a `.pth`
//!    file), and stand-ins for the CUDA libraries that wheel links against but a CPU machine
//!    lacks (`benches/compare/cuda_stubs.py`, loaded at start-up from `target/pyenv/cuda-stubs`,
//!    so the trainer's libtorch folder stays untouched);
//! 3. the requirements file, installing only the lines not yet satisfied; pip resolves them
//!    once (`--dry-run --report`), and everything but torch and the NVIDIA/CUDA/Triton wheels
//!    is installed with `--no-deps`, so packages that depend on torch (nnunetv2, MONAI) never
//!    pull the 2.5 GB CUDA stack;
//! 4. the `patchflow` wheel, built from `crates/python` with maturin (in the workspace's
//!    target folder, so it reuses the workspace's builds) and installed.
//!
//! Every step is skipped when its result is present, so a ready environment costs seconds.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run;

/// The requirements file, relative to the workspace root.
const REQUIREMENTS: &str = "crates/xtask/pyenv-requirements.txt";

/// Packages never installed into the environment: torch comes from the trainer's libtorch
/// install, and the NVIDIA, CUDA and Triton wheels (about 2.5 GB) serve GPUs only.
fn provided_or_gpu_only(name: &str) -> bool {
    let norm = name.to_ascii_lowercase().replace(['_', '.'], "-");
    norm == "torch" || norm == "triton" || norm.starts_with("nvidia-") || norm.starts_with("cuda-")
}

/// Lists the requirement lines the interpreter does not satisfy (one per output line).
const UNSATISFIED: &str = r##"
import sys
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        print(line)
        continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        print(line)
"##;

/// Prints `name==version` for every package of a pip `--report` file, one per line.
const REPORT: &str = r#"
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(f"{item['metadata']['name']}=={item['metadata']['version']}")
"#;

/// Loads the CUDA stand-ins (written at start-up through a `.pth` file).
const STUB_LOADER: &str = r#""""Loads stand-ins for the CUDA libraries the PyPI torch wheel links against and this
machine lacks (written by `cargo xtask pyenv`; see crates/xtask/src/pyenv.rs)."""
import ctypes
import os

_DIR = {dir!r}
if os.path.isdir(_DIR):
    for _name in sorted(os.listdir(_DIR)):
        if ".so" in _name:
            ctypes.CDLL(os.path.join(_DIR, _name), mode=ctypes.RTLD_GLOBAL)
"#;

/// The environment's folder.
pub(crate) fn pyenv_dir(root: &Path) -> PathBuf {
    root.join("target").join("pyenv")
}

/// The interpreter of the environment: `PATCHFLOW_PYTHON`, or `target/pyenv/bin/python`.
pub(crate) fn python(root: &Path) -> PathBuf {
    match std::env::var_os("PATCHFLOW_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => pyenv_dir(root).join("bin").join("python"),
    }
}

/// Output of `cmd` (stdout), or an error with its stderr.
fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("could not start {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `text` to `path` unless it already holds exactly that.
fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    std::fs::write(path, text).map_err(|e| format!("could not write {}: {e}", path.display()))
}

/// Builds or refreshes the environment (see the module docs); returns its interpreter.
pub(crate) fn pyenv(root: &Path) -> Result<PathBuf, String> {
    let py = python(root);
    if std::env::var_os("PATCHFLOW_PYTHON").is_none_or(|p| p.is_empty()) && !py.is_file() {
        let base = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let dir = pyenv_dir(root);
        eprintln!("pyenv: creating {}", dir.display());
        run(Command::new(&base).args(["-m", "venv"]).arg(&dir)).map_err(|e| {
            format!(
                "{e}\nthe Python tests need Python >= 3.11 with venv and pip (e.g. `apt-get \
                 install python3-venv`); set PYTHON to use another interpreter, or \
                 PATCHFLOW_PYTHON to use an existing environment"
            )
        })?;
    }
    link_torch(root, &py)?;
    install_requirements(root, &py)?;
    Ok(py)
}

/// Makes the trainer's torch importable from the environment (see the module docs).
fn link_torch(root: &Path, py: &Path) -> Result<(), String> {
    let prefix = crate::libtorch_prefix(root);
    if !prefix.join("torch").is_dir() {
        return Err(format!(
            "{} is missing: run `cargo xtask libtorch` first",
            prefix.display()
        ));
    }
    let site = output(Command::new(py).args([
        "-c",
        "import sysconfig; print(sysconfig.get_paths()['purelib'])",
    ]))?;
    let site = PathBuf::from(site.trim());
    let stubs = pyenv_dir(root).join("cuda-stubs");
    let done = stubs.join(".complete");
    if !done.is_file() {
        eprintln!(
            "pyenv: writing stand-ins for the CUDA libraries torch links against into {}",
            stubs.display()
        );
        if stubs.exists() {
            std::fs::remove_dir_all(&stubs)
                .map_err(|e| format!("could not remove {}: {e}", stubs.display()))?;
        }
        std::fs::create_dir_all(&stubs)
            .map_err(|e| format!("could not create {}: {e}", stubs.display()))?;
        run(Command::new(py)
            .arg(root.join("benches/compare/cuda_stubs.py"))
            .arg(prefix.join("torch"))
            .arg(&stubs))?;
        write_if_changed(&done, "")?;
    }
    let loader = STUB_LOADER.replace("{dir!r}", &format!("{:?}", stubs.display().to_string()));
    write_if_changed(&site.join("_patchflow_cuda_stubs.py"), &loader)?;
    write_if_changed(
        &site.join("patchflow-torch.pth"),
        &format!("{}\nimport _patchflow_cuda_stubs\n", prefix.display()),
    )?;
    Ok(())
}

/// Installs the requirement lines the environment does not satisfy yet.
fn install_requirements(root: &Path, py: &Path) -> Result<(), String> {
    let file = root.join(REQUIREMENTS);
    let missing = output(Command::new(py).arg("-c").arg(UNSATISFIED).arg(&file))?;
    let missing: Vec<&str> = missing.lines().filter(|l| !l.trim().is_empty()).collect();
    if missing.is_empty() {
        eprintln!("pyenv: every requirement of {REQUIREMENTS} is installed");
        return Ok(());
    }
    eprintln!("pyenv: installing {}", missing.join(" "));
    let report = pyenv_dir(root).join("pip-report.json");
    run(pip_install(py)
        .args(["--dry-run", "--report"])
        .arg(&report)
        .args(&missing))?;
    let resolved = output(Command::new(py).arg("-c").arg(REPORT).arg(&report))?;
    let _ = std::fs::remove_file(&report);
    let install: Vec<&str> = resolved
        .lines()
        .filter(|l| {
            let name = l.split("==").next().unwrap_or(l);
            !l.trim().is_empty() && !provided_or_gpu_only(name)
        })
        .collect();
    if install.is_empty() {
        return Ok(());
    }
    run(pip_install(py).arg("--no-deps").args(&install))
}

/// `python -m pip install` in the environment of `py`, quiet, without pip's version check.
fn pip_install(py: &Path) -> Command {
    let mut command = Command::new(py);
    command.args(["-m", "pip", "install", "-q", "--disable-pip-version-check"]);
    command
}

/// Builds the `patchflow` wheel from `crates/python` and installs it; returns the wheel.
pub(crate) fn install_wheel(root: &Path, py: &Path) -> Result<PathBuf, String> {
    let out = root.join("target").join("wheels").join("patchflow");
    if out.exists() {
        std::fs::remove_dir_all(&out)
            .map_err(|e| format!("could not remove {}: {e}", out.display()))?;
    }
    // maturin runs cargo with the workspace's target folder and the dev profile, reusing the
    // builds of `cargo test`.
    run(Command::new(py)
        .args([
            "-m",
            "maturin",
            "build",
            "--quiet",
            "--profile",
            "dev",
            "-m",
        ])
        .arg(root.join("crates/python/Cargo.toml"))
        .arg("-i")
        .arg(py)
        .arg("--out")
        .arg(&out)
        .current_dir(root))?;
    let wheel = std::fs::read_dir(&out)
        .map_err(|e| format!("could not read {}: {e}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("maturin wrote no wheel into {}", out.display()))?;
    run(pip_install(py)
        .args(["--no-deps", "--force-reinstall"])
        .arg(&wheel))?;
    Ok(wheel)
}

/// Runs the Python tests (`crates/python/tests`) with pytest against the daemon and the Rust
/// client example built here. `extra` goes to pytest.
pub(crate) fn pytest(root: &Path, extra: &[String]) -> Result<(), String> {
    let py = pyenv(root)?;
    install_wheel(root, &py)?;
    // The daemon and the Rust client example the tests compare against.
    run(crate::cargo().current_dir(root).args([
        "build",
        "--quiet",
        "-p",
        "patchflow",
        "--bin",
        "patchflow",
        "--example",
        "stream_batches",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let status = Command::new(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("crates/python/tests"))
        .args(extra)
        .env("PATCHFLOW_BIN", target.join("debug/patchflow"))
        .env(
            "PATCHFLOW_RUST_CLIENT",
            target.join("debug/examples/stream_batches"),
        )
        .current_dir(root)
        .status()
        .map_err(|e| format!("could not start pytest: {e}"))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(5) => Err("pytest collected no test".into()),
        _ => Err(format!("the Python tests failed ({status})")),
    }
}

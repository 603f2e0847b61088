"""Fixtures of the Python package's tests: a small phantom store and `patchflow serve` daemons
on Unix sockets in a temporary folder (no ports, no sleeps: the client retries until the
socket answers).

`cargo xtask test` (and `cargo xtask pytest`) build the wheel, the daemon and the Rust client
example, and point `PATCHFLOW_BIN` and `PATCHFLOW_RUST_CLIENT` at them; run by hand, the tests
look for them in `target/debug/` of the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _binary(env: str, default: Path) -> Path:
    path = Path(os.environ.get(env) or default)
    if not path.is_file():
        pytest.skip(f"{path} not built (run `cargo xtask pytest`)")
    return path


@pytest.fixture(scope="session")
def patchflow_bin() -> Path:
    """The `patchflow` binary (the daemon, `phantom`, `ingest`, `schedule`)."""
    return _binary("PATCHFLOW_BIN", ROOT / "target/debug/patchflow")


@pytest.fixture(scope="session")
def rust_client_bin() -> Path:
    """`examples/stream_batches.rs`: batches fetched by the Rust client, written out."""
    return _binary("PATCHFLOW_RUST_CLIENT", ROOT / "target/debug/examples/stream_batches")


def run(cmd: list[str | os.PathLike[str]], **kwargs) -> subprocess.CompletedProcess[str]:
    """Runs `cmd`, failing the test with its output when it fails."""
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        pytest.fail(f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="session")
def store(patchflow_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 4 phantom cases of 40×64×64 voxels (dataset name `phantom`)."""
    base = tmp_path_factory.mktemp("data")
    raw, store = base / "raw", base / "phantom"
    run([patchflow_bin, "--quiet", "phantom", raw, "--cases", "4", "--shape", "40,64,64"])
    run([patchflow_bin, "--quiet", "ingest", raw, "--out", store])
    return store


class Daemon:
    """A `patchflow serve` child process on a Unix socket."""

    def __init__(self, patchflow_bin: Path, stores: list[Path], socket: Path, *extra: str) -> None:
        self.socket = socket
        self.endpoint = f"unix:{socket}"
        self.log = socket.with_suffix(".log")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(patchflow_bin), "--quiet", "serve", *map(str, stores), "--no-tcp", "--unix", str(socket),
                 "--workers", "2", *extra],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "PATCHFLOW_TOKEN"},
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="session")
def start_daemon(patchflow_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    """Starts daemons on demand (`start_daemon(stores, *extra_args)`); all stop at the end."""
    daemons: list[Daemon] = []
    # Short path: Unix socket paths are limited to ~100 bytes.
    sockets = Path(tmp_path_factory.mktemp("sock"))

    def start(stores: list[Path], *extra: str) -> Daemon:
        d = Daemon(patchflow_bin, stores, sockets / f"d{len(daemons)}.sock", *extra)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.stop()


@pytest.fixture(scope="session")
def daemon(store: Path, start_daemon) -> Daemon:
    """The daemon most tests share: serves `phantom`, shared memory on."""
    return start_daemon([store])


@pytest.fixture()
def client(daemon: Daemon):
    import patchflow

    return patchflow.Client(daemon.endpoint)


def python_env() -> dict[str, str]:
    """The environment of child Python processes (unbuffered, no stray thread settings)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable


def have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def slot_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of every shared-memory file this process maps."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/dev/shm/"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, parts[5]))
    return out


__all__ = ["Daemon", "run", "python_env", "PYTHON", "have", "slot_mappings", "ROOT", "shutil"]

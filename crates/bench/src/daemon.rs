//! A `patchflow serve` child process on a loopback port, measured from the outside.
//!
//! The daemon's own CPU time, peak memory and storage reads are what a storage node pays to
//! feed trainers; running it as a separate process keeps the client's share out of them.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use patchflow_client::{Client, ClientOptions};

use crate::BenchError;
use crate::procstat::{self, ProcSample};

/// A runtime on the calling thread, for a client driven by one measuring loop.
pub(crate) fn current_thread_runtime() -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(runtime_error)
}

/// A two-thread runtime for the benchmark's clients, its threads named `name`.
pub(crate) fn client_runtime(name: &str) -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name(name)
        .build()
        .map_err(runtime_error)
}

fn runtime_error(e: std::io::Error) -> BenchError {
    BenchError::Task(format!("cannot start the async runtime: {e}"))
}

/// How to start the daemon.
#[derive(Clone, Debug)]
pub struct DaemonSpec {
    /// The `patchflow` binary.
    pub exe: PathBuf,
    /// Store folders to serve.
    pub stores: Vec<PathBuf>,
    /// Sampling worker threads.
    pub workers: usize,
    /// Chunk cache capacity, MiB.
    pub cache_mb: u64,
    /// Most concurrent streams.
    pub max_streams: Option<usize>,
    /// File receiving the daemon's log.
    pub log: PathBuf,
    /// Whether the daemon offers shared memory (`--no-shared-memory` when not).
    pub shared_memory: bool,
    /// Further `patchflow serve` arguments (e.g. `--max-message-bytes 4194304`).
    pub extra_args: Vec<String>,
}

impl DaemonSpec {
    /// The folder of the daemon's shared-memory slot files: `--shm-dir` among the extra
    /// arguments, else `/dev/shm`, else the log's folder.
    pub fn shm_dir(&self) -> PathBuf {
        if let Some(i) = self.extra_args.iter().position(|a| a == "--shm-dir")
            && let Some(dir) = self.extra_args.get(i + 1)
        {
            return PathBuf::from(dir);
        }
        if Path::new("/dev/shm").is_dir() {
            return PathBuf::from("/dev/shm");
        }
        self.log
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    }
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    child: Child,
    addr: SocketAddr,
    spec: DaemonSpec,
}

/// Attempts at finding a free port before giving up (another process may take the port
/// between the probe and the daemon's bind).
const PORT_ATTEMPTS: usize = 4;

impl Daemon {
    /// Starts the daemon and waits until it answers on its port.
    pub async fn start(spec: &DaemonSpec) -> Result<Daemon, BenchError> {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let addr = free_port().map_err(|e| daemon_err(spec, format!("no free port: {e}")))?;
            let mut daemon = Daemon {
                child: spawn(spec, addr)?,
                addr,
                spec: spec.clone(),
            };
            let options = ClientOptions {
                max_attempts: 40,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(200),
                ..Default::default()
            };
            match Client::connect([daemon.endpoint()], options).await {
                Ok(_) => return Ok(daemon),
                Err(e) => {
                    last = e.to_string();
                    if daemon.child.try_wait().ok().flatten().is_none() {
                        // Alive but not answering: not a port race.
                        return Err(daemon_err(
                            spec,
                            format!("not answering: {last}{}", log_tail(&spec.log)),
                        ));
                    }
                }
            }
        }
        Err(daemon_err(
            spec,
            format!("exited at start: {last}{}", log_tail(&spec.log)),
        ))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's counters now.
    pub fn sample(&mut self) -> Result<ProcSample, BenchError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(daemon_err(
                &self.spec,
                format!("exited with {status}{}", log_tail(&self.spec.log)),
            ));
        }
        procstat::sample(Some(self.pid()))
    }

    /// Memory held by the daemon's shared-memory slot files now (`patchflow-<pid>-*` in its
    /// shared-memory folder), bytes: the blocks allocated to them, which a memory-backed folder
    /// such as `/dev/shm` takes from RAM whether or not a process maps them.
    pub fn shared_memory_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let prefix = format!("patchflow-{}-", self.pid());
        let Ok(entries) = std::fs::read_dir(self.spec.shm_dir()) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Stops the daemon (SIGTERM, then SIGKILL if it has not exited within 10 s) and waits.
    pub fn stop(mut self) -> Result<(), BenchError> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<(), BenchError> {
        if self.child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        for _ in 0..1000 {
            if self.child.try_wait().ok().flatten().is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child
            .kill()
            .and_then(|()| self.child.wait().map(drop))
            .map_err(|e| daemon_err(&self.spec, format!("cannot stop it: {e}")))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn daemon_err(spec: &DaemonSpec, reason: String) -> BenchError {
    BenchError::Daemon {
        exe: spec.exe.clone(),
        reason,
    }
}

fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

fn spawn(spec: &DaemonSpec, addr: SocketAddr) -> Result<Child, BenchError> {
    let log = File::create(&spec.log).map_err(|e| BenchError::io("creating", &spec.log, e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| BenchError::io("opening", &spec.log, e))?;
    let mut cmd = Command::new(&spec.exe);
    cmd.arg("serve")
        .args(&spec.stores)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--workers")
        .arg(spec.workers.to_string())
        .arg("--cache-mb")
        .arg(spec.cache_mb.to_string());
    if let Some(n) = spec.max_streams {
        cmd.arg("--max-streams").arg(n.to_string());
    }
    // Shared memory is measured too: without /dev/shm, the slots go beside the daemon's log.
    if !spec.shared_memory {
        cmd.arg("--no-shared-memory");
    } else if !spec.extra_args.iter().any(|a| a == "--shm-dir") {
        cmd.arg("--shm-dir").arg(spec.shm_dir());
    }
    cmd.args(&spec.extra_args);
    // A loopback daemon of the benchmark's own: no token, whatever the shell exports.
    cmd.env_remove("PATCHFLOW_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    cmd.spawn()
        .map_err(|e| daemon_err(spec, format!("cannot start it: {e}")))
}

/// The last lines of the daemon's log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    if lines.is_empty() {
        String::new()
    } else {
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        format!(
            "\n  daemon log ({}):\n    {}",
            path.display(),
            tail.join("\n    ")
        )
    }
}

//! `patchflow bench load`: many trainers at once against one daemon, with patch sizes that
//! change as a PGPS curriculum would, for a set time. Reports batch latency, throughput,
//! errors and the daemon's peak memory against the bound its settings imply.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use patchflow_client::{Client, ClientOptions, SharedMemory};
use serde::Serialize;

use crate::daemon::{Daemon, DaemonSpec};
use crate::generate::bar;
use crate::machine::Machine;
use crate::measure::{Transport, percentile};
use crate::procstat::ProcSample;
use crate::{BenchError, REPORT_VERSION};

/// Settings of [`run_load`].
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The store served.
    pub store: PathBuf,
    /// The `patchflow` binary run as the daemon.
    pub exe: PathBuf,
    /// Concurrent streams, each on its own connection.
    pub streams: usize,
    /// How long the load runs.
    pub duration: Duration,
    /// Patch sizes the streams cycle through (stream `i` starts at size `i mod n`).
    pub sizes: Vec<[usize; 3]>,
    /// Batches between two patch-size changes of a stream.
    pub switch_every: u64,
    /// Items per batch.
    pub batch: usize,
    /// Foreground share.
    pub foreground: f64,
    /// Daemon sampling workers.
    pub workers: usize,
    /// Daemon chunk cache, MiB.
    pub cache_mb: u64,
    /// Where the daemon log goes.
    pub log: PathBuf,
    /// Progress bar on stderr.
    pub progress: bool,
    /// The command line, recorded in the report.
    pub command: String,
    /// Further arguments for `patchflow serve`.
    pub daemon_args: Vec<String>,
    /// How batches reach the clients: [`Transport::GrpcShared`] (the default of a client on the
    /// daemon's host) or [`Transport::Grpc`] (voxels inside the messages, as remote trainers
    /// get them).
    pub transport: Transport,
    /// Cap on the daemon's shared-memory slot files together, MiB (`patchflow serve
    /// --shm-mb`).
    pub shm_mb: u64,
}

/// Sampling jobs and finished batches the daemon holds per stream by default (its
/// `Limits::jobs_per_stream + queued_batches_per_stream`), plus one batch being encoded and
/// one being written to the socket.
const BATCHES_HELD_PER_STREAM: u64 = 2 + 2 + 2;

/// What [`run_load`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// Report format version.
    pub version: u32,
    /// The command that produced it.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// Concurrent streams.
    pub streams: usize,
    /// Patch sizes cycled through.
    pub sizes: Vec<[usize; 3]>,
    /// Batches between size changes.
    pub switch_every: u64,
    /// Items per batch.
    pub batch: usize,
    /// Daemon workers.
    pub workers: usize,
    /// Daemon chunk cache, MiB.
    pub cache_mb: u64,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Batches received over all streams.
    pub batches: u64,
    /// Patches received.
    pub patches: u64,
    /// Patch-size changes made.
    pub size_changes: u64,
    /// Batches per second.
    pub batches_per_s: f64,
    /// Patches per second.
    pub patches_per_s: f64,
    /// Image + label MB (10^6) per second.
    pub mb_per_s: f64,
    /// Median wait per batch, ms.
    pub latency_p50_ms: f64,
    /// 99th percentile wait per batch, ms.
    pub latency_p99_ms: f64,
    /// Longest wait, ms.
    pub latency_max_ms: f64,
    /// Failed calls (must be 0).
    pub errors: u64,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Daemon CPU seconds over the run.
    pub daemon_cpu_s: f64,
    /// Daemon resident memory when idle after start, bytes.
    pub daemon_idle_rss_bytes: u64,
    /// Highest daemon resident memory, bytes (`VmHWM`; counts mapped store pages).
    pub daemon_peak_rss_bytes: u64,
    /// Highest daemon anonymous memory seen (sampled every 250 ms), bytes: what the daemon
    /// itself holds (chunk cache, batches, buffers), without store pages the kernel can drop.
    pub daemon_peak_anon_bytes: u64,
    /// The bound its settings imply for its own memory: idle memory + chunk cache + per stream
    /// the batches it may hold of the largest size.
    pub daemon_memory_bound_bytes: u64,
    /// How batches reached the clients (`gRPC` or `gRPC+shm`).
    pub transport: String,
    /// Highest memory held by the daemon's shared-memory slot files (sampled every 250 ms),
    /// bytes; 0 with the message transport.
    pub daemon_peak_shared_bytes: u64,
    /// The cap on those files (`--shm-mb`), bytes; 0 with the message transport.
    pub shared_memory_cap_bytes: u64,
    /// Whether the anonymous peak stayed within its bound and the slot files within their cap.
    pub within_bound: bool,
}

/// Per-stream tallies.
#[derive(Default)]
struct Tally {
    batches: u64,
    patches: u64,
    bytes: u64,
    changes: u64,
    errors: u64,
    samples: Vec<String>,
    latencies: Vec<f64>,
}

impl Tally {
    /// Adds `other`'s counts; keeps the first 8 error samples.
    fn absorb(&mut self, other: Tally) {
        self.batches += other.batches;
        self.patches += other.patches;
        self.bytes += other.bytes;
        self.changes += other.changes;
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
        for s in other.samples {
            if self.samples.len() < 8 {
                self.samples.push(s);
            }
        }
    }
}

/// What a load run observed of the daemon and its streams.
struct Observed {
    machine: Machine,
    /// Whether the streams asked for shared memory.
    shared: bool,
    total: Tally,
    wall_s: f64,
    /// The daemon before any stream, when the streams started, and at the end.
    idle: ProcSample,
    first: ProcSample,
    last: ProcSample,
    peak_anon: u64,
    peak_shared: u64,
}

/// Runs the load and returns its report.
pub fn run_load(cfg: &LoadConfig, stop: &AtomicBool) -> Result<LoadReport, BenchError> {
    let (spec, shared) = daemon_spec(cfg)?;
    let machine = Machine::describe(&cfg.store);
    let name = cfg
        .store
        .file_name()
        .map_or_else(|| "store".into(), |n| n.to_string_lossy().into_owned());
    let runtime = crate::daemon::client_runtime("load-client")?;
    let secs = cfg.duration.as_secs().max(1);
    let bar = bar(cfg.progress, secs, "load (s)");
    runtime.block_on(async {
        let mut daemon = Daemon::start(&spec).await?;
        let idle = daemon.sample()?;
        let start = Instant::now();
        let deadline = start + cfg.duration;
        let halt = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..cfg.streams {
            let endpoint = daemon.endpoint();
            let sizes = cfg.sizes.clone();
            let (name, batch, fg, every) =
                (name.clone(), cfg.batch, cfg.foreground, cfg.switch_every);
            let halt = Arc::clone(&halt);
            tasks.push(tokio::spawn(async move {
                drive(
                    &endpoint, shared, &name, i, &sizes, batch, fg, every, deadline, &halt,
                )
                .await
            }));
        }
        let first = daemon.sample()?;
        let mut peak_anon = first.anon_rss_bytes;
        let mut peak_shared = daemon.shared_memory_bytes();
        while Instant::now() < deadline {
            if stop.load(Ordering::Relaxed) {
                halt.store(true, Ordering::Relaxed);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            bar.set_position(start.elapsed().as_secs().min(secs));
            peak_anon = peak_anon.max(daemon.sample()?.anon_rss_bytes);
            peak_shared = peak_shared.max(daemon.shared_memory_bytes());
        }
        let mut total = Tally::default();
        for t in tasks {
            total.absorb(t.await.map_err(|e| BenchError::Task(e.to_string()))?);
        }
        let wall_s = start.elapsed().as_secs_f64();
        let last = daemon.sample()?;
        peak_anon = peak_anon.max(last.anon_rss_bytes);
        peak_shared = peak_shared.max(daemon.shared_memory_bytes());
        daemon.stop()?;
        bar.finish_and_clear();
        if stop.load(Ordering::Relaxed) {
            return Err(BenchError::Interrupted);
        }
        Ok(report(
            cfg,
            Observed {
                machine,
                shared,
                total,
                wall_s,
                idle,
                first,
                last,
                peak_anon,
                peak_shared,
            },
        ))
    })
}

/// The daemon a load runs against, and whether its streams use shared memory.
fn daemon_spec(cfg: &LoadConfig) -> Result<(DaemonSpec, bool), BenchError> {
    if cfg.streams == 0 || cfg.sizes.is_empty() || cfg.switch_every == 0 || cfg.batch == 0 {
        return Err(BenchError::Config {
            field: "--streams/--sizes/--switch-every/--batch",
            reason: "each must be at least 1".into(),
        });
    }
    let shared = match cfg.transport {
        Transport::GrpcShared => true,
        Transport::Grpc | Transport::GrpcPlain => false,
        Transport::InProcess => {
            return Err(BenchError::Config {
                field: "--transport",
                reason: "the load runs against a daemon: grpc or grpc-shm".into(),
            });
        }
    };
    let mut daemon_args = cfg.daemon_args.clone();
    if shared {
        daemon_args.extend(["--shm-mb".to_string(), cfg.shm_mb.to_string()]);
    }
    let spec = DaemonSpec {
        exe: cfg.exe.clone(),
        stores: vec![cfg.store.clone()],
        workers: cfg.workers,
        cache_mb: cfg.cache_mb,
        max_streams: Some(cfg.streams.max(16) * 2),
        log: cfg.log.clone(),
        shared_memory: shared,
        extra_args: daemon_args,
    };
    Ok((spec, shared))
}

/// The report of a load run: rates, latencies, and the daemon's peak memory against the bound
/// its settings imply.
fn report(cfg: &LoadConfig, mut o: Observed) -> LoadReport {
    let largest = cfg
        .sizes
        .iter()
        .map(|p| p.iter().map(|&n| n as u64).product::<u64>())
        .max()
        .unwrap_or(0);
    // f32 image (one channel here) + label of up to 2 bytes, per item.
    let batch_bytes = largest * 6 * cfg.batch as u64;
    let bound = o.idle.anon_rss_bytes
        + cfg.cache_mb * (1 << 20)
        + cfg.streams as u64 * BATCHES_HELD_PER_STREAM * batch_bytes;
    let shared_cap = if o.shared { cfg.shm_mb << 20 } else { 0 };
    let total = &mut o.total;
    total.latencies.sort_by(f64::total_cmp);
    let w = o.wall_s.max(1e-9);
    LoadReport {
        version: REPORT_VERSION,
        command: cfg.command.clone(),
        machine: o.machine,
        streams: cfg.streams,
        sizes: cfg.sizes.clone(),
        switch_every: cfg.switch_every,
        batch: cfg.batch,
        workers: cfg.workers,
        cache_mb: cfg.cache_mb,
        wall_s: o.wall_s,
        batches: total.batches,
        patches: total.patches,
        size_changes: total.changes,
        batches_per_s: total.batches as f64 / w,
        patches_per_s: total.patches as f64 / w,
        mb_per_s: total.bytes as f64 / w / 1e6,
        latency_p50_ms: percentile(&total.latencies, 0.5) * 1e3,
        latency_p99_ms: percentile(&total.latencies, 0.99) * 1e3,
        latency_max_ms: total.latencies.last().copied().unwrap_or(0.0) * 1e3,
        errors: total.errors,
        error_samples: std::mem::take(&mut total.samples),
        daemon_cpu_s: o.last.since(&o.first).cpu_s,
        daemon_idle_rss_bytes: o.idle.rss_bytes,
        daemon_peak_rss_bytes: o.last.peak_rss_bytes,
        daemon_peak_anon_bytes: o.peak_anon,
        daemon_memory_bound_bytes: bound,
        transport: cfg.transport.name().to_string(),
        daemon_peak_shared_bytes: o.peak_shared,
        shared_memory_cap_bytes: shared_cap,
        within_bound: o.peak_anon <= bound && o.peak_shared <= shared_cap,
    }
}

/// One trainer: streams until `deadline`, changing size every `every` batches; on an error it
/// counts it and opens a new stream at the same batch index.
#[allow(clippy::too_many_arguments)]
async fn drive(
    endpoint: &str,
    shared: bool,
    dataset: &str,
    i: usize,
    sizes: &[[usize; 3]],
    batch: usize,
    foreground: f64,
    every: u64,
    deadline: Instant,
    halt: &AtomicBool,
) -> Tally {
    let mut tally = Tally::default();
    let config = |k: u64| {
        let size = sizes[(i + (k / every) as usize) % sizes.len()];
        crate::measure::crop_stream(dataset, size, batch, foreground, i as u64)
    };
    let note = |tally: &mut Tally, e: String| {
        tally.errors += 1;
        if tally.samples.len() < 4 {
            tally.samples.push(format!("stream {i}: {e}"));
        }
    };
    // Pause after a failure before trying again, so that a dead daemon is not hammered.
    let pause = || tokio::time::sleep(Duration::from_millis(100));
    let mut k = 0u64;
    'outer: while Instant::now() < deadline && !halt.load(Ordering::Relaxed) {
        let options = ClientOptions {
            shared_memory: if shared {
                SharedMemory::On
            } else {
                SharedMemory::Off
            },
            ..ClientOptions::default()
        };
        let client = match Client::connect([endpoint], options).await {
            Ok(c) => c,
            Err(e) => {
                note(&mut tally, e.to_string());
                pause().await;
                continue;
            }
        };
        let mut stream = match client.stream_from(config(k), k).await {
            Ok(s) => s,
            Err(e) => {
                note(&mut tally, e.to_string());
                pause().await;
                continue;
            }
        };
        let opened_at = k;
        while Instant::now() < deadline && !halt.load(Ordering::Relaxed) {
            if k != opened_at && k.is_multiple_of(every) {
                if let Err(e) = stream.reconfigure(config(k)) {
                    note(&mut tally, e.to_string());
                    continue 'outer;
                }
                tally.changes += 1;
            }
            let t = Instant::now();
            match stream.next().await {
                Ok(b) => {
                    tally.latencies.push(t.elapsed().as_secs_f64());
                    tally.batches += 1;
                    tally.patches += b.items.len() as u64;
                    tally.bytes += (b.image.len() + b.label.len()) as u64;
                    k += 1;
                }
                Err(e) => {
                    note(&mut tally, e.to_string());
                    pause().await;
                    continue 'outer;
                }
            }
        }
    }
    tally
}

/// The report as text.
pub fn render_load(r: &LoadReport) -> String {
    format!(
        "machine: {}\n{} streams over {}, sizes cycled every {} batches over {}, batch {}, {} workers, cache {} MiB, {:.0} s\n\
         batches: {} ({:.1}/s), patches {:.1}/s, {:.1} MB/s, {} size changes\n\
         latency per batch: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n\
         errors: {}{}\n\
         daemon: {:.1} CPU s, memory idle {:.1} MB, peak {:.1} MB (own memory {:.1} MB, bound {:.1} MB{}: {})\n",
        r.machine.summary(),
        r.streams,
        r.transport,
        r.switch_every,
        r.sizes
            .iter()
            .map(|&p| crate::suite::patch_text(p))
            .collect::<Vec<_>>()
            .join(", "),
        r.batch,
        r.workers,
        r.cache_mb,
        r.wall_s,
        r.batches,
        r.batches_per_s,
        r.patches_per_s,
        r.mb_per_s,
        r.size_changes,
        r.latency_p50_ms,
        r.latency_p99_ms,
        r.latency_max_ms,
        r.errors,
        if r.error_samples.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.error_samples.join("; "))
        },
        r.daemon_cpu_s,
        r.daemon_idle_rss_bytes as f64 / 1e6,
        r.daemon_peak_rss_bytes as f64 / 1e6,
        r.daemon_peak_anon_bytes as f64 / 1e6,
        r.daemon_memory_bound_bytes as f64 / 1e6,
        if r.shared_memory_cap_bytes > 0 {
            format!(
                "; shared-memory slots {:.1} MB, cap {:.1} MB",
                r.daemon_peak_shared_bytes as f64 / 1e6,
                r.shared_memory_cap_bytes as f64 / 1e6
            )
        } else {
            String::new()
        },
        if r.within_bound { "within" } else { "OVER" },
    )
}

//! The full benchmark: dataset → ingest → sampling by patch size, in process and through the
//! daemon, warm and cold, with a table, a JSON report and a plot.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use patchflow_client::StreamConfig;
use patchflow_grid::Patch;
use patchflow_ingest::{IngestOptions, ingest};
use patchflow_sampler::BatchRequest;
use serde::Serialize;

use crate::daemon::{Daemon, DaemonSpec};
use crate::generate::{DatasetSpec, bar, folder_bytes, generate};
use crate::machine::Machine;
use crate::measure::{
    CacheState, Context, InProcess, Measurement, Transport, Until, run_remote,
    stored_bytes_per_voxel,
};
use crate::procstat::ProcSample;
use crate::{BenchError, REPORT_VERSION};

/// Settings of [`run_suite`].
#[derive(Clone, Debug)]
pub struct SuiteConfig {
    /// Folder for the generated dataset, the store, the daemon log and the reports.
    pub work_dir: PathBuf,
    /// An existing store to measure instead of generating and ingesting one.
    pub store: Option<PathBuf>,
    /// The dataset generated when no store is given.
    pub dataset: DatasetSpec,
    /// Cubic patch edges measured.
    pub edges: Vec<usize>,
    /// Also measure the PGPS stage sizes of this final patch and these poolings.
    pub pgps: Option<([usize; 3], [u32; 3])>,
    /// Items per batch.
    pub batch: usize,
    /// Foreground-oversampled share of each batch.
    pub foreground: f64,
    /// Concurrent daemon clients measured (e.g. `[1, 2]`); empty: no daemon runs.
    pub clients: Vec<usize>,
    /// Sampling threads in process and in the daemon.
    pub workers: usize,
    /// Length of each warm measurement.
    pub seconds: f64,
    /// Batches of each cold measurement.
    pub cold_batches: u64,
    /// Chunk cache, MiB (in process and in the daemon).
    pub cache_mb: u64,
    /// Ingest jobs.
    pub ingest_jobs: usize,
    /// The `patchflow` binary run as the daemon (`None`: no daemon runs).
    pub exe: Option<PathBuf>,
    /// Run the cold measurements.
    pub cold: bool,
    /// Progress bars on stderr.
    pub progress: bool,
    /// The command line, recorded in the report.
    pub command: String,
    /// Further arguments for `patchflow serve`.
    pub daemon_args: Vec<String>,
}

impl Default for SuiteConfig {
    /// Sized for a 2-core, 24 GB machine: done in under 5 minutes.
    fn default() -> SuiteConfig {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        SuiteConfig {
            work_dir: PathBuf::from("patchflow-bench"),
            store: None,
            dataset: DatasetSpec {
                cases: 8,
                shape: [160, 256, 256],
                spacing: [1.5, 0.8, 0.8],
                lesions: 6,
                seed: 2024,
            },
            edges: vec![32, 64, 96, 128, 160, 192],
            pgps: Some(([128, 128, 128], [5, 5, 5])),
            batch: 2,
            foreground: 0.33,
            clients: vec![1, cores.max(2)],
            workers: cores,
            seconds: 2.0,
            cold_batches: 8,
            cache_mb: 2048,
            ingest_jobs: cores,
            exe: None,
            cold: true,
            progress: true,
            command: String::new(),
            daemon_args: Vec::new(),
        }
    }
}

impl SuiteConfig {
    fn check(&self) -> Result<(), BenchError> {
        let bad = |field, reason: String| Err(BenchError::Config { field, reason });
        if self.edges.is_empty() && self.pgps.is_none() {
            return bad("--edges", "no patch size to measure".into());
        }
        if let Some(e) = self.edges.iter().find(|&&e| !(1..=512).contains(&e)) {
            return bad("--edges", format!("{e} (allowed: 1..=512)"));
        }
        if self.batch == 0 || self.batch > 512 {
            return bad("--batch", format!("{} (allowed: 1..=512)", self.batch));
        }
        if !(0.0..=1.0).contains(&self.foreground) {
            return bad(
                "--foreground",
                format!("{} (allowed: 0..=1)", self.foreground),
            );
        }
        if self.clients.iter().any(|&c| c == 0 || c > 256) {
            return bad("--clients", format!("{:?} (each 1..=256)", self.clients));
        }
        if !(self.seconds.is_finite() && self.seconds > 0.0 && self.seconds <= 3600.0) {
            return bad(
                "--seconds",
                format!("{} (allowed: >0 to 3600)", self.seconds),
            );
        }
        if self.cold && self.cold_batches == 0 {
            return bad("--cold-batches", "0 (at least 1)".into());
        }
        Ok(())
    }

    /// The patch sizes measured, smallest first.
    pub fn sizes(&self) -> Result<Vec<Patch>, BenchError> {
        let bad = |field: &'static str, reason: String| BenchError::Config { field, reason };
        let mut sizes = self
            .edges
            .iter()
            .map(|&e| Patch::cube(e).map_err(|e| bad("--edges", e.to_string())))
            .collect::<Result<Vec<Patch>, _>>()?;
        if let Some((final_patch, pools)) = self.pgps {
            for p in patchflow_curriculum::pgps_patch_sizes(final_patch, pools)
                .map_err(|e| bad("--pgps", e.to_string()))?
            {
                sizes.push(Patch::new(p).map_err(|e| bad("--pgps", e.to_string()))?);
            }
        }
        sizes.sort_by_key(|p| (p.voxels(), *p));
        sizes.dedup();
        Ok(sizes)
    }
}

/// Ingest figures.
#[derive(Clone, Debug, Serialize)]
pub struct IngestFigures {
    /// Cases ingested.
    pub cases: usize,
    /// Input bytes (compressed NIfTI files).
    pub input_bytes: u64,
    /// Voxel bytes of the input volumes, uncompressed.
    pub raw_bytes: u64,
    /// Bytes of the store written.
    pub store_bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Cases processed at once.
    pub jobs: usize,
    /// CPU seconds of the whole ingest (this process).
    pub cpu_s: f64,
    /// Input (compressed) MB per second of wall time.
    pub input_mb_per_s: f64,
    /// Uncompressed voxel MB per second of wall time.
    pub raw_mb_per_s: f64,
    /// Uncompressed voxel MB per CPU second (per core).
    pub raw_mb_per_cpu_s: f64,
}

/// The store measured.
#[derive(Clone, Debug, Serialize)]
pub struct StoreFigures {
    /// Its folder.
    pub path: PathBuf,
    /// Cases.
    pub cases: usize,
    /// Bytes on disk.
    pub bytes: u64,
    /// Stored bytes per voxel, uncompressed (image channels + label).
    pub stored_bytes_per_voxel: usize,
    /// The generated dataset, when the benchmark made it.
    pub generated: Option<DatasetSpec>,
}

/// The loopback cost at one patch size: warm gRPC with one client over warm in-process.
#[derive(Clone, Debug, Serialize)]
pub struct LoopbackRatio {
    /// Patch size.
    pub patch: [usize; 3],
    /// gRPC patches/s over in-process patches/s (same workers, warm).
    pub ratio: f64,
    /// The same with the voxels through shared memory.
    pub shared_ratio: Option<f64>,
}

/// Everything `patchflow bench` writes to its JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteReport {
    /// Report format version.
    pub version: u32,
    /// The command that produced it.
    pub command: String,
    /// Seconds since the Unix epoch at the start.
    pub started_unix_s: u64,
    /// Total wall time, seconds.
    pub seconds: f64,
    /// The machine.
    pub machine: Machine,
    /// The store.
    pub store: StoreFigures,
    /// Ingest figures (`None` when an existing store was given).
    pub ingest: Option<IngestFigures>,
    /// Items per batch.
    pub batch: usize,
    /// Foreground share.
    pub foreground: f64,
    /// Sampling threads / daemon workers.
    pub workers: usize,
    /// Chunk cache, MiB.
    pub cache_mb: u64,
    /// Every measurement, in the order run.
    pub measurements: Vec<Measurement>,
    /// Loopback over in-process, per patch size.
    pub loopback: Vec<LoopbackRatio>,
    /// Highest resident memory of any daemon run, bytes.
    pub daemon_peak_rss_bytes: Option<u64>,
}

/// Runs the benchmark and returns its report (the caller prints and writes it).
pub fn run_suite(cfg: &SuiteConfig, stop: &AtomicBool) -> Result<SuiteReport, BenchError> {
    cfg.check()?;
    let sizes = cfg.sizes()?;
    let begun = Instant::now();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(&cfg.work_dir)
        .map_err(|e| BenchError::io("creating", &cfg.work_dir, e))?;
    let machine = Machine::describe(&cfg.work_dir);

    let (store, ingest_figures) = match &cfg.store {
        Some(store) => (store.clone(), None),
        None => {
            let raw = cfg.work_dir.join("raw");
            let store = cfg.work_dir.join("store");
            let input_bytes = generate(&raw, &cfg.dataset, cfg.progress, stop)?;
            let figures = ingest_fresh(&raw, &store, input_bytes, cfg, stop)?;
            (store, Some(figures))
        }
    };
    let name = store
        .file_name()
        .map_or_else(|| "store".into(), |n| n.to_string_lossy().into_owned());
    let local = InProcess::open(&name, &store, cfg.cache_mb, cfg.workers)?;
    let per_voxel = stored_bytes_per_voxel(local.dataset());
    let store_figures = StoreFigures {
        path: store.clone(),
        cases: local.dataset().cases().len(),
        bytes: folder_bytes(&store)?,
        stored_bytes_per_voxel: per_voxel,
        generated: cfg.store.is_none().then(|| cfg.dataset.clone()),
    };

    let remote = cfg.exe.as_ref().filter(|_| !cfg.clients.is_empty());
    let per_size = 1
        + usize::from(cfg.cold)
        + remote.map_or(0, |_| cfg.clients.len() + 1 + usize::from(cfg.cold));
    let mut run = SuiteRun {
        cfg,
        bar: bar(cfg.progress, (sizes.len() * per_size) as u64, "measuring"),
        sizes,
        local,
        name,
        per_voxel,
        seconds: Duration::from_secs_f64(cfg.seconds),
        warmup: Duration::from_secs_f64((cfg.seconds / 2.0).clamp(0.5, 5.0)),
        stop,
        measurements: Vec::new(),
    };
    run.in_process()?;
    let daemon_peak = remote
        .map(|exe| run.through_daemon(exe, &store))
        .transpose()?;
    run.bar.finish_and_clear();

    let loopback = loopback_ratios(&run.sizes, &run.measurements);
    Ok(SuiteReport {
        version: REPORT_VERSION,
        command: cfg.command.clone(),
        started_unix_s,
        seconds: begun.elapsed().as_secs_f64(),
        machine,
        store: store_figures,
        ingest: ingest_figures,
        batch: cfg.batch,
        foreground: cfg.foreground,
        workers: run.local.workers(),
        cache_mb: cfg.cache_mb,
        measurements: run.measurements,
        loopback,
        daemon_peak_rss_bytes: daemon_peak,
    })
}

/// What the measurements of one suite run share.
struct SuiteRun<'a> {
    cfg: &'a SuiteConfig,
    sizes: Vec<Patch>,
    local: InProcess,
    /// The dataset's name (the store folder's).
    name: String,
    per_voxel: usize,
    bar: ProgressBar,
    seconds: Duration,
    warmup: Duration,
    stop: &'a AtomicBool,
    measurements: Vec<Measurement>,
}

impl SuiteRun<'_> {
    /// The context of one measurement.
    fn context(
        &self,
        transport: Transport,
        state: CacheState,
        patch: Patch,
        clients: usize,
    ) -> Context {
        Context {
            transport,
            state,
            patch: patch.axes(),
            batch: self.cfg.batch,
            clients,
            workers: self.local.workers(),
            stored_bytes_per_voxel: self.per_voxel,
        }
    }

    /// Every size in process, warm and (unless turned off) cold.
    fn in_process(&mut self) -> Result<(), BenchError> {
        let (cfg, stop) = (self.cfg, self.stop);
        for (s, &patch) in self.sizes.iter().enumerate() {
            let req = request(patch, cfg, s as u64);
            self.bar.set_message(format!("in-process {patch}"));
            self.local
                .run(&req, 1 << 40, Until::Elapsed(self.warmup), stop)?;
            let (counts, me, hits) = self
                .local
                .run(&req, 0, Until::Elapsed(self.seconds), stop)?;
            let c = self.context(Transport::InProcess, CacheState::Warm, patch, 1);
            self.measurements
                .push(Measurement::new(&c, &counts, me, None, Some(hits)));
            self.bar.inc(1);
            if cfg.cold {
                self.local.make_cold()?;
                let cold_req = request(patch, cfg, 1000 + s as u64);
                let (counts, me, hits) =
                    self.local
                        .run(&cold_req, 0, Until::Batches(cfg.cold_batches), stop)?;
                let c = self.context(Transport::InProcess, CacheState::Cold, patch, 1);
                self.measurements
                    .push(Measurement::new(&c, &counts, me, None, Some(hits)));
                self.bar.inc(1);
            }
        }
        Ok(())
    }

    /// Every size through a `patchflow serve` child (`exe`) serving `store`: warm with each
    /// client count and through shared memory, then cold. Returns the daemon's peak memory.
    fn through_daemon(&mut self, exe: &Path, store: &Path) -> Result<u64, BenchError> {
        let spec = DaemonSpec {
            exe: exe.to_path_buf(),
            stores: vec![store.to_path_buf()],
            workers: self.local.workers(),
            cache_mb: self.cfg.cache_mb,
            max_streams: None,
            extra_args: self.cfg.daemon_args.clone(),
            log: self.cfg.work_dir.join("daemon.log"),
            shared_memory: true,
        };
        let runtime = crate::daemon::client_runtime("bench-client")?;
        runtime.block_on(async {
            let warm = self.daemon_warm(&spec).await?;
            let cold = if self.cfg.cold {
                self.daemon_cold(&spec).await?
            } else {
                0
            };
            Ok(warm.max(cold))
        })
    }

    /// Warm runs on one daemon: voxels in the messages with each client count, then the same
    /// stream with its voxels through shared memory, as a trainer on the daemon's host gets it.
    async fn daemon_warm(&mut self, spec: &DaemonSpec) -> Result<u64, BenchError> {
        let mut peak = 0u64;
        let mut daemon = Daemon::start(spec).await?;
        for (s, patch) in self.sizes.clone().into_iter().enumerate() {
            let runs = self
                .cfg
                .clients
                .iter()
                .map(|&clients| (Transport::Grpc, clients))
                .chain([(Transport::GrpcShared, 1)]);
            for (transport, clients) in runs {
                self.bar
                    .set_message(format!("{} ×{clients} {}", transport.name(), patch));
                let config = stream_config(&self.name, patch.axes(), self.cfg, s as u64);
                let m = remote_measurement(
                    &mut daemon,
                    &config,
                    self.context(transport, CacheState::Warm, patch, clients),
                    self.warmup,
                    Until::Elapsed(self.seconds),
                    self.stop,
                )
                .await?;
                peak = peak.max(m.daemon_peak_rss_bytes.unwrap_or(0));
                self.measurements.push(m);
                self.bar.inc(1);
            }
        }
        daemon.stop()?;
        Ok(peak)
    }

    /// Cold runs, each on a fresh daemon with the store's pages dropped.
    async fn daemon_cold(&mut self, spec: &DaemonSpec) -> Result<u64, BenchError> {
        let mut peak = 0u64;
        for (s, patch) in self.sizes.clone().into_iter().enumerate() {
            self.bar.set_message(format!("gRPC cold {patch}"));
            // A fresh daemon maps nothing yet, so the pages can be dropped.
            self.local.make_cold()?;
            let mut daemon = Daemon::start(spec).await?;
            // Opening the store read its headers with readahead around them; drop what the
            // daemon did not map.
            self.local.make_cold()?;
            let config = stream_config(&self.name, patch.axes(), self.cfg, 1000 + s as u64);
            let m = remote_measurement(
                &mut daemon,
                &config,
                self.context(Transport::Grpc, CacheState::Cold, patch, 1),
                Duration::ZERO,
                Until::Batches(self.cfg.cold_batches),
                self.stop,
            )
            .await?;
            peak = peak.max(m.daemon_peak_rss_bytes.unwrap_or(0));
            self.measurements.push(m);
            daemon.stop()?;
            self.bar.inc(1);
        }
        Ok(peak)
    }
}

/// Loopback over in-process, per patch size (warm, one client).
fn loopback_ratios(sizes: &[Patch], measurements: &[Measurement]) -> Vec<LoopbackRatio> {
    sizes
        .iter()
        .filter_map(|&patch| {
            let find = |t| {
                measurements.iter().find(|m| {
                    m.patch == patch.axes()
                        && m.transport == t
                        && m.state == CacheState::Warm
                        && m.clients == 1
                })
            };
            let (local, grpc) = (find(Transport::InProcess)?, find(Transport::Grpc)?);
            let local_rate = local.patches_per_s.max(1e-12);
            Some(LoopbackRatio {
                patch: patch.axes(),
                ratio: grpc.patches_per_s / local_rate,
                shared_ratio: find(Transport::GrpcShared).map(|m| m.patches_per_s / local_rate),
            })
        })
        .collect()
}

/// Ingests `raw` into a new store at `store` (an earlier one is removed) and times it.
fn ingest_fresh(
    raw: &Path,
    store: &Path,
    input_bytes: u64,
    cfg: &SuiteConfig,
    stop: &AtomicBool,
) -> Result<IngestFigures, BenchError> {
    if store.exists() {
        std::fs::remove_dir_all(store).map_err(|e| BenchError::io("removing", store, e))?;
    }
    let opts = IngestOptions {
        jobs: cfg.ingest_jobs.max(1),
        progress: cfg.progress,
        ..Default::default()
    };
    let before = crate::procstat::sample(None)?;
    let t = Instant::now();
    let report = ingest(raw, store, &opts, stop)?;
    let seconds = t.elapsed().as_secs_f64();
    let cpu_s = crate::procstat::sample(None)?.since(&before).cpu_s;
    if let Some((case, reason)) = report.failed.first() {
        return Err(BenchError::IngestCases {
            failed: report.failed.len(),
            first: format!("{case}: {reason}"),
        });
    }
    let raw_bytes: u64 = report.ingested.iter().map(|c| c.raw_bytes).sum();
    let secs = seconds.max(1e-9);
    Ok(IngestFigures {
        cases: report.ingested.len(),
        input_bytes,
        raw_bytes,
        store_bytes: folder_bytes(store)?,
        seconds,
        jobs: opts.jobs,
        cpu_s,
        input_mb_per_s: input_bytes as f64 / secs / 1e6,
        raw_mb_per_s: raw_bytes as f64 / secs / 1e6,
        raw_mb_per_cpu_s: raw_bytes as f64 / cpu_s.max(1e-9) / 1e6,
    })
}

/// The sampler request of one measurement (seeds differ per size so that runs do not replay
/// each other's crops).
fn request(patch: Patch, cfg: &SuiteConfig, seed: u64) -> BatchRequest {
    crate::measure::crop_request(patch, cfg.batch, cfg.foreground, seed)
}

/// The stream configuration matching [`request`].
fn stream_config(dataset: &str, patch: [usize; 3], cfg: &SuiteConfig, seed: u64) -> StreamConfig {
    crate::measure::crop_stream(dataset, patch, cfg.batch, cfg.foreground, seed)
}

/// One measurement through `daemon`: the daemon's counters over the run, and this process's
/// (the clients').
pub(crate) async fn remote_measurement(
    daemon: &mut Daemon,
    config: &StreamConfig,
    ctx: Context,
    warmup: Duration,
    until: Until,
    stop: &AtomicBool,
) -> Result<Measurement, BenchError> {
    let endpoint = daemon.endpoint();
    // Counters around the measured part only: the warm-up runs first. A cold run has none:
    // even an idle stream makes the daemon cut its first batches ahead.
    if !warmup.is_zero() {
        run_remote(
            &endpoint,
            config,
            ctx.clients,
            ctx.transport,
            warmup,
            Until::Batches(0),
            stop,
        )
        .await?;
    }
    let d0 = daemon.sample()?;
    let c0 = crate::procstat::sample(None)?;
    let counts = run_remote(
        &endpoint,
        config,
        ctx.clients,
        ctx.transport,
        Duration::ZERO,
        until,
        stop,
    )
    .await?;
    let d1 = daemon.sample()?;
    let c1 = crate::procstat::sample(None)?;
    let daemon_side: ProcSample = d1.since(&d0);
    Ok(Measurement::new(
        &ctx,
        &counts,
        daemon_side,
        Some(c1.since(&c0)),
        None,
    ))
}

/// A measured patch as `z×y×x` (measured patches passed the sampler's checks, so they are
/// valid; an invalid one shows its error).
pub(crate) fn patch_text(p: [usize; 3]) -> String {
    Patch::new(p).map_or_else(|e| e.to_string(), |p| p.to_string())
}

/// The report as a plain-text table (one line per measurement) with a header.
pub fn render_table(r: &SuiteReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "machine: {}", r.machine.summary());
    let s = &r.store;
    let _ = writeln!(
        out,
        "store: {} ({} cases, {:.1} MB on disk, {} B/voxel stored); batch {}, foreground {}, {} workers, cache {} MiB",
        s.path.display(),
        s.cases,
        s.bytes as f64 / 1e6,
        s.stored_bytes_per_voxel,
        r.batch,
        r.foreground,
        r.workers,
        r.cache_mb
    );
    if let Some(i) = &r.ingest {
        let _ = writeln!(
            out,
            "ingest: {} cases, {:.1} MB input ({:.1} MB voxels) in {:.1} s with {} jobs: {:.1} MB/s input, {:.1} MB/s voxels, {:.1} MB/s voxels per core; store {:.1} MB",
            i.cases,
            i.input_bytes as f64 / 1e6,
            i.raw_bytes as f64 / 1e6,
            i.seconds,
            i.jobs,
            i.input_mb_per_s,
            i.raw_mb_per_s,
            i.raw_mb_per_cpu_s,
            i.store_bytes as f64 / 1e6
        );
    }
    let _ = writeln!(
        out,
        "\n{:<13} {:<10} {:>7} {:<5} {:>9} {:>8} {:>10} {:>10} {:>10} {:>6} {:>8} {:>8}",
        "patch",
        "transport",
        "clients",
        "state",
        "patches/s",
        "MB/s",
        "cpu ms/p",
        "client ms",
        "read KB/p",
        "ampl",
        "p50 ms",
        "p99 ms"
    );
    for m in &r.measurements {
        let _ = writeln!(
            out,
            "{:<13} {:<10} {:>7} {:<5} {:>9.1} {:>8.1} {:>10.2} {:>10} {:>10.1} {:>6.2} {:>8.2} {:>8.2}",
            patch_text(m.patch),
            m.transport.name(),
            m.clients,
            match m.state {
                CacheState::Warm => "warm",
                CacheState::Cold => "cold",
            },
            m.patches_per_s,
            m.mb_per_s,
            m.sampler_cpu_s_per_patch * 1e3,
            m.client_cpu_s_per_patch
                .map_or_else(|| "-".into(), |c| format!("{:.2}", c * 1e3)),
            m.read_bytes_per_patch / 1e3,
            m.read_amplification,
            m.latency_p50_ms,
            m.latency_p99_ms
        );
    }
    if !r.loopback.is_empty() {
        let ratios: Vec<String> = r
            .loopback
            .iter()
            .map(|l| match l.shared_ratio {
                Some(shm) => format!("{} {:.2} (shm {shm:.2})", patch_text(l.patch), l.ratio),
                None => format!("{} {:.2}", patch_text(l.patch), l.ratio),
            })
            .collect();
        let _ = writeln!(
            out,
            "\nloopback gRPC / in-process (warm, 1 client; with shared memory in brackets): {}",
            ratios.join(", ")
        );
    }
    if let Some(p) = r.daemon_peak_rss_bytes {
        let _ = writeln!(out, "daemon peak memory: {:.1} MB", p as f64 / 1e6);
    }
    out
}

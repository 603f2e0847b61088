//! `patchflow bench` arguments and their wiring to `patchflow-bench`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use patchflow_bench as bench;

use crate::cli::{parse_f64_triplet, parse_usize_triplet, stop_flag};

/// `patchflow bench`: the full suite, or one of its modes.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// A single measurement mode instead of the suite.
    #[command(subcommand)]
    pub mode: Option<BenchMode>,
    #[command(flatten)]
    pub suite: SuiteArgs,
}

/// Modes of `patchflow bench`.
#[derive(Subcommand, Debug)]
pub enum BenchMode {
    /// One configuration on one core, as JSON, for side-by-side tables with other loaders.
    Peer(PeerArgs),
    /// Many concurrent streams with changing patch sizes against one daemon for a set time.
    Load(LoadArgs),
}

/// The suite: dataset → ingest → sampling by patch size, in process and over loopback gRPC,
/// warm and cold; a table, a JSON report and a PNG plot.
#[derive(Args, Debug)]
pub struct SuiteArgs {
    /// Folder for the generated dataset, the store, the daemon log and the reports.
    #[arg(long, default_value = "patchflow-bench")]
    pub work_dir: PathBuf,
    /// Measure this existing store instead of generating and ingesting one.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Generated cases.
    #[arg(long, default_value_t = 8)]
    pub cases: usize,
    /// Generate about this many GB (10^9 bytes) of voxels (`i16` image + `u8` label) instead
    /// of --cases cases.
    #[arg(long)]
    pub size_gb: Option<f64>,
    /// Shape z,y,x of each generated case.
    #[arg(long, value_parser = parse_usize_triplet, default_value = "160,256,256")]
    pub shape: [usize; 3],
    /// Spacing z,y,x in mm of the generated cases.
    #[arg(long, value_parser = parse_f64_triplet, default_value = "1.5,0.8,0.8")]
    pub spacing: [f64; 3],
    /// Small lesions (the rare class) per generated case.
    #[arg(long, default_value_t = 6)]
    pub lesions: usize,
    /// Seed of the generated dataset.
    #[arg(long, default_value_t = 2024)]
    pub seed: u64,
    /// Cubic patch edges measured, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32,64,96,128,160,192")]
    pub edges: Vec<usize>,
    /// Also measure the PGPS stage sizes of this final patch z,y,x.
    #[arg(long, value_parser = parse_usize_triplet, default_value = "128,128,128")]
    pub pgps_final: [usize; 3],
    /// Stride-2 poolings z,y,x of the PGPS plan.
    #[arg(long, value_parser = parse_usize_triplet, default_value = "5,5,5")]
    pub pools: [usize; 3],
    /// Leave out the PGPS stage sizes.
    #[arg(long)]
    pub no_pgps: bool,
    /// Items per batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Foreground-oversampled share of each batch.
    #[arg(long, default_value_t = 0.33)]
    pub foreground: f64,
    /// Concurrent daemon clients measured, comma-separated (default: 1 and the core count).
    #[arg(long, value_delimiter = ',')]
    pub clients: Vec<usize>,
    /// Sampling threads in process and daemon workers (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Seconds per warm measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Batches per cold measurement.
    #[arg(long, default_value_t = 8)]
    pub cold_batches: u64,
    /// Chunk cache in MiB (in process and in the daemon).
    #[arg(long, default_value_t = 2048)]
    pub cache_mb: u64,
    /// Skip the cold measurements.
    #[arg(long)]
    pub no_cold: bool,
    /// Skip the measurements through the daemon.
    #[arg(long)]
    pub no_daemon: bool,
    /// JSON report (default: WORK_DIR/bench.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// PNG plot (default: WORK_DIR/bench.png).
    #[arg(long)]
    pub png: Option<PathBuf>,
    /// Further argument for the `patchflow serve` child (repeat for several, e.g.
    /// `--daemon-arg=--max-message-bytes --daemon-arg=4194304`).
    #[arg(long, allow_hyphen_values = true)]
    pub daemon_arg: Vec<String>,
}

/// Where `bench peer` cuts patches.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum PeerTransport {
    /// The sampler in this process.
    Inproc,
    /// A daemon child process over loopback gRPC, voxels inside the messages.
    Grpc,
    /// The same, voxels through shared memory.
    GrpcShm,
}

/// How `bench load` delivers batches.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LoadTransport {
    /// Voxels inside the gRPC messages.
    Grpc,
    /// Voxels through shared memory, the messages naming the slot.
    GrpcShm,
}

/// Augmentation of `bench peer`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerAugment {
    /// Plain crops.
    None,
    /// nnU-Net's default training augmentation.
    Nnunet,
}

/// `patchflow bench peer`.
#[derive(Args, Debug)]
pub struct PeerArgs {
    /// The store.
    #[arg(long)]
    pub store: PathBuf,
    /// Patch z,y,x (or ZxYxX, or one number for a cube).
    #[arg(long, default_value = "128,128,128")]
    pub patch: patchflow_grid::Patch,
    /// Items per batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Foreground-oversampled share.
    #[arg(long, default_value_t = 0.33)]
    pub foreground: f64,
    /// Measured seconds (after a warm-up of a quarter of that).
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// In process or over gRPC.
    #[arg(long, value_enum, default_value = "inproc")]
    pub transport: PeerTransport,
    /// Augmentation.
    #[arg(long, value_enum, default_value = "none")]
    pub augment: PeerAugment,
    /// Sampling threads / daemon workers.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Chunk cache in MiB.
    #[arg(long, default_value_t = 2048)]
    pub cache_mb: u64,
    /// Also write the JSON here (it is always printed).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Further argument for the `patchflow serve` child (repeat for several, e.g.
    /// `--daemon-arg=--max-message-bytes --daemon-arg=4194304`).
    #[arg(long, allow_hyphen_values = true)]
    pub daemon_arg: Vec<String>,
}

/// `patchflow bench load`.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The store served.
    #[arg(long)]
    pub store: PathBuf,
    /// Concurrent streams.
    #[arg(long, default_value_t = 16)]
    pub streams: usize,
    /// Seconds the load runs.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Patch sizes cycled through, `z,y,x;z,y,x;...` (default: the PGPS stages of --pgps-final).
    #[arg(long, value_delimiter = ';', value_parser = parse_usize_triplet)]
    pub sizes: Vec<[usize; 3]>,
    /// Final patch whose PGPS stage sizes are cycled through when --sizes is not given.
    #[arg(long, value_parser = parse_usize_triplet, default_value = "128,128,128")]
    pub pgps_final: [usize; 3],
    /// Batches between two size changes of a stream.
    #[arg(long, default_value_t = 8)]
    pub switch_every: u64,
    /// Items per batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Foreground-oversampled share.
    #[arg(long, default_value_t = 0.33)]
    pub foreground: f64,
    /// Daemon workers (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Daemon chunk cache in MiB.
    #[arg(long, default_value_t = 1024)]
    pub cache_mb: u64,
    /// JSON report.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Daemon log file.
    #[arg(long, default_value = "patchflow-load-daemon.log")]
    pub log: PathBuf,
    /// How batches reach the streams: through shared memory (what trainers on the daemon's
    /// host get) or inside the gRPC messages (what remote trainers get).
    #[arg(long, value_enum, default_value = "grpc-shm")]
    pub transport: LoadTransport,
    /// Cap on the daemon's shared-memory slot files together, MiB (`serve --shm-mb`).
    #[arg(long, default_value_t = 4096)]
    pub shm_mb: u64,
    /// Further argument for the `patchflow serve` child (repeat for several, e.g.
    /// `--daemon-arg=--max-message-bytes --daemon-arg=4194304`).
    #[arg(long, allow_hyphen_values = true)]
    pub daemon_arg: Vec<String>,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn pools(p: [usize; 3]) -> Result<[u32; 3]> {
    let mut out = [0u32; 3];
    for (o, v) in out.iter_mut().zip(p) {
        *o = u32::try_from(v)
            .ok()
            .filter(|&v| v <= 10)
            .context("--pools: each at most 10")?;
    }
    Ok(out)
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("finding the patchflow binary to run the daemon")
}

/// Runs `patchflow bench`.
pub fn run(a: BenchArgs, progress: bool) -> Result<ExitCode> {
    match a.mode {
        None => suite(a.suite, progress),
        Some(BenchMode::Peer(p)) => peer(p),
        Some(BenchMode::Load(l)) => load(l, progress),
    }
}

fn suite(a: SuiteArgs, progress: bool) -> Result<ExitCode> {
    let workers = if a.workers == 0 { cores() } else { a.workers };
    let mut dataset = bench::DatasetSpec {
        cases: a.cases,
        shape: a.shape,
        spacing: a.spacing,
        lesions: a.lesions,
        seed: a.seed,
    };
    if let Some(gb) = a.size_gb {
        if !(gb.is_finite() && gb > 0.0) {
            bail!("--size-gb {gb}: must be a positive number");
        }
        let per_case = bench::DatasetSpec {
            cases: 1,
            ..dataset.clone()
        }
        .raw_bytes() as f64;
        dataset.cases = ((gb * 1e9) / per_case).ceil().max(1.0) as usize;
    }
    let cfg = bench::SuiteConfig {
        work_dir: a.work_dir.clone(),
        store: a.store,
        dataset,
        edges: a.edges,
        pgps: (!a.no_pgps)
            .then(|| pools(a.pools).map(|p| (a.pgps_final, p)))
            .transpose()?,
        batch: a.batch,
        foreground: a.foreground,
        clients: if a.no_daemon {
            Vec::new()
        } else if a.clients.is_empty() {
            let mut c = vec![1, cores().max(2)];
            c.dedup();
            c
        } else {
            a.clients
        },
        workers,
        seconds: a.seconds,
        cold_batches: a.cold_batches,
        cache_mb: a.cache_mb,
        ingest_jobs: cores(),
        exe: (!a.no_daemon).then(exe).transpose()?,
        cold: !a.no_cold,
        progress,
        command: command_line(),
        daemon_args: a.daemon_arg,
    };
    let stop = stop_flag()?;
    let report = bench::run_suite(&cfg, &stop)?;
    print!("{}", bench::render_table(&report));
    let json = a.json.unwrap_or_else(|| a.work_dir.join("bench.json"));
    let png = a.png.unwrap_or_else(|| a.work_dir.join("bench.png"));
    bench::write_json(&json, &report)?;
    bench::write_plot(&report, &png)?;
    println!("report: {} and {}", json.display(), png.display());
    Ok(ExitCode::SUCCESS)
}

fn peer(a: PeerArgs) -> Result<ExitCode> {
    let cfg = bench::PeerConfig {
        store: a.store,
        patch: a.patch,
        batch: a.batch,
        foreground: a.foreground,
        seconds: a.seconds,
        transport: match a.transport {
            PeerTransport::Inproc => bench::Transport::InProcess,
            PeerTransport::Grpc => bench::Transport::Grpc,
            PeerTransport::GrpcShm => bench::Transport::GrpcShared,
        },
        augment: a.augment == PeerAugment::Nnunet,
        workers: a.workers.max(1),
        exe: Some(exe()?),
        log: std::env::temp_dir().join(format!("patchflow-peer-{}.log", std::process::id())),
        cache_mb: a.cache_mb,
        daemon_args: a.daemon_arg,
    };
    let stop = stop_flag()?;
    let report = bench::run_peer(&cfg, &stop)?;
    println!("{}", serde_json::to_string(&report)?);
    if let Some(path) = a.json {
        bench::write_json(&path, &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn load(a: LoadArgs, progress: bool) -> Result<ExitCode> {
    let sizes = if a.sizes.is_empty() {
        patchflow_curriculum::pgps_patch_sizes(a.pgps_final, [5, 5, 5])?
    } else {
        a.sizes
    };
    let cfg = bench::LoadConfig {
        store: a.store,
        exe: exe()?,
        streams: a.streams,
        duration: Duration::from_secs(a.duration.max(1)),
        sizes,
        switch_every: a.switch_every,
        batch: a.batch,
        foreground: a.foreground,
        workers: if a.workers == 0 { cores() } else { a.workers },
        cache_mb: a.cache_mb,
        log: a.log,
        progress,
        command: command_line(),
        daemon_args: a.daemon_arg,
        transport: match a.transport {
            LoadTransport::Grpc => bench::Transport::Grpc,
            LoadTransport::GrpcShm => bench::Transport::GrpcShared,
        },
        shm_mb: a.shm_mb,
    };
    let stop = stop_flag()?;
    let report = bench::run_load(&cfg, &stop)?;
    print!("{}", bench::render_load(&report));
    if let Some(path) = a.json {
        bench::write_json(&path, &report)?;
    }
    if report.errors > 0 || !report.within_bound {
        eprintln!(
            "load run failed: {} errors, memory within bound: {}",
            report.errors, report.within_bound
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

//! `patchflow bench` and its modes: their arguments, as clap parses them.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use patchflow_grid::Patch;

use super::{extent, pools, spacing};

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
    /// The shared-memory path against the sampler in process (one reused buffer, and a ring
    /// of buffers), alternately in one run, with the ratios.
    Ratio(RatioArgs),
}

/// The suite: dataset → ingest → sampling by patch size, in process and over loopback gRPC,
/// warm and cold; a table, a JSON report and a PNG plot.
#[derive(Args, Debug)]
pub struct SuiteArgs {
    /// Folder for the generated dataset, the store, the daemon log and the reports.
    #[arg(long, default_value = "patchflow-bench")]
    pub work_dir: PathBuf,
    /// Measure this existing store instead of generating and ingesting one. A store in object
    /// storage (`s3://bucket/prefix`, endpoint from AWS_ENDPOINT_URL) is measured against a
    /// local copy, through a latency-adding proxy (--latencies-ms), and with several daemons
    /// (--daemons) sharing it.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Latencies the proxy adds in each direction, milliseconds (object storage only).
    #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
    pub latencies_ms: Vec<f64>,
    /// Daemon counts measured over one store in object storage.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub daemons: Vec<usize>,
    /// Client streams spread over those daemons.
    #[arg(long, default_value_t = 4)]
    pub daemon_clients: usize,
    /// Generated cases.
    #[arg(long, default_value_t = 8)]
    pub cases: usize,
    /// Generate about this many GB (10^9 bytes) of voxels (`i16` image + `u8` label) instead
    /// of --cases cases.
    #[arg(long)]
    pub size_gb: Option<f64>,
    /// Shape z,y,x of each generated case.
    #[arg(long, value_parser = extent, default_value = "160,256,256")]
    pub shape: [usize; 3],
    /// Spacing z,y,x in mm of the generated cases.
    #[arg(long, value_parser = spacing, default_value = "1.5,0.8,0.8")]
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
    #[arg(long, value_parser = extent, default_value = "128,128,128")]
    pub pgps_final: [usize; 3],
    /// Stride-2 poolings z,y,x of the PGPS plan (the curriculum's rule: at most 12 per axis).
    #[arg(long, value_parser = pools, default_value = "5,5,5")]
    pub pools: [u32; 3],
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
    /// A daemon child process over loopback gRPC, voxels inside the messages (in the client's
    /// default compact form).
    Grpc,
    /// The same with the compact form off: every voxel as served.
    GrpcPlain,
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
    pub patch: Patch,
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

/// `patchflow bench ratio`.
#[derive(Args, Debug)]
pub struct RatioArgs {
    /// The store.
    #[arg(long)]
    pub store: PathBuf,
    /// Cubic patch edges, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,128")]
    pub edges: Vec<usize>,
    /// Items per batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Foreground-oversampled share.
    #[arg(long, default_value_t = 0.33)]
    pub foreground: f64,
    /// Measured seconds of each path in each round (after a warm-up of a quarter of that).
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Rounds (each measures every path at every edge, one after the other).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Buffers of the in-process ring reference (a loader's prefetch queue; at least 2).
    #[arg(long, default_value_t = 4)]
    pub ring: usize,
    /// Also measure the path with the voxels inside the messages, as served ("gRPC plain") and
    /// in the compact form ("gRPC"), over loopback TCP.
    #[arg(long)]
    pub grpc: bool,
    /// Chunk cache of each side, MiB.
    #[arg(long, default_value_t = 2048)]
    pub cache_mb: u64,
    /// Also write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Further argument for the `patchflow serve` child (repeat for several).
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
    #[arg(long, value_delimiter = ';', value_parser = extent)]
    pub sizes: Vec<[usize; 3]>,
    /// Final patch whose PGPS stage sizes are cycled through when --sizes is not given.
    #[arg(long, value_parser = extent, default_value = "128,128,128")]
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

//! `patchflow-train`: trains a 3D U-Net with the PGPS curriculum on batches from a local store
//! or from patchflow daemons, and leaves a report (metrics, plot, predictions, summary).
//!
//! It only parses the command line and wires the trainer crate and the client; it must hold no
//! training logic of its own.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use patchflow_client::{ClientOptions, Secret, TlsOptions};
use patchflow_curriculum::{Mode, parse_pools};
use patchflow_grid::Patch;
use patchflow_trainer::bench::{BenchConfig, run_bench};
use patchflow_trainer::data::{InProcessSource, WithStoreVolumes};
use patchflow_trainer::train::{
    BEST_CHECKPOINT_DIR, CHECKPOINT_DIR, PLOT_FILE, PREDICTIONS_DIR, SUMMARY_FILE,
};
use patchflow_trainer::{
    BatchSource, DeviceChoice, RemoteSource, TrainConfig, compare_runs, time_stages, train,
};

/// Train a 3D segmentation U-Net (nnU-Net style) on patchflow batches with a patch-size
/// curriculum.
#[derive(Parser, Debug)]
#[command(name = "patchflow-train", version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print one table comparing finished runs (their output folders): time per stage, total
    /// time vs the constant run, data-wait share, validation Dice.
    Compare {
        /// Output folders of runs (and of --time-stages runs).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
    /// Benchmark the curricula on one labelled CT: time a training step at every patch and
    /// batch size of every mode (nnU-Net's 128³ plan by default), project each mode's time for
    /// 1000 epochs × 250 iterations against constant and the paper's figures, optionally train
    /// some modes for a short budget, and print one table.
    Bench(Box<BenchArgs>),
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Folder of the real test data (pairs of NIfTI image and label).
    #[arg(long, default_value = "../shared/data")]
    data: PathBuf,
    /// Image to use [default: DATA/ct_totalseg/aorta_ct_cropped.nii.gz].
    #[arg(long)]
    image: Option<PathBuf>,
    /// Its label [default: DATA/ct_totalseg/aorta_aorta.nii.gz].
    #[arg(long)]
    label: Option<PathBuf>,
    /// Work folder (slabs, store, runs, table.txt).
    #[arg(long, default_value = "bench-out")]
    work: PathBuf,
    /// Tiny CPU settings (a few minutes on two cores, with training runs of constant, pgps and
    /// pgps-performance) instead of the GPU settings.
    #[arg(long)]
    cpu_tiny: bool,
    /// Slabs (cases) the volume is cut into along z; the last is held out.
    #[arg(long)]
    slabs: Option<usize>,
    /// Final patch z,y,x [default: 128,128,128, or 16,32,32 with --cpu-tiny].
    #[arg(long)]
    final_patch: Option<Patch>,
    /// Stride-2 poolings per axis z,y,x [default: planned from the final patch and spacing].
    #[arg(long, value_parser = |s: &str| parse_pools(s).map_err(|e| e.to_string()))]
    pools: Option<[u32; 3]>,
    /// Planned batch size.
    #[arg(long)]
    batch: Option<usize>,
    /// Modes to train after the timing, comma-separated [default: none, or
    /// constant,pgps,pgps-performance with --cpu-tiny].
    #[arg(long, value_enum, value_delimiter = ',')]
    train: Option<Vec<Curriculum>>,
    /// Epochs per training run.
    #[arg(long)]
    epochs: Option<usize>,
    /// Iterations per epoch of each training run.
    #[arg(long)]
    iters_per_epoch: Option<usize>,
    /// Timed iterations per step size.
    #[arg(long)]
    time_iterations: Option<usize>,
    /// Untimed warm-up iterations per step size.
    #[arg(long)]
    warmup: Option<usize>,
    /// auto, cpu, cuda or cuda:N [default: auto, cpu with --cpu-tiny].
    #[arg(long, value_parser = parse_device)]
    device: Option<DeviceChoice>,
    /// libtorch threads.
    #[arg(long)]
    threads: Option<usize>,
}

fn bench(a: &BenchArgs) -> Result<()> {
    let image = a
        .image
        .clone()
        .unwrap_or_else(|| a.data.join("ct_totalseg/aorta_ct_cropped.nii.gz"));
    let label = a
        .label
        .clone()
        .unwrap_or_else(|| a.data.join("ct_totalseg/aorta_aorta.nii.gz"));
    for p in [&image, &label] {
        if !p.is_file() {
            bail!(
                "{} not found (give --data, or --image and --label)",
                p.display()
            );
        }
    }
    let mut c = if a.cpu_tiny {
        BenchConfig::cpu_tiny(image, label, a.work.clone())
    } else {
        BenchConfig::gpu(image, label, a.work.clone())
    };
    if let Some(v) = a.slabs {
        c.slabs = v;
    }
    if let Some(v) = a.final_patch {
        c.final_patch = v.axes();
    }
    if a.pools.is_some() {
        c.pools = a.pools;
    }
    if let Some(v) = a.batch {
        c.batch = v;
    }
    if let Some(v) = &a.train {
        c.modes = v.iter().map(|&m| Mode::from(m)).collect();
    }
    if let Some(v) = a.warmup {
        c.warmup = v;
    }
    if let Some(v) = a.epochs {
        c.epochs = v;
    }
    if let Some(v) = a.iters_per_epoch {
        c.iters_per_epoch = v;
    }
    if let Some(v) = a.time_iterations {
        c.time_iterations = v;
    }
    if let Some(d) = a.device {
        c.device = d;
    }
    if a.threads.is_some() {
        c.threads = a.threads;
    }
    let table = run_bench(&c)?;
    print!("{table}");
    println!("table: {}", a.work.join("table.txt").display());
    Ok(())
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Local store folder: sample batches in this process. With --server, used only to read
    /// validation cases (and their original grids for the exported predictions).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Daemon address (repeat for several daemons serving the same dataset).
    #[arg(long = "server")]
    servers: Vec<String>,
    /// Dataset name (as the daemon serves it) [default with --store: the folder's name].
    #[arg(long)]
    dataset: Option<String>,
    /// File holding the daemons' bearer token (one trailing line break is ignored). The token
    /// can also be given in the PATCHFLOW_TOKEN environment variable (kept off the command
    /// line), not both.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) to trust for TLS daemons instead of the system's roots. Any
    /// --tls-* flag makes --server addresses without a scheme use TLS (https://).
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for daemons that require one; needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name to check the daemons' certificates against instead of the --server host.
    #[arg(long, value_name = "NAME")]
    tls_domain: Option<String>,
    /// The patch-size curriculum.
    #[arg(long, value_enum, default_value_t = Curriculum::Pgps)]
    curriculum: Curriculum,
    /// Training epochs.
    #[arg(long, default_value_t = 1000)]
    epochs: usize,
    /// Iterations per epoch.
    #[arg(long, default_value_t = 250)]
    iters_per_epoch: usize,
    /// Final (planned) patch z,y,x, or one number for a cube.
    #[arg(long)]
    final_patch: Option<Patch>,
    /// Stride-2 poolings per axis z,y,x [default: planned from the final patch and spacing].
    #[arg(long, value_parser = |s: &str| parse_pools(s).map_err(|e| e.to_string()))]
    pools: Option<[u32; 3]>,
    /// Planned batch size.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Cases held out for validation (the last N case ids).
    #[arg(long, default_value_t = 1)]
    val_cases: usize,
    /// Validation batches per epoch (final patch, planned batch, from the validation cases),
    /// scored with nnU-Net's pseudo-Dice; its moving average keeps checkpoint_best/. 0 = none
    /// [default: a fifth of --iters-per-epoch, nnU-Net's 50 for its 250].
    #[arg(long)]
    val_iters: Option<usize>,
    /// Validate by sliding window over whole cases every N epochs (and after the last); 0 =
    /// only after the last.
    #[arg(long, default_value_t = 0)]
    val_every: usize,
    /// Sliding-window overlap in [0, 1).
    #[arg(long, default_value_t = 0.5)]
    overlap: f64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: DeviceChoice,
    /// Output folder.
    #[arg(long, default_value = "train-out")]
    out: PathBuf,
    /// Seed of the weights and of the batch stream.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from the checkpoint in the output folder.
    #[arg(long)]
    resume: bool,
    /// Small network widths (8 features, at most 64) for CPU runs.
    #[arg(long)]
    tiny: bool,
    /// Features of the first stage [default: 32, or 8 with --tiny].
    #[arg(long)]
    base_features: Option<i64>,
    /// Cap on the features of a stage [default: 320, or 64 with --tiny].
    #[arg(long)]
    max_features: Option<i64>,
    /// Deep supervision: auto (on for CUDA), on or off.
    #[arg(long, value_enum, default_value_t = DeepSupervision::Auto)]
    deep_supervision: DeepSupervision,
    /// libtorch threads [default: libtorch's choice].
    #[arg(long)]
    threads: Option<usize>,
    /// Share of foreground-centred crops [default: 0.5 for the curricula, as the published PGPS
    /// trainers set it; nnU-Net's 0.33 for constant].
    #[arg(long)]
    oversample: Option<f64>,
    /// nnU-Net's default data augmentation, applied where the batches are cut (in this
    /// process with --store, by the daemons with --server).
    #[arg(long)]
    augment: bool,
    /// Initial learning rate.
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// Batches prepared ahead of the GPU.
    #[arg(long, default_value_t = 4)]
    prefetch: usize,
    /// Checkpoint every N epochs (and at the end); 0 = only at the end.
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Do not write validation predictions.
    #[arg(long)]
    no_export: bool,
    /// Train in float32 on CUDA (no bf16 autocast).
    #[arg(long)]
    no_autocast: bool,
    /// Stop with a checkpoint after this many epochs (continue later with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Instead of training a run: time N iterations at every stage of the schedule.
    #[arg(long)]
    time_stages: Option<usize>,
    /// Untimed warm-up iterations per stage with --time-stages.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Chunk cache of the local store, MiB.
    #[arg(long, default_value_t = 1024)]
    cache_mib: u64,
}

/// `--curriculum`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Curriculum {
    /// The authors' PGPS: the patch grows, the batch stays.
    #[value(alias = "pgps-efficiency")]
    Pgps,
    /// The authors' PGPS+: the patch grows, the batch shrinks from a large start so that the
    /// voxels per batch grow.
    PgpsPlus,
    /// The journal's performance mode: the patch grows, the voxels per batch stay.
    PgpsPerformance,
    /// Random patch-size sampling: one of the PGPS sizes drawn per iteration.
    Rpss,
    /// nnU-Net's constant patch and batch.
    Constant,
}

impl From<Curriculum> for Mode {
    fn from(c: Curriculum) -> Mode {
        match c {
            Curriculum::Pgps => Mode::Pgps,
            Curriculum::PgpsPlus => Mode::PgpsPlus,
            Curriculum::PgpsPerformance => Mode::PgpsPerformance,
            Curriculum::Rpss => Mode::Rpss,
            Curriculum::Constant => Mode::Constant,
        }
    }
}

/// `--deep-supervision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeepSupervision {
    /// On for CUDA, off on the CPU.
    Auto,
    /// A loss on every decoder output.
    On,
    /// A loss on the full-resolution output only.
    Off,
}

impl DeepSupervision {
    fn choice(self) -> Option<bool> {
        match self {
            DeepSupervision::Auto => None,
            DeepSupervision::On => Some(true),
            DeepSupervision::Off => Some(false),
        }
    }
}

/// `--device`: `auto`, `cpu`, `cuda` or `cuda:N` (a value enum cannot carry the device index).
fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse::<DeviceChoice>().map_err(|e| e.to_string())
}

fn open_source(a: &TrainArgs) -> Result<Box<dyn BatchSource>> {
    let cache = a.cache_mib.saturating_mul(1 << 20);
    match (&a.store, a.servers.is_empty()) {
        (None, true) => bail!("give --store DIR (in-process sampling) or --server ADDR"),
        (Some(store), true) => {
            let name = a.dataset.clone().unwrap_or_else(|| {
                store
                    .file_name()
                    .map_or("dataset".into(), |n| n.to_string_lossy().into_owned())
            });
            let src = InProcessSource::open(store, &name, cache)
                .with_context(|| format!("opening store {}", store.display()))?;
            Ok(Box::new(src))
        }
        (store, false) => {
            let Some(dataset) = &a.dataset else {
                bail!("--server needs --dataset NAME");
            };
            let remote = RemoteSource::connect_with(&a.servers, dataset, client_options(a)?)
                .with_context(|| format!("connecting to {}", a.servers.join(", ")))?;
            match store {
                Some(dir) => Ok(Box::new(
                    WithStoreVolumes::open(remote, dir, dataset, cache)
                        .with_context(|| format!("opening store {}", dir.display()))?,
                )),
                None => Ok(Box::new(remote)),
            }
        }
    }
}

/// Options of the daemon connections: the token and the TLS settings of the flags.
fn client_options(a: &TrainArgs) -> Result<ClientOptions> {
    let token = Secret::from_file_or_env(a.token_file.as_deref())?;
    Ok(ClientOptions {
        token,
        tls: TlsOptions {
            ca: a.tls_ca.clone(),
            cert: a.tls_cert.clone(),
            key: a.tls_key.clone(),
            domain: a.tls_domain.clone(),
        },
        ..ClientOptions::default()
    })
}

fn config(a: &TrainArgs) -> Result<TrainConfig> {
    let mode = Mode::from(a.curriculum);
    let Some(final_patch) = a.final_patch else {
        bail!("--final-patch z,y,x is required");
    };
    let mut c = TrainConfig::new(mode, final_patch, a.out.clone());
    c.epochs = a.epochs;
    c.iters_per_epoch = a.iters_per_epoch;
    c.pools = a.pools;
    c.batch = a.batch;
    c.val_cases = a.val_cases;
    c.val_iters = a.val_iters;
    c.val_every = a.val_every;
    c.overlap = a.overlap;
    c.seed = a.seed;
    c.base_features = a.base_features.unwrap_or(if a.tiny { 8 } else { 32 });
    c.max_features = a.max_features.unwrap_or(if a.tiny { 64 } else { 320 });
    c.deep_supervision = a.deep_supervision.choice();
    c.oversample = a.oversample;
    c.augment = a.augment;
    c.initial_lr = a.lr;
    c.prefetch = a.prefetch;
    c.device = a.device;
    c.autocast = !a.no_autocast;
    c.threads = a.threads;
    c.checkpoint_every = a.checkpoint_every;
    c.export_predictions = !a.no_export;
    c.stop_after_epochs = a.stop_after;
    c.resume = a.resume;
    Ok(c)
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Some(Command::Compare { runs }) => {
            print!("{}", compare_runs(runs)?);
            return Ok(());
        }
        Some(Command::Bench(b)) => return bench(b),
        None => {}
    }
    let a = &cli.train;
    let cfg = config(a)?;
    let source = open_source(a)?;
    if let Some(iters) = a.time_stages {
        let timings = time_stages(&cfg, source, a.warmup, iters)?;
        for t in &timings {
            println!(
                "stage {:>2}  patch {:>11}  batch {:>3}  {:>8.1} ms/iter  data wait {:>5.1}%",
                t.stage,
                t.patch.to_string(),
                t.batch,
                t.seconds_per_iteration * 1e3,
                100.0 * t.data_wait_share
            );
        }
        println!(
            "stage timing: {}",
            cfg.out_dir.join("stage_timing.json").display()
        );
        return Ok(());
    }
    let summary = train(&cfg, source)?;
    if let Some(v) = &summary.validation {
        for (c, d) in v.mean_dice.iter().enumerate().skip(1) {
            let name = summary.class_names.get(c).map_or("?", String::as_str);
            match d {
                Some(d) => println!("val Dice {name}: {d:.4}"),
                None => println!("val Dice {name}: n/a"),
            }
        }
    }
    println!(
        "{} epochs in {:.1} s, data wait {:.1}%{}",
        summary.epochs_done,
        summary.train_seconds,
        100.0 * summary.data_wait_share,
        if summary.finished {
            String::new()
        } else {
            format!(
                " (stopped; continue with --resume up to {})",
                summary.run.epochs
            )
        }
    );
    if let (Some(ema), Some(epoch)) = (summary.best_ema_pseudo_dice, summary.best_epoch) {
        println!("best EMA pseudo Dice {ema:.4} after epoch {epoch} ({BEST_CHECKPOINT_DIR}/)");
    }
    println!(
        "report: {} (metrics.jsonl, {PLOT_FILE}, {PREDICTIONS_DIR}/, {SUMMARY_FILE}, \
         {CHECKPOINT_DIR}/ and the other checkpoint_*/)",
        cfg.out_dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a log redirected to a file gets no escape sequences.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patchflow-train: {e:#}");
            ExitCode::FAILURE
        }
    }
}

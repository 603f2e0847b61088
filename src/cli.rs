//! Command-line arguments and the wiring of each subcommand to the library crates.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

/// Streaming patch sampling for 3D segmentation training with a patch-size curriculum.
#[derive(Parser, Debug)]
#[command(name = "patchflow", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors, no progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Convert NIfTI image/label pairs into a chunked, compressed store.
    Ingest(IngestArgs),
    /// Show what a store holds: cases, shapes, spacing, classes, compression.
    Inspect(InspectArgs),
    /// Write a synthetic CT-like phantom dataset in nnU-Net's raw layout.
    Phantom(PhantomArgs),
    /// Print a PGPS (or baseline) patch-size schedule.
    Schedule(ScheduleArgs),
    /// Serve patches of one or more stores over gRPC (the sampling daemon).
    Serve(ServeArgs),
    /// The main job on generated data: phantom dataset → ingest → report.
    Demo(DemoArgs),
    /// Measure ingest, sampling and daemon throughput (also: `bench peer`, `bench load`).
    Bench(Box<crate::bench::BenchArgs>),
}

/// `patchflow serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Store folders (each a dataset named after its folder), or folders of stores; local
    /// paths or `s3://bucket/prefix` (credentials, region and endpoint from the AWS_*
    /// environment variables).
    #[arg(required = true)]
    pub stores: Vec<PathBuf>,
    /// TCP address to listen on, HOST:PORT (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Also (or, with --no-tcp, only) listen on this Unix socket, for trainers on this host.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Do not listen on TCP (requires --unix).
    #[arg(long, requires = "unix")]
    pub no_tcp: bool,
    /// Sampling worker threads [default: number of cores].
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Chunk cache capacity in MiB, shared by every dataset (0: no cache, every read decodes).
    #[arg(long, default_value_t = 1024)]
    pub cache_mb: u64,
    /// Keep chunks fetched from object storage in this local folder too, so that a restarted
    /// daemon reads them from there (bounded by --disk-cache-gb).
    #[arg(long, value_name = "DIR")]
    pub disk_cache: Option<PathBuf>,
    /// Budget of --disk-cache in GB.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10.0,
        requires = "disk_cache"
    )]
    pub disk_cache_gb: f64,
    /// Serve Prometheus text metrics on HOST:PORT (GET /metrics).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Largest patch in voxels (z*y*x).
    #[arg(long)]
    pub max_patch_voxels: Option<u64>,
    /// Largest batch in bytes (image + label).
    #[arg(long)]
    pub max_batch_bytes: Option<u64>,
    /// Most sample streams served at once.
    #[arg(long)]
    pub max_streams: Option<usize>,
    /// Largest message sent, bytes; larger batches go out in several parts (at least 65536).
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// File holding the bearer token every client must send (one trailing line break is
    /// ignored). The token can also be given in the PATCHFLOW_TOKEN environment variable.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The token itself, from the environment (kept off the command line, where other users of
    /// the host could read it).
    #[arg(long, env = "PATCHFLOW_TOKEN", hide = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Serve TLS on the TCP listener with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require TCP clients to present a certificate signed by this CA (PEM); needs --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Allow listening on a non-loopback address without a token.
    /// Anyone who reaches the address can then read every served dataset.
    #[arg(long)]
    pub insecure: bool,
    /// Folder for the shared-memory slots of clients on this host (default: /dev/shm). Clients
    /// on this host then get batches without a byte on the socket.
    #[arg(long, value_name = "DIR", conflicts_with = "no_shared_memory")]
    pub shm_dir: Option<PathBuf>,
    /// Do not offer shared memory: every batch travels inside the messages.
    #[arg(long)]
    pub no_shared_memory: bool,
    /// Most shared-memory slots (batches) one stream may hold.
    #[arg(long)]
    pub max_shared_slots: Option<u32>,
    /// Most MiB of shared memory all streams together may hold; beyond it, batches go inside
    /// the messages.
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub shm_mb: u64,
}

/// `patchflow demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for everything the demo writes (raw dataset, store, report).
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Phantom cases to generate.
    #[arg(long, default_value_t = 6)]
    pub cases: usize,
    /// Phantom shape z,y,x.
    #[arg(long, value_parser = parse_usize_triplet, default_value = "64,96,96")]
    pub shape: [usize; 3],
    /// The trainer binary [default: patchflow-train next to this binary]. Without it the demo
    /// stops after ingest.
    #[arg(long)]
    pub train_bin: Option<PathBuf>,
    /// Training epochs of the demo run.
    #[arg(long, default_value_t = 24)]
    pub epochs: usize,
    /// Iterations per epoch of the demo run.
    #[arg(long, default_value_t = 50)]
    pub iters_per_epoch: usize,
    /// Share of crops centred on a foreground class. All by default: the phantom's small classes
    /// (kidney, bone, lesion: 0.1–0.7% of the voxels each) are then learned within the demo's
    /// few minutes; with nnU-Net's 0.33 only the liver is.
    #[arg(long, default_value_t = 1.0)]
    pub oversample: f64,
    /// Final patch z,y,x of the demo run (PGPS grows towards it).
    #[arg(long, value_parser = parse_usize_triplet, default_value = "32,64,64")]
    pub final_patch: [usize; 3],
}

/// `patchflow ingest`.
#[derive(Args, Debug)]
pub struct IngestArgs {
    /// nnU-Net raw dataset folder (imagesTr/, labelsTr/, dataset.json), nnU-Net's preprocessed
    /// configuration folder (nnUNet_preprocessed/DatasetXXX_Name/nnUNetPlans_3d_fullres, stored
    /// as nnU-Net has it), or a TSV file with a header row naming the columns `image` and
    /// `label` (optional: `id`, `modality`).
    pub input: PathBuf,
    /// Store folder to write (created if absent), or `s3://bucket/prefix` in object storage.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Cases processed in parallel [default: number of cores].
    #[arg(long, short)]
    pub jobs: Option<usize>,
    /// Keep each case's spacing (no resampling).
    #[arg(long, conflicts_with = "spacing")]
    pub keep_spacing: bool,
    /// Target spacing z,y,x in mm [default: the dataset's median spacing].
    #[arg(long, value_parser = parse_f64_triplet)]
    pub spacing: Option<[f64; 3]>,
    /// Image interpolation when resampling.
    #[arg(long, default_value = "cubic", value_parser = ["cubic", "linear"])]
    pub interp: String,
    /// Chunk shape z,y,x of the store [default: the store's benchmarked default].
    #[arg(long, value_parser = parse_usize_triplet)]
    pub chunk: Option<[usize; 3]>,
    /// zstd compression level of the chunks.
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// Seed for class-location and intensity sampling.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Make a new dataset plan (spacing, CT statistics) and re-ingest every case.
    #[arg(long)]
    pub replan: bool,
    /// Keep running: ingest new cases as they appear, until SIGINT/SIGTERM.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between looks at the input in --watch mode.
    #[arg(long, default_value_t = 2.0)]
    pub poll_seconds: f64,
}

/// `patchflow inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Store folder, or `s3://bucket/prefix`.
    pub store: PathBuf,
    /// Only this case.
    #[arg(long)]
    pub case: Option<String>,
    /// Print one JSON document instead of a table (fields documented in the README).
    #[arg(long)]
    pub json: bool,
    /// Also decode every chunk and check its checksum; exit non-zero if any fails.
    #[arg(long)]
    pub verify: bool,
}

/// `patchflow phantom`.
#[derive(Args, Debug)]
pub struct PhantomArgs {
    /// Output folder (nnU-Net raw layout).
    pub out: PathBuf,
    /// Number of cases.
    #[arg(long, default_value_t = 8)]
    pub cases: usize,
    /// Shape z,y,x in voxels.
    #[arg(long, value_parser = parse_usize_triplet, default_value = "64,96,96")]
    pub shape: [usize; 3],
    /// Spacing z,y,x in mm.
    #[arg(long, value_parser = parse_f64_triplet, default_value = "2,1,1")]
    pub spacing: [f64; 3],
    /// Lesions (rare class) per case.
    #[arg(long, default_value_t = 4)]
    pub lesions: usize,
    /// Seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// `patchflow schedule`.
#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// Final (planned) patch z,y,x, or one number for a cube.
    #[arg(long, required_unless_present = "store", value_parser = |s: &str| patchflow_curriculum::parse_triplet(s).map_err(|e| e.to_string()))]
    pub final_patch: Option<[usize; 3]>,
    /// Stride-2 poolings per axis z,y,x, or one number for all axes.
    #[arg(long, required_unless_present = "store", value_parser = |s: &str| patchflow_curriculum::parse_pools(s).map_err(|e| e.to_string()))]
    pub pools: Option<[u32; 3]>,
    /// A store ingested from nnU-Net's preprocessed folder: its plan's patch size, poolings per
    /// axis and batch size (flags given as well override them).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Training epochs.
    #[arg(long, default_value_t = 1000)]
    pub epochs: usize,
    /// Planned batch size [default: the store's plan, else 2].
    #[arg(long)]
    pub batch: Option<usize>,
    /// pgps-efficiency, pgps-performance, constant or rpss.
    #[arg(long, default_value = "pgps-efficiency")]
    pub mode: patchflow_curriculum::Mode,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

fn parse_triplet<T: std::str::FromStr + Copy>(s: &str) -> Result<[T; 3], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let parse = |p: &str| {
        p.parse::<T>()
            .map_err(|_| format!("{p:?} is not a number (expected z,y,x or one number)"))
    };
    match parts.as_slice() {
        [a] => {
            let v = parse(a)?;
            Ok([v, v, v])
        }
        [a, b, c] => Ok([parse(a)?, parse(b)?, parse(c)?]),
        _ => Err(format!(
            "{s:?}: expected three comma-separated values z,y,x or one value"
        )),
    }
}

pub(crate) fn parse_usize_triplet(s: &str) -> Result<[usize; 3], String> {
    let v: [usize; 3] = parse_triplet(s)?;
    if v.contains(&0) {
        return Err(format!("{s:?}: every value must be at least 1"));
    }
    Ok(v)
}

pub(crate) fn parse_f64_triplet(s: &str) -> Result<[f64; 3], String> {
    let v: [f64; 3] = parse_triplet(s)?;
    if v.iter().any(|x| !x.is_finite() || *x <= 0.0) {
        return Err(format!("{s:?}: every value must be a positive number"));
    }
    Ok(v)
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let progress = !cli.quiet;
    match cli.command {
        Command::Ingest(a) => ingest(a, progress),
        Command::Inspect(a) => inspect(a),
        Command::Phantom(a) => phantom(a),
        Command::Schedule(a) => schedule(a),
        Command::Serve(a) => serve(a),
        Command::Demo(a) => demo(a, progress),
        Command::Bench(a) => crate::bench::run(*a, progress),
    }
}

/// SIGINT/SIGTERM set the returned flag; a second signal exits at once.
pub(crate) fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))
            .context("installing the signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    Ok(stop)
}

fn ingest(a: IngestArgs, progress: bool) -> Result<ExitCode> {
    let mut opts = patchflow_ingest::IngestOptions {
        replan: a.replan,
        progress,
        ..Default::default()
    };
    if let Some(j) = a.jobs {
        if j == 0 {
            bail!("--jobs must be at least 1");
        }
        opts.jobs = j;
    }
    opts.settings.keep_spacing = a.keep_spacing;
    opts.settings.target_spacing = a.spacing;
    opts.settings.interp = a.interp;
    if let Some(c) = a.chunk {
        opts.settings.chunk_shape = c;
    }
    if let Some(l) = a.zstd_level {
        if !(1..=22).contains(&l) {
            bail!("--zstd-level must be within 1..=22, got {l}");
        }
        opts.settings.zstd_level = l;
    }
    opts.settings.seed = a.seed;
    let stop = stop_flag()?;
    if a.watch {
        if !(a.poll_seconds.is_finite() && a.poll_seconds > 0.0) {
            bail!("--poll-seconds must be a positive number");
        }
        patchflow_ingest::watch(
            &a.input,
            &a.out,
            &opts,
            Duration::from_secs_f64(a.poll_seconds),
            &stop,
            |report| eprintln!("{}", report.summary()),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = patchflow_ingest::ingest(&a.input, &a.out, &opts, &stop)?;
    eprintln!("{}", report.summary());
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let report = patchflow_ingest::inspect(&a.store, a.case.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", patchflow_ingest::render_text(&report));
    }
    if !a.verify {
        return Ok(ExitCode::SUCCESS);
    }
    let failures = patchflow_ingest::verify(&a.store, a.case.as_deref())?;
    for (id, e) in &failures {
        eprintln!("damaged: {id}: {e}");
    }
    if failures.is_empty() {
        eprintln!(
            "verified {} case(s): every chunk intact",
            report.cases.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{} of {} case(s) damaged",
            failures.len(),
            report.cases.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

fn phantom(a: PhantomArgs) -> Result<ExitCode> {
    let spec = patchflow_volume::PhantomSpec {
        shape: a.shape,
        spacing: a.spacing,
        seed: a.seed,
        lesions: a.lesions,
    };
    patchflow_volume::write_phantom_dataset(&a.out, a.cases, &spec)
        .with_context(|| format!("writing the phantom dataset to {}", a.out.display()))?;
    eprintln!("wrote {} phantom cases to {}", a.cases, a.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Resolves HOST:PORT (a name or an address) to one socket address.
fn resolve(what: &str, addr: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .with_context(|| format!("{what} {addr:?}: expected HOST:PORT"))?
        .next()
        .with_context(|| format!("{what} {addr:?} resolves to no address"))
}

/// The serve token: from --token-file or PATCHFLOW_TOKEN (not both), if any.
fn serve_token(a: &ServeArgs) -> Result<Option<patchflow_server::Secret>> {
    match (&a.token_file, &a.token) {
        (Some(_), Some(_)) => {
            bail!("give the token either with --token-file or in PATCHFLOW_TOKEN, not both")
        }
        (Some(path), None) => Ok(Some(patchflow_server::Secret::from_file(path)?)),
        (None, Some(token)) => Ok(Some(
            patchflow_server::Secret::new(token.as_str())
                .context("the PATCHFLOW_TOKEN environment variable")?,
        )),
        (None, None) => Ok(None),
    }
}

fn serve(a: ServeArgs) -> Result<ExitCode> {
    let token = serve_token(&a)?;
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => Some(patchflow_server::TlsFiles {
            cert,
            key,
            client_ca: a.tls_client_ca,
        }),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let mut config = patchflow_server::ServerConfig {
        stores: a.stores,
        listen: if a.no_tcp {
            None
        } else {
            Some(resolve("--listen", &a.listen)?)
        },
        unix: a.unix,
        workers: a.workers,
        cache_mb: a.cache_mb,
        disk_cache: a.disk_cache,
        disk_cache_gb: a.disk_cache_gb,
        metrics: a
            .metrics
            .as_deref()
            .map(|m| resolve("--metrics", m))
            .transpose()?,
        token,
        tls,
        insecure: a.insecure,
        shared_memory: if a.no_shared_memory {
            None
        } else {
            a.shm_dir
                .or_else(patchflow_server::default_shared_memory_dir)
        },
        shared_memory_mb: a.shm_mb,
        ..Default::default()
    };
    if let Some(v) = a.max_shared_slots {
        config.limits.max_shared_slots = v;
    }
    if let Some(v) = a.max_patch_voxels {
        config.limits.max_patch_voxels = v;
    }
    if let Some(v) = a.max_batch_bytes {
        config.limits.max_batch_bytes = v;
    }
    if let Some(v) = a.max_streams {
        config.limits.max_streams = v;
    }
    if let Some(v) = a.max_message_bytes {
        config.limits.max_message_bytes = v;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("patchflow-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(patchflow_server::serve(
        config,
        patchflow_server::shutdown_signal(),
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn schedule(a: ScheduleArgs) -> Result<ExitCode> {
    let plan = match &a.store {
        Some(store) => {
            let manifest = patchflow_store::Manifest::load(store)?
                .with_context(|| format!("{}: not a patchflow store", store.display()))?;
            let plan =
                patchflow_ingest::NnunetStorePlan::from_manifest(&manifest).with_context(|| {
                    format!(
                        "{}: not a store of nnU-Net's preprocessed folder",
                        store.display()
                    )
                })?;
            let n = plan.nnunet;
            let (Ok(patch), Ok(pools)) = (
                <[usize; 3]>::try_from(n.patch_size.as_slice()),
                <[u32; 3]>::try_from(n.num_pool_per_axis.as_slice()),
            ) else {
                bail!(
                    "{}: the plan's patch {:?} is not 3D",
                    store.display(),
                    n.patch_size
                );
            };
            Some((patch, pools, n.batch_size))
        }
        None => None,
    };
    let final_patch = a
        .final_patch
        .or(plan.map(|p| p.0))
        .context("--final-patch")?;
    let pools = a.pools.or(plan.map(|p| p.1)).context("--pools")?;
    let batch = a.batch.or(plan.map(|p| p.2)).unwrap_or(2);
    let schedule =
        patchflow_curriculum::Schedule::build(final_patch, pools, a.epochs, batch, a.mode)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&schedule.to_json())?);
    } else {
        print!("{}", schedule.render_table());
    }
    Ok(ExitCode::SUCCESS)
}

fn demo(a: DemoArgs, progress: bool) -> Result<ExitCode> {
    let raw = a.out.join("raw").join("Dataset001_Phantom");
    let store = a.out.join("phantom");
    let report_dir = a.out.join("report");
    if raw.join("dataset.json").is_file() {
        tracing::info!("using the phantom dataset already in {}", raw.display());
    } else {
        tracing::info!("generating {} phantom cases in {}", a.cases, raw.display());
        let spec = patchflow_volume::PhantomSpec {
            shape: a.shape,
            ..Default::default()
        };
        patchflow_volume::write_phantom_dataset(&raw, a.cases, &spec)
            .with_context(|| format!("writing the phantom dataset to {}", raw.display()))?;
    }
    let opts = patchflow_ingest::IngestOptions {
        progress,
        ..Default::default()
    };
    let stop = stop_flag()?;
    let ingested = patchflow_ingest::ingest(&raw, &store, &opts, &stop)?;
    eprintln!("{}", ingested.summary());
    if !ingested.failed.is_empty() {
        bail!("{} phantom case(s) failed to ingest", ingested.failed.len());
    }
    let report = patchflow_ingest::inspect(&store, None)?;
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    let text = patchflow_ingest::render_text(&report);
    std::fs::write(report_dir.join("store.txt"), &text)?;
    std::fs::write(
        report_dir.join("store.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(
        report_dir.join("ingest.json"),
        serde_json::to_string_pretty(&ingested)?,
    )?;
    print!("{text}");

    let trainer = a.train_bin.clone().or_else(|| {
        let exe = std::env::current_exe().ok()?;
        let sibling = exe.parent()?.join("patchflow-train");
        sibling.is_file().then_some(sibling)
    });
    let Some(trainer) = trainer else {
        println!(
            "\nno patchflow-train binary found (build it with `cargo xtask demo`): stopped after ingest"
        );
        println!("report: {}", report_dir.display());
        return Ok(ExitCode::SUCCESS);
    };
    let train_dir = report_dir.join("train");
    let status = serve_and_train(&a, &store, &trainer, &train_dir)?;
    if !status.success() {
        bail!("{} exited with {status}", trainer.display());
    }
    println!("\nreport: {}", report_dir.display());
    println!(
        "  store: store.txt, store.json; ingest: ingest.json; training: train/ (metrics.jsonl, \
         plot.png, predictions/, summary.json)"
    );
    Ok(ExitCode::SUCCESS)
}

/// Serves `store` on a free loopback port and runs the trainer against it with PGPS.
fn serve_and_train(
    a: &DemoArgs,
    store: &std::path::Path,
    trainer: &std::path::Path,
    out: &std::path::Path,
) -> Result<std::process::ExitStatus> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("patchflow-io")
        .build()
        .context("starting the async runtime")?;
    let server = runtime.block_on(patchflow_server::start(patchflow_server::ServerConfig {
        stores: vec![store.to_path_buf()],
        listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        workers: 1,
        cache_mb: 256,
        ..Default::default()
    }))?;
    let endpoint = server
        .endpoint()
        .context("the demo server has no TCP endpoint")?;
    let dataset = store
        .file_name()
        .and_then(|n| n.to_str())
        .context("store folder name")?
        .to_string();
    let patch = a.final_patch.map(|v| v.to_string()).join(",");
    let mut cmd = std::process::Command::new(trainer);
    cmd.args(["--server", &endpoint, "--dataset", &dataset])
        .arg("--store")
        .arg(store)
        .args([
            "--curriculum",
            "pgps-efficiency",
            "--tiny",
            "--val-cases",
            "1",
        ])
        .args(["--epochs", &a.epochs.to_string()])
        .args(["--iters-per-epoch", &a.iters_per_epoch.to_string()])
        .args(["--oversample", &a.oversample.to_string()])
        .args(["--final-patch", &patch])
        .arg("--out")
        .arg(out);
    tracing::info!("training: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", trainer.display()))?;
    runtime.block_on(server.shutdown())?;
    Ok(status)
}

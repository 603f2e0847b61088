//! `patchflow bench`: its resolved arguments handed to `patchflow-bench`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use patchflow_bench as bench;

use crate::flags::bench::{
    BenchArgs, BenchMode, LoadArgs, LoadTransport, PeerArgs, PeerAugment, PeerTransport, RatioArgs,
    SuiteArgs,
};
use crate::signals::stop_flag;

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
        Some(BenchMode::Ratio(r)) => ratio(r),
    }
}

fn suite(a: SuiteArgs, progress: bool) -> Result<ExitCode> {
    let workers = if a.workers == 0 { cores() } else { a.workers };
    if let Some(store) = a
        .store
        .as_ref()
        .filter(|s| patchflow_store::StoreLocation::is_remote_path(s))
    {
        return object_store(&a, store.clone(), workers);
    }
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
        pgps: (!a.no_pgps).then_some((a.pgps_final, a.pools)),
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

/// `patchflow bench --store s3://…`.
fn object_store(a: &SuiteArgs, store: PathBuf, workers: usize) -> Result<ExitCode> {
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .context("--store s3://…: set AWS_ENDPOINT_URL to the (http://) endpoint to proxy")?;
    if a.latencies_ms.iter().any(|l| !(l.is_finite() && *l >= 0.0)) {
        bail!("--latencies-ms: each must be a non-negative number");
    }
    let cfg = bench::ObjectBenchConfig {
        store,
        work_dir: a.work_dir.clone(),
        endpoint,
        latencies: a
            .latencies_ms
            .iter()
            .map(|&ms| Duration::from_secs_f64(ms / 1e3))
            .collect(),
        edges: a.edges.clone(),
        batch: a.batch,
        foreground: a.foreground,
        workers,
        cache_mb: a.cache_mb,
        cold_batches: a.cold_batches,
        seconds: a.seconds,
        daemons: if a.no_daemon {
            Vec::new()
        } else {
            a.daemons.clone()
        },
        clients: a.daemon_clients.max(1),
        exe: (!a.no_daemon).then(exe).transpose()?,
        command: command_line(),
    };
    let stop = stop_flag()?;
    let report = bench::run_object_store(&cfg, &stop)?;
    print!("{}", bench::render_object(&report));
    let json = a
        .json
        .clone()
        .unwrap_or_else(|| a.work_dir.join("bench-s3.json"));
    bench::write_json(&json, &report)?;
    println!("report: {}", json.display());
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
            PeerTransport::GrpcPlain => bench::Transport::GrpcPlain,
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

fn ratio(a: RatioArgs) -> Result<ExitCode> {
    let cfg = bench::RatioConfig {
        store: a.store,
        edges: a.edges,
        batch: a.batch,
        foreground: a.foreground,
        seconds: a.seconds,
        rounds: a.rounds,
        ring: a.ring,
        grpc: a.grpc,
        exe: exe()?,
        log: std::env::temp_dir().join(format!("patchflow-ratio-{}.log", std::process::id())),
        cache_mb: a.cache_mb,
        daemon_args: a.daemon_arg,
        command: command_line(),
    };
    let stop = stop_flag()?;
    let report = bench::run_ratio(&cfg, &stop)?;
    print!("{}", bench::render_ratio(&report));
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

//! `patchflow bench ratio`: the same-host shared-memory path against the sampler in process,
//! measured alternately in one run, so that a change which loses the ratio shows up.
//!
//! Two figures taken in separate runs on a shared machine differ by more than the effect being
//! looked for, so every round measures, for each patch size, one after the other: the sampler
//! in this process writing into one reused buffer (the best case), the same with a ring of
//! buffers written in rotation (what a loader with a prefetch queue does), the daemon's
//! shared-memory path, and optionally the path with the voxels inside the messages. Ratios are
//! taken within a round and summarised over the rounds (median, smallest, largest).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use patchflow_sampler::Patch;
use serde::Serialize;

use crate::BenchError;
use crate::daemon::{Daemon, DaemonSpec};
use crate::machine::Machine;
use crate::measure::{InProcess, Transport, Until, crop_request, crop_stream, run_remote};
use crate::procstat;

/// Settings of [`run_ratio`].
#[derive(Clone, Debug)]
pub struct RatioConfig {
    /// The store.
    pub store: PathBuf,
    /// Cubic patch edges.
    pub edges: Vec<usize>,
    /// Items per batch.
    pub batch: usize,
    /// Foreground-oversampled share.
    pub foreground: f64,
    /// Measured seconds of each path in each round (after a warm-up of a quarter of it).
    pub seconds: f64,
    /// Rounds.
    pub rounds: usize,
    /// Buffers of the in-process ring reference (a loader's prefetch queue).
    pub ring: usize,
    /// Also measure the path with the voxels inside the messages.
    pub grpc: bool,
    /// The `patchflow` binary (for the daemon).
    pub exe: PathBuf,
    /// Where the daemon writes its log.
    pub log: PathBuf,
    /// Chunk cache of each side, MiB.
    pub cache_mb: u64,
    /// Further arguments for `patchflow serve`.
    pub daemon_args: Vec<String>,
    /// The command line, for the report.
    pub command: String,
}

/// One path measured in one round.
#[derive(Clone, Debug, Serialize)]
pub struct RatioRun {
    /// Round, from 0.
    pub round: usize,
    /// Cubic patch edge.
    pub edge: usize,
    /// The path (see [`RatioRow::path`]).
    pub path: String,
    /// Patches received.
    pub patches: u64,
    /// Wall seconds.
    pub wall_s: f64,
    /// CPU seconds of every process involved (the daemon and this one over gRPC).
    pub cpu_s: f64,
    /// Patches per wall second.
    pub patches_per_s: f64,
    /// Patches per CPU second.
    pub patches_per_cpu_s: f64,
}

/// A ratio over the rounds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    /// Median over the rounds.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Spread {
            median: median(&v),
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// One path at one patch size, over the rounds.
#[derive(Clone, Debug, Serialize)]
pub struct RatioRow {
    /// Cubic patch edge.
    pub edge: usize,
    /// `in-process` (one reused buffer), `in-process ring N`, `gRPC+shm` or `gRPC`.
    pub path: String,
    /// Median patches per wall second.
    pub patches_per_s: f64,
    /// Median patches per CPU second.
    pub patches_per_cpu_s: f64,
    /// Patches per wall second over the in-process figure of the same round (one buffer).
    pub wall_ratio: Spread,
    /// The same over the in-process ring figure of the same round.
    pub wall_ratio_ring: Spread,
    /// Patches per CPU second over the in-process figure of the same round (one buffer).
    pub cpu_ratio: Spread,
}

/// What [`run_ratio`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct RatioReport {
    /// The command line.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// Items per batch.
    pub batch: usize,
    /// Measured seconds per path and round.
    pub seconds: f64,
    /// Buffers of the ring reference.
    pub ring: usize,
    /// Every measurement, in the order taken.
    pub runs: Vec<RatioRun>,
    /// The summary, by edge then path.
    pub rows: Vec<RatioRow>,
}

/// A path of the benchmark.
#[derive(Clone, Copy)]
enum Path {
    InProcess { ring: usize },
    Remote(Transport),
}

impl Path {
    fn name(self) -> String {
        match self {
            Path::InProcess { ring: 1 } => "in-process".into(),
            Path::InProcess { ring } => format!("in-process ring {ring}"),
            Path::Remote(t) => t.name().into(),
        }
    }
}

/// Measures the paths alternately, round after round, with one daemon of one worker and one
/// sampling thread in this process.
pub fn run_ratio(cfg: &RatioConfig, stop: &AtomicBool) -> Result<RatioReport, BenchError> {
    if !(cfg.seconds.is_finite() && cfg.seconds > 0.0) {
        return Err(BenchError::Config {
            field: "--seconds",
            reason: format!("{} (must be > 0)", cfg.seconds),
        });
    }
    if cfg.rounds == 0 || cfg.edges.is_empty() {
        return Err(BenchError::Config {
            field: "--rounds",
            reason: "at least one round of at least one edge".into(),
        });
    }
    let ring = cfg.ring.max(2);
    let seconds = Duration::from_secs_f64(cfg.seconds);
    let warmup = Duration::from_secs_f64((cfg.seconds / 4.0).min(5.0));
    let name = cfg
        .store
        .file_name()
        .map_or_else(|| "store".into(), |n| n.to_string_lossy().into_owned());
    let mut paths = vec![
        Path::InProcess { ring: 1 },
        Path::InProcess { ring },
        Path::Remote(Transport::GrpcShared),
    ];
    if cfg.grpc {
        paths.push(Path::Remote(Transport::GrpcPlain));
        paths.push(Path::Remote(Transport::Grpc));
    }
    let local = InProcess::open(&name, &cfg.store, cfg.cache_mb, 1)?;
    let spec = DaemonSpec {
        exe: cfg.exe.clone(),
        stores: vec![cfg.store.clone()],
        workers: 1,
        cache_mb: cfg.cache_mb,
        max_streams: None,
        log: cfg.log.clone(),
        shared_memory: true,
        extra_args: cfg.daemon_args.clone(),
    };
    let runtime = crate::daemon::current_thread_runtime()?;
    let daemon = runtime.block_on(Daemon::start(&spec))?;
    let mut ctx = Context {
        cfg,
        endpoint: daemon.endpoint(),
        name,
        local,
        runtime,
        daemon,
        warmup,
        seconds,
        stop,
    };
    let mut runs = Vec::new();
    for round in 0..cfg.rounds {
        for &edge in &cfg.edges {
            let patch = Patch::new([edge; 3]).map_err(|e| BenchError::Config {
                field: "--edges",
                reason: e.to_string(),
            })?;
            for &path in &paths {
                let (patches, wall_s, cpu_s) = measure(&mut ctx, path, patch)?;
                let run = RatioRun {
                    round,
                    edge,
                    path: path.name(),
                    patches,
                    wall_s,
                    cpu_s,
                    patches_per_s: patches as f64 / wall_s.max(1e-9),
                    patches_per_cpu_s: patches as f64 / cpu_s.max(1e-9),
                };
                tracing::info!(
                    round,
                    edge,
                    path = %run.path,
                    patches_per_s = run.patches_per_s,
                    patches_per_cpu_s = run.patches_per_cpu_s,
                    "measured"
                );
                runs.push(run);
            }
        }
    }
    ctx.daemon.stop()?;
    let names: Vec<String> = paths.iter().map(|p| p.name()).collect();
    Ok(RatioReport {
        command: cfg.command.clone(),
        machine: Machine::describe(&cfg.store),
        batch: cfg.batch,
        seconds: cfg.seconds,
        ring,
        rows: summarise(&runs, &cfg.edges, &names),
        runs,
    })
}

/// The rows of [`RatioReport`]: `names[0]` is the one-buffer reference, `names[1]` the ring.
fn summarise(runs: &[RatioRun], edges: &[usize], names: &[String]) -> Vec<RatioRow> {
    let find = |round: usize, edge: usize, path: &str| {
        runs.iter()
            .find(|r| r.round == round && r.edge == edge && r.path == path)
    };
    let mut rows = Vec::new();
    for &edge in edges {
        for name in names {
            let mine: Vec<&RatioRun> = runs
                .iter()
                .filter(|r| r.edge == edge && &r.path == name)
                .collect();
            let (mut wall, mut ring, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
            for r in &mine {
                if let Some(one) = find(r.round, edge, &names[0]) {
                    wall.push(r.patches_per_s / one.patches_per_s.max(1e-9));
                    cpu.push(r.patches_per_cpu_s / one.patches_per_cpu_s.max(1e-9));
                }
                if let Some(rg) = find(r.round, edge, &names[1]) {
                    ring.push(r.patches_per_s / rg.patches_per_s.max(1e-9));
                }
            }
            let mut per_s: Vec<f64> = mine.iter().map(|r| r.patches_per_s).collect();
            let mut per_cpu: Vec<f64> = mine.iter().map(|r| r.patches_per_cpu_s).collect();
            per_s.sort_by(f64::total_cmp);
            per_cpu.sort_by(f64::total_cmp);
            rows.push(RatioRow {
                edge,
                path: name.clone(),
                patches_per_s: median(&per_s),
                patches_per_cpu_s: median(&per_cpu),
                wall_ratio: Spread::of(&wall),
                wall_ratio_ring: Spread::of(&ring),
                cpu_ratio: Spread::of(&cpu),
            });
        }
    }
    rows
}

/// The median of sorted `v` (0 when empty).
fn median(v: &[f64]) -> f64 {
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// The report as a Markdown table.
pub fn render_ratio(report: &RatioReport) -> String {
    let mut out = format!(
        "batch {}, {} s per path and round, {} rounds; ratios: median (min–max) over the rounds\n\n",
        report.batch,
        report.seconds,
        report.runs.iter().map(|r| r.round + 1).max().unwrap_or(0),
    );
    out.push_str(&format!(
        "| patch | path | patches/s | patches per CPU s | / in-process (wall) | / in-process ring {} (wall) | / in-process (per CPU s) |\n",
        report.ring
    ));
    out.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    let spread = |s: &Spread| format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max);
    for row in &report.rows {
        out.push_str(&format!(
            "| {e}³ | {} | {:.0} | {:.0} | {} | {} | {} |\n",
            row.path,
            row.patches_per_s,
            row.patches_per_cpu_s,
            spread(&row.wall_ratio),
            spread(&row.wall_ratio_ring),
            spread(&row.cpu_ratio),
            e = row.edge,
        ));
    }
    out
}

/// What every measurement of one run shares.
struct Context<'a> {
    cfg: &'a RatioConfig,
    endpoint: String,
    name: String,
    local: InProcess,
    runtime: tokio::runtime::Runtime,
    daemon: Daemon,
    warmup: Duration,
    seconds: Duration,
    stop: &'a AtomicBool,
}

/// One path at one patch size, after its warm-up: patches, wall seconds and CPU seconds (this
/// process in process; the daemon and this process over gRPC).
fn measure(ctx: &mut Context<'_>, path: Path, patch: Patch) -> Result<(u64, f64, f64), BenchError> {
    let (cfg, stop) = (ctx.cfg, ctx.stop);
    match path {
        Path::InProcess { ring } => {
            let req = crop_request(patch, cfg.batch, cfg.foreground, 0);
            let local = &ctx.local;
            local.run_ring(&req, 1 << 40, Until::Elapsed(ctx.warmup), ring, stop)?;
            let (counts, me, _) =
                local.run_ring(&req, 0, Until::Elapsed(ctx.seconds), ring, stop)?;
            Ok((counts.patches, counts.wall_s, me.cpu_s))
        }
        Path::Remote(transport) => {
            let Context {
                runtime,
                daemon,
                endpoint,
                name,
                warmup,
                seconds,
                ..
            } = ctx;
            runtime.block_on(async {
                let config = crop_stream(name, patch.axes(), cfg.batch, cfg.foreground, 0);
                let warm = Until::Batches(0);
                run_remote(endpoint, &config, 1, transport, *warmup, warm, stop).await?;
                let d0 = daemon.sample()?;
                let c0 = procstat::sample(None)?;
                let until = Until::Elapsed(*seconds);
                let counts =
                    run_remote(endpoint, &config, 1, transport, Duration::ZERO, until, stop)
                        .await?;
                let d = daemon.sample()?.since(&d0);
                let c = procstat::sample(None)?.since(&c0);
                Ok::<_, BenchError>((counts.patches, counts.wall_s, d.cpu_s + c.cpu_s))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, path: &str, per_s: f64, per_cpu: f64) -> RatioRun {
        RatioRun {
            round,
            edge: 64,
            path: path.into(),
            patches: 100,
            wall_s: 100.0 / per_s,
            cpu_s: 100.0 / per_cpu,
            patches_per_s: per_s,
            patches_per_cpu_s: per_cpu,
        }
    }

    #[test]
    fn ratios_are_taken_within_each_round() {
        let names: Vec<String> = ["in-process", "in-process ring 4", "gRPC+shm"]
            .map(String::from)
            .into();
        // The machine halves its speed in round 1: ratios within a round do not move.
        let runs = vec![
            run(0, "in-process", 1000.0, 1000.0),
            run(0, "in-process ring 4", 800.0, 800.0),
            run(0, "gRPC+shm", 900.0, 600.0),
            run(1, "in-process", 500.0, 500.0),
            run(1, "in-process ring 4", 400.0, 400.0),
            run(1, "gRPC+shm", 450.0, 300.0),
            run(2, "in-process", 1000.0, 1000.0),
            run(2, "in-process ring 4", 800.0, 800.0),
            run(2, "gRPC+shm", 700.0, 500.0),
        ];
        let rows = summarise(&runs, &[64], &names);
        assert_eq!(rows.len(), 3);
        let shm = &rows[2];
        assert_eq!(shm.path, "gRPC+shm");
        assert!((shm.wall_ratio.median - 0.9).abs() < 1e-12);
        assert!((shm.wall_ratio.min - 0.7).abs() < 1e-12);
        assert!((shm.wall_ratio.max - 0.9).abs() < 1e-12);
        assert!((shm.wall_ratio_ring.median - 1.125).abs() < 1e-12);
        assert!((shm.cpu_ratio.median - 0.6).abs() < 1e-12);
        assert!((shm.cpu_ratio.min - 0.5).abs() < 1e-12);
        assert_eq!(shm.patches_per_s, 700.0);
        // The reference against itself is 1 in every round.
        assert_eq!(rows[0].wall_ratio.min, 1.0);
        assert_eq!(rows[0].wall_ratio.max, 1.0);
        let table = render_ratio(&RatioReport {
            command: "test".into(),
            machine: Machine::describe(std::path::Path::new(".")),
            batch: 2,
            seconds: 1.0,
            ring: 4,
            runs,
            rows,
        });
        assert!(
            table.contains("| 64³ | gRPC+shm | 700 | 500 | 0.90 (0.70–0.90) |"),
            "{table}"
        );
    }

    #[test]
    fn medians_of_even_and_odd_counts() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[1.0, 3.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
    }
}

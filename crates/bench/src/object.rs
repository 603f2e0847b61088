//! `patchflow bench --store s3://…`: a store in object storage against a local copy of the
//! same data, through a proxy that adds network latency, and several daemons sharing it.
//!
//! Users moving their data to S3, MinIO or Ceph want to know what it costs them: how many
//! patches a node still cuts per second when every chunk comes over the network, how much the
//! round-trip time matters, how many requests and bytes each patch takes, and whether more
//! daemons over one store add up. The benchmark:
//!
//! 1. copies the store to a local folder (the same bytes) and measures it in process, warm and
//!    cold, at each patch size;
//! 2. for each added latency (a TCP proxy in front of the endpoint that delays every piece of
//!    data by that long in each direction), opens the store in object storage with an empty
//!    chunk cache and measures a cold run, then a warm one, counting the GET requests and bytes
//!    per patch;
//! 3. starts 1, 2, … daemons over the store in object storage and spreads a fixed number of
//!    client streams over them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use patchflow_sampler::BatchRequest;
use patchflow_store::{Manifest, RemoteStats, StoreLocation, bucket_stats};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::daemon::{Daemon, DaemonSpec};
use crate::machine::Machine;
use crate::measure::{CacheState, InProcess, Until, run_remote};
use crate::{BenchError, REPORT_VERSION};

/// Settings of [`run_object_store`].
#[derive(Clone, Debug)]
pub struct ObjectBenchConfig {
    /// The store, `s3://bucket/prefix`.
    pub store: PathBuf,
    /// Folder for the local copy and the daemon logs.
    pub work_dir: PathBuf,
    /// The object-storage endpoint the proxy forwards to (`http://host:port`).
    pub endpoint: String,
    /// Latencies added by the proxy, each way.
    pub latencies: Vec<Duration>,
    /// Cubic patch edges measured.
    pub edges: Vec<usize>,
    /// Items per batch.
    pub batch: usize,
    /// Foreground-oversampled share.
    pub foreground: f64,
    /// Sampling threads in process and daemon workers.
    pub workers: usize,
    /// Chunk cache, MiB.
    pub cache_mb: u64,
    /// Batches of each cold run.
    pub cold_batches: u64,
    /// Length of each warm run.
    pub seconds: f64,
    /// Daemon counts measured (each over the store in object storage).
    pub daemons: Vec<usize>,
    /// Client streams spread over the daemons.
    pub clients: usize,
    /// The `patchflow` binary run as the daemons (`None`: no daemon runs).
    pub exe: Option<PathBuf>,
    /// The command line, recorded in the report.
    pub command: String,
}

/// One in-process measurement.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectMeasurement {
    /// `local` or `s3`.
    pub backend: &'static str,
    /// Latency added each way, milliseconds (`None` for the local store).
    pub added_latency_ms: Option<f64>,
    /// Warm or cold.
    pub state: CacheState,
    /// Patch size.
    pub patch: [usize; 3],
    /// Patches cut.
    pub patches: u64,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Patches per second.
    pub patches_per_s: f64,
    /// GET requests per patch (object storage only).
    pub requests_per_patch: Option<f64>,
    /// Bytes fetched per patch (object storage only).
    pub bytes_per_patch: Option<f64>,
}

/// Several daemons over the store, with the clients spread over them.
#[derive(Clone, Debug, Serialize)]
pub struct DaemonsMeasurement {
    /// Daemons.
    pub daemons: usize,
    /// Client streams (spread round-robin).
    pub clients: usize,
    /// Patch size.
    pub patch: [usize; 3],
    /// Patches received by all clients.
    pub patches: u64,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Patches per second, all clients together.
    pub patches_per_s: f64,
}

/// The report.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectReport {
    /// Report format version.
    pub version: u32,
    /// The command that produced it.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// The store measured.
    pub store: String,
    /// Its local copy.
    pub local_copy: PathBuf,
    /// Cases and bytes of the store.
    pub cases: usize,
    /// Bytes of the case files.
    pub bytes: u64,
    /// Items per batch.
    pub batch: usize,
    /// Sampling threads / daemon workers.
    pub workers: usize,
    /// Chunk cache, MiB.
    pub cache_mb: u64,
    /// In-process measurements.
    pub measurements: Vec<ObjectMeasurement>,
    /// Daemon measurements.
    pub daemons: Vec<DaemonsMeasurement>,
}

fn request(
    patch: [usize; 3],
    cfg: &ObjectBenchConfig,
    seed: u64,
) -> Result<BatchRequest, BenchError> {
    let patch = patchflow_grid::Patch::new(patch).map_err(|e| BenchError::Config {
        field: "--edges",
        reason: e.to_string(),
    })?;
    Ok(crate::measure::crop_request(
        patch,
        cfg.batch,
        cfg.foreground,
        seed,
    ))
}

/// Copies the store at `store` (manifest and case files) into `dir`; returns the manifest.
pub fn copy_store(store: &Path, dir: &Path) -> Result<Manifest, BenchError> {
    let manifest = Manifest::load(store)?.ok_or_else(|| BenchError::Config {
        field: "--store",
        reason: format!("{} holds no manifest.json", store.display()),
    })?;
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io("creating", dir, e))?;
    for case in &manifest.cases {
        let target = dir.join(&case.file);
        if std::fs::metadata(&target).is_ok_and(|m| m.len() == case.stored_bytes) {
            continue;
        }
        let StoreLocation::S3(loc) = StoreLocation::from_path(&store.join(&case.file))? else {
            return Err(BenchError::Config {
                field: "--store",
                reason: "not an s3:// location".into(),
            });
        };
        let bytes = patchflow_store::get_object(&loc, u64::MAX)?.unwrap_or_default();
        patchflow_store::atomic_write(&target, &bytes)?;
    }
    manifest.save(dir)?;
    Ok(manifest)
}

/// A TCP proxy on 127.0.0.1 that forwards to a target and delays every piece of data by a
/// fixed time in each direction (order and throughput kept), counting the bytes it carries.
pub struct LatencyProxy {
    addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Pieces of data in flight per direction of one connection.
const PROXY_QUEUE: usize = 1024;

impl LatencyProxy {
    /// Starts the proxy in front of `target`, adding `delay` each way.
    pub fn start(target: SocketAddr, delay: Duration) -> Result<LatencyProxy, BenchError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-proxy")
            .enable_all()
            .build()
            .map_err(|e| BenchError::Task(format!("cannot start the proxy runtime: {e}")))?;
        let listener = runtime
            .block_on(TcpListener::bind(("127.0.0.1", 0)))
            .map_err(|e| BenchError::io("binding", Path::new("127.0.0.1:0"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::io("binding", Path::new("127.0.0.1:0"), e))?;
        let bytes = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&bytes);
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pipe(cr, sw, delay, Arc::clone(&counted)));
                    let down = tokio::spawn(pipe(sr, cw, delay, counted));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Ok(LatencyProxy {
            addr,
            bytes,
            runtime: Some(runtime),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes carried so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Copies `from` to `to`, each piece delivered `delay` after it was read.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    counted: Arc<AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(PROXY_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                counted.fetch_add(n as u64, Ordering::Relaxed);
                let due = tokio::time::Instant::now() + delay;
                if tx.send((due, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// The address of an `http://host:port` endpoint.
fn endpoint_addr(endpoint: &str) -> Result<SocketAddr, BenchError> {
    use std::net::ToSocketAddrs;
    let bad = |reason: String| BenchError::Config {
        field: "AWS_ENDPOINT_URL",
        reason,
    };
    let hostport = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| {
            bad(format!(
                "{endpoint}: the proxy forwards plain http:// endpoints"
            ))
        })?
        .trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .map_err(|e| bad(format!("{endpoint}: {e}")))?
        .next()
        .ok_or_else(|| bad(format!("{endpoint} resolves to no address")))
}

/// Points the store crate's client of `bucket` at `endpoint` (credentials and region from the
/// environment).
fn use_endpoint(bucket: &str, endpoint: &str) -> Result<(), BenchError> {
    use patchflow_store::object_store::aws::AmazonS3Builder;
    patchflow_store::install_crypto_provider();
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_retry(patchflow_store::retry_config())
        .build()
        .map_err(|e| BenchError::Config {
            field: "--store",
            reason: format!("S3 client for {endpoint}: {e}"),
        })?;
    patchflow_store::set_bucket_client(bucket, Arc::new(store));
    Ok(())
}

/// Runs the benchmark.
pub fn run_object_store(
    cfg: &ObjectBenchConfig,
    stop: &AtomicBool,
) -> Result<ObjectReport, BenchError> {
    let location = match StoreLocation::from_path(&cfg.store)? {
        StoreLocation::S3(o) => o,
        StoreLocation::Local(p) => {
            return Err(BenchError::Config {
                field: "--store",
                reason: format!("{} is not an s3:// location", p.display()),
            });
        }
    };
    let target = endpoint_addr(&cfg.endpoint)?;
    let name = location.name().to_owned();
    let local_copy = cfg.work_dir.join("local").join(&name);
    let manifest = copy_store(&cfg.store, &local_copy)?;
    let machine = Machine::describe(&cfg.work_dir);
    let mut measurements = local_runs(cfg, &name, &local_copy, stop)?;
    measurements.extend(object_store_runs(
        cfg,
        &name,
        &location.bucket,
        target,
        stop,
    )?);
    let daemons = daemon_runs(cfg, &name, stop)?;
    Ok(ObjectReport {
        version: REPORT_VERSION,
        command: cfg.command.clone(),
        machine,
        store: location.url(),
        local_copy,
        cases: manifest.cases.len(),
        bytes: manifest.cases.iter().map(|c| c.stored_bytes).sum(),
        batch: cfg.batch,
        workers: cfg.workers,
        cache_mb: cfg.cache_mb,
        measurements,
        daemons,
    })
}

/// The patch sizes to measure, and how long the warm-up and each measurement of a warm cache
/// last.
fn phases(cfg: &ObjectBenchConfig) -> (Vec<[usize; 3]>, Until, Until) {
    let sizes = cfg.edges.iter().map(|&e| [e; 3]).collect();
    let warmup = Until::Elapsed(Duration::from_secs_f64((cfg.seconds / 2.0).max(0.5)));
    let seconds = Until::Elapsed(Duration::from_secs_f64(cfg.seconds));
    (sizes, warmup, seconds)
}

/// The local copy `local_copy` of the store, in process: a cold and a warm measurement per
/// patch size.
fn local_runs(
    cfg: &ObjectBenchConfig,
    name: &str,
    local_copy: &Path,
    stop: &AtomicBool,
) -> Result<Vec<ObjectMeasurement>, BenchError> {
    let (sizes, warmup, seconds) = phases(cfg);
    let mut measurements = Vec::new();
    let local = InProcess::open(name, local_copy, cfg.cache_mb, cfg.workers)?;
    for (s, &patch) in sizes.iter().enumerate() {
        local.make_cold()?;
        let (counts, _, _) = local.run(
            &request(patch, cfg, 100 + s as u64)?,
            0,
            Until::Batches(cfg.cold_batches),
            stop,
        )?;
        measurements.push(row(
            "local",
            None,
            CacheState::Cold,
            patch,
            counts.patches,
            counts.wall_s,
            None,
        ));
        let req = request(patch, cfg, s as u64)?;
        local.run(&req, 1 << 40, warmup, stop)?;
        let (counts, _, _) = local.run(&req, 0, seconds, stop)?;
        measurements.push(row(
            "local",
            None,
            CacheState::Warm,
            patch,
            counts.patches,
            counts.wall_s,
            None,
        ));
    }
    Ok(measurements)
}

/// The store in object storage (`bucket`, served at `target`), through a proxy that adds each
/// of the configured latencies: a cold and a warm measurement per latency and patch size, with
/// the requests each made.
fn object_store_runs(
    cfg: &ObjectBenchConfig,
    name: &str,
    bucket: &str,
    target: SocketAddr,
    stop: &AtomicBool,
) -> Result<Vec<ObjectMeasurement>, BenchError> {
    let (sizes, warmup, seconds) = phases(cfg);
    let mut measurements = Vec::new();
    for &delay in &cfg.latencies {
        let proxy = LatencyProxy::start(target, delay)?;
        use_endpoint(bucket, &proxy.endpoint())?;
        let ms = delay.as_secs_f64() * 1e3;
        for (s, &patch) in sizes.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Err(BenchError::Interrupted);
            }
            // A fresh open: empty chunk cache, no disk cache.
            let remote = InProcess::open(name, &cfg.store, cfg.cache_mb, cfg.workers)?;
            let before = bucket_stats(bucket);
            let (counts, _, _) = remote.run(
                &request(patch, cfg, 100 + s as u64)?,
                0,
                Until::Batches(cfg.cold_batches),
                stop,
            )?;
            let got = bucket_stats(bucket).since(&before);
            measurements.push(row(
                "s3",
                Some(ms),
                CacheState::Cold,
                patch,
                counts.patches,
                counts.wall_s,
                Some(got),
            ));
            let req = request(patch, cfg, s as u64)?;
            remote.run(&req, 1 << 40, warmup, stop)?;
            let before = bucket_stats(bucket);
            let (counts, _, _) = remote.run(&req, 0, seconds, stop)?;
            let got = bucket_stats(bucket).since(&before);
            measurements.push(row(
                "s3",
                Some(ms),
                CacheState::Warm,
                patch,
                counts.patches,
                counts.wall_s,
                Some(got),
            ));
        }
        drop(proxy);
    }
    Ok(measurements)
}

/// Several daemons over the store in object storage (direct endpoint), when a daemon binary is
/// given: one measurement per daemon count and patch size.
fn daemon_runs(
    cfg: &ObjectBenchConfig,
    name: &str,
    stop: &AtomicBool,
) -> Result<Vec<DaemonsMeasurement>, BenchError> {
    let mut daemons = Vec::new();
    let Some(exe) = &cfg.exe else {
        return Ok(daemons);
    };
    let (sizes, _, _) = phases(cfg);
    let runtime = crate::daemon::client_runtime("bench-client")?;
    for &n in &cfg.daemons {
        for &patch in &sizes {
            let m = runtime.block_on(daemons_run(cfg, exe, name, n, patch, stop))?;
            daemons.push(m);
        }
    }
    Ok(daemons)
}

fn row(
    backend: &'static str,
    added_latency_ms: Option<f64>,
    state: CacheState,
    patch: [usize; 3],
    patches: u64,
    wall_s: f64,
    remote: Option<RemoteStats>,
) -> ObjectMeasurement {
    let per = patches.max(1) as f64;
    ObjectMeasurement {
        backend,
        added_latency_ms,
        state,
        patch,
        patches,
        wall_s,
        patches_per_s: patches as f64 / wall_s.max(1e-9),
        requests_per_patch: remote.map(|r| r.get_requests as f64 / per),
        bytes_per_patch: remote.map(|r| r.get_bytes as f64 / per),
    }
}

/// `n` daemons over the store; `cfg.clients` streams spread round-robin; warm.
async fn daemons_run(
    cfg: &ObjectBenchConfig,
    exe: &Path,
    name: &str,
    n: usize,
    patch: [usize; 3],
    stop: &AtomicBool,
) -> Result<DaemonsMeasurement, BenchError> {
    let mut running = Vec::with_capacity(n);
    for d in 0..n {
        let spec = DaemonSpec {
            exe: exe.to_path_buf(),
            stores: vec![cfg.store.clone()],
            workers: cfg.workers,
            cache_mb: cfg.cache_mb,
            max_streams: None,
            extra_args: Vec::new(),
            log: cfg.work_dir.join(format!("daemon-s3-{d}.log")),
            shared_memory: false,
        };
        running.push(Daemon::start(&spec).await?);
    }
    let config = crate::measure::crop_stream(name, patch, cfg.batch, cfg.foreground, 0);
    let warmup = Duration::from_secs_f64((cfg.seconds / 2.0).max(0.5));
    let until = Until::Elapsed(Duration::from_secs_f64(cfg.seconds));
    let mut tasks = Vec::new();
    for (d, daemon) in running.iter().enumerate() {
        let clients = cfg.clients / n + usize::from(d < cfg.clients % n);
        if clients == 0 {
            continue;
        }
        let endpoint = daemon.endpoint();
        let mut config = config.clone();
        config.seed = 1000 * d as u64;
        tasks.push(async move {
            run_remote(
                &endpoint,
                &config,
                clients,
                crate::measure::Transport::Grpc,
                warmup,
                until,
                stop,
            )
            .await
        });
    }
    let results = futures_util::future::join_all(tasks).await;
    let mut patches = 0;
    let mut wall: f64 = 0.0;
    for r in results {
        let c = r?;
        patches += c.patches;
        wall = wall.max(c.wall_s);
    }
    for daemon in running {
        daemon.stop()?;
    }
    Ok(DaemonsMeasurement {
        daemons: n,
        clients: cfg.clients,
        patch,
        patches,
        wall_s: wall,
        patches_per_s: patches as f64 / wall.max(1e-9),
    })
}

/// The report as a plain-text table.
pub fn render_object(r: &ObjectReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "machine: {}", r.machine.summary());
    let _ = writeln!(
        out,
        "store: {} ({} cases, {:.1} MB; local copy {}); batch {}, {} workers, cache {} MiB",
        r.store,
        r.cases,
        r.bytes as f64 / 1e6,
        r.local_copy.display(),
        r.batch,
        r.workers,
        r.cache_mb
    );
    let _ = writeln!(
        out,
        "{:<6} {:>10} {:<5} {:>12} {:>10} {:>10} {:>14}",
        "store", "added ms", "state", "patch", "patches/s", "req/patch", "KB/patch"
    );
    for m in &r.measurements {
        let _ = writeln!(
            out,
            "{:<6} {:>10} {:<5} {:>12} {:>10.1} {:>10} {:>14}",
            m.backend,
            m.added_latency_ms.map_or("-".into(), |v| format!("{v:.0}")),
            match m.state {
                CacheState::Warm => "warm",
                CacheState::Cold => "cold",
            },
            crate::suite::patch_text(m.patch),
            m.patches_per_s,
            m.requests_per_patch
                .map_or("-".into(), |v| format!("{v:.2}")),
            m.bytes_per_patch
                .map_or("-".into(), |v| format!("{:.1}", v / 1e3)),
        );
    }
    for d in &r.daemons {
        let _ = writeln!(
            out,
            "{} daemon(s), {} clients, {}: {:.1} patches/s",
            d.daemons,
            d.clients,
            crate::suite::patch_text(d.patch),
            d.patches_per_s
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_forwards_both_ways_and_counts_bytes() {
        let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            buf.reverse();
            s.write_all(&buf).unwrap();
        });
        let proxy = LatencyProxy::start(target, Duration::from_millis(1)).unwrap();
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(proxy.addr).unwrap();
        c.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"olleh");
        server.join().unwrap();
        assert_eq!(proxy.bytes(), 10);
        assert!(endpoint_addr("https://x:1").is_err());
        assert_eq!(
            endpoint_addr("http://127.0.0.1:9000/").unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
    }
}

//! One measurement: a stream of batches of one request, in this process or through a daemon,
//! timed and counted from start to end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use patchflow_client::{Client, ClientOptions, SharedMemory, StreamConfig};
use patchflow_sampler::{BatchRequest, Dataset, OutputDType, Patch, Policy, Sampler};
use patchflow_store::{ArrayId, ChunkCache};
use serde::Serialize;

use crate::BenchError;
use crate::procstat::{self, ProcSample};

/// Where the patches were cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// The sampler called in this process.
    InProcess,
    /// A `patchflow serve` process over loopback gRPC, voxels inside the messages in the
    /// client's default compact form (stored integer items, zstd labels).
    Grpc,
    /// The same with the compact form off: every voxel as served (the message path as it was
    /// before the compact form).
    GrpcPlain,
    /// The same daemon and stream, voxels through shared memory (the default for a client on
    /// the daemon's host).
    GrpcShared,
}

impl Transport {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Transport::InProcess => "in-process",
            Transport::Grpc => "gRPC",
            Transport::GrpcPlain => "gRPC plain",
            Transport::GrpcShared => "gRPC+shm",
        }
    }
}

/// The benchmarks' request: plain `f32` crops of `patch`, `batch` items, nnU-Net's oversampling
/// with `fraction`, one crop per case, every case.
pub(crate) fn crop_request(patch: Patch, batch: usize, fraction: f64, seed: u64) -> BatchRequest {
    BatchRequest {
        patch,
        batch,
        policy: Policy::ForegroundOversample { fraction },
        crops_per_case: 1,
        dtype: OutputDType::F32,
        seed,
        cases: None,
        augment: None,
    }
}

/// The stream configuration of [`crop_request`] for a daemon serving `dataset`.
pub(crate) fn crop_stream(
    dataset: &str,
    patch: [usize; 3],
    batch: usize,
    fraction: f64,
    seed: u64,
) -> StreamConfig {
    let mut c = StreamConfig::new(
        dataset,
        patch.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        u32::try_from(batch).unwrap_or(u32::MAX),
    );
    c.policy = patchflow_client::Policy::ForegroundOversample { fraction };
    c.seed = seed;
    c
}

/// Whether the data was in memory when the measurement started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheState {
    /// Store pages and decoded chunks in memory (after a warm-up with the same request).
    Warm,
    /// Store pages dropped from the page cache and an empty chunk cache at the start.
    Cold,
}

/// When a measurement ends.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// After this long.
    Elapsed(Duration),
    /// After this many batches (over all clients).
    Batches(u64),
}

/// Counts of one run.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Batches received.
    pub batches: u64,
    /// Patches received.
    pub patches: u64,
    /// Bytes of image and label buffers received.
    pub bytes: u64,
    /// Wall time from the first request to the last batch, seconds.
    pub wall_s: f64,
    /// Time each batch was waited for, seconds (the consumer's view).
    pub latencies_s: Vec<f64>,
}

/// The result of one measurement, as written to the JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// Where the patches were cut.
    pub transport: Transport,
    /// Warm or cold start.
    pub state: CacheState,
    /// Patch size `[z, y, x]`.
    pub patch: [usize; 3],
    /// Cube root of the patch's voxel count (the x axis of the plot).
    pub edge: f64,
    /// Items per batch.
    pub batch: usize,
    /// Concurrent clients (1 in process).
    pub clients: usize,
    /// Sampling threads (in process) or daemon workers.
    pub workers: usize,
    /// Batches received.
    pub batches: u64,
    /// Patches received.
    pub patches: u64,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Patches per second.
    pub patches_per_s: f64,
    /// Image + label bytes delivered per second, MB (10^6) per second.
    pub mb_per_s: f64,
    /// CPU seconds per patch of the process that cut them (this one in process; the daemon
    /// over gRPC).
    pub sampler_cpu_s_per_patch: f64,
    /// CPU seconds per patch on the client side (gRPC only).
    pub client_cpu_s_per_patch: Option<f64>,
    /// Bytes read from storage per patch (page-cache misses of the sampling process).
    pub read_bytes_per_patch: f64,
    /// Read bytes over the stored (uncompressed) bytes of the patch's voxels: 1 means each
    /// patch read as much as its own voxels take in their stored types.
    pub read_amplification: f64,
    /// Median wait per batch, milliseconds.
    pub latency_p50_ms: f64,
    /// 99th percentile wait per batch, milliseconds.
    pub latency_p99_ms: f64,
    /// Peak resident memory of the daemon, bytes (gRPC only).
    pub daemon_peak_rss_bytes: Option<u64>,
    /// Chunk-cache hit ratio during the run (in process only).
    pub cache_hit_ratio: Option<f64>,
}

/// What a measurement needs besides its counts.
pub(crate) struct Context {
    pub transport: Transport,
    pub state: CacheState,
    pub patch: [usize; 3],
    pub batch: usize,
    pub clients: usize,
    pub workers: usize,
    /// Stored bytes per voxel (image channels + label, uncompressed).
    pub stored_bytes_per_voxel: usize,
}

impl Measurement {
    pub(crate) fn new(
        ctx: &Context,
        counts: &Counts,
        sampler: ProcSample,
        client: Option<ProcSample>,
        cache_hit_ratio: Option<f64>,
    ) -> Measurement {
        let patches = counts.patches.max(1) as f64;
        let wall = counts.wall_s.max(1e-9);
        let voxels: usize = ctx.patch.iter().product();
        let read_per_patch = sampler.read_bytes as f64 / patches;
        let mut lat = counts.latencies_s.clone();
        lat.sort_by(f64::total_cmp);
        Measurement {
            transport: ctx.transport,
            state: ctx.state,
            patch: ctx.patch,
            edge: (voxels as f64).cbrt(),
            batch: ctx.batch,
            clients: ctx.clients,
            workers: ctx.workers,
            batches: counts.batches,
            patches: counts.patches,
            wall_s: counts.wall_s,
            patches_per_s: counts.patches as f64 / wall,
            mb_per_s: counts.bytes as f64 / wall / 1e6,
            sampler_cpu_s_per_patch: sampler.cpu_s / patches,
            client_cpu_s_per_patch: client.map(|c| c.cpu_s / patches),
            read_bytes_per_patch: read_per_patch,
            read_amplification: read_per_patch
                / (voxels * ctx.stored_bytes_per_voxel).max(1) as f64,
            latency_p50_ms: percentile(&lat, 0.50) * 1e3,
            latency_p99_ms: percentile(&lat, 0.99) * 1e3,
            daemon_peak_rss_bytes: (ctx.transport != Transport::InProcess)
                .then_some(sampler.peak_rss_bytes),
            cache_hit_ratio,
        }
    }
}

/// The `q` quantile of sorted `values` (nearest rank), 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Stored bytes per voxel of `dataset` (image channels + label, uncompressed), from its first
/// case.
pub fn stored_bytes_per_voxel(dataset: &Dataset) -> usize {
    let Some(case) = dataset.cases().first() else {
        return 1;
    };
    let image: usize = (0..dataset.num_channels())
        .filter_map(|c| case.dtype(ArrayId::Image(c)).ok())
        .map(|d| d.size())
        .sum();
    image + case.dtype(ArrayId::Label).map_or(1, |d| d.size())
}

/// A store opened in this process with its own chunk cache and sampling threads.
pub struct InProcess {
    dataset: Arc<Dataset>,
    sampler: Sampler,
    cache: Arc<ChunkCache>,
    pools: Vec<rayon::ThreadPool>,
}

impl InProcess {
    /// Opens `store` with a chunk cache of `cache_mb` MiB and `workers` sampling threads.
    pub fn open(
        name: &str,
        store: &std::path::Path,
        cache_mb: u64,
        workers: usize,
    ) -> Result<InProcess, BenchError> {
        let cache = ChunkCache::new(cache_mb.saturating_mul(1 << 20));
        let dataset = Arc::new(Dataset::open(name, store, Arc::clone(&cache))?);
        let pools = (0..workers.max(1))
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("bench-sampler-{i}"))
                    .build()
                    .map_err(|e| BenchError::Config {
                        field: "--workers",
                        reason: format!("cannot start sampling threads: {e}"),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(InProcess {
            sampler: Sampler::new(Arc::clone(&dataset)),
            dataset,
            cache,
            pools,
        })
    }

    /// The opened dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// Sampling threads.
    pub fn workers(&self) -> usize {
        self.pools.len()
    }

    /// Empties the chunk cache and drops the store files from the page cache.
    pub fn make_cold(&self) -> Result<(), BenchError> {
        self.cache.clear();
        for case in self.dataset.cases() {
            case.evict_page_cache()?;
        }
        Ok(())
    }

    /// Chunk-cache hit ratio since the counters `before`.
    fn hit_ratio(&self, before: (u64, u64)) -> f64 {
        let s = self.cache.stats();
        let hits = s.hits.saturating_sub(before.0) as f64;
        let misses = s.misses.saturating_sub(before.1) as f64;
        if hits + misses > 0.0 {
            hits / (hits + misses)
        } else {
            0.0
        }
    }

    /// Samples batches of `req` on every thread (thread `w` takes batch indices from a shared
    /// counter starting at `first_index`) until `until`; returns the counts and this process's
    /// counters over the run. Each batch reuses the buffers of the one before (the best case of
    /// a loader: one warm buffer).
    pub fn run(
        &self,
        req: &BatchRequest,
        first_index: u64,
        until: Until,
        stop: &AtomicBool,
    ) -> Result<(Counts, ProcSample, f64), BenchError> {
        self.run_ring(req, first_index, until, 1, stop)
    }

    /// [`InProcess::run`] with `ring` batches held on each thread, as a loader with a prefetch
    /// queue of `ring` batches holds them: each new batch reuses the buffers of the oldest one,
    /// so the buffers are written in rotation (`ring` = 1: one buffer, always the same).
    pub fn run_ring(
        &self,
        req: &BatchRequest,
        first_index: u64,
        until: Until,
        ring: usize,
        stop: &AtomicBool,
    ) -> Result<(Counts, ProcSample, f64), BenchError> {
        let ring = ring.max(1);
        self.sampler.validate(req, &unlimited())?;
        let next = AtomicU64::new(0);
        let before_cache = {
            let s = self.cache.stats();
            (s.hits, s.misses)
        };
        let before = procstat::sample(None)?;
        let start = Instant::now();
        let results: Vec<Result<Counts, BenchError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .pools
                .iter()
                .map(|pool| {
                    let next = &next;
                    scope.spawn(move || {
                        pool.install(|| {
                            let mut counts = Counts::default();
                            // Each batch reuses the buffers of the oldest batch held, as a
                            // loader in a trainer's process would.
                            let mut held = std::collections::VecDeque::with_capacity(ring);
                            loop {
                                if stop.load(Ordering::Relaxed) {
                                    return Err(BenchError::Interrupted);
                                }
                                let k = next.fetch_add(1, Ordering::Relaxed);
                                match until {
                                    Until::Batches(n) if k >= n => break,
                                    Until::Elapsed(d) if start.elapsed() >= d => break,
                                    _ => {}
                                }
                                let t = Instant::now();
                                let (image, label) = if held.len() >= ring {
                                    held.pop_front().unwrap_or_default()
                                } else {
                                    (Vec::new(), Vec::new())
                                };
                                let batch =
                                    self.sampler
                                        .sample_into(req, first_index + k, image, label)?;
                                counts.latencies_s.push(t.elapsed().as_secs_f64());
                                counts.batches += 1;
                                counts.patches += batch.items.len() as u64;
                                counts.bytes += (batch.image.len() + batch.label.len()) as u64;
                                held.push_back((batch.image, batch.label));
                            }
                            Ok(counts)
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(BenchError::Task("a sampling thread panicked".into()))
                    })
                })
                .collect()
        });
        let wall_s = start.elapsed().as_secs_f64();
        let after = procstat::sample(None)?;
        let mut total = Counts {
            wall_s,
            ..Counts::default()
        };
        for r in results {
            let c = r?;
            total.batches += c.batches;
            total.patches += c.patches;
            total.bytes += c.bytes;
            total.latencies_s.extend(c.latencies_s);
        }
        Ok((total, after.since(&before), self.hit_ratio(before_cache)))
    }
}

/// Limits that let any request the sampler can serve through (the benchmark is its own user).
fn unlimited() -> patchflow_sampler::Limits {
    patchflow_sampler::Limits {
        max_patch_voxels: u64::MAX,
        max_batch_bytes: u64::MAX,
        max_batch: usize::MAX,
    }
}

/// Streams `config` from `endpoint` on `clients` connections at once (client `c` uses seed
/// `config.seed + c`) until `until`, after `warmup` of the same streams that is not counted.
/// `transport` says whether voxels come inside the messages or through shared memory.
pub async fn run_remote(
    endpoint: &str,
    config: &StreamConfig,
    clients: usize,
    transport: Transport,
    warmup: Duration,
    until: Until,
    stop: &AtomicBool,
) -> Result<Counts, BenchError> {
    let options = ClientOptions {
        shared_memory: if transport == Transport::GrpcShared {
            SharedMemory::On
        } else {
            SharedMemory::Off
        },
        compact: transport != Transport::GrpcPlain,
        ..ClientOptions::default()
    };
    let mut streams = Vec::with_capacity(clients);
    for c in 0..clients {
        let client = Client::connect([endpoint], options.clone()).await?;
        let cfg = StreamConfig {
            seed: config.seed.wrapping_add(c as u64),
            ..config.clone()
        };
        streams.push(client.stream(cfg).await?);
    }
    // Warm-up: everyone streams; nothing counted.
    let warm_end = Instant::now() + warmup;
    let mut tasks = Vec::new();
    for mut s in streams {
        tasks.push(tokio::spawn(async move {
            while Instant::now() < warm_end {
                s.next().await?;
            }
            Ok::<_, patchflow_client::ClientError>(s)
        }));
    }
    let mut streams = Vec::with_capacity(clients);
    for t in tasks {
        streams.push(join(t).await??);
    }
    if stop.load(Ordering::Relaxed) {
        return Err(BenchError::Interrupted);
    }
    let taken = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in streams {
        let taken = Arc::clone(&taken);
        tasks.push(tokio::spawn(async move {
            let mut counts = Counts::default();
            loop {
                let k = taken.fetch_add(1, Ordering::Relaxed);
                match until {
                    Until::Batches(n) if k >= n => break,
                    Until::Elapsed(d) if start.elapsed() >= d => break,
                    _ => {}
                }
                let t = Instant::now();
                let batch = s.next().await?;
                counts.latencies_s.push(t.elapsed().as_secs_f64());
                counts.batches += 1;
                counts.patches += batch.items.len() as u64;
                counts.bytes += (batch.image.len() + batch.label.len()) as u64;
            }
            Ok::<_, patchflow_client::ClientError>(counts)
        }));
    }
    let mut total = Counts::default();
    for t in tasks {
        let c = join(t).await??;
        total.batches += c.batches;
        total.patches += c.patches;
        total.bytes += c.bytes;
        total.latencies_s.extend(c.latencies_s);
    }
    total.wall_s = start.elapsed().as_secs_f64();
    Ok(total)
}

async fn join<T>(task: tokio::task::JoinHandle<T>) -> Result<T, BenchError> {
    task.await.map_err(|e| BenchError::Task(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}

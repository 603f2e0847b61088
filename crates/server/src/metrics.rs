//! Counters and gauges of a running daemon, rendered in the Prometheus text format by a minimal
//! HTTP/1.1 responder on its own listener (so scraping never competes with gRPC traffic).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use patchflow_store::{CacheStats, ChunkCache};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Counters of one Sample stream.
#[derive(Debug)]
pub(crate) struct StreamStats {
    /// Stream number (unique within the process).
    pub id: u64,
    /// Remote peer, when known.
    pub peer: String,
    /// Dataset of the current configuration.
    pub dataset: Mutex<String>,
    started: Instant,
    /// Batches handed to the transport.
    pub batches: AtomicU64,
    /// Image + label bytes handed to the transport.
    pub bytes: AtomicU64,
    /// Current credit balance.
    pub credits: AtomicU64,
    /// Jobs on the worker pool.
    pub jobs: AtomicU64,
    /// Finished batches waiting for the transport.
    pub queued: AtomicU64,
}

/// Process-wide counters, shared by the service, the streams and the metrics endpoint.
pub(crate) struct Metrics {
    started: Instant,
    cache: Arc<ChunkCache>,
    workers: usize,
    /// Batches handed to the transport.
    pub batches: AtomicU64,
    /// Image + label bytes handed to the transport.
    pub bytes: AtomicU64,
    /// Sample streams ever opened.
    pub streams_opened: AtomicU64,
    /// Sample streams refused (stream limit).
    pub streams_refused: AtomicU64,
    /// Sample streams ended with an error status.
    pub stream_errors: AtomicU64,
    /// Requests refused for missing or wrong credentials.
    pub auth_refused: AtomicU64,
    /// Jobs submitted to the pool that have not started.
    pub jobs_waiting: AtomicU64,
    /// Jobs running on the pool.
    pub jobs_running: AtomicU64,
    /// Nanoseconds the workers spent in sampling jobs.
    pub busy_nanos: AtomicU64,
    /// Cases set aside (damaged stored data) since start, over every dataset.
    cases_set_aside: AtomicU64,
    /// Batches written into shared-memory slots.
    shared_batches: AtomicU64,
    /// Batches of shared-memory streams sent inside the messages because no slot could be
    /// prepared.
    shared_fallbacks: AtomicU64,
    /// Cases set aside per served dataset (every dataset listed, from 0).
    set_aside_by_dataset: Mutex<BTreeMap<String, u64>>,
    live: watch::Sender<usize>,
    next_stream: AtomicU64,
    streams: Mutex<BTreeMap<u64, Arc<StreamStats>>>,
}

/// A snapshot of the main counters, for embedding applications and tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Batches sent.
    pub batches: u64,
    /// Image + label bytes sent.
    pub bytes: u64,
    /// Sample streams open now.
    pub live_streams: usize,
    /// Sample streams opened since start.
    pub streams_opened: u64,
    /// Sample streams refused because of the stream limit.
    pub streams_refused: u64,
    /// Sample streams that ended with an error status.
    pub stream_errors: u64,
    /// Requests refused for missing or wrong credentials (UNAUTHENTICATED).
    pub auth_refused: u64,
    /// Cases set aside because their stored data is damaged, over every dataset.
    pub cases_set_aside: u64,
    /// Batches delivered through shared memory.
    pub shared_memory_batches: u64,
    /// Batches of shared-memory streams sent inside the messages (no slot could be prepared).
    pub shared_memory_fallbacks: u64,
    /// Seconds the worker threads spent sampling.
    pub worker_busy_seconds: f64,
    /// Chunk cache hits.
    pub cache_hits: u64,
    /// Chunk cache misses.
    pub cache_misses: u64,
}

impl Metrics {
    pub fn new(cache: Arc<ChunkCache>, workers: usize) -> Metrics {
        Metrics {
            started: Instant::now(),
            cache,
            workers,
            batches: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            streams_opened: AtomicU64::new(0),
            streams_refused: AtomicU64::new(0),
            stream_errors: AtomicU64::new(0),
            auth_refused: AtomicU64::new(0),
            jobs_waiting: AtomicU64::new(0),
            jobs_running: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
            cases_set_aside: AtomicU64::new(0),
            shared_batches: AtomicU64::new(0),
            shared_fallbacks: AtomicU64::new(0),
            set_aside_by_dataset: Mutex::new(BTreeMap::new()),
            live: watch::Sender::new(0),
            next_stream: AtomicU64::new(1),
            streams: Mutex::new(BTreeMap::new()),
        }
    }

    /// Registers a new stream; the returned guard unregisters it when dropped.
    pub fn open_stream(self: &Arc<Self>, peer: String) -> StreamGuard {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::new(StreamStats {
            id,
            peer,
            dataset: Mutex::new(String::new()),
            started: Instant::now(),
            batches: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            credits: AtomicU64::new(0),
            jobs: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        });
        lock(&self.streams).insert(id, Arc::clone(&stats));
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
        self.live.send_modify(|n| *n += 1);
        StreamGuard {
            metrics: Arc::clone(self),
            stats,
        }
    }

    /// Lists `dataset` in the per-dataset metrics (with nothing set aside yet).
    pub fn track_dataset(&self, dataset: &str) {
        lock(&self.set_aside_by_dataset)
            .entry(dataset.to_owned())
            .or_insert(0);
    }

    /// Records a case of `dataset` set aside.
    pub fn case_set_aside(&self, dataset: &str) {
        self.cases_set_aside.fetch_add(1, Ordering::Relaxed);
        *lock(&self.set_aside_by_dataset)
            .entry(dataset.to_owned())
            .or_insert(0) += 1;
    }

    /// Records a batch written into a shared-memory slot.
    pub fn shared_batch(&self) {
        self.shared_batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a batch of a shared-memory stream that goes inside the messages because its slot
    /// could not be prepared (warned about once, then counted).
    pub fn shared_memory_fallback(&self, error: &std::io::Error) {
        if self.shared_fallbacks.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                %error,
                "cannot prepare a shared-memory slot (is the shared-memory folder full?); such \
                 batches are sent inside the messages (counted in \
                 patchflow_shared_memory_fallbacks_total)"
            );
        } else {
            tracing::debug!(%error, "shared-memory slot unusable; batch sent inside the messages");
        }
    }

    /// Receiver of the number of live streams.
    pub fn live_streams(&self) -> watch::Receiver<usize> {
        self.live.subscribe()
    }

    /// Records a batch handed to the transport.
    pub fn batch_sent(&self, stream: &StreamStats, bytes: u64) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        stream.batches.fetch_add(1, Ordering::Relaxed);
        stream.bytes.fetch_add(bytes, Ordering::Relaxed);
        dec(&stream.queued);
    }

    /// The main counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let cache = self.cache.stats();
        MetricsSnapshot {
            batches: self.batches.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            live_streams: *self.live.borrow(),
            streams_opened: self.streams_opened.load(Ordering::Relaxed),
            streams_refused: self.streams_refused.load(Ordering::Relaxed),
            stream_errors: self.stream_errors.load(Ordering::Relaxed),
            auth_refused: self.auth_refused.load(Ordering::Relaxed),
            cases_set_aside: self.cases_set_aside.load(Ordering::Relaxed),
            shared_memory_batches: self.shared_batches.load(Ordering::Relaxed),
            shared_memory_fallbacks: self.shared_fallbacks.load(Ordering::Relaxed),
            worker_busy_seconds: Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed))
                .as_secs_f64(),
            cache_hits: cache.hits,
            cache_misses: cache.misses,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let snap = self.snapshot();
        let cache = self.cache.stats();
        let mut out = String::with_capacity(4096);
        let daemon = self.traffic_metrics(&snap);
        for (name, kind, help, value) in daemon.into_iter().chain(self.pool_metrics(&snap, &cache))
        {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
        self.render_set_aside(&mut out);
        self.render_streams(&mut out);
        out
    }

    /// The daemon's streams and what went through them.
    fn traffic_metrics(&self, snap: &MetricsSnapshot) -> Vec<Scalar> {
        vec![
            (
                "patchflow_uptime_seconds",
                "gauge",
                "Seconds since the server started.",
                fmt_f64(self.started.elapsed().as_secs_f64()),
            ),
            (
                "patchflow_batches_total",
                "counter",
                "Batches sent to clients.",
                snap.batches.to_string(),
            ),
            (
                "patchflow_bytes_total",
                "counter",
                "Image and label bytes sent to clients.",
                snap.bytes.to_string(),
            ),
            (
                "patchflow_live_streams",
                "gauge",
                "Sample streams open now.",
                snap.live_streams.to_string(),
            ),
            (
                "patchflow_streams_opened_total",
                "counter",
                "Sample streams opened.",
                snap.streams_opened.to_string(),
            ),
            (
                "patchflow_streams_refused_total",
                "counter",
                "Sample streams refused because the stream limit was reached.",
                snap.streams_refused.to_string(),
            ),
            (
                "patchflow_stream_errors_total",
                "counter",
                "Sample streams ended with an error status.",
                snap.stream_errors.to_string(),
            ),
            (
                "patchflow_auth_refused_total",
                "counter",
                "Requests refused for missing or wrong credentials.",
                snap.auth_refused.to_string(),
            ),
            (
                "patchflow_cases_set_aside_total",
                "counter",
                "Cases set aside because their stored data is damaged (served again after a restart).",
                snap.cases_set_aside.to_string(),
            ),
            (
                "patchflow_shared_memory_batches_total",
                "counter",
                "Batches delivered through shared-memory slots (clients on this host).",
                snap.shared_memory_batches.to_string(),
            ),
            (
                "patchflow_shared_memory_fallbacks_total",
                "counter",
                "Batches of shared-memory streams sent inside the messages because no slot could be prepared.",
                snap.shared_memory_fallbacks.to_string(),
            ),
        ]
    }

    /// The worker pool and the chunk cache.
    fn pool_metrics(&self, snap: &MetricsSnapshot, cache: &CacheStats) -> Vec<Scalar> {
        let lookups = cache.hits + cache.misses;
        let ratio = if lookups == 0 {
            0.0
        } else {
            cache.hits as f64 / lookups as f64
        };
        vec![
            (
                "patchflow_workers",
                "gauge",
                "Sampling worker threads.",
                self.workers.to_string(),
            ),
            (
                "patchflow_worker_busy_seconds_total",
                "counter",
                "Seconds spent in sampling jobs, summed over jobs.",
                fmt_f64(snap.worker_busy_seconds),
            ),
            (
                "patchflow_jobs_waiting",
                "gauge",
                "Sampling jobs queued on the worker pool, not started.",
                self.jobs_waiting.load(Ordering::Relaxed).to_string(),
            ),
            (
                "patchflow_jobs_running",
                "gauge",
                "Sampling jobs running on the worker pool.",
                self.jobs_running.load(Ordering::Relaxed).to_string(),
            ),
            (
                "patchflow_cache_hits_total",
                "counter",
                "Chunk cache hits.",
                cache.hits.to_string(),
            ),
            (
                "patchflow_cache_misses_total",
                "counter",
                "Chunk cache misses.",
                cache.misses.to_string(),
            ),
            (
                "patchflow_cache_hit_ratio",
                "gauge",
                "Chunk cache hits over lookups since start.",
                fmt_f64(ratio),
            ),
            (
                "patchflow_cache_bytes",
                "gauge",
                "Decompressed bytes held by the chunk cache.",
                cache.bytes_cached.to_string(),
            ),
            (
                "patchflow_cache_capacity_bytes",
                "gauge",
                "Capacity of the chunk cache.",
                cache.capacity_bytes.to_string(),
            ),
        ]
    }

    /// Set-aside cases per dataset.
    fn render_set_aside(&self, out: &mut String) {
        let name = "patchflow_dataset_cases_set_aside";
        let _ = writeln!(
            out,
            "# HELP {name} Cases of the dataset set aside because their stored data is damaged."
        );
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (dataset, n) in lock(&self.set_aside_by_dataset).iter() {
            let _ = writeln!(out, "{name}{{dataset=\"{}\"}} {n}", escape_label(dataset));
        }
    }

    /// The counters of every open stream, labelled by stream, dataset and peer.
    fn render_streams(&self, out: &mut String) {
        let streams: Vec<Arc<StreamStats>> = lock(&self.streams).values().cloned().collect();
        type Field = fn(&StreamStats) -> String;
        let per_stream: [(&str, &str, &str, Field); 5] = [
            (
                "patchflow_stream_batches_total",
                "counter",
                "Batches sent on the stream.",
                |s| s.batches.load(Ordering::Relaxed).to_string(),
            ),
            (
                "patchflow_stream_bytes_total",
                "counter",
                "Bytes sent on the stream.",
                |s| s.bytes.load(Ordering::Relaxed).to_string(),
            ),
            (
                "patchflow_stream_batches_per_second",
                "gauge",
                "Mean batch rate of the stream since it opened.",
                |s| {
                    let secs = s.started.elapsed().as_secs_f64().max(1e-9);
                    fmt_f64(s.batches.load(Ordering::Relaxed) as f64 / secs)
                },
            ),
            (
                "patchflow_stream_queue_depth",
                "gauge",
                "Batches of the stream being sampled or waiting for the transport.",
                |s| (s.jobs.load(Ordering::Relaxed) + s.queued.load(Ordering::Relaxed)).to_string(),
            ),
            (
                "patchflow_stream_credits",
                "gauge",
                "Credit balance of the stream.",
                |s| s.credits.load(Ordering::Relaxed).to_string(),
            ),
        ];
        for (name, kind, help, field) in per_stream {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for s in &streams {
                let dataset = lock(&s.dataset).clone();
                let _ = writeln!(
                    out,
                    "{name}{{stream=\"{}\",dataset=\"{}\",peer=\"{}\"}} {}",
                    s.id,
                    escape_label(&dataset),
                    escape_label(&s.peer),
                    field(s)
                );
            }
        }
    }
}

/// One metric without labels: name, type, help text and value.
type Scalar = (&'static str, &'static str, &'static str, String);

/// Keeps a stream registered; dropping it removes the stream and lowers the live gauge.
pub(crate) struct StreamGuard {
    metrics: Arc<Metrics>,
    stats: Arc<StreamStats>,
}

impl StreamGuard {
    /// The stream's counters.
    pub fn stats(&self) -> &Arc<StreamStats> {
        &self.stats
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        lock(&self.metrics.streams).remove(&self.stats.id);
        self.metrics.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Decrements a gauge without wrapping below zero.
pub(crate) fn dec(gauge: &AtomicU64) {
    let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
}

/// Locks a mutex, recovering the data if a holder panicked (the counters stay usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fmt_f64(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "NaN".into()
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Longest request head the metrics endpoint reads.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long the endpoint waits for a request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `shutdown` fires.
pub(crate) async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let metrics = Arc::clone(&metrics);
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &metrics).await {
                        tracing::debug!(%peer, error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                // Transient accept errors (e.g. too many open files): yield before retrying.
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Answers one HTTP/1.x request and closes the connection.
async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_REQUEST_HEAD {
                return Ok(false);
            }
        }
    })
    .await
    .unwrap_or(Ok(false))?;
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = if !complete {
        ("400 Bad Request", "text/plain", "bad request\n".to_owned())
    } else if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        )
    } else if path == "/metrics" {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        )
    } else if path == "/" {
        (
            "200 OK",
            "text/plain",
            "patchflow metrics: GET /metrics\n".to_owned(),
        )
    } else {
        ("404 Not Found", "text/plain", "not found\n".to_owned())
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_streams_and_counters() {
        let metrics = Arc::new(Metrics::new(ChunkCache::new(1 << 20), 3));
        let guard = metrics.open_stream("127.0.0.1:1".into());
        *lock(&guard.stats().dataset) = "ds\"1".into();
        guard.stats().queued.fetch_add(1, Ordering::Relaxed);
        metrics.batch_sent(guard.stats(), 100);
        let text = metrics.render();
        assert!(text.contains("patchflow_batches_total 1\n"), "{text}");
        assert!(text.contains("patchflow_bytes_total 100\n"), "{text}");
        assert!(text.contains("patchflow_live_streams 1\n"), "{text}");
        assert!(text.contains("patchflow_workers 3\n"), "{text}");
        assert!(
            text.contains("patchflow_cases_set_aside_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains("patchflow_stream_batches_total{stream=\"1\",dataset=\"ds\\\"1\",peer=\"127.0.0.1:1\"} 1"),
            "{text}"
        );
        assert_eq!(guard.stats().queued.load(Ordering::Relaxed), 0);
        drop(guard);
        assert_eq!(*metrics.live_streams().borrow(), 0);
        assert!(metrics.render().contains("patchflow_live_streams 0\n"));
    }

    #[test]
    fn set_aside_cases_are_counted_per_dataset() {
        let metrics = Metrics::new(ChunkCache::new(1 << 20), 1);
        metrics.track_dataset("ds_a");
        metrics.track_dataset("ds_b");
        metrics.case_set_aside("ds_b");
        metrics.case_set_aside("ds_b");
        let text = metrics.render();
        assert!(
            text.contains("patchflow_cases_set_aside_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("patchflow_dataset_cases_set_aside{dataset=\"ds_a\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("patchflow_dataset_cases_set_aside{dataset=\"ds_b\"} 2\n"),
            "{text}"
        );
        assert_eq!(metrics.snapshot().cases_set_aside, 2);
    }

    #[test]
    fn gauge_never_wraps() {
        let g = AtomicU64::new(0);
        dec(&g);
        assert_eq!(g.load(Ordering::Relaxed), 0);
    }
}

//! The sampling worker pool: a dedicated rayon pool, so that decoding and assembling batches
//! never runs on the async threads that drive the network.
//!
//! Jobs are injected in FIFO order; each stream keeps at most a few jobs in flight, so many
//! streams share the workers in turn. A job's result comes back on a oneshot channel. A job that
//! panics is caught on its worker: its result is [`Panicked`] (the stream ends with INTERNAL)
//! and the worker goes on with the next job, so one bad batch never takes the daemon down.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::ServerError;
use crate::metrics::{Metrics, dec};

/// A pool of sampling threads.
pub(crate) struct WorkerPool {
    pool: rayon::ThreadPool,
    metrics: Arc<Metrics>,
}

/// A job that panicked, with the panic's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Panicked(pub String);

/// A job's handle: its result (or its panic), and a flag that skips the job if it has not
/// started yet.
pub(crate) struct JobHandle<T> {
    pub result: oneshot::Receiver<Result<T, Panicked>>,
    cancel: Arc<AtomicBool>,
}

impl<T> JobHandle<T> {
    /// Asks the pool not to run the job if it has not started (its result is dropped anyway).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl WorkerPool {
    /// Starts `threads` worker threads.
    pub fn new(threads: usize, metrics: Arc<Metrics>) -> Result<WorkerPool, ServerError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("patchflow-worker-{i}"))
            .build()
            .map_err(|source| ServerError::Pool { threads, source })?;
        Ok(WorkerPool { pool, metrics })
    }

    /// Queues `job` behind every job submitted before it. Rayon calls made inside `job` run on
    /// this pool.
    pub fn submit<T, F>(&self, job: F) -> JobHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancel);
        let metrics = Arc::clone(&self.metrics);
        metrics.jobs_waiting.fetch_add(1, Ordering::Relaxed);
        self.pool.spawn_fifo(move || {
            dec(&metrics.jobs_waiting);
            if flag.load(Ordering::Relaxed) || tx.is_closed() {
                return;
            }
            metrics.jobs_running.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            let result = std::panic::catch_unwind(AssertUnwindSafe(job)).map_err(|payload| {
                let message = panic_message(payload.as_ref());
                tracing::error!(
                    panic = %message,
                    "a sampling job panicked; its stream ends with INTERNAL and the worker goes on"
                );
                Panicked(message)
            });
            let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            metrics.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
            dec(&metrics.jobs_running);
            // The stream may have gone away meanwhile; then the result is simply dropped.
            let _ = tx.send(result);
        });
        JobHandle { result: rx, cancel }
    }
}

/// The text of a panic's payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_store::ChunkCache;

    #[tokio::test]
    async fn jobs_run_on_named_pool_threads() {
        let metrics = Arc::new(Metrics::new(ChunkCache::new(1 << 20), 2));
        let pool = WorkerPool::new(2, Arc::clone(&metrics)).unwrap();
        let handle = pool.submit(|| {
            let name = std::thread::current().name().map(str::to_owned);
            (name, rayon::current_num_threads())
        });
        let (name, threads) = handle.result.await.unwrap().unwrap();
        assert!(name.unwrap().starts_with("patchflow-worker-"));
        assert_eq!(threads, 2);
        assert_eq!(metrics.jobs_waiting.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.jobs_running.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn cancelled_jobs_do_not_run() {
        let metrics = Arc::new(Metrics::new(ChunkCache::new(1 << 20), 1));
        let pool = WorkerPool::new(1, metrics).unwrap();
        // Block the only worker until the second job has been cancelled.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let first = pool.submit(move || release_rx.recv().is_ok());
        let ran = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let second = pool.submit(move || flag.store(true, Ordering::Relaxed));
        second.cancel();
        release_tx.send(()).unwrap();
        assert!(first.result.await.unwrap().unwrap());
        assert!(
            second.result.await.is_err(),
            "a cancelled job sends no result"
        );
        assert!(!ran.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone_and_the_worker_goes_on() {
        let metrics = Arc::new(Metrics::new(ChunkCache::new(1 << 20), 1));
        let pool = WorkerPool::new(1, Arc::clone(&metrics)).unwrap();
        let bad = pool.submit(|| -> u32 { panic!("a bad batch {}", 7) });
        let literal = pool.submit(|| -> u32 { panic!("plain") });
        let good = pool.submit(|| 42u32);
        assert_eq!(
            bad.result.await.unwrap(),
            Err(Panicked("a bad batch 7".into()))
        );
        assert_eq!(literal.result.await.unwrap(), Err(Panicked("plain".into())));
        // The one worker survived both panics.
        assert_eq!(good.result.await.unwrap(), Ok(42));
        assert_eq!(metrics.jobs_running.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.jobs_waiting.load(Ordering::Relaxed), 0);
    }
}

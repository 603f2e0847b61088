//! One Sample stream: a producer task driven by the client's credits.
//!
//! The task reads the client's messages (configurations and credits), keeps at most
//! [`Limits::jobs_per_stream`] sampling jobs on the worker pool, and hands finished batches, in
//! index order, to a bounded queue that the transport drains. Memory per stream is therefore
//! bounded by `jobs_per_stream + 1 + queued_batches_per_stream` batches, whatever the client
//! grants. The task ends, freeing everything, when the client goes away, when it closes its side
//! and every credit has been served, on the first error (sent as the stream's status), or when
//! the server shuts down (UNAVAILABLE). Each batch is one [`Job`] on the pool, drawn from the
//! cases still in service (see [`crate::damage`]); the stream whose batch meets damaged data
//! ends with DATA_LOSS, and one whose job panicked with INTERNAL.
//!
//! The stream owns flow control and ordering only; it must not sample or encode batches itself.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{Stream, StreamExt};
use patchflow_proto::buffers::BufferPool;
use patchflow_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::Limits;
use crate::convert::{Compact, EncodedBatch, StreamConfig, stream_config};
use crate::error::StreamError;
use crate::job::Job;
use crate::metrics::{Metrics, StreamGuard, StreamStats, dec};
use crate::pool::{JobHandle, Panicked, WorkerPool};
use crate::registry::Registry;
use crate::shm::{SharedDir, SlotTable};

/// What every stream shares.
pub(crate) struct StreamContext {
    pub registry: Arc<Registry>,
    pub pool: Arc<WorkerPool>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// Buffers of sent batches, reused for new ones.
    pub buffers: Arc<BufferPool>,
    /// The shared-memory folder, when shared memory is offered.
    pub shared_memory: Option<Arc<SharedDir>>,
}

/// The response stream handed to tonic.
pub(crate) type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<pb::SampleResponse, Status>> + Send + 'static>>;

/// What the producer puts in the queue.
enum Outgoing {
    Batch(EncodedBatch),
    Error(Status),
}

/// Starts the producer task of a new stream and returns the stream tonic sends from.
pub(crate) fn open(
    ctx: Arc<StreamContext>,
    inbound: Streaming<pb::SampleRequest>,
    peer: String,
    permit: OwnedSemaphorePermit,
) -> ResponseStream {
    let guard = ctx.metrics.open_stream(peer);
    let stats = Arc::clone(guard.stats());
    let (tx, rx) = mpsc::channel(ctx.limits.queued_batches_per_stream);
    let metrics = Arc::clone(&ctx.metrics);
    tokio::spawn(run(ctx, inbound, tx, guard, permit));
    let stream = ReceiverStream::new(rx).flat_map(move |out| {
        let messages: Vec<Result<pb::SampleResponse, Status>> = match out {
            Outgoing::Batch(batch) => {
                metrics.batch_sent(&stats, batch.bytes);
                batch.parts.into_iter().map(Ok).collect()
            }
            Outgoing::Error(status) => vec![Err(status)],
        };
        futures_util::stream::iter(messages)
    });
    Box::pin(stream)
}

/// A job of the stream on the pool.
struct Pending {
    index: u64,
    handle: JobHandle<Result<EncodedBatch, StreamError>>,
}

/// The producer's state.
struct Producer {
    stats: Arc<StreamStats>,
    active: Option<StreamConfig>,
    credits: u64,
    next_index: u64,
    jobs: VecDeque<Pending>,
    ready: Option<EncodedBatch>,
    inbound_done: bool,
    /// Whether the client's first message is still to come.
    first_message: bool,
    /// The stream's shared-memory slots, when it asked for shared memory.
    slots: Option<SlotTable>,
    /// The compact wire forms the client asked for in its first message.
    compact: Compact,
}

/// What woke the producer up.
enum Event<'a> {
    Shutdown,
    ClientGone,
    /// A client message (boxed: configurations are large, and events are moved around).
    Message(Result<Option<Box<pb::SampleRequest>>, Status>),
    JobDone(Result<EncodedBatch, StreamError>),
    QueueSlot(Result<mpsc::Permit<'a, Outgoing>, mpsc::error::SendError<()>>),
    /// A shared-memory slot was dropped: there may be room for a new one.
    SlotDropped,
}

/// Completes when a slot of `slots` is dropped (never without a slot table).
async fn slot_dropped(slots: Option<Arc<tokio::sync::Notify>>) {
    match slots {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

/// Waits for the oldest job (never completes when there is none).
async fn oldest(jobs: &mut VecDeque<Pending>) -> Result<EncodedBatch, StreamError> {
    match jobs.front_mut() {
        Some(job) => job_outcome((&mut job.handle.result).await),
        None => std::future::pending().await,
    }
}

/// What a job's result means for its stream: its batch, its error, or INTERNAL when the job
/// panicked or its result was lost.
fn job_outcome(
    received: Result<
        Result<Result<EncodedBatch, StreamError>, Panicked>,
        oneshot::error::RecvError,
    >,
) -> Result<EncodedBatch, StreamError> {
    match received {
        Ok(Ok(result)) => result,
        Ok(Err(Panicked(message))) => Err(StreamError::JobPanicked { message }),
        Err(_) => Err(StreamError::WorkerLost),
    }
}

async fn run(
    ctx: Arc<StreamContext>,
    mut inbound: Streaming<pb::SampleRequest>,
    tx: mpsc::Sender<Outgoing>,
    guard: StreamGuard,
    permit: OwnedSemaphorePermit,
) {
    let stats = Arc::clone(guard.stats());
    tracing::debug!(stream = stats.id, peer = %stats.peer, "stream opened");
    let mut producer = Producer {
        stats: Arc::clone(&stats),
        active: None,
        credits: 0,
        next_index: 0,
        jobs: VecDeque::new(),
        ready: None,
        inbound_done: false,
        first_message: true,
        slots: None,
        compact: Compact::default(),
    };
    let result = producer.drive(&ctx, &mut inbound, &tx).await;
    producer.cancel_jobs();
    // A batch prepared but never queued holds a slot, which closing the slot table below would
    // wait for for ever: it goes back to the table first.
    producer.discard_ready();
    match result {
        Ok(()) => tracing::debug!(stream = stats.id, "stream closed"),
        Err(err) => {
            let status = Status::from(err);
            ctx.metrics.stream_errors.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                stream = stats.id,
                peer = %stats.peer,
                code = ?status.code(),
                message = status.message(),
                "stream ended with an error"
            );
            // Deliver the status behind the queued batches, unless the server is shutting down
            // and the client does not read.
            tokio::select! {
                biased;
                _ = tx.send(Outgoing::Error(status)) => {}
                _ = ctx.shutdown.cancelled() => {}
            }
        }
    }
    // Shared-memory files go before the live gauge says the stream is gone: those of free and
    // lent slots now, those of slots in cancelled jobs when the workers drop them.
    if let Some(slots) = producer.slots.take() {
        tokio::select! {
            biased;
            () = slots.close() => {}
            _ = ctx.shutdown.cancelled() => {}
        }
    }
    // The stream slot is free before the live gauge says so.
    drop(permit);
    drop(guard);
}

impl Producer {
    async fn drive(
        &mut self,
        ctx: &StreamContext,
        inbound: &mut Streaming<pb::SampleRequest>,
        tx: &mpsc::Sender<Outgoing>,
    ) -> Result<(), StreamError> {
        loop {
            self.fill(ctx)?;
            if self.inbound_done && self.finished() {
                return Ok(());
            }
            let take_job = self.ready.is_none() && !self.jobs.is_empty();
            let has_ready = self.ready.is_some();
            let reading = !self.inbound_done;
            // Credits left but no job: the stream waits for a slot.
            let slot_wait = self.credits > 0 && self.jobs.is_empty() && self.active.is_some();
            let dropped = self.slots.as_ref().map(SlotTable::slot_dropped);
            let event = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => Event::Shutdown,
                _ = tx.closed() => Event::ClientGone,
                permit = tx.reserve(), if has_ready => Event::QueueSlot(permit),
                done = oldest(&mut self.jobs), if take_job => Event::JobDone(done),
                msg = inbound.message(), if reading => Event::Message(msg.map(|m| m.map(Box::new))),
                _ = slot_dropped(dropped), if slot_wait => Event::SlotDropped,
            };
            match event {
                Event::Shutdown => return Err(StreamError::ShuttingDown),
                Event::ClientGone => return Ok(()),
                Event::QueueSlot(Err(_)) => return Ok(()),
                Event::QueueSlot(Ok(permit)) => {
                    if let Some(mut batch) = self.ready.take() {
                        // From here the slot is the client's until it releases it.
                        if let (Some(slot), Some(slots)) = (batch.slot.take(), &mut self.slots) {
                            slots.lend(slot);
                        }
                        self.stats.queued.fetch_add(1, Ordering::Relaxed);
                        permit.send(Outgoing::Batch(batch));
                    }
                }
                Event::JobDone(done) => {
                    self.jobs.pop_front();
                    dec(&self.stats.jobs);
                    self.ready = Some(done?);
                }
                Event::Message(Ok(Some(msg))) => self.apply(*msg, ctx)?,
                Event::Message(Ok(None)) => self.inbound_done = true,
                Event::SlotDropped => {}
                Event::Message(Err(status)) => return unreadable_request(self.stats.id, status),
            }
        }
    }

    /// Whether nothing more can be produced without a new message.
    fn finished(&self) -> bool {
        (self.active.is_none() || self.credits == 0) && self.jobs.is_empty() && self.ready.is_none()
    }

    /// Applies a client message: configuration first, then slot releases, then credits.
    fn apply(&mut self, msg: pb::SampleRequest, ctx: &StreamContext) -> Result<(), StreamError> {
        if std::mem::take(&mut self.first_message) {
            if let Some(request) = &msg.shared_memory {
                self.slots = Some(shared_slots(request, msg.credits, ctx)?);
                tracing::debug!(stream = self.stats.id, "stream uses shared memory");
            }
            if let Some(options) = &msg.wire {
                self.compact = Compact::from(options);
                tracing::debug!(stream = self.stats.id, compact = ?self.compact, "compact wire forms");
            }
        }
        if let Some(config) = msg.config {
            let mut config = stream_config(&config, &ctx.registry, &ctx.limits)?;
            config.wire.compact = self.compact;
            // Without a start index, continue from the first batch not handed out yet.
            let resume = self
                .ready
                .as_ref()
                .map(|b| b.index)
                .or_else(|| self.jobs.front().map(|j| j.index))
                .unwrap_or(self.next_index);
            self.cancel_jobs();
            self.discard_ready();
            self.credits = 0;
            self.next_index = match (config.start_index, &self.active) {
                (Some(start), _) => start,
                (None, Some(_)) => resume,
                (None, None) => 0,
            };
            tracing::debug!(
                stream = self.stats.id,
                dataset = config.entry.dataset().name(),
                patch = ?config.request.base().patch,
                batch = config.request.base().batch,
                start = self.next_index,
                stride = config.stride,
                config_id = config.wire.config_id,
                "stream configured"
            );
            if let Ok(mut name) = self.stats.dataset.lock() {
                name.clear();
                name.push_str(config.entry.dataset().name());
            }
            self.active = Some(config);
        }
        if let Some(slots) = &mut self.slots {
            for &id in &msg.released {
                slots.release(id);
            }
        }
        if msg.credits > 0 {
            let balance = self.credits + u64::from(msg.credits);
            if balance > u64::from(ctx.limits.max_credits) {
                return Err(StreamError::TooManyCredits {
                    balance,
                    limit: ctx.limits.max_credits,
                });
            }
            self.credits = balance;
        }
        self.stats.credits.store(self.credits, Ordering::Relaxed);
        Ok(())
    }

    /// Submits jobs while credits and the per-stream job limit allow.
    fn fill(&mut self, ctx: &StreamContext) -> Result<(), StreamError> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        while self.credits > 0 && self.jobs.len() < ctx.limits.jobs_per_stream {
            // On a shared-memory stream a batch needs a place: with every place taken (batches
            // lent to the client, queued or being written), production waits for a release. The
            // slot itself is chosen when the job starts.
            let slot = match &mut self.slots {
                Some(slots) => match slots.take() {
                    Some(slot) => Some(slot),
                    None => break,
                },
                None => None,
            };
            let index = self.next_index;
            let job = Job {
                entry: Arc::clone(&active.entry),
                request: Arc::clone(&active.request),
                index,
                wire: active.wire,
                slot,
                metrics: Arc::clone(&ctx.metrics),
                buffers: Arc::clone(&ctx.buffers),
            };
            let handle = ctx.pool.submit(move || job.run());
            self.jobs.push_back(Pending { index, handle });
            self.stats.jobs.fetch_add(1, Ordering::Relaxed);
            self.credits -= 1;
            self.next_index =
                index
                    .checked_add(active.stride)
                    .ok_or(StreamError::IndexOverflow {
                        index,
                        stride: active.stride,
                    })?;
        }
        self.stats.credits.store(self.credits, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the batch prepared but not queued. Its slot (file and mapping) goes back to the
    /// table: the next batch reuses it rather than removing and creating a file again, and
    /// closing the table removes it.
    fn discard_ready(&mut self) {
        if let Some(mut batch) = self.ready.take()
            && let (Some(slot), Some(slots)) = (batch.slot.take(), &mut self.slots)
        {
            slots.reuse(slot);
        }
    }

    /// Drops every job of the stream (those not started yet are skipped by the pool).
    fn cancel_jobs(&mut self) {
        for job in self.jobs.drain(..) {
            job.handle.cancel();
        }
        self.stats.jobs.store(0, Ordering::Relaxed);
    }
}

/// The slot table a stream's first message asks for, within the daemon's limit.
fn shared_slots(
    request: &pb::SharedMemoryRequest,
    credits: u32,
    ctx: &StreamContext,
) -> Result<SlotTable, StreamError> {
    let Some(dir) = &ctx.shared_memory else {
        return Err(StreamError::NoSharedMemory);
    };
    let max = ctx.limits.max_shared_slots;
    let slots = match request.slots {
        0 => credits.saturating_add(4).min(max),
        n if n > max => {
            return Err(StreamError::TooManySlots {
                asked: n,
                limit: max,
            });
        }
        n => n,
    };
    Ok(SlotTable::new(Arc::clone(dir), slots as usize))
}

/// Ends a stream whose request side failed. A message the server could not read (tonic
/// reports undecodable bytes as INTERNAL and a message over the size limit as OUT_OF_RANGE) is
/// the client's error and answered as INVALID_ARGUMENT or RESOURCE_EXHAUSTED; anything else
/// means the client reset the stream or the connection broke, and the stream just ends.
fn unreadable_request(stream: u64, status: Status) -> Result<(), StreamError> {
    match status.code() {
        tonic::Code::Internal => Err(StreamError::UnreadableRequest(status.message().to_owned())),
        tonic::Code::OutOfRange => Err(StreamError::RequestTooLarge(status.message().to_owned())),
        _ => {
            tracing::debug!(stream, %status, "request stream failed");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_store::ChunkCache;
    use tonic::Code;

    fn code_and_message(outcome: Result<EncodedBatch, StreamError>) -> (Code, String) {
        match outcome {
            Ok(batch) => panic!("batch {} instead of an error", batch.index),
            Err(e) => {
                let status = Status::from(e);
                (status.code(), status.message().to_owned())
            }
        }
    }

    #[tokio::test]
    async fn a_job_that_panics_ends_its_stream_with_internal_and_the_pool_goes_on() {
        let metrics = Arc::new(Metrics::new(ChunkCache::new(1 << 20), 1));
        let pool = WorkerPool::new(1, metrics).unwrap();
        let bad = pool.submit(|| -> Result<EncodedBatch, StreamError> {
            let items: Vec<u8> = Vec::new();
            panic!("item {} of {}", 3, items.len())
        });
        let (code, message) = code_and_message(job_outcome(bad.result.await));
        assert_eq!(code, Code::Internal);
        assert!(message.contains("panic: item 3 of 0"), "{message}");
        // The same single worker runs the next job, and its own error keeps its code.
        let next = pool.submit(|| Err(StreamError::ShuttingDown));
        let (code, _) = code_and_message(job_outcome(next.result.await));
        assert_eq!(code, Code::Unavailable);
    }
}

//! One Sample stream: a producer task driven by the client's credits.
//!
//! The task reads the client's messages (configurations and credits), keeps at most
//! [`Limits::jobs_per_stream`] sampling jobs on the worker pool, and hands finished batches, in
//! index order, to a bounded queue that the transport drains. Memory per stream is therefore
//! bounded by `jobs_per_stream + 1 + queued_batches_per_stream` batches, whatever the client
//! grants. The task ends, freeing everything, when the client goes away, when it closes its side
//! and every credit has been served, on the first error (sent as the stream's status), or when
//! the server shuts down (UNAVAILABLE). Each batch is drawn from the cases still in service (see
//! [`crate::damage`]); the stream whose batch meets damaged data ends with DATA_LOSS.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{Stream, StreamExt};
use patchflow_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::Limits;
use crate::buffers::BufferPool;
use crate::convert::{EncodedBatch, StreamConfig, encode_batch, encode_shared, stream_config};
use crate::damage::{self, SharedOutcome};
use crate::metrics::{Metrics, StreamGuard, StreamStats, dec};
use crate::pool::{JobHandle, WorkerPool};
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

/// A sampling job of the stream.
struct Job {
    index: u64,
    handle: JobHandle<Result<EncodedBatch, Status>>,
}

/// The producer's state.
struct Producer {
    stats: Arc<StreamStats>,
    active: Option<StreamConfig>,
    credits: u64,
    next_index: u64,
    jobs: VecDeque<Job>,
    ready: Option<EncodedBatch>,
    inbound_done: bool,
    /// Whether the client's first message is still to come.
    first_message: bool,
    /// The stream's shared-memory slots, when it asked for shared memory.
    slots: Option<SlotTable>,
}

/// What woke the producer up.
enum Event<'a> {
    Shutdown,
    ClientGone,
    /// A client message (boxed: configurations are large, and events are moved around).
    Message(Result<Option<Box<pb::SampleRequest>>, Status>),
    JobDone(Result<Result<EncodedBatch, Status>, oneshot::error::RecvError>),
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
async fn oldest(
    jobs: &mut VecDeque<Job>,
) -> Result<Result<EncodedBatch, Status>, oneshot::error::RecvError> {
    match jobs.front_mut() {
        Some(job) => (&mut job.handle.result).await,
        None => std::future::pending().await,
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
    };
    let result = producer.drive(&ctx, &mut inbound, &tx).await;
    producer.cancel_jobs();
    // A batch prepared but never queued holds a slot, which closing the slot table below would
    // wait for for ever: it goes back to the table first.
    producer.discard_ready();
    match result {
        Ok(()) => tracing::debug!(stream = stats.id, "stream closed"),
        Err(status) => {
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
    ) -> Result<(), Status> {
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
                Event::Shutdown => return Err(Status::unavailable("the server is shutting down")),
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
                    match done {
                        Ok(Ok(batch)) => self.ready = Some(batch),
                        Ok(Err(status)) => return Err(status),
                        Err(_) => {
                            return Err(Status::internal("a sampling worker dropped its job"));
                        }
                    }
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
    fn apply(&mut self, msg: pb::SampleRequest, ctx: &StreamContext) -> Result<(), Status> {
        if std::mem::take(&mut self.first_message)
            && let Some(request) = &msg.shared_memory
        {
            self.slots = Some(shared_slots(request, msg.credits, ctx)?);
            tracing::debug!(stream = self.stats.id, "stream uses shared memory");
        }
        if let Some(config) = msg.config {
            let config = stream_config(&config, &ctx.registry, &ctx.limits)?;
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
                config_id = config.config_id,
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
                return Err(Status::resource_exhausted(format!(
                    "credit balance would be {balance}, the limit is {} (grant credits as batches arrive)",
                    ctx.limits.max_credits
                )));
            }
            self.credits = balance;
        }
        self.stats.credits.store(self.credits, Ordering::Relaxed);
        Ok(())
    }

    /// Submits jobs while credits and the per-stream job limit allow.
    fn fill(&mut self, ctx: &StreamContext) -> Result<(), Status> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        while self.credits > 0 && self.jobs.len() < ctx.limits.jobs_per_stream {
            // On a shared-memory stream a batch needs a slot: with every slot lent to the client,
            // production waits for a release.
            let slot = match &mut self.slots {
                Some(slots) => match slots.take() {
                    Some(slot) => Some(slot),
                    None => break,
                },
                None => None,
            };
            let index = self.next_index;
            let entry = Arc::clone(&active.entry);
            let request = Arc::clone(&active.request);
            let metrics = Arc::clone(&ctx.metrics);
            let channels = active.entry.dataset().num_channels();
            let ignore = active.entry.dataset().ignore_label();
            let config_id = active.config_id;
            let max_message = ctx.limits.max_message_bytes;
            let buffers = Arc::clone(&ctx.buffers);
            // The job narrows the request to the cases in service when it runs, so a case set
            // aside while the job waited is not drawn.
            let handle = ctx.pool.submit(move || {
                if let Some(slot) = slot {
                    match damage::sample_shared(&entry, &request, index, &metrics, slot)? {
                        SharedOutcome::Written(batch) => {
                            metrics.shared_batch();
                            return Ok(encode_shared(batch, channels, ignore, config_id));
                        }
                        // A full shared-memory folder slows the stream down; it does not end
                        // it: the batch goes inside the messages.
                        SharedOutcome::SlotUnusable(e) => metrics.shared_memory_fallback(&e),
                    }
                }
                damage::sample_batch(&entry, &request, index, &metrics, &buffers).map(|batch| {
                    encode_batch(batch, channels, ignore, config_id, max_message, &buffers)
                })
            });
            self.jobs.push_back(Job { index, handle });
            self.stats.jobs.fetch_add(1, Ordering::Relaxed);
            self.credits -= 1;
            self.next_index = index.checked_add(active.stride).ok_or_else(|| {
                Status::out_of_range(format!(
                    "batch index {index} + stride {} overflows",
                    active.stride
                ))
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
) -> Result<SlotTable, Status> {
    let Some(dir) = &ctx.shared_memory else {
        return Err(Status::failed_precondition(
            "this daemon does not offer shared memory (it was started without a shared-memory \
             folder); ask for batches inside the messages instead",
        ));
    };
    let max = ctx.limits.max_shared_slots;
    let slots = match request.slots {
        0 => credits.saturating_add(4).min(max),
        n if n > max => {
            return Err(Status::resource_exhausted(format!(
                "shared_memory.slots is {n}, the limit is {max}"
            )));
        }
        n => n,
    };
    Ok(SlotTable::new(Arc::clone(dir), slots as usize))
}

/// Ends a stream whose request side failed. A message the server could not read (tonic
/// reports undecodable bytes as INTERNAL and a message over the size limit as OUT_OF_RANGE) is
/// the client's error and answered as INVALID_ARGUMENT or RESOURCE_EXHAUSTED; anything else
/// means the client reset the stream or the connection broke, and the stream just ends.
fn unreadable_request(stream: u64, status: Status) -> Result<(), Status> {
    match status.code() {
        tonic::Code::Internal => Err(Status::invalid_argument(format!(
            "unreadable SampleRequest: {}",
            status.message()
        ))),
        tonic::Code::OutOfRange => Err(Status::resource_exhausted(format!(
            "SampleRequest too large: {}",
            status.message()
        ))),
        _ => {
            tracing::debug!(stream, %status, "request stream failed");
            Ok(())
        }
    }
}

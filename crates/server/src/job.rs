//! One sampling job: batch `index` of a stream, drawn from the cases still in service, cut by
//! the sampler into a pooled buffer or a shared-memory slot, and encoded for the wire.
//!
//! A stream only decides which jobs to submit and in which order their batches go out
//! ([`crate::stream`]); a job runs on the worker pool from start to finish: stream → job →
//! sampler. The set-aside bookkeeping it consults is [`crate::damage`]'s; the wire encoding is
//! [`crate::convert`]'s. A job must not touch the stream's state.

use std::sync::Arc;

use patchflow_proto::buffers::BufferPool;
use patchflow_sampler::{BatchRequest, Sampler, SamplerError};

use crate::convert::{
    EncodedBatch, WireFormat, batch_header, encode_batch, encode_compact, encode_shared,
};
use crate::damage::{ServedRequest, SetAside, SetAsideCase, damaged_case, draws_from};
use crate::error::StreamError;
use crate::metrics::Metrics;
use crate::registry::Entry;
use crate::shm::SlotClaim;

/// Everything one batch needs; moved onto a worker thread.
pub(crate) struct Job {
    /// The dataset.
    pub entry: Arc<Entry>,
    /// The stream's request, narrowed to the cases in service when the job runs (so a case set
    /// aside while the job waited is not drawn).
    pub request: Arc<ServedRequest>,
    /// Batch index.
    pub index: u64,
    /// How the stream's batches go on the wire.
    pub wire: WireFormat,
    /// The place of the batch on a shared-memory stream; the slot it goes into is chosen when
    /// the job starts (the one released last).
    pub slot: Option<SlotClaim>,
    /// The daemon's counters.
    pub metrics: Arc<Metrics>,
    /// Buffers of sent batches, reused.
    pub buffers: Arc<BufferPool>,
}

/// What became of a batch meant for a shared-memory slot.
enum SharedOutcome {
    /// Written into the slot, encoded.
    Written(EncodedBatch),
    /// The slot could not be prepared (the shared-memory folder is full, say); nothing was
    /// sampled and the slot is gone, so the batch is to travel inside the messages.
    SlotUnusable(std::io::Error),
}

impl Job {
    /// Samples and encodes the batch. A shared-memory stream's batch goes into its slot; when
    /// the slot cannot be prepared it travels inside the messages (a full shared-memory folder
    /// slows the stream down, it does not end it).
    pub fn run(mut self) -> Result<EncodedBatch, StreamError> {
        if let Some(slot) = self.slot.take() {
            match self.sample_shared(slot)? {
                SharedOutcome::Written(batch) => {
                    self.metrics.shared_batch();
                    return Ok(batch);
                }
                SharedOutcome::SlotUnusable(e) => self.metrics.shared_memory_fallback(&e),
            }
        }
        if self.wire.compact.stored_image {
            let compact = self.pooled(Sampler::sample_compact_into)?;
            return Ok(encode_compact(compact, &self.wire, &self.buffers));
        }
        let batch = self.pooled(Sampler::sample_into)?;
        Ok(encode_batch(batch, &self.wire, &self.buffers))
    }

    /// The batch cut by `sample` (the served or the compact form) into buffers taken from the
    /// pool, sized for the served batch: the sizes depend on patch, batch and dtypes only, not
    /// on the cases drawn, and bound the compact form's.
    fn pooled<T>(
        &self,
        sample: impl Fn(&Sampler, &BatchRequest, u64, Vec<u8>, Vec<u8>) -> Result<T, SamplerError>,
    ) -> Result<T, StreamError> {
        let sampler = &self.entry.sampler;
        let (image_len, label_len) = sampler.buffer_sizes(self.request.base())?;
        self.served(|req| {
            let image = self.buffers.take(image_len);
            let label = self.buffers.take(label_len);
            sample(sampler, req, self.index, image, label)
        })
    }

    /// The batch written into the slot `claim` binds (grown as needed) instead of a buffer.
    fn sample_shared(&self, claim: SlotClaim) -> Result<SharedOutcome, StreamError> {
        let sampler = &self.entry.sampler;
        let base = self.request.base();
        let sizes = sampler.buffer_sizes(base)?;
        let mut slot = match claim.bind() {
            Ok(slot) => slot,
            Err(e) => return Ok(SharedOutcome::SlotUnusable(e)),
        };
        let (image, label) = match slot.buffers(sizes.0, sizes.1) {
            Ok(buffers) => buffers,
            Err(e) => return Ok(SharedOutcome::SlotUnusable(e)),
        };
        let items =
            self.served(|req| sampler.sample_to(req, self.index, &mut *image, &mut *label))?;
        let dataset = self.entry.dataset();
        let header = batch_header(
            base.patch,
            base.dtype,
            dataset.label_dtype(),
            items,
            sizes,
            &self.wire,
        );
        Ok(SharedOutcome::Written(encode_shared(
            self.index, header, slot, &self.wire,
        )))
    }

    /// [`sample_served`] over this job's dataset, counting newly set-aside cases.
    fn served<T>(
        &self,
        sample: impl FnMut(&BatchRequest) -> Result<T, SamplerError>,
    ) -> Result<T, StreamError> {
        let dataset = self.entry.dataset();
        sample_served(
            &self.entry.set_aside,
            &self.request,
            sample,
            |err| damaged_case(dataset, err),
            |_| self.metrics.case_set_aside(dataset.name()),
        )
    }
}

/// Samples with `sample` from the cases of `request` still in service.
///
/// A data error on a case not yet set aside sets it aside, calls `newly_set_aside` and fails
/// with the error's status (DATA_LOSS, naming the case): the stream that met the damage ends.
/// A data error on a case that another stream set aside meanwhile (the request was narrowed
/// before) draws the batch again from the remaining cases. Other errors fail as they are.
fn sample_served<T>(
    aside: &SetAside,
    request: &ServedRequest,
    mut sample: impl FnMut(&BatchRequest) -> Result<T, SamplerError>,
    damaged: impl Fn(&SamplerError) -> Option<SetAsideCase>,
    newly_set_aside: impl FnOnce(&SetAsideCase),
) -> Result<T, StreamError> {
    let mut current = request.current(aside)?;
    loop {
        let err = match sample(&current) {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let Some(case) = damaged(&err) else {
            return Err(err.into());
        };
        if aside.insert(case.clone()) {
            newly_set_aside(&case);
            return Err(StreamError::SetAsideNow {
                source: err,
                case: case.id,
            });
        }
        // Drawn again only from a pool that lost the case: each retry leaves out one more case,
        // so this ends.
        let next = request.current(aside)?;
        if !draws_from(&current, case.index) || draws_from(&next, case.index) {
            return Err(err.into());
        }
        tracing::debug!(
            case = %case.id,
            "case set aside by another stream meanwhile; drawing the batch from the other cases"
        );
        current = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::damage::fixtures::*;
    use patchflow_store::StoreError;
    use std::cell::Cell;
    use std::path::PathBuf;
    use tonic::{Code, Status};

    /// A sampler whose reads of the cases in `damaged` fail with a checksum error.
    fn fake_sampler(
        damaged: &[usize],
        calls: &Cell<usize>,
    ) -> impl FnMut(&BatchRequest) -> Result<Vec<usize>, SamplerError> {
        move |req: &BatchRequest| {
            calls.set(calls.get() + 1);
            let pool = req.cases.clone().unwrap_or_else(|| (0..4).collect());
            match pool.iter().find(|c| damaged.contains(c)) {
                Some(&c) => Err(checksum(c)),
                None => Ok(pool),
            }
        }
    }

    #[test]
    fn the_stream_that_meets_the_damage_fails_and_sets_the_case_aside() {
        let aside = SetAside::new("ds", 4);
        let served = ServedRequest::new(request(None), &aside).unwrap();
        let calls = Cell::new(0);
        let reported = Cell::new(0);
        let status = Status::from(
            sample_served(
                &aside,
                &served,
                fake_sampler(&[1], &calls),
                damaged,
                |case| {
                    assert_eq!(case.id, "case_b");
                    reported.set(reported.get() + 1);
                },
            )
            .unwrap_err(),
        );
        assert_eq!(status.code(), Code::DataLoss);
        assert!(status.message().contains("case case_b"), "{status:?}");
        assert!(status.message().contains("set aside"), "{status:?}");
        assert_eq!((calls.get(), reported.get()), (1, 1));
        assert_eq!(aside.cases(), vec![aside_case(1)]);
        // The next batch is drawn without it.
        let pool = sample_served(&aside, &served, fake_sampler(&[1], &calls), damaged, |_| {
            panic!("nothing new is set aside")
        })
        .unwrap();
        assert_eq!(pool, [0, 2, 3]);
    }

    #[test]
    fn a_batch_planned_before_another_stream_set_the_case_aside_is_drawn_again() {
        let aside = SetAside::new("ds", 4);
        let served = ServedRequest::new(request(None), &aside).unwrap();
        let calls = Cell::new(0);
        // The first read fails on case_b, which another stream sets aside meanwhile.
        let mut inner = fake_sampler(&[1], &calls);
        let sample = |req: &BatchRequest| {
            let out = inner(req);
            if out.is_err() {
                assert!(aside.insert(aside_case(1)));
            }
            out
        };
        let pool = sample_served(&aside, &served, sample, damaged, |_| {
            panic!("the other stream reported it")
        })
        .unwrap();
        assert_eq!(pool, [0, 2, 3]);
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn other_errors_set_nothing_aside() {
        let aside = SetAside::new("ds", 4);
        let served = ServedRequest::new(request(None), &aside).unwrap();
        let errors = [
            (
                SamplerError::Store(StoreError::Io {
                    path: PathBuf::from("/stores/ds/case_b.pfc"),
                    source: std::io::Error::from_raw_os_error(24),
                }),
                Code::Internal,
            ),
            (
                SamplerError::Case {
                    case: "case_b".into(),
                    reason: "holds none of the weighted classes".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                SamplerError::InvalidRequest {
                    field: "patch",
                    reason: "too large".into(),
                },
                Code::InvalidArgument,
            ),
        ];
        for (err, code) in errors {
            let mut err = Some(err);
            let status = sample_served(
                &aside,
                &served,
                |_| -> Result<(), SamplerError> { Err(err.take().expect("sampled once")) },
                damaged,
                |_| panic!("not damage"),
            )
            .unwrap_err();
            assert_eq!(status.code(), code, "{status:?}");
        }
        assert_eq!(aside.generation(), 0);
        assert!(aside.cases().is_empty());
    }
}

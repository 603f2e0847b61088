//! Damaged cases are set aside while the daemon serves.
//!
//! A chunk whose stored bytes fail their checksum or do not decode cannot be repaired by the
//! daemon, and every later batch that draws the same case would fail the same way. The first
//! stream that meets the damage ends with DATA_LOSS naming the case (its trainer must know);
//! the daemon then sets the case aside in that dataset for the rest of its life: every later
//! batch of every stream is drawn from the other cases, by narrowing the request's case set
//! ([`BatchRequest::cases`]). Only data errors set a case aside, never I/O failures (a full
//! file table is no reason to drop a case) and never request errors.
//!
//! Narrowing changes which case a batch index draws, so after a case is set aside the batches
//! of requests that could draw it differ from those of a daemon with an undamaged store.
//!
//! This module keeps only that bookkeeping (which cases are set aside, the requests narrowed
//! to the others, which case a data error points at); the sampling job ([`crate::job`]) uses
//! it. It must not sample, encode or know about streams.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use patchflow_proto::v1 as pb;
use patchflow_sampler::{BatchRequest, Dataset, SamplerError};
use patchflow_store::StoreError;

use crate::error::StreamError;

/// Set-aside cases listed by name in one status message; the rest are counted.
const LISTED_IN_STATUS: usize = 8;

/// A case taken out of service because its stored data is damaged.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SetAsideCase {
    /// Case index in the dataset.
    pub index: usize,
    /// Case identifier.
    pub id: String,
    /// The case file.
    pub file: PathBuf,
    /// The error the damaged read reported.
    pub reason: String,
}

impl SetAsideCase {
    /// The wire form (the file path stays on the server; the reason names what is damaged).
    fn wire(&self) -> pb::SetAsideCase {
        pb::SetAsideCase {
            id: self.id.clone(),
            case_index: u32::try_from(self.index).unwrap_or(u32::MAX),
            reason: self.reason.clone(),
        }
    }
}

/// The set-aside cases of one dataset. Cases are only ever added; `generation` counts the
/// additions so that streams notice a change with one atomic load per batch.
pub(crate) struct SetAside {
    dataset: String,
    num_cases: usize,
    cases: Mutex<BTreeMap<usize, SetAsideCase>>,
    generation: AtomicU64,
}

impl SetAside {
    /// No case of the dataset `dataset` (of `num_cases` cases) set aside.
    pub fn new(dataset: &str, num_cases: usize) -> SetAside {
        SetAside {
            dataset: dataset.to_owned(),
            num_cases,
            cases: Mutex::new(BTreeMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// Number of changes so far (0: every case is served).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The set-aside cases, ordered by case index.
    #[cfg(test)]
    pub fn cases(&self) -> Vec<SetAsideCase> {
        lock(&self.cases).values().cloned().collect()
    }

    /// The set-aside cases in wire form, ordered by case index.
    pub fn wire(&self) -> Vec<pb::SetAsideCase> {
        lock(&self.cases).values().map(SetAsideCase::wire).collect()
    }

    /// Sets `case` aside. Returns `true` when it was not set aside yet; only then is the
    /// damage logged, so each case is reported once.
    pub fn insert(&self, case: SetAsideCase) -> bool {
        let mut cases = lock(&self.cases);
        if cases.contains_key(&case.index) {
            return false;
        }
        tracing::error!(
            dataset = %self.dataset,
            case = %case.id,
            file = %case.file.display(),
            reason = %case.reason,
            set_aside = cases.len() + 1,
            cases = self.num_cases,
            "damaged stored data: the case is set aside until the daemon restarts; later \
             batches are drawn from the other cases"
        );
        cases.insert(case.index, case);
        self.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// `requested` (a request's case restriction) without the set-aside cases, with the
    /// generation it reflects.
    pub fn narrow(
        &self,
        requested: Option<&[usize]>,
    ) -> Result<(u64, Option<Vec<usize>>), StreamError> {
        let cases = lock(&self.cases);
        // Additions happen under the lock, so this generation matches the map read here.
        let generation = self.generation();
        let narrowed = narrow_cases(&self.dataset, self.num_cases, requested, &cases)?;
        Ok((generation, narrowed))
    }
}

/// The case set a request may draw from: `requested` (`None` = every case of a dataset of
/// `num_cases` cases) without the cases in `aside`. Order and repetitions of an explicit list
/// are kept, so a list untouched by the set-aside cases draws exactly as before.
///
/// Fails with DATA_LOSS when every case of the dataset is set aside, and with
/// FAILED_PRECONDITION when every case of a non-empty explicit list is; both name the cases and
/// why they were set aside.
pub(crate) fn narrow_cases(
    dataset: &str,
    num_cases: usize,
    requested: Option<&[usize]>,
    aside: &BTreeMap<usize, SetAsideCase>,
) -> Result<Option<Vec<usize>>, StreamError> {
    if aside.is_empty() {
        return Ok(requested.map(<[usize]>::to_vec));
    }
    if (0..num_cases).all(|c| aside.contains_key(&c)) {
        return Err(StreamError::EveryCaseSetAside {
            dataset: dataset.to_owned(),
            cases: list_cases(aside.values()),
        });
    }
    match requested {
        None => Ok(Some(
            (0..num_cases).filter(|c| !aside.contains_key(c)).collect(),
        )),
        // An empty list is the request's own problem; validation reports it.
        Some([]) => Ok(Some(Vec::new())),
        Some(list) => {
            let kept: Vec<usize> = list
                .iter()
                .copied()
                .filter(|c| !aside.contains_key(c))
                .collect();
            if !kept.is_empty() {
                return Ok(Some(kept));
            }
            let mut named: Vec<usize> = list.to_vec();
            named.sort_unstable();
            named.dedup();
            Err(StreamError::RequestedCasesSetAside {
                dataset: dataset.to_owned(),
                cases: list_cases(named.iter().filter_map(|c| aside.get(c))),
            })
        }
    }
}

/// `id (reason); id (reason) ...`, at most [`LISTED_IN_STATUS`] of them, then a count of the rest.
fn list_cases<'a>(cases: impl Iterator<Item = &'a SetAsideCase>) -> String {
    let mut out = String::new();
    let mut more = 0usize;
    for (k, case) in cases.enumerate() {
        if k >= LISTED_IN_STATUS {
            more += 1;
            continue;
        }
        if k > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{} ({})", case.id, case.reason);
    }
    if more > 0 {
        let _ = write!(out, "; and {more} more");
    }
    out
}

/// A stream's request, kept narrowed to the cases still in service.
pub(crate) struct ServedRequest {
    /// The request as the client asked for it.
    base: BatchRequest,
    /// The narrowed request and the set-aside generation it reflects.
    current: Mutex<(u64, Arc<BatchRequest>)>,
}

impl ServedRequest {
    /// Narrows `base` by the cases set aside now; fails as [`narrow_cases`] does.
    pub fn new(base: BatchRequest, aside: &SetAside) -> Result<ServedRequest, StreamError> {
        let (generation, cases) = aside.narrow(base.cases.as_deref())?;
        let request = Arc::new(BatchRequest {
            cases,
            ..base.clone()
        });
        Ok(ServedRequest {
            base,
            current: Mutex::new((generation, request)),
        })
    }

    /// The request as the client asked for it.
    pub fn base(&self) -> &BatchRequest {
        &self.base
    }

    /// The request narrowed by the cases set aside now (the same `Arc` while nothing changes
    /// for it).
    pub fn current(&self, aside: &SetAside) -> Result<Arc<BatchRequest>, StreamError> {
        let mut current = lock(&self.current);
        if current.0 == aside.generation() {
            return Ok(Arc::clone(&current.1));
        }
        let (generation, cases) = aside.narrow(self.base.cases.as_deref())?;
        if cases != current.1.cases {
            current.1 = Arc::new(BatchRequest {
                cases,
                ..self.base.clone()
            });
        }
        current.0 = generation;
        Ok(Arc::clone(&current.1))
    }
}

/// What identifies the damaged case in a data error.
#[derive(Debug, PartialEq)]
enum DamageKey<'a> {
    /// A chunk failed its checksum: the error names the case.
    Case(&'a str),
    /// A chunk did not decode (or its index entry is unusable): the error names the file.
    File(&'a Path),
}

/// The damaged case an error points at, if it is a data error. I/O failures, request errors
/// and cases that cannot serve a request are not damage.
fn damage_key(err: &SamplerError) -> Option<DamageKey<'_>> {
    match err {
        SamplerError::Store(StoreError::Checksum { case, .. }) => Some(DamageKey::Case(case)),
        SamplerError::Store(StoreError::Corrupt { path, .. }) => Some(DamageKey::File(path)),
        _ => None,
    }
}

/// The case of `dataset` that `err` reports as damaged.
pub(crate) fn damaged_case(dataset: &Dataset, err: &SamplerError) -> Option<SetAsideCase> {
    let index = match damage_key(err)? {
        DamageKey::Case(id) => dataset.case_index(id)?,
        DamageKey::File(path) => dataset.cases().iter().position(|r| r.path() == path)?,
    };
    let reader = dataset.cases().get(index)?;
    Some(SetAsideCase {
        index,
        id: reader.meta().id.clone(),
        file: reader.path().to_path_buf(),
        reason: err.to_string(),
    })
}

/// Whether `request` may draw case `index`.
pub(crate) fn draws_from(request: &BatchRequest, index: usize) -> bool {
    request
        .cases
        .as_ref()
        .is_none_or(|list| list.contains(&index))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Cases, requests and errors for the tests of this module and of the sampling job.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use patchflow_sampler::{OutputDType, Patch, Policy};

    /// The case ids of the test dataset.
    pub const IDS: [&str; 4] = ["case_a", "case_b", "case_c", "case_d"];

    /// Case `index` of the test dataset, set aside for a checksum mismatch.
    pub fn aside_case(index: usize) -> SetAsideCase {
        SetAsideCase {
            index,
            id: IDS[index].to_owned(),
            file: PathBuf::from(format!("/stores/ds/{}.pfc", IDS[index])),
            reason: format!("case {}: checksum mismatch in image[0]", IDS[index]),
        }
    }

    /// A request of 4³ patches over `cases`.
    pub fn request(cases: Option<Vec<usize>>) -> BatchRequest {
        BatchRequest {
            patch: Patch::cube(4).unwrap(),
            batch: 2,
            policy: Policy::Uniform,
            crops_per_case: 1,
            dtype: OutputDType::F32,
            seed: 7,
            cases,
            augment: None,
        }
    }

    /// A checksum error in case `index`.
    pub fn checksum(index: usize) -> SamplerError {
        SamplerError::Store(StoreError::Checksum {
            case: IDS[index].to_owned(),
            array: "image[0]".into(),
            chunk: [0, 1, 0],
        })
    }

    /// Maps checksum errors to the fixed case table of these tests.
    pub fn damaged(err: &SamplerError) -> Option<SetAsideCase> {
        match damage_key(err)? {
            DamageKey::Case(id) => IDS.iter().position(|&i| i == id).map(aside_case),
            DamageKey::File(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use proptest::prelude::*;
    use tonic::{Code, Status};

    fn aside_map(indices: &[usize]) -> BTreeMap<usize, SetAsideCase> {
        indices.iter().map(|&i| (i, aside_case(i))).collect()
    }

    #[test]
    fn nothing_set_aside_leaves_the_request_as_it_is() {
        let none = BTreeMap::new();
        assert_eq!(narrow_cases("ds", 4, None, &none).unwrap(), None);
        assert_eq!(
            narrow_cases("ds", 4, Some(&[3, 1, 3]), &none).unwrap(),
            Some(vec![3, 1, 3])
        );
    }

    #[test]
    fn set_aside_cases_are_left_out_keeping_the_order() {
        let aside = aside_map(&[1]);
        assert_eq!(
            narrow_cases("ds", 4, None, &aside).unwrap(),
            Some(vec![0, 2, 3])
        );
        assert_eq!(
            narrow_cases("ds", 4, Some(&[3, 1, 0, 3]), &aside).unwrap(),
            Some(vec![3, 0, 3])
        );
        assert_eq!(
            narrow_cases("ds", 4, Some(&[2, 0]), &aside).unwrap(),
            Some(vec![2, 0])
        );
        assert_eq!(
            narrow_cases("ds", 4, Some(&[]), &aside).unwrap(),
            Some(vec![])
        );
    }

    #[test]
    fn a_list_of_set_aside_cases_only_is_refused_naming_them() {
        let aside = aside_map(&[1, 3]);
        let status = Status::from(narrow_cases("ds", 4, Some(&[3, 1, 3]), &aside).unwrap_err());
        assert_eq!(status.code(), Code::FailedPrecondition);
        let msg = status.message();
        assert!(msg.contains("dataset \"ds\""), "{msg}");
        assert!(
            msg.contains("case_b (case case_b: checksum mismatch"),
            "{msg}"
        );
        assert!(msg.contains("case_d (case case_d:"), "{msg}");
        assert!(!msg.contains("case_a") && !msg.contains("case_c"), "{msg}");
    }

    #[test]
    fn a_dataset_with_every_case_set_aside_is_data_loss() {
        let aside = aside_map(&[0, 1, 2, 3]);
        for requested in [None, Some(&[2usize][..])] {
            let status = Status::from(narrow_cases("ds", 4, requested, &aside).unwrap_err());
            assert_eq!(status.code(), Code::DataLoss);
            for id in IDS {
                assert!(status.message().contains(id), "{}", status.message());
            }
        }
    }

    #[test]
    fn long_lists_are_cut_in_messages() {
        let many: Vec<SetAsideCase> = (0..LISTED_IN_STATUS + 3)
            .map(|i| SetAsideCase {
                id: format!("c{i}"),
                ..aside_case(0)
            })
            .collect();
        let text = list_cases(many.iter());
        assert!(text.contains("; c7 ("), "{text}");
        assert!(!text.contains("c8 ("), "{text}");
        assert!(text.ends_with("; and 3 more"), "{text}");
    }

    #[test]
    fn only_data_errors_point_at_a_damaged_case() {
        assert_eq!(damage_key(&checksum(1)), Some(DamageKey::Case("case_b")));
        let corrupt = SamplerError::Store(StoreError::Corrupt {
            path: PathBuf::from("/s/case_c.pfc"),
            reason: "case case_c: image[0] chunk [0, 0, 0]: zstd payload does not decode".into(),
        });
        assert_eq!(
            damage_key(&corrupt),
            Some(DamageKey::File(Path::new("/s/case_c.pfc")))
        );
        let not_damage = [
            SamplerError::Store(StoreError::Io {
                path: PathBuf::from("/s/case_c.pfc"),
                source: std::io::Error::from_raw_os_error(24),
            }),
            SamplerError::InvalidRequest {
                field: "batch",
                reason: "must be at least 1".into(),
            },
            SamplerError::Case {
                case: "case_c".into(),
                reason: "holds none of the weighted classes".into(),
            },
            SamplerError::NotFound("case x".into()),
            SamplerError::LimitExceeded {
                what: "batch",
                value: 2,
                limit: 1,
            },
        ];
        for err in &not_damage {
            assert_eq!(damage_key(err), None, "{err}");
        }
    }

    #[test]
    fn a_case_is_set_aside_once() {
        let aside = SetAside::new("ds", 4);
        assert_eq!(aside.generation(), 0);
        assert!(aside.insert(aside_case(2)));
        assert!(!aside.insert(SetAsideCase {
            reason: "another chunk".into(),
            ..aside_case(2)
        }));
        assert_eq!(aside.generation(), 1);
        assert_eq!(aside.cases(), vec![aside_case(2)]);
        let wire = aside.wire();
        assert_eq!(wire.len(), 1);
        assert_eq!(wire[0].id, "case_c");
        assert_eq!(wire[0].case_index, 2);
        assert_eq!(wire[0].reason, aside_case(2).reason);
        assert!(aside.insert(aside_case(0)));
        let ids: Vec<String> = aside.cases().into_iter().map(|c| c.id).collect();
        assert_eq!(ids, ["case_a", "case_c"]);
    }

    #[test]
    fn served_requests_follow_the_set_aside_cases() {
        let aside = SetAside::new("ds", 4);
        let all = ServedRequest::new(request(None), &aside).unwrap();
        let shard = ServedRequest::new(request(Some(vec![0, 2])), &aside).unwrap();
        let before = shard.current(&aside).unwrap();
        assert_eq!(all.current(&aside).unwrap().cases, None);
        assert!(aside.insert(aside_case(1)));
        let narrowed = all.current(&aside).unwrap();
        assert_eq!(narrowed.cases, Some(vec![0, 2, 3]));
        assert_eq!(narrowed.patch, all.base().patch);
        assert_eq!(all.base().cases, None);
        // A shard without the set-aside case keeps its request, and so its sequence.
        assert!(Arc::ptr_eq(&before, &shard.current(&aside).unwrap()));
        // A request made after the change starts narrowed; one that cannot be served is refused.
        assert_eq!(
            ServedRequest::new(request(None), &aside)
                .unwrap()
                .current(&aside)
                .unwrap()
                .cases,
            Some(vec![0, 2, 3])
        );
        let only_b = ServedRequest::new(request(Some(vec![1])), &aside).err();
        assert_eq!(only_b.map(|s| s.code()), Some(Code::FailedPrecondition));
        // A stream whose whole shard goes away fails at its next batch.
        assert!(aside.insert(aside_case(0)));
        assert!(aside.insert(aside_case(2)));
        let status = Status::from(shard.current(&aside).unwrap_err());
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("case_a"), "{}", status.message());
    }

    proptest! {
        #[test]
        fn narrowing_keeps_exactly_the_cases_in_service(
            num_cases in 1usize..12,
            aside_bits in any::<u16>(),
            list in proptest::option::of(proptest::collection::vec(0usize..12, 1..20)),
        ) {
            let requested: Option<Vec<usize>> =
                list.map(|l| l.into_iter().map(|c| c % num_cases).collect());
            let aside: BTreeMap<usize, SetAsideCase> = (0..num_cases)
                .filter(|c| aside_bits & (1 << c) != 0)
                .map(|c| (c, SetAsideCase { index: c, ..aside_case(0) }))
                .collect();
            let result = narrow_cases("ds", num_cases, requested.as_deref(), &aside);
            let pool: Vec<usize> = requested.clone().unwrap_or_else(|| (0..num_cases).collect());
            let want: Vec<usize> =
                pool.iter().copied().filter(|c| !aside.contains_key(c)).collect();
            match result {
                Ok(narrowed) => {
                    let got = narrowed.clone().unwrap_or_else(|| (0..num_cases).collect());
                    prop_assert_eq!(&got, &want);
                    prop_assert!(!got.is_empty());
                    if aside.is_empty() {
                        prop_assert_eq!(narrowed, requested);
                    }
                }
                Err(status) => {
                    prop_assert!(want.is_empty());
                    let every = aside.len() == num_cases;
                    let code = if every { Code::DataLoss } else { Code::FailedPrecondition };
                    prop_assert_eq!(status.code(), code);
                }
            }
        }
    }
}

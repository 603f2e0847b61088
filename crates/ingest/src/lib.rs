//! The ingest pipeline: discovers cases, plans the dataset, preprocesses in parallel and writes
//! the store; or stores nnU-Net's own preprocessed folder as it is (`nnunet` module).
//!
//! It owns which files form a case, the dataset plan and the runs that write a store. It must not
//! define the file format (the store's) or image processing (the volume crate's), and serves
//! nothing.
//!
//! `patchflow ingest` is a thin wrapper over [`ingest`] and [`watch`]; `patchflow inspect` over
//! [`inspect()`]. The volume crate knows images, the store crate knows the file format; this crate
//! knows datasets: which files form a case, the plan shared by all cases, what is already done,
//! and how to report what happened.

mod discover;
mod error;
pub mod inspect;
mod nnunet;
mod options;
mod pipeline;
mod plan;
mod session;
mod watch;

pub use discover::{CaseSource, DatasetSource, InputKind, discover, sanitize_id};
pub use error::IngestError;
pub use inspect::{StoreReport, inspect, render_text, verify};
pub use nnunet::NnunetStorePlan;
pub use options::{CaseOutcome, IngestOptions, IngestReport, ZSTD_LEVELS};
pub use pipeline::{SourceRecord, ingest};
pub use plan::{CtPlan, DatasetPlan, MaskForNorm, PlanSettings};
pub use watch::watch;

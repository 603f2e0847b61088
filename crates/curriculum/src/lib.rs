//! The Progressive Growing of Patch Size (PGPS) schedules and their baselines, as pure
//! functions.
//!
//! It owns which patch size and batch size are in force at any epoch or iteration, and nnU-Net's
//! pooling rule they derive from. It must not do I/O, depend on a tensor library or know how
//! patches are served.
//!
//! Trainers, the daemon, the command line and the Python binding all need to agree on which
//! patch size and batch size are in force at any epoch (or, for random patch-size sampling, any
//! iteration). This crate is that single source of truth. It does no I/O and has no tensor
//! dependency, so the storage daemon can link it without libtorch.
//!
//! * [`Schedule::build`] turns the planned patch, the network's pooling counts, the epoch count,
//!   the planned batch and a [`Mode`] into stages: the authors' [`Mode::Pgps`] and
//!   [`Mode::PgpsPlus`], the journal's [`Mode::PgpsPerformance`], the [`Mode::Rpss`] ablation
//!   (random patch-size sampling) and the [`Mode::Constant`] nnU-Net baseline. A schedule
//!   answers [`Schedule::stage_for`] an epoch and [`Schedule::step_at`] an iteration, lists its
//!   [`Schedule::sizes`], its [`Schedule::relative_cost`], and prints as JSON or a table.
//! * [`plan_pooling`] reproduces nnU-Net v2's choice of poolings and kernels for a patch and a
//!   spacing, which fixes the smallest patch PGPS starts from and its growth step.
//!
//! The schedules follow the authors' published trainers (compai-lab/2024-miccai-fischer);
//! [`Schedule`] lists the rules and the few places where this crate departs from that code on
//! purpose. Arrays are `[z, y, x]`; patches are [`patchflow_grid::Patch`].

mod error;
pub mod patch_serde;
mod pooling;
mod schedule;
#[cfg(test)]
mod schedule_tests;

pub use error::CurriculumError;
pub use pooling::{MIN_FEATURE_MAP_EDGE, NO_POOL_CAP, PoolingPlan, plan_pooling};
pub use schedule::{
    CURRICULUM_FOREGROUND_OVERSAMPLE, MAX_POOLS, Mode, NNUNET_FOREGROUND_OVERSAMPLE, Schedule,
    Stage, Step, parse_pools, pgps_minimum, pgps_patch_sizes, pgps_stage_count,
};

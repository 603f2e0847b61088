//! The Progressive Growing of Patch Size (PGPS) schedule and its baselines, as pure functions.
//!
//! Trainers, the daemon and the command line all need to agree on which patch size and batch
//! size are in force at any epoch (or, for random patch-size sampling, any iteration). This
//! crate is that single source of truth. It does no I/O and has no tensor dependency, so the
//! storage daemon can link it without libtorch.
//!
//! * [`Schedule::build`] turns the planned patch, the network's pooling counts, the epoch count
//!   and the planned batch into stages, for [`Mode::PgpsEfficiency`],
//!   [`Mode::PgpsPerformance`], the [`Mode::Constant`] nnU-Net baseline and the
//!   [`Mode::Rpss`] ablation (random patch-size sampling, see [`rpss_stage`]).
//! * [`plan_pooling`] reproduces nnU-Net v2's choice of poolings and kernels for a patch and a
//!   spacing, which fixes the smallest patch PGPS starts from.
//!
//! The schedule follows the authors' reference trainers (Fischer et al., MICCAI 2024, and the
//! journal extension's `plan_batch_size`); [`pgps_patch_sizes`] documents the growth rule and
//! the two edge cases where this crate makes the reference's implicit behaviour explicit.
//! Arrays are `[z, y, x]`.

mod error;
mod pooling;
mod schedule;
#[cfg(test)]
mod schedule_tests;

pub use error::CurriculumError;
pub use pooling::{MIN_FEATURE_MAP_EDGE, NO_POOL_CAP, PoolingPlan, plan_pooling};
pub use schedule::{
    MAX_PATCH_AXIS, MAX_POOLS, Mode, Schedule, Stage, min_patch, parse_pools, parse_triplet,
    pgps_patch_sizes, pgps_stage_count, rpss_stage,
};

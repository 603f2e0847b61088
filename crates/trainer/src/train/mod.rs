//! The training run: its configuration ([`TrainConfig`]), the loop that lets the PGPS schedule
//! drive the batch stream while nnU-Net's optimiser trains the U-Net and validation runs at the
//! final patch ([`train`], [`time_stages`]), and what it leaves in its output folder (metrics,
//! plot, checkpoints, predictions, [`RunSummary`]) with the comparison of several runs
//! ([`compare_runs`]).
//!
//! Modules depend one way: `config` and `report` on nothing here, `step` on `config`, `run` on
//! the three.

mod config;
mod report;
mod run;
mod step;

pub use config::TrainConfig;
pub(crate) use report::write_json;
pub use report::{
    BEST_CHECKPOINT_DIR, CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE, PREDICTIONS_DIR, RunSummary,
    STAGE_TIMING_FILE, SUMMARY_FILE, StageTiming, compare_runs, stage_checkpoint_dir,
};
pub use run::{VALIDATION_STREAM, time_stages, time_steps, train};

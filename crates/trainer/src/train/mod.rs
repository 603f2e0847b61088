//! The training run: its configuration ([`TrainConfig`]), the loop that lets the PGPS schedule
//! drive the batch stream while nnU-Net's optimiser trains the U-Net and validation runs at the
//! final patch ([`train`], [`time_stages`]), and what it leaves in its output folder (metrics,
//! plot, checkpoints, predictions, [`RunSummary`]) with the comparison of several runs
//! ([`compare_runs`]).
//!
//! Modules depend one way: `config` on nothing here, `report` on nothing here, `run` on both.

mod config;
mod report;
mod run;

pub use config::TrainConfig;
pub use report::{
    CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE, PREDICTIONS_DIR, RunSummary, STAGE_TIMING_FILE,
    SUMMARY_FILE, StageTiming, compare_runs,
};
pub use run::{time_stages, train};

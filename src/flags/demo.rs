//! `patchflow demo`: its arguments and the [`DemoConfig`] they resolve to.

use std::path::PathBuf;

use clap::Args;
use patchflow_demo::DemoConfig;
use patchflow_grid::Patch;

use super::extent;

/// `patchflow demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for everything the demo writes (raw dataset, store, report).
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Phantom cases to generate.
    #[arg(long, default_value_t = 6)]
    pub cases: usize,
    /// Phantom shape z,y,x.
    #[arg(long, value_parser = extent, default_value = "64,96,96")]
    pub shape: [usize; 3],
    /// The trainer binary [default: patchflow-train next to this binary]. Without it the demo
    /// stops after ingest.
    #[arg(long)]
    pub train_bin: Option<PathBuf>,
    /// Training epochs of the demo run.
    #[arg(long, default_value_t = 24)]
    pub epochs: usize,
    /// Iterations per epoch of the demo run.
    #[arg(long, default_value_t = 50)]
    pub iters_per_epoch: usize,
    /// Share of crops centred on a foreground class. All by default: the phantom's small classes
    /// (kidney, bone, lesion: 0.1–0.7% of the voxels each) are then learned within the demo's
    /// few minutes; with nnU-Net's 0.33 only the liver is.
    #[arg(long, default_value_t = 1.0)]
    pub oversample: f64,
    /// Final patch z,y,x of the demo run (PGPS grows towards it).
    #[arg(long, default_value = "32,64,64")]
    pub final_patch: Patch,
}

impl DemoArgs {
    /// The demo's configuration, with progress bars when `progress`.
    pub fn config(self, progress: bool) -> DemoConfig {
        DemoConfig {
            out: self.out,
            cases: self.cases,
            shape: self.shape,
            train_bin: self.train_bin,
            epochs: self.epochs,
            iters_per_epoch: self.iters_per_epoch,
            oversample: self.oversample,
            final_patch: self.final_patch,
            progress,
        }
    }
}

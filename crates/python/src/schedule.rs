//! The PGPS schedule for Python, built and queried by `patchflow-curriculum` itself, so that a
//! Python training loop follows exactly the curriculum of the Rust trainer and of
//! `patchflow schedule`.

use std::str::FromStr;

use patchflow_curriculum::{Mode, Schedule};
use patchflow_grid::Patch;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{error, invalid};

/// The mode `name` names (`pgps-efficiency` is accepted for `pgps`).
fn parse_mode(name: &str) -> PyResult<Mode> {
    Mode::from_str(name).map_err(|e| invalid("mode", e.to_string()))
}

/// The names of every mode, in the curriculum crate's order (`Mode::ALL`).
#[pyfunction]
pub(crate) fn modes() -> Vec<&'static str> {
    Mode::ALL.map(Mode::name).to_vec()
}

/// The stage index random patch-size sampling uses at `iteration` under `seed`
/// (`Schedule::step_at` of an rpss schedule; the draw is `patchflow_grid::rng::uniform_index`).
#[pyfunction]
pub(crate) fn rpss_stage(schedule: &NativeSchedule, seed: u64, iteration: u64) -> usize {
    patchflow_grid::rng::uniform_index(seed, iteration, schedule.schedule.stages().len())
}

/// A patch-size curriculum for one training run.
#[pyclass(frozen, module = "patchflow._native")]
pub(crate) struct NativeSchedule {
    schedule: Schedule,
}

fn triplet<T: Copy>(v: [T; 3]) -> (T, T, T) {
    (v[0], v[1], v[2])
}

fn patch(p: Patch) -> (usize, usize, usize) {
    triplet(p.axes())
}

#[pymethods]
impl NativeSchedule {
    /// Builds the schedule (`Schedule::build`).
    #[new]
    fn new(
        final_patch: [usize; 3],
        pools: [u32; 3],
        epochs: usize,
        batch: usize,
        mode: &str,
    ) -> PyResult<NativeSchedule> {
        let mode = parse_mode(mode)?;
        let schedule = Schedule::build(final_patch, pools, epochs, batch, mode)
            .map_err(|e| error("InvalidArgument", &e.to_string(), None))?;
        Ok(NativeSchedule { schedule })
    }

    /// A schedule from the JSON text `to_json` (or `patchflow schedule --json`) wrote; its
    /// stages must be those the parameters give.
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<NativeSchedule> {
        let schedule: Schedule = serde_json::from_str(text)
            .map_err(|e| invalid("schedule", format!("not a valid schedule: {e}")))?;
        Ok(NativeSchedule { schedule })
    }

    /// The schedule as the JSON text `patchflow schedule --json` prints.
    fn to_json(&self) -> String {
        self.schedule.to_json().to_string()
    }

    /// The mode's name.
    #[getter]
    fn mode(&self) -> &'static str {
        self.schedule.mode().name()
    }

    /// The planned (final) patch.
    #[getter]
    fn final_patch(&self) -> (usize, usize, usize) {
        patch(self.schedule.final_patch())
    }

    /// Stride-2 poolings per axis.
    #[getter]
    fn pools(&self) -> (u32, u32, u32) {
        triplet(self.schedule.pools())
    }

    /// Epochs of the run.
    #[getter]
    fn epochs(&self) -> usize {
        self.schedule.epochs()
    }

    /// The planned batch.
    #[getter]
    fn planned_batch(&self) -> usize {
        self.schedule.planned_batch()
    }

    /// The stages as dicts: `patch`, `batch`, `first_epoch`, `epochs`, `crops_per_case`.
    #[getter]
    fn stages<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.schedule
            .stages()
            .iter()
            .map(|s| {
                let d = PyDict::new(py);
                d.set_item("patch", patch(s.patch))?;
                d.set_item("batch", s.batch)?;
                d.set_item("first_epoch", s.first_epoch)?;
                d.set_item("epochs", s.epochs)?;
                d.set_item("crops_per_case", s.crops_per_case)?;
                Ok(d)
            })
            .collect()
    }

    /// The distinct patch sizes of the PGPS growth, smallest first.
    #[getter]
    fn sizes(&self) -> Vec<(usize, usize, usize)> {
        self.schedule.sizes().iter().map(|&p| patch(p)).collect()
    }

    /// The share of foreground-centred crops this mode trains with (0.5 in every curriculum
    /// mode, as the authors' trainers set it; nnU-Net's 0.33 for `constant`).
    #[getter]
    fn foreground_oversample(&self) -> f64 {
        self.schedule.mode().foreground_oversample()
    }

    /// Expected voxels processed relative to the constant baseline.
    #[getter]
    fn relative_cost(&self) -> f64 {
        self.schedule.relative_cost()
    }

    /// Index of the stage in force at `epoch`.
    fn stage_index_for(&self, epoch: usize) -> usize {
        self.schedule.stage_index(epoch)
    }

    /// `(patch, batch)` at `epoch` and the run's global iteration `iteration` under `seed`.
    fn patch_for(&self, epoch: usize, iteration: u64, seed: u64) -> ((usize, usize, usize), usize) {
        let step = self.schedule.step_at(epoch, iteration, seed);
        (patch(step.patch), step.batch)
    }

    /// The human-readable table `patchflow schedule` prints.
    fn render_table(&self) -> String {
        self.schedule.render_table()
    }
}

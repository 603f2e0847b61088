//! What a run leaves in its output folder (the file names, [`RunSummary`], [`StageTiming`]) and
//! the comparison table of several runs ([`compare_runs`]).

use std::path::{Path, PathBuf};

use patchflow_curriculum::Mode;
use patchflow_grid::Patch;
use serde::{Deserialize, Serialize};

use crate::TrainerError;
use crate::checkpoint::RunIdentity;
use crate::eval::ValidationReport;
use crate::metrics::{StageSummary, render_table};

/// File names inside the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The plot.
pub const PLOT_FILE: &str = "plot.png";
/// The run summary.
pub const SUMMARY_FILE: &str = "summary.json";
/// The checkpoint folder (the latest; what `--resume` reads).
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// The checkpoint of the best moving average of the pseudo-Dice (nnU-Net's `checkpoint_best`).
pub const BEST_CHECKPOINT_DIR: &str = "checkpoint_best";
/// The predictions folder.
pub const PREDICTIONS_DIR: &str = "predictions";
/// The stage timing file.
pub const STAGE_TIMING_FILE: &str = "stage_timing.json";

/// The checkpoint folder written when the patch size `patch` ends: `checkpoint_ZxYxX`, as the
/// published PGPS trainers name theirs.
pub fn stage_checkpoint_dir(patch: Patch) -> String {
    format!("checkpoint_{}", patch.file_tag())
}

/// What a run produced; also written as `summary.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run: dataset, mode, epochs, patch, network, split and the other settings a
    /// checkpoint must match (its fields sit at the top level of `summary.json`).
    #[serde(flatten)]
    pub run: RunIdentity,
    /// Where batches came from.
    pub source: String,
    /// Device used (`cpu`, `cuda:0`).
    pub device: String,
    /// Whether bf16 autocast was on.
    pub autocast: bool,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Whether the run reached its last epoch.
    pub finished: bool,
    /// Scalar parameters of the network.
    pub parameters: i64,
    /// The schedule, as `patchflow schedule --json` prints it.
    pub schedule: serde_json::Value,
    /// Class names by class value.
    pub class_names: Vec<String>,
    /// Training seconds (iterations only) over all completed epochs.
    pub train_seconds: f64,
    /// Seconds spent waiting for batches.
    pub data_wait_seconds: f64,
    /// `data_wait_seconds / train_seconds`.
    pub data_wait_share: f64,
    /// Per stage.
    pub stages: Vec<StageSummary>,
    /// The best moving average of the pseudo-Dice (the weights in `checkpoint_best/`).
    #[serde(default)]
    pub best_ema_pseudo_dice: Option<f64>,
    /// The epoch (0-based) that reached it.
    #[serde(default)]
    pub best_epoch: Option<usize>,
    /// The last sliding-window validation, if any.
    pub validation: Option<ValidationReport>,
    /// `metrics.jsonl`.
    pub metrics: PathBuf,
    /// `plot.png`.
    pub plot: PathBuf,
    /// The checkpoint folder.
    pub checkpoint: PathBuf,
    /// The predictions folder (when exported).
    pub predictions: Option<PathBuf>,
}

/// Time per iteration at one schedule stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    /// Stage index.
    pub stage: usize,
    /// Patch (`[z, y, x]` in JSON).
    #[serde(with = "patchflow_curriculum::patch_serde")]
    pub patch: Patch,
    /// Batch size.
    pub batch: usize,
    /// Timed iterations (after warm-up).
    pub iterations: usize,
    /// Mean seconds per iteration (data wait included).
    pub seconds_per_iteration: f64,
    /// Share of the time spent waiting for data.
    pub data_wait_share: f64,
    /// Voxels trained per second.
    pub voxels_per_second: f64,
}

/// Writes `value` as pretty JSON.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainerError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainerError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text).map_err(|e| TrainerError::io(path, e))
}

/// Reads a JSON file written by a run.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TrainerError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainerError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })
}

/// The runs and stage timings found in `dirs`.
type Found = (Vec<(PathBuf, RunSummary)>, Vec<(PathBuf, Vec<StageTiming>)>);

/// Reads `summary.json` and `stage_timing.json` of every folder; a folder with neither is an
/// error.
fn read_runs(dirs: &[PathBuf]) -> Result<Found, TrainerError> {
    let mut runs = Vec::new();
    let mut timings = Vec::new();
    for d in dirs {
        let sp = d.join(SUMMARY_FILE);
        let tp = d.join(STAGE_TIMING_FILE);
        if !sp.exists() && !tp.exists() {
            return Err(TrainerError::config(
                "compare",
                format!(
                    "{} holds neither {SUMMARY_FILE} nor {STAGE_TIMING_FILE}",
                    d.display()
                ),
            ));
        }
        if sp.exists() {
            runs.push((d.clone(), read_json(&sp)?));
        }
        if tp.exists() {
            timings.push((d.clone(), read_json(&tp)?));
        }
    }
    Ok((runs, timings))
}

/// The comparison table of several runs (their output folders): per run the training time,
/// its ratio to the `constant` run (when one is among them), the data-wait share and the final
/// validation Dice; then, for every run folder that holds `stage_timing.json`, the time per
/// iteration at every stage.
pub fn compare_runs(dirs: &[PathBuf]) -> Result<String, TrainerError> {
    let (runs, timings) = read_runs(dirs)?;
    let labels = run_labels(&runs);
    let mut rows: Vec<Vec<String>> = vec![
        [
            "section",
            "run",
            "patch",
            "batch",
            "iters",
            "s/iter",
            "time s",
            "vs constant",
            "data wait",
            "val Dice",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (_, t) in &timings {
        rows.extend(t.iter().map(timing_row));
    }
    for ((_, s), label) in runs.iter().zip(&labels) {
        rows.extend(s.stages.iter().map(|st| stage_row(label, st)));
    }
    let baseline = runs
        .iter()
        .find(|(_, s)| s.run.mode == Mode::Constant.name())
        .map(|(_, s)| s.train_seconds);
    for ((_, s), label) in runs.iter().zip(&labels) {
        rows.push(total_row(label, s, baseline));
    }
    let left = [
        true, true, true, false, false, false, false, false, false, false,
    ];
    let mut text = render_table(&rows, &left);
    if let Some((_, s)) = runs.first() {
        text.push_str(&format!(
            "dataset {}, device {}, {} epochs × {} iterations, val Dice = mean foreground Dice \
             over {} held-out case(s)\n",
            s.run.dataset,
            s.device,
            s.run.epochs,
            s.run.iters_per_epoch,
            s.run.val_cases.len()
        ));
    }
    Ok(text)
}

/// A row of a stage-timing pass.
fn timing_row(st: &StageTiming) -> Vec<String> {
    vec![
        "stage timing".into(),
        format!("stage {}", st.stage),
        st.patch.to_string(),
        st.batch.to_string(),
        st.iterations.to_string(),
        format!("{:.4}", st.seconds_per_iteration),
        "".into(),
        "".into(),
        format!("{:.1}%", 100.0 * st.data_wait_share),
        "".into(),
    ]
}

/// A row of one stage of a run.
fn stage_row(label: &str, st: &StageSummary) -> Vec<String> {
    vec![
        format!("{label} stages"),
        format!("stage {}", st.stage),
        st.patch.to_string(),
        st.batch.to_string(),
        st.iterations.to_string(),
        format!("{:.4}", st.seconds_per_iteration),
        format!("{:.1}", st.seconds),
        "".into(),
        format!("{:.1}%", 100.0 * st.data_wait_share),
        "".into(),
    ]
}

/// The total row of a run; `baseline` is the constant run's training time.
fn total_row(label: &str, s: &RunSummary, baseline: Option<f64>) -> Vec<String> {
    let iters = s.epochs_done * s.run.iters_per_epoch;
    let ratio = baseline
        .filter(|&b| b > 0.0)
        .map_or("".to_string(), |b| format!("{:.2}", s.train_seconds / b));
    let dice = s
        .validation
        .as_ref()
        .and_then(|v| v.mean_foreground_dice)
        .map_or("n/a".to_string(), |d| format!("{d:.4}"));
    vec![
        "total".into(),
        label.to_string(),
        s.run.final_patch.to_string(),
        s.run.batch.to_string(),
        iters.to_string(),
        format!("{:.4}", s.train_seconds / iters.max(1) as f64),
        format!("{:.1}", s.train_seconds),
        ratio,
        format!("{:.1}%", 100.0 * s.data_wait_share),
        dice,
    ]
}

/// A name per run for the comparison table: its mode, followed by its folder's name where
/// several runs share the mode (e.g. the same curriculum fed in process and by a daemon).
fn run_labels(runs: &[(PathBuf, RunSummary)]) -> Vec<String> {
    runs.iter()
        .map(|(dir, s)| {
            let shared = runs
                .iter()
                .filter(|(_, o)| o.run.mode == s.run.mode)
                .count()
                > 1;
            match dir.file_name() {
                Some(name) if shared => format!("{} ({})", s.run.mode, name.to_string_lossy()),
                _ => s.run.mode.clone(),
            }
        })
        .collect()
}

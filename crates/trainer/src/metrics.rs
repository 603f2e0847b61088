//! Per-epoch metrics, their JSON-lines log, per-stage summaries and the comparison table of
//! several runs.

use std::io::Write;
use std::path::Path;

use patchflow_grid::Patch;
use serde::{Deserialize, Serialize};

use crate::TrainerError;

/// One line of `metrics.jsonl`: what happened in one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Index of the schedule stage in force (in `rpss`, the last stage's index).
    pub stage: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean training loss over the epoch's iterations.
    pub loss: f64,
    /// Patch of the epoch's first iteration (`[z, y, x]` in JSON).
    #[serde(with = "patchflow_curriculum::patch_serde")]
    pub patch: Patch,
    /// Batch size of the epoch's first iteration.
    pub batch: usize,
    /// Mean voxels per patch over the epoch (differs from `patch` only in `rpss`).
    pub mean_patch_voxels: f64,
    /// Iterations run.
    pub iterations: usize,
    /// Wall time of the training iterations (validation excluded).
    pub seconds: f64,
    /// Time spent waiting for batches.
    pub data_wait_seconds: f64,
    /// `data_wait_seconds / seconds`.
    pub data_wait_share: f64,
    /// Validation Dice per class (index = class value; `null` where undefined), when the epoch
    /// was validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_dice: Option<Vec<Option<f64>>>,
    /// Mean foreground validation Dice, when validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_mean_fg_dice: Option<f64>,
    /// Wall time of the validation, when validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_seconds: Option<f64>,
    /// Mean loss over the epoch's validation batches (final patch, planned batch), when there
    /// were any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// nnU-Net's pseudo-Dice per class over the epoch's validation batches (index = class
    /// value; background and classes absent from prediction and reference are `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pseudo_dice: Option<Vec<Option<f64>>>,
    /// Mean of the defined foreground pseudo-Dice values (nnU-Net's `mean_fg_dice`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_pseudo_dice: Option<f64>,
    /// Its exponential moving average, `0.9 × previous + 0.1 × this epoch's` (nnU-Net's
    /// `ema_fg_dice`, which chooses `checkpoint_best`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_pseudo_dice: Option<f64>,
}

/// Appends one record as a JSON line.
pub fn append_record(path: &Path, record: &EpochRecord) -> Result<(), TrainerError> {
    let mut line = serde_json::to_string(record).map_err(|e| TrainerError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainerError::io(path, e))?;
    f.write_all(line.as_bytes())
        .map_err(|e| TrainerError::io(path, e))
}

/// Reads `metrics.jsonl` (missing file: empty). Lines that do not parse are an error naming the
/// line.
pub fn read_records(path: &Path) -> Result<Vec<EpochRecord>, TrainerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainerError::io(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| TrainerError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!("line {}: {e}", i + 1)),
            })
        })
        .collect()
}

/// Rewrites `metrics.jsonl` with `records` (used on resume to drop epochs past the
/// checkpoint).
pub fn write_records(path: &Path, records: &[EpochRecord]) -> Result<(), TrainerError> {
    let mut text = String::new();
    for r in records {
        let line = serde_json::to_string(r).map_err(|e| TrainerError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| TrainerError::io(path, e))
}

/// nnU-Net's moving average of the pseudo-Dice: the first value as is, then
/// `0.9 × previous + 0.1 × value`. An epoch without a value (no foreground class defined) keeps the previous
/// average, where nnU-Net's would turn into NaN for the rest of the run.
pub fn pseudo_dice_ema(previous: Option<f64>, value: Option<f64>) -> Option<f64> {
    match (previous, value) {
        (Some(p), Some(v)) => Some(0.9 * p + 0.1 * v),
        (None, v) => v,
        (p, None) => p,
    }
}

/// Time and data wait of one schedule stage, summed over its epochs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// Stage index.
    pub stage: usize,
    /// Patch (`[z, y, x]` in JSON).
    #[serde(with = "patchflow_curriculum::patch_serde")]
    pub patch: Patch,
    /// Batch size.
    pub batch: usize,
    /// Epochs trained in the stage.
    pub epochs: usize,
    /// Iterations trained in the stage.
    pub iterations: usize,
    /// Training seconds.
    pub seconds: f64,
    /// Mean seconds per iteration.
    pub seconds_per_iteration: f64,
    /// Share of the time spent waiting for data.
    pub data_wait_share: f64,
}

/// Groups epoch records by stage.
pub fn stage_summaries(records: &[EpochRecord]) -> Vec<StageSummary> {
    let mut out: Vec<StageSummary> = Vec::new();
    let mut waits: Vec<f64> = Vec::new();
    for r in records {
        match out.last_mut() {
            Some(s) if s.stage == r.stage => {
                s.epochs += 1;
                s.iterations += r.iterations;
                s.seconds += r.seconds;
                if let Some(w) = waits.last_mut() {
                    *w += r.data_wait_seconds;
                }
            }
            _ => {
                out.push(StageSummary {
                    stage: r.stage,
                    patch: r.patch,
                    batch: r.batch,
                    epochs: 1,
                    iterations: r.iterations,
                    seconds: r.seconds,
                    seconds_per_iteration: 0.0,
                    data_wait_share: 0.0,
                });
                waits.push(r.data_wait_seconds);
            }
        }
    }
    for (s, w) in out.iter_mut().zip(&waits) {
        s.seconds_per_iteration = if s.iterations > 0 {
            s.seconds / s.iterations as f64
        } else {
            0.0
        };
        s.data_wait_share = if s.seconds > 0.0 { w / s.seconds } else { 0.0 };
    }
    out
}

/// Formats rows as a plain-text table: the first row is the header; columns are left-aligned
/// where `left[i]`, right-aligned otherwise.
pub fn render_table(rows: &[Vec<String>], left: &[bool]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (r, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let w = widths[i];
            let pad = w - cell.chars().count();
            if i > 0 {
                line.push_str("  ");
            }
            if left.get(i).copied().unwrap_or(false) {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if r == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * cols.saturating_sub(1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: usize, stage: usize, secs: f64, wait: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            stage,
            lr: 0.01,
            loss: 1.0,
            patch: Patch::cube(8).unwrap(),
            batch: 2,
            mean_patch_voxels: 512.0,
            iterations: 10,
            seconds: secs,
            data_wait_seconds: wait,
            data_wait_share: wait / secs,
            val_dice: None,
            val_mean_fg_dice: None,
            val_seconds: None,
            val_loss: None,
            pseudo_dice: None,
            mean_pseudo_dice: None,
            ema_pseudo_dice: None,
        }
    }

    #[test]
    fn records_round_trip_and_group_by_stage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        let mut r = rec(0, 0, 2.0, 1.0);
        r.val_dice = Some(vec![Some(0.9), None]);
        r.pseudo_dice = Some(vec![None, Some(0.5)]);
        r.mean_pseudo_dice = Some(0.5);
        r.ema_pseudo_dice = Some(0.5);
        append_record(&p, &r).unwrap();
        append_record(&p, &rec(1, 0, 2.0, 0.0)).unwrap();
        append_record(&p, &rec(2, 1, 4.0, 1.0)).unwrap();
        let back = read_records(&p).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[0], r);
        let s = stage_summaries(&back);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].epochs, 2);
        assert_eq!(s[0].iterations, 20);
        assert!((s[0].seconds_per_iteration - 0.2).abs() < 1e-12);
        assert!((s[0].data_wait_share - 0.25).abs() < 1e-12);
        write_records(&p, &back[..1]).unwrap();
        assert_eq!(read_records(&p).unwrap().len(), 1);
    }

    #[test]
    fn ema_follows_nnunet() {
        assert_eq!(pseudo_dice_ema(None, None), None);
        assert_eq!(pseudo_dice_ema(None, Some(0.5)), Some(0.5));
        let e = pseudo_dice_ema(Some(0.5), Some(1.0)).unwrap();
        assert!((e - 0.55).abs() < 1e-15);
        assert_eq!(pseudo_dice_ema(Some(0.5), None), Some(0.5));
    }

    #[test]
    fn table_aligns_columns() {
        let t = render_table(
            &[
                vec!["name".into(), "value".into()],
                vec!["a".into(), "1.5".into()],
                vec!["long name".into(), "10".into()],
            ],
            &[true, false],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "name       value");
        assert_eq!(lines[2], "a            1.5");
        assert_eq!(lines[3], "long name     10");
    }
}

//! The training-report plot: loss, pseudo-Dice on validation patches, sliding-window validation
//! Dice, patch size, batch size and time per epoch, one panel each, as a PNG (drawn by
//! [`patchflow_plot`]).

use std::path::Path;

use patchflow_plot::{BLACK_LINE, PALETTE, Panel, Series, draw_panels};

use crate::TrainerError;
use crate::metrics::EpochRecord;

pub use patchflow_plot::plot_font;

/// A panel over epochs.
fn panel(title: &str, series: Vec<Series>, markers: bool) -> Panel {
    Panel {
        title: title.to_owned(),
        x_desc: "epoch".to_owned(),
        series,
        markers,
        y_from_zero: false,
    }
}

/// One series per foreground class of the per-class values `per_class` gives, and a black one
/// for the summary value `summary` gives (named by it), over the epochs that have them.
fn dice_series(
    records: &[EpochRecord],
    class_names: &[String],
    per_class: &dyn Fn(&EpochRecord) -> Option<&Vec<Option<f64>>>,
    summary: &dyn Fn(&EpochRecord) -> Option<(&'static str, f64)>,
) -> Vec<Series> {
    let x = |r: &EpochRecord| r.epoch as f64 + 1.0;
    let classes = records
        .iter()
        .filter_map(|r| per_class(r).map(Vec::len))
        .max()
        .unwrap_or(0);
    let mut out = Vec::new();
    for c in 1..classes {
        let pts: Vec<(f64, f64)> = records
            .iter()
            .filter_map(|r| {
                per_class(r)
                    .and_then(|d| d.get(c).copied().flatten())
                    .map(|v| (x(r), v))
            })
            .collect();
        if !pts.is_empty() {
            let name = class_names.get(c).map_or("class", String::as_str);
            out.push(Series::new(name, PALETTE[(c - 1) % PALETTE.len()], pts));
        }
    }
    let pts: Vec<(&str, f64, f64)> = records
        .iter()
        .filter_map(|r| summary(r).map(|(n, v)| (n, x(r), v)))
        .collect();
    if let Some(&(name, _, _)) = pts.first() {
        let pts = pts.iter().map(|&(_, x, v)| (x, v)).collect();
        out.push(Series::new(name, BLACK_LINE, pts));
    }
    out
}

/// Draws the report plot of `records` into `path` (PNG, 1000 px wide). `class_names` label the
/// Dice series (index = class value; background is not drawn).
pub fn write_plot(
    path: &Path,
    records: &[EpochRecord],
    class_names: &[String],
    title: &str,
) -> Result<(), TrainerError> {
    let x = |r: &EpochRecord| r.epoch as f64 + 1.0;
    let series = |f: &dyn Fn(&EpochRecord) -> f64| -> Vec<(f64, f64)> {
        records.iter().map(|r| (x(r), f(r))).collect()
    };
    let dice = dice_series(records, class_names, &|r| r.val_dice.as_ref(), &|r| {
        r.val_mean_fg_dice.map(|v| ("mean", v))
    });
    let pseudo = dice_series(records, class_names, &|r| r.pseudo_dice.as_ref(), &|r| {
        r.ema_pseudo_dice.map(|v| ("EMA of the mean", v))
    });
    let panels = [
        panel(
            "training loss",
            vec![Series::new("loss", PALETTE[0], series(&|r| r.loss))],
            false,
        ),
        panel(
            "pseudo Dice (validation patches at the final size)",
            pseudo,
            false,
        ),
        panel("validation Dice (sliding window)", dice, true),
        panel(
            "patch size (cube root of voxels)",
            vec![Series::new(
                "patch edge",
                PALETTE[2],
                series(&|r| r.mean_patch_voxels.cbrt()),
            )],
            false,
        ),
        panel(
            "batch size",
            vec![Series::new(
                "batch",
                PALETTE[3],
                series(&|r| r.batch as f64),
            )],
            false,
        ),
        panel(
            "seconds per epoch",
            vec![
                Series::new("train", PALETTE[4], series(&|r| r.seconds)),
                Series::new("data wait", PALETTE[1], series(&|r| r.data_wait_seconds)),
            ],
            false,
        ),
    ];
    draw_panels(path, title, &panels, 1000).map_err(|e| TrainerError::Plot {
        path: e.path,
        reason: e.reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.png");
        let records: Vec<EpochRecord> = (0..6)
            .map(|e| EpochRecord {
                epoch: e,
                stage: e / 2,
                lr: 0.01,
                loss: 1.0 / (e + 1) as f64,
                patch: patchflow_grid::Patch::new([8 * (1 + e / 2), 16, 16]).unwrap(),
                batch: 2,
                mean_patch_voxels: (8 * (1 + e / 2) * 256) as f64,
                iterations: 5,
                seconds: 1.0 + e as f64,
                data_wait_seconds: 0.1,
                data_wait_share: 0.1,
                val_dice: (e % 2 == 1).then(|| vec![Some(0.99), Some(0.5), None]),
                val_mean_fg_dice: (e % 2 == 1).then_some(0.5),
                val_seconds: None,
                val_loss: Some(0.5),
                pseudo_dice: Some(vec![None, Some(0.4), None]),
                mean_pseudo_dice: Some(0.4),
                ema_pseudo_dice: Some(0.4),
            })
            .collect();
        let names = vec!["background".into(), "liver".into(), "lesion".into()];
        write_plot(&path, &records, &names, "test run").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 1000);
        // Empty history still gives a plot.
        write_plot(&path, &[], &names, "empty").unwrap();
    }
}

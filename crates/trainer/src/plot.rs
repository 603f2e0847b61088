//! The training-report plot: loss, validation Dice, patch size, batch size and time per epoch,
//! one panel each, as a PNG.
//!
//! Text needs a font. The plot uses a TrueType font from the system when one is found (common
//! locations of DejaVu, Liberation, Noto, ...; or the file named by `PATCHFLOW_PLOT_FONT`), and
//! otherwise draws the same panels without any text, so that a bare machine still gets a plot.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::TrainerError;
use crate::metrics::EpochRecord;

/// Font family name the plot registers its font under.
const FAMILY: &str = "sans-serif";

/// Fonts tried, in order, before a search of the usual font folders.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Finds a `.ttf` file under `dir`, at most `depth` folders deep.
fn find_ttf(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in &entries {
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")) && p.is_file() {
            return Some(p.clone());
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| find_ttf(p, depth - 1))
}

/// Registers a system font with the plotting library once; returns the file used, if any.
pub fn plot_font() -> Option<&'static Path> {
    FONT.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("PATCHFLOW_PLOT_FONT") {
            candidates.push(PathBuf::from(p));
        }
        candidates.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        for dir in ["/usr/share/fonts", "/usr/local/share/fonts"] {
            if let Some(p) = find_ttf(Path::new(dir), 4) {
                candidates.push(p);
            }
        }
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // The plotting library keeps fonts for the process's lifetime; leaking the one
            // font file read here is that lifetime made explicit.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                tracing::debug!(font = %path.display(), "plot font registered");
                return Some(path);
            }
        }
        tracing::info!("no TrueType font found: the plot is drawn without text");
        None
    })
    .as_deref()
}

/// A named, coloured series of `(epoch, value)` points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// One panel: a title and one or more series.
struct Panel<'a> {
    title: &'a str,
    series: Vec<Series<'a>>,
    points: bool,
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> TrainerError {
    TrainerError::Plot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Draws the report plot of `records` into `path` (PNG, 1000 px wide). `class_names` label the
/// Dice series (index = class value; background is not drawn).
pub fn write_plot(
    path: &Path,
    records: &[EpochRecord],
    class_names: &[String],
    title: &str,
) -> Result<(), TrainerError> {
    let text = plot_font().is_some();
    let x = |r: &EpochRecord| r.epoch as f64 + 1.0;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];

    let loss = records.iter().map(|r| (x(r), r.loss)).collect();
    let classes = records
        .iter()
        .filter_map(|r| r.val_dice.as_ref().map(Vec::len))
        .max()
        .unwrap_or(0);
    let mut dice_series = Vec::new();
    for c in 1..classes {
        let pts: Vec<(f64, f64)> = records
            .iter()
            .filter_map(|r| {
                r.val_dice
                    .as_ref()
                    .and_then(|d| d.get(c).copied().flatten())
                    .map(|v| (x(r), v))
            })
            .collect();
        if !pts.is_empty() {
            let name = class_names.get(c).map_or("class", String::as_str);
            dice_series.push((name, palette[(c - 1) % palette.len()], pts));
        }
    }
    let mean: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.val_mean_fg_dice.map(|v| (x(r), v)))
        .collect();
    if !mean.is_empty() {
        dice_series.push(("mean", BLACK, mean));
    }
    let patch = records
        .iter()
        .map(|r| (x(r), r.mean_patch_voxels.cbrt()))
        .collect();
    let batch = records.iter().map(|r| (x(r), r.batch as f64)).collect();
    let secs = records.iter().map(|r| (x(r), r.seconds)).collect();
    let wait = records
        .iter()
        .map(|r| (x(r), r.data_wait_seconds))
        .collect();
    let panels = [
        Panel {
            title: "training loss",
            series: vec![("loss", palette[0], loss)],
            points: false,
        },
        Panel {
            title: "validation Dice",
            series: dice_series,
            points: true,
        },
        Panel {
            title: "patch size (cube root of voxels)",
            series: vec![("patch edge", palette[2], patch)],
            points: false,
        },
        Panel {
            title: "batch size",
            series: vec![("batch", palette[3], batch)],
            points: false,
        },
        Panel {
            title: "seconds per epoch",
            series: vec![("train", palette[4], secs), ("data wait", palette[1], wait)],
            points: false,
        },
    ];

    let height = 240 * panels.len() as u32 + if text { 40 } else { 0 };
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let body = if text {
        let (top, rest) = root.split_vertically(40);
        top.draw(&Text::new(
            title.to_string(),
            (10, 10),
            (FAMILY, 20).into_font().color(&BLACK),
        ))
        .map_err(|e| plot_err(path, e))?;
        rest
    } else {
        root.clone()
    };
    let areas = body.split_evenly((panels.len(), 1));
    let x_max = records.iter().map(x).fold(1.0, f64::max);
    for (area, panel) in areas.iter().zip(&panels) {
        let all: Vec<f64> = panel
            .series
            .iter()
            .flat_map(|(_, _, p)| p.iter().map(|&(_, v)| v))
            .filter(|v| v.is_finite())
            .collect();
        let (mut lo, mut hi) = all
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-9 {
            lo -= 0.5;
            hi += 0.5;
        }
        let pad = 0.05 * (hi - lo);
        let mut builder = ChartBuilder::on(area);
        builder.margin(8);
        if text {
            builder
                .caption(panel.title, (FAMILY, 16))
                .x_label_area_size(28)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..x_max + 0.5, (lo - pad)..(hi + pad))
            .map_err(|e| plot_err(path, e))?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(RGBColor(235, 235, 235));
        if text {
            mesh.x_desc("epoch").label_style((FAMILY, 12));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| plot_err(path, e))?;
        for (name, color, pts) in &panel.series {
            let color = *color;
            let s = chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?;
            if text {
                s.label(*name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            }
            if panel.points {
                chart
                    .draw_series(
                        pts.iter()
                            .map(|&(px, py)| Circle::new((px, py), 3, color.filled())),
                    )
                    .map_err(|e| plot_err(path, e))?;
            }
        }
        if text && !panel.series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(RGBColor(200, 200, 200))
                .label_font((FAMILY, 12))
                .draw()
                .map_err(|e| plot_err(path, e))?;
        }
    }
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
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
                patch: [8 * (1 + e / 2), 16, 16],
                batch: 2,
                mean_patch_voxels: (8 * (1 + e / 2) * 256) as f64,
                iterations: 5,
                seconds: 1.0 + e as f64,
                data_wait_seconds: 0.1,
                data_wait_share: 0.1,
                val_dice: (e % 2 == 1).then(|| vec![Some(0.99), Some(0.5), None]),
                val_mean_fg_dice: (e % 2 == 1).then_some(0.5),
                val_seconds: None,
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

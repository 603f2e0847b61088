//! PNG line charts for patchflow's reports.
//!
//! It owns chart drawing only. It must not read patchflow's data or reports: callers hand it
//! named series.
//!
//! Both the training report (loss, Dice, patch size per epoch) and `patchflow bench` (patches
//! per second by patch size) end in a picture that a user opens next to the numbers. This crate
//! draws such pictures — a stack of panels, each a set of named line series — without a
//! graphics stack: a bitmap backend and a TrueType font found on the system.
//!
//! Text needs a font. The chart uses a TrueType font from the system when one is found (common
//! locations of DejaVu, Liberation, Noto, ...; or the file named by `PATCHFLOW_PLOT_FONT`), and
//! otherwise draws the same panels without any text, so that a bare machine still gets a chart.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

pub use plotters::style::RGBColor;

/// Font family name the charts register their font under.
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

/// Line colours, in the order series are usually given them.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Black, for a series that summarises the others.
pub const BLACK_LINE: RGBColor = RGBColor(0, 0, 0);

/// A chart could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the chart {path}: {reason}")]
pub struct PlotError {
    /// The PNG file being written.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

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
        tracing::info!("no TrueType font found: charts are drawn without text");
        None
    })
    .as_deref()
}

/// A named, coloured line of `(x, y)` points.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Line colour.
    pub color: RGBColor,
    /// The points, in drawing order. Non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series named `name` in `color`.
    pub fn new(name: impl Into<String>, color: RGBColor, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            color,
            points,
        }
    }
}

/// One panel of a chart: a title, an x-axis description and one or more series.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Caption above the panel.
    pub title: String,
    /// Description under the x axis.
    pub x_desc: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Also mark every point with a dot (for sparse series).
    pub markers: bool,
    /// Start the y axis at zero (rates, sizes) instead of fitting it to the data.
    pub y_from_zero: bool,
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Range of the finite values of `values`, widened so that it is never empty.
fn value_range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-9 {
        lo -= 0.5;
        hi += 0.5;
    }
    (lo, hi)
}

/// Draws `panels` stacked vertically into the PNG file `path` (`width` pixels wide, 240 per
/// panel), under `title`.
pub fn draw_panels(
    path: &Path,
    title: &str,
    panels: &[Panel],
    width: u32,
) -> Result<(), PlotError> {
    let text = plot_font().is_some();
    let rows = u32::try_from(panels.len().max(1)).unwrap_or(u32::MAX);
    let height = 240u32
        .saturating_mul(rows)
        .saturating_add(if text { 40 } else { 0 });
    let root = BitMapBackend::new(path, (width.max(200), height)).into_drawing_area();
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
    let areas = body.split_evenly((panels.len().max(1), 1));
    for (area, panel) in areas.iter().zip(panels) {
        let points = || panel.series.iter().flat_map(|s| s.points.iter());
        let (x_lo, x_hi) = value_range(points().map(|p| p.0), false);
        let (y_lo, y_hi) = value_range(points().map(|p| p.1), panel.y_from_zero);
        let x_pad = 0.03 * (x_hi - x_lo);
        let y_pad = 0.05 * (y_hi - y_lo);
        let y_start = if panel.y_from_zero && y_lo >= 0.0 {
            y_lo
        } else {
            y_lo - y_pad
        };
        let mut builder = ChartBuilder::on(area);
        builder.margin(8);
        if text {
            builder
                .caption(&panel.title, (FAMILY, 16))
                .x_label_area_size(28)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d((x_lo - x_pad)..(x_hi + x_pad), y_start..(y_hi + y_pad))
            .map_err(|e| plot_err(path, e))?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(RGBColor(235, 235, 235));
        if text {
            mesh.x_desc(panel.x_desc.as_str()).label_style((FAMILY, 12));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| plot_err(path, e))?;
        for series in &panel.series {
            let color = series.color;
            let pts = || {
                series
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
            };
            let drawn = chart
                .draw_series(LineSeries::new(pts(), color.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?;
            if text {
                drawn.label(series.name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            }
            if panel.markers {
                chart
                    .draw_series(pts().map(|(px, py)| Circle::new((px, py), 3, color.filled())))
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
    fn chart_is_written_with_and_without_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let panels = vec![
            Panel {
                title: "rate".into(),
                x_desc: "edge".into(),
                series: vec![
                    Series::new("a", PALETTE[0], vec![(32.0, 900.0), (64.0, 300.0)]),
                    Series::new("b", PALETTE[1], vec![(32.0, f64::NAN), (64.0, 120.0)]),
                ],
                markers: true,
                y_from_zero: true,
            },
            Panel {
                title: "empty".into(),
                x_desc: "x".into(),
                series: Vec::new(),
                markers: false,
                y_from_zero: false,
            },
        ];
        draw_panels(&path, "test", &panels, 800).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 1000);
        draw_panels(&path, "nothing", &[], 400).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
    }

    #[test]
    fn ranges_are_never_empty() {
        assert_eq!(value_range([2.0, 2.0].into_iter(), false), (1.5, 2.5));
        assert_eq!(value_range([f64::NAN].into_iter(), false), (0.0, 1.0));
        assert_eq!(value_range([3.0, 5.0].into_iter(), true), (0.0, 5.0));
    }
}

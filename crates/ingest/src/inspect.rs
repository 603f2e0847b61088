//! `patchflow inspect`: what a store holds, for people (a table) and programs (one JSON document).
//!
//! The JSON document (`--json`) has these fields:
//! - `dataset` (string), `store` (path), `plan` (the dataset plan as stored in the manifest; its
//!   `mask_for_norm` holds nnU-Net's `use_mask_for_norm` decision: the
//!   `median_relative_size_after_cropping`, the `threshold` and `use_mask_for_norm` per channel
//!   name; for a store of nnU-Net's preprocessed folder nnU-Net's plan with `kind` `"nnunet"`,
//!   `patch_size`, `batch_size`, `num_pool_per_axis`, `transpose_forward`, ...: see
//!   `NnunetStorePlan`);
//! - `cases`: one object per case with `id`, `file`, `shape` `[z,y,x]`, `spacing` `[z,y,x]` mm,
//!   `original_shape` `[z,y,x]`, `original_spacing` `[z,y,x]`, `orientation` (e.g. `"RAS"`),
//!   `crop_box` (`[[start,end)]` per axis in original voxels), `channels` (`name`, `dtype`,
//!   `normalization`, `use_mask_for_norm`), `label_dtype`, `outside_mask_label` (the stored
//!   label value marking voxels outside nnU-Net's non-zero mask, served as label 0 and image 0;
//!   null when the case has none), `classes` (`value`, `name` or null, `voxels`; voxels outside
//!   the mask count as class 0),
//!   `raw_bytes` (preprocessed arrays uncompressed), `stored_bytes` (case file),
//!   `compression_ratio` (raw / stored), `input_bytes` (source NIfTI files; null if unknown);
//! - `total`: `cases`, `raw_bytes`, `stored_bytes`, `input_bytes`, `compression_ratio`,
//!   `size_vs_input` (stored / input).

use std::path::{Path, PathBuf};

use patchflow_store::{CaseReader, ChunkCache, Manifest};
use serde::Serialize;

use crate::IngestError;
use crate::pipeline::SourceRecord;

/// One channel of a case.
#[derive(Clone, Debug, Serialize)]
pub struct ChannelReport {
    /// Channel name (modality).
    pub name: String,
    /// Stored element type.
    pub dtype: String,
    /// Normalisation applied when serving.
    pub normalization: patchflow_volume::Normalization,
    /// Whether the channel was z-scored over nnU-Net's non-zero mask (and is served as 0
    /// outside it).
    pub use_mask_for_norm: bool,
}

/// One class of a case.
#[derive(Clone, Debug, Serialize)]
pub struct ClassReport {
    /// Class value.
    pub value: u16,
    /// Class name from the dataset, if named.
    pub name: Option<String>,
    /// Voxels of this class in the preprocessed label map.
    pub voxels: u64,
}

/// One case.
#[derive(Clone, Debug, Serialize)]
pub struct CaseReport {
    /// Case id.
    pub id: String,
    /// Case file, relative to the store.
    pub file: String,
    /// Preprocessed shape `[z, y, x]`.
    pub shape: [usize; 3],
    /// Preprocessed spacing `[z, y, x]` in mm.
    pub spacing: [f64; 3],
    /// Source shape `[z, y, x]`.
    pub original_shape: [usize; 3],
    /// Source spacing `[z, y, x]` in mm.
    pub original_spacing: [f64; 3],
    /// Source orientation code.
    pub orientation: String,
    /// Crop box in source voxels.
    pub crop_box: [[usize; 2]; 3],
    /// Image channels.
    pub channels: Vec<ChannelReport>,
    /// Label element type.
    pub label_dtype: String,
    /// Stored label value marking voxels outside nnU-Net's non-zero mask, if any.
    pub outside_mask_label: Option<u16>,
    /// Classes present with their voxel counts.
    pub classes: Vec<ClassReport>,
    /// Preprocessed bytes, uncompressed.
    pub raw_bytes: u64,
    /// Bytes of the case file.
    pub stored_bytes: u64,
    /// `raw_bytes / stored_bytes`.
    pub compression_ratio: f64,
    /// Bytes of the source files, when recorded.
    pub input_bytes: Option<u64>,
}

/// Totals over the reported cases.
#[derive(Clone, Debug, Serialize)]
pub struct TotalReport {
    /// Number of cases.
    pub cases: usize,
    /// Preprocessed bytes, uncompressed.
    pub raw_bytes: u64,
    /// Bytes of the case files.
    pub stored_bytes: u64,
    /// Bytes of the source files.
    pub input_bytes: u64,
    /// `raw_bytes / stored_bytes`.
    pub compression_ratio: f64,
    /// `stored_bytes / input_bytes`.
    pub size_vs_input: f64,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct StoreReport {
    /// Dataset name.
    pub dataset: String,
    /// Store folder.
    pub store: PathBuf,
    /// The plan as stored in the manifest.
    pub plan: serde_json::Value,
    /// Cases.
    pub cases: Vec<CaseReport>,
    /// Totals.
    pub total: TotalReport,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// The store's manifest; a folder without one is not a store.
fn load_manifest(store: &Path) -> Result<Manifest, IngestError> {
    Manifest::load(store)?.ok_or_else(|| IngestError::Input {
        path: store.to_path_buf(),
        reason: "not a patchflow store (no manifest.json)".into(),
    })
}

/// Reads the store's manifest and case headers (and only those).
pub fn inspect(store: &Path, case: Option<&str>) -> Result<StoreReport, IngestError> {
    let manifest = load_manifest(store)?;
    if let Some(id) = case
        && !manifest.cases.iter().any(|c| c.id == id)
    {
        return Err(IngestError::Input {
            path: store.to_path_buf(),
            reason: format!("no case {id:?} in this store"),
        });
    }
    let cache = ChunkCache::new(0);
    let mut cases = Vec::new();
    for entry in manifest
        .cases
        .iter()
        .filter(|c| case.is_none_or(|id| c.id == id))
    {
        let reader = CaseReader::open(&store.join(&entry.file), cache.clone())?;
        let meta = reader.meta();
        let stats = reader.stats();
        let input_bytes = serde_json::from_value::<SourceRecord>(entry.source.clone())
            .ok()
            .map(|r| r.input_bytes)
            .or_else(|| entry.source.get("input_bytes").and_then(|b| b.as_u64()));
        cases.push(CaseReport {
            id: meta.id.clone(),
            file: entry.file.clone(),
            shape: meta.shape,
            spacing: meta.spacing,
            original_shape: meta.original.shape,
            original_spacing: meta.original.spacing,
            orientation: meta.original.orientation(),
            crop_box: meta.crop_box,
            channels: meta
                .channels
                .iter()
                .map(|c| ChannelReport {
                    name: c.name.clone(),
                    dtype: c.dtype.to_string(),
                    normalization: c.norm,
                    use_mask_for_norm: meta.outside_mask_label.is_some()
                        && c.norm.scheme == patchflow_volume::NormScheme::ZScore,
                })
                .collect(),
            label_dtype: meta.label_dtype.to_string(),
            outside_mask_label: meta.outside_mask_label,
            classes: meta
                .class_voxels
                .iter()
                .map(|(&value, &voxels)| ClassReport {
                    value,
                    name: meta.label_names.get(&value).cloned(),
                    voxels,
                })
                .collect(),
            raw_bytes: stats.raw_bytes,
            stored_bytes: stats.file_bytes,
            compression_ratio: ratio(stats.raw_bytes, stats.file_bytes),
            input_bytes,
        });
    }
    let raw: u64 = cases.iter().map(|c| c.raw_bytes).sum();
    let stored: u64 = cases.iter().map(|c| c.stored_bytes).sum();
    let input: u64 = cases.iter().filter_map(|c| c.input_bytes).sum();
    Ok(StoreReport {
        dataset: manifest.dataset,
        store: store.to_path_buf(),
        plan: manifest.plan,
        total: TotalReport {
            cases: cases.len(),
            raw_bytes: raw,
            stored_bytes: stored,
            input_bytes: input,
            compression_ratio: ratio(raw, stored),
            size_vs_input: ratio(stored, input),
        },
        cases,
    })
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// Renders the report as text: one block per case, then totals.
pub fn render_text(report: &StoreReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "dataset {} ({})", report.dataset, report.store.display());
    render_plan(&mut s, report);
    for c in &report.cases {
        render_case(&mut s, c);
    }
    let t = &report.total;
    let _ = writeln!(
        s,
        "\n{} cases: stored {:.2} MB, raw {:.2} MB (compression {:.1}x), input {:.2} MB (store/input {:.2})",
        t.cases,
        mb(t.stored_bytes),
        mb(t.raw_bytes),
        t.compression_ratio,
        mb(t.input_bytes),
        t.size_vs_input
    );
    s
}

/// The plan's part of [`render_text`]: target spacing, nnU-Net's plan, `use_mask_for_norm`.
fn render_plan(s: &mut String, report: &StoreReport) {
    use std::fmt::Write;
    if let Some(t) = report.plan.get("target_spacing") {
        let _ = writeln!(s, "target spacing [z,y,x] mm: {t}");
    }
    if let Some(p) = crate::NnunetStorePlan::from_value(&report.plan) {
        let n = &p.nnunet;
        let _ = writeln!(
            s,
            "nnU-Net plan {} {} of {}: patch {:?}, batch {}, poolings per axis {:?}, spacing {:?} mm\n\
             arrays in nnU-Net's transposed frame: transpose_forward {:?}; outside-mask label {}\n\
             from {}",
            n.plans_name,
            n.configuration,
            n.dataset_name,
            n.patch_size,
            n.batch_size,
            n.num_pool_per_axis,
            n.spacing,
            n.transpose_forward,
            p.outside_mask_label,
            p.source.display(),
        );
    }
    let mask = report
        .plan
        .get("mask_for_norm")
        .and_then(|m| serde_json::from_value::<crate::MaskForNorm>(m.clone()).ok());
    let z_scored = report
        .cases
        .iter()
        .flat_map(|c| &c.channels)
        .any(|ch| ch.normalization.scheme == patchflow_volume::NormScheme::ZScore);
    match mask {
        Some(m) => {
            let _ = writeln!(s, "{}", m.describe());
        }
        None if z_scored => {
            let _ = writeln!(
                s,
                "use_mask_for_norm: not decided (the plan predates the rule; `patchflow ingest --replan` decides)"
            );
        }
        None => {}
    }
}

/// One case's block of [`render_text`]: geometry, channels, sizes and classes.
fn render_case(s: &mut String, c: &CaseReport) {
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "\n{}  shape {:?}  spacing [{:.3}, {:.3}, {:.3}] mm  (source {:?} {} at [{:.3}, {:.3}, {:.3}] mm)",
        c.id,
        c.shape,
        c.spacing[0],
        c.spacing[1],
        c.spacing[2],
        c.original_shape,
        c.orientation,
        c.original_spacing[0],
        c.original_spacing[1],
        c.original_spacing[2],
    );
    for ch in &c.channels {
        let _ = writeln!(
            s,
            "  channel {:<8} {}  normalisation {:?}{}",
            ch.name,
            ch.dtype,
            ch.normalization.scheme,
            if ch.use_mask_for_norm {
                " over the non-zero mask"
            } else {
                ""
            }
        );
    }
    if let Some(m) = c.outside_mask_label {
        let _ = writeln!(
            s,
            "  outside the non-zero mask: label {m} (served as label 0, image 0)"
        );
    }
    let _ = writeln!(
        s,
        "  stored {:.2} MB, raw {:.2} MB, compression {:.1}x{}",
        mb(c.stored_bytes),
        mb(c.raw_bytes),
        c.compression_ratio,
        c.input_bytes
            .map(|i| format!(", input {:.2} MB", mb(i)))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "  classes ({}, label {}){}:",
        c.classes.len(),
        c.label_dtype,
        c.outside_mask_label
            .map(|m| format!(", outside nnU-Net's mask: label {m}"))
            .unwrap_or_default()
    );
    for k in &c.classes {
        let _ = writeln!(
            s,
            "    {:>5}  {:<24} {:>12} voxels",
            k.value,
            k.name.as_deref().unwrap_or("-"),
            k.voxels
        );
    }
}

/// Checks every chunk checksum of every case (or of one case). Returns `(case id, error)` for
/// each case that fails; an empty list means the store is intact.
pub fn verify(store: &Path, case: Option<&str>) -> Result<Vec<(String, String)>, IngestError> {
    let manifest = load_manifest(store)?;
    let cache = ChunkCache::new(0);
    let mut failures = Vec::new();
    for entry in manifest
        .cases
        .iter()
        .filter(|c| case.is_none_or(|id| c.id == id))
    {
        let result = CaseReader::open(&store.join(&entry.file), cache.clone())
            .and_then(|reader| reader.verify());
        if let Err(e) = result {
            failures.push((entry.id.clone(), e.to_string()));
        }
    }
    Ok(failures)
}

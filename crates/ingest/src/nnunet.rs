//! Ingest of nnU-Net v2's preprocessed configuration folder (`nnUNet_preprocessed/
//! DatasetXXX_Name/nnUNetPlans_3d_fullres`): every case is stored as nnU-Net has it (its
//! float32 image in its transposed frame, its seg with −1 as the case's `outside_mask_label`,
//! its class locations), so that every voxel the daemon serves is what nnU-Net's own loader
//! reads. Nothing is resampled or normalised again.
//!
//! The manifest's plan is a [`NnunetStorePlan`]: nnU-Net's plan of the configuration (patch
//! size, batch size, poolings per axis, `transpose_forward`, ...) for trainers and the PGPS
//! schedule, plus the store's own settings. Cases whose files and plan are unchanged are
//! skipped on a re-run, as for raw datasets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use patchflow_nnunet::{NnunetPlan, PreprocessedFolder};
use patchflow_store::{CaseData, Manifest, WriteOptions, case_file_name};
use serde::{Deserialize, Serialize};

use crate::IngestError;
use crate::discover::sanitize_id;
use crate::options::{CaseOutcome, IngestOptions, IngestReport};
use crate::session::{PendingCase, Session, case_file_ok, fingerprint_paths};

/// The plan of a store ingested from nnU-Net's preprocessed folder (the manifest's `plan`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NnunetStorePlan {
    /// nnU-Net's plan of the configuration (`kind` is `"nnunet"`).
    #[serde(flatten)]
    pub nnunet: NnunetPlan,
    /// Label value that marks voxels outside nnU-Net's non-zero mask, in every case that has
    /// such voxels (see `CaseMeta::outside_mask_label`).
    pub outside_mask_label: u16,
    /// The preprocessed folder the cases came from.
    pub source: PathBuf,
    /// Chunk shape `[z, y, x]` of the store.
    pub chunk_shape: [usize; 3],
    /// zstd level of the store's chunks.
    pub zstd_level: i32,
}

impl NnunetStorePlan {
    /// The plan of a store, when it was ingested from nnU-Net's preprocessed folder.
    pub fn from_manifest(manifest: &Manifest) -> Option<NnunetStorePlan> {
        NnunetStorePlan::from_value(&manifest.plan)
    }

    /// The plan from a manifest's `plan` value, when it is an nnU-Net plan.
    pub fn from_value(plan: &serde_json::Value) -> Option<NnunetStorePlan> {
        if plan.get("kind").and_then(|k| k.as_str()) != Some("nnunet") {
            return None;
        }
        serde_json::from_value(plan.clone()).ok()
    }

    /// What a training schedule takes from nnU-Net's plan: the patch `[z, y, x]` (in nnU-Net's
    /// transposed frame, as the arrays are stored), the stride-2 poolings per axis and the batch
    /// size; `None` when the plan is not 3D.
    pub fn schedule_inputs(&self) -> Option<([usize; 3], [u32; 3], usize)> {
        let n = &self.nnunet;
        let patch = <[usize; 3]>::try_from(n.patch_size.as_slice()).ok()?;
        let pools = <[u32; 3]>::try_from(n.num_pool_per_axis.as_slice()).ok()?;
        Some((patch, pools, n.batch_size))
    }

    /// A stable digest: a case stored under another plan is stale.
    fn digest(&self) -> String {
        let mut p = self.clone();
        // Where the folder lies does not change the data.
        p.source = PathBuf::new();
        let json = serde_json::to_vec(&p).unwrap_or_default();
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&json))
    }
}

/// Provenance of a stored case (the manifest's `source` of each case).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct NnunetSourceRecord {
    /// Every file the case was read from (arrays, then properties).
    files: Vec<PathBuf>,
    /// xxh3-64 over their contents, hex.
    fingerprint: String,
    /// Digest of the plan the case was stored under.
    plan: String,
    /// Bytes of the files.
    input_bytes: u64,
}

/// Refuses to add raw-dataset cases to a store that holds nnU-Net preprocessed cases.
pub(crate) fn refuse_nnunet_store(out: &Path, manifest: &Manifest) -> Result<(), IngestError> {
    if NnunetStorePlan::from_manifest(manifest).is_some() && !manifest.cases.is_empty() {
        return Err(IngestError::Input {
            path: out.to_path_buf(),
            reason: "this store holds cases of nnU-Net's preprocessed folder; ingest raw \
                     datasets into another store"
                .into(),
        });
    }
    Ok(())
}

/// Stores the cases of an nnU-Net preprocessed configuration folder in the store folder `out`.
pub(crate) fn ingest_preprocessed(
    input: &Path,
    out: &Path,
    opts: &IngestOptions,
    stop: &AtomicBool,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let folder = PreprocessedFolder::open(input)?;
    let mut session = Session::open_named(out, &dataset_name(input, &folder))?;
    let mut report = IngestReport {
        dataset: session.manifest.dataset.clone(),
        ..IngestReport::default()
    };
    if !session.manifest.cases.is_empty()
        && NnunetStorePlan::from_manifest(&session.manifest).is_none()
    {
        return Err(IngestError::Input {
            path: out.to_path_buf(),
            reason: "this store holds cases ingested from a raw dataset; store nnU-Net's \
                     preprocessed folder in another store"
                .into(),
        });
    }
    if opts.settings.keep_spacing || opts.settings.target_spacing.is_some() {
        report.warnings.push(
            "--keep-spacing and --spacing do not apply to nnU-Net's preprocessed folder: its \
             cases are stored at nnU-Net's spacing"
                .into(),
        );
    }
    let plan = NnunetStorePlan {
        nnunet: folder.plan.clone(),
        outside_mask_label: patchflow_nnunet::outside_mask_label(&folder.dataset),
        source: input.to_path_buf(),
        chunk_shape: opts.settings.chunk_shape,
        zstd_level: opts.settings.zstd_level,
    };
    let digest = plan.digest();
    let previous = NnunetStorePlan::from_manifest(&session.manifest);
    if previous.as_ref() != Some(&plan) {
        report.replanned = previous.as_ref().is_none_or(|p| p.digest() != digest);
        session.manifest.plan = serde_json::to_value(&plan).unwrap_or_default();
        session.manifest.save(out)?;
    }
    let todo = pending_cases(&session, &folder, &digest, &mut report);
    let write_opts = WriteOptions {
        chunk_shape: plan.chunk_shape,
        zstd_level: plan.zstd_level,
    };
    session.write_cases(todo, opts, stop, &mut report, |(id, input_bytes)| {
        store_case(&folder, id, out, &write_opts, *input_bytes)
    })?;
    report.failed.sort();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The dataset's name: the plan's `dataset_name`, else the name of the folder above the
/// configuration folder `input`.
fn dataset_name(input: &Path, folder: &PreprocessedFolder) -> String {
    if folder.plan.dataset_name.is_empty() {
        input
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .map(sanitize_id)
            .unwrap_or_else(|| "dataset".into())
    } else {
        sanitize_id(&folder.plan.dataset_name)
    }
}

/// The cases of `folder` that need work: all but those with an invalid id or unreadable files
/// (put in `report.failed`) and those stored from identical files under the plan of digest
/// `digest` (put in `report.skipped`).
fn pending_cases(
    session: &Session,
    folder: &PreprocessedFolder,
    digest: &str,
    report: &mut IngestReport,
) -> Vec<PendingCase<(String, u64)>> {
    let existing: HashMap<String, NnunetSourceRecord> = session.stored_records();
    let mut todo = Vec::new();
    for id in &folder.cases {
        if let Err(e) = patchflow_store::validate_case_id(id) {
            report.failed.push((id.clone(), e.to_string()));
            continue;
        }
        let files = folder.case_files(id);
        let (fingerprint, input_bytes) = match fingerprint_paths(files.iter()) {
            Ok(f) => f,
            Err(e) => {
                report.failed.push((id.clone(), e.to_string()));
                continue;
            }
        };
        let unchanged = existing.get(id).is_some_and(|r| {
            r.fingerprint == fingerprint
                && r.plan == digest
                && case_file_ok(&session.out.join(case_file_name(id)))
        });
        if unchanged {
            report.skipped.push(id.clone());
            continue;
        }
        let record = NnunetSourceRecord {
            files,
            fingerprint,
            plan: digest.to_string(),
            input_bytes,
        };
        todo.push(PendingCase {
            id: id.clone(),
            item: (id.clone(), input_bytes),
            source: serde_json::to_value(&record).unwrap_or_default(),
        });
    }
    todo
}

/// Reads one case with the nnU-Net reader and writes it to the store.
fn store_case(
    folder: &PreprocessedFolder,
    id: &str,
    out: &Path,
    write_opts: &WriteOptions,
    input_bytes: u64,
) -> Result<(CaseOutcome, Vec<String>), IngestError> {
    let case = folder.load_case(id)?;
    let mut warnings = Vec::new();
    if !case.properties.skipped_location_keys.is_empty() {
        warnings.push(format!(
            "case {id}: class locations of {} are not single classes and were not stored \
             (foreground sampling uses the single classes)",
            case.properties.skipped_location_keys.join(", ")
        ));
    }
    let stored = folder.to_store_case(case)?;
    if stored.meta.class_voxels.keys().all(|&c| c == 0) {
        warnings.push(format!(
            "case {id}: its seg has no foreground voxels; it is stored, but foreground \
             oversampling will crop it uniformly"
        ));
    }
    let path = out.join(case_file_name(id));
    let written = patchflow_store::write_case(
        &path,
        &CaseData {
            meta: &stored.meta,
            channels: &stored.channels,
            label: &stored.label,
            class_locations: &stored.class_locations,
        },
        write_opts,
    )?;
    Ok((
        CaseOutcome {
            id: id.to_string(),
            input_bytes,
            stored_bytes: written.stored_bytes,
            raw_bytes: written.raw_bytes,
        },
        warnings,
    ))
}

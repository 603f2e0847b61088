//! Running ingest: plan the dataset, preprocess the cases in parallel, write the store.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use patchflow_store::{CaseData, CaseMeta, MANIFEST_FORMAT, WriteOptions, case_file_name};
use patchflow_volume::{CaseInput, NormScheme, median_spacing};
use serde::{Deserialize, Serialize};

use crate::IngestError;
use crate::discover::{CaseSource, DatasetSource, discover};
use crate::options::{CaseOutcome, IngestOptions, IngestReport};
use crate::plan::{CtPlan, DatasetPlan, MaskForNorm, scheme_for};
use crate::session::{PendingCase, Session, case_file_ok, fingerprint_paths, progress_bar};

/// Foreground intensity samples drawn per CT case for the dataset statistics (as nnU-Net).
const CT_SAMPLES_PER_CASE: usize = 10_000;

/// Provenance of a stored case, kept in the manifest to skip unchanged cases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Image files, per channel.
    pub images: Vec<PathBuf>,
    /// Label file.
    pub label: PathBuf,
    /// xxh3-64 over the contents of all files, hex.
    pub fingerprint: String,
    /// Digest of the plan the case was preprocessed with, hex.
    pub plan: String,
    /// Bytes of the input files.
    pub input_bytes: u64,
}

/// Ingests `input` (nnU-Net folder or TSV) into the store folder `out` (or the object-storage
/// location `s3://bucket/prefix`, see [`patchflow_store::StoreLocation`]).
///
/// Cases already stored from identical files with the same plan are skipped. Failing cases are
/// reported and the others still ingested. `stop` is polled between cases: when it becomes true
/// no new case is started, finished ones are kept, and the run returns what it has done.
pub fn ingest(
    input: &Path,
    out: &Path,
    opts: &IngestOptions,
    stop: &AtomicBool,
) -> Result<IngestReport, IngestError> {
    opts.check()?;
    if patchflow_nnunet::is_preprocessed_folder(input) {
        return crate::nnunet::ingest_preprocessed(input, out, opts, stop);
    }
    let source = discover(input)?;
    let mut session = Session::open(out, &source)?;
    ingest_cases(&mut session, &source, &source.cases, opts, stop)
}

/// Plans if needed and ingests `cases` (a subset of `source.cases`) into the store `session`
/// holds.
pub(crate) fn ingest_cases(
    session: &mut Session,
    source: &DatasetSource,
    cases: &[CaseSource],
    opts: &IngestOptions,
    stop: &AtomicBool,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let mut report = IngestReport {
        dataset: session.manifest.dataset.clone(),
        ..IngestReport::default()
    };
    for (id, e) in &source.problems {
        report.failed.push((id.clone(), e.to_string()));
    }
    crate::nnunet::refuse_nnunet_store(&session.out, &session.manifest)?;
    let plan = current_plan(session, cases, opts, stop, &mut report)?;
    let plan_digest = format!("{:016x}", plan.digest());
    let todo = pending_cases(session, cases, &plan_digest, &mut report);
    let write_opts = WriteOptions {
        chunk_shape: plan.settings.chunk_shape,
        zstd_level: plan.settings.zstd_level,
    };
    let (out, label_names) = (session.out.clone(), &source.label_names);
    session.write_cases(todo, opts, stop, &mut report, |(case, input_bytes)| {
        ingest_case(case, &plan, label_names, &write_opts, &out, *input_bytes)
    })?;
    report.failed.sort();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The store's plan when its settings are those asked for and no new plan is asked for; else a
/// new plan, saved in the manifest (cases that failed to read go to `report`).
fn current_plan(
    session: &mut Session,
    cases: &[CaseSource],
    opts: &IngestOptions,
    stop: &AtomicBool,
    report: &mut IngestReport,
) -> Result<DatasetPlan, IngestError> {
    let stored_plan: Option<DatasetPlan> =
        serde_json::from_value(session.manifest.plan.clone()).ok();
    match stored_plan {
        Some(p) if !opts.replan && p.settings == opts.settings => Ok(p),
        previous => {
            if previous.is_some() {
                tracing::info!("settings changed or --replan given: making a new plan");
            }
            let (plan, failures) = make_plan(cases, opts, stop)?;
            report.failed.extend(failures);
            report.replanned = true;
            report.mask_for_norm = plan.mask_for_norm.clone();
            if let Some(m) = &plan.mask_for_norm {
                tracing::info!("{}", m.describe());
            }
            session.manifest.plan = serde_json::to_value(&plan).unwrap_or_default();
            session.manifest.format = MANIFEST_FORMAT;
            session.manifest.save(&session.out)?;
            Ok(plan)
        }
    }
}

/// The cases that need work: all but those that failed so far (in `report`) and those stored
/// from identical files under the plan of digest `plan_digest` (put in `report.skipped`).
fn pending_cases(
    session: &Session,
    cases: &[CaseSource],
    plan_digest: &str,
    report: &mut IngestReport,
) -> Vec<PendingCase<(CaseSource, u64)>> {
    let failed_in_planning: std::collections::HashSet<String> =
        report.failed.iter().map(|(id, _)| id.clone()).collect();
    let existing: HashMap<String, SourceRecord> = session.stored_records();
    let mut todo = Vec::new();
    for case in cases {
        if failed_in_planning.contains(&case.id) {
            continue;
        }
        let (fingerprint, input_bytes) = match fingerprint_files(case) {
            Ok(f) => f,
            Err(e) => {
                report.failed.push((case.id.clone(), e.to_string()));
                continue;
            }
        };
        let unchanged = existing.get(&case.id).is_some_and(|r| {
            r.fingerprint == fingerprint
                && r.plan == plan_digest
                && case_file_ok(&session.out.join(case_file_name(&case.id)))
        });
        if unchanged {
            report.skipped.push(case.id.clone());
            continue;
        }
        let record = SourceRecord {
            images: case.images.clone(),
            label: case.label.clone(),
            fingerprint,
            plan: plan_digest.to_string(),
            input_bytes,
        };
        todo.push(PendingCase {
            id: case.id.clone(),
            item: (case.clone(), input_bytes),
            source: serde_json::to_value(&record).unwrap_or_default(),
        });
    }
    todo
}

/// Makes the dataset plan: target spacing, CT statistics and nnU-Net's `use_mask_for_norm`
/// decision. Returns cases that failed to read.
fn make_plan(
    cases: &[CaseSource],
    opts: &IngestOptions,
    stop: &AtomicBool,
) -> Result<(DatasetPlan, Vec<(String, String)>), IngestError> {
    let settings = opts.settings.clone();
    // The crop of every case is only needed when some channel could use the non-zero mask.
    let crop = cases
        .iter()
        .flat_map(|c| &c.channel_names)
        .any(|n| scheme_for(n) == NormScheme::ZScore);
    let bar = progress_bar(opts.progress, cases.len() as u64, "plan");
    let results = parallel_map(cases, opts.jobs, stop, |case| {
        let r = fingerprint_case(case, settings.seed, crop);
        bar.inc(1);
        r
    });
    bar.finish_and_clear();
    let mut spacings = Vec::new();
    let mut relative_sizes = Vec::new();
    let mut samples: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut failures = Vec::new();
    for (case, result) in cases.iter().zip(results) {
        match result {
            Some(Ok(fp)) => {
                spacings.push(fp.spacing);
                relative_sizes.extend(fp.relative_size_after_cropping);
                for (c, s) in fp.ct_samples {
                    samples.entry(c).or_default().extend(s);
                }
            }
            Some(Err(e)) => failures.push((case.id.clone(), e.to_string())),
            None => {}
        }
    }
    if stop.load(Ordering::Relaxed) {
        return Err(IngestError::Interrupted);
    }
    let target_spacing = if settings.keep_spacing {
        None
    } else if let Some(t) = settings.target_spacing {
        Some(t)
    } else if spacings.is_empty() {
        None
    } else {
        Some(median_spacing(&spacings))
    };
    let ct_stats = samples
        .into_iter()
        .filter_map(|(c, s)| {
            patchflow_volume::CtStats::from_samples(&s).map(|st| (c, CtPlan::from(st)))
        })
        .collect();
    let mask_for_norm = if crop {
        let names: std::collections::BTreeSet<&String> =
            cases.iter().flat_map(|c| &c.channel_names).collect();
        MaskForNorm::decide(&relative_sizes, names)
    } else {
        None
    };
    Ok((
        DatasetPlan {
            settings,
            target_spacing,
            ct_stats,
            planned_from_cases: spacings.len(),
            mask_for_norm,
        },
        failures,
    ))
}

/// What planning reads from one case.
struct Fingerprint {
    /// Voxel spacing `[z, y, x]`.
    spacing: [f64; 3],
    /// Foreground intensity samples per CT channel.
    ct_samples: Vec<(usize, Vec<f32>)>,
    /// Voxels of the non-zero crop box over voxels of the image, when asked for.
    relative_size_after_cropping: Option<f64>,
}

/// Reads what planning needs from one case: its spacing, CT foreground samples and, with
/// `crop`, the share of the image its non-zero crop box keeps (every channel is read for it).
fn fingerprint_case(case: &CaseSource, seed: u64, crop: bool) -> Result<Fingerprint, IngestError> {
    let ct_channels: Vec<usize> = case
        .channel_names
        .iter()
        .enumerate()
        .filter(|(_, n)| scheme_for(n) == NormScheme::Ct)
        .map(|(c, _)| c)
        .collect();
    if ct_channels.is_empty() && !crop {
        let geometry = patchflow_volume::read_nifti_geometry(&case.images[0])?;
        return Ok(Fingerprint {
            spacing: geometry.spacing,
            ct_samples: Vec::new(),
            relative_size_after_cropping: None,
        });
    }
    let label = if ct_channels.is_empty() {
        None
    } else {
        Some(patchflow_volume::read_label(&case.label)?)
    };
    let mut first: Option<patchflow_volume::Geometry> = None;
    let mut bbox: Option<[[usize; 2]; 3]> = None;
    let mut ct_samples = Vec::new();
    for (c, path) in case.images.iter().enumerate() {
        let is_ct = ct_channels.contains(&c);
        if !is_ct && !crop {
            continue;
        }
        let image = patchflow_volume::read_nifti(path)?;
        match (&label, &first) {
            (Some((label_geometry, _)), _) => patchflow_volume::check_same_grid(
                &image.geometry,
                label_geometry,
                path,
                &case.label,
            )?,
            (None, Some(g)) => {
                patchflow_volume::check_same_grid(&image.geometry, g, path, &case.images[0])?
            }
            (None, None) => {}
        }
        if crop {
            let b = patchflow_volume::with_voxels!(&image.data, v => patchflow_volume::nonzero_bbox(v, image.geometry.shape));
            bbox = match (bbox, b) {
                (Some(a), Some(b)) => Some(std::array::from_fn(|i| {
                    [a[i][0].min(b[i][0]), a[i][1].max(b[i][1])]
                })),
                (a, b) => a.or(b),
            };
        }
        if let (true, Some((_, label))) = (is_ct, &label) {
            let s = patchflow_volume::foreground_samples(
                &image.data,
                label,
                CT_SAMPLES_PER_CASE,
                seed ^ xxhash_rust::xxh3::xxh3_64(case.id.as_bytes()),
            );
            ct_samples.push((c, s));
        }
        first.get_or_insert(image.geometry);
    }
    let geometry = match first {
        Some(g) => g,
        None => patchflow_volume::read_nifti_geometry(&case.images[0])?,
    };
    let shape = geometry.shape;
    // An all-zero case keeps its whole volume, as preprocessing does.
    let relative_size_after_cropping = crop.then(|| {
        let full = [[0, shape[0]], [0, shape[1]], [0, shape[2]]];
        patchflow_volume::relative_size_after_cropping(shape, bbox.unwrap_or(full))
    });
    Ok(Fingerprint {
        spacing: geometry.spacing,
        ct_samples,
        relative_size_after_cropping,
    })
}

/// Reads, checks, preprocesses and writes one case.
fn ingest_case(
    case: &CaseSource,
    plan: &DatasetPlan,
    label_names: &BTreeMap<u16, String>,
    write_opts: &WriteOptions,
    out: &Path,
    input_bytes: u64,
) -> Result<(CaseOutcome, Vec<String>), IngestError> {
    let mut warnings = Vec::new();
    let (label_geometry, label) = patchflow_volume::read_label(&case.label)?;
    let mut channels = Vec::with_capacity(case.images.len());
    for path in &case.images {
        let image = patchflow_volume::read_nifti(path)?;
        patchflow_volume::check_same_grid(&image.geometry, &label_geometry, path, &case.label)?;
        channels.push(image);
    }
    let input = CaseInput {
        id: case.id.clone(),
        channels,
        channel_names: case.channel_names.clone(),
        label,
        label_geometry,
    };
    let pre = patchflow_volume::preprocess(&input, &plan.case_plan(&case.channel_names))?;
    drop(input);
    if pre.class_voxels.keys().all(|&c| c == 0) {
        warnings.push(format!(
            "case {}: label {} has no foreground voxels; it is stored, but foreground \
             oversampling will crop it uniformly",
            case.id,
            case.label.display()
        ));
    }
    let meta = CaseMeta::from_preprocessed(&pre, label_names.clone());
    let path = out.join(case_file_name(&case.id));
    let written = patchflow_store::write_case(
        &path,
        &CaseData {
            meta: &meta,
            channels: &pre.channels,
            label: &pre.label,
            class_locations: &pre.class_locations,
        },
        write_opts,
    )?;
    Ok((
        CaseOutcome {
            id: case.id.clone(),
            input_bytes,
            stored_bytes: written.stored_bytes,
            raw_bytes: written.raw_bytes,
        },
        warnings,
    ))
}

/// xxh3-64 over the contents of every file of the case (hex) and their total size.
fn fingerprint_files(case: &CaseSource) -> Result<(String, u64), IngestError> {
    fingerprint_paths(case.files())
}

/// Maps `f` over `items` on `jobs` threads, keeping order; `None` for items skipped after `stop`.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    stop: &AtomicBool,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<Option<R>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1).min(items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().ok().flatten())
        .collect()
}

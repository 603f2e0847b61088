//! Running ingest: plan the dataset, preprocess the cases in parallel, write the store.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use patchflow_store::{
    CaseData, CaseMeta, MANIFEST_FORMAT, Manifest, ManifestCase, ObjectLock, StoreLocation,
    WriteOptions, case_file_name, is_temp_file_name,
};
use patchflow_volume::{CaseInput, NormScheme, median_spacing};
use serde::{Deserialize, Serialize};

use crate::IngestError;
use crate::discover::{CaseSource, DatasetSource, discover};
use crate::plan::{CtPlan, DatasetPlan, MaskForNorm, PlanSettings, scheme_for};

/// Foreground intensity samples drawn per CT case for the dataset statistics (as nnU-Net).
const CT_SAMPLES_PER_CASE: usize = 10_000;

/// How to run ingest.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// Cases processed at once.
    pub jobs: usize,
    /// Settings that shape the plan.
    pub settings: PlanSettings,
    /// Make a new plan even if the store has one.
    pub replan: bool,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            settings: PlanSettings {
                keep_spacing: false,
                target_spacing: None,
                interp: "cubic".into(),
                chunk_shape: patchflow_store::DEFAULT_CHUNK_SHAPE,
                zstd_level: patchflow_store::DEFAULT_ZSTD_LEVEL,
                seed: 1234,
            },
            replan: false,
            progress: true,
        }
    }
}

/// zstd levels ingest compresses chunks with. The store accepts zstd's whole range; ingest
/// keeps to the levels that compress (zstd's negative levels trade most of the ratio for speed).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=22;

impl IngestOptions {
    /// Checks the values: at least one job, a zstd level within [`ZSTD_LEVELS`]. [`ingest`] and
    /// [`crate::watch`] check first; a command line can check while it parses.
    ///
    /// # Errors
    /// [`IngestError::Setting`] naming the field and its rule.
    pub fn check(&self) -> Result<(), IngestError> {
        if self.jobs == 0 {
            return Err(IngestError::Setting {
                field: "jobs",
                reason: "must be at least 1".into(),
            });
        }
        let level = self.settings.zstd_level;
        if !ZSTD_LEVELS.contains(&level) {
            return Err(IngestError::Setting {
                field: "zstd_level",
                reason: format!(
                    "{level} is outside {}..={}",
                    ZSTD_LEVELS.start(),
                    ZSTD_LEVELS.end()
                ),
            });
        }
        Ok(())
    }
}

/// What happened to one case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseOutcome {
    /// Case id.
    pub id: String,
    /// Bytes of the input files.
    pub input_bytes: u64,
    /// Bytes of the stored case file.
    pub stored_bytes: u64,
    /// Bytes of the preprocessed arrays, uncompressed.
    pub raw_bytes: u64,
}

/// The result of one ingest run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IngestReport {
    /// Dataset name.
    pub dataset: String,
    /// Cases written in this run.
    pub ingested: Vec<CaseOutcome>,
    /// Cases already in the store and unchanged.
    pub skipped: Vec<String>,
    /// Cases that failed, with the reason.
    pub failed: Vec<(String, String)>,
    /// Non-fatal findings (e.g. a label without foreground).
    pub warnings: Vec<String>,
    /// Whether a new plan was made.
    pub replanned: bool,
    /// The `use_mask_for_norm` decision of the plan made in this run (`None` when no plan was
    /// made or no case has a z-scored channel).
    pub mask_for_norm: Option<MaskForNorm>,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl IngestReport {
    /// Bytes of input read for the ingested cases.
    pub fn input_bytes(&self) -> u64 {
        self.ingested.iter().map(|c| c.input_bytes).sum()
    }

    /// One-paragraph human summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} ingested, {} unchanged, {} failed in {:.1} s",
            self.dataset,
            self.ingested.len(),
            self.skipped.len(),
            self.failed.len(),
            self.seconds
        );
        if !self.ingested.is_empty() && self.seconds > 0.0 {
            let mb = self.input_bytes() as f64 / 1e6;
            s.push_str(&format!(
                " ({:.1} MB of input, {:.1} MB/s)",
                mb,
                mb / self.seconds
            ));
        }
        if let Some(m) = &self.mask_for_norm {
            s.push_str(&format!("\nnew plan: {}", m.describe()));
        }
        for w in &self.warnings {
            s.push_str(&format!("\nwarning: {w}"));
        }
        for (id, e) in &self.failed {
            s.push_str(&format!("\nfailed: {id}: {e}"));
        }
        s
    }
}

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
    session.run(&source, &source.cases, opts, stop)
}

/// An open store folder being written: holds the writer lock and the manifest.
pub(crate) struct Session {
    out: PathBuf,
    _lock: WriterLock,
    pub(crate) manifest: Manifest,
}

/// The lock that keeps a second ingest from writing the same store.
enum WriterLock {
    /// A held lock on `.ingest.lock` in the store folder (released when the process ends).
    File(#[allow(dead_code)] std::fs::File),
    /// The object `prefix/.ingest.lock`, made with a conditional PUT and deleted at the end.
    Object(#[allow(dead_code)] ObjectLock),
}

/// Name of the writer lock in a store.
const LOCK_NAME: &str = ".ingest.lock";

impl Session {
    /// Opens (creating) the store folder, takes its writer lock and loads the manifest.
    pub(crate) fn open(out: &Path, source: &DatasetSource) -> Result<Session, IngestError> {
        Session::open_named(out, &source.name)
    }

    /// [`Session::open`] for a dataset named `name` (a new manifest takes that name).
    pub(crate) fn open_named(out: &Path, name: &str) -> Result<Session, IngestError> {
        if let StoreLocation::S3(location) = StoreLocation::from_path(out)? {
            let lock_at = location.join(LOCK_NAME);
            let holder = format!(
                "patchflow ingest, process {} on {}, started at {} s since the Unix epoch",
                std::process::id(),
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "an unknown host".into()),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            );
            let lock =
                ObjectLock::acquire(&lock_at, &holder)?.map_err(|held_by| IngestError::Input {
                    path: out.to_path_buf(),
                    reason: format!(
                        "another ingest is writing this store: {lock_at} exists ({held_by}); \
                         if that run is dead, delete the object and try again"
                    ),
                })?;
            let manifest = Self::manifest_or_new(out, name)?;
            return Ok(Session {
                out: out.to_path_buf(),
                _lock: WriterLock::Object(lock),
                manifest,
            });
        }
        std::fs::create_dir_all(out).map_err(|e| IngestError::io(out, e))?;
        let lock_path = out.join(LOCK_NAME);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| IngestError::io(&lock_path, e))?;
        if lock.try_lock().is_err() {
            return Err(IngestError::Input {
                path: out.to_path_buf(),
                reason: "another ingest is writing this store (its lock file .ingest.lock is held)"
                    .into(),
            });
        }
        remove_stale_temp_files(out);
        let manifest = Self::manifest_or_new(out, name)?;
        Ok(Session {
            out: out.to_path_buf(),
            _lock: WriterLock::File(lock),
            manifest,
        })
    }

    /// The store's manifest, or an empty one for a new store.
    fn manifest_or_new(out: &Path, name: &str) -> Result<Manifest, IngestError> {
        Ok(match Manifest::load(out)? {
            Some(m) => m,
            None => Manifest {
                format: MANIFEST_FORMAT,
                dataset: name.to_string(),
                plan: serde_json::Value::Null,
                cases: Vec::new(),
            },
        })
    }

    /// Plans if needed and ingests `cases` (a subset of `source.cases`).
    pub(crate) fn run(
        &mut self,
        source: &DatasetSource,
        cases: &[CaseSource],
        opts: &IngestOptions,
        stop: &AtomicBool,
    ) -> Result<IngestReport, IngestError> {
        let started = Instant::now();
        let mut report = IngestReport {
            dataset: self.manifest.dataset.clone(),
            ..IngestReport::default()
        };
        for (id, e) in &source.problems {
            report.failed.push((id.clone(), e.to_string()));
        }
        crate::nnunet::refuse_nnunet_store(&self.out, &self.manifest)?;

        let stored_plan: Option<DatasetPlan> =
            serde_json::from_value(self.manifest.plan.clone()).ok();
        let plan = match stored_plan {
            Some(p) if !opts.replan && p.settings == opts.settings => p,
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
                self.manifest.plan = serde_json::to_value(&plan).unwrap_or_default();
                self.manifest.format = MANIFEST_FORMAT;
                self.manifest.save(&self.out)?;
                plan
            }
        };
        let plan_digest = format!("{:016x}", plan.digest());
        let failed_in_planning: std::collections::HashSet<String> =
            report.failed.iter().map(|(id, _)| id.clone()).collect();

        // Decide what needs work.
        let existing: HashMap<String, SourceRecord> = self
            .manifest
            .cases
            .iter()
            .filter_map(|c| Some((c.id.clone(), serde_json::from_value(c.source.clone()).ok()?)))
            .collect();
        let mut todo = Vec::new();
        for case in cases {
            if failed_in_planning.contains(&case.id) {
                continue;
            }
            let fingerprint = match fingerprint_files(case) {
                Ok(f) => f,
                Err(e) => {
                    report.failed.push((case.id.clone(), e.to_string()));
                    continue;
                }
            };
            let unchanged = existing.get(&case.id).is_some_and(|r| {
                r.fingerprint == fingerprint.0
                    && r.plan == plan_digest
                    && case_file_ok(&self.out.join(case_file_name(&case.id)))
            });
            if unchanged {
                report.skipped.push(case.id.clone());
            } else {
                todo.push((case.clone(), fingerprint));
            }
        }

        let bar = progress_bar(opts.progress, todo.len() as u64, "ingest");
        let write_opts = WriteOptions {
            chunk_shape: plan.settings.chunk_shape,
            zstd_level: plan.settings.zstd_level,
        };
        let label_names = &source.label_names;
        let jobs = opts.jobs.max(1).min(todo.len().max(1));
        let (work_tx, work_rx) = crossbeam_channel::unbounded();
        for item in todo {
            let _ = work_tx.send(item);
        }
        drop(work_tx);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        std::thread::scope(|scope| -> Result<(), IngestError> {
            for _ in 0..jobs {
                let work_rx = work_rx.clone();
                let done_tx = done_tx.clone();
                let plan = &plan;
                let write_opts = &write_opts;
                let out = &self.out;
                let bar = &bar;
                scope.spawn(move || {
                    while let Ok((case, (fingerprint, input_bytes))) = work_rx.recv() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        bar.set_message(case.id.clone());
                        let result =
                            ingest_case(&case, plan, label_names, write_opts, out, input_bytes);
                        let _ = done_tx.send((case, fingerprint, input_bytes, result));
                    }
                });
            }
            drop(done_tx);
            for (case, fingerprint, input_bytes, result) in done_rx.iter() {
                bar.inc(1);
                match result {
                    Ok((outcome, warnings)) => {
                        for w in warnings {
                            bar.suspend(|| tracing::warn!("{w}"));
                            report.warnings.push(w);
                        }
                        let record = SourceRecord {
                            images: case.images.clone(),
                            label: case.label.clone(),
                            fingerprint,
                            plan: plan_digest.clone(),
                            input_bytes,
                        };
                        self.manifest.cases.retain(|c| c.id != case.id);
                        self.manifest.cases.push(ManifestCase {
                            id: case.id.clone(),
                            file: case_file_name(&case.id),
                            stored_bytes: outcome.stored_bytes,
                            source: serde_json::to_value(&record).unwrap_or_default(),
                        });
                        self.manifest.cases.sort_by(|a, b| a.id.cmp(&b.id));
                        self.manifest.save(&self.out)?;
                        report.ingested.push(outcome);
                    }
                    Err(e) => {
                        bar.suspend(|| tracing::error!("case {}: {e}", case.id));
                        report.failed.push((case.id.clone(), e.to_string()));
                    }
                }
            }
            Ok(())
        })?;
        bar.finish_and_clear();
        if stop.load(Ordering::Relaxed) {
            tracing::warn!("stopped by signal: cases not started are left for the next run");
        }
        report.failed.sort();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
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

/// xxh3-64 over the contents of the files, in order (hex), and their total size.
pub(crate) fn fingerprint_paths<'a>(
    paths: impl Iterator<Item = &'a PathBuf>,
) -> Result<(String, u64), IngestError> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut total = 0u64;
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| IngestError::io(path, e))?;
        total += bytes.len() as u64;
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok((format!("{:016x}", hasher.digest()), total))
}

/// Whether a stored case file exists and opens (header and index valid).
pub(crate) fn case_file_ok(path: &Path) -> bool {
    let cache = patchflow_store::ChunkCache::new(0);
    patchflow_store::CaseReader::open(path, cache).is_ok()
}

/// Removes temporary files a killed writer may have left (`.NAME.tmp.*`).
fn remove_stale_temp_files(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_temp_file_name(&name) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!("removed temporary file {name} left by an interrupted run")
                }
                Err(e) => tracing::warn!("could not remove temporary file {name}: {e}"),
            }
        }
    }
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

/// A progress bar on stderr, or a hidden one.
pub(crate) fn progress_bar(visible: bool, len: u64, prefix: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(len),
        if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    let style = ProgressStyle::with_template(
        "{prefix:>6} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} cases ({eta} left) {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(prefix);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_held_to_their_rules() {
        IngestOptions::default().check().unwrap();
        let mut opts = IngestOptions {
            jobs: 0,
            ..Default::default()
        };
        let e = opts.check().unwrap_err().to_string();
        assert!(e.contains("jobs") && e.contains("at least 1"), "{e}");
        opts.jobs = 1;
        for level in [0, 23, -5] {
            opts.settings.zstd_level = level;
            let e = opts.check().unwrap_err().to_string();
            assert!(e.contains("zstd_level") && e.contains("1..=22"), "{e}");
        }
        for level in [1, 22] {
            opts.settings.zstd_level = level;
            opts.check().unwrap();
        }
    }
}

//! An open store being written ([`Session`]): its writer lock, its manifest, and the parallel
//! loop that writes cases and records each one in the manifest. Both the raw-dataset pipeline
//! and the nnU-Net preprocessed-folder ingest write through it; it knows nothing of either.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use patchflow_store::{
    MANIFEST_FORMAT, Manifest, ManifestCase, ObjectLock, StoreLocation, case_file_name,
    is_temp_file_name,
};

use crate::IngestError;
use crate::discover::DatasetSource;
use crate::options::{CaseOutcome, IngestOptions, IngestReport};

/// An open store folder being written: holds the writer lock and the manifest.
pub(crate) struct Session {
    /// The store folder (or object-storage location).
    pub(crate) out: PathBuf,
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

    /// The provenance records (`source`) of the stored cases, by case id; cases whose record is
    /// not an `R` are left out.
    pub(crate) fn stored_records<R: serde::de::DeserializeOwned>(&self) -> HashMap<String, R> {
        self.manifest
            .cases
            .iter()
            .filter_map(|c| Some((c.id.clone(), serde_json::from_value(c.source.clone()).ok()?)))
            .collect()
    }

    /// Writes the cases of `todo` on up to `opts.jobs` threads with `store`, and records each
    /// written case in the manifest (saved after every case) with its `source` record. Failures
    /// and warnings go to `report`; once `stop` is set no new case is started.
    pub(crate) fn write_cases<T: Send>(
        &mut self,
        todo: Vec<PendingCase<T>>,
        opts: &IngestOptions,
        stop: &AtomicBool,
        report: &mut IngestReport,
        store: impl Fn(&T) -> Result<(CaseOutcome, Vec<String>), IngestError> + Sync,
    ) -> Result<(), IngestError> {
        let bar = progress_bar(opts.progress, todo.len() as u64, "ingest");
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
                let (store, bar) = (&store, &bar);
                scope.spawn(move || {
                    while let Ok(PendingCase { id, item, source }) = work_rx.recv() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        bar.set_message(id.clone());
                        let result = store(&item);
                        let _ = done_tx.send((id, source, result));
                    }
                });
            }
            drop(done_tx);
            for (id, source, result) in done_rx.iter() {
                bar.inc(1);
                match result {
                    Ok((outcome, warnings)) => {
                        for w in warnings {
                            bar.suspend(|| tracing::warn!("{w}"));
                            report.warnings.push(w);
                        }
                        self.record_case(id, source, outcome.stored_bytes)?;
                        report.ingested.push(outcome);
                    }
                    Err(e) => {
                        bar.suspend(|| tracing::error!("case {id}: {e}"));
                        report.failed.push((id, e.to_string()));
                    }
                }
            }
            Ok(())
        })?;
        bar.finish_and_clear();
        if stop.load(Ordering::Relaxed) {
            tracing::warn!("stopped by signal: cases not started are left for the next run");
        }
        Ok(())
    }

    /// Puts the written case `id` in the manifest (replacing an older entry, keeping the cases
    /// sorted by id) and saves it.
    fn record_case(
        &mut self,
        id: String,
        source: serde_json::Value,
        stored_bytes: u64,
    ) -> Result<(), IngestError> {
        self.manifest.cases.retain(|c| c.id != id);
        self.manifest.cases.push(ManifestCase {
            file: case_file_name(&id),
            id,
            stored_bytes,
            source,
        });
        self.manifest.cases.sort_by(|a, b| a.id.cmp(&b.id));
        self.manifest.save(&self.out)?;
        Ok(())
    }
}

/// A case [`Session::write_cases`] is to write: its id, what its writer needs, and the
/// provenance record the manifest keeps for it (`source`).
pub(crate) struct PendingCase<T> {
    /// Case id.
    pub(crate) id: String,
    /// What the writer of the case takes.
    pub(crate) item: T,
    /// The manifest's `source` of the case once written.
    pub(crate) source: serde_json::Value,
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

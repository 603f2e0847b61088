//! The preprocessing daemon: `patchflow ingest --watch` keeps ingesting cases as they appear.
//!
//! A case is picked up once all its files are complete, which is judged by their size and
//! modification time staying the same over one poll interval (writers that copy in place are
//! still busy while these change; writers that rename into place are seen complete at once).
//! The manifest is rewritten atomically after each new case, so a reader (or `patchflow serve`)
//! sees either the old or the new list, never half of one. A case whose files fail to ingest is
//! tried again only when its files change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::IngestError;
use crate::discover::{CaseSource, discover};
use crate::options::{IngestOptions, IngestReport};
use crate::pipeline::ingest_cases;
use crate::session::Session;

/// Size and modification time of a file: its state as far as completeness goes.
type FileState = (u64, Option<SystemTime>);

fn file_state(path: &Path) -> Option<FileState> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()))
}

fn case_state(case: &CaseSource) -> Option<Vec<FileState>> {
    case.files().map(|p| file_state(p)).collect()
}

/// Watches `input` and ingests new or changed cases into `out` until `stop` is set.
///
/// `on_round` is called after every round that did work, with that round's report.
pub fn watch(
    input: &Path,
    out: &Path,
    opts: &IngestOptions,
    poll: Duration,
    stop: &AtomicBool,
    mut on_round: impl FnMut(&IngestReport),
) -> Result<(), IngestError> {
    opts.check()?;
    if patchflow_nnunet::is_preprocessed_folder(input) {
        return Err(IngestError::Input {
            path: input.to_path_buf(),
            reason: "--watch is for raw datasets; an nnU-Net preprocessed folder is ingested \
                     once (run the same command again after nnU-Net preprocessed more cases)"
                .into(),
        });
    }
    let first = discover(input)?;
    let mut session = Session::open(out, &first)?;
    // Files seen at the previous poll, and the state each case was last handled in.
    let mut previous: HashMap<PathBuf, FileState> = HashMap::new();
    let mut handled: HashMap<String, Vec<FileState>> = HashMap::new();
    let mut reported = std::collections::HashSet::new();
    tracing::info!(
        "watching {} (every {:.1} s); stop with Ctrl-C or SIGTERM",
        input.display(),
        poll.as_secs_f64()
    );
    while !stop.load(Ordering::Relaxed) {
        let mut source = discover(input)?;
        let mut ready = Vec::new();
        let mut now_seen = HashMap::new();
        for case in &source.cases {
            let Some(state) = case_state(case) else {
                continue;
            };
            for (p, s) in case.files().zip(&state) {
                now_seen.insert(p.clone(), *s);
            }
            let stable = case
                .files()
                .zip(&state)
                .all(|(p, s)| previous.get(p) == Some(s));
            if stable && handled.get(&case.id) != Some(&state) {
                ready.push((case.clone(), state));
            }
        }
        // A case with a missing file is normal while files arrive: say so once, then wait.
        for (id, e) in source.problems.drain(..) {
            let msg = format!("{id}: {e}");
            if reported.insert(msg.clone()) {
                tracing::warn!("waiting for case {msg}");
            }
        }
        previous = now_seen;
        if !ready.is_empty() {
            let cases: Vec<CaseSource> = ready.iter().map(|(c, _)| c.clone()).collect();
            let report = ingest_cases(&mut session, &source, &cases, opts, stop)?;
            let failed: std::collections::HashSet<&str> =
                report.failed.iter().map(|(id, _)| id.as_str()).collect();
            for (case, state) in ready {
                if stop.load(Ordering::Relaxed) && !failed.contains(case.id.as_str()) {
                    // Not necessarily done: it is looked at again on the next start.
                    continue;
                }
                handled.insert(case.id, state);
            }
            if !report.ingested.is_empty() || !report.failed.is_empty() {
                on_round(&report);
            }
        }
        let deadline = Instant::now() + poll;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20).min(poll));
        }
    }
    tracing::info!("stopped watching {}", input.display());
    Ok(())
}

//! Replays the inputs a fuzz target saved (crashes found once, hand-made hostile files) as an
//! ordinary test: nothing may panic, and the file name's prefix states the expected outcome.

use std::fmt::Debug;
use std::panic::{RefUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Every file of `dir`, sorted by name.
fn saved_inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `run` on the bytes of every file of `dir` (at least `at_least` of them) and panics
/// listing every input that panicked or whose outcome `holds(file name, outcome)` rejects.
pub fn replay_saved_inputs<O: Debug>(
    dir: &Path,
    at_least: usize,
    run: impl Fn(&[u8]) -> O + RefUnwindSafe,
    holds: impl Fn(&str, &O) -> bool,
) {
    let files = saved_inputs(dir);
    assert!(
        files.len() >= at_least,
        "expected at least {at_least} saved inputs in {}, found {}",
        dir.display(),
        files.len()
    );
    let mut failures = Vec::new();
    for path in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        match catch_unwind(|| run(&bytes)) {
            Err(_) => failures.push(format!("{name}: panicked")),
            Ok(o) if !holds(&name, &o) => {
                failures.push(format!("{name}: unexpected outcome {o:?}"))
            }
            Ok(o) => println!("{name}: {o:?}"),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_runs_and_failures_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("ok-a"), b"12").unwrap();
        std::fs::write(dir.join("err-b"), b"").unwrap();
        let holds = |name: &str, n: &usize| name.starts_with("ok-") == (*n > 0);
        replay_saved_inputs(dir, 2, |b| b.len(), holds);
        std::fs::write(dir.join("ok-c"), b"").unwrap();
        let failed = catch_unwind(|| replay_saved_inputs(dir, 2, |b| b.len(), holds));
        assert!(
            failed.is_err(),
            "ok-c holds no bytes: its expectation fails"
        );
    }
}

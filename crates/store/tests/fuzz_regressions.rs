//! Replays every saved input in `tests/fuzz_regressions/` through the case the `store_reader`
//! fuzz target runs (`support/store_case.rs`): inputs that once crashed the reader, and
//! hand-made damaged case files. Nothing may panic; the file name's prefix states the outcome:
//!
//! * `err-…`: opening the file fails;
//! * `ok-…`: the file opens, every read succeeds and every chunk verifies;
//! * `damaged-…`: the file opens but verification finds a bad chunk;
//! * anything else: only "no panic" is required.

use std::path::{Path, PathBuf};

#[path = "support/store_case.rs"]
mod store_case;

use store_case::Outcome;

fn saved_inputs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn expectation_holds(name: &str, o: &Outcome) -> bool {
    if name.starts_with("err-") {
        !o.opened
    } else if name.starts_with("ok-") {
        o.opened && o.reads_ok > 0 && o.reads_failed == 0 && o.verified == Some(true)
    } else if name.starts_with("damaged-") {
        o.opened && o.verified == Some(false)
    } else {
        true
    }
}

#[test]
fn saved_inputs_never_panic_and_meet_their_expectation() {
    let files = saved_inputs();
    assert!(
        files.len() >= 8,
        "expected the saved inputs in tests/fuzz_regressions, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for path in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        match std::panic::catch_unwind(|| store_case::run(&bytes)) {
            Err(_) => failures.push(format!("{name}: panicked")),
            Ok(o) if !expectation_holds(&name, &o) => {
                failures.push(format!("{name}: unexpected outcome {o:?}"))
            }
            Ok(o) => println!("{name}: {o:?}"),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

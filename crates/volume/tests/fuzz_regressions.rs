//! Replays every saved input in `tests/fuzz_regressions/` through the case the `nifti` fuzz
//! target runs (`support/nifti_case.rs`): inputs that once crashed the reader or preprocessing,
//! and hand-made hostile files. Nothing may panic; the file name's prefix states the outcome:
//!
//! * `err-…`: the image is refused with an error;
//! * `ok-…`: image and label read, and preprocessing (when it runs) succeeds;
//! * `refused-…`: both files read and preprocessing returns an error;
//! * anything else: only "no panic" is required.

use std::path::{Path, PathBuf};

#[path = "support/nifti_case.rs"]
mod nifti_case;

use nifti_case::Outcome;

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
        !o.image_ok
    } else if name.starts_with("ok-") {
        o.image_ok && o.label_ok && o.preprocessed != Some(false)
    } else if name.starts_with("refused-") {
        o.image_ok && o.label_ok && o.preprocessed == Some(false)
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
        match std::panic::catch_unwind(|| nifti_case::run(&bytes)) {
            Err(_) => failures.push(format!("{name}: panicked")),
            Ok(o) if !expectation_holds(&name, &o) => {
                failures.push(format!("{name}: unexpected outcome {o:?}"))
            }
            Ok(o) => println!("{name}: {o:?}"),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

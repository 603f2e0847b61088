//! Replays every saved input in `tests/fuzz_regressions/` through the case the `nifti` fuzz
//! target runs (`support/nifti_case.rs`): inputs that once crashed the reader or preprocessing,
//! and hand-made hostile files. Nothing may panic; the file name's prefix states the outcome:
//!
//! * `err-…`: the image is refused with an error;
//! * `ok-…`: image and label read, and preprocessing (when it runs) succeeds;
//! * `refused-…`: both files read and preprocessing returns an error;
//! * anything else: only "no panic" is required.

use std::path::Path;

#[path = "support/nifti_case.rs"]
mod nifti_case;

use nifti_case::Outcome;

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
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    patchflow_testkit::fuzz::replay_saved_inputs(&dir, 8, nifti_case::run, expectation_holds);
}

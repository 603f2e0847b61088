//! Replays every saved input in `tests/fuzz_regressions/` through the case the `store_reader`
//! fuzz target runs (`support/store_case.rs`): inputs that once crashed the reader, and
//! hand-made damaged case files. Nothing may panic; the file name's prefix states the outcome:
//!
//! * `err-…`: opening the file fails;
//! * `ok-…`: the file opens, every read succeeds and every chunk verifies;
//! * `damaged-…`: the file opens but verification finds a bad chunk;
//! * anything else: only "no panic" is required.

use std::path::Path;

#[path = "support/store_case.rs"]
mod store_case;

use store_case::Outcome;

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
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    patchflow_testkit::fuzz::replay_saved_inputs(&dir, 8, store_case::run, expectation_holds);
}

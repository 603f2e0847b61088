//! Arbitrary bytes as a stored case file: open, read whole arrays and boxes, verify checksums.
//! The case logic lives with the crate so that the regression test replays saved inputs
//! through the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/store/tests/support/store_case.rs"]
mod store_case;

fuzz_target!(|data: &[u8]| {
    store_case::run(data);
});

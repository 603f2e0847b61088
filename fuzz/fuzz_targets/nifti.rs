//! NIfTI bytes (plain or gzip) through the reader ingest uses and, for small image/label pairs,
//! through preprocessing. The case logic lives with the crate so that the regression test
//! replays saved inputs through the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/volume/tests/support/nifti_case.rs"]
mod nifti_case;

fuzz_target!(|data: &[u8]| {
    nifti_case::run(data);
});

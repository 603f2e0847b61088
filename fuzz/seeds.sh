#!/usr/bin/env bash
# Writes the seed corpora (fuzz/corpus/nifti, fuzz/corpus/store_reader) from the synthetic
# phantom with the project's own NIfTI and case-file writers. Safe to rerun: seeds are
# overwritten, inputs the fuzzer added are kept.
set -euo pipefail
cd "$(dirname "$0")"
cargo +nightly run --quiet --example make_seeds -- corpus

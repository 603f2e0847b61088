//! Test support shared by the patchflow crates' tests (a dev-dependency only, never shipped).
//!
//! It owns fixtures shared by tests. It must never become a normal dependency of a crate.
//!
//! Several crates test against the same kind of data: a small store written from arrays kept in
//! memory, so that every served voxel can be checked against a plain crop of those arrays; and
//! the fuzz targets' saved inputs, replayed as ordinary tests; and a real S3-compatible
//! server (moto) for the object-storage tests. They live here once.

pub mod fuzz;
pub mod moto;
pub mod synthetic;

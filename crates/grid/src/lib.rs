//! The vocabulary every layer of patchflow shares: a validated 3D patch size with its one parser
//! and one per-axis limit, and the seeded random generators behind every reproducible draw.
//!
//! It owns only these small value types and pure functions; it must not depend on any other crate
//! (the curriculum, the sampler, the daemon, the trainer and the Python binding all link it).
//! Arrays are `[z, y, x]`.

mod error;
mod patch;
pub mod rng;

pub use error::GridError;
pub use patch::{AXIS_NAMES, MAX_PATCH_AXIS, Patch, parse_triplet};

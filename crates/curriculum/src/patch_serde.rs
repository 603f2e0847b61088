//! Serde for [`Patch`] (the grid crate has no dependencies, serde included): the JSON array
//! `[z, y, x]`, validated on the way in. Use it with `#[serde(with =
//! "patchflow_curriculum::patch_serde")]` on a `Patch` field.

use patchflow_grid::Patch;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Writes `p` as `[z, y, x]`.
///
/// # Errors
/// The serializer's.
pub fn serialize<S: Serializer>(p: &Patch, s: S) -> Result<S::Ok, S::Error> {
    p.axes().serialize(s)
}

/// Reads `[z, y, x]` and checks it is a valid patch.
///
/// # Errors
/// The deserializer's, or the patch's limits ([`patchflow_grid::GridError`] as text).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Patch, D::Error> {
    let axes = <[usize; 3]>::deserialize(d)?;
    Patch::new(axes).map_err(serde::de::Error::custom)
}

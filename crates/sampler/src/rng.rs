//! The random streams behind every placement decision, on the shared generator of
//! `patchflow-grid`.
//!
//! Reproducibility is part of the sampler's contract: batch `index` of a stream with seed `seed`
//! must be the same today, tomorrow, on any machine and with any number of threads. Every
//! decision draws from its own stream, keyed by `(seed, batch index, stream kind, slot)` and
//! folded into one word (`patchflow_grid::rng::fold_key`), so the stream of one item never
//! depends on how many draws another item made, nor on which thread runs it. Changing anything
//! here changes every batch ever served; treat it as a format.

pub(crate) use patchflow_grid::rng::Rng;
use patchflow_grid::rng::fold_key;

/// Which decision a stream serves. The numeric values are part of the format.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum StreamKind {
    /// Choice of the case for one case slot of a batch.
    Case = 1,
    /// Placement of one item (class, voxel, origin).
    Item = 2,
    /// Augmentation parameters of one item (a domain apart from placement, so enabling
    /// augmentation never moves a crop).
    Augment = 3,
}

/// The 64-bit key of the stream `(seed, batch, kind, slot)`, for generators seeded elsewhere
/// (the augmentation draws from its own generator seeded with this key).
pub(crate) fn key(seed: u64, batch: u64, kind: StreamKind, slot: u64) -> u64 {
    fold_key(&[seed, batch, kind as u64, slot])
}

/// The stream for `(seed, batch, kind, slot)`.
pub(crate) fn stream(seed: u64, batch: u64, kind: StreamKind, slot: u64) -> Rng {
    Rng::from_seed(key(seed, batch, kind, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_by_every_key_part() {
        let base = stream(7, 3, StreamKind::Item, 1).next_u64();
        assert_eq!(base, stream(7, 3, StreamKind::Item, 1).next_u64());
        assert_ne!(base, stream(8, 3, StreamKind::Item, 1).next_u64());
        assert_ne!(base, stream(7, 4, StreamKind::Item, 1).next_u64());
        assert_ne!(base, stream(7, 3, StreamKind::Case, 1).next_u64());
        assert_ne!(base, stream(7, 3, StreamKind::Item, 2).next_u64());
        assert_ne!(
            key(7, 3, StreamKind::Item, 1),
            key(7, 3, StreamKind::Augment, 1)
        );
    }
}

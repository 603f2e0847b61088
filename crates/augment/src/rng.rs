//! The random streams behind every drawn parameter: the shared generator of `patchflow-grid`
//! plus the one draw that is augmentation's own.
//!
//! Each transform draws from its own sub-stream (`Rng::sub(seed, tag)`), so enabling one
//! transform never changes what another one draws for the same seed. Changing a draw here
//! changes every augmented batch ever served; treat it as a format.

pub(crate) use patchflow_grid::rng::{Rng, mix};

/// nnU-Net's `BGContrast` sampling of a multiplicative factor: with probability one half a value
/// below 1 (uniform in `[lo, min(1, hi)]`), otherwise a value of at least 1 (uniform in
/// `[max(lo, 1), hi]`); the drawn value always lies in `[lo, hi]`.
pub(crate) fn around_one(r: &mut Rng, [lo, hi]: [f64; 2]) -> f64 {
    let below = r.unit() < 0.5;
    if below && lo < 1.0 {
        r.uniform([lo, hi.min(1.0)])
    } else if hi >= lo.max(1.0) {
        r.uniform([lo.max(1.0), hi])
    } else {
        r.uniform([lo, hi])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn around_one_stays_in_range_and_splits_evenly() {
        let mut r = Rng::from_seed(3);
        let n = 20_000;
        let mut below = 0;
        for _ in 0..n {
            let v = around_one(&mut r, [0.75, 1.25]);
            assert!((0.75..=1.25).contains(&v));
            below += usize::from(v < 1.0);
        }
        // Binomial(20000, 0.5): sd ~71; 5 sd.
        assert!((below as f64 - 10_000.0).abs() < 355.0, "{below}");
        for range in [[1.2, 1.5], [0.2, 0.9], [1.0, 1.0]] {
            for _ in 0..1000 {
                let v = around_one(&mut r, range);
                assert!(range[0] <= v && v <= range[1], "{v} {range:?}");
            }
        }
    }

    #[test]
    fn sub_streams_differ() {
        let a = Rng::sub(5, 1).next_u64();
        assert_eq!(a, Rng::sub(5, 1).next_u64());
        assert_ne!(a, Rng::sub(5, 2).next_u64());
        assert_ne!(a, Rng::sub(6, 1).next_u64());
    }
}

//! Where a patch goes: nnU-Net's crop bounds, uniform and class-centred origins, which items of a
//! batch are forced onto foreground, and how classes are chosen.
//!
//! Everything here is pure; the functions take the random stream they draw from, so the caller
//! decides how streams are keyed (SplitMix64-keyed xoshiro256++, defined in the crate's `rng`
//! module).

use crate::rng::Rng;

/// Inclusive range `[lb, ub]` of crop origins along one axis.
pub type AxisBounds = [i64; 2];

/// nnU-Net v2's origin bounds for one axis (`DataLoader.get_bbox`):
///
/// ```text
/// need_to_pad = max(0, patch - shape)
/// lb = -need_to_pad // 2                       (Python floor division: -ceil(need/2))
/// ub = shape + need_to_pad // 2 + need_to_pad % 2 - patch
/// ```
///
/// When the patch fits, origins run over `[0, shape - patch]`; when it does not, the patch hangs
/// over both ends by half the shortfall (the odd voxel goes either side), and the volume is
/// centred in it. `lb <= ub` always holds.
#[inline]
pub fn axis_bounds(shape: usize, patch: usize) -> AxisBounds {
    let shape = i64::try_from(shape).unwrap_or(i64::MAX / 4);
    let patch = i64::try_from(patch).unwrap_or(i64::MAX / 4);
    let need = (patch - shape).max(0);
    let lb = (-need).div_euclid(2);
    let ub = shape + need / 2 + need % 2 - patch;
    [lb, ub]
}

/// [`axis_bounds`] for the three axes `[z, y, x]`.
pub fn crop_bounds(shape: [usize; 3], patch: [usize; 3]) -> [AxisBounds; 3] {
    [
        axis_bounds(shape[0], patch[0]),
        axis_bounds(shape[1], patch[1]),
        axis_bounds(shape[2], patch[2]),
    ]
}

/// A uniform origin within `bounds`, drawn in axis order `z, y, x`.
pub(crate) fn uniform_origin(rng: &mut Rng, bounds: &[AxisBounds; 3]) -> [i64; 3] {
    let z = rng.range_inclusive(bounds[0][0], bounds[0][1]);
    let y = rng.range_inclusive(bounds[1][0], bounds[1][1]);
    let x = rng.range_inclusive(bounds[2][0], bounds[2][1]);
    [z, y, x]
}

/// The origin of a patch centred on `voxel` (`voxel - patch // 2` per axis), clamped to `bounds`.
///
/// nnU-Net clamps only to the lower bound; clamping to both keeps a centred crop within the same
/// range as a uniform one (no more padding than a uniform crop can have). The voxel stays inside
/// the patch whenever it lies inside the volume: see the property tests.
pub fn centred_origin(voxel: [u32; 3], patch: [usize; 3], bounds: &[AxisBounds; 3]) -> [i64; 3] {
    let mut origin = [0i64; 3];
    for axis in 0..3 {
        let half = i64::try_from(patch[axis] / 2).unwrap_or(i64::MAX / 4);
        let wanted = i64::from(voxel[axis]) - half;
        let [lb, ub] = bounds[axis];
        origin[axis] = wanted.clamp(lb, ub.max(lb));
    }
    origin
}

/// The number of leading items of a batch that are *not* forced onto foreground:
/// `round(batch * (1 - fraction))` with Python's rounding (half to even), as nnU-Net v2 computes it.
pub fn unforced_items(batch: usize, fraction: f64) -> usize {
    let keep = (batch as f64 * (1.0 - fraction)).round_ties_even();
    if keep.is_nan() || keep <= 0.0 {
        0
    } else if keep >= batch as f64 {
        batch
    } else {
        keep as usize
    }
}

/// nnU-Net v2's `get_do_oversample`: item `item` of a batch of `batch` is forced onto foreground
/// iff `not item < round(batch * (1 - fraction))`.
pub fn is_forced(item: usize, batch: usize, fraction: f64) -> bool {
    item >= unforced_items(batch, fraction)
}

/// Number of distinct case draws for a batch: `ceil(batch / crops_per_case)` (at least one).
pub fn cases_per_batch(batch: usize, crops_per_case: usize) -> usize {
    batch.div_ceil(crops_per_case.max(1)).max(1)
}

/// The case slot of item `item` when each case gives `crops_per_case` consecutive items.
pub fn slot_of_item(item: usize, crops_per_case: usize) -> usize {
    item / crops_per_case.max(1)
}

/// Picks one entry of `classes` uniformly; `None` when empty.
pub(crate) fn choose_uniform(rng: &mut Rng, classes: &[u16]) -> Option<u16> {
    if classes.is_empty() {
        return None;
    }
    classes.get(rng.index(classes.len())).copied()
}

/// Picks one class with probability proportional to its weight. Entries with a weight that is
/// not strictly positive and finite are never chosen; `None` when no entry is eligible.
pub(crate) fn choose_weighted(rng: &mut Rng, weighted: &[(u16, f64)]) -> Option<u16> {
    let eligible = |w: f64| w.is_finite() && w > 0.0;
    let total: f64 = weighted.iter().filter(|e| eligible(e.1)).map(|e| e.1).sum();
    if !(total.is_finite() && total > 0.0) {
        return None;
    }
    let target = rng.unit() * total;
    let mut cumulative = 0.0;
    let mut last = None;
    for &(class, w) in weighted.iter().filter(|e| eligible(e.1)) {
        cumulative += w;
        last = Some(class);
        if target < cumulative {
            return Some(class);
        }
    }
    // Rounding can leave `target` a hair above the final cumulative sum.
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    #[test]
    fn bounds_match_nnunet_examples() {
        // Fits: origins 0..=shape-patch.
        assert_eq!(axis_bounds(100, 64), [0, 36]);
        assert_eq!(axis_bounds(64, 64), [0, 0]);
        // Too small by 3: Python gives lb = -3 // 2 = -2, ub = 61 + 1 + 1 - 64 = -1.
        assert_eq!(axis_bounds(61, 64), [-2, -1]);
        // Too small by 4: centred exactly.
        assert_eq!(axis_bounds(60, 64), [-2, -2]);
        // Too small by 1: lb = -1, ub = 0.
        assert_eq!(axis_bounds(63, 64), [-1, 0]);
        // Empty axis.
        assert_eq!(axis_bounds(0, 5), [-3, -2]);
    }

    #[test]
    fn forced_rule_matches_nnunet_rounding() {
        // batch 2, fraction 0.33: round(1.34) = 1 -> item 1 forced.
        assert!(!is_forced(0, 2, 0.33));
        assert!(is_forced(1, 2, 0.33));
        // batch 2, fraction 0.5: round(1.0) = 1.
        assert_eq!(unforced_items(2, 0.5), 1);
        // batch 1, fraction 0.5: Python round(0.5) = 0 (half to even) -> item 0 forced.
        assert_eq!(unforced_items(1, 0.5), 0);
        assert!(is_forced(0, 1, 0.5));
        // batch 3, fraction 0.5: round(1.5) = 2.
        assert_eq!(unforced_items(3, 0.5), 2);
        // batch 5, fraction 0.5: round(2.5) = 2.
        assert_eq!(unforced_items(5, 0.5), 2);
        assert_eq!(unforced_items(4, 0.0), 4);
        assert_eq!(unforced_items(4, 1.0), 0);
    }

    #[test]
    fn grouping() {
        assert_eq!(cases_per_batch(8, 4), 2);
        assert_eq!(cases_per_batch(9, 4), 3);
        assert_eq!(cases_per_batch(2, 1), 2);
        assert_eq!(cases_per_batch(2, 8), 1);
        assert_eq!(slot_of_item(3, 4), 0);
        assert_eq!(slot_of_item(4, 4), 1);
    }

    #[test]
    fn weighted_choice_skips_zero_and_bad_weights() {
        let mut rng = Rng::from_seed(5);
        let w = [(0u16, 0.0), (1, 1.0), (2, f64::NAN), (3, -1.0)];
        for _ in 0..100 {
            assert_eq!(choose_weighted(&mut rng, &w), Some(1));
        }
        assert_eq!(choose_weighted(&mut rng, &[(1, 0.0)]), None);
        assert_eq!(choose_weighted(&mut rng, &[]), None);
        assert_eq!(choose_uniform(&mut rng, &[]), None);
    }

    #[test]
    fn weighted_choice_frequencies() {
        // Weights 1:2:5 over n = 40_000 draws. Each count is binomial(n, p); we accept within
        // 5 standard deviations (false-failure probability < 1e-6 per class).
        let weights = [(0u16, 1.0), (4, 2.0), (9, 5.0)];
        let n = 40_000usize;
        let mut rng = Rng::from_seed(77);
        let mut counts = [0usize; 3];
        for _ in 0..n {
            let c = choose_weighted(&mut rng, &weights);
            let pos = weights.iter().position(|w| Some(w.0) == c);
            match pos {
                Some(p) => counts[p] += 1,
                None => panic!("unexpected class {c:?}"),
            }
        }
        for (i, (_, w)) in weights.iter().enumerate() {
            let p = w / 8.0;
            let expected = n as f64 * p;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            let got = counts[i] as f64;
            assert!(
                (got - expected).abs() < 5.0 * sd,
                "class {i}: {got} vs {expected} ± {sd}"
            );
        }
    }

    proptest! {
        #[test]
        fn bounds_are_ordered_and_keep_volume_centred(shape in 0usize..300, patch in 1usize..300) {
            let [lb, ub] = axis_bounds(shape, patch);
            prop_assert!(lb <= ub);
            if patch <= shape {
                prop_assert_eq!(lb, 0);
                prop_assert_eq!(ub, (shape - patch) as i64);
            } else {
                // Padding before the volume is -origin, after it origin + patch - shape; the two
                // differ by at most one voxel for every allowed origin.
                for o in lb..=ub {
                    let before = -o;
                    let after = o + patch as i64 - shape as i64;
                    prop_assert!(before >= 0 && after >= 0);
                    prop_assert!((before - after).abs() <= 1, "o={} before={} after={}", o, before, after);
                }
            }
        }

        #[test]
        fn uniform_origins_within_bounds(
            shape in prop::array::uniform3(0usize..200),
            patch in prop::array::uniform3(1usize..200),
            seed in any::<u64>(),
        ) {
            let b = crop_bounds(shape, patch);
            let mut rng = Rng::from_seed(seed);
            for _ in 0..20 {
                let o = uniform_origin(&mut rng, &b);
                for a in 0..3 {
                    prop_assert!(b[a][0] <= o[a] && o[a] <= b[a][1]);
                }
            }
        }

        #[test]
        fn centred_crop_contains_voxel(
            shape in prop::array::uniform3(1usize..200),
            patch in prop::array::uniform3(1usize..200),
            frac in prop::array::uniform3(0.0f64..1.0),
        ) {
            let voxel = [
                ((shape[0] as f64 * frac[0]) as u32).min(shape[0] as u32 - 1),
                ((shape[1] as f64 * frac[1]) as u32).min(shape[1] as u32 - 1),
                ((shape[2] as f64 * frac[2]) as u32).min(shape[2] as u32 - 1),
            ];
            let b = crop_bounds(shape, patch);
            let o = centred_origin(voxel, patch, &b);
            for a in 0..3 {
                prop_assert!(b[a][0] <= o[a] && o[a] <= b[a][1]);
                let v = i64::from(voxel[a]);
                prop_assert!(o[a] <= v && v < o[a] + patch[a] as i64,
                    "axis {} origin {} voxel {} patch {}", a, o[a], v, patch[a]);
            }
        }

        #[test]
        fn forced_count_follows_round_rule(batch in 1usize..64, fraction in 0.0f64..=1.0) {
            let forced = (0..batch).filter(|&i| is_forced(i, batch, fraction)).count();
            let expected = batch - (batch as f64 * (1.0 - fraction)).round_ties_even() as usize;
            prop_assert_eq!(forced, expected);
            // Forced items are the trailing ones.
            for i in 1..batch {
                prop_assert!(!is_forced(i - 1, batch, fraction) || is_forced(i, batch, fraction));
            }
        }
    }
}

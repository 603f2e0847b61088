//! Placement of one item: which class, which voxel, which origin.
//!
//! The case is seen through [`CaseView`], so placement is tested against in-memory cases and
//! served against memory-mapped ones with the same code.

use crate::SamplerError;
use crate::placement::{
    centred_origin, choose_uniform, choose_weighted, crop_bounds, uniform_origin,
};
use crate::request::Policy;
use crate::rng::Rng;

/// Random voxels tried when looking for a background voxel before falling back to a uniform crop.
pub const BACKGROUND_TRIES: usize = 64;

/// What placement needs to know about a case.
pub(crate) trait CaseView {
    /// Identifier (for error messages).
    fn id(&self) -> &str;
    /// Voxels per axis `[z, y, x]`.
    fn shape(&self) -> [usize; 3];
    /// Foreground classes with at least one stored location, ascending.
    fn foreground_classes(&self) -> &[u16];
    /// Stored locations of `class` (`[z, y, x]`); empty when absent.
    fn locations(&self, class: u16) -> &[[u32; 3]];
    /// Whether the case has any background (class 0) voxel.
    fn has_background(&self) -> bool;
    /// The label at one in-volume voxel.
    fn label_at(&self, voxel: [usize; 3]) -> Result<u16, SamplerError>;
}

/// Where one item goes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Placement {
    pub origin: [i64; 3],
    pub forced_foreground: bool,
    pub class: Option<u16>,
}

/// Whether `class` can be served from `case` under class weighting.
pub(crate) fn class_present(case: &impl CaseView, class: u16) -> bool {
    if class == 0 {
        case.has_background()
    } else {
        case.foreground_classes().binary_search(&class).is_ok()
    }
}

/// The weighted classes of `weights` present in `case`, with a positive weight.
pub(crate) fn present_weights(
    case: &impl CaseView,
    weights: &std::collections::BTreeMap<u16, f64>,
) -> Vec<(u16, f64)> {
    weights
        .iter()
        .filter(|(c, w)| w.is_finite() && **w > 0.0 && class_present(case, **c))
        .map(|(c, w)| (*c, *w))
        .collect()
}

/// Places one item of a batch. `forced` says whether the item is a forced-foreground slot
/// (only read under [`Policy::ForegroundOversample`]).
pub(crate) fn place_item(
    case: &impl CaseView,
    patch: [usize; 3],
    policy: &Policy,
    forced: bool,
    rng: &mut Rng,
) -> Result<Placement, SamplerError> {
    let shape = case.shape();
    let bounds = crop_bounds(shape, patch);
    let uniform = |rng: &mut Rng, class| Placement {
        origin: uniform_origin(rng, &bounds),
        forced_foreground: false,
        class,
    };
    let centred_on = |rng: &mut Rng, class: u16| -> Option<Placement> {
        let locations = case.locations(class);
        let voxel = *locations.get(rng.index(locations.len()))?;
        Some(Placement {
            origin: centred_origin(voxel, patch, &bounds),
            forced_foreground: true,
            class: Some(class),
        })
    };
    match policy {
        Policy::Uniform => Ok(uniform(rng, None)),
        Policy::ForegroundOversample { .. } => {
            if !forced {
                return Ok(uniform(rng, None));
            }
            match choose_uniform(rng, case.foreground_classes()) {
                Some(class) => Ok(centred_on(rng, class).unwrap_or_else(|| uniform(rng, None))),
                None => {
                    tracing::debug!(case = case.id(), "no foreground class: uniform crop");
                    Ok(uniform(rng, None))
                }
            }
        }
        Policy::ClassWeights { weights } => {
            let present = present_weights(case, weights);
            let Some(class) = choose_weighted(rng, &present) else {
                return Err(SamplerError::Case {
                    case: case.id().to_string(),
                    reason: format!(
                        "none of the weighted classes {:?} is present",
                        weights.keys().collect::<Vec<_>>()
                    ),
                });
            };
            if class != 0 {
                return Ok(centred_on(rng, class).unwrap_or_else(|| uniform(rng, Some(class))));
            }
            background_placement(case, patch, &bounds, rng)
        }
    }
}

/// A crop centred on a background voxel: draws up to [`BACKGROUND_TRIES`] uniform voxels and
/// takes the first labelled 0; a uniform crop when none is found.
fn background_placement(
    case: &impl CaseView,
    patch: [usize; 3],
    bounds: &[[i64; 2]; 3],
    rng: &mut Rng,
) -> Result<Placement, SamplerError> {
    let shape = case.shape();
    if shape.iter().all(|&s| s > 0) {
        for _ in 0..BACKGROUND_TRIES {
            let voxel = [
                rng.index(shape[0]),
                rng.index(shape[1]),
                rng.index(shape[2]),
            ];
            if case.label_at(voxel)? == 0 {
                let v32 = voxel.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
                return Ok(Placement {
                    origin: centred_origin(v32, patch, bounds),
                    forced_foreground: false,
                    class: Some(0),
                });
            }
        }
    }
    tracing::debug!(case = case.id(), "no background voxel found: uniform crop");
    Ok(Placement {
        origin: uniform_origin(rng, bounds),
        forced_foreground: false,
        class: Some(0),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::placement::is_forced;
    use std::collections::BTreeMap;

    /// An in-memory case: a label volume and its class locations.
    pub(crate) struct MemCase {
        pub id: String,
        pub shape: [usize; 3],
        pub labels: Vec<u16>,
        pub classes: Vec<u16>,
        pub locations: BTreeMap<u16, Vec<[u32; 3]>>,
    }

    impl MemCase {
        /// A case whose labels come from `f(z, y, x)`; every voxel is a stored location.
        pub fn new(shape: [usize; 3], f: impl Fn(usize, usize, usize) -> u16) -> MemCase {
            let mut labels = Vec::with_capacity(shape.iter().product());
            let mut locations: BTreeMap<u16, Vec<[u32; 3]>> = BTreeMap::new();
            for z in 0..shape[0] {
                for y in 0..shape[1] {
                    for x in 0..shape[2] {
                        let c = f(z, y, x);
                        labels.push(c);
                        if c != 0 {
                            locations
                                .entry(c)
                                .or_default()
                                .push([z as u32, y as u32, x as u32]);
                        }
                    }
                }
            }
            let classes = locations.keys().copied().collect();
            MemCase {
                id: "mem".into(),
                shape,
                labels,
                classes,
                locations,
            }
        }

        pub fn label(&self, v: [i64; 3]) -> Option<u16> {
            let s = self.shape;
            if (0..3).any(|a| v[a] < 0 || v[a] >= s[a] as i64) {
                return None;
            }
            let [z, y, x] = v.map(|c| c as usize);
            self.labels.get((z * s[1] + y) * s[2] + x).copied()
        }

        /// Whether the patch at `origin` contains a voxel of `class`.
        pub fn patch_contains(&self, origin: [i64; 3], patch: [usize; 3], class: u16) -> bool {
            for z in 0..patch[0] as i64 {
                for y in 0..patch[1] as i64 {
                    for x in 0..patch[2] as i64 {
                        if self.label([origin[0] + z, origin[1] + y, origin[2] + x]) == Some(class)
                        {
                            return true;
                        }
                    }
                }
            }
            false
        }
    }

    impl CaseView for MemCase {
        fn id(&self) -> &str {
            &self.id
        }
        fn shape(&self) -> [usize; 3] {
            self.shape
        }
        fn foreground_classes(&self) -> &[u16] {
            &self.classes
        }
        fn locations(&self, class: u16) -> &[[u32; 3]] {
            self.locations.get(&class).map(Vec::as_slice).unwrap_or(&[])
        }
        fn has_background(&self) -> bool {
            self.labels.contains(&0)
        }
        fn label_at(&self, v: [usize; 3]) -> Result<u16, SamplerError> {
            self.label(v.map(|c| c as i64))
                .ok_or_else(|| SamplerError::invalid("voxel", format!("{v:?} outside")))
        }
    }

    /// Two small blobs (classes 1 and 2) in a 20×24×28 volume; background elsewhere.
    pub(crate) fn blob_case() -> MemCase {
        MemCase::new([20, 24, 28], |z, y, x| {
            if (3..6).contains(&z) && (4..7).contains(&y) && (5..9).contains(&x) {
                1
            } else if (14..16).contains(&z) && (18..20).contains(&y) && (20..22).contains(&x) {
                2
            } else {
                0
            }
        })
    }

    #[test]
    fn forced_items_contain_their_class() {
        let case = blob_case();
        let policy = Policy::ForegroundOversample { fraction: 0.5 };
        for patch in [[4, 4, 4], [8, 16, 8], [32, 32, 40]] {
            for i in 0..200u64 {
                let mut rng = Rng::from_seed(i);
                let p = place_item(&case, patch, &policy, true, &mut rng).unwrap();
                assert!(p.forced_foreground);
                let class = p.class.unwrap();
                assert!(case.patch_contains(p.origin, patch, class), "{p:?}");
            }
        }
    }

    #[test]
    fn weighted_items_contain_their_class_and_follow_weights() {
        let case = blob_case();
        let weights: BTreeMap<u16, f64> = [(0, 1.0), (1, 1.0), (2, 2.0), (7, 5.0)].into();
        let policy = Policy::ClassWeights { weights };
        let patch = [6, 6, 6];
        let n = 8000usize;
        let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
        for i in 0..n as u64 {
            let mut rng = crate::rng::stream(3, i, crate::rng::StreamKind::Item, 0);
            let p = place_item(&case, patch, &policy, false, &mut rng).unwrap();
            let class = p.class.unwrap();
            *counts.entry(class).or_default() += 1;
            assert!(case.patch_contains(p.origin, patch, class), "{p:?}");
            assert_eq!(p.forced_foreground, class != 0);
        }
        // Class 7 is absent: weights renormalise to 1:1:2 over classes 0, 1, 2. Binomial bound:
        // each count within 5 sd of n * p.
        assert_eq!(counts.get(&7), None);
        for (class, p) in [(0u16, 0.25), (1, 0.25), (2, 0.5)] {
            let got = *counts.get(&class).unwrap_or(&0) as f64;
            let mean = n as f64 * p;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (got - mean).abs() < 5.0 * sd,
                "class {class}: {got} vs {mean}"
            );
        }
    }

    #[test]
    fn weights_with_no_present_class_are_an_error() {
        let case = blob_case();
        let policy = Policy::ClassWeights {
            weights: [(9, 1.0), (1, 0.0)].into(),
        };
        let err = place_item(&case, [4, 4, 4], &policy, false, &mut Rng::from_seed(0));
        assert!(matches!(err, Err(SamplerError::Case { .. })), "{err:?}");
    }

    #[test]
    fn all_foreground_case_falls_back_for_background() {
        let case = MemCase::new([5, 5, 5], |_, _, _| 3);
        assert!(!case.has_background());
        let policy = Policy::ClassWeights {
            weights: [(0, 1.0)].into(),
        };
        assert!(place_item(&case, [4, 4, 4], &policy, false, &mut Rng::from_seed(0)).is_err());
        // Background listed as present but nowhere to be found: uniform fallback, class 0.
        struct Liar(MemCase);
        impl CaseView for Liar {
            fn id(&self) -> &str {
                self.0.id()
            }
            fn shape(&self) -> [usize; 3] {
                self.0.shape()
            }
            fn foreground_classes(&self) -> &[u16] {
                self.0.foreground_classes()
            }
            fn locations(&self, class: u16) -> &[[u32; 3]] {
                self.0.locations(class)
            }
            fn has_background(&self) -> bool {
                true
            }
            fn label_at(&self, v: [usize; 3]) -> Result<u16, SamplerError> {
                self.0.label_at(v)
            }
        }
        let liar = Liar(case);
        let p = place_item(&liar, [4, 4, 4], &policy, false, &mut Rng::from_seed(0)).unwrap();
        assert_eq!(p.class, Some(0));
        assert!(!p.forced_foreground);
    }

    #[test]
    fn no_foreground_falls_back_to_uniform() {
        let case = MemCase::new([6, 6, 6], |_, _, _| 0);
        let policy = Policy::ForegroundOversample { fraction: 1.0 };
        let p = place_item(&case, [4, 4, 4], &policy, true, &mut Rng::from_seed(0)).unwrap();
        assert!(!p.forced_foreground);
        assert_eq!(p.class, None);
    }

    #[test]
    fn forced_share_over_many_batches() {
        // The forced share is exactly the round rule, batch by batch.
        let case = blob_case();
        for (batch, fraction) in [(2usize, 0.33f64), (2, 0.5), (5, 0.5), (7, 0.25), (1, 0.5)] {
            let policy = Policy::ForegroundOversample { fraction };
            let mut forced = 0;
            for b in 0..50u64 {
                for i in 0..batch {
                    let mut rng = crate::rng::stream(1, b, crate::rng::StreamKind::Item, i as u64);
                    let f = is_forced(i, batch, fraction);
                    let p = place_item(&case, [4, 4, 4], &policy, f, &mut rng).unwrap();
                    forced += usize::from(p.forced_foreground);
                }
            }
            let per_batch = batch - (batch as f64 * (1.0 - fraction)).round_ties_even() as usize;
            assert_eq!(forced, 50 * per_batch, "batch {batch} fraction {fraction}");
        }
    }
}

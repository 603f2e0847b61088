//! Class statistics and class locations for foreground sampling, and deterministic random
//! subsampling shared by the dataset-level statistics.
//!
//! nnU-Net stores, per class, up to 10,000 voxel coordinates but at least 1% of that class's
//! voxels, chosen uniformly without replacement; the sampler centres forced-foreground crops on
//! them. Here that takes two linear passes over the label map whatever the number of classes: one
//! counts the voxels of every class, then the wanted ranks are drawn per class, and one more pass
//! picks the voxels with those ranks. Memory stays proportional to the sample, not to the
//! foreground (a 35 M voxel map with 30% foreground would otherwise need 40 MB of indices).
//!
//! Randomness comes from ChaCha8 seeded from a `u64`; bounded draws use Lemire's method on raw
//! 64-bit outputs, so results depend only on the seed and this code, not on `rand`'s
//! distribution internals.

use std::collections::BTreeMap;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::types::{Element, LabelData, VoxelData};

/// Most coordinates stored per class (unless 1% of the class is more).
pub const MAX_LOCATIONS_PER_CLASS: u64 = 10_000;
/// Smallest fraction of a class's voxels that is stored, in percent.
pub const MIN_LOCATION_PERCENT: u64 = 1;

/// A per-case seed: the dataset seed mixed with a stable hash (FNV-1a) of the case identifier.
///
/// The result is the same on every platform and every run, unlike `std`'s `DefaultHasher`.
pub fn case_seed(seed: u64, case_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in case_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(seed ^ splitmix64(h))
}

/// One step of SplitMix64: a fast, well-mixed 64-bit hash (the grid crate's mixer).
pub(crate) use patchflow_grid::rng::mix as splitmix64;

/// The generator every sampling routine of this crate uses.
pub(crate) fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform integer in `0..n` (`n > 0`), Lemire's nearly divisionless method.
pub(crate) fn below(rng: &mut impl RngCore, n: u64) -> u64 {
    debug_assert!(n > 0);
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

/// `n` distinct ranks out of `0..count`, uniformly, sorted (Floyd's algorithm over a bit set:
/// `n` draws, and `count / 8` bytes that also yield the ranks in order without sorting).
pub(crate) fn sample_ranks(rng: &mut impl RngCore, count: u64, n: u64) -> Vec<u64> {
    if n >= count {
        return (0..count).collect();
    }
    let mut bits = vec![0u64; count.div_ceil(64) as usize];
    let mut set = |i: u64| {
        let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        let was_set = bits[word] & bit != 0;
        bits[word] |= bit;
        was_set
    };
    for j in (count - n)..count {
        let t = below(rng, j + 1);
        if set(t) {
            // `j` is larger than every earlier draw, so it is free.
            set(j);
        }
    }
    let mut ranks = Vec::with_capacity(n as usize);
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            ranks.push(w as u64 * 64 + u64::from(word.trailing_zeros()));
            word &= word - 1;
        }
    }
    ranks
}

/// How many locations nnU-Net keeps for a class of `count` voxels:
/// `max(min(10000, count), ceil(1% of count))`.
pub fn locations_to_keep(count: u64) -> u64 {
    count
        .min(MAX_LOCATIONS_PER_CLASS)
        .max(count.div_ceil(100 / MIN_LOCATION_PERCENT))
}

/// Voxel count per class, class 0 included.
pub type ClassVoxels = BTreeMap<u16, u64>;
/// Sampled voxel coordinates `[z, y, x]` per foreground class, sorted by flat index.
pub type ClassLocations = BTreeMap<u16, Vec<[u32; 3]>>;

/// A label element (`u8` or `u16`).
trait LabelValue: Copy + Default + PartialEq + std::ops::BitOr<Output = Self> {
    fn index(self) -> usize;
}
impl LabelValue for u8 {
    #[inline(always)]
    fn index(self) -> usize {
        usize::from(self)
    }
}
impl LabelValue for u16 {
    #[inline(always)]
    fn index(self) -> usize {
        usize::from(self)
    }
}

/// Voxel counts per class (background included) and sampled voxel coordinates `[z, y, x]` per
/// foreground class, sorted by flat index.
///
/// For every class `c > 0` present, [`locations_to_keep`] voxels are chosen uniformly without
/// replacement with a ChaCha8 generator seeded from `seed` (classes in increasing order share the
/// generator). `shape` is `[z, y, x]`; voxels past `shape`'s volume or the label's length are
/// ignored. Class 0 is always in the counts, other classes only when present.
pub fn class_locations(
    label: &LabelData,
    shape: [usize; 3],
    seed: u64,
) -> (ClassVoxels, ClassLocations) {
    class_locations_outside_mask(label, shape, seed, None)
}

/// [`class_locations`] for a label map whose value `outside_mask_label` marks voxels outside
/// nnU-Net's non-zero mask (its −1): those voxels are counted as background (class 0, which
/// they are served as) and never become a class or a location. With `None` this is exactly
/// [`class_locations`].
pub fn class_locations_outside_mask(
    label: &LabelData,
    shape: [usize; 3],
    seed: u64,
    outside_mask_label: Option<u16>,
) -> (ClassVoxels, ClassLocations) {
    // Marker 0 would be background anyway, so it stands for "no marker".
    let marker = outside_mask_label.map_or(0, usize::from);
    match label {
        LabelData::U8(v) => locations_of(v, shape, seed, 256, marker),
        LabelData::U16(v) => locations_of(v, shape, seed, 65_536, marker),
    }
}

fn locations_of<T: LabelValue>(
    labels: &[T],
    shape: [usize; 3],
    seed: u64,
    classes: usize,
    marker: usize,
) -> (ClassVoxels, ClassLocations) {
    let voxels = labels.len().min(shape.iter().product());
    let labels = &labels[..voxels];
    let mut counts = histogram(labels, classes);
    if marker != 0 && marker < counts.len() {
        counts[0] += counts[marker];
        counts[marker] = 0;
    }

    let mut class_voxels = BTreeMap::new();
    class_voxels.insert(0u16, counts[0]);
    let mut rng = rng(seed);
    let max_class = counts.iter().rposition(|&n| n > 0).unwrap_or(0);
    let mut states: Vec<ClassState> = (0..=max_class).map(|_| ClassState::default()).collect();
    for (c, &count) in counts.iter().enumerate().take(max_class + 1).skip(1) {
        if count == 0 {
            continue;
        }
        class_voxels.insert(c as u16, count);
        let mut wanted = sample_ranks(&mut rng, count, locations_to_keep(count));
        let n = wanted.len();
        wanted.push(u64::MAX); // sentinel: never equals a rank
        states[c] = ClassState {
            seen: 0,
            taken: 0,
            wanted,
            picked: vec![[0; 3]; n + 1], // one spare slot for the branch-free store
        };
    }
    let mut locations: ClassLocations = BTreeMap::new();
    if max_class == 0 {
        return (class_voxels, locations);
    }
    let [_, ny, nx] = shape;
    for (r, row) in labels.chunks(nx.max(1)).enumerate() {
        if row.iter().fold(T::default(), |a, &b| a | b) == T::default() {
            continue;
        }
        let (z, y) = ((r / ny) as u32, (r % ny) as u32);
        for (x, &l) in row.iter().enumerate() {
            let c = l.index();
            if c == 0 || c == marker {
                continue;
            }
            // Branch-free selection: always store into the next slot, advance only on a hit.
            // Selected ranks are dense for small classes, so a branch here mispredicts often.
            let s = &mut states[c];
            let hit = s.wanted[s.taken] == s.seen;
            s.picked[s.taken] = [z, y, x as u32];
            s.taken += usize::from(hit);
            s.seen += 1;
        }
    }
    for (c, s) in states.into_iter().enumerate() {
        if s.taken > 0 {
            let mut picked = s.picked;
            picked.truncate(s.taken);
            locations.insert(c as u16, picked);
        }
    }
    (class_voxels, locations)
}

/// Selection state of one class during the picking pass.
#[derive(Default)]
struct ClassState {
    /// Voxels of the class seen so far (the rank of the next one).
    seen: u64,
    /// Voxels picked so far.
    taken: usize,
    /// Sorted ranks to pick, followed by a `u64::MAX` sentinel.
    wanted: Vec<u64>,
    /// Picked coordinates, with one spare slot.
    picked: Vec<[u32; 3]>,
}

/// Voxel count per label value (`classes` bins).
fn histogram<T: LabelValue>(labels: &[T], classes: usize) -> Vec<u64> {
    // Four interleaved tables avoid stalls on runs of the same value (the common case).
    let mut tables = vec![0u64; classes * 4];
    let (t0, rest) = tables.split_at_mut(classes);
    let (t1, rest) = rest.split_at_mut(classes);
    let (t2, t3) = rest.split_at_mut(classes);
    let mut chunks = labels.chunks_exact(4);
    for c in &mut chunks {
        t0[c[0].index()] += 1;
        t1[c[1].index()] += 1;
        t2[c[2].index()] += 1;
        t3[c[3].index()] += 1;
    }
    for &l in chunks.remainder() {
        t0[l.index()] += 1;
    }
    (0..classes)
        .map(|c| t0[c] + t1[c] + t2[c] + t3[c])
        .collect()
}

/// Intensities of the voxels where the label is non-zero, uniformly subsampled without
/// replacement to at most `max` values (all of them, in voxel order, when there are fewer).
///
/// Deterministic for a given `seed`. The planner pools these over the training cases to derive
/// CT normalisation statistics ([`crate::CtStats::from_samples`]). Voxels past the shorter of
/// the two buffers are ignored.
pub fn foreground_samples(image: &VoxelData, label: &LabelData, max: usize, seed: u64) -> Vec<f32> {
    let voxels = image.len().min(label.len());
    let foreground: u64 = match label {
        LabelData::U8(v) => v[..voxels].iter().filter(|&&l| l != 0).count() as u64,
        LabelData::U16(v) => v[..voxels].iter().filter(|&&l| l != 0).count() as u64,
    };
    let ranks = sample_ranks(&mut rng(seed), foreground, (max as u64).min(foreground));
    let mut out = Vec::with_capacity(ranks.len());
    if ranks.is_empty() {
        return out;
    }
    crate::with_voxels!(image, img => match label {
        LabelData::U8(l) => gather_ranked(&img[..voxels], &l[..voxels], &ranks, &mut out),
        LabelData::U16(l) => gather_ranked(&img[..voxels], &l[..voxels], &ranks, &mut out),
    });
    out
}

/// Pushes the intensities of the foreground voxels whose foreground rank is in `ranks` (sorted).
fn gather_ranked<T: Element, L: LabelValue>(
    image: &[T],
    labels: &[L],
    ranks: &[u64],
    out: &mut Vec<f32>,
) {
    let mut rank = 0u64;
    let mut next = ranks.iter().peekable();
    for (x, l) in image.iter().zip(labels) {
        if l.index() == 0 {
            continue;
        }
        match next.peek() {
            Some(&&r) if r == rank => {
                out.push(x.to_f64() as f32);
                next.next();
            }
            Some(_) => {}
            None => break,
        }
        rank += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keep_rule_matches_nnunet() {
        assert_eq!(locations_to_keep(1), 1);
        assert_eq!(locations_to_keep(123), 123);
        assert_eq!(locations_to_keep(10_000), 10_000);
        assert_eq!(locations_to_keep(10_001), 10_000);
        assert_eq!(locations_to_keep(1_000_000), 10_000);
        assert_eq!(locations_to_keep(1_000_001), 10_001);
        assert_eq!(locations_to_keep(3_500_000), 35_000);
    }

    #[test]
    fn case_seed_is_stable_and_distinguishes_cases() {
        assert_eq!(case_seed(7, "case_001"), case_seed(7, "case_001"));
        assert_ne!(case_seed(7, "case_001"), case_seed(7, "case_002"));
        assert_ne!(case_seed(7, "case_001"), case_seed(8, "case_001"));
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = rng(1);
        let mut hit = [false; 7];
        for _ in 0..1000 {
            let v = below(&mut r, 7);
            assert!(v < 7);
            hit[v as usize] = true;
        }
        assert!(hit.iter().all(|&h| h));
    }

    #[test]
    fn ranks_are_distinct_sorted_and_roughly_uniform() {
        let mut r = rng(3);
        let mut bins = [0u32; 10];
        for _ in 0..200 {
            let ranks = sample_ranks(&mut r, 1000, 50);
            assert_eq!(ranks.len(), 50);
            assert!(ranks.windows(2).all(|w| w[0] < w[1]));
            assert!(*ranks.last().unwrap() < 1000);
            for x in ranks {
                bins[(x / 100) as usize] += 1;
            }
        }
        // 10,000 draws over 10 bins: each bin expects 1000 (sd ~30).
        for b in bins {
            assert!((850..1150).contains(&b), "{bins:?}");
        }
    }

    /// A label volume with a big class 1, a mid class 2 and a single-voxel class 7.
    fn test_labels(shape: [usize; 3]) -> Vec<u8> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|i| match i {
                _ if i == n / 2 + 1 => 7,
                _ if i % 3 == 0 => 1,
                _ if i % 97 == 5 => 2,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn locations_hold_their_class_and_follow_the_rule() {
        let shape = [40, 50, 60];
        let labels = LabelData::U8(test_labels(shape));
        let (counts, locs) = class_locations(&labels, shape, 11);
        let total: u64 = counts.values().sum();
        assert_eq!(total, 40 * 50 * 60);
        for (&c, &count) in counts.iter().filter(|(c, _)| **c > 0) {
            let v = &locs[&c];
            assert_eq!(v.len() as u64, locations_to_keep(count), "class {c}");
            let flat: Vec<usize> = v
                .iter()
                .map(|&[z, y, x]| (z as usize * shape[1] + y as usize) * shape[2] + x as usize)
                .collect();
            assert!(flat.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
            for &i in &flat {
                assert_eq!(labels.get(i), c);
            }
        }
        assert_eq!(counts[&7], 1);
        assert!(!locs.contains_key(&0));
        // Deterministic for a seed, different for another.
        assert_eq!(class_locations(&labels, shape, 11).1, locs);
        assert_ne!(class_locations(&labels, shape, 12).1[&1], locs[&1]);
    }

    #[test]
    fn the_outside_mask_marker_is_background_and_never_a_location() {
        let shape = [2, 3, 4];
        let mut v = vec![0u8; 24];
        v[1] = 9; // the marker, below class 12 and above class 2
        v[2] = 9;
        v[3] = 2;
        v[20] = 12;
        let labels = LabelData::U8(v);
        let (counts, locs) = class_locations_outside_mask(&labels, shape, 5, Some(9));
        assert_eq!(counts, BTreeMap::from([(0, 22), (2, 1), (12, 1)]));
        assert_eq!(locs.keys().copied().collect::<Vec<_>>(), vec![2, 12]);
        // Without a marker (or a marker nowhere in the map) the result is class_locations'.
        assert_eq!(
            class_locations_outside_mask(&labels, shape, 5, None),
            class_locations(&labels, shape, 5)
        );
        let plain = class_locations(&labels, shape, 5);
        assert_eq!(
            class_locations_outside_mask(&labels, shape, 5, Some(254)),
            plain
        );
        assert_eq!(plain.0[&9], 2);
    }

    #[test]
    fn u16_labels_and_empty_maps() {
        let shape = [2, 3, 4];
        let mut v = vec![0u16; 24];
        v[5] = 300;
        v[6] = 300;
        v[23] = 65535;
        let (counts, locs) = class_locations(&LabelData::U16(v), shape, 0);
        assert_eq!(counts, BTreeMap::from([(0, 21), (300, 2), (65535, 1)]));
        assert_eq!(locs[&300], vec![[0, 1, 1], [0, 1, 2]]);
        assert_eq!(locs[&65535], vec![[1, 2, 3]]);
        let (counts, locs) = class_locations(&LabelData::U8(vec![0; 24]), shape, 0);
        assert_eq!(counts, BTreeMap::from([(0, 24)]));
        assert!(locs.is_empty());
    }

    #[test]
    fn foreground_samples_are_foreground_and_deterministic() {
        let shape = [10, 20, 30];
        let labels = test_labels(shape);
        let image: Vec<i16> = (0..labels.len()).map(|i| i as i16 % 1000).collect();
        let fg: Vec<f32> = labels
            .iter()
            .zip(&image)
            .filter(|(l, _)| **l != 0)
            .map(|(_, &v)| f32::from(v))
            .collect();
        let image = VoxelData::I16(image);
        let labels = LabelData::U8(labels);
        let all = foreground_samples(&image, &labels, usize::MAX, 5);
        assert_eq!(all, fg);
        let some = foreground_samples(&image, &labels, 100, 5);
        assert_eq!(some.len(), 100);
        assert_eq!(some, foreground_samples(&image, &labels, 100, 5));
        // A subsequence of the foreground intensities (sampling keeps voxel order).
        let mut it = fg.iter();
        assert!(some.iter().all(|s| it.any(|f| f == s)));
        assert!(foreground_samples(&image, &LabelData::U8(vec![0; 6000]), 10, 5).is_empty());
    }

    proptest! {
        #[test]
        fn locations_are_valid_for_any_map(
            nz in 1usize..6, ny in 1usize..7, nx in 1usize..8,
            seed in any::<u64>(),
            raw in proptest::collection::vec(0u8..5, 1..400),
        ) {
            let shape = [nz, ny, nx];
            let n = nz * ny * nx;
            let labels: Vec<u8> = (0..n).map(|i| raw[i % raw.len()]).collect();
            let (counts, locs) = class_locations(&LabelData::U8(labels.clone()), shape, seed);
            for c in 0u16..5 {
                let count = labels.iter().filter(|&&l| u16::from(l) == c).count() as u64;
                prop_assert_eq!(counts.get(&c).copied().unwrap_or(0), count);
                if c > 0 {
                    let got = locs.get(&c).map_or(0, |v| v.len() as u64);
                    prop_assert_eq!(got, locations_to_keep(count));
                }
            }
            for (c, v) in &locs {
                for &[z, y, x] in v {
                    let i = (z as usize * ny + y as usize) * nx + x as usize;
                    prop_assert_eq!(u16::from(labels[i]), *c);
                }
            }
        }
    }
}

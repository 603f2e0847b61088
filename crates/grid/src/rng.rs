//! The seeded generators behind every reproducible draw of patchflow: case choice and crop
//! placement in the sampler, augmentation parameters, random patch-size sampling.
//!
//! A batch must be the same for the same seed on any machine, with any thread count and across
//! releases, so the generators are defined here in full rather than borrowed from a crate whose
//! streams may change: SplitMix64 (Steele, Lea & Flood 2014, the constants of Vigna's
//! `splitmix64.c`) as a mixer and seeder, xoshiro256++ (Blackman & Vigna 2019) as the generator,
//! integers below `n` by Lemire's multiply-and-reject method, floats in `[0, 1)` from the top 53
//! bits. Changing anything here changes every batch ever served: treat this file as a format.

/// The SplitMix64 increment (the 64-bit golden ratio).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// One SplitMix64 step: advances `state` and returns the next output.
#[inline]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64 applied to one word: a bijective 64-bit mixer.
#[inline]
pub fn mix(x: u64) -> u64 {
    let mut s = x;
    splitmix64(&mut s)
}

/// Folds a key of several words into one: `k = mix(parts[0])`, then `k = mix(k ^ part)` for each
/// further part. The stream of one decision then never depends on how many draws another made.
/// An empty key folds to `mix(0)`.
#[inline]
pub fn fold_key(parts: &[u64]) -> u64 {
    let (first, rest) = parts.split_first().unwrap_or((&0, &[]));
    rest.iter().fold(mix(*first), |k, &p| mix(k ^ p))
}

/// A uniform index in `0..n` for `(seed, iteration)`, drawn with SplitMix64 alone so that any
/// client (Rust, Python, C++) reproduces it in a few lines. Normative:
/// 1. `key` = first SplitMix64 output of a state initialised to `seed`;
/// 2. `state = key XOR iteration`;
/// 3. draw SplitMix64 outputs `r` from `state` until `r >= 2^64 mod n` (exactly uniform);
/// 4. return `r mod n`.
///
/// `n == 0` and `n == 1` return 0 without drawing. Random patch-size sampling uses it.
pub fn uniform_index(seed: u64, iteration: u64, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let n64 = n as u64;
    let mut state = mix(seed) ^ iteration;
    // 2^64 mod n, without 128-bit arithmetic.
    let threshold = n64.wrapping_neg() % n64;
    loop {
        let r = splitmix64(&mut state);
        if r >= threshold {
            // `r % n64 < n`, which came from a usize, so the cast cannot truncate.
            return (r % n64) as usize;
        }
    }
}

/// The xoshiro256++ generator.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator seeded from one word through four SplitMix64 steps (its authors' seeding).
    pub fn from_seed(seed: u64) -> Rng {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for w in &mut s {
            *w = splitmix64(&mut sm);
        }
        if s == [0; 4] {
            // The all-zero state is xoshiro's one fixed point; SplitMix64 never yields four zeros
            // in a row, but keep the generator well defined regardless.
            s[0] = GOLDEN;
        }
        Rng { s }
    }

    /// The generator seeded with [`fold_key`] of `parts`.
    pub fn keyed(parts: &[u64]) -> Rng {
        Rng::from_seed(fold_key(parts))
    }

    /// The sub-stream `tag` of `seed`: `from_seed(mix(mix(seed) ^ tag))`.
    pub fn sub(seed: u64, tag: u64) -> Rng {
        Rng::keyed(&[seed, tag])
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform integer in `[0, n)` (Lemire); `0` when `n == 0`.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        let mut low = m as u64;
        if low < n {
            let threshold = n.wrapping_neg() % n;
            while low < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
                low = m as u64;
            }
        }
        (m >> 64) as u64
    }

    /// Uniform index into a slice of length `len` (`0` when empty).
    #[inline]
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// Uniform integer in the closed range `[lo, hi]`; `lo` when `hi <= lo`.
    #[inline]
    pub fn range_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        let span = (hi.wrapping_sub(lo) as u64).wrapping_add(1);
        if span == 0 {
            // The whole i64 range.
            return self.next_u64() as i64;
        }
        lo.wrapping_add(self.below(span) as i64)
    }

    /// Uniform float in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `true` with probability `p` (never for `p <= 0`, always for `p >= 1`).
    #[inline]
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform float in `[lo, hi]` (`lo` when the range is empty or reversed).
    #[inline]
    pub fn uniform(&mut self, [lo, hi]: [f64; 2]) -> f64 {
        let u = self.unit();
        if hi > lo {
            (lo + (hi - lo) * u).clamp(lo, hi)
        } else {
            lo
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // Vigna's splitmix64.c seeded with 1234567.
        let mut s = 1_234_567u64;
        for e in [
            6_457_827_717_110_365_317u64,
            3_203_168_211_198_807_973,
            9_817_491_932_198_370_423,
            4_593_380_528_125_082_431,
            16_408_922_859_458_223_821,
        ] {
            assert_eq!(splitmix64(&mut s), e);
        }
    }

    #[test]
    fn xoshiro_reference_values() {
        // xoshiro256plusplus.c from state [1, 2, 3, 4].
        let mut r = Rng { s: [1, 2, 3, 4] };
        for e in [
            41_943_041u64,
            58_720_359,
            3_588_806_011_781_223,
            3_591_011_842_654_386,
            9_228_616_714_210_784_205,
        ] {
            assert_eq!(r.next_u64(), e);
        }
    }

    #[test]
    fn keys_fold_as_documented() {
        assert_eq!(fold_key(&[7]), mix(7));
        assert_eq!(fold_key(&[7, 3, 2, 1]), mix(mix(mix(mix(7) ^ 3) ^ 2) ^ 1));
        assert_eq!(fold_key(&[]), mix(0));
        assert_eq!(
            Rng::sub(5, 1).next_u64(),
            Rng::from_seed(mix(mix(5) ^ 1)).next_u64()
        );
        let base = Rng::keyed(&[7, 3, 2, 1]).next_u64();
        assert_eq!(base, Rng::keyed(&[7, 3, 2, 1]).next_u64());
        for other in [[8, 3, 2, 1], [7, 4, 2, 1], [7, 3, 1, 1], [7, 3, 2, 2]] {
            assert_ne!(base, Rng::keyed(&other).next_u64());
        }
    }

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut r = Rng::from_seed(42);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            let v = r.below(7) as usize;
            assert!(v < 7);
            seen[v] += 1;
        }
        // Each bucket expects 1000; binomial(7000, 1/7) has sd ~29: 850..1150 is > 5 sd.
        for (i, c) in seen.iter().enumerate() {
            assert!((850..1150).contains(c), "bucket {i} got {c}");
        }
        assert_eq!(r.below(0), 0);
        assert_eq!(r.below(1), 0);
    }

    #[test]
    fn range_inclusive_hits_both_ends() {
        let mut r = Rng::from_seed(1);
        let (mut lo_hit, mut hi_hit) = (false, false);
        for _ in 0..1000 {
            let v = r.range_inclusive(-2, 1);
            assert!((-2..=1).contains(&v));
            lo_hit |= v == -2;
            hi_hit |= v == 1;
        }
        assert!(lo_hit && hi_hit);
        assert_eq!(r.range_inclusive(5, 5), 5);
        assert_eq!(r.range_inclusive(5, 4), 5);
        let _any = r.range_inclusive(i64::MIN, i64::MAX);
    }

    #[test]
    fn floats_are_in_range() {
        let mut r = Rng::from_seed(9);
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            sum += u;
            let v = r.uniform([0.7, 1.4]);
            assert!((0.7..=1.4).contains(&v));
        }
        // Mean of 10^4 uniforms: sd ~0.0029; 0.48..0.52 is ~7 sd.
        assert!((0.48..0.52).contains(&(sum / 10_000.0)));
        assert_eq!(r.uniform([2.0, 1.0]), 2.0);
        assert!(!r.chance(0.0));
        assert!(r.chance(1.0));
    }

    #[test]
    fn uniform_index_is_uniform_and_keyed() {
        assert_eq!(uniform_index(7, 3, 0), 0);
        assert_eq!(uniform_index(7, 3, 1), 0);
        let n = 10usize;
        let draws = 200_000u64;
        let mut counts = vec![0u64; n];
        for it in 0..draws {
            counts[uniform_index(42, it, n)] += 1;
        }
        let expected = draws as f64 / n as f64;
        // Pearson chi-square, 9 degrees of freedom; 27.9 is the 0.999 quantile.
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 27.9, "counts {counts:?}, chi2 {chi2}");
        let a: Vec<usize> = (0..64).map(|it| uniform_index(1, it, 10)).collect();
        let b: Vec<usize> = (0..64).map(|it| uniform_index(2, it, 10)).collect();
        assert_ne!(a, b);
    }
}

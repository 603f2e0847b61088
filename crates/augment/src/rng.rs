//! The random streams behind every drawn parameter.
//!
//! Parameters must be the same for the same seed on any machine, with any thread count and
//! across releases, so the generator is defined here in full: a SplitMix64-seeded xoshiro256++
//! (Blackman and Vigna, 2019), floats in `[0, 1)` from the top 53 bits. Each transform draws from
//! its own sub-stream (`mix(seed ^ tag)`), so enabling one transform never changes what another
//! one draws for the same seed. Changing this file changes every augmented batch ever served;
//! treat it as a format.

/// SplitMix64 golden-ratio increment.
pub(crate) const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// One SplitMix64 step: advances `state` and returns the next output.
#[inline]
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64 applied to one word: a bijective 64-bit mixer.
#[inline]
pub(crate) fn mix(x: u64) -> u64 {
    let mut s = x;
    splitmix64(&mut s)
}

/// xoshiro256++ generator.
#[derive(Clone, Debug)]
pub(crate) struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator seeded from one word through four SplitMix64 steps.
    pub(crate) fn from_seed(seed: u64) -> Rng {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for w in &mut s {
            *w = splitmix64(&mut sm);
        }
        if s == [0; 4] {
            s[0] = GOLDEN;
        }
        Rng { s }
    }

    /// The sub-stream `tag` of `seed`.
    pub(crate) fn sub(seed: u64, tag: u64) -> Rng {
        Rng::from_seed(mix(mix(seed) ^ tag))
    }

    /// Next 64 random bits.
    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
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

    /// Uniform float in `[0, 1)` with 53 random bits.
    #[inline]
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `true` with probability `p` (never for `p <= 0`, always for `p >= 1`).
    #[inline]
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform float in `[lo, hi]` (`lo` when the range is empty or reversed).
    #[inline]
    pub(crate) fn uniform(&mut self, [lo, hi]: [f64; 2]) -> f64 {
        let u = self.unit();
        if hi > lo {
            (lo + (hi - lo) * u).clamp(lo, hi)
        } else {
            lo
        }
    }

    /// nnU-Net's `BGContrast` sampling of a multiplicative factor: with probability one half a
    /// value below 1 (uniform in `[lo, min(1, hi)]`), otherwise a value of at least 1 (uniform in
    /// `[max(lo, 1), hi]`); the drawn value always lies in `[lo, hi]`.
    pub(crate) fn around_one(&mut self, [lo, hi]: [f64; 2]) -> f64 {
        let below = self.unit() < 0.5;
        if below && lo < 1.0 {
            self.uniform([lo, hi.min(1.0)])
        } else if hi >= lo.max(1.0) {
            self.uniform([lo.max(1.0), hi])
        } else {
            self.uniform([lo, hi])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // Vigna's splitmix64.c seeded with 1234567.
        let mut s = 1234567u64;
        for e in [
            6457827717110365317u64,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ] {
            assert_eq!(splitmix64(&mut s), e);
        }
    }

    #[test]
    fn xoshiro_reference_values() {
        // xoshiro256plusplus.c from state [1, 2, 3, 4].
        let mut r = Rng { s: [1, 2, 3, 4] };
        for e in [
            41943041u64,
            58720359,
            3588806011781223,
            3591011842654386,
            9228616714210784205,
        ] {
            assert_eq!(r.next_u64(), e);
        }
    }

    #[test]
    fn around_one_stays_in_range_and_splits_evenly() {
        let mut r = Rng::from_seed(3);
        let n = 20_000;
        let mut below = 0;
        for _ in 0..n {
            let v = r.around_one([0.75, 1.25]);
            assert!((0.75..=1.25).contains(&v));
            below += usize::from(v < 1.0);
        }
        // Binomial(20000, 0.5): sd ~71; 5 sd.
        assert!((below as f64 - 10_000.0).abs() < 355.0, "{below}");
        for range in [[1.2, 1.5], [0.2, 0.9], [1.0, 1.0]] {
            for _ in 0..1000 {
                let v = r.around_one(range);
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

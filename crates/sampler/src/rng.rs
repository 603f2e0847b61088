//! The random streams behind every placement decision.
//!
//! Reproducibility is part of the sampler's contract: batch `index` of a stream with seed `seed`
//! must be the same today, tomorrow, on any machine and with any number of threads. The generator
//! is therefore defined here, in full, rather than borrowed from a crate whose streams may change
//! between versions:
//!
//! * every decision draws from its own stream, keyed by `(seed, batch index, stream kind, slot)`;
//!   the key is folded into one 64-bit word by repeated SplitMix64 finalisation
//!   (`k = mix(seed); k = mix(k ^ batch); k = mix(k ^ kind); k = mix(k ^ slot)`), so the stream of
//!   one item never depends on how many draws another item made, nor on which thread runs it;
//! * the word seeds a xoshiro256++ generator (Blackman and Vigna, 2019) through four SplitMix64
//!   steps, the seeding its authors recommend;
//! * integers below `n` come from Lemire's multiply-and-reject method (unbiased), floats in
//!   `[0, 1)` from the top 53 bits.
//!
//! Changing anything in this file changes every batch ever served; treat it as a format.

/// SplitMix64 golden-ratio increment.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// One SplitMix64 step: advances `state` and returns the next output.
#[inline]
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64 applied to a single word (a bijective 64-bit mixer).
#[inline]
fn mix(x: u64) -> u64 {
    let mut s = x;
    splitmix64(&mut s)
}

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

/// xoshiro256++ generator.
#[derive(Clone, Debug)]
pub(crate) struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// The stream for `(seed, batch, kind, slot)`.
    pub(crate) fn stream(seed: u64, batch: u64, kind: StreamKind, slot: u64) -> Rng {
        Rng::from_seed(Rng::key(seed, batch, kind, slot))
    }

    /// The 64-bit key of the stream `(seed, batch, kind, slot)`, for generators seeded elsewhere
    /// (the augmentation draws from its own generator seeded with this key).
    pub(crate) fn key(seed: u64, batch: u64, kind: StreamKind, slot: u64) -> u64 {
        let mut k = mix(seed);
        k = mix(k ^ batch);
        k = mix(k ^ kind as u64);
        mix(k ^ slot)
    }

    /// A generator seeded from one word through SplitMix64.
    pub(crate) fn from_seed(seed: u64) -> Rng {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for w in &mut s {
            *w = splitmix64(&mut sm);
        }
        if s == [0; 4] {
            // The all-zero state is the one fixed point of xoshiro; SplitMix64 never yields four
            // zeros in a row, but keep the generator well-defined regardless.
            s[0] = GOLDEN;
        }
        Rng { s }
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

    /// Uniform integer in `[0, n)`; `0` when `n == 0`.
    #[inline]
    pub(crate) fn below(&mut self, n: u64) -> u64 {
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
    pub(crate) fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// Uniform integer in the closed range `[lo, hi]`; `lo` when `hi < lo`.
    #[inline]
    pub(crate) fn range_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
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
    pub(crate) fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // Reference outputs of SplitMix64 seeded with 1234567 (Vigna's splitmix64.c).
        let mut s = 1234567u64;
        let expected = [
            6457827717110365317u64,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for e in expected {
            assert_eq!(splitmix64(&mut s), e);
        }
    }

    #[test]
    fn xoshiro_reference_values() {
        // xoshiro256++ from state [1, 2, 3, 4] (reference implementation xoshiro256plusplus.c).
        let mut r = Rng { s: [1, 2, 3, 4] };
        let expected = [
            41943041u64,
            58720359,
            3588806011781223,
            3591011842654386,
            9228616714210784205,
        ];
        for e in expected {
            assert_eq!(r.next_u64(), e);
        }
    }

    #[test]
    fn streams_differ_by_every_key_part() {
        let base = Rng::stream(7, 3, StreamKind::Item, 1).next_u64();
        assert_eq!(base, Rng::stream(7, 3, StreamKind::Item, 1).next_u64());
        assert_ne!(base, Rng::stream(8, 3, StreamKind::Item, 1).next_u64());
        assert_ne!(base, Rng::stream(7, 4, StreamKind::Item, 1).next_u64());
        assert_ne!(base, Rng::stream(7, 3, StreamKind::Case, 1).next_u64());
        assert_ne!(base, Rng::stream(7, 3, StreamKind::Item, 2).next_u64());
        assert_ne!(
            Rng::key(7, 3, StreamKind::Item, 1),
            Rng::key(7, 3, StreamKind::Augment, 1)
        );
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
        // Each bucket expects 1000; a binomial(7000, 1/7) has sd ~29, so 850..1150 is > 5 sd.
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
        let full = r.range_inclusive(i64::MIN, i64::MAX);
        let _ = full; // any value is valid; must not panic
    }

    #[test]
    fn unit_f64_in_half_open_interval() {
        let mut r = Rng::from_seed(9);
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let u = r.unit_f64();
            assert!((0.0..1.0).contains(&u));
            sum += u;
        }
        // Mean of 10^4 uniforms: sd = sqrt(1/12/10^4) ~ 0.0029; 0.48..0.52 is ~7 sd.
        let mean = sum / 10_000.0;
        assert!((0.48..0.52).contains(&mean), "mean {mean}");
    }
}

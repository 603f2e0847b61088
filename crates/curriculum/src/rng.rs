//! A tiny, self-contained, forever-stable random source for random patch-size sampling.
//!
//! The draw must be reproducible by any client (Rust, Python, C++) from the seed and the iteration
//! index alone, and must never change with a dependency upgrade, so it is spelled out here instead
//! of borrowed from a PRNG crate.

/// The splitmix64 increment (the 64-bit golden ratio).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Advances a splitmix64 state and returns the next output (Steele, Lea & Flood 2014; the
/// constants of Vigna's reference `splitmix64.c`).
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GAMMA);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws an index uniformly from `0..n` for `(seed, iteration)`.
///
/// Algorithm (normative; other clients reproduce it bit for bit):
/// 1. `key` = first splitmix64 output of a state initialised to `seed`;
/// 2. `state = key XOR iteration`;
/// 3. draw splitmix64 outputs `r` from `state` until `r >= 2^64 mod n` (rejection keeps the
///    draw exactly uniform);
/// 4. return `r mod n`.
///
/// `n == 0` and `n == 1` both return 0 without drawing.
pub(crate) fn uniform_index(seed: u64, iteration: u64, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let n64 = n as u64;
    let mut seed_state = seed;
    let key = splitmix64(&mut seed_state);
    let mut state = key ^ iteration;
    // 2^64 mod n, computed without 128-bit arithmetic.
    let threshold = n64.wrapping_neg() % n64;
    loop {
        let r = splitmix64(&mut state);
        if r >= threshold {
            // `r % n64 < n`, which came from a usize, so the cast cannot truncate.
            return (r % n64) as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs of Vigna's reference `splitmix64.c` for the state 1234567, as published with it and
    /// reproduced by many independent ports.
    #[test]
    fn splitmix64_matches_the_reference_vector() {
        let mut state = 1_234_567u64;
        let got: Vec<u64> = (0..5).map(|_| splitmix64(&mut state)).collect();
        assert_eq!(
            got,
            vec![
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423,
                4_593_380_528_125_082_431,
                16_408_922_859_458_223_821,
            ]
        );
    }

    #[test]
    fn degenerate_ranges_return_zero() {
        assert_eq!(uniform_index(7, 3, 0), 0);
        assert_eq!(uniform_index(7, 3, 1), 0);
    }

    #[test]
    fn draws_are_close_to_uniform() {
        let n = 10usize;
        let draws = 200_000u64;
        let mut counts = vec![0u64; n];
        for it in 0..draws {
            counts[uniform_index(42, it, n)] += 1;
        }
        let expected = draws as f64 / n as f64;
        // Pearson chi-square with 9 degrees of freedom; 27.9 is the 0.999 quantile.
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 27.9, "counts {counts:?}, chi2 {chi2}");
    }

    #[test]
    fn different_seeds_give_different_sequences() {
        let a: Vec<usize> = (0..64).map(|it| uniform_index(1, it, 10)).collect();
        let b: Vec<usize> = (0..64).map(|it| uniform_index(2, it, 10)).collect();
        assert_ne!(a, b);
    }
}

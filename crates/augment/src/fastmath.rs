//! Branch-free `f32` approximations of `log2`, `exp2`, `pow`, `sin`/`cos` and a counter-based
//! Gaussian generator, written with plain IEEE arithmetic and bit operations only: loops over
//! them vectorise, and the results are the same on every machine and at every vector width
//! (no library calls whose last bit may differ between platforms).

/// `log2(x)` for finite `x > 0` (normal numbers), absolute error below `2e-7`.
#[inline(always)]
pub(crate) fn log2(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    // Centre the mantissa on 1: m in [√½, √2).
    let big = m > std::f32::consts::SQRT_2;
    m = if big { m * 0.5 } else { m };
    e += i32::from(big);
    // ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let p = 2.0 / 9.0;
    let p = p * s2 + 2.0 / 7.0;
    let p = p * s2 + 2.0 / 5.0;
    let p = p * s2 + 2.0 / 3.0;
    let p = p * s2 + 2.0;
    let ln_m = p * s;
    e as f32 + ln_m * std::f32::consts::LOG2_E
}

/// `2^y`, relative error below `3e-7`; `y` is clamped to `[-126, 127]` (so tiny results are
/// `2^-126`, not zero).
#[inline(always)]
pub(crate) fn exp2(y: f32) -> f32 {
    let y = y.clamp(-126.0, 127.0);
    // floor(y) without a library call or a saturating conversion: adding 1.5·2²³ rounds to an
    // integer held in the low mantissa bits; step down where that rounded up.
    const MAGIC: f32 = 12_582_912.0;
    let t = y + MAGIC;
    let r = t - MAGIC;
    let down = r > y;
    let n = (t.to_bits() as i32 - MAGIC.to_bits() as i32) - i32::from(down);
    let fl = if down { r - 1.0 } else { r };
    let f = y - fl - 0.5; // [-0.5, 0.5)
    let u = f * std::f32::consts::LN_2;
    // e^u, |u| <= 0.3466: Taylor to degree 6 (error ~1.2e-7).
    let p = 1.0 / 720.0;
    let p = p * u + 1.0 / 120.0;
    let p = p * u + 1.0 / 24.0;
    let p = p * u + 1.0 / 6.0;
    let p = p * u + 0.5;
    let p = p * u + 1.0;
    let p = p * u + 1.0;
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    p * std::f32::consts::SQRT_2 * scale
}

/// `x^g` for `x` in `[0, 1]` and `g > 0`; `0^g` gives a value below `1e-37`.
#[inline(always)]
pub(crate) fn pow01(x: f32, g: f32) -> f32 {
    exp2(g * log2(x.max(1e-30)))
}

/// `(sin φ, cos φ)` for `φ` in `[-π, π]`, absolute error below `1e-6`.
#[inline(always)]
pub(crate) fn sin_cos(phi: f32) -> (f32, f32) {
    use std::f32::consts::{FRAC_PI_2, PI};
    // Fold onto [-π/2, π/2]: sin(π - φ) = sin φ, cos(π - φ) = -cos φ.
    let far = phi.abs() > FRAC_PI_2;
    let folded = if phi >= 0.0 { PI - phi } else { -PI - phi };
    let x = if far { folded } else { phi };
    let x2 = x * x;
    let s = -1.0 / 39_916_800.0;
    let s = s * x2 + 1.0 / 362_880.0;
    let s = s * x2 - 1.0 / 5040.0;
    let s = s * x2 + 1.0 / 120.0;
    let s = s * x2 - 1.0 / 6.0;
    let s = s * x2 + 1.0;
    let sin = s * x;
    let c = 1.0 / 479_001_600.0;
    let c = c * x2 - 1.0 / 3_628_800.0;
    let c = c * x2 + 1.0 / 40320.0;
    let c = c * x2 - 1.0 / 720.0;
    let c = c * x2 + 1.0 / 24.0;
    let c = c * x2 - 0.5;
    let c = c * x2 + 1.0;
    (sin, if far { -c } else { c })
}

/// A 32-bit integer hash with good avalanche (Wellons' `lowbias32`); bijective.
#[inline(always)]
pub(crate) fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Pairs of standard normal values per block of this many pairs.
pub(crate) const NOISE_BLOCK: usize = 512;

/// Fills `a` and `b` (each [`NOISE_BLOCK`] long) with independent standard normal values: the
/// Box–Muller pairs of the counters `0..NOISE_BLOCK` hashed with the block keys `k1`, `k2`.
#[inline(always)]
pub(crate) fn normal_block(
    k1: u32,
    k2: u32,
    a: &mut [f32; NOISE_BLOCK],
    b: &mut [f32; NOISE_BLOCK],
) {
    const INV24: f32 = 1.0 / (1u32 << 24) as f32;
    for (j, (oa, ob)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
        let j = j as u32;
        let h1 = hash32(hash32(j ^ k1) ^ k2);
        let h2 = hash32(hash32(j ^ k2) ^ k1);
        // 24-bit values convert exactly through i32 (a single vector conversion).
        let u1 = ((h1 >> 8) as i32 + 1) as f32 * INV24; // (0, 1]
        let u2 = (h2 >> 8) as i32 as f32 * INV24; // [0, 1)
        let r = (-2.0 * std::f32::consts::LN_2 * log2(u1)).sqrt();
        let phi = std::f32::consts::PI * (2.0 * u2 - 1.0);
        let (s, c) = sin_cos(phi);
        *oa = r * c;
        *ob = r * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_and_exp2_are_accurate() {
        let mut x = 1e-30f32;
        while x < 1e30 {
            let got = log2(x) as f64;
            let want = (x as f64).log2();
            assert!((got - want).abs() < 2e-6 * want.abs().max(1.0), "log2({x})");
            x *= 1.37;
        }
        let mut y = -125.9f32;
        while y < 126.0 {
            let got = exp2(y) as f64;
            let want = 2f64.powf(y as f64);
            assert!(((got - want) / want).abs() < 1e-6, "exp2({y}) {got} {want}");
            y += 0.173;
        }
        assert!((exp2(0.0) - 1.0).abs() < 1e-6);
        assert!(exp2(-1000.0) < 1.2e-38);
    }

    #[test]
    fn pow01_matches_powf() {
        for g in [0.7f32, 1.0, 1.23, 1.5, 3.0] {
            for i in 0..=1000 {
                let x = i as f32 / 1000.0;
                let want = (x as f64).powf(g as f64);
                let got = pow01(x, g) as f64;
                assert!((got - want).abs() < 2e-6, "{x}^{g}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn sin_cos_are_accurate() {
        let n = 10_000;
        for i in 0..=n {
            let phi = -std::f32::consts::PI + 2.0 * std::f32::consts::PI * i as f32 / n as f32;
            let (s, c) = sin_cos(phi);
            assert!((s as f64 - (phi as f64).sin()).abs() < 1e-6, "sin {phi}");
            assert!((c as f64 - (phi as f64).cos()).abs() < 1e-6, "cos {phi}");
        }
    }

    #[test]
    fn normal_blocks_look_normal() {
        let mut a = [0f32; NOISE_BLOCK];
        let mut b = [0f32; NOISE_BLOCK];
        let (mut n, mut sum, mut sq, mut within1, mut within2) =
            (0usize, 0f64, 0f64, 0usize, 0usize);
        for block in 0..200u32 {
            normal_block(hash32(block), hash32(block ^ 0xdead_beef), &mut a, &mut b);
            for &v in a.iter().chain(b.iter()) {
                let v = v as f64;
                n += 1;
                sum += v;
                sq += v * v;
                within1 += usize::from(v.abs() < 1.0);
                within2 += usize::from(v.abs() < 2.0);
            }
        }
        let nf = n as f64;
        let mean = sum / nf;
        let var = sq / nf - mean * mean;
        // n = 204800: sd of the mean 0.0022, of the variance ~0.0031, of a share ~0.001.
        assert!(mean.abs() < 0.012, "mean {mean}");
        assert!((var - 1.0).abs() < 0.016, "var {var}");
        assert!((within1 as f64 / nf - 0.6827).abs() < 0.006);
        assert!((within2 as f64 / nf - 0.9545).abs() < 0.003);
    }
}

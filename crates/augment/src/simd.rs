//! Runtime choice of the instruction set for the hot loops.
//!
//! The crate builds for the baseline target (SSE2 on x86-64), where gathers and wide vectors are
//! unavailable. [`dispatch`] runs a [`Kernel`] inside a function compiled for AVX2 and FMA when
//! the CPU has them; `Kernel::run` and everything it calls are `#[inline(always)]`, so they are
//! compiled into that function. Results are bit-identical either way: the code never asks for
//! fused multiply-adds (Rust never contracts `a * b + c` on its own) and every reduction has a
//! fixed lane layout.

/// Work to run with the best instruction set. Implementations mark `run` `#[inline(always)]`.
pub(crate) trait Kernel {
    /// What the work returns.
    type Output;
    /// Does the work.
    fn run(self) -> Self::Output;
}

/// Runs `k` compiled for the best instruction set this CPU offers.
#[inline(always)]
pub(crate) fn dispatch<K: Kernel>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports every feature `avx2` is compiled for.
            return unsafe { avx2(k) };
        }
    }
    k.run()
}

/// # Safety
///
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<K: Kernel>(k: K) -> K::Output {
    k.run()
}

/// Runs `k` compiled for the baseline target (tests compare both paths).
#[cfg(test)]
pub(crate) fn baseline<K: Kernel>(k: K) -> K::Output {
    k.run()
}

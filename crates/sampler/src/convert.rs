//! Conversion of stored little-endian runs to the served element types, with the channel's
//! normalisation fused in: one pass from the store's bytes to the batch buffer. The per-element
//! image conversion is [`patchflow_volume::convert`]'s, shared with clients that convert batches
//! sent in their stored type.
//!
//! Images: any stored [`DType`] → `f32`, `f16` or `bf16`, each value computed as
//! `norm.apply(x as f32)` and then rounded to the output type (round to nearest even, as `half`
//! does). Padding is `0.0` in the output space: the network sees zero outside the volume, as
//! nnU-Net pads its normalised arrays with zero.
//!
//! Labels: stored `u8`/`u16` → served `u8`/`u16`; padding is the ignore label, which is all-ones
//! in both widths (255, 65535), so padding is a byte fill with `0xFF`.

use patchflow_volume::convert::{Stored, convert_typed, pad_image};
use patchflow_volume::{DType, Normalization};

pub use patchflow_volume::convert::{OutputDType, RunMismatch, write_f32};

/// Converts the runs of one stored array into one output box: the per-run work of a box read,
/// monomorphised per stored type so that the conversion loop inlines into the visitor.
pub(crate) trait RunConvert: Sync {
    /// Bytes per stored element.
    fn in_size(&self) -> usize;
    /// Bytes per output element.
    fn out_size(&self) -> usize;
    /// Converts `src` (exactly `dst.len() / out_size() * in_size()` bytes) into `dst`.
    fn convert(&self, src: &[u8], dst: &mut [u8]);
    /// Fills padding.
    fn pad(&self, dst: &mut [u8]);
}

/// Image runs of stored type `T`, normalised and rounded to `out`.
pub(crate) struct ImageRuns<T> {
    norm: Normalization,
    out: OutputDType,
    stored: std::marker::PhantomData<fn() -> T>,
}

impl<T> ImageRuns<T> {
    /// Runs normalised with `norm`, served as `out`.
    pub(crate) fn new(norm: Normalization, out: OutputDType) -> Self {
        ImageRuns {
            norm,
            out,
            stored: std::marker::PhantomData,
        }
    }
}

impl<T: Stored> RunConvert for ImageRuns<T> {
    #[inline(always)]
    fn in_size(&self) -> usize {
        size_of::<T>()
    }
    #[inline(always)]
    fn out_size(&self) -> usize {
        self.out.size()
    }
    #[inline(always)]
    fn convert(&self, src: &[u8], dst: &mut [u8]) {
        convert_typed::<T>(src, &self.norm, self.out, dst);
    }
    #[inline(always)]
    fn pad(&self, dst: &mut [u8]) {
        pad_image(dst);
    }
}

/// Image runs copied in their stored element type (`size` bytes), padding 0: the compact wire
/// form, normalised by the receiver.
pub(crate) struct StoredRuns {
    /// Bytes per stored element.
    pub size: usize,
}

impl RunConvert for StoredRuns {
    #[inline(always)]
    fn in_size(&self) -> usize {
        self.size
    }
    #[inline(always)]
    fn out_size(&self) -> usize {
        self.size
    }
    #[inline(always)]
    fn convert(&self, src: &[u8], dst: &mut [u8]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn pad(&self, dst: &mut [u8]) {
        dst.fill(0);
    }
}

/// Label runs: stored `u8`/`u16` to served `u8`/`u16`, optionally remapping one value.
pub(crate) struct LabelRuns {
    /// Stored element type (`U8` or `U16`).
    pub stored: DType,
    /// Served element type (`U8` or `U16`).
    pub out: DType,
    /// `(from, to)`: a stored value replaced on the way out.
    pub remap: Option<(u16, u16)>,
}

impl RunConvert for LabelRuns {
    #[inline(always)]
    fn in_size(&self) -> usize {
        self.stored.size()
    }
    #[inline(always)]
    fn out_size(&self) -> usize {
        self.out.size()
    }
    #[inline(always)]
    fn convert(&self, src: &[u8], dst: &mut [u8]) {
        // Types and lengths were checked by the caller; a mismatch cannot occur here.
        let _ = convert_label_run(src, self.stored, self.out, self.remap, dst);
    }
    #[inline(always)]
    fn pad(&self, dst: &mut [u8]) {
        pad_label(dst);
    }
}

/// Fills label padding with the ignore label (255 or 65535: all-ones bytes).
#[inline]
pub(crate) fn pad_label(dst: &mut [u8]) {
    dst.fill(0xFF);
}

/// Copies one run of stored labels to the served label type.
///
/// `remap`, when given, replaces one stored value (a case's own ignore label) by another (the
/// dataset's). Stored `u16` values above 255 served as `u8` become 255 (ignore); this cannot happen
/// for consistent metadata, since the dataset serves `u8` only when every class is below 255.
pub(crate) fn convert_label_run(
    src: &[u8],
    stored: DType,
    out: DType,
    remap: Option<(u16, u16)>,
    dst: &mut [u8],
) -> Result<(), RunMismatch> {
    let out_size = out.size();
    let len = dst.len() / out_size.max(1);
    if !matches!(stored, DType::U8 | DType::U16)
        || !matches!(out, DType::U8 | DType::U16)
        || dst.len() != len * out_size
        || src.len() != len * stored.size()
    {
        return Err(RunMismatch {
            expected: len * stored.size(),
            got: src.len(),
        });
    }
    match (stored, out, remap) {
        (DType::U8, DType::U8, None) => dst.copy_from_slice(src),
        (DType::U16, DType::U16, None) => dst.copy_from_slice(src),
        (DType::U8, DType::U8, Some((from, to))) => {
            let (from, to) = (from.min(255) as u8, to.min(255) as u8);
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = if s == from { to } else { s };
            }
        }
        (DType::U8, DType::U16, remap) => {
            let (from, to) = remap.unwrap_or((u16::MAX, u16::MAX));
            for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
                let v = u16::from(s);
                let v = if v == from { to } else { v };
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        (DType::U16, DType::U8, remap) => {
            let (from, to) = remap.unwrap_or((u16::MAX, u16::MAX));
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                let v = u16::from_le_bytes([s[0], s[1]]);
                let v = if v == from { to } else { v };
                *d = v.min(255) as u8;
            }
        }
        (DType::U16, DType::U16, Some((from, to))) => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src.chunks_exact(2)) {
                let v = u16::from_le_bytes([s[0], s[1]]);
                let v = if v == from { to } else { v };
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        _ => {
            return Err(RunMismatch {
                expected: len * stored.size(),
                got: src.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatched_runs_are_errors() {
        let mut dst = vec![0u8; 8];
        assert!(convert_label_run(&[0u8; 3], DType::U8, DType::U8, None, &mut dst).is_err());
        assert!(convert_label_run(&[0u8; 8], DType::I16, DType::U8, None, &mut dst).is_err());
    }

    #[test]
    fn labels_widen_narrow_and_remap() {
        let src8 = [0u8, 1, 7, 254];
        let mut d = [0u8; 8];
        convert_label_run(&src8, DType::U8, DType::U16, None, &mut d).unwrap();
        assert_eq!(d, [0, 0, 1, 0, 7, 0, 254, 0]);
        let mut d8 = [0u8; 4];
        convert_label_run(&d, DType::U16, DType::U8, None, &mut d8).unwrap();
        assert_eq!(d8, src8);
        convert_label_run(&src8, DType::U8, DType::U8, Some((7, 255)), &mut d8).unwrap();
        assert_eq!(d8, [0, 1, 255, 254]);
        let src16: Vec<u8> = [3u16, 300, 9]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut out = [0u8; 3];
        convert_label_run(&src16, DType::U16, DType::U8, Some((9, 255)), &mut out).unwrap();
        assert_eq!(out, [3, 255, 255]);
        let mut out16 = [0u8; 6];
        convert_label_run(
            &src16,
            DType::U16,
            DType::U16,
            Some((3, u16::MAX)),
            &mut out16,
        )
        .unwrap();
        assert_eq!(out16, [255, 255, 44, 1, 9, 0]);
        let mut pad = [0u8; 4];
        pad_label(&mut pad);
        assert_eq!(u16::from_le_bytes([pad[0], pad[1]]), u16::MAX);
        assert_eq!(pad[0], 255);
    }
}

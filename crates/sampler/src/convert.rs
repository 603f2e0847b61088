//! Conversion of stored little-endian runs to the served element types, with the channel's
//! normalisation fused in: one pass from the store's bytes to the batch buffer.
//!
//! Images: any stored [`DType`] → `f32`, `f16` or `bf16`, each value computed as
//! `norm.apply(x as f32)` and then rounded to the output type (round to nearest even, as `half`
//! does). Padding is `0.0` in the output space: the network sees zero outside the volume, as
//! nnU-Net pads its normalised arrays with zero.
//!
//! Labels: stored `u8`/`u16` → served `u8`/`u16`; padding is the ignore label, which is all-ones
//! in both widths (255, 65535), so padding is a byte fill with `0xFF`.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use patchflow_volume::{DType, Normalization};

/// Element type of the served image.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum OutputDType {
    /// 32-bit IEEE float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl OutputDType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            OutputDType::F32 => 4,
            OutputDType::F16 | OutputDType::BF16 => 2,
        }
    }

    /// Lower-case name (`"f32"`, `"f16"`, `"bf16"`).
    pub const fn name(self) -> &'static str {
        match self {
            OutputDType::F32 => "f32",
            OutputDType::F16 => "f16",
            OutputDType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for OutputDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a run could not be converted (a store that handed over inconsistent lengths).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct RunMismatch {
    /// Bytes the run should have had.
    pub expected: usize,
    /// Bytes it had.
    pub got: usize,
}

/// Elements converted through the stack buffer per step when the output cannot be written in
/// place (half precision, or an unaligned `f32` destination).
const BLOCK: usize = 64;

/// A stored element type: plain little-endian bytes (patchflow only builds for little-endian
/// targets, so native and stored order agree) that widen to `f32` with `as`.
pub(crate) trait Stored: bytemuck::Pod {
    fn widen(self) -> f32;
}

macro_rules! impl_stored {
    ($($t:ty),*) => {$(
        impl Stored for $t {
            #[inline(always)]
            fn widen(self) -> f32 {
                self as f32
            }
        }
    )*};
}
impl_stored!(u8, i8, u16, i16, u32, i32, f32, f64);

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

/// Converts one run of `src` (little-endian elements of `stored`) to `out`, applying `norm`, and
/// writes the result into `dst` (`len * out.size()` bytes, where `len = src.len() / stored.size()`).
#[cfg(test)]
pub(crate) fn convert_image_run(
    src: &[u8],
    stored: DType,
    norm: &Normalization,
    out: OutputDType,
    dst: &mut [u8],
) -> Result<(), RunMismatch> {
    let len = dst.len() / out.size();
    if dst.len() != len * out.size() || src.len() != len * stored.size() {
        return Err(RunMismatch {
            expected: len * stored.size(),
            got: src.len(),
        });
    }
    let norm = *norm;
    match stored {
        DType::U8 => convert_typed::<u8>(src, &norm, out, dst),
        DType::I8 => convert_typed::<i8>(src, &norm, out, dst),
        DType::U16 => convert_typed::<u16>(src, &norm, out, dst),
        DType::I16 => convert_typed::<i16>(src, &norm, out, dst),
        DType::U32 => convert_typed::<u32>(src, &norm, out, dst),
        DType::I32 => convert_typed::<i32>(src, &norm, out, dst),
        DType::F32 => convert_typed::<f32>(src, &norm, out, dst),
        DType::F64 => convert_typed::<f64>(src, &norm, out, dst),
    }
    Ok(())
}

/// Normalises the elements of `src` into `out` (`out.len()` elements are read).
///
/// The aligned case (the usual one: decoded chunks and row offsets are element-aligned) is a
/// plain slice loop the compiler vectorises; unaligned input is read element by element.
#[inline(always)]
fn normalise<T: Stored>(src: &[u8], norm: &Normalization, out: &mut [f32]) {
    match bytemuck::try_cast_slice::<u8, T>(src) {
        Ok(values) => {
            for (o, &v) in out.iter_mut().zip(values) {
                *o = norm.apply(v.widen());
            }
        }
        Err(_) => {
            for (o, s) in out.iter_mut().zip(src.chunks_exact(size_of::<T>())) {
                *o = norm.apply(bytemuck::pod_read_unaligned::<T>(s).widen());
            }
        }
    }
}

#[inline(always)]
fn convert_typed<T: Stored>(src: &[u8], norm: &Normalization, out: OutputDType, dst: &mut [u8]) {
    if out == OutputDType::F32
        && let Ok(d) = bytemuck::try_cast_slice_mut::<u8, f32>(dst)
    {
        normalise::<T>(src, norm, d);
        return;
    }
    let elem = size_of::<T>();
    let mut wide = [0f32; BLOCK];
    for (src_block, dst_block) in src
        .chunks(BLOCK * elem)
        .zip(dst.chunks_mut(BLOCK * out.size()))
    {
        let wide = &mut wide[..src_block.len() / elem];
        normalise::<T>(src_block, norm, wide);
        match out {
            OutputDType::F32 => dst_block.copy_from_slice(bytemuck::cast_slice(wide)),
            OutputDType::F16 => narrow::<f16>(wide, dst_block),
            OutputDType::BF16 => narrow::<bf16>(wide, dst_block),
        }
    }
}

/// Rounds `wide` to a half-precision type with `half`'s slice conversion (hardware conversion
/// where the CPU has it, bit-identical to the scalar `from_f32`) and writes its bytes to `dst`.
#[inline]
fn narrow<H>(wide: &[f32], dst: &mut [u8])
where
    H: bytemuck::Pod + Default,
    [H]: HalfFloatSliceExt,
{
    let mut buf = [H::default(); BLOCK];
    let buf = &mut buf[..wide.len()];
    buf.convert_from_f32_slice(wide);
    dst.copy_from_slice(bytemuck::cast_slice(buf));
}

/// Writes `src` (`f32` values already in the output space) into `dst` as `out`
/// (`dst.len() == src.len() * out.size()`), rounding half precision to nearest even.
pub(crate) fn write_f32(src: &[f32], out: OutputDType, dst: &mut [u8]) {
    match out {
        OutputDType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(dst) {
            Ok(d) => d.copy_from_slice(src),
            Err(_) => {
                for (d, v) in dst.chunks_exact_mut(4).zip(src) {
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
        },
        OutputDType::F16 | OutputDType::BF16 => {
            for (w, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK * 2)) {
                if out == OutputDType::F16 {
                    narrow::<f16>(w, d);
                } else {
                    narrow::<bf16>(w, d);
                }
            }
        }
    }
}

/// Fills image padding (`0.0` in every output type is all-zero bytes).
#[inline]
pub(crate) fn pad_image(dst: &mut [u8]) {
    dst.fill(0);
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
    use patchflow_volume::NormScheme;

    fn ct() -> Normalization {
        Normalization {
            scheme: NormScheme::Ct,
            clip: Some([-100.0, 300.0]),
            mean: 40.0,
            inv_std: 1.0 / 80.0,
        }
    }

    fn reference(values: &[f32], norm: &Normalization) -> Vec<f32> {
        values.iter().map(|&v| norm.apply(v)).collect()
    }

    #[test]
    fn every_stored_type_to_f32_matches_apply() {
        let norm = ct();
        let i16s: Vec<i16> = (-600..600).step_by(7).collect();
        let src: Vec<u8> = i16s.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut dst = vec![0u8; i16s.len() * 4];
        convert_image_run(&src, DType::I16, &norm, OutputDType::F32, &mut dst).unwrap();
        let want = reference(&i16s.iter().map(|&v| v as f32).collect::<Vec<_>>(), &norm);
        let got: Vec<f32> = dst
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );

        macro_rules! check {
            ($t:ty, $d:expr, $vals:expr) => {{
                let vals: Vec<$t> = $vals;
                let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
                let mut dst = vec![0u8; vals.len() * 4];
                convert_image_run(&src, $d, &norm, OutputDType::F32, &mut dst).unwrap();
                for (c, v) in dst.chunks_exact(4).zip(&vals) {
                    let got = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    assert_eq!(
                        got.to_bits(),
                        norm.apply(*v as f32).to_bits(),
                        "{}",
                        stringify!($t)
                    );
                }
            }};
        }
        check!(u8, DType::U8, (0..=255).collect());
        check!(i8, DType::I8, (-128..=127).collect());
        check!(u16, DType::U16, (0..60000).step_by(311).collect());
        check!(u32, DType::U32, vec![0, 1, 77, 1 << 20, u32::MAX]);
        check!(
            i32,
            DType::I32,
            vec![i32::MIN, -5, 0, 123_456_789, i32::MAX]
        );
        check!(f32, DType::F32, vec![-1e9, -0.5, 0.0, 3.25, 1e9]);
        check!(f64, DType::F64, vec![-1e9, -0.5, 0.0, 3.25, 1e9]);
    }

    #[test]
    fn write_f32_rounds_like_half() {
        let vals: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) * 0.0137).collect();
        for out in [OutputDType::F32, OutputDType::F16, OutputDType::BF16] {
            // Aligned and unaligned destinations.
            let mut buf = vec![0u8; vals.len() * out.size() + 1];
            for start in [0usize, 1] {
                let dst = &mut buf[start..start + vals.len() * out.size()];
                write_f32(&vals, out, dst);
                for (i, v) in vals.iter().enumerate() {
                    let got: Vec<u8> = dst[i * out.size()..(i + 1) * out.size()].to_vec();
                    let want = match out {
                        OutputDType::F32 => v.to_le_bytes().to_vec(),
                        OutputDType::F16 => f16::from_f32(*v).to_le_bytes().to_vec(),
                        OutputDType::BF16 => bf16::from_f32(*v).to_le_bytes().to_vec(),
                    };
                    assert_eq!(got, want, "{out} at {i}");
                }
            }
        }
    }

    #[test]
    fn half_outputs_match_scalar_half() {
        let norm = Normalization {
            scheme: NormScheme::ZScore,
            clip: None,
            mean: 12.5,
            inv_std: 0.37,
        };
        // Longer than one block, not a multiple of it.
        let vals: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.731).collect();
        let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut d16 = vec![0u8; vals.len() * 2];
        let mut db16 = vec![0u8; vals.len() * 2];
        convert_image_run(&src, DType::F32, &norm, OutputDType::F16, &mut d16).unwrap();
        convert_image_run(&src, DType::F32, &norm, OutputDType::BF16, &mut db16).unwrap();
        for (i, v) in vals.iter().enumerate() {
            let r = norm.apply(*v);
            let h = u16::from_le_bytes([d16[2 * i], d16[2 * i + 1]]);
            let b = u16::from_le_bytes([db16[2 * i], db16[2 * i + 1]]);
            assert_eq!(h, f16::from_f32(r).to_bits(), "f16 at {i}");
            assert_eq!(b, bf16::from_f32(r).to_bits(), "bf16 at {i}");
        }
    }

    #[test]
    fn unaligned_runs_convert_the_same() {
        let norm = ct();
        let vals: Vec<i16> = (0..700).map(|i| (i * 37 % 1500) as i16 - 700).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        for out in [OutputDType::F32, OutputDType::F16, OutputDType::BF16] {
            let n = vals.len() * out.size();
            let mut aligned = vec![0u8; n];
            convert_image_run(&bytes, DType::I16, &norm, out, &mut aligned).unwrap();
            // Shift source and destination by one byte so neither is element-aligned.
            let mut src = vec![0u8; bytes.len() + 1];
            src[1..].copy_from_slice(&bytes);
            let mut dst = vec![0u8; n + 1];
            convert_image_run(&src[1..], DType::I16, &norm, out, &mut dst[1..]).unwrap();
            assert_eq!(&dst[1..], aligned.as_slice(), "{out}");
        }
    }

    #[test]
    fn mismatched_runs_are_errors() {
        let mut dst = vec![0u8; 8];
        assert!(
            convert_image_run(&[0u8; 3], DType::I16, &ct(), OutputDType::F32, &mut dst).is_err()
        );
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

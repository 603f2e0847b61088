//! Stored image values to served image elements: `norm.apply(x as f32)` rounded to the output
//! type (round to nearest even, as `half` does). The sampler converts the runs it reads with it;
//! a client that receives a batch in its stored element type converts it with the same code, so
//! both give the same bits.
//!
//! Padding is `0.0` in the output space (all-zero bytes in every output type): the network sees
//! zero outside the volume, as nnU-Net pads its normalised arrays with zero.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::{DType, Normalization};

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
pub struct RunMismatch {
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
pub trait Stored: bytemuck::Pod {
    /// The value as `f32` (`as`: exact for every integer type of 16 bits or fewer).
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

/// Converts one run of `src` (little-endian elements of `stored`) to `out`, applying `norm`, and
/// writes the result into `dst` (`len * out.size()` bytes, where `len = src.len() / stored.size()`).
pub fn convert_image_run(
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

/// Normalises the stored elements of `src` with `norm` into `dst` as `out`: the one conversion
/// every reader uses, so that a value converted anywhere has the same bits.
#[inline(always)]
pub fn convert_typed<T: Stored>(
    src: &[u8],
    norm: &Normalization,
    out: OutputDType,
    dst: &mut [u8],
) {
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
pub fn write_f32(src: &[f32], out: OutputDType, dst: &mut [u8]) {
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

/// The element types an image may travel in before conversion (the compact wire form): the
/// integers of 16 bits or fewer, which widen to `f32` exactly and are narrower than every
/// output type but the half-precision ones.
pub const STORED_TYPES: [DType; 4] = [DType::U8, DType::I8, DType::U16, DType::I16];

/// A reused output buffer `buf` resized to `len` bytes, keeping its allocation when it is large
/// enough (the sampler's batches and the client's converted ones). With `clear` every byte is
/// zero; without, bytes the buffer already held keep their old values (the caller overwrites
/// them all) and only new ones are zero.
pub fn sized(mut buf: Vec<u8>, len: usize, clear: bool) -> Vec<u8> {
    if buf.capacity() < len {
        // Fresh zeroed memory comes from the kernel without a memset.
        return vec![0u8; len];
    }
    if clear {
        buf.clear();
    } else {
        buf.truncate(len);
    }
    buf.resize(len, 0);
    buf
}

/// Fills image padding (`0.0` in every output type is all-zero bytes).
#[inline]
pub fn pad_image(dst: &mut [u8]) {
    dst.fill(0);
}

/// The part of a patch at `origin` (voxel index of its first voxel, `[z, y, x]`, possibly
/// negative) of `patch` voxels that lies inside a volume of `shape`, in patch coordinates.
/// Empty ranges when the patch misses the volume on an axis.
pub fn inside(origin: [i64; 3], patch: [usize; 3], shape: [usize; 3]) -> [Range<usize>; 3] {
    std::array::from_fn(|a| {
        let p = i64::try_from(patch[a]).unwrap_or(i64::MAX);
        let s = i64::try_from(shape[a]).unwrap_or(i64::MAX);
        let lo = (-origin[a]).clamp(0, p);
        let hi = (s.saturating_sub(origin[a])).clamp(lo, p);
        // Both lie in 0..=p, which came from a usize.
        lo as usize..hi as usize
    })
}

/// Voxels of a region given as ranges per axis.
pub fn region_voxels(region: &[Range<usize>; 3]) -> usize {
    region.iter().map(ExactSizeIterator::len).product()
}

/// Checks that `src` holds the region `inside` of a patch (`in_size`-byte elements) and `dst`
/// the whole patch (`out_size`-byte elements).
fn check_box(
    src: usize,
    in_size: usize,
    dst: usize,
    out_size: usize,
    patch: [usize; 3],
    inside: &[Range<usize>; 3],
) -> Result<(), RunMismatch> {
    let expected = region_voxels(inside) * in_size;
    let fits = inside.iter().zip(patch).all(|(r, p)| r.end <= p);
    if src != expected || dst != patch.iter().product::<usize>() * out_size || !fits {
        return Err(RunMismatch { expected, got: src });
    }
    Ok(())
}

/// Calls `row(start, src_row)` for every row of a patch, `start` its first voxel in the patch and
/// `src_row` its row index in the region `inside` when the row crosses the region.
fn each_row(
    patch: [usize; 3],
    inside: &[Range<usize>; 3],
    mut row: impl FnMut(usize, Option<usize>) -> Result<(), RunMismatch>,
) -> Result<(), RunMismatch> {
    let [pz, py, px] = patch;
    let [rz, ry, rx] = inside;
    for z in 0..pz {
        for y in 0..py {
            let crosses = rz.contains(&z) && ry.contains(&y) && !rx.is_empty();
            let src = crosses.then(|| (z - rz.start) * ry.len() + (y - ry.start));
            row((z * py + y) * px, src)?;
        }
    }
    Ok(())
}

/// Copies the region `inside` of a patch (held alone in `src`: `elem`-byte elements, row-major)
/// into the whole patch `dst`, every other byte set to `pad` (labels: `0xFF` is the ignore label
/// in both label widths).
pub fn expand_box(
    elem: usize,
    src: &[u8],
    patch: [usize; 3],
    inside: &[Range<usize>; 3],
    pad: u8,
    dst: &mut [u8],
) -> Result<(), RunMismatch> {
    check_box(src.len(), elem, dst.len(), elem, patch, inside)?;
    let (px, rx) = (patch[2], &inside[2]);
    each_row(patch, inside, |start, src_row| {
        let drow = &mut dst[start * elem..(start + px) * elem];
        let Some(k) = src_row else {
            drow.fill(pad);
            return Ok(());
        };
        drow[..rx.start * elem].fill(pad);
        drow[rx.end * elem..].fill(pad);
        let n = rx.len();
        drow[rx.start * elem..rx.end * elem]
            .copy_from_slice(&src[k * n * elem..(k + 1) * n * elem]);
        Ok(())
    })
}

/// Converts the part of one image patch inside the volume into the whole patch: `src` holds the
/// stored values (`stored`) of the region `inside` (see [`inside`]) only, row-major, x fastest;
/// `dst` receives the `patch` voxels as `out`, the region normalised with `norm`, the rest
/// padding (0).
pub fn convert_box(
    stored: DType,
    src: &[u8],
    norm: &Normalization,
    out: OutputDType,
    patch: [usize; 3],
    inside: &[Range<usize>; 3],
    dst: &mut [u8],
) -> Result<(), RunMismatch> {
    let (isz, osz) = (stored.size(), out.size());
    check_box(src.len(), isz, dst.len(), osz, patch, inside)?;
    let (px, rx) = (patch[2], &inside[2]);
    each_row(patch, inside, |start, src_row| {
        let drow = &mut dst[start * osz..(start + px) * osz];
        let Some(k) = src_row else {
            pad_image(drow);
            return Ok(());
        };
        pad_image(&mut drow[..rx.start * osz]);
        pad_image(&mut drow[rx.end * osz..]);
        let n = rx.len();
        let s = &src[k * n * isz..(k + 1) * n * isz];
        convert_image_run(
            s,
            stored,
            norm,
            out,
            &mut drow[rx.start * osz..rx.end * osz],
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NormScheme;

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
    }

    #[test]
    fn inside_clips_the_patch_to_the_volume() {
        assert_eq!(
            inside([0, 0, 0], [4, 4, 4], [10, 10, 10]),
            [0..4, 0..4, 0..4]
        );
        assert_eq!(
            inside([-2, 8, 3], [4, 4, 4], [10, 10, 5]),
            [2..4, 0..2, 0..2]
        );
        // Larger than the volume on an axis: both ends padded.
        assert_eq!(
            inside([-3, 0, 0], [10, 1, 1], [4, 1, 1]),
            [3..7, 0..1, 0..1]
        );
    }

    #[test]
    fn convert_box_pads_around_the_inside_region() {
        let norm = ct();
        let patch = [2, 3, 4];
        let region = inside([0, -1, 1], patch, [5, 5, 3]);
        assert_eq!(region, [0..2, 1..3, 0..2]);
        let values: Vec<i16> = (0..region_voxels(&region) as i16)
            .map(|v| v * 50 - 90)
            .collect();
        let src: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut dst = vec![0xAAu8; 24 * 4];
        convert_box(
            DType::I16,
            &src,
            &norm,
            OutputDType::F32,
            patch,
            &region,
            &mut dst,
        )
        .unwrap();
        let got: Vec<f32> = dst
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut k = 0;
        for z in 0..2 {
            for y in 0..3 {
                for x in 0..4 {
                    let i = (z * 3 + y) * 4 + x;
                    let want = if (1..3).contains(&y) && x < 2 {
                        k += 1;
                        norm.apply(f32::from(values[k - 1]))
                    } else {
                        0.0
                    };
                    assert_eq!(got[i].to_bits(), want.to_bits(), "voxel {i}");
                }
            }
        }
        assert!(
            convert_box(
                DType::I16,
                &src[2..],
                &norm,
                OutputDType::F32,
                patch,
                &region,
                &mut dst
            )
            .is_err()
        );
    }

    #[test]
    fn expand_box_pads_labels_around_the_region() {
        let patch = [1, 2, 3];
        let region = [0..1, 1..2, 1..3];
        let src = [7u8, 0, 9, 0];
        let mut dst = vec![0u8; 12];
        expand_box(2, &src, patch, &region, 0xFF, &mut dst).unwrap();
        assert_eq!(dst, [255, 255, 255, 255, 255, 255, 255, 255, 7, 0, 9, 0]);
        assert!(expand_box(2, &src[1..], patch, &region, 0xFF, &mut dst).is_err());
    }
}

//! NIfTI-1 reading and writing (`.nii` and `.nii.gz`).
//!
//! The header is parsed by the `nifti` crate; the voxels are inflated straight into a typed
//! buffer of the file's own element type (one copy) and byte-swapped in place when the file's
//! byte order differs from the machine's. NIfTI stores `i` (x) fastest, which is C order
//! `[z][y][x]`, so nothing is transposed.
//!
//! Only what training needs is kept: the voxel grid, the affine and the voxels. Free-text header
//! fields (`descrip`, `aux_file`, `intent_name`, `db_name`) and header extensions may carry
//! patient information and are dropped on reading; the writer leaves them empty.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use nifti::{Endianness, NiftiHeader};

use crate::error::VolumeError;
use crate::types::{DType, Element, Geometry, VoxelData};

/// Size of a NIfTI-1 header in bytes.
const HEADER_LEN: usize = 348;
/// Size of a NIfTI-2 header in bytes (used only to recognise such files).
const NIFTI2_HEADER_LEN: i32 = 540;
/// Largest expansion factor of a deflate stream; bounds what a gzip file can hold.
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Read buffer for compressed input.
const READ_BUFFER: usize = 256 * 1024;
/// Voxel buffers grow by at most this many bytes per read, so memory follows the data that
/// actually arrives rather than what a (possibly damaged) header announces.
const FILL_STEP_BYTES: usize = 16 << 20;
/// Largest number of voxels of a volume the reader accepts (`2^32`, e.g. 2048 × 2048 × 1024).
///
/// NIfTI-1 allows up to 32767³ ≈ 2^45 voxels; a header beyond this limit is refused before
/// anything is allocated. Preprocessing applies the same limit to its output grid.
pub const MAX_VOXELS: usize = 1 << 32;
/// gzip level used when writing; 1 is what nibabel uses and is several times faster than 6.
const GZIP_LEVEL: u32 = 1;

/// A 3D image read from a NIfTI-1 file.
#[derive(Clone, Debug, PartialEq)]
pub struct NiftiImage {
    /// File it was read from.
    pub path: PathBuf,
    /// Voxel grid and affine.
    pub geometry: Geometry,
    /// Voxels in C order `[z][y][x]`, in the file's element type, or `F32`/`F64` when the header
    /// asks for intensity scaling (`scl_slope`/`scl_inter`).
    pub data: VoxelData,
    /// Element type stored in the file (before any scaling).
    pub source_dtype: DType,
}

/// Whether a file holds an intensity image or a label map (changes the advice in errors).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum VolumeKind {
    /// An intensity image (one channel per file).
    Image,
    /// A label map.
    Label,
}

impl VolumeKind {
    fn multi_volume_hint(self) -> &'static str {
        match self {
            VolumeKind::Image => {
                "patchflow reads one 3D file per channel, as nnU-Net's _0000, _0001; split the channels into separate files"
            }
            VolumeKind::Label => "a label map must be a single 3D volume",
        }
    }
}

/// Reads a 3D NIfTI-1 image (`.nii` or `.nii.gz`; gzip is recognised by its magic bytes).
///
/// Supported element types: `u8`, `i8`, `u16`, `i16`, `u32`, `i32`, `f32`, `f64`. When the header
/// sets a non-zero `scl_slope` that is not the identity (`slope 1, intercept 0`), the scaled
/// values are returned as `F32` (`F64` for an `f64` source). 4D and 5D files are accepted when
/// they hold a single volume. The affine is the sform when `sform_code > 0`, else the qform when
/// `qform_code > 0`, else `diag(pixdim)`. Images with NaN or infinite values are rejected.
pub fn read_nifti(path: &Path) -> Result<NiftiImage, VolumeError> {
    let raw = read_volume(path, VolumeKind::Image)?;
    image_from_raw(path, raw)
}

/// Reads a 3D NIfTI-1 image from bytes already in memory, exactly as [`read_nifti`] reads a file
/// (plain or gzip, recognised by the magic bytes; the same checks and limits).
///
/// `name` stands for the file in errors and becomes [`NiftiImage::path`]; nothing is read from
/// it. Useful for data that does not come from the file system (object stores, archives).
pub fn read_nifti_bytes(bytes: &[u8], name: &Path) -> Result<NiftiImage, VolumeError> {
    let raw = read_volume_from(name, bytes, bytes.len() as u64, VolumeKind::Image)?;
    image_from_raw(name, raw)
}

/// Rejects images with NaN or infinite values.
fn image_from_raw(path: &Path, raw: RawVolume) -> Result<NiftiImage, VolumeError> {
    if let Some((count, first)) = count_non_finite(&raw.data) {
        return Err(VolumeError::NonFinite {
            path: path.to_path_buf(),
            count,
            first: unflatten(first, raw.geometry.shape),
        });
    }
    Ok(NiftiImage {
        path: path.to_path_buf(),
        geometry: raw.geometry,
        data: raw.data,
        source_dtype: raw.source_dtype,
    })
}

/// A volume as read, before image- or label-specific checks.
pub(crate) struct RawVolume {
    pub(crate) geometry: Geometry,
    pub(crate) data: VoxelData,
    pub(crate) source_dtype: DType,
}

/// Converts a flat C-order index to `[z, y, x]`.
pub(crate) fn unflatten(i: usize, shape: [usize; 3]) -> [usize; 3] {
    let plane = shape[1] * shape[2];
    if plane == 0 {
        return [0, 0, 0];
    }
    [i / plane, (i % plane) / shape[2], i % shape[2]]
}

/// Counts NaN/Inf values of a float buffer; returns the count and the first flat index.
fn count_non_finite(data: &VoxelData) -> Option<(u64, usize)> {
    fn scan<T: Copy>(v: &[T], finite: impl Fn(T) -> bool) -> Option<(u64, usize)> {
        let count = v.iter().filter(|&&x| !finite(x)).count() as u64;
        if count == 0 {
            return None;
        }
        let first = v.iter().position(|&x| !finite(x)).unwrap_or(0);
        Some((count, first))
    }
    match data {
        VoxelData::F32(v) => scan(v, f32::is_finite),
        VoxelData::F64(v) => scan(v, f64::is_finite),
        _ => None,
    }
}

/// Where the bytes come from: the input as it is, or a gzip stream over it.
enum Source<R> {
    Plain(R),
    Gzip(Box<flate2::bufread::MultiGzDecoder<R>>),
}

impl<R: BufRead> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Plain(r) => r.read(buf),
            Source::Gzip(r) => r.read(buf),
        }
    }
}

/// Everything the reader needs from the header, validated.
struct ParsedHeader {
    /// Whether the file's byte order differs from the machine's.
    swap: bool,
    /// `[z, y, x]`.
    shape: [usize; 3],
    dtype: DType,
    vox_offset: usize,
    /// `(slope, intercept)` when scaling changes values.
    scaling: Option<(f64, f64)>,
    affine: [[f64; 4]; 4],
    spacing: [f64; 3],
}

/// Reads only the header of an image and returns its grid (shape, spacing, affine).
///
/// Planners use it where the voxels are not needed (e.g. the dataset's median spacing); the same
/// header checks as [`read_nifti`] apply, but the voxel data is neither read nor verified.
pub fn read_nifti_geometry(path: &Path) -> Result<Geometry, VolumeError> {
    let io_err = |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut reader = BufReader::with_capacity(HEADER_LEN * 2, file);
    let is_gzip = reader
        .fill_buf()
        .map_err(io_err)?
        .starts_with(&[0x1f, 0x8b]);
    let mut source = if is_gzip {
        Source::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else {
        Source::Plain(reader)
    };
    let mut header = [0u8; HEADER_LEN];
    let got =
        read_full(&mut source, &mut header).map_err(|e| classify_read_error(path, is_gzip, e))?;
    let parsed = parse_header(path, &header[..got], is_gzip, VolumeKind::Image)?;
    Ok(Geometry {
        shape: parsed.shape,
        spacing: parsed.spacing,
        affine: parsed.affine,
    })
}

/// Reads a volume with every check that images and labels share.
pub(crate) fn read_volume(path: &Path, kind: VolumeKind) -> Result<RawVolume, VolumeError> {
    let io_err = |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let reader = BufReader::with_capacity(READ_BUFFER, file);
    read_volume_from(path, reader, file_len, kind)
}

/// [`read_volume`] over any buffered input of `input_len` bytes; `path` names it in errors.
pub(crate) fn read_volume_from<R: BufRead>(
    path: &Path,
    mut reader: R,
    input_len: u64,
    kind: VolumeKind,
) -> Result<RawVolume, VolumeError> {
    let io_err = |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let is_gzip = reader
        .fill_buf()
        .map_err(io_err)?
        .starts_with(&[0x1f, 0x8b]);
    let mut source = if is_gzip {
        Source::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else {
        Source::Plain(reader)
    };
    let stream_err = |e: io::Error| classify_read_error(path, is_gzip, e);

    let mut header = [0u8; HEADER_LEN];
    let got = read_full(&mut source, &mut header).map_err(stream_err)?;
    let parsed = parse_header(path, &header[..got], is_gzip, kind)?;

    // Skip extensions (they may hold free text, so they are not kept).
    let skip = (parsed.vox_offset - HEADER_LEN) as u64;
    let skipped = io::copy(&mut (&mut source).take(skip), &mut io::sink()).map_err(stream_err)?;
    let voxels = parsed.shape.iter().product::<usize>();
    let expected =
        voxels
            .checked_mul(parsed.dtype.size())
            .ok_or_else(|| VolumeError::BadHeader {
                path: path.to_path_buf(),
                field: "dim",
                reason: format!("{:?} voxels overflow the address space", parsed.shape),
            })?;
    let truncated = |actual: usize| VolumeError::TruncatedData {
        path: path.to_path_buf(),
        offset: parsed.vox_offset,
        expected,
        actual,
    };
    if skipped < skip {
        return Err(truncated(0));
    }
    // Refuse to allocate more than the file can possibly hold.
    let capacity = if is_gzip {
        input_len.saturating_mul(MAX_DEFLATE_RATIO)
    } else {
        input_len
    };
    if (parsed.vox_offset as u64).saturating_add(expected as u64) > capacity {
        let actual = io::copy(&mut source, &mut io::sink()).map_err(stream_err)?;
        return Err(truncated(usize::try_from(actual).unwrap_or(usize::MAX)));
    }

    let data = match parsed.dtype {
        DType::U8 => VoxelData::U8(read_typed(path, &mut source, voxels, &parsed, is_gzip)?),
        DType::I8 => VoxelData::I8(read_typed(path, &mut source, voxels, &parsed, is_gzip)?),
        DType::U16 => VoxelData::U16(read_typed(path, &mut source, voxels, &parsed, is_gzip)?),
        DType::I16 => VoxelData::I16(read_typed(path, &mut source, voxels, &parsed, is_gzip)?),
        DType::U32 => VoxelData::U32(read_typed(path, &mut source, voxels, &parsed, is_gzip)?),
        DType::I32 => VoxelData::I32(read_typed(path, &mut source, voxels, &parsed, is_gzip)?),
        DType::F32 => VoxelData::F32(read_typed(path, &mut source, voxels, &parsed, is_gzip)?),
        DType::F64 => VoxelData::F64(read_typed(path, &mut source, voxels, &parsed, is_gzip)?),
    };
    if is_gzip {
        // Read the rest of the stream so that the gzip checksum and length are verified.
        io::copy(&mut source, &mut io::sink()).map_err(stream_err)?;
    }
    let data = match parsed.scaling {
        Some((slope, inter)) => apply_scaling(&data, slope, inter),
        None => data,
    };
    Ok(RawVolume {
        geometry: Geometry {
            shape: parsed.shape,
            spacing: parsed.spacing,
            affine: parsed.affine,
        },
        data,
        source_dtype: parsed.dtype,
    })
}

/// Turns a read error into a gzip error when the decompressor raised it.
fn classify_read_error(path: &Path, is_gzip: bool, e: io::Error) -> VolumeError {
    let from_decoder = matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData
    );
    if is_gzip && from_decoder {
        VolumeError::Gzip {
            path: path.to_path_buf(),
            source: e,
        }
    } else {
        VolumeError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// Reads until `buf` is full or the stream ends; returns the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads `n` elements of `T` straight into a new buffer and fixes their byte order.
///
/// The buffer's capacity is reserved up front (no reallocation), but it is filled, and so
/// touched, [`FILL_STEP_BYTES`] at a time: a stream that ends early costs only the memory of
/// the bytes it held.
fn read_typed<T: Element + bytemuck::Pod>(
    path: &Path,
    source: &mut impl Read,
    n: usize,
    header: &ParsedHeader,
    is_gzip: bool,
) -> Result<Vec<T>, VolumeError> {
    let size = std::mem::size_of::<T>();
    let bytes = n.saturating_mul(size);
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(n).map_err(|_| VolumeError::BadHeader {
        path: path.to_path_buf(),
        field: "dim",
        reason: format!("cannot allocate {bytes} bytes for {n} voxels"),
    })?;
    let step = (FILL_STEP_BYTES / size).max(1);
    while v.len() < n {
        let start = v.len();
        let end = start.saturating_add(step).min(n);
        v.resize(end, T::zeroed());
        let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut v[start..end]);
        let got = read_full(source, buf).map_err(|e| classify_read_error(path, is_gzip, e))?;
        if got < buf.len() {
            return Err(VolumeError::TruncatedData {
                path: path.to_path_buf(),
                offset: header.vox_offset,
                expected: bytes,
                actual: start * size + got,
            });
        }
    }
    if header.swap && size > 1 {
        let buf: &mut [u8] = bytemuck::cast_slice_mut(v.as_mut_slice());
        for c in buf.chunks_exact_mut(size) {
            c.reverse();
        }
    }
    Ok(v)
}

/// Applies `y = x * slope + inter`; `F64` stays `F64`, everything else becomes `F32`.
fn apply_scaling(data: &VoxelData, slope: f64, inter: f64) -> VoxelData {
    fn to_f32<T: Element>(v: &[T], slope: f64, inter: f64) -> Vec<f32> {
        v.iter()
            .map(|&x| (x.to_f64() * slope + inter) as f32)
            .collect()
    }
    match data {
        VoxelData::F64(v) => VoxelData::F64(v.iter().map(|&x| x * slope + inter).collect()),
        other => VoxelData::F32(crate::with_voxels!(other, v => to_f32(v, slope, inter))),
    }
}

fn not_nifti(path: &Path, reason: impl Into<String>) -> VolumeError {
    VolumeError::NotNifti {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn bad_header(path: &Path, field: &'static str, reason: impl Into<String>) -> VolumeError {
    VolumeError::BadHeader {
        path: path.to_path_buf(),
        field,
        reason: reason.into(),
    }
}

/// Recognises the file, parses and validates the header.
fn parse_header(
    path: &Path,
    bytes: &[u8],
    is_gzip: bool,
    kind: VolumeKind,
) -> Result<ParsedHeader, VolumeError> {
    recognise(path, bytes, is_gzip)?;
    let h = NiftiHeader::from_reader(bytes).map_err(|e| not_nifti(path, e.to_string()))?;
    let swap = h.endianness != Endianness::native();
    let shape = header_shape(path, &h, kind)?;
    let dtype = dtype_from_code(path, h.datatype)?;

    let vox_offset = h.vox_offset;
    if !vox_offset.is_finite() || vox_offset < HEADER_LEN as f32 || vox_offset > 1.0e9 {
        return Err(bad_header(
            path,
            "vox_offset",
            format!("{vox_offset} is not a byte offset past the {HEADER_LEN}-byte header"),
        ));
    }
    let vox_offset = vox_offset as usize;

    let scaling = header_scaling(path, &h);
    let affine = header_affine(&h);
    if affine.iter().flatten().any(|v| !v.is_finite()) {
        return Err(bad_header(
            path,
            if h.sform_code > 0 { "srow" } else { "quatern" },
            "the affine holds NaN or infinite values",
        ));
    }
    let spacing = header_spacing(path, &h, &affine)?;
    Ok(ParsedHeader {
        swap,
        shape,
        dtype,
        vox_offset,
        scaling,
        affine,
        spacing,
    })
}

/// Refuses what is not a single-file NIfTI-1 (NIfTI-2, a short file, a wrong size field or
/// magic), saying so.
fn recognise(path: &Path, bytes: &[u8], is_gzip: bool) -> Result<(), VolumeError> {
    let gz_note = if !is_gzip
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
    {
        " (the name ends in .gz but the content is not gzip)"
    } else {
        ""
    };
    if let Some(first) = bytes.get(0..4) {
        let first = [first[0], first[1], first[2], first[3]];
        if i32::from_le_bytes(first) == NIFTI2_HEADER_LEN
            || i32::from_be_bytes(first) == NIFTI2_HEADER_LEN
            || matches!(bytes.get(4..8), Some(b"n+2\0") | Some(b"ni2\0"))
        {
            return Err(VolumeError::Nifti2 {
                path: path.to_path_buf(),
            });
        }
    }
    if bytes.len() < HEADER_LEN {
        return Err(not_nifti(
            path,
            format!(
                "only {} bytes, shorter than the {HEADER_LEN}-byte NIfTI-1 header{gz_note}",
                bytes.len()
            ),
        ));
    }
    let size_field = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if i32::from_le_bytes(size_field) != HEADER_LEN as i32
        && i32::from_be_bytes(size_field) != HEADER_LEN as i32
    {
        return Err(not_nifti(
            path,
            format!(
                "header size field is {}, expected {HEADER_LEN}{gz_note}",
                i32::from_le_bytes(size_field)
            ),
        ));
    }
    match &bytes[344..348] {
        b"n+1\0" => {}
        b"ni1\0" => {
            return Err(not_nifti(
                path,
                "header-only file (magic \"ni1\"); .hdr/.img pairs are not supported, save as a single .nii",
            ));
        }
        other => {
            return Err(not_nifti(
                path,
                format!(
                    "magic is {:?}, expected \"n+1\"",
                    String::from_utf8_lossy(other)
                ),
            ));
        }
    }
    Ok(())
}

/// The `[z, y, x]` shape of a 3D volume (a 4D or 5D file with one volume passes).
fn header_shape(path: &Path, h: &NiftiHeader, kind: VolumeKind) -> Result<[usize; 3], VolumeError> {
    let ndim = usize::from(h.dim[0]);
    if !(1..=7).contains(&ndim) {
        return Err(bad_header(
            path,
            "dim[0]",
            format!("{} is not in 1..=7", h.dim[0]),
        ));
    }
    let dims = h.dim[1..=ndim].to_vec();
    if let Some(&d) = dims.iter().find(|&&d| d == 0 || d > i16::MAX as u16) {
        return Err(bad_header(
            path,
            "dim",
            format!(
                "{dims:?} holds {}; every dimension must be positive",
                d as i16
            ),
        ));
    }
    if ndim < 3 {
        return Err(VolumeError::NotThreeD {
            path: path.to_path_buf(),
            ndim,
            dims,
        });
    }
    if ndim > 5 {
        return Err(VolumeError::NotThreeD {
            path: path.to_path_buf(),
            ndim,
            dims,
        });
    }
    let volumes: usize = dims[3..].iter().map(|&d| usize::from(d)).product();
    if volumes > 1 {
        return Err(VolumeError::MultiVolume {
            path: path.to_path_buf(),
            volumes,
            dims,
            hint: kind.multi_volume_hint(),
        });
    }
    let shape = [
        usize::from(dims[2]),
        usize::from(dims[1]),
        usize::from(dims[0]),
    ];
    // Each extent is at most 32767, so the product fits a u64.
    let voxels = shape.iter().map(|&d| d as u64).product::<u64>();
    if voxels > MAX_VOXELS as u64 {
        return Err(bad_header(
            path,
            "dim",
            format!(
                "shape [z,y,x] {shape:?} is {voxels} voxels, more than the limit of {MAX_VOXELS} voxels per volume"
            ),
        ));
    }

    Ok(shape)
}

/// The intensity scaling `(slope, intercept)`, `None` when it changes nothing. Slope 0 or NaN
/// means "no scaling" (nibabel writes NaN); a NaN intercept counts as 0.
fn header_scaling(path: &Path, h: &NiftiHeader) -> Option<(f64, f64)> {
    let (slope, inter) = (f64::from(h.scl_slope), f64::from(h.scl_inter));
    let inter = if inter.is_nan() { 0.0 } else { inter };
    if slope.is_nan() || slope == 0.0 {
        None
    } else if slope.is_finite() && inter.is_finite() {
        (slope != 1.0 || inter != 0.0).then_some((slope, inter))
    } else {
        tracing::warn!(
            path = %path.display(),
            slope, inter,
            "ignoring infinite intensity scaling"
        );
        None
    }
}

/// The voxel spacing `[z, y, x]`: `pixdim`, or the affine's column norms where `pixdim` is
/// unusable.
fn header_spacing(
    path: &Path,
    h: &NiftiHeader,
    affine: &[[f64; 4]; 4],
) -> Result<[f64; 3], VolumeError> {
    let mut spacing = [0.0f64; 3];
    for (axis, s) in spacing.iter_mut().enumerate() {
        // axis 0 is z = pixdim[3], axis 2 is x = pixdim[1].
        let col = 2 - axis;
        let p = f64::from(h.pixdim[col + 1]).abs();
        *s = if p.is_finite() && p > 0.0 {
            p
        } else {
            let norm = (0..3).map(|r| affine[r][col].powi(2)).sum::<f64>().sqrt();
            if !(norm.is_finite() && norm > 0.0) {
                return Err(bad_header(
                    path,
                    "pixdim",
                    format!(
                        "pixdim[{}] = {} and the affine gives no spacing either",
                        col + 1,
                        h.pixdim[col + 1]
                    ),
                ));
            }
            norm
        };
    }
    Ok(spacing)
}

/// Maps a NIfTI datatype code to a supported [`DType`] or a clear error.
fn dtype_from_code(path: &Path, code: i16) -> Result<DType, VolumeError> {
    let unsupported = |name: &str| VolumeError::UnsupportedDatatype {
        path: path.to_path_buf(),
        code,
        name: name.to_string(),
    };
    Ok(match code {
        2 => DType::U8,
        4 => DType::I16,
        8 => DType::I32,
        16 => DType::F32,
        64 => DType::F64,
        256 => DType::I8,
        512 => DType::U16,
        768 => DType::U32,
        1 => return Err(unsupported("binary (1 bit)")),
        32 => return Err(unsupported("complex64")),
        128 => return Err(unsupported("RGB24")),
        1024 => return Err(unsupported("int64")),
        1280 => return Err(unsupported("uint64")),
        1536 => return Err(unsupported("float128")),
        1792 => return Err(unsupported("complex128")),
        2048 => return Err(unsupported("complex256")),
        2304 => return Err(unsupported("RGBA32")),
        _ => return Err(unsupported("unknown")),
    })
}

/// NIfTI datatype code and bits per voxel of a [`DType`].
fn dtype_code(dtype: DType) -> (i16, i16) {
    let code = match dtype {
        DType::U8 => 2,
        DType::I16 => 4,
        DType::I32 => 8,
        DType::F32 => 16,
        DType::F64 => 64,
        DType::I8 => 256,
        DType::U16 => 512,
        DType::U32 => 768,
    };
    (code, (dtype.size() * 8) as i16)
}

/// The affine the header defines: sform, else qform, else `diag(pixdim)`.
fn header_affine(h: &NiftiHeader) -> [[f64; 4]; 4] {
    if h.sform_code > 0 {
        let row = |r: [f32; 4]| r.map(f64::from);
        [
            row(h.srow_x),
            row(h.srow_y),
            row(h.srow_z),
            [0.0, 0.0, 0.0, 1.0],
        ]
    } else if h.qform_code > 0 {
        qform_affine(h)
    } else {
        let d = |i: usize| {
            let p = f64::from(h.pixdim[i]).abs();
            if p.is_finite() && p > 0.0 { p } else { 1.0 }
        };
        [
            [d(1), 0.0, 0.0, 0.0],
            [0.0, d(2), 0.0, 0.0],
            [0.0, 0.0, d(3), 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }
}

/// The qform affine (NIfTI-1 method 2), as `nifti1_io`'s `nifti_quatern_to_mat44` computes it.
fn qform_affine(h: &NiftiHeader) -> [[f64; 4]; 4] {
    let (mut b, mut c, mut d) = (
        f64::from(h.quatern_b),
        f64::from(h.quatern_c),
        f64::from(h.quatern_d),
    );
    let mut a = 1.0 - (b * b + c * c + d * d);
    if a < 1.0e-7 {
        // Numerically a 180° rotation: renormalise (b, c, d).
        let n = (b * b + c * c + d * d).sqrt();
        if n > 0.0 {
            b /= n;
            c /= n;
            d /= n;
        }
        a = 0.0;
    } else {
        a = a.sqrt();
    }
    let size = |i: usize| {
        let p = f64::from(h.pixdim[i]).abs();
        if p.is_finite() && p > 0.0 { p } else { 1.0 }
    };
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let (x, y, z) = (size(1), size(2), size(3) * qfac);
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let t = [
        f64::from(h.quatern_x),
        f64::from(h.quatern_y),
        f64::from(h.quatern_z),
    ];
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        m[i] = [r[i][0] * x, r[i][1] * y, r[i][2] * z, t[i]];
    }
    m[3] = [0.0, 0.0, 0.0, 1.0];
    m
}

/// Quaternion `(b, c, d)` and `qfac` of the rotation part of an affine (`nifti_mat44_to_quatern`).
fn affine_to_quatern(affine: &[[f64; 4]; 4]) -> ([f64; 3], f64) {
    // Normalised columns.
    let mut r = [[0.0f64; 3]; 3];
    for col in 0..3 {
        let norm = (0..3)
            .map(|row| affine[row][col].powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = if norm > 0.0 { norm } else { 1.0 };
        for row in 0..3 {
            r[row][col] = affine[row][col] / norm;
        }
    }
    let mut r = polar_orthogonalize(r);
    let qfac = if det3(&r) > 0.0 {
        1.0
    } else {
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
        -1.0
    };
    let (r11, r12, r13) = (r[0][0], r[0][1], r[0][2]);
    let (r21, r22, r23) = (r[1][0], r[1][1], r[1][2]);
    let (r31, r32, r33) = (r[2][0], r[2][1], r[2][2]);
    let trace = r11 + r22 + r33 + 1.0;
    let quatern = if trace > 0.5 {
        let a = 0.5 * trace.sqrt();
        [
            0.25 * (r32 - r23) / a,
            0.25 * (r13 - r31) / a,
            0.25 * (r21 - r12) / a,
        ]
    } else {
        let xd = 1.0 + r11 - (r22 + r33);
        let yd = 1.0 + r22 - (r11 + r33);
        let zd = 1.0 + r33 - (r11 + r22);
        let (a, b, c, d);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r12 + r21) / b;
            d = 0.25 * (r13 + r31) / b;
            a = 0.25 * (r32 - r23) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r12 + r21) / c;
            d = 0.25 * (r23 + r32) / c;
            a = 0.25 * (r13 - r31) / c;
        } else {
            d = 0.5 * zd.max(0.0).sqrt();
            let d_safe = if d > 0.0 { d } else { 1.0 };
            b = 0.25 * (r13 + r31) / d_safe;
            c = 0.25 * (r23 + r32) / d_safe;
            a = 0.25 * (r21 - r12) / d_safe;
        }
        // The quaternion and its negation are the same rotation; NIfTI keeps a >= 0.
        if a < 0.0 { [-b, -c, -d] } else { [b, c, d] }
    };
    (quatern, qfac)
}

fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Closest orthogonal matrix (polar decomposition by Newton iteration `Q ← (Q + Q⁻ᵀ) / 2`).
fn polar_orthogonalize(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut q = m;
    for _ in 0..30 {
        let det = det3(&q);
        if det.abs() < 1.0e-12 {
            break;
        }
        // Inverse transpose = cofactor matrix / det.
        let mut next = [[0.0; 3]; 3];
        let mut change = 0.0f64;
        for i in 0..3 {
            for j in 0..3 {
                let (i1, i2) = ((i + 1) % 3, (i + 2) % 3);
                let (j1, j2) = ((j + 1) % 3, (j + 2) % 3);
                let cof = q[i1][j1] * q[i2][j2] - q[i1][j2] * q[i2][j1];
                next[i][j] = 0.5 * (q[i][j] + cof / det);
                change = change.max((next[i][j] - q[i][j]).abs());
            }
        }
        q = next;
        if change < 1.0e-14 {
            break;
        }
    }
    q
}

/// Writes a 3D volume as NIfTI-1 (`.nii`, or gzip-compressed when the name ends in `.gz`).
///
/// The sform and the qform both come from `geometry.affine` (code 1, scanner), `pixdim` from
/// `geometry.spacing`; voxels are written little-endian in C order with no scaling, and every
/// free-text field is left empty. Reading the file back gives the same data and geometry (the
/// header stores the affine and spacing as `f32`).
pub fn write_nifti(path: &Path, geometry: &Geometry, data: &VoxelData) -> Result<(), VolumeError> {
    let header = encode_header(path, geometry, data)?;
    let write_err = |source| VolumeError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(write_err)?;
    let out = BufWriter::with_capacity(1 << 20, file);
    let gzip = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    let write_all = |w: &mut dyn Write| -> io::Result<()> {
        w.write_all(&header)?;
        w.write_all(&[0u8; 4])?; // no extensions
        w.write_all(data.as_bytes())
    };
    if gzip {
        // A fixed header (no name, mtime 0) keeps the output byte-identical for equal input.
        let mut enc = flate2::GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(out, flate2::Compression::new(GZIP_LEVEL));
        write_all(&mut enc).map_err(write_err)?;
        let mut out = enc.finish().map_err(write_err)?;
        out.flush().map_err(write_err)?;
    } else {
        let mut out = out;
        write_all(&mut out).map_err(write_err)?;
        out.flush().map_err(write_err)?;
    }
    Ok(())
}

/// Builds the 348-byte little-endian header for [`write_nifti`].
fn encode_header(
    path: &Path,
    geometry: &Geometry,
    data: &VoxelData,
) -> Result<[u8; HEADER_LEN], VolumeError> {
    let invalid = |reason: String| VolumeError::InvalidVolume {
        path: path.to_path_buf(),
        reason,
    };
    if data.len() != geometry.voxels() {
        return Err(invalid(format!(
            "{} voxels for shape {:?} ({} expected)",
            data.len(),
            geometry.shape,
            geometry.voxels()
        )));
    }
    if let Some(&d) = geometry
        .shape
        .iter()
        .find(|&&d| d == 0 || d > i16::MAX as usize)
    {
        return Err(invalid(format!(
            "shape {:?} has extent {d}; NIfTI-1 needs 1..=32767",
            geometry.shape
        )));
    }
    if geometry
        .spacing
        .iter()
        .any(|s| !(s.is_finite() && *s > 0.0))
    {
        return Err(invalid(format!(
            "spacing {:?} must be positive and finite",
            geometry.spacing
        )));
    }
    if geometry.affine.iter().flatten().any(|v| !v.is_finite()) {
        return Err(invalid("the affine holds NaN or infinite values".into()));
    }
    let mut h = [0u8; HEADER_LEN];
    let mut put =
        |offset: usize, bytes: &[u8]| h[offset..offset + bytes.len()].copy_from_slice(bytes);
    let f32s =
        |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect() };
    put(0, &(HEADER_LEN as i32).to_le_bytes());
    put(38, b"r"); // `regular`, as nibabel writes it
    let [z, y, x] = geometry.shape.map(|d| d as i16);
    for (i, d) in [3i16, x, y, z, 1, 1, 1, 1].iter().enumerate() {
        put(40 + 2 * i, &d.to_le_bytes());
    }
    let (code, bitpix) = dtype_code(data.dtype());
    put(70, &code.to_le_bytes());
    put(72, &bitpix.to_le_bytes());
    let (quatern, qfac) = affine_to_quatern(&geometry.affine);
    let [sz, sy, sx] = geometry.spacing;
    put(76, &f32s(&[qfac, sx, sy, sz, 1.0, 1.0, 1.0, 1.0]));
    put(108, &352.0f32.to_le_bytes()); // vox_offset
    put(112, &f32s(&[1.0, 0.0])); // scl_slope, scl_inter: identity
    put(123, &[2]); // xyzt_units: millimetres
    put(252, &1i16.to_le_bytes()); // qform_code: scanner
    put(254, &1i16.to_le_bytes()); // sform_code: scanner
    let a = &geometry.affine;
    put(256, &f32s(&quatern));
    put(268, &f32s(&[a[0][3], a[1][3], a[2][3]]));
    put(280, &f32s(&a[0]));
    put(296, &f32s(&a[1]));
    put(312, &f32s(&a[2]));
    put(344, b"n+1\0");
    Ok(h)
}

#[cfg(test)]
pub(crate) mod tests;

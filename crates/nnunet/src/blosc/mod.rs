//! A pure-Rust reader of Blosc2 contiguous frames holding a b2nd array (the `.b2nd` files that
//! nnU-Net v2 writes through python-blosc2).
//!
//! Layout (c-blosc2 `README_CFRAME_FORMAT.rst`, `README_B2ND_METALAYER.rst`): a msgpack header
//! (sizes, codec, the `b2nd` metalayer with shape, chunk shape, block shape and dtype), the
//! chunks, an offsets chunk (one 64-bit offset per chunk, itself Blosc-compressed; an offset
//! with its top bit set encodes a chunk of zeros, NaNs or uninitialised values) and a trailer.
//! Each chunk holds the array's chunk padded to whole blocks (`extchunkshape`), block after block
//! in C order of the chunk's block grid, each block in C order; chunks at the array's edge are
//! padded too. Only what lies inside the array is copied out.

mod chunk;
mod codecs;
mod msgpack;

use std::path::Path;

use msgpack::Msg;

use crate::NnunetError;
use crate::array::{NdArray, NpyDType, checked_len};

/// Largest decoded array accepted (64 GiB): a damaged header cannot ask for more memory.
const MAX_ARRAY_BYTES: usize = 1 << 36;

/// A zeroed buffer, or an error naming the file when the memory cannot be had.
fn zeroed(path: &Path, n: usize) -> Result<Vec<u8>, NnunetError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        err(
            path,
            format!("cannot allocate {n} bytes to decode the array"),
        )
    })?;
    v.resize(n, 0);
    Ok(v)
}

/// Largest number of dimensions b2nd allows.
const MAX_DIM: usize = 8;

/// Frame format versions this reader knows (c-blosc2 `BLOSC2_VERSION_FRAME_FORMAT`).
const MAX_FRAME_VERSION: u8 = 3;

/// What the header and the `b2nd` metalayer of a frame say.
#[derive(Clone, Debug, PartialEq)]
pub struct B2ndInfo {
    /// Array shape.
    pub shape: Vec<usize>,
    /// Chunk shape.
    pub chunkshape: Vec<usize>,
    /// Block shape.
    pub blockshape: Vec<usize>,
    /// Element type.
    pub dtype: NpyDType,
    /// Codec number of the frame header (0 BloscLZ, 1 LZ4/LZ4HC, 3 zlib, 4 zstd, ...).
    pub codec: u8,
    /// Filter pipeline of the frame header.
    pub filters: Vec<u8>,
}

/// The frame header fields that locate the data.
struct Frame {
    header_len: usize,
    cbytes: usize,
    nbytes: usize,
    chunksize: usize,
    info: B2ndInfo,
}

fn err(path: &Path, reason: impl Into<String>) -> NnunetError {
    NnunetError::format(path, reason)
}

/// Reads a `.b2nd` file whole and decodes its array.
pub fn read_b2nd(path: &Path) -> Result<NdArray, NnunetError> {
    let bytes = std::fs::read(path).map_err(|e| NnunetError::io(path, e))?;
    decode_b2nd(path, &bytes)
}

/// The header and metalayer of a `.b2nd` file already in memory.
pub fn b2nd_info(path: &Path, bytes: &[u8]) -> Result<B2ndInfo, NnunetError> {
    Ok(parse_frame(path, bytes)?.info)
}

/// Decodes a b2nd frame held in memory (`path` names it in errors).
pub fn decode_b2nd(path: &Path, bytes: &[u8]) -> Result<NdArray, NnunetError> {
    let frame = parse_frame(path, bytes)?;
    let info = &frame.info;
    let nd = info.shape.len();
    let size = info.dtype.size;
    let mut ext_chunk = Vec::with_capacity(nd);
    let mut grid = Vec::with_capacity(nd);
    for d in 0..nd {
        let (c, b) = (info.chunkshape[d], info.blockshape[d]);
        ext_chunk.push(c.div_ceil(b) * b);
        grid.push(info.shape[d].div_ceil(c));
    }
    let chunk_bytes = checked_len(path, &ext_chunk, size)?;
    if frame.chunksize != chunk_bytes {
        return Err(err(
            path,
            format!(
                "frame chunk size {} != {chunk_bytes} bytes of a padded chunk {ext_chunk:?} of {size}-byte items",
                frame.chunksize
            ),
        ));
    }
    let total = checked_len(path, &info.shape, size)?;
    let nchunks = checked_len(path, &grid, 1)?;
    if total == 0 {
        return NdArray::from_raw(path, info.dtype, info.shape.clone(), Vec::new(), false);
    }
    if Some(frame.nbytes) != nchunks.checked_mul(chunk_bytes) {
        return Err(err(
            path,
            format!(
                "frame holds {} uncompressed bytes, {nchunks} chunks of {chunk_bytes} bytes expected",
                frame.nbytes
            ),
        ));
    }
    if total > MAX_ARRAY_BYTES {
        return Err(err(
            path,
            format!("array of {total} bytes exceeds the {MAX_ARRAY_BYTES}-byte limit"),
        ));
    }
    let offsets = read_offsets(path, bytes, &frame, nchunks)?;
    let data_end = frame.header_len + frame.cbytes;
    let mut out = zeroed(path, total)?;
    let mut scratch = zeroed(path, chunk_bytes)?;
    let mut cc = vec![0usize; nd];
    for (n, &off) in offsets.iter().enumerate() {
        if off < 0 {
            let kind = ((off as u64) >> 56) as u8 & 0x07;
            match kind {
                1 | 4 => scratch.fill(0),
                2 => match size {
                    4 => scratch
                        .chunks_exact_mut(4)
                        .for_each(|c| c.copy_from_slice(&f32::NAN.to_le_bytes())),
                    8 => scratch
                        .chunks_exact_mut(8)
                        .for_each(|c| c.copy_from_slice(&f64::NAN.to_le_bytes())),
                    s => {
                        return Err(err(
                            path,
                            format!("chunk {n}: NaN chunk of {s}-byte items (only 4 or 8)"),
                        ));
                    }
                },
                k => {
                    return Err(err(
                        path,
                        format!("chunk {n}: unknown special offset kind {k}"),
                    ));
                }
            }
        } else {
            let start = (off as usize)
                .checked_add(frame.header_len)
                .filter(|&s| s < data_end)
                .ok_or_else(|| {
                    err(
                        path,
                        format!("chunk {n} at offset {off} lies outside the chunk section"),
                    )
                })?;
            let c = &bytes[start..data_end];
            let sizes = chunk::sizes(c).map_err(|e| err(path, format!("chunk {n}: {e}")))?;
            if sizes.nbytes != chunk_bytes {
                return Err(err(
                    path,
                    format!(
                        "chunk {n} holds {} bytes, {chunk_bytes} expected",
                        sizes.nbytes
                    ),
                ));
            }
            chunk::decode(c, &mut scratch).map_err(|e| decode_err(path, n, e))?;
        }
        scatter_chunk(info, &ext_chunk, &cc, &scratch, &mut out);
        for d in (0..nd).rev() {
            cc[d] += 1;
            if cc[d] < grid[d] {
                break;
            }
            cc[d] = 0;
        }
    }
    NdArray::from_raw(path, info.dtype, info.shape.clone(), out, false)
}

/// Unsupported features are reported as such, everything else as a format error.
fn decode_err(path: &Path, n: usize, e: String) -> NnunetError {
    let unsupported = [
        "(only",
        "variable-length",
        "lazy",
        "dictionary",
        "instrumented",
        "unsupported",
    ];
    if unsupported.iter().any(|u| e.contains(u)) {
        NnunetError::unsupported(path, format!("chunk {n}: {e}"))
    } else {
        err(path, format!("chunk {n}: {e}"))
    }
}

/// Copies the in-array part of one decoded chunk (padded to whole blocks) into `out`.
fn scatter_chunk(info: &B2ndInfo, ext_chunk: &[usize], cc: &[usize], src: &[u8], out: &mut [u8]) {
    let nd = info.shape.len();
    let size = info.dtype.size;
    let shape = &info.shape;
    let bs = &info.blockshape;
    // In-array extent of this chunk.
    let origin: Vec<usize> = (0..nd).map(|d| cc[d] * info.chunkshape[d]).collect();
    let valid: Vec<usize> = (0..nd)
        .map(|d| info.chunkshape[d].min(shape[d] - origin[d]))
        .collect();
    let blocks: Vec<usize> = (0..nd).map(|d| ext_chunk[d] / bs[d]).collect();
    let block_items: usize = bs.iter().product();
    // Array strides (items).
    let astride = c_strides(shape);
    let bstride = c_strides(bs);
    let mut b = vec![0usize; nd];
    let mut nblock = 0usize;
    loop {
        // Extent of this block inside the array.
        let ext: Vec<usize> = (0..nd)
            .map(|d| valid[d].saturating_sub(b[d] * bs[d]).min(bs[d]))
            .collect();
        if ext.iter().all(|&e| e > 0) {
            let block_base = nblock * block_items;
            let row = ext[nd - 1];
            let mut r = vec![0usize; nd];
            loop {
                let in_block: usize = (0..nd).map(|d| r[d] * bstride[d]).sum();
                let at: usize = (0..nd)
                    .map(|d| (origin[d] + b[d] * bs[d] + r[d]) * astride[d])
                    .sum();
                let s = (block_base + in_block) * size;
                out[at * size..(at + row) * size].copy_from_slice(&src[s..s + row * size]);
                // Next row: odometer over all but the last axis.
                if !advance(&mut r[..nd - 1], &ext[..nd - 1]) {
                    break;
                }
            }
        }
        nblock += 1;
        if !advance(&mut b, &blocks) {
            break;
        }
    }
}

/// C-order strides (in items) of an array of `shape`.
fn c_strides(shape: &[usize]) -> Vec<usize> {
    let nd = shape.len();
    let mut stride = vec![1usize; nd];
    for d in (0..nd.saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * shape[d + 1];
    }
    stride
}

/// Advances the multi-index `idx` within `ext`, last axis fastest (an odometer); `false` once
/// it has wrapped past the last index.
fn advance(idx: &mut [usize], ext: &[usize]) -> bool {
    for d in (0..idx.len()).rev() {
        idx[d] += 1;
        if idx[d] < ext[d] {
            return true;
        }
        idx[d] = 0;
    }
    false
}

/// Decodes the offsets chunk that follows the chunks.
fn read_offsets(
    path: &Path,
    bytes: &[u8],
    frame: &Frame,
    nchunks: usize,
) -> Result<Vec<i64>, NnunetError> {
    let at = frame.header_len + frame.cbytes;
    if at >= bytes.len() {
        return Err(err(
            path,
            format!("offsets chunk at byte {at} lies past the end of the file"),
        ));
    }
    let c = &bytes[at..];
    let sizes = chunk::sizes(c).map_err(|e| err(path, format!("offsets chunk: {e}")))?;
    if Some(sizes.nbytes) != nchunks.checked_mul(8) {
        return Err(err(
            path,
            format!(
                "offsets chunk holds {} bytes, {nchunks} chunks need {}",
                sizes.nbytes,
                nchunks * 8
            ),
        ));
    }
    let mut raw = vec![0u8; sizes.nbytes];
    chunk::decode(c, &mut raw).map_err(|e| err(path, format!("offsets chunk: {e}")))?;
    Ok(raw
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .collect())
}

fn get<'a>(path: &Path, items: &'a [Msg], i: usize, what: &str) -> Result<&'a Msg, NnunetError> {
    items
        .get(i)
        .ok_or_else(|| err(path, format!("frame header has no {what} (field {i})")))
}

fn int(path: &Path, m: &Msg, what: &str, max: i128) -> Result<usize, NnunetError> {
    match m.as_int() {
        Some(v) if (0..=max).contains(&v) => Ok(v as usize),
        _ => Err(err(
            path,
            format!("{what} is {m:?}, expected an integer in 0..={max}"),
        )),
    }
}

/// Field `i` of the frame header, an integer in `0..=max`.
fn field(
    path: &Path,
    items: &[Msg],
    i: usize,
    what: &str,
    max: i128,
) -> Result<usize, NnunetError> {
    int(path, get(path, items, i, what)?, what, max)
}

fn parse_frame(path: &Path, bytes: &[u8]) -> Result<Frame, NnunetError> {
    let mut pos = 0;
    let header =
        msgpack::read(bytes, &mut pos).map_err(|e| err(path, format!("frame header: {e}")))?;
    let Msg::Array(items) = header else {
        return Err(err(
            path,
            "not a Blosc2 frame (header is not a msgpack array)",
        ));
    };
    match items.first() {
        Some(Msg::Str(magic)) if magic.starts_with(b"b2frame") => {}
        _ => return Err(err(path, "not a Blosc2 frame (no b2frame magic)")),
    }
    let header_len = field(path, &items, 1, "header length", i32::MAX.into())?;
    let frame_len = field(path, &items, 2, "frame length", i64::MAX.into())?;
    if frame_len != bytes.len() {
        return Err(err(
            path,
            format!(
                "frame length {frame_len} != file length {} (truncated or appended to)",
                bytes.len()
            ),
        ));
    }
    if header_len > bytes.len() || header_len < pos {
        return Err(err(
            path,
            format!("header length {header_len} out of range"),
        ));
    }
    let codec = frame_codec(path, get(path, &items, 3, "flags")?)?;
    let nbytes = field(path, &items, 4, "uncompressed size", i64::MAX.into())?;
    let cbytes = field(path, &items, 5, "compressed size", i64::MAX.into())?;
    let typesize = field(path, &items, 6, "type size", i32::MAX.into())?;
    let chunksize = field(path, &items, 8, "chunk size", i32::MAX.into())?;
    if header_len
        .checked_add(cbytes)
        .is_none_or(|e| e > bytes.len())
    {
        return Err(err(
            path,
            format!(
                "header {header_len} + chunks {cbytes} bytes exceed the file of {} bytes",
                bytes.len()
            ),
        ));
    }
    let filters = match items.get(12) {
        Some(Msg::Ext(_, b)) if !b.is_empty() => {
            let n = usize::from(b[0]).min(6).min(b.len() - 1);
            b[1..1 + n].to_vec()
        }
        _ => Vec::new(),
    };
    let b2nd = metalayer(path, bytes, &items, header_len, "b2nd")?.ok_or_else(|| {
        err(
            path,
            "frame has no b2nd metalayer (not an n-dimensional array)",
        )
    })?;
    let info = parse_b2nd_meta(path, &b2nd, codec, filters)?;
    if info.dtype.size != typesize {
        return Err(err(
            path,
            format!(
                "type size {typesize} != {} bytes of dtype {}",
                info.dtype.size,
                info.dtype.name()
            ),
        ));
    }
    Ok(Frame {
        header_len,
        cbytes,
        nbytes,
        chunksize,
        info,
    })
}

/// Checks the frame's 4-byte flags (format version, 64-bit chunk offsets, fixed-length blocks,
/// a contiguous frame) and returns the codec they name.
fn frame_codec(path: &Path, flags: &Msg) -> Result<u8, NnunetError> {
    let Msg::Str(flags) = flags else {
        return Err(err(path, "frame flags are not a 4-byte string"));
    };
    if flags.len() < 4 {
        return Err(err(path, "frame flags are not a 4-byte string"));
    }
    let general = flags[0];
    let version = general & 0x0f;
    if version > MAX_FRAME_VERSION {
        return Err(NnunetError::unsupported(
            path,
            format!("frame format version {version} (this reader knows up to {MAX_FRAME_VERSION})"),
        ));
    }
    if (general >> 4) & 0x03 != 1 {
        return Err(NnunetError::unsupported(
            path,
            format!(
                "chunk offsets of kind {} (only 64-bit)",
                (general >> 4) & 0x03
            ),
        ));
    }
    if general & 0x80 != 0 {
        return Err(NnunetError::unsupported(path, "variable-length blocks"));
    }
    if flags[1] & 0x0f != 0 {
        return Err(NnunetError::unsupported(
            path,
            format!("frame type {} (only contiguous frames, 0)", flags[1] & 0x0f),
        ));
    }
    Ok(flags[2] & 0x0f)
}

/// The content of the metalayer `name`, if the frame has it.
fn metalayer(
    path: &Path,
    bytes: &[u8],
    items: &[Msg],
    header_len: usize,
    name: &str,
) -> Result<Option<Vec<u8>>, NnunetError> {
    let Some(Msg::Array(meta)) = items.get(13) else {
        return Ok(None);
    };
    let Some(Msg::Map(map)) = meta.get(1) else {
        return Ok(None);
    };
    for (k, v) in map {
        if matches!(k, Msg::Str(s) if s == name.as_bytes()) {
            let mut at = int(path, v, "metalayer offset", i32::MAX.into())?;
            if at >= header_len {
                return Err(err(
                    path,
                    format!("metalayer {name} at byte {at} lies outside the header"),
                ));
            }
            return match msgpack::read(&bytes[..header_len], &mut at) {
                Ok(Msg::Bin(b)) => Ok(Some(b)),
                Ok(other) => Err(err(
                    path,
                    format!("metalayer {name} is {other:?}, not bytes"),
                )),
                Err(e) => Err(err(path, format!("metalayer {name}: {e}"))),
            };
        }
    }
    Ok(None)
}

fn parse_b2nd_meta(
    path: &Path,
    b: &[u8],
    codec: u8,
    filters: Vec<u8>,
) -> Result<B2ndInfo, NnunetError> {
    let mut pos = 0;
    let m = msgpack::read(b, &mut pos).map_err(|e| err(path, format!("b2nd metalayer: {e}")))?;
    let Msg::Array(f) = m else {
        return Err(err(path, "b2nd metalayer is not an array"));
    };
    if f.len() < 7 {
        return Err(err(
            path,
            format!("b2nd metalayer has {} fields, 7 expected", f.len()),
        ));
    }
    let ndim = int(path, &f[1], "b2nd ndim", MAX_DIM as i128)?;
    let dims = |i: usize, what: &str| -> Result<Vec<usize>, NnunetError> {
        let Msg::Array(v) = &f[i] else {
            return Err(err(path, format!("b2nd {what} is not an array")));
        };
        if v.len() != ndim {
            return Err(err(
                path,
                format!("b2nd {what} has {} entries for {ndim} dimensions", v.len()),
            ));
        }
        v.iter()
            .map(|x| int(path, x, &format!("b2nd {what} entry"), i64::MAX.into()))
            .collect()
    };
    let shape = dims(2, "shape")?;
    let chunkshape = dims(3, "chunkshape")?;
    let blockshape = dims(4, "blockshape")?;
    if ndim == 0 {
        return Err(NnunetError::unsupported(path, "0-dimensional b2nd array"));
    }
    for d in 0..ndim {
        if chunkshape[d] == 0 || blockshape[d] == 0 || blockshape[d] > chunkshape[d] {
            return Err(err(
                path,
                format!(
                    "b2nd axis {d}: chunk {} and block {} (both at least 1, block at most chunk)",
                    chunkshape[d], blockshape[d]
                ),
            ));
        }
    }
    if int(path, &f[5], "b2nd dtype format", 127)? != 0 {
        return Err(NnunetError::unsupported(
            path,
            "b2nd dtype format other than numpy's (0)",
        ));
    }
    let Msg::Str(descr) = &f[6] else {
        return Err(err(path, "b2nd dtype is not a string"));
    };
    let descr = String::from_utf8_lossy(descr);
    let dtype = NpyDType::parse(&descr).ok_or_else(|| {
        NnunetError::unsupported(
            path,
            format!("b2nd dtype {descr:?} (only booleans, integers and floats)"),
        )
    })?;
    // The padded chunk must be addressable.
    let ext: Vec<usize> = (0..ndim)
        .map(|d| chunkshape[d].div_ceil(blockshape[d]) * blockshape[d])
        .collect();
    checked_len(path, &ext, dtype.size)?;
    Ok(B2ndInfo {
        shape,
        chunkshape,
        blockshape,
        dtype,
        codec,
        filters,
    })
}

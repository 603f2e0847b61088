//! One Blosc2 chunk (c-blosc2 `README_CHUNK_FORMAT.rst`): its header, special chunks (zeros,
//! NaN, uninitialised, a repeated value), memcpyed chunks, and regular chunks of blocks, each
//! block one or `typesize` compressed streams (zero runs and repeated-byte runs included), then
//! the filter pipeline undone in reverse order. Decoding follows `blosc_d` and
//! `pipeline_backward` of c-blosc2's `blosc/blosc2.c`, serially.

use super::codecs;

/// Minimum (Blosc1) header length.
pub(crate) const MIN_HEADER: usize = 16;
/// Extended (Blosc2) header length.
pub(crate) const EXT_HEADER: usize = 32;

/// Header flags (byte 2).
const DOSHUFFLE: u8 = 0x01;
const MEMCPYED: u8 = 0x02;
const DOBITSHUFFLE: u8 = 0x04;
const DODELTA: u8 = 0x08;
const DONT_SPLIT: u8 = 0x10;

/// Filter ids.
const NOFILTER: u8 = 0;
const SHUFFLE: u8 = 1;
const BITSHUFFLE: u8 = 2;
const DELTA: u8 = 3;
const TRUNC_PREC: u8 = 4;

/// The sizes at the start of every chunk header.
#[derive(Copy, Clone, Debug)]
pub(crate) struct ChunkSizes {
    /// Uncompressed bytes.
    pub nbytes: usize,
    /// Compressed bytes, header included.
    pub cbytes: usize,
}

fn le32(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads `nbytes` and `cbytes` from a chunk header.
pub(crate) fn sizes(chunk: &[u8]) -> Result<ChunkSizes, String> {
    if chunk.len() < MIN_HEADER {
        return Err(format!(
            "chunk of {} bytes is shorter than the {MIN_HEADER}-byte header",
            chunk.len()
        ));
    }
    let nbytes = le32(chunk, 4);
    let cbytes = le32(chunk, 12);
    if nbytes < 0 || cbytes < MIN_HEADER as i32 {
        return Err(format!(
            "chunk header: nbytes {nbytes} or cbytes {cbytes} out of range (cbytes at least {MIN_HEADER})"
        ));
    }
    Ok(ChunkSizes {
        nbytes: nbytes as usize,
        cbytes: cbytes as usize,
    })
}

/// A decompressor of one stream: fills `dest`, returns the bytes written.
type Decompress = fn(&[u8], &mut [u8]) -> Result<usize, String>;

/// What a chunk header says about how its body is laid out.
struct Header {
    /// Format version (byte 0).
    version: u8,
    /// Header flags (byte 2).
    flags: u8,
    /// Bytes per item.
    typesize: usize,
    /// Uncompressed bytes per block (positive; the last block may be shorter).
    blocksize: usize,
    /// Header bytes before the body.
    overhead: usize,
    /// The filter pipeline, applied first to last when compressing.
    filters: [u8; 6],
    /// A byte of metadata per filter.
    filters_meta: [u8; 6],
    /// Blosc2 flags (byte 31 of an extended header).
    b2flags: u8,
}

impl Header {
    /// Reads the header of `chunk` (already cut to its `cbytes`), refusing the layouts this
    /// reader does not handle (variable-length blocks, lazy chunks).
    fn parse(chunk: &[u8]) -> Result<Header, String> {
        let cbytes = chunk.len();
        let version = chunk[0];
        let flags = chunk[2];
        let typesize = usize::from(chunk[3]);
        let blocksize = le32(chunk, 8);
        if typesize == 0 {
            return Err("chunk header: typesize 0".into());
        }
        if blocksize <= 0 {
            return Err(format!(
                "chunk header: blocksize {blocksize} (must be positive)"
            ));
        }
        let extended = flags & DOSHUFFLE != 0 && flags & DOBITSHUFFLE != 0;
        let (overhead, mut filters, filters_meta, b2flags, b2flags2) = if extended {
            if cbytes < EXT_HEADER {
                return Err(format!(
                    "chunk with an extended header has cbytes {cbytes} < {EXT_HEADER}"
                ));
            }
            let mut f = [0u8; 6];
            f.copy_from_slice(&chunk[16..22]);
            let mut m = [0u8; 6];
            m.copy_from_slice(&chunk[24..30]);
            (EXT_HEADER, f, m, chunk[31], chunk[30])
        } else {
            (MIN_HEADER, blosc1_filters(flags), [0u8; 6], 0u8, 0u8)
        };
        if extended && version == 3 {
            // Blosc2 alpha chunks did not zero the sixth filter slot.
            filters[5] = 0;
        }
        if b2flags2 & 0x01 != 0 {
            return Err("chunk uses variable-length blocks".into());
        }
        if b2flags & 0x08 != 0 {
            return Err("lazy chunk (data left on disk) inside a file".into());
        }
        Ok(Header {
            version,
            flags,
            typesize,
            blocksize: blocksize as usize,
            overhead,
            filters,
            filters_meta,
            b2flags,
        })
    }

    /// Fills `out` when the chunk is special (zeros, uninitialised, NaN, a repeated value):
    /// `true` then, `false` for a chunk with a body of blocks.
    fn fill_special(&self, chunk: &[u8], out: &mut [u8]) -> Result<bool, String> {
        let (nbytes, cbytes, overhead) = (out.len(), chunk.len(), self.overhead);
        match (self.b2flags >> 4) & 0x07 {
            0 => return Ok(false),
            // Zeros; uninitialised values are given as zeros.
            1 | 4 => out.fill(0),
            2 => match self.typesize {
                4 => out
                    .chunks_exact_mut(4)
                    .for_each(|c| c.copy_from_slice(&f32::NAN.to_le_bytes())),
                8 => out
                    .chunks_exact_mut(8)
                    .for_each(|c| c.copy_from_slice(&f64::NAN.to_le_bytes())),
                t => return Err(format!("NaN chunk with typesize {t} (only 4 or 8)")),
            },
            3 => {
                let vsize = cbytes - overhead;
                if vsize == 0 || nbytes % vsize != 0 {
                    return Err(format!(
                        "repeated-value chunk: value of {vsize} bytes does not tile {nbytes} bytes"
                    ));
                }
                let value = &chunk[overhead..overhead + vsize];
                out.chunks_exact_mut(vsize)
                    .for_each(|c| c.copy_from_slice(value));
            }
            s => return Err(format!("chunk header: unknown special value kind {s}")),
        }
        Ok(true)
    }

    /// Refuses chunks compressed with what this reader cannot undo (a zstd dictionary, an
    /// instrumented codec).
    fn check_plain(&self) -> Result<(), String> {
        if self.b2flags & 0x01 != 0 {
            return Err("chunk uses a zstd dictionary".into());
        }
        if self.b2flags & 0x80 != 0 {
            return Err("chunk from an instrumented codec".into());
        }
        Ok(())
    }

    /// The decompressor of the chunk's codec, once its filters are known to be supported.
    fn decompressor(&self, chunk: &[u8]) -> Result<Decompress, String> {
        let decompress: Decompress = match self.flags >> 5 {
            0 => codecs::blosclz_decompress,
            1 => codecs::lz4_decompress,
            3 => codecs::zlib_decompress,
            4 => codecs::zstd_decompress,
            6 => {
                return Err(format!(
                    "user-defined codec {} (only BloscLZ, LZ4/LZ4HC, zlib and zstd)",
                    chunk.get(22).copied().unwrap_or(0)
                ));
            }
            c => {
                return Err(format!(
                    "codec {c} (only BloscLZ, LZ4/LZ4HC, zlib and zstd)"
                ));
            }
        };
        for &f in &self.filters {
            if !matches!(f, NOFILTER | SHUFFLE | BITSHUFFLE | DELTA | TRUNC_PREC) {
                return Err(format!(
                    "filter {f} (only shuffle, bitshuffle, delta and trunc_prec)"
                ));
            }
        }
        Ok(decompress)
    }
}

/// The filter pipeline a Blosc1 header's flags stand for.
fn blosc1_filters(flags: u8) -> [u8; 6] {
    let mut f = [0u8; 6];
    if flags & DOSHUFFLE != 0 {
        f[5] = SHUFFLE;
    }
    if flags & DOBITSHUFFLE != 0 {
        f[5] = BITSHUFFLE;
    }
    if flags & DODELTA != 0 {
        f[4] = DELTA;
    }
    f
}

/// Decodes a whole chunk into `out`, whose length must be the chunk's `nbytes`.
pub(crate) fn decode(chunk: &[u8], out: &mut [u8]) -> Result<(), String> {
    let ChunkSizes { nbytes, cbytes } = sizes(chunk)?;
    if cbytes > chunk.len() {
        return Err(format!(
            "chunk header says {cbytes} compressed bytes, only {} available",
            chunk.len()
        ));
    }
    let chunk = &chunk[..cbytes];
    if nbytes != out.len() {
        return Err(format!(
            "chunk holds {nbytes} bytes, {} expected",
            out.len()
        ));
    }
    let h = Header::parse(chunk)?;
    if h.fill_special(chunk, out)? {
        return Ok(());
    }
    h.check_plain()?;
    if nbytes == 0 {
        return Ok(());
    }
    let overhead = h.overhead;
    if h.flags & MEMCPYED != 0 {
        if cbytes != nbytes + overhead {
            return Err(format!(
                "memcpyed chunk: cbytes {cbytes} != nbytes {nbytes} + header {overhead}"
            ));
        }
        out.copy_from_slice(&chunk[overhead..]);
        return Ok(());
    }
    let decompress = h.decompressor(chunk)?;

    let blocksize = h.blocksize.min(nbytes);
    let nblocks = nbytes.div_ceil(blocksize);
    let leftover = nbytes % blocksize;
    let bstarts_end = overhead + nblocks * 4;
    if bstarts_end > cbytes {
        return Err(format!(
            "{nblocks} block starts do not fit in a chunk of {cbytes} bytes"
        ));
    }
    let mut tmp = vec![0u8; blocksize];
    let mut tmp2 = vec![0u8; blocksize];
    for j in 0..nblocks {
        let is_leftover = j == nblocks - 1 && leftover > 0;
        let bsize = if is_leftover { leftover } else { blocksize };
        let start = le32(chunk, overhead + j * 4);
        if start <= 0 || start as usize >= cbytes {
            return Err(format!(
                "block {j} starts at byte {start}, outside the chunk of {cbytes} bytes"
            ));
        }
        let nstreams = if h.flags & DONT_SPLIT == 0 && !is_leftover {
            h.typesize
        } else {
            1
        };
        let src = &chunk[start as usize..];
        decode_streams(src, j, nstreams, &mut tmp[..bsize], decompress)?;
        let (done, rest) = out.split_at_mut(j * blocksize);
        unfilter(
            &h,
            j,
            done,
            &mut tmp[..bsize],
            &mut tmp2[..bsize],
            &mut rest[..bsize],
        );
    }
    Ok(())
}

/// Decodes block `j`, `nstreams` compressed streams starting at `src`, into `block` (each
/// stream a zero run, a repeated-byte run, raw bytes or compressed bytes).
fn decode_streams(
    mut src: &[u8],
    j: usize,
    nstreams: usize,
    block: &mut [u8],
    decompress: Decompress,
) -> Result<(), String> {
    let bsize = block.len();
    if !bsize.is_multiple_of(nstreams) {
        return Err(format!(
            "block {j} of {bsize} bytes does not split into {nstreams} streams"
        ));
    }
    let neblock = bsize / nstreams;
    for (s, dest) in block.chunks_exact_mut(neblock).enumerate() {
        if src.len() < 4 {
            return Err(format!("block {j} stream {s}: size runs past the chunk"));
        }
        let csize = le32(src, 0);
        src = &src[4..];
        if csize == 0 {
            dest.fill(0);
        } else if csize < 0 {
            let Some((&token, rest)) = src.split_first() else {
                return Err(format!("block {j} stream {s}: token runs past the chunk"));
            };
            src = rest;
            if token & 0x01 == 0 {
                return Err(format!(
                    "block {j} stream {s}: unsupported stream token {token:#04x}"
                ));
            }
            if csize < -255 {
                return Err(format!(
                    "block {j} stream {s}: run of byte {} (at most 255)",
                    -csize
                ));
            }
            dest.fill((-csize) as u8);
        } else {
            let csize = csize as usize;
            if csize > src.len() {
                return Err(format!(
                    "block {j} stream {s}: {csize} compressed bytes, {} left in the chunk",
                    src.len()
                ));
            }
            let data = &src[..csize];
            src = &src[csize..];
            if csize == neblock {
                dest.copy_from_slice(data);
            } else {
                let n = decompress(data, dest).map_err(|e| format!("block {j} stream {s}: {e}"))?;
                if n != neblock {
                    return Err(format!(
                        "block {j} stream {s}: decoded {n} bytes, {neblock} expected"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Undoes the filter pipeline of block `j`, last filter first (`pipeline_backward`): the
/// decoded bytes in `cur` (`other` is scratch of the same length), the result in `block_out`;
/// `done` holds the blocks before it (delta's reference).
fn unfilter<'a>(
    h: &Header,
    j: usize,
    done: &[u8],
    mut cur: &'a mut [u8],
    mut other: &'a mut [u8],
    block_out: &mut [u8],
) {
    let bsize = block_out.len();
    for i in (0..6).rev() {
        match h.filters[i] {
            SHUFFLE => {
                let ts = if h.filters_meta[i] == 0 {
                    h.typesize
                } else {
                    usize::from(h.filters_meta[i])
                };
                codecs::unshuffle(ts, cur, other);
                std::mem::swap(&mut cur, &mut other);
            }
            BITSHUFFLE => {
                codecs::bitunshuffle(h.typesize, cur, other, h.version);
                std::mem::swap(&mut cur, &mut other);
            }
            DELTA => {
                let reference = (j > 0).then_some(&done[..bsize.min(done.len())]);
                codecs::delta_decode(cur, h.typesize, reference);
            }
            _ => {}
        }
    }
    block_out.copy_from_slice(cur);
}

/// Builds a chunk header (extended) for tests: version 5, given flags and blosc2 flags.
#[cfg(test)]
pub(crate) fn test_header(
    flags: u8,
    typesize: u8,
    nbytes: usize,
    blocksize: usize,
    cbytes: usize,
    filters: [u8; 6],
    b2flags: u8,
) -> Vec<u8> {
    let mut h = vec![5u8, 1, flags | DOSHUFFLE | DOBITSHUFFLE, typesize];
    h.extend((nbytes as i32).to_le_bytes());
    h.extend((blocksize as i32).to_le_bytes());
    h.extend((cbytes as i32).to_le_bytes());
    h.extend(filters);
    h.extend([0, 0]);
    h.extend([0u8; 6]);
    h.extend([0, b2flags]);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_chunks_fill_their_value() {
        let zeros = test_header(0, 4, 16, 16, 32, [0; 6], 1 << 4);
        let mut out = [9u8; 16];
        decode(&zeros, &mut out).unwrap();
        assert_eq!(out, [0; 16]);

        let mut value = test_header(0, 2, 8, 8, 34, [0; 6], 3 << 4);
        value.extend([0x34, 0x12]);
        let mut out = [0u8; 8];
        decode(&value, &mut out).unwrap();
        assert_eq!(out, [0x34, 0x12, 0x34, 0x12, 0x34, 0x12, 0x34, 0x12]);

        let nan = test_header(0, 4, 8, 8, 32, [0; 6], 2 << 4);
        let mut out = [0u8; 8];
        decode(&nan, &mut out).unwrap();
        assert!(f32::from_le_bytes([out[4], out[5], out[6], out[7]]).is_nan());
    }

    #[test]
    fn streams_of_zeros_runs_and_raw_bytes_with_shuffle() {
        // typesize 2, one block of 8 bytes split in 2 streams of 4: stream 0 is a run of 0x07,
        // stream 1 is stored raw (csize == neblock). Then unshuffle.
        let mut body = Vec::new();
        body.extend((-7i32).to_le_bytes());
        body.push(0x01);
        body.extend(4i32.to_le_bytes());
        body.extend([1, 2, 3, 4]);
        let cbytes = EXT_HEADER + 4 + body.len();
        let mut chunk = test_header(1 << 5, 2, 8, 8, cbytes, [0, 0, 0, 0, 0, SHUFFLE], 0);
        chunk.extend(((EXT_HEADER + 4) as i32).to_le_bytes());
        chunk.extend(&body);
        let mut out = [0u8; 8];
        decode(&chunk, &mut out).unwrap();
        assert_eq!(out, [7, 1, 7, 2, 7, 3, 7, 4]);
        // A truncated chunk is an error, not a panic.
        for cut in 0..chunk.len() {
            let mut short = chunk[..cut].to_vec();
            if short.len() >= 16 {
                short[12..16].copy_from_slice(&(cut as i32).to_le_bytes());
            }
            assert!(decode(&short, &mut out).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn unknown_codecs_and_filters_are_named() {
        let mut chunk = test_header(5 << 5, 1, 4, 4, 36, [0; 6], 0);
        chunk.extend(36i32.to_le_bytes());
        let err = decode(&chunk, &mut [0u8; 4]).unwrap_err();
        assert!(err.contains("codec 5"), "{err}");
        let mut chunk = test_header(0, 1, 4, 4, 36, [0, 0, 0, 0, 0, 7], 0);
        chunk.extend(36i32.to_le_bytes());
        let err = decode(&chunk, &mut [0u8; 4]).unwrap_err();
        assert!(err.contains("filter 7"), "{err}");
    }
}

//! Blosc2's codecs (decompression only) and its filters (undone only), as c-blosc2 implements
//! them: BloscLZ and LZ4 are written out here (small LZ77 decoders), zstd and zlib come from the
//! `zstd` and `flate2` crates. Every decoder checks its bounds and fails instead of reading or
//! writing outside its buffers.

/// BloscLZ's `MAX_DISTANCE` (c-blosc2 `blosc/blosclz.c`).
const BLOSCLZ_MAX_DISTANCE: usize = 8191;

/// Decodes one BloscLZ stream into `out` (whose length is the expected size); returns the number
/// of bytes written, as `blosclz_decompress` does (the caller checks it).
pub(crate) fn blosclz_decompress(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    if input.is_empty() {
        return Ok(0);
    }
    let bad = |what: &str| Err(format!("BloscLZ stream: {what}"));
    let limit = input.len();
    let mut ip = 0usize;
    let mut op = 0usize;
    let mut ctrl = usize::from(input[ip] & 31);
    ip += 1;
    loop {
        if ctrl >= 32 {
            let mut len = (ctrl >> 5) - 1;
            let mut ofs = (ctrl & 31) << 8;
            if len == 7 - 1 {
                loop {
                    if ip + 1 >= limit {
                        return bad("match length runs past the end");
                    }
                    let code = input[ip];
                    ip += 1;
                    len += usize::from(code);
                    if code != 255 {
                        break;
                    }
                }
            } else if ip + 1 >= limit {
                return bad("match runs past the end");
            }
            let code = usize::from(input[ip]);
            ip += 1;
            len += 3;
            // Distance back from `op` to the first byte copied.
            let mut dist = ofs + code + 1;
            if code == 255 && ofs == (31 << 8) {
                if ip + 1 >= limit {
                    return bad("far match runs past the end");
                }
                ofs = (usize::from(input[ip]) << 8) + usize::from(input[ip + 1]);
                ip += 2;
                dist = ofs + BLOSCLZ_MAX_DISTANCE + 1;
            }
            if op + len > out.len() {
                return bad("match writes past the expected size");
            }
            if dist > op {
                return bad("match reaches before the start of the output");
            }
            if ip >= limit {
                break;
            }
            ctrl = usize::from(input[ip]);
            ip += 1;
            copy_match(out, op, dist, len);
            op += len;
        } else {
            let n = ctrl + 1;
            if op + n > out.len() {
                return bad("literal run writes past the expected size");
            }
            if ip + n > limit {
                return bad("literal run past the end of the input");
            }
            out[op..op + n].copy_from_slice(&input[ip..ip + n]);
            op += n;
            ip += n;
            if ip >= limit {
                break;
            }
            ctrl = usize::from(input[ip]);
            ip += 1;
        }
    }
    Ok(op)
}

/// LZ77 copy of `len` bytes from `dist` bytes back, overlapping as a byte-by-byte copy does.
fn copy_match(out: &mut [u8], op: usize, dist: usize, len: usize) {
    let start = op - dist;
    if dist >= len {
        out.copy_within(start..start + len, op);
    } else {
        for i in 0..len {
            out[op + i] = out[start + i];
        }
    }
}

/// Decodes one LZ4 block (the format LZ4 and LZ4HC both write) into `out`; returns the number of
/// bytes written.
pub(crate) fn lz4_decompress(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    let bad = |what: &str| Err(format!("LZ4 block: {what}"));
    let mut ip = 0usize;
    let mut op = 0usize;
    let read_len = |ip: &mut usize, mut len: usize| -> Result<usize, String> {
        if len == 15 {
            loop {
                let Some(&b) = input.get(*ip) else {
                    return Err("LZ4 block: length runs past the end".into());
                };
                *ip += 1;
                len += usize::from(b);
                if b != 255 {
                    break;
                }
            }
        }
        Ok(len)
    };
    loop {
        let Some(&token) = input.get(ip) else {
            return bad("missing token");
        };
        ip += 1;
        let lit = read_len(&mut ip, usize::from(token >> 4))?;
        if ip + lit > input.len() {
            return bad("literals past the end of the input");
        }
        if op + lit > out.len() {
            return bad("literals write past the expected size");
        }
        out[op..op + lit].copy_from_slice(&input[ip..ip + lit]);
        ip += lit;
        op += lit;
        if ip == input.len() {
            return Ok(op);
        }
        if ip + 2 > input.len() {
            return bad("match offset past the end");
        }
        let dist = usize::from(u16::from_le_bytes([input[ip], input[ip + 1]]));
        ip += 2;
        let len = read_len(&mut ip, usize::from(token & 15))? + 4;
        if dist == 0 || dist > op {
            return bad("match offset reaches before the start of the output");
        }
        if op + len > out.len() {
            return bad("match writes past the expected size");
        }
        copy_match(out, op, dist, len);
        op += len;
    }
}

/// Decodes one zstd frame into `out`; returns the number of bytes written.
pub(crate) fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    zstd::bulk::decompress_to_buffer(input, out).map_err(|e| format!("zstd stream: {e}"))
}

/// Decodes one zlib stream (with its zlib header, as `uncompress` reads it) into `out`.
pub(crate) fn zlib_decompress(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    let mut d = flate2::Decompress::new(true);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) => Ok(d.total_out() as usize),
        Ok(_) => Err("zlib stream: does not end within the expected size".into()),
        Err(e) => Err(format!("zlib stream: {e}")),
    }
}

/// Undoes the byte shuffle: `src` holds byte 0 of every element, then byte 1, ...; bytes past
/// the last whole element are copied as they are (`unshuffle_generic_inline`).
pub(crate) fn unshuffle(typesize: usize, src: &[u8], dst: &mut [u8]) {
    let n = src.len() / typesize;
    for j in 0..typesize {
        let plane = &src[j * n..(j + 1) * n];
        for (i, &b) in plane.iter().enumerate() {
            dst[i * typesize + j] = b;
        }
    }
    let rem = n * typesize;
    dst[rem..src.len()].copy_from_slice(&src[rem..]);
}

/// Undoes the bit shuffle of `bitshuffle` as c-blosc2 calls it (`bitunshuffle` in
/// `blosc/shuffle.c`): the bits of the first `8·⌊n/8⌋` elements are stored plane by plane (bit
/// `k` of byte `j` of every element, element order, least significant bit first); the remaining
/// bytes are copied. Chunks of format version 2 copy the whole block when `n` is not a multiple of
/// eight.
pub(crate) fn bitunshuffle(typesize: usize, src: &[u8], dst: &mut [u8], chunk_version: u8) {
    let n_all = src.len() / typesize;
    if chunk_version == 2 && !n_all.is_multiple_of(8) {
        dst[..src.len()].copy_from_slice(src);
        return;
    }
    let n = n_all - n_all % 8;
    let bits_per_plane = n;
    dst[..n * typesize].fill(0);
    for j in 0..typesize {
        for k in 0..8 {
            let plane = (j * 8 + k) * bits_per_plane;
            for i in 0..n {
                let p = plane + i;
                let bit = (src[p / 8] >> (p % 8)) & 1;
                dst[i * typesize + j] |= bit << k;
            }
        }
    }
    let done = n * typesize;
    dst[done..src.len()].copy_from_slice(&src[done..]);
}

/// The word size c-blosc2's `delta_decoder` works in for a type size.
fn delta_word(typesize: usize) -> usize {
    match typesize {
        1 | 2 | 4 | 8 => typesize,
        t if t % 8 == 0 => 8,
        _ => 1,
    }
}

/// Undoes the delta filter in place (`delta_decoder` in `blosc/delta.c`). Block 0 (`reference`
/// `None`) is a running XOR of words; every other block is XORed word by word with the decoded
/// block 0. Bytes past the last whole word are left as they are.
pub(crate) fn delta_decode(block: &mut [u8], typesize: usize, reference: Option<&[u8]>) {
    let w = delta_word(typesize);
    let words = block.len() / w;
    match reference {
        None => {
            for i in 1..words {
                for b in 0..w {
                    block[i * w + b] ^= block[(i - 1) * w + b];
                }
            }
        }
        Some(r) => {
            for (x, y) in block[..words * w].iter_mut().zip(r) {
                *x ^= *y;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_decodes_literals_and_overlapping_matches() {
        // "abc" then a match of 9 bytes at distance 3, then the final literals "xy".
        // token 0x35: 3 literals, match length 5+4 = 9.
        let block = [0x35, b'a', b'b', b'c', 3, 0, 0x20, b'x', b'y'];
        let mut out = [0u8; 14];
        assert_eq!(lz4_decompress(&block, &mut out).unwrap(), 14);
        assert_eq!(&out, b"abcabcabcabcxy");
        // A match before the start of the output is refused, not read.
        let mut small = [0u8; 8];
        assert!(lz4_decompress(&[0x10, b'a', 9, 0, 0x00], &mut small).is_err());
        // Output overrun is refused.
        assert!(lz4_decompress(&block, &mut [0u8; 10]).is_err());
    }

    #[test]
    fn blosclz_decodes_runs_and_refuses_bad_distances() {
        // Literal run of 2 ("ab"), then a match of length 3+2=5? ctrl = (len+1)<<5 | ofs_hi.
        // len field 1 → len = 1-1+3 = 3 plus extra 0; here ctrl 0x40: len = (2-1)+3 = 4, ofs 0,
        // code 1 → distance 2. Then literal "z" ends the stream.
        let stream = [0x01, b'a', b'b', 0x40, 0x01, 0x00, b'z'];
        let mut out = [0u8; 7];
        assert_eq!(blosclz_decompress(&stream, &mut out).unwrap(), 7);
        assert_eq!(&out, b"abababz");
        let bad = [0x00, b'a', 0x40, 0x05, 0x00, b'z'];
        assert!(blosclz_decompress(&bad, &mut [0u8; 8]).is_err());
    }

    #[test]
    fn unshuffle_inverts_the_byte_planes_and_keeps_the_tail() {
        let src = [1, 3, 5, 2, 4, 6, 9];
        let mut dst = [0u8; 7];
        unshuffle(2, &src[..6], &mut dst[..6]);
        assert_eq!(&dst[..6], &[1, 2, 3, 4, 5, 6]);
        let mut dst = [0u8; 7];
        unshuffle(3, &src, &mut dst);
        // 7 bytes, typesize 3: two elements, one tail byte.
        assert_eq!(&dst, &[1, 5, 4, 3, 2, 6, 9]);
    }

    #[test]
    fn delta_is_a_running_xor_then_a_xor_with_block_zero() {
        let mut b0 = [1u8, 3, 7, 15];
        delta_decode(&mut b0, 1, None);
        assert_eq!(b0, [1, 2, 5, 10]);
        let mut b1 = [1u8, 1, 1, 1, 1];
        delta_decode(&mut b1, 2, Some(&b0));
        assert_eq!(b1, [0, 3, 4, 11, 1]);
    }
}

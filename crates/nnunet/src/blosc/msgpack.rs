//! The part of msgpack that Blosc2 frames use: their header, the metalayer map and the b2nd
//! metalayer are msgpack documents (integers big-endian).

/// A decoded msgpack value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Msg {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(Vec<u8>),
    Bin(Vec<u8>),
    Array(Vec<Msg>),
    Map(Vec<(Msg, Msg)>),
    Ext(i8, Vec<u8>),
}

impl Msg {
    pub(crate) fn as_int(&self) -> Option<i128> {
        match self {
            Msg::Int(v) => Some(*v),
            _ => None,
        }
    }
}

/// Nesting limit (frames nest three levels deep).
const MAX_DEPTH: usize = 16;

/// Reads one value at `*pos`, advancing it. Errors are short descriptions.
pub(crate) fn read(buf: &[u8], pos: &mut usize) -> Result<Msg, String> {
    read_depth(buf, pos, 0)
}

fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], String> {
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= buf.len())
        .ok_or_else(|| format!("msgpack value at byte {} runs past the end", *pos))?;
    let s = &buf[*pos..end];
    *pos = end;
    Ok(s)
}

fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

fn read_depth(buf: &[u8], pos: &mut usize, depth: usize) -> Result<Msg, String> {
    if depth > MAX_DEPTH {
        return Err("msgpack nesting too deep".into());
    }
    let at = *pos;
    let tag = take(buf, pos, 1)?[0];
    let len_of = |pos: &mut usize, n: usize| -> Result<usize, String> {
        Ok(be(take(buf, pos, n)?) as usize)
    };
    Ok(match tag {
        0x00..=0x7f => Msg::Int(i128::from(tag)),
        0xe0..=0xff => Msg::Int(i128::from(tag as i8)),
        0x80..=0x8f => read_map(buf, pos, usize::from(tag & 0x0f), depth)?,
        0x90..=0x9f => read_array(buf, pos, usize::from(tag & 0x0f), depth)?,
        0xa0..=0xbf => read_str(buf, pos, usize::from(tag & 0x1f))?,
        0xc0 => Msg::Nil,
        0xc2 => Msg::Bool(false),
        0xc3 => Msg::Bool(true),
        0xc4 => {
            let n = len_of(pos, 1)?;
            Msg::Bin(take(buf, pos, n)?.to_vec())
        }
        0xc5 => {
            let n = len_of(pos, 2)?;
            Msg::Bin(take(buf, pos, n)?.to_vec())
        }
        0xc6 => {
            let n = len_of(pos, 4)?;
            Msg::Bin(take(buf, pos, n)?.to_vec())
        }
        0xc7..=0xc9 => {
            let n = len_of(pos, 1 << (tag - 0xc7))?;
            let t = take(buf, pos, 1)?[0] as i8;
            Msg::Ext(t, take(buf, pos, n)?.to_vec())
        }
        0xca => Msg::Float(f64::from(f32::from_bits(be(take(buf, pos, 4)?) as u32))),
        0xcb => Msg::Float(f64::from_bits(be(take(buf, pos, 8)?))),
        0xcc..=0xcf => Msg::Int(i128::from(be(take(buf, pos, 1 << (tag - 0xcc))?))),
        0xd0 => Msg::Int(i128::from(take(buf, pos, 1)?[0] as i8)),
        0xd1 => Msg::Int(i128::from(be(take(buf, pos, 2)?) as u16 as i16)),
        0xd2 => Msg::Int(i128::from(be(take(buf, pos, 4)?) as u32 as i32)),
        0xd3 => Msg::Int(i128::from(be(take(buf, pos, 8)?) as i64)),
        0xd4..=0xd8 => {
            let t = take(buf, pos, 1)?[0] as i8;
            Msg::Ext(t, take(buf, pos, 1 << (tag - 0xd4))?.to_vec())
        }
        0xd9 => {
            let n = len_of(pos, 1)?;
            read_str(buf, pos, n)?
        }
        0xda => {
            let n = len_of(pos, 2)?;
            read_str(buf, pos, n)?
        }
        0xdb => {
            let n = len_of(pos, 4)?;
            read_str(buf, pos, n)?
        }
        0xdc => {
            let n = len_of(pos, 2)?;
            read_array(buf, pos, n, depth)?
        }
        0xdd => {
            let n = len_of(pos, 4)?;
            read_array(buf, pos, n, depth)?
        }
        0xde => {
            let n = len_of(pos, 2)?;
            read_map(buf, pos, n, depth)?
        }
        0xdf => {
            let n = len_of(pos, 4)?;
            read_map(buf, pos, n, depth)?
        }
        0xc1 => return Err(format!("msgpack byte 0xc1 (never used) at byte {at}")),
    })
}

fn read_str(buf: &[u8], pos: &mut usize, n: usize) -> Result<Msg, String> {
    // Blosc2 stores its flags as a 4-byte string: strings stay bytes.
    Ok(Msg::Str(take(buf, pos, n)?.to_vec()))
}

fn read_array(buf: &[u8], pos: &mut usize, n: usize, depth: usize) -> Result<Msg, String> {
    if n > buf.len() {
        return Err(format!(
            "msgpack array of {n} elements in a {}-byte buffer",
            buf.len()
        ));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(read_depth(buf, pos, depth + 1)?);
    }
    Ok(Msg::Array(v))
}

fn read_map(buf: &[u8], pos: &mut usize, n: usize, depth: usize) -> Result<Msg, String> {
    if n > buf.len() {
        return Err(format!(
            "msgpack map of {n} entries in a {}-byte buffer",
            buf.len()
        ));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let k = read_depth(buf, pos, depth + 1)?;
        let val = read_depth(buf, pos, depth + 1)?;
        v.push((k, val));
    }
    Ok(Msg::Map(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_types_blosc2_frames_use() {
        // [fixarray 4: "ab", int32 -2, uint64 7, {fixmap 1: "k": bin8 [1,2]}]
        let buf = [
            0x94, 0xa2, b'a', b'b', 0xd2, 0xff, 0xff, 0xff, 0xfe, 0xcf, 0, 0, 0, 0, 0, 0, 0, 7,
            0x81, 0xa1, b'k', 0xc4, 2, 1, 2,
        ];
        let mut pos = 0;
        let v = read(&buf, &mut pos).unwrap();
        assert_eq!(pos, buf.len());
        assert_eq!(
            v,
            Msg::Array(vec![
                Msg::Str(b"ab".to_vec()),
                Msg::Int(-2),
                Msg::Int(7),
                Msg::Map(vec![(Msg::Str(b"k".to_vec()), Msg::Bin(vec![1, 2]))]),
            ])
        );
        let mut pos = 0;
        assert!(
            read(&[0xc6, 0, 0, 0, 9, 1], &mut pos)
                .unwrap_err()
                .contains("past the end")
        );
    }
}

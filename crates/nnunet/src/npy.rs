//! numpy's `.npy` format and `.npz` archives (zip files of `.npy` members, stored or deflated),
//! as older nnU-Net v2 versions wrote their preprocessed cases (`CASE.npz` with `data` and
//! `seg`, or unpacked `CASE.npy` and `CASE_seg.npy`).

use std::io::Read;
use std::path::Path;

use crate::NnunetError;
use crate::array::{NdArray, NpyDType};

/// Largest `.npy` header accepted.
const MAX_HEADER: usize = 1 << 20;

/// Reads a `.npy` file.
pub fn read_npy(path: &Path) -> Result<NdArray, NnunetError> {
    let bytes = std::fs::read(path).map_err(|e| NnunetError::io(path, e))?;
    parse_npy(path, bytes)
}

/// Parses `.npy` bytes (`path` names the file, or `archive.npz/member.npy`, in errors).
pub fn parse_npy(path: &Path, mut bytes: Vec<u8>) -> Result<NdArray, NnunetError> {
    let bad = |r: String| NnunetError::format(path, r);
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("truncated .npy header".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => {
            return Err(NnunetError::unsupported(
                path,
                format!(".npy format version {v}"),
            ));
        }
    };
    if hlen > MAX_HEADER || start + hlen > bytes.len() {
        return Err(bad(format!(
            ".npy header of {hlen} bytes (at most {MAX_HEADER}, within the file of {} bytes)",
            bytes.len()
        )));
    }
    let header = String::from_utf8_lossy(&bytes[start..start + hlen]).into_owned();
    let descr = dict_str(&header, "descr")
        .ok_or_else(|| bad(format!(".npy header without 'descr': {header:?}")))?;
    let dtype = NpyDType::parse(&descr).ok_or_else(|| {
        NnunetError::unsupported(
            path,
            format!(".npy dtype {descr:?} (only booleans, integers and floats)"),
        )
    })?;
    let fortran = dict_raw(&header, "fortran_order")
        .map(|v| v.starts_with("True"))
        .ok_or_else(|| bad(format!(".npy header without 'fortran_order': {header:?}")))?;
    let shape = dict_raw(&header, "shape")
        .and_then(parse_shape)
        .ok_or_else(|| bad(format!(".npy header without a valid 'shape': {header:?}")))?;
    let data = bytes.split_off(start + hlen);
    NdArray::from_raw(path, dtype, shape, data, fortran)
}

/// The raw text after `'key':` in a Python dict literal.
fn dict_raw<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("'{key}':");
    let at = header.find(&pat)? + pat.len();
    Some(header[at..].trim_start())
}

/// A quoted string value of a Python dict literal.
fn dict_str(header: &str, key: &str) -> Option<String> {
    let v = dict_raw(header, key)?;
    let q = v.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let end = v[1..].find(q)?;
    Some(v[1..1 + end].to_string())
}

/// `(a, b, c)` / `(a,)` / `()` into a shape.
fn parse_shape(v: &str) -> Option<Vec<usize>> {
    let inner = v.strip_prefix('(')?;
    let inner = &inner[..inner.find(')')?];
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

/// One member of a zip archive.
struct ZipEntry {
    name: String,
    method: u16,
    compressed: u64,
    uncompressed: u64,
    local_offset: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Reads the arrays `names` (member names without `.npy`) from an `.npz` archive; a name missing
/// from the archive is an error naming the file and the members it has.
pub fn read_npz(path: &Path, names: &[&str]) -> Result<Vec<NdArray>, NnunetError> {
    let bytes = std::fs::read(path).map_err(|e| NnunetError::io(path, e))?;
    let entries = zip_entries(path, &bytes)?;
    names
        .iter()
        .map(|name| {
            let member = format!("{name}.npy");
            let e = entries.iter().find(|e| e.name == member).ok_or_else(|| {
                NnunetError::format(
                    path,
                    format!(
                        "no array {name:?} in the archive (it has {:?})",
                        entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>()
                    ),
                )
            })?;
            let raw = zip_member(path, &bytes, e)?;
            parse_npy(&path.join(&member), raw)
        })
        .collect()
}

fn zip_entries(path: &Path, b: &[u8]) -> Result<Vec<ZipEntry>, NnunetError> {
    let bad = |r: &str| NnunetError::format(path, format!("zip archive: {r}"));
    // End of central directory: the last "PK\5\6" within the final 64 KiB + 22 bytes.
    let min = b.len().saturating_sub(22 + 65_535);
    let eocd = (min..b.len().saturating_sub(21))
        .rev()
        .find(|&i| &b[i..i + 4] == b"PK\x05\x06")
        .ok_or_else(|| bad("no end-of-central-directory record (not a zip file, or truncated)"))?;
    let mut count = u64::from(le16(b, eocd + 10));
    let mut cd_size = u64::from(le32(b, eocd + 12));
    let mut cd_off = u64::from(le32(b, eocd + 16));
    if cd_off == 0xffff_ffff || count == 0xffff || cd_size == 0xffff_ffff {
        // Zip64: the locator sits right before the EOCD record.
        if eocd < 20 || &b[eocd - 20..eocd - 16] != b"PK\x06\x07" {
            return Err(bad("zip64 archive without a zip64 locator"));
        }
        let z = le64(b, eocd - 12) as usize;
        if z + 56 > b.len() || &b[z..z + 4] != b"PK\x06\x06" {
            return Err(bad("zip64 end-of-central-directory record not found"));
        }
        count = le64(b, z + 32);
        cd_size = le64(b, z + 40);
        cd_off = le64(b, z + 48);
    }
    if cd_off.saturating_add(cd_size) > b.len() as u64 {
        return Err(bad("central directory lies outside the file"));
    }
    let mut at = cd_off as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        if at + 46 > b.len() || &b[at..at + 4] != b"PK\x01\x02" {
            return Err(bad("malformed central directory entry"));
        }
        let method = le16(b, at + 10);
        let mut compressed = u64::from(le32(b, at + 20));
        let mut uncompressed = u64::from(le32(b, at + 24));
        let name_len = usize::from(le16(b, at + 28));
        let extra_len = usize::from(le16(b, at + 30));
        let comment_len = usize::from(le16(b, at + 32));
        let mut local_offset = u64::from(le32(b, at + 42));
        let end = at + 46 + name_len + extra_len + comment_len;
        if end > b.len() {
            return Err(bad("central directory entry runs past the end"));
        }
        let name = String::from_utf8_lossy(&b[at + 46..at + 46 + name_len]).into_owned();
        // Zip64 extended information: only the fields whose 32-bit value is saturated.
        let mut x = at + 46 + name_len;
        let xend = x + extra_len;
        while x + 4 <= xend {
            let id = le16(b, x);
            let len = usize::from(le16(b, x + 2));
            let mut p = x + 4;
            if id == 1 {
                for field in [&mut uncompressed, &mut compressed, &mut local_offset] {
                    if *field == 0xffff_ffff && p + 8 <= x + 4 + len {
                        *field = le64(b, p);
                        p += 8;
                    }
                }
            }
            x += 4 + len;
        }
        out.push(ZipEntry {
            name,
            method,
            compressed,
            uncompressed,
            local_offset,
        });
        at = end;
    }
    Ok(out)
}

fn zip_member(path: &Path, b: &[u8], e: &ZipEntry) -> Result<Vec<u8>, NnunetError> {
    let bad = |r: String| NnunetError::format(path, format!("zip member {}: {r}", e.name));
    let at = e.local_offset as usize;
    if at + 30 > b.len() || &b[at..at + 4] != b"PK\x03\x04" {
        return Err(bad("local header not found".into()));
    }
    let start = at + 30 + usize::from(le16(b, at + 26)) + usize::from(le16(b, at + 28));
    let end = start as u64 + e.compressed;
    if end > b.len() as u64 {
        return Err(bad(format!(
            "{} compressed bytes run past the end",
            e.compressed
        )));
    }
    let data = &b[start..end as usize];
    let out = match e.method {
        0 => data.to_vec(),
        8 => {
            let mut out = Vec::with_capacity(e.uncompressed.min(1 << 26) as usize);
            flate2::read::DeflateDecoder::new(data)
                .take(e.uncompressed + 1)
                .read_to_end(&mut out)
                .map_err(|err| bad(format!("deflate: {err}")))?;
            out
        }
        m => {
            return Err(NnunetError::unsupported(
                path,
                format!(
                    "zip member {} compressed with method {m} (only stored 0 and deflate 8)",
                    e.name
                ),
            ));
        }
    };
    if out.len() as u64 != e.uncompressed {
        return Err(bad(format!(
            "{} bytes after decompression, {} recorded",
            out.len(),
            e.uncompressed
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_parse() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }";
        assert_eq!(dict_str(h, "descr").as_deref(), Some("<f4"));
        assert_eq!(
            dict_raw(h, "shape").and_then(parse_shape),
            Some(vec![2, 3, 4])
        );
        assert_eq!(parse_shape("(5,), }"), Some(vec![5]));
        assert_eq!(parse_shape("(), }"), Some(vec![]));
    }

    #[test]
    fn truncated_or_foreign_files_are_errors() {
        let p = Path::new("x.npy");
        assert!(
            parse_npy(p, b"not numpy".to_vec())
                .unwrap_err()
                .to_string()
                .contains("x.npy")
        );
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend(200u16.to_le_bytes());
        v.extend(b"{'descr': '<f4'");
        assert!(parse_npy(p, v).is_err());
    }
}

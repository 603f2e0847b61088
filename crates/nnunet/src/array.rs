//! A decoded n-dimensional array as numpy describes it: a dtype string, a shape and C-ordered
//! little-endian bytes. Every reader of this crate (b2nd, npy/npz, pickled numpy arrays) ends
//! here, so that the mapping into patchflow's types is written once.

use std::path::Path;

use crate::NnunetError;

/// Kind of a numpy element type.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ElemKind {
    /// `b`: boolean (one byte).
    Bool,
    /// `i`: signed integer.
    Int,
    /// `u`: unsigned integer.
    UInt,
    /// `f`: IEEE float.
    Float,
}

/// A numpy element type (`"<f4"`, `"|i1"`, `">u2"`, ...), limited to booleans, integers and floats.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct NpyDType {
    /// Element kind.
    pub kind: ElemKind,
    /// Bytes per element: 1, 2, 4 or 8.
    pub size: usize,
    /// Whether the bytes are big-endian in the source (arrays of this crate are always converted
    /// to little-endian).
    pub big_endian: bool,
}

impl NpyDType {
    /// Parses a numpy type string: optional byte order (`<`, `>`, `|`, `=`), a kind letter
    /// (`b`, `i`, `u`, `f`) and a size; `?` is numpy's boolean. Returns `None` for any other type.
    pub fn parse(descr: &str) -> Option<NpyDType> {
        let (order, rest) = match descr.as_bytes().first()? {
            b'<' | b'|' | b'=' => (false, &descr[1..]),
            b'>' => (true, &descr[1..]),
            _ => (false, descr),
        };
        if rest == "?" {
            return Some(NpyDType {
                kind: ElemKind::Bool,
                size: 1,
                big_endian: false,
            });
        }
        let kind = match rest.as_bytes().first()? {
            b'b' => ElemKind::Bool,
            b'i' => ElemKind::Int,
            b'u' => ElemKind::UInt,
            b'f' => ElemKind::Float,
            _ => return None,
        };
        let size: usize = rest[1..].parse().ok()?;
        let ok = match kind {
            ElemKind::Bool => size == 1,
            ElemKind::Int | ElemKind::UInt => matches!(size, 1 | 2 | 4 | 8),
            ElemKind::Float => matches!(size, 4 | 8),
        };
        ok.then_some(NpyDType {
            kind,
            size,
            big_endian: order && size > 1,
        })
    }

    /// The type in numpy notation, little-endian (`"<f4"`, `"|u1"`).
    pub fn name(&self) -> String {
        let k = match self.kind {
            ElemKind::Bool => 'b',
            ElemKind::Int => 'i',
            ElemKind::UInt => 'u',
            ElemKind::Float => 'f',
        };
        let order = if self.size == 1 { '|' } else { '<' };
        format!("{order}{k}{}", self.size)
    }
}

/// A decoded array: C order, little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    /// Element type (little-endian from here on).
    pub dtype: NpyDType,
    /// Shape, slowest axis first.
    pub shape: Vec<usize>,
    /// `product(shape) * dtype.size` bytes, C order, little-endian.
    pub data: Vec<u8>,
}

impl NdArray {
    /// Builds an array from bytes in the source byte order and memory order, converting to
    /// little-endian C order. `path` names the file in errors.
    pub fn from_raw(
        path: &Path,
        mut dtype: NpyDType,
        shape: Vec<usize>,
        mut data: Vec<u8>,
        fortran_order: bool,
    ) -> Result<NdArray, NnunetError> {
        let n = checked_len(path, &shape, dtype.size)?;
        if data.len() != n {
            return Err(NnunetError::format(
                path,
                format!(
                    "array of shape {shape:?} and type {} needs {n} bytes, found {}",
                    dtype.name(),
                    data.len()
                ),
            ));
        }
        if dtype.big_endian {
            for e in data.chunks_exact_mut(dtype.size) {
                e.reverse();
            }
            dtype.big_endian = false;
        }
        if fortran_order && shape.len() > 1 {
            data = fortran_to_c(&data, &shape, dtype.size);
        }
        Ok(NdArray { dtype, shape, data })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` (flat C index) as `i64`, for integer and boolean arrays.
    pub fn get_i64(&self, i: usize) -> Option<i64> {
        let b = &self.data[i * self.dtype.size..(i + 1) * self.dtype.size];
        Some(match (self.dtype.kind, self.dtype.size) {
            (ElemKind::Bool | ElemKind::UInt, 1) => i64::from(b[0]),
            (ElemKind::Int, 1) => i64::from(b[0] as i8),
            (ElemKind::Int, 2) => i64::from(i16::from_le_bytes([b[0], b[1]])),
            (ElemKind::UInt, 2) => i64::from(u16::from_le_bytes([b[0], b[1]])),
            (ElemKind::Int, 4) => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (ElemKind::UInt, 4) => i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (ElemKind::Int, 8) => i64::from_le_bytes(b.try_into().ok()?),
            (ElemKind::UInt, 8) => i64::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok()?,
            _ => return None,
        })
    }

    /// Element `i` (flat C index) as `f64`, for any element type.
    pub fn get_f64(&self, i: usize) -> f64 {
        let b = &self.data[i * self.dtype.size..(i + 1) * self.dtype.size];
        match (self.dtype.kind, self.dtype.size) {
            (ElemKind::Float, 4) => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (ElemKind::Float, 8) => f64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
            _ => self.get_i64(i).map_or(f64::NAN, |v| v as f64),
        }
    }
}

/// `product(shape) * size`, or an error naming the file when it overflows.
pub(crate) fn checked_len(path: &Path, shape: &[usize], size: usize) -> Result<usize, NnunetError> {
    let has_zero = shape.contains(&0);
    shape
        .iter()
        .filter(|_| !has_zero)
        .try_fold(if has_zero { 0 } else { size }, |acc, &d| {
            acc.checked_mul(d)
        })
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| {
            NnunetError::format(
                path,
                format!("array of shape {shape:?} with {size}-byte elements is too large"),
            )
        })
}

/// Reorders Fortran-ordered elements (first axis fastest) into C order (last axis fastest).
fn fortran_to_c(data: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = vec![0u8; data.len()];
    let nd = shape.len();
    let mut idx = vec![0usize; nd];
    // Fortran strides.
    let mut fstride = vec![1usize; nd];
    for a in 1..nd {
        fstride[a] = fstride[a - 1] * shape[a - 1];
    }
    for c in 0..n {
        let f: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
        out[c * size..(c + 1) * size].copy_from_slice(&data[f * size..(f + 1) * size]);
        for a in (0..nd).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_parse_as_numpy_writes_them() {
        let f4 = NpyDType::parse("<f4").unwrap();
        assert_eq!(
            (f4.kind, f4.size, f4.big_endian),
            (ElemKind::Float, 4, false)
        );
        assert_eq!(NpyDType::parse("|i1").unwrap().kind, ElemKind::Int);
        assert!(NpyDType::parse(">i2").unwrap().big_endian);
        assert!(!NpyDType::parse(">u1").unwrap().big_endian);
        assert_eq!(NpyDType::parse("|b1").unwrap().kind, ElemKind::Bool);
        assert_eq!(NpyDType::parse("?").unwrap().kind, ElemKind::Bool);
        assert_eq!(NpyDType::parse("i8").unwrap().size, 8);
        for bad in ["<c8", "<f2", "<U3", "O", "<i3", ""] {
            assert!(NpyDType::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn big_endian_and_fortran_order_become_little_endian_c_order() {
        let dt = NpyDType::parse(">i2").unwrap();
        // Fortran order of [[1, 2, 3], [4, 5, 6]]: 1 4 2 5 3 6.
        let raw: Vec<u8> = [1i16, 4, 2, 5, 3, 6]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let a = NdArray::from_raw(Path::new("x"), dt, vec![2, 3], raw, true).unwrap();
        let vals: Vec<i64> = (0..6).map(|i| a.get_i64(i).unwrap()).collect();
        assert_eq!(vals, [1, 2, 3, 4, 5, 6]);
        let err = NdArray::from_raw(Path::new("f.npy"), dt, vec![2, 3], vec![0; 5], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("f.npy") && err.contains("12 bytes"), "{err}");
    }
}

//! Voxel types shared by every layer: element types, typed voxel buffers, grid geometry and the
//! normalisation that turns stored intensities into network input.
//!
//! Axis convention used everywhere in patchflow: arrays are C order `[z][y][x]` with `x` fastest.
//! This is NIfTI's on-disk order (`i` fastest) with the axis list reversed, so reading a NIfTI
//! file never transposes. Shapes, spacings, origins and box sizes are therefore `[z, y, x]`.
//! The affine keeps NIfTI's own convention: it maps the voxel index `(i, j, k, 1) = (x, y, z, 1)`
//! to world millimetres (RAS+), exactly as the file's sform/qform says.

use serde::{Deserialize, Serialize};

/// Element type of a voxel array.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 32-bit integer.
    I32,
    /// 32-bit IEEE float.
    F32,
    /// 64-bit IEEE float.
    F64,
}

impl DType {
    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    /// Lower-case name as used in metadata and on the command line (`"i16"`, `"f32"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::U8 => "u8",
            DType::I8 => "i8",
            DType::U16 => "u16",
            DType::I16 => "i16",
            DType::U32 => "u32",
            DType::I32 => "i32",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    /// Whether the type holds integers.
    pub const fn is_integer(self) -> bool {
        !matches!(self, DType::F32 | DType::F64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust scalar type that can be a voxel element.
pub trait Element: Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Converts to `f64` exactly (every supported type fits in an `f64` mantissa except large
    /// `u32`/`i32`, which still convert exactly because they have at most 32 significant bits).
    fn to_f64(self) -> f64;
}

macro_rules! impl_element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline]
            fn to_f64(self) -> f64 { self as f64 }
        }
    )*};
}
impl_element!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32, f64 => F64);

/// A typed, owned voxel buffer in C order `[z][y][x]`.
#[derive(Clone, Debug, PartialEq)]
pub enum VoxelData {
    /// `u8` voxels.
    U8(Vec<u8>),
    /// `i8` voxels.
    I8(Vec<i8>),
    /// `u16` voxels.
    U16(Vec<u16>),
    /// `i16` voxels.
    I16(Vec<i16>),
    /// `u32` voxels.
    U32(Vec<u32>),
    /// `i32` voxels.
    I32(Vec<i32>),
    /// `f32` voxels.
    F32(Vec<f32>),
    /// `f64` voxels.
    F64(Vec<f64>),
}

/// Applies `$body` to the inner `Vec` of a [`VoxelData`] whatever its element type.
#[macro_export]
macro_rules! with_voxels {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::VoxelData::U8($v) => $body,
            $crate::VoxelData::I8($v) => $body,
            $crate::VoxelData::U16($v) => $body,
            $crate::VoxelData::I16($v) => $body,
            $crate::VoxelData::U32($v) => $body,
            $crate::VoxelData::I32($v) => $body,
            $crate::VoxelData::F32($v) => $body,
            $crate::VoxelData::F64($v) => $body,
        }
    };
}

impl VoxelData {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            VoxelData::U8(_) => DType::U8,
            VoxelData::I8(_) => DType::I8,
            VoxelData::U16(_) => DType::U16,
            VoxelData::I16(_) => DType::I16,
            VoxelData::U32(_) => DType::U32,
            VoxelData::I32(_) => DType::I32,
            VoxelData::F32(_) => DType::F32,
            VoxelData::F64(_) => DType::F64,
        }
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        with_voxels!(self, v => v.len())
    }

    /// Whether the buffer holds no voxels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The voxels as little-endian bytes (patchflow only builds for little-endian targets).
    pub fn as_bytes(&self) -> &[u8] {
        with_voxels!(self, v => bytemuck::cast_slice(v.as_slice()))
    }

    /// Value at flat index `i` as `f64`.
    pub fn get_f64(&self, i: usize) -> f64 {
        with_voxels!(self, v => v[i].to_f64())
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!(
    "patchflow stores and serves little-endian bytes and only builds for little-endian targets"
);

/// Label map: class index per voxel, `u8` when every class fits, `u16` beyond 255 classes.
#[derive(Clone, Debug, PartialEq)]
pub enum LabelData {
    /// Up to 255 classes.
    U8(Vec<u8>),
    /// More than 255 classes.
    U16(Vec<u16>),
}

impl LabelData {
    /// Element type (`U8` or `U16`).
    pub fn dtype(&self) -> DType {
        match self {
            LabelData::U8(_) => DType::U8,
            LabelData::U16(_) => DType::U16,
        }
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        match self {
            LabelData::U8(v) => v.len(),
            LabelData::U16(v) => v.len(),
        }
    }

    /// Whether the map holds no voxels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Class at flat index `i`.
    #[inline]
    pub fn get(&self, i: usize) -> u16 {
        match self {
            LabelData::U8(v) => u16::from(v[i]),
            LabelData::U16(v) => v[i],
        }
    }

    /// The labels as little-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            LabelData::U8(v) => v.as_slice(),
            LabelData::U16(v) => bytemuck::cast_slice(v.as_slice()),
        }
    }

    /// The same labels as a [`VoxelData`] (moves the buffer).
    pub fn into_voxels(self) -> VoxelData {
        match self {
            LabelData::U8(v) => VoxelData::U8(v),
            LabelData::U16(v) => VoxelData::U16(v),
        }
    }
}

/// Where a voxel grid sits in the world.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Geometry {
    /// Voxels per axis, `[z, y, x]`.
    pub shape: [usize; 3],
    /// Voxel size in millimetres, `[z, y, x]`.
    pub spacing: [f64; 3],
    /// NIfTI affine (row-major 4×4): voxel `(i, j, k, 1) = (x, y, z, 1)` to world millimetres, RAS+.
    pub affine: [[f64; 4]; 4],
}

impl Geometry {
    /// Number of voxels.
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }

    /// Three-letter orientation code of the voxel axes `(i, j, k)` in world terms, e.g. `"RAS"`
    /// or `"LPS"`: for each voxel axis, the world direction it mostly points to.
    pub fn orientation(&self) -> String {
        let mut code = String::with_capacity(3);
        for col in 0..3 {
            let v = [
                self.affine[0][col],
                self.affine[1][col],
                self.affine[2][col],
            ];
            let (mut best, mut best_abs) = (0usize, -1.0f64);
            for (row, c) in v.iter().enumerate() {
                if c.abs() > best_abs {
                    best = row;
                    best_abs = c.abs();
                }
            }
            let positive = v[best] >= 0.0;
            code.push(match (best, positive) {
                (0, true) => 'R',
                (0, false) => 'L',
                (1, true) => 'A',
                (1, false) => 'P',
                (_, true) => 'S',
                (_, false) => 'I',
            });
        }
        code
    }
}

/// How to normalise one image channel.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormScheme {
    /// CT: clip to the dataset's foreground 0.5/99.5 percentiles, z-score with the dataset's
    /// foreground mean and standard deviation.
    Ct,
    /// Per-image z-score (MR and other modalities).
    ZScore,
    /// Values are left as they are.
    None,
}

impl NormScheme {
    /// Every scheme.
    pub const ALL: [NormScheme; 3] = [NormScheme::Ct, NormScheme::ZScore, NormScheme::None];

    /// Lower-case name, as in metadata and on the wire (`"ct"`, `"zscore"`, `"none"`).
    pub const fn name(self) -> &'static str {
        match self {
            NormScheme::Ct => "ct",
            NormScheme::ZScore => "zscore",
            NormScheme::None => "none",
        }
    }

    /// The scheme named `name` ([`NormScheme::name`]).
    pub fn from_name(name: &str) -> Option<NormScheme> {
        NormScheme::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// The affine intensity map `y = (clamp(x, lo, hi) - mean) / std`, computed in `f32` as
/// `(x.max(lo).min(hi) - mean) * inv_std` (no clipping when `clip` is `None`).
///
/// A store keeps the source intensities where it can (lossless, narrow integer types) and records
/// the normalisation here; readers apply it when they convert to the output type. Where ingest
/// had to resample, it normalised first (as nnU-Net does) and the recorded map is the identity.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Scheme this map came from (informative).
    pub scheme: NormScheme,
    /// Clip bounds `[lo, hi]` in stored units, or `None`.
    pub clip: Option<[f32; 2]>,
    /// Mean subtracted after clipping.
    pub mean: f32,
    /// Reciprocal of the standard deviation (the divisor is `max(std, 1e-8)`).
    pub inv_std: f32,
}

impl Normalization {
    /// The identity map (already normalised, or no normalisation).
    pub const IDENTITY: Normalization = Normalization {
        scheme: NormScheme::None,
        clip: None,
        mean: 0.0,
        inv_std: 1.0,
    };

    /// Whether applying the map changes nothing.
    pub fn is_identity(&self) -> bool {
        self.clip.is_none() && self.mean == 0.0 && self.inv_std == 1.0
    }

    /// Applies the map to one stored value. Readers must use exactly this expression (or code
    /// proven to give the same bits) so that served data equals the reference.
    #[inline(always)]
    pub fn apply(&self, x: f32) -> f32 {
        let x = match self.clip {
            Some([lo, hi]) => x.max(lo).min(hi),
            None => x,
        };
        (x - self.mean) * self.inv_std
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the wire uses are the ones metadata is written with, and read back.
    #[test]
    fn scheme_names_are_the_serialised_names_and_parse_back() {
        for s in NormScheme::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
            assert_eq!(NormScheme::from_name(s.name()), Some(s));
        }
        assert_eq!(NormScheme::from_name("CT"), None);
    }
}

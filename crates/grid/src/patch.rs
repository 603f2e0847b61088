//! The patch size: three edge lengths in voxels, each in `1..=MAX_PATCH_AXIS`.

use std::fmt;
use std::str::FromStr;

use crate::error::GridError;

/// Largest accepted patch edge, in voxels, everywhere: schedules, requests, the daemon (which
/// publishes it in its limits). A 4096³ patch is already 6.9·10^10 voxels, far beyond any batch
/// byte limit; the bound keeps every voxel count of a patch well inside `u64`.
pub const MAX_PATCH_AXIS: usize = 4096;

/// Axis names in array order.
pub const AXIS_NAMES: [&str; 3] = ["z", "y", "x"];

/// A validated patch size `[z, y, x]`: every edge in `1..=`[`MAX_PATCH_AXIS`].
///
/// Parses from `z,y,x`, `ZxYxX` (also with `×`) or a single number for a cube; displays as
/// `z×y×x`.
///
/// ```
/// use patchflow_grid::Patch;
/// let p: Patch = "64x128x128".parse().unwrap();
/// assert_eq!(p.axes(), [64, 128, 128]);
/// assert_eq!(p.voxels(), 64 * 128 * 128);
/// assert_eq!(p.to_string(), "64×128×128");
/// assert_eq!("96".parse::<Patch>().unwrap(), Patch::cube(96).unwrap());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Patch([usize; 3]);

impl Patch {
    /// A patch from its edges.
    ///
    /// # Errors
    /// [`GridError::ZeroAxis`] for an edge of 0, [`GridError::AxisTooLarge`] above
    /// [`MAX_PATCH_AXIS`] (the first offending axis is named).
    pub fn new(axes: [usize; 3]) -> Result<Patch, GridError> {
        for (axis, &size) in AXIS_NAMES.iter().zip(&axes) {
            check_axis(axis, size as u64)?;
        }
        Ok(Patch(axes))
    }

    /// A patch from signed edges (the wire carries `int64`): zero or negative edges are
    /// [`GridError::ZeroAxis`]-like malformed values, too large ones [`GridError::AxisTooLarge`].
    ///
    /// # Errors
    /// As [`Patch::new`]; a negative edge is reported as [`GridError::BadTriplet`].
    pub fn from_i64(axes: [i64; 3]) -> Result<Patch, GridError> {
        let mut out = [0usize; 3];
        for ((axis, &v), o) in AXIS_NAMES.iter().zip(&axes).zip(&mut out) {
            if v < 0 {
                return Err(GridError::BadTriplet {
                    input: format!("{},{},{}", axes[0], axes[1], axes[2]),
                    reason: format!("patch {axis} = {v} is negative"),
                });
            }
            check_axis(axis, v as u64)?;
            *o = v as usize;
        }
        Ok(Patch(out))
    }

    /// A cube of edge `edge`.
    ///
    /// # Errors
    /// As [`Patch::new`].
    pub fn cube(edge: usize) -> Result<Patch, GridError> {
        Patch::new([edge; 3])
    }

    /// The edges `[z, y, x]`.
    pub fn axes(self) -> [usize; 3] {
        self.0
    }

    /// The edges as the wire's signed integers.
    pub fn to_i64(self) -> [i64; 3] {
        self.0.map(|e| e as i64)
    }

    /// Voxels in the patch (exact: at most 4096³ < 2^37).
    pub fn voxels(self) -> u64 {
        self.0.iter().map(|&e| e as u64).product()
    }

    /// `ZxYxX` with an ASCII `x`, for file names (`checkpoint_64x128x128`).
    pub fn file_tag(self) -> String {
        format!("{}x{}x{}", self.0[0], self.0[1], self.0[2])
    }
}

fn check_axis(axis: &'static str, size: u64) -> Result<(), GridError> {
    if size == 0 {
        return Err(GridError::ZeroAxis { axis });
    }
    if size > MAX_PATCH_AXIS as u64 {
        return Err(GridError::AxisTooLarge {
            axis,
            size,
            max: MAX_PATCH_AXIS,
        });
    }
    Ok(())
}

impl fmt::Display for Patch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}×{}×{}", self.0[0], self.0[1], self.0[2])
    }
}

impl FromStr for Patch {
    type Err = GridError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Patch::new(parse_triplet(s)?)
    }
}

impl TryFrom<[usize; 3]> for Patch {
    type Error = GridError;

    fn try_from(axes: [usize; 3]) -> Result<Self, Self::Error> {
        Patch::new(axes)
    }
}

impl From<Patch> for [usize; 3] {
    fn from(p: Patch) -> Self {
        p.0
    }
}

/// Parses a triplet of numbers: `z,y,x`, `ZxYxX` (`x`, `X` or `×` between the numbers) or a
/// single number meaning the same value on the three axes. Whitespace around numbers is
/// ignored. Used for patch sizes, pooling counts, spacings and chunk shapes alike.
///
/// # Errors
/// [`GridError::BadTriplet`] for an empty text, a part that does not parse as `T`, or a number
/// of parts other than 1 or 3.
pub fn parse_triplet<T>(s: &str) -> Result<[T; 3], GridError>
where
    T: FromStr + Copy,
    T::Err: fmt::Display,
{
    let bad = |reason: String| GridError::BadTriplet {
        input: s.to_string(),
        reason,
    };
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err(bad("the text is empty".to_string()));
    }
    let parts: Vec<&str> = if trimmed.contains(',') {
        trimmed.split(',').collect()
    } else {
        trimmed.split(['x', 'X', '×']).collect()
    };
    let mut values = Vec::with_capacity(3);
    for (i, part) in parts.iter().enumerate() {
        let part = part.trim();
        let v = part
            .parse::<T>()
            .map_err(|e| bad(format!("part {} ({part:?}): {e}", i + 1)))?;
        values.push(v);
    }
    match values.as_slice() {
        [v] => Ok([*v; 3]),
        [z, y, x] => Ok([*z, *y, *x]),
        other => Err(bad(format!(
            "expected 1 or 3 numbers, found {}",
            other.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_form() {
        for text in [
            "32,64,64",
            " 32 , 64 , 64 ",
            "32x64x64",
            "32X64X64",
            "32×64×64",
        ] {
            assert_eq!(
                text.parse::<Patch>().unwrap().axes(),
                [32, 64, 64],
                "{text}"
            );
        }
        assert_eq!("48".parse::<Patch>().unwrap().axes(), [48; 3]);
        assert_eq!(
            parse_triplet::<f64>("0.5,0.5,7.5").unwrap(),
            [0.5, 0.5, 7.5]
        );
        assert_eq!(parse_triplet::<u32>("3,5,5").unwrap(), [3, 5, 5]);
    }

    #[test]
    fn rejects_malformed_and_out_of_range() {
        for text in [
            "", "  ", "1,2", "1,2,3,4", "a,b,c", "1x2,3", "-1,2,3", "1,,3",
        ] {
            assert!(
                matches!(text.parse::<Patch>(), Err(GridError::BadTriplet { .. })),
                "{text:?}"
            );
        }
        assert_eq!(
            "0,4,4".parse::<Patch>().unwrap_err(),
            GridError::ZeroAxis { axis: "z" }
        );
        let e = "4,4,4097".parse::<Patch>().unwrap_err();
        assert_eq!(
            e,
            GridError::AxisTooLarge {
                axis: "x",
                size: 4097,
                max: MAX_PATCH_AXIS
            }
        );
        assert!(e.is_beyond_limit());
        assert!(e.to_string().contains("4096"), "{e}");
        assert!(Patch::from_i64([4, -1, 4]).is_err());
        assert!(!Patch::from_i64([4, -1, 4]).unwrap_err().is_beyond_limit());
        assert!(
            Patch::from_i64([4, 100_000, 4])
                .unwrap_err()
                .is_beyond_limit()
        );
        assert_eq!(
            Patch::from_i64([4, 8, 16]).unwrap(),
            Patch::new([4, 8, 16]).unwrap()
        );
    }

    #[test]
    fn names_and_counts() {
        let p = Patch::new([40, 224, 192]).unwrap();
        assert_eq!(p.to_string(), "40×224×192");
        assert_eq!(p.file_tag(), "40x224x192");
        assert_eq!(p.voxels(), 40 * 224 * 192);
        assert_eq!(Patch::cube(MAX_PATCH_AXIS).unwrap().voxels(), 1 << 36);
        assert_eq!(p.to_i64(), [40, 224, 192]);
    }

    proptest! {
        #[test]
        fn display_and_file_tag_round_trip(z in 1usize..=MAX_PATCH_AXIS, y in 1usize..=MAX_PATCH_AXIS, x in 1usize..=MAX_PATCH_AXIS) {
            let p = Patch::new([z, y, x]).unwrap();
            prop_assert_eq!(p.to_string().parse::<Patch>().unwrap(), p);
            prop_assert_eq!(p.file_tag().parse::<Patch>().unwrap(), p);
            prop_assert_eq!(format!("{z},{y},{x}").parse::<Patch>().unwrap(), p);
            prop_assert_eq!(p.voxels(), (z * y * x) as u64);
        }
    }
}

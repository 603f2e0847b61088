//! The crate's error type.

use std::fmt;

/// A patch size or a `z,y,x` triplet that cannot be accepted. Each variant names the axis and
/// the limit it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GridError {
    /// A patch edge is zero.
    ZeroAxis {
        /// Axis name (`z`, `y` or `x`).
        axis: &'static str,
    },
    /// A patch edge is above [`crate::MAX_PATCH_AXIS`].
    AxisTooLarge {
        /// Axis name (`z`, `y` or `x`).
        axis: &'static str,
        /// The requested edge length.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// A text that is not a triplet (`z,y,x`, `ZxYxX` or one number).
    BadTriplet {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl GridError {
    /// Whether the value is well formed but beyond a limit (as opposed to malformed): servers
    /// answer the first with RESOURCE_EXHAUSTED and the second with INVALID_ARGUMENT.
    pub fn is_beyond_limit(&self) -> bool {
        matches!(self, GridError::AxisTooLarge { .. })
    }
}

impl fmt::Display for GridError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GridError::ZeroAxis { axis } => {
                write!(
                    f,
                    "patch {axis} = 0: every patch edge must be at least 1 voxel"
                )
            }
            GridError::AxisTooLarge { axis, size, max } => write!(
                f,
                "patch {axis} = {size} exceeds the limit of {max} voxels per axis"
            ),
            GridError::BadTriplet { input, reason } => write!(
                f,
                "{input:?} is not a triplet z,y,x (or ZxYxX, or one number for all axes): {reason}"
            ),
        }
    }
}

impl std::error::Error for GridError {}

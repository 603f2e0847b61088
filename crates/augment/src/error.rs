//! The crate's error type.

/// Everything that can go wrong when validating a specification or applying parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AugmentError {
    /// A field of an [`crate::AugmentSpec`] is outside its domain.
    #[error("augmentation spec: {field}: {reason}")]
    InvalidSpec {
        /// The offending field, e.g. `"blur.sigma"`.
        field: &'static str,
        /// What is wrong with it and the accepted limits.
        reason: String,
    },
    /// Buffers handed to [`crate::apply`] do not match the shapes they claim.
    #[error("augmentation buffers: {what}: {reason}")]
    Shape {
        /// Which buffer or shape (`"source image"`, `"output label"`, ...).
        what: &'static str,
        /// Expected and actual sizes.
        reason: String,
    },
    /// Parameters that cannot be applied (e.g. drawn for another number of channels).
    #[error("augmentation parameters: {field}: {reason}")]
    InvalidParams {
        /// The offending parameter.
        field: &'static str,
        /// Why it cannot be applied.
        reason: String,
    },
}

impl AugmentError {
    pub(crate) fn spec(field: &'static str, reason: impl Into<String>) -> AugmentError {
        AugmentError::InvalidSpec {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn shape(what: &'static str, reason: impl Into<String>) -> AugmentError {
        AugmentError::Shape {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn params(field: &'static str, reason: impl Into<String>) -> AugmentError {
        AugmentError::InvalidParams {
            field,
            reason: reason.into(),
        }
    }
}

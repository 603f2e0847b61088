//! The crate's single error type.

use patchflow_grid::GridError;
use thiserror::Error;

/// Everything that can be wrong with the inputs of a schedule or a pooling plan.
///
/// Every variant names the offending field (and axis, where there is one) and the limit it broke,
/// so that a command-line user or a remote client can fix the request without reading code.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CurriculumError {
    /// A pooling count is above [`crate::MAX_POOLS`].
    #[error("pools[{axis}] = {pools} exceeds the limit of {max} stride-2 poolings per axis")]
    PoolsTooLarge {
        /// Axis name (`z`, `y` or `x`).
        axis: &'static str,
        /// The requested pooling count.
        pools: u32,
        /// The limit.
        max: u32,
    },

    /// A patch (or a triplet of numbers) is malformed or beyond
    /// [`patchflow_grid::MAX_PATCH_AXIS`].
    #[error("{field}: {source}")]
    Grid {
        /// Which input carried it (`final_patch`, `patch`, `pools`).
        field: &'static str,
        /// What is wrong, naming the axis and the limit.
        #[source]
        source: GridError,
    },

    /// The final patch is smaller than the smallest patch the network can process.
    #[error(
        "final_patch[{axis}] = {size} is below the minimal patch edge 2^pools[{axis}] = 2^{pools} = {min}"
    )]
    PatchBelowMinimum {
        /// Axis name (`z`, `y` or `x`).
        axis: &'static str,
        /// The final patch edge.
        size: usize,
        /// The pooling count on that axis.
        pools: u32,
        /// The minimal edge, `2^pools`.
        min: usize,
    },

    /// `epochs` is zero.
    #[error("epochs = 0: a schedule needs at least 1 epoch")]
    ZeroEpochs,

    /// A growing schedule has more stages than epochs, so some stage would get no epoch at all
    /// (the published loop divides by `int(epochs / stages) = 0` there).
    #[error(
        "epochs = {epochs} is fewer than the {stages} stages of mode {mode}; every stage needs at \
         least one epoch (use at least {stages} epochs, more poolings, or a smaller final patch)"
    )]
    TooFewEpochs {
        /// The requested number of epochs.
        epochs: usize,
        /// The number of stages the geometry produces.
        stages: usize,
        /// The mode's name.
        mode: &'static str,
    },

    /// `planned_batch` is zero.
    #[error("planned_batch = 0: the batch size must be at least 1")]
    ZeroBatch,

    /// The batch of a stage does not fit in `usize`.
    #[error("{mode} batch of stage {stage} (patch {patch:?}) would be {batch}, beyond usize::MAX")]
    BatchOverflow {
        /// The mode's name.
        mode: &'static str,
        /// Stage index.
        stage: usize,
        /// The stage's patch.
        patch: [usize; 3],
        /// The batch that was computed.
        batch: u128,
    },

    /// A mode name is not one of the known ones.
    #[error(
        "unknown mode {given:?}: expected one of \"pgps\", \"pgps-plus\", \"pgps-performance\", \
         \"rpss\", \"constant\" (\"pgps-efficiency\" is accepted for \"pgps\")"
    )]
    UnknownMode {
        /// What was given.
        given: String,
    },

    /// A voxel spacing is zero, negative, or not finite.
    #[error("spacing[{axis}] = {value}: spacings must be finite and greater than 0 mm")]
    BadSpacing {
        /// Axis name (`z`, `y` or `x`).
        axis: &'static str,
        /// The rejected value.
        value: f64,
    },

    /// A deserialised schedule's stages differ from the ones its own parameters produce.
    #[error(
        "schedule stages do not match its parameters (mode {mode}, final_patch {final_patch:?}, \
         pools {pools:?}, epochs {epochs}, planned_batch {planned_batch}): {detail}"
    )]
    StagesMismatch {
        /// The mode's name.
        mode: &'static str,
        /// The final patch.
        final_patch: [usize; 3],
        /// The pooling counts.
        pools: [u32; 3],
        /// The number of epochs.
        epochs: usize,
        /// The planned batch.
        planned_batch: usize,
        /// The first difference found.
        detail: String,
    },
}

impl CurriculumError {
    /// Wraps a grid error with the field it concerns.
    pub(crate) fn grid(field: &'static str, source: GridError) -> CurriculumError {
        CurriculumError::Grid { field, source }
    }
}

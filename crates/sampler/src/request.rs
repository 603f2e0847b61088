//! What a client asks for and what it gets back.

use std::collections::BTreeMap;

use patchflow_augment::{AugmentParams, AugmentSpec};
use patchflow_grid::Patch;
use patchflow_volume::DType;

use crate::convert::OutputDType;

/// How crops are placed.
#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    /// nnU-Net: items with index `>= round(batch * (1 - fraction))` (Python rounding, half to
    /// even) are centred on a stored location of a class present in the case, the class uniform
    /// among the present ones; the other items are uniform. A case without any foreground falls
    /// back to a uniform crop, as nnU-Net does.
    ForegroundOversample {
        /// Share of forced items, in `[0, 1]` (nnU-Net: 0.33; PGPS: 0.5).
        fraction: f64,
    },
    /// MONAI `RandCropByLabelClasses`: the class is drawn by weight (classes absent from the case
    /// are dropped and the rest renormalised) and the crop is centred on a voxel of that class;
    /// class 0 is centred on a background voxel.
    ClassWeights {
        /// Non-negative, finite weight per class; at least one must be positive.
        weights: BTreeMap<u16, f64>,
    },
    /// Uniform crop origin over nnU-Net's bounds.
    Uniform,
}

/// One request of a stream; it applies from the next batch on.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRequest {
    /// Patch size `[z, y, x]`, validated where it was made (each edge in
    /// `1..=`[`patchflow_grid::MAX_PATCH_AXIS`]).
    pub patch: Patch,
    /// Items per batch, at least 1.
    pub batch: usize,
    /// Placement policy.
    pub policy: Policy,
    /// Crops taken from each drawn case (at least 1): a batch draws `ceil(batch / crops_per_case)`
    /// cases and items of one case are consecutive.
    pub crops_per_case: usize,
    /// Element type of the served image.
    pub dtype: OutputDType,
    /// Seed of the stream; batch `index` depends only on `(dataset, request, index)`.
    pub seed: u64,
    /// Restrict sampling to these case indices (shards); `None` = every case.
    pub cases: Option<Vec<usize>>,
    /// Training augmentation applied to every item (e.g. [`AugmentSpec::nnunet_default`]);
    /// `None` serves plain crops. Parameters are drawn per item from `(seed, batch index, item)`
    /// in a stream apart from placement, so turning augmentation on does not move the crops.
    pub augment: Option<AugmentSpec>,
}

/// Resource limits a server applies to requests (see [`crate::Sampler::validate`]).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest [`Patch::voxels`].
    pub max_patch_voxels: u64,
    /// Largest image + label bytes of one batch.
    pub max_batch_bytes: u64,
    /// Largest number of items per batch.
    pub max_batch: usize,
}

impl Default for Limits {
    /// Generous defaults for a storage node: patches up to 256³, batches up to 512 items and
    /// 2 GiB.
    fn default() -> Limits {
        Limits {
            max_patch_voxels: 256 * 256 * 256,
            max_batch_bytes: 2 << 30,
            max_batch: 512,
        }
    }
}

/// How one item of a batch was placed.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemMeta {
    /// Index of the case in [`crate::Dataset::cases`].
    pub case: usize,
    /// Identifier of the case.
    pub case_id: String,
    /// Patch origin `[z, y, x]` in the case's voxel grid (negative or beyond the volume where
    /// the patch is padded).
    pub origin: [i64; 3],
    /// Whether the crop was centred on a stored voxel of a foreground class (`class`).
    pub forced_foreground: bool,
    /// The class the crop was placed for: the class drawn for a forced or weighted item (`0` for a
    /// weighted background crop), `None` for uniform items.
    pub class: Option<u16>,
    /// The augmentation drawn for the item (`None` when the request has none). The patch is
    /// centred where the plain crop would be; rotation and scaling act about that centre.
    pub augment: Option<AugmentParams>,
}

/// One assembled batch: image `[B, C, Z, Y, X]` and label `[B, 1, Z, Y, X]`, row-major,
/// little-endian.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Index of the batch within its stream.
    pub index: u64,
    /// Patch size `[z, y, x]`.
    pub patch: Patch,
    /// Element type of `image`.
    pub dtype: OutputDType,
    /// Element type of `label` (`U8` or `U16`).
    pub label_dtype: DType,
    /// Image bytes, `B * C * Z * Y * X` elements of `dtype`; padding is `0.0` (before any
    /// intensity augmentation).
    pub image: Vec<u8>,
    /// Label bytes, `B * Z * Y * X` elements of `label_dtype`; padding (and, with augmentation,
    /// voxels sampled from outside the volume) is the ignore label.
    pub label: Vec<u8>,
    /// Placement of each item.
    pub items: Vec<ItemMeta>,
}

//! Class-balanced patch placement, padding and batch assembly, deterministic from a seed.
//!
//! It owns patch placement, padding, conversion and batch assembly from a store. It must not
//! re-validate the patch size (a [`Patch`] arrives validated), talk to the network or choose
//! status codes.
//!
//! A trainer of a 3D segmentation network does not want whole volumes: it wants batches of
//! patches, most of them random, some centred on rare foreground classes, padded where they hang
//! over the volume, normalised and in the element type the network eats. This crate turns a chunk
//! store ([`patchflow_store`]) into exactly that, the way nnU-Net's data loader and MONAI's
//! `RandCropByLabelClasses` place their crops, without their CPU cost:
//!
//! * placement follows nnU-Net v2 (crop bounds, forced-foreground items, class locations) or
//!   MONAI's class weights ([`Policy`]);
//! * every stored run of voxels is converted once, straight into the batch buffer, with the
//!   channel's normalisation fused in ([`convert`]); cases ingested with nnU-Net's
//!   `use_mask_for_norm` serve label 0 and image 0 outside the non-zero mask, as nnU-Net trains
//!   on them (see `CaseMeta::outside_mask_label`);
//! * optional training augmentation ([`AugmentSpec`], nnU-Net's defaults as a preset) runs per
//!   item from a source region read once, see [`patchflow_augment`];
//! * items are filled in parallel on the caller's rayon pool;
//! * batch `index` of a stream depends only on the dataset, the request and `index`: the random
//!   streams are keyed here from `patchflow_grid::rng` (SplitMix64-keyed xoshiro256++) and never
//!   change, so any thread count, machine or restart reproduces the same batches.

mod augmented;
mod compact;
pub mod convert;
mod dataset;
mod error;
mod outside;
pub mod placement;
mod plan;
mod request;
mod rng;
mod sampler;
mod visit;

pub use compact::{CompactBatch, StoredItem};
pub use convert::OutputDType;
pub use dataset::{Dataset, IGNORE_U8, IGNORE_U16};
pub use error::SamplerError;
pub use patchflow_augment::{AugmentParams, AugmentSpec};
pub use patchflow_grid::Patch;
pub use plan::BACKGROUND_TRIES;
pub use request::{Batch, BatchRequest, ItemMeta, Limits, Policy};
pub use sampler::Sampler;

//! NIfTI reading, nnU-Net style preprocessing, class locations and a synthetic phantom generator.
//!
//! It owns the image types, NIfTI input and output, and nnU-Net's preprocessing rules. It must
//! not know the store's file format, a dataset of many files, or the network.
//!
//! This crate is the only place that understands medical image files and what nnU-Net does to
//! them before training. It does no I/O beyond reading and writing volumes; the store and the
//! ingest pipeline build on the types here.
//!
//! * [`read_nifti`], [`read_label`], [`check_same_grid`], [`write_nifti`]: NIfTI-1 in and out,
//!   with clear errors for everything patchflow cannot use ([`read_nifti_bytes`] and
//!   [`read_label_bytes`] read from memory; [`MAX_VOXELS`] bounds what a header may announce).
//! * [`preprocess()`]: crop to non-zero, normalise, resample and sample class locations as
//!   nnU-Net v2 does, keeping source intensities where that is lossless (see the [`preprocess`
//!   module](mod@crate::preprocess) for the stored representation rule).
//! * [`foreground_samples`], [`CtStats`], [`median_spacing`], [`Modality`]: dataset-level
//!   statistics for the planner.
//! * [`mask`]: nnU-Net's non-zero mask and its `use_mask_for_norm` rule
//!   ([`mask_for_norm_applies`], [`relative_size_after_cropping`]).
//! * [`phantom`], [`write_phantom_dataset`]: a deterministic synthetic CT dataset.
//! * [`convert`]: stored values to served image elements, the one conversion the sampler and a
//!   client receiving batches in their stored type both use.

pub mod convert;
mod error;
mod label;
mod locations;
pub mod mask;
mod nifti;
mod phantom;
pub mod preprocess;
mod resample;
mod stats;
mod types;

pub use error::VolumeError;
pub use label::{
    GRID_RELATIVE_TOLERANCE, GRID_TRANSLATION_TOLERANCE_MM, check_same_grid, read_label,
    read_label_bytes,
};
pub use locations::{
    ClassLocations, ClassVoxels, MAX_LOCATIONS_PER_CLASS, MIN_LOCATION_PERCENT, case_seed,
    class_locations, class_locations_outside_mask, foreground_samples, locations_to_keep,
};
pub use mask::{
    MASK_FOR_NORM_MAX_RELATIVE_SIZE, filled_nonzero_mask, mark_outside_mask, mask_for_norm_applies,
    outside_mask_label, relative_size_after_cropping,
};
pub use nifti::{
    MAX_VOXELS, NiftiImage, read_nifti, read_nifti_bytes, read_nifti_geometry, write_nifti,
};
pub use phantom::{
    PHANTOM_LABELS, PhantomSpec, phantom, write_phantom_case, write_phantom_dataset,
    write_phantom_dataset_json,
};
pub use preprocess::{
    CaseInput, PreprocessPlan, PreprocessedCase, crop, load_case, narrow_for_storage, nonzero_bbox,
    preprocess,
};
pub use resample::{
    ANISOTROPY_THRESHOLD, Interp, Kernel, SPACING_TOLERANCE, low_resolution_axis, needs_resampling,
    resample_f32, resample_labels, resampled_shape,
};
pub use stats::{CtStats, MIN_STD, Modality, median_spacing, percentile};
pub use types::{DType, Element, Geometry, LabelData, NormScheme, Normalization, VoxelData};

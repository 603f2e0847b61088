//! Reads nnU-Net v2's preprocessed data in pure Rust, so that `patchflow ingest` can store
//! exactly the voxels nnU-Net's own data loader reads.
//!
//! It owns the readers of nnU-Net's preprocessed files (Blosc2, numpy, pickle, plans) and the
//! mapping of a case into the store's types. It must not write stores, preprocess again, run
//! Python or execute anything a pickle names.
//!
//! nnU-Net's preprocessed configuration folder (`nnUNet_preprocessed/DatasetXXX_Name/
//! nnUNetPlans_3d_fullres`) holds per case `CASE.b2nd` (image, float32 `[C, Z, Y, X]`) and
//! `CASE_seg.b2nd` (seg, `[1, Z, Y, X]`, −1 outside the non-zero mask) written by python-blosc2,
//! or `CASE.npz`/`.npy` from older versions, and `CASE.pkl` (pickled properties: class
//! locations, spacing, crop box, the source image's geometry). The plans file and
//! `dataset.json` one folder up give the patch size, batch size, poolings, transpose and names.
//!
//! No C library and no Python: [`read_b2nd`] decodes Blosc2 frames (BloscLZ, LZ4/LZ4HC, zlib,
//! zstd; shuffle, bitshuffle, delta, trunc_prec; special chunks), [`read_npy`]/[`read_npz`]
//! numpy's files, and [`pickle`] reads pickles symbolically without executing anything.
//! [`PreprocessedFolder`] ties them together and maps a case into the store's types.

mod array;
mod blosc;
mod case;
mod error;
mod npy;
pub mod pickle;
mod plans;

pub use array::{ElemKind, NdArray, NpyDType};
pub use blosc::{B2ndInfo, b2nd_info, decode_b2nd, read_b2nd};
pub use case::{
    ArrayFormat, CaseProperties, NnunetCase, PreprocessedFolder, StoreCase, is_preprocessed_folder,
    outside_mask_label, properties_from_pickle, read_properties,
};
pub use error::NnunetError;
pub use npy::{parse_npy, read_npy, read_npz};
pub use plans::{DatasetJson, NnunetPlan, find_plans_file, read_dataset_json, read_plan};

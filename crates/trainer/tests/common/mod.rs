//! Shared fixtures: a small phantom dataset ingested into a store in a temporary folder.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use patchflow_ingest::{IngestOptions, ingest};
use patchflow_volume::{
    PhantomSpec, VoxelData, phantom, read_nifti, write_nifti, write_phantom_dataset,
};

/// How to make the phantom dataset.
pub struct PhantomStore {
    /// Cases.
    pub cases: usize,
    /// Shape of every case `[z, y, x]`.
    pub shape: [usize; 3],
    /// Spacing `[z, y, x]`.
    pub spacing: [f64; 3],
    /// Lesions per case.
    pub lesions: usize,
    /// Give the last case another spacing and shape (so ingest resamples it) and a zero border
    /// of this many voxels (so ingest crops it).
    pub odd_last_case: Option<usize>,
}

impl PhantomStore {
    /// Three small cases (12×24×24 at 4×2×2 mm, two lesions each): for the tests that compare
    /// runs rather than measure learning.
    pub fn small() -> PhantomStore {
        PhantomStore {
            cases: 3,
            shape: [12, 24, 24],
            spacing: [4.0, 2.0, 2.0],
            lesions: 2,
            odd_last_case: None,
        }
    }
}

/// Raw dataset and store folders under `root`.
pub struct Made {
    /// nnU-Net raw layout.
    pub raw: PathBuf,
    /// The store.
    pub store: PathBuf,
}

/// Writes the phantom dataset and ingests it; returns the folders.
pub fn make_store(root: &Path, spec: &PhantomStore) -> Made {
    let raw = root.join("raw");
    let store = root.join("store");
    let ps = PhantomSpec {
        shape: spec.shape,
        spacing: spec.spacing,
        seed: 11,
        lesions: spec.lesions,
    };
    write_phantom_dataset(&raw, spec.cases, &ps).unwrap();
    if let Some(border) = spec.odd_last_case {
        let id = format!("phantom_{:03}", spec.cases - 1);
        let shape = [spec.shape[0] + 4, spec.shape[1] - 8, spec.shape[2] + 6];
        let spacing = [
            spec.spacing[0] * 0.8,
            spec.spacing[1] * 1.25,
            spec.spacing[2],
        ];
        let (geometry, image, label) = phantom(&PhantomSpec {
            shape,
            spacing,
            seed: 99,
            lesions: spec.lesions,
        });
        // Zero the image on a border so that ingest crops it (nnU-Net crops to non-zero).
        let VoxelData::I16(mut v) = image else {
            panic!("phantom images are i16");
        };
        for z in 0..shape[0] {
            for y in 0..shape[1] {
                for x in 0..shape[2] {
                    let inside = [z, y, x]
                        .iter()
                        .zip(&shape)
                        .all(|(&c, &n)| c >= border && c + border < n);
                    if !inside {
                        v[(z * shape[1] + y) * shape[2] + x] = 0;
                    }
                }
            }
        }
        let img = raw.join("imagesTr").join(format!("{id}_0000.nii.gz"));
        let lab = raw.join("labelsTr").join(format!("{id}.nii.gz"));
        write_nifti(&img, &geometry, &VoxelData::I16(v)).unwrap();
        let mut label = label.into_voxels();
        if let VoxelData::U8(l) = &mut label {
            for z in 0..shape[0] {
                for y in 0..shape[1] {
                    for x in 0..shape[2] {
                        let inside = [z, y, x]
                            .iter()
                            .zip(&shape)
                            .all(|(&c, &n)| c >= border && c + border < n);
                        if !inside {
                            l[(z * shape[1] + y) * shape[2] + x] = 0;
                        }
                    }
                }
            }
        }
        write_nifti(&lab, &geometry, &label).unwrap();
        assert_eq!(read_nifti(&img).unwrap().geometry.shape, shape);
    }
    let opts = IngestOptions {
        jobs: 2,
        progress: false,
        ..IngestOptions::default()
    };
    let report = ingest(&raw, &store, &opts, &AtomicBool::new(false)).unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    Made { raw, store }
}

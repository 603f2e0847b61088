//! The synthetic case the sampling benchmarks share: one CT-like 224×256×256 volume stored as
//! `i16` with CT normalisation and a `u8` label with two spherical organs, written as a
//! one-case store.
#![allow(dead_code)]

use std::collections::BTreeMap;

use patchflow_store::{
    CaseData, CaseMeta, ChannelMeta, Manifest, ManifestCase, WriteOptions, case_file_name,
    write_case,
};
use patchflow_volume::{DType, Geometry, LabelData, NormScheme, Normalization, VoxelData};

/// Shape `[z, y, x]` of the case.
pub const SHAPE: [usize; 3] = [224, 256, 256];

/// Smooth intensities with noise and two spherical organs.
pub fn synthetic() -> (Vec<i16>, Vec<u8>) {
    let n: usize = SHAPE.iter().product();
    let mut image = Vec::with_capacity(n);
    let mut label = Vec::with_capacity(n);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let blobs = [
        ([60.0, 90.0, 100.0], 25.0, 1u8),
        ([150.0, 160.0, 170.0], 12.0, 2u8),
    ];
    for z in 0..SHAPE[0] {
        for y in 0..SHAPE[1] {
            for x in 0..SHAPE[2] {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state % 41) as i16 - 20;
                let base = ((z + 2 * y + x) % 400) as i16 - 150;
                let mut l = 0u8;
                for (c, r, class) in blobs {
                    let d2 = (z as f64 - c[0]).powi(2)
                        + (y as f64 - c[1]).powi(2)
                        + (x as f64 - c[2]).powi(2);
                    if d2 < r * r {
                        l = class;
                    }
                }
                image.push(base + noise + i16::from(l) * 60);
                label.push(l);
            }
        }
    }
    (image, label)
}

/// Writes the case and its manifest into `dir` (dataset "bench"); returns the image and label
/// arrays for the baselines that copy from memory.
pub fn write_store(dir: &std::path::Path) -> (Vec<i16>, Vec<u8>) {
    let (image, label) = synthetic();
    let mut class_voxels: BTreeMap<u16, u64> = BTreeMap::new();
    let mut locations: BTreeMap<u16, Vec<[u32; 3]>> = BTreeMap::new();
    for (i, &l) in label.iter().enumerate() {
        *class_voxels.entry(u16::from(l)).or_default() += 1;
        if l != 0 && i % 7 == 0 {
            let x = i % SHAPE[2];
            let y = (i / SHAPE[2]) % SHAPE[1];
            let z = i / (SHAPE[1] * SHAPE[2]);
            locations
                .entry(u16::from(l))
                .or_default()
                .push([z as u32, y as u32, x as u32]);
        }
    }
    let identity = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let meta = CaseMeta {
        id: "bench".into(),
        shape: SHAPE,
        spacing: [1.0; 3],
        original: Geometry {
            shape: SHAPE,
            spacing: [1.0; 3],
            affine: identity,
        },
        crop_box: [[0, SHAPE[0]], [0, SHAPE[1]], [0, SHAPE[2]]],
        channels: vec![ChannelMeta {
            name: "CT".into(),
            dtype: DType::I16,
            norm: Normalization {
                scheme: NormScheme::Ct,
                clip: Some([-150.0, 300.0]),
                mean: 40.0,
                inv_std: 1.0 / 90.0,
            },
        }],
        label_dtype: DType::U8,
        label_names: BTreeMap::new(),
        class_voxels,
        ignore_label: None,
        outside_mask_label: None,
    };
    let file = case_file_name(&meta.id);
    let report = write_case(
        &dir.join(&file),
        &CaseData {
            meta: &meta,
            channels: &[VoxelData::I16(image.clone())],
            label: &LabelData::U8(label.clone()),
            class_locations: &locations,
        },
        &WriteOptions::default(),
    )
    .expect("write case");
    Manifest {
        format: 1,
        dataset: "bench".into(),
        plan: serde_json::Value::Null,
        cases: vec![ManifestCase {
            id: meta.id.clone(),
            file,
            stored_bytes: report.stored_bytes,
            source: serde_json::Value::Null,
        }],
    }
    .save(dir)
    .expect("manifest");
    (image, label)
}

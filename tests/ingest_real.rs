//! Acceptance on the real volumes of `../shared/data/pairs.tsv`: every pair ingests, `inspect`
//! reports the right classes and voxel counts, and every box read from the store equals the same
//! box cut from the preprocessed volume held in memory, bit for bit.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{
    case_id, crop_ref, inspect_json, pairs, preprocess_in_memory, run_ok, s, shared_data,
};
use patchflow_ingest::DatasetPlan;
use patchflow_store::{ArrayId, CaseReader, ChunkCache, Manifest};
use patchflow_volume::{LabelData, VoxelData, read_label, read_nifti, with_voxels};
use proptest::test_runner::{Config, TestRunner};

/// Class counts of `label` inside `crop` (a plain loop).
fn counts_in_box(
    label: &LabelData,
    shape: [usize; 3],
    crop: [[usize; 2]; 3],
) -> BTreeMap<u16, u64> {
    let mut counts = BTreeMap::new();
    for z in crop[0][0]..crop[0][1] {
        for y in crop[1][0]..crop[1][1] {
            for x in crop[2][0]..crop[2][1] {
                *counts
                    .entry(label.get((z * shape[1] + y) * shape[2] + x))
                    .or_insert(0u64) += 1;
            }
        }
    }
    counts
}

/// Bounding box of the non-zero voxels of `data` (whole volume when all zero), a plain loop.
fn nonzero_box(data: &VoxelData, shape: [usize; 3]) -> [[usize; 2]; 3] {
    let mut lo = shape;
    let mut hi = [0usize; 3];
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                if data.get_f64((z * shape[1] + y) * shape[2] + x) != 0.0 {
                    for (a, v) in [z, y, x].into_iter().enumerate() {
                        lo[a] = lo[a].min(v);
                        hi[a] = hi[a].max(v + 1);
                    }
                }
            }
        }
    }
    if hi == [0; 3] {
        return [[0, shape[0]], [0, shape[1]], [0, shape[2]]];
    }
    [[lo[0], hi[0]], [lo[1], hi[1]], [lo[2], hi[2]]]
}

#[test]
fn every_pair_ingests_and_inspect_reports_true_counts() {
    let Some(data) = shared_data("every_pair_ingests_and_inspect_reports_true_counts") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = common::ingest_pairs(&data, dir.path(), "store");
    let report = inspect_json(&store);
    let cases = report["cases"].as_array().unwrap();
    let pairs = pairs(&data);
    assert_eq!(cases.len(), pairs.len());
    for (image, label, _) in &pairs {
        let id = case_id(image);
        let case = cases
            .iter()
            .find(|c| c["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} missing"));
        let img = read_nifti(&data.join(image)).unwrap();
        let (geom, lab) = read_label(&data.join(label)).unwrap();
        let crop = nonzero_box(&img.data, geom.shape);
        let reported_crop: [[usize; 2]; 3] =
            serde_json::from_value(case["crop_box"].clone()).unwrap();
        assert_eq!(reported_crop, crop, "{id}: crop box");
        let expected = counts_in_box(&lab, geom.shape, crop);
        let reported: BTreeMap<u16, u64> = case["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["value"].as_u64().unwrap() as u16,
                    c["voxels"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(reported, expected, "{id}: class voxel counts");
        let shape: [usize; 3] = serde_json::from_value(case["shape"].clone()).unwrap();
        assert_eq!(
            shape,
            [
                crop[0][1] - crop[0][0],
                crop[1][1] - crop[1][0],
                crop[2][1] - crop[2][0]
            ]
        );
        // Raw bytes are the preprocessed arrays: one image channel and the label map.
        let size = |d: &serde_json::Value| match d.as_str().unwrap() {
            "u8" | "i8" => 1,
            "u16" | "i16" => 2,
            "u32" | "i32" | "f32" => 4,
            other => panic!("unexpected dtype {other}"),
        };
        let voxels = (shape[0] * shape[1] * shape[2]) as u64;
        let raw = voxels * (size(&case["channels"][0]["dtype"]) + size(&case["label_dtype"]));
        assert_eq!(case["raw_bytes"].as_u64().unwrap(), raw, "{id}: raw bytes");
        let file = store.join(case["file"].as_str().unwrap());
        assert_eq!(
            case["stored_bytes"].as_u64().unwrap(),
            std::fs::metadata(&file).unwrap().len(),
            "{id}: stored bytes are the case file's size"
        );
    }
    // A second run finds nothing to do.
    let out = common::run(&[
        "ingest",
        s(&data.join("pairs.tsv")),
        "--out",
        s(&store),
        "--keep-spacing",
    ]);
    assert!(out.status.success());
}

fn check_store_equals_memory(keep_spacing: bool) {
    let Some(data) = shared_data("store_boxes_equal_preprocessed_volumes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let tsv = data.join("pairs.tsv");
    let mut args = vec!["ingest", s(&tsv), "--out", s(&store)];
    if keep_spacing {
        args.push("--keep-spacing");
    }
    run_ok(&args);
    let manifest = Manifest::load(&store).unwrap().unwrap();
    let plan: DatasetPlan = serde_json::from_value(manifest.plan.clone()).unwrap();
    let cache = ChunkCache::new(64 << 20);
    for (image, label, modality) in pairs(&data) {
        let id = case_id(&image);
        let pre = preprocess_in_memory(&data, &image, &label, &modality, &plan);
        let entry = manifest.cases.iter().find(|c| c.id == id).unwrap();
        let reader = Arc::new(CaseReader::open(&store.join(&entry.file), cache.clone()).unwrap());
        assert_eq!(reader.meta().shape, pre.shape, "{id}");
        assert_eq!(reader.meta().channels[0].norm, pre.norms[0], "{id}");
        let shape = pre.shape;
        // The whole volume, then random boxes (partly or wholly outside included).
        let full = [0i64, 0, 0];
        check_box(&reader, &pre, full, shape);
        let mut runner = TestRunner::new(Config {
            cases: 48,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            -40i64..shape[0] as i64 + 8,
            -40i64..shape[1] as i64 + 8,
            -40i64..shape[2] as i64 + 8,
            1usize..80,
            1usize..80,
            1usize..80,
        );
        runner
            .run(&strategy, |(z, y, x, dz, dy, dx)| {
                check_box(&reader, &pre, [z, y, x], [dz, dy, dx]);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

fn check_box(
    reader: &CaseReader,
    pre: &patchflow_volume::PreprocessedCase,
    origin: [i64; 3],
    size: [usize; 3],
) {
    let n: usize = size.iter().product();
    with_voxels!(&pre.channels[0], v => {
        let zero = Default::default();
        let expected = crop_ref(v, pre.shape, origin, size, zero);
        let mut out = vec![zero; n];
        reader.read_box(ArrayId::Image(0), origin, size, zero, &mut out).unwrap();
        // Compare bit patterns so that float data is checked exactly.
        let same = bytemuck::cast_slice::<_, u8>(&out) == bytemuck::cast_slice::<_, u8>(&expected);
        prop_assert_eq_helper(same, &pre.id, origin, size, "image");
    });
    match &pre.label {
        LabelData::U8(v) => {
            let mut out = vec![0u8; n];
            reader
                .read_box(ArrayId::Label, origin, size, 255, &mut out)
                .unwrap();
            prop_assert_eq_helper(
                out == crop_ref(v, pre.shape, origin, size, 255),
                &pre.id,
                origin,
                size,
                "label",
            );
        }
        LabelData::U16(v) => {
            let mut out = vec![0u16; n];
            reader
                .read_box(ArrayId::Label, origin, size, u16::MAX, &mut out)
                .unwrap();
            prop_assert_eq_helper(
                out == crop_ref(v, pre.shape, origin, size, u16::MAX),
                &pre.id,
                origin,
                size,
                "label",
            );
        }
    }
}

fn prop_assert_eq_helper(same: bool, id: &str, origin: [i64; 3], size: [usize; 3], what: &str) {
    assert!(
        same,
        "{id}: {what} box at {origin:?} of size {size:?} differs from the in-memory volume"
    );
}

#[test]
fn store_boxes_equal_preprocessed_volumes_keep_spacing() {
    check_store_equals_memory(true);
}

#[test]
fn store_boxes_equal_preprocessed_volumes_resampled() {
    check_store_equals_memory(false);
}

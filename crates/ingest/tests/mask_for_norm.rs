//! nnU-Net's `use_mask_for_norm` decided by ingest on small synthetic datasets written here:
//! it applies to z-scored channels when cropping keeps less than 3/4 of the median image, never
//! to CT, never when the crop keeps more; where it does not apply, the stored case is exactly
//! what it was without the rule; `--replan` re-decides for an existing store.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use patchflow_ingest::{DatasetPlan, IngestOptions, ingest};
use patchflow_store::{CaseReader, ChunkCache, Manifest};
use patchflow_volume::{
    Geometry, LabelData, NormScheme, VoxelData, load_case, preprocess, write_nifti,
};

/// Whether `[z, y, x]` lies on an edge or corner of `box_` (two or more coordinates on its
/// faces): such voxels are 0 and reach the outside, so they lie outside nnU-Net's mask.
fn on_edge(v: [usize; 3], box_: [[usize; 2]; 3]) -> bool {
    (0..3)
        .filter(|&a| v[a] == box_[a][0] || v[a] + 1 == box_[a][1])
        .count()
        >= 2
}

/// A `[16, 16, 16]` image that is 0 outside `box_`, on the box's edges and in a cavity at its
/// centre (a hole of the mask), with intensities `50 + (z + 2y + 3x) % 40` elsewhere; label 1
/// at one voxel inside the box.
fn write_case(dir: &Path, id: &str, box_: [[usize; 2]; 3]) {
    let shape = [16, 16, 16];
    let g = Geometry {
        shape,
        spacing: [1.0, 1.0, 1.0],
        affine: [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    };
    let mut image = vec![0i16; 4096];
    let mut label = vec![0u8; 4096];
    let centre = box_.map(|[s, e]| (s + e) / 2);
    for z in box_[0][0]..box_[0][1] {
        for y in box_[1][0]..box_[1][1] {
            for x in box_[2][0]..box_[2][1] {
                let i = (z * 16 + y) * 16 + x;
                let cavity = [z, y, x]
                    .iter()
                    .zip(&centre)
                    .all(|(&v, &c)| v + 1 >= c && v <= c);
                if !cavity && !on_edge([z, y, x], box_) {
                    image[i] = 50 + ((z + 2 * y + 3 * x) % 40) as i16;
                }
                if [z, y, x].iter().zip(&box_).all(|(&v, b)| v == b[0] + 1) {
                    label[i] = 1;
                }
            }
        }
    }
    write_nifti(
        &dir.join(format!("{id}.nii.gz")),
        &g,
        &VoxelData::I16(image),
    )
    .unwrap();
    write_nifti(
        &dir.join(format!("{id}_seg.nii.gz")),
        &g,
        &VoxelData::U8(label),
    )
    .unwrap();
}

fn write_tsv(dir: &Path, rows: &[(&str, &str)]) -> std::path::PathBuf {
    let mut text = String::from("image\tlabel\tmodality\n");
    for (id, modality) in rows {
        text.push_str(&format!("{id}.nii.gz\t{id}_seg.nii.gz\t{modality}\n"));
    }
    let path = dir.join("pairs.tsv");
    std::fs::write(&path, text).unwrap();
    path
}

fn options() -> IngestOptions {
    let mut opts = IngestOptions {
        jobs: 2,
        progress: false,
        ..IngestOptions::default()
    };
    opts.settings.keep_spacing = true;
    opts
}

fn run(tsv: &Path, store: &Path, replan: bool) -> patchflow_ingest::IngestReport {
    let opts = IngestOptions {
        replan,
        ..options()
    };
    let report = ingest(tsv, store, &opts, &AtomicBool::new(false)).unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    report
}

fn plan_of(store: &Path) -> DatasetPlan {
    let manifest = Manifest::load(store).unwrap().unwrap();
    serde_json::from_value(manifest.plan).unwrap()
}

fn reader(store: &Path, id: &str) -> CaseReader {
    CaseReader::open(&store.join(format!("{id}.pfc")), ChunkCache::new(0)).unwrap()
}

/// The case preprocessed with `plan` but without any channel using the mask.
fn unmasked(
    dir: &Path,
    id: &str,
    modality: &str,
    plan: &DatasetPlan,
) -> patchflow_volume::PreprocessedCase {
    let image = dir.join(format!("{id}.nii.gz"));
    let label = dir.join(format!("{id}_seg.nii.gz"));
    let input = load_case(id, &[image.as_path()], &[modality], &label).unwrap();
    let mut case_plan = plan.case_plan(&[modality.to_string()]);
    case_plan.use_mask_for_norm.clear();
    preprocess(&input, &case_plan).unwrap()
}

const WIDE: [[usize; 2]; 3] = [[0, 16], [0, 16], [2, 16]]; // keeps 0.875 of the image
const SMALL: [[usize; 2]; 3] = [[3, 13], [4, 12], [2, 14]]; // keeps 0.234

#[test]
fn a_wide_crop_leaves_mr_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    write_case(dir.path(), "a", WIDE);
    write_case(dir.path(), "b", WIDE);
    write_case(dir.path(), "c", SMALL);
    let tsv = write_tsv(dir.path(), &[("a", "T1"), ("b", "T1"), ("c", "T1")]);
    let store = dir.path().join("store");
    let report = run(&tsv, &store, false);
    let plan = plan_of(&store);
    let m = plan.mask_for_norm.clone().expect("decided");
    assert_eq!(m.median_relative_size_after_cropping, 0.875);
    assert_eq!(
        m.use_mask_for_norm,
        BTreeMap::from([("T1".to_string(), false)])
    );
    assert!(
        report.summary().contains("use_mask_for_norm: no"),
        "{}",
        report.summary()
    );
    for id in ["a", "b", "c"] {
        let r = reader(&store, id);
        assert_eq!(r.meta().outside_mask_label, None, "{id}");
        // Exactly the case as preprocessed without the rule: the whole crop box z-scored.
        let want = unmasked(dir.path(), id, "T1", &plan);
        assert_eq!(r.meta().channels[0].norm, want.norms[0], "{id}");
        assert_eq!(r.meta().class_voxels, want.class_voxels, "{id}");
        let n: usize = want.shape.iter().product();
        let mut label = vec![0u8; n];
        r.read_box(
            patchflow_store::ArrayId::Label,
            [0; 3],
            want.shape,
            0,
            &mut label,
        )
        .unwrap();
        assert_eq!(LabelData::U8(label), want.label, "{id}");
    }
}

#[test]
fn ct_never_uses_the_mask() {
    let dir = tempfile::tempdir().unwrap();
    write_case(dir.path(), "a", SMALL);
    write_case(dir.path(), "b", SMALL);
    let tsv = write_tsv(dir.path(), &[("a", "CT"), ("b", "CT")]);
    let store = dir.path().join("store");
    run(&tsv, &store, false);
    let plan = plan_of(&store);
    assert_eq!(
        plan.mask_for_norm, None,
        "no z-scored channel: nothing to decide"
    );
    for id in ["a", "b"] {
        let r = reader(&store, id);
        assert_eq!(r.meta().outside_mask_label, None);
        assert_eq!(r.meta().channels[0].norm.scheme, NormScheme::Ct);
        assert_eq!(
            r.meta().channels[0].norm,
            unmasked(dir.path(), id, "CT", &plan).norms[0]
        );
    }
    // CT beside MR in a dataset with small crops: only the MR case uses the mask.
    let tsv = write_tsv(dir.path(), &[("a", "CT"), ("b", "MR")]);
    let store = dir.path().join("mixed");
    run(&tsv, &store, false);
    let m = plan_of(&store).mask_for_norm.expect("decided");
    assert_eq!(
        m.use_mask_for_norm,
        BTreeMap::from([("CT".to_string(), false), ("MR".to_string(), true)])
    );
    assert_eq!(reader(&store, "a").meta().outside_mask_label, None);
    assert_eq!(reader(&store, "b").meta().outside_mask_label, Some(254));
}

#[test]
fn small_crops_use_the_mask_and_replan_applies_it_to_an_existing_store() {
    let dir = tempfile::tempdir().unwrap();
    write_case(dir.path(), "a", WIDE);
    write_case(dir.path(), "b", WIDE);
    let tsv = write_tsv(dir.path(), &[("a", "T2"), ("b", "T2")]);
    let store = dir.path().join("store");
    run(&tsv, &store, false);
    assert_eq!(reader(&store, "a").meta().outside_mask_label, None);

    // The images shrink to a small head; the stored plan is kept for changed cases (as
    // nnU-Net keeps its plan), so nothing uses the mask yet.
    write_case(dir.path(), "a", SMALL);
    write_case(dir.path(), "b", SMALL);
    let report = run(&tsv, &store, false);
    assert!(!report.replanned);
    assert_eq!(report.ingested.len(), 2);
    assert_eq!(reader(&store, "a").meta().outside_mask_label, None);

    // --replan re-decides and rewrites the cases that depend on it.
    let report = run(&tsv, &store, true);
    assert!(report.replanned);
    assert_eq!(report.ingested.len(), 2);
    let summary = report.summary();
    assert!(
        summary.contains("use_mask_for_norm: yes for T2"),
        "{summary}"
    );
    let m = plan_of(&store).mask_for_norm.expect("decided");
    assert!((m.median_relative_size_after_cropping - 10.0 * 8.0 * 12.0 / 4096.0).abs() < 1e-12);
    let r = reader(&store, "a");
    assert_eq!(r.meta().outside_mask_label, Some(254));
    assert!(!r.meta().class_voxels.contains_key(&254));
    assert!(r.class_locations(254).is_empty());
    // The cavity is a filled hole: inside the mask. The crop box's corners are outside.
    let shape = r.meta().shape;
    assert_eq!(shape, [10, 8, 12]);
    let n: usize = shape.iter().product();
    let mut label = vec![0u8; n];
    r.read_box(
        patchflow_store::ArrayId::Label,
        [0; 3],
        shape,
        0,
        &mut label,
    )
    .unwrap();
    // Exactly the box's edges and corners are marked: 4 * (8 + 6 + 10) + 8 voxels.
    let full = [[0, 10], [0, 8], [0, 12]];
    for (i, &l) in label.iter().enumerate() {
        let v = [i / 96, (i / 12) % 8, i % 12];
        assert_eq!(l == 254, on_edge(v, full), "voxel {v:?}: label {l}");
    }
    assert_eq!(label.iter().filter(|&&l| l == 254).count(), 104);
    // Statistics over the box without its edges (the zero cavity included, a filled hole),
    // straight from the written intensities.
    let values: Vec<f64> = (0..n)
        .filter(|&i| label[i] != 254)
        .map(|i| {
            let [z, y, x] = [i / 96 + 3, (i / 12) % 8 + 4, i % 12 + 2];
            let cavity = [z, y, x]
                .iter()
                .zip([8, 8, 8])
                .all(|(&v, c)| v + 1 >= c && v <= c);
            if cavity {
                0.0
            } else {
                50.0 + ((z + 2 * y + 3 * x) % 40) as f64
            }
        })
        .collect();
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
    let norm = r.meta().channels[0].norm;
    assert_eq!(norm.mean, mean as f32);
    assert_eq!(norm.inv_std, (1.0 / std) as f32);
    let plan = plan_of(&store);
    assert_ne!(norm, unmasked(dir.path(), "a", "T2", &plan).norms[0]);
    // A further run finds nothing to do.
    let report = run(&tsv, &store, false);
    assert_eq!(report.skipped.len(), 2);
}

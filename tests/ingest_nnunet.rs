//! nnU-Net's preprocessed folder into a store, checked against nnU-Net itself: the project's
//! phantom in nnU-Net's raw layout (two MR-like channels, 0 around the body, so nnU-Net crops to
//! the body and marks the outside −1) goes through the real `nnUNetv2_plan_and_preprocess`,
//! `patchflow ingest` stores its preprocessed folder, and then
//! - every array equals what nnU-Net's own dataset class loads, bit for bit (seg −1 ↔ the case's
//!   `outside_mask_label`), and the class locations are nnU-Net's;
//! - the plan's patch size, batch size, poolings per axis and transpose are in the manifest;
//! - batches served on loopback equal the crops nnU-Net's data loader cuts at the same origins
//!   (`crop_and_pad_nd`: image padded with 0; seg −1 beyond the volume, which patchflow serves
//!   as its ignore label).
//!
//! Needs nnunetv2 in the Python environment at `target/pyenv/bin/python` (or `PATCHFLOW_PYTHON`);
//! skips with a message without it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{inspect_json, run_ok, s};
use patchflow_client::{LabelDtype, StreamConfig};
use patchflow_store::{ArrayId, CaseReader, ChunkCache, Manifest};

/// The Python interpreter with nnunetv2, or `None` (with a message).
fn nnunet_python(test: &str) -> Option<PathBuf> {
    let py = std::env::var_os("PATCHFLOW_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import nnunetv2, blosc2, acvl_utils"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(py)
    } else {
        eprintln!(
            "skipping {test}: nnunetv2 is not importable with {} (set PATCHFLOW_PYTHON or build \
             target/pyenv with crates/xtask/pyenv-requirements.txt)",
            py.display()
        );
        None
    }
}

fn python_ok(py: &Path, args: &[&str], envs: &[(&str, &Path)]) {
    let mut cmd = Command::new(py);
    cmd.args(args).env("OMP_NUM_THREADS", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("python runs");
    assert!(
        out.status.success(),
        "python {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn i16s(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The label patchflow stores (and serves) for nnU-Net's seg value `v`.
fn stored_label(v: i16, marker: u16) -> u16 {
    if v == -1 { marker } else { v as u16 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preprocessed_folder_is_stored_and_served_as_nnunet_loads_it() {
    let test = "preprocessed_folder_is_stored_and_served_as_nnunet_loads_it";
    let Some(py) = nnunet_python(test) else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nnunet/nnunet_fixture.py");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, pre, results) = (d.join("raw"), d.join("pre"), d.join("results"));
    for p in [&raw, &pre, &results] {
        std::fs::create_dir_all(p).unwrap();
    }

    // The phantom, anisotropic along x so that nnU-Net transposes ([2, 0, 1]).
    let phantom = d.join("phantom");
    run_ok(&[
        "phantom",
        s(&phantom),
        "--cases",
        "3",
        "--shape",
        "32,48,64",
        "--spacing",
        "1,1,2",
    ]);
    let raw_ds = raw.join("Dataset901_PhantomMR");
    python_ok(&py, &[s(&script), "raw", s(&phantom), s(&raw_ds)], &[]);
    python_ok(
        &py,
        &[
            "-c",
            "import sys\n\
             from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry\n\
             sys.argv = ['nnUNetv2_plan_and_preprocess', '-d', '901', '-c', '3d_fullres', '-np', '1', '-npfp', '1']\n\
             plan_and_preprocess_entry()",
        ],
        &[
            ("nnUNet_raw", &raw),
            ("nnUNet_preprocessed", &pre),
            ("nnUNet_results", &results),
        ],
    );
    let config = pre.join("Dataset901_PhantomMR/nnUNetPlans_3d_fullres");
    assert!(
        config.join("phantom_000.b2nd").is_file(),
        "nnU-Net wrote b2nd cases"
    );

    let store = d.join("store");
    run_ok(&["ingest", s(&config), "--out", s(&store), "--jobs", "2"]);

    // The plan, as nnU-Net wrote it.
    let plans: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(pre.join("Dataset901_PhantomMR/nnUNetPlans.json")).unwrap(),
    )
    .unwrap();
    let conf = &plans["configurations"]["3d_fullres"];
    let strides = conf["architecture"]["arch_kwargs"]["strides"]
        .as_array()
        .unwrap();
    let pools: Vec<u64> = (0..3)
        .map(|a| {
            strides
                .iter()
                .filter(|s| s[a].as_u64().unwrap() > 1)
                .count() as u64
        })
        .collect();
    let report = inspect_json(&store);
    let plan = &report["plan"];
    assert_eq!(plan["kind"], "nnunet");
    assert_eq!(plan["configuration"], "3d_fullres");
    assert_eq!(plan["patch_size"], conf["patch_size"]);
    assert_eq!(plan["batch_size"], conf["batch_size"]);
    assert_eq!(plan["num_pool_per_axis"], serde_json::json!(pools));
    assert_eq!(plan["transpose_forward"], plans["transpose_forward"]);
    assert_eq!(plans["transpose_forward"], serde_json::json!([2, 0, 1]));
    let marker = plan["outside_mask_label"].as_u64().unwrap() as u16;
    assert_eq!(marker, 5, "the phantom's classes are 0..=4");

    // Served batches: record every item's origin, then let nnU-Net cut the same crops.
    let patch: [usize; 3] = [
        conf["patch_size"][0].as_u64().unwrap() as usize,
        conf["patch_size"][1].as_u64().unwrap() as usize,
        conf["patch_size"][2].as_u64().unwrap() as usize,
    ];
    let (server, client) = common::serve_and_connect(vec![store.clone()], 16).await;
    let mut config_stream = StreamConfig::new("store", patch.map(|v| v as i64), 2);
    config_stream.seed = 901;
    let mut stream = client.stream(config_stream).await.unwrap();
    let mut served = Vec::new();
    for _ in 0..6 {
        served.push(stream.next().await.unwrap());
    }
    server.shutdown().await.unwrap();
    let crops: Vec<serde_json::Value> = served
        .iter()
        .flat_map(|b| b.items.iter())
        .map(|i| serde_json::json!({"case": i.case_id, "origin": i.origin, "size": patch}))
        .collect();
    let crops_json = d.join("crops.json");
    std::fs::write(&crops_json, serde_json::to_string(&crops).unwrap()).unwrap();
    let reference = d.join("reference");
    python_ok(
        &py,
        &[
            s(&script),
            "reference",
            s(&config),
            s(&reference),
            s(&crops_json),
        ],
        &[],
    );

    // Whole arrays and class locations.
    let manifest = Manifest::load(&store).unwrap().unwrap();
    assert_eq!(manifest.cases.len(), 3);
    let mut shapes = BTreeMap::new();
    let mut outside_total = 0usize;
    for entry in &manifest.cases {
        let reader = CaseReader::open(&store.join(&entry.file), ChunkCache::new(0)).unwrap();
        let meta = reader.meta().clone();
        let info: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(reference.join(format!("{}.json", entry.id))).unwrap(),
        )
        .unwrap();
        assert_eq!(info["class"], "nnUNetDatasetBlosc2");
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape[0], meta.channels.len());
        assert_eq!(meta.shape, [shape[1], shape[2], shape[3]], "{}", entry.id);
        shapes.insert(entry.id.clone(), meta.shape);
        let n: usize = meta.shape.iter().product();
        let data = f32s(&std::fs::read(reference.join(format!("{}.data", entry.id))).unwrap());
        for c in 0..meta.channels.len() {
            let mut out = vec![0f32; n];
            reader
                .read_box(ArrayId::Image(c), [0, 0, 0], meta.shape, 0f32, &mut out)
                .unwrap();
            let want = &data[c * n..(c + 1) * n];
            assert!(
                out.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} channel {c} differs from nnU-Net's array",
                entry.id
            );
        }
        let seg = i16s(&std::fs::read(reference.join(format!("{}.seg", entry.id))).unwrap());
        let mut label = vec![0u8; n];
        reader
            .read_box(ArrayId::Label, [0, 0, 0], meta.shape, 0u8, &mut label)
            .unwrap();
        let outside = seg.iter().filter(|&&v| v == -1).count();
        outside_total += outside;
        assert_eq!(
            meta.outside_mask_label,
            (outside > 0).then_some(marker),
            "{}",
            entry.id
        );
        for (i, (&l, &v)) in label.iter().zip(&seg).enumerate() {
            assert_eq!(
                u16::from(l),
                stored_label(v, marker),
                "{} voxel {i}",
                entry.id
            );
        }
        let locs = info["class_locations"].as_object().unwrap();
        assert_eq!(locs.len(), 4, "nnU-Net sampled the four foreground classes");
        for (class, rows) in locs {
            let want: Vec<[u32; 3]> = rows
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let r = r.as_array().unwrap();
                    [1, 2, 3].map(|k| r[k].as_u64().unwrap() as u32)
                })
                .collect();
            assert_eq!(
                reader.class_locations(class.parse().unwrap()),
                &want[..],
                "{} class {class}",
                entry.id
            );
        }
    }
    assert!(outside_total > 0, "nnU-Net marked voxels outside its mask");

    // Served crops against nnU-Net's data loader crops.
    let crop_data = f32s(&std::fs::read(reference.join("crops.data")).unwrap());
    let crop_seg = i16s(&std::fs::read(reference.join("crops.seg")).unwrap());
    let n: usize = patch.iter().product();
    let channels = 2;
    let (mut k, mut padded, mut outside_served) = (0usize, 0usize, 0usize);
    for batch in &served {
        assert_eq!(batch.patch, patch);
        let image = common::batch_image(batch);
        let labels: Vec<u16> = match batch.label_dtype {
            LabelDtype::U8 => batch.label.iter().map(|&x| u16::from(x)).collect(),
            other => panic!("unexpected label dtype {other:?}"),
        };
        for (i, item) in batch.items.iter().enumerate() {
            let got = &image[i * n * channels..(i + 1) * n * channels];
            let want = &crop_data[k * n * channels..(k + 1) * n * channels];
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} at {:?}: image differs from nnU-Net's crop",
                item.case_id,
                item.origin
            );
            let shape = shapes[&item.case_id];
            for (j, (&l, &v)) in labels[i * n..(i + 1) * n]
                .iter()
                .zip(&crop_seg[k * n..(k + 1) * n])
                .enumerate()
            {
                let p = [
                    j / (patch[1] * patch[2]),
                    (j / patch[2]) % patch[1],
                    j % patch[2],
                ];
                let inside = (0..3).all(|a| {
                    let c = item.origin[a] + p[a] as i64;
                    c >= 0 && (c as usize) < shape[a]
                });
                // Inside the volume the daemon serves nnU-Net's −1 as label 0, as nnU-Net's
                // training does after `RemoveLabelTansform(-1, 0)`.
                let want = if inside {
                    stored_label(v, 0)
                } else {
                    assert_eq!(v, -1, "nnU-Net pads its seg with -1");
                    padded += 1;
                    batch.ignore_label
                };
                outside_served += usize::from(inside && v == -1);
                assert_eq!(
                    l, want,
                    "{} at {:?}: label of voxel {j}",
                    item.case_id, item.origin
                );
            }
            k += 1;
        }
    }
    assert_eq!(k, 12);
    assert!(padded > 0, "the planned patch reaches beyond some volume");
    assert!(
        outside_served > 0,
        "crops include voxels outside nnU-Net's mask"
    );
}

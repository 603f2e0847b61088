//! Ingest of an nnU-Net preprocessed folder without Python: a tiny folder written here (`.npy`
//! arrays as unpacked by older nnU-Net versions, a pickled properties file made by Python's
//! pickle, committed in crates/nnunet/tests/fixtures), stored as nnU-Net has it, skipped when
//! unchanged, and never mixed with raw-dataset cases.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use patchflow_ingest::{IngestOptions, NnunetStorePlan, ingest, inspect, render_text, watch};
use patchflow_store::{ArrayId, CaseReader, ChunkCache, Manifest};

fn npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}), }}",
        dims.join(", ")
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

const SHAPE: [usize; 3] = [5, 6, 7];

fn image(case: usize) -> Vec<f32> {
    (0..2 * 210)
        .map(|i| (i * 7 + case) as f32 * 0.37 - 20.0)
        .collect()
}

fn seg(case: usize) -> Vec<i8> {
    (0..210)
        .map(|i| match (i + case) % 9 {
            0 | 1 => -1,
            k => (k % 5) as i8,
        })
        .collect()
}

/// `root/Dataset007_Toy/nnUNetPlans_3d_fullres` with cases `toy_0` and `toy_1`.
fn toy_folder(root: &Path) -> std::path::PathBuf {
    let ds = root.join("Dataset007_Toy");
    let config = ds.join("nnUNetPlans_3d_fullres");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        ds.join("dataset.json"),
        r#"{"channel_names":{"0":"T1","1":"T2"},"labels":{"background":0,"a":1,"b":2,"c":3,"d":4},"file_ending":".nii.gz"}"#,
    )
    .unwrap();
    std::fs::write(
        ds.join("nnUNetPlans.json"),
        r#"{"dataset_name":"Dataset007_Toy","plans_name":"nnUNetPlans","transpose_forward":[2,0,1],
        "transpose_backward":[1,2,0],"image_reader_writer":"SimpleITKIO",
        "configurations":{"3d_fullres":{"data_identifier":"nnUNetPlans_3d_fullres","batch_size":2,
        "patch_size":[8,8,8],"spacing":[2.0,1.0,0.5],
        "normalization_schemes":["ZScoreNormalization","CTNormalization"],"use_mask_for_norm":[true,false],
        "architecture":{"arch_kwargs":{"strides":[[1,1,1],[2,2,2],[1,2,2]]}}}}}"#,
    )
    .unwrap();
    let pkl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nnunet/tests/fixtures/props_p4.pkl");
    for c in 0..2 {
        let img: Vec<u8> = image(c).iter().flat_map(|v| v.to_le_bytes()).collect();
        npy(
            &config.join(format!("toy_{c}.npy")),
            "<f4",
            &[2, 5, 6, 7],
            &img,
        );
        let s: Vec<u8> = seg(c).iter().map(|&v| v as u8).collect();
        npy(
            &config.join(format!("toy_{c}_seg.npy")),
            "|i1",
            &[1, 5, 6, 7],
            &s,
        );
        std::fs::copy(&pkl, config.join(format!("toy_{c}.pkl"))).unwrap();
    }
    config
}

fn opts() -> IngestOptions {
    IngestOptions {
        jobs: 2,
        progress: false,
        ..IngestOptions::default()
    }
}

#[test]
fn preprocessed_npy_folder_is_stored_as_nnunet_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = toy_folder(dir.path());
    let out = dir.path().join("store");
    let stop = AtomicBool::new(false);
    let report = ingest(&config, &out, &opts(), &stop).unwrap();
    assert_eq!(report.ingested.len(), 2, "{}", report.summary());
    assert!(report.failed.is_empty(), "{}", report.summary());
    assert_eq!(report.dataset, "Dataset007_Toy");

    let manifest = Manifest::load(&out).unwrap().unwrap();
    let plan = NnunetStorePlan::from_manifest(&manifest).unwrap();
    assert_eq!(plan.nnunet.num_pool_per_axis, [1, 2, 2]);
    assert_eq!(plan.nnunet.batch_size, 2);
    assert_eq!(plan.outside_mask_label, 5);
    for c in 0..2 {
        let reader =
            CaseReader::open(&out.join(format!("toy_{c}.pfc")), ChunkCache::new(0)).unwrap();
        let meta = reader.meta();
        assert_eq!(meta.shape, SHAPE);
        assert_eq!(meta.spacing, [2.0, 1.0, 0.5]);
        // Properties (transposed frame) back in the source frame: transpose_forward [2, 0, 1].
        assert_eq!(meta.original.shape, [24, 40, 48]);
        assert_eq!(meta.crop_box, [[0, 24], [7, 33], [4, 45]]);
        assert_eq!(meta.original.spacing, [0.5, 1.0, 2.0]);
        assert_eq!(meta.outside_mask_label, Some(5));
        assert!(meta.channels.iter().all(|ch| ch.norm.is_identity()));
        let want = image(c);
        for ch in 0..2 {
            let mut got = vec![0f32; 210];
            reader
                .read_box(ArrayId::Image(ch), [0, 0, 0], SHAPE, 0.0, &mut got)
                .unwrap();
            let w = &want[ch * 210..(ch + 1) * 210];
            assert!(got.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let mut label = vec![0u8; 210];
        reader
            .read_box(ArrayId::Label, [0, 0, 0], SHAPE, 0, &mut label)
            .unwrap();
        let expect: Vec<u8> = seg(c)
            .iter()
            .map(|&v| if v == -1 { 5 } else { v as u8 })
            .collect();
        assert_eq!(label, expect);
        assert!(
            !meta.class_voxels.contains_key(&5),
            "the marker is no class"
        );
        assert_eq!(
            reader.class_locations(1),
            &[[1, 2, 3], [4, 5, 6], [0, 0, 0]]
        );
        assert_eq!(reader.class_locations(4), &[[2, 1, 0], [3, 3, 3]]);
        assert!(reader.class_locations(2).is_empty());
    }
    let text = render_text(&inspect(&out, None).unwrap());
    assert!(
        text.contains("nnU-Net plan nnUNetPlans 3d_fullres") && text.contains("label 5"),
        "{text}"
    );

    // Unchanged files: skipped. A changed case: stored again.
    let again = ingest(&config, &out, &opts(), &stop).unwrap();
    assert_eq!((again.ingested.len(), again.skipped.len()), (0, 2));
    std::fs::copy(config.join("toy_0.npy"), config.join("toy_1.npy")).unwrap();
    let again = ingest(&config, &out, &opts(), &stop).unwrap();
    assert_eq!(again.skipped, ["toy_0"]);
    assert_eq!(again.ingested.len(), 1);
}

#[test]
fn mixing_and_misdirected_inputs_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = toy_folder(dir.path());
    let out = dir.path().join("store");
    let stop = AtomicBool::new(false);
    ingest(&config, &out, &opts(), &stop).unwrap();

    // Raw-dataset cases into the nnU-Net store.
    let tsv = dir.path().join("pairs.tsv");
    std::fs::write(&tsv, "image\tlabel\na.nii.gz\ta_seg.nii.gz\n").unwrap();
    let err = ingest(&tsv, &out, &opts(), &stop).unwrap_err().to_string();
    assert!(err.contains("nnU-Net's preprocessed folder"), "{err}");

    // The dataset folder instead of its configuration folder.
    let err = ingest(
        config.parent().unwrap(),
        &dir.path().join("s2"),
        &opts(),
        &stop,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("nnUNetPlans_3d_fullres"), "{err}");

    // --watch is for raw datasets.
    let err = watch(
        &config,
        &dir.path().join("s3"),
        &opts(),
        std::time::Duration::from_millis(10),
        &stop,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--watch"), "{err}");

    // A seg value that is no class of dataset.json fails that case, naming it.
    let bad: Vec<u8> = vec![9; 210];
    npy(&config.join("toy_1_seg.npy"), "|i1", &[1, 5, 6, 7], &bad);
    let report = ingest(&config, &dir.path().join("s4"), &opts(), &stop).unwrap();
    assert_eq!(report.ingested.len(), 1);
    assert_eq!(report.failed.len(), 1);
    assert!(
        report.failed[0].0 == "toy_1" && report.failed[0].1.contains("seg value 9"),
        "{:?}",
        report.failed
    );
}

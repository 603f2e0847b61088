//! Acceptance of stores in object storage on real data: `patchflow ingest --out s3://…` writes
//! three real pairs of `../shared/data` to a real S3-compatible server (moto on 127.0.0.1),
//! `patchflow inspect s3://… --verify` reads them back, and a daemon serving `s3://…` streams
//! batches while the patch size changes, every served voxel equal to the region cut at the
//! returned origin from the preprocessed volume held in memory, bit for bit. Skipped with a
//! message where the data or moto is absent.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{
    case_id, crop_ref, pairs, patchflow, preprocess_in_memory, s, shared_data, stdout_of_success,
};
use patchflow_client::{Client, ClientOptions, SharedMemory, StreamConfig};
use patchflow_ingest::DatasetPlan;
use patchflow_store::Manifest;
use patchflow_testkit::moto::MotoServer;
use patchflow_volume::{PreprocessedCase, with_voxels};

/// The pairs used: small ones of three kinds (CT, spinal cord MR in two orientations).
const PAIRS: [&str; 3] = [
    "ct_totalseg/example_ct_sm.nii.gz",
    "mri_sct/t2.nii.gz",
    "mri_sct/t1w.nii.gz",
];

fn run_with_env(server: &MotoServer, args: &[&str]) -> String {
    let out = patchflow()
        .args(args)
        .envs(server.env())
        .output()
        .expect("patchflow runs");
    stdout_of_success(args, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pairs_ingested_to_s3_are_served_voxel_for_voxel() {
    let test = "real_pairs_ingested_to_s3_are_served_voxel_for_voxel";
    let Some(data) = shared_data(test) else {
        return;
    };
    let Some(server) = MotoServer::shared(test) else {
        return;
    };
    let bucket = server.bucket("serve-real");
    let dir = tempfile::tempdir().unwrap();
    let chosen: Vec<_> = pairs(&data)
        .into_iter()
        .filter(|(image, _, _)| PAIRS.contains(&image.as_str()))
        .collect();
    assert_eq!(chosen.len(), PAIRS.len());
    let tsv = dir.path().join("pairs.tsv");
    let mut text = String::from("image\tlabel\tmodality\n");
    for (image, label, modality) in &chosen {
        text.push_str(&format!(
            "{}\t{}\t{modality}\n",
            data.join(image).display(),
            data.join(label).display()
        ));
    }
    std::fs::write(&tsv, text).unwrap();

    let store = format!("s3://{bucket}/datasets/pairs");
    run_with_env(
        server,
        &["ingest", s(&tsv), "--out", &store, "--keep-spacing"],
    );
    let inspected: serde_json::Value = serde_json::from_str(&run_with_env(
        server,
        &["inspect", &store, "--json", "--verify"],
    ))
    .expect("inspect prints JSON");
    assert_eq!(inspected["cases"].as_array().unwrap().len(), PAIRS.len());

    let manifest = Manifest::load(&PathBuf::from(&store)).unwrap().unwrap();
    let plan: DatasetPlan = serde_json::from_value(manifest.plan.clone()).unwrap();
    let reference: HashMap<String, PreprocessedCase> = chosen
        .iter()
        .map(|(image, label, modality)| {
            (
                case_id(image),
                preprocess_in_memory(&data, image, label, modality, &plan),
            )
        })
        .collect();

    let server = patchflow_server::start(patchflow_server::ServerConfig {
        stores: vec![PathBuf::from(&store)],
        listen: Some("127.0.0.1:0".parse().unwrap()),
        workers: 2,
        cache_mb: 16,
        ..Default::default()
    })
    .await
    .unwrap();
    let options = ClientOptions {
        shared_memory: SharedMemory::Off,
        ..ClientOptions::default()
    };
    let client = Client::connect([server.endpoint().unwrap()], options)
        .await
        .unwrap();
    let sizes: [[usize; 3]; 3] = [[16, 24, 24], [32, 32, 32], [24, 48, 64]];
    let mut config = StreamConfig::new("pairs", sizes[0].map(|v| v as i64), 2);
    config.seed = 99;
    let mut stream = client.stream(config.clone()).await.unwrap();
    for b in 0..36u64 {
        let stage = (b / 12) as usize;
        if b > 0 && b % 12 == 0 {
            config.patch = sizes[stage].map(|v| v as i64);
            stream.reconfigure(config.clone()).unwrap();
        }
        let batch = stream.next().await.unwrap();
        let patch = sizes[stage];
        assert_eq!(batch.patch, patch);
        let n: usize = patch.iter().product();
        let image = common::batch_image(&batch);
        let labels = common::batch_labels(&batch);
        for (i, item) in batch.items.iter().enumerate() {
            let pre = &reference[&item.case_id];
            let want = expected_image(pre, item.origin, patch);
            let got = &image[i * n..(i + 1) * n];
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "batch {b} item {i} ({} at {:?}): image differs",
                item.case_id,
                item.origin
            );
            let want = common::expected_label(pre, item.origin, patch, batch.ignore_label);
            assert_eq!(&labels[i * n..(i + 1) * n], &want[..], "batch {b} item {i}");
        }
    }
    drop(stream);
    server.shutdown().await.unwrap();
}

/// The expected f32 image of one item (one channel): normalised voxels, 0 outside.
#[allow(clippy::unnecessary_cast)] // `x as f32` is generic over every stored type, f32 included
fn expected_image(pre: &PreprocessedCase, origin: [i64; 3], patch: [usize; 3]) -> Vec<f32> {
    let (data, norm) = (&pre.channels[0], &pre.norms[0]);
    with_voxels!(data, v => {
        let mask = crop_ref(&vec![1u8; v.len()], pre.shape, origin, patch, 0u8);
        let vals = crop_ref(v, pre.shape, origin, patch, Default::default());
        vals.iter()
            .zip(&mask)
            .map(|(&x, &m)| if m == 1 { norm.apply(x as f32) } else { 0.0 })
            .collect()
    })
}

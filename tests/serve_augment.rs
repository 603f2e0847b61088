//! Augmentation end to end over gRPC: nnU-Net's preset requested by a client gives batches of
//! the right shapes, dtypes and label sets, with the applied parameters on every item, and the
//! same seed gives the same batch.

mod common;

use std::collections::BTreeSet;

use common::{run_ok, s};
use patchflow_client::{Batch, Client, ImageDtype, LabelDtype, StreamConfig};
use patchflow_proto::v1 as pb;

async fn first_batches(client: &Client, config: StreamConfig, n: usize) -> Vec<Batch> {
    let mut stream = client.stream(config).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(stream.next().await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nnunet_preset_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let store = dir.path().join("phantom");
    run_ok(&["phantom", s(&raw), "--cases", "3", "--shape", "24,40,40"]);
    run_ok(&["ingest", s(&raw), "--out", s(&store), "--keep-spacing"]);
    let (server, client) = common::serve_and_connect(vec![store], 32).await;
    let classes: BTreeSet<u16> = patchflow_volume::PHANTOM_LABELS
        .iter()
        .map(|(v, _)| *v)
        .collect();

    for dtype in [ImageDtype::F32, ImageDtype::Bf16] {
        let mut config = StreamConfig::new("phantom", [16, 32, 32], 4);
        config.seed = 11;
        config.dtype = dtype;
        config.augmentation = Some(pb::Augmentation {
            preset: "nnunet".into(),
            no_mirror_axes: vec![2],
            ..Default::default()
        });
        let batches = first_batches(&client, config.clone(), 6).await;
        let again = first_batches(&client, config.clone(), 6).await;
        assert_eq!(batches, again, "same seed, same batches");
        config.seed = 12;
        let other = first_batches(&client, config, 1).await;
        assert_ne!(
            other[0].image, batches[0].image,
            "another seed, another batch"
        );

        let voxels = 16 * 32 * 32;
        let mut mirrored_x = 0;
        for batch in &batches {
            assert_eq!(batch.dtype, dtype);
            assert_eq!(batch.image_shape(), [4, 1, 16, 32, 32]);
            let width = if dtype == ImageDtype::F32 { 4 } else { 2 };
            assert_eq!(batch.image.len(), 4 * voxels * width);
            assert_eq!(batch.label_dtype, LabelDtype::U8);
            assert_eq!(batch.label.len(), 4 * voxels);
            for &l in batch.label.iter() {
                let l = u16::from(l);
                assert!(
                    classes.contains(&l) || l == batch.ignore_label,
                    "label value {l}"
                );
            }
            for item in &batch.items {
                let json = item
                    .augment_json
                    .as_deref()
                    .expect("parameters come with each item");
                let params: serde_json::Value = serde_json::from_str(json).unwrap();
                let mirror = params["mirror"].as_array().expect("mirror flags");
                assert_eq!(mirror.len(), 3);
                if mirror[2].as_bool() == Some(true) {
                    mirrored_x += 1;
                }
            }
        }
        assert_eq!(mirrored_x, 0, "mirroring on x was turned off");
    }
    server.shutdown().await.unwrap();
}

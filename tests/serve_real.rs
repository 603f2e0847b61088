//! Acceptance of the sampling service on real data: ingest the pairs of `../shared/data`, serve
//! them on 127.0.0.1:0, stream 200 batches while the patch size changes three times, and check
//! every served patch against the region cut at the returned origin from the preprocessed volume
//! held in memory, bit for bit.

mod common;

use std::collections::HashMap;

use common::{case_id, crop_ref, pairs, preprocess_in_memory, shared_data};
use patchflow_client::{Client, ClientOptions, SharedMemory, StreamConfig};
use patchflow_ingest::DatasetPlan;
use patchflow_store::Manifest;
use patchflow_volume::{PreprocessedCase, with_voxels};

/// The expected f32 image of one item: normalised voxels, 0 outside the volume.
#[allow(clippy::unnecessary_cast)] // `x as f32` is generic over every stored type, f32 included
fn expected_image(pre: &PreprocessedCase, origin: [i64; 3], patch: [usize; 3]) -> Vec<f32> {
    let n: usize = patch.iter().product();
    let mut out = Vec::with_capacity(n * pre.channels.len());
    for (data, norm) in pre.channels.iter().zip(&pre.norms) {
        with_voxels!(data, v => {
            let mask = crop_ref(&vec![1u8; v.len()], pre.shape, origin, patch, 0u8);
            let vals = crop_ref(v, pre.shape, origin, patch, Default::default());
            out.extend(vals.iter().zip(&mask).map(|(&x, &m)| {
                if m == 1 { norm.apply(x as f32) } else { 0.0 }
            }));
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_batches_with_size_changes_equal_the_preprocessed_volumes() {
    let Some(data) =
        shared_data("two_hundred_batches_with_size_changes_equal_the_preprocessed_volumes")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = common::ingest_pairs(&data, dir.path(), "pairs");
    let manifest = Manifest::load(&store).unwrap().unwrap();
    let plan: DatasetPlan = serde_json::from_value(manifest.plan.clone()).unwrap();
    let reference: HashMap<String, PreprocessedCase> = pairs(&data)
        .into_iter()
        .map(|(image, label, modality)| {
            (
                case_id(&image),
                preprocess_in_memory(&data, &image, &label, &modality, &plan),
            )
        })
        .collect();

    let (server, client) = common::serve_and_connect(vec![store.clone()], 64).await;
    let description = client.describe("pairs").await.unwrap();
    assert_eq!(description.cases.len(), reference.len());

    // Four sizes: small, cubic, larger, and anisotropic beyond the thinnest volume (20 slices).
    let sizes: [[usize; 3]; 4] = [[16, 24, 24], [32, 32, 32], [24, 48, 64], [40, 20, 72]];
    let mut config = StreamConfig::new("pairs", sizes[0].map(|v| v as i64), 2);
    config.seed = 2024;
    let mut stream = client.stream(config.clone()).await.unwrap();
    // The client's default on a loopback address is shared memory; the same stream with the
    // voxels inside the messages must give the same bytes.
    let by_messages = ClientOptions {
        shared_memory: SharedMemory::Off,
        ..ClientOptions::default()
    };
    let client_off = Client::connect([server.endpoint().unwrap()], by_messages)
        .await
        .unwrap();
    let mut stream_off = client_off.stream(config.clone()).await.unwrap();
    let mut forced = 0usize;
    for b in 0..200u64 {
        let stage = (b / 50) as usize;
        if b > 0 && b % 50 == 0 {
            config.patch = sizes[stage].map(|v| v as i64);
            stream.reconfigure(config.clone()).unwrap();
            stream_off.reconfigure(config.clone()).unwrap();
        }
        let batch = stream.next().await.unwrap();
        assert!(
            batch == stream_off.next().await.unwrap(),
            "batch {b} differs between shared memory and messages"
        );
        assert_eq!(batch.index, b, "batches arrive in order, none skipped");
        let patch = sizes[stage];
        assert_eq!(batch.patch, patch, "batch {b} has the size asked for");
        let n: usize = patch.iter().product();
        let image = common::batch_image(&batch);
        let labels = common::batch_labels(&batch);
        assert_eq!(batch.items.len(), 2);
        for (i, item) in batch.items.iter().enumerate() {
            let pre = &reference[&item.case_id];
            let want = expected_image(pre, item.origin, patch);
            let got = &image[i * n * pre.channels.len()..(i + 1) * n * pre.channels.len()];
            let same_bits = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same_bits,
                "batch {b} item {i} ({} at {:?}): image differs",
                item.case_id, item.origin
            );
            let want = common::expected_label(pre, item.origin, patch, batch.ignore_label);
            assert_eq!(
                &labels[i * n..(i + 1) * n],
                &want[..],
                "batch {b} item {i}: label differs"
            );
            if item.forced_foreground {
                forced += 1;
                let class = item.class.unwrap();
                assert!(want.contains(&class), "forced crop holds its class {class}");
            }
        }
    }
    // nnU-Net's rule with batch 2 and fraction 0.33: the second item of every batch is forced
    // (where the case has foreground, which every real case here has).
    assert_eq!(forced, 200);
    server.shutdown().await.unwrap();
}

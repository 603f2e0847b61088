//! The compact wire form (proto `WireOptions`: items in their stored integer type normalised by
//! the client, zstd labels) over loopback TCP without shared memory, on the real pairs of
//! `../shared/data`: every batch a client hands out equals, bit for bit, what the in-process
//! sampler gives for the same request, for `f32`, `f16` and `bf16`, plain and augmented, in one
//! message per batch and split into many; and the daemon really sends the compact form when
//! asked.

mod common;

use std::sync::Arc;

use common::shared_data;
use patchflow_client::{
    Augmentation, Client, ClientOptions, ImageDtype, SharedMemory, StreamConfig,
};
use patchflow_proto::v1 as pb;
use patchflow_sampler::{AugmentSpec, BatchRequest, Dataset, OutputDType, Patch, Policy, Sampler};
use patchflow_store::ChunkCache;

const PATCH: [usize; 3] = [40, 48, 56];
const SEED: u64 = 7;

/// The sampler's request for the stream `config` describes (the daemon's defaults: nnU-Net's
/// oversampling, one crop per case).
fn request(dtype: OutputDType, augment: bool) -> BatchRequest {
    BatchRequest {
        patch: Patch::new(PATCH).unwrap(),
        batch: 2,
        policy: Policy::ForegroundOversample { fraction: 0.33 },
        crops_per_case: 1,
        dtype,
        seed: SEED,
        cases: None,
        augment: augment.then(AugmentSpec::nnunet_default),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_batches_equal_the_in_process_sampler_on_real_data() {
    let Some(data) = shared_data("compact_batches_equal_the_in_process_sampler_on_real_data")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = common::ingest_pairs(&data, dir.path(), "pairs");
    let (server, _) = common::serve_and_connect(vec![store.clone()], 64).await;
    // A second daemon whose smallest messages split every batch into parts.
    let split = patchflow_server::start(patchflow_server::ServerConfig {
        stores: vec![store.clone()],
        listen: Some("127.0.0.1:0".parse().unwrap()),
        workers: 2,
        cache_mb: 64,
        limits: patchflow_server::Limits {
            max_message_bytes: patchflow_server::MIN_MESSAGE_BYTES,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let dataset = Dataset::open("pairs", &store, ChunkCache::new(64 << 20)).unwrap();
    let sampler = Sampler::new(Arc::new(dataset));
    let options = ClientOptions {
        shared_memory: SharedMemory::Off,
        compact: true,
        ..ClientOptions::default()
    };
    let mut clients = Vec::new();
    for daemon in [&server, &split] {
        let endpoint = daemon.endpoint().unwrap();
        clients.push(Client::connect([endpoint], options.clone()).await.unwrap());
    }
    let kinds = [
        (ImageDtype::F32, OutputDType::F32, false),
        (ImageDtype::F16, OutputDType::F16, false),
        (ImageDtype::Bf16, OutputDType::BF16, false),
        (ImageDtype::F32, OutputDType::F32, true),
        (ImageDtype::Bf16, OutputDType::BF16, true),
    ];
    let mut stream = None;
    for (wire_dtype, dtype, augment) in kinds {
        let mut config = StreamConfig::new("pairs", PATCH.map(|v| v as i64), 2);
        config.seed = SEED;
        config.dtype = wire_dtype;
        if augment {
            config.augmentation = Some(Augmentation {
                preset: "nnunet".into(),
                ..Augmentation::default()
            });
        }
        let req = request(dtype, augment);
        for (client, index) in clients.iter().flat_map(|c| (0..8u64).map(move |i| (c, i))) {
            if index == 0 {
                stream = Some(client.stream(config.clone()).await.unwrap());
            }
            let got = stream.as_mut().unwrap().next().await.unwrap();
            let want = sampler.sample(&req, index).unwrap();
            assert_eq!(got.index, index);
            let origins: Vec<_> = got.items.iter().map(|i| i.origin).collect();
            let want_origins: Vec<_> = want.items.iter().map(|i| i.origin).collect();
            assert_eq!(
                origins, want_origins,
                "{dtype} augment {augment} batch {index}"
            );
            assert!(
                got.image.as_ref() == want.image.as_slice(),
                "{dtype} augment {augment} batch {index}: image differs from the sampler's"
            );
            assert!(
                got.label.as_ref() == want.label.as_slice(),
                "{dtype} augment {augment} batch {index}: label differs from the sampler's"
            );
        }
    }
    drop(stream);
    server.shutdown().await.unwrap();
    split.shutdown().await.unwrap();
}

/// A raw stream asking for the compact form: the headers announce stored items (the CT pairs are
/// `i16`, the MR ones `u8` or `u16`) and zstd labels, and fewer bytes travel than the served buffers hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_sends_the_compact_form_when_asked() {
    let Some(data) = shared_data("the_daemon_sends_the_compact_form_when_asked") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = common::ingest_pairs(&data, dir.path(), "pairs");
    let (server, _) = common::serve_and_connect(vec![store], 64).await;
    let mut raw = pb::patchflow_client::PatchflowClient::connect(server.endpoint().unwrap())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let batches = 6u32;
    let first = pb::SampleRequest {
        config: Some(pb::SampleConfig {
            dataset: "pairs".into(),
            patch_size: PATCH.map(|v| v as i64).to_vec(),
            batch_size: 2,
            dtype: pb::ImageDtype::F32 as i32,
            seed: SEED,
            ..Default::default()
        }),
        credits: batches,
        wire: Some(pb::WireOptions {
            stored_image: true,
            zstd_labels: true,
        }),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(first).unwrap();
    let mut inbound = raw
        .sample(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let voxels: u64 = PATCH.iter().map(|&v| v as u64).product();
    let (mut headers, mut stored_items, mut wire_bytes) = (0u32, 0usize, 0u64);
    while headers < batches {
        let msg = inbound.message().await.unwrap().expect("a batch");
        let Some(header) = msg.header else { continue };
        headers += 1;
        assert_eq!(header.label_encoding, pb::LabelEncoding::Zstd as i32);
        assert!(
            header.label_bytes < 2 * voxels / 10,
            "labels compress tenfold at least"
        );
        for item in &header.items {
            if let Some(stored) = &item.stored {
                stored_items += 1;
                assert!(
                    ["i16", "u16", "u8"].contains(&stored.dtype.as_str()),
                    "{}",
                    stored.dtype
                );
                assert_eq!(stored.shape.len(), 3);
                assert_eq!(stored.normalization.len(), 1);
            }
        }
        wire_bytes += header.image_bytes + header.label_bytes;
    }
    drop(tx);
    assert!(stored_items > 0, "some items travel in their stored type");
    let served = u64::from(batches) * 2 * voxels * (4 + 1);
    assert!(
        wire_bytes * 2 < served,
        "{wire_bytes} bytes on the wire for {served} served"
    );
    server.shutdown().await.unwrap();
}

//! Batches streamed through the daemon, checked voxel by voxel against naive crops of the
//! arrays the store was written from.

mod common;

use common::{Fixture, client_options, open_sample, serve, serve_with, wait_live, within};
use patchflow_client::{Batch, Client, ImageDtype, Policy, StreamConfig};
use patchflow_proto::v1 as pb;
use patchflow_server::Limits;

async fn take(stream: &mut patchflow_client::BatchStream, n: usize) -> Vec<Batch> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(within("next batch", stream.next()).await.expect("batch"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_match_naive_crops_and_patch_size_changes_mid_stream() {
    let fx = Fixture::new();
    let server = serve(&fx, 2).await;
    let endpoint = server.endpoint().unwrap();
    let client = Client::connect([endpoint], client_options()).await.unwrap();

    // Patches larger than some cases on some axes, so padding is exercised.
    let mut config = StreamConfig::new(&fx.name, [5, 6, 7], 3);
    config.seed = 42;
    config.policy = Policy::ForegroundOversample { fraction: 0.5 };
    let mut stream = client.stream(config.clone()).await.unwrap();
    let first = take(&mut stream, 4).await;
    for (k, batch) in first.iter().enumerate() {
        assert_eq!(batch.index, k as u64);
        assert_eq!(batch.dtype, ImageDtype::F32);
        fx.check_batch(batch, [5, 6, 7], 3);
    }
    assert!(
        first
            .iter()
            .flat_map(|b| &b.items)
            .any(|i| i.forced_foreground),
        "fraction 0.5 forces foreground items"
    );

    // New patch size, batch size, dtype and policy from the next batch handed out.
    let mut bigger = StreamConfig::new(&fx.name, [9, 4, 18], 2);
    bigger.seed = 42;
    bigger.dtype = ImageDtype::F16;
    bigger.policy = Policy::Uniform;
    stream.reconfigure(bigger.clone()).unwrap();
    assert_eq!(stream.next_index(), 4);
    let second = take(&mut stream, 3).await;
    for (k, batch) in second.iter().enumerate() {
        assert_eq!(batch.index, 4 + k as u64);
        assert_eq!(batch.dtype, ImageDtype::F16);
        assert!(batch.items.iter().all(|i| !i.forced_foreground));
        fx.check_batch(batch, [9, 4, 18], 2);
    }

    // The same indices on a fresh stream started at 4 give the same batches.
    let mut fresh = client.stream_from(bigger, 4).await.unwrap();
    assert_eq!(take(&mut fresh, 3).await, second);

    // Class weights and bf16 with two crops per case.
    let mut weighted = StreamConfig::new(&fx.name, [3, 3, 3], 4);
    weighted.policy = Policy::ClassWeights([(0, 1.0), (2, 3.0)].into());
    weighted.crops_per_case = 2;
    weighted.dtype = ImageDtype::Bf16;
    stream.reconfigure(weighted).unwrap();
    for (k, batch) in take(&mut stream, 3).await.iter().enumerate() {
        assert_eq!(batch.index, 7 + k as u64);
        fx.check_batch(batch, [3, 3, 3], 4);
        assert_eq!(batch.items[0].case_id, batch.items[1].case_id);
        assert_eq!(batch.items[2].case_id, batch.items[3].case_id);
    }
    drop(stream);
    drop(fresh);
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}

async fn sequence(endpoints: Vec<String>, config: StreamConfig, n: usize) -> Vec<Batch> {
    let client = Client::connect(endpoints, client_options()).await.unwrap();
    let mut stream = client.stream(config).await.unwrap();
    take(&mut stream, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_batches_whatever_workers_and_daemons() {
    let fx = Fixture::new();
    let one = serve(&fx, 1).await;
    let four = serve(&fx, 4).await;
    let mut config = StreamConfig::new(&fx.name, [6, 7, 5], 4);
    config.seed = 7;
    config.crops_per_case = 2;

    let a = sequence(vec![one.endpoint().unwrap()], config.clone(), 6).await;
    let b = sequence(vec![four.endpoint().unwrap()], config.clone(), 6).await;
    assert_eq!(a, b, "1 and 4 workers give the same batches");
    // Two daemons: batch k comes from daemon k mod 2, handed out in order.
    let both = vec![one.endpoint().unwrap(), four.endpoint().unwrap()];
    let c = sequence(both, config.clone(), 6).await;
    assert_eq!(a, c, "two daemons give the same sequence");

    let mut other = config.clone();
    other.seed = 8;
    let d = sequence(vec![one.endpoint().unwrap()], other, 6).await;
    assert_ne!(a, d, "another seed gives other batches");
    for batch in a.iter().chain(&d) {
        fx.check_batch(batch, [6, 7, 5], 4);
    }
    one.shutdown().await.unwrap();
    four.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_clients_each_get_correct_data() {
    let fx = std::sync::Arc::new(Fixture::new());
    let server = serve(&fx, 2).await;
    let endpoint = server.endpoint().unwrap();
    let mut tasks = Vec::new();
    for c in 0..8u64 {
        let fx = std::sync::Arc::clone(&fx);
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let patch = [3 + c as usize % 4, 4 + c as usize % 3, 5];
            let mut config =
                StreamConfig::new(&fx.name, patch.map(|p| p as i64), 1 + (c % 3) as u32);
            config.seed = c;
            let client = Client::connect([endpoint], client_options()).await.unwrap();
            let mut stream = client.stream(config.clone()).await.unwrap();
            let batches = take(&mut stream, 5).await;
            for (k, batch) in batches.iter().enumerate() {
                assert_eq!(batch.index, k as u64);
                fx.check_batch(batch, patch, config.batch_size as usize);
            }
            batches
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.push(within("client task", task).await.unwrap());
    }
    // Different seeds and shapes: no two clients got the same first batch.
    for i in 0..all.len() {
        for j in i + 1..all.len() {
            assert_ne!(all[i][0], all[j][0], "clients {i} and {j}");
        }
    }
    let metrics = server.metrics();
    assert!(metrics.batches >= 40, "{metrics:?}");
    assert_eq!(metrics.streams_opened, 8);
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_above_the_message_limit_arrive_split_and_reassembled() {
    let fx = Fixture::new();
    let limits = Limits {
        max_message_bytes: patchflow_server::MIN_MESSAGE_BYTES,
        ..Limits::default()
    };
    let server = serve_with(&fx, 2, limits).await;
    let endpoint = server.endpoint().unwrap();
    // 3 items x 2 channels x 14*15*16 voxels x 4 bytes = 80,640 image bytes, above 64 KiB.
    let patch = [14usize, 15, 16];
    let mut config = StreamConfig::new(&fx.name, patch.map(|p| p as i64), 3);
    config.seed = 3;

    // On the wire: several parts, each within the limit, header on part 0 only.
    let mut raw = pb::patchflow_client::PatchflowClient::connect(endpoint.clone())
        .await
        .unwrap();
    let first = pb::SampleRequest {
        config: Some(pb::SampleConfig {
            dataset: fx.name.clone(),
            patch_size: patch.iter().map(|&p| p as i64).collect(),
            batch_size: 3,
            seed: 3,
            policy: Some(pb::sample_config::Policy::Foreground(
                pb::ForegroundOversample { fraction: 0.33 },
            )),
            ..Default::default()
        }),
        credits: 1,
        ..Default::default()
    };
    let (tx, mut inbound) = open_sample(&mut raw, first).await.unwrap();
    let first = within("part 0", inbound.message()).await.unwrap().unwrap();
    let parts = first.parts;
    assert!(parts >= 2, "expected a split batch, got {parts} part(s)");
    let header = first.header.clone().unwrap();
    let mut image = first.image.to_vec();
    let mut label = first.label.to_vec();
    for p in 1..parts {
        let m = within("part", inbound.message()).await.unwrap().unwrap();
        assert_eq!((m.index, m.part, m.parts), (0, p, parts));
        assert!(m.header.is_none());
        image.extend_from_slice(&m.image);
        label.extend_from_slice(&m.label);
    }
    assert_eq!(image.len() as u64, header.image_bytes);
    assert_eq!(label.len() as u64, header.label_bytes);
    drop(tx);

    // So many items that their descriptions alone would crowd a message out: refused.
    let first = pb::SampleRequest {
        config: Some(pb::SampleConfig {
            dataset: fx.name.clone(),
            patch_size: vec![1, 1, 1],
            batch_size: 300,
            ..Default::default()
        }),
        credits: 1,
        ..Default::default()
    };
    let (tx, mut inbound) = open_sample(&mut raw, first).await.unwrap();
    let status = within("refusal", inbound.message()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("a batch of 300 items needs messages"),
        "{status:?}"
    );
    drop(tx);

    // Through the client: reassembled, correct, and equal to the raw parts.
    let client = Client::connect([endpoint], client_options()).await.unwrap();
    let mut stream = client.stream(config).await.unwrap();
    let batches = take(&mut stream, 3).await;
    assert_eq!(batches[0].image.as_ref(), image.as_slice());
    assert_eq!(batches[0].label.as_ref(), label.as_slice());
    for batch in &batches {
        fx.check_batch(batch, patch, 3);
    }
    drop(stream);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_request_side_serves_the_granted_credits_then_ends() {
    let fx = Fixture::new();
    let server = serve(&fx, 1).await;
    let mut raw = pb::patchflow_client::PatchflowClient::connect(server.endpoint().unwrap())
        .await
        .unwrap();
    let config = pb::SampleConfig {
        dataset: fx.name.clone(),
        patch_size: vec![4, 4, 4],
        batch_size: 2,
        start_index: Some(10),
        index_stride: 3,
        config_id: 77,
        ..Default::default()
    };
    let requests = vec![
        pb::SampleRequest {
            config: Some(config),
            credits: 2,
            ..Default::default()
        },
        pb::SampleRequest {
            config: None,
            credits: 1,
            ..Default::default()
        },
    ];
    let mut inbound = raw
        .sample(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut indices = Vec::new();
    while let Some(m) = within("message", inbound.message()).await.unwrap() {
        assert_eq!(m.config_id, 77);
        assert_eq!(m.parts, 1);
        indices.push(m.index);
    }
    assert_eq!(indices, vec![10, 13, 16]);
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}

/// What the proto says of credits sent before the first configuration: they produce nothing,
/// count against the limit, and the first configuration replaces them with its own credits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_before_the_first_configuration_are_replaced_by_its_own() {
    let fx = Fixture::new();
    let server = serve(&fx, 1).await;
    let raw = pb::patchflow_client::PatchflowClient::connect(server.endpoint().unwrap())
        .await
        .unwrap();
    let credits = |n| pb::SampleRequest {
        credits: n,
        ..Default::default()
    };
    let configure = pb::SampleRequest {
        config: Some(fx.sample_config([4, 4, 4], 1)),
        credits: 1,
        ..Default::default()
    };
    let indices = |requests: Vec<pb::SampleRequest>| {
        let mut raw = raw.clone();
        async move {
            let mut inbound = raw.sample(tokio_stream::iter(requests)).await?.into_inner();
            let mut indices = Vec::new();
            while let Some(m) = within("message", inbound.message()).await? {
                indices.push(m.index);
            }
            Ok::<_, tonic::Status>(indices)
        }
    };
    // Three credits, then a configuration with one: one batch.
    let got = indices(vec![credits(3), configure.clone()]).await.unwrap();
    assert_eq!(got, vec![0]);
    // No configuration at all: the stream ends with OK and nothing.
    let got = indices(vec![credits(3)]).await.unwrap();
    assert!(got.is_empty());
    // They count against the limit while they wait.
    let limit = Limits::default().max_credits;
    let err = indices(vec![credits(limit), credits(1), configure])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}

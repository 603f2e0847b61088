//! Discovery, health, reflection, metrics, Unix sockets and start-up checks.

mod common;

use std::time::Duration;

use common::{Fixture, client_options, config, http_get, serve, wait_live, within};
use patchflow_client::{Client, StreamConfig};
use patchflow_proto::v1 as pb;
use patchflow_server::{Limits, ServerError};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_describes_every_store_given() {
    let fx = Fixture::new();
    // A folder of stores (the fixture's root holds the fixture store and "Other") plus a
    // store given directly.
    fx.add_store("Other");
    let extra = tempfile::tempdir().unwrap();
    let single = {
        let dir = extra.path().join("Single");
        let src = fx.add_store("tmp_single");
        std::fs::rename(&src, &dir).unwrap();
        dir
    };
    let server = patchflow_server::start(config(
        vec![fx.root.path().to_path_buf(), single],
        1,
        Limits::default(),
    ))
    .await
    .unwrap();
    let client = Client::connect([server.endpoint().unwrap()], client_options())
        .await
        .unwrap();
    let listing = client.list_datasets().await.unwrap();
    let names: Vec<(&str, u32, u32)> = listing
        .datasets
        .iter()
        .map(|d| (d.name.as_str(), d.num_cases, d.num_channels))
        .collect();
    assert_eq!(
        names,
        vec![
            ("Dataset900_Synthetic", 3, 2),
            ("Other", 1, 2),
            ("Single", 1, 2)
        ]
    );
    let limits = listing.limits.unwrap();
    assert_eq!(limits.max_credits, Limits::default().max_credits);
    // The per-axis patch limit is published too.
    assert_eq!(limits.max_patch_axis, 4096);
    assert_eq!(client.limits()[0], &limits);

    let d = client.describe(&fx.name).await.unwrap();
    assert_eq!(d.name, fx.name);
    let ids: Vec<&str> = d.cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, vec!["case_a", "case_b", "case_c"]);
    for case in &d.cases {
        let mem = &fx.cases[&case.id];
        assert_eq!(case.shape, mem.meta.shape.map(|s| s as u64).to_vec());
        assert_eq!(case.spacing, mem.meta.spacing.to_vec());
        let voxels: std::collections::BTreeMap<u32, u64> = mem
            .meta
            .class_voxels
            .iter()
            .map(|(&c, &v)| (u32::from(c), v))
            .collect();
        assert_eq!(case.class_voxels, voxels.into_iter().collect());
        assert_eq!(case.normalization.len(), 2);
        assert_eq!(case.normalization[0].scheme, "ct");
        assert!(case.normalization[0].has_clip);
        assert_eq!(case.normalization[0].clip_lo, -300.0);
        assert_eq!(case.normalization[1].mean, mem.meta.channels[1].norm.mean);
    }
    let channels: Vec<(&str, &str, &str)> = d
        .channels
        .iter()
        .map(|c| (c.name.as_str(), c.stored_dtype.as_str(), c.scheme.as_str()))
        .collect();
    assert_eq!(channels, vec![("CT", "i16", "ct"), ("T2", "f32", "zscore")]);
    let classes: Vec<(u32, &str, u32)> = d
        .classes
        .iter()
        .map(|c| (c.value, c.name.as_str(), c.cases))
        .collect();
    assert_eq!(
        classes,
        vec![(0, "background", 3), (1, "liver", 3), (2, "tumour", 2)]
    );
    let total: u64 = fx
        .cases
        .values()
        .map(|c| c.meta.class_voxels.get(&2).copied().unwrap_or(0))
        .sum();
    assert_eq!(d.classes[2].voxels, total);
    assert_eq!(d.ignore_label, 255);
    assert_eq!(d.label_dtype, pb::LabelDtype::U8 as i32);
    assert_eq!(d.label_names.get(&1).map(String::as_str), Some("liver"));

    // A case subset restricts sampling to those cases.
    let mut shard = StreamConfig::new("Dataset900_Synthetic", [4, 4, 4], 3);
    shard.cases = vec!["case_b".into()];
    let mut stream = client.stream(shard).await.unwrap();
    for _ in 0..3 {
        let batch = within("batch", stream.next()).await.unwrap();
        assert!(batch.items.iter().all(|i| i.case_id == "case_b"));
        fx.check_batch(&batch, [4, 4, 4], 3);
    }
    drop(stream);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let fx = Fixture::new();
    let server = serve(&fx, 1).await;
    let endpoint = server.endpoint().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", patchflow_proto::SERVICE_NAME] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.v1.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "patchflow.v1.SampleResponse".into(),
            )),
        },
    ];
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    match within("list", answers.message())
        .await
        .unwrap()
        .unwrap()
        .message_response
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
            assert!(names.contains(&"patchflow.v1.Patchflow"), "{names:?}");
            assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
    match within("file", answers.message())
        .await
        .unwrap()
        .unwrap()
        .message_response
    {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            let file = &files.file_descriptor_proto[0];
            let text = String::from_utf8_lossy(file);
            assert!(text.contains("patchflow/v1/patchflow.proto"), "{text}");
            assert!(text.contains("SampleResponse"));
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }

    server.shutdown().await.unwrap();
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_the_counters() {
    let fx = Fixture::new();
    let server = serve(&fx, 2).await;
    let addr = server.metrics_addr().unwrap();
    let before = http_get(addr, "/metrics").await;
    assert!(before.starts_with("HTTP/1.1 200 OK\r\n"), "{before}");
    assert!(before.contains("text/plain; version=0.0.4"));
    assert_eq!(metric(&before, "patchflow_batches_total"), 0.0);
    assert_eq!(metric(&before, "patchflow_workers"), 2.0);

    let client = Client::connect([server.endpoint().unwrap()], client_options())
        .await
        .unwrap();
    let config = StreamConfig::new(&fx.name, [6, 6, 6], 2);
    let mut stream = client.stream(config).await.unwrap();
    for _ in 0..5 {
        within("batch", stream.next()).await.unwrap();
    }
    let during = http_get(addr, "/metrics").await;
    assert_eq!(metric(&during, "patchflow_live_streams"), 1.0);
    assert!(
        during.contains(
            "patchflow_stream_batches_total{stream=\"1\",dataset=\"Dataset900_Synthetic\""
        )
    );
    assert!(during.contains("patchflow_stream_batches_per_second{stream=\"1\""));
    assert!(during.contains("patchflow_stream_queue_depth{stream=\"1\""));
    drop(stream);
    wait_live(&server, 0).await;

    let snap = server.metrics();
    let after = http_get(addr, "/metrics").await;
    // Prefetched batches count too: at least the 5 consumed, each 2 x (2 x 4 + 1) x 216 bytes.
    let batches = metric(&after, "patchflow_batches_total");
    assert!(batches >= 5.0, "{batches}");
    assert_eq!(batches, snap.batches as f64);
    assert_eq!(metric(&after, "patchflow_bytes_total"), batches * 3888.0);
    assert_eq!(metric(&after, "patchflow_live_streams"), 0.0);
    assert_eq!(metric(&after, "patchflow_streams_opened_total"), 1.0);
    assert!(metric(&after, "patchflow_worker_busy_seconds_total") > 0.0);
    let hits = metric(&after, "patchflow_cache_hits_total");
    let misses = metric(&after, "patchflow_cache_misses_total");
    assert!(misses > 0.0);
    let ratio = metric(&after, "patchflow_cache_hit_ratio");
    assert!((ratio - hits / (hits + misses)).abs() < 1e-9, "{ratio}");
    assert!(
        !after.contains("patchflow_stream_batches_total{"),
        "closed streams are dropped"
    );

    assert!(http_get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_unix_socket_and_replaces_a_stale_one() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("patchflow.sock");
    // A stale socket file, as a crashed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut cfg = config(vec![fx.store.clone()], 1, Limits::default());
    cfg.listen = None;
    cfg.metrics = None;
    cfg.unix = Some(socket.clone());
    let server = patchflow_server::start(cfg.clone()).await.unwrap();
    assert_eq!(server.local_addr(), None);
    let endpoint = server.endpoint().unwrap();
    assert_eq!(endpoint, format!("unix:{}", socket.display()));

    // A second daemon on the same live socket is refused.
    let err = patchflow_server::start(cfg).await.err().expect("refused");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );

    let client = Client::connect([endpoint], client_options()).await.unwrap();
    let mut stream = client
        .stream(StreamConfig::new(&fx.name, [5, 4, 3], 2))
        .await
        .unwrap();
    for k in 0..3 {
        let batch = within("batch", stream.next()).await.unwrap();
        assert_eq!(batch.index, k);
        fx.check_batch(&batch, [5, 4, 3], 2);
    }
    drop(stream);
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_problems_are_reported_by_name() {
    let fx = Fixture::new();
    let empty = tempfile::tempdir().unwrap();
    let err = patchflow_server::start(config(
        vec![empty.path().to_path_buf()],
        1,
        Limits::default(),
    ))
    .await
    .err()
    .expect("refused");
    assert!(matches!(err, ServerError::NotAStore { .. }), "{err}");
    assert!(err.to_string().contains("no manifest.json"), "{err}");

    // The same store twice.
    let err = patchflow_server::start(config(
        vec![fx.store.clone(), fx.root.path().to_path_buf()],
        1,
        Limits::default(),
    ))
    .await
    .err()
    .expect("refused");
    assert!(
        err.to_string()
            .contains("\"Dataset900_Synthetic\" is served twice"),
        "{err}"
    );

    let mut cfg = config(vec![fx.store.clone()], 1, Limits::default());
    cfg.limits.max_message_bytes = 10;
    let err = patchflow_server::start(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("max_message_bytes"), "{err}");

    // An unreachable daemon: the client retries, then gives up naming it.
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let options = patchflow_client::ClientOptions {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(1),
        ..client_options()
    };
    let err = Client::connect([format!("http://{dead}")], options)
        .await
        .err()
        .expect("unreachable");
    assert!(err.to_string().contains(&dead.to_string()), "{err}");
    assert!(
        err.to_string().contains("gave up after 3 attempts"),
        "{err}"
    );
    let err = Client::connect(["unix:relative.sock"], client_options())
        .await
        .err()
        .expect("invalid");
    assert!(err.to_string().contains("must be absolute"), "{err}");
}

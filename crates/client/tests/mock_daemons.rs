//! The client against in-process mock daemons whose batches are a pure function of the
//! configuration and the index: ordering over several daemons, reconfiguration, reconnection
//! after failures, protocol violations and refusals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use patchflow_client::{Batch, Client, ClientError, ClientOptions, SharedMemory, StreamConfig};
use patchflow_proto::v1 as pb;
use pb::patchflow_server::{Patchflow, PatchflowServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status, Streaming};

const GUARD: Duration = Duration::from_secs(60);

/// Payload of batch `index` of a configuration: every byte derived from (seed, index, position).
fn payload(seed: u64, index: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31) ^ index.wrapping_mul(7) ^ i as u64) as u8)
        .collect()
}

#[derive(Clone, Default)]
struct Behaviour {
    /// End each stream with UNAVAILABLE after this many batches.
    fail_after: Option<u64>,
    /// Send batch indices off by one.
    wrong_index: bool,
    /// Refuse every configuration with this code.
    refuse: Option<Code>,
    /// Offer shared memory, and answer streams that ask for it with slots no client can open
    /// (as a daemon on another host, user or container would).
    unusable_shared_memory: bool,
}

#[derive(Clone)]
struct Mock {
    behaviour: Behaviour,
    opens: Arc<AtomicUsize>,
}

fn parts_of(config: &pb::SampleConfig, index: u64) -> Vec<pb::SampleResponse> {
    let patch: Vec<u64> = config.patch_size.iter().map(|&p| p as u64).collect();
    let voxels: u64 = patch.iter().product::<u64>() * u64::from(config.batch_size);
    let image = Bytes::from(payload(config.seed, index, voxels as usize * 4));
    let label = Bytes::from(payload(config.seed ^ 1, index, voxels as usize));
    let header = pb::BatchHeader {
        patch_size: patch,
        batch_size: config.batch_size,
        channels: 1,
        dtype: pb::ImageDtype::F32 as i32,
        label_dtype: pb::LabelDtype::U8 as i32,
        ignore_label: 255,
        image_bytes: image.len() as u64,
        label_bytes: label.len() as u64,
        items: (0..config.batch_size)
            .map(|i| pb::ItemInfo {
                case_id: format!("case{i}"),
                case_index: i,
                origin: vec![index as i64, 0, -1],
                forced_foreground: false,
                class_value: None,
                augment_json: String::new(),
            })
            .collect(),
    };
    // Two parts: the image, then the label.
    vec![
        pb::SampleResponse {
            index,
            config_id: config.config_id,
            part: 0,
            parts: 2,
            header: Some(header),
            image,
            label: Bytes::new(),
            shared: None,
        },
        pb::SampleResponse {
            index,
            config_id: config.config_id,
            part: 1,
            parts: 2,
            header: None,
            image: Bytes::new(),
            label,
            shared: None,
        },
    ]
}

/// Part 0 of a batch turned into a shared-memory message naming a file that does not exist.
fn unusable_slot(mut part: pb::SampleResponse) -> pb::SampleResponse {
    let header = part.header.as_ref().expect("part 0 has the header");
    let (image, label) = (header.image_bytes, header.label_bytes);
    part.parts = 1;
    part.image = Bytes::new();
    part.shared = Some(pb::SharedBatch {
        slot: 0,
        path: "/nonexistent/patchflow-0-0".into(),
        file_bytes: image + label,
        label_offset: image,
    });
    part
}

#[tonic::async_trait]
impl Patchflow for Mock {
    async fn list_datasets(
        &self,
        _: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: vec![pb::DatasetSummary {
                name: "mock".into(),
                num_cases: 1,
                num_channels: 1,
                set_aside: Vec::new(),
            }],
            limits: Some(pb::ServerLimits {
                max_credits: 2,
                max_message_bytes: 1 << 20,
                max_shared_slots: if self.behaviour.unusable_shared_memory {
                    8
                } else {
                    0
                },
                ..Default::default()
            }),
        }))
    }

    async fn describe_dataset(
        &self,
        request: Request<pb::DescribeDatasetRequest>,
    ) -> Result<Response<pb::DatasetDescription>, Status> {
        Err(Status::not_found(format!(
            "unknown dataset {:?}",
            request.get_ref().dataset
        )))
    }

    type SampleStream = ReceiverStream<Result<pb::SampleResponse, Status>>;

    async fn sample(
        &self,
        request: Request<Streaming<pb::SampleRequest>>,
    ) -> Result<Response<Self::SampleStream>, Status> {
        self.opens.fetch_add(1, Ordering::SeqCst);
        let behaviour = self.behaviour.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut config: Option<pb::SampleConfig> = None;
            let mut next = 0u64;
            let mut credits = 0u64;
            let mut sent = 0u64;
            let mut shared = None;
            while let Ok(Some(msg)) = inbound.message().await {
                if shared.is_none() {
                    shared = Some(msg.shared_memory.is_some());
                }
                if let Some(c) = msg.config {
                    if let Some(code) = behaviour.refuse {
                        let _ = tx.send(Err(Status::new(code, "refused by the mock"))).await;
                        return;
                    }
                    next = c.start_index.unwrap_or(0);
                    credits = 0;
                    config = Some(c);
                }
                credits += u64::from(msg.credits);
                if credits > 2 {
                    let status = Status::resource_exhausted("credits beyond the announced limit");
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let Some(c) = &config else { continue };
                while credits > 0 {
                    if behaviour.fail_after == Some(sent) {
                        let _ = tx.send(Err(Status::unavailable("mock restart"))).await;
                        return;
                    }
                    let index = next + u64::from(behaviour.wrong_index);
                    let mut parts = parts_of(c, index);
                    if shared == Some(true) && behaviour.unusable_shared_memory {
                        parts = vec![unusable_slot(parts.swap_remove(0))];
                    }
                    for part in parts {
                        if tx.send(Ok(part)).await.is_err() {
                            return;
                        }
                    }
                    next += c.index_stride.max(1);
                    credits -= 1;
                    sent += 1;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Daemon {
    endpoint: String,
    opens: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn daemon(behaviour: Behaviour) -> Daemon {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let opens = Arc::new(AtomicUsize::new(0));
    let mock = Mock {
        behaviour,
        opens: Arc::clone(&opens),
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(PatchflowServer::new(mock))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Daemon {
        endpoint: format!("http://{addr}"),
        opens,
        task,
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        prefetch: 8,
        max_attempts: 5,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
        ..ClientOptions::default()
    }
}

async fn next(stream: &mut patchflow_client::BatchStream) -> Result<Batch, ClientError> {
    tokio::time::timeout(GUARD, stream.next())
        .await
        .expect("no answer within the guard time")
}

fn check(batch: &Batch, seed: u64, patch: [usize; 3], batch_size: usize) {
    let voxels = patch.iter().product::<usize>() * batch_size;
    assert_eq!(batch.patch, patch);
    assert_eq!(
        batch.image_shape(),
        [batch_size, 1, patch[0], patch[1], patch[2]]
    );
    assert_eq!(
        batch.label_shape(),
        [batch_size, 1, patch[0], patch[1], patch[2]]
    );
    assert_eq!(batch.image.as_ref(), payload(seed, batch.index, voxels * 4));
    assert_eq!(batch.label.as_ref(), payload(seed ^ 1, batch.index, voxels));
    assert_eq!(batch.items[0].origin, [batch.index as i64, 0, -1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_hand_out_batches_in_order_and_follow_reconfiguration() {
    let daemons = [
        daemon(Behaviour::default()).await,
        daemon(Behaviour::default()).await,
        daemon(Behaviour::default()).await,
    ];
    let client = Client::connect(daemons.iter().map(|d| d.endpoint.clone()), options())
        .await
        .unwrap();
    assert_eq!(client.endpoints().len(), 3);
    let mut config = StreamConfig::new("mock", [2, 3, 4], 2);
    config.seed = 5;
    let mut stream = client.stream(config.clone()).await.unwrap();
    for k in 0..7 {
        let batch = next(&mut stream).await.unwrap();
        assert_eq!(batch.index, k);
        check(&batch, 5, [2, 3, 4], 2);
    }
    // From index 7 on: new patch and seed, whatever was already prefetched.
    config.patch = [1, 2, 5];
    config.seed = 6;
    config.batch_size = 3;
    stream.reconfigure(config).unwrap();
    for k in 7..15 {
        let batch = next(&mut stream).await.unwrap();
        assert_eq!(batch.index, k);
        check(&batch, 6, [1, 2, 5], 3);
    }
    for d in &daemons {
        assert_eq!(d.opens.load(Ordering::SeqCst), 1, "no reconnection needed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strided_streams_split_one_sequence_over_every_daemon() {
    let daemons = [
        daemon(Behaviour::default()).await,
        daemon(Behaviour::default()).await,
    ];
    let client = Client::connect(daemons.iter().map(|d| d.endpoint.clone()), options())
        .await
        .unwrap();
    let mut config = StreamConfig::new("mock", [2, 2, 2], 1);
    config.seed = 3;
    // Three consumers of one sequence: together they see every index once.
    let mut seen = Vec::new();
    for rank in 0..3u64 {
        let mut stream = client
            .stream_strided(config.clone(), rank, 3)
            .await
            .unwrap();
        assert_eq!(stream.index_stride(), 3);
        let mut patch = [2, 2, 2];
        for i in 0..6u64 {
            let batch = next(&mut stream).await.unwrap();
            assert_eq!(batch.index, rank + 3 * i);
            check(&batch, 3, patch, 1);
            seen.push(batch.index);
            if rank == 1 && i == 2 {
                // A reconfiguration keeps the share.
                patch = [3, 2, 2];
                let mut bigger = config.clone();
                bigger.patch = [3, 2, 2].map(|v: usize| v as i64);
                stream.reconfigure(bigger).unwrap();
            }
        }
        assert_eq!(stream.next_index(), rank + 18);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..18).collect::<Vec<u64>>());
    // Each share was spread over both daemons.
    for d in &daemons {
        assert_eq!(d.opens.load(Ordering::SeqCst), 3);
    }
    let err = client.stream_strided(config, 0, 0).await.err().unwrap();
    assert!(err.to_string().contains("index_stride"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_daemons_are_reconnected_without_skipping_or_repeating() {
    let daemons = [
        daemon(Behaviour {
            fail_after: Some(3),
            ..Behaviour::default()
        })
        .await,
        daemon(Behaviour {
            fail_after: Some(1),
            ..Behaviour::default()
        })
        .await,
    ];
    let client = Client::connect(daemons.iter().map(|d| d.endpoint.clone()), options())
        .await
        .unwrap();
    let mut config = StreamConfig::new("mock", [2, 2, 2], 1);
    config.seed = 9;
    let mut stream = client.stream_from(config, 100).await.unwrap();
    for k in 100..130 {
        let batch = next(&mut stream).await.unwrap();
        assert_eq!(batch.index, k);
        check(&batch, 9, [2, 2, 2], 1);
    }
    assert!(daemons[0].opens.load(Ordering::SeqCst) >= 5);
    assert!(daemons[1].opens.load(Ordering::SeqCst) >= 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_and_refusals_are_reported() {
    let liar = daemon(Behaviour {
        wrong_index: true,
        ..Behaviour::default()
    })
    .await;
    let client = Client::connect([liar.endpoint.clone()], options())
        .await
        .unwrap();
    let mut stream = client
        .stream(StreamConfig::new("mock", [1, 1, 1], 1))
        .await
        .unwrap();
    let err = next(&mut stream).await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("expected batch 0, received batch 1"),
        "{err}"
    );

    let refusing = daemon(Behaviour {
        refuse: Some(Code::InvalidArgument),
        ..Behaviour::default()
    })
    .await;
    let client = Client::connect([refusing.endpoint.clone()], options())
        .await
        .unwrap();
    let mut stream = client
        .stream(StreamConfig::new("mock", [1, 1, 1], 1))
        .await
        .unwrap();
    let err = next(&mut stream).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert_eq!(err.message(), Some("refused by the mock"));
    assert_eq!(
        refusing.opens.load(Ordering::SeqCst),
        1,
        "refusals are not retried"
    );
    let err = client.describe("nope").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    let err = Client::connect(Vec::<String>::new(), options())
        .await
        .err()
        .expect("no endpoint");
    assert!(matches!(err, ClientError::NoEndpoints));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_shared_memory_falls_back_to_messages_or_fails_when_required() {
    let d = daemon(Behaviour {
        unusable_shared_memory: true,
        ..Behaviour::default()
    })
    .await;
    // Auto (the default) on a loopback endpoint asks for shared memory, cannot open the slot,
    // and goes on through messages from the same batch.
    let client = Client::connect([d.endpoint.clone()], options())
        .await
        .unwrap();
    let mut config = StreamConfig::new("mock", [2, 2, 3], 1);
    config.seed = 3;
    let mut stream = client.stream(config.clone()).await.unwrap();
    for k in 0..5 {
        let batch = next(&mut stream).await.unwrap();
        assert_eq!(batch.index, k);
        check(&batch, 3, [2, 2, 3], 1);
    }
    assert_eq!(
        d.opens.load(Ordering::SeqCst),
        2,
        "one stream more, without shared memory"
    );

    // Required: the stream fails, naming the file.
    let required = ClientOptions {
        shared_memory: SharedMemory::On,
        ..options()
    };
    let client = Client::connect([d.endpoint.clone()], required)
        .await
        .unwrap();
    let mut stream = client.stream(config.clone()).await.unwrap();
    let err = next(&mut stream).await.unwrap_err();
    assert!(matches!(err, ClientError::SharedMemory { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/patchflow-0-0"),
        "{err}"
    );

    // Off: never asked for.
    let opens = d.opens.load(Ordering::SeqCst);
    let off = ClientOptions {
        shared_memory: SharedMemory::Off,
        ..options()
    };
    let client = Client::connect([d.endpoint.clone()], off).await.unwrap();
    let mut stream = client.stream(config).await.unwrap();
    check(&next(&mut stream).await.unwrap(), 3, [2, 2, 3], 1);
    assert_eq!(d.opens.load(Ordering::SeqCst), opens + 1);
}

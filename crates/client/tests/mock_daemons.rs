//! The client against in-process mock daemons whose batches are a pure function of the
//! configuration and the index: ordering over several daemons, reconfiguration, reconnection
//! after failures, failover to the other daemons while one is down or hangs, protocol
//! violations and refusals.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// While set, the daemon is down: calls fail with UNAVAILABLE and open streams end with it
    /// before their next batch.
    down: Arc<AtomicBool>,
    /// Stop sending (but keep the stream open) after this many batches of a stream.
    hang_after: Option<u64>,
}

#[derive(Clone)]
struct Mock {
    behaviour: Behaviour,
    opens: Arc<AtomicUsize>,
    /// Indices of the batches sent, in order.
    served: Arc<Mutex<Vec<u64>>>,
}

impl Mock {
    fn check_up(&self) -> Result<(), Status> {
        if self.behaviour.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("mock daemon down"));
        }
        Ok(())
    }
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
                stored: None,
            })
            .collect(),
        label_encoding: pb::LabelEncoding::Raw as i32,
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
        self.check_up()?;
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
        self.check_up()?;
        if request.get_ref().dataset != "mock" {
            return Err(Status::not_found(format!(
                "unknown dataset {:?}",
                request.get_ref().dataset
            )));
        }
        Ok(Response::new(pb::DatasetDescription {
            name: "mock".into(),
            ..Default::default()
        }))
    }

    type SampleStream = ReceiverStream<Result<pb::SampleResponse, Status>>;

    async fn sample(
        &self,
        request: Request<Streaming<pb::SampleRequest>>,
    ) -> Result<Response<Self::SampleStream>, Status> {
        self.check_up()?;
        self.opens.fetch_add(1, Ordering::SeqCst);
        let behaviour = self.behaviour.clone();
        let served = Arc::clone(&self.served);
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
                    if behaviour.down.load(Ordering::SeqCst) {
                        let _ = tx.send(Err(Status::unavailable("mock daemon down"))).await;
                        return;
                    }
                    if behaviour.hang_after == Some(sent) {
                        // Alive but silent until the client goes away.
                        while let Ok(Some(_)) = inbound.message().await {}
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
                    served.lock().unwrap().push(index);
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
    served: Arc<Mutex<Vec<u64>>>,
    down: Arc<AtomicBool>,
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
    let served = Arc::new(Mutex::new(Vec::new()));
    let down = Arc::clone(&behaviour.down);
    let mock = Mock {
        behaviour,
        opens: Arc::clone(&opens),
        served: Arc::clone(&served),
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
        served,
        down,
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
    // A stream of daemon 0 gives at most 3 batches, one of daemon 1 at most 1 (a failed
    // stream's lane may move to the other daemon): at least 30 / 3 streams were opened.
    let opens = daemons.each_ref().map(|d| d.opens.load(Ordering::SeqCst));
    assert!(opens[0] + opens[1] >= 10, "{opens:?}");
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

impl Daemon {
    /// Indices this daemon sent, from position `from` of its log on.
    fn served_since(&self, from: usize) -> Vec<u64> {
        self.served.lock().unwrap()[from..].to_vec()
    }

    fn served_count(&self) -> usize {
        self.served.lock().unwrap().len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_daemon_s_batches_go_to_the_others_until_it_returns() {
    let daemons = [
        daemon(Behaviour::default()).await,
        daemon(Behaviour::default()).await,
        daemon(Behaviour::default()).await,
    ];
    let client = Client::connect(daemons.iter().map(|d| d.endpoint.clone()), options())
        .await
        .unwrap();
    let mut config = StreamConfig::new("mock", [2, 2, 2], 1);
    config.seed = 4;
    // A rank's share (odd indices) resumed at 21: lane j holds the indices k with
    // (k / 2) mod 3 == j.
    let mut stream = client.stream_strided(config.clone(), 21, 2).await.unwrap();
    let mut seed = 4;
    // The next batch must be the next index of the share, with the seed in force.
    async fn take(stream: &mut patchflow_client::BatchStream, seed: u64) {
        let index = stream.next_index();
        let batch = next(stream).await.unwrap();
        assert_eq!(batch.index, index, "skipped or repeated");
        check(&batch, seed, [2, 2, 2], 1);
        assert_eq!(stream.next_index(), index + 2);
    }
    assert_eq!(stream.next_index(), 21);
    for _ in 0..6 {
        take(&mut stream, seed).await;
    }
    // Daemon 1 goes down: its lane moves to the others and the sequence goes on.
    daemons[1].down.store(true, Ordering::SeqCst);
    let mark = daemons.iter().map(Daemon::served_count).collect::<Vec<_>>();
    for _ in 0..12 {
        take(&mut stream, seed).await;
    }
    // A reconfiguration while it is down reaches the substitute stream too.
    seed = 8;
    config.seed = seed;
    stream.reconfigure(config.clone()).unwrap();
    for _ in 0..12 {
        take(&mut stream, seed).await;
    }
    let lane1 = |k: &u64| (k / 2) % 3 == 1;
    let moved: Vec<u64> = [0, 2]
        .iter()
        .flat_map(|&d| daemons[d].served_since(mark[d]))
        .filter(lane1)
        .collect();
    assert!(
        moved.len() >= 4,
        "daemon 1's batches were served by the others: {moved:?}"
    );
    // Back up: the lane returns to it (probed with backoff; no sleep, the stream goes on).
    let back = daemons[1].served_count();
    daemons[1].down.store(false, Ordering::SeqCst);
    let since = Instant::now();
    while daemons[1].served_count() == back {
        assert!(
            since.elapsed() < GUARD,
            "daemon 1 never got its batches back"
        );
        take(&mut stream, seed).await;
    }
    for _ in 0..12 {
        take(&mut stream, seed).await;
    }
    let returned = daemons[1].served_since(back);
    assert!(returned.iter().all(lane1), "{returned:?}");
    assert!(returned.len() >= 2, "{returned:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_daemon_is_left_after_the_batch_timeout() {
    let daemons = [
        daemon(Behaviour::default()).await,
        daemon(Behaviour {
            hang_after: Some(3),
            ..Behaviour::default()
        })
        .await,
    ];
    let timeout = Duration::from_millis(300);
    let client = Client::connect(
        daemons.iter().map(|d| d.endpoint.clone()),
        ClientOptions {
            batch_timeout: timeout,
            max_backoff: Duration::from_secs(5),
            initial_backoff: Duration::from_secs(5),
            ..options()
        },
    )
    .await
    .unwrap();
    let mut config = StreamConfig::new("mock", [2, 2, 2], 1);
    config.seed = 2;
    let mut stream = client.stream(config).await.unwrap();
    let mut longest = Duration::ZERO;
    for k in 0..40 {
        let since = Instant::now();
        let batch = next(&mut stream).await.unwrap();
        longest = longest.max(since.elapsed());
        assert_eq!(batch.index, k);
        check(&batch, 2, [2, 2, 2], 1);
    }
    // The silent daemon sent 3 batches, its lane waited one timeout and went to daemon 0
    // (the home probe waits 5 s, beyond this test).
    assert_eq!(daemons[1].served_count(), 3);
    assert!(longest >= timeout, "{longest:?}");
    assert!(longest < timeout * 20, "waited {longest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_not_failed_over_and_all_down_fails_with_unavailable() {
    for code in [
        Code::InvalidArgument,
        Code::NotFound,
        Code::Unauthenticated,
        Code::DataLoss,
    ] {
        let ok = daemon(Behaviour::default()).await;
        let refusing = daemon(Behaviour {
            refuse: Some(code),
            ..Behaviour::default()
        })
        .await;
        let client = Client::connect([ok.endpoint.clone(), refusing.endpoint.clone()], options())
            .await
            .unwrap();
        let mut stream = client
            .stream(StreamConfig::new("mock", [1, 1, 1], 1))
            .await
            .unwrap();
        // Batch 0 comes from the healthy daemon, batch 1's daemon refuses: that surfaces.
        let mut failed = None;
        for _ in 0..2 {
            if let Err(e) = next(&mut stream).await {
                failed = Some(e);
                break;
            }
        }
        let err = failed.expect("the refusal surfaces");
        assert_eq!(err.code(), Some(code), "{err}");
        assert!(matches!(err, ClientError::Server { .. }), "{err}");
        assert_eq!(refusing.opens.load(Ordering::SeqCst), 1, "{code:?} retried");
        assert_eq!(ok.opens.load(Ordering::SeqCst), 1, "{code:?} failed over");
    }

    // Every daemon down: the stream fails with UNAVAILABLE after max_attempts rounds.
    let daemons = [
        daemon(Behaviour::default()).await,
        daemon(Behaviour::default()).await,
    ];
    let client = Client::connect(daemons.iter().map(|d| d.endpoint.clone()), options())
        .await
        .unwrap();
    let mut stream = client
        .stream(StreamConfig::new("mock", [1, 1, 1], 1))
        .await
        .unwrap();
    next(&mut stream).await.unwrap();
    for d in &daemons {
        d.down.store(true, Ordering::SeqCst);
    }
    let err = loop {
        if let Err(e) = next(&mut stream).await {
            break e;
        }
    };
    assert!(matches!(err, ClientError::GaveUp { .. }), "{err}");
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_down_when_the_client_connects_gets_its_batches_once_it_answers() {
    let daemons = [
        daemon(Behaviour::default()).await,
        daemon(Behaviour::default()).await,
    ];
    daemons[0].down.store(true, Ordering::SeqCst);
    let endpoints = || daemons.iter().map(|d| d.endpoint.clone());
    let client = Client::connect(endpoints(), options()).await.unwrap();
    assert_eq!(client.limits()[0].max_credits, 2, "borrowed from daemon 1");
    let mut config = StreamConfig::new("mock", [1, 2, 2], 1);
    config.seed = 6;
    let mut stream = client.stream(config).await.unwrap();
    for k in 0..10 {
        let batch = next(&mut stream).await.unwrap();
        assert_eq!(batch.index, k);
        check(&batch, 6, [1, 2, 2], 1);
    }
    assert_eq!(daemons[0].served_count(), 0);
    daemons[0].down.store(false, Ordering::SeqCst);
    let since = Instant::now();
    while daemons[0].served_count() == 0 {
        assert!(since.elapsed() < GUARD, "daemon 0 never got its batches");
        let k = stream.next_index();
        let batch = next(&mut stream).await.unwrap();
        assert_eq!(batch.index, k);
        check(&batch, 6, [1, 2, 2], 1);
    }
    assert!(daemons[0].served_since(0).iter().all(|k| k % 2 == 0));

    // Nobody answers: connecting fails with UNAVAILABLE after max_attempts rounds.
    for d in &daemons {
        d.down.store(true, Ordering::SeqCst);
    }
    let err = Client::connect(endpoints(), options()).await.err().unwrap();
    assert!(
        matches!(err, ClientError::GaveUp { attempts: 6, .. }),
        "{err}"
    );
    assert_eq!(err.code(), Some(Code::Unavailable));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_asks_the_next_daemon_when_one_is_down() {
    let daemons = [
        daemon(Behaviour::default()).await,
        daemon(Behaviour::default()).await,
    ];
    let endpoints = || daemons.iter().map(|d| d.endpoint.clone());
    let client = Client::connect(endpoints(), options()).await.unwrap();
    daemons[0].down.store(true, Ordering::SeqCst);
    assert_eq!(
        client.list_datasets().await.unwrap().datasets[0].name,
        "mock"
    );
    assert_eq!(client.describe("mock").await.unwrap().name, "mock");
    // A refusal is final: not asked of the next daemon.
    let err = client.describe("other").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    daemons[0].down.store(false, Ordering::SeqCst);
    daemons[1].down.store(true, Ordering::SeqCst);
    assert_eq!(client.describe("mock").await.unwrap().name, "mock");
    // Nobody answers: UNAVAILABLE after max_attempts rounds.
    daemons[0].down.store(true, Ordering::SeqCst);
    let err = client.list_datasets().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
}

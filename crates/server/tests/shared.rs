//! Shared-memory delivery: batches written into slot files the client maps, for clients on the
//! daemon's host. The bytes must be exactly those of the message path; slots are bounded,
//! never rewritten while the client holds them, and removed with the stream.

mod common;

use std::path::Path;

use common::{Fixture, client_options, config, first_answer, open_sample, wait_live, within};
use patchflow_client::{Batch, Client, ClientError, SharedMemory, StreamConfig};
use patchflow_proto::v1 as pb;
use patchflow_server::{Limits, RunningServer};
use tonic::Code;

/// Slot files in `dir`.
fn slot_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("patchflow-"))
        })
        .count()
}

/// A daemon on the fixture with its shared-memory folder in `shm` (or none) and a Unix socket.
async fn serve_shared(fx: &Fixture, shm: Option<&Path>) -> RunningServer {
    let mut cfg = config(vec![fx.store.clone()], 2, Limits::default());
    cfg.shared_memory = shm.map(Path::to_path_buf);
    cfg.unix = Some(fx.root.path().join("daemon.sock"));
    patchflow_server::start(cfg).await.expect("server starts")
}

fn options(mode: SharedMemory) -> patchflow_client::ClientOptions {
    patchflow_client::ClientOptions {
        shared_memory: mode,
        ..client_options()
    }
}

/// The PGPS-like sequence of the tests: three size changes.
const SIZES: [[i64; 3]; 4] = [[4, 4, 4], [6, 5, 7], [9, 8, 10], [16, 20, 18]];

async fn sequence(endpoint: &str, fx: &Fixture, mode: SharedMemory) -> Vec<Batch> {
    let client = Client::connect([endpoint], options(mode)).await.unwrap();
    let mut cfg = StreamConfig::new(&fx.name, SIZES[0], 2);
    cfg.seed = 77;
    let mut stream = client.stream(cfg.clone()).await.unwrap();
    let mut out = Vec::new();
    for patch in SIZES {
        cfg.patch = patch;
        stream.reconfigure(cfg.clone()).unwrap();
        for _ in 0..6 {
            out.push(within("next batch", stream.next()).await.unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_serves_the_same_bytes_as_messages_and_cleans_up() {
    let fx = Fixture::new();
    let shm = tempfile::tempdir().unwrap();
    let server = serve_shared(&fx, Some(shm.path())).await;
    let unix = format!("unix:{}", fx.root.path().join("daemon.sock").display());
    let tcp = server.endpoint().unwrap();

    let by_messages = sequence(&tcp, &fx, SharedMemory::Off).await;
    assert_eq!(
        slot_files(shm.path()),
        0,
        "no slot without a shared-memory stream"
    );
    // Auto picks shared memory for a Unix socket and for a loopback address.
    for endpoint in [&unix, &tcp] {
        let shared = sequence(endpoint, &fx, SharedMemory::Auto).await;
        assert_eq!(shared.len(), by_messages.len());
        for (s, m) in shared.iter().zip(&by_messages) {
            assert_eq!(s, m, "batch {} differs between the two paths", s.index);
            let [z, y, x] = s.patch;
            fx.check_batch(s, [z, y, x], 2);
        }
    }
    // Both shared streams used slot files, and each removed them when it ended.
    wait_live(&server, 0).await;
    assert_eq!(slot_files(shm.path()), 0, "slot files left behind");
    let m = server.metrics();
    assert!(m.batches >= 3 * by_messages.len() as u64);
    assert!(
        m.shared_memory_batches >= 2 * by_messages.len() as u64,
        "{m:?}"
    );
    assert_eq!(m.shared_memory_fallbacks, 0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_batches_are_never_overwritten_and_slots_stay_bounded() {
    let fx = Fixture::new();
    let shm = tempfile::tempdir().unwrap();
    let server = serve_shared(&fx, Some(shm.path())).await;
    let opts = patchflow_client::ClientOptions {
        prefetch: 2,
        held_batches: 2,
        shared_memory: SharedMemory::On,
        ..client_options()
    };
    let client = Client::connect([server.endpoint().unwrap()], opts)
        .await
        .unwrap();
    let mut cfg = StreamConfig::new(&fx.name, [8, 9, 10], 3);
    cfg.seed = 5;
    let mut stream = client.stream(cfg).await.unwrap();
    // Keep every batch: the first ones stay views of their slots, later ones are copies; no
    // stall, no rewrite, never more than prefetch + held = 4 slot files.
    let mut held: Vec<(Batch, Vec<u8>, Vec<u8>)> = Vec::new();
    for _ in 0..20 {
        let batch = within("next batch", stream.next()).await.unwrap();
        assert!(slot_files(shm.path()) <= 4, "more slots than granted");
        let (image, label) = (batch.image.to_vec(), batch.label.to_vec());
        held.push((batch, image, label));
    }
    for (batch, image, label) in &held {
        assert!(
            batch.image == image.as_slice(),
            "batch {} image rewritten",
            batch.index
        );
        assert!(
            batch.label == label.as_slice(),
            "batch {} label rewritten",
            batch.index
        );
        fx.check_batch(batch, [8, 9, 10], 3);
    }
    assert!(slot_files(shm.path()) >= 1, "the stream used shared memory");
    drop(held);
    drop(stream);
    wait_live(&server, 0).await;
    assert_eq!(slot_files(shm.path()), 0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_without_shared_memory_refuses_it_and_auto_uses_messages() {
    let fx = Fixture::new();
    let server = serve_shared(&fx, None).await;
    let endpoint = server.endpoint().unwrap();
    let client = Client::connect([&endpoint], options(SharedMemory::Auto))
        .await
        .unwrap();
    assert_eq!(client.limits()[0].max_shared_slots, 0);
    let mut stream = client
        .stream(StreamConfig::new(&fx.name, [5, 5, 5], 2))
        .await
        .unwrap();
    let batch = within("next batch", stream.next()).await.unwrap();
    fx.check_batch(&batch, [5, 5, 5], 2);

    let client = Client::connect([&endpoint], options(SharedMemory::On))
        .await
        .unwrap();
    let mut stream = client
        .stream(StreamConfig::new(&fx.name, [5, 5, 5], 2))
        .await
        .unwrap();
    match within("next batch", stream.next()).await {
        Err(ClientError::Server { status, .. }) => {
            assert_eq!(status.code(), Code::FailedPrecondition);
            assert!(status.message().contains("shared memory"), "{status:?}");
        }
        other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_requests_beyond_the_limit_are_refused() {
    let fx = Fixture::new();
    let shm = tempfile::tempdir().unwrap();
    let server = serve_shared(&fx, Some(shm.path())).await;
    let mut raw = common::Raw::connect(server.endpoint().unwrap())
        .await
        .unwrap();
    let request = |slots| pb::SampleRequest {
        config: Some(fx.sample_config([4, 4, 4], 1)),
        credits: 1,
        shared_memory: Some(pb::SharedMemoryRequest { slots }),
        ..Default::default()
    };
    let max = Limits::default().max_shared_slots;
    let status = first_answer(&mut raw, request(max + 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("shared_memory.slots"),
        "{status:?}"
    );

    // A raw stream at the limit: one message naming its slot, no voxel bytes in it, and the
    // file holds the batch.
    let (tx, mut inbound) = open_sample(&mut raw, request(max)).await.unwrap();
    let msg = within("answer", inbound.message()).await.unwrap().unwrap();
    let shared = msg.shared.expect("a shared-memory answer");
    assert!(msg.image.is_empty() && msg.label.is_empty());
    assert_eq!(msg.parts, 1);
    let header = msg.header.unwrap();
    let file = std::fs::read(&shared.path).unwrap();
    assert_eq!(file.len() as u64, shared.file_bytes);
    assert_eq!(shared.label_offset, header.image_bytes);
    assert!(Path::new(&shared.path).starts_with(std::fs::canonicalize(shm.path()).unwrap()));
    drop(tx);
    drop(inbound);
    wait_live(&server, 0).await;
    assert_eq!(slot_files(shm.path()), 0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_go_inside_the_messages_when_no_slot_can_be_prepared() {
    let fx = Fixture::new();
    let shm = tempfile::tempdir().unwrap();
    let server = serve_shared(&fx, Some(shm.path())).await;
    // The folder goes away after the start (as a full /dev/shm refuses new blocks): every slot
    // fails to prepare, and the stream goes on through messages.
    let folder = shm.path().to_path_buf();
    drop(shm);
    assert!(!folder.exists());
    let client = Client::connect([server.endpoint().unwrap()], options(SharedMemory::On))
        .await
        .unwrap();
    let mut cfg = StreamConfig::new(&fx.name, [6, 7, 8], 2);
    cfg.seed = 3;
    let mut stream = client.stream(cfg).await.unwrap();
    for k in 0..8 {
        let batch = within("next batch", stream.next()).await.unwrap();
        assert_eq!(batch.index, k);
        fx.check_batch(&batch, [6, 7, 8], 2);
    }
    let m = server.metrics();
    assert!(m.shared_memory_fallbacks >= 8, "{m:?}");
    assert_eq!(m.shared_memory_batches, 0);
    drop(stream);
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}

/// Mappings in this process of slot files already removed from `dir` (`/proc/self/maps` marks
/// them "(deleted)"): each keeps its file's memory allocated.
fn mapped_removed_slots(dir: &Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let prefix = dir.join("patchflow-").to_string_lossy().into_owned();
    maps.lines()
        .filter(|l| l.contains(&prefix) && l.ends_with("(deleted)"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequent_reconfigurations_keep_no_removed_slot_file_alive() {
    // Every reconfiguration drops the batches in preparation, and the daemon retires their
    // slots; a client that kept the mappings of retired slots would keep their memory (the
    // files are gone from the folder, not from RAM) without bound.
    let fx = Fixture::new();
    let shm = tempfile::tempdir().unwrap();
    let server = serve_shared(&fx, Some(shm.path())).await;
    let tcp = server.endpoint().unwrap();
    let client = Client::connect([&tcp], options(SharedMemory::On))
        .await
        .unwrap();
    let mut cfg = StreamConfig::new(&fx.name, SIZES[0], 2);
    cfg.seed = 5;
    let mut stream = client.stream(cfg.clone()).await.unwrap();
    let bound = Limits::default().max_shared_slots as usize;
    let mut worst = 0;
    for round in 0..80 {
        cfg.patch = SIZES[round % SIZES.len()];
        stream.reconfigure(cfg.clone()).unwrap();
        for _ in 0..2 {
            let batch = within("next batch", stream.next()).await.unwrap();
            assert_eq!(batch.patch, cfg.patch.map(|v| v as usize));
        }
        worst = worst.max(mapped_removed_slots(shm.path()));
    }
    assert!(
        worst <= bound,
        "{worst} mappings of removed slot files (a stream has at most {bound} slots)"
    );
    drop(stream);
    drop(client);
    server.shutdown().await.unwrap();
}

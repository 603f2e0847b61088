//! A client that asks for many batches and then stops reading: the daemon's memory stays
//! within its per-stream bound (it holds a few batches, not what the credits allow), and a
//! client beside it keeps getting its sequence.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{phantom_store, s};
use patchflow_client::{Client, ClientOptions, StreamConfig};
use patchflow_proto::v1 as pb;

fn daemon(store: &Path, sock: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_patchflow"))
        .args(["--quiet", "serve", s(store), "--no-tcp", "--unix", s(sock)])
        .args(["--workers", "2", "--cache-mb", "16"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("daemon starts")
}

/// `VmHWM` (peak resident memory) of `pid`, bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_ascii_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// A raw gRPC channel over the Unix socket `sock`.
async fn unix_channel(sock: &Path) -> tonic::transport::Channel {
    let sock = sock.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(sock).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("channel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_costs_a_bounded_amount_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = phantom_store(dir.path(), 2, "48,64,64");
    let sock = dir.path().join("pf.sock");
    let mut child = daemon(&store, &sock);
    let endpoint = format!("unix:{}", sock.display());
    let options = ClientOptions {
        max_attempts: 100,
        initial_backoff: Duration::from_millis(10),
        ..Default::default()
    };
    let good = Client::connect([endpoint.as_str()], options.clone())
        .await
        .unwrap();
    let idle = peak_rss(child.id());

    // The stalled client: 64 credits for batches of 4 × 96³ f32 (14 MiB of image each, the
    // patch padded beyond the volume), then it never reads. Producing all it asked for would
    // take ~900 MiB.
    let mut raw_client = pb::patchflow_client::PatchflowClient::new(unix_channel(&sock).await);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::SampleRequest {
        config: Some(pb::SampleConfig {
            dataset: "store".into(),
            patch_size: vec![96, 96, 96],
            batch_size: 4,
            ..Default::default()
        }),
        credits: 64,
        ..Default::default()
    })
    .await
    .unwrap();
    let stalled = raw_client
        .sample(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();

    // The other client streams its whole sequence, equal to a run on its own.
    let config = StreamConfig::new("store", [32, 48, 48], 2);
    let mut stream = good.stream(config.clone()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..60 {
        let b = stream.next().await.unwrap();
        got.push((
            b.index,
            b.items.iter().map(|i| i.origin).collect::<Vec<_>>(),
            b.image.clone(),
        ));
    }
    let peak = peak_rss(child.id());
    drop(stream);
    drop(stalled);
    drop(tx);

    let alone = Client::connect([endpoint.as_str()], options).await.unwrap();
    let mut stream = alone.stream(config).await.unwrap();
    for (index, origins, image) in got {
        let b = stream.next().await.unwrap();
        assert_eq!(b.index, index);
        assert_eq!(
            b.items.iter().map(|i| i.origin).collect::<Vec<_>>(),
            origins
        );
        assert!(
            b.image == image,
            "batch {index} differs beside a stalled client"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // Per stream the daemon holds at most its sampling jobs (2) and queued batches (2), plus
    // what the transport buffers: a few batches, far from the 64 granted.
    let batch = 4 * 96 * 96 * 96 * 5;
    let grown = peak.saturating_sub(idle);
    assert!(
        grown < 10 * batch as u64,
        "daemon grew by {} MiB beside a stalled client (batch {} MiB, idle {} MiB)",
        grown >> 20,
        batch >> 20,
        idle >> 20
    );
}

//! The daemon process is killed (SIGKILL) in the middle of a stream and started again on the
//! same socket: the client reconnects with backoff and continues the same deterministic
//! sequence, nothing skipped or repeated, equal to an uninterrupted run.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::{fingerprint, phantom_store, unix_daemon};
use patchflow_client::{Client, ClientOptions, StreamConfig};

/// `patchflow serve STORE` on the Unix socket `sock` only.
fn daemon(store: &Path, sock: &Path) -> Child {
    unix_daemon(store, sock, &[])
}

fn options() -> ClientOptions {
    ClientOptions {
        max_attempts: 100,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(200),
        prefetch: 4,
        ..Default::default()
    }
}

fn config() -> StreamConfig {
    let mut c = StreamConfig::new("store", [24, 32, 32], 3);
    c.seed = 77;
    c
}

const TOTAL: usize = 30;
const KILL_AFTER: usize = 11;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_daemon_restarted_on_the_same_socket_continues_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let store = phantom_store(dir.path(), 3, "40,56,56");
    let sock = dir.path().join("pf.sock");
    let endpoint = format!("unix:{}", sock.display());

    // Reference: one daemon, never interrupted.
    let mut reference_daemon = daemon(&store, &sock);
    let client = Client::connect([endpoint.as_str()], options())
        .await
        .unwrap();
    let mut stream = client.stream(config()).await.unwrap();
    let mut reference = Vec::new();
    for _ in 0..TOTAL {
        reference.push(fingerprint(&stream.next().await.unwrap()));
    }
    drop(stream);
    drop(client);
    reference_daemon.kill().unwrap();
    reference_daemon.wait().unwrap();

    // Interrupted: SIGKILL after some batches, then a new daemon on the same socket.
    let mut first = daemon(&store, &sock);
    let client = Client::connect([endpoint.as_str()], options())
        .await
        .unwrap();
    let mut stream = client.stream(config()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..KILL_AFTER {
        got.push(fingerprint(&stream.next().await.unwrap()));
    }
    first.kill().unwrap(); // SIGKILL: no graceful shutdown, the socket file stays behind
    let status = first.wait().unwrap();
    assert!(!status.success());
    let mut second = daemon(&store, &sock);
    for _ in KILL_AFTER..TOTAL {
        got.push(fingerprint(&stream.next().await.unwrap()));
    }
    second.kill().unwrap();
    second.wait().unwrap();

    let indices: Vec<u64> = got.iter().map(|f| f.0).collect();
    assert_eq!(
        indices,
        (0..TOTAL as u64).collect::<Vec<_>>(),
        "skipped or repeated"
    );
    assert_eq!(got, reference);
}

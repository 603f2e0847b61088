//! Three daemons serve one store; one is killed (SIGKILL) in the middle of a stream. Its
//! batches go to the other two at once, so the trainer's sequence equals that of one daemon
//! never disturbed, bit for bit, and no batch waits longer than the bound the client's timeouts
//! give. The killed daemon is started again and gets work again: the other two are killed, and
//! the sequence goes on from it alone.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{Fingerprint, fingerprint, phantom_store, s, unix_daemon};
use patchflow_client::{Batch, BatchStream, Client, ClientOptions, StreamConfig};

/// `patchflow serve STORE` on the Unix socket `sock` only, its shared-memory slots in `shm`.
fn daemon(store: &Path, sock: &Path, shm: &Path) -> Child {
    unix_daemon(store, sock, &["--shm-dir", s(shm)])
}

/// A daemon that hangs is left after `batch_timeout`; one that dies is noticed at once.
const BATCH_TIMEOUT: Duration = Duration::from_secs(4);

fn options() -> ClientOptions {
    ClientOptions {
        // Also how long connect waits for a daemon that is starting.
        max_attempts: 50,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        batch_timeout: BATCH_TIMEOUT,
        prefetch: 3,
        ..Default::default()
    }
}

/// The longest a batch may take: a hung daemon's timeout, one connection attempt to a dead
/// one, and a generous allowance for a healthy daemon to cut the batch on a loaded machine.
fn wait_bound() -> Duration {
    let o = options();
    o.batch_timeout + o.connect_timeout + Duration::from_secs(4)
}

fn config() -> StreamConfig {
    let mut c = StreamConfig::new("store", [24, 32, 32], 2);
    c.seed = 31;
    c
}

/// Waits for the next batch, recording the longest wait.
async fn next(stream: &mut BatchStream, longest: &mut Duration) -> Batch {
    let since = Instant::now();
    let batch = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("no batch within 60 s")
        .expect("the stream goes on");
    *longest = (*longest).max(since.elapsed());
    batch
}

const TOTAL: usize = 48;
const KILL_AT: usize = 10;
const RESTART_AT: usize = 22;
const ALONE_AT: usize = 34;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_s_batches_go_to_the_others_and_the_sequence_stays_identical() {
    let dir = tempfile::tempdir().unwrap();
    let store = phantom_store(dir.path(), 3, "40,56,56");
    let shm = dir.path().join("shm");
    std::fs::create_dir(&shm).unwrap();
    let socks: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("pf{i}.sock")))
        .collect();
    let endpoints: Vec<String> = socks
        .iter()
        .map(|p| format!("unix:{}", p.display()))
        .collect();
    let mut daemons: Vec<Child> = socks.iter().map(|p| daemon(&store, p, &shm)).collect();

    // Reference: one daemon, never disturbed.
    let client = Client::connect([endpoints[0].as_str()], options())
        .await
        .unwrap();
    let mut stream = client.stream(config()).await.unwrap();
    let mut ignored = Duration::ZERO;
    let mut reference = Vec::new();
    for _ in 0..TOTAL {
        reference.push(fingerprint(&next(&mut stream, &mut ignored).await));
    }
    drop(stream);
    drop(client);

    // Three daemons; daemon 1 is killed after KILL_AT batches and started again later. The
    // batches are kept until the end: those that came through a killed daemon's shared memory
    // stay valid.
    let client = Client::connect(endpoints.iter(), options()).await.unwrap();
    let mut stream = client.stream(config()).await.unwrap();
    let mut longest = Duration::ZERO;
    let mut got = Vec::new();
    for i in 0..TOTAL {
        if i == KILL_AT {
            daemons[1].kill().unwrap(); // SIGKILL: no goodbye, the socket file stays behind
            assert!(!daemons[1].wait().unwrap().success());
        }
        if i == RESTART_AT {
            daemons[1] = daemon(&store, &socks[1], &shm);
            // Connecting waits until it listens (retrying), so it is up before the others go.
            Client::connect([endpoints[1].as_str()], options())
                .await
                .expect("the restarted daemon answers");
        }
        if i == ALONE_AT {
            // Only the restarted daemon is left: every lane must move to it.
            for d in [0, 2] {
                daemons[d].kill().unwrap();
                daemons[d].wait().unwrap();
            }
        }
        got.push(next(&mut stream, &mut longest).await);
    }
    drop(stream);
    drop(client);
    daemons[1].kill().unwrap();
    daemons[1].wait().unwrap();

    let got: Vec<Fingerprint> = got.iter().map(fingerprint).collect();
    let indices: Vec<u64> = got.iter().map(|f| f.0).collect();
    assert_eq!(
        indices,
        (0..TOTAL as u64).collect::<Vec<_>>(),
        "skipped or repeated"
    );
    assert_eq!(
        got, reference,
        "the batches differ from the undisturbed run"
    );
    let bound = wait_bound();
    assert!(
        longest < bound,
        "a batch took {longest:?}, beyond the bound of {bound:?}"
    );
    eprintln!("longest wait for a batch: {longest:?} (bound {bound:?})");
}

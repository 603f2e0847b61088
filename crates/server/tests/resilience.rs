//! Failures: broken connections, restarted daemons, clients that vanish, shutdown.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::{Fixture, client_options, open_sample, serve, wait_live, within};
use patchflow_client::{Batch, Client, ClientError, StreamConfig};
use patchflow_proto::v1 as pb;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Code;

/// A TCP relay between clients and a daemon whose target can be switched and whose
/// connections can all be cut at once, as a network failure or a daemon restart would.
struct Relay {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    cut: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let cut = watch::Sender::new(0u64);
        let shared = Arc::clone(&target);
        let cuts = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let to = *shared.lock().unwrap();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    // A refused upstream connection closes the client's connection at once.
                    let Ok(mut outbound) = TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Relay {
            addr,
            target,
            cut,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// New connections go to `target`.
    fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    /// Drops every open connection.
    fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn take(stream: &mut patchflow_client::BatchStream, n: usize) -> Vec<Batch> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(within("next batch", stream.next()).await.expect("batch"));
    }
    out
}

fn config(fx: &Fixture) -> StreamConfig {
    let mut config = StreamConfig::new(&fx.name, [7, 5, 6], 2);
    config.seed = 1234;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_to_a_restarted_daemon_continues_the_sequence() {
    let fx = Fixture::new();
    let a = serve(&fx, 2).await;
    let b = serve(&fx, 1).await;
    let reference = {
        let client = Client::connect([a.endpoint().unwrap()], client_options())
            .await
            .unwrap();
        let mut stream = client.stream(config(&fx)).await.unwrap();
        take(&mut stream, 12).await
    };
    wait_live(&a, 0).await;

    let relay = Relay::start(a.local_addr().unwrap()).await;
    let client = Client::connect([relay.endpoint()], client_options())
        .await
        .unwrap();
    let mut stream = client.stream(config(&fx)).await.unwrap();
    let mut got = take(&mut stream, 4).await;
    wait_live(&a, 1).await;

    // "Restart" the daemon elsewhere: new connections reach B, the old ones die.
    relay.retarget(b.local_addr().unwrap());
    relay.cut_all();
    wait_live(&a, 0).await;
    got.extend(take(&mut stream, 5).await);

    // A second failure, back to A.
    relay.retarget(a.local_addr().unwrap());
    relay.cut_all();
    got.extend(take(&mut stream, 3).await);
    assert_eq!(got.len(), reference.len());
    for (k, (g, r)) in got.iter().zip(&reference).enumerate() {
        assert_eq!(g.index, k as u64);
        assert_eq!(g, r, "batch {k} differs after reconnecting");
        fx.check_batch(g, [7, 5, 6], 2);
    }
    assert!(b.metrics().batches > 0, "B served part of the sequence");
    drop(stream);
    wait_live(&a, 0).await;
    wait_live(&b, 0).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_stays_away_makes_the_stream_give_up_clearly() {
    let fx = Fixture::new();
    let server = serve(&fx, 1).await;
    let relay = Relay::start(server.local_addr().unwrap()).await;
    let options = patchflow_client::ClientOptions {
        max_attempts: 3,
        ..client_options()
    };
    let client = Client::connect([relay.endpoint()], options).await.unwrap();
    let mut stream = client.stream(config(&fx)).await.unwrap();
    take(&mut stream, 2).await;

    // Point the relay at a port nobody listens on, then cut.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    relay.retarget(dead);
    relay.cut_all();
    // Batches already received are still handed out; then the stream gives up.
    let mut error = None;
    for _ in 0..16 {
        match within("next batch", stream.next()).await {
            Ok(batch) => assert!(batch.index < 2 + 16),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let error = error.expect("the stream gives up");
    match &error {
        ClientError::GaveUp {
            endpoint, attempts, ..
        } => {
            assert_eq!(endpoint, &relay.endpoint());
            assert_eq!(*attempts, 4);
        }
        other => panic!("expected GaveUp, got {other:?}"),
    }
    let text = error.to_string();
    assert!(text.contains("gave up after 4 attempts"), "{text}");
    // The error sticks until the stream is reconfigured.
    assert_eq!(stream.next().await.unwrap_err().to_string(), text);

    // Once the daemon is reachable again, a reconfiguration resumes at the same index.
    relay.retarget(server.local_addr().unwrap());
    let next = stream.next_index();
    stream.reconfigure(config(&fx)).unwrap();
    let batch = within("next batch", stream.next()).await.unwrap();
    assert_eq!(batch.index, next);
    fx.check_batch(&batch, [7, 5, 6], 2);
    drop(stream);
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_go_away_free_their_streams() {
    let fx = Fixture::new();
    let server = serve(&fx, 2).await;
    let endpoint = server.endpoint().unwrap();

    // A well-behaved client that stops mid-stream.
    let client = Client::connect([endpoint.clone()], client_options())
        .await
        .unwrap();
    let mut stream = client.stream(config(&fx)).await.unwrap();
    take(&mut stream, 2).await;
    wait_live(&server, 1).await;
    drop(stream);
    wait_live(&server, 0).await;

    // A client that grants many credits, never reads, then drops the whole connection.
    let mut raw = pb::patchflow_client::PatchflowClient::connect(endpoint.clone())
        .await
        .unwrap();
    let first = pb::SampleRequest {
        config: Some(fx.sample_config([12, 12, 12], 4)),
        credits: 64,
        ..Default::default()
    };
    let (tx, inbound) = open_sample(&mut raw, first).await.unwrap();
    wait_live(&server, 1).await;
    drop(inbound);
    drop(tx);
    drop(raw);
    wait_live(&server, 0).await;
    assert_eq!(server.metrics().live_streams, 0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_with_unavailable() {
    let fx = Fixture::new();
    let server = serve(&fx, 1).await;
    let mut raw = pb::patchflow_client::PatchflowClient::connect(server.endpoint().unwrap())
        .await
        .unwrap();
    let first = pb::SampleRequest {
        config: Some(fx.sample_config([4, 4, 4], 1)),
        credits: 2,
        ..Default::default()
    };
    let (tx, mut inbound) = open_sample(&mut raw, first).await.unwrap();
    assert!(
        within("first batch", inbound.message())
            .await
            .unwrap()
            .is_some()
    );
    wait_live(&server, 1).await;
    let stopping = tokio::spawn(server.shutdown());
    let status = loop {
        match within("stream end", inbound.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    within("shutdown", stopping).await.unwrap().unwrap();
    drop(tx);
}

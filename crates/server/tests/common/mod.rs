//! Shared fixtures of the server tests: a synthetic store written in a temporary folder from
//! arrays kept in memory, servers on ephemeral ports, and a naive reference crop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use half::{bf16, f16};
use patchflow_client::{Batch, ImageDtype, LabelDtype};
use patchflow_proto::v1 as pb;
use patchflow_server::{Limits, RunningServer, ServerConfig};
pub use patchflow_testkit::synthetic::MemCase;
use patchflow_testkit::synthetic::{make_case, write_store};
use tokio::sync::mpsc::UnboundedSender;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// A client of the generated gRPC API, for requests the Rust client would never send.
pub type Raw = pb::patchflow_client::PatchflowClient<tonic::transport::Channel>;

/// Opens a Sample stream on `raw` whose first message is `first`. The request side stays open
/// while the returned sender lives (as a client waiting for batches keeps it).
pub async fn open_sample(
    raw: &mut Raw,
    first: pb::SampleRequest,
) -> Result<
    (
        UnboundedSender<pb::SampleRequest>,
        tonic::Streaming<pb::SampleResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(first)
        .map_err(|_| tonic::Status::internal("request channel closed"))?;
    let inbound = raw
        .sample(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

/// Opens a Sample stream whose first message is `first` and returns the stream's first answer
/// (an error when it ends without one).
pub async fn first_answer(
    raw: &mut Raw,
    first: pb::SampleRequest,
) -> Result<pb::SampleResponse, tonic::Status> {
    let (tx, mut inbound) = open_sample(raw, first).await?;
    let answer = within("first answer", inbound.message()).await;
    drop(tx);
    answer?.ok_or_else(|| tonic::Status::unknown("the stream ended without a message"))
}

/// Upper bound for anything a test waits on, so that a bug fails the test instead of hanging it.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// Awaits `fut`, failing the test if it does not complete within [`HANG_GUARD`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not complete within {HANG_GUARD:?}"),
    }
}

/// A store folder with its in-memory copy.
pub struct Fixture {
    pub root: tempfile::TempDir,
    /// The store folder; the dataset is named after it.
    pub store: PathBuf,
    pub name: String,
    pub cases: BTreeMap<String, MemCase>,
}

impl Fixture {
    /// Three cases of different shapes, two with class 2.
    pub fn new() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let name = "Dataset900_Synthetic".to_string();
        let store = root.path().join(&name);
        let cases = [
            make_case("case_a", [12, 14, 16], 11, Some(2)),
            make_case("case_b", [10, 17, 13], 23, None),
            make_case("case_c", [15, 9, 11], 37, Some(2)),
        ];
        write_store(&store, &cases);
        Fixture {
            root,
            store,
            name,
            cases: cases.into_iter().map(|c| (c.meta.id.clone(), c)).collect(),
        }
    }

    /// A configuration of the fixture's dataset: `patch`, `batch` items, the rest default.
    pub fn sample_config(&self, patch: [i64; 3], batch: u32) -> pb::SampleConfig {
        pb::SampleConfig {
            dataset: self.name.clone(),
            patch_size: patch.to_vec(),
            batch_size: batch,
            ..Default::default()
        }
    }

    /// Writes a second, one-case store named `name` next to the fixture's and returns its path.
    pub fn add_store(&self, name: &str) -> PathBuf {
        let dir = self.root.path().join(name);
        write_store(&dir, &[make_case("only", [8, 9, 10], 5, None)]);
        dir
    }

    /// Checks every voxel of `batch` against a naive crop of the in-memory arrays at the
    /// origins the batch reports: normalisation applied, image padding 0, label padding the
    /// ignore value.
    pub fn check_batch(&self, batch: &Batch, patch: [usize; 3], batch_size: usize) {
        assert_eq!(batch.patch, patch, "batch {}", batch.index);
        assert_eq!(batch.batch_size, batch_size);
        assert_eq!(batch.items.len(), batch_size);
        assert_eq!(batch.channels, 2);
        assert_eq!(batch.label_dtype, LabelDtype::U8);
        assert_eq!(batch.ignore_label, 255);
        let esize = match batch.dtype {
            ImageDtype::F32 => 4,
            ImageDtype::F16 | ImageDtype::Bf16 => 2,
            ImageDtype::Unspecified => panic!("unspecified dtype"),
        };
        let voxels = patch.iter().product::<usize>();
        assert_eq!(batch.image.len(), batch_size * 2 * voxels * esize);
        assert_eq!(batch.label.len(), batch_size * voxels);
        let mut padded = 0usize;
        for (b, item) in batch.items.iter().enumerate() {
            let case = self
                .cases
                .get(&item.case_id)
                .unwrap_or_else(|| panic!("unknown case {}", item.case_id));
            let sorted: Vec<&String> = self.cases.keys().collect();
            assert_eq!(sorted[item.case_index], &item.case_id);
            if item.forced_foreground {
                assert!(matches!(item.class, Some(1 | 2)), "{item:?}");
            }
            let [oz, oy, ox] = item.origin;
            let mut i = 0usize;
            for z in 0..patch[0] as i64 {
                for y in 0..patch[1] as i64 {
                    for x in 0..patch[2] as i64 {
                        let src = case.index(oz + z, oy + y, ox + x);
                        let want_label = src.map_or(255u8, |s| case.label.get(s) as u8);
                        assert_eq!(
                            batch.label[b * voxels + i],
                            want_label,
                            "label of item {b} at {:?}",
                            [z, y, x]
                        );
                        for (c, channel) in case.channels.iter().enumerate() {
                            let want = src.map_or(0.0f32, |s| {
                                case.meta.channels[c].norm.apply(channel.get_f64(s) as f32)
                            });
                            let at = ((b * 2 + c) * voxels + i) * esize;
                            let got = &batch.image[at..at + esize];
                            let want_bytes: Vec<u8> = match batch.dtype {
                                ImageDtype::F32 => want.to_le_bytes().to_vec(),
                                ImageDtype::F16 => f16::from_f32(want).to_le_bytes().to_vec(),
                                _ => bf16::from_f32(want).to_le_bytes().to_vec(),
                            };
                            assert_eq!(
                                got,
                                want_bytes.as_slice(),
                                "image of item {b} channel {c} at {:?} (origin {:?})",
                                [z, y, x],
                                item.origin
                            );
                        }
                        padded += usize::from(src.is_none());
                        i += 1;
                    }
                }
            }
        }
        let _ = padded;
    }
}

/// A server configuration for tests: ephemeral ports, small cache.
pub fn config(stores: Vec<PathBuf>, workers: usize, limits: Limits) -> ServerConfig {
    ServerConfig {
        stores,
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        unix: None,
        workers,
        cache_mb: 8,
        metrics: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        limits,
        shutdown_grace: Duration::from_secs(30),
        ..ServerConfig::default()
    }
}

/// Starts a server on the fixture's store.
pub async fn serve(fx: &Fixture, workers: usize) -> RunningServer {
    serve_with(fx, workers, Limits::default()).await
}

/// Starts a server on the fixture's store with `limits`.
pub async fn serve_with(fx: &Fixture, workers: usize, limits: Limits) -> RunningServer {
    patchflow_server::start(config(vec![fx.store.clone()], workers, limits))
        .await
        .expect("server starts")
}

/// Client options for tests: quick reconnection.
pub fn client_options() -> patchflow_client::ClientOptions {
    patchflow_client::ClientOptions {
        prefetch: 3,
        max_attempts: 20,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(200),
        ..patchflow_client::ClientOptions::default()
    }
}

/// The raw HTTP answer (status line, headers and body) of `GET path` on `addr`, e.g. the
/// metrics endpoint.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    within("http answer", stream.read_to_string(&mut out))
        .await
        .unwrap();
    out
}

/// The daemon's Prometheus text, as its metrics endpoint answers it.
pub async fn metrics_text(server: &RunningServer) -> String {
    http_get(
        server.metrics_addr().expect("a metrics listener"),
        "/metrics",
    )
    .await
}

/// Waits until the server reports `n` live streams.
pub async fn wait_live(server: &RunningServer, n: usize) {
    let mut live = server.live_streams();
    within("live streams gauge", live.wait_for(|&v| v == n))
        .await
        .expect("gauge channel open");
}

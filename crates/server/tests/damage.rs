//! Damaged stored data met while serving: the stream that meets it ends with DATA_LOSS, the
//! case is set aside and reported, and every later batch of every stream comes from the other
//! cases.
//!
//! The daemon runs without a chunk cache, so every read decodes from the mapped case file, and
//! the tests damage the files on disk while it serves (the mapping is shared, so the daemon
//! sees the new bytes at once).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{Fixture, client_options, config, metrics_text, open_sample, wait_live, within};
use patchflow_client::{Batch, BatchStream, Client, ClientError, ImageDtype, Item, LabelDtype};
use patchflow_proto::v1 as pb;
use patchflow_server::{Limits, RunningServer};
use tokio::sync::mpsc;
use tonic::Code;
use xxhash_rust::xxh3::xxh3_64;

/// Batches a stream may deliver before it is expected to have met the damage.
const MAX_BATCHES_BEFORE_DAMAGE: usize = 400;

const PATCH: [usize; 3] = [5, 6, 7];
const BATCH: usize = 2;

/// Starts a daemon on the fixture's store with the chunk cache off.
async fn serve_uncached(fx: &Fixture) -> RunningServer {
    let mut config = config(vec![fx.store.clone()], 2, Limits::default());
    config.cache_mb = 0;
    patchflow_server::start(config)
        .await
        .expect("server starts")
}

fn case_file(fx: &Fixture, id: &str) -> PathBuf {
    fx.store.join(patchflow_store::case_file_name(id))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// A stored chunk of a case file (see crates/store/FORMAT.md).
struct Payload {
    /// Byte offset of its index entry.
    entry: usize,
    /// 1 zstd, 2 raw.
    kind: u8,
    offset: usize,
    len: usize,
}

const INDEX_OFFSET_AT: usize = 40;
const INDEX_LEN_AT: usize = 48;
const INDEX_CHECKSUM_AT: usize = 56;
const PREAMBLE_CHECKSUM_AT: usize = 120;
const ENTRY_LEN: usize = 32;
const KIND_ZSTD: u8 = 1;
const KIND_RAW: u8 = 2;

/// Every chunk of `bytes` (a case file) that has a payload.
fn payloads(bytes: &[u8]) -> Vec<Payload> {
    let index = u64_at(bytes, INDEX_OFFSET_AT) as usize;
    let len = u64_at(bytes, INDEX_LEN_AT) as usize;
    assert_eq!(len % ENTRY_LEN, 0);
    (index..index + len)
        .step_by(ENTRY_LEN)
        .filter(|&e| matches!(bytes[e], KIND_ZSTD | KIND_RAW))
        .map(|e| Payload {
            entry: e,
            kind: bytes[e],
            offset: u64_at(bytes, e + 8) as usize,
            len: u64_at(bytes, e + 16) as usize,
        })
        .collect()
}

/// Flips a byte in the middle of every stored payload of `file`, in place (the file is never
/// replaced, so a daemon that maps it reads the damaged bytes). Returns the payloads damaged.
fn flip_payload_bytes(file: &Path) -> usize {
    let bytes = std::fs::read(file).unwrap();
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let found = payloads(&bytes);
    for p in &found {
        let at = p.offset + p.len / 2;
        handle.write_all_at(&[bytes[at] ^ 0x5a], at as u64).unwrap();
    }
    handle.sync_data().unwrap();
    assert!(!found.is_empty(), "{} has stored chunks", file.display());
    found.len()
}

/// Makes every zstd payload of `file` undecodable while keeping every checksum valid (entry,
/// index section and preamble checksums are recomputed), as a faulty writer would leave it.
fn make_zstd_undecodable(file: &Path) -> usize {
    let mut bytes = std::fs::read(file).unwrap();
    let zstd: Vec<Payload> = payloads(&bytes)
        .into_iter()
        .filter(|p| p.kind == KIND_ZSTD)
        .collect();
    assert!(!zstd.is_empty(), "{} has zstd chunks", file.display());
    for p in &zstd {
        // No zstd frame starts with zero bytes.
        bytes[p.offset..p.offset + 4].fill(0);
        let sum = xxh3_64(&bytes[p.offset..p.offset + p.len]);
        bytes[p.entry + 24..p.entry + 32].copy_from_slice(&sum.to_le_bytes());
    }
    let index = u64_at(&bytes, INDEX_OFFSET_AT) as usize;
    let len = u64_at(&bytes, INDEX_LEN_AT) as usize;
    let sum = xxh3_64(&bytes[index..index + len]);
    bytes[INDEX_CHECKSUM_AT..INDEX_CHECKSUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
    let sum = xxh3_64(&bytes[..PREAMBLE_CHECKSUM_AT]);
    bytes[PREAMBLE_CHECKSUM_AT..PREAMBLE_CHECKSUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(file, &bytes).unwrap();
    zstd.len()
}

fn stream_config(fx: &Fixture, seed: u64, cases: &[&str]) -> patchflow_client::StreamConfig {
    let mut config =
        patchflow_client::StreamConfig::new(&fx.name, PATCH.map(|p| p as i64), BATCH as u32);
    config.seed = seed;
    config.cases = cases.iter().map(|c| c.to_string()).collect();
    config
}

/// Pulls batches (each checked voxel by voxel) until the stream fails; returns the error.
async fn until_error(fx: &Fixture, stream: &mut BatchStream) -> ClientError {
    for _ in 0..MAX_BATCHES_BEFORE_DAMAGE {
        match within("next batch", stream.next()).await {
            Ok(batch) => fx.check_batch(&batch, PATCH, BATCH),
            Err(e) => return e,
        }
    }
    panic!("no error within {MAX_BATCHES_BEFORE_DAMAGE} batches");
}

/// Pulls `n` batches, checks them voxel by voxel and returns the case ids they hold.
async fn case_ids(fx: &Fixture, stream: &mut BatchStream, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let batch = within("next batch", stream.next()).await.expect("batch");
        fx.check_batch(&batch, PATCH, BATCH);
        ids.extend(batch.items.into_iter().map(|i| i.case_id));
    }
    ids
}

fn assert_data_loss_naming(err: &ClientError, case: &str) {
    assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
    let message = err.message().unwrap_or_default();
    assert!(message.contains(case), "{err}");
    assert!(message.contains("set aside"), "{err}");
}

fn set_aside_ids(cases: &[pb::SetAsideCase]) -> Vec<&str> {
    cases.iter().map(|c| c.id.as_str()).collect()
}

/// A Sample stream driven message by message, with credits granted by the test only.
struct RawStream {
    tx: mpsc::UnboundedSender<pb::SampleRequest>,
    inbound: tonic::Streaming<pb::SampleResponse>,
}

impl RawStream {
    async fn open(endpoint: &str, config: pb::SampleConfig) -> RawStream {
        let mut raw = pb::patchflow_client::PatchflowClient::connect(endpoint.to_owned())
            .await
            .unwrap();
        let first = pb::SampleRequest {
            config: Some(config),
            credits: 0,
            ..Default::default()
        };
        let (tx, inbound) = open_sample(&mut raw, first).await.unwrap();
        RawStream { tx, inbound }
    }

    /// Grants `n` credits and receives the `n` batches.
    async fn take(&mut self, n: u32) -> Result<Vec<Batch>, tonic::Status> {
        self.tx
            .send(pb::SampleRequest {
                config: None,
                credits: n,
                ..Default::default()
            })
            .unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let msg = within("raw batch", self.inbound.message())
                .await?
                .expect("the stream stays open");
            out.push(single_part_batch(msg));
        }
        Ok(out)
    }
}

/// The batch of a response that holds a whole batch.
fn single_part_batch(msg: pb::SampleResponse) -> Batch {
    assert_eq!(
        (msg.part, msg.parts),
        (0, 1),
        "small batches are one message"
    );
    let header = msg.header.expect("part 0 has the header");
    Batch {
        index: msg.index,
        patch: [0, 1, 2].map(|a| header.patch_size[a] as usize),
        batch_size: header.batch_size as usize,
        channels: header.channels as usize,
        dtype: ImageDtype::try_from(header.dtype).unwrap(),
        label_dtype: LabelDtype::try_from(header.label_dtype).unwrap(),
        ignore_label: header.ignore_label as u16,
        image: msg.image,
        label: msg.label,
        items: header
            .items
            .into_iter()
            .map(|i| Item {
                case_id: i.case_id,
                case_index: i.case_index as usize,
                origin: [i.origin[0], i.origin[1], i.origin[2]],
                forced_foreground: i.forced_foreground,
                class: i.class_value.map(|c| c as u16),
                augment_json: None,
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_damaged_while_serving_is_set_aside_and_reported() {
    let fx = Fixture::new();
    let server = serve_uncached(&fx).await;
    let endpoint = server.endpoint().unwrap();
    let client = Client::connect([endpoint.clone()], client_options())
        .await
        .unwrap();

    // A stream on every case that stays idle (no credits) while the damage is met.
    let mut idle = RawStream::open(
        &endpoint,
        pb::SampleConfig {
            dataset: fx.name.clone(),
            patch_size: PATCH.iter().map(|&p| p as i64).collect(),
            batch_size: BATCH as u32,
            seed: 5,
            ..Default::default()
        },
    )
    .await;
    let before = idle.take(4).await.unwrap();
    for batch in &before {
        fx.check_batch(batch, PATCH, BATCH);
    }
    // A stream restricted to the other cases, running throughout.
    let mut shard = client
        .stream(stream_config(&fx, 6, &["case_a", "case_c"]))
        .await
        .unwrap();
    let ids = case_ids(&fx, &mut shard, 3).await;
    assert!(ids.iter().all(|id| id != "case_b"), "{ids:?}");
    // The stream that will meet the damage, reading case_b before it.
    let mut victim = client.stream(stream_config(&fx, 7, &[])).await.unwrap();
    let mut seen = Vec::new();
    while !seen.iter().any(|id| id == "case_b") {
        assert!(seen.len() < MAX_BATCHES_BEFORE_DAMAGE, "case_b is drawn");
        seen.extend(case_ids(&fx, &mut victim, 1).await);
    }

    let damaged = flip_payload_bytes(&case_file(&fx, "case_b"));
    assert!(damaged > 0);
    let err = until_error(&fx, &mut victim).await;
    assert_data_loss_naming(&err, "case_b");
    // Usually the checksum catches the flipped bytes; a chunk being decoded while its bytes
    // change under the mapping can instead fail to decode after its checksum passed.
    let message = err.message().unwrap_or_default();
    assert!(
        message.contains("checksum mismatch") || message.contains("does not decode"),
        "{err}"
    );

    // Reported: DescribeDataset and ListDatasets list it, the stored count stays.
    let description = client.describe(&fx.name).await.unwrap();
    assert_eq!(description.cases.len(), 3);
    assert_eq!(set_aside_ids(&description.set_aside), ["case_b"]);
    let entry = &description.set_aside[0];
    assert_eq!(entry.case_index, 1);
    assert_eq!(description.cases[1].id, "case_b");
    assert!(entry.reason.contains("checksum mismatch"), "{entry:?}");
    let listed = client.list_datasets().await.unwrap();
    let summary = listed
        .datasets
        .iter()
        .find(|d| d.name == fx.name)
        .expect("dataset listed");
    assert_eq!(summary.num_cases, 3);
    assert_eq!(summary.set_aside, description.set_aside);
    // ... and in the metrics.
    assert_eq!(server.metrics().cases_set_aside, 1);
    let text = metrics_text(&server).await;
    assert!(
        text.contains("\npatchflow_cases_set_aside_total 1\n"),
        "{text}"
    );
    let gauge = format!(
        "\npatchflow_dataset_cases_set_aside{{dataset=\"{}\"}} 1\n",
        fx.name
    );
    assert!(text.contains(&gauge), "{text}");

    // A new stream never draws case_b, and every patch is right.
    let mut fresh = client.stream(stream_config(&fx, 7, &[])).await.unwrap();
    let ids = case_ids(&fx, &mut fresh, 60).await;
    assert!(ids.iter().all(|id| id != "case_b"), "{ids:?}");
    assert!(ids.iter().any(|id| id == "case_a") && ids.iter().any(|id| id == "case_c"));
    // A list naming case_b among others draws from the others.
    let mut mixed = client
        .stream(stream_config(&fx, 8, &["case_b", "case_c"]))
        .await
        .unwrap();
    let ids = case_ids(&fx, &mut mixed, 10).await;
    assert!(ids.iter().all(|id| id == "case_c"), "{ids:?}");
    // The stream that was idle draws from the other cases from now on.
    let after = idle.take(30).await.unwrap();
    for (k, batch) in after.iter().enumerate() {
        assert_eq!(batch.index, (before.len() + k) as u64);
        fx.check_batch(batch, PATCH, BATCH);
        assert!(batch.items.iter().all(|i| i.case_id != "case_b"));
    }
    // The stream on the other cases was never disturbed.
    let ids = case_ids(&fx, &mut shard, 20).await;
    assert!(ids.iter().all(|id| id != "case_b"), "{ids:?}");
    // A request for case_b alone is refused, naming it.
    let mut only_b = client
        .stream(stream_config(&fx, 9, &["case_b"]))
        .await
        .unwrap();
    let err = within("refusal", only_b.next()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    let message = err.message().unwrap_or_default();
    assert!(
        message.contains("every requested case is set aside") && message.contains("case_b"),
        "{err}"
    );
    assert_eq!(server.metrics().cases_set_aside, 1, "reported once");

    drop((idle, shard, fresh, mixed, only_b, victim));
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_chunks_set_cases_aside_until_none_is_left() {
    let fx = Fixture::new();
    // A case written with chunks that pass their checksums but do not decode.
    make_zstd_undecodable(&case_file(&fx, "case_c"));
    let server = serve_uncached(&fx).await;
    let client = Client::connect([server.endpoint().unwrap()], client_options())
        .await
        .unwrap();
    let mut first = client.stream(stream_config(&fx, 11, &[])).await.unwrap();
    let err = until_error(&fx, &mut first).await;
    assert_data_loss_naming(&err, "case_c");
    assert!(
        err.message()
            .unwrap_or_default()
            .contains("does not decode"),
        "{err}"
    );
    let description = client.describe(&fx.name).await.unwrap();
    assert_eq!(set_aside_ids(&description.set_aside), ["case_c"]);
    assert_eq!(description.set_aside[0].case_index, 2);
    assert!(
        description.set_aside[0].reason.contains("does not decode"),
        "{:?}",
        description.set_aside
    );

    // Damage the two other cases too: streams end one by one until nothing can be served.
    flip_payload_bytes(&case_file(&fx, "case_a"));
    flip_payload_bytes(&case_file(&fx, "case_b"));
    let mut refused = None;
    for seed in 12..20 {
        let mut stream = client.stream(stream_config(&fx, seed, &[])).await.unwrap();
        let err = until_error(&fx, &mut stream).await;
        assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
        let message = err.message().unwrap_or_default();
        if message.contains("every case is set aside") {
            refused = Some(err);
            break;
        }
        assert!(
            message.contains("case_a") || message.contains("case_b"),
            "{err}"
        );
    }
    let err = refused.expect("the dataset ends up with every case set aside");
    let message = err.message().unwrap_or_default();
    for id in ["case_a", "case_b", "case_c"] {
        assert!(message.contains(id), "{err}");
    }
    // An explicit list is refused the same way once the whole dataset is gone.
    let mut only_a = client
        .stream(stream_config(&fx, 30, &["case_a"]))
        .await
        .unwrap();
    let err = within("refusal", only_a.next()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
    let listed = client.list_datasets().await.unwrap();
    assert_eq!(listed.datasets[0].num_cases, 3);
    assert_eq!(
        set_aside_ids(&listed.datasets[0].set_aside),
        ["case_a", "case_b", "case_c"]
    );
    assert_eq!(server.metrics().cases_set_aside, 3);
    drop((first, only_a));
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}

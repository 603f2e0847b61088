//! The daemon over stores in object storage (`s3://bucket/prefix`), against a real
//! S3-compatible server (moto on 127.0.0.1; skipped with a message where moto is not
//! installed): every served voxel equals a plain crop of the arrays the store was written
//! from, a prefix of stores serves each as a dataset, and a damaged chunk ends the stream that
//! meets it with DATA_LOSS and sets the case aside, as for a local store.

mod common;

use std::path::PathBuf;

use common::{Fixture, client_options, config, within};
use patchflow_client::{Client, StreamConfig};
use patchflow_server::Limits;
use patchflow_store::StoreLocation;
use patchflow_testkit::moto::MotoServer;
use patchflow_testkit::synthetic::{make_case, write_store};
use tonic::Code;

const PATCH: [usize; 3] = [5, 6, 7];
const BATCH: usize = 2;

/// The fixture's three cases (the same arrays) written to `s3://BUCKET/stores/Dataset900_Synthetic`.
fn s3_fixture(server: &MotoServer) -> (String, Fixture) {
    let local = Fixture::new();
    let bucket = server.bucket("serve");
    let store = PathBuf::from(format!("s3://{bucket}/stores/{}", local.name));
    let made: Vec<_> = local.cases.into_values().collect();
    write_store(&store, &made);
    let fx = Fixture {
        root: local.root,
        store,
        name: local.name,
        cases: made.into_iter().map(|c| (c.meta.id.clone(), c)).collect(),
    };
    (bucket, fx)
}

fn stream_config(fx: &Fixture, seed: u64) -> StreamConfig {
    let mut config = StreamConfig::new(&fx.name, PATCH.map(|p| p as i64), BATCH as u32);
    config.seed = seed;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_an_s3_store_voxel_for_voxel_and_each_store_of_a_prefix() {
    let Some(server) =
        MotoServer::shared("serves_an_s3_store_voxel_for_voxel_and_each_store_of_a_prefix")
    else {
        return;
    };
    let (bucket, fx) = s3_fixture(server);
    // A second store beside it: the prefix `stores` serves both.
    let other = PathBuf::from(format!("s3://{bucket}/stores/Single"));
    write_store(&other, &[make_case("only", [8, 9, 10], 5, None)]);
    let disk = tempfile::tempdir().unwrap();
    let mut cfg = config(
        vec![PathBuf::from(format!("s3://{bucket}/stores"))],
        2,
        Limits::default(),
    );
    cfg.disk_cache = Some(disk.path().to_path_buf());
    cfg.disk_cache_gb = 0.01;
    let running = patchflow_server::start(cfg).await.expect("server starts");
    let client = Client::connect([running.endpoint().unwrap()], client_options())
        .await
        .unwrap();
    let listed = client.list_datasets().await.unwrap();
    let names: Vec<&str> = listed.datasets.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["Dataset900_Synthetic", "Single"]);
    let mut stream = client.stream(stream_config(&fx, 7)).await.unwrap();
    for _ in 0..30 {
        let batch = within("next batch", stream.next()).await.expect("batch");
        fx.check_batch(&batch, PATCH, BATCH);
    }
    drop(stream);
    running.shutdown().await.unwrap();
    assert!(
        std::fs::read_dir(disk.path()).unwrap().count() > 2,
        "fetched chunks were kept on disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_in_s3_is_data_loss_and_its_case_is_set_aside() {
    let Some(server) =
        MotoServer::shared("a_damaged_chunk_in_s3_is_data_loss_and_its_case_is_set_aside")
    else {
        return;
    };
    let (_bucket, fx) = s3_fixture(server);
    // Damage every stored payload of case_b: flip a byte in each (offsets from the index).
    let file = fx.store.join(patchflow_store::case_file_name("case_b"));
    let StoreLocation::S3(loc) = StoreLocation::from_path(&file).unwrap() else {
        unreachable!()
    };
    let mut bytes = patchflow_store::get_object(&loc, u64::MAX)
        .unwrap()
        .unwrap();
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let (index, len) = (u64_at(&bytes, 40) as usize, u64_at(&bytes, 48) as usize);
    let mut damaged = 0;
    for e in (index..index + len).step_by(32) {
        if matches!(bytes[e], 1 | 2) {
            let (off, n) = (
                u64_at(&bytes, e + 8) as usize,
                u64_at(&bytes, e + 16) as usize,
            );
            bytes[off + n / 2] ^= 0x5a;
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    patchflow_store::put_object(&loc, bytes).unwrap();

    let mut cfg = config(vec![fx.store.clone()], 2, Limits::default());
    cfg.cache_mb = 0;
    let running = patchflow_server::start(cfg).await.expect("server starts");
    let client = Client::connect([running.endpoint().unwrap()], client_options())
        .await
        .unwrap();
    let mut stream = client.stream(stream_config(&fx, 3)).await.unwrap();
    let err = loop {
        match within("next batch", stream.next()).await {
            Ok(batch) => fx.check_batch(&batch, PATCH, BATCH),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
    let message = err.message().unwrap_or_default();
    assert!(
        message.contains("case_b") && message.contains("set aside"),
        "{err}"
    );
    let description = client.describe(&fx.name).await.unwrap();
    let aside: Vec<&str> = description
        .set_aside
        .iter()
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(aside, ["case_b"]);
    // A new stream is served from the other cases, voxel for voxel.
    let mut stream = client.stream(stream_config(&fx, 4)).await.unwrap();
    for _ in 0..20 {
        let batch = within("next batch", stream.next()).await.expect("batch");
        assert!(batch.items.iter().all(|i| i.case_id != "case_b"));
        fx.check_batch(&batch, PATCH, BATCH);
    }
    drop(stream);
    running.shutdown().await.unwrap();
}

//! Ingest into object storage (`--out s3://bucket/prefix`) against a real S3-compatible server
//! (moto on 127.0.0.1; skipped with a message where moto is not installed): the store written
//! there holds what a local ingest of the same input holds, byte for byte; a second run skips
//! the unchanged cases; a second writer is refused while the first holds the store; inspect
//! and verify read it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use patchflow_ingest::{IngestOptions, ingest, inspect, verify};
use patchflow_store::{Manifest, ObjectLocation, ObjectLock, StoreLocation};
use patchflow_testkit::moto::MotoServer;
use patchflow_volume::PhantomSpec;

fn options() -> IngestOptions {
    IngestOptions {
        jobs: 2,
        progress: false,
        ..IngestOptions::default()
    }
}

fn object_location(path: &Path) -> ObjectLocation {
    match StoreLocation::from_path(path).unwrap() {
        StoreLocation::S3(loc) => loc,
        StoreLocation::Local(p) => panic!("not an object location: {}", p.display()),
    }
}

fn object(path: &Path) -> Vec<u8> {
    patchflow_store::get_object(&object_location(path), u64::MAX)
        .unwrap()
        .unwrap()
}

#[test]
fn ingest_to_s3_equals_a_local_ingest_and_skips_unchanged_cases() {
    let Some(server) =
        MotoServer::shared("ingest_to_s3_equals_a_local_ingest_and_skips_unchanged_cases")
    else {
        return;
    };
    let bucket = server.bucket("ingest");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let spec = PhantomSpec {
        shape: [24, 40, 40],
        ..PhantomSpec::default()
    };
    patchflow_volume::write_phantom_dataset(&raw, 3, &spec).unwrap();
    let stop = AtomicBool::new(false);

    let local = dir.path().join("Phantom");
    let local_report = ingest(&raw, &local, &options(), &stop).unwrap();
    assert_eq!(local_report.ingested.len(), 3, "{}", local_report.summary());

    let remote = PathBuf::from(format!("s3://{bucket}/datasets/Phantom"));
    let report = ingest(&raw, &remote, &options(), &stop).unwrap();
    assert_eq!(report.ingested.len(), 3, "{}", report.summary());
    assert!(report.failed.is_empty(), "{}", report.summary());

    // The same files, byte for byte (the format does not depend on where it is stored).
    let manifest = Manifest::load(&remote).unwrap().unwrap();
    let local_manifest = Manifest::load(&local).unwrap().unwrap();
    assert_eq!(manifest.cases.len(), 3);
    for (m, l) in manifest.cases.iter().zip(&local_manifest.cases) {
        assert_eq!(m.id, l.id);
        let bytes = object(&remote.join(&m.file));
        assert_eq!(bytes.len() as u64, m.stored_bytes);
        assert!(
            bytes == std::fs::read(local.join(&l.file)).unwrap(),
            "{} differs",
            m.id
        );
    }
    // The writer lock is gone after the run.
    let lock = object_location(&remote.join(".ingest.lock"));
    assert!(patchflow_store::get_object(&lock, 4096).unwrap().is_none());

    // Inspect and verify read the store in object storage.
    let inspected = inspect(&remote, None).unwrap();
    assert_eq!(inspected.cases.len(), 3);
    assert_eq!(
        inspected.total.stored_bytes,
        manifest.cases.iter().map(|c| c.stored_bytes).sum::<u64>()
    );
    assert!(verify(&remote, None).unwrap().is_empty());

    // Nothing changed: nothing is written again.
    let again = ingest(&raw, &remote, &options(), &stop).unwrap();
    assert!(again.ingested.is_empty(), "{}", again.summary());
    assert_eq!(again.skipped.len(), 3);

    // A second writer is refused while the store is held, naming the holder.
    let held = ObjectLock::acquire(&lock, "a test holding the store")
        .unwrap()
        .unwrap();
    let err = ingest(&raw, &remote, &options(), &stop)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another ingest") && err.contains("a test holding the store"),
        "{err}"
    );
    drop(held);

    // A damaged case object is found by verify.
    let file = remote.join(&manifest.cases[1].file);
    let mut bytes = object(&file);
    let at = 200.min(bytes.len() - 1);
    bytes[at] ^= 0x10;
    patchflow_store::put_object(&object_location(&file), bytes).unwrap();
    let failures = verify(&remote, None).unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, manifest.cases[1].id);
}

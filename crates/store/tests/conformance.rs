//! One conformance suite for every storage backend of the store: the same tests run against a
//! local folder and against a real S3-compatible server (moto on 127.0.0.1, skipped with a
//! message where moto is not installed).
//!
//! Each test writes small synthetic cases from arrays kept in memory and checks what the
//! backend gives back: the manifest, every array of every box (padding included) equal to a
//! plain crop of the arrays, class locations, damaged and missing data reported as errors
//! that name the case, chunk or file, the manifest written last, and concurrent readers
//! sharing one small cache. The S3 backend also has tests of its own (request coalescing, the
//! disk cache, multipart uploads).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use patchflow_store::{
    ArrayId, CaseReader, ChunkCache, DiskCache, Manifest, ObjectLocation, StoreError,
    StoreLocation, VoxelData, bucket_stats, case_file_name,
};
use patchflow_testkit::moto::MotoServer;
use patchflow_testkit::synthetic::{
    Lcg, MemCase, crop_ref, locations, make_case, manifest_of, write_cases, write_store,
};

/// Where a test's store lives.
enum Backend {
    Local(tempfile::TempDir),
    S3 { bucket: String },
}

impl Backend {
    fn local() -> Option<Backend> {
        Some(Backend::Local(
            tempfile::tempdir().expect("temporary folder"),
        ))
    }

    fn s3(test: &str) -> Option<Backend> {
        let server = MotoServer::shared(test)?;
        Some(Backend::S3 {
            bucket: server.bucket("conformance"),
        })
    }

    /// The store folder `name`.
    fn store(&self, name: &str) -> PathBuf {
        match self {
            Backend::Local(dir) => dir.path().join(name),
            Backend::S3 { bucket } => PathBuf::from(format!("s3://{bucket}/stores/{name}")),
        }
    }

    fn read(&self, file: &Path) -> Vec<u8> {
        match StoreLocation::from_path(file).unwrap() {
            StoreLocation::Local(p) => std::fs::read(p).unwrap(),
            StoreLocation::S3(o) => patchflow_store::get_object(&o, u64::MAX).unwrap().unwrap(),
        }
    }

    fn write(&self, file: &Path, bytes: Vec<u8>) {
        match StoreLocation::from_path(file).unwrap() {
            StoreLocation::Local(p) => std::fs::write(p, bytes).unwrap(),
            StoreLocation::S3(o) => patchflow_store::put_object(&o, bytes).unwrap(),
        }
    }

    fn remove(&self, file: &Path) {
        match StoreLocation::from_path(file).unwrap() {
            StoreLocation::Local(p) => std::fs::remove_file(p).unwrap(),
            StoreLocation::S3(o) => patchflow_store::delete_object(&o).unwrap(),
        }
    }
}

fn cases() -> Vec<MemCase> {
    vec![
        make_case("case_a", [9, 13, 17], 11, Some(2)),
        make_case("case_b", [7, 11, 10], 12, Some(300)),
    ]
}

fn open(store: &Path, case: &MemCase, cache: &Arc<ChunkCache>) -> CaseReader {
    CaseReader::open(
        &store.join(case_file_name(&case.meta.id)),
        Arc::clone(cache),
    )
    .expect("open case")
}

/// Reads one box of every array and compares it with the crop of the written arrays.
fn check_box(reader: &CaseReader, case: &MemCase, origin: [i64; 3], size: [usize; 3]) {
    let shape = case.meta.shape;
    let n: usize = size.iter().product();
    for (c, data) in case.channels.iter().enumerate() {
        match data {
            VoxelData::I16(v) => {
                let mut out = vec![0i16; n];
                reader
                    .read_box(ArrayId::Image(c), origin, size, -7, &mut out)
                    .unwrap();
                assert_eq!(
                    out,
                    crop_ref(v, shape, origin, size, -7),
                    "{} image {c} at {origin:?} {size:?}",
                    case.meta.id
                );
            }
            VoxelData::F32(v) => {
                let mut out = vec![0f32; n];
                reader
                    .read_box(ArrayId::Image(c), origin, size, 0.5, &mut out)
                    .unwrap();
                let want = crop_ref(v, shape, origin, size, 0.5);
                assert!(
                    out.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} image {c} at {origin:?} {size:?}",
                    case.meta.id
                );
            }
            other => panic!("unexpected channel type {:?}", other.dtype()),
        }
    }
    let labels: Vec<u16> = (0..shape.iter().product())
        .map(|i| case.label.get(i))
        .collect();
    let want = crop_ref(&labels, shape, origin, size, 255);
    match case.meta.label_dtype {
        patchflow_store::DType::U8 => {
            let mut out = vec![0u8; n];
            reader
                .read_box(ArrayId::Label, origin, size, 255, &mut out)
                .unwrap();
            assert!(
                out.iter().zip(&want).all(|(&a, &b)| u16::from(a) == b),
                "label at {origin:?}"
            );
        }
        _ => {
            let mut out = vec![0u16; n];
            reader
                .read_box(ArrayId::Label, origin, size, 255, &mut out)
                .unwrap();
            assert_eq!(out, want, "label at {origin:?}");
        }
    }
}

/// Boxes of every kind: whole volume, inside, crossing borders, fully outside.
fn boxes(case: &MemCase, seed: u64, count: usize) -> Vec<([i64; 3], [usize; 3])> {
    let s = case.meta.shape;
    let mut out = vec![
        ([0, 0, 0], s),
        ([-2, -3, -1], [s[0] + 4, s[1] + 5, s[2] + 3]),
        ([s[0] as i64, 0, 0], [2, 3, 4]),
    ];
    let mut rng = Lcg(seed);
    for _ in 0..count {
        let size = [0, 1, 2].map(|a| 1 + rng.next_value() as usize % (s[a] + 3));
        let origin = [0, 1, 2].map(|a| rng.next_value() as i64 % (s[a] as i64 + 4) - 3);
        out.push((origin, size));
    }
    out
}

fn region_reads_equal_the_written_arrays(b: &Backend) {
    let store = b.store("Reads");
    let cases = cases();
    write_store(&store, &cases);
    let manifest = Manifest::load(&store).unwrap().expect("manifest");
    assert_eq!(manifest.cases.len(), 2);
    let cache = ChunkCache::new(1 << 20);
    for case in &cases {
        let entry = manifest
            .cases
            .iter()
            .find(|c| c.id == case.meta.id)
            .unwrap();
        let reader = open(&store, case, &cache);
        assert_eq!(reader.meta(), &case.meta);
        assert_eq!(reader.file_len(), entry.stored_bytes);
        assert_eq!(reader.chunk_shape(), [4, 5, 6]);
        for (class, locs) in locations(case) {
            assert_eq!(reader.class_locations(class), &locs[..], "class {class}");
        }
        for (origin, size) in boxes(case, 5, 12) {
            check_box(&reader, case, origin, size);
        }
        // Twice: the second time from the cache.
        for (origin, size) in boxes(case, 5, 4) {
            check_box(&reader, case, origin, size);
        }
        reader.verify().unwrap();
    }
}

fn damaged_chunk_is_a_checksum_error(b: &Backend) {
    let store = b.store("Damaged");
    let cases = cases();
    write_store(&store, &cases);
    let file = store.join(case_file_name("case_a"));
    let mut bytes = b.read(&file);
    // The first payload (image channel 0, chunk [0,0,0]) starts right after the preamble.
    bytes[130] ^= 0x40;
    b.write(&file, bytes);
    let cache = ChunkCache::new(1 << 20);
    let reader = open(&store, &cases[0], &cache);
    let mut out = vec![0i16; 8];
    let err = reader
        .read_box(ArrayId::Image(0), [0, 0, 0], [2, 2, 2], 0, &mut out)
        .unwrap_err();
    match &err {
        StoreError::Checksum { case, array, chunk } => {
            assert_eq!(
                (case.as_str(), array.as_str(), *chunk),
                ("case_a", "image[0]", [0, 0, 0])
            );
        }
        other => panic!("expected a checksum error, got {other}"),
    }
    // Nothing was cached from it: the same read fails again; other chunks still read.
    assert!(matches!(
        reader.read_box(ArrayId::Image(0), [0, 0, 0], [2, 2, 2], 0, &mut out),
        Err(StoreError::Checksum { .. })
    ));
    check_box(&reader, &cases[0], [4, 5, 6], [4, 5, 6]);
    assert!(matches!(reader.verify(), Err(StoreError::Checksum { .. })));
}

fn missing_and_truncated_case_files_are_errors(b: &Backend) {
    let store = b.store("Missing");
    let cases = cases();
    write_store(&store, &cases);
    let cache = ChunkCache::new(1 << 20);
    let file_a = store.join(case_file_name("case_a"));
    b.remove(&file_a);
    match CaseReader::open(&file_a, Arc::clone(&cache)) {
        Err(StoreError::Io { path, source }) => {
            assert_eq!(path, file_a);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{source}");
        }
        other => panic!("expected a not-found error, got {other:?}"),
    }
    let file_b = store.join(case_file_name("case_b"));
    let bytes = b.read(&file_b);
    for keep in [bytes.len() - 1, bytes.len() / 2, 100] {
        b.write(&file_b, bytes[..keep].to_vec());
        match CaseReader::open(&file_b, Arc::clone(&cache)) {
            Err(StoreError::Corrupt { path, reason }) => {
                assert_eq!(path, file_b);
                assert!(!reason.is_empty());
            }
            other => panic!("{keep} bytes: expected a corrupt-file error, got {other:?}"),
        }
    }
    // An unknown store has no manifest.
    assert!(Manifest::load(&b.store("Nothing")).unwrap().is_none());
}

fn the_manifest_is_written_last(b: &Backend) {
    let store = b.store("Last");
    let cases = cases();
    let sizes = write_cases(&store, &cases);
    // Case files in place, no manifest yet: not a store.
    assert!(Manifest::load(&store).unwrap().is_none());
    manifest_of(&cases[..1], &sizes[..1]).save(&store).unwrap();
    let first = Manifest::load(&store).unwrap().unwrap();
    assert_eq!(first.cases.len(), 1);
    manifest_of(&cases, &sizes).save(&store).unwrap();
    let both = Manifest::load(&store).unwrap().unwrap();
    assert_eq!(both.cases.len(), 2);
    // Every case the manifest lists opens complete.
    let cache = ChunkCache::new(0);
    for case in &cases {
        let entry = both.cases.iter().find(|c| c.id == case.meta.id).unwrap();
        let reader = CaseReader::open(&store.join(&entry.file), Arc::clone(&cache)).unwrap();
        assert_eq!(reader.file_len(), entry.stored_bytes);
    }
}

fn concurrent_reads_share_one_small_cache(b: &Backend) {
    let store = b.store("Concurrent");
    let cases = cases();
    write_store(&store, &cases);
    // Smaller than the data: chunks are evicted while other threads read them.
    let cache = ChunkCache::new(16 << 10);
    let readers: Vec<CaseReader> = cases.iter().map(|c| open(&store, c, &cache)).collect();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (readers, cases) = (&readers, &cases);
            s.spawn(move || {
                for (i, (reader, case)) in readers.iter().zip(cases).enumerate() {
                    for (origin, size) in boxes(case, 100 + t * 7 + i as u64, 6) {
                        check_box(reader, case, origin, size);
                    }
                }
            });
        }
    });
    let s = cache.stats();
    assert!(s.bytes_cached <= s.capacity_bytes, "{s:?}");
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            #[test]
            fn region_reads_equal_the_written_arrays() {
                if let Some(b) = $make("region_reads_equal_the_written_arrays") {
                    super::region_reads_equal_the_written_arrays(&b);
                }
            }

            #[test]
            fn damaged_chunk_is_a_checksum_error() {
                if let Some(b) = $make("damaged_chunk_is_a_checksum_error") {
                    super::damaged_chunk_is_a_checksum_error(&b);
                }
            }

            #[test]
            fn missing_and_truncated_case_files_are_errors() {
                if let Some(b) = $make("missing_and_truncated_case_files_are_errors") {
                    super::missing_and_truncated_case_files_are_errors(&b);
                }
            }

            #[test]
            fn the_manifest_is_written_last() {
                if let Some(b) = $make("the_manifest_is_written_last") {
                    super::the_manifest_is_written_last(&b);
                }
            }

            #[test]
            fn concurrent_reads_share_one_small_cache() {
                if let Some(b) = $make("concurrent_reads_share_one_small_cache") {
                    super::concurrent_reads_share_one_small_cache(&b);
                }
            }
        }
    };
}

conformance!(local, |_test: &str| Backend::local());
conformance!(s3, Backend::s3);

// Tests of the S3 backend alone.

fn s3_store(test: &str, name: &str) -> Option<(String, PathBuf)> {
    let Backend::S3 { bucket } = Backend::s3(test)? else {
        unreachable!()
    };
    let store = PathBuf::from(format!("s3://{bucket}/{name}"));
    Some((bucket, store))
}

#[test]
fn s3_box_reads_coalesce_their_chunks_into_few_requests() {
    let Some((bucket, store)) = s3_store(
        "s3_box_reads_coalesce_their_chunks_into_few_requests",
        "Coalesce",
    ) else {
        return;
    };
    let cases = cases();
    write_store(&store, &cases);
    let cache = ChunkCache::new(1 << 20);
    let before = bucket_stats(&bucket);
    let reader = open(&store, &cases[0], &cache);
    let opened = bucket_stats(&bucket).since(&before);
    assert_eq!(
        opened.get_requests, 2,
        "preamble, then index, classes and header"
    );
    // The whole array: its payloads are contiguous, one request.
    let n: usize = cases[0].meta.shape.iter().product();
    let mut out = vec![0i16; n];
    reader
        .read_box(
            ArrayId::Image(0),
            [0, 0, 0],
            cases[0].meta.shape,
            0,
            &mut out,
        )
        .unwrap();
    let read = bucket_stats(&bucket).since(&before).since(&opened);
    assert_eq!(read.get_requests, 1, "{read:?}");
    // Again: everything is in the cache, nothing is fetched.
    reader
        .read_box(
            ArrayId::Image(0),
            [0, 0, 0],
            cases[0].meta.shape,
            0,
            &mut out,
        )
        .unwrap();
    assert_eq!(bucket_stats(&bucket).since(&before).get_requests, 3);
    // A small box fetches only the bytes of its chunks (plus gaps under the coalescing limit),
    // never the whole file.
    let cache = ChunkCache::new(1 << 20);
    let reader = open(&store, &cases[0], &cache);
    let before = bucket_stats(&bucket);
    let mut small = vec![0f32; 2 * 2 * 2];
    reader
        .read_box(ArrayId::Image(1), [5, 6, 7], [2, 2, 2], 0.0, &mut small)
        .unwrap();
    let got = bucket_stats(&bucket).since(&before);
    assert!(
        got.get_requests >= 1 && got.get_bytes < reader.file_len() / 2,
        "{got:?}"
    );
}

#[test]
fn s3_disk_cache_serves_a_restarted_reader_and_never_damaged_entries() {
    let Some((bucket, store)) = s3_store(
        "s3_disk_cache_serves_a_restarted_reader_and_never_damaged_entries",
        "Disk",
    ) else {
        return;
    };
    let cases = cases();
    write_store(&store, &cases);
    let dir = tempfile::tempdir().unwrap();
    let all = boxes(&cases[0], 9, 10);
    {
        let disk = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let cache = ChunkCache::with_disk_cache(1 << 20, Arc::clone(&disk));
        let reader = open(&store, &cases[0], &cache);
        for &(origin, size) in &all {
            check_box(&reader, &cases[0], origin, size);
        }
        assert!(disk.stats().entries > 0);
    }
    // A restart: new memory cache, the same disk folder. Only the structure is fetched.
    let disk = DiskCache::open(dir.path(), 1 << 30).unwrap();
    let held = disk.stats().entries;
    let cache = ChunkCache::with_disk_cache(1 << 20, Arc::clone(&disk));
    let before = bucket_stats(&bucket);
    let reader = open(&store, &cases[0], &cache);
    for &(origin, size) in &all {
        check_box(&reader, &cases[0], origin, size);
    }
    assert_eq!(
        bucket_stats(&bucket).since(&before).get_requests,
        2,
        "only the open's two"
    );
    assert_eq!(disk.stats().hits, held, "{:?}", disk.stats());
    drop((reader, cache, disk));

    // Damage every entry on disk: each is dropped and fetched again; reads stay exact.
    for sub in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if sub.path().is_dir() && sub.file_name().len() == 2 {
            for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
                let mut bytes = std::fs::read(f.path()).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                std::fs::write(f.path(), bytes).unwrap();
            }
        }
    }
    let disk = DiskCache::open(dir.path(), 1 << 30).unwrap();
    let cache = ChunkCache::with_disk_cache(1 << 20, Arc::clone(&disk));
    let before = bucket_stats(&bucket);
    let reader = open(&store, &cases[0], &cache);
    for &(origin, size) in &all {
        check_box(&reader, &cases[0], origin, size);
    }
    assert!(bucket_stats(&bucket).since(&before).get_requests > 2);
    let s = disk.stats();
    assert_eq!((s.damaged, s.hits), (held, 0), "{s:?}");
}

#[test]
fn s3_large_case_goes_up_in_parts_and_reads_back() {
    let Some((bucket, store)) = s3_store("s3_large_case_goes_up_in_parts_and_reads_back", "Large")
    else {
        return;
    };
    // Random i16 and f32 voxels hardly compress: the file is larger than the part threshold.
    let big = make_case("big", [40, 250, 256], 77, None);
    let before = bucket_stats(&bucket);
    write_store(&store, std::slice::from_ref(&big));
    let m = Manifest::load(&store).unwrap().unwrap();
    assert!(
        m.cases[0].stored_bytes > patchflow_store::MULTIPART_THRESHOLD as u64,
        "{} bytes",
        m.cases[0].stored_bytes
    );
    let put = bucket_stats(&bucket).since(&before);
    assert!(put.put_bytes >= m.cases[0].stored_bytes);
    let cache = ChunkCache::new(64 << 20);
    let reader = open(&store, &big, &cache);
    for (origin, size) in [([0, 0, 0], [8, 64, 64]), ([33, 200, 230], [9, 60, 30])] {
        check_box(&reader, &big, origin, size);
    }
    reader.verify().unwrap();
    let loc = ObjectLocation::parse(&store.join("big.pfc").to_string_lossy()).unwrap();
    assert_eq!(
        patchflow_store::get_object(&loc, u64::MAX)
            .unwrap()
            .unwrap()
            .len() as u64,
        m.cases[0].stored_bytes
    );
}

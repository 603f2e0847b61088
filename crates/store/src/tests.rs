//! Tests of the whole crate: round trips against a reference crop, corruption, atomicity,
//! cache bounds and the manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytemuck::Pod;
use patchflow_volume::NormScheme;
use proptest::prelude::*;

use crate::format::{KIND_ZSTD, PREAMBLE_LEN};
use crate::*;

/// Deterministic test data generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Values with large constant regions (so that some chunks are constant) and random bits
/// elsewhere (NaN payloads included for floats).
fn gen_bytes(shape: [usize; 3], es: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let background = rng.next();
    let block = 1 + (rng.next() % 4) as usize;
    let mut out = Vec::with_capacity(shape.iter().product::<usize>() * es);
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let busy = (z / block + y / block + x / block).is_multiple_of(3);
                let v = if busy { rng.next() } else { background };
                out.extend_from_slice(&v.to_le_bytes()[..es]);
            }
        }
    }
    out
}

fn voxels_from_bytes(dtype: DType, b: &[u8]) -> VoxelData {
    fn v<T: Pod>(b: &[u8]) -> Vec<T> {
        bytemuck::pod_collect_to_vec(b)
    }
    match dtype {
        DType::U8 => VoxelData::U8(b.to_vec()),
        DType::I8 => VoxelData::I8(v(b)),
        DType::U16 => VoxelData::U16(v(b)),
        DType::I16 => VoxelData::I16(v(b)),
        DType::U32 => VoxelData::U32(v(b)),
        DType::I32 => VoxelData::I32(v(b)),
        DType::F32 => VoxelData::F32(v(b)),
        DType::F64 => VoxelData::F64(v(b)),
    }
}

fn meta_for(id: &str, shape: [usize; 3], channels: &[DType], label: DType) -> CaseMeta {
    CaseMeta {
        id: id.to_owned(),
        shape,
        spacing: [1.5, 0.75, 0.75],
        original: Geometry {
            shape: [shape[0] + 2, shape[1] + 3, shape[2] + 4],
            spacing: [3.0, 0.7, 0.7],
            affine: [
                [-0.7, 0.0, 0.0, 10.0],
                [0.0, -0.7, 0.0, 20.5],
                [0.0, 0.0, 3.0, -30.25],
                [0.0, 0.0, 0.0, 1.0],
            ],
        },
        crop_box: [[1, shape[0] + 1], [2, shape[1] + 2], [3, shape[2] + 3]],
        channels: channels
            .iter()
            .enumerate()
            .map(|(i, &d)| ChannelMeta {
                name: format!("ch{i}"),
                dtype: d,
                norm: Normalization {
                    scheme: NormScheme::Ct,
                    clip: Some([-1000.0, 1500.5]),
                    mean: 42.25,
                    inv_std: 0.01,
                },
            })
            .collect(),
        label_dtype: label,
        label_names: BTreeMap::from([(0, "background".to_owned()), (1, "liver".to_owned())]),
        class_voxels: BTreeMap::from([(0, 10), (1, 5)]),
        ignore_label: None,
        outside_mask_label: None,
    }
}

/// A case held in memory, with its arrays as bytes for reference crops.
struct TestCase {
    meta: CaseMeta,
    channels: Vec<VoxelData>,
    label: LabelData,
    locations: BTreeMap<u16, Vec<[u32; 3]>>,
}

impl TestCase {
    fn new(id: &str, shape: [usize; 3], channels: &[DType], label: DType, seed: u64) -> Self {
        let meta = meta_for(id, shape, channels, label);
        let chans = channels
            .iter()
            .enumerate()
            .map(|(i, &d)| voxels_from_bytes(d, &gen_bytes(shape, d.size(), seed + i as u64)))
            .collect();
        let lb = gen_bytes(shape, label.size(), seed ^ 0xabcd);
        let label = match label {
            DType::U16 => LabelData::U16(bytemuck::pod_collect_to_vec(&lb)),
            _ => LabelData::U8(lb),
        };
        let mut rng = Rng(seed ^ 0x55);
        let mut locations = BTreeMap::new();
        for class in [1u16, 3, 300] {
            let n = (rng.next() % 20) as usize;
            let locs = (0..n)
                .map(|_| [0, 1, 2].map(|a| (rng.next() % shape[a] as u64) as u32))
                .collect();
            locations.insert(class, locs);
        }
        TestCase {
            meta,
            channels: chans,
            label,
            locations,
        }
    }

    fn data(&self) -> CaseData<'_> {
        CaseData {
            meta: &self.meta,
            channels: &self.channels,
            label: &self.label,
            class_locations: &self.locations,
        }
    }

    fn bytes(&self, array: ArrayId) -> &[u8] {
        match array {
            ArrayId::Image(c) => self.channels[c].as_bytes(),
            ArrayId::Label => self.label.as_bytes(),
        }
    }

    fn write(&self, dir: &Path, chunk: [usize; 3]) -> PathBuf {
        let path = dir.join(case_file_name(&self.meta.id));
        let opts = WriteOptions {
            chunk_shape: chunk,
            zstd_level: 1,
        };
        write_case(&path, &self.data(), &opts).unwrap();
        path
    }
}

/// Naive reference crop with padding, as bytes.
fn reference_crop(
    src: &[u8],
    es: usize,
    shape: [usize; 3],
    origin: [i64; 3],
    size: [usize; 3],
    pad: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(size.iter().product::<usize>() * es);
    for bz in 0..size[0] {
        for by in 0..size[1] {
            for bx in 0..size[2] {
                let p = [bz, by, bx];
                let v = [0, 1, 2].map(|a| origin[a] + p[a] as i64);
                let inside = (0..3).all(|a| v[a] >= 0 && (v[a] as usize) < shape[a]);
                if inside {
                    let i = (v[0] as usize * shape[1] + v[1] as usize) * shape[2] + v[2] as usize;
                    out.extend_from_slice(&src[i * es..(i + 1) * es]);
                } else {
                    out.extend_from_slice(pad);
                }
            }
        }
    }
    out
}

fn read_as<T: Element + Pod>(
    r: &CaseReader,
    array: ArrayId,
    origin: [i64; 3],
    size: [usize; 3],
    pad_bits: u64,
) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    let pad: T = bytemuck::pod_read_unaligned(&pad_bits.to_le_bytes()[..size_of::<T>()]);
    let mut out = vec![T::default(); size.iter().product()];
    r.read_box(array, origin, size, pad, &mut out)?;
    Ok((
        bytemuck::cast_slice(&out).to_vec(),
        bytemuck::bytes_of(&pad).to_vec(),
    ))
}

/// `read_box` in the array's dtype; returns (box bytes, pad bytes).
fn read_bytes(
    r: &CaseReader,
    array: ArrayId,
    origin: [i64; 3],
    size: [usize; 3],
    pad_bits: u64,
) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    match r.dtype(array)? {
        DType::U8 => read_as::<u8>(r, array, origin, size, pad_bits),
        DType::I8 => read_as::<i8>(r, array, origin, size, pad_bits),
        DType::U16 => read_as::<u16>(r, array, origin, size, pad_bits),
        DType::I16 => read_as::<i16>(r, array, origin, size, pad_bits),
        DType::U32 => read_as::<u32>(r, array, origin, size, pad_bits),
        DType::I32 => read_as::<i32>(r, array, origin, size, pad_bits),
        DType::F32 => read_as::<f32>(r, array, origin, size, pad_bits),
        DType::F64 => read_as::<f64>(r, array, origin, size, pad_bits),
    }
}

/// `visit_box` assembled into bytes; padding filled with `pad`. Checks that the runs cover
/// every voxel exactly once.
fn visit_bytes(
    r: &CaseReader,
    array: ArrayId,
    origin: [i64; 3],
    size: [usize; 3],
    pad: &[u8],
) -> Vec<u8> {
    let es = r.dtype(array).unwrap().size();
    let total: usize = size.iter().product();
    let mut out = vec![0u8; total * es];
    let mut seen = vec![0u8; total];
    r.visit_box(array, origin, size, &mut |run| {
        for s in &mut seen[run.dst..run.dst + run.len] {
            *s += 1;
        }
        let dst = &mut out[run.dst * es..(run.dst + run.len) * es];
        match run.src {
            Some(src) => dst.copy_from_slice(src),
            None => {
                for d in dst.chunks_exact_mut(es) {
                    d.copy_from_slice(pad);
                }
            }
        }
    })
    .unwrap();
    assert!(
        seen.iter().all(|&s| s == 1),
        "runs must cover each voxel once"
    );
    out
}

fn arrays_of(case: &TestCase) -> Vec<ArrayId> {
    (0..case.channels.len())
        .map(ArrayId::Image)
        .chain([ArrayId::Label])
        .collect()
}

fn image_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::U8),
        Just(DType::I8),
        Just(DType::U16),
        Just(DType::I16),
        Just(DType::I32),
        Just(DType::F32),
    ]
}

fn shape3(max: usize) -> impl Strategy<Value = [usize; 3]> {
    [1..=max, 1..=max, 1..=max]
}

fn a_box(shape: [usize; 3]) -> impl Strategy<Value = ([i64; 3], [usize; 3])> {
    let axis = |n: usize| {
        let n = n as i64;
        (-(n + 3)..=(n + 3), 0..=(n as usize + 6))
    };
    (axis(shape[0]), axis(shape[1]), axis(shape[2]))
        .prop_map(|((o0, s0), (o1, s1), (o2, s2))| ([o0, o1, o2], [s0, s1, s2]))
}

/// Shape, chunk shape, channel dtypes, label dtype, seed, cache capacity, boxes (origin, size,
/// pad bits).
type CaseSpec = (
    [usize; 3],
    [usize; 3],
    Vec<DType>,
    DType,
    u64,
    u64,
    Vec<([i64; 3], [usize; 3], u64)>,
);

fn case_and_boxes() -> impl Strategy<Value = CaseSpec> {
    (
        shape3(17),
        shape3(9),
        prop::collection::vec(image_dtype(), 1..=2),
        prop_oneof![Just(DType::U8), Just(DType::U16)],
        any::<u64>(),
        prop_oneof![Just(0u64), Just(4096u64), Just(1u64 << 30)],
    )
        .prop_flat_map(|(shape, chunk, chans, label, seed, cap)| {
            let boxes = prop::collection::vec(
                (a_box(shape), any::<u64>()).prop_map(|((o, s), p)| (o, s, p)),
                1..8,
            );
            (
                Just(shape),
                Just(chunk),
                Just(chans),
                Just(label),
                Just(seed),
                Just(cap),
                boxes,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every box read equals the naive reference crop, bit for bit, for read_box and visit_box.
    #[test]
    fn roundtrip_matches_reference(
        (shape, chunk, chans, label, seed, cap, boxes) in case_and_boxes()
    ) {
        let dir = tempfile::tempdir().unwrap();
        let case = TestCase::new("case_1", shape, &chans, label, seed);
        let path = case.write(dir.path(), chunk);
        let cache = ChunkCache::new(cap);
        let r = CaseReader::open(&path, cache.clone()).unwrap();
        prop_assert_eq!(r.meta(), &case.meta);
        r.verify().unwrap();
        for array in arrays_of(&case) {
            let es = r.dtype(array).unwrap().size();
            // The whole volume first, then the random boxes (twice: cold and cached).
            let whole = ([0i64; 3], shape, 0u64);
            for &(origin, size, pad_bits) in std::iter::once(&whole).chain(&boxes).chain(&boxes) {
                let (got, pad) = read_bytes(&r, array, origin, size, pad_bits).unwrap();
                let want = reference_crop(case.bytes(array), es, shape, origin, size, &pad);
                prop_assert!(got == want, "{} box {:?}+{:?} differs", array, origin, size);
                let visited = visit_bytes(&r, array, origin, size, &pad);
                prop_assert!(visited == want, "{} visit {:?}+{:?} differs", array, origin, size);
            }
        }
        let st = cache.stats();
        prop_assert!(st.bytes_cached <= st.capacity_bytes && st.capacity_bytes <= cap);
        for class in [1u16, 3, 300, 7] {
            let want = case.locations.get(&class).cloned().unwrap_or_default();
            prop_assert_eq!(r.class_locations(class), want.as_slice());
        }
    }

    /// Arbitrary bytes never open as a case (and never panic).
    #[test]
    fn random_bytes_are_rejected(bytes in prop::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pfc");
        let mut bytes = bytes;
        if magic && bytes.len() >= 12 {
            bytes[..8].copy_from_slice(&crate::format::MAGIC);
            bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        prop_assert!(CaseReader::open(&path, ChunkCache::new(1 << 20)).is_err());
    }

    /// Damaging any bytes of a valid file gives an error somewhere, or (damage in unused
    /// padding) exactly the original data; never a panic, never wrong voxels.
    #[test]
    fn damaged_files_never_yield_wrong_data(
        seed in any::<u64>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let shape = [7, 9, 10];
        let case = TestCase::new("dmg", shape, &[DType::I16], DType::U8, seed);
        let path = case.write(dir.path(), [4, 4, 4]);
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, x) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        std::fs::write(&path, &bytes).unwrap();
        let Ok(r) = CaseReader::open(&path, ChunkCache::new(1 << 20)) else {
            return Ok(());
        };
        for array in arrays_of(&case) {
            match read_bytes(&r, array, [0; 3], shape, 0) {
                Ok((got, _)) => prop_assert!(got == case.bytes(array), "damaged file read back wrong data"),
                Err(StoreError::Checksum { .. } | StoreError::Corrupt { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
        prop_assert_eq!(r.meta(), &case.meta);
    }
}

#[test]
fn constant_chunks_have_no_payload_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [20, 20, 20];
    let mut case = TestCase::new("const", shape, &[DType::F32], DType::U8, 1);
    case.label = LabelData::U8(vec![0; 8000]);
    // Image: -1024 everywhere except one voxel.
    let mut img = vec![-1024.0f32; 8000];
    img[7 * 400 + 7 * 20 + 7] = 3.5;
    case.channels = vec![VoxelData::F32(img.clone())];
    let path = case.write(dir.path(), [8, 8, 8]);
    let cache = ChunkCache::new(1 << 20);
    let r = CaseReader::open(&path, cache.clone()).unwrap();
    let st = r.stats();
    assert_eq!(st.arrays[1].chunks, 27);
    assert_eq!(st.arrays[1].constant_chunks, 27);
    assert_eq!(st.arrays[1].stored_bytes, 0);
    assert_eq!(st.arrays[0].constant_chunks, 26);
    assert!(st.arrays[0].compression_ratio() > 1.0);
    assert_eq!(st.raw_bytes, 8000 * 5);
    assert!(st.compression_ratio() > 1.0);

    let mut out = vec![1.0f32; 12 * 12 * 12];
    r.read_box(ArrayId::Image(0), [-2, 0, 4], [12, 12, 12], 9.0, &mut out)
        .unwrap();
    let want = reference_crop(
        bytemuck::cast_slice(&img),
        4,
        shape,
        [-2, 0, 4],
        [12, 12, 12],
        bytemuck::bytes_of(&9.0f32),
    );
    assert_eq!(bytemuck::cast_slice::<f32, u8>(&out), &want[..]);
    let mut lab = vec![7u8; 64];
    r.read_box(ArrayId::Label, [4, 4, 4], [4, 4, 4], 255, &mut lab)
        .unwrap();
    assert!(lab.iter().all(|&v| v == 0));
    // Constant chunks never go through the cache; only the one stored image chunk did.
    let cs = cache.stats();
    assert_eq!(cs.misses, 1);
    assert_eq!(cs.entries, 1);
}

/// The first zstd chunk of `array_index` and its file offset.
fn first_stored_chunk(r: &CaseReader, a: usize) -> ([usize; 3], usize) {
    let info = &r.arrays[a];
    let (lin, e) = info
        .entries
        .iter()
        .enumerate()
        .find(|(_, e)| e.kind == KIND_ZSTD)
        .expect("test data has a compressed chunk");
    (r.grid.coords(lin), (e.offset_or_value + e.len / 2) as usize)
}

#[test]
fn flipped_payload_byte_gives_checksum_error_and_is_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [16, 16, 16];
    let case = TestCase::new("corrupt_me", shape, &[DType::I16], DType::U8, 9);
    let path = case.write(dir.path(), [8, 8, 8]);
    let (chunk, at) = {
        let r = CaseReader::open(&path, ChunkCache::new(0)).unwrap();
        first_stored_chunk(&r, 0)
    };
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();

    let cache = ChunkCache::new(1 << 20);
    let r = CaseReader::open(&path, cache.clone()).unwrap();
    let origin = chunk.map(|c| (c * 8) as i64);
    let mut out = vec![0i16; 8 * 8 * 8];
    for _ in 0..2 {
        let err = r
            .read_box(ArrayId::Image(0), origin, [8, 8, 8], 0, &mut out)
            .unwrap_err();
        match err {
            StoreError::Checksum {
                case,
                array,
                chunk: c,
            } => {
                assert_eq!(case, "corrupt_me");
                assert_eq!(array, "image[0]");
                assert_eq!(c, chunk);
            }
            e => panic!("expected a checksum error, got {e}"),
        }
        assert_eq!(
            cache.stats().entries,
            0,
            "a corrupt chunk must not be cached"
        );
    }
    assert_eq!(cache.stats().misses, 2);
    let msg = r.verify().unwrap_err().to_string();
    assert!(
        msg.contains("corrupt_me") && msg.contains("image[0]"),
        "{msg}"
    );
    // Other chunks still read.
    let other = [0, 1, 2].map(|a| if chunk[a] == 0 { 8 } else { 0 });
    r.read_box(ArrayId::Image(0), other, [8, 8, 8], 0, &mut out)
        .unwrap();
}

#[test]
fn truncated_bad_magic_and_future_version_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let case = TestCase::new("trunc", [5, 6, 7], &[DType::U16], DType::U8, 3);
    let path = case.write(dir.path(), [4, 4, 4]);
    let good = std::fs::read(&path).unwrap();
    let cache = ChunkCache::new(1 << 20);
    let bad = dir.path().join("bad.pfc");
    let open = |bytes: &[u8]| {
        std::fs::write(&bad, bytes).unwrap();
        CaseReader::open(&bad, cache.clone())
    };
    for len in [
        0,
        7,
        12,
        PREAMBLE_LEN - 1,
        PREAMBLE_LEN,
        good.len() / 2,
        good.len() - 1,
    ] {
        match open(&good[..len]) {
            Err(StoreError::Corrupt { path, reason }) => {
                assert_eq!(path, bad);
                assert!(!reason.is_empty());
            }
            other => panic!("truncated to {len}: expected Corrupt, got {other:?}"),
        }
    }
    let mut m = good.clone();
    m[0] = b'X';
    let err = open(&m).unwrap_err().to_string();
    assert!(err.contains("magic") && err.contains("bad.pfc"), "{err}");

    let mut v = good.clone();
    v[8..12].copy_from_slice(&2u32.to_le_bytes());
    match open(&v) {
        Err(StoreError::UnsupportedVersion {
            found, supported, ..
        }) => {
            assert_eq!((found, supported), (2, FORMAT_VERSION));
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    // A short file that still shows a future version says so.
    assert!(matches!(
        open(&v[..20]),
        Err(StoreError::UnsupportedVersion { found: 2, .. })
    ));
    // Extra bytes appended are detected too.
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(open(&long), Err(StoreError::Corrupt { .. })));
    assert!(open(&good).is_ok());
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn failed_write_leaves_no_file_and_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let case = TestCase::new("atomic", [12, 13, 14], &[DType::I16], DType::U8, 5);
    let path = dir.path().join("atomic.pfc");
    let size = {
        let d = tempfile::tempdir().unwrap();
        std::fs::metadata(case.write(d.path(), [4, 4, 4]))
            .unwrap()
            .len()
    };
    for limit in [0, 100, PREAMBLE_LEN as u64 + 10, size / 2, size - 5] {
        crate::writer::FAIL_AFTER_BYTES.with(|f| f.set(Some(limit)));
        let res = write_case(
            &path,
            &case.data(),
            &WriteOptions {
                chunk_shape: [4, 4, 4],
                zstd_level: 1,
            },
        );
        crate::writer::FAIL_AFTER_BYTES.with(|f| f.set(None));
        assert!(matches!(res, Err(StoreError::Io { .. })), "limit {limit}");
        assert!(
            dir_names(dir.path()).is_empty(),
            "leftovers after failing at {limit}"
        );
    }
    // With an existing file, a failed rewrite keeps it intact.
    let old = TestCase::new("atomic", [12, 13, 14], &[DType::I16], DType::U8, 6);
    old.write(dir.path(), [4, 4, 4]);
    let before = std::fs::read(&path).unwrap();
    crate::writer::FAIL_AFTER_BYTES.with(|f| f.set(Some(size / 3)));
    assert!(write_case(&path, &case.data(), &WriteOptions::default()).is_err());
    crate::writer::FAIL_AFTER_BYTES.with(|f| f.set(None));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(dir_names(dir.path()), vec!["atomic.pfc".to_owned()]);
    CaseReader::open(&path, ChunkCache::new(0))
        .unwrap()
        .verify()
        .unwrap();

    // A missing directory is an I/O error naming the path.
    let missing = dir.path().join("no/such/dir/x.pfc");
    let err = write_case(&missing, &case.data(), &WriteOptions::default()).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }) && err.to_string().contains("no/such/dir"));
}

#[test]
fn temp_names_are_never_case_names() {
    assert!(is_temp_file_name(".a.pfc.tmp.123.4"));
    assert!(!is_temp_file_name("a.pfc"));
    assert!(validate_case_id(".a.pfc.tmp.1.2").is_err());
    assert_eq!(case_file_name("liver_001"), "liver_001.pfc");
}

#[test]
fn writer_validates_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.pfc");
    let case = TestCase::new("v", [4, 5, 6], &[DType::I16], DType::U8, 1);
    let opts = WriteOptions::default();
    let expect_input = |data: CaseData<'_>, opts: &WriteOptions, what: &str| {
        match write_case(&path, &data, opts) {
            Err(StoreError::InvalidInput { case, reason }) => {
                assert_eq!(case, data.meta.id);
                assert!(reason.contains(what), "{reason:?} should mention {what:?}");
            }
            Err(StoreError::InvalidId { .. }) if what == "id" => {}
            other => panic!("{what}: expected invalid input, got {other:?}"),
        }
        assert!(dir_names(path.parent().unwrap()).is_empty());
    };
    let short = vec![VoxelData::I16(vec![0; 119])];
    expect_input(
        CaseData {
            channels: &short,
            ..case.data()
        },
        &opts,
        "119 voxels",
    );
    let wrong = vec![VoxelData::F32(vec![0.0; 120])];
    expect_input(
        CaseData {
            channels: &wrong,
            ..case.data()
        },
        &opts,
        "metadata says i16",
    );
    let none: Vec<VoxelData> = vec![];
    expect_input(
        CaseData {
            channels: &none,
            ..case.data()
        },
        &opts,
        "0 channel arrays",
    );
    let lab16 = LabelData::U16(vec![0; 120]);
    expect_input(
        CaseData {
            label: &lab16,
            ..case.data()
        },
        &opts,
        "label holds u16",
    );
    let lab_short = LabelData::U8(vec![0; 3]);
    expect_input(
        CaseData {
            label: &lab_short,
            ..case.data()
        },
        &opts,
        "label has 3 voxels",
    );
    let zero = WriteOptions {
        chunk_shape: [4, 0, 4],
        zstd_level: 1,
    };
    expect_input(case.data(), &zero, "zero axis");
    let level = WriteOptions {
        chunk_shape: [4, 4, 4],
        zstd_level: 99,
    };
    expect_input(case.data(), &level, "zstd level");
    let outside = BTreeMap::from([(1u16, vec![[0u32, 5, 0]])]);
    expect_input(
        CaseData {
            class_locations: &outside,
            ..case.data()
        },
        &opts,
        "outside shape",
    );
    let mut nan = case.meta.clone();
    nan.spacing[1] = f64::NAN;
    expect_input(
        CaseData {
            meta: &nan,
            ..case.data()
        },
        &opts,
        "non-finite",
    );
    let mut bad_id = case.meta.clone();
    bad_id.id = "../etc".to_owned();
    expect_input(
        CaseData {
            meta: &bad_id,
            ..case.data()
        },
        &opts,
        "id",
    );
    let mut bad_label = case.meta.clone();
    bad_label.label_dtype = DType::I16;
    expect_input(
        CaseData {
            meta: &bad_label,
            ..case.data()
        },
        &opts,
        "not u8 or u16",
    );
}

#[test]
fn read_errors_name_case_and_array() {
    let dir = tempfile::tempdir().unwrap();
    let case = TestCase::new("errs", [4, 5, 6], &[DType::I16], DType::U16, 1);
    let path = case.write(dir.path(), [4, 4, 4]);
    let r = CaseReader::open(&path, ChunkCache::new(1 << 20)).unwrap();
    let mut out = vec![0u8; 8];
    let e = r
        .read_box(ArrayId::Label, [0; 3], [2, 2, 2], 0u8, &mut out)
        .unwrap_err();
    assert!(matches!(
        e,
        StoreError::DTypeMismatch {
            stored: DType::U16,
            requested: DType::U8,
            ..
        }
    ));
    let mut out = vec![0u16; 7];
    let e = r
        .read_box(ArrayId::Label, [0; 3], [2, 2, 2], 0u16, &mut out)
        .unwrap_err();
    assert!(
        e.to_string().contains("errs") && e.to_string().contains("label"),
        "{e}"
    );
    let e = r.dtype(ArrayId::Image(1)).unwrap_err();
    assert!(matches!(e, StoreError::NoSuchArray { channels: 1, .. }));
    let e = r
        .visit_box(ArrayId::Image(0), [0; 3], [usize::MAX, 2, 2], &mut |_| {})
        .unwrap_err();
    assert!(matches!(e, StoreError::InvalidBox { .. }));
    // Extreme origins are padding, not overflow.
    let mut out = vec![0i16; 8];
    r.read_box(
        ArrayId::Image(0),
        [i64::MAX, i64::MIN, 0],
        [2, 2, 2],
        -5,
        &mut out,
    )
    .unwrap();
    assert!(out.iter().all(|&v| v == -5));
    // Empty boxes are fine.
    r.read_box::<i16>(ArrayId::Image(0), [0; 3], [0, 3, 3], 0, &mut [])
        .unwrap();
    assert_eq!(r.path(), path.as_path());
    assert_eq!(r.chunk_shape(), [4, 4, 4]);
}

#[test]
fn class_locations_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut case = TestCase::new("classes", [10, 11, 12], &[DType::U8], DType::U8, 2);
    case.locations = BTreeMap::from([
        (1u16, vec![[0u32, 0, 0], [9, 10, 11], [3, 4, 5]]),
        (2, vec![]),
        (65535, vec![[1, 2, 3]]),
    ]);
    let path = case.write(dir.path(), [3, 3, 3]);
    let r = CaseReader::open(&path, ChunkCache::new(0)).unwrap();
    assert_eq!(r.classes_with_locations(), vec![1, 65535]);
    assert_eq!(r.class_locations(1), case.locations[&1].as_slice());
    assert!(r.class_locations(2).is_empty());
    assert_eq!(r.class_locations(65535), &[[1, 2, 3]]);
    assert!(r.class_locations(4).is_empty());

    case.locations.clear();
    let path = case.write(dir.path(), [3, 3, 3]);
    let r = CaseReader::open(&path, ChunkCache::new(0)).unwrap();
    assert!(r.classes_with_locations().is_empty());
}

#[test]
fn outside_mask_label_round_trips_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut case = TestCase::new("masked", [6, 7, 8], &[DType::U8], DType::U8, 4);
    case.locations = BTreeMap::from([(1u16, vec![[0u32, 0, 0]])]);
    // Absent: not even written, so headers of stores without a marker stay as they were.
    let path = case.write(dir.path(), [3, 3, 3]);
    let r = CaseReader::open(&path, ChunkCache::new(0)).unwrap();
    assert_eq!(r.meta().outside_mask_label, None);
    let json = serde_json::to_string(&case.meta).unwrap();
    assert!(!json.contains("outside_mask_label"), "{json}");
    // A header written before the field existed reads as None.
    let back: CaseMeta = serde_json::from_str(&json).unwrap();
    assert_eq!(back, case.meta);

    case.meta.outside_mask_label = Some(254);
    let path = case.write(dir.path(), [3, 3, 3]);
    let r = CaseReader::open(&path, ChunkCache::new(0)).unwrap();
    assert_eq!(r.meta().outside_mask_label, Some(254));

    let opts = WriteOptions::default();
    let refused = |case: &TestCase, what: &str| {
        let err = write_case(&dir.path().join("x.pfc"), &case.data(), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("outside_mask_label") && err.contains(what),
            "{what}: {err}"
        );
    };
    case.meta.outside_mask_label = Some(255);
    refused(&case, "padding/ignore label");
    case.meta.outside_mask_label = Some(0);
    refused(&case, "within 1..255");
    case.meta.outside_mask_label = Some(1);
    refused(&case, "class in class_voxels");
    case.meta.class_voxels.remove(&1);
    refused(&case, "has class locations");
    case.locations.clear();
    case.meta.ignore_label = Some(1);
    refused(&case, "ignore_label");
}

#[test]
fn cache_bound_holds_under_concurrent_readers() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<TestCase> = (0..2)
        .map(|i| {
            TestCase::new(
                &format!("c{i}"),
                [24, 24, 24],
                &[DType::I16],
                DType::U8,
                40 + i,
            )
        })
        .collect();
    let paths: Vec<PathBuf> = cases
        .iter()
        .map(|c| c.write(dir.path(), [8, 8, 8]))
        .collect();
    let requested = 48_000;
    let cache = ChunkCache::new(requested);
    let readers: Vec<CaseReader> = paths
        .iter()
        .map(|p| CaseReader::open(p, cache.clone()).unwrap())
        .collect();
    let readers = Arc::new(readers);
    let cases = Arc::new(cases);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (readers, cases, cache) = (readers.clone(), cases.clone(), cache.clone());
            s.spawn(move || {
                let mut rng = Rng(t);
                for _ in 0..150 {
                    let k = (rng.next() % 2) as usize;
                    let origin = [0, 1, 2].map(|_| (rng.next() % 30) as i64 - 4);
                    let size = [0, 1, 2].map(|_| 1 + (rng.next() % 12) as usize);
                    let (got, pad) =
                        read_bytes(&readers[k], ArrayId::Image(0), origin, size, 7).unwrap();
                    let want = reference_crop(
                        cases[k].bytes(ArrayId::Image(0)),
                        2,
                        [24, 24, 24],
                        origin,
                        size,
                        &pad,
                    );
                    assert_eq!(got, want);
                    let st = cache.stats();
                    assert!(st.bytes_cached <= st.capacity_bytes, "{st:?}");
                }
            });
        }
    });
    let st = cache.stats();
    assert!(
        st.capacity_bytes <= requested && st.bytes_cached <= st.capacity_bytes,
        "{st:?}"
    );
    assert!(st.hits > 0 && st.misses > 0, "{st:?}");
    cache.clear();
    assert_eq!(cache.stats().bytes_cached, 0);
}

#[test]
fn large_case_uses_parallel_compression_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [64, 160, 160];
    let case = TestCase::new("big", shape, &[DType::I16], DType::U8, 77);
    let path = dir.path().join("big.pfc");
    let rep = write_case(&path, &case.data(), &WriteOptions::default()).unwrap();
    assert_eq!(rep.raw_bytes, (64 * 160 * 160 * 3) as u64);
    assert_eq!(rep.stored_bytes, std::fs::metadata(&path).unwrap().len());
    let r = CaseReader::open(&path, ChunkCache::new(64 << 20)).unwrap();
    r.verify().unwrap();
    for array in arrays_of(&case) {
        let (got, _) = read_bytes(&r, array, [0; 3], shape, 0).unwrap();
        assert!(got == case.bytes(array), "{array} differs");
    }
    assert_eq!(r.stats().file_bytes, rep.stored_bytes);
}

#[test]
fn manifest_round_trip_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    assert!(Manifest::load(dir.path()).unwrap().is_none());
    let m = Manifest {
        format: MANIFEST_FORMAT,
        dataset: "Dataset003_Liver".to_owned(),
        plan: serde_json::json!({"spacing": [1.0, 0.8, 0.8], "patch": [128, 128, 128]}),
        cases: vec![ManifestCase {
            id: "liver_001".to_owned(),
            file: case_file_name("liver_001"),
            stored_bytes: 1234,
            source: serde_json::json!({"image": ["imagesTr/liver_001_0000.nii.gz"]}),
        }],
    };
    m.save(dir.path()).unwrap();
    let back = Manifest::load(dir.path()).unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(&m).unwrap()
    );
    assert_eq!(dir_names(dir.path()), vec![MANIFEST_FILE.to_owned()]);

    let mut future = m.clone();
    future.format = MANIFEST_FORMAT + 1;
    future.save(dir.path()).unwrap();
    assert!(matches!(
        Manifest::load(dir.path()),
        Err(StoreError::UnsupportedVersion { .. })
    ));
    let mut escape = m.clone();
    escape.cases[0].file = "../other/liver_001.pfc".to_owned();
    escape.save(dir.path()).unwrap();
    let e = Manifest::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("cases[0].file") && e.contains("manifest.json"),
        "{e}"
    );
    std::fs::write(dir.path().join(MANIFEST_FILE), b"{not json").unwrap();
    assert!(matches!(
        Manifest::load(dir.path()),
        Err(StoreError::Json { .. })
    ));

    atomic_write(&dir.path().join("x.bin"), b"hello").unwrap();
    assert_eq!(std::fs::read(dir.path().join("x.bin")).unwrap(), b"hello");
}

#[test]
fn case_id_rules() {
    for ok in [
        "a",
        "liver_001",
        "BraTS-GLI-00000-000",
        "x.y",
        &"a".repeat(128),
    ] {
        validate_case_id(ok).unwrap();
    }
    for bad in ["", ".hidden", "a/b", "a b", "é", &"a".repeat(129), "a\0"] {
        assert!(
            matches!(validate_case_id(bad), Err(StoreError::InvalidId { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn in_memory_files_read_like_mapped_files() {
    let dir = tempfile::tempdir().unwrap();
    let case = TestCase::new("mem", [9, 10, 11], &[DType::I16, DType::F32], DType::U16, 5);
    let path = case.write(dir.path(), [4, 4, 4]);
    let bytes = std::fs::read(&path).unwrap();
    let name = Path::new("remote/mem.pfc");
    let cache = ChunkCache::new(1 << 20);
    let mapped = CaseReader::open(&path, cache.clone()).unwrap();
    let held = CaseReader::from_bytes(name, &bytes, cache).unwrap();
    assert_eq!(held.path(), name);
    assert_eq!(held.meta(), mapped.meta());
    assert_eq!(held.stats(), mapped.stats());
    held.verify().unwrap();
    for array in arrays_of(&case) {
        let (origin, size) = ([-2, 3, 5], [12, 6, 9]);
        let (got, pad) = read_bytes(&held, array, origin, size, 0x2a).unwrap();
        let es = held.dtype(array).unwrap().size();
        let want = reference_crop(case.bytes(array), es, case.meta.shape, origin, size, &pad);
        assert_eq!(got, want, "{array}");
    }
    assert_eq!(held.class_locations(3), mapped.class_locations(3));
    // The same checks apply, and errors name the given path.
    for bad in [&bytes[..0], &bytes[..100], &bytes[..bytes.len() - 1]] {
        match CaseReader::from_bytes(name, bad, ChunkCache::new(0)) {
            Err(StoreError::Corrupt { path, .. }) => assert_eq!(path, name),
            other => panic!("{} bytes: expected Corrupt, got {other:?}", bad.len()),
        }
    }
}

#[test]
fn outside_mask_label_is_absent_in_older_headers_and_round_trips() {
    let mut meta = meta_for("m", [2, 3, 4], &[DType::F32], DType::U8);
    let mut json = serde_json::to_value(&meta).unwrap();
    json.as_object_mut().unwrap().remove("outside_mask_label");
    let old: CaseMeta = serde_json::from_value(json).unwrap();
    assert_eq!(old.outside_mask_label, None);
    meta.outside_mask_label = Some(5);
    let back: CaseMeta = serde_json::from_str(&serde_json::to_string(&meta).unwrap()).unwrap();
    assert_eq!(back.outside_mask_label, Some(5));
}

//! One robustness case for the case-file reader, shared by the `store_reader` fuzz target
//! (`fuzz/fuzz_targets/store_reader.rs`) and the `fuzz_regressions` test, so that a saved input
//! is replayed through exactly the code that found it.
//!
//! Input layout: byte 0 holds flags, bytes 1..9 seed the boxes that are read, the rest is the
//! case file.
//!
//! | bit of byte 0 | meaning |
//! | --- | --- |
//! | 0 | recompute every checksum (chunk payloads, sections, preamble) before opening, so that mutations reach the structure checks behind them instead of stopping at the first checksum |
//! | 1 | also set the preamble's file length to the real length |
//!
//! When the file opens, the run reads the whole volume of every array (up to
//! [`WHOLE_READ_MAX_VOXELS`]), a few boxes around and across the volume with both
//! `read_box` and `visit_box`, the class locations and the statistics, and verifies every
//! chunk (up to [`VERIFY_MAX_BYTES`] of decoded data).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use patchflow_store::{ArrayId, CaseReader, ChunkCache, DType, Element};
use xxhash_rust::xxh3::xxh3_64;

/// Largest array read as a whole.
pub const WHOLE_READ_MAX_VOXELS: usize = 1 << 18;
/// Largest box side read.
pub const BOX_MAX_SIDE: usize = 40;
/// Largest amount of decoded data [`CaseReader::verify`] is asked to check.
pub const VERIFY_MAX_BYTES: u64 = 64 << 20;
/// Boxes read per input.
const BOXES: usize = 4;

/// What happened to one input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the file opened.
    pub opened: bool,
    /// Reads (whole arrays and boxes) that succeeded and failed.
    pub reads_ok: usize,
    /// Reads that returned an error (e.g. a damaged chunk).
    pub reads_failed: usize,
    /// `None` when verification was skipped, else whether every chunk verified.
    pub verified: Option<bool>,
}

/// A small cache shared by every run, so that caching is exercised without growing.
fn cache() -> Arc<ChunkCache> {
    static CACHE: OnceLock<Arc<ChunkCache>> = OnceLock::new();
    CACHE.get_or_init(|| ChunkCache::new(4 << 20)).clone()
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// The byte range of section `(offset, len)` when it lies inside `len_total` bytes.
fn range(offset: u64, len: u64, len_total: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= len_total).then_some(start..end)
}

/// Recomputes chunk, section and preamble checksums (see FORMAT.md) wherever the ranges they
/// cover lie inside the file; with `set_len`, also the recorded file length.
pub fn fix_checksums(file: &mut [u8], set_len: bool) {
    if file.len() < 128 {
        return;
    }
    let n = file.len();
    let section = |f: &[u8], at: usize| -> Option<std::ops::Range<usize>> {
        range(u64_at(f, at)?, u64_at(f, at + 8)?, n)
    };
    if let Some(index) = section(file, 40) {
        for e in index.clone().step_by(32) {
            if e + 32 > index.end {
                break;
            }
            let kind = file[e];
            if kind != 1 && kind != 2 {
                continue;
            }
            let payload = u64_at(file, e + 8).zip(u64_at(file, e + 16));
            if let Some(p) = payload.and_then(|(o, l)| range(o, l, n)) {
                let sum = xxh3_64(&file[p]);
                put_u64(file, e + 24, sum);
            }
        }
    }
    for at in [40, 64, 88] {
        if let Some(r) = section(file, at) {
            let sum = xxh3_64(&file[r]);
            put_u64(file, at + 16, sum);
        }
    }
    if set_len {
        put_u64(file, 16, n as u64);
    }
    let sum = xxh3_64(&file[..120]);
    put_u64(file, 120, sum);
}

/// splitmix64: box parameters from the input's seed.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reads one box of `array` as `T` and checks it against a `visit_box` walk of the same box.
fn read_one<T: Element + bytemuck::Pod>(
    r: &CaseReader,
    array: ArrayId,
    origin: [i64; 3],
    size: [usize; 3],
    outcome: &mut Outcome,
) {
    let n = size[0] * size[1] * size[2];
    let pad: T = bytemuck::Zeroable::zeroed();
    let mut out = vec![pad; n];
    let read = r.read_box(array, origin, size, pad, &mut out);
    let mut covered = vec![0u8; n];
    let mut visited_bytes = Vec::new();
    let es = std::mem::size_of::<T>();
    let mut bad_run = false;
    let visit = r.visit_box(array, origin, size, &mut |run| {
        let Some(c) = covered.get_mut(run.dst..run.dst + run.len) else {
            bad_run = true;
            return;
        };
        for v in c.iter_mut() {
            *v += 1;
        }
        if let Some(src) = run.src {
            if src.len() != run.len * es {
                bad_run = true;
            }
            visited_bytes.push((run.dst, src.to_vec()));
        }
    });
    assert!(!bad_run, "visit_box handed out a run outside the box");
    match (&read, &visit) {
        (Ok(()), Ok(())) => {
            outcome.reads_ok += 1;
            assert!(
                covered.iter().all(|&c| c == 1),
                "visit_box covers every voxel once"
            );
            let out_bytes: &[u8] = bytemuck::cast_slice(&out);
            for (dst, src) in visited_bytes {
                assert_eq!(
                    &out_bytes[dst * es..dst * es + src.len()],
                    &src[..],
                    "read_box and visit_box agree"
                );
            }
        }
        (Err(_), Err(_)) => outcome.reads_failed += 1,
        _ => panic!("read_box and visit_box disagree: {read:?} vs {visit:?}"),
    }
    // Asking for another element type is an error, never a reinterpretation.
    if T::DTYPE != DType::F64 {
        let mut wrong = vec![0f64; n];
        assert!(r.read_box(array, origin, size, 0.0, &mut wrong).is_err());
    }
}

fn read_any(
    r: &CaseReader,
    array: ArrayId,
    origin: [i64; 3],
    size: [usize; 3],
    outcome: &mut Outcome,
) {
    let Ok(dtype) = r.dtype(array) else {
        return;
    };
    match dtype {
        DType::U8 => read_one::<u8>(r, array, origin, size, outcome),
        DType::I8 => read_one::<i8>(r, array, origin, size, outcome),
        DType::U16 => read_one::<u16>(r, array, origin, size, outcome),
        DType::I16 => read_one::<i16>(r, array, origin, size, outcome),
        DType::U32 => read_one::<u32>(r, array, origin, size, outcome),
        DType::I32 => read_one::<i32>(r, array, origin, size, outcome),
        DType::F32 => read_one::<f32>(r, array, origin, size, outcome),
        DType::F64 => read_one::<f64>(r, array, origin, size, outcome),
    }
}

/// Runs one input; panics only when a checked invariant of a successful result is broken.
pub fn run(data: &[u8]) -> Outcome {
    let mut outcome = Outcome::default();
    let Some((&flags, rest)) = data.split_first() else {
        return outcome;
    };
    let Some(seed) = rest.get(..8) else {
        return outcome;
    };
    let mut state = u64::from_le_bytes(seed.try_into().unwrap_or_default());
    let mut file = rest[8..].to_vec();
    if flags & 1 != 0 {
        fix_checksums(&mut file, flags & 2 != 0);
    }
    let Ok(r) = CaseReader::from_bytes(Path::new("case.pfc"), &file, cache()) else {
        return outcome;
    };
    outcome.opened = true;
    let meta = r.meta().clone();
    let shape = meta.shape;
    let total = shape.iter().product::<usize>();
    assert!(total >= 1);
    let arrays: Vec<ArrayId> = (0..meta.channels.len())
        .map(ArrayId::Image)
        .chain([ArrayId::Label])
        .collect();
    assert!(r.dtype(ArrayId::Image(meta.channels.len())).is_err());

    if total <= WHOLE_READ_MAX_VOXELS {
        for &a in &arrays {
            read_any(&r, a, [0, 0, 0], shape, &mut outcome);
        }
    }
    for _ in 0..BOXES {
        let mut origin = [0i64; 3];
        let mut size = [0usize; 3];
        for ax in 0..3 {
            let extent = shape[ax].min(1 << 20) as i64;
            let span = (extent + 2 * BOX_MAX_SIDE as i64) as u64;
            origin[ax] = (next(&mut state) % span) as i64 - BOX_MAX_SIDE as i64;
            size[ax] = (next(&mut state) % (BOX_MAX_SIDE as u64 + 1)) as usize;
        }
        let a = arrays[(next(&mut state) % arrays.len() as u64) as usize];
        read_any(&r, a, origin, size, &mut outcome);
    }

    for class in r.classes_with_locations() {
        for p in r.class_locations(class) {
            assert!(
                (0..3).all(|ax| (p[ax] as usize) < shape[ax]),
                "location inside the shape"
            );
        }
    }
    let stats = r.stats();
    assert_eq!(stats.arrays.len(), arrays.len());
    if stats.raw_bytes <= VERIFY_MAX_BYTES {
        outcome.verified = Some(r.verify().is_ok());
    }
    outcome
}

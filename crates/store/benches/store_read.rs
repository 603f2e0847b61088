//! Box reads from the chunk store against a plain in-memory copy, for several chunk shapes,
//! plus write throughput. Results and the chosen default chunk shape: benches/RESULTS.md.
//!
//! The case is a synthetic CT-like 256³ `i16` volume (air, a body with organs and bone, smooth
//! intensity variation, noise) with a `u8` label map (large constant background). Each
//! measured "box" reads the image and the label at the same, pseudo-random origin.
//!
//! Read timings are the benchmark thread's on-CPU time (from `/proc/thread-self/schedstat`,
//! wall time where that is unavailable): the development machine has two cores shared with
//! other work, and wall time there measures the neighbours as much as the code. Writes use
//! wall time (they run on several threads and wait for fsync).
//!
//! Groups: `plain/<edge>` (copy from memory), `warm/<chunk>/<edge>` (every chunk cached),
//! `cold/<chunk>/<edge>` (cache of capacity 0: every touched chunk is checked and
//! decompressed), `write/<chunk>` (whole case, fsync and rename included).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use patchflow_store::{
    ArrayId, CaseData, CaseMeta, CaseReader, ChannelMeta, ChunkCache, DType, Geometry, LabelData,
    Normalization, VoxelData, WriteOptions, write_case,
};

const N: usize = 256;
const EDGES: [usize; 5] = [32, 64, 96, 128, 192];
const CHUNKS: [[usize; 3]; 4] = [[16, 16, 16], [32, 32, 32], [32, 64, 64], [64, 64, 64]];

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Roughly normal noise (sum of four uniforms), standard deviation about `sd`.
    fn noise(&mut self, sd: f32) -> f32 {
        let r = self.next();
        let s: u32 = (0..4).map(|i| ((r >> (16 * i)) & 0xffff) as u32).sum();
        (s as f32 / 65535.0 - 2.0) * sd * 1.73
    }
}

/// On-CPU time of the calling thread in nanoseconds, if the kernel reports it. The yield makes
/// the kernel bring the figure up to date (it is otherwise refreshed once per scheduler tick).
fn thread_cpu_ns() -> Option<u64> {
    std::thread::yield_now();
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Runs `f` `iters` times and returns the thread's CPU time (wall time as a fallback).
fn timed(iters: u64, mut f: impl FnMut()) -> Duration {
    let (c0, w0) = (thread_cpu_ns(), Instant::now());
    for _ in 0..iters {
        f();
    }
    match (c0, thread_cpu_ns()) {
        (Some(a), Some(b)) => Duration::from_nanos(b.saturating_sub(a)),
        _ => w0.elapsed(),
    }
}

/// A CT-like volume in Hounsfield units and its label map.
fn phantom() -> (Vec<i16>, Vec<u8>) {
    let mut img = vec![0i16; N * N * N];
    let mut lab = vec![0u8; N * N * N];
    let mut rng = Rng(7);
    let c = N as f32 / 2.0;
    // (centre z, y, x, radius, HU, label)
    let organs = [
        (120.0, 110.0, 100.0, 38.0, 60.0, 1u8), // liver-like
        (140.0, 150.0, 160.0, 22.0, 35.0, 2),   // kidney-like
        (90.0, 140.0, 120.0, 14.0, 45.0, 3),    // tumour-like
    ];
    for z in 0..N {
        for y in 0..N {
            for x in 0..N {
                let (fz, fy, fx) = (z as f32, y as f32, x as f32);
                let body = ((fy - c) / 100.0).powi(2) + ((fx - c) / 118.0).powi(2);
                let i = (z * N + y) * N + x;
                let mut hu = if body < 1.0 {
                    // Fat/soft tissue with a slow gradient.
                    -80.0 + 60.0 * (fz / 40.0).sin() * (fx / 55.0).cos()
                } else {
                    -1000.0
                };
                if body < 1.0 {
                    let spine = ((fy - 200.0) / 14.0).powi(2) + ((fx - c) / 14.0).powi(2);
                    if spine < 1.0 {
                        hu = 700.0 + 200.0 * (fz / 9.0).sin();
                    }
                    for &(oz, oy, ox, r, v, l) in &organs {
                        let d = ((fz - oz).powi(2) + (fy - oy).powi(2) + (fx - ox).powi(2)).sqrt();
                        if d < r {
                            hu = v + 10.0 * (d / 6.0).sin();
                            lab[i] = l;
                        }
                    }
                }
                img[i] = (hu + rng.noise(12.0)).round().clamp(-1024.0, 3071.0) as i16;
            }
        }
    }
    (img, lab)
}

fn meta() -> CaseMeta {
    CaseMeta {
        id: "bench_ct".to_owned(),
        shape: [N; 3],
        spacing: [1.0; 3],
        original: Geometry {
            shape: [N; 3],
            spacing: [1.0; 3],
            affine: [
                [1.0, 0.0, 0.0, 0.0],
                [0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        },
        crop_box: [[0, N]; 3],
        channels: vec![ChannelMeta {
            name: "CT".to_owned(),
            dtype: DType::I16,
            norm: Normalization::IDENTITY,
        }],
        label_dtype: DType::U8,
        label_names: BTreeMap::new(),
        class_voxels: BTreeMap::new(),
        ignore_label: None,
        outside_mask_label: None,
    }
}

/// Pseudo-random box origins, fully inside the volume.
fn origins(edge: usize) -> Vec<[i64; 3]> {
    let mut rng = Rng(edge as u64);
    (0..64)
        .map(|_| [0, 1, 2].map(|_| (rng.next() % (N - edge + 1) as u64) as i64))
        .collect()
}

/// Copy of a box from an in-memory C-order volume, one row at a time.
fn plain_copy<T: Copy>(src: &[T], origin: [i64; 3], e: usize, out: &mut [T]) {
    let [z0, y0, x0] = origin.map(|o| o as usize);
    for z in 0..e {
        for y in 0..e {
            let s = ((z0 + z) * N + y0 + y) * N + x0;
            let d = (z * e + y) * e;
            out[d..d + e].copy_from_slice(&src[s..s + e]);
        }
    }
}

fn chunk_name(c: [usize; 3]) -> String {
    format!("{}x{}x{}", c[0], c[1], c[2])
}

fn write(path: &Path, channels: &[VoxelData], label: &LabelData, chunk: [usize; 3]) -> u64 {
    let meta = meta();
    let locations = BTreeMap::new();
    let data = CaseData {
        meta: &meta,
        channels,
        label,
        class_locations: &locations,
    };
    let opts = WriteOptions {
        chunk_shape: chunk,
        zstd_level: 1,
    };
    match write_case(path, &data, &opts) {
        Ok(r) => r.stored_bytes,
        Err(e) => panic!("write failed: {e}"),
    }
}

fn bench(c: &mut Criterion) {
    let (img, lab) = phantom();
    let channels = [VoxelData::I16(img.clone())];
    let label = LabelData::U8(lab.clone());
    let dir = std::env::temp_dir().join(format!("patchflow-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let raw_bytes = (img.len() * 2 + lab.len()) as u64;

    // Plain copy from memory.
    {
        let mut g = c.benchmark_group("plain");
        for &e in &EDGES {
            let os = origins(e);
            let mut out_i = vec![0i16; e * e * e];
            let mut out_l = vec![0u8; e * e * e];
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::from_parameter(e), &e, |b, &e| {
                let mut k = 0;
                b.iter_custom(|iters| {
                    timed(iters, || {
                        let o = os[k % os.len()];
                        k += 1;
                        plain_copy(&img, o, e, &mut out_i);
                        plain_copy(&lab, o, e, &mut out_l);
                        black_box((&out_i, &out_l));
                    })
                })
            });
        }
        g.finish();
    }

    for &chunk in &CHUNKS {
        let name = chunk_name(chunk);
        let path = dir.join(format!("case_{name}.pfc"));
        let stored = write(&path, &channels, &label, chunk);
        {
            let r = CaseReader::open(&path, ChunkCache::new(0)).expect("open");
            let st = r.stats();
            println!(
                "stats {name}: file {stored} bytes, ratio {:.2}; image ratio {:.2}, \
                 label ratio {:.1} ({} of {} label chunks constant)",
                st.compression_ratio(),
                st.arrays[0].compression_ratio(),
                st.arrays[1].compression_ratio(),
                st.arrays[1].constant_chunks,
                st.arrays[1].chunks,
            );
        }

        {
            let mut g = c.benchmark_group("write");
            g.sample_size(10);
            g.throughput(Throughput::Bytes(raw_bytes));
            g.bench_function(&name, |b| {
                b.iter(|| black_box(write(&path, &channels, &label, chunk)));
            });
            g.finish();
        }

        for (mode, capacity) in [("warm", 1u64 << 30), ("cold", 0)] {
            let cache = ChunkCache::new(capacity);
            let r = CaseReader::open(&path, Arc::clone(&cache)).expect("open");
            if capacity > 0 {
                let mut all_i = vec![0i16; N * N * N];
                let mut all_l = vec![0u8; N * N * N];
                r.read_box(ArrayId::Image(0), [0; 3], [N; 3], 0, &mut all_i)
                    .expect("read");
                r.read_box(ArrayId::Label, [0; 3], [N; 3], 0, &mut all_l)
                    .expect("read");
                assert!(all_i == img && all_l == lab, "store returned wrong voxels");
            }
            let mut g = c.benchmark_group(format!("{mode}/{name}"));
            for &e in &EDGES {
                let os = origins(e);
                let mut out_i = vec![0i16; e * e * e];
                let mut out_l = vec![0u8; e * e * e];
                g.throughput(Throughput::Elements(1));
                g.bench_with_input(BenchmarkId::from_parameter(e), &e, |b, &e| {
                    let mut k = 0;
                    b.iter_custom(|iters| {
                        timed(iters, || {
                            let o = os[k % os.len()];
                            k += 1;
                            r.read_box(ArrayId::Image(0), o, [e; 3], 0, &mut out_i)
                                .expect("read");
                            r.read_box(ArrayId::Label, o, [e; 3], 0, &mut out_l)
                                .expect("read");
                            black_box((&out_i, &out_l));
                        })
                    })
                });
            }
            g.finish();
            let s = cache.stats();
            println!(
                "cache {mode}/{name}: hits {} misses {} cached {} bytes",
                s.hits, s.misses, s.bytes_cached
            );
        }
        let _ = std::fs::remove_file(&path);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);

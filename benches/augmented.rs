//! Sampler throughput with nnU-Net's default augmentation against plain crops, per core:
//! `Sampler::sample` on one rayon thread from a warm chunk cache, batch 2, foreground fraction
//! 0.33, `f32` output. Setting: one synthetic CT-like case of 224×256×256 voxels stored as `i16`
//! with CT normalisation and `u8` labels (the store benchmark's case). Augmented items read the
//! larger source region rotation and scaling need, so this includes that extra read. Times are
//! the worker thread's on-CPU time (`/proc/thread-self/schedstat`, wall time where that file is
//! missing): on a shared machine wall time mostly measures the neighbours.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use patchflow_sampler::{AugmentSpec, BatchRequest, Dataset, OutputDType, Patch, Policy, Sampler};
use patchflow_store::ChunkCache;

mod common;

use common::SHAPE;

const BATCH: usize = 2;

fn open_dataset(dir: &std::path::Path) -> Dataset {
    common::write_store(dir);
    // Large enough to hold the whole case decompressed.
    Dataset::open("bench", dir, ChunkCache::new(1 << 30)).expect("open")
}

/// Time this thread has spent on a CPU, or `None` where the kernel does not say.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Runs `f` and returns its on-CPU time on this thread (wall time where unavailable).
fn timed(f: impl FnOnce()) -> Duration {
    let (cpu, wall) = (thread_cpu(), Instant::now());
    f();
    match (cpu, thread_cpu()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => wall.elapsed(),
    }
}

fn request(edge: usize, augment: Option<AugmentSpec>) -> BatchRequest {
    BatchRequest {
        patch: Patch::cube(edge).expect("patch"),
        batch: BATCH,
        policy: Policy::ForegroundOversample { fraction: 0.33 },
        crops_per_case: 1,
        dtype: OutputDType::F32,
        seed: 7,
        cases: None,
        augment,
    }
}

fn sampling(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sampler = Sampler::new(Arc::new(open_dataset(dir.path())));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    // Warm the chunk cache with the whole volume.
    let mut warm = request(256, None);
    warm.patch = Patch::new(SHAPE).expect("patch");
    warm.batch = 1;
    warm.policy = Policy::Uniform;
    pool.install(|| sampler.sample(&warm, 0).expect("warm-up"));

    let mut group = c.benchmark_group("sampler_augmented");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    for edge in [64usize, 128] {
        for (name, spec) in [
            ("crop", None),
            ("nnunet_preset", Some(AugmentSpec::nnunet_default())),
        ] {
            let req = request(edge, spec);
            let mut index = 0u64;
            group.bench_function(BenchmarkId::new(name, edge), |b| {
                // The single pool thread runs the whole batch, so its clock sees all the work.
                b.iter_custom(|iters| {
                    pool.install(|| {
                        timed(|| {
                            for _ in 0..iters {
                                index += 1;
                                let batch = sampler.sample(&req, index).expect("sample");
                                black_box(batch.image.len() + batch.label.len());
                            }
                        })
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, sampling);
criterion_main!(benches);

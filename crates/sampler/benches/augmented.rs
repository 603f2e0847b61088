//! Sampler throughput with nnU-Net's default augmentation against plain crops, per core:
//! `Sampler::sample` on one rayon thread from a warm chunk cache, batch 2, foreground fraction
//! 0.33, `f32` output. Setting: one synthetic CT-like case of 224×256×256 voxels stored as `i16`
//! with CT normalisation and `u8` labels (the store benchmark's case). Augmented items read the
//! larger source region rotation and scaling need, so this includes that extra read. Times are
//! the worker thread's on-CPU time (`/proc/thread-self/schedstat`, wall time where that file is
//! missing): on a shared machine wall time mostly measures the neighbours.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use patchflow_sampler::{AugmentSpec, BatchRequest, Dataset, OutputDType, Policy, Sampler};
use patchflow_store::{
    CaseData, CaseMeta, ChannelMeta, ChunkCache, Manifest, ManifestCase, WriteOptions,
    case_file_name, write_case,
};
use patchflow_volume::{DType, Geometry, LabelData, NormScheme, Normalization, VoxelData};

const SHAPE: [usize; 3] = [224, 256, 256];
const BATCH: usize = 2;

/// Smooth intensities with noise and two spherical organs.
fn synthetic() -> (Vec<i16>, Vec<u8>) {
    let n: usize = SHAPE.iter().product();
    let mut image = Vec::with_capacity(n);
    let mut label = Vec::with_capacity(n);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let blobs = [
        ([60.0, 90.0, 100.0], 25.0, 1u8),
        ([150.0, 160.0, 170.0], 12.0, 2u8),
    ];
    for z in 0..SHAPE[0] {
        for y in 0..SHAPE[1] {
            for x in 0..SHAPE[2] {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state % 41) as i16 - 20;
                let base = ((z + 2 * y + x) % 400) as i16 - 150;
                let mut l = 0u8;
                for (c, r, class) in blobs {
                    let d2 = (z as f64 - c[0]).powi(2)
                        + (y as f64 - c[1]).powi(2)
                        + (x as f64 - c[2]).powi(2);
                    if d2 < r * r {
                        l = class;
                    }
                }
                image.push(base + noise + i16::from(l) * 60);
                label.push(l);
            }
        }
    }
    (image, label)
}

fn open_dataset(dir: &std::path::Path) -> Dataset {
    let (image, label) = synthetic();
    let mut class_voxels: BTreeMap<u16, u64> = BTreeMap::new();
    let mut locations: BTreeMap<u16, Vec<[u32; 3]>> = BTreeMap::new();
    for (i, &l) in label.iter().enumerate() {
        *class_voxels.entry(u16::from(l)).or_default() += 1;
        if l != 0 && i % 7 == 0 {
            let x = i % SHAPE[2];
            let y = (i / SHAPE[2]) % SHAPE[1];
            let z = i / (SHAPE[1] * SHAPE[2]);
            locations
                .entry(u16::from(l))
                .or_default()
                .push([z as u32, y as u32, x as u32]);
        }
    }
    let identity = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let meta = CaseMeta {
        id: "bench".into(),
        shape: SHAPE,
        spacing: [1.0; 3],
        original: Geometry {
            shape: SHAPE,
            spacing: [1.0; 3],
            affine: identity,
        },
        crop_box: [[0, SHAPE[0]], [0, SHAPE[1]], [0, SHAPE[2]]],
        channels: vec![ChannelMeta {
            name: "CT".into(),
            dtype: DType::I16,
            norm: Normalization {
                scheme: NormScheme::Ct,
                clip: Some([-150.0, 300.0]),
                mean: 40.0,
                inv_std: 1.0 / 90.0,
            },
        }],
        label_dtype: DType::U8,
        label_names: BTreeMap::new(),
        class_voxels,
        ignore_label: None,
    };
    let file = case_file_name(&meta.id);
    let report = write_case(
        &dir.join(&file),
        &CaseData {
            meta: &meta,
            channels: &[VoxelData::I16(image)],
            label: &LabelData::U8(label),
            class_locations: &locations,
        },
        &WriteOptions::default(),
    )
    .expect("write case");
    Manifest {
        format: 1,
        dataset: "bench".into(),
        plan: serde_json::Value::Null,
        cases: vec![ManifestCase {
            id: meta.id.clone(),
            file,
            stored_bytes: report.stored_bytes,
            source: serde_json::Value::Null,
        }],
    }
    .save(dir)
    .expect("manifest");
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
        patch: [edge; 3],
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
    warm.patch = SHAPE;
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

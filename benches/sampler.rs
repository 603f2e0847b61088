//! In-process sampling throughput: patches per second served by `Sampler::sample` from a warm
//! chunk cache, against a plain row-by-row copy of the same bytes from in-memory arrays.
//!
//! Also, in the same run: the same sampling with no chunk cache (every chunk decompressed), and
//! the daemon over loopback gRPC with one sampling worker (client prefetching, as a trainer does).
//!
//! Setting: one synthetic CT-like case of 224×256×256 voxels stored as `i16` with CT
//! normalisation and `u8` labels; batch 2, foreground fraction 0.33, `f32` image output, one
//! rayon thread (figures are per core). Patch edges 32…192.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use patchflow_sampler::{BatchRequest, Dataset, OutputDType, Patch, Policy, Sampler};
use patchflow_store::{ArrayId, ChunkCache};

mod common;

use common::SHAPE;

const BATCH: usize = 2;
const EDGES: [usize; 6] = [32, 64, 96, 128, 160, 192];

/// Copies the box at `origin` of size `patch` (fully inside the volume) row by row.
fn copy_box<T: Copy>(src: &[T], origin: [usize; 3], patch: [usize; 3], dst: &mut [T]) {
    let row = patch[2];
    let mut k = 0;
    for z in 0..patch[0] {
        for y in 0..patch[1] {
            let s = ((origin[0] + z) * SHAPE[1] + origin[1] + y) * SHAPE[2] + origin[2];
            dst[k..k + row].copy_from_slice(&src[s..s + row]);
            k += row;
        }
    }
}

/// The in-process samplers: one over a chunk cache warmed with the whole case, one with no
/// cache (every touched chunk is checksummed and decompressed); and the one-thread pool.
fn samplers(store: &std::path::Path) -> (Sampler, Sampler, rayon::ThreadPool) {
    // Large enough to hold the whole case decompressed: every chunk is warm after one pass.
    let cache = ChunkCache::new(1 << 30);
    let dataset = Arc::new(Dataset::open("bench", store, cache).expect("open"));
    let sampler = Sampler::new(dataset);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");

    // Warm the cache: a uniform batch of the largest patch at many origins touches every chunk.
    let warm = BatchRequest {
        patch: Patch::new(SHAPE).expect("patch"),
        batch: 1,
        policy: Policy::Uniform,
        crops_per_case: 1,
        dtype: OutputDType::F32,
        seed: 0,
        cases: None,
        augment: None,
    };
    pool.install(|| sampler.sample(&warm, 0).expect("warm-up"));

    let cold = Sampler::new(Arc::new(
        Dataset::open("bench", store, ChunkCache::new(0)).expect("open"),
    ));
    (sampler, cold, pool)
}

/// The daemon over loopback gRPC: one sampling worker, the store, a cache warmed the same way;
/// and a client of it.
fn daemon(
    store: &std::path::Path,
) -> (
    tokio::runtime::Runtime,
    patchflow_server::RunningServer,
    patchflow_client::Client,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime
        .block_on(patchflow_server::start(patchflow_server::ServerConfig {
            stores: vec![store.to_path_buf()],
            listen: Some("127.0.0.1:0".parse().expect("address")),
            workers: 1,
            cache_mb: 1024,
            ..Default::default()
        }))
        .expect("server");
    let endpoint = server.endpoint().expect("endpoint");
    let client = runtime
        .block_on(patchflow_client::Client::connect(
            [endpoint],
            patchflow_client::ClientOptions::default(),
        ))
        .expect("client");
    {
        let mut cfg =
            patchflow_client::StreamConfig::new("bench".to_string(), SHAPE.map(|v| v as i64), 1);
        cfg.policy = patchflow_client::Policy::Uniform;
        let mut stream = runtime.block_on(client.stream(cfg)).expect("stream");
        runtime.block_on(stream.next()).expect("warm-up batch");
    }
    (runtime, server, client)
}

fn sampling(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The daemon serves a folder named like an identifier (dataset names are identifiers).
    let store = tmp.path().join("bench");
    std::fs::create_dir_all(&store).expect("store folder");
    let (image, label) = common::write_store(&store);
    let (sampler, cold, pool) = samplers(&store);
    let (runtime, server, client) = daemon(&store);
    let dataset_name = "bench".to_string();

    let image_f32: Vec<f32> = image.iter().map(|&v| f32::from(v)).collect();
    let mut group = c.benchmark_group("sampler");
    group.sample_size(10);
    for edge in EDGES {
        let patch = [edge; 3];
        let voxels = edge * edge * edge;
        group.throughput(Throughput::Elements(BATCH as u64));
        let req = BatchRequest {
            patch: Patch::new(patch).expect("patch"),
            batch: BATCH,
            policy: Policy::ForegroundOversample { fraction: 0.33 },
            crops_per_case: 1,
            dtype: OutputDType::F32,
            seed: 7,
            cases: None,
            augment: None,
        };
        let mut index = 0u64;
        group.bench_function(BenchmarkId::new("sample_warm_f32", edge), |b| {
            b.iter(|| {
                index += 1;
                let batch = pool
                    .install(|| sampler.sample(&req, index))
                    .expect("sample");
                black_box(batch.image.len() + batch.label.len())
            })
        });

        let mut cold_index = 0u64;
        group.bench_function(BenchmarkId::new("sample_cold_f32", edge), |b| {
            b.iter(|| {
                cold_index += 1;
                let batch = pool
                    .install(|| cold.sample(&req, cold_index))
                    .expect("sample");
                black_box(batch.image.len() + batch.label.len())
            })
        });

        let mut cfg = patchflow_client::StreamConfig::new(
            dataset_name.clone(),
            patch.map(|v| v as i64),
            BATCH as u32,
        );
        cfg.seed = 7;
        let mut stream = runtime.block_on(client.stream(cfg)).expect("stream");
        group.bench_function(BenchmarkId::new("grpc_loopback_warm_f32", edge), |b| {
            b.iter(|| {
                let batch = runtime.block_on(stream.next()).expect("batch");
                black_box(batch.image.len() + batch.label.len())
            })
        });
        drop(stream);

        // The store alone: typed box reads of the stored i16 image and u8 label into reused
        // buffers (no conversion, no allocation) at the origins the sampler chose.
        let reader = Arc::clone(&sampler.dataset().cases()[0]);
        let mut raw_img = vec![0i16; voxels];
        let mut raw_lab = vec![0u8; voxels];
        let mut j = 0u64;
        group.bench_function(BenchmarkId::new("store_read_box_i16", edge), |b| {
            b.iter(|| {
                j += 1;
                let items = sampler.plan(&req, j).expect("plan");
                for item in &items {
                    reader
                        .read_box(ArrayId::Image(0), item.origin, patch, 0i16, &mut raw_img)
                        .expect("read image");
                    reader
                        .read_box(ArrayId::Label, item.origin, patch, 255u8, &mut raw_lab)
                        .expect("read label");
                }
                black_box((&raw_img, &raw_lab));
            })
        });

        let mut out_img = vec![0f32; BATCH * voxels];
        let mut out_lab = vec![0u8; BATCH * voxels];
        let origins: Vec<[usize; 3]> = (0..16)
            .map(|k| {
                let span = |a: usize| (SHAPE[a] - edge) * k / 16;
                [span(0), span(1), span(2)]
            })
            .collect();
        let mut k = 0usize;
        group.bench_function(BenchmarkId::new("plain_copy_f32", edge), |b| {
            b.iter(|| {
                for item in 0..BATCH {
                    let o = origins[(k + item) % origins.len()];
                    let range = item * voxels..(item + 1) * voxels;
                    copy_box(&image_f32, o, patch, &mut out_img[range.clone()]);
                    copy_box(&label, o, patch, &mut out_lab[range]);
                }
                k += BATCH;
                black_box((&out_img, &out_lab));
            })
        });
    }
    group.finish();
    runtime.block_on(server.shutdown()).expect("shutdown");
}

criterion_group!(benches, sampling);
criterion_main!(benches);

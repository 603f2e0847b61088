//! A fixed amount of sampling work on one thread, for instruction counts and profiles:
//! `sample_loop STORE EDGE N` samples batches 0..N (2 items of EDGE³, foreground 0.33, f32)
//! twice from a store through a cache large enough to hold it, the second pass timed.
//!
//! Run under `valgrind --tool=callgrind` with two values of N: the difference of the counts is
//! the cost of N warm batches (and N cold-cache ones of the first pass), free of the opening.

use std::sync::Arc;

use patchflow_sampler::{BatchRequest, Dataset, OutputDType, Patch, Policy, Sampler};
use patchflow_store::ChunkCache;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, store, edge, n] = args.as_slice() else {
        eprintln!("usage: sample_loop STORE EDGE N");
        std::process::exit(2);
    };
    let edge: usize = edge.parse().expect("EDGE is a number");
    let n: u64 = n.parse().expect("N is a number");
    let dataset = Dataset::open("store", store.as_ref(), ChunkCache::new(1 << 31)).expect("open");
    let sampler = Sampler::new(Arc::new(dataset));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let req = BatchRequest {
        patch: Patch::cube(edge).expect("a valid edge"),
        batch: 2,
        policy: Policy::ForegroundOversample { fraction: 0.33 },
        crops_per_case: 1,
        dtype: OutputDType::F32,
        seed: 7,
        cases: None,
        augment: None,
    };
    let mut bytes = 0usize;
    let mut pass = || {
        for i in 0..n {
            let batch = pool.install(|| sampler.sample(&req, i)).expect("sample");
            bytes += batch.image.len() + batch.label.len();
        }
    };
    pass();
    let start = std::time::Instant::now();
    pass();
    let ms = start.elapsed().as_secs_f64() * 1e3 / n.max(1) as f64;
    println!("{edge}³ × 2: {ms:.3} ms per warm batch ({bytes} bytes in all)");
}

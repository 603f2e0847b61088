//! Streams batches from a patchflow daemon with the Rust client and writes them out: the Rust
//! side of "Using it" in the README, and the reference the Python package's tests compare
//! their batches with, voxel for voxel.
//!
//! ```sh
//! cargo run --example stream_batches -- --endpoint unix:/run/patchflow.sock --dataset liver \
//!     --patch 64,64,64 --batch 2 --count 4 --out /tmp/batches
//! ```
//!
//! Prints one JSON line per batch (index, shapes, dtypes, items); with `--out DIR` also writes
//! the image and label bytes of batch `k` to `DIR/k.image` and `DIR/k.label`. With
//! `--seconds S` it measures instead: batches received per second (benches/compare).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use patchflow_client::{
    Augmentation, Client, ClientOptions, ImageDtype, Policy, SharedMemory, StreamConfig,
};

/// Stream batches from a patchflow daemon with the Rust client.
#[derive(Parser, Debug)]
struct Args {
    /// Daemon endpoint (`unix:/path`, `http://host:port`); repeat for several daemons.
    #[arg(long, required = true)]
    endpoint: Vec<String>,
    /// Dataset name.
    #[arg(long)]
    dataset: String,
    /// Patch size `z,y,x`.
    #[arg(long, value_delimiter = ',', default_value = "32,32,32")]
    patch: Vec<i64>,
    /// Items per batch.
    #[arg(long, default_value_t = 2)]
    batch: u32,
    /// Share of foreground-forced items (nnU-Net oversampling).
    #[arg(long, default_value_t = 0.33)]
    fraction: f64,
    /// Seed of the sequence.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image element type: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Augmentation preset (e.g. `nnunet`).
    #[arg(long)]
    augment: Option<String>,
    /// First batch index.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Distance between batch indices.
    #[arg(long, default_value_t = 1)]
    stride: u64,
    /// Batches to fetch.
    #[arg(long, default_value_t = 4)]
    count: u64,
    /// Shared memory: auto, on or off.
    #[arg(long, default_value = "auto")]
    shared_memory: String,
    /// Folder for the batches' bytes.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Instead of `--count` batches: stream for this many seconds after `--warmup` batches
    /// and print one JSON line with the patches received and the wall time (a benchmark).
    #[arg(long, conflicts_with = "out")]
    seconds: Option<f64>,
    /// Batches received before the timed part of `--seconds`.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shared_memory = match args.shared_memory.as_str() {
        "auto" => SharedMemory::Auto,
        "on" => SharedMemory::On,
        "off" => SharedMemory::Off,
        other => anyhow::bail!("--shared-memory {other:?}: expected auto, on or off"),
    };
    let dtype = match args.dtype.as_str() {
        "f32" => ImageDtype::F32,
        "f16" => ImageDtype::F16,
        "bf16" => ImageDtype::Bf16,
        other => anyhow::bail!("--dtype {other:?}: expected f32, f16 or bf16"),
    };
    let patch: [i64; 3] = args
        .patch
        .as_slice()
        .try_into()
        .context("--patch needs three edges")?;
    let options = ClientOptions {
        shared_memory,
        ..ClientOptions::default()
    };
    let client = Client::connect(&args.endpoint, options).await?;
    let mut config = StreamConfig::new(&args.dataset, patch, args.batch);
    config.policy = Policy::ForegroundOversample {
        fraction: args.fraction,
    };
    config.seed = args.seed;
    config.dtype = dtype;
    config.augmentation = args.augment.map(|preset| Augmentation {
        preset,
        ..Augmentation::default()
    });
    let mut stream = client
        .stream_strided(config, args.start, args.stride)
        .await?;
    if let Some(seconds) = args.seconds {
        for _ in 0..args.warmup {
            stream.next().await?;
        }
        let start = std::time::Instant::now();
        let (mut batches, mut patches) = (0u64, 0u64);
        while batches < 2 || start.elapsed().as_secs_f64() < seconds {
            let batch = stream.next().await?;
            // What a trainer does first: look at the buffers it will turn into tensors.
            std::hint::black_box((batch.image.as_ptr(), batch.label.as_ptr()));
            batches += 1;
            patches += batch.batch_size as u64;
        }
        let wall = start.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"batches": batches, "patches": patches, "wall_s": wall,
                               "patches_per_s": patches as f64 / wall})
        );
        return Ok(());
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for _ in 0..args.count {
        let batch = stream.next().await?;
        if let Some(dir) = &args.out {
            for (suffix, bytes) in [("image", &batch.image), ("label", &batch.label)] {
                let path = dir.join(format!("{}.{suffix}", batch.index));
                std::fs::write(&path, bytes.as_ref())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        let items: Vec<serde_json::Value> = batch
            .items
            .iter()
            .map(|i| {
                serde_json::json!({
                    "case": i.case_id,
                    "case_index": i.case_index,
                    "origin": i.origin,
                    "forced_foreground": i.forced_foreground,
                    "class_value": i.class,
                    "augmentation": i.augment_json,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "index": batch.index,
                "image_shape": batch.image_shape(),
                "label_shape": batch.label_shape(),
                "dtype": batch.dtype.as_str_name(),
                "label_dtype": batch.label_dtype.as_str_name(),
                "items": items,
            })
        );
    }
    Ok(())
}

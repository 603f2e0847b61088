//! `patchflow bench peer`: one loader configuration on one core, for side-by-side tables with
//! other loaders (nnU-Net, MONAI, TorchIO, a plain memmap crop).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use patchflow_sampler::{AugmentSpec, BatchRequest, Patch};
use serde::Serialize;

use crate::daemon::{Daemon, DaemonSpec};
use crate::measure::{Counts, InProcess, Until, crop_request, crop_stream, run_remote};
use crate::procstat;
use crate::{BenchError, Transport};

/// Settings of [`run_peer`].
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The store.
    pub store: PathBuf,
    /// Patch size `[z, y, x]`.
    pub patch: Patch,
    /// Items per batch.
    pub batch: usize,
    /// Foreground-oversampled share.
    pub foreground: f64,
    /// Measured time (after a warm-up of a quarter of it, at most 10 s).
    pub seconds: f64,
    /// In process or through a daemon.
    pub transport: Transport,
    /// nnU-Net's default training augmentation on every item.
    pub augment: bool,
    /// Sampling threads (in process) or daemon workers.
    pub workers: usize,
    /// The `patchflow` binary (for the daemon).
    pub exe: Option<PathBuf>,
    /// Where the daemon writes its log.
    pub log: PathBuf,
    /// Chunk cache, MiB.
    pub cache_mb: u64,
    /// Further arguments for `patchflow serve`.
    pub daemon_args: Vec<String>,
}

/// What [`run_peer`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct PeerReport {
    /// Always "patchflow".
    pub tool: &'static str,
    /// Where the patches were cut.
    pub transport: Transport,
    /// "nnunet" or "none".
    pub augment: &'static str,
    /// Patch size.
    pub patch: [usize; 3],
    /// Items per batch.
    pub batch: usize,
    /// Foreground share.
    pub foreground: f64,
    /// Sampling threads / daemon workers.
    pub workers: usize,
    /// Batches received.
    pub batches: u64,
    /// Patches received.
    pub patches: u64,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// CPU seconds of every process involved (daemon and client over gRPC).
    pub cpu_s: f64,
    /// Patches per wall second.
    pub patches_per_s: f64,
    /// Patches per CPU second: the per-core figure.
    pub patches_per_cpu_s: f64,
}

/// Measures one configuration.
pub fn run_peer(cfg: &PeerConfig, stop: &AtomicBool) -> Result<PeerReport, BenchError> {
    if !(cfg.seconds.is_finite() && cfg.seconds > 0.0) {
        return Err(BenchError::Config {
            field: "--seconds",
            reason: format!("{} (must be > 0)", cfg.seconds),
        });
    }
    let seconds = Duration::from_secs_f64(cfg.seconds);
    let warmup = Duration::from_secs_f64((cfg.seconds / 4.0).min(10.0));
    let name = cfg
        .store
        .file_name()
        .map_or_else(|| "store".into(), |n| n.to_string_lossy().into_owned());
    let (counts, cpu_s): (Counts, f64) = match cfg.transport {
        Transport::InProcess => {
            let local = InProcess::open(&name, &cfg.store, cfg.cache_mb, cfg.workers)?;
            let req = BatchRequest {
                augment: cfg.augment.then(AugmentSpec::nnunet_default),
                ..crop_request(cfg.patch, cfg.batch, cfg.foreground, 0)
            };
            local.run(&req, 1 << 40, Until::Elapsed(warmup), stop)?;
            let (counts, me, _) = local.run(&req, 0, Until::Elapsed(seconds), stop)?;
            (counts, me.cpu_s)
        }
        Transport::Grpc | Transport::GrpcPlain | Transport::GrpcShared => {
            let exe = cfg.exe.clone().ok_or(BenchError::Config {
                field: "--transport",
                reason: "grpc needs the patchflow binary".into(),
            })?;
            let spec = DaemonSpec {
                exe,
                stores: vec![cfg.store.clone()],
                workers: cfg.workers,
                cache_mb: cfg.cache_mb,
                max_streams: None,
                log: cfg.log.clone(),
                shared_memory: true,
                extra_args: cfg.daemon_args.clone(),
            };
            let runtime = crate::daemon::current_thread_runtime()?;
            runtime.block_on(async {
                let mut daemon = Daemon::start(&spec).await?;
                let mut config = crop_stream(&name, cfg.patch.axes(), cfg.batch, cfg.foreground, 0);
                if cfg.augment {
                    config.augmentation = Some(patchflow_proto::v1::Augmentation {
                        preset: patchflow_sampler::AugmentSpec::NNUNET_PRESET.into(),
                        ..Default::default()
                    });
                }
                let endpoint = daemon.endpoint();
                run_remote(
                    &endpoint,
                    &config,
                    1,
                    cfg.transport,
                    warmup,
                    Until::Batches(0),
                    stop,
                )
                .await?;
                let d0 = daemon.sample()?;
                let c0 = procstat::sample(None)?;
                let counts = run_remote(
                    &endpoint,
                    &config,
                    1,
                    cfg.transport,
                    Duration::ZERO,
                    Until::Elapsed(seconds),
                    stop,
                )
                .await?;
                let d = daemon.sample()?.since(&d0);
                let c = procstat::sample(None)?.since(&c0);
                daemon.stop()?;
                Ok::<_, BenchError>((counts, d.cpu_s + c.cpu_s))
            })?
        }
    };
    let wall = counts.wall_s.max(1e-9);
    Ok(PeerReport {
        tool: "patchflow",
        transport: cfg.transport,
        augment: if cfg.augment { "nnunet" } else { "none" },
        patch: cfg.patch.axes(),
        batch: cfg.batch,
        foreground: cfg.foreground,
        workers: cfg.workers,
        batches: counts.batches,
        patches: counts.patches,
        wall_s: counts.wall_s,
        cpu_s,
        patches_per_s: counts.patches as f64 / wall,
        patches_per_cpu_s: counts.patches as f64 / cpu_s.max(1e-9),
    })
}

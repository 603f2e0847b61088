//! What a training run is configured with ([`TrainConfig`]), and its resolution against the
//! dataset and the machine ([`Setup`]): the device, the train/validation split, the network and
//! the schedule.

use std::path::PathBuf;

use patchflow_curriculum::{Mode, NO_POOL_CAP, Schedule, plan_pooling};
use patchflow_grid::Patch;
use tch::Device;

use crate::TrainerError;
use crate::data::{BatchSource, SourceInfo};
use crate::device::{DeviceChoice, resolve_device, set_cuda_autocast_bf16};
use crate::optim::{INITIAL_LR, SgdConfig};
use crate::unet::{DEFAULT_BASE_FEATURES, DEFAULT_MAX_FEATURES, UNetConfig};

/// Everything a training run is configured with.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Curriculum.
    pub mode: Mode,
    /// Total epochs.
    pub epochs: usize,
    /// Iterations per epoch.
    pub iters_per_epoch: usize,
    /// Final (planned) patch `[z, y, x]`, used by the last stage and validation.
    pub final_patch: [usize; 3],
    /// Poolings per axis; `None` plans them from the final patch and the median spacing.
    pub pools: Option<[u32; 3]>,
    /// Planned batch size.
    pub batch: usize,
    /// Cases held out for validation: the last `val_cases` case ids.
    pub val_cases: usize,
    /// Validation batches of every epoch: the final patch and the planned batch, cut from the
    /// validation cases, scored with nnU-Net's pseudo-Dice; 0 = none. `None` = a fifth of
    /// `iters_per_epoch` (at least 1): nnU-Net's 50 for its 250 iterations, and the same share
    /// of a shortened epoch (nnU-Net keeps 50 whatever the epoch's length).
    pub val_iters: Option<usize>,
    /// Validate by sliding window over whole validation cases every this many epochs (and
    /// after the last); 0 = only after the last.
    pub val_every: usize,
    /// Sliding-window overlap, in `[0, 1)`.
    pub overlap: f64,
    /// Seed of the weights and of the batch stream.
    pub seed: u64,
    /// Features of the first stage.
    pub base_features: i64,
    /// Cap on the features of a stage.
    pub max_features: i64,
    /// Deep supervision; `None` = on for CUDA, off on the CPU.
    pub deep_supervision: Option<bool>,
    /// Share of foreground-centred crops; `None` = the mode's
    /// ([`Mode::foreground_oversample`]: 0.5 for the curricula, nnU-Net's 0.33 for `constant`).
    pub oversample: Option<f64>,
    /// nnU-Net's default data augmentation (in-process sampling only).
    pub augment: bool,
    /// Initial learning rate.
    pub initial_lr: f64,
    /// SGD settings.
    pub sgd: SgdConfig,
    /// Batches prepared ahead.
    pub prefetch: usize,
    /// Device.
    pub device: DeviceChoice,
    /// bf16 autocast on CUDA.
    pub autocast: bool,
    /// libtorch intra-op threads (`None`: libtorch's default).
    pub threads: Option<usize>,
    /// Output folder.
    pub out_dir: PathBuf,
    /// Checkpoint every this many epochs (and at the end); 0 = only at the end.
    pub checkpoint_every: usize,
    /// Write validation predictions as NIfTI after the last epoch.
    pub export_predictions: bool,
    /// Stop (with a checkpoint) once this many epochs are done, as an interrupted run would.
    pub stop_after_epochs: Option<usize>,
    /// Continue from the checkpoint in the output folder.
    pub resume: bool,
}

impl TrainConfig {
    /// nnU-Net's defaults for a run of `mode` with `final_patch`, writing to `out_dir`.
    pub fn new(
        mode: Mode,
        final_patch: impl Into<[usize; 3]>,
        out_dir: impl Into<PathBuf>,
    ) -> TrainConfig {
        TrainConfig {
            mode,
            epochs: 1000,
            iters_per_epoch: 250,
            final_patch: final_patch.into(),
            pools: None,
            batch: 2,
            val_cases: 1,
            val_iters: None,
            val_every: 0,
            overlap: 0.5,
            seed: 0,
            base_features: DEFAULT_BASE_FEATURES,
            max_features: DEFAULT_MAX_FEATURES,
            deep_supervision: None,
            oversample: None,
            augment: false,
            initial_lr: INITIAL_LR,
            sgd: SgdConfig::default(),
            prefetch: 4,
            device: DeviceChoice::Auto,
            autocast: true,
            threads: None,
            out_dir: out_dir.into(),
            checkpoint_every: 10,
            export_predictions: true,
            stop_after_epochs: None,
            resume: false,
        }
    }

    /// Validation batches per epoch, resolved (see [`TrainConfig::val_iters`]).
    pub fn validation_batches(&self) -> usize {
        self.val_iters
            .unwrap_or_else(|| (self.iters_per_epoch / 5).max(1))
    }

    /// Checks the values that need no dataset.
    pub(crate) fn check(&self) -> Result<(), TrainerError> {
        if self.epochs == 0 {
            return Err(TrainerError::config("epochs", "must be at least 1"));
        }
        if self.iters_per_epoch == 0 {
            return Err(TrainerError::config(
                "iters_per_epoch",
                "must be at least 1",
            ));
        }
        if self.batch == 0 {
            return Err(TrainerError::config("batch", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.overlap) {
            return Err(TrainerError::config(
                "overlap",
                format!("{} is outside [0, 1)", self.overlap),
            ));
        }
        if let Some(o) = self.oversample.filter(|o| !(0.0..=1.0).contains(o)) {
            return Err(TrainerError::config(
                "oversample",
                format!("{o} is outside [0, 1]"),
            ));
        }
        if !(self.initial_lr.is_finite() && self.initial_lr > 0.0) {
            return Err(TrainerError::config(
                "initial_lr",
                format!("{} is not a positive number", self.initial_lr),
            ));
        }
        if self.base_features < 1 || self.max_features < self.base_features {
            return Err(TrainerError::config(
                "features",
                format!(
                    "base {} and cap {}: need 1 <= base <= cap",
                    self.base_features, self.max_features
                ),
            ));
        }
        Ok(())
    }
}

/// The pieces of a run that do not depend on the training state.
pub(crate) struct Setup {
    /// The device trained on.
    pub device: Device,
    /// Whether bf16 autocast is on.
    pub autocast: bool,
    /// Share of foreground-centred crops, resolved.
    pub oversample: f64,
    /// The dataset.
    pub info: SourceInfo,
    /// Training case ids.
    pub train_cases: Vec<String>,
    /// Validation case ids.
    pub val_cases: Vec<String>,
    /// The network.
    pub unet: UNetConfig,
    /// The curriculum.
    pub schedule: Schedule,
    /// Class names by class value.
    pub class_names: Vec<String>,
}

impl Setup {
    /// Resolves the device, splits the cases, plans the network and the schedule.
    pub fn prepare(cfg: &TrainConfig, source: &dyn BatchSource) -> Result<Setup, TrainerError> {
        cfg.check()?;
        if let Some(n) = cfg.threads {
            tch::set_num_threads(i32::try_from(n.max(1)).unwrap_or(i32::MAX));
        }
        let (device, autocast) = device_and_autocast(cfg)?;
        let info = source.info().clone();
        let n = info.cases.len();
        if cfg.val_cases >= n {
            return Err(TrainerError::config(
                "val_cases",
                format!(
                    "{} held out of {n} case(s) leaves none to train on",
                    cfg.val_cases
                ),
            ));
        }
        let mut ids: Vec<String> = info.cases.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        let val_cases = ids.split_off(n - cfg.val_cases);
        let train_cases = ids;
        let final_patch = Patch::new(cfg.final_patch)
            .map_err(|e| TrainerError::config("final_patch", e.to_string()))?;
        let unet = network(cfg, final_patch, &info, device)?;
        let schedule = Schedule::build(
            cfg.final_patch,
            unet.pools(),
            cfg.epochs,
            cfg.batch,
            cfg.mode,
        )?;
        let class_names = (0..info.num_classes)
            .map(|c| {
                u16::try_from(c)
                    .ok()
                    .and_then(|c| info.label_names.get(&c).cloned())
                    .unwrap_or_else(|| format!("class {c}"))
            })
            .collect();
        Ok(Setup {
            device,
            autocast,
            oversample: cfg
                .oversample
                .unwrap_or_else(|| cfg.mode.foreground_oversample()),
            info,
            train_cases,
            val_cases,
            unet,
            schedule,
            class_names,
        })
    }
}

/// The device `cfg` asks for and whether bf16 autocast is usable on it.
fn device_and_autocast(cfg: &TrainConfig) -> Result<(Device, bool), TrainerError> {
    let device = resolve_device(cfg.device)?;
    let mut autocast = false;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
        if cfg.autocast {
            match set_cuda_autocast_bf16() {
                Ok(()) => autocast = true,
                Err(e) => tracing::warn!("bf16 autocast unavailable ({e}); training in float32"),
            }
        }
    }
    Ok((device, autocast))
}

/// The network: from the given poolings, or planned as nnU-Net does from the final patch and
/// the median spacing; the final patch must be a multiple of its pooling factor.
fn network(
    cfg: &TrainConfig,
    final_patch: Patch,
    info: &SourceInfo,
    device: Device,
) -> Result<UNetConfig, TrainerError> {
    let deep_supervision = cfg.deep_supervision.unwrap_or(device.is_cuda());
    let in_channels = i64::try_from(info.num_channels).unwrap_or(i64::MAX);
    let classes = i64::try_from(info.num_classes.max(2)).unwrap_or(i64::MAX);
    let unet = match cfg.pools {
        Some(pools) => UNetConfig::from_pools(
            pools,
            in_channels,
            classes,
            cfg.base_features,
            cfg.max_features,
            deep_supervision,
        ),
        None => {
            let spacing = info.median_spacing();
            let plan = plan_pooling(final_patch, spacing, NO_POOL_CAP)?;
            if plan.patch != final_patch.axes() {
                // The padded patch is at most the next multiple of a power of two <= 4096.
                let padded = Patch::new(plan.patch)
                    .map_err(|e| TrainerError::config("final_patch", e.to_string()))?;
                return Err(TrainerError::config(
                    "final_patch",
                    format!(
                        "{final_patch} is not a multiple of the planned pooling ({:?} poolings at \
                         spacing {spacing:?}); use {padded} or give --pools",
                        plan.pools,
                    ),
                ));
            }
            UNetConfig::from_plan(
                &plan,
                in_channels,
                classes,
                cfg.base_features,
                cfg.max_features,
                deep_supervision,
            )
        }
    };
    unet.validate()?;
    let pools = unet.pools();
    let div = unet.divisor();
    if (0..3).any(|a| !final_patch.axes()[a].is_multiple_of(div[a])) {
        return Err(TrainerError::config(
            "final_patch",
            format!(
                "{final_patch} is not a multiple of {}×{}×{} (2^pools with pools {pools:?})",
                div[0], div[1], div[2]
            ),
        ));
    }
    Ok(unet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused() {
        let mut c = TrainConfig::new(Mode::Constant, [8, 8, 8], "unused");
        c.overlap = 1.0;
        assert!(c.check().unwrap_err().to_string().contains("overlap"));
        c.overlap = 0.5;
        c.oversample = Some(1.5);
        assert!(c.check().unwrap_err().to_string().contains("oversample"));
        c.oversample = None;
        c.iters_per_epoch = 0;
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .contains("iters_per_epoch")
        );
        c.iters_per_epoch = 1;
        assert_eq!(c.validation_batches(), 1);
        c.iters_per_epoch = 250;
        assert_eq!(c.validation_batches(), 50);
        c.val_iters = Some(0);
        assert_eq!(c.validation_batches(), 0);
        c.base_features = 64;
        c.max_features = 32;
        assert!(c.check().is_err());
    }
}

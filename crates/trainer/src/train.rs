//! The training loop: the PGPS schedule drives the batch stream, nnU-Net's optimiser trains the
//! U-Net, validation runs by sliding window at the final patch, and the run leaves metrics, a
//! plot, checkpoints, predictions and a summary in its output folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use patchflow_curriculum::{Mode, NO_POOL_CAP, Schedule, plan_pooling};
use patchflow_sampler::OutputDType;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

use crate::TrainerError;
use crate::checkpoint::{self, CHECKPOINT_VERSION, CheckpointState, RunIdentity};
use crate::data::{BatchSource, Prefetcher, SourceInfo, StepSpec, StreamSetup, TensorBatch};
use crate::device::{DeviceChoice, resolve_device, set_cuda_autocast_bf16, with_autocast};
use crate::error::TorchContext;
use crate::eval::{ValidationReport, validate};
use crate::infer::SlidingWindow;
use crate::loss::{DiceCeLoss, deep_supervision_loss};
use crate::metrics::{
    EpochRecord, StageSummary, append_record, fmt_patch, read_records, render_table,
    stage_summaries, write_records,
};
use crate::optim::{INITIAL_LR, POLY_EXPONENT, Sgd, SgdConfig, poly_lr};
use crate::plot::write_plot;
use crate::unet::{DEFAULT_BASE_FEATURES, DEFAULT_MAX_FEATURES, Model, UNetConfig};

/// File names inside the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The plot.
pub const PLOT_FILE: &str = "plot.png";
/// The run summary.
pub const SUMMARY_FILE: &str = "summary.json";
/// The checkpoint folder.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// The predictions folder.
pub const PREDICTIONS_DIR: &str = "predictions";
/// The stage timing file.
pub const STAGE_TIMING_FILE: &str = "stage_timing.json";

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
    /// Validate every this many epochs (and after the last); 0 = only after the last.
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
    /// Share of foreground-centred crops.
    pub oversample: f64,
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
    pub fn new(mode: Mode, final_patch: [usize; 3], out_dir: impl Into<PathBuf>) -> TrainConfig {
        TrainConfig {
            mode,
            epochs: 1000,
            iters_per_epoch: 250,
            final_patch,
            pools: None,
            batch: 2,
            val_cases: 1,
            val_every: 0,
            overlap: 0.5,
            seed: 0,
            base_features: DEFAULT_BASE_FEATURES,
            max_features: DEFAULT_MAX_FEATURES,
            deep_supervision: None,
            oversample: 0.5,
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

    fn check(&self) -> Result<(), TrainerError> {
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
        if !(0.0..=1.0).contains(&self.oversample) {
            return Err(TrainerError::config(
                "oversample",
                format!("{} is outside [0, 1]", self.oversample),
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

/// What a run produced; also written as `summary.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// Dataset name.
    pub dataset: String,
    /// Where batches came from.
    pub source: String,
    /// Device used (`cpu`, `cuda:0`).
    pub device: String,
    /// Whether bf16 autocast was on.
    pub autocast: bool,
    /// Curriculum mode.
    pub mode: String,
    /// Total epochs of the schedule.
    pub epochs: usize,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Whether the run reached its last epoch.
    pub finished: bool,
    /// Iterations per epoch.
    pub iters_per_epoch: usize,
    /// Final patch.
    pub final_patch: [usize; 3],
    /// Poolings per axis.
    pub pools: [u32; 3],
    /// Planned batch.
    pub batch: usize,
    /// Seed.
    pub seed: u64,
    /// Network topology.
    pub unet: UNetConfig,
    /// Scalar parameters of the network.
    pub parameters: i64,
    /// The schedule, as `patchflow schedule --json` prints it.
    pub schedule: serde_json::Value,
    /// Training case ids.
    pub train_cases: Vec<String>,
    /// Validation case ids.
    pub val_cases: Vec<String>,
    /// Class names by class value.
    pub class_names: Vec<String>,
    /// Training seconds (iterations only) over all completed epochs.
    pub train_seconds: f64,
    /// Seconds spent waiting for batches.
    pub data_wait_seconds: f64,
    /// `data_wait_seconds / train_seconds`.
    pub data_wait_share: f64,
    /// Per stage.
    pub stages: Vec<StageSummary>,
    /// The last validation, if any.
    pub validation: Option<ValidationReport>,
    /// `metrics.jsonl`.
    pub metrics: PathBuf,
    /// `plot.png`.
    pub plot: PathBuf,
    /// The checkpoint folder.
    pub checkpoint: PathBuf,
    /// The predictions folder (when exported).
    pub predictions: Option<PathBuf>,
}

/// The pieces of a run that do not depend on the training state.
struct Setup {
    device: Device,
    autocast: bool,
    info: SourceInfo,
    train_cases: Vec<String>,
    val_cases: Vec<String>,
    unet: UNetConfig,
    schedule: Schedule,
    class_names: Vec<String>,
}

/// Resolves the device, splits the cases, plans the network and the schedule.
fn prepare(cfg: &TrainConfig, source: &dyn BatchSource) -> Result<Setup, TrainerError> {
    cfg.check()?;
    if let Some(n) = cfg.threads {
        tch::set_num_threads(i32::try_from(n.max(1)).unwrap_or(i32::MAX));
    }
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
            let plan = plan_pooling(cfg.final_patch, spacing, NO_POOL_CAP)?;
            if plan.patch != cfg.final_patch {
                return Err(TrainerError::config(
                    "final_patch",
                    format!(
                        "{} is not a multiple of the planned pooling ({:?} poolings at spacing \
                         {spacing:?}); use {} or give --pools",
                        fmt_patch(cfg.final_patch),
                        plan.pools,
                        fmt_patch(plan.patch)
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
    if (0..3).any(|a| !cfg.final_patch[a].is_multiple_of(div[a])) {
        return Err(TrainerError::config(
            "final_patch",
            format!(
                "{} is not a multiple of {} (2^pools with pools {pools:?})",
                fmt_patch(cfg.final_patch),
                fmt_patch(div)
            ),
        ));
    }
    let schedule = Schedule::build(cfg.final_patch, pools, cfg.epochs, cfg.batch, cfg.mode)?;
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
        info,
        train_cases,
        val_cases,
        unet,
        schedule,
        class_names,
    })
}

/// The step of every batch index of a run.
fn step_plan(
    schedule: &Schedule,
    iters_per_epoch: usize,
    seed: u64,
) -> Arc<dyn Fn(u64) -> StepSpec + Send + Sync> {
    let schedule = schedule.clone();
    let ipe = iters_per_epoch.max(1) as u64;
    Arc::new(move |k: u64| {
        let epoch = usize::try_from(k / ipe).unwrap_or(usize::MAX);
        let (patch, batch) = schedule.patch_for(epoch, k, seed);
        let crops_per_case = if schedule.mode == Mode::Rpss {
            1
        } else {
            schedule.stage_at_epoch(epoch).crops_per_case
        };
        StepSpec {
            index: k,
            patch,
            batch,
            crops_per_case,
        }
    })
}

/// One optimisation step on a batch; returns the loss value (reading it synchronises).
struct Stepper {
    loss: DiceCeLoss,
    scales: Vec<[usize; 3]>,
    deep_supervision: bool,
    device: Device,
    autocast: bool,
}

impl Stepper {
    fn step(
        &self,
        model: &Model,
        opt: &mut Sgd,
        batch: &TensorBatch,
        lr: f64,
    ) -> Result<f64, TrainerError> {
        let image = batch
            .image
            .f_to_device_(self.device, Kind::Float, true, false)
            .ctx("image batch to the device")?;
        let label = batch
            .label
            .f_to_device_(self.device, Kind::Int64, true, false)
            .ctx("label batch to the device")?;
        opt.zero_grad().ctx("zeroing gradients")?;
        let loss = with_autocast(self.autocast, || -> Result<Tensor, TchError> {
            let outs = model.net.forward(&image)?;
            if self.deep_supervision {
                deep_supervision_loss(&self.loss, &outs, &label, &self.scales)
            } else {
                let first = outs
                    .first()
                    .ok_or_else(|| TchError::Shape("the network produced no output".into()))?;
                self.loss.forward(first, &label)
            }
        })
        .ctx(&format!("forward pass of batch {}", batch.index))?;
        loss.f_backward()
            .ctx(&format!("backward pass of batch {}", batch.index))?;
        opt.clip_gradients().ctx("clipping gradients")?;
        opt.step(lr).ctx("optimiser step")?;
        loss.f_double_value(&[]).ctx("reading the loss")
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Trains, validates and reports as `cfg` says, with batches from `source`.
///
/// # Errors
/// Configuration errors, data errors from the source, libtorch errors, I/O errors of the output
/// folder, and a checkpoint that does not belong to this run when resuming.
pub fn train(cfg: &TrainConfig, source: Box<dyn BatchSource>) -> Result<RunSummary, TrainerError> {
    let mut source = source;
    let setup = prepare(cfg, source.as_ref())?;
    let out = &cfg.out_dir;
    std::fs::create_dir_all(out).map_err(|e| TrainerError::io(out, e))?;
    let metrics_path = out.join(METRICS_FILE);
    let ck_dir = out.join(CHECKPOINT_DIR);
    let device = setup.device;

    let identity = RunIdentity {
        dataset: setup.info.dataset.clone(),
        mode: cfg.mode.name().to_string(),
        epochs: cfg.epochs,
        iters_per_epoch: cfg.iters_per_epoch,
        final_patch: cfg.final_patch,
        pools: setup.unet.pools(),
        batch: cfg.batch,
        seed: cfg.seed,
        unet: setup.unet.clone(),
        train_cases: setup.train_cases.clone(),
        val_cases: setup.val_cases.clone(),
        oversample: cfg.oversample,
        augment: cfg.augment,
        initial_lr: cfg.initial_lr,
    };

    let mut model = Model::new(&setup.unet, device, cfg.seed)?;
    let mut opt = Sgd::new(model.named_parameters(), cfg.sgd).ctx("creating the optimiser")?;
    let mut start_epoch = 0usize;
    let mut records: Vec<EpochRecord> = Vec::new();
    if cfg.resume {
        let state = checkpoint::read_state(&ck_dir)?.ok_or_else(|| TrainerError::Checkpoint {
            path: ck_dir.clone(),
            reason: "no checkpoint to resume from".into(),
        })?;
        if let Some(diff) = state.run.first_difference(&identity) {
            return Err(TrainerError::Checkpoint {
                path: ck_dir.clone(),
                reason: format!("belongs to another run ({diff})"),
            });
        }
        checkpoint::restore(&ck_dir, &state, &mut model, &mut opt)?;
        start_epoch = state.epochs_done;
        records = read_records(&metrics_path)?;
        records.retain(|r| r.epoch < start_epoch);
        write_records(&metrics_path, &records)?;
        tracing::info!(epoch = start_epoch, "resumed from checkpoint");
    } else {
        // A fresh run starts a fresh log.
        write_records(&metrics_path, &[])?;
    }

    let stop_epoch = cfg
        .stop_after_epochs
        .map_or(cfg.epochs, |s| s.min(cfg.epochs))
        .max(start_epoch);
    let ipe = cfg.iters_per_epoch;
    let plan = step_plan(&setup.schedule, ipe, cfg.seed);
    source.start(&StreamSetup {
        seed: cfg.seed,
        oversample: cfg.oversample,
        train_cases: setup.train_cases.clone(),
        dtype: OutputDType::F32,
        augment: cfg.augment,
    })?;
    let mut volumes = source.volumes()?;
    let source_name = source.describe();
    tracing::info!(
        source = %source_name,
        device = %device_name(device),
        autocast = setup.autocast,
        mode = %cfg.mode,
        stages = setup.schedule.stages.len(),
        parameters = model.num_parameters(),
        train = setup.train_cases.len(),
        val = setup.val_cases.len(),
        "training"
    );
    let mut prefetch = Prefetcher::spawn(
        source,
        Arc::clone(&plan),
        (start_epoch * ipe) as u64,
        (stop_epoch * ipe) as u64,
        cfg.prefetch,
        device,
    )?;
    let stepper = Stepper {
        loss: DiceCeLoss::new(Some(i64::from(setup.info.ignore_label))),
        scales: (0..setup.unet.num_outputs())
            .map(|i| setup.unet.output_scale(i))
            .collect(),
        deep_supervision: setup.unet.deep_supervision,
        device,
        autocast: setup.autocast,
    };
    let sw = SlidingWindow {
        overlap: cfg.overlap,
        ..SlidingWindow::new(cfg.final_patch)
    };
    let mut last_validation: Option<ValidationReport> = None;
    let predictions_dir = out.join(PREDICTIONS_DIR);

    for epoch in start_epoch..stop_epoch {
        let lr = poly_lr(cfg.initial_lr, epoch, cfg.epochs, POLY_EXPONENT);
        let stage = setup.schedule.stage_index_at_epoch(epoch);
        let mut loss_sum = 0.0;
        let mut wait = 0.0;
        let mut voxels = 0.0;
        let mut first_step: Option<StepSpec> = None;
        let t_epoch = Instant::now();
        for _ in 0..ipe {
            let t0 = Instant::now();
            let batch = prefetch.recv()?;
            wait += t0.elapsed().as_secs_f64();
            first_step.get_or_insert(batch.step);
            voxels += batch.step.patch.iter().product::<usize>() as f64;
            loss_sum += stepper.step(&model, &mut opt, &batch, lr)?;
        }
        let seconds = t_epoch.elapsed().as_secs_f64();
        let first = first_step.unwrap_or_else(|| plan((epoch * ipe) as u64));
        let mut record = EpochRecord {
            epoch,
            stage,
            lr,
            loss: loss_sum / ipe as f64,
            patch: first.patch,
            batch: first.batch,
            mean_patch_voxels: voxels / ipe as f64,
            iterations: ipe,
            seconds,
            data_wait_seconds: wait,
            data_wait_share: if seconds > 0.0 { wait / seconds } else { 0.0 },
            val_dice: None,
            val_mean_fg_dice: None,
            val_seconds: None,
        };
        let last = epoch + 1 == cfg.epochs;
        let due = cfg.val_every > 0 && (epoch + 1) % cfg.val_every == 0;
        if !setup.val_cases.is_empty() && (last || due) {
            let export = (last && cfg.export_predictions).then_some(predictions_dir.as_path());
            let report = validate(
                &model.net,
                volumes.as_mut(),
                &setup.val_cases,
                setup.info.num_classes.max(2),
                setup.info.ignore_label,
                &sw,
                device,
                setup.autocast,
                export,
            )?;
            record.val_dice = Some(report.mean_dice.clone());
            record.val_mean_fg_dice = report.mean_foreground_dice;
            record.val_seconds = Some(report.seconds);
            last_validation = Some(report);
        }
        tracing::info!(
            epoch,
            stage,
            patch = %fmt_patch(record.patch),
            batch = record.batch,
            loss = format_args!("{:.4}", record.loss),
            seconds = format_args!("{:.2}", seconds),
            data_wait = format_args!("{:.1}%", 100.0 * record.data_wait_share),
            val_fg_dice = ?record.val_mean_fg_dice,
            "epoch done"
        );
        append_record(&metrics_path, &record)?;
        records.push(record);
        let done = epoch + 1;
        let periodic = cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0;
        if periodic || done == stop_epoch {
            checkpoint::save(
                &ck_dir,
                &CheckpointState {
                    version: CHECKPOINT_VERSION,
                    run: identity.clone(),
                    epochs_done: done,
                    next_batch: (done * ipe) as u64,
                    tensors: format!("weights-epoch{done}.safetensors"),
                },
                &model,
                &opt,
            )?;
        }
    }
    drop(prefetch.stop()?);

    let plot_path = out.join(PLOT_FILE);
    let title = format!(
        "{} · {} · final patch {} · {}",
        setup.info.dataset,
        cfg.mode,
        fmt_patch(cfg.final_patch),
        device_name(device)
    );
    write_plot(&plot_path, &records, &setup.class_names, &title)?;
    let train_seconds: f64 = records.iter().map(|r| r.seconds).sum();
    let data_wait_seconds: f64 = records.iter().map(|r| r.data_wait_seconds).sum();
    let finished = stop_epoch == cfg.epochs;
    let exported = finished
        && cfg.export_predictions
        && last_validation
            .as_ref()
            .is_some_and(|v| v.cases.iter().any(|c| c.prediction.is_some()));
    let summary = RunSummary {
        dataset: setup.info.dataset.clone(),
        source: source_name,
        device: device_name(device),
        autocast: setup.autocast,
        mode: cfg.mode.name().to_string(),
        epochs: cfg.epochs,
        epochs_done: stop_epoch,
        finished,
        iters_per_epoch: ipe,
        final_patch: cfg.final_patch,
        pools: setup.unet.pools(),
        batch: cfg.batch,
        seed: cfg.seed,
        parameters: model.num_parameters(),
        unet: setup.unet.clone(),
        schedule: setup.schedule.to_json(),
        train_cases: setup.train_cases.clone(),
        val_cases: setup.val_cases.clone(),
        class_names: setup.class_names.clone(),
        train_seconds,
        data_wait_seconds,
        data_wait_share: if train_seconds > 0.0 {
            data_wait_seconds / train_seconds
        } else {
            0.0
        },
        stages: stage_summaries(&records),
        validation: last_validation,
        metrics: metrics_path,
        plot: plot_path,
        checkpoint: ck_dir,
        predictions: exported.then_some(predictions_dir),
    };
    write_json(&out.join(SUMMARY_FILE), &summary)?;
    Ok(summary)
}

/// Writes `value` as pretty JSON.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainerError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainerError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text).map_err(|e| TrainerError::io(path, e))
}

/// Time per iteration at one schedule stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    /// Stage index.
    pub stage: usize,
    /// Patch.
    pub patch: [usize; 3],
    /// Batch size.
    pub batch: usize,
    /// Timed iterations (after warm-up).
    pub iterations: usize,
    /// Mean seconds per iteration (data wait included).
    pub seconds_per_iteration: f64,
    /// Share of the time spent waiting for data.
    pub data_wait_share: f64,
    /// Voxels trained per second.
    pub voxels_per_second: f64,
}

/// Times `iterations` training steps (after `warmup` untimed ones) at every stage of the
/// schedule `cfg` describes, with batches from `source`; writes `stage_timing.json` into the
/// output folder. The model trains while it is timed (the work is the real work); nothing else
/// is written.
pub fn time_stages(
    cfg: &TrainConfig,
    source: Box<dyn BatchSource>,
    warmup: usize,
    iterations: usize,
) -> Result<Vec<StageTiming>, TrainerError> {
    let mut source = source;
    let setup = prepare(cfg, source.as_ref())?;
    let device = setup.device;
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| TrainerError::io(&cfg.out_dir, e))?;
    let model = Model::new(&setup.unet, device, cfg.seed)?;
    let mut opt = Sgd::new(model.named_parameters(), cfg.sgd).ctx("creating the optimiser")?;
    let per_stage = (warmup + iterations.max(1)) as u64;
    let stages = setup.schedule.stages.clone();
    let n = stages.len() as u64;
    let plan_stages = stages.clone();
    let plan: Arc<dyn Fn(u64) -> StepSpec + Send + Sync> = Arc::new(move |k| {
        let s = usize::try_from(k / per_stage).unwrap_or(0);
        let st = plan_stages
            .get(s)
            .or(plan_stages.last())
            .copied()
            .unwrap_or(patchflow_curriculum::Stage {
                patch: [1, 1, 1],
                batch: 1,
                first_epoch: 0,
                epochs: 1,
                crops_per_case: 1,
            });
        StepSpec {
            index: k,
            patch: st.patch,
            batch: st.batch,
            crops_per_case: st.crops_per_case,
        }
    });
    source.start(&StreamSetup {
        seed: cfg.seed,
        oversample: cfg.oversample,
        train_cases: setup.train_cases.clone(),
        dtype: OutputDType::F32,
        augment: cfg.augment,
    })?;
    let mut prefetch = Prefetcher::spawn(source, plan, 0, n * per_stage, cfg.prefetch, device)?;
    let stepper = Stepper {
        loss: DiceCeLoss::new(Some(i64::from(setup.info.ignore_label))),
        scales: (0..setup.unet.num_outputs())
            .map(|i| setup.unet.output_scale(i))
            .collect(),
        deep_supervision: setup.unet.deep_supervision,
        device,
        autocast: setup.autocast,
    };
    let mut out = Vec::with_capacity(stages.len());
    for (i, st) in stages.iter().enumerate() {
        let (mut secs, mut wait) = (0.0, 0.0);
        for j in 0..per_stage as usize {
            let t0 = Instant::now();
            let batch = prefetch.recv()?;
            let w = t0.elapsed().as_secs_f64();
            stepper.step(&model, &mut opt, &batch, cfg.initial_lr)?;
            if j >= warmup {
                secs += t0.elapsed().as_secs_f64();
                wait += w;
            }
        }
        let it = iterations.max(1);
        let spi = secs / it as f64;
        let voxels = (st.patch.iter().product::<usize>() * st.batch) as f64;
        tracing::info!(
            stage = i,
            patch = %fmt_patch(st.patch),
            batch = st.batch,
            ms_per_iteration = format_args!("{:.1}", spi * 1e3),
            "stage timed"
        );
        out.push(StageTiming {
            stage: i,
            patch: st.patch,
            batch: st.batch,
            iterations: it,
            seconds_per_iteration: spi,
            data_wait_share: if secs > 0.0 { wait / secs } else { 0.0 },
            voxels_per_second: if spi > 0.0 { voxels / spi } else { 0.0 },
        });
    }
    drop(prefetch.stop()?);
    write_json(&cfg.out_dir.join(STAGE_TIMING_FILE), &out)?;
    Ok(out)
}

/// The comparison table of several runs (their output folders): per run the training time,
/// its ratio to the `constant` run (when one is among them), the data-wait share and the final
/// validation Dice; then, for every run folder that holds `stage_timing.json`, the time per
/// iteration at every stage.
pub fn compare_runs(dirs: &[PathBuf]) -> Result<String, TrainerError> {
    let mut runs: Vec<(PathBuf, RunSummary)> = Vec::new();
    let mut timings: Vec<(PathBuf, Vec<StageTiming>)> = Vec::new();
    for d in dirs {
        let sp = d.join(SUMMARY_FILE);
        if sp.exists() {
            let text = std::fs::read_to_string(&sp).map_err(|e| TrainerError::io(&sp, e))?;
            let s: RunSummary = serde_json::from_str(&text).map_err(|e| TrainerError::Io {
                path: sp.clone(),
                source: std::io::Error::other(e),
            })?;
            runs.push((d.clone(), s));
        }
        let tp = d.join(STAGE_TIMING_FILE);
        if tp.exists() {
            let text = std::fs::read_to_string(&tp).map_err(|e| TrainerError::io(&tp, e))?;
            let t: Vec<StageTiming> =
                serde_json::from_str(&text).map_err(|e| TrainerError::Io {
                    path: tp.clone(),
                    source: std::io::Error::other(e),
                })?;
            timings.push((d.clone(), t));
        }
        if !sp.exists() && !tp.exists() {
            return Err(TrainerError::config(
                "compare",
                format!(
                    "{} holds neither {SUMMARY_FILE} nor {STAGE_TIMING_FILE}",
                    d.display()
                ),
            ));
        }
    }
    let baseline = runs
        .iter()
        .find(|(_, s)| s.mode == Mode::Constant.name())
        .map(|(_, s)| s.train_seconds);
    let labels = run_labels(&runs);
    let mut rows: Vec<Vec<String>> = vec![
        [
            "section",
            "run",
            "patch",
            "batch",
            "iters",
            "s/iter",
            "time s",
            "vs constant",
            "data wait",
            "val Dice",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (_, t) in &timings {
        for st in t {
            rows.push(vec![
                "stage timing".into(),
                format!("stage {}", st.stage),
                fmt_patch(st.patch),
                st.batch.to_string(),
                st.iterations.to_string(),
                format!("{:.4}", st.seconds_per_iteration),
                "".into(),
                "".into(),
                format!("{:.1}%", 100.0 * st.data_wait_share),
                "".into(),
            ]);
        }
    }
    for ((_, s), label) in runs.iter().zip(&labels) {
        for st in &s.stages {
            rows.push(vec![
                format!("{label} stages"),
                format!("stage {}", st.stage),
                fmt_patch(st.patch),
                st.batch.to_string(),
                st.iterations.to_string(),
                format!("{:.4}", st.seconds_per_iteration),
                format!("{:.1}", st.seconds),
                "".into(),
                format!("{:.1}%", 100.0 * st.data_wait_share),
                "".into(),
            ]);
        }
    }
    for ((_, s), label) in runs.iter().zip(&labels) {
        let iters = s.epochs_done * s.iters_per_epoch;
        let ratio = baseline
            .filter(|&b| b > 0.0)
            .map_or("".to_string(), |b| format!("{:.2}", s.train_seconds / b));
        let dice = s
            .validation
            .as_ref()
            .and_then(|v| v.mean_foreground_dice)
            .map_or("n/a".to_string(), |d| format!("{d:.4}"));
        rows.push(vec![
            "total".into(),
            label.clone(),
            fmt_patch(s.final_patch),
            s.batch.to_string(),
            iters.to_string(),
            format!("{:.4}", s.train_seconds / iters.max(1) as f64),
            format!("{:.1}", s.train_seconds),
            ratio,
            format!("{:.1}%", 100.0 * s.data_wait_share),
            dice,
        ]);
    }
    let left = [
        true, true, true, false, false, false, false, false, false, false,
    ];
    let mut text = render_table(&rows, &left);
    if let Some((_, s)) = runs.first() {
        text.push_str(&format!(
            "dataset {}, device {}, {} epochs × {} iterations, val Dice = mean foreground Dice \
             over {} held-out case(s)\n",
            s.dataset,
            s.device,
            s.epochs,
            s.iters_per_epoch,
            s.val_cases.len()
        ));
    }
    Ok(text)
}

/// A name per run for the comparison table: its mode, followed by its folder's name where
/// several runs share the mode (e.g. the same curriculum fed in process and by a daemon).
fn run_labels(runs: &[(PathBuf, RunSummary)]) -> Vec<String> {
    runs.iter()
        .map(|(dir, s)| {
            let shared = runs.iter().filter(|(_, o)| o.mode == s.mode).count() > 1;
            match dir.file_name() {
                Some(name) if shared => format!("{} ({})", s.mode, name.to_string_lossy()),
                _ => s.mode.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_plan_follows_the_schedule() {
        let s = Schedule::build([16, 32, 32], [2, 3, 3], 10, 2, Mode::PgpsPerformance).unwrap();
        let plan = step_plan(&s, 5, 1);
        // Epoch 0, stage 0: 4×8×8 with batch 2 · (16·32·32) / (4·8·8) = 128, 64 crops per
        // case.
        let first = plan(0);
        assert_eq!(first.patch, [4, 8, 8]);
        assert_eq!(first.batch, 128);
        assert_eq!(first.crops_per_case, 64);
        assert_eq!(plan(4).patch, [4, 8, 8]);
        // Iteration 5 is epoch 1, the next stage.
        assert_eq!(plan(5).patch, [8, 8, 8]);
        assert_eq!(plan(49).patch, [16, 32, 32]);
        assert_eq!(plan(49).batch, 2);
        assert_eq!(plan(49).index, 49);
    }

    #[test]
    fn rpss_draws_a_patch_per_iteration() {
        let s = Schedule::build([16, 32, 32], [2, 3, 3], 10, 2, Mode::Rpss).unwrap();
        let plan = step_plan(&s, 50, 9);
        let mut patches: Vec<[usize; 3]> = (0..50).map(|k| plan(k).patch).collect();
        assert!(
            patches
                .iter()
                .all(|p| s.stages.iter().any(|st| st.patch == *p))
        );
        assert!((0..50).all(|k| plan(k).batch == 2 && plan(k).crops_per_case == 1));
        patches.sort();
        patches.dedup();
        assert!(patches.len() > 3, "{patches:?}");
        // Reproducible from the seed alone.
        let again = step_plan(&s, 50, 9);
        assert!((0..50).all(|k| plan(k) == again(k)));
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut c = TrainConfig::new(Mode::Constant, [8, 8, 8], "unused");
        c.overlap = 1.0;
        assert!(c.check().unwrap_err().to_string().contains("overlap"));
        c.overlap = 0.5;
        c.iters_per_epoch = 0;
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .contains("iters_per_epoch")
        );
        c.iters_per_epoch = 1;
        c.base_features = 64;
        c.max_features = 32;
        assert!(c.check().is_err());
    }
}

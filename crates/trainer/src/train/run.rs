//! The training loop as the steps of a [`Run`] (open or resume, train an epoch, validate and
//! checkpoint, finish), and the stage-timing pass ([`time_stages`]).
//!
//! As the authors' PGPS trainers do (on nnU-Net's loop): every epoch is validated on
//! [`TrainConfig::validation_batches`] batches of the final patch and the planned batch cut from the validation cases
//! (nnU-Net's pseudo-Dice, whose moving average chooses `checkpoint_best`), and the weights are
//! saved as `checkpoint_ZxYxX` whenever the patch size changes, named after the size that
//! ends. Unlike the published trainers, which restart their curriculum at the smallest patch
//! when resumed, a resumed run continues in the stage of its epoch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use patchflow_curriculum::Stage;
use patchflow_grid::rng::fold_key;
use patchflow_sampler::OutputDType;
use tch::Device;

use super::config::{Setup, TrainConfig};
use super::report::{
    BEST_CHECKPOINT_DIR, CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE, PREDICTIONS_DIR, RunSummary,
    STAGE_TIMING_FILE, SUMMARY_FILE, StageTiming, stage_checkpoint_dir, write_json,
};
use super::step::Stepper;
use crate::TrainerError;
use crate::checkpoint::{self, CHECKPOINT_VERSION, CheckpointState, RunIdentity};
use crate::data::{BatchSource, Prefetcher, StreamSetup, VolumeLoader};
use crate::error::TorchContext;
use crate::eval::{ValidationReport, validate};
use crate::infer::SlidingWindow;
use crate::loss::Confusion;
use crate::metrics::{
    EpochRecord, append_record, pseudo_dice_ema, read_records, stage_summaries, write_records,
};
use crate::optim::{POLY_EXPONENT, Sgd, poly_lr};
use crate::plan::{StepPlan, StepSpec};
use crate::plot::write_plot;
use crate::unet::Model;

/// Key of the validation stream's seed: `fold_key([seed, VALIDATION_STREAM])`, so that the
/// validation batches differ from the training batches and depend on the seed alone.
pub const VALIDATION_STREAM: u64 = 0x7661_6c69_6461_7465; // "validate"

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The training stream of a run.
fn stream_setup(cfg: &TrainConfig, setup: &Setup) -> StreamSetup {
    StreamSetup {
        seed: cfg.seed,
        oversample: setup.oversample,
        cases: setup.train_cases.clone(),
        dtype: OutputDType::F32,
        augment: cfg.augment,
    }
}

/// The validation batches of every epoch: `iters` batches of the final patch and the planned
/// batch from the validation cases, without augmentation, with the run's foreground
/// oversampling (nnU-Net's validation loader); batch `epoch × iters + i`.
struct PatchValidation {
    prefetch: Prefetcher,
    iters: usize,
}

impl PatchValidation {
    /// Starts the stream on `source` (a fork of the run's) for epochs `start..stop`; `None` when
    /// the run has no validation batches.
    fn open(
        cfg: &TrainConfig,
        setup: &Setup,
        source: &dyn BatchSource,
        (start, stop): (usize, usize),
    ) -> Result<Option<PatchValidation>, TrainerError> {
        let iters = cfg.validation_batches();
        if iters == 0 || setup.val_cases.is_empty() {
            return Ok(None);
        }
        let mut val = source.fork()?;
        val.start(&StreamSetup {
            seed: fold_key(&[cfg.seed, VALIDATION_STREAM]),
            oversample: setup.oversample,
            cases: setup.val_cases.clone(),
            dtype: OutputDType::F32,
            augment: false,
        })?;
        let plan = StepPlan::fixed(setup.schedule.final_patch(), cfg.batch);
        let prefetch = Prefetcher::spawn(
            val,
            plan,
            (start * iters) as u64,
            (stop * iters) as u64,
            cfg.prefetch,
            setup.device,
        )?;
        Ok(Some(PatchValidation { prefetch, iters }))
    }

    /// Evaluates the epoch's batches: the mean loss and the summed voxel counts.
    fn epoch(
        &mut self,
        stepper: &Stepper,
        model: &Model,
        classes: usize,
    ) -> Result<(f64, Confusion), TrainerError> {
        let mut counts = Confusion::new(classes);
        let mut loss = 0.0;
        for _ in 0..self.iters {
            let batch = self.prefetch.recv()?;
            let (l, c) = stepper.evaluate(model, &batch)?;
            loss += l;
            counts.merge(&c);
        }
        Ok((loss / self.iters as f64, counts))
    }
}

/// The best moving average of the pseudo-Dice so far and its epoch.
#[derive(Clone, Copy, Debug, Default)]
struct Best {
    ema: Option<f64>,
    epoch: Option<usize>,
}

/// A training run in progress.
struct Run<'a> {
    cfg: &'a TrainConfig,
    setup: Setup,
    identity: RunIdentity,
    model: Model,
    opt: Sgd,
    plan: StepPlan,
    stepper: Stepper,
    prefetch: Prefetcher,
    validation: Option<PatchValidation>,
    volumes: Box<dyn VolumeLoader>,
    source_name: String,
    sw: SlidingWindow,
    /// Epochs of this process: `start..stop`.
    start: usize,
    stop: usize,
    records: Vec<EpochRecord>,
    best: Best,
    last_validation: Option<ValidationReport>,
    out: PathBuf,
}

impl<'a> Run<'a> {
    /// Sets the run up, resumes it from its checkpoint when asked, and starts the batch
    /// streams at the first epoch to train.
    fn open(
        cfg: &'a TrainConfig,
        mut source: Box<dyn BatchSource>,
    ) -> Result<Run<'a>, TrainerError> {
        let setup = Setup::prepare(cfg, source.as_ref())?;
        let out = cfg.out_dir.clone();
        std::fs::create_dir_all(&out).map_err(|e| TrainerError::io(&out, e))?;
        let identity = RunIdentity {
            dataset: setup.info.dataset.clone(),
            mode: cfg.mode.name().to_string(),
            epochs: cfg.epochs,
            iters_per_epoch: cfg.iters_per_epoch,
            final_patch: setup.schedule.final_patch(),
            pools: setup.unet.pools(),
            batch: cfg.batch,
            seed: cfg.seed,
            unet: setup.unet.clone(),
            train_cases: setup.train_cases.clone(),
            val_cases: setup.val_cases.clone(),
            oversample: setup.oversample,
            augment: cfg.augment,
            initial_lr: cfg.initial_lr,
        };
        let mut model = Model::new(&setup.unet, setup.device, cfg.seed)?;
        let mut opt = Sgd::new(model.named_parameters(), cfg.sgd).ctx("creating the optimiser")?;
        let (start, records) = resume_or_start(cfg, &out, &identity, &mut model, &mut opt)?;
        let stop = cfg
            .stop_after_epochs
            .map_or(cfg.epochs, |s| s.min(cfg.epochs))
            .max(start);
        let ipe = cfg.iters_per_epoch;
        let plan = StepPlan::run(&setup.schedule, ipe, cfg.seed);
        let validation = PatchValidation::open(cfg, &setup, source.as_ref(), (start, stop))?;
        source.start(&stream_setup(cfg, &setup))?;
        let volumes = source.volumes()?;
        let source_name = source.describe();
        tracing::info!(
            source = %source_name,
            device = %device_name(setup.device),
            autocast = setup.autocast,
            mode = %cfg.mode,
            stages = setup.schedule.stages().len(),
            oversample = setup.oversample,
            parameters = model.num_parameters(),
            train = setup.train_cases.len(),
            val = setup.val_cases.len(),
            "training"
        );
        let prefetch = Prefetcher::spawn(
            source,
            plan.clone(),
            (start * ipe) as u64,
            (stop * ipe) as u64,
            cfg.prefetch,
            setup.device,
        )?;
        let stepper = Stepper::new(&setup);
        let sw = SlidingWindow {
            overlap: cfg.overlap,
            ..SlidingWindow::new(setup.schedule.final_patch().axes())
        };
        let best = records
            .iter()
            .fold(Best::default(), |b, r| match r.ema_pseudo_dice {
                Some(e) if b.ema.is_none_or(|best| e > best) => Best {
                    ema: Some(e),
                    epoch: Some(r.epoch),
                },
                _ => b,
            });
        Ok(Run {
            cfg,
            setup,
            identity,
            model,
            opt,
            plan,
            stepper,
            prefetch,
            validation,
            volumes,
            source_name,
            sw,
            start,
            stop,
            records,
            best,
            last_validation: None,
            out,
        })
    }

    /// Trains the iterations of `epoch` and returns its record (not yet validated).
    fn epoch(&mut self, epoch: usize) -> Result<EpochRecord, TrainerError> {
        let cfg = self.cfg;
        let ipe = cfg.iters_per_epoch;
        let lr = poly_lr(cfg.initial_lr, epoch, cfg.epochs, POLY_EXPONENT);
        let stage = self.setup.schedule.stage_index(epoch);
        let mut loss_sum = 0.0;
        let mut wait = 0.0;
        let mut voxels = 0.0;
        let mut first_step: Option<StepSpec> = None;
        let t_epoch = Instant::now();
        for _ in 0..ipe {
            let t0 = Instant::now();
            let batch = self.prefetch.recv()?;
            wait += t0.elapsed().as_secs_f64();
            first_step.get_or_insert(batch.step);
            voxels += batch.step.patch.voxels() as f64;
            loss_sum += self.stepper.step(&self.model, &mut self.opt, &batch, lr)?;
        }
        let seconds = t_epoch.elapsed().as_secs_f64();
        let first = first_step.unwrap_or_else(|| self.plan.step((epoch * ipe) as u64));
        Ok(EpochRecord {
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
            val_loss: None,
            pseudo_dice: None,
            mean_pseudo_dice: None,
            ema_pseudo_dice: None,
        })
    }

    /// Scores the epoch's validation batches into `record` (nnU-Net's
    /// `on_validation_epoch_end`: the counts summed over the batches, Dice per foreground class,
    /// their mean and its moving average) and keeps `checkpoint_best` at the best average.
    fn validate_on_patches(&mut self, record: &mut EpochRecord) -> Result<(), TrainerError> {
        let Some(val) = self.validation.as_mut() else {
            return Ok(());
        };
        let classes = self.setup.info.num_classes.max(2);
        let (loss, counts) = val.epoch(&self.stepper, &self.model, classes)?;
        let dice: Vec<Option<f64>> = (0..classes)
            .map(|c| (c > 0).then(|| counts.dice(c)).flatten())
            .collect();
        let defined: Vec<f64> = dice.iter().flatten().copied().collect();
        let mean =
            (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);
        let previous = self.records.last().and_then(|r| r.ema_pseudo_dice);
        let ema = pseudo_dice_ema(previous, mean);
        record.val_loss = Some(loss);
        record.pseudo_dice = Some(dice);
        record.mean_pseudo_dice = mean;
        record.ema_pseudo_dice = ema;
        if let Some(e) = ema.filter(|&e| self.best.ema.is_none_or(|b| e > b)) {
            self.best = Best {
                ema: Some(e),
                epoch: Some(record.epoch),
            };
            self.save_checkpoint(&self.out.join(BEST_CHECKPOINT_DIR), record.epoch + 1)?;
        }
        Ok(())
    }

    /// Validates by sliding window over the whole validation cases when due (every `val_every`
    /// epochs and after the last), exporting the predictions after the last.
    fn validate_by_sliding_window(&mut self, record: &mut EpochRecord) -> Result<(), TrainerError> {
        let cfg = self.cfg;
        let last = record.epoch + 1 == cfg.epochs;
        let due = cfg.val_every > 0 && (record.epoch + 1).is_multiple_of(cfg.val_every);
        if self.setup.val_cases.is_empty() || !(last || due) {
            return Ok(());
        }
        let predictions = self.out.join(PREDICTIONS_DIR);
        let export = (last && cfg.export_predictions).then_some(predictions.as_path());
        let report = validate(
            &self.model.net,
            self.volumes.as_mut(),
            &self.setup.val_cases,
            self.setup.info.num_classes.max(2),
            self.setup.info.ignore_label,
            &self.sw,
            self.setup.device,
            self.setup.autocast,
            export,
        )?;
        record.val_dice = Some(report.mean_dice.clone());
        record.val_mean_fg_dice = report.mean_foreground_dice;
        record.val_seconds = Some(report.seconds);
        self.last_validation = Some(report);
        Ok(())
    }

    /// Validates, logs and appends the epoch's record, and checkpoints: every
    /// `checkpoint_every` epochs and at the stop into `checkpoint/` (what a resume reads), and
    /// into `checkpoint_ZxYxX/` when the next epoch trains another patch size.
    fn validate_and_checkpoint(&mut self, mut record: EpochRecord) -> Result<(), TrainerError> {
        let cfg = self.cfg;
        let epoch = record.epoch;
        self.validate_on_patches(&mut record)?;
        self.validate_by_sliding_window(&mut record)?;
        tracing::info!(
            epoch,
            stage = record.stage,
            patch = %record.patch,
            batch = record.batch,
            loss = format_args!("{:.4}", record.loss),
            seconds = format_args!("{:.2}", record.seconds),
            data_wait = format_args!("{:.1}%", 100.0 * record.data_wait_share),
            pseudo_dice = ?record.mean_pseudo_dice,
            ema_pseudo_dice = ?record.ema_pseudo_dice,
            val_fg_dice = ?record.val_mean_fg_dice,
            "epoch done"
        );
        append_record(&self.out.join(METRICS_FILE), &record)?;
        self.records.push(record);
        let done = epoch + 1;
        let periodic = cfg.checkpoint_every > 0 && done.is_multiple_of(cfg.checkpoint_every);
        if periodic || done == self.stop {
            self.save_checkpoint(&self.out.join(CHECKPOINT_DIR), done)?;
        }
        let schedule = &self.setup.schedule;
        if done < cfg.epochs && schedule.stage_index(done) != schedule.stage_index(epoch) {
            let ending = schedule.stage_for(epoch).patch;
            self.save_checkpoint(&self.out.join(stage_checkpoint_dir(ending)), done)?;
        }
        Ok(())
    }

    /// Saves the weights and momentum after `done` epochs into the checkpoint folder `dir`.
    fn save_checkpoint(&self, dir: &Path, done: usize) -> Result<(), TrainerError> {
        checkpoint::save(
            dir,
            &CheckpointState {
                version: CHECKPOINT_VERSION,
                run: self.identity.clone(),
                epochs_done: done,
                next_batch: (done * self.cfg.iters_per_epoch) as u64,
                tensors: format!("weights-epoch{done}.safetensors"),
            },
            &self.model,
            &self.opt,
        )
    }

    /// Stops the streams, draws the plot and writes the summary.
    fn finish(self) -> Result<RunSummary, TrainerError> {
        let cfg = self.cfg;
        drop(self.prefetch.stop()?);
        if let Some(v) = self.validation {
            drop(v.prefetch.stop()?);
        }
        let plot = self.out.join(PLOT_FILE);
        let title = format!(
            "{} · {} · final patch {} · {}",
            self.setup.info.dataset,
            cfg.mode,
            self.setup.schedule.final_patch(),
            device_name(self.setup.device)
        );
        write_plot(&plot, &self.records, &self.setup.class_names, &title)?;
        let train_seconds: f64 = self.records.iter().map(|r| r.seconds).sum();
        let data_wait_seconds: f64 = self.records.iter().map(|r| r.data_wait_seconds).sum();
        let finished = self.stop == cfg.epochs;
        let exported = finished
            && cfg.export_predictions
            && self
                .last_validation
                .as_ref()
                .is_some_and(|v| v.cases.iter().any(|c| c.prediction.is_some()));
        let summary = RunSummary {
            run: self.identity,
            source: self.source_name,
            device: device_name(self.setup.device),
            autocast: self.setup.autocast,
            epochs_done: self.stop,
            finished,
            parameters: self.model.num_parameters(),
            schedule: self.setup.schedule.to_json(),
            class_names: self.setup.class_names,
            train_seconds,
            data_wait_seconds,
            data_wait_share: if train_seconds > 0.0 {
                data_wait_seconds / train_seconds
            } else {
                0.0
            },
            stages: stage_summaries(&self.records),
            best_ema_pseudo_dice: self.best.ema,
            best_epoch: self.best.epoch,
            validation: self.last_validation,
            metrics: self.out.join(METRICS_FILE),
            plot,
            checkpoint: self.out.join(CHECKPOINT_DIR),
            predictions: exported.then(|| self.out.join(PREDICTIONS_DIR)),
        };
        write_json(&self.out.join(SUMMARY_FILE), &summary)?;
        Ok(summary)
    }
}

/// Restores the checkpoint of the output folder when `cfg.resume` (refusing one of another
/// run) and returns the first epoch to train with the records kept; otherwise starts a fresh
/// log at epoch 0.
fn resume_or_start(
    cfg: &TrainConfig,
    out: &Path,
    identity: &RunIdentity,
    model: &mut Model,
    opt: &mut Sgd,
) -> Result<(usize, Vec<EpochRecord>), TrainerError> {
    let metrics = out.join(METRICS_FILE);
    if !cfg.resume {
        // A fresh run starts a fresh log.
        write_records(&metrics, &[])?;
        return Ok((0, Vec::new()));
    }
    let ck_dir = out.join(CHECKPOINT_DIR);
    let state = checkpoint::read_state(&ck_dir)?.ok_or_else(|| TrainerError::Checkpoint {
        path: ck_dir.clone(),
        reason: "no checkpoint to resume from".into(),
    })?;
    if let Some(diff) = state.run.first_difference(identity) {
        return Err(TrainerError::Checkpoint {
            path: ck_dir.clone(),
            reason: format!("belongs to another run ({diff})"),
        });
    }
    checkpoint::restore(&ck_dir, &state, model, opt)?;
    let start = state.epochs_done;
    let mut records = read_records(&metrics)?;
    records.retain(|r| r.epoch < start);
    write_records(&metrics, &records)?;
    tracing::info!(epoch = start, "resumed from checkpoint");
    Ok((start, records))
}

/// Trains, validates and reports as `cfg` says, with batches from `source`.
///
/// # Errors
/// Configuration errors, data errors from the source, libtorch errors, I/O errors of the output
/// folder, and a checkpoint that does not belong to this run when resuming.
pub fn train(cfg: &TrainConfig, source: Box<dyn BatchSource>) -> Result<RunSummary, TrainerError> {
    let mut run = Run::open(cfg, source)?;
    for epoch in run.start..run.stop {
        let record = run.epoch(epoch)?;
        run.validate_and_checkpoint(record)?;
    }
    run.finish()
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
    time_steps(cfg, source, None, warmup, iterations)
}

/// Times `iterations` training steps (after `warmup` untimed ones) at each of `stages` in turn
/// (their patch, batch and crops per case; default: the stages of the schedule `cfg`
/// describes), with the network and batch stream `cfg` describes; writes `stage_timing.json`
/// into the output folder. Each step synchronises (it reads the loss), so the times are the
/// device's.
pub fn time_steps(
    cfg: &TrainConfig,
    mut source: Box<dyn BatchSource>,
    stages: Option<&[Stage]>,
    warmup: usize,
    iterations: usize,
) -> Result<Vec<StageTiming>, TrainerError> {
    let setup = Setup::prepare(cfg, source.as_ref())?;
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| TrainerError::io(&cfg.out_dir, e))?;
    let model = Model::new(&setup.unet, setup.device, cfg.seed)?;
    let mut opt = Sgd::new(model.named_parameters(), cfg.sgd).ctx("creating the optimiser")?;
    let per_stage = warmup + iterations.max(1);
    let stages = stages.unwrap_or(setup.schedule.stages()).to_vec();
    let plan = StepPlan::each_stage(&stages, per_stage)
        .ok_or_else(|| TrainerError::config("stages", "no stage to time"))?;
    source.start(&stream_setup(cfg, &setup))?;
    let end = (stages.len() * per_stage) as u64;
    let mut prefetch = Prefetcher::spawn(source, plan, 0, end, cfg.prefetch, setup.device)?;
    let stepper = Stepper::new(&setup);
    let mut out = Vec::with_capacity(stages.len());
    for (i, st) in stages.iter().enumerate() {
        let (mut secs, mut wait) = (0.0, 0.0);
        for j in 0..per_stage {
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
        let voxels = st.batch_voxels() as f64;
        tracing::info!(
            stage = i,
            patch = %st.patch,
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

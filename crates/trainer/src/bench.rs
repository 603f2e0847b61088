//! The curriculum benchmark on one real CT: the time of a training step at every patch and
//! batch size the curricula of a plan train with (nnU-Net's 128³ by default), each measured in
//! steady state, projected onto a whole run (1000 epochs × 250 iterations) for every mode and
//! compared with the constant nnU-Net baseline and the paper's figures; optionally, short
//! training runs of some modes for the same budget, all printed as one table.
//!
//! The dataset is made from one labelled CT (by default TotalSegmentator's aorta test case):
//! the volume is cut along z into slabs, each slab a case (the last held out for validation),
//! so that validation measures the segmentation of the same structure in a part of the body the
//! network did not train on. The slabs are written as NIfTI and ingested with the regular
//! pipeline; everything lands in the work folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use patchflow_curriculum::{Mode, NO_POOL_CAP, Schedule, Stage, plan_pooling};
use patchflow_grid::Patch;
use patchflow_ingest::{IngestOptions, ingest};
use patchflow_volume::{Geometry, VoxelData, read_nifti, write_nifti};
use serde::{Deserialize, Serialize};

use crate::TrainerError;
use crate::data::{BatchSource, InProcessSource};
use crate::device::DeviceChoice;
use crate::metrics::render_table;
use crate::train::{StageTiming, TrainConfig, compare_runs, time_steps, train};

/// The training time of PGPS relative to the constant run reported by the journal extension
/// (Fischer et al., arXiv 2510.23241): 44% for PGPS, 89% for its performance mode.
pub const PAPER_TIME_RATIOS: [(Mode, f64); 2] = [(Mode::Pgps, 0.44), (Mode::PgpsPerformance, 0.89)];

/// The projection file in the work folder.
pub const PROJECTION_FILE: &str = "projection.json";

/// Settings of a benchmark run.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchConfig {
    /// Labelled image: NIfTI image and label on the same grid.
    pub image: PathBuf,
    /// Its label map.
    pub label: PathBuf,
    /// Slabs along z the volume is cut into (cases); the last is held out.
    pub slabs: usize,
    /// Work folder (raw slabs, store, timing, runs, table).
    pub work: PathBuf,
    /// Final patch.
    pub final_patch: [usize; 3],
    /// Poolings per axis; `None` plans them from the final patch and the data's spacing.
    pub pools: Option<[u32; 3]>,
    /// Planned batch.
    pub batch: usize,
    /// Epochs of the projected run (and of the schedules whose steps are timed).
    pub project_epochs: usize,
    /// Iterations per epoch of the projected run.
    pub project_iters: usize,
    /// Timed iterations per step size.
    pub time_iterations: usize,
    /// Untimed warm-up iterations per step size (cuDNN autotunes a new shape on its first).
    pub warmup: usize,
    /// Modes trained for `epochs` × `iters_per_epoch` after the timing (may be empty).
    pub modes: Vec<Mode>,
    /// Epochs of each training run.
    pub epochs: usize,
    /// Iterations per epoch of each training run.
    pub iters_per_epoch: usize,
    /// Validation batches per epoch of each training run.
    pub val_iters: usize,
    /// Device.
    pub device: DeviceChoice,
    /// Features of the first stage and the cap.
    pub features: (i64, i64),
    /// libtorch threads.
    pub threads: Option<usize>,
    /// Sliding-window overlap of the validation.
    pub overlap: f64,
    /// Seed.
    pub seed: u64,
}

impl BenchConfig {
    /// The GPU settings: nnU-Net's 128³ plan (pools 5,5,5 at the CT's 1.5 mm) at batch 2, every
    /// step size of every mode timed over 10 iterations after 3 of warm-up, projected onto 1000
    /// epochs × 250 iterations; full nnU-Net widths; no training runs.
    pub fn gpu(image: PathBuf, label: PathBuf, work: PathBuf) -> BenchConfig {
        BenchConfig {
            image,
            label,
            slabs: 3,
            work,
            final_patch: [128, 128, 128],
            pools: None,
            batch: 2,
            project_epochs: 1000,
            project_iters: 250,
            time_iterations: 10,
            warmup: 3,
            modes: Vec::new(),
            epochs: 16,
            iters_per_epoch: 40,
            val_iters: 10,
            device: DeviceChoice::Auto,
            features: (32, 320),
            threads: None,
            overlap: 0.5,
            seed: 0,
        }
    }

    /// Tiny settings for a CPU (a few minutes on two cores): final patch 16×32×32, 2 timed
    /// iterations per step size, and training runs of constant, PGPS and PGPS-performance for
    /// 10 epochs of 4 iterations; 8 features at most 64, one thread.
    pub fn cpu_tiny(image: PathBuf, label: PathBuf, work: PathBuf) -> BenchConfig {
        BenchConfig {
            final_patch: [16, 32, 32],
            time_iterations: 2,
            warmup: 1,
            modes: vec![Mode::Constant, Mode::Pgps, Mode::PgpsPerformance],
            epochs: 10,
            iters_per_epoch: 4,
            val_iters: 2,
            device: DeviceChoice::Cpu,
            features: (8, 64),
            threads: Some(1),
            ..BenchConfig::gpu(image, label, work)
        }
    }

    fn train_config(&self, mode: Mode, out: PathBuf) -> TrainConfig {
        let mut c = TrainConfig::new(mode, self.final_patch, out);
        c.pools = self.pools;
        c.epochs = self.epochs;
        c.iters_per_epoch = self.iters_per_epoch;
        c.batch = self.batch;
        c.val_cases = 1;
        c.val_iters = Some(self.val_iters);
        c.val_every = 0;
        c.overlap = self.overlap;
        c.seed = self.seed;
        c.base_features = self.features.0;
        c.max_features = self.features.1;
        c.device = self.device;
        c.threads = self.threads;
        c.checkpoint_every = 0;
        c.export_predictions = true;
        c
    }

    /// The schedule of `mode` for the projected run.
    fn schedule(&self, pools: [u32; 3], mode: Mode) -> Result<Schedule, TrainerError> {
        Ok(Schedule::build(
            self.final_patch,
            pools,
            self.project_epochs,
            self.batch,
            mode,
        )?)
    }

    /// Every distinct step (patch, batch, crops per case) the modes' schedules train with,
    /// smallest batch voxels first.
    pub fn timed_steps(&self, pools: [u32; 3]) -> Result<Vec<Stage>, TrainerError> {
        let mut steps: Vec<Stage> = Vec::new();
        for mode in Mode::ALL {
            for st in self.schedule(pools, mode)?.stages() {
                if !steps.iter().any(|s| same_step(s, st)) {
                    steps.push(*st);
                }
            }
        }
        steps.sort_by_key(|s| (s.batch_voxels(), s.patch, s.batch));
        Ok(steps)
    }
}

fn same_step(a: &Stage, b: &Stage) -> bool {
    (a.patch, a.batch, a.crops_per_case) == (b.patch, b.batch, b.crops_per_case)
}

/// One mode's projected training time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    /// Mode name.
    pub mode: String,
    /// Sizes the mode trains with.
    pub sizes: usize,
    /// Projected seconds of training steps for the whole run (data wait and validation
    /// excluded).
    pub seconds: f64,
    /// `seconds` over the constant run's.
    pub vs_constant: f64,
    /// Voxels processed over the constant run's ([`Schedule::relative_cost`]).
    pub voxels_vs_constant: f64,
    /// The journal's time ratio, where it reports one.
    pub paper: Option<f64>,
}

/// Projects every mode's training time for `epochs × iters` iterations from the measured time
/// of each step (`seconds_per_iteration × (1 − data_wait_share)`: the device's step time):
/// `Σ_stages epochs × iters × t(patch, batch)`, and for `rpss` the mean over its sizes.
///
/// # Errors
/// A stage whose step was not timed.
pub fn project(
    schedules: &[Schedule],
    timings: &[StageTiming],
    iters: usize,
) -> Result<Vec<Projection>, TrainerError> {
    let times: BTreeMap<(Patch, usize), f64> = timings
        .iter()
        .map(|t| {
            let step = t.seconds_per_iteration * (1.0 - t.data_wait_share);
            ((t.patch, t.batch), step)
        })
        .collect();
    let time = |st: &Stage| {
        times.get(&(st.patch, st.batch)).copied().ok_or_else(|| {
            TrainerError::config(
                "timings",
                format!("step {} × batch {} was not timed", st.patch, st.batch),
            )
        })
    };
    let mut out = Vec::with_capacity(schedules.len());
    for s in schedules {
        let seconds = if s.mode() == Mode::Rpss {
            let mut sum = 0.0;
            for st in s.stages() {
                sum += time(st)?;
            }
            s.epochs() as f64 * iters as f64 * sum / s.stages().len() as f64
        } else {
            let mut sum = 0.0;
            for st in s.stages() {
                sum += st.epochs as f64 * iters as f64 * time(st)?;
            }
            sum
        };
        out.push(Projection {
            mode: s.mode().name().to_string(),
            sizes: s.sizes().len(),
            seconds,
            vs_constant: 0.0,
            voxels_vs_constant: s.relative_cost(),
            paper: PAPER_TIME_RATIOS
                .iter()
                .find(|(m, _)| *m == s.mode())
                .map(|&(_, r)| r),
        });
    }
    let constant = out
        .iter()
        .find(|p| p.mode == Mode::Constant.name())
        .map(|p| p.seconds);
    for p in &mut out {
        p.vs_constant = constant.filter(|&c| c > 0.0).map_or(0.0, |c| p.seconds / c);
    }
    Ok(out)
}

/// The projection as a table: one row per mode.
pub fn render_projection(p: &[Projection], epochs: usize, iters: usize) -> String {
    let mut rows = vec![
        [
            "mode",
            "sizes",
            "projected h",
            "vs constant",
            "paper",
            "voxels vs constant",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for m in p {
        rows.push(vec![
            m.mode.clone(),
            m.sizes.to_string(),
            format!("{:.2}", m.seconds / 3600.0),
            format!("{:.2}", m.vs_constant),
            m.paper.map_or(String::new(), |r| format!("{r:.2}")),
            format!("{:.2}", m.voxels_vs_constant),
        ]);
    }
    let mut text = format!(
        "projected training time of {epochs} epochs × {iters} iterations (device steps only, \
         from the timed steps above)\n"
    );
    text.push_str(&render_table(
        &rows,
        &[true, false, false, false, false, false],
    ));
    text
}

/// Cuts the labelled volume into `slabs` slabs along z and writes them in nnU-Net's raw layout
/// under `raw` (`slab_<i>`), each with its own affine (origin moved to the slab's first slice).
pub fn write_slabs(
    image: &Path,
    label: &Path,
    slabs: usize,
    raw: &Path,
) -> Result<(), TrainerError> {
    let img = read_nifti(image)?;
    let lab = read_nifti(label)?;
    if img.geometry.shape != lab.geometry.shape {
        return Err(TrainerError::Case {
            case: image.display().to_string(),
            reason: format!(
                "image shape {:?} and label shape {:?} differ",
                img.geometry.shape, lab.geometry.shape
            ),
        });
    }
    let [nz, ny, nx] = img.geometry.shape;
    if slabs == 0 || slabs > nz {
        return Err(TrainerError::config(
            "slabs",
            format!("{slabs} slabs of a volume with {nz} slices"),
        ));
    }
    let plane = ny * nx;
    for dir in ["imagesTr", "labelsTr"] {
        let d = raw.join(dir);
        std::fs::create_dir_all(&d).map_err(|e| TrainerError::io(&d, e))?;
    }
    for s in 0..slabs {
        let z0 = s * nz / slabs;
        let z1 = (s + 1) * nz / slabs;
        let mut affine = img.geometry.affine;
        for (r, row) in affine.iter_mut().enumerate().take(3) {
            row[3] = img.geometry.affine[r][3] + img.geometry.affine[r][2] * z0 as f64;
        }
        let geometry = Geometry {
            shape: [z1 - z0, ny, nx],
            spacing: img.geometry.spacing,
            affine,
        };
        let cut = |v: &VoxelData| -> VoxelData {
            let (a, b) = (z0 * plane, z1 * plane);
            match v {
                VoxelData::U8(x) => VoxelData::U8(x[a..b].to_vec()),
                VoxelData::I8(x) => VoxelData::I8(x[a..b].to_vec()),
                VoxelData::U16(x) => VoxelData::U16(x[a..b].to_vec()),
                VoxelData::I16(x) => VoxelData::I16(x[a..b].to_vec()),
                VoxelData::U32(x) => VoxelData::U32(x[a..b].to_vec()),
                VoxelData::I32(x) => VoxelData::I32(x[a..b].to_vec()),
                VoxelData::F32(x) => VoxelData::F32(x[a..b].to_vec()),
                VoxelData::F64(x) => VoxelData::F64(x[a..b].to_vec()),
            }
        };
        let id = format!("slab_{s}");
        write_nifti(
            &raw.join("imagesTr").join(format!("{id}_0000.nii.gz")),
            &geometry,
            &cut(&img.data),
        )?;
        write_nifti(
            &raw.join("labelsTr").join(format!("{id}.nii.gz")),
            &geometry,
            &cut(&lab.data),
        )?;
    }
    // Name the classes that occur (the source has no dataset.json of its own).
    let mut present = std::collections::BTreeSet::new();
    for i in 0..lab.data.len() {
        let v = lab.data.get_f64(i);
        if v >= 0.0 && v <= f64::from(u16::MAX) && v.fract() == 0.0 {
            present.insert(v as u16);
        }
    }
    present.insert(0);
    let labels: serde_json::Map<String, serde_json::Value> = present
        .iter()
        .map(|&c| {
            let name = if c == 0 {
                "background".to_string()
            } else {
                format!("class_{c}")
            };
            (name, serde_json::Value::from(c))
        })
        .collect();
    let json = serde_json::json!({
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": slabs,
        "file_ending": ".nii.gz",
    });
    let p = raw.join("dataset.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&json).unwrap_or_default())
        .map_err(|e| TrainerError::io(&p, e))?;
    Ok(())
}

/// Runs the benchmark and returns the table (also written to `<work>/table.txt`; the
/// projection to `<work>/projection.json`).
pub fn run_bench(cfg: &BenchConfig) -> Result<String, TrainerError> {
    let raw = cfg.work.join("raw");
    let store = cfg.work.join("store");
    std::fs::create_dir_all(&cfg.work).map_err(|e| TrainerError::io(&cfg.work, e))?;
    write_slabs(&cfg.image, &cfg.label, cfg.slabs, &raw)?;
    let opts = IngestOptions {
        progress: false,
        ..IngestOptions::default()
    };
    let report =
        ingest(&raw, &store, &opts, &AtomicBool::new(false)).map_err(|e| TrainerError::Case {
            case: raw.display().to_string(),
            reason: format!("ingest failed: {e}"),
        })?;
    if let Some((case, why)) = report.failed.first() {
        return Err(TrainerError::Case {
            case: case.clone(),
            reason: format!("ingest failed: {why}"),
        });
    }
    let open = || InProcessSource::open(&store, "bench", 2 << 30);

    let source = open()?;
    let pools = match cfg.pools {
        Some(p) => p,
        None => plan_pooling(cfg.final_patch, source.info().median_spacing(), NO_POOL_CAP)?.pools,
    };
    let steps = cfg.timed_steps(pools)?;
    let timing_dir = cfg.work.join("stage-timing");
    tracing::info!(steps = steps.len(), "timing every step size of every mode");
    let mut timing_cfg = cfg.train_config(Mode::Constant, timing_dir.clone());
    timing_cfg.pools = Some(pools);
    let timings = time_steps(
        &timing_cfg,
        Box::new(source),
        Some(&steps),
        cfg.warmup,
        cfg.time_iterations,
    )?;
    let schedules = Mode::ALL
        .iter()
        .map(|&m| cfg.schedule(pools, m))
        .collect::<Result<Vec<_>, _>>()?;
    let projection = project(&schedules, &timings, cfg.project_iters)?;
    crate::train::write_json(&cfg.work.join(PROJECTION_FILE), &projection)?;

    let mut dirs = vec![timing_dir];
    for &mode in &cfg.modes {
        let out = cfg.work.join("runs").join(mode.name());
        if out.exists() {
            std::fs::remove_dir_all(&out).map_err(|e| TrainerError::io(&out, e))?;
        }
        tracing::info!(%mode, "training");
        let mut c = cfg.train_config(mode, out.clone());
        c.pools = Some(pools);
        train(&c, Box::new(open()?))?;
        dirs.push(out);
    }
    let mut table = compare_runs(&dirs)?;
    table.push('\n');
    table.push_str(&render_projection(
        &projection,
        cfg.project_epochs,
        cfg.project_iters,
    ));
    let p = cfg.work.join("table.txt");
    std::fs::write(&p, &table).map_err(|e| TrainerError::io(&p, e))?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(axes: [usize; 3]) -> Patch {
        Patch::new(axes).unwrap()
    }

    /// The GPU settings plan nnU-Net's 128³ network (5 poolings per axis at 1.5 mm) and time the
    /// 9 sizes at batch 2, PGPS+'s larger batches (24, 12, 6, 4, 3) of the first five sizes and
    /// the performance mode's (64, 32, 16, 10, 7, 4, 3) of the first seven: 21 steps.
    #[test]
    fn gpu_settings_time_every_step_of_the_128_plan() {
        let c = BenchConfig::gpu("i".into(), "l".into(), "w".into());
        let plan = plan_pooling(c.final_patch, [1.5; 3], NO_POOL_CAP).unwrap();
        assert_eq!(plan.patch, c.final_patch);
        assert_eq!(plan.pools, [5, 5, 5]);
        let steps = c.timed_steps(plan.pools).unwrap();
        assert_eq!(steps.len(), 21);
        let at = |patch: [usize; 3]| -> Vec<usize> {
            let mut b: Vec<usize> = steps
                .iter()
                .filter(|s| s.patch == p(patch))
                .map(|s| s.batch)
                .collect();
            b.sort_unstable();
            b
        };
        assert_eq!(at([64, 32, 32]), vec![2, 24, 64]);
        assert_eq!(at([96, 64, 64]), vec![2, 4, 10]);
        assert_eq!(at([128, 96, 96]), vec![2, 3]);
        assert_eq!(at([128, 128, 128]), vec![2]);
        for w in steps.windows(2) {
            assert!(w[0].batch_voxels() <= w[1].batch_voxels());
        }
        let tiny = BenchConfig::cpu_tiny("i".into(), "l".into(), "w".into());
        let plan = plan_pooling(tiny.final_patch, [1.5; 3], NO_POOL_CAP).unwrap();
        assert_eq!(plan.pools, [2, 3, 3]);
        assert_eq!(tiny.timed_steps(plan.pools).unwrap().len(), 21);
        // Every training run of the tiny settings has at least one epoch per stage.
        for &m in &tiny.modes {
            let s = Schedule::build(tiny.final_patch, plan.pools, tiny.epochs, 2, m).unwrap();
            assert!(s.stages().iter().all(|st| st.epochs >= 1));
        }
    }

    fn timing(st: &Stage, seconds: f64, wait: f64) -> StageTiming {
        StageTiming {
            stage: 0,
            patch: st.patch,
            batch: st.batch,
            iterations: 1,
            seconds_per_iteration: seconds,
            data_wait_share: wait,
            voxels_per_second: 0.0,
        }
    }

    /// With a step time proportional to the voxels of the batch, the projected time ratios
    /// are the schedules' voxel ratios; with a constant step time, a growing schedule costs as
    /// much as the constant run. Data wait is left out.
    #[test]
    fn projection_follows_the_timed_steps() {
        let c = BenchConfig::gpu("i".into(), "l".into(), "w".into());
        let schedules: Vec<Schedule> = Mode::ALL
            .iter()
            .map(|&m| c.schedule([5; 3], m).unwrap())
            .collect();
        let steps = c.timed_steps([5; 3]).unwrap();
        let proportional: Vec<StageTiming> = steps
            .iter()
            .map(|s| timing(s, 1e-7 * s.batch_voxels() as f64 / 0.5, 0.5))
            .collect();
        let p = project(&schedules, &proportional, 250).unwrap();
        assert_eq!(p.len(), 5);
        for (proj, s) in p.iter().zip(&schedules) {
            assert_eq!(proj.mode, s.mode().name());
            assert!(
                (proj.vs_constant - s.relative_cost()).abs() < 1e-9,
                "{proj:?}"
            );
            assert_eq!(proj.voxels_vs_constant, s.relative_cost());
        }
        let constant = &p[4];
        assert_eq!(constant.mode, "constant");
        // 1000 × 250 steps of 2 × 128³ voxels at 1e-7 s per voxel.
        assert!((constant.seconds - 250_000.0 * 2.0 * 2_097_152.0 * 1e-7).abs() < 1e-3);
        assert_eq!(p[0].paper, Some(0.44));
        assert_eq!(p[2].paper, Some(0.89));
        assert_eq!(p[1].paper, None);

        let flat: Vec<StageTiming> = steps.iter().map(|s| timing(s, 0.1, 0.0)).collect();
        let p = project(&schedules, &flat, 250).unwrap();
        assert!(p.iter().all(|m| (m.vs_constant - 1.0).abs() < 1e-12));
        let table = render_projection(&p, 1000, 250);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("pgps ") && l.contains("0.44"))
        );

        assert!(project(&schedules, &flat[1..], 250).is_err());
    }

    /// Slabs keep every voxel where it was in the world: slab `s`'s first voxel maps to the
    /// source's voxel `(0, 0, z0)`.
    #[test]
    fn slabs_keep_world_positions() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [7, 3, 4];
        let n: usize = shape.iter().product();
        let geometry = Geometry {
            shape,
            spacing: [2.0, 1.0, 1.0],
            affine: [
                [-1.0, 0.0, 0.0, 10.0],
                [0.0, 1.0, 0.0, -5.0],
                [0.0, 0.0, 2.0, 3.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let image: Vec<i16> = (0..n as i16).collect();
        let label: Vec<u8> = (0..n).map(|i| u8::from(i % 5 == 0)).collect();
        let (ip, lp) = (dir.path().join("i.nii.gz"), dir.path().join("l.nii.gz"));
        write_nifti(&ip, &geometry, &VoxelData::I16(image)).unwrap();
        write_nifti(&lp, &geometry, &VoxelData::U8(label)).unwrap();
        let raw = dir.path().join("raw");
        write_slabs(&ip, &lp, 3, &raw).unwrap();
        // z 0..2, 2..4, 4..7
        let s2 = read_nifti(&raw.join("imagesTr/slab_2_0000.nii.gz")).unwrap();
        assert_eq!(s2.geometry.shape, [3, 3, 4]);
        assert_eq!(s2.geometry.affine[2][3], 3.0 + 2.0 * 4.0);
        assert_eq!(s2.geometry.affine[0][3], 10.0);
        assert_eq!(s2.data.get_f64(0), (4 * 12) as f64);
        let l0 = read_nifti(&raw.join("labelsTr/slab_0.nii.gz")).unwrap();
        assert_eq!(l0.geometry.shape, [2, 3, 4]);
        let json = std::fs::read_to_string(raw.join("dataset.json")).unwrap();
        assert!(json.contains("class_1"));
        assert!(write_slabs(&ip, &lp, 8, &raw).is_err());
    }
}

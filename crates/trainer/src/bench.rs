//! The curriculum benchmark: one real CT, the constant nnU-Net baseline against PGPS
//! (efficiency and performance) for the same budget, and the time per iteration at every stage,
//! printed as one table.
//!
//! The dataset is made from one labelled CT (by default TotalSegmentator's aorta test case):
//! the volume is cut along z into slabs, each slab a case (the last held out for validation),
//! so that validation measures the segmentation of the same structure in a part of the body the
//! network did not train on. The slabs are written as NIfTI and ingested with the regular
//! pipeline; everything lands in the work folder.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use patchflow_curriculum::Mode;
use patchflow_ingest::{IngestOptions, ingest};
use patchflow_volume::{Geometry, VoxelData, read_nifti, write_nifti};

use crate::TrainerError;
use crate::data::InProcessSource;
use crate::device::DeviceChoice;
use crate::train::{TrainConfig, compare_runs, time_stages, train};

/// Settings of a benchmark run.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchConfig {
    /// Labelled image: NIfTI image and label on the same grid.
    pub image: PathBuf,
    /// Its label map.
    pub label: PathBuf,
    /// Slabs along z the volume is cut into (cases); the last is held out.
    pub slabs: usize,
    /// Work folder (raw slabs, store, runs, table).
    pub work: PathBuf,
    /// Final patch.
    pub final_patch: [usize; 3],
    /// Planned batch.
    pub batch: usize,
    /// Epochs of each training run.
    pub epochs: usize,
    /// Iterations per epoch.
    pub iters_per_epoch: usize,
    /// Timed iterations per stage.
    pub time_iterations: usize,
    /// Untimed warm-up iterations per stage.
    pub warmup: usize,
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
    /// Training runs, in order (the first `constant` one is the baseline).
    pub modes: Vec<Mode>,
}

impl BenchConfig {
    /// The GPU settings: 3 slabs, final patch 48×96×96, batch 2, 16 epochs of 40 iterations
    /// per run, 8 timed iterations per stage, full nnU-Net widths (150 s on one H100 including
    /// start-up, ingest and cuDNN autotuning of every new patch shape).
    pub fn gpu(image: PathBuf, label: PathBuf, work: PathBuf) -> BenchConfig {
        BenchConfig {
            image,
            label,
            slabs: 3,
            work,
            final_patch: [48, 96, 96],
            batch: 2,
            epochs: 16,
            iters_per_epoch: 40,
            time_iterations: 8,
            warmup: 2,
            device: DeviceChoice::Auto,
            features: (32, 320),
            threads: None,
            overlap: 0.5,
            seed: 0,
            modes: vec![Mode::Constant, Mode::Pgps, Mode::PgpsPerformance],
        }
    }

    /// Tiny settings for a CPU (about a minute on two cores): final patch 16×32×32, 10 epochs
    /// of 4 iterations, 2 timed iterations per stage, 8 features at most 64, one thread.
    pub fn cpu_tiny(image: PathBuf, label: PathBuf, work: PathBuf) -> BenchConfig {
        BenchConfig {
            final_patch: [16, 32, 32],
            epochs: 10,
            iters_per_epoch: 4,
            time_iterations: 2,
            warmup: 1,
            device: DeviceChoice::Cpu,
            features: (8, 64),
            threads: Some(1),
            ..BenchConfig::gpu(image, label, work)
        }
    }

    fn train_config(&self, mode: Mode, out: PathBuf) -> TrainConfig {
        let mut c = TrainConfig::new(mode, self.final_patch, out);
        c.epochs = self.epochs;
        c.iters_per_epoch = self.iters_per_epoch;
        c.batch = self.batch;
        c.val_cases = 1;
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

/// Runs the benchmark and returns the table (also written to `<work>/table.txt`).
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

    let mut dirs = Vec::new();
    let timing = cfg.work.join("stage-timing");
    tracing::info!("timing every stage of the pgps schedule");
    time_stages(
        &cfg.train_config(Mode::Pgps, timing.clone()),
        Box::new(open()?),
        cfg.warmup,
        cfg.time_iterations,
    )?;
    dirs.push(timing);
    for &mode in &cfg.modes {
        let out = cfg.work.join("runs").join(mode.name());
        if out.exists() {
            std::fs::remove_dir_all(&out).map_err(|e| TrainerError::io(&out, e))?;
        }
        tracing::info!(%mode, "training");
        train(&cfg.train_config(mode, out.clone()), Box::new(open()?))?;
        dirs.push(out);
    }
    let table = compare_runs(&dirs)?;
    let p = cfg.work.join("table.txt");
    std::fs::write(&p, &table).map_err(|e| TrainerError::io(&p, e))?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_curriculum::{NO_POOL_CAP, Schedule, plan_pooling};

    /// The GPU settings plan a network whose PGPS schedule has one epoch per stage (the last
    /// takes the remainder).
    #[test]
    fn gpu_settings_give_one_epoch_per_stage() {
        let c = BenchConfig::gpu("i".into(), "l".into(), "w".into());
        let plan = plan_pooling(c.final_patch, [1.5; 3], NO_POOL_CAP).unwrap();
        assert_eq!(plan.patch, c.final_patch);
        assert_eq!(plan.pools, [3, 4, 4]);
        let s = Schedule::build(c.final_patch, plan.pools, c.epochs, c.batch, Mode::Pgps).unwrap();
        assert_eq!(s.stages().len(), 15);
        assert!(s.stages()[..14].iter().all(|st| st.epochs == 1));
        let tiny = BenchConfig::cpu_tiny("i".into(), "l".into(), "w".into());
        let plan = plan_pooling(tiny.final_patch, [1.5; 3], NO_POOL_CAP).unwrap();
        let s = Schedule::build(tiny.final_patch, plan.pools, tiny.epochs, 2, Mode::Pgps).unwrap();
        assert_eq!(s.stages().len(), 9);
        assert!(s.stages()[..8].iter().all(|st| st.epochs == 1));
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

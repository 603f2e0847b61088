//! CPU training on a phantom store: the network learns with the PGPS curriculum switching the
//! patch size mid-run, a resumed run continues bit for bit, and predictions are written on the
//! input's grid.
//!
//! libtorch runs single-threaded here: on a small shared machine its thread pool spins against
//! the sampler's, and one thread also makes the CPU kernels' reductions deterministic.

mod common;

use std::path::Path;

use common::{PhantomStore, make_store};
use patchflow_curriculum::Mode;
use patchflow_store::{ChunkCache, Manifest};
use patchflow_trainer::data::OriginalGrid;
use patchflow_trainer::eval::to_original_grid;
use patchflow_trainer::metrics::read_records;
use patchflow_trainer::train::{METRICS_FILE, SUMMARY_FILE};
use patchflow_trainer::{BatchSource, DeviceChoice, InProcessSource, TrainConfig, train};
use patchflow_volume::{LabelData, read_nifti, read_nifti_geometry};
use tch::Tensor;

/// Class value of the phantom's lesions.
const LESION: usize = 4;

fn cpu_config(mode: Mode, final_patch: [usize; 3], out: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(mode, final_patch, out);
    c.device = DeviceChoice::Cpu;
    c.threads = Some(1);
    c.base_features = 8;
    c.max_features = 64;
    c.prefetch = 2;
    c
}

fn source(store: &Path) -> Box<dyn BatchSource> {
    Box::new(InProcessSource::open(store, "phantom", 64 << 20).unwrap())
}

/// 2,000 iterations of PGPS on 16×32×32 phantoms (4 mm × 2 mm × 2 mm), final patch the whole
/// volume: nine stages from the published minimum 8×8×8 up, two epochs each (the last four).
///
/// The assertion is on the lesion class, the rare one (about 1% of the voxels, 70 HU darker
/// than the liver around it): it reaches a Dice of 0.86–0.94 on the held-out case with seeds
/// 0–2 in this budget; 0.5 is asserted. Liver and kidney differ from the surrounding soft tissue
/// by 20 and 10 HU under 15 HU of noise and are not learned in this budget; bone is (Dice ≥
/// 0.2, usually 1.0) but is trivially bright, so it proves less.
#[test]
fn pgps_training_learns_the_lesion_while_the_patch_grows() {
    let dir = tempfile::tempdir().unwrap();
    let made = make_store(
        dir.path(),
        &PhantomStore {
            cases: 5,
            shape: [16, 32, 32],
            spacing: [4.0, 2.0, 2.0],
            lesions: 4,
            odd_last_case: None,
        },
    );
    let out = dir.path().join("run");
    let mut cfg = cpu_config(Mode::Pgps, [16, 32, 32], &out);
    cfg.epochs = 20;
    cfg.iters_per_epoch = 100;
    cfg.val_every = 10;
    cfg.val_iters = Some(10);
    let summary = train(&cfg, source(&made.store)).unwrap();

    // The schedule really changed the patch through the stream: nine stages, each epoch's
    // batches of the stage's size, growing.
    let records = read_records(&out.join(METRICS_FILE)).unwrap();
    assert_eq!(records.len(), 20);
    let patches: Vec<[usize; 3]> = records.iter().map(|r| r.patch.axes()).collect();
    assert_eq!(patches[0], [8, 8, 8]);
    assert_eq!(patches[19], [16, 32, 32]);
    let mut distinct = patches.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 9, "{patches:?}");
    for w in records.windows(2) {
        assert!(w[1].mean_patch_voxels >= w[0].mean_patch_voxels);
    }
    assert_eq!(summary.stages.len(), 9);
    assert!(records[0].loss > records[19].loss);

    let v = summary.validation.as_ref().unwrap();
    let lesion = v.mean_dice[LESION].unwrap();
    assert!(lesion > 0.5, "lesion Dice {lesion}, all {:?}", v.mean_dice);
    assert!(records[9].val_dice.is_some() && records[19].val_dice.is_some());
    assert!(out.join("plot.png").exists());
    assert!(out.join(SUMMARY_FILE).exists());
    let pred = v.cases[0].prediction.as_ref().unwrap();
    assert!(pred.exists());

    // Every epoch was validated on batches of the final patch from the held-out case: a
    // pseudo-Dice per foreground class, their mean, and nnU-Net's moving average of it.
    let mut ema: Option<f64> = None;
    for r in &records {
        let dice = r.pseudo_dice.as_ref().unwrap();
        assert_eq!(dice.len(), LESION + 1);
        assert_eq!(dice[0], None, "background is not scored");
        let defined: Vec<f64> = dice.iter().flatten().copied().collect();
        let mean = defined.iter().sum::<f64>() / defined.len() as f64;
        assert!((r.mean_pseudo_dice.unwrap() - mean).abs() < 1e-12);
        let expected = ema.map_or(mean, |e| 0.9 * e + 0.1 * mean);
        assert!((r.ema_pseudo_dice.unwrap() - expected).abs() < 1e-12);
        ema = Some(expected);
        assert!(r.val_loss.unwrap().is_finite());
    }
    // The patches show the learning too: nothing at first (0.0 in epoch 0 with seed 0), the
    // lesion at about 0.75 after the last epoch (0.4 asserted).
    let first = records[0].ema_pseudo_dice.unwrap();
    assert!(records[19].ema_pseudo_dice.unwrap() > first);
    let lesion = records[19].pseudo_dice.as_ref().unwrap()[LESION].unwrap();
    assert!(lesion > 0.4, "lesion pseudo Dice {lesion}");
    // checkpoint_best holds the epoch with the best moving average.
    let best = summary.best_epoch.unwrap();
    let best_ema = records[best].ema_pseudo_dice.unwrap();
    assert_eq!(summary.best_ema_pseudo_dice, Some(best_ema));
    assert!(
        records
            .iter()
            .all(|r| r.ema_pseudo_dice.unwrap() <= best_ema)
    );
    let state = |dir: &str| {
        patchflow_trainer::checkpoint::read_state(&out.join(dir))
            .unwrap()
            .unwrap_or_else(|| panic!("no checkpoint in {dir}"))
    };
    assert_eq!(state("checkpoint_best").epochs_done, best + 1);
    // A checkpoint named after every size that ended, taken when the next one began.
    for st in &summary.stages[..8] {
        let dir = format!("checkpoint_{}", st.patch.file_tag());
        assert_eq!(
            state(&dir).epochs_done,
            records.iter().filter(|r| r.stage <= st.stage).count()
        );
    }
    assert!(!out.join("checkpoint_16x32x32").exists());
}

/// Reads every tensor of a checkpoint's tensors file.
fn checkpoint_tensors(out: &Path) -> Vec<(String, Tensor)> {
    let state = patchflow_trainer::checkpoint::read_state(&out.join("checkpoint"))
        .unwrap()
        .unwrap();
    let mut t = Tensor::read_safetensors(out.join("checkpoint").join(&state.tensors)).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Four epochs of five iterations straight, against two epochs, a stop with a checkpoint, and a
/// resume for the other two: the same weights and momentum bit for bit, the same losses.
#[test]
fn resume_continues_identically() {
    let dir = tempfile::tempdir().unwrap();
    let made = make_store(dir.path(), &PhantomStore::small());
    // Final 8×16×16 with pools [2, 3, 3]: stages 8×8×8, 8×16×8 (one epoch each) and 8×16×16
    // (the last two), so the resumed half starts in a new stage.
    let config = |out: &Path| {
        let mut c = cpu_config(Mode::Pgps, [8, 16, 16], out);
        c.pools = Some([2, 3, 3]);
        c.epochs = 4;
        c.iters_per_epoch = 5;
        c.export_predictions = false;
        c.seed = 7;
        c
    };
    let straight = dir.path().join("straight");
    let s = train(&config(&straight), source(&made.store)).unwrap();
    assert!(s.finished);

    let split = dir.path().join("split");
    let mut first = config(&split);
    first.stop_after_epochs = Some(2);
    let s1 = train(&first, source(&made.store)).unwrap();
    assert!(!s1.finished);
    assert_eq!(s1.epochs_done, 2);
    let mut second = config(&split);
    second.resume = true;
    let s2 = train(&second, source(&made.store)).unwrap();
    assert!(s2.finished);
    assert_eq!(s2.epochs_done, 4);

    let a = checkpoint_tensors(&straight);
    let b = checkpoint_tensors(&split);
    assert_eq!(a.len(), b.len());
    assert!(a.iter().any(|(n, _)| n.starts_with("momentum.")));
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "tensor {na} differs after resuming");
    }
    let ra = read_records(&straight.join(METRICS_FILE)).unwrap();
    let rb = read_records(&split.join(METRICS_FILE)).unwrap();
    assert_eq!(ra.len(), 4);
    assert_eq!(rb.len(), 4);
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!(x.loss, y.loss, "epoch {}", x.epoch);
        assert_eq!(x.patch, y.patch);
    }

    // A checkpoint of another run is refused.
    let mut other = config(&split);
    other.resume = true;
    other.seed = 8;
    let err = train(&other, source(&made.store)).unwrap_err().to_string();
    assert!(err.contains("seed"), "{err}");
}

/// The held-out case was resampled and cropped by ingest; its prediction is written on the
/// source grid: the same shape and affine as the input image, background outside the crop.
/// Mapping the stored label back the same way reproduces the source label map (nearest
/// neighbour both ways, so only voxels at class borders may differ).
#[test]
fn predictions_have_the_input_grid() {
    let dir = tempfile::tempdir().unwrap();
    let border = 2;
    let made = make_store(
        dir.path(),
        &PhantomStore {
            odd_last_case: Some(border),
            ..PhantomStore::small()
        },
    );
    let id = "phantom_002";
    let manifest = Manifest::load(&made.store).unwrap().unwrap();
    let entry = manifest.cases.iter().find(|c| c.id == id).unwrap();
    let reader =
        patchflow_store::CaseReader::open(&made.store.join(&entry.file), ChunkCache::new(16 << 20))
            .unwrap();
    let meta = reader.meta().clone();
    let raw_image = made.raw.join("imagesTr").join(format!("{id}_0000.nii.gz"));
    let input = read_nifti_geometry(&raw_image).unwrap();
    assert_ne!(
        meta.shape, input.shape,
        "ingest should have resampled the odd case"
    );
    let cropped: Vec<usize> = meta.crop_box.iter().map(|[s, e]| e - s).collect();
    assert_ne!(
        cropped,
        input.shape.to_vec(),
        "ingest should have cropped the odd case"
    );

    let out = dir.path().join("run");
    let mut cfg = cpu_config(Mode::Constant, [8, 16, 16], &out);
    cfg.pools = Some([2, 3, 3]);
    cfg.epochs = 1;
    cfg.iters_per_epoch = 2;
    // The GPU default, exercised here: a loss on every decoder output.
    cfg.deep_supervision = Some(true);
    let summary = train(&cfg, source(&made.store)).unwrap();
    assert!(summary.run.unet.deep_supervision);
    // nnU-Net's foreground oversampling for the constant baseline.
    assert_eq!(summary.run.oversample, 0.33);
    assert!(
        read_records(&out.join(METRICS_FILE)).unwrap()[0]
            .loss
            .is_finite()
    );
    let v = summary.validation.unwrap();
    assert_eq!(v.cases[0].id, id);
    let pred_path = v.cases[0].prediction.clone().unwrap();
    let pred = read_nifti(&pred_path).unwrap();
    assert_eq!(pred.geometry.shape, input.shape);
    for r in 0..4 {
        for c in 0..4 {
            assert!(
                (pred.geometry.affine[r][c] - input.affine[r][c]).abs() < 1e-6,
                "affine differs: {:?} vs {:?}",
                pred.geometry.affine,
                input.affine
            );
        }
    }
    // Outside the crop box the prediction is background.
    let s = input.shape;
    let cb = meta.crop_box;
    for z in 0..s[0] {
        for y in 0..s[1] {
            for x in 0..s[2] {
                let inside = z >= cb[0][0]
                    && z < cb[0][1]
                    && y >= cb[1][0]
                    && y < cb[1][1]
                    && x >= cb[2][0]
                    && x < cb[2][1];
                if !inside {
                    assert_eq!(pred.data.get_f64((z * s[1] + y) * s[2] + x), 0.0);
                }
            }
        }
    }

    // The stored label, mapped back, agrees with the source label map.
    let mut loader = InProcessSource::open(&made.store, "phantom", 16 << 20)
        .unwrap()
        .volumes()
        .unwrap();
    let vol = loader.load(id).unwrap();
    let grid = OriginalGrid {
        geometry: meta.original.clone(),
        crop_box: meta.crop_box,
    };
    let back = to_original_grid(&vol.label, vol.shape, &grid, id).unwrap();
    let LabelData::U8(back) = back else {
        panic!("phantom labels are u8");
    };
    let raw_label = read_nifti(&made.raw.join("labelsTr").join(format!("{id}.nii.gz"))).unwrap();
    let same = back
        .iter()
        .enumerate()
        .filter(|&(i, &l)| f64::from(l) == raw_label.data.get_f64(i))
        .count();
    let share = same as f64 / back.len() as f64;
    assert!(share > 0.97, "only {:.1}% of voxels agree", 100.0 * share);
}

//! The patch-size schedules of the authors' published trainers (PGPS, PGPS+, RPSS), the
//! journal's performance variant and the constant nnU-Net baseline.

use std::fmt;
use std::str::FromStr;

use patchflow_grid::{AXIS_NAMES, Patch, parse_triplet};
use serde::{Deserialize, Serialize};

use crate::error::CurriculumError;

/// Largest accepted number of stride-2 poolings per axis (a step of 4096 voxels, the largest
/// patch edge [`patchflow_grid::MAX_PATCH_AXIS`]).
pub const MAX_POOLS: u32 = 12;

/// nnU-Net's share of foreground-centred crops (`oversample_foreground_percent`).
pub const NNUNET_FOREGROUND_OVERSAMPLE: f64 = 0.33;

/// The share of foreground-centred crops the published curriculum trainers set for the whole
/// curriculum ("replicate standard nnUNet setting (batchsize=2 -> oversampling=0.5)").
pub const CURRICULUM_FOREGROUND_OVERSAMPLE: f64 = 0.5;

/// How the patch size (and batch size) evolve over a training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The authors' PGPS (`nnUNetTrainer_PGPS`): the patch grows stage by stage, the batch stays
    /// at the planned value (journal: 44% of the constant run's training time, same Dice).
    /// `pgps-efficiency` is accepted as another name.
    #[serde(alias = "pgps-efficiency")]
    Pgps,
    /// The authors' PGPS+ (`nnUNetTrainer_PGPS+`, `plan_batch_size`): the patch grows as in PGPS
    /// and the batch of size `i` is `int(v_{i+1} / v_i × b_{i+1})` (voxels `v`), computed
    /// backwards from the final size and floored at the planned batch, so the voxels per batch
    /// grow monotonically.
    ///
    /// The published code starts that chain from a literal batch of 2 at the final size (its
    /// final-size loader hard-codes 2 as well): nnU-Net's usual planned batch. This crate starts
    /// it from the planned batch, which gives the same batches when the planned batch is 2 and
    /// keeps the final stage at the planned batch otherwise (the published code would train the
    /// final size with `max(2, planned)`).
    PgpsPlus,
    /// The journal's performance mode (described there, not in the published code): the patch
    /// grows as in PGPS and the voxels per batch stay those of the planned batch at the final
    /// patch, `batch = int(planned × v(final) / v(current))`; each batch loads `planned` cases
    /// and takes `ceil(batch / planned)` crops of each.
    PgpsPerformance,
    /// Random patch-size sampling (`nnUNetTrainer_RPSS`, the authors' ablation): every iteration
    /// draws one of the `S` PGPS sizes uniformly, with the planned batch.
    Rpss,
    /// The nnU-Net baseline: the final patch and the planned batch for the whole run.
    Constant,
}

impl Mode {
    /// Every mode, in a stable order.
    pub const ALL: [Mode; 5] = [
        Mode::Pgps,
        Mode::PgpsPlus,
        Mode::PgpsPerformance,
        Mode::Rpss,
        Mode::Constant,
    ];

    /// The mode's name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pgps => "pgps",
            Mode::PgpsPlus => "pgps-plus",
            Mode::PgpsPerformance => "pgps-performance",
            Mode::Rpss => "rpss",
            Mode::Constant => "constant",
        }
    }

    /// Whether the patch grows with the epoch (the three PGPS modes).
    pub fn grows(self) -> bool {
        matches!(self, Mode::Pgps | Mode::PgpsPlus | Mode::PgpsPerformance)
    }

    /// The share of foreground-centred crops a run of this mode trains with: 0.5 in every
    /// curriculum mode, as the published trainers set it, and nnU-Net's 0.33 for `constant`.
    pub fn foreground_oversample(self) -> f64 {
        match self {
            Mode::Constant => NNUNET_FOREGROUND_OVERSAMPLE,
            _ => CURRICULUM_FOREGROUND_OVERSAMPLE,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = CurriculumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("pgps-efficiency") {
            return Ok(Mode::Pgps);
        }
        Mode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(t))
            .ok_or_else(|| CurriculumError::UnknownMode {
                given: s.to_string(),
            })
    }
}

/// One stage of a schedule: a patch size and batch size held for a run of epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Stage {
    /// The patch, `[z, y, x]` in JSON.
    #[serde(with = "crate::patch_serde")]
    pub patch: Patch,
    /// Crops per training batch.
    pub batch: usize,
    /// First epoch (0-based) of the stage.
    pub first_epoch: usize,
    /// Number of epochs the stage lasts. In `rpss` every size is a candidate for the whole run,
    /// so `first_epoch` is 0 and `epochs` is the run's length for all of them.
    pub epochs: usize,
    /// Crops taken from each drawn case: `ceil(batch / planned_batch)` in `pgps-performance`
    /// (the batch loads `planned_batch` cases), 1 otherwise (one case per crop, as nnU-Net's
    /// loader does).
    pub crops_per_case: usize,
}

impl Stage {
    /// Voxels in one batch (`batch × patch voxels`).
    pub fn batch_voxels(&self) -> u128 {
        u128::from(self.patch.voxels()) * self.batch as u128
    }

    /// Last epoch (inclusive) of the stage.
    pub fn last_epoch(&self) -> usize {
        (self.first_epoch + self.epochs).saturating_sub(1)
    }
}

/// What to train with at one iteration: see [`Schedule::step_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Step {
    /// Index into [`Schedule::stages`] (in `rpss`, the size drawn).
    pub stage: usize,
    /// The patch.
    pub patch: Patch,
    /// Crops in the batch.
    pub batch: usize,
    /// Crops per drawn case.
    pub crops_per_case: usize,
}

/// The geometry of the growth, checked.
struct Geometry {
    final_patch: Patch,
    step: [usize; 3],
    /// The published minimum `[2^(p0+1), 2^p1, 2^p2]`.
    published_min: [usize; 3],
    /// The minimum used: the published one clamped to the final patch.
    min: Patch,
}

fn geometry(final_patch: [usize; 3], pools: [u32; 3]) -> Result<Geometry, CurriculumError> {
    for (axis, &p) in AXIS_NAMES.iter().zip(&pools) {
        if p > MAX_POOLS {
            return Err(CurriculumError::PoolsTooLarge {
                axis,
                pools: p,
                max: MAX_POOLS,
            });
        }
    }
    let final_patch =
        Patch::new(final_patch).map_err(|e| CurriculumError::grid("final_patch", e))?;
    let step = pools.map(|p| 1usize << p);
    for (a, axis) in AXIS_NAMES.iter().enumerate() {
        let size = final_patch.axes()[a];
        if size < step[a] {
            return Err(CurriculumError::PatchBelowMinimum {
                axis,
                size,
                pools: pools[a],
                min: step[a],
            });
        }
    }
    let published_min = pgps_minimum(pools)?;
    let f = final_patch.axes();
    // Every clamped edge lies in [2^p, final], so it is a valid edge.
    let min = Patch::new(std::array::from_fn(|a| published_min[a].min(f[a])))
        .map_err(|e| CurriculumError::grid("final_patch", e))?;
    Ok(Geometry {
        final_patch,
        step,
        published_min,
        min,
    })
}

/// The smallest PGPS patch of the published trainers, `[2^(p0+1), 2^p1, 2^p2]` ("1×2×1 in the
/// bottleneck"): the first axis starts at twice its step. A [`Schedule`] clamps it to the final
/// patch (see [`Schedule::clamp_note`]).
///
/// # Errors
/// [`CurriculumError::PoolsTooLarge`] when a pooling count exceeds [`MAX_POOLS`].
pub fn pgps_minimum(pools: [u32; 3]) -> Result<[usize; 3], CurriculumError> {
    for (axis, &p) in AXIS_NAMES.iter().zip(&pools) {
        if p > MAX_POOLS {
            return Err(CurriculumError::PoolsTooLarge {
                axis,
                pools: p,
                max: MAX_POOLS,
            });
        }
    }
    Ok([
        1usize << (pools[0] + 1),
        1usize << pools[1],
        1usize << pools[2],
    ])
}

/// The distinct sizes of the growth, smallest first, ending with the final patch.
fn grow(g: &Geometry) -> Vec<Patch> {
    let target = g.final_patch.axes();
    let mut current = g.min.axes();
    let mut sizes = vec![g.min];
    // The published counter: it starts at 1 and is never reset.
    let mut counter = 1usize;
    while current != target {
        loop {
            let a = counter % 3;
            counter += 1;
            let grown = (current[a] + g.step[a]).min(target[a]);
            if grown != current[a] {
                current[a] = grown;
                break;
            }
        }
        // Every edge lies between the clamped minimum and the final edge.
        sizes.push(Patch::new(current).unwrap_or(g.final_patch));
    }
    sizes
}

/// `S = Σ_a ceil((final_a − min_a) / step_a) + 1`, with the minimum clamped to the final patch.
fn stage_count(g: &Geometry) -> usize {
    let f = g.final_patch.axes();
    let m = g.min.axes();
    (0..3)
        .map(|a| (f[a] - m[a]).div_ceil(g.step[a]))
        .sum::<usize>()
        + 1
}

/// Number of PGPS sizes (and stages) for a plan: `Σ_a ceil((final_a − min_a) / step_a) + 1` with
/// `min` = [`pgps_minimum`] clamped to `final_patch`.
///
/// # Errors
/// The geometry errors of [`Schedule::build`].
pub fn pgps_stage_count(
    final_patch: impl Into<[usize; 3]>,
    pools: [u32; 3],
) -> Result<usize, CurriculumError> {
    Ok(stage_count(&geometry(final_patch.into(), pools)?))
}

/// The PGPS patch sizes of a plan, smallest first, ending with `final_patch`, as plain arrays
/// (the sizes a PGPS run trains with; [`Schedule::sizes`] gives them as [`Patch`]es).
///
/// # Errors
/// The geometry errors of [`Schedule::build`].
pub fn pgps_patch_sizes(
    final_patch: impl Into<[usize; 3]>,
    pools: [u32; 3],
) -> Result<Vec<[usize; 3]>, CurriculumError> {
    Ok(grow(&geometry(final_patch.into(), pools)?)
        .into_iter()
        .map(Patch::axes)
        .collect())
}

/// The PGPS+ batch of every size (`plan_batch_size`), computed as the published code does it in
/// floating point: from the final size backwards, `b_i = int(v_{i+1} / v_i × b_{i+1})` on the
/// unfloored chain, then each floored at `planned`. The chain starts from `planned` (the
/// published code: 2; see [`Mode::PgpsPlus`]).
fn plus_batches(sizes: &[Patch], planned: usize) -> Result<Vec<usize>, CurriculumError> {
    let mut chain = vec![planned];
    for i in (0..sizes.len().saturating_sub(1)).rev() {
        // Voxel counts are below 2^37: exact in f64, as numpy's int64 products are.
        let ratio = sizes[i + 1].voxels() as f64 / sizes[i].voxels() as f64;
        let b = (ratio * *chain.last().unwrap_or(&planned) as f64).trunc();
        if b >= usize::MAX as f64 {
            return Err(CurriculumError::BatchOverflow {
                mode: Mode::PgpsPlus.name(),
                stage: i,
                patch: sizes[i].axes(),
                batch: b as u128,
            });
        }
        chain.push(b as usize);
    }
    chain.reverse();
    Ok(chain.into_iter().map(|b| b.max(planned)).collect())
}

/// The performance-mode batch of every size: `floor(planned × v(final) / v)` in exact integers.
fn performance_batches(
    sizes: &[Patch],
    final_patch: Patch,
    planned: usize,
) -> Result<Vec<usize>, CurriculumError> {
    let vf = u128::from(final_patch.voxels());
    sizes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            // Every edge is >= 1, so v >= 1.
            let b = planned as u128 * vf / u128::from(p.voxels());
            usize::try_from(b).map_err(|_| CurriculumError::BatchOverflow {
                mode: Mode::PgpsPerformance.name(),
                stage: i,
                patch: p.axes(),
                batch: b,
            })
        })
        .collect()
}

/// A complete patch-size curriculum for one training run.
///
/// Reference: compai-lab/2024-miccai-fischer, `training/nnUNetTrainer/variants/sampling/`
/// (`nnUNetTrainer_PGPS.py`, `nnUNetTrainer_PGPS+.py`, `nnUNetTrainer_RPSS.py`). What they do,
/// with `p` the network's poolings per axis and `step_a = 2^p_a`:
///
/// * the smallest patch is `[2^(p0+1), 2^p1, 2^p2]`;
/// * the patch grows one step at a time, cycling the axes 1, 2, 0, 1, 2, 0, … (a counter that
///   starts at 1, axis = counter mod 3); a step adds `step_a` and clamps to the final size; a
///   step that changes nothing is skipped and the cycle moves on;
/// * `S = Σ_a ceil((final_a − min_a) / step_a) + 1` sizes; the size changes at every epoch
///   `e > 0` with `e mod int(E / S) == 0`; changes past the final size do nothing, so the last
///   stage takes the remainder;
/// * PGPS keeps the planned batch; PGPS+ (`plan_batch_size`) computes the batch of each size
///   backwards from the final one; RPSS draws one of the `S` sizes per iteration.
///
/// Where this crate departs from that code, it is on purpose and said at the item concerned:
/// a minimum above the final size is clamped ([`Schedule::clamp_note`]), PGPS+ starts its batch
/// chain from the planned batch instead of a literal 2 ([`Mode::PgpsPlus`]), fewer epochs than
/// stages is an error instead of a division by zero, and the last stage keeps its batch where
/// the published PGPS+ loop would index past its batch list.
///
/// Built by [`Schedule::build`]; deserialisation rebuilds it from its parameters and rejects
/// stages that differ, so a `Schedule` always holds at least one stage. Serialises as
/// [`Schedule::to_json`].
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    mode: Mode,
    final_patch: Patch,
    pools: [u32; 3],
    planned_batch: usize,
    epochs: usize,
    published_min: [usize; 3],
    min_patch: Patch,
    sizes: Vec<Patch>,
    stages: Vec<Stage>,
}

impl Schedule {
    /// Builds the schedule of one run from the planned (nnU-Net) patch, the network's poolings
    /// per axis, the number of epochs, the planned batch and the mode.
    ///
    /// * `pgps`, `pgps-plus`, `pgps-performance`: one stage per PGPS size ([`Schedule::sizes`]),
    ///   each `int(epochs / S)` epochs long, the last taking the remainder; batches as the
    ///   [`Mode`] says.
    /// * `rpss`: every size is a stage spanning the whole run with the planned batch;
    ///   [`Schedule::step_at`] draws one per iteration.
    /// * `constant`: one stage, the final patch and the planned batch for all epochs.
    ///
    /// # Errors
    /// * a pooling count above [`MAX_POOLS`]; a zero edge or an edge above
    ///   [`patchflow_grid::MAX_PATCH_AXIS`] in `final_patch`; a final edge below `2^pools`;
    /// * `epochs == 0` or `planned_batch == 0`;
    /// * in the growing modes, fewer epochs than stages ([`CurriculumError::TooFewEpochs`]):
    ///   the published loop divides by `int(epochs / S) = 0` at epoch 1 (a one-epoch run never
    ///   gets there and trains the minimum patch only, which is no curriculum either);
    /// * a batch beyond `usize`.
    pub fn build(
        final_patch: impl Into<[usize; 3]>,
        pools: [u32; 3],
        epochs: usize,
        planned_batch: usize,
        mode: Mode,
    ) -> Result<Schedule, CurriculumError> {
        let g = geometry(final_patch.into(), pools)?;
        if epochs == 0 {
            return Err(CurriculumError::ZeroEpochs);
        }
        if planned_batch == 0 {
            return Err(CurriculumError::ZeroBatch);
        }
        let grown = grow(&g);
        let whole_run = |patch: Patch| Stage {
            patch,
            batch: planned_batch,
            first_epoch: 0,
            epochs,
            crops_per_case: 1,
        };
        let (sizes, stages) = match mode {
            Mode::Constant => (vec![g.final_patch], vec![whole_run(g.final_patch)]),
            Mode::Rpss => {
                let stages = grown.iter().map(|&p| whole_run(p)).collect();
                (grown, stages)
            }
            Mode::Pgps | Mode::PgpsPlus | Mode::PgpsPerformance => {
                let n = grown.len();
                if epochs < n {
                    return Err(CurriculumError::TooFewEpochs {
                        epochs,
                        stages: n,
                        mode: mode.name(),
                    });
                }
                let batches = match mode {
                    Mode::PgpsPlus => plus_batches(&grown, planned_batch)?,
                    Mode::PgpsPerformance => {
                        performance_batches(&grown, g.final_patch, planned_batch)?
                    }
                    _ => vec![planned_batch; n],
                };
                let per_stage = epochs / n;
                let stages = grown
                    .iter()
                    .zip(&batches)
                    .enumerate()
                    .map(|(i, (&patch, &batch))| Stage {
                        patch,
                        batch,
                        first_epoch: i * per_stage,
                        epochs: if i + 1 == n {
                            epochs - i * per_stage
                        } else {
                            per_stage
                        },
                        crops_per_case: if mode == Mode::PgpsPerformance {
                            batch.div_ceil(planned_batch)
                        } else {
                            1
                        },
                    })
                    .collect();
                (grown, stages)
            }
        };
        Ok(Schedule {
            mode,
            final_patch: g.final_patch,
            pools,
            planned_batch,
            epochs,
            published_min: g.published_min,
            min_patch: g.min,
            sizes,
            stages,
        })
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The planned (nnU-Net) patch: the last stage's, validation's and inference's.
    pub fn final_patch(&self) -> Patch {
        self.final_patch
    }

    /// Stride-2 poolings per axis of the network (`step_a = 2^pools_a`).
    pub fn pools(&self) -> [u32; 3] {
        self.pools
    }

    /// The planned (nnU-Net) batch.
    pub fn planned_batch(&self) -> usize {
        self.planned_batch
    }

    /// Epochs of the run.
    pub fn epochs(&self) -> usize {
        self.epochs
    }

    /// The smallest PGPS patch used: [`pgps_minimum`] clamped to the final patch.
    pub fn min_patch(&self) -> Patch {
        self.min_patch
    }

    /// The distinct patch sizes the run trains with, in order: the `S` PGPS sizes (also in
    /// `rpss`), or the final patch alone for `constant`.
    pub fn sizes(&self) -> &[Patch] {
        &self.sizes
    }

    /// The stages, in order. Never empty.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// When the published minimum lies above the final patch on an axis (only the first axis
    /// can: it starts at `2^(p0+1)`), the schedule starts that axis at its final size, and this
    /// says so. The published trainers would train the first stage with a patch larger than the
    /// final one there, and count a negative number of steps for that axis.
    pub fn clamp_note(&self) -> Option<String> {
        let f = self.final_patch.axes();
        let clamped: Vec<String> = (0..3)
            .filter(|&a| self.published_min[a] > f[a])
            .map(|a| {
                format!(
                    "{} = 2^{} = {} is above the final {}",
                    AXIS_NAMES[a],
                    self.pools[a] + u32::from(a == 0),
                    self.published_min[a],
                    f[a]
                )
            })
            .collect();
        (!clamped.is_empty()).then(|| {
            format!(
                "minimum clamped to the final patch: {}; the schedule starts at {}",
                clamped.join(", "),
                self.min_patch
            )
        })
    }

    /// Index of the stage in force at `epoch` (0-based).
    ///
    /// Epochs past the end of the run stay in the last stage. In `rpss` no single stage is in
    /// force; this returns the last (full-size) one, the patch validation uses, and the sizes
    /// trained with come from [`Schedule::step_at`].
    pub fn stage_index(&self, epoch: usize) -> usize {
        let last = self.stages.len() - 1;
        if self.mode == Mode::Rpss {
            return last;
        }
        self.stages
            .partition_point(|s| s.first_epoch <= epoch)
            .saturating_sub(1)
            .min(last)
    }

    /// The stage in force at `epoch`; see [`Schedule::stage_index`].
    pub fn stage_for(&self, epoch: usize) -> &Stage {
        &self.stages[self.stage_index(epoch)]
    }

    /// What to train with at `epoch`, global iteration `iteration` (0-based over the run:
    /// `epoch × iterations_per_epoch + i`), under `seed`.
    ///
    /// `rpss` draws the size from `(seed, iteration)` alone with
    /// [`patchflow_grid::rng::uniform_index`] over the `S` sizes (normative, so every client
    /// reproduces it) and ignores `epoch`; the other modes use [`Schedule::stage_for`] and
    /// ignore the other two.
    pub fn step_at(&self, epoch: usize, iteration: u64, seed: u64) -> Step {
        let stage = if self.mode == Mode::Rpss {
            patchflow_grid::rng::uniform_index(seed, iteration, self.stages.len())
        } else {
            self.stage_index(epoch)
        };
        let s = &self.stages[stage];
        Step {
            stage,
            patch: s.patch,
            batch: s.batch,
            crops_per_case: s.crops_per_case,
        }
    }

    /// Work of each stage in voxels processed: `epochs × batch × voxels` (per iteration, without
    /// the epochs, in `rpss`, where each size is equally likely).
    fn stage_work(&self) -> Vec<f64> {
        self.stages
            .iter()
            .map(|s| {
                let per_iteration = s.batch as f64 * s.patch.voxels() as f64;
                if self.mode == Mode::Rpss {
                    per_iteration
                } else {
                    s.epochs as f64 * per_iteration
                }
            })
            .collect()
    }

    /// Voxels processed by the run relative to the constant baseline (final patch, planned
    /// batch, same epochs): `Σ epochs × batch × voxels(patch) / (epochs × planned_batch ×
    /// voxels(final))`; for `rpss` the expectation over the uniform draw.
    ///
    /// Training time follows this figure when the GPU's compute is the bottleneck.
    pub fn relative_cost(&self) -> f64 {
        let per_iteration = self.planned_batch as f64 * self.final_patch.voxels() as f64;
        let work: f64 = self.stage_work().iter().sum();
        match self.mode {
            Mode::Rpss => work / self.stages.len() as f64 / per_iteration,
            _ => work / (self.epochs as f64 * per_iteration),
        }
    }

    /// The schedule as JSON (what `patchflow schedule --json` prints and what deserialises back):
    ///
    /// ```text
    /// {"mode", "final_patch": [z, y, x], "pools", "planned_batch", "epochs",
    ///  "min_patch": [z, y, x], "clamp_note": null | "...", "foreground_oversample",
    ///  "sizes": [[z, y, x], ...],
    ///  "stages": [{"patch": [z, y, x], "batch", "first_epoch", "epochs", "crops_per_case"}, ...],
    ///  "relative_cost"}
    /// ```
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode.name(),
            "final_patch": self.final_patch.axes(),
            "pools": self.pools,
            "planned_batch": self.planned_batch,
            "epochs": self.epochs,
            "min_patch": self.min_patch.axes(),
            "clamp_note": self.clamp_note(),
            "foreground_oversample": self.mode.foreground_oversample(),
            "sizes": self.sizes.iter().map(|p| p.axes()).collect::<Vec<_>>(),
            "stages": self.stages,
            "relative_cost": self.relative_cost(),
        })
    }

    /// A human-readable table of the stages and the relative cost.
    ///
    /// Columns: stage index, patch `z×y×x`, batch, crops per case, epochs `first..last`
    /// (inclusive; in `rpss` the draw probability instead), voxels per batch, and the stage's
    /// share of the run's work. A clamped minimum is noted under the title.
    pub fn render_table(&self) -> String {
        let work = self.stage_work();
        let total: f64 = work.iter().sum();
        let n = self.stages.len();
        let header = [
            "stage",
            "patch z×y×x",
            "batch",
            "crops/case",
            "epochs",
            "voxels/batch",
            "work share",
        ];
        let mut rows: Vec<[String; 7]> = Vec::with_capacity(n + 1);
        rows.push(header.map(str::to_string));
        for (i, (s, w)) in self.stages.iter().zip(&work).enumerate() {
            let epochs = if self.mode == Mode::Rpss {
                format!("p = 1/{n}")
            } else {
                format!("{}..{}", s.first_epoch, s.last_epoch())
            };
            let share = if total > 0.0 { 100.0 * w / total } else { 0.0 };
            rows.push([
                i.to_string(),
                s.patch.to_string(),
                s.batch.to_string(),
                s.crops_per_case.to_string(),
                epochs,
                s.batch_voxels().to_string(),
                format!("{share:.1}%"),
            ]);
        }
        let mut widths = [0usize; 7];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        // Text columns (patch, epochs) are left-aligned, numbers right-aligned.
        let left = [false, true, false, false, true, false, false];
        let mut out = format!(
            "mode {} | final patch {} | pools {},{},{} | {} epochs | planned batch {} | \
             foreground oversampling {}\n",
            self.mode,
            self.final_patch,
            self.pools[0],
            self.pools[1],
            self.pools[2],
            self.epochs,
            self.planned_batch,
            self.mode.foreground_oversample(),
        );
        if let Some(note) = self.clamp_note() {
            out.push_str(&format!("note: {note}\n"));
        }
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .zip(left)
                .map(|((cell, w), l)| {
                    let pad = " ".repeat(w.saturating_sub(cell.chars().count()));
                    if l {
                        format!("{cell}{pad}")
                    } else {
                        format!("{pad}{cell}")
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        let cost = self.relative_cost();
        out.push_str(&format!(
            "relative cost {:.4} ({:.1}% of the voxels of constant {} × batch {} for {} epochs)\n",
            cost,
            100.0 * cost,
            self.final_patch,
            self.planned_batch,
            self.epochs,
        ));
        out
    }
}

impl Serialize for Schedule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// The serialised form of a [`Schedule`]: its parameters and, optionally, stages to check.
#[derive(Deserialize)]
struct ScheduleSpec {
    mode: Mode,
    final_patch: [usize; 3],
    pools: [u32; 3],
    planned_batch: usize,
    epochs: usize,
    #[serde(default)]
    stages: Option<Vec<Stage>>,
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spec = ScheduleSpec::deserialize(d)?;
        Schedule::try_from(spec).map_err(serde::de::Error::custom)
    }
}

impl TryFrom<ScheduleSpec> for Schedule {
    type Error = CurriculumError;

    fn try_from(spec: ScheduleSpec) -> Result<Self, Self::Error> {
        let built = Schedule::build(
            spec.final_patch,
            spec.pools,
            spec.epochs,
            spec.planned_batch,
            spec.mode,
        )?;
        let Some(stages) = spec.stages else {
            return Ok(built);
        };
        let detail = if stages.len() != built.stages.len() {
            Some(format!(
                "{} stages given, {} expected",
                stages.len(),
                built.stages.len()
            ))
        } else {
            stages
                .iter()
                .zip(&built.stages)
                .enumerate()
                .find(|(_, (given, expected))| given != expected)
                .map(|(i, (given, expected))| {
                    format!("stage {i} is {given:?}, expected {expected:?}")
                })
        };
        match detail {
            None => Ok(built),
            Some(detail) => Err(CurriculumError::StagesMismatch {
                mode: spec.mode.name(),
                final_patch: spec.final_patch,
                pools: spec.pools,
                epochs: spec.epochs,
                planned_batch: spec.planned_batch,
                detail,
            }),
        }
    }
}

/// Parses pooling counts (`5,5,5`, `3x5x5`, or `5` for all axes, as
/// [`patchflow_grid::parse_triplet`]) and checks each against [`MAX_POOLS`].
///
/// # Errors
/// [`CurriculumError::Grid`] (field `pools`) for a malformed text,
/// [`CurriculumError::PoolsTooLarge`] for a count above [`MAX_POOLS`].
pub fn parse_pools(s: &str) -> Result<[u32; 3], CurriculumError> {
    let pools: [u32; 3] = parse_triplet(s).map_err(|e| CurriculumError::grid("pools", e))?;
    for (axis, &p) in AXIS_NAMES.iter().zip(&pools) {
        if p > MAX_POOLS {
            return Err(CurriculumError::PoolsTooLarge {
                axis,
                pools: p,
                max: MAX_POOLS,
            });
        }
    }
    Ok(pools)
}

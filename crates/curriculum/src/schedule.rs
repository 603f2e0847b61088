//! The PGPS schedule, its performance variant, and the constant and random baselines.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{AXIS_NAMES, CurriculumError};

/// Largest accepted number of stride-2 poolings per axis (minimal patch edge 4096).
pub const MAX_POOLS: u32 = 12;

/// Largest accepted patch edge, in voxels. Keeps every voxel count far inside `u64`.
pub const MAX_PATCH_AXIS: usize = 1 << 16;

/// How the patch size (and batch size) evolve over a training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// PGPS, resource-efficient: the patch grows stage by stage, the batch stays at the planned
    /// value (paper: 44% of the constant-patch training time, same Dice).
    PgpsEfficiency,
    /// PGPS, performance: the patch grows stage by stage and the batch grows so that the voxels
    /// per batch stay (at most) those of the planned batch at the final patch.
    PgpsPerformance,
    /// The nnU-Net baseline: the final patch and the planned batch for the whole run.
    Constant,
    /// Random patch-size sampling: every iteration draws one of the PGPS patch sizes uniformly at
    /// random, with the planned batch (the authors' RPSS ablation).
    Rpss,
}

impl Mode {
    /// Every mode, in a stable order.
    pub const ALL: [Mode; 4] = [
        Mode::PgpsEfficiency,
        Mode::PgpsPerformance,
        Mode::Constant,
        Mode::Rpss,
    ];

    /// The mode's name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::PgpsEfficiency => "pgps-efficiency",
            Mode::PgpsPerformance => "pgps-performance",
            Mode::Constant => "constant",
            Mode::Rpss => "rpss",
        }
    }

    /// Whether the patch grows with the epoch (the two PGPS modes).
    pub fn is_progressive(self) -> bool {
        matches!(self, Mode::PgpsEfficiency | Mode::PgpsPerformance)
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
    /// Patch edge lengths `[z, y, x]` in voxels.
    pub patch: [usize; 3],
    /// Crops per training batch.
    pub batch: usize,
    /// First epoch (0-based) of the stage.
    pub first_epoch: usize,
    /// Number of epochs the stage lasts. In `rpss` mode every stage is a candidate for the whole
    /// run, so `first_epoch` is 0 and `epochs` is the run's length for all of them.
    pub epochs: usize,
    /// Crops taken from each loaded case when `planned_batch` cases are loaded per batch:
    /// `ceil(batch / planned_batch)` (the journal extension's loader). 1 unless in performance
    /// mode.
    pub crops_per_case: usize,
}

impl Stage {
    /// Voxels in one patch.
    pub fn patch_voxels(&self) -> u64 {
        voxels(self.patch)
    }

    /// Voxels in one batch (`batch × patch voxels`), saturating at `u128::MAX`.
    pub fn batch_voxels(&self) -> u128 {
        u128::from(self.patch_voxels()).saturating_mul(self.batch as u128)
    }

    /// Last epoch (inclusive) of the stage.
    pub fn last_epoch(&self) -> usize {
        (self.first_epoch + self.epochs).saturating_sub(1)
    }
}

/// A complete patch-size curriculum for one training run.
///
/// Built by [`Schedule::build`]; deserialisation rebuilds the schedule from its parameters and
/// rejects stages that differ, so a `Schedule` always holds at least one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ScheduleSpec")]
pub struct Schedule {
    /// How patch and batch evolve.
    pub mode: Mode,
    /// The planned (nnU-Net) patch `[z, y, x]`, used by the last stage, validation and inference.
    pub final_patch: [usize; 3],
    /// Stride-2 poolings per axis of the network; the minimal patch edge and the growth step of
    /// an axis are both `2^pools`.
    pub pools: [u32; 3],
    /// The planned (nnU-Net) batch size.
    pub planned_batch: usize,
    /// Total number of epochs of the run.
    pub epochs: usize,
    /// The stages, in order. Never empty.
    pub stages: Vec<Stage>,
}

/// The serialised form of a [`Schedule`], validated on the way in.
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
        if let Some(stages) = spec.stages {
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
            if let Some(detail) = detail {
                return Err(CurriculumError::StagesMismatch {
                    mode: spec.mode.name(),
                    final_patch: spec.final_patch,
                    pools: spec.pools,
                    epochs: spec.epochs,
                    planned_batch: spec.planned_batch,
                    detail,
                });
            }
        }
        Ok(built)
    }
}

/// Voxels in a patch. Edges are at most [`MAX_PATCH_AXIS`] once validated, so the product fits.
fn voxels(patch: [usize; 3]) -> u64 {
    patch
        .iter()
        .fold(1u64, |acc, &e| acc.saturating_mul(e as u64))
}

/// The smallest patch the network can process: `2^pools` per axis (a 1-voxel bottleneck). It is
/// also the PGPS growth step of each axis.
///
/// # Errors
/// [`CurriculumError::PoolsTooLarge`] when a pooling count exceeds [`MAX_POOLS`].
pub fn min_patch(pools: [u32; 3]) -> Result<[usize; 3], CurriculumError> {
    let mut out = [0usize; 3];
    for (axis, (&p, o)) in pools.iter().zip(out.iter_mut()).enumerate() {
        if p > MAX_POOLS {
            return Err(CurriculumError::PoolsTooLarge {
                axis: AXIS_NAMES[axis],
                pools: p,
                max: MAX_POOLS,
            });
        }
        *o = 1usize << p;
    }
    Ok(out)
}

/// Checks a final patch against the pooling counts and returns the minimal patch (= step).
fn validate_geometry(
    final_patch: [usize; 3],
    pools: [u32; 3],
) -> Result<[usize; 3], CurriculumError> {
    let min = min_patch(pools)?;
    for axis in 0..3 {
        let size = final_patch[axis];
        if size == 0 {
            return Err(CurriculumError::ZeroPatchAxis {
                field: "final_patch",
                axis: AXIS_NAMES[axis],
            });
        }
        if size > MAX_PATCH_AXIS {
            return Err(CurriculumError::PatchTooLarge {
                field: "final_patch",
                axis: AXIS_NAMES[axis],
                size,
                max: MAX_PATCH_AXIS,
            });
        }
        if size < min[axis] {
            return Err(CurriculumError::PatchBelowMinimum {
                axis: AXIS_NAMES[axis],
                size,
                pools: pools[axis],
                min: min[axis],
            });
        }
    }
    Ok(min)
}

/// Number of PGPS stages: `Σ_axes ceil((final − min) / step) + 1`, with `min = step = 2^pools`.
///
/// # Errors
/// The geometry errors of [`Schedule::build`].
pub fn pgps_stage_count(
    final_patch: [usize; 3],
    pools: [u32; 3],
) -> Result<usize, CurriculumError> {
    let step = validate_geometry(final_patch, pools)?;
    Ok((0..3)
        .map(|a| (final_patch[a] - step[a]).div_ceil(step[a]))
        .sum::<usize>()
        + 1)
}

/// The PGPS patch sizes, smallest first, ending with `final_patch`.
///
/// Growth, as in the authors' journal code (`plan_batch_size`): start at `2^pools` per axis; at
/// each step, among the axes not yet at their final size, grow the one whose *grown* size
/// (`current + step`) is numerically smallest, by its step `2^pools`; ties go to the lowest axis
/// index (`z` before `y` before `x`, as `np.argmin` does). An axis stops at its final size.
///
/// Two points where the reference is silent or fragile are made explicit here:
/// * A final edge that is not a multiple of the step (nnU-Net never plans one) is reached by a
///   last, shorter step clamped to the final edge, so the stage count stays
///   `Σ ceil((final − min) / step) + 1` and the last stage is exactly the final patch. Every
///   intermediate edge is a multiple of its step.
/// * An axis whose minimal edge already equals its final edge never grows (the reference would
///   grow it once past its final size).
///
/// For isotropic pooling the rule equals "grow the currently smallest axis"; for anisotropic
/// pooling it prefers the axis whose next size is smallest, which keeps the patch closer to the
/// final aspect ratio.
///
/// # Errors
/// The geometry errors of [`Schedule::build`].
pub fn pgps_patch_sizes(
    final_patch: [usize; 3],
    pools: [u32; 3],
) -> Result<Vec<[usize; 3]>, CurriculumError> {
    let step = validate_geometry(final_patch, pools)?;
    let mut current = step;
    let mut sizes = vec![current];
    loop {
        let mut pick: Option<(usize, usize)> = None;
        for axis in 0..3 {
            if current[axis] >= final_patch[axis] {
                continue;
            }
            let grown = current[axis] + step[axis];
            if pick.is_none_or(|(_, best)| grown < best) {
                pick = Some((axis, grown));
            }
        }
        let Some((axis, grown)) = pick else { break };
        current[axis] = grown.min(final_patch[axis]);
        sizes.push(current);
    }
    Ok(sizes)
}

impl Schedule {
    /// Builds the schedule for one run.
    ///
    /// * PGPS modes: the stages of [`pgps_patch_sizes`]; each lasts `epochs / stages` epochs
    ///   (integer division, as the reference's `int(num_epochs / num_stages)`), and the last
    ///   (full-size) stage also takes the remainder. Efficiency keeps `planned_batch`;
    ///   performance uses `planned_batch × voxels(final) / voxels(stage)` rounded down (exact
    ///   integer arithmetic), with `crops_per_case = ceil(batch / planned_batch)`.
    /// * `constant`: one stage, the final patch and planned batch for all epochs.
    /// * `rpss`: the PGPS patch sizes as equally likely candidates, each spanning the whole run
    ///   with the planned batch; [`rpss_stage`] picks one per iteration.
    ///
    /// # Errors
    /// * a pooling count above [`MAX_POOLS`], a zero edge or an edge above [`MAX_PATCH_AXIS`] in
    ///   `final_patch`, or a final edge below its minimum `2^pools`;
    /// * `epochs == 0` or `planned_batch == 0`;
    /// * in the PGPS modes, fewer epochs than stages ([`CurriculumError::TooFewEpochs`]): the
    ///   reference would divide by zero there, and silently dropping stages would change the
    ///   curriculum, so the caller has to choose;
    /// * a performance-mode batch that overflows `usize`.
    pub fn build(
        final_patch: [usize; 3],
        pools: [u32; 3],
        epochs: usize,
        planned_batch: usize,
        mode: Mode,
    ) -> Result<Schedule, CurriculumError> {
        let sizes = pgps_patch_sizes(final_patch, pools)?;
        if epochs == 0 {
            return Err(CurriculumError::ZeroEpochs);
        }
        if planned_batch == 0 {
            return Err(CurriculumError::ZeroBatch);
        }
        let stages = match mode {
            Mode::Constant => vec![Stage {
                patch: final_patch,
                batch: planned_batch,
                first_epoch: 0,
                epochs,
                crops_per_case: 1,
            }],
            Mode::Rpss => sizes
                .iter()
                .map(|&patch| Stage {
                    patch,
                    batch: planned_batch,
                    first_epoch: 0,
                    epochs,
                    crops_per_case: 1,
                })
                .collect(),
            Mode::PgpsEfficiency | Mode::PgpsPerformance => {
                let n = sizes.len();
                if epochs < n {
                    return Err(CurriculumError::TooFewEpochs {
                        epochs,
                        stages: n,
                        mode: mode.name(),
                    });
                }
                let per_stage = epochs / n;
                let final_voxels = u128::from(voxels(final_patch));
                let mut stages = Vec::with_capacity(n);
                for (i, &patch) in sizes.iter().enumerate() {
                    let batch = if mode == Mode::PgpsPerformance {
                        // voxels(patch) >= 1 because every edge is >= 1.
                        let b = planned_batch as u128 * final_voxels / u128::from(voxels(patch));
                        usize::try_from(b).map_err(|_| CurriculumError::BatchOverflow {
                            stage: i,
                            patch,
                            batch: b,
                        })?
                    } else {
                        planned_batch
                    };
                    let first_epoch = i * per_stage;
                    let stage_epochs = if i + 1 == n {
                        epochs - first_epoch
                    } else {
                        per_stage
                    };
                    stages.push(Stage {
                        patch,
                        batch,
                        first_epoch,
                        epochs: stage_epochs,
                        crops_per_case: batch.div_ceil(planned_batch),
                    });
                }
                stages
            }
        };
        Ok(Schedule {
            mode,
            final_patch,
            pools,
            planned_batch,
            epochs,
            stages,
        })
    }

    /// Index of the stage in force at `epoch` (0-based).
    ///
    /// Epochs past the end of the run stay in the last stage, as the reference clamps its stage
    /// counter. In `rpss` mode no single stage is in force; this returns the last (full-size)
    /// candidate, the patch used for validation, and per-iteration sizes come from
    /// [`Schedule::patch_for`].
    pub fn stage_index_at_epoch(&self, epoch: usize) -> usize {
        let last = self.stages.len().saturating_sub(1);
        if self.mode == Mode::Rpss {
            return last;
        }
        self.stages
            .partition_point(|s| s.first_epoch <= epoch)
            .saturating_sub(1)
            .min(last)
    }

    /// The stage in force at `epoch`; see [`Schedule::stage_index_at_epoch`].
    ///
    /// # Panics
    /// Only if `stages` is empty, which [`Schedule::build`] and deserialisation never produce.
    pub fn stage_at_epoch(&self, epoch: usize) -> &Stage {
        &self.stages[self.stage_index_at_epoch(epoch)]
    }

    /// The `(patch, batch)` to train with at `epoch`, iteration `iteration_in_run` (the global,
    /// 0-based iteration count of the run, `epoch × iterations_per_epoch + i`), under `seed`.
    ///
    /// `rpss` draws the stage from `(seed, iteration_in_run)` with [`rpss_stage`] and ignores
    /// `epoch`; the other modes use [`Schedule::stage_at_epoch`] and ignore the other two.
    pub fn patch_for(&self, epoch: usize, iteration_in_run: u64, seed: u64) -> ([usize; 3], usize) {
        let stage = if self.mode == Mode::Rpss {
            self.stages
                .get(rpss_stage(self, seed, iteration_in_run))
                .unwrap_or_else(|| self.stage_at_epoch(epoch))
        } else {
            self.stage_at_epoch(epoch)
        };
        (stage.patch, stage.batch)
    }

    /// Work of each stage, in voxels processed: `epochs × batch × voxels(patch)` (per iteration
    /// and without the epoch factor in `rpss`, where each candidate is equally likely).
    fn stage_work(&self) -> Vec<f64> {
        self.stages
            .iter()
            .map(|s| {
                let per_iteration = s.batch as f64 * s.patch_voxels() as f64;
                if self.mode == Mode::Rpss {
                    per_iteration
                } else {
                    s.epochs as f64 * per_iteration
                }
            })
            .collect()
    }

    /// Expected voxels processed by the run relative to the constant baseline (final patch,
    /// planned batch, same epochs): `Σ epochs × batch × voxels(patch) / (epochs ×
    /// planned_batch × voxels(final))`. For `rpss`, the expectation over the uniform draw:
    /// `mean(batch × voxels(patch)) / (planned_batch × voxels(final))`.
    ///
    /// Training time is roughly proportional to this figure when the GPU is the bottleneck.
    pub fn relative_cost(&self) -> f64 {
        let per_iteration_base = self.planned_batch as f64 * voxels(self.final_patch) as f64;
        let work: f64 = self.stage_work().iter().sum();
        match self.mode {
            Mode::Rpss => work / self.stages.len().max(1) as f64 / per_iteration_base,
            _ => work / (self.epochs as f64 * per_iteration_base),
        }
    }

    /// The schedule as JSON:
    /// `{"mode", "final_patch", "pools", "planned_batch", "epochs", "stages": [{"patch": [z, y,
    /// x], "batch", "first_epoch", "epochs", "crops_per_case"}, ...], "relative_cost"}`.
    pub fn to_json(&self) -> serde_json::Value {
        let stages: Vec<serde_json::Value> = self
            .stages
            .iter()
            .map(|s| {
                serde_json::json!({
                    "patch": s.patch,
                    "batch": s.batch,
                    "first_epoch": s.first_epoch,
                    "epochs": s.epochs,
                    "crops_per_case": s.crops_per_case,
                })
            })
            .collect();
        serde_json::json!({
            "mode": self.mode.name(),
            "final_patch": self.final_patch,
            "pools": self.pools,
            "planned_batch": self.planned_batch,
            "epochs": self.epochs,
            "stages": stages,
            "relative_cost": self.relative_cost(),
        })
    }

    /// A human-readable table of the stages and the relative cost.
    ///
    /// Columns: stage index, patch `z×y×x`, batch, crops per case, epochs `first..last`
    /// (inclusive; in `rpss` the draw probability instead), voxels per batch, and the stage's
    /// share of the run's time, taking time as proportional to voxels processed.
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
            "time share",
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
                fmt_patch(s.patch),
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
            "mode {} | final patch {} | pools {},{},{} | {} epochs | planned batch {}\n",
            self.mode,
            fmt_patch(self.final_patch),
            self.pools[0],
            self.pools[1],
            self.pools[2],
            self.epochs,
            self.planned_batch,
        );
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
            "relative cost {:.4} ({:.1}% of constant {} × batch {} for {} epochs)\n",
            cost,
            100.0 * cost,
            fmt_patch(self.final_patch),
            self.planned_batch,
            self.epochs,
        ));
        out
    }
}

/// `z×y×x` notation of a patch.
fn fmt_patch(p: [usize; 3]) -> String {
    format!("{}×{}×{}", p[0], p[1], p[2])
}

/// The stage a random patch-size sampling run uses at global iteration `iteration`, under
/// `seed`: an index into `schedule.stages`, uniform over all of them and fixed forever by
/// `(seed, iteration)`.
///
/// The draw uses splitmix64 (normative, so other clients can reproduce it): `key` is the first
/// splitmix64 output of the state `seed`; outputs `r` are then drawn from the state
/// `key XOR iteration` until `r >= 2^64 mod n`, and the result is `r mod n`, with `n` the number
/// of stages. It draws over the stages whatever the schedule's mode; it is meant for `rpss`.
pub fn rpss_stage(schedule: &Schedule, seed: u64, iteration: u64) -> usize {
    patchflow_grid::rng::uniform_index(seed, iteration, schedule.stages.len())
}

/// Parses a `z,y,x` triplet such as `128,128,128` (also `128x128x128`), or a single number
/// meaning the same value on all three axes. Whitespace around numbers is ignored.
///
/// # Errors
/// [`CurriculumError::BadTriplet`] for an empty input, a part that is not a non-negative
/// integer, or a count of parts other than 1 or 3.
pub fn parse_triplet(s: &str) -> Result<[usize; 3], CurriculumError> {
    let bad = |reason: String| CurriculumError::BadTriplet {
        input: s.to_string(),
        reason,
    };
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err(bad("the input is empty".to_string()));
    }
    let sep = if trimmed.contains(',') { ',' } else { 'x' };
    let mut values = Vec::with_capacity(3);
    for (i, part) in trimmed.split(sep).enumerate() {
        let part = part.trim();
        let v = part.parse::<usize>().map_err(|e| {
            bad(format!(
                "part {} ({part:?}) is not a non-negative integer: {e}",
                i + 1
            ))
        })?;
        values.push(v);
    }
    match values.as_slice() {
        [v] => Ok([*v; 3]),
        [z, y, x] => Ok([*z, *y, *x]),
        other => Err(bad(format!(
            "expected 1 or 3 numbers (z,y,x), found {}",
            other.len()
        ))),
    }
}

/// Parses pooling counts like [`parse_triplet`] (`5,5,5`, `3,5,5` or `5`) and checks each
/// against [`MAX_POOLS`].
///
/// # Errors
/// [`CurriculumError::BadTriplet`] as [`parse_triplet`], [`CurriculumError::PoolsTooLarge`]
/// for a count above [`MAX_POOLS`].
pub fn parse_pools(s: &str) -> Result<[u32; 3], CurriculumError> {
    let t = parse_triplet(s)?;
    let mut out = [0u32; 3];
    for (axis, (&v, o)) in t.iter().zip(out.iter_mut()).enumerate() {
        *o = u32::try_from(v).ok().filter(|&p| p <= MAX_POOLS).ok_or(
            CurriculumError::PoolsTooLarge {
                axis: AXIS_NAMES[axis],
                pools: u32::try_from(v).unwrap_or(u32::MAX),
                max: MAX_POOLS,
            },
        )?;
    }
    Ok(out)
}

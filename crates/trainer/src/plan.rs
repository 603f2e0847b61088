//! What the trainer asks its batch source for at every batch index: the [`StepPlan`].
//!
//! Batch `k` of a run is the global iteration `k`; its patch, batch size and crops per case
//! follow from the schedule alone (and, in `rpss`, the seed), so the prefetch thread can ask for
//! batches ahead of the training loop and a resumed run asks for exactly the batches an
//! uninterrupted one would.

use patchflow_curriculum::{Schedule, Stage};
use patchflow_grid::Patch;

/// What the trainer asks for at one iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepSpec {
    /// Batch index = global iteration of the run.
    pub index: u64,
    /// Patch.
    pub patch: Patch,
    /// Items in the batch.
    pub batch: usize,
    /// Crops per drawn case.
    pub crops_per_case: usize,
}

/// The step of every batch index of a run (or of a stage-timing pass).
#[derive(Clone, Debug)]
pub struct StepPlan {
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    /// A training run: batch `k` is iteration `k mod iters_per_epoch` of epoch
    /// `k / iters_per_epoch`.
    Run {
        schedule: Schedule,
        iters_per_epoch: u64,
        seed: u64,
    },
    /// Every stage in turn, `per_stage` batches each (the last stage past the end). Never empty.
    EachStage { stages: Vec<Stage>, per_stage: u64 },
    /// One patch and batch for every batch (validation batches), one crop per case.
    Fixed { patch: Patch, batch: usize },
}

impl StepPlan {
    /// The plan of a training run of `schedule` with `iters_per_epoch` iterations per epoch,
    /// batches drawn under `seed`.
    pub fn run(schedule: &Schedule, iters_per_epoch: usize, seed: u64) -> StepPlan {
        StepPlan {
            kind: Kind::Run {
                schedule: schedule.clone(),
                iters_per_epoch: iters_per_epoch.max(1) as u64,
                seed,
            },
        }
    }

    /// `per_stage` batches at every one of `stages` in turn (patch, batch and crops per case;
    /// the epochs are ignored), for timing them; `None` when there is none.
    pub fn each_stage(stages: &[Stage], per_stage: usize) -> Option<StepPlan> {
        (!stages.is_empty()).then(|| StepPlan {
            kind: Kind::EachStage {
                stages: stages.to_vec(),
                per_stage: per_stage.max(1) as u64,
            },
        })
    }

    /// `patch` and `batch` for every batch index, one crop per case: the validation batches
    /// (nnU-Net's validation loader cuts the final patch at the planned batch).
    pub fn fixed(patch: Patch, batch: usize) -> StepPlan {
        StepPlan {
            kind: Kind::Fixed {
                patch,
                batch: batch.max(1),
            },
        }
    }

    /// The step of batch `k`.
    pub fn step(&self, k: u64) -> StepSpec {
        match &self.kind {
            Kind::Run {
                schedule,
                iters_per_epoch,
                seed,
            } => {
                let epoch = usize::try_from(k / iters_per_epoch).unwrap_or(usize::MAX);
                let step = schedule.step_at(epoch, k, *seed);
                StepSpec {
                    index: k,
                    patch: step.patch,
                    batch: step.batch,
                    crops_per_case: step.crops_per_case,
                }
            }
            Kind::EachStage { stages, per_stage } => {
                let s = usize::try_from(k / per_stage).unwrap_or(usize::MAX);
                // Never empty: built from a schedule, which always has a stage.
                let st = stages[s.min(stages.len() - 1)];
                StepSpec {
                    index: k,
                    patch: st.patch,
                    batch: st.batch,
                    crops_per_case: st.crops_per_case,
                }
            }
            Kind::Fixed { patch, batch } => StepSpec {
                index: k,
                patch: *patch,
                batch: *batch,
                crops_per_case: 1,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_curriculum::Mode;

    fn p(axes: [usize; 3]) -> Patch {
        Patch::new(axes).unwrap()
    }

    #[test]
    fn step_plan_follows_the_schedule() {
        let s = Schedule::build([16, 32, 32], [2, 3, 3], 10, 2, Mode::PgpsPerformance).unwrap();
        let plan = StepPlan::run(&s, 5, 1);
        let plan = |k| plan.step(k);
        // Epoch 0, stage 0: 8×8×8 (the published minimum [2^3, 2^3, 2^3]) with batch
        // 2 · (16·32·32) / (8·8·8) = 64, 32 crops per case.
        let first = plan(0);
        assert_eq!(first.patch, p([8, 8, 8]));
        assert_eq!(first.batch, 64);
        assert_eq!(first.crops_per_case, 32);
        assert_eq!(plan(4).patch, p([8, 8, 8]));
        // Iteration 5 is epoch 1, the next stage (y grows first).
        assert_eq!(plan(5).patch, p([8, 16, 8]));
        assert_eq!(plan(49).patch, p([16, 32, 32]));
        assert_eq!(plan(49).batch, 2);
        assert_eq!(plan(49).index, 49);
    }

    #[test]
    fn rpss_draws_a_patch_per_iteration() {
        let s = Schedule::build([16, 32, 32], [2, 3, 3], 10, 2, Mode::Rpss).unwrap();
        let plan = StepPlan::run(&s, 50, 9);
        let mut patches: Vec<Patch> = (0..50).map(|k| plan.step(k).patch).collect();
        assert!(patches.iter().all(|p| s.sizes().contains(p)));
        assert!((0..50).all(|k| plan.step(k).batch == 2 && plan.step(k).crops_per_case == 1));
        patches.sort();
        patches.dedup();
        assert!(patches.len() > 3, "{patches:?}");
        // Reproducible from the seed alone.
        let again = StepPlan::run(&s, 50, 9);
        assert!((0..50).all(|k| plan.step(k) == again.step(k)));
    }

    #[test]
    fn each_stage_visits_every_stage_in_turn() {
        let s = Schedule::build([16, 32, 32], [2, 3, 3], 10, 2, Mode::Pgps).unwrap();
        let plan = StepPlan::each_stage(s.stages(), 3).unwrap();
        assert!(StepPlan::each_stage(&[], 3).is_none());
        for (i, st) in s.stages().iter().enumerate() {
            for j in 0..3 {
                let k = (3 * i + j) as u64;
                assert_eq!(plan.step(k).patch, st.patch);
                assert_eq!(plan.step(k).index, k);
            }
        }
        let last = s.stages().last().unwrap();
        assert_eq!(plan.step(1000).patch, last.patch);
    }

    #[test]
    fn fixed_plans_the_same_step_everywhere() {
        let plan = StepPlan::fixed(p([16, 32, 32]), 2);
        for k in [0, 7, 1 << 40] {
            assert_eq!(
                plan.step(k),
                StepSpec {
                    index: k,
                    patch: p([16, 32, 32]),
                    batch: 2,
                    crops_per_case: 1
                }
            );
        }
    }
}

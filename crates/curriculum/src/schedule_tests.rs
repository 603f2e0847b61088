//! Tests of the schedule: hand-derived examples, error cases and property tests.

use proptest::prelude::*;

use crate::*;

/// 128³ with 5 poolings per axis, grown by hand: min = step = 32 on every axis. Each step grows
/// the axis whose grown size is smallest; with equal steps all candidates tie whenever the
/// current sizes tie, and the tie goes to z, then y, then x:
/// 32³ → z → y → x → z → y → x → z → y → x. 3 steps per axis + 1 = 10 stages.
const ISO_SIZES: [[usize; 3]; 10] = [
    [32, 32, 32],
    [64, 32, 32],
    [64, 64, 32],
    [64, 64, 64],
    [96, 64, 64],
    [96, 96, 64],
    [96, 96, 96],
    [128, 96, 96],
    [128, 128, 96],
    [128, 128, 128],
];

/// Patch voxels of [`ISO_SIZES`] in units of 32³ = 32768.
const ISO_UNITS: [usize; 10] = [1, 2, 4, 8, 12, 18, 27, 36, 48, 64];

/// [40, 224, 192] with pools [3, 5, 5]: min = step = [8, 32, 32]. The z candidates 16, 24, 32,
/// 40 are all below the first y/x candidate 64, so z grows to its final 40 first; then y and x
/// alternate (tie → y first) until x stops at 192 and y takes its last step to 224.
/// Stages: ceil(32/8) + ceil(192/32) + ceil(160/32) + 1 = 4 + 6 + 5 + 1 = 16.
const ANISO_SIZES: [[usize; 3]; 16] = [
    [8, 32, 32],
    [16, 32, 32],
    [24, 32, 32],
    [32, 32, 32],
    [40, 32, 32],
    [40, 64, 32],
    [40, 64, 64],
    [40, 96, 64],
    [40, 96, 96],
    [40, 128, 96],
    [40, 128, 128],
    [40, 160, 128],
    [40, 160, 160],
    [40, 192, 160],
    [40, 192, 192],
    [40, 224, 192],
];

fn iso(mode: Mode) -> Schedule {
    Schedule::build([128; 3], [5; 3], 1000, 2, mode).unwrap()
}

fn aniso(mode: Mode) -> Schedule {
    Schedule::build([40, 224, 192], [3, 5, 5], 1000, 2, mode).unwrap()
}

fn patches(s: &Schedule) -> Vec<[usize; 3]> {
    s.stages.iter().map(|st| st.patch).collect()
}

#[test]
fn isotropic_efficiency_schedule() {
    let s = iso(Mode::PgpsEfficiency);
    assert_eq!(patches(&s), ISO_SIZES.to_vec());
    // 1000 / 10 = 100 epochs each, no remainder.
    for (i, st) in s.stages.iter().enumerate() {
        assert_eq!(st.first_epoch, 100 * i, "stage {i}");
        assert_eq!(st.epochs, 100, "stage {i}");
        assert_eq!(st.batch, 2, "stage {i}");
        assert_eq!(st.crops_per_case, 1, "stage {i}");
    }
    assert_eq!(pgps_stage_count([128; 3], [5; 3]).unwrap(), 10);
}

#[test]
fn isotropic_performance_batches() {
    let s = iso(Mode::PgpsPerformance);
    assert_eq!(patches(&s), ISO_SIZES.to_vec());
    // batch = floor(2 × 64 / units): 128/1, 128/2, 128/4, 128/8, 128/12 = 10.67, 128/18 = 7.1,
    // 128/27 = 4.7, 128/36 = 3.6, 128/48 = 2.7, 128/64.
    let batches: Vec<usize> = s.stages.iter().map(|st| st.batch).collect();
    assert_eq!(batches, vec![128, 64, 32, 16, 10, 7, 4, 3, 2, 2]);
    // crops per case = ceil(batch / 2).
    let crops: Vec<usize> = s.stages.iter().map(|st| st.crops_per_case).collect();
    assert_eq!(crops, vec![64, 32, 16, 8, 5, 4, 2, 2, 1, 1]);
    assert!(s.stages.iter().all(|st| st.epochs == 100));
}

#[test]
fn isotropic_relative_costs() {
    // Efficiency: Σ units / (10 stages × 64 units) = 220 / 640.
    assert_eq!(ISO_UNITS.iter().sum::<usize>(), 220);
    assert_eq!(iso(Mode::PgpsEfficiency).relative_cost(), 220.0 / 640.0);
    // Performance: Σ batch × units = 128+128+128+128+120+126+108+108+96+128 = 1198, over
    // 10 × 2 × 64 = 1280.
    assert_eq!(iso(Mode::PgpsPerformance).relative_cost(), 1198.0 / 1280.0);
    assert_eq!(iso(Mode::Constant).relative_cost(), 1.0);
    // RPSS: mean units / 64 = 22 / 64 (equal to efficiency here: all stages last equally long).
    assert_eq!(iso(Mode::Rpss).relative_cost(), 22.0 / 64.0);
}

#[test]
fn anisotropic_efficiency_schedule() {
    let s = aniso(Mode::PgpsEfficiency);
    assert_eq!(patches(&s), ANISO_SIZES.to_vec());
    assert_eq!(pgps_stage_count([40, 224, 192], [3, 5, 5]).unwrap(), 16);
    // int(1000 / 16) = 62 epochs per stage; the last takes 1000 − 15 × 62 = 70.
    for (i, st) in s.stages.iter().enumerate() {
        assert_eq!(st.first_epoch, 62 * i);
        assert_eq!(st.epochs, if i == 15 { 70 } else { 62 });
        assert_eq!(st.batch, 2);
    }
}

#[test]
fn anisotropic_performance_batches() {
    let s = aniso(Mode::PgpsPerformance);
    // 2 × 40·224·192 = 3 440 640 voxels per planned batch, divided by each patch's voxels:
    // 8192 → 420, 16384 → 210, 24576 → 140, 32768 → 105, 40960 → 84, 81920 → 42,
    // 163840 → 21, 245760 → 14, 368640 → 9.33, 491520 → 7, 655360 → 5.25, 819200 → 4.2,
    // 1024000 → 3.36, 1228800 → 2.8, 1474560 → 2.33, 1720320 → 2.
    let batches: Vec<usize> = s.stages.iter().map(|st| st.batch).collect();
    assert_eq!(
        batches,
        vec![420, 210, 140, 105, 84, 42, 21, 14, 9, 7, 5, 4, 3, 2, 2, 2]
    );
    let crops: Vec<usize> = s.stages.iter().map(|st| st.crops_per_case).collect();
    assert_eq!(
        crops,
        vec![210, 105, 70, 53, 42, 21, 11, 7, 5, 4, 3, 2, 2, 1, 1, 1]
    );
}

#[test]
fn constant_and_rpss_stages() {
    let c = iso(Mode::Constant);
    assert_eq!(
        c.stages,
        vec![Stage {
            patch: [128; 3],
            batch: 2,
            first_epoch: 0,
            epochs: 1000,
            crops_per_case: 1
        }]
    );
    assert_eq!(c.stage_at_epoch(0).patch, [128; 3]);
    assert_eq!(c.stage_at_epoch(999).patch, [128; 3]);

    let r = aniso(Mode::Rpss);
    assert_eq!(patches(&r), ANISO_SIZES.to_vec());
    assert!(r.stages.iter().all(|st| st.batch == 2
        && st.first_epoch == 0
        && st.epochs == 1000
        && st.crops_per_case == 1));
    // Validation (and stage_at_epoch) use the full patch.
    assert_eq!(r.stage_at_epoch(0).patch, [40, 224, 192]);
    // Expected cost: mean patch voxels / final voxels.
    let mean: f64 = ANISO_SIZES
        .iter()
        .map(|p| (p[0] * p[1] * p[2]) as f64)
        .sum::<f64>()
        / 16.0;
    let expected = mean / (40.0 * 224.0 * 192.0);
    assert!((r.relative_cost() - expected).abs() < 1e-12);
}

#[test]
fn rpss_draws_every_stage_and_is_reproducible() {
    let r = iso(Mode::Rpss);
    let mut seen = [0usize; 10];
    for it in 0..10_000u64 {
        let k = rpss_stage(&r, 7, it);
        assert_eq!(k, rpss_stage(&r, 7, it));
        seen[k] += 1;
        let (patch, batch) = r.patch_for(0, it, 7);
        assert_eq!(patch, ISO_SIZES[k]);
        assert_eq!(batch, 2);
    }
    // Uniform over 10 stages: 1000 expected each; 4 standard deviations is about ±120.
    assert!(seen.iter().all(|&c| (880..=1120).contains(&c)), "{seen:?}");
    // The draw depends on the seed.
    let a: Vec<usize> = (0..100).map(|it| rpss_stage(&r, 1, it)).collect();
    let b: Vec<usize> = (0..100).map(|it| rpss_stage(&r, 2, it)).collect();
    assert_ne!(a, b);
}

#[test]
fn stage_lookup_by_epoch() {
    let s = aniso(Mode::PgpsEfficiency);
    assert_eq!(s.stage_index_at_epoch(0), 0);
    assert_eq!(s.stage_index_at_epoch(61), 0);
    assert_eq!(s.stage_index_at_epoch(62), 1);
    assert_eq!(s.stage_index_at_epoch(929), 14);
    assert_eq!(s.stage_index_at_epoch(930), 15);
    assert_eq!(s.stage_index_at_epoch(999), 15);
    // Past the end: stays in the last stage.
    assert_eq!(s.stage_index_at_epoch(5000), 15);
    // Epoch 250 lies in stage 4 (epochs 248..309).
    assert_eq!(s.patch_for(250, 123, 9), ([40, 32, 32], 2));
}

#[test]
fn remainder_goes_to_the_last_stage() {
    // 999 / 10 = 99 per stage; the last gets 999 − 9 × 99 = 108.
    let s = Schedule::build([128; 3], [5; 3], 999, 2, Mode::PgpsEfficiency).unwrap();
    assert!(s.stages[..9].iter().all(|st| st.epochs == 99));
    assert_eq!(s.stages[9].first_epoch, 891);
    assert_eq!(s.stages[9].epochs, 108);
    // Exactly as many epochs as stages: one each.
    let s = Schedule::build([128; 3], [5; 3], 10, 2, Mode::PgpsEfficiency).unwrap();
    assert!(s.stages.iter().all(|st| st.epochs == 1));
}

/// A final edge that is not a multiple of its step: [40, 100, 100] with pools [3, 5, 5].
/// z: 8 → 40 in 4 steps (its candidates stay below 64); then y/x alternate 64, 96, and the last
/// step of each is clamped from 128 to 100. ceil(32/8) + ceil(68/32) × 2 + 1 = 4 + 3 + 3 + 1 = 11.
#[test]
fn non_multiple_final_is_reached_by_a_clamped_last_step() {
    let sizes = pgps_patch_sizes([40, 100, 100], [3, 5, 5]).unwrap();
    assert_eq!(
        sizes,
        vec![
            [8, 32, 32],
            [16, 32, 32],
            [24, 32, 32],
            [32, 32, 32],
            [40, 32, 32],
            [40, 64, 32],
            [40, 64, 64],
            [40, 96, 64],
            [40, 96, 96],
            [40, 100, 96],
            [40, 100, 100],
        ]
    );
    assert_eq!(pgps_stage_count([40, 100, 100], [3, 5, 5]).unwrap(), 11);
}

/// An axis that starts at its final size never grows: [8, 64, 64] with pools [3, 5, 5].
#[test]
fn axis_already_final_stays() {
    let sizes = pgps_patch_sizes([8, 64, 64], [3, 5, 5]).unwrap();
    assert_eq!(sizes, vec![[8, 32, 32], [8, 64, 32], [8, 64, 64]]);
    let one = pgps_patch_sizes([32; 3], [5; 3]).unwrap();
    assert_eq!(one, vec![[32; 3]]);
}

#[test]
fn bad_inputs_name_the_field_and_limit() {
    let e = Schedule::build([16, 128, 128], [5; 3], 1000, 2, Mode::PgpsEfficiency).unwrap_err();
    assert_eq!(
        e,
        CurriculumError::PatchBelowMinimum {
            axis: "z",
            size: 16,
            pools: 5,
            min: 32
        }
    );
    assert!(e.to_string().contains("final_patch[z] = 16"), "{e}");

    let e = Schedule::build([128; 3], [5, 13, 5], 1000, 2, Mode::Constant).unwrap_err();
    assert!(matches!(
        e,
        CurriculumError::PoolsTooLarge {
            axis: "y",
            pools: 13,
            max: 12
        }
    ));

    let e = Schedule::build([128, 0, 128], [0; 3], 1000, 2, Mode::Constant).unwrap_err();
    assert!(matches!(
        e,
        CurriculumError::ZeroPatchAxis { axis: "y", .. }
    ));

    let e = Schedule::build([128, 128, 1 << 17], [0; 3], 1000, 2, Mode::Constant).unwrap_err();
    assert!(matches!(
        e,
        CurriculumError::PatchTooLarge { axis: "x", .. }
    ));

    let e = Schedule::build([128; 3], [5; 3], 0, 2, Mode::Constant).unwrap_err();
    assert_eq!(e, CurriculumError::ZeroEpochs);

    let e = Schedule::build([128; 3], [5; 3], 1000, 0, Mode::PgpsPerformance).unwrap_err();
    assert_eq!(e, CurriculumError::ZeroBatch);

    // 9 epochs cannot hold 10 stages in the PGPS modes...
    for mode in [Mode::PgpsEfficiency, Mode::PgpsPerformance] {
        let e = Schedule::build([128; 3], [5; 3], 9, 2, mode).unwrap_err();
        assert_eq!(
            e,
            CurriculumError::TooFewEpochs {
                epochs: 9,
                stages: 10,
                mode: mode.name()
            }
        );
    }
    // ...but the baselines do not split epochs.
    assert!(Schedule::build([128; 3], [5; 3], 9, 2, Mode::Rpss).is_ok());
    assert!(Schedule::build([128; 3], [5; 3], 1, 2, Mode::Constant).is_ok());
}

#[test]
fn mode_names_round_trip() {
    for m in Mode::ALL {
        assert_eq!(m.name().parse::<Mode>().unwrap(), m);
        assert_eq!(m.to_string(), m.name());
        let json = serde_json::to_value(m).unwrap();
        assert_eq!(json, serde_json::Value::String(m.name().to_string()));
        assert_eq!(serde_json::from_value::<Mode>(json).unwrap(), m);
    }
    assert_eq!(
        "PGPS-Performance".parse::<Mode>().unwrap(),
        Mode::PgpsPerformance
    );
    let e = "pgps".parse::<Mode>().unwrap_err();
    assert!(matches!(e, CurriculumError::UnknownMode { .. }));
    assert!(e.to_string().contains("pgps-efficiency"));
}

#[test]
fn triplets_parse() {
    assert_eq!(parse_triplet("128,128,128").unwrap(), [128, 128, 128]);
    assert_eq!(parse_triplet(" 40, 224 ,192 ").unwrap(), [40, 224, 192]);
    assert_eq!(parse_triplet("96").unwrap(), [96, 96, 96]);
    assert_eq!(parse_triplet("40x224x192").unwrap(), [40, 224, 192]);
    for bad in ["", "  ", "1,2", "1,2,3,4", "a,b,c", "-1,2,3", "1,,3", "1.5"] {
        let e = parse_triplet(bad).unwrap_err();
        assert!(matches!(e, CurriculumError::BadTriplet { .. }), "{bad:?}");
    }
    assert_eq!(parse_pools("3,5,5").unwrap(), [3, 5, 5]);
    assert_eq!(parse_pools("5").unwrap(), [5, 5, 5]);
    assert!(matches!(
        parse_pools("5,13,5").unwrap_err(),
        CurriculumError::PoolsTooLarge { axis: "y", .. }
    ));
}

#[test]
fn json_has_the_documented_shape() {
    let s = iso(Mode::PgpsEfficiency);
    let j = s.to_json();
    assert_eq!(j["mode"], "pgps-efficiency");
    assert_eq!(j["relative_cost"], serde_json::json!(0.34375));
    let stages = j["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 10);
    for (i, st) in stages.iter().enumerate() {
        assert_eq!(st["patch"], serde_json::json!(ISO_SIZES[i]));
        assert_eq!(st["batch"], 2);
        assert_eq!(st["first_epoch"], 100 * i);
        assert_eq!(st["epochs"], 100);
    }
}

#[test]
fn serde_round_trip_validates_stages() {
    let s = aniso(Mode::PgpsPerformance);
    let v = serde_json::to_value(&s).unwrap();
    let back: Schedule = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(back, s);

    // Parameters alone rebuild the stages.
    let mut spec = v.clone();
    spec.as_object_mut().unwrap().remove("stages");
    assert_eq!(serde_json::from_value::<Schedule>(spec).unwrap(), s);

    // Edited stages are rejected.
    let mut tampered = v.clone();
    tampered["stages"][3]["batch"] = serde_json::json!(999);
    let e = serde_json::from_value::<Schedule>(tampered).unwrap_err();
    assert!(e.to_string().contains("stage 3"), "{e}");

    // Invalid parameters are rejected with the build error.
    let mut invalid = v;
    invalid["epochs"] = serde_json::json!(3);
    let e = serde_json::from_value::<Schedule>(invalid).unwrap_err();
    assert!(e.to_string().contains("epochs = 3"), "{e}");
}

#[test]
fn table_lists_every_stage_and_the_cost() {
    let s = iso(Mode::PgpsEfficiency);
    let t = s.render_table();
    let lines: Vec<&str> = t.lines().collect();
    // Title, header, 10 stages, cost line.
    assert_eq!(lines.len(), 13, "{t}");
    assert!(lines[1].starts_with("stage"));
    assert!(lines[2].contains("32×32×32") && lines[2].contains("0..99"));
    assert!(lines[2].contains("65536"));
    // The last stage does 64 of the 220 units of work.
    assert!(lines[11].contains("128×128×128") && lines[11].contains("900..999"));
    assert!(lines[11].contains(&format!("{:.1}%", 6400.0 / 220.0)));
    assert!(lines[12].contains("relative cost 0.3438"), "{}", lines[12]);

    let r = iso(Mode::Rpss).render_table();
    assert!(r.contains("p = 1/10"));
}

/// `Σ ceil((final − min) / step) + 1`, written independently of the crate.
fn formula(final_patch: [usize; 3], pools: [u32; 3]) -> usize {
    (0..3)
        .map(|a| {
            let step = 1usize << pools[a];
            (final_patch[a] - step).div_ceil(step)
        })
        .sum::<usize>()
        + 1
}

fn geometry() -> impl Strategy<Value = ([usize; 3], [u32; 3])> {
    prop::array::uniform3(0u32..=6)
        .prop_flat_map(|pools| {
            let [z, y, x] = pools.map(|p| {
                let step = 1usize << p;
                step..=8 * step
            });
            ((z, y, x), Just(pools))
        })
        .prop_map(|((z, y, x), pools)| ([z, y, x], pools))
}

proptest! {
    #[test]
    fn pgps_invariants(
        (final_patch, pools) in geometry(),
        extra_epochs in 0usize..3000,
        planned_batch in 1usize..8,
        performance in any::<bool>(),
    ) {
        let n = formula(final_patch, pools);
        let epochs = n + extra_epochs;
        let mode = if performance { Mode::PgpsPerformance } else { Mode::PgpsEfficiency };
        let s = Schedule::build(final_patch, pools, epochs, planned_batch, mode).unwrap();
        let step = min_patch(pools).unwrap();

        prop_assert_eq!(s.stages.len(), n);
        prop_assert_eq!(pgps_stage_count(final_patch, pools).unwrap(), n);
        prop_assert_eq!(s.stages[0].patch, step);
        prop_assert_eq!(s.stages[n - 1].patch, final_patch);
        prop_assert_eq!(s.stages[0].first_epoch, 0);
        prop_assert_eq!(s.stages.iter().map(|st| st.epochs).sum::<usize>(), epochs);

        let final_voxels = final_patch.iter().product::<usize>();
        for (i, st) in s.stages.iter().enumerate() {
            prop_assert!(st.epochs >= 1);
            for a in 0..3 {
                prop_assert!(st.patch[a] >= step[a] && st.patch[a] <= final_patch[a]);
                if st.patch[a] != final_patch[a] {
                    prop_assert_eq!(st.patch[a] % step[a], 0);
                }
            }
            let voxels = st.patch.iter().product::<usize>();
            prop_assert!(st.batch >= planned_batch);
            prop_assert!(st.batch * voxels <= planned_batch * final_voxels);
            prop_assert_eq!(st.crops_per_case, st.batch.div_ceil(planned_batch));
            if !performance {
                prop_assert_eq!(st.batch, planned_batch);
            }
            if i + 1 < n {
                let next = &s.stages[i + 1];
                prop_assert_eq!(next.first_epoch, st.first_epoch + st.epochs);
                prop_assert_eq!(st.epochs, epochs / n);
                // Exactly one axis grows, none shrinks.
                let grown = (0..3).filter(|&a| next.patch[a] > st.patch[a]).count();
                prop_assert_eq!(grown, 1);
                prop_assert!((0..3).all(|a| next.patch[a] >= st.patch[a]));
                prop_assert!(next.batch <= st.batch);
            }
        }
        // Every epoch maps to the stage that covers it.
        for e in [0, epochs / 3, epochs / 2, epochs - 1, epochs + 5] {
            let st = s.stage_at_epoch(e);
            prop_assert!(st.first_epoch <= e);
            prop_assert!(e <= st.last_epoch() || e >= epochs);
        }
        let cost = s.relative_cost();
        prop_assert!(cost > 0.0 && cost <= 1.0 + 1e-12);
    }

    #[test]
    fn rpss_is_deterministic_and_yields_stage_sizes(
        (final_patch, pools) in geometry(),
        seed in any::<u64>(),
        iteration in any::<u64>(),
        epoch in 0usize..2000,
    ) {
        let r = Schedule::build(final_patch, pools, 1000, 2, Mode::Rpss).unwrap();
        let pgps = pgps_patch_sizes(final_patch, pools).unwrap();
        prop_assert_eq!(r.stages.iter().map(|st| st.patch).collect::<Vec<_>>(), pgps.clone());
        let k = rpss_stage(&r, seed, iteration);
        prop_assert!(k < r.stages.len());
        prop_assert_eq!(k, rpss_stage(&r, seed, iteration));
        let (patch, batch) = r.patch_for(epoch, iteration, seed);
        prop_assert_eq!(patch, pgps[k]);
        prop_assert_eq!(batch, 2);
        prop_assert_eq!(r.patch_for(epoch + 1, iteration, seed), (patch, batch));
    }

    #[test]
    fn constant_is_one_full_stage(
        (final_patch, pools) in geometry(),
        epochs in 1usize..5000,
        planned_batch in 1usize..16,
    ) {
        let c = Schedule::build(final_patch, pools, epochs, planned_batch, Mode::Constant).unwrap();
        prop_assert_eq!(c.stages.len(), 1);
        prop_assert_eq!(c.stages[0].patch, final_patch);
        prop_assert_eq!(c.stages[0].batch, planned_batch);
        prop_assert_eq!(c.stages[0].epochs, epochs);
        prop_assert_eq!(c.relative_cost(), 1.0);
    }
}

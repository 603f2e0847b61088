//! Batches served from a store written in a temporary folder, compared with naive crops of the
//! in-memory arrays the store was written from.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;

use half::{bf16, f16};
use patchflow_sampler::{
    Batch, BatchRequest, Dataset, ItemMeta, Limits, OutputDType, Patch, Policy, Sampler,
    SamplerError,
};
use patchflow_store::ChunkCache;
use patchflow_testkit::synthetic::{MemCase, make_case, write_store};
use patchflow_volume::DType;

struct Fixture {
    _dir: tempfile::TempDir,
    cases: Vec<MemCase>,
    sampler: Sampler,
}

/// Three cases of different shapes; case "c" has no class 2.
fn fixture() -> Fixture {
    let cases = vec![
        make_case("a", [12, 20, 17], 1, Some(2)),
        make_case("b", [9, 14, 22], 2, Some(2)),
        make_case("c", [16, 11, 13], 3, None),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    write_store(dir.path(), &cases);
    let ds = Dataset::open("synthetic", dir.path(), ChunkCache::new(1 << 20)).expect("open");
    Fixture {
        _dir: dir,
        cases,
        sampler: Sampler::new(Arc::new(ds)),
    }
}

fn request(patch: [usize; 3], batch: usize, policy: Policy) -> BatchRequest {
    BatchRequest {
        patch: Patch::new(patch).expect("valid patch"),
        batch,
        policy,
        crops_per_case: 1,
        dtype: OutputDType::F32,
        seed: 1234,
        cases: None,
        augment: None,
    }
}

/// The naive reference: normalised f32 image `[C, Z, Y, X]` (0 outside) and labels (ignore
/// outside) of one item.
fn naive_crop(
    case: &MemCase,
    item: &ItemMeta,
    patch: [usize; 3],
    ignore: u16,
) -> (Vec<f32>, Vec<u16>) {
    let mut image = Vec::new();
    for (c, data) in case.channels.iter().enumerate() {
        let norm = case.meta.channels[c].norm;
        for z in 0..patch[0] as i64 {
            for y in 0..patch[1] as i64 {
                for x in 0..patch[2] as i64 {
                    let o = item.origin;
                    image.push(match case.index(o[0] + z, o[1] + y, o[2] + x) {
                        Some(i) => norm.apply(data.get_f64(i) as f32),
                        None => 0.0,
                    });
                }
            }
        }
    }
    let mut label = Vec::new();
    for z in 0..patch[0] as i64 {
        for y in 0..patch[1] as i64 {
            for x in 0..patch[2] as i64 {
                let o = item.origin;
                label.push(
                    case.label_at(o[0] + z, o[1] + y, o[2] + x)
                        .unwrap_or(ignore),
                );
            }
        }
    }
    (image, label)
}

fn served_labels(batch: &Batch) -> Vec<u16> {
    match batch.label_dtype {
        DType::U16 => batch
            .label
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
        _ => batch.label.iter().map(|&v| u16::from(v)).collect(),
    }
}

/// Checks every item of `batch` against the naive crop, bit for bit.
fn check_batch(fx: &Fixture, batch: &Batch) {
    let ds = fx.sampler.dataset();
    let patch = batch.patch.axes();
    let voxels: usize = patch.iter().product();
    let channels = ds.num_channels();
    let labels = served_labels(batch);
    assert_eq!(labels.len(), batch.items.len() * voxels);
    assert_eq!(
        batch.image.len(),
        batch.items.len() * channels * voxels * batch.dtype.size()
    );
    for (i, item) in batch.items.iter().enumerate() {
        let case = &fx.cases[ds.case_index(&item.case_id).expect("known case")];
        assert_eq!(ds.cases()[item.case].meta().id, item.case_id);
        let (want_img, want_lab) = naive_crop(case, item, patch, ds.ignore_label());
        let got_lab = &labels[i * voxels..(i + 1) * voxels];
        assert_eq!(
            got_lab,
            want_lab.as_slice(),
            "labels of item {i} ({item:?})"
        );
        let n = channels * voxels;
        let start = i * n * batch.dtype.size();
        let got = &batch.image[start..start + n * batch.dtype.size()];
        for (k, want) in want_img.iter().enumerate() {
            let bits_ok = match batch.dtype {
                OutputDType::F32 => {
                    let g = u32::from_le_bytes([
                        got[4 * k],
                        got[4 * k + 1],
                        got[4 * k + 2],
                        got[4 * k + 3],
                    ]);
                    g == want.to_bits()
                }
                OutputDType::F16 => {
                    u16::from_le_bytes([got[2 * k], got[2 * k + 1]])
                        == f16::from_f32(*want).to_bits()
                }
                OutputDType::BF16 => {
                    u16::from_le_bytes([got[2 * k], got[2 * k + 1]])
                        == bf16::from_f32(*want).to_bits()
                }
            };
            assert!(
                bits_ok,
                "item {i} element {k} ({:?}): want {want}",
                batch.dtype
            );
        }
    }
}

#[test]
fn served_patches_equal_naive_crops() {
    let fx = fixture();
    let weights: BTreeMap<u16, f64> = [(0, 1.0), (1, 1.0), (2, 1.0)].into();
    let policies = [
        Policy::Uniform,
        Policy::ForegroundOversample { fraction: 0.5 },
        Policy::ClassWeights { weights },
    ];
    // Patches smaller than, straddling and larger than the volumes, odd and even shortfalls.
    let patches = [[4, 4, 4], [8, 16, 8], [13, 21, 23], [20, 7, 30], [1, 1, 1]];
    for policy in &policies {
        for patch in patches {
            for dtype in [OutputDType::F32, OutputDType::F16, OutputDType::BF16] {
                let mut req = request(patch, 3, policy.clone());
                req.dtype = dtype;
                for index in 0..4 {
                    let batch = fx.sampler.sample(&req, index).expect("sample");
                    assert_eq!(batch.index, index);
                    assert_eq!(batch.patch.axes(), patch);
                    assert_eq!(batch.items.len(), 3);
                    check_batch(&fx, &batch);
                }
            }
        }
    }
}

#[test]
fn patch_larger_than_volume_is_centred() {
    let fx = fixture();
    let req = request([20, 30, 30], 2, Policy::Uniform);
    for index in 0..20 {
        for item in fx.sampler.plan(&req, index).expect("plan") {
            let shape = fx.sampler.dataset().cases()[item.case].meta().shape;
            for (a, &extent) in shape.iter().enumerate() {
                let before = -item.origin[a];
                let after = item.origin[a] + req.patch.axes()[a] as i64 - extent as i64;
                assert!(before >= 0 && after >= 0, "{item:?}");
                assert!((before - after).abs() <= 1, "{item:?} axis {a}");
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_batches() {
    let fx = fixture();
    let mut req = request(
        [9, 10, 11],
        6,
        Policy::ForegroundOversample { fraction: 0.33 },
    );
    req.crops_per_case = 2;
    let run = |threads: usize| -> Vec<Batch> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            (0..8)
                .map(|i| fx.sampler.sample(&req, i).expect("sample"))
                .collect()
        })
    };
    let one = run(1);
    let four = run(4);
    assert_eq!(one, four);
}

#[test]
fn same_index_same_batch_other_index_other_plan() {
    let fx = fixture();
    let req = request([6, 6, 6], 4, Policy::ForegroundOversample { fraction: 0.5 });
    let a = fx.sampler.sample(&req, 5).expect("sample");
    let b = fx.sampler.sample(&req, 5).expect("sample");
    assert_eq!(a, b);
    let plans: BTreeSet<Vec<[i64; 3]>> = (0..20)
        .map(|i| {
            fx.sampler
                .plan(&req, i)
                .expect("plan")
                .iter()
                .map(|m| m.origin)
                .collect()
        })
        .collect();
    // 20 batches of 4 origins over volumes of ~1000 voxels: a repeat is very unlikely, and
    // identical plans would mean the index is ignored.
    assert!(plans.len() >= 19, "only {} distinct plans", plans.len());
    let mut other_seed = req.clone();
    other_seed.seed += 1;
    assert_ne!(
        fx.sampler.plan(&req, 0).expect("plan"),
        fx.sampler.plan(&other_seed, 0).expect("plan")
    );
    // The plan is what sample serves.
    assert_eq!(fx.sampler.plan(&req, 5).expect("plan"), a.items);
}

#[test]
fn sample_to_fills_caller_memory_like_sample() {
    let fx = fixture();
    for req in [
        request([6, 7, 5], 3, Policy::ForegroundOversample { fraction: 0.5 }),
        // Larger than the volumes: padding must be written over whatever the memory held.
        request([20, 9, 30], 2, Policy::Uniform),
    ] {
        let want = fx.sampler.sample(&req, 11).expect("sample");
        let (ib, lb) = fx.sampler.buffer_sizes(&req).expect("sizes");
        assert_eq!((ib, lb), (want.image.len(), want.label.len()));
        // Dirty memory, as a reused shared-memory slot would be.
        let mut image = vec![0xA5u8; ib];
        let mut label = vec![0x5Au8; lb];
        let items = fx
            .sampler
            .sample_to(&req, 11, &mut image, &mut label)
            .expect("sample_to");
        assert_eq!(items, want.items);
        assert!(image == want.image, "image bytes differ");
        assert!(label == want.label, "label bytes differ");
        // Recycled vectors with old contents (longer and shorter than needed) give the same.
        let again = fx
            .sampler
            .sample_into(&req, 11, vec![0xA5u8; ib + 100], vec![0x5Au8; lb / 2])
            .expect("sample_into");
        assert!(again == want, "recycled buffers change the batch");
        // Wrong sizes are refused, naming the buffers.
        let err = fx
            .sampler
            .sample_to(&req, 11, &mut image[1..], &mut label)
            .expect_err("short image buffer");
        assert!(err.to_string().contains("output buffers"), "{err}");
    }
}

#[test]
fn crops_per_case_groups_items() {
    let fx = fixture();
    let mut req = request([5, 5, 5], 7, Policy::Uniform);
    req.crops_per_case = 3;
    let mut multi_case_batches = 0;
    for index in 0..40 {
        let items = fx.sampler.plan(&req, index).expect("plan");
        assert_eq!(items.len(), 7);
        // ceil(7 / 3) = 3 groups: items 0-2, 3-5, 6.
        for group in [0..3, 3..6, 6..7] {
            let first = items[group.start].case;
            assert!(items[group].iter().all(|m| m.case == first));
        }
        let distinct: BTreeSet<usize> = items.iter().map(|m| m.case).collect();
        multi_case_batches += usize::from(distinct.len() > 1);
    }
    assert!(multi_case_batches > 0, "groups never drew different cases");
    req.crops_per_case = 7;
    for index in 0..10 {
        let items = fx.sampler.plan(&req, index).expect("plan");
        assert!(items.iter().all(|m| m.case == items[0].case));
    }
}

#[test]
fn case_restriction_is_respected() {
    let fx = fixture();
    let mut req = request([5, 5, 5], 4, Policy::Uniform);
    req.cases = Some(vec![2, 0]);
    let mut seen = BTreeSet::new();
    for index in 0..30 {
        for item in fx.sampler.plan(&req, index).expect("plan") {
            assert!(item.case == 0 || item.case == 2, "{item:?}");
            seen.insert(item.case);
        }
    }
    assert_eq!(seen.len(), 2);
}

#[test]
fn forced_share_and_forced_crops_contain_their_class() {
    let fx = fixture();
    let patch = [4, 4, 4];
    let voxels: usize = patch.iter().product();
    for (batch_size, fraction) in [(2usize, 0.33f64), (5, 0.5), (4, 1.0), (3, 0.0)] {
        let req = request(patch, batch_size, Policy::ForegroundOversample { fraction });
        let forced_per_batch =
            batch_size - (batch_size as f64 * (1.0 - fraction)).round_ties_even() as usize;
        let mut forced = 0;
        for index in 0..30 {
            let batch = fx.sampler.sample(&req, index).expect("sample");
            let labels = served_labels(&batch);
            for (i, item) in batch.items.iter().enumerate() {
                // Every case has class 1, so every forced slot is centred on foreground.
                assert_eq!(item.forced_foreground, i >= batch_size - forced_per_batch);
                if item.forced_foreground {
                    forced += 1;
                    let class = item.class.expect("forced class");
                    let crop = &labels[i * voxels..(i + 1) * voxels];
                    assert!(crop.contains(&class), "{item:?}");
                }
            }
        }
        assert_eq!(
            forced,
            30 * forced_per_batch,
            "batch {batch_size} fraction {fraction}"
        );
    }
}

#[test]
fn class_weights_follow_weights_and_crops_contain_their_class() {
    let fx = fixture();
    let patch = [3, 3, 3];
    let voxels: usize = patch.iter().product();
    let weights: BTreeMap<u16, f64> = [(0, 1.0), (1, 2.0), (2, 3.0)].into();
    let req = request(
        patch,
        8,
        Policy::ClassWeights {
            weights: weights.clone(),
        },
    );
    let mut counts: BTreeMap<(usize, u16), usize> = BTreeMap::new();
    let mut per_case: BTreeMap<usize, usize> = BTreeMap::new();
    for index in 0..300 {
        let batch = fx.sampler.sample(&req, index).expect("sample");
        let labels = served_labels(&batch);
        for (i, item) in batch.items.iter().enumerate() {
            let class = item.class.expect("weighted class");
            let crop = &labels[i * voxels..(i + 1) * voxels];
            assert!(crop.contains(&class), "{item:?}");
            *counts.entry((item.case, class)).or_default() += 1;
            *per_case.entry(item.case).or_default() += 1;
        }
    }
    // Per case, the class counts are multinomial with the renormalised weights (case "c", index
    // 2, has no class 2). Pearson's chi-square with k-1 degrees of freedom must stay below the
    // 0.9999 quantile (13.8 for 1 dof, 18.4 for 2): a false failure has probability < 1e-4.
    for (&case, &n) in &per_case {
        let present: Vec<(u16, f64)> = if case == 2 {
            vec![(0, 1.0), (1, 2.0)]
        } else {
            weights.iter().map(|(c, w)| (*c, *w)).collect()
        };
        let total: f64 = present.iter().map(|p| p.1).sum();
        let mut chi2 = 0.0;
        for (class, w) in &present {
            let expected = n as f64 * w / total;
            let got = *counts.get(&(case, *class)).unwrap_or(&0) as f64;
            chi2 += (got - expected).powi(2) / expected;
        }
        let bound = if present.len() == 2 { 13.8 } else { 18.4 };
        assert!(
            chi2 < bound,
            "case {case}: chi2 {chi2} over {n} items, counts {counts:?}"
        );
        if case == 2 {
            assert_eq!(counts.get(&(2, 2)), None);
        }
    }
}

#[test]
fn validation_names_fields_and_limits() {
    let fx = fixture();
    let limits = Limits {
        max_patch_voxels: 64 * 64 * 64,
        max_batch_bytes: 10 << 20,
        max_batch: 16,
    };
    let ok = request(
        [8, 8, 8],
        2,
        Policy::ForegroundOversample { fraction: 0.33 },
    );
    fx.sampler.validate(&ok, &limits).expect("valid request");

    let field_of = |req: &BatchRequest| match fx.sampler.validate(req, &limits) {
        Err(SamplerError::InvalidRequest { field, reason }) => {
            assert!(!reason.is_empty());
            field
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    };
    let limit_of = |req: &BatchRequest| match fx.sampler.validate(req, &limits) {
        Err(SamplerError::LimitExceeded { what, value, limit }) => {
            assert!(value > limit);
            what
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    };
    let with = |f: &dyn Fn(&mut BatchRequest)| {
        let mut r = ok.clone();
        f(&mut r);
        r
    };
    // A request cannot carry a zero or too large patch edge: the patch type refuses them.
    assert!(Patch::new([8, 0, 8]).is_err());
    assert!(Patch::new([8, 8, 5000]).is_err());
    assert_eq!(field_of(&with(&|r| r.batch = 0)), "batch");
    assert_eq!(field_of(&with(&|r| r.crops_per_case = 0)), "crops_per_case");
    for fraction in [-0.1, 1.5, f64::NAN] {
        let r = with(&|r| r.policy = Policy::ForegroundOversample { fraction });
        assert_eq!(field_of(&r), "policy.fraction");
    }
    for weights in [
        BTreeMap::new(),
        [(1u16, f64::NAN)].into(),
        [(1u16, -1.0)].into(),
        [(1u16, f64::INFINITY)].into(),
        [(1u16, 0.0)].into(),
        [(1u16, 1.0), (77, 1.0)].into(),
        // Case "c" holds neither class 2 nor anything else weighted.
        [(2u16, 1.0)].into(),
    ] {
        let r = with(&|r| {
            r.policy = Policy::ClassWeights {
                weights: weights.clone(),
            }
        });
        assert_eq!(field_of(&r), "policy.weights", "{weights:?}");
    }
    // Restricted to cases that hold class 2, the same weights are fine.
    let mut only2 = with(&|r| {
        r.policy = Policy::ClassWeights {
            weights: [(2u16, 1.0)].into(),
        }
    });
    only2.cases = Some(vec![0, 1]);
    fx.sampler
        .validate(&only2, &limits)
        .expect("class 2 in cases 0 and 1");
    assert_eq!(field_of(&with(&|r| r.cases = Some(vec![]))), "cases");
    assert_eq!(field_of(&with(&|r| r.cases = Some(vec![0, 3]))), "cases");

    assert_eq!(limit_of(&with(&|r| r.batch = 17)), "batch");
    assert_eq!(
        limit_of(&with(&|r| r.patch = Patch::new([65, 64, 64]).unwrap())),
        "patch voxels"
    );
    // 2 items × 64³ × (2 channels × 4 bytes + 1 label byte) = 4.7 MiB; 5 items (11.8 MB) exceed 10 MiB.
    fx.sampler
        .validate(&with(&|r| r.patch = Patch::cube(64).unwrap()), &limits)
        .expect("4.7 MiB batch");
    let big = with(&|r| {
        r.patch = Patch::cube(64).unwrap();
        r.batch = 5;
    });
    assert_eq!(limit_of(&big), "batch bytes");
    assert_eq!(fx.sampler.batch_bytes(&big), 5 * 64 * 64 * 64 * (2 * 4 + 1));

    // sample refuses structurally invalid requests too.
    assert!(matches!(
        fx.sampler.sample(&with(&|r| r.batch = 0), 0),
        Err(SamplerError::InvalidRequest { field: "batch", .. })
    ));
}

#[test]
fn dataset_metadata() {
    let fx = fixture();
    let ds = fx.sampler.dataset();
    assert_eq!(ds.name(), "synthetic");
    let ids: Vec<&str> = ds.cases().iter().map(|c| c.meta().id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(ds.case_index("b"), Some(1));
    assert_eq!(ds.case_index("zz"), None);
    assert_eq!(ds.num_channels(), 2);
    assert_eq!(ds.label_dtype(), DType::U8);
    assert_eq!(ds.ignore_label(), 255);
    assert_eq!(ds.classes(), vec![1, 2]);
    assert_eq!(ds.label_names().get(&1).map(String::as_str), Some("liver"));
}

#[test]
fn wide_classes_are_served_as_u16() {
    let cases = vec![
        make_case("p", [10, 12, 9], 7, Some(300)),
        make_case("q", [8, 9, 10], 8, None),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    write_store(dir.path(), &cases);
    let ds = Dataset::open("wide", dir.path(), ChunkCache::new(1 << 20)).expect("open");
    assert_eq!(ds.label_dtype(), DType::U16);
    assert_eq!(ds.ignore_label(), u16::MAX);
    assert_eq!(ds.classes(), vec![1, 300]);
    let fx = Fixture {
        _dir: dir,
        cases,
        sampler: Sampler::new(Arc::new(ds)),
    };
    let weights: BTreeMap<u16, f64> = [(1, 1.0), (300, 1.0)].into();
    let req = request([12, 5, 14], 4, Policy::ClassWeights { weights });
    for index in 0..10 {
        let batch = fx.sampler.sample(&req, index).expect("sample");
        assert_eq!(batch.label.len(), 4 * 12 * 5 * 14 * 2);
        check_batch(&fx, &batch);
    }
}

#[test]
fn open_rejects_inconsistent_stores() {
    // No manifest.
    let empty = tempfile::tempdir().expect("tempdir");
    let err = Dataset::open("x", empty.path(), ChunkCache::new(0)).expect_err("no manifest");
    assert!(matches!(err, SamplerError::NotFound(_)), "{err}");

    // Different channel counts.
    let mut one_channel = make_case("m", [5, 5, 5], 1, None);
    one_channel.meta.channels.truncate(1);
    one_channel.channels.truncate(1);
    let two = make_case("n", [5, 5, 5], 2, None);
    let dir = tempfile::tempdir().expect("tempdir");
    write_store(dir.path(), &[one_channel, two]);
    let err = Dataset::open("x", dir.path(), ChunkCache::new(0)).expect_err("channel mismatch");
    assert!(
        matches!(&err, SamplerError::Dataset { reason, .. } if reason.contains("channel")),
        "{err}"
    );

    // A class that collides with the u16 ignore label.
    let clash = make_case("o", [5, 5, 9], 3, Some(u16::MAX));
    let dir = tempfile::tempdir().expect("tempdir");
    write_store(dir.path(), &[clash]);
    let err = Dataset::open("x", dir.path(), ChunkCache::new(0)).expect_err("class 65535");
    assert!(
        matches!(&err, SamplerError::Dataset { reason, .. } if reason.contains("65535")),
        "{err}"
    );
}

// ---- Augmentation ----

use patchflow_augment::{
    AugmentSpec, BlurSpec, GammaSpec, MirrorSpec, NoiseSpec, RotationSpec, ScalingSpec,
};

fn augmented(patch: [usize; 3], batch: usize, spec: AugmentSpec) -> BatchRequest {
    let mut req = request(patch, batch, Policy::ForegroundOversample { fraction: 0.5 });
    req.augment = Some(spec);
    req
}

/// Image values of a batch as `f32`, whatever the served dtype.
fn served_image(batch: &Batch) -> Vec<f32> {
    match batch.dtype {
        OutputDType::F32 => batch
            .image
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        OutputDType::F16 => batch
            .image
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        OutputDType::BF16 => batch
            .image
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Label values present in a case.
fn case_classes(case: &MemCase) -> BTreeSet<u16> {
    (0..case.label.len()).map(|i| case.label.get(i)).collect()
}

/// Checks shapes, finiteness and label values (the case's classes and the ignore label only).
fn check_augmented(fx: &Fixture, batch: &Batch) {
    let ds = fx.sampler.dataset();
    let voxels = batch.patch.voxels() as usize;
    let n = batch.items.len();
    assert_eq!(
        batch.image.len(),
        n * ds.num_channels() * voxels * batch.dtype.size()
    );
    assert_eq!(batch.label.len(), n * voxels * ds.label_dtype().size());
    assert!(served_image(batch).iter().all(|v| v.is_finite()));
    let labels = served_labels(batch);
    for (i, item) in batch.items.iter().enumerate() {
        assert!(item.augment.is_some(), "{item:?}");
        let case = &fx.cases[ds.case_index(&item.case_id).expect("known case")];
        let mut allowed = case_classes(case);
        allowed.insert(ds.ignore_label());
        for &l in &labels[i * voxels..(i + 1) * voxels] {
            assert!(
                allowed.contains(&l),
                "label {l} in item {i} of case {}",
                item.case_id
            );
        }
    }
}

#[test]
fn identity_augmentation_serves_the_plain_crop() {
    let fx = fixture();
    for dtype in [OutputDType::F32, OutputDType::F16, OutputDType::BF16] {
        for patch in [[4, 4, 4], [13, 21, 23], [20, 7, 30]] {
            let mut plain = request(patch, 3, Policy::ForegroundOversample { fraction: 0.5 });
            plain.dtype = dtype;
            let mut aug = plain.clone();
            aug.augment = Some(AugmentSpec::default());
            for index in 0..3 {
                let a = fx.sampler.sample(&plain, index).expect("plain");
                let b = fx.sampler.sample(&aug, index).expect("augmented");
                assert_eq!(a.image, b.image, "{dtype} {patch:?}");
                assert_eq!(a.label, b.label, "{dtype} {patch:?}");
                for (x, y) in a.items.iter().zip(&b.items) {
                    assert_eq!((x.case, x.origin, x.class), (y.case, y.origin, y.class));
                    assert!(y.augment.as_ref().is_some_and(|p| p.is_identity()));
                }
            }
        }
    }
}

#[test]
fn mirrored_items_are_flipped_crops() {
    let fx = fixture();
    let spec = AugmentSpec {
        mirror: MirrorSpec {
            p_per_axis: 1.0,
            axes: [true, false, true],
        },
        ..AugmentSpec::default()
    };
    let patch = [5, 9, 12];
    let voxels: usize = patch.iter().product();
    let channels = fx.sampler.dataset().num_channels();
    for dtype in [OutputDType::F32, OutputDType::BF16] {
        let mut plain = request(patch, 2, Policy::Uniform);
        plain.dtype = dtype;
        let mut aug = plain.clone();
        aug.augment = Some(spec.clone());
        for index in 0..4 {
            let a = fx.sampler.sample(&plain, index).expect("plain");
            let b = fx.sampler.sample(&aug, index).expect("mirrored");
            let (ia, ib) = (served_image(&a), served_image(&b));
            let (la, lb) = (served_labels(&a), served_labels(&b));
            for item in 0..2 {
                assert_eq!(
                    b.items[item].augment.as_ref().map(|p| p.mirror),
                    Some([true, false, true])
                );
                for z in 0..patch[0] {
                    for y in 0..patch[1] {
                        for x in 0..patch[2] {
                            let o = (z * patch[1] + y) * patch[2] + x;
                            let s =
                                ((patch[0] - 1 - z) * patch[1] + y) * patch[2] + (patch[2] - 1 - x);
                            assert_eq!(lb[item * voxels + o], la[item * voxels + s]);
                            for c in 0..channels {
                                let base = (item * channels + c) * voxels;
                                assert_eq!(ib[base + o].to_bits(), ia[base + s].to_bits());
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn preset_batches_are_well_formed_and_reproducible() {
    let fx = fixture();
    let spec = AugmentSpec::nnunet_default();
    let mut resampled = 0;
    let mut intensity = 0;
    for dtype in [OutputDType::F32, OutputDType::F16, OutputDType::BF16] {
        for patch in [[12, 16, 10], [20, 30, 30]] {
            let mut req = augmented(patch, 4, spec.clone());
            req.dtype = dtype;
            fx.sampler
                .validate(&req, &Limits::default())
                .expect("valid request");
            for index in 0..10 {
                let a = fx.sampler.sample(&req, index).expect("sample");
                let b = fx.sampler.sample(&req, index).expect("sample");
                assert_eq!(a, b, "same seed, same batch");
                assert_eq!(a.items, fx.sampler.plan(&req, index).expect("plan"));
                check_augmented(&fx, &a);
                for item in &a.items {
                    let p = item.augment.as_ref().expect("params");
                    resampled += usize::from(p.is_resampled());
                    intensity += usize::from(p.gamma.is_some() || p.lowres.is_some());
                }
            }
        }
    }
    // 240 items with p(resampled) = 0.36 and p(gamma or low-res) ≈ 0.47: both occur.
    assert!(resampled > 0 && intensity > 0, "{resampled} {intensity}");
    let mut other = augmented([12, 16, 10], 4, spec);
    other.seed += 1;
    assert_ne!(
        fx.sampler.plan(&other, 0).expect("plan"),
        fx.sampler
            .plan(
                &augmented([12, 16, 10], 4, AugmentSpec::nnunet_default()),
                0
            )
            .expect("plan")
    );
}

/// A specification where most transforms fire.
fn busy_spec() -> AugmentSpec {
    AugmentSpec {
        rotation: RotationSpec {
            p: 0.9,
            ..RotationSpec::default()
        },
        scaling: ScalingSpec {
            p: 0.7,
            ..ScalingSpec::default()
        },
        noise: NoiseSpec {
            p: 0.5,
            ..NoiseSpec::default()
        },
        blur: BlurSpec {
            p: 0.5,
            ..BlurSpec::default()
        },
        gamma: GammaSpec {
            p: 0.5,
            ..GammaSpec::default()
        },
        ..AugmentSpec::nnunet_default()
    }
}

#[test]
fn thread_count_does_not_change_augmented_batches() {
    let fx = fixture();
    let mut req = augmented([9, 14, 11], 6, busy_spec());
    req.crops_per_case = 2;
    let run = |threads: usize| -> Vec<Batch> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            (0..8)
                .map(|i| fx.sampler.sample(&req, i).expect("sample"))
                .collect()
        })
    };
    let one = run(1);
    let four = run(4);
    assert_eq!(one, four);
    for batch in &one {
        check_augmented(&fx, batch);
    }
}

#[test]
fn augmentation_does_not_move_crops() {
    let fx = fixture();
    let plain = request([6, 7, 8], 5, Policy::ForegroundOversample { fraction: 0.5 });
    let aug = augmented([6, 7, 8], 5, busy_spec());
    for index in 0..10 {
        let a = fx.sampler.plan(&plain, index).expect("plan");
        let b = fx.sampler.plan(&aug, index).expect("plan");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (x.case, x.origin, x.forced_foreground, x.class),
                (y.case, y.origin, y.forced_foreground, y.class)
            );
            assert!(x.augment.is_none() && y.augment.is_some());
        }
    }
}

#[test]
fn wide_labels_are_augmented_as_u16() {
    let cases = vec![
        make_case("p", [10, 12, 9], 7, Some(300)),
        make_case("q", [8, 9, 10], 8, None),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    write_store(dir.path(), &cases);
    let ds = Dataset::open("wide", dir.path(), ChunkCache::new(1 << 20)).expect("open");
    let fx = Fixture {
        _dir: dir,
        cases,
        sampler: Sampler::new(Arc::new(ds)),
    };
    let req = augmented([12, 5, 14], 4, busy_spec());
    for index in 0..10 {
        let batch = fx.sampler.sample(&req, index).expect("sample");
        assert_eq!(batch.label_dtype, DType::U16);
        check_augmented(&fx, &batch);
    }
}

#[test]
fn augmentation_is_validated() {
    let fx = fixture();
    let limits = Limits {
        max_patch_voxels: 64 * 64 * 64,
        max_batch_bytes: 20_000,
        max_batch: 16,
    };
    let ok = augmented([8, 8, 8], 2, AugmentSpec::default());
    fx.sampler
        .validate(&ok, &limits)
        .expect("no spatial transform");
    let mut bad = ok.clone();
    bad.augment = Some(AugmentSpec {
        blur: BlurSpec {
            p: 1.5,
            ..BlurSpec::default()
        },
        ..AugmentSpec::default()
    });
    match fx.sampler.validate(&bad, &limits) {
        Err(SamplerError::InvalidRequest { field, reason }) => {
            assert_eq!(field, "augment");
            assert!(reason.contains("blur.p"), "{reason}");
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    assert!(matches!(
        fx.sampler.sample(&bad, 0),
        Err(SamplerError::InvalidRequest {
            field: "augment",
            ..
        })
    ));
    // The batch (2 × 512 × 9 bytes) fits, the preset's largest rotated and scaled source region
    // (about 20³ voxels × 9 bytes) does not.
    let big = augmented([8, 8, 8], 2, AugmentSpec::nnunet_default());
    match fx.sampler.validate(&big, &limits) {
        Err(SamplerError::LimitExceeded { what, value, limit }) => {
            assert_eq!(what, "augmentation source region bytes");
            assert!(value > limit);
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
}

use super::*;
use crate::locations::locations_to_keep;
use crate::phantom::{PhantomSpec, phantom};
use crate::stats::CtStats;
use crate::types::DType;
use proptest::prelude::*;
use std::path::PathBuf;

fn geometry(shape: [usize; 3], spacing: [f64; 3]) -> Geometry {
    Geometry {
        shape,
        spacing,
        affine: [
            [spacing[2], 0.0, 0.0, -10.0],
            [0.0, spacing[1], 0.0, 5.0],
            [0.0, 0.0, spacing[0], 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    }
}

fn image(name: &str, g: &Geometry, data: VoxelData) -> NiftiImage {
    NiftiImage {
        path: PathBuf::from(name),
        geometry: g.clone(),
        source_dtype: data.dtype(),
        data,
    }
}

/// A `[10, 12, 14]` case: zeros around a block `z 2..8, y 3..10, x 1..12` holding a ramp of HU
/// values, and a label with class 1 in a sub-block and class 5 at one voxel.
fn block_case(spacing: [f64; 3], dtype_i32: bool) -> CaseInput {
    let shape = [10, 12, 14];
    let g = geometry(shape, spacing);
    let mut hu = vec![0i32; g.voxels()];
    let mut label = vec![0u8; g.voxels()];
    for z in 2..8 {
        for y in 3..10 {
            for x in 1..12 {
                let i = (z * 12 + y) * 14 + x;
                hu[i] = -900 + (z * 150 + y * 20 + x * 7) as i32;
                if (3..6).contains(&z) && (4..8).contains(&y) && (2..9).contains(&x) {
                    label[i] = 1;
                }
            }
        }
    }
    label[(6 * 12 + 9) * 14 + 11] = 5;
    let data = if dtype_i32 {
        VoxelData::I32(hu)
    } else {
        VoxelData::F32(hu.iter().map(|&v| v as f32).collect())
    };
    CaseInput {
        id: "case_007".into(),
        channels: vec![image("case_007_0000.nii.gz", &g, data)],
        channel_names: vec!["CT".into()],
        label: LabelData::U8(label),
        label_geometry: g,
    }
}

fn ct_plan(target: Option<[f64; 3]>) -> PreprocessPlan {
    PreprocessPlan {
        target_spacing: target,
        schemes: vec![NormScheme::Ct],
        ct_stats: vec![Some(CtStats {
            p00_5: -800.0,
            p99_5: 400.0,
            mean: -100.0,
            std: 250.0,
        })],
        interp: Interp::Cubic,
        seed: 42,
        use_mask_for_norm: Vec::new(),
    }
}

#[test]
fn deferred_normalisation_keeps_narrowed_source_values() {
    let input = block_case([2.0, 1.0, 1.0], true);
    let plan = ct_plan(None);
    let out = preprocess(&input, &plan).unwrap();
    assert!(!out.resampled);
    assert_eq!(out.crop_box, [[2, 8], [3, 10], [1, 12]]);
    assert_eq!(out.shape, [6, 7, 11]);
    assert_eq!(out.spacing, [2.0, 1.0, 1.0]);
    assert_eq!(out.original, input.channels[0].geometry);
    assert_eq!(out.channel_names, vec!["CT".to_string()]);
    // int32 HU in i16 range is stored as i16, unchanged.
    let VoxelData::I16(stored) = &out.channels[0] else {
        panic!("expected i16, got {:?}", out.channels[0].dtype())
    };
    let VoxelData::I32(src) = &input.channels[0].data else {
        unreachable!()
    };
    let want = crop(src, [10, 12, 14], out.crop_box);
    assert!(stored.iter().zip(&want).all(|(&a, &b)| i32::from(a) == b));
    // The deferred map is the CT normalisation, and applying it gives nnU-Net's values.
    let norm = out.norms[0];
    assert_eq!(norm, plan.ct_stats[0].unwrap().normalization());
    for (&s, &w) in stored.iter().zip(&want) {
        let reference = (f64::from(w).clamp(-800.0, 400.0) + 100.0) / 250.0;
        assert!((f64::from(norm.apply(f32::from(s))) - reference).abs() < 1e-5);
    }
    // Labels cropped the same way; counts and locations on the cropped grid.
    assert_eq!(out.label.len(), 6 * 7 * 11);
    assert_eq!(out.class_voxels[&1], 3 * 4 * 7);
    assert_eq!(out.class_voxels[&5], 1);
    assert_eq!(out.class_voxels.values().sum::<u64>(), 6 * 7 * 11);
    assert_eq!(out.class_locations[&5], vec![[4, 6, 10]]);
    for (c, locs) in &out.class_locations {
        assert_eq!(locs.len() as u64, locations_to_keep(out.class_voxels[c]));
        for &[z, y, x] in locs {
            let i = (z as usize * 7 + y as usize) * 11 + x as usize;
            assert_eq!(out.label.get(i), *c);
        }
    }
}

#[test]
fn zscore_and_none_schemes() {
    let mut input = block_case([1.0, 1.0, 1.0], false);
    let second = input.channels[0].clone();
    input.channels.push(NiftiImage {
        path: PathBuf::from("case_007_0001.nii.gz"),
        ..second
    });
    input.channel_names.push("T2".into());
    let plan = PreprocessPlan {
        target_spacing: Some([1.0, 1.0, 1.0]),
        schemes: vec![NormScheme::ZScore, NormScheme::None],
        ct_stats: vec![None, None],
        interp: Interp::Linear,
        seed: 0,
        use_mask_for_norm: Vec::new(),
    };
    let out = preprocess(&input, &plan).unwrap();
    assert!(!out.resampled, "spacing equals the target");
    let VoxelData::F32(v) = &out.channels[0] else {
        panic!("float sources stay f32")
    };
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let std = (v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    let z = out.norms[0];
    assert_eq!(z.scheme, NormScheme::ZScore);
    assert_eq!(z.clip, None);
    assert!((f64::from(z.mean) - mean).abs() < 1e-3);
    assert!((f64::from(z.inv_std) - 1.0 / std).abs() < 1e-6);
    let normalised: Vec<f64> = v.iter().map(|&x| f64::from(z.apply(x))).collect();
    let m2 = normalised.iter().sum::<f64>() / n;
    assert!(m2.abs() < 1e-4);
    assert!(out.norms[1].is_identity());
    assert_eq!(out.norms[1].scheme, NormScheme::None);
}

#[test]
fn resampled_path_normalises_then_resamples_to_f32() {
    let input = block_case([2.0, 1.0, 1.0], true);
    let plan = ct_plan(Some([1.0, 1.5, 0.8]));
    let out = preprocess(&input, &plan).unwrap();
    assert!(out.resampled);
    assert_eq!(out.spacing, [1.0, 1.5, 0.8]);
    // 6*2/1 = 12, 7*1/1.5 = 4.67 -> 5, 11*1/0.8 = 13.75 -> 14.
    assert_eq!(out.shape, [12, 5, 14]);
    assert_eq!(out.crop_box, [[2, 8], [3, 10], [1, 12]]);
    assert!(out.norms[0].is_identity());
    assert_eq!(out.norms[0].scheme, NormScheme::Ct);
    let VoxelData::F32(v) = &out.channels[0] else {
        panic!("resampled channels are f32")
    };
    assert_eq!(v.len(), 12 * 5 * 14);
    // Same as normalising with Normalization::apply and resampling by hand.
    let VoxelData::I32(src) = &input.channels[0].data else {
        unreachable!()
    };
    let norm = plan.ct_stats[0].unwrap().normalization();
    let normalised: Vec<f32> = crop(src, [10, 12, 14], out.crop_box)
        .iter()
        .map(|&x| norm.apply(x as f32))
        .collect();
    let want = resample_f32(&normalised, [6, 7, 11], [12, 5, 14], [Kernel::Cubic; 3]);
    assert_eq!(v, &want);
    // Labels: nearest, only existing values, locations valid.
    assert_eq!(out.label.len(), v.len());
    for i in 0..out.label.len() {
        assert!([0, 1, 5].contains(&out.label.get(i)));
    }
    for (c, locs) in &out.class_locations {
        for &[z, y, x] in locs {
            assert_eq!(
                out.label
                    .get((z as usize * 5 + y as usize) * 14 + x as usize),
                *c
            );
        }
    }
}

#[test]
fn anisotropic_case_uses_nearest_on_the_coarse_axis() {
    let input = block_case([5.0, 1.0, 1.0], true);
    let plan = ct_plan(Some([2.5, 1.0, 1.0]));
    let out = preprocess(&input, &plan).unwrap();
    assert_eq!(out.shape, [12, 7, 11]);
    let VoxelData::F32(v) = &out.channels[0] else {
        panic!()
    };
    let VoxelData::I32(src) = &input.channels[0].data else {
        unreachable!()
    };
    let norm = plan.ct_stats[0].unwrap().normalization();
    let cropped: Vec<f32> = crop(src, [10, 12, 14], out.crop_box)
        .iter()
        .map(|&x| norm.apply(x as f32))
        .collect();
    // Every output slice is a copy of a source slice (z doubled by nearest neighbour).
    let plane = 7 * 11;
    for z in 0..12 {
        assert_eq!(
            &v[z * plane..(z + 1) * plane],
            &cropped[(z / 2) * plane..(z / 2 + 1) * plane]
        );
    }
}

#[test]
fn spacing_within_tolerance_is_not_resampled() {
    let input = block_case([2.0, 1.0, 1.0], true);
    let out = preprocess(&input, &ct_plan(Some([2.001, 0.9995, 1.0]))).unwrap();
    assert!(!out.resampled);
    assert_eq!(out.spacing, [2.0, 1.0, 1.0]);
    assert_eq!(out.channels[0].dtype(), DType::I16);
}

#[test]
fn all_zero_image_keeps_the_whole_volume() {
    let mut input = block_case([1.0, 1.0, 1.0], true);
    input.channels[0].data = VoxelData::I32(vec![0; 10 * 12 * 14]);
    let mut plan = ct_plan(None);
    plan.schemes = vec![NormScheme::ZScore];
    let out = preprocess(&input, &plan).unwrap();
    assert_eq!(out.crop_box, [[0, 10], [0, 12], [0, 14]]);
    assert_eq!(out.channels[0], VoxelData::U8(vec![0; 10 * 12 * 14]));
    assert_eq!(out.norms[0].inv_std, 1.0e8);
}

#[test]
fn class_locations_depend_on_seed_and_case() {
    // Large enough for the liver to exceed 10,000 voxels, so that sampling has a choice.
    let (g, img, label) = phantom(&PhantomSpec::default());
    let mk = |id: &str| CaseInput {
        id: id.into(),
        channels: vec![image("p.nii.gz", &g, img.clone())],
        channel_names: vec!["CT".into()],
        label: label.clone(),
        label_geometry: g.clone(),
    };
    let mut plan = ct_plan(None);
    plan.seed = 3;
    let a = preprocess(&mk("a"), &plan).unwrap();
    assert!(a.class_voxels[&1] > 10_000);
    assert!(
        a == preprocess(&mk("a"), &plan).unwrap(),
        "same input, same output"
    );
    let b = preprocess(&mk("b"), &plan).unwrap();
    assert_eq!(a.class_voxels, b.class_voxels);
    assert!(
        a.class_locations[&1] != b.class_locations[&1],
        "case id changes the sample"
    );
    plan.seed = 4;
    let c = preprocess(&mk("a"), &plan).unwrap();
    assert!(
        a.class_locations[&1] != c.class_locations[&1],
        "seed changes the sample"
    );
}

#[test]
fn inconsistent_cases_are_rejected() {
    let plan = ct_plan(None);
    // Second channel on another grid.
    let mut input = block_case([1.0, 1.0, 1.0], true);
    let mut other = input.channels[0].clone();
    other.path = PathBuf::from("case_007_0001.nii.gz");
    other.geometry.affine[0][3] += 2.0;
    input.channels.push(other);
    input.channel_names.push("CT".into());
    let mut plan2 = plan.clone();
    plan2.schemes.push(NormScheme::Ct);
    plan2.ct_stats.push(plan.ct_stats[0]);
    let err = preprocess(&input, &plan2).unwrap_err();
    assert!(matches!(err, VolumeError::GridMismatch { .. }), "{err}");
    assert!(err.to_string().contains("case_007_0001.nii.gz"), "{err}");

    // Label on another grid.
    let mut input = block_case([1.0, 1.0, 1.0], true);
    input.label_geometry.affine[1][1] = -1.0;
    let err = preprocess(&input, &plan).unwrap_err();
    assert!(
        err.to_string().contains("label is not on the grid"),
        "{err}"
    );

    // Label of the wrong size.
    let mut input = block_case([1.0, 1.0, 1.0], true);
    input.label = LabelData::U8(vec![0; 5]);
    assert!(matches!(
        preprocess(&input, &plan),
        Err(VolumeError::InvalidCase { .. })
    ));

    // CT without statistics, and plan/channel count mismatch.
    let input = block_case([1.0, 1.0, 1.0], true);
    let mut no_stats = plan.clone();
    no_stats.ct_stats = vec![None];
    let err = preprocess(&input, &no_stats).unwrap_err();
    assert!(err.to_string().contains("no CT statistics"), "{err}");
    let mut short = plan.clone();
    short.schemes.clear();
    assert!(matches!(
        preprocess(&input, &short),
        Err(VolumeError::InvalidCase { .. })
    ));
    let mut bad_target = plan.clone();
    bad_target.target_spacing = Some([0.0, 1.0, 1.0]);
    assert!(preprocess(&input, &bad_target).is_err());
}

#[test]
fn narrowing_picks_the_smallest_type() {
    let cases: [(Vec<i32>, DType); 6] = [
        (vec![0, 255], DType::U8),
        (vec![-128, 127], DType::I8),
        (vec![0, 65535], DType::U16),
        (vec![-1024, 3071], DType::I16),
        (vec![-1, 40000], DType::I32),
        (vec![i32::MIN, 0], DType::I32),
    ];
    for (v, dtype) in cases {
        let out = narrow_for_storage(VoxelData::I32(v.clone()));
        assert_eq!(out.dtype(), dtype, "{v:?}");
        for (i, &x) in v.iter().enumerate() {
            assert_eq!(out.get_f64(i), f64::from(x));
        }
    }
    assert_eq!(
        narrow_for_storage(VoxelData::U32(vec![0, u32::MAX])).dtype(),
        DType::U32
    );
    assert_eq!(
        narrow_for_storage(VoxelData::U16(vec![3, 9])),
        VoxelData::U8(vec![3, 9])
    );
    assert_eq!(
        narrow_for_storage(VoxelData::F64(vec![0.5, -2.25])),
        VoxelData::F32(vec![0.5, -2.25])
    );
    assert_eq!(
        narrow_for_storage(VoxelData::F32(vec![1.0])),
        VoxelData::F32(vec![1.0])
    );
}

#[test]
fn phantom_dataset_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let spec = PhantomSpec {
        shape: [20, 40, 48],
        spacing: [2.5, 1.0, 1.0],
        ..PhantomSpec::default()
    };
    crate::phantom::write_phantom_dataset(dir.path(), 2, &spec).unwrap();
    let mut samples = Vec::new();
    let mut cases = Vec::new();
    for i in 0..2 {
        let img = dir
            .path()
            .join(format!("imagesTr/phantom_{i:03}_0000.nii.gz"));
        let lab = dir.path().join(format!("labelsTr/phantom_{i:03}.nii.gz"));
        let case = load_case(&format!("phantom_{i:03}"), &[&img], &["CT"], &lab).unwrap();
        samples.extend(crate::locations::foreground_samples(
            &case.channels[0].data,
            &case.label,
            10_000,
            i,
        ));
        cases.push(case);
    }
    let stats = CtStats::from_samples(&samples).unwrap();
    assert!(stats.p00_5 < stats.mean && stats.mean < stats.p99_5);
    let plan = PreprocessPlan {
        target_spacing: Some(crate::stats::median_spacing(&[
            [2.5, 1.0, 1.0],
            [2.5, 1.0, 1.0],
        ])),
        schemes: vec![crate::stats::Modality::parse("CT").scheme()],
        ct_stats: vec![Some(stats)],
        interp: Interp::default(),
        seed: 1,
        use_mask_for_norm: Vec::new(),
    };
    for case in &cases {
        let out = preprocess(case, &plan).unwrap();
        assert!(!out.resampled);
        assert_eq!(out.channels[0].dtype(), DType::I16);
        for c in 1..=4u16 {
            assert!(out.class_locations.contains_key(&c), "class {c} sampled");
        }
    }
}

#[test]
fn real_int32_ct_is_stored_as_i16() {
    let Some(root) = crate::nifti::tests::shared_data() else {
        return;
    };
    let case = load_case(
        "example_ct",
        &[&root.join("ct_totalseg/example_ct.nii.gz")],
        &["CT"],
        &root.join("ct_totalseg/example_seg_fast_force_split.nii.gz"),
    )
    .unwrap();
    assert_eq!(case.channels[0].source_dtype, DType::I32);
    let samples =
        crate::locations::foreground_samples(&case.channels[0].data, &case.label, 5000, 0);
    let stats = CtStats::from_samples(&samples).unwrap();
    let mut plan = ct_plan(None);
    plan.ct_stats = vec![Some(stats)];
    let out = preprocess(&case, &plan).unwrap();
    assert_eq!(out.channels[0].dtype(), DType::I16);
    assert_eq!(
        out.class_voxels.values().sum::<u64>(),
        out.label.len() as u64
    );
    for (c, locs) in &out.class_locations {
        assert_eq!(locs.len() as u64, locations_to_keep(out.class_voxels[c]));
    }
    // Resampled to 2 mm: f32, identity map, shape by the rounding rule.
    plan.target_spacing = Some([2.0, 2.0, 2.0]);
    let res = preprocess(&case, &plan).unwrap();
    assert!(res.resampled);
    let cropped: [usize; 3] = out.shape;
    let want: [usize; 3] = std::array::from_fn(|a| {
        ((cropped[a] as f64 * case.channels[0].geometry.spacing[a] / 2.0).round() as usize).max(1)
    });
    assert_eq!(res.shape, want);
    assert_eq!(res.channels[0].dtype(), DType::F32);
}

proptest! {
    #[test]
    fn crop_never_removes_a_non_zero_voxel(
        shape in proptest::array::uniform3(1usize..9),
        points in proptest::collection::vec((0usize..9, 0usize..9, 0usize..9, 1i16..100), 0..6),
    ) {
        let n: usize = shape.iter().product();
        let mut v = vec![0i16; n];
        for &(z, y, x, val) in &points {
            if z < shape[0] && y < shape[1] && x < shape[2] {
                v[(z * shape[1] + y) * shape[2] + x] = val;
            }
        }
        match nonzero_bbox(&v, shape) {
            None => prop_assert!(v.iter().all(|&x| x == 0)),
            Some(b) => {
                let cropped = crop(&v, shape, b);
                // Every non-zero voxel is inside, so the crop keeps all of them...
                prop_assert_eq!(
                    cropped.iter().filter(|&&x| x != 0).count(),
                    v.iter().filter(|&&x| x != 0).count()
                );
                // ...and the box is tight: each face holds a non-zero voxel.
                for axis in 0..3 {
                    for face in [b[axis][0], b[axis][1] - 1] {
                        let mut found = false;
                        for z in b[0][0]..b[0][1] {
                            for y in b[1][0]..b[1][1] {
                                for x in b[2][0]..b[2][1] {
                                    let c = [z, y, x];
                                    if c[axis] == face && v[(z * shape[1] + y) * shape[2] + x] != 0 {
                                        found = true;
                                    }
                                }
                            }
                        }
                        prop_assert!(found);
                    }
                }
            }
        }
    }
}

#[test]
fn resampled_grids_beyond_the_voxel_limit_are_refused() {
    // A voxel size in micrometres read as millimetres: 4096 mm voxels resampled to 1 mm would
    // need 2^36 voxels even for a one-voxel crop.
    let mut case = block_case([4096.0, 4096.0, 4096.0], true);
    let g = geometry([10, 12, 14], [4096.0, 4096.0, 4096.0]);
    case.channels[0].geometry = g.clone();
    case.label_geometry = g;
    let err = preprocess(&case, &ct_plan(Some([1.0, 1.0, 1.0]))).unwrap_err();
    assert!(
        matches!(&err, VolumeError::InvalidCase { reason, .. }
            if reason.contains("pixdim") && reason.contains(&crate::MAX_VOXELS.to_string())),
        "{err}"
    );
    // Spacings so large that the shape arithmetic itself would overflow.
    let g = geometry([10, 12, 14], [1.0e300, 1.0e300, 1.0e300]);
    case.channels[0].geometry = g.clone();
    case.label_geometry = g;
    assert!(matches!(
        preprocess(&case, &ct_plan(Some([1.0e-300, 1.0, 1.0]))),
        Err(VolumeError::InvalidCase { .. })
    ));
}

/// A `[12, 12, 12]` MR case for the non-zero mask: a hollow-cored "head" of intensities
/// `z 2..10, y 2..10, x 2..10` whose centre `4..8` is zero (a hole the mask fills), a zero
/// notch on one face reaching the box edge (outside the mask), class 1 inside and class 3 at a
/// zero voxel outside the mask (kept, as nnU-Net only marks `seg == 0`).
fn head_case(spacing: [f64; 3]) -> CaseInput {
    let shape = [12, 12, 12];
    let g = geometry(shape, spacing);
    let idx = |z: usize, y: usize, x: usize| (z * 12 + y) * 12 + x;
    let mut mr = vec![0u16; g.voxels()];
    let mut label = vec![0u8; g.voxels()];
    for z in 2..10 {
        for y in 2..10 {
            for x in 2..10 {
                let core = (4..8).contains(&z) && (4..8).contains(&y) && (4..8).contains(&x);
                let notch = x == 2 && (3..5).contains(&y) && (3..5).contains(&z);
                if !core && !notch {
                    mr[idx(z, y, x)] = (100 + 7 * z + 3 * y + x) as u16;
                }
            }
        }
    }
    for z in 5..7 {
        for y in 5..7 {
            for x in 3..6 {
                label[idx(z, y, x)] = 1;
            }
        }
    }
    label[idx(3, 3, 2)] = 3; // in the notch: image 0, outside the mask, labelled
    CaseInput {
        id: "head_001".into(),
        channels: vec![image("head_001_0000.nii.gz", &g, VoxelData::U16(mr))],
        channel_names: vec!["T1".into()],
        label: LabelData::U8(label),
        label_geometry: g,
    }
}

fn mr_plan(target: Option<[f64; 3]>, masked: bool) -> PreprocessPlan {
    PreprocessPlan {
        target_spacing: target,
        schemes: vec![NormScheme::ZScore],
        ct_stats: vec![None],
        interp: Interp::Cubic,
        seed: 3,
        use_mask_for_norm: vec![masked],
    }
}

#[test]
fn mask_for_norm_marks_outside_and_takes_statistics_inside() {
    let input = head_case([1.0, 1.0, 1.0]);
    let out = preprocess(&input, &mr_plan(None, true)).unwrap();
    assert_eq!(out.crop_box, [[2, 10], [2, 10], [2, 10]]);
    assert_eq!(out.outside_mask_label, Some(254));
    let idx = |z: usize, y: usize, x: usize| (z * 8 + y) * 8 + x;
    // Cropped coordinates: the core (2..6) is a filled hole, the notch (x 0, y 1..3, z 1..3)
    // touches the box face, so it is outside; the class-3 voxel there keeps its class.
    assert_eq!(out.label.get(idx(2, 2, 2)), 0, "filled hole is inside");
    assert_eq!(out.label.get(idx(2, 1, 0)), 254, "notch is outside");
    assert_eq!(
        out.label.get(idx(1, 1, 0)),
        3,
        "labelled voxels are never marked"
    );
    let marked = (0..out.label.len())
        .filter(|&i| out.label.get(i) == 254)
        .count();
    assert_eq!(marked, 3, "the notch has 4 voxels, one of them labelled");
    // Statistics over every voxel without the marker (holes and the labelled zero included).
    let VoxelData::U8(v) = &out.channels[0] else {
        panic!("u16 values below 256 are narrowed to u8")
    };
    let inside: Vec<f64> = (0..v.len())
        .filter(|&i| out.label.get(i) != 254)
        .map(|i| f64::from(v[i]))
        .collect();
    let n = inside.len() as f64;
    let mean = inside.iter().sum::<f64>() / n;
    let std = (inside.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert_eq!(out.norms[0].mean, mean as f32);
    assert_eq!(out.norms[0].inv_std, (1.0 / std) as f32);
    // Stored values outside are 0, so serving 0 there is nnU-Net's untouched value.
    for (i, &x) in v.iter().enumerate() {
        if out.label.get(i) == 254 {
            assert_eq!(x, 0);
        }
    }
    // Marker voxels count as background; no class or location for the marker.
    assert_eq!(out.class_voxels.values().sum::<u64>(), 512);
    assert!(!out.class_voxels.contains_key(&254));
    assert!(!out.class_locations.contains_key(&254));
    assert_eq!(out.class_voxels[&3], 1);
    assert_eq!(out.class_voxels[&1], 12);

    // Without the mask: no marker, whole-box statistics, the same crop.
    let plain = preprocess(&input, &mr_plan(None, false)).unwrap();
    assert_eq!(plain.outside_mask_label, None);
    assert_eq!(plain.class_voxels, out.class_voxels);
    assert_ne!(plain.norms[0], out.norms[0]);
    assert_eq!(plain.label.get(idx(2, 1, 0)), 0);
}

#[test]
fn mask_for_norm_in_the_resampled_path_keeps_zero_outside_before_resampling() {
    let input = head_case([1.0, 1.0, 1.0]);
    let target = [0.5, 1.0, 1.0];
    let out = preprocess(&input, &mr_plan(Some(target), true)).unwrap();
    assert!(out.resampled);
    assert_eq!(out.outside_mask_label, Some(254));
    assert!(out.norms[0].is_identity());
    assert_eq!(out.norms[0].scheme, NormScheme::ZScore);
    // By hand: crop, mark, normalise inside only, then resample image and label.
    let deferred = preprocess(&input, &mr_plan(None, true)).unwrap();
    let VoxelData::U8(src) = &deferred.channels[0] else {
        unreachable!()
    };
    let norm = deferred.norms[0];
    let normalised: Vec<f32> = src
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if deferred.label.get(i) == 254 {
                0.0
            } else {
                norm.apply(f32::from(x))
            }
        })
        .collect();
    let shape = [16, 8, 8];
    assert_eq!(out.shape, shape);
    let want = resample_f32(&normalised, [8, 8, 8], shape, [Kernel::Cubic; 3]);
    let VoxelData::F32(v) = &out.channels[0] else {
        panic!("resampled channels are f32")
    };
    assert_eq!(v, &want);
    assert_eq!(
        out.label,
        crate::resample::resample_labels(&deferred.label, [8, 8, 8], shape)
    );
    assert!(!out.class_locations.contains_key(&254));
}

#[test]
fn mask_for_norm_is_refused_for_ct_channels_and_wrong_lengths() {
    let input = block_case([1.0, 1.0, 1.0], true);
    let mut plan = ct_plan(None);
    plan.use_mask_for_norm = vec![true];
    let err = preprocess(&input, &plan).unwrap_err().to_string();
    assert!(err.contains("use_mask_for_norm"), "{err}");
    plan.use_mask_for_norm = vec![false, false];
    let err = preprocess(&input, &plan).unwrap_err().to_string();
    assert!(
        err.contains("2 use_mask_for_norm entries for 1 channels"),
        "{err}"
    );
    plan.use_mask_for_norm = vec![false];
    assert_eq!(preprocess(&input, &plan).unwrap().outside_mask_label, None);
}

//! nnU-Net's outside-mask marker served end to end: cases whose label carries
//! `outside_mask_label` are served with label 0 there, image 0 in their deferred z-score
//! channels and the usual values elsewhere, plain and augmented (zeroed before the spatial
//! transforms, label cleared after them), compared bit for bit with a reference written here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};
use patchflow_augment::{
    AugmentSpec, MirrorSpec, RotationSpec, ScalingSpec, Scratch, Source, Target, apply, source_box,
};
use patchflow_sampler::{Batch, BatchRequest, Dataset, ItemMeta, OutputDType, Policy, Sampler};
use patchflow_store::{
    CaseData, ChunkCache, MANIFEST_FORMAT, Manifest, ManifestCase, WriteOptions, case_file_name,
    write_case,
};
use patchflow_testkit::synthetic::{MemCase, make_case};
use patchflow_volume::{DType, LabelData, NormScheme, VoxelData};

/// `make_case` with background voxels of an outer slab (`z >= shape_z - 3`) and of the `x = 0`
/// face marked with `marker`, every channel 0 there (as ingest stores them: no channel is
/// non-zero outside nnU-Net's mask).
fn masked_case(
    id: &str,
    shape: [usize; 3],
    seed: u64,
    second: Option<u16>,
    marker: u16,
) -> MemCase {
    let mut case = make_case(id, shape, seed, second);
    let n: usize = shape.iter().product();
    let outside: Vec<bool> = (0..n)
        .map(|i| {
            let (z, x) = (i / (shape[1] * shape[2]), i % shape[2]);
            case.label.get(i) == 0 && (z + 3 >= shape[0] || x == 0)
        })
        .collect();
    match &mut case.label {
        LabelData::U8(v) => {
            for (l, &o) in v.iter_mut().zip(&outside) {
                if o {
                    *l = u8::try_from(marker).expect("u8 marker");
                }
            }
        }
        LabelData::U16(v) => {
            for (l, &o) in v.iter_mut().zip(&outside) {
                if o {
                    *l = marker;
                }
            }
        }
    }
    for data in &mut case.channels {
        match data {
            VoxelData::I16(v) => v.iter_mut().zip(&outside).for_each(|(x, &o)| {
                if o {
                    *x = 0;
                }
            }),
            VoxelData::F32(v) => v.iter_mut().zip(&outside).for_each(|(x, &o)| {
                if o {
                    *x = 0.0;
                }
            }),
            other => panic!("unexpected channel type {:?}", other.dtype()),
        }
    }
    // Marker voxels were background and stay counted as background: class_voxels unchanged.
    case.meta.outside_mask_label = Some(marker);
    case
}

/// Class locations of a case: every voxel of each class, the marker left out.
fn locations(case: &MemCase) -> BTreeMap<u16, Vec<[u32; 3]>> {
    let s = case.meta.shape;
    let mut out: BTreeMap<u16, Vec<[u32; 3]>> = BTreeMap::new();
    for i in 0..case.label.len() {
        let c = case.label.get(i);
        if c != 0 && Some(c) != case.meta.outside_mask_label {
            let (z, y, x) = (i / (s[1] * s[2]), (i / s[2]) % s[1], i % s[2]);
            out.entry(c)
                .or_default()
                .push([z as u32, y as u32, x as u32]);
        }
    }
    out
}

fn write_store(dir: &Path, cases: &[MemCase]) {
    let opts = WriteOptions {
        chunk_shape: [4, 5, 6],
        ..WriteOptions::default()
    };
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        dataset: "masked".into(),
        plan: serde_json::Value::Null,
        cases: Vec::new(),
    };
    for case in cases {
        let file = case_file_name(&case.meta.id);
        let locs = locations(case);
        let data = CaseData {
            meta: &case.meta,
            channels: &case.channels,
            label: &case.label,
            class_locations: &locs,
        };
        let report = write_case(&dir.join(&file), &data, &opts).expect("write case");
        manifest.cases.push(ManifestCase {
            id: case.meta.id.clone(),
            file,
            stored_bytes: report.stored_bytes,
            source: serde_json::Value::Null,
        });
    }
    manifest.save(dir).expect("manifest");
}

struct Fixture {
    _dir: tempfile::TempDir,
    cases: Vec<MemCase>,
    sampler: Sampler,
}

fn fixture(cases: Vec<MemCase>) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    write_store(dir.path(), &cases);
    let ds = Dataset::open("masked", dir.path(), ChunkCache::new(1 << 20)).expect("open");
    Fixture {
        _dir: dir,
        cases,
        sampler: Sampler::new(Arc::new(ds)),
    }
}

/// The reference source of one item over `size` voxels at `origin`, before augmentation:
/// channels normalised, 0 outside the volume, and 0 at the marker in z-score channels; labels
/// as stored (marker kept), `ignore` outside the volume.
fn reference_source(
    case: &MemCase,
    origin: [i64; 3],
    size: [usize; 3],
    ignore: u16,
) -> (Vec<f32>, Vec<u16>) {
    let marker = case.meta.outside_mask_label;
    let mut label = Vec::new();
    for z in 0..size[0] as i64 {
        for y in 0..size[1] as i64 {
            for x in 0..size[2] as i64 {
                label.push(
                    case.label_at(origin[0] + z, origin[1] + y, origin[2] + x)
                        .unwrap_or(ignore),
                );
            }
        }
    }
    let mut image = Vec::new();
    for (c, data) in case.channels.iter().enumerate() {
        let norm = case.meta.channels[c].norm;
        let masked = norm.scheme == NormScheme::ZScore && marker.is_some();
        let mut k = 0;
        for z in 0..size[0] as i64 {
            for y in 0..size[1] as i64 {
                for x in 0..size[2] as i64 {
                    let v = match case.index(origin[0] + z, origin[1] + y, origin[2] + x) {
                        Some(_) if masked && Some(label[k]) == marker => 0.0,
                        Some(i) => norm.apply(data.get_f64(i) as f32),
                        None => 0.0,
                    };
                    image.push(v);
                    k += 1;
                }
            }
        }
    }
    (image, label)
}

fn clear(label: &mut [u16], marker: Option<u16>) {
    for l in label {
        if Some(*l) == marker {
            *l = 0;
        }
    }
}

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

fn round(v: f32, dtype: OutputDType) -> f32 {
    match dtype {
        OutputDType::F32 => v,
        OutputDType::F16 => f16::from_f32(v).to_f32(),
        OutputDType::BF16 => bf16::from_f32(v).to_f32(),
    }
}

fn case_of<'a>(fx: &'a Fixture, item: &ItemMeta) -> &'a MemCase {
    assert!(fx.sampler.dataset().case_index(&item.case_id).is_some());
    fx.cases
        .iter()
        .find(|c| c.meta.id == item.case_id)
        .expect("known case")
}

/// Every item of a plain batch equals the reference crop: marker cleared, z-score channels 0.
fn check_plain(fx: &Fixture, batch: &Batch) -> usize {
    let ds = fx.sampler.dataset();
    let patch = batch.patch.axes();
    let voxels: usize = patch.iter().product();
    let channels = ds.num_channels();
    let (image, labels) = (served_image(batch), served_labels(batch));
    let mut marked = 0;
    for (i, item) in batch.items.iter().enumerate() {
        let case = case_of(fx, item);
        let marker = case.meta.outside_mask_label;
        let (want_img, mut want_lab) =
            reference_source(case, item.origin, patch, ds.ignore_label());
        marked += want_lab.iter().filter(|&&l| Some(l) == marker).count();
        clear(&mut want_lab, marker);
        assert_eq!(
            &labels[i * voxels..(i + 1) * voxels],
            want_lab.as_slice(),
            "labels of item {i} ({})",
            item.case_id
        );
        let got = &image[i * channels * voxels..(i + 1) * channels * voxels];
        for (k, (g, w)) in got.iter().zip(&want_img).enumerate() {
            assert_eq!(
                g.to_bits(),
                round(*w, batch.dtype).to_bits(),
                "image of item {i} ({}) at {k}, {}",
                item.case_id,
                batch.dtype
            );
        }
    }
    marked
}

fn request(patch: [usize; 3], batch: usize, policy: Policy, dtype: OutputDType) -> BatchRequest {
    BatchRequest {
        patch: patchflow_grid::Patch::new(patch).unwrap(),
        batch,
        policy,
        crops_per_case: 1,
        dtype,
        seed: 77,
        cases: None,
        augment: None,
    }
}

#[test]
fn plain_batches_serve_zero_outside_the_mask() {
    // u8 labels (marker 254) beside a case without a marker.
    let fx = fixture(vec![
        masked_case("m", [12, 20, 17], 1, Some(2), 254),
        make_case("n", [9, 14, 22], 2, Some(2)),
    ]);
    let ds = fx.sampler.dataset();
    assert_eq!(ds.label_dtype(), DType::U8);
    assert_eq!(ds.classes(), vec![1, 2], "the marker is no class");
    let mut marked = 0;
    for dtype in [OutputDType::F32, OutputDType::F16, OutputDType::BF16] {
        for (patch, policy) in [
            ([6, 7, 8], Policy::Uniform),
            ([13, 22, 19], Policy::ForegroundOversample { fraction: 0.5 }),
            ([4, 25, 3], Policy::Uniform),
        ] {
            let req = request(patch, 4, policy, dtype);
            for index in 0..6 {
                let batch = fx.sampler.sample(&req, index).expect("sample");
                marked += check_plain(&fx, &batch);
            }
        }
    }
    assert!(marked > 1000, "the batches covered marker voxels: {marked}");
}

#[test]
fn wide_labels_keep_a_wide_marker() {
    let fx = fixture(vec![masked_case("w", [10, 12, 9], 7, Some(300), 65534)]);
    let ds = fx.sampler.dataset();
    assert_eq!(ds.label_dtype(), DType::U16);
    let mut marked = 0;
    for index in 0..8 {
        let req = request([7, 9, 11], 3, Policy::Uniform, OutputDType::F32);
        marked += check_plain(&fx, &fx.sampler.sample(&req, index).expect("sample"));
    }
    assert!(marked > 0);
}

/// The reference augmentation of one item: `patchflow_augment::apply` on the reference source
/// (zeroed at the marker), the marker cleared afterwards; labels as `u16`.
fn augment_reference<L: patchflow_augment::Label>(
    params: &patchflow_augment::AugmentParams,
    src_img: &[f32],
    src_lab: Vec<L>,
    size: [usize; 3],
    patch: [usize; 3],
    ignore: L,
    widen: impl Fn(L) -> u16,
) -> (Vec<f32>, Vec<u16>) {
    let voxels: usize = patch.iter().product();
    let channels = src_img.len() / src_lab.len();
    let mut out_img = vec![0f32; channels * voxels];
    let mut out_lab = vec![ignore; voxels];
    apply(
        params,
        &Source {
            image: src_img,
            label: &src_lab,
            shape: size,
        },
        &mut Target {
            image: &mut out_img,
            label: &mut out_lab,
            shape: patch,
        },
        ignore,
        &mut Scratch::default(),
    )
    .expect("augment");
    (out_img, out_lab.into_iter().map(widen).collect())
}

/// Augmented batches of `fx` equal the reference, item by item, bit for bit; returns how many
/// items had marker voxels in their source region.
fn check_augmented(fx: &Fixture) -> usize {
    let ds = fx.sampler.dataset();
    let spec = AugmentSpec {
        rotation: RotationSpec {
            p: 0.8,
            ..RotationSpec::default()
        },
        scaling: ScalingSpec {
            p: 0.6,
            ..ScalingSpec::default()
        },
        mirror: MirrorSpec {
            p_per_axis: 0.5,
            axes: [true, true, true],
        },
        ..AugmentSpec::nnunet_default()
    };
    let patch = [9, 12, 10];
    let voxels: usize = patch.iter().product();
    let channels = ds.num_channels();
    let mut req = request(patch, 4, Policy::Uniform, OutputDType::F32);
    req.augment = Some(spec);
    let (mut spatial, mut marked_items) = (0, 0);
    for index in 0..12 {
        let batch = fx.sampler.sample(&req, index).expect("sample");
        let (image, labels) = (served_image(&batch), served_labels(&batch));
        for (i, item) in batch.items.iter().enumerate() {
            let case = case_of(fx, item);
            let marker = case.meta.outside_mask_label;
            let params = item.augment.as_ref().expect("drawn");
            spatial += usize::from(params.is_resampled());
            let (offset, size) = source_box(params, patch);
            let origin = [0, 1, 2].map(|a| item.origin[a] + offset[a]);
            let ignore = ds.ignore_label();
            let (src_img, src_lab) = reference_source(case, origin, size, ignore);
            marked_items += usize::from(src_lab.iter().any(|&l| Some(l) == marker));
            let (want_img, mut want_lab) = match ds.label_dtype() {
                DType::U16 => {
                    augment_reference(params, &src_img, src_lab, size, patch, ignore, |l| l)
                }
                _ => {
                    let narrow = src_lab.iter().map(|&l| l as u8).collect();
                    augment_reference(
                        params,
                        &src_img,
                        narrow,
                        size,
                        patch,
                        ignore as u8,
                        u16::from,
                    )
                }
            };
            clear(&mut want_lab, marker);
            assert_eq!(
                &labels[i * voxels..(i + 1) * voxels],
                want_lab.as_slice(),
                "labels of item {i} of batch {index}"
            );
            let got = &image[i * channels * voxels..(i + 1) * channels * voxels];
            let same = got
                .iter()
                .zip(&want_img)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(
                same,
                "image of item {i} of batch {index} ({})",
                item.case_id
            );
        }
    }
    assert!(spatial > 0, "some items were rotated or scaled");
    marked_items
}

#[test]
fn augmented_items_zero_the_source_then_clear_the_label() {
    let narrow = fixture(vec![
        masked_case("m", [12, 20, 17], 1, Some(2), 254),
        make_case("n", [9, 14, 22], 2, Some(2)),
    ]);
    assert!(check_augmented(&narrow) > 0);
    let wide = fixture(vec![masked_case("w", [10, 12, 9], 7, Some(300), 65534)]);
    assert_eq!(wide.sampler.dataset().label_dtype(), DType::U16);
    assert!(check_augmented(&wide) > 0);
}

#[test]
fn identity_augmentation_equals_the_plain_masked_crop() {
    let fx = fixture(vec![masked_case("m", [12, 20, 17], 1, Some(2), 254)]);
    let plain = request([8, 9, 10], 3, Policy::Uniform, OutputDType::BF16);
    let mut aug = plain.clone();
    aug.augment = Some(AugmentSpec::default());
    for index in 0..4 {
        let a = fx.sampler.sample(&plain, index).expect("plain");
        let b = fx.sampler.sample(&aug, index).expect("augmented");
        assert_eq!(a.image, b.image);
        assert_eq!(a.label, b.label);
        check_plain(&fx, &a);
    }
}

#[test]
fn whole_cases_read_for_validation_equal_a_whole_volume_patch() {
    let fx = fixture(vec![masked_case("m", [12, 20, 17], 1, Some(2), 254)]);
    let ds = fx.sampler.dataset();
    let case = &fx.cases[0];
    let shape = case.meta.shape;
    let n: usize = shape.iter().product();
    // What a whole-case reader holds: normalised channels and stored labels.
    let mut image: Vec<f32> = Vec::new();
    for (c, data) in case.channels.iter().enumerate() {
        let norm = case.meta.channels[c].norm;
        image.extend((0..n).map(|i| norm.apply(data.get_f64(i) as f32)));
    }
    let mut label: Vec<u16> = (0..n).map(|i| case.label.get(i)).collect();
    assert!(label.contains(&254));
    ds.clear_outside_mask(0, &mut image, &mut label);
    let req = request(shape, 1, Policy::Uniform, OutputDType::F32);
    let batch = fx.sampler.sample(&req, 0).expect("sample");
    assert_eq!(batch.items[0].origin, [0, 0, 0]);
    assert_eq!(served_labels(&batch), label);
    let served = served_image(&batch);
    assert!(
        served
            .iter()
            .zip(&image)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

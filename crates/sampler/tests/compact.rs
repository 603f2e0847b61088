//! Compact batches (items in their stored integer type) normalised by the receiver's code give
//! the bits the sampler serves, for every output type, with padding and mixed forms.

use std::sync::Arc;

use patchflow_sampler::{BatchRequest, Dataset, OutputDType, Patch, Policy, Sampler};
use patchflow_store::ChunkCache;
use patchflow_testkit::synthetic::{MemCase, make_case, write_store};
use patchflow_volume::convert::{convert_box, expand_box, inside, region_voxels};
use patchflow_volume::{DType, VoxelData};

/// One channel of `case` kept, stored as `dtype` (values folded into its range).
fn one_channel(mut case: MemCase, dtype: DType) -> MemCase {
    let VoxelData::I16(values) = &case.channels[0] else {
        panic!("channel 0 of a synthetic case is i16");
    };
    let data = match dtype {
        DType::I16 => VoxelData::I16(values.clone()),
        DType::U8 => VoxelData::U8(values.iter().map(|&v| (v.rem_euclid(256)) as u8).collect()),
        DType::F32 => VoxelData::F32(values.iter().map(|&v| f32::from(v) * 0.25).collect()),
        other => panic!("no such case type {other:?}"),
    };
    case.channels = vec![data];
    case.meta.channels.truncate(1);
    case.meta.channels[0].dtype = dtype;
    case
}

/// A store of `cases` in a temporary folder and a sampler over it.
fn sampler_of(cases: &[MemCase]) -> (tempfile::TempDir, Sampler) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_store(dir.path(), cases);
    let ds = Dataset::open("compact", dir.path(), ChunkCache::new(1 << 20)).expect("open");
    (dir, Sampler::new(Arc::new(ds)))
}

/// A plain request over every case.
fn request(patch: [usize; 3], batch: usize, policy: Policy, dtype: OutputDType) -> BatchRequest {
    BatchRequest {
        patch: Patch::new(patch).expect("patch"),
        batch,
        policy,
        crops_per_case: 1,
        dtype,
        seed: 5,
        cases: None,
        augment: None,
    }
}

#[test]
fn compact_batches_convert_to_the_served_bits() {
    let cases = vec![
        one_channel(make_case("i16", [12, 20, 17], 1, Some(2)), DType::I16),
        one_channel(make_case("u8", [9, 14, 22], 2, Some(2)), DType::U8),
        one_channel(make_case("f32", [16, 11, 13], 3, None), DType::F32),
    ];
    let (_dir, sampler) = sampler_of(&cases);
    let mut forms_seen = std::collections::HashSet::new();
    for dtype in [OutputDType::F32, OutputDType::F16, OutputDType::BF16] {
        // Patches larger than some volumes: padding on every side.
        for patch in [[8, 8, 8], [14, 24, 9]] {
            let fraction = Policy::ForegroundOversample { fraction: 0.5 };
            let req = request(patch, 4, fraction, dtype);
            for index in 0..6 {
                let served = sampler.sample(&req, index).expect("sample");
                let compact = sampler
                    .sample_compact_into(&req, index, Vec::new(), Vec::new())
                    .expect("compact");
                assert_eq!(compact.batch.items, served.items);
                let voxels: usize = patch.iter().product();
                let mut offset = 0;
                let mut rebuilt = Vec::new();
                let (mut label_at, mut labels) = (0, Vec::new());
                for (item, form) in compact.stored.iter().enumerate() {
                    let case = &served.items[item].case_id;
                    let expect_stored = match case.as_str() {
                        "i16" => dtype == OutputDType::F32,
                        "u8" => true,
                        _ => false,
                    };
                    assert_eq!(form.is_some(), expect_stored, "{case} as {dtype}");
                    forms_seen.insert((case.clone(), form.as_ref().map(|f| f.dtype)));
                    let Some(form) = form else {
                        let len = voxels * dtype.size();
                        rebuilt.extend_from_slice(&compact.batch.image[offset..offset + len]);
                        offset += len;
                        labels.extend_from_slice(&compact.batch.label[label_at..label_at + voxels]);
                        label_at += voxels;
                        continue;
                    };
                    let region = inside(served.items[item].origin, patch, form.shape);
                    let len = region_voxels(&region) * form.dtype.size();
                    let src = &compact.batch.image[offset..offset + len];
                    offset += len;
                    let mut out = vec![0xAAu8; voxels * dtype.size()];
                    convert_box(
                        form.dtype,
                        src,
                        &form.norms[0],
                        dtype,
                        patch,
                        &region,
                        &mut out,
                    )
                    .expect("convert");
                    rebuilt.extend_from_slice(&out);
                    let inside_labels = region_voxels(&region);
                    let mut full = vec![0u8; voxels];
                    let src = &compact.batch.label[label_at..label_at + inside_labels];
                    expand_box(1, src, patch, &region, 0xFF, &mut full).expect("expand");
                    label_at += inside_labels;
                    labels.extend_from_slice(&full);
                }
                assert_eq!(label_at, compact.label_len);
                assert_eq!(labels, served.label, "labels of batch {index}");
                assert_eq!(offset, compact.image_len);
                assert!(rebuilt == served.image, "batch {index} {patch:?} {dtype}");
            }
        }
    }
    assert!(forms_seen.contains(&("i16".to_owned(), Some(DType::I16))));
    assert!(forms_seen.contains(&("u8".to_owned(), Some(DType::U8))));
    assert!(forms_seen.contains(&("f32".to_owned(), None)));
}

#[test]
fn augmented_requests_have_no_stored_items() {
    let cases = vec![one_channel(
        make_case("i16", [12, 20, 17], 1, Some(2)),
        DType::I16,
    )];
    let (_dir, sampler) = sampler_of(&cases);
    let mut req = request([8, 8, 8], 2, Policy::Uniform, OutputDType::F32);
    assert!(sampler.stored_form(&req, 0).is_some());
    req.augment = Some(patchflow_sampler::AugmentSpec::nnunet_default());
    assert!(sampler.stored_form(&req, 0).is_none());
}

#[test]
fn augmented_compact_batches_are_the_served_ones() {
    let cases = vec![one_channel(
        make_case("i16", [12, 20, 17], 1, Some(2)),
        DType::I16,
    )];
    let (_dir, sampler) = sampler_of(&cases);
    let req = BatchRequest {
        augment: Some(patchflow_sampler::AugmentSpec::nnunet_default()),
        ..request([8, 8, 8], 2, Policy::Uniform, OutputDType::F32)
    };
    for index in 0..4 {
        let compact = sampler
            .sample_compact_into(&req, index, Vec::new(), Vec::new())
            .expect("compact");
        assert!(compact.stored.iter().all(Option::is_none));
        assert_eq!(compact.batch, sampler.sample(&req, index).expect("sample"));
    }
}

//! Benchmarks of the volume hot paths: NIfTI reading, phantom generation, class locations,
//! resampling and preprocessing.
//!
//! The real-data benchmarks read `../shared/data` from the workspace root and are skipped when it
//! is absent.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};
use patchflow_volume::{
    CaseInput, CtStats, Interp, Kernel, NiftiImage, NormScheme, PhantomSpec, PreprocessPlan,
    class_locations, phantom, preprocess, read_label, read_nifti, resample_f32, write_nifti,
};

fn shared_data() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping real-data benchmarks: {} not found", dir.display());
        None
    }
}

fn spec_128() -> PhantomSpec {
    PhantomSpec {
        shape: [128, 128, 128],
        spacing: [1.0, 1.0, 1.0],
        seed: 1,
        lesions: 4,
    }
}

fn reading(c: &mut Criterion) {
    let mut group = c.benchmark_group("read");
    group.sample_size(10);
    if let Some(root) = shared_data() {
        let big = root.join("large_unlabeled/ch2better.nii.gz");
        if big.is_file() {
            group.bench_function("ch2better_35M_u8_gz", |b| {
                b.iter(|| black_box(read_nifti(&big).unwrap()))
            });
        }
        let ct = root.join("ct_totalseg/example_ct_dicom.nii.gz");
        if ct.is_file() {
            group.bench_function("ct_512x512x20_i16_gz", |b| {
                b.iter(|| black_box(read_nifti(&ct).unwrap()))
            });
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (g, image, label) = phantom(&spec_128());
    let gz = dir.path().join("p.nii.gz");
    let plain = dir.path().join("p.nii");
    let lab = dir.path().join("l.nii.gz");
    write_nifti(&gz, &g, &image).unwrap();
    write_nifti(&plain, &g, &image).unwrap();
    write_nifti(&lab, &g, &label.into_voxels()).unwrap();
    group.bench_function("phantom_128_i16_gz", |b| {
        b.iter(|| black_box(read_nifti(&gz).unwrap()))
    });
    group.bench_function("phantom_128_i16_plain", |b| {
        b.iter(|| black_box(read_nifti(&plain).unwrap()))
    });
    group.bench_function("phantom_128_label_gz", |b| {
        b.iter(|| black_box(read_label(&lab).unwrap()))
    });
    group.finish();
}

fn generating(c: &mut Criterion) {
    let mut group = c.benchmark_group("phantom");
    group.sample_size(10);
    let spec = spec_128();
    group.bench_function("generate_128", |b| b.iter(|| black_box(phantom(&spec))));
    let dir = tempfile::tempdir().unwrap();
    let (g, image, label) = phantom(&spec);
    let label = label.into_voxels();
    group.bench_function("generate_and_write_128", |b| {
        b.iter(|| {
            let (g2, i2, _) = phantom(&spec);
            write_nifti(&dir.path().join("i.nii.gz"), &g2, &i2).unwrap();
            write_nifti(&dir.path().join("l.nii.gz"), &g, &label).unwrap();
        })
    });
    black_box(image);
    group.finish();
}

fn sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("class_locations");
    group.sample_size(10);
    let (g, _, label) = phantom(&spec_128());
    group.bench_function("phantom_128", |b| {
        b.iter(|| black_box(class_locations(&label, g.shape, 7)))
    });
    if let Some(root) = shared_data() {
        let aal = root.join("brain_atlas/aal.nii.gz");
        if aal.is_file() {
            let (g, label) = read_label(&aal).unwrap();
            group.bench_function("aal_181x217x181_116_classes", |b| {
                b.iter(|| black_box(class_locations(&label, g.shape, 7)))
            });
        }
    }
    group.finish();
}

fn resampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("resample");
    group.sample_size(10);
    let shape = [64, 128, 128];
    let data: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| (i % 1013) as f32)
        .collect();
    for (name, kernel) in [("linear", Kernel::Linear), ("cubic", Kernel::Cubic)] {
        group.bench_function(format!("64x128x128_to_128x160x160_{name}"), |b| {
            b.iter(|| black_box(resample_f32(&data, shape, [128, 160, 160], [kernel; 3])))
        });
    }
    group.finish();
}

fn preprocessing(c: &mut Criterion) {
    let mut group = c.benchmark_group("preprocess");
    group.sample_size(10);
    let spec = PhantomSpec {
        spacing: [2.0, 1.0, 1.0],
        ..spec_128()
    };
    let (g, image, label) = phantom(&spec);
    let input = CaseInput {
        id: "bench".into(),
        channels: vec![NiftiImage {
            path: PathBuf::from("bench_0000.nii.gz"),
            geometry: g.clone(),
            data: image,
            source_dtype: patchflow_volume::DType::I16,
        }],
        channel_names: vec!["CT".into()],
        label,
        label_geometry: g,
    };
    let stats = CtStats {
        p00_5: -200.0,
        p99_5: 800.0,
        mean: 80.0,
        std: 150.0,
    };
    for (name, target) in [
        ("deferred", None),
        ("resampled_cubic", Some([1.0, 1.0, 1.0])),
    ] {
        let plan = PreprocessPlan {
            target_spacing: target,
            schemes: vec![NormScheme::Ct],
            ct_stats: vec![Some(stats)],
            interp: Interp::Cubic,
            seed: 0,
            use_mask_for_norm: Vec::new(),
        };
        group.bench_function(format!("phantom_128_{name}"), |b| {
            b.iter(|| black_box(preprocess(&input, &plan).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    reading,
    generating,
    sampling,
    resampling,
    preprocessing
);
criterion_main!(benches);

//! Writes the seed corpora of both fuzz targets from the synthetic phantom: small valid NIfTI
//! files (every element type, plain and gzip, image/label pairs, scaled and qform-only headers)
//! and small case files written by the store's own writer (several chunk shapes, one and two
//! channels). Run through `fuzz/seeds.sh`; the argument is the corpus root (default `corpus`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use patchflow_store::{CaseData, CaseMeta, WriteOptions, write_case};
use patchflow_volume::{
    CaseInput, CtStats, Geometry, Interp, LabelData, NiftiImage, NormScheme, PHANTOM_LABELS,
    PhantomSpec, PreprocessPlan, VoxelData, foreground_samples, phantom, preprocess, write_nifti,
};

type Error = Box<dyn std::error::Error>;

fn convert(data: &VoxelData, to: &str) -> VoxelData {
    let v: Vec<f64> = (0..data.len()).map(|i| data.get_f64(i)).collect();
    match to {
        "u8" => VoxelData::U8(v.iter().map(|&x| (x / 8.0 + 128.0) as u8).collect()),
        "i8" => VoxelData::I8(v.iter().map(|&x| (x / 16.0) as i8).collect()),
        "u16" => VoxelData::U16(v.iter().map(|&x| (x + 1024.0) as u16).collect()),
        "i16" => VoxelData::I16(v.iter().map(|&x| x as i16).collect()),
        "u32" => VoxelData::U32(v.iter().map(|&x| (x + 1024.0) as u32).collect()),
        "i32" => VoxelData::I32(v.iter().map(|&x| x as i32).collect()),
        "f32" => VoxelData::F32(v.iter().map(|&x| x as f32 * 0.5).collect()),
        _ => VoxelData::F64(v.iter().map(|&x| x * 0.25).collect()),
    }
}

fn nifti_bytes(dir: &Path, name: &str, g: &Geometry, data: &VoxelData) -> Result<Vec<u8>, Error> {
    let p = dir.join(name);
    write_nifti(&p, g, data)?;
    Ok(std::fs::read(p)?)
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(dir.join(name), bytes)?;
    Ok(())
}

fn nifti_seeds(out: &Path, tmp: &Path) -> Result<usize, Error> {
    let spec = PhantomSpec {
        shape: [6, 8, 8],
        spacing: [2.0, 1.0, 1.0],
        seed: 7,
        lesions: 1,
    };
    let (g, image, label) = phantom(&spec);
    let label = label.into_voxels();
    let mut n = 0;
    let label_nii = nifti_bytes(tmp, "label.nii", &g, &label)?;
    for (i, dtype) in ["i16", "u8", "i8", "u16", "u32", "i32", "f32", "f64"]
        .iter()
        .enumerate()
    {
        let data = convert(&image, dtype);
        let plain = nifti_bytes(tmp, "image.nii", &g, &data)?;
        let gz = nifti_bytes(tmp, "image.nii.gz", &g, &data)?;
        // Scheme and target bits vary with the element type, so every option is seeded.
        let options = ((i as u8 & 3) << 4) | (((i as u8 >> 1) & 3) << 2);
        // The file as it is (plain, then gzip), gzipped by the harness, and as a pair.
        save(
            out,
            &format!("{dtype}-plain"),
            &[&[options][..], &plain].concat(),
        )?;
        save(out, &format!("{dtype}-gz"), &[&[options][..], &gz].concat())?;
        save(
            out,
            &format!("{dtype}-harness-gz"),
            &[&[options | 1][..], &plain].concat(),
        )?;
        let len = u16::try_from(plain.len())?.to_le_bytes();
        let pair = [&[options | 2][..], &len, &plain, &label_nii].concat();
        save(out, &format!("{dtype}-pair"), &pair)?;
        n += 4;
    }
    // Header variants on an i16 image: intensity scaling, qform only, no transform at all.
    let plain = nifti_bytes(tmp, "image.nii", &g, &image)?;
    let mut scaled = plain.clone();
    scaled[112..116].copy_from_slice(&2.0f32.to_le_bytes());
    scaled[116..120].copy_from_slice(&(-1.0f32).to_le_bytes());
    let mut qform = plain.clone();
    qform[254..256].copy_from_slice(&0i16.to_le_bytes());
    let mut bare = qform.clone();
    bare[252..254].copy_from_slice(&0i16.to_le_bytes());
    for (name, bytes) in [("scaled", scaled), ("qform", qform), ("bare", bare)] {
        let len = u16::try_from(bytes.len())?.to_le_bytes();
        save(
            out,
            &format!("{name}-pair"),
            &[&[0x06][..], &len, &bytes, &label_nii].concat(),
        )?;
        n += 1;
    }
    // The label file alone (read as image and label).
    save(out, "label-only", &[&[0x14][..], &label_nii].concat())?;
    Ok(n + 1)
}

fn store_seed(
    out: &Path,
    tmp: &Path,
    name: &str,
    shape: [usize; 3],
    channels: usize,
    chunk: [usize; 3],
) -> Result<usize, Error> {
    let spec = PhantomSpec {
        shape,
        spacing: [2.5, 1.0, 1.0],
        seed: shape.iter().sum::<usize>() as u64,
        lesions: 2,
    };
    let (g, image, label) = phantom(&spec);
    let names: Vec<String> = ["CT", "T2"][..channels]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let schemes = [NormScheme::Ct, NormScheme::ZScore][..channels].to_vec();
    let ct = CtStats::from_samples(&foreground_samples(&image, &label, 10_000, 1));
    let plan = PreprocessPlan {
        target_spacing: None,
        ct_stats: schemes
            .iter()
            .map(|s| (*s == NormScheme::Ct).then_some(ct).flatten())
            .collect(),
        schemes,
        interp: Interp::Cubic,
        seed: 1,
        use_mask_for_norm: Vec::new(),
    };
    let img = NiftiImage {
        path: PathBuf::from("phantom_0000.nii.gz"),
        geometry: g.clone(),
        data: image,
        source_dtype: patchflow_volume::DType::I16,
    };
    let input = CaseInput {
        id: name.to_string(),
        channels: vec![img; channels],
        channel_names: names.clone(),
        label,
        label_geometry: g,
    };
    let pre = preprocess(&input, &plan)?;
    let label_names = PHANTOM_LABELS
        .iter()
        .map(|(c, n)| (*c, n.to_string()))
        .collect::<BTreeMap<_, _>>();
    let meta = CaseMeta::from_preprocessed(&pre, label_names);
    let path = tmp.join(format!("{name}.pfc"));
    let label: &LabelData = &pre.label;
    write_case(
        &path,
        &CaseData {
            meta: &meta,
            channels: &pre.channels,
            label,
            class_locations: &pre.class_locations,
        },
        &WriteOptions {
            chunk_shape: chunk,
            zstd_level: 1,
        },
    )?;
    let file = std::fs::read(&path)?;
    // As written (checksums must hold), and with checksum repair so mutations go deeper.
    for (flags, suffix) in [(0u8, "exact"), (3u8, "repaired")] {
        let seed = (file.len() as u64).wrapping_mul(0x9e37_79b9).to_le_bytes();
        save(
            out,
            &format!("{name}-{suffix}"),
            &[&[flags][..], &seed, &file].concat(),
        )?;
    }
    Ok(2)
}

fn main() -> Result<(), Error> {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let tmp = tempfile::tempdir()?;
    let nifti = root.join("nifti");
    let store = root.join("store_reader");
    std::fs::create_dir_all(&nifti)?;
    std::fs::create_dir_all(&store)?;
    let n = nifti_seeds(&nifti, tmp.path())?;
    let mut s = 0;
    s += store_seed(&store, tmp.path(), "small", [6, 10, 10], 1, [4, 4, 4])?;
    s += store_seed(&store, tmp.path(), "uneven", [7, 9, 11], 1, [3, 5, 8])?;
    s += store_seed(&store, tmp.path(), "twochannel", [5, 8, 8], 2, [4, 8, 8])?;
    s += store_seed(&store, tmp.path(), "onechunk", [6, 12, 12], 1, [32, 32, 32])?;
    println!(
        "wrote {n} seeds to {} and {s} seeds to {}",
        nifti.display(),
        store.display()
    );
    Ok(())
}

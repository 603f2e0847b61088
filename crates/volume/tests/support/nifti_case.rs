//! One robustness case for NIfTI reading and preprocessing, shared by the `nifti` fuzz target
//! (`fuzz/fuzz_targets/nifti.rs`) and the `fuzz_regressions` test, so that a saved input is
//! replayed through exactly the code that found it.
//!
//! Input layout (everything after the first byte is the file, or the two files):
//!
//! | bits of byte 0 | meaning |
//! | --- | --- |
//! | 0 | gzip the file(s) here before reading (the mutated bytes are the uncompressed NIfTI, and the gzip path is still exercised); when clear, the bytes are read as they are (gzip when they start with the gzip magic) |
//! | 1 | separate label file: bytes 1..3 are the image length (u16 LE), the label follows it; when clear, the image bytes are also read as the label |
//! | 2–3 | target spacing: none, `[1, 1, 1]`, the image spacing × `[2, 0.5, 1]`, or × `[4, 1, 1]` (anisotropic) |
//! | 4–5 | channels: one CT channel, one z-score channel, one unnormalised channel, or CT + z-score |
//! | 6 | linear instead of cubic interpolation |
//!
//! Reading always runs (the same functions ingest uses). Preprocessing runs when both files
//! read, lie on the same grid, and the case is small: at most [`PREPROCESS_MAX_VOXELS`] input
//! voxels and [`OUTPUT_MAX_VOXELS`] output voxels. A case whose output grid is beyond
//! [`patchflow_volume::MAX_VOXELS`] even for a one-voxel crop also runs: preprocessing must
//! refuse it quickly.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use patchflow_volume::{
    CaseInput, CtStats, Interp, LabelData, MAX_VOXELS, NormScheme, PreprocessPlan, check_same_grid,
    foreground_samples, needs_resampling, preprocess, read_label_bytes, read_nifti_bytes,
    resampled_shape,
};

/// Largest input volume that goes on to preprocessing.
pub const PREPROCESS_MAX_VOXELS: usize = 1 << 15;
/// Largest preprocessed grid a case may produce and still run.
pub const OUTPUT_MAX_VOXELS: usize = 1 << 16;

/// What happened to one input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the image read without error.
    pub image_ok: bool,
    /// Whether the label read without error.
    pub label_ok: bool,
    /// `None` when preprocessing was skipped, else whether it succeeded.
    pub preprocessed: Option<bool>,
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

fn voxels(shape: [usize; 3]) -> Option<usize> {
    shape[0].checked_mul(shape[1])?.checked_mul(shape[2])
}

/// Runs one input; panics only when a checked invariant of a successful result is broken.
pub fn run(data: &[u8]) -> Outcome {
    let mut outcome = Outcome::default();
    let Some((&mode, rest)) = data.split_first() else {
        return outcome;
    };
    let (image_bytes, label_bytes) = if mode & 2 != 0 {
        if rest.len() < 2 {
            return outcome;
        }
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (image, label) = rest[2..].split_at(n);
        (image, label)
    } else {
        (rest, rest)
    };
    let (image_bytes, label_bytes): (Cow<[u8]>, Cow<[u8]>) = if mode & 1 != 0 {
        (gzip(image_bytes).into(), gzip(label_bytes).into())
    } else {
        (image_bytes.into(), label_bytes.into())
    };

    let image_path = Path::new("case_0000.nii.gz");
    let label_path = Path::new("case.nii.gz");
    let image = read_nifti_bytes(&image_bytes, image_path);
    let label = read_label_bytes(&label_bytes, label_path);
    outcome.image_ok = image.is_ok();
    outcome.label_ok = label.is_ok();
    if let Ok(img) = &image {
        assert_eq!(img.data.len(), img.geometry.voxels(), "image voxel count");
        assert!(img.geometry.voxels() <= MAX_VOXELS);
    }
    if let Ok((g, l)) = &label {
        assert_eq!(l.len(), g.voxels(), "label voxel count");
    }
    let (Ok(image), Ok((label_geometry, label))) = (image, label) else {
        return outcome;
    };
    if check_same_grid(&image.geometry, &label_geometry, image_path, label_path).is_err() {
        return outcome;
    }
    let shape = image.geometry.shape;
    if voxels(shape).is_none_or(|v| v > PREPROCESS_MAX_VOXELS) {
        return outcome;
    }

    let spacing = image.geometry.spacing;
    let target = match (mode >> 2) & 3 {
        0 => None,
        1 => Some([1.0, 1.0, 1.0]),
        2 => Some([spacing[0] * 2.0, spacing[1] * 0.5, spacing[2]]),
        _ => Some([spacing[0] * 4.0, spacing[1], spacing[2]]),
    };
    if let Some(t) = target.filter(|&t| needs_resampling(spacing, t)) {
        // The output grid grows with the crop, so the full grid bounds it from above and a
        // one-voxel crop from below.
        let largest = voxels(resampled_shape(shape, spacing, t));
        let smallest = voxels(resampled_shape([1, 1, 1], spacing, t));
        let small = largest.is_some_and(|v| v <= OUTPUT_MAX_VOXELS);
        let refused = smallest.is_none_or(|v| v > MAX_VOXELS);
        if !small && !refused {
            return outcome;
        }
    }

    let schemes = match (mode >> 4) & 3 {
        0 => vec![NormScheme::Ct],
        1 => vec![NormScheme::ZScore],
        2 => vec![NormScheme::None],
        _ => vec![NormScheme::Ct, NormScheme::ZScore],
    };
    let samples = foreground_samples(&image.data, &label, 10_000, u64::from(mode));
    let ct = CtStats::from_samples(&samples);
    let plan = PreprocessPlan {
        target_spacing: target,
        ct_stats: schemes
            .iter()
            .map(|s| (*s == NormScheme::Ct).then_some(ct).flatten())
            .collect(),
        interp: if mode & 64 != 0 {
            Interp::Linear
        } else {
            Interp::Cubic
        },
        seed: u64::from(mode),
        use_mask_for_norm: Vec::new(),
        schemes,
    };
    let names = ["CT", "T2"];
    let input = CaseInput {
        id: "case".into(),
        channels: vec![image; plan.schemes.len()],
        channel_names: names[..plan.schemes.len()]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        label,
        label_geometry,
    };
    let result = preprocess(&input, &plan);
    outcome.preprocessed = Some(result.is_ok());
    if let Ok(pre) = result {
        let n = voxels(pre.shape).unwrap_or(usize::MAX);
        assert!(n >= 1 && n <= OUTPUT_MAX_VOXELS.max(PREPROCESS_MAX_VOXELS));
        assert_eq!(pre.label.len(), n, "label voxels");
        assert_eq!(pre.channels.len(), input.channels.len());
        for c in &pre.channels {
            assert_eq!(c.len(), n, "channel voxels");
        }
        let [[z0, z1], [y0, y1], [x0, x1]] = pre.crop_box;
        assert!(
            z0 < z1 && z1 <= shape[0] && y0 < y1 && y1 <= shape[1] && x0 < x1 && x1 <= shape[2]
        );
        let total: u64 = pre.class_voxels.values().sum();
        assert_eq!(total, n as u64, "class voxel counts");
        for (class, locs) in &pre.class_locations {
            assert!(*class > 0 && pre.class_voxels.contains_key(class));
            for p in locs {
                assert!((0..3).all(|a| (p[a] as usize) < pre.shape[a]));
                let i =
                    (p[0] as usize * pre.shape[1] + p[1] as usize) * pre.shape[2] + p[2] as usize;
                let v = match &pre.label {
                    LabelData::U8(v) => v.get(i).map(|&x| u16::from(x)),
                    LabelData::U16(v) => v.get(i).copied(),
                };
                assert_eq!(v, Some(*class), "class location holds its class");
            }
        }
    }
    outcome
}

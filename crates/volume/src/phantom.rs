//! A deterministic synthetic CT phantom with organ labels, for demos and for tests that must run
//! anywhere (no patient data).
//!
//! The phantom is an elliptic body in air with a fat rim and soft tissue, a liver, two kidneys, a
//! spine and a few small lesions inside the liver (a rare class, well under 1% of the voxels),
//! plus Gaussian-like noise. Organ positions and sizes jitter with the seed; the same seed always
//! gives the same voxels, and [`write_phantom_dataset`] writes byte-identical files.

use std::path::Path;

use rand::RngCore;
use serde::Serialize;

use crate::error::VolumeError;
use crate::locations::{case_seed, rng, splitmix64};
use crate::nifti::write_nifti;
use crate::types::{Geometry, LabelData, VoxelData};

/// Class indices and names of the phantom's label map.
pub const PHANTOM_LABELS: [(u16, &str); 5] = [
    (0, "background"),
    (1, "liver"),
    (2, "kidney"),
    (3, "bone"),
    (4, "lesion"),
];

/// Intensities in Hounsfield units.
const AIR: f64 = -1000.0;
const FAT: f64 = -100.0;
const SOFT_TISSUE: f64 = 40.0;
const LIVER: f64 = 60.0;
const KIDNEY: f64 = 30.0;
const BONE: f64 = 700.0;
const LESION: f64 = -10.0;
/// Standard deviation of the noise (HU).
const NOISE_SD: f64 = 15.0;

/// What phantom to make.
#[derive(Clone, Debug, PartialEq)]
pub struct PhantomSpec {
    /// Voxels per axis, `[z, y, x]` (each at least 1).
    pub shape: [usize; 3],
    /// Voxel size in millimetres, `[z, y, x]`.
    pub spacing: [f64; 3],
    /// Seed for organ jitter, lesion placement and noise.
    pub seed: u64,
    /// Number of lesions placed in the liver.
    pub lesions: usize,
}

impl Default for PhantomSpec {
    fn default() -> Self {
        PhantomSpec {
            shape: [64, 96, 96],
            spacing: [2.0, 1.0, 1.0],
            seed: 0,
            lesions: 4,
        }
    }
}

/// An axis-aligned ellipsoid in normalised coordinates (`[-1, 1]` across each axis), `[u, v, w]`
/// = `[x, y, z]`.
#[derive(Copy, Clone, Debug)]
struct Ellipsoid {
    centre: [f64; 3],
    inv_radius: [f64; 3],
}

impl Ellipsoid {
    fn new(centre: [f64; 3], radius: [f64; 3]) -> Self {
        Ellipsoid {
            centre,
            inv_radius: radius.map(|r| 1.0 / r),
        }
    }

    /// Squared normalised distance along one axis.
    #[inline(always)]
    fn term(&self, axis: usize, c: f64) -> f64 {
        let d = (c - self.centre[axis]) * self.inv_radius[axis];
        d * d
    }
}

/// Uniform in `[0, 1)`.
fn unit(r: &mut impl RngCore) -> f64 {
    (r.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Uniform in `[-amount, amount)`.
fn jitter(r: &mut impl RngCore, amount: f64) -> f64 {
    (unit(r) * 2.0 - 1.0) * amount
}

/// Gaussian-like noise from a counter: the sum of four 16-bit uniforms (Irwin–Hall), scaled to
/// [`NOISE_SD`].
#[inline(always)]
fn noise(seed: u64, i: u64) -> f64 {
    const MEAN: f64 = 4.0 * 32767.5;
    // Standard deviation of the sum of four uniforms over 0..65536.
    const SD: f64 = 37_837.228;
    let h = splitmix64(seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let s = (h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48);
    (s as f64 - MEAN) * (NOISE_SD / SD)
}

/// Builds a phantom: geometry (RAS, centred on the origin), CT image in HU as `I16` and the
/// label map as `U8` with the classes of [`PHANTOM_LABELS`].
pub fn phantom(spec: &PhantomSpec) -> (Geometry, VoxelData, LabelData) {
    let shape = spec.shape.map(|n| n.max(1));
    let [nz, ny, nx] = shape;
    let mut r = rng(spec.seed);

    let body_centre = [jitter(&mut r, 0.03), jitter(&mut r, 0.03)];
    let body_radius = [0.88 + jitter(&mut r, 0.04), 0.68 + jitter(&mut r, 0.04)];
    let mut organ = |c: [f64; 3], rad: [f64; 3], cj: f64| {
        let scale = 1.0 + jitter(&mut r, 0.1);
        let centre = [
            c[0] + jitter(&mut r, cj),
            c[1] + jitter(&mut r, cj),
            c[2] + jitter(&mut r, cj),
        ];
        (centre, rad.map(|x| x * scale))
    };
    let (liver_c, liver_r) = organ([0.32, 0.1, 0.15], [0.32, 0.3, 0.45], 0.05);
    let liver = Ellipsoid::new(liver_c, liver_r);
    let (kl_c, kl_r) = organ([-0.38, -0.32, -0.2], [0.11, 0.14, 0.28], 0.04);
    let (kr_c, kr_r) = organ([0.4, -0.34, -0.3], [0.11, 0.14, 0.28], 0.04);
    let kidneys = [Ellipsoid::new(kl_c, kl_r), Ellipsoid::new(kr_c, kr_r)];
    let (spine_c, spine_r) = organ([0.0, -0.52, 0.0], [0.09, 0.1, 1.0], 0.02);
    let spine = Ellipsoid::new(spine_c, spine_r);

    let norm = |i: usize, n: usize| (i as f64 + 0.5) / n as f64 * 2.0 - 1.0;
    let us: Vec<f64> = (0..nx).map(|x| norm(x, nx)).collect();
    let mut hu = vec![0.0f32; nz * ny * nx];
    let mut labels = vec![0u8; nz * ny * nx];
    for z in 0..nz {
        let w = norm(z, nz);
        let liver_w = liver.term(2, w);
        let kidney_w = kidneys.map(|k| k.term(2, w));
        for y in 0..ny {
            let v = norm(y, ny);
            let body_v = ((v - body_centre[1]) / body_radius[1]).powi(2);
            let liver_vw = liver_w + liver.term(1, v);
            let kidney_vw = [
                kidney_w[0] + kidneys[0].term(1, v),
                kidney_w[1] + kidneys[1].term(1, v),
            ];
            let spine_v = spine.term(1, v);
            let row = (z * ny + y) * nx;
            let hu_row = &mut hu[row..row + nx];
            let label_row = &mut labels[row..row + nx];
            for ((h, l), &u) in hu_row.iter_mut().zip(label_row.iter_mut()).zip(&us) {
                let body = ((u - body_centre[0]) / body_radius[0]).powi(2) + body_v;
                let (value, class) = if body >= 1.0 {
                    (AIR, 0)
                } else if spine.term(0, u) + spine_v < 1.0 {
                    (BONE, 3)
                } else if kidney_vw[0] + kidneys[0].term(0, u) < 1.0
                    || kidney_vw[1] + kidneys[1].term(0, u) < 1.0
                {
                    (KIDNEY, 2)
                } else if liver_vw + liver.term(0, u) < 1.0 {
                    (LIVER, 1)
                } else if body > 0.81 {
                    (FAT, 0)
                } else {
                    (SOFT_TISSUE, 0)
                };
                *h = value as f32;
                *l = class;
            }
        }
    }

    add_lesions(
        &mut r,
        spec.lesions,
        (liver_c, liver_r),
        shape,
        &mut hu,
        &mut labels,
    );

    let noise_seed = splitmix64(spec.seed ^ 0x6e6f_6973_6500_0000);
    let image: Vec<i16> = hu
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            (f64::from(h) + noise(noise_seed, i as u64))
                .round()
                .clamp(-1024.0, 3071.0) as i16
        })
        .collect();

    let [sz, sy, sx] = spec.spacing;
    let origin = |n: usize, s: f64| -((n as f64 - 1.0) / 2.0) * s;
    let geometry = Geometry {
        shape,
        spacing: spec.spacing,
        affine: [
            [sx, 0.0, 0.0, origin(nx, sx)],
            [0.0, sy, 0.0, origin(ny, sy)],
            [0.0, 0.0, sz, origin(nz, sz)],
            [0.0, 0.0, 0.0, 1.0],
        ],
    };
    (geometry, VoxelData::I16(image), LabelData::U8(labels))
}

/// Lesions: `count` spheres of radius 2–4 voxels centred well inside the liver (`liver`: its
/// normalised `[u, v, w]` centre and radii); only liver voxels turn lesion.
fn add_lesions(
    r: &mut impl RngCore,
    count: usize,
    (liver_c, liver_r): ([f64; 3], [f64; 3]),
    [nz, ny, nx]: [usize; 3],
    hu: &mut [f32],
    labels: &mut [u8],
) {
    for _ in 0..count {
        let radius = 2.0 + 2.0 * unit(r);
        let p = loop {
            let p = [jitter(r, 1.0), jitter(r, 1.0), jitter(r, 1.0)];
            if p.iter().map(|c| c * c).sum::<f64>() < 1.0 {
                break p;
            }
        };
        // Normalised [u, v, w] to voxel [x, y, z].
        let centre: [f64; 3] = std::array::from_fn(|a| {
            let n = [nx, ny, nz][a] as f64;
            let c = liver_c[a] + 0.6 * p[a] * liver_r[a];
            (c + 1.0) / 2.0 * n - 0.5
        });
        let lo = |a: usize| (centre[a] - radius).floor().max(0.0) as usize;
        let hi = |a: usize, n: usize| ((centre[a] + radius).ceil() as usize + 1).min(n);
        for z in lo(2)..hi(2, nz) {
            for y in lo(1)..hi(1, ny) {
                for x in lo(0)..hi(0, nx) {
                    let d2 = (x as f64 - centre[0]).powi(2)
                        + (y as f64 - centre[1]).powi(2)
                        + (z as f64 - centre[2]).powi(2);
                    let i = (z * ny + y) * nx + x;
                    if d2 <= radius * radius && labels[i] == 1 {
                        labels[i] = 4;
                        hu[i] = LESION as f32;
                    }
                }
            }
        }
    }
}

/// `dataset.json` of an nnU-Net raw dataset, with fields in nnU-Net's order.
#[derive(Serialize)]
struct DatasetJson<'a> {
    channel_names: std::collections::BTreeMap<&'a str, &'a str>,
    labels: OrderedLabels,
    #[serde(rename = "numTraining")]
    num_training: usize,
    file_ending: &'a str,
    name: &'a str,
}

/// The label map of `dataset.json`, written in class order.
struct OrderedLabels;

impl Serialize for OrderedLabels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(PHANTOM_LABELS.iter().map(|(i, n)| (*n, *i)))
    }
}

/// Writes an nnU-Net raw dataset of `cases` phantoms into `dir`: `imagesTr/phantom_000_0000.nii.gz`,
/// `labelsTr/phantom_000.nii.gz`, ... and `dataset.json`. Case `i` uses the seed
/// [`case_seed`]`(spec.seed, "phantom_{i:03}")`; the same spec gives byte-identical files.
pub fn write_phantom_dataset(
    dir: &Path,
    cases: usize,
    spec: &PhantomSpec,
) -> Result<(), VolumeError> {
    for i in 0..cases {
        write_phantom_case(dir, i, spec)?;
    }
    write_phantom_dataset_json(dir, cases)?;
    tracing::info!(dir = %dir.display(), cases, "wrote phantom dataset");
    Ok(())
}

/// Writes case `index` of the phantom dataset of [`write_phantom_dataset`] (its image and
/// label files only; cases are independent, so callers may write them in parallel). Returns
/// the bytes written.
pub fn write_phantom_case(
    dir: &Path,
    index: usize,
    spec: &PhantomSpec,
) -> Result<u64, VolumeError> {
    let images = dir.join("imagesTr");
    let labels = dir.join("labelsTr");
    for d in [&images, &labels] {
        std::fs::create_dir_all(d).map_err(|source| VolumeError::Write {
            path: d.clone(),
            source,
        })?;
    }
    let id = format!("phantom_{index:03}");
    let case_spec = PhantomSpec {
        seed: case_seed(spec.seed, &id),
        ..spec.clone()
    };
    let (geometry, image, label) = phantom(&case_spec);
    let image_path = images.join(format!("{id}_0000.nii.gz"));
    let label_path = labels.join(format!("{id}.nii.gz"));
    write_nifti(&image_path, &geometry, &image)?;
    write_nifti(&label_path, &geometry, &label.into_voxels())?;
    let size = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|source| VolumeError::Write {
                path: path.to_path_buf(),
                source,
            })
    };
    Ok(size(&image_path)? + size(&label_path)?)
}

/// Writes the `dataset.json` of a phantom dataset of `cases` cases into `dir`.
pub fn write_phantom_dataset_json(dir: &Path, cases: usize) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(|source| VolumeError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let json = DatasetJson {
        channel_names: [("0", "CT")].into_iter().collect(),
        labels: OrderedLabels,
        num_training: cases,
        file_ending: ".nii.gz",
        name: "Phantom",
    };
    let path = dir.join("dataset.json");
    let mut text = serde_json::to_string_pretty(&json).map_err(|source| VolumeError::Json {
        path: path.clone(),
        source,
    })?;
    text.push('\n');
    std::fs::write(&path, text).map_err(|source| VolumeError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::label::read_label;
    use crate::nifti::read_nifti;

    #[test]
    fn same_seed_same_phantom_other_seed_other_phantom() {
        let spec = PhantomSpec::default();
        let a = phantom(&spec);
        assert_eq!(a, phantom(&spec));
        let b = phantom(&PhantomSpec { seed: 1, ..spec });
        assert_ne!(a.1, b.1);
        assert_ne!(a.2, b.2);
    }

    #[test]
    fn every_class_is_present_and_lesions_are_rare() {
        for seed in 0..5 {
            let spec = PhantomSpec {
                seed,
                ..PhantomSpec::default()
            };
            let (g, image, label) = phantom(&spec);
            assert_eq!(g.shape, [64, 96, 96]);
            assert_eq!(g.spacing, [2.0, 1.0, 1.0]);
            assert_eq!(g.orientation(), "RAS");
            assert_eq!(image.len(), g.voxels());
            let mut counts = [0usize; 5];
            for i in 0..label.len() {
                counts[usize::from(label.get(i))] += 1;
            }
            for c in 1..5 {
                assert!(counts[c] > 0, "seed {seed}: class {c} missing: {counts:?}");
            }
            let lesion_fraction = counts[4] as f64 / label.len() as f64;
            assert!(lesion_fraction < 0.01, "seed {seed}: {lesion_fraction}");
            assert!(
                counts[1] > 10 * counts[4],
                "lesions sit inside a larger liver"
            );
        }
    }

    #[test]
    fn intensities_look_like_ct() {
        let (_, image, label) = phantom(&PhantomSpec::default());
        let VoxelData::I16(v) = image else {
            panic!("phantom image must be i16")
        };
        let mean_of = |class: u16| {
            let (s, n) = v
                .iter()
                .enumerate()
                .filter(|(i, _)| label.get(*i) == class)
                .fold((0.0, 0usize), |(s, n), (_, &x)| (s + f64::from(x), n + 1));
            s / n as f64
        };
        assert!((mean_of(1) - LIVER).abs() < 3.0);
        assert!((mean_of(2) - KIDNEY).abs() < 3.0);
        assert!((mean_of(3) - BONE).abs() < 3.0);
        assert!((mean_of(4) - LESION).abs() < 5.0);
        // Noise: the corner is air with sd ~15 HU.
        let air: Vec<f64> = v[..96].iter().map(|&x| f64::from(x)).collect();
        let m = air.iter().sum::<f64>() / air.len() as f64;
        let sd = (air.iter().map(|x| (x - m).powi(2)).sum::<f64>() / air.len() as f64).sqrt();
        assert!((m - AIR).abs() < 6.0, "{m}");
        assert!((8.0..25.0).contains(&sd), "{sd}");
    }

    #[test]
    fn dataset_is_byte_identical_for_the_same_seed() {
        let spec = PhantomSpec {
            shape: [12, 20, 24],
            seed: 9,
            ..PhantomSpec::default()
        };
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_phantom_dataset(a.path(), 2, &spec).unwrap();
        write_phantom_dataset(b.path(), 2, &spec).unwrap();
        for f in [
            "imagesTr/phantom_000_0000.nii.gz",
            "imagesTr/phantom_001_0000.nii.gz",
            "labelsTr/phantom_000.nii.gz",
            "labelsTr/phantom_001.nii.gz",
            "dataset.json",
        ] {
            let x = std::fs::read(a.path().join(f)).unwrap();
            let y = std::fs::read(b.path().join(f)).unwrap();
            assert!(x == y, "{f} differs between runs");
        }
        let c0 = std::fs::read(a.path().join("imagesTr/phantom_000_0000.nii.gz")).unwrap();
        let c1 = std::fs::read(a.path().join("imagesTr/phantom_001_0000.nii.gz")).unwrap();
        assert_ne!(c0, c1, "cases differ");

        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.path().join("dataset.json")).unwrap()).unwrap();
        assert_eq!(json["channel_names"]["0"], "CT");
        assert_eq!(json["numTraining"], 2);
        assert_eq!(json["file_ending"], ".nii.gz");
        assert_eq!(json["name"], "Phantom");
        for (i, name) in PHANTOM_LABELS {
            assert_eq!(json["labels"][name], i);
        }

        // The files read back as the phantom of the case seed.
        let img = read_nifti(&a.path().join("imagesTr/phantom_001_0000.nii.gz")).unwrap();
        let (lg, lab) = read_label(&a.path().join("labelsTr/phantom_001.nii.gz")).unwrap();
        let (g, image, label) = phantom(&PhantomSpec {
            seed: case_seed(9, "phantom_001"),
            ..spec
        });
        assert_eq!(img.geometry, g);
        assert_eq!(lg, g);
        assert_eq!(img.data, image);
        assert_eq!(lab, label);
    }
}

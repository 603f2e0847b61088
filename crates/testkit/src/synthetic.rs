//! Small synthetic cases kept in memory beside the store written from them, so that tests can
//! compare every served voxel with a plain crop of the arrays.

use std::collections::BTreeMap;
use std::path::Path;

use patchflow_store::{
    CaseData, CaseMeta, ChannelMeta, MANIFEST_FORMAT, Manifest, ManifestCase, WriteOptions,
    case_file_name, write_case,
};
use patchflow_volume::{DType, Geometry, LabelData, NormScheme, Normalization, VoxelData};

/// A small deterministic generator of test values (independent of any sampler's).
pub struct Lcg(pub u64);

impl Lcg {
    /// The next value, 31 bits.
    pub fn next_value(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// A case as written to the store: its metadata and its arrays.
pub struct MemCase {
    /// Metadata as stored.
    pub meta: CaseMeta,
    /// Image channels, in channel order.
    pub channels: Vec<VoxelData>,
    /// Labels.
    pub label: LabelData,
}

impl MemCase {
    /// Flat index of voxel `[z, y, x]`, `None` outside the volume.
    pub fn index(&self, z: i64, y: i64, x: i64) -> Option<usize> {
        let s = self.meta.shape;
        if z < 0 || y < 0 || x < 0 || z >= s[0] as i64 || y >= s[1] as i64 || x >= s[2] as i64 {
            return None;
        }
        Some((z as usize * s[1] + y as usize) * s[2] + x as usize)
    }

    /// Label of voxel `[z, y, x]`, `None` outside the volume.
    pub fn label_at(&self, z: i64, y: i64, x: i64) -> Option<u16> {
        self.index(z, y, x).map(|i| self.label.get(i))
    }
}

/// A case with an `i16` CT-like channel and an `f32` MR-like channel (normalised with a mean
/// that depends on `seed`, so cases differ); labels: class 1 in a box, `second_class` (if any)
/// in the far corner, background elsewhere. Labels are `u8` unless a class exceeds 255.
pub fn make_case(id: &str, shape: [usize; 3], seed: u64, second_class: Option<u16>) -> MemCase {
    let n: usize = shape.iter().product();
    let mut rng = Lcg(seed);
    let ch0: Vec<i16> = (0..n)
        .map(|_| (rng.next_value() % 1600) as i16 - 800)
        .collect();
    let ch1: Vec<f32> = (0..n)
        .map(|_| (rng.next_value() % 200_000) as f32 / 1000.0 - 100.0)
        .collect();
    let mut labels = vec![0u16; n];
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let i = (z * shape[1] + y) * shape[2] + x;
                if (2..6).contains(&z) && (3..8).contains(&y) && (1..5).contains(&x) {
                    labels[i] = 1;
                } else if let Some(class) = second_class
                    && z + 3 >= shape[0]
                    && y + 2 >= shape[1]
                    && x + 4 >= shape[2]
                {
                    labels[i] = class;
                }
            }
        }
    }
    let mut class_voxels = BTreeMap::new();
    for &l in &labels {
        *class_voxels.entry(l).or_insert(0u64) += 1;
    }
    let label = if labels.iter().all(|&l| l < 256) {
        LabelData::U8(labels.iter().map(|&l| l as u8).collect())
    } else {
        LabelData::U16(labels)
    };
    let meta = CaseMeta {
        id: id.to_string(),
        shape,
        spacing: [2.5, 0.75, 0.75],
        original: Geometry {
            shape,
            spacing: [2.5, 0.75, 0.75],
            affine: [
                [0.75, 0.0, 0.0, 0.0],
                [0.0, 0.75, 0.0, 0.0],
                [0.0, 0.0, 2.5, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        },
        crop_box: [[0, shape[0]], [0, shape[1]], [0, shape[2]]],
        channels: vec![
            ChannelMeta {
                name: "CT".into(),
                dtype: DType::I16,
                norm: Normalization {
                    scheme: NormScheme::Ct,
                    clip: Some([-300.0, 500.0]),
                    mean: 41.25,
                    inv_std: 1.0 / 87.5,
                },
            },
            ChannelMeta {
                name: "T2".into(),
                dtype: DType::F32,
                norm: Normalization {
                    scheme: NormScheme::ZScore,
                    clip: None,
                    mean: seed as f32 * 0.01,
                    inv_std: 1.75,
                },
            },
        ],
        label_dtype: label.dtype(),
        label_names: [
            (0u16, "background".to_string()),
            (1, "liver".to_string()),
            (2, "tumour".to_string()),
        ]
        .into(),
        class_voxels,
        ignore_label: None,
        outside_mask_label: None,
    };
    MemCase {
        meta,
        channels: vec![VoxelData::I16(ch0), VoxelData::F32(ch1)],
        label,
    }
}

/// All voxels of each foreground class, as `[z, y, x]`.
pub fn locations(case: &MemCase) -> BTreeMap<u16, Vec<[u32; 3]>> {
    let s = case.meta.shape;
    let mut out: BTreeMap<u16, Vec<[u32; 3]>> = BTreeMap::new();
    for z in 0..s[0] {
        for y in 0..s[1] {
            for x in 0..s[2] {
                let c = case.label.get((z * s[1] + y) * s[2] + x);
                if c != 0 {
                    out.entry(c)
                        .or_default()
                        .push([z as u32, y as u32, x as u32]);
                }
            }
        }
    }
    out
}

/// Writes `cases` and a manifest into `dir` (created if needed; an `s3://bucket/prefix`
/// location works too), with small chunks so that patches cross chunk borders. Cases are
/// written in reverse order: readers must sort by id.
pub fn write_store(dir: &Path, cases: &[MemCase]) {
    let sizes = write_cases(dir, cases);
    manifest_of(cases, &sizes).save(dir).expect("save manifest");
}

/// The manifest [`write_store`] writes for `cases` whose files have `sizes` bytes (in the
/// order of `cases`).
pub fn manifest_of(cases: &[MemCase], sizes: &[u64]) -> Manifest {
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        dataset: "synthetic".into(),
        plan: serde_json::Value::Null,
        cases: Vec::new(),
    };
    for (case, &stored_bytes) in cases.iter().zip(sizes).rev() {
        let file = case_file_name(&case.meta.id);
        manifest.cases.push(ManifestCase {
            id: case.meta.id.clone(),
            stored_bytes,
            file,
            source: serde_json::Value::Null,
        });
    }
    manifest
}

/// Writes the case files of [`write_store`] without the manifest; returns each file's size.
pub fn write_cases(dir: &Path, cases: &[MemCase]) -> Vec<u64> {
    if !patchflow_store::StoreLocation::is_remote_path(dir) {
        std::fs::create_dir_all(dir).expect("store folder");
    }
    let opts = WriteOptions {
        chunk_shape: [4, 5, 6],
        ..WriteOptions::default()
    };
    let mut sizes = Vec::with_capacity(cases.len());
    for case in cases.iter().rev() {
        let file = case_file_name(&case.meta.id);
        let locs = locations(case);
        let data = CaseData {
            meta: &case.meta,
            channels: &case.channels,
            label: &case.label,
            class_locations: &locs,
        };
        let report = write_case(&dir.join(&file), &data, &opts).expect("write case");
        sizes.push(report.stored_bytes);
    }
    sizes.reverse();
    sizes
}

/// The plain reference crop: the box of `size` at `origin` of the C-order volume `data` of
/// `shape`, `pad` outside it.
pub fn crop_ref<T: Copy>(
    data: &[T],
    shape: [usize; 3],
    origin: [i64; 3],
    size: [usize; 3],
    pad: T,
) -> Vec<T> {
    let mut out = Vec::with_capacity(size.iter().product());
    for z in 0..size[0] as i64 {
        for y in 0..size[1] as i64 {
            for x in 0..size[2] as i64 {
                let p = [origin[0] + z, origin[1] + y, origin[2] + x];
                let inside = (0..3).all(|a| p[a] >= 0 && (p[a] as usize) < shape[a]);
                out.push(if inside {
                    data[(p[0] as usize * shape[1] + p[1] as usize) * shape[2] + p[2] as usize]
                } else {
                    pad
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_hold_their_classes_and_stores_open() {
        let wide = make_case("w", [9, 10, 11], 3, Some(300));
        assert_eq!(wide.meta.label_dtype, DType::U16);
        assert_eq!(wide.label_at(3, 4, 2), Some(1));
        assert_eq!(wide.label_at(8, 9, 10), Some(300));
        assert_eq!(wide.label_at(-1, 0, 0), None);
        let plain = make_case("p", [9, 10, 11], 4, None);
        assert_eq!(plain.meta.label_dtype, DType::U8);
        assert_eq!(plain.label_at(8, 9, 10), Some(0));
        assert_eq!(locations(&plain).len(), 1);
        let tmp = tempfile::tempdir().unwrap();
        write_store(tmp.path(), &[plain, wide]);
        let manifest = Manifest::load(tmp.path()).unwrap().expect("manifest");
        let ids: Vec<&str> = manifest.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["w", "p"]);
    }
}

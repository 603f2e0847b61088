//! nnU-Net's `use_mask_for_norm` on a real MR pair of `../shared/data`: the Colin27 brain with
//! its AAL labels (`brain_atlas/`).
//!
//! As shipped, the brain fills its grid (cropping keeps 0.97 of it), so nnU-Net would not use
//! the mask and neither does ingest: the store keeps the whole-box z-score. Conformed to a
//! FreeSurfer-style 256³ grid (the same voxels, zero-padded, written to a temporary folder),
//! cropping keeps 0.41 of the image and nnU-Net's rule applies: `--replan` re-decides for the
//! existing store, and every served voxel is compared with a plain reference written here with
//! straight loops (non-zero mask, hole filling by repeated sweeps, −1 outside, mean/std over
//! `seg >= 0`, z-score, 0 outside):
//!
//! * labels: equal, with −1 served as 0;
//! * image: 0 exactly where the reference marks −1; elsewhere bit for bit equal to the deferred
//!   form `(x - mean as f32) * (1 / std) as f32` of the reference statistics, and within
//!   `1e-6 · (1 + |z|)` of the exact z-score `(x - mean) / std` computed in `f64` (f32
//!   rounding of the mean, of `1 / std` and of two operations: at most ~4e-7 here).
//!
//! Served through the sampler (the whole volume as one patch) and through a real daemon on
//! 127.0.0.1:0 (random patches at the origins it reports). The brain's zero voxels all reach
//! the border, so hole filling changes nothing here; the synthetic tests of the volume and
//! ingest crates cover it.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{inspect_json, run, run_ok, s, shared_data};
use patchflow_client::{LabelDtype, StreamConfig};
use patchflow_sampler::{BatchRequest, Dataset, OutputDType, Policy, Sampler};
use patchflow_store::ChunkCache;
use patchflow_volume::{Geometry, LabelData, VoxelData, read_label, read_nifti, write_nifti};

/// FreeSurfer's conformed grid.
const CONFORMED: usize = 256;

/// The brain pair padded with zeros to 256³ (centred), written as `.nii` under `dir` with a
/// TSV that names the case `ch2`; returns the TSV, the padded image and label, their shape.
fn conformed_pair(data: &Path, dir: &Path) -> (std::path::PathBuf, Vec<u8>, Vec<u8>, [usize; 3]) {
    let image = read_nifti(&data.join("brain_atlas/ch2.nii.gz")).unwrap();
    let (geometry, label) = read_label(&data.join("brain_atlas/aal.nii.gz")).unwrap();
    let VoxelData::U8(src) = &image.data else {
        panic!("ch2 is uint8")
    };
    let LabelData::U8(lab) = &label else {
        panic!("aal is uint8")
    };
    let [nz, ny, nx] = geometry.shape;
    let off = [nz, ny, nx].map(|n| (CONFORMED - n) / 2);
    let shape = [CONFORMED; 3];
    let mut img = vec![0u8; CONFORMED.pow(3)];
    let mut seg = vec![0u8; CONFORMED.pow(3)];
    for z in 0..nz {
        for y in 0..ny {
            let from = (z * ny + y) * nx;
            let to = ((z + off[0]) * CONFORMED + y + off[1]) * CONFORMED + off[2];
            img[to..to + nx].copy_from_slice(&src[from..from + nx]);
            seg[to..to + nx].copy_from_slice(&lab[from..from + nx]);
        }
    }
    // Same world position for every voxel: move the origin by the padding.
    let mut affine = geometry.affine;
    let shift = [off[2], off[1], off[0]].map(|o| o as f64);
    for (r, row) in affine.iter_mut().enumerate().take(3) {
        row[3] -= (0..3)
            .map(|c| geometry.affine[r][c] * shift[c])
            .sum::<f64>();
    }
    let g = Geometry {
        shape,
        spacing: geometry.spacing,
        affine,
    };
    write_nifti(&dir.join("ch2_256.nii"), &g, &VoxelData::U8(img.clone())).unwrap();
    write_nifti(&dir.join("aal_256.nii"), &g, &VoxelData::U8(seg.clone())).unwrap();
    (
        write_tsv(dir, "conformed.tsv", "ch2_256.nii", "aal_256.nii"),
        img,
        seg,
        shape,
    )
}

fn write_tsv(dir: &Path, name: &str, image: &str, label: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("id\timage\tlabel\tmodality\nch2\t{image}\t{label}\tMR\n"),
    )
    .unwrap();
    path
}

/// The plain reference of nnU-Net's preprocessing with `use_mask_for_norm`, straight loops.
struct Reference {
    /// Crop box `[start, end)` per axis.
    crop: [[usize; 2]; 3],
    /// Cropped shape.
    shape: [usize; 3],
    /// Cropped image values.
    image: Vec<f64>,
    /// nnU-Net's seg after cropping: −1 outside the mask where the label is 0.
    seg: Vec<i32>,
    mean: f64,
    std: f64,
}

impl Reference {
    fn new(img: &[u8], lab: &[u8], full: [usize; 3]) -> Reference {
        let at = |z: usize, y: usize, x: usize| (z * full[1] + y) * full[2] + x;
        // Bounding box of the non-zero voxels.
        let mut lo = full;
        let mut hi = [0usize; 3];
        for z in 0..full[0] {
            for y in 0..full[1] {
                for x in 0..full[2] {
                    if img[at(z, y, x)] != 0 {
                        for (a, v) in [z, y, x].into_iter().enumerate() {
                            lo[a] = lo[a].min(v);
                            hi[a] = hi[a].max(v + 1);
                        }
                    }
                }
            }
        }
        let crop = [[lo[0], hi[0]], [lo[1], hi[1]], [lo[2], hi[2]]];
        let shape = crop.map(|[s, e]| e - s);
        let [cz, cy, cx] = shape;
        let idx = |z: usize, y: usize, x: usize| (z * cy + y) * cx + x;
        let mut image = Vec::with_capacity(cz * cy * cx);
        let mut label = Vec::with_capacity(cz * cy * cx);
        for z in 0..cz {
            for y in 0..cy {
                for x in 0..cx {
                    let i = at(z + lo[0], y + lo[1], x + lo[2]);
                    image.push(f64::from(img[i]));
                    label.push(lab[i]);
                }
            }
        }
        // Hole filling: background that reaches the border through 6-connected background.
        // Everything outside the crop box is background connected to the grid's border, so the
        // box's faces are the border here. Repeated forward and backward sweeps until stable.
        let n = image.len();
        let mut outside = vec![false; n];
        for z in 0..cz {
            for y in 0..cy {
                for x in 0..cx {
                    let face =
                        z == 0 || y == 0 || x == 0 || z + 1 == cz || y + 1 == cy || x + 1 == cx;
                    outside[idx(z, y, x)] = face && image[idx(z, y, x)] == 0.0;
                }
            }
        }
        let mut sweeps = 0;
        loop {
            let mut changed = false;
            for forward in [true, false] {
                for k in 0..n {
                    let i = if forward { k } else { n - 1 - k };
                    if outside[i] || image[i] != 0.0 {
                        continue;
                    }
                    let (z, y, x) = (i / (cy * cx), (i / cx) % cy, i % cx);
                    let near = (x > 0 && outside[i - 1])
                        || (x + 1 < cx && outside[i + 1])
                        || (y > 0 && outside[i - cx])
                        || (y + 1 < cy && outside[i + cx])
                        || (z > 0 && outside[i - cy * cx])
                        || (z + 1 < cz && outside[i + cy * cx]);
                    if near {
                        outside[i] = true;
                        changed = true;
                    }
                }
            }
            sweeps += 1;
            if !changed {
                break;
            }
        }
        let holes = (0..n).filter(|&i| image[i] == 0.0 && !outside[i]).count();
        eprintln!("hole filling: {sweeps} sweep pairs, {holes} zero voxels inside the mask");
        let seg: Vec<i32> = (0..n)
            .map(|i| {
                if label[i] == 0 && outside[i] {
                    -1
                } else {
                    i32::from(label[i])
                }
            })
            .collect();
        let inside: Vec<f64> = (0..n).filter(|&i| seg[i] >= 0).map(|i| image[i]).collect();
        let mean = inside.iter().sum::<f64>() / inside.len() as f64;
        let std =
            (inside.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / inside.len() as f64).sqrt();
        Reference {
            crop,
            shape,
            image,
            seg,
            mean,
            std,
        }
    }

    fn relative_size(&self) -> f64 {
        self.shape.iter().product::<usize>() as f64 / (CONFORMED.pow(3) as f64)
    }

    /// Checks served values of the box at `origin` (cropped coordinates) of size `patch`:
    /// image `f32`, labels widened to `u16` (`ignore` outside the volume, image 0 there).
    fn check(
        &self,
        origin: [i64; 3],
        patch: [usize; 3],
        image: &[f32],
        labels: &[u16],
        ignore: u16,
    ) {
        let (mean32, inv32) = (self.mean as f32, (1.0 / self.std) as f32);
        let mut k = 0;
        for z in 0..patch[0] as i64 {
            for y in 0..patch[1] as i64 {
                for x in 0..patch[2] as i64 {
                    let p = [origin[0] + z, origin[1] + y, origin[2] + x];
                    let inside = (0..3).all(|a| p[a] >= 0 && (p[a] as usize) < self.shape[a]);
                    let (got, lab) = (image[k], labels[k]);
                    if !inside {
                        assert_eq!((got.to_bits(), lab), (0, ignore), "padding at {p:?}");
                        k += 1;
                        continue;
                    }
                    let i = (p[0] as usize * self.shape[1] + p[1] as usize) * self.shape[2]
                        + p[2] as usize;
                    let seg = self.seg[i];
                    assert_eq!(i32::from(lab), seg.max(0), "label at {p:?} (seg {seg})");
                    if seg < 0 {
                        assert_eq!(got.to_bits(), 0, "image outside the mask at {p:?}");
                    } else {
                        let x = self.image[i];
                        let deferred = (x as f32 - mean32) * inv32;
                        assert_eq!(got.to_bits(), deferred.to_bits(), "image at {p:?}");
                        let exact = (x - self.mean) / self.std;
                        let err = (f64::from(got) - exact).abs();
                        assert!(
                            err <= 1e-6 * (1.0 + exact.abs()),
                            "image at {p:?}: {got} vs {exact}"
                        );
                    }
                    k += 1;
                }
            }
        }
    }
}

fn ingest(tsv: &Path, store: &Path, replan: bool) -> String {
    let mut args = vec!["ingest", s(tsv), "--out", s(store), "--keep-spacing"];
    if replan {
        args.push("--replan");
    }
    let out = run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ingest failed: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colin27_conformed_to_256_uses_the_mask_like_nnunet() {
    let Some(data) = shared_data("colin27_conformed_to_256_uses_the_mask_like_nnunet") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("brain");

    // As shipped: cropping keeps 0.97 of the grid, nnU-Net would not use the mask.
    let shipped = write_tsv(
        dir.path(),
        "brain.tsv",
        s(&data.join("brain_atlas/ch2.nii.gz")),
        s(&data.join("brain_atlas/aal.nii.gz")),
    );
    let printed = ingest(&shipped, &store, false);
    assert!(
        printed.contains("new plan: use_mask_for_norm: no"),
        "{printed}"
    );
    let report = inspect_json(&store);
    let m = &report["plan"]["mask_for_norm"];
    let median = m["median_relative_size_after_cropping"].as_f64().unwrap();
    assert!(
        (median - 177.0 * 215.0 * 181.0 / (181.0 * 217.0 * 181.0)).abs() < 1e-12,
        "{m}"
    );
    assert_eq!(m["use_mask_for_norm"]["MR"], false);
    let case = &report["cases"][0];
    assert!(case["outside_mask_label"].is_null());
    assert_eq!(case["channels"][0]["use_mask_for_norm"], false);

    // Conformed to 256³ under the same case id: the stored plan is kept for the changed case.
    let (tsv, img, seg, full) = conformed_pair(&data, dir.path());
    let printed = ingest(&tsv, &store, false);
    assert!(!printed.contains("new plan"), "{printed}");
    assert!(inspect_json(&store)["cases"][0]["outside_mask_label"].is_null());

    // --replan re-decides: 0.41 < 3/4.
    let printed = ingest(&tsv, &store, true);
    let reference = Reference::new(&img, &seg, full);
    assert!(
        printed.contains("new plan: use_mask_for_norm: yes for MR"),
        "{printed}"
    );
    let report = inspect_json(&store);
    let m = &report["plan"]["mask_for_norm"];
    let median = m["median_relative_size_after_cropping"].as_f64().unwrap();
    assert!((median - reference.relative_size()).abs() < 1e-12, "{m}");
    assert!(median < 0.75);
    assert_eq!(m["use_mask_for_norm"]["MR"], true);
    let case = &report["cases"][0];
    let crop: [[usize; 2]; 3] = serde_json::from_value(case["crop_box"].clone()).unwrap();
    assert_eq!(crop, reference.crop);
    let marker = case["outside_mask_label"].as_u64().unwrap();
    assert_eq!(marker, 254, "AAL uses 1..=116");
    assert_eq!(case["channels"][0]["use_mask_for_norm"], true);
    let norm = &case["channels"][0]["normalization"];
    assert_eq!(norm["mean"].as_f64().unwrap() as f32, reference.mean as f32);
    assert_eq!(
        norm["inv_std"].as_f64().unwrap() as f32,
        (1.0 / reference.std) as f32
    );
    // Class counts: −1 voxels count as background, the marker is no class.
    let outside = reference.seg.iter().filter(|&&v| v < 0).count() as u64;
    assert!(
        outside > 1_000_000,
        "the padded corners of the box: {outside}"
    );
    let zeros = reference.seg.iter().filter(|&&v| v <= 0).count() as u64;
    let classes = case["classes"].as_array().unwrap();
    assert_eq!(classes[0]["value"], 0);
    assert_eq!(classes[0]["voxels"].as_u64().unwrap(), zeros);
    assert!(classes.iter().all(|c| c["value"] != marker));
    let text = run_ok(&["inspect", s(&store)]);
    assert!(text.contains("use_mask_for_norm: yes for MR"), "{text}");
    assert!(
        text.contains("normalisation ZScore over the non-zero mask"),
        "{text}"
    );
    assert!(
        text.contains("outside the non-zero mask: label 254"),
        "{text}"
    );

    // Through the sampler: the whole cropped volume as one patch.
    let ds = Arc::new(Dataset::open("brain", &store, ChunkCache::new(64 << 20)).unwrap());
    let sampler = Sampler::new(Arc::clone(&ds));
    let req = BatchRequest {
        patch: patchflow_grid::Patch::new(reference.shape).unwrap(),
        batch: 1,
        policy: Policy::Uniform,
        crops_per_case: 1,
        dtype: OutputDType::F32,
        seed: 5,
        cases: None,
        augment: None,
    };
    let batch = sampler.sample(&req, 0).unwrap();
    assert_eq!(batch.items[0].origin, [0, 0, 0]);
    let image: Vec<f32> = bytemuck::pod_collect_to_vec(&batch.image);
    let labels: Vec<u16> = batch.label.iter().map(|&v| u16::from(v)).collect();
    reference.check([0, 0, 0], reference.shape, &image, &labels, 255);

    // Through a daemon: random 48³ patches at the origins it reports.
    let (server, client) = common::serve_and_connect(vec![store.clone()], 64).await;
    let patch = [48usize, 48, 48];
    let mut config = StreamConfig::new("brain", patch.map(|v| v as i64), 4);
    config.seed = 31;
    let mut stream = client.stream(config).await.unwrap();
    let n: usize = patch.iter().product();
    let mut served_outside = 0;
    for _ in 0..6 {
        let batch = stream.next().await.unwrap();
        assert_eq!(batch.label_dtype, LabelDtype::U8);
        let image = common::batch_image(&batch);
        let labels = common::batch_labels(&batch);
        for (i, item) in batch.items.iter().enumerate() {
            let (img, lab) = (&image[i * n..(i + 1) * n], &labels[i * n..(i + 1) * n]);
            reference.check(item.origin, patch, img, lab, batch.ignore_label);
            served_outside += lab
                .iter()
                .zip(img)
                .filter(|&(&l, &v)| l == 0 && v == 0.0)
                .count();
        }
    }
    assert!(served_outside > 0, "some patches reach outside the brain");
    server.shutdown().await.unwrap();
}

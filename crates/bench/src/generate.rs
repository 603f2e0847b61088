//! The benchmark's dataset: CT-like phantom cases written as an nnU-Net raw folder, then
//! ingested into a store.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use indicatif::{ProgressBar, ProgressStyle};
use patchflow_volume::{PhantomSpec, write_phantom_case, write_phantom_dataset_json};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::BenchError;

/// What dataset to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// Number of cases.
    pub cases: usize,
    /// Voxels per case `[z, y, x]`.
    pub shape: [usize; 3],
    /// Voxel size, mm `[z, y, x]`.
    pub spacing: [f64; 3],
    /// Small lesions (the rare class) per case.
    pub lesions: usize,
    /// Seed of the whole dataset.
    pub seed: u64,
}

impl DatasetSpec {
    /// Voxels over all cases.
    pub fn voxels(&self) -> u64 {
        self.shape.iter().map(|&n| n as u64).product::<u64>() * self.cases as u64
    }

    /// Bytes of the cases' voxels as generated (`i16` image + `u8` label).
    pub fn raw_bytes(&self) -> u64 {
        self.voxels() * 3
    }

    fn check(&self) -> Result<(), BenchError> {
        let bad = |field, reason: String| Err(BenchError::Config { field, reason });
        if self.cases == 0 || self.cases > 999 {
            return bad("--cases", format!("{} (allowed: 1..=999)", self.cases));
        }
        if self.shape.iter().any(|&n| !(8..=2048).contains(&n)) {
            return bad("--shape", format!("{:?} (each axis 8..=2048)", self.shape));
        }
        if self.spacing.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
            return bad("--spacing", format!("{:?} (each > 0)", self.spacing));
        }
        Ok(())
    }
}

/// File recording which spec a raw folder holds, so that a rerun reuses it.
const MARKER: &str = "bench-dataset.json";

/// Writes the phantom dataset of `spec` into `dir` (cases in parallel), unless `dir` already
/// holds exactly that dataset. Returns the input bytes (compressed NIfTI files) in `dir`.
pub fn generate(
    dir: &Path,
    spec: &DatasetSpec,
    progress: bool,
    stop: &AtomicBool,
) -> Result<u64, BenchError> {
    spec.check()?;
    let marker = dir.join(MARKER);
    let same = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|t| serde_json::from_str::<DatasetSpec>(&t).ok())
        .is_some_and(|s| &s == spec);
    if same {
        tracing::info!(dir = %dir.display(), "reusing the generated dataset");
        return folder_bytes(dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| BenchError::io("removing", dir, e))?;
    }
    let bar = bar(progress, spec.cases as u64, "generating cases");
    let phantom = PhantomSpec {
        shape: spec.shape,
        spacing: spec.spacing,
        seed: spec.seed,
        lesions: spec.lesions,
    };
    (0..spec.cases).into_par_iter().try_for_each(|i| {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(BenchError::Interrupted);
        }
        write_phantom_case(dir, i, &phantom)?;
        bar.inc(1);
        Ok(())
    })?;
    write_phantom_dataset_json(dir, spec.cases)?;
    let text = serde_json::to_string_pretty(spec).map_err(|source| BenchError::Json {
        path: marker.clone(),
        source,
    })?;
    std::fs::write(&marker, text).map_err(|e| BenchError::io("writing", &marker, e))?;
    bar.finish_and_clear();
    folder_bytes(dir)
}

/// A progress bar on stderr, or a hidden one.
pub(crate) fn bar(progress: bool, len: u64, what: &'static str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what);
    bar
}

/// Bytes of the regular files under `dir`, recursively.
pub fn folder_bytes(dir: &Path) -> Result<u64, BenchError> {
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| BenchError::io("listing", &d, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| BenchError::io("listing", &d, e))?;
            let meta = entry
                .metadata()
                .map_err(|e| BenchError::io("reading", entry.path(), e))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        let spec = DatasetSpec {
            cases: 2,
            shape: [16, 24, 24],
            spacing: [2.0, 1.0, 1.0],
            lesions: 1,
            seed: 3,
        };
        let stop = AtomicBool::new(false);
        let bytes = generate(&raw, &spec, false, &stop).unwrap();
        assert!(raw.join("imagesTr/phantom_001_0000.nii.gz").is_file());
        assert!(raw.join("labelsTr/phantom_001.nii.gz").is_file());
        assert!(raw.join("dataset.json").is_file());
        let stamp = std::fs::metadata(raw.join("dataset.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(generate(&raw, &spec, false, &stop).unwrap(), bytes);
        let again = std::fs::metadata(raw.join("dataset.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(stamp, again, "an identical spec must reuse the folder");
        let other = DatasetSpec { cases: 1, ..spec };
        generate(&raw, &other, false, &stop).unwrap();
        assert!(!raw.join("imagesTr/phantom_001_0000.nii.gz").exists());
    }

    #[test]
    fn bad_specs_name_the_setting() {
        let stop = AtomicBool::new(false);
        let dir = tempfile::tempdir().unwrap();
        let spec = DatasetSpec {
            cases: 0,
            shape: [16, 16, 16],
            spacing: [1.0; 3],
            lesions: 1,
            seed: 0,
        };
        let e = generate(dir.path(), &spec, false, &stop).unwrap_err();
        assert!(e.to_string().contains("--cases"), "{e}");
        let spec = DatasetSpec {
            cases: 1,
            shape: [4, 16, 16],
            ..spec
        };
        let e = generate(dir.path(), &spec, false, &stop).unwrap_err();
        assert!(e.to_string().contains("--shape"), "{e}");
    }
}

//! Checkpoints: model weights, optimiser momentum and the run's position, written atomically.
//!
//! A checkpoint is a folder with `state.json` (what run it belongs to and how far it got) and
//! the tensors file it names (`weights-epoch<N>.safetensors`: every model variable under its
//! name and every momentum buffer under `momentum.<name>`). The tensors file is written first
//! under a temporary name and renamed; `state.json` is replaced last, so an interrupted save
//! leaves the previous checkpoint intact. The batch stream needs no saved state: batch `k`
//! depends only on the dataset, the seed and `k`, and the run resumes at
//! `k = epochs_done × iterations_per_epoch`.

use std::path::{Path, PathBuf};

use patchflow_grid::Patch;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::TrainerError;
use crate::optim::Sgd;
use crate::unet::{Model, UNetConfig};

/// Version of the checkpoint layout.
pub const CHECKPOINT_VERSION: u32 = 1;
/// Name of the state file inside a checkpoint folder.
pub const STATE_FILE: &str = "state.json";

/// Everything that must match for a checkpoint to continue a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// Dataset name.
    pub dataset: String,
    /// Curriculum mode name.
    pub mode: String,
    /// Total epochs.
    pub epochs: usize,
    /// Iterations per epoch.
    pub iters_per_epoch: usize,
    /// Final patch (`[z, y, x]` in JSON).
    #[serde(with = "patchflow_curriculum::patch_serde")]
    pub final_patch: Patch,
    /// Poolings per axis.
    pub pools: [u32; 3],
    /// Planned batch.
    pub batch: usize,
    /// Seed.
    pub seed: u64,
    /// Network topology.
    pub unet: UNetConfig,
    /// Training case ids.
    pub train_cases: Vec<String>,
    /// Validation case ids.
    pub val_cases: Vec<String>,
    /// Foreground oversampling share.
    pub oversample: f64,
    /// Whether augmentation is on.
    pub augment: bool,
    /// Initial learning rate.
    pub initial_lr: f64,
}

impl RunIdentity {
    /// The first field that differs from `other`, as `name: self vs other`.
    pub fn first_difference(&self, other: &RunIdentity) -> Option<String> {
        let a = serde_json::to_value(self).ok()?;
        let b = serde_json::to_value(other).ok()?;
        let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (a, b) else {
            return None;
        };
        a.iter().find_map(|(k, va)| {
            let vb = b.get(k);
            (Some(va) != vb).then(|| {
                format!(
                    "{k}: checkpoint has {va}, this run has {}",
                    vb.map_or("nothing".to_string(), ToString::to_string)
                )
            })
        })
    }
}

/// The contents of `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Layout version.
    pub version: u32,
    /// The run the checkpoint belongs to.
    pub run: RunIdentity,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Next batch index (= global iteration) of the stream.
    pub next_batch: u64,
    /// The tensors file, relative to the checkpoint folder.
    pub tensors: String,
}

/// Writes a checkpoint of `model` and `opt` into `dir`.
pub fn save(
    dir: &Path,
    state: &CheckpointState,
    model: &Model,
    opt: &Sgd,
) -> Result<(), TrainerError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    let mut named: Vec<(String, Tensor)> = model.named_parameters();
    named.extend(opt.named_buffers());
    let cpu: Vec<(String, Tensor)> = named
        .into_iter()
        .map(|(n, t)| {
            t.f_to_device(tch::Device::Cpu)
                .map(|t| (n, t))
                .map_err(|e| TrainerError::torch("checkpoint tensors to the CPU", e))
        })
        .collect::<Result<_, _>>()?;
    let final_path = dir.join(&state.tensors);
    let tmp = dir.join(format!("{}.tmp", state.tensors));
    Tensor::write_safetensors(&cpu, &tmp).map_err(|e| TrainerError::Checkpoint {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    std::fs::rename(&tmp, &final_path).map_err(|e| TrainerError::io(&final_path, e))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainerError::Checkpoint {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let state_path = dir.join(STATE_FILE);
    let state_tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&state_tmp, json).map_err(|e| TrainerError::io(&state_tmp, e))?;
    std::fs::rename(&state_tmp, &state_path).map_err(|e| TrainerError::io(&state_path, e))?;
    // Older tensors files are no longer referenced.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("weights-") && name != state.tensors {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Reads `state.json` of a checkpoint folder (`None` when there is none).
pub fn read_state(dir: &Path) -> Result<Option<CheckpointState>, TrainerError> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainerError::io(&path, e)),
    };
    let state: CheckpointState =
        serde_json::from_slice(&bytes).map_err(|e| TrainerError::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if state.version != CHECKPOINT_VERSION {
        return Err(TrainerError::Checkpoint {
            path,
            reason: format!(
                "layout version {} (this trainer reads {CHECKPOINT_VERSION})",
                state.version
            ),
        });
    }
    Ok(Some(state))
}

/// Loads the tensors of `state` into `model` and `opt`.
pub fn restore(
    dir: &Path,
    state: &CheckpointState,
    model: &mut Model,
    opt: &mut Sgd,
) -> Result<(), TrainerError> {
    let rel = Path::new(&state.tensors);
    if rel.components().count() != 1 {
        return Err(TrainerError::Checkpoint {
            path: dir.join(STATE_FILE),
            reason: format!("tensors file {:?} is not a plain file name", state.tensors),
        });
    }
    let path: PathBuf = dir.join(rel);
    let ck = |reason: String| TrainerError::Checkpoint {
        path: path.clone(),
        reason,
    };
    let saved = Tensor::read_safetensors(&path).map_err(|e| ck(e.to_string()))?;
    let params = model.named_parameters();
    tch::no_grad(|| -> Result<(), TrainerError> {
        for (name, p) in &params {
            let src = saved
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| ck(format!("no tensor for parameter {name}")))?;
            if src.size() != p.size() {
                return Err(ck(format!(
                    "parameter {name} has shape {:?} in the checkpoint, {:?} in the model",
                    src.size(),
                    p.size()
                )));
            }
            let mut p = p.shallow_clone();
            p.f_copy_(src)
                .map_err(|e| ck(format!("parameter {name}: {e}")))?;
        }
        Ok(())
    })?;
    let buffers: Vec<(String, Tensor)> = saved
        .into_iter()
        .filter(|(n, _)| n.starts_with("momentum."))
        .collect();
    opt.load_buffers(&buffers).map_err(ck)?;
    Ok(())
}

//! nnU-Net's `nnUNetPlans.json` (one configuration of it) and `dataset.json`: what a trainer
//! needs from them (patch size, batch size, poolings per axis, transpose, spacing, normalisation
//! schemes) and the channel and class names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::NnunetError;

/// The plan of one nnU-Net configuration, as patchflow records it in a store's manifest.
///
/// Sizes are in nnU-Net's transposed frame (the frame of the stored arrays): axis `i` of the
/// stored arrays is axis `transpose_forward[i]` of the source image (in patchflow's `[z, y, x]`
/// order of the NIfTI file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NnunetPlan {
    /// Always `"nnunet"`: tells this plan apart from patchflow's own.
    pub kind: String,
    /// `dataset_name` of the plans (e.g. `Dataset901_PhantomMR`).
    pub dataset_name: String,
    /// `plans_name` (e.g. `nnUNetPlans`).
    pub plans_name: String,
    /// The configuration (e.g. `3d_fullres`).
    pub configuration: String,
    /// Its `data_identifier`, the name of the preprocessed folder.
    pub data_identifier: String,
    /// The planned patch size (2 or 3 entries).
    pub patch_size: Vec<usize>,
    /// The planned batch size.
    pub batch_size: usize,
    /// Stride of every pooling stage per axis (`pool_op_kernel_sizes`, the network's strides).
    pub pool_op_kernel_sizes: Vec<Vec<usize>>,
    /// Poolings per axis: the number of stages with a stride above 1 on that axis.
    pub num_pool_per_axis: Vec<u32>,
    /// `transpose_forward`: stored axis `i` is source axis `transpose_forward[i]`.
    pub transpose_forward: [usize; 3],
    /// `transpose_backward`, its inverse.
    pub transpose_backward: [usize; 3],
    /// Target spacing of the configuration (transposed frame).
    pub spacing: Vec<f64>,
    /// Normalisation scheme per channel (`ZScoreNormalization`, `CTNormalization`, ...).
    pub normalization_schemes: Vec<String>,
    /// Whether each channel was normalised inside the non-zero mask only.
    pub use_mask_for_norm: Vec<bool>,
    /// The name of the reader/writer nnU-Net read the raw images with (e.g. `SimpleITKIO`).
    pub image_reader_writer: String,
}

/// What `dataset.json` says.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetJson {
    /// Channel names in channel order.
    pub channel_names: Vec<String>,
    /// Class value to class name (background included, the ignore label excluded).
    pub labels: BTreeMap<u16, String>,
    /// The `ignore` label value, when the dataset has one.
    pub ignore_label: Option<u16>,
}

fn plans_err(path: &Path, reason: impl Into<String>) -> NnunetError {
    NnunetError::Plans {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, NnunetError> {
    let text = std::fs::read_to_string(path).map_err(|e| NnunetError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| plans_err(path, format!("not valid JSON: {e}")))
}

/// Reads `dataset.json`.
pub fn read_dataset_json(path: &Path) -> Result<DatasetJson, NnunetError> {
    let json = read_json(path)?;
    let channels = json
        .get("channel_names")
        .or_else(|| json.get("modality"))
        .and_then(|v| v.as_object())
        .ok_or_else(|| plans_err(path, "missing object \"channel_names\""))?;
    let mut by_index = BTreeMap::new();
    for (k, v) in channels {
        let i: usize = k.parse().map_err(|_| {
            plans_err(
                path,
                format!("channel_names key {k:?} is not a channel number"),
            )
        })?;
        let name = v
            .as_str()
            .ok_or_else(|| plans_err(path, format!("channel_names[{k:?}] is not a string")))?;
        by_index.insert(i, name.to_string());
    }
    if by_index.is_empty() || by_index.keys().copied().ne(0..by_index.len()) {
        return Err(plans_err(
            path,
            "channel_names must number the channels 0, 1, 2, ... without gaps",
        ));
    }
    let labels_obj = json
        .get("labels")
        .and_then(|v| v.as_object())
        .ok_or_else(|| plans_err(path, "missing object \"labels\""))?;
    let mut labels = BTreeMap::new();
    let mut ignore_label = None;
    for (name, v) in labels_obj {
        let value = v.as_u64().ok_or_else(|| {
            plans_err(
                path,
                format!("labels[{name:?}] = {v}: only integer class values are supported (region-based training lists are not)"),
            )
        })?;
        let value = u16::try_from(value)
            .ok()
            .filter(|&v| v < u16::MAX)
            .ok_or_else(|| {
                plans_err(
                    path,
                    format!(
                        "labels[{name:?}] = {value}: class values above 65534 are not supported"
                    ),
                )
            })?;
        if name == "ignore" {
            ignore_label = Some(value);
        } else {
            labels.insert(value, name.clone());
        }
    }
    Ok(DatasetJson {
        channel_names: by_index.into_values().collect(),
        labels,
        ignore_label,
    })
}

fn usize_list(
    path: &Path,
    v: Option<&serde_json::Value>,
    what: &str,
) -> Result<Vec<usize>, NnunetError> {
    v.and_then(|v| v.as_array())
        .and_then(|a| {
            a.iter()
                .map(|x| {
                    x.as_f64()
                        .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                        .map(|f| f as usize)
                })
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            plans_err(
                path,
                format!("{what} is not a list of non-negative integers"),
            )
        })
}

fn axis_perm(
    path: &Path,
    v: Option<&serde_json::Value>,
    what: &str,
) -> Result<[usize; 3], NnunetError> {
    let l = usize_list(path, v, what)?;
    let mut seen = [false; 3];
    if l.len() != 3
        || l.iter()
            .any(|&a| a > 2 || std::mem::replace(&mut seen[a], true))
    {
        return Err(plans_err(
            path,
            format!("{what} {l:?} is not a permutation of [0, 1, 2]"),
        ));
    }
    Ok([l[0], l[1], l[2]])
}

/// Resolves `inherits_from` of a configuration.
fn resolve_config(
    path: &Path,
    configs: &serde_json::Map<String, serde_json::Value>,
    name: &str,
    depth: usize,
) -> Result<serde_json::Map<String, serde_json::Value>, NnunetError> {
    if depth > 16 {
        return Err(plans_err(
            path,
            format!("configuration {name}: inheritance deeper than 16 (a cycle?)"),
        ));
    }
    let c = configs
        .get(name)
        .and_then(|c| c.as_object())
        .ok_or_else(|| plans_err(path, format!("no configuration {name:?}")))?;
    let mut out = match c.get("inherits_from").and_then(|p| p.as_str()) {
        Some(parent) => resolve_config(path, configs, parent, depth + 1)?,
        None => serde_json::Map::new(),
    };
    for (k, v) in c {
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

/// Reads the plans file and picks the configuration whose `data_identifier` is `data_identifier`
/// (the preprocessed folder's name), preferring `3d_fullres` where several share it.
pub fn read_plan(plans_path: &Path, data_identifier: &str) -> Result<NnunetPlan, NnunetError> {
    let path = plans_path;
    let json = read_json(path)?;
    let (configuration, c) = pick_configuration(path, &json, data_identifier)?;
    let patch_size = usize_list(path, c.get("patch_size"), "patch_size")?;
    if !(2..=3).contains(&patch_size.len()) || patch_size.contains(&0) {
        return Err(plans_err(
            path,
            format!("patch_size {patch_size:?}: 2 or 3 positive entries expected"),
        ));
    }
    let batch_size = c
        .get("batch_size")
        .and_then(|b| b.as_u64())
        .filter(|&b| b > 0)
        .ok_or_else(|| plans_err(path, "batch_size is not a positive integer"))?
        as usize;
    let pool_op_kernel_sizes = strides(path, &c, patch_size.len())?;
    let num_pool_per_axis = (0..patch_size.len())
        .map(|a| pool_op_kernel_sizes.iter().filter(|s| s[a] > 1).count() as u32)
        .collect();
    let spacing = c
        .get("spacing")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
        .ok_or_else(|| plans_err(path, "spacing is not a list of numbers"))?;
    let normalization_schemes = c
        .get("normalization_schemes")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    let use_mask_for_norm = c
        .get("use_mask_for_norm")
        .and_then(|s| s.as_array())
        .map(|a| a.iter().map(|x| x.as_bool().unwrap_or(false)).collect())
        .unwrap_or_default();
    let text = |key: &str| -> String {
        json.get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .into()
    };
    Ok(NnunetPlan {
        kind: "nnunet".into(),
        dataset_name: text("dataset_name"),
        plans_name: text("plans_name"),
        configuration,
        data_identifier: data_identifier.into(),
        patch_size,
        batch_size,
        pool_op_kernel_sizes,
        num_pool_per_axis,
        transpose_forward: axis_perm(path, json.get("transpose_forward"), "transpose_forward")?,
        transpose_backward: axis_perm(path, json.get("transpose_backward"), "transpose_backward")?,
        spacing,
        normalization_schemes,
        use_mask_for_norm,
        image_reader_writer: text("image_reader_writer"),
    })
}

/// The configuration (name and entries, inheritance resolved) whose `data_identifier` is
/// `data_identifier`, `3d_fullres` first where several share it.
fn pick_configuration(
    path: &Path,
    json: &serde_json::Value,
    data_identifier: &str,
) -> Result<(String, serde_json::Map<String, serde_json::Value>), NnunetError> {
    let configs = json
        .get("configurations")
        .and_then(|c| c.as_object())
        .ok_or_else(|| plans_err(path, "missing object \"configurations\""))?;
    let mut candidates = Vec::new();
    for name in configs.keys() {
        let c = resolve_config(path, configs, name, 0)?;
        if c.get("data_identifier").and_then(|d| d.as_str()) == Some(data_identifier) {
            candidates.push((name.clone(), c));
        }
    }
    candidates.sort_by_key(|(n, _)| (n != "3d_fullres", n.clone()));
    candidates.into_iter().next().ok_or_else(|| {
        plans_err(
            path,
            format!(
                "no configuration has data_identifier {data_identifier:?} (configurations: {:?})",
                configs.keys().collect::<Vec<_>>()
            ),
        )
    })
}

/// The pooling strides per stage (`architecture.arch_kwargs.strides`, or the older
/// `pool_op_kernel_sizes`), each with one entry per axis of an `axes`-dimensional patch.
fn strides(
    path: &Path,
    c: &serde_json::Map<String, serde_json::Value>,
    axes: usize,
) -> Result<Vec<Vec<usize>>, NnunetError> {
    let strides = c
        .get("architecture")
        .and_then(|a| a.get("arch_kwargs"))
        .and_then(|a| a.get("strides"))
        .or_else(|| c.get("pool_op_kernel_sizes"))
        .ok_or_else(|| {
            plans_err(
                path,
                "no architecture.arch_kwargs.strides nor pool_op_kernel_sizes",
            )
        })?;
    let pool_op_kernel_sizes: Vec<Vec<usize>> = strides
        .as_array()
        .ok_or_else(|| plans_err(path, "strides are not a list"))?
        .iter()
        .map(|s| match s.as_u64() {
            // A single number means the same stride on every axis.
            Some(v) => Ok(vec![v as usize; axes]),
            None => usize_list(path, Some(s), "a stride"),
        })
        .collect::<Result<_, _>>()?;
    if pool_op_kernel_sizes.iter().any(|s| s.len() != axes) {
        return Err(plans_err(
            path,
            format!("strides {pool_op_kernel_sizes:?} do not match the patch's {axes} axes"),
        ));
    }
    Ok(pool_op_kernel_sizes)
}

/// The plans file of a preprocessed folder `<dataset>/<plans_name>_<configuration>`: the
/// `<plans_name>.json` beside it whose name is the longest prefix of the folder's name.
pub fn find_plans_file(config_dir: &Path) -> Result<PathBuf, NnunetError> {
    let name = config_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| plans_err(config_dir, "folder name is not UTF-8"))?;
    let parent = config_dir.parent().unwrap_or(Path::new("."));
    let mut best: Option<PathBuf> = None;
    let entries = std::fs::read_dir(parent).map_err(|e| NnunetError::io(parent, e))?;
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(f) = file.to_str() else { continue };
        let Some(stem) = f.strip_suffix(".json") else {
            continue;
        };
        if stem.is_empty() || matches!(stem, "dataset" | "dataset_fingerprint" | "splits_final") {
            continue;
        }
        if name.starts_with(&format!("{stem}_"))
            && best
                .as_ref()
                .is_none_or(|b| b.file_stem().map_or(0, |s| s.len()) < stem.len())
        {
            best = Some(e.path());
        }
    }
    best.ok_or_else(|| {
        plans_err(
            config_dir,
            format!(
                "no plans file (e.g. nnUNetPlans.json for {name}) in {}",
                parent.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_fields_from_new_and_old_plan_formats() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nnUNetPlans.json");
        std::fs::write(
            &p,
            r#"{"dataset_name":"D","plans_name":"nnUNetPlans","transpose_forward":[2,0,1],
            "transpose_backward":[1,2,0],"image_reader_writer":"SimpleITKIO",
            "configurations":{
              "3d_fullres":{"data_identifier":"nnUNetPlans_3d_fullres","batch_size":2,
                "patch_size":[44,24,28],"spacing":[2.0,1.0,1.0],
                "normalization_schemes":["ZScoreNormalization"],"use_mask_for_norm":[true],
                "architecture":{"arch_kwargs":{"strides":[[1,1,1],[1,2,2],[2,2,2],[2,1,1]]}}},
              "3d_cascade_fullres":{"inherits_from":"3d_fullres"},
              "old":{"data_identifier":"nnUNetPlans_old","batch_size":4,"patch_size":[64,64],
                "spacing":[1.0,1.0],"pool_op_kernel_sizes":[1,[2,2],[2,1]]}}}"#,
        )
        .unwrap();
        let plan = read_plan(&p, "nnUNetPlans_3d_fullres").unwrap();
        assert_eq!(plan.configuration, "3d_fullres");
        assert_eq!(plan.num_pool_per_axis, [2, 2, 2]);
        assert_eq!(plan.transpose_forward, [2, 0, 1]);
        assert_eq!(plan.patch_size, [44, 24, 28]);
        let old = read_plan(&p, "nnUNetPlans_old").unwrap();
        assert_eq!(old.num_pool_per_axis, [2, 1]);
        let err = read_plan(&p, "nnUNetPlans_2d").unwrap_err().to_string();
        assert!(
            err.contains("nnUNetPlans_2d") && err.contains("nnUNetPlans.json"),
            "{err}"
        );
        std::fs::create_dir(dir.path().join("nnUNetPlans_3d_fullres")).unwrap();
        assert_eq!(
            find_plans_file(&dir.path().join("nnUNetPlans_3d_fullres")).unwrap(),
            p
        );
    }

    #[test]
    fn dataset_json_channels_labels_and_ignore() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dataset.json");
        std::fs::write(
            &p,
            r#"{"channel_names":{"1":"T2","0":"T1"},"labels":{"background":0,"a":1,"ignore":3}}"#,
        )
        .unwrap();
        let d = read_dataset_json(&p).unwrap();
        assert_eq!(d.channel_names, ["T1", "T2"]);
        assert_eq!(d.labels.len(), 2);
        assert_eq!(d.ignore_label, Some(3));
        std::fs::write(&p, r#"{"channel_names":{"0":"CT"},"labels":{"x":[1,2]}}"#).unwrap();
        assert!(
            read_dataset_json(&p)
                .unwrap_err()
                .to_string()
                .contains("region")
        );
    }
}

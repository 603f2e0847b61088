//! A preprocessed nnU-Net configuration folder (`nnUNet_preprocessed/DatasetXXX_Name/
//! nnUNetPlans_3d_fullres`): its cases, each case's arrays and `.pkl` properties, and their
//! mapping into patchflow's store types.
//!
//! Arrays are kept as nnU-Net stores them, in its transposed frame, so that the plan's patch size
//! and poolings apply to the store directly: the image channels as float32 bit for bit (already
//! normalised by nnU-Net, so the store's normalisation is the identity) and the seg with −1
//! (outside nnU-Net's non-zero mask) replaced by the dataset's [`outside_mask_label`]. Class
//! locations are nnU-Net's own (the channel column dropped). The case's `original` geometry and
//! `crop_box` are in the source image's frame (`[z, y, x]` of its NIfTI file), converted back
//! through `transpose_backward`; `shape` and `spacing` are those of the stored arrays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use patchflow_store::{CaseMeta, ChannelMeta, Geometry, LabelData, VoxelData};
use patchflow_volume::{DType, NormScheme, Normalization};

use crate::array::{ElemKind, NdArray};
use crate::pickle::{Pickle, Value, numpy_array, read_pickle};
use crate::plans::{DatasetJson, NnunetPlan, find_plans_file, read_dataset_json, read_plan};
use crate::{NnunetError, read_b2nd, read_npy, read_npz};

/// How a folder stores its arrays.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ArrayFormat {
    /// `CASE.b2nd` and `CASE_seg.b2nd` (nnU-Net ≥ 2.6, `nnUNetDatasetBlosc2`).
    B2nd,
    /// `CASE.npz` with `data` and `seg` (older nnU-Net v2, `nnUNetDatasetNumpy`).
    Npz,
    /// Unpacked `CASE.npy` and `CASE_seg.npy`.
    Npy,
}

/// An opened preprocessed folder.
#[derive(Clone, Debug)]
pub struct PreprocessedFolder {
    /// The configuration folder.
    pub dir: PathBuf,
    /// The plans file it belongs to.
    pub plans_path: PathBuf,
    /// `dataset.json` of the dataset.
    pub dataset_json_path: PathBuf,
    /// The configuration's plan.
    pub plan: NnunetPlan,
    /// What `dataset.json` says.
    pub dataset: DatasetJson,
    /// The array format.
    pub format: ArrayFormat,
    /// Case identifiers, sorted.
    pub cases: Vec<String>,
}

/// nnU-Net's `.pkl` properties of one case, as far as patchflow uses them.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseProperties {
    /// `spacing`: the source image's spacing in its own (untransposed) `[z, y, x]` order.
    pub spacing: [f64; 3],
    /// `shape_before_cropping` (transposed frame).
    pub shape_before_cropping: [usize; 3],
    /// `bbox_used_for_cropping`, `[start, end)` per axis (transposed frame).
    pub bbox_used_for_cropping: [[usize; 2]; 3],
    /// Per class, nnU-Net's sampled voxel coordinates `[z, y, x]` (stored frame).
    pub class_locations: BTreeMap<u16, Vec<[u32; 3]>>,
    /// Keys of `class_locations` that are not single classes (regions, or nnU-Net's sampling of
    /// annotated voxels for datasets with an ignore label); they are not carried over.
    pub skipped_location_keys: Vec<String>,
    /// The source image's affine (NIfTI convention, RAS+) from `sitk_stuff` or `nibabel_stuff`.
    pub affine: Option<[[f64; 4]; 4]>,
}

/// A loaded case, as nnU-Net's dataset class returns it.
#[derive(Clone, Debug)]
pub struct NnunetCase {
    /// Case identifier.
    pub id: String,
    /// The image, float32 `[C, Z, Y, X]`.
    pub data: NdArray,
    /// The segmentation, integer `[1, Z, Y, X]`.
    pub seg: NdArray,
    /// Its properties.
    pub properties: CaseProperties,
}

/// A case mapped into patchflow's store types.
#[derive(Clone, Debug)]
pub struct StoreCase {
    /// Metadata.
    pub meta: CaseMeta,
    /// One f32 buffer per channel.
    pub channels: Vec<VoxelData>,
    /// The label map.
    pub label: LabelData,
    /// nnU-Net's class locations.
    pub class_locations: BTreeMap<u16, Vec<[u32; 3]>>,
    /// Voxels outside nnU-Net's non-zero mask (stored as the marker).
    pub outside_mask_voxels: u64,
}

/// Whether `dir` looks like a preprocessed configuration folder: `.pkl` files beside `.b2nd`,
/// `.npz` or `.npy` files, and a `dataset.json` in the folder above.
pub fn is_preprocessed_folder(dir: &Path) -> bool {
    let Some(parent) = dir.parent() else {
        return false;
    };
    if !parent.join("dataset.json").is_file() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let (mut pkl, mut arrays) = (false, false);
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        pkl |= name.ends_with(".pkl");
        arrays |= name.ends_with(".b2nd") || name.ends_with(".npz") || name.ends_with(".npy");
    }
    pkl && arrays
}

/// The stored label value for nnU-Net's −1: the first value above every class and the ignore
/// label that is not 255 (nor 65535).
pub fn outside_mask_label(dataset: &DatasetJson) -> u16 {
    let top = dataset
        .labels
        .keys()
        .copied()
        .chain(dataset.ignore_label)
        .max()
        .unwrap_or(0);
    match top + 1 {
        255 => 256,
        v => v,
    }
}

impl PreprocessedFolder {
    /// Opens a configuration folder: finds the plans file and `dataset.json` in the folder above,
    /// the plan whose `data_identifier` is the folder's name, the array format and the cases.
    pub fn open(dir: &Path) -> Result<PreprocessedFolder, NnunetError> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| NnunetError::format(dir, "folder name is not UTF-8"))?
            .to_string();
        let plans_path = find_plans_file(dir)?;
        let plan = read_plan(&plans_path, &name)?;
        let dataset_json_path = dir.parent().unwrap_or(Path::new(".")).join("dataset.json");
        let dataset = read_dataset_json(&dataset_json_path)?;
        let mut b2nd = Vec::new();
        let mut npz = Vec::new();
        let mut npy = Vec::new();
        let mut pkl = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| NnunetError::io(dir, e))? {
            let e = e.map_err(|e| NnunetError::io(dir, e))?;
            let file = e.file_name();
            let Some(f) = file.to_str() else { continue };
            if f.starts_with('.') {
                continue;
            }
            if let Some(s) = f.strip_suffix(".b2nd") {
                if !s.ends_with("_seg") {
                    b2nd.push(s.to_string());
                }
            } else if let Some(s) = f.strip_suffix(".npz") {
                npz.push(s.to_string());
            } else if let Some(s) = f.strip_suffix(".npy") {
                if !s.ends_with("_seg") {
                    npy.push(s.to_string());
                }
            } else if let Some(s) = f.strip_suffix(".pkl") {
                pkl.push(s.to_string());
            }
        }
        let (format, mut cases) = if !b2nd.is_empty() {
            if !npz.is_empty() {
                return Err(NnunetError::format(
                    dir,
                    "holds both .b2nd and .npz cases (nnU-Net refuses such a folder too)",
                ));
            }
            (ArrayFormat::B2nd, b2nd)
        } else if !npz.is_empty() {
            (ArrayFormat::Npz, npz)
        } else if !npy.is_empty() {
            (ArrayFormat::Npy, npy)
        } else {
            return Err(NnunetError::format(dir, "no .b2nd, .npz or .npy cases"));
        };
        cases.sort();
        for c in &cases {
            if !pkl.contains(c) {
                return Err(NnunetError::Case {
                    case: c.clone(),
                    reason: format!(
                        "no properties file {}",
                        dir.join(format!("{c}.pkl")).display()
                    ),
                });
            }
        }
        Ok(PreprocessedFolder {
            dir: dir.to_path_buf(),
            plans_path,
            dataset_json_path,
            plan,
            dataset,
            format,
            cases,
        })
    }

    /// Every file a case is read from.
    pub fn case_files(&self, id: &str) -> Vec<PathBuf> {
        let f = |s: String| self.dir.join(s);
        let mut v = match self.format {
            ArrayFormat::B2nd => vec![f(format!("{id}.b2nd")), f(format!("{id}_seg.b2nd"))],
            ArrayFormat::Npz => vec![f(format!("{id}.npz"))],
            ArrayFormat::Npy => vec![f(format!("{id}.npy")), f(format!("{id}_seg.npy"))],
        };
        v.push(f(format!("{id}.pkl")));
        v
    }

    /// Loads a case: arrays and properties, checked against each other and the plan.
    pub fn load_case(&self, id: &str) -> Result<NnunetCase, NnunetError> {
        let files = self.case_files(id);
        let (data, seg) = match self.format {
            ArrayFormat::B2nd => (read_b2nd(&files[0])?, read_b2nd(&files[1])?),
            ArrayFormat::Npy => (read_npy(&files[0])?, read_npy(&files[1])?),
            ArrayFormat::Npz => {
                let mut v = read_npz(&files[0], &["data", "seg"])?.into_iter();
                match (v.next(), v.next()) {
                    (Some(data), Some(seg)) => (data, seg),
                    _ => return Err(NnunetError::format(&files[0], "no data and seg arrays")),
                }
            }
        };
        let case_err = |reason: String| NnunetError::Case {
            case: id.to_string(),
            reason,
        };
        if data.dtype.kind != ElemKind::Float || data.dtype.size != 4 {
            return Err(case_err(format!(
                "image {} is {}, nnU-Net writes float32",
                files[0].display(),
                data.dtype.name()
            )));
        }
        if data.shape.len() != 4 || seg.shape.len() != 4 {
            return Err(case_err(format!(
                "image shape {:?} and seg shape {:?}: 4 axes [C, Z, Y, X] expected",
                data.shape, seg.shape
            )));
        }
        if data.shape[0] != self.dataset.channel_names.len() {
            return Err(case_err(format!(
                "image has {} channels, dataset.json names {}",
                data.shape[0],
                self.dataset.channel_names.len()
            )));
        }
        if seg.shape[0] != 1 || seg.shape[1..] != data.shape[1..] {
            return Err(case_err(format!(
                "seg shape {:?} does not match image shape {:?} (one channel expected)",
                seg.shape, data.shape
            )));
        }
        if !matches!(seg.dtype.kind, ElemKind::Int | ElemKind::UInt) {
            return Err(case_err(format!(
                "seg is {}, an integer type expected",
                seg.dtype.name()
            )));
        }
        let pkl = files.last().cloned().unwrap_or_default();
        let properties = read_properties(&pkl)?;
        let shape = [data.shape[1], data.shape[2], data.shape[3]];
        for (class, locs) in &properties.class_locations {
            if let Some(p) = locs
                .iter()
                .find(|p| (0..3).any(|a| p[a] as usize >= shape[a]))
            {
                return Err(case_err(format!(
                    "class {class} location {p:?} lies outside the arrays of shape {shape:?} ({})",
                    pkl.display()
                )));
            }
        }
        Ok(NnunetCase {
            id: id.to_string(),
            data,
            seg,
            properties,
        })
    }

    /// Maps a loaded case into patchflow's store types.
    pub fn to_store_case(&self, case: NnunetCase) -> Result<StoreCase, NnunetError> {
        let case_err = |reason: String| NnunetError::Case {
            case: case.id.clone(),
            reason,
        };
        let marker = outside_mask_label(&self.dataset);
        let shape = [case.data.shape[1], case.data.shape[2], case.data.shape[3]];
        let n: usize = shape.iter().product();
        let wide = marker > 254
            || self.dataset.labels.keys().any(|&c| c > 254)
            || self.dataset.ignore_label.is_some_and(|c| c > 254);
        let mut labels16: Vec<u16> = Vec::with_capacity(n);
        let mut class_voxels: BTreeMap<u16, u64> = BTreeMap::new();
        let mut outside = 0u64;
        for i in 0..n {
            let v = case.seg.get_i64(i).unwrap_or(i64::MIN);
            let stored = if v == -1 {
                outside += 1;
                marker
            } else if (0..i64::from(marker)).contains(&v) {
                *class_voxels.entry(v as u16).or_default() += 1;
                v as u16
            } else {
                return Err(case_err(format!(
                    "seg value {v} at voxel {i}: only -1 and 0..{marker} (the classes of dataset.json) are expected"
                )));
            };
            labels16.push(stored);
        }
        let label = if wide {
            LabelData::U16(labels16)
        } else {
            LabelData::U8(labels16.into_iter().map(|v| v as u8).collect())
        };
        let channels: Vec<VoxelData> = case
            .data
            .data
            .chunks_exact(n * 4)
            .map(|c| {
                VoxelData::F32(
                    c.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            })
            .collect();
        let plan = &self.plan;
        let props = &case.properties;
        let tf = plan.transpose_forward;
        // Source-frame values from transposed-frame ones: source axis tf[i] is stored axis i.
        let mut original_shape = [0usize; 3];
        let mut crop_box = [[0usize; 2]; 3];
        for i in 0..3 {
            original_shape[tf[i]] = props.shape_before_cropping[i];
            crop_box[tf[i]] = props.bbox_used_for_cropping[i];
        }
        let transposed_source_spacing: Vec<f64> = tf.iter().map(|&a| props.spacing[a]).collect();
        let spacing = match plan.spacing.len() {
            3 => [plan.spacing[0], plan.spacing[1], plan.spacing[2]],
            2 => [
                transposed_source_spacing[0],
                plan.spacing[0],
                plan.spacing[1],
            ],
            k => return Err(case_err(format!("plan spacing has {k} entries"))),
        };
        let affine = props.affine.unwrap_or_else(|| {
            let s = props.spacing;
            [
                [s[2], 0.0, 0.0, 0.0],
                [0.0, s[1], 0.0, 0.0],
                [0.0, 0.0, s[0], 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ]
        });
        let channel_meta = self
            .dataset
            .channel_names
            .iter()
            .enumerate()
            .map(|(c, name)| ChannelMeta {
                name: name.clone(),
                dtype: DType::F32,
                norm: Normalization {
                    scheme: match plan.normalization_schemes.get(c).map(String::as_str) {
                        Some("CTNormalization") => NormScheme::Ct,
                        Some("ZScoreNormalization") => NormScheme::ZScore,
                        _ => NormScheme::None,
                    },
                    ..Normalization::IDENTITY
                },
            })
            .collect();
        let meta = CaseMeta {
            id: case.id.clone(),
            shape,
            spacing,
            original: Geometry {
                shape: original_shape,
                spacing: props.spacing,
                affine,
            },
            crop_box,
            channels: channel_meta,
            label_dtype: label.dtype(),
            label_names: self.dataset.labels.clone(),
            class_voxels,
            ignore_label: self.dataset.ignore_label,
            outside_mask_label: (outside > 0).then_some(marker),
        };
        Ok(StoreCase {
            meta,
            channels,
            label,
            class_locations: case.properties.class_locations,
            outside_mask_voxels: outside,
        })
    }
}

/// Reads nnU-Net's `.pkl` properties of a case.
pub fn read_properties(path: &Path) -> Result<CaseProperties, NnunetError> {
    let p = read_pickle(path)?;
    properties_from_pickle(path, &p)
}

fn field<'a>(p: &'a Pickle, path: &Path, key: &str) -> Result<&'a Value, NnunetError> {
    p.get(&p.root, key)
        .ok_or_else(|| NnunetError::format(path, format!("properties have no {key:?}")))
}

fn triple_f64(p: &Pickle, path: &Path, v: &Value, what: &str) -> Result<[f64; 3], NnunetError> {
    let nums: Option<Vec<f64>> = match p.seq(v) {
        Some(s) => s.iter().map(|x| p.number(x)).collect(),
        None => numpy_array(p, v, path)?.map(|a| (0..a.len()).map(|i| a.get_f64(i)).collect()),
    };
    match nums.as_deref() {
        Some(&[a, b, c]) => Ok([a, b, c]),
        _ => Err(NnunetError::format(
            path,
            format!("{what} is not three numbers"),
        )),
    }
}

fn triple_usize(p: &Pickle, path: &Path, v: &Value, what: &str) -> Result<[usize; 3], NnunetError> {
    let t = triple_f64(p, path, v, what)?;
    if t.iter().any(|x| *x < 0.0 || x.fract() != 0.0) {
        return Err(NnunetError::format(
            path,
            format!("{what} {t:?} is not three non-negative integers"),
        ));
    }
    Ok(t.map(|x| x as usize))
}

/// Interprets the properties dict of a pickle.
pub fn properties_from_pickle(path: &Path, p: &Pickle) -> Result<CaseProperties, NnunetError> {
    if p.dict(&p.root).is_none() {
        return Err(NnunetError::format(path, "properties are not a dict"));
    }
    let spacing = triple_f64(p, path, field(p, path, "spacing")?, "spacing")?;
    let shape_before_cropping = triple_usize(
        p,
        path,
        field(p, path, "shape_before_cropping")?,
        "shape_before_cropping",
    )?;
    let bbox_v = field(p, path, "bbox_used_for_cropping")?;
    let bbox_rows = p.seq(bbox_v).filter(|r| r.len() == 3).ok_or_else(|| {
        NnunetError::format(
            path,
            "bbox_used_for_cropping is not three [start, end) pairs",
        )
    })?;
    let mut bbox = [[0usize; 2]; 3];
    for (a, row) in bbox_rows.iter().enumerate() {
        let pair: Option<Vec<i64>> = p
            .seq(row)
            .and_then(|r| r.iter().map(|x| p.integer(x)).collect::<Option<Vec<_>>>());
        match pair.as_deref() {
            Some(&[s, e]) if 0 <= s && s <= e => bbox[a] = [s as usize, e as usize],
            _ => {
                return Err(NnunetError::format(
                    path,
                    format!("bbox_used_for_cropping[{a}] is not a [start, end) pair"),
                ));
            }
        }
    }
    let mut class_locations = BTreeMap::new();
    let mut skipped = Vec::new();
    let locs = field(p, path, "class_locations")?;
    let entries = p
        .dict(locs)
        .ok_or_else(|| NnunetError::format(path, "class_locations is not a dict"))?;
    for (k, v) in entries {
        let Some(class) = p.integer(k) else {
            skipped.push(crate::pickle::to_json(p, k).to_string());
            continue;
        };
        let class = u16::try_from(class)
            .ok()
            .filter(|&c| c < u16::MAX)
            .ok_or_else(|| {
                NnunetError::format(path, format!("class_locations key {class} out of range"))
            })?;
        let arr = numpy_array(p, v, path)?.ok_or_else(|| {
            NnunetError::format(
                path,
                format!("class_locations[{class}] is not a numpy array"),
            )
        })?;
        let rows = match arr.shape.as_slice() {
            [n, 4] => *n,
            [0] | [0, _] => 0,
            s => {
                return Err(NnunetError::format(
                    path,
                    format!(
                        "class_locations[{class}] has shape {s:?}, [N, 4] (channel, z, y, x) expected"
                    ),
                ));
            }
        };
        let mut out = Vec::with_capacity(rows);
        for r in 0..rows {
            let mut xyz = [0u32; 3];
            for (a, slot) in xyz.iter_mut().enumerate() {
                let v = arr.get_i64(r * 4 + 1 + a).unwrap_or(-1);
                *slot = u32::try_from(v).map_err(|_| {
                    NnunetError::format(
                        path,
                        format!("class_locations[{class}] row {r}: coordinate {v}"),
                    )
                })?;
            }
            out.push(xyz);
        }
        class_locations.insert(class, out);
    }
    Ok(CaseProperties {
        spacing,
        shape_before_cropping,
        bbox_used_for_cropping: bbox,
        class_locations,
        skipped_location_keys: skipped,
        affine: source_affine(p, path, spacing)?,
    })
}

/// The source image's NIfTI affine (RAS+): from `sitk_stuff` (ITK's LPS origin and direction,
/// axes x, y, z) or from `nibabel_stuff` (the reoriented affine where nnU-Net reoriented, else
/// the original one).
fn source_affine(
    p: &Pickle,
    path: &Path,
    spacing_zyx: [f64; 3],
) -> Result<Option<[[f64; 4]; 4]>, NnunetError> {
    if let Some(sitk) = p.get(&p.root, "sitk_stuff") {
        let origin = p
            .get(sitk, "origin")
            .map(|v| seq_f64(p, path, v))
            .transpose()?;
        let direction = p
            .get(sitk, "direction")
            .map(|v| seq_f64(p, path, v))
            .transpose()?;
        let spacing = p
            .get(sitk, "spacing")
            .map(|v| seq_f64(p, path, v))
            .transpose()?;
        if let (Some(o), Some(d), Some(s)) = (origin, direction, spacing)
            && o.len() == 3
            && d.len() == 9
            && s.len() == 3
        {
            let mut a = [[0.0; 4]; 4];
            for r in 0..3 {
                // LPS to RAS: negate the first two world axes.
                let sign = if r < 2 { -1.0 } else { 1.0 };
                for c in 0..3 {
                    a[r][c] = sign * d[r * 3 + c] * s[c] + 0.0;
                }
                a[r][3] = sign * o[r] + 0.0;
            }
            a[3][3] = 1.0;
            return Ok(Some(a));
        }
    }
    if let Some(nib) = p.get(&p.root, "nibabel_stuff") {
        let v = p
            .get(nib, "reoriented_affine")
            .or_else(|| p.get(nib, "original_affine"));
        if let Some(v) = v {
            let m = seq_f64(p, path, v)?;
            if m.len() == 16 {
                let mut a = [[0.0; 4]; 4];
                for r in 0..4 {
                    for c in 0..4 {
                        a[r][c] = m[r * 4 + c];
                    }
                }
                return Ok(Some(a));
            }
        }
    }
    let _ = spacing_zyx;
    Ok(None)
}

/// Numbers of a tuple, list (nested lists flattened) or numpy array.
fn seq_f64(p: &Pickle, path: &Path, v: &Value) -> Result<Vec<f64>, NnunetError> {
    if let Some(a) = numpy_array(p, v, path)? {
        return Ok((0..a.len()).map(|i| a.get_f64(i)).collect());
    }
    let Some(items) = p.seq(v) else {
        return Err(NnunetError::format(
            path,
            format!("{v:?} is not a sequence of numbers"),
        ));
    };
    let mut out = Vec::new();
    for x in items {
        match p.number(x) {
            Some(f) => out.push(f),
            None => out.extend(seq_f64(p, path, x)?),
        }
    }
    Ok(out)
}

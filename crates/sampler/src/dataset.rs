//! A store folder opened for sampling.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use patchflow_store::{ArrayId, CaseReader, ChunkCache, MANIFEST_FILE, Manifest};
use patchflow_volume::{DType, Normalization};

use crate::SamplerError;
use crate::outside::OutsideMask;
use crate::plan::CaseView;

/// Ignore label served with `u8` labels (every class below 255).
pub const IGNORE_U8: u16 = 255;
/// Ignore label served with `u16` labels.
pub const IGNORE_U16: u16 = u16::MAX;

/// What the sampler precomputes about one case at open time.
#[derive(Clone, Debug)]
pub(crate) struct CaseInfo {
    /// Foreground classes with stored locations, ascending (no 0, no ignore label).
    pub fg_classes: Vec<u16>,
    /// Whether the case has background voxels.
    pub has_background: bool,
    /// Stored element type and normalisation per channel.
    pub channels: Vec<(DType, Normalization)>,
    /// Stored label element type.
    pub label_dtype: DType,
    /// The case's own ignore label, mapped to the dataset's where they differ.
    pub label_remap: Option<(u16, u16)>,
    /// nnU-Net's outside-mask marker of the case, when it has one.
    pub outside: Option<OutsideMask>,
}

/// A store folder opened for sampling: its manifest's cases, each a [`CaseReader`] sharing one
/// [`ChunkCache`].
pub struct Dataset {
    name: String,
    dir: PathBuf,
    cases: Vec<Arc<CaseReader>>,
    info: Vec<CaseInfo>,
    num_channels: usize,
    label_names: BTreeMap<u16, String>,
    label_dtype: DType,
    ignore_label: u16,
    classes: Vec<u16>,
    any_outside_mask: bool,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("cases", &self.cases.len())
            .field("num_channels", &self.num_channels)
            .field("label_dtype", &self.label_dtype)
            .field("classes", &self.classes)
            .finish()
    }
}

/// Rejects manifest file entries that would leave the store folder.
fn case_path(dir: &Path, file: &str) -> Result<PathBuf, SamplerError> {
    let rel = Path::new(file);
    let plain = !file.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(SamplerError::Dataset {
            path: dir.join(MANIFEST_FILE),
            reason: format!("case file {file:?} is not a relative path inside the store folder"),
        });
    }
    Ok(dir.join(rel))
}

/// Refuses an outside-mask marker that could be mistaken for a class, for padding, or for the
/// case's own ignore label.
fn check_marker(reader: &CaseReader) -> Result<(), SamplerError> {
    reader
        .meta()
        .check_outside_mask_label(|c| !reader.class_locations(c).is_empty())
        .map_err(|reason| SamplerError::Dataset {
            path: reader.path().to_path_buf(),
            reason: format!("case {}: {reason}", reader.meta().id),
        })
}

impl Dataset {
    /// Opens the store folder `store_dir`: reads its manifest, opens every case (sharing
    /// `cache`) and checks that the cases form one dataset (same number of image channels,
    /// `u8`/`u16` labels, no class value that collides with the ignore label, outside-mask
    /// markers that are no class of their case and fit the served label type).
    pub fn open(
        name: &str,
        store_dir: &Path,
        cache: Arc<ChunkCache>,
    ) -> Result<Dataset, SamplerError> {
        let cases = open_cases(store_dir, &cache)?;
        let num_channels = check_channels(&cases)?;
        let (label_dtype, ignore_label, label_names) = served_labels(store_dir, &cases)?;
        let mut info = Vec::with_capacity(cases.len());
        let mut classes = BTreeSet::new();
        for reader in &cases {
            let case = case_info(reader, num_channels, ignore_label)?;
            classes.extend(case.fg_classes.iter().copied());
            info.push(case);
        }
        let any_outside_mask = info.iter().any(|i| i.outside.is_some());

        tracing::info!(
            dataset = name,
            dir = %store_dir.display(),
            cases = cases.len(),
            channels = num_channels,
            label_dtype = %label_dtype,
            classes = ?classes,
            "dataset opened"
        );
        Ok(Dataset {
            name: name.to_string(),
            dir: store_dir.to_path_buf(),
            cases,
            info,
            num_channels,
            label_names,
            label_dtype,
            ignore_label,
            classes: classes.into_iter().collect(),
            any_outside_mask,
        })
    }

    /// Whether some case carries nnU-Net's outside-mask marker (see the `outside` module).
    pub(crate) fn any_outside_mask(&self) -> bool {
        self.any_outside_mask
    }

    /// For readers of whole cases (validation, inference): serves the voxels of case `case`
    /// outside nnU-Net's non-zero mask as batches do. `image` is the case's `[C, Z, Y, X]`
    /// channels with their normalisation applied, `label` its `[Z, Y, X]` stored labels;
    /// where the label is the case's `outside_mask_label`, it becomes 0 and every channel
    /// with a deferred z-score becomes 0. Cases without a marker are left as they are.
    pub fn clear_outside_mask(&self, case: usize, image: &mut [f32], label: &mut [u16]) {
        let Some(outside) = self.info.get(case).and_then(|i| i.outside.as_ref()) else {
            return;
        };
        outside.zero_source(image, label);
        outside.clear_label(label);
    }

    /// The name the dataset was opened under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cases, ordered by case id.
    pub fn cases(&self) -> &[Arc<CaseReader>] {
        &self.cases
    }

    /// Index of the case with identifier `id`.
    pub fn case_index(&self, id: &str) -> Option<usize> {
        self.cases
            .binary_search_by(|c| c.meta().id.as_str().cmp(id))
            .ok()
    }

    /// Number of image channels (the same in every case).
    pub fn num_channels(&self) -> usize {
        self.num_channels
    }

    /// Class names, merged over the cases (the first case naming a class wins).
    pub fn label_names(&self) -> &BTreeMap<u16, String> {
        &self.label_names
    }

    /// Value of padded label voxels: 255 when every class is at most 254 (`u8` labels), else
    /// 65535 (`u16` labels).
    pub fn ignore_label(&self) -> u16 {
        self.ignore_label
    }

    /// Element type of served labels: `U8`, or `U16` when any class exceeds 254.
    pub fn label_dtype(&self) -> DType {
        self.label_dtype
    }

    /// Foreground classes with stored locations in at least one case, ascending.
    pub fn classes(&self) -> Vec<u16> {
        self.classes.clone()
    }

    /// Foreground classes with stored locations in case `case`, ascending (empty when out of range).
    pub fn case_classes(&self, case: usize) -> &[u16] {
        self.info.get(case).map_or(&[], |i| i.fg_classes.as_slice())
    }

    /// Whether any case has background (class 0) voxels.
    pub fn has_background(&self) -> bool {
        self.info.iter().any(|i| i.has_background)
    }

    pub(crate) fn view(&self, case: usize) -> Option<CaseRef<'_>> {
        Some(CaseRef {
            reader: self.cases.get(case)?,
            info: self.info.get(case)?,
        })
    }
}

/// The cases the manifest of `store_dir` lists, opened (sharing `cache`) and ordered by id.
fn open_cases(
    store_dir: &Path,
    cache: &Arc<ChunkCache>,
) -> Result<Vec<Arc<CaseReader>>, SamplerError> {
    let manifest = Manifest::load(store_dir)?.ok_or_else(|| {
        SamplerError::NotFound(format!(
            "no {MANIFEST_FILE} in store folder {}",
            store_dir.display()
        ))
    })?;
    if manifest.cases.is_empty() {
        return Err(SamplerError::Dataset {
            path: store_dir.join(MANIFEST_FILE),
            reason: "the manifest lists no cases".into(),
        });
    }
    let mut entries: Vec<_> = manifest.cases.iter().collect();
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    for pair in entries.windows(2) {
        if pair[0].id == pair[1].id {
            return Err(SamplerError::Dataset {
                path: store_dir.join(MANIFEST_FILE),
                reason: format!("case {:?} is listed twice", pair[0].id),
            });
        }
    }

    let mut cases = Vec::with_capacity(entries.len());
    for entry in &entries {
        let path = case_path(store_dir, &entry.file)?;
        let reader = CaseReader::open(&path, Arc::clone(cache))?;
        if reader.meta().id != entry.id {
            return Err(SamplerError::Dataset {
                path,
                reason: format!(
                    "the manifest lists case {:?} but the file holds case {:?}",
                    entry.id,
                    reader.meta().id
                ),
            });
        }
        cases.push(Arc::new(reader));
    }
    Ok(cases)
}

/// The number of image channels, which every case must share (names should agree), after
/// checking that every case stores `u8` or `u16` labels.
fn check_channels(cases: &[Arc<CaseReader>]) -> Result<usize, SamplerError> {
    let first = cases[0].meta();
    let num_channels = first.channels.len();
    for reader in cases {
        let meta = reader.meta();
        if meta.channels.len() != num_channels {
            return Err(SamplerError::Dataset {
                path: reader.path().to_path_buf(),
                reason: format!(
                    "case {} has {} image channel(s), case {} has {}",
                    meta.id,
                    meta.channels.len(),
                    first.id,
                    num_channels
                ),
            });
        }
        for (c, (a, b)) in meta.channels.iter().zip(&first.channels).enumerate() {
            if a.name != b.name {
                tracing::warn!(
                    case = %meta.id, channel = c, name = %a.name, expected = %b.name,
                    "channel names differ between cases"
                );
            }
        }
        if !matches!(meta.label_dtype, DType::U8 | DType::U16) {
            return Err(SamplerError::Dataset {
                path: reader.path().to_path_buf(),
                reason: format!(
                    "case {}: labels are stored as {}, expected u8 or u16",
                    meta.id, meta.label_dtype
                ),
            });
        }
    }
    Ok(num_channels)
}

/// The served label type and ignore label, decided by the classes in use (excluding each
/// case's own ignore label; outside-mask markers must survive until they are cleared, so they
/// count too), and the label names of every case.
fn served_labels(
    store_dir: &Path,
    cases: &[Arc<CaseReader>],
) -> Result<(DType, u16, BTreeMap<u16, String>), SamplerError> {
    let mut used: BTreeSet<u16> = BTreeSet::new();
    let mut label_names = BTreeMap::new();
    for reader in cases {
        let meta = reader.meta();
        for (&class, &count) in &meta.class_voxels {
            if count > 0 && Some(class) != meta.ignore_label {
                used.insert(class);
            }
        }
        if let Some(marker) = meta.outside_mask_label {
            check_marker(reader)?;
            used.insert(marker);
        }
        for (class, label) in &meta.label_names {
            label_names.entry(*class).or_insert_with(|| label.clone());
        }
    }
    if used.contains(&IGNORE_U16) {
        return Err(SamplerError::Dataset {
            path: store_dir.to_path_buf(),
            reason: format!(
                "class {IGNORE_U16} is used, but it is reserved as the ignore label of u16 labels"
            ),
        });
    }
    let (label_dtype, ignore_label) = if used.iter().any(|&c| c >= IGNORE_U8) {
        (DType::U16, IGNORE_U16)
    } else {
        (DType::U8, IGNORE_U8)
    };
    Ok((label_dtype, ignore_label, label_names))
}

/// What the sampler precomputes about the case of `reader` in a dataset of `num_channels`
/// channels serving `ignore_label`.
fn case_info(
    reader: &CaseReader,
    num_channels: usize,
    ignore_label: u16,
) -> Result<CaseInfo, SamplerError> {
    let meta = reader.meta();
    let fg_classes: Vec<u16> = {
        let mut v: Vec<u16> = reader
            .classes_with_locations()
            .into_iter()
            .filter(|&c| {
                c != 0 && Some(c) != meta.ignore_label && !reader.class_locations(c).is_empty()
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let label_remap = match meta.ignore_label {
        Some(own) if own != ignore_label => Some((own, ignore_label)),
        _ => None,
    };
    let channels = (0..num_channels)
        .map(|c| {
            let dtype = reader.dtype(ArrayId::Image(c))?;
            let norm = meta
                .channels
                .get(c)
                .map_or(Normalization::IDENTITY, |m| m.norm);
            Ok((dtype, norm))
        })
        .collect::<Result<Vec<_>, SamplerError>>()?;
    Ok(CaseInfo {
        fg_classes,
        has_background: meta.class_voxels.get(&0).is_some_and(|&n| n > 0),
        channels,
        label_dtype: meta.label_dtype,
        label_remap,
        outside: OutsideMask::of(meta),
    })
}

/// A case of a dataset as placement sees it.
#[derive(Copy, Clone)]
pub(crate) struct CaseRef<'a> {
    pub reader: &'a CaseReader,
    pub info: &'a CaseInfo,
}

impl CaseView for CaseRef<'_> {
    fn id(&self) -> &str {
        &self.reader.meta().id
    }

    fn shape(&self) -> [usize; 3] {
        self.reader.meta().shape
    }

    fn foreground_classes(&self) -> &[u16] {
        &self.info.fg_classes
    }

    fn locations(&self, class: u16) -> &[[u32; 3]] {
        self.reader.class_locations(class)
    }

    fn has_background(&self) -> bool {
        self.info.has_background
    }

    fn label_at(&self, voxel: [usize; 3]) -> Result<u16, SamplerError> {
        let origin = voxel.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        let stored = self.stored_label_at(origin)?;
        // A voxel outside nnU-Net's mask is served as background.
        Ok(match &self.info.outside {
            Some(o) if o.label == stored => 0,
            _ => stored,
        })
    }
}

impl CaseRef<'_> {
    /// The stored label value at one in-volume voxel.
    fn stored_label_at(&self, origin: [i64; 3]) -> Result<u16, SamplerError> {
        match self.info.label_dtype {
            DType::U16 => {
                let mut out = [0u16; 1];
                self.reader
                    .read_box(ArrayId::Label, origin, [1, 1, 1], u16::MAX, &mut out)?;
                Ok(out[0])
            }
            _ => {
                let mut out = [0u8; 1];
                self.reader
                    .read_box(ArrayId::Label, origin, [1, 1, 1], u8::MAX, &mut out)?;
                Ok(u16::from(out[0]))
            }
        }
    }
}

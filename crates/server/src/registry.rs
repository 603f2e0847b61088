//! The datasets a daemon serves: store folders opened once at start-up, each with its sampler
//! and its precomputed description.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use patchflow_proto::v1 as pb;
use patchflow_sampler::SamplerError;
use patchflow_sampler::{Dataset, Sampler};
use patchflow_store::{ChunkCache, MANIFEST_FILE, Manifest, StoreLocation};
use patchflow_volume::{DType, Normalization};

use crate::ServerError;
use crate::damage::SetAside;
use crate::error::StreamError;

/// One served dataset.
pub(crate) struct Entry {
    /// The sampler over the dataset (holds the dataset).
    pub sampler: Arc<Sampler>,
    /// The store folder.
    pub path: PathBuf,
    /// The answer of DescribeDataset without the set-aside cases (fixed at start-up).
    description: pb::DatasetDescription,
    /// Cases set aside because their stored data turned out damaged.
    pub set_aside: SetAside,
}

impl Entry {
    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        self.sampler.dataset()
    }

    /// The answer of DescribeDataset now.
    pub fn describe(&self) -> pb::DatasetDescription {
        pb::DatasetDescription {
            set_aside: self.set_aside.wire(),
            ..self.description.clone()
        }
    }

    /// The dataset's line in ListDatasets now.
    pub fn summary(&self) -> pb::DatasetSummary {
        let dataset = self.dataset();
        pb::DatasetSummary {
            name: dataset.name().to_owned(),
            num_cases: u32::try_from(dataset.cases().len()).unwrap_or(u32::MAX),
            num_channels: u32::try_from(dataset.num_channels()).unwrap_or(u32::MAX),
            set_aside: self.set_aside.wire(),
        }
    }
}

/// Every served dataset, by name.
pub(crate) struct Registry {
    entries: BTreeMap<String, Arc<Entry>>,
}

impl Registry {
    /// Opens every store named by `paths` (a store, or a folder of stores) with one shared cache.
    pub fn open(paths: &[PathBuf], cache: &Arc<ChunkCache>) -> Result<Registry, ServerError> {
        let mut entries: BTreeMap<String, Arc<Entry>> = BTreeMap::new();
        for path in paths {
            for store in store_dirs(path)? {
                let name = dataset_name(&store)?;
                if let Some(first) = entries.get(&name) {
                    return Err(ServerError::DuplicateDataset {
                        name,
                        first: first.path.clone(),
                        second: store,
                    });
                }
                let dataset =
                    Dataset::open(&name, &store, Arc::clone(cache)).map_err(|source| {
                        ServerError::Store {
                            path: store.clone(),
                            source,
                        }
                    })?;
                let description = describe(&dataset);
                tracing::info!(
                    dataset = %name,
                    path = %store.display(),
                    cases = dataset.cases().len(),
                    channels = dataset.num_channels(),
                    "serving dataset"
                );
                let set_aside = SetAside::new(&name, dataset.cases().len());
                let entry = Entry {
                    sampler: Arc::new(Sampler::new(Arc::new(dataset))),
                    path: store,
                    description,
                    set_aside,
                };
                entries.insert(name, Arc::new(entry));
            }
        }
        Ok(Registry { entries })
    }

    /// The dataset called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Entry>> {
        self.entries.get(name)
    }

    /// Every dataset, ordered by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<Entry>)> {
        self.entries.iter()
    }

    /// The dataset called `name`, or NOT_FOUND naming every served dataset.
    pub fn find(&self, name: &str) -> Result<&Arc<Entry>, StreamError> {
        self.get(name).ok_or_else(|| {
            let served: Vec<&str> = self.entries.keys().map(String::as_str).collect();
            StreamError::UnknownDataset {
                name: name.to_owned(),
                served: served.join(", "),
            }
        })
    }
}

/// The store folders `path` stands for: itself when it holds a manifest, else its sub-folders
/// that do (sorted).
fn store_dirs(path: &Path) -> Result<Vec<PathBuf>, ServerError> {
    let store_err = |source: patchflow_store::StoreError| ServerError::Store {
        path: path.to_path_buf(),
        source: SamplerError::Store(source),
    };
    if let StoreLocation::S3(location) = StoreLocation::from_path(path).map_err(store_err)? {
        // In object storage: the prefix itself, or the "sub-folders" holding a manifest.
        if Manifest::load(path).map_err(store_err)?.is_some() {
            return Ok(vec![path.to_path_buf()]);
        }
        let mut stores = Vec::new();
        for sub in patchflow_store::list_folders(&location).map_err(store_err)? {
            let sub = sub.to_path();
            if Manifest::load(&sub).map_err(store_err)?.is_some() {
                stores.push(sub);
            }
        }
        if stores.is_empty() {
            return Err(ServerError::NotAStore {
                path: path.to_path_buf(),
            });
        }
        return Ok(stores);
    }
    let io = |what, source| ServerError::Io {
        what,
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| io("reading store folder", e))?;
    if !meta.is_dir() {
        return Err(ServerError::NotAStore {
            path: path.to_path_buf(),
        });
    }
    if path.join(MANIFEST_FILE).is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut stores = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| io("listing store folder", e))? {
        let entry = entry.map_err(|e| io("listing store folder", e))?;
        let sub = entry.path();
        if sub.is_dir() && sub.join(MANIFEST_FILE).is_file() {
            stores.push(sub);
        }
    }
    if stores.is_empty() {
        return Err(ServerError::NotAStore {
            path: path.to_path_buf(),
        });
    }
    stores.sort();
    Ok(stores)
}

/// The dataset name of a store folder: the folder's own name, which must follow the identifier
/// rule of case ids.
fn dataset_name(store: &Path) -> Result<String, ServerError> {
    if let Ok(StoreLocation::S3(location)) = StoreLocation::from_path(store) {
        let name = location.name().to_owned();
        return check_dataset_name(store, name);
    }
    // A path like "." or "/data/x/.." has no usable file name: resolve it first.
    let resolved = store.canonicalize().map_err(|source| ServerError::Io {
        what: "resolving store folder",
        path: store.display().to_string(),
        source,
    })?;
    let name = resolved
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| ServerError::NotAStore {
            path: store.to_path_buf(),
        })?;
    check_dataset_name(store, name)
}

/// `name` as the dataset name of `store`, if it follows the identifier rule.
fn check_dataset_name(store: &Path, name: String) -> Result<String, ServerError> {
    // Requests name datasets by identifier; a folder that breaks the rule could never be asked
    // for, so it is refused here rather than served unreachable.
    patchflow_store::validate_case_id(&name).map_err(|e| ServerError::DatasetName {
        path: store.to_path_buf(),
        name: name.clone(),
        reason: match e {
            patchflow_store::StoreError::InvalidId { reason, .. } => reason,
            other => other.to_string(),
        },
    })?;
    Ok(name)
}

/// Wire form of a channel's normalisation.
pub(crate) fn normalization(norm: &Normalization) -> pb::Normalization {
    let [clip_lo, clip_hi] = norm.clip.unwrap_or([0.0, 0.0]);
    pb::Normalization {
        scheme: norm.scheme.name().to_owned(),
        has_clip: norm.clip.is_some(),
        clip_lo,
        clip_hi,
        mean: norm.mean,
        inv_std: norm.inv_std,
    }
}

/// Wire form of a label element type.
pub(crate) fn label_dtype(dtype: DType) -> pb::LabelDtype {
    match dtype {
        DType::U16 => pb::LabelDtype::U16,
        _ => pb::LabelDtype::U8,
    }
}

/// The DescribeDataset answer of `dataset`.
fn describe(dataset: &Dataset) -> pb::DatasetDescription {
    let label_names = dataset.label_names();
    let mut classes: BTreeMap<u16, (u64, u32)> = BTreeMap::new();
    let mut cases = Vec::with_capacity(dataset.cases().len());
    for reader in dataset.cases() {
        let meta = reader.meta();
        for (&class, &voxels) in &meta.class_voxels {
            let slot = classes.entry(class).or_insert((0, 0));
            slot.0 = slot.0.saturating_add(voxels);
            slot.1 += 1;
        }
        cases.push(pb::CaseInfo {
            id: meta.id.clone(),
            shape: meta.shape.iter().map(|&s| s as u64).collect(),
            spacing: meta.spacing.to_vec(),
            class_voxels: meta
                .class_voxels
                .iter()
                .map(|(&c, &v)| (u32::from(c), v))
                .collect(),
            normalization: meta
                .channels
                .iter()
                .map(|c| normalization(&c.norm))
                .collect(),
        });
    }
    let channels = dataset
        .cases()
        .first()
        .map(|reader| {
            reader
                .meta()
                .channels
                .iter()
                .map(|c| pb::ChannelInfo {
                    name: c.name.clone(),
                    stored_dtype: c.dtype.name().to_owned(),
                    scheme: c.norm.scheme.name().to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    pb::DatasetDescription {
        name: dataset.name().to_owned(),
        cases,
        channels,
        classes: classes
            .into_iter()
            .map(|(value, (voxels, cases))| pb::ClassInfo {
                value: u32::from(value),
                name: label_names.get(&value).cloned().unwrap_or_default(),
                voxels,
                cases,
            })
            .collect(),
        label_names: label_names
            .iter()
            .map(|(&c, n)| (u32::from(c), n.clone()))
            .collect(),
        ignore_label: u32::from(dataset.ignore_label()),
        label_dtype: label_dtype(dataset.label_dtype()) as i32,
        set_aside: Vec::new(),
    }
}

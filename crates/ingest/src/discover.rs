//! Finding the cases of an input: an nnU-Net raw dataset folder or a TSV file of image/label pairs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::IngestError;

/// Where one case's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseSource {
    /// Case identifier (also the store file's stem).
    pub id: String,
    /// One image file per channel, in channel order.
    pub images: Vec<PathBuf>,
    /// The label map.
    pub label: PathBuf,
    /// Name (modality) of each channel, e.g. `"CT"`, `"T2"`.
    pub channel_names: Vec<String>,
}

impl CaseSource {
    /// Every file of the case, images first.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.images.iter().chain(std::iter::once(&self.label))
    }
}

/// The kind of input that was found.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// `imagesTr/`, `labelsTr/` and `dataset.json`.
    NnUnet,
    /// A TSV file with `image` and `label` columns.
    Tsv,
}

/// The cases found in an input, and the cases that could not even be assembled.
#[derive(Debug)]
pub struct DatasetSource {
    /// Dataset name (folder name or TSV file stem, made an identifier).
    pub name: String,
    /// What the input was.
    pub kind: InputKind,
    /// Class names by value, where the input names them.
    pub label_names: BTreeMap<u16, String>,
    /// Complete cases, ordered by id.
    pub cases: Vec<CaseSource>,
    /// Cases with a missing file or an invalid name: `(case id, error)`.
    pub problems: Vec<(String, IngestError)>,
}

/// Reads the input's structure (not the volumes).
pub fn discover(input: &Path) -> Result<DatasetSource, IngestError> {
    let meta = std::fs::metadata(input).map_err(|e| IngestError::io(input, e))?;
    if meta.is_dir() {
        discover_nnunet(input)
    } else {
        discover_tsv(input)
    }
}

/// Turns any string into a valid identifier: `[A-Za-z0-9_.-]`, no leading dot, at most 128 bytes.
pub fn sanitize_id(raw: &str) -> String {
    let mut id: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    while id.starts_with('.') {
        id.replace_range(0..1, "_");
    }
    id.truncate(128);
    if id.is_empty() {
        id.push('_');
    }
    id
}

/// Strips `.nii.gz` or `.nii` (case-insensitive) from a file name.
fn strip_nifti_ext(name: &str) -> &str {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".nii.gz") {
        &name[..name.len() - 7]
    } else if lower.ends_with(".nii") {
        &name[..name.len() - 4]
    } else {
        name
    }
}

/// Whether a directory entry looks like a file still being written or a hidden file.
fn is_transient(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [".tmp", ".part", ".partial", ".crdownload", ".swp"]
            .iter()
            .any(|s| name.to_ascii_lowercase().ends_with(s))
}

fn discover_nnunet(root: &Path) -> Result<DatasetSource, IngestError> {
    let json_path = root.join("dataset.json");
    let images_dir = root.join("imagesTr");
    let labels_dir = root.join("labelsTr");
    if !json_path.is_file() || !images_dir.is_dir() {
        return Err(IngestError::Input {
            path: root.to_path_buf(),
            reason: format!(
                "not an nnU-Net raw dataset folder (expected dataset.json and imagesTr/), \
                 not an nnU-Net preprocessed configuration folder (.b2nd/.npz and .pkl cases \
                 below a dataset.json){} and not a TSV file",
                preprocessed_hint(root)
            ),
        });
    }
    let json = read_dataset_json(&json_path)?;
    let mut problems = Vec::new();
    let channels_by_case = image_files(&images_dir, &json.ending, &mut problems)?;
    let mut cases = Vec::new();
    for (case, files) in channels_by_case {
        match nnunet_case(&case, &files, &json, &images_dir, &labels_dir) {
            Ok(c) => cases.push(c),
            Err(e) => problems.push((case, e)),
        }
    }

    let name = root
        .file_name()
        .and_then(|n| n.to_str())
        .map(sanitize_id)
        .unwrap_or_else(|| "dataset".into());
    Ok(DatasetSource {
        name,
        kind: InputKind::NnUnet,
        label_names: json.label_names,
        cases,
        problems,
    })
}

/// What ingest takes from an nnU-Net `dataset.json`.
struct DatasetJson {
    /// Channel names, in channel order.
    channel_names: Vec<String>,
    /// Class value → name.
    label_names: BTreeMap<u16, String>,
    /// The image files' ending (`.nii.gz` by default).
    ending: String,
}

/// Reads and checks `dataset.json`.
fn read_dataset_json(json_path: &Path) -> Result<DatasetJson, IngestError> {
    let text = std::fs::read_to_string(json_path).map_err(|e| IngestError::io(json_path, e))?;
    let bad = |reason: String| IngestError::DatasetJson {
        path: json_path.to_path_buf(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;

    let channels = json
        .get("channel_names")
        .or_else(|| json.get("modality"))
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("missing object \"channel_names\"".into()))?;
    let mut channel_names = BTreeMap::new();
    for (k, v) in channels {
        let idx: usize = k
            .parse()
            .map_err(|_| bad(format!("channel_names key {k:?} is not a channel number")))?;
        let name = v
            .as_str()
            .ok_or_else(|| bad(format!("channel_names[{k:?}] is not a string")))?;
        channel_names.insert(idx, name.to_string());
    }
    let num_channels = channel_names.len();
    if num_channels == 0 || channel_names.keys().copied().ne(0..num_channels) {
        return Err(bad(
            "channel_names must number the channels 0, 1, 2, ... without gaps".into(),
        ));
    }
    let channel_names: Vec<String> = channel_names.into_values().collect();

    let mut label_names = BTreeMap::new();
    let labels = json
        .get("labels")
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("missing object \"labels\"".into()))?;
    for (name, v) in labels {
        let value = v.as_u64().ok_or_else(|| {
            bad(format!(
                "labels[{name:?}] = {v}: only integer class values are supported \
                 (region-based training lists are not)"
            ))
        })?;
        let value = u16::try_from(value)
            .map_err(|_| bad(format!("labels[{name:?}] = {value} exceeds 65535")))?;
        label_names.insert(value, name.clone());
    }
    let ending = json
        .get("file_ending")
        .and_then(|v| v.as_str())
        .unwrap_or(".nii.gz")
        .to_string();
    Ok(DatasetJson {
        channel_names,
        label_names,
        ending,
    })
}

/// The image files of `images_dir` ending in `ending`, by case and channel; a file whose name
/// has no channel number goes to `problems`.
fn image_files(
    images_dir: &Path,
    ending: &str,
    problems: &mut Vec<(String, IngestError)>,
) -> Result<BTreeMap<String, BTreeMap<usize, PathBuf>>, IngestError> {
    let mut channels_by_case: BTreeMap<String, BTreeMap<usize, PathBuf>> = BTreeMap::new();
    for entry in read_dir_sorted(images_dir)? {
        let Some(name) = entry
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
        else {
            continue;
        };
        if is_transient(&name) || !name.ends_with(ending) {
            continue;
        }
        let stem = &name[..name.len() - ending.len()];
        let parsed = stem
            .rsplit_once('_')
            .filter(|(_, ch)| ch.len() == 4 && ch.bytes().all(|b| b.is_ascii_digit()));
        let Some((case, ch)) = parsed else {
            problems.push((
                sanitize_id(stem),
                IngestError::Input {
                    path: entry.clone(),
                    reason: "image file name must end in _XXXX (channel number), as in \
                             CASE_0000.nii.gz"
                        .into(),
                },
            ));
            continue;
        };
        let ch: usize = ch.parse().unwrap_or(usize::MAX);
        channels_by_case
            .entry(case.to_string())
            .or_default()
            .insert(ch, entry.clone());
    }
    Ok(channels_by_case)
}

/// The source of `case` from its image `files` by channel: every channel of `json`, no other,
/// and a label in `labels_dir`.
fn nnunet_case(
    case: &str,
    files: &BTreeMap<usize, PathBuf>,
    json: &DatasetJson,
    images_dir: &Path,
    labels_dir: &Path,
) -> Result<CaseSource, IngestError> {
    let (ending, num_channels) = (&json.ending, json.channel_names.len());
    let label = labels_dir.join(format!("{case}{ending}"));
    if patchflow_store::validate_case_id(case).is_err() {
        return Err(IngestError::Case {
            case: case.to_owned(),
            reason: "case name is not an identifier ([A-Za-z0-9_.-], at most 128 \
                     characters, not starting with '.')"
                .into(),
        });
    }
    let mut images = Vec::with_capacity(num_channels);
    for ch in 0..num_channels {
        match files.get(&ch) {
            Some(p) => images.push(p.clone()),
            None => {
                return Err(IngestError::MissingFile {
                    case: case.to_owned(),
                    what: format!("image channel {ch}"),
                    path: images_dir.join(format!("{case}_{ch:04}{ending}")),
                });
            }
        }
    }
    if let Some(extra) = files.keys().find(|&&c| c >= num_channels) {
        return Err(IngestError::Case {
            case: case.to_owned(),
            reason: format!(
                "image channel {extra} is present but dataset.json names only \
                 {num_channels} channel(s)"
            ),
        });
    }
    if !label.is_file() {
        return Err(IngestError::MissingFile {
            case: case.to_owned(),
            what: "label".into(),
            path: label,
        });
    }
    Ok(CaseSource {
        id: case.to_owned(),
        images,
        label,
        channel_names: json.channel_names.clone(),
    })
}

/// For a dataset folder of `nnUNet_preprocessed`, the configuration folders to pass instead.
fn preprocessed_hint(root: &Path) -> String {
    let Ok(entries) = std::fs::read_dir(root) else {
        return String::new();
    };
    let mut configs: Vec<String> = entries
        .flatten()
        .filter(|e| patchflow_nnunet::is_preprocessed_folder(&e.path()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    configs.sort();
    if configs.is_empty() {
        String::new()
    } else {
        format!(
            "; this looks like nnU-Net's preprocessed dataset folder: pass one of its \
             configuration folders ({})",
            configs.join(", ")
        )
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, IngestError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| IngestError::io(dir, e))? {
        let entry = entry.map_err(|e| IngestError::io(dir, e))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

fn discover_tsv(path: &Path) -> Result<DatasetSource, IngestError> {
    let text = std::fs::read_to_string(path).map_err(|e| IngestError::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    let Some((header_no, header)) = lines.next() else {
        return Err(IngestError::Tsv {
            path: path.to_path_buf(),
            line: 1,
            reason: "empty file: expected a header row naming the columns image and label".into(),
        });
    };
    let columns: Vec<&str> = header.split('\t').map(str::trim).collect();
    let col = |name: &str| columns.iter().position(|c| c.eq_ignore_ascii_case(name));
    let (Some(image_col), Some(label_col)) = (col("image"), col("label")) else {
        return Err(IngestError::Tsv {
            path: path.to_path_buf(),
            line: header_no + 1,
            reason: format!(
                "the header row must name the columns image and label (tab-separated); found {columns:?}"
            ),
        });
    };
    let id_col = col("id");
    let modality_col = col("modality");

    let mut cases: Vec<CaseSource> = Vec::new();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (no, line) in lines {
        let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
        let get = |i: usize| fields.get(i).copied().filter(|s| !s.is_empty());
        let (Some(image), Some(label)) = (get(image_col), get(label_col)) else {
            problems.push((
                format!("line{}", no + 1),
                IngestError::Tsv {
                    path: path.to_path_buf(),
                    line: no + 1,
                    reason: "row has no image or no label path".into(),
                },
            ));
            continue;
        };
        let raw_id = id_col.and_then(get).map(str::to_owned).unwrap_or_else(|| {
            let file = Path::new(image)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(image);
            strip_nifti_ext(file).to_string()
        });
        let mut id = sanitize_id(&raw_id);
        if seen.contains(&id) {
            let mut n = 2;
            while seen.contains(&format!("{id}_{n}")) {
                n += 1;
            }
            id = format!("{id}_{n}");
        }
        seen.insert(id.clone());
        let image = base.join(image);
        let label = base.join(label);
        let modality = modality_col.and_then(get).unwrap_or("unknown").to_string();
        if !image.is_file() {
            problems.push((
                id.clone(),
                IngestError::MissingFile {
                    case: id,
                    what: "image channel 0".into(),
                    path: image,
                },
            ));
            continue;
        }
        if !label.is_file() {
            problems.push((
                id.clone(),
                IngestError::MissingFile {
                    case: id,
                    what: "label".into(),
                    path: label,
                },
            ));
            continue;
        }
        cases.push(CaseSource {
            id,
            images: vec![image],
            label,
            channel_names: vec![modality],
        });
    }
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    let name = path
        .file_stem()
        .and_then(|n| n.to_str())
        .map(sanitize_id)
        .unwrap_or_else(|| "dataset".into());
    Ok(DatasetSource {
        name,
        kind: InputKind::Tsv,
        label_names: BTreeMap::new(),
        cases,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_makes_identifiers() {
        assert_eq!(sanitize_id("a b/c"), "a_b_c");
        assert_eq!(sanitize_id(".hidden"), "_hidden");
        assert_eq!(sanitize_id(""), "_");
        assert_eq!(sanitize_id(&"x".repeat(300)).len(), 128);
    }

    #[test]
    fn tsv_requires_columns_and_reports_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let tsv = dir.path().join("pairs.tsv");
        std::fs::write(&tsv, "img\tseg\na.nii.gz\tb.nii.gz\n").unwrap();
        let err = discover(&tsv).unwrap_err().to_string();
        assert!(err.contains("image and label"), "{err}");

        std::fs::write(dir.path().join("a.nii.gz"), b"x").unwrap();
        std::fs::write(
            &tsv,
            "image\tlabel\tmodality\na.nii.gz\ta_seg.nii.gz\tCT\na.nii.gz\tmissing.nii.gz\tCT\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("a_seg.nii.gz"), b"x").unwrap();
        let ds = discover(&tsv).unwrap();
        assert_eq!(ds.name, "pairs");
        assert_eq!(ds.cases.len(), 1);
        assert_eq!(ds.cases[0].id, "a");
        assert_eq!(ds.cases[0].channel_names, vec!["CT".to_string()]);
        assert_eq!(ds.problems.len(), 1);
        assert_eq!(ds.problems[0].0, "a_2");
        let msg = ds.problems[0].1.to_string();
        assert!(
            msg.contains("missing label") && msg.contains("missing.nii.gz"),
            "{msg}"
        );
    }

    #[test]
    fn nnunet_layout_groups_channels_and_flags_missing_labels() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("Dataset001_Test");
        std::fs::create_dir_all(root.join("imagesTr")).unwrap();
        std::fs::create_dir_all(root.join("labelsTr")).unwrap();
        std::fs::write(
            root.join("dataset.json"),
            r#"{"channel_names":{"0":"T2","1":"ADC"},"labels":{"background":0,"tumor":1},"file_ending":".nii.gz"}"#,
        )
        .unwrap();
        for f in [
            "imagesTr/c1_0000.nii.gz",
            "imagesTr/c1_0001.nii.gz",
            "imagesTr/c2_0000.nii.gz",
            "imagesTr/c2_0001.nii.gz",
            "imagesTr/c3_0000.nii.gz",
            "imagesTr/.c4_0000.nii.gz.tmp",
            "labelsTr/c1.nii.gz",
            "labelsTr/c3.nii.gz",
        ] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        let ds = discover(&root).unwrap();
        assert_eq!(ds.kind, InputKind::NnUnet);
        assert_eq!(ds.name, "Dataset001_Test");
        assert_eq!(ds.label_names.get(&1).map(String::as_str), Some("tumor"));
        let ids: Vec<_> = ds.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["c1"]);
        assert_eq!(ds.cases[0].images.len(), 2);
        let problems: Vec<_> = ds
            .problems
            .iter()
            .map(|(id, e)| format!("{id}: {e}"))
            .collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("c2") && problems[0].contains("missing label"));
        assert!(problems[1].starts_with("c3") && problems[1].contains("image channel 1"));
    }

    #[test]
    fn region_labels_are_rejected_clearly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("imagesTr")).unwrap();
        std::fs::write(
            dir.path().join("dataset.json"),
            r#"{"channel_names":{"0":"CT"},"labels":{"background":0,"whole":[1,2]}}"#,
        )
        .unwrap();
        let err = discover(dir.path()).unwrap_err().to_string();
        assert!(err.contains("region-based"), "{err}");
    }
}

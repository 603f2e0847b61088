//! The dataset manifest and case naming rules.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic::atomic_write;
use crate::error::StoreError;
use crate::location::StoreLocation;

/// File name of the manifest in a store directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Newest manifest format this build reads (and the one new manifests should carry).
pub const MANIFEST_FORMAT: u32 = 1;

/// File extension of case files.
pub const CASE_FILE_EXTENSION: &str = "pfc";

/// Longest accepted case identifier.
pub const MAX_CASE_ID_LEN: usize = 128;

/// Largest manifest file accepted.
const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// The dataset manifest (`manifest.json` in the store directory), written atomically.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// Dataset name.
    pub dataset: String,
    /// Preprocessing plan the cases were made with (free-form).
    pub plan: serde_json::Value,
    /// The cases of the store.
    pub cases: Vec<ManifestCase>,
}

/// One case in the manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestCase {
    /// Case identifier.
    pub id: String,
    /// Case file, relative to the store directory.
    pub file: String,
    /// Size of the case file in bytes.
    pub stored_bytes: u64,
    /// Where the case came from (free-form: source files, checksums).
    pub source: serde_json::Value,
}

impl Manifest {
    /// Reads `store_dir/manifest.json`; `None` when it does not exist. Rejects a newer format,
    /// invalid case ids and case files that point outside the store directory. A store
    /// location `s3://bucket/prefix` reads the object `prefix/manifest.json`.
    pub fn load(store_dir: &Path) -> Result<Option<Manifest>, StoreError> {
        let path = store_dir.join(MANIFEST_FILE);
        if let StoreLocation::S3(location) = StoreLocation::from_path(store_dir)? {
            let location = location.join(MANIFEST_FILE);
            return match crate::remote::get_object(&location, MAX_MANIFEST_BYTES)? {
                None => Ok(None),
                Some(bytes) => {
                    let m = serde_json::from_slice(&bytes).map_err(|source| StoreError::Json {
                        path: path.clone(),
                        source,
                    })?;
                    Self::check(m, path).map(Some)
                }
            };
        }
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let len = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
        if len > MAX_MANIFEST_BYTES {
            return Err(StoreError::corrupt(
                &path,
                format!("manifest is {len} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit"),
            ));
        }
        let reader = std::io::BufReader::new(file);
        let m: Manifest = serde_json::from_reader(reader).map_err(|source| StoreError::Json {
            path: path.clone(),
            source,
        })?;
        Self::check(m, path).map(Some)
    }

    /// Rejects a newer format, invalid case ids and case files outside the store.
    fn check(m: Manifest, path: PathBuf) -> Result<Manifest, StoreError> {
        if m.format > MANIFEST_FORMAT {
            return Err(StoreError::UnsupportedVersion {
                path,
                found: m.format,
                supported: MANIFEST_FORMAT,
            });
        }
        for (i, c) in m.cases.iter().enumerate() {
            validate_case_id(&c.id)
                .map_err(|e| StoreError::corrupt(&path, format!("cases[{i}].id: {e}")))?;
            if !is_plain_relative(&c.file) {
                return Err(StoreError::corrupt(
                    &path,
                    format!(
                        "cases[{i}].file {:?} is not a relative path inside the store",
                        c.file
                    ),
                ));
            }
        }
        Ok(m)
    }

    /// Writes `store_dir/manifest.json` atomically (pretty-printed JSON); in object storage,
    /// as one PUT of the object `prefix/manifest.json`.
    pub fn save(&self, store_dir: &Path) -> Result<(), StoreError> {
        let path = store_dir.join(MANIFEST_FILE);
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|source| StoreError::Json {
            path: path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        match StoreLocation::from_path(store_dir)? {
            StoreLocation::Local(_) => atomic_write(&path, &bytes),
            StoreLocation::S3(location) => {
                crate::remote::put_object(&location.join(MANIFEST_FILE), bytes)
            }
        }
    }
}

/// Whether `p` is a non-empty relative path made only of normal components.
fn is_plain_relative(p: &str) -> bool {
    !p.is_empty()
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Checks a case identifier: `[A-Za-z0-9_.-]`, 1..=128 characters, not starting with `'.'`.
pub fn validate_case_id(id: &str) -> Result<(), StoreError> {
    let bad = |reason: String| {
        Err(StoreError::InvalidId {
            id: id.chars().take(MAX_CASE_ID_LEN + 8).collect(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("empty".to_owned());
    }
    if id.len() > MAX_CASE_ID_LEN {
        return bad(format!(
            "{} characters, at most {MAX_CASE_ID_LEN} allowed",
            id.chars().count()
        ));
    }
    if id.starts_with('.') {
        return bad("starts with '.'".to_owned());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return bad(format!(
            "character {c:?} is not allowed (only A-Z a-z 0-9 _ . -)"
        ));
    }
    Ok(())
}

/// File name of a case: `"<id>.pfc"`.
pub fn case_file_name(id: &str) -> String {
    format!("{id}.{CASE_FILE_EXTENSION}")
}

//! Where a store lives: a local folder, or a prefix in an S3-compatible object store written as
//! `s3://bucket/prefix`.
//!
//! Every part of patchflow names stores and case files by path (command lines, the daemon's
//! configuration, the manifest's relative file names). A path whose text starts with `s3://` is
//! read as an object location instead of a local file, so `s3://bucket/prefix` works wherever a
//! store folder does, and `s3://bucket/prefix/case.pfc` wherever a case file does; joining a
//! file name to a store location with [`Path::join`] gives the case's location either way.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::StoreError;

/// The scheme that marks an object location.
pub const S3_SCHEME: &str = "s3://";

/// A store folder or case file: on the local file system or in an object store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StoreLocation {
    /// A path on the local file system.
    Local(PathBuf),
    /// An object (or prefix) in an S3-compatible object store.
    S3(ObjectLocation),
}

/// A bucket and a key (for a store: a key prefix, without the trailing `/`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectLocation {
    /// Bucket name.
    pub bucket: String,
    /// Key, `/`-separated, without leading or trailing `/`; empty for the bucket's root.
    pub key: String,
}

impl ObjectLocation {
    /// Parses `s3://bucket/key`. The bucket must be a valid S3 bucket name (3–63 characters
    /// of `a-z 0-9 . -`, starting and ending with a letter or digit); the key may be empty
    /// and must not contain empty, `.` or `..` segments (one trailing `/` is allowed).
    pub fn parse(url: &str) -> Result<ObjectLocation, StoreError> {
        let bad = |reason: String| StoreError::InvalidLocation {
            location: url.to_owned(),
            reason,
        };
        let rest = url
            .strip_prefix(S3_SCHEME)
            .ok_or_else(|| bad(format!("does not start with {S3_SCHEME}")))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && bucket
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && bucket
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if !bucket_ok {
            return Err(bad(format!(
                "bucket {bucket:?} is not a valid bucket name (3-63 characters of a-z 0-9 . -, \
                 starting and ending with a letter or digit)"
            )));
        }
        let key = key.strip_suffix('/').unwrap_or(key);
        if !key.is_empty() {
            if let Some(seg) = key
                .split('/')
                .find(|s| s.is_empty() || *s == "." || *s == "..")
            {
                return Err(bad(format!(
                    "key {key:?} has a segment {seg:?} (empty, '.' and '..' are not allowed)"
                )));
            }
            if key.chars().any(char::is_control) {
                return Err(bad(format!("key {key:?} holds a control character")));
            }
        }
        Ok(ObjectLocation {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The location of `name` (a relative `/`-separated path) under this one.
    pub fn join(&self, name: &str) -> ObjectLocation {
        let name = name.trim_matches('/');
        let key = match (self.key.is_empty(), name.is_empty()) {
            (_, true) => self.key.clone(),
            (true, false) => name.to_owned(),
            (false, false) => format!("{}/{name}", self.key),
        };
        ObjectLocation {
            bucket: self.bucket.clone(),
            key,
        }
    }

    /// The last segment of the key (the bucket name at the bucket's root).
    pub fn name(&self) -> &str {
        self.key
            .rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.bucket)
    }

    /// `s3://bucket/key`.
    pub fn url(&self) -> String {
        self.to_string()
    }

    /// The URL as a path, for APIs that take paths (see the module documentation).
    pub fn to_path(&self) -> PathBuf {
        PathBuf::from(self.url())
    }
}

impl fmt::Display for ObjectLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{S3_SCHEME}{}", self.bucket)
        } else {
            write!(f, "{S3_SCHEME}{}/{}", self.bucket, self.key)
        }
    }
}

impl StoreLocation {
    /// Reads a path: `s3://bucket/key` is an object location (and must be a valid one),
    /// anything else a local path.
    pub fn from_path(path: &Path) -> Result<StoreLocation, StoreError> {
        match path.to_str() {
            Some(s) if s.starts_with(S3_SCHEME) => Ok(StoreLocation::S3(ObjectLocation::parse(s)?)),
            _ => Ok(StoreLocation::Local(path.to_path_buf())),
        }
    }

    /// Whether `path` names an object location (starts with `s3://`), valid or not.
    pub fn is_remote_path(path: &Path) -> bool {
        path.to_str().is_some_and(|s| s.starts_with(S3_SCHEME))
    }

    /// The location of `name` (a relative path) inside this one.
    pub fn join(&self, name: &str) -> StoreLocation {
        match self {
            StoreLocation::Local(p) => StoreLocation::Local(p.join(name)),
            StoreLocation::S3(o) => StoreLocation::S3(o.join(name)),
        }
    }

    /// The location as a path (the URL for object locations).
    pub fn to_path(&self) -> PathBuf {
        match self {
            StoreLocation::Local(p) => p.clone(),
            StoreLocation::S3(o) => o.to_path(),
        }
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Local(p) => write!(f, "{}", p.display()),
            StoreLocation::S3(o) => o.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_paths() {
        let loc = ObjectLocation::parse("s3://my-bucket/data/Dataset001/").unwrap();
        assert_eq!(loc.bucket, "my-bucket");
        assert_eq!(loc.key, "data/Dataset001");
        assert_eq!(loc.name(), "Dataset001");
        assert_eq!(loc.url(), "s3://my-bucket/data/Dataset001");
        assert_eq!(
            loc.join("case_1.pfc").url(),
            "s3://my-bucket/data/Dataset001/case_1.pfc"
        );
        let root = ObjectLocation::parse("s3://bucket").unwrap();
        assert_eq!(root.key, "");
        assert_eq!(root.name(), "bucket");
        assert_eq!(root.join("manifest.json").key, "manifest.json");

        // Joining a file name to the URL as a path gives the same location.
        let as_path = loc.to_path().join("case_1.pfc");
        assert_eq!(
            StoreLocation::from_path(&as_path).unwrap(),
            StoreLocation::S3(loc.join("case_1.pfc"))
        );
        assert_eq!(
            StoreLocation::from_path(Path::new("/data/s3:/x")).unwrap(),
            StoreLocation::Local(PathBuf::from("/data/s3:/x"))
        );
        assert!(StoreLocation::is_remote_path(Path::new("s3://bad_bucket")));
    }

    #[test]
    fn rejects_bad_buckets_and_keys() {
        for url in [
            "s3://",
            "s3://ab",
            "s3://Upper/x",
            "s3://bad_bucket/x",
            "s3://-bucket/x",
            "s3://bucket//x",
            "s3://bucket/a/../b",
            "s3://bucket/./b",
        ] {
            let err = ObjectLocation::parse(url).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidLocation { .. }),
                "{url}: {err}"
            );
            assert!(err.to_string().contains(url), "{err}");
        }
    }
}

//! Atomic file replacement: write a hidden temporary file in the target directory, fsync it,
//! rename it over the target, fsync the directory. A reader sees the old file or the new one,
//! never a partial one; after a crash at most a hidden temporary file is left behind.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::StoreError;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Marker every temporary file name carries (`.<name>.tmp.<pid>.<n>`).
pub const TEMP_MARKER: &str = ".tmp.";

/// Whether `file_name` is the name of a temporary file of an unfinished atomic write.
pub fn is_temp_file_name(file_name: &str) -> bool {
    file_name.starts_with('.') && file_name.contains(TEMP_MARKER)
}

/// A temporary file that becomes `target` on [`TempFile::commit`] and is removed otherwise.
pub(crate) struct TempFile {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    /// Whether the temporary file still exists under `tmp` (removed on drop).
    armed: bool,
}

impl TempFile {
    /// Creates the temporary file beside `target`.
    pub(crate) fn create(target: &Path) -> Result<TempFile, StoreError> {
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                StoreError::io(
                    target,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "target path has no (UTF-8) file name",
                    ),
                )
            })?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}{TEMP_MARKER}{}.{n}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| StoreError::io(&tmp, e))?;
        Ok(TempFile {
            file,
            tmp,
            target: target.to_path_buf(),
            dir,
            armed: true,
        })
    }

    /// The open file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Path of the temporary file.
    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// fsyncs the file, renames it over the target and fsyncs the directory.
    pub(crate) fn commit(mut self) -> Result<(), StoreError> {
        self.file
            .sync_all()
            .map_err(|e| StoreError::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.target).map_err(|e| StoreError::io(&self.target, e))?;
        self.armed = false;
        let d = File::open(&self.dir).map_err(|e| StoreError::io(&self.dir, e))?;
        d.sync_all().map_err(|e| StoreError::io(&self.dir, e))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = std::fs::remove_file(&self.tmp)
        {
            tracing::warn!(path = %self.tmp.display(), error = %e, "could not remove temporary file");
        }
    }
}

/// Atomically replaces `path` with `bytes` (temporary file in the same directory, fsync,
/// rename, fsync of the directory).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = TempFile::create(path)?;
    let mut f = tmp.file();
    f.write_all(bytes)
        .map_err(|e| StoreError::io(tmp.tmp_path(), e))?;
    tmp.commit()
}

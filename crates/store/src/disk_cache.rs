//! A bounded local disk cache of chunk payloads fetched from object storage.
//!
//! The memory [`ChunkCache`](crate::ChunkCache) is lost when a daemon restarts, and a restarted
//! daemon over an S3 store would fetch its whole working set again. This cache keeps the stored
//! (compressed) payload of every chunk fetched from object storage in a folder on local disk,
//! up to a byte budget, so that a restarted daemon reads them from there.
//!
//! * Entries are written to a temporary file and renamed into place, so a crash leaves at most
//!   a temporary file (removed on the next open), never a half-written entry under its name.
//! * An entry is looked up by the case's location, the array, the chunk and the payload's
//!   length and xxh3 from the case's index, and its bytes are checked against that length and
//!   checksum on every read: a damaged entry (a torn write the file system kept, a flipped bit
//!   on disk) is deleted and the chunk fetched again; never served.
//! * The bytes held stay within the budget: when a write takes the total over it, the least
//!   recently used entries go (after a restart, the order of the files' modification times).
//! * One process uses a folder at a time (a lock file); a second one is refused.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::error::StoreError;

/// Sub-folder of temporary files.
const TMP_DIR: &str = "tmp";
/// Name of the lock file.
const LOCK_FILE: &str = ".lock";
/// After an eviction the cache holds at most this share of its budget, so that evictions come
/// in batches rather than one per write.
const EVICT_TO: f64 = 0.9;

/// Counters of a [`DiskCache`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskCacheStats {
    /// Look-ups served from disk.
    pub hits: u64,
    /// Look-ups that found nothing usable.
    pub misses: u64,
    /// Entries found damaged on read (deleted, never served).
    pub damaged: u64,
    /// Entries removed to stay within the budget.
    pub evicted: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// Entries held now.
    pub entries: u64,
    /// The budget in bytes.
    pub capacity_bytes: u64,
}

/// One held entry: its size and when it was last used.
#[derive(Copy, Clone, Debug)]
struct Slot {
    bytes: u64,
    used: u64,
}

#[derive(Default)]
struct State {
    slots: HashMap<u128, Slot>,
    total: u64,
    clock: u64,
}

/// A bounded folder of chunk payloads that survives restarts (see the module documentation).
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
    _lock: File,
    hits: AtomicU64,
    misses: AtomicU64,
    damaged: AtomicU64,
    evicted: AtomicU64,
    tmp_counter: AtomicU64,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("dir", &self.dir)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Identifies one chunk payload: the case file's location, the array and chunk, and the
/// payload's length and checksum from the index.
pub(crate) struct DiskKey<'a> {
    pub case: &'a str,
    pub array: u32,
    pub chunk: u32,
    pub len: u64,
    pub checksum: u64,
}

impl DiskKey<'_> {
    fn hash(&self) -> u128 {
        let mut h = Xxh3::new();
        h.update(&(self.case.len() as u64).to_le_bytes());
        h.update(self.case.as_bytes());
        h.update(&self.array.to_le_bytes());
        h.update(&self.chunk.to_le_bytes());
        h.update(&self.len.to_le_bytes());
        h.update(&self.checksum.to_le_bytes());
        h.digest128()
    }
}

fn entry_name(hash: u128) -> String {
    format!("{hash:032x}")
}

fn parse_entry_name(name: &str) -> Option<u128> {
    if name.len() != 32 {
        return None;
    }
    u128::from_str_radix(name, 16).ok()
}

impl DiskCache {
    /// Opens (creating) the cache folder `dir` with a budget of `capacity_bytes`: takes its
    /// lock, removes temporary files left by a crash, takes stock of the entries there and
    /// evicts down to the budget if it shrank.
    pub fn open(dir: &Path, capacity_bytes: u64) -> Result<Arc<DiskCache>, StoreError> {
        let io = |p: &Path, e| StoreError::io(p, e);
        std::fs::create_dir_all(dir.join(TMP_DIR)).map_err(|e| io(dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        if lock.try_lock().is_err() {
            return Err(StoreError::io(
                &lock_path,
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "the disk cache folder is in use by another process (its lock file is held)",
                ),
            ));
        }
        let tmp = dir.join(TMP_DIR);
        for entry in std::fs::read_dir(&tmp).map_err(|e| io(&tmp, e))?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        // Entries live in 256 sub-folders named by their first two hex digits.
        let mut found: Vec<(u128, u64, std::time::SystemTime)> = Vec::new();
        for sub in std::fs::read_dir(dir).map_err(|e| io(dir, e))?.flatten() {
            let name = sub.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let Ok(files) = std::fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let Some(hash) = parse_entry_name(&f.file_name().to_string_lossy()) else {
                    continue;
                };
                let Ok(meta) = f.metadata() else { continue };
                if meta.is_file() {
                    let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                    found.push((hash, meta.len(), mtime));
                }
            }
        }
        // Oldest first: their use order is the order of modification.
        found.sort_by_key(|&(hash, _, mtime)| (mtime, hash));
        let mut state = State::default();
        for (hash, bytes, _) in found {
            state.clock += 1;
            state.total += bytes;
            state.slots.insert(
                hash,
                Slot {
                    bytes,
                    used: state.clock,
                },
            );
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            capacity: capacity_bytes,
            state: Mutex::new(state),
            _lock: lock,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            damaged: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            tmp_counter: AtomicU64::new(0),
        };
        {
            let mut state = cache.lock();
            cache.evict(&mut state, capacity_bytes);
        }
        let s = cache.stats();
        tracing::info!(
            dir = %dir.display(),
            entries = s.entries,
            bytes = s.bytes,
            capacity_bytes,
            "disk cache opened"
        );
        Ok(Arc::new(cache))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entry_path(&self, hash: u128) -> PathBuf {
        let name = entry_name(hash);
        self.dir.join(&name[..2]).join(name)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Current counters.
    pub fn stats(&self) -> DiskCacheStats {
        let state = self.lock();
        DiskCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            damaged: self.damaged.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            bytes: state.total,
            entries: state.slots.len() as u64,
            capacity_bytes: self.capacity,
        }
    }

    /// The payload of `key` when held and intact (its length and xxh3 match the key's).
    pub(crate) fn get(&self, key: &DiskKey<'_>) -> Option<Vec<u8>> {
        let hash = key.hash();
        {
            let mut state = self.lock();
            state.clock += 1;
            let clock = state.clock;
            match state.slots.get_mut(&hash) {
                Some(slot) => slot.used = clock,
                None => {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let path = self.entry_path(hash);
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() as u64 == key.len && xxh3_64(&bytes) == key.checksum => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(bytes)
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "damaged disk cache entry removed");
                self.damaged.fetch_add(1, Ordering::Relaxed);
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.forget(hash);
                let _ = std::fs::remove_file(&path);
                None
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "disk cache entry unreadable");
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.forget(hash);
                None
            }
        }
    }

    fn forget(&self, hash: u128) {
        let mut state = self.lock();
        if let Some(slot) = state.slots.remove(&hash) {
            state.total -= slot.bytes;
        }
    }

    /// Stores the payload of `key` (already checked against its checksum by the caller).
    /// Failures are logged and otherwise ignored: the cache is an optimisation.
    pub(crate) fn put(&self, key: &DiskKey<'_>, bytes: &[u8]) {
        let len = bytes.len() as u64;
        if len > self.capacity {
            return;
        }
        let hash = key.hash();
        if self.lock().slots.contains_key(&hash) {
            return;
        }
        if let Err(e) = self.write_entry(hash, bytes) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not write a disk cache entry");
            return;
        }
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        if let Some(old) = state.slots.insert(
            hash,
            Slot {
                bytes: len,
                used: clock,
            },
        ) {
            state.total -= old.bytes;
        }
        state.total += len;
        if state.total > self.capacity {
            let target = (self.capacity as f64 * EVICT_TO) as u64;
            self.evict(&mut state, target);
        }
    }

    /// Writes the entry under a temporary name and renames it into place.
    fn write_entry(&self, hash: u128, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.entry_path(hash);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(TMP_DIR).join(format!(
            ".{}.tmp.{}.{n}",
            entry_name(hash),
            std::process::id()
        ));
        let result = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            drop(f);
            std::fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Removes least recently used entries until at most `target` bytes are held.
    fn evict(&self, state: &mut State, target: u64) {
        if state.total <= target {
            return;
        }
        let mut order: Vec<(u64, u128)> = state.slots.iter().map(|(&h, s)| (s.used, h)).collect();
        order.sort_unstable();
        for (_, hash) in order {
            if state.total <= target {
                break;
            }
            if let Some(slot) = state.slots.remove(&hash) {
                state.total -= slot.bytes;
                self.evicted.fetch_add(1, Ordering::Relaxed);
                let path = self.entry_path(hash);
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "could not evict a disk cache entry");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(case: &str, chunk: u32, bytes: &[u8]) -> (String, u32, u64, u64) {
        (case.to_owned(), chunk, bytes.len() as u64, xxh3_64(bytes))
    }

    fn k(t: &(String, u32, u64, u64)) -> DiskKey<'_> {
        DiskKey {
            case: &t.0,
            array: 0,
            chunk: t.1,
            len: t.2,
            checksum: t.3,
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_damage_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![7u8; 1000];
        let b = vec![9u8; 1000];
        let ka = key("s3://b/x/c.pfc", 1, &a);
        let kb = key("s3://b/x/c.pfc", 2, &b);
        {
            let cache = DiskCache::open(dir.path(), 10_000).unwrap();
            assert!(cache.get(&k(&ka)).is_none());
            cache.put(&k(&ka), &a);
            cache.put(&k(&kb), &b);
            assert_eq!(cache.get(&k(&ka)).as_deref(), Some(&a[..]));
            // A second process is refused while this one holds the folder.
            assert!(DiskCache::open(dir.path(), 10_000).is_err());
        }
        // A torn temporary file left by a crash is removed; entries are found again.
        std::fs::write(dir.path().join(TMP_DIR).join(".x.tmp.1.0"), b"torn").unwrap();
        let cache = DiskCache::open(dir.path(), 10_000).unwrap();
        assert_eq!(cache.stats().entries, 2);
        assert!(
            std::fs::read_dir(dir.path().join(TMP_DIR))
                .unwrap()
                .next()
                .is_none()
        );
        assert_eq!(cache.get(&k(&kb)).as_deref(), Some(&b[..]));
        // Damage an entry on disk: it is dropped, not served.
        let path = cache.entry_path(k(&ka).hash());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(cache.get(&k(&ka)).is_none());
        assert!(!path.exists());
        let s = cache.stats();
        assert_eq!((s.damaged, s.entries, s.bytes), (1, 1, 1000));
        // Another chunk with the same bytes has its own key.
        let other = key("s3://b/x/c.pfc", 3, &b);
        assert!(cache.get(&k(&other)).is_none());
    }

    #[test]
    fn stays_within_its_budget_evicting_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 3_500).unwrap();
        let payloads: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 1000]).collect();
        let keys: Vec<_> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| key("s3://b/c.pfc", i as u32, p))
            .collect();
        for i in 0..3 {
            cache.put(&k(&keys[i]), &payloads[i]);
        }
        // Use entry 0 so that entry 1 is the least recently used.
        assert!(cache.get(&k(&keys[0])).is_some());
        cache.put(&k(&keys[3]), &payloads[3]);
        let s = cache.stats();
        assert!(s.bytes <= 3_500, "{s:?}");
        assert!(
            cache.get(&k(&keys[1])).is_none(),
            "least recently used evicted"
        );
        assert!(cache.get(&k(&keys[0])).is_some());
        for i in 4..6 {
            cache.put(&k(&keys[i]), &payloads[i]);
            assert!(cache.stats().bytes <= 3_500);
        }
        drop(cache);
        // A smaller budget on reopen evicts down to it.
        let cache = DiskCache::open(dir.path(), 1_500).unwrap();
        let s = cache.stats();
        assert!(s.bytes <= 1_500 && s.entries == 1, "{s:?}");
        let on_disk: u64 = (0..=255u8)
            .filter_map(|d| std::fs::read_dir(dir.path().join(format!("{d:02x}"))).ok())
            .flat_map(|r| r.flatten())
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert_eq!(
            on_disk, s.bytes,
            "the files on disk are what the cache counts"
        );
    }
}

//! The shared cache of decompressed chunks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::sync::{Cache, GuardResult};
use quick_cache::{OptionsBuilder, Weighter};

use crate::disk_cache::DiskCache;

/// Cache key: (reader id, array index, linear chunk index).
pub(crate) type ChunkKey = (u64, u32, u32);

/// Decompressed bytes of one chunk, starting at an 8-byte aligned address so that any element
/// type can view them in place.
pub(crate) struct ChunkBuf {
    /// `start` alignment bytes, then the chunk.
    data: Vec<u8>,
    start: usize,
}

impl ChunkBuf {
    /// An empty buffer with room for `len` bytes after an 8-aligned start, as a cursor placed
    /// at that start, and the start. Nothing is zero-filled: decoders write straight into the
    /// spare capacity.
    pub(crate) fn writer(len: usize) -> (std::io::Cursor<Vec<u8>>, usize) {
        let mut data: Vec<u8> = Vec::with_capacity(len + 7);
        // `align_offset` may in theory decline (usize::MAX); the start is then unaligned and
        // typed views fail their alignment check rather than misbehave.
        let start = match data.as_ptr().align_offset(8) {
            s if s < 8 => s,
            _ => 0,
        };
        data.resize(start, 0);
        let mut cursor = std::io::Cursor::new(data);
        cursor.set_position(start as u64);
        (cursor, start)
    }

    /// The buffer a [`writer`](Self::writer) filled from `start` on.
    pub(crate) fn from_writer(cursor: std::io::Cursor<Vec<u8>>, start: usize) -> ChunkBuf {
        ChunkBuf {
            data: cursor.into_inner(),
            start,
        }
    }

    /// The chunk's bytes.
    #[inline]
    pub(crate) fn bytes(&self) -> &[u8] {
        self.data.get(self.start..).unwrap_or(&[])
    }

    /// Bytes of memory the buffer holds.
    pub(crate) fn weight(&self) -> u64 {
        self.data.capacity().max(1) as u64
    }
}

#[derive(Clone)]
struct ByteWeighter;

impl Weighter<ChunkKey, Arc<ChunkBuf>> for ByteWeighter {
    fn weight(&self, _key: &ChunkKey, val: &Arc<ChunkBuf>) -> u64 {
        val.weight()
    }
}

/// Counters of a [`ChunkCache`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Chunk look-ups served from the cache.
    pub hits: u64,
    /// Chunk look-ups that had to decompress.
    pub misses: u64,
    /// Bytes of decompressed chunks held now.
    pub bytes_cached: u64,
    /// Most bytes the cache holds (the requested capacity rounded down to a multiple of the
    /// shard count).
    pub capacity_bytes: u64,
    /// Chunks held now.
    pub entries: u64,
}

/// Bounded, thread-safe cache of decompressed chunks shared by many readers.
///
/// Sharded (one lock per shard) and bounded by bytes of decompressed data: the bytes held never
/// exceed [`CacheStats::capacity_bytes`]. A chunk larger than one shard's share is decoded for
/// the read that needs it but not kept. Keys carry the reader's unique id, so a reopened or
/// rewritten file never sees chunks of an earlier one.
pub struct ChunkCache {
    inner: Cache<ChunkKey, Arc<ChunkBuf>, ByteWeighter>,
    /// Stored payloads of chunks fetched from object storage, kept on local disk.
    disk: Option<Arc<DiskCache>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Typical decompressed chunk size, used to size the cache's tables.
const TYPICAL_CHUNK_BYTES: u64 = 64 << 10;

impl ChunkCache {
    /// A cache holding at most `capacity_bytes` of decompressed chunks (0 disables caching).
    pub fn new(capacity_bytes: u64) -> Arc<ChunkCache> {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        let shards = (threads * 4).next_power_of_two().clamp(1, 64);
        let items = (capacity_bytes / TYPICAL_CHUNK_BYTES).clamp(16, 1 << 24) as usize;
        // quick_cache gives each shard ceil(capacity / shards); a multiple of the shard count
        // keeps the total at or below what was asked (the shard count only ever halves).
        let capacity = capacity_bytes - capacity_bytes % shards as u64;
        let mut builder = OptionsBuilder::new();
        builder
            .shards(shards)
            .estimated_items_capacity(items)
            .weight_capacity(capacity);
        let inner = match builder.build() {
            Ok(options) => Cache::with_options(
                options,
                ByteWeighter,
                Default::default(),
                Default::default(),
            ),
            // The builder only fails on missing fields, all of which are set above.
            Err(_) => Cache::with_weighter(items, capacity, ByteWeighter),
        };
        Arc::new(ChunkCache {
            inner,
            disk: None,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// A cache like [`new`](Self::new) in memory, with `disk` beneath it for the chunks that
    /// readers of object storage fetch: a chunk missing from memory is looked up there before
    /// it is fetched, and every fetched payload is kept there. Readers of local files do not
    /// use the disk tier (their chunks are on local disk already).
    pub fn with_disk_cache(capacity_bytes: u64, disk: Arc<DiskCache>) -> Arc<ChunkCache> {
        let mut cache = ChunkCache::new(capacity_bytes);
        if let Some(c) = Arc::get_mut(&mut cache) {
            c.disk = Some(disk);
        }
        cache
    }

    /// The disk tier, if any.
    pub fn disk_cache(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes_cached: self.inner.weight(),
            capacity_bytes: self.inner.capacity(),
            entries: self.inner.len() as u64,
        }
    }

    /// Whether the chunk under `key` is held now (does not count as a hit or a miss).
    pub(crate) fn contains(&self, key: &ChunkKey) -> bool {
        self.inner.contains_key(key)
    }

    /// Keeps a chunk decoded outside [`get_or_load`](Self::get_or_load) (a batch fetched from
    /// object storage); counted as a miss.
    pub(crate) fn insert(&self, key: ChunkKey, value: Arc<ChunkBuf>) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.inner.insert(key, value);
    }

    /// Drops every chunk cached in memory (counters and the disk tier are kept).
    pub fn clear(&self) {
        self.inner.clear();
    }

    /// The chunk under `key`, or `load`'s result, which is cached unless it fails.
    /// Concurrent look-ups of the same missing chunk wait for one load.
    pub(crate) fn get_or_load<E>(
        &self,
        key: ChunkKey,
        load: impl FnOnce() -> Result<ChunkBuf, E>,
    ) -> Result<Arc<ChunkBuf>, E> {
        match self.inner.get_value_or_guard(&key, None) {
            GuardResult::Value(v) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(v)
            }
            GuardResult::Guard(guard) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                // On error the guard is dropped without a value: nothing is cached.
                let v = Arc::new(load()?);
                // Refused when the chunk is larger than a shard may hold; it is still returned.
                let _ = guard.insert(Arc::clone(&v));
                Ok(v)
            }
            GuardResult::Timeout => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Ok(Arc::new(load()?))
            }
        }
    }
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("stats", &self.stats())
            .finish()
    }
}

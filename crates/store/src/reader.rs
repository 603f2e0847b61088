//! The case reader and box reads: case files memory-mapped from local disk, or read from
//! object storage with ranged requests.

use std::any::TypeId;
use std::cell::RefCell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;
use patchflow_volume::{DType, Element};
use xxhash_rust::xxh3::xxh3_64;

use crate::cache::{ChunkBuf, ChunkCache};
use crate::disk_cache::DiskKey;
use crate::error::StoreError;
use crate::format::{
    ENTRY_LEN, Entry, FORMAT_VERSION, Grid, HeaderDoc, KIND_CONSTANT, KIND_RAW, KIND_ZSTD,
    MAX_CASE_VOXELS, MAX_CHUNK_VOXELS, MAX_CLASSES, MAX_HEADER_LEN, PREAMBLE_LEN, Preamble,
    PreambleError, Section,
};
use crate::location::{ObjectLocation, StoreLocation};
use crate::manifest::validate_case_id;
use crate::meta::{ArrayId, ArrayStats, CaseMeta, StoreStats};
use crate::remote::Bucket;

/// Payloads of one object-storage read closer than this are fetched in one range request
/// (the gap's bytes are fetched and dropped): one round trip costs more than this many bytes.
pub const COALESCE_GAP_BYTES: u64 = 256 << 10;
/// Longest single range request of a read (longer runs are split).
pub const MAX_RANGE_BYTES: u64 = 32 << 20;

/// Source of unique reader ids (cache keys).
static NEXT_READER_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// One zstd decompression context per thread, reused across chunks.
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// One contiguous run of a box read, handed to a visitor (see [`CaseReader::visit_box`]).
#[derive(Copy, Clone, Debug)]
pub struct BoxRun<'a> {
    /// Element offset of the run in the output box (C order over the box's `size`).
    pub dst: usize,
    /// Number of elements.
    pub len: usize,
    /// Little-endian bytes of `len` elements of the array's dtype; `None` means padding.
    pub src: Option<&'a [u8]>,
}

/// Receives what a box walk produces: padding runs, and blocks of in-volume rows.
trait Sink {
    /// `len` padding elements at output offset `dst`.
    fn pad(&mut self, dst: usize, len: usize);
    /// The rows of one band of chunks (fixed chunk z and y), see [`Block`].
    fn block(&mut self, b: &Block<'_>);
}

/// Rows `nz × ny` of the output, each made of the parts of the chunks of one band, in order.
/// Row `(zi, yi)` starts at output element `dst0 + zi·dst_plane + yi·dst_row`.
struct Block<'a> {
    dst0: usize,
    dst_plane: usize,
    dst_row: usize,
    nz: usize,
    ny: usize,
    parts: &'a [BandChunk],
}

/// One chunk's part of every row of a [`Block`].
struct BandChunk {
    src: ChunkSrc,
    /// Offset of the part in the output row.
    bx: usize,
    /// Elements per row.
    xn: usize,
    /// Row `(zi, yi)` of a stored chunk starts at element `off0 + zi·plane + yi·row`.
    off0: usize,
    plane: usize,
    row: usize,
}

/// A decoded chunk or a constant one.
enum ChunkSrc {
    Const(u64),
    Buf(Arc<ChunkBuf>),
}

/// One array of the case.
pub(crate) struct ArrayInfo {
    pub(crate) id: ArrayId,
    pub(crate) dtype: DType,
    pub(crate) entries: Vec<Entry>,
}

/// One class of the class-location table: its value, byte offset in the file and count.
struct ClassSpan {
    class: u16,
    offset: usize,
    count: usize,
}

/// The bytes of a case file.
enum Body {
    /// The whole file, memory-mapped (or copied into an anonymous mapping).
    Mapped(Mmap),
    /// A file in object storage: its index, class table and header are held in memory, chunk
    /// payloads fetched with ranged requests when a read needs them.
    Remote(RemoteBody),
}

struct RemoteBody {
    bucket: Arc<Bucket>,
    location: ObjectLocation,
    /// `location` as text (disk cache keys).
    url: String,
    file_len: u64,
    /// Bytes `[tail_start, file_len)` of the file, 8-byte aligned in memory.
    tail: AlignedBytes,
    tail_start: u64,
}

impl RemoteBody {
    /// The body of the file at `location` of `file_len` bytes, holding its bytes from
    /// `tail_start` on (`tail`).
    fn body(
        bucket: Arc<Bucket>,
        location: ObjectLocation,
        file_len: u64,
        tail: AlignedBytes,
        tail_start: u64,
    ) -> Body {
        Body::Remote(RemoteBody {
            bucket,
            url: location.url(),
            location,
            file_len,
            tail,
            tail_start,
        })
    }
}

/// Bytes at an 8-byte aligned address, so that tables can be viewed in place.
struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn copy_of(bytes: &[u8]) -> AlignedBytes {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        AlignedBytes {
            words,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Mapped(m) => m.len() as u64,
            Body::Remote(r) => r.file_len,
        }
    }

    /// Bytes `[offset, offset + len)` when they are held in memory: anywhere in a mapped file,
    /// only in the tail (index, class table, header) of a remote one.
    fn held(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let (bytes, base) = match self {
            Body::Mapped(m) => (&m[..], 0),
            Body::Remote(r) => (r.tail.bytes(), r.tail_start),
        };
        let start = usize::try_from(offset.checked_sub(base)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        bytes.get(start..end)
    }
}

/// What validation found in a case file's structure.
struct Parsed {
    meta: CaseMeta,
    grid: Grid,
    arrays: Vec<ArrayInfo>,
    classes: Vec<ClassSpan>,
}

/// Chunks decoded for one box read of a remote case, by linear chunk index (sorted).
type Fetched = Vec<(u32, Arc<ChunkBuf>)>;

/// A validated case file, memory-mapped from local disk or read from object storage.
///
/// Opening validates the whole file structure (preamble, section bounds and checksums, header,
/// every index entry, the class-location table), so that reads never touch bytes outside the
/// file. Chunk payloads are checked against their checksum when first decoded.
///
/// A path `s3://bucket/key` opens the object there (see [`crate::StoreLocation`]): opening
/// fetches the preamble and then the index, class table and header (two ranged GETs) and
/// keeps them; a box read fetches the payloads of the chunks it needs that neither the chunk
/// cache nor its disk tier holds, as few coalesced range requests, a few at a time.
pub struct CaseReader {
    path: PathBuf,
    body: Body,
    meta: CaseMeta,
    pub(crate) grid: Grid,
    pub(crate) arrays: Vec<ArrayInfo>,
    classes: Vec<ClassSpan>,
    cache: Arc<ChunkCache>,
    uid: u64,
    /// Ask the kernel for the payloads a read needs ([`CaseReader::prefetch`]).
    prefetch: bool,
}

/// Name of the environment variable that, set to `1`, leaves file reads to the kernel's own
/// readahead (no `MADV_RANDOM`, no prefetch): a diagnostic for comparing the two on a machine.
pub const KERNEL_READAHEAD_ENV: &str = "PATCHFLOW_KERNEL_READAHEAD";

fn kernel_readahead() -> bool {
    std::env::var_os(KERNEL_READAHEAD_ENV).is_some_and(|v| v == "1")
}

impl std::fmt::Debug for CaseReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaseReader")
            .field("path", &self.path)
            .field("id", &self.meta.id)
            .field("shape", &self.meta.shape)
            .field("chunk_shape", &self.grid.chunk)
            .finish()
    }
}

impl CaseReader {
    /// Maps and validates the case file at `path` (or fetches the structure of the object at
    /// an `s3://bucket/key` path); decoded chunks go through `cache`.
    pub fn open(path: &Path, cache: Arc<ChunkCache>) -> Result<CaseReader, StoreError> {
        match StoreLocation::from_path(path)? {
            StoreLocation::Local(_) => Self::open_file(path, cache),
            StoreLocation::S3(location) => Self::open_remote(location, cache),
        }
    }

    fn open_file(path: &Path, cache: Arc<ChunkCache>) -> Result<CaseReader, StoreError> {
        let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
        let len = file.metadata().map_err(|e| StoreError::io(path, e))?.len();
        if len < PREAMBLE_LEN as u64 {
            // Still tell a future version from a short file when the start is there.
            let mut head = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(&file, 16), &mut head)
                .map_err(|e| StoreError::io(path, e))?;
            return Err(
                preamble_error(path, Preamble::decode(&head).err()).unwrap_or_else(|| {
                    StoreError::corrupt(
                        path,
                        format!(
                            "file is {len} bytes, shorter than the {PREAMBLE_LEN}-byte preamble"
                        ),
                    )
                }),
            );
        }
        // SAFETY: the mapping is read-only and case files are never modified in place: writers
        // create a new file and rename it over the old one, so the mapped inode keeps its bytes
        // for as long as the map lives. (Truncating a mapped file behind the store's back would
        // make reads fault; that is outside the store's contract.)
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StoreError::io(path, e))?;
        // Patches read scattered chunks. Without this the kernel reads a whole readahead
        // window (often several MiB) around every page fault, which multiplies the bytes read
        // from disk when the store does not fit in memory; `prefetch` asks for exactly the
        // chunks a read needs instead.
        let kernel_readahead = kernel_readahead();
        if !kernel_readahead && let Err(e) = map.advise(memmap2::Advice::Random) {
            tracing::debug!(path = %path.display(), error = %e, "madvise(RANDOM) failed");
        }
        let mut reader = Self::from_map(path.to_path_buf(), map, cache)?;
        reader.prefetch = !kernel_readahead;
        Ok(reader)
    }

    /// Validates a case file held in memory, exactly as [`open`](Self::open) validates a file
    /// on disk; `name` stands for the file in errors and becomes [`path`](Self::path).
    ///
    /// The bytes are copied once into a private read-only anonymous mapping, so the reader owns
    /// them. Useful for case files that do not come from the local file system.
    pub fn from_bytes(
        name: &Path,
        bytes: &[u8],
        cache: Arc<ChunkCache>,
    ) -> Result<CaseReader, StoreError> {
        let mut map =
            memmap2::MmapMut::map_anon(bytes.len()).map_err(|e| StoreError::io(name, e))?;
        map.copy_from_slice(bytes);
        let map = map.make_read_only().map_err(|e| StoreError::io(name, e))?;
        Self::from_map(name.to_path_buf(), map, cache)
    }

    /// Opens the case object at `location`: its preamble, then everything from the index to
    /// the end of the file, validated as a local file is.
    fn open_remote(
        location: ObjectLocation,
        cache: Arc<ChunkCache>,
    ) -> Result<CaseReader, StoreError> {
        let path = location.to_path();
        let bucket = crate::remote::bucket(&location.bucket)?;
        let (head, file_len) = bucket.get_head(&location, PREAMBLE_LEN as u64)?;
        if (head.len() as u64) < file_len.min(PREAMBLE_LEN as u64) {
            return Err(StoreError::corrupt(
                &path,
                format!(
                    "the first {} bytes of a {file_len}-byte object came back as {}",
                    PREAMBLE_LEN,
                    head.len()
                ),
            ));
        }
        if file_len <= PREAMBLE_LEN as u64 {
            // Too short to be valid: validate it whole for the exact reason.
            let parsed = Self::validate(&path, file_len, &head, &head, 0)?;
            return Ok(Self::assemble(
                path,
                RemoteBody::body(bucket, location, file_len, AlignedBytes::copy_of(&head), 0),
                parsed,
                cache,
            ));
        }
        let pre = match Preamble::decode(&head) {
            Ok(p) => p,
            Err(e) => {
                return Err(preamble_error(&path, Some(e))
                    .unwrap_or_else(|| StoreError::corrupt(&path, "invalid preamble")));
            }
        };
        // The index must start inside the file, after the preamble, for the tail to be fetched;
        // everything else is checked by validation as for a local file.
        let tail_start = pre.index.offset;
        if pre.file_len != file_len || tail_start < PREAMBLE_LEN as u64 || tail_start >= file_len {
            return Err(Self::validate(&path, file_len, &head, &[], file_len)
                .err()
                .unwrap_or_else(|| {
                    StoreError::corrupt(
                        &path,
                        format!("index offset {tail_start} lies outside the file"),
                    )
                }));
        }
        let tail = bucket
            .get_ranges(&location, std::iter::once(tail_start..file_len).collect())?
            .pop()
            .unwrap_or_default();
        let tail = AlignedBytes::copy_of(&tail);
        let parsed = Self::validate(&path, file_len, &head, tail.bytes(), tail_start)?;
        Ok(Self::assemble(
            path,
            RemoteBody::body(bucket, location, file_len, tail, tail_start),
            parsed,
            cache,
        ))
    }

    fn from_map(
        path: PathBuf,
        map: Mmap,
        cache: Arc<ChunkCache>,
    ) -> Result<CaseReader, StoreError> {
        let parsed = Self::validate(&path, map.len() as u64, &map, &map, 0)?;
        Ok(Self::assemble(path, Body::Mapped(map), parsed, cache))
    }

    fn assemble(path: PathBuf, body: Body, parsed: Parsed, cache: Arc<ChunkCache>) -> CaseReader {
        let uid = NEXT_READER_ID.fetch_add(1, Ordering::Relaxed);
        let Parsed {
            meta,
            grid,
            arrays,
            classes,
        } = parsed;
        tracing::debug!(path = %path.display(), case = %meta.id, shape = ?meta.shape, chunk = ?grid.chunk, "case opened");
        CaseReader {
            path,
            body,
            meta,
            grid,
            arrays,
            classes,
            cache,
            uid,
            prefetch: false,
        }
    }

    /// Validates the structure of a file of `file_len` bytes from its start `head` (at least
    /// the preamble, when the file has one) and `tail`, its bytes from `tail_start` to the end
    /// (which must hold every section).
    fn validate(
        path: &Path,
        file_len: u64,
        head: &[u8],
        tail: &[u8],
        tail_start: u64,
    ) -> Result<Parsed, StoreError> {
        let bad = |reason: String| StoreError::corrupt(path, reason);
        let pre = match Preamble::decode(head) {
            Ok(p) => p,
            Err(e) => {
                return Err(preamble_error(path, Some(e))
                    .unwrap_or_else(|| bad("invalid preamble".to_owned())));
            }
        };
        if pre.file_len != file_len {
            return Err(bad(format!(
                "preamble records a file of {} bytes, the file has {file_len} (truncated or extended)",
                pre.file_len
            )));
        }

        check_sections(&pre, file_len).map_err(&bad)?;
        let index_bytes = section_bytes(tail, tail_start, &pre.index, "index").map_err(&bad)?;
        let class_bytes =
            section_bytes(tail, tail_start, &pre.classes, "class-location table").map_err(&bad)?;
        let header_bytes = section_bytes(tail, tail_start, &pre.header, "header").map_err(&bad)?;

        let doc: HeaderDoc = serde_json::from_slice(header_bytes)
            .map_err(|e| bad(format!("header JSON does not parse: {e}")))?;
        let meta = doc.meta;
        let grid = check_layout(&meta, &pre).map_err(&bad)?;
        let arrays = read_index(index_bytes, &meta, &grid, pre.index.offset).map_err(&bad)?;

        let classes = parse_classes(class_bytes, pre.classes.offset as usize, meta.shape)
            .map_err(|r| bad(format!("class-location table: {r}")))?;

        Ok(Parsed {
            meta,
            grid,
            arrays,
            classes,
        })
    }

    /// The case metadata.
    pub fn meta(&self) -> &CaseMeta {
        &self.meta
    }

    /// Path the case was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Chunk shape `[z, y, x]` of the file.
    pub fn chunk_shape(&self) -> [usize; 3] {
        self.grid.chunk
    }

    /// Size of the case file in bytes.
    pub fn file_len(&self) -> u64 {
        self.body.len()
    }

    /// Whether the case is read from object storage.
    pub fn is_remote(&self) -> bool {
        matches!(self.body, Body::Remote(_))
    }

    /// Asks the kernel to drop this file's pages from memory, so that the next reads come from
    /// storage again (cold-start benchmarks). Unmaps this reader's resident pages first, since
    /// the page cache keeps pages that a process still maps. Decoded chunks in the
    /// [`ChunkCache`] are not touched (see [`ChunkCache::clear`]). Pages mapped by another
    /// process stay in memory. A case read from object storage has no pages to drop: nothing
    /// happens.
    pub fn evict_page_cache(&self) -> Result<(), StoreError> {
        use std::os::fd::AsRawFd;
        let Body::Mapped(map) = &self.body else {
            return Ok(());
        };
        // SAFETY: the mapping is read-only and backed by a file that is never modified in place
        // (see `open`); dropping its pages only makes the next access fault them in again from
        // the same file, so no data the program relies on is lost.
        unsafe {
            map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
                .map_err(|e| StoreError::io(&self.path, e))?;
        }
        let file = File::open(&self.path).map_err(|e| StoreError::io(&self.path, e))?;
        // SAFETY: plain system call on a file descriptor that `file` owns for the whole call.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(StoreError::io(
                &self.path,
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    /// Element type of `array`.
    pub fn dtype(&self, array: ArrayId) -> Result<DType, StoreError> {
        Ok(self.arrays[self.array_index(array)?].dtype)
    }

    fn array_index(&self, array: ArrayId) -> Result<usize, StoreError> {
        let channels = self.meta.channels.len();
        match array {
            ArrayId::Image(c) if c < channels => Ok(c),
            ArrayId::Label => Ok(channels),
            ArrayId::Image(_) => Err(StoreError::NoSuchArray {
                case: self.meta.id.clone(),
                array: array.to_string(),
                channels,
            }),
        }
    }

    fn box_error(&self, array: ArrayId, reason: String) -> StoreError {
        StoreError::InvalidBox {
            case: self.meta.id.clone(),
            array: array.to_string(),
            reason,
        }
    }

    /// Reads the box of `size` voxels starting at `origin` (`[z, y, x]`; may be negative or
    /// beyond the volume: those voxels get `pad`) into `out` in C order.
    ///
    /// `out.len()` must equal `size[0] * size[1] * size[2]` and `T::DTYPE` the array's dtype.
    pub fn read_box<T: Element>(
        &self,
        array: ArrayId,
        origin: [i64; 3],
        size: [usize; 3],
        pad: T,
        out: &mut [T],
    ) -> Result<(), StoreError> {
        let a = self.array_index(array)?;
        let stored = self.arrays[a].dtype;
        if T::DTYPE != stored {
            return Err(StoreError::DTypeMismatch {
                case: self.meta.id.clone(),
                array: array.to_string(),
                stored,
                requested: T::DTYPE,
            });
        }
        if !is_primitive::<T>() {
            return Err(self.box_error(
                array,
                format!(
                    "element type {} is not a primitive number type",
                    std::any::type_name::<T>()
                ),
            ));
        }
        let total = box_voxels(size).ok_or_else(|| {
            self.box_error(array, format!("size {size:?} overflows the address space"))
        })?;
        if out.len() != total {
            return Err(self.box_error(
                array,
                format!(
                    "output holds {} elements, size {size:?} needs {total}",
                    out.len()
                ),
            ));
        }
        let mut sink = CopySink {
            out,
            pad,
            misfit: false,
        };
        self.walk(a, origin, size, &mut sink)?;
        if sink.misfit {
            return Err(self.box_error(
                array,
                "internal error: a run did not fit the output box".to_owned(),
            ));
        }
        Ok(())
    }

    /// The same walk as [`read_box`](Self::read_box), but hands each contiguous run (in-volume
    /// data or padding) to `f`, so callers can fuse type conversion into the copy. Runs cover
    /// every voxel of the box exactly once, in no particular order.
    pub fn visit_box(
        &self,
        array: ArrayId,
        origin: [i64; 3],
        size: [usize; 3],
        f: &mut dyn FnMut(BoxRun<'_>),
    ) -> Result<(), StoreError> {
        let a = self.array_index(array)?;
        box_voxels(size).ok_or_else(|| {
            self.box_error(array, format!("size {size:?} overflows the address space"))
        })?;
        let mut sink = VisitSink {
            f,
            es: self.arrays[a].dtype.size(),
            fill: Vec::new(),
            fill_bits: None,
            misfit: false,
        };
        self.walk(a, origin, size, &mut sink)?;
        if sink.misfit {
            return Err(self.box_error(
                array,
                "internal error: a run did not fit its chunk".to_owned(),
            ));
        }
        Ok(())
    }

    /// Walks the box: padding runs first, then one block per band of chunks it touches, in
    /// output order, so the output fills nearly sequentially and each chunk streams.
    fn walk<S: Sink>(
        &self,
        a: usize,
        origin: [i64; 3],
        size: [usize; 3],
        sink: &mut S,
    ) -> Result<(), StoreError> {
        let Some(total) = box_voxels(size) else {
            return Ok(());
        };
        if total == 0 {
            return Ok(());
        }
        let shape = self.grid.shape;
        // In-volume range [lo, hi) per axis and its position [b0, b1) inside the box.
        let mut lo = [0usize; 3];
        let mut hi = [0usize; 3];
        let mut b0 = [0usize; 3];
        let mut b1 = [0usize; 3];
        for ax in 0..3 {
            let o = i128::from(origin[ax]);
            let l = o.max(0);
            let h = (o + size[ax] as i128).min(shape[ax] as i128);
            if l >= h {
                sink.pad(0, total);
                return Ok(());
            }
            // 0 <= l < h <= shape, and l - o, h - o lie in [0, size].
            lo[ax] = l as usize;
            hi[ax] = h as usize;
            b0[ax] = (l - o) as usize;
            b1[ax] = (h - o) as usize;
        }
        let [s0, s1, s2] = size;
        let plane = s1 * s2;

        // Padding: whole planes, whole rows, row ends.
        if b0[0] > 0 {
            sink.pad(0, b0[0] * plane);
        }
        if b1[0] < s0 {
            sink.pad(b1[0] * plane, (s0 - b1[0]) * plane);
        }
        let x_pad = b0[2] > 0 || b1[2] < s2;
        for bz in b0[0]..b1[0] {
            let base = bz * plane;
            if b0[1] > 0 {
                sink.pad(base, b0[1] * s2);
            }
            if b1[1] < s1 {
                sink.pad(base + b1[1] * s2, (s1 - b1[1]) * s2);
            }
            if x_pad {
                for by in b0[1]..b1[1] {
                    let row = base + by * s2;
                    if b0[2] > 0 {
                        sink.pad(row, b0[2]);
                    }
                    if b1[2] < s2 {
                        sink.pad(row + b1[2], s2 - b1[2]);
                    }
                }
            }
        }

        let fetched = match &self.body {
            Body::Mapped(map) => {
                self.prefetch(map, a, lo, hi);
                Fetched::new()
            }
            Body::Remote(remote) => self.fetch_missing(remote, a, lo, hi)?,
        };
        // Data: one block per band of chunks (fixed cz, cy).
        let cs = self.grid.chunk;
        let (cx_lo, cx_hi) = (lo[2] / cs[2], (hi[2] - 1) / cs[2]);
        let mut band: Vec<BandChunk> = Vec::with_capacity(cx_hi - cx_lo + 1);
        for cz in lo[0] / cs[0]..=(hi[0] - 1) / cs[0] {
            for cy in lo[1] / cs[1]..=(hi[1] - 1) / cs[1] {
                let start = [cz * cs[0], cy * cs[1]];
                let ext = self.grid.extent([cz, cy, cx_lo]);
                let (z0, z1) = (lo[0].max(start[0]), hi[0].min(start[0] + ext[0]));
                let (y0, y1) = (lo[1].max(start[1]), hi[1].min(start[1] + ext[1]));
                band.clear();
                for cx in cx_lo..=cx_hi {
                    let c = [cz, cy, cx];
                    let x_start = cx * cs[2];
                    let x_ext = self.grid.extent(c)[2];
                    let x0 = lo[2].max(x_start);
                    let x1 = hi[2].min(x_start + x_ext);
                    let src = self.chunk(a, c, &fetched)?;
                    let bx = x0 - lo[2] + b0[2];
                    // Neighbouring constant chunks of one value make one run per row.
                    if let (ChunkSrc::Const(bits), Some(last)) = (&src, band.last_mut())
                        && matches!(last.src, ChunkSrc::Const(b) if b == *bits)
                        && last.bx + last.xn == bx
                    {
                        last.xn += x1 - x0;
                        continue;
                    }
                    band.push(BandChunk {
                        src,
                        bx,
                        xn: x1 - x0,
                        off0: ((z0 - start[0]) * ext[1] + y0 - start[1]) * x_ext + x0 - x_start,
                        plane: ext[1] * x_ext,
                        row: x_ext,
                    });
                }
                sink.block(&Block {
                    dst0: ((z0 - lo[0] + b0[0]) * s1 + y0 - lo[1] + b0[1]) * s2,
                    dst_plane: plane,
                    dst_row: s2,
                    nz: z1 - z0,
                    ny: y1 - y0,
                    parts: &band,
                });
            }
        }
        Ok(())
    }

    fn chunk_corrupt(&self, a: usize, c: [usize; 3], what: &str) -> StoreError {
        StoreError::corrupt(
            &self.path,
            format!(
                "case {}: {} chunk {c:?}: {what}",
                self.meta.id, self.arrays[a].id
            ),
        )
    }

    /// Asks the kernel to start reading the stored bytes of every chunk of array `a` that the
    /// voxel range `[lo, hi)` touches and that the chunk cache does not hold, so that the
    /// reads overlap and only those bytes are read. Adjacent payloads go in one call.
    fn prefetch(&self, map: &Mmap, a: usize, lo: [usize; 3], hi: [usize; 3]) {
        if !self.prefetch {
            return;
        }
        let cs = self.grid.chunk;
        let mut pending: Option<(usize, usize)> = None;
        let flush = |range: (usize, usize)| {
            if let Err(e) = map.advise_range(memmap2::Advice::WillNeed, range.0, range.1 - range.0)
            {
                tracing::trace!(error = %e, "madvise(WILLNEED) failed");
            }
        };
        for cz in lo[0] / cs[0]..=(hi[0] - 1) / cs[0] {
            for cy in lo[1] / cs[1]..=(hi[1] - 1) / cs[1] {
                for cx in lo[2] / cs[2]..=(hi[2] - 1) / cs[2] {
                    let lin = self.grid.linear([cz, cy, cx]);
                    let Some(e) = self.arrays[a].entries.get(lin) else {
                        continue;
                    };
                    if e.kind == KIND_CONSTANT
                        || self.cache.contains(&(self.uid, a as u32, lin as u32))
                    {
                        continue;
                    }
                    let Some((start, end)) = usize::try_from(e.offset_or_value)
                        .ok()
                        .zip(usize::try_from(e.len).ok())
                        .and_then(|(o, l)| Some((o, o.checked_add(l)?)))
                        .filter(|&(_, end)| end <= map.len())
                    else {
                        // Bad entries are reported when the chunk is decoded.
                        continue;
                    };
                    pending = match pending {
                        Some((s0, e0)) if e0 == start => Some((s0, end)),
                        Some(range) => {
                            flush(range);
                            Some((start, end))
                        }
                        None => Some((start, end)),
                    };
                }
            }
        }
        if let Some(range) = pending {
            flush(range);
        }
    }

    /// The payloads of every chunk of array `a` in the voxel range `[lo, hi)` that the chunk
    /// cache does not hold, from the disk cache or fetched from object storage (as few range
    /// requests as [`COALESCE_GAP_BYTES`] allows), each checked and decoded, kept in the chunk
    /// cache and returned, so that the read has them even if the cache lets them go.
    fn fetch_missing(
        &self,
        remote: &RemoteBody,
        a: usize,
        lo: [usize; 3],
        hi: [usize; 3],
    ) -> Result<Fetched, StoreError> {
        let cs = self.grid.chunk;
        let mut wanted: Vec<(u32, Entry)> = Vec::new();
        for cz in lo[0] / cs[0]..=(hi[0] - 1) / cs[0] {
            for cy in lo[1] / cs[1]..=(hi[1] - 1) / cs[1] {
                for cx in lo[2] / cs[2]..=(hi[2] - 1) / cs[2] {
                    let lin = self.grid.linear([cz, cy, cx]);
                    let Some(&e) = self.arrays[a].entries.get(lin) else {
                        continue;
                    };
                    if e.kind != KIND_CONSTANT
                        && !self.cache.contains(&(self.uid, a as u32, lin as u32))
                    {
                        wanted.push((lin as u32, e));
                    }
                }
            }
        }
        let mut fetched = Fetched::with_capacity(wanted.len());
        let disk = self.cache.disk_cache();
        if let Some(disk) = disk {
            let mut rest = Vec::with_capacity(wanted.len());
            for (lin, e) in wanted {
                match disk.get(&self.disk_key(remote, a, lin, &e)) {
                    Some(bytes) => fetched.push((lin, self.keep(a, lin, &e, &bytes)?)),
                    None => rest.push((lin, e)),
                }
            }
            wanted = rest;
        }
        for (lin, e, bytes) in self.fetch_payloads(remote, a, wanted)? {
            let buf = self.keep(a, lin, &e, &bytes)?;
            if let Some(disk) = disk {
                disk.put(&self.disk_key(remote, a, lin, &e), &bytes);
            }
            fetched.push((lin, buf));
        }
        fetched.sort_unstable_by_key(|&(lin, _)| lin);
        Ok(fetched)
    }

    fn disk_key<'r>(&self, remote: &'r RemoteBody, a: usize, lin: u32, e: &Entry) -> DiskKey<'r> {
        DiskKey {
            case: &remote.url,
            array: a as u32,
            chunk: lin,
            len: e.len,
            checksum: e.checksum,
        }
    }

    /// Checks and decodes a fetched payload and keeps it in the chunk cache.
    fn keep(
        &self,
        a: usize,
        lin: u32,
        e: &Entry,
        stored: &[u8],
    ) -> Result<Arc<ChunkBuf>, StoreError> {
        let c = self.grid.coords(lin as usize);
        let buf = Arc::new(self.decode_payload(a, c, e, stored)?);
        self.cache
            .insert((self.uid, a as u32, lin), Arc::clone(&buf));
        Ok(buf)
    }

    /// Fetches the stored payloads of `chunks` (of array `a`) from object storage: payloads at
    /// most [`COALESCE_GAP_BYTES`] apart share one range request of at most
    /// [`MAX_RANGE_BYTES`]. Returns each chunk with its payload, in offset order.
    fn fetch_payloads(
        &self,
        remote: &RemoteBody,
        a: usize,
        mut chunks: Vec<(u32, Entry)>,
    ) -> Result<Vec<(u32, Entry, bytes::Bytes)>, StoreError> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        chunks.sort_unstable_by_key(|(_, e)| e.offset_or_value);
        // Runs of chunks: [first, end) into `chunks`, and the byte range fetched.
        let mut runs: Vec<(usize, usize, std::ops::Range<u64>)> = Vec::new();
        for (i, (lin, e)) in chunks.iter().enumerate() {
            let start = e.offset_or_value;
            let end = start
                .checked_add(e.len)
                .filter(|&end| end <= remote.file_len)
                .ok_or_else(|| {
                    self.chunk_corrupt(
                        a,
                        self.grid.coords(*lin as usize),
                        "payload outside the file",
                    )
                })?;
            match runs.last_mut() {
                Some((_, last, range))
                    if start >= range.end
                        && start - range.end <= COALESCE_GAP_BYTES
                        && end - range.start <= MAX_RANGE_BYTES =>
                {
                    *last = i + 1;
                    range.end = end;
                }
                _ => runs.push((i, i + 1, start..end)),
            }
        }
        let ranges: Vec<_> = runs.iter().map(|(_, _, r)| r.clone()).collect();
        let bodies = remote.bucket.get_ranges(&remote.location, ranges)?;
        let mut out = Vec::with_capacity(chunks.len());
        for ((first, end, range), body) in runs.into_iter().zip(bodies) {
            for &(lin, e) in &chunks[first..end] {
                let at = (e.offset_or_value - range.start) as usize;
                out.push((lin, e, body.slice(at..at + e.len as usize)));
            }
        }
        Ok(out)
    }

    /// The chunk at grid coordinates `c` of array `a`: from `fetched`, else through the cache.
    fn chunk(&self, a: usize, c: [usize; 3], fetched: &Fetched) -> Result<ChunkSrc, StoreError> {
        let lin = self.grid.linear(c);
        let Some(e) = self.arrays[a].entries.get(lin) else {
            return Err(self.chunk_corrupt(a, c, "no index entry"));
        };
        if e.kind == KIND_CONSTANT {
            return Ok(ChunkSrc::Const(e.offset_or_value));
        }
        if !fetched.is_empty()
            && let Ok(i) = fetched.binary_search_by_key(&(lin as u32), |&(l, _)| l)
        {
            return Ok(ChunkSrc::Buf(Arc::clone(&fetched[i].1)));
        }
        let key = (self.uid, a as u32, lin as u32);
        let buf = self.cache.get_or_load(key, || self.decode(a, c, e))?;
        Ok(ChunkSrc::Buf(buf))
    }

    /// Checks and decodes one stored chunk (fetching it alone when the case is remote).
    fn decode(&self, a: usize, c: [usize; 3], e: &Entry) -> Result<ChunkBuf, StoreError> {
        match &self.body {
            Body::Mapped(_) => {
                let stored = self
                    .body
                    .held(e.offset_or_value, e.len)
                    .ok_or_else(|| self.chunk_corrupt(a, c, "payload outside the file"))?;
                self.decode_payload(a, c, e, stored)
            }
            Body::Remote(remote) => {
                let lin = self.grid.linear(c) as u32;
                if let Some(disk) = self.cache.disk_cache()
                    && let Some(bytes) = disk.get(&self.disk_key(remote, a, lin, e))
                {
                    return self.decode_payload(a, c, e, &bytes);
                }
                let (_, _, bytes) = self
                    .fetch_payloads(remote, a, vec![(lin, *e)])?
                    .pop()
                    .ok_or_else(|| self.chunk_corrupt(a, c, "payload was not fetched"))?;
                let buf = self.decode_payload(a, c, e, &bytes)?;
                if let Some(disk) = self.cache.disk_cache() {
                    disk.put(&self.disk_key(remote, a, lin, e), &bytes);
                }
                Ok(buf)
            }
        }
    }

    /// Checks one stored payload against its index entry and decodes it.
    fn decode_payload(
        &self,
        a: usize,
        c: [usize; 3],
        e: &Entry,
        stored: &[u8],
    ) -> Result<ChunkBuf, StoreError> {
        let raw_len = self.grid.voxels(c) * self.arrays[a].dtype.size();
        if stored.len() as u64 != e.len {
            return Err(self.chunk_corrupt(a, c, "payload has the wrong length"));
        }
        if xxh3_64(stored) != e.checksum {
            return Err(StoreError::Checksum {
                case: self.meta.id.clone(),
                array: self.arrays[a].id.to_string(),
                chunk: c,
            });
        }
        let (mut out, start) = ChunkBuf::writer(raw_len);
        match e.kind {
            KIND_RAW if stored.len() == raw_len => {
                std::io::Write::write_all(&mut out, stored).map_err(|r| {
                    self.chunk_corrupt(a, c, &format!("cannot copy raw payload: {r}"))
                })?;
            }
            KIND_ZSTD => {
                let n = decompress_into(stored, &mut out).map_err(|r| {
                    self.chunk_corrupt(a, c, &format!("zstd payload does not decode: {r}"))
                })?;
                if n != raw_len {
                    return Err(self.chunk_corrupt(
                        a,
                        c,
                        &format!("decodes to {n} bytes, expected {raw_len}"),
                    ));
                }
            }
            _ => return Err(self.chunk_corrupt(a, c, "unexpected chunk kind")),
        }
        let buf = ChunkBuf::from_writer(out, start);
        if buf.bytes().len() != raw_len {
            return Err(self.chunk_corrupt(a, c, "decoded chunk has the wrong size"));
        }
        Ok(buf)
    }

    /// Locations `[z, y, x]` stored for `class` (empty if the class has none).
    pub fn class_locations(&self, class: u16) -> &[[u32; 3]] {
        let Ok(i) = self.classes.binary_search_by_key(&class, |s| s.class) else {
            return &[];
        };
        let s = &self.classes[i];
        self.body
            .held(s.offset as u64, (s.count * 12) as u64)
            .and_then(|b| bytemuck::try_cast_slice(b).ok())
            .unwrap_or(&[])
    }

    /// Classes that have stored locations, ascending.
    pub fn classes_with_locations(&self) -> Vec<u16> {
        self.classes
            .iter()
            .filter(|s| s.count > 0)
            .map(|s| s.class)
            .collect()
    }

    /// Checks every stored chunk: checksum and full decode (bypasses the cache).
    /// A remote case is fetched from object storage for this (in batches of at most
    /// [`MAX_RANGE_BYTES`] of payloads; the disk cache is bypassed too).
    pub fn verify(&self) -> Result<(), StoreError> {
        for (a, info) in self.arrays.iter().enumerate() {
            let Body::Remote(remote) = &self.body else {
                for (lin, e) in info.entries.iter().enumerate() {
                    if e.kind != KIND_CONSTANT {
                        self.decode(a, self.grid.coords(lin), e)?;
                    }
                }
                continue;
            };
            let mut batch: Vec<(u32, Entry)> = Vec::new();
            let mut batch_bytes = 0u64;
            let stored = info
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.kind != KIND_CONSTANT);
            let mut pending = stored.peekable();
            while let Some((lin, e)) = pending.next() {
                batch.push((lin as u32, *e));
                batch_bytes += e.len;
                if batch_bytes >= MAX_RANGE_BYTES || pending.peek().is_none() {
                    for (lin, e, bytes) in
                        self.fetch_payloads(remote, a, std::mem::take(&mut batch))?
                    {
                        self.decode_payload(a, self.grid.coords(lin as usize), &e, &bytes)?;
                    }
                    batch_bytes = 0;
                }
            }
        }
        Ok(())
    }

    /// Raw and stored bytes, per array and in total.
    pub fn stats(&self) -> StoreStats {
        let mut arrays = Vec::with_capacity(self.arrays.len());
        for info in &self.arrays {
            let es = info.dtype.size() as u64;
            let mut s = ArrayStats {
                array: info.id,
                dtype: info.dtype,
                chunks: info.entries.len(),
                constant_chunks: 0,
                raw_chunks: 0,
                raw_bytes: 0,
                stored_bytes: 0,
            };
            for (lin, e) in info.entries.iter().enumerate() {
                s.raw_bytes += self.grid.voxels(self.grid.coords(lin)) as u64 * es;
                s.stored_bytes += e.len;
                match e.kind {
                    KIND_CONSTANT => s.constant_chunks += 1,
                    KIND_RAW => s.raw_chunks += 1,
                    _ => {}
                }
            }
            arrays.push(s);
        }
        StoreStats {
            raw_bytes: arrays.iter().map(|s| s.raw_bytes).sum(),
            stored_bytes: arrays.iter().map(|s| s.stored_bytes).sum(),
            file_bytes: self.body.len(),
            arrays,
        }
    }
}

/// Sink of [`CaseReader::read_box`]: typed copies and fills into the output box.
struct CopySink<'o, T> {
    out: &'o mut [T],
    pad: T,
    misfit: bool,
}

impl<T: Element> Sink for CopySink<'_, T> {
    #[inline]
    fn pad(&mut self, dst: usize, len: usize) {
        match self.out.get_mut(dst..dst + len) {
            Some(o) => fill_run(o, self.pad),
            None => self.misfit = true,
        }
    }

    #[inline]
    fn block(&mut self, b: &Block<'_>) {
        for part in b.parts {
            let xn = part.xn;
            match &part.src {
                ChunkSrc::Const(bits) => {
                    let Some(v) = value_from_bits::<T>(*bits) else {
                        self.misfit = true;
                        return;
                    };
                    for zi in 0..b.nz {
                        for yi in 0..b.ny {
                            let d = b.dst0 + zi * b.dst_plane + yi * b.dst_row + part.bx;
                            match self.out.get_mut(d..d + xn) {
                                Some(o) => fill_run(o, v),
                                None => self.misfit = true,
                            }
                        }
                    }
                }
                ChunkSrc::Buf(buf) => {
                    let (off0, plane, row) = (part.off0, part.plane, part.row);
                    let Some(src) = cast_elems::<T>(buf.bytes()) else {
                        self.misfit = true;
                        return;
                    };
                    for zi in 0..b.nz {
                        for yi in 0..b.ny {
                            let d = b.dst0 + zi * b.dst_plane + yi * b.dst_row + part.bx;
                            let s = off0 + zi * plane + yi * row;
                            match (self.out.get_mut(d..d + xn), src.get(s..s + xn)) {
                                (Some(o), Some(s)) => copy_run(o, s),
                                _ => self.misfit = true,
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Sink of [`CaseReader::visit_box`]: one [`BoxRun`] per row part.
struct VisitSink<'f, 'g> {
    f: &'f mut (dyn FnMut(BoxRun<'_>) + 'g),
    es: usize,
    /// Constant parts are handed out as slices of this buffer, refilled when the value changes.
    fill: Vec<u8>,
    fill_bits: Option<u64>,
    misfit: bool,
}

impl Sink for VisitSink<'_, '_> {
    fn pad(&mut self, dst: usize, len: usize) {
        (self.f)(BoxRun {
            dst,
            len,
            src: None,
        });
    }

    fn block(&mut self, b: &Block<'_>) {
        let es = self.es;
        for zi in 0..b.nz {
            for yi in 0..b.ny {
                let row = b.dst0 + zi * b.dst_plane + yi * b.dst_row;
                for part in b.parts {
                    let xn = part.xn;
                    let src = match &part.src {
                        &ChunkSrc::Const(bits) => {
                            if self.fill_bits != Some(bits) || self.fill.len() < xn * es {
                                let pattern = bits.to_le_bytes();
                                self.fill.clear();
                                for _ in 0..xn {
                                    self.fill.extend_from_slice(&pattern[..es]);
                                }
                                self.fill_bits = Some(bits);
                            }
                            self.fill.get(..xn * es)
                        }
                        ChunkSrc::Buf(buf) => {
                            let s = (part.off0 + zi * part.plane + yi * part.row) * es;
                            buf.bytes().get(s..s + xn * es)
                        }
                    };
                    if src.is_none() {
                        self.misfit = true;
                        continue;
                    }
                    (self.f)(BoxRun {
                        dst: row + part.bx,
                        len: xn,
                        src,
                    });
                }
            }
        }
    }
}

/// Maps a preamble problem to the error to report.
fn preamble_error(path: &Path, e: Option<PreambleError>) -> Option<StoreError> {
    match e? {
        PreambleError::Corrupt(r) => Some(StoreError::corrupt(path, r)),
        PreambleError::Version(v) => Some(StoreError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: v,
            supported: FORMAT_VERSION,
        }),
    }
}

/// Checks the preamble's sections: index, class locations and header lie in this order inside a
/// file of `file_len` bytes, the header within its limit, the class table 8-byte aligned.
fn check_sections(pre: &Preamble, file_len: u64) -> Result<(), String> {
    // Sections: index, class locations, header, in this order, inside the file.
    let mut prev_end = PREAMBLE_LEN as u64;
    for (name, s) in [
        ("index", &pre.index),
        ("class-location table", &pre.classes),
        ("header", &pre.header),
    ] {
        let end = s.end().filter(|&e| e <= file_len).ok_or_else(|| {
            format!(
                "{name} section [{}, +{}) runs past the end of the file ({file_len} bytes)",
                s.offset, s.len
            )
        })?;
        if s.offset < prev_end {
            return Err(format!(
                "{name} section starts at {}, overlapping the preceding part (ends at {prev_end})",
                s.offset
            ));
        }
        prev_end = end;
    }
    if pre.header.len > MAX_HEADER_LEN {
        return Err(format!(
            "header is {} bytes, more than the {MAX_HEADER_LEN}-byte limit",
            pre.header.len
        ));
    }
    if !pre.classes.offset.is_multiple_of(8) {
        return Err(format!(
            "class-location table offset {} is not 8-byte aligned",
            pre.classes.offset
        ));
    }
    Ok(())
}

/// Checks the header's metadata against the format's limits and the preamble (array count,
/// chunk shape, index size); returns the chunk grid.
fn check_layout(meta: &CaseMeta, pre: &Preamble) -> Result<Grid, String> {
    validate_case_id(&meta.id).map_err(|e| format!("header: {e}"))?;
    let shape = meta.shape;
    let voxels = shape
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .filter(|&v| v > 0 && v <= MAX_CASE_VOXELS);
    if voxels.is_none() {
        return Err(format!(
            "header: shape {shape:?} is empty or has more than {MAX_CASE_VOXELS} voxels"
        ));
    }
    if meta.channels.is_empty() {
        return Err("header: the case has no image channel".to_owned());
    }
    if !matches!(meta.label_dtype, DType::U8 | DType::U16) {
        return Err(format!(
            "header: label_dtype {} is not u8 or u16",
            meta.label_dtype
        ));
    }
    let n_arrays = meta.channels.len() + 1;
    if pre.n_arrays as usize != n_arrays {
        return Err(format!(
            "preamble lists {} arrays, the header has {} channel(s) + label",
            pre.n_arrays,
            meta.channels.len()
        ));
    }
    let chunk = pre.chunk_shape.map(|c| c as usize);
    let chunk_ok = chunk
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .is_some_and(|v| v > 0 && v <= MAX_CHUNK_VOXELS);
    if !chunk_ok {
        return Err(format!(
            "chunk shape {chunk:?} is empty or has more than {MAX_CHUNK_VOXELS} voxels"
        ));
    }
    let grid = Grid::new(shape, chunk);
    let n_chunks = grid.n_chunks();
    if n_chunks > u32::MAX as usize {
        return Err(format!("chunk grid has {n_chunks} chunks, too many"));
    }
    let expected_index = (n_chunks as u64)
        .checked_mul(n_arrays as u64)
        .and_then(|n| n.checked_mul(ENTRY_LEN as u64));
    if expected_index != Some(pre.index.len) {
        return Err(format!(
            "index is {} bytes, {n_arrays} arrays of {n_chunks} chunks of {ENTRY_LEN} bytes need {}",
            pre.index.len,
            expected_index.map_or("more than 2^64".to_owned(), |n| n.to_string())
        ));
    }

    Ok(grid)
}

/// Decodes the index (`index_bytes`, at file offset `index_offset`): the entries of every chunk
/// of every array (the channels, then the label), each checked against its chunk.
fn read_index(
    index_bytes: &[u8],
    meta: &CaseMeta,
    grid: &Grid,
    index_offset: u64,
) -> Result<Vec<ArrayInfo>, String> {
    let n_arrays = meta.channels.len() + 1;
    let n_chunks = grid.n_chunks();
    let mut arrays = Vec::with_capacity(n_arrays);
    let mut entry_bytes = index_bytes.chunks_exact(ENTRY_LEN);
    for a in 0..n_arrays {
        let (id, dtype) = if a < meta.channels.len() {
            (ArrayId::Image(a), meta.channels[a].dtype)
        } else {
            (ArrayId::Label, meta.label_dtype)
        };
        let es = dtype.size();
        let mut entries = Vec::with_capacity(n_chunks);
        for lin in 0..n_chunks {
            let c = grid.coords(lin);
            let where_ = || format!("{id} chunk {c:?}");
            let b = entry_bytes
                .next()
                .ok_or_else(|| format!("index ends before {}", where_()))?;
            let e = Entry::decode(b).map_err(|r| format!("{}: {r}", where_()))?;
            let raw_len = grid.voxels(c) * es;
            check_entry(&e, raw_len, es, index_offset).map_err(|r| format!("{}: {r}", where_()))?;
            entries.push(e);
        }
        arrays.push(ArrayInfo { id, dtype, entries });
    }

    Ok(arrays)
}

/// The bytes of a section, checked against its checksum; `held` are the file's bytes from
/// offset `base` on.
fn section_bytes<'m>(
    held: &'m [u8],
    base: u64,
    s: &Section,
    name: &str,
) -> Result<&'m [u8], String> {
    let bytes = s
        .offset
        .checked_sub(base)
        .and_then(|o| usize::try_from(o).ok())
        .zip(usize::try_from(s.len).ok())
        .and_then(|(o, l)| held.get(o..o.checked_add(l)?))
        .ok_or_else(|| format!("{name} section lies outside the file"))?;
    let sum = xxh3_64(bytes);
    if sum != s.checksum {
        return Err(format!(
            "{name} checksum mismatch (stored {:#018x}, computed {sum:#018x})",
            s.checksum
        ));
    }
    Ok(bytes)
}

/// Checks one index entry against the chunk's raw size and the payload region.
fn check_entry(e: &Entry, raw_len: usize, es: usize, payload_end: u64) -> Result<(), String> {
    let in_payload = |e: &Entry| {
        e.offset_or_value >= PREAMBLE_LEN as u64
            && e.offset_or_value
                .checked_add(e.len)
                .is_some_and(|end| end <= payload_end)
    };
    match e.kind {
        KIND_ZSTD => {
            let bound = zstd::zstd_safe::compress_bound(raw_len) as u64;
            if e.len == 0 || e.len > bound {
                return Err(format!(
                    "zstd payload of {} bytes for {raw_len} raw bytes (bound {bound})",
                    e.len
                ));
            }
            if !in_payload(e) {
                return Err(format!(
                    "payload [{}, +{}) lies outside the payload region [{PREAMBLE_LEN}, {payload_end})",
                    e.offset_or_value, e.len
                ));
            }
        }
        KIND_RAW => {
            if e.len != raw_len as u64 {
                return Err(format!(
                    "raw payload of {} bytes, the chunk has {raw_len}",
                    e.len
                ));
            }
            if !in_payload(e) {
                return Err(format!(
                    "payload [{}, +{}) lies outside the payload region [{PREAMBLE_LEN}, {payload_end})",
                    e.offset_or_value, e.len
                ));
            }
        }
        KIND_CONSTANT => {
            if e.len != 0 || e.checksum != 0 {
                return Err("constant chunk with a payload length or checksum".to_owned());
            }
            if es < 8 && e.offset_or_value >> (8 * es) != 0 {
                return Err(format!(
                    "constant value {:#x} does not fit a {es}-byte element",
                    e.offset_or_value
                ));
            }
        }
        k => return Err(format!("unknown chunk kind {k}")),
    }
    Ok(())
}

/// Parses and checks the class-location table; `base` is its offset in the file.
fn parse_classes(b: &[u8], base: usize, shape: [usize; 3]) -> Result<Vec<ClassSpan>, String> {
    let word = |at: usize| -> Result<u32, String> {
        let s = b
            .get(at..at + 4)
            .ok_or_else(|| format!("ends at byte {} while reading byte {at}", b.len()))?;
        let mut w = [0u8; 4];
        w.copy_from_slice(s);
        Ok(u32::from_le_bytes(w))
    };
    let n = word(0)? as usize;
    if word(4)? != 0 {
        return Err("reserved word is not zero".to_owned());
    }
    if n > MAX_CLASSES || 8 + 8 * n > b.len() {
        return Err(format!(
            "{n} classes do not fit {} bytes (at most {MAX_CLASSES})",
            b.len()
        ));
    }
    let mut spans = Vec::with_capacity(n);
    let mut at = 8 + 8 * n;
    let mut prev: Option<u32> = None;
    for i in 0..n {
        let class = word(8 + 8 * i)?;
        let count = word(12 + 8 * i)? as usize;
        let class16 = u16::try_from(class).map_err(|_| format!("class {class} exceeds 65535"))?;
        if prev.is_some_and(|p| p >= class) {
            return Err(format!("classes not strictly ascending at class {class}"));
        }
        prev = Some(class);
        let bytes = count
            .checked_mul(12)
            .filter(|&n| at + n <= b.len())
            .ok_or_else(|| {
                format!("class {class}: {count} locations run past the end of the table")
            })?;
        let locs: &[[u32; 3]] = b
            .get(at..at + bytes)
            .and_then(|s| bytemuck::try_cast_slice(s).ok())
            .ok_or_else(|| format!("class {class}: locations are misaligned"))?;
        if let Some(p) = locs
            .iter()
            .find(|p| (0..3).any(|ax| p[ax] as usize >= shape[ax]))
        {
            return Err(format!(
                "class {class}: location {p:?} lies outside shape {shape:?}"
            ));
        }
        spans.push(ClassSpan {
            class: class16,
            offset: base + at,
            count,
        });
        at += bytes;
    }
    if at != b.len() {
        return Err(format!(
            "table is {} bytes, its entries account for {at}",
            b.len()
        ));
    }
    Ok(spans)
}

/// Elements per block of the short-run copy and fill (a compile-time size, so each block is
/// a few inline vector moves instead of a call into `memcpy`/`memset`).
const RUN_BLOCK: usize = 16;
/// Runs longer than this go to `memcpy`/`memset`, whose call cost is then negligible.
const RUN_CALL_MIN: usize = 256;

/// Copies `src` into `dst` (same length). Box reads are made of many short rows (one chunk
/// wide), for which this beats a library call per row.
#[inline(always)]
fn copy_run<T: Copy>(dst: &mut [T], src: &[T]) {
    let n = dst.len();
    if !(RUN_BLOCK..=RUN_CALL_MIN).contains(&n) || src.len() != n {
        dst.copy_from_slice(src);
        return;
    }
    let mut i = 0;
    while i + RUN_BLOCK <= n {
        dst[i..i + RUN_BLOCK].copy_from_slice(&src[i..i + RUN_BLOCK]);
        i += RUN_BLOCK;
    }
    if i < n {
        // Overlapping last block.
        dst[n - RUN_BLOCK..].copy_from_slice(&src[n - RUN_BLOCK..]);
    }
}

/// Fills `dst` with `v`; see [`copy_run`].
#[inline(always)]
fn fill_run<T: Copy>(dst: &mut [T], v: T) {
    let n = dst.len();
    if !(RUN_BLOCK..=RUN_CALL_MIN).contains(&n) {
        dst.fill(v);
        return;
    }
    let block = [v; RUN_BLOCK];
    let mut i = 0;
    while i + RUN_BLOCK <= n {
        dst[i..i + RUN_BLOCK].copy_from_slice(&block);
        i += RUN_BLOCK;
    }
    if i < n {
        dst[n - RUN_BLOCK..].copy_from_slice(&block);
    }
}

/// Voxel count of a box, `None` on overflow.
fn box_voxels(size: [usize; 3]) -> Option<usize> {
    size[0].checked_mul(size[1])?.checked_mul(size[2])
}

/// Decompresses one zstd frame into `dst` with this thread's context; returns bytes written.
fn decompress_into(src: &[u8], dst: &mut std::io::Cursor<Vec<u8>>) -> Result<usize, String> {
    DCTX.with(|cell| {
        let mut fresh;
        let mut slot = cell.try_borrow_mut();
        let d = match slot.as_deref_mut() {
            Ok(Some(d)) => d,
            Ok(none) => {
                *none = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                none.as_mut()
                    .ok_or_else(|| "no decompression context".to_owned())?
            }
            Err(_) => {
                fresh = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
                &mut fresh
            }
        };
        d.decompress_to_buffer(src, dst).map_err(|e| e.to_string())
    })
}

/// Whether `T` is one of the primitive number types (every bit pattern valid, no padding).
fn is_primitive<T: 'static>() -> bool {
    let t = TypeId::of::<T>();
    [
        TypeId::of::<u8>(),
        TypeId::of::<i8>(),
        TypeId::of::<u16>(),
        TypeId::of::<i16>(),
        TypeId::of::<u32>(),
        TypeId::of::<i32>(),
        TypeId::of::<f32>(),
        TypeId::of::<f64>(),
        TypeId::of::<u64>(),
        TypeId::of::<i64>(),
    ]
    .contains(&t)
}

/// Views little-endian element bytes as `&[T]` when `T` is a primitive number type and the
/// bytes are aligned and a whole number of elements.
#[inline]
fn cast_elems<T: 'static>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if size == 0
        || !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        || !is_primitive::<T>()
    {
        return None;
    }
    // SAFETY: `T` is one of the primitive number types listed in `is_primitive` (checked by
    // `TypeId`), which have no padding and for which every bit pattern is a valid value; the
    // pointer is aligned for `T` and the length is a whole number of elements, all checked
    // above. The result borrows `bytes`, so it cannot outlive them.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// The element with these little-endian bits (zero-extended to 64).
fn value_from_bits<T: Copy + 'static>(bits: u64) -> Option<T> {
    let word = [bits];
    let bytes: &[u8] = bytemuck::cast_slice(&word);
    cast_elems::<T>(bytes.get(..std::mem::size_of::<T>())?)?
        .first()
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cast_elems_rejects_non_primitive_and_misaligned() {
        #[derive(Copy, Clone)]
        #[allow(dead_code)]
        struct Wrapper(u16);
        let words = [0x0102_0304_0506_0708u64];
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        assert_eq!(
            cast_elems::<u16>(&bytes[..4]),
            Some(&[0x0708u16, 0x0506][..])
        );
        assert!(cast_elems::<u16>(&bytes[1..3]).is_none());
        assert!(cast_elems::<u16>(&bytes[..3]).is_none());
        assert!(cast_elems::<Wrapper>(&bytes[..2]).is_none());
        assert_eq!(value_from_bits::<i16>(0xffff), Some(-1i16));
        assert_eq!(
            value_from_bits::<f32>(1.5f32.to_bits() as u64),
            Some(1.5f32)
        );
    }

    #[test]
    fn box_voxels_overflow() {
        assert_eq!(box_voxels([2, 3, 4]), Some(24));
        assert_eq!(box_voxels([usize::MAX, 2, 1]), None);
    }
}

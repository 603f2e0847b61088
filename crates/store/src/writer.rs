//! The case-file writer.

use std::collections::BTreeMap;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use patchflow_volume::DType;
use xxhash_rust::xxh3::xxh3_64;

use crate::atomic::TempFile;
use crate::error::StoreError;
use crate::format::{
    ENTRY_LEN, Entry, FORMAT_VERSION, Grid, HeaderDoc, KIND_CONSTANT, KIND_RAW, KIND_ZSTD,
    MAX_CASE_VOXELS, MAX_CHUNK_VOXELS, MAX_CLASSES, MAX_HEADER_LEN, PREAMBLE_LEN, Preamble,
    Section, align8,
};
use crate::location::StoreLocation;
use crate::manifest::validate_case_id;
use crate::meta::{ArrayId, CaseData, WriteOptions, WriteReport};

/// Cases smaller than this are compressed on the calling thread only.
const PARALLEL_MIN_BYTES: usize = 8 << 20;
/// Raw bytes compressed per batch before the batch's payloads are written out.
const BATCH_BYTES: usize = 32 << 20;
/// Most compression threads used for one case.
const MAX_THREADS: usize = 8;

/// One array to store: its bytes and element type.
struct ArraySrc<'a> {
    id: ArrayId,
    bytes: &'a [u8],
    dtype: DType,
}

/// A chunk ready to be written.
enum Encoded {
    /// Every voxel has this value (bits, zero-extended).
    Constant(u64),
    /// A payload of the given kind.
    Stored { kind: u8, bytes: Vec<u8> },
}

/// Atomically writes one case file (temporary file in the same directory, fsync, rename,
/// fsync of the directory). On any error the temporary file is removed and an existing file
/// under `path` is left as it was.
///
/// A path `s3://bucket/key` writes the object there instead: the file is made in memory and
/// uploaded whole (in parts when large), so the object appears complete or not at all.
pub fn write_case(
    path: &Path,
    data: &CaseData<'_>,
    opts: &WriteOptions,
) -> Result<WriteReport, StoreError> {
    let started = Instant::now();
    let report = match StoreLocation::from_path(path)? {
        StoreLocation::Local(_) => {
            let tmp = TempFile::create(path)?;
            let out = Out::new(
                BufWriter::with_capacity(1 << 20, tmp.file()),
                tmp.tmp_path(),
            );
            let (report, out) = encode_case(data, opts, out)?;
            drop(out);
            tmp.commit()?;
            report
        }
        StoreLocation::S3(location) => {
            let out = Out::new(std::io::Cursor::new(Vec::new()), path);
            let (report, out) = encode_case(data, opts, out)?;
            let bytes = out.w.into_inner();
            crate::remote::put_object(&location, bytes)?;
            report
        }
    };
    let secs = started.elapsed().as_secs_f64();
    tracing::debug!(
        case = %data.meta.id,
        path = %path.display(),
        raw_bytes = report.raw_bytes,
        stored_bytes = report.stored_bytes,
        mb_per_s = report.raw_bytes as f64 / 1e6 / secs.max(1e-9),
        "case written"
    );
    Ok(report)
}

/// Writes the case file's bytes to `out`.
fn encode_case<'p, W: Write + Seek>(
    data: &CaseData<'_>,
    opts: &WriteOptions,
    mut out: Out<'p, W>,
) -> Result<(WriteReport, Out<'p, W>), StoreError> {
    let meta = data.meta;
    let (grid, arrays) = validate(data, opts)?;
    let header = encode_header(meta, opts)?;
    let classes = encode_classes(&meta.id, meta.shape, data.class_locations)?;
    let raw_bytes: u64 = arrays.iter().map(|a| a.bytes.len() as u64).sum();

    out.write(&[0u8; PREAMBLE_LEN])?;

    // Chunks of every array, in array order then C order of the chunk grid.
    let n_chunks = grid.n_chunks();
    let jobs: Vec<(usize, usize)> = (0..arrays.len())
        .flat_map(|a| (0..n_chunks).map(move |c| (a, c)))
        .collect();
    let threads = if raw_bytes as usize >= PARALLEL_MIN_BYTES {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS)
    } else {
        1
    };
    let mut entries: Vec<Entry> = Vec::with_capacity(jobs.len());
    let mut next = 0;
    while next < jobs.len() {
        let mut end = next;
        let mut batch_bytes = 0usize;
        while end < jobs.len() && (end == next || batch_bytes < BATCH_BYTES) {
            let (a, c) = jobs[end];
            batch_bytes += grid.voxels(grid.coords(c)) * arrays[a].dtype.size();
            end += 1;
        }
        let encoded = encode_batch(&jobs[next..end], &arrays, &grid, opts.zstd_level, threads)
            .map_err(|reason| StoreError::input(&meta.id, reason))?;
        for enc in encoded {
            let entry = match enc {
                Encoded::Constant(bits) => Entry {
                    kind: KIND_CONSTANT,
                    offset_or_value: bits,
                    len: 0,
                    checksum: 0,
                },
                Encoded::Stored { kind, bytes } => {
                    let offset = out.pos;
                    out.write(&bytes)?;
                    Entry {
                        kind,
                        offset_or_value: offset,
                        len: bytes.len() as u64,
                        checksum: xxh3_64(&bytes),
                    }
                }
            };
            entries.push(entry);
        }
        next = end;
    }

    let mut index = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in &entries {
        index.extend_from_slice(&e.encode());
    }
    out.pad8()?;
    let index_sec = out.section(&index)?;
    out.pad8()?;
    let classes_sec = out.section(&classes)?;
    let header_sec = out.section(&header)?;
    let file_len = out.pos;

    let preamble = Preamble {
        file_len,
        chunk_shape: grid.chunk.map(|c| c as u32),
        n_arrays: arrays.len() as u32,
        index: index_sec,
        classes: classes_sec,
        header: header_sec,
    };
    out.finish(&preamble.encode())?;
    Ok((
        WriteReport {
            raw_bytes,
            stored_bytes: file_len,
        },
        out,
    ))
}

/// Checks the case against its metadata and the options; returns the grid and arrays.
fn validate<'a>(
    data: &CaseData<'a>,
    opts: &WriteOptions,
) -> Result<(Grid, Vec<ArraySrc<'a>>), StoreError> {
    let meta = data.meta;
    let id = meta.id.as_str();
    validate_case_id(id)?;
    let (grid, voxels) = checked_grid(id, meta.shape, opts.chunk_shape)?;
    let levels = zstd::compression_level_range();
    if !levels.contains(&opts.zstd_level) {
        return Err(StoreError::input(
            id,
            format!(
                "zstd level {} outside zstd's range {}..={}",
                opts.zstd_level,
                levels.start(),
                levels.end()
            ),
        ));
    }
    let mut arrays = channel_arrays(data, voxels)?;
    arrays.push(label_array(data, voxels)?);
    Ok((grid, arrays))
}

/// The chunk grid of a case of `shape` cut in chunks of `chunk`, and its voxel count, when
/// both are within the format's limits.
fn checked_grid(
    id: &str,
    shape: [usize; 3],
    chunk: [usize; 3],
) -> Result<(Grid, usize), StoreError> {
    if shape.contains(&0) {
        return Err(StoreError::input(
            id,
            format!("shape {shape:?} has an empty axis"),
        ));
    }
    let voxels = shape
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .filter(|&v| v <= MAX_CASE_VOXELS)
        .ok_or_else(|| {
            StoreError::input(
                id,
                format!("shape {shape:?} has more than {MAX_CASE_VOXELS} voxels"),
            )
        })?;
    if chunk.contains(&0) {
        return Err(StoreError::input(
            id,
            format!("chunk shape {chunk:?} has a zero axis"),
        ));
    }
    let chunk_voxels = chunk
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .filter(|&v| v <= MAX_CHUNK_VOXELS)
        .ok_or_else(|| {
            StoreError::input(
                id,
                format!("chunk shape {chunk:?} has more than {MAX_CHUNK_VOXELS} voxels"),
            )
        })?;
    debug_assert!(chunk_voxels > 0);
    let grid = Grid::new(shape, chunk);
    if grid.n_chunks() > u32::MAX as usize {
        return Err(StoreError::input(
            id,
            format!(
                "chunk shape {chunk:?} cuts shape {shape:?} into {} chunks, more than {}",
                grid.n_chunks(),
                u32::MAX
            ),
        ));
    }
    Ok((grid, voxels))
}

/// The image channels of the case, each checked against its metadata and the case's `voxels`.
fn channel_arrays<'a>(data: &CaseData<'a>, voxels: usize) -> Result<Vec<ArraySrc<'a>>, StoreError> {
    let meta = data.meta;
    let (id, shape) = (meta.id.as_str(), meta.shape);
    if meta.channels.is_empty() {
        return Err(StoreError::input(id, "the case has no image channel"));
    }
    if data.channels.len() != meta.channels.len() {
        return Err(StoreError::input(
            id,
            format!(
                "{} channel arrays given, metadata lists {}",
                data.channels.len(),
                meta.channels.len()
            ),
        ));
    }
    let mut arrays = Vec::with_capacity(meta.channels.len() + 1);
    for (c, (v, m)) in data.channels.iter().zip(&meta.channels).enumerate() {
        if v.dtype() != m.dtype {
            return Err(StoreError::input(
                id,
                format!(
                    "channel {c} ({}) holds {} voxels but metadata says {}",
                    m.name,
                    v.dtype(),
                    m.dtype
                ),
            ));
        }
        if v.len() != voxels {
            return Err(StoreError::input(
                id,
                format!(
                    "channel {c} ({}) has {} voxels, shape {shape:?} needs {voxels}",
                    m.name,
                    v.len()
                ),
            ));
        }
        arrays.push(ArraySrc {
            id: ArrayId::Image(c),
            bytes: v.as_bytes(),
            dtype: m.dtype,
        });
    }
    Ok(arrays)
}

/// The label of the case, checked against its metadata (dtype, outside-mask label) and the
/// case's `voxels`.
fn label_array<'a>(data: &CaseData<'a>, voxels: usize) -> Result<ArraySrc<'a>, StoreError> {
    let meta = data.meta;
    let (id, shape) = (meta.id.as_str(), meta.shape);
    if !matches!(meta.label_dtype, DType::U8 | DType::U16) {
        return Err(StoreError::input(
            id,
            format!("label_dtype {} is not u8 or u16", meta.label_dtype),
        ));
    }
    if data.label.dtype() != meta.label_dtype {
        return Err(StoreError::input(
            id,
            format!(
                "label holds {} voxels but metadata says {}",
                data.label.dtype(),
                meta.label_dtype
            ),
        ));
    }
    if data.label.len() != voxels {
        return Err(StoreError::input(
            id,
            format!(
                "label has {} voxels, shape {shape:?} needs {voxels}",
                data.label.len()
            ),
        ));
    }
    meta.check_outside_mask_label(|c| data.class_locations.contains_key(&c))
        .map_err(|reason| StoreError::input(id, reason))?;
    Ok(ArraySrc {
        id: ArrayId::Label,
        bytes: data.label.as_bytes(),
        dtype: meta.label_dtype,
    })
}

/// The JSON header; fails when the metadata would not read back equal (non-finite numbers).
fn encode_header(meta: &crate::meta::CaseMeta, opts: &WriteOptions) -> Result<Vec<u8>, StoreError> {
    let doc = HeaderDoc {
        meta: meta.clone(),
        zstd_level: opts.zstd_level,
        writer: format!(
            "patchflow-store {} (format {FORMAT_VERSION})",
            env!("CARGO_PKG_VERSION")
        ),
    };
    let json = serde_json::to_vec(&doc)
        .map_err(|e| StoreError::input(&meta.id, format!("metadata does not serialise: {e}")))?;
    if json.len() as u64 > MAX_HEADER_LEN {
        return Err(StoreError::input(
            &meta.id,
            format!(
                "metadata is {} bytes of JSON, more than {MAX_HEADER_LEN}",
                json.len()
            ),
        ));
    }
    let back: Result<HeaderDoc, _> = serde_json::from_slice(&json);
    match back {
        Ok(b) if b.meta == *meta => Ok(json),
        _ => Err(StoreError::input(
            &meta.id,
            "metadata does not read back equal from JSON (non-finite spacing, affine or normalisation?)",
        )),
    }
}

/// The class-location table (see FORMAT.md).
fn encode_classes(
    id: &str,
    shape: [usize; 3],
    locations: &BTreeMap<u16, Vec<[u32; 3]>>,
) -> Result<Vec<u8>, StoreError> {
    if locations.len() > MAX_CLASSES {
        return Err(StoreError::input(id, "too many classes in class locations"));
    }
    let total: usize = locations.values().map(Vec::len).sum();
    let mut b = Vec::with_capacity(8 + 8 * locations.len() + 12 * total);
    b.extend_from_slice(&(locations.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for (&class, locs) in locations {
        let count = u32::try_from(locs.len()).map_err(|_| {
            StoreError::input(
                id,
                format!(
                    "class {class} has {} locations, more than {}",
                    locs.len(),
                    u32::MAX
                ),
            )
        })?;
        b.extend_from_slice(&u32::from(class).to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
    }
    for (&class, locs) in locations {
        for p in locs {
            if (0..3).any(|a| p[a] as usize >= shape[a]) {
                return Err(StoreError::input(
                    id,
                    format!("class {class} location {p:?} lies outside shape {shape:?}"),
                ));
            }
            for v in p {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(b)
}

/// Encodes a batch of chunks, on `threads` threads when > 1; results in batch order.
fn encode_batch(
    jobs: &[(usize, usize)],
    arrays: &[ArraySrc<'_>],
    grid: &Grid,
    level: i32,
    threads: usize,
) -> Result<Vec<Encoded>, String> {
    let threads = threads.min(jobs.len()).max(1);
    if threads == 1 {
        let mut enc = ChunkEncoder::new(level)?;
        return jobs
            .iter()
            .map(|&(a, c)| enc.encode(&arrays[a], grid, c))
            .collect();
    }
    let next = AtomicUsize::new(0);
    let work = || -> Result<Vec<(usize, Encoded)>, String> {
        let mut enc = ChunkEncoder::new(level)?;
        let mut done = Vec::new();
        loop {
            let j = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(a, c)) = jobs.get(j) else {
                return Ok(done);
            };
            done.push((j, enc.encode(&arrays[a], grid, c)?));
        }
    };
    let parts: Vec<Result<Vec<(usize, Encoded)>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut parts = vec![work()];
        for h in handles {
            parts.push(
                h.join()
                    .unwrap_or_else(|_| Err("a compression thread panicked".to_owned())),
            );
        }
        parts
    });
    let mut slots: Vec<Option<Encoded>> = (0..jobs.len()).map(|_| None).collect();
    for part in parts {
        for (j, e) in part? {
            slots[j] = Some(e);
        }
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(j, e)| e.ok_or_else(|| format!("chunk job {j} was not encoded")))
        .collect()
}

/// Per-thread compression state.
struct ChunkEncoder {
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl ChunkEncoder {
    fn new(level: i32) -> Result<ChunkEncoder, String> {
        let compressor = zstd::bulk::Compressor::new(level)
            .map_err(|e| format!("cannot create a zstd compressor at level {level}: {e}"))?;
        Ok(ChunkEncoder {
            compressor,
            scratch: Vec::new(),
        })
    }

    /// Gathers chunk `lin` of `array` and encodes it (constant, zstd or raw).
    fn encode(&mut self, array: &ArraySrc<'_>, grid: &Grid, lin: usize) -> Result<Encoded, String> {
        let es = array.dtype.size();
        let c = grid.coords(lin);
        let e = grid.extent(c);
        let [_, s1, s2] = grid.shape;
        let row = e[2] * es;
        let x0 = c[2] * grid.chunk[2];
        self.scratch.clear();
        for z in 0..e[0] {
            let zz = c[0] * grid.chunk[0] + z;
            for y in 0..e[1] {
                let yy = c[1] * grid.chunk[1] + y;
                let off = ((zz * s1 + yy) * s2 + x0) * es;
                self.scratch.extend_from_slice(&array.bytes[off..off + row]);
            }
        }
        let n = self.scratch.len();
        // Constant with period `es` iff the buffer equals itself shifted by one element.
        if self.scratch[es..] == self.scratch[..n - es] {
            let mut word = [0u8; 8];
            word[..es].copy_from_slice(&self.scratch[..es]);
            return Ok(Encoded::Constant(u64::from_le_bytes(word)));
        }
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(n));
        self.compressor
            .compress_to_buffer(&self.scratch, &mut out)
            .map_err(|err| format!("zstd failed on {} chunk {c:?}: {err}", array.id))?;
        if out.len() >= n {
            return Ok(Encoded::Stored {
                kind: KIND_RAW,
                bytes: self.scratch.clone(),
            });
        }
        Ok(Encoded::Stored {
            kind: KIND_ZSTD,
            bytes: out,
        })
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: make the writer fail once it has written this many bytes.
    pub(crate) static FAIL_AFTER_BYTES: std::cell::Cell<Option<u64>> =
        const { std::cell::Cell::new(None) };
}

/// Output that tracks its position: a buffered file, or memory.
struct Out<'f, W> {
    w: W,
    pos: u64,
    path: &'f Path,
}

impl<'f, W: Write + Seek> Out<'f, W> {
    fn new(w: W, path: &'f Path) -> Self {
        Out { w, pos: 0, path }
    }

    fn err(&self, e: std::io::Error) -> StoreError {
        StoreError::io(self.path, e)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        #[cfg(test)]
        if let Some(limit) = FAIL_AFTER_BYTES.with(|f| f.get())
            && self.pos + bytes.len() as u64 > limit
        {
            return Err(self.err(std::io::Error::other("injected write failure")));
        }
        self.w.write_all(bytes).map_err(|e| self.err(e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad8(&mut self) -> Result<(), StoreError> {
        let pad = (align8(self.pos) - self.pos) as usize;
        self.write(&[0u8; 8][..pad])
    }

    fn section(&mut self, bytes: &[u8]) -> Result<Section, StoreError> {
        let offset = self.pos;
        self.write(bytes)?;
        Ok(Section {
            offset,
            len: bytes.len() as u64,
            checksum: xxh3_64(bytes),
        })
    }

    /// Flushes and writes the preamble over the placeholder at the start.
    fn finish(&mut self, preamble: &[u8]) -> Result<(), StoreError> {
        self.w.flush().map_err(|e| self.err(e))?;
        self.w
            .seek(SeekFrom::Start(0))
            .map_err(|e| StoreError::io(self.path, e))?;
        self.w
            .write_all(preamble)
            .map_err(|e| StoreError::io(self.path, e))?;
        self.w.flush().map_err(|e| StoreError::io(self.path, e))
    }
}

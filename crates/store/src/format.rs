//! Byte layout of a case file (see FORMAT.md): preamble, chunk index entries, class-location
//! table, header document and chunk grid geometry. Parsing here only checks the bytes; the
//! reader checks how the parts fit together.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::meta::CaseMeta;

/// First eight bytes of every case file.
pub(crate) const MAGIC: [u8; 8] = *b"\x89PFC\r\n\x1a\n";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the fixed preamble.
pub(crate) const PREAMBLE_LEN: usize = 128;
/// Length of one chunk index entry.
pub(crate) const ENTRY_LEN: usize = 32;
/// Largest accepted header document.
pub(crate) const MAX_HEADER_LEN: u64 = 16 << 20;
/// Largest accepted number of voxels per chunk.
pub(crate) const MAX_CHUNK_VOXELS: usize = 1 << 24;
/// Largest accepted number of voxels per case.
pub(crate) const MAX_CASE_VOXELS: usize = 1 << 36;
/// Largest accepted number of classes in the class-location table.
pub(crate) const MAX_CLASSES: usize = 1 << 16;

/// Chunk kind: zstd frame of the chunk's in-volume voxels.
pub(crate) const KIND_ZSTD: u8 = 1;
/// Chunk kind: the in-volume voxels, uncompressed.
pub(crate) const KIND_RAW: u8 = 2;
/// Chunk kind: every voxel has the value stored in the entry; no payload.
pub(crate) const KIND_CONSTANT: u8 = 3;

/// One section of the file: offset, length and xxh3-64 of its bytes.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Section {
    pub offset: u64,
    pub len: u64,
    pub checksum: u64,
}

impl Section {
    pub(crate) fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// The fixed 128-byte preamble.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Preamble {
    pub file_len: u64,
    pub chunk_shape: [u32; 3],
    pub n_arrays: u32,
    pub index: Section,
    pub classes: Section,
    pub header: Section,
}

/// Why a preamble was rejected.
pub(crate) enum PreambleError {
    Corrupt(String),
    Version(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

fn section_at(b: &[u8], at: usize) -> Section {
    Section {
        offset: u64_at(b, at),
        len: u64_at(b, at + 8),
        checksum: u64_at(b, at + 16),
    }
}

impl Preamble {
    /// Serialises the preamble, checksum included.
    pub(crate) fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        // 12..16: flags, zero.
        b[16..24].copy_from_slice(&self.file_len.to_le_bytes());
        for (i, c) in self.chunk_shape.iter().enumerate() {
            b[24 + 4 * i..28 + 4 * i].copy_from_slice(&c.to_le_bytes());
        }
        b[36..40].copy_from_slice(&self.n_arrays.to_le_bytes());
        for (at, s) in [(40, &self.index), (64, &self.classes), (88, &self.header)] {
            b[at..at + 8].copy_from_slice(&s.offset.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&s.len.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&s.checksum.to_le_bytes());
        }
        // 112..120: reserved, zero.
        let sum = xxh3_64(&b[..120]);
        b[120..128].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses and checks the preamble at the start of `file` (magic, version, checksum, flags).
    pub(crate) fn decode(file: &[u8]) -> Result<Preamble, PreambleError> {
        if file.len() < 12 {
            return Err(PreambleError::Corrupt(format!(
                "file is {} bytes, too short for a case file (preamble is {PREAMBLE_LEN} bytes)",
                file.len()
            )));
        }
        if file[..8] != MAGIC {
            return Err(PreambleError::Corrupt(
                "bad magic: not a patchflow case file".to_owned(),
            ));
        }
        let version = u32_at(file, 8);
        if version != FORMAT_VERSION {
            return Err(PreambleError::Version(version));
        }
        let Some(b) = file.get(..PREAMBLE_LEN) else {
            return Err(PreambleError::Corrupt(format!(
                "file is {} bytes, shorter than the {PREAMBLE_LEN}-byte preamble",
                file.len()
            )));
        };
        let stored = u64_at(b, 120);
        let actual = xxh3_64(&b[..120]);
        if stored != actual {
            return Err(PreambleError::Corrupt(format!(
                "preamble checksum mismatch (stored {stored:#018x}, computed {actual:#018x})"
            )));
        }
        let flags = u32_at(b, 12);
        if flags != 0 {
            return Err(PreambleError::Corrupt(format!(
                "preamble flags {flags:#x} are not zero (unknown feature)"
            )));
        }
        let reserved = u64_at(b, 112);
        if reserved != 0 {
            return Err(PreambleError::Corrupt(format!(
                "preamble reserved field is {reserved:#x}, expected 0"
            )));
        }
        Ok(Preamble {
            file_len: u64_at(b, 16),
            chunk_shape: [u32_at(b, 24), u32_at(b, 28), u32_at(b, 32)],
            n_arrays: u32_at(b, 36),
            index: section_at(b, 40),
            classes: section_at(b, 64),
            header: section_at(b, 88),
        })
    }
}

/// One chunk index entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub kind: u8,
    /// Payload offset (zstd, raw) or the element value's bits, zero-extended (constant).
    pub offset_or_value: u64,
    /// Payload length (0 for constant chunks).
    pub len: u64,
    /// xxh3-64 of the payload (0 for constant chunks).
    pub checksum: u64,
}

impl Entry {
    pub(crate) fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0] = self.kind;
        b[8..16].copy_from_slice(&self.offset_or_value.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Parses one entry; checks only that the reserved bytes are zero.
    pub(crate) fn decode(b: &[u8]) -> Result<Entry, String> {
        if b.len() != ENTRY_LEN {
            return Err(format!(
                "index entry is {} bytes, expected {ENTRY_LEN}",
                b.len()
            ));
        }
        if b[1..8].iter().any(|&x| x != 0) {
            return Err("reserved bytes 1..8 of index entry are not zero".to_owned());
        }
        Ok(Entry {
            kind: b[0],
            offset_or_value: u64_at(b, 8),
            len: u64_at(b, 16),
            checksum: u64_at(b, 24),
        })
    }
}

/// The JSON header document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct HeaderDoc {
    /// The case metadata.
    pub meta: CaseMeta,
    /// zstd level the chunks were written with (informative).
    pub zstd_level: i32,
    /// Writer name and version (informative).
    pub writer: String,
}

/// Chunk grid of one case.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Grid {
    pub shape: [usize; 3],
    pub chunk: [usize; 3],
    pub counts: [usize; 3],
}

impl Grid {
    /// Grid for `shape` cut into `chunk`-shaped pieces; both must be non-zero on every axis.
    pub(crate) fn new(shape: [usize; 3], chunk: [usize; 3]) -> Grid {
        let counts = [0, 1, 2].map(|a| shape[a].div_ceil(chunk[a].max(1)));
        Grid {
            shape,
            chunk,
            counts,
        }
    }

    /// Number of chunks.
    pub(crate) fn n_chunks(&self) -> usize {
        self.counts[0] * self.counts[1] * self.counts[2]
    }

    /// Linear (C-order) index of chunk `c`.
    #[inline]
    pub(crate) fn linear(&self, c: [usize; 3]) -> usize {
        (c[0] * self.counts[1] + c[1]) * self.counts[2] + c[2]
    }

    /// Chunk coordinates of linear index `i`.
    pub(crate) fn coords(&self, i: usize) -> [usize; 3] {
        let x = i % self.counts[2];
        let r = i / self.counts[2];
        [r / self.counts[1], r % self.counts[1], x]
    }

    /// In-volume extent of chunk `c`.
    #[inline]
    pub(crate) fn extent(&self, c: [usize; 3]) -> [usize; 3] {
        [0, 1, 2].map(|a| self.chunk[a].min(self.shape[a] - c[a] * self.chunk[a]))
    }

    /// Number of in-volume voxels of chunk `c`.
    pub(crate) fn voxels(&self, c: [usize; 3]) -> usize {
        let e = self.extent(c);
        e[0] * e[1] * e[2]
    }
}

/// Rounds `n` up to a multiple of 8.
pub(crate) fn align8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

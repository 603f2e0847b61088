//! Batches delivered through shared memory: the daemon names a slot file and where the buffers
//! lie in it; the client maps the file read-only and hands out views of the mapping, so a batch
//! reaches the caller without a copy. When the caller drops the last view of a batch, its slot
//! is released to the daemon, which then may write the next batch into it.
//!
//! A caller that keeps many batches alive would keep every slot, and the daemon, which writes
//! only into released slots, would stop. So once all but two of the stream's slots are lent,
//! further batches are copied out of their slot, which is released at once: holding batches
//! then costs a copy each, never a stalled stream.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use memmap2::Mmap;
use patchflow_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::batch::{Batch, finish};

/// One slot file as mapped here.
struct SlotMap {
    path: String,
    map: Mmap,
}

/// The slot mappings of one Sample stream.
pub(crate) struct SharedSlots {
    /// Mappings by slot number. The daemon retires slots (a reconfiguration drops the batches
    /// in preparation) and numbers new ones afresh, and a mapping keeps its file's memory even
    /// after the daemon removed the file: so the mappings are bounded by the stream's slots
    /// (see [`SharedSlots::map`]).
    maps: HashMap<u32, Arc<SlotMap>>,
    /// Slots of the stream (the daemon has at most this many at once).
    slots: usize,
    max_batch_bytes: u64,
    /// Slots whose batch the client still holds.
    lent: Arc<AtomicUsize>,
    /// Lent slots from which on batches are copied out instead.
    copy_from: usize,
}

/// Sends the release of a slot when the last view of its batch is dropped. The release goes to
/// the connection task, which forwards it on the stream; a guard never holds the request stream
/// itself, so batches kept after their stream ended do not keep it open.
struct Release {
    slot: u32,
    releases: mpsc::UnboundedSender<u32>,
    /// Counted while the batch is held by views; `None` for a batch that was copied.
    lent: Option<Arc<AtomicUsize>>,
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(lent) = &self.lent {
            lent.fetch_sub(1, Ordering::Relaxed);
        }
        // A stream that ended frees its slots anyway.
        let _ = self.releases.send(self.slot);
    }
}

/// A view of part of a slot, owned by a [`Bytes`].
struct View {
    map: Arc<SlotMap>,
    start: usize,
    end: usize,
    _release: Arc<Release>,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        &self.map.map[self.start..self.end]
    }
}

impl SharedSlots {
    /// Mappings for a stream of `slots` slots, refusing batches above `max_batch_bytes`.
    pub(crate) fn new(slots: u32, max_batch_bytes: u64) -> SharedSlots {
        SharedSlots {
            maps: HashMap::new(),
            slots: (slots as usize).max(1),
            max_batch_bytes,
            lent: Arc::new(AtomicUsize::new(0)),
            copy_from: (slots as usize).saturating_sub(2).max(1),
        }
    }

    /// The batch a shared-memory message describes. `Err(reason)` when the message is
    /// inconsistent; `Err` also when the slot file cannot be opened or mapped (see
    /// [`MapError`]).
    pub(crate) fn batch(
        &mut self,
        msg: pb::SampleResponse,
        releases: &mpsc::UnboundedSender<u32>,
    ) -> Result<(u64, Batch), MapError> {
        let protocol = MapError::Protocol;
        let index = msg.index;
        let (Some(shared), Some(header)) = (msg.shared, msg.header) else {
            return Err(protocol(format!(
                "batch {index}: a shared-memory message without its slot or header"
            )));
        };
        if msg.parts != 1 || msg.part != 0 || !msg.image.is_empty() || !msg.label.is_empty() {
            return Err(protocol(format!(
                "batch {index}: a shared-memory batch must be one message without voxel bytes"
            )));
        }
        let total = header.image_bytes.saturating_add(header.label_bytes);
        if total > self.max_batch_bytes {
            return Err(protocol(format!(
                "batch {index} announces {total} bytes, above the client's limit of {}",
                self.max_batch_bytes
            )));
        }
        let label_end = shared.label_offset.checked_add(header.label_bytes);
        if header.image_bytes > shared.label_offset
            || label_end.is_none_or(|end| end > shared.file_bytes)
        {
            return Err(protocol(format!(
                "batch {index}: buffers of {} + {} bytes at label offset {} do not fit a slot of {} bytes",
                header.image_bytes, header.label_bytes, shared.label_offset, shared.file_bytes
            )));
        }
        // A release guard exists from here on, so a batch refused below still frees its slot.
        let copy = self.lent.load(Ordering::Relaxed) >= self.copy_from;
        let release = Arc::new(Release {
            slot: shared.slot,
            releases: releases.clone(),
            lent: (!copy).then(|| {
                self.lent.fetch_add(1, Ordering::Relaxed);
                Arc::clone(&self.lent)
            }),
        });
        let map = self.map(&shared)?;
        let view = |start: u64, len: u64| {
            // Within the file: checked above against file_bytes, which the mapping covers.
            let start = start as usize;
            let end = start + len as usize;
            if copy {
                return Bytes::copy_from_slice(&map.map[start..end]);
            }
            Bytes::from_owner(View {
                map: Arc::clone(&map),
                start,
                end,
                _release: Arc::clone(&release),
            })
        };
        let image = view(0, header.image_bytes);
        let label = view(shared.label_offset, header.label_bytes);
        // A copied batch gives its slot back now.
        drop(release);
        let batch = finish(index, header, image, label).map_err(protocol)?;
        Ok((msg.config_id, batch))
    }

    /// The mapping of a slot, (re)mapped when the slot is new, moved or grew.
    fn map(&mut self, shared: &pb::SharedBatch) -> Result<Arc<SlotMap>, MapError> {
        if let Some(m) = self.maps.get(&shared.slot)
            && m.path == shared.path
            && m.map.len() as u64 >= shared.file_bytes
        {
            return Ok(Arc::clone(m));
        }
        let fail = |reason: String| MapError::Unusable {
            path: shared.path.clone(),
            reason,
        };
        let path = Path::new(&shared.path);
        if !path.is_absolute() {
            return Err(MapError::Protocol(format!(
                "slot path {:?} is not absolute",
                shared.path
            )));
        }
        let file = File::open(path).map_err(|e| fail(e.to_string()))?;
        let metadata = file.metadata().map_err(|e| fail(e.to_string()))?;
        if !metadata.is_file() {
            return Err(fail("not a regular file".into()));
        }
        let len = metadata.len();
        if len < shared.file_bytes {
            return Err(fail(format!(
                "the file has {len} bytes, the daemon announced {}",
                shared.file_bytes
            )));
        }
        // SAFETY: the file is a slot of the daemon this stream talks to, checked above to be a
        // regular file at least as long as the announced length, which bounds every view. The
        // daemon never shrinks a slot file while its stream lives (it grows it, or removes it,
        // which leaves this mapping valid), and it writes a slot only after the client released
        // it, that is after every view of the batch in it was dropped; so the bytes a view
        // shows do not change while it exists.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| fail(e.to_string()))?;
        let entry = Arc::new(SlotMap {
            path: shared.path.clone(),
            map,
        });
        // A slot number not seen before while as many are mapped as the stream has slots: some
        // mapped slot is gone. Mappings no batch view holds are dropped (a slot still in use is
        // mapped again on its next batch); those views hold stay until their batches go.
        if !self.maps.contains_key(&shared.slot) && self.maps.len() >= self.slots {
            self.maps.retain(|_, m| Arc::strong_count(m) > 1);
        }
        self.maps.insert(shared.slot, Arc::clone(&entry));
        Ok(entry)
    }
}

/// Why a shared-memory batch could not be handed out.
pub(crate) enum MapError {
    /// The message breaks the protocol.
    Protocol(String),
    /// The slot file cannot be used from this process (another host, user or container).
    Unusable {
        /// The slot file.
        path: String,
        /// What opening or mapping it reported.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(path: &Path, file_bytes: u64, label_offset: u64) -> pb::SampleResponse {
        pb::SampleResponse {
            index: 3,
            config_id: 2,
            part: 0,
            parts: 1,
            header: Some(pb::BatchHeader {
                patch_size: vec![1, 2, 2],
                batch_size: 1,
                channels: 1,
                dtype: pb::ImageDtype::F32 as i32,
                label_dtype: pb::LabelDtype::U8 as i32,
                ignore_label: 255,
                image_bytes: 16,
                label_bytes: 4,
                label_encoding: pb::LabelEncoding::Raw as i32,
                items: vec![pb::ItemInfo {
                    case_id: "c".into(),
                    origin: vec![0, 0, 0],
                    ..pb::ItemInfo::default()
                }],
            }),
            image: Bytes::new(),
            label: Bytes::new(),
            shared: Some(pb::SharedBatch {
                slot: 7,
                path: path.to_string_lossy().into_owned(),
                file_bytes,
                label_offset,
            }),
        }
    }

    #[test]
    fn views_show_the_slot_and_release_it_when_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("slot");
        let mut bytes: Vec<u8> = (0..16u8).collect();
        bytes.extend([9, 8, 7, 6]);
        bytes.resize(64, 0);
        std::fs::write(&path, &bytes).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut slots = SharedSlots::new(8, 1 << 20);
        let Ok((config_id, batch)) = slots.batch(message(&path, 64, 16), &tx) else {
            panic!("batch refused");
        };
        assert_eq!(config_id, 2);
        assert_eq!(&batch.image[..], &bytes[..16]);
        assert_eq!(&batch.label[..], &[9, 8, 7, 6]);
        let label = batch.label.clone();
        drop(batch);
        assert!(rx.try_recv().is_err(), "a view is still alive");
        drop(label);
        assert_eq!(rx.try_recv().unwrap(), 7);
    }

    #[test]
    fn mappings_of_retired_slots_are_dropped() {
        // The daemon retires slots and numbers new ones afresh (here: 40 slot numbers, each a
        // new file, on a stream of 4 slots). The mappings stay bounded by the stream's slots,
        // except those a held batch needs.
        let tmp = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut slots = SharedSlots::new(4, 1 << 20);
        let mut held = Vec::new();
        for n in 0..40u32 {
            let path = tmp.path().join(format!("slot-{n}"));
            std::fs::write(&path, vec![n as u8; 64]).unwrap();
            let mut msg = message(&path, 64, 16);
            if let Some(shared) = msg.shared.as_mut() {
                shared.slot = n;
            }
            let Ok((_, batch)) = slots.batch(msg, &tx) else {
                panic!("batch refused");
            };
            assert_eq!(batch.image[0], n as u8);
            if n == 3 {
                held.push(batch);
            }
            assert!(
                slots.maps.len() <= 4,
                "{} mappings after slot {n}",
                slots.maps.len()
            );
        }
        // The held batch's mapping survived every eviction, and its bytes are intact.
        assert!(slots.maps.contains_key(&3));
        assert_eq!(held[0].image[0], 3);
    }

    #[test]
    fn a_caller_holding_many_batches_gets_copies_and_the_slots_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("slot");
        let bytes: Vec<u8> = (0..64u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Four slots: two may be held as views, then batches are copies.
        let mut slots = SharedSlots::new(4, 1 << 20);
        let mut held = Vec::new();
        for _ in 0..5 {
            let Ok((_, batch)) = slots.batch(message(&path, 64, 16), &tx) else {
                panic!("batch refused");
            };
            assert_eq!(&batch.image[..], &bytes[..16]);
            held.push(batch);
        }
        let released: Vec<u32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            released.len(),
            3,
            "the copied batches' slots come back at once"
        );
        drop(held);
        let later: Vec<u32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(later.len(), 2, "the views' slots come back when dropped");
    }

    #[test]
    fn inconsistent_or_unusable_slots_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("slot");
        std::fs::write(&path, [0u8; 32]).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut slots = SharedSlots::new(8, 1 << 20);
        // Buffers beyond the announced length.
        assert!(matches!(
            slots.batch(message(&path, 18, 16), &tx),
            Err(MapError::Protocol(r)) if r.contains("do not fit")
        ));
        // Image overlapping the label.
        assert!(matches!(
            slots.batch(message(&path, 32, 8), &tx),
            Err(MapError::Protocol(_))
        ));
        // A file shorter than announced: mapping it could fault past its end.
        assert!(matches!(
            slots.batch(message(&path, 64, 16), &tx),
            Err(MapError::Unusable { reason, .. }) if reason.contains("32 bytes")
        ));
        // A file this process cannot open.
        assert!(matches!(
            slots.batch(message(&tmp.path().join("gone"), 32, 16), &tx),
            Err(MapError::Unusable { .. })
        ));
        // Above the client's batch limit.
        let mut small = SharedSlots::new(8, 10);
        assert!(matches!(
            small.batch(message(&path, 32, 16), &tx),
            Err(MapError::Protocol(r)) if r.contains("limit")
        ));
    }
}

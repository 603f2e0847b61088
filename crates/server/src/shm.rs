//! Shared-memory slots: batches for clients on the daemon's host without a byte on the socket.
//!
//! Over loopback TCP a 128³ batch crosses four copies (protobuf encode, the kernel on each side,
//! the client's reassembly) and the daemon spent several times more CPU on them than on cutting
//! the patches. A stream that asks for shared memory gets a small table of slots instead: each
//! slot is a file in the daemon's shared-memory folder (`/dev/shm` by default), mapped by the
//! daemon, into which the sampler writes a batch directly. The message names the slot; the client
//! maps the file read-only and hands out views of it. A slot is written again only after the
//! client released it, so the bytes a client holds never change under it.
//!
//! Which slot a batch goes into is decided when a worker starts the batch, not when the stream
//! submits it: the stream only reserves a place (a [`SlotClaim`]), and the worker takes the
//! slot released most recently (last in, first out), creating one only when none is free. A
//! slot written a moment ago is still in the CPU's caches; writing the slots in rotation costs
//! about twice as much per batch on some machines (benches/RESULTS.md, "Sampling service"). With
//! one worker and a client that keeps up, a stream so writes into two slots in turn, whatever
//! its number of places.
//!
//! Files are created readable by the daemon's user only, named `patchflow-<pid>-<n>`, grown (never
//! shrunk) when a larger batch needs them, and removed when their slot is dropped: when the stream
//! ends, or with a job that was cancelled. Files left by a daemon that was killed are removed by
//! the next daemon that starts on the same folder.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;
use tokio::sync::Notify;

use crate::ServerError;

/// File name prefix of every slot file.
const PREFIX: &str = "patchflow-";

/// Number of the next slot file of this process (several servers of one process may share a
/// folder).
static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// The daemon's shared-memory folder.
pub(crate) struct SharedDir {
    dir: PathBuf,
    /// `patchflow-<pid>-`.
    prefix: String,
    /// Most bytes all slot files together may hold.
    budget: u64,
    /// Bytes the slot files hold now.
    used: AtomicU64,
}

impl SharedDir {
    /// Checks that `dir` takes files and removes the slot files of daemons no longer running.
    /// The slot files together may hold at most `budget` bytes.
    pub(crate) fn open(dir: &Path, budget: u64) -> Result<Arc<SharedDir>, ServerError> {
        let config = |reason: String| ServerError::Config {
            field: "shared_memory",
            reason: format!("{}: {reason}", dir.display()),
        };
        let dir = std::fs::canonicalize(dir).map_err(|e| config(e.to_string()))?;
        if !dir.is_dir() {
            return Err(config("not a folder".into()));
        }
        let shared = SharedDir {
            prefix: format!("{PREFIX}{}-", std::process::id()),
            dir,
            budget,
            used: AtomicU64::new(0),
        };
        // A first file proves the folder takes ours.
        let (path, _file) = shared
            .create()
            .map_err(|e| config(format!("cannot create a file there: {e}")))?;
        let _ = std::fs::remove_file(path);
        shared.remove_stale();
        Ok(Arc::new(shared))
    }

    /// The folder.
    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    /// A new empty file readable by this user only. A name taken already (left by a killed
    /// daemon that had this process id) is skipped.
    fn create(&self) -> io::Result<(PathBuf, File)> {
        loop {
            let n = NEXT_FILE.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(format!("{}{n}", self.prefix));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => return Ok((path, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes `bytes` more of the budget, or says why not.
    fn charge(&self, bytes: u64) -> io::Result<()> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|&total| total <= self.budget)
            })
            .map(drop)
            .map_err(|used| {
                io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "the shared-memory budget of {} MiB is in use ({} MiB held, {} more asked)",
                        self.budget >> 20,
                        used >> 20,
                        bytes.div_ceil(1 << 20)
                    ),
                )
            })
    }

    /// Gives `bytes` of the budget back.
    fn refund(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Removes slot files whose daemon is gone (`patchflow-<pid>-*` with no process `<pid>`).
    fn remove_stale(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut removed = 0usize;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, n)| n.parse::<u64>().ok().and(pid.parse::<u32>().ok()))
            else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                folder = %self.dir.display(),
                removed,
                "removed shared-memory files left by daemons no longer running"
            );
        }
    }
}

/// One slot: a file and its mapping, created on first use.
pub(crate) struct Slot {
    id: u32,
    dir: Arc<SharedDir>,
    mapped: Option<Mapped>,
    /// Slots of the stream alive (counted down on drop).
    alive: Arc<AtomicUsize>,
    /// Told when the slot is dropped (a cancelled job's slot goes on a worker thread, and the
    /// stream may be waiting for a slot).
    dropped: Arc<Notify>,
    /// The stream's place this slot fills while it holds a batch (none while it is free).
    place: Option<Place>,
}

/// One of a stream's places: held by a claim, then by the slot bound to it, until the batch
/// in it was released or dropped. Gives the place back (and wakes the stream) when dropped.
struct Place {
    in_use: Arc<AtomicUsize>,
    freed: Arc<Notify>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.in_use.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_one();
    }
}

struct Mapped {
    path: PathBuf,
    file: File,
    map: MmapMut,
}

/// Where a batch was written in its slot.
pub(crate) struct SlotRef {
    /// Slot number.
    pub id: u32,
    /// The slot's file.
    pub path: String,
    /// Its length.
    pub file_bytes: u64,
}

impl Slot {
    /// Slot number.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// The image and label buffers of a batch at the start of the slot, the file created or
    /// grown as needed (runs on a sampling worker: this is file I/O).
    pub(crate) fn buffers(
        &mut self,
        image: usize,
        label: usize,
    ) -> io::Result<(&mut [u8], &mut [u8])> {
        let need = image
            .checked_add(label)
            .ok_or_else(|| io::Error::other("batch too large"))?;
        let have = self.mapped.as_ref().map_or(0, |m| m.map.len());
        if have < need || self.mapped.is_none() {
            let (path, file) = match self.mapped.take() {
                Some(old) => {
                    drop(old.map);
                    (old.path, old.file)
                }
                None => self.dir.create()?,
            };
            // A file is never empty (a zero-length mapping fails), and grows by at least an
            // eighth so that growing patch sizes do not remap at every step.
            let len = need.max(have + have / 8).max(4096);
            // The growth is charged to the daemon's budget. Any failure resets the slot: its
            // file goes, and every byte it held comes back.
            let growth = (len - have) as u64;
            let grown = self.dir.charge(growth).and_then(|()| {
                reserve(&file, len)
                    // SAFETY: the file was created by this daemon with mode 0600 under a name
                    // no other daemon uses, and only this slot writes it; its length was set
                    // and its blocks reserved just above (so writing cannot fault on a full
                    // tmpfs), and it only ever grows, so the mapping never reaches past the end
                    // of the file. Clients map it read-only and only read a slot while the
                    // daemon does not write it (the protocol's release rule).
                    .and_then(|()| unsafe { MmapMut::map_mut(&file) })
                    .inspect_err(|_| self.dir.refund(growth))
            });
            match grown {
                Ok(map) => self.mapped = Some(Mapped { path, file, map }),
                Err(e) => {
                    self.dir.refund(have as u64);
                    remove(&path);
                    return Err(e);
                }
            }
        }
        let Some(mapped) = self.mapped.as_mut() else {
            return Err(io::Error::other("slot not mapped"));
        };
        let (image_buf, rest) = mapped.map.split_at_mut(image);
        Ok((image_buf, &mut rest[..label]))
    }

    /// Where the last batch was written (after [`Slot::buffers`]).
    pub(crate) fn reference(&self) -> Option<SlotRef> {
        self.mapped.as_ref().map(|m| SlotRef {
            id: self.id,
            path: m.path.to_string_lossy().into_owned(),
            file_bytes: m.map.len() as u64,
        })
    }
}

/// Sets `file`'s length to `len` and reserves its blocks, so that writes through a mapping
/// cannot fail (on tmpfs a write to a block that cannot be allocated is a SIGBUS).
fn reserve(file: &File, len: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    file.set_len(len as u64)?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::other("slot too large"))?;
    // SAFETY: a plain system call on a descriptor this function borrows for its duration.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        code => Err(io::Error::from_raw_os_error(code)),
    }
}

/// Removes a slot file, logging (not failing) when it cannot.
fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a shared-memory file");
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(mapped) = self.mapped.take() {
            self.dir.refund(mapped.map.len() as u64);
            drop(mapped.map);
            drop(mapped.file);
            remove(&mapped.path);
        }
        self.alive.fetch_sub(1, Ordering::AcqRel);
        self.dropped.notify_one();
    }
}

/// What the slots of one stream share between the stream and its jobs.
struct Shelf {
    dir: Arc<SharedDir>,
    /// Free slots, the one released last at the end (taken first).
    free: Mutex<Vec<Slot>>,
    /// Set when the stream closes its table: jobs bind no slot any more.
    closed: std::sync::atomic::AtomicBool,
    next_id: AtomicU32,
    /// Slots in existence (free, lent or being written).
    alive: Arc<AtomicUsize>,
    /// Places held by claims and by slots holding a batch.
    in_use: Arc<AtomicUsize>,
    /// Told when a slot is dropped or a place given back.
    dropped: Arc<Notify>,
}

impl Shelf {
    fn free_slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        // A panic while the list was held cannot leave it inconsistent (push and pop only).
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `slot` back on the free list (its place goes back to the stream).
    fn put_back(&self, mut slot: Slot) {
        let place = slot.place.take();
        if !self.closed.load(Ordering::Acquire) {
            self.free_slots().push(slot);
        }
        drop(place);
    }
}

/// A place reserved for one batch of a stream, bound to a concrete slot by the worker that
/// writes the batch ([`SlotClaim::bind`]). Dropped unbound (a cancelled job), it gives the place
/// back.
pub(crate) struct SlotClaim {
    shelf: Arc<Shelf>,
    place: Place,
}

impl SlotClaim {
    /// The slot for the batch: the free slot released last, else a new one (there is always
    /// room for it: every slot not free holds a place, and this claim holds one without a
    /// slot). Fails when the stream closed its table meanwhile.
    pub(crate) fn bind(self) -> io::Result<Slot> {
        let SlotClaim { shelf, place } = self;
        // Under the free list's lock, so that closing the table and binding do not cross: a
        // slot is either counted before the table waits for the slots alive, or not made.
        let mut free = shelf.free_slots();
        if shelf.closed.load(Ordering::Acquire) {
            return Err(io::Error::other("the stream's slots are closed"));
        }
        let mut slot = free.pop().unwrap_or_else(|| {
            shelf.alive.fetch_add(1, Ordering::AcqRel);
            Slot {
                id: shelf.next_id.fetch_add(1, Ordering::Relaxed),
                dir: Arc::clone(&shelf.dir),
                mapped: None,
                alive: Arc::clone(&shelf.alive),
                dropped: Arc::clone(&shelf.dropped),
                place: None,
            }
        });
        drop(free);
        slot.place = Some(place);
        Ok(slot)
    }
}

/// The slots of one stream: at most `max` places, each a batch being written, ready, queued
/// or lent to the client; the slots themselves, free or holding a batch; and the lent ones by
/// number.
pub(crate) struct SlotTable {
    shelf: Arc<Shelf>,
    max: usize,
    lent: HashMap<u32, Slot>,
}

impl SlotTable {
    /// A table of at most `max` slots in `dir`.
    pub(crate) fn new(dir: Arc<SharedDir>, max: usize) -> SlotTable {
        SlotTable {
            shelf: Arc::new(Shelf {
                dir,
                free: Mutex::new(Vec::new()),
                closed: std::sync::atomic::AtomicBool::new(false),
                next_id: AtomicU32::new(0),
                alive: Arc::new(AtomicUsize::new(0)),
                in_use: Arc::new(AtomicUsize::new(0)),
                dropped: Arc::new(Notify::new()),
            }),
            max,
            lent: HashMap::new(),
        }
    }

    /// Completes when a slot of the table was dropped or a place given back since the last
    /// call (a place may be free).
    pub(crate) fn slot_dropped(&self) -> Arc<Notify> {
        Arc::clone(&self.shelf.dropped)
    }

    /// A place for the next batch, while the table has one.
    pub(crate) fn take(&mut self) -> Option<SlotClaim> {
        let shelf = &self.shelf;
        shelf
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(SlotClaim {
            shelf: Arc::clone(shelf),
            place: Place {
                in_use: Arc::clone(&shelf.in_use),
                freed: Arc::clone(&shelf.dropped),
            },
        })
    }

    /// Records that `slot` went to the client with a batch.
    pub(crate) fn lend(&mut self, slot: Slot) {
        self.lent.insert(slot.id(), slot);
    }

    /// Takes back a slot whose batch was never sent (dropped by a reconfiguration).
    pub(crate) fn reuse(&mut self, slot: Slot) {
        self.shelf.put_back(slot);
    }

    /// The client no longer reads slot `id`.
    pub(crate) fn release(&mut self, id: u32) {
        if let Some(slot) = self.lent.remove(&id) {
            self.shelf.put_back(slot);
        }
    }

    /// Drops every slot of the table (removing their files) and waits until the slots still in
    /// jobs are dropped too.
    pub(crate) async fn close(self) {
        let SlotTable { shelf, lent, .. } = self;
        let free = {
            let mut free = shelf.free_slots();
            shelf.closed.store(true, Ordering::Release);
            std::mem::take(&mut *free)
        };
        drop(free);
        drop(lent);
        while shelf.alive.load(Ordering::Acquire) > 0 {
            shelf.dropped.notified().await;
        }
    }

    /// Slots in existence (free, lent or being written).
    #[cfg(test)]
    fn alive(&self) -> usize {
        self.shelf.alive.load(Ordering::Relaxed)
    }

    /// Places in use.
    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.shelf.in_use.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn slots_are_bounded_reused_grown_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SharedDir::open(tmp.path(), 1 << 30).unwrap();
        let mut table = SlotTable::new(Arc::clone(&dir), 2);
        let ca = table.take().unwrap();
        let cb = table.take().unwrap();
        assert!(table.take().is_none(), "two places at most");
        assert_eq!(table.alive(), 0, "claims are not slots yet");
        let mut a = ca.bind().unwrap();
        let mut b = cb.bind().unwrap();
        assert_eq!(table.alive(), 2);
        assert_eq!(files(tmp.path()), 0, "files come with the first batch");
        {
            let (img, lab) = a.buffers(10, 3).unwrap();
            img.fill(1);
            lab.fill(2);
        }
        b.buffers(100_000, 1).unwrap();
        assert_eq!(files(tmp.path()), 2);
        let ra = a.reference().unwrap();
        assert_eq!(ra.file_bytes, 4096);
        let on_disk = std::fs::read(&ra.path).unwrap();
        assert_eq!(&on_disk[..13], &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&ra.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Lent slots come back only when released.
        let (ida, idb) = (a.id(), b.id());
        table.lend(a);
        table.lend(b);
        assert!(table.take().is_none());
        table.release(99);
        assert!(table.take().is_none(), "an unknown slot changes nothing");
        table.release(ida);
        let mut again = table.take().unwrap().bind().unwrap();
        assert_eq!(again.id(), ida);
        // Growing keeps the file and its name.
        again.buffers(8192, 8192).unwrap();
        let grown = again.reference().unwrap();
        assert_eq!(grown.path, ra.path);
        assert_eq!(grown.file_bytes, 16384);
        assert_eq!(files(tmp.path()), 2);

        // A slot dropped (a cancelled job) frees its place and its file.
        drop(again);
        assert_eq!(table.alive(), 1);
        assert_eq!(table.in_use(), 1, "the lent slot b keeps its place");
        assert_eq!(files(tmp.path()), 1);
        let fresh = table.take().unwrap().bind().unwrap();
        assert_ne!(fresh.id(), ida);
        assert_ne!(fresh.id(), idb);
        drop(fresh);
        drop(table);
        assert_eq!(files(tmp.path()), 0, "the stream's end removes every file");
    }

    #[test]
    fn a_batch_goes_into_the_slot_released_last() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SharedDir::open(tmp.path(), 1 << 30).unwrap();
        let mut table = SlotTable::new(Arc::clone(&dir), 8);
        // Four batches in flight: four slots.
        let slots: Vec<Slot> = (0..4)
            .map(|_| {
                let mut s = table.take().unwrap().bind().unwrap();
                s.buffers(100, 10).unwrap();
                s
            })
            .collect();
        let ids: Vec<u32> = slots.iter().map(Slot::id).collect();
        for s in slots {
            table.lend(s);
        }
        // Claims reserved while every slot is lent bind the slot released last before they
        // were bound, not the one free when they were reserved.
        table.release(ids[0]);
        let early = table.take().unwrap();
        let later = table.take().unwrap();
        table.release(ids[2]);
        table.release(ids[1]);
        let first = early.bind().unwrap();
        assert_eq!(
            first.id(),
            ids[1],
            "the slot released last is written first"
        );
        let second = later.bind().unwrap();
        assert_eq!(second.id(), ids[2]);
        // One place left in use by the lent slot 3 and two by the bound ones; the free slot 0
        // holds none.
        assert_eq!(table.in_use(), 3);
        assert_eq!(table.alive(), 4);
        table.reuse(first);
        table.reuse(second);
        assert_eq!(table.in_use(), 1);
        // A worker that keeps up with a client alternates between two slots, whatever the
        // number of places.
        let mut written = Vec::new();
        let mut lent: Option<u32> = None;
        for _ in 0..6 {
            let slot = table.take().unwrap().bind().unwrap();
            written.push(slot.id());
            let id = slot.id();
            table.lend(slot);
            if let Some(previous) = lent.replace(id) {
                table.release(previous);
            }
        }
        let distinct: std::collections::BTreeSet<u32> = written.iter().copied().collect();
        assert_eq!(distinct.len(), 2, "{written:?}");
        assert_eq!(
            table.alive(),
            4,
            "no slot was made while free ones were left"
        );
        assert_eq!(files(tmp.path()), 4);
        drop(table);
        assert_eq!(files(tmp.path()), 0);
    }

    #[tokio::test]
    async fn an_unbound_claim_gives_its_place_back_and_closing_stops_binding() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SharedDir::open(tmp.path(), 1 << 30).unwrap();
        let mut table = SlotTable::new(Arc::clone(&dir), 1);
        let claim = table.take().unwrap();
        assert!(table.take().is_none());
        let freed = table.slot_dropped();
        // Dropped on a worker thread (a cancelled job): the stream is told.
        std::thread::spawn(move || drop(claim)).join().unwrap();
        freed.notified().await;
        let late = table.take().expect("the place came back");
        table.close().await;
        assert!(late.bind().is_err(), "a closed table binds no slot");
        assert_eq!(files(tmp.path()), 0);
    }

    #[test]
    fn the_budget_bounds_every_slot_file_together() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SharedDir::open(tmp.path(), 40_000).unwrap();
        let mut a = SlotTable::new(Arc::clone(&dir), 4);
        let mut b = SlotTable::new(Arc::clone(&dir), 4);
        let mut s1 = a.take().unwrap().bind().unwrap();
        let mut s2 = b.take().unwrap().bind().unwrap();
        s1.buffers(20_000, 5_000).unwrap();
        let err = s2.buffers(20_000, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(err.to_string().contains("budget"), "{err}");
        assert_eq!(files(tmp.path()), 1, "a refused slot leaves no file");
        s2.buffers(10_000, 0).unwrap();
        // Growing charges the difference only.
        s1.buffers(28_000, 0).unwrap();
        assert_eq!(dir.used.load(Ordering::Relaxed), 28_125 + 10_000);
        // A growth beyond the budget resets the slot: its file and bytes go.
        assert!(s1.buffers(36_000, 0).is_err());
        assert_eq!(dir.used.load(Ordering::Relaxed), 10_000);
        assert_eq!(files(tmp.path()), 1);
        s1.buffers(100, 0).unwrap();
        drop(s1);
        drop(s2);
        assert_eq!(
            dir.used.load(Ordering::Relaxed),
            0,
            "dropped slots give their bytes back"
        );
        assert_eq!(files(tmp.path()), 0);
    }

    #[test]
    fn files_of_dead_daemons_are_removed_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        // pid 0 is never a process of ours; i32::MAX exceeds every pid_max.
        let stale = tmp.path().join(format!("{PREFIX}{}-3", i32::MAX));
        let mine = tmp.path().join(format!("{PREFIX}{}-0", std::process::id()));
        // (A name of this process that exists is skipped, not overwritten.)
        let other = tmp.path().join("patchflow-notes.txt");
        for p in [&stale, &mine, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        SharedDir::open(tmp.path(), 1 << 30).unwrap();
        assert!(!stale.exists());
        assert!(mine.exists());
        assert!(other.exists());
    }

    #[test]
    fn an_unusable_folder_is_a_configuration_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = SharedDir::open(&tmp.path().join("missing"), 1 << 30)
            .err()
            .unwrap();
        assert!(err.to_string().contains("shared_memory"), "{err}");
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = SharedDir::open(&file, 1 << 30).err().unwrap();
        assert!(err.to_string().contains("not a folder"), "{err}");
    }
}

//! The ingest journal: an instance is acknowledged once it is sealed into the journal and the
//! journal is flushed to disk; de-identifying, splitting, sealing into the store and indexing
//! follow after the answer, and whatever a crash interrupts is replayed at the next start.
//!
//! Why: a C-STORE sender (storescu, a modality, a PACS) sends one instance and waits for its
//! answer before the next. Storing an instance durably in the store takes several files and
//! as many flushes (objects, manifests, reference records); the journal takes one write into
//! a file whose blocks already exist, and one `fdatasync`, which costs a fraction of that. The
//! store then gets the instances in batches, one study version per batch instead of one per
//! instance.
//!
//! Layout: a directory of segment files `j-<n>` of [`SEGMENT`] bytes each, written in full
//! (zeros) when made, so that appending never allocates blocks or changes the file's size.
//! - A segment in use starts with a 4 KiB header: magic `MLjs`, version, the segment's id
//!   (increasing, never reused) and a fresh AES-256-GCM key wrapped (HPKE) for the store's
//!   owner with the id as context. The header is flushed before the first entry is written.
//! - Records follow at 4 KiB boundaries: magic `MLjr`, the record's counter (0, 1, 2, ... in
//!   the segment), the sealed length, the entry it belongs to (the offset of the entry's
//!   first record), its part number in the entry and whether it is the last part; then the
//!   sealed part. The key's counter is the nonce; the associated data binds the segment id,
//!   the record's offset, the entry, the part number and the flag. An entry's payload (the
//!   STOW-RS study of the request, if any, and the Part 10 file) is the concatenation of its
//!   parts.
//! - An entry is one record when the whole instance is at hand (STOW-RS, import). A C-STORE
//!   data set is written in parts while it arrives ([`Journal::begin`], [`Journal::write`]):
//!   when its last fragment comes, most of it is sealed and on its way to the disk already,
//!   and what the sender waits for is the last part and the flush. Records of concurrent
//!   senders interleave; an entry whose last part was never written (the sender went away,
//!   the instance was refused) is skipped when the segment is read.
//! - Reading stops at the first record that does not open: the end, a torn write, or what an
//!   earlier use of the file left (sealed under another key). Every acknowledged entry lies
//!   before that point: records are written in order, one at a time, and an entry is
//!   acknowledged only after a flush that covers its last record and everything before it.
//! - Segments of version 1 (a whole entry per record, magic `MLje`, 16-byte head) are still
//!   read, so that what an older build journalled is stored after an upgrade.
//! - A segment is released once every entry in it has been committed to the store; its file
//!   is then kept for reuse (its header made invalid) or deleted.
//!
//! Replaying an entry that was committed already (the release was not yet on disk) is
//! harmless: the pipeline is idempotent by SOP Instance UID.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use medledger_crypto::{ObjectKey, PublicKey, SecretKey, SequenceKey, WrappedKey};

/// Bytes of one segment file.
pub const SEGMENT: u64 = 64 << 20;
/// Bytes of a segment's header; entries start here.
const HEAD: u64 = 4096;
/// Entries start at multiples of this.
const ALIGN: u64 = 4096;
/// Bytes before a version 1 entry's sealed payload: magic, counter, sealed length.
const ENTRY_HEAD_V1: usize = 16;
/// Bytes before a record's sealed part: magic, counter, sealed length, entry, part, flags.
const RECORD_HEAD: usize = 32;
/// The flag of an entry's last record.
const LAST: u32 = 1;
/// Bytes of an AES-GCM tag.
const TAG: usize = 16;
/// At most this many segment files exist; beyond, instances are stored before they are
/// answered (as without a journal) until the store catches up.
const MAX_FILES: usize = 16;
/// How long opening waits for another process to let go of the journal.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Released segment files kept for reuse (making one writes 64 MiB of zeros, as much as the
/// instances it will hold); others are deleted.
const KEEP_FREE: usize = 4;

const SEGMENT_MAGIC: &[u8; 4] = b"MLjs";
const ENTRY_MAGIC_V1: &[u8; 4] = b"MLje";
const RECORD_MAGIC: &[u8; 4] = b"MLjr";
const VERSION: u32 = 2;
/// Header bytes: magic, version, id, envelope (recipient, encapsulated key, sealed key).
const HEADER_LEN: usize = 4 + 4 + 8 + 32 + 32 + 48;

/// Where an entry lies, to release it once committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    segment: u64,
}

impl Ticket {
    #[cfg(test)]
    pub(crate) fn for_tests() -> Ticket {
        Ticket { segment: 0 }
    }
}

/// An entry being written in parts: see [`Journal::begin`].
#[derive(Debug)]
pub struct EntryWriter {
    /// The STOW-RS study's length and bytes, written before the first part.
    prefix: Vec<u8>,
    /// The segment and the entry (the offset of its first record), once a part is written.
    at: Option<(u64, u64)>,
    parts: u32,
    /// The entry cannot go on where it started (its segment was closed, or is full): it is
    /// to be appended whole.
    broken: bool,
}

impl EntryWriter {
    /// True once the entry cannot go on in its segment (see [`Journal::write`]).
    pub fn broken(&self) -> bool {
        self.broken
    }
}

/// One entry read back at start.
#[derive(Debug)]
pub struct Entry {
    pub ticket: Ticket,
    /// The study a STOW-RS request's URL named.
    pub study: Option<String>,
    pub file: Vec<u8>,
}

/// Why the journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {0} is in use by another process (one node per journal)")]
    InUse(String),
    #[error("journal {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}

struct Active {
    id: u64,
    last_append: std::time::Instant,
    slot: u64,
    file: Arc<File>,
    key: SequenceKey,
    offset: u64,
}

struct Live {
    slot: u64,
    /// Entries appended (or found at start) and not yet released.
    outstanding: u64,
    /// No entry will be added: released once `outstanding` is zero.
    closed: bool,
}

struct State {
    /// Slot numbers of the segment files that exist.
    files: BTreeSet<u64>,
    /// Slots whose files hold nothing needed.
    free: Vec<u64>,
    active: Option<Active>,
    next_id: u64,
    live: BTreeMap<u64, Live>,
    /// Segments found at start (id, version, file, key), their entries not yet read back.
    recovered: Vec<(u64, u32, Arc<File>, SequenceKey)>,
    buf: Vec<u8>,
}

#[derive(Default)]
struct Flush {
    /// The number the next flush takes.
    epoch: u64,
    /// Every flush numbered below this has completed.
    done: u64,
    running: bool,
}

/// The journal of one node.
pub struct Journal {
    dir: PathBuf,
    owner: PublicKey,
    state: Arc<Mutex<State>>,
    flush: Mutex<Flush>,
    flushed: Condvar,
    preparing: Arc<AtomicBool>,
    /// The thread making a spare segment file, if one runs.
    spare: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held (an exclusive lock on `lock`) while the journal is open.
    _lock: File,
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Some(t) = self.spare.lock().ok().and_then(|mut s| s.take()) {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn context(id: u64) -> Vec<u8> {
    let mut c = b"medledger ingest journal segment ".to_vec();
    c.extend_from_slice(&id.to_be_bytes());
    c
}

fn aad_v1(id: u64, offset: u64) -> [u8; 20] {
    let mut a = [0u8; 20];
    a[..4].copy_from_slice(ENTRY_MAGIC_V1);
    a[4..12].copy_from_slice(&id.to_be_bytes());
    a[12..].copy_from_slice(&offset.to_be_bytes());
    a
}

/// Where a record is and what it is part of.
#[derive(Debug, Clone, Copy)]
struct Place {
    segment: u64,
    offset: u64,
    entry: u64,
    part: u32,
    flags: u32,
}

impl Place {
    fn aad(&self) -> [u8; 36] {
        let mut a = [0u8; 36];
        a[..4].copy_from_slice(RECORD_MAGIC);
        a[4..12].copy_from_slice(&self.segment.to_be_bytes());
        a[12..20].copy_from_slice(&self.offset.to_be_bytes());
        a[20..28].copy_from_slice(&self.entry.to_be_bytes());
        a[28..32].copy_from_slice(&self.part.to_be_bytes());
        a[32..].copy_from_slice(&self.flags.to_be_bytes());
        a
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

fn slot_path(dir: &Path, slot: u64) -> PathBuf {
    dir.join(format!("j-{slot}"))
}

/// Reads a segment header: its id, version and key, or `None` if it is not a header for
/// `secret`.
fn read_header(file: &File, secret: &SecretKey) -> Option<(u64, u32, SequenceKey)> {
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, 0).ok()?;
    let version = u32::from_be_bytes(h[4..8].try_into().ok()?);
    if &h[..4] != SEGMENT_MAGIC || !(1..=VERSION).contains(&version) {
        return None;
    }
    let id = u64::from_be_bytes(h[8..16].try_into().ok()?);
    let envelope = WrappedKey {
        recipient: h[16..48].try_into().ok()?,
        enc: h[48..80].try_into().ok()?,
        ciphertext: h[80..HEADER_LEN].to_vec(),
    };
    if envelope.recipient != secret.public().to_bytes() {
        return None;
    }
    let key: ObjectKey = medledger_crypto::unwrap(&envelope, secret, &context(id)).ok()?;
    Some((id, version, SequenceKey::opener(key)))
}

/// A record read back: where it is, its part, and where the next one starts.
struct Record {
    place: Place,
    data: Vec<u8>,
    next: u64,
}

/// A segment being read back.
struct Reading<'a> {
    file: &'a File,
    id: u64,
    key: &'a SequenceKey,
    len: u64,
}

impl Reading<'_> {
    /// Reads the sealed record at `offset` whose head (`H` bytes) starts with `magic`, the
    /// record's counter (`expect`, or it is not the next one) and the sealed length; opens
    /// it under the associated data `aad` makes of the head. `None` at the end of what was
    /// written. Returns the head, the opened data and where the next record starts.
    fn sealed<const H: usize>(
        &self,
        magic: &[u8; 4],
        expect: u64,
        offset: u64,
        aad: impl FnOnce(&[u8; H]) -> Vec<u8>,
    ) -> Option<([u8; H], Vec<u8>, u64)> {
        let mut head = [0u8; H];
        if offset + H as u64 > self.len {
            return None;
        }
        self.file.read_exact_at(&mut head, offset).ok()?;
        if &head[..4] != magic {
            return None;
        }
        let counter = u64::from_be_bytes(head[4..12].try_into().ok()?);
        let sealed = u32::from_be_bytes(head[12..16].try_into().ok()?) as u64;
        if counter != expect || offset + H as u64 + sealed > self.len {
            return None;
        }
        let mut data = vec![0u8; sealed as usize];
        self.file.read_exact_at(&mut data, offset + H as u64).ok()?;
        self.key.open_at(counter, &aad(&head), &mut data).ok()?;
        Some((head, data, align(offset + H as u64 + sealed)))
    }

    /// The record at `offset`; `None` at the end of what was written.
    fn record(&self, expect: u64, offset: u64) -> Option<Record> {
        let place = |head: &[u8; RECORD_HEAD]| Place {
            segment: self.id,
            offset,
            entry: u64::from_be_bytes(head[16..24].try_into().expect("8 bytes")),
            part: u32::from_be_bytes(head[24..28].try_into().expect("4 bytes")),
            flags: u32::from_be_bytes(head[28..32].try_into().expect("4 bytes")),
        };
        let (head, data, next) =
            self.sealed(RECORD_MAGIC, expect, offset, |h| place(h).aad().to_vec())?;
        Some(Record {
            place: place(&head),
            data,
            next,
        })
    }

    /// The version 1 entry at `offset`; `None` at the end of what was written.
    fn entry_v1(&self, expect: u64, offset: u64) -> Option<(Vec<u8>, u64)> {
        let (_, body, next) =
            self.sealed::<ENTRY_HEAD_V1>(ENTRY_MAGIC_V1, expect, offset, |_| {
                aad_v1(self.id, offset).to_vec()
            })?;
        Some((body, next))
    }
}

/// An entry's payload: the STOW-RS study (length-prefixed, empty for none) and the file.
fn parse_payload(mut body: Vec<u8>) -> Option<(Option<String>, Vec<u8>)> {
    if body.len() < 2 {
        return None;
    }
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    if body.len() < 2 + n {
        return None;
    }
    let study = match n {
        0 => None,
        _ => Some(String::from_utf8(body[2..2 + n].to_vec()).ok()?),
    };
    body.drain(..2 + n);
    Some((study, body))
}

/// Hands each complete entry of a segment to `found`, in the order their last parts were
/// written; stops at the first record that does not open.
fn read_segment(file: &File, id: u64, key: &SequenceKey, found: &mut impl FnMut(Vec<u8>)) {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let reading = Reading { file, id, key, len };
    // Entries whose last part has not been read yet: the next part's number and the payload.
    let mut open: BTreeMap<u64, (u32, Vec<u8>)> = BTreeMap::new();
    let mut offset = HEAD;
    let mut counter = 0;
    while let Some(r) = reading.record(counter, offset) {
        offset = r.next;
        counter += 1;
        let p = r.place;
        let payload = if p.part == 0 && p.entry == p.offset {
            open.entry(p.entry).or_insert((0, Vec::new()))
        } else {
            match open.get_mut(&p.entry) {
                Some(e) if e.0 == p.part => e,
                _ => {
                    // Cannot be written so; sealed under this segment's key all the same.
                    tracing::error!("journal segment {id}: a record out of its entry's order");
                    open.remove(&p.entry);
                    continue;
                }
            }
        };
        payload.0 += 1;
        if payload.1.is_empty() {
            payload.1 = r.data;
        } else {
            payload.1.extend_from_slice(&r.data);
        }
        if p.flags & LAST != 0 {
            let (_, body) = open.remove(&p.entry).expect("just filled");
            found(body);
        }
    }
    if !open.is_empty() {
        tracing::info!(
            "journal segment {id}: {} entries never finished (not acknowledged), skipped",
            open.len()
        );
    }
}

/// [`read_segment`] for a segment of version 1: one record per entry.
fn read_segment_v1(file: &File, id: u64, key: &SequenceKey, found: &mut impl FnMut(Vec<u8>)) {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let reading = Reading { file, id, key, len };
    let mut offset = HEAD;
    let mut counter = 0;
    while let Some((body, next)) = reading.entry_v1(counter, offset) {
        offset = next;
        counter += 1;
        found(body);
    }
}

impl Journal {
    /// Opens (or makes) the journal in `dir`. Entries left by an earlier run are read back by
    /// [`Journal::recover`].
    pub fn open(dir: &Path, owner: &SecretKey) -> Result<Journal, JournalError> {
        Self::open_waiting(dir, owner, LOCK_WAIT)
    }

    /// [`Journal::open`], waiting at most `wait` for another process to let go of it.
    fn open_waiting(
        dir: &Path,
        owner: &SecretKey,
        wait: std::time::Duration,
    ) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // A node restarted at once after it was killed may find its predecessor still
        // holding the lock for a moment, until the kernel has torn the old process down.
        let waiting = std::time::Instant::now();
        loop {
            match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) if waiting.elapsed() < wait => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(JournalError::InUse(dir.display().to_string()));
                }
                Err(e) => return Err(io_err(&lock_path)(e.into())),
            }
        }
        let mut files = BTreeSet::new();
        let mut free = Vec::new();
        let mut recovered = Vec::new();
        let mut live = BTreeMap::new();
        let mut next_id = 1;
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            if name.ends_with(".tmp") {
                // A segment file being made when the process stopped: it held nothing.
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let Some(slot) = name.strip_prefix("j-").and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            let len = file.metadata().map_err(io_err(&path))?.len();
            files.insert(slot);
            match read_header(&file, owner) {
                Some((id, version, key)) => {
                    next_id = next_id.max(id + 1);
                    live.insert(
                        id,
                        Live {
                            slot,
                            outstanding: 0,
                            closed: false,
                        },
                    );
                    recovered.push((id, version, Arc::new(file), key));
                }
                None if len == SEGMENT => free.push(slot),
                None => {
                    std::fs::remove_file(&path).map_err(io_err(&path))?;
                    files.remove(&slot);
                }
            }
        }
        recovered.sort_by_key(|r| r.0);
        // No segment file is made here; `prepare` makes one in the background (the node
        // calls it once started), and from then on one is made ahead of need.
        let journal = Journal {
            dir: dir.to_path_buf(),
            owner: owner.public(),
            state: Arc::new(Mutex::new(State {
                files,
                free,
                active: None,
                next_id,
                live,
                recovered,
                buf: Vec::new(),
            })),
            flush: Mutex::new(Flush::default()),
            flushed: Condvar::new(),
            preparing: Arc::new(AtomicBool::new(false)),
            spare: Mutex::new(None),
            _lock: lock,
        };
        Ok(journal)
    }

    /// Hands every entry an earlier run left to `take`, oldest first; each is released (by
    /// [`Journal::release`]) once committed. Returns how many there were.
    pub fn recover(&self, mut take: impl FnMut(Entry)) -> usize {
        let recovered = std::mem::take(&mut self.state.lock().expect("not poisoned").recovered);
        let mut n = 0;
        for (id, version, file, key) in recovered {
            let mut found = |body: Vec<u8>| {
                let Some((study, bytes)) = parse_payload(body) else {
                    tracing::error!("journal segment {id}: an entry has no payload");
                    return;
                };
                if let Some(l) = self.state.lock().expect("not poisoned").live.get_mut(&id) {
                    l.outstanding += 1;
                }
                n += 1;
                take(Entry {
                    ticket: Ticket { segment: id },
                    study,
                    file: bytes,
                });
            };
            if version == 1 {
                read_segment_v1(&file, id, &key, &mut found);
            } else {
                read_segment(&file, id, &key, &mut found);
            }
            let mut st = self.state.lock().expect("not poisoned");
            if let Some(l) = st.live.get_mut(&id) {
                l.closed = true;
            }
            self.maybe_free(&mut st, id);
        }
        n
    }

    /// Appends one instance and returns once it is on disk, or `Ok(None)` if the journal
    /// cannot take it now (too large, or too much is waiting for the store): the caller
    /// stores it before answering instead.
    pub fn append(&self, study: Option<&str>, file: &[u8]) -> Result<Option<Ticket>, JournalError> {
        match self.begin(study) {
            Some(w) => self.finish(w, file),
            None => Ok(None),
        }
    }

    /// Starts an entry to be written in parts: [`Journal::write`] while the instance
    /// arrives, [`Journal::finish`] with the rest. Nothing is written yet. `None` if the
    /// study's UID is too long to be recorded.
    pub fn begin(&self, study: Option<&str>) -> Option<EntryWriter> {
        let study = study.unwrap_or("").as_bytes();
        let len = u16::try_from(study.len()).ok()?;
        let mut prefix = len.to_be_bytes().to_vec();
        prefix.extend_from_slice(study);
        Some(EntryWriter {
            prefix,
            at: None,
            parts: 0,
            broken: false,
        })
    }

    /// Writes the next part of an entry, not flushed, and has the kernel start writing it
    /// to the disk. If the entry cannot go on in its segment, nothing is written and the
    /// writer is marked broken: the caller then appends the instance whole.
    pub fn write(&self, w: &mut EntryWriter, part: &[u8]) -> Result<(), JournalError> {
        if w.broken {
            return Ok(());
        }
        if let Some((file, offset, len)) = self.write_record(w, part, false)? {
            // Writing back what is written while the rest arrives leaves less for the
            // flush that the sender waits for. DONTNEED starts writeback of dirty pages
            // (and drops clean ones: the journal is read back only after a crash).
            let _ = rustix::fs::fadvise(
                &*file,
                offset,
                std::num::NonZeroU64::new(len),
                rustix::fs::Advice::DontNeed,
            );
        }
        Ok(())
    }

    /// Writes an entry's last part and returns once the whole entry is on disk; `Ok(None)`
    /// if the journal cannot take it (the writer broke, the instance is too large, too
    /// much waits for the store): the caller appends it whole, or stores it before
    /// answering.
    pub fn finish(&self, mut w: EntryWriter, part: &[u8]) -> Result<Option<Ticket>, JournalError> {
        if w.broken {
            return Ok(None);
        }
        if self.write_record(&mut w, part, true)?.is_none() {
            return Ok(None);
        }
        let (segment, _) = w.at.expect("a record was written");
        self.wait_flushed()?;
        Ok(Some(Ticket { segment }))
    }

    /// Seals and writes one record of `w` at the end of the active segment; `None` (and the
    /// writer broken) if it does not fit there, or the entry's segment is no longer the
    /// active one. Returns the file and the range written.
    fn write_record(
        &self,
        w: &mut EntryWriter,
        part: &[u8],
        last: bool,
    ) -> Result<Option<(Arc<File>, u64, u64)>, JournalError> {
        let prefix: &[u8] = if w.at.is_none() { &w.prefix } else { &[] };
        let need = align((RECORD_HEAD + prefix.len() + part.len() + TAG) as u64);
        let mut st = self.state.lock().expect("not poisoned");
        let fits = |st: &State| {
            st.active
                .as_ref()
                .is_some_and(|a| a.offset + need <= SEGMENT)
        };
        match w.at {
            None => {
                if need > SEGMENT - HEAD || (!fits(&st) && !self.roll(&mut st)?) {
                    w.broken = true;
                    return Ok(None);
                }
            }
            Some((segment, _)) => {
                let same = st.active.as_ref().is_some_and(|a| a.id == segment);
                if !same || !fits(&st) {
                    w.broken = true;
                    return Ok(None);
                }
            }
        }
        let st = &mut *st;
        let a = st.active.as_mut().expect("checked");
        let place = Place {
            segment: a.id,
            offset: a.offset,
            entry: w.at.map_or(a.offset, |(_, entry)| entry),
            part: w.parts,
            flags: if last { LAST } else { 0 },
        };
        let mut buf = std::mem::take(&mut st.buf);
        buf.clear();
        buf.extend_from_slice(&[0u8; RECORD_HEAD]);
        let counter = a.key.seal_next(&place.aad(), &[prefix, part], &mut buf);
        let sealed = (buf.len() - RECORD_HEAD) as u32;
        buf[..4].copy_from_slice(RECORD_MAGIC);
        buf[4..12].copy_from_slice(&counter.to_be_bytes());
        buf[12..16].copy_from_slice(&sealed.to_be_bytes());
        buf[16..24].copy_from_slice(&place.entry.to_be_bytes());
        buf[24..28].copy_from_slice(&place.part.to_be_bytes());
        buf[28..32].copy_from_slice(&place.flags.to_be_bytes());
        let written = a.file.write_all_at(&buf, a.offset);
        let len = buf.len() as u64;
        st.buf = buf;
        if let Err(e) = written {
            w.broken = true;
            return Err(io_err(&slot_path(&self.dir, a.slot))(e));
        }
        a.offset += need;
        a.last_append = std::time::Instant::now();
        w.at = Some((a.id, place.entry));
        w.parts += 1;
        if last {
            st.live
                .get_mut(&place.segment)
                .expect("the active segment is live")
                .outstanding += 1;
        }
        Ok(Some((a.file.clone(), place.offset, len)))
    }

    /// Returns once a flush that started after this call has completed: one `fdatasync`
    /// serves every writer waiting at the time (group commit).
    fn wait_flushed(&self) -> Result<(), JournalError> {
        let mut f = self.flush.lock().expect("not poisoned");
        let need = f.epoch + 1;
        loop {
            if f.done >= need {
                return Ok(());
            }
            if f.running {
                f = self.flushed.wait(f).expect("not poisoned");
                continue;
            }
            let n = f.epoch;
            f.epoch += 1;
            f.running = true;
            drop(f);
            // The active file now: a segment closed by a roll was flushed when it closed, one
            // closed while idle holds no entry that is not stored.
            let active = {
                let st = self.state.lock().expect("not poisoned");
                st.active.as_ref().map(|a| (a.file.clone(), a.slot))
            };
            let slot = active.as_ref().map_or(0, |a| a.1);
            let r = active.map_or(Ok(()), |(file, _)| file.sync_data());
            f = self.flush.lock().expect("not poisoned");
            f.running = false;
            if r.is_ok() {
                f.done = f.done.max(n + 1);
            }
            self.flushed.notify_all();
            r.map_err(io_err(&slot_path(&self.dir, slot)))?;
        }
    }

    /// Closes the active segment (flushed first) and starts another; `false` if none can be
    /// had.
    fn roll(&self, st: &mut State) -> Result<bool, JournalError> {
        if let Some(a) = st.active.take() {
            a.file
                .sync_data()
                .map_err(io_err(&slot_path(&self.dir, a.slot)))?;
            if let Some(l) = st.live.get_mut(&a.id) {
                l.closed = true;
            }
            // Flushes numbered from here on cover the new file only; everything written to
            // the old one is on disk now.
            {
                let mut f = self.flush.lock().expect("not poisoned");
                let n = f.epoch;
                f.epoch += 1;
                f.done = f.done.max(n + 1);
            }
            self.flushed.notify_all();
            self.maybe_free(st, a.id);
        }
        let slot = match st.free.pop() {
            Some(s) => s,
            None if st.files.len() < MAX_FILES => {
                let s = self.make_file(st)?;
                st.files.insert(s);
                s
            }
            None => return Ok(false),
        };
        let path = slot_path(&self.dir, slot);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let id = st.next_id;
        st.next_id += 1;
        let key = SequenceKey::generate();
        let envelope = medledger_crypto::wrap(key.object_key(), &self.owner, &context(id));
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(SEGMENT_MAGIC);
        h.extend_from_slice(&VERSION.to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&envelope.recipient);
        h.extend_from_slice(&envelope.enc);
        h.extend_from_slice(&envelope.ciphertext);
        debug_assert_eq!(h.len(), HEADER_LEN);
        file.write_all_at(&h, 0).map_err(io_err(&path))?;
        file.sync_data().map_err(io_err(&path))?;
        st.live.insert(
            id,
            Live {
                slot,
                outstanding: 0,
                closed: false,
            },
        );
        st.active = Some(Active {
            id,
            slot,
            file: Arc::new(file),
            key,
            offset: HEAD,
            last_append: std::time::Instant::now(),
        });
        if st.free.is_empty() && st.files.len() < MAX_FILES {
            self.prepare_spare(st);
        }
        Ok(true)
    }

    /// Makes a new segment file (zeros, on disk, named in the directory); returns its slot.
    fn make_file(&self, st: &State) -> Result<u64, JournalError> {
        let slot = (0..).find(|s| !st.files.contains(s)).expect("a free slot");
        make_segment_file(&self.dir, slot)?;
        Ok(slot)
    }

    /// Makes one more segment file in the background, so that the next roll finds it ready.
    fn prepare_spare(&self, st: &mut State) {
        if self.preparing.swap(true, Ordering::AcqRel) {
            return;
        }
        // The slot is taken now; the file joins `free` once it is on disk.
        let slot = (0..).find(|s| !st.files.contains(s)).expect("a free slot");
        st.files.insert(slot);
        let dir = self.dir.clone();
        let state = self.state.clone();
        let preparing = self.preparing.clone();
        let spawned = std::thread::Builder::new()
            .name("journal-spare".into())
            .spawn(move || {
                let made = make_segment_file(&dir, slot);
                let mut st = state.lock().expect("not poisoned");
                match made {
                    Ok(()) => st.free.push(slot),
                    Err(e) => {
                        tracing::warn!("cannot make a journal segment in advance: {e}");
                        st.files.remove(&slot);
                    }
                }
                preparing.store(false, Ordering::Release);
            });
        match spawned {
            Ok(t) => {
                if let Some(old) = self.spare.lock().expect("not poisoned").replace(t) {
                    // Finished: `preparing` was clear.
                    let _ = old.join();
                }
            }
            Err(_) => {
                st.files.remove(&slot);
                self.preparing.store(false, Ordering::Release);
            }
        }
    }

    /// Makes a segment file in the background if none is free, so that the first instance
    /// does not wait for 64 MiB to be written (a few hundred milliseconds here).
    pub fn prepare(&self) {
        let mut st = self.state.lock().expect("not poisoned");
        if st.free.is_empty() && st.files.len() < MAX_FILES {
            self.prepare_spare(&mut st);
        }
    }

    /// Releases one entry: it is in the store now.
    pub fn release(&self, ticket: Ticket) {
        let mut st = self.state.lock().expect("not poisoned");
        if let Some(l) = st.live.get_mut(&ticket.segment) {
            l.outstanding = l.outstanding.saturating_sub(1);
        }
        self.maybe_free(&mut st, ticket.segment);
    }

    fn maybe_free(&self, st: &mut State, id: u64) {
        let done = st
            .live
            .get(&id)
            .is_some_and(|l| l.closed && l.outstanding == 0);
        if !done {
            return;
        }
        let slot = st.live.remove(&id).expect("checked").slot;
        let path = slot_path(&self.dir, slot);
        if st.free.len() < KEEP_FREE {
            // The header no longer opens, so a start does not read the entries again. Not
            // flushed: reading them again would only find them stored already.
            let cleared = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.write_all_at(&[0u8; 4], 0));
            match cleared {
                Ok(()) => {
                    st.free.push(slot);
                    return;
                }
                Err(e) => tracing::warn!("journal {}: {e}", path.display()),
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                st.files.remove(&slot);
            }
            Err(e) => tracing::warn!("journal {}: {e}", path.display()),
        }
    }

    /// Closes the active segment if everything in it is stored and nothing was appended for
    /// `idle`, so that a start does not read its entries again; the next append starts a
    /// new one.
    pub fn close_idle(&self, idle: std::time::Duration) {
        let mut st = self.state.lock().expect("not poisoned");
        let Some(a) = &st.active else { return };
        let id = a.id;
        let quiet = a.last_append.elapsed() >= idle;
        if !quiet || st.live.get(&id).is_none_or(|l| l.outstanding > 0) {
            return;
        }
        st.active = None;
        if let Some(l) = st.live.get_mut(&id) {
            l.closed = true;
        }
        self.maybe_free(&mut st, id);
    }

    /// Entries appended or found at start and not yet released.
    pub fn outstanding(&self) -> u64 {
        let st = self.state.lock().expect("not poisoned");
        st.live.values().map(|l| l.outstanding).sum()
    }

    /// Segment files on disk.
    pub fn files(&self) -> usize {
        self.state.lock().expect("not poisoned").files.len()
    }
}

/// Writes a segment file of zeros under a temporary name, flushes it and names it `j-<slot>`.
fn make_segment_file(dir: &Path, slot: u64) -> Result<(), JournalError> {
    let tmp = dir.join(format!("j-{slot}.tmp"));
    let path = slot_path(dir, slot);
    let zeros = vec![0u8; 1 << 20];
    let f = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut at = 0;
    while at < SEGMENT {
        f.write_all_at(&zeros, at).map_err(io_err(&tmp))?;
        at += zeros.len() as u64;
    }
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(j: &Journal) -> Vec<Entry> {
        let mut out = Vec::new();
        j.recover(|e| out.push(e));
        out
    }

    fn file(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn what_is_appended_is_read_back_after_a_stop_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        {
            let j = Journal::open(dir.path(), &key).unwrap();
            assert!(entries(&j).is_empty());
            for (i, study) in [None, Some("1.2.3"), None].into_iter().enumerate() {
                j.append(study, &file(i as u8, 1000 + i * 5000))
                    .unwrap()
                    .unwrap();
            }
            assert_eq!(j.outstanding(), 3);
            // Dropped without releasing: the process stopped.
        }
        let j = Journal::open(dir.path(), &key).unwrap();
        let got = entries(&j);
        assert_eq!(got.len(), 3);
        for (i, e) in got.iter().enumerate() {
            assert_eq!(e.file, file(i as u8, 1000 + i * 5000));
        }
        assert_eq!(got[1].study.as_deref(), Some("1.2.3"));
        assert_eq!(got[0].study, None);
        // Once stored (released), a stop and start reads nothing again.
        for e in &got {
            j.release(e.ticket);
        }
        assert_eq!(j.outstanding(), 0);
        j.append(None, b"next").unwrap().unwrap();
        drop(j);
        let again = Journal::open(dir.path(), &key).unwrap();
        let got = entries(&again);
        assert_eq!(got.len(), 1, "only the entry appended after the release");
        assert_eq!(got[0].file, b"next");
    }

    #[test]
    fn prepare_makes_one_free_segment_ahead_of_the_first_append() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let j = Journal::open(dir.path(), &key).unwrap();
        assert_eq!(j.files(), 0, "opening makes no file");
        j.prepare();
        let waited = std::time::Instant::now();
        while j.state.lock().unwrap().free.is_empty() {
            assert!(waited.elapsed().as_secs() < 30, "no segment made");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(j.files(), 1);
        let made = std::fs::metadata(slot_path(dir.path(), 0)).unwrap();
        assert_eq!(made.len(), SEGMENT);
        // One free already: nothing more.
        j.prepare();
        assert_eq!(j.files(), 1);
        drop(j);
        // Found free at the next start, and used by the first append.
        let j = Journal::open(dir.path(), &key).unwrap();
        assert_eq!(j.state.lock().unwrap().free, vec![0]);
        j.append(None, b"first").unwrap().unwrap();
        assert_eq!(j.state.lock().unwrap().active.as_ref().unwrap().slot, 0);
    }

    #[test]
    fn an_idle_segment_whose_entries_are_stored_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let j = Journal::open(dir.path(), &key).unwrap();
        j.append(None, b"one").unwrap().unwrap();
        // Not yet stored: closing while idle keeps it.
        j.close_idle(std::time::Duration::ZERO);
        drop(j);
        let j = Journal::open(dir.path(), &key).unwrap();
        let got = entries(&j);
        assert_eq!(got.len(), 1);
        j.release(got[0].ticket);
        drop(j);
        let j = Journal::open(dir.path(), &key).unwrap();
        assert!(entries(&j).is_empty());
        // Stored and idle: closed, not read again.
        let t = j.append(None, b"two").unwrap().unwrap();
        j.release(t);
        j.close_idle(std::time::Duration::from_secs(60));
        j.close_idle(std::time::Duration::ZERO);
        // And the journal takes entries again, in a new segment.
        j.append(None, b"three").unwrap().unwrap();
        drop(j);
        let j = Journal::open(dir.path(), &key).unwrap();
        let got = entries(&j);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].file, b"three");
        // One node per journal.
        let t = std::time::Instant::now();
        assert!(matches!(
            Journal::open_waiting(dir.path(), &key, std::time::Duration::from_millis(200)),
            Err(JournalError::InUse(_))
        ));
        assert!(t.elapsed() >= std::time::Duration::from_millis(200));
        // Once the holder lets go, it opens.
        drop(j);
        Journal::open_waiting(dir.path(), &key, std::time::Duration::ZERO).unwrap();
    }

    fn segment_paths(dir: &Path, key: &SecretKey) -> Vec<PathBuf> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter_map(|p| {
                let f = File::open(&p).ok()?;
                read_header(&f, key).map(|(id, _, _)| (id, p))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    #[test]
    fn reading_stops_at_a_torn_or_altered_entry_and_a_bad_header_reads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let j = Journal::open(dir.path(), &key).unwrap();
        for i in 0..3 {
            j.append(None, &file(i, 6000)).unwrap().unwrap();
        }
        drop(j);
        let seg = segment_paths(dir.path(), &key).pop().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&seg)
            .unwrap();
        // The third entry starts at HEAD + 2 * 8192 (each takes two 4 KiB blocks).
        let third = HEAD + 2 * 8192;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, third + 100).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], third + 100).unwrap();
        let j = Journal::open(dir.path(), &key).unwrap();
        let got = entries(&j);
        drop(j);
        assert_eq!(got.len(), 2, "the altered third entry ends the log");
        assert_eq!(got[1].file, file(1, 6000));
        // Another owner's key opens nothing (and its files are not taken as its own).
        let other = SecretKey::generate();
        let dir2 = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap() != "lock" {
                std::fs::copy(&p, dir2.path().join(p.file_name().unwrap())).unwrap();
            }
        }
        assert!(entries(&Journal::open(dir2.path(), &other).unwrap()).is_empty());
        // A damaged segment header: the segment reads as empty.
        f.write_all_at(&[0xFF], 60).unwrap();
        assert!(entries(&Journal::open(dir.path(), &key).unwrap()).is_empty());
    }

    #[test]
    fn entries_roll_over_segments_and_concurrent_writers_lose_none() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let j = Arc::new(Journal::open(dir.path(), &key).unwrap());
        // 4 writers x 12 entries of 3 MiB: about 150 MiB, three segments.
        let big = 3 << 20;
        std::thread::scope(|s| {
            for w in 0..4u8 {
                let j = j.clone();
                s.spawn(move || {
                    for i in 0..12u8 {
                        let mut f = file(w * 16 + i, big);
                        f[0] = w;
                        f[1] = i;
                        j.append(None, &f).unwrap().unwrap();
                    }
                });
            }
        });
        assert!(j.files() >= 3, "{} segment files", j.files());
        drop(j);
        let got = entries(&Journal::open(dir.path(), &key).unwrap());
        assert_eq!(got.len(), 48);
        let mut seen = BTreeSet::new();
        for e in &got {
            let (w, i) = (e.file[0], e.file[1]);
            let mut want = file(w * 16 + i, big);
            want[0] = w;
            want[1] = i;
            assert!(e.file == want, "entry {w}/{i} differs");
            seen.insert((w, i));
        }
        assert_eq!(seen.len(), 48);
        // Each writer's entries come back in the order it wrote them.
        for w in 0..4u8 {
            let order: Vec<u8> = got
                .iter()
                .filter(|e| e.file[0] == w)
                .map(|e| e.file[1])
                .collect();
            assert_eq!(order, (0..12).collect::<Vec<_>>());
        }
    }

    #[test]
    fn entries_written_in_parts_come_back_whole_and_unfinished_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let (a, b, c) = (file(1, 300_000), file(2, 200_000), file(3, 5000));
        {
            let j = Journal::open(dir.path(), &key).unwrap();
            // Three senders at once: A in three parts, B never finished (its sender went
            // away), C whole in between; their records interleave.
            let mut wa = j.begin(None).unwrap();
            let mut wb = j.begin(None).unwrap();
            j.write(&mut wa, &a[..100_000]).unwrap();
            j.write(&mut wb, &b[..150_000]).unwrap();
            j.write(&mut wa, &a[100_000..250_000]).unwrap();
            let tc = j.append(Some("1.2.3"), &c).unwrap().unwrap();
            assert!(!wa.broken() && !wb.broken());
            assert_eq!(j.outstanding(), 1, "only a finished entry counts");
            let ta = j.finish(wa, &a[250_000..]).unwrap().unwrap();
            assert_eq!(ta, tc, "same segment");
            assert_eq!(j.outstanding(), 2);
            drop(wb);
        }
        let j = Journal::open(dir.path(), &key).unwrap();
        let got = entries(&j);
        assert_eq!(got.len(), 2, "A and C; B was never finished");
        assert_eq!(got[0].study.as_deref(), Some("1.2.3"));
        assert!(got[0].file == c);
        assert_eq!(got[1].study, None);
        assert!(got[1].file == a, "A's parts make the file again");
        // Once both are stored, B's parts are not read again either.
        for e in &got {
            j.release(e.ticket);
        }
        j.close_idle(std::time::Duration::ZERO);
        drop(j);
        let j = Journal::open(dir.path(), &key).unwrap();
        assert!(entries(&j).is_empty());
    }

    #[test]
    fn parts_cut_off_by_another_segment_leave_the_entry_to_be_appended_whole() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let j = Journal::open(dir.path(), &key).unwrap();
        let a = file(4, 400_000);
        let mut wa = j.begin(None).unwrap();
        j.write(&mut wa, &a[..200_000]).unwrap();
        // Others fill the segment meanwhile: the next entry starts another one.
        let big = file(5, 8 << 20);
        for _ in 0..8 {
            j.append(None, &big).unwrap().unwrap();
        }
        j.write(&mut wa, &a[200_000..300_000]).unwrap();
        assert!(wa.broken(), "its segment is not the active one any more");
        assert!(j.finish(wa, &a[300_000..]).unwrap().is_none());
        j.append(None, &a).unwrap().unwrap();
        drop(j);
        let j = Journal::open(dir.path(), &key).unwrap();
        let got = entries(&j);
        assert_eq!(got.len(), 9);
        assert!(got.last().unwrap().file == a);
        assert_eq!(got.iter().filter(|e| e.file == big).count(), 8);
    }

    #[test]
    fn a_segment_an_earlier_version_wrote_is_still_read() {
        // Version 1: one record per entry, a 16-byte head, the associated data binding the
        // segment and the offset only.
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        make_segment_file(dir.path(), 0).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(slot_path(dir.path(), 0))
            .unwrap();
        let id = 7;
        let mut seq = SequenceKey::generate();
        let envelope = medledger_crypto::wrap(seq.object_key(), &key.public(), &context(id));
        let mut h = Vec::new();
        h.extend_from_slice(SEGMENT_MAGIC);
        h.extend_from_slice(&1u32.to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&envelope.recipient);
        h.extend_from_slice(&envelope.enc);
        h.extend_from_slice(&envelope.ciphertext);
        f.write_all_at(&h, 0).unwrap();
        let mut offset = HEAD;
        let files = [file(6, 70_000), file(7, 10)];
        for (i, body) in files.iter().enumerate() {
            let study: &[u8] = if i == 0 { b"9.8" } else { b"" };
            let mut buf = vec![0u8; ENTRY_HEAD_V1];
            let counter = seq.seal_next(
                &aad_v1(id, offset),
                &[&(study.len() as u16).to_be_bytes(), study, body],
                &mut buf,
            );
            let sealed = (buf.len() - ENTRY_HEAD_V1) as u32;
            buf[..4].copy_from_slice(ENTRY_MAGIC_V1);
            buf[4..12].copy_from_slice(&counter.to_be_bytes());
            buf[12..16].copy_from_slice(&sealed.to_be_bytes());
            f.write_all_at(&buf, offset).unwrap();
            offset = align(offset + buf.len() as u64);
        }
        drop(f);
        let j = Journal::open(dir.path(), &key).unwrap();
        let got = entries(&j);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].study.as_deref(), Some("9.8"));
        assert!(got[0].file == files[0]);
        assert!(got[1].file == files[1]);
        // New entries go into a segment of the current version, after the old one's id.
        j.append(None, b"new").unwrap().unwrap();
        let st = j.state.lock().unwrap();
        assert!(st.active.as_ref().unwrap().id > id);
    }

    #[test]
    fn an_instance_larger_than_a_segment_is_not_journalled() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let j = Journal::open(dir.path(), &key).unwrap();
        assert!(
            j.append(None, &vec![0u8; SEGMENT as usize])
                .unwrap()
                .is_none()
        );
        assert_eq!(j.outstanding(), 0);
    }
}

//! The filesystem backend: objects written crash-safely, in pack files or one file each.
//!
//! A batch of content-addressed objects (`objects/<hex>`) goes into one pack file (see
//! [`pack`](super::pack)): written in `tmp/`, flushed (`fdatasync`), renamed into `packs/` and
//! the directory flushed, so a batch costs one file and two flushes however many objects it
//! holds; a batch written through [`Backend::batch`] also packs the new keys that are not
//! objects (a new study's reference record), after the objects. Anything else, and a lone
//! object, is one file: a temporary file in `tmp/`, flushed, renamed into place, its
//! directory flushed. Objects are looked up in the packs first, other keys in their own file
//! first, so a file written later replaces a packed value. Either way, after a crash a write is whole or
//! absent. Lone objects fan out by the first two hex digits of their name
//! (`objects/ab/ab12...`). Temporary files left by a crash are never read as objects; `verify`
//! counts them and `clean_tmp` removes them.
//!
//! Which pack holds which object is kept in memory, read from the packs' indexes when the
//! store is opened and again when a key is not found (another process may have written it).
//! Deleting a packed object writes its pack again without it (the new pack in place before
//! the old one goes, so a crash leaves a duplicate, never a loss).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use rand::RngCore;
use rayon::prelude::*;

use super::pack::{self, Entry};
use super::{Backend, BackendError, BatchWriter, check_key};

const MARKER: &str = "MEDLEDGER-STORE";
const MARKER_TEXT: &str = "medledger object store, layout 1\n";
const PACKS: &str = "packs";
/// A pack is written in chunks of this size as it grows: large enough for few, large writes,
/// small enough that the disk works while objects are still being sealed.
const CHUNK: usize = 4 << 20;
/// Direct I/O's alignment of buffer address, file offset and length (a multiple of every
/// logical block size in use).
const ALIGN: usize = 4096;

/// A batch with at least this many objects goes into a pack; fewer are written one file each
/// (a pack of one would cost the same as the file).
const PACK_MIN: usize = 2;

/// A pack written again without deleted objects is split into packs of about this size, so a
/// rewrite never holds more than this in memory.
const REWRITE_BYTES: u64 = 64 << 20;

/// Threads that write and flush files at once: flushes wait on the disk, not the CPU, and
/// the disk merges concurrent flushes into fewer journal commits.
const IO_THREADS: usize = 16;

#[derive(Debug)]
pub struct FsBackend {
    root: PathBuf,
    pool: rayon::ThreadPool,
    packs: RwLock<Packs>,
    /// Held while packs are written again without deleted objects.
    rewriting: Mutex<()>,
}

/// Where an object's bytes are on disk: a whole file, or a range of a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl Location {
    /// The object's bytes as they are on disk.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        read_range(&File::open(&self.path)?, self.offset, self.len)
    }

    /// Flips one bit of the object's byte `at`, in place: for showing and testing that damage
    /// is caught.
    pub fn flip_bit(&self, at: u64) -> std::io::Result<()> {
        if at >= self.len {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("byte {at} is past the object's {} bytes", self.len),
            ));
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)?;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, self.offset + at)?;
        file.write_all_at(&[b[0] ^ 0x10], self.offset + at)?;
        file.sync_data()
    }
}

/// What this process knows of the store's packs.
#[derive(Debug, Default)]
struct Packs {
    /// Pack file name to its entries.
    files: HashMap<Arc<str>, Arc<[Entry]>>,
    /// Object key to the pack that holds it, and where.
    by_key: HashMap<String, Loc>,
    /// Packs whose index was damaged (read record by record) or that could not be read.
    damaged: HashMap<Arc<str>, String>,
}

#[derive(Clone, Debug)]
struct Loc {
    pack: Arc<str>,
    offset: u64,
    len: u64,
}

impl Packs {
    fn add(&mut self, name: Arc<str>, entries: Arc<[Entry]>) {
        for e in entries.iter() {
            self.by_key.insert(
                e.key.clone(),
                Loc {
                    pack: name.clone(),
                    offset: e.offset,
                    len: e.len,
                },
            );
        }
        self.files.insert(name, entries);
    }

    /// Forgets a pack whose objects are all deleted or held by other packs already indexed.
    fn drop_pack(&mut self, name: &str) {
        self.damaged.remove(name);
        if let Some(entries) = self.files.remove(name) {
            for e in entries.iter() {
                if self.by_key.get(&e.key).is_some_and(|l| &*l.pack == name) {
                    self.by_key.remove(&e.key);
                }
            }
        }
    }
}

/// The file name of a lone object under its fan-out folder, for keys `objects/<name>`.
fn object_name(key: &str) -> Option<&str> {
    key.strip_prefix("objects/")
        .filter(|name| !name.contains('/') && name.len() >= 2)
}

impl FsBackend {
    /// Opens the store at `root`, creating it if it does not exist. A directory that exists,
    /// is not empty and is not a store is refused rather than written into.
    pub fn open(root: impl AsRef<Path>) -> Result<FsBackend, BackendError> {
        let root = root.as_ref().to_path_buf();
        if !root.join(MARKER).exists() {
            create(&root)?;
        }
        FsBackend::with_root(root)
    }

    /// Opens an existing store; a folder that is not one is an error, and nothing is created.
    pub fn open_existing(root: impl AsRef<Path>) -> Result<FsBackend, BackendError> {
        let root = root.as_ref().to_path_buf();
        if !root.join(MARKER).is_file() {
            return Err(BackendError::Config(format!(
                "no medledger store at {}",
                root.display()
            )));
        }
        FsBackend::with_root(root)
    }

    fn with_root(root: PathBuf) -> Result<FsBackend, BackendError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(IO_THREADS)
            .thread_name(|i| format!("store-io-{i}"))
            .build()
            .map_err(|e| BackendError::Config(format!("cannot start I/O threads: {e}")))?;
        let backend = FsBackend {
            root,
            pool,
            packs: RwLock::default(),
            rewriting: Mutex::new(()),
        };
        backend.refresh()?;
        Ok(backend)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, BackendError> {
        check_key(key)?;
        Ok(match object_name(key) {
            Some(name) => self.root.join("objects").join(&name[..2]).join(name),
            None => self.root.join(key),
        })
    }

    fn key_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.root).ok()?;
        let parts: Vec<&str> = rel.iter().map(|s| s.to_str()).collect::<Option<_>>()?;
        match parts.as_slice() {
            ["objects", _, name] => Some(format!("objects/{name}")),
            ["tmp", ..] | [PACKS, ..] | [MARKER] => None,
            _ => Some(parts.join("/")),
        }
    }

    /// Writes a temporary file with `data` and flushes it; returns its path.
    fn write_tmp(&self, data: &[u8]) -> Result<PathBuf, BackendError> {
        self.write_tmp_with(data, true)
    }

    /// Writes a temporary file, flushed to disk with `sync`, else left to a later `syncfs`.
    fn write_tmp_with(&self, data: &[u8], sync: bool) -> Result<PathBuf, BackendError> {
        let mut name = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut name);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.tmp", hex::encode(name)));
        let mut f =
            File::create(&tmp).map_err(|e| BackendError::io(tmp.display().to_string(), e))?;
        f.write_all(data)
            .and_then(|()| if sync { f.sync_data() } else { Ok(()) })
            .map_err(|e| BackendError::io(tmp.display().to_string(), e))?;
        if !sync {
            // Start writing it to disk now, without waiting (on Linux, "don't need" starts
            // writeback of dirty pages): the batch's `syncfs` then finds most of the batch
            // already written instead of all of it still to write. Failure is harmless.
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        }
        Ok(tmp)
    }

    /// Moves a flushed temporary file into place; returns the directory to flush.
    fn install(&self, tmp: &Path, dest: &Path) -> Result<PathBuf, BackendError> {
        let dir = dest
            .parent()
            .expect("object paths have a parent")
            .to_path_buf();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|e| BackendError::io(dir.display().to_string(), e))?;
            sync_dir(dir.parent().expect("fan-out directories have a parent"))?;
        }
        fs::rename(tmp, dest).map_err(|e| BackendError::io(dest.display().to_string(), e))?;
        Ok(dir)
    }

    fn write_file(&self, dest: &Path, data: &[u8]) -> Result<(), BackendError> {
        let tmp = self.write_tmp(data)?;
        let dir = self.install(&tmp, dest)?;
        sync_dir(&dir)
    }

    fn packs_dir(&self) -> PathBuf {
        self.root.join(PACKS)
    }

    /// Reads the indexes of packs this process has not seen yet, and forgets packs that are
    /// gone (written again by a delete, possibly in another process).
    fn refresh(&self) -> Result<(), BackendError> {
        let dir = self.packs_dir();
        let mut on_disk: HashSet<String> = HashSet::new();
        match fs::read_dir(&dir) {
            Ok(rd) => {
                for entry in rd {
                    let entry =
                        entry.map_err(|e| BackendError::io(dir.display().to_string(), e))?;
                    if let Some(name) = entry.file_name().to_str()
                        && name.ends_with(".pack")
                    {
                        on_disk.insert(name.to_string());
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(BackendError::io(dir.display().to_string(), e)),
        }
        let (new, gone): (Vec<String>, bool) = {
            let packs = self.packs.read().expect("not poisoned");
            let new = on_disk
                .iter()
                .filter(|n| !packs.files.contains_key(n.as_str()))
                .cloned()
                .collect();
            let gone = packs.files.keys().any(|n| !on_disk.contains(&**n));
            (new, gone)
        };
        if new.is_empty() && !gone {
            return Ok(());
        }
        let mut loaded = Vec::with_capacity(new.len());
        for name in new {
            let path = dir.join(&name);
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(BackendError::io(path.display().to_string(), e)),
            };
            let name = Arc::<str>::from(name);
            match pack::read(&file) {
                Ok((entries, how)) => {
                    let damage = (how == pack::Read::Scan).then(|| {
                        tracing::warn!(
                            pack = %path.display(),
                            records = entries.len(),
                            "pack index damaged or missing; its records were read one by one"
                        );
                        format!(
                            "index damaged or missing: {} records found by reading the pack, \
                             any after the damage are lost",
                            entries.len()
                        )
                    });
                    loaded.push((name, Arc::<[Entry]>::from(entries), damage));
                }
                Err(e) => {
                    tracing::warn!(pack = %path.display(), error = %e, "unreadable pack skipped");
                    loaded.push((name, Arc::from([]), Some(format!("unreadable: {e}"))));
                }
            }
        }
        let mut packs = self.packs.write().expect("not poisoned");
        if gone {
            let mut fresh = Packs::default();
            for (name, entries) in packs.files.drain() {
                if on_disk.contains(&*name) {
                    fresh.add(name, entries);
                }
            }
            fresh.damaged = std::mem::take(&mut packs.damaged);
            fresh.damaged.retain(|name, _| on_disk.contains(&**name));
            *packs = fresh;
        }
        for (name, entries, damage) in loaded {
            if !packs.files.contains_key(&name) {
                if let Some(why) = damage {
                    packs.damaged.insert(name.clone(), why);
                }
                packs.add(name, entries);
            }
        }
        Ok(())
    }

    fn packed(&self, key: &str) -> Option<Loc> {
        self.packs
            .read()
            .expect("not poisoned")
            .by_key
            .get(key)
            .cloned()
    }

    /// An object's bytes from its pack; `None` if the pack is gone.
    fn read_packed(&self, loc: &Loc) -> Result<Option<Bytes>, BackendError> {
        let path = self.packs_dir().join(&*loc.pack);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BackendError::io(path.display().to_string(), e)),
        };
        read_range(&file, loc.offset, loc.len)
            .map(|b| Some(Bytes::from(b)))
            .map_err(|e| BackendError::io(path.display().to_string(), e))
    }

    /// Writes `items` as one pack, durably, and indexes it.
    fn write_pack(&self, items: &[(String, Bytes)]) -> Result<(), BackendError> {
        let mut batch = PackBatch::new(self);
        for (key, data) in items {
            batch.add_record(key, data)?;
        }
        batch.finish_pack()
    }

    /// Deletes packed objects: every pack that holds one is written again without them (in
    /// packs of at most [`REWRITE_BYTES`]), then removed.
    fn delete_packed(&self, keys: &HashSet<&str>) -> Result<(), BackendError> {
        let _rewriting = self.rewriting.lock().expect("not poisoned");
        self.refresh()?;
        let victims: Vec<(Arc<str>, Arc<[Entry]>)> = self
            .packs
            .read()
            .expect("not poisoned")
            .files
            .iter()
            .filter(|(_, entries)| entries.iter().any(|e| keys.contains(e.key.as_str())))
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        if victims.is_empty() {
            return Ok(());
        }
        let dir = self.packs_dir();
        for (name, entries) in victims {
            let path = dir.join(&*name);
            let file =
                File::open(&path).map_err(|e| BackendError::io(path.display().to_string(), e))?;
            let mut items: Vec<(String, Bytes)> = Vec::new();
            let mut bytes = 0u64;
            for e in entries.iter().filter(|e| !keys.contains(e.key.as_str())) {
                let buf = read_range(&file, e.offset, e.len)
                    .map_err(|err| BackendError::io(path.display().to_string(), err))?;
                bytes += e.len;
                items.push((e.key.clone(), Bytes::from(buf)));
                if bytes >= REWRITE_BYTES {
                    self.write_pack(&std::mem::take(&mut items))?;
                    bytes = 0;
                }
            }
            if !items.is_empty() {
                self.write_pack(&items)?;
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(BackendError::io(path.display().to_string(), e)),
            }
            self.packs.write().expect("not poisoned").drop_pack(&name);
        }
        sync_dir(&dir)
    }

    /// Where an object's bytes are on disk, or `None` if it is not stored: for tools and
    /// tests that inspect or damage a store on purpose.
    pub fn locate(&self, key: &str) -> Result<Option<Location>, BackendError> {
        self.find(
            key,
            |path| {
                Ok(fs::metadata(path)
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| Location {
                        path: path.to_path_buf(),
                        offset: 0,
                        len: m.len(),
                    }))
            },
            |loc| {
                let pack = self.packs_dir().join(&*loc.pack);
                Ok(pack.is_file().then_some(Location {
                    path: pack,
                    offset: loc.offset,
                    len: loc.len,
                }))
            },
        )
    }

    /// Looks a key up: objects in the packs first (where nearly all of them are), other keys
    /// in their own file first (a file written after a pack replaces the packed value). If
    /// neither has it, the packs may have changed since they were read (a write or a delete by
    /// another process): they are read again, once.
    fn find<T>(
        &self,
        key: &str,
        loose: impl Fn(&Path) -> Result<Option<T>, BackendError>,
        packed: impl Fn(&Loc) -> Result<Option<T>, BackendError>,
    ) -> Result<Option<T>, BackendError> {
        let path = self.path(key)?;
        let object = object_name(key).is_some();
        for attempt in 0..2 {
            if !object && let Some(found) = loose(&path)? {
                return Ok(Some(found));
            }
            if let Some(loc) = self.packed(key)
                && let Some(found) = packed(&loc)?
            {
                return Ok(Some(found));
            }
            if object && let Some(found) = loose(&path)? {
                return Ok(Some(found));
            }
            if attempt == 0 {
                self.refresh()?;
            }
        }
        Ok(None)
    }

    /// Temporary files a crashed writer left behind.
    pub fn stale_tmp_files(&self) -> Result<Vec<PathBuf>, BackendError> {
        let dir = self.root.join("tmp");
        let rd = fs::read_dir(&dir).map_err(|e| BackendError::io(dir.display().to_string(), e))?;
        Ok(rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
    }

    /// Removes temporary files. Only safe while no writer is running.
    pub fn clean_tmp(&self) -> Result<usize, BackendError> {
        let stale = self.stale_tmp_files()?;
        for p in &stale {
            fs::remove_file(p).map_err(|e| BackendError::io(p.display().to_string(), e))?;
        }
        Ok(stale.len())
    }
}

/// Creates a store atomically: the layout is built in a hidden sibling folder and renamed
/// into place, so a crash leaves either no store or a whole one.
fn create(root: &Path) -> Result<(), BackendError> {
    let io = |p: &Path, e| BackendError::io(p.display().to_string(), e);
    if root.exists() {
        let mut entries = fs::read_dir(root).map_err(|e| io(root, e))?;
        if entries.next().is_some() {
            return Err(BackendError::Config(format!(
                "{} is not empty and is not a medledger store (no {MARKER} file)",
                root.display()
            )));
        }
    }
    let parent = match root.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
    let mut suffix = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!(".{name}.creating-{}", hex::encode(suffix)));
    for d in ["objects", PACKS, "refs", "tmp"] {
        fs::create_dir_all(staging.join(d)).map_err(|e| io(&staging, e))?;
    }
    let marker = staging.join(MARKER);
    File::create(&marker)
        .and_then(|mut f| {
            f.write_all(MARKER_TEXT.as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| io(&marker, e))?;
    for d in ["objects", PACKS, "refs", "tmp", ""] {
        sync_dir(&staging.join(d))?;
    }
    // Renaming onto an empty directory replaces it; onto a store another process has just
    // created, fails: then that store is used.
    if let Err(e) = fs::rename(&staging, root) {
        let _ = fs::remove_dir_all(&staging);
        if !root.join(MARKER).exists() {
            return Err(io(root, e));
        }
    }
    sync_dir(&parent)
}

/// Batches of at least this many objects are made durable with two `syncfs` calls (one
/// after writing the temporary files, one after moving them into place) instead of one flush
/// per file and per directory: the same guarantee (nothing is in place before its bytes are
/// on disk; everything is on disk when the batch returns) for far fewer device flushes.
const SYNCFS_BATCH: usize = 4;

/// Loose batches whose files average less than this are written by one thread.
const SMALL_BATCH: usize = 64 << 10;

/// A batch whose objects go into one pack as they come: each addition is written at once and
/// its writeback started, so the disk works while the writer prepares the next; the commit
/// adds the index, flushes the file once, and moves it into `packs/`. Other keys are written
/// at the commit, after the pack is durable.
struct PackBatch<'a> {
    backend: &'a FsBackend,
    pack: Option<OpenPack>,
    loose: Vec<(String, Bytes)>,
}

struct OpenPack {
    name: String,
    tmp: PathBuf,
    writer: pack::Writer<PackOut>,
}

/// Where a pack being written goes: [`CHUNK`]s written as they fill, with direct I/O where
/// the filesystem takes it. A pack is written once and read later, if at all; direct I/O
/// takes the bytes from these buffers to the disk without the copy into the page cache and
/// its per-page bookkeeping (as much CPU as sealing, on a put), and without the dirty pages
/// that throttle a long put once the kernel's share of memory for them is used up. Up to
/// [`IN_FLIGHT`] chunks are written at once, each by its own thread, so the disk has several
/// requests to work on while the next chunk fills. Where direct I/O is refused (some
/// filesystems refuse it at open, some at the first write), chunks go through the page
/// cache, one at a time, their writeback started at once.
struct PackOut {
    file: Arc<File>,
    direct: bool,
    /// The chunk being filled.
    chunk: Chunk,
    /// Buffers of chunks written, for the next ones.
    spare: Vec<Chunk>,
    /// Chunks being written: each comes back with where it went and how its write ended.
    in_flight: usize,
    done_tx: std::sync::mpsc::Sender<(Chunk, u64, std::io::Result<()>)>,
    done_rx: std::sync::mpsc::Receiver<(Chunk, u64, std::io::Result<()>)>,
    /// Where the chunk being filled goes in the file (a multiple of [`CHUNK`]).
    offset: u64,
}

/// Direct writes in flight at once, per pack.
const IN_FLIGHT: usize = 4;

/// A chunk's buffer: the bytes from `buf[lead..]`, whose start `lead` bytes of filler put on
/// an [`ALIGN`] boundary in memory.
struct Chunk {
    buf: Vec<u8>,
    lead: usize,
}

impl Chunk {
    fn new() -> Chunk {
        let mut buf = crate::pool::take(CHUNK + ALIGN);
        let lead = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        buf.resize(lead, 0);
        Chunk { buf, lead }
    }

    fn len(&self) -> usize {
        self.buf.len() - self.lead
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.lead..]
    }

    fn clear(&mut self) {
        self.buf.truncate(self.lead);
    }
}

fn is_einval(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

impl PackOut {
    fn create(path: &Path) -> std::io::Result<PackOut> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut open = fs::OpenOptions::new();
        open.write(true).create(true).truncate(true);
        let (file, direct) = match open
            .clone()
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(_) => (open.open(path)?, false),
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        Ok(PackOut {
            file: Arc::new(file),
            direct,
            chunk: Chunk::new(),
            spare: Vec::new(),
            in_flight: 0,
            done_tx,
            done_rx,
            offset: 0,
        })
    }

    /// Sends the filled chunk to be written and starts a new one.
    fn send_chunk(&mut self) -> std::io::Result<()> {
        let len = self.chunk.len();
        if len == 0 {
            return Ok(());
        }
        let fresh = match self.spare.pop() {
            Some(c) => c,
            None if self.direct && self.in_flight >= IN_FLIGHT => self.collect_one()?,
            None => Chunk::new(),
        };
        let mut chunk = std::mem::replace(&mut self.chunk, fresh);
        let at = self.offset;
        self.offset += len as u64;
        if !self.direct {
            self.write_buffered(&chunk, at)?;
            chunk.clear();
            self.spare.push(chunk);
            return Ok(());
        }
        // A last, partial chunk is padded to the alignment; `finish` cuts the file back.
        let padded = len.next_multiple_of(ALIGN);
        chunk.buf.resize(chunk.lead + padded, 0);
        let file = self.file.clone();
        let tx = self.done_tx.clone();
        std::thread::Builder::new()
            .name("pack-write".into())
            .spawn(move || {
                let r = file.write_all_at(chunk.bytes(), at);
                chunk.buf.truncate(chunk.lead + len);
                let _ = tx.send((chunk, at, r));
            })?;
        // Counted once its thread runs: every thread sends exactly one answer.
        self.in_flight += 1;
        Ok(())
    }

    /// Waits for one chunk being written; returns its buffer, emptied.
    fn collect_one(&mut self) -> std::io::Result<Chunk> {
        let (mut chunk, at, r) = self
            .done_rx
            .recv()
            .map_err(|_| std::io::Error::other("a pack write thread stopped"))?;
        self.in_flight -= 1;
        match r {
            Ok(()) => {}
            Err(e) if is_einval(&e) => {
                // Opened, but direct writes refused: through the page cache from here.
                if self.direct {
                    let flags = rustix::fs::fcntl_getfl(&*self.file)?;
                    rustix::fs::fcntl_setfl(&*self.file, flags - rustix::fs::OFlags::DIRECT)?;
                    self.direct = false;
                }
                self.write_buffered(&chunk, at)?;
            }
            Err(e) => return Err(e),
        }
        chunk.clear();
        Ok(chunk)
    }

    fn write_buffered(&self, chunk: &Chunk, at: u64) -> std::io::Result<()> {
        self.file.write_all_at(chunk.bytes(), at)?;
        // "Don't need" on dirty pages starts their writeback without waiting for it.
        let _ = rustix::fs::fadvise(
            &*self.file,
            at,
            std::num::NonZeroU64::new(chunk.len() as u64),
            rustix::fs::Advice::DontNeed,
        );
        Ok(())
    }

    /// Writes what is left, waits for every write, cuts off any padding and flushes the
    /// file.
    fn finish(mut self) -> std::io::Result<()> {
        self.send_chunk()?;
        let mut first_error = None;
        while self.in_flight > 0 {
            match self.collect_one() {
                Ok(c) => self.spare.push(c),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if self.file.metadata()?.len() != self.offset {
            self.file.set_len(self.offset)?;
        }
        self.file.sync_data()?;
        for c in self.spare.drain(..).chain([std::mem::replace(
            &mut self.chunk,
            Chunk {
                buf: Vec::new(),
                lead: 0,
            },
        )]) {
            crate::pool::give(c.buf);
        }
        Ok(())
    }
}

impl Write for PackOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK - self.chunk.len();
        let n = data.len().min(room);
        self.chunk.buf.extend_from_slice(&data[..n]);
        if n == room {
            self.send_chunk()?;
        }
        Ok(n)
    }

    /// Chunks are written as they fill; a partial one waits for more or for `finish`.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for PackOut {
    /// A pack given up on (an error, a batch dropped) waits for its writes before its file
    /// is removed.
    fn drop(&mut self) {
        while self.in_flight > 0 && self.done_rx.recv().is_ok() {
            self.in_flight -= 1;
        }
    }
}

impl<'a> PackBatch<'a> {
    fn new(backend: &'a FsBackend) -> PackBatch<'a> {
        PackBatch {
            backend,
            pack: None,
            loose: Vec::new(),
        }
    }

    fn open(&mut self) -> Result<&mut OpenPack, BackendError> {
        if self.pack.is_none() {
            let mut id = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut id);
            let name = format!("{}.pack", hex::encode(id));
            let tmp = self.backend.root.join("tmp").join(format!("{name}.tmp"));
            let io = |e| BackendError::io(tmp.display().to_string(), e);
            let out = PackOut::create(&tmp).map_err(io)?;
            let writer = pack::Writer::new(out);
            // From here on, a failure leaves the file for `Drop` to remove.
            self.pack = Some(OpenPack {
                name,
                tmp: tmp.clone(),
                writer: writer.map_err(|e| BackendError::io(tmp.display().to_string(), e))?,
            });
        }
        Ok(self.pack.as_mut().expect("just opened"))
    }

    fn add_record(&mut self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        let pack = self.open()?;
        pack.writer
            .add(key, data)
            .map_err(|e| BackendError::io(pack.tmp.display().to_string(), e))
    }

    /// Finishes the pack (if any object was added): durable, in place and indexed.
    fn finish_pack(&mut self) -> Result<(), BackendError> {
        let Some(pack) = self.pack.take() else {
            return Ok(());
        };
        let io = |p: &Path, e| BackendError::io(p.display().to_string(), e);
        if pack.writer.is_empty() {
            // Everything added was taken back.
            let _ = fs::remove_file(&pack.tmp);
            return Ok(());
        }
        let done = (|| {
            let (out, entries) = pack.writer.finish().map_err(|e| io(&pack.tmp, e))?;
            out.finish().map_err(|e| io(&pack.tmp, e))?;
            Ok::<_, BackendError>(entries)
        })();
        let entries = match done {
            Ok(entries) => entries,
            Err(e) => {
                let _ = fs::remove_file(&pack.tmp);
                return Err(e);
            }
        };
        let dir = self.backend.packs_dir();
        if !dir.is_dir() {
            // A store made before packs existed.
            fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            sync_dir(&self.backend.root)?;
        }
        let dest = dir.join(&pack.name);
        if let Err(e) = fs::rename(&pack.tmp, &dest) {
            let _ = fs::remove_file(&pack.tmp);
            return Err(io(&dest, e));
        }
        sync_dir(&dir)?;
        self.backend
            .packs
            .write()
            .expect("not poisoned")
            .add(Arc::from(pack.name), Arc::from(entries));
        Ok(())
    }
}

impl BatchWriter for PackBatch<'_> {
    fn add(&mut self, items: Vec<(String, Bytes)>) -> Result<(), BackendError> {
        for (key, data) in items {
            check_key(&key)?;
            if object_name(&key).is_some() {
                self.add_record(&key, &data)?;
            } else {
                self.loose.push((key, data));
            }
        }
        Ok(())
    }

    fn forget(&mut self, keys: &[String]) -> Result<(), BackendError> {
        let keys: HashSet<&str> = keys.iter().map(String::as_str).collect();
        self.loose.retain(|(k, _)| !keys.contains(k.as_str()));
        if let Some(pack) = self.pack.as_mut() {
            pack.writer.forget(&keys);
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<(), BackendError> {
        // Other keys (a new study's reference record) join the pack, after the objects they
        // name, unless a file of theirs exists: a file is read before the packs, so a new
        // value for it must be a file too.
        let mut loose = Vec::new();
        for (key, data) in std::mem::take(&mut self.loose) {
            if self.backend.path(&key)?.exists() {
                loose.push((key, data));
            } else {
                self.add_record(&key, &data)?;
            }
        }
        self.finish_pack()?;
        if loose.is_empty() {
            Ok(())
        } else {
            self.backend.put_batch(loose)
        }
    }
}

impl Drop for PackBatch<'_> {
    fn drop(&mut self) {
        if let Some(pack) = &self.pack {
            let _ = fs::remove_file(&pack.tmp);
        }
    }
}

/// Reads `len` bytes at `offset`, or fewer if the file has been cut short since its index was
/// read: a damaged object, which then fails verification, rather than an I/O error that would
/// hide which object it is.
/// Reads `len` bytes at `offset` (fewer if the file ends first) into a reused buffer, without
/// zeroing it first. Moves the file's position: callers do not share the `File` across threads.
fn read_range(mut file: &File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = crate::pool::take(usize::try_from(len).unwrap_or(usize::MAX));
    file.take(len).read_to_end(&mut buf)?;
    Ok(buf)
}

fn sync_fs(root: &Path) -> Result<(), BackendError> {
    File::open(root)
        .and_then(|d| rustix::fs::syncfs(&d).map_err(std::io::Error::from))
        .map_err(|e| BackendError::io(format!("flushing the file system of {}", root.display()), e))
}

fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackendError::io(format!("flushing directory {}", dir.display()), e))
}

impl Backend for FsBackend {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        let dest = self.path(key)?;
        self.write_file(&dest, &data)
    }

    fn put_batch(&self, items: Vec<(String, Bytes)>) -> Result<(), BackendError> {
        for (key, _) in &items {
            check_key(key)?;
        }
        let (packed, mut items): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|(key, _)| object_name(key).is_some());
        if packed.len() >= PACK_MIN {
            self.write_pack(&packed)?;
        } else {
            items.extend(packed);
        }
        if items.is_empty() {
            return Ok(());
        }
        let dests: Vec<PathBuf> = items
            .iter()
            .map(|(k, _)| self.path(k))
            .collect::<Result<_, _>>()?;
        if items.len() >= SYNCFS_BATCH {
            // Small files (reference records) one after another: creating files is bound by
            // the directory's lock and the inode allocator, and threads only contend for them.
            let small =
                items.iter().map(|(_, d)| d.len()).sum::<usize>() < SMALL_BATCH * items.len();
            let write = |(_, data): &(String, Bytes)| self.write_tmp_with(data, false);
            let tmps: Vec<PathBuf> = if small {
                items.iter().map(write).collect::<Result<_, _>>()?
            } else {
                self.pool
                    .install(|| items.par_iter().map(write).collect::<Result<_, _>>())?
            };
            sync_fs(&self.root)?;
            for (tmp, dest) in tmps.iter().zip(&dests) {
                self.install(tmp, dest)?;
            }
            return sync_fs(&self.root);
        }
        // Write and flush every temporary file, then move each into place, then flush each
        // directory once: the batch is durable when this returns.
        let tmps: Vec<PathBuf> = self.pool.install(|| {
            items
                .par_iter()
                .map(|(_, data)| self.write_tmp(data))
                .collect::<Result<_, _>>()
        })?;
        let dirs: Vec<PathBuf> = self.pool.install(|| {
            tmps.par_iter()
                .zip(&dests)
                .map(|(tmp, dest)| self.install(tmp, dest))
                .collect::<Result<_, _>>()
        })?;
        let dirs: BTreeSet<PathBuf> = dirs.into_iter().collect();
        self.pool
            .install(|| dirs.par_iter().try_for_each(|d| sync_dir(d)))
    }

    fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        let found = self.find(
            key,
            |path| match fs::read(path) {
                Ok(bytes) => Ok(Some(Bytes::from(bytes))),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(BackendError::io(path.display().to_string(), e)),
            },
            |loc| self.read_packed(loc),
        )?;
        found.ok_or_else(|| BackendError::NotFound(key.to_string()))
    }

    fn exists(&self, key: &str) -> Result<bool, BackendError> {
        Ok(self.locate(key)?.is_some())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackendError> {
        self.refresh()?;
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(BackendError::io(dir.display().to_string(), e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| BackendError::io(dir.display().to_string(), e))?;
                let path = entry.path();
                let ft = entry
                    .file_type()
                    .map_err(|e| BackendError::io(path.display().to_string(), e))?;
                if ft.is_dir() {
                    if path.parent() != Some(self.root.as_path())
                        || path.file_name().is_some_and(|n| n != "tmp" && n != PACKS)
                    {
                        stack.push(path);
                    }
                } else if let Some(key) = self.key_of(&path)
                    && key.starts_with(prefix)
                {
                    let len = entry
                        .metadata()
                        .map_err(|e| BackendError::io(path.display().to_string(), e))?
                        .len();
                    out.push((key, len));
                }
            }
        }
        let loose: HashSet<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        let packs = self.packs.read().expect("not poisoned");
        let packed: Vec<(String, u64)> = packs
            .by_key
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && !loose.contains(k.as_str()))
            .map(|(k, loc)| (k.clone(), loc.len))
            .collect();
        out.extend(packed);
        Ok(out)
    }

    fn batch(&self) -> Box<dyn BatchWriter + '_> {
        Box::new(PackBatch::new(self))
    }

    fn damage(&self) -> Result<Vec<(String, String)>, BackendError> {
        self.refresh()?;
        let packs = self.packs.read().expect("not poisoned");
        let mut out: Vec<(String, String)> = packs
            .damaged
            .iter()
            .map(|(name, why)| (format!("{PACKS}/{name}"), why.clone()))
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.delete_many(&[key.to_string()])
    }

    fn delete_many(&self, keys: &[String]) -> Result<(), BackendError> {
        let mut dirs = BTreeSet::new();
        for key in keys {
            let path = self.path(key)?;
            match fs::remove_file(&path) {
                Ok(()) => {
                    dirs.insert(
                        path.parent()
                            .expect("object paths have a parent")
                            .to_path_buf(),
                    );
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(BackendError::io(path.display().to_string(), e)),
            }
        }
        for dir in &dirs {
            sync_dir(dir)?;
        }
        let packed: HashSet<&str> = keys.iter().map(String::as_str).collect();
        if packed.is_empty() {
            return Ok(());
        }
        self.delete_packed(&packed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that tell every position apart, so a chunk written at the wrong offset shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect()
    }

    fn round_trip(dir: &Path) {
        for len in [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            CHUNK - 7,
            CHUNK,
            CHUNK + 12_345,
            3 * CHUNK + 1,
        ] {
            let path = dir.join(format!("pack-{len}"));
            let data = pattern(len);
            let mut out = PackOut::create(&path).unwrap();
            // In uneven pieces, as a pack's records come.
            for piece in data.chunks(1_000_003) {
                out.write_all(piece).unwrap();
            }
            out.finish().unwrap();
            let back = fs::read(&path).unwrap();
            assert_eq!(back.len(), len, "{}", path.display());
            assert!(back == data, "{} differs", path.display());
        }
    }

    #[test]
    fn a_pack_file_holds_exactly_what_was_written_at_any_length() {
        // On the disk the tests run on (direct I/O where it is taken) and, if this machine
        // has one, on a tmpfs.
        let dir = tempfile::tempdir().unwrap();
        round_trip(dir.path());
        if Path::new("/dev/shm").is_dir() {
            let shm = tempfile::tempdir_in("/dev/shm").unwrap();
            round_trip(shm.path());
        }
    }
}

//! The filesystem backend: one file per object, written crash-safely.
//!
//! A put writes a temporary file in `tmp/`, flushes it to disk (`fdatasync`), renames it into
//! place and flushes the directory, so after a crash an object is either whole or absent.
//! Objects fan out by the first two hex digits of their name (`objects/ab/ab12...`) to keep
//! directories small. Temporary files left by a crash are never read as objects; `verify`
//! counts them and `clean_tmp` removes them.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rand::RngCore;
use rayon::prelude::*;

use super::{Backend, BackendError, check_key};

const MARKER: &str = "MEDLEDGER-STORE";
const MARKER_TEXT: &str = "medledger object store, layout 1\n";

/// Threads that write and flush files at once: flushes wait on the disk, not the CPU, and
/// the disk merges concurrent flushes into fewer journal commits.
const IO_THREADS: usize = 16;

#[derive(Debug)]
pub struct FsBackend {
    root: PathBuf,
    pool: rayon::ThreadPool,
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
        Ok(FsBackend { root, pool })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, BackendError> {
        check_key(key)?;
        Ok(match key.strip_prefix("objects/") {
            Some(name) if !name.contains('/') && name.len() >= 2 => {
                self.root.join("objects").join(&name[..2]).join(name)
            }
            _ => self.root.join(key),
        })
    }

    fn key_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.root).ok()?;
        let parts: Vec<&str> = rel.iter().map(|s| s.to_str()).collect::<Option<_>>()?;
        match parts.as_slice() {
            ["objects", _, name] => Some(format!("objects/{name}")),
            ["tmp", ..] | [MARKER] => None,
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
    for d in ["objects", "refs", "tmp"] {
        fs::create_dir_all(staging.join(d)).map_err(|e| io(&staging, e))?;
    }
    // All 256 fan-out folders up front: a put never has to create (and flush) one.
    for i in 0..=255u8 {
        let d = staging.join("objects").join(format!("{i:02x}"));
        fs::create_dir(&d).map_err(|e| io(&d, e))?;
    }
    let marker = staging.join(MARKER);
    File::create(&marker)
        .and_then(|mut f| {
            f.write_all(MARKER_TEXT.as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| io(&marker, e))?;
    for d in ["objects", "refs", "tmp", ""] {
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

fn not_found(key: &str, e: std::io::Error, path: &Path) -> BackendError {
    if e.kind() == ErrorKind::NotFound {
        BackendError::NotFound(key.to_string())
    } else {
        BackendError::io(path.display().to_string(), e)
    }
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
        let dests: Vec<PathBuf> = items
            .iter()
            .map(|(k, _)| self.path(k))
            .collect::<Result<_, _>>()?;
        if items.len() >= SYNCFS_BATCH {
            let tmps: Vec<PathBuf> = self.pool.install(|| {
                items
                    .par_iter()
                    .map(|(_, data)| self.write_tmp_with(data, false))
                    .collect::<Result<_, _>>()
            })?;
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
        let path = self.path(key)?;
        fs::read(&path)
            .map(Bytes::from)
            .map_err(|e| not_found(key, e, &path))
    }

    fn exists(&self, key: &str) -> Result<bool, BackendError> {
        Ok(self.path(key)?.is_file())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackendError> {
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
                    if path.file_name().is_some_and(|n| n != "tmp") {
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
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().expect("object paths have a parent")),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io(path.display().to_string(), e)),
        }
    }
}

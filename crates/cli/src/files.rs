//! Files in and out: finding inputs under folders, and crash-safe writes.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Every regular file under `inputs` (files as given, folders recursively), sorted so that
/// runs are repeatable. Hidden files and folders are skipped.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input)
            .with_context(|| format!("cannot read input {}", input.display()))?;
        if meta.is_file() {
            files.push(input.clone());
            continue;
        }
        if !meta.is_dir() {
            bail!("input {} is neither a file nor a folder", input.display());
        }
        for entry in walkdir::WalkDir::new(input)
            .follow_links(true)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'))
        {
            let entry =
                entry.with_context(|| format!("cannot walk input folder {}", input.display()))?;
            if entry.file_type().is_file() {
                files.push(entry.into_path());
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Writes `bytes` to `path` so that a reader never sees a partial file and a completed write
/// survives a crash: write a temporary file beside it, fsync, rename, fsync the folder.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, true, false)
}

/// Like [`write_atomically`], for secrets: the file is readable by its owner only from the
/// moment it is created.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, true, true)
}

/// Like [`write_atomically`] but without the two fsyncs: for batches that make everything
/// durable at once with [`sync_filesystem`] before reporting success, which costs one flush
/// instead of two per file.
pub fn write_atomically_unsynced(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, false, false)
}

/// Flushes everything written to the file system holding `dir` (syncfs).
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    let f = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    rustix::fs::syncfs(&f).with_context(|| format!("cannot flush {} to disk", dir.display()))
}

fn write_file(path: &Path, bytes: &[u8], durable: bool, secret: bool) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent folder", path.display()))?;
    // A bare file name lives in the current folder.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = secret;
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_data()?;
        } else {
            start_writeback(&f);
        }
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Asks the kernel to start writing `f` to disk now, without waiting: a batch flushed at the
/// end (`sync_filesystem`) then finds most of its data already written, instead of all of it
/// still to write after the last file.
fn start_writeback(f: &File) {
    // On Linux, "don't need" starts writeback of the file's dirty pages (and drops the clean
    // ones from the cache, which a written-once output does not miss). Failure is harmless:
    // the final flush writes whatever this did not.
    let _ = rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed);
}

/// Whether a file looks like DICOM at all (so that README files and the like in an input
/// folder are skipped, not reported as failures): a `DICM` marker, a `.dcm` name, or a first
/// tag in group 0002 or 0008 as a bare data set starts with.
pub fn looks_like_dicom(path: &Path, head: &[u8]) -> bool {
    if head.len() >= 132 && &head[128..132] == b"DICM" {
        return true;
    }
    if head.starts_with(b"DICM") {
        return true;
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if matches!(ext.as_str(), "dcm" | "dicom" | "dic") {
        return true;
    }
    if head.len() >= 4 {
        let le = u16::from_le_bytes([head[0], head[1]]);
        let be = u16::from_be_bytes([head[0], head[1]]);
        return matches!(le, 0x0002 | 0x0008) || matches!(be, 0x0002 | 0x0008);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c.dcm");
        write_atomically(&p, b"one").unwrap();
        write_atomically(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn collects_recursively_sorted_without_hidden() {
        let dir = tempfile::tempdir().unwrap();
        for p in ["b/2", "a/1", ".hidden/3", "a/.x"] {
            let p = dir.path().join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"x").unwrap();
        }
        let files = collect_inputs(&[dir.path().to_path_buf()]).unwrap();
        let rel: Vec<_> = files
            .iter()
            .map(|f| {
                f.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .to_string()
            })
            .collect();
        assert_eq!(rel, vec!["a/1", "b/2"]);
        assert!(collect_inputs(&[dir.path().join("missing")]).is_err());
    }

    #[test]
    fn dicom_sniffing() {
        let mut part10 = vec![0u8; 132];
        part10[128..].copy_from_slice(b"DICM");
        assert!(looks_like_dicom(Path::new("x"), &part10));
        assert!(looks_like_dicom(Path::new("x.DCM"), b""));
        assert!(looks_like_dicom(Path::new("x"), &[0x08, 0x00, 0x05, 0x00]));
        assert!(!looks_like_dicom(Path::new("MANIFEST.tsv"), b"path\tparse"));
    }
}

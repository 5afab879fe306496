//! Pack files: many write-once objects in one file, so a batch of objects costs one file
//! creation and one flush instead of one of each per object.
//!
//! Format (all integers little-endian):
//!
//! ```text
//! pack    = "MLPACK\0\x01" record* index trailer
//! record  = 'R' key_len:u16 key data_len:u64 data
//! index   = 'I' count:u32 (key_len:u16 key offset:u64 len:u64){count}
//! trailer = index_len:u64 blake3(index):[u8; 32] "MLPKIDX1"
//! ```
//!
//! `offset` is where an object's data starts in the file. The index lets a reader learn a
//! pack's contents with two reads; it is checked against its digest and against the file's
//! length, and when it fails either check (a damaged or cut-off pack) the records are read
//! from the start instead, so every object before the damage is still found. A record cut off
//! by the end of the file is kept with the bytes that remain, so a reader sees a damaged
//! object (which fails verification) rather than a missing one.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use medledger_crypto::Digest;

use super::check_key;

const MAGIC: &[u8; 8] = b"MLPACK\0\x01";
const TRAILER_MAGIC: &[u8; 8] = b"MLPKIDX1";
const TRAILER_LEN: u64 = 8 + 32 + 8;
const RECORD: u8 = b'R';
const INDEX: u8 = b'I';
/// Keys are short (`objects/` and 64 hex digits); anything longer is damage.
const MAX_KEY: usize = 1024;

/// Where one object's bytes are in a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub key: String,
    pub offset: u64,
    pub len: u64,
}

/// How a pack's contents were learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Read {
    /// From its index: the pack is whole.
    Index,
    /// By reading its records: the index was damaged or missing.
    Scan,
}

/// Writes a pack record by record; [`Writer::finish`] adds the index and trailer.
pub(super) struct Writer<W: Write> {
    out: W,
    pos: u64,
    entries: Vec<Entry>,
    head: Vec<u8>,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W) -> io::Result<Writer<W>> {
        out.write_all(MAGIC)?;
        Ok(Writer {
            out,
            pos: MAGIC.len() as u64,
            entries: Vec::new(),
            head: Vec::new(),
        })
    }

    pub fn add(&mut self, key: &str, data: &[u8]) -> io::Result<()> {
        self.head.clear();
        self.head.push(RECORD);
        self.head.extend_from_slice(&key_len(key)?.to_le_bytes());
        self.head.extend_from_slice(key.as_bytes());
        self.head
            .extend_from_slice(&(data.len() as u64).to_le_bytes());
        self.out.write_all(&self.head)?;
        self.pos += self.head.len() as u64;
        self.entries.push(Entry {
            key: key.to_string(),
            offset: self.pos,
            len: data.len() as u64,
        });
        self.out.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    /// Leaves these keys out of the index: their records stay in the file as dead bytes,
    /// invisible to readers of the index.
    pub fn forget(&mut self, keys: &std::collections::HashSet<&str>) {
        self.entries.retain(|e| !keys.contains(e.key.as_str()));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the index and trailer; returns the output and the entries.
    pub fn finish(mut self) -> io::Result<(W, Vec<Entry>)> {
        let count = u32::try_from(self.entries.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "too many objects for a pack")
        })?;
        let mut index = vec![INDEX];
        index.extend_from_slice(&count.to_le_bytes());
        for e in &self.entries {
            index.extend_from_slice(&key_len(&e.key)?.to_le_bytes());
            index.extend_from_slice(e.key.as_bytes());
            index.extend_from_slice(&e.offset.to_le_bytes());
            index.extend_from_slice(&e.len.to_le_bytes());
        }
        self.out.write_all(&index)?;
        self.out.write_all(&(index.len() as u64).to_le_bytes())?;
        self.out.write_all(Digest::of(&index).as_bytes())?;
        self.out.write_all(TRAILER_MAGIC)?;
        Ok((self.out, self.entries))
    }
}

fn key_len(key: &str) -> io::Result<u16> {
    match u16::try_from(key.len()) {
        Ok(n) if key.len() <= MAX_KEY => Ok(n),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("key of {} bytes is too long for a pack", key.len()),
        )),
    }
}

/// Learns what a pack holds: from its index if it is intact, else by reading its records.
/// An error only if the file cannot be read at all or does not start like a pack.
pub(super) fn read(file: &File) -> io::Result<(Vec<Entry>, Read)> {
    let len = file.metadata()?.len();
    if let Some(entries) = read_index(file, len)? {
        return Ok((entries, Read::Index));
    }
    Ok((scan(file, len)?, Read::Scan))
}

fn read_index(file: &File, len: u64) -> io::Result<Option<Vec<Entry>>> {
    if len < MAGIC.len() as u64 + TRAILER_LEN {
        return Ok(None);
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    file.read_exact_at(&mut trailer, len - TRAILER_LEN)?;
    if &trailer[40..] != TRAILER_MAGIC {
        return Ok(None);
    }
    let index_len = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    let records_end = match (len - TRAILER_LEN).checked_sub(index_len) {
        Some(end) if end >= MAGIC.len() as u64 => end,
        _ => return Ok(None),
    };
    let mut index = vec![0u8; index_len as usize];
    file.read_exact_at(&mut index, records_end)?;
    if Digest::of(&index).as_bytes()[..] != trailer[8..40] {
        return Ok(None);
    }
    Ok(parse_index(&index, records_end))
}

fn parse_index(index: &[u8], records_end: u64) -> Option<Vec<Entry>> {
    let mut r = Reader(index);
    if r.u8()? != INDEX {
        return None;
    }
    let count = r.u32()?;
    let mut entries = Vec::with_capacity(count.min(1 << 20) as usize);
    for _ in 0..count {
        let key = r.key()?;
        let offset = r.u64()?;
        let len = r.u64()?;
        if offset.checked_add(len)? > records_end {
            return None;
        }
        entries.push(Entry { key, offset, len });
    }
    r.0.is_empty().then_some(entries)
}

/// Reads records from the start until the end, the index, or the first damaged header.
fn scan(file: &File, len: u64) -> io::Result<Vec<Entry>> {
    let mut magic = [0u8; 8];
    if len < 8 || {
        file.read_exact_at(&mut magic, 0)?;
        &magic != MAGIC
    } {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a pack file (bad magic)",
        ));
    }
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    let mut pos = 8u64;
    let mut head = vec![0u8; 3 + MAX_KEY + 8];
    while pos < len {
        let avail = (len - pos).min(head.len() as u64) as usize;
        file.read_exact_at(&mut head[..avail], pos)?;
        let mut r = Reader(&head[..avail]);
        if r.u8() != Some(RECORD) {
            break;
        }
        let (Some(key), Some(data_len)) = (r.key(), r.u64()) else {
            break;
        };
        let offset = pos + (avail - r.0.len()) as u64;
        let have = data_len.min(len - offset);
        if seen.insert(key.clone()) {
            entries.push(Entry {
                key,
                offset,
                len: have,
            });
        }
        pos = offset + have;
    }
    Ok(entries)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn key(&mut self) -> Option<String> {
        let n = self
            .take(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)?;
        if n > MAX_KEY {
            return None;
        }
        let key = std::str::from_utf8(self.take(n)?).ok()?.to_string();
        check_key(&key).ok()?;
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn items() -> Vec<(String, Bytes)> {
        (0..5u8)
            .map(|i| {
                (
                    format!("objects/{i:02x}{}", "0".repeat(62)),
                    Bytes::from(vec![i; 1000 * i as usize]),
                )
            })
            .collect()
    }

    fn packed(items: &[(String, Bytes)]) -> (tempfile::NamedTempFile, Vec<Entry>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut w = Writer::new(f.as_file_mut()).unwrap();
        for (key, data) in items {
            w.add(key, data).unwrap();
        }
        let (_, entries) = w.finish().unwrap();
        (f, entries)
    }

    fn data(f: &File, e: &Entry) -> Vec<u8> {
        let mut b = vec![0u8; e.len as usize];
        f.read_exact_at(&mut b, e.offset).unwrap();
        b
    }

    #[test]
    fn a_whole_pack_is_read_from_its_index() {
        let items = items();
        let (f, written) = packed(&items);
        let (entries, how) = read(f.as_file()).unwrap();
        assert_eq!(how, Read::Index);
        assert_eq!(entries, written);
        for ((key, value), e) in items.iter().zip(&entries) {
            assert_eq!(&e.key, key);
            assert_eq!(data(f.as_file(), e), value.to_vec());
        }
    }

    #[test]
    fn a_damaged_index_falls_back_to_the_records() {
        let items = items();
        let (f, written) = packed(&items);
        let len = f.as_file().metadata().unwrap().len();
        // A flipped bit in the index: its digest no longer matches.
        let mut b = [0u8; 1];
        let at = written.last().unwrap().offset + written.last().unwrap().len + 10;
        f.as_file().read_exact_at(&mut b, at).unwrap();
        f.as_file().write_all_at(&[b[0] ^ 1], at).unwrap();
        let (entries, how) = read(f.as_file()).unwrap();
        assert_eq!((entries, how), (written.clone(), Read::Scan));
        // Cut off in the middle of the fourth object: three whole, one short, one gone.
        let cut = written[3].offset + written[3].len / 2;
        f.as_file().set_len(cut).unwrap();
        assert!(cut < len);
        let (entries, how) = read(f.as_file()).unwrap();
        assert_eq!(how, Read::Scan);
        assert_eq!(entries[..3], written[..3]);
        assert_eq!(entries[3].key, written[3].key);
        assert_eq!(entries[3].len, written[3].len / 2);
        assert_eq!(entries.len(), 4);
    }

    #[test]
    fn a_file_that_is_not_a_pack_is_an_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().write_all_at(b"hello, not a pack", 0).unwrap();
        assert!(read(f.as_file()).is_err());
        // An empty pack (no objects) is valid.
        let (f, written) = packed(&[]);
        assert!(written.is_empty());
        assert_eq!(read(f.as_file()).unwrap(), (vec![], Read::Index));
    }
}

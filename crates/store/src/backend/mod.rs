//! Where sealed objects live. Every backend stores opaque bytes under keys and passes the
//! same conformance suite ([`conformance`]); the store above never depends on which one.

mod fs;
mod pack;
mod s3;

pub mod conformance;

use std::fmt;

use bytes::Bytes;

pub use fs::{FsBackend, Location};
pub use s3::{S3Backend, S3Config};

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}: no such object")]
    NotFound(String),
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("object store: {0}")]
    Remote(String),
    #[error("{0}")]
    Config(String),
}

impl BackendError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> BackendError {
        BackendError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, BackendError::NotFound(_))
    }
}

/// Bytes under keys. Keys are `/`-separated segments of `[a-z0-9._-]`.
///
/// Contract, checked by [`conformance::run`]:
/// - `put` returns only once the object is durable, and an object is never visible partly
///   written: a reader sees the whole old value, the whole new value, or nothing;
/// - `put_batch` returns only once every object of the batch is durable;
/// - `get` of a missing key is [`BackendError::NotFound`];
/// - `list(prefix)` returns every key under the prefix with its size, in no set order;
/// - `delete` of a missing key succeeds;
/// - keys under `objects/` are content-addressed and written once: a key written again gets
///   the same bytes, so a backend may keep them in packs (the filesystem does) and need not
///   say which of two writes of one key a reader sees.
///
/// Calls block; backends that talk to a network run their own runtime, so they may be called
/// from any thread (an async caller uses `spawn_blocking`).
pub trait Backend: Send + Sync + fmt::Debug {
    /// Where the objects are, for messages.
    fn describe(&self) -> String;
    fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError>;
    fn put_batch(&self, items: Vec<(String, Bytes)>) -> Result<(), BackendError> {
        for (k, v) in items {
            self.put(&k, v)?;
        }
        Ok(())
    }
    fn get(&self, key: &str) -> Result<Bytes, BackendError>;
    fn exists(&self, key: &str) -> Result<bool, BackendError> {
        match self.get(key) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackendError>;
    fn delete(&self, key: &str) -> Result<(), BackendError>;
    /// Starts a batch filled over time (by a writer that produces objects while earlier ones
    /// are written) and made durable all at once by [`BatchWriter::commit`]. By default each
    /// addition is a [`Backend::put_batch`].
    fn batch(&self) -> Box<dyn BatchWriter + '_> {
        Box::new(EachAdd(self))
    }
    /// Damage the backend found in its own structures, as (what, why): on the filesystem,
    /// packs whose index is damaged or that cannot be read. For `verify` to report; objects
    /// themselves are checked against their addresses by the store.
    fn damage(&self) -> Result<Vec<(String, String)>, BackendError> {
        Ok(Vec::new())
    }
    /// Deletes several keys; a backend may do it in fewer steps than one delete each.
    fn delete_many(&self, keys: &[String]) -> Result<(), BackendError> {
        keys.iter().try_for_each(|k| self.delete(k))
    }
}

/// Writes added over time, durable once [`BatchWriter::commit`] returns. Until then nothing
/// added need be durable or visible; after an error, or when the writer is dropped without a
/// commit, any of it may be absent. Nothing is durable before what was added ahead of it.
pub trait BatchWriter: Send {
    fn add(&mut self, items: Vec<(String, Bytes)>) -> Result<(), BackendError>;
    /// Takes back keys added and not committed: they are not stored (a backend that wrote
    /// them already deletes them).
    fn forget(&mut self, keys: &[String]) -> Result<(), BackendError>;
    fn commit(self: Box<Self>) -> Result<(), BackendError>;
}

struct EachAdd<'a, B: ?Sized>(&'a B);

impl<B: Backend + ?Sized> BatchWriter for EachAdd<'_, B> {
    fn add(&mut self, items: Vec<(String, Bytes)>) -> Result<(), BackendError> {
        self.0.put_batch(items)
    }
    fn forget(&mut self, keys: &[String]) -> Result<(), BackendError> {
        self.0.delete_many(keys)
    }
    fn commit(self: Box<Self>) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Checks a key: non-empty segments of lowercase ASCII letters, digits, `.`, `_`, `-`.
pub fn check_key(key: &str) -> Result<(), BackendError> {
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
        });
    if ok {
        Ok(())
    } else {
        Err(BackendError::InvalidKey(key.to_string()))
    }
}

/// Opens a backend from a location: `s3://bucket/prefix` (configured from the usual `AWS_*`
/// environment variables) or a directory, created if missing.
pub fn open(location: &str) -> Result<Box<dyn Backend>, BackendError> {
    if location.starts_with("s3://") {
        Ok(Box::new(S3Backend::from_url(location)?))
    } else {
        Ok(Box::new(FsBackend::open(location)?))
    }
}

/// Like [`open`], but a directory must already be a store: for readers, which must not
/// create an empty store where they expected one.
pub fn open_existing(location: &str) -> Result<Box<dyn Backend>, BackendError> {
    if location.starts_with("s3://") {
        Ok(Box::new(S3Backend::from_url(location)?))
    } else {
        Ok(Box::new(FsBackend::open_existing(location)?))
    }
}

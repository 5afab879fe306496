//! A bounded cache of objects already read, decrypted and verified, or just sealed from their
//! plaintext, for a long-running reader (a node serving a viewer reads the same study's
//! objects many times in a short while, and mostly the studies it has just received).
//!
//! An entry is the plaintext of one object together with the whole [`ObjectRef`] it was
//! verified against (or sealed under: the reference is the one sealing made); a lookup hits
//! only for an equal reference (same address, key, digest and length), so a reference that
//! would fail verification on the store never hits. Objects are content-addressed and never
//! change; the one way an entry can go stale is the object's deletion, and [`crate::Store`]
//! clears the cache whenever it deletes objects. The cache holds plaintext in this process's
//! memory only, never on disk.
//!
//! Least recently used entries go first once the byte budget is spent; an object larger than
//! an eighth of the budget is not kept, so one large multi-frame object cannot flush a study.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use medledger_crypto::Digest;

use crate::manifest::ObjectRef;

/// How often the cache served or missed, and what it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub entries: u64,
}

pub struct ObjectCache {
    capacity: u64,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Digest, Entry>,
    /// Entries by last use, oldest first.
    by_use: BTreeMap<u64, Digest>,
    clock: u64,
    bytes: u64,
}

struct Entry {
    object: ObjectRef,
    plain: Bytes,
    used: u64,
}

impl std::fmt::Debug for ObjectCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectCache")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ObjectCache {
    /// A cache of at most `capacity` bytes of plaintext.
    pub fn new(capacity: u64) -> ObjectCache {
        ObjectCache {
            capacity,
            inner: Mutex::new(Inner::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The verified plaintext of `object`, if it is cached under exactly that reference.
    pub fn get(&self, object: &ObjectRef) -> Option<Bytes> {
        let mut inner = self.inner.lock().expect("not poisoned");
        let Inner {
            entries,
            by_use,
            clock,
            ..
        } = &mut *inner;
        let found = match entries.get_mut(&object.address) {
            Some(e) if e.object == *object => {
                *clock += 1;
                by_use.remove(&e.used);
                e.used = *clock;
                by_use.insert(e.used, object.address);
                Some(e.plain.clone())
            }
            _ => None,
        };
        drop(inner);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `plain`, which the caller has verified against `object`.
    pub fn insert(&self, object: &ObjectRef, plain: Bytes) {
        let len = plain.len() as u64;
        if len > self.capacity / 8 {
            return;
        }
        let mut inner = self.inner.lock().expect("not poisoned");
        let inner = &mut *inner;
        inner.clock += 1;
        let used = inner.clock;
        if let Some(old) = inner.entries.insert(
            object.address,
            Entry {
                object: object.clone(),
                plain,
                used,
            },
        ) {
            inner.by_use.remove(&old.used);
            inner.bytes -= old.plain.len() as u64;
        }
        inner.by_use.insert(used, object.address);
        inner.bytes += len;
        while inner.bytes > self.capacity {
            let Some((_, oldest)) = inner.by_use.pop_first() else {
                break;
            };
            if let Some(e) = inner.entries.remove(&oldest) {
                inner.bytes -= e.plain.len() as u64;
            }
        }
    }

    /// Forgets the objects at `addresses` (of a version that will not be written).
    pub fn remove(&self, addresses: &[Digest]) {
        let mut inner = self.inner.lock().expect("not poisoned");
        for a in addresses {
            if let Some(e) = inner.entries.remove(a) {
                inner.by_use.remove(&e.used);
                inner.bytes -= e.plain.len() as u64;
            }
        }
    }

    /// Forgets everything (after objects were deleted).
    pub fn clear(&self) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.entries.clear();
        inner.by_use.clear();
        inner.bytes = 0;
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.inner.lock().expect("not poisoned");
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: inner.bytes,
            entries: inner.entries.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medledger_crypto::ObjectKey;

    fn object(n: u8, len: usize) -> (ObjectRef, Bytes) {
        let plain = Bytes::from(vec![n; len]);
        let r = ObjectRef {
            address: Digest::of(&[n, 0xff]),
            digest: Digest::of(&plain),
            len: len as u64,
            key: ObjectKey::from_bytes([n; 32]),
        };
        (r, plain)
    }

    #[test]
    fn a_hit_needs_the_same_reference_not_only_the_same_address() {
        let cache = ObjectCache::new(1 << 20);
        let (r, plain) = object(1, 100);
        cache.insert(&r, plain.clone());
        assert_eq!(cache.get(&r), Some(plain));
        let mut other_key = r.clone();
        other_key.key = ObjectKey::from_bytes([9; 32]);
        assert_eq!(cache.get(&other_key), None);
        let mut other_digest = r.clone();
        other_digest.digest = Digest::of(b"something else");
        assert_eq!(cache.get(&other_digest), None);
        let mut other_len = r.clone();
        other_len.len = 99;
        assert_eq!(cache.get(&other_len), None);
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 1,
                misses: 3,
                bytes: 100,
                entries: 1
            }
        );
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_budget_holds() {
        let cache = ObjectCache::new(1000);
        let objects: Vec<_> = (0..4).map(|n| object(n, 100)).collect();
        for (r, p) in &objects {
            cache.insert(r, p.clone());
        }
        // 0 is used again, so 1 is now the oldest.
        assert!(cache.get(&objects[0].0).is_some());
        for n in 4..11 {
            let (r, p) = object(n, 100);
            cache.insert(&r, p);
        }
        let s = cache.stats();
        assert!(s.bytes <= 1000, "{s:?}");
        assert_eq!(s.entries, 10);
        assert!(cache.get(&objects[0].0).is_some(), "used recently, kept");
        assert!(cache.get(&objects[1].0).is_none(), "oldest, evicted");
        // Too large for the cache: not kept, and nothing else is pushed out for it.
        let (big, p) = object(50, 200);
        cache.insert(&big, p);
        assert!(cache.get(&big).is_none());
        assert_eq!(cache.stats().entries, 10);
        cache.clear();
        assert_eq!(cache.stats().bytes, 0);
        assert!(cache.get(&objects[0].0).is_none());
    }
}

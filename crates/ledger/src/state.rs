//! The ledger's state: an ordered map from keys to canonical JSON values, with a Merkle root
//! over all entries and a proof of any entry's value against it.
//!
//! The root is kept up to date on every write, in O(bucket + 16) hashes rather than a pass
//! over the whole state: each key falls into one of 2^16 buckets by the first 16 bits of its
//! BLAKE3 digest; a bucket's root is the RFC 9162 Merkle root of its leaves in key order; the
//! state root is the (perfect) RFC 9162 tree over the 2^16 bucket roots, an empty bucket's root
//! being the hash of nothing. A proof is an audit path inside the bucket and one of 16 hashes
//! from the bucket to the root.

use std::collections::BTreeMap;

use medledger_crypto::{Digest, merkle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const BUCKET_BITS: u32 = 16;
/// Number of buckets.
pub const BUCKETS: usize = 1 << BUCKET_BITS;

/// Keys and values; ordered, so that iteration and the root are the same on every machine.
#[derive(Debug, Clone, Default)]
pub struct State {
    entries: BTreeMap<String, Vec<u8>>,
    /// Per bucket, its leaf hashes in key order (allocated on the first write).
    buckets: Vec<BTreeMap<String, Digest>>,
    /// The tree over bucket roots as an array: `tree[1]` is the root, `tree[BUCKETS + b]` the
    /// root of bucket `b`, node `i`'s children are `2i` and `2i + 1`.
    tree: Vec<Digest>,
}

impl PartialEq for State {
    fn eq(&self, other: &State) -> bool {
        self.entries == other.entries
    }
}

impl Eq for State {}

fn leaf(key: &str, value: &[u8]) -> Digest {
    let mut data = Vec::with_capacity(8 + key.len() + value.len());
    data.extend_from_slice(&(key.len() as u32).to_be_bytes());
    data.extend_from_slice(key.as_bytes());
    data.extend_from_slice(value);
    merkle::leaf_hash(&data)
}

fn bucket_of(key: &str) -> usize {
    let d = Digest::of(key.as_bytes());
    (usize::from(d.0[0]) << 8) | usize::from(d.0[1])
}

/// The tree over `BUCKETS` empty buckets.
fn empty_tree() -> Vec<Digest> {
    let mut tree = vec![Digest::of(&[]); 2 * BUCKETS];
    let mut width = BUCKETS / 2;
    while width >= 1 {
        let h = merkle::node_hash(&tree[2 * width], &tree[2 * width + 1]);
        tree[width..2 * width].fill(h);
        width /= 2;
    }
    tree
}

impl State {
    pub fn get_raw(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.entries
            .get(key)
            .map(|v| serde_json::from_slice(v).expect("state holds only values it wrote"))
    }

    pub fn put<T: Serialize>(&mut self, key: String, value: &T) {
        let bytes = serde_json::to_vec(value).expect("state values serialise");
        if self.tree.is_empty() {
            self.buckets = vec![BTreeMap::new(); BUCKETS];
            self.tree = empty_tree();
        }
        let b = bucket_of(&key);
        self.buckets[b].insert(key.clone(), leaf(&key, &bytes));
        self.entries.insert(key, bytes);
        let leaves: Vec<Digest> = self.buckets[b].values().copied().collect();
        let mut i = BUCKETS + b;
        self.tree[i] = merkle::root(&leaves);
        while i > 1 {
            i /= 2;
            self.tree[i] = merkle::node_hash(&self.tree[2 * i], &self.tree[2 * i + 1]);
        }
    }

    /// Values of every key under `prefix`, in key order.
    pub fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Vec<T> {
        self.entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| serde_json::from_slice(v).expect("state holds only values it wrote"))
            .collect()
    }

    /// Keys under `prefix`, in order.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The state root (see the module documentation).
    pub fn root(&self) -> Digest {
        match self.tree.get(1) {
            Some(r) => *r,
            None => empty_tree()[1],
        }
    }

    /// A proof of `key`'s current value, or `None` if the key is absent.
    pub fn prove(&self, key: &str) -> Option<StateProof> {
        let value = self.entries.get(key)?;
        let b = bucket_of(key);
        let bucket = &self.buckets[b];
        let index = bucket.keys().position(|k| k == key)?;
        let leaves: Vec<Digest> = bucket.values().copied().collect();
        let mut top_path = Vec::with_capacity(BUCKET_BITS as usize);
        let mut i = BUCKETS + b;
        while i > 1 {
            top_path.push(self.tree[i ^ 1]);
            i /= 2;
        }
        Some(StateProof {
            key: key.to_string(),
            value: String::from_utf8_lossy(value).into_owned(),
            bucket: b as u64,
            index: index as u64,
            size: leaves.len() as u64,
            path: merkle::audit_path(&leaves, index),
            top_path,
        })
    }
}

/// That `key` held `value` in the state with a given root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateProof {
    pub key: String,
    /// The value as stored (canonical JSON).
    pub value: String,
    /// The key's bucket, its position and the bucket's size, and the audit path in the bucket.
    pub bucket: u64,
    pub index: u64,
    pub size: u64,
    pub path: Vec<Digest>,
    /// The audit path from the bucket's root to the state root.
    pub top_path: Vec<Digest>,
}

impl StateProof {
    pub fn verify(&self, root: &Digest) -> bool {
        if self.bucket != bucket_of(&self.key) as u64 {
            return false;
        }
        merkle::root_from_path(
            leaf(&self.key, self.value.as_bytes()),
            self.index,
            self.size,
            &self.path,
        )
        .is_some_and(|b| merkle::verify(b, self.bucket, BUCKETS as u64, &self.top_path, root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The incrementally kept root is the RFC 9162 root over the bucket roots, recomputed from
    /// scratch; every key's proof verifies and a changed value's does not.
    #[test]
    fn incremental_root_matches_a_full_recomputation() {
        let mut s = State::default();
        let empty = s.root();
        for i in 0..3000u32 {
            s.put(format!("k/{}", i * 7919 % 1000), &i); // overwrites as well as inserts
        }
        assert_ne!(s.root(), empty);
        let mut bucket_roots = vec![Digest::of(&[]); BUCKETS];
        for (b, leaves) in s.buckets.iter().enumerate() {
            let l: Vec<Digest> = leaves.values().copied().collect();
            bucket_roots[b] = merkle::root(&l);
        }
        assert_eq!(s.root(), merkle::root(&bucket_roots));
        for (n, k) in s.entries.keys().enumerate() {
            let p = s.prove(k).unwrap();
            assert!(p.verify(&s.root()), "{k}");
            if n < 8 {
                // The path kept in the array is RFC 9162's audit path over the bucket roots.
                assert_eq!(p.top_path, merkle::audit_path(&bucket_roots, bucket_of(k)));
            }
            let mut forged = p.clone();
            forged.value.push(' ');
            assert!(!forged.verify(&s.root()));
            let mut moved = p.clone();
            moved.bucket ^= 1;
            assert!(!moved.verify(&s.root()));
        }
        assert!(s.prove("absent").is_none());
        // The same writes in another order give the same root.
        let mut t = State::default();
        for (k, v) in s.entries.iter().rev() {
            let v: u32 = serde_json::from_slice(v).unwrap();
            t.put(k.clone(), &v);
        }
        assert_eq!(t.root(), s.root());
    }
}

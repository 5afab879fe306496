//! The ledger's state: an ordered map from keys to canonical JSON values, with a Merkle root
//! over all entries and a proof of any entry's value against it.

use std::collections::BTreeMap;

use medledger_crypto::{Digest, merkle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Keys and values; ordered, so that iteration and the root are the same on every machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    entries: BTreeMap<String, Vec<u8>>,
    /// Leaf hash of every entry, kept up to date by `put` so the root hashes only the tree.
    leaves: BTreeMap<String, Digest>,
}

fn leaf(key: &str, value: &[u8]) -> Digest {
    let mut data = Vec::with_capacity(8 + key.len() + value.len());
    data.extend_from_slice(&(key.len() as u32).to_be_bytes());
    data.extend_from_slice(key.as_bytes());
    data.extend_from_slice(value);
    merkle::leaf_hash(&data)
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
        self.leaves.insert(key.clone(), leaf(&key, &bytes));
        self.entries.insert(key, bytes);
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

    /// The state root: a Merkle tree over `(key, value)` leaves in key order.
    pub fn root(&self) -> Digest {
        let leaves: Vec<Digest> = self.leaves.values().copied().collect();
        merkle::root(&leaves)
    }

    /// A proof of `key`'s current value, or `None` if the key is absent.
    pub fn prove(&self, key: &str) -> Option<StateProof> {
        let index = self.entries.keys().position(|k| k == key)?;
        let leaves: Vec<Digest> = self.leaves.values().copied().collect();
        Some(StateProof {
            key: key.to_string(),
            value: String::from_utf8_lossy(&self.entries[key]).into_owned(),
            index: index as u64,
            size: leaves.len() as u64,
            path: merkle::audit_path(&leaves, index),
        })
    }
}

/// That `key` held `value` in the state with a given root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateProof {
    pub key: String,
    /// The value as stored (canonical JSON).
    pub value: String,
    pub index: u64,
    pub size: u64,
    pub path: Vec<Digest>,
}

impl StateProof {
    pub fn verify(&self, root: &Digest) -> bool {
        merkle::verify(
            leaf(&self.key, self.value.as_bytes()),
            self.index,
            self.size,
            &self.path,
            root,
        )
    }
}

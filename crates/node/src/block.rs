//! Blocks: a height, the parent's digest, the proposer's time, and transactions.

use commonware_cryptography::{Hasher, Sha256, sha256::Digest};
use medledger_ledger::Tx;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub height: u64,
    pub parent: String,
    pub time_ms: u64,
    pub txs: Vec<Tx>,
}

impl Block {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("blocks serialise")
    }

    pub fn decode(bytes: &[u8]) -> Option<Block> {
        serde_json::from_slice(bytes).ok()
    }

    pub fn digest(&self) -> Digest {
        digest_of(&self.encode())
    }

    pub fn parent_digest(&self) -> Option<Digest> {
        let mut out = [0u8; 32];
        hex_decode(&self.parent, &mut out)?;
        Some(Digest::from(out))
    }
}

pub fn digest_of(bytes: &[u8]) -> Digest {
    Sha256::hash(&[bytes])
}

/// The digest every chain starts from: the hash of the chain's name.
pub fn genesis_digest(chain: &str) -> Digest {
    digest_of(format!("medledger genesis {chain}").as_bytes())
}

pub fn hex(d: &Digest) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str, out: &mut [u8; 32]) -> Option<()> {
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
}

//! Ed25519 signatures (RFC 8032) for ledger members and nodes: signing through ring,
//! verification with the ZIP-215 rules (ed25519-consensus), under which whether a signature
//! is valid never depends on whether it is checked alone or in a batch. Nodes batch the
//! signatures of a block, and must all reach the same verdict on every transaction.

use std::fmt;

use rand::RngCore;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{CryptoError, Digest};

const SECRET_PREFIX: &str = "medledger-ed25519-secret-v1:";

/// A member's or node's signing key (the 32-byte Ed25519 seed).
pub struct SigningKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

/// An Ed25519 public key: a member's identity on the ledger.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerifyingKey(pub [u8; 32]);

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl SigningKey {
    pub fn generate() -> SigningKey {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        SigningKey::from_seed(seed)
    }

    /// A key from its seed (deterministic test and demo identities).
    pub fn from_seed(seed: [u8; 32]) -> SigningKey {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are a seed");
        SigningKey { seed, pair }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(out)
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        Signature(out)
    }

    /// The key as PKCS#8 v1 DER (RFC 8410), as TLS libraries take it.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
        let mut out = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        out.extend_from_slice(&self.seed);
        out
    }

    /// `medledger-ed25519-secret-v1:<64 hex digits>`.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}", hex::encode(self.seed))
    }

    pub fn from_text(text: &str) -> Result<SigningKey, CryptoError> {
        let h = text.trim().strip_prefix(SECRET_PREFIX).ok_or_else(|| {
            CryptoError::KeyFormat(format!("a signing key starts with {SECRET_PREFIX}"))
        })?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(h, &mut seed)
            .map_err(|e| CryptoError::KeyFormat(format!("expected 64 hex digits: {e}")))?;
        Ok(SigningKey::from_seed(seed))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.verifying_key())
    }
}

impl VerifyingKey {
    /// Whether `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        ed25519_consensus::VerificationKey::try_from(self.0)
            .and_then(|k| k.verify(&ed25519_consensus::Signature::from(signature.0), message))
            .is_ok()
    }

    /// A short name: the first 8 bytes of the key's digest, in hex.
    pub fn fingerprint(&self) -> String {
        Digest::of(&self.0).to_hex()[..16].to_string()
    }

    pub fn from_hex(s: &str) -> Result<VerifyingKey, CryptoError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out)
            .map_err(|e| CryptoError::KeyFormat(format!("a public key is 64 hex digits: {e}")))?;
        Ok(VerifyingKey(out))
    }
}

/// Whether every `(key, message, signature)` verifies, checked as one batch (about twice as
/// fast as one by one). Same rules as [`VerifyingKey::verify`]: when this says no, checking
/// each alone finds which.
pub fn verify_all(items: &[(VerifyingKey, &[u8], Signature)]) -> bool {
    let mut batch = ed25519_consensus::batch::Verifier::new();
    for (key, message, signature) in items {
        batch.queue((
            ed25519_consensus::VerificationKeyBytes::from(key.0),
            ed25519_consensus::Signature::from(signature.0),
            message,
        ));
    }
    batch.verify(rand::rngs::OsRng).is_ok()
}

impl fmt::Display for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", self.fingerprint())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", &hex::encode(self.0)[..16])
    }
}

impl Serialize for VerifyingKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for VerifyingKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        VerifyingKey::from_hex(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 64];
        hex::decode_to_slice(s.trim(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(Signature(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_refuse() {
        let k = SigningKey::from_seed([7; 32]);
        let s = k.sign(b"register study");
        assert!(k.verifying_key().verify(b"register study", &s));
        assert!(!k.verifying_key().verify(b"register study!", &s));
        let other = SigningKey::generate();
        assert!(!other.verifying_key().verify(b"register study", &s));
        let mut bad = s;
        bad.0[3] ^= 1;
        assert!(!k.verifying_key().verify(b"register study", &bad));
        let again = SigningKey::from_text(&k.to_text()).unwrap();
        assert_eq!(again.verifying_key(), k.verifying_key());
    }

    #[test]
    fn a_batch_verifies_only_if_every_signature_does() {
        let keys: Vec<SigningKey> = (0..8u8).map(|i| SigningKey::from_seed([i; 32])).collect();
        let messages: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 40]).collect();
        let mut items: Vec<(VerifyingKey, &[u8], Signature)> = keys
            .iter()
            .zip(&messages)
            .map(|(k, m)| (k.verifying_key(), m.as_slice(), k.sign(m)))
            .collect();
        assert!(verify_all(&items));
        assert!(verify_all(&[]));
        // One signature of another message: the batch fails, and alone it fails too.
        items[5].2 = keys[5].sign(b"another message");
        assert!(!verify_all(&items));
        assert!(!items[5].0.verify(items[5].1, &items[5].2));
        // Another key's signature.
        items[5].2 = keys[6].sign(items[5].1);
        assert!(!verify_all(&items));
        // Garbage bytes as a key or a signature: refused, never a panic.
        items[5] = (VerifyingKey([0xff; 32]), b"m", Signature([0xff; 64]));
        assert!(!verify_all(&items));
        assert!(!items[5].0.verify(b"m", &items[5].2));
    }

    #[test]
    fn pkcs8_is_what_ring_reads() {
        let k = SigningKey::from_seed([9; 32]);
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&k.to_pkcs8_der()).unwrap();
        assert_eq!(pair.public_key().as_ref(), &k.verifying_key().0);
    }
}

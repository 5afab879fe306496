//! Per-recipient key wrapping with HPKE (RFC 9180), base mode,
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM.
//!
//! A study is shared with N recipients by wrapping its one manifest key N times; the images
//! are never re-encrypted. Each wrap is bound to a context (the study's manifest root), so a
//! wrapped key cannot be moved onto another study's record.

use std::fmt;

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};

use crate::{CryptoError, Digest, KEY_LEN, ObjectKey};

type KemT = X25519HkdfSha256;
type HpkePrivate = <KemT as Kem>::PrivateKey;
type HpkePublic = <KemT as Kem>::PublicKey;
type HpkeEncapped = <KemT as Kem>::EncappedKey;

const INFO: &[u8] = b"medledger key wrap v1";
const SECRET_PREFIX: &str = "medledger-x25519-secret-v1:";
const PUBLIC_PREFIX: &str = "medledger-x25519-v1:";

/// A recipient's (an organisation's or member's) X25519 private key, with its public key
/// worked out once (a scalar multiplication: every study a store writes wraps a key to it).
#[derive(Clone)]
pub struct SecretKey(HpkePrivate, PublicKey);

/// A recipient's X25519 public key: what senders wrap keys to.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(HpkePublic);

impl SecretKey {
    pub fn generate() -> SecretKey {
        let (sk, pk) = KemT::gen_keypair(&mut rand::rngs::OsRng);
        SecretKey(sk, PublicKey(pk))
    }

    fn from_private(sk: HpkePrivate) -> SecretKey {
        let pk = PublicKey(KemT::sk_to_pk(&sk));
        SecretKey(sk, pk)
    }

    pub fn public(&self) -> PublicKey {
        self.1.clone()
    }

    /// `medledger-x25519-secret-v1:<64 hex digits>`.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}", hex::encode(self.0.to_bytes()))
    }

    pub fn from_text(text: &str) -> Result<SecretKey, CryptoError> {
        let hex_part = text.trim().strip_prefix(SECRET_PREFIX).ok_or_else(|| {
            CryptoError::KeyFormat(format!("a secret key starts with {SECRET_PREFIX}"))
        })?;
        let bytes = decode32(hex_part)?;
        HpkePrivate::from_bytes(&bytes)
            .map(SecretKey::from_private)
            .map_err(|e| CryptoError::KeyFormat(format!("not an X25519 secret key: {e}")))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public().fingerprint())
    }
}

impl PublicKey {
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.0.to_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<PublicKey, CryptoError> {
        HpkePublic::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|e| CryptoError::KeyFormat(format!("not an X25519 public key: {e}")))
    }

    /// `medledger-x25519-v1:<64 hex digits>`.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", hex::encode(self.to_bytes()))
    }

    pub fn from_text(text: &str) -> Result<PublicKey, CryptoError> {
        let hex_part = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            CryptoError::KeyFormat(format!("a public key starts with {PUBLIC_PREFIX}"))
        })?;
        PublicKey::from_bytes(&decode32(hex_part)?)
    }

    /// A short, stable name for the key: the first 8 bytes of its digest, in hex.
    pub fn fingerprint(&self) -> String {
        Digest::of(&self.to_bytes()).to_hex()[..16].to_string()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

fn decode32(hex_part: &str) -> Result<[u8; 32], CryptoError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part.trim(), &mut out)
        .map_err(|e| CryptoError::KeyFormat(format!("expected 64 hex digits: {e}")))?;
    Ok(out)
}

/// An object key wrapped for one recipient: 32 + 32 + 48 bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The recipient's public key, so a holder finds its own envelope.
    #[serde(with = "hex32")]
    pub recipient: [u8; 32],
    /// The HPKE encapsulated (ephemeral) key.
    #[serde(with = "hex32")]
    pub enc: [u8; 32],
    /// The sealed object key and its tag.
    #[serde(with = "hex::serde")]
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WrappedKey(for {})",
            &Digest::of(&self.recipient).to_hex()[..16]
        )
    }
}

impl WrappedKey {
    /// Whether this envelope is addressed to `key`.
    pub fn is_for(&self, key: &PublicKey) -> bool {
        self.recipient == key.to_bytes()
    }
}

/// Wraps `key` for `recipient`, bound to `context` (the study root the key belongs to).
pub fn wrap(key: &ObjectKey, recipient: &PublicKey, context: &[u8]) -> WrappedKey {
    let (enc, ciphertext) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, KemT, _>(
        &OpModeS::Base,
        &recipient.0,
        INFO,
        key.as_bytes(),
        context,
        &mut rand::rngs::OsRng,
    )
    .expect("HPKE seal to a valid X25519 key cannot fail");
    let mut enc_bytes = [0u8; 32];
    enc_bytes.copy_from_slice(&enc.to_bytes());
    WrappedKey {
        recipient: recipient.to_bytes(),
        enc: enc_bytes,
        ciphertext,
    }
}

/// Opens an envelope with the recipient's secret key; `context` must be the one it was
/// wrapped under.
pub fn unwrap(
    wrapped: &WrappedKey,
    secret: &SecretKey,
    context: &[u8],
) -> Result<ObjectKey, CryptoError> {
    let enc = HpkeEncapped::from_bytes(&wrapped.enc).map_err(|_| CryptoError::Unwrap)?;
    let plain = hpke::single_shot_open::<AesGcm256, HkdfSha256, KemT>(
        &OpModeR::Base,
        &secret.0,
        &enc,
        INFO,
        &wrapped.ciphertext,
        context,
    )
    .map_err(|_| CryptoError::Unwrap)?;
    let bytes: [u8; KEY_LEN] = plain.try_into().map_err(|_| CryptoError::Unwrap)?;
    Ok(ObjectKey::from_bytes(bytes))
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_for_many_recipients() {
        let (key, sealed) = crate::seal(b"manifest");
        let recipients: Vec<SecretKey> = (0..3).map(|_| SecretKey::generate()).collect();
        let ctx = b"root";
        let envelopes: Vec<WrappedKey> = recipients
            .iter()
            .map(|r| wrap(&key, &r.public(), ctx))
            .collect();
        for (r, env) in recipients.iter().zip(&envelopes) {
            assert!(env.is_for(&r.public()));
            let k = unwrap(env, r, ctx).unwrap();
            assert_eq!(crate::open(&k, &sealed).unwrap(), b"manifest");
        }
        // Another recipient's envelope, another context, a flipped bit: all refused.
        assert_eq!(
            unwrap(&envelopes[0], &recipients[1], ctx),
            Err(CryptoError::Unwrap)
        );
        assert_eq!(
            unwrap(&envelopes[0], &recipients[0], b"other root"),
            Err(CryptoError::Unwrap)
        );
        let mut bad = envelopes[0].clone();
        bad.ciphertext[0] ^= 1;
        assert_eq!(unwrap(&bad, &recipients[0], ctx), Err(CryptoError::Unwrap));
    }

    #[test]
    fn key_text_round_trip() {
        let sk = SecretKey::generate();
        let again = SecretKey::from_text(&sk.to_text()).unwrap();
        assert_eq!(again.public(), sk.public());
        let pk = PublicKey::from_text(&sk.public().to_text()).unwrap();
        assert_eq!(pk, sk.public());
        assert!(PublicKey::from_text("medledger-x25519-v1:zz").is_err());
        assert!(SecretKey::from_text(&sk.public().to_text()).is_err());
    }
}

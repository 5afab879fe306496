//! The cryptography medledger's store and ledger share: BLAKE3 content digests, single-use
//! AES-256-GCM sealing of objects, HPKE (RFC 9180) wrapping of object keys for recipients,
//! RFC 9162-shaped Merkle trees with inclusion proofs, and Ed25519 signatures.
//!
//! Nothing here does I/O. Every key that seals data is generated inside [`seal`] and used
//! exactly once, or is a [`SequenceKey`] whose counter nonce only moves forward, so nonces can
//! never repeat.

mod aead;
mod digest;
pub mod https;
pub mod merkle;
pub mod pki;
mod sign;
mod wrap;

pub use aead::{KEY_LEN, ObjectKey, SEAL_OVERHEAD, SequenceKey, open, open_owned, seal, seal_into};
pub use digest::Digest;
pub use pki::{CertSpec, Certificate};
pub use sign::{Signature, SigningKey, VerifyingKey, verify_all};
pub use wrap::{PublicKey, SecretKey, WrappedKey, unwrap, wrap};

/// Why a cryptographic operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// The sealed bytes are not from this format, were altered, or the key is wrong.
    #[error("authentication failed: the sealed object was altered or the key is wrong")]
    Authentication,
    /// A sealed object that is too short or has a foreign header.
    #[error("not a sealed medledger object ({0})")]
    Format(&'static str),
    /// A key in text form that does not parse.
    #[error("malformed key: {0}")]
    KeyFormat(String),
    /// A wrapped key that this secret key cannot open.
    #[error("the wrapped key is not for this recipient or was altered")]
    Unwrap,
    /// A certificate that does not parse, is not Ed25519, or does not verify.
    #[error("certificate: {0}")]
    Certificate(String),
}

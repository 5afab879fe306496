use std::fmt;

use rand::RngCore;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::CryptoError;

/// Length of an object key in bytes.
pub const KEY_LEN: usize = 32;
/// Bytes a sealed object has beyond its plaintext: the 4-byte header and the 16-byte tag.
pub const SEAL_OVERHEAD: usize = MAGIC.len() + 16;

/// Header of every sealed object; also the associated data, so a sealed object cannot be
/// passed off as another format version.
const MAGIC: &[u8; 4] = b"MLo\x01";

/// The AES-256-GCM key of one sealed object.
///
/// Keys are created only by [`seal`], which uses each exactly once; that is why the nonce can
/// be fixed at zero without ever repeating under a key.
#[derive(Clone, PartialEq, Eq)]
pub struct ObjectKey([u8; KEY_LEN]);

impl ObjectKey {
    /// A key received from elsewhere (a manifest, an unwrapped envelope).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ObjectKey {
        ObjectKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn generate() -> ObjectKey {
        let mut k = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut k);
        ObjectKey(k)
    }

    fn ring_key(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("32-byte AES-256 key"))
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ObjectKey(..)")
    }
}

/// Seals `plaintext` under a fresh random key; returns the key and `header || ciphertext || tag`.
pub fn seal(plaintext: &[u8]) -> (ObjectKey, Vec<u8>) {
    seal_with(ObjectKey::generate(), plaintext)
}

/// [`seal`] into `out` (cleared first), so that a caller can reuse its buffers.
pub fn seal_into(plaintext: &[u8], out: Vec<u8>) -> (ObjectKey, Vec<u8>) {
    seal_with_into(ObjectKey::generate(), plaintext, out)
}

/// Seals under a given key. Private: public callers cannot choose (and so cannot reuse) a key.
fn seal_with(key: ObjectKey, plaintext: &[u8]) -> (ObjectKey, Vec<u8>) {
    seal_with_into(
        key,
        plaintext,
        Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD),
    )
}

fn seal_with_into(key: ObjectKey, plaintext: &[u8], mut out: Vec<u8>) -> (ObjectKey, Vec<u8>) {
    out.clear();
    out.reserve(plaintext.len() + SEAL_OVERHEAD);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(plaintext);
    let tag = key
        .ring_key()
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(MAGIC),
            &mut out[MAGIC.len()..],
        )
        .expect("AES-GCM seals any length below 64 GiB");
    out.extend_from_slice(tag.as_ref());
    (key, out)
}

/// Opens a sealed object; fails if a single bit was changed or the key is not its own.
pub fn open(key: &ObjectKey, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    open_owned(key, sealed.to_vec())
}

/// [`open`] of a sealed object the caller owns: decrypted where it lies, without a copy.
pub fn open_owned(key: &ObjectKey, mut sealed: Vec<u8>) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(CryptoError::Format("shorter than header and tag"));
    }
    if &sealed[..MAGIC.len()] != MAGIC {
        return Err(CryptoError::Format("unknown header"));
    }
    let plain_len = key
        .ring_key()
        .open_within(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(MAGIC),
            &mut sealed,
            MAGIC.len()..,
        )
        .map_err(|_| CryptoError::Authentication)?
        .len();
    sealed.truncate(plain_len);
    Ok(sealed)
}

/// An AES-256-GCM key that seals a sequence of records (a journal segment), each under the
/// next counter as its nonce. The counter only moves forward inside [`SequenceKey::seal_next`],
/// and a key is either fresh ([`SequenceKey::generate`], counter at zero) or opened for reading
/// only ([`SequenceKey::opener`]), so no nonce is ever used twice under a key.
pub struct SequenceKey {
    key: ObjectKey,
    next: Option<u64>,
}

impl fmt::Debug for SequenceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SequenceKey(..)")
    }
}

impl SequenceKey {
    /// A fresh random key; its first record takes counter 0.
    pub fn generate() -> SequenceKey {
        SequenceKey {
            key: ObjectKey::generate(),
            next: Some(0),
        }
    }

    /// A key received from elsewhere (an unwrapped envelope): it opens records, never seals.
    pub fn opener(key: ObjectKey) -> SequenceKey {
        SequenceKey { key, next: None }
    }

    /// The key's bytes, to wrap for its owner.
    pub fn object_key(&self) -> &ObjectKey {
        &self.key
    }

    /// Seals the concatenation of `plaintext` with `aad` under the next counter, appending
    /// `ciphertext || tag` to `out`; returns the counter used. Panics on a key made by
    /// [`SequenceKey::opener`].
    pub fn seal_next(&mut self, aad: &[u8], plaintext: &[&[u8]], out: &mut Vec<u8>) -> u64 {
        let counter = self
            .next
            .expect("a sequence key from an envelope only opens");
        self.next = Some(counter + 1);
        let start = out.len();
        for p in plaintext {
            out.extend_from_slice(p);
        }
        let tag = self
            .key
            .ring_key()
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), &mut out[start..])
            .expect("AES-GCM seals any length below 64 GiB");
        out.extend_from_slice(tag.as_ref());
        counter
    }

    /// Opens one record sealed under `counter` with `aad`, in place: `sealed` becomes the
    /// plaintext. Fails if a bit was changed, or the counter, the data or the key differ.
    pub fn open_at(
        &self,
        counter: u64,
        aad: &[u8],
        sealed: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        if sealed.len() < 16 {
            return Err(CryptoError::Format("shorter than a tag"));
        }
        let n = self
            .key
            .ring_key()
            .open_in_place(nonce(counter), Aad::from(aad), sealed)
            .map_err(|_| CryptoError::Authentication)?
            .len();
        sealed.truncate(n);
        Ok(())
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let msg = b"a slice of a chest CT".repeat(100);
        let (key, sealed) = seal(&msg);
        assert_eq!(sealed.len(), msg.len() + SEAL_OVERHEAD);
        assert_eq!(open(&key, &sealed).unwrap(), msg);
        assert_eq!(open_owned(&key, sealed.clone()).unwrap(), msg);
        for i in [0, 3, 4, 100, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(open(&key, &bad).is_err(), "flip at {i} not caught");
            assert!(open_owned(&key, bad).is_err(), "flip at {i} not caught");
        }
        assert!(open(&key, &sealed[..sealed.len() - 1]).is_err());
        let (other, _) = seal(b"x");
        assert_eq!(open(&other, &sealed), Err(CryptoError::Authentication));
    }

    #[test]
    fn keys_are_fresh_per_seal() {
        let (a, sa) = seal(b"same");
        let (b, sb) = seal(b"same");
        assert_ne!(a, b);
        assert_ne!(sa, sb);
    }

    #[test]
    fn sealing_into_a_used_buffer_leaves_nothing_of_it() {
        let msg = b"pixels".repeat(1000);
        let used = vec![0xAB; 50_000];
        let (key, sealed) = seal_into(&msg, used);
        assert_eq!(sealed.len(), msg.len() + SEAL_OVERHEAD);
        assert_eq!(open(&key, &sealed).unwrap(), msg);
        let (key, sealed) = seal_into(b"", sealed);
        assert_eq!(sealed.len(), SEAL_OVERHEAD);
        assert_eq!(open(&key, &sealed).unwrap(), b"");
    }

    #[test]
    fn empty_plaintext() {
        let (k, s) = seal(b"");
        assert_eq!(open(&k, &s).unwrap(), b"");
    }

    #[test]
    fn sequence_keys_count_and_bind_their_records() {
        let mut k = SequenceKey::generate();
        let mut a = Vec::new();
        let mut b = Vec::new();
        assert_eq!(k.seal_next(b"at 0", &[b"fi", b"rst"], &mut a), 0);
        assert_eq!(k.seal_next(b"at 1", &[b"first"], &mut b), 1);
        // The same plaintext under two counters seals differently.
        assert_ne!(a, b);
        let reader = SequenceKey::opener(k.object_key().clone());
        let mut x = a.clone();
        reader.open_at(0, b"at 0", &mut x).unwrap();
        assert_eq!(x, b"first");
        // Another counter, other data, a flipped bit or another key: refused.
        assert!(reader.open_at(1, b"at 0", &mut a.clone()).is_err());
        assert!(reader.open_at(0, b"at 1", &mut a.clone()).is_err());
        let mut bad = a.clone();
        bad[2] ^= 4;
        assert!(reader.open_at(0, b"at 0", &mut bad).is_err());
        let other = SequenceKey::generate();
        assert!(other.open_at(0, b"at 0", &mut a.clone()).is_err());
        assert!(reader.open_at(0, b"", &mut vec![1, 2]).is_err());
    }

    #[test]
    #[should_panic(expected = "only opens")]
    fn an_opened_sequence_key_never_seals() {
        let k = SequenceKey::generate();
        let mut r = SequenceKey::opener(k.object_key().clone());
        r.seal_next(b"", &[b"x"], &mut Vec::new());
    }
}

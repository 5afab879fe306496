//! Keyed pseudonyms: the site's or consortium's secret key turns a patient identifier into the
//! same pseudonym, an instance UID into the same replacement UID, and a patient into the same
//! date shift, on every run and machine, so a patient stays linkable across screening rounds
//! and sites without anyone learning who they are.
//!
//! Everything is HMAC-SHA-256 under the key with a domain-separation label per use, so that
//! knowing one kind of output (a pseudonym) tells nothing about another (the date shift).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// A secret de-identification key (32 bytes).
#[derive(Clone)]
pub struct DeidKey {
    secret: [u8; 32],
    id: String,
}

impl std::fmt::Debug for DeidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("DeidKey").field("id", &self.id).finish()
    }
}

/// Key text that is not a key.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "a de-identification key is 32 bytes written as 64 hexadecimal characters (found {found}); create one with `medledger key generate <FILE>`"
)]
pub struct KeyFormatError {
    found: String,
}

impl DeidKey {
    pub fn from_bytes(secret: [u8; 32]) -> DeidKey {
        let digest = Sha256::new()
            .chain_update(b"medledger/deid/key-id/v1")
            .chain_update(secret)
            .finalize();
        DeidKey {
            secret,
            id: hex::encode(&digest[..8]),
        }
    }

    /// Parses the key file format: 64 hex characters, surrounding white space and `#` comment
    /// lines ignored.
    pub fn from_text(text: &str) -> Result<DeidKey, KeyFormatError> {
        let hex_text: String = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let bytes = hex::decode(&hex_text).map_err(|_| KeyFormatError {
            found: format!("{} non-hex or odd-length characters", hex_text.len()),
        })?;
        let secret: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| KeyFormatError {
            found: format!("{} bytes", b.len()),
        })?;
        Ok(DeidKey::from_bytes(secret))
    }

    /// The key file text for this key.
    pub fn to_text(&self) -> String {
        format!(
            "# medledger de-identification key {}: keep secret; the same key gives the same pseudonyms\n{}\n",
            self.id,
            hex::encode(self.secret)
        )
    }

    /// A public identifier of the key (not the key): recorded in provenance so a reader knows
    /// which key's pseudonyms a data set carries.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self, label: &str, value: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key size");
        mac.update(b"medledger/deid/");
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(value);
        mac.finalize().into_bytes().into()
    }

    /// The pseudonymous patient ID for a patient identity (see [`patient_identity`]).
    /// 16 characters of base32 (80 bits): collisions are negligible at any realistic registry
    /// size, and the value fits SH/LO.
    pub fn patient_pseudonym(&self, identity: &str) -> String {
        let mac = self.mac("patient", identity.as_bytes());
        format!("ML{}", base32(&mac[..10]))
    }

    /// The replacement for a UID: `2.25.` and a 128-bit integer (PS3.5 B.2), so it is a valid
    /// UID of at most 44 characters and the same original always maps to the same value.
    pub fn replace_uid(&self, uid: &str) -> String {
        let mac = self.mac("uid", uid.trim_end_matches(['\0', ' ']).as_bytes());
        let mut n = [0u8; 16];
        n.copy_from_slice(&mac[..16]);
        format!("2.25.{}", u128::from_be_bytes(n))
    }

    /// Days to add to every date of this patient for the Modified Dates option: between 1 and
    /// 3652 days (up to ten years) into the past, the same for every study of the patient, so
    /// intervals between studies and the patient's age at each study are kept.
    pub fn date_shift_days(&self, identity: &str) -> i64 {
        let mac = self.mac("date-shift", identity.as_bytes());
        let n = u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]);
        -(1 + i64::from(n % 3652))
    }

    /// A per-key keyed digest, hex: used to tell apart values in reports without revealing
    /// them.
    pub fn fingerprint(&self, label: &str, value: &str) -> String {
        hex::encode(&self.mac(label, value.as_bytes())[..8])
    }
}

/// The identity a pseudonym is derived from: the Patient ID when there is one (so two studies
/// with the same ID link), else name and birth date, else nothing (no linkage possible).
pub fn patient_identity(patient_id: &str, name: &str, birth_date: &str) -> Option<String> {
    let id = patient_id.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if !id.is_empty() {
        return Some(format!("id:{}", id.to_uppercase()));
    }
    let name = name.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if !name.is_empty() {
        return Some(format!(
            "name:{}|{}",
            name.to_uppercase(),
            birth_date.trim_matches(|c: char| c.is_whitespace() || c == '\0')
        ));
    }
    None
}

fn base32(bytes: &[u8]) -> String {
    // RFC 4648 alphabet without padding; no confusable lower case.
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> DeidKey {
        DeidKey::from_bytes([b; 32])
    }

    #[test]
    fn key_text_round_trips_and_rejects_garbage() {
        let k = key(7);
        let back = DeidKey::from_text(&k.to_text()).unwrap();
        assert_eq!(back.id(), k.id());
        assert_eq!(back.replace_uid("1.2.3"), k.replace_uid("1.2.3"));
        assert!(DeidKey::from_text("abcd").is_err());
        assert!(DeidKey::from_text(&"zz".repeat(32)).is_err());
        assert!(!format!("{k:?}").contains(&hex::encode([7u8; 32])));
    }

    #[test]
    fn pseudonyms_depend_on_key_and_identity() {
        let (a, b) = (key(1), key(2));
        let p = a.patient_pseudonym("id:123");
        assert_eq!(p, a.patient_pseudonym("id:123"));
        assert_ne!(p, a.patient_pseudonym("id:124"));
        assert_ne!(p, b.patient_pseudonym("id:123"));
        assert_eq!(p.len(), 18);
    }

    #[test]
    fn uids_are_valid_and_ignore_padding() {
        let k = key(3);
        let u = k.replace_uid("1.2.840.113619.2.55.3\0");
        assert_eq!(u, k.replace_uid("1.2.840.113619.2.55.3"));
        assert!(u.starts_with("2.25."));
        assert!(u.len() <= 64);
        assert!(!u[5..].starts_with('0'));
    }

    #[test]
    fn date_shift_in_range() {
        let k = key(4);
        for i in 0..200 {
            let d = k.date_shift_days(&format!("id:{i}"));
            assert!((-3652..=-1).contains(&d));
        }
    }

    #[test]
    fn identity_prefers_patient_id() {
        assert_eq!(
            patient_identity(" 12 ", "DOE^J", "19500101").unwrap(),
            "id:12"
        );
        assert_eq!(
            patient_identity("", "Doe^J", "19500101").unwrap(),
            "name:DOE^J|19500101"
        );
        assert!(patient_identity("", "", "19500101").is_none());
    }
}

//! The index kept between runs: one private record per study in the node's own store
//! (`private/index/v1/<digest of the Study Instance UID>`), sealed for the store key, written
//! in the background shortly after a version of the study is registered.
//!
//! A record says which versions of the study exist (every root, original and derivative),
//! which are newest and which the ledger has registered, the patient's pseudonym, and the
//! header objects of the newest versions' instances. At start, a record is used only if every
//! version of its study in the store is one it accounts for and every root it names is still
//! there; each header it carries is used only if its digest is the one the manifest names.
//! Everything else is rebuilt from the store and the ledger, so a lost, stale or damaged
//! record costs time, never correctness. Registration is only ever added by the ledger, so a
//! registered root in a record stays registered; an unregistered one is asked of the ledger.

use std::collections::BTreeSet;

use medledger_crypto::Digest;
use medledger_ledger::DeidRecord;
use medledger_store::DecodeError;
use medledger_store::codec::{Reader, Writer};

const MAGIC: &[u8; 4] = b"MLix";
const FORMAT: u8 = 1;

/// Where the records live, under the store's private records.
pub(crate) const PREFIX: &str = "index/v1/";

/// The record's name for a study.
pub(crate) fn record_name(study_key: &str) -> String {
    format!("{PREFIX}{}", Digest::of(study_key.as_bytes()).to_hex())
}

/// What is kept of one study between runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StudyRecord {
    /// The study's key in the index (the original's Study Instance UID).
    pub study: String,
    /// Every version of the study this record accounts for (original and derivative roots).
    pub roots: BTreeSet<Digest>,
    pub original: Digest,
    pub derivative: Option<Digest>,
    pub registered_original: Option<Digest>,
    pub registered_derivative: Option<Digest>,
    pub patient: String,
    pub deid: Option<DeidRecord>,
    /// Header objects (plaintext) of the newest versions' instances, matched at load by the
    /// digest their manifest names.
    pub headers: Vec<Vec<u8>>,
}

fn opt_digest(w: &mut Writer, d: &Option<Digest>) {
    match d {
        Some(d) => {
            w.u8(1);
            w.digest(d);
        }
        None => w.u8(0),
    }
}

fn read_opt_digest(r: &mut Reader<'_>) -> Result<Option<Digest>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.digest()?)),
        t => Err(DecodeError(format!("bad option tag {t}"))),
    }
}

impl StudyRecord {
    pub fn encode(&self) -> Vec<u8> {
        let size =
            256 + self.roots.len() * 32 + self.headers.iter().map(|h| h.len() + 4).sum::<usize>();
        let mut w = Writer::with_capacity(size);
        w.bytes_raw(MAGIC);
        w.u8(FORMAT);
        w.str(&self.study);
        w.u32(self.roots.len() as u32);
        for r in &self.roots {
            w.digest(r);
        }
        w.digest(&self.original);
        opt_digest(&mut w, &self.derivative);
        opt_digest(&mut w, &self.registered_original);
        opt_digest(&mut w, &self.registered_derivative);
        w.str(&self.patient);
        let deid = self
            .deid
            .as_ref()
            .map(|d| serde_json::to_string(d).expect("JSON serialises"))
            .unwrap_or_default();
        w.str(&deid);
        w.u32(self.headers.len() as u32);
        for h in &self.headers {
            w.bytes(h);
        }
        w.into_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<StudyRecord, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.raw(4)? != MAGIC {
            return Err(DecodeError("not an index record".into()));
        }
        let format = r.u8()?;
        if format != FORMAT {
            return Err(DecodeError(format!("unknown index record format {format}")));
        }
        let study = r.str()?;
        let n = r.count(32)?;
        let mut roots = BTreeSet::new();
        for _ in 0..n {
            roots.insert(r.digest()?);
        }
        let original = r.digest()?;
        let derivative = read_opt_digest(&mut r)?;
        let registered_original = read_opt_digest(&mut r)?;
        let registered_derivative = read_opt_digest(&mut r)?;
        let patient = r.str()?;
        let deid = r.str()?;
        let deid = if deid.is_empty() {
            None
        } else {
            Some(
                serde_json::from_str(&deid)
                    .map_err(|e| DecodeError(format!("de-identification record: {e}")))?,
            )
        };
        let n = r.count(4)?;
        let mut headers = Vec::with_capacity(n);
        for _ in 0..n {
            headers.push(r.bytes()?.to_vec());
        }
        r.finish()?;
        let record = StudyRecord {
            study,
            roots,
            original,
            derivative,
            registered_original,
            registered_derivative,
            patient,
            deid,
            headers,
        };
        // The roots it names must be among those it accounts for.
        let named = [
            Some(record.original),
            record.derivative,
            record.registered_original,
            record.registered_derivative,
        ];
        if named.iter().flatten().any(|d| !record.roots.contains(d)) {
            return Err(DecodeError(
                "the record names a version it does not account for".into(),
            ));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> StudyRecord {
        let d = |b: u8| Digest::of(&[b]);
        StudyRecord {
            study: "1.2.3".into(),
            roots: [d(1), d(2), d(3)].into_iter().collect(),
            original: d(1),
            derivative: Some(d(2)),
            registered_original: Some(d(3)),
            registered_derivative: None,
            patient: "PSEUDO".into(),
            deid: Some(DeidRecord {
                profile: "basic".into(),
                options: vec!["clean-descriptors".into()],
                table_edition: "2024b".into(),
                key_id: "k".into(),
            }),
            headers: vec![b"MLh\x01a".to_vec(), Vec::new()],
        }
    }

    #[test]
    fn records_round_trip_and_refuse_damage() {
        let r = record();
        let bytes = r.encode();
        assert_eq!(StudyRecord::decode(&bytes).unwrap(), r);
        // Every truncation and any trailing byte are refused.
        for n in 0..bytes.len() {
            assert!(StudyRecord::decode(&bytes[..n]).is_err(), "cut at {n}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(StudyRecord::decode(&long).is_err());
        // A record naming a version it does not account for is refused.
        let mut bad = record();
        bad.roots.remove(&bad.original);
        assert!(StudyRecord::decode(&bad.encode()).is_err());
        // Another format is refused.
        let mut other = bytes;
        other[4] = 2;
        assert!(StudyRecord::decode(&other).is_err());
    }

    #[test]
    fn names_do_not_reveal_the_study() {
        let n = record_name("1.2.840.113619.2.55.3.1234");
        assert!(n.starts_with(PREFIX));
        assert!(!n.contains("113619"));
    }
}

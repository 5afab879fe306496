//! Study manifests: what a study is made of, the keys to read it, and the Merkle root the
//! ledger records.
//!
//! The manifest is sealed like any object; only holders of its key read it. Its root commits
//! to content, not to encryption: the study instance UID, and for every series its UID,
//! modality and instances, and for every instance its SOP UIDs and the plaintext digest and
//! length of its header object and each pixel object. The same study therefore has the same
//! root however often it is stored, and a recipient who decrypts an object can check it
//! against the root without trusting the store.
//!
//! Tree shape (format version 1), all hashes BLAKE3:
//! - instance leaf = `leaf_hash(encode(instance))`; instances ordered by SOP Instance UID;
//! - series leaf = `leaf_hash("series" || uid || modality || count || merkle_root(instances))`;
//!   series ordered by Series Instance UID;
//! - root = `H("medledger study manifest v1" || study uid || series count ||
//!   merkle_root(series))`.
//!
//! Merkle trees are RFC 9162-shaped ([`medledger_crypto::merkle`]), so inclusion proofs for a
//! series or an instance are audit paths.

use medledger_crypto::{Digest, KEY_LEN, ObjectKey, merkle};

use crate::codec::{DecodeError, Reader, Writer};

/// Current manifest format version.
pub const FORMAT_VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"MLmf";
const ROOT_DOMAIN: &[u8] = b"medledger study manifest v1";

/// One stored object: where it is, how to open it, and what it must contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// Content address: the digest of the sealed bytes.
    pub address: Digest,
    /// Digest of the plaintext.
    pub digest: Digest,
    /// Length of the plaintext.
    pub len: u64,
    pub key: ObjectKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEntry {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub header: ObjectRef,
    pub pixels: Vec<ObjectRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesEntry {
    pub series_uid: String,
    pub modality: String,
    /// Ordered by SOP Instance UID, no duplicates.
    pub instances: Vec<InstanceEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyManifest {
    pub study_uid: String,
    /// Ordered by Series Instance UID, no duplicates.
    pub series: Vec<SeriesEntry>,
    /// For a de-identified derivative: the root of the original it was made from.
    pub derived_from: Option<Digest>,
}

impl InstanceEntry {
    /// Plaintext bytes of the instance's objects (its file plus a few bytes of framing).
    pub fn plain_len(&self) -> u64 {
        self.objects().map(|o| o.len).sum()
    }

    /// The leaf this instance contributes to its series tree.
    pub fn leaf(&self) -> Digest {
        let mut w = Writer::with_capacity(160 + 40 * self.pixels.len());
        w.str(&self.sop_instance_uid);
        w.str(&self.sop_class_uid);
        w.digest(&self.header.digest);
        w.u64(self.header.len);
        w.u32(self.pixels.len() as u32);
        for p in &self.pixels {
            w.digest(&p.digest);
            w.u64(p.len);
        }
        merkle::leaf_hash(&w.into_vec())
    }

    /// Every object of the instance: header first.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectRef> {
        std::iter::once(&self.header).chain(self.pixels.iter())
    }
}

impl SeriesEntry {
    pub fn instances_root(&self) -> Digest {
        let leaves: Vec<Digest> = self.instances.iter().map(InstanceEntry::leaf).collect();
        merkle::root(&leaves)
    }

    pub fn leaf(&self) -> Digest {
        series_leaf(
            &self.series_uid,
            &self.modality,
            self.instances.len() as u64,
            &self.instances_root(),
        )
    }
}

fn series_leaf(uid: &str, modality: &str, count: u64, instances_root: &Digest) -> Digest {
    let mut w = Writer::with_capacity(128);
    w.str("series");
    w.str(uid);
    w.str(modality);
    w.u64(count);
    w.digest(instances_root);
    merkle::leaf_hash(&w.into_vec())
}

fn study_root(study_uid: &str, series_count: u64, series_root: &Digest) -> Digest {
    let mut w = Writer::with_capacity(128);
    w.bytes_raw(ROOT_DOMAIN);
    w.str(study_uid);
    w.u64(series_count);
    w.digest(series_root);
    Digest::of(&w.into_vec())
}

impl StudyManifest {
    /// The manifest root: the value the ledger records for this study.
    pub fn root(&self) -> Digest {
        let leaves: Vec<Digest> = self.series.iter().map(SeriesEntry::leaf).collect();
        study_root(&self.study_uid, leaves.len() as u64, &merkle::root(&leaves))
    }

    pub fn instance_count(&self) -> usize {
        self.series.iter().map(|s| s.instances.len()).sum()
    }

    pub fn instances(&self) -> impl Iterator<Item = (&SeriesEntry, &InstanceEntry)> {
        self.series
            .iter()
            .flat_map(|s| s.instances.iter().map(move |i| (s, i)))
    }

    /// The addresses of every object the study needs, sorted, each once (pixel objects may be
    /// shared between instances).
    pub fn object_addresses(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self
            .instances()
            .flat_map(|(_, i)| i.objects().map(|o| o.address))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Plaintext bytes of all the study's objects.
    pub fn plain_len(&self) -> u64 {
        self.instances().map(|(_, i)| i.plain_len()).sum()
    }

    /// Puts series and instances in canonical order. Fails on a duplicate UID.
    pub fn canonicalize(&mut self) -> Result<(), DecodeError> {
        self.series.sort_by(|a, b| a.series_uid.cmp(&b.series_uid));
        for s in &mut self.series {
            s.instances
                .sort_by(|a, b| a.sop_instance_uid.cmp(&b.sop_instance_uid));
        }
        self.check_order()
    }

    fn check_order(&self) -> Result<(), DecodeError> {
        for w in self.series.windows(2) {
            if w[0].series_uid >= w[1].series_uid {
                return Err(DecodeError(format!(
                    "series {} is out of order or repeated",
                    w[1].series_uid
                )));
            }
        }
        for s in &self.series {
            for w in s.instances.windows(2) {
                if w[0].sop_instance_uid >= w[1].sop_instance_uid {
                    return Err(DecodeError(format!(
                        "instance {} is out of order or repeated",
                        w[1].sop_instance_uid
                    )));
                }
            }
        }
        Ok(())
    }

    /// The canonical encoding (format version 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256 + self.instance_count() * 400);
        w.bytes_raw(MAGIC);
        w.u16(FORMAT_VERSION);
        w.str(&self.study_uid);
        match &self.derived_from {
            None => w.u8(0),
            Some(d) => {
                w.u8(1);
                w.digest(d);
            }
        }
        w.u32(self.series.len() as u32);
        for s in &self.series {
            w.str(&s.series_uid);
            w.str(&s.modality);
            w.u32(s.instances.len() as u32);
            for i in &s.instances {
                w.str(&i.sop_instance_uid);
                w.str(&i.sop_class_uid);
                encode_ref(&mut w, &i.header);
                w.u32(i.pixels.len() as u32);
                for p in &i.pixels {
                    encode_ref(&mut w, p);
                }
            }
        }
        w.into_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<StudyManifest, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.raw(4)? != MAGIC {
            return Err(DecodeError("not a study manifest".into()));
        }
        let version = r.u16()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError(format!(
                "manifest format version {version}; this build reads version {FORMAT_VERSION}"
            )));
        }
        let study_uid = r.str()?;
        let derived_from = match r.u8()? {
            0 => None,
            1 => Some(r.digest()?),
            t => return Err(DecodeError(format!("bad derived-from flag {t}"))),
        };
        let n_series = r.count(12)?;
        let mut series = Vec::with_capacity(n_series);
        for _ in 0..n_series {
            let series_uid = r.str()?;
            let modality = r.str()?;
            let n = r.count(REF_LEN + 12)?;
            let mut instances = Vec::with_capacity(n);
            for _ in 0..n {
                let sop_instance_uid = r.str()?;
                let sop_class_uid = r.str()?;
                let header = decode_ref(&mut r)?;
                let np = r.count(REF_LEN)?;
                let mut pixels = Vec::with_capacity(np);
                for _ in 0..np {
                    pixels.push(decode_ref(&mut r)?);
                }
                instances.push(InstanceEntry {
                    sop_instance_uid,
                    sop_class_uid,
                    header,
                    pixels,
                });
            }
            series.push(SeriesEntry {
                series_uid,
                modality,
                instances,
            });
        }
        r.finish()?;
        let m = StudyManifest {
            study_uid,
            series,
            derived_from,
        };
        m.check_order()?;
        Ok(m)
    }

    /// Proof that series `series_index` belongs to this manifest's root.
    pub fn series_proof(&self, series_index: usize) -> SeriesProof {
        let leaves: Vec<Digest> = self.series.iter().map(SeriesEntry::leaf).collect();
        SeriesProof {
            study_uid: self.study_uid.clone(),
            series_count: leaves.len() as u64,
            series_index: series_index as u64,
            path: merkle::audit_path(&leaves, series_index),
        }
    }

    /// Proof that one instance belongs to this manifest's root.
    pub fn instance_proof(&self, series_index: usize, instance_index: usize) -> InstanceProof {
        let s = &self.series[series_index];
        let leaves: Vec<Digest> = s.instances.iter().map(InstanceEntry::leaf).collect();
        InstanceProof {
            series: self.series_proof(series_index),
            series_uid: s.series_uid.clone(),
            modality: s.modality.clone(),
            instance_count: leaves.len() as u64,
            instance_index: instance_index as u64,
            path: merkle::audit_path(&leaves, instance_index),
        }
    }
}

const REF_LEN: usize = 32 + 32 + 8 + KEY_LEN;

fn encode_ref(w: &mut Writer, r: &ObjectRef) {
    w.digest(&r.address);
    w.digest(&r.digest);
    w.u64(r.len);
    w.bytes_raw(r.key.as_bytes());
}

fn decode_ref(r: &mut Reader<'_>) -> Result<ObjectRef, DecodeError> {
    Ok(ObjectRef {
        address: r.digest()?,
        digest: r.digest()?,
        len: r.u64()?,
        key: ObjectKey::from_bytes(r.raw(KEY_LEN)?.try_into().expect("32 bytes")),
    })
}

/// Proof that a series (with all its instances) is part of a study root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesProof {
    pub study_uid: String,
    pub series_count: u64,
    pub series_index: u64,
    pub path: Vec<Digest>,
}

impl SeriesProof {
    /// Whether a whole series, as received, belongs to `root`.
    pub fn verify(&self, root: &Digest, series: &SeriesEntry) -> bool {
        self.verify_leaf(root, series.leaf())
    }

    fn verify_leaf(&self, root: &Digest, leaf: Digest) -> bool {
        merkle::root_from_path(leaf, self.series_index, self.series_count, &self.path)
            .is_some_and(|r| &study_root(&self.study_uid, self.series_count, &r) == root)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + 32 * self.path.len());
        w.bytes_raw(b"MLps");
        w.str(&self.study_uid);
        w.u64(self.series_count);
        w.u64(self.series_index);
        w.u32(self.path.len() as u32);
        for d in &self.path {
            w.digest(d);
        }
        w.into_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<SeriesProof, DecodeError> {
        let mut r = Reader::new(bytes);
        let p = Self::read(&mut r)?;
        r.finish()?;
        Ok(p)
    }

    fn read(r: &mut Reader<'_>) -> Result<SeriesProof, DecodeError> {
        if r.raw(4)? != b"MLps" {
            return Err(DecodeError("not a series proof".into()));
        }
        let study_uid = r.str()?;
        let series_count = r.u64()?;
        let series_index = r.u64()?;
        let n = r.count(32)?;
        let path = (0..n).map(|_| r.digest()).collect::<Result<_, _>>()?;
        Ok(SeriesProof {
            study_uid,
            series_count,
            series_index,
            path,
        })
    }
}

/// Proof that one instance is part of a study root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceProof {
    pub series: SeriesProof,
    pub series_uid: String,
    pub modality: String,
    pub instance_count: u64,
    pub instance_index: u64,
    pub path: Vec<Digest>,
}

impl InstanceProof {
    /// Whether `instance` (its header and pixel digests) belongs to `root`.
    pub fn verify(&self, root: &Digest, instance: &InstanceEntry) -> bool {
        merkle::root_from_path(
            instance.leaf(),
            self.instance_index,
            self.instance_count,
            &self.path,
        )
        .is_some_and(|instances_root| {
            let leaf = series_leaf(
                &self.series_uid,
                &self.modality,
                self.instance_count,
                &instances_root,
            );
            self.series.verify_leaf(root, leaf)
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128 + 32 * self.path.len());
        w.bytes_raw(b"MLpi");
        w.bytes(&self.series.encode());
        w.str(&self.series_uid);
        w.str(&self.modality);
        w.u64(self.instance_count);
        w.u64(self.instance_index);
        w.u32(self.path.len() as u32);
        for d in &self.path {
            w.digest(d);
        }
        w.into_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<InstanceProof, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.raw(4)? != b"MLpi" {
            return Err(DecodeError("not an instance proof".into()));
        }
        let series = SeriesProof::decode(r.bytes()?)?;
        let series_uid = r.str()?;
        let modality = r.str()?;
        let instance_count = r.u64()?;
        let instance_index = r.u64()?;
        let n = r.count(32)?;
        let path = (0..n).map(|_| r.digest()).collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(InstanceProof {
            series,
            series_uid,
            modality,
            instance_count,
            instance_index,
            path,
        })
    }
}

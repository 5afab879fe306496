//! The store: studies in, studies out, every byte checked.
//!
//! Putting a study is two passes over its files. The first ([`scan`]) splits each file and
//! digests its objects, which is enough to compute the study's manifest root; if the store
//! already holds that root the study is not written again. The second seals every object
//! under its own key and writes the objects, then the sealed manifest, then the study's
//! reference record (`refs/<root>.json`: the manifest's address, the addresses of all its
//! objects, and the manifest key wrapped for each recipient). A study is acknowledged only
//! after its reference record is durable, and the record is written last, so a crash leaves
//! either a complete study or unreferenced objects that `verify` lists.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use medledger_crypto::{Digest, ObjectKey, PublicKey, SecretKey, WrappedKey};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, BatchWriter};
use crate::cache::{CacheStats, ObjectCache};
use crate::codec::DecodeError;
use crate::manifest::{InstanceEntry, ObjectRef, SeriesEntry, StudyManifest};
use crate::split::{self, InstanceIds, Split, SplitError};

/// Magic of private records (`Store::put_private`): then the 112-byte envelope, then the
/// sealed bytes.
const PRIVATE_MAGIC: &[u8; 4] = b"MLp\x01";

fn private_context(name: &str) -> Vec<u8> {
    format!("medledger private record v1 {name}").into_bytes()
}

/// Format tag of reference records.
pub const REF_FORMAT: &str = "medledger-study-ref-1";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{source_name}: {error}")]
    Split {
        source_name: String,
        error: SplitError,
    },
    #[error("{source_name} changed while it was being stored")]
    Changed { source_name: String },
    #[error("no study with root {0} in this store")]
    UnknownRoot(Digest),
    #[error("study {0} is not shared with this key (no envelope for it)")]
    NotRecipient(Digest),
    #[error("{what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: DecodeError,
    },
}

fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        reason: reason.into(),
    }
}

/// Where an instance's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Memory { name: String, bytes: Bytes },
}

impl Source {
    pub fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Memory { name, .. } => name.clone(),
        }
    }

    /// The file's size as far as it can be known without reading it (0 if unknown).
    pub fn len_hint(&self) -> u64 {
        match self {
            Source::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            Source::Memory { bytes, .. } => bytes.len() as u64,
        }
    }

    fn load(&self) -> Result<Bytes, StoreError> {
        match self {
            Source::File(p) => {
                let read = || -> std::io::Result<Vec<u8>> {
                    use std::io::Read;
                    let mut f = std::fs::File::open(p)?;
                    let len = f.metadata()?.len() as usize;
                    let mut v = crate::pool::take(len);
                    f.read_to_end(&mut v)?;
                    Ok(v)
                };
                read().map(Bytes::from).map_err(|e| StoreError::Read {
                    path: p.clone(),
                    source: e,
                })
            }
            Source::Memory { bytes, .. } => Ok(bytes.clone()),
        }
    }
}

/// An instance after the first pass: how it splits and what its objects must digest to.
#[derive(Debug, Clone)]
pub struct Scanned {
    pub source: Source,
    pub split: Split,
    pub file_len: u64,
    /// The file's bytes, kept from the first pass while they fit the memory budget, so the
    /// second pass neither reads nor digests them again.
    kept: Option<Bytes>,
    header: (Digest, u64),
    pixels: Vec<(Digest, u64)>,
    /// Its objects, when they were sealed and written in the same pass ([`Store::put_files`]).
    sealed: Option<SealedInstance>,
}

/// Each study's outcome, by study UID.
pub type StudyResults = Vec<(String, Result<PutOutcome, StoreError>)>;

/// A one-pass put's outcome: the studies' results, or (nothing committed) the plans to put
/// again and why.
type OnePass = Result<StudyResults, (Vec<StudyPlan>, StoreError)>;

/// An instance's objects as sealed by [`Store::put_files`] before its study was planned.
#[derive(Debug, Clone)]
struct SealedInstance {
    header: ObjectRef,
    pixels: Vec<ObjectRef>,
    keys: Vec<String>,
    bytes: u64,
}

impl Scanned {
    pub fn ids(&self) -> &InstanceIds {
        &self.split.ids
    }
    /// Digests of the pixel objects, in order.
    pub fn pixel_digests(&self) -> impl Iterator<Item = &Digest> {
        self.pixels.iter().map(|(d, _)| d)
    }
}

/// Bytes of input files the first pass keeps in memory for the second (in all).
const KEEP_BUDGET: u64 = 1 << 30;
/// Files above this size are read again in the second pass rather than kept.
const KEEP_MAX_FILE: u64 = 256 << 20;

/// First pass over one instance: read, split, digest.
pub fn scan(source: Source) -> Result<Scanned, StoreError> {
    let bytes = source.load()?;
    let mut s = scan_bytes(source, &bytes)?;
    s.kept = Some(bytes);
    Ok(s)
}

fn scan_bytes(source: Source, bytes: &[u8]) -> Result<Scanned, StoreError> {
    let split = split::split(bytes).map_err(|error| StoreError::Split {
        source_name: source.name(),
        error,
    })?;
    let header = split.header_object(bytes);
    let header = (Digest::of(&header), header.len() as u64);
    let pixels = split
        .pixels
        .iter()
        .map(|r| (Digest::of(&bytes[r.clone()]), r.len() as u64))
        .collect();
    Ok(Scanned {
        source,
        split,
        file_len: bytes.len() as u64,
        kept: None,
        header,
        pixels,
        sealed: None,
    })
}

/// The instances of one study, in manifest order, with the root they will have.
#[derive(Debug)]
pub struct StudyPlan {
    pub study_uid: String,
    pub root: Digest,
    /// Series UID -> instances, ordered as in the manifest.
    instances: Vec<Scanned>,
    skeleton: StudyManifest,
}

impl StudyPlan {
    pub fn instances(&self) -> &[Scanned] {
        &self.instances
    }
    pub fn file_bytes(&self) -> u64 {
        self.instances.iter().map(|s| s.file_len).sum()
    }
}

/// An instance left out of a plan, and why.
#[derive(Debug)]
pub struct Skipped {
    pub source: String,
    pub reason: String,
}

fn placeholder(d: Digest, len: u64) -> ObjectRef {
    ObjectRef {
        address: Digest::default(),
        digest: d,
        len,
        key: ObjectKey::from_bytes([0; 32]),
    }
}

/// Groups scanned instances into studies. The same SOP Instance UID twice with the same
/// content is stored once; with different content the later file is skipped and reported.
pub fn plan(scanned: Vec<Scanned>) -> (Vec<StudyPlan>, Vec<Skipped>) {
    let mut studies: BTreeMap<String, BTreeMap<String, BTreeMap<String, Scanned>>> =
        BTreeMap::new();
    let mut skipped = Vec::new();
    for s in scanned {
        let ids = s.split.ids.clone();
        let series = studies
            .entry(ids.study_uid.clone())
            .or_default()
            .entry(ids.series_uid.clone())
            .or_default();
        match series.get(&ids.sop_instance_uid) {
            Some(prev) if prev.header == s.header && prev.pixels == s.pixels => {}
            Some(prev) => skipped.push(Skipped {
                source: s.source.name(),
                reason: format!(
                    "SOP Instance UID {} already given by {} with different content",
                    ids.sop_instance_uid,
                    prev.source.name()
                ),
            }),
            None => {
                series.insert(ids.sop_instance_uid.clone(), s);
            }
        }
    }
    let mut plans = Vec::new();
    for (study_uid, series) in studies {
        let mut instances = Vec::new();
        let mut skeleton = StudyManifest {
            study_uid: study_uid.clone(),
            series: Vec::new(),
            derived_from: None,
        };
        for (series_uid, sops) in series {
            let modality = sops
                .values()
                .map(|s| s.split.ids.modality.clone())
                .find(|m| !m.is_empty())
                .unwrap_or_default();
            let mut entry = SeriesEntry {
                series_uid,
                modality,
                instances: Vec::new(),
            };
            for (sop, s) in sops {
                entry.instances.push(InstanceEntry {
                    sop_instance_uid: sop,
                    sop_class_uid: s.split.ids.sop_class_uid.clone(),
                    header: placeholder(s.header.0, s.header.1),
                    pixels: s.pixels.iter().map(|(d, n)| placeholder(*d, *n)).collect(),
                });
                instances.push(s);
            }
            skeleton.series.push(entry);
        }
        plans.push(StudyPlan {
            study_uid,
            root: skeleton.root(),
            instances,
            skeleton,
        });
    }
    (plans, skipped)
}

/// The reference record of a stored study (`refs/<root>.json`), readable without keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StudyRef {
    pub format: String,
    pub root: Digest,
    /// Address of the sealed manifest.
    pub manifest: Digest,
    /// Every object the study needs, its own and shared ones, manifest excluded.
    pub objects: Vec<Digest>,
    /// Sealed bytes of the objects this study wrote itself (shared ones not counted).
    pub own_bytes: u64,
    /// The manifest key, wrapped for each recipient, bound to the root.
    pub envelopes: Vec<WrappedKey>,
}

/// How a study is put.
#[derive(Debug, Default)]
pub struct PutOptions<'a> {
    /// Recipients besides the owner who can open the study.
    pub recipients: &'a [PublicKey],
    /// For a derivative: the root of the original.
    pub derived_from: Option<Digest>,
    /// Objects already stored, by plaintext digest, that this study may reference instead of
    /// storing again (the pixel objects of the original, for its derivative).
    pub reuse: Option<&'a HashMap<Digest, ObjectRef>>,
}

/// What putting one study did.
#[derive(Debug, Clone)]
pub struct PutOutcome {
    pub root: Digest,
    pub manifest: StudyManifest,
    /// The store already held this study; nothing was written.
    pub already_present: bool,
    /// Objects written (manifest included) and their sealed bytes.
    pub objects_written: u64,
    pub bytes_written: u64,
    /// Objects referenced from `reuse` rather than written.
    pub objects_reused: u64,
}

impl PutOutcome {
    /// Plaintext digest -> object, for a derivative to reuse.
    pub fn object_index(&self) -> HashMap<Digest, ObjectRef> {
        self.manifest
            .instances()
            .flat_map(|(_, i)| i.objects())
            .map(|o| (o.digest, o.clone()))
            .collect()
    }
}

/// Limits on a write batch: objects are sealed and flushed in batches of about this size,
/// so memory stays bounded however large the study.
const BATCH_BYTES: u64 = 8 << 20;
const FIRST_BATCH_BYTES: u64 = 1 << 20;
const BATCH_OBJECTS: usize = 4096;

/// [`Store::put_studies`] writes studies in groups of up to this many bytes of files (or
/// [`GROUP_STUDIES`] studies), each group's manifests and records in shared batches.
pub const GROUP_BYTES: u64 = 256 << 20;
pub const GROUP_STUDIES: usize = 512;

/// What writing one study's objects did.
#[derive(Debug, Default, Clone, Copy)]
struct WriteCounts {
    written: u64,
    bytes: u64,
    reused: u64,
}

fn object_key(address: &Digest) -> String {
    format!("objects/{}", address.to_hex())
}

fn ref_key(root: &Digest) -> String {
    format!("refs/{}.json", root.to_hex())
}

/// The manifest key of a study, opened with the holder's envelope and wrapped for
/// `recipient`, bound to the root.
fn rewrap(
    record: &StudyRef,
    holder: &SecretKey,
    recipient: &PublicKey,
) -> Result<WrappedKey, StoreError> {
    let root = record.root;
    let envelope = record
        .envelopes
        .iter()
        .find(|e| e.is_for(&holder.public()))
        .ok_or(StoreError::NotRecipient(root))?;
    let key = medledger_crypto::unwrap(envelope, holder, root.as_bytes())
        .map_err(|e| corrupt(format!("the envelope of study {root}"), e.to_string()))?;
    Ok(medledger_crypto::wrap(&key, recipient, root.as_bytes()))
}

/// Seals a manifest and makes the study's reference record (envelopes for the owner and
/// `recipients`): (the manifest object to write, the record to write after it).
/// A reference record as written: its key and its JSON.
fn ref_write(record: &StudyRef) -> (String, Bytes) {
    let json = serde_json::to_vec_pretty(record).expect("a study reference serialises");
    (ref_key(&record.root), Bytes::from(json))
}

fn seal_manifest(
    manifest: &StudyManifest,
    owner: &SecretKey,
    recipients: &[PublicKey],
    object_bytes: u64,
) -> ((String, Bytes), StudyRef) {
    let root = manifest.root();
    let (manifest_key, sealed) = medledger_crypto::seal(&manifest.encode());
    let manifest_address = Digest::of(&sealed);
    let manifest_bytes = sealed.len() as u64;
    let mut envelopes = vec![medledger_crypto::wrap(
        &manifest_key,
        &owner.public(),
        root.as_bytes(),
    )];
    for r in recipients {
        if !envelopes.iter().any(|e| e.is_for(r)) {
            envelopes.push(medledger_crypto::wrap(&manifest_key, r, root.as_bytes()));
        }
    }
    let objects = manifest.object_addresses();
    let record = StudyRef {
        format: REF_FORMAT.to_string(),
        root,
        manifest: manifest_address,
        objects,
        own_bytes: object_bytes + manifest_bytes,
        envelopes,
    };
    ((object_key(&manifest_address), Bytes::from(sealed)), record)
}

/// A study version sealed in memory by [`Store::stage_version`], written by
/// [`Store::write_staged`].
#[derive(Debug)]
pub struct Staged {
    pub outcome: PutOutcome,
    pub skipped: Vec<Skipped>,
    /// Sealed objects and the sealed manifest.
    writes: Vec<(String, Bytes)>,
    /// The reference record, written once every object of every staged version is durable.
    record: Option<StudyRef>,
    /// Addresses of the objects sealing put in the store's read cache: taken out again if
    /// the version is never written (see [`Store::abandon`]).
    cached: Vec<Digest>,
}

impl Staged {
    /// The outcome, once written: the sealed objects' buffers go back to the pool for the
    /// next ones (a node's committer otherwise drained the pool of what receiving needs).
    pub fn into_outcome(self) -> PutOutcome {
        for (_, b) in self.writes {
            crate::pool::give_bytes(b);
        }
        self.outcome
    }
}

/// Receives each instance of a study being read: its series, its entry, its rebuilt file.
pub type InstanceSink<'a> =
    dyn Fn(&SeriesEntry, &InstanceEntry, Vec<u8>) -> Result<(), StoreError> + Sync + 'a;

/// What getting a study did.
#[derive(Debug, Clone)]
pub struct GetOutcome {
    pub manifest: StudyManifest,
    pub instances: u64,
    pub file_bytes: u64,
}

/// What garbage collection did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcOutcome {
    pub objects_deleted: u64,
    pub bytes_freed: u64,
}

/// What re-keying a study did.
#[derive(Debug, Clone, Serialize)]
pub struct RekeyOutcome {
    pub objects_resealed: u64,
    /// Old objects deleted (the old manifest included).
    pub objects_deleted: u64,
    /// Old objects kept because another study refers to them.
    pub objects_kept_shared: u64,
}

/// A problem `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub study: Option<Digest>,
    pub reason: String,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub objects_checked: u64,
    pub bytes_checked: u64,
    pub studies: u64,
    /// Studies whose manifest was opened with the given key and checked against its root.
    pub studies_opened: u64,
    pub corrupt: Vec<Problem>,
    pub missing: Vec<Problem>,
    /// Objects no study refers to (left by an interrupted put): harmless, reclaimable.
    pub unreferenced: Vec<String>,
    /// Temporary files left by an interrupted writer (filesystem stores).
    pub stale_tmp_files: u64,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty()
    }
}

/// An encrypted, content-addressed store of DICOM studies over one backend.
#[derive(Debug)]
pub struct Store {
    backend: Box<dyn Backend>,
    /// Verified plaintext of objects read lately ([`Store::with_read_cache`]); none by default.
    cache: Option<ObjectCache>,
}

impl Store {
    pub fn new(backend: Box<dyn Backend>) -> Store {
        Store {
            backend,
            cache: None,
        }
    }

    /// Keeps up to `bytes` of the objects [`Store::fetch_instance`] and its kin read, decrypted
    /// and verified, in memory, so that reading them again costs neither decryption nor
    /// hashing (see `cache.rs` for why a hit is as good as a verified read). The objects
    /// [`Store::stage_version`] seals are kept too, from the plaintext they were sealed from:
    /// a study just received is the one most likely to be read next (a radiologist opens
    /// what arrived), and its first reading then costs no disk read either. For a process
    /// that serves the same studies repeatedly; 0 keeps nothing.
    pub fn with_read_cache(mut self, bytes: u64) -> Store {
        self.cache = (bytes > 0).then(|| ObjectCache::new(bytes));
        self
    }

    /// What the read cache has done; none without one.
    pub fn read_cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(ObjectCache::stats)
    }

    /// Deletes objects, and forgets every cached one (a deleted object must not be served).
    fn delete_objects(&self, keys: &[String]) -> Result<(), StoreError> {
        let r = self.backend.delete_many(keys);
        if let Some(c) = &self.cache {
            c.clear();
        }
        Ok(r?)
    }

    /// Opens `s3://bucket/prefix` or a directory (created if missing).
    pub fn open(location: &str) -> Result<Store, StoreError> {
        Ok(Store::new(crate::backend::open(location)?))
    }

    /// Opens an existing store; creates nothing.
    pub fn open_existing(location: &str) -> Result<Store, StoreError> {
        Ok(Store::new(crate::backend::open_existing(location)?))
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Puts one planned study, sealed for `owner` and `opts.recipients`.
    pub fn put_study(
        &self,
        plan: StudyPlan,
        owner: &SecretKey,
        opts: &PutOptions<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<PutOutcome, StoreError> {
        self.put_group(std::slice::from_ref(&plan), owner, opts, progress)
            .map(|mut outcomes| outcomes.pop().expect("one outcome per study"))
    }

    /// Puts several studies as one group: every object of every study in shared batches,
    /// then every manifest in one durable batch, then every reference record in one. A
    /// group of small studies thus costs a few rounds of flushes in all instead of a few
    /// per study. Studies already in the store are opened, not written.
    fn put_group(
        &self,
        plans: &[StudyPlan],
        owner: &SecretKey,
        opts: &PutOptions<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Vec<PutOutcome>, StoreError> {
        let mut present: HashMap<usize, StudyManifest> = HashMap::new();
        for (i, plan) in plans.iter().enumerate() {
            if self.backend.exists(&ref_key(&plan.root))? {
                let (_, manifest) = self.open_manifest(&plan.root, owner)?;
                progress(plan.file_bytes());
                present.insert(i, manifest);
            }
        }
        let mut manifests: Vec<Option<StudyManifest>> = plans
            .iter()
            .enumerate()
            .map(|(i, plan)| {
                (!present.contains_key(&i)).then(|| {
                    let mut m = plan.skeleton.clone();
                    m.derived_from = opts.derived_from;
                    m
                })
            })
            .collect();
        let work: Vec<(usize, &Scanned, &mut InstanceEntry)> = manifests
            .iter_mut()
            .enumerate()
            .filter_map(|(i, m)| m.as_mut().map(|m| (i, m)))
            .flat_map(|(i, manifest)| {
                let slots = manifest
                    .series
                    .iter_mut()
                    .flat_map(|s| s.instances.iter_mut());
                plans[i]
                    .instances
                    .iter()
                    .zip(slots)
                    .map(move |(s, e)| (i, s, e))
            })
            .collect();
        // Objects and manifests go into one batch, durable at once when it is committed.
        let mut batch = self.backend.batch();
        let counts = self.write_instances(work, plans.len(), opts, progress, batch.as_mut())?;

        // Manifests with the objects, then the reference records: a study exists once its
        // record is durable. Wrapping each manifest key is public-key work: in parallel.
        let sealed: Vec<((String, Bytes), StudyRef)> = manifests
            .par_iter()
            .enumerate()
            .filter_map(|(i, m)| m.as_ref().map(|m| (i, m)))
            .map(|(i, manifest)| {
                debug_assert_eq!(manifest.root(), plans[i].root);
                seal_manifest(manifest, owner, opts.recipients, counts[i].bytes)
            })
            .collect();
        let (manifest_writes, records): (Vec<_>, Vec<_>) = sealed.into_iter().unzip();
        batch.add(manifest_writes)?;
        batch.add(records.iter().map(ref_write).collect())?;
        batch.commit()?;
        let mut records = records.into_iter();
        Ok(manifests
            .into_iter()
            .enumerate()
            .map(|(i, manifest)| match manifest {
                None => PutOutcome {
                    root: plans[i].root,
                    manifest: present.remove(&i).expect("present studies were opened"),
                    already_present: true,
                    objects_written: 0,
                    bytes_written: 0,
                    objects_reused: 0,
                },
                Some(manifest) => {
                    let record = records.next().expect("one record per written study");
                    PutOutcome {
                        root: plans[i].root,
                        manifest,
                        already_present: false,
                        objects_written: counts[i].written + 1,
                        bytes_written: record.own_bytes,
                        objects_reused: counts[i].reused,
                    }
                }
            })
            .collect())
    }

    /// Seals the objects of `work`'s instances (each tagged with its study's index, of
    /// `studies`) into their manifest slots and writes them in pipelined batches (sealing the
    /// next batch on the CPU pool while the previous one is written and flushed). Returns,
    /// per study, the objects sealed and written, their sealed bytes, and the objects reused.
    fn write_instances(
        &self,
        work: Vec<(usize, &Scanned, &mut InstanceEntry)>,
        studies: usize,
        opts: &PutOptions<'_>,
        progress: &(dyn Fn(u64) + Sync),
        sink: &mut dyn BatchWriter,
    ) -> Result<Vec<WriteCounts>, StoreError> {
        let counters: Vec<[AtomicU64; 3]> = (0..studies).map(|_| Default::default()).collect();
        let write_error: Mutex<Option<StoreError>> = Mutex::new(None);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(String, Bytes)>>(1);
        std::thread::scope(|s| -> Result<(), StoreError> {
            let write_error = &write_error;
            let writer = s.spawn(move || {
                for batch in rx {
                    if let Err(e) = sink.add(batch) {
                        *write_error.lock().expect("not poisoned") = Some(e.into());
                        return;
                    }
                }
            });
            let mut pending = work;
            // Small batches first, so the disk starts early; then larger ones.
            let mut limit = FIRST_BATCH_BYTES;
            while !pending.is_empty() {
                let mut take = 0;
                let mut bytes = 0;
                let mut objects = 0;
                while take < pending.len() && bytes < limit && objects < BATCH_OBJECTS {
                    bytes += pending[take].1.file_len;
                    objects += 1 + pending[take].1.pixels.len();
                    take += 1;
                }
                limit = (limit * 2).min(BATCH_BYTES);
                let rest = pending.split_off(take);
                let sealed: Vec<Vec<(String, Bytes)>> = pending
                    .into_par_iter()
                    .map(|(study, scanned, slot)| {
                        let [written, sealed_bytes, reused] = &counters[study];
                        let out = seal_instance(scanned, slot, opts.reuse, reused, false)?.writes;
                        written.fetch_add(out.len() as u64, Ordering::Relaxed);
                        sealed_bytes.fetch_add(
                            out.iter().map(|(_, b)| b.len() as u64).sum(),
                            Ordering::Relaxed,
                        );
                        progress(scanned.file_len);
                        Ok(out)
                    })
                    .collect::<Result<_, StoreError>>()?;
                if write_error.lock().expect("not poisoned").is_some() {
                    break;
                }
                let batch: Vec<(String, Bytes)> = sealed.into_iter().flatten().collect();
                if !batch.is_empty() && tx.send(batch).is_err() {
                    break;
                }
                pending = rest;
            }
            drop(tx);
            writer.join().expect("writer thread does not panic");
            Ok(())
        })?;
        if let Some(e) = write_error.into_inner().expect("not poisoned") {
            return Err(e);
        }
        Ok(counters
            .into_iter()
            .map(|[written, bytes, reused]| WriteCounts {
                written: written.into_inner(),
                bytes: bytes.into_inner(),
                reused: reused.into_inner(),
            })
            .collect())
    }

    /// Makes a new version of a study: the instances of `previous` (referenced, not written
    /// again) and `new` ones of the same study, sealed and written. An instance already in
    /// `previous` with the same content is left out (sending it again changes nothing); one
    /// with the same SOP Instance UID and other content is refused and reported. When nothing
    /// is new (no instance, and a derivative still names the same original) the outcome is
    /// `previous` itself, `already_present`, and nothing is written.
    /// The version is durable when this returns; `previous` stays in the store until
    /// [`Store::forget`] drops its record.
    pub fn extend_study(
        &self,
        previous: Option<&StudyManifest>,
        new: Vec<Scanned>,
        owner: &SecretKey,
        opts: &PutOptions<'_>,
    ) -> Result<(PutOutcome, Vec<Skipped>), StoreError> {
        let staged = self.stage_version(previous, new, owner, opts)?;
        if let Err(e) = self.write_staged(&[&staged]) {
            self.abandon(staged);
            return Err(e);
        }
        Ok((staged.outcome, staged.skipped))
    }

    /// Writes staged versions: every object and manifest, then every reference record, in one
    /// batch made durable at once (on the filesystem, one pack), so several versions (an
    /// original and its derivative) cost one round of flushes between them. A record is never
    /// durable without the objects it names.
    /// After an error no version is stored (objects already written are named by no record,
    /// and [`Store::gc`] reclaims them): the caller retries, or
    /// [`abandon`](Store::abandon)s them.
    pub fn write_staged(&self, staged: &[&Staged]) -> Result<(), StoreError> {
        let mut batch = self.backend.batch();
        batch.add(
            staged
                .iter()
                .flat_map(|s| s.writes.iter().cloned())
                .collect(),
        )?;
        batch.add(
            staged
                .iter()
                .filter_map(|s| s.record.as_ref())
                .map(ref_write)
                .collect(),
        )?;
        batch.commit()?;
        Ok(())
    }

    /// Drops a staged version that will not be written: its objects' plaintext leaves the
    /// read cache (their addresses will never be read: a new attempt seals under new keys)
    /// and its buffers go back to the pool.
    pub fn abandon(&self, staged: Staged) {
        if let Some(c) = &self.cache {
            c.remove(&staged.cached);
        }
        staged.into_outcome();
    }

    /// [`Store::extend_study`] up to the writes: the new version sealed in memory (its
    /// manifest already holds the new objects' keys, for a derivative to reuse).
    pub fn stage_version(
        &self,
        previous: Option<&StudyManifest>,
        new: Vec<Scanned>,
        owner: &SecretKey,
        opts: &PutOptions<'_>,
    ) -> Result<Staged, StoreError> {
        let (mut plans, mut skipped) = plan(new);
        if plans.len() > 1 {
            return Err(StoreError::Invalid(format!(
                "a study version is made of one study's instances; got {} studies",
                plans.len()
            )));
        }
        let mut manifest = match previous {
            Some(p) => p.clone(),
            None => StudyManifest {
                study_uid: plans
                    .first()
                    .map(|p| p.study_uid.clone())
                    .unwrap_or_default(),
                series: Vec::new(),
                derived_from: None,
            },
        };
        manifest.derived_from = opts.derived_from.or(manifest.derived_from);
        let mut added: Vec<Scanned> = Vec::new();
        if let Some(plan) = plans.pop() {
            if plan.study_uid != manifest.study_uid {
                return Err(StoreError::Invalid(format!(
                    "instances of study {} cannot extend study {}",
                    plan.study_uid, manifest.study_uid
                )));
            }
            for s in plan.instances {
                let ids = s.split.ids.clone();
                let existing = manifest
                    .series
                    .iter()
                    .flat_map(|se| se.instances.iter())
                    .find(|i| i.sop_instance_uid == ids.sop_instance_uid);
                match existing {
                    Some(i) => {
                        let same = i.header.digest == s.header.0
                            && i.pixels.len() == s.pixels.len()
                            && i.pixels.iter().zip(&s.pixels).all(|(a, b)| a.digest == b.0);
                        if !same {
                            skipped.push(Skipped {
                                source: s.source.name(),
                                reason: format!(
                                    "SOP Instance UID {} is already stored with other content",
                                    ids.sop_instance_uid
                                ),
                            });
                        }
                    }
                    None => {
                        let entry = InstanceEntry {
                            sop_instance_uid: ids.sop_instance_uid.clone(),
                            sop_class_uid: ids.sop_class_uid.clone(),
                            header: placeholder(s.header.0, s.header.1),
                            pixels: s.pixels.iter().map(|(d, n)| placeholder(*d, *n)).collect(),
                        };
                        match manifest
                            .series
                            .iter_mut()
                            .find(|se| se.series_uid == ids.series_uid)
                        {
                            Some(se) => {
                                if se.modality.is_empty() {
                                    se.modality = ids.modality.clone();
                                }
                                se.instances.push(entry);
                            }
                            None => manifest.series.push(SeriesEntry {
                                series_uid: ids.series_uid.clone(),
                                modality: ids.modality.clone(),
                                instances: vec![entry],
                            }),
                        }
                        added.push(s);
                    }
                }
            }
        }
        let relinked = previous.is_some_and(|p| p.derived_from != manifest.derived_from);
        if added.is_empty() && !relinked {
            let Some(previous) = previous else {
                return Err(StoreError::Invalid(
                    "a new study needs at least one instance".into(),
                ));
            };
            let root = previous.root();
            return Ok(Staged {
                outcome: PutOutcome {
                    root,
                    manifest: previous.clone(),
                    already_present: true,
                    objects_written: 0,
                    bytes_written: 0,
                    objects_reused: 0,
                },
                skipped,
                writes: Vec::new(),
                record: None,
                cached: Vec::new(),
            });
        }
        manifest
            .canonicalize()
            .map_err(|e| StoreError::Invalid(format!("study {}: {e}", manifest.study_uid)))?;
        let root = manifest.root();
        let new_uids: HashMap<&str, &Scanned> = added
            .iter()
            .map(|s| (s.split.ids.sop_instance_uid.as_str(), s))
            .collect();
        let work: Vec<(&Scanned, &mut InstanceEntry)> = manifest
            .series
            .iter_mut()
            .flat_map(|s| s.instances.iter_mut())
            .filter_map(|i| new_uids.get(i.sop_instance_uid.as_str()).map(|s| (*s, i)))
            .collect();
        let reused = AtomicU64::new(0);
        let keep = self.cache.is_some();
        let sealed: Vec<SealedObjects> = work
            .into_par_iter()
            .map(|(scanned, slot)| seal_instance(scanned, slot, opts.reuse, &reused, keep))
            .collect::<Result<_, StoreError>>()?;
        // Cached only once every instance is sealed, so that a version that fails here
        // leaves nothing behind.
        let mut writes = Vec::new();
        let mut cached = Vec::new();
        for s in sealed {
            writes.extend(s.writes);
            if let Some(c) = &self.cache {
                for (object, plain) in s.plain {
                    c.insert(&object, plain);
                    cached.push(object.address);
                }
            }
        }
        let object_bytes: u64 = writes.iter().map(|(_, b)| b.len() as u64).sum();
        let objects_written = writes.len() as u64 + 1;
        let (manifest_object, record) =
            seal_manifest(&manifest, owner, opts.recipients, object_bytes);
        writes.push(manifest_object);
        Ok(Staged {
            outcome: PutOutcome {
                root,
                manifest,
                already_present: false,
                objects_written,
                bytes_written: record.own_bytes,
                objects_reused: reused.into_inner(),
            },
            skipped,
            writes,
            record: Some(record),
            cached,
        })
    }

    /// Drops a study's reference record (a version superseded by a newer one). Its objects
    /// stay until [`Store::gc`] finds none of the remaining studies needs them.
    pub fn forget(&self, root: &Digest) -> Result<(), StoreError> {
        match self.backend.delete(&ref_key(root)) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Puts several studies in groups (see [`GROUP_BYTES`]): a group's objects, manifests
    /// and reference records are each written in shared durable batches, so many small
    /// studies cost a few rounds of flushes per group rather than per study. `done` is called
    /// for each study once it is durable. A group that fails is put again study by study, so
    /// that each study gets its own outcome (objects already written are content-addressed
    /// and written again harmlessly).
    /// Reads, plans and puts files: what `medledger store put` does. Up to [`GROUP_BYTES`]
    /// of files go in one pass (each file read, split, digested, sealed and its objects
    /// written at once, so the disk starts with the first file; the studies are planned after
    /// the last, and objects no study takes, of studies already stored or duplicate files,
    /// are taken back before anything is committed). More than that is scanned first and put
    /// in groups ([`Store::put_studies`]), each durable on its own, so an interrupted put of
    /// many groups keeps the groups it finished. Returns each study's outcome, by study UID,
    /// and the files not stored.
    pub fn put_files(
        &self,
        sources: Vec<Source>,
        owner: &SecretKey,
        opts: &PutOptions<'_>,
        progress: &(dyn Fn(u64) + Sync),
        done: &(dyn Fn(&str, &Result<PutOutcome, StoreError>) + Sync),
    ) -> (StudyResults, Vec<Skipped>) {
        let total: u64 = sources.iter().map(Source::len_hint).sum();
        if !Self::one_pass(total, opts) {
            let (scanned, mut skipped) = scan_all(sources, progress);
            let (plans, dups) = plan(scanned);
            skipped.extend(dups);
            let uids: Vec<String> = plans.iter().map(|p| p.study_uid.clone()).collect();
            let results = self.put_studies(plans, owner, opts, progress, done);
            return (uids.into_iter().zip(results).collect(), skipped);
        }
        let (result, skipped) = self.put_in_one_pass(sources, owner, opts, progress);
        match result {
            Ok(outcomes) => {
                for (uid, r) in &outcomes {
                    done(uid, r);
                }
                (outcomes, skipped)
            }
            // Nothing was committed: put the planned studies again, group by group (their
            // files are read again and checked against the first pass's digests).
            Err((plans, _)) => {
                let uids: Vec<String> = plans.iter().map(|p| p.study_uid.clone()).collect();
                let results = self.put_studies(plans, owner, opts, &|_| {}, done);
                (uids.into_iter().zip(results).collect(), skipped)
            }
        }
    }

    /// How many times [`Store::put_files`] reports each file's bytes to its progress: once
    /// when it puts them in one pass, twice (scan, then put) when in groups.
    pub fn put_passes(sources: &[Source], opts: &PutOptions<'_>) -> u64 {
        if Self::one_pass(sources.iter().map(Source::len_hint).sum(), opts) {
            1
        } else {
            2
        }
    }

    fn one_pass(total: u64, opts: &PutOptions<'_>) -> bool {
        total <= GROUP_BYTES && opts.reuse.is_none()
    }

    fn put_in_one_pass(
        &self,
        sources: Vec<Source>,
        owner: &SecretKey,
        opts: &PutOptions<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> (OnePass, Vec<Skipped>) {
        let mut batch = self.backend.batch();
        let write_error: Mutex<Option<StoreError>> = Mutex::new(None);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(String, Bytes)>>(8);
        let sink = batch.as_mut();
        let results: Vec<Result<Scanned, (String, StoreError)>> = std::thread::scope(|s| {
            let write_error = &write_error;
            s.spawn(move || {
                for items in rx {
                    let written = sink.add(items.clone());
                    // The buffers the backend did not keep are used again for the next objects.
                    for (_, b) in items {
                        crate::pool::give_bytes(b);
                    }
                    if let Err(e) = written {
                        *write_error.lock().expect("not poisoned") = Some(e.into());
                        return;
                    }
                }
            });
            sources
                .into_par_iter()
                .map_with(tx, |tx, source| {
                    let name = source.name();
                    let mut scanned = scan(source).map_err(|e| (name.clone(), e))?;
                    let mut slot = InstanceEntry {
                        sop_instance_uid: String::new(),
                        sop_class_uid: String::new(),
                        header: placeholder(scanned.header.0, scanned.header.1),
                        pixels: scanned
                            .pixels
                            .iter()
                            .map(|(d, n)| placeholder(*d, *n))
                            .collect(),
                    };
                    let none = AtomicU64::new(0);
                    let out = seal_instance(&scanned, &mut slot, None, &none, false)
                        .map_err(|e| (name.clone(), e))?
                        .writes;
                    if let Some(file) = scanned.kept.take() {
                        crate::pool::give_bytes(file);
                    }
                    scanned.sealed = Some(SealedInstance {
                        header: slot.header,
                        pixels: slot.pixels,
                        keys: out.iter().map(|(k, _)| k.clone()).collect(),
                        bytes: out.iter().map(|(_, b)| b.len() as u64).sum(),
                    });
                    progress(scanned.file_len);
                    // The writer has failed: its error is reported below.
                    let _ = tx.send(out);
                    Ok(scanned)
                })
                .collect()
        });
        let (scanned, mut skipped) = sort_scans(results);
        let all_keys: Vec<String> = scanned
            .iter()
            .flat_map(|s| {
                s.sealed
                    .as_ref()
                    .map(|x| x.keys.clone())
                    .unwrap_or_default()
            })
            .collect();
        let (plans, dups) = plan(scanned);
        skipped.extend(dups);
        let prepared = match write_error.into_inner().expect("not poisoned") {
            Some(e) => Err(e),
            None => self.finish_one_pass(&plans, batch.as_mut(), &all_keys, owner, opts),
        };
        let (outcomes, records) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                // No record was added: take everything back (a backend that wrote objects
                // already deletes them), so the put that follows starts clean.
                let _ = batch.forget(&all_keys);
                return (Err((plans, e)), skipped);
            }
        };
        // The records last: a study exists once its record is durable, with its objects.
        if let Err(e) = batch.add(records.iter().map(ref_write).collect()) {
            // Some records may have been written (a backend that writes as it goes): those
            // studies are durable and keep their objects; the rest is taken back.
            let (durable, lost): (Vec<&StudyRef>, Vec<&StudyRef>) = records
                .iter()
                .partition(|r| self.backend.exists(&ref_key(&r.root)).unwrap_or(true));
            let keep: HashSet<String> = durable
                .iter()
                .flat_map(|r| r.objects.iter().map(object_key))
                .collect();
            let back: Vec<String> = all_keys
                .iter()
                .filter(|k| !keep.contains(*k))
                .cloned()
                .chain(lost.iter().map(|r| object_key(&r.manifest)))
                .collect();
            let _ = batch.forget(&back);
            return (Err((plans, e.into())), skipped);
        }
        match batch.commit() {
            Ok(()) => (Ok(outcomes), skipped),
            Err(e) => (Err((plans, e.into())), skipped),
        }
    }

    /// The second half of [`Store::put_files`]'s one pass: manifests from the sealed
    /// instances, added to the batch; objects no study takes, taken back. Returns the
    /// outcomes and the reference records to add last.
    fn finish_one_pass(
        &self,
        plans: &[StudyPlan],
        batch: &mut dyn BatchWriter,
        all_keys: &[String],
        owner: &SecretKey,
        opts: &PutOptions<'_>,
    ) -> Result<(StudyResults, Vec<StudyRef>), StoreError> {
        let mut used: HashSet<&str> = HashSet::new();
        let mut outcomes: Vec<Option<PutOutcome>> = Vec::with_capacity(plans.len());
        let mut fresh: Vec<(usize, StudyManifest, u64, u64)> = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            if self.backend.exists(&ref_key(&plan.root))? {
                let (_, manifest) = self.open_manifest(&plan.root, owner)?;
                outcomes.push(Some(PutOutcome {
                    root: plan.root,
                    manifest,
                    already_present: true,
                    objects_written: 0,
                    bytes_written: 0,
                    objects_reused: 0,
                }));
                continue;
            }
            outcomes.push(None);
            let mut manifest = plan.skeleton.clone();
            manifest.derived_from = opts.derived_from;
            let slots = manifest
                .series
                .iter_mut()
                .flat_map(|s| s.instances.iter_mut());
            let (mut written, mut bytes) = (0u64, 0u64);
            for (scanned, slot) in plan.instances.iter().zip(slots) {
                let sealed = scanned
                    .sealed
                    .as_ref()
                    .expect("every instance of a one-pass put is sealed");
                slot.header = sealed.header.clone();
                slot.pixels = sealed.pixels.clone();
                used.extend(sealed.keys.iter().map(String::as_str));
                written += sealed.keys.len() as u64;
                bytes += sealed.bytes;
            }
            debug_assert_eq!(manifest.root(), plan.root);
            fresh.push((i, manifest, written, bytes));
        }
        let unused: Vec<String> = all_keys
            .iter()
            .filter(|k| !used.contains(k.as_str()))
            .cloned()
            .collect();
        batch.forget(&unused)?;
        let sealed: Vec<((String, Bytes), StudyRef)> = fresh
            .par_iter()
            .map(|(_, manifest, _, bytes)| seal_manifest(manifest, owner, opts.recipients, *bytes))
            .collect();
        let (manifest_writes, records): (Vec<_>, Vec<_>) = sealed.into_iter().unzip();
        batch.add(manifest_writes)?;
        for ((i, manifest, written, _), record) in fresh.into_iter().zip(&records) {
            outcomes[i] = Some(PutOutcome {
                root: plans[i].root,
                manifest,
                already_present: false,
                objects_written: written + 1,
                bytes_written: record.own_bytes,
                objects_reused: 0,
            });
        }
        let outcomes = plans
            .iter()
            .zip(outcomes)
            .map(|(plan, o)| {
                (
                    plan.study_uid.clone(),
                    Ok(o.expect("every study has an outcome")),
                )
            })
            .collect();
        Ok((outcomes, records))
    }

    pub fn put_studies(
        &self,
        plans: Vec<StudyPlan>,
        owner: &SecretKey,
        opts: &PutOptions<'_>,
        progress: &(dyn Fn(u64) + Sync),
        done: &(dyn Fn(&str, &Result<PutOutcome, StoreError>) + Sync),
    ) -> Vec<Result<PutOutcome, StoreError>> {
        let mut results = Vec::with_capacity(plans.len());
        let mut rest = plans.as_slice();
        while !rest.is_empty() {
            let mut take = 0;
            let mut bytes = 0;
            while take < rest.len() && take < GROUP_STUDIES && (take == 0 || bytes < GROUP_BYTES) {
                bytes += rest[take].file_bytes();
                take += 1;
            }
            let (group, next) = rest.split_at(take);
            rest = next;
            match self.put_group(group, owner, opts, progress) {
                Ok(outcomes) => {
                    for (plan, outcome) in group.iter().zip(outcomes) {
                        let r = Ok(outcome);
                        done(&plan.study_uid, &r);
                        results.push(r);
                    }
                }
                Err(_) if group.len() > 1 => {
                    for plan in group {
                        let r = self
                            .put_group(std::slice::from_ref(plan), owner, opts, progress)
                            .map(|mut o| o.pop().expect("one outcome per study"));
                        done(&plan.study_uid, &r);
                        results.push(r);
                    }
                }
                Err(e) => {
                    let r = Err(e);
                    done(&group[0].study_uid, &r);
                    results.push(r);
                }
            }
        }
        results
    }

    /// Seals and writes a manifest, then the study's reference record with envelopes for the
    /// owner and `recipients`: once this returns, the study is durable. `object_bytes` are
    /// the sealed bytes of the objects this study wrote itself.
    fn commit(
        &self,
        manifest: &StudyManifest,
        owner: &SecretKey,
        recipients: &[PublicKey],
        object_bytes: u64,
    ) -> Result<StudyRef, StoreError> {
        let ((key, sealed), record) = seal_manifest(manifest, owner, recipients, object_bytes);
        self.backend.put(&key, sealed)?;
        self.write_ref(&record)?;
        Ok(record)
    }

    fn write_ref(&self, record: &StudyRef) -> Result<(), StoreError> {
        let (key, json) = ref_write(record);
        self.backend.put(&key, json)?;
        Ok(())
    }

    /// The reference record of a study.
    pub fn study_ref(&self, root: &Digest) -> Result<StudyRef, StoreError> {
        let bytes = match self.backend.get(&ref_key(root)) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(StoreError::UnknownRoot(*root)),
            Err(e) => return Err(e.into()),
        };
        let record: StudyRef = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(format!("reference record of {root}"), e.to_string()))?;
        if record.format != REF_FORMAT {
            return Err(corrupt(
                format!("reference record of {root}"),
                format!("unknown format {:?}", record.format),
            ));
        }
        if &record.root != root {
            return Err(corrupt(
                format!("reference record of {root}"),
                format!("it names another root, {}", record.root),
            ));
        }
        Ok(record)
    }

    /// Roots of every study in the store.
    pub fn studies(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out: Vec<Digest> = self
            .backend
            .list("refs/")?
            .into_iter()
            .filter_map(|(k, _)| {
                k.strip_prefix("refs/")
                    .and_then(|n| n.strip_suffix(".json"))
                    .and_then(|h| Digest::from_hex(h).ok())
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Opens a study's manifest with a recipient's key and checks it against the root.
    pub fn open_manifest(
        &self,
        root: &Digest,
        secret: &SecretKey,
    ) -> Result<(StudyRef, StudyManifest), StoreError> {
        let record = self.study_ref(root)?;
        let me = secret.public();
        let envelope = record
            .envelopes
            .iter()
            .find(|e| e.is_for(&me))
            .ok_or(StoreError::NotRecipient(*root))?;
        let manifest = self.open_sealed_manifest(root, &record.manifest, envelope, secret)?;
        Ok((record, manifest))
    }

    /// Opens the sealed manifest at `address` with the key `envelope` wraps for `secret`,
    /// and checks that its content has `root`.
    fn open_sealed_manifest(
        &self,
        root: &Digest,
        address: &Digest,
        envelope: &WrappedKey,
        secret: &SecretKey,
    ) -> Result<StudyManifest, StoreError> {
        let key = medledger_crypto::unwrap(envelope, secret, root.as_bytes())
            .map_err(|e| corrupt(format!("the envelope of study {root}"), e.to_string()))?;
        let sealed = self.get_object(address)?;
        let plain = medledger_crypto::open(&key, &sealed)
            .map_err(|e| corrupt(format!("manifest of study {root}"), e.to_string()))?;
        let manifest = StudyManifest::decode(&plain).map_err(|source| StoreError::Decode {
            what: format!("manifest of study {root}"),
            source,
        })?;
        let actual = manifest.root();
        if &actual != root {
            return Err(corrupt(
                format!("manifest of study {root}"),
                format!("its content has root {actual}"),
            ));
        }
        Ok(manifest)
    }

    /// Fetches a sealed object and checks it against its address.
    fn get_object(&self, address: &Digest) -> Result<Bytes, StoreError> {
        let key = object_key(address);
        let bytes = self.backend.get(&key)?;
        let actual = Digest::of(&bytes);
        if &actual != address {
            return Err(corrupt(
                key,
                format!("its bytes digest to {actual} ({} bytes)", bytes.len()),
            ));
        }
        Ok(bytes)
    }

    /// Fetches, opens and checks one object against its reference.
    ///
    /// The ciphertext is not hashed against its address here: AES-GCM's tag under the
    /// object's own key already refuses any changed bit, and the plaintext is checked against
    /// the digest the manifest (and so the ledger's root) commits to. `verify`, which has no
    /// keys, checks addresses.
    pub fn fetch(&self, r: &ObjectRef) -> Result<Vec<u8>, StoreError> {
        let key = object_key(&r.address);
        let sealed = self.backend.get(&key)?;
        // The backend's buffer, decrypted where it lies (a copy only if it is shared).
        let sealed = Vec::from(bytes::BytesMut::from(sealed));
        let plain = medledger_crypto::open_owned(&r.key, sealed)
            .map_err(|e| corrupt(object_key(&r.address), e.to_string()))?;
        if plain.len() as u64 != r.len || Digest::of(&plain) != r.digest {
            return Err(corrupt(
                object_key(&r.address),
                "its plaintext does not match the manifest",
            ));
        }
        Ok(plain)
    }

    /// [`Store::fetch`] through the read cache, if there is one: a hit is the plaintext an
    /// earlier fetch of the same reference verified; a miss is fetched, verified and kept.
    fn fetch_shared(&self, r: &ObjectRef) -> Result<Bytes, StoreError> {
        let Some(cache) = &self.cache else {
            return self.fetch(r).map(Bytes::from);
        };
        if let Some(plain) = cache.get(r) {
            return Ok(plain);
        }
        let plain = Bytes::from(self.fetch(r)?);
        cache.insert(r, plain.clone());
        Ok(plain)
    }

    /// Rebuilds one instance's Part 10 file, every object verified.
    pub fn fetch_instance(&self, instance: &InstanceEntry) -> Result<Vec<u8>, StoreError> {
        let header = self.fetch_shared(&instance.header)?;
        let pixels: Vec<Bytes> = instance
            .pixels
            .iter()
            .map(|p| self.fetch_shared(p))
            .collect::<Result<_, _>>()?;
        split::rebuild(&header, &pixels)
            .map_err(|reason| corrupt(format!("instance {}", instance.sop_instance_uid), reason))
    }

    /// The instance's Part 10 file for reading its attributes only: the header object's bytes
    /// as stored, verified, with every pixel object replaced by a placeholder of its length
    /// (one encapsulated item of zeros), so no pixel object is read. The pixel values are not
    /// the instance's: use [`Store::fetch_instance`] for them.
    pub fn fetch_instance_attributes(
        &self,
        instance: &InstanceEntry,
    ) -> Result<Vec<u8>, StoreError> {
        let header = self.fetch_shared(&instance.header)?;
        let lens: Vec<u64> = instance.pixels.iter().map(|p| p.len).collect();
        split::rebuild_without_pixels(&header, &lens)
            .map_err(|reason| corrupt(format!("instance {}", instance.sop_instance_uid), reason))
    }

    /// [`Store::fetch_instance`] as the pieces of the file in order (see
    /// [`split::rebuild_parts`]): the same bytes, every object verified, nothing copied.
    pub fn fetch_instance_parts(
        &self,
        instance: &InstanceEntry,
    ) -> Result<Vec<bytes::Bytes>, StoreError> {
        let header = self.fetch_shared(&instance.header)?;
        let pixels: Vec<Bytes> = instance
            .pixels
            .iter()
            .map(|p| self.fetch_shared(p))
            .collect::<Result<_, _>>()?;
        split::rebuild_parts(header, pixels)
            .map_err(|reason| corrupt(format!("instance {}", instance.sop_instance_uid), reason))
    }

    /// Gets a whole study: every instance rebuilt, verified, and handed to `sink`.
    pub fn get_study(
        &self,
        root: &Digest,
        secret: &SecretKey,
        sink: &InstanceSink<'_>,
    ) -> Result<GetOutcome, StoreError> {
        let (_, manifest) = self.open_manifest(root, secret)?;
        let items: Vec<(&SeriesEntry, &InstanceEntry)> = manifest.instances().collect();
        let bytes = AtomicU64::new(0);
        items.par_iter().try_for_each(|(s, i)| {
            let file = self.fetch_instance(i)?;
            bytes.fetch_add(file.len() as u64, Ordering::Relaxed);
            sink(s, i, file)
        })?;
        Ok(GetOutcome {
            instances: items.len() as u64,
            file_bytes: bytes.into_inner(),
            manifest,
        })
    }

    /// Shares a study with one more recipient: adds one wrapped key, re-encrypts nothing.
    /// Returns false if the recipient already had an envelope.
    pub fn share(
        &self,
        root: &Digest,
        holder: &SecretKey,
        recipient: &PublicKey,
    ) -> Result<bool, StoreError> {
        let mut record = self.study_ref(root)?;
        if record.envelopes.iter().any(|e| e.is_for(recipient)) {
            return Ok(false);
        }
        let envelope = rewrap(&record, holder, recipient)?;
        record.envelopes.push(envelope);
        self.write_ref(&record)?;
        Ok(true)
    }

    /// The study's manifest key wrapped for `recipient` (bound to the root), made by the
    /// holder of an envelope; the store is not changed. What a grant on the ledger carries.
    pub fn envelope_for(
        &self,
        root: &Digest,
        holder: &SecretKey,
        recipient: &PublicKey,
    ) -> Result<WrappedKey, StoreError> {
        rewrap(&self.study_ref(root)?, holder, recipient)
    }

    /// A sealed object's bytes as stored, not checked: what a serving node sends; the
    /// receiver checks every byte against the manifest its ledger registered.
    pub fn raw_object(&self, address: &Digest) -> Result<Bytes, StoreError> {
        match self.backend.get(&object_key(address)) {
            Ok(b) => Ok(b),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the store holds an object (not read, not checked).
    pub fn has_object(&self, address: &Digest) -> Result<bool, StoreError> {
        Ok(self.backend.exists(&object_key(address))?)
    }

    /// Writes sealed objects received from another store, each checked against its address
    /// first; durable on return.
    pub fn put_sealed(&self, objects: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        let mut items = Vec::with_capacity(objects.len());
        for (address, bytes) in objects {
            let actual = Digest::of(&bytes);
            if actual != address {
                return Err(corrupt(
                    object_key(&address),
                    format!("its bytes digest to {actual}"),
                ));
            }
            items.push((object_key(&address), bytes));
        }
        self.backend.put_batch(items)?;
        Ok(())
    }

    /// Like [`Store::put_sealed`] for objects the caller has just checked against their
    /// addresses (a receiving node verifies each object before anything else): not hashed
    /// again.
    pub fn put_checked(&self, objects: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        let items = objects
            .into_iter()
            .map(|(a, b)| (object_key(&a), b))
            .collect();
        self.backend.put_batch(items)?;
        Ok(())
    }

    /// Takes in a study received whole from another store: its sealed manifest and objects
    /// are already written ([`Store::put_sealed`]); this writes the reference record with
    /// `envelope` (the manifest key wrapped for this store's owner, as a grant carries it)
    /// after checking that the envelope opens the manifest and the manifest has `root`.
    pub fn adopt(
        &self,
        root: &Digest,
        manifest_address: &Digest,
        envelope: WrappedKey,
        owner: &SecretKey,
    ) -> Result<StudyManifest, StoreError> {
        let manifest = self.open_sealed_manifest(root, manifest_address, &envelope, owner)?;
        let objects = manifest.object_addresses();
        self.require_objects(&objects)?;
        self.write_ref(&StudyRef {
            format: REF_FORMAT.to_string(),
            root: *root,
            manifest: *manifest_address,
            objects,
            own_bytes: 0,
            envelopes: vec![envelope],
        })?;
        Ok(manifest)
    }

    /// Fails with the first of `objects` this store does not hold.
    fn require_objects(&self, objects: &[Digest]) -> Result<(), StoreError> {
        for a in objects {
            if !self.has_object(a)? {
                return Err(StoreError::Backend(BackendError::NotFound(object_key(a))));
            }
        }
        Ok(())
    }

    /// Stores a manifest over objects already in this store (part of a study received from
    /// another store), sealed for the owner; returns its root.
    pub fn put_manifest(
        &self,
        manifest: &StudyManifest,
        owner: &SecretKey,
    ) -> Result<Digest, StoreError> {
        self.require_objects(&manifest.object_addresses())?;
        let ((key, sealed), record) = seal_manifest(manifest, owner, &[], 0);
        self.backend.put(&key, sealed)?;
        self.write_ref(&record)?;
        Ok(record.root)
    }

    /// A small JSON record beside the studies (`notes/<name>.json`), durable on return.
    pub fn put_note(&self, name: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(value).expect("JSON serialises");
        self.backend
            .put(&format!("notes/{name}.json"), Bytes::from(json))?;
        Ok(())
    }

    /// Every note under `prefix` (e.g. `received/`), by name.
    pub fn notes(&self, prefix: &str) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let mut out = Vec::new();
        for (k, _) in self.backend.list(&format!("notes/{prefix}"))? {
            let Some(name) = k
                .strip_prefix("notes/")
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let bytes = self.backend.get(&k)?;
            let v =
                serde_json::from_slice(&bytes).map_err(|e| corrupt(k.clone(), e.to_string()))?;
            out.push((name.to_string(), v));
        }
        Ok(out)
    }

    /// Writes a private record (`private/<name>`): derived data only its owner may read,
    /// such as a node's index of its studies. Sealed under a fresh key wrapped for `owner`
    /// and bound to the name, so a record cannot be read or moved under another name; durable
    /// on return.
    pub fn put_private(
        &self,
        name: &str,
        plaintext: &[u8],
        owner: &PublicKey,
    ) -> Result<(), StoreError> {
        let key = format!("private/{name}");
        crate::backend::check_key(&key)?;
        let (object_key, sealed) = medledger_crypto::seal(plaintext);
        let envelope = medledger_crypto::wrap(&object_key, owner, &private_context(name));
        let mut out = Vec::with_capacity(4 + 112 + sealed.len());
        out.extend_from_slice(PRIVATE_MAGIC);
        out.extend_from_slice(&envelope.recipient);
        out.extend_from_slice(&envelope.enc);
        out.extend_from_slice(&envelope.ciphertext);
        out.extend_from_slice(&sealed);
        self.backend.put(&key, Bytes::from(out))?;
        Ok(())
    }

    /// Reads a private record written by [`Store::put_private`]; `None` if there is none.
    /// A record that does not open under `secret` (damaged, or another owner's) is `Corrupt`.
    pub fn get_private(
        &self,
        name: &str,
        secret: &SecretKey,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = format!("private/{name}");
        let bytes = match self.backend.get(&key) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let head = 4 + 32 + 32 + 48;
        if bytes.len() < head || &bytes[..4] != PRIVATE_MAGIC {
            return Err(corrupt(key, "not a private record"));
        }
        if bytes[4..36] != secret.public().to_bytes() {
            return Err(corrupt(key, "it is not sealed for this key"));
        }
        let envelope = WrappedKey {
            recipient: bytes[4..36].try_into().expect("32 bytes"),
            enc: bytes[36..68].try_into().expect("32 bytes"),
            ciphertext: bytes[68..head].to_vec(),
        };
        let object_key = medledger_crypto::unwrap(&envelope, secret, &private_context(name))
            .map_err(|e| corrupt(key.clone(), e.to_string()))?;
        medledger_crypto::open(&object_key, &bytes[head..])
            .map(Some)
            .map_err(|e| corrupt(key, e.to_string()))
    }

    /// Names of the private records under `prefix`.
    pub fn list_private(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .backend
            .list(&format!("private/{prefix}"))?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix("private/").map(str::to_string))
            .collect())
    }

    /// Deletes a private record (none is no error).
    pub fn delete_private(&self, name: &str) -> Result<(), StoreError> {
        match self.backend.delete(&format!("private/{name}")) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Seals a study again under new keys, for the owner and exactly `recipients`, and deletes
    /// its old objects that no other study refers to. After this, keys handed out before open
    /// nothing that remains of the study (objects shared with another study, such as pixel
    /// objects a derivative references, stay for that study). The root does not change.
    pub fn rekey(
        &self,
        root: &Digest,
        owner: &SecretKey,
        recipients: &[PublicKey],
    ) -> Result<RekeyOutcome, StoreError> {
        let (old_record, old) = self.open_manifest(root, owner)?;
        let mut manifest = old.clone();
        let mut slots: Vec<&mut ObjectRef> = manifest
            .series
            .iter_mut()
            .flat_map(|s| s.instances.iter_mut())
            .flat_map(|i| std::iter::once(&mut i.header).chain(i.pixels.iter_mut()))
            .collect();
        let mut resealed = 0u64;
        let mut written_bytes = 0u64;
        let mut rest: &mut [&mut ObjectRef] = &mut slots;
        while !rest.is_empty() {
            let mut take = 0;
            let mut bytes = 0;
            while take < rest.len() && bytes < BATCH_BYTES && take < BATCH_OBJECTS {
                bytes += rest[take].len;
                take += 1;
            }
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(take);
            rest = tail;
            let batch: Vec<(String, Bytes)> = chunk
                .par_iter_mut()
                .map(|slot| {
                    let plain = self.fetch(slot)?;
                    let mut out = Vec::with_capacity(1);
                    **slot = seal_object(&plain, slot.digest, &mut out);
                    Ok(out.pop().expect("one object sealed"))
                })
                .collect::<Result<_, StoreError>>()?;
            resealed += batch.len() as u64;
            written_bytes += batch.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
            self.backend.put_batch(batch)?;
        }
        debug_assert_eq!(manifest.root(), *root);
        self.commit(&manifest, owner, recipients, written_bytes)?;

        // The new record is durable: old objects no study refers to any more can go.
        let mut still_used: HashSet<Digest> = HashSet::new();
        for other in self.studies()? {
            let r = self.study_ref(&other)?;
            still_used.extend(r.objects);
            still_used.insert(r.manifest);
        }
        let mut kept_shared = 0;
        let mut doomed = Vec::new();
        for address in old_record.objects.iter().chain([&old_record.manifest]) {
            if still_used.contains(address) {
                kept_shared += 1;
            } else {
                doomed.push(object_key(address));
            }
        }
        self.delete_objects(&doomed)?;
        let deleted = doomed.len() as u64;
        Ok(RekeyOutcome {
            objects_resealed: resealed,
            objects_deleted: deleted,
            objects_kept_shared: kept_shared,
        })
    }

    /// Deletes objects no study refers to (left by interrupted puts or by re-keying while
    /// another study still used them). Only safe while no put is running on this store: a
    /// running put's objects are unreferenced until its record is written.
    pub fn gc(&self) -> Result<GcOutcome, StoreError> {
        let mut used: HashSet<Digest> = HashSet::new();
        for root in self.studies()? {
            let r = self.study_ref(&root)?;
            used.extend(r.objects);
            used.insert(r.manifest);
        }
        let mut out = GcOutcome::default();
        let mut doomed = Vec::new();
        for (key, len) in self.backend.list("objects/")? {
            let referenced = key
                .strip_prefix("objects/")
                .and_then(|h| Digest::from_hex(h).ok())
                .is_some_and(|d| used.contains(&d));
            if !referenced {
                doomed.push(key);
                out.objects_deleted += 1;
                out.bytes_freed += len;
            }
        }
        self.delete_objects(&doomed)?;
        Ok(out)
    }

    /// Walks the whole store: every object against its address, every study's objects
    /// present; with a key, every manifest it opens checked against its root and, if `deep`,
    /// every object of those studies decrypted and checked against the manifest.
    pub fn verify(
        &self,
        secret: Option<&SecretKey>,
        deep: bool,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let listed = self.backend.list("objects/")?;
        let total: u64 = listed.iter().map(|(_, n)| n).sum();
        let done = AtomicU64::new(0);
        let problems: Vec<Problem> = listed
            .par_iter()
            .filter_map(|(key, _)| {
                let name = key.strip_prefix("objects/").unwrap_or(key);
                let result = match Digest::from_hex(name) {
                    Err(_) => Some("the name is not a content address".to_string()),
                    Ok(address) => match self.backend.get(key) {
                        Ok(bytes) => {
                            let n = done.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            progress(n + bytes.len() as u64, total);
                            let actual = Digest::of(&bytes);
                            (actual != address)
                                .then(|| format!("its {} bytes digest to {actual}", bytes.len()))
                        }
                        Err(e) if e.is_not_found() => {
                            Some("listed but vanished while being read".into())
                        }
                        Err(e) => Some(e.to_string()),
                    },
                };
                result.map(|reason| Problem {
                    key: key.clone(),
                    study: None,
                    reason,
                })
            })
            .collect();
        report.objects_checked = listed.len() as u64;
        report.bytes_checked = total;
        report.corrupt = problems;
        // Damage the backend found in its own structures (a pack with a damaged index, whose
        // later objects and records may be lost with it).
        report.corrupt.extend(
            self.backend
                .damage()?
                .into_iter()
                .map(|(key, reason)| Problem {
                    key,
                    study: None,
                    reason,
                }),
        );
        let bad: HashSet<String> = report.corrupt.iter().map(|p| p.key.clone()).collect();
        let present: HashSet<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
        let mut referenced: HashSet<String> = HashSet::new();

        for (key, _) in self.backend.list("refs/")? {
            let Some(root) = key
                .strip_prefix("refs/")
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|h| Digest::from_hex(h).ok())
            else {
                report.corrupt.push(Problem {
                    key,
                    study: None,
                    reason: "not a reference record name".into(),
                });
                continue;
            };
            report.studies += 1;
            let record = match self.study_ref(&root) {
                Ok(r) => r,
                Err(e) => {
                    report.corrupt.push(Problem {
                        key,
                        study: Some(root),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            for address in record.objects.iter().chain([&record.manifest]) {
                let k = object_key(address);
                if !present.contains(k.as_str()) {
                    report.missing.push(Problem {
                        key: k.clone(),
                        study: Some(root),
                        reason: "referenced by the study but not in the store".into(),
                    });
                }
                referenced.insert(k);
            }
            if let Some(secret) = secret
                && record.envelopes.iter().any(|e| e.is_for(&secret.public()))
                && !bad.contains(&object_key(&record.manifest))
                && present.contains(object_key(&record.manifest).as_str())
            {
                match self.open_manifest(&root, secret) {
                    Ok((_, manifest)) => {
                        report.studies_opened += 1;
                        self.check_manifest(
                            &root,
                            &record,
                            &manifest,
                            deep,
                            &present,
                            &bad,
                            &mut report,
                        );
                    }
                    Err(e) => report.corrupt.push(Problem {
                        key: object_key(&record.manifest),
                        study: Some(root),
                        reason: e.to_string(),
                    }),
                }
            }
        }
        report.unreferenced = present
            .iter()
            .filter(|k| !referenced.contains(**k))
            .map(|k| k.to_string())
            .collect();
        report.unreferenced.sort();
        report.missing.sort_by(|a, b| a.key.cmp(&b.key));
        report.corrupt.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    fn check_manifest(
        &self,
        root: &Digest,
        record: &StudyRef,
        manifest: &StudyManifest,
        deep: bool,
        present: &HashSet<&str>,
        bad: &HashSet<String>,
        report: &mut VerifyReport,
    ) {
        let listed: HashSet<&Digest> = record.objects.iter().collect();
        let refs: Vec<&ObjectRef> = manifest
            .instances()
            .flat_map(|(_, i)| i.objects())
            .collect();
        for r in &refs {
            if !listed.contains(&r.address) {
                report.corrupt.push(Problem {
                    key: ref_key(root),
                    study: Some(*root),
                    reason: format!("does not list object {} of its manifest", r.address),
                });
            }
        }
        if !deep {
            return;
        }
        let problems: Vec<Problem> = refs
            .par_iter()
            .filter(|r| {
                let k = object_key(&r.address);
                present.contains(k.as_str()) && !bad.contains(&k)
            })
            .filter_map(|r| {
                self.fetch(r).err().map(|e| Problem {
                    key: object_key(&r.address),
                    study: Some(*root),
                    reason: e.to_string(),
                })
            })
            .collect();
        report.corrupt.extend(problems);
    }
}

/// One instance's sealed objects, to write, and with them, if asked for, the plaintext of
/// each under its new reference, for the read cache.
struct SealedObjects {
    writes: Vec<(String, Bytes)>,
    plain: Vec<(ObjectRef, Bytes)>,
}

/// Seals one instance's objects (reusing those in `reuse`), filling in its manifest entry.
/// With `keep`, each new object's plaintext is copied out too (so that the instance's
/// buffer can go back to the pool).
fn seal_instance(
    scanned: &Scanned,
    slot: &mut InstanceEntry,
    reuse: Option<&HashMap<Digest, ObjectRef>>,
    reused: &AtomicU64,
    keep: bool,
) -> Result<SealedObjects, StoreError> {
    let changed = || StoreError::Changed {
        source_name: scanned.source.name(),
    };
    // Kept bytes are the ones digested in the first pass; re-read ones are checked again.
    let (file, check) = match &scanned.kept {
        Some(b) => (b.clone(), false),
        None => (scanned.source.load()?, true),
    };
    if file.len() as u64 != scanned.file_len {
        return Err(changed());
    }
    let mut out = Vec::with_capacity(1 + scanned.pixels.len());
    let mut kept = Vec::new();
    let header = scanned.split.header_object(&file);
    if check && Digest::of(&header) != scanned.header.0 {
        return Err(changed());
    }
    slot.header = seal_object(&header, scanned.header.0, &mut out);
    if keep {
        kept.push((slot.header.clone(), Bytes::from(header)));
    }
    for (i, range) in scanned.split.pixels.iter().enumerate() {
        let expected = scanned.pixels[i].0;
        let plain = &file[range.clone()];
        if check && Digest::of(plain) != expected {
            return Err(changed());
        }
        if let Some(existing) = reuse.and_then(|m| m.get(&expected)) {
            // The plaintext is identical to an object already stored: reference it.
            slot.pixels[i] = existing.clone();
            reused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        slot.pixels[i] = seal_object(plain, expected, &mut out);
        if keep {
            kept.push((slot.pixels[i].clone(), Bytes::copy_from_slice(plain)));
        }
    }
    Ok(SealedObjects {
        writes: out,
        plain: kept,
    })
}

fn seal_object(plain: &[u8], digest: Digest, out: &mut Vec<(String, Bytes)>) -> ObjectRef {
    let buffer = crate::pool::take(plain.len() + medledger_crypto::SEAL_OVERHEAD);
    let (key, sealed) = medledger_crypto::seal_into(plain, buffer);
    let address = Digest::of(&sealed);
    out.push((object_key(&address), Bytes::from(sealed)));
    ObjectRef {
        address,
        digest,
        len: plain.len() as u64,
        key,
    }
}

/// Scans files in parallel: (scanned instances, files that could not be scanned).
pub fn scan_all(
    sources: Vec<Source>,
    progress: &(dyn Fn(u64) + Sync),
) -> (Vec<Scanned>, Vec<Skipped>) {
    let kept = AtomicU64::new(0);
    let results: Vec<Result<Scanned, (String, StoreError)>> = sources
        .into_par_iter()
        .map(|s| {
            let name = s.name();
            let mut r = scan(s).map_err(|e| (name, e));
            if let Ok(sc) = &mut r {
                progress(sc.file_len);
                let within = sc.file_len <= KEEP_MAX_FILE
                    && kept.fetch_add(sc.file_len, Ordering::Relaxed) + sc.file_len <= KEEP_BUDGET;
                if !within {
                    sc.kept = None;
                }
            }
            r
        })
        .collect();
    sort_scans(results)
}

/// Scanned files, and the files that could not be scanned with the reason.
#[allow(clippy::type_complexity)]
fn sort_scans(results: Vec<Result<Scanned, (String, StoreError)>>) -> (Vec<Scanned>, Vec<Skipped>) {
    let mut ok = Vec::new();
    let mut skipped = Vec::new();
    for r in results {
        match r {
            Ok(s) => ok.push(s),
            Err((source, e)) => skipped.push(Skipped {
                source,
                reason: match e {
                    StoreError::Split { error, .. } => error.to_string(),
                    e => e.to_string(),
                },
            }),
        }
    }
    (ok, skipped)
}

/// Scans in-memory files (derivatives made on the way in).
pub fn scan_memory(name: String, bytes: Bytes) -> Result<Scanned, StoreError> {
    let b = bytes.clone();
    let mut s = scan_bytes(Source::Memory { name, bytes }, &b)?;
    s.kept = Some(b);
    Ok(s)
}

//! The ingest pipeline and the registrar: every instance that arrives (C-STORE, STOW-RS,
//! `medledger import`) is checked, acknowledged once durable (sealed in the ingest journal
//! and flushed, see `journal`; or, when it cannot go through the journal, once stored),
//! de-identified under the organisation's policy and stored encrypted as original and
//! derivative; studies that have been quiet for `stable_ms` are registered on the ledger,
//! and become visible to queries once the registration is final.
//!
//! One committer thread takes whatever has queued up while it was busy (group commit): each
//! study touched by the batch gets one new version of its original and one of its derivative,
//! so a batch of 64 instances costs two manifests and two reference records, not 128.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dicom_dictionary_std::tags;
use medledger_crypto::{Digest, SecretKey, SigningKey};
use medledger_deid::{DeidConfig, DeidError, DeidKey, DeidOption, Deidentifier, OptionSet};
use medledger_ledger::{DeidRecord, Op, Tx};
use medledger_node::{Client, ClientError, ImagingConfig};
use medledger_store::{PutOptions, Scanned, Store, StoreError, StudyManifest, scan_memory};
use rayon::prelude::*;

use crate::index::{Index, InstanceMeta, StudyState, Version, View};
use crate::journal::Journal;
use crate::snapshot::{self, StudyRecord};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what} {path}: {reason}")]
    Key {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("store {location}: {source}")]
    Store {
        location: String,
        #[source]
        source: StoreError,
    },
    #[error("de-identification option {0:?} is unknown")]
    Option(String),
    #[error("rebuilding the index: {0}")]
    Index(String),
    #[error("{0}")]
    Journal(String),
}

/// Why an instance was not stored. Messages name attributes and kinds of problem, never
/// patient data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// Not a DICOM instance medledger can store: the sender should not retry.
    #[error("{0}")]
    Malformed(String),
    /// The SOP Instance UID is already stored with other content.
    #[error("{0}")]
    Conflict(String),
    /// Storage failed: nothing was acknowledged; the sender may retry.
    #[error("cannot store: {0}")]
    Unavailable(String),
}

/// An instance stored (durably) by [`Service::ingest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_uid: String,
    /// The de-identified derivative's Study Instance UID (what anonymous queries show).
    pub derived_study_uid: Option<String>,
    /// An instance with this SOP Instance UID was already stored; the first one is kept
    /// (as Orthanc does by default), nothing changed.
    pub duplicate: bool,
    /// Stored as an original only: why it has no de-identified derivative.
    pub warning: Option<String>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub instances_received: AtomicU64,
    pub instances_stored: AtomicU64,
    pub instances_duplicate: AtomicU64,
    pub instances_rejected: AtomicU64,
    pub instances_quarantined: AtomicU64,
    pub bytes_received: AtomicU64,
    pub batches: AtomicU64,
    /// Instances submitted and not yet answered.
    pub in_flight: AtomicU64,
    pub studies_registered: AtomicU64,
    pub registration_failures: AtomicU64,
    /// Index records written (see `snapshot`).
    pub index_records_written: AtomicU64,
    /// How the index was made at start: studies read from their records, studies rebuilt
    /// from the store and the ledger, and the time it took.
    pub index_from_records: AtomicU64,
    pub index_rebuilt: AtomicU64,
    pub index_start_ms: AtomicU64,
    /// Instances acknowledged once journalled (stored after the answer).
    pub instances_journaled: AtomicU64,
    /// Journal entries of an earlier run stored at start.
    pub journal_replayed: AtomicU64,
    /// Acknowledged instances the store then refused: kept sealed in the store's private
    /// records (`ingest-failed/`) for an administrator, never dropped.
    pub instances_failed_after_ack: AtomicU64,
    /// Acknowledged instances queued again after the store could not take them.
    pub journal_retries: AtomicU64,
}

struct Job {
    bytes: Bytes,
    /// STOW-RS to a study's URL: instances of other studies are refused before storing.
    study: Option<String>,
    /// The instance's attributes and split, when read before it was journalled.
    pre: Option<Box<InstanceMeta>>,
    reply: Reply,
}

/// Jobs taken for one commit.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    bytes: usize,
    /// A sender waits for one of them to be stored.
    waiting: bool,
}

impl Batch {
    fn push(&mut self, job: Job) {
        self.bytes += job.bytes.len();
        self.waiting |= matches!(job.reply, Reply::Wait(_));
        self.jobs.push(job);
    }

    fn full(&self) -> bool {
        self.jobs.len() >= BATCH_INSTANCES || self.bytes >= BATCH_BYTES
    }
}

/// Who learns how a job ended.
enum Reply {
    /// A sender waiting for its answer (the instance is not acknowledged yet).
    Wait(SyncSender<Result<Stored, IngestError>>),
    /// An instance acknowledged from the journal: its entry is released once it is stored.
    Journal {
        ticket: crate::journal::Ticket,
        sop_uid: Option<String>,
        /// How many times the store could not take it so far.
        attempt: u32,
    },
}

/// Acknowledged instances the store could not take (unreachable, full), each queued again
/// at its time: the node heals when its store comes back, without a restart.
#[derive(Default)]
struct Retries {
    jobs: Vec<(Instant, Job)>,
    bytes: usize,
}

/// A C-STORE instance written into the journal while it arrives: see [`Service::receive`].
/// Dropped unfinished (the transfer failed), its parts are never read back.
pub struct Incoming {
    service: Service,
    parts: Option<Parts>,
}

/// The journal entry of an instance being received.
struct Parts {
    writer: crate::journal::EntryWriter,
    /// Bytes of the file in the journal so far.
    written: usize,
    /// The SOP Instance UID the request named, claimed (see `Inner::claim`) until the
    /// instance is answered.
    claimed: String,
}

/// The least a part of an instance written while it arrives holds (a C-STORE data set
/// arrives in PDUs of up to 128 KiB here): each part costs a record's head, its tag and
/// the rest of its 4 KiB block.
const PART_MIN: usize = 64 << 10;

impl Incoming {
    /// The file so far (header and the fragments received): what came since the last part
    /// is written once it is [`PART_MIN`] bytes or more.
    pub fn grew(&mut self, file: &[u8]) {
        let Some(p) = self.parts.as_mut() else {
            return;
        };
        if p.writer.broken() || file.len() < p.written + PART_MIN {
            return;
        }
        let journal = self.service.inner.journal.as_ref().expect("parts need one");
        match journal.write(&mut p.writer, &file[p.written..]) {
            Ok(()) if !p.writer.broken() => p.written = file.len(),
            Ok(()) => {}
            // The instance is appended whole once received, or refused then.
            Err(e) => tracing::warn!("writing an arriving instance into the journal: {e}"),
        }
    }

    /// The whole file: stored as [`Service::ingest`] stores it, with the parts written so
    /// far as the start of its journal entry.
    pub fn finish(mut self, file: impl Into<Bytes>) -> Result<Stored, IngestError> {
        let parts = self.parts.take();
        self.service.ingest_with(file.into(), None, parts)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.service.inner.unclaim(self.parts.take());
    }
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("written", &self.parts.as_ref().map(|p| p.written))
            .finish_non_exhaustive()
    }
}

/// What [`Inner::journaled_ingest`] did with an instance.
enum Journaled {
    /// Journalled: the sender may be told it is stored.
    Acknowledged(Stored),
    /// To be stored before it is answered (no journal, not ready, a SOP Instance UID seen
    /// before, too large), with what was read of it already.
    Not {
        bytes: Bytes,
        pre: Option<Box<InstanceMeta>>,
    },
}

/// Senders are answered from the journal, before their instances are stored: the threads
/// that answer them go first when the CPUs are busy, the threads that store yield. Best
/// effort (a thread's nice value, Linux).
fn lower_priority() {
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), COMMITTER_NICE);
}

/// How long the committer waits for senders answered from the journal (see [`gather`]).
#[derive(Debug, Clone, Copy)]
struct Defer {
    quiet: Duration,
    longest: Duration,
}

/// The batch that starts with `first`: what is queued, and, with `defer`, what senders
/// answered from the journal send until they pause for `quiet`.
///
/// Why wait: the instances are durable in the journal already, and committing them while
/// they arrive takes the CPUs and the disk from the senders, who wait for each answer (a
/// C-STORE sender's next instance waits for the journal's flush, which the store's own
/// writes slow down). A study sent in one go is committed in the pause that follows it. The
/// wait ends early when the batch is full, when a sender waits for its job to be stored, or
/// after `longest`, so a sender that never pauses still has its instances stored in batches
/// as before, and the memory held stays that of a batch.
fn gather(rx: &Receiver<Job>, first: Job, defer: Option<Defer>) -> Vec<Job> {
    let started = Instant::now();
    let mut batch = Batch::default();
    batch.push(first);
    loop {
        while !batch.full() {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let Some(d) = defer else {
            return batch.jobs;
        };
        if batch.waiting || batch.full() || started.elapsed() >= d.longest {
            return batch.jobs;
        }
        match rx.recv_timeout(d.quiet.min(d.longest.saturating_sub(started.elapsed()))) {
            Ok(j) => batch.push(j),
            // A pause (or shutdown): commit what there is.
            Err(_) => return batch.jobs,
        }
    }
}

/// Queues a job, waiting while the queue is full (back pressure on the senders).
fn send(queue: &SyncSender<Job>, job: Job) -> Result<(), IngestError> {
    match queue.try_send(job) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(job)) => queue
            .send(job)
            .map_err(|_| IngestError::Unavailable("the node is shutting down".into())),
        Err(TrySendError::Disconnected(_)) => {
            Err(IngestError::Unavailable("the node is shutting down".into()))
        }
    }
}

/// The imaging service of one node.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("org", &self.inner.org)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) org: String,
    pub(crate) ae_title: String,
    pub(crate) config: ImagingConfig,
    pub(crate) store: Store,
    pub(crate) owner: SecretKey,
    deid: Deidentifier,
    deid_key: DeidKey,
    /// The consortium's linkage key: makes the patient pseudonyms on the ledger.
    linkage: Option<DeidKey>,
    pub(crate) index: RwLock<Index>,
    queue: Mutex<Option<SyncSender<Job>>>,
    pub(crate) client: Client,
    pub(crate) signer: SigningKey,
    /// The nonce this node's next transaction takes, once it has submitted one.
    next_nonce: Mutex<Option<u64>>,
    stable: Duration,
    deid_record: DeidRecord,
    gate: crate::access::Gate,
    pub(crate) ready: std::sync::atomic::AtomicBool,
    pub(crate) metrics: Metrics,
    /// Studies whose index record is to be written again (see `snapshot`), with the change
    /// count when each was last changed (a study changed while its record is being written
    /// stays due).
    dirty: Mutex<(u64, BTreeMap<String, u64>)>,
    /// Where instances are journalled before they are acknowledged (see `journal`).
    pub(crate) journal: Option<Journal>,
    /// The threads the committer works on (de-identifying, splitting, sealing a batch in
    /// parallel): at a lower priority when senders are answered from the journal.
    workers: rayon::ThreadPool,
    /// SOP Instance UIDs acknowledged from the journal and not yet stored: another instance
    /// with one of them is stored before it is answered, so that a conflict is reported.
    journaled: Mutex<HashSet<String>>,
    retries: Mutex<Retries>,
    retry_due: Condvar,
}

/// Jobs queued beyond the one being committed; senders block when it is full (back pressure).
const QUEUE: usize = 256;
/// The committer's scheduling priority (nice) when senders are answered from the journal.
const COMMITTER_NICE: i32 = 5;
/// A batch is at most this many instances or bytes.
const BATCH_INSTANCES: usize = 256;
const BATCH_BYTES: usize = 256 << 20;
/// While senders answered from the journal keep sending, their instances are committed once
/// they pause this long, or once the oldest has waited [`DEFER_LONGEST`] (see [`gather`]).
const DEFER_QUIET: Duration = Duration::from_millis(25);
const DEFER_LONGEST: Duration = Duration::from_secs(1);
/// How often the index records of changed studies are written: a crash loses at most this
/// much of the records, which start-up then rebuilds from the store.
const RECORD_EVERY: Duration = Duration::from_secs(1);
/// A journal segment whose instances are all stored is closed after this long without a new
/// one, so that a start does not read them again.
const JOURNAL_IDLE: Duration = Duration::from_secs(2);
/// An acknowledged instance the store could not take is tried again after this, doubling
/// up to [`RETRY_LONGEST`]; at most [`RETRY_BYTES`] of them wait in memory, the others wait
/// in the journal only, for the next start.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_LONGEST: Duration = Duration::from_secs(60);
const RETRY_BYTES: usize = 256 << 20;

fn read_key<T>(
    what: &'static str,
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, StartError> {
    let err = |reason: String| StartError::Key {
        what,
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse(text.trim()).map_err(err)
}

impl Service {
    /// Opens the store, rebuilds the index from it and from the ledger at `api` (this node's
    /// own API), and starts the committer and the registrar.
    pub fn start(org: &str, config: &ImagingConfig, api: &str) -> Result<Service, StartError> {
        let owner = read_key("store key", &config.store_key, |t| {
            SecretKey::from_text(t).map_err(|e| e.to_string())
        })?;
        let deid_key = read_key("de-identification key", &config.deid_key, |t| {
            DeidKey::from_text(t).map_err(|e| e.to_string())
        })?;
        let signer = read_key("signing key", &config.signing_key, |t| {
            SigningKey::from_text(t).map_err(|e| e.to_string())
        })?;
        let linkage = match &config.linkage_key {
            Some(p) => Some(read_key("linkage key", p, |t| {
                DeidKey::from_text(t).map_err(|e| e.to_string())
            })?),
            None => None,
        };
        let options = config
            .deid_options
            .iter()
            .map(|n| {
                DeidOption::ALL
                    .into_iter()
                    .find(|o| o.name() == n)
                    .ok_or_else(|| StartError::Option(n.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let options = OptionSet::new(options).map_err(|e| StartError::Option(e.to_string()))?;
        let store = Store::open(&config.store)
            .map_err(|source| StartError::Store {
                location: config.store.clone(),
                source,
            })?
            .with_read_cache(config.read_cache_mib << 20);
        let journal = match &config.journal {
            Some(dir) => {
                Some(Journal::open(dir, &owner).map_err(|e| StartError::Journal(e.to_string()))?)
            }
            None => None,
        };
        let (tx, rx) = sync_channel(QUEUE);
        let deid = Deidentifier::new(DeidConfig::new(deid_key.clone(), options));
        // What the ledger records of how this node de-identifies (the same for every instance).
        let deid_record = DeidRecord {
            profile: "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile".into(),
            options: deid
                .config()
                .options
                .iter()
                .map(|o| o.name().to_string())
                .collect(),
            table_edition: deid.config().table.edition().to_string(),
            key_id: deid_key.id().to_string(),
        };
        let inner = Arc::new(Inner {
            org: org.to_string(),
            ae_title: config.ae_title.clone(),
            config: config.clone(),
            store,
            deid,
            deid_key,
            linkage,
            deid_record,
            ready: std::sync::atomic::AtomicBool::new(false),
            owner,
            index: RwLock::new(Index::default()),
            queue: Mutex::new(Some(tx)),
            client: Client::new(api),
            gate: crate::access::Gate::new(org, Client::new(api)),
            signer,
            next_nonce: Mutex::new(None),
            stable: Duration::from_millis(config.stable_ms),
            metrics: Metrics::default(),
            dirty: Mutex::new((0, BTreeMap::new())),
            workers: {
                let lower = journal.is_some();
                rayon::ThreadPoolBuilder::new()
                    .thread_name(|i| format!("ingest-{i}"))
                    .start_handler(move |_| {
                        if lower {
                            lower_priority();
                        }
                    })
                    .build()
                    .map_err(|e| StartError::Journal(format!("starting the ingest threads: {e}")))?
            },
            journal,
            journaled: Mutex::new(HashSet::new()),
            retries: Mutex::new(Retries::default()),
            retry_due: Condvar::new(),
        });
        // The index needs this node's own API (which versions the ledger holds), which starts
        // beside this service: rebuild once it answers, then start taking instances. Senders
        // wait in the queue meanwhile.
        let starter = inner.clone();
        std::thread::Builder::new()
            .name("imaging-start".into())
            .spawn(move || {
                loop {
                    match starter.client.status() {
                        Ok(_) => break,
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
                loop {
                    match starter.rebuild() {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::error!("cannot rebuild the index (retrying in 5 s): {e}");
                            std::thread::sleep(Duration::from_secs(5));
                        }
                    }
                }
                starter.ready.store(true, Ordering::Release);
                let recorder = starter.clone();
                std::thread::Builder::new()
                    .name("index-records".into())
                    .spawn(move || {
                        loop {
                            recorder.write_records();
                            if let Some(j) = &recorder.journal {
                                j.close_idle(JOURNAL_IDLE);
                            }
                            std::thread::sleep(RECORD_EVERY);
                        }
                    })
                    .expect("spawn the index record thread");
                let committer = starter.clone();
                std::thread::Builder::new()
                    .name("ingest".into())
                    .spawn(move || committer.commit_loop(rx))
                    .expect("spawn the ingest thread");
                if starter.journal.is_some() {
                    let retrier = starter.clone();
                    std::thread::Builder::new()
                        .name("ingest-retry".into())
                        .spawn(move || retrier.retry_loop())
                        .expect("spawn the ingest retry thread");
                }
                starter.replay_journal();
                if let Some(j) = &starter.journal {
                    j.prepare();
                }
                starter.register_loop();
            })
            .expect("spawn the imaging start thread");
        Ok(Service { inner })
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Stores one instance (a Part 10 file); returns once it is durable, or why it was not
    /// stored.
    pub fn ingest(&self, file: impl Into<Bytes>) -> Result<Stored, IngestError> {
        self.ingest_into(file, None)
    }

    /// Like [`Service::ingest`], but only an instance of study `study` is accepted.
    pub fn ingest_into(
        &self,
        file: impl Into<Bytes>,
        study: Option<String>,
    ) -> Result<Stored, IngestError> {
        self.ingest_with(file.into(), study, None)
    }

    /// Starts taking in a C-STORE instance while it arrives: its data set is written into
    /// the journal in parts as it grows ([`Incoming::grew`]), so that once the last
    /// fragment is in, what the sender waits for is the rest and one flush
    /// ([`Incoming::finish`]). `None` where the instance is to be taken whole
    /// ([`Service::ingest`]): no journal, the index not built yet, or the claimed SOP
    /// Instance UID stored or on its way already (the store then says whether it is the
    /// same instance).
    pub fn receive(&self, claimed_sop_instance_uid: &str) -> Option<Incoming> {
        let journal = self.inner.journal.as_ref()?;
        if !self.inner.ready.load(Ordering::Acquire) {
            return None;
        }
        let writer = journal.begin(None)?;
        if !self.inner.claim(claimed_sop_instance_uid) {
            return None;
        }
        Some(Incoming {
            service: self.clone(),
            parts: Some(Parts {
                writer,
                written: 0,
                claimed: claimed_sop_instance_uid.to_string(),
            }),
        })
    }

    fn ingest_with(
        &self,
        file: Bytes,
        study: Option<String>,
        parts: Option<Parts>,
    ) -> Result<Stored, IngestError> {
        self.inner
            .metrics
            .instances_received
            .fetch_add(1, Ordering::Relaxed);
        self.inner
            .metrics
            .bytes_received
            .fetch_add(file.len() as u64, Ordering::Relaxed);
        self.inner.metrics.in_flight.fetch_add(1, Ordering::AcqRel);
        let r = self.ingest_inner(file, study, parts);
        self.inner.metrics.in_flight.fetch_sub(1, Ordering::AcqRel);
        r
    }

    fn ingest_inner(
        &self,
        file: Bytes,
        study: Option<String>,
        parts: Option<Parts>,
    ) -> Result<Stored, IngestError> {
        let queue = self.inner.queue.lock().expect("not poisoned").clone();
        let Some(queue) = queue else {
            self.inner.unclaim(parts);
            return Err(IngestError::Unavailable("the node is shutting down".into()));
        };
        let (bytes, pre) = match self
            .inner
            .journaled_ingest(&queue, file, study.clone(), parts)?
        {
            Journaled::Acknowledged(s) => {
                let m = &self.inner.metrics;
                m.instances_journaled.fetch_add(1, Ordering::Relaxed);
                m.instances_stored.fetch_add(1, Ordering::Relaxed);
                return Ok(s);
            }
            Journaled::Not { bytes, pre } => (bytes, pre),
        };
        let (reply, answer) = sync_channel(1);
        let job = Job {
            bytes,
            study,
            pre,
            reply: Reply::Wait(reply),
        };
        send(&queue, job)?;
        let r = answer
            .recv()
            .unwrap_or_else(|_| Err(IngestError::Unavailable("the ingest thread stopped".into())));
        let m = &self.inner.metrics;
        match &r {
            Ok(s) if s.duplicate => m.instances_duplicate.fetch_add(1, Ordering::Relaxed),
            Ok(_) => m.instances_stored.fetch_add(1, Ordering::Relaxed),
            Err(_) => m.instances_rejected.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    /// Studies waiting for registration (stored, not yet final on the ledger).
    /// May the bearer of this access token see identified originals?
    pub fn clinical(&self, token: &str) -> Result<bool, crate::access::TokenError> {
        self.inner.gate.clinical(token)
    }

    /// True while instances are being committed.
    pub fn busy(&self) -> bool {
        self.inner.metrics.in_flight.load(Ordering::Acquire) > 0 || self.journal_outstanding() > 0
    }

    /// Closes the journal's segment once everything in it is stored (at shutdown).
    pub fn settle_journal(&self) {
        if let Some(j) = &self.inner.journal {
            j.close_idle(Duration::ZERO);
        }
    }

    /// Instances acknowledged from the journal and not yet in the store.
    pub fn journal_outstanding(&self) -> u64 {
        self.inner.journal.as_ref().map_or(0, |j| j.outstanding())
    }

    /// What the store's read cache has done (all zero without one).
    pub fn read_cache(&self) -> medledger_store::CacheStats {
        self.inner.store.read_cache_stats().unwrap_or_default()
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    pub fn pending(&self) -> usize {
        self.inner
            .index
            .read()
            .expect("not poisoned")
            .studies
            .values()
            .filter(|s| s.pending())
            .count()
    }

    /// Stops taking instances; those already queued are still committed.
    pub fn shutdown(&self) {
        self.inner.queue.lock().expect("not poisoned").take();
    }

    /// Reads a stored instance of `view` as a Part 10 file, every object verified.
    pub fn read_instance(
        &self,
        entry: &medledger_store::InstanceEntry,
    ) -> Result<Vec<u8>, StoreError> {
        self.inner.store.fetch_instance(entry)
    }

    /// [`Service::read_instance`] as the file's pieces in order, for sending without a copy.
    pub fn read_instance_parts(
        &self,
        entry: &medledger_store::InstanceEntry,
    ) -> Result<Vec<bytes::Bytes>, StoreError> {
        self.inner.store.fetch_instance_parts(entry)
    }

    pub fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.inner.index.read().expect("not poisoned")
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn ae_title(&self) -> &str {
        &self.inner.ae_title
    }

    pub fn org(&self) -> &str {
        &self.inner.org
    }

    pub fn config(&self) -> &ImagingConfig {
        &self.inner.config
    }
}

/// The objects of a manifest by plaintext digest, for a derivative to reuse.
struct PutOutcomeIndex(HashMap<Digest, medledger_store::ObjectRef>);

impl From<&StudyManifest> for PutOutcomeIndex {
    fn from(m: &StudyManifest) -> Self {
        PutOutcomeIndex(
            m.instances()
                .flat_map(|(_, i)| i.objects())
                .map(|o| (o.digest, o.clone()))
                .collect(),
        )
    }
}

/// One instance ready to be written.
struct Prepared {
    original: Scanned,
    original_meta: InstanceMeta,
    derivative: Option<(Scanned, InstanceMeta, DeidRecord)>,
    warning: Option<String>,
    study_uid: String,
    sop_uid: String,
    sop_class: String,
}

impl Inner {
    /// Reads what the answer to an instance needs and refuses what cannot be stored: the
    /// attributes, the study of a STOW-RS URL, the split into header and pixel objects.
    fn check(
        bytes: &[u8],
        study: Option<&str>,
    ) -> Result<(InstanceMeta, medledger_store::split::InstanceIds), IngestError> {
        let meta = InstanceMeta::read(bytes).map_err(IngestError::Malformed)?;
        if let Some(want) = study {
            let have = meta.text(tags::STUDY_INSTANCE_UID);
            if have != want {
                return Err(IngestError::Malformed(format!(
                    "the instance belongs to study {have}, not to the study of the request URL ({want})"
                )));
            }
        }
        let split = medledger_store::split::split(bytes)
            .map_err(|e| IngestError::Malformed(e.to_string()))?;
        Ok((meta, split.ids))
    }

    /// Journals an instance and answers it when it can (see `journal`); otherwise hands it
    /// back, with what was read of it, to be stored before it is answered.
    fn journaled_ingest(
        &self,
        queue: &SyncSender<Job>,
        bytes: Bytes,
        study: Option<String>,
        parts: Option<Parts>,
    ) -> Result<Journaled, IngestError> {
        let Some(journal) = &self.journal else {
            self.unclaim(parts);
            return Ok(Journaled::Not { bytes, pre: None });
        };
        if parts.is_none() && !self.ready.load(Ordering::Acquire) {
            // Until the index is built, whether the instance is new is not known.
            return Ok(Journaled::Not { bytes, pre: None });
        }
        let (meta, ids) = match Self::check(&bytes, study.as_deref()) {
            Ok(v) => v,
            Err(e) => {
                self.unclaim(parts);
                return Err(e);
            }
        };
        // The parts count only if they are this instance's: the UID a C-STORE request
        // claimed is the data set's, or the parts are left unfinished (never read back).
        let parts = match parts {
            Some(p) if p.claimed == ids.sop_instance_uid => Some(p),
            other => {
                self.unclaim(other);
                if !self.claim(&ids.sop_instance_uid) {
                    // Stored or on its way already: the store says whether it is the same
                    // instance.
                    return Ok(Journaled::Not {
                        bytes,
                        pre: Some(Box::new(meta)),
                    });
                }
                None
            }
        };
        let forget = || {
            self.journaled
                .lock()
                .expect("not poisoned")
                .remove(&ids.sop_instance_uid);
        };
        let appended = match parts {
            Some(p) => match journal.finish(p.writer, &bytes[p.written..]) {
                // The parts could not go on in their segment: the whole instance again.
                Ok(None) => journal.append(study.as_deref(), &bytes),
                r => r,
            },
            None => journal.append(study.as_deref(), &bytes),
        };
        let ticket = match appended {
            Ok(Some(t)) => t,
            Ok(None) => {
                forget();
                return Ok(Journaled::Not {
                    bytes,
                    pre: Some(Box::new(meta)),
                });
            }
            Err(e) => {
                forget();
                tracing::error!("cannot journal an instance: {e}");
                return Err(IngestError::Unavailable(e.to_string()));
            }
        };
        // On disk: from here the instance is stored even if the process dies (the journal is
        // replayed at start).
        let stored = Stored {
            sop_class_uid: ids.sop_class_uid.clone(),
            sop_instance_uid: ids.sop_instance_uid.clone(),
            study_uid: ids.study_uid.clone(),
            derived_study_uid: Some(self.derived_uid(&ids.study_uid)),
            duplicate: false,
            warning: None,
        };
        let job = Job {
            bytes,
            study,
            pre: Some(Box::new(meta)),
            reply: Reply::Journal {
                ticket,
                sop_uid: Some(ids.sop_instance_uid),
                attempt: 0,
            },
        };
        if let Err(e) = send(queue, job) {
            // Journalled: stored at the next start.
            tracing::warn!("an acknowledged instance waits in the journal: {e}");
        }
        Ok(Journaled::Acknowledged(stored))
    }

    /// Marks a SOP Instance UID as on its way through the journal; `false` if it is stored
    /// or on its way already.
    fn claim(&self, sop_instance_uid: &str) -> bool {
        !self
            .index
            .read()
            .expect("not poisoned")
            .has_meta(View::Original, sop_instance_uid)
            && self
                .journaled
                .lock()
                .expect("not poisoned")
                .insert(sop_instance_uid.to_string())
    }

    /// Gives up the claim of parts that will not be finished.
    fn unclaim(&self, parts: Option<Parts>) {
        if let Some(p) = parts {
            self.journaled
                .lock()
                .expect("not poisoned")
                .remove(&p.claimed);
        }
    }

    /// The UID an original UID has in the de-identified derivative.
    fn derived_uid(&self, uid: &str) -> String {
        if self.deid.config().options.contains(DeidOption::RetainUids) {
            uid.to_string()
        } else {
            self.deid_key.replace_uid(uid)
        }
    }

    /// Stores what an earlier run journalled and did not store.
    fn replay_journal(&self) {
        let Some(journal) = &self.journal else {
            return;
        };
        let Some(queue) = self.queue.lock().expect("not poisoned").as_ref().cloned() else {
            return;
        };
        let n = journal.recover(|e| {
            let sop_uid = InstanceMeta::read(&e.file)
                .ok()
                .map(|m| m.text(tags::SOP_INSTANCE_UID));
            if let Some(u) = &sop_uid {
                self.journaled
                    .lock()
                    .expect("not poisoned")
                    .insert(u.clone());
            }
            let job = Job {
                bytes: Bytes::from(e.file),
                study: e.study,
                pre: None,
                reply: Reply::Journal {
                    ticket: e.ticket,
                    sop_uid,
                    attempt: 0,
                },
            };
            if send(&queue, job).is_err() {
                tracing::warn!("stopping while replaying the journal");
            }
        });
        self.metrics
            .journal_replayed
            .fetch_add(n as u64, Ordering::Relaxed);
        if n > 0 {
            tracing::info!("journal: {n} instances of an earlier run queued for the store");
        }
    }

    fn prepare(
        &self,
        name: String,
        bytes: Bytes,
        study: Option<String>,
        pre: Option<Box<InstanceMeta>>,
        acknowledged: bool,
    ) -> Result<Prepared, IngestError> {
        let original_meta = match pre {
            Some(m) => *m,
            None => Self::check(&bytes, study.as_deref())?.0,
        };
        let original = scan_memory(name.clone(), bytes.clone()).map_err(|e| match e {
            StoreError::Split { error, .. } => IngestError::Malformed(error.to_string()),
            e => IngestError::Malformed(e.to_string()),
        })?;
        let ids = original.ids().clone();
        let made = self.deid.deidentify(&bytes).map_err(|e| match e {
            DeidError::Parse(e) if !acknowledged => {
                IngestError::Malformed(format!("not a readable DICOM file: {e}"))
            }
            DeidError::NotAnInstance(e) if !acknowledged => {
                IngestError::Malformed(format!("not a DICOM instance: {e}"))
            }
            e => IngestError::Unavailable(e.to_string()),
        });
        let derivative = made.and_then(|d| {
            let meta = InstanceMeta::read(&d.bytes).map_err(|e| {
                IngestError::Unavailable(format!("reading the de-identified instance: {e}"))
            })?;
            let record = DeidRecord {
                profile: d.provenance.profile.clone(),
                options: d
                    .provenance
                    .options
                    .iter()
                    .map(|o| o.name().to_string())
                    .collect(),
                table_edition: d.provenance.table_edition.clone(),
                key_id: d.provenance.key_id.clone(),
            };
            let scanned = scan_memory(format!("{name} (de-identified)"), Bytes::from(d.bytes))
                .map_err(|e| {
                    IngestError::Unavailable(format!("splitting the de-identified instance: {e}"))
                })?;
            Ok((scanned, meta, record))
        });
        let (derivative, warning) = match derivative {
            Ok(d) => (Some(d), None),
            Err(IngestError::Malformed(e)) => return Err(IngestError::Malformed(e)),
            // An instance that cannot be de-identified is kept as an original only (and
            // counted): it is never dropped, and never shown as de-identified.
            Err(e) => {
                self.metrics
                    .instances_quarantined
                    .fetch_add(1, Ordering::Relaxed);
                let why = match e {
                    IngestError::Unavailable(m) | IngestError::Conflict(m) => m,
                    IngestError::Malformed(m) => m,
                };
                (
                    None,
                    Some(format!(
                        "stored as an original only, without a de-identified derivative: {why}"
                    )),
                )
            }
        };
        Ok(Prepared {
            original,
            original_meta,
            derivative,
            warning,
            study_uid: ids.study_uid,
            sop_uid: ids.sop_instance_uid,
            sop_class: ids.sop_class_uid,
        })
    }

    fn commit_loop(self: Arc<Self>, rx: Receiver<Job>) {
        if self.journal.is_some() {
            lower_priority();
        }
        while let Ok(first) = rx.recv() {
            let defer = self.journal.is_some().then_some(Defer {
                quiet: DEFER_QUIET,
                longest: DEFER_LONGEST,
            });
            let batch = gather(&rx, first, defer);
            self.metrics.batches.fetch_add(1, Ordering::Relaxed);
            self.workers.install(|| self.commit(batch));
        }
        tracing::info!("ingest stopped");
    }

    fn commit(&self, batch: Vec<Job>) {
        let mut replies: Vec<Option<(Reply, Bytes)>> = Vec::new();
        let mut inputs = Vec::new();
        for (i, j) in batch.into_iter().enumerate() {
            let acknowledged = matches!(j.reply, Reply::Journal { .. });
            replies.push(Some((j.reply, j.bytes.clone())));
            inputs.push((i, j.bytes, j.study, j.pre, acknowledged));
        }
        let prepared: Vec<(usize, Result<Prepared, IngestError>)> = inputs
            .into_par_iter()
            .map(|(i, bytes, study, pre, acknowledged)| {
                (
                    i,
                    self.prepare(format!("#{i}"), bytes, study, pre, acknowledged),
                )
            })
            .collect();
        let mut by_study: BTreeMap<String, Vec<(usize, Prepared)>> = BTreeMap::new();
        for (i, p) in prepared {
            match p {
                Ok(p) => by_study
                    .entry(p.study_uid.clone())
                    .or_default()
                    .push((i, p)),
                Err(e) => {
                    tracing::info!("refused an instance: {e}");
                    if let Some(r) = replies[i].take() {
                        self.answer(r, Err(e));
                    }
                }
            }
        }
        for (study_uid, items) in by_study {
            let outcome = self.commit_study(&study_uid, items);
            for (i, r) in outcome {
                if let Some(reply) = replies[i].take() {
                    self.answer(reply, r);
                }
            }
        }
    }

    /// Queues a journalled instance again once its wait is over; gives it back if the
    /// retries already hold [`RETRY_BYTES`].
    fn retry_later(&self, job: Job, why: &str) -> Result<(), Job> {
        let attempt = match &job.reply {
            Reply::Journal { attempt, .. } => *attempt,
            Reply::Wait(_) => 1,
        };
        let wait = RETRY_FIRST
            .saturating_mul(1 << attempt.saturating_sub(1).min(6))
            .min(RETRY_LONGEST);
        let mut r = self.retries.lock().expect("not poisoned");
        if r.bytes + job.bytes.len() > RETRY_BYTES {
            return Err(job);
        }
        r.bytes += job.bytes.len();
        r.jobs.push((Instant::now() + wait, job));
        drop(r);
        self.metrics.journal_retries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "an acknowledged instance is not stored yet ({why}); trying again in {} s (attempt {attempt})",
            wait.as_secs()
        );
        self.retry_due.notify_one();
        Ok(())
    }

    /// Sends each retry to the committer when its time comes.
    fn retry_loop(&self) {
        let mut r = self.retries.lock().expect("not poisoned");
        loop {
            let now = Instant::now();
            if r.jobs.iter().any(|(t, _)| *t <= now) {
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut r.jobs)
                    .into_iter()
                    .partition(|(t, _)| *t <= now);
                r.jobs = later;
                r.bytes -= due.iter().map(|(_, j)| j.bytes.len()).sum::<usize>();
                drop(r);
                // The queue is looked up each time, so that this thread never keeps the
                // committer running at shutdown.
                let queue = self.queue.lock().expect("not poisoned").as_ref().cloned();
                let Some(queue) = queue else {
                    return;
                };
                for (_, job) in due {
                    if send(&queue, job).is_err() {
                        return;
                    }
                }
                drop(queue);
                r = self.retries.lock().expect("not poisoned");
                continue;
            }
            let next = r.jobs.iter().map(|(t, _)| *t).min();
            r = match next {
                Some(t) => {
                    self.retry_due
                        .wait_timeout(r, t.saturating_duration_since(now))
                        .expect("not poisoned")
                        .0
                }
                None => self.retry_due.wait(r).expect("not poisoned"),
            };
        }
    }

    /// Tells a waiting sender how its instance ended, or settles a journalled one.
    fn answer(&self, (reply, bytes): (Reply, Bytes), r: Result<Stored, IngestError>) {
        let (ticket, sop_uid, attempt) = match reply {
            Reply::Wait(tx) => {
                let _ = tx.send(r);
                medledger_store::pool::give_bytes(bytes);
                return;
            }
            Reply::Journal {
                ticket,
                sop_uid,
                attempt,
            } => (ticket, sop_uid, attempt),
        };
        let journal = self.journal.as_ref().expect("journalled with a journal");
        match r {
            Ok(_) => journal.release(ticket),
            Err(IngestError::Unavailable(e)) => {
                // It stays in the journal whatever happens, and is tried again in a while
                // (or at the next start).
                let job = Job {
                    bytes,
                    study: None,
                    pre: None,
                    reply: Reply::Journal {
                        ticket,
                        sop_uid,
                        attempt: attempt + 1,
                    },
                };
                if let Err(job) = self.retry_later(job, &e) {
                    tracing::error!(
                        "an acknowledged instance is not stored yet ({e}); it stays in the journal until the next start"
                    );
                    if let Reply::Journal {
                        sop_uid: Some(u), ..
                    } = job.reply
                    {
                        self.journaled.lock().expect("not poisoned").remove(&u);
                    }
                }
                return;
            }
            Err(e) => {
                // Refused for good after it was acknowledged (it passed every check made
                // before the answer, so this is not expected): kept, sealed, for an
                // administrator, and counted.
                self.metrics
                    .instances_failed_after_ack
                    .fetch_add(1, Ordering::Relaxed);
                let name = format!("ingest-failed/{}", Digest::of(&bytes).to_hex());
                match self.store.put_private(&name, &bytes, &self.owner.public()) {
                    Ok(()) => {
                        tracing::error!(
                            "an acknowledged instance could not be stored ({e}); kept as private record {name}"
                        );
                        journal.release(ticket);
                    }
                    Err(pe) => tracing::error!(
                        "an acknowledged instance could not be stored ({e}) nor kept ({pe}); it stays in the journal"
                    ),
                }
            }
        }
        if let Some(u) = sop_uid {
            self.journaled.lock().expect("not poisoned").remove(&u);
        }
        // The receive buffer, for the next instance (see `Provider::receive_buffer`).
        medledger_store::pool::give_bytes(bytes);
    }

    /// Writes one study's new instances as a new version of its original and derivative.
    fn commit_study(
        &self,
        study_uid: &str,
        items: Vec<(usize, Prepared)>,
    ) -> Vec<(usize, Result<Stored, IngestError>)> {
        let current = self
            .index
            .read()
            .expect("not poisoned")
            .studies
            .get(study_uid)
            .cloned();
        let previous_original = current.as_ref().map(|s| s.original.manifest.clone());
        let previous_derivative = current
            .as_ref()
            .and_then(|s| s.derivative.as_ref())
            .map(|v| v.manifest.clone());
        let known = |m: &Option<Arc<StudyManifest>>, sop: &str| {
            m.as_ref()
                .is_some_and(|m| m.instances().any(|(_, i)| i.sop_instance_uid == sop))
        };
        let mut originals = Vec::new();
        let mut derivatives = Vec::new();
        let mut metas = Vec::new();
        let mut deid_record = None;
        let mut accepted = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, p) in items {
            // The same SOP Instance UID again (another route re-encodes the same instance, a
            // sender retries): the first one is kept and the sender told it is stored.
            let duplicate =
                known(&previous_original, &p.sop_uid) || !seen.insert(p.sop_uid.clone());
            let derived_study_uid = p
                .derivative
                .as_ref()
                .map(|(d, _, _)| d.ids().study_uid.clone());
            accepted.push((
                i,
                Stored {
                    sop_class_uid: p.sop_class.clone(),
                    sop_instance_uid: p.sop_uid.clone(),
                    study_uid: study_uid.to_string(),
                    derived_study_uid,
                    duplicate,
                    warning: p.warning.clone(),
                },
            ));
            if duplicate {
                continue;
            }
            metas.push((View::Original, p.sop_uid.clone(), p.original_meta));
            originals.push(p.original);
            if let Some((scanned, meta, record)) = p.derivative {
                let uid = scanned.ids().sop_instance_uid.clone();
                if !known(&previous_derivative, &uid) {
                    metas.push((View::Deidentified, uid, meta));
                    derivatives.push(scanned);
                }
                deid_record = Some(record);
            }
        }
        if originals.is_empty() {
            return accepted.into_iter().map(|(i, s)| (i, Ok(s))).collect();
        }
        let fail = |accepted: Vec<(usize, Stored)>, e: String| {
            tracing::error!("cannot store study instances: {e}");
            accepted
                .into_iter()
                .map(|(i, _)| (i, Err(IngestError::Unavailable(e.clone()))))
                .collect::<Vec<_>>()
        };
        // Both versions are sealed in memory first, then written together: objects and
        // manifests in one durable batch, the two reference records in a second.
        let staged_original = match self.store.stage_version(
            previous_original.as_deref(),
            originals,
            &self.owner,
            &PutOptions::default(),
        ) {
            Ok(o) => o,
            Err(e) => return fail(accepted, e.to_string()),
        };
        let conflicts: HashMap<usize, String> = staged_original
            .skipped
            .iter()
            .filter_map(|s| {
                let i: usize = s.source.trim_start_matches('#').parse().ok()?;
                Some((i, s.reason.clone()))
            })
            .collect();
        let reuse = staged_original.outcome.object_index();
        // A derivative version is made whenever the original changed, so that it names the
        // original's newest version.
        let staged_derivative = if !derivatives.is_empty() || previous_derivative.is_some() {
            let opts = PutOptions {
                derived_from: Some(staged_original.outcome.root),
                reuse: Some(&reuse),
                ..PutOptions::default()
            };
            match self.store.stage_version(
                previous_derivative.as_deref(),
                derivatives,
                &self.owner,
                &opts,
            ) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.store.abandon(staged_original);
                    return fail(accepted, e.to_string());
                }
            }
        } else {
            None
        };
        let mut both = vec![&staged_original];
        both.extend(staged_derivative.as_ref());
        if let Err(e) = self.store.write_staged(&both) {
            // A retry seals again, under new keys: what this attempt cached is dead weight.
            self.store.abandon(staged_original);
            if let Some(d) = staged_derivative {
                self.store.abandon(d);
            }
            return fail(accepted, e.to_string());
        }
        let original = staged_original.into_outcome();
        let derivative = staged_derivative.map(medledger_store::Staged::into_outcome);
        // Durable: update the index, then answer.
        let patient = self.pseudonym(&metas, derivative.as_ref().map(|d| &d.manifest));
        {
            let mut index = self.index.write().expect("not poisoned");
            for (view, uid, meta) in metas {
                if !index.has_meta(view, &uid) {
                    index.put_meta(view, &uid, Arc::new(meta));
                }
            }
            let state = index
                .studies
                .entry(study_uid.to_string())
                .or_insert_with(|| StudyState {
                    original: Version::new(original.manifest.clone()),
                    derivative: None,
                    registered_original: None,
                    registered_derivative: None,
                    versions: BTreeSet::new(),
                    changed: Instant::now(),
                    patient: patient.clone(),
                    deid: None,
                    failures: 0,
                    last_error: None,
                    received: None,
                });
            state.versions.insert(original.root);
            if state.original.root != original.root {
                state.original = Version::new(original.manifest.clone());
            }
            if let Some(d) = derivative {
                state.versions.insert(d.root);
                if state.derivative.as_ref().map(|v| v.root) != Some(d.root) {
                    state.derivative = Some(Version::new(d.manifest));
                }
            }
            if deid_record.is_some() {
                state.deid = deid_record;
            }
            if !original.already_present {
                state.changed = Instant::now();
            }
        }
        self.touch(study_uid);
        // Versions between the registered one and the newest are dropped by the registrar.
        accepted
            .into_iter()
            .map(|(i, stored)| match conflicts.get(&i) {
                Some(reason) => (i, Err(IngestError::Conflict(reason.clone()))),
                None => (i, Ok(stored)),
            })
            .collect()
    }

    /// The patient's pseudonym: the derivative's Patient ID (the keyed pseudonym), else one
    /// made the same way from the original's identity.
    fn pseudonym(
        &self,
        metas: &[(View, String, InstanceMeta)],
        derivative: Option<&StudyManifest>,
    ) -> String {
        let _ = derivative;
        if let Some(linkage) = &self.linkage {
            if let Some((_, _, m)) = metas.iter().find(|(v, _, _)| *v == View::Original) {
                if let Some(identity) = medledger_deid::patient_identity(
                    &m.text(tags::PATIENT_ID),
                    &m.text(tags::PATIENT_NAME),
                    &m.text(tags::PATIENT_BIRTH_DATE),
                ) {
                    return linkage.patient_pseudonym(&identity);
                }
            }
        }
        for (view, _, m) in metas {
            if *view == View::Deidentified {
                let id = m.text(tags::PATIENT_ID);
                if medledger_ledger::check_pseudonym(&id).is_ok() {
                    return id;
                }
            }
        }
        let Some((_, _, m)) = metas.iter().find(|(v, _, _)| *v == View::Original) else {
            return String::new();
        };
        let identity = medledger_deid::patient_identity(
            &m.text(tags::PATIENT_ID),
            &m.text(tags::PATIENT_NAME),
            &m.text(tags::PATIENT_BIRTH_DATE),
        )
        .unwrap_or_else(|| format!("study:{}", m.text(tags::STUDY_INSTANCE_UID)));
        self.deid_key.patient_pseudonym(&identity)
    }

    /// Puts a study received from another organisation into the index, visible in `view`.
    pub(crate) fn index_received(
        &self,
        index: &mut Index,
        root: Digest,
        manifest: StudyManifest,
        view: View,
        grant: &str,
        headers: Option<&HashMap<Digest, Vec<u8>>>,
    ) -> Result<(), String> {
        for (_, i) in manifest.instances() {
            if index.has_meta(view, &i.sop_instance_uid) {
                continue;
            }
            // The header attributes: from the header object just verified, else read back
            // from the store (pixel objects are not read either way).
            let header = headers
                .and_then(|h| h.get(&i.header.address))
                .map(Vec::as_slice);
            let meta = self.attributes(i, header)?;
            index.put_meta(view, &i.sop_instance_uid, Arc::new(meta));
        }
        let version = Version::new(manifest);
        let (registered_original, derivative, registered_derivative) = match view {
            View::Original => (Some(version.clone()), None, None),
            View::Deidentified => (None, Some(version.clone()), Some(version.clone())),
        };
        index.studies.insert(
            format!("received:{root}:{}", version.root),
            StudyState {
                original: version,
                derivative,
                registered_original,
                registered_derivative,
                versions: BTreeSet::new(),
                changed: Instant::now(),
                patient: String::new(),
                deid: None,
                failures: 0,
                last_error: None,
                received: Some(grant.to_string()),
            },
        );
        Ok(())
    }

    fn register_loop(self: Arc<Self>) {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let due: Vec<(String, StudyState)> = {
                let index = self.index.read().expect("not poisoned");
                index
                    .studies
                    .iter()
                    .filter(|(_, s)| s.pending() && s.changed.elapsed() >= self.stable)
                    .filter(|(_, s)| {
                        // Back off after failures: 1, 2, 4 ... up to 60 s.
                        s.failures == 0
                            || s.changed.elapsed()
                                >= self.stable
                                    + Duration::from_secs(1 << s.failures.min(6))
                                        .min(Duration::from_secs(60))
                    })
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .collect()
            };
            for (uid, state) in due {
                let r = self.register(&state);
                let mut index = self.index.write().expect("not poisoned");
                let Some(s) = index.studies.get_mut(&uid) else {
                    continue;
                };
                match r {
                    Ok(()) => {
                        self.metrics
                            .studies_registered
                            .fetch_add(1, Ordering::Relaxed);
                        let old = [
                            s.registered_original.take().map(|v| v.root),
                            s.registered_derivative.take().map(|v| v.root),
                        ];
                        s.registered_original = Some(state.original.clone());
                        s.registered_derivative = state.derivative.clone();
                        s.failures = 0;
                        s.last_error = None;
                        drop(index);
                        self.touch(&uid);
                        // A superseded version's record is kept: the ledger names it, and
                        // grants made on it must still be served.
                        let _ = old;
                    }
                    Err(e) => {
                        self.metrics
                            .registration_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("registering study version {}: {e}", state.original.root);
                        s.failures += 1;
                        s.last_error = Some(e);
                        s.changed = Instant::now();
                    }
                }
            }
        }
    }

    /// Registers the newest versions of a study (original, then derivative) and waits until
    /// they are final.
    fn register(&self, s: &StudyState) -> Result<(), String> {
        let modality = s
            .original
            .manifest
            .series
            .iter()
            .map(|se| se.modality.trim().to_uppercase())
            .find(|m| {
                !m.is_empty()
                    && m.len() <= 16
                    && m.bytes()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            })
            .unwrap_or_else(|| "OT".to_string());
        let mut ops = Vec::new();
        let reg_orig = s.registered_original.as_ref().map(|v| v.root);
        if reg_orig != Some(s.original.root) {
            ops.push(Op::RegisterStudy {
                root: s.original.root,
                patient: s.patient.clone(),
                modality: modality.clone(),
                instances: s.original.manifest.instance_count() as u32,
                bytes: s.original.manifest.plain_len(),
                derived_from: None,
                deid: None,
                supersedes: reg_orig,
            });
        }
        if let Some(d) = &s.derivative {
            let reg = s.registered_derivative.as_ref().map(|v| v.root);
            if reg != Some(d.root) && d.manifest.instance_count() > 0 {
                if d.manifest.derived_from != Some(s.original.root) {
                    return Err("the derivative does not name the newest original yet".into());
                }
                ops.push(Op::RegisterStudy {
                    root: d.root,
                    patient: s.patient.clone(),
                    modality,
                    instances: d.manifest.instance_count() as u32,
                    bytes: d.manifest.plain_len(),
                    derived_from: Some(s.original.root),
                    deid: s.deid.clone(),
                    supersedes: reg,
                });
            }
        }
        for r in self.execute(ops)? {
            match r {
                Ok(_) => {}
                // Registered before (by this node, before a restart): nothing to do.
                Err(ClientError::Rejected { error, .. })
                    if error.to_string().contains("already registered") => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Signs `ops` as this node with consecutive nonces, submits them and waits until each is
    /// final (or refused). Nonces are handed out under a lock from the larger of the ledger's
    /// next nonce and the last one handed out, so that the registrar, grants and audit
    /// records of this node can be in flight at once.
    pub(crate) fn execute(
        &self,
        ops: Vec<Op>,
    ) -> Result<Vec<Result<medledger_node::Finality, ClientError>>, String> {
        let chain = self.client.chain().map_err(|e| e.to_string())?;
        let mut ids = Vec::new();
        {
            let mut next = self.next_nonce.lock().expect("not poisoned");
            let ledger_next = self
                .client
                .next_nonce(&self.signer.verifying_key())
                .map_err(|e| e.to_string())?;
            let first = next.map_or(ledger_next, |n| n.max(ledger_next));
            for (nonce, op) in (first..).zip(ops) {
                let tx = Tx::sign(&chain, &self.signer, nonce, op);
                match self.client.submit_tx(&tx) {
                    Ok(id) => {
                        ids.push(id);
                        *next = Some(nonce + 1);
                    }
                    Err(e) => {
                        // Start again from the ledger's view next time.
                        *next = None;
                        if ids.is_empty() {
                            return Err(e.to_string());
                        }
                        break;
                    }
                }
            }
        }
        Ok(ids
            .into_iter()
            .map(|id| self.client.wait(&id, Duration::from_secs(30)))
            .collect())
    }

    /// Brings a study's derivative up to its newest original: the instances the derivative's
    /// original version lacked are read back, de-identified and added, in a new derivative
    /// version that names the newest original.
    fn repair_derivative(
        &self,
        newest: &StudyManifest,
        versions: &[StudyManifest],
        derivative: Option<StudyManifest>,
    ) -> Result<Option<StudyManifest>, String> {
        let covered: std::collections::HashSet<String> = derivative
            .as_ref()
            .and_then(|d| versions.iter().find(|v| Some(v.root()) == d.derived_from))
            .map(|v| {
                v.instances()
                    .map(|(_, i)| i.sop_instance_uid.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut added = Vec::new();
        for (_, i) in newest.instances() {
            if covered.contains(&i.sop_instance_uid) {
                continue;
            }
            let file = self.store.fetch_instance(i).map_err(|e| e.to_string())?;
            // Quarantined instances have no derivative, now as when they arrived.
            if let Ok(d) = self.deid.deidentify(&file) {
                let scanned = scan_memory(i.sop_instance_uid.clone(), Bytes::from(d.bytes))
                    .map_err(|e| e.to_string())?;
                added.push(scanned);
            }
        }
        if added.is_empty() && derivative.is_none() {
            return Ok(None);
        }
        let outcome = PutOutcomeIndex::from(newest);
        let opts = PutOptions {
            derived_from: Some(newest.root()),
            reuse: Some(&outcome.0),
            ..PutOptions::default()
        };
        let (d, _) = self
            .store
            .extend_study(derivative.as_ref(), added, &self.owner, &opts)
            .map_err(|e| e.to_string())?;
        tracing::info!(
            "study {}: derivative brought up to its original after an interrupted write",
            newest.root()
        );
        Ok(Some(d.manifest))
    }

    /// The header attributes of an instance for the index: from `header` (its header
    /// object, when at hand and the one the manifest names) or from the store, without its
    /// pixel objects; the whole instance only when its attributes cannot be read otherwise.
    fn attributes(
        &self,
        i: &medledger_store::InstanceEntry,
        header: Option<&[u8]>,
    ) -> Result<InstanceMeta, String> {
        let lens: Vec<u64> = i.pixels.iter().map(|p| p.len).collect();
        let file = match header {
            Some(h) => medledger_store::split::rebuild_without_pixels(h, &lens),
            None => self
                .store
                .fetch_instance_attributes(i)
                .map_err(|e| e.to_string()),
        }?;
        match InstanceMeta::read(&file) {
            Ok(m) => Ok(m),
            // Pixel Data is not the last element and its placeholder does not read as the
            // real value would: read the instance whole.
            Err(_) => {
                let file = self.store.fetch_instance(i).map_err(|e| e.to_string())?;
                InstanceMeta::read(&file)
            }
        }
    }

    /// Marks a study's index record as due to be written.
    fn touch(&self, study: &str) {
        let mut dirty = self.dirty.lock().expect("not poisoned");
        dirty.0 += 1;
        let change = dirty.0;
        dirty.1.insert(study.to_string(), change);
    }

    /// Studies whose index record is not written yet.
    pub fn records_unwritten(&self) -> usize {
        self.dirty.lock().expect("not poisoned").1.len()
    }

    /// Writes the index records of the registered studies that changed since the last call
    /// (see `snapshot`). A record that cannot be written is tried again next time.
    pub(crate) fn write_records(&self) {
        let due = self.dirty.lock().expect("not poisoned").1.clone();
        for (study, change) in due {
            let written = |inner: &Inner| {
                let mut dirty = inner.dirty.lock().expect("not poisoned");
                if dirty.1.get(&study) == Some(&change) {
                    dirty.1.remove(&study);
                }
            };
            let Some(state) = self
                .index
                .read()
                .expect("not poisoned")
                .studies
                .get(&study)
                .cloned()
            else {
                written(self);
                continue;
            };
            if state.received.is_some() {
                written(self);
                continue;
            }
            // Start-up uses a record only once its study is registered, so a study still
            // arriving is recorded when its registration is final, not on every batch.
            if state.pending() {
                continue;
            }
            let mut headers = Vec::new();
            for v in [Some(&state.original), state.derivative.as_ref()]
                .into_iter()
                .flatten()
            {
                for (_, i) in v.manifest.instances() {
                    // A header that cannot be read now is read from the store at start.
                    if let Ok(h) = self.store.fetch(&i.header) {
                        headers.push(h);
                    }
                }
            }
            let record = StudyRecord {
                study: study.clone(),
                roots: state.versions.clone(),
                original: state.original.root,
                derivative: state.derivative.as_ref().map(|v| v.root),
                registered_original: state.registered_original.as_ref().map(|v| v.root),
                registered_derivative: state.registered_derivative.as_ref().map(|v| v.root),
                patient: state.patient.clone(),
                deid: state.deid.clone(),
                headers,
            };
            match self.store.put_private(
                &snapshot::record_name(&study),
                &record.encode(),
                &self.owner.public(),
            ) {
                Ok(()) => {
                    written(self);
                    self.metrics
                        .index_records_written
                        .fetch_add(1, Ordering::Relaxed);
                }
                // Still due: tried again next time.
                Err(e) => tracing::warn!("cannot write the index record of a study: {e}"),
            }
        }
    }

    /// The index records in the store that can be used: readable, under their own name, every
    /// root they account for still present, and their newest versions registered (a study
    /// with a version waiting for the ledger is rebuilt, so that registration resumes from
    /// what the ledger says).
    fn usable_records(&self, present: &HashSet<Digest>) -> BTreeMap<String, StudyRecord> {
        let names = match self.store.list_private(snapshot::PREFIX) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("cannot list the index records, rebuilding from the store: {e}");
                return BTreeMap::new();
            }
        };
        let mut out = BTreeMap::new();
        for name in names {
            let record = match self.store.get_private(&name, &self.owner) {
                Ok(Some(bytes)) => StudyRecord::decode(&bytes).map_err(|e| e.to_string()),
                Ok(None) => continue,
                Err(e) => Err(e.to_string()),
            };
            match record {
                Ok(r) if snapshot::record_name(&r.study) != name => {
                    tracing::warn!("index record {name} is filed under another name; ignored");
                }
                Ok(r) => {
                    let complete = r.roots.iter().all(|d| present.contains(d));
                    let registered = r.registered_original == Some(r.original)
                        && r.registered_derivative == r.derivative;
                    if complete && registered {
                        out.insert(r.study.clone(), r);
                    }
                }
                Err(e) => tracing::warn!("index record {name} is unreadable ({e}); ignored"),
            }
        }
        out
    }

    /// Rebuilds the index from the index records, the store and the ledger: per study, the
    /// newest version of the original and of its derivative, which of them the ledger has
    /// registered, and the header attributes of every instance. A study whose record can be
    /// used costs two manifests and no pixel object; every other study is rebuilt from all
    /// its versions in the store and the ledger.
    fn rebuild(&self) -> Result<(), String> {
        let started = Instant::now();
        let roots = self.store.studies().map_err(|e| e.to_string())?;
        let notes = self.store.notes("received/").map_err(|e| e.to_string())?;
        let mut received = Vec::new();
        let mut received_roots = HashSet::new();
        for (_, note) in notes {
            let Ok(r) = serde_json::from_value::<crate::share::Received>(note) else {
                continue;
            };
            received_roots.insert(r.stored_root);
            match self.store.open_manifest(&r.stored_root, &self.owner) {
                Ok((_, m)) => received.push((r.root, m, r.view(), r.grant)),
                Err(e) => tracing::warn!("received study {}: {e}", r.root),
            }
        }
        let roots: Vec<Digest> = roots
            .into_iter()
            .filter(|r| !received_roots.contains(r))
            .collect();
        let present: HashSet<Digest> = roots.iter().copied().collect();
        let mut records = self.usable_records(&present);
        let covered: HashMap<Digest, String> = records
            .iter()
            .flat_map(|(k, r)| r.roots.iter().map(move |d| (*d, k.clone())))
            .collect();
        let mut originals: BTreeMap<String, Vec<StudyManifest>> = BTreeMap::new();
        let mut derivatives: HashMap<Digest, Vec<StudyManifest>> = HashMap::new();
        let open = |root: &Digest,
                    originals: &mut BTreeMap<String, Vec<StudyManifest>>,
                    derivatives: &mut HashMap<Digest, Vec<StudyManifest>>|
         -> Result<(), String> {
            let (_, m) = match self.store.open_manifest(root, &self.owner) {
                Ok(x) => x,
                Err(StoreError::NotRecipient(_)) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            match m.derived_from {
                Some(from) => derivatives.entry(from).or_default().push(m),
                None => originals.entry(m.study_uid.clone()).or_default().push(m),
            }
            Ok(())
        };
        // Every version no record accounts for.
        for root in roots.iter().filter(|r| !covered.contains_key(r)) {
            open(root, &mut originals, &mut derivatives)?;
        }
        // A study with a version its record does not account for is rebuilt whole.
        let mut stale: BTreeSet<String> = originals.keys().cloned().collect();
        stale.extend(
            derivatives
                .keys()
                .filter_map(|from| covered.get(from).cloned()),
        );
        for study in &stale {
            if let Some(r) = records.remove(study) {
                for root in &r.roots {
                    open(root, &mut originals, &mut derivatives)?;
                }
            }
        }
        let mut index = Index::default();
        let from_store = originals.len();
        for (uid, versions) in originals {
            self.rebuild_study(&mut index, uid, versions, &derivatives)?;
        }
        let mut from_records = 0;
        for record in records.into_values() {
            match self.study_from_record(&mut index, &record) {
                Ok(()) => from_records += 1,
                Err(e) => {
                    tracing::warn!(
                        "index record of a study could not be used ({e}); rebuilding it"
                    );
                    let mut originals: BTreeMap<String, Vec<StudyManifest>> = BTreeMap::new();
                    let mut derivs: HashMap<Digest, Vec<StudyManifest>> = HashMap::new();
                    for root in &record.roots {
                        open(root, &mut originals, &mut derivs)?;
                    }
                    for (uid, versions) in originals {
                        self.rebuild_study(&mut index, uid, versions, &derivs)?;
                    }
                }
            }
        }
        // Studies received from other organisations: shown as they were received, never
        // registered or de-identified again here.
        for (root, manifest, view, grant) in received {
            self.index_received(&mut index, root, manifest, view, &grant, None)?;
        }
        let n = index.studies.len();
        *self.index.write().expect("not poisoned") = index;
        let m = &self.metrics;
        m.index_from_records
            .store(from_records as u64, Ordering::Relaxed);
        m.index_rebuilt.store(from_store as u64, Ordering::Relaxed);
        m.index_start_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        tracing::info!(
            "index ready: {n} studies ({from_records} from index records, {from_store} rebuilt \
             from the store) in {} ms",
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// A study from its index record: its newest versions' manifests from the store, the
    /// header attributes from the record where the manifest names the same header object.
    fn study_from_record(&self, index: &mut Index, r: &StudyRecord) -> Result<(), String> {
        let open = |root: &Digest| -> Result<Version, String> {
            self.store
                .open_manifest(root, &self.owner)
                .map(|(_, m)| Version::new(m))
                .map_err(|e| e.to_string())
        };
        let original = open(&r.original)?;
        if original.manifest.derived_from.is_some() || original.manifest.study_uid != r.study {
            return Err("its original is not the study's".into());
        }
        let derivative = r.derivative.as_ref().map(open).transpose()?;
        if let Some(d) = &derivative {
            if d.manifest.derived_from != Some(original.root) {
                return Err("its derivative does not name its original".into());
            }
        }
        let headers: HashMap<Digest, &[u8]> = r
            .headers
            .iter()
            .map(|h| (Digest::of(h), h.as_slice()))
            .collect();
        let mut metas = Vec::new();
        for (view, v) in [
            (View::Original, Some(&original)),
            (View::Deidentified, derivative.as_ref()),
        ] {
            let Some(v) = v else { continue };
            for (_, i) in v.manifest.instances() {
                if index.has_meta(view, &i.sop_instance_uid) {
                    continue;
                }
                let header = headers
                    .get(&i.header.digest)
                    .copied()
                    .filter(|h| h.len() as u64 == i.header.len);
                metas.push((
                    view,
                    i.sop_instance_uid.clone(),
                    self.attributes(i, header)?,
                ));
            }
        }
        for (view, uid, meta) in metas {
            index.put_meta(view, &uid, Arc::new(meta));
        }
        let versions = r.roots.clone();
        index.studies.insert(
            r.study.clone(),
            StudyState {
                registered_original: Some(original.clone()),
                registered_derivative: derivative.clone(),
                original,
                derivative,
                versions,
                changed: Instant::now(),
                patient: r.patient.clone(),
                deid: r.deid.clone(),
                failures: 0,
                last_error: None,
                received: None,
            },
        );
        Ok(())
    }

    /// One study rebuilt from all its versions in the store (`versions`: the original's;
    /// `derivatives`: by the original version they name) and the ledger.
    fn rebuild_study(
        &self,
        index: &mut Index,
        uid: String,
        mut versions: Vec<StudyManifest>,
        derivatives: &HashMap<Digest, Vec<StudyManifest>>,
    ) -> Result<(), String> {
        let registered = |root: &Digest| -> Result<bool, String> {
            match self.client.prove(&format!("study/{root}")) {
                Ok(_) => Ok(true),
                Err(ClientError::Refused { status: 404, .. }) => Ok(false),
                Err(e) => Err(e.to_string()),
            }
        };
        // Versions only grow: the newest has the most instances.
        versions.sort_by_key(|m| m.instance_count());
        let newest = versions.last().expect("at least one").clone();
        let mut reg_orig = None;
        for m in versions.iter().rev() {
            if registered(&m.root())? {
                reg_orig = Some(Version::new(m.clone()));
                break;
            }
        }
        let all_derivs: Vec<StudyManifest> = versions
            .iter()
            .flat_map(|m| derivatives.get(&m.root()).cloned().unwrap_or_default())
            .collect();
        let mut all_roots: BTreeSet<Digest> = versions.iter().map(|m| m.root()).collect();
        all_roots.extend(all_derivs.iter().map(|m| m.root()));
        let mut newest_deriv: Option<StudyManifest> = None;
        let mut reg_deriv = None;
        for d in &all_derivs {
            if newest_deriv.as_ref().is_none_or(|n| {
                d.instance_count() > n.instance_count()
                    || (d.instance_count() == n.instance_count()
                        && d.derived_from == Some(newest.root()))
            }) {
                newest_deriv = Some(d.clone());
            }
            if registered(&d.root())?
                && reg_deriv
                    .as_ref()
                    .is_none_or(|r: &Version| d.instance_count() > r.manifest.instance_count())
            {
                reg_deriv = Some(Version::new(d.clone()));
            }
        }
        // A crash between writing the original's version and the derivative's leaves the
        // derivative behind: de-identify what it lacks again from the stored originals.
        if newest_deriv
            .as_ref()
            .is_none_or(|d| d.derived_from != Some(newest.root()))
        {
            newest_deriv = self.repair_derivative(&newest, &versions, newest_deriv)?;
        }
        all_roots.extend(newest_deriv.as_ref().map(|d| d.root()));
        // Header attributes, for queries.
        for (view, m) in [
            (View::Original, Some(&newest)),
            (View::Deidentified, newest_deriv.as_ref()),
        ] {
            let Some(m) = m else { continue };
            for (_, i) in m.instances() {
                if index.has_meta(view, &i.sop_instance_uid) {
                    continue;
                }
                let meta = self.attributes(i, None)?;
                index.put_meta(view, &i.sop_instance_uid, Arc::new(meta));
            }
        }
        let mut metas = Vec::new();
        if let Some((_, i)) = newest.instances().next() {
            if let Some(m) = index.meta(View::Original, &i.sop_instance_uid) {
                metas.push((
                    View::Original,
                    String::new(),
                    InstanceMeta {
                        attrs: m.attrs.clone(),
                        transfer_syntax: m.transfer_syntax.clone(),
                    },
                ));
            }
        }
        if let Some((_, i)) = newest_deriv.as_ref().and_then(|d| d.instances().next()) {
            if let Some(m) = index.meta(View::Deidentified, &i.sop_instance_uid) {
                metas.push((
                    View::Deidentified,
                    String::new(),
                    InstanceMeta {
                        attrs: m.attrs.clone(),
                        transfer_syntax: m.transfer_syntax.clone(),
                    },
                ));
            }
        }
        let patient = self.pseudonym(&metas, None);
        self.touch(&uid);
        index.studies.insert(
            uid,
            StudyState {
                original: Version::new(newest),
                derivative: newest_deriv.map(Version::new),
                registered_original: reg_orig,
                registered_derivative: reg_deriv,
                versions: all_roots,
                changed: Instant::now(),
                patient,
                deid: Some(self.deid_record.clone()),
                failures: 0,
                last_error: None,
                received: None,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journalled(n: u8) -> Job {
        Job {
            bytes: Bytes::from(vec![n; 10]),
            study: None,
            pre: None,
            reply: Reply::Journal {
                ticket: crate::journal::Ticket::for_tests(),
                sop_uid: None,
                attempt: 0,
            },
        }
    }

    /// Sends `n` journalled jobs, `gap` apart.
    fn sender(
        tx: SyncSender<Job>,
        n: u8,
        gap: Duration,
    ) -> std::thread::JoinHandle<SyncSender<Job>> {
        std::thread::spawn(move || {
            for i in 0..n {
                std::thread::sleep(gap);
                tx.send(journalled(i)).unwrap();
            }
            tx
        })
    }

    #[test]
    fn the_committer_waits_for_senders_to_pause_but_not_for_long_nor_for_a_waiting_one() {
        let long = Defer {
            quiet: Duration::from_millis(500),
            longest: Duration::from_secs(20),
        };
        // Instances every 5 ms: one batch with them all, once they stop.
        let (tx, rx) = sync_channel(QUEUE);
        let t = sender(tx, 20, Duration::from_millis(5));
        let batch = gather(&rx, journalled(100), Some(long));
        assert_eq!(batch.len(), 21);
        drop(t.join().unwrap());
        // Without waiting (no journal): what is queued, not what comes later.
        let (tx, rx) = sync_channel(QUEUE);
        let t = sender(tx, 20, Duration::from_millis(50));
        let batch = gather(&rx, journalled(100), None);
        assert!(batch.len() < 21, "{} jobs", batch.len());
        drop(t.join().unwrap());
        // Not beyond `longest`, however steady the senders.
        let (tx, rx) = sync_channel(QUEUE);
        let t = sender(tx, 40, Duration::from_millis(5));
        let started = Instant::now();
        let short = Defer {
            quiet: Duration::from_millis(500),
            longest: Duration::from_millis(60),
        };
        let batch = gather(&rx, journalled(100), Some(short));
        assert!(batch.len() < 41, "{} jobs", batch.len());
        assert!(started.elapsed() < Duration::from_millis(500));
        drop(t.join().unwrap());
        // A sender waiting for its job to be stored: committed at once.
        let (tx, rx) = sync_channel(QUEUE);
        let t = sender(tx, 20, Duration::from_millis(50));
        let (answer, _wait) = sync_channel(1);
        let waiting = Job {
            reply: Reply::Wait(answer),
            ..journalled(100)
        };
        let started = Instant::now();
        let batch = gather(&rx, waiting, Some(long));
        assert_eq!(batch.len(), 1);
        assert!(started.elapsed() < Duration::from_millis(40));
        drop(t.join().unwrap());
    }
}

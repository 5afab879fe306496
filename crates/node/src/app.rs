//! The application side of consensus: proposes blocks from the mempool, verifies proposed
//! blocks, ships block bytes to the other nodes, and applies finalised blocks to the ledger.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::marker::PhantomData;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use commonware_actor::Feedback;
use commonware_codec::DecodeExt as _;
use commonware_consensus::simplex::Plan;
use commonware_consensus::simplex::types::{Activity, Context};
use commonware_consensus::{Automaton, CertifiableAutomaton, Relay, Reporter};
use commonware_cryptography::certificate::Scheme;
use commonware_cryptography::ed25519::PublicKey;
use commonware_cryptography::sha256::Digest;
use commonware_p2p::Recipients;
use commonware_runtime::{Clock, Handle, IoBuf, Spawner};
use commonware_utils::channel::{mpsc, oneshot};
use medledger_ledger::{Ledger, Receipt, Tx};

use crate::block::{Block, digest_of, genesis_digest, hex};

/// Most transactions in one block.
pub const MAX_BLOCK_TXS: usize = 2_000;

/// How long a node waits for an answer before asking its peers for the same block again.
const REFETCH_MS: u64 = 250;

/// A leader with nothing to propose waits for a transaction until this long after its
/// parent block was proposed, then proposes an empty block: an idle network makes two blocks
/// a second (time still advances for expiries) instead of one every network round trip.
/// Well inside the engine's leader timeout (1 s), so a waiting leader is never skipped.
pub const IDLE_BLOCK_MS: u64 = 500;

/// Most transactions forwarded to the peers in one message.
const GOSSIP_BATCH: usize = 100;

/// Most transactions a node's mempool holds (some 20 s of the ledger's throughput). Past it,
/// the API answers 503 and forwarded transactions are dropped until blocks drain the pool:
/// a flood costs the flooder retries, not the node its memory.
pub const MEMPOOL_LIMIT: usize = 100_000;

/// The log of unfinalised blocks is rewritten without the finalised ones past this size.
const UNFINALISED_LOG_MAX: u64 = 64 << 20;

enum Message {
    Propose {
        context: Context<Digest, PublicKey>,
        response: oneshot::Sender<Digest>,
    },
    Verify {
        context: Context<Digest, PublicKey>,
        payload: Digest,
        response: oneshot::Sender<bool>,
    },
    Broadcast {
        payload: Digest,
    },
    Finalized {
        payload: Digest,
    },
    Received {
        bytes: Vec<u8>,
    },
    Submit {
        tx: Tx,
        /// The signature was already checked (by the API's admission check).
        verified: bool,
    },
    /// Transactions a peer forwarded, their signatures checked on arrival.
    Gossiped {
        /// With their ids (computed with the signature checks).
        txs: Vec<(medledger_crypto::Digest, Tx)>,
    },
    /// The time a waiting leader may wait for transactions has passed.
    Wake,
    /// A peer asks for a block's bytes.
    Request {
        from: PublicKey,
        digest: Vec<u8>,
    },
    /// Consensus holds signed evidence that a participant equivocated.
    Fault {
        participant: u32,
        kind: &'static str,
    },
}

/// What a node has finalised: block digests by height, the ledger's root after each, and
/// the receipts. Shared with whoever started the node (tests, the API).
#[derive(Debug, Default)]
pub struct Finalized {
    pub blocks: BTreeMap<u64, (String, String)>,
    pub receipts: Vec<Receipt>,
    /// Receipts by transaction id (hex), for clients asking about their transaction.
    pub by_tx: HashMap<String, (u64, Receipt)>,
    pub mempool: usize,
    /// Transactions this node learnt from its peers' forwarding (not submitted to it).
    pub gossiped: u64,
    /// Per height: when this node applied the block (ms since the Unix epoch, wall clock) and
    /// the ids of its transactions (for clients measuring time to finality).
    pub applied: BTreeMap<u64, (u64, Vec<String>)>,
    /// Equivocation evidence consensus reported, per participant index (the position of its
    /// key in the sorted participant set): kind -> count.
    pub faults: BTreeMap<u32, BTreeMap<&'static str, u64>>,
}

/// The handle consensus and clients talk to.
pub struct Mailbox<S> {
    sender: mpsc::UnboundedSender<Message>,
    mempool: Arc<MempoolGauge>,
    _scheme: PhantomData<fn() -> S>,
}

/// How full the mempool is, for whoever submits transactions.
#[derive(Debug)]
struct MempoolGauge {
    len: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl<S> Clone for Mailbox<S> {
    fn clone(&self) -> Self {
        Mailbox {
            sender: self.sender.clone(),
            mempool: self.mempool.clone(),
            _scheme: PhantomData,
        }
    }
}

impl<S> std::fmt::Debug for Mailbox<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mailbox")
    }
}

impl<S> Mailbox<S> {
    /// Adds a transaction to this node's mempool.
    pub fn submit(&self, tx: Tx) {
        let _ = self.sender.send(Message::Submit {
            tx,
            verified: false,
        });
    }

    /// Adds a transaction whose signature the caller has just verified (the API admits
    /// transactions with the ledger's own checks first), sparing a second verification.
    pub fn submit_verified(&self, tx: Tx) {
        let _ = self.sender.send(Message::Submit { tx, verified: true });
    }

    /// Whether the mempool is full ([`MEMPOOL_LIMIT`]): a transaction submitted now would be
    /// dropped, so the API asks the client to retry instead.
    pub fn mempool_full(&self) -> bool {
        self.mempool.len.load(std::sync::atomic::Ordering::Relaxed) >= self.mempool.limit
    }
}

impl<S: Scheme + 'static> Automaton for Mailbox<S> {
    type Context = Context<Digest, PublicKey>;
    type Digest = Digest;

    async fn propose(&mut self, context: Self::Context) -> oneshot::Receiver<Digest> {
        let (response, rx) = oneshot::channel();
        let _ = self.sender.send(Message::Propose { context, response });
        rx
    }

    async fn verify(&mut self, context: Self::Context, payload: Digest) -> oneshot::Receiver<bool> {
        let (response, rx) = oneshot::channel();
        let _ = self.sender.send(Message::Verify {
            context,
            payload,
            response,
        });
        rx
    }
}

impl<S: Scheme + 'static> CertifiableAutomaton for Mailbox<S> {}

impl<S: Scheme + 'static> Relay for Mailbox<S> {
    type Digest = Digest;
    type PublicKey = PublicKey;
    type Plan = Plan<PublicKey>;

    fn broadcast(&mut self, payload: Digest, _plan: Plan<PublicKey>) -> Feedback {
        match self.sender.send(Message::Broadcast { payload }) {
            Ok(()) => Feedback::Ok,
            Err(_) => Feedback::Closed,
        }
    }
}

impl<S: Scheme + 'static> Reporter for Mailbox<S> {
    type Activity = Activity<S, Digest>;

    fn report(&mut self, activity: Self::Activity) -> Feedback {
        use commonware_consensus::simplex::types::Attributable as _;
        let msg = match activity {
            Activity::Finalization(f) => Message::Finalized {
                payload: f.proposal.payload,
            },
            Activity::ConflictingNotarize(c) => Message::Fault {
                participant: c.signer().get(),
                kind: "conflicting-notarize",
            },
            Activity::ConflictingFinalize(c) => Message::Fault {
                participant: c.signer().get(),
                kind: "conflicting-finalize",
            },
            Activity::NullifyFinalize(c) => Message::Fault {
                participant: c.signer().get(),
                kind: "nullify-finalize",
            },
            _ => return Feedback::Ok,
        };
        if self.sender.send(msg).is_err() {
            return Feedback::Closed;
        }
        Feedback::Ok
    }
}

/// A verification waiting for its block's bytes.
type PendingVerify = (Context<Digest, PublicKey>, Digest, oneshot::Sender<bool>);

/// The application actor of one node.
#[allow(missing_debug_implementations)]
pub struct Application<E> {
    context: E,
    receiver: mpsc::UnboundedReceiver<Message>,
    chain: String,
    ledger: Arc<RwLock<Ledger>>,
    genesis: Digest,
    /// Finalised blocks, one JSON line each, flushed before they are applied.
    log: Option<std::fs::File>,
    /// Blocks voted for and not yet finalised: the file, its path and size.
    unfinalised_log: Option<(std::fs::File, std::path::PathBuf, u64)>,
    /// A finalisation whose ancestors are still being fetched.
    pending_final: Option<Digest>,
    /// Blocks asked of the peers, and when (ms).
    requested: HashMap<Digest, u64>,
    blocks: HashMap<Digest, Block>,
    waiting: HashMap<Digest, Vec<PendingVerify>>,
    /// Pending transactions in arrival order, with their ids (computed once).
    mempool: Vec<(medledger_crypto::Digest, Tx)>,
    in_mempool: std::collections::HashSet<medledger_crypto::Digest>,
    /// The mempool's length as the submitters see it, and its limit.
    gauge: Arc<MempoolGauge>,
    /// Whether a key is an active member, as of the last applied block (cleared by every
    /// block with transactions, any of which may change membership).
    members: HashMap<medledger_crypto::VerifyingKey, bool>,
    /// The transaction ids of unapplied blocks, computed once for the proposals that build
    /// on them (dropped when a block is applied, or falls below the applied height).
    tx_ids: HashMap<Digest, Vec<medledger_crypto::Digest>>,
    /// Transactions submitted here, still to be forwarded to the peers, so that whoever
    /// leads next can propose them.
    outbox: Vec<Tx>,
    /// A proposal waiting for transactions (see [`IDLE_BLOCK_MS`]), and until when (ms).
    parked: Option<(Context<Digest, PublicKey>, oneshot::Sender<Digest>, u64)>,
    /// The deadline a wake-up is already scheduled for.
    wake_at: Option<u64>,
    /// Sends messages to this actor (wake-ups); set when it starts.
    wake: Option<mpsc::UnboundedSender<Message>>,
    applied: Digest,
    applied_height: u64,
    finalized: Arc<Mutex<Finalized>>,
}

impl<E: Spawner + Clock> Application<E> {
    pub fn new<S>(context: E, ledger: Ledger) -> (Self, Mailbox<S>, Arc<Mutex<Finalized>>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let chain = ledger.chain().to_string();
        let genesis = genesis_digest(&chain);
        let finalized = Arc::new(Mutex::new(Finalized::default()));
        let gauge = Arc::new(MempoolGauge {
            len: std::sync::atomic::AtomicUsize::new(0),
            limit: MEMPOOL_LIMIT,
        });
        let app = Application {
            context,
            receiver,
            chain,
            ledger: Arc::new(RwLock::new(ledger)),
            genesis,
            log: None,
            unfinalised_log: None,
            pending_final: None,
            requested: HashMap::new(),
            blocks: HashMap::new(),
            waiting: HashMap::new(),
            mempool: Vec::new(),
            in_mempool: std::collections::HashSet::new(),
            gauge: gauge.clone(),
            members: HashMap::new(),
            tx_ids: HashMap::new(),
            outbox: Vec::new(),
            parked: None,
            wake_at: None,
            wake: None,
            applied: genesis,
            applied_height: 0,
            finalized: finalized.clone(),
        };
        let mailbox = Mailbox {
            sender,
            mempool: gauge,
            _scheme: PhantomData,
        };
        (app, mailbox, finalized)
    }

    /// The same application with a mempool of at most `limit` transactions instead of
    /// [`MEMPOOL_LIMIT`] (for tests). Call before cloning the mailbox.
    pub fn with_mempool_limit<S>(
        mut self,
        mailbox: Mailbox<S>,
        limit: usize,
    ) -> (Self, Mailbox<S>) {
        let gauge = Arc::new(MempoolGauge {
            len: std::sync::atomic::AtomicUsize::new(0),
            limit,
        });
        self.gauge = gauge.clone();
        let mailbox = Mailbox {
            sender: mailbox.sender,
            mempool: gauge,
            _scheme: PhantomData,
        };
        (self, mailbox)
    }

    /// The ledger this node applies blocks to (read it for queries).
    pub fn ledger(&self) -> Arc<RwLock<Ledger>> {
        self.ledger.clone()
    }

    /// Replays the finalised blocks logged at `path` (a previous run's) into the ledger and
    /// keeps logging there. A torn last line (a crash mid-write) is dropped and truncated.
    pub fn recover(&mut self, path: &Path) -> std::io::Result<u64> {
        let mut good_len = 0u64;
        let mut replayed = 0;
        if path.exists() {
            let f = std::fs::File::open(path)?;
            for line in std::io::BufReader::new(f).split(b'\n') {
                let line = line?;
                let Some(block) = Block::decode(&line) else {
                    break;
                };
                let digest = block.digest();
                if block.parent_digest() != Some(self.applied)
                    || block.height != self.applied_height + 1
                {
                    break;
                }
                self.apply(digest, block);
                good_len += line.len() as u64 + 1;
                replayed += 1;
            }
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.set_len(good_len)?;
        f.sync_all()?;
        self.log = Some(f);
        // Blocks voted for but not finalised before the stop: consensus may still need them.
        let mut name = path.as_os_str().to_owned();
        name.push(".unfinalised");
        let unfinalised = std::path::PathBuf::from(name);
        if unfinalised.exists() {
            let f = std::fs::File::open(&unfinalised)?;
            for line in std::io::BufReader::new(f).split(b'\n') {
                let Some(block) = Block::decode(&line?) else {
                    break; // a torn last line
                };
                if block.height > self.applied_height {
                    self.blocks.insert(block.digest(), block);
                }
            }
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&unfinalised)?;
        self.compact_unfinalised(&unfinalised)?;
        Ok(replayed)
    }

    /// Writes a block (already among `blocks`) this node is about to vote for (its own proposal, or one it verified) to
    /// the log of unfinalised blocks, so that after a restart of every node the block a
    /// notarisation names can still be found: consensus resumes from its journal, which knows
    /// the digest but not the bytes. Blocks with transactions are flushed; an empty block is
    /// lost only if every node that voted for it loses power before the next flush. Returns
    /// false if it could not be written (then the node does not vote for it).
    fn keep_unfinalised(&mut self, digest: &Digest) -> bool {
        let Some((file, path, size)) = &mut self.unfinalised_log else {
            return true;
        };
        let Some(block) = self.blocks.get(digest) else {
            return false;
        };
        match append_block(file, block) {
            Ok(n) => *size += n,
            Err(e) => {
                tracing::error!("cannot write {}: {e}", path.display());
                return false;
            }
        }
        if *size > UNFINALISED_LOG_MAX {
            let path = path.clone();
            if let Err(e) = self.compact_unfinalised(&path) {
                tracing::error!("cannot compact {}: {e}", path.display());
            }
        }
        true
    }

    /// Rewrites the log of unfinalised blocks with only those above the applied height.
    fn compact_unfinalised(&mut self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut out = Vec::new();
        for b in self.blocks.values() {
            if b.height > self.applied_height {
                out.extend(b.encode());
                out.push(b'\n');
            }
        }
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        let f = std::fs::OpenOptions::new().append(true).open(path)?;
        self.unfinalised_log = Some((f, path.to_path_buf(), out.len() as u64));
        Ok(())
    }

    /// The digest consensus starts from (the `Floor::Genesis` of the engine).
    pub fn genesis(&self) -> Digest {
        self.genesis
    }

    /// Runs the actor. `blocks` is the p2p channel that carries block bytes between nodes,
    /// `requests` the one on which a node asks its peers for blocks it missed, `txs` the one
    /// that forwards submitted transactions to the peers.
    pub fn start<Snd, Rcv>(
        mut self,
        blocks: (Snd, Rcv),
        requests: (Snd, Rcv),
        txs: (Snd, Rcv),
    ) -> Handle<()>
    where
        Snd: commonware_p2p::Sender<PublicKey = PublicKey>,
        Rcv: commonware_p2p::Receiver<PublicKey = PublicKey>,
    {
        let (mut block_sender, mut block_receiver) = blocks;
        let (mut request_sender, mut request_receiver) = requests;
        let (mut tx_sender, mut tx_receiver) = txs;
        let (tx, mut received) = mpsc::unbounded_channel::<Message>();
        self.wake = Some(tx.clone());
        let fwd = tx.clone();
        let chain = self.chain.clone();
        self.context
            .child("tx_receiver")
            .spawn(move |_| async move {
                while let Ok((_, bytes)) = tx_receiver.recv().await {
                    // Anything but well-signed transactions of this chain is dropped here, off
                    // the application's thread: a peer's garbage costs it nothing.
                    let Some(txs) = decode_gossip(bytes.as_ref(), &chain) else {
                        continue;
                    };
                    if fwd.send(Message::Gossiped { txs }).is_err() {
                        break;
                    }
                }
            });
        let fwd = tx.clone();
        self.context
            .child("block_receiver")
            .spawn(move |_| async move {
                while let Ok((_, bytes)) = block_receiver.recv().await {
                    let b: &[u8] = bytes.as_ref();
                    if fwd.send(Message::Received { bytes: b.to_vec() }).is_err() {
                        break;
                    }
                }
            });
        let fwd = tx;
        self.context
            .child("request_receiver")
            .spawn(move |_| async move {
                while let Ok((from, bytes)) = request_receiver.recv().await {
                    let digest = AsRef::<[u8]>::as_ref(&bytes).to_vec();
                    if fwd.send(Message::Request { from, digest }).is_err() {
                        break;
                    }
                }
            });
        self.context
            .child("application")
            .spawn(move |_| async move {
                loop {
                    let msg = tokio_select(&mut self.receiver, &mut received).await;
                    let Some(msg) = msg else { break };
                    self.handle(msg, &mut block_sender, &mut request_sender);
                    // Forward what was submitted here once no more submissions wait, in
                    // batches.
                    if !self.outbox.is_empty()
                        && (self.outbox.len() >= GOSSIP_BATCH || self.receiver.is_empty())
                    {
                        let batch = std::mem::take(&mut self.outbox);
                        let bytes = serde_json::to_vec(&batch).expect("transactions serialise");
                        let _ = tx_sender.send(Recipients::All, IoBuf::from(bytes), false);
                    }
                }
            })
    }

    fn handle<Snd: commonware_p2p::Sender<PublicKey = PublicKey>>(
        &mut self,
        msg: Message,
        sender: &mut Snd,
        requests: &mut Snd,
    ) {
        match msg {
            Message::Submit { tx, verified } => {
                // Forged or foreign transactions never enter the mempool, nor duplicates.
                // Every signature, the endorsers' too: what the mempool holds is applied
                // without verifying its signatures again.
                let bytes = tx.body.signing_bytes();
                let signed = verified || Ledger::signatures_verify(&tx, &bytes);
                let id = medledger_crypto::Digest::of(&bytes);
                if signed && tx.body.chain == self.chain && self.add_to_mempool(id, tx.clone()) {
                    self.outbox.push(tx);
                    self.unpark(requests);
                }
            }
            Message::Gossiped { txs } => {
                let mut added = 0;
                for (id, tx) in txs {
                    added += u64::from(self.add_to_mempool(id, tx));
                }
                if added > 0 {
                    let mut f = self.finalized.lock().expect("not poisoned");
                    f.gossiped += added;
                    f.mempool = self.mempool.len();
                    drop(f);
                    self.unpark(requests);
                }
            }
            Message::Wake => {
                self.wake_at = None;
                self.unpark(requests);
            }
            Message::Propose { context, response } => {
                // A newer view's proposal replaces one still waiting.
                self.parked = None;
                self.propose(context, response, requests);
            }
            Message::Broadcast { payload } => {
                if let Some(b) = self.blocks.get(&payload) {
                    let _ = sender.send(Recipients::All, IoBuf::from(b.encode()), false);
                }
            }
            Message::Verify {
                context,
                payload,
                response,
            } => self.verify(context, payload, response, requests),
            Message::Received { bytes } => {
                let digest = digest_of(&bytes);
                let Some(block) = Block::decode(&bytes) else {
                    return; // not a block: ignored (a faulty peer)
                };
                if self.blocks.contains_key(&digest) {
                    return; // a duplicate answer: nothing new to act on
                }
                tracing::debug!(height = block.height, "block received");
                self.requested.remove(&digest);
                self.blocks.insert(digest, block);
                if let Some(waiters) = self.waiting.remove(&digest) {
                    for (context, payload, response) in waiters {
                        self.verify(context, payload, response, requests);
                    }
                }
                if let Some(p) = self.pending_final.take() {
                    self.finalize(p, requests);
                }
            }
            Message::Fault { participant, kind } => {
                tracing::warn!(participant, kind, "equivocation evidence");
                let mut f = self.finalized.lock().expect("not poisoned");
                *f.faults
                    .entry(participant)
                    .or_default()
                    .entry(kind)
                    .or_default() += 1;
            }
            Message::Finalized { payload } => {
                tracing::debug!(block = %hex(&payload), "finalised");
                self.finalize(payload, requests)
            }
            Message::Request { from, digest } => {
                let found = Digest::decode(bytes::Bytes::from(digest))
                    .ok()
                    .and_then(|d| self.blocks.get(&d))
                    .map(Block::encode);
                tracing::debug!(found = found.is_some(), "block requested");
                if let Some(bytes) = found {
                    let _ = sender.send(Recipients::One(from), IoBuf::from(bytes), false);
                }
            }
        }
    }

    /// Adds a transaction to the mempool unless it is there already, its signer is not an
    /// active member (a peer cannot fill the mempools with transactions of keys it made up),
    /// or its signer's nonce has moved past it (applied, or replaced): such a transaction
    /// could only be refused; nor when the mempool is full ([`MEMPOOL_LIMIT`]). Returns
    /// whether added.
    fn add_to_mempool(&mut self, id: medledger_crypto::Digest, tx: Tx) -> bool {
        let refused = {
            let ledger = self.ledger.read().expect("not poisoned");
            let signer = tx.body.signer;
            let member = *self
                .members
                .entry(signer)
                .or_insert_with(|| ledger.member(&signer).is_some_and(|m| m.active));
            !member || tx.body.nonce < ledger.next_nonce(&signer)
        };
        if refused || self.mempool.len() >= self.gauge.limit || !self.in_mempool.insert(id) {
            return false;
        }
        self.mempool.push((id, tx));
        self.gauge
            .len
            .store(self.mempool.len(), std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Tries again a proposal that waits for transactions.
    fn unpark<Snd: commonware_p2p::Sender<PublicKey = PublicKey>>(&mut self, requests: &mut Snd) {
        if let Some((context, response, _)) = self.parked.take() {
            self.propose(context, response, requests);
        }
    }

    /// Proposes a block on the context's parent with the mempool's transactions that its
    /// unapplied ancestors do not carry. With none, waits (parks the proposal) until one
    /// arrives or [`IDLE_BLOCK_MS`] after the parent was proposed, then proposes an empty
    /// block.
    fn propose<Snd: commonware_p2p::Sender<PublicKey = PublicKey>>(
        &mut self,
        context: Context<Digest, PublicKey>,
        response: oneshot::Sender<Digest>,
        requests: &mut Snd,
    ) {
        let parent = context.parent.1;
        let Some(parent_height) = self.height_of(&parent) else {
            // The parent's bytes have not arrived: no proposal this view.
            return;
        };
        // Leave out what the unapplied ancestors of this proposal already carry.
        let mut pending = std::collections::HashSet::new();
        let mut cursor = parent;
        while cursor != self.applied {
            let Some(b) = self.blocks.get(&cursor) else {
                // Behind: an ancestor is missing. Fetch it; propose nothing this view.
                self.request(cursor, requests);
                return;
            };
            let ids = self
                .tx_ids
                .entry(cursor)
                .or_insert_with(|| b.txs.iter().map(Tx::id).collect());
            pending.extend(ids.iter().copied());
            match b.parent_digest() {
                Some(p) if b.height > self.applied_height => cursor = p,
                _ => break,
            }
        }
        let txs: Vec<Tx> = self
            .mempool
            .iter()
            .filter(|(id, _)| !pending.contains(id))
            .take(MAX_BLOCK_TXS)
            .map(|(_, t)| t.clone())
            .collect();
        let time_ms = self.now_ms();
        if txs.is_empty() {
            let parent_time = self.blocks.get(&parent).map_or(0, |b| b.time_ms);
            let deadline = parent_time.saturating_add(IDLE_BLOCK_MS);
            if time_ms < deadline {
                self.parked = Some((context, response, deadline));
                if self.wake_at != Some(deadline)
                    && let Some(wake) = self.wake.clone()
                {
                    self.wake_at = Some(deadline);
                    let wait = std::time::Duration::from_millis(deadline - time_ms);
                    self.context.child("idle").spawn(move |ctx| async move {
                        ctx.sleep(wait).await;
                        let _ = wake.send(Message::Wake);
                    });
                }
                return;
            }
        }
        let block = Block {
            height: parent_height + 1,
            parent: hex(&parent),
            time_ms,
            txs,
        };
        let digest = block.digest();
        self.blocks.insert(digest, block);
        // Kept before the proposal leaves this node (see `keep_unfinalised`).
        if !self.keep_unfinalised(&digest) {
            return;
        }
        let _ = response.send(digest);
    }

    /// Answers a verification, or keeps it pending (and asks the peers) while the proposed
    /// block or its parent has not arrived: missing data is never a reason to vote no.
    fn verify<Snd: commonware_p2p::Sender<PublicKey = PublicKey>>(
        &mut self,
        context: Context<Digest, PublicKey>,
        payload: Digest,
        response: oneshot::Sender<bool>,
        requests: &mut Snd,
    ) {
        let parent = context.parent.1;
        let missing = if !self.blocks.contains_key(&payload) {
            Some(payload)
        } else if self.height_of(&parent).is_none() {
            Some(parent)
        } else {
            None
        };
        match missing {
            Some(d) => {
                if d == parent {
                    self.request(d, requests);
                }
                self.waiting
                    .entry(d)
                    .or_default()
                    .push((context, payload, response));
            }
            None => {
                let mut ok = self.valid(&context, &payload);
                if ok {
                    ok = self.keep_unfinalised(&payload);
                }
                let _ = response.send(ok);
            }
        }
    }

    /// Asks the peers for a block, unless it was asked for within [`REFETCH_MS`]: a node that
    /// is far behind walks back one ancestor per answer, and every duplicate answer or repeated
    /// finalisation must not turn into another request (that storm once kept a restarted node
    /// from ever catching up).
    fn request<Snd: commonware_p2p::Sender<PublicKey = PublicKey>>(
        &mut self,
        digest: Digest,
        requests: &mut Snd,
    ) {
        let now = self.now_ms();
        if self
            .requested
            .get(&digest)
            .is_some_and(|at| now < at + REFETCH_MS)
        {
            return;
        }
        if self.requested.len() > 10_000 {
            self.requested.retain(|_, at| now < *at + REFETCH_MS);
        }
        self.requested.insert(digest, now);
        let _ = requests.send(
            Recipients::All,
            IoBuf::from(digest.as_ref().to_vec()),
            false,
        );
    }

    fn now_ms(&self) -> u64 {
        self.context
            .current()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn height_of(&self, digest: &Digest) -> Option<u64> {
        if *digest == self.genesis {
            return Some(0);
        }
        self.blocks.get(digest).map(|b| b.height)
    }

    /// A block is valid for a context if it extends the context's parent by one height and
    /// every transaction in it parses (validity of each transaction is the ledger's, decided
    /// deterministically when the block is applied).
    fn valid(&self, context: &Context<Digest, PublicKey>, payload: &Digest) -> bool {
        let Some(block) = self.blocks.get(payload) else {
            return false;
        };
        let parent = context.parent.1;
        block.parent_digest() == Some(parent)
            && self
                .height_of(&parent)
                .is_some_and(|h| block.height == h + 1)
            && block.txs.len() <= MAX_BLOCK_TXS
            && block.txs.iter().all(|t| t.body.chain == self.chain)
    }

    /// Applies a finalised block and every unapplied ancestor, in height order. An ancestor
    /// whose bytes this node never received is asked of the peers first.
    fn finalize<Snd: commonware_p2p::Sender<PublicKey = PublicKey>>(
        &mut self,
        payload: Digest,
        requests: &mut Snd,
    ) {
        let mut chain = Vec::new();
        let mut cursor = payload;
        while cursor != self.applied {
            let Some(block) = self.blocks.get(&cursor) else {
                tracing::debug!(missing = %hex(&cursor), applied = self.applied_height, "fetching an ancestor of a finalised block");
                self.pending_final = Some(payload);
                self.request(cursor, requests);
                return;
            };
            if block.height <= self.applied_height {
                return; // already applied (a repeated report)
            }
            chain.push(cursor);
            match block.parent_digest() {
                Some(p) => cursor = p,
                None => return,
            }
        }
        for d in chain.into_iter().rev() {
            let block = self.blocks.get(&d).expect("walked above").clone();
            if let Some(log) = &mut self.log {
                // A block with transactions is durable before it is applied, and flushing it
                // flushes the empty blocks written before it (one file, appended in order). An
                // empty block changes nothing a client was told about; if a crash loses it, the
                // node fetches it again from its peers. Idle networks propose empty blocks
                // many times a second, so they are not flushed one by one.
                if append_block(log, &block).is_err() {
                    tracing::error!("cannot write the block log; stopping application of blocks");
                    return;
                }
            }
            self.apply(d, block);
        }
    }

    fn apply(&mut self, d: Digest, block: Block) {
        // The transactions this node's mempool holds, identical to the block's, had every
        // signature verified when they were admitted.
        let ids: Vec<medledger_crypto::Digest> = block.txs.iter().map(Tx::id).collect();
        let verified: Vec<bool> = if self.mempool.is_empty() {
            Vec::new()
        } else {
            let pool: HashMap<&medledger_crypto::Digest, &Tx> =
                self.mempool.iter().map(|(id, t)| (id, t)).collect();
            block
                .txs
                .iter()
                .zip(&ids)
                .map(|(t, id)| pool.get(id).is_some_and(|m| *m == t))
                .collect()
        };
        let root;
        let receipts = {
            let mut ledger = self.ledger.write().expect("not poisoned");
            let r = ledger.apply_block_verified(block.time_ms, &block.txs, &verified);
            root = ledger.root();
            r
        };
        let applied: std::collections::HashSet<_> = ids.into_iter().collect();
        self.tx_ids.remove(&d);
        if self.tx_ids.len() > 64 {
            // Blocks of abandoned forks.
            let (blocks, applied_height) = (&self.blocks, block.height);
            self.tx_ids
                .retain(|k, _| blocks.get(k).is_some_and(|b| b.height > applied_height));
        }
        if !applied.is_empty() {
            self.members.clear();
            self.mempool.retain(|(id, _)| !applied.contains(id));
            for id in &applied {
                self.in_mempool.remove(id);
            }
            self.gauge
                .len
                .store(self.mempool.len(), std::sync::atomic::Ordering::Relaxed);
        }
        self.applied = d;
        self.applied_height = block.height;
        let mut f = self.finalized.lock().expect("not poisoned");
        f.blocks.insert(block.height, (hex(&d), root.to_hex()));
        for r in &receipts {
            // A transaction's first verdict stands, but for a refusal followed by success: a
            // copy reaching a later block is refused as a replay and must not hide the
            // transaction's success (nor its first reason for refusal).
            match f.by_tx.entry(r.tx.to_hex()) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((block.height, r.clone()));
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if o.get().1.error.is_some() && r.error.is_none() {
                        o.insert((block.height, r.clone()));
                    }
                }
            }
        }
        let now_ms = self.now_ms();
        f.applied.insert(
            block.height,
            (now_ms, receipts.iter().map(|r| r.tx.to_hex()).collect()),
        );
        f.receipts.extend(receipts);
        f.mempool = self.mempool.len();
        self.blocks.insert(d, block);
    }
}

/// Appends a block as one JSON line; flushes it to disk if it carries transactions (which
/// flushes the empty blocks before it too). Returns the bytes written.
fn append_block(file: &mut std::fs::File, block: &Block) -> std::io::Result<u64> {
    let mut line = block.encode();
    line.push(b'\n');
    file.write_all(&line)?;
    if !block.txs.is_empty() {
        file.sync_data()?;
    }
    Ok(line.len() as u64)
}

/// The transactions of a peer's forwarding message, with their ids: a JSON list of at most
/// [`MAX_BLOCK_TXS`] transactions of `chain` whose every signature (the signer's and the
/// endorsers') verifies, checked in one batch, then one by one if the batch fails, so that a
/// forged one costs only itself. `None` for anything else.
fn decode_gossip(bytes: &[u8], chain: &str) -> Option<Vec<(medledger_crypto::Digest, Tx)>> {
    let txs: Vec<Tx> = serde_json::from_slice(bytes).ok()?;
    if txs.len() > MAX_BLOCK_TXS {
        return None;
    }
    let txs: Vec<Tx> = txs.into_iter().filter(|t| t.body.chain == chain).collect();
    let signing: Vec<Vec<u8>> = txs.iter().map(|t| t.body.signing_bytes()).collect();
    let batch: Vec<_> = txs
        .iter()
        .zip(&signing)
        .flat_map(|(t, b)| {
            std::iter::once((t.body.signer, b.as_slice(), t.signature)).chain(
                t.endorsements
                    .iter()
                    .map(move |e| (e.key, b.as_slice(), e.signature)),
            )
        })
        .collect();
    let all = batch.is_empty() || medledger_crypto::verify_all(&batch);
    Some(
        txs.into_iter()
            .zip(signing)
            .filter(|(t, b)| all || Ledger::signatures_verify(t, b))
            .map(|(t, b)| (medledger_crypto::Digest::of(&b), t))
            .collect(),
    )
}

/// Waits for the next message from consensus or from the network.
async fn tokio_select(
    a: &mut mpsc::UnboundedReceiver<Message>,
    b: &mut mpsc::UnboundedReceiver<Message>,
) -> Option<Message> {
    use std::future::poll_fn;
    use std::task::Poll;
    poll_fn(|cx| {
        match a.poll_recv(cx) {
            Poll::Ready(Some(m)) => return Poll::Ready(Some(m)),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        match b.poll_recv(cx) {
            Poll::Ready(Some(m)) => Poll::Ready(Some(m)),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use commonware_runtime::{Runner as _, deterministic};
    use medledger_crypto::SigningKey;
    use medledger_ledger::identity::{self, OrgCa};
    use medledger_ledger::{Genesis, Op, OrgClass, Role};

    use super::*;

    const CHAIN: &str = "medledger-mempool-test";

    /// A mempool at its limit takes no more transactions, says so to submitters, and does
    /// not take the same transaction twice on the way.
    #[test]
    fn a_full_mempool_takes_nothing_more_and_says_so() {
        deterministic::Runner::default().start(|context| async move {
            let admin = SigningKey::from_seed([1; 32]);
            let ca = OrgCa::new(
                "org-a",
                SigningKey::from_seed([2; 32]),
                identity::FOREVER_MS,
            )
            .unwrap();
            let genesis = Genesis {
                chain: CHAIN.into(),
                time_ms: 0,
                orgs: vec![
                    ca.genesis_org(
                        OrgClass::Hospital,
                        &admin.verifying_key(),
                        &SigningKey::from_seed([3; 32]).verifying_key(),
                        &[],
                        identity::FOREVER_MS,
                    )
                    .unwrap(),
                ],
            };
            let ledger = Ledger::genesis(&genesis).unwrap();
            let (app, mailbox, _) = Application::new::<()>(context, ledger);
            let (mut app, mailbox) = app.with_mempool_limit(mailbox, 3);
            let txs: Vec<Tx> = (1..=5u8)
                .map(|n| {
                    let member = SigningKey::from_seed([10 + n; 32]);
                    let certificate = ca
                        .issue(
                            &member.verifying_key(),
                            "clinician",
                            &[Role::Clinician],
                            None,
                            &[],
                            identity::FOREVER_MS,
                        )
                        .unwrap()
                        .to_pem();
                    Tx::sign(CHAIN, &admin, u64::from(n), Op::AddMember { certificate })
                })
                .collect();
            assert!(!mailbox.mempool_full());
            assert!(app.add_to_mempool(txs[0].id(), txs[0].clone()));
            assert!(
                !app.add_to_mempool(txs[0].id(), txs[0].clone()),
                "a duplicate"
            );
            assert!(app.add_to_mempool(txs[1].id(), txs[1].clone()));
            assert!(!mailbox.mempool_full());
            assert!(app.add_to_mempool(txs[2].id(), txs[2].clone()));
            assert!(mailbox.mempool_full());
            for tx in &txs[3..] {
                assert!(!app.add_to_mempool(tx.id(), tx.clone()), "past the limit");
            }
            assert_eq!(app.mempool.len(), 3);
            assert!(!app.in_mempool.contains(&txs[3].id()));
        });
    }
}

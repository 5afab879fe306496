//! The service class provider: accept loop, association threads, DIMSE services.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJSource, Pdu,
};
use tracing::{debug, info, warn};

use crate::assoc::{self, Ctx};
use crate::conn::{Conn, Incoming, Received};
use crate::dimse::{self, Command};
use crate::part10::{self, FileInfo};
use crate::scu::{self, Client};
use crate::uids::Service;
use crate::{InMemDicomObject, Level, Model, NetError, Peer, Provider, Status};

/// ARTIM-like limit for receiving the A-ASSOCIATE-RQ after connecting.
const ASSOCIATION_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A silent peer loses its association after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for one blocked write to a peer that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest C-FIND / C-MOVE / C-GET identifier accepted.
const MAX_IDENTIFIER_LEN: usize = 16 * 1024 * 1024;
/// C-MOVE sub-operations are sent in associations carrying at most this many
/// bytes of fetched instances (held in memory until sent).
const MOVE_BATCH_BYTES: usize = 256 * 1024 * 1024;
/// Grace period of [`Scp::shutdown`] before open associations are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Configuration of an [`Scp`].
#[derive(Debug, Clone)]
pub struct ScpConfig {
    /// Our AE title (also the calling AE title of C-MOVE sub-associations).
    pub ae_title: String,
    /// Maximum PDU length we announce (variable field of P-DATA-TF). Default 131072.
    pub max_pdu_length: u32,
    /// Concurrent associations; more are refused with a transient
    /// A-ASSOCIATE-RJ (local limit exceeded). Default 64.
    pub max_associations: usize,
    /// Refuse associations whose called AE title is not ours. Default false.
    pub strict_called_ae: bool,
    /// Serve DICOM over TLS (PS3.15 Annex B, the "secure transport connection" profiles)
    /// with this configuration; none: plain TCP. A peer that does not complete the
    /// handshake within the association request timeout is dropped.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ScpConfig {
    /// Defaults with the given AE title.
    pub fn new(ae_title: impl Into<String>) -> ScpConfig {
        ScpConfig {
            ae_title: ae_title.into(),
            ..ScpConfig::default()
        }
    }
}

impl Default for ScpConfig {
    fn default() -> ScpConfig {
        ScpConfig {
            ae_title: "MEDLEDGER".to_string(),
            max_pdu_length: 131_072,
            max_associations: 64,
            strict_called_ae: false,
            tls: None,
        }
    }
}

struct Shared {
    config: ScpConfig,
    provider: Arc<dyn Provider>,
    stop: AtomicBool,
    /// Open connections (a clone of each socket, to cut them on shutdown).
    conns: Mutex<HashMap<u64, TcpStream>>,
    conns_changed: Condvar,
    associations: AtomicUsize,
    next_conn: AtomicU64,
    /// The length of the last C-STORE data set any association received: the first
    /// buffer of a new association is taken at this size, instead of growing (reallocating
    /// into fresh memory the kernel zeroes) while the first instance arrives.
    last_data_len: AtomicUsize,
}

/// A running SCP: binds, spawns an accept thread and one thread per association.
pub struct Scp {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Scp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scp")
            .field("local_addr", &self.local_addr)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Scp {
    pub fn start(
        addr: SocketAddr,
        config: ScpConfig,
        provider: Arc<dyn Provider>,
    ) -> std::io::Result<Scp> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            provider,
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            conns_changed: Condvar::new(),
            associations: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            last_data_len: AtomicUsize::new(0),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("dimse-accept".into())
            .spawn(move || accept_loop(listener, s))?;
        info!(%local_addr, ae_title = %shared.config.ae_title, "DIMSE SCP listening");
        Ok(Scp {
            local_addr,
            shared,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stop accepting, let running associations finish (bounded wait), return.
    pub fn shutdown(mut self) {
        self.stop(SHUTDOWN_GRACE);
    }

    fn stop(&mut self, grace: Duration) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread with a connection of our own.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let _ = accept.join();

        let wait_empty = |limit: Duration| {
            let deadline = Instant::now() + limit;
            let mut conns = lock(&self.shared.conns);
            while !conns.is_empty() {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                conns = self
                    .shared
                    .conns_changed
                    .wait_timeout(conns, deadline - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            conns.len()
        };
        if wait_empty(grace) > 0 {
            let conns = lock(&self.shared.conns);
            warn!(
                open = conns.len(),
                "shutdown: closing associations still open"
            );
            for s in conns.values() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            drop(conns);
            wait_empty(Duration::from_secs(2));
        }
        info!(local_addr = %self.local_addr, "DIMSE SCP stopped");
    }
}

impl Drop for Scp {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match incoming {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Ok(addr) = stream.peer_addr() else {
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "could not set TCP_NODELAY");
        }
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            // Connections beyond the association limit still get a thread to
            // be rejected properly, but only up to a hard bound.
            let mut conns = lock(&shared.conns);
            if conns.len() >= shared.config.max_associations.saturating_mul(2) + 8 {
                warn!(%addr, "too many open connections, dropping one");
                continue;
            }
            match stream.try_clone() {
                Ok(c) => {
                    conns.insert(id, c);
                }
                Err(e) => {
                    warn!(error = %e, "could not register connection");
                    continue;
                }
            }
        }
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("dimse-assoc-{id}"))
            .spawn(move || {
                let _guard = ConnGuard { shared: &s, id };
                serve(&s, stream, addr);
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not spawn association thread");
            lock(&shared.conns).remove(&id);
        }
    }
}

/// Unregisters a connection when its thread ends (also on panic).
struct ConnGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.id);
        self.shared.conns_changed.notify_all();
    }
}

/// Holds one of the `max_associations` slots.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(shared: &Shared, stream: TcpStream, addr: SocketAddr) {
    let setup = stream
        .set_read_timeout(Some(ASSOCIATION_REQUEST_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .and_then(|()| match &shared.config.tls {
            None => Conn::new(stream),
            Some(tls) => rustls::ServerConnection::new(Arc::clone(tls))
                .map(|tls| Conn::over(Box::new(rustls::StreamOwned::new(tls, stream))))
                .map_err(std::io::Error::other),
        });
    let mut conn = match setup {
        Ok(c) => c,
        Err(e) => {
            debug!(%addr, error = %e, "connection setup failed");
            return;
        }
    };
    let rq = match conn.next() {
        Ok(Incoming::Pdu(Pdu::AssociationRQ(rq))) => rq,
        Ok(other) => {
            debug!(%addr, "expected A-ASSOCIATE-RQ, got {other:?}; aborting");
            conn.abort();
            return;
        }
        Err(e) => {
            debug!(%addr, error = %e, "no valid A-ASSOCIATE-RQ; aborting");
            conn.abort();
            return;
        }
    };
    let calling_ae = rq.calling_ae_title.trim().to_string();
    let called_ae = rq.called_ae_title.trim().to_string();

    let in_use = shared.associations.fetch_add(1, Ordering::SeqCst);
    let _slot = Slot(&shared.associations);
    if in_use >= shared.config.max_associations || shared.stop.load(Ordering::SeqCst) {
        warn!(%addr, %calling_ae, in_use, "association limit reached, rejecting (transient)");
        let rj = AssociationRJ {
            result: AssociationRJResult::Transient,
            source: AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        };
        let _ = conn.send_pdu(&Pdu::AssociationRJ(rj));
        conn.close();
        return;
    }

    let negotiated = match assoc::negotiate(
        &rq,
        &shared.config.ae_title,
        shared.config.strict_called_ae,
        shared.config.max_pdu_length,
    ) {
        Ok(n) => n,
        Err(rj) => {
            info!(%addr, %calling_ae, %called_ae, reason = %rj.source, "association rejected");
            let _ = conn.send_pdu(&Pdu::AssociationRJ(rj));
            conn.close();
            return;
        }
    };
    conn.set_peer_max(negotiated.peer_max);
    if let Err(e) = conn.send_pdu(&Pdu::AssociationAC(negotiated.ac)) {
        debug!(%addr, error = %e, "could not send A-ASSOCIATE-AC");
        conn.close();
        return;
    }
    if let Err(e) = conn.stream().set_read_timeout(Some(IDLE_TIMEOUT)) {
        debug!(error = %e, "could not set read timeout");
    }
    info!(
        %addr,
        %calling_ae,
        %called_ae,
        accepted = negotiated.contexts.len(),
        proposed = rq.presentation_contexts.len(),
        "association accepted"
    );
    let mut association = Association {
        conn,
        shared,
        peer: Peer {
            calling_ae,
            called_ae,
            addr,
        },
        contexts: negotiated
            .contexts
            .into_iter()
            .map(|(c, s)| (c.id, (c, s)))
            .collect(),
        requestor_scp: negotiated.requestor_scp,
        next_id: 1,
    };
    association.run();
}

/// Sub-operation counters of C-MOVE / C-GET.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    remaining: u16,
    completed: u16,
    failed: u16,
    warning: u16,
}

impl Counts {
    fn record(&mut self, status: &Status) {
        self.remaining = self.remaining.saturating_sub(1);
        if status.is_success() {
            self.completed = self.completed.saturating_add(1);
        } else if status.is_warning() {
            self.warning = self.warning.saturating_add(1);
        } else {
            self.failed = self.failed.saturating_add(1);
        }
    }
}

enum Outcome {
    Done,
    Cancelled,
}

struct Association<'a> {
    conn: Conn,
    shared: &'a Shared,
    peer: Peer,
    contexts: HashMap<u8, (Ctx, Service)>,
    requestor_scp: HashSet<String>,
    next_id: u16,
}

impl Association<'_> {
    fn run(&mut self) {
        loop {
            match self.conn.recv_command() {
                Ok(Received::ReleaseRq) => {
                    let _ = self.conn.send_pdu(&Pdu::ReleaseRP);
                    self.conn.close();
                    info!(calling_ae = %self.peer.calling_ae, "association released");
                    return;
                }
                Ok(Received::Aborted) => {
                    self.conn.close();
                    info!(calling_ae = %self.peer.calling_ae, "association aborted by peer");
                    return;
                }
                Ok(Received::Command { pcid, cmd }) => match self.dispatch(pcid, cmd) {
                    Ok(()) => {}
                    Err(NetError::Aborted) => {
                        self.conn.close();
                        info!(calling_ae = %self.peer.calling_ae, "association aborted by peer");
                        return;
                    }
                    Err(NetError::Closed) => {
                        self.conn.close();
                        return;
                    }
                    Err(e) => {
                        warn!(calling_ae = %self.peer.calling_ae, error = %e, "aborting association");
                        self.conn.abort();
                        return;
                    }
                },
                Err(NetError::Closed) => {
                    debug!(calling_ae = %self.peer.calling_ae, "peer closed the connection");
                    self.conn.close();
                    return;
                }
                Err(e) => {
                    warn!(calling_ae = %self.peer.calling_ae, error = %e, "aborting association");
                    self.conn.abort();
                    return;
                }
            }
        }
    }

    fn respond(
        &mut self,
        pcid: u8,
        field: u16,
        rq: &Command,
        status: &Status,
        data: Option<&[u8]>,
    ) -> Result<(), NetError> {
        let rsp = dimse::response(field, rq, status, data.is_some());
        self.conn.send_command(pcid, &rsp)?;
        if let Some(d) = data {
            self.conn.send_data(pcid, d)?;
        }
        Ok(())
    }

    fn drain(&mut self, pcid: u8, rq: &Command) -> Result<(), NetError> {
        if rq.has_data_set() {
            self.conn.skip_data(pcid)?;
        }
        Ok(())
    }

    fn dispatch(&mut self, pcid: u8, rq: Command) -> Result<(), NetError> {
        let Some((ctx, service)) = self.contexts.get(&pcid).cloned() else {
            return Err(NetError::Protocol(format!(
                "message on presentation context {pcid}, which was not accepted"
            )));
        };
        let field = rq.command_field().unwrap_or_default();
        match (field, service) {
            (dimse::C_ECHO_RQ, _) => {
                self.drain(pcid, &rq)?;
                debug!(calling_ae = %self.peer.calling_ae, "C-ECHO");
                self.respond(pcid, dimse::C_ECHO_RSP, &rq, &Status::success(), None)
            }
            (dimse::C_STORE_RQ, Service::Storage) => self.c_store(pcid, &ctx, rq),
            (dimse::C_FIND_RQ, Service::Find(model)) => self.c_find(pcid, &ctx, model, rq),
            (dimse::C_MOVE_RQ, Service::Move(model)) => self.c_move(pcid, &ctx, model, rq),
            (dimse::C_GET_RQ, Service::Get(model)) => self.c_get(pcid, &ctx, model, rq),
            (dimse::C_CANCEL_RQ, _) => self.drain(pcid, &rq), // nothing running
            (dimse::C_STORE_RQ | dimse::C_FIND_RQ | dimse::C_MOVE_RQ | dimse::C_GET_RQ, _) => {
                self.drain(pcid, &rq)?;
                let status = Status::failure(
                    Status::SOP_CLASS_NOT_SUPPORTED,
                    "operation not supported on this presentation context",
                );
                self.respond(pcid, field | 0x8000, &rq, &status, None)
            }
            (f, _) if f & 0x8000 == 0 => {
                self.drain(pcid, &rq)?;
                let status = Status::failure(
                    Status::UNRECOGNIZED_OPERATION,
                    "unsupported DIMSE operation",
                );
                self.respond(pcid, f | 0x8000, &rq, &status, None)
            }
            (f, _) => {
                debug!(field = f, "ignoring unsolicited DIMSE response");
                self.drain(pcid, &rq)
            }
        }
    }

    fn c_store(&mut self, pcid: u8, ctx: &Ctx, rq: Command) -> Result<(), NetError> {
        let sop_class = rq
            .get_str(tags::AFFECTED_SOP_CLASS_UID)
            .unwrap_or_else(|| ctx.abstract_syntax.clone());
        let respond = |me: &mut Self, status: Status| {
            let mut rsp = dimse::response(dimse::C_STORE_RSP, &rq, &status, false);
            if let Some(uid) = rq.get_str(tags::AFFECTED_SOP_INSTANCE_UID) {
                rsp.put_uid(tags::AFFECTED_SOP_INSTANCE_UID, &uid);
            }
            me.conn.send_command(pcid, &rsp)
        };
        let Some(instance) = rq.get_str(tags::AFFECTED_SOP_INSTANCE_UID) else {
            self.drain(pcid, &rq)?;
            let s = Status::failure(
                Status::CANNOT_UNDERSTAND,
                "C-STORE-RQ without Affected SOP Instance UID",
            );
            return respond(self, s);
        };
        if !rq.has_data_set() {
            let s = Status::failure(Status::CANNOT_UNDERSTAND, "C-STORE-RQ without a data set");
            return respond(self, s);
        }
        let header = match part10::header(&sop_class, &instance, &ctx.ts, &self.peer.calling_ae) {
            Ok(h) => h,
            Err(e) => {
                self.drain(pcid, &rq)?;
                let s = Status::failure(Status::CANNOT_UNDERSTAND, format!("{e}"));
                return respond(self, s);
            }
        };
        let header_len = header.len();
        let hint = match self.conn.data_hint() {
            0 => self.shared.last_data_len.load(Ordering::Relaxed),
            n => n,
        };
        let mut file = self.shared.provider.receive_buffer(header_len + hint);
        file.extend_from_slice(&header);
        let started = Instant::now();
        let mut receiving = self.shared.provider.receiving(&self.peer, &instance);
        match receiving.as_mut() {
            Some(r) => self
                .conn
                .recv_data_watched(pcid, &mut file, usize::MAX, &mut |f| r.grew(f))?,
            None => self.conn.recv_data(pcid, &mut file, usize::MAX)?,
        }
        let bytes = file.len() - header_len;
        self.shared.last_data_len.store(bytes, Ordering::Relaxed);
        let status = match receiving {
            Some(r) => r.finish(file),
            None => self.shared.provider.store(&self.peer, file),
        };
        debug!(
            calling_ae = %self.peer.calling_ae,
            sop_instance_uid = %instance,
            transfer_syntax = %ctx.ts,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            status = %status,
            "C-STORE"
        );
        respond(self, status)
    }

    /// Read and parse the identifier of a Q/R request. `Err(status)` is to be
    /// answered as the final response.
    fn identifier(
        &mut self,
        pcid: u8,
        ctx: &Ctx,
        model: Model,
        rq: &Command,
    ) -> Result<Result<(Level, InMemDicomObject), Status>, NetError> {
        if !rq.has_data_set() {
            return Ok(Err(Status::failure(
                Status::IDENTIFIER_MISMATCH,
                "request without identifier",
            )));
        }
        let mut bytes = Vec::new();
        self.conn.recv_data(pcid, &mut bytes, MAX_IDENTIFIER_LEN)?;
        let ident = match part10::decode_dataset(&bytes, &ctx.ts) {
            Ok(i) => i,
            Err(e) => {
                debug!(error = %e, "undecodable identifier");
                return Ok(Err(Status::failure(
                    Status::IDENTIFIER_MISMATCH,
                    "identifier could not be decoded",
                )));
            }
        };
        let level = ident
            .element_opt(tags::QUERY_RETRIEVE_LEVEL)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok().and_then(|s| Level::parse(&s)));
        Ok(match level {
            None => Err(Status::failure(
                Status::IDENTIFIER_MISMATCH,
                "missing or invalid Query/Retrieve Level",
            )),
            Some(Level::Patient) if model == Model::StudyRoot => Err(Status::failure(
                Status::IDENTIFIER_MISMATCH,
                "PATIENT level is not in the Study Root model",
            )),
            Some(level) => Ok((level, ident)),
        })
    }

    /// Check, without blocking, whether the requestor sent a C-CANCEL-RQ
    /// for message `msg_id`.
    fn cancelled(&mut self, msg_id: u16) -> Result<bool, NetError> {
        if !self.conn.has_pending_input()? {
            return Ok(false);
        }
        match self.conn.recv_command()? {
            Received::Command { pcid, cmd } => {
                self.drain(pcid, &cmd)?;
                if cmd.command_field() == Some(dimse::C_CANCEL_RQ) {
                    Ok(cmd.get_u16(tags::MESSAGE_ID_BEING_RESPONDED_TO) == Some(msg_id))
                } else {
                    Err(NetError::Protocol(
                        "new request while an operation is running".into(),
                    ))
                }
            }
            Received::Aborted => Err(NetError::Aborted),
            Received::ReleaseRq => Err(NetError::Protocol(
                "A-RELEASE-RQ while an operation is running".into(),
            )),
        }
    }

    fn c_find(&mut self, pcid: u8, ctx: &Ctx, model: Model, rq: Command) -> Result<(), NetError> {
        let msg_id = rq.message_id().unwrap_or(0);
        let (level, ident) = match self.identifier(pcid, ctx, model, &rq)? {
            Ok(x) => x,
            Err(s) => return self.respond(pcid, dimse::C_FIND_RSP, &rq, &s, None),
        };
        let matches = match self.shared.provider.find(&self.peer, model, level, &ident) {
            Ok(m) => m,
            Err(s) => return self.respond(pcid, dimse::C_FIND_RSP, &rq, &s, None),
        };
        debug!(calling_ae = %self.peer.calling_ae, ?model, ?level, matches = matches.len(), "C-FIND");
        let pending = Status {
            code: Status::PENDING,
            comment: None,
        };
        for mut m in matches {
            if self.cancelled(msg_id)? {
                let s = Status {
                    code: Status::CANCEL,
                    comment: None,
                };
                return self.respond(pcid, dimse::C_FIND_RSP, &rq, &s, None);
            }
            m.put(DataElement::new(
                tags::QUERY_RETRIEVE_LEVEL,
                VR::CS,
                PrimitiveValue::from(level.as_str()),
            ));
            let data = match part10::encode_dataset(&m, &ctx.ts) {
                Ok(d) => d,
                Err(e) => {
                    warn!(error = %e, "could not encode a C-FIND match");
                    let s = Status::failure(Status::CANNOT_UNDERSTAND, "could not encode a match");
                    return self.respond(pcid, dimse::C_FIND_RSP, &rq, &s, None);
                }
            };
            self.respond(pcid, dimse::C_FIND_RSP, &rq, &pending, Some(&data))?;
        }
        self.respond(pcid, dimse::C_FIND_RSP, &rq, &Status::success(), None)
    }

    fn c_move(&mut self, pcid: u8, ctx: &Ctx, model: Model, rq: Command) -> Result<(), NetError> {
        let (level, ident) = match self.identifier(pcid, ctx, model, &rq)? {
            Ok(x) => x,
            Err(s) => return self.respond(pcid, dimse::C_MOVE_RSP, &rq, &s, None),
        };
        let dest_ae = rq.get_str(tags::MOVE_DESTINATION).unwrap_or_default();
        let Some(dest) = self.shared.provider.destination(&dest_ae) else {
            info!(calling_ae = %self.peer.calling_ae, %dest_ae, "C-MOVE to unknown destination");
            let s = Status::failure(Status::MOVE_DESTINATION_UNKNOWN, "Move destination unknown");
            return self.respond(pcid, dimse::C_MOVE_RSP, &rq, &s, None);
        };
        let uids = match self
            .shared
            .provider
            .select(&self.peer, model, level, &ident)
        {
            Ok(u) => u,
            Err(s) => return self.respond(pcid, dimse::C_MOVE_RSP, &rq, &s, None),
        };
        info!(
            calling_ae = %self.peer.calling_ae,
            %dest_ae,
            %dest,
            ?level,
            instances = uids.len(),
            "C-MOVE"
        );
        let msg_id = rq.message_id().unwrap_or(0);
        let mut counts = Counts {
            remaining: u16::try_from(uids.len()).unwrap_or(u16::MAX),
            ..Counts::default()
        };
        let mut failed_uids = Vec::new();
        let mut queue: VecDeque<String> = uids.into();
        let mut outcome = Outcome::Done;
        'batches: while !queue.is_empty() {
            // Fetch a batch whose presentation contexts fit one association.
            let mut batch: Vec<(Vec<u8>, FileInfo)> = Vec::new();
            let mut batch_bytes = 0usize;
            let mut proposals: Vec<scu::Proposal> = Vec::new();
            while let Some(uid) = queue.pop_front() {
                match self.fetch(&uid) {
                    Ok((file, info)) => {
                        let new: Vec<scu::Proposal> = scu::proposals_for([&info])
                            .into_iter()
                            .filter(|p| !proposals.contains(p))
                            .collect();
                        if !batch.is_empty() && proposals.len() + new.len() > scu::MAX_CONTEXTS {
                            queue.push_front(uid);
                            break;
                        }
                        proposals.extend(new);
                        batch_bytes += file.len();
                        batch.push((file, info));
                        if batch_bytes >= MOVE_BATCH_BYTES {
                            break;
                        }
                    }
                    Err(status) => {
                        warn!(sop_instance_uid = %uid, %status, "C-MOVE: fetch failed");
                        counts.record(&status);
                        failed_uids.push(uid);
                        self.move_pending(pcid, &rq, counts)?;
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let mut client = match Client::open(
                dest,
                &self.shared.config.ae_title,
                &dest_ae,
                &proposals,
            ) {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(%dest_ae, %dest, error = %e, "C-MOVE: cannot associate with destination");
                    None
                }
            };
            for (file, info) in batch {
                if self.cancelled(msg_id)? {
                    outcome = Outcome::Cancelled;
                    if let Some(c) = client.take() {
                        let _ = c.release();
                    }
                    break 'batches;
                }
                let status = match client.as_mut() {
                    None => Status::failure(Status::SUBOPERATIONS_FAILED, "no association"),
                    Some(c) => match c.store(&file, &info, Some((&self.peer.calling_ae, msg_id))) {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(%dest_ae, error = %e, "C-MOVE: sub-association failed");
                            if let Some(c) = client.take() {
                                c.abort();
                            }
                            Status::failure(Status::SUBOPERATIONS_FAILED, "association failed")
                        }
                    },
                };
                if !(status.is_success() || status.is_warning()) {
                    debug!(sop_instance_uid = %info.sop_instance_uid, %status, "C-MOVE sub-operation failed");
                    failed_uids.push(info.sop_instance_uid.clone());
                }
                counts.record(&status);
                self.move_pending(pcid, &rq, counts)?;
            }
            if let Some(c) = client {
                if let Err(e) = c.release() {
                    debug!(error = %e, "C-MOVE: release of sub-association failed");
                }
            }
        }
        self.final_retrieve_response(
            pcid,
            ctx,
            dimse::C_MOVE_RSP,
            &rq,
            counts,
            outcome,
            &failed_uids,
        )
    }

    fn fetch(&self, uid: &str) -> Result<(Vec<u8>, FileInfo), Status> {
        let file = self.shared.provider.fetch(&self.peer, uid)?;
        match part10::inspect(&file) {
            Ok(info) => Ok((file, info)),
            Err(e) => Err(Status::failure(
                Status::CANNOT_UNDERSTAND,
                format!("stored instance unusable: {e}"),
            )),
        }
    }

    fn move_pending(&mut self, pcid: u8, rq: &Command, counts: Counts) -> Result<(), NetError> {
        self.retrieve_pending(pcid, dimse::C_MOVE_RSP, rq, counts)
    }

    fn retrieve_pending(
        &mut self,
        pcid: u8,
        field: u16,
        rq: &Command,
        counts: Counts,
    ) -> Result<(), NetError> {
        if counts.remaining == 0 {
            return Ok(()); // the final response follows
        }
        let status = Status {
            code: Status::PENDING,
            comment: None,
        };
        let mut rsp = dimse::response(field, rq, &status, false);
        rsp.put_u16(tags::NUMBER_OF_REMAINING_SUBOPERATIONS, counts.remaining)
            .put_u16(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, counts.completed)
            .put_u16(tags::NUMBER_OF_FAILED_SUBOPERATIONS, counts.failed)
            .put_u16(tags::NUMBER_OF_WARNING_SUBOPERATIONS, counts.warning);
        self.conn.send_command(pcid, &rsp)
    }

    #[allow(clippy::too_many_arguments)]
    fn final_retrieve_response(
        &mut self,
        pcid: u8,
        ctx: &Ctx,
        field: u16,
        rq: &Command,
        counts: Counts,
        outcome: Outcome,
        failed_uids: &[String],
    ) -> Result<(), NetError> {
        let status = match outcome {
            Outcome::Cancelled => Status {
                code: Status::CANCEL,
                comment: None,
            },
            Outcome::Done if counts.failed == 0 && counts.warning == 0 => Status::success(),
            Outcome::Done if counts.completed == 0 && counts.warning == 0 => {
                Status::failure(Status::SUBOPERATIONS_FAILED, "all sub-operations failed")
            }
            Outcome::Done => Status::failure(
                Status::SUBOPERATIONS_WARNING,
                "one or more sub-operations failed",
            ),
        };
        let data = if failed_uids.is_empty() {
            None
        } else {
            let mut obj = InMemDicomObject::new_empty();
            obj.put(DataElement::new(
                tags::FAILED_SOP_INSTANCE_UID_LIST,
                VR::UI,
                PrimitiveValue::Strs(failed_uids.iter().cloned().collect()),
            ));
            part10::encode_dataset(&obj, &ctx.ts).ok()
        };
        let mut rsp = dimse::response(field, rq, &status, data.is_some());
        if matches!(outcome, Outcome::Cancelled) {
            rsp.put_u16(tags::NUMBER_OF_REMAINING_SUBOPERATIONS, counts.remaining);
        }
        rsp.put_u16(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, counts.completed)
            .put_u16(tags::NUMBER_OF_FAILED_SUBOPERATIONS, counts.failed)
            .put_u16(tags::NUMBER_OF_WARNING_SUBOPERATIONS, counts.warning);
        info!(
            calling_ae = %self.peer.calling_ae,
            completed = counts.completed,
            failed = counts.failed,
            warning = counts.warning,
            status = %status,
            "retrieve finished"
        );
        self.conn.send_command(pcid, &rsp)?;
        if let Some(d) = data {
            self.conn.send_data(pcid, &d)?;
        }
        Ok(())
    }

    fn c_get(&mut self, pcid: u8, ctx: &Ctx, model: Model, rq: Command) -> Result<(), NetError> {
        let (level, ident) = match self.identifier(pcid, ctx, model, &rq)? {
            Ok(x) => x,
            Err(s) => return self.respond(pcid, dimse::C_GET_RSP, &rq, &s, None),
        };
        let uids = match self
            .shared
            .provider
            .select(&self.peer, model, level, &ident)
        {
            Ok(u) => u,
            Err(s) => return self.respond(pcid, dimse::C_GET_RSP, &rq, &s, None),
        };
        info!(calling_ae = %self.peer.calling_ae, ?level, instances = uids.len(), "C-GET");
        let msg_id = rq.message_id().unwrap_or(0);
        let mut counts = Counts {
            remaining: u16::try_from(uids.len()).unwrap_or(u16::MAX),
            ..Counts::default()
        };
        let mut failed_uids = Vec::new();
        let mut outcome = Outcome::Done;
        // Storage contexts on which the requestor accepted the SCP role.
        let store_contexts: Vec<Ctx> = self
            .contexts
            .values()
            .filter(|(c, s)| {
                *s == Service::Storage && self.requestor_scp.contains(&c.abstract_syntax)
            })
            .map(|(c, _)| c.clone())
            .collect();
        for uid in uids {
            if self.cancelled(msg_id)? {
                outcome = Outcome::Cancelled;
                break;
            }
            let status = match self.fetch(&uid) {
                Err(s) => s,
                Ok((file, info)) => match scu::prepare_store(&file, &info, &store_contexts) {
                    Err(s) => s,
                    Ok((sub_pcid, data)) => {
                        let (status, cancel) = self.get_store(sub_pcid, &info, &data, msg_id)?;
                        if cancel {
                            outcome = Outcome::Cancelled;
                        }
                        status
                    }
                },
            };
            if !(status.is_success() || status.is_warning()) {
                debug!(sop_instance_uid = %uid, %status, "C-GET sub-operation failed");
                failed_uids.push(uid);
            }
            counts.record(&status);
            if matches!(outcome, Outcome::Cancelled) {
                break;
            }
            self.retrieve_pending(pcid, dimse::C_GET_RSP, &rq, counts)?;
        }
        self.final_retrieve_response(
            pcid,
            ctx,
            dimse::C_GET_RSP,
            &rq,
            counts,
            outcome,
            &failed_uids,
        )
    }

    /// One C-STORE sub-operation of a C-GET, on this association. Returns the
    /// status and whether a C-CANCEL-RQ for the C-GET arrived meanwhile.
    fn get_store(
        &mut self,
        pcid: u8,
        info: &FileInfo,
        data: &[u8],
        get_msg_id: u16,
    ) -> Result<(Status, bool), NetError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let rq = scu::store_request(id, info, None);
        self.conn.send_command(pcid, &rq)?;
        self.conn.send_data(pcid, data)?;
        let mut cancel = false;
        loop {
            match self.conn.recv_command()? {
                Received::Command { pcid: p, cmd } => {
                    self.drain(p, &cmd)?;
                    match cmd.command_field() {
                        Some(dimse::C_STORE_RSP)
                            if cmd.get_u16(tags::MESSAGE_ID_BEING_RESPONDED_TO) == Some(id) =>
                        {
                            return Ok((cmd.status(), cancel));
                        }
                        Some(dimse::C_CANCEL_RQ)
                            if cmd.get_u16(tags::MESSAGE_ID_BEING_RESPONDED_TO)
                                == Some(get_msg_id) =>
                        {
                            cancel = true;
                        }
                        other => {
                            return Err(NetError::Protocol(format!(
                                "unexpected message {other:?} during a C-GET sub-operation"
                            )));
                        }
                    }
                }
                Received::Aborted => return Err(NetError::Aborted),
                Received::ReleaseRq => {
                    return Err(NetError::Protocol(
                        "A-RELEASE-RQ during a C-GET sub-operation".into(),
                    ));
                }
            }
        }
    }
}

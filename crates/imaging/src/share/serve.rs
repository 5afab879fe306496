//! The serving side: another organisation's node fetches a study it was granted.
//!
//! `POST /share/v1/grants/{grant}/sessions?height=N` opens a transfer after checking that the
//! peer (by its verified TLS certificate) is an active node of its organisation on the ledger
//! and that the ledger lets that organisation retrieve under the grant. `height` is the
//! requester's ledger height when it read the grant: each node applies finalised blocks on its
//! own, so this node first waits (a few seconds at most) until it has applied as many, rather
//! than refuse a grant it has not seen yet. Then, each request
//! checked against the ledger again: `GET /share/v1/sessions/{id}/manifest` (the sealed
//! manifest), `.../series/{uid}` (one series' entry with its Merkle proof, for a partial
//! retrieval), `.../objects/{address}` (a sealed object of the study, as stored), and
//! `POST .../receipt` (the receiver's signed statement; this node records the retrieval).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use medledger_crypto::{Digest, Signature, VerifyingKey};
use medledger_ledger::{Grant, Member, Op, Role};
use medledger_node::ClientError;
use medledger_store::StoreError;
use serde_json::json;

use super::SharingInner;
use super::tls::Peer;

/// Sessions idle longer than this are forgotten.
const SESSION_IDLE: Duration = Duration::from_secs(3600);
const MAX_SESSIONS: usize = 4096;
/// How long a session request waits for this node's ledger to reach the requester's height.
const CATCH_UP: Duration = Duration::from_secs(5);
/// A requester further ahead than this many blocks (an idle network makes two a second) is
/// answered at once: waiting would not help, and a peer could hold threads with made-up
/// heights.
const MAX_AHEAD: u64 = 64;

/// The query of a session request.
#[derive(Debug, serde::Deserialize)]
struct SessionQuery {
    /// The requester's ledger height when it read the grant.
    height: Option<u64>,
}

/// One transfer in progress.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub grant: String,
    pub org: String,
    pub peer_key: VerifyingKey,
    pub root: Digest,
    pub manifest: Digest,
    pub objects: Arc<HashSet<Digest>>,
    pub last_used: Instant,
}

type Refusal = (StatusCode, String);

fn refuse(code: StatusCode, msg: impl Into<String>) -> Refusal {
    (code, msg.into())
}

fn respond(r: Result<Response, Refusal>) -> Response {
    match r {
        Ok(r) => r,
        Err((code, msg)) => (code, Json(json!({ "error": msg }))).into_response(),
    }
}

/// Serves on `listener` from a thread of its own until the process ends.
pub(crate) fn spawn(inner: Arc<SharingInner>, listener: std::net::TcpListener) {
    std::thread::Builder::new()
        .name("share-serve".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("share runtime");
            rt.block_on(async move {
                // Trust comes from the ledger: read the organisations before any handshake.
                loop {
                    let me = inner.clone();
                    let ok = tokio::task::spawn_blocking(move || me.orgs.refresh(&me.svc.client))
                        .await
                        .is_ok_and(|r| r.is_ok());
                    if ok {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                listener
                    .set_nonblocking(true)
                    .expect("non-blocking listener");
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let config = super::tls::server_config(
                    &inner.cert_pem,
                    &inner.svc.signer,
                    inner.orgs.clone(),
                    inner.handshake_refusals.clone(),
                )
                .expect("checked at start");
                let tls = super::tls::listen(listener, config).expect("TLS listener");
                let app = router(inner);
                axum::serve(tls, app.into_make_service_with_connect_info::<Peer>())
                    .await
                    .expect("share server");
            });
        })
        .expect("spawn the share server");
}

fn router(inner: Arc<SharingInner>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/share/v1/grants/{grant}/sessions", post(open_session))
        .route("/share/v1/sessions/{id}/manifest", get(manifest))
        .route("/share/v1/sessions/{id}/series/{uid}", get(series))
        .route("/share/v1/sessions/{id}/objects", post(objects))
        .route("/share/v1/sessions/{id}/objects/{address}", get(object))
        .route("/share/v1/sessions/{id}/receipt", post(receipt))
        .with_state(inner)
}

async fn blocking(f: impl FnOnce() -> Result<Response, Refusal> + Send + 'static) -> Response {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => respond(r),
        Err(_) => respond(Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
        ))),
    }
}

async fn open_session(
    State(s): State<Arc<SharingInner>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(grant): Path<String>,
    Query(q): Query<SessionQuery>,
) -> Response {
    blocking(move || {
        if let Some(h) = q.height {
            s.catch_up(h)?;
        }
        s.open_session(&peer, &grant)
    })
    .await
}

async fn manifest(
    State(s): State<Arc<SharingInner>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(id): Path<String>,
) -> Response {
    blocking(move || {
        let session = s.session(&peer, &id)?;
        let bytes = s
            .svc
            .store
            .raw_object(&session.manifest)
            .map_err(store_refusal)?;
        Ok(bytes.into_response())
    })
    .await
}

async fn series(
    State(s): State<Arc<SharingInner>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path((id, uid)): Path<(String, String)>,
) -> Response {
    blocking(move || {
        let session = s.session(&peer, &id)?;
        let (_, m) = s
            .svc
            .store
            .open_manifest(&session.root, &s.svc.owner)
            .map_err(store_refusal)?;
        let index = m
            .series
            .iter()
            .position(|se| se.series_uid == uid)
            .ok_or_else(|| {
                refuse(
                    StatusCode::NOT_FOUND,
                    format!("no series {uid} in the study"),
                )
            })?;
        let proof = m.series_proof(index);
        let part = medledger_store::StudyManifest {
            study_uid: m.study_uid.clone(),
            series: vec![m.series[index].clone()],
            derived_from: m.derived_from,
        };
        Ok(Json(json!({
            "manifest": hex::encode(part.encode()),
            "proof": hex::encode(proof.encode()),
        }))
        .into_response())
    })
    .await
}

async fn object(
    State(s): State<Arc<SharingInner>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path((id, address)): Path<(String, String)>,
) -> Response {
    blocking(move || {
        let session = s.session(&peer, &id)?;
        let (_, bytes) = s.sealed(&session, &address)?;
        s.pace(bytes.len());
        Ok(bytes.into_response())
    })
    .await
}

/// Objects asked for at once, at most.
const MAX_BATCH: usize = 64;

/// Several objects in one answer (the grant checked once for all of them): per object its
/// address (32 bytes), length (8 bytes, big endian) and sealed bytes, in the order asked.
async fn objects(
    State(s): State<Arc<SharingInner>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    blocking(move || {
        let list: Vec<String> = serde_json::from_slice(&body).map_err(|e| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("expected a JSON array of object addresses: {e}"),
            )
        })?;
        if list.is_empty() || list.len() > MAX_BATCH {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("ask for 1 to {MAX_BATCH} objects at once"),
            ));
        }
        let session = s.session(&peer, &id)?;
        let mut out = Vec::new();
        for a in &list {
            let (address, bytes) = s.sealed(&session, a)?;
            out.extend_from_slice(address.as_bytes());
            out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            out.extend_from_slice(&bytes);
        }
        s.pace(out.len());
        Ok(out.into_response())
    })
    .await
}

#[derive(Debug, serde::Deserialize)]
struct ReceiptBody {
    objects: u32,
    bytes: u64,
    /// The receiving node's Ed25519 signature (hex) of the retrieval statement.
    signature: String,
}

async fn receipt(
    State(s): State<Arc<SharingInner>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    blocking(move || {
        let session = s.session(&peer, &id)?;
        let r: ReceiptBody = serde_json::from_slice(&body)
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("not a receipt: {e}")))?;
        let sig: [u8; 64] = hex::decode(&r.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "a signature is 128 hex digits"))?;
        let signature = Signature(sig);
        let statement =
            medledger_ledger::retrieval_statement(&session.grant, &id, r.objects, r.bytes);
        if !session.peer_key.verify(&statement, &signature) {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "the receipt's signature does not verify under the peer node's key",
            ));
        }
        let op = Op::RecordRetrieval {
            grant: session.grant.clone(),
            session: id.clone(),
            objects: r.objects,
            bytes: r.bytes,
            receiver: session.peer_key,
            receiver_signature: signature,
        };
        let results = s
            .svc
            .execute(vec![op])
            .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e))?;
        match results.into_iter().next() {
            Some(Ok(f)) => {
                s.sessions.lock().expect("not poisoned").remove(&id);
                Ok(Json(json!({
                    "tx": f.tx,
                    "height": f.height,
                    "audit": f.receipt.created,
                }))
                .into_response())
            }
            Some(Err(ClientError::Rejected { error, .. })) => {
                Err(refuse(StatusCode::CONFLICT, error.to_string()))
            }
            Some(Err(e)) => Err(refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
            None => Err(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "nothing submitted",
            )),
        }
    })
    .await
}

fn store_refusal(e: StoreError) -> Refusal {
    match e {
        StoreError::UnknownRoot(r) => refuse(
            StatusCode::NOT_FOUND,
            format!("this node does not hold study {r}"),
        ),
        StoreError::Backend(b) if b.is_not_found() => {
            refuse(StatusCode::NOT_FOUND, format!("missing here: {b}"))
        }
        e => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

impl SharingInner {
    /// Waits until this node has applied `height` finalised blocks; 503 if it has not within
    /// [`CATCH_UP`], or at once if it is more than [`MAX_AHEAD`] blocks behind (the requester
    /// tries again later).
    fn catch_up(&self, height: u64) -> Result<(), Refusal> {
        let started = Instant::now();
        loop {
            let mine = self
                .ledger_height()
                .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e))?;
            if mine >= height {
                return Ok(());
            }
            if height - mine > MAX_AHEAD {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "this node's ledger is at height {mine}, {} blocks behind the requester's \
                         {height}; try again once it has caught up",
                        height - mine
                    ),
                ));
            }
            if started.elapsed() >= CATCH_UP {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "this node's ledger is at height {mine}, behind the requester's {height}; \
                         try again shortly"
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The ledger's answer to "may this peer retrieve under this grant now?".
    fn authorise(self: &Arc<Self>, peer: &Peer, grant: &str) -> Result<Grant, Refusal> {
        let org = peer.cert.org.clone();
        let (answer, known, ours) = match self.ledger_check(grant, &org) {
            Ok(x) => x,
            Err(e) => return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, e)),
        };
        match answer {
            Ok(g) => Ok(g),
            Err(message) => {
                // Refusals of another owner's grant are that owner's to record.
                if ours {
                    self.record_refusal(known, &org, true, format!("retrieval refused: {message}"));
                }
                Err(refuse(StatusCode::FORBIDDEN, message))
            }
        }
    }

    /// `may_retrieve` in this node's finalised state: (the answer, the grant's id if it
    /// exists, whether it is a grant on this organisation's study). In the node process the
    /// ledger is read in memory; elsewhere through the API.
    #[allow(clippy::type_complexity)]
    fn ledger_check(
        &self,
        grant: &str,
        org: &str,
    ) -> Result<(Result<Grant, String>, Option<String>, bool), String> {
        if let Some(ledger) = medledger_node::local_ledger() {
            let l = ledger.read().expect("not poisoned");
            let answer = l.may_retrieve(grant, org).map_err(|e| e.to_string());
            let known = l.grant(grant);
            let ours = known
                .as_ref()
                .is_none_or(|g| l.study(&g.study).is_some_and(|s| s.owner == self.org));
            return Ok((answer, known.map(|g| g.id), ours));
        }
        let unavailable = |e: ClientError| e.to_string();
        match self.svc.client.may_retrieve(grant, org) {
            Ok(g) => Ok((Ok(g), None, true)),
            Err(ClientError::Refused {
                status: 403,
                message,
                ..
            }) => {
                let known = self
                    .svc
                    .client
                    .value::<Grant>(&format!("grant/{grant}"))
                    .map_err(unavailable)?;
                let ours = match &known {
                    Some(g) => self
                        .svc
                        .client
                        .value::<medledger_ledger::Study>(&format!("study/{}", g.study))
                        .map_err(unavailable)?
                        .is_some_and(|st| st.owner == self.org),
                    None => true,
                };
                Ok((Err(message), known.map(|g| g.id), ours))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn open_session(self: &Arc<Self>, peer: &Peer, grant: &str) -> Result<Response, Refusal> {
        let org = peer.cert.org.clone();
        let member = self
            .svc
            .client
            .value::<Member>(&format!("member/{}", peer.cert.key))
            .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        if !member.is_some_and(|m| m.active && m.org == org && m.has(Role::Node)) {
            let reason = format!(
                "{}'s certificate is not an active node member of {org}",
                peer.cert.name
            );
            self.record_refusal(None, &org, true, reason.clone());
            return Err(refuse(StatusCode::FORBIDDEN, reason));
        }
        let g = self.authorise(peer, grant)?;
        let record = self.svc.store.study_ref(&g.study).map_err(store_refusal)?;
        let id = {
            let mut b = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
            hex::encode(b)
        };
        let session = Session {
            grant: g.id.clone(),
            org,
            peer_key: peer.cert.key,
            root: g.study,
            manifest: record.manifest,
            objects: Arc::new(record.objects.iter().copied().collect()),
            last_used: Instant::now(),
        };
        {
            let mut sessions = self.sessions.lock().expect("not poisoned");
            sessions.retain(|_, s| s.last_used.elapsed() < SESSION_IDLE);
            if sessions.len() >= MAX_SESSIONS {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many transfers in progress; retry later",
                ));
            }
            sessions.insert(id.clone(), session);
        }
        Ok(Json(json!({
            "session": id,
            "grant": g.id,
            "root": g.study,
            "objects": record.objects.len(),
        }))
        .into_response())
    }

    /// A sealed object of the session's study, as stored.
    fn sealed(&self, session: &Session, address: &str) -> Result<(Digest, bytes::Bytes), Refusal> {
        let address = Digest::from_hex(address).map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                "an object address is 64 hex digits",
            )
        })?;
        if !session.objects.contains(&address) {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("object {address} is not part of the granted study"),
            ));
        }
        let bytes = self.svc.store.raw_object(&address).map_err(store_refusal)?;
        Ok((address, bytes))
    }

    /// A session of this peer, its grant checked against the ledger again.
    fn session(self: &Arc<Self>, peer: &Peer, id: &str) -> Result<Session, Refusal> {
        let session = {
            let mut sessions = self.sessions.lock().expect("not poisoned");
            let s = sessions
                .get_mut(id)
                .ok_or_else(|| refuse(StatusCode::NOT_FOUND, format!("no transfer {id}")))?;
            if s.peer_key != peer.cert.key {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "this transfer belongs to another node",
                ));
            }
            s.last_used = Instant::now();
            s.clone()
        };
        if let Err(e) = self.authorise(peer, &session.grant) {
            self.sessions.lock().expect("not poisoned").remove(id);
            return Err(e);
        }
        let _ = &session.org;
        Ok(session)
    }
}

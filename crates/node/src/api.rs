//! The node's JSON API for clients: submit transactions, follow them to finality, read
//! state with proofs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use medledger_ledger::{Ledger, Tx};
use serde_json::{Value, json};

use commonware_consensus::simplex::scheme::ed25519::Scheme;

use crate::app::{Finalized, Mailbox};

#[derive(Clone)]
struct ApiState {
    org: String,
    /// Organisations by consensus participant index.
    participants: Arc<Vec<String>>,
    ledger: Arc<RwLock<Ledger>>,
    finalized: Arc<Mutex<Finalized>>,
    mailbox: Mailbox<Scheme>,
}

type ApiResult = Result<Json<Value>, (StatusCode, Json<Value>)>;

fn error(code: StatusCode, msg: impl Into<String>) -> (StatusCode, Json<Value>) {
    (code, Json(json!({ "error": msg.into() })))
}

/// Serves the API on `addr` (and over HTTPS on `https`'s address) from a thread of its own
/// until the process ends.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    addr: SocketAddr,
    https: Option<(SocketAddr, rustls::ServerConfig)>,
    org: String,
    participants: Vec<String>,
    ledger: Arc<RwLock<Ledger>>,
    finalized: Arc<Mutex<Finalized>>,
    mailbox: Mailbox<Scheme>,
    extra: Option<Router>,
) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let https = match https {
        Some((at, tls)) => {
            let l = std::net::TcpListener::bind(at)
                .map_err(|e| std::io::Error::new(e.kind(), format!("HTTPS on {at}: {e}")))?;
            l.set_nonblocking(true)?;
            Some((l, tls))
        }
        None => None,
    };
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("API runtime");
            rt.block_on(async move {
                let state = ApiState {
                    org,
                    participants: Arc::new(participants),
                    ledger,
                    finalized,
                    mailbox,
                };
                let app = Router::new()
                    .route("/api/status", get(status))
                    .route("/api/tx", post(submit))
                    .route("/api/txs", post(submit_many))
                    .route("/api/blocks/{from}", get(blocks))
                    .route("/api/tx/{id}", get(receipt))
                    .route("/api/nonce/{key}", get(nonce))
                    .route("/api/studies", get(studies))
                    .route("/api/audit", get(audit))
                    .route("/api/may-retrieve/{grant}/{org}", get(may_retrieve))
                    .route("/api/patients/{patient}", get(patient_view))
                    .route("/api/state/{*key}", get(state_proof))
                    .route("/api/query", get(query))
                    .with_state(state);
                let app = match extra {
                    Some(extra) => app.merge(extra),
                    None => app,
                };
                if let Some((l, tls)) = https {
                    let l = tokio::net::TcpListener::from_std(l).expect("listener");
                    let tls = crate::tls::TlsListener::start(l, tls, |_, addr| Some(addr))
                        .expect("HTTPS listener");
                    let app = app.clone();
                    tokio::spawn(async move {
                        if let Err(e) = axum::serve(tls, app).await {
                            tracing::error!("HTTPS server stopped: {e}");
                        }
                    });
                }
                // Nagle's algorithm off, as on the HTTPS side: a response written in several
                // pieces (a multipart body, a chunked one) otherwise waits with its last piece
                // for the client's delayed acknowledgement, some 40 ms, on a kept-alive
                // connection.
                let listener = tokio::net::TcpListener::from_std(listener)
                    .expect("listener")
                    .tap_io(|tcp| {
                        if let Err(e) = tcp.set_nodelay(true) {
                            tracing::debug!("TCP_NODELAY on an API connection: {e}");
                        }
                    });
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("API server stopped: {e}");
                }
            });
        })?;
    Ok(())
}

async fn status(State(s): State<ApiState>) -> ApiResult {
    let (height, tip, mempool, equivocations) = {
        let f = s.finalized.lock().expect("not poisoned");
        let equivocations: serde_json::Map<String, Value> = f
            .faults
            .iter()
            .map(|(i, kinds)| {
                let org = s
                    .participants
                    .get(*i as usize)
                    .cloned()
                    .unwrap_or_else(|| i.to_string());
                (org, json!(kinds))
            })
            .collect();
        let (h, (d, _)) = f
            .blocks
            .iter()
            .next_back()
            .map(|(h, v)| (*h, v.clone()))
            .unwrap_or((0, (String::new(), String::new())));
        (h, d, f.mempool, equivocations)
    };
    let l = s.ledger.read().expect("not poisoned");
    Ok(Json(json!({
        "chain": l.chain(),
        "org": s.org,
        "height": height,
        "block": tip,
        "state_root": l.root().to_hex(),
        "ledger_blocks": l.height(),
        "mempool": mempool,
        // Signed evidence of equivocation that consensus caught, by organisation.
        "equivocations": equivocations,
        "orgs": l
            .orgs()
            .into_iter()
            .map(|o| {
                let ca = medledger_crypto::Certificate::from_pem(&o.ca)
                    .map(|c| c.fingerprint().to_hex())
                    .unwrap_or_default();
                json!({ "id": o.id, "class": o.class, "active": o.active, "ca": ca })
            })
            .collect::<Vec<_>>(),
    })))
}

async fn submit(State(s): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let tx = Tx::from_bytes(&body).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    // Refuse early what the ledger would refuse at this point (bad signature, not a member,
    // another chain); nonces may run ahead of the ledger while earlier ones are pending.
    {
        let l = s.ledger.read().expect("not poisoned");
        if let Err(e) = l.admit(&tx)
            && !matches!(e, medledger_ledger::LedgerError::Nonce(_))
        {
            return Err(error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()));
        }
        if tx.body.nonce < l.next_nonce(&tx.body.signer) {
            return Err(error(
                StatusCode::CONFLICT,
                format!("nonce {} was already used (replay)", tx.body.nonce),
            ));
        }
    }
    if s.mailbox.mempool_full() {
        return Err(mempool_full());
    }
    let id = tx.id().to_hex();
    s.mailbox.submit_verified(tx);
    Ok(Json(json!({ "tx": id, "status": "pending" })))
}

/// 503: the mempool holds [`crate::app::MEMPOOL_LIMIT`] transactions; the client retries.
fn mempool_full() -> (StatusCode, Json<Value>) {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "this node's mempool is full: retry in a second, once blocks have drained it",
    )
}

/// Many transactions at once (a JSON array); each is checked as by `/api/tx`, and the answer
/// lists per transaction its id or why it was refused.
async fn submit_many(State(s): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let txs: Vec<Tx> = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("not a JSON array of transactions: {e}"),
        )
    })?;
    if s.mailbox.mempool_full() {
        return Err(mempool_full());
    }
    let mut out = Vec::with_capacity(txs.len());
    for tx in txs {
        let refused = {
            let l = s.ledger.read().expect("not poisoned");
            match l.admit(&tx) {
                Err(e) if !matches!(e, medledger_ledger::LedgerError::Nonce(_)) => {
                    Some(e.to_string())
                }
                _ if tx.body.nonce < l.next_nonce(&tx.body.signer) => {
                    Some(format!("nonce {} was already used (replay)", tx.body.nonce))
                }
                _ => None,
            }
        };
        match refused {
            Some(e) => out.push(json!({ "error": e })),
            None => {
                out.push(json!({ "tx": tx.id().to_hex() }));
                s.mailbox.submit_verified(tx);
            }
        }
    }
    Ok(Json(json!(out)))
}

/// Finalised blocks from a height on (at most 1000): height, digest, when this node applied
/// it, and each transaction's receipt (what it created, or why the contracts refused it).
async fn blocks(State(s): State<ApiState>, Path(from): Path<u64>) -> ApiResult {
    let f = s.finalized.lock().expect("not poisoned");
    let list: Vec<Value> = f
        .applied
        .range(from..)
        .take(1000)
        .map(|(h, (ms, txs))| {
            let receipts: Vec<Value> = txs
                .iter()
                .map(|id| match f.by_tx.get(id) {
                    Some((_, r)) => json!(r),
                    None => json!({ "tx": id }),
                })
                .collect();
            let digest = f.blocks.get(h).map(|(d, _)| d.clone()).unwrap_or_default();
            json!({ "height": h, "block": digest, "applied_ms": ms, "txs": receipts })
        })
        .collect();
    Ok(Json(json!(list)))
}

#[derive(Debug, serde::Deserialize)]
struct QueryParams {
    prefix: String,
    /// Entries after this key (paging).
    after: Option<String>,
    limit: Option<usize>,
}

/// State entries under a prefix, in key order (at most `limit`, 1000 by default), and the key
/// to pass as `after` for the next page.
async fn query(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<QueryParams>,
) -> ApiResult {
    let l = s.ledger.read().expect("not poisoned");
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let keys = l.state().keys(&q.prefix);
    let start = match &q.after {
        Some(a) => keys.partition_point(|k| k <= a),
        None => 0,
    };
    let page: Vec<Value> = keys[start..]
        .iter()
        .take(limit)
        .map(|k| {
            let v: Value = l
                .state()
                .get_raw(k)
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            json!({ "key": k, "value": v })
        })
        .collect();
    let next = (start + page.len() < keys.len())
        .then(|| {
            page.last()
                .and_then(|e| e["key"].as_str().map(str::to_string))
        })
        .flatten();
    Ok(Json(json!({
        "root": l.root().to_hex(),
        "entries": page,
        "next": next,
    })))
}

async fn receipt(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let f = s.finalized.lock().expect("not poisoned");
    match f.by_tx.get(&id) {
        Some((height, r)) => Ok(Json(json!({ "tx": id, "height": height, "receipt": r }))),
        None => Err(error(
            StatusCode::NOT_FOUND,
            format!("transaction {id} is not finalised (yet)"),
        )),
    }
}

async fn nonce(State(s): State<ApiState>, Path(key): Path<String>) -> ApiResult {
    let key = medledger_crypto::VerifyingKey::from_hex(&key)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    let l = s.ledger.read().expect("not poisoned");
    Ok(Json(json!({ "next": l.next_nonce(&key) })))
}

async fn studies(State(s): State<ApiState>) -> ApiResult {
    let l = s.ledger.read().expect("not poisoned");
    Ok(Json(json!(l.studies(None))))
}

async fn audit(State(s): State<ApiState>) -> ApiResult {
    let l = s.ledger.read().expect("not poisoned");
    Ok(Json(json!(l.audit())))
}

/// Whether `org` may retrieve under `grant` now (live grant, live consent or break-glass):
/// 200 with the grant, else 403 with the reason and the ledger height it was decided at.
async fn may_retrieve(
    State(s): State<ApiState>,
    Path((grant, org)): Path<(String, String)>,
) -> ApiResult {
    let l = s.ledger.read().expect("not poisoned");
    match l.may_retrieve(&grant, &org) {
        Ok(g) => Ok(Json(json!({ "grant": g, "height": l.height() }))),
        Err(e) => Err((
            StatusCode::FORBIDDEN,
            Json(json!({ "error": e.to_string(), "refusal": e, "height": l.height() })),
        )),
    }
}

/// What a patient sees: their studies (by pseudonym), consents, every grant on the studies
/// and every retrieval or refused retrieval of them.
async fn patient_view(State(s): State<ApiState>, Path(patient): Path<String>) -> ApiResult {
    let l = s.ledger.read().expect("not poisoned");
    let (grants, audit) = l.patient_view(&patient);
    Ok(Json(json!({
        "patient": patient,
        "studies": l.studies_of_patient(&patient),
        "consents": l.consents_of(&patient),
        "grants": grants,
        "audit": audit,
    })))
}

async fn state_proof(State(s): State<ApiState>, Path(key): Path<String>) -> ApiResult {
    let l = s.ledger.read().expect("not poisoned");
    match l.state().prove(&key) {
        Some(p) => Ok(Json(json!({ "root": l.root().to_hex(), "proof": p }))),
        None => Err(error(StatusCode::NOT_FOUND, format!("no state key {key}"))),
    }
}

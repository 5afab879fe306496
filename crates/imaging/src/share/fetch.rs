//! The receiving side: fetch a granted study from its owner's node, verify every byte
//! against the root the ledger registered, keep it, and sign for it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use medledger_crypto::{Digest, WrappedKey};
use medledger_ledger::{Grant, Study};
use medledger_store::{ObjectRef, SeriesProof, StudyManifest};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Received, RetrievalStatus, Sharing, SharingInner, now_ms};

/// Requests in flight at once, and objects asked for per request: many small requests keep
/// both ends busy (measured with `medledger bench share`: 8 x 4 beat 4 x 8, 2 x 32 and 1 x 64).
const PARALLEL: usize = 8;
const CHUNK: usize = 4;
/// Objects written to the store at once (each batch is durable before the next).
const WRITE_BATCH: usize = 32;
const WRITE_BATCH_BYTES: usize = 16 << 20;
const ATTEMPTS: u32 = 3;
/// Attempts of an interrupted retrieval before it is given up (2 s, 4 s ... 60 s apart).
const RETRIES: u32 = 10;

/// What one retrieval did.
#[derive(Debug, Clone, Serialize)]
pub struct FetchOutcome {
    pub grant: String,
    pub owner: String,
    /// The study's root on the ledger, which every object was verified against.
    pub root: Digest,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series: Option<String>,
    /// What this node's store now holds (the root itself for a whole study).
    pub stored_root: Digest,
    pub instances: u32,
    /// Objects of the retrieval, how many came over the network now, how many were
    /// already here from an interrupted earlier attempt.
    pub objects: u32,
    pub fetched_objects: u32,
    pub resumed_objects: u32,
    /// Plaintext bytes of the objects (what the audit event records).
    pub bytes: u64,
    /// Sealed bytes that came over the network now.
    pub transferred_bytes: u64,
    /// From the start to the study being verified, stored and in this node's index.
    pub viewable_seconds: f64,
    pub seconds: f64,
    /// The audit event the owner's node recorded (its sequence number), or why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_error: Option<String>,
    /// Seconds from the start at which each phase ended: the manifest opened and checked,
    /// the objects verified and written, the study kept, indexed.
    pub phases: Vec<(String, f64)>,
}

/// Why a retrieval did not complete.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Invalid(String),
    #[error("{owner} refused the retrieval: {reason}")]
    Refused { owner: String, reason: String },
    #[error("verification failed, nothing of it kept: {0}")]
    Tampered(String),
    #[error(
        "transfer from {owner} interrupted after {done} of {total} objects ({reason}); run it again to resume"
    )]
    Interrupted {
        owner: String,
        done: usize,
        total: usize,
        reason: String,
    },
    #[error("{0}")]
    Local(String),
}

impl FetchError {
    fn status(&self) -> StatusCode {
        match self {
            FetchError::Invalid(_) => StatusCode::BAD_REQUEST,
            FetchError::Refused { .. } => StatusCode::FORBIDDEN,
            FetchError::Tampered(_) => StatusCode::BAD_GATEWAY,
            FetchError::Interrupted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            FetchError::Local(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The answer of one request to the owner's node.
enum Answer {
    Ok(Bytes),
    Refused(String),
    Failed(String),
}

struct Remote {
    http: reqwest::blocking::Client,
    base: String,
}

impl Remote {
    fn call(&self, post: Option<Vec<u8>>, path: &str) -> Answer {
        let url = format!("{}{path}", self.base);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
            let r = match &post {
                Some(b) => self.http.post(&url).body(b.clone()).send(),
                None => self.http.get(&url).send(),
            };
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    last = error_chain(&e);
                    continue;
                }
            };
            let status = r.status();
            let body = match r.bytes() {
                Ok(b) => b,
                Err(e) => {
                    last = error_chain(&e);
                    continue;
                }
            };
            if status.is_success() {
                return Answer::Ok(body);
            }
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            if status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND {
                return Answer::Refused(message);
            }
            last = format!("{status}: {message}");
            if status.is_client_error() {
                break;
            }
        }
        Answer::Failed(last)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl SharingInner {
    fn remote(&self, owner: &str) -> Result<Remote, FetchError> {
        let addr = self.peers.get(owner).ok_or_else(|| {
            FetchError::Invalid(format!(
                "this node's configuration has no sharing address for {owner}"
            ))
        })?;
        let mut clients = self.clients.lock().expect("not poisoned");
        let http = match clients.get(owner) {
            Some(c) => c.clone(),
            None => {
                let config = super::tls::client_config(
                    &self.cert_pem,
                    &self.svc.signer,
                    self.orgs.clone(),
                    owner,
                )
                .map_err(FetchError::Local)?;
                let c = reqwest::blocking::Client::builder()
                    .use_preconfigured_tls(config)
                    .tcp_nodelay(true)
                    .pool_max_idle_per_host(PARALLEL * 2)
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(120))
                    .build()
                    .map_err(|e| FetchError::Local(format!("TLS client: {e}")))?;
                clients.insert(owner.to_string(), c.clone());
                c
            }
        };
        Ok(Remote {
            http,
            base: format!("https://{addr}"),
        })
    }
}

/// Runs one retrieval, keeping its status for `GET /api/retrievals`.
pub(crate) fn fetch(
    inner: &Arc<SharingInner>,
    grant: &str,
    series: Option<&str>,
) -> Result<FetchOutcome, FetchError> {
    {
        let mut running = inner.running.lock().expect("not poisoned");
        if !running.insert(grant.to_string()) {
            return Err(FetchError::Invalid(format!(
                "a retrieval of grant {grant} is already running"
            )));
        }
    }
    let attempts = inner
        .retrievals
        .lock()
        .expect("not poisoned")
        .get(grant)
        .filter(|r| r.state == "interrupted" || r.state == "running")
        .map_or(0, |r| r.attempts);
    let status = |state: &'static str,
                  outcome: Option<FetchOutcome>,
                  error: Option<String>,
                  attempts: u32,
                  next_attempt_ms: Option<u64>| {
        inner.retrievals.lock().expect("not poisoned").insert(
            grant.to_string(),
            RetrievalStatus {
                grant: grant.to_string(),
                state,
                progress: None,
                outcome,
                error,
                attempts,
                next_attempt_ms,
                series: series.map(str::to_string),
            },
        );
    };
    status("running", None, None, attempts, None);
    let r = fetch_inner(inner, grant, series);
    match &r {
        Ok(o) => status("done", Some(o.clone()), None, 0, None),
        // A transfer cut off (the owner's node down, the network) is tried again later,
        // from what was already verified, while attempts remain.
        Err(e @ FetchError::Interrupted { .. }) if inner.auto && attempts + 1 < RETRIES => {
            let wait = (2_000u64 << attempts).min(60_000);
            status(
                "interrupted",
                None,
                Some(e.to_string()),
                attempts + 1,
                Some(now_ms() + wait),
            );
        }
        Err(e) => status("failed", None, Some(e.to_string()), attempts, None),
    }
    inner.running.lock().expect("not poisoned").remove(grant);
    r
}

fn fetch_inner(
    inner: &Arc<SharingInner>,
    grant_id: &str,
    series: Option<&str>,
) -> Result<FetchOutcome, FetchError> {
    let started = Instant::now();
    let svc = &inner.svc;
    let local = |e: medledger_node::ClientError| FetchError::Local(e.to_string());
    let grant: Grant = svc
        .client
        .value(&format!("grant/{grant_id}"))
        .map_err(local)?
        .ok_or_else(|| FetchError::Invalid(format!("no grant {grant_id} on the ledger")))?;
    if grant.grantee != inner.org {
        return Err(FetchError::Invalid(format!(
            "grant {grant_id} is for {}, not {}",
            grant.grantee, inner.org
        )));
    }
    let root = grant.study;
    let study: Study = svc
        .client
        .value(&format!("study/{root}"))
        .map_err(local)?
        .ok_or_else(|| FetchError::Invalid(format!("study {root} is not registered")))?;
    if inner.orgs.store_key(&study.owner).is_none() {
        // The registry of organisations is loaded by the follower; make sure it is.
        inner.orgs.refresh(&svc.client).map_err(FetchError::Local)?;
    }
    let remote = inner.remote(&study.owner)?;
    let owner = study.owner.clone();
    let interrupted = |done: usize, total: usize, reason: String| FetchError::Interrupted {
        owner: owner.clone(),
        done,
        total,
        reason,
    };
    let refused = |reason: String| FetchError::Refused {
        owner: owner.clone(),
        reason,
    };
    // Open a transfer, telling the owner how far this node's ledger had got when it read the
    // grant: the owner's node may not have applied that block yet.
    let height = inner.ledger_height().map_err(FetchError::Local)?;
    let session = match remote.call(
        Some(Vec::new()),
        &format!("/share/v1/grants/{grant_id}/sessions?height={height}"),
    ) {
        Answer::Ok(b) => serde_json::from_slice::<Value>(&b)
            .ok()
            .and_then(|v| v["session"].as_str().map(str::to_string))
            .ok_or_else(|| interrupted(0, 0, "the owner's answer has no session".into()))?,
        Answer::Refused(m) => return Err(refused(m)),
        Answer::Failed(m) => return Err(interrupted(0, 0, m)),
    };
    // What to fetch: the whole manifest, opened with the key the grant wrapped for this
    // node and checked against the registered root; or one series with its Merkle proof.
    let tampered = |what: String| {
        inner.record_refusal(
            Some(grant_id.to_string()),
            &owner,
            false,
            format!("received data failed verification: {what}"),
        );
        FetchError::Tampered(format!("{what} (from {owner})"))
    };
    let envelope: WrappedKey = serde_json::from_str(&grant.envelope)
        .map_err(|e| FetchError::Invalid(format!("the grant's envelope: {e}")))?;
    let (manifest, sealed_manifest) = match series {
        None => {
            let sealed = match remote.call(None, &format!("/share/v1/sessions/{session}/manifest"))
            {
                Answer::Ok(b) => b,
                Answer::Refused(m) => return Err(refused(m)),
                Answer::Failed(m) => return Err(interrupted(0, 0, m)),
            };
            let key =
                medledger_crypto::unwrap(&envelope, &svc.owner, root.as_bytes()).map_err(|e| {
                    FetchError::Invalid(format!(
                        "the grant's envelope does not open with this node's store key: {e}"
                    ))
                })?;
            let plain = medledger_crypto::open(&key, &sealed)
                .map_err(|e| tampered(format!("the manifest does not open: {e}")))?;
            let m = StudyManifest::decode(&plain)
                .map_err(|e| tampered(format!("the manifest does not decode: {e}")))?;
            if m.root() != root {
                return Err(tampered(format!(
                    "the manifest has root {}, the ledger registered {root}",
                    m.root()
                )));
            }
            (m, Some(sealed))
        }
        Some(uid) => {
            let v = match remote.call(None, &format!("/share/v1/sessions/{session}/series/{uid}")) {
                Answer::Ok(b) => serde_json::from_slice::<Value>(&b)
                    .map_err(|e| tampered(format!("the series answer: {e}")))?,
                Answer::Refused(m) => return Err(refused(m)),
                Answer::Failed(m) => return Err(interrupted(0, 0, m)),
            };
            let field = |k: &str| {
                v[k].as_str()
                    .and_then(|h| hex::decode(h).ok())
                    .ok_or_else(|| tampered(format!("the series answer has no {k}")))
            };
            let part = StudyManifest::decode(&field("manifest")?)
                .map_err(|e| tampered(format!("the series entry does not decode: {e}")))?;
            let proof = SeriesProof::decode(&field("proof")?)
                .map_err(|e| tampered(format!("the series proof does not decode: {e}")))?;
            let entry = match part.series.as_slice() {
                [one] if one.series_uid == uid => one,
                _ => return Err(tampered(format!("the answer is not series {uid}"))),
            };
            if !proof.verify(&root, entry) {
                return Err(tampered(format!(
                    "series {uid} does not prove into root {root}"
                )));
            }
            (part, None)
        }
    };
    let t_manifest = started.elapsed().as_secs_f64();
    // Every object once; the ones already here (an interrupted earlier attempt) stay.
    let mut seen = HashSet::new();
    let all: Vec<ObjectRef> = manifest
        .instances()
        .flat_map(|(_, i)| i.objects().cloned().collect::<Vec<_>>())
        .filter(|o| seen.insert(o.address))
        .collect();
    let mut todo = Vec::new();
    for o in &all {
        if !svc
            .store
            .has_object(&o.address)
            .map_err(|e| FetchError::Local(e.to_string()))?
        {
            todo.push(o.clone());
        }
    }
    let total = all.len();
    let resumed = total - todo.len();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(resumed);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<FetchError>> = Mutex::new(None);
    // Header objects' plaintext, for the index (so the study is not read back).
    let header_addresses: HashSet<Digest> = manifest
        .instances()
        .map(|(_, i)| i.header.address)
        .collect();
    let headers: Mutex<std::collections::HashMap<Digest, Vec<u8>>> = Mutex::default();
    let transferred = std::sync::atomic::AtomicU64::new(0);
    let verified = AtomicUsize::new(resumed);
    let progress = |n: usize| {
        if let Some(st) = inner
            .retrievals
            .lock()
            .expect("not poisoned")
            .get_mut(grant_id)
        {
            st.progress = Some((n, total));
        }
    };
    progress(resumed);
    let fail = |e: FetchError| {
        stop.store(true, Ordering::Relaxed);
        let mut f = failure.lock().expect("not poisoned");
        // A verification failure outranks a network one.
        if f.is_none() || matches!(e, FetchError::Tampered(_)) {
            *f = Some(e);
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(todo.len()) {
            scope.spawn(|| {
                let mut batch: Vec<(Digest, Bytes)> = Vec::new();
                let mut batch_bytes = 0usize;
                let flush = |batch: &mut Vec<(Digest, Bytes)>| -> Result<(), FetchError> {
                    let n = batch.len();
                    svc.store
                        .put_checked(std::mem::take(batch))
                        .map_err(|e| FetchError::Local(format!("storing received objects: {e}")))?;
                    done.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                };
                while !stop.load(Ordering::Relaxed) {
                    let c = next.fetch_add(1, Ordering::Relaxed);
                    let Some(chunk) = todo.chunks(CHUNK).nth(c) else {
                        break;
                    };
                    let list: Vec<String> = chunk.iter().map(|o| o.address.to_hex()).collect();
                    let body = serde_json::to_vec(&list).expect("serialises");
                    let answer = match remote
                        .call(Some(body), &format!("/share/v1/sessions/{session}/objects"))
                    {
                        Answer::Ok(b) => b,
                        Answer::Refused(m) => {
                            fail(refused(m));
                            break;
                        }
                        Answer::Failed(m) => {
                            fail(interrupted(done.load(Ordering::Relaxed), total, m));
                            break;
                        }
                    };
                    let parts = match split_objects(&answer, chunk.len()) {
                        Ok(p) => p,
                        Err(what) => {
                            fail(tampered(what));
                            break;
                        }
                    };
                    let mut bad = false;
                    for (o, (address, bytes)) in chunk.iter().zip(parts) {
                        if address != o.address {
                            fail(tampered(format!(
                                "asked for object {}, got {address}",
                                o.address
                            )));
                            bad = true;
                            break;
                        }
                        match check_object(o, &bytes) {
                            Ok(plain) => {
                                if header_addresses.contains(&o.address) {
                                    headers
                                        .lock()
                                        .expect("not poisoned")
                                        .insert(o.address, plain);
                                }
                            }
                            Err(what) => {
                                fail(tampered(what));
                                bad = true;
                                break;
                            }
                        }
                        transferred.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        progress(verified.fetch_add(1, Ordering::Relaxed) + 1);
                        batch_bytes += bytes.len();
                        batch.push((o.address, bytes));
                    }
                    if bad {
                        break;
                    }
                    if batch.len() >= WRITE_BATCH || batch_bytes >= WRITE_BATCH_BYTES {
                        batch_bytes = 0;
                        if let Err(e) = flush(&mut batch) {
                            fail(e);
                            break;
                        }
                    }
                }
                // What was verified is kept even if another object failed: a later attempt
                // resumes from it. (A tampered object itself is never written.)
                if !batch.is_empty() {
                    if let Err(e) = flush(&mut batch) {
                        fail(e);
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("not poisoned") {
        if let FetchError::Interrupted {
            owner,
            total,
            reason,
            ..
        } = e
        {
            return Err(FetchError::Interrupted {
                owner,
                done: done.load(Ordering::Relaxed),
                total,
                reason,
            });
        }
        return Err(e);
    }
    let t_objects = started.elapsed().as_secs_f64();
    let mut phases = vec![("manifest", t_manifest), ("objects", t_objects)];
    // Keep it: the whole study under its registered root, sealed as received; one series
    // under a manifest of its own.
    let store_err = |e: medledger_store::StoreError| FetchError::Local(e.to_string());
    let stored_root = match sealed_manifest {
        Some(sealed) => {
            let address = Digest::of(&sealed);
            svc.store
                .put_sealed(vec![(address, sealed)])
                .map_err(store_err)?;
            svc.store
                .adopt(&root, &address, envelope, &svc.owner)
                .map_err(store_err)?;
            root
        }
        None => svc
            .store
            .put_manifest(&manifest, &svc.owner)
            .map_err(store_err)?,
    };
    let received = Received {
        grant: grant_id.to_string(),
        owner: owner.clone(),
        root,
        stored_root,
        derivative: study.is_derivative(),
        series: series.map(str::to_string),
        at_ms: now_ms(),
    };
    svc.store
        .put_note(
            &format!("received/{}", stored_root.to_hex()),
            &serde_json::to_value(&received).expect("serialises"),
        )
        .map_err(store_err)?;
    {
        let t_keep = started.elapsed().as_secs_f64();
        phases.push(("kept", t_keep));
        let headers = headers.into_inner().expect("not poisoned");
        let mut index = svc.index.write().expect("not poisoned");
        svc.index_received(
            &mut index,
            root,
            manifest.clone(),
            received.view(),
            grant_id,
            Some(&headers),
        )
        .map_err(FetchError::Local)?;
    }
    let viewable_seconds = started.elapsed().as_secs_f64();
    phases.push(("indexed", viewable_seconds));
    // Sign for what was received; the owner's node records it on the ledger.
    let objects = total as u32;
    let bytes: u64 = all.iter().map(|o| o.len).sum();
    let statement = medledger_ledger::retrieval_statement(grant_id, &session, objects, bytes);
    let signature = svc.signer.sign(&statement);
    let body = json!({
        "objects": objects,
        "bytes": bytes,
        "signature": hex::encode(signature.0),
    });
    let (audit, audit_error) = match remote.call(
        Some(body.to_string().into_bytes()),
        &format!("/share/v1/sessions/{session}/receipt"),
    ) {
        Answer::Ok(b) => (
            serde_json::from_slice::<Value>(&b)
                .ok()
                .and_then(|v| v["audit"].as_str().map(str::to_string)),
            None,
        ),
        Answer::Refused(m) | Answer::Failed(m) => (None, Some(m)),
    };
    Ok(FetchOutcome {
        grant: grant_id.to_string(),
        owner,
        root,
        series: series.map(str::to_string),
        stored_root,
        instances: manifest.instance_count() as u32,
        objects,
        fetched_objects: (total - resumed) as u32,
        resumed_objects: resumed as u32,
        bytes,
        transferred_bytes: transferred.into_inner(),
        viewable_seconds,
        seconds: started.elapsed().as_secs_f64(),
        audit,
        audit_error,
        phases: phases
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    })
}

/// Splits the answer to a request for `n` objects: per object its address (32 bytes), its
/// length (8 bytes, big endian) and its bytes.
fn split_objects(answer: &Bytes, n: usize) -> Result<Vec<(Digest, Bytes)>, String> {
    let mut out = Vec::with_capacity(n);
    let mut at = 0usize;
    for _ in 0..n {
        let head = answer
            .get(at..at + 40)
            .ok_or_else(|| format!("the answer ends after {} of {n} objects", out.len()))?;
        let address = Digest(head[..32].try_into().expect("32 bytes"));
        let len = u64::from_be_bytes(head[32..40].try_into().expect("8 bytes")) as usize;
        let start = at + 40;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= answer.len())
            .ok_or_else(|| format!("object {address} is cut short in the answer"))?;
        out.push((address, answer.slice(start..end)));
        at = end;
    }
    if at != answer.len() {
        return Err("the answer carries more than was asked for".into());
    }
    Ok(out)
}

/// Checks a sealed object against its manifest entry: its address, its tag, its plaintext;
/// returns the plaintext.
fn check_object(o: &ObjectRef, sealed: &[u8]) -> Result<Vec<u8>, String> {
    let actual = Digest::of(sealed);
    if actual != o.address {
        return Err(format!(
            "object {} arrived with digest {actual} ({} bytes)",
            o.address,
            sealed.len()
        ));
    }
    let plain = medledger_crypto::open(&o.key, sealed)
        .map_err(|e| format!("object {} does not open: {e}", o.address))?;
    if plain.len() as u64 != o.len || Digest::of(&plain) != o.digest {
        return Err(format!("object {} does not match the manifest", o.address));
    }
    Ok(plain)
}

#[derive(Debug, serde::Deserialize)]
struct FetchBody {
    grant: String,
    #[serde(default)]
    series: Option<String>,
}

/// `POST /api/retrievals`.
pub(crate) async fn api_fetch(s: Sharing, body: Bytes) -> Response {
    let req: FetchBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": format!("expected {{\"grant\": ID, \"series\": UID?}}: {e}") })),
            )
                .into_response();
        }
    };
    let r = tokio::task::spawn_blocking(move || s.fetch(&req.grant, req.series.as_deref())).await;
    match r {
        Ok(Ok(o)) => Json(json!(o)).into_response(),
        Ok(Err(e)) => (e.status(), Json(json!({ "error": e.to_string() }))).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

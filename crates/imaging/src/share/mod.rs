//! Sharing studies across organisations.
//!
//! The owner's node serves a study to another organisation's node over mutual TLS
//! ([`tls`]) only while the ledger says that organisation may retrieve it (a live grant,
//! and the patient's live consent or a recorded break-glass access), checked again on every
//! request, so a revocation stops a transfer from the block that finalises it. It sends the
//! sealed objects as stored; the receiving node opens the manifest with the key the grant
//! wrapped for it, checks the manifest against the root the ledger registered and every
//! object against the manifest, and keeps the study in its own store, sealed as received.
//! Both nodes sign the retrieval (the receiver's statement inside the owner's transaction),
//! and refusals on either side go on the ledger too.
//!
//! The receiving node also follows the ledger: it grants requests for its own studies when
//! consent allows ([`follow`]), and fetches what is granted to it.

pub mod fetch;
pub mod follow;
pub mod serve;
pub mod tls;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use medledger_crypto::Digest;
use medledger_ledger::Op;
use medledger_node::NodeConfig;
use serde::{Deserialize, Serialize};

use crate::View;
use crate::service::{Inner, Service};

pub use fetch::{FetchError, FetchOutcome};
pub use tls::Orgs;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a node keeps of a study it received (`notes/received/<stored root>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received {
    pub grant: String,
    pub owner: String,
    /// The study's root on the ledger.
    pub root: Digest,
    /// What this store holds: `root` for a whole study, a manifest of the part received for
    /// one series.
    pub stored_root: Digest,
    pub derivative: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<String>,
    pub at_ms: u64,
}

impl Received {
    /// Derivatives are shown to everyone; identified originals to clinical roles only.
    pub fn view(&self) -> View {
        if self.derivative {
            View::Deidentified
        } else {
            View::Original
        }
    }
}

/// The state of one retrieval this node ran (by grant).
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalStatus {
    pub grant: String,
    pub state: &'static str,
    /// While running: objects verified so far (including those already here) of all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<(usize, usize)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<FetchOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Interrupted transfers are tried again by the follower (with automatic sharing on):
    /// how many attempts failed so far, and when the next one starts (ms since 1970).
    #[serde(skip_serializing_if = "is_zero")]
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<u64>,
    /// Series of a partial retrieval (kept for the next attempt).
    #[serde(skip)]
    pub series: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Sharing for one node: the serving side, the fetching side and the follower.
#[derive(Clone)]
pub struct Sharing {
    pub(crate) inner: Arc<SharingInner>,
}

impl std::fmt::Debug for Sharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharing")
            .field("org", &self.inner.org)
            .finish_non_exhaustive()
    }
}

pub(crate) struct SharingInner {
    pub(crate) svc: Arc<Inner>,
    pub(crate) org: String,
    pub(crate) orgs: Arc<Orgs>,
    pub(crate) cert_pem: String,
    /// Other organisations' sharing endpoints.
    pub(crate) peers: HashMap<String, SocketAddr>,
    pub(crate) sessions: Mutex<HashMap<String, serve::Session>>,
    /// Refusals recorded recently, so that a peer retrying cannot flood the ledger.
    recorded_refusals: Mutex<HashMap<String, Instant>>,
    pub(crate) handshake_refusals: Arc<Mutex<Vec<tls::HandshakeRefusal>>>,
    pub(crate) retrievals: Mutex<BTreeMap<String, RetrievalStatus>>,
    /// Grants being fetched now (one retrieval per grant at a time).
    pub(crate) running: Mutex<HashSet<String>>,
    pub(crate) clients: Mutex<HashMap<String, reqwest::blocking::Client>>,
    /// Whether the follower grants, fetches and retries by itself.
    pub(crate) auto: bool,
    /// Serving rate limit (bytes/s) and when the link is next free.
    limit: Option<f64>,
    link_free_at: Mutex<Instant>,
}

/// Why sharing could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShareStartError {
    #[error("the imaging configuration has no node certificate (node_cert)")]
    NoCertificate,
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl Sharing {
    /// Starts the serving side on the configured address (if any) and the follower, for the
    /// node `cfg` whose imaging service is `service`.
    pub fn start(service: &Service, cfg: &NodeConfig) -> Result<Sharing, ShareStartError> {
        let svc = service.inner();
        let imaging = svc.config.clone();
        let cert_path = imaging
            .node_cert
            .clone()
            .ok_or(ShareStartError::NoCertificate)?;
        let cert_pem =
            std::fs::read_to_string(&cert_path).map_err(|source| ShareStartError::Read {
                path: cert_path.display().to_string(),
                source,
            })?;
        let peers = cfg
            .peers
            .iter()
            .filter(|p| p.org != cfg.org)
            .filter_map(|p| p.share.map(|a| (p.org.clone(), a)))
            .collect();
        let inner = Arc::new(SharingInner {
            svc: svc.clone(),
            org: cfg.org.clone(),
            orgs: Arc::new(Orgs::default()),
            cert_pem,
            peers,
            sessions: Mutex::new(HashMap::new()),
            recorded_refusals: Mutex::new(HashMap::new()),
            handshake_refusals: Arc::new(Mutex::new(Vec::new())),
            retrievals: Mutex::new(BTreeMap::new()),
            running: Mutex::new(HashSet::new()),
            clients: Mutex::new(HashMap::new()),
            auto: imaging.auto_share,
            limit: imaging
                .share_limit_mb_s
                .filter(|r| *r > 0.0)
                .map(|r| r * 1e6),
            link_free_at: Mutex::new(Instant::now()),
        });
        // Validate the TLS identity now, so a bad certificate stops the node at start.
        tls::server_config(
            &inner.cert_pem,
            &svc.signer,
            inner.orgs.clone(),
            inner.handshake_refusals.clone(),
        )
        .map_err(ShareStartError::Tls)?;
        if let Some(addr) = imaging.share {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|source| ShareStartError::Listen { addr, source })?;
            serve::spawn(inner.clone(), listener);
        }
        let follower = inner.clone();
        let auto = imaging.auto_share;
        std::thread::Builder::new()
            .name("share-follow".into())
            .spawn(move || follow::run(follower, auto))
            .expect("spawn the share follower");
        Ok(Sharing { inner })
    }

    /// Fetches the study of `grant` from its owner (one series only with `series`), verified,
    /// into this node's store and index.
    pub fn fetch(&self, grant: &str, series: Option<&str>) -> Result<FetchOutcome, FetchError> {
        fetch::fetch(&self.inner, grant, series)
    }

    /// Retrievals this node ran, newest state per grant.
    pub fn retrievals(&self) -> Vec<RetrievalStatus> {
        self.inner
            .retrievals
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// The local API: `POST /api/retrievals` (`{"grant": ID, "series": UID?}`) and
    /// `GET /api/retrievals`, merged into the node's API.
    pub fn router(&self) -> axum::Router {
        use axum::routing::get;
        let s = self.clone();
        let s2 = self.clone();
        axum::Router::new().route(
            "/api/retrievals",
            get(move || {
                let s = s.clone();
                async move { axum::Json(s.retrievals()) }
            })
            .post(move |body: axum::body::Bytes| {
                let s = s2.clone();
                async move { fetch::api_fetch(s, body).await }
            }),
        )
    }
}

impl SharingInner {
    /// How many finalised blocks this node's ledger has applied: in memory in the node
    /// process, through the API elsewhere.
    pub(crate) fn ledger_height(&self) -> Result<u64, String> {
        if let Some(ledger) = medledger_node::local_ledger() {
            return Ok(ledger.read().expect("not poisoned").height());
        }
        self.svc.client.ledger_height().map_err(|e| e.to_string())
    }

    /// Waits, under the serving rate limit, until `bytes` may be sent (blocking).
    pub(crate) fn pace(&self, bytes: usize) {
        let Some(rate) = self.limit else {
            return;
        };
        let start = {
            let mut free = self.link_free_at.lock().expect("not poisoned");
            let start = (*free).max(Instant::now());
            *free = start + Duration::from_secs_f64(bytes as f64 / rate);
            start
        };
        let now = Instant::now();
        if start > now {
            std::thread::sleep(start - now);
        }
    }

    /// Records a refusal on the ledger (at most once a minute per grant, peer and reason),
    /// from a thread of its own: the answer to the peer does not wait for it.
    pub(crate) fn record_refusal(
        self: &Arc<Self>,
        grant: Option<String>,
        peer: &str,
        serving: bool,
        reason: String,
    ) {
        let reason: String = reason.chars().take(500).collect();
        let key = format!("{grant:?}|{peer}|{serving}|{reason}");
        {
            let mut seen = self.recorded_refusals.lock().expect("not poisoned");
            seen.retain(|_, at| at.elapsed() < Duration::from_secs(60));
            if seen.contains_key(&key) || seen.len() > 10_000 {
                return;
            }
            seen.insert(key, Instant::now());
        }
        if medledger_ledger::check_org_id(peer).is_err() || peer == self.org {
            return;
        }
        let op = Op::RecordRefusal {
            grant,
            peer: peer.to_string(),
            serving,
            reason,
        };
        let me = self.clone();
        std::thread::spawn(move || {
            if let Err(e) = me.svc.execute(vec![op]) {
                tracing::warn!("recording a refusal on the ledger: {e}");
            }
        });
    }
}

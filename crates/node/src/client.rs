//! A client for a node's JSON API: sign and submit operations, follow them to finality, read
//! state with proofs, page through state and finalised blocks. Blocking (reqwest); use it from
//! a thread, not from inside an async runtime.

use std::time::{Duration, Instant};

use medledger_crypto::{SigningKey, VerifyingKey};
use medledger_ledger::{AuditEvent, Grant, LedgerError, Op, StateProof, Study, Tx};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// What went wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The node answered with an error status (a refused submission, an unknown key...).
    #[error("{url}: {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: unexpected answer: {message}")]
    Format { url: String, message: String },
    #[error("transaction {tx} not final after {waited:?}")]
    NotFinal { tx: String, waited: Duration },
    /// Finalised, but the contracts refused it (the receipt's error).
    #[error("transaction {tx} was finalised at height {height} but refused: {error}")]
    Rejected {
        tx: String,
        height: u64,
        error: LedgerError,
    },
}

/// A finalised transaction's receipt, as the node reports it.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Finality {
    pub tx: String,
    pub height: u64,
    pub receipt: medledger_ledger::Receipt,
}

/// One page of state entries.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct QueryPage {
    pub root: String,
    pub entries: Vec<QueryEntry>,
    /// The last key of this page when more follow.
    pub next: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct QueryEntry {
    pub key: String,
    pub value: Value,
}

/// A state entry with its Merkle proof against the node's current state root.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct ProvenEntry {
    pub root: String,
    pub proof: StateProof,
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::blocking::Client,
}

impl Client {
    /// A client of the node whose API is at `base`, e.g. `http://127.0.0.1:7200`.
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn answer<T: DeserializeOwned>(
        &self,
        url: String,
        r: reqwest::Result<reqwest::blocking::Response>,
    ) -> Result<T, ClientError> {
        let r = r.map_err(|source| ClientError::Unreachable {
            url: url.clone(),
            source,
        })?;
        let status = r.status();
        let body = r.bytes().map_err(|source| ClientError::Unreachable {
            url: url.clone(),
            source,
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Refused {
                url,
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Format {
            url,
            message: e.to_string(),
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let r = self.http.get(&url).send();
        self.answer(url, r)
    }

    /// Chain, height, block, state root, mempool size and organisations.
    pub fn status(&self) -> Result<Value, ClientError> {
        self.get("/api/status")
    }

    pub fn chain(&self) -> Result<String, ClientError> {
        let s = self.status()?;
        s["chain"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClientError::Format {
                url: format!("{}/api/status", self.base),
                message: "no chain".into(),
            })
    }

    /// How many finalised blocks the node's ledger has applied (each node applies them on
    /// its own, so another node may be a block ahead or behind).
    pub fn ledger_height(&self) -> Result<u64, ClientError> {
        self.status()?["ledger_blocks"]
            .as_u64()
            .ok_or_else(|| ClientError::Format {
                url: format!("{}/api/status", self.base),
                message: "no ledger height".into(),
            })
    }

    /// The nonce `key`'s next transaction must carry, by the node's finalised state.
    pub fn next_nonce(&self, key: &VerifyingKey) -> Result<u64, ClientError> {
        let v: Value = self.get(&format!("/api/nonce/{key}"))?;
        v["next"].as_u64().ok_or_else(|| ClientError::Format {
            url: format!("{}/api/nonce/{key}", self.base),
            message: "no next nonce".into(),
        })
    }

    /// Submits a signed transaction; returns its id once the node admitted it to its mempool.
    pub fn submit_tx(&self, tx: &Tx) -> Result<String, ClientError> {
        let url = format!("{}/api/tx", self.base);
        let r = self.http.post(&url).body(tx.to_bytes()).send();
        let v: Value = self.answer(url, r)?;
        Ok(v["tx"].as_str().unwrap_or_default().to_string())
    }

    /// Waits until transaction `id` is final; a refusal by the contracts is an error.
    pub fn wait(&self, id: &str, timeout: Duration) -> Result<Finality, ClientError> {
        let start = Instant::now();
        loop {
            match self.get::<Finality>(&format!("/api/tx/{id}")) {
                Ok(f) => {
                    return match &f.receipt.error {
                        None => Ok(f),
                        Some(e) => Err(ClientError::Rejected {
                            tx: id.to_string(),
                            height: f.height,
                            error: e.clone(),
                        }),
                    };
                }
                Err(ClientError::Refused { status: 404, .. }) => {}
                Err(e) => return Err(e),
            }
            if start.elapsed() > timeout {
                return Err(ClientError::NotFinal {
                    tx: id.to_string(),
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Signs `op` as `key` with its next nonce, submits it and waits for finality.
    pub fn execute(
        &self,
        key: &SigningKey,
        op: Op,
        timeout: Duration,
    ) -> Result<Finality, ClientError> {
        let chain = self.chain()?;
        let nonce = self.next_nonce(&key.verifying_key())?;
        let id = self.submit_tx(&Tx::sign(&chain, key, nonce, op))?;
        self.wait(&id, timeout)
    }

    /// One state entry with its proof; check it with `proof.verify(root)`.
    pub fn prove(&self, key: &str) -> Result<ProvenEntry, ClientError> {
        self.get(&format!("/api/state/{key}"))
    }

    /// State entries under `prefix`, a page at a time (`after`: the previous page's `next`).
    pub fn query(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<QueryPage, ClientError> {
        let url = format!("{}/api/query", self.base);
        let mut params = vec![("prefix", prefix.to_string()), ("limit", limit.to_string())];
        if let Some(a) = after {
            params.push(("after", a.to_string()));
        }
        let r = self.http.get(&url).query(&params).send();
        self.answer(url, r)
    }

    /// Finalised blocks from `from` on, with their receipts.
    pub fn blocks(&self, from: u64) -> Result<Vec<Value>, ClientError> {
        self.get(&format!("/api/blocks/{from}"))
    }

    pub fn studies(&self) -> Result<Vec<Study>, ClientError> {
        self.get("/api/studies")
    }

    pub fn audit(&self) -> Result<Vec<AuditEvent>, ClientError> {
        self.get("/api/audit")
    }

    /// Whether `org` may retrieve under `grant` now, by this node's finalised state: the
    /// grant, or `Refused { status: 403, message }` saying why not.
    pub fn may_retrieve(&self, grant: &str, org: &str) -> Result<Grant, ClientError> {
        let v: Value = self.get(&format!("/api/may-retrieve/{grant}/{org}"))?;
        serde_json::from_value(v["grant"].clone()).map_err(|e| ClientError::Format {
            url: format!("{}/api/may-retrieve/{grant}/{org}", self.base),
            message: e.to_string(),
        })
    }

    /// The patient's view: studies, consents, grants and audit events of a pseudonym.
    pub fn patient_view(&self, patient: &str) -> Result<Value, ClientError> {
        self.get(&format!("/api/patients/{patient}"))
    }

    /// A state value by key, without its proof; `None` if absent.
    pub fn value<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ClientError> {
        match self.get::<Value>(&format!("/api/state/{key}")) {
            Ok(v) => {
                let raw = v["proof"]["value"].clone();
                let value = match raw {
                    Value::String(s) => serde_json::from_str(&s).ok(),
                    other => serde_json::from_value(other).ok(),
                };
                Ok(value)
            }
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

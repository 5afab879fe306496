//! medledger's ledger state machine, in the manner of Hyperledger Fabric's chaincode:
//! organisations and their members with roles, a study registry, patient consent, access
//! requests and grants that carry wrapped keys, audit of every retrieval, research datasets,
//! and governance by a quorum of organisations.
//!
//! Pure and deterministic: no I/O, no clock but the block's time, no randomness, ordered maps
//! only. Every node that applies the same blocks reaches the same state root.
//!
//! A transaction is checked in this order: chain, signature, membership, nonce (each signer
//! numbers its transactions 1, 2, 3, ...; a replayed or skipped number is refused), then the
//! operation. Once signature and nonce pass, the nonce is spent even if the operation is
//! refused, so a refused transaction can never be replayed later into success. A refused
//! operation changes nothing else.

mod contracts;
pub mod identity;
pub mod state;
pub mod tx;
pub mod types;

use medledger_crypto::{Digest, VerifyingKey};
use serde::{Deserialize, Serialize};

pub use state::{State, StateProof};
pub use tx::{Endorsement, Op, Tx, TxBody, retrieval_statement};
pub use types::*;

/// Why a transaction was refused or a query failed. Messages name keys, ids and roles,
/// never a patient (patients appear only as pseudonyms anyway).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerError {
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("not allowed: {0}")]
    Unauthorized(String),
    #[error("replay or gap: {0}")]
    Nonce(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("no consent: {0}")]
    NoConsent(String),
}

/// One organisation at genesis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenesisOrg {
    pub id: String,
    pub class: OrgClass,
    /// The organisation's self-signed CA certificate (PEM).
    pub ca: String,
    /// Its first admin's and its node's certificates (PEM), issued by that CA.
    pub admin: String,
    pub node: String,
    /// The X25519 public key (text form) the organisation's store opens studies with.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub store_key: Option<String>,
}

/// The first state of a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    pub chain: String,
    /// When the network was made (ms since the epoch): the ledger's time until the first block.
    #[serde(default)]
    pub time_ms: u64,
    pub orgs: Vec<GenesisOrg>,
}

/// The outcome of one transaction in a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub tx: Digest,
    /// The id of what the transaction created (consent, request, grant, proposal...).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub created: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<LedgerError>,
}

impl Receipt {
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

/// The state machine.
#[derive(Debug, Clone)]
pub struct Ledger {
    chain: String,
    state: State,
    height: u64,
    time_ms: u64,
}

impl Ledger {
    pub fn genesis(g: &Genesis) -> Result<Ledger, LedgerError> {
        let mut l = Ledger {
            chain: g.chain.clone(),
            state: State::default(),
            height: 0,
            time_ms: g.time_ms,
        };
        if g.orgs.is_empty() {
            return Err(LedgerError::Invalid(
                "a network needs at least one organisation".into(),
            ));
        }
        for o in &g.orgs {
            if l.org(&o.id).is_some() {
                return Err(LedgerError::Conflict(format!(
                    "organisation {} twice",
                    o.id
                )));
            }
            contracts::admit_org(
                &mut l.state,
                &o.id,
                o.class,
                &o.ca,
                &o.admin,
                &o.node,
                o.store_key.as_deref(),
            )?;
        }
        l.state.put("chain".into(), &g.chain);
        Ok(l)
    }

    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Blocks applied so far.
    pub fn height(&self) -> u64 {
        self.height
    }

    /// The time of the last block (milliseconds since the Unix epoch, as its proposer set it).
    pub fn time_ms(&self) -> u64 {
        self.time_ms
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn root(&self) -> Digest {
        self.state.root()
    }

    /// Applies a block: its transactions in order, at the block's time (never earlier than the
    /// last block's). Returns one receipt per transaction.
    ///
    /// Every signature of the block is verified in one batch first; when the batch holds,
    /// each transaction's admission skips its own signature checks, and when it does not,
    /// each is checked alone, so that only the forged ones are refused. Either way a
    /// transaction gets the same verdict (see [`medledger_crypto::verify_all`]).
    pub fn apply_block(&mut self, time_ms: u64, txs: &[Tx]) -> Vec<Receipt> {
        self.apply_block_verified(time_ms, txs, &[])
    }

    /// [`Ledger::apply_block`] where the caller has already verified every signature (the
    /// signer's and the endorsers') of the transactions with `verified[i]` (a node, of those
    /// its mempool admitted): those are not verified again. Missing entries count as false.
    /// The verdicts are the same as [`Ledger::apply_block`]'s, provided the flags are true.
    pub fn apply_block_verified(
        &mut self,
        time_ms: u64,
        txs: &[Tx],
        verified: &[bool],
    ) -> Vec<Receipt> {
        self.height += 1;
        self.time_ms = self.time_ms.max(time_ms);
        let known = |i: usize| verified.get(i).copied().unwrap_or(false);
        let bytes: Vec<Vec<u8>> = txs.iter().map(|tx| tx.body.signing_bytes()).collect();
        let signatures: Vec<(VerifyingKey, &[u8], medledger_crypto::Signature)> = txs
            .iter()
            .zip(&bytes)
            .enumerate()
            .filter(|(i, _)| !known(*i))
            .flat_map(|(_, (tx, b))| {
                std::iter::once((tx.body.signer, b.as_slice(), tx.signature)).chain(
                    tx.endorsements
                        .iter()
                        .map(move |e| (e.key, b.as_slice(), e.signature)),
                )
            })
            .collect();
        let all_signed = !signatures.is_empty() && medledger_crypto::verify_all(&signatures);
        txs.iter()
            .zip(&bytes)
            .enumerate()
            .map(|(i, (tx, b))| self.apply(tx, b, known(i) || all_signed))
            .collect()
    }

    /// Whether every signature of `tx` (the signer's and each endorser's) verifies over
    /// `signing_bytes` (its body's [`TxBody::signing_bytes`]): what
    /// [`Ledger::apply_block_verified`] may be told about a transaction.
    pub fn signatures_verify(tx: &Tx, signing_bytes: &[u8]) -> bool {
        tx.body.signer.verify(signing_bytes, &tx.signature)
            && tx
                .endorsements
                .iter()
                .all(|e| e.key.verify(signing_bytes, &e.signature))
    }

    fn apply(&mut self, tx: &Tx, signing_bytes: &[u8], signed: bool) -> Receipt {
        let id = Digest::of(signing_bytes);
        let result = self
            .admit_with(tx, signing_bytes, signed)
            .and_then(|signer| {
                let nonce_key = format!("nonce/{}", tx.body.signer);
                self.state.put(nonce_key, &tx.body.nonce);
                contracts::execute(&mut self.state, self.time_ms, &id, &signer, tx)
            });
        match result {
            Ok(created) => Receipt {
                tx: id,
                created,
                error: None,
            },
            Err(e) => Receipt {
                tx: id,
                created: None,
                error: Some(e),
            },
        }
    }

    /// The checks before an operation runs: chain, signatures, membership, nonce. A mempool
    /// uses it to refuse transactions early.
    pub fn admit(&self, tx: &Tx) -> Result<Member, LedgerError> {
        self.admit_with(tx, &tx.body.signing_bytes(), false)
    }

    /// [`Ledger::admit`] for a transaction whose signing bytes are `bytes`; `signed`: its
    /// signatures were verified already (in a batch), so they are not verified again.
    fn admit_with(&self, tx: &Tx, bytes: &[u8], signed: bool) -> Result<Member, LedgerError> {
        let b = &tx.body;
        if b.chain != self.chain {
            return Err(LedgerError::Invalid(format!(
                "transaction for chain {:?}, this is {:?}",
                b.chain, self.chain
            )));
        }
        if !signed && !b.signer.verify(bytes, &tx.signature) {
            return Err(LedgerError::BadSignature(format!(
                "not signed by {}",
                b.signer.fingerprint()
            )));
        }
        for e in &tx.endorsements {
            if !signed && !e.key.verify(bytes, &e.signature) {
                return Err(LedgerError::BadSignature(format!(
                    "endorsement by {} does not verify",
                    e.key.fingerprint()
                )));
            }
        }
        let member = self.member(&b.signer).filter(|m| m.active).ok_or_else(|| {
            LedgerError::Unauthorized(format!(
                "{} is not an active member",
                b.signer.fingerprint()
            ))
        })?;
        if self.time_ms < member.not_before_ms || self.time_ms > member.not_after_ms {
            return Err(LedgerError::Unauthorized(format!(
                "{}'s certificate is not valid at {} (valid {}..{})",
                b.signer.fingerprint(),
                self.time_ms,
                member.not_before_ms,
                member.not_after_ms
            )));
        }
        if !self.org(&member.org).is_some_and(|o| o.active) {
            return Err(LedgerError::Unauthorized(format!(
                "organisation {} is not active",
                member.org
            )));
        }
        let expected = self.next_nonce(&b.signer);
        if b.nonce != expected {
            return Err(LedgerError::Nonce(format!(
                "{} sent nonce {}, the next is {expected}",
                b.signer.fingerprint(),
                b.nonce
            )));
        }
        Ok(member)
    }

    /// The nonce `signer`'s next transaction must carry.
    pub fn next_nonce(&self, signer: &VerifyingKey) -> u64 {
        self.state
            .get::<u64>(&format!("nonce/{signer}"))
            .unwrap_or(0)
            + 1
    }

    // Queries.

    pub fn org(&self, id: &str) -> Option<Org> {
        self.state.get(&format!("org/{id}"))
    }

    pub fn orgs(&self) -> Vec<Org> {
        self.state.scan("org/")
    }

    pub fn member(&self, key: &VerifyingKey) -> Option<Member> {
        self.state.get(&format!("member/{key}"))
    }

    pub fn study(&self, root: &Digest) -> Option<Study> {
        self.state.get(&format!("study/{root}"))
    }

    /// Every registered study, or one organisation's (the prototype's queryAllRecs).
    pub fn studies(&self, owner: Option<&str>) -> Vec<Study> {
        self.state
            .scan::<Study>("study/")
            .into_iter()
            .filter(|s| owner.is_none_or(|o| s.owner == o))
            .collect()
    }

    /// A pseudonymous patient's studies at every site (prior-image lookup).
    pub fn studies_of_patient(&self, patient: &str) -> Vec<Study> {
        self.state
            .keys(&format!("patient-study/{patient}/"))
            .iter()
            .filter_map(|k| k.rsplit('/').next())
            .filter_map(|h| Digest::from_hex(h).ok())
            .filter_map(|r| self.study(&r))
            .collect()
    }

    pub fn consent(&self, id: &str) -> Option<Consent> {
        self.state.get(&format!("consent/{id}"))
    }

    pub fn consents_of(&self, patient: &str) -> Vec<Consent> {
        contracts::consents_of(&self.state, patient)
    }

    pub fn request(&self, id: &str) -> Option<Request> {
        self.state.get(&format!("request/{id}"))
    }

    pub fn grant(&self, id: &str) -> Option<Grant> {
        self.state.get(&format!("grant/{id}"))
    }

    pub fn grants_of_study(&self, root: &Digest) -> Vec<Grant> {
        self.state
            .keys(&format!("study-grant/{root}/"))
            .iter()
            .filter_map(|k| k.rsplit('/').next())
            .filter_map(|id| self.grant(id))
            .collect()
    }

    /// The patient's view: every grant on their studies and every retrieval of them.
    pub fn patient_view(&self, patient: &str) -> (Vec<Grant>, Vec<AuditEvent>) {
        let studies = self.studies_of_patient(patient);
        let grants = studies
            .iter()
            .flat_map(|s| self.grants_of_study(&s.root))
            .collect();
        let roots: Vec<Digest> = studies.iter().map(|s| s.root).collect();
        let audit = self
            .audit()
            .into_iter()
            .filter(|a| roots.contains(&a.study))
            .collect();
        (grants, audit)
    }

    pub fn audit(&self) -> Vec<AuditEvent> {
        self.state.scan("audit/")
    }

    pub fn datasets(&self) -> Vec<Dataset> {
        self.state.scan("dataset/")
    }

    pub fn proposal(&self, id: &str) -> Option<Proposal> {
        self.state.get(&format!("proposal/{id}"))
    }

    /// Whether organisation `org` may retrieve under `grant` now: the grant is live (not
    /// revoked, not expired) and for `org`, and the patient's consent still covers it (or it
    /// was a recorded break-glass access). A serving node asks this before sending a byte.
    pub fn may_retrieve(&self, grant: &str, org: &str) -> Result<Grant, LedgerError> {
        contracts::may_retrieve(&self.state, self.time_ms, grant, org)
    }
}

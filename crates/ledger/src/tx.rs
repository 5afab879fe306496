//! Transactions: an operation, signed by a member, numbered against replay, with the
//! endorsements its policy asks for.

use medledger_crypto::{Digest, Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::types::{DeidRecord, OrgChange, Purpose, Recipient, Target};

/// Every operation the contracts accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "op")]
pub enum Op {
    // Membership and governance.
    /// Registers a member by the certificate (PEM) their organisation's CA issued; the
    /// certificate gives the key, roles and, for a patient, the pseudonym.
    AddMember {
        certificate: String,
    },
    RemoveMember {
        key: VerifyingKey,
    },
    Propose {
        change: OrgChange,
    },
    Approve {
        proposal: String,
    },
    // Study registry (createRec).
    RegisterStudy {
        root: Digest,
        patient: String,
        modality: String,
        instances: u32,
        bytes: u64,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        derived_from: Option<Digest>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        deid: Option<DeidRecord>,
        /// The earlier version of the same study this one replaces (instances that arrived
        /// after it was registered): same owner, patient and kind.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        supersedes: Option<Digest>,
    },
    // Consent.
    GrantConsent {
        patient: String,
        purpose: Purpose,
        recipient: Recipient,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        expires_ms: Option<u64>,
    },
    RevokeConsent {
        consent: String,
    },
    // Access (requestRec, giveAccess, revokeAccess).
    RequestAccess {
        target: Target,
        purpose: Purpose,
        #[serde(default)]
        break_glass: bool,
    },
    GrantAccess {
        request: String,
        study: Digest,
        envelope: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        expires_ms: Option<u64>,
        #[serde(default)]
        delegable: bool,
    },
    RevokeAccess {
        grant: String,
    },
    Delegate {
        grant: String,
        to_org: String,
        envelope: String,
    },
    // Audit.
    RecordRetrieval {
        grant: String,
        /// The serving node's id for this transfer: recorded once, so a receipt cannot be
        /// replayed.
        session: String,
        objects: u32,
        bytes: u64,
        receiver: VerifyingKey,
        receiver_signature: Signature,
    },
    /// A node refused to serve (`serving`: this node is the owner, `peer` the requester) or
    /// to accept (`serving` false: `peer` served data that failed verification) a transfer.
    RecordRefusal {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        grant: Option<String>,
        peer: String,
        serving: bool,
        reason: String,
    },
    /// An organisation's admin sets the key its node's store opens shared studies with.
    SetStoreKey {
        key: String,
    },
    // Datasets.
    PublishDataset {
        name: String,
        version: u32,
        manifest: Digest,
        studies: Vec<Digest>,
    },
}

/// What a member signs: the chain, who, which number, what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxBody {
    pub chain: String,
    pub signer: VerifyingKey,
    pub nonce: u64,
    pub op: Op,
}

impl TxBody {
    /// The canonical bytes that are signed and endorsed.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = b"medledger tx v1\n".to_vec();
        out.extend(serde_json::to_vec(self).expect("a transaction body serialises"));
        out
    }
}

/// An endorsement: another member's signature of the same body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsement {
    pub key: VerifyingKey,
    pub signature: Signature,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tx {
    pub body: TxBody,
    pub signature: Signature,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endorsements: Vec<Endorsement>,
}

impl Tx {
    /// Signs `op` as `signer`'s transaction number `nonce` on `chain`.
    pub fn sign(chain: &str, signer: &SigningKey, nonce: u64, op: Op) -> Tx {
        let body = TxBody {
            chain: chain.to_string(),
            signer: signer.verifying_key(),
            nonce,
            op,
        };
        let signature = signer.sign(&body.signing_bytes());
        Tx {
            body,
            signature,
            endorsements: Vec::new(),
        }
    }

    /// Adds `endorser`'s signature of the body.
    pub fn endorse(mut self, endorser: &SigningKey) -> Tx {
        let signature = endorser.sign(&self.body.signing_bytes());
        self.endorsements.push(Endorsement {
            key: endorser.verifying_key(),
            signature,
        });
        self
    }

    /// The transaction's id: the digest of its signed body.
    pub fn id(&self) -> Digest {
        Digest::of(&self.body.signing_bytes())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a transaction serialises")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Tx, crate::LedgerError> {
        serde_json::from_slice(bytes)
            .map_err(|e| crate::LedgerError::Invalid(format!("not a transaction: {e}")))
    }
}

/// The bytes a receiving node signs to acknowledge a retrieval.
pub fn retrieval_statement(grant: &str, session: &str, objects: u32, bytes: u64) -> Vec<u8> {
    format!("medledger retrieval v2\n{grant}\n{session}\n{objects}\n{bytes}").into_bytes()
}

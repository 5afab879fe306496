//! The vocabulary of the ledger: organisations, roles, purposes, pseudonyms, and the records
//! the contracts keep.

use medledger_crypto::{Digest, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::LedgerError;

/// An organisation's short name: 1 to 32 of `a-z 0-9 -`, as in `hospital-a`.
pub fn check_org_id(id: &str) -> Result<(), LedgerError> {
    let ok = (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(LedgerError::Invalid(format!(
            "organisation id {id:?} must be 1-32 of a-z, 0-9, -"
        )))
    }
}

/// A patient pseudonym as the de-identification key makes it: `ML` and 16 base32 letters
/// (80 bits of a keyed HMAC).
/// Nothing else is accepted where a patient is named, so no identifier can enter a
/// transaction by mistake (a name, an MRN, a birth date all fail this check).
pub fn check_pseudonym(p: &str) -> Result<(), LedgerError> {
    let ok = p.len() == 18
        && p.starts_with("ML")
        && p[2..]
            .bytes()
            .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(&c));
    if ok {
        Ok(())
    } else {
        Err(LedgerError::Invalid(
            "a patient is named on the ledger only by a keyed pseudonym (ML + 16 base32 letters)"
                .into(),
        ))
    }
}

/// What kind of organisation a member belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrgClass {
    Hospital,
    Research,
    PatientAgent,
}

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Admin,
    Clinician,
    Researcher,
    Patient,
    Auditor,
    EthicsBoard,
    /// A node: serves and receives studies, signs audit events.
    Node,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Admin,
        Role::Clinician,
        Role::Researcher,
        Role::Patient,
        Role::Auditor,
        Role::EthicsBoard,
        Role::Node,
    ];

    /// The role's name in certificates and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Clinician => "clinician",
            Role::Researcher => "researcher",
            Role::Patient => "patient",
            Role::Auditor => "auditor",
            Role::EthicsBoard => "ethics-board",
            Role::Node => "node",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Why data is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    Care,
    Research,
}

/// Whom a consent covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recipient {
    Org(String),
    Class(OrgClass),
    AnyMember,
}

/// An organisation as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Org {
    pub id: String,
    pub class: OrgClass,
    pub active: bool,
    /// The organisation's CA certificate (PEM): every member's certificate chains to it.
    pub ca: String,
    /// The X25519 public key (text form) its node's store opens studies with: grants to this
    /// organisation carry study keys wrapped for it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub store_key: Option<String>,
}

/// A member identity, from the certificate its organisation's CA issued: the key, the
/// organisation, the roles, for a patient the pseudonym they act for, and the validity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub key: VerifyingKey,
    pub org: String,
    pub name: String,
    pub roles: Vec<Role>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub patient: Option<String>,
    pub active: bool,
    /// The digest of the member's certificate (DER).
    pub certificate: Digest,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

impl Member {
    pub fn has(&self, role: Role) -> bool {
        self.active && self.roles.contains(&role)
    }
}

/// How a derivative was de-identified (from the deid provenance record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeidRecord {
    pub profile: String,
    pub options: Vec<String>,
    pub table_edition: String,
    pub key_id: String,
}

/// A registered study: the store's manifest root and what may be said about it openly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Study {
    pub root: Digest,
    pub owner: String,
    pub patient: String,
    pub modality: String,
    pub instances: u32,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub derived_from: Option<Digest>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deid: Option<DeidRecord>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub supersedes: Option<Digest>,
    pub registered_at: u64,
}

impl Study {
    /// De-identified derivatives are what research may see.
    pub fn is_derivative(&self) -> bool {
        self.derived_from.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub id: String,
    pub patient: String,
    pub purpose: Purpose,
    pub recipient: Recipient,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expires_ms: Option<u64>,
    pub granted_at: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub revoked_at: Option<u64>,
}

impl Consent {
    /// Whether the consent covers `org` (of `class`) for `purpose` at time `now`.
    pub fn covers(&self, purpose: Purpose, org: &str, class: OrgClass, now: u64) -> bool {
        self.revoked_at.is_none()
            && self.purpose == purpose
            && self.expires_ms.is_none_or(|e| now < e)
            && match &self.recipient {
                Recipient::Org(o) => o == org,
                Recipient::Class(c) => *c == class,
                Recipient::AnyMember => true,
            }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Study(Digest),
    /// Every study of a pseudonymous patient (prior-image lookup).
    Patient(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub org: String,
    pub requester: VerifyingKey,
    pub target: Target,
    pub purpose: Purpose,
    /// Emergency care access without consent: allowed, and flagged in the audit trail.
    pub break_glass: bool,
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub request: String,
    pub study: Digest,
    /// The organisation that may retrieve.
    pub grantee: String,
    pub purpose: Purpose,
    pub break_glass: bool,
    /// The study's manifest key wrapped for the grantee (an HPKE envelope, as JSON).
    pub envelope: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expires_ms: Option<u64>,
    pub delegable: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delegated_from: Option<String>,
    pub granted_at: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub revoked_at: Option<u64>,
}

/// One audit event: a retrieval, signed by the serving and the receiving node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub seq: u64,
    pub grant: String,
    pub study: Digest,
    pub server_org: String,
    pub receiver_org: String,
    pub objects: u32,
    pub bytes: u64,
    pub break_glass: bool,
    pub at: u64,
    /// For a refusal: why nothing (or not everything) was delivered.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub refused: Option<String>,
    /// The organisation whose node recorded the event.
    #[serde(default)]
    pub recorded_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    pub name: String,
    pub version: u32,
    pub org: String,
    pub manifest: Digest,
    pub studies: Vec<Digest>,
    pub endorsed_by: Vec<VerifyingKey>,
    pub at: u64,
}

/// A governance proposal: admit or remove an organisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: String,
    pub change: OrgChange,
    pub approvals: Vec<String>,
    pub executed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrgChange {
    Add {
        org: String,
        class: OrgClass,
        /// The new organisation's CA certificate and its admin's and node's certificates (PEM).
        ca: String,
        admin: String,
        node: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        store_key: Option<String>,
    },
    Remove {
        org: String,
    },
}

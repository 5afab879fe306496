//! The contracts: each operation checks everything first and writes only when every check
//! passed, so a refused operation leaves the state as it was.

use medledger_crypto::{Certificate, Digest};

use crate::LedgerError;
use crate::identity;
use crate::state::State;
use crate::tx::{Op, Tx, retrieval_statement};
use crate::types::*;

type Result<T> = std::result::Result<T, LedgerError>;

fn unauthorized(msg: impl Into<String>) -> LedgerError {
    LedgerError::Unauthorized(msg.into())
}

fn invalid(msg: impl Into<String>) -> LedgerError {
    LedgerError::Invalid(msg.into())
}

/// An id for what a transaction creates: the first 16 bytes of its id, in hex.
fn new_id(tx: &Digest) -> String {
    tx.to_hex()[..32].to_string()
}

fn org(state: &State, id: &str) -> Result<Org> {
    state
        .get::<Org>(&format!("org/{id}"))
        .filter(|o| o.active)
        .ok_or_else(|| LedgerError::NotFound(format!("no active organisation {id}")))
}

fn study(state: &State, root: &Digest) -> Result<Study> {
    state
        .get(&format!("study/{root}"))
        .ok_or_else(|| LedgerError::NotFound(format!("no study {root}")))
}

fn require_any(m: &Member, roles: &[Role], what: &str) -> Result<()> {
    if roles.iter().any(|r| m.has(*r)) {
        Ok(())
    } else {
        Err(unauthorized(format!(
            "{what} needs one of the roles {roles:?}; {} has {:?}",
            m.key.fingerprint(),
            m.roles
        )))
    }
}

/// A member record from a certificate `ca` issued; checks the chain and the roles.
fn member_from_cert(ca: &Certificate, pem: &str) -> Result<Member> {
    let cert = identity::parse_certificate(pem)?;
    cert.verify_issued_by(ca)
        .map_err(|e| unauthorized(e.to_string()))?;
    if cert.is_ca {
        return Err(invalid("a CA certificate is not a member identity"));
    }
    let roles = identity::roles_of(&cert)?;
    match (roles.contains(&Role::Patient), &cert.pseudonym) {
        (true, Some(p)) => check_pseudonym(p)?,
        (true, None) => return Err(invalid("a patient's certificate names their pseudonym")),
        (false, Some(_)) => return Err(invalid("only a patient's certificate has a pseudonym")),
        (false, None) => {}
    }
    Ok(Member {
        key: cert.key,
        org: cert.org.clone(),
        name: cert.name.clone(),
        roles,
        patient: cert.pseudonym.clone(),
        active: true,
        certificate: cert.fingerprint(),
        not_before_ms: cert.not_before_ms,
        not_after_ms: cert.not_after_ms,
    })
}

/// The checks of a new organisation: its CA, its admin's and node's certificates.
fn check_new_org(
    state: &State,
    id: &str,
    ca: &str,
    admin: &str,
    node: &str,
) -> Result<(Certificate, Member, Member)> {
    check_org_id(id)?;
    if state.get_raw(&format!("org/{id}")).is_some() {
        return Err(LedgerError::Conflict(format!("organisation {id} exists")));
    }
    let ca = identity::check_ca(ca, id)?;
    let admin = member_from_cert(&ca, admin)?;
    let node = member_from_cert(&ca, node)?;
    if admin.roles != [Role::Admin] || node.roles != [Role::Node] {
        return Err(invalid(
            "an organisation starts with one admin certificate (role admin) and one node \
             certificate (role node)",
        ));
    }
    if admin.key == node.key {
        return Err(invalid("an organisation's admin and node keys must differ"));
    }
    for k in [admin.key, node.key] {
        if state.get_raw(&format!("member/{k}")).is_some() {
            return Err(LedgerError::Conflict(format!(
                "key {} is already a member",
                k.fingerprint()
            )));
        }
    }
    Ok((ca, admin, node))
}

pub(crate) fn admit_org(
    state: &mut State,
    id: &str,
    class: OrgClass,
    ca: &str,
    admin: &str,
    node: &str,
    store_key: Option<&str>,
) -> Result<()> {
    let (ca, admin, node) = check_new_org(state, id, ca, admin, node)?;
    if let Some(k) = store_key {
        check_store_key(k)?;
    }
    state.put(
        format!("org/{id}"),
        &Org {
            id: id.to_string(),
            class,
            active: true,
            ca: ca.to_pem(),
            store_key: store_key.map(str::to_string),
        },
    );
    for m in [admin, node] {
        state.put(format!("member/{}", m.key), &m);
    }
    Ok(())
}

/// A store key is an X25519 public key in its text form (`medledger-x25519-v1:...`).
fn check_store_key(k: &str) -> Result<()> {
    medledger_crypto::PublicKey::from_text(k)
        .map(|_| ())
        .map_err(|e| invalid(format!("store key: {e}")))
}

/// Appends `id` to a sequence (`{name}-seq/{n}`), so that followers read new entries in order.
fn append_seq(state: &mut State, name: &str, id: &str) {
    let counter = format!("{name}-count");
    let n: u64 = state.get(&counter).unwrap_or(0) + 1;
    state.put(counter, &n);
    state.put(format!("{name}-seq/{n:016}"), &id.to_string());
}

pub(crate) fn consents_of(state: &State, patient: &str) -> Vec<Consent> {
    state
        .keys(&format!("patient-consent/{patient}/"))
        .iter()
        .filter_map(|k| k.rsplit('/').next())
        .filter_map(|id| state.get(&format!("consent/{id}")))
        .collect()
}

fn consent_covers(state: &State, patient: &str, purpose: Purpose, org: &Org, now: u64) -> bool {
    consents_of(state, patient)
        .iter()
        .any(|c| c.covers(purpose, &org.id, org.class, now))
}

/// Whether `signer` may speak for `patient`: the patient's own identity, or a member of a
/// patients' agent organisation acting for them.
fn speaks_for(signer: &Member, org_class: OrgClass, patient: &str) -> bool {
    (signer.has(Role::Patient) && signer.patient.as_deref() == Some(patient))
        || (org_class == OrgClass::PatientAgent
            && (signer.has(Role::Admin) || signer.has(Role::Clinician)))
}

pub(crate) fn may_retrieve(state: &State, now: u64, grant_id: &str, org_id: &str) -> Result<Grant> {
    let g: Grant = state
        .get(&format!("grant/{grant_id}"))
        .ok_or_else(|| LedgerError::NotFound(format!("no grant {grant_id}")))?;
    if g.grantee != org_id {
        return Err(unauthorized(format!(
            "grant {grant_id} is not for {org_id}"
        )));
    }
    if let Some(at) = g.revoked_at {
        return Err(unauthorized(format!(
            "grant {grant_id} was revoked at {at}"
        )));
    }
    if g.expires_ms.is_some_and(|e| now >= e) {
        return Err(unauthorized(format!("grant {grant_id} has expired")));
    }
    // A delegated grant lives only as long as the grant it was delegated from.
    if let Some(parent) = &g.delegated_from {
        let p: Grant = state
            .get(&format!("grant/{parent}"))
            .ok_or_else(|| LedgerError::NotFound(format!("no grant {parent}")))?;
        if p.revoked_at.is_some() || p.expires_ms.is_some_and(|e| now >= e) {
            return Err(unauthorized(format!(
                "grant {grant_id} was delegated from grant {parent}, which is no longer live"
            )));
        }
    }
    if !g.break_glass {
        let s = study(state, &g.study)?;
        let o = org(state, org_id)?;
        if !consent_covers(state, &s.patient, g.purpose, &o, now) {
            return Err(LedgerError::NoConsent(format!(
                "the patient's consent no longer covers {org_id} for {:?}",
                g.purpose
            )));
        }
    }
    Ok(g)
}

/// Runs the operation of an admitted transaction.
pub(crate) fn execute(
    state: &mut State,
    now: u64,
    tx_id: &Digest,
    signer: &Member,
    tx: &Tx,
) -> Result<Option<String>> {
    let signer_org = org(state, &signer.org)?;
    match &tx.body.op {
        Op::AddMember { certificate } => {
            require_any(signer, &[Role::Admin], "adding a member")?;
            let ca = identity::parse_certificate(&signer_org.ca)?;
            let m = member_from_cert(&ca, certificate)?;
            if m.org != signer.org {
                return Err(unauthorized(
                    "an admin adds members of their own organisation",
                ));
            }
            if now > m.not_after_ms {
                return Err(invalid(format!("{}'s certificate has expired", m.name)));
            }
            if m.roles.contains(&Role::Patient) && signer_org.class != OrgClass::PatientAgent {
                return Err(unauthorized(
                    "patient identities are issued by a patients' agent organisation",
                ));
            }
            if state.get_raw(&format!("member/{}", m.key)).is_some() {
                return Err(LedgerError::Conflict(format!(
                    "{} is already a member",
                    m.key.fingerprint()
                )));
            }
            let key = m.key;
            state.put(format!("member/{key}"), &m);
            Ok(Some(key.to_string()))
        }
        Op::RemoveMember { key } => {
            require_any(signer, &[Role::Admin], "removing a member")?;
            let mut m: Member = state
                .get(&format!("member/{key}"))
                .ok_or_else(|| LedgerError::NotFound(format!("no member {}", key.fingerprint())))?;
            if m.org != signer.org {
                return Err(unauthorized(
                    "an admin removes members of their own organisation",
                ));
            }
            m.active = false;
            state.put(format!("member/{key}"), &m);
            Ok(None)
        }
        Op::Propose { change } => {
            require_any(signer, &[Role::Admin], "a governance proposal")?;
            match change {
                OrgChange::Add {
                    org: id,
                    ca,
                    admin,
                    node,
                    store_key,
                    ..
                } => {
                    check_new_org(state, id, ca, admin, node)?;
                    if let Some(k) = store_key {
                        check_store_key(k)?;
                    }
                }
                OrgChange::Remove { org: id } => {
                    org(state, id)?;
                }
            }
            let id = new_id(tx_id);
            let p = Proposal {
                id: id.clone(),
                change: change.clone(),
                approvals: vec![signer.org.clone()],
                executed: false,
            };
            finish_proposal(state, p)?;
            Ok(Some(id))
        }
        Op::Approve { proposal } => {
            require_any(signer, &[Role::Admin], "approving a proposal")?;
            let mut p: Proposal = state
                .get(&format!("proposal/{proposal}"))
                .ok_or_else(|| LedgerError::NotFound(format!("no proposal {proposal}")))?;
            if p.executed {
                return Err(LedgerError::Conflict(format!(
                    "proposal {proposal} already executed"
                )));
            }
            if p.approvals.contains(&signer.org) {
                return Err(LedgerError::Conflict(format!(
                    "{} already approved proposal {proposal}",
                    signer.org
                )));
            }
            p.approvals.push(signer.org.clone());
            p.approvals.sort();
            finish_proposal(state, p)?;
            Ok(None)
        }
        Op::RegisterStudy {
            root,
            patient,
            modality,
            instances,
            bytes,
            derived_from,
            deid,
            supersedes,
        } => {
            require_any(
                signer,
                &[Role::Clinician, Role::Node, Role::Admin],
                "registering a study",
            )?;
            check_pseudonym(patient)?;
            if modality.is_empty()
                || modality.len() > 16
                || !modality
                    .bytes()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            {
                return Err(invalid(format!(
                    "modality {modality:?} is not a DICOM modality code"
                )));
            }
            if state.get_raw(&format!("study/{root}")).is_some() {
                return Err(LedgerError::Conflict(format!(
                    "study {root} is already registered"
                )));
            }
            if let Some(orig) = derived_from {
                let o = study(state, orig)?;
                if o.owner != signer.org {
                    return Err(unauthorized(
                        "a derivative is registered by its original's owner",
                    ));
                }
                if o.is_derivative() {
                    return Err(invalid(
                        "a derivative is made from an original, not another derivative",
                    ));
                }
                if o.patient != *patient {
                    return Err(invalid("a derivative has its original's patient pseudonym"));
                }
                if deid.is_none() {
                    return Err(invalid("a derivative carries its de-identification record"));
                }
            } else if deid.is_some() {
                return Err(invalid(
                    "only a derivative carries a de-identification record",
                ));
            }
            if let Some(old) = supersedes {
                let o = study(state, old)?;
                if o.owner != signer.org {
                    return Err(unauthorized("a study version is replaced by its owner"));
                }
                if o.patient != *patient || o.derived_from.is_some() != derived_from.is_some() {
                    return Err(invalid(
                        "a new version has the patient and the kind (original or derivative) of the one it replaces",
                    ));
                }
                if let Some(newer) = state.get_raw(&format!("superseded/{old}")) {
                    return Err(LedgerError::Conflict(format!(
                        "study {old} was already replaced by {}",
                        String::from_utf8_lossy(newer).trim_matches('"')
                    )));
                }
                state.put(format!("superseded/{old}"), &root.to_hex());
            }
            state.put(
                format!("study/{root}"),
                &Study {
                    root: *root,
                    owner: signer.org.clone(),
                    patient: patient.clone(),
                    modality: modality.clone(),
                    instances: *instances,
                    bytes: *bytes,
                    derived_from: *derived_from,
                    deid: deid.clone(),
                    supersedes: *supersedes,
                    registered_at: now,
                },
            );
            state.put(format!("patient-study/{patient}/{root}"), &true);
            Ok(Some(root.to_hex()))
        }
        Op::GrantConsent {
            patient,
            purpose,
            recipient,
            expires_ms,
        } => {
            check_pseudonym(patient)?;
            if !speaks_for(signer, signer_org.class, patient) {
                return Err(unauthorized(
                    "consent is given by the patient or their agent organisation",
                ));
            }
            if let Recipient::Org(o) = recipient {
                org(state, o)?;
            }
            if expires_ms.is_some_and(|e| e <= now) {
                return Err(invalid("the consent would already have expired"));
            }
            let id = new_id(tx_id);
            state.put(
                format!("consent/{id}"),
                &Consent {
                    id: id.clone(),
                    patient: patient.clone(),
                    purpose: *purpose,
                    recipient: recipient.clone(),
                    expires_ms: *expires_ms,
                    granted_at: now,
                    revoked_at: None,
                },
            );
            state.put(format!("patient-consent/{patient}/{id}"), &true);
            Ok(Some(id))
        }
        Op::RevokeConsent { consent } => {
            let mut c: Consent = state
                .get(&format!("consent/{consent}"))
                .ok_or_else(|| LedgerError::NotFound(format!("no consent {consent}")))?;
            if !speaks_for(signer, signer_org.class, &c.patient) {
                return Err(unauthorized(
                    "consent is revoked by the patient or their agent organisation",
                ));
            }
            if c.revoked_at.is_some() {
                return Err(LedgerError::Conflict(format!(
                    "consent {consent} already revoked"
                )));
            }
            c.revoked_at = Some(now);
            state.put(format!("consent/{consent}"), &c);
            Ok(None)
        }
        Op::RequestAccess {
            target,
            purpose,
            break_glass,
        } => {
            match purpose {
                Purpose::Care => require_any(signer, &[Role::Clinician], "a request for care")?,
                Purpose::Research => {
                    require_any(signer, &[Role::Researcher], "a request for research")?
                }
            }
            if *break_glass && *purpose != Purpose::Care {
                return Err(invalid("break-glass access is for emergency care only"));
            }
            match target {
                Target::Study(root) => {
                    let s = study(state, root)?;
                    if s.owner == signer.org {
                        return Err(invalid("an organisation needs no grant for its own study"));
                    }
                }
                Target::Patient(p) => check_pseudonym(p)?,
            }
            let id = new_id(tx_id);
            state.put(
                format!("request/{id}"),
                &Request {
                    id: id.clone(),
                    org: signer.org.clone(),
                    requester: signer.key,
                    target: target.clone(),
                    purpose: *purpose,
                    break_glass: *break_glass,
                    at: now,
                },
            );
            append_seq(state, "request", &id);
            Ok(Some(id))
        }
        Op::GrantAccess {
            request,
            study: root,
            envelope,
            expires_ms,
            delegable,
        } => {
            require_any(
                signer,
                &[Role::Admin, Role::Clinician, Role::Node],
                "granting access",
            )?;
            let r: Request = state
                .get(&format!("request/{request}"))
                .ok_or_else(|| LedgerError::NotFound(format!("no request {request}")))?;
            let s = study(state, root)?;
            if s.owner != signer.org {
                return Err(unauthorized("access is granted by the study's owner"));
            }
            let matches = match &r.target {
                Target::Study(t) => t == root,
                Target::Patient(p) => *p == s.patient,
            };
            if !matches {
                return Err(invalid(format!(
                    "study {root} is not what request {request} asked for"
                )));
            }
            if r.purpose == Purpose::Research && !s.is_derivative() {
                return Err(unauthorized(
                    "research sees de-identified derivatives only, never identified originals",
                ));
            }
            let grantee = org(state, &r.org)?;
            if !r.break_glass && !consent_covers(state, &s.patient, r.purpose, &grantee, now) {
                return Err(LedgerError::NoConsent(format!(
                    "the patient has not consented to {} for {:?}",
                    r.org, r.purpose
                )));
            }
            check_envelope(envelope)?;
            if expires_ms.is_some_and(|e| e <= now) {
                return Err(invalid("the grant would already have expired"));
            }
            let once = format!("request-grant/{request}/{root}");
            if state.get_raw(&once).is_some() {
                return Err(LedgerError::Conflict(format!(
                    "request {request} already has a grant for study {root}"
                )));
            }
            let id = new_id(tx_id);
            state.put(once, &id);
            put_grant(
                state,
                Grant {
                    id: id.clone(),
                    request: request.clone(),
                    study: *root,
                    grantee: r.org.clone(),
                    purpose: r.purpose,
                    break_glass: r.break_glass,
                    envelope: envelope.clone(),
                    expires_ms: *expires_ms,
                    delegable: *delegable,
                    delegated_from: None,
                    granted_at: now,
                    revoked_at: None,
                },
            );
            Ok(Some(id))
        }
        Op::RevokeAccess { grant } => {
            let mut g: Grant = state
                .get(&format!("grant/{grant}"))
                .ok_or_else(|| LedgerError::NotFound(format!("no grant {grant}")))?;
            let s = study(state, &g.study)?;
            let owner_side =
                s.owner == signer.org && (signer.has(Role::Admin) || signer.has(Role::Clinician));
            let grantee_side = g.grantee == signer.org && signer.has(Role::Admin);
            // Whoever delegated a grant may take it back.
            let delegator_side = g
                .delegated_from
                .as_ref()
                .and_then(|p| state.get::<Grant>(&format!("grant/{p}")))
                .is_some_and(|p| {
                    p.grantee == signer.org
                        && (signer.has(Role::Admin) || signer.has(Role::Clinician))
                });
            let patient_side = speaks_for(signer, signer_org.class, &s.patient);
            if !(owner_side || grantee_side || delegator_side || patient_side) {
                return Err(unauthorized(
                    "a grant is revoked by the study's owner, the grantee's admin, whoever delegated it, or the patient",
                ));
            }
            if g.revoked_at.is_some() {
                return Err(LedgerError::Conflict(format!(
                    "grant {grant} already revoked"
                )));
            }
            g.revoked_at = Some(now);
            state.put(format!("grant/{grant}"), &g);
            Ok(None)
        }
        Op::Delegate {
            grant,
            to_org,
            envelope,
        } => {
            let g = may_retrieve(state, now, grant, &signer.org)?;
            require_any(
                signer,
                &[Role::Admin, Role::Clinician, Role::Researcher],
                "delegating a grant",
            )?;
            if !g.delegable {
                return Err(unauthorized(format!(
                    "grant {grant} does not allow delegation"
                )));
            }
            let to = org(state, to_org)?;
            let s = study(state, &g.study)?;
            if to_org == &signer.org || to_org == &s.owner {
                return Err(invalid(format!(
                    "{to_org} needs no delegation: it holds the grant or owns the study"
                )));
            }
            if !s.is_derivative() && to.class != OrgClass::Hospital {
                return Err(unauthorized(
                    "an identified original is delegated to hospitals (for care) only",
                ));
            }
            if !consent_covers(state, &s.patient, g.purpose, &to, now) {
                return Err(LedgerError::NoConsent(format!(
                    "the patient has not consented to {to_org} for {:?}",
                    g.purpose
                )));
            }
            check_envelope(envelope)?;
            let id = new_id(tx_id);
            put_grant(
                state,
                Grant {
                    id: id.clone(),
                    request: g.request.clone(),
                    study: g.study,
                    grantee: to_org.clone(),
                    purpose: g.purpose,
                    break_glass: false,
                    envelope: envelope.clone(),
                    expires_ms: g.expires_ms,
                    delegable: false,
                    delegated_from: Some(g.id.clone()),
                    granted_at: now,
                    revoked_at: None,
                },
            );
            Ok(Some(id))
        }
        Op::RecordRetrieval {
            grant,
            session,
            objects,
            bytes,
            receiver,
            receiver_signature,
        } => {
            require_any(signer, &[Role::Node], "recording a retrieval")?;
            let g: Grant = state
                .get(&format!("grant/{grant}"))
                .ok_or_else(|| LedgerError::NotFound(format!("no grant {grant}")))?;
            let s = study(state, &g.study)?;
            if s.owner != signer.org {
                return Err(unauthorized(
                    "a retrieval is recorded by the serving (owner's) node",
                ));
            }
            if session.is_empty() || session.len() > 64 {
                return Err(invalid("a retrieval session id is 1-64 characters"));
            }
            let once = format!("retrieval-session/{session}");
            if state.get_raw(&once).is_some() {
                return Err(LedgerError::Conflict(format!(
                    "retrieval session {session} is already recorded (replayed receipt)"
                )));
            }
            let r: Member = state
                .get::<Member>(&format!("member/{receiver}"))
                .filter(|m| m.has(Role::Node) && m.org == g.grantee)
                .ok_or_else(|| unauthorized("the receiver is not a node of the grantee"))?;
            if !r.key.verify(
                &retrieval_statement(grant, session, *objects, *bytes),
                receiver_signature,
            ) {
                return Err(LedgerError::BadSignature(
                    "the receiving node's signature does not verify".into(),
                ));
            }
            state.put(once, &true);
            let seq = put_audit(
                state,
                AuditEvent {
                    seq: 0,
                    grant: grant.clone(),
                    study: g.study,
                    server_org: signer.org.clone(),
                    receiver_org: g.grantee.clone(),
                    objects: *objects,
                    bytes: *bytes,
                    break_glass: g.break_glass,
                    at: now,
                    refused: None,
                    recorded_by: signer.org.clone(),
                },
            );
            Ok(Some(seq.to_string()))
        }
        Op::RecordRefusal {
            grant,
            peer,
            serving,
            reason,
        } => {
            require_any(signer, &[Role::Node], "recording a refusal")?;
            if reason.is_empty() || reason.len() > 512 {
                return Err(invalid("a refusal's reason is 1-512 characters"));
            }
            check_org_id(peer)?;
            if peer == &signer.org {
                return Err(invalid("a node does not refuse its own organisation"));
            }
            let g: Option<Grant> = match grant {
                Some(id) => Some(
                    state
                        .get(&format!("grant/{id}"))
                        .ok_or_else(|| LedgerError::NotFound(format!("no grant {id}")))?,
                ),
                None => None,
            };
            let (server_org, receiver_org) = if *serving {
                (signer.org.clone(), peer.clone())
            } else {
                (peer.clone(), signer.org.clone())
            };
            if let Some(g) = &g {
                // Either side of the grant may record a refusal of it, nobody else.
                let owner = study(state, &g.study)?.owner;
                if owner != signer.org && g.grantee != signer.org {
                    return Err(unauthorized(
                        "a refusal is recorded by the study's owner or the grantee",
                    ));
                }
                if owner != server_org {
                    return Err(invalid(
                        "the serving side of a refusal is the study's owner",
                    ));
                }
            }
            let seq = put_audit(
                state,
                AuditEvent {
                    seq: 0,
                    grant: grant.clone().unwrap_or_default(),
                    study: g.as_ref().map(|g| g.study).unwrap_or_default(),
                    server_org,
                    receiver_org,
                    objects: 0,
                    bytes: 0,
                    break_glass: g.as_ref().is_some_and(|g| g.break_glass),
                    at: now,
                    refused: Some(reason.clone()),
                    recorded_by: signer.org.clone(),
                },
            );
            Ok(Some(seq.to_string()))
        }
        Op::SetStoreKey { key } => {
            require_any(signer, &[Role::Admin], "setting the store key")?;
            check_store_key(key)?;
            let mut o = signer_org;
            o.store_key = Some(key.clone());
            state.put(format!("org/{}", o.id), &o);
            Ok(None)
        }
        Op::PublishDataset {
            name,
            version,
            manifest,
            studies,
        } => {
            require_any(signer, &[Role::Researcher], "publishing a dataset")?;
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c))
            {
                return Err(invalid("a dataset name is 1-64 of a-z 0-9 - _ ."));
            }
            let latest = state.keys(&format!("dataset/{name}/")).len() as u32;
            if *version != latest + 1 {
                return Err(LedgerError::Conflict(format!(
                    "dataset {name} is at version {latest}; the next is {}",
                    latest + 1
                )));
            }
            if studies.is_empty() {
                return Err(invalid("a dataset lists at least one study"));
            }
            // Endorsement policy: the ethics board, and every data owner.
            let endorsers: Vec<Member> = tx
                .endorsements
                .iter()
                .filter_map(|e| state.get::<Member>(&format!("member/{}", e.key)))
                .filter(|m| m.active)
                .collect();
            if !endorsers.iter().any(|m| m.has(Role::EthicsBoard)) {
                return Err(unauthorized(
                    "a dataset release needs an ethics board endorsement",
                ));
            }
            let live_research_grant = |root: &Digest| {
                state
                    .keys(&format!("study-grant/{root}/"))
                    .iter()
                    .filter_map(|k| k.rsplit('/').next())
                    .any(|id| {
                        may_retrieve(state, now, id, &signer.org)
                            .is_ok_and(|g| g.purpose == Purpose::Research)
                    })
            };
            for root in studies {
                let s = study(state, root)?;
                if !s.is_derivative() {
                    return Err(unauthorized(format!(
                        "study {root} is an identified original: datasets hold derivatives only"
                    )));
                }
                if !live_research_grant(root) {
                    return Err(unauthorized(format!(
                        "{} holds no live research grant for study {root}",
                        signer.org
                    )));
                }
                if !endorsers
                    .iter()
                    .any(|m| m.org == s.owner && m.has(Role::Admin))
                {
                    return Err(unauthorized(format!(
                        "a dataset release needs the endorsement of data owner {}",
                        s.owner
                    )));
                }
            }
            let mut studies = studies.clone();
            studies.sort();
            studies.dedup();
            state.put(
                format!("dataset/{name}/{version:08}"),
                &Dataset {
                    name: name.clone(),
                    version: *version,
                    org: signer.org.clone(),
                    manifest: *manifest,
                    studies,
                    endorsed_by: endorsers.iter().map(|m| m.key).collect(),
                    at: now,
                },
            );
            Ok(Some(format!("{name}/{version}")))
        }
    }
}

fn check_envelope(envelope: &str) -> Result<()> {
    if envelope.is_empty() || envelope.len() > 4096 {
        return Err(invalid(
            "a grant carries the wrapped study key (1 to 4096 bytes)",
        ));
    }
    Ok(())
}

/// Appends an audit event; returns its sequence number.
fn put_audit(state: &mut State, mut e: AuditEvent) -> u64 {
    let seq: u64 = state.get("audit-seq").unwrap_or(0) + 1;
    state.put("audit-seq".into(), &seq);
    e.seq = seq;
    state.put(format!("audit/{seq:016}"), &e);
    seq
}

fn put_grant(state: &mut State, g: Grant) {
    append_seq(state, "grant", &g.id);
    state.put(format!("study-grant/{}/{}", g.study, g.id), &true);
    state.put(format!("grant/{}", g.id), &g);
}

/// Stores a proposal and executes it once a majority of active organisations approved.
fn finish_proposal(state: &mut State, mut p: Proposal) -> Result<()> {
    let active = state
        .scan::<Org>("org/")
        .into_iter()
        .filter(|o| o.active)
        .count();
    let quorum = active / 2 + 1;
    if p.approvals.len() >= quorum {
        match &p.change {
            OrgChange::Add {
                org: id,
                class,
                ca,
                admin,
                node,
                store_key,
            } => admit_org(state, id, *class, ca, admin, node, store_key.as_deref())?,
            OrgChange::Remove { org: id } => {
                let mut o = org(state, id)?;
                o.active = false;
                state.put(format!("org/{id}"), &o);
            }
        }
        p.executed = true;
    }
    state.put(format!("proposal/{}", p.id), &p);
    Ok(())
}

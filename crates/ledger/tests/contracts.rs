//! The contracts as the story of issue and retrieval goes: a network of four organisations,
//! a study registered with its derivative, consent, requests, grants, delegation, retrieval
//! audit, revocation, datasets, governance; and every refusal a forged, replayed or
//! unauthorised transaction must meet.

use medledger_crypto::{Digest, SigningKey};
use medledger_ledger::*;

const CHAIN: &str = "medledger-test";
const PATIENT: &str = "MLABCDEFGHIJKLMNOP";
const OTHER_PATIENT: &str = "MLQRSTUVWXYZ234567";

fn key(n: u8) -> SigningKey {
    SigningKey::from_seed([n; 32])
}

const ORGS: [(&str, OrgClass); 5] = [
    ("hospital-a", OrgClass::Hospital),
    ("hospital-b", OrgClass::Hospital),
    ("research", OrgClass::Research),
    ("patients", OrgClass::PatientAgent),
    ("hospital-c", OrgClass::Hospital),
];

/// Organisation `i`'s certificate authority (its key is 41 + i).
fn ca(i: usize) -> identity::OrgCa {
    identity::OrgCa::new(ORGS[i].0, key(41 + i as u8), identity::FOREVER_MS).unwrap()
}

/// Organisation `i` (0-based) registers key `member` with `roles`.
fn add(i: usize, member: u8, roles: &[Role], patient: Option<&str>) -> Op {
    let cert = ca(i)
        .issue(
            &key(member).verifying_key(),
            &format!("member {member}"),
            roles,
            patient,
            &[],
            identity::FOREVER_MS,
        )
        .unwrap();
    add_pem(cert.to_pem())
}

/// Registration of a certificate given as PEM.
fn add_pem(pem: String) -> Op {
    Op::AddMember { certificate: pem }
}

/// Organisation `i`'s genesis entry: admin key 1 + i, node key 11 + i.
fn genesis_org(i: usize) -> GenesisOrg {
    ca(i)
        .genesis_org(
            ORGS[i].1,
            &key(1 + i as u8).verifying_key(),
            &key(11 + i as u8).verifying_key(),
            &[],
            identity::FOREVER_MS,
        )
        .unwrap()
}

/// Signs and numbers transactions per signer, and applies them one block each.
struct Net {
    ledger: Ledger,
    nonces: std::collections::HashMap<[u8; 32], u64>,
    time: u64,
}

// Keys: 1-4 org admins, 11-14 org nodes, 21 clinician A, 22 clinician B, 23 researcher,
// 24 ethics board (research org), 25 patient (patients' agent), 26 agent staff.
impl Net {
    fn new() -> Net {
        Net::with_orgs(4)
    }

    /// The first `n` organisations of `ORGS` at genesis.
    fn with_orgs(n: usize) -> Net {
        let g = Genesis {
            chain: CHAIN.into(),
            time_ms: 0,
            orgs: (0..n).map(genesis_org).collect(),
        };
        let mut net = Net {
            ledger: Ledger::genesis(&g).unwrap(),
            nonces: Default::default(),
            time: 1_700_000_000_000,
        };
        for (admin, member, roles, patient) in [
            (1, 21, Role::Clinician, None),
            (2, 22, Role::Clinician, None),
            (3, 23, Role::Researcher, None),
            (3, 24, Role::EthicsBoard, None),
            (4, 25, Role::Patient, Some(PATIENT)),
            (4, 26, Role::Clinician, None),
        ] {
            net.ok(admin, add(admin as usize - 1, member, &[roles], patient));
        }
        net
    }

    fn tx(&mut self, signer: u8, op: Op) -> Tx {
        let k = key(signer);
        let n = self.nonces.entry(k.verifying_key().0).or_insert(0);
        *n += 1;
        Tx::sign(CHAIN, &k, *n, op)
    }

    fn submit(&mut self, tx: Tx) -> Receipt {
        self.time += 1000;
        self.ledger.apply_block(self.time, &[tx]).remove(0)
    }

    fn run(&mut self, signer: u8, op: Op) -> Receipt {
        let tx = self.tx(signer, op);
        self.submit(tx)
    }

    fn ok(&mut self, signer: u8, op: Op) -> Option<String> {
        let r = self.run(signer, op.clone());
        assert!(r.is_ok(), "{op:?} refused: {:?}", r.error);
        r.created
    }

    fn refused(&mut self, signer: u8, op: Op) -> LedgerError {
        let before = self.ledger.state().clone();
        let r = self.run(signer, op);
        let e = r.error.expect("must be refused");
        // Only the signer's nonce may have changed.
        let after = self.ledger.state();
        for k in after.keys("") {
            if !k.starts_with("nonce/") {
                assert_eq!(
                    before.get_raw(&k),
                    after.get_raw(&k),
                    "{k} changed by a refused tx"
                );
            }
        }
        e
    }
}

/// Registration of a one-instance original study.
fn study_op(root: Digest, patient: &str) -> Op {
    Op::RegisterStudy {
        root,
        patient: patient.into(),
        modality: "CT".into(),
        instances: 1,
        bytes: 1,
        derived_from: None,
        deid: None,
        supersedes: None,
    }
}

fn register(net: &mut Net, root: Digest, derived_from: Option<Digest>) {
    net.ok(
        21,
        Op::RegisterStudy {
            root,
            patient: PATIENT.into(),
            modality: "CT".into(),
            instances: 64,
            bytes: 33_800_000,
            derived_from,
            deid: derived_from.map(|_| DeidRecord {
                profile: "basic".into(),
                options: vec!["retain-longitudinal-modified-dates".into()],
                table_edition: "2024b".into(),
                key_id: "0123456789abcdef".into(),
            }),
            supersedes: None,
        },
    );
}

fn consent(net: &mut Net, purpose: Purpose, recipient: Recipient) -> String {
    net.ok(
        25,
        Op::GrantConsent {
            patient: PATIENT.into(),
            purpose,
            recipient,
            expires_ms: None,
        },
    )
    .unwrap()
}

fn retrieval(net: &mut Net, grant: &str, receiver_node: u8) -> Receipt {
    retrieval_in(net, grant, receiver_node, &format!("s{}", net.time))
}

fn retrieval_in(net: &mut Net, grant: &str, receiver_node: u8, session: &str) -> Receipt {
    let statement = retrieval_statement(grant, session, 129, 33_900_000);
    let op = Op::RecordRetrieval {
        grant: grant.into(),
        session: session.into(),
        objects: 129,
        bytes: 33_900_000,
        receiver: key(receiver_node).verifying_key(),
        receiver_signature: key(receiver_node).sign(&statement),
    };
    net.run(11, op)
}

#[test]
fn care_sharing_with_consent_grant_audit_and_revocation() {
    let mut net = Net::new();
    let original = Digest::of(b"original study");
    register(&mut net, original, None);
    // The prototype's queryAllRecs.
    assert_eq!(net.ledger.studies(Some("hospital-a")).len(), 1);
    assert_eq!(net.ledger.studies_of_patient(PATIENT)[0].root, original);

    // B asks for the patient's priors; without consent A cannot grant.
    let request = net
        .ok(
            22,
            Op::RequestAccess {
                target: Target::Patient(PATIENT.into()),
                purpose: Purpose::Care,
                break_glass: false,
            },
        )
        .unwrap();
    let grant_op = |request: &str| Op::GrantAccess {
        request: request.into(),
        study: original,
        envelope: "wrapped-key-for-hospital-b".into(),
        expires_ms: None,
        delegable: false,
    };
    assert!(matches!(
        net.refused(21, grant_op(&request)),
        LedgerError::NoConsent(_)
    ));

    // The patient consents to care by hospital B; the grant goes through.
    let c = consent(&mut net, Purpose::Care, Recipient::Org("hospital-b".into()));
    let grant = net.ok(21, grant_op(&request)).unwrap();
    assert!(matches!(
        net.refused(21, grant_op(&request)),
        LedgerError::Conflict(_)
    ));
    assert!(net.ledger.may_retrieve(&grant, "hospital-b").is_ok());
    assert!(net.ledger.may_retrieve(&grant, "research").is_err());

    // A's node records the retrieval, countersigned by B's node; not by a stranger.
    assert!(retrieval(&mut net, &grant, 12).is_ok());
    let wrong = retrieval(&mut net, &grant, 13);
    assert!(
        matches!(wrong.error, Some(LedgerError::Unauthorized(_))),
        "{wrong:?}"
    );
    let (grants, audit) = net.ledger.patient_view(PATIENT);
    assert_eq!(grants.len(), 1);
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].receiver_org, "hospital-b");
    assert_eq!(audit[0].recorded_by, "hospital-a");
    assert_eq!(audit[0].refused, None);

    // The same receipt again (same session) is a replay: refused, nothing recorded.
    let session = "session-1";
    assert!(retrieval_in(&mut net, &grant, 12, session).is_ok());
    assert!(matches!(
        net.refused(11, {
            let statement = retrieval_statement(&grant, session, 129, 33_900_000);
            Op::RecordRetrieval {
                grant: grant.clone(),
                session: session.into(),
                objects: 129,
                bytes: 33_900_000,
                receiver: key(12).verifying_key(),
                receiver_signature: key(12).sign(&statement),
            }
        }),
        LedgerError::Conflict(_)
    ));
    // A signature over other counts does not verify.
    assert!(matches!(
        net.refused(11, {
            let statement = retrieval_statement(&grant, "session-2", 1, 1);
            Op::RecordRetrieval {
                grant: grant.clone(),
                session: "session-2".into(),
                objects: 129,
                bytes: 33_900_000,
                receiver: key(12).verifying_key(),
                receiver_signature: key(12).sign(&statement),
            }
        }),
        LedgerError::BadSignature(_)
    ));

    // Refusals: the owner's node refusing to serve, the grantee's node refusing bad data;
    // both land in the patient's view; a third organisation cannot record one.
    let refusal = |serving: bool| Op::RecordRefusal {
        grant: Some(grant.clone()),
        peer: if serving { "hospital-b" } else { "hospital-a" }.into(),
        serving,
        reason: "object 1f2e failed verification".into(),
    };
    net.ok(11, refusal(true));
    net.ok(12, refusal(false));
    assert!(matches!(
        net.refused(13, refusal(false)),
        LedgerError::Unauthorized(_)
    ));
    assert!(matches!(
        net.refused(21, refusal(true)),
        LedgerError::Unauthorized(_)
    ));
    let (_, audit) = net.ledger.patient_view(PATIENT);
    let refused: Vec<_> = audit.iter().filter(|a| a.refused.is_some()).collect();
    assert_eq!(refused.len(), 2);
    assert!(
        refused.iter().all(|a| a.server_org == "hospital-a"
            && a.receiver_org == "hospital-b"
            && a.bytes == 0)
    );
    assert_eq!(refused[1].recorded_by, "hospital-b");
    // A refusal without a grant (an unknown peer) is recorded too, against no study.
    net.ok(
        11,
        Op::RecordRefusal {
            grant: None,
            peer: "hospital-c".into(),
            serving: true,
            reason: "certificate not issued by a member organisation".into(),
        },
    );
    assert_eq!(net.ledger.audit().last().unwrap().study, Digest::default());

    // Followers read requests and grants in order.
    let seq: Vec<String> = net
        .ledger
        .state()
        .keys("grant-seq/")
        .iter()
        .filter_map(|k| net.ledger.state().get::<String>(k))
        .collect();
    assert_eq!(seq, vec![grant.clone()]);
    assert_eq!(net.ledger.state().keys("request-seq/").len(), 1);

    // The patient withdraws consent: the grant no longer lets B retrieve.
    net.ok(25, Op::RevokeConsent { consent: c });
    assert!(matches!(
        net.ledger.may_retrieve(&grant, "hospital-b"),
        Err(LedgerError::NoConsent(_))
    ));
}

#[test]
fn revocation_binds_from_its_block_and_expiry_from_its_time() {
    let mut net = Net::new();
    let original = Digest::of(b"s");
    register(&mut net, original, None);
    consent(
        &mut net,
        Purpose::Care,
        Recipient::Class(OrgClass::Hospital),
    );
    let request = net
        .ok(
            22,
            Op::RequestAccess {
                target: Target::Study(original),
                purpose: Purpose::Care,
                break_glass: false,
            },
        )
        .unwrap();
    let expires = net.time + 10_000;
    let grant = net
        .ok(
            21,
            Op::GrantAccess {
                request: request.clone(),
                study: original,
                envelope: "k".into(),
                expires_ms: Some(expires),
                delegable: true,
            },
        )
        .unwrap();
    assert!(net.ledger.may_retrieve(&grant, "hospital-b").is_ok());
    // Time passes beyond expiry (blocks carry time): refused.
    net.time = expires;
    net.ok(
        22,
        Op::RequestAccess {
            target: Target::Study(original),
            purpose: Purpose::Care,
            break_glass: false,
        },
    );
    assert!(net.ledger.may_retrieve(&grant, "hospital-b").is_err());

    // A fresh grant, revoked by the owner: refused from that block on.
    let request2 = net
        .ok(
            22,
            Op::RequestAccess {
                target: Target::Study(original),
                purpose: Purpose::Care,
                break_glass: false,
            },
        )
        .unwrap();
    let grant2 = net
        .ok(
            21,
            Op::GrantAccess {
                request: request2,
                study: original,
                envelope: "k".into(),
                expires_ms: None,
                delegable: false,
            },
        )
        .unwrap();
    assert!(net.ledger.may_retrieve(&grant2, "hospital-b").is_ok());
    // A stranger (the research org's admin) cannot revoke it; the owner can.
    assert!(matches!(
        net.refused(
            3,
            Op::RevokeAccess {
                grant: grant2.clone()
            }
        ),
        LedgerError::Unauthorized(_)
    ));
    net.ok(
        21,
        Op::RevokeAccess {
            grant: grant2.clone(),
        },
    );
    assert!(net.ledger.may_retrieve(&grant2, "hospital-b").is_err());
    // Delegation is refused for a grant that does not allow it.
    assert!(
        net.refused(
            22,
            Op::Delegate {
                grant: grant2,
                to_org: "hospital-a".into(),
                envelope: "k".into()
            }
        )
        .to_string()
        .contains("revoked")
    );
}

#[test]
fn delegation_goes_once_to_a_hospital_and_dies_with_its_parent() {
    let mut net = Net::with_orgs(5);
    let original = Digest::of(b"s");
    register(&mut net, original, None);
    consent(
        &mut net,
        Purpose::Care,
        Recipient::Class(OrgClass::Hospital),
    );
    let request = net
        .ok(
            22,
            Op::RequestAccess {
                target: Target::Study(original),
                purpose: Purpose::Care,
                break_glass: false,
            },
        )
        .unwrap();
    let parent = net
        .ok(
            21,
            Op::GrantAccess {
                request,
                study: original,
                envelope: "k".into(),
                expires_ms: None,
                delegable: true,
            },
        )
        .unwrap();
    let delegate = |to: &str| Op::Delegate {
        grant: parent.clone(),
        to_org: to.into(),
        envelope: "k".into(),
    };
    // Not to itself, not back to the owner, and an identified original not to research.
    for (to, why) in [
        ("hospital-b", "needs no delegation"),
        ("hospital-a", "needs no delegation"),
        ("research", "hospitals (for care) only"),
    ] {
        let e = net.refused(22, delegate(to)).to_string();
        assert!(e.contains(why), "{to}: {e}");
    }
    let child = net.ok(22, delegate("hospital-c")).unwrap();
    assert!(net.ledger.may_retrieve(&child, "hospital-c").is_ok());
    // The delegated grant cannot be passed on again.
    let e = net
        .refused(
            5,
            Op::Delegate {
                grant: child.clone(),
                to_org: "hospital-b".into(),
                envelope: "k".into(),
            },
        )
        .to_string();
    assert!(e.contains("does not allow delegation"), "{e}");
    // Revoking the parent ends the child too.
    net.ok(
        21,
        Op::RevokeAccess {
            grant: parent.clone(),
        },
    );
    let e = net
        .ledger
        .may_retrieve(&child, "hospital-c")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no longer live"), "{e}");
    // Whoever delegated may revoke the delegation itself.
    net.ok(22, Op::RevokeAccess { grant: child });
}

#[test]
fn research_sees_derivatives_only_and_datasets_need_endorsements() {
    let mut net = Net::new();
    let original = Digest::of(b"o");
    let derivative = Digest::of(b"d");
    register(&mut net, original, None);
    register(&mut net, derivative, Some(original));
    consent(
        &mut net,
        Purpose::Research,
        Recipient::Class(OrgClass::Research),
    );
    // A clinician cannot ask for research, a researcher cannot ask for care.
    assert!(matches!(
        net.refused(
            22,
            Op::RequestAccess {
                target: Target::Study(derivative),
                purpose: Purpose::Research,
                break_glass: false
            }
        ),
        LedgerError::Unauthorized(_)
    ));
    let req = |s| Op::RequestAccess {
        target: Target::Study(s),
        purpose: Purpose::Research,
        break_glass: false,
    };
    let r_orig = net.ok(23, req(original)).unwrap();
    let r_der = net.ok(23, req(derivative)).unwrap();
    let grant = |r: &str, s| Op::GrantAccess {
        request: r.into(),
        study: s,
        envelope: "k".into(),
        expires_ms: None,
        delegable: false,
    };
    assert!(
        net.refused(21, grant(&r_orig, original))
            .to_string()
            .contains("derivatives only")
    );
    net.ok(21, grant(&r_der, derivative));
    // Break glass is for care only.
    assert!(matches!(
        net.refused(
            23,
            Op::RequestAccess {
                target: Target::Study(derivative),
                purpose: Purpose::Research,
                break_glass: true
            }
        ),
        LedgerError::Invalid(_)
    ));

    let publish = |version| Op::PublishDataset {
        name: "lung-screening".into(),
        version,
        manifest: Digest::of(b"dataset manifest"),
        studies: vec![derivative],
    };
    // Without endorsements, with the ethics board only, then with the data owner too.
    assert!(
        net.refused(23, publish(1))
            .to_string()
            .contains("ethics board")
    );
    let tx = net.tx(23, publish(1)).endorse(&key(24));
    assert!(
        net.submit(tx)
            .error
            .unwrap()
            .to_string()
            .contains("data owner hospital-a")
    );
    let tx = net.tx(23, publish(1)).endorse(&key(24)).endorse(&key(1));
    assert!(net.submit(tx).is_ok());
    assert_eq!(net.ledger.datasets().len(), 1);
    // Versions go 1, 2, ...
    let tx = net.tx(23, publish(3)).endorse(&key(24)).endorse(&key(1));
    assert!(matches!(
        net.submit(tx).error,
        Some(LedgerError::Conflict(_))
    ));
    // A forged endorsement (signature of something else) fails the whole transaction.
    let mut tx = net.tx(23, publish(2)).endorse(&key(24)).endorse(&key(1));
    tx.endorsements[1].signature = key(1).sign(b"something else");
    assert!(matches!(
        net.submit(tx).error,
        Some(LedgerError::BadSignature(_))
    ));
}

#[test]
fn break_glass_is_granted_without_consent_and_flagged() {
    let mut net = Net::new();
    let original = Digest::of(b"emergency");
    register(&mut net, original, None);
    let r = net
        .ok(
            22,
            Op::RequestAccess {
                target: Target::Study(original),
                purpose: Purpose::Care,
                break_glass: true,
            },
        )
        .unwrap();
    let g = net
        .ok(
            21,
            Op::GrantAccess {
                request: r,
                study: original,
                envelope: "k".into(),
                expires_ms: None,
                delegable: false,
            },
        )
        .unwrap();
    assert!(net.ledger.may_retrieve(&g, "hospital-b").is_ok());
    assert!(retrieval(&mut net, &g, 12).is_ok());
    assert!(
        net.ledger.audit()[0].break_glass,
        "break-glass retrievals are flagged"
    );
}

#[test]
fn forged_replayed_and_unauthorised_transactions_are_refused() {
    let mut net = Net::new();
    let root = Digest::of(b"x");
    let op = study_op(root, PATIENT);
    // A tampered body.
    let mut tx = net.tx(21, op.clone());
    if let Op::RegisterStudy { instances, .. } = &mut tx.body.op {
        *instances = 2;
    }
    assert!(matches!(
        net.submit(tx).error,
        Some(LedgerError::BadSignature(_))
    ));
    // Another chain.
    let tx = Tx::sign("other-chain", &key(21), 2, op.clone());
    assert!(matches!(
        net.submit(tx).error,
        Some(LedgerError::Invalid(_))
    ));
    // A non-member.
    let tx = Tx::sign(CHAIN, &key(99), 1, op.clone());
    assert!(matches!(
        net.submit(tx).error,
        Some(LedgerError::Unauthorized(_))
    ));
    // Refused before their nonce was checked, none of these spent one. A good one, then its
    // replay, then a nonce from the future.
    let tx = Tx::sign(CHAIN, &key(21), 1, op.clone());
    net.nonces.insert(key(21).verifying_key().0, 1);
    assert!(net.submit(tx.clone()).is_ok());
    assert!(matches!(net.submit(tx).error, Some(LedgerError::Nonce(_))));
    let tx = Tx::sign(CHAIN, &key(21), 9, op.clone());
    assert!(matches!(net.submit(tx).error, Some(LedgerError::Nonce(_))));
    // A refused operation spends its nonce: it cannot be replayed into success later.
    let early = net.tx(
        22,
        Op::RequestAccess {
            target: Target::Study(Digest::of(b"later")),
            purpose: Purpose::Care,
            break_glass: false,
        },
    );
    assert!(matches!(
        net.submit(early.clone()).error,
        Some(LedgerError::NotFound(_))
    ));
    let later_root = Digest::of(b"later");
    net.ok(21, study_op(later_root, PATIENT));
    assert!(matches!(
        net.submit(early).error,
        Some(LedgerError::Nonce(_))
    ));

    // No patient identifier gets in: anything but a pseudonym is refused.
    for bad in ["DOE^JOHN", "123456", "19700101", "MLabcdefghijklmnop"] {
        let e = net.refused(21, study_op(Digest::of(bad.as_bytes()), bad));
        assert!(e.to_string().contains("pseudonym"), "{e}");
    }
    // Roles: a researcher cannot register studies; a clinician cannot add members; the
    // patient cannot consent for another patient; a hospital cannot issue patient identities.
    assert!(matches!(
        net.refused(23, study_op(Digest::of(b"r"), PATIENT)),
        LedgerError::Unauthorized(_)
    ));
    assert!(matches!(
        net.refused(21, add(0, 77, &[Role::Clinician], None)),
        LedgerError::Unauthorized(_)
    ));
    assert!(matches!(
        net.refused(
            25,
            Op::GrantConsent {
                patient: OTHER_PATIENT.into(),
                purpose: Purpose::Care,
                recipient: Recipient::AnyMember,
                expires_ms: None
            }
        ),
        LedgerError::Unauthorized(_)
    ));
    assert!(matches!(
        net.refused(1, add(0, 78, &[Role::Patient], Some(OTHER_PATIENT))),
        LedgerError::Unauthorized(_)
    ));
    // Someone else's study cannot be granted; a study is registered once.
    assert!(matches!(
        net.refused(21, study_op(root, PATIENT)),
        LedgerError::Conflict(_)
    ));
}

#[test]
fn an_admin_sets_the_store_key_grants_are_wrapped_for() {
    let mut net = Net::new();
    let k = medledger_crypto::SecretKey::generate().public().to_text();
    assert!(matches!(
        net.refused(11, Op::SetStoreKey { key: k.clone() }),
        LedgerError::Unauthorized(_)
    ));
    assert!(matches!(
        net.refused(
            2,
            Op::SetStoreKey {
                key: "medledger-x25519-v1:00".into()
            }
        ),
        LedgerError::Invalid(_)
    ));
    net.ok(2, Op::SetStoreKey { key: k.clone() });
    assert_eq!(net.ledger.org("hospital-b").unwrap().store_key, Some(k));
}

#[test]
fn governance_admits_and_removes_organisations_by_majority() {
    let mut net = Net::new();
    let g = genesis_org(4);
    let change = OrgChange::Add {
        org: g.id,
        class: g.class,
        ca: g.ca,
        admin: g.admin,
        node: g.node,
        store_key: None,
    };
    let p = net.ok(1, Op::Propose { change }).unwrap();
    assert!(net.ledger.org("hospital-c").is_none());
    assert!(matches!(
        net.refused(
            1,
            Op::Approve {
                proposal: p.clone()
            }
        ),
        LedgerError::Conflict(_)
    ));
    assert!(matches!(
        net.refused(
            21,
            Op::Approve {
                proposal: p.clone()
            }
        ),
        LedgerError::Unauthorized(_)
    ));
    net.ok(
        2,
        Op::Approve {
            proposal: p.clone(),
        },
    );
    assert!(
        net.ledger.org("hospital-c").is_none(),
        "2 of 4 is not a majority"
    );
    net.ok(
        3,
        Op::Approve {
            proposal: p.clone(),
        },
    );
    assert!(net.ledger.org("hospital-c").is_some_and(|o| o.active));
    // The new organisation's admin can act at once.
    net.ok(5, add(4, 31, &[Role::Clinician], None));

    // Removing hospital-b: 3 of 5 needed; after it, B's members are refused.
    let p = net
        .ok(
            1,
            Op::Propose {
                change: OrgChange::Remove {
                    org: "hospital-b".into(),
                },
            },
        )
        .unwrap();
    net.ok(
        3,
        Op::Approve {
            proposal: p.clone(),
        },
    );
    net.ok(4, Op::Approve { proposal: p });
    assert!(matches!(
        net.refused(
            22,
            Op::RequestAccess {
                target: Target::Patient(PATIENT.into()),
                purpose: Purpose::Care,
                break_glass: false
            }
        ),
        LedgerError::Unauthorized(_)
    ));
}

#[test]
fn same_blocks_same_root_and_proofs_verify() {
    let build = || {
        let mut net = Net::new();
        register(&mut net, Digest::of(b"a"), None);
        consent(&mut net, Purpose::Care, Recipient::AnyMember);
        net
    };
    let (a, b) = (build(), build());
    assert_eq!(a.ledger.root(), b.ledger.root());
    let root = a.ledger.root();
    let key = format!("study/{}", Digest::of(b"a"));
    let proof = a.ledger.state().prove(&key).unwrap();
    assert!(proof.verify(&root));
    let mut forged = proof.clone();
    forged.value = forged.value.replace("hospital-a", "hospital-b");
    assert!(!forged.verify(&root));
    assert!(a.ledger.state().prove("study/none").is_none());
}

#[test]
fn members_are_certificates_that_chain_to_their_organisations_ca_and_expire() {
    let mut net = Net::new();
    // The certificate names its member's roles: the new clinician can register studies.
    net.ok(1, add(0, 60, &[Role::Clinician], None));
    let m = net.ledger.member(&key(60).verifying_key()).unwrap();
    assert_eq!(
        (m.org.as_str(), m.roles.as_slice()),
        ("hospital-a", &[Role::Clinician][..])
    );
    assert_eq!(m.name, "member 60");

    // A certificate from hospital-b's CA cannot be registered by hospital-a's admin.
    assert!(matches!(
        net.refused(1, add(1, 61, &[Role::Clinician], None)),
        LedgerError::Unauthorized(_)
    ));
    // An impostor CA with hospital-a's name but another key: its certificates do not chain.
    let impostor = identity::OrgCa::new("hospital-a", key(99), identity::FOREVER_MS).unwrap();
    let forged = impostor
        .issue(
            &key(62).verifying_key(),
            "mallory",
            &[Role::Admin],
            None,
            &[],
            identity::FOREVER_MS,
        )
        .unwrap();
    let e = net.refused(1, add_pem(forged.to_pem()));
    assert!(e.to_string().contains("signature"), "{e}");
    // Not a certificate at all; a role the ledger does not know; a CA certificate.
    assert!(matches!(
        net.refused(1, add_pem("hello".into())),
        LedgerError::Invalid(_)
    ));
    let odd = medledger_crypto::pki::issue(
        &ca(0).cert,
        &key(41),
        &key(63).verifying_key(),
        &medledger_crypto::CertSpec {
            name: "root".into(),
            org: "hospital-a".into(),
            roles: vec!["superuser".into()],
            pseudonym: None,
            hosts: vec![],
            not_before_ms: 0,
            not_after_ms: u64::MAX / 4_000_000,
        },
    )
    .unwrap();
    let e = net.refused(1, add_pem(odd.to_pem()));
    assert!(e.to_string().contains("superuser"), "{e}");
    assert!(matches!(
        net.refused(1, add_pem(ca(0).cert.to_pem())),
        LedgerError::Invalid(_)
    ));

    // A certificate that has already expired is refused; one that expires later stops
    // working from the first block after its end.
    let now = net.time;
    let expired = ca(0)
        .issue(
            &key(64).verifying_key(),
            "old",
            &[Role::Clinician],
            None,
            &[],
            (0, now - 1),
        )
        .unwrap();
    assert!(
        net.refused(1, add_pem(expired.to_pem()))
            .to_string()
            .contains("expired")
    );
    let short = ca(0)
        .issue(
            &key(65).verifying_key(),
            "locum",
            &[Role::Clinician],
            None,
            &[],
            (0, now + 5_000),
        )
        .unwrap();
    net.ok(1, add_pem(short.to_pem()));
    net.ok(65, study_op(Digest::of(b"locum-1"), PATIENT));
    net.time += 10_000;
    let e = net.refused(65, study_op(Digest::of(b"locum-2"), PATIENT));
    assert!(
        matches!(e, LedgerError::Unauthorized(_)) && e.to_string().contains("not valid"),
        "{e}"
    );

    // A genesis whose admin certificate another CA issued is refused.
    let mut g0 = genesis_org(0);
    g0.admin = genesis_org(1).admin;
    assert!(
        Ledger::genesis(&Genesis {
            chain: CHAIN.into(),
            time_ms: 0,
            orgs: vec![g0]
        })
        .is_err()
    );
}

/// Instances that arrive after a study was registered make a new version that names the one
/// it replaces: only by the owner, with the same patient and kind, and only once.
#[test]
fn a_later_version_of_a_study_replaces_the_earlier_once() {
    let mut net = Net::new();
    let v1 = Digest::of(b"v1");
    register(&mut net, v1, None);
    let version = |root: Digest, supersedes: Digest, patient: &str| Op::RegisterStudy {
        root,
        patient: patient.into(),
        modality: "CT".into(),
        instances: 65,
        bytes: 34_000_000,
        derived_from: None,
        deid: None,
        supersedes: Some(supersedes),
    };
    // Not by another organisation.
    let e = net.refused(22, version(Digest::of(b"x"), v1, PATIENT));
    assert!(e.to_string().contains("by its owner"), "{e}");
    // Not for another patient.
    let other = "MLBBBBBBBBBBBBBBBB";
    let e = net.refused(21, version(Digest::of(b"y"), v1, other));
    assert!(e.to_string().contains("patient"), "{e}");
    // Not a derivative replacing an original.
    let e = net.refused(
        21,
        Op::RegisterStudy {
            root: Digest::of(b"z"),
            patient: PATIENT.into(),
            modality: "CT".into(),
            instances: 65,
            bytes: 34_000_000,
            derived_from: Some(v1),
            deid: Some(DeidRecord {
                profile: "basic".into(),
                options: vec![],
                table_edition: "2024b".into(),
                key_id: "k".into(),
            }),
            supersedes: Some(v1),
        },
    );
    assert!(e.to_string().contains("kind"), "{e}");
    let v2 = Digest::of(b"v2");
    net.ok(21, version(v2, v1, PATIENT));
    assert_eq!(
        net.ledger
            .state()
            .get::<String>(&format!("superseded/{v1}")),
        Some(v2.to_hex())
    );
    // A second replacement of the same version is a conflict.
    let e = net.refused(21, version(Digest::of(b"v2'"), v1, PATIENT));
    assert!(e.to_string().contains("already replaced"), "{e}");
    // Unknown versions cannot be replaced.
    let e = net.refused(21, version(Digest::of(b"v3"), Digest::of(b"nope"), PATIENT));
    assert!(e.to_string().contains("no study"), "{e}");
}

/// A block's signatures are verified as one batch; a forged transaction in a block of good
/// ones is refused alone, and every ledger gives the same receipts for the same block.
#[test]
fn a_forged_transaction_in_a_block_is_refused_alone() {
    let mut a = Net::new();
    let mut txs: Vec<Tx> = (0..6)
        .map(|i| a.tx(21, study_op(Digest::of(&[i]), PATIENT)))
        .collect();
    // The fourth: a tampered body; the fifth: signed by someone else's key.
    if let Op::RegisterStudy { instances, .. } = &mut txs[3].body.op {
        *instances = 99;
    }
    txs[4].signature = key(22).sign(&txs[4].body.signing_bytes());
    let mut b = Net::new();
    let ra = a.ledger.apply_block(1000, &txs);
    let rb = b.ledger.apply_block(1000, &txs);
    assert_eq!(
        serde_json::to_string(&ra).unwrap(),
        serde_json::to_string(&rb).unwrap()
    );
    let refused: Vec<usize> = ra
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.error, Some(LedgerError::BadSignature(_))))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(refused, [3, 4]);
    // The later good one is refused for its nonce (4 and 5 never happened), not its signature.
    assert!(matches!(ra[5].error, Some(LedgerError::Nonce(_))));
    assert!(ra[..3].iter().all(|r| r.error.is_none()));

    // A block of good transactions only: all applied, through the batch.
    let mut c = Net::new();
    let good: Vec<Tx> = (0..6)
        .map(|i| c.tx(21, study_op(Digest::of(&[i]), PATIENT)))
        .collect();
    let rc = c.ledger.apply_block(1000, &good);
    assert!(rc.iter().all(|r| r.error.is_none()), "{rc:?}");
}

#[test]
fn transactions_the_node_verified_are_not_verified_again_and_get_the_same_verdicts() {
    let mut a = Net::new();
    let mut txs: Vec<Tx> = (0..6)
        .map(|i| a.tx(21, study_op(Digest::of(&[i]), PATIENT)))
        .collect();
    txs[4].signature = key(22).sign(&txs[4].body.signing_bytes());
    // What a node's mempool admitted: every transaction whose signatures verify.
    let verified: Vec<bool> = txs
        .iter()
        .map(|t| Ledger::signatures_verify(t, &t.body.signing_bytes()))
        .collect();
    assert_eq!(verified, [true, true, true, true, false, true]);
    let mut b = Net::new();
    let ra = a.ledger.apply_block(1000, &txs);
    let rb = b.ledger.apply_block_verified(1000, &txs, &verified);
    assert_eq!(
        serde_json::to_string(&ra).unwrap(),
        serde_json::to_string(&rb).unwrap()
    );
    assert!(matches!(rb[4].error, Some(LedgerError::BadSignature(_))));
    assert_eq!(a.ledger.root(), b.ledger.root());
    // Only the flags vouch for a signature: a forged transaction flagged unverified is
    // refused even when every other one was vouched for, and fewer flags than transactions
    // leave the rest to be verified.
    let mut c = Net::new();
    let rc = c.ledger.apply_block_verified(1000, &txs, &verified[..2]);
    assert_eq!(
        serde_json::to_string(&ra).unwrap(),
        serde_json::to_string(&rc).unwrap()
    );
}

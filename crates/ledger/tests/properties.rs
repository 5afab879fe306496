//! Property: across random interleavings of consents, grants, revocations and the passing of
//! time, a retrieval is allowed exactly when a live grant and a live consent (or a recorded
//! break-glass) allow it, and a revocation binds from the block that carries it. Checked
//! against an independent model of those rules.

use medledger_crypto::{Digest, SigningKey};
use medledger_ledger::*;
use proptest::prelude::*;

const CHAIN: &str = "prop";
const PATIENT: &str = "MLABCDEFGHIJKLMNOP";

fn key(n: u8) -> SigningKey {
    SigningKey::from_seed([n; 32])
}

#[derive(Debug, Clone)]
enum Action {
    Consent {
        research: bool,
        recipient: u8,
        expires_in: Option<u64>,
    },
    RevokeConsent(usize),
    Grant {
        research: bool,
        break_glass: bool,
        expires_in: Option<u64>,
    },
    RevokeGrant(usize),
    Wait(u64),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (any::<bool>(), 0u8..4, proptest::option::of(1u64..20_000)).prop_map(
            |(research, recipient, expires_in)| Action::Consent {
                research,
                recipient,
                expires_in
            }
        ),
        (0usize..8).prop_map(Action::RevokeConsent),
        (
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(1u64..20_000)
        )
            .prop_map(|(research, break_glass, expires_in)| Action::Grant {
                research,
                break_glass,
                expires_in
            }),
        (0usize..8).prop_map(Action::RevokeGrant),
        (1u64..15_000).prop_map(Action::Wait),
    ]
}

/// The model's view of a consent and a grant.
#[derive(Debug, Clone)]
struct MConsent {
    id: String,
    research: bool,
    recipient: u8,
    expires: Option<u64>,
    revoked: bool,
}
#[derive(Debug, Clone)]
struct MGrant {
    id: String,
    org: &'static str,
    research: bool,
    break_glass: bool,
    expires: Option<u64>,
    revoked: bool,
}

fn covers(c: &MConsent, research: bool, org: &str, now: u64) -> bool {
    let class_ok = match c.recipient {
        0 => org == "hospital-b",
        1 => org.starts_with("hospital"),
        2 => org == "research",
        _ => true,
    };
    !c.revoked && c.research == research && c.expires.is_none_or(|e| now < e) && class_ok
}

/// The genesis of four organisations and the additions of members, issued once for all cases.
fn network() -> &'static (Genesis, Vec<(u8, Op)>) {
    static NET: std::sync::OnceLock<(Genesis, Vec<(u8, Op)>)> = std::sync::OnceLock::new();
    NET.get_or_init(|| {
        let orgs = [
            ("hospital-a", OrgClass::Hospital),
            ("hospital-b", OrgClass::Hospital),
            ("research", OrgClass::Research),
            ("patients", OrgClass::PatientAgent),
        ];
        let cas: Vec<identity::OrgCa> = orgs
            .iter()
            .enumerate()
            .map(|(i, (id, _))| {
                identity::OrgCa::new(id, key(41 + i as u8), identity::FOREVER_MS).unwrap()
            })
            .collect();
        let g = Genesis {
            chain: CHAIN.into(),
            time_ms: 0,
            orgs: orgs
                .iter()
                .enumerate()
                .map(|(i, (_, class))| {
                    cas[i]
                        .genesis_org(
                            *class,
                            &key(1 + i as u8).verifying_key(),
                            &key(11 + i as u8).verifying_key(),
                            &[],
                            identity::FOREVER_MS,
                        )
                        .unwrap()
                })
                .collect(),
        };
        let members = [
            (1u8, 21u8, Role::Clinician, None),
            (2, 22, Role::Clinician, None),
            (3, 23, Role::Researcher, None),
            (4, 25, Role::Patient, Some(PATIENT)),
        ]
        .into_iter()
        .map(|(admin, member, role, patient)| {
            let cert = cas[admin as usize - 1]
                .issue(
                    &key(member).verifying_key(),
                    "member",
                    &[role],
                    patient,
                    &[],
                    identity::FOREVER_MS,
                )
                .unwrap();
            (
                admin,
                Op::AddMember {
                    certificate: cert.to_pem(),
                },
            )
        })
        .collect();
        (g, members)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn retrieval_allowed_exactly_when_grant_and_consent_are_live(actions in proptest::collection::vec(action(), 1..40)) {
        let (g, members) = network();
        let mut l = Ledger::genesis(g).unwrap();
        let mut nonces = std::collections::HashMap::<u8, u64>::new();
        let mut now = 1_000_000u64;
        let mut run = |l: &mut Ledger, now: u64, signer: u8, op: Op| -> Receipt {
            let n = nonces.entry(signer).or_insert(0);
            *n += 1;
            l.apply_block(now, &[Tx::sign(CHAIN, &key(signer), *n, op)]).remove(0)
        };
        for (admin, op) in members {
            now += 1;
            assert!(run(&mut l, now, *admin, op.clone()).is_ok());
        }
        let original = Digest::of(b"o");
        let derivative = Digest::of(b"d");
        for (root, from) in [(original, None), (derivative, Some(original))] {
            now += 1;
            let r = run(&mut l, now, 21, Op::RegisterStudy { root, patient: PATIENT.into(), modality: "CT".into(), instances: 1, bytes: 1, derived_from: from, deid: from.map(|_| DeidRecord { profile: "basic".into(), options: vec![], table_edition: "2024b".into(), key_id: "k".into() }), supersedes: None });
            assert!(r.is_ok(), "{r:?}");
        }
        let mut consents: Vec<MConsent> = Vec::new();
        let mut grants: Vec<MGrant> = Vec::new();
        for a in actions {
            now += 1;
            match a {
                Action::Consent { research, recipient, expires_in } => {
                    let rec = match recipient { 0 => Recipient::Org("hospital-b".into()), 1 => Recipient::Class(OrgClass::Hospital), 2 => Recipient::Class(OrgClass::Research), _ => Recipient::AnyMember };
                    let purpose = if research { Purpose::Research } else { Purpose::Care };
                    let r = run(&mut l, now, 25, Op::GrantConsent { patient: PATIENT.into(), purpose, recipient: rec, expires_ms: expires_in.map(|e| now + e) });
                    prop_assert!(r.is_ok());
                    consents.push(MConsent { id: r.created.unwrap(), research, recipient, expires: expires_in.map(|e| now + e), revoked: false });
                }
                Action::RevokeConsent(i) => {
                    if let Some(c) = consents.get_mut(i) {
                        let r = run(&mut l, now, 25, Op::RevokeConsent { consent: c.id.clone() });
                        prop_assert_eq!(r.is_ok(), !c.revoked);
                        c.revoked = true;
                    } else {
                        // Nothing to revoke: an empty block, so that the ledger's clock (the
                        // time of its last block) is the model's `now`.
                        l.apply_block(now, &[]);
                    }
                }
                Action::Grant { research, break_glass, expires_in } => {
                    let (signer, purpose, study, org) = if research { (23, Purpose::Research, derivative, "research") } else { (22, Purpose::Care, original, "hospital-b") };
                    let req = run(&mut l, now, signer, Op::RequestAccess { target: Target::Study(study), purpose, break_glass });
                    if research && break_glass {
                        prop_assert!(!req.is_ok(), "break glass for research must be refused");
                        continue;
                    }
                    prop_assert!(req.is_ok(), "{:?}", req);
                    now += 1;
                    let r = run(&mut l, now, 21, Op::GrantAccess { request: req.created.unwrap(), study, envelope: "k".into(), expires_ms: expires_in.map(|e| now + e), delegable: false });
                    let consented = consents.iter().any(|c| covers(c, research, org, now));
                    prop_assert_eq!(r.is_ok(), break_glass || consented, "grant outcome: {:?}", r);
                    if r.is_ok() {
                        grants.push(MGrant { id: r.created.unwrap(), org, research, break_glass, expires: expires_in.map(|e| now + e), revoked: false });
                    }
                }
                Action::RevokeGrant(i) => {
                    if let Some(g) = grants.get_mut(i) {
                        let r = run(&mut l, now, 21, Op::RevokeAccess { grant: g.id.clone() });
                        prop_assert_eq!(r.is_ok(), !g.revoked);
                        g.revoked = true;
                    } else {
                        l.apply_block(now, &[]);
                    }
                }
                Action::Wait(ms) => {
                    now += ms;
                    l.apply_block(now, &[]);
                }
            }
            // After every block: the ledger and the model agree on every grant.
            for g in &grants {
                let model = !g.revoked
                    && g.expires.is_none_or(|e| now < e)
                    && (g.break_glass || consents.iter().any(|c| covers(c, g.research, g.org, now)));
                let ledger = l.may_retrieve(&g.id, g.org);
                prop_assert_eq!(ledger.is_ok(), model, "grant {:?}: ledger says {:?}", g, ledger);
                // Never for another organisation.
                prop_assert!(l.may_retrieve(&g.id, "hospital-a").is_err());
            }
        }
    }
}

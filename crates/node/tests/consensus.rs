//! Four organisations' nodes order ledger transactions with simplex BFT in commonware's
//! deterministic runtime over its simulated network: every node finalises the same blocks at
//! every height and reaches the same state root; with one node cut off, the other three go on;
//! the same seed gives the same run.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use commonware_consensus::simplex::Engine;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_cryptography::Signer as _;
use commonware_cryptography::ed25519::{PrivateKey, PublicKey};
use commonware_p2p::simulated::{Config as NetConfig, Link, Network};
use commonware_p2p::{Recipients, Sender as _};
use commonware_runtime::{Clock as _, Quota, Runner as _, Supervisor as _, deterministic};
use commonware_runtime::{IoBuf, Spawner as _};
use commonware_utils::ordered::Set;
use commonware_utils::{NZU32, NZUsize, probability};
use medledger_crypto::{Digest, SigningKey};
use medledger_ledger::identity::{self, OrgCa};
use medledger_ledger::{Genesis, Ledger, Op, OrgClass, Role, Tx};
use medledger_node::engine::engine_config;
use medledger_node::{Application, Finalized};

const CHAIN: &str = "medledger-sim";
const NAMESPACE: &[u8] = b"medledger-sim-consensus";
const QUOTA: Quota = Quota::per_second(NZU32!(100_000));

fn admin(i: u8) -> SigningKey {
    SigningKey::from_seed([100 + i; 32])
}

/// Organisation `i`'s certificate authority.
fn ca(i: u8) -> OrgCa {
    OrgCa::new(
        &format!("org-{i}"),
        SigningKey::from_seed([150 + i; 32]),
        identity::FOREVER_MS,
    )
    .unwrap()
}

fn genesis() -> Genesis {
    Genesis {
        chain: CHAIN.into(),
        time_ms: 0,
        orgs: (0..4u8)
            .map(|i| {
                ca(i)
                    .genesis_org(
                        OrgClass::Hospital,
                        &admin(i).verifying_key(),
                        &SigningKey::from_seed([200 + i; 32]).verifying_key(),
                        &[],
                        identity::FOREVER_MS,
                    )
                    .unwrap()
            })
            .collect(),
    }
}

/// Transactions from the four admins: each adds clinicians, numbered 1..=per_admin.
fn workload(per_admin: u64) -> Vec<Tx> {
    let mut txs = Vec::new();
    let cas: Vec<OrgCa> = (0..4).map(ca).collect();
    for n in 1..=per_admin {
        for i in 0..4u8 {
            let member = SigningKey::from_seed(
                [i, (n % 250) as u8, (n / 250) as u8, 7]
                    .repeat(8)
                    .try_into()
                    .unwrap(),
            );
            txs.push(Tx::sign(
                CHAIN,
                &admin(i),
                n,
                Op::AddMember {
                    certificate: cas[i as usize]
                        .issue(
                            &member.verifying_key(),
                            "clinician",
                            &[Role::Clinician],
                            None,
                            &[],
                            identity::FOREVER_MS,
                        )
                        .unwrap()
                        .to_pem(),
                },
            ));
        }
    }
    txs
}

/// Runs four nodes; `isolate` cuts one node off from the start. Returns what each node finalised.
fn run(
    seed: u64,
    txs: Vec<Tx>,
    isolate: Option<usize>,
    byzantine: Option<usize>,
) -> Vec<Finalized> {
    let cfg = deterministic::Config::new()
        .with_seed(seed)
        .with_timeout(Some(Duration::from_secs(600)));
    let runner = deterministic::Runner::new(cfg);
    runner.start(|context| async move {
        let keys: Vec<PrivateKey> = (0..4).map(PrivateKey::from_seed).collect();
        let pks: Vec<PublicKey> = keys.iter().map(|k| k.public_key()).collect();
        let set: Set<PublicKey> = Set::try_from(pks.clone()).expect("distinct keys");
        let (network, oracle) = Network::new_with_peers(
            context.child("network"),
            NetConfig {
                max_size: 8 << 20,
                max_peers_per_set: NZUsize!(4),
                disconnect_on_block: true,
                tracked_peer_sets: NZUsize!(1),
            },
            pks.clone(),
        )
        .await;
        network.start();
        let link = Link {
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            success_rate: probability!(1.0),
        };
        for (i, a) in pks.iter().enumerate() {
            for (j, b) in pks.iter().enumerate() {
                if i != j && isolate != Some(i) && isolate != Some(j) {
                    oracle
                        .add_link(a.clone(), b.clone(), link.clone())
                        .await
                        .unwrap();
                }
            }
        }
        let mut finals: Vec<Arc<Mutex<Finalized>>> = Vec::new();
        let mut mailboxes = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let control = oracle.control(pks[i].clone());
            let votes = control.register(0, QUOTA).await.unwrap();
            let certs = control.register(1, QUOTA).await.unwrap();
            let resolver = control.register(2, QUOTA).await.unwrap();
            let blocks = control.register(3, QUOTA).await.unwrap();
            let requests = control.register(4, QUOTA).await.unwrap();
            let node = context.child("node").with_attribute("index", i);
            if byzantine == Some(i) {
                // A Byzantine organisation: runs no honest engine; floods every channel with
                // garbage, forged blocks (a forged transaction, a made-up parent) and block
                // requests.
                let mut senders = [votes.0, certs.0, resolver.0, blocks.0, requests.0];
                let forger = SigningKey::from_seed([99; 32]);
                node.child("byzantine").spawn(move |ctx| async move {
                    let mut n: u64 = 0;
                    loop {
                        n += 1;
                        let forged = medledger_node::Block {
                            height: n,
                            parent: "00".repeat(32),
                            time_ms: n,
                            txs: vec![Tx::sign(
                                CHAIN,
                                &forger,
                                n,
                                Op::RemoveMember {
                                    key: admin(0).verifying_key(),
                                },
                            )],
                        };
                        for (c, snd) in senders.iter_mut().enumerate() {
                            let garbage: Vec<u8> = (0..(64 + n as usize % 512))
                                .map(|k| (k as u64 * 31 + n + c as u64) as u8)
                                .collect();
                            let _ = snd.send(Recipients::All, IoBuf::from(garbage), false);
                        }
                        let _ =
                            senders[3].send(Recipients::All, IoBuf::from(forged.encode()), false);
                        let _ =
                            senders[4].send(Recipients::All, IoBuf::from(vec![n as u8; 32]), false);
                        ctx.sleep(Duration::from_millis(50)).await;
                    }
                });
                finals.push(Arc::new(Mutex::new(Finalized::default())));
                continue;
            }
            let ledger = Ledger::genesis(&genesis()).unwrap();
            let (app, mailbox, finalized) = Application::new::<Scheme>(node.child("app"), ledger);
            let genesis = app.genesis();
            app.start(blocks, requests);
            let scheme =
                Scheme::signer(NAMESPACE, set.clone(), key.clone()).expect("a participant");
            let cfg = engine_config(
                scheme,
                control,
                mailbox.clone(),
                format!("node-{i}"),
                genesis,
            );
            Engine::new(node.child("engine"), cfg).start(votes, certs, resolver);
            finals.push(finalized);
            mailboxes.push(mailbox);
        }
        // Clients hand every transaction to every node (as they would to any node's API),
        // some twice, and a forger sends altered copies: those never reach a block.
        for (n, tx) in txs.iter().enumerate() {
            for m in &mailboxes {
                m.submit(tx.clone());
                if n % 7 == 0 {
                    m.submit(tx.clone());
                    let mut forged = tx.clone();
                    forged.body.nonce += 1000;
                    m.submit(forged);
                }
            }
        }
        // Until every connected node has applied every transaction.
        let expected = txs.len();
        let all_applied = |finals: &[Arc<Mutex<Finalized>>], skip: Option<usize>| {
            finals.iter().enumerate().all(|(i, f)| {
                skip == Some(i)
                    || byzantine == Some(i)
                    || f.lock().unwrap().receipts.len() >= expected
            })
        };
        while !all_applied(&finals, isolate) {
            context.sleep(Duration::from_millis(500)).await;
        }
        // The partition heals: the node that was cut off catches up, fetching the blocks it
        // missed from its peers.
        if let Some(k) = isolate {
            assert!(
                finals[k].lock().unwrap().receipts.is_empty(),
                "finalised alone"
            );
            for (j, b) in pks.iter().enumerate() {
                if j != k {
                    oracle
                        .add_link(pks[k].clone(), b.clone(), link.clone())
                        .await
                        .unwrap();
                    oracle
                        .add_link(b.clone(), pks[k].clone(), link.clone())
                        .await
                        .unwrap();
                }
            }
            while !all_applied(&finals, None) {
                context.sleep(Duration::from_millis(500)).await;
            }
        }
        finals
            .into_iter()
            .map(|f| std::mem::take(&mut *f.lock().unwrap()))
            .collect()
    })
}

fn assert_agreement(finals: &[Finalized], skip: Option<usize>) {
    let live: Vec<&Finalized> = finals
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, f)| f)
        .collect();
    let first = live[0];
    for f in &live[1..] {
        for (h, (digest, root)) in &f.blocks {
            if let Some((d0, r0)) = first.blocks.get(h) {
                assert_eq!(
                    d0, digest,
                    "two nodes finalised different blocks at height {h}"
                );
                assert_eq!(
                    r0, root,
                    "two nodes disagree on the state root at height {h}"
                );
            }
        }
    }
}

#[test]
fn four_nodes_finalise_the_same_blocks_and_state() {
    let txs = workload(25);
    let finals = run(7, txs.clone(), None, None);
    assert_agreement(&finals, None);
    for f in &finals {
        assert_eq!(f.receipts.len(), txs.len());
        assert!(
            f.receipts.iter().all(|r| r.is_ok()),
            "{:?}",
            f.receipts.iter().find(|r| !r.is_ok())
        );
    }
    // The same seed gives the same run.
    let again = run(7, txs, None, None);
    assert_eq!(finals[0].blocks, again[0].blocks);
    let _ = Digest::default();
}

#[test]
fn three_of_four_go_on_and_the_fourth_catches_up_when_the_partition_heals() {
    let txs = workload(10);
    let finals = run(11, txs.clone(), Some(3), None);
    assert_agreement(&finals, None);
    for f in &finals {
        assert_eq!(f.receipts.iter().filter(|r| r.is_ok()).count(), txs.len());
        assert_eq!(
            f.receipts, finals[0].receipts,
            "same receipts on every node"
        );
    }
}

#[test]
fn a_byzantine_organisation_flooding_garbage_and_forged_blocks_changes_nothing() {
    let txs = workload(10);
    let finals = run(13, txs.clone(), None, Some(2));
    assert_agreement(&finals, Some(2));
    for (i, f) in finals.iter().enumerate().filter(|(i, _)| *i != 2) {
        assert_eq!(f.receipts.len(), txs.len(), "node {i}");
        assert!(
            f.receipts.iter().all(|r| r.is_ok()),
            "node {i}: a forged transaction was applied"
        );
    }
}

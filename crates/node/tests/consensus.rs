//! Organisations' nodes order ledger transactions with simplex BFT in commonware's
//! deterministic runtime over its simulated network, with 4 and 7 organisations: all online;
//! some cut off and healed; one flooding garbage and forged blocks; one equivocating (caught,
//! with evidence); the whole network shut down uncleanly and restarted from its journals and
//! block logs. After each: no two honest nodes finalised different blocks at a height, all
//! reach the same state root, every transaction was applied; the same seed gives the same run.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use commonware_consensus::simplex::Engine;
use commonware_consensus::simplex::mocks::conflicter::{Config as ConflicterConfig, Conflicter};
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_cryptography::Sha256;
use commonware_cryptography::Signer as _;
use commonware_cryptography::ed25519::{PrivateKey, PublicKey};
use commonware_p2p::simulated::{Config as NetConfig, Link, Network};
use commonware_p2p::{Recipients, Sender as _};
use commonware_runtime::{Clock as _, Quota, Supervisor as _, deterministic};
use commonware_runtime::{IoBuf, Spawner as _};
use commonware_utils::ordered::Set;
use commonware_utils::{NZU32, NZUsize, probability};
use medledger_crypto::SigningKey;
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

fn genesis(n: usize) -> Genesis {
    Genesis {
        chain: CHAIN.into(),
        time_ms: 0,
        orgs: (0..n as u8)
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

/// Transactions from the organisations' admins: each adds clinicians, numbered 1..=per_admin.
fn workload(orgs: usize, per_admin: u64) -> Vec<Tx> {
    let mut txs = Vec::new();
    let cas: Vec<OrgCa> = (0..orgs as u8).map(ca).collect();
    for n in 1..=per_admin {
        for i in 0..orgs as u8 {
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

/// How a node behaves in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Honest,
    /// Honest but cut off from the others until they have finalised everything; then linked.
    Isolated,
    /// Runs no engine; floods every channel with garbage, forged blocks and block requests.
    Flooder,
    /// commonware's Conflicter: signs two different notarize and finalize votes in every view.
    Equivocator,
}

struct Scenario {
    seed: u64,
    nodes: Vec<Behaviour>,
    /// Times the whole network is shut down uncleanly (at a random point) and restarted from
    /// its storage: the consensus journals and the block logs in `logs`.
    crashes: u32,
    logs: Option<std::path::PathBuf>,
    /// Clients hand transactions to this node only (else to every node).
    submit_to: Option<usize>,
    /// How long the network runs on, idle, once every transaction is applied.
    idle: Duration,
}

impl Scenario {
    fn honest(n: usize, seed: u64) -> Scenario {
        Scenario {
            seed,
            nodes: vec![Behaviour::Honest; n],
            crashes: 0,
            logs: None,
            submit_to: None,
            idle: Duration::ZERO,
        }
    }

    fn with(mut self, i: usize, b: Behaviour) -> Scenario {
        self.nodes[i] = b;
        self
    }

    fn runs_app(&self, i: usize) -> bool {
        matches!(self.nodes[i], Behaviour::Honest | Behaviour::Isolated)
    }
}

/// Runs the scenario; returns what each node finalised (empty for the Byzantine ones).
fn run(s: &Scenario, txs: &[Tx]) -> Vec<Finalized> {
    run_with_crashes(s, txs).0
}

/// Also returns, for each unclean shutdown, how many transactions the nodes had applied.
fn run_with_crashes(s: &Scenario, txs: &[Tx]) -> (Vec<Finalized>, Vec<Vec<usize>>) {
    let mut progress = Vec::new();
    let mut checkpoint = None;
    let mut crashes_left = s.crashes;
    loop {
        let runner = match checkpoint.take() {
            None => deterministic::Runner::new(
                deterministic::Config::new()
                    .with_seed(s.seed)
                    .with_timeout(Some(Duration::from_secs(600))),
            ),
            Some(c) => deterministic::Runner::from(c),
        };
        // An unclean shutdown of every node at a point the seed picks, 0.15 to 0.75 s in.
        let crash = (crashes_left > 0).then(|| {
            let x = s.seed.wrapping_mul(7919) ^ u64::from(crashes_left).wrapping_mul(104_729);
            Duration::from_millis(150 + x % 600)
        });
        let (out, cp) = runner.start_and_recover(|context| run_once(context, s, txs, crash));
        match out {
            Ok(finals) => return (finals, progress),
            Err(applied) => {
                progress.push(applied);
                crashes_left -= 1;
                checkpoint = Some(cp);
            }
        }
    }
}

/// One life of the network; when it is shut down uncleanly part way, how many transactions
/// each node had applied.
async fn run_once(
    context: deterministic::Context,
    s: &Scenario,
    txs: &[Tx],
    crash: Option<Duration>,
) -> Result<Vec<Finalized>, Vec<usize>> {
    let n = s.nodes.len();
    let keys: Vec<PrivateKey> = (0..n as u64).map(PrivateKey::from_seed).collect();
    let pks: Vec<PublicKey> = keys.iter().map(|k| k.public_key()).collect();
    let set: Set<PublicKey> = Set::try_from(pks.clone()).expect("distinct keys");
    let (network, oracle) = Network::new_with_peers(
        context.child("network"),
        NetConfig {
            max_size: 8 << 20,
            max_peers_per_set: NZUsize!(n),
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
    let isolated = |i: usize| s.nodes[i] == Behaviour::Isolated;
    for (i, a) in pks.iter().enumerate() {
        for (j, b) in pks.iter().enumerate() {
            if i != j && !isolated(i) && !isolated(j) {
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
        let gossip = control.register(5, QUOTA).await.unwrap();
        let node = context.child("node").with_attribute("index", i);
        let scheme = Scheme::signer(NAMESPACE, set.clone(), key.clone()).expect("a participant");
        match s.nodes[i] {
            Behaviour::Flooder => {
                let mut senders = [votes.0, certs.0, resolver.0, blocks.0, requests.0, gossip.0];
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
                        // Forwarded transactions, well signed by a key that is no member.
                        let gossip = serde_json::to_vec(&forged.txs).unwrap();
                        let _ = senders[5].send(Recipients::All, IoBuf::from(gossip), false);
                        ctx.sleep(Duration::from_millis(50)).await;
                    }
                });
                finals.push(Arc::new(Mutex::new(Finalized::default())));
                continue;
            }
            Behaviour::Equivocator => {
                Conflicter::<_, _, Sha256>::new(
                    node.child("equivocator"),
                    ConflicterConfig { scheme },
                )
                .start(votes);
                finals.push(Arc::new(Mutex::new(Finalized::default())));
                continue;
            }
            Behaviour::Honest | Behaviour::Isolated => {}
        }
        let ledger = Ledger::genesis(&genesis(n)).unwrap();
        let (mut app, mailbox, finalized) = Application::new::<Scheme>(node.child("app"), ledger);
        if let Some(dir) = &s.logs {
            app.recover(&dir.join(format!("node-{i}.jsonl"))).unwrap();
        }
        let genesis = app.genesis();
        app.start(blocks, requests, gossip);
        let cfg = engine_config(
            scheme,
            control,
            mailbox.clone(),
            format!("node-{i}"),
            genesis,
        );
        Engine::new(node.child("engine"), cfg).start(votes, certs, resolver);
        finals.push(finalized);
        mailboxes.push((i, mailbox));
    }
    // Clients hand every transaction not yet final to every node (as they would to any node's
    // API, again after a restart), one every 10 ms, some twice, and a forger sends altered
    // copies: those never reach a block.
    {
        let txs = txs.to_vec();
        let finals = finals.clone();
        if let Some(k) = s.submit_to {
            mailboxes.retain(|(i, _)| *i == k);
        }
        context.child("clients").spawn(move |ctx| async move {
            for (n, tx) in txs.iter().enumerate() {
                let id = tx.id().to_hex();
                for (i, m) in &mailboxes {
                    if finals[*i].lock().unwrap().by_tx.contains_key(&id) {
                        continue;
                    }
                    m.submit(tx.clone());
                    if n % 7 == 0 {
                        m.submit(tx.clone());
                        let mut forged = tx.clone();
                        forged.body.nonce += 1000;
                        m.submit(forged);
                    }
                }
                ctx.sleep(Duration::from_millis(10)).await;
            }
        });
    }
    if let Some(wait) = crash {
        context.sleep(wait).await;
        return Err(finals
            .iter()
            .map(|f| f.lock().unwrap().receipts.len())
            .collect());
    }
    // Until every connected honest node has applied every transaction.
    let expected = txs.len();
    let all_applied = |finals: &[Arc<Mutex<Finalized>>], skip_isolated: bool| {
        finals.iter().enumerate().all(|(i, f)| {
            !s.runs_app(i)
                || (skip_isolated && isolated(i))
                || f.lock().unwrap().receipts.len() >= expected
        })
    };
    while !all_applied(&finals, true) {
        context.sleep(Duration::from_millis(500)).await;
    }
    // The partition heals: the node that was cut off catches up, fetching the blocks it
    // missed from its peers.
    for k in (0..n).filter(|k| isolated(*k)) {
        assert!(
            finals[k].lock().unwrap().receipts.is_empty(),
            "finalised alone"
        );
        for (j, b) in pks.iter().enumerate() {
            if j != k {
                // Two healed nodes link each other once.
                let _ = oracle
                    .add_link(pks[k].clone(), b.clone(), link.clone())
                    .await;
                let _ = oracle
                    .add_link(b.clone(), pks[k].clone(), link.clone())
                    .await;
            }
        }
    }
    while !all_applied(&finals, false) {
        context.sleep(Duration::from_millis(500)).await;
    }
    context.sleep(s.idle).await;
    Ok(finals
        .into_iter()
        .map(|f| std::mem::take(&mut *f.lock().unwrap()))
        .collect())
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

/// The honest nodes' finals: every transaction applied once and accepted, the same receipts.
fn assert_all_applied(s: &Scenario, finals: &[Finalized], txs: &[Tx]) {
    let honest: Vec<usize> = (0..finals.len()).filter(|i| s.runs_app(*i)).collect();
    for &i in &honest {
        let f = &finals[i];
        let ok = f.receipts.iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            ok,
            txs.len(),
            "node {i}: {:?}",
            f.receipts.iter().find(|r| !r.is_ok())
        );
        assert_eq!(
            f.receipts, finals[honest[0]].receipts,
            "node {i}: same receipts everywhere"
        );
    }
}

#[test]
fn four_nodes_finalise_the_same_blocks_and_state_and_the_same_seed_gives_the_same_run() {
    let txs = workload(4, 25);
    let s = Scenario::honest(4, 7);
    let finals = run(&s, &txs);
    assert_agreement(&finals, None);
    assert_all_applied(&s, &finals, &txs);
    let again = run(&s, &txs);
    assert_eq!(finals[0].blocks, again[0].blocks);
    assert_eq!(finals[3].receipts, again[3].receipts);
    // Another seed orders the same transactions into other blocks, to the same state.
    let other = run(&Scenario::honest(4, 8), &txs);
    let last = |f: &Finalized| f.blocks.values().last().unwrap().1.clone();
    assert_ne!(finals[0].blocks, other[0].blocks);
    let root_after_all = |f: &Finalized| {
        f.blocks
            .values()
            .find(|(_, root)| *root == last(f))
            .map(|(_, r)| r.clone())
    };
    assert_eq!(root_after_all(&finals[0]), root_after_all(&other[0]));
}

#[test]
fn seven_organisations_with_two_isolated_and_healed() {
    // n = 7 tolerates f = 2: with two cut off, five go on; healed, the two catch up.
    let txs = workload(7, 6);
    let s = Scenario::honest(7, 21)
        .with(2, Behaviour::Isolated)
        .with(5, Behaviour::Isolated);
    let finals = run(&s, &txs);
    assert_agreement(&finals, None);
    assert_all_applied(&s, &finals, &txs);
}

#[test]
fn three_of_four_go_on_and_the_fourth_catches_up_when_the_partition_heals() {
    let txs = workload(4, 10);
    let s = Scenario::honest(4, 11).with(3, Behaviour::Isolated);
    let finals = run(&s, &txs);
    assert_agreement(&finals, None);
    assert_all_applied(&s, &finals, &txs);
}

#[test]
fn a_byzantine_organisation_flooding_garbage_and_forged_blocks_changes_nothing() {
    let txs = workload(4, 10);
    let s = Scenario::honest(4, 13).with(2, Behaviour::Flooder);
    let finals = run(&s, &txs);
    assert_agreement(&finals, Some(2));
    assert_all_applied(&s, &finals, &txs);
    // Nothing of the flooder's reached a block: no receipt beyond the workload's.
    for (i, f) in finals.iter().enumerate().filter(|(i, _)| *i != 2) {
        assert_eq!(f.receipts.len(), txs.len(), "node {i}");
    }
}

#[test]
fn an_equivocating_organisation_is_caught_and_changes_nothing() {
    for (n, byz, seed) in [(4, 1, 17), (7, 4, 19)] {
        let txs = workload(n, 5);
        let s = Scenario::honest(n, seed).with(byz, Behaviour::Equivocator);
        let finals = run(&s, &txs);
        assert_agreement(&finals, Some(byz));
        assert_all_applied(&s, &finals, &txs);
        // Honest nodes hold signed evidence against the equivocator (whichever saw both of
        // its votes for a view before moving on), and against no one else.
        let mut accused = std::collections::BTreeSet::new();
        for f in finals.iter() {
            accused.extend(f.faults.keys().copied());
        }
        let byz_index = {
            let pks: Vec<PublicKey> = (0..n as u64)
                .map(|k| PrivateKey::from_seed(k).public_key())
                .collect();
            let set: Set<PublicKey> = Set::try_from(pks.clone()).unwrap();
            set.iter().position(|k| *k == pks[byz]).unwrap() as u32
        };
        assert_eq!(
            accused.into_iter().collect::<Vec<_>>(),
            vec![byz_index],
            "n={n}: evidence against the equivocator only"
        );
    }
}

#[test]
fn unclean_shutdowns_of_the_whole_network_lose_no_finalised_block() {
    let logs = tempfile::tempdir().unwrap();
    let txs = workload(4, 30);
    let s = Scenario {
        crashes: 3,
        logs: Some(logs.path().to_path_buf()),
        ..Scenario::honest(4, 23)
    };
    let (finals, crashes) = run_with_crashes(&s, &txs);
    assert_eq!(crashes.len(), 3);
    assert!(
        crashes
            .iter()
            .any(|c| c.iter().any(|n| *n > 0 && *n < txs.len())),
        "at least one shutdown came mid-way: {crashes:?}"
    );
    assert_agreement(&finals, None);
    assert_all_applied(&s, &finals, &txs);
    // The block logs hold every block from height 1, in order, on every node.
    for f in &finals {
        let heights: Vec<u64> = f.blocks.keys().copied().collect();
        assert_eq!(heights, (1..=heights.len() as u64).collect::<Vec<_>>());
    }
}

#[test]
fn transactions_sent_to_one_node_are_forwarded_and_an_idle_network_makes_few_blocks() {
    let txs = workload(4, 5);
    let s = Scenario {
        submit_to: Some(2),
        idle: Duration::from_secs(20),
        ..Scenario::honest(4, 29)
    };
    let finals = run(&s, &txs);
    assert_agreement(&finals, None);
    assert_all_applied(&s, &finals, &txs);
    // The other nodes learnt every transaction from node 2, so whoever led could propose it.
    for (i, f) in finals.iter().enumerate() {
        let want = if i == 2 { 0 } else { txs.len() as u64 };
        assert_eq!(f.gossiped, want, "node {i}");
    }
    // Idle, the leaders wait for transactions before proposing an empty block: about two
    // blocks a second, where every round trip (~50 ms here) made one before.
    let f = &finals[0];
    let last_busy = f
        .applied
        .iter()
        .filter(|(_, (_, ids))| !ids.is_empty())
        .map(|(h, _)| *h)
        .max()
        .unwrap();
    let (&last, &(end_ms, _)) = f.applied.iter().next_back().unwrap();
    let start_ms = f.applied[&last_busy].0;
    let idle_blocks = last - last_busy;
    let seconds = (end_ms - start_ms) as f64 / 1000.0;
    assert!(seconds >= 19.0, "{seconds} s idle");
    let per_second = idle_blocks as f64 / seconds;
    assert!(
        (1.5..=2.5).contains(&per_second),
        "{idle_blocks} empty blocks in {seconds} s"
    );
}

//! Running one node as a process: the tokio runtime, authenticated p2p over TCP with the
//! other organisations' nodes, simplex consensus with its journal in the node's folder, the
//! application with its block log, and the JSON API.

use std::time::Duration;

use commonware_consensus::simplex::Engine;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_cryptography::ChaCha20Poly1305;
use commonware_p2p::authenticated::lookup;
use commonware_p2p::{Address, AddressableManager as _};
use commonware_runtime::{Quota, Runner as _, Supervisor as _, tokio as cw_tokio};
use commonware_stream::cups::{self, Cups};
use commonware_stream::sake::{self, Sake};
use commonware_utils::ordered::{Map, Set};
use commonware_utils::{NZU32, NZUsize};
use medledger_ledger::Ledger;

use crate::app::Application;
use crate::config::{ConfigError, NodeConfig, public_key};

const MAX_MESSAGE: u32 = 16 << 20;

/// Runs the node until the process is stopped.
pub fn run_node(cfg: NodeConfig) -> Result<(), ConfigError> {
    run_node_with(cfg, None)
}

static LOCAL_LEDGER: std::sync::OnceLock<std::sync::Arc<std::sync::RwLock<Ledger>>> =
    std::sync::OnceLock::new();

/// The finalised ledger state of the node running in this process, once it runs: what the
/// imaging service reads where a round trip through the API would cost too much (the
/// sharing side's check of every request). `None` in a process that runs no node.
pub fn local_ledger() -> Option<std::sync::Arc<std::sync::RwLock<Ledger>>> {
    LOCAL_LEDGER.get().cloned()
}

/// Runs the node, serving `extra` routes (the imaging service's DICOMweb) beside the API on
/// the same HTTP port.
pub fn run_node_with(cfg: NodeConfig, extra: Option<axum::Router>) -> Result<(), ConfigError> {
    let signer = cfg.private_key()?;
    let mut addresses = Vec::new();
    let mut org_of = std::collections::HashMap::new();
    for p in &cfg.peers {
        let key = public_key(&p.key)?;
        org_of.insert(key.clone(), p.org.clone());
        addresses.push((key, p.p2p));
    }
    let participants: Set<_> =
        Set::try_from(addresses.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
            .map_err(|_| ConfigError::Invalid("two peers share a key".into()))?;
    // Consensus names participants by their index in the sorted set.
    let participant_orgs: Vec<String> = participants.iter().map(|k| org_of[k].clone()).collect();
    let ledger =
        Ledger::genesis(&cfg.genesis).map_err(|e| ConfigError::Invalid(format!("genesis: {e}")))?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| ConfigError::Io {
        path: cfg.data_dir.clone(),
        source: e,
    })?;
    let runtime = cw_tokio::Config::new().with_storage_directory(cfg.data_dir.join("consensus"));
    let executor = cw_tokio::Runner::new(runtime);
    let namespace = format!("medledger {}", cfg.chain);
    executor.start(|context| async move {
        let p2p_cfg = lookup::Config::local(
            Cups::<_, ChaCha20Poly1305>::new(
                Sake {
                    signer: signer.clone(),
                    synchrony_bound: Duration::from_secs(5),
                    max_handshake_age: Duration::from_secs(10),
                    version: sake::Version::V1,
                },
                cups::Version::V1,
            ),
            format!("{namespace} p2p").as_bytes(),
            cfg.p2p,
            NZUsize!(cfg.peers.len()),
            MAX_MESSAGE,
            NZUsize!(10_000),
        );
        let (mut network, mut oracle) = lookup::Network::new(context.child("network"), p2p_cfg);
        let peers: Map<_, Address> = addresses
            .iter()
            .map(|(k, a)| (k.clone(), Address::from(*a)))
            .collect::<Vec<_>>()
            .try_into()
            .expect("distinct keys");
        let _ = oracle.track(0, peers);
        // Per-peer rates. p2p sizes its queues for a full burst from every peer on every
        // channel (100,000/s made each node hold 4 GB before it did anything); these leave
        // ten times the headroom the busiest run has shown (votes and certificates: a few per
        // view; blocks and block requests: a restarted node catching up at ~200 blocks/s).
        let consensus_quota = Quota::per_second(NZU32!(1_000));
        let block_quota = Quota::per_second(NZU32!(2_000));
        let votes = network.register(0, consensus_quota);
        let certs = network.register(1, consensus_quota);
        let resolver = network.register(2, consensus_quota);
        let blocks = network.register(3, block_quota);
        let requests = network.register(4, block_quota);
        // Forwarded transactions: batches of up to 100, each node forwarding what it is sent.
        let txs = network.register(5, block_quota);
        network.start();

        let (mut app, mailbox, finalized) =
            Application::new::<Scheme>(context.child("app"), ledger);
        match app.recover(&cfg.blocks_log()) {
            Ok(n) => tracing::info!("replayed {n} finalised blocks"),
            Err(e) => {
                eprintln!(
                    "cannot read or open the block log {}: {e}",
                    cfg.blocks_log().display()
                );
                std::process::exit(1);
            }
        }
        let genesis = app.genesis();
        let _ = LOCAL_LEDGER.set(app.ledger());
        let https = match &cfg.https {
            None => None,
            Some(h) => match crate::tls::https_server_config(&h.cert, &h.key) {
                Ok(tls) => Some((h.listen, tls)),
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            },
        };
        if let Err(e) = crate::api::serve(
            cfg.api,
            https,
            cfg.org.clone(),
            participant_orgs,
            app.ledger(),
            finalized,
            mailbox.clone(),
            extra,
        ) {
            eprintln!("cannot serve the API on {}: {e}", cfg.api);
            std::process::exit(1);
        }
        app.start(blocks, requests, txs);
        let scheme = Scheme::signer(
            format!("{namespace} consensus").as_bytes(),
            participants,
            signer,
        )
        .expect("this node is a participant");
        let engine_cfg =
            crate::engine::engine_config(scheme, oracle, mailbox, "consensus".into(), genesis);
        let handle = Engine::new(context.child("engine"), engine_cfg).start(votes, certs, resolver);
        let _ = handle.await;
    });
    Ok(())
}

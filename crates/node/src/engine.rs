//! The simplex configuration every medledger node runs with.

use std::time::Duration;

use commonware_consensus::simplex::config::{Config, Floor, ForwardPolicy, SkipBudget, SkipPolicy};
use commonware_consensus::simplex::elector::RoundRobin;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_consensus::types::{Epoch, ViewDelta};
use commonware_cryptography::Sha256;
use commonware_cryptography::ed25519::PublicKey;
use commonware_cryptography::sha256::Digest;
use commonware_p2p::Blocker;
use commonware_parallel::Sequential;
use commonware_runtime::buffer::paged::CacheRef;
use commonware_utils::{NZDuration, NZU16, NZUsize};

use crate::app::Mailbox;

/// The engine configuration type of a node.
pub type EngineConfig<B> = Config<
    Scheme,
    RoundRobin<Sha256>,
    B,
    Digest,
    Mailbox<Scheme>,
    Mailbox<Scheme>,
    Mailbox<Scheme>,
    Sequential,
>;

/// Leaders rotate round robin; a leader that proposes nothing within a second is skipped
/// (nullified); the voting journal lives in storage `partition`.
pub fn engine_config<B: Blocker<PublicKey = PublicKey>>(
    scheme: Scheme,
    blocker: B,
    mailbox: Mailbox<Scheme>,
    partition: String,
    genesis: Digest,
) -> EngineConfig<B> {
    Config {
        scheme,
        elector: RoundRobin::<Sha256>::default(),
        blocker,
        automaton: mailbox.clone(),
        relay: mailbox.clone(),
        reporter: mailbox,
        strategy: Sequential,
        partition,
        mailbox_size: NZUsize!(10_000),
        epoch: Epoch::new(0),
        floor: Floor::Genesis(genesis),
        leader_timeout: Duration::from_secs(1),
        certification_timeout: Duration::from_secs(2),
        timeout_retry: Duration::from_secs(10),
        fetch_timeout: NZDuration!(Duration::from_secs(1)),
        fetch_retry_delay: Duration::from_millis(100),
        view_retention: ViewDelta::new(10),
        skip: SkipPolicy::Enabled {
            timeout: Duration::from_secs(12),
            budget: SkipBudget::Participants,
        },
        replay_buffer: NZUsize!(1024 * 1024),
        write_buffer: NZUsize!(1024 * 1024),
        page_cache: CacheRef::new(NZU16!(4096), NZUsize!(256)),
        forward: ForwardPolicy::Disabled,
        track_historical_votes: false,
    }
}

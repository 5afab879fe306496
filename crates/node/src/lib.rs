//! A medledger node's consensus side: simplex BFT (commonware) orders blocks of ledger
//! transactions among the organisations' nodes; each node applies finalised blocks, in height
//! order, to its own copy of the ledger state machine.
//!
//! Simplex agrees on digests only. The proposer keeps its block and sends the bytes to the
//! other nodes on a channel of its own; a node votes for a digest once it holds a block with
//! that digest whose parent and height fit the proposal's context. When a block is finalised,
//! its not yet applied ancestors are finalised with it, so the node walks back the parent links
//! and applies them in order.

mod api;
pub mod app;
pub mod block;
pub mod client;
pub mod config;
pub mod engine;
pub mod run;
pub mod tls;

pub use app::{Application, Finalized, Mailbox};
pub use block::Block;
pub use client::{Client, ClientError, Finality, QueryEntry, QueryPage};
pub use config::{
    DicomPeer, HttpsConfig, ImagingConfig, NodeConfig, PeerConfig, ae_title, init_network,
    parse_org,
};
pub use run::{local_ledger, run_node, run_node_with};

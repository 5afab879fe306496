//! medledger's image store: DICOM instances split into a header object and pixel objects,
//! each sealed under its own key and stored under the digest of its ciphertext; a sealed
//! manifest per study whose Merkle root is what the ledger records; the manifest key wrapped
//! for each recipient. Backends: a crash-safe filesystem layout and any S3-compatible service.
//!
//! See `docs/store.md` for the format and what sharing and revocation can promise.

pub mod backend;
mod cache;
pub mod codec;
pub mod manifest;
pub mod pool;
pub mod split;
mod store;

pub use backend::{Backend, BackendError, BatchWriter, FsBackend, Location, S3Backend};
pub use cache::CacheStats;
pub use codec::DecodeError;
pub use manifest::{
    InstanceEntry, InstanceProof, ObjectRef, SeriesEntry, SeriesProof, StudyManifest,
};
pub use store::{
    GcOutcome, GetOutcome, InstanceSink, Problem, PutOptions, PutOutcome, REF_FORMAT, RekeyOutcome,
    Scanned, Skipped, Source, Staged, Store, StoreError, StudyPlan, StudyRef, StudyResults,
    VerifyReport, plan, scan, scan_all, scan_memory,
};

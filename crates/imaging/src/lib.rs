//! The imaging service.

pub mod access;
pub mod dicomweb;
pub mod dimse;
pub mod index;
pub mod journal;
pub mod multipart;
pub mod pixels;
pub mod service;
pub mod share;
mod snapshot;

pub use dicomweb::router;
pub use dimse::Dimse;
pub use index::{Index, Query, QueryLevel, View};
pub use service::{Incoming, IngestError, Service, StartError, Stored};
pub use share::Sharing;

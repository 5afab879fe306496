//! The imaging service.

pub mod index;
pub mod service;

pub use index::{Index, Query, QueryLevel, View};
pub use service::{IngestError, Service, StartError, Stored};

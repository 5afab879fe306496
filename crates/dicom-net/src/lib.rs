//! DIMSE networking for medledger: a service class provider (SCP) for
//! C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET, and a small service class user
//! (SCU) for C-ECHO and C-STORE.
//!
//! The crate is a protocol layer only: what is stored, found and retrieved is
//! decided by a [`Provider`]. It is built on the upper layer PDU codec of
//! `dicom-ul` (association PDUs are encoded and decoded by it) and on
//! `dicom-object` for data sets and file meta groups. Association negotiation,
//! P-DATA fragmentation and reassembly and the DIMSE message exchange are done
//! here, so that the SCP controls per-context transfer syntax choice, SCP/SCU
//! role selection (needed by C-GET), association limits and timeouts.
//!
//! Command sets are encoded and decoded by a small Implicit VR Little Endian
//! codec in this crate (command sets only hold group 0000 elements with fixed
//! VRs); identifiers and data sets go through `dicom-object`.

mod assoc;
mod conn;
mod dimse;
mod part10;
mod scp;
mod scu;
mod uids;

use std::net::SocketAddr;

pub use dicom_object::InMemDicomObject;
pub use scp::{Scp, ScpConfig};
pub use scu::{echo, store_to};

/// Implementation Class UID sent by this crate in associations and written
/// into the file meta group of received instances.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.70939245676237982568649324761805133441";
/// Implementation Version Name (at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = "MEDLEDGER_0_1";

/// Query/retrieve level of a C-FIND / C-MOVE / C-GET identifier (0008,0052).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Patient,
    Study,
    Series,
    Image,
}

impl Level {
    /// The code string used in (0008,0052).
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Patient => "PATIENT",
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Image => "IMAGE",
        }
    }

    /// Parse a (0008,0052) value (surrounding spaces and NULs ignored).
    pub fn parse(value: &str) -> Option<Level> {
        match value.trim_matches(|c: char| c == ' ' || c == '\0') {
            "PATIENT" => Some(Level::Patient),
            "STUDY" => Some(Level::Study),
            "SERIES" => Some(Level::Series),
            "IMAGE" => Some(Level::Image),
            _ => None,
        }
    }
}

/// Which information model the request used (Patient Root or Study Root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    PatientRoot,
    StudyRoot,
}

/// A DIMSE status and an optional Error Comment (0000,0902)
/// (max 64 chars, never patient data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: u16,
    pub comment: Option<String>,
}

impl Status {
    pub const SUCCESS: u16 = 0x0000;
    /// Pending (C-FIND, C-MOVE, C-GET intermediate responses).
    pub const PENDING: u16 = 0xFF00;
    /// Cancel.
    pub const CANCEL: u16 = 0xFE00;
    /// Refused: SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Unrecognized operation.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Refused: out of resources (storage).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Refused: out of resources, unable to perform sub-operations (C-MOVE / C-GET).
    pub const SUBOPERATIONS_FAILED: u16 = 0xA702;
    /// Refused: move destination unknown.
    pub const MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
    /// Error: data set / identifier does not match SOP class.
    pub const IDENTIFIER_MISMATCH: u16 = 0xA900;
    /// Warning: sub-operations complete, one or more failures or warnings.
    pub const SUBOPERATIONS_WARNING: u16 = 0xB000;
    /// Error: cannot understand / unable to process.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;

    /// Status 0x0000 without comment.
    pub fn success() -> Status {
        Status {
            code: Self::SUCCESS,
            comment: None,
        }
    }

    /// A failure (or warning) status with an Error Comment. The comment is
    /// truncated to 64 characters when sent.
    pub fn failure(code: u16, comment: impl Into<String>) -> Status {
        Status {
            code,
            comment: Some(comment.into()),
        }
    }

    /// 0x0000.
    pub fn is_success(&self) -> bool {
        self.code == Self::SUCCESS
    }

    /// Warning statuses: 0x0001, 0x0107, 0x0116 and 0xBxxx.
    pub fn is_warning(&self) -> bool {
        matches!(self.code, 0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF)
    }

    /// Pending statuses 0xFF00 and 0xFF01.
    pub fn is_pending(&self) -> bool {
        matches!(self.code, 0xFF00 | 0xFF01)
    }

    /// Anything that is neither success, warning, pending nor cancel.
    pub fn is_failure(&self) -> bool {
        !(self.is_success() || self.is_warning() || self.is_pending() || self.code == Self::CANCEL)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:04X}", self.code)?;
        if let Some(c) = &self.comment {
            write!(f, " ({c})")?;
        }
        Ok(())
    }
}

/// Who is asking: the association's calling AE title and peer address.
#[derive(Debug, Clone)]
pub struct Peer {
    pub calling_ae: String,
    pub called_ae: String,
    pub addr: SocketAddr,
}

/// What the node does with DIMSE requests. Called from association threads; may block.
pub trait Provider: Send + Sync + 'static {
    /// C-STORE: `file` is a complete DICOM Part 10 file (preamble, file meta group built by the SCP
    /// from the request: media storage SOP class/instance UIDs, the negotiated transfer syntax,
    /// implementation class UID/version of this crate; then the data set bytes exactly as received).
    /// Return only once the instance is durable (or refused).
    fn store(&self, peer: &Peer, file: Vec<u8>) -> Status;
    /// C-STORE, before the data set is read: a provider that takes the instance in while it
    /// arrives (writing what came so far) returns a [`Receiving`], which then sees the file
    /// grow and stores it in place of [`Provider::store`]. `sop_instance_uid` is the
    /// request's Affected SOP Instance UID, a claim the data set may contradict.
    fn receiving(&self, peer: &Peer, sop_instance_uid: &str) -> Option<Box<dyn Receiving>> {
        let _ = (peer, sop_instance_uid);
        None
    }
    /// An empty buffer with room for at least `len` bytes, into which the SCP receives the next
    /// C-STORE data set (a provider that hands back the buffers [`Provider::store`] took spares
    /// the allocator and the kernel a fresh, zeroed block per instance).
    fn receive_buffer(&self, len: usize) -> Vec<u8> {
        Vec::with_capacity(len)
    }
    /// C-FIND: the identifier as received; return the matches, each holding the requested keys
    /// (the SCP adds (0008,0052) QueryRetrieveLevel and sends each as a pending response).
    fn find(
        &self,
        peer: &Peer,
        model: Model,
        level: Level,
        identifier: &InMemDicomObject,
    ) -> Result<Vec<InMemDicomObject>, Status>;
    /// C-MOVE / C-GET: the SOP Instance UIDs the identifier selects.
    fn select(
        &self,
        peer: &Peer,
        model: Model,
        level: Level,
        identifier: &InMemDicomObject,
    ) -> Result<Vec<String>, Status>;
    /// One selected instance as a Part 10 file (to send by a C-STORE sub-operation).
    fn fetch(&self, peer: &Peer, sop_instance_uid: &str) -> Result<Vec<u8>, Status>;
    /// Where a C-MOVE destination AE title listens, if it is a known peer.
    fn destination(&self, ae_title: &str) -> Option<SocketAddr>;
}

/// A C-STORE data set being received (see [`Provider::receiving`]). Dropped without
/// [`Receiving::finish`] when the transfer fails (the association broke or was aborted).
pub trait Receiving: Send {
    /// The file so far: the Part 10 header and every fragment received until now.
    fn grew(&mut self, file: &[u8]);
    /// The whole file: store it, as [`Provider::store`] would, and answer.
    fn finish(self: Box<Self>, file: Vec<u8>) -> Status;
}

/// Errors of the SCU helpers (and of association handling, internally).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("network I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("could not decode PDU from peer")]
    PduRead(#[source] dicom_ul::pdu::ReadError),
    #[error("could not encode PDU")]
    PduWrite(#[source] dicom_ul::pdu::WriteError),
    #[error("DICOM upper layer protocol error: {0}")]
    Protocol(String),
    #[error("association rejected by peer ({result}): {reason}")]
    Rejected { result: String, reason: String },
    #[error("association aborted by peer")]
    Aborted,
    #[error("peer closed the connection")]
    Closed,
    #[error("peer accepted none of the proposed presentation contexts")]
    NoAcceptedContext,
    #[error("file #{index} is not a usable DICOM Part 10 file: {reason}")]
    InvalidFile { index: usize, reason: String },
    #[error("DICOM encoding error while {context}")]
    Encoding {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implementation_version_name_fits() {
        assert!(IMPLEMENTATION_VERSION_NAME.len() <= 16);
        assert!(IMPLEMENTATION_CLASS_UID.len() <= 64);
    }

    #[test]
    fn status_classes() {
        assert!(Status::success().is_success());
        assert!(Status::failure(0xB000, "w").is_warning());
        assert!(Status::failure(0xA700, "x").is_failure());
        assert!(!Status::failure(0xFF00, "p").is_failure());
        assert_eq!(Level::parse("SERIES "), Some(Level::Series));
        assert_eq!(Level::parse("FOO"), None);
    }
}

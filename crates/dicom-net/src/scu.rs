//! Association requestor: C-ECHO and C-STORE, used by tests, by callers of
//! [`store_to`] and by C-MOVE sub-operations.

use std::borrow::Cow;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use dicom_dictionary_std::{tags, uids as std_uids};
use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, PresentationContextResultReason,
    UserVariableItem,
};
use tracing::{debug, warn};

use crate::assoc::Ctx;
use crate::conn::{Conn, Incoming, Received};
use crate::dimse::{self, Command};
use crate::part10::{self, FileInfo};
use crate::uids::{self, trim_uid};
use crate::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, NetError, Status};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for any reply (association response, C-STORE-RSP...).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// Our maximum PDU length as a requestor.
const CLIENT_MAX_PDU: u32 = 131_072;
/// Presentation context IDs are odd numbers 1..=255.
pub(crate) const MAX_CONTEXTS: usize = 128;

/// A proposed abstract syntax with its transfer syntaxes.
pub(crate) type Proposal = (String, Vec<String>);

/// An established association where we are the requestor.
#[derive(Debug)]
pub(crate) struct Client {
    conn: Conn,
    contexts: Vec<Ctx>,
    next_id: u16,
}

impl Client {
    pub(crate) fn open(
        addr: SocketAddr,
        calling_ae: &str,
        called_ae: &str,
        proposals: &[Proposal],
    ) -> Result<Client, NetError> {
        if proposals.is_empty() || proposals.len() > MAX_CONTEXTS {
            return Err(NetError::Protocol(format!(
                "cannot propose {} presentation contexts",
                proposals.len()
            )));
        }
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
        stream.set_write_timeout(Some(RESPONSE_TIMEOUT))?;
        let mut conn = Conn::new(stream)?;
        let presentation_contexts: Vec<_> = proposals
            .iter()
            .enumerate()
            .map(|(i, (abs, ts))| PresentationContextProposed {
                id: (2 * i + 1) as u8,
                abstract_syntax: abs.clone(),
                transfer_syntaxes: ts.clone(),
            })
            .collect();
        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: calling_ae.to_string(),
            called_ae_title: called_ae.to_string(),
            application_context_name: uids::APPLICATION_CONTEXT.to_string(),
            presentation_contexts: presentation_contexts.clone(),
            user_variables: vec![
                UserVariableItem::MaxLength(CLIENT_MAX_PDU),
                UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
                UserVariableItem::ImplementationVersionName(
                    IMPLEMENTATION_VERSION_NAME.to_string(),
                ),
            ],
        };
        conn.send_pdu(&Pdu::AssociationRQ(rq))?;
        let ac = match conn.next()? {
            Incoming::Pdu(Pdu::AssociationAC(ac)) => ac,
            Incoming::Pdu(Pdu::AssociationRJ(rj)) => {
                conn.close();
                return Err(NetError::Rejected {
                    result: format!("{:?}", rj.result).to_lowercase(),
                    reason: rj.source.to_string(),
                });
            }
            Incoming::Pdu(Pdu::AbortRQ { .. }) => {
                conn.close();
                return Err(NetError::Aborted);
            }
            other => {
                conn.abort();
                return Err(NetError::Protocol(format!(
                    "expected A-ASSOCIATE-AC, got {other:?}"
                )));
            }
        };
        let peer_max = ac
            .user_variables
            .iter()
            .find_map(|u| match u {
                UserVariableItem::MaxLength(n) => Some(*n),
                _ => None,
            })
            .unwrap_or(dicom_ul::pdu::DEFAULT_MAX_PDU);
        conn.set_peer_max(peer_max);
        let contexts: Vec<Ctx> = ac
            .presentation_contexts
            .iter()
            .filter(|r| r.reason == PresentationContextResultReason::Acceptance)
            .filter_map(|r| {
                let p = presentation_contexts.iter().find(|p| p.id == r.id)?;
                Some(Ctx {
                    id: r.id,
                    abstract_syntax: p.abstract_syntax.clone(),
                    ts: trim_uid(&r.transfer_syntax).to_string(),
                })
            })
            .collect();
        if contexts.is_empty() {
            conn.abort();
            return Err(NetError::NoAcceptedContext);
        }
        Ok(Client {
            conn,
            contexts,
            next_id: 1,
        })
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Wait for the response to message `msg_id`.
    fn response(&mut self, msg_id: u16, field: u16) -> Result<Command, NetError> {
        loop {
            match self.conn.recv_command()? {
                Received::Command { pcid, cmd } => {
                    if cmd.has_data_set() {
                        self.conn.skip_data(pcid)?;
                    }
                    if cmd.command_field() == Some(field)
                        && cmd.get_u16(tags::MESSAGE_ID_BEING_RESPONDED_TO) == Some(msg_id)
                    {
                        return Ok(cmd);
                    }
                    debug!(field = ?cmd.command_field(), "ignoring unexpected DIMSE message");
                }
                Received::Aborted => return Err(NetError::Aborted),
                Received::ReleaseRq => {
                    return Err(NetError::Protocol(
                        "peer asked for release mid-operation".into(),
                    ));
                }
            }
        }
    }

    pub(crate) fn echo(&mut self) -> Result<Status, NetError> {
        let pcid = self
            .contexts
            .iter()
            .find(|c| c.abstract_syntax == std_uids::VERIFICATION)
            .map(|c| c.id)
            .ok_or(NetError::NoAcceptedContext)?;
        let id = self.message_id();
        let mut rq = Command::new();
        rq.put_uid(tags::AFFECTED_SOP_CLASS_UID, std_uids::VERIFICATION)
            .put_u16(tags::COMMAND_FIELD, dimse::C_ECHO_RQ)
            .put_u16(tags::MESSAGE_ID, id)
            .put_u16(tags::COMMAND_DATA_SET_TYPE, dimse::NO_DATA_SET);
        self.conn.send_command(pcid, &rq)?;
        Ok(self.response(id, dimse::C_ECHO_RSP)?.status())
    }

    /// Send one instance. A missing presentation context gives a local
    /// failure status (0x0122) rather than an error.
    pub(crate) fn store(
        &mut self,
        file: &[u8],
        info: &FileInfo,
        originator: Option<(&str, u16)>,
    ) -> Result<Status, NetError> {
        let (pcid, data) = match prepare_store(file, info, &self.contexts) {
            Ok(x) => x,
            Err(status) => return Ok(status),
        };
        let id = self.message_id();
        let rq = store_request(id, info, originator);
        self.conn.send_command(pcid, &rq)?;
        self.conn.send_data(pcid, &data)?;
        Ok(self.response(id, dimse::C_STORE_RSP)?.status())
    }

    pub(crate) fn release(mut self) -> Result<(), NetError> {
        self.conn.send_pdu(&Pdu::ReleaseRQ)?;
        let r = loop {
            match self.conn.next() {
                Ok(Incoming::Pdu(Pdu::ReleaseRP)) => break Ok(()),
                Ok(Incoming::Pdu(Pdu::AbortRQ { .. })) => break Err(NetError::Aborted),
                Ok(Incoming::Pdv(pdv)) => {
                    // A late message; drop it.
                    let mut sink = Vec::new();
                    if let Err(e) = self.conn.read_value(pdv.len, &mut sink) {
                        break Err(e);
                    }
                }
                Ok(Incoming::Pdu(Pdu::ReleaseRQ)) => {
                    // Release collision: answer it.
                    let _ = self.conn.send_pdu(&Pdu::ReleaseRP);
                }
                Ok(Incoming::Pdu(p)) => {
                    break Err(NetError::Protocol(format!(
                        "unexpected PDU {} during release",
                        p.short_description()
                    )));
                }
                Err(NetError::Closed) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.conn.close();
        r
    }

    pub(crate) fn abort(mut self) {
        self.conn.abort();
    }
}

/// The C-STORE-RQ command set for a file.
pub(crate) fn store_request(
    msg_id: u16,
    info: &FileInfo,
    originator: Option<(&str, u16)>,
) -> Command {
    let mut rq = Command::new();
    rq.put_uid(tags::AFFECTED_SOP_CLASS_UID, &info.sop_class_uid)
        .put_u16(tags::COMMAND_FIELD, dimse::C_STORE_RQ)
        .put_u16(tags::MESSAGE_ID, msg_id)
        .put_u16(tags::PRIORITY, 0)
        .put_u16(tags::COMMAND_DATA_SET_TYPE, dimse::DATA_SET_PRESENT)
        .put_uid(tags::AFFECTED_SOP_INSTANCE_UID, &info.sop_instance_uid);
    if let Some((ae, id)) = originator {
        rq.put_text(tags::MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE, ae)
            .put_u16(tags::MOVE_ORIGINATOR_MESSAGE_ID, id);
    }
    rq
}

/// Choose the presentation context for a file among `contexts` and produce the
/// data set in its transfer syntax: as is when the transfer syntax matches,
/// re-encoded between native transfer syntaxes otherwise.
pub(crate) fn prepare_store<'a, 'c>(
    file: &'a [u8],
    info: &FileInfo,
    contexts: impl IntoIterator<Item = &'c Ctx>,
) -> Result<(u8, Cow<'a, [u8]>), Status> {
    let data = &file[info.data_offset..];
    let candidates: Vec<&Ctx> = contexts
        .into_iter()
        .filter(|c| c.abstract_syntax == info.sop_class_uid)
        .collect();
    if let Some(c) = candidates.iter().find(|c| c.ts == info.transfer_syntax) {
        return Ok((c.id, Cow::Borrowed(data)));
    }
    if uids::is_native(&info.transfer_syntax) {
        if let Some(c) = candidates.iter().find(|c| uids::is_native(&c.ts)) {
            return match part10::transcode(data, &info.transfer_syntax, &c.ts) {
                Ok(v) => Ok((c.id, Cow::Owned(v))),
                Err(e) => Err(Status::failure(
                    Status::CANNOT_UNDERSTAND,
                    format!("could not transcode data set: {e}"),
                )),
            };
        }
    }
    Err(Status::failure(
        Status::SOP_CLASS_NOT_SUPPORTED,
        "no presentation context accepted for this SOP class and transfer syntax",
    ))
}

/// Presentation contexts to propose for a set of files: for each SOP class and
/// transfer syntax one context with exactly that transfer syntax, plus one
/// context offering Explicit/Implicit VR LE per SOP class whose files are in a
/// native transfer syntax (to re-encode into if the exact one is refused).
pub(crate) fn proposals_for<'a>(infos: impl IntoIterator<Item = &'a FileInfo>) -> Vec<Proposal> {
    let mut out: Vec<Proposal> = Vec::new();
    for info in infos {
        let exact = (
            info.sop_class_uid.clone(),
            vec![info.transfer_syntax.clone()],
        );
        if !out.contains(&exact) {
            out.push(exact);
        }
        if uids::is_native(&info.transfer_syntax) {
            let fallback = (
                info.sop_class_uid.clone(),
                vec![uids::EXPLICIT_LE.to_string(), uids::IMPLICIT_LE.to_string()],
            );
            if !out.contains(&fallback) {
                out.push(fallback);
            }
        }
    }
    out
}

/// Split files into groups whose proposals fit in one association.
pub(crate) fn batches(infos: &[FileInfo]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut current: Vec<Proposal> = Vec::new();
    let mut start = 0;
    for (i, info) in infos.iter().enumerate() {
        let new: Vec<Proposal> = proposals_for([info])
            .into_iter()
            .filter(|p| !current.contains(p))
            .collect();
        if current.len() + new.len() > MAX_CONTEXTS && i > start {
            out.push(start..i);
            start = i;
            current = proposals_for([info]);
        } else {
            current.extend(new);
        }
    }
    if start < infos.len() {
        out.push(start..infos.len());
    }
    out
}

/// Open an association to `addr`, send every Part 10 file by C-STORE, release.
///
/// Returns one status per file, in order. A file whose SOP class / transfer
/// syntax the peer did not accept gets a local status 0x0122 (with a comment
/// saying so) instead of an error. Files that are not Part 10 files (no
/// preamble / file meta group) are refused up front with
/// [`NetError::InvalidFile`]. More than 128 distinct presentation contexts
/// are spread over several associations.
pub fn store_to(
    addr: SocketAddr,
    calling_ae: &str,
    called_ae: &str,
    files: &[Vec<u8>],
) -> Result<Vec<Status>, NetError> {
    let infos = files
        .iter()
        .enumerate()
        .map(|(index, f)| {
            part10::inspect(f).map_err(|reason| NetError::InvalidFile { index, reason })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut statuses = Vec::with_capacity(files.len());
    for range in batches(&infos) {
        let proposals = proposals_for(&infos[range.clone()]);
        let mut client = Client::open(addr, calling_ae, called_ae, &proposals)?;
        for i in range {
            match client.store(&files[i], &infos[i], None) {
                Ok(s) => statuses.push(s),
                Err(e) => {
                    warn!(error = %e, "C-STORE failed, aborting association");
                    client.abort();
                    return Err(e);
                }
            }
        }
        client.release()?;
    }
    Ok(statuses)
}

/// C-ECHO: open an association proposing Verification, echo, release.
pub fn echo(addr: SocketAddr, calling_ae: &str, called_ae: &str) -> Result<Status, NetError> {
    let proposals = vec![(
        std_uids::VERIFICATION.to_string(),
        vec![uids::EXPLICIT_LE.to_string(), uids::IMPLICIT_LE.to_string()],
    )];
    let mut client = Client::open(addr, calling_ae, called_ae, &proposals)?;
    match client.echo() {
        Ok(s) => {
            client.release()?;
            Ok(s)
        }
        Err(e) => {
            client.abort();
            Err(e)
        }
    }
}

//! Association negotiation (acceptor side) and presentation context records.

use std::collections::HashSet;

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextResult, PresentationContextResultReason,
    RequestorRoles, UserVariableItem,
};

use crate::uids::{self, Service, trim_uid};
use crate::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

/// An accepted presentation context.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub id: u8,
    pub abstract_syntax: String,
    pub ts: String,
}

/// Outcome of a successful negotiation.
#[derive(Debug)]
pub(crate) struct Negotiated {
    pub ac: AssociationAC,
    pub contexts: Vec<(Ctx, Service)>,
    /// Storage SOP classes for which the requestor may act as SCP (C-GET).
    pub requestor_scp: HashSet<String>,
    /// The requestor's maximum PDU length (0 = unlimited).
    pub peer_max: u32,
}

pub(crate) fn reject(
    result: AssociationRJResult,
    reason: AssociationRJServiceUserReason,
) -> AssociationRJ {
    AssociationRJ {
        result,
        source: AssociationRJSource::ServiceUser(reason),
    }
}

/// Decide on an A-ASSOCIATE-RQ.
pub(crate) fn negotiate(
    rq: &AssociationRQ,
    our_ae: &str,
    strict_called_ae: bool,
    max_pdu_length: u32,
) -> Result<Negotiated, AssociationRJ> {
    use AssociationRJResult::Permanent;
    if rq.protocol_version & 1 == 0 {
        return Err(AssociationRJ {
            result: Permanent,
            source: AssociationRJSource::ServiceProviderASCE(
                dicom_ul::pdu::AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
        });
    }
    if trim_uid(&rq.application_context_name) != uids::APPLICATION_CONTEXT {
        return Err(reject(
            Permanent,
            AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
        ));
    }
    if strict_called_ae && rq.called_ae_title.trim() != our_ae.trim() {
        return Err(reject(
            Permanent,
            AssociationRJServiceUserReason::CalledAETitleNotRecognized,
        ));
    }

    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    let mut contexts = Vec::new();
    for pc in &rq.presentation_contexts {
        let abstract_syntax = trim_uid(&pc.abstract_syntax).to_string();
        let (reason, ts) = match uids::classify(&abstract_syntax) {
            None => (
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                None,
            ),
            Some(service) => match uids::choose_ts(service, &pc.transfer_syntaxes) {
                None => (
                    PresentationContextResultReason::TransferSyntaxesNotSupported,
                    None,
                ),
                Some(ts) => {
                    contexts.push((
                        Ctx {
                            id: pc.id,
                            abstract_syntax: abstract_syntax.clone(),
                            ts: ts.clone(),
                        },
                        service,
                    ));
                    (PresentationContextResultReason::Acceptance, Some(ts))
                }
            },
        };
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            transfer_syntax: ts.unwrap_or_else(|| uids::IMPLICIT_LE.to_string()),
        });
    }

    let mut peer_max = dicom_ul::pdu::DEFAULT_MAX_PDU;
    let mut user_variables = vec![
        UserVariableItem::MaxLength(max_pdu_length),
        UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
        UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
    ];
    let mut requestor_scp = HashSet::new();
    for uv in &rq.user_variables {
        match uv {
            UserVariableItem::MaxLength(n) => peer_max = *n,
            UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles) => {
                let uid = trim_uid(uid);
                // Grant exactly what is proposed for storage classes (C-GET
                // sends C-STORE back to a requestor acting as SCP).
                if uids::is_storage(uid) {
                    if roles.scp {
                        requestor_scp.insert(uid.to_string());
                    }
                    user_variables.push(UserVariableItem::ScuScpRoleSelectionSubItem(
                        uid.to_string(),
                        RequestorRoles {
                            scu: roles.scu,
                            scp: roles.scp,
                        },
                    ));
                }
            }
            _ => {}
        }
    }

    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: uids::APPLICATION_CONTEXT.to_string(),
        presentation_contexts: results,
        user_variables,
    };
    Ok(Negotiated {
        ac,
        contexts,
        requestor_scp,
        peer_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    fn rq(called: &str) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "SCU".into(),
            called_ae_title: called.into(),
            application_context_name: uids::APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![
                PresentationContextProposed {
                    id: 1,
                    abstract_syntax: "1.2.840.10008.1.1".into(),
                    transfer_syntaxes: vec![uids::IMPLICIT_LE.into()],
                },
                PresentationContextProposed {
                    id: 3,
                    abstract_syntax: "1.2.3.4".into(),
                    transfer_syntaxes: vec![uids::IMPLICIT_LE.into()],
                },
                PresentationContextProposed {
                    id: 5,
                    abstract_syntax: "1.2.840.10008.5.1.4.1.1.2".into(),
                    transfer_syntaxes: vec!["1.2.840.10008.1.2.4.70".into()],
                },
            ],
            user_variables: vec![
                UserVariableItem::MaxLength(16384),
                UserVariableItem::ScuScpRoleSelectionSubItem(
                    "1.2.840.10008.5.1.4.1.1.2".into(),
                    RequestorRoles {
                        scu: false,
                        scp: true,
                    },
                ),
            ],
        }
    }

    #[test]
    fn negotiates_per_context() {
        let n = negotiate(&rq("ANY"), "ME", false, 65536).unwrap();
        let reasons: Vec<_> =
            n.ac.presentation_contexts
                .iter()
                .map(|r| r.reason.clone())
                .collect();
        assert_eq!(
            reasons,
            vec![
                PresentationContextResultReason::Acceptance,
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                PresentationContextResultReason::Acceptance,
            ]
        );
        assert_eq!(n.contexts.len(), 2);
        assert_eq!(n.contexts[1].0.ts, "1.2.840.10008.1.2.4.70");
        assert!(n.requestor_scp.contains("1.2.840.10008.5.1.4.1.1.2"));
        assert_eq!(n.peer_max, 16384);
        assert!(negotiate(&rq("ANY"), "ME", true, 65536).is_err());
        assert!(negotiate(&rq("ME"), "ME", true, 65536).is_ok());
    }
}

//! UIDs this crate negotiates, and the transfer syntax policy.

use dicom_dictionary_std::uids;
use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::Model;

pub(crate) const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
pub(crate) const IMPLICIT_LE: &str = uids::IMPLICIT_VR_LITTLE_ENDIAN;
pub(crate) const EXPLICIT_LE: &str = uids::EXPLICIT_VR_LITTLE_ENDIAN;
/// Explicit VR Big Endian (retired, still sent by some modalities).
pub(crate) const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";

/// Storage SOP classes outside the `1.2.840.10008.5.1.4.1.1.` arc.
const OTHER_STORAGE: &[&str] = &[
    "1.2.840.10008.5.1.4.34.7",  // RT Beams Delivery Instruction
    "1.2.840.10008.5.1.4.34.10", // RT Brachy Application Setup Delivery Instruction
    "1.2.840.10008.5.1.4.38.1",  // Hanging Protocol
    "1.2.840.10008.5.1.4.39.1",  // Color Palette
    "1.2.840.10008.5.1.4.43.1",  // Generic Implant Template
    "1.2.840.10008.5.1.4.44.1",  // Implant Assembly Template
    "1.2.840.10008.5.1.4.45.1",  // Implant Template Group
];

/// What a presentation context is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Verification,
    Storage,
    Find(Model),
    Move(Model),
    Get(Model),
}

/// Remove the padding a UID may carry on the wire.
pub(crate) fn trim_uid(uid: &str) -> &str {
    uid.trim_matches(|c: char| c == '\0' || c == ' ')
}

/// Whether an abstract syntax is a storage SOP class we accept.
pub(crate) fn is_storage(uid: &str) -> bool {
    (uid.starts_with("1.2.840.10008.5.1.4.1.1.") && uid.len() > "1.2.840.10008.5.1.4.1.1.".len())
        || OTHER_STORAGE.contains(&uid)
}

pub(crate) fn classify(abstract_syntax: &str) -> Option<Service> {
    let s = match abstract_syntax {
        uids::VERIFICATION => Service::Verification,
        uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND => {
            Service::Find(Model::PatientRoot)
        }
        uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND => Service::Find(Model::StudyRoot),
        uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE => {
            Service::Move(Model::PatientRoot)
        }
        uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE => Service::Move(Model::StudyRoot),
        uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET => Service::Get(Model::PatientRoot),
        uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET => Service::Get(Model::StudyRoot),
        other if is_storage(other) => Service::Storage,
        _ => return None,
    };
    Some(s)
}

/// Native (non-encapsulated, non-deflated) transfer syntaxes: data sets in
/// these can be parsed and re-encoded into one another.
pub(crate) fn is_native(ts: &str) -> bool {
    matches!(ts, IMPLICIT_LE | EXPLICIT_LE | EXPLICIT_BE)
}

/// Whether the transfer syntax registry knows this UID.
pub(crate) fn is_known_ts(ts: &str) -> bool {
    TransferSyntaxRegistry.get(ts).is_some()
}

/// Choose the transfer syntax for a proposed context: Explicit VR LE first,
/// then Implicit VR LE, then the first acceptable one in the proposer's order.
/// Storage accepts every transfer syntax the registry knows (data sets are
/// stored as received); other services accept native ones only, since their
/// identifiers are parsed here.
pub(crate) fn choose_ts(service: Service, proposed: &[String]) -> Option<String> {
    let proposed: Vec<&str> = proposed.iter().map(|t| trim_uid(t)).collect();
    let acceptable = |ts: &str| match service {
        Service::Storage => is_known_ts(ts),
        _ => is_native(ts),
    };
    for preferred in [EXPLICIT_LE, IMPLICIT_LE] {
        if proposed.contains(&preferred) {
            return Some(preferred.to_string());
        }
    }
    proposed
        .into_iter()
        .find(|ts| acceptable(ts))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_and_choose() {
        assert_eq!(classify(uids::CT_IMAGE_STORAGE), Some(Service::Storage));
        assert_eq!(
            classify("1.2.840.10008.5.1.4.1.1.481.5"),
            Some(Service::Storage)
        );
        assert_eq!(classify("1.2.840.10008.5.1.4.1.1."), None);
        assert_eq!(classify("1.3.46.670589.5.0.1.1"), None);
        assert_eq!(
            classify("1.2.840.10008.5.1.4.1.2.2.3"),
            Some(Service::Get(Model::StudyRoot))
        );
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            choose_ts(
                Service::Storage,
                &p(&["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"])
            ),
            Some(EXPLICIT_LE.into())
        );
        assert_eq!(
            choose_ts(Service::Storage, &p(&["1.2.840.10008.1.2.4.90"])),
            Some("1.2.840.10008.1.2.4.90".into())
        );
        assert_eq!(
            choose_ts(
                Service::Find(Model::StudyRoot),
                &p(&["1.2.840.10008.1.2.4.90"])
            ),
            None
        );
        assert_eq!(choose_ts(Service::Storage, &p(&["1.2.3.4"])), None);
        assert_eq!(
            choose_ts(Service::Verification, &p(&["1.2.840.10008.1.2\0"])),
            Some(IMPLICIT_LE.into())
        );
    }
}

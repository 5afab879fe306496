//! The node's DIMSE side: C-STORE into the ingest pipeline, C-FIND / C-MOVE / C-GET from the
//! index. A peer configured with `originals = true` (the organisation's own PACS or
//! workstations) sees the identified originals; any other AE sees the de-identified
//! derivatives; C-MOVE sends only to configured peers.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use dicom_core::{DataElement, PrimitiveValue, Tag};
use dicom_dictionary_std::tags;
use medledger_dicom_net::{InMemDicomObject, Level, Model, Peer, Provider, Receiving, Status};

use crate::index::{Include, Query, QueryLevel, View, text};
use crate::service::{Incoming, IngestError, Service, Stored};

/// The [`Provider`] of a node's imaging service.
#[derive(Debug, Clone)]
pub struct Dimse {
    service: Service,
}

impl Dimse {
    pub fn new(service: Service) -> Dimse {
        Dimse { service }
    }

    fn view(&self, peer: &Peer) -> View {
        let known = self
            .service
            .config()
            .dicom_peers
            .iter()
            // The AE title and the address it connects from: an AE title alone is a claim.
            .any(|p| {
                p.originals
                    && p.ae_title.trim() == peer.calling_ae.trim()
                    && p.addr.ip() == peer.addr.ip()
            });
        if known {
            View::Original
        } else {
            View::Deidentified
        }
    }
}

/// The C-STORE status of an ingest.
fn status(calling_ae: &str, r: Result<Stored, IngestError>) -> Status {
    match r {
        Ok(s) => {
            tracing::debug!(
                "C-STORE from {calling_ae}: {} stored{}",
                s.sop_instance_uid,
                if s.duplicate { " (again)" } else { "" }
            );
            match s.warning {
                // Stored, but only as an original: a warning the sender need not act on.
                Some(w) => Status {
                    code: 0xB000,
                    comment: Some(w),
                },
                None => Status::success(),
            }
        }
        Err(IngestError::Malformed(e)) => Status::failure(Status::CANNOT_UNDERSTAND, e),
        Err(IngestError::Conflict(e)) => Status::failure(0xC001, e),
        Err(IngestError::Unavailable(e)) => Status::failure(Status::OUT_OF_RESOURCES, e),
    }
}

/// A C-STORE data set written into the journal while it arrives.
struct Arriving {
    incoming: Incoming,
    calling_ae: String,
}

impl Receiving for Arriving {
    fn grew(&mut self, file: &[u8]) {
        self.incoming.grew(file);
    }

    fn finish(self: Box<Self>, file: Vec<u8>) -> Status {
        let Arriving {
            incoming,
            calling_ae,
        } = *self;
        status(&calling_ae, incoming.finish(file))
    }
}

/// Attributes of an identifier that are not matching or return keys.
fn is_control(tag: Tag) -> bool {
    tag == tags::QUERY_RETRIEVE_LEVEL
        || tag == tags::SPECIFIC_CHARACTER_SET
        || tag.group() == 0x0000
        || tag.group() == 0x0002
}

fn query_of(level: Level, identifier: &InMemDicomObject) -> Query {
    let level = match level {
        Level::Patient | Level::Study => QueryLevel::Study,
        Level::Series => QueryLevel::Series,
        Level::Image => QueryLevel::Instance,
    };
    let mut q = Query::new(level);
    let mut keys = Vec::new();
    for e in identifier.iter() {
        let tag = e.header().tag;
        if is_control(tag) || e.vr() == dicom_core::VR::SQ {
            continue;
        }
        keys.push(tag);
        let value = e.to_str().map(|s| s.to_string()).unwrap_or_default();
        let value = value
            .trim_matches(|c: char| c == '\0' || c == ' ')
            .to_string();
        if !value.is_empty() {
            q.filters.push((tag, value));
        }
    }
    q.include = Include::Tags(keys);
    q
}

/// A C-FIND response: exactly the identifier's keys, with values where the match has them.
fn response(identifier: &InMemDicomObject, found: &InMemDicomObject) -> InMemDicomObject {
    let mut out = InMemDicomObject::new_empty();
    for e in identifier.iter() {
        let tag = e.header().tag;
        if is_control(tag) {
            if tag == tags::SPECIFIC_CHARACTER_SET {
                if let Some(v) = found.get(tag) {
                    out.put(v.clone());
                }
            }
            continue;
        }
        match found.get(tag) {
            Some(v) => out.put(v.clone()),
            None => out.put(DataElement::new(tag, e.vr(), PrimitiveValue::Empty)),
        };
    }
    out
}

impl Provider for Dimse {
    fn receive_buffer(&self, len: usize) -> Vec<u8> {
        medledger_store::pool::take(len)
    }

    fn store(&self, peer: &Peer, file: Vec<u8>) -> Status {
        status(&peer.calling_ae, self.service.ingest(file))
    }

    fn receiving(&self, peer: &Peer, sop_instance_uid: &str) -> Option<Box<dyn Receiving>> {
        let incoming = self.service.receive(sop_instance_uid)?;
        Some(Box::new(Arriving {
            incoming,
            calling_ae: peer.calling_ae.clone(),
        }))
    }

    fn find(
        &self,
        peer: &Peer,
        _model: Model,
        level: Level,
        identifier: &InMemDicomObject,
    ) -> Result<Vec<InMemDicomObject>, Status> {
        let view = self.view(peer);
        let q = query_of(level, identifier);
        let found = self.service.index().search(view, &q);
        let mut out = Vec::new();
        let mut patients = BTreeSet::new();
        for f in &found {
            if level == Level::Patient && !patients.insert(text(f, tags::PATIENT_ID)) {
                continue;
            }
            out.push(response(identifier, f));
        }
        Ok(out)
    }

    fn select(
        &self,
        peer: &Peer,
        _model: Model,
        _level: Level,
        identifier: &InMemDicomObject,
    ) -> Result<Vec<String>, Status> {
        let view = self.view(peer);
        let mut q = query_of(Level::Image, identifier);
        q.include = Include::Defaults;
        if q.filters.is_empty() {
            return Err(Status::failure(
                Status::IDENTIFIER_MISMATCH,
                "a retrieve names at least one study, series or instance UID",
            ));
        }
        let found = self.service.index().search(view, &q);
        Ok(found
            .iter()
            .map(|f| text(f, tags::SOP_INSTANCE_UID))
            .collect())
    }

    fn fetch(&self, peer: &Peer, sop_instance_uid: &str) -> Result<Vec<u8>, Status> {
        let view = self.view(peer);
        let entry = {
            let index = self.service.index();
            index
                .visible(view)
                .into_iter()
                .flat_map(|(_, items)| items)
                .find(|l| l.entry.sop_instance_uid == sop_instance_uid)
                .map(|l| l.entry)
        };
        let entry =
            entry.ok_or_else(|| Status::failure(Status::CANNOT_UNDERSTAND, "no such instance"))?;
        self.service.read_instance(&entry).map_err(|e| {
            tracing::error!("reading {sop_instance_uid}: {e}");
            Status::failure(
                Status::OUT_OF_RESOURCES,
                "the stored instance failed verification",
            )
        })
    }

    fn destination(&self, ae_title: &str) -> Option<SocketAddr> {
        self.service
            .config()
            .dicom_peers
            .iter()
            .find(|p| p.ae_title.trim() == ae_title.trim())
            .map(|p| p.addr)
    }
}

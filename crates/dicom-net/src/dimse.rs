//! DIMSE command sets: group 0000 elements, always Implicit VR Little Endian
//! (PS3.7 6.3.1). Encoded and decoded here; every value is kept as raw bytes.

use dicom_core::Tag;
use dicom_dictionary_std::tags;

use crate::Status;

pub(crate) const C_STORE_RQ: u16 = 0x0001;
pub(crate) const C_STORE_RSP: u16 = 0x8001;
pub(crate) const C_GET_RQ: u16 = 0x0010;
pub(crate) const C_GET_RSP: u16 = 0x8010;
pub(crate) const C_FIND_RQ: u16 = 0x0020;
pub(crate) const C_FIND_RSP: u16 = 0x8020;
pub(crate) const C_MOVE_RQ: u16 = 0x0021;
pub(crate) const C_MOVE_RSP: u16 = 0x8021;
pub(crate) const C_ECHO_RQ: u16 = 0x0030;
pub(crate) const C_ECHO_RSP: u16 = 0x8030;
pub(crate) const C_CANCEL_RQ: u16 = 0x0FFF;

/// (0000,0800) value meaning "no data set".
pub(crate) const NO_DATA_SET: u16 = 0x0101;
/// (0000,0800) value we send when a data set follows.
pub(crate) const DATA_SET_PRESENT: u16 = 0x0001;

/// Largest command set accepted (they are a few hundred bytes in practice).
pub(crate) const MAX_COMMAND_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Command {
    /// Elements sorted by tag, group length excluded.
    elems: Vec<(Tag, Vec<u8>)>,
}

impl Command {
    pub(crate) fn new() -> Command {
        Command::default()
    }

    fn put_raw(&mut self, tag: Tag, value: Vec<u8>) {
        match self.elems.binary_search_by(|(t, _)| t.cmp(&tag)) {
            Ok(i) => self.elems[i].1 = value,
            Err(i) => self.elems.insert(i, (tag, value)),
        }
    }

    pub(crate) fn put_u16(&mut self, tag: Tag, v: u16) -> &mut Self {
        self.put_raw(tag, v.to_le_bytes().to_vec());
        self
    }

    /// UI values are padded with NUL, all others (AE, LO) with a space.
    pub(crate) fn put_uid(&mut self, tag: Tag, uid: &str) -> &mut Self {
        let mut v = uid.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        self.put_raw(tag, v);
        self
    }

    pub(crate) fn put_text(&mut self, tag: Tag, text: &str) -> &mut Self {
        let mut v = text.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        self.put_raw(tag, v);
        self
    }

    pub(crate) fn get(&self, tag: Tag) -> Option<&[u8]> {
        self.elems
            .binary_search_by(|(t, _)| t.cmp(&tag))
            .ok()
            .map(|i| self.elems[i].1.as_slice())
    }

    pub(crate) fn get_u16(&self, tag: Tag) -> Option<u16> {
        let v = self.get(tag)?;
        (v.len() >= 2).then(|| u16::from_le_bytes([v[0], v[1]]))
    }

    pub(crate) fn get_str(&self, tag: Tag) -> Option<String> {
        let v = self.get(tag)?;
        let s = String::from_utf8_lossy(v);
        let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
        (!s.is_empty()).then(|| s.to_string())
    }

    pub(crate) fn command_field(&self) -> Option<u16> {
        self.get_u16(tags::COMMAND_FIELD)
    }

    pub(crate) fn message_id(&self) -> Option<u16> {
        self.get_u16(tags::MESSAGE_ID)
    }

    pub(crate) fn has_data_set(&self) -> bool {
        // A missing (0000,0800) is malformed; assume no data set follows.
        self.get_u16(tags::COMMAND_DATA_SET_TYPE)
            .is_some_and(|v| v != NO_DATA_SET)
    }

    pub(crate) fn status(&self) -> Status {
        Status {
            code: self
                .get_u16(tags::STATUS)
                .unwrap_or(Status::CANNOT_UNDERSTAND),
            comment: self.get_str(tags::ERROR_COMMENT),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let body_len: usize = self.elems.iter().map(|(_, v)| 8 + v.len()).sum();
        let mut out = Vec::with_capacity(12 + body_len);
        push_header(&mut out, tags::COMMAND_GROUP_LENGTH, 4);
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        for (tag, v) in &self.elems {
            push_header(&mut out, *tag, v.len() as u32);
            out.extend_from_slice(v);
        }
        out
    }

    /// Decode an Implicit VR LE command set. Elements outside group 0000 and
    /// undefined lengths are errors; the group length is not trusted.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Command, String> {
        let mut cmd = Command::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            if rest.len() < 8 {
                return Err(format!("{} trailing bytes in command set", rest.len()));
            }
            let group = u16::from_le_bytes([rest[0], rest[1]]);
            let elem = u16::from_le_bytes([rest[2], rest[3]]);
            let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            if group != 0x0000 {
                return Err(format!("element ({group:04X},{elem:04X}) in command set"));
            }
            if len > rest.len() - 8 {
                return Err(format!("element (0000,{elem:04X}) overruns command set"));
            }
            let tag = Tag(group, elem);
            if tag != tags::COMMAND_GROUP_LENGTH {
                cmd.put_raw(tag, rest[8..8 + len].to_vec());
            }
            rest = &rest[8 + len..];
        }
        if cmd.command_field().is_none() {
            return Err("command set without (0000,0100) Command Field".into());
        }
        Ok(cmd)
    }
}

fn push_header(out: &mut Vec<u8>, tag: Tag, len: u32) {
    out.extend_from_slice(&tag.group().to_le_bytes());
    out.extend_from_slice(&tag.element().to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

/// Make an Error Comment safe to send: at most 64 characters of printable
/// ASCII without backslash (LO value rules).
pub(crate) fn sanitize_comment(comment: &str) -> String {
    comment
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '\\' || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(64)
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// Build a response command set for request `rq`.
pub(crate) fn response(
    command_field: u16,
    rq: &Command,
    status: &Status,
    with_data_set: bool,
) -> Command {
    let mut rsp = Command::new();
    rsp.put_u16(tags::COMMAND_FIELD, command_field);
    rsp.put_u16(
        tags::MESSAGE_ID_BEING_RESPONDED_TO,
        rq.message_id().unwrap_or(0),
    );
    if let Some(uid) = rq
        .get_str(tags::AFFECTED_SOP_CLASS_UID)
        .or_else(|| rq.get_str(tags::REQUESTED_SOP_CLASS_UID))
    {
        rsp.put_uid(tags::AFFECTED_SOP_CLASS_UID, &uid);
    }
    rsp.put_u16(
        tags::COMMAND_DATA_SET_TYPE,
        if with_data_set {
            DATA_SET_PRESENT
        } else {
            NO_DATA_SET
        },
    );
    rsp.put_u16(tags::STATUS, status.code);
    if status.code != Status::SUCCESS && !status.is_pending() {
        if let Some(c) = &status.comment {
            let c = sanitize_comment(c);
            if !c.is_empty() {
                rsp.put_text(tags::ERROR_COMMENT, &c);
            }
        }
    }
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut c = Command::new();
        c.put_u16(tags::COMMAND_FIELD, C_ECHO_RQ)
            .put_u16(tags::MESSAGE_ID, 7)
            .put_uid(tags::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.1.1")
            .put_u16(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET);
        let bytes = c.encode();
        let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 12);
        let d = Command::decode(&bytes).unwrap();
        assert_eq!(d, c);
        assert_eq!(
            d.get_str(tags::AFFECTED_SOP_CLASS_UID).as_deref(),
            Some("1.2.840.10008.1.1")
        );
        assert!(!d.has_data_set());
    }

    #[test]
    fn malformed() {
        assert!(Command::decode(&[1, 2, 3]).is_err());
        assert!(Command::decode(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Command::decode(&[8, 0, 0x16, 0, 0, 0, 0, 0]).is_err());
        assert!(Command::decode(&[]).is_err());
    }

    #[test]
    fn comment_is_sanitized() {
        let long = "é\\x".repeat(40);
        let s = sanitize_comment(&long);
        assert!(s.len() <= 64);
        assert!(s.chars().all(|c| c.is_ascii() && c != '\\'));
    }
}

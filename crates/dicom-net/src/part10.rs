//! DICOM Part 10 framing: preamble, magic code, file meta group.

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::uids::trim_uid;
use crate::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, NetError};

/// Preamble, `DICM` and the file meta group for a received instance. The data
/// set bytes are to be appended as received.
pub(crate) fn header(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    transfer_syntax: &str,
    source_ae: &str,
) -> Result<Vec<u8>, NetError> {
    let mut builder = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class_uid)
        .media_storage_sop_instance_uid(sop_instance_uid)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    if !source_ae.is_empty() {
        builder = builder.source_application_entity_title(source_ae);
    }
    let meta = builder.build().map_err(|e| NetError::Encoding {
        context: "building the file meta group",
        source: Box::new(e),
    })?;
    let mut out = Vec::with_capacity(1024);
    out.resize(128, 0);
    out.extend_from_slice(b"DICM");
    meta.write(&mut out).map_err(|e| NetError::Encoding {
        context: "writing the file meta group",
        source: Box::new(e),
    })?;
    Ok(out)
}

/// What a sender needs to know about a Part 10 file.
#[derive(Debug, Clone)]
pub(crate) struct FileInfo {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    /// Offset of the data set in the file.
    pub data_offset: usize,
}

/// Parse the file meta group of a Part 10 file.
pub(crate) fn inspect(file: &[u8]) -> Result<FileInfo, String> {
    if file.len() < 144 || &file[128..132] != b"DICM" {
        return Err("missing preamble or DICM magic code".into());
    }
    // (0002,0000) UL 4 <group length>, Explicit VR LE
    if file[132..138] != [0x02, 0x00, 0x00, 0x00, b'U', b'L'] {
        return Err("file meta group does not start with its group length".into());
    }
    let group_len = u32::from_le_bytes([file[140], file[141], file[142], file[143]]) as usize;
    let data_offset = 144usize
        .checked_add(group_len)
        .filter(|&o| o <= file.len())
        .ok_or("file meta group length exceeds the file")?;
    let meta = dicom_object::FileMetaTable::from_reader(&file[128..])
        .map_err(|e| format!("invalid file meta group: {e}"))?;
    let info = FileInfo {
        sop_class_uid: trim_uid(meta.media_storage_sop_class_uid()).to_string(),
        sop_instance_uid: trim_uid(meta.media_storage_sop_instance_uid()).to_string(),
        transfer_syntax: trim_uid(meta.transfer_syntax()).to_string(),
        data_offset,
    };
    if info.sop_class_uid.is_empty() || info.sop_instance_uid.is_empty() {
        return Err("file meta group lacks the media storage SOP class/instance UID".into());
    }
    Ok(info)
}

/// Re-encode a data set between two native transfer syntaxes.
pub(crate) fn transcode(data: &[u8], from: &str, to: &str) -> Result<Vec<u8>, NetError> {
    let lookup = |uid: &str| {
        TransferSyntaxRegistry
            .get(uid)
            .ok_or_else(|| NetError::Protocol(format!("unknown transfer syntax {uid}")))
    };
    let (from_ts, to_ts) = (lookup(from)?, lookup(to)?);
    let obj =
        InMemDicomObject::read_dataset_with_ts(data, from_ts).map_err(|e| NetError::Encoding {
            context: "parsing a data set to transcode it",
            source: Box::new(e),
        })?;
    let mut out = Vec::with_capacity(data.len() + data.len() / 8);
    obj.write_dataset_with_ts(&mut out, to_ts)
        .map_err(|e| NetError::Encoding {
            context: "writing a transcoded data set",
            source: Box::new(e),
        })?;
    Ok(out)
}

/// Encode a data set (identifier) in the given transfer syntax.
pub(crate) fn encode_dataset(obj: &InMemDicomObject, ts: &str) -> Result<Vec<u8>, NetError> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| NetError::Protocol(format!("unknown transfer syntax {ts}")))?;
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| NetError::Encoding {
            context: "encoding an identifier",
            source: Box::new(e),
        })?;
    Ok(out)
}

/// Decode a data set (identifier) from the given transfer syntax.
pub(crate) fn decode_dataset(data: &[u8], ts: &str) -> Result<InMemDicomObject, NetError> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| NetError::Protocol(format!("unknown transfer syntax {ts}")))?;
    InMemDicomObject::read_dataset_with_ts(data, ts).map_err(|e| NetError::Encoding {
        context: "decoding an identifier",
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let mut file = header(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3.4.5",
            "1.2.840.10008.1.2",
            "AE1",
        )
        .unwrap();
        let data_at = file.len();
        file.extend_from_slice(&[0x08, 0x00, 0x16, 0x00, 0, 0, 0, 0]);
        let info = inspect(&file).unwrap();
        assert_eq!(info.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(info.sop_instance_uid, "1.2.3.4.5");
        assert_eq!(info.transfer_syntax, "1.2.840.10008.1.2");
        assert_eq!(info.data_offset, data_at);
        assert!(inspect(&file[..100]).is_err());
        assert!(inspect(&[0u8; 300]).is_err());
    }
}

//! A walk over element headers, before the real parser runs, that rejects an element
//! declaring more bytes than the input holds.
//!
//! dicom-rs allocates a declared value length before reading it, so a corrupt or hostile
//! length of 3 GB costs 3 GB of memory and seconds of zero-filling before the read fails.
//! This walk reads headers only (never values) and stops, accepting, as soon as it is unsure
//! where the next header is: it may miss a bad length, but never rejects a well-formed file.

/// Value representations whose explicit-VR header has a 4-byte length.
fn long_length_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

const UNDEFINED: u32 = 0xFFFF_FFFF;

/// Whether the dictionary knows the tag as a sequence (or it is pixel data, which may be
/// encapsulated).
fn is_sequence(group: u16, element: u16) -> bool {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
    if (group, element) == (0x7FE0, 0x0010) {
        return true;
    }
    matches!(
        dicom_dictionary_std::StandardDataDictionary
            .by_tag(dicom_core::Tag(group, element))
            .map(|e| e.vr()),
        Some(VirtualVr::Exact(dicom_core::VR::SQ))
    )
}

/// One element header as the parser reads it.
struct Header {
    group: u16,
    element: u16,
    /// The VR bytes (explicit VR, not items or delimiters) and whether the VR is one the
    /// parser knows; it reads an unknown one as UN, with a 4-byte length.
    vr: Option<([u8; 2], bool)>,
    /// Bytes of the header itself.
    len: usize,
    length: u32,
}

/// Reads element headers of a data set in one encoding.
struct Headers<'a> {
    data: &'a [u8],
    explicit: bool,
    big_endian: bool,
}

impl Headers<'_> {
    fn u16_at(&self, p: usize) -> u16 {
        let b = [self.data[p], self.data[p + 1]];
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32_at(&self, p: usize) -> u32 {
        let b = [
            self.data[p],
            self.data[p + 1],
            self.data[p + 2],
            self.data[p + 3],
        ];
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// The header at `pos`, or `None` when the data ends inside it.
    fn at(&self, pos: usize) -> Option<Header> {
        if pos + 8 > self.data.len() {
            return None;
        }
        let (group, element) = (self.u16_at(pos), self.u16_at(pos + 2));
        // Items and delimiters: tag and a 4-byte length, no VR, in every syntax.
        if group == 0xFFFE || !self.explicit {
            return Some(Header {
                group,
                element,
                vr: None,
                len: 8,
                length: self.u32_at(pos + 4),
            });
        }
        let vr = [self.data[pos + 4], self.data[pos + 5]];
        let known = dicom_core::VR::from_binary(vr).is_some();
        let (len, length) = if !known || long_length_vr(vr) {
            if pos + 12 > self.data.len() {
                return None;
            }
            (12, self.u32_at(pos + 8))
        } else {
            (8, u32::from(self.u16_at(pos + 6)))
        };
        Some(Header {
            group,
            element,
            vr: Some((vr, known)),
            len,
            length,
        })
    }
}

/// Checks the headers of a data set encoded with `explicit` VR and `big_endian` byte order.
/// Returns a message naming the first element whose length runs past the end.
///
/// `strict` is for data sets read without a usable file meta group, where the encoding is a
/// guess: there a walk that loses its way, or an undefined length on an element that is not
/// a sequence, means the guess is wrong, and the reader would misread it expensively.
///
/// An unknown VR is read as the parser reads it (UN, 4-byte length), or a file that is really
/// implicit VR would have the parser allocate whatever four value bytes say, gigabytes,
/// before it fails.
pub fn check_lengths(
    data: &[u8],
    explicit: bool,
    big_endian: bool,
    strict: bool,
) -> Result<(), String> {
    let headers = Headers {
        data,
        explicit,
        big_endian,
    };
    let mut pos = 0usize;
    loop {
        let not_explicit = || {
            format!("no value representation where one was expected at byte {pos}: not explicit VR")
        };
        let Some(h) = headers.at(pos) else {
            // Ends inside a header: if it is an unknown VR's long one, that says enough.
            let vr = data.get(pos + 4..pos + 6).filter(|_| pos + 8 <= data.len());
            if strict
                && explicit
                && vr.is_some_and(|v| dicom_core::VR::from_binary([v[0], v[1]]).is_none())
            {
                return Err(not_explicit());
            }
            break;
        };
        let (group, element, length) = (h.group, h.element, h.length);
        match h.vr {
            Some((_, false)) if strict => return Err(not_explicit()),
            // An undefined-length UN holds an implicit VR sequence (CP-246). The DICOM
            // reader used here takes the first item tag for a length and allocates gigabytes
            // before failing: refuse it now, clearly.
            Some((vr, _)) if &vr == b"UN" && length == UNDEFINED => {
                return Err(format!(
                    "element ({group:04X},{element:04X}) is an undefined-length UN sequence (CP-246), which this reader cannot decode; re-encode the file with its sequences given their VR (e.g. dcmconv +ti)"
                ));
            }
            _ => {}
        }
        pos += h.len;
        if length == UNDEFINED
            && strict
            && !explicit
            && group != 0xFFFE
            && !is_sequence(group, element)
        {
            return Err(format!(
                "element ({group:04X},{element:04X}) has an undefined length but is not a sequence: not implicit VR"
            ));
        }
        if length == UNDEFINED {
            // A sequence, an item or encapsulated pixel data: its contents are headers too.
            continue;
        }
        let remaining = data.len() - pos;
        if length as usize > remaining {
            return Err(format!(
                "element ({group:04X},{element:04X}) declares {length} bytes but only {remaining} remain: the file is truncated or corrupt"
            ));
        }
        pos += length as usize;
    }
    Ok(())
}

/// Where the top-level Pixel Data (7FE0,0010) element starts, when it is the data set's last
/// element and its value ends exactly at the end of `data`: then everything before it is the
/// header, and the element's bytes can be carried over verbatim. `None` whenever the walk is
/// unsure (nested lengths that do not add up, trailing elements or padding, an encapsulated
/// value whose fragments do not close at the end, pixel data read as UN): the caller then
/// parses the whole data set.
pub fn top_level_pixel_data(data: &[u8], explicit: bool, big_endian: bool) -> Option<usize> {
    let headers = Headers {
        data,
        explicit,
        big_endian,
    };
    let mut pos = 0usize;
    // Open undefined-length sequences and items.
    let mut depth = 0usize;
    while let Some(h) = headers.at(pos) {
        let start = pos;
        pos += h.len;
        if h.group == 0xFFFE {
            match h.element {
                0xE000 if depth > 0 => {
                    if h.length == UNDEFINED {
                        depth += 1;
                    } else {
                        pos = pos.checked_add(h.length as usize)?;
                    }
                }
                0xE00D | 0xE0DD if depth > 0 => depth -= 1,
                _ => return None,
            }
            continue;
        }
        if depth == 0 && (h.group, h.element) == (0x7FE0, 0x0010) {
            if matches!(h.vr, Some((v, _)) if &v != b"OB" && &v != b"OW") {
                return None;
            }
            if h.length != UNDEFINED {
                return (pos.checked_add(h.length as usize)? == data.len()).then_some(start);
            }
            // Encapsulated (explicit VR only): defined-length fragments, then the sequence
            // delimiter, then the end of the data set.
            h.vr?;
            while let Some(f) = headers.at(pos) {
                pos += 8;
                match (f.group, f.element) {
                    (0xFFFE, 0xE000) if f.length != UNDEFINED => {
                        pos = pos.checked_add(f.length as usize)?;
                    }
                    (0xFFFE, 0xE0DD) => return (pos == data.len()).then_some(start),
                    _ => return None,
                }
            }
            return None;
        }
        if h.length == UNDEFINED {
            depth += 1;
        } else {
            pos = pos.checked_add(h.length as usize)?;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_and_rejects_overlong() {
        // (0010,0010) PN "DOE^J " then (7FE0,0010) OW of 4 bytes, explicit little endian.
        let mut ok = vec![0x10, 0x00, 0x10, 0x00, b'P', b'N', 6, 0];
        ok.extend_from_slice(b"DOE^J ");
        ok.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 4, 0, 0, 0, 1, 2, 3, 4,
        ]);
        assert!(check_lengths(&ok, true, false, false).is_ok());
        let mut bad = ok.clone();
        bad[8 + 6 + 8] = 0xFF; // pixel data length 0x...FF04
        bad[8 + 6 + 10] = 0x10;
        let err = check_lengths(&bad, true, false, false).unwrap_err();
        assert!(err.contains("(7FE0,0010)"), "{err}");
        // Implicit: (0008,0018) with length 1,000,000.
        let implicit = [0x08, 0x00, 0x18, 0x00, 0x40, 0x42, 0x0F, 0x00, b'1', b'2'];
        assert!(check_lengths(&implicit, false, false, false).is_err());
        // An unknown VR is read as UN, with a 4-byte length: an implicit VR data set under an
        // explicit transfer syntax fails here, before the parser allocates what it declares.
        let mislabelled = [
            0x08, 0x00, 0x08, 0x00, 0x12, 0x00, 0x00, 0x00, b'D', b'E', b'R', b'I',
        ];
        let err = check_lengths(&mislabelled, true, false, false).unwrap_err();
        assert!(err.contains("(0008,0008)"), "{err}");
        assert!(check_lengths(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0], true, false, false).is_ok());
        // Where the encoding is a guess, no VR means it is not explicit VR.
        assert!(check_lengths(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], true, false, true).is_err());
        // Undefined length on a non-sequence in a guessed implicit data set.
        let odd = [0x01, 0x00, 0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(check_lengths(&odd, false, false, true).is_err());
        assert!(check_lengths(&odd, false, false, false).is_ok());
    }

    fn explicit(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        if long_length_vr(*vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    fn item_header(element: u16, length: u32) -> Vec<u8> {
        let mut out = vec![0xFE, 0xFF];
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out
    }

    #[test]
    fn finds_the_last_top_level_pixel_data_only() {
        let name = explicit((0x0010, 0x0010), b"PN", b"DOE^J ");
        let pixels = explicit((0x7FE0, 0x0010), b"OW", &[1, 2, 3, 4]);
        let plain = [name.clone(), pixels.clone()].concat();
        assert_eq!(top_level_pixel_data(&plain, true, false), Some(name.len()));

        // Something after it (trailing padding): not the last element, read everything.
        let padded = [plain.clone(), explicit((0xFFFC, 0xFFFC), b"OB", &[0, 0])].concat();
        assert_eq!(top_level_pixel_data(&padded, true, false), None);
        // Truncated: the value does not end at the end.
        assert_eq!(
            top_level_pixel_data(&plain[..plain.len() - 1], true, false),
            None
        );

        // An icon's Pixel Data nested in an undefined-length sequence is not the one.
        let mut icon = explicit((0x0088, 0x0200), b"SQ", &[]);
        icon.truncate(icon.len() - 4);
        icon.extend_from_slice(&UNDEFINED.to_le_bytes());
        icon.extend(item_header(0xE000, UNDEFINED));
        icon.extend(explicit((0x7FE0, 0x0010), b"OB", &[9, 9]));
        icon.extend(item_header(0xE00D, 0));
        icon.extend(item_header(0xE0DD, 0));
        let nested = [name.clone(), icon.clone(), pixels.clone()].concat();
        assert_eq!(
            top_level_pixel_data(&nested, true, false),
            Some(name.len() + icon.len())
        );
        let only_icon = [name.clone(), icon].concat();
        assert_eq!(top_level_pixel_data(&only_icon, true, false), None);

        // Encapsulated: offset table, one fragment, delimiter, end.
        let mut encapsulated = explicit((0x7FE0, 0x0010), b"OB", &[]);
        encapsulated.truncate(encapsulated.len() - 4);
        encapsulated.extend_from_slice(&UNDEFINED.to_le_bytes());
        encapsulated.extend(item_header(0xE000, 0));
        encapsulated.extend(item_header(0xE000, 4));
        encapsulated.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xD9]);
        let open = [name.clone(), encapsulated.clone()].concat();
        assert_eq!(
            top_level_pixel_data(&open, true, false),
            None,
            "no delimiter"
        );
        encapsulated.extend(item_header(0xE0DD, 0));
        let closed = [name.clone(), encapsulated].concat();
        assert_eq!(top_level_pixel_data(&closed, true, false), Some(name.len()));

        // Pixel Data read as UN is left to the full parser.
        let un = [name.clone(), explicit((0x7FE0, 0x0010), b"UN", &[1, 2])].concat();
        assert_eq!(top_level_pixel_data(&un, true, false), None);
    }
}

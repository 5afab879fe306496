//! The transformation of one data set: every attribute, at every depth of sequences, gets the
//! action that Table E.1-1 and the options give it; private attributes go unless on the safe
//! list; the identifying values of the input are gathered first so that retained free text
//! can be scrubbed and the output scanned.
//!
//! Pixel Data is moved, never copied or re-encoded, unless the Clean Pixel Data option masks
//! regions of it (that is the caller's decision, in `lib.rs`).

use std::collections::HashMap;

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;
use serde::Serialize;
use smallvec::SmallVec;

use crate::dates;
use crate::key::DeidKey;
use crate::options::{DeidOption, OptionSet};
use crate::private::SafePrivateList;
use crate::residual::{Finding, FindingKind, IdentifierKind, Needles};
use crate::table::{Action, ProfileTable, attribute_type, resolve};

/// Dummy text for the D action (fits SH, CS and AE limits).
pub const DUMMY_TEXT: &str = "ANONYMIZED";

/// How many attributes each action touched in one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActionCounts {
    pub removed: u32,
    pub emptied: u32,
    pub dummied: u32,
    pub kept: u32,
    pub cleaned: u32,
    pub uids_replaced: u32,
    pub private_removed: u32,
    pub private_retained: u32,
    pub text_scrubbed: u32,
}

/// Everything the transformation of one instance needs.
pub(crate) struct Context<'a> {
    pub table: &'a ProfileTable,
    pub options: &'a OptionSet,
    pub key: &'a DeidKey,
    pub safe_private: &'a SafePrivateList,
    pub sop_class_uid: String,
    pub pseudonym: String,
    /// Days to shift dates by, under the Modified Dates option.
    pub date_shift: Option<i64>,
    pub needles: Needles,
    pub counts: ActionCounts,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    /// Inside a sequence the profile replaces with a dummy (D): items keep their structure and
    /// codes, every free-text value becomes the dummy.
    Strict,
}

fn is_text_vr(vr: VR) -> bool {
    matches!(
        vr,
        VR::LO | VR::SH | VR::ST | VR::LT | VR::UT | VR::UC | VR::PN | VR::CS | VR::AE | VR::UR
    )
}

fn is_free_text_vr(vr: VR) -> bool {
    matches!(vr, VR::LO | VR::SH | VR::ST | VR::LT | VR::UT | VR::UC)
}

fn strings_of(elem: &InMemElement) -> Option<Vec<String>> {
    match elem.value() {
        Value::Primitive(PrimitiveValue::Empty) => Some(Vec::new()),
        Value::Primitive(p @ (PrimitiveValue::Str(_) | PrimitiveValue::Strs(_))) => {
            Some(p.to_multi_str().into_owned())
        }
        Value::Primitive(PrimitiveValue::Date(_) | PrimitiveValue::Time(_))
        | Value::Primitive(PrimitiveValue::DateTime(_)) => {
            elem.value().to_multi_str().ok().map(|c| c.into_owned())
        }
        _ => None,
    }
}

fn strs_value(values: Vec<String>) -> PrimitiveValue {
    if values.is_empty() {
        PrimitiveValue::Empty
    } else {
        PrimitiveValue::Strs(values.into_iter().collect::<SmallVec<[String; 2]>>())
    }
}

fn with_strings(tag: Tag, vr: VR, values: Vec<String>) -> InMemElement {
    DataElement::new(tag, vr, strs_value(values))
}

fn empty_element(tag: Tag, vr: VR) -> InMemElement {
    if vr == VR::SQ {
        DataElement::new(
            tag,
            VR::SQ,
            DataSetSequence::new(Vec::<InMemDicomObject>::new(), Length::UNDEFINED),
        )
    } else {
        DataElement::new(tag, vr, PrimitiveValue::Empty)
    }
}

/// The identifiers the residual scan looks for beyond person names: tag, kind, and the option
/// that, when selected, retains the attribute (so its value is no needle).
const IDENTIFIER_TAGS: &[(Tag, IdentifierKind, Option<DeidOption>)] = &[
    (tags::PATIENT_ID, IdentifierKind::PatientId, None),
    (Tag(0x0010, 0x1000), IdentifierKind::PatientId, None),
    (Tag(0x0010, 0x1090), IdentifierKind::PatientId, None),
    (
        tags::ACCESSION_NUMBER,
        IdentifierKind::OtherIdentifier,
        None,
    ),
    (tags::ADMISSION_ID, IdentifierKind::OtherIdentifier, None),
    (
        tags::SERVICE_EPISODE_ID,
        IdentifierKind::OtherIdentifier,
        None,
    ),
    (
        tags::REQUESTED_PROCEDURE_ID,
        IdentifierKind::OtherIdentifier,
        None,
    ),
    (
        tags::SCHEDULED_PROCEDURE_STEP_ID,
        IdentifierKind::OtherIdentifier,
        None,
    ),
    (
        tags::PERFORMED_PROCEDURE_STEP_ID,
        IdentifierKind::OtherIdentifier,
        None,
    ),
    (
        tags::PLACER_ORDER_NUMBER_IMAGING_SERVICE_REQUEST,
        IdentifierKind::OtherIdentifier,
        None,
    ),
    (
        tags::FILLER_ORDER_NUMBER_IMAGING_SERVICE_REQUEST,
        IdentifierKind::OtherIdentifier,
        None,
    ),
    (tags::STUDY_ID, IdentifierKind::OtherIdentifier, None),
    (tags::PATIENT_ADDRESS, IdentifierKind::AddressOrPhone, None),
    (
        tags::PATIENT_TELEPHONE_NUMBERS,
        IdentifierKind::AddressOrPhone,
        None,
    ),
    (
        tags::PATIENT_TELECOM_INFORMATION,
        IdentifierKind::AddressOrPhone,
        None,
    ),
    (
        tags::REGION_OF_RESIDENCE,
        IdentifierKind::AddressOrPhone,
        None,
    ),
    (tags::PERSON_ADDRESS, IdentifierKind::AddressOrPhone, None),
    (
        tags::PERSON_TELEPHONE_NUMBERS,
        IdentifierKind::AddressOrPhone,
        None,
    ),
    (
        tags::PERSON_TELECOM_INFORMATION,
        IdentifierKind::AddressOrPhone,
        None,
    ),
    (
        tags::REFERRING_PHYSICIAN_ADDRESS,
        IdentifierKind::AddressOrPhone,
        None,
    ),
    (
        tags::REFERRING_PHYSICIAN_TELEPHONE_NUMBERS,
        IdentifierKind::AddressOrPhone,
        None,
    ),
    (
        tags::INSTITUTION_NAME,
        IdentifierKind::InstitutionOrDevice,
        Some(DeidOption::RetainInstitutionIdentity),
    ),
    (
        tags::INSTITUTION_ADDRESS,
        IdentifierKind::InstitutionOrDevice,
        Some(DeidOption::RetainInstitutionIdentity),
    ),
    (
        tags::STATION_NAME,
        IdentifierKind::InstitutionOrDevice,
        Some(DeidOption::RetainDeviceIdentity),
    ),
    (
        tags::DEVICE_SERIAL_NUMBER,
        IdentifierKind::InstitutionOrDevice,
        Some(DeidOption::RetainDeviceIdentity),
    ),
];

impl Context<'_> {
    fn action_for(&self, tag: Tag) -> Option<Action> {
        self.table
            .row(tag)
            .map(|row| resolve(row, self.options, attribute_type(tag, &self.sop_class_uid)))
    }

    /// Gathers the identifying values of the input, at every depth, private elements included.
    pub fn collect_needles(&mut self, obj: &InMemDicomObject) {
        for elem in obj.iter() {
            let tag = elem.tag();
            let vr = elem.vr();
            if let Value::Sequence(seq) = elem.value() {
                for item in seq.items() {
                    self.collect_needles(item);
                }
                continue;
            }
            if tag == tags::PIXEL_DATA {
                continue;
            }
            if vr == VR::PN {
                if let Some(values) = strings_of(elem) {
                    for v in values {
                        self.needles.add_person_name(&v);
                    }
                }
                continue;
            }
            if let Some(&(_, kind, retained_by)) =
                IDENTIFIER_TAGS.iter().find(|(t, _, _)| *t == tag)
            {
                if retained_by.is_none_or(|o| !self.options.contains(o)) {
                    for v in strings_of(elem).unwrap_or_default() {
                        self.needles.add(&v, kind);
                    }
                }
                continue;
            }
            let dates_kept = self
                .options
                .contains(DeidOption::RetainLongitudinalFullDates);
            // A date an option retains (a device's calibration date under Retain Device
            // Identity) is not a needle: the user chose to keep it.
            if matches!(vr, VR::DA | VR::DT)
                && !dates_kept
                && self.action_for(tag) != Some(Action::Keep)
            {
                for v in strings_of(elem).unwrap_or_default() {
                    let v = v.trim();
                    if v.len() >= 8 && v.as_bytes()[..8].iter().all(u8::is_ascii_digit) {
                        self.needles.add(&v[..8], IdentifierKind::Date);
                    }
                }
                continue;
            }
            // Under Retain UIDs the user keeps instance UIDs: one the table still replaces (a
            // UID content item) may legitimately equal a retained one.
            if vr == VR::UI
                && tag.group() % 2 == 0
                && !self.options.contains(DeidOption::RetainUids)
                && self.action_for(tag) == Some(Action::ReplaceUid)
            {
                for v in strings_of(elem).unwrap_or_default() {
                    self.needles.add_uid(&v);
                }
            }
        }
    }

    /// Transforms a whole data set (or a sequence item).
    pub fn transform(&mut self, obj: InMemDicomObject) -> InMemDicomObject {
        self.transform_in(obj, Mode::Normal)
    }

    fn transform_in(&mut self, obj: InMemDicomObject, mode: Mode) -> InMemDicomObject {
        let mut out: Vec<InMemElement> = Vec::new();
        // Private creators of this data set, by (group, block): decided after their elements.
        let mut creators: HashMap<(u16, u8), (InMemElement, String, bool)> = HashMap::new();
        let mut private_kept: Vec<InMemElement> = Vec::new();
        let clean_graphics = self.options.contains(DeidOption::CleanGraphics);

        for elem in obj {
            let tag = elem.tag();
            let (group, element) = (tag.group(), tag.element());
            if element == 0x0000 || group == 0x0002 {
                // Group lengths are retired and would be wrong after editing; file meta is
                // rebuilt by the caller.
                continue;
            }
            if group % 2 == 1 {
                self.private_element(elem, &mut creators, &mut private_kept);
                continue;
            }
            // Overlay planes (60xx) go whole unless Clean Graphics keeps them: a plane without
            // its data would be malformed.
            if group & 0xFF00 == 0x6000 && !clean_graphics {
                self.counts.removed += 1;
                continue;
            }
            let action = self.action_for(tag);
            let new = match action {
                Some(action) => self.apply(elem, action, mode),
                None => self.untabled(elem, mode),
            };
            if let Some(e) = new {
                out.push(e);
            }
        }
        for ((_, _), (creator_elem, _, used)) in creators {
            if used {
                out.push(creator_elem);
            }
        }
        out.extend(private_kept);
        InMemDicomObject::from_element_iter(out)
    }

    fn private_element(
        &mut self,
        elem: InMemElement,
        creators: &mut HashMap<(u16, u8), (InMemElement, String, bool)>,
        kept: &mut Vec<InMemElement>,
    ) {
        let tag = elem.tag();
        let (group, element) = (tag.group(), tag.element());
        let safe = self.options.contains(DeidOption::RetainSafePrivate);
        if (0x0010..=0x00FF).contains(&element) {
            let name = strings_of(&elem)
                .and_then(|v| v.into_iter().next())
                .unwrap_or_default();
            creators.insert((group, element as u8), (elem, name, false));
            return;
        }
        if safe && element >= 0x1000 {
            let block = (element >> 8) as u8;
            if let Some((_, creator, used)) = creators.get_mut(&(group, block)) {
                if self
                    .safe_private
                    .allows(creator, group, (element & 0xFF) as u8)
                    && !matches!(elem.value(), Value::Sequence(_))
                {
                    *used = true;
                    self.counts.private_retained += 1;
                    let elem = self.scrub_text(elem);
                    kept.push(elem);
                    return;
                }
            }
        }
        self.counts.private_removed += 1;
    }

    fn apply(&mut self, elem: InMemElement, action: Action, mode: Mode) -> Option<InMemElement> {
        let tag = elem.tag();
        let vr = elem.vr();
        // The patient's name and ID become the keyed pseudonym (a D of our choosing), which
        // keeps the patient linkable; the Basic Profile's Z would lose that.
        if (tag == tags::PATIENT_NAME || tag == tags::PATIENT_ID) && action != Action::Keep {
            self.counts.dummied += 1;
            return Some(with_strings(tag, vr, vec![self.pseudonym.clone()]));
        }
        match action {
            Action::Remove => {
                self.counts.removed += 1;
                None
            }
            Action::Empty => {
                self.counts.emptied += 1;
                Some(empty_element(tag, vr))
            }
            Action::Dummy => {
                self.counts.dummied += 1;
                Some(self.dummy(elem))
            }
            Action::Keep => {
                self.counts.kept += 1;
                Some(self.keep(elem, mode))
            }
            Action::Clean => {
                self.counts.cleaned += 1;
                self.clean(elem, mode)
            }
            Action::ReplaceUid => Some(self.replace_uids(elem)),
            Action::KeepReplacingUids => {
                self.counts.kept += 1;
                Some(self.keep(elem, mode))
            }
        }
    }

    /// Attributes the table does not list: kept, with person names replaced, dates under the
    /// date policy, free text scrubbed, and references to this instance's replaced UIDs
    /// replaced too.
    fn untabled(&mut self, elem: InMemElement, mode: Mode) -> Option<InMemElement> {
        let tag = elem.tag();
        let vr = elem.vr();
        match vr {
            VR::SQ => Some(self.keep(elem, mode)),
            VR::PN => {
                self.counts.dummied += 1;
                Some(self.dummy(elem))
            }
            VR::DA | VR::DT => self.date_policy(elem),
            VR::UI => {
                let values = strings_of(&elem).unwrap_or_default();
                if values.iter().any(|v| self.needles.is_replaced_uid(v)) {
                    Some(self.replace_uids(elem))
                } else {
                    Some(elem)
                }
            }
            _ if mode == Mode::Strict && is_free_text_vr(vr) && !is_code_attribute(tag) => {
                self.counts.dummied += 1;
                Some(self.dummy(elem))
            }
            _ if is_text_vr(vr) => Some(self.scrub_text(elem)),
            _ => Some(elem),
        }
    }

    fn date_policy(&mut self, elem: InMemElement) -> Option<InMemElement> {
        if self
            .options
            .contains(DeidOption::RetainLongitudinalFullDates)
        {
            return Some(elem);
        }
        let tag = elem.tag();
        let vr = elem.vr();
        if let Some(days) = self.date_shift {
            let shifted: Vec<String> = strings_of(&elem)
                .unwrap_or_default()
                .iter()
                .filter_map(|v| match vr {
                    VR::DA => dates::shift_da(v, days),
                    _ => dates::shift_dt(v, days),
                })
                .collect();
            return Some(with_strings(tag, vr, shifted));
        }
        self.counts.emptied += 1;
        Some(empty_element(tag, vr))
    }

    fn dummy(&mut self, elem: InMemElement) -> InMemElement {
        let tag = elem.tag();
        let vr = elem.vr();
        let value = match vr {
            VR::SQ => return self.sequence(elem, Mode::Strict),
            VR::PN | VR::LO | VR::SH | VR::ST | VR::LT | VR::UT | VR::UC | VR::CS | VR::AE => {
                PrimitiveValue::from(DUMMY_TEXT)
            }
            VR::UR => PrimitiveValue::from("urn:anonymized"),
            VR::DA => PrimitiveValue::from("19000101"),
            VR::TM => PrimitiveValue::from("000000"),
            VR::DT => PrimitiveValue::from("19000101000000"),
            VR::AS => PrimitiveValue::from("000Y"),
            VR::DS | VR::IS => PrimitiveValue::from("0"),
            VR::UI => {
                let values = strings_of(&elem).unwrap_or_default();
                if values.is_empty() {
                    PrimitiveValue::from(self.key.replace_uid(&format!("dummy:{tag}")))
                } else {
                    return self.replace_uids(elem);
                }
            }
            VR::US => PrimitiveValue::U16([0].into_iter().collect()),
            VR::SS => PrimitiveValue::I16([0].into_iter().collect()),
            VR::UL => PrimitiveValue::U32([0].into_iter().collect()),
            VR::SL => PrimitiveValue::I32([0].into_iter().collect()),
            VR::UV => PrimitiveValue::U64([0].into_iter().collect()),
            VR::SV => PrimitiveValue::I64([0].into_iter().collect()),
            VR::FL => PrimitiveValue::F32([0.0].into_iter().collect()),
            VR::FD => PrimitiveValue::F64([0.0].into_iter().collect()),
            _ => PrimitiveValue::U8([0, 0].into_iter().collect()),
        };
        DataElement::new(tag, vr, value)
    }

    fn keep(&mut self, elem: InMemElement, mode: Mode) -> InMemElement {
        if matches!(elem.value(), Value::Sequence(_)) {
            return self.sequence(elem, mode);
        }
        if is_text_vr(elem.vr()) && elem.vr() != VR::PN {
            return self.scrub_text(elem);
        }
        elem
    }

    fn clean(&mut self, elem: InMemElement, mode: Mode) -> Option<InMemElement> {
        let vr = elem.vr();
        match vr {
            VR::SQ => Some(self.sequence(elem, mode)),
            VR::PN => Some(self.dummy(elem)),
            VR::DA | VR::DT => self.date_policy(elem),
            VR::TM => {
                let dates_kept = self
                    .options
                    .contains(DeidOption::RetainLongitudinalFullDates)
                    || self.date_shift.is_some();
                if dates_kept {
                    // Whole-day shifts keep times of day.
                    Some(elem)
                } else {
                    Some(empty_element(elem.tag(), vr))
                }
            }
            VR::UI => Some(self.replace_uids(elem)),
            _ if is_text_vr(vr) => Some(self.clean_text(elem)),
            _ => Some(elem),
        }
    }

    fn sequence(&mut self, elem: InMemElement, mode: Mode) -> InMemElement {
        let tag = elem.tag();
        let (_, value) = elem.into_parts();
        let items = match value {
            Value::Sequence(seq) => seq.into_items(),
            _ => return empty_element(tag, VR::SQ),
        };
        let items: Vec<InMemDicomObject> = items
            .into_iter()
            .map(|item| self.transform_in(item, mode))
            .collect();
        DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
    }

    fn replace_uids(&mut self, elem: InMemElement) -> InMemElement {
        let tag = elem.tag();
        let vr = elem.vr();
        let Some(values) = strings_of(&elem) else {
            // A UID attribute whose value is not text (e.g. read as UN) cannot be mapped:
            // remove the bytes rather than keep an original UID.
            self.counts.emptied += 1;
            return empty_element(tag, vr);
        };
        self.counts.uids_replaced += 1;
        let mapped = values
            .iter()
            .map(|v| {
                let v = v.trim_matches(|c: char| c == ' ' || c == '\0');
                // Every UID of an attribute the profile replaces names an instance, even one
                // written (against the standard) under the 1.2.840.10008 root.
                if v.is_empty() {
                    v.to_string()
                } else {
                    self.key.replace_uid(v)
                }
            })
            .collect();
        with_strings(tag, if vr == VR::UN { VR::UI } else { vr }, mapped)
    }

    fn scrub_text(&mut self, elem: InMemElement) -> InMemElement {
        let Some(values) = strings_of(&elem) else {
            return elem;
        };
        let mut changed = false;
        let scrubbed: Vec<String> = values
            .iter()
            .map(|v| {
                let s = self.needles.scrub(v);
                if matches!(s, std::borrow::Cow::Owned(_)) {
                    changed = true;
                }
                s.into_owned()
            })
            .collect();
        if !changed {
            return elem;
        }
        self.counts.text_scrubbed += 1;
        with_strings(elem.tag(), elem.vr(), scrubbed)
    }

    /// The C action on text: identifiers of the instance and anything shaped like a date
    /// (unless dates are retained in full) are masked; what the text says otherwise stays.
    fn clean_text(&mut self, elem: InMemElement) -> InMemElement {
        let Some(values) = strings_of(&elem) else {
            return elem;
        };
        let keep_dates = self
            .options
            .contains(DeidOption::RetainLongitudinalFullDates);
        let cleaned: Vec<String> = values
            .iter()
            .map(|v| {
                let mut s = self.needles.scrub(v).into_owned();
                if !keep_dates {
                    for (a, b) in dates::date_like_spans(&s) {
                        s.replace_range(a..b, &"*".repeat(b - a));
                    }
                }
                s
            })
            .collect();
        with_strings(elem.tag(), elem.vr(), cleaned)
    }

    /// The residual scan of an output data set: identifying values of the input, attributes
    /// the profile removes, private attributes not on the safe list.
    pub fn scan(&self, obj: &InMemDicomObject, path: &str, findings: &mut Vec<Finding>) {
        let safe = self.options.contains(DeidOption::RetainSafePrivate);
        let mut creators: HashMap<(u16, u8), String> = HashMap::new();
        for elem in obj.iter() {
            let tag = elem.tag();
            let here = || format!("{path}({:04X},{:04X})", tag.group(), tag.element());
            if tag.group() % 2 == 1 {
                let e = tag.element();
                if (0x0010..=0x00FF).contains(&e) {
                    let name = strings_of(elem)
                        .and_then(|v| v.into_iter().next())
                        .unwrap_or_default();
                    creators.insert((tag.group(), e as u8), name);
                } else {
                    let allowed = safe
                        && creators
                            .get(&(tag.group(), (e >> 8) as u8))
                            .is_some_and(|c| {
                                self.safe_private.allows(c, tag.group(), (e & 0xFF) as u8)
                            });
                    if !allowed {
                        findings.push(Finding {
                            path: here(),
                            problem: FindingKind::PrivateNotSafe,
                        });
                    }
                }
            } else if self.action_for(tag) == Some(Action::Remove)
                && !(tag.group() & 0xFF00 == 0x6000
                    && self.options.contains(DeidOption::CleanGraphics))
            {
                findings.push(Finding {
                    path: here(),
                    problem: FindingKind::AttributeNotRemoved,
                });
            }
            match elem.value() {
                Value::Sequence(seq) => {
                    for (i, item) in seq.items().iter().enumerate() {
                        self.scan(item, &format!("{}[{i}].", here()), findings);
                    }
                }
                Value::PixelSequence(_) => {}
                Value::Primitive(p) => {
                    if tag == tags::PIXEL_DATA {
                        continue;
                    }
                    let vr = elem.vr();
                    if vr == VR::UI {
                        if let Some(values) = strings_of(elem) {
                            if values.iter().any(|v| self.needles.is_replaced_uid(v)) {
                                findings.push(Finding {
                                    path: here(),
                                    problem: FindingKind::Identifier {
                                        identifier: IdentifierKind::Uid,
                                    },
                                });
                            }
                        }
                        continue;
                    }
                    // Numbers, ages and times are not searched: short digit runs in them
                    // would match by chance, and they carry no identifier the needles hold.
                    if matches!(vr, VR::DS | VR::IS | VR::AS | VR::TM) {
                        continue;
                    }
                    let hit = match p {
                        PrimitiveValue::Str(s) => self.needles.find(s.as_bytes()),
                        PrimitiveValue::Strs(v) => {
                            v.iter().find_map(|s| self.needles.find(s.as_bytes()))
                        }
                        PrimitiveValue::U8(b) if b.len() <= 1 << 22 => self.needles.find(b),
                        _ => None,
                    };
                    if let Some(kind) = hit {
                        findings.push(Finding {
                            path: here(),
                            problem: FindingKind::Identifier { identifier: kind },
                        });
                    }
                }
            }
        }
    }
}

/// Standard attributes that arrived with VR UN (explicit VR files written by tools that did
/// not know them) get their dictionary VR back, so that their values are seen as the text
/// they are: a Patient's Name sent as UN is still a name, to remove and to search for.
/// Binary and sequence VRs stay UN; the scan still searches their bytes.
pub fn normalize_un(obj: &mut InMemDicomObject) {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
    let un_tags: Vec<Tag> = obj
        .iter()
        .filter(|e| e.vr() == VR::UN && e.tag().group() % 2 == 0)
        .map(|e| e.tag())
        .collect();
    for tag in un_tags {
        let Some(VirtualVr::Exact(vr)) = dicom_dictionary_std::StandardDataDictionary
            .by_tag(tag)
            .map(|entry| entry.vr())
        else {
            continue;
        };
        let string_vr = matches!(
            vr,
            VR::AE
                | VR::AS
                | VR::CS
                | VR::DA
                | VR::DS
                | VR::DT
                | VR::IS
                | VR::LO
                | VR::LT
                | VR::PN
                | VR::SH
                | VR::ST
                | VR::TM
                | VR::UC
                | VR::UI
                | VR::UR
                | VR::UT
        );
        if !string_vr {
            continue;
        }
        let Some(bytes) = obj
            .get(tag)
            .and_then(|e| e.to_bytes().ok())
            .map(|b| b.into_owned())
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        let values: Vec<String> = text
            .trim_end_matches(['\0', ' '])
            .split('\\')
            .map(|v| v.trim_end_matches(['\0', ' ']).to_string())
            .collect();
        obj.put(with_strings(tag, vr, values));
    }
    // Items of sequences too.
    let seq_tags: Vec<Tag> = obj
        .iter()
        .filter(|e| matches!(e.value(), Value::Sequence(_)))
        .map(|e| e.tag())
        .collect();
    for tag in seq_tags {
        if let Some(elem) = obj.take(tag) {
            let (header, value) = elem.into_parts();
            if let Value::Sequence(seq) = value {
                let items: Vec<InMemDicomObject> = seq
                    .into_items()
                    .into_iter()
                    .map(|mut item| {
                        normalize_un(&mut item);
                        item
                    })
                    .collect();
                obj.put(DataElement::new(
                    header.tag,
                    VR::SQ,
                    DataSetSequence::new(items, Length::UNDEFINED),
                ));
            }
        }
    }
}

/// Attributes of the Code Sequence macro: codes identify concepts, not people, so a strict
/// (dummy) sequence keeps them and stays meaningful.
fn is_code_attribute(tag: Tag) -> bool {
    matches!(
        (tag.group(), tag.element()),
        (0x0008, 0x0100)
            | (0x0008, 0x0102)
            | (0x0008, 0x0103)
            | (0x0008, 0x0104)
            | (0x0008, 0x0119)
            | (0x0008, 0x0120)
            | (0x0040, 0xA040)
            | (0x0040, 0xA010)
    )
}

//! PS3.15 Table E.1-1 as data: parsing the table, and resolving each attribute's action under
//! a set of options and the attribute's Type in its IOD.
//!
//! The table is data, not code, so that a newer edition of the standard can be loaded from a
//! file without a new release. This module must not know about DICOM values: it only answers
//! "what happens to the attribute with this tag".

use std::collections::HashMap;

use dicom_core::Tag;
use serde::Deserialize;

use crate::options::{DeidOption, OptionSet};

/// The edition of the built-in table.
pub const TABLE_EDITION: &str = "2024b";

const BUILTIN_JSON: &str = include_str!("../data/ps3.15-annex-e-table-e.1-1.json");

/// An action code of Table E.1-1a.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionCode {
    /// Replace with a non-zero-length dummy value.
    D,
    /// Replace with a zero-length value, or a dummy.
    Z,
    /// Remove.
    X,
    /// Keep (sequences are still cleaned).
    K,
    /// Clean: replace with values of similar meaning known not to identify.
    C,
    /// Replace with a UID consistent within the set of instances.
    U,
    /// Z unless Type 1, then D.
    ZD,
    /// X unless Type 2, then Z.
    XZ,
    /// X unless Type 1, then D.
    XD,
    /// X unless Type 2 (Z) or Type 1 (D).
    XZD,
    /// X unless Type 2 (Z) or Type 1 (keep, replacing the UIDs inside: U*).
    XZU,
}

impl ActionCode {
    fn parse(code: &str) -> Option<ActionCode> {
        Some(match code.trim() {
            "D" => ActionCode::D,
            "Z" => ActionCode::Z,
            "X" => ActionCode::X,
            "K" => ActionCode::K,
            "C" => ActionCode::C,
            "U" => ActionCode::U,
            "Z/D" => ActionCode::ZD,
            "X/Z" => ActionCode::XZ,
            "X/D" => ActionCode::XD,
            "X/Z/D" => ActionCode::XZD,
            "X/Z/U*" | "X/Z/U" => ActionCode::XZU,
            _ => return None,
        })
    }
}

/// What is done to one attribute, once options and Type are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Remove,
    /// Zero-length value (an empty sequence for SQ).
    Empty,
    /// A dummy value of the VR; for sequences, items kept with every text value replaced.
    Dummy,
    Keep,
    /// Clean: free text scrubbed of identifiers, dates shifted (Modified Dates option), UIDs
    /// replaced, sequences cleaned recursively.
    Clean,
    /// Replace every UID of the value.
    ReplaceUid,
    /// Keep a sequence, replacing the UIDs inside it (U*).
    KeepReplacingUids,
}

/// Which rows of the table an entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagPattern {
    Exact(Tag),
    /// `(50xx,xxxx)`: repeating groups 5000-50FF, any element.
    CurveGroup,
    /// `(60xx,eeee)`: repeating overlay groups 6000-60FF, one element.
    OverlayElement(u16),
    /// `(gggg,eeee) where gggg is odd`.
    Private,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct TableRow {
    pub pattern: TagPattern,
    pub name: String,
    pub basic: ActionCode,
    /// Action of each option that changes this row.
    pub options: Vec<(DeidOption, ActionCode)>,
}

/// Errors loading a table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "the confidentiality profile table is not valid JSON in the Table E.1-1 shape: {0} (see crates/deid/data/README.md)"
    )]
    Json(#[from] serde_json::Error),
    #[error("row {row} (`{tag}`): {problem}")]
    Row {
        row: usize,
        tag: String,
        problem: String,
    },
    #[error("the table has no rows")]
    Empty,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonRow {
    name: String,
    tag: String,
    basic_profile: String,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

/// Table E.1-1 of one edition.
#[derive(Debug, Clone)]
pub struct ProfileTable {
    edition: String,
    exact: HashMap<Tag, usize>,
    overlay: HashMap<u16, usize>,
    curve: Option<usize>,
    private: Option<usize>,
    rows: Vec<TableRow>,
}

impl ProfileTable {
    /// The built-in table (edition [`TABLE_EDITION`]).
    pub fn builtin() -> ProfileTable {
        ProfileTable::from_json(BUILTIN_JSON, TABLE_EDITION)
            .expect("the built-in Table E.1-1 is valid (checked by tests)")
    }

    /// Parses a table in the JSON shape of `data/ps3.15-annex-e-table-e.1-1.json`.
    pub fn from_json(text: &str, edition: &str) -> Result<ProfileTable, TableError> {
        let raw: Vec<JsonRow> = serde_json::from_str(text)?;
        if raw.is_empty() {
            return Err(TableError::Empty);
        }
        let mut table = ProfileTable {
            edition: edition.to_string(),
            exact: HashMap::new(),
            overlay: HashMap::new(),
            curve: None,
            private: None,
            rows: Vec::with_capacity(raw.len()),
        };
        for (i, r) in raw.into_iter().enumerate() {
            let bad = |problem: String| TableError::Row {
                row: i + 1,
                tag: r.tag.clone(),
                problem,
            };
            let pattern = parse_pattern(&r.tag, &r.name)
                .ok_or_else(|| bad("the tag is not (gggg,eeee), (50xx,xxxx), (60xx,eeee) or the private-attributes row".into()))?;
            let basic = ActionCode::parse(&r.basic_profile)
                .ok_or_else(|| bad(format!("unknown action code `{}`", r.basic_profile)))?;
            let mut options = Vec::new();
            for option in DeidOption::ALL {
                let Some(col) = option.table_column() else {
                    continue;
                };
                if let Some(v) = r.rest.get(col) {
                    let code = v
                        .as_str()
                        .and_then(ActionCode::parse)
                        .ok_or_else(|| bad(format!("unknown action code {v} in column {col}")))?;
                    options.push((option, code));
                }
            }
            let idx = table.rows.len();
            match pattern {
                TagPattern::Exact(tag) => {
                    table.exact.insert(tag, idx);
                }
                TagPattern::CurveGroup => table.curve = Some(idx),
                TagPattern::OverlayElement(e) => {
                    table.overlay.insert(e, idx);
                }
                TagPattern::Private => table.private = Some(idx),
            }
            table.rows.push(TableRow {
                pattern,
                name: r.name,
                basic,
                options,
            });
        }
        Ok(table)
    }

    pub fn edition(&self) -> &str {
        &self.edition
    }

    pub fn rows(&self) -> &[TableRow] {
        &self.rows
    }

    /// The row that governs `tag`, if any. Private tags and the repeating groups have their
    /// own rows.
    pub fn row(&self, tag: Tag) -> Option<&TableRow> {
        if let Some(&i) = self.exact.get(&tag) {
            return Some(&self.rows[i]);
        }
        let g = tag.group();
        if g % 2 == 1 {
            return self.private.map(|i| &self.rows[i]);
        }
        if g & 0xFF00 == 0x5000 {
            return self.curve.map(|i| &self.rows[i]);
        }
        if g & 0xFF00 == 0x6000 {
            return self.overlay.get(&tag.element()).map(|&i| &self.rows[i]);
        }
        None
    }
}

fn parse_pattern(tag: &str, name: &str) -> Option<TagPattern> {
    let t = tag.trim().trim_start_matches('(').trim_end_matches(')');
    let (g, e) = t.split_once(',')?;
    let (g, e) = (g.trim().to_ascii_uppercase(), e.trim().to_ascii_uppercase());
    if g == "GGGG" || name.to_ascii_lowercase().contains("private attributes") {
        return Some(TagPattern::Private);
    }
    if g == "50XX" {
        return Some(TagPattern::CurveGroup);
    }
    if g == "60XX" {
        return u16::from_str_radix(&e, 16)
            .ok()
            .map(TagPattern::OverlayElement);
    }
    let g = u16::from_str_radix(&g, 16).ok()?;
    let e = u16::from_str_radix(&e, 16).ok()?;
    Some(TagPattern::Exact(Tag(g, e)))
}

/// The Type (1, 2 or 3) of an attribute in the IOD of the instance, for the action codes
/// that depend on it.
///
/// PS3.15 decides X/Z, Z/D, X/D, X/Z/D and X/Z/U* by the attribute's Type in the IOD. The
/// module tables of PS3.3 are not carried as data here; instead this lists the attributes of
/// those rows that are Type 1 or 2 in the IODs medledger handles (CT, MR, PET, CR/DX, US,
/// SC, SR, RT, SEG). Everything else is Type 3, so it is removed.
pub fn attribute_type(tag: Tag, sop_class_uid: &str) -> u8 {
    let is_sr = sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.88.");
    let is_enhanced = matches!(
        sop_class_uid,
        "1.2.840.10008.5.1.4.1.1.2.1"
            | "1.2.840.10008.5.1.4.1.1.4.1"
            | "1.2.840.10008.5.1.4.1.1.128.1"
            | "1.2.840.10008.5.1.4.1.1.6.2"
            | "1.2.840.10008.5.1.4.1.1.13.1.1"
            | "1.2.840.10008.5.1.4.1.1.13.1.3"
    );
    match (tag.group(), tag.element()) {
        // Content Date and Time: Type 1 in the SR Document General module, 2C elsewhere.
        (0x0008, 0x0023) | (0x0008, 0x0033) if is_sr => 1,
        (0x0008, 0x0023) | (0x0008, 0x0033) => 2,
        // Device Serial Number: Type 1 in the Enhanced General Equipment module.
        (0x0018, 0x1000) if is_enhanced => 1,
        // Patient ID (Patient module), Contrast/Bolus Agent, Content Creator's Name,
        // Acquisition Context Sequence, Reviewer Name, RT plan and treatment dates and times,
        // Treatment Machine Name, Instruction Performed DateTime.
        (0x0010, 0x0020)
        | (0x0018, 0x0010)
        | (0x0070, 0x0084)
        | (0x0040, 0x0555)
        | (0x300E, 0x0008)
        | (0x300A, 0x0006)
        | (0x300A, 0x0007)
        | (0x3008, 0x0250)
        | (0x3008, 0x0251)
        | (0x300A, 0x00B2)
        | (0x0018, 0x9919) => 2,
        _ => 3,
    }
}

/// Resolves the action for a row under `options`, given the attribute's Type.
///
/// Options that retain (K) win over options that clean (C), which win over the Basic Profile:
/// an option is only ever selected to keep more, so the most retaining choice is the one the
/// user asked for.
pub fn resolve(row: &TableRow, options: &OptionSet, attr_type: u8) -> Action {
    let mut chosen: Option<ActionCode> = None;
    for &(option, code) in &row.options {
        if options.contains(option) {
            chosen = match (chosen, code) {
                (Some(ActionCode::K), _) | (_, ActionCode::K) => Some(ActionCode::K),
                (_, c) => Some(c),
            };
        }
    }
    let code = chosen.unwrap_or(row.basic);
    match code {
        ActionCode::D => Action::Dummy,
        ActionCode::Z => Action::Empty,
        ActionCode::X => Action::Remove,
        ActionCode::K => Action::Keep,
        ActionCode::C => Action::Clean,
        ActionCode::U => Action::ReplaceUid,
        ActionCode::ZD => {
            if attr_type == 1 {
                Action::Dummy
            } else {
                Action::Empty
            }
        }
        ActionCode::XZ => match attr_type {
            1 | 2 => Action::Empty,
            _ => Action::Remove,
        },
        ActionCode::XD => match attr_type {
            1 | 2 => Action::Dummy,
            _ => Action::Remove,
        },
        ActionCode::XZD => match attr_type {
            1 => Action::Dummy,
            2 => Action::Empty,
            _ => Action::Remove,
        },
        // References to other instances keep their value for research (which image a
        // derived image came from) once their UIDs are replaced consistently, so U* is chosen
        // whatever the Type: nothing identifying is left in the kept items.
        ActionCode::XZU => Action::KeepReplacingUids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_parses_every_row() {
        let t = ProfileTable::builtin();
        assert_eq!(t.rows().len(), 621);
        assert_eq!(t.edition(), TABLE_EDITION);
        let name = t.row(Tag(0x0010, 0x0010)).unwrap();
        assert_eq!(name.basic, ActionCode::Z);
        assert!(matches!(
            t.row(Tag(0x0009, 0x1001)).unwrap().pattern,
            TagPattern::Private
        ));
        assert!(matches!(
            t.row(Tag(0x5002, 0x3000)).unwrap().pattern,
            TagPattern::CurveGroup
        ));
        assert!(matches!(
            t.row(Tag(0x6002, 0x3000)).unwrap().pattern,
            TagPattern::OverlayElement(0x3000)
        ));
        // Overlay rows other than data and comments are not in the table.
        assert!(t.row(Tag(0x6000, 0x0010)).is_none());
        assert!(t.row(Tag(0x0028, 0x0010)).is_none());
    }

    #[test]
    fn options_change_actions() {
        let t = ProfileTable::builtin();
        let none = OptionSet::default();
        let study_uid = t.row(Tag(0x0020, 0x000D)).unwrap();
        assert_eq!(resolve(study_uid, &none, 1), Action::ReplaceUid);
        let keep_uids = OptionSet::new([DeidOption::RetainUids]).unwrap();
        assert_eq!(resolve(study_uid, &keep_uids, 1), Action::Keep);

        let acq_date = t.row(Tag(0x0008, 0x0022)).unwrap();
        assert_eq!(resolve(acq_date, &none, 3), Action::Remove);
        assert_eq!(resolve(acq_date, &none, 2), Action::Empty);
        let modified = OptionSet::new([DeidOption::RetainLongitudinalModifiedDates]).unwrap();
        assert_eq!(resolve(acq_date, &modified, 3), Action::Clean);

        // Keep wins over clean when both options are selected.
        let allergies = t.row(Tag(0x0010, 0x2110)).unwrap();
        let both = OptionSet::new([
            DeidOption::CleanDescriptors,
            DeidOption::RetainPatientCharacteristics,
        ])
        .unwrap();
        assert_eq!(resolve(allergies, &both, 3), Action::Clean);
        let sex = t.row(Tag(0x0010, 0x0040)).unwrap();
        let chars = OptionSet::new([DeidOption::RetainPatientCharacteristics]).unwrap();
        assert_eq!(resolve(sex, &chars, 2), Action::Keep);
    }

    #[test]
    fn type_dependent_codes() {
        let t = ProfileTable::builtin();
        let none = OptionSet::default();
        let content_date = t.row(Tag(0x0008, 0x0023)).unwrap();
        let sr = "1.2.840.10008.5.1.4.1.1.88.22";
        let ct = "1.2.840.10008.5.1.4.1.1.2";
        assert_eq!(
            resolve(content_date, &none, attribute_type(Tag(0x0008, 0x0023), sr)),
            Action::Dummy
        );
        assert_eq!(
            resolve(content_date, &none, attribute_type(Tag(0x0008, 0x0023), ct)),
            Action::Empty
        );
        let serial = t.row(Tag(0x0018, 0x1000)).unwrap();
        assert_eq!(
            resolve(serial, &none, attribute_type(Tag(0x0018, 0x1000), ct)),
            Action::Remove
        );
        assert_eq!(
            resolve(
                serial,
                &none,
                attribute_type(Tag(0x0018, 0x1000), "1.2.840.10008.5.1.4.1.1.2.1")
            ),
            Action::Dummy
        );
    }

    #[test]
    fn bad_tables_are_rejected_with_the_row() {
        let err = ProfileTable::from_json(
            r#"[{"name":"A","tag":"(0010,0010)","basicProfile":"Q"}]"#,
            "x",
        )
        .unwrap_err();
        assert!(err.to_string().contains("row 1"), "{err}");
        assert!(ProfileTable::from_json("[]", "x").is_err());
        assert!(ProfileTable::from_json("{", "x").is_err());
    }
}

//! The residual-identifier scan: the identifying values of the input instance ("needles"),
//! scrubbing them out of retained free text, and the scan of the output that proves none is
//! left anywhere, private elements and nested sequences included.
//!
//! A finding names where and what kind of identifier, never the value: reports and logs must
//! not carry patient identifiers.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde::Serialize;

/// The kind of an identifying value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentifierKind {
    PersonName,
    PatientId,
    OtherIdentifier,
    AddressOrPhone,
    Date,
    Uid,
    InstitutionOrDevice,
}

impl fmt::Display for IdentifierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentifierKind::PersonName => "person name",
            IdentifierKind::PatientId => "patient identifier",
            IdentifierKind::OtherIdentifier => "identifier (accession, procedure, admission)",
            IdentifierKind::AddressOrPhone => "address or telephone number",
            IdentifierKind::Date => "date",
            IdentifierKind::Uid => "original UID",
            IdentifierKind::InstitutionOrDevice => "institution or device name",
        })
    }
}

/// Placeholder words that identify nobody; they are never needles, so that an input whose
/// name is already "ANONYMOUS" does not fail on the dummy values the profile writes.
const STOP_WORDS: &[&str] = &[
    "ANON",
    "ANONYMOUS",
    "ANONYMIZED",
    "ANONYMISED",
    "ANONYMIZE",
    "UNKNOWN",
    "NONE",
    "NULL",
    "TEST",
    "PATIENT",
    "NAME",
    "DOCTOR",
    "PHYSICIAN",
    "N/A",
    "NOT SPECIFIED",
    "REMOVED",
];

/// The identifying values of one input instance.
#[derive(Default)]
pub struct Needles {
    values: Vec<(String, IdentifierKind)>,
    seen: HashSet<String>,
    uids: HashSet<String>,
    matcher: Option<AhoCorasick>,
}

impl fmt::Debug for Needles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The values are identifiers: show only how many there are.
        f.debug_struct("Needles")
            .field("values", &self.values.len())
            .field("uids", &self.uids.len())
            .finish()
    }
}

impl Needles {
    /// Adds a value if it is specific enough to be searched for without flagging ordinary
    /// text: at least 3 characters (2 outside ASCII), at least 5 when all digits (short
    /// numbers occur everywhere), not a placeholder word.
    pub fn add(&mut self, value: &str, kind: IdentifierKind) {
        let v =
            value.trim_matches(|c: char| c.is_whitespace() || c == '\0' || c == '^' || c == '=');
        let n = v.chars().count();
        // Names written in ideographs or Hangul are often two characters long: as specific
        // as a much longer Latin name.
        let min = if v.is_ascii() { 3 } else { 2 };
        if n < min {
            return;
        }
        if v.bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
            && n < 5
        {
            return;
        }
        let upper = v.to_uppercase();
        if STOP_WORDS.contains(&upper.as_str()) {
            return;
        }
        // ASCII letters match in any case; other letters are searched as written and in
        // upper and lower case (case mapping can change their length, e.g. ß to SS).
        for form in [v.to_string(), upper, v.to_lowercase()] {
            if self.seen.insert(form.clone()) {
                self.values.push((form, kind));
                self.matcher = None;
            }
        }
    }

    /// Adds a person name: the whole value and each of its name components.
    pub fn add_person_name(&mut self, value: &str) {
        for single in value.split('\\') {
            self.add(single, IdentifierKind::PersonName);
            for group in single.split('=') {
                for comp in group.split('^') {
                    self.add(comp, IdentifierKind::PersonName);
                }
            }
        }
    }

    /// Adds an original UID that was replaced: it must not appear as a UID value anywhere in
    /// the output. UIDs are compared whole, since one UID is often a prefix of another.
    pub fn add_uid(&mut self, uid: &str) {
        let u = uid.trim_matches(|c: char| c == ' ' || c == '\0');
        if !u.is_empty() {
            self.uids.insert(u.to_string());
        }
    }

    pub fn is_replaced_uid(&self, uid: &str) -> bool {
        self.uids
            .contains(uid.trim_matches(|c: char| c == ' ' || c == '\0'))
    }

    pub fn len(&self) -> usize {
        self.values.len() + self.uids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Builds the matcher; call once after adding.
    pub fn build(&mut self) {
        if self.matcher.is_none() && !self.values.is_empty() {
            let m = AhoCorasickBuilder::new()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::LeftmostLongest)
                .build(self.values.iter().map(|(v, _)| v.as_bytes()))
                .expect("needles are plain strings");
            self.matcher = Some(m);
        }
    }

    /// The kind of the first identifying value found in `hay`, if any.
    pub fn find(&self, hay: &[u8]) -> Option<IdentifierKind> {
        let m = self.matcher.as_ref()?;
        m.find(hay)
            .map(|mat| self.values[mat.pattern().as_usize()].1)
    }

    /// `text` with every identifying value replaced by `*`s of the same byte length.
    ///
    /// Case-insensitive matching is ASCII-only, so values with non-ASCII letters are matched
    /// in the case they were written; the scan uses the same matcher, so it cannot pass what
    /// the scrub missed.
    pub fn scrub<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let Some(m) = self.matcher.as_ref() else {
            return Cow::Borrowed(text);
        };
        let mut spans = m.find_iter(text.as_bytes()).peekable();
        if spans.peek().is_none() {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for mat in spans {
            out.push_str(&text[last..mat.start()]);
            out.extend(std::iter::repeat_n('*', mat.end() - mat.start()));
            last = mat.end();
        }
        out.push_str(&text[last..]);
        Cow::Owned(out)
    }
}

/// One thing the scan found in an output instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Where: e.g. `(0008,1140)[0].(0008,1155)`.
    pub path: String,
    pub problem: FindingKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum FindingKind {
    /// An identifying value of the input is still present.
    Identifier { identifier: IdentifierKind },
    /// An attribute the profile removes is present.
    AttributeNotRemoved,
    /// A private attribute not on the safe list is present.
    PrivateNotSafe,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            FindingKind::Identifier { identifier } => {
                write!(f, "{}: {identifier} still present", self.path)
            }
            FindingKind::AttributeNotRemoved => {
                write!(f, "{}: attribute the profile removes is present", self.path)
            }
            FindingKind::PrivateNotSafe => {
                write!(f, "{}: private attribute not on the safe list", self.path)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_and_find_agree() {
        let mut n = Needles::default();
        n.add_person_name("DOE^JOHN^^DR");
        n.add("MRN12345", IdentifierKind::PatientId);
        n.add("12", IdentifierKind::PatientId); // too short: ignored
        n.add("ANONYMOUS", IdentifierKind::PersonName); // placeholder: ignored
        n.build();
        let text = "Follow-up of John Doe, mrn12345, slice 12";
        assert_eq!(n.find(text.as_bytes()), Some(IdentifierKind::PersonName));
        let clean = n.scrub(text);
        assert_eq!(clean, "Follow-up of **** ***, ********, slice 12");
        assert_eq!(n.find(clean.as_bytes()), None);
        assert_eq!(n.find(b"ANONYMOUS"), None);
        assert!(matches!(n.scrub("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn uids_match_whole() {
        let mut n = Needles::default();
        n.add_uid("1.2.3.4\0");
        assert!(n.is_replaced_uid("1.2.3.4"));
        assert!(!n.is_replaced_uid("1.2.3.45"));
    }
}

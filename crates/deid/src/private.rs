//! The Retain Safe Private option's allow-list: private attributes that describe acquisition
//! physics and identify nobody, keyed by private creator, group and element low byte (private
//! tags move between blocks, so the creator, not the full tag, names an attribute).

use std::collections::HashSet;

use serde::Deserialize;

const BUILTIN_JSON: &str = include_str!("../data/safe-private.json");

#[derive(Debug, Clone, Default)]
pub struct SafePrivateList {
    entries: HashSet<(String, u16, u8)>,
}

/// A safe-private list that is not in the documented shape.
#[derive(Debug, thiserror::Error)]
pub enum SafePrivateError {
    #[error(
        "safe-private list is not valid JSON in the shape of crates/deid/data/safe-private.json: {0}"
    )]
    Json(#[from] serde_json::Error),
    #[error("safe-private entry {index} ({creator}): {problem}")]
    Entry {
        index: usize,
        creator: String,
        problem: &'static str,
    },
}

#[derive(Deserialize)]
struct JsonList {
    attributes: Vec<JsonEntry>,
}

#[derive(Deserialize)]
struct JsonEntry {
    creator: String,
    group: String,
    element: String,
}

fn normalise_creator(c: &str) -> String {
    c.trim_matches(|c: char| c == ' ' || c == '\0').to_string()
}

impl SafePrivateList {
    /// The built-in list (data/safe-private.json).
    pub fn builtin() -> SafePrivateList {
        SafePrivateList::from_json(BUILTIN_JSON).expect("the built-in safe-private list is valid")
    }

    pub fn from_json(text: &str) -> Result<SafePrivateList, SafePrivateError> {
        let list: JsonList = serde_json::from_str(text)?;
        let mut entries = HashSet::new();
        for (index, e) in list.attributes.into_iter().enumerate() {
            let bad = |problem| SafePrivateError::Entry {
                index,
                creator: e.creator.clone(),
                problem,
            };
            let group = u16::from_str_radix(e.group.trim(), 16)
                .map_err(|_| bad("group is not 4 hexadecimal digits"))?;
            if group % 2 == 0 {
                return Err(bad("group is even: private groups are odd"));
            }
            let element = u8::from_str_radix(e.element.trim(), 16)
                .map_err(|_| bad("element is not the 2 hexadecimal digits of the low byte"))?;
            entries.insert((normalise_creator(&e.creator), group, element));
        }
        Ok(SafePrivateList { entries })
    }

    /// Adds the entries of `other`.
    pub fn extend(&mut self, other: SafePrivateList) {
        self.entries.extend(other.entries);
    }

    pub fn allows(&self, creator: &str, group: u16, element_low: u8) -> bool {
        self.entries
            .contains(&(normalise_creator(creator), group, element_low))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_and_lookups() {
        let l = SafePrivateList::builtin();
        assert!(l.len() > 10);
        assert!(l.allows("SIEMENS MR HEADER ", 0x0019, 0x0C));
        assert!(!l.allows("SIEMENS MR HEADER", 0x0019, 0x0F));
        assert!(!l.allows("ACME PHI", 0x0019, 0x0C));
    }

    #[test]
    fn rejects_even_groups() {
        let err = SafePrivateList::from_json(
            r#"{"attributes":[{"creator":"X","group":"0018","element":"10"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("even"));
    }
}

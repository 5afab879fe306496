//! The local index: which studies this node holds, in which versions, which of them the ledger
//! has finalised, and the header attributes of every instance, for queries (QIDO-RS, C-FIND)
//! and retrieval (WADO-RS, C-MOVE, C-GET).
//!
//! The index is derived data: at start it is read from its sealed records in the store
//! (`snapshot`) where they can be trusted, and rebuilt from the store (manifests and header
//! objects) and the ledger (which versions are registered) where they cannot, so losing it
//! loses nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_object::InMemDicomObject;
use medledger_crypto::Digest;
use medledger_ledger::DeidRecord;
use medledger_store::{InstanceEntry, SeriesEntry, StudyManifest};

/// Which form of the studies a request sees: identified originals (clinical care inside the
/// organisation and configured peers) or the de-identified derivatives (everyone else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum View {
    Original,
    Deidentified,
}

/// Header attributes of one stored instance (the data set without Pixel Data).
#[derive(Debug)]
pub struct InstanceMeta {
    pub attrs: InMemDicomObject,
    pub transfer_syntax: String,
}

impl InstanceMeta {
    /// Reads the attributes of a Part 10 file, Pixel Data left out (and, when it is the last
    /// element, not even read).
    pub fn read(file: &[u8]) -> Result<InstanceMeta, String> {
        let (transfer_syntax, mut attrs) =
            medledger_deid::read_instance_header(file).map_err(|e| e.to_string())?;
        attrs.remove_element(tags::PIXEL_DATA);
        attrs.remove_element(tags::FLOAT_PIXEL_DATA);
        attrs.remove_element(tags::DOUBLE_FLOAT_PIXEL_DATA);
        Ok(InstanceMeta {
            attrs,
            transfer_syntax,
        })
    }

    pub fn text(&self, tag: Tag) -> String {
        text(&self.attrs, tag)
    }

    pub fn frames(&self) -> u32 {
        self.text(tags::NUMBER_OF_FRAMES)
            .parse::<u32>()
            .unwrap_or(1)
            .max(1)
    }
}

/// The trimmed text of an attribute ("" when absent or not text).
pub fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' ').to_string())
        .unwrap_or_default()
}

/// One version of a study in one view: its manifest root and the manifest (object keys
/// included, so it stays in memory only).
#[derive(Debug, Clone)]
pub struct Version {
    pub root: Digest,
    pub manifest: Arc<StudyManifest>,
}

impl Version {
    pub fn new(manifest: StudyManifest) -> Version {
        Version {
            root: manifest.root(),
            manifest: Arc::new(manifest),
        }
    }
}

/// What the node knows of one study (by the original's Study Instance UID).
#[derive(Debug, Clone)]
pub struct StudyState {
    pub original: Version,
    pub derivative: Option<Version>,
    /// The versions the ledger has finalised: what queries show.
    pub registered_original: Option<Version>,
    pub registered_derivative: Option<Version>,
    /// Every version of the study in the store (original and derivative roots), which the
    /// study's index record accounts for.
    pub versions: BTreeSet<Digest>,
    /// When an instance last arrived: a study is registered once it has been quiet a while.
    pub changed: Instant,
    /// The patient's pseudonym (as on the ledger).
    pub patient: String,
    pub deid: Option<DeidRecord>,
    /// Registration attempts that failed in a row (for backing off and for status).
    pub failures: u32,
    pub last_error: Option<String>,
    /// Received from another organisation under this grant: kept as received, never
    /// registered or de-identified here.
    pub received: Option<String>,
}

impl StudyState {
    pub fn registered(&self, view: View) -> Option<&Version> {
        match view {
            View::Original => self.registered_original.as_ref(),
            View::Deidentified => self.registered_derivative.as_ref(),
        }
    }

    /// True while a version is stored that the ledger has not finalised.
    pub fn pending(&self) -> bool {
        self.received.is_none()
            && self.registered_original.as_ref().map(|v| v.root) != Some(self.original.root)
            || self.derivative.as_ref().map(|v| v.root)
                != self.registered_derivative.as_ref().map(|v| v.root)
    }
}

/// The index proper.
#[derive(Debug, Default)]
pub struct Index {
    pub studies: BTreeMap<String, StudyState>,
    meta: HashMap<(View, String), Arc<InstanceMeta>>,
}

/// An instance visible in a view, with what is needed to read it.
#[derive(Debug, Clone)]
pub struct Located {
    pub series: SeriesEntry,
    pub entry: InstanceEntry,
    pub meta: Arc<InstanceMeta>,
}

impl Index {
    pub fn put_meta(&mut self, view: View, sop_uid: &str, meta: Arc<InstanceMeta>) {
        self.meta.insert((view, sop_uid.to_string()), meta);
    }

    pub fn has_meta(&self, view: View, sop_uid: &str) -> bool {
        self.meta.contains_key(&(view, sop_uid.to_string()))
    }

    pub fn meta(&self, view: View, sop_uid: &str) -> Option<Arc<InstanceMeta>> {
        self.meta.get(&(view, sop_uid.to_string())).cloned()
    }

    /// Instances counted over every current version (originals).
    pub fn instance_count(&self) -> usize {
        self.studies
            .values()
            .filter(|s| s.received.is_none())
            .map(|s| s.original.manifest.instance_count())
            .sum()
    }

    /// Every instance visible in `view` (registered versions only), study by study.
    pub fn visible(&self, view: View) -> Vec<(String, Vec<Located>)> {
        let mut out = Vec::new();
        for s in self.studies.values() {
            let Some(v) = s.registered(view) else {
                continue;
            };
            let mut items = Vec::new();
            for (series, entry) in v.manifest.instances() {
                if let Some(meta) = self.meta(view, &entry.sop_instance_uid) {
                    items.push(Located {
                        series: SeriesEntry {
                            series_uid: series.series_uid.clone(),
                            modality: series.modality.clone(),
                            instances: Vec::new(),
                        },
                        entry: entry.clone(),
                        meta,
                    });
                }
            }
            out.push((v.manifest.study_uid.clone(), items));
        }
        out
    }

    /// The visible instances of one study (by its UID in that view), optionally one series
    /// and one instance.
    pub fn locate(
        &self,
        view: View,
        study_uid: &str,
        series_uid: Option<&str>,
        sop_uid: Option<&str>,
    ) -> Vec<Located> {
        self.visible(view)
            .into_iter()
            .filter(|(uid, _)| uid == study_uid)
            .flat_map(|(_, items)| items)
            .filter(|l| series_uid.is_none_or(|s| l.series.series_uid == s))
            .filter(|l| sop_uid.is_none_or(|s| l.entry.sop_instance_uid == s))
            .collect()
    }

    /// Answers a query (QIDO-RS or C-FIND) in `view`.
    pub fn search(&self, view: View, q: &Query) -> Vec<InMemDicomObject> {
        let mut out = Vec::new();
        for (study_uid, items) in self.visible(view) {
            if items.is_empty() {
                continue;
            }
            if q.study_uid.as_deref().is_some_and(|u| u != study_uid) {
                continue;
            }
            match q.level {
                QueryLevel::Study => {
                    let first = &items[0].meta.attrs;
                    let mut computed = InMemDicomObject::new_empty();
                    let modalities: BTreeSet<String> = items
                        .iter()
                        .map(|l| l.series.modality.clone())
                        .filter(|m| !m.is_empty())
                        .collect();
                    let series: BTreeSet<&str> =
                        items.iter().map(|l| l.series.series_uid.as_str()).collect();
                    put_str(
                        &mut computed,
                        tags::MODALITIES_IN_STUDY,
                        VR::CS,
                        &modalities.into_iter().collect::<Vec<_>>().join("\\"),
                    );
                    put_str(
                        &mut computed,
                        tags::NUMBER_OF_STUDY_RELATED_SERIES,
                        VR::IS,
                        &series.len().to_string(),
                    );
                    put_str(
                        &mut computed,
                        tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
                        VR::IS,
                        &items.len().to_string(),
                    );
                    if q.matches(&[&computed, first]) {
                        out.push(q.respond(&[&computed, first], STUDY_DEFAULT));
                    }
                }
                QueryLevel::Series => {
                    let mut by_series: BTreeMap<&str, Vec<&Located>> = BTreeMap::new();
                    for l in &items {
                        by_series.entry(&l.series.series_uid).or_default().push(l);
                    }
                    for (series_uid, list) in by_series {
                        if q.series_uid.as_deref().is_some_and(|u| u != series_uid) {
                            continue;
                        }
                        let first = &list[0].meta.attrs;
                        let mut computed = InMemDicomObject::new_empty();
                        put_str(
                            &mut computed,
                            tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
                            VR::IS,
                            &list.len().to_string(),
                        );
                        if q.matches(&[&computed, first]) {
                            out.push(q.respond(&[&computed, first], SERIES_DEFAULT));
                        }
                    }
                }
                QueryLevel::Instance => {
                    for l in &items {
                        if q.series_uid
                            .as_deref()
                            .is_some_and(|u| u != l.series.series_uid)
                        {
                            continue;
                        }
                        if q.matches(&[&l.meta.attrs]) {
                            out.push(q.respond(&[&l.meta.attrs], INSTANCE_DEFAULT));
                        }
                    }
                }
            }
        }
        out.into_iter().skip(q.offset).take(q.limit).collect()
    }
}

/// Study-level attributes every QIDO-RS study result carries (PS3.18 Table 10.6.3-3).
const STUDY_DEFAULT: &[Tag] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::ACCESSION_NUMBER,
    tags::MODALITIES_IN_STUDY,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_ID,
    tags::STUDY_DESCRIPTION,
    tags::NUMBER_OF_STUDY_RELATED_SERIES,
    tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
];

/// Series-level attributes of a series result (Table 10.6.3-4), with the study's UID.
const SERIES_DEFAULT: &[Tag] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::MODALITY,
    tags::SERIES_DESCRIPTION,
    tags::SERIES_NUMBER,
    tags::SERIES_INSTANCE_UID,
    tags::STUDY_INSTANCE_UID,
    tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
    tags::PERFORMED_PROCEDURE_STEP_START_DATE,
    tags::PERFORMED_PROCEDURE_STEP_START_TIME,
    tags::SERIES_DATE,
    tags::SERIES_TIME,
];

/// Instance-level attributes of an instance result (Table 10.6.3-5).
const INSTANCE_DEFAULT: &[Tag] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::SOP_CLASS_UID,
    tags::SOP_INSTANCE_UID,
    tags::INSTANCE_NUMBER,
    tags::ROWS,
    tags::COLUMNS,
    tags::BITS_ALLOCATED,
    tags::NUMBER_OF_FRAMES,
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::MODALITY,
];

fn put_str(obj: &mut InMemDicomObject, tag: Tag, vr: VR, value: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
}

/// The level a query searches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryLevel {
    Study,
    Series,
    Instance,
}

/// Which attributes a result carries beyond the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Include {
    #[default]
    Defaults,
    All,
    Tags(Vec<Tag>),
}

/// A query: matching keys, the attributes to return, paging.
#[derive(Debug, Clone)]
pub struct Query {
    pub level: QueryLevel,
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    pub filters: Vec<(Tag, String)>,
    pub include: Include,
    pub limit: usize,
    pub offset: usize,
}

/// Why a query's parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// A DICOM keyword (`PatientID`) or tag (`00100020`, `0010,0020`) as a tag.
pub fn parse_tag(s: &str) -> Option<Tag> {
    let hex: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if hex.len() == 8
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() || "(),".contains(c))
    {
        let g = u16::from_str_radix(&hex[..4], 16).ok()?;
        let e = u16::from_str_radix(&hex[4..], 16).ok()?;
        return Some(Tag(g, e));
    }
    StandardDataDictionary.by_name(s).map(|e| e.tag())
}

fn vr_of(tag: Tag) -> VR {
    match StandardDataDictionary.by_tag(tag).map(|e| e.vr()) {
        Some(VirtualVr::Exact(vr)) => vr,
        _ => VR::UN,
    }
}

impl Query {
    pub fn new(level: QueryLevel) -> Query {
        Query {
            level,
            study_uid: None,
            series_uid: None,
            filters: Vec::new(),
            include: Include::Defaults,
            limit: usize::MAX,
            offset: 0,
        }
    }

    /// Builds a query from QIDO-RS parameters (`key=value` pairs, decoded).
    pub fn from_params(
        level: QueryLevel,
        params: &[(String, String)],
    ) -> Result<Query, QueryError> {
        let mut q = Query::new(level);
        for (k, v) in params {
            match k.as_str() {
                "limit" => {
                    q.limit = v
                        .parse()
                        .map_err(|_| QueryError(format!("limit {v:?} is not a number")))?
                }
                "offset" => {
                    q.offset = v
                        .parse()
                        .map_err(|_| QueryError(format!("offset {v:?} is not a number")))?
                }
                "fuzzymatching" => {
                    if v == "true" {
                        return Err(QueryError(
                            "fuzzy matching is not supported (fuzzymatching=false)".into(),
                        ));
                    }
                }
                "includefield" => {
                    for f in v.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                        if f == "all" {
                            q.include = Include::All;
                        } else {
                            let t = parse_tag(f).ok_or_else(|| {
                                QueryError(format!(
                                    "includefield {f:?} is not a DICOM keyword or tag"
                                ))
                            })?;
                            match &mut q.include {
                                Include::All => {}
                                Include::Tags(ts) => ts.push(t),
                                Include::Defaults => q.include = Include::Tags(vec![t]),
                            }
                        }
                    }
                }
                // Cache busters and response hints some clients add.
                "_" | "accept" | "charset" => {}
                _ => {
                    let t = parse_tag(k).ok_or_else(|| {
                        QueryError(format!(
                            "{k:?} is not a DICOM keyword or tag, nor a QIDO-RS parameter"
                        ))
                    })?;
                    q.filters.push((t, v.clone()));
                }
            }
        }
        Ok(q)
    }

    /// Does an entity match every filter? `sources` are searched in order for each attribute.
    pub fn matches(&self, sources: &[&InMemDicomObject]) -> bool {
        self.filters.iter().all(|(tag, want)| {
            let have = sources.iter().find_map(|o| o.get(*tag));
            match_value(*tag, want, have.map(|e| (e.vr(), e.to_str().ok())))
        })
    }

    /// A result: the level's defaults, the filters' keys and the included fields.
    pub fn respond(&self, sources: &[&InMemDicomObject], defaults: &[Tag]) -> InMemDicomObject {
        let mut out = InMemDicomObject::new_empty();
        let mut copy = |tag: Tag| {
            if let Some(e) = sources.iter().find_map(|o| o.get(tag)) {
                out.put(e.clone());
            }
        };
        for t in defaults {
            copy(*t);
        }
        for (t, _) in &self.filters {
            copy(*t);
        }
        match &self.include {
            Include::Defaults => {}
            Include::Tags(ts) => ts.iter().for_each(|t| copy(*t)),
            Include::All => {
                for src in sources.iter().rev() {
                    for e in src.iter() {
                        if e.header().tag.group() != 0x7fe0 {
                            out.put(e.clone());
                        }
                    }
                }
            }
        }
        out
    }
}

/// Matching of one attribute (PS3.4 C.2.2.2): universal (empty), UID lists, wildcards
/// (`*`, `?`), date/time ranges, single values; PN case-insensitively; any value of a
/// multi-valued attribute may match. Fuzzy matching is off.
fn match_value(
    tag: Tag,
    want: &str,
    have: Option<(VR, Option<std::borrow::Cow<'_, str>>)>,
) -> bool {
    let want = want.trim();
    if want.is_empty() || want == "*" {
        return true;
    }
    let Some((vr, Some(have))) = have else {
        return false;
    };
    let vr = if vr == VR::UN { vr_of(tag) } else { vr };
    let values: Vec<&str> = have
        .split('\\')
        .map(|v| v.trim_matches(|c: char| c == '\0' || c == ' '))
        .collect();
    match vr {
        VR::UI => {
            let wanted: Vec<&str> = want.split([',', '\\']).map(str::trim).collect();
            values.iter().any(|v| wanted.contains(v))
        }
        VR::DA | VR::TM | VR::DT if want.contains('-') => {
            let (lo, hi) = want.split_once('-').expect("contains '-'");
            values.iter().any(|v| {
                let v = v.split('.').next().unwrap_or(v);
                (lo.is_empty() || v >= lo.trim())
                    && (hi.is_empty() || v <= hi.trim() || v.starts_with(hi.trim()))
            })
        }
        VR::PN => {
            let w = want.to_uppercase();
            values.iter().any(|v| wildcard(&w, &v.to_uppercase()))
        }
        _ => values.iter().any(|v| wildcard(want, v)),
    }
}

/// `*` any run, `?` any one character.
fn wildcard(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_ranges_and_uid_lists_match_as_ps3_4_says() {
        assert!(wildcard("DOE*", "DOE^JOHN"));
        assert!(wildcard("*JOHN", "DOE^JOHN"));
        assert!(wildcard("D?E*", "DOE^JOHN"));
        assert!(!wildcard("D?E", "DOE^JOHN"));
        assert!(!wildcard("SMITH*", "DOE^JOHN"));
        let s = |v: &'static str| Some((VR::DA, Some(std::borrow::Cow::Borrowed(v))));
        assert!(match_value(
            tags::STUDY_DATE,
            "20200101-20201231",
            s("20200615")
        ));
        assert!(!match_value(
            tags::STUDY_DATE,
            "20200101-20201231",
            s("20210101")
        ));
        assert!(match_value(tags::STUDY_DATE, "-20200101", s("20191231")));
        assert!(match_value(tags::STUDY_DATE, "20200101-", s("20200101")));
        assert!(!match_value(tags::STUDY_DATE, "20200101", s("20200102")));
        let u = |v: &'static str| Some((VR::UI, Some(std::borrow::Cow::Borrowed(v))));
        assert!(match_value(tags::STUDY_INSTANCE_UID, "1.2,1.3", u("1.3")));
        assert!(match_value(tags::STUDY_INSTANCE_UID, "1.2\\1.3", u("1.2")));
        assert!(!match_value(tags::STUDY_INSTANCE_UID, "1.2,1.3", u("1.23")));
        let p = |v: &'static str| Some((VR::PN, Some(std::borrow::Cow::Borrowed(v))));
        assert!(match_value(tags::PATIENT_NAME, "doe*", p("DOE^JOHN")));
        assert!(!match_value(tags::PATIENT_NAME, "doe", p("DOE^JOHN")));
        // Multi-valued: any value.
        let c = |v: &'static str| Some((VR::CS, Some(std::borrow::Cow::Borrowed(v))));
        assert!(match_value(tags::MODALITIES_IN_STUDY, "CT", c("CT\\SR")));
        assert!(!match_value(tags::MODALITIES_IN_STUDY, "MR", c("CT\\SR")));
        // Absent attributes match only the universal key.
        assert!(match_value(tags::PATIENT_NAME, "", None));
        assert!(!match_value(tags::PATIENT_NAME, "X", None));
    }

    #[test]
    fn parameters_by_keyword_or_tag_and_clear_errors() {
        let params = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let q = Query::from_params(
            QueryLevel::Study,
            &params(&[
                ("PatientID", "ML*"),
                ("00080020", "2020-"),
                ("includefield", "StudyDescription,00081030"),
                ("limit", "5"),
                ("offset", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(q.filters[0].0, tags::PATIENT_ID);
        assert_eq!(q.filters[1].0, tags::STUDY_DATE);
        assert_eq!(
            q.include,
            Include::Tags(vec![tags::STUDY_DESCRIPTION, tags::STUDY_DESCRIPTION])
        );
        assert_eq!((q.limit, q.offset), (5, 1));
        let e = Query::from_params(QueryLevel::Study, &params(&[("NoSuchKey", "1")])).unwrap_err();
        assert!(e.0.contains("NoSuchKey"));
        let e = Query::from_params(QueryLevel::Study, &params(&[("limit", "x")])).unwrap_err();
        assert!(e.0.contains("limit"));
        let e = Query::from_params(QueryLevel::Study, &params(&[("fuzzymatching", "true")]))
            .unwrap_err();
        assert!(e.0.contains("fuzzy"));
    }
}

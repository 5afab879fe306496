//! Identifiers planted in every attribute Table E.1-1 lists, in nested sequences, private
//! groups, curves and overlays, and in free text the table does not list: none may survive
//! the Basic Profile. Two studies of one patient keep one pseudonym, consistent UIDs and a
//! consistent date shift.

use std::collections::HashSet;

use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use medledger_deid::{DeidConfig, DeidKey, DeidOption, Deidentifier, OptionSet, open_output};
use medledger_testkit::planted::{planted_instance, two_studies_one_patient};
use medledger_testkit::synth::{CtStudySpec, FakePatient, ct_study};
use proptest::prelude::*;

fn deid(options: &[DeidOption], key: u8) -> Deidentifier {
    Deidentifier::new(DeidConfig::new(
        DeidKey::from_bytes([key; 32]),
        OptionSet::new(options.iter().copied()).unwrap(),
    ))
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Every value in the data set at any depth, as text (binary values as lossy UTF-8).
fn values(obj: &InMemDicomObject, out: &mut Vec<String>) {
    for e in obj.iter() {
        match e.value() {
            Value::Sequence(s) => s.items().iter().for_each(|i| values(i, out)),
            Value::Primitive(p) if e.tag() != tags::PIXEL_DATA => match p {
                dicom_core::PrimitiveValue::U8(b) => {
                    out.push(String::from_utf8_lossy(b).to_uppercase())
                }
                other => out.push(other.to_str().to_uppercase()),
            },
            _ => {}
        }
    }
}

#[test]
fn no_planted_identifier_survives_the_basic_profile() {
    for seed in [1, 2, 3] {
        let patient = FakePatient::generate(seed);
        let planted = planted_instance(&patient, seed);
        assert!(planted.planted.len() > 600, "the plant covers the table");
        let d = deid(&[], 9)
            .deidentify(&planted.bytes)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let out = open_output(&d.bytes).unwrap();
        let mut all = Vec::new();
        values(&out, &mut all);
        let mut survivors = Vec::new();
        for p in &planted.planted {
            let needle = p.value.trim().to_uppercase();
            // Short numbers (IS/DS values such as "3") occur by chance in any header.
            if needle.len() < 5 {
                continue;
            }
            if all.iter().any(|v| v.contains(&needle)) {
                survivors.push(format!("{} ({})", p.tag_path, p.vr));
            }
        }
        assert!(
            survivors.is_empty(),
            "seed {seed}: {} planted value(s) survived: {}",
            survivors.len(),
            survivors.join(", ")
        );
        // No private attribute, curve or overlay is left.
        for e in out.iter() {
            let g = e.tag().group();
            assert!(g % 2 == 0, "private {} left", e.tag());
            assert!(
                g & 0xFF00 != 0x5000 && g & 0xFF00 != 0x6000,
                "{} left",
                e.tag()
            );
        }
        assert_eq!(text(&out, tags::PATIENT_IDENTITY_REMOVED), "YES");
    }
}

#[test]
fn planted_identifiers_do_not_survive_any_single_option_where_the_option_does_not_retain_them() {
    // Options that clean (not retain) must still leave no planted person name or patient ID.
    let patient = FakePatient::generate(11);
    let planted = planted_instance(&patient, 11);
    for option in [
        DeidOption::CleanDescriptors,
        DeidOption::CleanStructuredContent,
        DeidOption::CleanGraphics,
        DeidOption::RetainLongitudinalModifiedDates,
        DeidOption::RetainSafePrivate,
    ] {
        let d = deid(&[option], 9)
            .deidentify(&planted.bytes)
            .unwrap_or_else(|e| panic!("{option}: {e}"));
        let out = open_output(&d.bytes).unwrap();
        let mut all = Vec::new();
        values(&out, &mut all);
        for p in planted
            .planted
            .iter()
            .filter(|p| p.vr == "PN" || p.tag_path.contains("(0010,0020)"))
        {
            let needle = p
                .value
                .split('^')
                .next()
                .unwrap_or("")
                .trim()
                .to_uppercase();
            if needle.len() < 5 {
                continue;
            }
            assert!(
                !all.iter().any(|v| v.contains(&needle)),
                "{option}: person name or ID planted at {} survived",
                p.tag_path
            );
        }
    }
}

#[test]
fn two_studies_of_one_patient_stay_linked() {
    let (round1, round2) = two_studies_one_patient(5);
    let d = deid(&[DeidOption::RetainLongitudinalModifiedDates], 3);
    let mut pseudonyms = HashSet::new();
    let mut studies = HashSet::new();
    let mut shifts = HashSet::new();
    for bytes in round1.iter().chain(round2.iter()) {
        let (_, input) = medledger_deid::read_instance(bytes).unwrap();
        let r = d.deidentify(bytes).unwrap();
        let out = open_output(&r.bytes).unwrap();
        pseudonyms.insert(r.pseudonym.clone());
        studies.insert(text(&out, tags::STUDY_INSTANCE_UID));
        let day = |s: &str| {
            time::Date::parse(s, time::macros::format_description!("[year][month][day]"))
                .unwrap()
                .to_julian_day()
        };
        shifts.insert(day(&text(&out, tags::STUDY_DATE)) - day(&text(&input, tags::STUDY_DATE)));
    }
    assert_eq!(pseudonyms.len(), 1, "one patient, one pseudonym");
    assert_eq!(studies.len(), 2, "two studies stay two");
    assert_eq!(
        shifts.len(),
        1,
        "one date shift for the patient: intervals kept"
    );
    assert!(shifts.iter().all(|&s| s < 0));
    // Another key gives another pseudonym: linkage needs the key.
    let other = deid(&[], 4).deidentify(&round1[0]).unwrap();
    assert!(!pseudonyms.contains(&other.pseudonym));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Replacement UIDs are valid and consistent for every reference across a whole series:
    /// each slice's Source Image Sequence names the new UID of the slice before it, and the
    /// frame of reference is one.
    #[test]
    fn references_stay_consistent_across_a_series(seed in 0u64..10_000, key in 0u8..255, id in "[A-Z0-9]{6,12}") {
        let mut patient = FakePatient::generate(seed);
        patient.id = id.clone();
        let spec = CtStudySpec { slices: 3, rows: 16, columns: 16, seed, ..CtStudySpec::for_seed(seed) };
        let d = deid(&[], key);
        let outs: Vec<InMemDicomObject> = ct_study(&patient, &spec)
            .iter()
            .map(|b| open_output(&d.deidentify(b).unwrap().bytes).unwrap().into_inner())
            .collect();
        let sops: Vec<String> = outs.iter().map(|o| text(o, tags::SOP_INSTANCE_UID)).collect();
        for (k, o) in outs.iter().enumerate() {
            prop_assert!(medledger_deid::is_valid_uid(&sops[k]));
            if k > 0 {
                let src = o.get(tags::SOURCE_IMAGE_SEQUENCE).expect("kept with UIDs replaced");
                let item = &src.items().unwrap()[0];
                prop_assert_eq!(text(item, tags::REFERENCED_SOP_INSTANCE_UID), sops[k - 1].clone());
            }
        }
        let frames: HashSet<String> = outs.iter().map(|o| text(o, tags::FRAME_OF_REFERENCE_UID)).collect();
        prop_assert_eq!(frames.len(), 1);
        let pseudonyms: HashSet<String> = outs.iter().map(|o| text(o, tags::PATIENT_ID)).collect();
        prop_assert_eq!(pseudonyms.len(), 1);
        prop_assert!(!pseudonyms.contains(&id));
    }

    /// The same original UID maps to the same replacement under one key, different ones to
    /// different replacements.
    #[test]
    fn uid_mapping_is_a_function_and_injective(a in "[1-9][0-9]{0,8}(\\.[1-9][0-9]{0,8}){1,6}", b in "[1-9][0-9]{0,8}(\\.[1-9][0-9]{0,8}){1,6}") {
        let key = DeidKey::from_bytes([1; 32]);
        prop_assert_eq!(key.replace_uid(&a), key.replace_uid(&a));
        if a != b {
            prop_assert_ne!(key.replace_uid(&a), key.replace_uid(&b));
        }
        prop_assert!(medledger_deid::is_valid_uid(&key.replace_uid(&a)));
    }
}

//! Golden files: the exact de-identified data set of chosen inputs under a fixed key, so any
//! change in what an attribute becomes shows up in review. Regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p medledger-deid --test golden` and read the diff.

use std::fmt::Write as _;
use std::path::PathBuf;

use dicom_core::header::Header;
use dicom_core::value::{PrimitiveValue, Value};
use dicom_object::InMemDicomObject;
use medledger_deid::{DeidConfig, DeidKey, DeidOption, Deidentifier, OptionSet, open_output};
use medledger_testkit::planted::planted_instance;
use medledger_testkit::synth::FakePatient;
use medledger_testkit::test_data_dir;
use sha2::{Digest, Sha256};

fn dump(obj: &InMemDicomObject, depth: usize, out: &mut String) {
    for e in obj.iter() {
        let pad = "  ".repeat(depth);
        let tag = e.tag();
        let _ = write!(
            out,
            "{pad}({:04X},{:04X}) {:?} ",
            tag.group(),
            tag.element(),
            e.vr()
        );
        match e.value() {
            Value::Sequence(s) => {
                let _ = writeln!(out, "{} item(s)", s.items().len());
                for (i, item) in s.items().iter().enumerate() {
                    let _ = writeln!(out, "{pad}  [{i}]");
                    dump(item, depth + 2, out);
                }
            }
            Value::PixelSequence(s) => {
                let bytes: Vec<u8> = s.fragments().iter().flatten().copied().collect();
                let _ = writeln!(
                    out,
                    "{} fragment(s) sha256:{}",
                    s.fragments().len(),
                    short_hash(&bytes)
                );
            }
            Value::Primitive(p) => match p {
                PrimitiveValue::Str(_) | PrimitiveValue::Strs(_) => {
                    let s = p.to_str();
                    let s: String = s.chars().take(100).collect();
                    let _ = writeln!(out, "{s:?}");
                }
                PrimitiveValue::Empty => {
                    let _ = writeln!(out, "(empty)");
                }
                other => {
                    let bytes = other.to_bytes();
                    let _ = writeln!(out, "{} byte(s) sha256:{}", bytes.len(), short_hash(&bytes));
                }
            },
        }
    }
}

fn short_hash(b: &[u8]) -> String {
    hex::encode(&Sha256::digest(b)[..8])
}

fn check(name: &str, input: &[u8], options: &[DeidOption]) {
    let d = Deidentifier::new(DeidConfig::new(
        DeidKey::from_bytes([0x33; 32]),
        OptionSet::new(options.iter().copied()).unwrap(),
    ));
    let result = d
        .deidentify(input)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let out = open_output(&result.bytes).unwrap();
    let mut text = format!(
        "# {name}: options {:?}\n# transfer syntax {}\n",
        options,
        out.meta().transfer_syntax().trim_end_matches('\0')
    );
    dump(&out, 0, &mut text);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run with UPDATE_GOLDEN=1 and review it",
            path.display()
        )
    });
    if expected != text {
        let first = expected
            .lines()
            .zip(text.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(text.lines().count()));
        panic!(
            "{name}: output differs from {} at line {}:\n  expected: {:?}\n  actual:   {:?}\n(regenerate with UPDATE_GOLDEN=1 if the change is intended)",
            path.display(),
            first + 1,
            expected.lines().nth(first),
            text.lines().nth(first)
        );
    }
}

#[test]
fn planted_instance_under_the_basic_profile() {
    let p = planted_instance(&FakePatient::generate(1), 1);
    check("planted-basic", &p.bytes, &[]);
}

#[test]
fn planted_instance_under_retaining_options() {
    let p = planted_instance(&FakePatient::generate(1), 1);
    check(
        "planted-retain-dates-device-institution",
        &p.bytes,
        &[
            DeidOption::RetainLongitudinalModifiedDates,
            DeidOption::RetainDeviceIdentity,
            DeidOption::RetainInstitutionIdentity,
            DeidOption::RetainPatientCharacteristics,
            DeidOption::CleanDescriptors,
        ],
    );
}

#[test]
fn real_chest_ct_slice() {
    let bytes = std::fs::read(
        test_data_dir().join("series_lung-pet-ct-dx/Lung_Dx-A0001/chest_5mm/1-01.dcm"),
    )
    .unwrap();
    check(
        "chest-ct-1-01-modified-dates",
        &bytes,
        &[
            DeidOption::RetainLongitudinalModifiedDates,
            DeidOption::CleanDescriptors,
        ],
    );
}

#[test]
fn real_structured_report() {
    let bytes = std::fs::read(test_data_dir().join("dcmqi/sr-example/sr.dcm")).unwrap();
    check(
        "sr-clean-structured-content",
        &bytes,
        &[DeidOption::CleanStructuredContent],
    );
}

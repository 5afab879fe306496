//! The `medledger` binary as a user runs it: `deid` over a folder with good, bad and
//! non-DICOM files, `key`, and `demo`.

mod common;
use common::medledger;

use std::path::Path;

use medledger_testkit::synth::{CtStudySpec, FakePatient, ct_study};

#[test]
fn deid_folder_reports_every_file_and_never_touches_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let patient = FakePatient::generate(7);
    let spec = CtStudySpec {
        slices: 3,
        rows: 32,
        columns: 32,
        ..CtStudySpec::for_seed(7)
    };
    let files = ct_study(&patient, &spec);
    std::fs::create_dir_all(input.join("series")).unwrap();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(input.join(format!("series/{i}.dcm")), f).unwrap();
    }
    std::fs::write(input.join("truncated.dcm"), &files[0][..400]).unwrap();
    std::fs::write(input.join("README.txt"), b"not an image").unwrap();
    let before: Vec<Vec<u8>> = (0..3)
        .map(|i| std::fs::read(input.join(format!("series/{i}.dcm"))).unwrap())
        .collect();

    let out = tmp.path().join("out");
    let report = tmp.path().join("report.json");
    let run = medledger(tmp.path())
        .args([
            "deid",
            "--quiet",
            "--option",
            "retain-longitudinal-modified-dates",
        ])
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    // One file failed (the truncated one): exit code 1, the rest proceeded.
    assert_eq!(run.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("de-identified 3 of 5 files"), "{stdout}");
    assert!(stderr.contains("truncated.dcm"), "{stderr}");
    assert!(
        stderr.contains("created a new de-identification key"),
        "{stderr}"
    );
    // No identifier of the patient in any message.
    let family = patient.name.split('^').next().unwrap();
    assert!(!stdout.contains(family) && !stderr.contains(family));

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["deidentified"], 3);
    assert_eq!(report["failed"], 1);
    assert_eq!(report["skipped"], 1);
    let outputs: Vec<String> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["output"].as_str().map(String::from))
        .collect();
    assert_eq!(outputs.len(), 3);
    for o in &outputs {
        let bytes = std::fs::read(o).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(family), "{o} carries the patient's name");
        assert!(!text.contains(&patient.id), "{o} carries the patient's ID");
        // <out>/<pseudonym>/<study>/<series>/<sop>.dcm
        assert_eq!(
            Path::new(o)
                .strip_prefix(&out)
                .unwrap()
                .components()
                .count(),
            4
        );
    }
    for (i, b) in before.iter().enumerate() {
        assert_eq!(
            &std::fs::read(input.join(format!("series/{i}.dcm"))).unwrap(),
            b
        );
    }

    // Same key, second run: the same pseudonymous paths (deterministic, idempotent).
    let run2 = medledger(tmp.path())
        .args([
            "deid",
            "--quiet",
            "--option",
            "retain-longitudinal-modified-dates",
        ])
        .arg(input.join("series"))
        .arg("--out")
        .arg(tmp.path().join("out2"))
        .output()
        .unwrap();
    assert_eq!(run2.status.code(), Some(0));
    for o in &outputs {
        let rel = Path::new(o).strip_prefix(&out).unwrap();
        assert!(
            tmp.path().join("out2").join(rel).is_file(),
            "{} differs",
            rel.display()
        );
    }
}

#[test]
fn bad_options_and_keys_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let run = medledger(tmp.path())
        .args(["deid", "x", "--out", "y", "--option", "retain-everything"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("clean-pixel-data"));

    let key = tmp.path().join("k");
    std::fs::write(&key, "not a key").unwrap();
    let run = medledger(tmp.path())
        .args(["deid", "."])
        .arg("--out")
        .arg(tmp.path().join("o"))
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("medledger key generate"));

    let both = medledger(tmp.path())
        .args([
            "deid",
            ".",
            "--out",
            "o",
            "--option",
            "retain-longitudinal-full-dates",
            "--option",
            "retain-longitudinal-modified-dates",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&both.stderr).contains("exclude each other"));

    // A missing file: named, with the reason, each once (the error's own message carries
    // its cause, which the chain would otherwise repeat).
    let missing = medledger(tmp.path())
        .args(["node", "--config", "no-such-node.json"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("no-such-node.json").count(), 1, "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );

    let generated = medledger(tmp.path())
        .args(["key", "generate"])
        .arg(tmp.path().join("new.key"))
        .output()
        .unwrap();
    assert!(generated.status.success());
    let again = medledger(tmp.path())
        .args(["key", "generate"])
        .arg(tmp.path().join("new.key"))
        .output()
        .unwrap();
    assert!(!again.status.success(), "a key is never overwritten");
}

#[test]
fn offline_demo_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let run = medledger(tmp.path())
        .current_dir(tmp.path())
        .args(["demo", "--offline", "--slices", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("de-identified 8 of 8 files"), "{stdout}");
    // Two patients, each with two studies under one pseudonym.
    assert_eq!(stdout.matches(": 2 stud(ies)").count(), 2, "{stdout}");
    assert!(tmp.path().join("medledger-demo/deid-report.json").is_file());
    // The store step: four originals, four derivatives sharing their pixels, the researcher
    // refused the original, tampering caught.
    assert_eq!(stdout.matches("    original   ").count(), 4, "{stdout}");
    assert_eq!(
        stdout.matches("2 pixel objects shared").count(),
        4,
        "{stdout}"
    );
    assert!(
        stdout.contains("refused, not shared with that key"),
        "{stdout}"
    );
    assert!(stdout.contains("tampering caught by verify"), "{stdout}");
    assert!(
        stdout.contains("retrieval of the tampered study refused"),
        "{stdout}"
    );
    assert!(stdout.contains("verify clean"), "{stdout}");
}

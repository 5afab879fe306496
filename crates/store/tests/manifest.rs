//! The manifest format: pinned by golden vectors, proofs for series and instances, and
//! refusal of anything forged or malformed.

use medledger_crypto::{Digest, ObjectKey};
use medledger_store::{
    InstanceEntry, InstanceProof, ObjectRef, SeriesEntry, SeriesProof, StudyManifest,
};

fn d(tag: &str) -> Digest {
    Digest::of(tag.as_bytes())
}

fn obj(tag: &str, len: u64) -> ObjectRef {
    ObjectRef {
        address: d(&format!("address {tag}")),
        digest: d(&format!("plain {tag}")),
        len,
        key: ObjectKey::from_bytes(*d(&format!("key {tag}")).as_bytes()),
    }
}

/// A fixed study: two series (3 and 1 instances), one multi-frame instance.
fn fixed() -> StudyManifest {
    let inst = |sop: &str, frames: usize| InstanceEntry {
        sop_instance_uid: sop.into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        header: obj(&format!("{sop} header"), 2048),
        pixels: (0..frames)
            .map(|f| obj(&format!("{sop} frame {f}"), 524_288))
            .collect(),
    };
    StudyManifest {
        study_uid: "2.25.1000".into(),
        derived_from: None,
        series: vec![
            SeriesEntry {
                series_uid: "2.25.2000".into(),
                modality: "CT".into(),
                instances: vec![
                    inst("2.25.3001", 1),
                    inst("2.25.3002", 1),
                    inst("2.25.3003", 3),
                ],
            },
            SeriesEntry {
                series_uid: "2.25.2001".into(),
                modality: "SR".into(),
                instances: vec![InstanceEntry {
                    sop_instance_uid: "2.25.4001".into(),
                    sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.22".into(),
                    header: obj("sr header", 900),
                    pixels: vec![],
                }],
            },
        ],
    }
}

fn golden_text(m: &StudyManifest) -> String {
    let mut out = String::new();
    out.push_str("# medledger study manifest, format version 1: golden vectors.\n");
    out.push_str("# Regenerate only for a new format version (UPDATE_GOLDEN=1).\n");
    out.push_str(&format!("root {}\n", m.root()));
    for (i, s) in m.series.iter().enumerate() {
        out.push_str(&format!("series {i} leaf {}\n", s.leaf()));
        for (j, inst) in s.instances.iter().enumerate() {
            out.push_str(&format!("instance {i}.{j} leaf {}\n", inst.leaf()));
        }
    }
    out.push_str(&format!("encoding {}\n", hex::encode(m.encode())));
    out.push_str(&format!(
        "series-proof 1 {}\n",
        hex::encode(m.series_proof(1).encode())
    ));
    out.push_str(&format!(
        "instance-proof 0.2 {}\n",
        hex::encode(m.instance_proof(0, 2).encode())
    ));
    let mut derived = m.clone();
    derived.derived_from = Some(m.root());
    out.push_str(&format!(
        "derived-encoding {}\n",
        hex::encode(derived.encode())
    ));
    out
}

#[test]
fn golden_vectors_pin_the_format() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/manifest-v1.txt");
    let actual = golden_text(&fixed());
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).expect("golden file (UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        actual, expected,
        "the manifest format changed: that needs a new version"
    );
}

#[test]
fn encoding_round_trips_and_root_ignores_encryption() {
    let m = fixed();
    assert_eq!(StudyManifest::decode(&m.encode()).unwrap(), m);
    // Same content under other keys and addresses: same root.
    let mut other = m.clone();
    for s in &mut other.series {
        for i in &mut s.instances {
            i.header.address = d("elsewhere");
            i.header.key = ObjectKey::from_bytes([7; 32]);
        }
    }
    assert_eq!(other.root(), m.root());
    // Any content change moves the root.
    let mut changed = m.clone();
    changed.series[0].instances[2].pixels[1].digest = d("other frame");
    assert_ne!(changed.root(), m.root());
    let mut relabeled = m.clone();
    relabeled.series[1].modality = "CT".into();
    assert_ne!(relabeled.root(), m.root());
}

#[test]
fn proofs_verify_series_and_instances() {
    let m = fixed();
    let root = m.root();
    for (i, s) in m.series.iter().enumerate() {
        let p = SeriesProof::decode(&m.series_proof(i).encode()).unwrap();
        assert!(p.verify(&root, s), "series {i}");
        for (j, inst) in s.instances.iter().enumerate() {
            let p = InstanceProof::decode(&m.instance_proof(i, j).encode()).unwrap();
            assert!(p.verify(&root, inst), "instance {i}.{j}");
            // Another instance's content does not verify under this proof.
            let mut forged = inst.clone();
            forged.header.digest = d("tampered header");
            assert!(!p.verify(&root, &forged));
        }
    }
    // A series with an instance dropped, or one added, fails its proof.
    let p = m.series_proof(0);
    let mut partial = m.series[0].clone();
    partial.instances.pop();
    assert!(!p.verify(&root, &partial));
    let mut extra = m.series[0].clone();
    extra.instances.push(m.series[1].instances[0].clone());
    assert!(!p.verify(&root, &extra));
    // A proof against another study's root fails.
    let mut other = m.clone();
    other.study_uid = "2.25.1001".into();
    assert!(!p.verify(&other.root(), &m.series[0]));
}

#[test]
fn decode_refuses_malformed_and_non_canonical_input() {
    let m = fixed();
    let bytes = m.encode();
    for cut in [0, 3, 4, 6, 20, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            StudyManifest::decode(&bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(StudyManifest::decode(&trailing).is_err());
    let mut version = bytes.clone();
    version[5] = 2;
    let err = StudyManifest::decode(&version).unwrap_err().to_string();
    assert!(err.contains("version 2"), "{err}");
    // Out-of-order series are not the canonical encoding.
    let mut unordered = m.clone();
    unordered.series.reverse();
    assert!(StudyManifest::decode(&unordered.encode()).is_err());
    // A forged huge count does not allocate, it fails.
    let mut forged = bytes.clone();
    let at = 4 + 2 + 4 + m.study_uid.len() + 1;
    forged[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(StudyManifest::decode(&forged).is_err());
    // Random garbage never panics.
    for seed in 0..200u64 {
        let garbage: Vec<u8> = (0..(seed * 7 % 300))
            .map(|i| ((i * 2654435761) ^ seed) as u8)
            .collect();
        let _ = StudyManifest::decode(&garbage);
        let _ = SeriesProof::decode(&garbage);
        let _ = InstanceProof::decode(&garbage);
    }
}

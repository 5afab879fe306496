//! Every backend passes the same conformance suite: the filesystem, and a real Garage S3
//! service started for the test.

use medledger_store::backend::{Backend, FsBackend, S3Backend, S3Config, conformance};
use medledger_testkit::garage::Garage;

#[test]
fn filesystem_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let b = FsBackend::open(dir.path().join("store")).unwrap();
    conformance::run(&b);
    // Objects fan out by the first two hex digits; nothing is left in tmp/.
    b.put(
        &format!("objects/ab{}", "0".repeat(62)),
        bytes::Bytes::from_static(b"x"),
    )
    .unwrap();
    assert!(
        dir.path()
            .join("store/objects/ab")
            .join(format!("ab{}", "0".repeat(62)))
            .is_file()
    );
    assert!(b.stale_tmp_files().unwrap().is_empty());
    // Reopening finds the same objects.
    drop(b);
    let again = FsBackend::open(dir.path().join("store")).unwrap();
    assert!(!again.list("objects/").unwrap().is_empty());
}

#[test]
fn filesystem_backend_refuses_a_foreign_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a store").unwrap();
    let err = FsBackend::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not a medledger store"), "{err}");
}

#[test]
fn garage_s3_backend_conforms() {
    let g = Garage::start();
    let b = S3Backend::with_config(&S3Config {
        endpoint: g.endpoint.clone(),
        region: g.region.clone(),
        bucket: g.bucket.clone(),
        access_key_id: g.access_key_id.clone(),
        secret_access_key: g.secret_access_key.clone(),
        prefix: "conformance".into(),
    })
    .unwrap();
    conformance::run(&b);
    assert!(b.describe().contains("s3://medledger-test/conformance"));

    // Wrong credentials give a clear error, not a hang or a panic.
    let bad = S3Backend::with_config(&S3Config {
        endpoint: g.endpoint.clone(),
        region: g.region.clone(),
        bucket: g.bucket.clone(),
        access_key_id: g.access_key_id.clone(),
        secret_access_key: "0".repeat(64),
        prefix: String::new(),
    })
    .unwrap();
    let err = bad.get("objects/anything").unwrap_err().to_string();
    assert!(err.contains("object store"), "{err}");
}

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

fn packed_objects(n: u64, seed: u8) -> Vec<(String, bytes::Bytes)> {
    (0..n)
        .map(|i| {
            (
                format!("objects/{seed:02x}{i:062x}"),
                bytes::Bytes::from(vec![seed.wrapping_add(i as u8); 5000 + i as usize]),
            )
        })
        .collect()
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn filesystem_batches_go_into_one_pack_that_other_openers_see() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let writer = FsBackend::open(&root).unwrap();
    // Opened before the write, as another process would be.
    let reader = FsBackend::open_existing(&root).unwrap();
    let batch = packed_objects(30, 1);
    writer.put_batch(batch.clone()).unwrap();
    assert_eq!(
        files_under(&root.join("packs")).len(),
        1,
        "one pack for the batch"
    );
    assert!(files_under(&root.join("objects")).is_empty());
    assert!(writer.stale_tmp_files().unwrap().is_empty());
    for (k, v) in &batch {
        assert_eq!(&reader.get(k).unwrap(), v);
        let at = reader.locate(k).unwrap().unwrap();
        assert_eq!(at.len, v.len() as u64);
    }
    // A delete by one opener is seen by the other: the pack is written again without it.
    writer.delete(&batch[4].0).unwrap();
    assert!(reader.get(&batch[4].0).unwrap_err().is_not_found());
    assert_eq!(&reader.get(&batch[5].0).unwrap(), &batch[5].1);
    assert_eq!(reader.list("objects/").unwrap().len(), 29);
    assert_eq!(files_under(&root.join("packs")).len(), 1);
    // A fresh opener reads the same from the packs' indexes.
    let again = FsBackend::open_existing(&root).unwrap();
    assert_eq!(again.list("objects/").unwrap().len(), 29);
}

#[test]
fn an_uncommitted_batch_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = FsBackend::open(dir.path().join("store")).unwrap();
    let objects = packed_objects(5, 3);
    let mut w = b.batch();
    w.add(objects.clone()).unwrap();
    assert_eq!(
        b.stale_tmp_files().unwrap().len(),
        1,
        "the pack being written"
    );
    drop(w);
    assert!(b.stale_tmp_files().unwrap().is_empty());
    for (k, _) in &objects {
        assert!(!b.exists(k).unwrap());
    }
    assert!(files_under(&dir.path().join("store/packs")).is_empty());
}

#[test]
fn a_damaged_pack_still_gives_every_object_before_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let b = FsBackend::open(&root).unwrap();
    let batch = packed_objects(10, 2);
    b.put_batch(batch.clone()).unwrap();
    let pack = files_under(&root.join("packs")).remove(0);
    let len = std::fs::metadata(&pack).unwrap().len();
    // The index's digest no longer matches: the records are read one by one instead.
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[len as usize - 30] ^= 1;
    std::fs::write(&pack, &bytes).unwrap();
    let reopened = FsBackend::open_existing(&root).unwrap();
    for (k, v) in &batch {
        assert_eq!(&reopened.get(k).unwrap(), v);
    }
    // Cut off in the middle of the seventh object: six whole, the seventh short, the rest gone.
    let at = reopened.locate(&batch[6].0).unwrap().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(at.offset + 10)
        .unwrap();
    let reopened = FsBackend::open_existing(&root).unwrap();
    for (k, v) in &batch[..6] {
        assert_eq!(&reopened.get(k).unwrap(), v);
    }
    assert_eq!(reopened.get(&batch[6].0).unwrap().len(), 10);
    for (k, _) in &batch[7..] {
        assert!(reopened.get(k).unwrap_err().is_not_found());
    }
    // The opener that read the index before the cut gives the short bytes too, not an error.
    assert_eq!(b.get(&batch[6].0).unwrap().len(), 10);
    // A file in packs/ that is not a pack is skipped, not fatal.
    std::fs::write(root.join("packs/junk.pack"), b"not a pack").unwrap();
    assert!(FsBackend::open_existing(&root).is_ok());
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

#[test]
fn an_unreachable_s3_service_gives_an_error_within_seconds() {
    // A port nothing listens on: every request is refused at connect.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b = S3Backend::with_config(&S3Config {
        endpoint: format!("http://127.0.0.1:{port}"),
        region: "garage".into(),
        bucket: "medledger-test".into(),
        access_key_id: "GK000000000000000000000000".into(),
        secret_access_key: "0".repeat(64),
        prefix: String::new(),
    })
    .unwrap();
    let t = std::time::Instant::now();
    let err = b
        .put("objects/aa/unreachable", bytes::Bytes::from_static(b"x"))
        .unwrap_err()
        .to_string();
    // Three quick retries, under a second; object_store's default retries took about 11 s
    // here, and up to three minutes against a service that answers slowly.
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "the error took {:?}",
        t.elapsed()
    );
    assert!(err.contains("objects/aa/unreachable"), "{err}");
    assert!(b.get("objects/aa/unreachable").is_err());
}

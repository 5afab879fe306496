//! The behaviour every backend must show, as one function that panics at the first
//! difference. Each backend's tests call [`run`] on a fresh, empty backend.

use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};

use super::{Backend, BackendError};

fn random_bytes(n: usize, seed: u64) -> Bytes {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    Bytes::from(v)
}

/// Runs the conformance suite against an empty backend.
pub fn run(b: &dyn Backend) {
    let run_id: u32 = rand::thread_rng().r#gen();
    let k = |name: &str| format!("conformance-{run_id:08x}/{name}");

    // Missing keys.
    match b.get(&k("missing")) {
        Err(BackendError::NotFound(_)) => {}
        other => panic!("get of a missing key must be NotFound, got {other:?}"),
    }
    assert!(!b.exists(&k("missing")).unwrap());

    // Round trips: empty, small, several MB.
    for (i, n) in [0usize, 1, 1000, 5 << 20].into_iter().enumerate() {
        let data = random_bytes(n, i as u64);
        b.put(&k(&format!("size-{n}")), data.clone()).unwrap();
        assert_eq!(b.get(&k(&format!("size-{n}"))).unwrap(), data, "size {n}");
        assert!(b.exists(&k(&format!("size-{n}"))).unwrap());
    }

    // Overwrite replaces the whole value.
    b.put(&k("over"), Bytes::from_static(b"first value, longer"))
        .unwrap();
    b.put(&k("over"), Bytes::from_static(b"second")).unwrap();
    assert_eq!(b.get(&k("over")).unwrap(), Bytes::from_static(b"second"));

    // Batches, and listing with sizes.
    let batch: Vec<(String, Bytes)> = (0..40)
        .map(|i| {
            (
                k(&format!("batch/{i:03}")),
                random_bytes(i * 37, 100 + i as u64),
            )
        })
        .collect();
    b.put_batch(batch.clone()).unwrap();
    let mut listed = b.list(&k("batch/")).unwrap();
    listed.sort();
    let expected: Vec<(String, u64)> = batch
        .iter()
        .map(|(key, v)| (key.clone(), v.len() as u64))
        .collect();
    assert_eq!(listed, expected, "list must return exactly the batch");
    for (key, v) in &batch {
        assert_eq!(&b.get(key).unwrap(), v);
    }

    // Content-addressed keys (the filesystem fans these out) list under their key.
    let obj = format!("objects/{:064x}", u128::from(run_id));
    b.put(&obj, Bytes::from_static(b"sealed")).unwrap();
    assert!(
        b.list("objects/")
            .unwrap()
            .iter()
            .any(|(key, n)| key == &obj && *n == 6)
    );
    assert_eq!(b.get(&obj).unwrap(), Bytes::from_static(b"sealed"));
    b.delete(&obj).unwrap();

    // A batch of content-addressed objects (the filesystem packs these): each reads back and
    // lists with its size; deleting some leaves the others whole.
    let objects: Vec<(String, Bytes)> = (0..20u64)
        .map(|i| {
            (
                format!("objects/{run_id:08x}{i:056x}"),
                random_bytes(i as usize * 1000 + 1, 200 + i),
            )
        })
        .collect();
    b.put_batch(objects.clone()).unwrap();
    let listed: std::collections::HashMap<String, u64> =
        b.list("objects/").unwrap().into_iter().collect();
    for (key, v) in &objects {
        assert_eq!(&b.get(key).unwrap(), v);
        assert_eq!(listed.get(key), Some(&(v.len() as u64)), "{key} listed");
    }
    let (gone, kept): (Vec<_>, Vec<_>) = objects.iter().partition(|(k, _)| k.ends_with(['3', '7']));
    b.delete_many(&gone.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
        .unwrap();
    let listed = b.list("objects/").unwrap();
    for (key, _) in &gone {
        assert!(b.get(key).unwrap_err().is_not_found(), "{key} deleted");
        assert!(!b.exists(key).unwrap());
        assert!(!listed.iter().any(|(k, _)| k == key));
    }
    for (key, v) in &kept {
        assert_eq!(&b.get(key).unwrap(), v, "{key} kept");
    }
    b.delete_many(&kept.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
        .unwrap();
    assert!(kept.iter().all(|(k, _)| !b.exists(k).unwrap()));

    // A batch filled in steps, objects and other keys mixed: all there once committed.
    let steps: Vec<(String, Bytes)> = (0..6u64)
        .map(|i| {
            let key = if i == 5 {
                k("batch-record")
            } else {
                format!("objects/{run_id:08x}{:056x}", 1000 + i)
            };
            (key, random_bytes(i as usize * 777, 300 + i))
        })
        .collect();
    let mut w = b.batch();
    w.add(steps[..2].to_vec()).unwrap();
    w.add(steps[2..].to_vec()).unwrap();
    w.commit().unwrap();
    for (key, v) in &steps {
        assert_eq!(&b.get(key).unwrap(), v, "{key} after commit");
    }
    // A later put of a key the batch wrote replaces its value.
    b.put(&k("batch-record"), Bytes::from_static(b"replaced"))
        .unwrap();
    assert_eq!(
        b.get(&k("batch-record")).unwrap(),
        Bytes::from_static(b"replaced")
    );
    assert!(
        b.list(&k("batch-record"))
            .unwrap()
            .iter()
            .any(|(key, n)| key == &k("batch-record") && *n == 8)
    );
    b.delete_many(&steps.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
        .unwrap();

    // Delete, and delete of a missing key.
    b.delete(&k("over")).unwrap();
    assert!(b.get(&k("over")).unwrap_err().is_not_found());
    b.delete(&k("over")).unwrap();

    // Keys that could escape the store or collide are refused.
    for bad in [
        "", "/abs", "a//b", "../up", "a/../b", "Upper", "sp ace", "a/",
    ] {
        match b.put(bad, Bytes::from_static(b"x")) {
            Err(BackendError::InvalidKey(_)) => {}
            other => panic!("key {bad:?} must be refused, got {other:?}"),
        }
    }

    // Concurrent writers: distinct keys all land; racing writers of one key leave one whole
    // value, never a mixture.
    let values: Vec<Bytes> = (0..8).map(|i| random_bytes(256 << 10, 1000 + i)).collect();
    std::thread::scope(|s| {
        for (i, v) in values.iter().enumerate() {
            s.spawn(move || {
                b.put(&k(&format!("par/{i}")), v.clone()).unwrap();
                b.put(&k("race"), v.clone()).unwrap();
            });
        }
    });
    for (i, v) in values.iter().enumerate() {
        assert_eq!(&b.get(&k(&format!("par/{i}"))).unwrap(), v);
    }
    let raced = b.get(&k("race")).unwrap();
    assert!(
        values.contains(&raced),
        "a raced key must hold one whole written value"
    );
}

//! The store end to end on real DICOM: put, get byte for byte, share, derivatives that share
//! pixel objects, and every kind of damage found by `verify` and refused by `get`.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;
use medledger_crypto::{Digest, SecretKey};
use medledger_store::{
    PutOptions, Scanned, Source, Store, StoreError, StudyPlan, backend::FsBackend, plan, scan_all,
    scan_memory,
};
use medledger_testkit::{chest_ct_series_dir, test_data_dir};

fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != "MANIFEST.tsv") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn plans_for(files: &[PathBuf]) -> Vec<StudyPlan> {
    let sources = files.iter().cloned().map(Source::File).collect();
    let (scanned, _) = scan_all(sources, &|_| {});
    plan(scanned).0
}

/// The de-identified derivatives of `files` (Basic Profile, key bytes `key`), planned.
fn derivative_plans(files: &[PathBuf], key: u8) -> Vec<StudyPlan> {
    let deid = medledger_deid::Deidentifier::new(medledger_deid::DeidConfig::new(
        medledger_deid::DeidKey::from_bytes([key; 32]),
        medledger_deid::OptionSet::new([]).unwrap(),
    ));
    let scanned = files
        .iter()
        .map(|f| {
            let d = deid.deidentify(&std::fs::read(f).unwrap()).unwrap();
            scan_memory(f.display().to_string(), Bytes::from(d.bytes)).unwrap()
        })
        .collect();
    plan(scanned).0
}

/// The first `n` files of the chest CT series.
fn chest_files(n: usize) -> Vec<PathBuf> {
    files_under(&chest_ct_series_dir())
        .into_iter()
        .take(n)
        .collect()
}

/// Verify (deeply or not) with the owner's key finds nothing wrong.
fn assert_clean(store: &Store, owner: &SecretKey, deep: bool) {
    let report = store.verify(Some(owner), deep, &|_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:#?}");
}

/// Puts the one study `files` make, for `owner` alone.
fn put_one(store: &Store, files: &[PathBuf], owner: &SecretKey) -> medledger_store::PutOutcome {
    let plan = plans_for(files).remove(0);
    store
        .put_study(plan, owner, &PutOptions::default(), &|_| {})
        .unwrap()
}

fn fs_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(Box::new(FsBackend::open(dir.path().join("store")).unwrap()));
    (dir, store)
}

/// [`fs_store`] with a 64 MiB read cache.
fn cached_fs_store() -> (tempfile::TempDir, Store) {
    let (dir, store) = fs_store();
    (dir, store.with_read_cache(64 << 20))
}

/// Each file read and scanned in memory, as a node holds what it receives.
fn scan_in_memory(files: &[PathBuf]) -> Vec<Scanned> {
    files
        .iter()
        .map(|f| {
            scan_memory(
                f.display().to_string(),
                Bytes::from(std::fs::read(f).unwrap()),
            )
            .unwrap()
        })
        .collect()
}

/// Gets a study and returns its files by SOP Instance UID.
fn get_all(
    store: &Store,
    root: &Digest,
    key: &SecretKey,
) -> Result<HashMap<String, Vec<u8>>, StoreError> {
    let out = Mutex::new(HashMap::new());
    store.get_study(root, key, &|_, inst, bytes| {
        out.lock()
            .unwrap()
            .insert(inst.sop_instance_uid.clone(), bytes);
        Ok(())
    })?;
    Ok(out.into_inner().unwrap())
}

fn sop_uid(bytes: &[u8]) -> String {
    medledger_store::split::split(bytes)
        .unwrap()
        .ids
        .sop_instance_uid
}

/// The files' bytes by SOP Instance UID.
fn by_sop_uid(files: &[PathBuf]) -> HashMap<String, Vec<u8>> {
    files
        .iter()
        .map(|f| {
            let b = std::fs::read(f).unwrap();
            (sop_uid(&b), b)
        })
        .collect()
}

#[test]
fn chest_ct_round_trips_byte_for_byte_and_is_idempotent() {
    let files = files_under(&chest_ct_series_dir());
    assert_eq!(files.len(), 64);
    let owner = SecretKey::generate();
    let (_dir, store) = fs_store();
    let mut plans = plans_for(&files);
    assert_eq!(plans.len(), 1, "one study");
    let root = plans[0].root;
    let out = store
        .put_study(plans.remove(0), &owner, &PutOptions::default(), &|_| {})
        .unwrap();
    assert_eq!(out.root, root);
    assert!(!out.already_present);
    assert_eq!(out.manifest.instance_count(), 64);
    assert_eq!(
        out.objects_written,
        64 * 2 + 1,
        "header + one frame each, and the manifest"
    );

    let got = get_all(&store, &root, &owner).unwrap();
    assert_eq!(got.len(), 64);
    for f in &files {
        let original = std::fs::read(f).unwrap();
        assert_eq!(got[&sop_uid(&original)], original, "{}", f.display());
    }

    // Putting the same study again writes nothing and gives the same root.
    let again = put_one(&store, &files, &owner);
    assert!(again.already_present);
    assert_eq!(again.root, root);
    let report = store.verify(Some(&owner), true, &|_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.studies_opened, 1);
    assert!(report.unreferenced.is_empty());
}

#[test]
fn the_whole_test_data_set_round_trips() {
    let files = files_under(&test_data_dir());
    let owner = SecretKey::generate();
    let (_dir, store) = fs_store();
    let sources = files.iter().cloned().map(Source::File).collect();
    let (scanned, refused) = scan_all(sources, &|_| {});
    assert!(refused.iter().all(|s| !s.reason.is_empty()));
    let (plans, skipped) = plan(scanned);
    // Same SOP Instance UID with other content is reported, never silently dropped.
    for s in &skipped {
        assert!(s.reason.contains("different content"), "{s:?}");
    }
    let skipped_names: Vec<String> = skipped.iter().map(|s| s.source.clone()).collect();
    let mut returned: HashMap<String, Vec<u8>> = HashMap::new();
    for p in plans {
        let out = store
            .put_study(p, &owner, &PutOptions::default(), &|_| {})
            .unwrap();
        returned.extend(get_all(&store, &out.root, &owner).unwrap());
    }
    // Every file that split comes back byte for byte, or was reported as a conflicting
    // duplicate: nothing is lost silently.
    let mut stored_files = 0;
    for f in &files {
        let b = std::fs::read(f).unwrap();
        let Ok(s) = medledger_store::split::split(&b) else {
            continue;
        };
        if returned.get(&s.ids.sop_instance_uid) == Some(&b) {
            stored_files += 1;
        } else {
            assert!(
                skipped_names.contains(&f.display().to_string()),
                "{} neither came back nor was reported",
                f.display()
            );
        }
    }
    assert!(stored_files >= 290, "{stored_files} files stored");
    assert!(returned.len() >= 290, "{} instances", returned.len());
    assert_clean(&store, &owner, false);
}

#[test]
fn sharing_adds_an_envelope_and_nothing_else() {
    let files = chest_files(4);
    let (owner, reader, stranger) = (
        SecretKey::generate(),
        SecretKey::generate(),
        SecretKey::generate(),
    );
    let (_dir, store) = fs_store();
    let root = put_one(&store, &files, &owner).root;
    assert!(matches!(
        get_all(&store, &root, &reader),
        Err(StoreError::NotRecipient(r)) if r == root
    ));
    let objects_before = store.backend().list("objects/").unwrap();
    assert!(store.share(&root, &owner, &reader.public()).unwrap());
    assert!(
        !store.share(&root, &owner, &reader.public()).unwrap(),
        "already shared"
    );
    assert_eq!(
        store.backend().list("objects/").unwrap().len(),
        objects_before.len()
    );
    assert_eq!(get_all(&store, &root, &reader).unwrap().len(), 4);
    // A stranger can neither read nor share onwards.
    assert!(matches!(
        get_all(&store, &root, &stranger),
        Err(StoreError::NotRecipient(_))
    ));
    assert!(store.share(&root, &stranger, &stranger.public()).is_err());
    // An envelope moved onto another study does not open it: wraps are bound to the root.
    let other = put_one(&store, &files[..1], &owner).root;
    let key = format!("refs/{}.json", other.to_hex());
    let mut record: serde_json::Value =
        serde_json::from_slice(&store.backend().get(&key).unwrap()).unwrap();
    let theirs: serde_json::Value = serde_json::from_slice(
        &store
            .backend()
            .get(&format!("refs/{}.json", root.to_hex()))
            .unwrap(),
    )
    .unwrap();
    record["envelopes"]
        .as_array_mut()
        .unwrap()
        .push(theirs["envelopes"][1].clone());
    store
        .backend()
        .put(&key, Bytes::from(serde_json::to_vec(&record).unwrap()))
        .unwrap();
    let err = get_all(&store, &other, &reader).unwrap_err().to_string();
    assert!(err.contains("envelope"), "{err}");
}

#[test]
fn derivative_shares_pixel_objects_and_costs_only_headers() {
    let files = files_under(&chest_ct_series_dir());
    let owner = SecretKey::generate();
    let (_dir, store) = fs_store();
    let original = put_one(&store, &files, &owner);
    let mut plans = derivative_plans(&files, 9);
    assert_eq!(plans.len(), 1);
    let index = original.object_index();
    let derived = store
        .put_study(
            plans.remove(0),
            &owner,
            &PutOptions {
                derived_from: Some(original.root),
                reuse: Some(&index),
                ..PutOptions::default()
            },
            &|_| {},
        )
        .unwrap();
    assert_ne!(derived.root, original.root);
    assert_eq!(derived.manifest.derived_from, Some(original.root));
    assert_eq!(
        derived.objects_reused, 64,
        "every frame is shared with the original"
    );
    let ratio = derived.bytes_written as f64 / original.bytes_written as f64;
    assert!(
        ratio <= 0.02,
        "derivative costs {:.2}% of the original",
        ratio * 100.0
    );
    // The derivative reads back as de-identified files with the original's pixels.
    let got = get_all(&store, &derived.root, &owner).unwrap();
    assert_eq!(got.len(), 64);
    for bytes in got.values() {
        let s = medledger_store::split::split(bytes).unwrap();
        assert!(index.contains_key(&Digest::of(&bytes[s.pixels[0].clone()])));
        assert!(
            !bytes.windows(8).any(|w| w == b"A0001^^^"),
            "no original name"
        );
    }
    assert_clean(&store, &owner, true);
}

#[test]
fn every_damaged_object_is_reported_and_refused() {
    let files = chest_files(8);
    let owner = SecretKey::generate();
    let (dir, store) = fs_store();
    let out = put_one(&store, &files, &owner);
    let root = out.root;
    let key = |a: &Digest| format!("objects/{}", a.to_hex());
    let refs: Vec<_> = out
        .manifest
        .instances()
        .flat_map(|(_, i)| i.objects().cloned())
        .collect();
    // A deletion, a bit flip, an object overwritten with zeros. The deletion first: it
    // writes the pack again without the object.
    let deleted = &refs[7];
    store.backend().delete(&key(&deleted.address)).unwrap();
    let disk = FsBackend::open_existing(dir.path().join("store")).unwrap();
    let locate = |a: &Digest| disk.locate(&key(a)).unwrap().expect("stored");
    let flipped = &refs[1];
    let at = locate(&flipped.address);
    at.flip_bit(at.len / 2).unwrap();
    let zeroed = &refs[10];
    let at = locate(&zeroed.address);
    assert_ne!(at.offset, 0, "objects of a batch are packed");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&at.path)
        .unwrap()
        .write_all_at(&vec![0; at.len as usize], at.offset)
        .unwrap();

    let report = store.verify(Some(&owner), true, &|_, _| {}).unwrap();
    let mut corrupt: Vec<String> = report.corrupt.iter().map(|p| p.key.clone()).collect();
    corrupt.dedup();
    let mut expected = vec![key(&flipped.address), key(&zeroed.address)];
    expected.sort();
    assert_eq!(corrupt, expected, "{report:#?}");
    let missing: Vec<String> = report.missing.iter().map(|p| p.key.clone()).collect();
    assert_eq!(missing, vec![key(&deleted.address)]);
    assert!(report.missing[0].study == Some(root));

    // get refuses, naming the damaged object, instead of writing bad bytes.
    let err = get_all(&store, &root, &owner).unwrap_err().to_string();
    assert!(
        expected
            .iter()
            .chain(&missing)
            .any(|k| err.contains(k.as_str())),
        "{err}"
    );

    // A damaged manifest is found too, and the study cannot be opened.
    let manifest = store.study_ref(&root).unwrap().manifest;
    locate(&manifest).flip_bit(10).unwrap();
    let report = store.verify(Some(&owner), false, &|_, _| {}).unwrap();
    assert!(report.corrupt.iter().any(|p| p.key == key(&manifest)));
    assert!(store.open_manifest(&root, &owner).is_err());

    // A pack cut short in the middle of a study's manifest (written after its objects, in
    // the same pack, before its reference record): a new opener reads the pack record by
    // record, reports the pack as damaged and the manifest as corrupt.
    let other = store
        .put_study(
            derivative_plans(&files, 9).remove(0),
            &owner,
            &PutOptions::default(),
            &|_| {},
        )
        .unwrap();
    let other_manifest = store.study_ref(&other.root).unwrap().manifest;
    let at = locate(&other_manifest);
    let first = other.manifest.instances().next().unwrap().1.header.address;
    assert_eq!(at.path, locate(&first).path, "one pack");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&at.path)
        .unwrap()
        .set_len(at.offset + at.len / 2)
        .unwrap();
    let reopened = Store::new(Box::new(
        FsBackend::open_existing(dir.path().join("store")).unwrap(),
    ));
    let report = reopened.verify(Some(&owner), false, &|_, _| {}).unwrap();
    let pack = format!("packs/{}", at.path.file_name().unwrap().to_string_lossy());
    assert!(
        report
            .corrupt
            .iter()
            .any(|p| p.key == pack && p.reason.contains("index damaged")),
        "{report:#?}"
    );
    assert!(
        report.corrupt.iter().any(|p| p.key == key(&other_manifest)),
        "{report:#?}"
    );
    assert!(!report.is_clean());

    // A reference record that is not JSON is reported, not a crash.
    std::fs::write(
        dir.path()
            .join(format!("store/refs/{}.json", root.to_hex())),
        b"{oops",
    )
    .unwrap();
    let report = store.verify(None, false, &|_, _| {}).unwrap();
    assert!(
        report.corrupt.iter().any(|p| p.key.starts_with("refs/")),
        "{report:#?}"
    );
}

#[test]
fn rekey_revokes_old_keys_and_keeps_derivatives_working() {
    let files = chest_files(6);
    let (owner, reader) = (SecretKey::generate(), SecretKey::generate());
    let (_dir, store) = fs_store();
    let original = store
        .put_study(
            plans_for(&files).remove(0),
            &owner,
            &PutOptions {
                recipients: &[reader.public()],
                ..PutOptions::default()
            },
            &|_| {},
        )
        .unwrap();
    let root = original.root;
    // A derivative that shares the original's pixel objects.
    let index = original.object_index();
    let derived = store
        .put_study(
            derivative_plans(&files, 3).remove(0),
            &owner,
            &PutOptions {
                reuse: Some(&index),
                derived_from: Some(root),
                ..PutOptions::default()
            },
            &|_| {},
        )
        .unwrap();
    // What the reader held before: the manifest with every object key.
    let (_, held) = store.open_manifest(&root, &reader).unwrap();
    let before = get_all(&store, &root, &owner).unwrap();

    let out = store.rekey(&root, &owner, &[]).unwrap();
    assert_eq!(out.objects_resealed, 12);
    assert_eq!(
        out.objects_kept_shared, 6,
        "pixel objects the derivative uses stay"
    );
    assert_eq!(
        out.objects_deleted, 7,
        "six header objects and the old manifest"
    );

    // Same root, same bytes for the owner; the reader is no longer a recipient.
    assert_eq!(get_all(&store, &root, &owner).unwrap(), before);
    assert!(matches!(
        store.open_manifest(&root, &reader),
        Err(StoreError::NotRecipient(_))
    ));
    // The keys the reader kept open nothing of the study's current objects, and the old
    // header objects (the identified part) are gone.
    let (_, now) = store.open_manifest(&root, &owner).unwrap();
    for ((_, old_i), (_, new_i)) in held.instances().zip(now.instances()) {
        assert!(
            store.fetch(&old_i.header).is_err(),
            "old header object still readable"
        );
        for (old_o, new_o) in old_i.objects().zip(new_i.objects()) {
            assert_ne!(old_o.address, new_o.address);
            let mut with_old_key = new_o.clone();
            with_old_key.key = old_o.key.clone();
            assert!(store.fetch(&with_old_key).is_err());
        }
    }
    // The derivative still reads back in full.
    assert_eq!(get_all(&store, &derived.root, &owner).unwrap().len(), 6);
    let report = store.verify(Some(&owner), true, &|_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    assert!(report.unreferenced.is_empty(), "{report:#?}");
}

/// The read cache serves what was verified once, only under the very reference verified,
/// and forgets what re-keying deletes.
#[test]
fn the_read_cache_serves_verified_bytes_and_forgets_what_rekeying_deletes() {
    let files = chest_files(6);
    let owner = SecretKey::generate();
    let (_dir, store) = cached_fs_store();
    let root = put_one(&store, &files, &owner).root;
    let originals = by_sop_uid(&files);
    let (_, manifest) = store.open_manifest(&root, &owner).unwrap();
    let objects = manifest
        .instances()
        .map(|(_, i)| i.objects().count())
        .sum::<usize>() as u64;
    for pass in 1..=2u64 {
        for (_, i) in manifest.instances() {
            let file = store.fetch_instance(i).unwrap();
            assert!(
                file == originals[&i.sop_instance_uid],
                "{}",
                i.sop_instance_uid
            );
            let parts = store.fetch_instance_parts(i).unwrap().concat();
            assert!(parts == originals[&i.sop_instance_uid]);
        }
        let stats = store.read_cache_stats().unwrap();
        assert_eq!(
            stats.misses, objects,
            "pass {pass}: each object read from the store once"
        );
        assert_eq!(stats.hits, (2 * pass - 1) * objects, "pass {pass}");
    }
    // A reference that differs from the one verified (here a wrong key) is not served from
    // the cache: it goes to the store and fails there.
    let (_, first) = manifest.instances().next().unwrap();
    let mut forged = first.clone();
    forged.header.key = manifest.instances().nth(1).unwrap().1.header.key.clone();
    assert!(store.fetch_instance(&forged).is_err());

    // Re-keying deletes the old objects; the cache must not keep serving them.
    store.rekey(&root, &owner, &[]).unwrap();
    assert!(
        store.fetch_instance(first).is_err(),
        "a deleted object was served from the cache"
    );
    assert_eq!(store.read_cache_stats().unwrap().bytes, 0);
    assert_eq!(get_all(&store, &root, &owner).unwrap().len(), 6);
}

/// A version staged through a store with a read cache leaves its objects' plaintext there:
/// the first reading of a study just received is served from memory, and is what the store
/// holds (a second store over the same files, without a cache, reads the same bytes).
#[test]
fn a_version_just_written_is_read_from_the_cache_and_equals_what_the_store_holds() {
    let files = chest_files(4);
    let owner = SecretKey::generate();
    let (dir, store) = cached_fs_store();
    let (v, _) = store
        .extend_study(None, scan_in_memory(&files), &owner, &PutOptions::default())
        .unwrap();
    let objects: Vec<_> = v
        .manifest
        .instances()
        .flat_map(|(_, i)| i.objects().cloned().collect::<Vec<_>>())
        .collect();
    let stats = store.read_cache_stats().unwrap();
    assert_eq!(stats.entries, objects.len() as u64);
    assert_eq!(stats.bytes, objects.iter().map(|o| o.len).sum::<u64>());
    assert_eq!((stats.hits, stats.misses), (0, 0));
    let originals = by_sop_uid(&files);
    for (_, i) in v.manifest.instances() {
        assert!(store.fetch_instance(i).unwrap() == originals[&i.sop_instance_uid]);
    }
    let stats = store.read_cache_stats().unwrap();
    assert_eq!(
        (stats.hits, stats.misses),
        (objects.len() as u64, 0),
        "every object of the new version served from the cache"
    );
    let cold = Store::new(Box::new(FsBackend::open(dir.path().join("store")).unwrap()));
    for (_, i) in v.manifest.instances() {
        assert!(cold.fetch_instance(i).unwrap() == originals[&i.sop_instance_uid]);
    }
}

/// A version whose writing fails leaves nothing in the read cache: the objects it sealed
/// are never written, and a new attempt seals under new keys, so their plaintext would only
/// take the room of objects that can be read. Then, with the store back, the same instances
/// are written and cached.
#[test]
fn a_version_that_cannot_be_written_leaves_nothing_in_the_read_cache() {
    let files = chest_files(3);
    let owner = SecretKey::generate();
    let (dir, store) = cached_fs_store();
    // The store's folder is gone, and a file stands where it was: every write fails.
    let root = dir.path().join("store");
    std::fs::rename(&root, dir.path().join("away")).unwrap();
    std::fs::write(&root, b"not a folder").unwrap();
    let opts = PutOptions::default();
    assert!(
        store
            .extend_study(None, scan_in_memory(&files), &owner, &opts)
            .is_err()
    );
    let stats = store.read_cache_stats().unwrap();
    assert_eq!((stats.entries, stats.bytes), (0, 0), "{stats:?}");

    std::fs::remove_file(&root).unwrap();
    std::fs::rename(dir.path().join("away"), &root).unwrap();
    let (v, _) = store
        .extend_study(None, scan_in_memory(&files), &owner, &opts)
        .unwrap();
    let objects = v
        .manifest
        .instances()
        .map(|(_, i)| i.objects().count())
        .sum::<usize>();
    assert_eq!(store.read_cache_stats().unwrap().entries, objects as u64);
    let originals = by_sop_uid(&files);
    for (_, i) in v.manifest.instances() {
        assert!(store.fetch_instance(i).unwrap() == originals[&i.sop_instance_uid]);
    }
}

/// A study that arrives in parts (C-STORE, one instance at a time) becomes versions: each
/// version writes only its new objects, resending changes nothing, a changed instance under a
/// known SOP Instance UID is refused, and the last version equals the study put at once.
#[test]
fn a_study_grows_by_versions_that_write_only_what_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let owner = SecretKey::generate();
    let files = chest_files(6);
    let opts = PutOptions::default();
    let (v1, skipped) = store
        .extend_study(None, scan_in_memory(&files[..2]), &owner, &opts)
        .unwrap();
    assert!(skipped.is_empty());
    assert_eq!(v1.manifest.instance_count(), 2);
    let (v2, _) = store
        .extend_study(
            Some(&v1.manifest),
            scan_in_memory(&files[1..5]),
            &owner,
            &opts,
        )
        .unwrap();
    assert_eq!(v2.manifest.instance_count(), 5);
    // Three new instances: their header and pixel objects, and the manifest.
    assert_eq!(v2.objects_written, 3 * 2 + 1);
    // The first version's objects are referenced as they are.
    for (_, i) in v1.manifest.instances() {
        let (_, j) = v2
            .manifest
            .instances()
            .find(|(_, j)| j.sop_instance_uid == i.sop_instance_uid)
            .unwrap();
        assert_eq!(i, j);
    }
    // Sending instances again changes nothing.
    let (again, skipped) = store
        .extend_study(
            Some(&v2.manifest),
            scan_in_memory(&files[3..5]),
            &owner,
            &opts,
        )
        .unwrap();
    assert!(again.already_present && skipped.is_empty());
    assert_eq!(again.root, v2.root);
    // Other content under a known SOP Instance UID is refused and reported.
    let mut changed = std::fs::read(&files[0]).unwrap();
    let n = changed.len();
    changed[n - 1] ^= 0xff;
    let (same, skipped) = store
        .extend_study(
            Some(&v2.manifest),
            vec![scan_memory("changed".into(), Bytes::from(changed)).unwrap()],
            &owner,
            &opts,
        )
        .unwrap();
    assert_eq!(same.root, v2.root);
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].reason.contains("other content"), "{skipped:?}");
    // The last version has the root of the whole study put at once, and reads back whole.
    let (v3, _) = store
        .extend_study(
            Some(&v2.manifest),
            scan_in_memory(&files[5..6]),
            &owner,
            &opts,
        )
        .unwrap();
    let whole = plans_for(&files).pop().unwrap();
    assert_eq!(v3.root, whole.root);
    let got = Mutex::new(0);
    store
        .get_study(&v3.root, &owner, &|_, _, _| {
            *got.lock().unwrap() += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(*got.lock().unwrap(), 6);
    // Older versions can be dropped; the objects they share stay.
    store.forget(&v1.root).unwrap();
    store.forget(&v2.root).unwrap();
    assert_eq!(store.studies().unwrap(), vec![v3.root]);
    // Instances of another study cannot extend this one.
    let err = store
        .extend_study(
            Some(&v3.manifest),
            vec![scan_memory("other".into(), Bytes::from(deid_one(&files[0]))).unwrap()],
            &owner,
            &opts,
        )
        .unwrap_err();
    assert!(err.to_string().contains("cannot extend"), "{err}");
}

fn deid_one(f: &PathBuf) -> Vec<u8> {
    let deid = medledger_deid::Deidentifier::new(medledger_deid::DeidConfig::new(
        medledger_deid::DeidKey::from_bytes([7; 32]),
        medledger_deid::OptionSet::new([]).unwrap(),
    ));
    deid.deidentify(&std::fs::read(f).unwrap()).unwrap().bytes
}

/// The filesystem backend, refusing to write one key: a disk error on one study's record.
#[derive(Debug)]
struct RefusingOne {
    inner: FsBackend,
    refused: String,
}

impl medledger_store::backend::Backend for RefusingOne {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put(&self, key: &str, data: Bytes) -> Result<(), medledger_store::backend::BackendError> {
        self.put_batch(vec![(key.to_string(), data)])
    }
    fn put_batch(
        &self,
        items: Vec<(String, Bytes)>,
    ) -> Result<(), medledger_store::backend::BackendError> {
        if items.iter().any(|(k, _)| *k == self.refused) {
            return Err(medledger_store::backend::BackendError::io(
                self.refused.clone(),
                std::io::Error::other("no space left on device (injected)"),
            ));
        }
        self.inner.put_batch(items)
    }
    fn get(&self, key: &str) -> Result<Bytes, medledger_store::backend::BackendError> {
        self.inner.get(key)
    }
    fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, u64)>, medledger_store::backend::BackendError> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), medledger_store::backend::BackendError> {
        self.inner.delete(key)
    }
}

/// Many studies are put in groups that share their flushes; each study still gets its own
/// outcome: one whose record cannot be written fails alone, every other one is durable and
/// reads back, and a second put finds them all present.
#[test]
fn studies_put_together_each_get_their_own_outcome() {
    let files = files_under(&test_data_dir());
    let owner = SecretKey::generate();
    let plans = plans_for(&files);
    assert!(plans.len() > 50, "{} studies", plans.len());
    let victim = plans[plans.len() / 2].root;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(Box::new(RefusingOne {
        inner: FsBackend::open(dir.path().join("store")).unwrap(),
        refused: format!("refs/{}.json", victim.to_hex()),
    }));
    let announced = Mutex::new(Vec::new());
    let results = store.put_studies(
        plans_for(&files),
        &owner,
        &PutOptions::default(),
        &|_| {},
        &|uid, r| announced.lock().unwrap().push((uid.to_string(), r.is_ok())),
    );
    assert_eq!(results.len(), plans.len());
    assert_eq!(announced.lock().unwrap().len(), plans.len());
    for (plan, result) in plans.iter().zip(&results) {
        match result {
            Ok(out) => {
                assert_ne!(plan.root, victim);
                assert_eq!(out.root, plan.root);
                assert!(!out.already_present);
                assert_eq!(
                    get_all(&store, &out.root, &owner).unwrap().len(),
                    plan.instances().len()
                );
            }
            Err(e) => {
                assert_eq!(plan.root, victim, "{e}");
                assert!(e.to_string().contains("no space left"), "{e}");
                assert!(matches!(
                    store.study_ref(&victim),
                    Err(StoreError::UnknownRoot(_))
                ));
            }
        }
    }
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    assert_clean(&store, &owner, false);

    // Again, into the same store: everything written is found, nothing is written twice.
    let store = Store::new(Box::new(FsBackend::open(dir.path().join("store")).unwrap()));
    let again = store.put_studies(plans, &owner, &PutOptions::default(), &|_| {}, &|_, _| {});
    let present = again
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|o| o.already_present))
        .count();
    assert_eq!(present, again.len() - 1);
    assert!(again.iter().all(|r| r.is_ok()));
}

/// A put of files in one pass (each file sealed and written as it is read, studies planned
/// after the last) stores exactly what its studies take: objects of a study already stored,
/// of duplicate files and of refused files are taken back before the commit. Every study
/// reads back, and a second put commits nothing.
#[test]
fn a_one_pass_put_stores_exactly_what_its_studies_take() {
    let files = files_under(&test_data_dir());
    let owner = SecretKey::generate();
    let (dir, store) = fs_store();
    let first = plans_for(&files).remove(0);
    let (first_root, first_uid) = (first.root, first.study_uid.clone());
    store
        .put_study(first, &owner, &PutOptions::default(), &|_| {})
        .unwrap();
    let sources = || -> Vec<Source> { files.iter().cloned().map(Source::File).collect() };
    assert_eq!(Store::put_passes(&sources(), &PutOptions::default()), 1);
    let announced = Mutex::new(0);
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let (results, skipped) = store.put_files(
        sources(),
        &owner,
        &PutOptions::default(),
        &|n| {
            bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        },
        &|_, _| *announced.lock().unwrap() += 1,
    );
    assert!(
        skipped
            .iter()
            .any(|s| s.reason.contains("different content")),
        "the test data has conflicting duplicates: {skipped:#?}"
    );
    assert!(skipped.len() < files.len() / 2);
    assert_eq!(*announced.lock().unwrap(), results.len());
    assert!(bytes.into_inner() > 0);
    assert_eq!(results.len(), plans_for(&files).len());
    for (uid, r) in &results {
        let out = r.as_ref().unwrap();
        assert_eq!(out.already_present, *uid == first_uid, "{uid}");
        if out.root != first_root {
            assert_eq!(
                get_all(&store, &out.root, &owner).unwrap().len(),
                out.manifest.instances().count()
            );
        }
    }
    let report = store.verify(Some(&owner), true, &|_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    assert!(report.unreferenced.is_empty(), "{report:#?}");

    let packs = || {
        std::fs::read_dir(dir.path().join("store/packs"))
            .unwrap()
            .count()
    };
    let before = packs();
    let (again, _) = store.put_files(
        sources(),
        &owner,
        &PutOptions::default(),
        &|_| {},
        &|_, _| {},
    );
    assert!(
        again
            .iter()
            .all(|(_, r)| r.as_ref().unwrap().already_present)
    );
    assert_eq!(packs(), before, "nothing committed");
    let disk = FsBackend::open_existing(dir.path().join("store")).unwrap();
    assert!(disk.stale_tmp_files().unwrap().is_empty());
}

/// When the one pass cannot commit (here: one study's record is refused), the studies are
/// put again group by group: the one that cannot be written fails alone, the others are
/// durable, and nothing half-written is left that a study would need.
#[test]
fn a_one_pass_put_that_cannot_commit_falls_back_study_by_study() {
    let files = files_under(&test_data_dir());
    let owner = SecretKey::generate();
    let plans = plans_for(&files);
    let victim = plans[plans.len() / 3].root;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(Box::new(RefusingOne {
        inner: FsBackend::open(dir.path().join("store")).unwrap(),
        refused: format!("refs/{}.json", victim.to_hex()),
    }));
    let (results, _) = store.put_files(
        files.iter().cloned().map(Source::File).collect(),
        &owner,
        &PutOptions::default(),
        &|_| {},
        &|_, _| {},
    );
    assert_eq!(results.len(), plans.len());
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    assert_eq!(failed.len(), 1);
    assert!(matches!(
        store.study_ref(&victim),
        Err(StoreError::UnknownRoot(_))
    ));
    for (_, r) in &results {
        if let Ok(out) = r {
            assert!(!out.already_present);
            assert_eq!(
                get_all(&store, &out.root, &owner).unwrap().len(),
                out.manifest.instances().count()
            );
        }
    }
    assert_clean(&store, &owner, false);
    // The one pass's objects were taken back before the studies were put again; what is
    // left unreferenced is the failed group attempt's (one set) and the failed study's own
    // attempt, which gc reclaims.
    let report = store.verify(Some(&owner), false, &|_, _| {}).unwrap();
    let objects = |p: &StudyPlan| {
        1 + p
            .instances()
            .iter()
            .map(|i| 1 + i.pixel_digests().count())
            .sum::<usize>()
    };
    let one_set: usize = plans.iter().map(objects).sum();
    let bound = one_set + objects(&plans[plans.len() / 3]);
    assert!(
        report.unreferenced.len() <= bound,
        "{} unreferenced objects, one set and the failed study's are {bound}",
        report.unreferenced.len()
    );
    store.gc().unwrap();
    let report = store.verify(Some(&owner), true, &|_, _| {}).unwrap();
    assert!(
        report.is_clean() && report.unreferenced.is_empty(),
        "{report:#?}"
    );
    for (_, r) in &results {
        if let Ok(out) = r {
            assert!(get_all(&store, &out.root, &owner).is_ok());
        }
    }
}

#[test]
fn private_records_open_only_for_their_owner_and_name() {
    let (_dir, store) = fs_store();
    let owner = SecretKey::generate();
    let other = SecretKey::generate();
    assert_eq!(store.get_private("index/a", &owner).unwrap(), None);
    store
        .put_private("index/a", b"what only the owner reads", &owner.public())
        .unwrap();
    assert_eq!(
        store.get_private("index/a", &owner).unwrap().as_deref(),
        Some(&b"what only the owner reads"[..])
    );
    assert_eq!(
        store.list_private("index/").unwrap(),
        vec!["index/a".to_string()]
    );
    // Another key cannot open it.
    assert!(matches!(
        store.get_private("index/a", &other),
        Err(StoreError::Corrupt { .. })
    ));
    // The same bytes under another name do not open: the envelope is bound to the name.
    let raw = store.backend().get("private/index/a").unwrap();
    store.backend().put("private/index/b", raw.clone()).unwrap();
    assert!(matches!(
        store.get_private("index/b", &owner),
        Err(StoreError::Corrupt { .. })
    ));
    // Any flipped bit is refused.
    for at in [0, 10, 70, raw.len() - 1] {
        let mut bad = raw.to_vec();
        bad[at] ^= 1;
        store
            .backend()
            .put("private/index/a", Bytes::from(bad))
            .unwrap();
        assert!(
            matches!(
                store.get_private("index/a", &owner),
                Err(StoreError::Corrupt { .. })
            ),
            "bit flipped at {at} not caught"
        );
    }
    store.delete_private("index/a").unwrap();
    store.delete_private("index/a").unwrap();
    assert_eq!(store.get_private("index/a", &owner).unwrap(), None);
    // Names the backend refuses are refused.
    assert!(store.put_private("../x", b"", &owner.public()).is_err());
}

#[test]
fn attributes_are_read_without_pixel_objects_for_every_file() {
    let (_dir, store) = fs_store();
    let owner = SecretKey::generate();
    let files = files_under(&test_data_dir());
    let mut checked = 0;
    for plan in plans_for(&files) {
        let o = store
            .put_study(plan, &owner, &PutOptions::default(), &|_| {})
            .unwrap();
        for (_, i) in o.manifest.instances() {
            let whole = store.fetch_instance(i).unwrap();
            let attrs = store.fetch_instance_attributes(i).unwrap();
            // Same length, same bytes outside the pixel objects.
            assert_eq!(whole.len(), attrs.len(), "{}", i.sop_instance_uid);
            // Files the store kept as they are though they do not parse have no attributes.
            let Ok((_, a)) = medledger_deid::read_instance_header(&whole) else {
                continue;
            };
            let (_, b) = medledger_deid::read_instance_header(&attrs).unwrap();
            let strip = |mut o: dicom_object::InMemDicomObject| {
                o.remove_element(dicom_dictionary_std::tags::PIXEL_DATA);
                o.remove_element(dicom_dictionary_std::tags::FLOAT_PIXEL_DATA);
                o.remove_element(dicom_dictionary_std::tags::DOUBLE_FLOAT_PIXEL_DATA);
                o
            };
            // Every attribute, value and length as read (Debug shows them all).
            assert!(
                format!("{:?}", strip(a)) == format!("{:?}", strip(b)),
                "attributes differ for {}",
                i.sop_instance_uid
            );
            checked += 1;
        }
    }
    assert!(checked > 250, "only {checked} instances checked");
}

//! `medledger store` as a user runs it: put, get byte for byte, verify, share, on a folder
//! and on a real Garage S3 service; damaged stores reported; writers killed with SIGKILL at
//! random points, many times, without losing anything acknowledged.

mod common;
use common::{medledger, text};

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medledger_crypto::{Digest, SecretKey};
use medledger_store::{Backend, Store};
use medledger_testkit::garage::Garage;
use medledger_testkit::synth::{CtStudySpec, FakePatient, ct_study};
use rand::{Rng, SeedableRng};

/// Writes `studies` synthetic CT studies of `slices` slices under `dir`; returns every file's
/// bytes by SOP Instance UID.
fn synth_input(dir: &Path, studies: u64, slices: u32, size: u16) -> HashMap<String, Vec<u8>> {
    let mut by_uid = HashMap::new();
    for seed in 0..studies {
        let patient = FakePatient::generate(100 + seed);
        let spec = CtStudySpec {
            slices,
            rows: size,
            columns: size,
            ..CtStudySpec::for_seed(100 + seed)
        };
        let d = dir.join(format!("study-{seed}"));
        std::fs::create_dir_all(&d).unwrap();
        for (i, f) in ct_study(&patient, &spec).into_iter().enumerate() {
            std::fs::write(d.join(format!("{i:03}.dcm")), &f).unwrap();
            let uid = medledger_store::split::split(&f)
                .unwrap()
                .ids
                .sop_instance_uid;
            by_uid.insert(uid, f);
        }
    }
    by_uid
}

/// Roots printed by `store put` ("stored <root> ...").
fn stored_roots(stdout: &str) -> Vec<Digest> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("stored "))
        .map(|l| Digest::from_hex(l.split_whitespace().next().unwrap()).unwrap())
        .collect()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push(e);
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn put_get_verify_share_on_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let originals = synth_input(&input, 2, 4, 64);
    std::fs::write(input.join("README.txt"), b"not DICOM, skipped").unwrap();
    std::fs::write(input.join("no-study.dcm"), b"DICM but nothing else").unwrap();
    let store = tmp.path().join("store");
    let key = tmp.path().join("org.key");
    let keygen = medledger(tmp.path())
        .args(["store", "keygen"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen));
    assert!(tmp.path().join("org.key.pub").is_file());

    let put = medledger(tmp.path())
        .args(["store", "put", "--quiet", "--store"])
        .arg(&store)
        .arg("--key-file")
        .arg(&key)
        .arg(&input)
        .output()
        .unwrap();
    // The file that is not an instance is reported, and the exit status says so.
    assert_eq!(put.status.code(), Some(2), "{}", text(&put));
    assert!(
        String::from_utf8_lossy(&put.stderr).contains("no-study.dcm"),
        "{}",
        text(&put)
    );
    let roots = stored_roots(&String::from_utf8_lossy(&put.stdout));
    assert_eq!(roots.len(), 2, "{}", text(&put));

    let out = tmp.path().join("out");
    let get = medledger(tmp.path())
        .args(["store", "get", &roots[0].to_hex(), "--store"])
        .arg(&store)
        .arg("--key-file")
        .arg(&key)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(get.status.success(), "{}", text(&get));
    let got = files_in(&out);
    assert_eq!(got.len(), 4);
    for f in got {
        let b = std::fs::read(&f).unwrap();
        let uid = f.file_stem().unwrap().to_string_lossy().to_string();
        assert_eq!(originals[&uid], b, "{}", f.display());
    }

    // Another organisation's key cannot read it until shared.
    let other = tmp.path().join("other.key");
    assert!(
        medledger(tmp.path())
            .args(["store", "keygen"])
            .arg(&other)
            .output()
            .unwrap()
            .status
            .success()
    );
    let get_other = |dest: &str| {
        medledger(tmp.path())
            .args(["store", "get", &roots[1].to_hex(), "--store"])
            .arg(&store)
            .arg("--key-file")
            .arg(&other)
            .arg("--out")
            .arg(tmp.path().join(dest))
            .output()
            .unwrap()
    };
    let refused = get_other("o1");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not shared with this key"),
        "{}",
        text(&refused)
    );
    let share = medledger(tmp.path())
        .args(["store", "share", &roots[1].to_hex(), "--store"])
        .arg(&store)
        .arg("--key-file")
        .arg(&key)
        .arg("--recipient")
        .arg(tmp.path().join("other.key.pub"))
        .output()
        .unwrap();
    assert!(share.status.success(), "{}", text(&share));
    assert!(get_other("o2").status.success());
    // Revocation: re-keyed for the owner only, the other key opens nothing any more.
    let rekey = medledger(tmp.path())
        .args(["store", "rekey", &roots[1].to_hex(), "--store"])
        .arg(&store)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(rekey.status.success(), "{}", text(&rekey));
    assert!(
        String::from_utf8_lossy(&rekey.stdout).contains("old objects deleted"),
        "{}",
        text(&rekey)
    );
    assert!(!get_other("o4").status.success());

    // Readers never create a store where none is.
    let nowhere = tmp.path().join("no-store-here");
    let o = medledger(tmp.path())
        .args(["store", "verify", "--store"])
        .arg(&nowhere)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no medledger store at"),
        "{}",
        text(&o)
    );
    assert!(!nowhere.exists());

    // A root that is not in the store, and one that is not a root at all.
    for (root, says) in [
        ("00".repeat(32), "no study with root"),
        ("xyz".into(), "not a manifest root"),
    ] {
        let o = medledger(tmp.path())
            .args(["store", "get", &root, "--store"])
            .arg(&store)
            .arg("--key-file")
            .arg(&key)
            .arg("--out")
            .arg(tmp.path().join("o3"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(says),
            "{}",
            text(&o)
        );
    }

    // Damage: flip a bit in one object, delete another: verify names both, exits 1.
    let disk = medledger_store::FsBackend::open_existing(&store).unwrap();
    let mut objects: Vec<String> = disk
        .list("objects/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    objects.sort();
    disk.locate(&objects[3])
        .unwrap()
        .unwrap()
        .flip_bit(20)
        .unwrap();
    disk.delete(&objects[5]).unwrap();
    let verify = medledger(tmp.path())
        .args(["store", "verify", "--deep", "--store"])
        .arg(&store)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
    let name = |k: &str| k.trim_start_matches("objects/").to_string();
    assert!(
        v.lines()
            .any(|l| l.starts_with("CORRUPT") && l.contains(&name(&objects[3]))),
        "{v}"
    );
    assert!(
        v.lines()
            .any(|l| l.starts_with("MISSING") && l.contains(&name(&objects[5]))),
        "{v}"
    );
}

#[test]
fn put_get_verify_on_garage() {
    let g = Garage::start();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let originals = synth_input(&input, 1, 6, 128);
    let key = tmp.path().join("org.key");
    assert!(
        medledger(tmp.path())
            .args(["store", "keygen"])
            .arg(&key)
            .output()
            .unwrap()
            .status
            .success()
    );
    let location = "s3://medledger-test/site-a";
    let run = |args: &[&str]| {
        let mut c = medledger(tmp.path());
        c.args(args)
            .args(["--store", location])
            .arg("--key-file")
            .arg(&key);
        for (k, v) in g.env() {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let put = run(&[
        "store",
        "put",
        "--quiet",
        "--deidentify",
        input.to_str().unwrap(),
    ]);
    assert!(put.status.success(), "{}", text(&put));
    let stdout = String::from_utf8_lossy(&put.stdout).to_string();
    let roots = stored_roots(&stdout);
    assert_eq!(roots.len(), 1, "{stdout}");
    assert!(stdout.contains("6 pixel objects shared"), "{stdout}");
    let out = tmp.path().join("out");
    let get = run(&[
        "store",
        "get",
        &roots[0].to_hex(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(get.status.success(), "{}", text(&get));
    let got = files_in(&out);
    assert_eq!(got.len(), 6);
    for f in got {
        let uid = f.file_stem().unwrap().to_string_lossy().to_string();
        assert_eq!(originals[&uid], std::fs::read(&f).unwrap());
    }
    let verify = run(&["store", "verify", "--deep"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("2 studies opened"),
        "{}",
        text(&verify)
    );
}

/// Kills `store put` with SIGKILL at random points, many times (every other run resumes what
/// the last left), checking after every kill that every study it acknowledged
/// reads back byte for byte and that no object is partial.
#[test]
fn sigkill_during_put_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let originals = synth_input(&input, 8, 12, 256);
    let key_path = tmp.path().join("org.key");
    assert!(
        medledger(tmp.path())
            .args(["store", "keygen"])
            .arg(&key_path)
            .output()
            .unwrap()
            .status
            .success()
    );
    let key = SecretKey::from_text(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
    let put = |store: &Path| {
        medledger(tmp.path())
            .args(["store", "put", "--quiet", "--store"])
            .arg(store)
            .arg("--key-file")
            .arg(&key_path)
            .arg(&input)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    // How long an uninterrupted put takes (the second of two runs, with a warm cache), to
    // spread the kills over it.
    let mut full_time = Duration::ZERO;
    let mut all_roots = Vec::new();
    for name in ["reference-1", "reference-2"] {
        let started = Instant::now();
        let full = put(&tmp.path().join(name)).wait_with_output().unwrap();
        full_time = started.elapsed();
        assert!(full.status.success());
        all_roots = stored_roots(&String::from_utf8_lossy(&full.stdout));
    }
    assert_eq!(all_roots.len(), 8);

    let seed: u64 = std::env::var("MEDLEDGER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    eprintln!("crash seed {seed} (MEDLEDGER_CRASH_SEED to repeat); full put {full_time:?}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acknowledged: Vec<Digest> = Vec::new();
    let mut store_dir = tmp.path().join("store-0");
    let mut kills = 0;
    // Shrinks when a run finishes before its kill (a loaded or faster machine).
    let mut scale = 1.0;
    for round in 0..40 {
        // A fresh store every other round; the round between resumes a killed put.
        if round % 2 == 0 {
            store_dir = tmp.path().join(format!("store-{round}"));
            acknowledged.clear();
        }
        let mut child = put(&store_dir);
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(l);
                }
            })
        };
        // A resumed put has less left to do: kill it sooner.
        let span = if round % 2 == 0 { 0.95 } else { 0.5 };
        let delay = full_time.mul_f64(scale * rng.gen_range(0.0..span));
        std::thread::sleep(delay.min(Duration::from_secs(20)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        } else {
            scale *= 0.7;
        }
        child.wait().unwrap();
        reader.join().unwrap();
        acknowledged.extend(stored_roots(&lines.lock().unwrap().join("\n")));
        if !store_dir.exists() {
            continue; // killed before the store was created
        }

        let store = Store::open(store_dir.to_str().unwrap()).unwrap();
        for root in &acknowledged {
            let n = Mutex::new(0);
            store
                .get_study(root, &key, &|_, inst, bytes| {
                    assert_eq!(originals[&inst.sop_instance_uid], bytes, "round {round}");
                    *n.lock().unwrap() += 1;
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("round {round}: acknowledged study {root} lost: {e}"));
            assert_eq!(*n.lock().unwrap(), 12);
        }
        let report = store.verify(Some(&key), true, &|_, _| {}).unwrap();
        assert!(
            report.corrupt.is_empty(),
            "round {round}: partial or damaged objects: {report:#?}"
        );
        assert!(report.missing.is_empty(), "round {round}: {report:#?}");
        for root in store.studies().unwrap() {
            assert!(
                all_roots.contains(&root),
                "round {round}: a study record with an unknown root"
            );
        }
    }
    eprintln!("{kills} of 40 runs killed mid-put");
    assert!(kills >= 20, "only {kills} of 40 runs were killed mid-put");
    // A last, uninterrupted run completes the store.
    let last = put(&store_dir).wait_with_output().unwrap();
    assert!(last.status.success());
    let store = Store::open(store_dir.to_str().unwrap()).unwrap();
    assert_eq!(store.studies().unwrap(), {
        let mut r = all_roots.clone();
        r.sort();
        r
    });
    assert!(
        store
            .verify(Some(&key), true, &|_, _| {})
            .unwrap()
            .is_clean()
    );
    // What the killed runs left behind is reclaimed, and nothing any study needs.
    let gc = medledger(tmp.path())
        .args(["store", "gc", "--store"])
        .arg(&store_dir)
        .output()
        .unwrap();
    assert!(gc.status.success(), "{}", text(&gc));
    let report = store.verify(Some(&key), true, &|_, _| {}).unwrap();
    assert!(
        report.is_clean() && report.unreferenced.is_empty(),
        "{report:#?}"
    );
    assert!(
        std::fs::read_dir(store_dir.join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    for root in &all_roots {
        assert!(store.get_study(root, &key, &|_, _, _| Ok(())).is_ok());
    }
}

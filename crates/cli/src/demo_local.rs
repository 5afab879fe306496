//! `medledger demo --offline`: privacy at acquisition and the encrypted store in one
//! process, without a network. Identified CT studies (synthesised,
//! or a folder given with `--input`) are de-identified under the Basic Profile with
//! longitudinal modified dates and clean descriptors; the demo shows keyed pseudonyms linking
//! two screening rounds of one patient, consistent date shifts, the residual-identifier scan
//! and the provenance record that the ledger will carry. Then originals and derivatives go
//! into the hospital's encrypted store; the derivatives are shared with a researcher, who
//! retrieves one verified against its manifest root and is refused the originals; a flipped
//! bit in the store is caught.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use medledger_crypto::{Digest, SecretKey};
use medledger_deid::{DeidConfig, DeidKey, DeidOption, Deidentifier, OptionSet};
use medledger_store::{ObjectRef, PutOptions, Source, Store, StoreError, plan, scan_all};
use medledger_testkit::synth::{CtStudySpec, FakePatient, ct_study};

use crate::deid_cmd::{FileOutcome, run_files};
use crate::files::{collect_inputs, write_atomically};

/// What the offline demo takes.
#[derive(Debug)]
pub struct DemoArgs {
    pub input: Option<PathBuf>,
    pub workdir: PathBuf,
    pub slices: u32,
}

fn step(n: usize, title: &str) {
    println!("\n[{n}] {title}");
}

pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    println!("medledger demo: privacy at acquisition and the encrypted store");
    let work = &args.workdir;
    for sub in ["incoming", "deidentified", "store", "retrieved"] {
        let p = work.join(sub);
        if p.exists() {
            fs::remove_dir_all(&p).with_context(|| format!("cannot clear {}", p.display()))?;
        }
    }
    fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;

    // 1. Studies arrive identified, as a PACS would send them.
    let input_dir = match &args.input {
        Some(dir) => {
            step(1, &format!("Using the DICOM files under {}", dir.display()));
            dir.clone()
        }
        None => {
            step(
                1,
                "Synthesising identified CT studies: two patients, two annual screening rounds each",
            );
            let t = Instant::now();
            let incoming = work.join("incoming");
            let mut count = 0;
            for p in 0..2u64 {
                let patient = FakePatient::generate(1000 + p);
                for round in 0..2u64 {
                    let mut spec = CtStudySpec::for_seed(1000 + p * 10 + round);
                    spec.slices = args.slices;
                    // Round two a year after round one at the same site.
                    let base = CtStudySpec::for_seed(1000 + p * 10);
                    spec.institution = base.institution.clone();
                    spec.institution_address = base.institution_address.clone();
                    let year: i32 = base.study_date[..4].parse().unwrap_or(2020);
                    spec.study_date = format!("{}{}", year + round as i32, &base.study_date[4..]);
                    for (i, bytes) in ct_study(&patient, &spec).into_iter().enumerate() {
                        let path = incoming
                            .join(format!("patient{}", p + 1))
                            .join(format!("round{}", round + 1))
                            .join(format!("{:04}.dcm", i + 1));
                        write_atomically(&path, &bytes)?;
                        count += 1;
                    }
                    println!(
                        "    patient {} round {}: {} slices, study date {}, headers carry name, ID, birth date, address, physicians, institution, device serial",
                        p + 1,
                        round + 1,
                        spec.slices,
                        spec.study_date
                    );
                }
            }
            println!(
                "    {count} files in {} ({:.1} s)",
                incoming.display(),
                t.elapsed().as_secs_f64()
            );
            incoming
        }
    };

    // 2. The site's key, and the policy.
    step(2, "De-identifying at acquisition (PS3.15 Annex E)");
    let key_path = work.join("site-deid.key");
    let key = if key_path.exists() {
        DeidKey::from_text(&fs::read_to_string(&key_path)?)?
    } else {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        let key = DeidKey::from_bytes(secret);
        write_atomically(&key_path, key.to_text().as_bytes())?;
        key
    };
    let options = OptionSet::new([
        DeidOption::RetainLongitudinalModifiedDates,
        DeidOption::CleanDescriptors,
    ])?;
    println!(
        "    profile: Basic, options: {}; key {} ({})",
        options
            .iter()
            .map(|o| o.name())
            .collect::<Vec<_>>()
            .join(", "),
        key.id(),
        key_path.display()
    );
    let deid = Deidentifier::new(DeidConfig::new(key, options));
    let files = collect_inputs(std::slice::from_ref(&input_dir))?;
    if files.is_empty() {
        bail!("no files under {}", input_dir.display());
    }
    let out = work.join("deidentified");
    let report = run_files(&deid, &files, &out, false);
    println!("    {}", report.summary());
    for r in &report.results {
        match &r.outcome {
            FileOutcome::Quarantined { reason, .. } => {
                println!("    quarantined {}: {reason}", r.input.display());
            }
            FileOutcome::Failed { reason, .. } => {
                println!("    failed {}: {reason}", r.input.display());
            }
            _ => {}
        }
    }

    // 3. What came out: pseudonyms link rounds, dates shift together.
    step(
        3,
        "Keyed pseudonyms keep each patient linkable across rounds",
    );
    let mut by_patient: BTreeMap<String, BTreeMap<String, (String, String)>> = BTreeMap::new();
    for r in &report.results {
        let FileOutcome::Deidentified { output, provenance } = &r.outcome else {
            continue;
        };
        let source = medledger_deid::read_instance(&fs::read(&r.input)?)
            .map(|(_, o)| o)
            .ok();
        let result = medledger_deid::open_output(&fs::read(output)?)?;
        let get = |o: &dicom_object::InMemDicomObject, t| {
            o.get(t)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let pseudonym = get(&result, dicom_dictionary_std::tags::PATIENT_ID);
        let new_date = get(&result, dicom_dictionary_std::tags::STUDY_DATE);
        let old_date = source
            .as_ref()
            .map(|o| get(o, dicom_dictionary_std::tags::STUDY_DATE))
            .unwrap_or_default();
        by_patient
            .entry(pseudonym)
            .or_default()
            .insert(provenance.study_instance_uid.clone(), (old_date, new_date));
    }
    for (pseudonym, studies) in &by_patient {
        println!("    pseudonym {pseudonym}: {} stud(ies)", studies.len());
        for (uid, (old, new)) in studies {
            println!("      study {uid}: date {old} -> {new}");
        }
    }

    step(4, "Residual-identifier scan and provenance");
    let needles: usize = report
        .results
        .iter()
        .filter_map(|r| match &r.outcome {
            FileOutcome::Deidentified { provenance, .. } => Some(provenance.residual_scan_needles),
            _ => None,
        })
        .sum();
    println!(
        "    every written instance was scanned for the identifying values of its input ({needles} searched in all): none left"
    );
    if let Some(FileOutcome::Deidentified { provenance, output }) = report
        .results
        .iter()
        .map(|r| &r.outcome)
        .find(|o| matches!(o, FileOutcome::Deidentified { .. }))
    {
        println!(
            "    provenance of {} (what the ledger records):",
            output.display()
        );
        for line in serde_json::to_string_pretty(provenance)?.lines() {
            println!("      {line}");
        }
    }
    let report_path = work.join("deid-report.json");
    write_atomically(&report_path, &serde_json::to_vec_pretty(&report)?)?;

    let store_dir = work.join("store");
    demo_store(work, &files, &out, &store_dir)?;

    step(6, "Where to look");
    println!("    identified input:      {}", input_dir.display());
    println!("    de-identified output:  {}", out.display());
    println!("    per-file report:       {}", report_path.display());
    println!("    encrypted store:       {}", store_dir.display());
    println!(
        "    list it:               medledger store ls --store {} --key-file {}",
        store_dir.display(),
        work.join("hospital-store.key").display()
    );
    println!(
        "    check it:              medledger store verify --deep --store {} --key-file {}",
        store_dir.display(),
        work.join("hospital-store.key").display()
    );
    println!("    compare a file:        dcmdump <file>   (apt-get install dcmtk)");
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    if report.failed > 0 {
        bail!("{} file(s) failed de-identification", report.failed);
    }
    Ok(())
}

fn load_or_create_store_key(path: &std::path::Path) -> Result<SecretKey> {
    if path.exists() {
        return SecretKey::from_text(&fs::read_to_string(path)?)
            .with_context(|| format!("store key {}", path.display()));
    }
    let key = SecretKey::generate();
    write_atomically(path, format!("{}\n", key.to_text()).as_bytes())?;
    Ok(key)
}

/// Step 5: originals and de-identified derivatives into the hospital's encrypted store, the
/// derivatives shared with a researcher, one retrieved and verified, the originals refused,
/// a flipped bit caught.
fn demo_store(
    work: &std::path::Path,
    originals: &[PathBuf],
    deidentified: &std::path::Path,
    store_dir: &std::path::Path,
) -> Result<()> {
    step(
        5,
        "Storing encrypted: originals and derivatives, one key per object, a Merkle root per study",
    );
    let hospital = load_or_create_store_key(&work.join("hospital-store.key"))?;
    let researcher = load_or_create_store_key(&work.join("researcher-store.key"))?;
    let store = Store::open(&store_dir.to_string_lossy())?;

    let (scanned, _) = scan_all(
        originals.iter().cloned().map(Source::File).collect(),
        &|_| {},
    );
    let (plans, _) = plan(scanned);
    let mut index: std::collections::HashMap<Digest, ObjectRef> = Default::default();
    let mut original_bytes = 0;
    let mut original_roots = Vec::new();
    for p in plans {
        let out = store.put_study(p, &hospital, &PutOptions::default(), &|_| {})?;
        original_bytes += out.bytes_written;
        println!(
            "    original   {}  {} instances, {:.1} MB sealed (hospital key only)",
            out.root,
            out.manifest.instance_count(),
            out.bytes_written as f64 / 1e6
        );
        index.extend(out.object_index());
        original_roots.push(out);
    }

    let derived_files = collect_inputs(&[deidentified.to_path_buf()])?;
    let (scanned, _) = scan_all(
        derived_files.into_iter().map(Source::File).collect(),
        &|_| {},
    );
    let (plans, _) = plan(scanned);
    let mut derived_bytes = 0;
    let mut derived_roots = Vec::new();
    for p in plans {
        // The original this derivative was made from: the one whose pixel objects it shares.
        let from = p
            .instances()
            .iter()
            .flat_map(|s| s.pixel_digests())
            .find_map(|d| {
                original_roots
                    .iter()
                    .find(|o| o.object_index().contains_key(d))
                    .map(|o| o.root)
            });
        let out = store.put_study(
            p,
            &hospital,
            &PutOptions {
                recipients: &[researcher.public()],
                derived_from: from,
                reuse: Some(&index),
            },
            &|_| {},
        )?;
        derived_bytes += out.bytes_written;
        println!(
            "    derivative {}  +{:.1} KB, {} pixel objects shared with its original (hospital + researcher)",
            out.root,
            out.bytes_written as f64 / 1e3,
            out.objects_reused
        );
        derived_roots.push(out.root);
    }
    println!(
        "    derivatives cost {:.2}% of the originals' {:.1} MB: they reference the same pixel objects",
        derived_bytes as f64 * 100.0 / original_bytes.max(1) as f64,
        original_bytes as f64 / 1e6
    );

    // The researcher retrieves one derivative, verified against its root.
    let Some(root) = derived_roots.first().copied() else {
        return Ok(());
    };
    let dest = work.join("retrieved");
    let count = std::sync::atomic::AtomicUsize::new(0);
    store.get_study(&root, &researcher, &|series, inst, bytes| {
        let path = dest
            .join(&series.series_uid)
            .join(format!("{}.dcm", inst.sop_instance_uid));
        write_atomically(&path, &bytes).map_err(|e| StoreError::Corrupt {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })?;
    println!(
        "    researcher retrieved {} files of {root} into {}; every object checked against the root",
        count.into_inner(),
        dest.display()
    );
    if let Some(o) = original_roots.first() {
        match store.open_manifest(&o.root, &researcher) {
            Err(StoreError::NotRecipient(_)) => println!(
                "    researcher asks for original {}: refused, not shared with that key",
                o.root
            ),
            other => bail!("the researcher must not open an original: {other:?}"),
        }
    }

    // A flipped bit in the store is caught, and the study is refused rather than served.
    let record = store.study_ref(&root)?;
    let victim = format!("objects/{}", record.objects[0].to_hex());
    let at = medledger_store::FsBackend::open_existing(store_dir)?
        .locate(&victim)?
        .with_context(|| format!("{victim} is not in the store"))?;
    at.flip_bit(at.len / 2)?;
    let report = store.verify(Some(&hospital), false, &|_, _| {})?;
    for p in &report.corrupt {
        println!("    tampering caught by verify: {} {}", p.key, p.reason);
    }
    match store.get_study(&root, &researcher, &|_, _, _| Ok(())) {
        Err(e) => println!("    retrieval of the tampered study refused: {e}"),
        Ok(_) => bail!("a tampered study was served"),
    }
    at.flip_bit(at.len / 2)?;
    let report = store.verify(Some(&hospital), true, &|_, _| {})?;
    if !report.is_clean() {
        bail!("the store should verify clean once the bit is restored: {report:?}");
    }
    println!(
        "    bit restored: {} objects, {} studies verify clean",
        report.objects_checked, report.studies
    );
    Ok(())
}

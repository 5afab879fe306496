//! `medledger store`: put studies into an encrypted store (filesystem or S3), get them back
//! verified, share them, list them, and verify a whole store.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use medledger_crypto::{Digest, PublicKey, SecretKey};
use medledger_deid::{DeidConfig, DeidOption, Deidentifier, OptionSet};
use medledger_store::{
    PutOptions, PutOutcome, Scanned, Skipped, Source, Store, StudyPlan, plan, scan_all, scan_memory,
};
use rayon::prelude::*;
use serde::Serialize;

use crate::files::{
    collect_inputs, looks_like_dicom, sync_filesystem, write_atomically, write_atomically_unsynced,
};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Store DICOM files, one sealed manifest per study; prints each study's manifest root.
    Put(PutArgs),
    /// Write a study's files back, byte for byte, every object verified against the root.
    Get(GetArgs),
    /// Check every object of a store against its address, and every study's objects present.
    Verify(VerifyArgs),
    /// Let another key open a study (adds one wrapped key; re-encrypts nothing).
    Share(ShareArgs),
    /// Revoke: seal a study again under new keys for the given recipients only, and delete
    /// its old objects (those another study shares stay). The root does not change.
    Rekey(RekeyArgs),
    /// Delete objects no study refers to, and temporary files of interrupted writers. Run it
    /// only while no `put` is writing to the store.
    Gc(LsArgs),
    /// List the studies in a store.
    Ls(LsArgs),
    /// Create a store key pair: FILE (secret, mode 0600) and FILE.pub.
    Keygen {
        /// Where to write the secret key; refuses to overwrite.
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct StoreLocation {
    /// A folder, or s3://bucket/prefix (endpoint and credentials from AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "MEDLEDGER_STORE", value_name = "DIR|s3://BUCKET/PREFIX")]
    pub store: String,
    /// The store secret key. Default: $MEDLEDGER_HOME/store.key (~/.medledger/store.key),
    /// created by `put` on first use.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PutArgs {
    /// DICOM files or folders (searched recursively); only read, never modified.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[command(flatten)]
    pub location: StoreLocation,
    /// Also let these public keys (text or a .pub file) open the studies (repeatable).
    #[arg(long = "recipient", value_name = "KEY|FILE")]
    pub recipients: Vec<String>,
    /// Also store a de-identified derivative of each study (PS3.15 Basic Profile and the
    /// given options), sharing the original's pixel objects.
    #[arg(long)]
    pub deidentify: bool,
    /// A de-identification option (repeatable), as for `medledger deid`.
    #[arg(long = "option", value_name = "NAME", requires = "deidentify")]
    pub options: Vec<DeidOption>,
    /// The de-identification key (default $MEDLEDGER_HOME/deid.key).
    #[arg(long, value_name = "FILE", requires = "deidentify")]
    pub deid_key_file: Option<PathBuf>,
    /// Print a JSON report on stdout instead of one line per study.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// The study's manifest root (64 hex digits).
    pub root: String,
    #[command(flatten)]
    pub location: StoreLocation,
    /// Output folder; files are written as <series UID>/<SOP instance UID>.dcm.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Only this series (checked against the root with its Merkle proof).
    #[arg(long, value_name = "UID")]
    pub series: Option<String>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub location: StoreLocation,
    /// Also decrypt every object of the studies the key opens and check it against its
    /// manifest.
    #[arg(long)]
    pub deep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ShareArgs {
    pub root: String,
    #[command(flatten)]
    pub location: StoreLocation,
    /// The recipient's public key (text or a .pub file).
    #[arg(long, value_name = "KEY|FILE")]
    pub recipient: String,
}

#[derive(Args, Debug)]
pub struct RekeyArgs {
    pub root: String,
    #[command(flatten)]
    pub location: StoreLocation,
    /// Who besides the key's holder may open the study from now on (repeatable); everyone
    /// else's envelope is dropped.
    #[arg(long = "recipient", value_name = "KEY|FILE")]
    pub recipients: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub location: StoreLocation,
}

pub fn run(cmd: StoreCommand) -> Result<ExitCode> {
    match cmd {
        StoreCommand::Put(a) => put(a),
        StoreCommand::Get(a) => get(a).map(|()| ExitCode::SUCCESS),
        StoreCommand::Verify(a) => verify(a),
        StoreCommand::Share(a) => share(a).map(|()| ExitCode::SUCCESS),
        StoreCommand::Rekey(a) => rekey(a).map(|()| ExitCode::SUCCESS),
        StoreCommand::Gc(a) => gc(a).map(|()| ExitCode::SUCCESS),
        StoreCommand::Ls(a) => ls(a).map(|()| ExitCode::SUCCESS),
        StoreCommand::Keygen { file } => {
            let key = generate_key(&file)?;
            println!("{}", key.public().to_text());
            eprintln!(
                "created store key {} at {} (public key in {}.pub)",
                key.public().fingerprint(),
                file.display(),
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn generate_key(file: &Path) -> Result<SecretKey> {
    if file.exists() {
        bail!(
            "{} already exists: a key is never overwritten (what it opens would be lost)",
            file.display()
        );
    }
    let key = SecretKey::generate();
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::files::write_secret(file, format!("{}\n", key.to_text()).as_bytes())?;
    let mut pub_path = file.as_os_str().to_owned();
    pub_path.push(".pub");
    write_atomically(
        Path::new(&pub_path),
        format!("{}\n", key.public().to_text()).as_bytes(),
    )?;
    Ok(key)
}

fn load_key(file: &Path) -> Result<SecretKey> {
    let text = fs::read_to_string(file).with_context(|| {
        format!(
            "cannot read store key {} (create one with `medledger store keygen {}`)",
            file.display(),
            file.display()
        )
    })?;
    SecretKey::from_text(&text).with_context(|| format!("store key {}", file.display()))
}

fn key_for(location: &StoreLocation, create: bool) -> Result<SecretKey> {
    match &location.key_file {
        Some(f) => load_key(f),
        None => {
            let f = crate::medledger_home().join("store.key");
            if f.exists() || !create {
                load_key(&f)
            } else {
                let key = generate_key(&f)?;
                eprintln!(
                    "created a new store key {} at {}",
                    key.public().fingerprint(),
                    f.display()
                );
                Ok(key)
            }
        }
    }
}

fn parse_public(text_or_file: &str) -> Result<PublicKey> {
    let text = if Path::new(text_or_file).is_file() {
        fs::read_to_string(text_or_file).with_context(|| format!("cannot read {text_or_file}"))?
    } else {
        text_or_file.to_string()
    };
    PublicKey::from_text(&text).with_context(|| format!("recipient {text_or_file}"))
}

fn parse_root(text: &str) -> Result<Digest> {
    Digest::from_hex(text)
        .with_context(|| format!("{text:?} is not a manifest root (64 hex digits)"))
}

/// The store, created if missing (for `put`).
fn open_store(location: &StoreLocation) -> Result<Store> {
    Store::open(&location.store).with_context(|| format!("cannot open store {}", location.store))
}

/// An existing store (for every command but `put`).
fn existing_store(location: &StoreLocation) -> Result<Store> {
    Store::open_existing(&location.store)
        .with_context(|| format!("cannot open store {}", location.store))
}

fn bar(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{binary_bytes}}/{{binary_total_bytes}} {{binary_bytes_per_sec}} eta {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

#[derive(Serialize)]
struct StudyLine {
    root: Digest,
    study_uid: String,
    instances: usize,
    file_bytes: u64,
    already_present: bool,
    objects_written: u64,
    bytes_written: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    derived_from: Option<Digest>,
    objects_shared: u64,
}

#[derive(Serialize)]
struct PutReport {
    store: String,
    studies: Vec<StudyLine>,
    skipped: Vec<SkippedLine>,
    seconds: f64,
}

#[derive(Serialize)]
struct SkippedLine {
    file: String,
    reason: String,
}

fn put(args: PutArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let owner = key_for(&args.location, true)?;
    let recipients: Vec<PublicKey> = args
        .recipients
        .iter()
        .map(|r| parse_public(r))
        .collect::<Result<_>>()?;
    let deid = if args.deidentify {
        let key = crate::deid_cmd::key_or_default(args.deid_key_file.as_deref())?;
        let options =
            OptionSet::new(args.options.iter().copied()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Some(Deidentifier::new(DeidConfig::new(key, options)))
    } else {
        None
    };
    let store = open_store(&args.location)?;

    let mut skipped: Vec<SkippedLine> = Vec::new();
    let files: Vec<PathBuf> = collect_inputs(&args.inputs)?
        .into_iter()
        .filter(|p| {
            let mut head = [0u8; 132];
            let n = fs::File::open(p)
                .and_then(|mut f| f.read(&mut head))
                .unwrap_or(0);
            looks_like_dicom(p, &head[..n])
        })
        .collect();
    if files.is_empty() {
        bail!("no DICOM files under the inputs");
    }
    let total: u64 = files
        .iter()
        .filter_map(|f| fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let sources: Vec<Source> = files.into_iter().map(Source::File).collect();
    let mut lines = Vec::new();
    let put_opts = PutOptions {
        recipients: &recipients,
        ..PutOptions::default()
    };
    let pb;
    match &deid {
        None => {
            // Each line is printed once its study is durable.
            pb = bar(
                total * Store::put_passes(&sources, &put_opts),
                args.quiet,
                "put ",
            );
            let done = |uid: &str, r: &Result<PutOutcome, medledger_store::StoreError>| {
                if let (Ok(out), false) = (r, args.json) {
                    pb.suspend(|| print_line("stored ", &study_line(out, uid, 0)));
                }
            };
            let (results, refused) =
                store.put_files(sources, &owner, &put_opts, &|n| pb.inc(n), &done);
            skipped.extend(refused.into_iter().map(skipped_line));
            for (uid, r) in results {
                let out = r.with_context(|| format!("storing study {uid}"))?;
                lines.push(study_line(&out, &uid, 0));
            }
        }
        Some(deid) => {
            let scan_bar = bar(total, args.quiet, "scan");
            let (scanned, refused) = scan_all(sources, &|n| scan_bar.inc(n));
            scan_bar.finish_and_clear();
            skipped.extend(refused.into_iter().map(skipped_line));
            let (plans, dups) = plan(scanned);
            skipped.extend(dups.into_iter().map(skipped_line));
            pb = bar(
                plans.iter().map(StudyPlan::file_bytes).sum(),
                args.quiet,
                "put ",
            );
            for p in plans {
                let study_uid = p.study_uid.clone();
                let sources: Vec<Scanned> = p.instances().to_vec();
                let out = store
                    .put_study(p, &owner, &put_opts, &|n| pb.inc(n))
                    .with_context(|| format!("storing study {study_uid}"))?;
                let line = study_line(&out, &study_uid, 0);
                if !args.json {
                    pb.suspend(|| print_line("stored ", &line));
                }
                lines.push(line);
                let (derived, quarantined) =
                    put_derivative(&store, deid, &owner, &recipients, &out, sources)?;
                skipped.extend(quarantined);
                if let Some(d) = derived {
                    if !args.json {
                        pb.suspend(|| print_line("derived", &d));
                    }
                    lines.push(d);
                }
            }
        }
    }
    pb.finish_and_clear();
    for s in &skipped {
        eprintln!("not stored: {}: {}", s.file, s.reason);
    }
    let report = PutReport {
        store: store.backend().describe(),
        studies: lines,
        skipped,
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let bytes: u64 = report
            .studies
            .iter()
            .filter(|l| l.derived_from.is_none())
            .map(|l| l.file_bytes)
            .sum();
        eprintln!(
            "{} studies ({:.1} MB) in {:.2} s into {}{}",
            report
                .studies
                .iter()
                .filter(|l| l.derived_from.is_none())
                .count(),
            bytes as f64 / 1e6,
            report.seconds,
            report.store,
            if report.skipped.is_empty() {
                String::new()
            } else {
                format!("; {} files not stored", report.skipped.len())
            }
        );
    }
    Ok(if report.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn skipped_line(s: Skipped) -> SkippedLine {
    SkippedLine {
        file: s.source,
        reason: s.reason,
    }
}

fn study_line(out: &PutOutcome, study_uid: &str, shared: u64) -> StudyLine {
    StudyLine {
        root: out.root,
        study_uid: study_uid.to_string(),
        instances: out.manifest.instance_count(),
        file_bytes: out.manifest.plain_len(),
        already_present: out.already_present,
        objects_written: out.objects_written,
        bytes_written: out.bytes_written,
        derived_from: out.manifest.derived_from,
        objects_shared: shared,
    }
}

fn print_line(label: &str, l: &StudyLine) {
    let what = match l.derived_from {
        Some(from) => format!(
            "from {from}  {} instances  +{:.1} KB, {} pixel objects shared",
            l.instances,
            l.bytes_written as f64 / 1e3,
            l.objects_shared
        ),
        None => format!(
            "study {}  {} instances  {:.1} MB{}",
            l.study_uid,
            l.instances,
            l.file_bytes as f64 / 1e6,
            if l.already_present {
                "  (already stored)"
            } else {
                ""
            }
        ),
    };
    println!("{label} {}  {what}", l.root);
}

/// De-identifies the instances of a stored study and stores the derivative, referencing the
/// original's pixel objects wherever the pixels were not changed.
fn put_derivative(
    store: &Store,
    deid: &Deidentifier,
    owner: &SecretKey,
    recipients: &[PublicKey],
    original: &PutOutcome,
    sources: Vec<Scanned>,
) -> Result<(Option<StudyLine>, Vec<SkippedLine>)> {
    let results: Vec<Result<Scanned, SkippedLine>> = sources
        .into_par_iter()
        .map(|s| {
            let name = s.source.name();
            let bytes = match &s.source {
                Source::File(p) => fs::read(p).map_err(|e| SkippedLine {
                    file: name.clone(),
                    reason: e.to_string(),
                })?,
                Source::Memory { bytes, .. } => bytes.to_vec(),
            };
            let d = deid.deidentify(&bytes).map_err(|e| SkippedLine {
                file: name.clone(),
                reason: format!("no de-identified derivative: {e}"),
            })?;
            scan_memory(format!("derivative of {name}"), Bytes::from(d.bytes)).map_err(|e| {
                SkippedLine {
                    file: name,
                    reason: e.to_string(),
                }
            })
        })
        .collect();
    let mut scanned = Vec::new();
    let mut skipped = Vec::new();
    for r in results {
        match r {
            Ok(s) => scanned.push(s),
            Err(s) => skipped.push(s),
        }
    }
    if scanned.is_empty() {
        return Ok((None, skipped));
    }
    let (plans, dups) = plan(scanned);
    skipped.extend(dups.into_iter().map(skipped_line));
    let index: HashMap<Digest, medledger_store::ObjectRef> = original.object_index();
    let mut line = None;
    for p in plans {
        let uid = p.study_uid.clone();
        let out = store.put_study(
            p,
            owner,
            &PutOptions {
                recipients,
                derived_from: Some(original.root),
                reuse: Some(&index),
            },
            &|_| {},
        )?;
        line = Some(study_line(&out, &uid, out.objects_reused));
    }
    Ok((line, skipped))
}

fn get(args: GetArgs) -> Result<()> {
    let started = Instant::now();
    let root = parse_root(&args.root)?;
    let key = key_for(&args.location, false)?;
    let store = existing_store(&args.location)?;
    let (_, manifest) = store.open_manifest(&root, &key)?;
    let series: Vec<usize> = match &args.series {
        None => (0..manifest.series.len()).collect(),
        Some(uid) => {
            let i = manifest
                .series
                .iter()
                .position(|s| &s.series_uid == uid)
                .with_context(|| format!("study {root} has no series {uid}"))?;
            let proof = manifest.series_proof(i);
            if !proof.verify(&root, &manifest.series[i]) {
                bail!("series {uid} does not verify against root {root}");
            }
            vec![i]
        }
    };
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let total: u64 = series
        .iter()
        .flat_map(|i| manifest.series[*i].instances.iter())
        .map(|i| i.plain_len())
        .sum();
    let pb = bar(total, false, "get ");
    let m = &manifest;
    let items: Vec<_> = series
        .iter()
        .flat_map(|i| {
            let s = &m.series[*i];
            s.instances.iter().map(move |inst| (s, inst))
        })
        .collect();
    let written: Vec<u64> = items
        .par_iter()
        .map(|(s, inst)| -> Result<u64> {
            let bytes = store.fetch_instance(inst)?;
            let path = args
                .out
                .join(safe_name(&s.series_uid))
                .join(format!("{}.dcm", safe_name(&inst.sop_instance_uid)));
            write_atomically_unsynced(&path, &bytes)?;
            pb.inc(inst.plain_len());
            Ok(bytes.len() as u64)
        })
        .collect::<Result<_>>()?;
    sync_filesystem(&args.out)?;
    pb.finish_and_clear();
    let bytes: u64 = written.iter().sum();
    println!(
        "wrote {} files ({:.1} MB) to {} in {:.2} s; every object verified against root {root}",
        written.len(),
        bytes as f64 / 1e6,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A UID as a file name: UIDs are digits and dots, anything else is replaced.
fn safe_name(uid: &str) -> String {
    let s: String = uid
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let key = match &args.location.key_file {
        Some(_) => Some(key_for(&args.location, false)?),
        None => key_for(&args.location, false).ok(),
    };
    let store = existing_store(&args.location)?;
    let pb = bar(0, args.json, "verify");
    let report = store.verify(key.as_ref(), args.deep, &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    // Temporary files of interrupted writers exist only in folder stores.
    let stale = if args.location.store.starts_with("s3://") {
        0
    } else {
        medledger_store::FsBackend::open_existing(&args.location.store)
            .and_then(|fs| fs.stale_tmp_files())
            .map(|v| v.len())
            .unwrap_or(0)
    };
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["stale_tmp_files"] = stale.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} objects ({:.1} MB) and {} studies checked in {:.2} s; {} studies opened with key {}{}",
            report.objects_checked,
            report.bytes_checked as f64 / 1e6,
            report.studies,
            started.elapsed().as_secs_f64(),
            report.studies_opened,
            key.as_ref()
                .map(|k| k.public().fingerprint())
                .unwrap_or_else(|| "(none)".into()),
            if args.deep { " and decrypted" } else { "" }
        );
        for p in &report.corrupt {
            println!("CORRUPT {}  {}", p.key, p.reason);
        }
        for p in &report.missing {
            println!(
                "MISSING {}  {}{}",
                p.key,
                p.reason,
                p.study.map(|s| format!(" (study {s})")).unwrap_or_default()
            );
        }
        if !report.unreferenced.is_empty() {
            println!(
                "{} unreferenced objects (left by an interrupted put; harmless)",
                report.unreferenced.len()
            );
        }
        if stale > 0 {
            println!("{stale} temporary files left by an interrupted writer (harmless)");
        }
        println!(
            "{}",
            if report.is_clean() {
                "store is clean"
            } else {
                "store has problems"
            }
        );
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn share(args: ShareArgs) -> Result<()> {
    let root = parse_root(&args.root)?;
    let key = key_for(&args.location, false)?;
    let recipient = parse_public(&args.recipient)?;
    let store = existing_store(&args.location)?;
    if store.share(&root, &key, &recipient)? {
        println!(
            "study {root} can now be opened by key {}",
            recipient.fingerprint()
        );
    } else {
        println!(
            "key {} could already open study {root}",
            recipient.fingerprint()
        );
    }
    Ok(())
}

fn rekey(args: RekeyArgs) -> Result<()> {
    let root = parse_root(&args.root)?;
    let key = key_for(&args.location, false)?;
    let recipients: Vec<PublicKey> = args
        .recipients
        .iter()
        .map(|r| parse_public(r))
        .collect::<Result<_>>()?;
    let store = existing_store(&args.location)?;
    let out = store.rekey(&root, &key, &recipients)?;
    println!(
        "study {root} sealed again under new keys ({} objects) for {} recipient(s); {} old \
         objects deleted, {} kept because another study uses them",
        out.objects_resealed,
        recipients.len() + 1,
        out.objects_deleted,
        out.objects_kept_shared
    );
    Ok(())
}

fn gc(args: LsArgs) -> Result<()> {
    let store = existing_store(&args.location)?;
    let out = store.gc()?;
    let tmp = if args.location.store.starts_with("s3://") {
        0
    } else {
        medledger_store::FsBackend::open_existing(&args.location.store)?.clean_tmp()?
    };
    println!(
        "deleted {} unreferenced objects ({:.1} MB) and {tmp} temporary files",
        out.objects_deleted,
        out.bytes_freed as f64 / 1e6
    );
    Ok(())
}

fn ls(args: LsArgs) -> Result<()> {
    let key = key_for(&args.location, false).ok();
    let store = existing_store(&args.location)?;
    for root in store.studies()? {
        match key.as_ref().map(|k| store.open_manifest(&root, k)) {
            Some(Ok((_, m))) => println!(
                "{root}  {}  {} series  {} instances  {:.1} MB{}",
                m.study_uid,
                m.series.len(),
                m.instance_count(),
                m.plain_len() as f64 / 1e6,
                m.derived_from
                    .map(|d| format!("  derived from {d}"))
                    .unwrap_or_default()
            ),
            _ => println!("{root}  (not shared with this key)"),
        }
    }
    Ok(())
}

//! `medledger deid` and `medledger key`: de-identify files and folders in parallel into an
//! output folder laid out by pseudonymous UIDs, with a JSON report.

use std::fs;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use medledger_deid::{
    DeidConfig, DeidError, DeidKey, DeidOption, DeidProvenance, Deidentifier, Finding, OptionSet,
    PixelRules, ProfileTable, Quarantine, SafePrivateList,
};
use rayon::prelude::*;
use serde::Serialize;

use crate::files::{
    collect_inputs, looks_like_dicom, sync_filesystem, write_atomically, write_atomically_unsynced,
};

#[derive(Args, Debug)]
pub struct DeidArgs {
    /// DICOM files or folders (searched recursively). Inputs are only read, never modified.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output folder; files are written as <pseudonym>/<study UID>/<series UID>/<SOP UID>.dcm.
    #[arg(long, short)]
    pub out: PathBuf,
    /// A PS3.15 option, by the standard's name in kebab case (repeatable), e.g.
    /// retain-longitudinal-modified-dates, clean-descriptors, retain-safe-private.
    #[arg(long = "option", value_name = "NAME")]
    pub options: Vec<DeidOption>,
    /// The secret key for pseudonyms, UIDs and date shifts. Default:
    /// $MEDLEDGER_HOME/deid.key (~/.medledger/deid.key), created on first use.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Write a JSON report of every file (status, reason, provenance) here.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long, short)]
    pub jobs: Option<usize>,
    /// A Table E.1-1 of another edition, in the JSON shape of crates/deid/data.
    #[arg(long, value_name = "FILE", requires = "table_edition")]
    pub table: Option<PathBuf>,
    /// The edition of --table (e.g. 2025c), recorded in provenance.
    #[arg(long, value_name = "EDITION")]
    pub table_edition: Option<String>,
    /// Extra pixel-cleaning rules (JSON, shape of crates/deid/data/pixel-rules.json),
    /// consulted before the built-in ones.
    #[arg(long, value_name = "FILE")]
    pub pixel_rules: Option<PathBuf>,
    /// Extra safe private attributes (JSON, shape of crates/deid/data/safe-private.json).
    #[arg(long, value_name = "FILE")]
    pub safe_private: Option<PathBuf>,
    /// Do not show a progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create a new random de-identification key file (mode 0600).
    Generate {
        /// Where to write the key; refuses to overwrite an existing file.
        file: PathBuf,
    },
    /// Print the public id of a key (recorded in provenance), not the key.
    Id { file: PathBuf },
}

pub fn run_key(cmd: KeyCommand) -> Result<()> {
    match cmd {
        KeyCommand::Generate { file } => {
            let key = generate_key_file(&file)?;
            println!(
                "created de-identification key {} at {}",
                key.id(),
                file.display()
            );
            println!("keep it secret and backed up: the same key gives the same pseudonyms");
        }
        KeyCommand::Id { file } => println!("{}", load_key(&file)?.id()),
    }
    Ok(())
}

fn generate_key_file(file: &Path) -> Result<DeidKey> {
    if file.exists() {
        bail!(
            "{} already exists: a key is never overwritten (its pseudonyms would be lost)",
            file.display()
        );
    }
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    let key = DeidKey::from_bytes(secret);
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::files::write_secret(file, key.to_text().as_bytes())?;
    Ok(key)
}

fn load_key(file: &Path) -> Result<DeidKey> {
    let text = fs::read_to_string(file).with_context(|| {
        format!(
            "cannot read key file {} (create one with `medledger key generate {}`)",
            file.display(),
            file.display()
        )
    })?;
    DeidKey::from_text(&text).with_context(|| format!("key file {}", file.display()))
}

/// The key given, or the default one, created (with a notice) when it does not exist yet.
pub fn key_or_default(key_file: Option<&Path>) -> Result<DeidKey> {
    match key_file {
        Some(f) => load_key(f),
        None => {
            let f = crate::medledger_home().join("deid.key");
            if f.exists() {
                load_key(&f)
            } else {
                let key = generate_key_file(&f)?;
                eprintln!(
                    "created a new de-identification key {} at {} (keep it: the same key gives the same pseudonyms)",
                    key.id(),
                    f.display()
                );
                Ok(key)
            }
        }
    }
}

/// Builds the de-identifier from the command's options and files.
pub fn build_deidentifier(args: &DeidArgs) -> Result<Deidentifier> {
    let options = OptionSet::new(args.options.iter().copied())?;
    let key = key_or_default(args.key_file.as_deref())?;
    let mut config = DeidConfig::new(key, options);
    if let Some(t) = &args.table {
        let text =
            fs::read_to_string(t).with_context(|| format!("cannot read table {}", t.display()))?;
        let edition = args.table_edition.as_deref().unwrap_or("unknown");
        config.table = ProfileTable::from_json(&text, edition)
            .with_context(|| format!("table {}", t.display()))?;
    }
    if let Some(p) = &args.pixel_rules {
        let text = fs::read_to_string(p)
            .with_context(|| format!("cannot read pixel rules {}", p.display()))?;
        let rules =
            PixelRules::from_json(&text).with_context(|| format!("pixel rules {}", p.display()))?;
        config.pixel_rules.extend_front(rules);
    }
    if let Some(p) = &args.safe_private {
        let text = fs::read_to_string(p)
            .with_context(|| format!("cannot read safe-private list {}", p.display()))?;
        let list = SafePrivateList::from_json(&text)
            .with_context(|| format!("safe-private list {}", p.display()))?;
        config.safe_private.extend(list);
    }
    Ok(Deidentifier::new(config))
}

/// What happened to one input file.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case", tag = "status")]
pub enum FileOutcome {
    Deidentified {
        output: PathBuf,
        provenance: Box<DeidProvenance>,
    },
    Quarantined {
        reason: String,
        detail: Quarantine,
    },
    Failed {
        reason: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        findings: Vec<Finding>,
    },
    /// Not a DICOM file at all (a README beside the images, say).
    Skipped {
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub input: PathBuf,
    pub bytes: u64,
    #[serde(flatten)]
    pub outcome: FileOutcome,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub tool: &'static str,
    pub options: Vec<DeidOption>,
    pub key_id: String,
    pub table_edition: String,
    pub files: usize,
    pub deidentified: usize,
    pub quarantined: usize,
    pub failed: usize,
    pub skipped: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub results: Vec<FileReport>,
}

impl RunReport {
    pub fn summary(&self) -> String {
        let mb = self.bytes_in as f64 / 1e6;
        format!(
            "de-identified {} of {} files ({} quarantined, {} failed, {} skipped as not DICOM); {:.1} MB in {:.2} s ({:.0} MB/s)",
            self.deidentified,
            self.files,
            self.quarantined,
            self.failed,
            self.skipped,
            mb,
            self.seconds,
            mb / self.seconds.max(1e-9)
        )
    }
}

/// De-identifies one file into `out`. Never panics outward: a panic inside the library is
/// caught and reported as that file's failure so the rest of the run proceeds.
pub fn process_file(deid: &Deidentifier, input: &Path, out: &Path) -> FileReport {
    let bytes = match fs::read(input) {
        Ok(b) => b,
        Err(e) => {
            return FileReport {
                input: input.to_path_buf(),
                bytes: 0,
                outcome: FileOutcome::Failed {
                    reason: format!("cannot read: {e}"),
                    findings: Vec::new(),
                },
            };
        }
    };
    let size = bytes.len() as u64;
    let report = |outcome| FileReport {
        input: input.to_path_buf(),
        bytes: size,
        outcome,
    };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| deid.deidentify(&bytes)));
    let outcome = match result {
        Err(_) => FileOutcome::Failed {
            reason: "internal error while de-identifying (a bug: please report it with the file's reader error)".into(),
            findings: Vec::new(),
        },
        Ok(Ok(d)) => {
            let p = &d.provenance;
            let path = out
                .join(&d.pseudonym)
                .join(&p.study_instance_uid)
                .join(&p.series_instance_uid)
                .join(format!("{}.dcm", p.sop_instance_uid));
            match write_atomically_unsynced(&path, &d.bytes) {
                Ok(()) => FileOutcome::Deidentified {
                    output: path,
                    provenance: Box::new(d.provenance),
                },
                Err(e) => FileOutcome::Failed {
                    reason: format!("{e:#}"),
                    findings: Vec::new(),
                },
            }
        }
        Ok(Err(DeidError::Quarantined(q))) => FileOutcome::Quarantined {
            reason: q.to_string(),
            detail: q,
        },
        Ok(Err(DeidError::Parse(_))) if !looks_like_dicom(input, &bytes[..bytes.len().min(132)]) => {
            FileOutcome::Skipped {
                reason: "not a DICOM file".into(),
            }
        }
        Ok(Err(DeidError::NotAnInstance(why))) if why.contains("DICOMDIR") => {
            FileOutcome::Skipped { reason: why }
        }
        Ok(Err(e)) => {
            let findings = match &e {
                DeidError::ResidualIdentifiers(f) => f.clone(),
                _ => Vec::new(),
            };
            FileOutcome::Failed {
                reason: e.to_string(),
                findings,
            }
        }
    };
    report(outcome)
}

/// De-identifies every file, in parallel, with an optional progress bar.
pub fn run_files(deid: &Deidentifier, files: &[PathBuf], out: &Path, progress: bool) -> RunReport {
    let started = Instant::now();
    let bar = if progress {
        let bar = ProgressBar::new(files.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} de-identifying [{bar:30}] {pos}/{len} files, {per_sec}, eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let results: Vec<FileReport> = files
        .par_iter()
        .map(|f| {
            let r = process_file(deid, f, out);
            bar.inc(1);
            r
        })
        .collect();
    bar.finish_and_clear();
    // One flush for the whole batch: nothing is reported written before it is on disk.
    let mut results = results;
    if let Err(e) = sync_filesystem(out) {
        for r in &mut results {
            if matches!(r.outcome, FileOutcome::Deidentified { .. }) {
                r.outcome = FileOutcome::Failed {
                    reason: format!("{e:#}"),
                    findings: Vec::new(),
                };
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let count =
        |pred: fn(&FileOutcome) -> bool| results.iter().filter(|r| pred(&r.outcome)).count();
    let bytes_out = results
        .iter()
        .filter_map(|r| match &r.outcome {
            FileOutcome::Deidentified { output, .. } => fs::metadata(output).ok().map(|m| m.len()),
            _ => None,
        })
        .sum();
    let cfg = deid.config();
    RunReport {
        tool: medledger_deid::TOOL,
        options: cfg.options.iter().collect(),
        key_id: cfg.key.id().to_string(),
        table_edition: cfg.table.edition().to_string(),
        files: results.len(),
        deidentified: count(|o| matches!(o, FileOutcome::Deidentified { .. })),
        quarantined: count(|o| matches!(o, FileOutcome::Quarantined { .. })),
        failed: count(|o| matches!(o, FileOutcome::Failed { .. })),
        skipped: count(|o| matches!(o, FileOutcome::Skipped { .. })),
        bytes_in: results
            .iter()
            .filter(|r| !matches!(r.outcome, FileOutcome::Skipped { .. }))
            .map(|r| r.bytes)
            .sum(),
        bytes_out,
        seconds,
        results,
    }
}

pub fn run(args: DeidArgs) -> Result<ExitCode> {
    let deid = build_deidentifier(&args)?;
    let files = collect_inputs(&args.inputs)?;
    if files.is_empty() {
        bail!("no files found in the inputs");
    }
    for input in &args.inputs {
        if let (Ok(i), Ok(o)) = (input.canonicalize(), args.out.canonicalize()) {
            if o.starts_with(&i) {
                bail!(
                    "the output folder {} is inside the input {}: choose an output outside the inputs",
                    args.out.display(),
                    input.display()
                );
            }
        }
    }
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.jobs.unwrap_or(0))
        .build()
        .context("cannot start worker threads")?;
    let show_progress = !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let report = pool.install(|| run_files(&deid, &files, &args.out, show_progress));

    for r in &report.results {
        match &r.outcome {
            FileOutcome::Quarantined { reason, .. } => {
                eprintln!("quarantined {}: {reason}", r.input.display());
            }
            FileOutcome::Failed { reason, .. } => {
                eprintln!("failed      {}: {reason}", r.input.display());
            }
            _ => {}
        }
    }
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report).context("cannot encode the report")?;
        write_atomically(path, &json)?;
        eprintln!("report written to {}", path.display());
    }
    println!("{}", report.summary());
    println!("output: {}", args.out.display());
    Ok(if report.failed > 0 {
        ExitCode::from(1)
    } else if report.quarantined > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

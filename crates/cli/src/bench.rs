//! `medledger bench`: throughput measurements printed as figures a person can compare with
//! the peers measured beside them (see scripts/bench-deid).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rayon::prelude::*;
use serde::Serialize;

use crate::deid_cmd::{self, DeidArgs};
use crate::files::collect_inputs;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// De-identification throughput (instances/s, MB/s) with the residual scan on.
    Deid(BenchDeidArgs),
    /// Store put and get throughput beside the disk's raw durable write speed (dd), and the
    /// cost of a de-identified derivative.
    Store(crate::bench_store::BenchStoreArgs),
    /// Ledger throughput and latency: four nodes as processes, concurrent clients.
    Ledger(crate::bench_ledger::BenchLedgerArgs),
    /// A node against Orthanc in the same run: C-STORE and STOW-RS ingest, QIDO-RS latency,
    /// WADO-RS retrieval (needs dcmtk and Orthanc: scripts/install-interop).
    Node(crate::bench_node::BenchNodeArgs),
    /// Cross-site retrieval between two hospitals' nodes: request to viewable, and MB/s
    /// beside a plain copy of the same bytes over loopback.
    Share(crate::bench_share::BenchShareArgs),
}

#[derive(Args, Debug)]
pub struct BenchDeidArgs {
    /// Inputs to measure (files or folders). Default: the 64-slice chest CT series and the
    /// whole test data set under $MEDLEDGER_TEST_DATA (../shared/data/dicom).
    pub inputs: Vec<PathBuf>,
    /// How many times to run each measurement; the best run is reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Worker threads (default: one per core).
    #[arg(long, short)]
    pub jobs: Option<usize>,
    /// PS3.15 options to apply, as for `medledger deid`.
    #[arg(long = "option", value_name = "NAME")]
    pub options: Vec<medledger_deid::DeidOption>,
    /// Print the results as JSON (for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Measurement {
    name: String,
    files: usize,
    deidentified: usize,
    megabytes: f64,
    /// In memory: parse, de-identify, scan, encode (files read beforehand).
    memory_instances_per_s: f64,
    memory_mb_per_s: f64,
    /// Files to files, as `medledger deid` does it (read, de-identify, fsync'd writes).
    files_instances_per_s: f64,
    files_mb_per_s: f64,
    threads: usize,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Deid(args) => bench_deid(args),
        BenchCommand::Store(args) => crate::bench_store::run(args),
        BenchCommand::Ledger(args) => crate::bench_ledger::run(args),
        BenchCommand::Node(args) => crate::bench_node::run(args),
        BenchCommand::Share(args) => crate::bench_share::run(args),
    }
}

pub fn default_sets() -> Result<Vec<(String, PathBuf)>> {
    let data = std::env::var_os("MEDLEDGER_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/data/dicom"));
    if !data.join("MANIFEST.tsv").is_file() {
        bail!(
            "no test data at {}: set MEDLEDGER_TEST_DATA or give inputs",
            data.display()
        );
    }
    Ok(vec![
        (
            "chest CT series (64 slices)".to_string(),
            data.join("series_lung-pet-ct-dx/Lung_Dx-A0001/chest_5mm"),
        ),
        ("whole test data set".to_string(), data),
    ])
}

fn bench_deid(args: BenchDeidArgs) -> Result<()> {
    let sets = if args.inputs.is_empty() {
        default_sets()?
    } else {
        args.inputs
            .iter()
            .map(|p| (p.display().to_string(), p.clone()))
            .collect()
    };
    let threads = args.jobs.unwrap_or_else(rayon::current_num_threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start worker threads")?;
    let tmp = std::env::temp_dir().join(format!("medledger-bench-deid-{}", std::process::id()));
    let deid_args = DeidArgs {
        inputs: vec![],
        out: tmp.clone(),
        options: args.options.clone(),
        key_file: None,
        report: None,
        jobs: None,
        table: None,
        table_edition: None,
        pixel_rules: None,
        safe_private: None,
        quiet: true,
    };
    // A fixed key: benchmarks must not create or depend on the user's key.
    let deid = deid_cmd::build_deidentifier(&DeidArgs {
        key_file: Some(write_bench_key(&tmp)?),
        ..deid_args
    })?;

    let mut results = Vec::new();
    for (name, path) in sets {
        let files = collect_inputs(std::slice::from_ref(&path))?;
        let blobs: Vec<Vec<u8>> = files
            .iter()
            .filter(|f| f.file_name().is_some_and(|n| n != "MANIFEST.tsv"))
            .map(std::fs::read)
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("cannot read {}", path.display()))?;
        let megabytes = blobs.iter().map(|b| b.len()).sum::<usize>() as f64 / 1e6;
        let mut best_mem = f64::MAX;
        let mut ok = 0;
        for _ in 0..args.repeat.max(1) {
            let t = Instant::now();
            ok = pool.install(|| {
                blobs
                    .par_iter()
                    .filter(|b| deid.deidentify(b).is_ok())
                    .count()
            });
            best_mem = best_mem.min(t.elapsed().as_secs_f64());
        }
        let mut best_files = f64::MAX;
        for _ in 0..args.repeat.max(1) {
            let out = tmp.join("out");
            let _ = std::fs::remove_dir_all(&out);
            let report = pool.install(|| deid_cmd::run_files(&deid, &files, &out, false));
            best_files = best_files.min(report.seconds);
        }
        let n = blobs.len();
        results.push(Measurement {
            name,
            files: n,
            deidentified: ok,
            megabytes,
            memory_instances_per_s: n as f64 / best_mem,
            memory_mb_per_s: megabytes / best_mem,
            files_instances_per_s: n as f64 / best_files,
            files_mb_per_s: megabytes / best_files,
            threads,
        });
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!(
            "{:<32} {:>6} {:>8} {:>12} {:>10} {:>12} {:>10}",
            "set", "files", "MB", "mem inst/s", "mem MB/s", "file inst/s", "file MB/s"
        );
        for m in &results {
            println!(
                "{:<32} {:>6} {:>8.1} {:>12.0} {:>10.0} {:>12.0} {:>10.0}",
                m.name,
                m.files,
                m.megabytes,
                m.memory_instances_per_s,
                m.memory_mb_per_s,
                m.files_instances_per_s,
                m.files_mb_per_s
            );
        }
        println!(
            "({threads} threads, best of {} runs, residual scan on)",
            args.repeat.max(1)
        );
    }
    Ok(())
}

fn write_bench_key(dir: &std::path::Path) -> Result<PathBuf> {
    let path = dir.join("bench.key");
    std::fs::create_dir_all(dir)?;
    let key = medledger_deid::DeidKey::from_bytes([0x42; 32]);
    std::fs::write(&path, key.to_text())?;
    Ok(path)
}

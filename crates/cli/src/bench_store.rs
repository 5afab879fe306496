//! `medledger bench store`: put and get of real studies in MB/s, beside the raw durable write
//! speed of the same disk measured in the same run with dd, and the extra bytes of a
//! de-identified derivative.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use medledger_crypto::SecretKey;
use medledger_store::{FsBackend, PutOptions, PutOutcome, Source, Store, plan, scan_memory};
use rayon::prelude::*;
use serde::Serialize;

use crate::files::collect_inputs;

#[derive(Args, Debug)]
pub struct BenchStoreArgs {
    /// Inputs to measure (files or folders). Default: the 64-slice chest CT series and the
    /// whole test data set.
    pub inputs: Vec<PathBuf>,
    /// Folder on the disk to measure, where stores are made and removed (default: current
    /// folder).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Runs per measurement; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct SetResult {
    name: String,
    files: usize,
    studies: usize,
    megabytes: f64,
    /// One put of the set, and dd writing the same volume.
    put_mb_per_s: f64,
    dd_same_volume_mb_per_s: f64,
    put_vs_dd_same_volume: f64,
    /// Puts of the set into fresh stores until at least 1 GiB is written, against dd of 1 GiB:
    /// the disk's sustained speed, past any write cache in front of it.
    sustained_put_mb_per_s: f64,
    sustained_put_vs_dd: f64,
    get_mb_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    derivative_extra_percent: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    /// dd of 1 GiB with fdatasync.
    disk_mb_per_s: f64,
    sets: Vec<SetResult>,
    threads: usize,
}

/// Raw durable write speed: `mib` MiB with dd, 1 MiB blocks, fdatasync before dd exits.
fn dd_speed(dir: &Path, mib: u64, repeat: usize) -> Result<f64> {
    let file = dir.join("dd.bin");
    let mut best = f64::MAX;
    for _ in 0..repeat {
        let t = Instant::now();
        let status = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", file.display()))
            .args([
                "bs=1M",
                &format!("count={mib}"),
                "conv=fdatasync",
                "status=none",
            ])
            .status()
            .context("cannot run dd")?;
        let secs = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&file);
        if !status.success() {
            bail!("dd failed: {status}");
        }
        best = best.min(secs);
    }
    Ok(mib as f64 * 1048576.0 / 1e6 / best)
}

pub fn run(args: BenchStoreArgs) -> Result<()> {
    let sets = if args.inputs.is_empty() {
        crate::bench::default_sets()?
    } else {
        args.inputs
            .iter()
            .map(|p| (p.display().to_string(), p.clone()))
            .collect()
    };
    let work = args
        .dir
        .join(format!(".medledger-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let result = measure(&args, &sets, &work);
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "disk: raw durable write, dd bs=1M conv=fdatasync, 1 GiB: {:.0} MB/s",
        report.disk_mb_per_s
    );
    println!(
        "{:<28} {:>5} {:>7} {:>6} | {:>8} {:>8} {:>6} | {:>9} {:>6} | {:>8}",
        "set",
        "files",
        "studies",
        "MB",
        "put MB/s",
        "dd same",
        "ratio",
        "sustained",
        "ratio",
        "get MB/s"
    );
    for s in &report.sets {
        println!(
            "{:<28} {:>5} {:>7} {:>6.1} | {:>8.0} {:>8.0} {:>5.0}% | {:>9.0} {:>5.0}% | {:>8.0}",
            s.name,
            s.files,
            s.studies,
            s.megabytes,
            s.put_mb_per_s,
            s.dd_same_volume_mb_per_s,
            s.put_vs_dd_same_volume * 100.0,
            s.sustained_put_mb_per_s,
            s.sustained_put_vs_dd * 100.0,
            s.get_mb_per_s
        );
        if let Some(p) = s.derivative_extra_percent {
            println!("  de-identified derivative: +{p:.2}% of the original's stored bytes");
        }
    }
    println!(
        "(best of {} runs, {} threads. put = read, split, digest, seal, write, flush, one store per run; \
         dd same = dd of the set's volume; sustained = puts into fresh stores until 1 GiB is \
         written, against dd of 1 GiB; get = read, verify, open, rebuild in memory, page cache)",
        args.repeat.max(1),
        report.threads
    );
    println!("targets: put >= 70% of dd, get >= 1000 MB/s, derivative <= 2%");
    Ok(())
}

fn measure(args: &BenchStoreArgs, sets: &[(String, PathBuf)], work: &Path) -> Result<Report> {
    let repeat = args.repeat.max(1);
    let disk = dd_speed(work, 1024, repeat)?;
    let owner = SecretKey::generate();
    let mut out = Vec::new();
    for (name, path) in sets {
        let files: Vec<PathBuf> = collect_inputs(std::slice::from_ref(path))?
            .into_iter()
            .filter(|f| f.file_name().is_some_and(|n| n != "MANIFEST.tsv"))
            .collect();
        // Warm the page cache: the figure is the store's, not the input disk's.
        for f in &files {
            std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        }
        let mut best_put = f64::MAX;
        let mut megabytes = 0.0;
        let mut studies = 0;
        let mut outcomes: Vec<PutOutcome> = Vec::new();
        let store_dir = work.join("store");
        let put_once = |dir: &Path| -> Result<(f64, f64, usize, Vec<PutOutcome>)> {
            let _ = std::fs::remove_dir_all(dir);
            let store = Store::new(Box::new(FsBackend::open(dir)?));
            let t = Instant::now();
            let sources: Vec<Source> = files.iter().cloned().map(Source::File).collect();
            let (results, skipped) =
                store.put_files(sources, &owner, &PutOptions::default(), &|_| {}, &|_, _| {});
            let secs = t.elapsed().as_secs_f64();
            let outs: Vec<PutOutcome> = results
                .into_iter()
                .map(|(_, r)| r)
                .collect::<Result<_, _>>()?;
            let not_stored: std::collections::HashSet<&str> =
                skipped.iter().map(|s| s.source.as_str()).collect();
            let mb = files
                .iter()
                .filter(|f| !not_stored.contains(f.display().to_string().as_str()))
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum::<u64>() as f64
                / 1e6;
            let n = outs.len();
            Ok((secs, mb, n, outs))
        };
        for _ in 0..repeat {
            let (secs, mb, n, outs) = put_once(&store_dir)?;
            best_put = best_put.min(secs);
            megabytes = mb;
            studies = n;
            outcomes = outs;
        }
        let dd_same = dd_speed(
            work,
            ((megabytes * 1e6 / 1048576.0).ceil() as u64).max(1),
            repeat,
        )?;
        // Sustained: fresh stores until 1 GiB has gone to disk.
        let mut sustained_mb = 0.0;
        let mut sustained_secs = 0.0;
        let mut i = 0;
        while sustained_mb < 1073.7 {
            let (secs, mb, _, _) = put_once(&work.join(format!("sustained-{i}")))?;
            sustained_mb += mb;
            sustained_secs += secs;
            i += 1;
        }
        for j in 0..i {
            let _ = std::fs::remove_dir_all(work.join(format!("sustained-{j}")));
        }
        let store = Store::new(Box::new(FsBackend::open(&store_dir)?));
        let mut best_get = f64::MAX;
        for _ in 0..repeat {
            let bytes = AtomicU64::new(0);
            let t = Instant::now();
            for o in &outcomes {
                store.get_study(&o.root, &owner, &|_, _, b| {
                    bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok(())
                })?;
            }
            best_get = best_get.min(t.elapsed().as_secs_f64());
        }
        let derivative_extra_percent = if outcomes.len() == 1 {
            Some(derivative_cost(&store, &owner, &files, &outcomes[0])?)
        } else {
            None
        };
        out.push(SetResult {
            name: name.clone(),
            files: files.len(),
            studies,
            megabytes,
            put_mb_per_s: megabytes / best_put,
            dd_same_volume_mb_per_s: dd_same,
            put_vs_dd_same_volume: megabytes / best_put / dd_same,
            sustained_put_mb_per_s: sustained_mb / sustained_secs,
            sustained_put_vs_dd: sustained_mb / sustained_secs / disk,
            get_mb_per_s: megabytes / best_get,
            derivative_extra_percent,
        });
    }
    Ok(Report {
        disk_mb_per_s: disk,
        sets: out,
        threads: rayon::current_num_threads(),
    })
}

/// Stores the de-identified derivative of a one-study set; returns its stored bytes as a
/// percentage of the original's.
fn derivative_cost(
    store: &Store,
    owner: &SecretKey,
    files: &[PathBuf],
    original: &PutOutcome,
) -> Result<f64> {
    let deid = medledger_deid::Deidentifier::new(medledger_deid::DeidConfig::new(
        medledger_deid::DeidKey::from_bytes([0x42; 32]),
        medledger_deid::OptionSet::new([]).map_err(|e| anyhow::anyhow!("{e}"))?,
    ));
    let scanned = files
        .par_iter()
        .filter_map(|f| {
            let d = deid.deidentify(&std::fs::read(f).ok()?).ok()?;
            scan_memory(f.display().to_string(), Bytes::from(d.bytes)).ok()
        })
        .collect();
    let (plans, _) = plan(scanned);
    let index = original.object_index();
    let mut extra = 0;
    for p in plans {
        let o = store.put_study(
            p,
            owner,
            &PutOptions {
                derived_from: Some(original.root),
                reuse: Some(&index),
                ..PutOptions::default()
            },
            &|_| {},
        )?;
        extra += o.bytes_written;
    }
    Ok(extra as f64 * 100.0 / original.bytes_written as f64)
}

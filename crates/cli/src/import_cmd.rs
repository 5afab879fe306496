//! `medledger import DIR... --node URL`: sends DICOM files to a node by STOW-RS, in batches
//! and a few requests at a time, and reports per file what the node said.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::files::collect_inputs;

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Files or folders (walked recursively) of DICOM Part 10 files.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The node's HTTP address (DICOMweb is under /dicom-web).
    #[arg(long, env = "MEDLEDGER_NODE", default_value = "http://127.0.0.1:7200")]
    pub node: String,
    /// Instances per STOW-RS request.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Print a JSON report instead of a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, serde::Serialize)]
struct Report {
    files: usize,
    stored: usize,
    with_warnings: usize,
    failed: Vec<(String, String)>,
    bytes: u64,
    seconds: f64,
}

pub fn run(args: ImportArgs) -> Result<bool> {
    let files = collect_inputs(&args.inputs)?;
    if files.is_empty() {
        bail!("no files under the inputs given");
    }
    let url = format!("{}/dicom-web/studies", args.node.trim_end_matches('/'));
    let http = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    let started = Instant::now();
    let report = Mutex::new(Report {
        files: files.len(),
        ..Report::default()
    });
    let bar = indicatif::ProgressBar::new(files.len() as u64);
    if !args.json {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} files  {per_sec}  eta {eta}",
            )
            .expect("valid template"),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let batches: Vec<&[PathBuf]> = files.chunks(args.batch.max(1)).collect();
    let next = Mutex::new(batches.into_iter());
    let fatal: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..args.parallel.max(1) {
            s.spawn(|| {
                loop {
                    if fatal.lock().expect("not poisoned").is_some() {
                        return;
                    }
                    let Some(batch) = next.lock().expect("not poisoned").next() else {
                        return;
                    };
                    if let Err(e) = send(&http, &url, batch, &report) {
                        *fatal.lock().expect("not poisoned") = Some(e);
                        return;
                    }
                    bar.inc(batch.len() as u64);
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = fatal.into_inner().expect("not poisoned") {
        return Err(e);
    }
    let mut report = report.into_inner().expect("not poisoned");
    report.seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} file(s): {} stored ({} as originals only), {} refused; {:.1} MB in {:.1} s ({:.0} files/s)",
            report.files,
            report.stored,
            report.with_warnings,
            report.failed.len(),
            report.bytes as f64 / 1e6,
            report.seconds,
            report.files as f64 / report.seconds.max(1e-9)
        );
        for (file, reason) in &report.failed {
            println!("  refused {file}: {reason}");
        }
        println!("studies become visible to queries once the ledger has registered them");
    }
    Ok(report.failed.is_empty())
}

fn send(
    http: &reqwest::blocking::Client,
    url: &str,
    batch: &[PathBuf],
    report: &Mutex<Report>,
) -> Result<()> {
    let sent: Vec<String> = batch.iter().map(|f| f.display().to_string()).collect();
    let (boundary, body) = stow_body(batch)?;
    let len = body.len() as u64;
    let resp =
        post_stow(http, url, &boundary, body).with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let text = resp.text().unwrap_or_default();
    if !matches!(status.as_u16(), 200 | 202 | 409) {
        bail!("{url}: {status}: {text}");
    }
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{url}: the answer is not DICOM JSON"))?;
    let referenced = v["00081199"]["Value"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let failed = v["00081198"]["Value"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !failed.is_empty() && batch.len() > 1 {
        // Which files? Send them again one by one: what was stored is stored once, so
        // sending it again changes nothing.
        for f in batch {
            send(http, url, std::slice::from_ref(f), report)?;
        }
        return Ok(());
    }
    let mut r = report.lock().expect("not poisoned");
    r.bytes += len;
    r.stored += referenced.len();
    r.with_warnings += referenced
        .iter()
        .filter(|i| i.get("00081196").is_some())
        .count();
    for f in &failed {
        let reason = f["00000902"]["Value"][0]
            .as_str()
            .unwrap_or("refused")
            .to_string();
        r.failed.push((sent[0].clone(), reason));
    }
    Ok(())
}

/// A STOW-RS request body: each file a part of type application/dicom. Returns the boundary.
pub fn stow_body(files: &[PathBuf]) -> Result<(String, Vec<u8>)> {
    let boundary = format!("medledger-stow-{:016x}", rand::random::<u64>());
    let mut body = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(&bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Ok((boundary, body))
}

/// Posts a STOW-RS body made by [`stow_body`].
pub fn post_stow(
    http: &reqwest::blocking::Client,
    url: &str,
    boundary: &str,
    body: Vec<u8>,
) -> reqwest::Result<reqwest::blocking::Response> {
    http.post(url)
        .header(
            "Content-Type",
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .header("Accept", "application/dicom+json")
        .body(body)
        .send()
}

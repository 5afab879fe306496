//! `medledger bench share`: cross-site retrieval of a 64-slice chest CT study between two
//! hospitals' nodes (separate processes of a four-organisation network), beside a plain copy
//! of the same bytes over loopback measured in the same run.
//!
//! One run: hospital B's clinician submits a care request for the study (the patient has
//! consented); hospital A's node grants it; B's node fetches the sealed objects over mutual
//! TLS, verifies each against the root on the ledger, stores them durably and indexes the
//! study. Measured: request to viewable at B (from submitting the request until the study is
//! stored and in B's index), and the retrieval's MB/s (sealed bytes over the time from opening
//! the transfer to the study being viewable). B's copy is deleted between runs, so each run
//! transfers everything.
//!
//! The plain copy: the study's sealed object files read from A's store, sent over one loopback
//! TCP connection, written to files by the receiver and flushed to disk (syncfs) at the end:
//! what `cp` plus `sync` across a socket would do, with no TLS, no checks and no ledger.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use medledger_crypto::{Digest, SecretKey};
use medledger_ledger::{Op, OrgClass, Purpose, Recipient, Role, Study, Target};
use medledger_node::{Client, NodeConfig};
use serde::Serialize;

use crate::demo::{add_member, current, free_base, grants_of, retrieval_of, wait_until};

#[derive(Args, Debug)]
pub struct BenchShareArgs {
    /// The study to share (default: the 64-slice chest CT of the test data).
    #[arg(long)]
    pub series: Option<PathBuf>,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// First port of the network (the next free range is taken if busy).
    #[arg(long, default_value_t = 7600)]
    pub base_port: u16,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Run {
    request_to_viewable_s: f64,
    request_final_s: f64,
    transfer_s: f64,
    transferred_mb: f64,
    retrieval_mb_per_s: f64,
    plain_copy_mb_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    instances: usize,
    objects: usize,
    megabytes: f64,
    runs: Vec<Run>,
    /// Medians over the runs.
    request_to_viewable_s: f64,
    retrieval_mb_per_s: f64,
    plain_copy_mb_per_s: f64,
    /// Retrieval speed / plain copy speed (target: at least 0.5).
    ratio: f64,
    /// Targets: ratio >= 0.5, request to viewable < 2 s.
    ratio_target_met: bool,
    latency_target_met: bool,
}

const A: &str = "hospital-a";
const B: &str = "hospital-b";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: BenchShareArgs) -> Result<()> {
    let series = match args.series {
        Some(s) => s,
        None => medledger_testkit::chest_ct_series_dir(),
    };
    let files = crate::files::collect_inputs(std::slice::from_ref(&series))?;
    if files.is_empty() {
        bail!("no DICOM files under {}", series.display());
    }
    let tmp =
        Scratch(std::env::temp_dir().join(format!("medledger-bench-share-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir_all(&tmp.0)?;
    let dir = tmp.0.join("network");
    let base = free_base(args.base_port)?;
    let orgs = vec![
        (A.to_string(), OrgClass::Hospital),
        (B.to_string(), OrgClass::Hospital),
        ("research".to_string(), OrgClass::Research),
        ("patients".to_string(), OrgClass::PatientAgent),
    ];
    let init = medledger_node::init_network(&dir, "medledger-bench", &orgs, base)?;
    let mut configs = std::collections::BTreeMap::new();
    for path in &init.configs {
        let mut cfg = NodeConfig::load(path)?;
        if let Some(im) = cfg.imaging.as_mut() {
            im.stable_ms = 500;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&cfg)?)?;
        configs.insert(cfg.org.clone(), cfg);
    }
    crate::network_cmd::up_quiet(&dir)?;
    let _guard = Down(dir.clone());
    let api = |org: &str| format!("http://{}", configs[org].api);
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    for org in [A, B] {
        wait_until(&format!("{org}'s node"), || {
            http.get(format!("{}/health", api(org)))
                .send()
                .is_ok_and(|r| r.status().is_success())
        })?;
    }

    // The study at A, registered.
    let mut bytes_in = 0u64;
    for chunk in files.chunks(32) {
        let (boundary, body) = crate::import_cmd::stow_body(chunk)?;
        bytes_in += body.len() as u64;
        let r = crate::import_cmd::post_stow(
            &http,
            &format!("{}/dicom-web/studies", api(A)),
            &boundary,
            body,
        )?;
        if !r.status().is_success() {
            bail!("hospital A refused the study: {}", r.status());
        }
    }
    let a = Client::new(&api(A));
    let mut original: Option<Study> = None;
    wait_until("the study's registration", || {
        original = current(a.studies().unwrap_or_default())
            .into_iter()
            .find(|s| !s.is_derivative() && s.instances as usize == files.len());
        original.is_some()
    })?;
    let original = original.expect("waited for");
    // The patient consents (through the patients' agent); a clinician at B.
    let agent_admin = medledger_crypto::SigningKey::from_text(&std::fs::read_to_string(
        dir.join("patients").join("admin.key"),
    )?)?;
    Client::new(&api("patients")).execute(
        &agent_admin,
        Op::GrantConsent {
            patient: original.patient.clone(),
            purpose: Purpose::Care,
            recipient: Recipient::Org(B.into()),
            expires_ms: None,
        },
        Duration::from_secs(60),
    )?;
    let clinician = add_member(
        &dir.join(B),
        &api(B),
        "bench clinician",
        &[Role::Clinician],
        None,
    )?;

    // The study's sealed objects in A's store, for the plain copy and for clearing B.
    let a_im = configs[A].imaging.clone().context("no imaging at A")?;
    let b_im = configs[B].imaging.clone().context("no imaging at B")?;
    let store_a = medledger_store::Store::open(&a_im.store)?;
    let owner_a = SecretKey::from_text(&std::fs::read_to_string(&a_im.store_key)?)?;
    let (record, manifest) = store_a.open_manifest(&original.root, &owner_a)?;
    let mut objects: Vec<Digest> = record.objects.clone();
    objects.push(record.manifest);
    let keys: Vec<String> = objects
        .iter()
        .map(|d| format!("objects/{}", d.to_hex()))
        .collect();
    let disk_a = medledger_store::FsBackend::open_existing(&a_im.store)?;
    let sources: Vec<medledger_store::Location> = keys
        .iter()
        .map(|k| {
            disk_a
                .locate(k)?
                .with_context(|| format!("{k} is not in {}", a_im.store))
        })
        .collect::<Result<_>>()?;
    let sealed_bytes: u64 = sources.iter().map(|l| l.len).sum();
    let disk_b = medledger_store::FsBackend::open_existing(&b_im.store)?;

    let b = Client::new(&api(B));
    let mut runs = Vec::new();
    for i in 0..args.repeat.max(1) {
        // B starts without the study.
        medledger_store::Backend::delete_many(&disk_b, &keys)?;
        let _ = std::fs::remove_file(
            Path::new(&b_im.store).join(format!("refs/{}.json", original.root.to_hex())),
        );
        let t0 = Instant::now();
        let request = b
            .execute(
                &clinician,
                Op::RequestAccess {
                    target: Target::Study(original.root),
                    purpose: Purpose::Care,
                    break_glass: false,
                },
                Duration::from_secs(60),
            )?
            .receipt
            .created
            .unwrap_or_default();
        let request_final = t0.elapsed().as_secs_f64();
        let mut outcome = serde_json::Value::Null;
        let mut failed = None;
        let mut done_at = Instant::now();
        wait_until("the retrieval at B", || {
            let Some(g) = grants_of(&b, &request).into_iter().next() else {
                return false;
            };
            match retrieval_of(&http, &api(B), &g.id) {
                Some(r) if r["state"] == "done" => {
                    done_at = Instant::now();
                    outcome = r["outcome"].clone();
                    true
                }
                Some(r) if r["state"] == "failed" => {
                    failed = Some(r["error"].to_string());
                    true
                }
                _ => false,
            }
        })?;
        if let Some(e) = failed {
            bail!("run {}: the retrieval failed: {e}", i + 1);
        }
        let f = |k: &str| outcome[k].as_f64().unwrap_or(0.0);
        // The audit receipt after the study became viewable is not part of the latency.
        let after_viewable = f("seconds") - f("viewable_seconds");
        let viewable = (done_at - t0).as_secs_f64() - after_viewable;
        let transferred = f("transferred_bytes");
        if f("fetched_objects") as usize + 1 < record.objects.len() {
            bail!(
                "run {}: B did not transfer the whole study: {outcome}",
                i + 1
            );
        }
        let plain = plain_copy(&sources, &tmp.0)?;
        let run = Run {
            request_to_viewable_s: viewable,
            request_final_s: request_final,
            transfer_s: f("viewable_seconds"),
            transferred_mb: transferred / 1e6,
            retrieval_mb_per_s: transferred / 1e6 / f("viewable_seconds"),
            plain_copy_mb_per_s: sealed_bytes as f64 / 1e6 / plain,
        };
        if !args.json {
            let phases: Vec<String> = outcome["phases"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            format!(
                                "{} {:.3}",
                                p[0].as_str().unwrap_or(""),
                                p[1].as_f64().unwrap_or(0.0)
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            eprintln!(
                "run {}: request to viewable {:.2} s (request final after {:.2} s, transfer {:.2} s: {}), retrieval {:.0} MB/s, plain copy {:.0} MB/s",
                i + 1,
                run.request_to_viewable_s,
                run.request_final_s,
                run.transfer_s,
                phases.join(", "),
                run.retrieval_mb_per_s,
                run.plain_copy_mb_per_s
            );
        }
        runs.push(run);
    }
    let retrieval = median(runs.iter().map(|r| r.retrieval_mb_per_s).collect());
    let plain = median(runs.iter().map(|r| r.plain_copy_mb_per_s).collect());
    let latency = median(runs.iter().map(|r| r.request_to_viewable_s).collect());
    let report = Report {
        instances: manifest.instance_count(),
        objects: objects.len(),
        megabytes: sealed_bytes as f64 / 1e6,
        runs,
        request_to_viewable_s: latency,
        retrieval_mb_per_s: retrieval,
        plain_copy_mb_per_s: plain,
        ratio: retrieval / plain,
        ratio_target_met: retrieval / plain >= 0.5,
        latency_target_met: latency < 2.0,
    };
    let _ = bytes_in;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "cross-site retrieval of a {}-instance study ({} objects, {:.1} MB sealed), median of {} runs:",
            report.instances,
            report.objects,
            report.megabytes,
            report.runs.len()
        );
        println!(
            "  request to viewable at B   {:>8.2} s    target < 2 s: {}",
            report.request_to_viewable_s,
            if report.latency_target_met {
                "met"
            } else {
                "NOT met"
            }
        );
        println!(
            "  retrieval (TLS, verified)  {:>8.0} MB/s",
            report.retrieval_mb_per_s
        );
        println!(
            "  plain copy over loopback   {:>8.0} MB/s",
            report.plain_copy_mb_per_s
        );
        println!(
            "  ratio                      {:>8.2}      target >= 0.5: {}",
            report.ratio,
            if report.ratio_target_met {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    Ok(())
}

/// Sends the files over one loopback TCP connection; the receiver writes each to a file and
/// flushes the file system at the end. Returns the seconds it took.
fn plain_copy(files: &[medledger_store::Location], tmp: &Path) -> Result<f64> {
    let out = tmp.join(format!("plain-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&out)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let n = files.len();
    let receiver_dir = out.clone();
    let t = Instant::now();
    let receiver = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut len = [0u8; 8];
        for i in 0..n {
            s.read_exact(&mut len)?;
            let mut buf = vec![0u8; u64::from_be_bytes(len) as usize];
            s.read_exact(&mut buf)?;
            std::fs::write(receiver_dir.join(format!("{i:06}")), &buf)?;
        }
        crate::files::sync_filesystem(&receiver_dir)?;
        Ok(())
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    for f in files {
        let bytes = f.read().with_context(|| format!("{}", f.path.display()))?;
        s.write_all(&(bytes.len() as u64).to_be_bytes())?;
        s.write_all(&bytes)?;
    }
    s.flush()?;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&out);
    Ok(secs)
}

/// A scratch folder removed when the bench ends (declared before the network's guard, so
/// it is removed after the nodes stopped).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stops the network however the bench ends.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = crate::network_cmd::down_quiet(&self.0);
    }
}

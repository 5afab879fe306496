//! `medledger bench node`: a medledger node against Orthanc 1.10, both started here and
//! measured in the same run on the same files: ingest of the 64-slice chest CT series by
//! C-STORE (dcmtk storescu, TCP_NODELAY) and by STOW-RS, QIDO-RS latency and WADO-RS study
//! retrieval. medledger de-identifies, encrypts, stores both forms durably and registers the
//! study on the ledger on top; Orthanc stores the files as they are.
//!
//! medledger answers a C-STORE or STOW-RS once the instance is sealed in its ingest journal
//! and the journal is on disk; it stores after the answer. Both figures are printed: the
//! acknowledged rate (what a sender sees, and what Orthanc's figure is) and the rate until
//! every acknowledged instance is in the store. Orthanc's turn starts only once medledger
//! has stored everything, so neither measures against the other's background work. The
//! ceiling of the C-STORE figures is measured too: storescu sending to dcmtk's storescp that
//! discards every instance.
//!
//! Each run sends a fresh copy of the series (new Study, Series and SOP Instance UIDs), so
//! neither server can answer from what it already holds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use serde::Serialize;
use serde_json::Value;

#[derive(Args, Debug)]
pub struct BenchNodeArgs {
    /// The series to send (default: the 64-slice chest CT of the test data).
    #[arg(long)]
    pub series: Option<PathBuf>,
    /// Runs of each ingest measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// QIDO-RS requests to time.
    #[arg(long, default_value_t = 200)]
    pub queries: usize,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize, Default, Clone)]
struct Side {
    cstore_instances_per_s: f64,
    cstore_mb_per_s: f64,
    stow_instances_per_s: f64,
    stow_mb_per_s: f64,
    qido_p50_ms: f64,
    qido_p99_ms: f64,
    /// The best of five retrievals (both servers keep recently read files in memory:
    /// Orthanc's storage cache, medledger's read cache of verified plaintext).
    wado_study_mb_per_s: f64,
    /// The first of those five: medledger serves the objects its read cache took when the
    /// study was stored (see `Store::with_read_cache`).
    wado_study_first_mb_per_s: f64,
    /// From the first instance sent until every acknowledged one is in the store (medledger
    /// acknowledges from its journal and stores after; Orthanc stores before answering).
    cstore_stored_instances_per_s: f64,
    stow_stored_instances_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    instances: usize,
    megabytes: f64,
    medledger: Side,
    orthanc: Side,
    /// medledger / Orthanc.
    ingest_cstore_ratio: f64,
    ingest_stow_ratio: f64,
    retrieve_ratio: f64,
    /// Seconds from the last C-STORE acknowledgement until the study was final on the ledger
    /// and visible to QIDO-RS (median).
    registration_s: f64,
    /// storescu (TCP_NODELAY) to dcmtk's storescp discarding every instance (`--ignore`):
    /// how fast the client sends at all, the ceiling of any C-STORE server here.
    cstore_client_ceiling_instances_per_s: f64,
}

struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn need(tool: &str) -> Result<()> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join(tool).is_file());
    if !found {
        bail!("`{tool}` is not installed: run scripts/install-interop (dcmtk and Orthanc)");
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A copy of the series under new UIDs (the same new study for every file).
fn fresh_copy(files: &[PathBuf], out: &Path, run: &str) -> Result<(String, Vec<PathBuf>)> {
    std::fs::create_dir_all(out)?;
    let study = format!("2.25.{}", rand::random::<u64>());
    let series = format!("{study}.1");
    let mut out_files = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut obj =
            dicom_object::open_file(f).with_context(|| format!("cannot read {}", f.display()))?;
        let sop = format!("{series}.{}", i + 1);
        obj.put(DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(study.as_str()),
        ));
        obj.put(DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(series.as_str()),
        ));
        obj.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop.as_str()),
        ));
        obj.update_meta(|m| m.media_storage_sop_instance_uid = sop.clone());
        let p = out.join(format!("{run}-{i:03}.dcm"));
        obj.write_to_file(&p)?;
        out_files.push(p);
    }
    Ok((study, out_files))
}

fn storescu(port: u16, aec: &str, files: &[PathBuf]) -> Result<f64> {
    let t = Instant::now();
    let o = Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aet", "BENCH", "-aec", aec, "127.0.0.1", &port.to_string()])
        .args(files)
        .stdin(Stdio::null())
        .output()?;
    let s = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "storescu to {aec} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(s)
}

fn stow(http: &reqwest::blocking::Client, url: &str, files: &[PathBuf]) -> Result<f64> {
    let (boundary, body) = crate::import_cmd::stow_body(files)?;
    let t = Instant::now();
    let r = crate::import_cmd::post_stow(http, url, &boundary, body)?;
    let status = r.status();
    let text = r.text()?;
    let s = t.elapsed().as_secs_f64();
    let failed = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["00081198"]["Value"].as_array().map(|a| !a.is_empty()))
        .unwrap_or(false);
    if !status.is_success() || failed {
        bail!(
            "STOW-RS to {url}: {status}: {}",
            &text[..text.len().min(400)]
        );
    }
    Ok(s)
}

fn qido_latency(http: &reqwest::blocking::Client, url: &str, n: usize) -> Result<(f64, f64)> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = http.get(url).send()?;
        let ok = r.status().is_success();
        let _ = r.bytes()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if !ok {
            bail!("QIDO-RS {url} failed");
        }
    }
    Ok((percentile(times.clone(), 0.5), percentile(times, 0.99)))
}

/// WADO-RS study retrieval, five times on one kept-alive connection: the first rate and the
/// best, in MB/s. The body is counted as it arrives, as a viewer consumes it (for both servers
/// alike): the client does not spend the time of collecting 30 MB into one buffer.
///
/// The async client on the calling thread, not the blocking one: that hands every chunk from
/// its runtime's thread to the caller's, and on two cores the handoff, not the server, bounded
/// the figure (same study, same node: 1,100-3,300 MB/s blocking, 2,900-3,200 async).
fn wado(url: &str) -> Result<(f64, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let mut best = 0.0f64;
        let mut first = None;
        for _ in 0..5 {
            let t = Instant::now();
            let mut r = http
                .get(url)
                .header(
                    "Accept",
                    "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
                )
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("WADO-RS {url}: {}", r.status());
            }
            let mut n = 0usize;
            while let Some(chunk) = r.chunk().await? {
                n += chunk.len();
            }
            let rate = n as f64 / 1e6 / t.elapsed().as_secs_f64();
            first.get_or_insert(rate);
            best = best.max(rate);
        }
        Ok((first.unwrap_or(0.0), best))
    })
}

/// Waits until the node has stored everything it acknowledged (its journal is drained).
fn wait_stored(http: &reqwest::blocking::Client, api: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let text = http.get(format!("{api}/metrics")).send()?.text()?;
        let left = text
            .lines()
            .find_map(|l| l.strip_prefix("medledger_journal_outstanding "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .context("the node's /metrics has no medledger_journal_outstanding")?;
        if left == 0 {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("{left} acknowledged instances not stored after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// storescu to dcmtk's storescp that receives and discards (`--ignore`) and takes PDUs as
/// large as the node does, median of `runs`.
fn client_ceiling(files: &[PathBuf], runs: usize) -> Result<f64> {
    need("storescp")?;
    let port = free_port()?;
    let max_pdu = medledger_dicom_net::ScpConfig::default().max_pdu_length;
    let _scp = Proc(
        Command::new("storescp")
            .env("TCP_NODELAY", "1")
            // Offering the PDU size the node offers: storescu sends in PDUs of the size its
            // peer takes, and at storescp's default (16 KiB) the client itself is slower.
            .args(["--ignore", "--max-pdu", &max_pdu.to_string()])
            .args(["-aet", "SINK", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start storescp")?,
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("storescp did not listen within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut t = Vec::new();
    for _ in 0..runs.max(1) {
        t.push(storescu(port, "SINK", files)?);
    }
    Ok(files.len() as f64 / median(t))
}

/// Waits until `studies` studies are visible to QIDO-RS; returns the UID of the last one.
fn wait_visible(
    http: &reqwest::blocking::Client,
    web: &str,
    studies: usize,
    limit: Duration,
) -> Result<String> {
    let start = Instant::now();
    loop {
        if count(http, web)?.0 >= studies {
            break;
        }
        if start.elapsed() > limit {
            bail!("the study did not become visible within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(count(http, web)?.1)
}

/// (studies visible, UID of the last one).
fn count(http: &reqwest::blocking::Client, web: &str) -> Result<(usize, String)> {
    let r = http.get(format!("{web}/studies")).send()?;
    if r.status().as_u16() == 204 {
        return Ok((0, String::new()));
    }
    let v: Value = r.json()?;
    let a = v.as_array().cloned().unwrap_or_default();
    let uid = a
        .last()
        .and_then(|s| s["0020000D"]["Value"][0].as_str())
        .unwrap_or("")
        .to_string();
    Ok((a.len(), uid))
}

pub fn run(args: BenchNodeArgs) -> Result<()> {
    need("storescu")?;
    need("Orthanc")?;
    let series_dir = match &args.series {
        Some(d) => d.clone(),
        None => medledger_testkit::chest_ct_series_dir(),
    };
    let mut files = crate::files::collect_inputs(std::slice::from_ref(&series_dir))?;
    files.sort();
    if files.is_empty() {
        bail!("no files in {}", series_dir.display());
    }
    let megabytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum::<u64>() as f64
        / 1e6;
    let tmp = std::env::temp_dir().join(format!("medledger-bench-node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let result = measure(&args, &files, megabytes, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let m = &report.medledger;
    let o = &report.orthanc;
    println!(
        "{} instances, {:.1} MB; medledger de-identifies, encrypts, stores original and derivative and registers on a 4-node ledger; Orthanc stores",
        report.instances, report.megabytes
    );
    println!("                          medledger      Orthanc    ratio  target");
    println!(
        "C-STORE ingest inst/s   {:>10.0} {:>12.0} {:>8.2}x  >= 5x   ({:.0} vs {:.0} MB/s)",
        m.cstore_instances_per_s,
        o.cstore_instances_per_s,
        report.ingest_cstore_ratio,
        m.cstore_mb_per_s,
        o.cstore_mb_per_s
    );
    println!(
        "STOW-RS ingest inst/s   {:>10.0} {:>12.0} {:>8.2}x  >= 5x   ({:.0} vs {:.0} MB/s)",
        m.stow_instances_per_s,
        o.stow_instances_per_s,
        report.ingest_stow_ratio,
        m.stow_mb_per_s,
        o.stow_mb_per_s
    );
    println!(
        "  stored (not only acknowledged): C-STORE {:.0} inst/s, STOW-RS {:.0} inst/s",
        m.cstore_stored_instances_per_s, m.stow_stored_instances_per_s,
    );
    println!(
        "  storescu to a server that discards everything: {:.0} inst/s, {:.2}x Orthanc: the most any server shows with this client",
        report.cstore_client_ceiling_instances_per_s,
        report.cstore_client_ceiling_instances_per_s / o.cstore_instances_per_s
    );
    println!(
        "QIDO-RS p50 ms          {:>10.2} {:>12.2}            < 5 ms  (p99 {:.2} vs {:.2})",
        m.qido_p50_ms, o.qido_p50_ms, m.qido_p99_ms, o.qido_p99_ms
    );
    println!(
        "WADO-RS study MB/s      {:>10.0} {:>12.0} {:>8.2}x  >= 3x",
        m.wado_study_mb_per_s, o.wado_study_mb_per_s, report.retrieve_ratio
    );
    println!(
        "  first of the five retrievals (medledger: the study as stored, from the read cache that storing it filled): {:.0} vs {:.0} MB/s ({:.2}x)",
        m.wado_study_first_mb_per_s,
        o.wado_study_first_mb_per_s,
        m.wado_study_first_mb_per_s / o.wado_study_first_mb_per_s
    );
    println!(
        "registered on the ledger and visible {:.1} s after the last acknowledgement (quiet period {} ms included)",
        report.registration_s, 500
    );
    Ok(())
}

fn measure(args: &BenchNodeArgs, files: &[PathBuf], megabytes: f64, tmp: &Path) -> Result<Report> {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let n = files.len() as f64;

    // Orthanc, with its own storage and index, on free ports.
    let (o_http, o_dicom) = (free_port()?, free_port()?);
    let o_dir = tmp.join("orthanc");
    std::fs::create_dir_all(o_dir.join("db"))?;
    let config = serde_json::json!({
        "Name": "bench",
        "StorageDirectory": o_dir.join("db"),
        "IndexDirectory": o_dir.join("db"),
        "HttpPort": o_http,
        "DicomPort": o_dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": false,
        "AuthenticationEnabled": false,
        "DicomWeb": { "Enable": true, "Root": "/dicom-web/" },
        "Plugins": ["/usr/share/orthanc/plugins"],
    });
    std::fs::write(
        o_dir.join("orthanc.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let _orthanc = Proc(
        // Orthanc's DICOM layer is dcmtk's, which turns Nagle off with this variable: without
        // it every C-STORE waits ~90 ms and the comparison would flatter medledger.
        Command::new("Orthanc")
            .env("TCP_NODELAY", "1")
            .arg(o_dir.join("orthanc.json"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start Orthanc")?,
    );
    let o_web = format!("http://127.0.0.1:{o_http}/dicom-web");

    // A medledger network.
    let dir = tmp.join("net");
    let base = crate::demo::free_base(33_000 + (std::process::id() % 1_000) as u16 * 4)?;
    let orgs = ["hospital-a", "hospital-b", "research", "patients"]
        .iter()
        .map(|o| medledger_node::parse_org(o))
        .collect::<Result<Vec<_>, _>>()?;
    medledger_node::init_network(&dir, "medledger-bench", &orgs, base)?;
    let cfg_path = dir.join("hospital-a/node.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path)?)?;
    cfg["imaging"]["stable_ms"] = 500.into();
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
    let result = (|| -> Result<Report> {
        crate::network_cmd::up_quiet(&dir)?;
        let m_api = format!("http://127.0.0.1:{}", base + 100);
        let m_web = format!("{m_api}/dicom-web");
        let m_dicom = base + 200;
        let start = Instant::now();
        loop {
            let m_ok = http
                .get(format!("{m_api}/health"))
                .send()
                .is_ok_and(|r| r.status().is_success());
            let o_ok = http
                .get(format!("{o_web}/studies"))
                .send()
                .is_ok_and(|r| r.status().is_success());
            if m_ok && o_ok {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("medledger or Orthanc did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut m = Side::default();
        let mut o = Side::default();
        let mut cstore = (Vec::new(), Vec::new());
        let mut stow_t = (Vec::new(), Vec::new());
        let mut registration = Vec::new();
        let mut stored = (Vec::new(), Vec::new());
        let mut m_study = String::new();
        let mut o_study = String::new();
        // Studies of medledger's earlier runs, each waited for before the next step: a study
        // still being registered would otherwise be counted as the next one, and its
        // registration would run during Orthanc's turn.
        let mut visible = count(&http, &m_web)?.0;
        for r in 0..args.repeat.max(1) {
            let (_, copy) = fresh_copy(files, &tmp.join(format!("c{r}")), "m")?;
            let sent = Instant::now();
            let t = storescu(m_dicom, "HOSPITAL_A", &copy)?;
            cstore.0.push(t);
            let acked = Instant::now();
            wait_stored(&http, &m_api, Duration::from_secs(120))?;
            stored.0.push(sent.elapsed().as_secs_f64());
            visible += 1;
            m_study = wait_visible(&http, &m_web, visible, Duration::from_secs(60))?;
            registration.push(acked.elapsed().as_secs_f64());
            let (ostudy, copy) = fresh_copy(files, &tmp.join(format!("o{r}")), "o")?;
            cstore.1.push(storescu(o_dicom, "ORTHANC", &copy)?);
            o_study = ostudy;
            let (_, copy) = fresh_copy(files, &tmp.join(format!("s{r}")), "ms")?;
            let sent = Instant::now();
            stow_t
                .0
                .push(stow(&http, &format!("{m_web}/studies"), &copy)?);
            // Orthanc's turn starts once medledger has stored what it acknowledged and
            // registered the study.
            wait_stored(&http, &m_api, Duration::from_secs(120))?;
            stored.1.push(sent.elapsed().as_secs_f64());
            visible += 1;
            wait_visible(&http, &m_web, visible, Duration::from_secs(60))?;
            let (_, copy) = fresh_copy(files, &tmp.join(format!("t{r}")), "os")?;
            stow_t
                .1
                .push(stow(&http, &format!("{o_web}/studies"), &copy)?);
        }
        let (mc, oc) = (median(cstore.0), median(cstore.1));
        let (ms, os) = (median(stow_t.0), median(stow_t.1));
        m.cstore_instances_per_s = n / mc;
        m.cstore_mb_per_s = megabytes / mc;
        o.cstore_instances_per_s = n / oc;
        o.cstore_mb_per_s = megabytes / oc;
        m.stow_instances_per_s = n / ms;
        m.cstore_stored_instances_per_s = n / median(stored.0);
        m.stow_stored_instances_per_s = n / median(stored.1);
        m.stow_mb_per_s = megabytes / ms;
        o.stow_instances_per_s = n / os;
        o.stow_mb_per_s = megabytes / os;
        (m.qido_p50_ms, m.qido_p99_ms) = qido_latency(
            &http,
            &format!("{m_web}/studies?ModalitiesInStudy=CT&limit=10"),
            args.queries,
        )?;
        (o.qido_p50_ms, o.qido_p99_ms) = qido_latency(
            &http,
            &format!("{o_web}/studies?ModalitiesInStudy=CT&limit=10"),
            args.queries,
        )?;
        (m.wado_study_first_mb_per_s, m.wado_study_mb_per_s) =
            wado(&format!("{m_web}/studies/{m_study}"))?;
        (o.wado_study_first_mb_per_s, o.wado_study_mb_per_s) =
            wado(&format!("{o_web}/studies/{o_study}"))?;
        Ok(Report {
            instances: files.len(),
            megabytes,
            ingest_cstore_ratio: m.cstore_instances_per_s / o.cstore_instances_per_s,
            ingest_stow_ratio: m.stow_instances_per_s / o.stow_instances_per_s,
            retrieve_ratio: m.wado_study_mb_per_s / o.wado_study_mb_per_s,
            registration_s: median(registration),
            cstore_client_ceiling_instances_per_s: client_ceiling(files, args.repeat)?,
            medledger: m,
            orthanc: o,
        })
    })();
    let _ = crate::network_cmd::down_quiet(&dir);
    result
}

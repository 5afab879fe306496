//! Fifty senders storing into one node at once for a minute (MEDLEDGER_SOAK_SECS): every
//! C-STORE succeeds, the node's memory stays bounded, and what was acknowledged is there.

mod common;
use common::network;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Peak resident memory of a process, in MB (Linux).
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

#[test]
fn fifty_concurrent_senders_for_a_minute_all_succeed_in_bounded_memory() {
    let secs: u64 = std::env::var("MEDLEDGER_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dir = home.join("net");
    let base = common::free_base(36_000 + (std::process::id() % 1_000) as u16 * 4);
    let (_net, api) = network(home, &dir, base, serde_json::json!([]));
    let dimse: SocketAddr = format!("127.0.0.1:{}", base + 200).parse().unwrap();
    let pid: u32 = std::fs::read_to_string(dir.join("hospital-a/node.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let idle_mb = peak_rss_mb(pid);

    // Each sender has its own patient and study; instances are small CT slices.
    let stop = Arc::new(AtomicBool::new(false));
    let stored = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..50u64)
        .map(|i| {
            let stop = stop.clone();
            let stored = stored.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let patient = medledger_testkit::synth::FakePatient::generate(1000 + i);
                let spec = medledger_testkit::synth::CtStudySpec {
                    slices: 40,
                    rows: 128,
                    columns: 128,
                    ..medledger_testkit::synth::CtStudySpec::for_seed(1000 + i)
                };
                let files = medledger_testkit::synth::ct_study(&patient, &spec);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < files.len() {
                    let st = medledger_dicom_net::store_to(
                        dimse,
                        &format!("SENDER{i}"),
                        "HOSPITAL_A",
                        std::slice::from_ref(&files[n]),
                    )
                    .map_err(|e| format!("sender {i}: {e}"))?;
                    if !st[0].is_success() {
                        return Err(format!("sender {i}: status {:?}", st[0]));
                    }
                    stored.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                    if n == files.len() {
                        n = 0; // again: duplicates must be answered as well
                    }
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap().unwrap();
    }
    let n = stored.load(Ordering::Relaxed);
    let peak = peak_rss_mb(pid);
    eprintln!(
        "{n} C-STOREs in {secs} s from 50 senders; node RSS idle {idle_mb:.0} MB, peak {peak:.0} MB"
    );
    assert!(n >= 500, "only {n} instances stored in {secs} s");
    assert!(peak < 1500.0, "node peak RSS {peak:.0} MB");
    // Every sender's study is registered and visible.
    let start = Instant::now();
    loop {
        let r = reqwest::blocking::get(format!("{api}/dicom-web/studies?limit=1000")).unwrap();
        let count = if r.status().as_u16() == 204 {
            0
        } else {
            r.json::<serde_json::Value>()
                .unwrap()
                .as_array()
                .unwrap()
                .len()
        };
        if count == 50 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{count} of 50 studies visible"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

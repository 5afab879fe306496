//! Helpers the binary's integration tests share.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `medledger` binary under test, with its own home folder (never the user's keys).
pub fn medledger(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medledger"));
    c.env("MEDLEDGER_HOME", home);
    c
}

/// A finished command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub struct Network(pub PathBuf, pub PathBuf);
impl Drop for Network {
    fn drop(&mut self) {
        let _ = medledger(&self.0)
            .args(["network", "down"])
            .arg(&self.1)
            .output();
    }
}

/// A peer process started by the test: killed by its PID and waited for.
pub struct Child(pub std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

pub fn get_json(url: &str) -> (u16, Value) {
    let r = http().get(url).send().unwrap();
    let code = r.status().as_u16();
    let body = r.text().unwrap();
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

pub fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let r = http().post(url).json(body).send().unwrap();
    let code = r.status().as_u16();
    let text = r.text().unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The first value of attribute `tag` (8 hex digits) in a DICOM JSON object.
/// A node's Prometheus metric `medledger_<name>`; `u64::MAX` if unreadable.
pub fn metric(api: &str, name: &str) -> u64 {
    let body = http()
        .get(format!("{api}/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("medledger_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

pub fn attr(v: &Value, tag: &str) -> Value {
    v[tag]["Value"][0].clone()
}

pub fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn chest_ct() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(medledger_testkit::chest_ct_series_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// A four-organisation network whose hospital A registers studies after 1 s of quiet and
/// knows the DIMSE `peers`; returns its guard and hospital A's API root once it is ready.
pub fn network(home: &Path, dir: &Path, base: u16, peers: Value) -> (Network, String) {
    network_with(home, dir, base, peers, |_| {})
}

/// [`network`], with `edit` applied to hospital A's node configuration before the start.
pub fn network_with(
    home: &Path,
    dir: &Path,
    base: u16,
    peers: Value,
    edit: impl FnOnce(&mut Value),
) -> (Network, String) {
    let init = medledger(home)
        .args([
            "network",
            "init",
            "--orgs",
            "hospital-a,hospital-b,research,patients",
            "--out",
        ])
        .arg(dir)
        .args(["--base-port", &base.to_string()])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init));
    let cfg_path = dir.join("hospital-a/node.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["imaging"]["stable_ms"] = 1000.into();
    cfg["imaging"]["dicom_peers"] = peers;
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let net = Network(home.to_path_buf(), dir.to_path_buf());
    network_up(home, dir);
    let api = format!("http://127.0.0.1:{}", base + 100);
    wait_for("the imaging service", Duration::from_secs(60), || {
        http()
            .get(format!("{api}/health"))
            .send()
            .is_ok_and(|r| r.status().is_success())
    });
    (net, api)
}

/// A dcmtk tool with TCP_NODELAY=1; fails the test when dcmtk is missing.
pub fn dcmtk(tool: &str) -> Command {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join(tool).is_file());
    assert!(
        found,
        "`{tool}` (dcmtk) is missing: run scripts/install-interop"
    );
    let mut c = Command::new(tool);
    c.env("TCP_NODELAY", "1").stdin(Stdio::null());
    c
}

/// Runs a command to its end.
pub fn run(c: &mut Command) -> Output {
    c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

/// A base port for a four-node network whose p2p (`base+i`), HTTP (`base+100+i`), DIMSE
/// (`base+200+i`) and sharing (`base+300+i`) ports are all free now, searched from `start`
/// (tests run side by side).
pub fn free_base(start: u16) -> u16 {
    let mut base = start;
    loop {
        let free = (0..4).all(|i| {
            // p2p, API, DIMSE, sharing, HTTPS, DICOM TLS (see `network init`).
            [0u16, 100, 200, 300, 400, 500]
                .iter()
                .all(|off| TcpListener::bind(("127.0.0.1", base + off + i)).is_ok())
        });
        if free {
            return base;
        }
        base = base.wrapping_add(7);
        assert!(base < 60_000 && base > 1024, "no free ports for a network");
    }
}

/// A STOW-RS request body: `files` (Part 10) as parts of type application/dicom.
pub fn stow_body(files: &[Vec<u8>], boundary: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for f in files {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(f);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

/// `medledger network up DIR`, which must succeed.
pub fn network_up(home: &Path, dir: &Path) {
    let up = medledger(home)
        .args(["network", "up"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", text(&up));
}

/// Sends SIGKILL to process `pid` and waits until it is gone (or a zombie): a dying process
/// still shows in /proc for a moment, and `network up` would take it for a running node.
pub fn kill_and_wait(pid: i32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
    };
    let start = Instant::now();
    while !gone() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "process {pid} still there 30 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

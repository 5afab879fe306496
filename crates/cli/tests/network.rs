//! A four-organisation network as separate processes on loopback, as a user runs it:
//! `network init`, `network up`, transactions through `ledger submit`, every node agreeing on
//! the state root, a node killed with SIGKILL and restarted catching up, `network down`.

mod common;
use common::{medledger, text};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn status(home: &Path, api: &str) -> Option<Value> {
    let o = medledger(home)
        .args(["ledger", "status", "--node", api])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

/// Stops the network even when an assertion fails.
struct Network<'a>(&'a Path, std::path::PathBuf);
impl Drop for Network<'_> {
    fn drop(&mut self) {
        let _ = medledger(self.0)
            .args(["network", "down"])
            .arg(&self.1)
            .output();
    }
}

#[test]
fn four_processes_agree_survive_a_kill_and_catch_up() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dir = home.join("net");
    let base = 20_000 + (std::process::id() % 2_000) as u16 * 4;
    let init = medledger(home)
        .args([
            "network",
            "init",
            "--orgs",
            "hospital-a,hospital-b,research,patients",
            "--out",
        ])
        .arg(&dir)
        .args(["--base-port", &base.to_string()])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init));
    // Fewer than four organisations cannot tolerate a fault: refused.
    let small = medledger(home)
        .args(["network", "init", "--orgs", "a,b,c", "--out"])
        .arg(home.join("small"))
        .output()
        .unwrap();
    assert!(!small.status.success());
    assert!(
        String::from_utf8_lossy(&small.stderr).contains("at least 4"),
        "{}",
        text(&small)
    );

    let up = medledger(home)
        .args(["network", "up"])
        .arg(&dir)
        .output()
        .unwrap();
    let _guard = Network(home, dir.clone());
    assert!(up.status.success(), "{}", text(&up));
    let apis: Vec<String> = (0..4)
        .map(|i| format!("http://127.0.0.1:{}", base + 100 + i))
        .collect();

    let submit = |api: &str, key: &str, member: u8| {
        let op = format!(
            r#"{{"op":"add-member","key":"{}","roles":["clinician"]}}"#,
            format!("{member:02x}").repeat(32)
        );
        medledger(home)
            .args(["ledger", "submit", "--node", api, "--key-file"])
            .arg(dir.join(key).join("admin.key"))
            .arg(&op)
            .output()
            .unwrap()
    };
    for (i, org) in ["hospital-a", "hospital-b", "research", "patients"]
        .iter()
        .enumerate()
    {
        let o = submit(&apis[i], org, 10 + i as u8);
        assert!(o.status.success(), "{}", text(&o));
    }
    // A replay of a member's key by another organisation's admin is refused by the contracts.
    let o = submit(&apis[1], "hospital-b", 10);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already a member"),
        "{}",
        text(&o)
    );

    let agree = || -> bool {
        let roots: Vec<Option<String>> = apis
            .iter()
            .map(|a| {
                status(home, a).map(|v| v["state_root"].as_str().unwrap_or_default().to_string())
            })
            .collect();
        roots.iter().all(|r| r.is_some() && r == &roots[0])
    };
    let wait_agree = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !agree() {
            assert!(
                Instant::now() < deadline,
                "nodes do not agree on the state root: {what}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    wait_agree("after the first transactions");

    // SIGKILL one node; the other three go on; restarted, it replays its log and catches up.
    let pid: i32 = std::fs::read_to_string(dir.join("research/node.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let o = submit(&apis[0], "hospital-a", 20);
    assert!(
        o.status.success(),
        "three of four keep finalising: {}",
        text(&o)
    );
    let up = medledger(home)
        .args(["network", "up"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", text(&up));
    wait_agree("after the restart");
    let h = |i: usize| status(home, &apis[i]).unwrap()["height"].as_u64().unwrap();
    assert!(h(2) > 0);

    let down = medledger(home)
        .args(["network", "down"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        status(home, &apis[0]).is_none(),
        "stopped nodes answer no more"
    );
}

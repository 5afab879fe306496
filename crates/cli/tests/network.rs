//! A four-organisation network as separate processes on loopback, as a user runs it:
//! `network init`, `network up`, members issued certificates by their organisation's CA and
//! registered through `ledger add-member`, queries and history, every node agreeing on
//! the state root, a node killed with SIGKILL and restarted catching up, `network down`.

mod common;
use common::{kill_and_wait, medledger, network_up, text};

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

    let _guard = Network(home, dir.clone());
    network_up(home, &dir);
    let apis: Vec<String> = (0..4)
        .map(|i| format!("http://127.0.0.1:{}", base + 100 + i))
        .collect();

    // The API over HTTPS, with the network's P-256 authority (which browsers accept), as an
    // ordinary client (curl) sees it: trusted with the network's CA, refused without.
    let https = format!("https://localhost:{}", base + 400);
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(args)
            .output()
            .unwrap()
    };
    let ca = dir.join("https-ca.pem");
    let ca = ca.to_str().unwrap();
    let mut answered = None;
    let started = Instant::now();
    while answered.is_none() && started.elapsed() < Duration::from_secs(60) {
        let o = curl(&["--fail", "--cacert", ca, &format!("{https}/api/status")]);
        if o.status.success() {
            answered = Some(o);
        } else {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let o = answered.expect("the API answers over HTTPS");
    let st: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["org"], "hospital-a", "{st}");
    // DICOMweb too: no study yet, so 204 No Content, as QIDO-RS answers an empty search.
    let o = curl(&[
        "--fail",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        ca,
        &format!("{https}/dicom-web/studies"),
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "204", "{}", text(&o));
    // Without the network's CA the certificate is not trusted (curl exit 60).
    let o = curl(&[&format!("{https}/api/status")]);
    assert_eq!(o.status.code(), Some(60), "{}", text(&o));
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let o = curl(&[
        "--fail",
        &format!("http://127.0.0.1:{}/api/status", base + 400),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join("hospital-a").join("https.pem"))
        .output()
        .unwrap();
    let cert = String::from_utf8_lossy(&o.stdout);
    assert!(cert.contains("prime256v1"), "{cert}");
    assert!(
        cert.contains("DNS:localhost") && cert.contains("IP Address:127.0.0.1"),
        "{cert}"
    );

    // A member certificate issued by the organisation's CA, then registered by its admin.
    let issue = |org: &str, member: u8| {
        let out = home.join(format!("{org}-member-{member}"));
        let o = medledger(home)
            .args(["identity", "issue", "--ca"])
            .arg(dir.join(org))
            .args([
                "--name",
                &format!("Dr {member}"),
                "--roles",
                "clinician",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        out.with_extension("pem")
    };
    let add = |api: &str, admin_org: &str, cert: &Path| {
        medledger(home)
            .args(["ledger", "add-member", "--node", api, "--key-file"])
            .arg(dir.join(admin_org).join("admin.key"))
            .arg("--cert")
            .arg(cert)
            .output()
            .unwrap()
    };
    let submit = |api: &str, org: &str, member: u8| add(api, org, &issue(org, member));
    // `identity show` reads the certificate back and checks it chains to the CA.
    let cert = issue("hospital-a", 9);
    let o = medledger(home)
        .args(["identity", "show"])
        .arg(&cert)
        .arg("--ca")
        .arg(dir.join("hospital-a").join("ca.pem"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["org"], "hospital-a");
    assert_eq!(shown["roles"][0], "clinician");
    let o = medledger(home)
        .args(["identity", "show"])
        .arg(&cert)
        .arg("--ca")
        .arg(dir.join("hospital-b").join("ca.pem"))
        .output()
        .unwrap();
    assert!(!o.status.success(), "hospital-b's CA did not issue it");
    // The certificates are standard X.509: OpenSSL verifies the chain, and refuses it against
    // another organisation's CA.
    let openssl_verify = |ca_org: &str| {
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(dir.join(ca_org).join("ca.pem"))
            .arg(&cert)
            .output()
            .expect("openssl (scripts/test installs it)")
    };
    let o = openssl_verify("hospital-a");
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("OK"));
    assert!(!openssl_verify("hospital-b").status.success());

    for (i, org) in ["hospital-a", "hospital-b", "research", "patients"]
        .iter()
        .enumerate()
    {
        let o = submit(&apis[i], org, 10 + i as u8);
        assert!(o.status.success(), "{}", text(&o));
    }
    // hospital-b's admin cannot register a certificate hospital-a's CA issued: the contracts
    // refuse it, and the refusal says why.
    let o = add(&apis[1], "hospital-b", &cert);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not issued by"),
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
            if Instant::now() > deadline {
                let statuses: Vec<Option<Value>> = apis.iter().map(|a| status(home, a)).collect();
                let logs: Vec<String> = ["hospital-a", "hospital-b", "research", "patients"]
                    .iter()
                    .map(|o| {
                        let log = std::fs::read_to_string(dir.join(o).join("node.log"))
                            .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(30).collect();
                        format!(
                            "--- {o}\n{}",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!(
                    "nodes do not agree on the state root: {what}\n{statuses:#?}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    wait_agree("after the first transactions");

    // The member list, paged, and the history of blocks with their receipts.
    let o = medledger(home)
        .args([
            "ledger", "query", "--node", &apis[2], "member/", "--limit", "5",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let page: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(page["entries"].as_array().unwrap().len(), 5);
    assert!(
        page["next"].is_string(),
        "4 admins + 4 nodes + 4 members: more than a page"
    );
    let o = medledger(home)
        .args(["ledger", "history", "--node", &apis[3], "--non-empty"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let history: Value = serde_json::from_slice(&o.stdout).unwrap();
    let receipts: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["txs"].as_array().unwrap())
        .collect();
    assert_eq!(
        receipts.len(),
        5,
        "four members added, one refusal: {history}"
    );
    assert_eq!(
        receipts.iter().filter(|r| r["error"].is_object()).count(),
        1
    );
    let o = medledger(home)
        .args(["ledger", "prove", "--node", &apis[1], "org/research"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("proof verified"));

    // SIGKILL one node; the other three go on; restarted, it replays its log and catches up.
    let pid: i32 = std::fs::read_to_string(dir.join("research/node.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill_and_wait(pid);
    let o = submit(&apis[0], "hospital-a", 20);
    assert!(
        o.status.success(),
        "three of four keep finalising: {}",
        text(&o)
    );
    network_up(home, &dir);
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

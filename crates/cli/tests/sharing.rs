//! Sharing across organisations over real node processes: the demo's whole story, and each
//! way a retrieval must fail (no consent, revoked, expired, wrong organisation, forged
//! certificate, replay, tampered object, a node down mid-transfer), each with its refusal
//! and its audit entry; delegation once to a third organisation.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use common::{get_json, http, medledger, network_up, post_json, text, wait_for};
use medledger_crypto::{Digest, SigningKey};
use medledger_imaging::share::{Orgs, tls};
use medledger_ledger::identity::OrgCa;
use medledger_ledger::{
    AuditEvent, Grant, Op, OrgClass, Purpose, Recipient, Role, Study, Target, Tx,
};
use medledger_node::Client;
use serde_json::{Value, json};

const A: &str = "hospital-a";
const B: &str = "hospital-b";
const RESEARCH: &str = "research";
const AGENT: &str = "patients";
const FINAL: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A running four-organisation network with the chest CT stored and registered at A.
struct World {
    _net: common::Network,
    dir: std::path::PathBuf,
    base: u16,
    /// The original and the derivative on the ledger.
    original: Study,
    derivative: Study,
    patient: String,
    home: tempfile::TempDir,
}

impl World {
    fn api(&self, org: &str) -> String {
        let i = [A, B, RESEARCH, AGENT]
            .iter()
            .position(|o| *o == org)
            .unwrap();
        format!("http://127.0.0.1:{}", self.base + 100 + i as u16)
    }

    fn share_addr(&self, org: &str) -> String {
        let i = [A, B, RESEARCH, AGENT]
            .iter()
            .position(|o| *o == org)
            .unwrap();
        format!("127.0.0.1:{}", self.base + 300 + i as u16)
    }

    fn client(&self, org: &str) -> Client {
        Client::new(&self.api(org))
    }

    fn key(&self, org: &str, name: &str) -> SigningKey {
        SigningKey::from_text(&std::fs::read_to_string(self.dir.join(org).join(name)).unwrap())
            .unwrap()
    }

    fn config(&self, org: &str) -> PathBuf {
        self.dir.join(org).join("node.json")
    }

    /// A signing key as a file, for the binary's `--key-file`.
    fn key_file(&self, name: &str, key: &SigningKey) -> PathBuf {
        let path = self.home.path().join(name);
        std::fs::write(&path, key.to_text()).unwrap();
        path
    }

    /// A new member of `org`, registered by its admin.
    fn member(&self, org: &str, roles: &[Role], pseudonym: Option<&str>) -> SigningKey {
        let d = self.dir.join(org);
        let ca = OrgCa::from_parts(
            self.key(org, "ca.key"),
            &std::fs::read_to_string(d.join("ca.pem")).unwrap(),
        )
        .unwrap();
        let key = SigningKey::generate();
        let now = now_ms();
        let cert = ca
            .issue(
                &key.verifying_key(),
                "test member",
                roles,
                pseudonym,
                &[],
                (now - 60_000, now + 86_400_000),
            )
            .unwrap();
        self.client(org)
            .execute(
                &self.key(org, "admin.key"),
                Op::AddMember {
                    certificate: cert.to_pem(),
                },
                FINAL,
            )
            .unwrap();
        key
    }

    fn audit(&self) -> Vec<AuditEvent> {
        self.client(A).audit().unwrap()
    }

    /// Waits for an audit event that `matches`.
    fn audit_entry(&self, what: &str, matches: impl Fn(&AuditEvent) -> bool) -> AuditEvent {
        let mut found = None;
        wait_for(what, FINAL, || {
            found = self.audit().into_iter().find(|e| matches(e));
            found.is_some()
        });
        found.unwrap()
    }

    fn grants(&self) -> Vec<Grant> {
        let page = self.client(A).query("grant/", None, 10_000).unwrap();
        page.entries
            .into_iter()
            .filter_map(|e| serde_json::from_value::<Grant>(e.value).ok())
            .collect()
    }

    fn grants_of(&self, request: &str) -> Vec<Grant> {
        self.grants()
            .into_iter()
            .filter(|g| g.request == request)
            .collect()
    }

    /// Grant `id` as A's node reads it, once it is final there.
    fn grant(&self, id: &str) -> Grant {
        let mut g = None;
        wait_for("the grant at A", FINAL, || {
            g = self
                .client(A)
                .value::<Grant>(&format!("grant/{id}"))
                .unwrap();
            g.is_some()
        });
        g.unwrap()
    }

    fn wait_grant(&self, request: &str) -> Grant {
        let mut g = None;
        wait_for("a grant", FINAL, || {
            g = self.grants_of(request).into_iter().next();
            g.is_some()
        });
        g.unwrap()
    }

    /// The retrieval of `grant` at `org`'s node, once it ended.
    fn retrieval(&self, org: &str, grant: &str) -> Value {
        let mut out = Value::Null;
        wait_for("the retrieval to end", FINAL, || {
            let (_, list) = get_json(&format!("{}/api/retrievals", self.api(org)));
            out = list
                .as_array()
                .and_then(|a| a.iter().find(|r| r["grant"] == grant).cloned())
                .unwrap_or(Value::Null);
            out["state"] == "done" || out["state"] == "failed"
        });
        out
    }

    fn request(&self, org: &str, key: &SigningKey, target: Target, purpose: Purpose) -> String {
        self.client(org)
            .execute(
                key,
                Op::RequestAccess {
                    target,
                    purpose,
                    break_glass: false,
                },
                FINAL,
            )
            .unwrap()
            .receipt
            .created
            .unwrap()
    }

    fn consent(
        &self,
        patient: &SigningKey,
        purpose: Purpose,
        to: Recipient,
        expires_ms: Option<u64>,
    ) -> String {
        self.client(AGENT)
            .execute(
                patient,
                Op::GrantConsent {
                    patient: self.patient.clone(),
                    purpose,
                    recipient: to,
                    expires_ms,
                },
                FINAL,
            )
            .unwrap()
            .receipt
            .created
            .unwrap()
    }

    /// A TLS client presenting `cert_pem` and `key`, expecting hospital A's node.
    fn tls_client(&self, cert_pem: &str, key: &SigningKey) -> reqwest::blocking::Client {
        let orgs = Arc::new(Orgs::default());
        orgs.refresh(&self.client(A)).unwrap();
        let config = tls::client_config(cert_pem, key, orgs, A).unwrap();
        reqwest::blocking::Client::builder()
            .use_preconfigured_tls(config)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    fn node_client(&self, org: &str) -> reqwest::blocking::Client {
        let pem = std::fs::read_to_string(self.dir.join(org).join("node.pem")).unwrap();
        self.tls_client(&pem, &self.key(org, "node.key"))
    }

    /// SIGKILLs process `pid` once `org`'s retrieval of `grant` has verified 8 objects.
    fn kill_mid_transfer(&self, org: &str, grant: &str, pid: i32) {
        for _ in 0..20_000 {
            let (_, list) = get_json(&format!("{}/api/retrievals", self.api(org)));
            let r = list.as_array().and_then(|a| {
                a.iter()
                    .find(|r| r["grant"] == grant && r["state"] == "running")
                    .cloned()
            });
            if r.and_then(|r| r["progress"][0].as_u64())
                .is_some_and(|n| n >= 8)
            {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the transfer was not caught in progress");
    }

    fn pid(&self, org: &str) -> i32 {
        std::fs::read_to_string(self.dir.join(org).join("node.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn wait_healthy(&self, org: &str) {
        let api = self.api(org);
        wait_for("the node to be ready", FINAL, || {
            http()
                .get(format!("{api}/health"))
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
    }

    /// Restarts `org`'s node with automatic sharing off: it grants and fetches nothing by
    /// itself (and still serves what is granted).
    fn restart_without_auto_share(&self, org: &str) {
        self.restart_with(org, |c| c["imaging"]["auto_share"] = false.into());
    }

    /// Restarts `org`'s node after `change` to its configuration.
    fn restart_with(&self, org: &str, change: impl Fn(&mut Value)) {
        let cfg_path = self.config(org);
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        change(&mut cfg);
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let pid = self.pid(org);
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        wait_for("the node to stop", FINAL, || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
        network_up(self.home.path(), &self.dir);
        self.wait_healthy(org);
        wait_for("the sharing endpoint", FINAL, || {
            std::net::TcpStream::connect(self.share_addr(org)).is_ok()
        });
    }

    /// Slows hospital A's serving to 15 MB/s, so that a transfer can be cut in the middle.
    fn slow_owner(&self) {
        self.restart_with(A, |c| c["imaging"]["share_limit_mb_s"] = 15.into());
    }

    /// `medledger share delegate` run on `org`'s node configuration.
    fn delegate(&self, org: &str, key_file: &Path, grant: &str, to_org: &str) -> Output {
        medledger(self.home.path())
            .args(["share", "delegate", "--config"])
            .arg(self.config(org))
            .arg("--key-file")
            .arg(key_file)
            .args(["--grant", grant, "--to-org", to_org])
            .output()
            .unwrap()
    }
}

/// Starts the network (`auto_b`: whether hospital B's node grants and fetches by itself) and
/// stores the chest CT at hospital A.
fn world(port_start: u16, auto_b: bool) -> World {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("net");
    let base = common::free_base(port_start + (std::process::id() % 500) as u16 * 4);
    let (net, api_a) = common::network(home.path(), &dir, base, json!([]));
    let import = medledger(home.path())
        .arg("import")
        .args(common::chest_ct())
        .args(["--node", &api_a])
        .output()
        .unwrap();
    assert!(import.status.success(), "{}", text(&import));
    let client = Client::new(&api_a);
    let mut studies = Vec::new();
    wait_for("registration", FINAL, || {
        studies = client.studies().unwrap();
        studies
            .iter()
            .any(|s| s.instances == 64 && s.is_derivative())
            && studies
                .iter()
                .any(|s| s.instances == 64 && !s.is_derivative())
    });
    let original = studies
        .iter()
        .find(|s| s.instances == 64 && !s.is_derivative())
        .unwrap()
        .clone();
    let derivative = studies
        .iter()
        .find(|s| s.instances == 64 && s.is_derivative())
        .unwrap()
        .clone();
    let patient = original.patient.clone();
    let w = World {
        _net: net,
        dir,
        base,
        original,
        derivative,
        patient,
        home,
    };
    for org in [B, RESEARCH] {
        w.wait_healthy(org);
    }
    if !auto_b {
        w.restart_without_auto_share(B);
    }
    w
}

#[test]
fn every_refusal_is_explained_and_audited() {
    let w = world(46_000, true);
    let patient = w.member(AGENT, &[Role::Patient], Some(&w.patient));
    let dr_b = w.member(B, &[Role::Clinician], None);
    let researcher = w.member(RESEARCH, &[Role::Researcher], None);
    let b = w.client(B);

    // No consent: B's request is not granted, and A's admin cannot grant it either.
    let req = w.request(B, &dr_b, Target::Study(w.original.root), Purpose::Care);
    std::thread::sleep(Duration::from_secs(2));
    assert!(w.grants_of(&req).is_empty(), "granted without consent");
    let refused = w.client(A).execute(
        &w.key(A, "admin.key"),
        Op::GrantAccess {
            request: req.clone(),
            study: w.original.root,
            envelope: "{}".into(),
            expires_ms: None,
            delegable: false,
        },
        FINAL,
    );
    let e = refused.unwrap_err().to_string();
    assert!(e.contains("no consent"), "{e}");

    // Consent for a few seconds: the grant follows it, B receives the study, verified.
    let expiry = now_ms() + 6_000;
    w.consent(
        &patient,
        Purpose::Care,
        Recipient::Org(B.into()),
        Some(expiry),
    );
    let req = w.request(B, &dr_b, Target::Patient(w.patient.clone()), Purpose::Care);
    let grant = w.wait_grant(&req);
    assert_eq!(
        grant.expires_ms,
        Some(expiry),
        "a grant on consent lasts as long as it"
    );
    let r = w.retrieval(B, &grant.id);
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["outcome"]["root"], w.original.root.to_hex());
    assert_eq!(r["outcome"]["instances"], 64);
    let first = w.audit_entry("the retrieval's audit event", |e| {
        e.grant == grant.id && e.refused.is_none()
    });
    assert_eq!(
        (first.server_org.as_str(), first.receiver_org.as_str()),
        (A, B)
    );
    assert_eq!(first.objects, 128);
    // B's node now answers for the study (originals: its clinicians only).
    let token = medledger_imaging::access::issue_token(&dr_b, B, Duration::from_secs(600));
    let seen: Value = http()
        .get(format!("{}/dicom-web/studies", w.api(B)))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(seen.as_array().map(Vec::len), Some(1), "{seen}");

    // Replays: the same signed transaction again, and a receipt of a finished transfer.
    let chain = b.chain().unwrap();
    let nonce = b.next_nonce(&dr_b.verifying_key()).unwrap();
    let tx = Tx::sign(
        &chain,
        &dr_b,
        nonce,
        Op::RequestAccess {
            target: Target::Study(w.original.root),
            purpose: Purpose::Care,
            break_glass: false,
        },
    );
    b.wait(&b.submit_tx(&tx).unwrap(), FINAL).unwrap();
    let replay = b.submit_tx(&tx).unwrap_err().to_string();
    assert!(replay.contains("replay"), "{replay}");
    let node_b = w.node_client(B);
    let base_a = format!("https://{}", w.share_addr(A));
    let session: Value = node_b
        .post(format!("{base_a}/share/v1/grants/{}/sessions", grant.id))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let session = session["session"].as_str().unwrap().to_string();
    let statement = medledger_ledger::retrieval_statement(&grant.id, &session, 1, 1);
    let receipt = json!({
        "objects": 1, "bytes": 1,
        "signature": hex::encode(w.key(B, "node.key").sign(&statement).0),
    });
    let url = format!("{base_a}/share/v1/sessions/{session}/receipt");
    let ok = node_b.post(&url).body(receipt.to_string()).send().unwrap();
    assert!(ok.status().is_success());
    let again = node_b.post(&url).body(receipt.to_string()).send().unwrap();
    assert_eq!(
        again.status().as_u16(),
        404,
        "a replayed receipt is refused"
    );
    let count = |s: &str| {
        w.audit()
            .iter()
            .filter(|e| e.grant == s && e.refused.is_none())
            .count()
    };
    assert_eq!(
        count(&grant.id),
        2,
        "one event per transfer, none for the replay"
    );

    // A requester whose ledger is ahead: A waits for its own to catch up (it applies blocks
    // on its own), then says why it cannot answer yet, without refusing or recording.
    // Far ahead (a made-up height): answered at once.
    let sessions = format!("{base_a}/share/v1/grants/{}/sessions", grant.id);
    let height_a = || w.client(A).ledger_height().unwrap();
    let behind = |r: reqwest::blocking::Response| {
        assert_eq!(r.status().as_u16(), 503);
        let why: Value = r.json().unwrap();
        assert!(
            why["error"]
                .as_str()
                .unwrap()
                .contains("behind the requester's"),
            "{why}"
        );
    };
    let t = std::time::Instant::now();
    behind(
        node_b
            .post(format!("{sessions}?height={}", u64::MAX / 2))
            .send()
            .unwrap(),
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Ahead by more than an idle network makes in the wait (two blocks a second): A waits,
    // then answers.
    let t = std::time::Instant::now();
    behind(
        node_b
            .post(format!("{sessions}?height={}", height_a() + 50))
            .send()
            .unwrap(),
    );
    assert!(t.elapsed() >= Duration::from_secs(4), "{:?}", t.elapsed());
    let reached = height_a();
    let caught_up = node_b
        .post(format!("{sessions}?height={reached}"))
        .send()
        .unwrap();
    assert!(caught_up.status().is_success(), "{}", caught_up.status());
    assert_eq!(count(&grant.id), 2, "a session alone records nothing");

    // Wrong organisation: the research node presents B's grant to A.
    let node_r = w.node_client(RESEARCH);
    let wrong = node_r
        .post(format!("{base_a}/share/v1/grants/{}/sessions", grant.id))
        .send()
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 403);
    let why: Value = wrong.json().unwrap();
    assert!(
        why["error"]
            .as_str()
            .unwrap()
            .contains("is not for research"),
        "{why}"
    );
    w.audit_entry("the wrong organisation's refusal", |e| {
        e.grant == grant.id && e.receiver_org == RESEARCH && e.refused.is_some()
    });

    // A forged certificate: a CA that calls itself hospital-b, not the one on the ledger.
    let forger = OrgCa::new(B, SigningKey::generate(), (0, now_ms() + 86_400_000)).unwrap();
    let fake_key = SigningKey::generate();
    let fake = forger
        .issue(
            &fake_key.verifying_key(),
            "hospital-b node",
            &[Role::Node],
            None,
            &[],
            (0, now_ms() + 86_400_000),
        )
        .unwrap();
    let forged = w
        .tls_client(&fake.to_pem(), &fake_key)
        .post(format!("{base_a}/share/v1/grants/{}/sessions", grant.id))
        .send();
    assert!(
        forged.is_err(),
        "a forged certificate got an answer: {forged:?}"
    );
    let e = w.audit_entry("the forged certificate's refusal", |e| {
        e.refused
            .as_deref()
            .is_some_and(|r| r.contains("TLS handshake refused"))
    });
    assert_eq!(e.receiver_org, B);
    assert_eq!(e.study, Digest::default());

    // Expired: the consent, and the grant made on it, run out.
    wait_for("the consent to expire", FINAL, || now_ms() > expiry + 1_000);
    let (code, body) = post_json(
        &format!("{}/api/retrievals", w.api(B)),
        &json!({ "grant": grant.id }),
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    w.audit_entry("the expiry's refusal", |e| {
        e.grant == grant.id && e.refused.as_deref().is_some_and(|r| r.contains("expired"))
    });

    // Consent again, then withdrawn: no consent.
    let consent = w.consent(
        &patient,
        Purpose::Care,
        Recipient::Class(OrgClass::Hospital),
        None,
    );
    let req = w.request(B, &dr_b, Target::Study(w.original.root), Purpose::Care);
    let grant2 = w.wait_grant(&req);
    assert_eq!(grant2.expires_ms, None);
    let r = w.retrieval(B, &grant2.id);
    assert_eq!(r["state"], "done", "{r}");
    // Everything was here already: nothing is transferred again.
    assert_eq!(r["outcome"]["fetched_objects"], 0, "{r}");
    assert_eq!(r["outcome"]["resumed_objects"], 128, "{r}");
    w.client(AGENT)
        .execute(&patient, Op::RevokeConsent { consent }, FINAL)
        .unwrap();
    let (code, body) = post_json(
        &format!("{}/api/retrievals", w.api(B)),
        &json!({ "grant": grant2.id }),
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no consent"),
        "{body}"
    );
    w.audit_entry("the withdrawn consent's refusal", |e| {
        e.grant == grant2.id
            && e.refused
                .as_deref()
                .is_some_and(|r| r.contains("no consent"))
    });

    // Revoked: a break-glass grant (no consent needed), revoked by A's admin.
    let bg = b
        .execute(
            &dr_b,
            Op::RequestAccess {
                target: Target::Study(w.original.root),
                purpose: Purpose::Care,
                break_glass: true,
            },
            FINAL,
        )
        .unwrap()
        .receipt
        .created
        .unwrap();
    let grant3 = w.wait_grant(&bg);
    assert!(grant3.break_glass);
    assert_eq!(w.retrieval(B, &grant3.id)["state"], "done");
    let flagged = w.audit_entry("the break-glass retrieval", |e| e.grant == grant3.id);
    assert!(
        flagged.break_glass,
        "break-glass is flagged in the audit trail"
    );
    w.client(A)
        .execute(
            &w.key(A, "admin.key"),
            Op::RevokeAccess {
                grant: grant3.id.clone(),
            },
            FINAL,
        )
        .unwrap();
    let (code, body) = post_json(
        &format!("{}/api/retrievals", w.api(B)),
        &json!({ "grant": grant3.id }),
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    w.audit_entry("the revocation's refusal", |e| {
        e.grant == grant3.id && e.refused.as_deref().is_some_and(|r| r.contains("revoked"))
    });

    // Tampered: a bit flips in A's store; the research node refuses the data.
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(w.dir.join(A).join("node.json")).unwrap()).unwrap();
    let store_dir = cfg["imaging"]["store"].as_str().unwrap().to_string();
    let store = medledger_store::Store::open(&store_dir).unwrap();
    let owner = medledger_crypto::SecretKey::from_text(
        &std::fs::read_to_string(w.dir.join(A).join("store.key")).unwrap(),
    )
    .unwrap();
    let (_, manifest) = store.open_manifest(&w.derivative.root, &owner).unwrap();
    let header = manifest
        .instances()
        .nth(10)
        .unwrap()
        .1
        .header
        .address
        .to_hex();
    medledger_store::FsBackend::open_existing(&store_dir)
        .unwrap()
        .locate(&format!("objects/{header}"))
        .unwrap()
        .expect("the header object is stored")
        .flip_bit(40)
        .unwrap();
    w.consent(
        &patient,
        Purpose::Research,
        Recipient::Org(RESEARCH.into()),
        None,
    );
    let req = w.request(
        RESEARCH,
        &researcher,
        Target::Patient(w.patient.clone()),
        Purpose::Research,
    );
    let grant4 = w.wait_grant(&req);
    assert_eq!(
        grant4.study, w.derivative.root,
        "research gets the derivative only"
    );
    let r = w.retrieval(RESEARCH, &grant4.id);
    assert_eq!(r["state"], "failed", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("verification failed") && error.contains(&header),
        "{error}"
    );
    let e = w.audit_entry("the tampering's refusal", |e| {
        e.grant == grant4.id && e.refused.is_some()
    });
    assert_eq!(e.recorded_by, RESEARCH);
    // Nothing of the tampered study is shown at the research node.
    let (_, shown) = get_json(&format!("{}/dicom-web/studies", w.api(RESEARCH)));
    assert_eq!(shown.as_array().map_or(0, Vec::len), 0, "{shown}");

    // The patient's view lists the grants and every retrieval and refusal of their studies.
    let view = w.client(AGENT).patient_view(&w.patient).unwrap();
    assert!(view["grants"].as_array().unwrap().len() >= 4, "{view}");
    let audit = view["audit"].as_array().unwrap();
    assert!(audit.iter().any(|e| e["refused"].is_null()));
    assert!(
        audit.iter().filter(|e| !e["refused"].is_null()).count() >= 4,
        "{view}"
    );
}

#[test]
fn a_node_down_mid_transfer_resumes_and_one_series_is_proven_alone() {
    let w = world(48_000, false);
    w.slow_owner();
    let patient = w.member(AGENT, &[Role::Patient], Some(&w.patient));
    let dr_b = w.member(B, &[Role::Clinician], None);
    w.consent(&patient, Purpose::Care, Recipient::Org(B.into()), None);
    let req = w.request(B, &dr_b, Target::Study(w.original.root), Purpose::Care);
    let grant = w.wait_grant(&req);
    let fetch = |body: Value| post_json(&format!("{}/api/retrievals", w.api(B)), &body);

    // One series alone, verified with its Merkle proof against the registered root.
    let store_dir: Value =
        serde_json::from_slice(&std::fs::read(w.dir.join(A).join("node.json")).unwrap()).unwrap();
    let store =
        medledger_store::Store::open(store_dir["imaging"]["store"].as_str().unwrap()).unwrap();
    let owner = medledger_crypto::SecretKey::from_text(
        &std::fs::read_to_string(w.dir.join(A).join("store.key")).unwrap(),
    )
    .unwrap();
    let (_, manifest) = store.open_manifest(&w.original.root, &owner).unwrap();
    let uid = manifest.series[0].series_uid.clone();
    let (code, part) = fetch(json!({ "grant": grant.id, "series": uid }));
    assert_eq!(code, 200, "{part}");
    assert_eq!(part["series"], uid);
    assert_eq!(part["instances"], 64);
    // The study has this one series: the part proven alone is the whole, with the same root.
    assert_eq!(part["stored_root"], part["root"]);
    let (code, bogus) = fetch(json!({ "grant": grant.id, "series": "1.2.3.4" }));
    assert_eq!(code, 403, "{bogus}");

    // Remove what the part brought, then kill A during the whole study's transfer.
    let b_cfg: Value =
        serde_json::from_slice(&std::fs::read(w.dir.join(B).join("node.json")).unwrap()).unwrap();
    let b_store = b_cfg["imaging"]["store"].as_str().unwrap().to_string();
    let brought: Vec<String> = manifest
        .instances()
        .flat_map(|(_, i)| i.objects())
        .map(|o| format!("objects/{}", o.address.to_hex()))
        .collect();
    medledger_store::Backend::delete_many(
        &medledger_store::FsBackend::open_existing(&b_store).unwrap(),
        &brought,
    )
    .unwrap();
    let pid_a = w.pid(A);
    let api_b = w.api(B);
    let g = grant.id.clone();
    let running = std::thread::spawn(move || {
        post_json(&format!("{api_b}/api/retrievals"), &json!({ "grant": g }))
    });
    w.kill_mid_transfer(B, &grant.id, pid_a);
    let (code, failed) = running.join().unwrap();
    assert_eq!(code, 503, "{failed}");
    let msg = failed["error"].as_str().unwrap();
    assert!(
        msg.contains("interrupted") && msg.contains("resume"),
        "{msg}"
    );

    // A comes back; the retrieval resumes from what was verified and stored.
    let home = w.dir.parent().unwrap();
    network_up(home, &w.dir);
    wait_for("A's sharing endpoint", FINAL, || {
        std::net::TcpStream::connect(w.share_addr(A)).is_ok()
            && http()
                .get(format!("{}/health", w.api(A)))
                .send()
                .is_ok_and(|r| r.status().is_success())
    });
    let mut resumed = Value::Null;
    wait_for("the resumed retrieval", FINAL, || {
        let (code, r) = fetch(json!({ "grant": grant.id }));
        resumed = r;
        code == 200
    });
    let n = |k: &str| resumed[k].as_u64().unwrap();
    assert!(n("resumed_objects") >= 8, "{resumed}");
    assert!(n("fetched_objects") >= 1, "{resumed}");
    assert_eq!(
        n("resumed_objects") + n("fetched_objects"),
        128,
        "{resumed}"
    );
    assert_eq!(resumed["root"], w.original.root.to_hex());
    // The study reads back whole at B, every object verified.
    let token = medledger_imaging::access::issue_token(&dr_b, B, Duration::from_secs(600));
    let (_, studies) = {
        let r = http()
            .get(format!("{}/dicom-web/studies", w.api(B)))
            .bearer_auth(&token)
            .send()
            .unwrap();
        (r.status(), r.json::<Value>().unwrap())
    };
    let uid = common::attr(&studies[0], "0020000D");
    let r = http()
        .get(format!(
            "{}/dicom-web/studies/{}",
            w.api(B),
            uid.as_str().unwrap()
        ))
        .bearer_auth(&token)
        .header("Accept", "multipart/related; type=\"application/dicom\"")
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert!(r.bytes().unwrap().len() > 33_000_000);
}

#[test]
fn an_interrupted_retrieval_resumes_by_itself_when_the_owner_is_back() {
    let w = world(56_000, true);
    w.slow_owner();
    let patient = w.member(AGENT, &[Role::Patient], Some(&w.patient));
    let dr_b = w.member(B, &[Role::Clinician], None);
    w.consent(&patient, Purpose::Care, Recipient::Org(B.into()), None);
    let pid_a = w.pid(A);
    let req = w.request(B, &dr_b, Target::Study(w.original.root), Purpose::Care);
    let grant = w.wait_grant(&req);
    w.kill_mid_transfer(B, &grant.id, pid_a);
    // B's node marks it interrupted and tries again on its own, backing off.
    let mut status = Value::Null;
    let since = std::time::Instant::now();
    while status["state"] != "interrupted" {
        assert!(since.elapsed() < FINAL, "not interrupted: {status}");
        std::thread::sleep(Duration::from_millis(50));
        let (_, list) = get_json(&format!("{}/api/retrievals", w.api(B)));
        status = list
            .as_array()
            .and_then(|a| a.iter().find(|r| r["grant"] == grant.id).cloned())
            .unwrap_or(Value::Null);
    }
    assert!(status["attempts"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["next_attempt_ms"].as_u64().is_some(), "{status}");
    network_up(w.home.path(), &w.dir);
    let done = w.retrieval(B, &grant.id);
    assert_eq!(done["state"], "done", "{done}");
    let n = |k: &str| done["outcome"][k].as_u64().unwrap();
    assert!(n("resumed_objects") >= 8, "{done}");
    assert_eq!(n("resumed_objects") + n("fetched_objects"), 128, "{done}");
    w.audit_entry("the resumed retrieval's audit event", |e| {
        e.grant == grant.id && e.refused.is_none() && e.objects == 128
    });
}

#[test]
fn demo_tells_the_whole_story() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::free_base(52_000 + (std::process::id() % 500) as u16 * 4);
    let run = medledger(tmp.path())
        .current_dir(tmp.path())
        .args(["demo", "--slices", "8", "--base-port", &base.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", text(&run));
    for needle in [
        "priors on the ledger: 2 at hospital-a",
        "every object verified against the registered root",
        "patient name SMITH^BETTY; without a token: 0",
        "2 derivative stud(ies) received and verified",
        "cannot grant research access to the identified original",
        "refused in",
        "no consent",
        "granted and served under break-glass",
        "verification failed",
        "BREAK-GLASS",
        "REFUSED (recorded by research)",
        "Stopping the network",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    // The network is down afterwards.
    assert!(std::net::TcpStream::connect(("127.0.0.1", base + 100)).is_err());
}

/// The JSON a command printed on stdout.
fn stdout_json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

fn refused_with(o: &Output, needle: &str) {
    assert!(!o.status.success(), "not refused: {}", text(o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains(needle), "missing {needle:?}: {}", text(o));
}

#[test]
fn a_delegable_grant_is_delegated_once_and_the_delegate_retrieves_it() {
    let w = world(54_000, true);
    let root = w.derivative.root;
    let patient = w.member(AGENT, &[Role::Patient], Some(&w.patient));
    let dr_b = w.member(B, &[Role::Clinician], None);
    let researcher = w.member(RESEARCH, &[Role::Researcher], None);
    let dr_b_file = w.key_file("dr-b.key", &dr_b);
    let researcher_file = w.key_file("researcher.key", &researcher);

    // Care by any member organisation: the consent also covers a delegation to research.
    w.consent(&patient, Purpose::Care, Recipient::AnyMember, None);

    // B's request is granted by A's node (not delegable) and fetched by B's node.
    let req1 = w.request(B, &dr_b, Target::Study(root), Purpose::Care);
    let g1 = w.wait_grant(&req1);
    assert_eq!((g1.grantee.as_str(), g1.study), (B, root));
    assert!(!g1.delegable, "an automatic grant is not delegable");
    let r = w.retrieval(B, &g1.id);
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["outcome"]["root"], root.to_hex(), "{r}");

    // It cannot be delegated: neither by the binary nor by the ledger.
    let out = w.delegate(B, &dr_b_file, &g1.id, RESEARCH);
    refused_with(&out, "does not allow delegation");
    let e = w
        .client(B)
        .execute(
            &dr_b,
            Op::Delegate {
                grant: g1.id.clone(),
                to_org: RESEARCH.into(),
                envelope: "{}".into(),
            },
            FINAL,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not allow delegation"), "{e}");
    assert!(
        w.grants().iter().all(|g| g.grantee != RESEARCH),
        "a grant to research appeared"
    );

    // A grants by hand from now on (its node would otherwise grant B's next request first,
    // not delegable): its admin grants a delegable one.
    w.restart_without_auto_share(A);
    let req2 = w.request(B, &dr_b, Target::Study(root), Purpose::Care);
    wait_for("the request at A", FINAL, || {
        w.client(A)
            .value::<Value>(&format!("request/{req2}"))
            .is_ok_and(|r| r.is_some())
    });
    let out = medledger(w.home.path())
        .args(["share", "grant", "--config"])
        .arg(w.config(A))
        .arg("--key-file")
        .arg(w.dir.join(A).join("admin.key"))
        .args(["--request", &req2, "--delegable"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let granted = stdout_json(&out);
    let g2_id = granted["granted"][0]["grant"]
        .as_str()
        .unwrap_or_else(|| panic!("no grant in {granted}"))
        .to_string();
    let g2 = w.grant(&g2_id);
    assert_eq!(
        (g2.grantee.as_str(), g2.study, g2.delegable),
        (B, root, true)
    );
    assert_eq!(w.grants_of(&req2).len(), 1, "one grant for the request");
    let r = w.retrieval(B, &g2.id);
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["outcome"]["root"], root.to_hex(), "{r}");

    // Clear refusals before anything is submitted.
    refused_with(
        &w.delegate(B, &dr_b_file, "0123456789abcdef0123456789abcdef", RESEARCH),
        "no grant 0123456789abcdef0123456789abcdef",
    );
    refused_with(
        &w.delegate(RESEARCH, &researcher_file, &g2.id, B),
        &format!("grant {} is for {B}, not for {RESEARCH}", g2.id),
    );
    refused_with(
        &w.delegate(RESEARCH, &dr_b_file, &g2.id, B),
        &format!("is a member of {B}, not of {RESEARCH}"),
    );
    refused_with(
        &w.delegate(B, &dr_b_file, &g2.id, "nowhere"),
        "no organisation nowhere",
    );
    refused_with(
        &w.delegate(B, &dr_b_file, &g2.id, A),
        &format!("{A} owns study {root}"),
    );

    // B's clinician delegates it to research.
    let out = w.delegate(B, &dr_b_file, &g2.id, RESEARCH);
    assert!(out.status.success(), "{}", text(&out));
    let printed = stdout_json(&out);
    let g3_id = printed["grant"]
        .as_str()
        .unwrap_or_else(|| panic!("no grant in {printed}"))
        .to_string();
    assert_ne!(g3_id, g2.id);
    let g3 = w.grant(&g3_id);
    assert_eq!(g3.grantee, RESEARCH);
    assert_eq!(g3.study, root);
    assert_eq!(g3.purpose, Purpose::Care);
    assert_eq!(g3.request, req2);
    assert_eq!(g3.delegated_from.as_deref(), Some(g2.id.as_str()));
    assert_eq!(g3.expires_ms, g2.expires_ms);
    assert!(!g3.delegable && !g3.break_glass && g3.revoked_at.is_none());
    assert_ne!(g3.envelope, g2.envelope, "the key is wrapped for research");

    // Research's node fetches the study from A under the delegated grant, verified.
    let r = w.retrieval(RESEARCH, &g3.id);
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["outcome"]["root"], root.to_hex(), "{r}");
    assert_eq!(r["outcome"]["owner"], A, "{r}");
    assert_eq!(r["outcome"]["instances"], 64, "{r}");
    let objects = r["outcome"]["objects"].as_u64().unwrap();
    assert!(objects >= 64, "{r}");
    let e = w.audit_entry("the delegate's retrieval", |e| {
        e.grant == g3.id && e.refused.is_none()
    });
    assert_eq!(
        (
            e.server_org.as_str(),
            e.receiver_org.as_str(),
            e.recorded_by.as_str()
        ),
        (A, RESEARCH, A)
    );
    assert_eq!((e.study, u64::from(e.objects)), (root, objects));
    assert!(!e.break_glass);

    // The delegated grant goes no further.
    let out = w.delegate(RESEARCH, &researcher_file, &g3.id, B);
    refused_with(&out, "does not allow delegation");
    let e = w
        .client(RESEARCH)
        .execute(
            &researcher,
            Op::Delegate {
                grant: g3.id.clone(),
                to_org: B.into(),
                envelope: "{}".into(),
            },
            FINAL,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not allow delegation"), "{e}");
    let to_research_or_from_g3: Vec<Grant> = w
        .grants()
        .into_iter()
        .filter(|g| g.grantee == RESEARCH || g.delegated_from.as_deref() == Some(g3.id.as_str()))
        .collect();
    assert_eq!(
        to_research_or_from_g3
            .iter()
            .map(|g| g.id.as_str())
            .collect::<Vec<_>>(),
        vec![g3.id.as_str()]
    );
}

//! Delegation of a grant over real node processes: a grant that does not allow delegation
//! is refused, a delegable one is delegated once by a member of the grantee (`medledger
//! share delegate`, with the study key wrapped from the grantee node's store), the delegate
//! retrieves the study from its owner under the delegated grant, the retrieval is audited,
//! and the delegated grant is not delegated further.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{get_json, http, medledger, text, wait_for};
use medledger_crypto::SigningKey;
use medledger_ledger::identity::OrgCa;
use medledger_ledger::{AuditEvent, Grant, Op, Purpose, Recipient, Role, Study, Target};
use medledger_node::Client;
use serde_json::{Value, json};

const A: &str = "hospital-a";
const B: &str = "hospital-b";
const RESEARCH: &str = "research";
const AGENT: &str = "patients";
const ORGS: [&str; 4] = [A, B, RESEARCH, AGENT];
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
    dir: PathBuf,
    base: u16,
    /// The de-identified derivative on the ledger: what may be delegated to a research
    /// organisation (identified originals go to hospitals only).
    original: Study,
    patient: String,
    home: tempfile::TempDir,
}

impl World {
    fn index(org: &str) -> u16 {
        ORGS.iter().position(|o| *o == org).unwrap() as u16
    }

    fn api(&self, org: &str) -> String {
        format!("http://127.0.0.1:{}", self.base + 100 + Self::index(org))
    }

    fn share_addr(&self, org: &str) -> String {
        format!("127.0.0.1:{}", self.base + 300 + Self::index(org))
    }

    fn client(&self, org: &str) -> Client {
        Client::new(&self.api(org))
    }

    fn config(&self, org: &str) -> PathBuf {
        self.dir.join(org).join("node.json")
    }

    fn key(&self, org: &str, name: &str) -> SigningKey {
        SigningKey::from_text(&std::fs::read_to_string(self.dir.join(org).join(name)).unwrap())
            .unwrap()
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

    /// A signing key as a file, for the binary's `--key-file`.
    fn key_file(&self, name: &str, key: &SigningKey) -> PathBuf {
        let path = self.home.path().join(name);
        std::fs::write(&path, key.to_text()).unwrap();
        path
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

    fn consent(&self, patient: &SigningKey, purpose: Purpose, to: Recipient) -> String {
        self.client(AGENT)
            .execute(
                patient,
                Op::GrantConsent {
                    patient: self.patient.clone(),
                    purpose,
                    recipient: to,
                    expires_ms: None,
                },
                FINAL,
            )
            .unwrap()
            .receipt
            .created
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

    /// Restarts `org`'s node with automatic sharing off: it grants nothing by itself (and
    /// still serves what is granted).
    fn restart_without_auto_share(&self, org: &str) {
        let cfg_path = self.config(org);
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        cfg["imaging"]["auto_share"] = false.into();
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let pid: i32 = std::fs::read_to_string(self.dir.join(org).join("node.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        wait_for("the node to stop", FINAL, || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
        let up = medledger(self.home.path())
            .args(["network", "up"])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(up.status.success(), "{}", text(&up));
        self.wait_healthy(org);
        wait_for("the sharing endpoint", FINAL, || {
            std::net::TcpStream::connect(self.share_addr(org)).is_ok()
        });
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

/// Starts the network and stores the chest CT at hospital A.
fn world(port_start: u16) -> World {
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
    });
    let original = studies
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
        patient,
        home,
    };
    for org in [B, RESEARCH] {
        w.wait_healthy(org);
    }
    w
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
    let w = world(54_000);
    let root = w.original.root;
    let patient = w.member(AGENT, &[Role::Patient], Some(&w.patient));
    let dr_b = w.member(B, &[Role::Clinician], None);
    let researcher = w.member(RESEARCH, &[Role::Researcher], None);
    let dr_b_file = w.key_file("dr-b.key", &dr_b);
    let researcher_file = w.key_file("researcher.key", &researcher);

    // Care by any member organisation: the consent also covers a delegation to research.
    w.consent(&patient, Purpose::Care, Recipient::AnyMember);

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

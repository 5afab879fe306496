//! `medledger demo`: the main job, with embedded defaults and no set-up. A network of four
//! organisations (two hospitals, a research consortium, a patients' agent), each a separate
//! node process, and the story medledger exists for, printed step by step with timings:
//! studies arrive at hospital A and are de-identified, stored and registered; the patient
//! consents; hospital B's clinician finds the patient's priors through the consortium's
//! pseudonym and receives them, verified against the ledger; a researcher receives the
//! de-identified derivatives only; the patient revokes and the next retrieval is refused; an
//! emergency (break-glass) access is flagged; a tampered object is caught at the receiver;
//! the audit trail shows all of it. Then the URLs to look at and how to stop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use medledger_crypto::{Digest, SigningKey};
use medledger_deid::DeidKey;
use medledger_ledger::identity::OrgCa;
use medledger_ledger::{AuditEvent, Grant, Op, OrgClass, Purpose, Recipient, Role, Study, Target};
use medledger_node::{Client, NodeConfig};
use medledger_testkit::synth::{CtStudySpec, FakePatient, ct_study};
use serde_json::Value;

use crate::files::{collect_inputs, write_atomically};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// A folder of DICOM files to use instead of synthesised studies (the patient of the
    /// first study is the one who consents).
    #[arg(long, value_name = "DIR")]
    pub input: Option<PathBuf>,
    /// Where the demo keeps its network (cleared of an earlier demo's first).
    #[arg(long, value_name = "DIR", default_value = "medledger-demo")]
    pub workdir: PathBuf,
    /// Slices per synthesised CT study.
    #[arg(long, default_value_t = 64)]
    pub slices: u32,
    /// First port: p2p base.., HTTP base+100.., DIMSE base+200.., sharing base+300..; the
    /// next free range is taken if it is busy.
    #[arg(long, default_value_t = 7100)]
    pub base_port: u16,
    /// Leave the network running afterwards (stop it with `medledger network down DIR`).
    #[arg(long)]
    pub keep_running: bool,
    /// The earlier, single-process demo: de-identification and the encrypted store only.
    #[arg(long)]
    pub offline: bool,
}

const A: &str = "hospital-a";
const B: &str = "hospital-b";
const RESEARCH: &str = "research";
const AGENT: &str = "patients";
const WAIT: Duration = Duration::from_secs(60);

struct Step {
    n: usize,
    started: Instant,
    at: Instant,
}

impl Step {
    fn next(&mut self, title: &str) {
        self.n += 1;
        self.at = Instant::now();
        println!("\n[{}] {title}", self.n);
    }

    fn done(&self) {
        println!(
            "    ({:.2} s; {:.1} s since the start)",
            self.at.elapsed().as_secs_f64(),
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// A member identity made for the story.
struct Member {
    key: SigningKey,
}

struct Net {
    dir: PathBuf,
    apis: BTreeMap<String, String>,
    configs: BTreeMap<String, NodeConfig>,
}

impl Net {
    fn api(&self, org: &str) -> &str {
        &self.apis[org]
    }

    fn client(&self, org: &str) -> Client {
        Client::new(self.api(org))
    }

    fn org_dir(&self, org: &str) -> PathBuf {
        self.dir.join(org)
    }

    /// Issues a member of `org` with `roles` (and a patient's pseudonym) and registers it,
    /// signed by the organisation's admin.
    fn member(
        &self,
        org: &str,
        name: &str,
        roles: &[Role],
        pseudonym: Option<&str>,
    ) -> Result<Member> {
        let key = add_member(&self.org_dir(org), self.api(org), name, roles, pseudonym)?;
        Ok(Member { key })
    }
}

/// Issues a member with the CA in `org_dir` (as `network init` lays it out) and registers it
/// through the node at `api`, signed by the organisation's admin; returns its key.
pub(crate) fn add_member(
    org_dir: &Path,
    api: &str,
    name: &str,
    roles: &[Role],
    pseudonym: Option<&str>,
) -> Result<SigningKey> {
    let read = |f: &str| {
        std::fs::read_to_string(org_dir.join(f))
            .with_context(|| format!("cannot read {}", org_dir.join(f).display()))
    };
    let ca = OrgCa::from_parts(SigningKey::from_text(&read("ca.key")?)?, &read("ca.pem")?)?;
    let key = SigningKey::generate();
    let now = now_ms();
    let cert = ca.issue(
        &key.verifying_key(),
        name,
        roles,
        pseudonym,
        &[],
        (now - 60_000, now + 365 * 86_400_000),
    )?;
    let admin = SigningKey::from_text(&read("admin.key")?)?;
    Client::new(api).execute(
        &admin,
        Op::AddMember {
            certificate: cert.to_pem(),
        },
        WAIT,
    )?;
    Ok(key)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn short(s: &str) -> &str {
    &s[..s.len().min(16)]
}

pub fn run(args: DemoArgs) -> Result<()> {
    if args.offline {
        return crate::demo_local::run(crate::demo_local::DemoArgs {
            input: args.input,
            workdir: args.workdir,
            slices: args.slices,
        });
    }
    let started = Instant::now();
    let mut step = Step {
        n: 0,
        started,
        at: started,
    };
    println!(
        "medledger demo: four organisations share a patient's CT studies on a permissioned ledger"
    );
    let work = &args.workdir;
    let netdir = work.join("network");
    if netdir.exists() {
        // An earlier demo left running (--keep-running) is stopped first.
        let _ = crate::network_cmd::down_quiet(&netdir);
        std::fs::remove_dir_all(&netdir)
            .with_context(|| format!("cannot clear {}", netdir.display()))?;
    }
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;

    // 1. The network.
    step.next("A network of four organisations, each its own node process");
    let base = free_base(args.base_port)?;
    let orgs = vec![
        (A.to_string(), OrgClass::Hospital),
        (B.to_string(), OrgClass::Hospital),
        (RESEARCH.to_string(), OrgClass::Research),
        (AGENT.to_string(), OrgClass::PatientAgent),
    ];
    let init = medledger_node::init_network(&netdir, "medledger-demo", &orgs, base)?;
    let mut net = Net {
        dir: netdir.clone(),
        apis: BTreeMap::new(),
        configs: BTreeMap::new(),
    };
    for path in &init.configs {
        let mut cfg = NodeConfig::load(path)?;
        if let Some(im) = cfg.imaging.as_mut() {
            // Register a study 1.5 s after its last instance (the default is 3 s).
            im.stable_ms = 1500;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&cfg)?)?;
        net.apis
            .insert(cfg.org.clone(), format!("http://{}", cfg.api));
        net.configs.insert(cfg.org.clone(), cfg);
    }
    crate::network_cmd::up_quiet(&netdir)?;
    let guard = Guard {
        dir: netdir.clone(),
        keep: args.keep_running,
    };
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    for (org, api) in &net.apis {
        wait_until(&format!("{org}'s node to be ready"), || {
            http.get(format!("{api}/health"))
                .send()
                .is_ok_and(|r| r.status().is_success())
        })?;
        let c = &net.configs[org];
        let im = c.imaging.as_ref().expect("network init configures imaging");
        println!(
            "    {org:<11} ledger API and DICOMweb {api}, DIMSE {} on {}, sharing (mutual TLS) {}",
            im.ae_title,
            im.dicom,
            im.share.map(|a| a.to_string()).unwrap_or_default()
        );
    }
    println!(
        "    consensus: simplex BFT over the four nodes (tolerates one faulty); keys, CAs and configs in {}",
        netdir.display()
    );
    step.done();

    // 2. Studies arrive at hospital A.
    step.next("Studies arrive at hospital A (STOW-RS), are de-identified, stored encrypted and registered");
    let (input, people) = match &args.input {
        Some(dir) => (dir.clone(), people_of(dir)?),
        None => synthesise(&work.join("incoming"), args.slices)?,
    };
    let files = collect_inputs(std::slice::from_ref(&input))?;
    if files.is_empty() {
        bail!("no DICOM files under {}", input.display());
    }
    let t = Instant::now();
    let url = format!("{}/dicom-web/studies", net.api(A));
    let mut bytes = 0u64;
    let (mut stored, mut refused) = (0usize, 0usize);
    for chunk in files.chunks(32) {
        let (boundary, body) = crate::import_cmd::stow_body(chunk)?;
        bytes += body.len() as u64;
        let r = crate::import_cmd::post_stow(&http, &url, &boundary, body)?;
        let status = r.status();
        // 200: all stored; 202: some refused; 409: none stored. The answer says which.
        let answer: Value = r.json().unwrap_or(Value::Null);
        let count = |tag: &str| answer[tag]["Value"].as_array().map_or(0, Vec::len);
        if !(status.is_success() || status.as_u16() == 409) || answer.is_null() {
            bail!("hospital A refused the studies: {status} {answer}");
        }
        stored += count("00081199");
        refused += count("00081198");
    }
    println!(
        "    {stored} instances, {:.1} MB stored at hospital A in {:.2} s (acknowledged once durable: originals and de-identified derivatives){}",
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        if refused > 0 {
            format!("; {refused} refused (not readable DICOM: `medledger import` lists why)")
        } else {
            String::new()
        }
    );
    if stored == 0 {
        bail!("hospital A stored nothing of {}", input.display());
    }
    let linkage = DeidKey::from_text(&std::fs::read_to_string(
        net.org_dir(B).join("linkage.key"),
    )?)?;
    let pseudonyms: Vec<String> = people
        .iter()
        .map(|p| {
            medledger_deid::patient_identity(&p.id, &p.name, &p.birth_date)
                .map(|i| linkage.patient_pseudonym(&i))
                .unwrap_or_default()
        })
        .collect();
    let a = net.client(A);
    let mut studies: Vec<Study> = Vec::new();
    wait_until("the studies to be registered on the ledger", || {
        studies = current(a.studies().unwrap_or_default())
            .into_iter()
            .filter(|s| s.owner == A)
            .collect();
        let originals: usize = studies
            .iter()
            .filter(|s| !s.is_derivative())
            .map(|s| s.instances as usize)
            .sum();
        // Instances sent twice (the same SOP Instance UID) are kept once, so the count can
        // be below what was stored; nothing pending means everything is registered.
        originals > 0 && pending_registrations(&http, net.api(A)) == Some(0)
    })?;
    for s in &studies {
        println!(
            "    registered {} {} {:>3} instances {:>6.1} MB patient {} {}",
            if s.is_derivative() {
                "derivative"
            } else {
                "original  "
            },
            short(&s.root.to_hex()),
            s.instances,
            s.bytes as f64 / 1e6,
            s.patient,
            s.deid
                .as_ref()
                .map(|d| format!("(de-identified: Basic Profile + {})", d.options.join(", ")))
                .unwrap_or_else(|| "(identified, stays at A)".into())
        );
    }
    println!("    the ledger holds roots, sizes and pseudonyms only; no name, ID or date of birth");
    step.done();

    // 3. The patient, through the patients' agent, consents.
    let p1 = &people[0];
    let ps1 = &pseudonyms[0];
    step.next("The patient consents: care by hospital B, research by the consortium");
    let patient = net.member(
        AGENT,
        &format!("patient {ps1}"),
        &[Role::Patient],
        Some(ps1),
    )?;
    let agent = net.client(AGENT);
    let care_consent = agent
        .execute(
            &patient.key,
            Op::GrantConsent {
                patient: ps1.clone(),
                purpose: Purpose::Care,
                recipient: Recipient::Org(B.into()),
                expires_ms: Some(now_ms() + 365 * 86_400_000),
            },
            WAIT,
        )?
        .receipt
        .created
        .unwrap_or_default();
    agent.execute(
        &patient.key,
        Op::GrantConsent {
            patient: ps1.clone(),
            purpose: Purpose::Research,
            recipient: Recipient::Class(OrgClass::Research),
            expires_ms: None,
        },
        WAIT,
    )?;
    println!(
        "    patient identity issued by the patients' agent's CA (X.509, role patient, pseudonym {ps1})"
    );
    println!(
        "    consent {care_consent}: care, hospital B, for a year; and research, any research organisation"
    );
    step.done();

    // 4. Hospital B's clinician finds the priors and receives them.
    step.next("Hospital B's clinician finds the patient's priors at hospital A and receives them");
    let clinician = net.member(B, "Dr B (radiologist)", &[Role::Clinician], None)?;
    println!(
        "    the clinician knows the patient ({}); the consortium's linkage key gives the pseudonym {ps1}",
        [
            p1.name.clone(),
            format!("ID {}", p1.id),
            format!("born {}", p1.birth_date)
        ]
        .into_iter()
        .filter(|s| !s.is_empty() && !s.ends_with(' '))
        .collect::<Vec<_>>()
        .join(", ")
    );
    let b = net.client(B);
    let priors: Vec<Study> = current(b.studies()?)
        .into_iter()
        .filter(|s| &s.patient == ps1 && s.owner != B && !s.is_derivative())
        .collect();
    println!("    priors on the ledger: {} at {A}", priors.len());
    let t_request = Instant::now();
    let request = ask_access(
        &b,
        &clinician.key,
        Target::Patient(ps1.clone()),
        Purpose::Care,
        false,
    )?;
    let outcomes = wait_received(&net, B, &request, priors.len(), &http)?;
    let request_to_viewable = t_request.elapsed().as_secs_f64();
    for o in &outcomes {
        println!(
            "    received {} from {}: {} instances, {} objects, {:.1} MB, every object verified against the registered root; audit event {}",
            short(o["root"].as_str().unwrap_or_default()),
            o["owner"].as_str().unwrap_or_default(),
            o["instances"],
            o["objects"],
            o["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            o["audit"].as_str().unwrap_or("-")
        );
    }
    println!(
        "    request to viewable at B: {request_to_viewable:.2} s (A granted on consent, B's node fetched over mutual TLS)"
    );
    let token =
        medledger_imaging::access::issue_token(&clinician.key, B, Duration::from_secs(3600));
    let seen = qido_names(&http, net.api(B), Some(&token))?;
    let anon = qido_names(&http, net.api(B), None)?;
    println!(
        "    B's DICOMweb with the clinician's token: {} stud(ies), patient name {}; without a token: {} (originals are for care)",
        seen.len(),
        seen.first().cloned().unwrap_or_default(),
        anon.len()
    );
    step.done();

    // 5. The researcher.
    step.next("A consortium researcher receives the de-identified derivatives only");
    let researcher = net.member(RESEARCH, "Dr R (researcher)", &[Role::Researcher], None)?;
    let r = net.client(RESEARCH);
    let derivatives = studies
        .iter()
        .filter(|s| &s.patient == ps1 && s.is_derivative())
        .count();
    let request_r = ask_access(
        &r,
        &researcher.key,
        Target::Patient(ps1.clone()),
        Purpose::Research,
        false,
    )?;
    let outcomes_r = wait_received(&net, RESEARCH, &request_r, derivatives, &http)?;
    println!(
        "    {} derivative stud(ies) received and verified, {:.1} MB",
        outcomes_r.len(),
        outcomes_r
            .iter()
            .map(|o| o["bytes"].as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / 1e6
    );
    let names = qido_names(&http, net.api(RESEARCH), None)?;
    println!(
        "    the consortium's DICOMweb shows patient name(s) {:?}: pseudonyms, no identifiers",
        names
    );
    let original = priors.first().map(|s| s.root);
    if let Some(root) = original {
        let req = ask_access(
            &r,
            &researcher.key,
            Target::Study(root),
            Purpose::Research,
            false,
        )?;
        let admin_a =
            SigningKey::from_text(&std::fs::read_to_string(net.org_dir(A).join("admin.key"))?)?;
        let attempt = a.execute(
            &admin_a,
            Op::GrantAccess {
                request: req,
                study: root,
                envelope: "{}".into(),
                expires_ms: None,
                delegable: false,
            },
            WAIT,
        );
        match attempt {
            Err(e) => println!(
                "    even hospital A's admin cannot grant research access to the identified original: {e}"
            ),
            Ok(_) => bail!("the ledger granted research access to an identified original"),
        }
    }
    step.done();

    // 6. Revocation.
    step.next("The patient revokes hospital B's care consent; B's next retrieval is refused");
    let revoked = agent.execute(
        &patient.key,
        Op::RevokeConsent {
            consent: care_consent.clone(),
        },
        WAIT,
    )?;
    // Each node applies finalised blocks on its own: the story goes on once hospital A's
    // has applied the revocation, as a clinician's next request would come seconds later.
    wait_until("hospital A's node to apply the revocation", || {
        a.ledger_height().is_ok_and(|h| h >= revoked.height)
    })?;
    let grant_b = outcomes
        .first()
        .and_then(|o| o["grant"].as_str().map(str::to_string))
        .context("no grant to hospital B")?;
    let t = Instant::now();
    let r_again = http
        .post(format!("{}/api/retrievals", net.api(B)))
        .body(serde_json::json!({ "grant": grant_b }).to_string())
        .send()?;
    let status = r_again.status();
    let body: Value = r_again.json().unwrap_or(Value::Null);
    if status.is_success() {
        bail!("hospital A served a study after the patient revoked consent");
    }
    println!(
        "    refused in {:.2} s ({status}): {}",
        t.elapsed().as_secs_f64(),
        body["error"].as_str().unwrap_or_default()
    );
    step.done();

    // 7. Break-glass.
    step.next("An emergency at hospital B: break-glass access without consent, flagged in the audit trail");
    let root = original.context("no original study")?;
    let request_bg = ask_access(&b, &clinician.key, Target::Study(root), Purpose::Care, true)?;
    let bg = wait_received(&net, B, &request_bg, 1, &http)?;
    for o in &bg {
        println!(
            "    granted and served under break-glass: {} objects ({} already at B from before, {} transferred)",
            o["objects"], o["resumed_objects"], o["fetched_objects"]
        );
    }
    step.done();

    // 8. Tampering.
    step.next(
        "A bit flips in hospital A's store; the consortium's node catches it and refuses the data",
    );
    let Some((p2, ps2)) = people.get(1).zip(pseudonyms.get(1)) else {
        bail!("the tampering step needs a second patient");
    };
    let agent_admin = SigningKey::from_text(&std::fs::read_to_string(
        net.org_dir(AGENT).join("admin.key"),
    )?)?;
    agent.execute(
        &agent_admin,
        Op::GrantConsent {
            patient: ps2.clone(),
            purpose: Purpose::Research,
            recipient: Recipient::Org(RESEARCH.into()),
            expires_ms: None,
        },
        WAIT,
    )?;
    println!(
        "    the second patient ({}) consents to research through the patients' agent",
        p2.name
    );
    let target = studies
        .iter()
        .find(|s| &s.patient == ps2 && s.is_derivative())
        .context("no derivative of the second patient")?;
    let flipped = flip_bit(&net, A, &target.root)?;
    println!(
        "    flipped one bit of object {} in A's store",
        short(&flipped)
    );
    let request_t = ask_access(
        &r,
        &researcher.key,
        Target::Study(target.root),
        Purpose::Research,
        false,
    )?;
    let error = wait_failed(&net, RESEARCH, &request_t, &http)?;
    println!("    the consortium's node: {error}");
    step.done();

    // 9. The audit trail.
    step.next("The audit trail: what the patient sees, and every event on the ledger");
    let mut audit: Vec<AuditEvent> = Vec::new();
    wait_until("the refusals to be on the ledger", || {
        audit = a.audit().unwrap_or_default();
        audit.iter().filter(|e| e.refused.is_some()).count() >= 2
    })?;
    let view = agent.patient_view(ps1)?;
    let grants: Vec<Grant> = serde_json::from_value(view["grants"].clone()).unwrap_or_default();
    println!("    patient {ps1}: {} grant(s)", grants.len());
    for g in &grants {
        println!(
            "      grant {} to {:<10} for {:?}{}{}",
            short(&g.id),
            g.grantee,
            g.purpose,
            if g.break_glass { ", BREAK-GLASS" } else { "" },
            if g.revoked_at.is_some() {
                ", revoked"
            } else {
                ""
            }
        );
    }
    for e in &audit {
        match &e.refused {
            None => println!(
                "    #{:<3} {} -> {}: {} objects, {:.1} MB{}",
                e.seq,
                e.server_org,
                e.receiver_org,
                e.objects,
                e.bytes as f64 / 1e6,
                if e.break_glass { "  BREAK-GLASS" } else { "" }
            ),
            Some(why) => println!(
                "    #{:<3} {} -> {}: REFUSED (recorded by {}): {why}",
                e.seq, e.server_org, e.receiver_org, e.recorded_by
            ),
        }
    }
    step.done();

    println!("\nLook around:");
    for (org, api) in &net.apis {
        println!("    {org:<11} {api}/dicom-web  (QIDO/WADO)   {api}/api/status   {api}/api/audit");
    }
    println!(
        "    over HTTPS (trust {}): {}",
        netdir.join("https-ca.pem").display(),
        net.configs
            .values()
            .filter_map(|c| c.https.as_ref())
            .map(|h| format!("https://{}/dicom-web", h.listen))
            .collect::<Vec<_>>()
            .join("  ")
    );
    println!(
        "    a clinician's view at B needs a token: medledger identity token --key-file KEY --org {B}"
    );
    println!(
        "    the patient's view: {}/api/patients/{ps1}",
        net.api(AGENT)
    );
    if args.keep_running {
        println!(
            "\nThe network keeps running; stop it with: medledger network down {}",
            netdir.display()
        );
    } else {
        println!(
            "\nStopping the network (run with --keep-running to leave it up; logs in {}/*/node.log)",
            netdir.display()
        );
    }
    drop(guard);
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Stops the network when the demo ends, however it ends, unless asked to keep it.
struct Guard {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.keep {
            let _ = crate::network_cmd::down_quiet(&self.dir);
        }
    }
}

/// Someone whose studies the demo uses.
struct Person {
    name: String,
    id: String,
    birth_date: String,
    studies: usize,
}

/// Two patients: the first with two annual screening rounds, the second with one.
fn synthesise(dir: &Path, slices: u32) -> Result<(PathBuf, Vec<Person>)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let mut people = Vec::new();
    for (p, rounds) in [(0u64, 2u64), (1, 1)] {
        let patient = FakePatient::generate(2000 + p);
        let base = CtStudySpec::for_seed(2000 + p * 10);
        for round in 0..rounds {
            let mut spec = CtStudySpec::for_seed(2000 + p * 10 + round);
            spec.slices = slices;
            spec.institution = base.institution.clone();
            spec.institution_address = base.institution_address.clone();
            let year: i32 = base.study_date[..4].parse().unwrap_or(2020);
            spec.study_date = format!("{}{}", year + round as i32, &base.study_date[4..]);
            for (i, bytes) in ct_study(&patient, &spec).into_iter().enumerate() {
                let path = dir
                    .join(format!("patient{}", p + 1))
                    .join(format!("round{}", round + 1))
                    .join(format!("{:04}.dcm", i + 1));
                write_atomically(&path, &bytes)?;
            }
        }
        println!(
            "    synthesised: {} (ID {}, born {}): {rounds} low-dose chest CT stud(ies) of {slices} slices, chest phantom pixels, identifying headers",
            patient.name, patient.id, patient.birth_date
        );
        people.push(Person {
            name: patient.name,
            id: patient.id,
            birth_date: patient.birth_date,
            studies: rounds as usize,
        });
    }
    Ok((dir.to_path_buf(), people))
}

/// The patients of a folder of DICOM files, in order of first appearance.
fn people_of(dir: &Path) -> Result<Vec<Person>> {
    use dicom_dictionary_std::tags;
    let mut people: Vec<Person> = Vec::new();
    let mut studies: BTreeMap<String, String> = BTreeMap::new();
    for f in collect_inputs(&[dir.to_path_buf()])? {
        let Ok(obj) = dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(&f)
        else {
            continue;
        };
        let text = |t| {
            obj.element(t)
                .ok()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let (id, name, birth, study) = (
            text(tags::PATIENT_ID),
            text(tags::PATIENT_NAME),
            text(tags::PATIENT_BIRTH_DATE),
            text(tags::STUDY_INSTANCE_UID),
        );
        let new_study = studies.insert(study, id.clone()).is_none();
        match people.iter_mut().find(|p| p.id == id && p.name == name) {
            Some(p) => p.studies += usize::from(new_study),
            None => people.push(Person {
                name,
                id,
                birth_date: birth,
                studies: 1,
            }),
        }
    }
    if people.len() < 2 {
        bail!(
            "the demo needs studies of at least two patients under {}",
            dir.display()
        );
    }
    // The story is about priors: the patient with the most studies first, named ones before
    // those whose headers were emptied.
    people.sort_by_key(|p| (std::cmp::Reverse(p.studies), p.name.is_empty()));
    Ok(people)
}

pub(crate) fn free_base(start: u16) -> Result<u16> {
    let mut base = start;
    for _ in 0..200 {
        let free = (0..4u16).all(|i| {
            [0u16, 100, 200, 300, 400, 500]
                .iter()
                .all(|off| std::net::TcpListener::bind(("127.0.0.1", base + off + i)).is_ok())
        });
        if free {
            return Ok(base);
        }
        base = base.checked_add(10).context("no free ports")?;
    }
    bail!("no free range of ports from {start}")
}

pub(crate) fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Studies a node holds that the ledger has not registered yet (its `/metrics`).
fn pending_registrations(http: &reqwest::blocking::Client, api: &str) -> Option<u64> {
    let text = http
        .get(format!("{api}/metrics"))
        .send()
        .ok()?
        .text()
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("medledger_studies_pending_registration "))
        .and_then(|v| v.trim().parse().ok())
}

/// The newest version of each study: those no other version supersedes.
pub(crate) fn current(studies: Vec<Study>) -> Vec<Study> {
    let superseded: std::collections::HashSet<Digest> =
        studies.iter().filter_map(|s| s.supersedes).collect();
    studies
        .into_iter()
        .filter(|s| !superseded.contains(&s.root))
        .collect()
}

/// Submits an access request as `member`; returns its id once final.
fn ask_access(
    client: &Client,
    member: &SigningKey,
    target: Target,
    purpose: Purpose,
    break_glass: bool,
) -> Result<String> {
    Ok(client
        .execute(
            member,
            Op::RequestAccess {
                target,
                purpose,
                break_glass,
            },
            WAIT,
        )?
        .receipt
        .created
        .unwrap_or_default())
}

/// Grants made for `request`.
pub(crate) fn grants_of(client: &Client, request: &str) -> Vec<Grant> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    while let Ok(page) = client.query("grant/", after.as_deref(), 1000) {
        for e in &page.entries {
            if let Ok(g) = serde_json::from_value::<Grant>(e.value.clone()) {
                if g.request == request {
                    out.push(g);
                }
            }
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    out
}

pub(crate) fn retrieval_of(
    http: &reqwest::blocking::Client,
    api: &str,
    grant: &str,
) -> Option<Value> {
    let list: Value = http
        .get(format!("{api}/api/retrievals"))
        .send()
        .ok()?
        .json()
        .ok()?;
    list.as_array()?
        .iter()
        .find(|r| r["grant"].as_str() == Some(grant))
        .cloned()
}

/// Waits until `org`'s node has received every study granted for `request` (at least
/// `expected`), and returns the outcomes.
fn wait_received(
    net: &Net,
    org: &str,
    request: &str,
    expected: usize,
    http: &reqwest::blocking::Client,
) -> Result<Vec<Value>> {
    let client = net.client(org);
    let mut out = Vec::new();
    let mut failure = None;
    wait_until("the grant and the retrieval", || {
        let grants = grants_of(&client, request);
        if grants.len() < expected {
            return false;
        }
        out.clear();
        for g in &grants {
            match retrieval_of(http, net.api(org), &g.id) {
                Some(r) if r["state"] == "done" => out.push(r["outcome"].clone()),
                Some(r) if r["state"] == "failed" => {
                    failure = Some(r["error"].as_str().unwrap_or_default().to_string());
                    return true;
                }
                _ => return false,
            }
        }
        true
    })?;
    if let Some(e) = failure {
        bail!("the retrieval failed: {e}");
    }
    Ok(out)
}

/// Waits until `org`'s retrieval for `request` failed; returns why.
fn wait_failed(
    net: &Net,
    org: &str,
    request: &str,
    http: &reqwest::blocking::Client,
) -> Result<String> {
    let client = net.client(org);
    let mut error = String::new();
    let mut succeeded = false;
    wait_until("the retrieval to be refused", || {
        for g in grants_of(&client, request) {
            match retrieval_of(http, net.api(org), &g.id) {
                Some(r) if r["state"] == "failed" => {
                    error = r["error"].as_str().unwrap_or_default().to_string();
                    return true;
                }
                Some(r) if r["state"] == "done" => {
                    succeeded = true;
                    return true;
                }
                _ => {}
            }
        }
        false
    })?;
    if succeeded {
        bail!("tampered data was accepted");
    }
    Ok(error)
}

/// Patient names of the studies a node's DICOMweb shows (with a bearer token or without).
fn qido_names(
    http: &reqwest::blocking::Client,
    api: &str,
    token: Option<&str>,
) -> Result<Vec<String>> {
    let mut req = http.get(format!("{api}/dicom-web/studies?includefield=00100010"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let v: Value = req.send()?.json().unwrap_or(Value::Null);
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    s["00100010"]["Value"][0]["Alphabetic"]
                        .as_str()
                        .unwrap_or("")
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Flips one bit of the first instance's header object of a study in `org`'s store (a header
/// is the study's own; pixel objects may be shared with the original).
fn flip_bit(net: &Net, org: &str, root: &Digest) -> Result<String> {
    let im = net.configs[org].imaging.as_ref().context("no imaging")?;
    let store = medledger_store::Store::open(&im.store)?;
    let owner = medledger_crypto::SecretKey::from_text(&std::fs::read_to_string(&im.store_key)?)?;
    let (_, manifest) = store.open_manifest(root, &owner)?;
    let (_, first) = manifest
        .instances()
        .next()
        .context("the study has no instances")?;
    let object = first.header.address.to_hex();
    let key = format!("objects/{object}");
    let at = medledger_store::FsBackend::open_existing(&im.store)?
        .locate(&key)?
        .with_context(|| format!("{key} is not in {}", im.store))?;
    at.flip_bit(at.len / 2)
        .with_context(|| format!("{}", at.path.display()))?;
    Ok(object)
}

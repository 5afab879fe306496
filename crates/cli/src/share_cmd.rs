//! `medledger share`: sharing studies across organisations. A patient (or their agent)
//! consents, a clinician or researcher requests, the owner's node (or an authorised member of
//! the owner organisation) grants with the study key wrapped for the requester, the
//! requester's node retrieves and verifies, and the patient sees every grant and retrieval.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args, Subcommand};
use medledger_crypto::{Digest, PublicKey, SecretKey, SigningKey};
use medledger_ledger::{
    AuditEvent, Consent, Grant, Member, Op, Org, OrgClass, Purpose, Recipient, Request, Study,
    Target,
};
use medledger_node::{Client, Finality, NodeConfig, QueryEntry};
use serde_json::{Value, json};

use crate::network_cmd::NodeUrl;

#[derive(Subcommand, Debug)]
pub enum ShareCommand {
    /// Give a patient's consent (signed by the patient or their agent organisation's member):
    /// a purpose, for one organisation, a class of organisations or any member.
    #[command(group(ArgGroup::new("recipient").required(true).args(["org", "class", "any"])))]
    Consent {
        #[command(flatten)]
        node: NodeUrl,
        /// The signing key file of the member giving consent.
        #[arg(long)]
        key_file: PathBuf,
        /// The patient's pseudonym (ML and 16 letters, see `share pseudonym`).
        #[arg(long)]
        patient: String,
        /// care or research.
        #[arg(long, value_parser = parse_purpose)]
        purpose: Purpose,
        /// Consent for this organisation.
        #[arg(long)]
        org: Option<String>,
        /// Consent for every organisation of a class: hospital, research or patient-agent.
        #[arg(long, value_parser = parse_class)]
        class: Option<OrgClass>,
        /// Consent for any member organisation.
        #[arg(long)]
        any: bool,
        /// The consent expires this many days from now (default: never).
        #[arg(long)]
        expires_days: Option<u64>,
    },
    /// Revoke a consent: no new grant rests on it, nor any retrieval under grants it allowed.
    RevokeConsent {
        #[command(flatten)]
        node: NodeUrl,
        #[arg(long)]
        key_file: PathBuf,
        /// The consent's id (from `share consent` or `share patient-view`).
        #[arg(long)]
        consent: String,
    },
    /// Request access to a study or to every study of a patient, and wait until it is
    /// granted and retrieved.
    ///
    /// Unless --no-wait, waits for the owner's grants and then for this node's verified
    /// retrieval of them. --node must be the requesting organisation's node: that is where
    /// the retrieval runs.
    #[command(group(ArgGroup::new("target").required(true).args(["study", "patient"])))]
    Request {
        #[command(flatten)]
        node: NodeUrl,
        /// The requesting clinician's or researcher's signing key file.
        #[arg(long)]
        key_file: PathBuf,
        /// The study's root (as `ledger studies` lists it).
        #[arg(long, value_parser = parse_digest)]
        study: Option<Digest>,
        /// Every study of this patient pseudonym at every other site (priors).
        #[arg(long)]
        patient: Option<String>,
        /// care or research.
        #[arg(long, value_parser = parse_purpose)]
        purpose: Purpose,
        /// Emergency care without consent: allowed, and flagged in the audit trail.
        #[arg(long)]
        break_glass: bool,
        /// How long to wait for the grant, and then again for the retrieval, in seconds.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
        /// Submit the request and return.
        #[arg(long)]
        no_wait: bool,
    },
    /// Grant a request by hand, as an authorised member of the owner organisation.
    ///
    /// Run on the owner node's machine by an admin or clinician of its organisation: the
    /// node's store wraps each study's key for the requesting organisation. The patient's
    /// consent (or a break-glass request) is still required.
    Grant {
        /// The owner node's configuration (from `network init`): its API, store and store key.
        #[arg(long)]
        config: PathBuf,
        /// The granting member's signing key file.
        #[arg(long)]
        key_file: PathBuf,
        /// The request's id.
        #[arg(long)]
        request: String,
        /// The studies to grant (repeat the flag); default: the requested study, or every
        /// current study of the requested patient this organisation owns (for research,
        /// de-identified derivatives only).
        #[arg(long, value_parser = parse_digest)]
        study: Vec<Digest>,
        /// The grant expires this many days from now (default: never).
        #[arg(long)]
        expires_days: Option<u64>,
        /// The grantee may delegate the grant to another organisation.
        #[arg(long)]
        delegable: bool,
    },
    /// Delegate a delegable grant to another organisation, as a member of the grantee.
    ///
    /// Run on the grantee node's machine by an admin, clinician or researcher of its
    /// organisation, once that node has received the study (`share fetch`): the node's store
    /// wraps the study's key for the other organisation. The new grant is for the same study
    /// and purpose, ends when the delegated one ends, cannot be delegated further, and needs
    /// the patient's consent for the other organisation.
    Delegate {
        /// The grantee node's configuration (from `network init`): its API, store and store key.
        #[arg(long)]
        config: PathBuf,
        /// The delegating member's signing key file.
        #[arg(long)]
        key_file: PathBuf,
        /// The delegable grant's id.
        #[arg(long)]
        grant: String,
        /// The organisation to delegate to.
        #[arg(long)]
        to_org: String,
    },
    /// Revoke a grant (the study's owner, the grantee's admin or the patient).
    Revoke {
        #[command(flatten)]
        node: NodeUrl,
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        grant: String,
    },
    /// Have the node retrieve a granted study (or one series of it) and wait until it is done.
    ///
    /// The node fetches from the owner's node, verifies every object against the root on the
    /// ledger and keeps it.
    Fetch {
        #[command(flatten)]
        node: NodeUrl,
        #[arg(long)]
        grant: String,
        /// Only this series (Series Instance UID).
        #[arg(long)]
        series: Option<String>,
    },
    /// The retrievals the node ran, with their outcome or error.
    Retrievals(NodeUrl),
    /// A patient's pseudonym under the consortium's linkage key, as every site registers it.
    Pseudonym(PatientArgs),
    /// Prior studies of a patient at other sites: every current registered study of the
    /// patient's pseudonym.
    Priors {
        #[command(flatten)]
        node: NodeUrl,
        #[command(flatten)]
        patient: PatientArgs,
        /// Leave out the studies this organisation owns.
        #[arg(long)]
        org: Option<String>,
    },
    /// What a patient sees: their studies, consents, every grant and every retrieval or
    /// refused retrieval of their studies.
    PatientView {
        #[command(flatten)]
        node: NodeUrl,
        /// The patient's pseudonym.
        #[arg(long)]
        patient: String,
    },
}

/// A patient's identity, to make the pseudonym from: the Patient ID, else the name and the
/// birth date. Never sent anywhere.
#[derive(Args, Debug)]
pub struct PatientArgs {
    /// The consortium's linkage key file (`linkage.key` from `network init`).
    #[arg(long)]
    pub linkage_key: PathBuf,
    /// The Patient ID (0010,0020) as the sites hold it.
    #[arg(long)]
    pub patient_id: Option<String>,
    /// The Patient's Name (0010,0010), used when there is no Patient ID.
    #[arg(long)]
    pub name: Option<String>,
    /// The Patient's Birth Date (0010,0030), YYYYMMDD, with --name.
    #[arg(long)]
    pub birth_date: Option<String>,
}

/// How long a submitted transaction may take to be final.
const FINALITY: Duration = Duration::from_secs(30);
/// How often `request` looks for grants and retrievals.
const POLL: Duration = Duration::from_millis(100);
/// A retrieval through `fetch` may take this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
const DAY_MS: u64 = 86_400_000;

pub fn run(cmd: ShareCommand) -> Result<()> {
    match cmd {
        ShareCommand::Consent {
            node,
            key_file,
            patient,
            purpose,
            org,
            class,
            any,
            expires_days,
        } => consent(
            &node.node,
            &key_file,
            &patient,
            purpose,
            recipient(org, class, any)?,
            expires_days,
        ),
        ShareCommand::RevokeConsent {
            node,
            key_file,
            consent,
        } => revoke(
            &node.node,
            &key_file,
            "consent",
            &consent,
            Op::RevokeConsent {
                consent: consent.clone(),
            },
        ),
        ShareCommand::Request {
            node,
            key_file,
            study,
            patient,
            purpose,
            break_glass,
            wait_secs,
            no_wait,
        } => {
            let target = target(study, patient)?;
            let wait = (!no_wait).then(|| Duration::from_secs(wait_secs));
            request(&node.node, &key_file, target, purpose, break_glass, wait)
        }
        ShareCommand::Grant {
            config,
            key_file,
            request,
            study,
            expires_days,
            delegable,
        } => grant(
            &config,
            &key_file,
            &request,
            &study,
            expires_days,
            delegable,
        ),
        ShareCommand::Delegate {
            config,
            key_file,
            grant,
            to_org,
        } => delegate(&config, &key_file, &grant, &to_org),
        ShareCommand::Revoke {
            node,
            key_file,
            grant,
        } => revoke(
            &node.node,
            &key_file,
            "grant",
            &grant,
            Op::RevokeAccess {
                grant: grant.clone(),
            },
        ),
        ShareCommand::Fetch {
            node,
            grant,
            series,
        } => {
            let outcome = fetch(&node.node, &grant, series.as_deref())?;
            print(&outcome);
            eprintln!("{}", outcome_line(&outcome));
            Ok(())
        }
        ShareCommand::Retrievals(node) => {
            let all = retrievals(&http(FINALITY), &node.node)?;
            print(&all);
            let count = |state: &str| all.iter().filter(|r| r["state"] == state).count();
            eprintln!(
                "{} retrievals on {}: {} running, {} done, {} failed",
                all.len(),
                node.node,
                count("running"),
                count("done"),
                count("failed")
            );
            Ok(())
        }
        ShareCommand::Pseudonym(p) => {
            let (key, pseudonym) = pseudonym(&p)?;
            print(&json!({ "pseudonym": pseudonym, "linkage_key": key.id() }));
            eprintln!("pseudonym {pseudonym} (linkage key {})", key.id());
            Ok(())
        }
        ShareCommand::Priors { node, patient, org } => {
            let (_, pseudonym) = pseudonym(&patient)?;
            let studies = Client::new(&node.node)
                .studies()
                .with_context(|| format!("reading the studies from {}", node.node))?;
            let found = priors(&studies, &pseudonym, org.as_deref());
            let rows: Vec<Value> = found
                .iter()
                .map(|s| {
                    json!({
                        "root": s.root,
                        "owner": s.owner,
                        "modality": s.modality,
                        "instances": s.instances,
                        "bytes": s.bytes,
                        "derived_from": s.derived_from,
                    })
                })
                .collect();
            print(&rows);
            let owners: HashSet<&str> = found.iter().map(|s| s.owner.as_str()).collect();
            eprintln!(
                "patient {pseudonym}: {} prior studies at {} sites{}",
                found.len(),
                owners.len(),
                org.map(|o| format!(" other than {o}")).unwrap_or_default()
            );
            Ok(())
        }
        ShareCommand::PatientView { node, patient } => {
            check_patient(&patient)?;
            let view = Client::new(&node.node)
                .patient_view(&patient)
                .with_context(|| format!("reading the patient's view from {}", node.node))?;
            print(&view);
            for line in view_summary(&view, now_ms()) {
                eprintln!("{line}");
            }
            Ok(())
        }
    }
}

fn consent(
    node: &str,
    key_file: &Path,
    patient: &str,
    purpose: Purpose,
    recipient: Recipient,
    expires_days: Option<u64>,
) -> Result<()> {
    check_patient(patient)?;
    let expires_ms = expiry(now_ms(), expires_days)?;
    let key = signing_key(key_file)?;
    if let Recipient::Org(o) = &recipient {
        Client::new(node)
            .value::<Org>(&format!("org/{o}"))
            .with_context(|| format!("looking up organisation {o} on {node}"))?
            .with_context(|| format!("no organisation {o} on the ledger of {node}"))?;
    }
    let f = submit(
        node,
        &key,
        Op::GrantConsent {
            patient: patient.to_string(),
            purpose,
            recipient: recipient.clone(),
            expires_ms,
        },
    )?;
    let id = created(&f, "consent")?;
    print(&json!({
        "consent": id,
        "patient": patient,
        "purpose": purpose,
        "recipient": recipient,
        "expires_ms": expires_ms,
        "height": f.height,
    }));
    eprintln!(
        "consent {id}: patient {patient}, {} for {}, {}",
        purpose_name(purpose),
        recipient_name(&recipient),
        match expires_ms {
            Some(e) => format!("until {}", utc(e)),
            None => "no expiry".to_string(),
        }
    );
    Ok(())
}

fn request(
    node: &str,
    key_file: &Path,
    target: Target,
    purpose: Purpose,
    break_glass: bool,
    wait: Option<Duration>,
) -> Result<()> {
    if break_glass && purpose != Purpose::Care {
        bail!("break-glass access is for emergency care only");
    }
    let key = signing_key(key_file)?;
    let client = Client::new(node);
    let started = Instant::now();
    let f = submit(
        node,
        &key,
        Op::RequestAccess {
            target: target.clone(),
            purpose,
            break_glass,
        },
    )?;
    let id = created(&f, "request")?;
    let mut report = json!({
        "request": id,
        "target": target,
        "purpose": purpose,
        "break_glass": break_glass,
        "height": f.height,
    });
    eprintln!(
        "request {id} final at height {} after {:.2} s{}",
        f.height,
        started.elapsed().as_secs_f64(),
        if break_glass { " (BREAK-GLASS)" } else { "" }
    );
    let Some(wait) = wait else {
        print(&report);
        return Ok(());
    };

    // The owner's grants.
    let deadline = Instant::now() + wait;
    let mut grants = loop {
        let g = grants_of_request(&client, &id)?;
        if !g.is_empty() {
            break g;
        }
        if Instant::now() >= deadline {
            let why = format!(
                "no grant for request {id} after {} s: the owner has not granted it; the \
                 patient's consent may be missing (`share consent`), or the owner's node may \
                 not grant automatically (`share grant` by an authorised member)",
                wait.as_secs()
            );
            report["error"] = json!(why);
            print(&report);
            bail!(why);
        }
        std::thread::sleep(POLL);
    };
    let granted = started.elapsed().as_secs_f64();
    report["granted_seconds"] = json!(round3(granted));
    eprintln!(
        "granted after {granted:.2} s: {}",
        grants
            .iter()
            .map(|g| format!("grant {} (study {})", g.id, g.study))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // This node's retrieval of every grant (more grants of the same request may follow).
    let http = http(FINALITY);
    let deadline = Instant::now() + wait;
    let mut refreshed = Instant::now();
    let outcome = loop {
        if refreshed.elapsed() >= Duration::from_secs(1) {
            refreshed = Instant::now();
            let more = grants_of_request(&client, &id)?;
            if more.len() > grants.len() {
                grants = more;
            }
        }
        let ids: Vec<String> = grants.iter().map(|g| g.id.clone()).collect();
        let statuses = retrievals(&http, node)?;
        match progress(&statuses, &ids) {
            Progress::Done(outcomes) => break Ok(outcomes),
            Progress::Failed { grant, error } => {
                break Err(format!("the retrieval of grant {grant} failed: {error}"));
            }
            Progress::Waiting { done } => {
                if Instant::now() >= deadline {
                    break Err(format!(
                        "{done} of {} granted retrievals done after {} s more; see \
                         `share retrievals`, or run one with `share fetch --grant ID`",
                        ids.len(),
                        wait.as_secs()
                    ));
                }
            }
        }
        std::thread::sleep(POLL);
    };
    report["grants"] = json!(grants);
    match outcome {
        Ok(outcomes) => {
            let retrieved = started.elapsed().as_secs_f64();
            report["retrieved_seconds"] = json!(round3(retrieved));
            for o in &outcomes {
                eprintln!("{}", outcome_line(o));
            }
            report["outcomes"] = json!(outcomes);
            print(&report);
            eprintln!(
                "request {id}: granted after {granted:.2} s, retrieved and verified after \
                 {retrieved:.2} s"
            );
            Ok(())
        }
        Err(why) => {
            report["error"] = json!(why);
            print(&report);
            bail!(why)
        }
    }
}

/// A node's configuration (with an imaging section), its API URL and client, and the
/// member's signing key.
fn node_of(
    config: &Path,
    key_file: &Path,
    lacking: &str,
) -> Result<(NodeConfig, String, Client, SigningKey)> {
    let cfg = NodeConfig::load(config)
        .with_context(|| format!("cannot load the node configuration {}", config.display()))?;
    if cfg.imaging.is_none() {
        bail!(
            "{} has no imaging section: that node holds {lacking}",
            config.display()
        );
    }
    let node = format!("http://{}", cfg.api);
    let client = Client::new(&node);
    let key = signing_key(key_file)?;
    Ok((cfg, node, client, key))
}

fn grant(
    config: &Path,
    key_file: &Path,
    request_id: &str,
    explicit: &[Digest],
    expires_days: Option<u64>,
    delegable: bool,
) -> Result<()> {
    let (cfg, node, client, key) = node_of(config, key_file, "no studies to grant")?;
    let imaging = cfg.imaging.as_ref().expect("checked by node_of");
    let expires_ms = expiry(now_ms(), expires_days)?;
    let request: Request = client
        .value(&format!("request/{request_id}"))
        .with_context(|| format!("reading request {request_id} from {node}"))?
        .with_context(|| format!("no request {request_id} on the ledger of {node}"))?;
    if request.org == cfg.org {
        bail!(
            "request {request_id} is {}'s own: an organisation needs no grant",
            cfg.org
        );
    }
    let grantee: Org = client
        .value(&format!("org/{}", request.org))
        .with_context(|| format!("reading organisation {} from {node}", request.org))?
        .with_context(|| format!("no organisation {} on the ledger of {node}", request.org))?;
    let store_key = grantee.store_key.as_deref().with_context(|| {
        format!(
            "organisation {} has no store key on the ledger: no study key can be wrapped for it \
             (its admin sets one with a set-store-key operation)",
            grantee.id
        )
    })?;
    let recipient = PublicKey::from_text(store_key).with_context(|| {
        format!(
            "the store key of organisation {} on the ledger is not an X25519 public key",
            grantee.id
        )
    })?;
    let studies = client
        .studies()
        .with_context(|| format!("reading the studies from {node}"))?;
    let chosen = choose_studies(&request, &studies, &cfg.org, explicit)?;
    let (owner, store) = owner_store(imaging)?;
    let mut granted = Vec::new();
    let mut already = Vec::new();
    for root in chosen {
        let once = format!("request-grant/{request_id}/{root}");
        if let Some(existing) = client
            .value::<Value>(&once)
            .with_context(|| format!("reading {once} from {node}"))?
        {
            eprintln!("study {root}: already granted for request {request_id} ({existing})");
            already.push(json!({ "study": root, "grant": existing }));
            continue;
        }
        let wrapped = store
            .envelope_for(&root, &owner, &recipient)
            .with_context(|| {
                format!(
                    "cannot wrap the key of study {root} for {} from the store {}",
                    grantee.id, imaging.store
                )
            })?;
        let envelope = serde_json::to_string(&wrapped).context("serialising the envelope")?;
        let f = submit(
            &node,
            &key,
            Op::GrantAccess {
                request: request_id.to_string(),
                study: root,
                envelope,
                expires_ms,
                delegable,
            },
        )
        .with_context(|| format!("granting study {root} to {}", grantee.id))?;
        let id = created(&f, "grant")?;
        eprintln!(
            "grant {id}: study {root} to {} for {}{}, height {}",
            grantee.id,
            purpose_name(request.purpose),
            if request.break_glass {
                " (BREAK-GLASS)"
            } else {
                ""
            },
            f.height
        );
        granted.push(json!({ "grant": id, "study": root, "height": f.height }));
    }
    print(&json!({
        "request": request_id,
        "grantee": grantee.id,
        "purpose": request.purpose,
        "expires_ms": expires_ms,
        "delegable": delegable,
        "granted": granted,
        "already_granted": already,
    }));
    eprintln!(
        "request {request_id}: {} studies granted to {}, {} already granted",
        granted.len(),
        grantee.id,
        already.len()
    );
    Ok(())
}

fn delegate(config: &Path, key_file: &Path, grant_id: &str, to_org: &str) -> Result<()> {
    medledger_ledger::check_org_id(to_org)?;
    let (cfg, node, client, key) = node_of(config, key_file, "no received studies to delegate")?;
    let imaging = cfg.imaging.as_ref().expect("checked by node_of");
    let member: Member = client
        .value(&format!("member/{}", key.verifying_key()))
        .with_context(|| format!("reading the delegating member from {node}"))?
        .with_context(|| {
            format!(
                "the key in {} is not a member on the ledger of {node}",
                key_file.display()
            )
        })?;
    if member.org != cfg.org {
        bail!(
            "the key in {} is a member of {}, not of {}: a grant is delegated by a member of \
             its grantee, through the grantee's node",
            key_file.display(),
            member.org,
            cfg.org
        );
    }
    let grant: Grant = client
        .value(&format!("grant/{grant_id}"))
        .with_context(|| format!("reading grant {grant_id} from {node}"))?
        .with_context(|| format!("no grant {grant_id} on the ledger of {node}"))?;
    if grant.grantee != cfg.org {
        bail!(
            "grant {grant_id} is for {}, not for {}: only its grantee delegates it",
            grant.grantee,
            cfg.org
        );
    }
    if let Some(at) = grant.revoked_at {
        bail!("grant {grant_id} was revoked {}", utc(at));
    }
    if let Some(e) = grant.expires_ms.filter(|e| *e <= now_ms()) {
        bail!("grant {grant_id} expired {}", utc(e));
    }
    let study: Study = client
        .value(&format!("study/{}", grant.study))
        .with_context(|| format!("reading study {} from {node}", grant.study))?
        .with_context(|| format!("no study {} on the ledger of {node}", grant.study))?;
    if !grant.delegable {
        bail!(
            "grant {grant_id} does not allow delegation{}",
            if grant.delegated_from.is_some() {
                ": it was delegated itself, and a delegated grant is not delegated further"
                    .to_string()
            } else {
                format!(
                    ": the study's owner {} may grant a delegable one (`share grant --delegable`)",
                    study.owner
                )
            }
        );
    }
    if to_org == cfg.org {
        bail!("{to_org} holds grant {grant_id} already");
    }
    if to_org == study.owner {
        bail!(
            "{to_org} owns study {}: an organisation needs no grant",
            study.root
        );
    }
    let target: Org = client
        .value(&format!("org/{to_org}"))
        .with_context(|| format!("reading organisation {to_org} from {node}"))?
        .with_context(|| format!("no organisation {to_org} on the ledger of {node}"))?;
    if !target.active {
        bail!("organisation {to_org} is no longer an active member");
    }
    let store_key = target.store_key.as_deref().with_context(|| {
        format!(
            "organisation {to_org} has no store key on the ledger: no study key can be wrapped \
             for it (its admin sets one with a set-store-key operation)"
        )
    })?;
    let recipient = PublicKey::from_text(store_key).with_context(|| {
        format!("the store key of organisation {to_org} on the ledger is not an X25519 public key")
    })?;
    let (owner, store) = owner_store(imaging)?;
    let wrapped = match store.envelope_for(&grant.study, &owner, &recipient) {
        Ok(w) => w,
        Err(medledger_store::StoreError::UnknownRoot(_)) => bail!(
            "study {} of grant {grant_id} has not been received here yet (the store {} does not \
             hold it whole): fetch it first with `medledger share fetch --node {node} --grant \
             {grant_id}`",
            grant.study,
            imaging.store
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot wrap the key of study {} for {to_org} from the store {}",
                    grant.study, imaging.store
                )
            });
        }
    };
    let envelope = serde_json::to_string(&wrapped).context("serialising the envelope")?;
    let f = submit(
        &node,
        &key,
        Op::Delegate {
            grant: grant_id.to_string(),
            to_org: to_org.to_string(),
            envelope,
        },
    )
    .with_context(|| format!("delegating grant {grant_id} to {to_org}"))?;
    let id = created(&f, "grant")?;
    print(&json!({
        "grant": id,
        "delegated_from": grant_id,
        "study": grant.study,
        "grantee": to_org,
        "purpose": grant.purpose,
        "expires_ms": grant.expires_ms,
        "height": f.height,
    }));
    eprintln!(
        "grant {id}: study {} delegated from grant {grant_id} to {to_org} for {}, {}, height {}",
        grant.study,
        purpose_name(grant.purpose),
        match grant.expires_ms {
            Some(e) => format!("until {}", utc(e)),
            None => "no expiry".to_string(),
        },
        f.height
    );
    Ok(())
}

/// The studies a manual grant covers: those named (each checked against the request), else
/// the requested study, else every current study of the requested patient `org` owns (for
/// research, de-identified derivatives only).
fn choose_studies(
    request: &Request,
    studies: &[Study],
    org: &str,
    explicit: &[Digest],
) -> Result<Vec<Digest>> {
    let check = |root: &Digest| -> Result<Digest> {
        let s = studies
            .iter()
            .find(|s| s.root == *root)
            .with_context(|| format!("no study {root} is registered"))?;
        if s.owner != org {
            bail!("study {root} belongs to {}, not to {org}", s.owner);
        }
        match &request.target {
            Target::Study(t) if t != root => {
                bail!("request {} asked for study {t}, not {root}", request.id)
            }
            Target::Patient(p) if s.patient != *p => {
                bail!(
                    "study {root} is not of patient {p}, whom request {} asked for",
                    request.id
                )
            }
            _ => {}
        }
        if request.purpose == Purpose::Research && !s.is_derivative() {
            bail!(
                "study {root} is an identified original: research sees de-identified \
                 derivatives only"
            );
        }
        Ok(*root)
    };
    if !explicit.is_empty() {
        let mut out: Vec<Digest> = Vec::new();
        for root in explicit {
            let r = check(root)?;
            if !out.contains(&r) {
                out.push(r);
            }
        }
        return Ok(out);
    }
    match &request.target {
        Target::Study(root) => Ok(vec![check(root)?]),
        Target::Patient(p) => {
            let superseded = superseded(studies);
            let out: Vec<Digest> = studies
                .iter()
                .filter(|s| s.owner == org && s.patient == *p)
                .filter(|s| !superseded.contains(&s.root))
                .filter(|s| request.purpose != Purpose::Research || s.is_derivative())
                .map(|s| s.root)
                .collect();
            if out.is_empty() {
                bail!(
                    "{org} holds no current study of patient {p}{}",
                    if request.purpose == Purpose::Research {
                        " that research may see (a de-identified derivative)"
                    } else {
                        ""
                    }
                );
            }
            Ok(out)
        }
    }
}

/// The roots a newer version replaced (the ledger's `superseded/ROOT` entries).
fn superseded(studies: &[Study]) -> HashSet<Digest> {
    studies.iter().filter_map(|s| s.supersedes).collect()
}

/// The current studies of `patient`, except those `exclude_org` owns.
fn priors<'a>(studies: &'a [Study], patient: &str, exclude_org: Option<&str>) -> Vec<&'a Study> {
    let superseded = superseded(studies);
    studies
        .iter()
        .filter(|s| s.patient == patient)
        .filter(|s| exclude_org.is_none_or(|o| s.owner != o))
        .filter(|s| !superseded.contains(&s.root))
        .collect()
}

/// Every grant the owner made for request `id` (paging through `grant/`); not the grants
/// delegated from them, which carry the same request but are for another organisation.
fn grants_of_request(client: &Client, id: &str) -> Result<Vec<Grant>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = client
            .query("grant/", after.as_deref(), 1000)
            .with_context(|| format!("reading the grants from {}", client.base()))?;
        out.extend(matching_grants(&page.entries, id));
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

fn matching_grants(entries: &[QueryEntry], request: &str) -> Vec<Grant> {
    entries
        .iter()
        .filter(|e| e.value["request"] == request)
        .filter_map(|e| serde_json::from_value::<Grant>(e.value.clone()).ok())
        .filter(|g| g.delegated_from.is_none())
        .collect()
}

/// Where a set of retrievals stands, by the node's `GET /api/retrievals`.
#[derive(Debug, PartialEq)]
enum Progress {
    /// Some are not done yet (not started, or running).
    Waiting {
        done: usize,
    },
    /// Every one is done: their outcomes, in the order of the grants.
    Done(Vec<Value>),
    Failed {
        grant: String,
        error: String,
    },
}

fn progress(statuses: &[Value], grants: &[String]) -> Progress {
    let mut outcomes = Vec::new();
    for g in grants {
        let Some(s) = statuses.iter().find(|s| s["grant"] == g.as_str()) else {
            continue;
        };
        match s["state"].as_str() {
            Some("failed") => {
                return Progress::Failed {
                    grant: g.clone(),
                    error: s["error"].as_str().unwrap_or("no reason given").to_string(),
                };
            }
            Some("done") => outcomes.push(s["outcome"].clone()),
            _ => {}
        }
    }
    if outcomes.len() == grants.len() {
        Progress::Done(outcomes)
    } else {
        Progress::Waiting {
            done: outcomes.len(),
        }
    }
}

fn http(timeout: Duration) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .build()
        .expect("an HTTP client")
}

/// A JSON answer, or the node's `{"error": ...}` as an error naming the URL.
fn answer(url: &str, r: reqwest::Result<reqwest::blocking::Response>) -> Result<Value> {
    let r = r.with_context(|| format!("cannot reach {url}"))?;
    let status = r.status();
    let body = r
        .bytes()
        .with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        if status == reqwest::StatusCode::NOT_FOUND && message.trim().is_empty() {
            bail!(
                "{url}: 404: this node has no retrieval API (sharing needs node_cert in the \
                 imaging section of its configuration)"
            );
        }
        bail!("{url}: {status}: {message}");
    }
    serde_json::from_slice(&body).with_context(|| format!("{url}: the answer is not JSON"))
}

fn retrievals(http: &reqwest::blocking::Client, node: &str) -> Result<Vec<Value>> {
    let url = format!("{}/api/retrievals", node.trim_end_matches('/'));
    let v = answer(&url, http.get(&url).send())?;
    match v {
        Value::Array(a) => Ok(a),
        other => bail!("{url}: expected a list of retrievals, got {other}"),
    }
}

fn fetch(node: &str, grant: &str, series: Option<&str>) -> Result<Value> {
    let url = format!("{}/api/retrievals", node.trim_end_matches('/'));
    let mut body = json!({ "grant": grant });
    if let Some(s) = series {
        body["series"] = json!(s);
    }
    let r = http(FETCH_TIMEOUT).post(&url).json(&body).send();
    answer(&url, r).with_context(|| format!("retrieving grant {grant}"))
}

/// One line about a retrieval's outcome.
fn outcome_line(o: &Value) -> String {
    let n = |k: &str| o[k].as_u64().unwrap_or(0);
    let audit = match (o["audit"].as_str(), o["audit_error"].as_str()) {
        (Some(a), _) => format!("audit event {a}"),
        (None, Some(e)) => format!("not audited: {e}"),
        (None, None) => match &o["audit"] {
            Value::Null => "no audit event".to_string(),
            other => format!("audit event {other}"),
        },
    };
    format!(
        "grant {}: {} objects ({} fetched, {} resumed), {} of study {} from {}{} verified in \
         {:.2} s; {audit}",
        o["grant"].as_str().unwrap_or("?"),
        n("objects"),
        n("fetched_objects"),
        n("resumed_objects"),
        human_bytes(n("bytes")),
        o["root"].as_str().unwrap_or("?"),
        o["owner"].as_str().unwrap_or("?"),
        o["series"]
            .as_str()
            .map(|s| format!(" (series {s})"))
            .unwrap_or_default(),
        o["seconds"].as_f64().unwrap_or(0.0),
    )
}

/// A readable account of a patient's view: consents, grants, retrievals and refusals.
fn view_summary(view: &Value, now: u64) -> Vec<String> {
    let list = |k: &str| view[k].as_array().cloned().unwrap_or_default();
    let consents: Vec<Consent> = list("consents")
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let grants: Vec<Grant> = list("grants")
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let audit: Vec<AuditEvent> = list("audit")
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let mut out = vec![format!(
        "patient {}: {} studies, {} consents, {} grants, {} audit events",
        view["patient"].as_str().unwrap_or("?"),
        list("studies").len(),
        consents.len(),
        grants.len(),
        audit.len()
    )];
    for c in &consents {
        let state = lifetime(c.revoked_at, c.expires_ms, now, "in force");
        out.push(format!(
            "consent {}: {} for {}, given {}, {state}",
            c.id,
            purpose_name(c.purpose),
            recipient_name(&c.recipient),
            utc(c.granted_at)
        ));
    }
    for g in &grants {
        let state = lifetime(g.revoked_at, g.expires_ms, now, "active");
        out.push(format!(
            "grant {}: study {} to {} for {}, granted {}, {state}{}{}",
            g.id,
            g.study,
            g.grantee,
            purpose_name(g.purpose),
            utc(g.granted_at),
            g.delegated_from
                .as_ref()
                .map(|d| format!(", delegated from grant {d}"))
                .unwrap_or_default(),
            if g.break_glass { ", BREAK-GLASS" } else { "" }
        ));
    }
    for e in &audit {
        let what = match &e.refused {
            Some(reason) => format!("refused ({reason})"),
            None => "retrieval".to_string(),
        };
        out.push(format!(
            "audit #{} {}: {what}, {} -> {}, grant {}, {} objects, {}{}, recorded by {}",
            e.seq,
            utc(e.at),
            e.server_org,
            e.receiver_org,
            e.grant,
            e.objects,
            human_bytes(e.bytes),
            if e.break_glass { ", BREAK-GLASS" } else { "" },
            if e.recorded_by.is_empty() {
                "?"
            } else {
                &e.recorded_by
            }
        ));
    }
    out
}

fn pseudonym(p: &PatientArgs) -> Result<(medledger_deid::DeidKey, String)> {
    let key = medledger_deid::DeidKey::from_text(&read(&p.linkage_key)?).with_context(|| {
        format!(
            "{} is not a linkage key (a de-identification key)",
            p.linkage_key.display()
        )
    })?;
    let identity = medledger_deid::patient_identity(
        p.patient_id.as_deref().unwrap_or(""),
        p.name.as_deref().unwrap_or(""),
        p.birth_date.as_deref().unwrap_or(""),
    )
    .context("give the patient's --patient-id, or --name (and --birth-date)")?;
    let pseudonym = key.patient_pseudonym(&identity);
    Ok((key, pseudonym))
}

pub(crate) fn parse_purpose(s: &str) -> Result<Purpose, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "care" => Ok(Purpose::Care),
        "research" => Ok(Purpose::Research),
        _ => Err(format!("expected care or research, not {s:?}")),
    }
}

fn parse_class(s: &str) -> Result<OrgClass, String> {
    match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
        "hospital" => Ok(OrgClass::Hospital),
        "research" => Ok(OrgClass::Research),
        "patient-agent" => Ok(OrgClass::PatientAgent),
        _ => Err(format!(
            "expected hospital, research or patient-agent, not {s:?}"
        )),
    }
}

fn parse_digest(s: &str) -> Result<Digest, String> {
    Digest::from_hex(s.trim())
        .map_err(|e| format!("a study root is 64 hex digits (as `ledger studies` lists it): {e}"))
}

/// Exactly one of an organisation, a class or any member.
fn recipient(org: Option<String>, class: Option<OrgClass>, any: bool) -> Result<Recipient> {
    match (org, class, any) {
        (Some(o), None, false) => {
            medledger_ledger::check_org_id(&o)?;
            Ok(Recipient::Org(o))
        }
        (None, Some(c), false) => Ok(Recipient::Class(c)),
        (None, None, true) => Ok(Recipient::AnyMember),
        (None, None, false) => bail!("say whom the consent covers: --org, --class or --any"),
        _ => bail!("a consent covers one of --org, --class or --any, not several"),
    }
}

fn target(study: Option<Digest>, patient: Option<String>) -> Result<Target> {
    match (study, patient) {
        (Some(s), None) => Ok(Target::Study(s)),
        (None, Some(p)) => {
            check_patient(&p)?;
            Ok(Target::Patient(p))
        }
        (None, None) => bail!("say what is requested: --study or --patient"),
        (Some(_), Some(_)) => bail!("a request is for a --study or a --patient, not both"),
    }
}

fn check_patient(p: &str) -> Result<()> {
    medledger_ledger::check_pseudonym(p)
        .with_context(|| format!("{p:?} is not a patient pseudonym (see `share pseudonym`)"))
}

/// The expiry `days` from `now` (ms since the epoch); none without `days`.
fn expiry(now: u64, days: Option<u64>) -> Result<Option<u64>> {
    let Some(days) = days else {
        return Ok(None);
    };
    if days == 0 {
        bail!("an expiry of 0 days has passed already; give at least 1");
    }
    days.checked_mul(DAY_MS)
        .and_then(|d| now.checked_add(d))
        .map(Some)
        .with_context(|| format!("{days} days from now is too far"))
}

fn created(f: &Finality, what: &str) -> Result<String> {
    f.receipt
        .created
        .clone()
        .with_context(|| format!("transaction {} created no {what}", f.tx))
}

fn submit(node: &str, key: &SigningKey, op: Op) -> Result<Finality> {
    Client::new(node)
        .execute(key, op, FINALITY)
        .with_context(|| format!("submitting to {node}"))
}

/// Submits a revocation (of a consent or a grant) and reports the height it is final at.
fn revoke(node: &str, key_file: &Path, what: &str, id: &str, op: Op) -> Result<()> {
    let key = signing_key(key_file)?;
    let f = submit(node, &key, op)?;
    print(&json!({ what: id, "revoked": true, "height": f.height }));
    eprintln!("{what} {id} revoked at height {}", f.height);
    Ok(())
}

/// Where a consent or grant stands: revoked, expired, or `live` (until its expiry).
fn lifetime(revoked_at: Option<u64>, expires_ms: Option<u64>, now: u64, live: &str) -> String {
    match (revoked_at, expires_ms) {
        (Some(r), _) => format!("revoked {}", utc(r)),
        (None, Some(e)) if e <= now => format!("expired {}", utc(e)),
        (None, Some(e)) => format!("{live} until {}", utc(e)),
        (None, None) => live.to_string(),
    }
}

fn signing_key(path: &Path) -> Result<SigningKey> {
    SigningKey::from_text(&read(path)?)
        .with_context(|| format!("{} is not a signing key", path.display()))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn print(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON"));
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn purpose_name(p: Purpose) -> &'static str {
    match p {
        Purpose::Care => "care",
        Purpose::Research => "research",
    }
}

fn recipient_name(r: &Recipient) -> String {
    match r {
        Recipient::Org(o) => format!("organisation {o}"),
        Recipient::Class(OrgClass::Hospital) => "every hospital".to_string(),
        Recipient::Class(OrgClass::Research) => "every research organisation".to_string(),
        Recipient::Class(OrgClass::PatientAgent) => "every patient agent".to_string(),
        Recipient::AnyMember => "any member organisation".to_string(),
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SSZ` (UTC).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// This node's store and the key that owns what is in it.
fn owner_store(
    imaging: &medledger_node::ImagingConfig,
) -> Result<(SecretKey, medledger_store::Store)> {
    let owner = SecretKey::from_text(&read(&imaging.store_key)?).with_context(|| {
        format!(
            "{} is not a store key (X25519 secret key)",
            imaging.store_key.display()
        )
    })?;
    let store = medledger_store::Store::open_existing(&imaging.store)
        .with_context(|| format!("cannot open the store {}", imaging.store))?;
    Ok((owner, store))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: ShareCommand,
    }

    fn root(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn study(n: u8, owner: &str, patient: &str) -> Study {
        Study {
            root: root(n),
            owner: owner.into(),
            patient: patient.into(),
            modality: "CT".into(),
            instances: 10,
            bytes: 1000,
            derived_from: None,
            deid: None,
            supersedes: None,
            registered_at: 1,
        }
    }

    fn derivative(n: u8, of: u8, owner: &str, patient: &str) -> Study {
        Study {
            derived_from: Some(root(of)),
            ..study(n, owner, patient)
        }
    }

    const P: &str = "MLAAAAAAAAAAAAAAAA";
    const Q: &str = "MLBBBBBBBBBBBBBBBB";

    fn req(target: Target, purpose: Purpose) -> Request {
        Request {
            id: "r1".into(),
            org: "hospital-b".into(),
            requester: SigningKey::generate().verifying_key(),
            target,
            purpose,
            break_glass: false,
            at: 1,
        }
    }

    #[test]
    fn every_subcommand_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn purposes_and_classes_parse() {
        assert_eq!(parse_purpose("care"), Ok(Purpose::Care));
        assert_eq!(parse_purpose(" Research "), Ok(Purpose::Research));
        assert!(parse_purpose("billing").is_err());
        assert_eq!(parse_class("patient-agent"), Ok(OrgClass::PatientAgent));
        assert_eq!(parse_class("hospital"), Ok(OrgClass::Hospital));
        assert!(parse_class("pharma").is_err());
    }

    #[test]
    fn exactly_one_recipient() {
        assert_eq!(
            recipient(Some("hospital-b".into()), None, false).unwrap(),
            Recipient::Org("hospital-b".into())
        );
        assert_eq!(
            recipient(None, Some(OrgClass::Research), false).unwrap(),
            Recipient::Class(OrgClass::Research)
        );
        assert_eq!(recipient(None, None, true).unwrap(), Recipient::AnyMember);
        assert!(recipient(None, None, false).is_err());
        assert!(recipient(Some("hospital-b".into()), None, true).is_err());
        assert!(recipient(Some("Hospital B".into()), None, false).is_err());
    }

    #[test]
    fn consent_arguments_are_exclusive() {
        let base = [
            "x",
            "consent",
            "--key-file",
            "k",
            "--patient",
            P,
            "--purpose",
            "care",
        ];
        let with = |extra: &[&str]| {
            Cli::try_parse_from(base.iter().chain(extra.iter()).copied()).map(|c| c.cmd)
        };
        assert!(with(&[]).is_err(), "a recipient is required");
        assert!(with(&["--org", "a", "--any"]).is_err());
        match with(&["--class", "hospital", "--expires-days", "7"]).unwrap() {
            ShareCommand::Consent {
                class,
                expires_days,
                purpose,
                ..
            } => {
                assert_eq!(class, Some(OrgClass::Hospital));
                assert_eq!(expires_days, Some(7));
                assert_eq!(purpose, Purpose::Care);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["x", "request", "--key-file", "k", "--purpose", "care"]).is_err()
        );
    }

    #[test]
    fn delegate_names_the_grant_and_the_organisation() {
        let args = [
            "x",
            "delegate",
            "--config",
            "b/node.json",
            "--key-file",
            "k",
            "--grant",
            "g1",
            "--to-org",
            "research",
        ];
        match Cli::try_parse_from(args).unwrap().cmd {
            ShareCommand::Delegate { grant, to_org, .. } => {
                assert_eq!((grant.as_str(), to_org.as_str()), ("g1", "research"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(&args[..8]).is_err(),
            "--to-org is required"
        );
    }

    #[test]
    fn expiry_is_days_from_now() {
        assert_eq!(expiry(5, None).unwrap(), None);
        assert_eq!(expiry(5, Some(2)).unwrap(), Some(5 + 2 * 86_400_000));
        assert!(expiry(5, Some(0)).is_err());
        assert!(expiry(u64::MAX - 10, Some(1)).is_err());
        assert!(expiry(0, Some(u64::MAX)).is_err());
    }

    #[test]
    fn targets_check_the_pseudonym() {
        assert_eq!(
            target(None, Some(P.into())).unwrap(),
            Target::Patient(P.into())
        );
        assert_eq!(target(Some(root(1)), None).unwrap(), Target::Study(root(1)));
        assert!(target(None, Some("Doe^John".into())).is_err());
        assert!(target(None, None).is_err());
        assert!(target(Some(root(1)), Some(P.into())).is_err());
    }

    #[test]
    fn manual_grant_picks_current_studies_of_the_patient() {
        let mut newer = study(2, "hospital-a", P);
        newer.supersedes = Some(root(1));
        let studies = vec![
            study(1, "hospital-a", P),
            newer,
            derivative(3, 2, "hospital-a", P),
            study(4, "hospital-c", P),
            study(5, "hospital-a", Q),
        ];
        let care = req(Target::Patient(P.into()), Purpose::Care);
        assert_eq!(
            choose_studies(&care, &studies, "hospital-a", &[]).unwrap(),
            vec![root(2), root(3)]
        );
        let research = req(Target::Patient(P.into()), Purpose::Research);
        assert_eq!(
            choose_studies(&research, &studies, "hospital-a", &[]).unwrap(),
            vec![root(3)]
        );
        // Nothing of this patient at this site.
        assert!(choose_studies(&care, &studies, "hospital-d", &[]).is_err());
        // Named studies are checked against the request.
        assert_eq!(
            choose_studies(&care, &studies, "hospital-a", &[root(1), root(1)]).unwrap(),
            vec![root(1)]
        );
        assert!(choose_studies(&care, &studies, "hospital-a", &[root(4)]).is_err());
        assert!(choose_studies(&care, &studies, "hospital-a", &[root(5)]).is_err());
        assert!(choose_studies(&research, &studies, "hospital-a", &[root(2)]).is_err());
        assert!(choose_studies(&care, &studies, "hospital-a", &[root(9)]).is_err());
        // A study request: that study, if this site owns it.
        let one = req(Target::Study(root(2)), Purpose::Care);
        assert_eq!(
            choose_studies(&one, &studies, "hospital-a", &[]).unwrap(),
            vec![root(2)]
        );
        assert!(choose_studies(&one, &studies, "hospital-c", &[]).is_err());
        assert!(choose_studies(&one, &studies, "hospital-a", &[root(3)]).is_err());
    }

    #[test]
    fn priors_leave_out_own_and_superseded_studies() {
        let mut newer = study(2, "hospital-a", P);
        newer.supersedes = Some(root(1));
        let studies = vec![
            study(1, "hospital-a", P),
            newer,
            study(3, "hospital-b", P),
            study(4, "hospital-c", Q),
        ];
        let roots = |v: Vec<&Study>| v.iter().map(|s| s.root).collect::<Vec<_>>();
        assert_eq!(roots(priors(&studies, P, None)), vec![root(2), root(3)]);
        assert_eq!(
            roots(priors(&studies, P, Some("hospital-b"))),
            vec![root(2)]
        );
        assert!(priors(&studies, "MLCCCCCCCCCCCCCCCC", None).is_empty());
    }

    #[test]
    fn grants_are_matched_to_their_request() {
        let grant = |id: &str, request: &str| Grant {
            id: id.into(),
            request: request.into(),
            study: root(1),
            grantee: "hospital-b".into(),
            purpose: Purpose::Care,
            break_glass: false,
            envelope: "{}".into(),
            expires_ms: None,
            delegable: false,
            delegated_from: None,
            granted_at: 1,
            revoked_at: None,
        };
        let delegated = Grant {
            grantee: "research".into(),
            delegated_from: Some("g1".into()),
            ..grant("g4", "r1")
        };
        let entries: Vec<QueryEntry> = [
            grant("g1", "r1"),
            grant("g2", "r2"),
            grant("g3", "r1"),
            delegated,
        ]
        .iter()
        .map(|g| QueryEntry {
            key: format!("grant/{}", g.id),
            value: serde_json::to_value(g).unwrap(),
        })
        .chain([QueryEntry {
            key: "grant/odd".into(),
            value: json!({ "request": "r1" }),
        }])
        .collect();
        let ids: Vec<String> = matching_grants(&entries, "r1")
            .into_iter()
            .map(|g| g.id)
            .collect();
        assert_eq!(ids, vec!["g1", "g3"]);
        assert!(matching_grants(&entries, "r9").is_empty());
    }

    #[test]
    fn retrieval_progress() {
        let grants = vec!["g1".to_string(), "g2".to_string()];
        let s =
            |g: &str, state: &str| json!({ "grant": g, "state": state, "outcome": { "grant": g } });
        assert_eq!(progress(&[], &grants), Progress::Waiting { done: 0 });
        assert_eq!(
            progress(
                &[s("g1", "done"), s("g2", "running"), s("g9", "failed")],
                &grants
            ),
            Progress::Waiting { done: 1 }
        );
        assert_eq!(
            progress(&[s("g2", "done"), s("g1", "done")], &grants),
            Progress::Done(vec![json!({ "grant": "g1" }), json!({ "grant": "g2" })])
        );
        assert_eq!(
            progress(
                &[
                    s("g1", "done"),
                    json!({ "grant": "g2", "state": "failed", "error": "tampered" })
                ],
                &grants
            ),
            Progress::Failed {
                grant: "g2".into(),
                error: "tampered".into()
            }
        );
    }

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20Z");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn patient_view_summary_flags_break_glass_and_refusals() {
        let view = json!({
            "patient": P,
            "studies": [{}],
            "consents": [{
                "id": "c1", "patient": P, "purpose": "care",
                "recipient": { "org": "hospital-b" }, "granted_at": 0, "revoked_at": 1000
            }],
            "grants": [{
                "id": "g1", "request": "r1", "study": root(1), "grantee": "hospital-b",
                "purpose": "care", "break_glass": true, "envelope": "{}", "delegable": false,
                "granted_at": 0, "expires_ms": 5
            }],
            "audit": [
                {
                    "seq": 1, "grant": "g1", "study": root(1), "server_org": "hospital-a",
                    "receiver_org": "hospital-b", "objects": 3, "bytes": 2048,
                    "break_glass": true, "at": 0, "recorded_by": "hospital-a"
                },
                {
                    "seq": 2, "grant": "g1", "study": root(1), "server_org": "hospital-a",
                    "receiver_org": "hospital-b", "objects": 0, "bytes": 0,
                    "break_glass": false, "at": 0, "refused": "grant revoked",
                    "recorded_by": "hospital-a"
                }
            ]
        });
        let lines = view_summary(&view, 10);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(lines[0].contains("1 studies, 1 consents, 1 grants, 2 audit events"));
        assert!(lines[1].contains("organisation hospital-b") && lines[1].contains("revoked"));
        assert!(lines[2].contains("to hospital-b for care") && lines[2].contains("expired"));
        assert!(lines[2].ends_with("BREAK-GLASS"));
        assert!(lines[3].contains("retrieval, hospital-a -> hospital-b"));
        assert!(lines[3].contains("2.0 KiB, BREAK-GLASS"));
        assert!(lines[4].contains("refused (grant revoked)"));
        assert!(!lines[4].contains("BREAK-GLASS"));
    }
}

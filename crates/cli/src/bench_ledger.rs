//! `medledger bench ledger`: four nodes as separate processes on loopback, concurrent clients
//! submitting study registrations, consents and access requests at an offered rate; committed
//! transactions per second and submit-to-finality latency (p50, p99), measured at one node.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use medledger_crypto::{Digest, SigningKey};
use medledger_ledger::identity::{self, OrgCa};
use medledger_ledger::{Op, Purpose, Recipient, Role, Target, Tx};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct BenchLedgerArgs {
    /// How long clients submit.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Offered load, transactions per second, over all clients.
    #[arg(long, default_value_t = 6000)]
    pub rate: u64,
    /// Concurrent clients (each sends to one node, round robin).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    #[arg(long)]
    pub json: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn post(client: &reqwest::blocking::Client, url: &str, body: Vec<u8>) -> Result<Value> {
    let r = client
        .post(url)
        .body(body)
        .send()
        .with_context(|| format!("cannot reach {url}"))?;
    Ok(r.json()?)
}

const PATIENTS: [&str; 4] = [
    "MLAAAAAAAAAAAAAAAA",
    "MLBBBBBBBBBBBBBBBB",
    "MLCCCCCCCCCCCCCCCC",
    "MLDDDDDDDDDDDDDDDD",
];

pub fn run(args: BenchLedgerArgs) -> Result<()> {
    let tmp = tempfile_dir()?;
    let dir = tmp.join("net");
    let base = 30_000 + (std::process::id() % 1_000) as u16 * 8;
    let orgs = ["hospital-a", "hospital-b", "research", "patients"]
        .iter()
        .map(|o| medledger_node::parse_org(o))
        .collect::<Result<Vec<_>, _>>()?;
    let init = medledger_node::init_network(&dir, "medledger-bench", &orgs, base)?;
    // Ledger nodes only: the load registers studies no store holds and requests access to
    // them, which an imaging service would chase as phantom studies. What is measured is the
    // ledger (over its plain API, as the clients here use it).
    for path in &init.configs {
        let mut cfg = medledger_node::NodeConfig::load(path)?;
        cfg.imaging = None;
        cfg.https = None;
        std::fs::write(path, serde_json::to_vec_pretty(&cfg)?)?;
    }
    // The nodes are stopped whatever happened, a failed start included.
    let result = crate::network_cmd::up_quiet(&dir).and_then(|()| measure(&args, &dir, base));
    let _ = crate::network_cmd::down_quiet(&dir);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("medledger-bench-ledger-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn key(dir: &Path, org: &str) -> Result<SigningKey> {
    Ok(SigningKey::from_text(&std::fs::read_to_string(
        dir.join(org).join("admin.key"),
    )?)?)
}

fn org_ca(dir: &Path, org: &str) -> Result<OrgCa> {
    let d = dir.join(org);
    Ok(OrgCa::from_parts(
        SigningKey::from_text(&std::fs::read_to_string(d.join("ca.key"))?)?,
        &std::fs::read_to_string(d.join("ca.pem"))?,
    )?)
}

fn measure(args: &BenchLedgerArgs, dir: &Path, base: u16) -> Result<()> {
    let apis: Vec<String> = (0..4)
        .map(|i| format!("http://127.0.0.1:{}", base + 100 + i))
        .collect();
    let client = reqwest::blocking::Client::new();
    let chain = "medledger-bench";
    // Set-up: members who will sign the load (clinicians at both hospitals, researchers,
    // staff of the patients' agent), each with its own nonce sequence.
    let per_org = 32u8;
    let mut members: Vec<(SigningKey, &'static str)> = Vec::new();
    let mut setup = Vec::new();
    for (org, role, kind) in [
        ("hospital-a", Role::Clinician, "register"),
        ("hospital-b", Role::Clinician, "request"),
        ("research", Role::Researcher, "research"),
        ("patients", Role::Clinician, "consent"),
    ] {
        let admin = key(dir, org)?;
        let ca = org_ca(dir, org)?;
        for n in 0..per_org {
            let mut seed = [0u8; 32];
            seed[0] = n;
            seed[1..1 + org.len().min(31)].copy_from_slice(&org.as_bytes()[..org.len().min(31)]);
            let m = SigningKey::from_seed(seed);
            setup.push(Tx::sign(
                chain,
                &admin,
                n as u64 + 1,
                Op::AddMember {
                    certificate: ca
                        .issue(
                            &m.verifying_key(),
                            &format!("{org} load {n}"),
                            &[role],
                            None,
                            &[],
                            identity::FOREVER_MS,
                        )?
                        .to_pem(),
                },
            ));
            members.push((m, kind));
        }
    }
    post(
        &client,
        &format!("{}/api/txs", apis[0]),
        serde_json::to_vec(&setup)?,
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = client
            .get(format!(
                "{}/api/nonce/{}",
                apis[0],
                members
                    .last()
                    .map(|m| m.0.verifying_key())
                    .expect("members")
            ))
            .send()?
            .json()?;
        let admins_done = ["hospital-a", "hospital-b", "research", "patients"]
            .iter()
            .all(|o| {
                key(dir, o)
                    .ok()
                    .and_then(|k| {
                        client
                            .get(format!("{}/api/nonce/{}", apis[0], k.verifying_key()))
                            .send()
                            .ok()
                    })
                    .and_then(|r| r.json::<Value>().ok())
                    .is_some_and(|v| v["next"].as_u64() == Some(per_org as u64 + 1))
            });
        let _ = v;
        if admins_done {
            break;
        }
        if Instant::now() > deadline {
            bail!("the set-up transactions did not finalise in 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Load: clients split the members, submit batches every 100 ms at the offered rate.
    let submitted: Arc<Mutex<HashMap<String, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let refused = Arc::new(Mutex::new(0u64));
    let members = Arc::new(members);
    let per_tick = (args.rate / 10).max(1) as usize / args.clients.max(1);
    let start = Instant::now();
    let started_ms = now_ms();
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    std::thread::scope(|s| {
        for c in 0..args.clients {
            let submitted = submitted.clone();
            let refused = refused.clone();
            let members = members.clone();
            let api = apis[c % 4].clone();
            let counter = counter.clone();
            s.spawn(move || {
                let client = reqwest::blocking::Client::new();
                let mine: Vec<usize> = (0..members.len())
                    .filter(|i| i % args.clients == c)
                    .collect();
                let mut nonces: HashMap<usize, u64> = HashMap::new();
                let mut next = 0usize;
                while start.elapsed() < Duration::from_secs(args.seconds) {
                    let tick = Instant::now();
                    let mut batch = Vec::with_capacity(per_tick);
                    for _ in 0..per_tick {
                        let i = mine[next % mine.len()];
                        next += 1;
                        let (k, kind) = &members[i];
                        let nonce = nonces.entry(i).or_insert(0);
                        *nonce += 1;
                        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let patient = PATIENTS[(n % 4) as usize].to_string();
                        let op = match *kind {
                            "register" => Op::RegisterStudy {
                                root: Digest::of(&n.to_le_bytes()),
                                patient,
                                modality: "CT".into(),
                                instances: 64,
                                bytes: 33_800_000,
                                derived_from: None,
                                deid: None,
                                supersedes: None,
                            },
                            "request" => Op::RequestAccess {
                                target: Target::Patient(patient),
                                purpose: Purpose::Care,
                                break_glass: false,
                            },
                            "research" => Op::RequestAccess {
                                target: Target::Patient(patient),
                                purpose: Purpose::Research,
                                break_glass: false,
                            },
                            _ => Op::GrantConsent {
                                patient,
                                purpose: Purpose::Care,
                                recipient: Recipient::Org("hospital-b".into()),
                                expires_ms: None,
                            },
                        };
                        batch.push(Tx::sign(chain, k, *nonce, op));
                    }
                    let t = now_ms();
                    let ids: Vec<String> = batch.iter().map(|t| t.id().to_hex()).collect();
                    match serde_json::to_vec(&batch)
                        .ok()
                        .and_then(|b| post(&client, &format!("{api}/api/txs"), b).ok())
                    {
                        Some(Value::Array(answers)) => {
                            let mut sub = submitted.lock().unwrap();
                            for (id, a) in ids.into_iter().zip(answers) {
                                if a.get("tx").is_some() {
                                    sub.insert(id, t);
                                } else {
                                    *refused.lock().unwrap() += 1;
                                }
                            }
                        }
                        _ => *refused.lock().unwrap() += batch.len() as u64,
                    }
                    if let Some(rest) = Duration::from_millis(100).checked_sub(tick.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            });
        }
    });
    let submit_secs = start.elapsed().as_secs_f64();

    // Finality, as node 0 saw it.
    let total = submitted.lock().unwrap().len();
    let mut latencies: Vec<u64> = Vec::with_capacity(total);
    let mut last_final = started_ms;
    let mut from = 0u64;
    let mut seen: HashMap<String, ()> = HashMap::new();
    let wait_until = Instant::now() + Duration::from_secs(60);
    while seen.len() < total && Instant::now() < wait_until {
        let v: Value = client
            .get(format!("{}/api/blocks/{from}", apis[0]))
            .send()?
            .json()?;
        let list = v.as_array().cloned().unwrap_or_default();
        let sub = submitted.lock().unwrap();
        for b in &list {
            let ms = b["applied_ms"].as_u64().unwrap_or(0);
            for id in b["txs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["tx"].as_str())
            {
                if let Some(t) = sub.get(id)
                    && seen.insert(id.to_string(), ()).is_none()
                {
                    latencies.push(ms.saturating_sub(*t));
                    last_final = last_final.max(ms);
                }
            }
            from = from.max(b["height"].as_u64().unwrap_or(0) + 1);
        }
        drop(sub);
        if list.len() < 1000 {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let span = (last_final.saturating_sub(started_ms)) as f64 / 1000.0;
    let committed = latencies.len() as f64 / span.max(0.001);
    let status: Value = client
        .get(format!("{}/api/status", apis[0]))
        .send()?
        .json()?;
    let report = serde_json::json!({
        "nodes": 4,
        "clients": args.clients,
        "offered_tx_per_s": args.rate,
        "submitted": total,
        "refused_at_submit": *refused.lock().unwrap(),
        "finalised": latencies.len(),
        "submit_seconds": submit_secs,
        "committed_tx_per_s": committed,
        "latency_ms_p50": pct(0.50),
        "latency_ms_p99": pct(0.99),
        "height": status["height"],
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "4 nodes (processes, loopback), {} clients, offered {} tx/s for {} s",
            args.clients, args.rate, args.seconds
        );
        println!(
            "submitted {total}, finalised {}, committed {:.0} tx/s; submit-to-finality p50 {} ms, p99 {} ms",
            latencies.len(),
            committed,
            pct(0.50),
            pct(0.99)
        );
        println!(
            "target: >= 5000 tx/s with p99 < 1000 ms (Fabric 2.5: about 2,900 tx/s on 40 cores)"
        );
    }
    Ok(())
}

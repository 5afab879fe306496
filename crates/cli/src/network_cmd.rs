//! `medledger network`, `medledger node` and `medledger ledger`: a local network of one node
//! per organisation as separate processes, and a client for the ledger's API.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use medledger_crypto::SigningKey;
use medledger_ledger::{Op, Tx};
use medledger_node::NodeConfig;
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Create a network: per organisation a node configuration and keys, and the genesis.
    Init {
        /// Organisations, comma separated; `name:class` with class hospital, research or
        /// patient-agent (by default from the name). At least four.
        #[arg(long, value_delimiter = ',', required = true)]
        orgs: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "medledger-local")]
        chain: String,
        /// p2p ports are base, base+1, ...; API ports base+100, base+101, ...
        #[arg(long, default_value_t = 7100)]
        base_port: u16,
    },
    /// Start every node of a network folder as a separate process.
    Up { dir: PathBuf },
    /// Stop the nodes `up` started.
    Down { dir: PathBuf },
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// The node's configuration (from `network init`).
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// The node's chain, height, state root and organisations.
    Status(NodeUrl),
    /// Every registered study.
    Studies(NodeUrl),
    /// Every recorded retrieval.
    Audit(NodeUrl),
    /// Sign and submit an operation (JSON, as in the `Op` type), wait until it is final.
    Submit {
        #[command(flatten)]
        node: NodeUrl,
        /// The member's signing key file.
        #[arg(long)]
        key_file: PathBuf,
        /// The operation, e.g. '{"op":"add-member","key":"...","roles":["clinician"]}'.
        op: String,
    },
    /// A state entry with its Merkle proof against the current state root.
    Prove {
        #[command(flatten)]
        node: NodeUrl,
        key: String,
    },
}

#[derive(Args, Debug)]
pub struct NodeUrl {
    /// The node's API, e.g. http://127.0.0.1:7200.
    #[arg(long, env = "MEDLEDGER_NODE", default_value = "http://127.0.0.1:7200")]
    pub node: String,
}

pub fn run_node(args: NodeArgs) -> Result<()> {
    let cfg = NodeConfig::load(&args.config)?;
    eprintln!(
        "node of {} on chain {}: p2p {}, API http://{}",
        cfg.org, cfg.chain, cfg.p2p, cfg.api
    );
    medledger_node::run_node(cfg)?;
    Ok(())
}

pub fn run_network(cmd: NetworkCommand) -> Result<()> {
    match cmd {
        NetworkCommand::Init {
            orgs,
            out,
            chain,
            base_port,
        } => {
            let orgs = orgs
                .iter()
                .map(|o| medledger_node::parse_org(o))
                .collect::<Result<Vec<_>, _>>()?;
            let done = medledger_node::init_network(&out, &chain, &orgs, base_port)?;
            for c in &done.configs {
                println!("{}", c.display());
            }
            eprintln!(
                "network {chain} of {} organisations in {}; start it with `medledger network up {}`",
                orgs.len(),
                out.display(),
                out.display()
            );
            Ok(())
        }
        NetworkCommand::Up { dir } => up(&dir),
        NetworkCommand::Down { dir } => down(&dir),
    }
}

/// Starts a network's nodes without printing (for benchmarks).
pub fn up_quiet(dir: &Path) -> Result<()> {
    up(dir)
}

/// Stops a network's nodes.
pub fn down_quiet(dir: &Path) -> Result<()> {
    down(dir)
}

fn node_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let p = e?.path();
        if p.join("node.json").is_file() {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        bail!(
            "no node configurations under {} (run `medledger network init`)",
            dir.display()
        );
    }
    Ok(out)
}

fn up(dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the medledger binary")?;
    let mut apis = Vec::new();
    for d in node_dirs(dir)? {
        let pid_file = d.join("node.pid");
        if let Some(pid) = read_pid(&pid_file)
            && alive(pid)
        {
            eprintln!("{} already running (pid {pid})", d.display());
            continue;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("node.log"))?;
        let child = Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(d.join("node.json"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start the node in {}", d.display()))?;
        std::fs::write(&pid_file, child.id().to_string())?;
        let cfg = NodeConfig::load(&d.join("node.json"))?;
        println!(
            "started {} (pid {}), API http://{}",
            cfg.org,
            child.id(),
            cfg.api
        );
        apis.push(format!("http://{}", cfg.api));
    }
    // Wait until every API answers.
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for api in &apis {
        while client.get(format!("{api}/api/status")).send().is_err() {
            if Instant::now() > deadline {
                bail!("node at {api} did not answer in 30 s; see its node.log");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

fn down(dir: &Path) -> Result<()> {
    for d in node_dirs(dir)? {
        let pid_file = d.join("node.pid");
        let Some(pid) = read_pid(&pid_file) else {
            continue;
        };
        if alive(pid)
            && let Some(p) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
            println!("stopped {} (pid {pid})", d.display());
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    Ok(())
}

fn get(url: &str) -> Result<Value> {
    let r = reqwest::blocking::get(url).with_context(|| format!("cannot reach {url}"))?;
    let status = r.status();
    let v: Value = r.json().with_context(|| format!("{url}: not JSON"))?;
    if !status.is_success() {
        bail!("{url}: {status}: {}", v["error"].as_str().unwrap_or(""));
    }
    Ok(v)
}

pub fn run_ledger(cmd: LedgerCommand) -> Result<()> {
    let print = |v: Value| println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
    match cmd {
        LedgerCommand::Status(n) => print(get(&format!("{}/api/status", n.node))?),
        LedgerCommand::Studies(n) => print(get(&format!("{}/api/studies", n.node))?),
        LedgerCommand::Audit(n) => print(get(&format!("{}/api/audit", n.node))?),
        LedgerCommand::Prove { node, key } => {
            print(get(&format!("{}/api/state/{key}", node.node))?)
        }
        LedgerCommand::Submit { node, key_file, op } => {
            let key = SigningKey::from_text(
                &std::fs::read_to_string(&key_file)
                    .with_context(|| format!("cannot read {}", key_file.display()))?,
            )?;
            let op: Op =
                serde_json::from_str(&op).context("the operation is not valid JSON for an Op")?;
            let status = get(&format!("{}/api/status", node.node))?;
            let chain = status["chain"].as_str().unwrap_or_default().to_string();
            let nonce = get(&format!("{}/api/nonce/{}", node.node, key.verifying_key()))?["next"]
                .as_u64()
                .unwrap_or(1);
            let tx = Tx::sign(&chain, &key, nonce, op);
            let client = reqwest::blocking::Client::new();
            let r = client
                .post(format!("{}/api/tx", node.node))
                .body(tx.to_bytes())
                .send()
                .context("cannot submit")?;
            let ok = r.status().is_success();
            let v: Value = r.json()?;
            if !ok {
                bail!("refused: {}", v["error"].as_str().unwrap_or("?"));
            }
            let id = v["tx"].as_str().unwrap_or_default().to_string();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(receipt) = get(&format!("{}/api/tx/{id}", node.node)) {
                    print(receipt.clone());
                    if receipt["receipt"]["error"].is_null() {
                        return Ok(());
                    }
                    bail!("the transaction was finalised but refused by the contracts");
                }
                if Instant::now() > deadline {
                    bail!("transaction {id} not final after 30 s");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(())
}

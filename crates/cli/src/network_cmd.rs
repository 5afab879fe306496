//! `medledger network`, `medledger node` and `medledger ledger`: a local network of one node
//! per organisation as separate processes, and a client for the ledger's API.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use medledger_crypto::{Certificate, SigningKey};
use medledger_ledger::identity::OrgCa;
use medledger_ledger::{Op, Role};
use medledger_node::{Client, NodeConfig};

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
        /// p2p ports are base, base+1, ...; HTTP (API, DICOMweb) base+100, ...; DIMSE base+200, ...
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
    /// State entries under a key prefix (e.g. `member/`, `study/`, `grant/`, `org/`), with
    /// the state root they were read at.
    Query {
        #[command(flatten)]
        node: NodeUrl,
        /// The key prefix; empty for everything.
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many entries.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Start after this key (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Finalised blocks and every transaction's outcome, from a height on.
    History {
        #[command(flatten)]
        node: NodeUrl,
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Only blocks that carry transactions.
        #[arg(long)]
        non_empty: bool,
    },
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
        /// The operation, e.g. '{"op":"revoke-consent","consent":"..."}'.
        op: String,
    },
    /// Register a member by the certificate their organisation's CA issued (`identity issue`),
    /// signed by an admin of that organisation.
    AddMember {
        #[command(flatten)]
        node: NodeUrl,
        /// The admin's signing key file.
        #[arg(long)]
        key_file: PathBuf,
        /// The member's certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
    },
    /// A state entry with its Merkle proof, checked here against the node's state root.
    Prove {
        #[command(flatten)]
        node: NodeUrl,
        key: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum IdentityCommand {
    /// Issue a member certificate with the organisation's CA (from `network init`): writes
    /// OUT.key (the member's signing key, private) and OUT.pem (the certificate).
    Issue {
        /// The organisation's folder holding ca.key and ca.pem.
        #[arg(long)]
        ca: PathBuf,
        /// The member's name (certificate CN).
        #[arg(long)]
        name: String,
        /// Roles, comma separated: admin, clinician, researcher, patient, auditor,
        /// ethics-board, node.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// A patient's pseudonym (role patient only).
        #[arg(long)]
        pseudonym: Option<String>,
        /// Days of validity from now.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Output path without extension.
        #[arg(long)]
        out: PathBuf,
    },
    /// A bearer token for DICOMweb (`Authorization: Bearer TOKEN`), signed with a member's
    /// key: the organisation's clinicians and admins see identified originals with it.
    Token {
        /// The member's signing key (from `identity issue`).
        #[arg(long)]
        key_file: PathBuf,
        /// The organisation whose nodes will accept it.
        #[arg(long)]
        org: String,
        /// Minutes of validity (at most a day).
        #[arg(long, default_value_t = 480)]
        minutes: u64,
    },
    /// Show a certificate and check it against a CA certificate.
    Show {
        cert: PathBuf,
        /// The issuing organisation's CA certificate (PEM), to verify the chain.
        #[arg(long)]
        ca: Option<PathBuf>,
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
    let Some(mut imaging) = cfg.imaging.clone() else {
        medledger_node::run_node(cfg)?;
        return Ok(());
    };
    imaging
        .journal
        .get_or_insert_with(|| cfg.data_dir.join("journal"));
    let service =
        medledger_imaging::Service::start(&cfg.org, &imaging, &format!("http://{}", cfg.api))?;
    let dimse = std::sync::Arc::new(medledger_imaging::Dimse::new(service.clone()));
    let scp = medledger_dicom_net::Scp::start(
        imaging.dicom,
        medledger_dicom_net::ScpConfig::new(&imaging.ae_title),
        dimse.clone(),
    )
    .with_context(|| format!("cannot listen for DIMSE on {}", imaging.dicom))?;
    let mut scps = vec![scp];
    if let Some(addr) = imaging.dicom_tls {
        let https = cfg.https.as_ref().with_context(|| {
            format!("DICOM TLS on {addr} uses the node's HTTPS certificate: node.json has no https section")
        })?;
        let tls = medledger_node::tls::dicom_tls_server_config(
            &https.cert,
            &https.key,
            imaging.dicom_tls_clients.as_deref(),
        )?;
        let config = medledger_dicom_net::ScpConfig {
            tls: Some(std::sync::Arc::new(tls)),
            ..medledger_dicom_net::ScpConfig::new(&imaging.ae_title)
        };
        let tls_scp = medledger_dicom_net::Scp::start(addr, config, dimse)
            .with_context(|| format!("cannot listen for DICOM TLS on {addr}"))?;
        let clients = match &imaging.dicom_tls_clients {
            Some(ca) => format!("peers need a certificate from {}", ca.display()),
            None => "peers need no certificate".to_string(),
        };
        eprintln!(
            "DICOM TLS: {} on {} (certificate {}; {clients})",
            imaging.ae_title,
            tls_scp.local_addr(),
            https.cert.display()
        );
        scps.push(tls_scp);
    }
    eprintln!(
        "imaging: DICOMweb http://{}/dicom-web, DIMSE {} on {}, store {}",
        cfg.api,
        imaging.ae_title,
        scps[0].local_addr(),
        imaging.store
    );
    if let Some(h) = &cfg.https {
        eprintln!(
            "HTTPS: https://{}/dicom-web and https://{}/api (certificate {})",
            h.listen,
            h.listen,
            h.cert.display()
        );
    }
    let mut routes = medledger_imaging::router(service.clone());
    if imaging.node_cert.is_some() {
        let sharing = medledger_imaging::Sharing::start(&service, &cfg)?;
        if let Some(addr) = imaging.share {
            eprintln!("sharing: https://{addr} (mutual TLS with organisation certificates)");
        }
        routes = routes.merge(sharing.router());
    }
    shutdown_on_signal(service.clone(), scps);
    medledger_node::run_node_with(cfg, Some(routes))?;
    Ok(())
}

/// On SIGTERM or SIGINT: stop taking associations and instances, let what is queued be
/// committed (what the journal acknowledged is stored at the next start if it does not make
/// it in time), then exit.
fn shutdown_on_signal(service: medledger_imaging::Service, scps: Vec<medledger_dicom_net::Scp>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("signal runtime");
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        eprintln!("stopping: no new associations or instances; finishing what is queued");
        service.shutdown();
        for scp in scps {
            scp.shutdown();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while service.busy() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        service.settle_journal();
        std::process::exit(0);
    });
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
        NetworkCommand::Up { dir } => up(&dir, false),
        NetworkCommand::Down { dir } => down(&dir, false),
    }
}

/// Starts a network's nodes without printing (for benchmarks).
/// `network up` without its progress lines (for commands whose stdout is a report).
pub fn up_quiet(dir: &Path) -> Result<()> {
    up(dir, true)
}

/// Stops a network's nodes.
pub fn down_quiet(dir: &Path) -> Result<()> {
    down(dir, true)
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

fn up(dir: &Path, quiet: bool) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the medledger binary")?;
    let mut apis = Vec::new();
    for d in node_dirs(dir)? {
        let pid_file = d.join("node.pid");
        let config = d.join("node.json");
        if let Some(pid) = read_pid(&pid_file) {
            match node_process(pid, &config) {
                NodeProcess::Running => {
                    eprintln!("{} already running (pid {pid})", d.display());
                    continue;
                }
                NodeProcess::Dying => {
                    if !wait_gone(pid, &config, Duration::from_secs(30)) {
                        bail!(
                            "the node in {} (pid {pid}) is still exiting after 30 s; try again when it is gone",
                            d.display()
                        );
                    }
                }
                NodeProcess::Gone => {}
            }
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
        if !quiet {
            println!(
                "started {} (pid {}), API http://{}",
                cfg.org,
                child.id(),
                cfg.api
            );
        }
        apis.push((format!("http://{}", cfg.api), d.clone(), child));
    }
    // Wait until every API answers; a node that exits or stays silent is reported with the
    // end of its log.
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (api, d, child) in &mut apis {
        while client.get(format!("{api}/api/status")).send().is_err() {
            // Asked of the child itself, not of /proc: right after exec its command line
            // may read empty there for a moment, and it would look like another program.
            let exited = !matches!(child.try_wait(), Ok(None));
            if exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(d.join("node.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "node at {api} {} (the others keep running: `medledger network down`); \
                     the end of {}:\n{}",
                    if exited {
                        "exited"
                    } else {
                        "did not answer in 60 s"
                    },
                    d.join("node.log").display(),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// What a pid from a `node.pid` file is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeProcess {
    /// A `medledger node` of this configuration, not being killed.
    Running,
    /// That node, being torn down (killed, or exiting): its ports and journal are not free
    /// yet, and a new node started now would find them taken.
    Dying,
    /// No such process, a zombie, or another program that got the pid since (after a reboot,
    /// say): nothing to wait for, and nothing `down` may signal.
    Gone,
}

/// Looks at `/proc/<pid>` (Linux): whether it is the node of `config`, and whether it is
/// on its way out.
fn node_process(pid: i32, config: &Path) -> NodeProcess {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc.join("stat")) else {
        return NodeProcess::Gone;
    };
    // After the command name, which may hold spaces and parentheses: state, ppid, pgrp,
    // session, tty, tpgid, flags.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    if matches!(fields.first(), None | Some(&"Z") | Some(&"X")) {
        return NodeProcess::Gone;
    }
    if !runs_config(&proc, config) {
        return NodeProcess::Gone;
    }
    const PF_EXITING: u64 = 0x4;
    let exiting = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_EXITING != 0);
    // SIGKILL (9) pending for the process or its main thread: it is being killed even if no
    // thread has started exiting yet.
    let killed = std::fs::read_to_string(proc.join("status")).is_ok_and(|status| {
        status.lines().any(|l| {
            let Some((name, mask)) = l.split_once(':') else {
                return false;
            };
            matches!(name, "SigPnd" | "ShdPnd")
                && u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & (1 << 8) != 0)
        })
    });
    if exiting || killed {
        NodeProcess::Dying
    } else {
        NodeProcess::Running
    }
}

/// Whether the process under `proc` is `medledger node --config <config>` (the same file,
/// however the path was spelt, relative paths taken from the process's working directory).
fn runs_config(proc: &Path, config: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let Some(i) = args.iter().position(|a| *a == b"--config") else {
        return false;
    };
    if !args.contains(&&b"node"[..]) {
        return false;
    }
    let Some(arg) = args.get(i + 1) else {
        return false;
    };
    let arg = Path::new(std::ffi::OsStr::from_bytes(arg));
    let theirs = if arg.is_absolute() {
        arg.to_path_buf()
    } else {
        match std::fs::read_link(proc.join("cwd")) {
            Ok(cwd) => cwd.join(arg),
            Err(_) => return false,
        }
    };
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(theirs), std::fs::metadata(config)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Waits up to `limit` for a dying node to be gone; whether it is.
fn wait_gone(pid: i32, config: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if node_process(pid, config) == NodeProcess::Gone {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn down(dir: &Path, quiet: bool) -> Result<()> {
    for d in node_dirs(dir)? {
        let pid_file = d.join("node.pid");
        let Some(pid) = read_pid(&pid_file) else {
            continue;
        };
        let config = d.join("node.json");
        // Only the node itself is signalled: after a reboot the pid may be another program's.
        if node_process(pid, &config) == NodeProcess::Dying {
            wait_gone(pid, &config, Duration::from_secs(10));
        }
        if node_process(pid, &config) == NodeProcess::Running
            && let Some(p) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            if !wait_gone(pid, &config, Duration::from_secs(10))
                && node_process(pid, &config) == NodeProcess::Running
            {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                wait_gone(pid, &config, Duration::from_secs(10));
            }
            if !quiet {
                println!("stopped {} (pid {pid})", d.display());
            }
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn print(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON"));
}

const FINALITY: Duration = Duration::from_secs(30);

pub fn run_ledger(cmd: LedgerCommand) -> Result<()> {
    match cmd {
        LedgerCommand::Status(n) => print(&Client::new(&n.node).status()?),
        LedgerCommand::Query {
            node,
            prefix,
            limit,
            after,
        } => print(&Client::new(&node.node).query(&prefix, after.as_deref(), limit)?),
        LedgerCommand::History {
            node,
            from,
            non_empty,
        } => {
            let c = Client::new(&node.node);
            let mut from = from;
            let mut all = Vec::new();
            loop {
                let page = c.blocks(from)?;
                let Some(last) = page.last().and_then(|b| b["height"].as_u64()) else {
                    break;
                };
                all.extend(
                    page.into_iter().filter(|b| {
                        !non_empty || b["txs"].as_array().is_some_and(|t| !t.is_empty())
                    }),
                );
                from = last + 1;
            }
            print(&all);
        }
        LedgerCommand::Studies(n) => print(&Client::new(&n.node).studies()?),
        LedgerCommand::Audit(n) => print(&Client::new(&n.node).audit()?),
        LedgerCommand::Prove { node, key } => {
            let p = Client::new(&node.node).prove(&key)?;
            let root = medledger_crypto::Digest::from_hex(&p.root)?;
            if !p.proof.verify(&root) {
                bail!("the node's proof for {key} does not verify against its root {root}");
            }
            print(&p);
            eprintln!("proof verified against state root {root}");
        }
        LedgerCommand::Submit { node, key_file, op } => {
            let key = SigningKey::from_text(&read(&key_file)?)?;
            let op: Op =
                serde_json::from_str(&op).context("the operation is not valid JSON for an Op")?;
            print(&Client::new(&node.node).execute(&key, op, FINALITY)?);
        }
        LedgerCommand::AddMember {
            node,
            key_file,
            cert,
        } => {
            let key = SigningKey::from_text(&read(&key_file)?)?;
            let certificate = read(&cert)?;
            // Refuse locally what the contracts would refuse anyway, with the reason.
            Certificate::from_pem(&certificate).with_context(|| format!("{}", cert.display()))?;
            print(&Client::new(&node.node).execute(
                &key,
                Op::AddMember { certificate },
                FINALITY,
            )?);
        }
    }
    Ok(())
}

pub fn run_identity(cmd: IdentityCommand) -> Result<()> {
    match cmd {
        IdentityCommand::Token {
            key_file,
            org,
            minutes,
        } => {
            let text = std::fs::read_to_string(&key_file)
                .with_context(|| format!("cannot read {}", key_file.display()))?;
            let key = SigningKey::from_text(text.trim())
                .with_context(|| format!("{} is not a signing key", key_file.display()))?;
            println!(
                "{}",
                medledger_imaging::access::issue_token(
                    &key,
                    &org,
                    Duration::from_secs(minutes * 60)
                )
            );
        }
        IdentityCommand::Issue {
            ca,
            name,
            roles,
            pseudonym,
            days,
            out,
        } => {
            let org_ca = OrgCa::from_parts(
                SigningKey::from_text(&read(&ca.join("ca.key"))?)?,
                &read(&ca.join("ca.pem"))?,
            )?;
            let roles = roles
                .iter()
                .map(|r| Role::parse(r).with_context(|| format!("unknown role {r:?}")))
                .collect::<Result<Vec<_>>>()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            let key = SigningKey::generate();
            let cert = org_ca.issue(
                &key.verifying_key(),
                &name,
                &roles,
                pseudonym.as_deref(),
                &[],
                (now - 60_000, now + days * 86_400_000),
            )?;
            let key_path = out.with_extension("key");
            let pem_path = out.with_extension("pem");
            if key_path.exists() {
                bail!("{} exists; choose another --out", key_path.display());
            }
            crate::files::write_secret(&key_path, format!("{}\n", key.to_text()).as_bytes())?;
            std::fs::write(&pem_path, cert.to_pem())
                .with_context(|| format!("cannot write {}", pem_path.display()))?;
            println!(
                "issued {} ({}) of {}: {} and {}",
                cert.name,
                cert.roles.join(","),
                cert.org,
                key_path.display(),
                pem_path.display()
            );
        }
        IdentityCommand::Show { cert, ca } => {
            let c = Certificate::from_pem(&read(&cert)?)
                .with_context(|| format!("{}", cert.display()))?;
            let verified = match ca {
                Some(ca) => {
                    let ca = Certificate::from_pem(&read(&ca)?)?;
                    c.verify_issued_by(&ca)
                        .with_context(|| format!("{} does not chain to that CA", cert.display()))?;
                    Some(ca.fingerprint().to_hex())
                }
                None => None,
            };
            print(&serde_json::json!({
                "name": c.name,
                "org": c.org,
                "roles": c.roles,
                "pseudonym": c.pseudonym,
                "key": c.key.to_string(),
                "ca": c.is_ca,
                "serial": c.serial,
                "not_before_ms": c.not_before_ms,
                "not_after_ms": c.not_after_ms,
                "fingerprint": c.fingerprint().to_hex(),
                "verified_by_ca": verified,
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process whose command line reads `... node --config <config>` (a shell blocked on
    /// its input), started in `cwd`.
    fn fake_node(cwd: &Path, config: &str) -> std::process::Child {
        let child = Command::new("sh")
            .args(["-c", "read x", "node", "--config", config])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .spawn()
            .expect("sh runs");
        // `spawn` returns once the exec has begun; the new command line shows in /proc a
        // moment later (it read empty here once, under load).
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let started = Instant::now();
        while !std::fs::read(&cmdline).is_ok_and(|c| c.windows(8).any(|w| w == b"--config")) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "sh did not start"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }

    #[test]
    fn a_pid_is_a_running_node_only_for_its_own_config_and_not_once_killed() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("node.json");
        let other = dir.path().join("other.json");
        std::fs::write(&config, "{}").unwrap();
        std::fs::write(&other, "{}").unwrap();

        let mut absolute = fake_node(Path::new("/"), config.to_str().unwrap());
        let mut relative = fake_node(dir.path(), "node.json");
        for child in [&absolute, &relative] {
            let pid = child.id() as i32;
            assert_eq!(node_process(pid, &config), NodeProcess::Running);
            // Another node's pid file, or a pid reused by another program: not ours.
            assert_eq!(node_process(pid, &other), NodeProcess::Gone);
        }
        let mut stranger = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(
            node_process(stranger.id() as i32, &config),
            NodeProcess::Gone
        );
        stranger.kill().unwrap();
        stranger.wait().unwrap();

        // Right after SIGKILL the process may still be in /proc, not yet a zombie: it is never
        // taken for a running node.
        let pid = absolute.id() as i32;
        absolute.kill().unwrap();
        assert_ne!(node_process(pid, &config), NodeProcess::Running);
        absolute.wait().unwrap();
        assert_eq!(node_process(pid, &config), NodeProcess::Gone);
        assert!(wait_gone(pid, &config, Duration::from_secs(1)));

        relative.kill().unwrap();
        relative.wait().unwrap();
        assert_eq!(
            node_process(relative.id() as i32, &config),
            NodeProcess::Gone
        );
    }
}

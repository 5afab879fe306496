//! The `medledger` binary: argument parsing, configuration, tracing and the runtime for the
//! subcommands. Library crates do the work; this crate wires them to files and terminals.

mod bench;
mod bench_ledger;
mod bench_node;
mod bench_share;
mod bench_store;
mod cea;
mod deid_cmd;
mod demo;
mod demo_local;
mod files;
mod import_cmd;
mod network_cmd;
mod share_cmd;
mod store_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "medledger",
    version,
    about = "Share medical images between hospitals, patients and researchers on a permissioned ledger",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// De-identify DICOM files (PS3.15 Annex E Basic Profile and options) into a folder.
    Deid(deid_cmd::DeidArgs),
    /// Manage de-identification keys.
    #[command(subcommand)]
    Key(deid_cmd::KeyCommand),
    /// Run the main job: the whole system on this machine, step by step.
    Demo(demo::DemoArgs),
    /// Cost-effectiveness analysis: run a model file, write its report.
    #[command(subcommand)]
    Cea(cea::CeaCommand),
    /// A local network of one node per organisation: init, up, down.
    #[command(subcommand)]
    Network(network_cmd::NetworkCommand),
    /// Run one node (consensus, ledger, API, DICOMweb and DIMSE) from its configuration.
    Node(network_cmd::NodeArgs),
    /// Send DICOM files to a node (STOW-RS): de-identified, stored, registered there.
    Import(import_cmd::ImportArgs),
    /// Talk to a node's ledger API: status, query, history, studies, audit, submit, prove.
    #[command(subcommand)]
    Ledger(network_cmd::LedgerCommand),
    /// Member identities: X.509 certificates issued by an organisation's CA.
    #[command(subcommand)]
    Identity(network_cmd::IdentityCommand),
    /// Share studies across organisations: consent, requests, grants, verified retrieval, the patient's view.
    #[command(subcommand)]
    Share(share_cmd::ShareCommand),
    /// The encrypted image store: put, get, verify, share studies.
    #[command(subcommand)]
    Store(store_cmd::StoreCommand),
    /// Measure throughput (run in release builds).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEDLEDGER_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "warn,dicom_parser=error,dicom_object=error,dicom_encoding=error",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Deid(args) => deid_cmd::run(args),
        Command::Key(cmd) => deid_cmd::run_key(cmd).map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(args).map(|()| ExitCode::SUCCESS),
        Command::Cea(cmd) => cea::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Store(cmd) => store_cmd::run(cmd),
        Command::Network(cmd) => network_cmd::run_network(cmd).map(|()| ExitCode::SUCCESS),
        Command::Node(args) => network_cmd::run_node(args).map(|()| ExitCode::SUCCESS),
        Command::Import(args) => import_cmd::run(args).map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
        Command::Ledger(cmd) => network_cmd::run_ledger(cmd).map(|()| ExitCode::SUCCESS),
        Command::Identity(cmd) => network_cmd::run_identity(cmd).map(|()| ExitCode::SUCCESS),
        Command::Share(cmd) => share_cmd::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Bench(cmd) => bench::run(cmd).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each said once: many of the crates' errors already put their
/// cause in their own message (`{path}: {source}`), which `{:#}` would repeat.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// medledger's own folder for keys and state: `$MEDLEDGER_HOME`, else `~/.medledger`.
pub fn medledger_home() -> PathBuf {
    if let Some(p) = std::env::var_os("MEDLEDGER_HOME") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".medledger")
}

//! Helpers the binary's integration tests share.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The `medledger` binary under test, with its own home folder (never the user's keys).
pub fn medledger(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medledger"));
    c.env("MEDLEDGER_HOME", home);
    c
}

/// A finished command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

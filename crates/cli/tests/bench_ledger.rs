//! `medledger bench ledger` as a user runs it (its own test binary, so that its four node
//! processes do not share the machine with another test's).

mod common;
use common::{medledger, text};

use serde_json::Value;

/// `bench ledger` end to end at a low rate: every submitted transaction is seen final, and the
/// report says so (the figures themselves are for release builds).
#[test]
fn bench_ledger_counts_every_transaction_it_submitted() {
    let home = tempfile::tempdir().unwrap();
    let o = medledger(home.path())
        .args([
            "bench",
            "ledger",
            "--seconds",
            "2",
            "--rate",
            "200",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let submitted = r["submitted"].as_u64().unwrap();
    assert!(submitted >= 200, "{r}");
    assert_eq!(r["finalised"].as_u64(), Some(submitted), "{r}");
    assert!(r["committed_tx_per_s"].as_f64().unwrap() > 0.0);
}

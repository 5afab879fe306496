//! Test support shared by medledger's crates: where the real DICOM test data lives, and
//! synthetic studies for scale, the demo and planted-identifier tests.
//!
//! Test-only: nothing in a shipped code path may depend on this crate except the demo's
//! synthetic study generator.

pub mod garage;
pub mod planted;
pub mod synth;

use std::path::{Path, PathBuf};

/// Environment variable that points at the folder of real DICOM test files.
pub const TEST_DATA_ENV: &str = "MEDLEDGER_TEST_DATA";

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("testkit lives at crates/testkit inside the workspace")
        .to_path_buf()
}

/// The folder of real DICOM test files: `$MEDLEDGER_TEST_DATA`, else `../shared/data/dicom`
/// beside the workspace.
///
/// Panics with instructions when the folder is missing: a test that silently skips its data
/// would pass without checking anything.
pub fn test_data_dir() -> PathBuf {
    let dir = match std::env::var_os(TEST_DATA_ENV) {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("../shared/data/dicom"),
    };
    assert!(
        dir.join("MANIFEST.tsv").is_file(),
        "DICOM test data not found at {}: set {TEST_DATA_ENV} to the folder holding MANIFEST.tsv",
        dir.display()
    );
    dir
}

/// One row of the test data's MANIFEST.tsv (only the columns tests use).
#[derive(Debug, Clone)]
pub struct ManifestEntry {
    /// Path relative to the data folder.
    pub path: PathBuf,
    /// `clean`, `parses-with-warnings`, `no-preamble-or-meta(needs force)` or
    /// `damaged/nonconformant`.
    pub parse_summary: String,
    pub size_bytes: u64,
    pub modality: String,
    pub transfer_syntax_uid: String,
    /// Number of frames (1 when the file says nothing).
    pub frames: u32,
    /// Bits Allocated (0 when the file says nothing).
    pub bits_allocated: u32,
}

impl ManifestEntry {
    /// Files a conforming reader must accept.
    pub fn is_parseable(&self) -> bool {
        self.parse_summary == "clean" || self.parse_summary == "parses-with-warnings"
    }
}

/// Reads MANIFEST.tsv of the test data folder.
pub fn manifest() -> Vec<ManifestEntry> {
    let dir = test_data_dir();
    let text = std::fs::read_to_string(dir.join("MANIFEST.tsv")).expect("read MANIFEST.tsv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("MANIFEST.tsv header")
        .split('\t')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("MANIFEST.tsv has no column {name}"))
    };
    let (c_path, c_sum, c_size, c_mod, c_ts) = (
        col("path"),
        col("parse_summary"),
        col("size_bytes"),
        col("modality"),
        col("transfer_syntax_uid"),
    );
    let c_frames = col("frames");
    let c_bits = col("bits_alloc");
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let get = |i: usize| f.get(i).copied().unwrap_or("").to_string();
            ManifestEntry {
                path: PathBuf::from(get(c_path)),
                parse_summary: get(c_sum),
                size_bytes: get(c_size).parse().unwrap_or(0),
                modality: get(c_mod),
                transfer_syntax_uid: get(c_ts),
                frames: get(c_frames).parse().unwrap_or(1).max(1),
                bits_allocated: get(c_bits).parse().unwrap_or(0),
            }
        })
        .collect()
}

/// The 64-slice chest CT series of the test data.
pub fn chest_ct_series_dir() -> PathBuf {
    test_data_dir().join("series_lung-pet-ct-dx/Lung_Dx-A0001/chest_5mm")
}

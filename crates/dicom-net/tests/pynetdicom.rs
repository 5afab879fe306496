//! The SCP against pynetdicom 3.0.4 as SCU: C-ECHO, C-STORE, C-FIND, C-GET
//! (with SCP/SCU role selection) and C-MOVE. The venv comes from
//! scripts/install-interop; a missing venv fails the test.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use dicom_dictionary_std::tags;

fn venv_python() -> PathBuf {
    let cache = std::env::var_os("MEDLEDGER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/medledger")
        });
    let py = cache.join("venv/bin/python");
    assert!(
        py.is_file(),
        "{} missing: run scripts/install-interop",
        py.display()
    );
    let ok = Command::new(&py)
        .args(["-c", "import pynetdicom, pydicom"])
        .status()
        .expect("venv python runs");
    assert!(
        ok.success(),
        "pynetdicom missing in the venv: run scripts/install-interop"
    );
    py
}

const SCRIPT: &str = r#"
import sys, os
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    Verification, CTImageStorage, StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelFind,
)

host, port, ct_file, study, series, out_dir = sys.argv[1:7]
port = int(port)

def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)

# C-ECHO, C-STORE, C-FIND
ae = AE(ae_title="PYSCU")
ae.add_requested_context(Verification)
ae.add_requested_context(CTImageStorage)
ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
assoc = ae.associate(host, port, ae_title="MEDLEDGER")
if not assoc.is_established:
    fail("association")
st = assoc.send_c_echo()
if st.Status != 0:
    fail("echo %r" % st)
ds = dcmread(ct_file)
st = assoc.send_c_store(ds)
if st.Status != 0:
    fail("store %r" % st)
q = Dataset()
q.QueryRetrieveLevel = "SERIES"
q.StudyInstanceUID = study
q.SeriesInstanceUID = ""
q.Modality = ""
found = []
for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
    if status.Status in (0xFF00, 0xFF01):
        found.append(ident)
    elif status.Status != 0:
        fail("find status %04X" % status.Status)
if len(found) != 1 or found[0].SeriesInstanceUID != series or found[0].Modality != "CT":
    fail("find results %r" % found)
if found[0].QueryRetrieveLevel != "SERIES":
    fail("missing QueryRetrieveLevel")
q = Dataset()
q.QueryRetrieveLevel = "PATIENT"
q.PatientID = found_pid = dcmread(ct_file).PatientID
n = 0
for status, ident in assoc.send_c_find(q, PatientRootQueryRetrieveInformationModelFind):
    if status.Status == 0xFF00:
        n += 1
    elif status.Status != 0:
        fail("patient find status %04X" % status.Status)
if n != 1:
    fail("patient find matches %d" % n)
print("find done", flush=True)
assoc.release()

# C-GET with role selection: the instances come back on the same association.
received = []
def on_store(event):
    received.append(event.request.AffectedSOPInstanceUID)
    event.dataset.file_meta = event.file_meta
    event.dataset.save_as(os.path.join(out_dir, event.request.AffectedSOPInstanceUID), enforce_file_format=True)
    return 0x0000

ae = AE(ae_title="PYGET")
ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
ae.add_requested_context(CTImageStorage)
role = build_role(CTImageStorage, scp_role=True)
assoc = ae.associate(host, port, ae_title="MEDLEDGER", ext_neg=[role],
                     evt_handlers=[(evt.EVT_C_STORE, on_store)])
if not assoc.is_established:
    fail("get association")
q = Dataset()
q.QueryRetrieveLevel = "SERIES"
q.StudyInstanceUID = study
q.SeriesInstanceUID = series
final = None
for status, ident in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
    final = status
assoc.release()
print("get done", flush=True)
if final is None or final.Status != 0:
    fail("get final %r" % final)
if final.NumberOfCompletedSuboperations != 64 or len(received) != 64:
    fail("get completed %r, received %d" % (final.NumberOfCompletedSuboperations, len(received)))

# C-MOVE to an unknown destination
ae = AE(ae_title="PYMOVE")
ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
assoc = ae.associate(host, port, ae_title="MEDLEDGER")
q = Dataset()
q.QueryRetrieveLevel = "STUDY"
q.StudyInstanceUID = study
statuses = [s.Status for s, _ in assoc.send_c_move(q, "NOWHERE", StudyRootQueryRetrieveInformationModelMove)]
assoc.release()
if statuses != [0xA801]:
    fail("move statuses %r" % statuses)
print("OK")
"#;

#[test]
fn pynetdicom_echo_store_find_get_move() {
    let python = venv_python();
    let provider = TestProvider::new();
    let files = ct_series();
    // All but the first slice are preloaded; pynetdicom stores the first.
    for f in &files[1..] {
        provider.insert(read(f));
    }
    let first = read(&files[0]);
    let study = attr(&first, tags::STUDY_INSTANCE_UID).unwrap();
    let series = attr(&first, tags::SERIES_INSTANCE_UID).unwrap();
    let scp = start_scp(provider.clone());
    let out_dir = tempfile::tempdir().unwrap();
    let [host, port] = host_port(scp.local_addr());
    let out = run(Command::new(python)
        .args(["-c", SCRIPT, &host, &port])
        .arg(&files[0])
        .args([&study, &series])
        .arg(out_dir.path()));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "{}",
        text(&out)
    );
    assert_eq!(provider.len(), 64);
    // The instances that came back by C-GET are the provider's, byte for byte
    // in their data sets (same transfer syntax: Implicit VR LE).
    let back = files_in(out_dir.path());
    assert_eq!(back.len(), 64);
    for p in back {
        let f = read(&p);
        let uid = attr(&f, tags::SOP_INSTANCE_UID).unwrap();
        let src = provider.get(&uid).unwrap().file;
        assert_same_dataset(&dataset_of(&f), &dataset_of(&src), &uid);
    }
    scp.shutdown();
}

//! A node works with the DICOM software other sites run, not only with our own client: the
//! DICOMweb client library most Python tools use (dicomweb-client) stores, searches and
//! retrieves; pynetdicom echoes, stores, finds, is refused a move to an unknown AE and gets a
//! series by C-GET; Orthanc 1.10 (a PACS, with its DICOMweb plugin) sends by C-STORE and
//! STOW-RS, queries by C-FIND and QIDO-RS, and pulls the de-identified study back by
//! WADO-RS and by C-MOVE. Every peer sees the same pseudonym and the same new UIDs.
//!
//! The peers come from `scripts/install-interop`; a missing one fails the test with that
//! instruction (a skipped interoperability test would pass without checking anything).

mod common;
use common::{
    Child, attr, chest_ct, free_port, get_json, http, metric, network, post_json, stow_body, text,
    wait_for,
};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const INSTALL: &str = "run `bash scripts/install-interop` (as root or with sudo)";

fn text_of(file: &Path, tag: dicom_core::Tag) -> String {
    dicom_object::open_file(file)
        .unwrap()
        .element(tag)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_matches(|c: char| c == '\0' || c == ' ')
        .to_string()
}

/// Instances of the (de-identified) study `uid` the node shows over QIDO-RS.
fn node_instances(web: &str, uid: &str) -> usize {
    let (code, v) = get_json(&format!("{web}/studies?StudyInstanceUID={uid}"));
    if code != 200 {
        return 0;
    }
    attr(&v[0], "00201208").as_u64().unwrap_or(0) as usize
}

// ---- the peers ----

/// The Python of the venv `scripts/install-interop` fills.
fn venv_python() -> PathBuf {
    let venv = match std::env::var_os("MEDLEDGER_VENV") {
        Some(v) => PathBuf::from(v),
        None => {
            let cache = std::env::var_os("MEDLEDGER_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                        .join(".cache/medledger")
                });
            cache.join("venv")
        }
    };
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "no Python venv at {}: {INSTALL}",
        venv.display()
    );
    let check = Command::new(&python)
        .args([
            "-c",
            "import pydicom, pynetdicom, dicomweb_client; print(pydicom.__version__, pynetdicom.__version__)",
        ])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the venv {} lacks pydicom, pynetdicom or dicomweb-client: {INSTALL}\n{}",
        venv.display(),
        text(&check)
    );
    python
}

/// Runs `script` with the venv's Python; its last line of output is a JSON object.
fn python(py: &Path, dir: &Path, name: &str, script: &str, args: &[String]) -> Value {
    let path = dir.join(name);
    std::fs::write(&path, script).unwrap();
    let out = Command::new(py)
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{name}: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{name}: {e}: {}", text(&out)))
}

/// `Orthanc` and its DICOMweb plugin (the Debian packages' locations).
fn orthanc() -> (PathBuf, PathBuf) {
    let binary = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("Orthanc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`Orthanc` is missing: {INSTALL}"));
    let plugin = [
        "/usr/share/orthanc/plugins",
        "/usr/lib/orthanc/plugins",
        "/usr/local/share/orthanc/plugins",
    ]
    .iter()
    .filter_map(|d| std::fs::read_dir(d).ok())
    .flat_map(|d| d.filter_map(Result::ok).map(|e| e.path()))
    .find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libOrthancDicomWeb") && n.contains(".so"))
    })
    .unwrap_or_else(|| panic!("Orthanc's DICOMweb plugin is missing: {INSTALL}"));
    (binary, plugin)
}

// ---- the scripts ----

/// dicomweb-client: STOW-RS, QIDO-RS at each level, WADO-RS (study, metadata, frames,
/// rendered). argv: DICOMweb root, files to store.
const DICOMWEB_CLIENT: &str = r#"
import json, sys, time, urllib.parse
import pydicom
from dicomweb_client.api import DICOMwebClient

url, files = sys.argv[1], sys.argv[2:]
client = DICOMwebClient(url=url)
out = {}

stored = client.store_instances(datasets=[pydicom.dcmread(f) for f in files])
out["stow_referenced"] = len(stored.get("ReferencedSOPSequence", []))
out["stow_failed"] = len(stored.get("FailedSOPSequence", []))

# Visible once registered on the ledger.
studies = []
deadline = time.time() + 60
while time.time() < deadline:
    studies = client.search_for_studies()
    if studies and studies[0]["00201208"]["Value"][0] == len(files):
        break
    time.sleep(0.25)
out["studies"] = len(studies)
study = studies[0]
pseudonym = study["00100020"]["Value"][0]
study_uid = study["0020000D"]["Value"][0]
out["pseudonym"] = pseudonym
out["study_uid"] = study_uid
out["study_instances"] = study["00201208"]["Value"][0]
by_id = client.search_for_studies(search_filters={"PatientID": pseudonym},
                                  fields=["StudyDescription"])
out["studies_by_pseudonym"] = len(by_id)
out["nobody"] = len(client.search_for_studies(search_filters={"PatientID": "NOBODY"}))

series = client.search_for_series(study_instance_uid=study_uid)
out["series"] = len(series)
series_uid = series[0]["0020000E"]["Value"][0]
out["series_uid"] = series_uid
out["ct_series"] = len(client.search_for_series(search_filters={"Modality": "CT"}))

page = client.search_for_instances(search_filters={"PatientID": pseudonym}, limit=5, offset=3)
out["instances_page"] = len(page)
tail = client.search_for_instances(search_filters={"PatientID": pseudonym}, limit=5,
                                   offset=len(files) - 2)
out["instances_tail"] = len(tail)
in_series = client.search_for_instances(study_instance_uid=study_uid,
                                        series_instance_uid=series_uid)
out["instances_in_series"] = len(in_series)
sop = page[0]["00080018"]["Value"][0]

retrieved = client.retrieve_study(study_uid)
out["retrieved"] = len(retrieved)
out["retrieved_patient_ids"] = sorted({str(d.PatientID) for d in retrieved})
out["retrieved_sops"] = len({str(d.SOPInstanceUID) for d in retrieved})
out["retrieved_pixels"] = sorted({len(d.PixelData) for d in retrieved})

meta = client.retrieve_instance_metadata(study_uid, series_uid, sop)
out["meta_sop"] = meta["00080018"]["Value"][0]
out["meta_patient_id"] = meta["00100020"]["Value"][0]
rows = meta["00280010"]["Value"][0]
cols = meta["00280011"]["Value"][0]
out["rows"], out["cols"] = rows, cols
out["series_metadata"] = len(client.retrieve_series_metadata(study_uid, series_uid))

frames = client.retrieve_instance_frames(study_uid, series_uid, sop, frame_numbers=[1])
out["frames_default"] = [len(f) for f in frames]
frames = client.retrieve_instance_frames(
    study_uid, series_uid, sop, frame_numbers=[1],
    media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),))
out["frames_explicit"] = [len(f) for f in frames]
# The BulkDataURI of Pixel Data in the metadata, followed as a client does.
bulk_uri = urllib.parse.urljoin(url, meta["7FE00010"]["BulkDataURI"])
out["bulkdata"] = [len(b) for b in client.retrieve_bulkdata(bulk_uri)]

png = client.retrieve_instance_rendered(study_uid, series_uid, sop, media_types=("image/png",))
out["png_signature"] = png[:8].hex()
jpeg = client.retrieve_instance_rendered(study_uid, series_uid, sop)
out["jpeg_signature"] = jpeg[:3].hex()
print(json.dumps(out))
"#;

/// pynetdicom: C-ECHO, C-STORE, C-FIND (Study Root), C-MOVE to an unknown AE, C-GET of a
/// series. argv: host, port, the number of instances the study has once these are stored,
/// files to store.
const PYNETDICOM: &str = r#"
import json, sys, time
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt, build_role
from pynetdicom.sop_class import (
    Verification, CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet)

host, port, expected, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
out = {}

def application(title):
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae

scu = application("PYNETDICOM")
for context in (Verification, CTImageStorage, StudyRootQueryRetrieveInformationModelFind,
                StudyRootQueryRetrieveInformationModelMove):
    scu.add_requested_context(context)

def associate():
    assoc = scu.associate(host, port, ae_title="HOSPITAL_A")
    assert assoc.is_established, "association refused"
    return assoc

assoc = associate()
out["echo"] = assoc.send_c_echo().Status
out["store"] = [assoc.send_c_store(dcmread(f)).Status for f in files]
assoc.release()

def find(identifier):
    assoc = associate()
    matches, final = [], None
    for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if status is None:
            break
        if status.Status in (0xFF00, 0xFF01):
            matches.append(found)
        else:
            final = status.Status
    assoc.release()
    return matches, final

query = Dataset()
query.QueryRetrieveLevel = "STUDY"
query.PatientID = ""
query.StudyInstanceUID = ""
query.ModalitiesInStudy = ""
query.NumberOfStudyRelatedInstances = ""
deadline = time.time() + 60
while True:
    studies, final = find(query)
    if (studies and int(studies[0].NumberOfStudyRelatedInstances) == expected) \
            or time.time() > deadline:
        break
    time.sleep(0.25)
out["find_status"] = final
out["studies"] = [{
    "PatientID": str(s.PatientID),
    "StudyInstanceUID": str(s.StudyInstanceUID),
    "ModalitiesInStudy": str(s.ModalitiesInStudy),
    "instances": int(s.NumberOfStudyRelatedInstances),
} for s in studies]
study_uid = str(studies[0].StudyInstanceUID)

query = Dataset()
query.QueryRetrieveLevel = "SERIES"
query.StudyInstanceUID = study_uid
query.SeriesInstanceUID = ""
series, _ = find(query)
series_uid = str(series[0].SeriesInstanceUID)
out["series_uid"] = series_uid

assoc = associate()
query = Dataset()
query.QueryRetrieveLevel = "STUDY"
query.StudyInstanceUID = study_uid
out["move_unknown"] = [s.Status for s, _ in assoc.send_c_move(
    query, "NOWHERE", StudyRootQueryRetrieveInformationModelMove) if s is not None]
assoc.release()

received = []
def on_store(event):
    ds = event.dataset
    received.append((str(ds.SOPInstanceUID), str(ds.PatientID), str(ds.SeriesInstanceUID),
                     len(ds.PixelData)))
    return 0x0000

getter = application("PYGET")
getter.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
getter.add_requested_context(CTImageStorage)
assoc = getter.associate(host, port, ae_title="HOSPITAL_A",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
assert assoc.is_established, "C-GET association refused"
query = Dataset()
query.QueryRetrieveLevel = "SERIES"
query.StudyInstanceUID = study_uid
query.SeriesInstanceUID = series_uid
final = None
for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
    if status is not None and status.Status not in (0xFF00, 0xFF01):
        final = {"status": status.Status,
                 "completed": int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                 "failed": int(status.get("NumberOfFailedSuboperations", 0) or 0),
                 "warning": int(status.get("NumberOfWarningSuboperations", 0) or 0)}
assoc.release()
out["get_final"] = final
out["get_received"] = len(received)
out["get_unique"] = len({r[0] for r in received})
out["get_patient_ids"] = sorted({r[1] for r in received})
out["get_series"] = sorted({r[2] for r in received})
out["get_min_pixels"] = min((r[3] for r in received), default=0)
print(json.dumps(out))
"#;

// ---- the test ----

#[test]
fn dicomweb_client_pynetdicom_and_orthanc_work_with_a_node() {
    // Every peer first: a missing one is an instruction, not a skip.
    let py = venv_python();
    let (orthanc_bin, plugin) = orthanc();
    let files = chest_ct();
    assert_eq!(files.len(), 64);

    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dir = home.join("net");
    let base = common::free_base(40_000 + (std::process::id() % 1_000) as u16 * 4);
    // Orthanc is a peer that sees de-identified derivatives only (a C-MOVE destination).
    let orthanc_http = free_port();
    let orthanc_dicom = free_port();
    let (_net, api) = network(
        home,
        &dir,
        base,
        json!([{
            "ae_title": "ORTHANC",
            "addr": format!("127.0.0.1:{orthanc_dicom}"),
            "originals": false
        }]),
    );
    let web = format!("{api}/dicom-web");
    let dimse_port = base + 200;

    // What the de-identified study must be: the site key's replacement of the original UID.
    let key = medledger_deid::DeidKey::from_text(
        std::fs::read_to_string(dir.join("hospital-a/deid.key"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let original_id = text_of(&files[0], dicom_dictionary_std::tags::PATIENT_ID);
    let original_study = text_of(&files[0], dicom_dictionary_std::tags::STUDY_INSTANCE_UID);
    let study_uid = key.replace_uid(&original_study);
    let scripts = home.join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();

    // ---- dicomweb-client: 16 instances by STOW-RS, then QIDO-RS and WADO-RS ----
    let started = Instant::now();
    let mut args = vec![web.clone()];
    args.extend(files[..16].iter().map(|f| f.display().to_string()));
    let dw = python(&py, &scripts, "stow_qido_wado.py", DICOMWEB_CLIENT, &args);
    eprintln!("dicomweb-client: {:?}: {dw}", started.elapsed());
    assert_eq!(dw["stow_referenced"], 16, "{dw}");
    assert_eq!(dw["stow_failed"], 0, "{dw}");
    assert_eq!(dw["studies"], 1, "{dw}");
    assert_eq!(dw["study_instances"], 16, "{dw}");
    let pseudonym = dw["pseudonym"].as_str().unwrap().to_string();
    assert!(
        pseudonym.starts_with("ML") && pseudonym != original_id,
        "{dw}"
    );
    assert_eq!(dw["study_uid"], Value::from(study_uid.as_str()), "{dw}");
    assert_eq!(dw["studies_by_pseudonym"], 1, "{dw}");
    assert_eq!(dw["nobody"], 0, "{dw}");
    assert_eq!(dw["series"], 1, "{dw}");
    assert_eq!(dw["ct_series"], 1, "{dw}");
    assert_eq!(dw["instances_page"], 5, "{dw}");
    assert_eq!(dw["instances_tail"], 2, "{dw}");
    assert_eq!(dw["instances_in_series"], 16, "{dw}");
    assert_eq!(dw["retrieved"], 16, "{dw}");
    assert_eq!(dw["retrieved_sops"], 16, "{dw}");
    assert_eq!(dw["retrieved_patient_ids"], json!([pseudonym]), "{dw}");
    assert_eq!(
        dw["meta_patient_id"],
        Value::from(pseudonym.as_str()),
        "{dw}"
    );
    assert_eq!(dw["series_metadata"], 16, "{dw}");
    let frame_len = dw["rows"].as_u64().unwrap() * dw["cols"].as_u64().unwrap() * 2;
    assert_eq!(dw["retrieved_pixels"], json!([frame_len]), "{dw}");
    assert_eq!(dw["frames_default"], json!([frame_len]), "{dw}");
    assert_eq!(dw["frames_explicit"], json!([frame_len]), "{dw}");
    assert_eq!(dw["bulkdata"], json!([frame_len]), "{dw}");
    assert_eq!(dw["png_signature"], "89504e470d0a1a0a", "{dw}");
    assert_eq!(dw["jpeg_signature"], "ffd8ff", "{dw}");
    let series_uid = dw["series_uid"].as_str().unwrap().to_string();
    let original_series = text_of(&files[0], dicom_dictionary_std::tags::SERIES_INSTANCE_UID);
    assert_eq!(series_uid, key.replace_uid(&original_series));

    // ---- pynetdicom: 4 more by C-STORE, C-FIND, C-MOVE refused, C-GET of the series ----
    let started = Instant::now();
    let mut args = vec![
        "127.0.0.1".to_string(),
        dimse_port.to_string(),
        "20".to_string(),
    ];
    args.extend(files[16..20].iter().map(|f| f.display().to_string()));
    let pn = python(&py, &scripts, "echo_store_find_get.py", PYNETDICOM, &args);
    eprintln!("pynetdicom: {:?}: {pn}", started.elapsed());
    assert_eq!(pn["echo"], 0, "{pn}");
    assert_eq!(pn["store"], json!([0, 0, 0, 0]), "{pn}");
    assert_eq!(pn["find_status"], 0, "{pn}");
    assert_eq!(
        pn["studies"],
        json!([{
            "PatientID": pseudonym,
            "StudyInstanceUID": study_uid,
            "ModalitiesInStudy": "CT",
            "instances": 20,
        }]),
        "{pn}"
    );
    assert_eq!(pn["series_uid"], Value::from(series_uid.as_str()), "{pn}");
    // Move destination unknown (PS3.4 C.4.2.1.4.1: 0xA801), and nothing else.
    assert_eq!(pn["move_unknown"], json!([0xA801]), "{pn}");
    assert_eq!(
        pn["get_final"],
        json!({ "status": 0, "completed": 20, "failed": 0, "warning": 0 }),
        "{pn}"
    );
    assert_eq!(pn["get_received"], 20, "{pn}");
    assert_eq!(pn["get_unique"], 20, "{pn}");
    assert_eq!(pn["get_patient_ids"], json!([pseudonym]), "{pn}");
    assert_eq!(pn["get_series"], json!([series_uid]), "{pn}");
    assert_eq!(pn["get_min_pixels"], Value::from(frame_len), "{pn}");

    // ---- Orthanc 1.10 with its DICOMweb plugin ----
    let started = Instant::now();
    let odir = home.join("orthanc");
    std::fs::create_dir_all(odir.join("db")).unwrap();
    let ocfg = json!({
        "Name": "medledger-interop",
        "StorageDirectory": odir.join("db"),
        "IndexDirectory": odir.join("db"),
        "HttpPort": orthanc_http,
        "DicomPort": orthanc_dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": false,
        "AuthenticationEnabled": false,
        "HttpTimeout": 60,
        "DicomScuTimeout": 30,
        "Plugins": [plugin],
        "DicomWeb": {
            "Enable": true,
            "Root": "/dicom-web/",
            "Servers": { "medledger": [format!("{web}/")] }
        },
        "DicomModalities": { "medledger": ["HOSPITAL_A", "127.0.0.1", dimse_port] }
    });
    std::fs::write(
        odir.join("orthanc.json"),
        serde_json::to_vec_pretty(&ocfg).unwrap(),
    )
    .unwrap();
    let log = std::fs::File::create(odir.join("orthanc.log")).unwrap();
    let _orthanc = Child(
        Command::new(&orthanc_bin)
            .arg(odir.join("orthanc.json"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let orth = format!("http://127.0.0.1:{orthanc_http}");
    let orthanc_log = || std::fs::read_to_string(odir.join("orthanc.log")).unwrap_or_default();
    let up = Instant::now();
    while !http()
        .get(format!("{orth}/system"))
        .send()
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            up.elapsed() < Duration::from_secs(90),
            "Orthanc did not answer on {orth} in 90 s; its log:\n{}",
            orthanc_log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, plugins) = get_json(&format!("{orth}/plugins"));
    assert!(
        plugins.as_array().unwrap().contains(&json!("dicom-web")),
        "{plugins}\n{}",
        orthanc_log()
    );

    // Six originals uploaded to Orthanc; four go to the node by C-STORE, two by STOW-RS.
    let mut ids = Vec::new();
    for f in &files[20..26] {
        let r = http()
            .post(format!("{orth}/instances"))
            .body(std::fs::read(f).unwrap())
            .send()
            .unwrap();
        assert!(r.status().is_success());
        let v: Value = r.json().unwrap();
        ids.push(v["ID"].as_str().unwrap().to_string());
    }
    let (code, sent) = post_json(
        &format!("{orth}/modalities/medledger/store"),
        &json!({ "Resources": ids[..4], "Synchronous": true }),
    );
    assert_eq!(code, 200, "{sent}\n{}", orthanc_log());
    assert_eq!(sent["InstancesCount"], 4, "{sent}");
    assert_eq!(sent["FailedInstancesCount"], 0, "{sent}");
    let (code, stowed) = post_json(
        &format!("{orth}/dicom-web/servers/medledger/stow"),
        &json!({ "Resources": ids[4..], "Synchronous": true }),
    );
    assert_eq!(code, 200, "{stowed}\n{}", orthanc_log());
    wait_for(
        "Orthanc's six instances registered on the node",
        Duration::from_secs(60),
        || node_instances(&web, &study_uid) == 26,
    );

    // C-FIND from Orthanc: the study, de-identified.
    let (code, q) = post_json(
        &format!("{orth}/modalities/medledger/query"),
        &json!({
            "Level": "Study",
            "Query": {
                "PatientID": "ML*",
                "StudyDate": "",
                "ModalitiesInStudy": "",
                "NumberOfStudyRelatedInstances": ""
            }
        }),
    );
    assert_eq!(code, 200, "{q}\n{}", orthanc_log());
    let (_, answers) = get_json(&format!(
        "{orth}/queries/{}/answers?expand&simplify",
        q["ID"].as_str().unwrap()
    ));
    assert_eq!(answers.as_array().map(Vec::len), Some(1), "{answers}");
    let a = &answers[0];
    assert_eq!(a["PatientID"], Value::from(pseudonym.as_str()), "{a}");
    assert_eq!(
        a["StudyInstanceUID"],
        Value::from(study_uid.as_str()),
        "{a}"
    );
    assert_eq!(a["ModalitiesInStudy"], "CT", "{a}");
    assert_eq!(a["NumberOfStudyRelatedInstances"], "26", "{a}");
    // And at series level, by the study's UID.
    let (_, q) = post_json(
        &format!("{orth}/modalities/medledger/query"),
        &json!({
            "Level": "Series",
            "Query": { "StudyInstanceUID": study_uid, "NumberOfSeriesRelatedInstances": "" }
        }),
    );
    let (_, answers) = get_json(&format!(
        "{orth}/queries/{}/answers?expand&simplify",
        q["ID"].as_str().unwrap()
    ));
    assert_eq!(answers.as_array().map(Vec::len), Some(1), "{answers}");
    assert_eq!(
        answers[0]["SeriesInstanceUID"],
        Value::from(series_uid.as_str())
    );
    assert_eq!(answers[0]["NumberOfSeriesRelatedInstances"], "26");

    // QIDO-RS from Orthanc's DICOMweb client. Its `qido` route rewrites the answer in
    // Orthanc's own JSON (one string per value) and drops IS values sent as JSON numbers
    // (PS3.18 F.2.3, as Orthanc's own server sends them): counts are read through `get`,
    // which passes the node's DICOM JSON on.
    let (code, found) = post_json(
        &format!("{orth}/dicom-web/servers/medledger/qido"),
        &json!({ "Uri": "/studies", "Arguments": { "PatientID": pseudonym } }),
    );
    assert_eq!(code, 200, "{found}");
    assert_eq!(found.as_array().map(Vec::len), Some(1), "{found}");
    assert_eq!(
        found[0]["0020000D"]["Value"],
        Value::from(study_uid.as_str()),
        "{found}"
    );
    assert_eq!(
        found[0]["00100020"]["Value"],
        Value::from(pseudonym.as_str()),
        "{found}"
    );
    let (code, found) = post_json(
        &format!("{orth}/dicom-web/servers/medledger/get"),
        &json!({ "Uri": format!("/studies/{study_uid}/series") }),
    );
    assert_eq!(code, 200, "{found}");
    assert_eq!(found.as_array().map(Vec::len), Some(1), "{found}");
    assert_eq!(
        attr(&found[0], "0020000E"),
        Value::from(series_uid.as_str())
    );
    assert_eq!(attr(&found[0], "00201209"), Value::from(26), "{found}");

    // The de-identified study pulled into Orthanc by WADO-RS, then again by C-MOVE.
    let holds_derivatives = |how: &str| -> String {
        let (_, studies) = get_json(&format!("{orth}/studies?expand"));
        let derived: Vec<&Value> = studies
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["MainDicomTags"]["StudyInstanceUID"] == study_uid.as_str())
            .collect();
        assert_eq!(derived.len(), 1, "{how}: {studies}");
        let id = derived[0]["ID"].as_str().unwrap().to_string();
        let (_, instances) = get_json(&format!("{orth}/studies/{id}/instances"));
        let instances = instances.as_array().unwrap();
        assert_eq!(instances.len(), 26, "{how}");
        for i in instances {
            let (_, tags) = get_json(&format!(
                "{orth}/instances/{}/simplified-tags",
                i["ID"].as_str().unwrap()
            ));
            assert_eq!(tags["PatientID"], Value::from(pseudonym.as_str()), "{how}");
            assert_eq!(tags["SeriesInstanceUID"], Value::from(series_uid.as_str()));
            assert_ne!(tags["PatientName"], Value::from(original_id.as_str()));
        }
        id
    };
    let (code, pulled) = post_json(
        &format!("{orth}/dicom-web/servers/medledger/retrieve"),
        &json!({ "Resources": [{ "Study": study_uid }] }),
    );
    assert_eq!(code, 200, "{pulled}\n{}", orthanc_log());
    assert_eq!(pulled["ReceivedInstancesCount"], "26", "{pulled}");
    let id = holds_derivatives("WADO-RS");
    let r = http()
        .delete(format!("{orth}/studies/{id}"))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    let (code, moved) = post_json(
        &format!("{orth}/modalities/medledger/move"),
        &json!({
            "Level": "Study",
            "Resources": [{ "StudyInstanceUID": study_uid }],
            "TargetAet": "ORTHANC",
            "Synchronous": true
        }),
    );
    assert_eq!(code, 200, "{moved}\n{}", orthanc_log());
    holds_derivatives("C-MOVE");
    // Orthanc holds the originals it was given and the derivatives, never mixed up.
    let (_, patients) = get_json(&format!("{orth}/patients?expand"));
    let mut ids: Vec<String> = patients
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["MainDicomTags"]["PatientID"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    let mut want = vec![original_id.clone(), pseudonym.clone()];
    want.sort();
    assert_eq!(ids, want);
    eprintln!("Orthanc: {:?}", started.elapsed());
}

/// A STOW-RS request body of Part 10 files.
fn stow(url: &str, files: &[Vec<u8>]) -> (u16, Value) {
    let boundary = "interop-0123456789abcdef";
    let body = stow_body(files, boundary);
    let r = http()
        .post(url)
        .header(
            "Content-Type",
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .body(body)
        .send()
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().unwrap_or(Value::Null))
}

/// What peers do every day: the same instance arriving again by another route (another
/// calling AE, or STOW-RS after C-STORE, with another file meta group or re-encoded) is
/// stored once and each sender told it is stored; STOW-RS into a study URL an instance does
/// not belong to refuses it and stores nothing.
#[test]
fn the_same_instance_sent_again_by_another_route_is_not_a_conflict() {
    let files = chest_ct();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dir = home.join("net");
    let base = common::free_base(44_000 + (std::process::id() % 1_000) as u16 * 4);
    let (_net, api) = network(home, &dir, base, json!([]));
    let web = format!("{api}/dicom-web");
    let dimse: std::net::SocketAddr = format!("127.0.0.1:{}", base + 200).parse().unwrap();
    let key = medledger_deid::DeidKey::from_text(
        std::fs::read_to_string(dir.join("hospital-a/deid.key"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let study_uid = key.replace_uid(&text_of(
        &files[0],
        dicom_dictionary_std::tags::STUDY_INSTANCE_UID,
    ));
    let a = std::fs::read(&files[0]).unwrap();
    let b = std::fs::read(&files[1]).unwrap();

    // STOW-RS into a study the instance does not belong to: refused (PS3.18 10.5.2)...
    let (code, v) = stow(&format!("{web}/studies/1.2.3.4"), std::slice::from_ref(&a));
    assert_eq!(code, 409, "{v}");
    // ...and so not stored: once B (by C-STORE) is registered, the study holds B only.
    let st =
        medledger_dicom_net::store_to(dimse, "MODALITY", "HOSPITAL_A", std::slice::from_ref(&b))
            .unwrap();
    assert!(st[0].is_success(), "{st:?}");
    wait_for("the study registered", Duration::from_secs(60), || {
        node_instances(&web, &study_uid) > 0
    });
    assert_eq!(
        node_instances(&web, &study_uid),
        1,
        "an instance STOW-RS answered 409 (0xC000) for was stored and registered"
    );

    // The same instance again, byte for byte, from another AE (a PACS forwarding what the
    // modality sent): a duplicate, not a failure.
    let st = medledger_dicom_net::store_to(dimse, "PACS", "HOSPITAL_A", std::slice::from_ref(&b))
        .unwrap();
    assert!(
        st[0].is_success() || st[0].is_warning(),
        "C-STORE of an instance already received from another AE: {st:?}"
    );
    // And by STOW-RS: the same file that C-STORE delivered.
    let (code, v) = stow(&format!("{web}/studies"), std::slice::from_ref(&b));
    assert_eq!(
        code, 200,
        "STOW-RS of an instance already received by C-STORE: {v}"
    );

    // A C-STORE cut off inside its pixel data (a sender that crashed while reading the
    // file): refused, and what the node wrote of it while it arrived is not kept for the
    // instance. Sent whole afterwards, it is acknowledged from the journal like any new
    // instance.
    let journaled = || metric(&api, "instances_journaled_total");
    let before = journaled();
    let cut = a[..a.len() * 3 / 4].to_vec();
    let st = medledger_dicom_net::store_to(dimse, "MODALITY", "HOSPITAL_A", &[cut]).unwrap();
    assert!(st[0].is_failure(), "a cut-off data set: {st:?}");
    let st =
        medledger_dicom_net::store_to(dimse, "MODALITY", "HOSPITAL_A", std::slice::from_ref(&a))
            .unwrap();
    assert!(st[0].is_success(), "{st:?}");
    assert_eq!(
        journaled(),
        before + 1,
        "the whole instance, after a cut-off one with its UID, was not journalled"
    );
    wait_for("the instance registered", Duration::from_secs(60), || {
        node_instances(&web, &study_uid) == 2
    });
}

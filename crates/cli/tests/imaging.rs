//! A node speaks DICOM, as a radiology department uses it: dcmtk sends the 64-slice chest CT
//! by C-STORE, the study is de-identified, stored encrypted, registered on the ledger and then
//! found with QIDO-RS and C-FIND, read back with WADO-RS (instances, metadata, frames,
//! rendered), moved by C-MOVE to a PACS that sees originals; STOW-RS and `medledger import`
//! take more; malformed input is refused with reasons; a node killed with SIGKILL in the
//! middle of an ingest keeps every instance it acknowledged.

mod common;
use common::{
    Child, attr, chest_ct, dcmtk, free_port, get_json, http, kill_and_wait, medledger, metric,
    network_up, network_with, run, stow_body, text, wait_for,
};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Parts of a multipart/related answer.
fn parts(resp: reqwest::blocking::Response) -> Vec<Vec<u8>> {
    let ct = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().unwrap();
    medledger_imaging::dicomweb::split_multipart(&ct, &body)
        .unwrap()
        .into_iter()
        .map(|(_, b)| b.to_vec())
        .collect()
}

/// A modality's TLS identity from the modalities' own authority (made with OpenSSL, as a
/// hospital's PKI would), and a self-signed one from no authority the node knows.
struct ModalityCertificates {
    ca: PathBuf,
    key: PathBuf,
    cert: PathBuf,
    rogue_key: PathBuf,
    rogue_cert: PathBuf,
}

fn modality_certificates(dir: &std::path::Path) -> ModalityCertificates {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/test installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    for (name, subject) in [("ca", "/CN=Modality CA"), ("rogue", "/CN=MODALITY")] {
        let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", subject];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &cert]);
        openssl(&args);
    }
    let mut args = vec!["req", "-subj", "/CN=MODALITY", "-keyout", "modality.key"];
    args.extend(ec);
    args.extend(["-out", "modality.csr"]);
    openssl(&args);
    std::fs::write(dir.join("ext.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "modality.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "modality.pem",
    ]);
    ModalityCertificates {
        ca: dir.join("ca.pem"),
        key: dir.join("modality.key"),
        cert: dir.join("modality.pem"),
        rogue_key: dir.join("rogue.key"),
        rogue_cert: dir.join("rogue.pem"),
    }
}

fn study_count(web: &str) -> usize {
    let (code, v) = get_json(&format!("{web}/studies"));
    if code == 204 {
        return 0;
    }
    v.as_array().map(Vec::len).unwrap_or(0)
}

/// A STOW-RS request of a multipart/related body with this boundary, to the node's studies.
fn stow_post(web: &str, boundary: &str, body: Vec<u8>) -> reqwest::blocking::Response {
    http()
        .post(format!("{web}/studies"))
        .header(
            "Content-Type",
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .body(body)
        .send()
        .unwrap()
}

/// Waits (at most 90 s) until every derived SOP Instance UID in `want` is visible to anonymous
/// QIDO-RS; panics with the node's log if some are not.
/// One of the node's metrics (`medledger_<name>`); `u64::MAX` when it cannot be read.
/// The SOP Instance UIDs `files` have in the de-identified view (made with `key`).
fn derived_sop_uids(files: &[Vec<u8>], key: &medledger_deid::DeidKey) -> Vec<String> {
    files
        .iter()
        .map(|f| {
            let (_, obj) = medledger_deid::read_instance(f).unwrap();
            key.replace_uid(
                obj.get(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim_end_matches('\0'),
            )
        })
        .collect()
}

fn wait_all_visible(web: &str, want: &[String], log: &std::path::Path, what: &str) {
    let visible = || -> usize {
        let (_, all) = get_json(&format!("{web}/instances?limit=100000"));
        let have: std::collections::HashSet<String> = all
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| attr(i, "00080018").as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        want.iter().filter(|u| have.contains(*u)).count()
    };
    let start = Instant::now();
    while visible() < want.len() && start.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        visible(),
        want.len(),
        "{what} missing after SIGKILL and restart; node log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn a_node_ingests_queries_and_serves_dicom_and_keeps_what_it_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dir = home.join("net");
    let base = common::free_base(30_000 + (std::process::id() % 1_000) as u16 * 4);
    // Hospital A's PACS (a dcmtk storescp) sees originals; studies register after 1 s quiet.
    let pacs_dir = home.join("pacs");
    std::fs::create_dir_all(&pacs_dir).unwrap();
    let pacs_port = free_port();
    let _pacs = Child(
        dcmtk("storescp")
            .args(["-aet", "PACS", "+xa", "-od"])
            .arg(&pacs_dir)
            .arg(pacs_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The modalities' own authority issues their certificates for DICOM TLS; the node takes
    // only peers with one (mutual TLS).
    let pki = home.join("modality-pki");
    let modality = modality_certificates(&pki);
    let (_net, api) = network_with(
        home,
        &dir,
        base,
        serde_json::json!([
            { "ae_title": "PACS", "addr": format!("127.0.0.1:{pacs_port}"), "originals": true }
        ]),
        |cfg| cfg["imaging"]["dicom_tls_clients"] = modality.ca.to_str().unwrap().into(),
    );
    let web = format!("{api}/dicom-web");
    let dimse: SocketAddr = format!("127.0.0.1:{}", base + 200).parse().unwrap();
    let port = dimse.port().to_string();

    // C-ECHO, then the chest CT by C-STORE.
    let echo =
        run(dcmtk("echoscu").args(["-aet", "MODALITY", "-aec", "HOSPITAL_A", "127.0.0.1", &port]));
    assert!(echo.status.success(), "{}", text(&echo));
    let files = chest_ct();
    assert_eq!(files.len(), 64);
    let store = run(dcmtk("storescu")
        .args(["-aet", "MODALITY", "-aec", "HOSPITAL_A", "127.0.0.1", &port])
        .args(&files));
    assert!(store.status.success(), "{}", text(&store));

    // The same services over DICOM TLS (PS3.15 Annex B): the node's certificate from the
    // network's authority, the modality's from its own. A sender that does not trust the node,
    // or that has no certificate from the modalities' authority, gets no association.
    let tls_port = (base + 500).to_string();
    let ca = dir.join("https-ca.pem");
    let ca = ca.to_str().unwrap();
    let (key, cert) = (
        modality.key.to_str().unwrap(),
        modality.cert.to_str().unwrap(),
    );
    let called = [
        "-aet",
        "MODALITY",
        "-aec",
        "HOSPITAL_A",
        "127.0.0.1",
        &tls_port,
    ];
    let tls: Vec<&str> = ["+tls", key, cert, "+cf", ca]
        .into_iter()
        .chain(called)
        .collect();
    let echo = run(dcmtk("echoscu").args(&tls));
    assert!(echo.status.success(), "{}", text(&echo));
    let again = run(dcmtk("storescu").args(&tls).args(&files[..4]));
    assert!(again.status.success(), "{}", text(&again));
    // Without `+cf CA`: the node's certificate is not trusted.
    let untrusted = run(dcmtk("echoscu").args(["+tls", key, cert]).args(called));
    assert!(!untrusted.status.success(), "{}", text(&untrusted));
    // No client certificate, or one from another authority: refused by the node.
    let anonymous = run(dcmtk("echoscu").args(["+tla", "+cf", ca]).args(called));
    assert!(!anonymous.status.success(), "{}", text(&anonymous));
    let (rogue_key, rogue_cert) = (
        modality.rogue_key.to_str().unwrap(),
        modality.rogue_cert.to_str().unwrap(),
    );
    let rogue = run(dcmtk("echoscu")
        .args(["+tls", rogue_key, rogue_cert, "+cf", ca])
        .args(called));
    assert!(!rogue.status.success(), "{}", text(&rogue));

    // Visible once the ledger has finalised its registration.
    wait_for("the study in QIDO-RS", Duration::from_secs(60), || {
        study_count(&web) == 1
    });
    let (code, studies) = get_json(&format!("{web}/studies"));
    assert_eq!(code, 200);
    let s = &studies[0];
    let original = dicom_object::open_file(&files[0]).unwrap();
    let original_id = original
        .element(dicom_dictionary_std::tags::PATIENT_ID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim()
        .to_string();
    let original_study = original
        .element(dicom_dictionary_std::tags::STUDY_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    // The anonymous view is the de-identified one: pseudonym, new UIDs.
    let pseudonym = attr(s, "00100020").as_str().unwrap().to_string();
    assert!(
        pseudonym.starts_with("ML") && pseudonym != original_id,
        "{s}"
    );
    let study_uid = attr(s, "0020000D").as_str().unwrap().to_string();
    assert_ne!(study_uid, original_study);
    assert_eq!(attr(s, "00201208"), Value::from(64), "{s}");
    assert_eq!(attr(s, "00080061"), Value::from("CT"), "{s}");
    // Both forms are on the ledger, owned by hospital A; no identifier there.
    let ledger = medledger(home)
        .args(["ledger", "studies", "--node", &api])
        .output()
        .unwrap();
    assert!(ledger.status.success(), "{}", text(&ledger));
    let on_ledger: Value = serde_json::from_slice(&ledger.stdout).unwrap();
    assert_eq!(on_ledger.as_array().unwrap().len(), 2, "{on_ledger}");
    assert!(!String::from_utf8_lossy(&ledger.stdout).contains(&original_id));

    // A clinician of hospital A, registered on the ledger, sees the identified original with
    // a token signed by their key; hospital B's admin and a forged token do not.
    let issue = medledger(home)
        .args(["identity", "issue", "--ca"])
        .arg(dir.join("hospital-a"))
        .args(["--name", "Dr A", "--roles", "clinician", "--out"])
        .arg(home.join("dra"))
        .output()
        .unwrap();
    assert!(issue.status.success(), "{}", text(&issue));
    let add = medledger(home)
        .args(["ledger", "add-member", "--node", &api, "--key-file"])
        .arg(dir.join("hospital-a/admin.key"))
        .arg("--cert")
        .arg(home.join("dra.pem"))
        .output()
        .unwrap();
    assert!(add.status.success(), "{}", text(&add));
    let token = |key: PathBuf| {
        let o = medledger(home)
            .args(["identity", "token", "--org", "hospital-a", "--key-file"])
            .arg(key)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let with = |t: &str| {
        let r = http()
            .get(format!("{web}/studies"))
            .bearer_auth(t)
            .send()
            .unwrap();
        let code = r.status().as_u16();
        (code, r.json::<Value>().unwrap_or(Value::Null))
    };
    let (code, v) = with(&token(home.join("dra.key")));
    assert_eq!(code, 200, "{v}");
    assert_eq!(attr(&v[0], "00100020"), Value::from(original_id.as_str()));
    assert_eq!(
        attr(&v[0], "0020000D"),
        Value::from(original_study.as_str())
    );
    let (code, _) = with(&token(dir.join("hospital-b/admin.key")));
    assert_eq!(code, 403);
    let (code, e) = with("ml1.00.1.00");
    assert_eq!(code, 401);
    assert!(e["error"].as_str().unwrap().contains("refused"), "{e}");

    // QIDO-RS matching, paging, errors.
    let (_, series) = get_json(&format!("{web}/studies/{study_uid}/series"));
    assert_eq!(series.as_array().unwrap().len(), 1);
    let series_uid = attr(&series[0], "0020000E").as_str().unwrap().to_string();
    let (_, inst) = get_json(&format!(
        "{web}/studies/{study_uid}/series/{series_uid}/instances?limit=10&offset=60"
    ));
    assert_eq!(inst.as_array().unwrap().len(), 4);
    let (_, by_id) = get_json(&format!(
        "{web}/studies?PatientID={pseudonym}&includefield=all"
    ));
    assert_eq!(by_id.as_array().unwrap().len(), 1);
    let (_, by_wildcard) = get_json(&format!("{web}/studies?PatientID=ML*&ModalitiesInStudy=CT"));
    assert_eq!(by_wildcard.as_array().unwrap().len(), 1);
    let (code, _) = get_json(&format!("{web}/studies?PatientID=NOBODY"));
    assert_eq!(code, 204);
    let (code, _) = get_json(&format!("{web}/studies?StudyDate=19000101-19001231"));
    assert_eq!(code, 204);
    let (code, e) = get_json(&format!("{web}/studies?NoSuchAttribute=1"));
    assert_eq!(code, 400);
    assert!(e["error"].as_str().unwrap().contains("NoSuchAttribute"));

    // WADO-RS: the study (64 verified instances), metadata, a frame, a rendering.
    let resp = http()
        .get(format!("{web}/studies/{study_uid}"))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let got = parts(resp);
    assert_eq!(got.len(), 64);
    for file in &got {
        let (_, obj) = medledger_deid::read_instance(file).unwrap();
        let id = obj
            .get(dicom_dictionary_std::tags::PATIENT_ID)
            .unwrap()
            .to_str()
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(id, pseudonym);
    }
    let (code, meta) = get_json(&format!("{web}/studies/{study_uid}/metadata"));
    assert_eq!(code, 200);
    assert_eq!(meta.as_array().unwrap().len(), 64);
    let sop = attr(&meta[0], "00080018").as_str().unwrap().to_string();
    let rows = attr(&meta[0], "00280010").as_u64().unwrap();
    let cols = attr(&meta[0], "00280011").as_u64().unwrap();
    let inst_url = format!("{web}/studies/{study_uid}/series/{series_uid}/instances/{sop}");
    let frames = parts(http().get(format!("{inst_url}/frames/1")).send().unwrap());
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].len() as u64, rows * cols * 2);
    // The metadata's BulkDataURI for Pixel Data gives the instance's pixel data: the same
    // bytes the instance itself carries.
    let uri = meta[0]["7FE00010"]["BulkDataURI"].as_str().unwrap();
    let origin = &web[..web.find("/dicom-web").unwrap()];
    let bulk = parts(http().get(format!("{origin}{uri}")).send().unwrap());
    assert_eq!(bulk.len(), 1);
    let instance = got
        .iter()
        .map(|f| medledger_deid::read_instance(f).unwrap().1)
        .find(|o| {
            o.get(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches('\0')
                == sop
        })
        .unwrap();
    let pixels = instance
        .get(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap();
    assert_eq!(bulk[0], pixels.as_ref());
    assert_eq!(bulk[0], frames[0]);
    for (tag, want) in [("7FE0001", 400), ("00100010", 404), ("7FE00008", 404)] {
        let r = http()
            .get(format!("{inst_url}/bulkdata/{tag}"))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "bulkdata/{tag}");
    }
    let png = http()
        .get(format!(
            "{inst_url}/rendered?window=-600,1500&viewport=128,128"
        ))
        .header("Accept", "image/png")
        .send()
        .unwrap();
    assert_eq!(png.status().as_u16(), 200);
    assert!(png.bytes().unwrap().starts_with(b"\x89PNG"));
    // The accept query parameter wins over the header; series and study thumbnails.
    let png = http()
        .get(format!("{inst_url}/thumbnail?accept=image/png"))
        .header(
            "Accept",
            "multipart/related; type=\"application/octet-stream\"",
        )
        .send()
        .unwrap();
    assert_eq!(png.status().as_u16(), 200);
    assert!(png.bytes().unwrap().starts_with(b"\x89PNG"));
    for url in [
        format!("{web}/studies/{study_uid}/thumbnail?viewport=64,64"),
        format!("{web}/studies/{study_uid}/series/{series_uid}/thumbnail"),
    ] {
        let r = http()
            .get(&url)
            .header("Accept", "image/jpeg")
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{url}");
        assert!(r.bytes().unwrap().starts_with(b"\xff\xd8"), "{url}");
    }
    // No transcoding: a transfer syntax other than the stored one is refused, not ignored.
    let jpeg = http()
        .get(&inst_url)
        .header(
            "Accept",
            "multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.4.50",
        )
        .send()
        .unwrap();
    assert_eq!(jpeg.status().as_u16(), 406);
    let xml = http()
        .get(format!("{inst_url}/metadata"))
        .header("Accept", "application/dicom+xml")
        .send()
        .unwrap();
    assert_eq!(xml.status().as_u16(), 406);
    let any = http()
        .get(&inst_url)
        .header(
            "Accept",
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        )
        .send()
        .unwrap();
    assert_eq!(any.status().as_u16(), 200);
    // Read again, the instance comes from the read cache: the same bytes, counted as hits.
    let any = parts(any);
    let hits = metric(&api, "read_cache_hits_total");
    let again = parts(
        http()
            .get(&inst_url)
            .header(
                "Accept",
                "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
            )
            .send()
            .unwrap(),
    );
    assert!(again == any, "a cached read gave other bytes");
    assert!(
        metric(&api, "read_cache_hits_total") > hits,
        "the second read of an instance did not hit the read cache"
    );
    let missing = http().get(format!("{inst_url}/frames/2")).send().unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let unknown = http().get(format!("{web}/studies/1.2.3.4")).send().unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    // CORS for a viewer on another origin.
    let pre = http()
        .request(reqwest::Method::OPTIONS, format!("{web}/studies"))
        .header("Origin", "http://viewer.example")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .unwrap();
    assert!(pre.status().is_success());
    assert_eq!(pre.headers()["access-control-allow-origin"], "*");

    // C-FIND sees the de-identified view; the PACS's C-MOVE gets the originals.
    let find = run(dcmtk("findscu")
        .args([
            "-S",
            "-aet",
            "VIEWER",
            "-aec",
            "HOSPITAL_A",
            "127.0.0.1",
            &port,
        ])
        .args([
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID",
            "-k",
            "StudyInstanceUID",
        ]));
    assert!(find.status.success(), "{}", text(&find));
    let out = text(&find);
    assert!(
        out.contains(&pseudonym) && !out.contains(&original_id),
        "{out}"
    );
    let mv = run(dcmtk("movescu")
        .args([
            "-S",
            "-aet",
            "PACS",
            "-aec",
            "HOSPITAL_A",
            "-aem",
            "PACS",
            "127.0.0.1",
            &port,
        ])
        .args([
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={original_study}"),
        ]));
    assert!(mv.status.success(), "{}", text(&mv));
    let moved: Vec<_> = std::fs::read_dir(&pacs_dir).unwrap().collect();
    assert_eq!(moved.len(), 64, "{}", text(&mv));
    // An AE not configured for originals cannot move them (it sees derivatives only).
    let mv = run(dcmtk("movescu")
        .args([
            "-S",
            "-aet",
            "STRANGER",
            "-aec",
            "HOSPITAL_A",
            "-aem",
            "PACS",
            "127.0.0.1",
            &port,
        ])
        .args([
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={original_study}"),
        ]));
    assert_eq!(
        std::fs::read_dir(&pacs_dir).unwrap().count(),
        64,
        "{}",
        text(&mv)
    );

    // Sending the series again changes nothing.
    let again = run(dcmtk("storescu")
        .args(["-aet", "MODALITY", "-aec", "HOSPITAL_A", "127.0.0.1", &port])
        .args(&files[..8]));
    assert!(again.status.success(), "{}", text(&again));

    // Malformed input by STOW-RS: refused with a reason, nothing else changes.
    let boundary = "XXbound";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(b"this is not DICOM at all");
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r = stow_post(&web, boundary, body);
    assert_eq!(r.status().as_u16(), 409);
    let v: Value = r.json().unwrap();
    assert_eq!(
        v["00081198"]["Value"][0]["00081197"]["Value"][0],
        Value::from(0xC000)
    );
    let r = http()
        .post(format!("{web}/studies"))
        .header(
            "Content-Type",
            "multipart/related; type=\"application/dicom\"",
        )
        .body("x")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = http()
        .post(format!("{web}/studies"))
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);

    // A STOW-RS body that arrives in small pieces (chunked, 1000 bytes at a time): each part
    // is stored as it completes. Cut short, the request is refused and says why.
    struct Trickle(std::io::Cursor<Vec<u8>>);
    impl std::io::Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(1000);
            self.0.read(&mut buf[..n])
        }
    }
    let mut body = Vec::new();
    for f in &files[8..11] {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(&std::fs::read(f).unwrap());
        body.extend_from_slice(b"\r\n");
    }
    let cut = body.clone();
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let stow_trickle = |body: Vec<u8>| {
        http()
            .post(format!("{web}/studies"))
            .header(
                "Content-Type",
                format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
            )
            .body(reqwest::blocking::Body::new(Trickle(std::io::Cursor::new(
                body,
            ))))
            .send()
            .unwrap()
    };
    let r = stow_trickle(body);
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["00081199"]["Value"].as_array().unwrap().len(), 3, "{v}");
    let r = stow_trickle(cut);
    assert_eq!(r.status().as_u16(), 400);
    let msg = r.text().unwrap();
    assert!(msg.contains("closing delimiter"), "{msg}");

    // A compressed multi-frame instance (RLE): frames and bulk data as stored, or decoded to
    // Explicit VR Little Endian when the client asks for that.
    let (_, before) = get_json(&format!("{web}/studies"));
    let before: Vec<String> = before
        .as_array()
        .unwrap()
        .iter()
        .map(|s| attr(s, "0020000D").as_str().unwrap().to_string())
        .collect();
    let rle = medledger_testkit::test_data_dir()
        .join("dicomparser/encapsulated/multi-frame/CT0012.not_fragmented_bot_rle.dcm");
    let imp = medledger(home)
        .args(["import", "--json", "--node", &api])
        .arg(&rle)
        .output()
        .unwrap();
    assert!(imp.status.success(), "{}", text(&imp));
    let mut rle_study = None;
    wait_for("the RLE study", Duration::from_secs(60), || {
        let (_, now) = get_json(&format!("{web}/studies"));
        rle_study = now.as_array().unwrap().iter().find_map(|s| {
            let uid = attr(s, "0020000D").as_str().unwrap().to_string();
            (!before.contains(&uid)).then_some(uid)
        });
        rle_study.is_some()
    });
    let rle_study = rle_study.expect("the RLE study is registered");
    let (_, rle_meta) = get_json(&format!("{web}/studies/{rle_study}/metadata"));
    let m = &rle_meta[0];
    let rle_frames = attr(m, "00280008").as_u64().unwrap() as usize;
    let rle_rows = attr(m, "00280010").as_u64().unwrap() as usize;
    let rle_cols = attr(m, "00280011").as_u64().unwrap() as usize;
    assert!(rle_frames > 1);
    let rle_url = format!(
        "{web}/studies/{rle_study}/series/{}/instances/{}",
        attr(m, "0020000E").as_str().unwrap(),
        attr(m, "00080018").as_str().unwrap()
    );
    let ask = |url: &str, ts: &str| {
        http()
            .get(url)
            .header(
                "Accept",
                format!(
                    "multipart/related; type=\"application/octet-stream\"; transfer-syntax={ts}"
                ),
            )
            .send()
            .unwrap()
    };
    let stored = parts(ask(&format!("{rle_url}/frames/1,2"), "*"));
    assert_eq!(stored.len(), 2);
    assert!(
        stored[0].len() < rle_rows * rle_cols * 2,
        "RLE frames come as stored"
    );
    let r = ask(&format!("{rle_url}/frames/2,1"), "1.2.840.10008.1.2.1");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("multipart/related"), "{ct}");
    let decoded = parts(r);
    assert_eq!(decoded.len(), 2);
    assert!(decoded.iter().all(|f| f.len() == rle_rows * rle_cols * 2));
    assert_ne!(decoded[0], decoded[1]);
    let uri = m["7FE00010"]["BulkDataURI"].as_str().unwrap();
    let bulk = parts(ask(&format!("{origin}{uri}"), "1.2.840.10008.1.2.1"));
    assert_eq!(bulk.len(), 1);
    assert_eq!(bulk[0].len(), rle_frames * rle_rows * rle_cols * 2);
    assert_eq!(&bulk[0][..decoded[1].len()], &decoded[1][..]);
    assert_eq!(parts(ask(&format!("{origin}{uri}"), "*")).len(), rle_frames);
    let r = ask(&format!("{rle_url}/frames/1"), "1.2.840.10008.1.2.4.80");
    assert_eq!(r.status().as_u16(), 406);
    // The whole instance: as stored, or converted to Explicit VR Little Endian on request,
    // its Pixel Data then the decoded frames.
    let instance = |ts: &str| {
        http()
            .get(&rle_url)
            .header(
                "Accept",
                format!("multipart/related; type=\"application/dicom\"; transfer-syntax={ts}"),
            )
            .send()
            .unwrap()
    };
    // Each part with its content type.
    let typed_parts = |r: reqwest::blocking::Response| {
        assert_eq!(r.status().as_u16(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        let body = r.bytes().unwrap();
        medledger_imaging::dicomweb::split_multipart(&ct, &body).unwrap()
    };
    let as_stored = typed_parts(instance("*"));
    assert_eq!(as_stored.len(), 1);
    assert!(
        as_stored[0]
            .0
            .contains("transfer-syntax=1.2.840.10008.1.2.5"),
        "{}",
        as_stored[0].0
    );
    let converted = typed_parts(instance("1.2.840.10008.1.2.1"));
    assert_eq!(converted.len(), 1);
    assert!(
        converted[0]
            .0
            .contains("transfer-syntax=1.2.840.10008.1.2.1"),
        "{}",
        converted[0].0
    );
    let obj = dicom_object::OpenFileOptions::new()
        .from_reader(&converted[0].1[..])
        .expect("a Part 10 file");
    assert_eq!(
        obj.meta().transfer_syntax().trim_end_matches('\0'),
        "1.2.840.10008.1.2.1"
    );
    let pixels = obj
        .element(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap();
    assert_eq!(&pixels[..bulk[0].len()], &bulk[0][..]);
    let r = instance("1.2.840.10008.1.2.4.80");
    assert_eq!(r.status().as_u16(), 406);

    // The damaged files of the test data: each stored or refused with a reason, none crash.
    let damaged: Vec<PathBuf> = medledger_testkit::manifest()
        .into_iter()
        .filter(|e| !e.is_parseable())
        .map(|e| medledger_testkit::test_data_dir().join(&e.path))
        .collect();
    assert!(!damaged.is_empty());
    let imp = medledger(home)
        .args(["import", "--json", "--node", &api])
        .args(&damaged)
        .output()
        .unwrap();
    let report: Value =
        serde_json::from_slice(&imp.stdout).unwrap_or_else(|_| panic!("{}", text(&imp)));
    assert_eq!(
        report["stored"].as_u64().unwrap() as usize + report["failed"].as_array().unwrap().len(),
        damaged.len(),
        "{report}"
    );
    for f in report["failed"].as_array().unwrap() {
        assert!(!f[1].as_str().unwrap().is_empty(), "{report}");
    }
    assert!(
        http()
            .get(format!("{api}/health"))
            .send()
            .unwrap()
            .status()
            .is_success()
    );

    // The index comes back from its sealed records in the store: a node killed once every
    // study is registered and recorded answers the same without rebuilding any study from
    // the store; a damaged or missing record costs only its own study's rebuild.
    let metric = |name: &str| metric(&api, name);
    wait_for(
        "every study registered and its index record written",
        Duration::from_secs(90),
        || metric("studies_pending_registration") == 0 && metric("index_records_unwritten") == 0,
    );
    let answers = || -> Vec<String> {
        let mut out = Vec::new();
        for q in [
            "studies?limit=100000",
            "series?limit=100000",
            "instances?limit=100000",
        ] {
            let (code, v) = get_json(&format!("{web}/{q}"));
            assert_eq!(code, 200, "{q}");
            out.extend(v.as_array().unwrap().iter().map(|x| x.to_string()));
        }
        out.sort();
        out
    };
    let before = answers();
    assert!(before.len() > 64, "{} answers", before.len());
    let studies_before = metric("studies");
    let restart = |what: &str| -> (u64, u64) {
        let pid = std::fs::read_to_string(dir.join("hospital-a/node.pid")).unwrap();
        kill_and_wait(pid.trim().parse().unwrap());
        let up = medledger(home)
            .args(["network", "up"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(up.status.success(), "{what}: {}", text(&up));
        let start = Instant::now();
        while !http()
            .get(format!("{api}/health"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what}: not healthy within 60 s; node log:\n{}",
                std::fs::read_to_string(dir.join("hospital-a/node.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        (
            metric("index_start_studies_from_records"),
            metric("index_start_studies_rebuilt"),
        )
    };
    assert_eq!(
        restart("restart with every index record"),
        (studies_before, 0)
    );
    assert_eq!(answers(), before, "the index read from its records differs");
    let records: Vec<PathBuf> = std::fs::read_dir(dir.join("hospital-a/store/private/index/v1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(records.len() as u64, studies_before);
    let mut damaged_record = std::fs::read(&records[0]).unwrap();
    let mid = damaged_record.len() / 2;
    damaged_record[mid] ^= 0x40;
    std::fs::write(&records[0], damaged_record).unwrap();
    std::fs::remove_file(&records[1]).unwrap();
    assert_eq!(
        restart("restart with a damaged and a missing index record"),
        (studies_before - 2, 2)
    );
    assert_eq!(
        answers(),
        before,
        "the index rebuilt from the store differs"
    );

    // SIGKILL in the middle of an ingest: every acknowledged instance survives.
    let synth = home.join("synth");
    std::fs::create_dir_all(&synth).unwrap();
    let patient = medledger_testkit::synth::FakePatient::generate(7);
    let spec = medledger_testkit::synth::CtStudySpec {
        slices: 600,
        rows: 64,
        columns: 64,
        ..medledger_testkit::synth::CtStudySpec::for_seed(7)
    };
    let mut sent = Vec::new();
    for (i, bytes) in medledger_testkit::synth::ct_study(&patient, &spec)
        .into_iter()
        .enumerate()
    {
        sent.push(bytes.clone());
        std::fs::write(synth.join(format!("{i:04}.dcm")), bytes).unwrap();
    }
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sender = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            for file in sent {
                match medledger_dicom_net::store_to(
                    dimse,
                    "MODALITY",
                    "HOSPITAL_A",
                    std::slice::from_ref(&file),
                ) {
                    Ok(st) if st[0].is_success() => {
                        let (_, obj) = medledger_deid::read_instance(&file).unwrap();
                        let uid = obj
                            .get(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
                            .unwrap()
                            .to_str()
                            .unwrap()
                            .trim_end_matches('\0')
                            .to_string();
                        acked.lock().unwrap().push(uid);
                    }
                    _ => return,
                }
            }
        })
    };
    // Acknowledgements come from the journal within a millisecond or two: the kill follows
    // the 20th at once, not at the next quarter-second poll.
    let start = Instant::now();
    while acked.lock().unwrap().len() < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no acknowledged instances"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid: i32 = std::fs::read_to_string(dir.join("hospital-a/node.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill_and_wait(pid);
    sender.join().unwrap();
    let acknowledged = acked.lock().unwrap().clone();
    assert!(
        acknowledged.len() < 600,
        "the kill came too late to test anything"
    );
    network_up(home, &dir);
    // The derivatives' UIDs are the site key's replacements of the originals'.
    let key = medledger_deid::DeidKey::from_text(
        std::fs::read_to_string(dir.join("hospital-a/deid.key"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let derived: Vec<String> = acknowledged.iter().map(|u| key.replace_uid(u)).collect();
    wait_all_visible(
        &web,
        &derived,
        &dir.join("hospital-a/node.log"),
        "acknowledged instances",
    );
    // Acknowledged, not yet stored: a STOW-RS request of 64 full-size CT slices is answered
    // once they are sealed in the journal, and storing them takes longer than a SIGKILL sent
    // on the answer. The restarted node stores them from its journal.
    let spec = medledger_testkit::synth::CtStudySpec {
        slices: 64,
        rows: 512,
        columns: 512,
        ..medledger_testkit::synth::CtStudySpec::for_seed(8)
    };
    let files = medledger_testkit::synth::ct_study(
        &medledger_testkit::synth::FakePatient::generate(8),
        &spec,
    );
    let uids = derived_sop_uids(&files, &key);
    let boundary = "journal-boundary";
    let body = stow_body(&files, boundary);
    let pid: i32 = std::fs::read_to_string(dir.join("hospital-a/node.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let r = stow_post(&web, boundary, body);
    // Not waited for: `network up` right after a SIGKILL finds the node still being torn
    // down, and must wait for it rather than take it for a running one.
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap_or_default());
    network_up(home, &dir);
    wait_all_visible(
        &web,
        &uids,
        &dir.join("hospital-a/node.log"),
        "instances acknowledged by STOW-RS",
    );
    let replayed = metric("journal_replayed_total");
    assert_ne!(replayed, u64::MAX, "metrics unreadable");
    assert!(
        replayed > 0,
        "the kill came after the node had stored everything: the journal was not replayed"
    );

    // The store goes away under the node (a volume unmounted, a disk full) after the journal
    // acknowledged an instance: the node keeps it in its journal, tries again with back-off,
    // and stores it once the store is back, without a restart.
    let files = medledger_testkit::synth::ct_study(
        &medledger_testkit::synth::FakePatient::generate(9),
        &medledger_testkit::synth::CtStudySpec {
            slices: 3,
            rows: 64,
            columns: 64,
            ..medledger_testkit::synth::CtStudySpec::for_seed(9)
        },
    );
    let uids = derived_sop_uids(&files, &key);
    let store = dir.join("hospital-a/store");
    let away = dir.join("hospital-a/store.away");
    let retries = metric("journal_retries_total");
    std::fs::rename(&store, &away).unwrap();
    let r = stow_post(&web, "retry-boundary", stow_body(&files, "retry-boundary"));
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap_or_default());
    wait_for(
        "the node finding its store gone and planning a retry",
        Duration::from_secs(30),
        || {
            let n = metric("journal_retries_total");
            n != u64::MAX && n > retries
        },
    );
    assert!(metric("journal_outstanding") >= 1);
    assert!(
        !store.exists(),
        "the node made a new store where the old one was"
    );
    std::fs::rename(&away, &store).unwrap();
    wait_all_visible(
        &web,
        &uids,
        &dir.join("hospital-a/node.log"),
        "instances acknowledged while the store was away",
    );
    wait_for(
        "the journal drained once the store came back",
        Duration::from_secs(30),
        || metric("journal_outstanding") == 0,
    );

    // And the store verifies.
    let verify = medledger(home)
        .args(["store", "verify", "--deep", "--store"])
        .arg(dir.join("hospital-a/store"))
        .arg("--key-file")
        .arg(dir.join("hospital-a/store.key"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify));
}

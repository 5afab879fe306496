//! A radiologist opens a study in a real viewer: OHIF 3.13.2, served from its own origin, in
//! headless Chromium driven by Playwright, reads hospital A's DICOMweb across origins (CORS):
//! the study list shows the de-identified study (pseudonym, CT, 64 instances), and the viewer
//! draws a CT slice from QIDO-RS, WADO-RS metadata and frames, with no request refused.
//!
//! Needs what `scripts/install-viewer` installs (Chromium, the OHIF build, playwright-core);
//! fails, never skips, when it is missing.

mod common;
use common::{attr, get_json, medledger, network, text, wait_for};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const OHIF_VERSION: &str = "3.13.2";
const CHROMIUM: &str = "/usr/bin/chromium";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The folder `scripts/install-viewer` fills: `MEDLEDGER_VIEWER`, else
/// `${MEDLEDGER_CACHE:-$HOME/.cache/medledger}/viewer`.
fn viewer_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MEDLEDGER_VIEWER") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("MEDLEDGER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/medledger")
        });
    cache.join("viewer")
}

/// Fails the test, with what to run, when a piece of the viewer set-up is missing.
fn check_installed(dir: &Path) {
    let hint = "run scripts/install-viewer (and set MEDLEDGER_VIEWER to the folder it prints \
                if it is not the default)";
    let package: Value = std::fs::read(dir.join("ohif/package.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("the OHIF viewer is missing from {}: {hint}", dir.display()));
    assert_eq!(
        package["version"].as_str(),
        Some(OHIF_VERSION),
        "OHIF in {} is not {OHIF_VERSION}: {hint}",
        dir.display()
    );
    assert!(
        dir.join("ohif/dist/index.html").is_file(),
        "the OHIF build (ohif/dist) is missing from {}: {hint}",
        dir.display()
    );
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .is_file(),
        "playwright-core is missing from {}: {hint}",
        dir.display()
    );
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: {hint}"
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node (Node.js) is missing: install it to run the viewer test"
    );
}

/// The `app-config.js` that points OHIF at the node's DICOMweb root.
fn app_config(dicomweb: &str) -> String {
    format!(
        r#"window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {{}},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: {{ option: 'never' }},
  showErrorDetails: 'always',
  defaultDataSourceName: 'medledger',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'medledger',
      configuration: {{
        friendlyName: 'medledger hospital A',
        name: 'medledger',
        qidoRoot: '{dicomweb}',
        wadoRoot: '{dicomweb}',
        wadoUriRoot: '{dicomweb}',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'thumbnail',
        // OHIF's default strategy (bulkDataRetrieve) wants the thumbnail inside a multipart
        // body; 'fetch' asks for image/jpeg as PS3.18 describes the thumbnail resource.
        thumbnailRequestStrategy: 'fetch',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: false,
        omitQuotationForMultipartRequest: false,
        bulkDataURI: {{ enabled: true }},
      }},
    }},
  ],
}};
"#
    )
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "ttf" => "font/ttf",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        _ => "application/octet-stream",
    }
}

/// One request of the static server: files of `root`, the generated `app-config.js`, and
/// `index.html` for the viewer's own routes (`/viewer?...`), one request per connection.
fn serve_one(mut stream: TcpStream, root: &Path, config: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("");
    let target = words.next().unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let (status, ctype, body): (&str, &str, Vec<u8>) = if method != "GET" && method != "HEAD" {
        ("405 Method Not Allowed", "text/plain", b"GET only".to_vec())
    } else if path.split('/').any(|s| s == ".." || s.contains('\\')) {
        ("400 Bad Request", "text/plain", b"bad path".to_vec())
    } else if path == "/app-config.js" {
        (
            "200 OK",
            "text/javascript; charset=utf-8",
            config.as_bytes().to_vec(),
        )
    } else {
        let rel = path.trim_start_matches('/');
        let file = root.join(if rel.is_empty() { "index.html" } else { rel });
        if file.is_file() {
            ("200 OK", content_type(&file), std::fs::read(&file)?)
        } else if !rel.rsplit('/').next().unwrap_or("").contains('.') {
            // A route of the single-page app.
            (
                "200 OK",
                "text/html; charset=utf-8",
                std::fs::read(root.join("index.html"))?,
            )
        } else {
            ("404 Not Found", "text/plain", b"not found".to_vec())
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if method == "GET" {
        stream.write_all(&body)?;
    }
    stream.flush()?;
    // Let the client read everything before the socket closes.
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = reader.read(&mut [0u8; 64]);
    Ok(())
}

/// Serves the OHIF build on a free loopback port (another origin than the node's); returns
/// its URL. The server lives as long as the test process.
fn serve_viewer(root: PathBuf, config: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let root = std::sync::Arc::new(root);
    let config = std::sync::Arc::new(config);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            let config = config.clone();
            std::thread::spawn(move || {
                let _ = serve_one(stream, &root, &config);
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// Runs `cmd` to its end, its output in files under `dir`; kills it (by its PID) past `limit`.
fn run_limited(cmd: &mut Command, dir: &Path, limit: Duration) -> Output {
    let (out_path, err_path) = (dir.join("node.stdout"), dir.join("node.stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap(),
        stderr: std::fs::read(&err_path).unwrap(),
    }
}

fn count(requests: &[Value], kind: &str, ok: bool) -> usize {
    requests
        .iter()
        .filter(|r| r["kind"] == kind && (!ok || r["status"] == 200))
        .count()
}

#[test]
fn ohif_lists_and_draws_a_study_from_a_node_across_origins() {
    let started = Instant::now();
    let vdir = viewer_dir();
    check_installed(&vdir);

    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dir = home.join("net");
    let base = common::free_base(50_000 + (std::process::id() % 1_000) as u16 * 4);
    let (_net, api) = network(home, &dir, base, serde_json::json!([]));
    let web = format!("{api}/dicom-web");

    // The chest CT by STOW-RS; visible once its registration is final on the ledger.
    let imp = medledger(home)
        .args(["import", "--json", "--node", &api])
        .arg(medledger_testkit::chest_ct_series_dir())
        .output()
        .unwrap();
    let report: Value =
        serde_json::from_slice(&imp.stdout).unwrap_or_else(|_| panic!("{}", text(&imp)));
    assert_eq!(report["stored"], 64, "{report}");
    wait_for("the study in QIDO-RS", Duration::from_secs(60), || {
        let (code, v) = get_json(&format!("{web}/studies"));
        code == 200 && v.as_array().is_some_and(|a| a.len() == 1)
    });
    let (_, studies) = get_json(&format!("{web}/studies"));
    let study_uid = attr(&studies[0], "0020000D").as_str().unwrap().to_string();
    let pseudonym = attr(&studies[0], "00100020").as_str().unwrap().to_string();
    assert!(pseudonym.starts_with("ML"), "{}", studies[0]);
    let ready = started.elapsed();

    // OHIF from its own origin, pointed at the node's DICOMweb root.
    let viewer = serve_viewer(vdir.join("ohif/dist"), app_config(&web));
    let artifacts = workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("ohif-study.png");
    let _ = std::fs::remove_file(&shot);

    let script = workspace_root().join("tests/viewer/ohif.mjs");
    let browse = Instant::now();
    let mut node = Command::new("node");
    node.arg(&script)
        .env("VIEWER_DIR", &vdir)
        .env("VIEWER_URL", &viewer)
        .env("NODE_URL", &api)
        .env("STUDY_UID", &study_uid)
        .env("PATIENT_ID", &pseudonym)
        .env("SCREENSHOT", &shot)
        .env("CHROMIUM", CHROMIUM)
        .env("TIMEOUT_MS", "60000");
    let out = run_limited(&mut node, home, Duration::from_secs(240));
    let browsed = browse.elapsed();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    std::fs::write(
        artifacts.join("ohif-report.json"),
        serde_json::to_vec_pretty(&r).unwrap(),
    )
    .unwrap();
    let brief = || {
        let mut v = r.clone();
        v["viewer"]["text"] = Value::Null;
        format!(
            "{}\nstderr:\n{}",
            serde_json::to_string_pretty(&v).unwrap(),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert!(out.status.success() && r["error"].is_null(), "{}", brief());

    // The study list: its row shows the pseudonym, CT and 64 instances, in cells of their own.
    let cells: Vec<String> = r["studyList"]["cells"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c.as_str().unwrap_or("").trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    for want in [pseudonym.as_str(), "CT", "64"] {
        assert!(
            cells.iter().any(|c| c == want),
            "the study's row has no cell {want:?}: {cells:?}\n{}",
            brief()
        );
    }

    // The browser's preflight, as Chromium sends it for the frames' Accept header, from the
    // viewer's origin.
    let pre = common::http()
        .request(
            reqwest::Method::OPTIONS,
            format!("{web}/studies/{study_uid}/series"),
        )
        .header("Origin", &viewer)
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "accept")
        .send()
        .unwrap();
    assert!(pre.status().is_success(), "{pre:?}");
    let allowed = |h: &str| {
        pre.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    assert!(
        allowed("access-control-allow-origin") == "*"
            || allowed("access-control-allow-origin") == viewer,
        "{pre:?}"
    );
    assert!(
        allowed("access-control-allow-headers").contains("accept"),
        "{pre:?}"
    );

    // The viewer asked the node for what it needed, across origins, and was refused nothing.
    let requests = r["requests"].as_array().cloned().unwrap_or_default();
    let failed: Vec<&Value> = requests
        .iter()
        .filter(|q| q["status"].as_u64().is_some_and(|s| s >= 400) || !q["failure"].is_null())
        .collect();
    assert!(
        failed.is_empty(),
        "requests to the node failed: {failed:#?}"
    );
    assert!(count(&requests, "qido", true) >= 1, "{}", brief());
    assert!(count(&requests, "metadata", true) >= 1, "{}", brief());
    assert!(count(&requests, "thumbnail", true) >= 1, "{}", brief());
    // The whole stack was fetched, frame by frame (the viewer prefetches it).
    let frames: std::collections::BTreeSet<&str> = requests
        .iter()
        .filter(|q| q["kind"] == "frames" && q["status"] == 200)
        .filter_map(|q| q["url"].as_str())
        .collect();
    assert_eq!(frames.len(), 64, "{}", brief());
    assert!(frames.iter().all(|u| u.contains(&study_uid)), "{}", brief());
    // Its Accept header for frames (quoted parameters) is not CORS-safelisted: each of those
    // requests passed a preflight first.
    assert!(
        requests.iter().any(|q| q["kind"] == "frames"
            && q["accept"].as_str().is_some_and(|a| a.contains('"'))),
        "{}",
        brief()
    );
    assert!(
        r["studyList"]["previewImages"].as_u64().unwrap_or(0) >= 1,
        "no series preview in the study list: {}",
        brief()
    );

    // A CT slice is on screen: many grey levels, not a flat canvas; then the middle one.
    for key in ["firstSlice", "pixels"] {
        let px = &r["viewer"][key];
        assert!(
            px["distinct"].as_u64().unwrap_or(0) >= 16 && px["std"].as_f64().unwrap_or(0.0) > 5.0,
            "no slice drawn ({key}): {}",
            brief()
        );
    }
    assert_eq!(r["viewer"]["slice"], 32, "{}", brief());
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{}",
        png.len()
    );

    eprintln!(
        "viewer test: network + import + registration {:.1} s, browser {:.1} s \
         (study list {} ms, slice {} ms), {} requests to the node ({} qido, {} metadata, {} frames)",
        ready.as_secs_f64(),
        browsed.as_secs_f64(),
        r["timings"]["studyListMs"],
        r["timings"]["sliceMs"],
        requests.len(),
        count(&requests, "qido", false),
        count(&requests, "metadata", false),
        count(&requests, "frames", false),
    );
}

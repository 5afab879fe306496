//! DICOMweb (PS3.18) at `/dicom-web`: STOW-RS into the ingest pipeline, QIDO-RS and WADO-RS
//! from the index; `/health` and `/metrics` (Prometheus text); CORS for browser viewers on
//! other origins. Anonymous requests see the de-identified view.

// Handlers return early with the HTTP answer itself as the error; it is built once per request.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query as QueryParams, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::index::{Located, Query, QueryLevel, View};
use crate::pixels::{self, Format, Render};
use crate::service::{IngestError, Service};

/// Largest instance a STOW-RS request may carry (the request itself is read as it arrives,
/// part by part, and has no size limit of its own).
const MAX_STOW: usize = 2 << 30;

/// The routes of the imaging service, to serve beside the node's API.
pub fn router(service: Service) -> Router {
    let web = Router::new()
        .route("/studies", get(search_studies).post(stow))
        .route("/series", get(search_series))
        .route("/instances", get(search_instances))
        .route("/studies/{study}", get(retrieve_any).post(stow_into))
        .route("/studies/{study}/metadata", get(metadata_any))
        .route("/studies/{study}/series", get(search_series_of))
        .route("/studies/{study}/instances", get(search_instances_of_study))
        .route("/studies/{study}/series/{series}", get(retrieve_any))
        .route(
            "/studies/{study}/series/{series}/metadata",
            get(metadata_any),
        )
        .route(
            "/studies/{study}/series/{series}/instances",
            get(search_instances_of_series),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}",
            get(retrieve_any),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/metadata",
            get(metadata_any),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
            get(retrieve_frames),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
            get(retrieve_bulkdata),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/rendered",
            get(rendered_instance),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
            get(rendered_instance),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
            get(rendered_frame),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/thumbnail",
            get(rendered_frame),
        )
        .route("/studies/{study}/thumbnail", get(thumbnail_study))
        .route(
            "/studies/{study}/series/{series}/thumbnail",
            get(thumbnail_series),
        )
        .layer(DefaultBodyLimit::max(MAX_STOW))
        .with_state(service.clone());
    Router::new()
        .nest("/dicom-web", web)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(service)
        .layer(middleware::from_fn(cors))
}

/// CORS: any origin may read (the data served anonymously is the de-identified view);
/// preflight requests are answered here.
async fn cors(req: Request, next: Next) -> Response {
    let preflight = req.method() == Method::OPTIONS;
    let mut resp = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS"),
        (
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "Accept, Content-Type, Authorization",
        ),
        (
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            "Content-Type, Content-Length, Warning",
        ),
        (header::ACCESS_CONTROL_MAX_AGE, "600"),
    ] {
        resp.headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    resp
}

fn problem(code: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": message }).to_string(),
    )
        .into_response()
}

/// The view a request sees: the identified originals for a member of this organisation with
/// a clinical role (bearer token, see [`crate::access`]), else the de-identified derivatives.
async fn view_of(s: &Service, headers: &HeaderMap) -> Result<View, Response> {
    let Some(auth) = headers.get(header::AUTHORIZATION) else {
        return Ok(View::Deidentified);
    };
    let token = auth
        .to_str()
        .ok()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::to_string)
        .ok_or_else(|| {
            problem(
                StatusCode::UNAUTHORIZED,
                "Authorization: Bearer <token from `medledger identity token`>",
            )
        })?;
    let s = s.clone();
    match blocking(move || s.clinical(&token)).await {
        Ok(true) => Ok(View::Original),
        Ok(false) => Err(problem(
            StatusCode::FORBIDDEN,
            "identified originals are for this organisation's clinicians and admins; send no token for the de-identified view",
        )),
        Err(e) => Err(problem(StatusCode::UNAUTHORIZED, e.to_string())),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a DICOMweb worker does not panic")
}

async fn health(State(s): State<Service>) -> Response {
    if s.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: rebuilding the index\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Service>) -> Response {
    let m = s.metrics();
    let (studies, instances, pending) = {
        let index = s.index();
        (
            index.studies.len(),
            index.instance_count(),
            index.studies.values().filter(|s| s.pending()).count(),
        )
    };
    let c = |name: &str, help: &str, v: u64| {
        format!(
            "# HELP medledger_{name} {help}\n# TYPE medledger_{name} counter\nmedledger_{name} {v}\n"
        )
    };
    let g = |name: &str, help: &str, v: usize| {
        format!(
            "# HELP medledger_{name} {help}\n# TYPE medledger_{name} gauge\nmedledger_{name} {v}\n"
        )
    };
    let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 14] = [
        (
            "instances_received_total",
            "Instances received (C-STORE, STOW-RS, import).",
            &m.instances_received,
        ),
        (
            "instances_stored_total",
            "Instances stored durably.",
            &m.instances_stored,
        ),
        (
            "instances_duplicate_total",
            "Instances whose SOP Instance UID was already stored.",
            &m.instances_duplicate,
        ),
        (
            "instances_rejected_total",
            "Instances refused.",
            &m.instances_rejected,
        ),
        (
            "instances_without_derivative_total",
            "Instances stored as originals only (quarantined by de-identification).",
            &m.instances_quarantined,
        ),
        (
            "received_bytes_total",
            "Bytes of instances received.",
            &m.bytes_received,
        ),
        ("ingest_batches_total", "Group commits.", &m.batches),
        (
            "study_registrations_total",
            "Study versions registered on the ledger.",
            &m.studies_registered,
        ),
        (
            "study_registration_failures_total",
            "Registrations that failed (retried).",
            &m.registration_failures,
        ),
        (
            "index_records_written_total",
            "Index records written to the store (one per changed study).",
            &m.index_records_written,
        ),
        (
            "instances_journaled_total",
            "Instances acknowledged once sealed in the ingest journal (stored after the answer).",
            &m.instances_journaled,
        ),
        (
            "journal_replayed_total",
            "Journal entries of an earlier run stored at start.",
            &m.journal_replayed,
        ),
        (
            "instances_failed_after_ack_total",
            "Acknowledged instances the store refused (kept as private records ingest-failed/).",
            &m.instances_failed_after_ack,
        ),
        (
            "journal_retries_total",
            "Acknowledged instances queued again after the store could not take them.",
            &m.journal_retries,
        ),
    ];
    let cache = s.read_cache();
    let body = [
        counters
            .iter()
            .map(|(name, help, v)| c(name, help, v.load(Ordering::Relaxed)))
            .collect::<String>(),
        c(
            "read_cache_hits_total",
            "Object reads served from the read cache (decrypted and verified earlier).",
            cache.hits,
        ),
        c(
            "read_cache_misses_total",
            "Object reads the read cache did not hold (read, decrypted and verified).",
            cache.misses,
        ),
        g(
            "read_cache_bytes",
            "Plaintext bytes held by the read cache.",
            cache.bytes as usize,
        ),
        g("studies", "Studies held.", studies),
        g("instances", "Instances held (originals).", instances),
        g(
            "studies_pending_registration",
            "Studies stored but not yet final on the ledger.",
            pending,
        ),
        g(
            "index_records_unwritten",
            "Studies whose index record is not written yet.",
            s.inner().records_unwritten(),
        ),
        g(
            "journal_outstanding",
            "Instances acknowledged from the ingest journal and not yet in the store.",
            s.journal_outstanding() as usize,
        ),
        g(
            "index_start_studies_from_records",
            "Studies the index read from their records at start.",
            m.index_from_records.load(Ordering::Relaxed) as usize,
        ),
        g(
            "index_start_studies_rebuilt",
            "Studies the index rebuilt from the store and the ledger at start.",
            m.index_rebuilt.load(Ordering::Relaxed) as usize,
        ),
        g(
            "index_start_milliseconds",
            "Time the index took to be ready at start.",
            m.index_start_ms.load(Ordering::Relaxed) as usize,
        ),
    ]
    .concat();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// A data set in the DICOM JSON model (PS3.18 Annex F), with IS and DS values as JSON
/// numbers as F.2.3 asks (dicom-rs keeps the strings it read).
pub fn to_json(obj: &dicom_object::InMemDicomObject) -> Value {
    let mut v = dicom_json::to_value(obj).unwrap_or(Value::Null);
    numbers(&mut v);
    v
}

fn numbers(v: &mut Value) {
    let Value::Object(map) = v else { return };
    for (_, attr) in map.iter_mut() {
        let vr = attr["vr"].as_str().unwrap_or("").to_string();
        let Some(Value::Array(values)) = attr.get_mut("Value") else {
            continue;
        };
        match vr.as_str() {
            "IS" | "DS" => {
                for x in values.iter_mut() {
                    if let Value::String(t) = x {
                        let t = t.trim();
                        *x = if vr == "IS" {
                            t.parse::<i64>().map(Value::from).unwrap_or(Value::Null)
                        } else {
                            t.parse::<f64>()
                                .ok()
                                .and_then(serde_json::Number::from_f64)
                                .map(Value::Number)
                                .unwrap_or(Value::Null)
                        };
                    }
                }
            }
            "SQ" => values.iter_mut().for_each(numbers),
            _ => {}
        }
    }
}

// ---- QIDO-RS ----

type Params = QueryParams<Vec<(String, String)>>;

async fn qido(
    s: Service,
    headers: HeaderMap,
    level: QueryLevel,
    study: Option<String>,
    series: Option<String>,
    params: Vec<(String, String)>,
) -> Response {
    let mut q = match Query::from_params(level, &params) {
        Ok(q) => q,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.0),
    };
    q.study_uid = study;
    q.series_uid = series;
    let view = match view_of(&s, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let results = blocking(move || s.index().search(view, &q)).await;
    let values: Vec<Value> = results.iter().map(to_json).collect();
    if values.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/dicom+json")],
        Value::Array(values).to_string(),
    )
        .into_response()
}

async fn search_studies(
    State(s): State<Service>,
    h: HeaderMap,
    QueryParams(p): Params,
) -> Response {
    qido(s, h, QueryLevel::Study, None, None, p).await
}
async fn search_series(State(s): State<Service>, h: HeaderMap, QueryParams(p): Params) -> Response {
    qido(s, h, QueryLevel::Series, None, None, p).await
}
async fn search_instances(
    State(s): State<Service>,
    h: HeaderMap,
    QueryParams(p): Params,
) -> Response {
    qido(s, h, QueryLevel::Instance, None, None, p).await
}
async fn search_series_of(
    State(s): State<Service>,
    h: HeaderMap,
    Path(study): Path<String>,
    QueryParams(p): Params,
) -> Response {
    qido(s, h, QueryLevel::Series, Some(study), None, p).await
}
async fn search_instances_of_study(
    State(s): State<Service>,
    h: HeaderMap,
    Path(study): Path<String>,
    QueryParams(p): Params,
) -> Response {
    qido(s, h, QueryLevel::Instance, Some(study), None, p).await
}
async fn search_instances_of_series(
    State(s): State<Service>,
    h: HeaderMap,
    Path((study, series)): Path<(String, String)>,
    QueryParams(p): Params,
) -> Response {
    qido(s, h, QueryLevel::Instance, Some(study), Some(series), p).await
}

// ---- WADO-RS ----

/// Does the request's Accept header allow `kind` parts in transfer syntax `ts`? No header,
/// `*/*`, a missing or `*` transfer-syntax parameter, or `ts` itself are acceptable.
fn accepts(headers: &HeaderMap, kind: &str, ts: &str) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    accept.split(',').any(|range| {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or("").to_ascii_lowercase();
        let mut typ = None;
        let mut syntax = None;
        for p in params {
            if let Some((k, v)) = p.split_once('=') {
                let v = v.trim().trim_matches('"').to_string();
                match k.trim().to_ascii_lowercase().as_str() {
                    "type" => typ = Some(v.to_ascii_lowercase()),
                    "transfer-syntax" => syntax = Some(v),
                    _ => {}
                }
            }
        }
        let syntax_ok = syntax.as_deref().is_none_or(|t| t == "*" || t == ts);
        match media.as_str() {
            "*/*" | "multipart/*" => true,
            "multipart/related" => {
                typ.as_deref().is_none_or(|t| {
                    t == kind
                        || t == "*/*"
                        || t.strip_suffix("/*")
                            .is_some_and(|major| kind.starts_with(&format!("{major}/")))
                }) && syntax_ok
            }
            m => m == kind && syntax_ok,
        }
    })
}

fn not_acceptable(what: &str) -> Response {
    problem(
        StatusCode::NOT_ACCEPTABLE,
        format!(
            "{what}; this node serves instances, frames and bulk data as stored, or converted to Explicit VR Little Endian (1.2.840.10008.1.2.1) from the native transfer syntaxes, RLE Lossless and JPEG Baseline, Extended and Lossless: ask for one of these, for transfer-syntax=*, or leave it out"
        ),
    )
}

fn boundary() -> String {
    format!("medledger-{:016x}", rand::random::<u64>())
}

/// A multipart/related body of `parts` (content type, bytes).
fn multipart(kind: &str, parts: Vec<(String, Vec<u8>)>) -> Response {
    let b = boundary();
    let mut body = Vec::with_capacity(parts.iter().map(|(_, p)| p.len() + 128).sum());
    for (ct, bytes) in parts {
        body.extend_from_slice(format!("--{b}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
        body.extend_from_slice(&bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            format!("multipart/related; type=\"{kind}\"; boundary={b}"),
        )
        .body(Body::from(body))
        .expect("a valid response")
}

fn locate(
    s: &Service,
    view: View,
    study: &str,
    series: Option<&str>,
    instance: Option<&str>,
) -> Result<Vec<Located>, Response> {
    let found = s.index().locate(view, study, series, instance);
    if found.is_empty() {
        let what = match (series, instance) {
            (_, Some(i)) => format!("instance {i}"),
            (Some(se), None) => format!("series {se}"),
            _ => format!("study {study}"),
        };
        return Err(problem(StatusCode::NOT_FOUND, format!("no {what} here")));
    }
    Ok(found)
}

async fn retrieve(
    s: Service,
    headers: HeaderMap,
    study: String,
    series: Option<String>,
    instance: Option<String>,
) -> Response {
    let view = match view_of(&s, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    blocking(move || {
        let found = match locate(&s, view, &study, series.as_deref(), instance.as_deref()) {
            Ok(f) => f,
            Err(r) => return r,
        };
        // Each instance as stored if the client takes that, else converted to Explicit VR
        // Little Endian if it asks for that and the conversion is possible.
        let mut convert = Vec::with_capacity(found.len());
        for l in &found {
            let ts = &l.meta.transfer_syntax;
            if accepts(&headers, "application/dicom", ts) {
                convert.push(false);
            } else if accepts(&headers, "application/dicom", EXPLICIT_VR_LITTLE_ENDIAN)
                && pixels::transcodable(ts)
            {
                convert.push(true);
            } else {
                return not_acceptable(&format!(
                    "instance {} is stored in transfer syntax {ts}, which the Accept header does not allow",
                    l.entry.sop_instance_uid
                ));
            }
        }
        stream_instances(s, found.into_iter().zip(convert).collect())
    })
    .await
}

/// Instances read, decrypted and verified in parallel a few at a time, sent in order as
/// they are ready (so a large study is neither held whole in memory nor waited for whole).
/// The first group is read before answering, so a damaged store gives a 500 rather than a
/// cut-off body; a later failure ends the body early (and is logged).
///
/// An instance paired with `true` is converted to Explicit VR Little Endian first
/// ([`pixels::to_explicit_little_endian`]).
fn stream_instances(s: Service, found: Vec<(Located, bool)>) -> Response {
    use rayon::prelude::*;
    const GROUP: usize = 8;
    let b = boundary();
    // Each part as its head, the file's pieces and "\r\n": the objects are sent as read and
    // decrypted, not copied into one buffer.
    let read_group =
        move |s: &Service, group: &[(Located, bool)], b: &str| -> Result<Vec<Bytes>, String> {
            let parts: Vec<Vec<Bytes>> = group
                .par_iter()
                .map(|(l, convert)| {
                    let pieces = s.read_instance_parts(&l.entry).map_err(|e| {
                        tracing::error!(
                            "instance {} failed verification: {e}",
                            l.entry.sop_instance_uid
                        );
                        format!(
                            "instance {} failed verification in the store; it is not served",
                            l.entry.sop_instance_uid
                        )
                    })?;
                    let (ts, pieces) = if *convert {
                        let file = pieces.concat();
                        let out = pixels::to_explicit_little_endian(&file).map_err(|e| {
                        format!(
                            "instance {} could not be converted to Explicit VR Little Endian: {e}",
                            l.entry.sop_instance_uid
                        )
                    })?;
                        (EXPLICIT_VR_LITTLE_ENDIAN, vec![Bytes::from(out)])
                    } else {
                        (l.meta.transfer_syntax.as_str(), pieces)
                    };
                    let head = format!(
                        "--{b}\r\nContent-Type: application/dicom; transfer-syntax={ts}\r\n\r\n"
                    );
                    let mut part = Vec::with_capacity(pieces.len() + 2);
                    part.push(Bytes::from(head));
                    part.extend(pieces);
                    part.push(Bytes::from_static(b"\r\n"));
                    Ok(part)
                })
                .collect::<Result<_, String>>()?;
            Ok(parts.into_iter().flatten().collect())
        };
    let first = match read_group(&s, &found[..found.len().min(GROUP)], &b) {
        Ok(parts) => parts,
        Err(msg) => return problem(StatusCode::INTERNAL_SERVER_ERROR, msg),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(6 * GROUP);
    let content_type = format!("multipart/related; type=\"application/dicom\"; boundary={b}");
    std::thread::spawn(move || {
        for part in first {
            if tx.blocking_send(Ok(part)).is_err() {
                return;
            }
        }
        for group in found.chunks(GROUP).skip(1) {
            match read_group(&s, group, &b) {
                Ok(parts) => {
                    for part in parts {
                        if tx.blocking_send(Ok(part)).is_err() {
                            return;
                        }
                    }
                }
                Err(msg) => {
                    let _ = tx.blocking_send(Err(std::io::Error::other(msg)));
                    return;
                }
            }
        }
        let _ = tx.blocking_send(Ok(Bytes::from(format!("--{b}--\r\n"))));
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

/// The study, series and instance UIDs a WADO-RS path names (series and instance optional).
type Uids = Path<std::collections::HashMap<String, String>>;

fn uids(
    mut p: std::collections::HashMap<String, String>,
) -> (String, Option<String>, Option<String>) {
    (
        p.remove("study").unwrap_or_default(),
        p.remove("series"),
        p.remove("instance"),
    )
}

async fn retrieve_any(State(s): State<Service>, h: HeaderMap, Path(p): Uids) -> Response {
    let (study, series, instance) = uids(p);
    retrieve(s, h, study, series, instance).await
}

async fn metadata(
    s: Service,
    headers: HeaderMap,
    study: String,
    series: Option<String>,
    instance: Option<String>,
) -> Response {
    let view = match view_of(&s, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !accepts(&headers, "application/dicom+json", "")
        && !accepts(&headers, "application/json", "")
    {
        return problem(
            StatusCode::NOT_ACCEPTABLE,
            "metadata is served as application/dicom+json only",
        );
    }
    blocking(move || {
        let found = match locate(&s, view, &study, series.as_deref(), instance.as_deref()) {
            Ok(f) => f,
            Err(r) => return r,
        };
        let values: Vec<Value> = found
            .iter()
            .map(|l| {
                let mut v = to_json(&l.meta.attrs);
                if let Value::Object(m) = &mut v {
                    // Where the pixels are: the bulk data resource of the instance.
                    m.insert(
                        "7FE00010".into(),
                        json!({ "vr": "OW", "BulkDataURI": format!(
                            "/dicom-web/studies/{study}/series/{}/instances/{}/bulkdata/7FE00010",
                            l.series.series_uid, l.entry.sop_instance_uid
                        )}),
                    );
                    m.insert(
                        "00083002".into(),
                        json!({ "vr": "UI", "Value": [l.meta.transfer_syntax] }),
                    );
                }
                v
            })
            .collect();
        (
            [(header::CONTENT_TYPE, "application/dicom+json")],
            Value::Array(values).to_string(),
        )
            .into_response()
    })
    .await
}

async fn metadata_any(State(s): State<Service>, h: HeaderMap, Path(p): Uids) -> Response {
    let (study, series, instance) = uids(p);
    metadata(s, h, study, series, instance).await
}

fn frame_numbers(list: &str) -> Result<Vec<u32>, Response> {
    list.split(',')
        .map(|n| {
            n.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    problem(
                        StatusCode::BAD_REQUEST,
                        format!("frame list {list:?}: frames are numbered from 1"),
                    )
                })
        })
        .collect()
}

fn pixel_problem(e: pixels::PixelError) -> Response {
    match e {
        pixels::PixelError::NoSuchFrame(..)
        | pixels::PixelError::NoPixelData
        | pixels::PixelError::NoBulkData(_) => problem(StatusCode::NOT_FOUND, e.to_string()),
        pixels::PixelError::Unsupported(_) => problem(StatusCode::NOT_ACCEPTABLE, e.to_string()),
        pixels::PixelError::Malformed(_) => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
    }
}

fn one_instance(
    s: &Service,
    view: View,
    study: &str,
    series: &str,
    instance: &str,
) -> Result<Vec<u8>, Response> {
    let found = locate(s, view, study, Some(series), Some(instance))?;
    s.read_instance(&found[0].entry).map_err(|e| {
        tracing::error!("instance {instance} failed verification: {e}");
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("instance {instance} failed verification in the store; it is not served"),
        )
    })
}

async fn retrieve_frames(
    State(s): State<Service>,
    h: HeaderMap,
    Path((study, series, instance, frames)): Path<(String, String, String, String)>,
) -> Response {
    let view = match view_of(&s, &h).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    blocking(move || {
        let numbers = match frame_numbers(&frames) {
            Ok(n) => n,
            Err(r) => return r,
        };
        let file = match one_instance(&s, view, &study, &series, &instance) {
            Ok(f) => f,
            Err(r) => return r,
        };
        match pixels::frames(&file, &numbers) {
            Ok((ts, frames)) => {
                octet_parts(&h, &ts, frames, || pixels::decoded_frames(&file, &numbers))
            }
            Err(e) => pixel_problem(e),
        }
    })
    .await
}

/// WADO-RS Bulkdata (PS3.18 10.4.1.1.3) of a top-level binary attribute of an instance: the
/// target of the BulkDataURI that metadata gives for Pixel Data.
async fn retrieve_bulkdata(
    State(s): State<Service>,
    h: HeaderMap,
    Path((study, series, instance, tag)): Path<(String, String, String, String)>,
) -> Response {
    let view = match view_of(&s, &h).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(tag) = parse_tag(&tag) else {
        return problem(
            StatusCode::BAD_REQUEST,
            format!(
                "bulk data {tag:?}: name an attribute by its tag as 8 hex digits, e.g. 7FE00010"
            ),
        );
    };
    blocking(move || {
        let file = match one_instance(&s, view, &study, &series, &instance) {
            Ok(f) => f,
            Err(r) => return r,
        };
        match pixels::bulkdata(&file, tag, false) {
            Ok((ts, parts)) => octet_parts(&h, &ts, parts, || {
                pixels::bulkdata(&file, tag, true).map(|(_, parts)| parts)
            }),
            Err(e) => pixel_problem(e),
        }
    })
    .await
}

/// A tag written as 8 hex digits (group then element), as in the DICOM JSON model.
fn parse_tag(s: &str) -> Option<dicom_core::Tag> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let group = u16::from_str_radix(&s[..4], 16).ok()?;
    let element = u16::from_str_radix(&s[4..], 16).ok()?;
    Some(dicom_core::Tag(group, element))
}

/// Frames or bulk data in transfer syntax `ts` as multipart/related parts of
/// application/octet-stream (or image/jpeg for JPEG Baseline / Extended, when asked for). A
/// client that asks for Explicit VR Little Endian where the data are stored compressed gets
/// them decoded by `decode`; one that takes neither gets 406.
fn octet_parts(
    h: &HeaderMap,
    ts: &str,
    parts: Vec<Vec<u8>>,
    decode: impl FnOnce() -> Result<Vec<Vec<u8>>, pixels::PixelError>,
) -> Response {
    let jpeg = matches!(ts, "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51");
    let served =
        accepts(h, "application/octet-stream", ts) || (jpeg && accepts(h, "image/jpeg", ts));
    let (ts, parts) = if served {
        (ts, parts)
    } else if accepts(h, "application/octet-stream", EXPLICIT_VR_LITTLE_ENDIAN) {
        match decode() {
            Ok(parts) => (EXPLICIT_VR_LITTLE_ENDIAN, parts),
            Err(e) => return pixel_problem(e),
        }
    } else {
        return not_acceptable(&format!("the data are stored in transfer syntax {ts}"));
    };
    let ct = format!("application/octet-stream; transfer-syntax={ts}");
    multipart(
        "application/octet-stream",
        parts.into_iter().map(|f| (ct.clone(), f)).collect(),
    )
}

/// The transfer syntax of decoded pixel data.
const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";

fn render_params(
    params: &[(String, String)],
    headers: &HeaderMap,
) -> Result<(Format, Render), Response> {
    let mut r = Render::default();
    for (k, v) in params {
        match k.as_str() {
            "window" => {
                let parts: Vec<f64> = v
                    .split(',')
                    .take(2)
                    .map(|x| x.trim().parse::<f64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| {
                        problem(
                            StatusCode::BAD_REQUEST,
                            format!("window {v:?}: center,width[,function]"),
                        )
                    })?;
                if parts.len() != 2 || parts[1] <= 0.0 {
                    return Err(problem(
                        StatusCode::BAD_REQUEST,
                        format!("window {v:?}: center,width[,function] with width > 0"),
                    ));
                }
                r.window = Some((parts[0], parts[1]));
            }
            "viewport" => {
                let parts: Vec<u32> = v
                    .split(',')
                    .map(|x| x.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| {
                        problem(
                            StatusCode::BAD_REQUEST,
                            format!("viewport {v:?}: width,height"),
                        )
                    })?;
                if parts.len() < 2 || parts[0] == 0 || parts[1] == 0 {
                    return Err(problem(
                        StatusCode::BAD_REQUEST,
                        format!("viewport {v:?}: width,height"),
                    ));
                }
                r.viewport = Some((parts[0], parts[1]));
            }
            "quality" => {
                let q: u8 = v
                    .parse()
                    .ok()
                    .filter(|q| (1..=100).contains(q))
                    .ok_or_else(|| {
                        problem(StatusCode::BAD_REQUEST, format!("quality {v:?}: 1 to 100"))
                    })?;
                r.quality = Some(q);
            }
            _ => {}
        }
    }
    // The `accept` query parameter overrides the header (PS3.18 8.3.3.1); the first
    // rendered type listed wins; types we do not render are ignored (8.7.7), JPEG by default.
    let accept = params
        .iter()
        .find(|(k, _)| k == "accept")
        .map(|(_, v)| v.clone())
        .or_else(|| {
            headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let format = accept
        .split(',')
        .filter_map(|range| {
            match range
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
                .as_str()
            {
                "image/png" => Some(Format::Png),
                "image/jpeg" | "image/*" | "*/*" => Some(Format::Jpeg),
                _ => None,
            }
        })
        .next()
        .unwrap_or(Format::Jpeg);
    Ok((format, r))
}

async fn render(
    s: Service,
    h: HeaderMap,
    study: String,
    series: String,
    instance: String,
    frame: String,
    params: Vec<(String, String)>,
) -> Response {
    let view = match view_of(&s, &h).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    blocking(move || {
        let (format, r) = match render_params(&params, &h) {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        let number = match frame_numbers(&frame) {
            Ok(n) if n.len() == 1 => n[0],
            Ok(_) => return problem(StatusCode::BAD_REQUEST, "a rendering is of one frame"),
            Err(resp) => return resp,
        };
        let file = match one_instance(&s, view, &study, &series, &instance) {
            Ok(f) => f,
            Err(resp) => return resp,
        };
        match pixels::render(&file, number, format, &r) {
            Ok(bytes) => (
                [(
                    header::CONTENT_TYPE,
                    match format {
                        Format::Png => "image/png",
                        Format::Jpeg => "image/jpeg",
                    },
                )],
                bytes,
            )
                .into_response(),
            Err(e) => pixel_problem(e),
        }
    })
    .await
}

async fn rendered_instance(
    State(s): State<Service>,
    h: HeaderMap,
    Path((study, series, instance)): Path<(String, String, String)>,
    QueryParams(p): Params,
) -> Response {
    render(s, h, study, series, instance, "1".into(), p).await
}

/// A study's or series' thumbnail: its middle instance (by Instance Number) rendered.
async fn thumbnail_of(
    s: Service,
    h: HeaderMap,
    study: String,
    series: Option<String>,
    p: Vec<(String, String)>,
) -> Response {
    let view = match view_of(&s, &h).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let s2 = s.clone();
    let pick = blocking(move || {
        let mut found = locate(&s2, view, &study, series.as_deref(), None)?;
        let first_series = found[0].series.series_uid.clone();
        found.retain(|l| l.series.series_uid == first_series);
        found.sort_by_key(|l| {
            crate::index::text(&l.meta.attrs, dicom_dictionary_std::tags::INSTANCE_NUMBER)
                .parse::<i64>()
                .unwrap_or(0)
        });
        let l = &found[found.len() / 2];
        Ok::<_, Response>((
            study,
            l.series.series_uid.clone(),
            l.entry.sop_instance_uid.clone(),
        ))
    })
    .await;
    match pick {
        Ok((study, series, instance)) => render(s, h, study, series, instance, "1".into(), p).await,
        Err(r) => r,
    }
}

async fn thumbnail_study(
    State(s): State<Service>,
    h: HeaderMap,
    Path(study): Path<String>,
    QueryParams(p): Params,
) -> Response {
    thumbnail_of(s, h, study, None, p).await
}

async fn thumbnail_series(
    State(s): State<Service>,
    h: HeaderMap,
    Path((study, series)): Path<(String, String)>,
    QueryParams(p): Params,
) -> Response {
    thumbnail_of(s, h, study, Some(series), p).await
}

async fn rendered_frame(
    State(s): State<Service>,
    h: HeaderMap,
    Path((study, series, instance, frame)): Path<(String, String, String, String)>,
    QueryParams(p): Params,
) -> Response {
    render(s, h, study, series, instance, frame, p).await
}

// ---- STOW-RS ----

/// The parts of a multipart/related body whose boundary is given in `content_type`.
pub fn split_multipart(content_type: &str, body: &[u8]) -> Result<Vec<(String, Bytes)>, String> {
    crate::multipart::split(content_type, body)
}

fn sq(items: Vec<Value>) -> Value {
    json!({ "vr": "SQ", "Value": items })
}

async fn stow_into(
    State(s): State<Service>,
    h: HeaderMap,
    Path(study): Path<String>,
    body: Body,
) -> Response {
    stow_impl(s, h, Some(study), body).await
}

async fn stow(State(s): State<Service>, h: HeaderMap, body: Body) -> Response {
    stow_impl(s, h, None, body).await
}

/// Instances of one STOW-RS request being stored at once: enough to fill a group commit of
/// the store, few enough that a request of thousands of parts holds only these in memory.
const STOW_PARALLEL: usize = 16;

/// What a STOW-RS request's body gives: its parts, stored as each arrives.
type StowResult = (String, Result<crate::service::Stored, IngestError>);

/// Reads a STOW-RS body as it arrives and stores each part as soon as it is complete, at most
/// [`STOW_PARALLEL`] at a time (the body is read no faster than they are stored), so neither
/// the request nor its instances are ever held whole in memory. Returns the parts' outcomes
/// in order, or why the body could not be read (what was stored before that stays stored).
async fn stow_parts(
    s: &Service,
    ct: &str,
    multipart: bool,
    study: Option<String>,
    body: Body,
) -> Result<Vec<StowResult>, Response> {
    use futures::StreamExt;
    let mut splitter = if multipart {
        match crate::multipart::boundary(ct) {
            Ok(b) => Some(crate::multipart::Splitter::new(&b, MAX_STOW)),
            Err(e) => return Err(problem(StatusCode::BAD_REQUEST, e)),
        }
    } else {
        None
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(STOW_PARALLEL));
    let mut tasks = Vec::new();
    let mut single = bytes::BytesMut::new();
    let mut stream = body.into_data_stream();
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failure = Some(problem(
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {e}"),
                ));
                break;
            }
        };
        let parts = match splitter.as_mut() {
            Some(sp) => match sp.push(&chunk) {
                Ok(p) => p,
                Err(e) => {
                    let status = if e.contains("larger than") {
                        StatusCode::PAYLOAD_TOO_LARGE
                    } else {
                        StatusCode::BAD_REQUEST
                    };
                    failure = Some(problem(status, e));
                    break;
                }
            },
            None => {
                single.extend_from_slice(&chunk);
                if single.len() > MAX_STOW {
                    failure = Some(problem(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the instance is larger than {} MiB", MAX_STOW >> 20),
                    ));
                    break;
                }
                continue;
            }
        };
        for part in parts {
            tasks.push(store_part(s, &permits, part, study.clone()).await);
        }
    }
    if failure.is_none() {
        match splitter.as_ref() {
            Some(sp) => {
                if let Err(e) = sp.finish() {
                    failure = Some(problem(StatusCode::BAD_REQUEST, e));
                }
            }
            None => {
                let part = (ct.to_string(), single.freeze());
                tasks.push(store_part(s, &permits, part, study.clone()).await);
            }
        }
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.expect("a STOW-RS worker does not panic"));
    }
    match failure {
        Some(r) => Err(r),
        None => Ok(results),
    }
}

/// Starts storing one part once fewer than [`STOW_PARALLEL`] are being stored.
async fn store_part(
    s: &Service,
    permits: &Arc<tokio::sync::Semaphore>,
    (pct, bytes): (String, Bytes),
    study: Option<String>,
) -> tokio::task::JoinHandle<StowResult> {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let s = s.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let pl = pct.to_ascii_lowercase();
        if !pl.is_empty() && !pl.starts_with("application/dicom") {
            let e = IngestError::Malformed(format!(
                "a part of type {pct:?} is not an instance (application/dicom)"
            ));
            return (pct, Err(e));
        }
        // The part as the splitter cut it, not copied.
        let r = s.ingest_into(bytes, study);
        (pct, r)
    })
}

async fn stow_impl(s: Service, h: HeaderMap, study: Option<String>, body: Body) -> Response {
    let base = format!(
        "http://{}",
        h.get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("localhost")
    );
    let study_given = study.is_some();
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let lower = ct.to_ascii_lowercase();
    let multipart = if lower.starts_with("multipart/related") {
        if lower.contains("application/dicom+")
            || (lower.contains("type=") && !lower.contains("application/dicom"))
        {
            return problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "STOW-RS here takes multipart/related; type=\"application/dicom\" (instances as Part 10 files)",
            );
        }
        true
    } else if lower.starts_with("application/dicom") && !lower.starts_with("application/dicom+") {
        false
    } else {
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("STOW-RS takes multipart/related; type=\"application/dicom\", not {ct:?}"),
        );
    };
    let results = match stow_parts(&s, &ct, multipart, study, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if results.is_empty() {
        return problem(StatusCode::BAD_REQUEST, "the request holds no instance");
    }
    {
        let mut referenced = Vec::new();
        let mut failed = Vec::new();
        let mut warnings = false;
        let mut retrieve_url: Option<String> = None;
        let mut one_study = true;
        for (_, r) in results {
            match r {
                Ok(st) => {
                    // Where an anonymous client finds it: the de-identified study.
                    let study = st.derived_study_uid.clone().unwrap_or(st.study_uid.clone());
                    let url = format!("{base}/dicom-web/studies/{study}");
                    one_study &= retrieve_url.as_ref().is_none_or(|u| *u == url);
                    retrieve_url = Some(url.clone());
                    let mut item = json!({
                        "00081150": { "vr": "UI", "Value": [st.sop_class_uid] },
                        "00081155": { "vr": "UI", "Value": [st.sop_instance_uid] },
                        "00081190": { "vr": "UR", "Value": [url] },
                    });
                    if let Some(w) = st.warning {
                        warnings = true;
                        item["00081196"] = json!({ "vr": "US", "Value": [0xB000] });
                        tracing::info!("{w}");
                    }
                    referenced.push(item);
                }
                Err(e) => {
                    let code = match e {
                        IngestError::Malformed(_) => 0xC000,
                        IngestError::Conflict(_) => 0xA900,
                        IngestError::Unavailable(_) => 0xA700,
                    };
                    // The reason in full in Error Comment (0000,0902), as a DIMSE status carries
                    // it; JSON has no 64-character limit.
                    failed.push(json!({
                        "00081197": { "vr": "US", "Value": [code] },
                        "00000902": { "vr": "LO", "Value": [e.to_string()] },
                    }));
                }
            }
        }
        let status = if failed.is_empty() {
            if warnings {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            }
        } else if referenced.is_empty() {
            StatusCode::CONFLICT
        } else {
            StatusCode::ACCEPTED
        };
        let mut out = serde_json::Map::new();
        // The study's URL at the top when every instance went to one study.
        if let Some(url) = retrieve_url.filter(|_| one_study || study_given) {
            out.insert("00081190".into(), json!({ "vr": "UR", "Value": [url] }));
        }
        if !referenced.is_empty() {
            out.insert("00081199".into(), sq(referenced));
        }
        if !failed.is_empty() {
            out.insert("00081198".into(), sq(failed));
        }
        (
            status,
            [(header::CONTENT_TYPE, "application/dicom+json")],
            Value::Object(out).to_string(),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_split_into_their_parts_and_bad_ones_are_named() {
        let body = b"preamble\r\n--XY\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--XY\r\nContent-Type: application/dicom\r\n\r\nB\r\nB\r\n--XY--\r\n";
        let parts = split_multipart(
            "multipart/related; type=\"application/dicom\"; boundary=XY",
            body,
        )
        .unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(&parts[0].1[..], b"AAA");
        assert_eq!(&parts[1].1[..], b"B\r\nB");
        assert_eq!(parts[0].0, "application/dicom");
        let e = split_multipart("multipart/related", body).unwrap_err();
        assert!(e.contains("boundary"));
        let e = split_multipart("multipart/related; boundary=ZZ", body).unwrap_err();
        assert!(e.contains("no part"));
        let e = split_multipart(
            "multipart/related; boundary=XY",
            b"--XY\r\nContent-Type: a\r\n\r\nAAA",
        )
        .unwrap_err();
        assert!(e.contains("closing"), "{e}");
    }
}

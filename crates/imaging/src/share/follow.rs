//! Following the ledger: grant requests for this organisation's studies when the patient's
//! consent (or a recorded break-glass request) allows it, fetch what other organisations
//! grant this one, keep the registry of organisations (TLS trust) fresh, and put refused
//! TLS handshakes on the ledger.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use medledger_crypto::{Digest, PublicKey};
use medledger_ledger::{Consent, Grant, Org, Purpose, Request, Study, Target};
use serde_json::{Value, json};

use super::{SharingInner, now_ms};

const POLL: Duration = Duration::from_millis(100);
const REFRESH: Duration = Duration::from_secs(2);

pub(crate) fn run(inner: Arc<SharingInner>, auto: bool) {
    let svc = inner.svc.clone();
    while !svc.ready.load(Ordering::Acquire) {
        std::thread::sleep(POLL);
    }
    while let Err(e) = inner.orgs.refresh(&svc.client) {
        tracing::warn!("reading the organisations from the ledger: {e}");
        std::thread::sleep(REFRESH);
    }
    let cursor = svc
        .store
        .notes("share-cursor")
        .ok()
        .and_then(|n| n.into_iter().next().map(|(_, v)| v))
        .unwrap_or(Value::Null);
    let mut requests_after = cursor["requests"].as_str().map(str::to_string);
    let mut grants_after = cursor["grants"].as_str().map(str::to_string);
    let mut refreshed = Instant::now();
    loop {
        std::thread::sleep(POLL);
        if refreshed.elapsed() >= REFRESH {
            refreshed = Instant::now();
            if let Err(e) = inner.orgs.refresh(&svc.client) {
                tracing::warn!("reading the organisations from the ledger: {e}");
            }
            let refused: Vec<_> =
                std::mem::take(&mut *inner.handshake_refusals.lock().expect("not poisoned"));
            for r in refused {
                match r.claimed_org {
                    Some(org) => inner.record_refusal(
                        None,
                        &org,
                        true,
                        format!("TLS handshake refused: {}", r.reason),
                    ),
                    None => tracing::warn!("TLS handshake refused: {}", r.reason),
                }
            }
        }
        if !auto {
            continue;
        }
        retry_interrupted(&inner);
        let before = (requests_after.clone(), grants_after.clone());
        match next_ids(&inner, "request-seq/", &requests_after) {
            Ok((ids, last)) => {
                for id in ids {
                    let me = inner.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = consider_request(&me, &id) {
                            tracing::warn!("request {id}: {e}");
                        }
                    });
                }
                requests_after = last.or(requests_after);
            }
            Err(e) => tracing::debug!("following requests: {e}"),
        }
        match next_ids(&inner, "grant-seq/", &grants_after) {
            Ok((ids, last)) => {
                for id in ids {
                    consider_grant(&inner, &id);
                }
                grants_after = last.or(grants_after);
            }
            Err(e) => tracing::debug!("following grants: {e}"),
        }
        if before != (requests_after.clone(), grants_after.clone()) {
            let _ = svc.store.put_note(
                "share-cursor",
                &json!({ "requests": requests_after, "grants": grants_after }),
            );
        }
    }
}

/// New ids of a sequence after `after`, and the last key read.
fn next_ids(
    inner: &SharingInner,
    prefix: &str,
    after: &Option<String>,
) -> Result<(Vec<String>, Option<String>), String> {
    let page = inner
        .svc
        .client
        .query(prefix, after.as_deref(), 500)
        .map_err(|e| e.to_string())?;
    let last = page.entries.last().map(|e| e.key.clone());
    let ids = page
        .entries
        .into_iter()
        .filter_map(|e| e.value.as_str().map(str::to_string))
        .collect();
    Ok((ids, last))
}

/// Grants a request for this organisation's studies if consent or break-glass allows it;
/// otherwise leaves it to an authorised member (`medledger share grant`).
fn consider_request(inner: &Arc<SharingInner>, id: &str) -> Result<(), String> {
    let svc = &inner.svc;
    let c = &svc.client;
    let e = |e: medledger_node::ClientError| e.to_string();
    let Some(r) = c.value::<Request>(&format!("request/{id}")).map_err(e)? else {
        return Ok(());
    };
    if r.org == inner.org {
        return Ok(());
    }
    let studies: Vec<Study> = match &r.target {
        Target::Study(root) => c
            .value::<Study>(&format!("study/{root}"))
            .map_err(e)?
            .into_iter()
            .collect(),
        Target::Patient(p) => c
            .studies()
            .map_err(e)?
            .into_iter()
            .filter(|s| &s.patient == p)
            .filter(|s| match r.purpose {
                // Care: the identified originals; research: de-identified derivatives only.
                Purpose::Care => !s.is_derivative(),
                Purpose::Research => s.is_derivative(),
            })
            .collect(),
    };
    let mut mine = Vec::new();
    for s in studies {
        if s.owner != inner.org {
            continue;
        }
        let superseded = c
            .value::<Value>(&format!("superseded/{}", s.root))
            .map_err(e)?
            .is_some();
        if !superseded || matches!(r.target, Target::Study(_)) {
            mine.push(s);
        }
    }
    if mine.is_empty() {
        return Ok(());
    }
    let org: Org = c
        .value(&format!("org/{}", r.org))
        .map_err(e)?
        .ok_or_else(|| format!("no organisation {}", r.org))?;
    let Some(key) = org.store_key.as_deref() else {
        return Err(format!("{} has no store key on the ledger", r.org));
    };
    let recipient = PublicKey::from_text(key).map_err(|e| e.to_string())?;
    let mut ops = Vec::new();
    for s in mine {
        // A grant made on consent lasts no longer than the consents that allow it.
        let mut expires_ms = None;
        if !r.break_glass {
            let view = c.patient_view(&s.patient).map_err(e)?;
            let consents: Vec<Consent> =
                serde_json::from_value(view["consents"].clone()).unwrap_or_default();
            let covering: Vec<&Consent> = consents
                .iter()
                .filter(|k| k.covers(r.purpose, &org.id, org.class, now_ms()))
                .collect();
            if covering.is_empty() {
                tracing::info!(
                    "request {id} from {} for study {}: no consent covers it; left to an authorised member",
                    r.org,
                    s.root
                );
                continue;
            }
            expires_ms = if covering.iter().any(|k| k.expires_ms.is_none()) {
                None
            } else {
                covering.iter().filter_map(|k| k.expires_ms).max()
            };
        }
        if already_granted(inner, &s.root, id)? {
            continue;
        }
        let envelope = svc
            .store
            .envelope_for(&s.root, &svc.owner, &recipient)
            .map_err(|e| e.to_string())?;
        ops.push(medledger_ledger::Op::GrantAccess {
            request: id.to_string(),
            study: s.root,
            envelope: serde_json::to_string(&envelope).expect("serialises"),
            expires_ms,
            delegable: false,
        });
    }
    if ops.is_empty() {
        return Ok(());
    }
    for r in svc.execute(ops)? {
        if let Err(e) = r {
            tracing::warn!("granting request {id}: {e}");
        }
    }
    Ok(())
}

fn already_granted(inner: &SharingInner, root: &Digest, request: &str) -> Result<bool, String> {
    let c = &inner.svc.client;
    let page = c
        .query(&format!("study-grant/{root}/"), None, 10_000)
        .map_err(|e| e.to_string())?;
    for entry in page.entries {
        let Some(id) = entry.key.rsplit('/').next() else {
            continue;
        };
        if let Ok(Some(g)) = c.value::<Grant>(&format!("grant/{id}")) {
            if g.request == request {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Starts again the interrupted retrievals whose time has come.
fn retry_interrupted(inner: &Arc<SharingInner>) {
    let due: Vec<(String, Option<String>)> = inner
        .retrievals
        .lock()
        .expect("not poisoned")
        .values()
        .filter(|r| r.state == "interrupted" && r.next_attempt_ms.is_some_and(|t| t <= now_ms()))
        .map(|r| (r.grant.clone(), r.series.clone()))
        .collect();
    for (grant, series) in due {
        let me = inner.clone();
        std::thread::spawn(
            move || match super::fetch::fetch(&me, &grant, series.as_deref()) {
                Ok(o) => tracing::info!(
                    "retrieval of grant {grant} resumed and done: {} of {} objects were already here",
                    o.resumed_objects,
                    o.objects
                ),
                Err(e) => tracing::warn!("retrying grant {grant}: {e}"),
            },
        );
    }
}

/// Fetches a grant made to this organisation, unless it was received already.
fn consider_grant(inner: &Arc<SharingInner>, id: &str) {
    let Ok(Some(g)) = inner.svc.client.value::<Grant>(&format!("grant/{id}")) else {
        return;
    };
    if g.grantee != inner.org || g.revoked_at.is_some() {
        return;
    }
    let received = inner
        .svc
        .store
        .notes("received/")
        .unwrap_or_default()
        .into_iter()
        .any(|(_, v)| v["grant"].as_str() == Some(id));
    if received {
        return;
    }
    let me = inner.clone();
    let id = id.to_string();
    std::thread::spawn(move || match super::fetch::fetch(&me, &id, None) {
        Ok(o) => tracing::info!(
            "received study {} from {} under grant {id}: {} objects, {} bytes, verified",
            o.root,
            o.owner,
            o.objects,
            o.bytes
        ),
        Err(e) => tracing::warn!("fetching grant {id}: {e}"),
    });
}

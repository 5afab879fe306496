//! Who sees identified originals over DICOMweb: members of this node's organisation with a
//! clinical role (clinician, admin), proven by a short-lived bearer token they sign with
//! their ledger key. Everyone else, including anonymous requests, sees the de-identified
//! derivatives.
//!
//! Token: `ml1.<member public key, hex>.<expiry, ms since 1970>.<Ed25519 signature, hex>`,
//! the signature over `medledger dicomweb token\n<organisation>\n<key>\n<expiry>`, so a token
//! is good for one organisation's nodes only, and for at most a day.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use medledger_crypto::{Signature, SigningKey, VerifyingKey};
use medledger_ledger::{Member, Role};
use medledger_node::Client;

/// Longest validity a token may claim.
pub const MAX_TOKEN_MS: u64 = 24 * 3600 * 1000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn message(org: &str, key: &VerifyingKey, expiry_ms: u64) -> Vec<u8> {
    format!("medledger dicomweb token\n{org}\n{key}\n{expiry_ms}").into_bytes()
}

/// A token for `org`'s nodes, valid for `valid` (at most a day).
pub fn issue_token(key: &SigningKey, org: &str, valid: Duration) -> String {
    let expiry = now_ms() + (valid.as_millis() as u64).min(MAX_TOKEN_MS);
    let vk = key.verifying_key();
    let sig = key.sign(&message(org, &vk, expiry));
    format!("ml1.{vk}.{expiry}.{}", hex::encode(sig.0))
}

/// Why a token was refused (never echoes the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

/// Checks the form, the signature and the expiry of a token; returns the member's key.
pub fn check_token(token: &str, org: &str) -> Result<VerifyingKey, TokenError> {
    let bad = |why: &str| TokenError(format!("access token refused: {why}"));
    let mut parts = token.trim().split('.');
    let (Some("ml1"), Some(key), Some(expiry), Some(sig), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad("not a medledger token (ml1.KEY.EXPIRY.SIGNATURE)"));
    };
    let key = VerifyingKey::from_hex(key).map_err(|_| bad("malformed key"))?;
    let expiry: u64 = expiry.parse().map_err(|_| bad("malformed expiry"))?;
    let sig: [u8; 64] = hex::decode(sig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("malformed signature"))?;
    let now = now_ms();
    if expiry <= now {
        return Err(bad("expired"));
    }
    if expiry > now + MAX_TOKEN_MS + 60_000 {
        return Err(bad("valid for more than a day"));
    }
    if !key.verify(&message(org, &key, expiry), &Signature(sig)) {
        return Err(bad("bad signature (or issued for another organisation)"));
    }
    Ok(key)
}

/// Checks tokens against the ledger's members, caching answers for a minute.
#[derive(Debug)]
pub struct Gate {
    org: String,
    client: Client,
    cache: Mutex<HashMap<String, (Instant, bool)>>,
}

impl Gate {
    pub fn new(org: &str, client: Client) -> Gate {
        Gate {
            org: org.to_string(),
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// True when the bearer of `token` may see this organisation's identified originals.
    pub fn clinical(&self, token: &str) -> Result<bool, TokenError> {
        let key = check_token(token, &self.org)?;
        if let Some((at, ok)) = self.cache.lock().expect("not poisoned").get(token) {
            if at.elapsed() < Duration::from_secs(60) {
                return Ok(*ok);
            }
        }
        let member: Option<Member> = self
            .client
            .prove(&format!("member/{key}"))
            .ok()
            .and_then(|p| serde_json::from_str(&p.proof.value).ok());
        let now = now_ms();
        let ok = member.is_some_and(|m| {
            m.org == self.org
                && (m.has(Role::Clinician) || m.has(Role::Admin))
                && m.not_before_ms <= now
                && now < m.not_after_ms
        });
        let mut cache = self.cache.lock().expect("not poisoned");
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(token.to_string(), (Instant::now(), ok));
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_key_organisation_and_time() {
        let k = SigningKey::generate();
        let t = issue_token(&k, "hospital-a", Duration::from_secs(600));
        assert_eq!(check_token(&t, "hospital-a").unwrap(), k.verifying_key());
        // Another organisation's nodes refuse it.
        assert!(check_token(&t, "hospital-b").is_err());
        // Tampered expiry or key: the signature no longer holds.
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        parts[2] = (parts[2].parse::<u64>().unwrap() + 1).to_string();
        assert!(check_token(&parts.join("."), "hospital-a").is_err());
        let other = SigningKey::generate().verifying_key().to_string();
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        parts[1] = other;
        assert!(check_token(&parts.join("."), "hospital-a").is_err());
        // Expired, malformed.
        let expired = {
            let vk = k.verifying_key();
            let exp = now_ms() - 1;
            let sig = k.sign(&message("hospital-a", &vk, exp));
            format!("ml1.{vk}.{exp}.{}", hex::encode(sig.0))
        };
        assert!(
            check_token(&expired, "hospital-a")
                .unwrap_err()
                .0
                .contains("expired")
        );
        assert!(check_token("Bearer x", "hospital-a").is_err());
        assert!(check_token("ml1.zz.1.2", "hospital-a").is_err());
        // A day at most, whatever was asked.
        let long = issue_token(&k, "hospital-a", Duration::from_secs(30 * 86_400));
        assert!(check_token(&long, "hospital-a").is_ok());
        let exp: u64 = long.split('.').nth(2).unwrap().parse().unwrap();
        assert!(exp <= now_ms() + MAX_TOKEN_MS);
    }
}

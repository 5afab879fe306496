//! Identities as the contracts see them: an organisation's CA certificate, and members'
//! certificates that CA issued (organisation in O, roles in OU, a patient's pseudonym in the
//! `pseudonym` attribute). Also the issuing side that `network init`, the CLI and tests use.

use medledger_crypto::{CertSpec, Certificate, SigningKey, VerifyingKey, pki};

use crate::GenesisOrg;
use crate::LedgerError;
use crate::types::{OrgClass, Role};

/// Certificates issued for tests and by default run from the epoch to the year 2200, so the
/// deterministic runtime's clock (which starts at the epoch) and real clocks both fall inside.
pub const FOREVER_MS: (u64, u64) = (0, 7_258_118_400_000);

/// A year, for default validity periods.
pub const YEAR_MS: u64 = 365 * 86_400_000;

fn cert_err(e: medledger_crypto::CryptoError) -> LedgerError {
    LedgerError::Invalid(e.to_string())
}

pub fn parse_certificate(pem: &str) -> Result<Certificate, LedgerError> {
    Certificate::from_pem(pem).map_err(cert_err)
}

/// The roles a certificate carries, as the ledger's roles.
pub fn roles_of(cert: &Certificate) -> Result<Vec<Role>, LedgerError> {
    let mut roles = cert
        .roles
        .iter()
        .map(|r| {
            Role::parse(r).ok_or_else(|| {
                LedgerError::Invalid(format!(
                    "{}'s certificate has unknown role {r:?}",
                    cert.name
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if roles.is_empty() {
        return Err(LedgerError::Invalid(format!(
            "{}'s certificate carries no role (OU)",
            cert.name
        )));
    }
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// A CA certificate that is self-signed and names `org`.
pub fn check_ca(ca_pem: &str, org: &str) -> Result<Certificate, LedgerError> {
    let ca = parse_certificate(ca_pem)?;
    ca.verify_ca().map_err(cert_err)?;
    if ca.org != org {
        return Err(LedgerError::Invalid(format!(
            "the CA certificate names organisation {:?}, not {org:?}",
            ca.org
        )));
    }
    Ok(ca)
}

/// An organisation's certificate authority: its key and its self-signed certificate.
#[derive(Debug)]
pub struct OrgCa {
    pub key: SigningKey,
    pub cert: Certificate,
}

impl OrgCa {
    pub fn new(org: &str, key: SigningKey, validity: (u64, u64)) -> Result<OrgCa, LedgerError> {
        let cert = pki::issue_ca(org, &key, validity.0, validity.1).map_err(cert_err)?;
        Ok(OrgCa { key, cert })
    }

    /// A CA from its key and its certificate (PEM), checked to belong together.
    pub fn from_parts(key: SigningKey, cert_pem: &str) -> Result<OrgCa, LedgerError> {
        let cert = parse_certificate(cert_pem)?;
        cert.verify_ca().map_err(cert_err)?;
        if cert.key != key.verifying_key() {
            return Err(LedgerError::Invalid(format!(
                "the key is not {}'s CA key",
                cert.org
            )));
        }
        Ok(OrgCa { key, cert })
    }

    pub fn org(&self) -> &str {
        &self.cert.org
    }

    /// A certificate for `key` with `roles` (and a patient's pseudonym), valid over `validity`.
    pub fn issue(
        &self,
        key: &VerifyingKey,
        name: &str,
        roles: &[Role],
        pseudonym: Option<&str>,
        hosts: &[String],
        validity: (u64, u64),
    ) -> Result<Certificate, LedgerError> {
        pki::issue(
            &self.cert,
            &self.key,
            key,
            &CertSpec {
                name: name.to_string(),
                org: self.org().to_string(),
                roles: roles.iter().map(|r| r.as_str().to_string()).collect(),
                pseudonym: pseudonym.map(str::to_string),
                hosts: hosts.to_vec(),
                not_before_ms: validity.0,
                not_after_ms: validity.1,
            },
        )
        .map_err(cert_err)
    }

    /// The genesis entry for this organisation: its CA, its first admin and its node.
    pub fn genesis_org(
        &self,
        class: OrgClass,
        admin: &VerifyingKey,
        node: &VerifyingKey,
        node_hosts: &[String],
        validity: (u64, u64),
    ) -> Result<GenesisOrg, LedgerError> {
        let org = self.org().to_string();
        let admin = self.issue(
            admin,
            &format!("{org} admin"),
            &[Role::Admin],
            None,
            &[],
            validity,
        )?;
        let node = self.issue(
            node,
            &format!("{org} node"),
            &[Role::Node],
            None,
            node_hosts,
            validity,
        )?;
        Ok(GenesisOrg {
            id: org,
            class,
            ca: self.cert.to_pem(),
            admin: admin.to_pem(),
            node: node.to_pem(),
            store_key: None,
        })
    }
}

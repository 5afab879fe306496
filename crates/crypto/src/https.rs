//! Certificates for the node's HTTPS endpoint (ledger API and DICOMweb), the one browsers and
//! ordinary HTTP clients talk to.
//!
//! Organisation identities are Ed25519 (see [`crate::pki`]), which browsers do not accept in
//! TLS. A network made by `network init` therefore also gets an ECDSA P-256 authority of its
//! own that issues one server certificate per node; a site that has its own PKI configures
//! its certificate and key instead. The authority's key is not kept: it issues at set-up only.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::CryptoError;

fn err(what: impl std::fmt::Display) -> CryptoError {
    CryptoError::Certificate(what.to_string())
}

fn time(ms: u64) -> Result<time::OffsetDateTime, CryptoError> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| err(format!("validity time {ms} ms: {e}")))
}

/// A P-256 certificate authority for HTTPS server certificates.
pub struct HttpsAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for HttpsAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsAuthority").finish_non_exhaustive()
    }
}

/// A server certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct HttpsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl HttpsAuthority {
    /// A new authority named `name`, valid over `(not_before_ms, not_after_ms)`.
    pub fn new(name: &str, validity: (u64, u64)) -> Result<HttpsAuthority, CryptoError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, name);
        dn.push(DnType::CommonName, format!("{name} HTTPS authority"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = time(validity.0)?;
        params.not_after = time(validity.1)?;
        let cert_pem = params.self_signed(&key).map_err(err)?.pem();
        Ok(HttpsAuthority {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// The authority's certificate: what clients are told to trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `hosts` (DNS names or IP addresses), with a new P-256 key.
    pub fn issue(
        &self,
        subject: &str,
        hosts: &[String],
        validity: (u64, u64),
    ) -> Result<HttpsIdentity, CryptoError> {
        if hosts.is_empty() {
            return Err(err("a server certificate names at least one host"));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::new(hosts.to_vec()).map_err(err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = time(validity.0)?;
        params.not_after = time(validity.1)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(HttpsIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

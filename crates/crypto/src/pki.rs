//! X.509 identities, as Fabric's membership service providers use them: every organisation runs
//! a certificate authority (a self-signed Ed25519 CA certificate), and every member and node holds
//! a certificate that CA issued, naming its organisation (O), its roles (OU, `+`-separated), its
//! name (CN) and, for a patient, their pseudonym (the X.520 `pseudonym` attribute, 2.5.4.65).
//!
//! Issuing uses rcgen; reading uses x509-parser, and the issuer's signature over the
//! to-be-signed bytes is checked here with ring, so verification is deterministic and needs
//! nothing but the two certificates and a time.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PKCS_ED25519, PublicKeyData, SanType, SerialNumber,
    SignatureAlgorithm,
};
use x509_parser::oid_registry::{OID_SIG_ED25519, Oid};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{CryptoError, Digest, Signature, SigningKey, VerifyingKey};

/// DER of the AlgorithmIdentifier for Ed25519 (1.3.101.112, no parameters).
const ED25519_ALG_ID: [u8; 7] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];

/// The X.520 `pseudonym` attribute type.
const PSEUDONYM_OID: [u64; 4] = [2, 5, 4, 65];

fn err(what: impl std::fmt::Display) -> CryptoError {
    CryptoError::Certificate(what.to_string())
}

/// What a certificate to be issued says about its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    /// The common name: a person's or a node's name.
    pub name: String,
    /// The organisation (O); the issuing CA's organisation.
    pub org: String,
    /// Roles (OU), e.g. `clinician`, `admin`, `node`.
    pub roles: Vec<String>,
    /// A patient's pseudonym, for patient identities.
    pub pseudonym: Option<String>,
    /// Host names or addresses the subject serves TLS on (nodes).
    pub hosts: Vec<String>,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// A parsed certificate. Only Ed25519 subject keys are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    der: Vec<u8>,
    pub name: String,
    pub org: String,
    pub roles: Vec<String>,
    pub pseudonym: Option<String>,
    pub key: VerifyingKey,
    pub is_ca: bool,
    pub serial: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    subject_raw: Vec<u8>,
    issuer_raw: Vec<u8>,
    tbs: Vec<u8>,
    signature: Vec<u8>,
}

/// Our Ed25519 key as rcgen sees a public key.
struct Ed25519Public([u8; 32]);

impl PublicKeyData for Ed25519Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

/// Our Ed25519 signing key as rcgen's issuer key.
struct Ed25519Signer<'a>(&'a SigningKey, [u8; 32]);

impl PublicKeyData for Ed25519Signer<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.1
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

impl rcgen::SigningKey for Ed25519Signer<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.0.sign(msg).0.to_vec())
    }
}

fn time(ms: u64) -> Result<time::OffsetDateTime, CryptoError> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| err(format!("validity time {ms} ms: {e}")))
}

/// The serial number: derived from everything the certificate says, so issuing the same
/// certificate twice gives the same bytes (Ed25519 signatures are deterministic too) and two
/// different certificates of one CA never share a serial.
fn serial(spec: &CertSpec, subject: &VerifyingKey) -> SerialNumber {
    let text = format!(
        "medledger certificate serial v1\n{}\n{}\n{}\n{}\n{:?}\n{:?}\n{}\n{}",
        subject,
        spec.org,
        spec.name,
        spec.roles.join("+"),
        spec.pseudonym,
        spec.hosts,
        spec.not_before_ms,
        spec.not_after_ms
    );
    let mut serial = [0u8; 16];
    serial.copy_from_slice(&Digest::of(text.as_bytes()).0[..16]);
    serial[0] &= 0x7f; // a positive INTEGER
    serial[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&serial)
}

fn params(spec: &CertSpec, subject: &VerifyingKey) -> Result<CertificateParams, CryptoError> {
    if spec.org.is_empty() || spec.name.is_empty() {
        return Err(err("a certificate names its organisation and its subject"));
    }
    if spec.not_after_ms <= spec.not_before_ms {
        return Err(err("a certificate's validity ends after it begins"));
    }
    if spec.roles.iter().any(|r| r.is_empty() || r.contains('+')) {
        return Err(err("a role is a non-empty word without '+'"));
    }
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, spec.org.as_str());
    if !spec.roles.is_empty() {
        dn.push(DnType::OrganizationalUnitName, spec.roles.join("+"));
    }
    dn.push(DnType::CommonName, spec.name.as_str());
    if let Some(p) = &spec.pseudonym {
        dn.push(DnType::CustomDnType(PSEUDONYM_OID.to_vec()), p.as_str());
    }
    p.distinguished_name = dn;
    p.not_before = time(spec.not_before_ms)?;
    p.not_after = time(spec.not_after_ms)?;
    p.serial_number = Some(serial(spec, subject));
    for h in &spec.hosts {
        p.subject_alt_names
            .push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.clone().try_into().map_err(err)?),
            });
    }
    Ok(p)
}

/// A CA's parameters; the subject name is rebuilt from them when the CA issues, so it must be
/// the same encoding every time.
fn ca_params(
    org: &str,
    ca_key: &VerifyingKey,
    not_before_ms: u64,
    not_after_ms: u64,
) -> Result<CertificateParams, CryptoError> {
    let mut p = params(
        &CertSpec {
            name: format!("{org} CA"),
            org: org.to_string(),
            roles: vec!["ca".into()],
            pseudonym: None,
            hosts: vec![],
            not_before_ms,
            not_after_ms,
        },
        ca_key,
    )?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// A self-signed CA certificate for `org`, its key `ca_key`.
pub fn issue_ca(
    org: &str,
    ca_key: &SigningKey,
    not_before_ms: u64,
    not_after_ms: u64,
) -> Result<Certificate, CryptoError> {
    let p = ca_params(org, &ca_key.verifying_key(), not_before_ms, not_after_ms)?;
    let signer = Ed25519Signer(ca_key, ca_key.verifying_key().0);
    let cert = p.self_signed(&signer).map_err(err)?;
    Certificate::from_der(cert.der())
}

/// A certificate for `subject`'s key, issued by the CA (`ca`, with its key `ca_key`).
pub fn issue(
    ca: &Certificate,
    ca_key: &SigningKey,
    subject: &VerifyingKey,
    spec: &CertSpec,
) -> Result<Certificate, CryptoError> {
    if !ca.is_ca || ca.key != ca_key.verifying_key() {
        return Err(err("the issuer is not this CA key's CA certificate"));
    }
    if spec.org != ca.org {
        return Err(err(format!(
            "{}'s CA issues certificates of {} only, not of {}",
            ca.org, ca.org, spec.org
        )));
    }
    let mut p = params(spec, subject)?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let issuer = Issuer::new(
        ca_params(&ca.org, &ca.key, ca.not_before_ms, ca.not_after_ms)?,
        Ed25519Signer(ca_key, ca.key.0),
    );
    let cert = p
        .signed_by(&Ed25519Public(subject.0), &issuer)
        .map_err(err)?;
    Certificate::from_der(cert.der())
}

fn text_attr<'a>(
    it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
    what: &str,
) -> Result<Option<String>, CryptoError> {
    let mut out = None;
    for a in it {
        if out.is_some() {
            return Err(err(format!("the subject has more than one {what}")));
        }
        out = Some(
            a.as_str()
                .map_err(|_| err(format!("the subject's {what} is not text")))?
                .to_string(),
        );
    }
    Ok(out)
}

fn ms(t: x509_parser::time::ASN1Time) -> u64 {
    u64::try_from(t.timestamp())
        .unwrap_or(0)
        .saturating_mul(1000)
}

impl Certificate {
    /// Reads one DER certificate; the whole input must be the certificate.
    pub fn from_der(der: &[u8]) -> Result<Certificate, CryptoError> {
        let (rest, c) =
            X509Certificate::from_der(der).map_err(|e| err(format!("not X.509: {e}")))?;
        if !rest.is_empty() {
            return Err(err("trailing bytes after the certificate"));
        }
        // RFC 5280 4.1.1.2: the outer signature algorithm is the TBS one; both must be exactly
        // Ed25519's AlgorithmIdentifier (RFC 8410: no parameters), checked on the bytes.
        let header = if der.len() > 1 && der[1] < 0x80 {
            2
        } else {
            2 + usize::from(der.get(1).copied().unwrap_or(0) & 0x7f)
        };
        let tbs = c.tbs_certificate.as_ref();
        let after = header + tbs.len();
        if der.get(header..after) != Some(tbs)
            || der.get(after..after + ED25519_ALG_ID.len()) != Some(&ED25519_ALG_ID[..])
            || der.get(after + ED25519_ALG_ID.len()..after + ED25519_ALG_ID.len() + 3)
                != Some(&[0x03, 0x41, 0x00][..])
            || der.len() != after + ED25519_ALG_ID.len() + 3 + 64
            || c.tbs_certificate.signature.algorithm != OID_SIG_ED25519
            || c.tbs_certificate.signature.parameters.is_some()
        {
            return Err(err("the certificate is not signed with Ed25519 (RFC 8410)"));
        }
        let spki = c.public_key();
        if spki.algorithm.algorithm != OID_SIG_ED25519 {
            return Err(err(format!(
                "the subject key is {}, not Ed25519",
                spki.algorithm.algorithm
            )));
        }
        let key: [u8; 32] = spki
            .subject_public_key
            .data
            .as_ref()
            .try_into()
            .map_err(|_| err("an Ed25519 key is 32 bytes"))?;
        let subject = c.subject();
        let pseudonym_oid = Oid::from(&PSEUDONYM_OID).expect("a valid OID");
        let org = text_attr(subject.iter_organization(), "organisation")?
            .ok_or_else(|| err("the subject names no organisation (O)"))?;
        let name = text_attr(subject.iter_common_name(), "common name")?
            .ok_or_else(|| err("the subject has no common name (CN)"))?;
        let roles = text_attr(subject.iter_organizational_unit(), "role (OU)")?
            .map(|r| r.split('+').map(str::to_string).collect())
            .unwrap_or_default();
        let pseudonym = text_attr(subject.iter_by_oid(&pseudonym_oid), "pseudonym")?;
        let is_ca = c
            .basic_constraints()
            .map_err(|e| err(format!("basic constraints: {e}")))?
            .is_some_and(|b| b.value.ca);
        Ok(Certificate {
            der: der.to_vec(),
            name,
            org,
            roles,
            pseudonym,
            key: VerifyingKey(key),
            is_ca,
            serial: c.raw_serial_as_string().replace(':', ""),
            not_before_ms: ms(c.validity().not_before),
            not_after_ms: ms(c.validity().not_after),
            subject_raw: subject.as_raw().to_vec(),
            issuer_raw: c.issuer().as_raw().to_vec(),
            tbs: tbs.to_vec(),
            signature: c.signature_value.data.to_vec(),
        })
    }

    /// Reads a PEM `CERTIFICATE` block.
    pub fn from_pem(text: &str) -> Result<Certificate, CryptoError> {
        let p = pem::parse(text.trim()).map_err(|e| err(format!("not PEM: {e}")))?;
        if p.tag() != "CERTIFICATE" {
            return Err(err(format!("a PEM {} block, not a CERTIFICATE", p.tag())));
        }
        Certificate::from_der(p.contents())
    }

    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.der.clone()))
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The digest of the DER encoding.
    pub fn fingerprint(&self) -> Digest {
        Digest::of(&self.der)
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    pub fn valid_at(&self, ms: u64) -> bool {
        self.not_before_ms <= ms && ms <= self.not_after_ms
    }

    /// Checks that `ca` issued this certificate: names match, `ca` is a CA certificate of the
    /// same organisation, and its key signed these to-be-signed bytes.
    pub fn verify_issued_by(&self, ca: &Certificate) -> Result<(), CryptoError> {
        if !ca.is_ca {
            return Err(err(format!("{} is not a CA certificate", ca.name)));
        }
        if self.issuer_raw != ca.subject_raw {
            return Err(err(format!(
                "{} was not issued by {} (issuer name differs)",
                self.name, ca.name
            )));
        }
        if self.org != ca.org {
            return Err(err(format!(
                "{} names organisation {}, its CA is {}'s",
                self.name, self.org, ca.org
            )));
        }
        let sig: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| err("an Ed25519 signature is 64 bytes"))?;
        if !ca.key.verify(&self.tbs, &Signature(sig)) {
            return Err(err(format!(
                "{}'s certificate signature does not verify under {}",
                self.name, ca.name
            )));
        }
        Ok(())
    }

    /// A self-signed CA certificate that verifies under its own key.
    pub fn verify_ca(&self) -> Result<(), CryptoError> {
        self.verify_issued_by(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;
    const T0: u64 = 1_780_000_000_000;

    fn spec(org: &str, roles: &[&str]) -> CertSpec {
        CertSpec {
            name: "Dr Example".into(),
            org: org.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            pseudonym: None,
            hosts: vec![],
            not_before_ms: T0,
            not_after_ms: T0 + 365 * DAY,
        }
    }

    #[test]
    fn issue_parse_verify() {
        let ca_key = SigningKey::from_seed([1; 32]);
        let ca = issue_ca("hospital-a", &ca_key, T0, T0 + 3650 * DAY).unwrap();
        assert!(ca.is_ca);
        // Issuing is deterministic: the same CA certificate, byte for byte.
        assert_eq!(
            issue_ca("hospital-a", &ca_key, T0, T0 + 3650 * DAY).unwrap(),
            ca
        );
        ca.verify_ca().unwrap();
        let member = SigningKey::from_seed([2; 32]);
        let mut s = spec("hospital-a", &["clinician", "admin"]);
        s.hosts = vec!["127.0.0.1".into(), "node.hospital-a".into()];
        let cert = issue(&ca, &ca_key, &member.verifying_key(), &s).unwrap();
        let back = Certificate::from_pem(&cert.to_pem()).unwrap();
        assert_eq!(back, cert);
        assert_eq!(back.key, member.verifying_key());
        assert_eq!(back.org, "hospital-a");
        assert_eq!(back.roles, ["clinician", "admin"]);
        assert_eq!(back.name, "Dr Example");
        assert!(!back.is_ca);
        assert_eq!(back.not_before_ms, T0);
        assert!(
            back.valid_at(T0 + DAY) && !back.valid_at(T0 + 366 * DAY) && !back.valid_at(T0 - 1)
        );
        back.verify_issued_by(&ca).unwrap();
        // A member certificate cannot act as a CA.
        assert!(ca.verify_issued_by(&back).is_err());
    }

    #[test]
    fn patient_pseudonym_round_trips() {
        let ca_key = SigningKey::from_seed([3; 32]);
        let ca = issue_ca("patients", &ca_key, T0, T0 + DAY * 10).unwrap();
        let mut s = spec("patients", &["patient"]);
        s.pseudonym = Some("MLABCDEFGHJKLMNPQ".into());
        let c = issue(
            &ca,
            &ca_key,
            &SigningKey::from_seed([4; 32]).verifying_key(),
            &s,
        )
        .unwrap();
        assert_eq!(c.pseudonym.as_deref(), Some("MLABCDEFGHJKLMNPQ"));
    }

    #[test]
    fn another_ca_or_a_forged_certificate_is_refused() {
        let a_key = SigningKey::from_seed([5; 32]);
        let a = issue_ca("hospital-a", &a_key, T0, T0 + DAY).unwrap();
        let b_key = SigningKey::from_seed([6; 32]);
        let b = issue_ca("hospital-b", &b_key, T0, T0 + DAY).unwrap();
        let cert = issue(
            &a,
            &a_key,
            &b_key.verifying_key(),
            &spec("hospital-a", &["admin"]),
        )
        .unwrap();
        assert!(
            cert.verify_issued_by(&b)
                .unwrap_err()
                .to_string()
                .contains("issuer")
        );
        // A CA issues only for its own organisation.
        assert!(
            issue(
                &a,
                &a_key,
                &b_key.verifying_key(),
                &spec("hospital-b", &["admin"])
            )
            .is_err()
        );
        // A CA certificate of the same name but another key (an impostor CA) does not verify.
        let impostor_key = SigningKey::from_seed([7; 32]);
        let impostor = issue_ca("hospital-a", &impostor_key, T0, T0 + DAY).unwrap();
        let forged = issue(
            &impostor,
            &impostor_key,
            &b_key.verifying_key(),
            &spec("hospital-a", &["admin"]),
        )
        .unwrap();
        assert!(
            forged
                .verify_issued_by(&a)
                .unwrap_err()
                .to_string()
                .contains("signature")
        );
        // Every flipped byte of the DER either fails to parse or fails to verify.
        let der = cert.der().to_vec();
        for i in 0..der.len() {
            let mut d = der.clone();
            d[i] ^= 0x01;
            if let Ok(c) = Certificate::from_der(&d) {
                assert!(
                    c.verify_issued_by(&a).is_err(),
                    "byte {i} of {} flipped still verifies: {:02x?}",
                    der.len(),
                    &der[i.saturating_sub(8)..(i + 8).min(der.len())]
                );
            }
        }
        assert!(
            Certificate::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
                .is_err()
        );
        assert!(Certificate::from_der(b"garbage").is_err());
    }
}

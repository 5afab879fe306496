//! Mutual TLS between nodes, with the organisations' own certificates.
//!
//! Both sides present their node certificate (Ed25519, issued by their organisation's CA at
//! `network init`). There are no web PKI roots: a peer's certificate is accepted only if it
//! chains to the CA of an organisation the ledger lists as active, names that organisation,
//! carries the `node` role and is within its validity. The client also requires the
//! organisation it meant to reach. TLS 1.3 only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use medledger_crypto::{Certificate, SigningKey};
use medledger_ledger::Org;
use medledger_node::Client;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::TcpListener;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The organisations' CA certificates as the ledger lists them (active ones only), kept
/// fresh by [`Orgs::refresh`].
#[derive(Debug, Default)]
pub struct Orgs {
    cas: RwLock<HashMap<String, Certificate>>,
    store_keys: RwLock<HashMap<String, String>>,
}

impl Orgs {
    /// Reads every organisation from the ledger through the node's API.
    pub fn refresh(&self, client: &Client) -> Result<(), String> {
        let mut cas = HashMap::new();
        let mut keys = HashMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = client
                .query("org/", after.as_deref(), 1000)
                .map_err(|e| e.to_string())?;
            for e in &page.entries {
                let Ok(o) = serde_json::from_value::<Org>(e.value.clone()) else {
                    continue;
                };
                if !o.active {
                    continue;
                }
                if let Ok(ca) = Certificate::from_pem(&o.ca) {
                    cas.insert(o.id.clone(), ca);
                }
                if let Some(k) = o.store_key {
                    keys.insert(o.id.clone(), k);
                }
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        *self.cas.write().expect("not poisoned") = cas;
        *self.store_keys.write().expect("not poisoned") = keys;
        Ok(())
    }

    /// The store key grants to `org` are wrapped for.
    pub fn store_key(&self, org: &str) -> Option<String> {
        self.store_keys
            .read()
            .expect("not poisoned")
            .get(org)
            .cloned()
    }

    /// Checks a peer's node certificate; `expected`: the organisation it must belong to.
    pub fn check_node(&self, der: &[u8], expected: Option<&str>) -> Result<Certificate, String> {
        let cert =
            Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        if let Some(org) = expected {
            if cert.org != org {
                return Err(format!(
                    "the peer is {}'s node, not {org}'s",
                    if cert.org.is_empty() {
                        "no organisation"
                    } else {
                        &cert.org
                    }
                ));
            }
        }
        let cas = self.cas.read().expect("not poisoned");
        let ca = cas.get(&cert.org).ok_or_else(|| {
            format!(
                "certificate names {:?}, not an active organisation of the network",
                cert.org
            )
        })?;
        cert.verify_issued_by(ca)
            .map_err(|e| format!("certificate not issued by {}'s CA: {e}", cert.org))?;
        if !cert.valid_at(now_ms()) {
            return Err(format!("{}'s certificate is not valid now", cert.name));
        }
        if !cert.has_role("node") {
            return Err(format!("{} is not a node (role node)", cert.name));
        }
        Ok(cert)
    }
}

/// A refused handshake: the organisation the certificate claimed (if readable) and why.
#[derive(Debug, Clone)]
pub struct HandshakeRefusal {
    pub claimed_org: Option<String>,
    pub reason: String,
}

/// The handshake-signature half of a verifier, the same on both sides: TLS 1.3 only,
/// Ed25519 only (the organisations' certificates are Ed25519).
macro_rules! tls13_ed25519_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not offered".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    };
}

#[derive(Debug)]
struct ClientVerifier {
    orgs: Arc<Orgs>,
    algs: WebPkiSupportedAlgorithms,
    refusals: Arc<Mutex<Vec<HandshakeRefusal>>>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.orgs.check_node(end_entity.as_ref(), None) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(reason) => {
                let claimed_org = Certificate::from_der(end_entity.as_ref())
                    .ok()
                    .map(|c| c.org)
                    .filter(|o| medledger_ledger::check_org_id(o).is_ok());
                let mut r = self.refusals.lock().expect("not poisoned");
                if r.len() < 1000 {
                    r.push(HandshakeRefusal {
                        claimed_org,
                        reason: reason.clone(),
                    });
                }
                Err(rustls::Error::General(reason))
            }
        }
    }

    tls13_ed25519_signatures!();
}

#[derive(Debug)]
struct ServerVerifier {
    orgs: Arc<Orgs>,
    expected: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.orgs
            .check_node(end_entity.as_ref(), Some(&self.expected))
            .map(|_| ServerCertVerified::assertion())
            .map_err(rustls::Error::General)
    }

    tls13_ed25519_signatures!();
}

fn identity(
    cert_pem: &str,
    key: &SigningKey,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let cert = Certificate::from_pem(cert_pem).map_err(|e| format!("node certificate: {e}"))?;
    if cert.key != key.verifying_key() {
        return Err("the node certificate is not for the node's signing key".into());
    }
    Ok((
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_pkcs8_der())),
    ))
}

/// The serving side: requires a client certificate of a member organisation's node.
pub fn server_config(
    cert_pem: &str,
    key: &SigningKey,
    orgs: Arc<Orgs>,
    refusals: Arc<Mutex<Vec<HandshakeRefusal>>>,
) -> Result<rustls::ServerConfig, String> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let (chain, key) = identity(cert_pem, key)?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(ClientVerifier {
            orgs,
            algs,
            refusals,
        }))
        .with_single_cert(chain, key)
        .map_err(|e| format!("node certificate and key: {e}"))
}

/// The fetching side: presents this node's certificate, accepts only `expected`'s node.
pub fn client_config(
    cert_pem: &str,
    key: &SigningKey,
    orgs: Arc<Orgs>,
    expected: &str,
) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let (chain, key) = identity(cert_pem, key)?;
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            orgs,
            expected: expected.to_string(),
            algs,
        }))
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("node certificate and key: {e}"))
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The verified node certificate.
    pub cert: Arc<Certificate>,
}

/// The share port's listener: connections whose mutual TLS handshake succeeded, with the
/// node certificate the peer proved.
pub type TlsListener = medledger_node::tls::TlsListener<Peer>;

/// Starts the share port's listener on `listener` (inside a tokio runtime).
pub fn listen(listener: TcpListener, config: rustls::ServerConfig) -> std::io::Result<TlsListener> {
    TlsListener::start(listener, config, |stream, addr| {
        let der = stream.get_ref().1.peer_certificates()?.first()?;
        let cert = Certificate::from_der(der.as_ref()).ok()?;
        Some(Peer {
            addr,
            cert: Arc::new(cert),
        })
    })
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

//! TLS for the node's listeners: a listener for axum that hands over connections once their
//! handshake succeeded (handshakes run concurrently, so a slow or silent client holds up no
//! other), and the HTTPS configuration of the node's API from PEM files.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted TLS connections, each with what `identify` made of it (the peer's address, or
/// the identity its certificate proves).
#[derive(Debug)]
pub struct TlsListener<A> {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, A)>,
    local: SocketAddr,
}

impl<A: Send + 'static> TlsListener<A> {
    /// Starts accepting on `listener` (call inside a tokio runtime). A connection whose
    /// handshake fails, or that `identify` refuses, is dropped.
    pub fn start(
        listener: TcpListener,
        config: rustls::ServerConfig,
        identify: impl Fn(&TlsStream<TcpStream>, SocketAddr) -> Option<A> + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let identify = Arc::new(identify);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("TLS listener on {local}: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx, identify) = (acceptor.clone(), tx.clone(), identify.clone());
                tokio::spawn(async move {
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::info!("TLS handshake from {addr} on {local} refused: {e}");
                                return;
                            }
                            Err(_) => return,
                        };
                    if let Some(who) = identify(&stream, addr) {
                        let _ = tx.send((stream, who)).await;
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl<A: Send + 'static> axum::serve::Listener for TlsListener<A> {
    type Io = TlsStream<TcpStream>;
    type Addr = A;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept loop never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Err(std::io::Error::other(format!(
            "the TLS listener on {} names its connections, not itself",
            self.local
        )))
    }
}

/// Errors reading the HTTPS certificate and key.
#[derive(Debug, thiserror::Error)]
pub enum HttpsConfigError {
    #[error("cannot read the HTTPS certificate chain {path}: {why}")]
    Cert { path: String, why: String },
    #[error("cannot read the HTTPS private key {path}: {why}")]
    Key { path: String, why: String },
    #[error("the HTTPS certificate {cert} and key {key} do not make a TLS identity: {why}")]
    Identity {
        cert: String,
        key: String,
        why: String,
    },
    #[error("cannot use {path} as the authorities of client certificates: {why}")]
    ClientCa { path: String, why: String },
}

/// A TLS 1.2/1.3 server configuration (no client certificates; HTTP/1.1) from a PEM
/// certificate chain (leaf first) and a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn https_server_config(
    cert: &Path,
    key: &Path,
) -> Result<rustls::ServerConfig, HttpsConfigError> {
    server_config(cert, key, None)
}

/// Like [`https_server_config`], but, with `client_ca` (a PEM file of one or more CA
/// certificates), every client must present a certificate chain to one of those authorities
/// (mutual TLS, as IHE ATNA asks of DICOM nodes); no application protocol is negotiated.
pub fn dicom_tls_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, HttpsConfigError> {
    let mut config = server_config(cert, key, client_ca)?;
    // DICOM peers negotiate no application protocol.
    config.alpn_protocols.clear();
    Ok(config)
}

fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, HttpsConfigError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .map_err(|e| HttpsConfigError::Cert {
            path: cert.display().to_string(),
            why: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(HttpsConfigError::Cert {
            path: cert.display().to_string(),
            why: "no CERTIFICATE block in it".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| HttpsConfigError::Key {
        path: key.display().to_string(),
        why: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsConfigError::Identity {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            why: e.to_string(),
        })?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    };
    let mut config =
        builder
            .with_single_cert(chain, private)
            .map_err(|e| HttpsConfigError::Identity {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
                why: e.to_string(),
            })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Verifies client certificates against the CA certificates in the PEM file at `path`.
fn client_verifier(
    path: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, HttpsConfigError> {
    let fail = |why: String| HttpsConfigError::ClientCa {
        path: path.display().to_string(),
        why,
    };
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| fail(e.to_string()))?;
    if cas.is_empty() {
        return Err(fail("no CERTIFICATE block in it".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| fail(e.to_string()))?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medledger_crypto::https::HttpsAuthority;

    #[test]
    fn https_identity_from_pem_files_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ca = HttpsAuthority::new("test", (0, 4_000_000_000_000)).unwrap();
        let hosts = ["localhost".to_string()];
        let a = ca.issue("a", &hosts, (0, 4_000_000_000_000)).unwrap();
        let b = ca.issue("b", &hosts, (0, 4_000_000_000_000)).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let (cert, key) = (write("a.pem", &a.cert_pem), write("a.key", &a.key_pem));
        let chain = write("chain.pem", &format!("{}{}", a.cert_pem, ca.cert_pem()));
        assert!(https_server_config(&cert, &key).is_ok());
        assert!(https_server_config(&chain, &key).is_ok());

        let missing = dir.path().join("none.pem");
        let e = https_server_config(&missing, &key).unwrap_err();
        assert!(matches!(e, HttpsConfigError::Cert { .. }), "{e}");
        let empty = write("empty.pem", "");
        let e = https_server_config(&empty, &key).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
        let e = https_server_config(&cert, &cert).unwrap_err();
        assert!(matches!(e, HttpsConfigError::Key { .. }), "{e}");
        // Another certificate's key: not an identity.
        let other = write("b.key", &b.key_pem);
        let e = https_server_config(&cert, &other).unwrap_err();
        assert!(matches!(e, HttpsConfigError::Identity { .. }), "{e}");

        // DICOM TLS: no ALPN; client authorities from a PEM file, which must hold some.
        let roots = write("ca.pem", ca.cert_pem());
        let dicom = dicom_tls_server_config(&cert, &key, Some(&roots)).unwrap();
        assert!(dicom.alpn_protocols.is_empty());
        assert!(dicom_tls_server_config(&cert, &key, None).is_ok());
        for bad in [&missing, &empty, &key] {
            let e = dicom_tls_server_config(&cert, &key, Some(bad)).unwrap_err();
            assert!(matches!(e, HttpsConfigError::ClientCa { .. }), "{e}");
            assert!(e.to_string().contains("client certificates"), "{e}");
        }
    }
}

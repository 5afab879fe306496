//! A local network's files: one folder per organisation with its node configuration and keys,
//! and the genesis every node starts from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use commonware_codec::{DecodeExt, Encode};
use commonware_cryptography::Signer as _;
use commonware_cryptography::ed25519::{PrivateKey, PublicKey};
use medledger_crypto::SigningKey;
use medledger_ledger::identity::{self, OrgCa};
use medledger_ledger::{Genesis, OrgClass};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Why a configuration could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One peer as a node knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerConfig {
    pub org: String,
    /// The peer's consensus and p2p public key (hex).
    pub key: String,
    pub p2p: SocketAddr,
    pub api: SocketAddr,
    /// Where the peer's node serves studies to other organisations' nodes (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<SocketAddr>,
}

/// A DICOM peer this node knows by AE title: where C-MOVE sends to it, and whether it sees
/// the identified originals (a PACS or workstation of the same organisation) or only the
/// de-identified derivatives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DicomPeer {
    pub ae_title: String,
    pub addr: SocketAddr,
    #[serde(default)]
    pub originals: bool,
}

/// The node's imaging service: DIMSE and DICOMweb in and out, the store, de-identification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagingConfig {
    /// Where DIMSE (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET) listens.
    pub dicom: SocketAddr,
    /// Where the same DIMSE services listen over TLS (PS3.15 Annex B), with the node's HTTPS
    /// certificate (the `https` section); none: no DICOM TLS port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom_tls: Option<SocketAddr>,
    /// A PEM file of the certificate authorities whose certificates DICOM TLS peers must
    /// present (mutual TLS, as IHE ATNA's Secure Node asks); none: peers need no certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom_tls_clients: Option<PathBuf>,
    pub ae_title: String,
    /// The image store: a directory or `s3://bucket/prefix`.
    pub store: String,
    /// The store's owner key (X25519, `medledger key`), the site's de-identification key,
    /// and the node's ledger signing key (registers studies), as files.
    pub store_key: PathBuf,
    pub deid_key: PathBuf,
    pub signing_key: PathBuf,
    /// De-identification options beyond the Basic Profile (names as `medledger deid` takes).
    #[serde(default)]
    pub deid_options: Vec<String>,
    /// A study is registered on the ledger once no instance has arrived for this long.
    #[serde(default = "default_stable_ms")]
    pub stable_ms: u64,
    #[serde(default)]
    pub dicom_peers: Vec<DicomPeer>,
    /// Where this node serves studies to other organisations' nodes (mutual TLS with the
    /// node certificate `node_cert`); none: it shares nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<SocketAddr>,
    /// The node's certificate (PEM) from its organisation's CA, for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_cert: Option<PathBuf>,
    /// The consortium's linkage key (a de-identification key shared by the hospitals): the
    /// patient pseudonym on the ledger is made with it, so that one patient's studies at
    /// different sites carry the same pseudonym. Without it, the site's key is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linkage_key: Option<PathBuf>,
    /// Grant access automatically when the patient's consent (or a break-glass request)
    /// allows it, and fetch automatically what other organisations grant this one.
    #[serde(default = "default_true")]
    pub auto_share: bool,
    /// At most this many MB/s served to other organisations' nodes, all transfers together
    /// (a site's link to the others is shared with everything else it does); none: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_limit_mb_s: Option<f64>,
    /// Where instances are journalled (sealed, on local disk) before they are acknowledged;
    /// default: `journal` in the node's data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<PathBuf>,
    /// MiB of objects read lately kept decrypted and verified in memory, so a viewer reading
    /// the same study again costs no decryption or hashing; 0: none.
    #[serde(default = "default_read_cache_mib")]
    pub read_cache_mib: u64,
}

fn default_read_cache_mib() -> u64 {
    256
}

fn default_true() -> bool {
    true
}

fn default_stable_ms() -> u64 {
    3_000
}

/// Everything `medledger node --config FILE` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeConfig {
    pub chain: String,
    pub org: String,
    pub data_dir: PathBuf,
    pub p2p: SocketAddr,
    pub api: SocketAddr,
    /// This node's consensus and p2p secret key (hex of 32 bytes). Keep the file private.
    pub consensus_key: String,
    pub peers: Vec<PeerConfig>,
    pub genesis: Genesis,
    /// The imaging service; a node without it runs the ledger only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imaging: Option<ImagingConfig>,
    /// HTTPS for the API (ledger API and DICOMweb) on an address of its own: what browsers
    /// and clients on other machines use. `api` stays plain HTTP, for this machine's tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<HttpsConfig>,
}

/// Where and with which certificate the API is served over HTTPS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HttpsConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let cfg: NodeConfig = serde_json::from_str(&text)
            .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        cfg.private_key()?;
        for p in &cfg.peers {
            public_key(&p.key)?;
        }
        if !cfg.peers.iter().any(|p| p.org == cfg.org) {
            return Err(ConfigError::Invalid(format!(
                "{}: this node ({}) is not among its peers",
                path.display(),
                cfg.org
            )));
        }
        Ok(cfg)
    }

    pub fn private_key(&self) -> Result<PrivateKey, ConfigError> {
        let bytes = hex::decode(&self.consensus_key)
            .map_err(|e| ConfigError::Invalid(format!("consensus_key: {e}")))?;
        PrivateKey::decode(bytes::Bytes::copy_from_slice(&bytes))
            .map_err(|e| ConfigError::Invalid(format!("consensus_key: {e}")))
    }

    /// The node's folder (the configuration's parent, by `network init`'s layout).
    pub fn blocks_log(&self) -> PathBuf {
        self.data_dir.join("blocks.jsonl")
    }
}

pub fn public_key(hex_key: &str) -> Result<PublicKey, ConfigError> {
    let bytes = hex::decode(hex_key).map_err(|e| ConfigError::Invalid(format!("peer key: {e}")))?;
    PublicKey::decode(bytes::Bytes::copy_from_slice(&bytes))
        .map_err(|e| ConfigError::Invalid(format!("peer key: {e}")))
}

/// An organisation to create: `name` or `name:class` (hospital, research, patient-agent).
pub fn parse_org(spec: &str) -> Result<(String, OrgClass), ConfigError> {
    let (name, class) = match spec.split_once(':') {
        Some((n, c)) => (n, Some(c)),
        None => (spec, None),
    };
    medledger_ledger::check_org_id(name).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let class = match class {
        Some("hospital") => OrgClass::Hospital,
        Some("research") => OrgClass::Research,
        Some("patient-agent") | Some("patients") => OrgClass::PatientAgent,
        Some(other) => {
            return Err(ConfigError::Invalid(format!(
                "organisation class {other:?}: hospital, research or patient-agent"
            )));
        }
        None if name.contains("research") => OrgClass::Research,
        None if name.contains("patient") => OrgClass::PatientAgent,
        None => OrgClass::Hospital,
    };
    Ok((name.to_string(), class))
}

/// What `network init` made.
#[derive(Debug)]
pub struct InitOutcome {
    pub configs: Vec<PathBuf>,
}

/// Creates a network's folder: for each organisation its node configuration (consensus key,
/// addresses of every peer), its admin's and its node's ledger signing keys, its store and
/// de-identification keys; and the genesis.
/// Ports: p2p `base_port + i`, API (HTTP: ledger API and DICOMweb) `base_port + 100 + i`,
/// DIMSE `base_port + 200 + i`, sharing between nodes `base_port + 300 + i`, and the API over
/// HTTPS `base_port + 400 + i` (certificates from the network's `https-ca.pem`), and DIMSE over
/// TLS `base_port + 500 + i` (the same certificates).
pub fn init_network(
    out: &Path,
    chain: &str,
    orgs: &[(String, OrgClass)],
    base_port: u16,
) -> Result<InitOutcome, ConfigError> {
    if orgs.len() < 4 {
        return Err(ConfigError::Invalid(format!(
            "BFT needs at least 4 organisations to tolerate one faulty (n >= 3f+1); got {}",
            orgs.len()
        )));
    }
    if out.join("genesis.json").exists() {
        return Err(ConfigError::Invalid(format!(
            "{} already holds a network; remove it first",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // Certificates are valid from a day back (clocks differ) for ten years (CA) or three.
    let day = 86_400_000;
    let ca_validity = (now - day, now + 10 * identity::YEAR_MS);
    let validity = (now - day, now + 3 * identity::YEAR_MS);
    let mut consensus = Vec::new();
    let mut genesis_orgs = Vec::new();
    // One linkage key for the consortium: the same patient has the same pseudonym everywhere.
    let linkage = {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        medledger_deid::DeidKey::from_bytes(secret).to_text()
    };
    // One HTTPS authority for the network's API endpoints (P-256: browsers take it), whose
    // certificate users add to their trust store; its key is not kept.
    let https_ca =
        medledger_crypto::https::HttpsAuthority::new(chain, validity).map_err(https_error)?;
    write_public(&out.join("https-ca.pem"), https_ca.cert_pem())?;
    let mut peers = Vec::new();
    for (i, (name, class)) in orgs.iter().enumerate() {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        let key = PrivateKey::decode(bytes::Bytes::copy_from_slice(&seed))
            .expect("any 32 bytes are an ed25519 key");
        let admin = SigningKey::generate();
        let node = SigningKey::generate();
        let ca = OrgCa::new(name, SigningKey::generate(), ca_validity).map_err(invalid)?;
        let mut g = ca
            .genesis_org(
                *class,
                &admin.verifying_key(),
                &node.verifying_key(),
                &["127.0.0.1".to_string(), "localhost".to_string()],
                validity,
            )
            .map_err(invalid)?;
        let dir = out.join(name);
        std::fs::create_dir_all(dir.join("data")).map_err(io(&dir))?;
        write_private(&dir.join("ca.key"), &ca.key.to_text())?;
        write_public(&dir.join("ca.pem"), &g.ca)?;
        write_private(&dir.join("admin.key"), &admin.to_text())?;
        write_public(&dir.join("admin.pem"), &g.admin)?;
        write_private(&dir.join("node.key"), &node.to_text())?;
        write_public(&dir.join("node.pem"), &g.node)?;
        let https = https_ca
            .issue(
                &format!("{name} node"),
                &["localhost".to_string(), "127.0.0.1".to_string()],
                validity,
            )
            .map_err(https_error)?;
        write_public(&dir.join("https.pem"), &https.cert_pem)?;
        write_private(&dir.join("https.key"), &https.key_pem)?;
        let store_key = medledger_crypto::SecretKey::generate();
        write_private(&dir.join("store.key"), &store_key.to_text())?;
        g.store_key = Some(store_key.public().to_text());
        write_private(&dir.join("linkage.key"), &linkage)?;
        let mut deid_secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut deid_secret);
        write_private(
            &dir.join("deid.key"),
            &medledger_deid::DeidKey::from_bytes(deid_secret).to_text(),
        )?;
        genesis_orgs.push(g);
        peers.push(PeerConfig {
            org: name.clone(),
            key: hex::encode(key.public_key().encode()),
            p2p: SocketAddr::from(([127, 0, 0, 1], base_port + i as u16)),
            api: SocketAddr::from(([127, 0, 0, 1], base_port + 100 + i as u16)),
            share: Some(SocketAddr::from((
                [127, 0, 0, 1],
                base_port + 300 + i as u16,
            ))),
        });
        consensus.push((name.clone(), dir, hex::encode(seed)));
    }
    let genesis = Genesis {
        chain: chain.to_string(),
        time_ms: now,
        orgs: genesis_orgs,
    };
    let gpath = out.join("genesis.json");
    std::fs::write(
        &gpath,
        serde_json::to_vec_pretty(&genesis).expect("serialises"),
    )
    .map_err(io(&gpath))?;
    let mut configs = Vec::new();
    for (i, ((name, dir, secret), peer)) in consensus.into_iter().zip(&peers).enumerate() {
        let dir = dir.canonicalize().map_err(io(&dir))?;
        let imaging = ImagingConfig {
            dicom: SocketAddr::from(([127, 0, 0, 1], base_port + 200 + i as u16)),
            dicom_tls: Some(SocketAddr::from((
                [127, 0, 0, 1],
                base_port + 500 + i as u16,
            ))),
            dicom_tls_clients: None,
            ae_title: ae_title(&name),
            store: dir.join("store").display().to_string(),
            store_key: dir.join("store.key"),
            deid_key: dir.join("deid.key"),
            signing_key: dir.join("node.key"),
            deid_options: vec![
                "retain-longitudinal-modified-dates".into(),
                "clean-descriptors".into(),
            ],
            stable_ms: default_stable_ms(),
            dicom_peers: Vec::new(),
            share: peer.share,
            node_cert: Some(dir.join("node.pem")),
            linkage_key: Some(dir.join("linkage.key")),
            auto_share: true,
            share_limit_mb_s: None,
            journal: None,
            read_cache_mib: default_read_cache_mib(),
        };
        let cfg = NodeConfig {
            chain: chain.to_string(),
            org: name,
            data_dir: dir.join("data").canonicalize().map_err(io(&dir))?,
            p2p: peer.p2p,
            api: peer.api,
            consensus_key: secret,
            peers: peers.clone(),
            genesis: genesis.clone(),
            imaging: Some(imaging),
            https: Some(HttpsConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], base_port + 400 + i as u16)),
                cert: dir.join("https.pem"),
                key: dir.join("https.key"),
            }),
        };
        let path = dir.join("node.json");
        write_private(
            &path,
            &serde_json::to_string_pretty(&cfg).expect("serialises"),
        )?;
        configs.push(path);
    }
    Ok(InitOutcome { configs })
}

/// An AE title from an organisation's name: upper case, at most 16 characters.
pub fn ae_title(org: &str) -> String {
    org.to_uppercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(16)
        .collect()
}

fn https_error(e: medledger_crypto::CryptoError) -> ConfigError {
    ConfigError::Invalid(format!("cannot make the HTTPS certificates: {e}"))
}

fn invalid(e: medledger_ledger::LedgerError) -> ConfigError {
    ConfigError::Invalid(e.to_string())
}

fn write_public(path: &Path, text: &str) -> Result<(), ConfigError> {
    std::fs::write(path, text).map_err(io(path))
}

fn write_private(path: &Path, text: &str) -> Result<(), ConfigError> {
    std::fs::write(path, format!("{text}\n")).map_err(io(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    }
    Ok(())
}

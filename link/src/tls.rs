//! The job's certificate authority. `atoll coordinator` creates it on first start (in
//! `<run dir>/tls/`), signs a server certificate for its addresses with it, and learners trust
//! that CA and nothing else: a coordinator without the job's key cannot impersonate it.

use anyhow::{anyhow, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The name every server certificate carries and every learner checks, whatever address it dials.
pub const SERVER_NAME: &str = "atoll-coordinator";
/// ALPN of the QUIC data plane.
pub const DATA_ALPN: &[u8] = b"atoll-data/1";

/// The files of a job's TLS material.
#[derive(Debug, Clone)]
pub struct JobTls {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl JobTls {
    pub fn in_dir(dir: &Path) -> Self {
        JobTls {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }

    /// Uses the material in `dir`, or creates a CA and a server certificate valid for `hosts`
    /// (IP addresses or DNS names, besides [`SERVER_NAME`]). Private keys are written 0600.
    pub fn load_or_create(dir: &Path, job: &str, hosts: &[String]) -> Result<Self> {
        let files = JobTls::in_dir(dir);
        if files.server_cert.exists() && files.server_key.exists() && files.ca_cert.exists() {
            return Ok(files);
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("atoll job CA ({job})"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, &ca_key);

        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("atoll coordinator ({job})"));
        for host in hosts {
            let san = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    host.clone()
                        .try_into()
                        .map_err(|e| anyhow!("{host:?} is not a valid host name: {e}"))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        let server_cert = params.signed_by(&server_key, &issuer)?;

        write_private(&files.ca_key, &ca_key.serialize_pem())?;
        write_private(&files.server_key, &server_key.serialize_pem())?;
        std::fs::write(&files.server_cert, server_cert.pem())?;
        // The CA certificate last: its presence marks the material complete.
        std::fs::write(&files.ca_cert, ca_cert.pem())?;
        Ok(files)
    }

    fn server_chain(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let certs = CertificateDer::pem_file_iter(&self.server_cert)
            .with_context(|| format!("reading {}", self.server_cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", self.server_cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(&self.server_key)
            .with_context(|| format!("reading {}", self.server_key.display()))?;
        Ok((certs, key))
    }

    /// The coordinator's rustls configuration (TLS 1.3 only) for the given ALPN protocols.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig> {
        let (certs, key) = self.server_chain()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(config)
    }

    pub fn server_pem(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        Ok((
            std::fs::read(&self.server_cert)?,
            std::fs::read(&self.server_key)?,
        ))
    }
}

/// A learner's rustls configuration: only certificates issued by the job CA in `ca_pem` are
/// accepted.
pub fn client_config(ca_pem: &[u8], alpn: &[&[u8]]) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the job CA certificate")?;
    if certs.is_empty() {
        return Err(anyhow!("the job CA file holds no certificate"));
    }
    for cert in certs {
        roots.add(cert).context("adding the job CA certificate")?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide rustls provider (tonic's TLS uses the default one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Writes a file only its owner can read (keys, secrets).
pub fn write_private(path: &Path, pem: &str) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

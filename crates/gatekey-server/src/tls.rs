//! The control plane's TLS identity: a configured certificate, or on first
//! start a self-signed CA (DATA_DIR/tls/ca.pem, for agents' `ca_cert` and the
//! CLI's `--ca-cert`) and a server certificate it signs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::PrivateKeyDer;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("cannot create the self-signed certificate: {0}")]
    Generate(String),
    #[error("invalid TLS certificate or key: {0}")]
    Invalid(String),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Paths of the self-signed material under the data directory.
pub struct SelfSigned {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl SelfSigned {
    pub fn in_dir(data_dir: &Path) -> SelfSigned {
        let dir = data_dir.join("tls");
        SelfSigned {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        }
    }
}

/// Builds the server's rustls configuration, generating the self-signed
/// certificate on first start. Returns the CA path when self-signed.
pub fn server_config(
    config: &Config,
) -> Result<(Arc<rustls::ServerConfig>, Option<PathBuf>), TlsError> {
    let (cert_path, key_path, ca) = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone(), None),
        _ => {
            let s = SelfSigned::in_dir(&config.data_dir);
            if !s.cert.exists() || !s.key.exists() {
                generate(&s, &config.tls_san)?;
            }
            (s.cert, s.key, Some(s.ca_cert))
        }
    };
    let certs = gatekey_proto::transport::load_certs(&cert_path)
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
    let key_pem = std::fs::read(&key_path).map_err(|e| file_err(&key_path, e))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| file_err(&key_path, e))?
        .ok_or_else(|| file_err(&key_path, "no private key in the file"))?;
    let mut tls =
        rustls::ServerConfig::builder_with_provider(gatekey_proto::transport::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(tls), ca))
}

fn generate(s: &SelfSigned, extra_names: &[String]) -> Result<(), TlsError> {
    let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let dir = s.ca_cert.parent().expect("tls dir");
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;

    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "gatekey control plane CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let ca_pem_key = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(gen_err)?;

    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(h) = nix_hostname() {
        names.push(h);
    }
    names.extend(extra_names.iter().cloned());
    names.dedup();
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::new(names).map_err(gen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "gatekey control plane");
    params.distinguished_name = dn;
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let cert = params.signed_by(&key, &ca).map_err(gen_err)?;

    write_file(&s.ca_cert, ca.pem().as_bytes(), 0o644)?;
    write_file(&s.ca_key, ca_pem_key.as_bytes(), 0o600)?;
    write_file(
        &s.cert,
        format!("{}{}", cert.pem(), ca.pem()).as_bytes(),
        0o644,
    )?;
    write_file(&s.key, key.serialize_pem().as_bytes(), 0o600)?;
    tracing::info!(ca = %s.ca_cert.display(), "generated a self-signed TLS certificate; clients trust it with --ca-cert / ca_cert");
    Ok(())
}

fn nix_hostname() -> std::io::Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let h = h.trim().to_string();
    if h.is_empty() {
        Err(std::io::Error::other("empty hostname"))
    } else {
        Ok(h)
    }
}

/// Writes a file with `mode`, created with that mode so a secret is never world-readable.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(data).map_err(|e| file_err(path, e))
}

//! Dialing the control plane: TLS client configuration and WebSocket connect,
//! shared by the agent and the admin client. Errors are classified so a user
//! is told whether the server was unreachable, untrusted or refused them.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::readahead::ReadAhead;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A control plane address: `https://host[:port]` (or `wss://`).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// The URL as given, without a trailing slash.
    pub url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid control plane URL {0:?}: use https://HOST[:PORT]")]
    InvalidUrl(String),
    #[error("cannot read CA certificate {path}: {detail}")]
    CaCert { path: String, detail: String },
    #[error("cannot reach {addr}: {source}")]
    Unreachable { addr: String, source: io::Error },
    #[error("timed out connecting to {0}")]
    Timeout(String),
    #[error("TLS certificate of {addr} is not trusted ({detail})")]
    Untrusted { addr: String, detail: String },
    #[error("TLS handshake with {addr} failed: {detail}")]
    Tls { addr: String, detail: String },
    #[error("HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, TransportError> {
        let bad = || TransportError::InvalidUrl(url.to_string());
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        let default_port = match uri.scheme_str() {
            Some("https") | Some("wss") => 443,
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Endpoint {
            host,
            port: authority.port_u16().unwrap_or(default_port),
            url: url.trim_end_matches('/').to_string(),
        })
    }

    /// `host:port`, bracketing IPv6 addresses.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `wss://host:port{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("wss://{}{}", self.authority(), path)
    }
}

/// The crypto provider every gatekey TLS configuration uses: ring's suites,
/// AES-128-GCM first. It is TLS 1.3's mandatory suite and what Go, BoringSSL
/// and the browsers prefer; it runs 10 AES rounds per block instead of 14,
/// and every byte of a session is encrypted twice and decrypted twice on its
/// way (the gain is in docs/performance.md). Clients choose (rustls servers
/// follow the client's order), so gatekey's own agent and CLI ask for it
/// first.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| !is_aes128_gcm(s.suite()));
    Arc::new(provider)
}

fn is_aes128_gcm(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite,
        S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let err = |detail: String| TransportError::CaCert {
        path: path.display().to_string(),
        detail,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// A TLS client configuration that trusts `ca_cert` when given, the system's
/// roots otherwise.
pub fn client_config(ca_cert: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|e| TransportError::CaCert {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
            }
        }
        None => {
            // Unreadable system certificates are skipped; a missing root shows up as "not trusted".
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens a TCP connection (no Nagle delay) and completes the TLS handshake.
pub async fn connect_tls(
    endpoint: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream<Tcp>, TransportError> {
    let addr = endpoint.authority();
    let work = async {
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|source| TransportError::Unreachable {
                addr: addr.clone(),
                source,
            })?;
        tcp.set_nodelay(true).ok();
        let name = ServerName::try_from(endpoint.host.clone())
            .map_err(|_| TransportError::InvalidUrl(endpoint.url.clone()))?;
        TlsConnector::from(tls)
            .connect(name, ReadAhead::new(tcp))
            .await
            .map_err(|e| classify_tls(&addr, e))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| TransportError::Timeout(addr.clone()))?
}

fn classify_tls(addr: &str, e: io::Error) -> TransportError {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        if let rustls::Error::InvalidCertificate(detail) = tls {
            return TransportError::Untrusted {
                addr: addr.to_string(),
                detail: format!("{detail:?}"),
            };
        }
        return TransportError::Tls {
            addr: addr.to_string(),
            detail: tls.to_string(),
        };
    }
    TransportError::Unreachable {
        addr: addr.to_string(),
        source: e,
    }
}

/// A WebSocket to the control plane over TLS.
pub type WsStream = WebSocketStream<TlsStream<Tcp>>;

/// A TCP connection as TLS runs on it.
pub type Tcp = ReadAhead<TcpStream>;

/// Connects and upgrades to a WebSocket on `path` (with query), sending
/// `headers` and offering `protocols`. Returns the negotiated subprotocol.
pub async fn connect_ws(
    endpoint: &Endpoint,
    path: &str,
    headers: &[(&str, String)],
    protocols: &[&str],
    tls: Arc<rustls::ClientConfig>,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<(WsStream, Option<String>), TransportError> {
    let tls_stream = connect_tls(endpoint, tls, timeout).await?;
    let mut request = endpoint
        .ws_url(path)
        .into_client_request()
        .map_err(|e| TransportError::Handshake(e.to_string()))?;
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| TransportError::Handshake(e.to_string()))?;
        let value = http::HeaderValue::from_str(value)
            .map_err(|e| TransportError::Handshake(e.to_string()))?;
        request.headers_mut().insert(name, value);
    }
    if !protocols.is_empty() {
        request.headers_mut().insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_str(&protocols.join(", "))
                .map_err(|e| TransportError::Handshake(e.to_string()))?,
        );
    }
    let handshake = tokio_tungstenite::client_async_with_config(request, tls_stream, Some(config));
    let (ws, response) = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| TransportError::Timeout(endpoint.authority()))?
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                TransportError::Http { status, body }
            }
            other => TransportError::Handshake(other.to_string()),
        })?;
    let protocol = response
        .headers()
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((ws, protocol))
}

/// The peer address of a connected TLS stream, for logs.
pub fn peer_addr(stream: &TlsStream<Tcp>) -> Option<SocketAddr> {
    stream.get_ref().0.get_ref().peer_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes128_gcm_is_preferred_and_no_suite_is_lost() {
        let ours: Vec<_> = crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut defaults: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        defaults.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, defaults);
        // Every AES-128-GCM suite (TLS 1.3 and 1.2) precedes every other one.
        let first_other = ours.iter().position(|s| !is_aes128_gcm(*s)).unwrap();
        assert!(ours[first_other..].iter().all(|s| !is_aes128_gcm(*s)));
    }

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("https://vpn.company.com").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("vpn.company.com", 443));
        let e = Endpoint::parse("https://127.0.0.1:8443/").unwrap();
        assert_eq!(e.authority(), "127.0.0.1:8443");
        assert_eq!(e.url, "https://127.0.0.1:8443");
        let e = Endpoint::parse("https://[::1]:9000").unwrap();
        assert_eq!(e.authority(), "[::1]:9000");
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("vpn.company.com").is_err());
    }
}

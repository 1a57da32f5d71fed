//! An agent simulator: many real agent-link connections from one process,
//! for capacity and fan-out measurements. Each simulated agent completes the
//! real hello/welcome handshake over TLS and answers every exec with exit 0.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gatekey_proto::link::{self, Exit, Frame, Hello, control::Msg, exit};
use gatekey_proto::mux::{Incoming, Mux, MuxConfig, Side};
use gatekey_proto::transport::{self, Endpoint};
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// One simulated agent's identity.
#[derive(Clone, Debug)]
pub struct SimAgent {
    pub name: String,
    pub agent_type: String,
    pub token: String,
}

/// Connects one simulated agent from `source` (a loopback address, so many
/// thousands of connections are not limited by one address's port range).
pub async fn connect(
    endpoint: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    source: Option<IpAddr>,
    agent: &SimAgent,
) -> Result<Mux, String> {
    let addr: SocketAddr = tokio::net::lookup_host(endpoint.authority())
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let tcp = tokio::time::timeout(Duration::from_secs(30), socket.connect(addr))
        .await
        .map_err(|_| "connect timed out")?
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).ok();
    let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| e.to_string())?;
    let tls_stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut request = endpoint
        .ws_url(link::AGENT_PATH)
        .into_client_request()
        .map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", agent.token)
            .parse()
            .map_err(|_| "bad token")?,
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(gatekey_proto::limits::MAX_LINK_MESSAGE));
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, tls_stream, Some(config))
            .await
            .map_err(|e| e.to_string())?;
    let hello = Hello {
        min_version: link::MIN_VERSION,
        max_version: link::MAX_VERSION,
        name: agent.name.clone(),
        agent_type: agent.agent_type.clone(),
        agent_version: format!("{}-sim", gatekey_proto::VERSION),
        session_enabled: true,
        capabilities: vec!["exec".into()],
        ..Default::default()
    };
    ws.send(Message::Binary(link::encode_control(Msg::Hello(hello))))
        .await
        .map_err(|e| e.to_string())?;
    let welcome = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .map_err(|_| "no welcome")?;
    let interval = match welcome {
        Some(Ok(Message::Binary(b))) => match link::decode(b) {
            Ok(Frame::Control(Msg::Welcome(w))) => {
                Duration::from_millis(w.heartbeat_interval_ms.max(1000) as u64)
            }
            other => return Err(format!("expected welcome, got {other:?}")),
        },
        other => return Err(format!("expected welcome, got {other:?}")),
    };
    let cfg = MuxConfig {
        heartbeat_interval: interval,
        heartbeat_timeout: interval * 3,
        out_queue: 8,
        accept_queue: 8,
        ..MuxConfig::default()
    };
    let (mux, incoming) = Mux::start(ws, cfg, Side::Acceptor);
    if let Some(mut incoming) = incoming {
        tokio::spawn(async move {
            while let Some(Incoming { stream, .. }) = incoming.recv().await {
                // Answer like `true` would: accept, exit 0.
                if stream.accept(0).await.is_ok() {
                    let _ = stream
                        .handle()
                        .send_exit(Exit {
                            status: Some(exit::Status::Code(0)),
                            ..Default::default()
                        })
                        .await;
                }
            }
        });
    }
    Ok(mux)
}

/// TLS settings trusting the test CA.
pub fn tls(ca_cert: &Path) -> Arc<rustls::ClientConfig> {
    transport::client_config(Some(ca_cert)).expect("CA certificate")
}

/// Loopback source address number `i`: 127.0.1.0 upwards, 250 per /24.
pub fn source_addr(i: usize) -> IpAddr {
    let block = i / 20_000;
    IpAddr::from([127, 0, 1 + (block / 250) as u8, 1 + (block % 250) as u8])
}

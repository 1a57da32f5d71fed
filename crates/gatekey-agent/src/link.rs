//! The link to the control plane: dial `wss://HOST:PORT/ws/agent`, say hello,
//! wait for the welcome, serve streams, and reconnect forever with jittered
//! exponential backoff. The agent only ever dials out; it never listens.
//!
//! Every failed attempt is logged as one line saying what went wrong and what
//! to change, because the agent log (`journalctl -u gatekey-hub -f`) is where
//! operators look first.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gatekey_proto::link::{self, Frame, Hello, Welcome, control::Msg};
use gatekey_proto::mux::{Incoming, Mux, MuxConfig, Side};
use gatekey_proto::transport::{self, TransportError, WsStream};
use gatekey_proto::{duration, limits};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, info, warn};

use crate::Error;
use crate::config::Config;
use crate::exec::Executor;

/// WebSocket close codes the control plane uses on agent links.
pub mod close {
    /// The hello's name or type does not match the token's node.
    pub const IDENTITY: u16 = 4003;
    /// The node was deleted.
    pub const NODE_DELETED: u16 = 4004;
    /// Another live agent holds the name, or this one was replaced.
    pub const DUPLICATE: u16 = 4009;
    /// No common link protocol version.
    pub const VERSION: u16 = 4010;
    /// Going away (server or agent shutting down).
    pub const GOING_AWAY: u16 = 1001;
}

/// A link that stayed up this long was healthy: the next failure starts the
/// backoff from the beginning again.
const HEALTHY_LINK: Duration = Duration::from_secs(30);
/// First backoff step.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Heartbeat period when the control plane does not announce one.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// An established link: the welcome has been received.
pub struct Link {
    pub mux: Mux,
    pub incoming: mpsc::Receiver<Incoming>,
    pub welcome: Welcome,
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the control plane closed the connection (code {code}): {reason}")]
    Closed { code: u16, reason: String },
    #[error("no welcome from the control plane within {}", duration::format(*.0))]
    NoWelcome(Duration),
    #[error("protocol error during the handshake: {0}")]
    Protocol(String),
    #[error("the control plane chose link protocol v{0}, which this agent does not speak")]
    Version(u32),
}

impl ConnectError {
    /// One line: what happened and what to do about it.
    pub fn explain(&self, config: &Config) -> String {
        let file = config.file_display();
        match self {
            ConnectError::Transport(e) => match e {
                TransportError::Http { status, body } => explain_http(*status, body, config),
                TransportError::Untrusted { .. } => format!(
                    "{e}: if the control plane uses its own CA (such as the self-signed default, DATA_DIR/tls/ca.pem), \
                     copy that file to this node and set ca_cert in {file}"
                ),
                TransportError::CaCert { .. } => format!("{e}: fix ca_cert in {file}"),
                TransportError::Unreachable { addr, .. } => format!(
                    "{e}: check control_plane_url in {file}, DNS, and that outbound TCP to {addr} is allowed"
                ),
                TransportError::Timeout(addr) => format!(
                    "timed out connecting to {addr} after {}: check the network path and firewalls to the control plane",
                    duration::format(config.connect_timeout)
                ),
                TransportError::Tls { .. } => {
                    format!(
                        "{e}: does control_plane_url in {file} point at the control plane's HTTPS port?"
                    )
                }
                TransportError::Handshake(_) => format!(
                    "{e}: is control_plane_url in {file} the gatekey control plane, and does every proxy on the way pass WebSocket upgrades?"
                ),
                TransportError::InvalidUrl(_) => format!("{e}: fix control_plane_url in {file}"),
            },
            ConnectError::Closed { code, reason } => {
                let reason = if reason.is_empty() {
                    "no reason given".to_string()
                } else {
                    reason.clone()
                };
                match *code {
                    close::IDENTITY => format!(
                        "the control plane refused this agent ({reason}): name and type in {file} must match the node the token was issued for"
                    ),
                    close::NODE_DELETED => format!(
                        "the node was deleted on the control plane ({reason}): create it again and put its new token in {file}"
                    ),
                    close::DUPLICATE => format!(
                        "another agent is connected as {} ({reason}): run only one agent per node",
                        config.name
                    ),
                    close::VERSION => format!(
                        "the control plane does not speak this agent's link protocol v{}–v{} ({reason}): upgrade gatekey-agent or the control plane",
                        link::MIN_VERSION,
                        link::MAX_VERSION
                    ),
                    close::GOING_AWAY => format!("the control plane is shutting down ({reason})"),
                    code => format!(
                        "the control plane closed the connection with code {code}: {reason}"
                    ),
                }
            }
            ConnectError::NoWelcome(_) | ConnectError::Protocol(_) => {
                format!("{self}: is control_plane_url in {file} the gatekey control plane?")
            }
            ConnectError::Version(_) => format!("{self}: upgrade gatekey-agent"),
        }
    }
}

/// Explains an HTTP error the control plane answered instead of upgrading.
fn explain_http(status: u16, body: &str, config: &Config) -> String {
    let file = config.file_display();
    // The control plane answers `{"code", "message"}`; anything else (a proxy's
    // HTML page, say) is shown trimmed.
    #[derive(serde::Deserialize)]
    struct ApiError {
        code: String,
        message: String,
    }
    let detail = match serde_json::from_str::<ApiError>(body) {
        Ok(e) => format!("{}: {}", e.code, e.message),
        Err(_) => {
            let t: String = body
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(200)
                .collect();
            if t.is_empty() {
                "no details".to_string()
            } else {
                t
            }
        }
    };
    match status {
        401 => format!(
            "the control plane rejected the token (HTTP 401, {detail}): check `token` in {file} (it must be the token issued when the node was created; deleting a node revokes it)"
        ),
        403 => format!(
            "the control plane refused this agent (HTTP 403, {detail}): check name, type and token in {file}"
        ),
        404 => format!(
            "the control plane has no agent endpoint at {} (HTTP 404, {detail}): check control_plane_url in {file}, or whether the node was deleted",
            display_url(config)
        ),
        409 => format!(
            "the control plane reports a conflict (HTTP 409, {detail}): is another agent running with this node's token?"
        ),
        s if s >= 500 => format!("the control plane failed (HTTP {s}, {detail}); retrying"),
        s => format!("the control plane answered HTTP {s} ({detail})"),
    }
}

/// `wss://host[:port]/ws/agent`, without the port when it is the default.
pub fn display_url(config: &Config) -> String {
    let Ok(e) = config.endpoint() else {
        return config.control_plane_url.clone();
    };
    if e.port == 443 {
        let host = if e.host.contains(':') {
            format!("[{}]", e.host)
        } else {
            e.host.clone()
        };
        format!("wss://{host}{}", link::AGENT_PATH)
    } else {
        e.ws_url(link::AGENT_PATH)
    }
}

/// The WebSocket settings of the agent link.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(limits::MAX_LINK_MESSAGE))
        .max_frame_size(Some(limits::MAX_LINK_MESSAGE))
        .read_buffer_size(8 * 1024)
}

/// The agent's first message.
pub fn hello(config: &Config) -> Hello {
    Hello {
        min_version: link::MIN_VERSION,
        max_version: link::MAX_VERSION,
        name: config.name.clone(),
        agent_type: config.agent_type.as_str().into(),
        agent_version: gatekey_proto::VERSION.into(),
        session_enabled: config.session_enabled,
        hostname: hostname(),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        max_sessions: config.max_sessions,
        // "pty": interactive consoles (Exec.tty) on pseudo-terminals.
        capabilities: vec!["exec".into(), "pty".into(), "diag".into()],
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or we take the whole buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Dials the control plane and completes the handshake.
pub struct Connector {
    config: Arc<Config>,
    endpoint: transport::Endpoint,
    tls: Arc<rustls::ClientConfig>,
}

impl Connector {
    /// Fails only on a configuration problem (a bad URL, an unreadable `ca_cert`).
    pub fn new(config: Arc<Config>) -> Result<Connector, Error> {
        let endpoint = config.endpoint()?;
        let tls = transport::client_config(config.ca_cert.as_deref())
            .map_err(|e| Error::Tls(e.to_string()))?;
        Ok(Connector {
            config,
            endpoint,
            tls,
        })
    }

    /// One attempt: TLS, WebSocket upgrade, Hello, Welcome.
    pub async fn connect(&self) -> Result<Link, ConnectError> {
        let cfg = &self.config;
        let auth = [("authorization", format!("Bearer {}", cfg.token))];
        let (mut ws, _) = transport::connect_ws(
            &self.endpoint,
            link::AGENT_PATH,
            &auth,
            &[],
            self.tls.clone(),
            ws_config(),
            cfg.connect_timeout,
        )
        .await?;
        let hello = link::encode_control(Msg::Hello(hello(cfg)));
        ws.send(Message::Binary(hello))
            .await
            .map_err(|e| ConnectError::Protocol(format!("sending the hello failed: {e}")))?;
        let welcome = tokio::time::timeout(cfg.connect_timeout, read_welcome(&mut ws))
            .await
            .map_err(|_| ConnectError::NoWelcome(cfg.connect_timeout))??;
        if !(link::MIN_VERSION..=link::MAX_VERSION).contains(&welcome.version) {
            let _ = ws.close(None).await;
            return Err(ConnectError::Version(welcome.version));
        }
        let heartbeat = match welcome.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(ms.into()),
        };
        let mux_config = MuxConfig {
            heartbeat_interval: heartbeat,
            heartbeat_timeout: heartbeat * 3,
            ..MuxConfig::default()
        };
        let (mux, incoming) = Mux::start(ws, mux_config, Side::Acceptor);
        let incoming = incoming.expect("the acceptor side has an accept queue");
        Ok(Link {
            mux,
            incoming,
            welcome,
        })
    }
}

/// The first message after the hello must be a Welcome.
async fn read_welcome(ws: &mut WsStream) -> Result<Welcome, ConnectError> {
    loop {
        let msg = match ws.next().await {
            None => {
                return Err(ConnectError::Protocol(
                    "the connection closed before the welcome".into(),
                ));
            }
            Some(Err(e)) => {
                return Err(ConnectError::Protocol(format!(
                    "reading the welcome failed: {e}"
                )));
            }
            Some(Ok(m)) => m,
        };
        return match msg {
            Message::Binary(raw) => match link::decode(raw) {
                Ok(Frame::Control(Msg::Welcome(w))) => Ok(w),
                Ok(other) => Err(ConnectError::Protocol(format!(
                    "expected a welcome, got {}",
                    frame_kind(&other)
                ))),
                Err(e) => Err(ConnectError::Protocol(e.to_string())),
            },
            Message::Close(Some(frame)) => Err(ConnectError::Closed {
                code: frame.code.into(),
                reason: frame.reason.to_string(),
            }),
            Message::Close(None) => Err(ConnectError::Closed {
                code: 1005,
                reason: String::new(),
            }),
            Message::Text(_) => Err(ConnectError::Protocol(
                "text message on the agent link".into(),
            )),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
    }
}

fn frame_kind(frame: &Frame) -> &'static str {
    match frame {
        Frame::Data(_) => "a data message",
        Frame::Control(Msg::Hello(_)) => "a hello",
        Frame::Control(Msg::Open(_)) => "an open",
        Frame::Control(_) => "a stream control message",
    }
}

/// Exponential backoff with full jitter: each delay is uniform in
/// `[0, min(cap, base·2^attempt)]`, so a fleet that lost the control plane at
/// the same moment does not come back at the same moment.
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
    rng: SystemRandom,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            attempt: 0,
            base,
            cap,
            rng: SystemRandom::new(),
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let mut bytes = [0u8; 8];
        if self.rng.fill(&mut bytes).is_err() {
            // No randomness: fall back to the ceiling, which is still bounded.
            return ceiling;
        }
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(u64::from_le_bytes(bytes) % (ms + 1))
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Runs the agent until `shutdown` resolves: keeps a link up, serves its
/// streams, and on shutdown closes the link and waits until every process it
/// started is dead.
pub async fn run_agent(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let config = Arc::new(config);
    let connector = Connector::new(config.clone())?;
    let executor = Arc::new(Executor::new(config.clone()));
    let file = config.file_display();
    let url = display_url(&config);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Backoff::new(BACKOFF_BASE, config.reconnect_max_backoff);

    info!(
        "gatekey-agent {} starting: {}",
        gatekey_proto::VERSION,
        config.summary()
    );
    if !config.session_enabled {
        info!(
            "remote sessions are disabled on this node: the control plane lists it but cannot run commands here; \
             set session_enabled: true in {file} and restart the agent to allow them"
        );
    }

    let mut announce = true;
    loop {
        // Retries are logged by their failure line; only announce fresh starts.
        if std::mem::take(&mut announce) {
            info!("connecting to {url} as {}", config.name);
        } else {
            debug!("connecting to {url} as {}", config.name);
        }
        let attempt = tokio::select! {
            r = connector.connect() => r,
            () = &mut shutdown => break,
        };
        let delay = match attempt {
            Ok(Link {
                mux,
                incoming,
                welcome,
            }) => {
                let up_since = Instant::now();
                info!(
                    "connected to {url} as {} (agent id {}, WebSocket link protocol v{}); remote sessions {}",
                    config.name,
                    if welcome.agent_id.is_empty() {
                        "unknown"
                    } else {
                        &welcome.agent_id
                    },
                    welcome.version,
                    if config.session_enabled {
                        "enabled"
                    } else {
                        "disabled"
                    },
                );
                let served = async {
                    // The accept queue ends when the link does.
                    executor.serve(incoming).await;
                    mux.closed().await
                };
                let reason = tokio::select! {
                    reason = served => reason,
                    () = &mut shutdown => {
                        info!("shutting down: closing the link to the control plane");
                        mux.close(close::GOING_AWAY, "agent shutting down");
                        break;
                    }
                };
                if up_since.elapsed() >= HEALTHY_LINK {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                warn!(
                    "WebSocket connection lost: {reason}; reconnecting in {}",
                    seconds(delay)
                );
                announce = true;
                delay
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(
                    "WebSocket connection to {url} failed: {}; retrying in {}",
                    e.explain(&config),
                    seconds(delay)
                );
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut shutdown => break,
        }
    }

    // Closing the link ends every session; each kills its process group.
    let running = executor.running();
    if running > 0 {
        info!("waiting for {running} session(s) to stop");
    }
    let bound = config.kill_grace + config.exit_drain_timeout + Duration::from_secs(5);
    let stopped = tokio::join!(
        tokio::time::timeout(bound, executor.wait_idle()),
        // Mux has no join handle: give its writer a moment to send the close frame.
        tokio::time::sleep(Duration::from_millis(100)),
    )
    .0;
    if stopped.is_err() {
        warn!(
            "{} session(s) did not stop within {}",
            executor.running(),
            seconds(bound)
        );
    }
    info!("gatekey-agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut c = Config::new("hub-1", "https://vpn.company.com", "hub_x").unwrap();
        c.path = Some("/etc/gatekey/hub.yaml".into());
        c
    }

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay();
                assert!(d <= c, "{d:?} > {c:?}");
                c.as_secs()
            })
            .collect();
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        // Jitter: delays are not all the same.
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn backoff_never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(3600));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(3600));
        }
    }

    #[test]
    fn explanations_say_what_to_fix() {
        let c = config();
        let e = ConnectError::Transport(TransportError::Http {
            status: 401,
            body: r#"{"code":"unauthenticated","message":"unknown agent token"}"#.into(),
        });
        let s = e.explain(&c);
        assert!(
            s.contains("rejected the token")
                && s.contains("unknown agent token")
                && s.contains("`token` in /etc/gatekey/hub.yaml"),
            "{s}"
        );

        let e = ConnectError::Transport(TransportError::Untrusted {
            addr: "vpn.company.com:443".into(),
            detail: "UnknownIssuer".into(),
        });
        assert!(
            e.explain(&c)
                .contains("set ca_cert in /etc/gatekey/hub.yaml")
        );

        let e = ConnectError::Closed {
            code: close::IDENTITY,
            reason: "token belongs to spoke-2".into(),
        };
        let s = e.explain(&c);
        assert!(
            s.contains("token belongs to spoke-2")
                && s.contains("name and type in /etc/gatekey/hub.yaml"),
            "{s}"
        );
        let e = ConnectError::Closed {
            code: close::DUPLICATE,
            reason: "already connected".into(),
        };
        assert!(
            e.explain(&c)
                .contains("another agent is connected as hub-1")
        );
        let e = ConnectError::Closed {
            code: close::VERSION,
            reason: "server speaks v2".into(),
        };
        assert!(e.explain(&c).contains("upgrade"));
        let e = ConnectError::Closed {
            code: close::NODE_DELETED,
            reason: "gone".into(),
        };
        assert!(e.explain(&c).contains("deleted"));

        let e = ConnectError::Transport(TransportError::Http {
            status: 502,
            body: "<html>\n<b>Bad gateway</b></html>".into(),
        });
        assert!(
            e.explain(&c)
                .contains("HTTP 502, <html> <b>Bad gateway</b></html>")
        );
        for e in [
            ConnectError::NoWelcome(Duration::from_secs(10)),
            ConnectError::Protocol("x".into()),
            ConnectError::Version(9),
        ] {
            assert!(!e.explain(&c).contains('\n'));
        }
    }

    #[test]
    fn urls_for_logs() {
        assert_eq!(display_url(&config()), "wss://vpn.company.com/ws/agent");
        let c = Config::new("hub-1", "https://127.0.0.1:8443/", "hub_x").unwrap();
        assert_eq!(display_url(&c), "wss://127.0.0.1:8443/ws/agent");
    }

    #[test]
    fn hello_describes_the_node() {
        let mut c = config();
        c.session_enabled = true;
        let h = hello(&c);
        assert_eq!(
            (h.min_version, h.max_version),
            (link::MIN_VERSION, link::MAX_VERSION)
        );
        assert_eq!(h.name, "hub-1");
        assert_eq!(h.agent_type, "hub");
        assert!(h.session_enabled);
        assert_eq!(h.max_sessions, 32);
        assert_eq!(h.capabilities, vec!["exec", "pty", "diag"]);
        assert_eq!(h.os, std::env::consts::OS);
        assert!(!h.hostname.is_empty());
    }
}

//! An agent simulator: many real agent-link connections from one process,
//! for capacity, reconnect-storm and fan-out measurements. Each simulated
//! agent completes the real hello/welcome handshake over TLS, answers every
//! exec with exit 0, and (in a [`Fleet`]) reconnects after losing its link
//! the way the real agent does.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gatekey_agent::link::Backoff;
use gatekey_proto::link::{self, Exit, Frame, Hello, control::Msg, exit};
use gatekey_proto::mux::{Incoming, Mux, MuxConfig, Side};
use gatekey_proto::transport::{self, Endpoint};
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The real agent's reconnect policy (crates/gatekey-agent/src/link.rs):
/// full-jitter exponential backoff starting at 1 s, capped at the default
/// `reconnect_max_backoff` (60 s), reset after a link that stayed up 30 s.
/// The delays themselves come from the agent's own [`Backoff`].
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
const HEALTHY_LINK: Duration = Duration::from_secs(30);
/// The agent's default `connect_timeout`, applied per phase as it does.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| e.to_string())?;
    // TCP and TLS share one timeout, like the agent's transport::connect_tls.
    let tls_stream = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = socket.connect(addr).await.map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).ok();
        TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))
    })
    .await
    .map_err(|_| "connect timed out".to_string())??;
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
    let (mut ws, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::client_async_with_config(request, tls_stream, Some(config)),
    )
    .await
    .map_err(|_| "WebSocket upgrade timed out".to_string())?
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
    let welcome = tokio::time::timeout(CONNECT_TIMEOUT, ws.next())
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

/// TLS settings trusting the test CA. Session resumption is off: every real
/// agent is its own process with its own empty session cache, and a fleet
/// sharing one cache would get cheaper handshakes than a real fleet does.
pub fn tls(ca_cert: &Path) -> Arc<rustls::ClientConfig> {
    let mut config = (*transport::client_config(Some(ca_cert)).expect("CA certificate")).clone();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Connections per loopback source address: well inside one address's
/// ephemeral port range (32768–60999 by default) even while a reconnect
/// storm leaves the previous connections' ports in use or in TIME_WAIT.
const PER_SOURCE: usize = 1000;

/// Loopback source address number `i`: 127.0.1.1 upwards, [`PER_SOURCE`]
/// agents per address, 250 addresses per /24.
pub fn source_addr(i: usize) -> IpAddr {
    let block = i / PER_SOURCE;
    IpAddr::from([127, 0, 1 + (block / 250) as u8, 1 + (block % 250) as u8])
}

/// Many simulated agents, each a task that keeps its link up and reconnects
/// like the real agent when it is lost, until the fleet is stopped.
pub struct Fleet {
    shared: Arc<Shared>,
    tasks: tokio::task::JoinSet<()>,
    stop: watch::Sender<bool>,
}

struct Shared {
    /// Reference point of `up_since`.
    epoch: Instant,
    /// Per agent: when its current link was welcomed (µs since `epoch`, at
    /// least 1), or 0 while it has none.
    up_since: Vec<AtomicU64>,
    /// Connection attempts and failed attempts, all agents together.
    attempts: AtomicU64,
    failures: AtomicU64,
    /// The first few distinct failure messages, for the report.
    errors: Mutex<Vec<String>>,
    /// Caps first connections in flight, so a fleet starts at the rate the
    /// control plane accepts instead of overflowing the listen queue at once.
    initial: Semaphore,
}

/// Counters of a fleet at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Attempts {
    pub attempts: u64,
    pub failures: u64,
}

impl Fleet {
    /// Starts one task per agent; agent `i` connects from [`source_addr`]`(i)`.
    /// At most `initial_concurrency` first connections are in flight at once.
    pub fn start(
        endpoint: &Endpoint,
        tls: Arc<rustls::ClientConfig>,
        agents: Vec<SimAgent>,
        initial_concurrency: usize,
    ) -> Fleet {
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            up_since: agents.iter().map(|_| AtomicU64::new(0)).collect(),
            attempts: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            initial: Semaphore::new(initial_concurrency.max(1)),
        });
        let (stop, stopped) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, agent) in agents.into_iter().enumerate() {
            tasks.spawn(run_agent(
                i,
                agent,
                endpoint.clone(),
                tls.clone(),
                shared.clone(),
                stopped.clone(),
            ));
        }
        Fleet {
            shared,
            tasks,
            stop,
        }
    }

    pub fn len(&self) -> usize {
        self.shared.up_since.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Agents with a link that was welcomed at or after `since`.
    pub fn connected_since(&self, since: Instant) -> usize {
        let t = self.micros(since);
        self.shared
            .up_since
            .iter()
            .filter(|u| u.load(Ordering::Relaxed) >= t)
            .count()
    }

    /// For every agent with a link welcomed at or after `since`: how long
    /// after `since` that was.
    pub fn link_times_since(&self, since: Instant) -> Vec<Duration> {
        let t = self.micros(since);
        self.shared
            .up_since
            .iter()
            .map(|u| u.load(Ordering::Relaxed))
            .filter(|&u| u >= t)
            .map(|u| Duration::from_micros(u - t))
            .collect()
    }

    /// Waits until `n` agents have a link welcomed at or after `since`;
    /// returns when that happened (`None`: not within `timeout`).
    pub async fn wait_connected(
        &self,
        since: Instant,
        n: usize,
        timeout: Duration,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.connected_since(since) >= n {
                // The last link came up at most one poll ago: use its own time.
                let last = self.link_times_since(since).into_iter().max()?;
                return Some(since + last);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn attempts(&self) -> Attempts {
        Attempts {
            attempts: self.shared.attempts.load(Ordering::Relaxed),
            failures: self.shared.failures.load(Ordering::Relaxed),
        }
    }

    /// The first few distinct reasons attempts failed.
    pub fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().expect("errors lock").clone()
    }

    /// Closes every link ("going away", as a stopping agent does) and waits
    /// for all tasks to end.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    fn micros(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.shared.epoch).as_micros() as u64).max(1)
    }
}

/// One simulated agent: the real agent's connect/serve/back-off loop.
async fn run_agent(
    i: usize,
    agent: SimAgent,
    endpoint: Endpoint,
    tls: Arc<rustls::ClientConfig>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let source = Some(source_addr(i));
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut permit = Some(shared.initial.acquire().await.expect("semaphore open"));
    loop {
        shared.attempts.fetch_add(1, Ordering::Relaxed);
        let attempt = tokio::select! {
            r = connect(&endpoint, tls.clone(), source, &agent) => r,
            _ = stop.changed() => return,
        };
        drop(permit.take());
        let delay = match attempt {
            Ok(mux) => {
                let up = Instant::now();
                let t = (up.saturating_duration_since(shared.epoch).as_micros() as u64).max(1);
                shared.up_since[i].store(t, Ordering::Relaxed);
                let stopping = tokio::select! {
                    _ = mux.closed() => false,
                    _ = stop.changed() => true,
                };
                shared.up_since[i].store(0, Ordering::Relaxed);
                if stopping {
                    mux.close(
                        gatekey_agent::link::close::GOING_AWAY,
                        "agent shutting down",
                    );
                    return;
                }
                if up.elapsed() >= HEALTHY_LINK {
                    backoff.reset();
                }
                backoff.next_delay()
            }
            Err(e) => {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                let mut errors = shared.errors.lock().expect("errors lock");
                if errors.len() < 5 && !errors.contains(&e) {
                    errors.push(e);
                }
                drop(errors);
                backoff.next_delay()
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

//! The agent against a stand-in control plane on a real loopback socket with
//! real TLS: dialing, the handshake, refusals, reconnecting, serving an exec,
//! and shutting down with close code 1001.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gatekey_agent::link::{ConnectError, Connector, close};
use gatekey_agent::{Config, run};
use gatekey_proto::link::{self, Exec, Frame, Hello, Open, Welcome, control::Msg, exit, open};
use gatekey_proto::mux::{Event, Mux, MuxConfig, Side};
use gatekey_proto::transport::TransportError;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const TOKEN: &str = "hub_0123456789abcdef";

/// What the stand-in control plane does with one connection.
#[derive(Clone, Copy)]
enum Plan {
    /// Refuse the upgrade with this HTTP status and JSON body.
    Http(u16, &'static str),
    /// Read the hello, then close with this code and reason.
    CloseAfterHello(u16, &'static str),
    /// Read the hello and never answer.
    Silent,
    /// Welcome the agent and hand the link to the test.
    Welcome,
}

/// What the test learns about one connection.
struct Conn {
    path: String,
    authorization: Option<String>,
    protocol: Option<String>,
    hello: Option<Hello>,
    mux: Option<Mux>,
}

struct ControlPlane {
    url: String,
    ca_cert: PathBuf,
    conns: mpsc::UnboundedReceiver<Conn>,
    dir: PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_material(dir: &std::path::Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();

    std::fs::create_dir_all(dir).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let chain = vec![cert.der().clone(), ca.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(gatekey_proto::transport::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    (ca_path, Arc::new(config))
}

/// Starts a stand-in control plane on 127.0.0.1:0; connection `i` follows
/// `plans[i]` (the last plan repeats).
async fn control_plane(name: &str, plans: Vec<Plan>) -> ControlPlane {
    let dir =
        std::env::temp_dir().join(format!("gatekey-agent-test-{}-{name}", std::process::id()));
    let (ca_cert, tls) = tls_material(&dir);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (tx, conns) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let acceptor = TlsAcceptor::from(tls);
        for i in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let plan = plans[i.min(plans.len() - 1)];
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                serve_conn(tls, plan, tx).await;
            });
        }
    });
    ControlPlane {
        url: format!("https://{addr}"),
        ca_cert,
        conns,
        dir,
    }
}

async fn serve_conn(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    plan: Plan,
    tx: mpsc::UnboundedSender<Conn>,
) {
    let seen = Arc::new(Mutex::new((String::new(), None, None)));
    let s = seen.clone();
    // The signature is tungstenite's; its error type is large by design.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let header = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        *s.lock().unwrap() = (
            req.uri().path().to_string(),
            header("authorization"),
            header("sec-websocket-protocol"),
        );
        if let Plan::Http(status, body) = plan {
            let mut r = ErrorResponse::new(Some(body.to_string()));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            return Err(r);
        }
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async(tls, callback).await;
    let (path, authorization, protocol) = seen.lock().unwrap().clone();
    let mut conn = Conn {
        path,
        authorization,
        protocol,
        hello: None,
        mux: None,
    };
    let Ok(mut ws) = ws else {
        let _ = tx.send(conn);
        return;
    };
    conn.hello = match ws.next().await {
        Some(Ok(Message::Binary(raw))) => match link::decode(raw) {
            Ok(Frame::Control(Msg::Hello(h))) => Some(h),
            other => panic!("expected a hello, got {other:?}"),
        },
        other => panic!("expected a hello, got {other:?}"),
    };
    match plan {
        Plan::Http(..) => unreachable!(),
        Plan::CloseAfterHello(code, reason) => {
            let _ = ws
                .close(Some(CloseFrame {
                    code: code.into(),
                    reason: reason.into(),
                }))
                .await;
            let _ = tx.send(conn);
        }
        Plan::Silent => {
            let _ = tx.send(conn);
            // Hold the connection open without answering until the agent gives up.
            while let Some(Ok(_)) = ws.next().await {}
        }
        Plan::Welcome => {
            let welcome = Welcome {
                version: 1,
                agent_id: "a1b2c3d4".into(),
                server_version: "test".into(),
                heartbeat_interval_ms: 1000,
                max_message_bytes: gatekey_proto::limits::MAX_LINK_MESSAGE as u32,
            };
            ws.send(Message::Binary(link::encode_control(Msg::Welcome(welcome))))
                .await
                .unwrap();
            let cfg = MuxConfig {
                heartbeat_interval: Duration::from_secs(1),
                heartbeat_timeout: Duration::from_secs(3),
                ..MuxConfig::default()
            };
            let (mux, _) = Mux::start(ws, cfg, Side::Opener);
            conn.mux = Some(mux);
            let _ = tx.send(conn);
        }
    }
}

fn agent_config(cp: &ControlPlane) -> Config {
    let mut c = Config::new("hub-1", &cp.url, TOKEN).unwrap();
    c.ca_cert = Some(cp.ca_cert.clone());
    c.session_enabled = true;
    c.reconnect_max_backoff = Duration::from_millis(200);
    c.connect_timeout = Duration::from_secs(5);
    c.kill_grace = Duration::from_millis(300);
    c.exit_drain_timeout = Duration::from_millis(300);
    c
}

async fn next_conn(cp: &mut ControlPlane) -> Conn {
    tokio::time::timeout(Duration::from_secs(20), cp.conns.recv())
        .await
        .expect("the agent (re)connects")
        .expect("server running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_retries_refusals_then_serves_exec_and_shuts_down_cleanly() {
    let mut cp = control_plane(
        "full",
        vec![
            Plan::Http(
                401,
                r#"{"code":"unauthenticated","message":"unknown agent token"}"#,
            ),
            Plan::CloseAfterHello(close::GOING_AWAY, "server restarting"),
            Plan::Welcome,
            Plan::Welcome,
        ],
    )
    .await;
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(run(agent_config(&cp), async {
        let _ = stopped.await;
    }));

    // 1: refused before the upgrade; the agent still sent the right request.
    let c = next_conn(&mut cp).await;
    assert_eq!(c.path, "/ws/agent");
    assert_eq!(
        c.authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(c.protocol, None, "the agent link offers no subprotocol");
    assert!(c.hello.is_none());

    // 2: closed after the hello; the hello describes the node.
    let c = next_conn(&mut cp).await;
    let hello = c.hello.expect("hello");
    assert_eq!(hello.name, "hub-1");
    assert_eq!(hello.agent_type, "hub");
    assert!(hello.session_enabled);
    assert_eq!(
        (hello.min_version, hello.max_version),
        (link::MIN_VERSION, link::MAX_VERSION)
    );
    assert_eq!(hello.agent_version, gatekey_proto::VERSION);
    assert_eq!(hello.capabilities, vec!["exec", "pty", "diag"]);
    assert_eq!(hello.max_sessions, 32);

    // 3: welcomed, then replaced: the agent reconnects.
    let c = next_conn(&mut cp).await;
    let mux = c.mux.expect("link up");
    mux.close(close::DUPLICATE, "replaced by a new connection");

    // 4: welcomed; run a command through the link.
    let c = next_conn(&mut cp).await;
    let mux = c.mux.expect("link up");
    let exec = Exec {
        shell_command: "echo hi; echo oops >&2; exit 7".into(),
        ..Default::default()
    };
    let open = Open {
        user: "admin".into(),
        kind: Some(open::Kind::Exec(exec)),
        ..Default::default()
    };
    let (mut stream, accept) = mux
        .open(open, Duration::from_secs(10))
        .await
        .expect("accepted");
    assert!(accept.pid > 0);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = loop {
        match stream.next().await.expect("events until exit") {
            Event::Data(d) => {
                match d.channel() {
                    link::CH_STDOUT => out.extend_from_slice(&d.payload()),
                    _ => err.extend_from_slice(&d.payload()),
                }
                stream.consumed(d.len());
            }
            Event::Eof(_) => {}
            Event::Exit(x) => break x.status,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(out, b"hi\n");
    assert_eq!(err, b"oops\n");
    assert_eq!(status, Some(exit::Status::Code(7)));

    // Shutdown: the agent closes the link with 1001 and returns.
    stop.send(()).unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), mux.closed())
        .await
        .expect("link closed");
    assert!(reason.contains("agent shutting down"), "{reason}");
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("agent stops")
        .unwrap()
        .expect("clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_running_commands() {
    let mut cp = control_plane("shutdown", vec![Plan::Welcome]).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(run(agent_config(&cp), async {
        let _ = stopped.await;
    }));
    let mux = next_conn(&mut cp).await.mux.expect("link up");
    let marker = format!(
        "{}.{}",
        800_000 + std::process::id() % 1000,
        std::process::id()
    );
    let exec = Exec {
        shell_command: format!("trap '' TERM HUP; sleep {marker}"),
        ..Default::default()
    };
    let open = Open {
        kind: Some(open::Kind::Exec(exec)),
        ..Default::default()
    };
    let (_stream, accept) = mux
        .open(open, Duration::from_secs(10))
        .await
        .expect("accepted");
    assert!(std::path::Path::new(&format!("/proc/{}", accept.pid)).exists());

    stop.send(()).unwrap();
    // `run` returns only once every process it started is dead and reaped.
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("agent stops")
        .unwrap()
        .expect("clean exit");
    let alive = std::fs::read(format!("/proc/{}/cmdline", accept.pid)).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&alive).contains(&marker),
        "the command survived the agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_failures_are_explained() {
    // Closed after the hello with an identity mismatch.
    let cp = control_plane(
        "identity",
        vec![Plan::CloseAfterHello(
            close::IDENTITY,
            "token belongs to node spoke-2",
        )],
    )
    .await;
    let mut config = agent_config(&cp);
    config.path = Some("/etc/gatekey/hub.yaml".into());
    let err = Connector::new(Arc::new(config.clone()))
        .unwrap()
        .connect()
        .await
        .err()
        .expect("refused");
    match &err {
        ConnectError::Closed { code, reason } => {
            assert_eq!(*code, close::IDENTITY);
            assert_eq!(reason, "token belongs to node spoke-2");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.explain(&config)
            .contains("name and type in /etc/gatekey/hub.yaml")
    );

    // Without ca_cert, the control plane's private CA is not trusted.
    let mut untrusting = config.clone();
    untrusting.ca_cert = None;
    let err = Connector::new(Arc::new(untrusting.clone()))
        .unwrap()
        .connect()
        .await
        .err()
        .expect("untrusted");
    assert!(
        matches!(
            err,
            ConnectError::Transport(TransportError::Untrusted { .. })
        ),
        "{err:?}"
    );
    assert!(
        err.explain(&untrusting)
            .contains("set ca_cert in /etc/gatekey/hub.yaml")
    );

    // A server that never welcomes the agent.
    let cp = control_plane("silent", vec![Plan::Silent]).await;
    let mut config = agent_config(&cp);
    config.connect_timeout = Duration::from_millis(500);
    let err = Connector::new(Arc::new(config))
        .unwrap()
        .connect()
        .await
        .err()
        .expect("no welcome");
    assert!(matches!(err, ConnectError::NoWelcome(_)), "{err:?}");

    // Refused before the upgrade.
    let cp = control_plane(
        "http",
        vec![Plan::Http(
            401,
            r#"{"code":"unauthenticated","message":"unknown agent token"}"#,
        )],
    )
    .await;
    let config = agent_config(&cp);
    let err = Connector::new(Arc::new(config.clone()))
        .unwrap()
        .connect()
        .await
        .err()
        .expect("401");
    match &err {
        ConnectError::Transport(TransportError::Http { status, .. }) => assert_eq!(*status, 401),
        other => panic!("{other:?}"),
    }
    let s = err.explain(&config);
    assert!(
        s.contains("rejected the token") && s.contains("unknown agent token"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_console_jobs() {
    let mut cp = control_plane("shutdown-console", vec![Plan::Welcome]).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(run(agent_config(&cp), async {
        let _ = stopped.await;
    }));
    let mux = next_conn(&mut cp).await.mux.expect("link up");
    let marker = format!(
        "{}.{}",
        810_000 + std::process::id() % 1000,
        std::process::id()
    );
    // On a terminal, with job control: the job gets a process group of its
    // own, and ignores the hangup.
    let exec = Exec {
        shell_command: format!("set -m; trap '' HUP; sleep {marker} & echo started; wait"),
        tty: true,
        stdin: true,
        ..Default::default()
    };
    let open = Open {
        kind: Some(open::Kind::Exec(exec)),
        ..Default::default()
    };
    let (mut stream, _) = mux
        .open(open, Duration::from_secs(10))
        .await
        .expect("accepted");
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("started") {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Event::Data(d))) => {
                out.extend_from_slice(&d.payload());
                stream.consumed(d.len());
            }
            other => panic!("expected output, got {other:?}"),
        }
    }
    // The shell and its job.
    assert!(sleeping(&marker).len() >= 2);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("agent stops")
        .unwrap()
        .expect("clean exit");
    assert!(
        sleeping(&marker).is_empty(),
        "the console survived the agent"
    );
}

/// Processes whose command line contains `marker`.
fn sleeping(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

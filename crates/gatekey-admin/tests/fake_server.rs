//! The client library against a small in-process control plane that speaks
//! docs/api.md over real TLS on a loopback port: keep-alive reuse, error
//! mapping, and streaming exec (output, stdin, status, lost sessions,
//! cancellation). The real server's end-to-end tests live elsewhere.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gatekey_admin::api::{ExecRequest, NodeType};
use gatekey_admin::exit;
use gatekey_admin::stream::{self, ExecOptions};
use gatekey_admin::{Client, ClientConfig, ClientError};
use gatekey_proto::channel::{self, Status};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

const KEY: &str = "gka_test";

struct Fake {
    addr: SocketAddr,
    ca: PathBuf,
    /// Sessions the client closed while the command was still "running".
    cancelled: Arc<AtomicUsize>,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Fake {
    async fn start(keep_alive: bool) -> Fake {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gatekey-admin-fake-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (tls, ca_pem) = tls_identity();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancelled = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let counter = cancelled.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| handle(req, counter.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(tls), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Fake {
            addr,
            ca,
            cancelled,
            _dir: TempDir(dir),
        }
    }

    fn config(&self) -> ClientConfig {
        ClientConfig {
            server: format!("https://127.0.0.1:{}", self.addr.port()),
            api_key: Some(KEY.into()),
            ca_cert: Some(self.ca.clone()),
            timeout: Duration::from_secs(10),
        }
    }

    fn client(&self) -> Client {
        Client::new(self.config()).unwrap()
    }
}

fn tls_identity() -> (Arc<rustls::ServerConfig>, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let der_key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config =
        rustls::ServerConfig::builder_with_provider(gatekey_proto::transport::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der_key)
            .unwrap();
    (Arc::new(config), ca.pem())
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Reply {
    reply(status, json!({"code": code, "message": message}))
}

fn agent(id: &str, name: &str, kind: &str, agent_on: bool, cp_on: bool) -> Value {
    json!({
        "id": id, "name": name, "type": kind, "connected": true,
        "connected_at": "2024-01-15T10:30:45Z", "last_seen": "2024-01-15T10:30:45Z",
        "remote_addr": "10.0.0.7:53122", "version": "0.1.0", "hostname": format!("{name}.local"),
        "session_enabled": agent_on && cp_on, "session_enabled_agent": agent_on,
        "session_enabled_control_plane": cp_on,
    })
}

fn agents() -> Vec<Value> {
    vec![
        agent("hub-1", "hub-1", "hub", true, true),
        agent("gw-west", "gateway-west", "gateway", true, false),
        agent("spoke-dc", "spoke-datacenter", "spoke", false, true),
    ]
}

async fn handle(req: Request<Incoming>, cancelled: Arc<AtomicUsize>) -> Result<Reply, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if path == "/api/v1/version" {
        return Ok(reply(
            StatusCode::OK,
            json!({"version": "9.9.9", "link_protocol": [1, 1]}),
        ));
    }
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {KEY}"));
    if !authorized {
        return Ok(api_error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "unknown API key",
        ));
    }
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let find = |r: &str| {
        agents()
            .into_iter()
            .find(|a| a["id"] == r || a["name"] == r)
    };
    let not_found = |r: &str| {
        api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no agent or node named {r}"),
        )
    };
    Ok(match (method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "agents"]) => reply(StatusCode::OK, json!({"items": agents()})),
        ("GET", ["api", "v1", "agents", r]) => find(r)
            .map(|a| reply(StatusCode::OK, a))
            .unwrap_or_else(|| not_found(r)),
        ("POST", ["api", "v1", "agents", r, "exec"]) => {
            if find(r).is_none() {
                return Ok(not_found(r));
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let exec: ExecRequest = serde_json::from_slice(&body).unwrap();
            reply(
                StatusCode::OK,
                json!({"exit_code": 0, "signal": null, "timed_out": false, "duration_ms": 1,
                       "stdout": format!("ran {}\n", exec.command), "stderr": exec.stdin.unwrap_or_default(),
                       "stdout_truncated": false, "stderr_truncated": false}),
            )
        }
        ("POST", ["api", "v1", "mesh", "hubs"]) => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let create: Value = serde_json::from_slice(&body).unwrap();
            if create["name"] == "taken" {
                api_error(StatusCode::CONFLICT, "conflict", "hub taken already exists")
            } else {
                reply(
                    StatusCode::CREATED,
                    json!({"id": create.get("id").cloned().unwrap_or(json!("a1b2c3d4")), "name": create["name"],
                           "type": "hub", "token": "hub_secret", "session_enabled": create.get("session_enabled").cloned().unwrap_or(json!(false)),
                           "created_at": "2024-01-15T10:30:45Z"}),
                )
            }
        }
        ("GET", ["api", "v1", "mesh", "hubs"]) => reply(
            StatusCode::OK,
            json!({"items": [{"id": "a1b2c3d4", "name": "hub-1", "type": "hub", "session_enabled": true,
                              "created_at": "2024-01-15T10:00:00Z", "connected": true, "last_seen": "2024-01-15T10:30:45Z"}]}),
        ),
        ("PATCH", ["api", "v1", "mesh", "hubs", r]) => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let patch: Value = serde_json::from_slice(&body).unwrap();
            reply(
                StatusCode::OK,
                json!({"id": r, "name": "hub-1", "type": "hub", "session_enabled": patch["session_enabled"],
                       "created_at": "2024-01-15T10:00:00Z", "connected": false, "last_seen": null}),
            )
        }
        ("DELETE", ["api", "v1", "mesh", "hubs", "a1b2c3d4"]) => Response::builder()
            .status(204)
            .body(Full::default())
            .unwrap(),
        ("DELETE", ["api", "v1", "mesh", "hubs", r]) => not_found(r),
        ("GET", ["ws", "v1", "agents", r, "exec"]) => {
            let Some(record) = find(r) else {
                return Ok(not_found(r));
            };
            if record["session_enabled_control_plane"] == false {
                return Ok(api_error(
                    StatusCode::FORBIDDEN,
                    "sessions_disabled_control_plane",
                    "sessions are off",
                ));
            }
            if record["session_enabled_agent"] == false {
                // A refusal whose body got lost: the client must work it out.
                return Ok(Response::builder()
                    .status(403)
                    .body(Full::default())
                    .unwrap());
            }
            let metadata: Value =
                serde_json::from_str(&percent_decode(query.strip_prefix("metadata=").unwrap()))
                    .unwrap();
            upgrade(req, metadata, cancelled)
        }
        _ => api_error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16).unwrap(),
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn upgrade(req: Request<Incoming>, metadata: Value, cancelled: Arc<AtomicUsize>) -> Reply {
    let offered = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(offered.contains(channel::V5), "{offered}");
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .unwrap()
        .as_bytes()
        .to_vec();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    tokio::spawn(async move {
        let upgraded = hyper::upgrade::on(req).await.unwrap();
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        session(ws, metadata, cancelled).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(header::SEC_WEBSOCKET_PROTOCOL, channel::V5)
        .body(Full::default())
        .unwrap()
}

fn data(ch: u8, payload: &[u8]) -> Message {
    let mut m = Vec::with_capacity(payload.len() + 1);
    m.push(ch);
    m.extend_from_slice(payload);
    Message::Binary(m.into())
}

/// The "remote commands" of the fake agent.
async fn session<S>(mut ws: WebSocketStream<S>, metadata: Value, cancelled: Arc<AtomicUsize>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let shell = metadata["shell"].as_str().unwrap().to_string();
    let words: Vec<&str> = shell.split(' ').collect();
    match words.as_slice() {
        ["echo", ..] => {
            ws.send(data(channel::STDOUT, b"partial line without newline"))
                .await
                .unwrap();
            ws.send(data(channel::STDERR, b"to stderr\n"))
                .await
                .unwrap();
            ws.send(data(
                channel::STDOUT,
                format!(" stdin={}", metadata["stdin"]).as_bytes(),
            ))
            .await
            .unwrap();
            ws.send(Message::Binary(Status::exit(3, None).to_message().into()))
                .await
                .unwrap();
        }
        ["cat"] => {
            // Echo stdin to stdout until the client half-closes stdin.
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Binary(b) = msg else { continue };
                match b[0] {
                    channel::STDIN => ws.send(data(channel::STDOUT, &b[1..])).await.unwrap(),
                    channel::CLOSE if b.get(1) == Some(&channel::STDIN) => break,
                    _ => {}
                }
            }
            ws.send(Message::Binary(Status::success().to_message().into()))
                .await
                .unwrap();
        }
        ["big", n] => {
            let total: usize = n.parse().unwrap();
            let chunk = vec![b'x'; 256 * 1024];
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                ws.send(data(channel::STDOUT, &chunk[..n])).await.unwrap();
                sent += n;
            }
            ws.send(Message::Binary(Status::success().to_message().into()))
                .await
                .unwrap();
        }
        ["sleep", ..] => {
            let secs = metadata["timeout_seconds"].as_u64().unwrap_or(60);
            ws.send(Message::Binary(
                Status::failure(channel::REASON_TIMEOUT, format!("timed out after {secs}s"))
                    .to_message()
                    .into(),
            ))
            .await
            .unwrap();
        }
        ["drop"] => {
            ws.send(data(channel::STDOUT, b"some output"))
                .await
                .unwrap();
            return; // connection dropped, no status
        }
        ["hang"] => {
            ws.send(data(channel::STDOUT, b"started\n")).await.unwrap();
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    cancelled.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
            return;
        }
        _ => {
            ws.send(Message::Binary(
                Status::failure(channel::REASON_INTERNAL, "unknown command")
                    .to_message()
                    .into(),
            ))
            .await
            .unwrap();
        }
    }
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
}

fn opts(command: &str, stdin: bool) -> ExecOptions {
    ExecOptions {
        command: command.into(),
        timeout: None,
        stdin,
    }
}

#[tokio::test]
async fn requests_share_one_keep_alive_connection() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    assert_eq!(client.version().await.unwrap().version, "9.9.9");
    let agents = client.list_agents(true).await.unwrap();
    assert_eq!(agents.len(), 3);
    assert_eq!(agents[1].name, "gateway-west");
    assert_eq!(
        client.get_agent("spoke-datacenter").await.unwrap().id,
        "spoke-dc"
    );
    let nodes = client.list_nodes(NodeType::Hub).await.unwrap();
    assert_eq!(nodes[0].id, "a1b2c3d4");
    let out = client
        .exec_oneshot(
            "hub-1",
            ExecRequest {
                command: "ip addr".into(),
                timeout_seconds: Some(5),
                stdin: Some("in".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str(), out.exit_code),
        ("ran ip addr\n", "in", Some(0))
    );
    assert_eq!(client.connections_opened(), 1);
}

#[tokio::test]
async fn closed_connections_are_redialled() {
    let fake = Fake::start(false).await;
    let client = fake.client();
    for _ in 0..3 {
        assert_eq!(client.list_agents(false).await.unwrap().len(), 3);
    }
    assert_eq!(client.connections_opened(), 3);
}

#[tokio::test]
async fn node_lifecycle() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let node = client
        .create_node(NodeType::Hub, "hub-9", Some("h9"), Some(true))
        .await
        .unwrap();
    assert_eq!(
        (
            node.id.as_str(),
            node.token.as_deref(),
            node.session_enabled
        ),
        ("h9", Some("hub_secret"), true)
    );
    let e = client
        .create_node(NodeType::Hub, "taken", None, None)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), exit::CONFLICT);
    let node = client
        .update_node(NodeType::Hub, "a1b2c3d4", false)
        .await
        .unwrap();
    assert!(!node.session_enabled);
    client.delete_node(NodeType::Hub, "a1b2c3d4").await.unwrap();
    let e = client.delete_node(NodeType::Hub, "nope").await.unwrap_err();
    assert_eq!(e.exit_code(), exit::NOT_FOUND);
    let e = client
        .create_node(NodeType::Hub, "bad name", None, None)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), exit::INVALID_ARGUMENT);
}

#[tokio::test]
async fn api_errors_map_to_exit_codes() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let e = client.get_agent("missing").await.unwrap_err();
    assert_eq!(
        (e.exit_code(), e.api_code()),
        (exit::NOT_FOUND, Some("not_found"))
    );

    let wrong_key = Client::new(ClientConfig {
        api_key: Some("wrong".into()),
        ..fake.config()
    })
    .unwrap();
    let e = wrong_key.list_agents(false).await.unwrap_err();
    assert_eq!(e.exit_code(), exit::UNAUTHENTICATED);
    assert!(e.to_string().contains("--api-key"), "{e}");

    let no_key = Client::new(ClientConfig {
        api_key: None,
        ..fake.config()
    })
    .unwrap();
    assert!(matches!(
        no_key.list_agents(false).await,
        Err(ClientError::MissingApiKey)
    ));
    assert_eq!(no_key.version().await.unwrap().version, "9.9.9");
}

#[tokio::test]
async fn transport_failures_map_to_exit_codes() {
    let fake = Fake::start(true).await;
    // System roots do not know the fake's CA.
    let untrusted = Client::new(ClientConfig {
        ca_cert: None,
        ..fake.config()
    })
    .unwrap();
    let e = untrusted.version().await.unwrap_err();
    assert_eq!(e.exit_code(), exit::UNTRUSTED, "{e}");
    assert!(e.to_string().contains("--ca-cert FILE"), "{e}");

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let down = Client::new(ClientConfig {
        server: format!("https://127.0.0.1:{port}"),
        ..fake.config()
    })
    .unwrap();
    let e = down.version().await.unwrap_err();
    assert_eq!(e.exit_code(), exit::UNREACHABLE, "{e}");

    let e = Client::new(ClientConfig {
        ca_cert: Some("/nonexistent/ca.pem".into()),
        ..fake.config()
    })
    .unwrap_err();
    assert_eq!(e.exit_code(), exit::FAILURE);
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
}

#[tokio::test]
async fn exec_streams_output_and_exit_code() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let session = client
        .exec_stream("hub-1", opts("echo hi", false))
        .await
        .unwrap();
    assert_eq!(session.protocol(), Some(channel::V5));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = session
        .run(None::<&[u8]>, &mut out, &mut err)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "partial line without newline stdin=false"
    );
    assert_eq!(String::from_utf8(err).unwrap(), "to stderr\n");
    assert_eq!(stream::exit_code(&status), 3);
    assert_eq!(stream::failure_message(&status), None);
}

#[tokio::test]
async fn exec_forwards_stdin_until_eof() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let input: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let session = client
        .exec_stream("hub-1", opts("cat", true))
        .await
        .unwrap();
    let mut out = Vec::new();
    let status = session
        .run(Some(&input[..]), &mut out, tokio::io::sink())
        .await
        .unwrap();
    assert_eq!(stream::exit_code(&status), 0);
    assert!(
        out == input,
        "echoed {} bytes of {}",
        out.len(),
        input.len()
    );
}

/// Prints a throughput figure (fake server included); never asserts one.
/// `GATEKEY_ADMIN_TEST_BYTES` makes the transfer bigger for a measurement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_moves_large_output() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let total = std::env::var("GATEKEY_ADMIN_TEST_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 20);
    let session = client
        .exec_stream("hub-1", opts(&format!("big {total}"), false))
        .await
        .unwrap();
    let mut counter = Counter(0);
    let started = std::time::Instant::now();
    let status = session
        .run(None::<&[u8]>, &mut counter, tokio::io::sink())
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!((stream::exit_code(&status), counter.0), (0, total));
    eprintln!(
        "streamed {} MiB in {secs:.3}s: {:.0} MiB/s",
        total >> 20,
        (total >> 20) as f64 / secs
    );
}

struct Counter(usize);
impl tokio::io::AsyncWrite for Counter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0 += buf.len();
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn exec_timeout_is_124() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let options = ExecOptions {
        command: "sleep 100".into(),
        timeout: Some(Duration::from_secs(2)),
        stdin: false,
    };
    let status = client
        .exec_stream("hub-1", options)
        .await
        .unwrap()
        .run(None::<&[u8]>, tokio::io::sink(), tokio::io::sink())
        .await
        .unwrap();
    assert_eq!(stream::exit_code(&status), exit::REMOTE_TIMEOUT);
    let message = stream::failure_message(&status).unwrap();
    assert!(message.contains("timed out after 2s"), "{message}");
}

#[tokio::test]
async fn dropped_connection_is_session_lost() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let session = client
        .exec_stream("hub-1", opts("drop", false))
        .await
        .unwrap();
    let mut out = Vec::new();
    let e = session
        .run(None::<&[u8]>, &mut out, tokio::io::sink())
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), exit::SESSION_LOST, "{e}");
    assert_eq!(out, b"some output");
}

#[tokio::test]
async fn cancelling_closes_the_session() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let session = client
        .exec_stream("hub-1", opts("hang", false))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(session.run_until(
        None::<&'static [u8]>,
        tokio::io::sink(),
        tokio::io::sink(),
        async {
            let _ = rx.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(()).unwrap();
    let e = run.await.unwrap().unwrap_err();
    assert!(matches!(e, ClientError::Cancelled));
    for _ in 0..100 {
        if fake.cancelled.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never saw the close");
}

#[tokio::test]
async fn refused_sessions_say_how_to_enable_them() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let e = client
        .exec_stream("gateway-west", opts("ls", false))
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), exit::SESSIONS_DISABLED_CONTROL_PLANE);
    assert!(
        e.to_string()
            .contains("gatekey-admin gateway update gw-west --session=true"),
        "{e}"
    );

    // 403 without a body: diagnosed from the agent record.
    let e = client
        .exec_stream("spoke-dc", opts("ls", false))
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), exit::SESSIONS_DISABLED_AGENT, "{e}");
    assert!(e.to_string().contains("/etc/gatekey/spoke.yaml"), "{e}");

    let e = client
        .exec_stream("missing", opts("ls", false))
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), exit::NOT_FOUND, "{e}");
}

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
use gatekey_admin::stream::{
    self, ConsoleMode, ConsoleOptions, Ending, ExecOptions, TerminalInput,
};
use gatekey_admin::{Client, ClientConfig, ClientError};
use gatekey_proto::channel::{self, MetadataCommand, Status, TerminalSize};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        ("GET", ["api", "v1", "sessions"]) => reply(
            StatusCode::OK,
            json!({"sessions": [{"id": "s_3f9c01", "agent": "hub-1", "agent_id": "hub-1", "kind": "console",
                                 "mode": "shared", "users": ["admin", "bob"],
                                 "participants": [{"user": "admin", "mode": "interactive", "remote_addr": "127.0.0.1:5555", "joined_at": "2026-11-22T21:40:00Z"},
                                                  {"user": "bob", "mode": "observe", "remote_addr": "127.0.0.1:5556", "joined_at": "2026-11-22T21:41:02Z"}],
                                 "started_at": "2026-11-22T21:40:00Z", "bytes_in": 120, "bytes_out": 48213}]}),
        ),
        ("DELETE", ["api", "v1", "sessions", "s_3f9c01"]) => Response::builder()
            .status(204)
            .body(Full::default())
            .unwrap(),
        ("DELETE", ["api", "v1", "sessions", id]) => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no session {id}"),
        ),
        ("GET", ["ws", "v1", "agents", r, "console"]) => {
            if find(r).is_none() {
                return Ok(not_found(r));
            }
            let params: Vec<(String, String)> = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), percent_decode(v)))
                .collect();
            let param = |name: &str| {
                params
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            let mut metadata: Value = serde_json::from_str(&param("metadata").unwrap()).unwrap();
            if metadata["command"]["command"] == "busy" && param("force").is_none() {
                return Ok(api_error(
                    StatusCode::CONFLICT,
                    "conflict",
                    "the console of hub-1 is in use by alice since 2026-11-22T21:40:00Z",
                ));
            }
            metadata["console"] = json!(true);
            metadata["mode"] = json!(param("mode"));
            metadata["force"] = json!(param("force"));
            upgrade(req, metadata, cancelled)
        }
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
    if metadata["console"] == true {
        return console(ws, metadata, cancelled).await;
    }
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

/// The fake agent's console: a "PTY" that echoes input (as a terminal in
/// cooked mode would), reports resizes, and exits 7 on `exit` + Enter.
async fn console<S>(mut ws: WebSocketStream<S>, metadata: Value, cancelled: Arc<AtomicUsize>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let program = metadata["command"]["command"].as_str().unwrap_or("");
    if metadata["mode"] == "observe" {
        // An observer must send nothing: not input, not end-of-file.
        ws.send(data(channel::STDOUT, b"observing\n"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => return Some(b[0]),
                    Some(Ok(_)) => continue,
                    _ => return None,
                }
            }
        })
        .await;
        let status = match got {
            Ok(Some(ch)) => Status::failure(
                channel::REASON_INTERNAL,
                format!("observer sent channel {ch}"),
            ),
            _ => Status::success(),
        };
        ws.send(Message::Binary(status.to_message().into()))
            .await
            .unwrap();
    } else if program == "killme" {
        ws.send(data(channel::STDOUT, b"$ ")).await.unwrap();
        ws.send(Message::Binary(
            Status::failure(channel::REASON_KILLED, "session killed by alice")
                .to_message()
                .into(),
        ))
        .await
        .unwrap();
    } else if metadata["tty"] == false {
        // `cat` on pipes: echo until end-of-file, a line on stderr.
        ws.send(data(channel::STDERR, b"pipes\n")).await.unwrap();
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
    } else {
        let mut shown = metadata.clone();
        shown.as_object_mut().unwrap().remove("console");
        ws.send(data(
            channel::STDOUT,
            format!("meta={shown}\r\n$ ").as_bytes(),
        ))
        .await
        .unwrap();
        ws.send(data(channel::STDERR, b"gatekey: bob joined (observe)\n"))
            .await
            .unwrap();
        let mut typed = Vec::new();
        loop {
            let Some(Ok(msg)) = ws.next().await else {
                return;
            };
            let b = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => {
                    cancelled.fetch_add(1, Ordering::SeqCst);
                    let _ = ws.close(None).await;
                    return;
                }
                _ => continue,
            };
            match b[0] {
                channel::STDIN => {
                    typed.extend_from_slice(&b[1..]);
                    ws.send(data(channel::STDOUT, &b[1..])).await.unwrap();
                    if typed.ends_with(b"exit\r") {
                        ws.send(data(channel::STDOUT, b"\r\n")).await.unwrap();
                        ws.send(Message::Binary(Status::exit(7, None).to_message().into()))
                            .await
                            .unwrap();
                        break;
                    }
                }
                channel::RESIZE => {
                    let size: channel::TerminalSize = serde_json::from_slice(&b[1..]).unwrap();
                    ws.send(data(
                        channel::STDOUT,
                        format!("[{}x{}]", size.width, size.height).as_bytes(),
                    ))
                    .await
                    .unwrap();
                }
                other => panic!("unexpected channel {other} from a tty client"),
            }
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

fn tty_options() -> ConsoleOptions {
    ConsoleOptions {
        tty: true,
        term: Some("xterm-256color".into()),
        command: None,
        size: Some(TerminalSize {
            width: 100,
            height: 30,
        }),
        mode: ConsoleMode::Exclusive,
        force: false,
    }
}

/// Reads `reader` until `needle` shows up; returns everything read.
async fn read_until(reader: &mut (impl AsyncReadExt + Unpin), seen: &mut Vec<u8>, needle: &[u8]) {
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while !seen.windows(needle.len()).any(|w| w == needle) {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "output ended before {:?}",
                String::from_utf8_lossy(needle)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "{:?} never came; got {:?}",
        String::from_utf8_lossy(needle),
        String::from_utf8_lossy(seen)
    );
}

#[tokio::test]
async fn console_in_a_terminal() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let session = client.console("hub-1", tty_options()).await.unwrap();
    assert_eq!(session.protocol(), Some(channel::V5));

    let (mut keys, keys_in) = tokio::io::duplex(1024);
    let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
    let (help_w, mut help_r) = tokio::io::duplex(1 << 16);
    let (sizes, resizes) = tokio::sync::watch::channel(TerminalSize {
        width: 100,
        height: 30,
    });
    let mut notices = Vec::new();
    let input = TerminalInput {
        keys: keys_in,
        resizes: Some(resizes),
        escapes: true,
        help: help_w,
        restore_terminal: false,
    };
    let run = session.run_terminal(input, out_w, &mut notices, std::future::pending::<()>());
    let drive = async {
        let mut seen = Vec::new();
        read_until(&mut out_r, &mut seen, b"$ ").await;
        let text = String::from_utf8_lossy(&seen).into_owned();
        let meta: Value = serde_json::from_str(
            text.strip_prefix("meta=")
                .unwrap()
                .split("\r\n")
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(meta["tty"], true);
        assert_eq!(meta["term"], "xterm-256color");
        assert_eq!(
            meta["initialDimensions"],
            json!({"Width": 100, "Height": 30})
        );
        assert_eq!(meta["mode"], Value::Null);

        // Mid-line tildes are text; at a line start ~~ sends one, ~? helps.
        keys.write_all(b"echo a~.b\r").await.unwrap();
        read_until(&mut out_r, &mut seen, b"echo a~.b\r").await;
        keys.write_all(b"~~x~?").await.unwrap();
        read_until(&mut out_r, &mut seen, b"~x~?").await;
        keys.write_all(b"\r~?").await.unwrap();
        let mut help = Vec::new();
        read_until(&mut help_r, &mut help, b"newline.)\r\n").await;
        assert!(help.starts_with(b"~?\r\nSupported escape sequences:\r\n"));

        // Window size changes become resize messages.
        sizes
            .send(TerminalSize {
                width: 120,
                height: 40,
            })
            .unwrap();
        read_until(&mut out_r, &mut seen, b"[120x40]").await;

        // Control keys go through as bytes.
        keys.write_all(b"\x03\x1a\x04").await.unwrap();
        read_until(&mut out_r, &mut seen, b"\x03\x1a\x04").await;

        keys.write_all(b"\rexit\r").await.unwrap();
        read_until(&mut out_r, &mut seen, b"exit\r\r\n").await;
        (keys, out_r)
    };
    let (ending, _) = tokio::join!(run, drive);
    let Ending::Status(status) = ending.unwrap() else {
        panic!("expected the remote status");
    };
    assert_eq!(stream::exit_code(&status), 7);
    assert_eq!(stream::failure_message(&status), None);
    // The notice came while the cursor was after the prompt: own line, CRLF.
    assert_eq!(
        String::from_utf8(notices).unwrap(),
        "\r\ngatekey: bob joined (observe)\r\n"
    );
}

#[tokio::test]
async fn tilde_dot_disconnects() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let session = client.console("hub-1", tty_options()).await.unwrap();
    let input = TerminalInput {
        // Everything after ~. is never sent.
        keys: &b"ls\r~.exit\r"[..],
        resizes: None,
        escapes: true,
        help: tokio::io::sink(),
        restore_terminal: false,
    };
    let mut out = Vec::new();
    let ending = session
        .run_terminal(
            input,
            &mut out,
            tokio::io::sink(),
            std::future::pending::<()>(),
        )
        .await
        .unwrap();
    assert_eq!(ending, Ending::Disconnected);
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("exit"), "{text}");
    for _ in 0..100 {
        if fake.cancelled.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never saw the close");
}

#[tokio::test]
async fn killed_console_is_252_with_the_message() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let options = ConsoleOptions {
        command: Some(MetadataCommand {
            command: "killme".into(),
            args: vec![],
        }),
        ..tty_options()
    };
    let session = client.console("hub-1", options).await.unwrap();
    // Keys that never come: the server ends it first.
    let (_keep, keys) = tokio::io::duplex(64);
    let input = TerminalInput {
        keys,
        resizes: None,
        escapes: true,
        help: tokio::io::sink(),
        restore_terminal: false,
    };
    let ending = session
        .run_terminal(
            input,
            tokio::io::sink(),
            tokio::io::sink(),
            std::future::pending::<()>(),
        )
        .await
        .unwrap();
    let Ending::Status(status) = ending else {
        panic!("expected the remote status");
    };
    assert_eq!(stream::exit_code(&status), exit::SESSION_ENDED);
    assert_eq!(
        stream::failure_message(&status).as_deref(),
        Some("session killed by alice")
    );
}

#[tokio::test]
async fn busy_console_is_a_conflict() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let options = ConsoleOptions {
        command: Some(MetadataCommand {
            command: "busy".into(),
            args: vec![],
        }),
        ..tty_options()
    };
    let e = client.console("hub-1", options.clone()).await.unwrap_err();
    assert_eq!(e.exit_code(), exit::CONFLICT, "{e}");
    assert!(e.to_string().contains("in use by alice since"), "{e}");
    // --force takes it over.
    let forced = ConsoleOptions {
        force: true,
        ..options
    };
    assert!(client.console("hub-1", forced).await.is_ok());

    let e = client.console("missing", tty_options()).await.unwrap_err();
    assert_eq!(e.exit_code(), exit::NOT_FOUND, "{e}");
    let e = client.console("../x", tty_options()).await.unwrap_err();
    assert_eq!(e.exit_code(), exit::INVALID_ARGUMENT, "{e}");
}

#[tokio::test]
async fn console_on_pipes() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let options = ConsoleOptions {
        tty: false,
        command: Some(MetadataCommand {
            command: "cat".into(),
            args: vec![],
        }),
        ..tty_options()
    };
    let session = client.console("hub-1", options).await.unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = session
        .run(Some(&b"line 1\nline 2\n"[..]), &mut out, &mut err)
        .await
        .unwrap();
    assert_eq!(stream::exit_code(&status), 0);
    assert_eq!(out, b"line 1\nline 2\n");
    // No CRLF translation on pipes.
    assert_eq!(err, b"pipes\n");
}

#[tokio::test]
async fn observers_send_nothing() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let options = ConsoleOptions {
        tty: false,
        mode: ConsoleMode::Observe,
        ..tty_options()
    };
    let session = client.console("hub-1", options).await.unwrap();
    let mut out = Vec::new();
    let status = session
        .run(Some(&b"typed\n"[..]), &mut out, tokio::io::sink())
        .await
        .unwrap();
    assert_eq!(status, Status::success(), "{status:?}");
    assert_eq!(out, b"observing\n");
}

#[tokio::test]
async fn live_sessions_list_and_kill() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let sessions = client.list_sessions().await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].id, "s_3f9c01");
    assert_eq!(sessions[0].user_names(), ["admin", "bob"]);
    assert_eq!(sessions[0].participants[1].mode, "observe");
    client.kill_session("s_3f9c01").await.unwrap();
    let e = client.kill_session("s_nope").await.unwrap_err();
    assert_eq!(e.exit_code(), exit::NOT_FOUND);
    assert_eq!(e.to_string(), "no session s_nope");
    let e = client.kill_session("../x").await.unwrap_err();
    assert_eq!(e.exit_code(), exit::INVALID_ARGUMENT);

    // The same through the command line (flags, as scripts pass them).
    let server = format!("https://127.0.0.1:{}", fake.addr.port());
    let ca = fake.ca.display().to_string();
    let cli = |args: &[&str]| {
        let mut all = vec![
            "gatekey-admin",
            "--server",
            &server,
            "--api-key",
            KEY,
            "--ca-cert",
            &ca,
            "-o",
            "json",
        ];
        all.extend_from_slice(args);
        all.into_iter().map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(
        gatekey_admin::cli::run_args(cli(&["session", "kill", "s_3f9c01"])).await,
        exit::OK
    );
    assert_eq!(
        gatekey_admin::cli::run_args(cli(&["session", "kill", "s_nope"])).await,
        exit::NOT_FOUND
    );
}

/// Prints the keystroke echo round trip through the client and the fake
/// (loopback TLS, one WebSocket message each way); never asserts a figure.
#[tokio::test]
async fn console_echo_latency() {
    let fake = Fake::start(true).await;
    let client = fake.client();
    let session = client.console("hub-1", tty_options()).await.unwrap();
    let (mut keys, keys_in) = tokio::io::duplex(1024);
    let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
    let input = TerminalInput {
        keys: keys_in,
        resizes: None,
        escapes: true,
        help: tokio::io::sink(),
        restore_terminal: false,
    };
    let run = session.run_terminal(
        input,
        out_w,
        tokio::io::sink(),
        std::future::pending::<()>(),
    );
    let measure = async {
        let mut seen = Vec::new();
        read_until(&mut out_r, &mut seen, b"$ ").await;
        let mut times = Vec::new();
        let mut buf = [0u8; 64];
        for i in 0..300 {
            let key = [b'a' + (i % 26) as u8];
            let t = std::time::Instant::now();
            keys.write_all(&key).await.unwrap();
            let n = out_r.read(&mut buf).await.unwrap();
            times.push(t.elapsed());
            assert_eq!(&buf[..n], key);
        }
        keys.write_all(b"\rexit\r").await.unwrap();
        read_until(&mut out_r, &mut seen, b"exit\r\r\n").await;
        times.sort();
        eprintln!(
            "console echo round trip (client + fake): p50 {:?}, p99 {:?}",
            times[times.len() / 2],
            times[times.len() * 99 / 100]
        );
        (keys, out_r)
    };
    let (ending, _) = tokio::join!(run, measure);
    assert!(matches!(ending.unwrap(), Ending::Status(_)));
}

//! The client library against a small in-process control plane that speaks
//! docs/api.md over real TLS on a loopback port: keep-alive reuse, error
//! mapping, and streaming exec (output, stdin, status, lost sessions,
//! cancellation). The real server's end-to-end tests live elsewhere.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gatekey_admin::api::{ExecRequest, NodeType};
use gatekey_admin::cli::{Sandbox, SandboxRun};
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
/// The key `POST /api/v1/login` hands out (for bob, "correct horse battery").
const LOGIN_KEY: &str = "gka_fromlogin";
/// A viewer's key: may not manage users.
const VIEWER_KEY: &str = "gka_viewer";
const PASSWORD: &str = "correct horse battery";
/// Records in the fake audit log: seq 1..=AUDIT_RECORDS.
const AUDIT_RECORDS: i64 = 2500;

struct Fake {
    addr: SocketAddr,
    ca: PathBuf,
    /// Sessions the client closed while the command was still "running".
    cancelled: Arc<AtomicUsize>,
    /// What the identity and audit endpoints were sent, and a switch.
    state: Arc<FakeState>,
    _dir: TempDir,
}

#[derive(Default)]
struct FakeState {
    requests: Mutex<Vec<Seen>>,
    /// `GET /api/v1/audit/verify` reports a broken chain.
    audit_broken: AtomicBool,
}

/// One request to the identity or audit endpoints, as the fake saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    authorization: Option<String>,
    body: Value,
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
        let state = Arc::new(FakeState::default());
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let counter = cancelled.clone();
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                let shared = shared.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service =
                        service_fn(move |req| handle(req, counter.clone(), shared.clone()));
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
            state,
            _dir: TempDir(dir),
        }
    }

    fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The identity and audit requests so far, oldest first.
    fn requests(&self) -> Vec<Seen> {
        self.state.requests.lock().unwrap().clone()
    }

    fn forget_requests(&self) {
        self.state.requests.lock().unwrap().clear();
    }

    /// The one request since [`Fake::forget_requests`].
    fn only_request(&self) -> Seen {
        let seen = self.requests();
        assert_eq!(seen.len(), 1, "{seen:#?}");
        seen.into_iter().next().unwrap()
    }

    /// Runs `gatekey-admin --server … --api-key KEY --ca-cert … ARGS` in a
    /// sandbox with `stdin`.
    async fn cli_with(&self, key: &str, stdin: &str, args: &[&str]) -> SandboxRun {
        self.forget_requests();
        let server = self.server();
        let ca = self.ca.display().to_string();
        let mut all = vec![
            "gatekey-admin",
            "--server",
            &server,
            "--api-key",
            key,
            "--ca-cert",
            &ca,
        ];
        all.extend_from_slice(args);
        Sandbox {
            stdin: stdin.as_bytes().to_vec(),
            settings_file: None,
        }
        .run(all)
        .await
    }

    async fn cli(&self, args: &[&str]) -> SandboxRun {
        self.cli_with(KEY, "", args).await
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

/// The run succeeded and printed nothing on stderr.
#[track_caller]
fn ok(run: &SandboxRun) -> &str {
    assert_eq!((run.code, run.stderr.as_str()), (exit::OK, ""), "{run:#?}");
    &run.stdout
}

/// The run failed with `code` and one line on stderr, which is returned.
#[track_caller]
fn failed(run: &SandboxRun, code: i32) -> &str {
    assert_eq!(run.code, code, "{run:#?}");
    assert_eq!(run.stdout, "", "{run:#?}");
    let line = run.stderr.strip_prefix("gatekey-admin: ").expect("prefix");
    assert_eq!(line.lines().count(), 1, "{run:#?}");
    line.trim_end()
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

async fn handle(
    req: Request<Incoming>,
    cancelled: Arc<AtomicUsize>,
    state: Arc<FakeState>,
) -> Result<Reply, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let identity = ["users", "apikeys", "whoami", "login", "logout", "audit"]
        .iter()
        .any(|p| path.starts_with(&format!("/api/v1/{p}")));
    if identity {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let method = req.method().to_string();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let seen = Seen {
            method,
            path,
            query,
            authorization,
            body: if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&body).unwrap()
            },
        };
        state.requests.lock().unwrap().push(seen.clone());
        return Ok(identity_routes(&seen, &state));
    }
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

fn no_content() -> Reply {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::default())
        .unwrap()
}

fn user(name: &str, role: &str, scopes: Value, has_password: bool) -> Value {
    json!({"id": format!("u_{name}"), "name": name, "role": role, "scopes": scopes,
           "has_password": has_password, "created_at": "2026-11-01T10:00:00Z",
           "updated_at": "2026-11-01T10:00:00Z"})
}

fn api_keys() -> Vec<Value> {
    vec![
        json!({"id": "k_1", "user": "bob", "name": "laptop", "prefix": "gka_k_1", "scopes": [],
               "kind": "api", "created_at": "2026-11-01T10:00:00Z", "expires_at": "2999-01-01T00:00:00Z",
               "revoked_at": null, "last_used_at": "2026-11-02T09:00:00Z"}),
        json!({"id": "k_2", "user": "bob", "name": "ci", "prefix": "gka_k_2", "scopes": ["hub:*"],
               "kind": "api", "created_at": "2026-11-01T10:00:00Z", "expires_at": null,
               "revoked_at": "2026-11-03T10:00:00Z", "last_used_at": null}),
        json!({"id": "k_3", "user": "alice", "name": "login", "prefix": "gka_k_3", "scopes": [],
               "kind": "login", "created_at": "2026-11-01T10:00:00Z", "expires_at": "2020-01-01T00:00:00Z",
               "revoked_at": null, "last_used_at": null}),
    ]
}

/// Record `seq` of the fake audit log: every third a closed exec session
/// on hub-1 by bob, the others execs and logins.
fn audit_record(seq: i64) -> Value {
    let time = format!("2026-11-23T00:{:02}:{:02}.000Z", seq / 60, seq % 60);
    let (action, agent, detail) = match seq % 3 {
        0 => (
            "session.closed",
            json!("hub-1"),
            json!({"kind": "exec", "command": "ip addr", "exit_code": 0, "duration_ms": 12,
                   "bytes_in": 0, "bytes_out": 1432}),
        ),
        1 => (
            "exec",
            json!("spoke-dc"),
            json!({"command": "uptime", "exit_code": 1}),
        ),
        _ => ("auth.login", Value::Null, json!({"client": "cli"})),
    };
    json!({"seq": seq, "time": time, "action": action, "outcome": "ok", "user": "bob",
           "remote_addr": "10.0.0.5:51234", "agent": agent, "session_id": null, "detail": detail,
           "prev_hash": format!("h{}", seq - 1), "hash": format!("h{seq}")})
}

fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

/// The audit records matching the query's action filter, oldest first.
fn audit_matching(params: &[(String, String)]) -> impl DoubleEndedIterator<Item = Value> {
    let action = params
        .iter()
        .find(|(k, _)| k == "action")
        .map(|(_, v)| v.clone());
    (1..=AUDIT_RECORDS).map(audit_record).filter(move |r| {
        let a = r["action"].as_str().unwrap();
        action
            .as_deref()
            .is_none_or(|want| a == want || a.starts_with(&format!("{want}.")))
    })
}

/// Users, API keys, login and the audit log (docs/api.md).
fn identity_routes(seen: &Seen, state: &FakeState) -> Reply {
    let segments: Vec<&str> = seen.path.trim_start_matches('/').split('/').collect();
    let params = query_params(&seen.query);
    let body = &seen.body;
    if let ("POST", ["api", "v1", "login"]) = (seen.method.as_str(), segments.as_slice()) {
        assert_eq!(seen.authorization, None, "login carries no key");
        return if body["user"] == "bob" && body["password"] == PASSWORD && body["client"] == "cli" {
            reply(
                StatusCode::CREATED,
                json!({"id": "k_login", "user": "bob", "name": "login", "prefix": "gka_k_login",
                       "scopes": [], "kind": "login", "created_at": "2026-11-23T10:00:00Z",
                       "expires_at": "2026-11-23T22:00:00Z", "revoked_at": null,
                       "last_used_at": null, "key": LOGIN_KEY}),
            )
        } else {
            api_error(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "invalid user or password",
            )
        };
    }
    let key = seen
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "));
    if !matches!(key, Some(KEY | LOGIN_KEY | VIEWER_KEY)) {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "unknown API key",
        );
    }
    if key == Some(VIEWER_KEY) && matches!(segments.as_slice(), ["api", "v1", "users", ..]) {
        return api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "user carol (viewer) may not manage users and keys",
        );
    }
    match (seen.method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "users"]) => reply(
            StatusCode::OK,
            json!({"items": [user("admin", "admin", json!([]), false),
                             user("bob", "operator", json!(["spoke:dc-*"]), true)]}),
        ),
        ("POST", ["api", "v1", "users"]) if body["name"] == "admin" => api_error(
            StatusCode::CONFLICT,
            "conflict",
            "user admin already exists",
        ),
        ("POST", ["api", "v1", "users"]) => reply(
            StatusCode::CREATED,
            user(
                body["name"].as_str().unwrap(),
                body["role"].as_str().unwrap(),
                body.get("scopes").cloned().unwrap_or(json!([])),
                body.get("password").is_some_and(Value::is_string),
            ),
        ),
        ("PATCH", ["api", "v1", "users", name]) => {
            let mut u = user(name, "operator", json!(["spoke:dc-*"]), true);
            for field in ["role", "scopes"] {
                if let Some(v) = body.get(field) {
                    u[field] = v.clone();
                }
            }
            if let Some(pw) = body.get("password") {
                u["has_password"] = json!(pw.is_string());
            }
            reply(StatusCode::OK, u)
        }
        ("DELETE", ["api", "v1", "users", "admin"]) => api_error(
            StatusCode::CONFLICT,
            "conflict",
            "the last admin cannot be deleted",
        ),
        ("DELETE", ["api", "v1", "users", "bob"]) => no_content(),
        ("DELETE", ["api", "v1", "users", name]) => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no user named {name:?}"),
        ),
        ("POST", ["api", "v1", "apikeys"]) => {
            let user = body["user"].as_str().unwrap_or("admin");
            let expires = body["expires_in_seconds"]
                .as_u64()
                .map(|_| json!("2026-12-01T10:00:00Z"))
                .unwrap_or(Value::Null);
            reply(
                StatusCode::CREATED,
                json!({"id": "k_new", "user": user, "name": body["name"].as_str().unwrap_or("api"),
                       "prefix": "gka_k_new", "scopes": body.get("scopes").cloned().unwrap_or(json!([])),
                       "kind": "api", "created_at": "2026-11-01T10:00:00Z", "expires_at": expires,
                       "revoked_at": null, "last_used_at": null, "key": "gka_k_newSECRET"}),
            )
        }
        ("GET", ["api", "v1", "apikeys"]) => {
            let user = params.iter().find(|(k, _)| k == "user").map(|(_, v)| v);
            let items: Vec<Value> = api_keys()
                .into_iter()
                .filter(|k| user.is_none_or(|u| k["user"] == u.as_str()))
                .collect();
            reply(StatusCode::OK, json!({ "items": items }))
        }
        ("DELETE", ["api", "v1", "apikeys", "k_1"]) => no_content(),
        ("DELETE", ["api", "v1", "apikeys", id]) => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no API key {id:?}: see `gatekey-admin apikey list`"),
        ),
        ("GET", ["api", "v1", "whoami"]) => reply(
            StatusCode::OK,
            json!({"user": user("bob", "operator", json!(["spoke:dc-*"]), true),
                   "key": {"id": "k_login", "user": "bob", "name": "login", "prefix": "gka_k_login",
                           "scopes": [], "kind": "login", "created_at": "2026-11-23T10:00:00Z",
                           "expires_at": "2026-11-23T22:00:00Z", "revoked_at": null, "last_used_at": null},
                   "via": "api_key"}),
        ),
        ("POST", ["api", "v1", "logout"]) => no_content(),
        ("GET", ["api", "v1", "audit"]) => {
            let get = |name: &str| {
                params
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.parse::<i64>().unwrap())
            };
            let limit = get("limit").unwrap_or(100);
            if !(1..=1000).contains(&limit) {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    "limit must be between 1 and 1000",
                );
            }
            let before = get("before").unwrap_or(i64::MAX);
            let items: Vec<Value> = audit_matching(&params)
                .rev()
                .filter(|r| r["seq"].as_i64().unwrap() < before)
                .take(limit as usize)
                .collect();
            let next_before =
                (items.len() as i64 == limit).then(|| items.last().unwrap()["seq"].clone());
            reply(
                StatusCode::OK,
                json!({"items": items, "next_before": next_before}),
            )
        }
        ("GET", ["api", "v1", "audit", "verify"]) => {
            let mut v = json!({"ok": true, "records": AUDIT_RECORDS, "first_seq": 1,
                               "last_seq": AUDIT_RECORDS, "head_hash": format!("h{AUDIT_RECORDS}"),
                               "anchor": null});
            if state.audit_broken.load(Ordering::SeqCst) {
                v["ok"] = json!(false);
                v["first_bad_seq"] = json!(17);
                v["problem"] = json!("record 17 was changed after it was written");
            }
            reply(StatusCode::OK, v)
        }
        ("GET", ["api", "v1", "audit", "export"]) => {
            let mut out = String::new();
            for r in audit_matching(&params) {
                out.push_str(&r.to_string());
                out.push('\n');
            }
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .body(Full::new(Bytes::from(out)))
                .unwrap()
        }
        _ => api_error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    }
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

// ---- users, API keys, login, whoami, audit: through the command line ----

#[tokio::test]
async fn user_create_sends_role_scopes_and_password() {
    let fake = Fake::start(true).await;
    let stdin = format!("{PASSWORD}\n");
    let run = fake
        .cli_with(
            KEY,
            &stdin,
            &[
                "user",
                "create",
                "bob",
                "--role",
                "operator",
                "--scope",
                "spoke:dc-*",
                "--scope",
                "hub:lab-?",
                "--password-stdin",
            ],
        )
        .await;
    assert_eq!(
        ok(&run),
        "Created user bob (operator), reaching spoke:dc-*,hub:lab-?; it may log in with `gatekey-admin login --user bob`.\n"
    );
    let seen = fake.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/api/v1/users")
    );
    assert_eq!(seen.authorization.as_deref(), Some("Bearer gka_test"));
    assert_eq!(
        seen.body,
        json!({"name": "bob", "role": "operator", "scopes": ["spoke:dc-*", "hub:lab-?"], "password": PASSWORD})
    );

    // --password reads stdin when it is not a terminal; the line ending
    // goes, spaces stay.
    let run = fake
        .cli_with(
            KEY,
            " spaced password \r\n",
            &["user", "create", "carol", "--role", "viewer", "--password"],
        )
        .await;
    ok(&run);
    assert_eq!(fake.only_request().body["password"], " spaced password ");

    // No password: none sent; -o json prints the server's object.
    let run = fake
        .cli(&["-o", "json", "user", "create", "dave", "--role", "admin"])
        .await;
    let user: Value = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(
        (&user["name"], &user["role"], &user["has_password"]),
        (&json!("dave"), &json!("admin"), &json!(false))
    );
    assert_eq!(
        fake.only_request().body,
        json!({"name": "dave", "role": "admin", "scopes": []})
    );
    let run = fake
        .cli(&["user", "create", "erin", "--role", "viewer"])
        .await;
    assert!(
        ok(&run).contains(
            "has no password: give it a key with `gatekey-admin apikey create --user erin`"
        )
    );

    // A taken name is the server's conflict.
    let run = fake
        .cli(&["user", "create", "admin", "--role", "admin"])
        .await;
    assert_eq!(failed(&run, exit::CONFLICT), "user admin already exists");
}

#[tokio::test]
async fn bad_scopes_and_passwords_are_refused_before_any_request() {
    let fake = Fake::start(true).await;
    for args in [
        &[
            "user", "create", "bob", "--role", "viewer", "--scope", "router:x",
        ][..],
        &["user", "update", "bob", "--scope", "hub"],
        &["apikey", "create", "--scope", "spoke:dc/1"],
    ] {
        let run = fake.cli(args).await;
        let line = failed(&run, exit::INVALID_ARGUMENT);
        assert!(line.starts_with("invalid --scope \""), "{line}");
        assert!(line.contains("TYPE:PATTERN"), "{line}");
        assert!(fake.requests().is_empty(), "{args:?}");
    }
    let run = fake
        .cli(&[
            "user", "create", "bob", "--role", "viewer", "--scope", "router:x",
        ])
        .await;
    assert_eq!(
        failed(&run, exit::INVALID_ARGUMENT),
        "invalid --scope \"router:x\": unknown node type (use TYPE:PATTERN with TYPE gateway, hub, spoke, device or *, e.g. spoke:dc-*, or control-plane)"
    );

    let run = fake
        .cli_with(
            KEY,
            "short\n",
            &["user", "create", "bob", "--role", "viewer", "--password"],
        )
        .await;
    assert_eq!(
        failed(&run, exit::INVALID_ARGUMENT),
        "a password must be 8-1024 bytes long"
    );
    let run = fake
        .cli_with(KEY, "", &["user", "update", "bob", "--password-stdin"])
        .await;
    assert_eq!(failed(&run, exit::INVALID_ARGUMENT), "no password on stdin");
    let run = fake.cli(&["user", "delete", "../admin"]).await;
    assert!(failed(&run, exit::INVALID_ARGUMENT).starts_with("invalid user name"));
    let run = fake
        .cli(&["apikey", "create", "--user", "bob", "--expires", "0s"])
        .await;
    assert_eq!(
        failed(&run, exit::INVALID_ARGUMENT),
        "--expires must be at least 1s"
    );
    assert!(fake.requests().is_empty());

    // A role clap does not know is a usage error.
    let run = fake.cli(&["user", "create", "bob", "--role", "root"]).await;
    assert_eq!(run.code, exit::USAGE);
    assert!(
        run.stderr.contains("admin, operator, viewer"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn user_list_update_delete() {
    let fake = Fake::start(true).await;
    let run = fake.cli(&["user", "list"]).await;
    assert_eq!(
        ok(&run),
        "\
NAME  ROLE     SCOPES     PASSWORD CREATED
----- -------- ---------- -------- -------------------
admin admin    all nodes  no       2026-11-01 10:00:00
bob   operator spoke:dc-* yes      2026-11-01 10:00:00
"
    );
    let seen = fake.only_request();
    assert_eq!(
        (
            seen.method.as_str(),
            seen.path.as_str(),
            seen.query.as_str()
        ),
        ("GET", "/api/v1/users", "")
    );
    let run = fake.cli(&["user", "list", "-o", "json"]).await;
    let users: Value = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(users[1]["scopes"], json!(["spoke:dc-*"]));
    assert_eq!(users.as_array().unwrap().len(), 2);

    let run = fake
        .cli(&[
            "user",
            "update",
            "bob",
            "--role",
            "viewer",
            "--clear-scopes",
            "--no-password",
        ])
        .await;
    assert_eq!(
        ok(&run),
        "Updated user bob: viewer, reaching all nodes, password removed.\n"
    );
    let seen = fake.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("PATCH", "/api/v1/users/bob")
    );
    assert_eq!(
        seen.body,
        json!({"role": "viewer", "scopes": [], "password": null})
    );

    let run = fake
        .cli(&[
            "user",
            "update",
            "bob",
            "--scope",
            "hub:*",
            "--scope",
            "control-plane",
        ])
        .await;
    ok(&run);
    assert_eq!(
        fake.only_request().body,
        json!({"scopes": ["hub:*", "control-plane"]})
    );
    let stdin = format!("{PASSWORD}\n");
    let run = fake
        .cli_with(
            KEY,
            &stdin,
            &["-o", "json", "user", "update", "bob", "--password"],
        )
        .await;
    let user: Value = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(user["has_password"], true);
    assert_eq!(fake.only_request().body, json!({"password": PASSWORD}));

    let run = fake.cli(&["user", "delete", "bob"]).await;
    assert_eq!(ok(&run), "Deleted user bob; its API keys no longer work.\n");
    let seen = fake.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("DELETE", "/api/v1/users/bob")
    );
    let run = fake.cli(&["user", "delete", "admin"]).await;
    assert_eq!(
        failed(&run, exit::CONFLICT),
        "the last admin cannot be deleted"
    );
    let run = fake.cli(&["user", "delete", "nobody"]).await;
    assert_eq!(failed(&run, exit::NOT_FOUND), "no user named \"nobody\"");
}

#[tokio::test]
async fn forbidden_shows_the_servers_message() {
    let fake = Fake::start(true).await;
    let run = fake.cli_with(VIEWER_KEY, "", &["user", "list"]).await;
    assert_eq!(
        failed(&run, exit::FORBIDDEN),
        "user carol (viewer) may not manage users and keys"
    );
    let run = fake
        .cli_with(VIEWER_KEY, "", &["-o", "json", "user", "delete", "bob"])
        .await;
    assert_eq!(
        failed(&run, exit::FORBIDDEN),
        "user carol (viewer) may not manage users and keys"
    );
}

#[tokio::test]
async fn apikey_create_shows_the_key_once() {
    let fake = Fake::start(true).await;
    let run = fake
        .cli(&[
            "apikey",
            "create",
            "--user",
            "bob",
            "--name",
            "laptop",
            "--expires",
            "30d",
            "--scope",
            "hub:*",
        ])
        .await;
    let out = ok(&run);
    assert_eq!(
        out,
        "API key for bob (laptop), expires 2026-12-01 10:00 UTC, limited to hub:*:\n  gka_k_newSECRET\n\
         Store it now: it is not shown again (id k_new).\n"
    );
    assert_eq!(out.matches("gka_k_newSECRET").count(), 1);
    let seen = fake.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/api/v1/apikeys")
    );
    assert_eq!(
        seen.body,
        json!({"user": "bob", "name": "laptop", "expires_in_seconds": 2_592_000, "scopes": ["hub:*"]})
    );

    // Nothing but what is given: the server fills in the rest.
    let run = fake.cli(&["-o", "json", "apikey", "create"]).await;
    let key: Value = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(
        (&key["id"], &key["key"], &key["user"], &key["expires_at"]),
        (
            &json!("k_new"),
            &json!("gka_k_newSECRET"),
            &json!("admin"),
            &Value::Null
        )
    );
    assert_eq!(fake.only_request().body, json!({}));
    for (expires, seconds) in [("12h", 43_200), ("90m", 5_400), ("3600s", 3_600)] {
        let run = fake.cli(&["apikey", "create", "--expires", expires]).await;
        assert!(ok(&run).contains("expires 2026-12-01 10:00 UTC:\n"));
        assert_eq!(
            fake.only_request().body,
            json!({"expires_in_seconds": seconds})
        );
    }
    let run = fake.cli(&["apikey", "create", "--name", "ci"]).await;
    assert!(ok(&run).starts_with("API key for admin (ci), never expires:\n  gka_k_newSECRET\n"));
}

#[tokio::test]
async fn apikey_list_and_revoke() {
    let fake = Fake::start(true).await;
    let run = fake.cli(&["apikey", "list", "--user", "bob"]).await;
    assert_eq!(
        ok(&run),
        "\
ID  USER NAME   PREFIX  CREATED             EXPIRES             LAST USED           STATUS
--- ---- ------ ------- ------------------- ------------------- ------------------- -------
k_1 bob  laptop gka_k_1 2026-11-01 10:00:00 2999-01-01 00:00:00 2026-11-02 09:00:00 active
k_2 bob  ci     gka_k_2 2026-11-01 10:00:00 never               never               revoked
"
    );
    let seen = fake.only_request();
    assert_eq!(
        (
            seen.method.as_str(),
            seen.path.as_str(),
            seen.query.as_str()
        ),
        ("GET", "/api/v1/apikeys", "user=bob")
    );
    let run = fake.cli(&["apikey", "list", "-o", "json"]).await;
    let keys: Value = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 3);
    assert_eq!(keys[2]["kind"], "login");
    assert_eq!(fake.only_request().query, "");
    let run = fake.cli(&["apikey", "list"]).await;
    assert!(ok(&run).lines().nth(4).unwrap().ends_with(" expired"));

    let run = fake.cli(&["apikey", "revoke", "k_1"]).await;
    assert_eq!(ok(&run), "Revoked API key k_1; it no longer works.\n");
    let seen = fake.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("DELETE", "/api/v1/apikeys/k_1")
    );
    let run = fake.cli(&["apikey", "revoke", "k_nope"]).await;
    assert_eq!(
        failed(&run, exit::NOT_FOUND),
        "no API key \"k_nope\": see `gatekey-admin apikey list`"
    );
}

/// A sandbox whose settings file lives in a fresh directory.
fn settings_sandbox(stdin: &str) -> (Sandbox, TempDir) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gatekey-admin-settings-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let sandbox = Sandbox {
        stdin: stdin.as_bytes().to_vec(),
        settings_file: Some(dir.join("gatekey").join("admin.yaml")),
    };
    (sandbox, TempDir(dir))
}

#[tokio::test]
async fn login_with_a_password_saves_the_key_and_logout_revokes_it() {
    let fake = Fake::start(true).await;
    let server = fake.server();
    let ca = fake.ca.display().to_string();
    let stdin = format!("{PASSWORD}\n");
    let (sandbox, _dir) = settings_sandbox(&stdin);
    let settings = sandbox.settings_file.clone().unwrap();

    let run = sandbox
        .run([
            "gatekey-admin",
            "--server",
            &server,
            "--ca-cert",
            &ca,
            "login",
            "--user",
            "bob",
        ])
        .await;
    assert_eq!(
        ok(&run),
        format!(
            "Logged in to {server} as bob (key k_login, expires 2026-11-23 22:00 UTC); settings saved to {}\n",
            settings.display()
        )
    );
    let seen = fake.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/api/v1/login")
    );
    assert_eq!(
        seen.body,
        json!({"user": "bob", "password": PASSWORD, "client": "cli"})
    );
    assert_eq!(seen.authorization, None);
    let saved = std::fs::read_to_string(&settings).unwrap();
    assert!(saved.contains(&format!("api_key: {LOGIN_KEY}")), "{saved}");
    assert!(saved.contains(&format!("server: {server}")), "{saved}");

    // The saved key is used from now on.
    fake.forget_requests();
    let run = sandbox.run(["gatekey-admin", "whoami"]).await;
    assert_eq!(
        ok(&run),
        format!(
            "User:    bob\nRole:    operator\nScopes:  spoke:dc-*\nKey:     login (k_login), expires 2026-11-23 22:00 UTC\nServer:  {server}\n"
        )
    );
    let seen = fake.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/api/v1/whoami")
    );
    assert_eq!(seen.authorization, Some(format!("Bearer {LOGIN_KEY}")));
    let run = sandbox.run(["gatekey-admin", "whoami", "-o", "json"]).await;
    let me: Value = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(
        (&me["user"]["name"], &me["key"]["id"]),
        (&json!("bob"), &json!("k_login"))
    );
    assert_eq!(me["via"], "api_key");

    // Logout tells the control plane with the saved key, then forgets it.
    fake.forget_requests();
    let run = sandbox.run(["gatekey-admin", "logout"]).await;
    assert_eq!(
        ok(&run),
        format!("Removed the API key from {}.\n", settings.display())
    );
    let seen = fake.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/api/v1/logout")
    );
    assert_eq!(seen.authorization, Some(format!("Bearer {LOGIN_KEY}")));
    let saved = std::fs::read_to_string(&settings).unwrap();
    assert!(!saved.contains("api_key"), "{saved}");
    assert!(saved.contains(&format!("server: {server}")), "{saved}");
    fake.forget_requests();
    let run = sandbox.run(["gatekey-admin", "logout"]).await;
    assert_eq!(
        ok(&run),
        format!("No API key saved in {}.\n", settings.display())
    );
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn login_failures() {
    let fake = Fake::start(true).await;
    let server = fake.server();
    let ca = fake.ca.display().to_string();
    let (sandbox, _dir) = settings_sandbox("wrong password\n");
    let args = [
        "gatekey-admin",
        "--server",
        &server,
        "--ca-cert",
        &ca,
        "login",
        "--user",
        "bob",
    ];
    let run = sandbox.run(args).await;
    // No advice about --api-key: the password was wrong.
    assert_eq!(
        failed(&run, exit::UNAUTHENTICATED),
        "invalid user or password"
    );
    assert!(!sandbox.settings_file.as_ref().unwrap().exists());

    let (sandbox, _dir) = settings_sandbox("");
    let run = sandbox.run(args).await;
    assert_eq!(failed(&run, exit::INVALID_ARGUMENT), "no password on stdin");

    let (sandbox, _dir) = settings_sandbox(&format!("{PASSWORD}\n"));
    let mut with_key = args.to_vec();
    with_key.extend(["--api-key", KEY]);
    let run = sandbox.run(with_key).await;
    assert_eq!(
        failed(&run, exit::INVALID_ARGUMENT),
        "--user logs in with a password: leave out --api-key"
    );

    // The API key way still works as before.
    let (sandbox, _dir) = settings_sandbox("");
    let run = sandbox
        .run([
            "gatekey-admin",
            "--server",
            &server,
            "--ca-cert",
            &ca,
            "--api-key",
            KEY,
            "login",
        ])
        .await;
    assert!(ok(&run).starts_with(&format!("Logged in to {server}; settings saved to ")));
    let saved = std::fs::read_to_string(sandbox.settings_file.as_ref().unwrap()).unwrap();
    assert!(saved.contains("api_key: gka_test"), "{saved}");
}

#[tokio::test]
async fn logout_removes_the_key_even_when_the_server_cannot_be_told() {
    let fake = Fake::start(true).await;
    let ca = fake.ca.display().to_string();
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    for (server, key, says) in [
        (down.clone(), KEY, format!("could not log out on {down} (")),
        (
            fake.server(),
            "gka_stale",
            format!(
                "{} no longer accepts the saved key (unknown API key); removing it anyway",
                fake.server()
            ),
        ),
    ] {
        let (sandbox, _dir) = settings_sandbox("");
        let path = sandbox.settings_file.clone().unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            format!("server: {server}\napi_key: {key}\nca_cert: {ca}\n"),
        )
        .unwrap();
        let run = sandbox.run(["gatekey-admin", "logout"]).await;
        assert_eq!(run.code, exit::OK, "{run:#?}");
        assert_eq!(
            run.stdout,
            format!("Removed the API key from {}.\n", path.display())
        );
        assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
        assert!(
            run.stderr.starts_with(&format!("gatekey-admin: {says}")),
            "{run:#?}"
        );
        let saved = std::fs::read_to_string(&path).unwrap();
        assert!(!saved.contains("api_key"), "{saved}");
    }
}

#[tokio::test]
async fn audit_list_filters_and_renders() {
    let fake = Fake::start(true).await;
    // The seed document's command, exactly.
    let run = fake.cli(&["audit", "list", "--action", "session"]).await;
    let out = ok(&run).to_string();
    let seen = fake.only_request();
    assert_eq!(
        (
            seen.method.as_str(),
            seen.path.as_str(),
            seen.query.as_str()
        ),
        ("GET", "/api/v1/audit", "action=session&limit=100")
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 102);
    assert_eq!(
        lines[0],
        "TIME                ACTION         USER AGENT OUTCOME DETAIL"
    );
    assert_eq!(
        lines[2],
        "2026-11-23 00:41:39 session.closed bob  hub-1 ok      kind=exec command=\"ip addr\" exit=0 duration=12ms in=0B out=1.4KiB"
    );
    assert!(lines[2..].iter().all(|l| l.contains(" session.closed ")));

    let run = fake
        .cli(&["audit", "list", "--limit", "3", "-o", "json"])
        .await;
    let records: Value = serde_json::from_str(ok(&run)).unwrap();
    let seqs: Vec<i64> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [2500, 2499, 2498]);
    assert_eq!(records[0]["hash"], "h2500");
    assert_eq!(
        records[0]["detail"],
        json!({"command": "uptime", "exit_code": 1})
    );
    assert_eq!(records[1]["action"], "session.closed");
    assert_eq!(fake.only_request().query, "limit=3");

    let run = fake
        .cli(&[
            "audit",
            "list",
            "--user",
            "bob",
            "--agent",
            "hub-1",
            "--since",
            "2026-11-23",
            "--until",
            "2026-11-23T02:00:00+02:00",
            "-o",
            "json",
        ])
        .await;
    ok(&run);
    assert_eq!(
        fake.only_request().query,
        "agent=hub-1&user=bob&since=2026-11-23T00%3A00%3A00Z&until=2026-11-23T00%3A00%3A00Z&limit=100"
    );
    let run = fake
        .cli(&["audit", "list", "--since", "7d", "-o", "json"])
        .await;
    ok(&run);
    let query = fake.only_request().query;
    assert!(
        query.starts_with("since=") && query.ends_with("Z&limit=100"),
        "{query}"
    );

    let run = fake.cli(&["audit", "list", "--until", "yesterday"]).await;
    assert!(failed(&run, exit::INVALID_ARGUMENT).starts_with("invalid --until \"yesterday\""));
    assert!(fake.requests().is_empty());

    let run = fake.cli(&["audit", "list", "--limit", "2"]).await;
    assert_eq!(ok(&run).lines().count(), 4);
    let run = fake.cli(&["audit", "list", "--action", "nothing"]).await;
    assert_eq!((run.code, run.stdout.as_str()), (exit::OK, ""));
    assert_eq!(run.stderr, "gatekey-admin: no audit record matches\n");
}

#[tokio::test]
async fn audit_list_pages_past_1000() {
    let fake = Fake::start(true).await;
    let run = fake
        .cli(&["audit", "list", "--limit", "2200", "-o", "json"])
        .await;
    let records: Vec<Value> = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(records.len(), 2200);
    let seqs: Vec<i64> = records.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (301..=2500).rev().collect::<Vec<_>>());
    let queries: Vec<String> = fake.requests().into_iter().map(|s| s.query).collect();
    assert_eq!(
        queries,
        [
            "limit=1000",
            "limit=1000&before=1501",
            "limit=200&before=501"
        ]
    );

    // Fewer records than asked: stops when the server says so.
    let run = fake
        .cli(&[
            "audit", "list", "--action", "session", "--limit", "5000", "-o", "json",
        ])
        .await;
    let records: Vec<Value> = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!(records.len(), 833);
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn audit_verify_intact_and_broken() {
    let fake = Fake::start(true).await;
    let run = fake.cli(&["audit", "verify"]).await;
    assert_eq!(
        ok(&run),
        "Audit chain intact: 2500 records (seq 1–2500), head h2500\n"
    );
    let seen = fake.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/api/v1/audit/verify")
    );
    let run = fake.cli(&["audit", "verify", "-o", "json"]).await;
    let v: Value = serde_json::from_str(ok(&run)).unwrap();
    assert_eq!((&v["ok"], &v["records"]), (&json!(true), &json!(2500)));

    fake.state.audit_broken.store(true, Ordering::SeqCst);
    let run = fake.cli(&["audit", "verify"]).await;
    assert_eq!(
        failed(&run, exit::AUDIT_BROKEN),
        "audit chain broken at record 17: record 17 was changed after it was written"
    );
    assert_eq!(exit::AUDIT_BROKEN, 253);
    let run = fake.cli(&["audit", "verify", "-o", "json"]).await;
    assert_eq!(run.code, exit::AUDIT_BROKEN);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        (&v["ok"], &v["first_bad_seq"], &v["problem"]),
        (
            &json!(false),
            &json!(17),
            &json!("record 17 was changed after it was written")
        )
    );
    assert!(
        run.stderr
            .starts_with("gatekey-admin: audit chain broken at record 17")
    );
}

#[tokio::test]
async fn audit_export_streams_json_lines() {
    let fake = Fake::start(true).await;
    let run = fake
        .cli(&[
            "audit",
            "export",
            "--action",
            "session",
            "--since",
            "2026-11-23T00:00:00Z",
        ])
        .await;
    let out = ok(&run).to_string();
    let seen = fake.only_request();
    assert_eq!(
        (
            seen.method.as_str(),
            seen.path.as_str(),
            seen.query.as_str()
        ),
        (
            "GET",
            "/api/v1/audit/export",
            "action=session&since=2026-11-23T00%3A00%3A00Z"
        )
    );
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 833);
    assert_eq!(
        (records[0]["seq"].as_i64(), records[832]["seq"].as_i64()),
        (Some(3), Some(2499))
    );

    let (_sandbox, dir) = settings_sandbox("");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("audit.ndjson");
    let file_arg = file.display().to_string();
    let run = fake
        .cli(&["audit", "export", "--output-file", &file_arg])
        .await;
    assert_eq!(
        ok(&run),
        format!("Exported 2500 audit records to {file_arg}.\n")
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 2500);
    assert_eq!(fake.only_request().query, "");

    // -o/--output is the format: a file name there is a usage error that
    // points at --output-file.
    let run = fake.cli(&["audit", "export", "--output", &file_arg]).await;
    assert_eq!(run.code, exit::USAGE);
    assert!(run.stderr.ends_with("gatekey-admin: -o/--output is the output format; write the export to a file with --output-file FILE\n"), "{}", run.stderr);

    // Refusals before the body are the usual one-line errors.
    let run = fake.cli_with("gka_wrong", "", &["audit", "export"]).await;
    assert!(failed(&run, exit::UNAUTHENTICATED).starts_with("unknown API key"));
}

//! Users, roles, scopes and the audit log against a real control plane and
//! agent: a role × action matrix over REST and WebSocket endpoints, scope
//! filtering, expired and revoked keys, password login and the session
//! cookie, cross-origin refusals, audit records for what happened (and for
//! what was refused), tamper detection, and durability across kill -9.

mod common;

use std::time::Duration;

use gatekey::testkit::{Cluster, HttpRequest};
use gatekey_proto::channel;
use gatekey_proto::transport::{self, Endpoint, TransportError};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use common::bins;

/// Opens a console WebSocket; Ok, or the HTTP status it was refused with.
async fn ws_status(c: &Cluster, path: &str, key: &str, origin: Option<&str>) -> Result<(), u16> {
    let endpoint = Endpoint::parse(&c.url).unwrap();
    let tls = transport::client_config(Some(&c.ca_cert)).unwrap();
    let mut headers = vec![("authorization", format!("Bearer {key}"))];
    if let Some(o) = origin {
        headers.push(("origin", o.to_string()));
    }
    match transport::connect_ws(
        &endpoint,
        path,
        &headers,
        &[channel::V5],
        tls,
        WebSocketConfig::default(),
        Duration::from_secs(20),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(TransportError::Http { status, .. }) => Err(status),
        Err(e) => panic!("{path}: {e}"),
    }
}

async fn audit(c: &Cluster, query: &str) -> Vec<serde_json::Value> {
    let r = c.get(&format!("/api/v1/audit?{query}"), &c.admin_key).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["items"].as_array().unwrap().clone()
}

/// What, method, path, body, and the statuses for admin, operator, viewer.
type Case = (
    &'static str,
    &'static str,
    String,
    Option<serde_json::Value>,
    [u16; 3],
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_and_scope_matrix() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    c.create_node("mesh spoke", "dc-1");
    c.create_node("mesh spoke", "lab-1");
    let admin = c.user_with_key("root2", "admin", &[]).await;
    let op = c
        .user_with_key("op", "operator", &["hub:*", "spoke:dc-*"])
        .await;
    let viewer = c.user_with_key("view", "viewer", &[]).await;
    let narrow = c.user_with_key("narrow", "operator", &["spoke:dc-*"]).await;

    let exec = json!({"command": "echo hi"});
    // (what, method, path, body, [admin, operator, viewer] expected statuses)
    let cases: Vec<Case> = vec![
        (
            "list agents",
            "GET",
            "/api/v1/agents".into(),
            None,
            [200, 200, 200],
        ),
        (
            "get agent",
            "GET",
            "/api/v1/agents/hub-1".into(),
            None,
            [200, 200, 200],
        ),
        (
            "list sessions",
            "GET",
            "/api/v1/sessions".into(),
            None,
            [200, 200, 200],
        ),
        (
            "list spokes",
            "GET",
            "/api/v1/mesh/spokes".into(),
            None,
            [200, 200, 200],
        ),
        (
            "list replicas",
            "GET",
            "/api/v1/replicas".into(),
            None,
            [200, 200, 200],
        ),
        (
            "exec",
            "POST",
            "/api/v1/agents/hub-1/exec".into(),
            Some(exec.clone()),
            [200, 200, 403],
        ),
        // In scope but not connected: the operator gets past authorization.
        (
            "exec dc-1",
            "POST",
            "/api/v1/agents/dc-1/exec".into(),
            Some(exec.clone()),
            [503, 503, 403],
        ),
        (
            "exec lab-1",
            "POST",
            "/api/v1/agents/lab-1/exec".into(),
            Some(exec.clone()),
            [503, 403, 403],
        ),
        (
            "create node",
            "POST",
            "/api/v1/mesh/spokes".into(),
            Some(json!({"name": "new-1"})),
            [201, 403, 403],
        ),
        (
            "update node",
            "PATCH",
            "/api/v1/mesh/spokes/dc-1".into(),
            Some(json!({"session_enabled": true})),
            [200, 403, 403],
        ),
        (
            "list users",
            "GET",
            "/api/v1/users".into(),
            None,
            [200, 403, 403],
        ),
        (
            "create user",
            "POST",
            "/api/v1/users".into(),
            Some(json!({"name": "x", "role": "viewer"})),
            [201, 403, 403],
        ),
        (
            "key for another",
            "POST",
            "/api/v1/apikeys".into(),
            Some(json!({"user": "narrow"})),
            [201, 403, 403],
        ),
        (
            "audit list",
            "GET",
            "/api/v1/audit".into(),
            None,
            [200, 403, 200],
        ),
        (
            "audit verify",
            "GET",
            "/api/v1/audit/verify".into(),
            None,
            [200, 403, 200],
        ),
        (
            "audit export",
            "GET",
            "/api/v1/audit/export".into(),
            None,
            [200, 403, 200],
        ),
        (
            "delete node",
            "DELETE",
            "/api/v1/mesh/spokes/new-1".into(),
            None,
            [204, 403, 403],
        ),
    ];
    for (what, method, path, body, expected) in &cases {
        for (who, key, want) in [
            ("admin", &admin, expected[0]),
            ("operator", &op, expected[1]),
            ("viewer", &viewer, expected[2]),
        ] {
            // The second admin-created user would conflict with the first.
            let body = body.clone().map(|mut b| {
                if *what == "create user" {
                    b["name"] = json!(format!("x-{who}"));
                }
                b
            });
            let r = c
                .http(HttpRequest {
                    method,
                    path,
                    key: Some(key),
                    body: body.map(|b| b.to_string()),
                    headers: vec![],
                })
                .await;
            assert_eq!(r.status, want, "{what} as {who}: {}", r.body);
            if r.status == 403 {
                let m = r.json()["message"].as_str().unwrap().to_string();
                assert!(m.contains("may not"), "{what} as {who}: {m}");
            }
        }
    }

    // WebSockets: console and streaming exec.
    let console = "/ws/v1/agents/hub-1/console";
    assert_eq!(ws_status(&c, console, &viewer, None).await, Err(403));
    assert_eq!(ws_status(&c, console, &narrow, None).await, Err(403));
    assert_eq!(
        ws_status(&c, "/ws/v1/agents/hub-1/exec?command=true", &viewer, None).await,
        Err(403)
    );
    assert_eq!(
        ws_status(&c, "/ws/v1/agents/hub-1/exec?command=true", &op, None).await,
        Ok(())
    );

    // Lists show only what is in scope.
    let r = c.get("/api/v1/agents", &op).await;
    let names: Vec<String> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"hub-1".into()) && names.contains(&"dc-1".into()),
        "{names:?}"
    );
    assert!(!names.contains(&"lab-1".into()), "{names:?}");
    assert_eq!(c.get("/api/v1/agents/lab-1", &op).await.status, 403);
    // The one replica without bus_url, with its agent count for whoever
    // may see every agent, and none for a key limited by scopes.
    let r = c.get("/api/v1/replicas", &viewer).await.json();
    assert_eq!(r["items"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["items"][0]["id"], "local", "{r}");
    assert_eq!(r["items"][0]["this"], true, "{r}");
    assert_eq!(r["items"][0]["agents"], 1, "{r}");
    assert_eq!(r["installation"].as_str().unwrap().len(), 16, "{r}");
    let r = c.get("/api/v1/replicas", &op).await.json();
    assert!(r["items"][0]["agents"].is_null(), "{r}");

    // A key narrows its user: an operator key limited to spoke:dc-1 cannot reach hub-1.
    let r = c
        .send(
            "POST",
            "/api/v1/apikeys",
            &op,
            json!({"name": "narrow", "scopes": ["spoke:dc-1"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let narrowed = r.json()["key"].as_str().unwrap().to_string();
    let r = c
        .send("POST", "/api/v1/agents/hub-1/exec", &narrowed, exec.clone())
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // …and cannot escape its limits: a key it makes inherits them, a wider
    // one is refused, and it may not set a password to log in with.
    let r = c
        .send("POST", "/api/v1/apikeys", &narrowed, json!({}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["scopes"], json!(["spoke:dc-1"]), "{}", r.body);
    let child = r.json()["key"].as_str().unwrap().to_string();
    let r = c
        .send("POST", "/api/v1/agents/hub-1/exec", &child, exec.clone())
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = c
        .send(
            "POST",
            "/api/v1/apikeys",
            &narrowed,
            json!({"scopes": ["hub:*"]}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = c
        .send(
            "PATCH",
            "/api/v1/users/op",
            &narrowed,
            json!({"password": "a new password"}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // Every refusal is on record.
    let denied = audit(&c, "action=access.denied&limit=1000").await;
    assert!(denied.len() >= 20, "{}", denied.len());
    assert!(
        denied
            .iter()
            .any(|r| r["user"] == "view" && r["outcome"] == "denied")
    );
    assert!(
        denied
            .iter()
            .any(|r| r["user"] == "op" && r["agent"] == "lab-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_and_are_revoked_and_passwords_log_in() {
    let c = Cluster::start(&bins());
    let r = c
        .send(
            "POST",
            "/api/v1/users",
            &c.admin_key,
            json!({"name": "alice", "role": "viewer", "password": "correct horse"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["has_password"], true);

    // Expiry.
    let r = c
        .send(
            "POST",
            "/api/v1/apikeys",
            &c.admin_key,
            json!({"user": "alice", "name": "short", "expires_in_seconds": 1}),
        )
        .await;
    let short = r.json()["key"].as_str().unwrap().to_string();
    assert!(short.starts_with("gka_"));
    assert_eq!(c.get("/api/v1/whoami", &short).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = c.get("/api/v1/whoami", &short).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("expired"), "{}", r.body);

    // Revocation, by the owner.
    let r = c
        .send(
            "POST",
            "/api/v1/apikeys",
            &c.admin_key,
            json!({"user": "alice", "name": "laptop"}),
        )
        .await;
    let v = r.json();
    let (key, id) = (
        v["key"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    );
    let r = c.get("/api/v1/apikeys", &key).await;
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 2, "{}", r.body);
    assert!(
        !r.body.contains(&key),
        "a listed key must never show its secret"
    );
    assert_eq!(
        c.send(
            "DELETE",
            &format!("/api/v1/apikeys/{id}"),
            &key,
            json!(null)
        )
        .await
        .status,
        204
    );
    let r = c.get("/api/v1/whoami", &key).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("revoked"), "{}", r.body);

    // Password login for the CLI.
    let login = |pw: &str, client: &str| json!({"user": "alice", "password": pw, "client": client});
    let r = c
        .http(HttpRequest {
            method: "POST",
            path: "/api/v1/login",
            key: None,
            body: Some(login("wrong horse", "cli").to_string()),
            headers: vec![],
        })
        .await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("invalid user or password"));
    let r = c
        .http(HttpRequest {
            method: "POST",
            path: "/api/v1/login",
            key: None,
            body: Some(login("correct horse", "cli").to_string()),
            headers: vec![],
        })
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let cli_key = r.json()["key"].as_str().unwrap().to_string();
    let me = c.get("/api/v1/whoami", &cli_key).await.json();
    assert_eq!(
        (me["user"]["name"].as_str(), me["key"]["kind"].as_str()),
        (Some("alice"), Some("login"))
    );
    assert_eq!(
        c.send("POST", "/api/v1/logout", &cli_key, json!(null))
            .await
            .status,
        204
    );
    assert_eq!(c.get("/api/v1/whoami", &cli_key).await.status, 401);

    // The web UI's cookie.
    let origin = format!("https://{}", c.addr);
    let r = c
        .http(HttpRequest {
            method: "POST",
            path: "/api/v1/login",
            key: None,
            body: Some(login("correct horse", "web").to_string()),
            headers: vec![("origin", origin.clone())],
        })
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let set = r.header("set-cookie").unwrap().to_string();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let with_cookie = |method: &'static str, path: &'static str, origin: Option<String>| {
        let mut headers = vec![("cookie", cookie.clone())];
        if let Some(o) = origin {
            headers.push(("origin", o));
        }
        HttpRequest {
            method,
            path,
            key: None,
            body: Some("null".into()),
            headers,
        }
    };
    assert_eq!(
        c.http(with_cookie("GET", "/api/v1/whoami", None))
            .await
            .status,
        200
    );
    // A change by cookie needs our own Origin.
    let r = c.http(with_cookie("POST", "/api/v1/logout", None)).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = c
        .http(with_cookie(
            "POST",
            "/api/v1/logout",
            Some("https://evil.example".into()),
        ))
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = c
        .http(with_cookie("POST", "/api/v1/logout", Some(origin)))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        c.http(with_cookie("GET", "/api/v1/whoami", None))
            .await
            .status,
        401
    );

    // The last admin stays.
    let r = c
        .send("DELETE", "/api/v1/users/admin", &c.admin_key, json!(null))
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = c
        .send(
            "PATCH",
            "/api/v1/users/admin",
            &c.admin_key,
            json!({"role": "viewer"}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);

    let failed = audit(&c, "action=auth.failed").await;
    assert!(failed.iter().any(|r| r["user"] == "alice"), "{failed:?}");
    assert!(failed.iter().any(|r| {
        r["detail"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("expired")
    }));
    assert!(!audit(&c, "action=apikey.revoked").await.is_empty());
    assert!(!audit(&c, "action=auth.login").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_websocket_is_refused() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let path = "/ws/v1/agents/hub-1/exec?command=true";
    assert_eq!(
        ws_status(&c, path, &c.admin_key, Some("https://evil.example")).await,
        Err(403)
    );
    let own = format!("https://{}", c.addr);
    assert_eq!(ws_status(&c, path, &c.admin_key, Some(&own)).await, Ok(()));
    assert_eq!(ws_status(&c, path, &c.admin_key, None).await, Ok(()));
    let denied = audit(&c, "action=access.denied").await;
    assert!(
        denied.iter().any(|r| r["detail"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("evil.example")),
        "{denied:?}"
    );
}

/// Sessions are on record (who, what, exit code, typed lines), the chain
/// verifies, and edits, deletions and reorderings made directly in the
/// database are found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_audited_and_tampering_is_found() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    c.admin_ok(&["session", "exec", "hub-1", "echo audited-$((6*7))"]);
    let out = c.admin_run(&["session", "exec", "hub-1", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    // A console with a typed line.
    let endpoint = Endpoint::parse(&c.url).unwrap();
    let tls = transport::client_config(Some(&c.ca_cert)).unwrap();
    let (mut ws, _) = transport::connect_ws(
        &endpoint,
        "/ws/v1/agents/hub-1/console",
        &[("authorization", format!("Bearer {}", c.admin_key))],
        &[channel::V5],
        tls,
        WebSocketConfig::default(),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    {
        use futures_util::{SinkExt, StreamExt};
        let mut b = vec![channel::STDIN];
        b.extend_from_slice(b"echo typed-line\rexit 0\r");
        ws.send(tokio_tungstenite::tungstenite::Message::Binary(b.into()))
            .await
            .unwrap();
        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        }
    }

    let session = audit(&c, "action=session&limit=100").await;
    let opened: Vec<_> = session
        .iter()
        .filter(|r| r["action"] == "session.opened")
        .collect();
    assert!(
        opened
            .iter()
            .any(|r| r["detail"]["command"] == "echo audited-$((6*7))"
                && r["user"] == "admin"
                && r["agent"] == "hub-1"),
        "{opened:?}"
    );
    let closed: Vec<_> = session
        .iter()
        .filter(|r| r["action"] == "session.closed")
        .collect();
    assert!(
        closed.iter().any(|r| r["detail"]["exit_code"] == 3),
        "{closed:?}"
    );
    assert!(
        closed.iter().any(|r| r["detail"]["kind"] == "console"),
        "{closed:?}"
    );
    let input: Vec<_> = session
        .iter()
        .filter(|r| r["action"] == "session.input")
        .collect();
    assert!(
        input
            .iter()
            .any(|r| r["detail"]["line"] == "echo typed-line"),
        "{input:?}"
    );
    assert!(!audit(&c, "action=agent.connected").await.is_empty());
    let filtered = audit(&c, "agent=hub-1&user=admin&action=session.closed").await;
    assert_eq!(filtered.len(), 3, "{filtered:?}");

    let verify = || async { c.get("/api/v1/audit/verify", &c.admin_key).await.json() };
    let v = verify().await;
    assert_eq!(v["ok"], true, "{v}");
    let last = v["last_seq"].as_i64().unwrap();
    assert!(last > 8);

    // Export: every record, oldest first, one per line.
    let r = c.get("/api/v1/audit/export", &c.admin_key).await;
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<serde_json::Value> = r
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as i64, last);
    assert_eq!(lines[0]["seq"], 1);

    // Tamper with the database behind the control plane's back.
    let url = format!("sqlite://{}", c.dir.join("server/gatekey.db").display());
    let store = gatekey_server::store::Store::open(&url).await.unwrap();
    let sql = |q: String| {
        let pool = store.pool().clone();
        async move { sqlx_exec(&pool, &q).await }
    };
    sql("UPDATE audit_log SET detail = '{\"command\":\"innocent\"}' WHERE seq = 4".into()).await;
    let v = verify().await;
    assert_eq!(
        (v["ok"].as_bool(), v["first_bad_seq"].as_i64()),
        (Some(false), Some(4)),
        "{v}"
    );
    let cli = c.admin_run(&["audit", "verify"]);
    assert_eq!(
        cli.status.code(),
        Some(253),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
}

async fn sqlx_exec(pool: &sqlx::AnyPool, q: &str) {
    sqlx::query(q).execute(pool).await.unwrap();
}

/// A record is committed before the action is acknowledged: kill -9 of the
/// control plane right after an exec answered loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_survives_kill_9() {
    let mut c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let r = c
        .send(
            "POST",
            "/api/v1/agents/hub-1/exec",
            &c.admin_key,
            json!({"command": "echo last-words"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    c.restart_server(true);
    let closed = audit(&c, "action=session.closed").await;
    assert!(
        closed
            .iter()
            .any(|r| r["detail"]["command"] == "echo last-words" && r["detail"]["exit_code"] == 0),
        "{closed:?}"
    );
    assert_eq!(
        c.get("/api/v1/audit/verify", &c.admin_key).await.json()["ok"],
        true
    );
}

/// `audit_capture: full` keeps output up to the cap, with a marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_capture_keeps_output_up_to_the_cap() {
    let cfg = std::env::temp_dir().join(format!("gatekey-capture-{}.yaml", std::process::id()));
    std::fs::write(&cfg, "audit_capture: full\naudit_output_limit: 100\n").unwrap();
    let c = Cluster::start_with(&bins(), &["--config", cfg.to_str().unwrap()]);
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    c.admin_ok(&[
        "session",
        "exec",
        "hub-1",
        "head -c 1000 /dev/zero | tr '\\0' x",
    ]);
    let out = audit(&c, "action=session.output").await;
    let text = out[0]["detail"]["output"].as_str().unwrap();
    assert!(text.starts_with(&"x".repeat(100)), "{text}");
    assert!(text.contains("truncated after 100 of 1000 bytes"), "{text}");
    let r = c
        .send(
            "POST",
            "/api/v1/agents/hub-1/exec",
            &c.admin_key,
            json!({"command": "echo small"}),
        )
        .await;
    assert_eq!(r.status, 200);
    let closed = audit(&c, "action=session.closed").await;
    assert_eq!(closed[0]["detail"]["output"], "small\n", "{:?}", closed[0]);
}

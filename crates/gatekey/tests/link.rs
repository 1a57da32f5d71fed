//! The agent link: reconnects, identity, duplicates, bad input, refusals.

mod common;
use common::*;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gatekey_proto::link::{self, Hello, control::Msg};
use gatekey_proto::transport::{self, Endpoint, TransportError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[test]
fn agent_reconnects_after_control_plane_restart() {
    let mut c = Cluster::start(&bins());
    let (_, agent) = c.agent("mesh hub", "hub-1", true);
    // Orderly restart: agents are told "going away" and come back.
    c.restart_server(false);
    c.wait_for_agent("hub-1", true, &agent);
    assert_code(&c.admin_run(&["session", "exec", "hub-1", "true"]), 0);
    // Crash in the middle of a session: the agent finds the link dead and
    // comes back too, and the restarted control plane writes the closing
    // records the killed one owed.
    let mut running = c
        .admin()
        .args(["session", "exec", "hub-1", "sleep 600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Opened on record (a session is listed a moment before that).
    wait_until(Duration::from_secs(20), "the session to run", || {
        c.admin_ok(&["audit", "list", "--action", "session.opened", "-o", "json"])
            .contains("sleep 600")
    });
    c.restart_server(true);
    let _ = running.wait();
    c.wait_for_agent("hub-1", true, &agent);
    assert_code(&c.admin_run(&["session", "exec", "hub-1", "echo back"]), 0);
    let lost = |action: &str| -> Vec<serde_json::Value> {
        c.audit_records(&["--action", action])
            .into_iter()
            .filter(|r| r["detail"]["reason"] == "control_plane_lost")
            .collect()
    };
    let sessions = lost("session.closed");
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["detail"]["command"], "sleep 600");
    assert_eq!(sessions[0]["outcome"], "failed");
    let links = lost("agent.disconnected");
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0]["agent"], "hub-1");
    c.admin_ok(&["audit", "verify"]);
    assert!(
        agent.log_text().contains("WebSocket"),
        "agent log should name the WebSocket connection:\n{}",
        agent.log_text()
    );
}

#[test]
fn refusals_have_one_clear_line_and_distinct_exit_codes() {
    let c = Cluster::start(&bins());
    let (_, _hub) = c.agent("mesh hub", "hub-1", true);
    // Connected, but its own config keeps sessions off.
    let (_, _off) = c.agent("mesh spoke", "spoke-off", false);
    // Registered, never connected.
    c.create_node("gateway", "gw-absent");

    let check = |args: &[&str], code: i32, needle: &str| {
        let o = c.admin_run(args);
        assert_code(&o, code);
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
        assert!(
            err.to_lowercase().contains(&needle.to_lowercase()),
            "{args:?}: {err:?} should mention {needle:?}"
        );
    };
    check(&["session", "exec", "nope", "true"], 244, "nope");
    check(
        &["session", "exec", "gw-absent", "true"],
        245,
        "not connected",
    );
    check(
        &["session", "exec", "spoke-off", "true"],
        246,
        "session_enabled",
    );
    // The default list shows only agents whose sessions are enabled.
    let list = c.admin_ok(&["session", "list"]);
    assert!(
        list.contains("hub-1") && !list.contains("spoke-off"),
        "{list}"
    );
    assert!(
        c.admin_ok(&["session", "list", "--all"])
            .contains("spoke-off")
    );

    // Wrong API key, no CA, unreachable server.
    let o = c
        .admin()
        .env("GATEKEY_API_KEY", format!("gka_{}", "0".repeat(64)))
        .args(["session", "list"])
        .output()
        .unwrap();
    assert_code(&o, 242);
    let o = c
        .admin()
        .env_remove("GATEKEY_API_KEY")
        .env("HOME", c.dir.join("empty-home"))
        .args(["session", "list"])
        .output()
        .unwrap();
    assert_code(&o, 242);
    let o = c
        .admin()
        .env_remove("GATEKEY_CA_CERT")
        .args(["session", "list"])
        .output()
        .unwrap();
    assert_code(&o, 241);
    assert!(stderr(&o).contains("--ca-cert"), "{}", stderr(&o));
    let o = c
        .admin()
        .args(["--server", "https://127.0.0.1:1", "session", "list"])
        .output()
        .unwrap();
    assert_code(&o, 240);

    // Bad names are refused before anything is sent.
    let o = c.admin_run(&["mesh", "hub", "create", "bad name"]);
    assert_code(&o, 251);
    let o = c.admin_run(&["mesh", "hub", "create", "hub-1"]);
    assert_code(&o, 248);
}

#[test]
fn wrong_token_and_wrong_name_are_refused() {
    let c = Cluster::start(&bins());
    let node = c.create_node("mesh hub", "hub-1");
    // A well-formed token that is not hub-1's.
    let mut bogus = node.token.clone();
    let last = bogus.pop().unwrap();
    bogus.push(if last == '0' { '1' } else { '0' });
    let bad = c.spawn_agent(&c.agent_config("hub-1", &bogus, true, ""));
    // hub-1's token, but the config claims another name.
    let liar = c.spawn_agent(&c.agent_config("hub-2", &node.token, true, "type: hub\n"));
    wait_until(
        Duration::from_secs(20),
        "both agents to log their refusal",
        || bad.log_text().to_lowercase().contains("token") && liar.log_text().contains("hub-1"),
    );
    let all = c.admin_ok(&["session", "list", "--all", "-o", "json"]);
    assert!(
        !all.contains("\"hub-1\""),
        "no agent may be connected as hub-1: {all}"
    );
}

/// A second agent with the same token is refused while the first answers,
/// and replaces it once the first stops answering (no flapping).
#[test]
fn two_agents_claiming_one_name() {
    let c = Cluster::start(&bins());
    let (node, first) = c.agent("mesh hub", "hub-1", true);
    let second = c.spawn_agent(&c.agent_config("hub-1", &node.token, true, ""));
    wait_until(
        Duration::from_secs(20),
        "the second agent to be refused",
        || second.log_text().contains("already connected"),
    );
    assert_code(&c.admin_run(&["session", "exec", "hub-1", "true"]), 0);

    // Freeze the first: it no longer answers pings; the second takes over.
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &first.pid().to_string()])
        .status();
    wait_until(
        Duration::from_secs(60),
        "the second agent to take over",
        || {
            let o = c.admin_run(&["session", "exec", "hub-1", "echo $PPID"]);
            o.status.success() && stdout(&o).trim() == second.pid().to_string()
        },
    );
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &first.pid().to_string()])
        .status();
    // The first comes back to a refusal; the second keeps the name.
    std::thread::sleep(Duration::from_secs(3));
    let o = c.admin_run(&["session", "exec", "hub-1", "echo $PPID"]);
    assert_eq!(
        stdout(&o).trim(),
        second.pid().to_string(),
        "{}",
        stderr(&o)
    );
}

#[test]
fn deleting_a_node_disconnects_its_agent_and_revokes_its_token() {
    let c = Cluster::start(&bins());
    let (node, agent) = c.agent("mesh hub", "hub-1", true);
    c.admin_ok(&["mesh", "hub", "delete", &node.id]);
    c.wait_for_agent("hub-1", false, &agent);
    wait_until(Duration::from_secs(20), "the agent to be told", || {
        agent.log_text().contains("deleted")
    });
    assert_code(&c.admin_run(&["session", "exec", "hub-1", "true"]), 244);
}

/// Garbage and oversized frames on the agent socket are refused, and a
/// running exec on another link is not disturbed.
#[test]
fn bad_frames_do_not_disturb_a_running_exec() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let victim = c.create_node("mesh hub", "hub-2");
    let running = c
        .admin()
        .args([
            "session",
            "exec",
            "hub-1",
            "for i in $(seq 1 40); do echo line$i; sleep 0.05; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoint = Endpoint::parse(&c.url).unwrap();
        let tls = transport::client_config(Some(&c.ca_cert)).unwrap();
        let auth = [("authorization", format!("Bearer {}", victim.token))];
        let connect = |headers: Vec<(&'static str, String)>| {
            let endpoint = endpoint.clone();
            let tls = tls.clone();
            async move {
                let h: Vec<(&str, String)> = headers;
                transport::connect_ws(
                    &endpoint,
                    link::AGENT_PATH,
                    &h,
                    &[],
                    tls,
                    WebSocketConfig::default(),
                    Duration::from_secs(5),
                )
                .await
            }
        };
        // No token: 401 before the upgrade.
        match connect(vec![]).await {
            Err(TransportError::Http { status, .. }) => assert_eq!(status, 401),
            other => panic!("expected 401, got {:?}", other.map(|_| ())),
        }
        // Garbage instead of a hello: closed with a protocol error.
        let (mut ws, _) = connect(auth.to_vec()).await.unwrap();
        ws.send(Message::Binary(vec![0x07, 1, 2, 3].into()))
            .await
            .unwrap();
        assert_closed(&mut ws).await;
        // A malformed control message after a valid handshake.
        let (mut ws, _) = connect(auth.to_vec()).await.unwrap();
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            name: "hub-2".into(),
            agent_type: "hub".into(),
            ..Default::default()
        };
        ws.send(Message::Binary(link::encode_control(Msg::Hello(hello))))
            .await
            .unwrap();
        let welcome = ws.next().await.unwrap().unwrap();
        assert!(matches!(
            link::decode(welcome.into_data()),
            Ok(link::Frame::Control(Msg::Welcome(_)))
        ));
        ws.send(Message::Binary(vec![0x00, 0xff, 0xff, 0xff, 0xff].into()))
            .await
            .unwrap();
        assert_closed(&mut ws).await;
        // Data for a stream that was never opened, and an empty data message.
        for bad in [
            link::encode_data(0xFFFF_FFFF, 1, b"x").to_vec(),
            link::encode_data(1, 1, b"").to_vec(),
        ] {
            let (mut ws, _) = connect(auth.to_vec()).await.unwrap();
            let hello = Hello {
                min_version: 1,
                max_version: 1,
                name: "hub-2".into(),
                agent_type: "hub".into(),
                ..Default::default()
            };
            ws.send(Message::Binary(link::encode_control(Msg::Hello(hello))))
                .await
                .unwrap();
            let _welcome = ws.next().await.unwrap().unwrap();
            ws.send(Message::Binary(bad.into())).await.unwrap();
            assert_closed(&mut ws).await;
        }
        // An oversized message: refused by size before it is buffered.
        let (mut ws, _) = connect(auth.to_vec()).await.unwrap();
        let _ = ws
            .send(Message::Binary(vec![1u8; 4 * 1024 * 1024].into()))
            .await;
        assert_closed(&mut ws).await;
        // Text, and invalid UTF-8 in the name.
        let (mut ws, _) = connect(auth.to_vec()).await.unwrap();
        let mut raw = link::encode_control(Msg::Hello(Hello {
            min_version: 1,
            max_version: 1,
            name: "hub-2".into(),
            ..Default::default()
        }))
        .to_vec();
        let pos = raw.windows(5).position(|w| w == b"hub-2").unwrap();
        raw[pos] = 0xff;
        ws.send(Message::Binary(raw.into())).await.unwrap();
        assert_closed(&mut ws).await;
    });

    let o = running.wait_with_output().unwrap();
    assert_code(&o, 0);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 40, "{out}");
    assert!(out.ends_with("line40\n"));
}

async fn assert_closed(ws: &mut transport::WsStream) {
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the control plane did not close a misbehaving link"
    );
}

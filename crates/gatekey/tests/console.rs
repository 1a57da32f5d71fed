//! Interactive consoles end to end: a real control plane, a real agent with
//! real PTYs, and WebSocket clients speaking v5.channel.k8s.io: echo, resize,
//! exit status, exclusivity (409), share, observe, force, kill, the open and
//! idle timeouts, vanished agents and clients, and bounded memory under a
//! slow reader.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gatekey::testkit::{Cluster, processes_with, wait_until};
use gatekey_proto::channel;
use gatekey_proto::transport::TransportError;
use tokio_tungstenite::tungstenite::Message;

use common::console_client::{open, query, tty};
use common::{bins, marker};

fn http_status(e: TransportError) -> (u16, String) {
    match e {
        TransportError::Http { status, body } => (status, body),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

fn server_config(c_dir: &str, yaml: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "gatekey-console-{c_dir}-{}.yaml",
        std::process::id()
    ));
    std::fs::write(&p, yaml).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_echo_resize_and_exit_code() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let mut con = tty(&c, "hub-1", "").await.unwrap();
    con.send("echo $((6*7))\r").await;
    con.output_contains("42").await;
    con.send("stty size\r").await;
    con.output_contains("24 80").await;
    con.resize(100, 30).await;
    con.send("stty size\r").await;
    con.output_contains("30 100").await;
    // Ctrl-C interrupts a foreground command; the shell survives.
    con.send("sleep 100\r").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    con.send("\x03").await;
    con.send("echo after-$((1+1))\r").await;
    con.output_contains("after-2").await;
    con.send("exit 7\r").await;
    let status = con.finish(Duration::from_secs(15)).await;
    assert_eq!(status.exit_code(), Some(7), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_console_is_refused_then_shared_observed_taken_over_and_killed() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let mark = marker();
    let mut a = tty(&c, "hub-1", "").await.unwrap();
    a.send("echo ready-$((1+1))\r").await;
    a.output_contains("ready-2").await;

    // Exclusive by default: 409 naming who holds it.
    let (status, body) = http_status(tty(&c, "hub-1", "").await.err().expect("refused"));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("admin") && body.contains("--share"), "{body}");

    // exec is never blocked by a console.
    let out = c.admin_ok(&["session", "exec", "hub-1", "echo exec-ok"]);
    assert!(out.contains("exec-ok"));

    // Share: both see the output and may type.
    let mut b = tty(&c, "hub-1", "&mode=share").await.unwrap();
    b.until("join notice", |_, n| n.contains("joined the console"))
        .await;
    a.until("b joined", |_, n| n.contains("joined")).await;
    b.send("echo from-b-$((2+3))\r").await;
    a.output_contains("from-b-5").await;
    b.output_contains("from-b-5").await;

    // Observe: sees output, input refused.
    let mut o = tty(&c, "hub-1", "&mode=observe").await.unwrap();
    o.send("echo from-observer-$((3+4))\r").await;
    o.until("read-only notice", |_, n| n.contains("read-only"))
        .await;
    a.send("echo from-a-$((4+5))\r").await;
    o.output_contains("from-a-9").await;
    assert!(!a.text().contains("from-observer-7"));

    // The live-session API shows one console with three participants.
    let list = c.admin_ok(&["session", "active", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let consoles: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "console")
        .collect();
    assert_eq!(consoles.len(), 1, "{list}");
    assert_eq!(consoles[0]["participants"].as_array().unwrap().len(), 3);
    assert_eq!(consoles[0]["mode"], "shared");

    // Force: everybody is told who took over; the new console works.
    a.send(&format!("sh -c 'sleep 1000; true' {mark}\r")).await;
    wait_until(Duration::from_secs(10), "marker process", || {
        !processes_with(&mark).is_empty()
    });
    let mut d = tty(&c, "hub-1", "&force=true").await.unwrap();
    for con in [&mut a, &mut b, &mut o] {
        let s = con.finish(Duration::from_secs(15)).await;
        assert_eq!(s.reason, channel::REASON_TAKEN_OVER, "{s:?}");
        assert!(s.message.contains("admin took over"), "{s:?}");
    }
    wait_until(
        Duration::from_secs(10),
        "the old shell's processes gone",
        || processes_with(&mark).is_empty(),
    );
    d.send("echo new-$((5+5))\r").await;
    d.output_contains("new-10").await;

    // Kill from the API: the participant is told who ended it.
    let v: serde_json::Value =
        serde_json::from_str(&c.admin_ok(&["session", "active", "-o", "json"])).unwrap();
    let id = v[0]["id"].as_str().unwrap().to_string();
    c.admin_ok(&["session", "kill", &id]);
    let s = d.finish(Duration::from_secs(15)).await;
    assert_eq!(s.reason, channel::REASON_KILLED, "{s:?}");
    assert!(s.message.contains("killed by admin"), "{s:?}");
    let v: serde_json::Value =
        serde_json::from_str(&c.admin_ok(&["session", "active", "-o", "json"])).unwrap();
    assert!(v.as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_timeout_idle_timeout_and_unknown_agent() {
    let cfg = server_config(
        "timeouts",
        "session_open_timeout: 2s\nconsole_idle_timeout: 2s\n",
    );
    let c = Cluster::start_with(&bins(), &["--config", cfg.to_str().unwrap()]);
    let (_, agent) = c.agent("mesh hub", "hub-1", true);

    let (status, body) = http_status(tty(&c, "nope", "").await.err().expect("refused"));
    assert_eq!(status, 404, "{body}");

    // Idle: no input and no output ends the console.
    let mut con = tty(&c, "hub-1", "").await.unwrap();
    let s = con.finish(Duration::from_secs(20)).await;
    assert_eq!(s.reason, channel::REASON_IDLE_TIMEOUT, "{s:?}");

    // An agent that does not answer: 504 within the open timeout.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let t = Instant::now();
    let r = tty(&c, "hub-1", "").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    let (status, body) = http_status(r.err().expect("refused"));
    assert_eq!(status, 504, "{body}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // The abandoned console is cleaned up: a new one opens.
    let mut con = tty(&c, "hub-1", "").await.unwrap();
    con.send("echo back-$((1+2))\r").await;
    con.output_contains("back-3").await;
    let _ = std::fs::remove_file(cfg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_agent_and_vanished_client_end_the_session() {
    let cfg = server_config("vanish", "heartbeat_interval: 1s\nheartbeat_timeout: 3s\n");
    let c = Cluster::start_with(&bins(), &["--config", cfg.to_str().unwrap()]);
    let (_, mut agent) = c.agent("mesh hub", "hub-1", true);

    // A client that vanishes without closing (its process stops answering):
    // the session is reaped and the shell is gone.
    let mark = marker();
    let mut con = tty(&c, "hub-1", "").await.unwrap();
    con.send(&format!("sh -c 'sleep 1000; true' {mark}\r"))
        .await;
    wait_until(Duration::from_secs(10), "marker process", || {
        !processes_with(&mark).is_empty()
    });
    // Keep the socket open but never read or answer pings again.
    let frozen = con;
    wait_until(Duration::from_secs(20), "the shell reaped", || {
        processes_with(&mark).is_empty()
    });
    drop(frozen);

    // The agent dies: the client gets a clear status at once.
    let mut con = tty(&c, "hub-1", "").await.unwrap();
    con.send("echo up-$((2+2))\r").await;
    con.output_contains("up-4").await;
    agent.stop();
    let s = con.finish(Duration::from_secs(15)).await;
    assert_eq!(s.reason, channel::REASON_SESSION_LOST, "{s:?}");
    let _ = std::fs::remove_file(cfg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_holds_memory_bounded_and_other_sessions_stay_responsive() {
    let c = Cluster::start(&bins());
    let (_, agent) = c.agent("mesh hub", "hub-1", true);
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap()
    };
    let server = c.server_pid().unwrap();
    let mut con = tty(&c, "hub-1", "").await.unwrap();
    con.send("yes\r").await;
    // Read a few KiB per second for a while.
    let (s0, a0) = (rss(server), rss(agent.pid()));
    let mut got = 0usize;
    for _ in 0..20 {
        if let Ok(Some(Ok(Message::Binary(d)))) =
            tokio::time::timeout(Duration::from_millis(250), con.ws.next()).await
        {
            got += d.len();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(got > 0);
    // Another session on the same agent answers promptly.
    let t = Instant::now();
    let out = c.admin_ok(&["session", "exec", "hub-1", "echo still-responsive"]);
    assert!(out.contains("still-responsive"));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let (s1, a1) = (rss(server), rss(agent.pid()));
    // Bounded by the stream window and the client's socket buffers, not by
    // how much `yes` produced.
    assert!(
        s1.saturating_sub(s0) < 32 * 1024,
        "server grew {} KiB",
        s1 - s0
    );
    assert!(
        a1.saturating_sub(a0) < 32 * 1024,
        "agent grew {} KiB",
        a1 - a0
    );
    con.send("\x03").await;
}

/// A client that stops reading while the shell streams flat out must not
/// hold up orders: a takeover and a kill are answered promptly (well within
/// the 30 s heartbeat timeout that would drop the stalled client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_hold_up_takeover_or_kill() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let mut stalled = tty(&c, "hub-1", "").await.unwrap();
    stalled.send("yes\r").await;
    // Let its socket buffers fill; from now on it reads nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let t = Instant::now();
    let mut taker = tty(&c, "hub-1", "&force=true").await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "takeover took {:?}",
        t.elapsed()
    );
    drop(stalled);

    taker.send("yes\r").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v: serde_json::Value =
        serde_json::from_str(&c.admin_ok(&["session", "active", "-o", "json"])).unwrap();
    let id = v[0]["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    c.admin_ok(&["session", "kill", &id]);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "kill took {:?}",
        t.elapsed()
    );
}

#[test]
fn an_independent_python_client_speaks_the_console_protocol() {
    let python = std::path::Path::new("/usr/bin/python3");
    let has_websockets = std::process::Command::new(python)
        .args(["-c", "import websockets"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_websockets {
        eprintln!(
            "SKIP: /usr/bin/python3 with websockets is missing (scripts/setup.sh installs it)"
        );
        return;
    }
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("device", "edge-1", true);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/console_client.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&c.url)
        .arg(&c.ca_cert)
        .arg(&c.admin_key)
        .arg("edge-1")
        .output()
        .expect("run the Python client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        4,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_without_a_terminal_is_the_shell_on_pipes() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let mut con = open(&c, "hub-1", &query(r#"{"tty":false}"#, ""))
        .await
        .unwrap();
    con.send("echo pipes-$((1+1)); echo err-out >&2\n").await;
    con.ws
        .send(Message::Binary(Bytes::from(vec![
            channel::CLOSE,
            channel::STDIN,
        ])))
        .await
        .unwrap();
    let status = con.finish(Duration::from_secs(15)).await;
    assert_eq!(status.status, "Success", "{status:?}");
    assert_eq!(con.text(), "pipes-2\n");
    assert!(con.notices.contains("err-out"));
}

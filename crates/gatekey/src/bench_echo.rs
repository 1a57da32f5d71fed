//! Keystroke echo latency: one byte in, its echo back, through a PTY running
//! `cat` (raw mode, no line discipline echo) — through gatekey's console
//! (client → control plane → agent → PTY and back) and, in the same run,
//! through `ssh -tt` to a local sshd on a loopback port.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gatekey_proto::channel;
use gatekey_proto::transport::{self, Endpoint};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::bench::ssh::Sshd;
use crate::bench::{Row, latency_rows, median};
use crate::testkit::{Bins, Cluster};

/// The remote side of every echo: each byte comes straight back.
const ECHO: &str = "stty raw -echo; echo ready; exec cat";

pub fn console_echo(
    bins: &Bins,
    rt: &tokio::runtime::Runtime,
    runs: usize,
    smoke: bool,
) -> Vec<Row> {
    let c = Cluster::start(bins);
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let samples = rt.block_on(gatekey_echo(&c, runs));
    let mut rows = latency_rows(
        "console-echo",
        "gatekey console",
        samples.clone(),
        "p50 <= 1 ms, p99 <= 3 ms",
    );
    match Sshd::start(smoke) {
        Ok(sshd) => {
            let ssh = ssh_echo(&sshd, runs);
            let ratio = median(&samples).as_secs_f64() / median(&ssh).as_secs_f64();
            rows.extend(latency_rows("console-echo", "ssh -tt", ssh, ""));
            rows.push(Row {
                scenario: "console-echo",
                metric: "time ratio gatekey / ssh, p50".into(),
                value: format!("{ratio:.2}"),
                target: "",
            });
        }
        Err(why) => eprintln!("console-echo: OpenSSH comparison skipped: {why}"),
    }
    rows
}

async fn gatekey_echo(c: &Cluster, runs: usize) -> Vec<Duration> {
    let endpoint = Endpoint::parse(&c.url).expect("url");
    let tls = transport::client_config(Some(&c.ca_cert)).expect("tls");
    let metadata = format!(
        r#"{{"tty":true,"command":{{"command":"/bin/sh","args":["-c","{ECHO}"]}},"initialDimensions":{{"Width":80,"Height":24}}}}"#
    );
    let q: String = form_urlencoded::byte_serialize(metadata.as_bytes()).collect();
    let (mut ws, _) = transport::connect_ws(
        &endpoint,
        &format!("/ws/v1/agents/hub-1/console?metadata={q}"),
        &[("authorization", format!("Bearer {}", c.admin_key))],
        &[channel::V5],
        tls,
        WebSocketConfig::default(),
        Duration::from_secs(30),
    )
    .await
    .expect("console");
    // Wait for the remote side to be in raw mode.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        match ws.next().await {
            Some(Ok(Message::Binary(d))) if d.first() == Some(&channel::STDOUT) => {
                seen.extend_from_slice(&d[1..])
            }
            Some(Ok(_)) => {}
            other => panic!("console ended before it was ready: {other:?}"),
        }
    }
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + 20 {
        let byte = b'a' + (i % 26) as u8;
        let t = Instant::now();
        ws.send(Message::Binary(Bytes::from(vec![channel::STDIN, byte])))
            .await
            .expect("send");
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(d)))
                    if d.first() == Some(&channel::STDOUT) && d[1..].contains(&byte) =>
                {
                    break;
                }
                Some(Ok(_)) => {}
                other => panic!("console ended: {other:?}"),
            }
        }
        // The first few warm the path up.
        if i >= 20 {
            samples.push(t.elapsed());
        }
    }
    let _ = ws.close(None).await;
    samples
}

/// Keystroke echo through `ssh -tt` (a fresh connection, then `runs` bytes).
fn ssh_echo(sshd: &Sshd, runs: usize) -> Vec<Duration> {
    let mut ssh = sshd
        .ssh()
        .arg("-tt")
        .arg(sshd.target())
        .arg(ECHO)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let mut input = ssh.stdin.take().expect("stdin");
    let mut output = ssh.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let n = output.read(&mut buf).expect("ssh output");
        assert!(n > 0, "ssh ended before it was ready");
        seen.extend_from_slice(&buf[..n]);
    }
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + 20 {
        let byte = b'a' + (i % 26) as u8;
        let t = Instant::now();
        input.write_all(&[byte]).expect("ssh input");
        loop {
            let n = output.read(&mut buf).expect("ssh output");
            assert!(n > 0, "ssh ended");
            if buf[..n].contains(&byte) {
                break;
            }
        }
        if i >= 20 {
            samples.push(t.elapsed());
        }
    }
    let _ = ssh.kill();
    let _ = ssh.wait();
    samples
}

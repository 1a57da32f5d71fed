//! Keystroke echo latency: one byte in, its echo back, through a PTY running
//! `cat` (raw mode, no line discipline echo) — through gatekey's console
//! (client → control plane → agent → PTY and back) and, in the same run,
//! through `ssh -tt` to a local sshd on a loopback port.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gatekey_proto::channel;
use gatekey_proto::transport::{self, Endpoint};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::bench::{Row, latency_rows};
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
            let ssh = sshd.echo(runs);
            let ratio = median(&samples).as_secs_f64() / median(&ssh).as_secs_f64();
            rows.extend(latency_rows("console-echo", "ssh -tt", ssh, ""));
            rows.push(Row {
                scenario: "console-echo",
                metric: "gatekey / ssh, p50".into(),
                value: format!("{ratio:.2}"),
                target: "",
            });
        }
        Err(why) => eprintln!("console-echo: OpenSSH comparison skipped: {why}"),
    }
    rows
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
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

/// A throwaway sshd on a loopback port with generated keys.
struct Sshd {
    dir: PathBuf,
    port: u16,
    child: Child,
}

impl Sshd {
    fn start(smoke: bool) -> Result<Sshd, String> {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.exists() {
            if smoke {
                return Err("sshd is not installed (a full run installs openssh-server)".into());
            }
            eprintln!("console-echo: installing openssh-server for the comparison");
            let ok = Command::new("apt-get")
                .args(["install", "-y", "-qq", "openssh-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok || !sshd.exists() {
                return Err("cannot install openssh-server (apt-get as root)".into());
            }
        }
        let dir = std::env::temp_dir().join(format!("gatekey-bench-sshd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for key in ["host", "client"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .status()
                .map_err(|e| format!("ssh-keygen: {e}"))?;
            if !st.success() {
                return Err("ssh-keygen failed".into());
            }
        }
        std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys"))
            .map_err(|e| e.to_string())?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            l.local_addr().map_err(|e| e.to_string())?.port()
        };
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
             PermitRootLogin prohibit-password\nLogLevel ERROR\n",
            d = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).map_err(|e| e.to_string())?;
        std::fs::create_dir_all("/run/sshd").ok();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("sshd: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("sshd did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Sshd { dir, port, child })
    }

    fn echo(&self, runs: usize) -> Vec<Duration> {
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let mut ssh = Command::new("ssh")
            .arg("-tt")
            .arg("-i")
            .arg(self.dir.join("client"))
            .args(["-p", &self.port.to_string()])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "BatchMode=yes",
            ])
            .arg(format!("{user}@127.0.0.1"))
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
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

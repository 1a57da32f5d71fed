//! Troubleshooting from an agent that sits inside a network: the agent runs
//! in a client namespace behind which a router leads to a target namespace
//! (a listener on 8080, a DROP rule for 8081, nothing on 8082). The control
//! plane reaches the agent over a veth link of its own, so every probe below
//! can only have come from the agent's side. Needs root and `ip`/`nft`;
//! skips with a message elsewhere.
//!
//! ```text
//! control plane 10.93.0.1 ─ 10.93.0.2 agent 10.93.1.2 ─ 10.93.1.1 router 10.93.2.1 ─ 10.93.2.2 target
//! ```

mod common;

use std::process::{Child, Command, Stdio};

use gatekey::testkit::Cluster;
use serde_json::{Value, json};

use common::bins;

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces and the root-side link; removed on drop, also on failure.
struct Net {
    tag: String,
    listener: Option<Child>,
}

impl Net {
    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.tag)
    }

    fn new() -> Option<Net> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for network namespaces");
            return None;
        }
        let net = Net {
            tag: format!("gkt{}", std::process::id()),
            listener: None,
        };
        if let Err(e) = net.build() {
            eprintln!("skipped: cannot build the namespaces: {e}");
            return None;
        }
        Some(net)
    }

    fn build(&self) -> Result<(), String> {
        let (a, r, t) = (self.ns("a"), self.ns("r"), self.ns("t"));
        let host = format!("{}h", self.tag);
        for ns in [&a, &r, &t] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", "up0", "netns", &a,
        ])?;
        sh(&["ip", "addr", "add", "10.93.0.1/30", "dev", &host])?;
        sh(&["ip", "link", "set", &host, "up"])?;
        sh(&[
            "ip", "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &r,
        ])?;
        sh(&[
            "ip", "-n", &r, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns",
            &t,
        ])?;
        for (ns, dev, addr) in [
            (&a, "up0", "10.93.0.2/30"),
            (&a, "eth0", "10.93.1.2/24"),
            (&r, "eth0", "10.93.1.1/24"),
            (&r, "eth1", "10.93.2.1/24"),
            (&t, "eth0", "10.93.2.2/24"),
        ] {
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        sh(&[
            "ip",
            "-n",
            &a,
            "route",
            "add",
            "10.93.2.0/24",
            "via",
            "10.93.1.1",
        ])?;
        sh(&[
            "ip",
            "-n",
            &t,
            "route",
            "add",
            "default",
            "via",
            "10.93.2.1",
        ])?;
        for (ns, key) in [
            (&r, "net.ipv4.ip_forward=1"),
            (&r, "net.ipv4.icmp_ratelimit=0"),
            (&t, "net.ipv4.icmp_ratelimit=0"),
        ] {
            sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", key])?;
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            &t,
            "nft",
            "add table inet gk; add chain inet gk in { type filter hook input priority 0 ; } ; add rule inet gk in tcp dport 8081 drop",
        ])?;
        Ok(())
    }

    /// A listener on the target's port 8080 (the kernel completes the
    /// handshakes; nobody needs to accept them).
    fn listen(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns("t"), "/usr/bin/python3", "-c"])
            .arg("import socket,time\ns=socket.socket()\ns.bind(('0.0.0.0',8080))\ns.listen(64)\nprint('up',flush=True)\ntime.sleep(600)")
            .stdout(Stdio::piped())
            .spawn()
            .expect("listener");
        self.listener = Some(child);
        let out = self.listener.as_mut().unwrap().stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
        assert_eq!(line.trim(), "up");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut l) = self.listener.take() {
            let _ = l.kill();
            let _ = l.wait();
        }
        let _ = sh(&["ip", "link", "del", &format!("{}h", self.tag)]);
        for role in ["a", "r", "t"] {
            let _ = sh(&["ip", "netns", "del", &self.ns(role)]);
        }
    }
}

async fn run(c: &Cluster, request: Value) -> Vec<Value> {
    let r = c
        .send(
            "POST",
            "/api/v1/troubleshoot?location=hub:edge-hub",
            &c.admin_key,
            request.clone(),
        )
        .await;
    assert_eq!(r.status, 200, "{request}: {}", r.body);
    r.body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_probes_the_network_it_sits_in() {
    let Some(mut net) = Net::new() else { return };
    net.listen();
    let cfg = std::env::temp_dir().join(format!("gatekey-netns-{}.yaml", std::process::id()));
    std::fs::write(&cfg, "tls_san: [\"10.93.0.1\"]\n").unwrap();
    let c = Cluster::start_on(&bins(), "10.93.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let node = c.create_node("mesh hub", "edge-hub");
    let agent_cfg = c.agent_config("edge-hub", &node.token, true, "");
    let agent = c.spawn_agent_in(&agent_cfg, Some(&net.ns("a")));
    c.wait_for_agent("edge-hub", true, &agent);

    // ping: replies from the target, one router away (TTL 63).
    let lines = run(
        &c,
        json!({"tool": "ping", "host": "10.93.2.2", "count": 2, "interval_ms": 200}),
    )
    .await;
    let replies: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "ping_reply")
        .collect();
    assert_eq!(replies.len(), 2, "{lines:?}");
    assert_eq!(replies[0]["ttl"], 63, "{lines:?}");
    assert_eq!(lines.last().unwrap()["success"], true);
    // An address nobody has: every request lost.
    let lines = run(&c, json!({"tool": "ping", "host": "10.93.2.99", "count": 2, "interval_ms": 200, "timeout_ms": 500})).await;
    assert!(
        lines.iter().all(|l| l["event"] != "ping_reply"),
        "{lines:?}"
    );
    assert_eq!(lines.last().unwrap()["success"], false, "{lines:?}");

    // traceroute: the router, then the target.
    let lines = run(
        &c,
        json!({"tool": "traceroute", "host": "10.93.2.2", "numeric": true, "timeout_ms": 1000}),
    )
    .await;
    let hops: Vec<String> = lines
        .iter()
        .filter(|l| l["event"] == "hop")
        .map(|l| l["probes"][0]["addr"].as_str().unwrap_or("*").to_string())
        .collect();
    assert_eq!(hops, ["10.93.1.1", "10.93.2.2"], "{lines:?}");
    assert_eq!(lines.last().unwrap()["success"], true);

    // nmap: open, filtered (the DROP rule), closed.
    let lines = run(
        &c,
        json!({"tool": "nmap", "host": "10.93.2.2", "ports": "8080-8082", "timeout_ms": 500}),
    )
    .await;
    let report = lines
        .iter()
        .find(|l| l["event"] == "host_report")
        .expect("report");
    let states: Vec<(u64, &str)> = report["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_u64().unwrap(), p["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [(8080, "open"), (8081, "filtered"), (8082, "closed")],
        "{lines:?}"
    );

    // nc: open, refused, timed out.
    for (port, state) in [(8080, "open"), (8082, "refused"), (8081, "timeout")] {
        let lines = run(
            &c,
            json!({"tool": "nc", "host": "10.93.2.2", "port": port, "timeout_ms": 500}),
        )
        .await;
        let connect = lines
            .iter()
            .find(|l| l["event"] == "connect")
            .expect("connect");
        assert_eq!(connect["state"], state, "{lines:?}");
    }
    std::fs::remove_file(&cfg).ok();
}

//! Three control-plane replicas on one PostgreSQL database, joined by
//! NATS or RabbitMQ (the machine's own), with agents spread over them:
//! exec, console (share, observe, take over) and kill across replicas, the
//! same lists and one audit chain everywhere, the loss of a replica and of
//! the broker. Skips with a message where a service is absent.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::console_client::{open, query, tty};
use common::{TcpForwarder, assert_code, bins, stderr, stdout};
use gatekey::testkit::{AgentProc, Cluster, wait_until};
use gatekey_proto::channel;

#[derive(Clone, Copy, Debug)]
enum Broker {
    Nats,
    Amqp,
}

impl Broker {
    fn addr(self) -> SocketAddr {
        match self {
            Broker::Nats => "127.0.0.1:4222",
            Broker::Amqp => "127.0.0.1:5672",
        }
        .parse()
        .unwrap()
    }

    /// Whether the machine's broker answers; says SKIP when not.
    fn up(self) -> bool {
        let up = std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2)).is_ok();
        if !up {
            eprintln!("SKIP: no {self:?} broker at {}", self.addr());
        }
        up
    }

    fn url(self, addr: SocketAddr) -> String {
        match self {
            Broker::Nats => format!("nats://{addr}"),
            Broker::Amqp => format!("amqp://guest:guest@{addr}/%2f"),
        }
    }
}

/// Three replicas; the broker is reached through a link the test can cut.
struct Replicas {
    r: Vec<Cluster>,
    broker_link: TcpForwarder,
    /// What agents dial: any live replica.
    balancer: TcpForwarder,
}

fn start(broker: Broker) -> Option<Replicas> {
    if !broker.up() {
        return None;
    }
    let Some(db) = gatekey::testkit::postgres_schema_url("cluster") else {
        eprintln!("SKIP: no PostgreSQL (set GATEKEY_TEST_POSTGRES_URL)");
        return None;
    };
    let broker_link = TcpForwarder::start(vec![broker.addr()]);
    let bus = broker.url(broker_link.addr);
    let r = gatekey::testkit::start_replicas(
        &bins(),
        3,
        &db,
        &bus,
        "replica_timeout: 4s\nrequest_timeout: 5s\n",
    );
    let balancer = TcpForwarder::start(r.iter().map(|c| c.addr).collect());
    Some(Replicas {
        r,
        broker_link,
        balancer,
    })
}

impl Replicas {
    /// Registers a gateway and starts its agent dialling `url`.
    fn agent(&self, name: &str, url: &str) -> AgentProc {
        let node = self.r[0].create_node("gateway", name);
        let cfg = self.r[0].agent_config(name, &node.token, true, "");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(&self.r[0].url, url);
        std::fs::write(&cfg, text).unwrap();
        let proc = self.r[0].spawn_agent(&cfg);
        self.r[0].wait_for_agent(name, true, &proc);
        proc
    }

    /// Which replica (index) holds the agent's link, asked of replica `via`.
    fn holder(&self, via: usize, name: &str) -> Option<usize> {
        let out = self.r[via].admin_run(&["session", "list", "--all", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let items = v.as_array().or_else(|| v["items"].as_array())?.clone();
        let a = items
            .iter()
            .find(|a| a["name"] == name && a["connected"] == true)?;
        let id = a["replica"].as_str()?;
        let (_, n) = id.rsplit_once("-r")?;
        n.parse::<usize>().ok().map(|n| n - 1)
    }
}

/// The RabbitMQ queues named after a session (None: not RabbitMQ, or no
/// rabbitmqctl here).
fn session_queues(broker: Broker, id: &str) -> Option<Vec<String>> {
    if !matches!(broker, Broker::Amqp) {
        return None;
    }
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    let Some(out) = out else {
        eprintln!("rabbitmqctl unavailable: the per-session queue check is skipped");
        return None;
    };
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("gatekey.") && l.contains(&format!(".session.{id}.")))
            .map(|l| l.trim().to_string())
            .collect(),
    )
}

/// Sends requests one after the other on one HTTP/1.1 connection, each
/// after the last answer; returns each answer's status and head. Panics if
/// the connection closes before every answer came.
async fn on_one_connection(c: &Cluster, requests: &[&str]) -> Vec<(u16, String)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let endpoint = gatekey_proto::transport::Endpoint::parse(&c.url).unwrap();
    let tls = gatekey_proto::transport::client_config(Some(&c.ca_cert)).unwrap();
    let s = gatekey_proto::transport::connect_tls(&endpoint, tls, Duration::from_secs(10))
        .await
        .unwrap();
    let mut s = BufReader::new(s);
    let mut answers = Vec::new();
    for r in requests {
        let body = if r.starts_with("POST") {
            r#"{"command":"true"}"#
        } else {
            ""
        };
        let req = format!(
            "{r} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            c.addr,
            c.admin_key,
            body.len()
        );
        s.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = s.read_line(&mut line).await.unwrap();
            assert!(
                n > 0,
                "the connection closed before answering {r:?}; so far {answers:?}"
            );
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no Content-Length in {head}"));
        let mut body = vec![0u8; length];
        s.read_exact(&mut body).await.unwrap();
        answers.push((status, head));
    }
    answers
}

fn exec_across(broker: Broker) {
    let Some(rs) = start(broker) else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The agent is held by r2; clients use r1 and r3.
    let _agent = rs.agent("gw-far", &rs.r[1].url);
    assert_eq!(rs.holder(0, "gw-far"), Some(1));
    assert_eq!(rs.holder(2, "gw-far"), Some(1));

    // Exec with its output, stderr and exit code, through r1.
    let out = rs.r[0].admin_run(&[
        "session",
        "exec",
        "gw-far",
        "echo out-$((2+3)); echo err >&2; exit 3",
    ]);
    assert_code(&out, 3);
    assert_eq!(stdout(&out), "out-5\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"));
    // A client's keep-alive connection outlives answers carried from the
    // agent's replica (RabbitMQ's one-message path closes its own side).
    let answers = rt.block_on(on_one_connection(
        &rs.r[0],
        &[
            "GET /api/v1/agents/gw-far",
            "POST /api/v1/agents/gw-far/exec",
            "GET /api/v1/agents/gw-far",
        ],
    ));
    for (status, head) in &answers {
        assert_eq!(*status, 200, "{head}");
        assert!(!head.to_ascii_lowercase().contains("connection:"), "{head}");
    }
    // 20 MB through the broker, every byte where it belongs (numbered
    // lines: a lost, repeated or reordered message shows).
    let out = rs.r[2].admin_run(&["session", "exec", "gw-far", "seq 1 2500000"]);
    assert_code(&out, 0);
    let want: String = (1..=2_500_000).map(|i| format!("{i}\n")).collect();
    assert!(
        out.stdout == want.as_bytes(),
        "stdout across replicas differs"
    );
    // stdin the other way, checked by its digest on the node.
    let sent: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut child = rs.r[0]
        .admin()
        .args(["session", "exec", "gw-far", "sha256sum"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&sent).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &sent);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(stdout(&out).split_whitespace().next(), Some(hex.as_str()));

    rt.block_on(async {
        // A console opened through r1, shared through r3, observed through
        // r2 (where the agent is), all one session.
        let mut a = tty(&rs.r[0], "gw-far", "").await.unwrap();
        a.send("echo first-$((6*7))\r").await;
        a.output_contains("first-42").await;
        let mut b = tty(&rs.r[2], "gw-far", "&mode=share").await.unwrap();
        b.until("the join notice", |_, n| n.contains("joined the console"))
            .await;
        let mut o = tty(&rs.r[1], "gw-far", "&mode=observe").await.unwrap();
        o.until("the observe notice", |_, n| n.contains("observing"))
            .await;
        b.send("echo shared-$((7*6))\r").await;
        a.output_contains("shared-42").await;
        o.output_contains("shared-42").await;

        // The same session, with its three participants, from every replica.
        let mut ids = Vec::new();
        for c in &rs.r {
            let v: serde_json::Value =
                serde_json::from_str(&c.admin_ok(&["session", "active", "-o", "json"])).unwrap();
            let list = v.as_array().unwrap();
            assert_eq!(
                list.len(),
                1,
                "{v} from {}; logs:\n{}",
                c.url,
                rs.r.iter()
                    .map(|c| c.log("server.log"))
                    .collect::<Vec<_>>()
                    .join("\n----\n")
            );
            assert_eq!(list[0]["participants"].as_array().unwrap().len(), 3, "{v}");
            ids.push(list[0]["id"].as_str().unwrap().to_string());
        }
        assert!(ids.iter().all(|i| i == &ids[0]), "{ids:?}");

        // A second exclusive console is refused wherever it asks.
        let busy = match open(&rs.r[2], "gw-far", &query(r#"{"tty":true}"#, "")).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a second exclusive console was allowed"),
        };
        assert!(
            busy.contains("409") || busy.contains("already open"),
            "{busy}"
        );

        // Taken over from r3: everyone in the old one is told who.
        let mut t = tty(&rs.r[2], "gw-far", "&force=true").await.unwrap();
        for c in [&mut a, &mut b, &mut o] {
            let s = c.finish(Duration::from_secs(15)).await;
            assert_eq!(s.reason, channel::REASON_TAKEN_OVER, "{s:?}");
        }
        t.send("echo mine-$((1+1))\r").await;
        t.output_contains("mine-2").await;

        // Killed from r1 (the session runs on r2).
        let v: serde_json::Value =
            serde_json::from_str(&rs.r[0].admin_ok(&["session", "active", "-o", "json"])).unwrap();
        let id = v[0]["id"].as_str().unwrap().to_string();
        // On RabbitMQ the session crossing replicas has its own two queues.
        let queues = session_queues(broker, &id);
        if let Some(q) = &queues {
            assert_eq!(q.len(), 2, "queues of {id}: {q:?}");
        }
        rs.r[0].admin_ok(&["session", "kill", &id]);
        let s = t.finish(Duration::from_secs(15)).await;
        assert_eq!(s.reason, channel::REASON_KILLED, "{s:?}");
        assert!(s.message.contains("killed by admin"), "{s:?}");
        let out = rs.r[2].admin_run(&["session", "kill", &id]);
        assert!(!out.status.success(), "a second kill found the session");
        // …and they go with it.
        if queues.is_some() {
            wait_until(
                Duration::from_secs(10),
                "the session's queues deleted",
                || session_queues(broker, &id).is_some_and(|q| q.is_empty()),
            );
        }
    });

    // Diagnostics run on the agent through another replica.
    let out = rs.r[2].admin_run(&[
        "troubleshoot",
        "nc",
        "127.0.0.1",
        "--port",
        "1",
        "--location",
        "gateway:gw-far",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("refused"),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );

    // Concurrent writers: execs through all three replicas at once.
    let burst: Vec<_> = (0..24)
        .map(|i| {
            rs.r[i % 3]
                .admin()
                .args(["session", "exec", "gw-far", &format!("echo burst-{i}")])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in burst.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert_eq!(stdout(&out), format!("burst-{i}\n"));
    }

    // Two agents with one token, started together against two replicas:
    // one holds the link, the other is refused, however the race falls.
    let node = rs.r[0].create_node("gateway", "gw-twin");
    let twins: Vec<AgentProc> = [0, 2]
        .iter()
        .map(|&i| {
            let cfg = rs.r[0].agent_config("gw-twin", &node.token, true, "");
            let text = std::fs::read_to_string(&cfg).unwrap();
            let cfg_i = cfg.with_extension(format!("r{i}.yaml"));
            std::fs::write(&cfg_i, text.replace(&rs.r[0].url, &rs.r[i].url)).unwrap();
            rs.r[0].spawn_agent(&cfg_i)
        })
        .collect();
    wait_until(Duration::from_secs(30), "one twin refused", || {
        twins
            .iter()
            .any(|t| t.log_text().contains("refusing a second connection"))
    });
    // Each replica names its own link first: two holders would disagree.
    let holders: Vec<_> = (0..3).map(|via| rs.holder(via, "gw-twin")).collect();
    assert!(
        holders[0].is_some() && holders.iter().all(|h| *h == holders[0]),
        "gw-twin held once: {holders:?}"
    );
    drop(twins);

    // One audit chain, written by three replicas, valid from each.
    for c in &rs.r {
        c.admin_ok(&["audit", "verify"]);
    }
    let records = rs.r[1].admin_ok(&["audit", "list", "--agent", "gw-far", "-o", "json"]);
    for action in [
        "session.opened",
        "session.joined",
        "session.taken_over",
        "session.killed",
        "session.closed",
        "troubleshoot.run",
    ] {
        assert!(records.contains(action), "no {action} in {records}");
    }
    drop(rs.broker_link);
}

#[test]
fn exec_console_kill_and_diagnostics_across_replicas_over_nats() {
    exec_across(Broker::Nats);
}

#[test]
fn exec_console_kill_and_diagnostics_across_replicas_over_rabbitmq() {
    exec_across(Broker::Amqp);
}

fn failures(broker: Broker) {
    let Some(mut rs) = start(broker) else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lb = format!("https://{}", rs.balancer.addr);
    let _far = rs.agent("gw-lost", &lb);
    let h = rs.holder(0, "gw-lost").expect("gw-lost held");
    let client = (h + 1) % 3;
    let other = (h + 2) % 3;
    // A second agent, held by the client's replica.
    let near_agent = rs.agent("gw-near", &rs.r[client].url);
    assert_eq!(rs.holder(client, "gw-near"), Some(client));

    rt.block_on(async {
        let mut far = tty(&rs.r[client], "gw-lost", "").await.unwrap();
        far.send("echo up-$((3*3))\r").await;
        far.output_contains("up-9").await;
        let mut near = tty(&rs.r[client], "gw-near", "").await.unwrap();
        near.send("echo near-$((4*4))\r").await;
        near.output_contains("near-16").await;

        // The replica holding gw-lost dies.
        rs.r[h].stop_server(true);
        let s = far.finish(Duration::from_secs(20)).await;
        assert_eq!(s.reason, channel::REASON_SESSION_LOST, "{s:?}");
        assert!(
            s.message.contains("lost the control-plane replica"),
            "{s:?}"
        );
        // The other session carries on.
        near.send("echo still-$((5*5))\r").await;
        near.output_contains("still-25").await;
    });
    // The killed replica wrote no closing records; a survivor writes them
    // once its lease runs out.
    wait_until(
        Duration::from_secs(30),
        "the closing records the killed replica owed",
        || {
            let lost = lost_records(&rs.r[client]);
            lost.iter().any(|r| r["action"] == "session.closed")
                && lost
                    .iter()
                    .any(|r| r["action"] == "agent.disconnected" && r["agent"] == "gw-lost")
        },
    );
    // A replica started with a running replica's id is refused.
    refused_with_taken_id(&rs.r[other], rs.r[client].replica_id().unwrap());
    twins_started_together(&rs.r[other]);
    // The agent is back through another replica, and reachable from both.
    wait_until(
        Duration::from_secs(60),
        "gw-lost back on a live replica",
        || rs.holder(client, "gw-lost").is_some_and(|n| n != h),
    );
    for via in [client, other] {
        let out = rs.r[via].admin_run(&["session", "exec", "gw-lost", "echo back"]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "back\n");
    }

    // The broker goes away: a session between replicas ends saying so.
    let now = rs.holder(client, "gw-lost").unwrap();
    let via = if now == client { other } else { client };
    rt.block_on(async {
        let mut s = tty(&rs.r[via], "gw-lost", "").await.unwrap();
        s.send("echo before-$((2*2))\r").await;
        s.output_contains("before-4").await;
        rs.broker_link.cut();
        let st = s.finish(Duration::from_secs(20)).await;
        assert_eq!(st.reason, channel::REASON_SESSION_LOST, "{st:?}");
        assert!(st.message.contains("message broker"), "{st:?}");
    });
    // …and once it is back, replicas reconnect and resubscribe.
    rs.broker_link.restore();
    wait_until(
        Duration::from_secs(60),
        "cross-replica exec after the broker returned",
        || {
            let out = rs.r[via].admin_run(&["session", "exec", "gw-lost", "echo again"]);
            out.status.success() && stdout(&out) == "again\n"
        },
    );
    // An agent that left is "not connected" from every replica, as with one
    // (a replica that had it cached asks the bus, hears nobody, and answers
    // itself).
    drop(near_agent);
    wait_until(Duration::from_secs(20), "gw-near gone", || {
        rs.holder(other, "gw-near").is_none()
    });
    for (i, r) in rs.r.iter().enumerate() {
        if i != h {
            let out = r.admin_run(&["session", "exec", "gw-near", "true"]);
            assert_code(&out, 245);
            assert!(stderr(&out).contains("not connected"), "{}", stderr(&out));
        }
    }
    // The audit chain survived all of it.
    rs.r[via].admin_ok(&["audit", "verify"]);
}

/// Audit records written for a control plane that died (reason
/// `control_plane_lost`), asked of `c`.
fn lost_records(c: &Cluster) -> Vec<serde_json::Value> {
    c.audit_records(&["--limit", "1000"])
        .into_iter()
        .filter(|r| r["detail"]["reason"] == "control_plane_lost")
        .collect()
}

/// Starts one more replica like `like`, but with the id of a running one,
/// and checks it exits at once saying why.
fn refused_with_taken_id(like: &Cluster, taken: &str) {
    let own = like.replica_id().expect("a replica id");
    let args: Vec<String> = like
        .server_args()
        .iter()
        .map(|a| {
            if a == own {
                taken.to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let data = like.dir.join("twin");
    let mut child = std::process::Command::new(&like.bins.server)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().ok();
            panic!("a replica with the taken id {taken} started");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(78), "{err}");
    assert!(err.contains("already used by a running replica"), "{err}");
}

/// Two processes started at the same moment with one new replica id (as
/// `like`'s, but unused): at most one runs, and the other says why.
fn twins_started_together(like: &Cluster) {
    let own = like.replica_id().expect("a replica id");
    let twin_id = format!("{own}-twin");
    let args: Vec<String> = like
        .server_args()
        .iter()
        .map(|a| if a == own { twin_id.clone() } else { a.clone() })
        .collect();
    let mut twins: Vec<std::process::Child> = ["twin-a", "twin-b"]
        .iter()
        .map(|dir| {
            std::process::Command::new(&like.bins.server)
                .args(["--listen", "127.0.0.1:0", "--data-dir"])
                .arg(like.dir.join(dir))
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // One is refused at once; the other is given time to be refused too.
    wait_until(Duration::from_secs(20), "a twin to be refused", || {
        twins.iter_mut().any(|t| t.try_wait().unwrap().is_some())
    });
    std::thread::sleep(Duration::from_secs(2));
    let mut running = 0;
    for twin in &mut twins {
        match twin.try_wait().unwrap() {
            None => {
                running += 1;
                twin.kill().ok();
                twin.wait().ok();
            }
            Some(status) => {
                let mut err = String::new();
                std::io::Read::read_to_string(twin.stderr.as_mut().unwrap(), &mut err).unwrap();
                assert_eq!(status.code(), Some(78), "{err}");
                assert!(err.contains("already used by a running replica"), "{err}");
            }
        }
    }
    assert!(
        running <= 1,
        "both processes with replica_id {twin_id} started"
    );
}

/// Two replicas that check one replica id at the very same moment (both
/// see it free, since neither listens yet) do not both claim it.
async fn one_id_claimed_at_once(broker: Broker) {
    use gatekey_server::bus::Bus;
    use gatekey_server::cluster::{Cluster, tunnel::TunnelConfig};
    let url = broker.url(broker.addr());
    let installation = gatekey_server::secret::random_hex(8);
    let config = TunnelConfig {
        window: 1 << 20,
        silence: Duration::from_secs(4),
        open_timeout: Duration::from_secs(2),
    };
    let replica = format!("t{}-same-{}", std::process::id(), &installation[..6]);
    let claim = |instance: &'static str| {
        let (url, installation, replica) = (url.clone(), installation.clone(), replica.clone());
        async move {
            // On RabbitMQ the second connection is refused at once: the
            // replica's reply queue is exclusive.
            let bus = Bus::connect(&url, &replica, &installation).await?;
            let c = Cluster::new(
                bus,
                replica,
                instance.into(),
                config,
                Duration::from_secs(1),
            );
            c.check_id_free().await?;
            c.claim_id().await?;
            Ok::<_, gatekey_server::bus::BusError>(c)
        }
    };
    let (a, b) = tokio::join!(claim("a"), claim("b"));
    assert!(
        a.is_err() || b.is_err(),
        "two processes claimed replica id {replica}"
    );
    let winner = a.as_ref().ok().or(b.as_ref().ok()).is_some();
    for e in [a.as_ref().err(), b.as_ref().err()].into_iter().flatten() {
        assert!(
            matches!(e, gatekey_server::bus::BusError::IdTaken(_)),
            "{e}"
        );
    }
    // A claim made, not yet serving: a later claimer is refused too.
    if winner {
        match claim("c").await {
            Err(gatekey_server::bus::BusError::IdTaken(_)) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a later process claimed replica id {replica} too"),
        }
    }
}

/// [`one_id_claimed_at_once`], five times over.
fn claims_race(broker: Broker) {
    if !broker.up() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    for _ in 0..5 {
        rt.block_on(one_id_claimed_at_once(broker));
    }
}

#[test]
fn one_replica_id_claimed_at_once_over_nats() {
    claims_race(Broker::Nats);
}

#[test]
fn one_replica_id_claimed_at_once_over_rabbitmq() {
    claims_race(Broker::Amqp);
}

/// Control planes on one database that cannot reach each other (one on
/// NATS, one on RabbitMQ, one without a bus) each say so in their log.
#[test]
fn control_planes_on_one_database_that_cannot_meet_are_told() {
    if !(Broker::Nats.up() && Broker::Amqp.up()) {
        return;
    }
    let Some(db) = gatekey::testkit::postgres_schema_url("apart") else {
        eprintln!("SKIP: no PostgreSQL (set GATEKEY_TEST_POSTGRES_URL)");
        return;
    };
    let config = std::env::temp_dir().join(format!("gatekey-apart-{}.yaml", std::process::id()));
    std::fs::write(&config, "replica_timeout: 3s\n").unwrap();
    let config = config.display().to_string();
    let run = format!("t{}apart", std::process::id());
    let (nats_url, amqp_url) = (
        Broker::Nats.url(Broker::Nats.addr()),
        Broker::Amqp.url(Broker::Amqp.addr()),
    );
    let (on_nats, on_amqp) = (format!("{run}-n"), format!("{run}-a"));
    let base = ["--config", &config, "--database-url", &db];
    let with = |bus: &str, id: &str| {
        let mut a = base.to_vec();
        a.extend(["--bus-url", bus, "--replica-id", id]);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let first_args = with(&nats_url, &on_nats);
    let n = Cluster::start_with(
        &bins(),
        &first_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let amqp_args = with(&amqp_url, &on_amqp);
    let a = Cluster::start_replica(
        &n,
        &amqp_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let lone = Cluster::start_replica(&n, &base);
    let unheard = "is not heard on the message bus";
    wait_until(Duration::from_secs(30), "the warnings", || {
        let (nl, al, ll) = (whole_log(&n), whole_log(&a), whole_log(&lone));
        nl.contains(unheard)
            && nl.contains(&format!("replica={on_amqp}"))
            && al.contains(unheard)
            && al.contains(&format!("replica={on_nats}"))
            && ll.contains("this one has no bus_url")
    });
}

#[test]
fn replica_loss_and_broker_loss_over_nats() {
    failures(Broker::Nats);
}

#[test]
fn replica_loss_and_broker_loss_over_rabbitmq() {
    failures(Broker::Amqp);
}

/// Names of the connected agents `c` lists.
fn connected_agents(c: &Cluster) -> Vec<String> {
    let out = c.admin_run(&["session", "list", "--all", "-o", "json"]);
    assert_code(&out, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = v.as_array().or_else(|| v["items"].as_array()).unwrap();
    let mut names: Vec<String> = items
        .iter()
        .filter(|a| a["connected"] == true)
        .filter_map(|a| a["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

fn whole_log(c: &Cluster) -> String {
    std::fs::read_to_string(c.dir.join("server.log")).unwrap_or_default()
}

/// Two installations (each its own database) on one broker never meet:
/// each lists only its own agents and hears only its own replicas, and
/// they may use the same replica ids.
fn installations_on_one_broker(broker: Broker) {
    let Some(rs) = start(broker) else { return };
    let Some(db) = gatekey::testkit::postgres_schema_url("other") else {
        return;
    };
    let _ours = rs.agent("gw-ours", &rs.r[1].url);
    // The other installation: one replica with r1's id, on the same broker.
    let taken = rs.r[0].replica_id().unwrap().to_string();
    let bus = broker.url(broker.addr());
    let other = Cluster::start_with(
        &bins(),
        &[
            "--database-url",
            &db,
            "--bus-url",
            &bus,
            "--replica-id",
            &taken,
        ],
    );
    let node = other.create_node("gateway", "gw-theirs");
    let cfg = other.agent_config("gw-theirs", &node.token, true, "");
    let theirs = other.spawn_agent(&cfg);
    other.wait_for_agent("gw-theirs", true, &theirs);
    // Heartbeats go out every replica_timeout/3 (4 s here): wait for two.
    std::thread::sleep(Duration::from_secs(3));
    for (i, c) in rs.r.iter().enumerate() {
        assert_eq!(
            connected_agents(c),
            ["gw-ours"],
            "listed through r{}",
            i + 1
        );
        assert_eq!(whole_log(c).matches("replica joined").count(), 2);
    }
    assert_eq!(connected_agents(&other), ["gw-theirs"]);
    assert!(!whole_log(&other).contains("replica joined"));
    // `replica list` through r1: the three of this installation, r2 with
    // the agent; the other installation's replica lists itself alone.
    let listed = |c: &Cluster| -> serde_json::Value {
        let out = c.admin_run(&["replica", "list", "-o", "json"]);
        assert_code(&out, 0);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = listed(&rs.r[0]);
    let rows: Vec<(String, bool, u64)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let id = r["id"].as_str().unwrap().to_string();
            (id, r["this"] == true, r["agents"].as_u64().unwrap())
        })
        .collect();
    let ids: Vec<&str> = rs.r.iter().map(|c| c.replica_id().unwrap()).collect();
    assert_eq!(
        rows,
        [
            (ids[0].to_string(), true, 0),
            (ids[1].to_string(), false, 1),
            (ids[2].to_string(), false, 0)
        ],
        "{v}"
    );
    let theirs = listed(&other);
    assert_eq!(theirs["items"].as_array().unwrap().len(), 1, "{theirs}");
    assert_ne!(theirs["installation"], v["installation"]);
    let table = stdout(&rs.r[0].admin_run(&["replica", "list"]));
    assert!(table.contains(&format!("{} *", ids[0])), "{table}");
    assert!(
        table.contains(&format!(
            "installation {}",
            v["installation"].as_str().unwrap()
        )),
        "{table}"
    );
    // Each reaches only its own agents.
    let out = other.admin_run(&["session", "exec", "gw-ours", "true"]);
    assert!(out.status.code() != Some(0), "{}", stdout(&out));
    let out = rs.r[2].admin_run(&["session", "exec", "gw-ours", "echo here"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "here\n");
    speaking_another_protocol(&rs, broker);
    // Replicas of one installation hear each other: no warning that one
    // renews its lease but is not heard.
    for c in &rs.r {
        assert!(!whole_log(c).contains("not heard on the message bus"));
    }
}

/// A replica of another protocol version, on the installation's own
/// subjects: its requests are refused with a message that says why, and
/// its arrival is logged as such.
fn speaking_another_protocol(rs: &Replicas, broker: Broker) {
    use gatekey_server::cluster::tunnel::OpenRequest;
    let log = whole_log(&rs.r[0]);
    let at = log.find("installation=").expect("installation id logged") + "installation=".len();
    let installation = log[at..at + 16].to_string();
    let out = rs.r[0].admin_run(&["session", "list", "--all", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = v
        .as_array()
        .or_else(|| v["items"].as_array())
        .unwrap()
        .clone();
    let ours = items.iter().find(|a| a["name"] == "gw-ours").unwrap();
    let node_id = ours["node_id"].as_str().or(ours["id"].as_str()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Kept until the end: the runtime's workers send what it buffered.
    let _bus = rt.block_on(async {
        let bus = gatekey_server::bus::Bus::connect(
            &broker.url(broker.addr()),
            "from-the-future",
            &installation,
        )
        .await
        .unwrap();
        let open = OpenRequest {
            id: "s_future0001".into(),
            client_addr: None,
            from_replica: "from-the-future".into(),
            protocol: 99,
            window: 1 << 20,
            reply_to: None,
        };
        let mut payload = b"T".to_vec();
        payload.extend(serde_json::to_vec(&open).unwrap());
        payload.extend(b"\nGET /api/v1/agents/gw-ours HTTP/1.1\r\nhost: x\r\n\r\n");
        let answer = bus
            .request(
                &format!("agent.{node_id}"),
                payload.into(),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.contains("replica protocol 1") && answer.contains("protocol 99"),
            "{answer}"
        );
        let beat = serde_json::json!({
            "replica": "from-the-future", "hello": false, "protocol": 99, "version": "9.9.9"
        });
        bus.broadcast("replicas", serde_json::to_vec(&beat).unwrap().into())
            .await
            .unwrap();
        bus
    });
    wait_until(Duration::from_secs(10), "the other protocol logged", || {
        whole_log(&rs.r[1]).contains("running gatekey 9.9.9 (replica protocol 99)")
    });
    // It is left out of lists: they still answer at once, with our agent.
    assert_eq!(connected_agents(&rs.r[1]), ["gw-ours"]);
    // `replica list` shows it, with its version and protocol.
    let out = rs.r[1].admin_run(&["replica", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let future = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "from-the-future")
        .cloned()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        (&future["version"], &future["protocol"]),
        (&"9.9.9".into(), &99.into())
    );
}

#[test]
fn installations_on_one_broker_never_meet_over_nats() {
    installations_on_one_broker(Broker::Nats);
}

#[test]
fn installations_on_one_broker_never_meet_over_rabbitmq() {
    installations_on_one_broker(Broker::Amqp);
}

/// With `rebalance_batch`, idle agents that all reached one replica spread
/// to the other once the load balancer sends new connections there too.
#[test]
fn idle_agents_spread_over_replicas_with_rebalance_batch_over_nats() {
    const N: usize = 12;
    if !Broker::Nats.up() {
        return;
    }
    let Some(db) = gatekey::testkit::postgres_schema_url("spread") else {
        eprintln!("SKIP: no PostgreSQL (set GATEKEY_TEST_POSTGRES_URL)");
        return;
    };
    let r = gatekey::testkit::start_replicas(
        &bins(),
        2,
        &db,
        &Broker::Nats.url(Broker::Nats.addr()),
        "replica_timeout: 3s\nrebalance_batch: 4\n",
    );
    let balancer = TcpForwarder::start(vec![r[0].addr]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let agents = gatekey::bench::register_sim_nodes(&r[0], N).await;
        let url = format!("https://{}", balancer.addr);
        let endpoint = gatekey_proto::transport::Endpoint::parse(&url).unwrap();
        let started = std::time::Instant::now();
        let fleet =
            gatekey::sim::Fleet::start(&endpoint, gatekey::sim::tls(&r[0].ca_cert), agents, 16);
        let up = fleet
            .wait_connected(started, N, Duration::from_secs(60))
            .await;
        assert!(
            up.is_some(),
            "agents did not connect: {:?}",
            fleet.errors().first()
        );
        let client = gatekey::bench::client(&r[0]);
        let held = || async {
            let agents = client.list_agents(true).await.unwrap();
            let on = |c: &Cluster| {
                let id = c.replica_id().unwrap();
                agents.iter().filter(|a| a.extra["replica"] == id).count()
            };
            (on(&r[0]), on(&r[1]), agents.len())
        };
        assert_eq!(held().await, (N, 0, N));
        // Now the balancer sends new connections to both.
        balancer.set_backends(vec![r[0].addr, r[1].addr]);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (first, second, all) = held().await;
            // Share 6, slack 1: r1 stops handing over at 7 or fewer.
            if second >= N / 3 && first <= 7 && all == N {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "agents did not spread: r1 {first}, r2 {second}, connected {all}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        fleet.stop().await;
    });
    assert!(whole_log(&r[0]).contains("handed idle agents to other replicas"));
}

/// A replica's answer to a list question goes page by page: 6,000 agents
/// on one replica (about 1.5 MB of answer, over NATS's default max_payload
/// of 1 MB) are all listed through another.
#[test]
fn lists_hold_thousands_of_agents_across_replicas_over_nats() {
    const N: usize = 6000;
    gatekey::bench::raise_nofile_limit();
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((0, 0));
    if soft < 2 * N as u64 + 1000 {
        eprintln!("SKIP: RLIMIT_NOFILE {soft} is too low for {N} agents");
        return;
    }
    let Some(rs) = start(Broker::Nats) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let holder = &rs.r[1];
        let agents = gatekey::bench::register_sim_nodes(holder, N).await;
        let endpoint = gatekey_proto::transport::Endpoint::parse(&holder.url).unwrap();
        let started = std::time::Instant::now();
        let fleet =
            gatekey::sim::Fleet::start(&endpoint, gatekey::sim::tls(&holder.ca_cert), agents, 128);
        let up = fleet
            .wait_connected(started, N, Duration::from_secs(180))
            .await;
        assert!(
            up.is_some(),
            "{N} agents did not connect: {:?}",
            fleet.errors().first()
        );
        let listed = gatekey::bench::client(&rs.r[0])
            .list_agents(true)
            .await
            .unwrap();
        let far = listed.iter().filter(|a| a.name.starts_with("sim-")).count();
        assert_eq!(far, N, "agents held by r2, listed through r1");
        fleet.stop().await;
    });
}

//! gatekey-bench: measures gatekey on this machine with real processes on
//! loopback and real TLS, and prints a table (and writes JSON).
//!
//! `gatekey-bench all` runs every scenario at full size; `gatekey-bench smoke`
//! runs each one tiny so CI keeps the programs working (nothing asserts a
//! duration). Single scenarios: `exec-latency`, `throughput`, `idle-agents`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatekey_admin::api::{ExecRequest, NodeType};
use gatekey_admin::{Client, ClientConfig, ExecOptions};
use serde_json::json;

use crate::sim::{self, SimAgent};
use crate::testkit::{Bins, Cluster};

/// Sizes of one run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub latency_runs: usize,
    pub cli_runs: usize,
    pub throughput_bytes: u64,
    pub idle_agents: usize,
    pub echo_runs: usize,
}

impl Sizes {
    pub const FULL: Sizes = Sizes {
        latency_runs: 1000,
        cli_runs: 200,
        throughput_bytes: 2 << 30,
        idle_agents: 1000,
        echo_runs: 2000,
    };
    pub const SMOKE: Sizes = Sizes {
        latency_runs: 20,
        cli_runs: 5,
        throughput_bytes: 64 << 20,
        idle_agents: 50,
        echo_runs: 50,
    };
}

/// One line of the result table.
pub(crate) struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub value: String,
    pub target: &'static str,
}

pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("all");
    let (sizes, scenarios): (Sizes, Vec<&str>) = match what {
        "all" => (
            Sizes::FULL,
            vec!["exec-latency", "console-echo", "throughput", "idle-agents"],
        ),
        "smoke" => (
            Sizes::SMOKE,
            vec!["exec-latency", "console-echo", "throughput", "idle-agents"],
        ),
        s @ ("exec-latency" | "console-echo" | "throughput" | "idle-agents") => {
            (Sizes::FULL, vec![s])
        }
        _ => {
            eprintln!(
                "usage: gatekey-bench [all|smoke|exec-latency|console-echo|throughput|idle-agents]"
            );
            return 2;
        }
    };
    raise_nofile_limit();
    let bins = Bins::beside_current_exe();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    for s in scenarios {
        eprintln!("== {s}");
        let r = match s {
            "exec-latency" => exec_latency(&bins, &rt, sizes),
            "console-echo" => {
                crate::bench_echo::console_echo(&bins, &rt, sizes.echo_runs, what == "smoke")
            }
            "throughput" => throughput(&bins, sizes),
            "idle-agents" => idle_agents(&bins, &rt, sizes),
            _ => unreachable!(),
        };
        rows.extend(r);
    }
    print_table(&rows);
    let out = json!(rows
        .iter()
        .map(|r| json!({"scenario": r.scenario, "metric": r.metric, "value": r.value, "target": r.target}))
        .collect::<Vec<_>>());
    let dir = std::path::Path::new("bench-results");
    if std::fs::create_dir_all(dir).is_ok() {
        let file = dir.join(format!("{what}.json"));
        if std::fs::write(
            &file,
            serde_json::to_string_pretty(&out).unwrap_or_default(),
        )
        .is_ok()
        {
            eprintln!("results written to {}", file.display());
        }
    }
    0
}

fn print_table(rows: &[Row]) {
    let w0 = rows
        .iter()
        .map(|r| r.scenario.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let w1 = rows
        .iter()
        .map(|r| r.metric.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let w2 = rows.iter().map(|r| r.value.len()).max().unwrap_or(5).max(5);
    println!(
        "{:w0$}  {:w1$}  {:>w2$}  target",
        "scenario", "metric", "value"
    );
    for r in rows {
        println!(
            "{:w0$}  {:w1$}  {:>w2$}  {}",
            r.scenario, r.metric, r.value, r.target
        );
    }
}

fn client(c: &Cluster) -> Client {
    let mut cfg = ClientConfig::new(c.url.clone());
    cfg.api_key = Some(c.admin_key.clone());
    cfg.ca_cert = Some(c.ca_cert.clone());
    Client::new(cfg).expect("client")
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (at(0.50), at(0.90), at(0.99))
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn latency_rows(
    scenario: &'static str,
    what: &str,
    v: Vec<Duration>,
    target: &'static str,
) -> Vec<Row> {
    let n = v.len();
    let (p50, p90, p99) = percentiles(v);
    vec![
        Row {
            scenario,
            metric: format!("{what} p50 (n={n})"),
            value: ms(p50),
            target,
        },
        Row {
            scenario,
            metric: format!("{what} p90"),
            value: ms(p90),
            target: "",
        },
        Row {
            scenario,
            metric: format!("{what} p99"),
            value: ms(p99),
            target: "",
        },
    ]
}

/// `true` through control plane and agent: the client library on a warm
/// connection (one-shot API over keep-alive, and a WebSocket stream per
/// exec), and a whole `gatekey-admin session exec` process.
fn exec_latency(bins: &Bins, rt: &tokio::runtime::Runtime, sizes: Sizes) -> Vec<Row> {
    let c = Cluster::start(bins);
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let client = client(&c);
    let mut rows = Vec::new();
    rt.block_on(async {
        let req = || ExecRequest {
            command: "true".into(),
            timeout_seconds: None,
            stdin: None,
        };
        for _ in 0..20 {
            client
                .exec_oneshot("hub-1", req())
                .await
                .expect("warm-up exec");
        }
        let mut v = Vec::with_capacity(sizes.latency_runs);
        for _ in 0..sizes.latency_runs {
            let t = Instant::now();
            let r = client.exec_oneshot("hub-1", req()).await.expect("exec");
            v.push(t.elapsed());
            assert_eq!(r.exit_code, Some(0));
        }
        rows.extend(latency_rows(
            "exec-latency",
            "one-shot API, warm",
            v,
            "p50 <= 3 ms",
        ));
        let mut v = Vec::with_capacity(sizes.latency_runs);
        for _ in 0..sizes.latency_runs {
            let t = Instant::now();
            let s = client
                .exec_stream(
                    "hub-1",
                    ExecOptions {
                        command: "true".into(),
                        timeout: None,
                        stdin: false,
                    },
                )
                .await
                .expect("exec stream");
            let status = s
                .run(None::<&[u8]>, tokio::io::sink(), tokio::io::sink())
                .await
                .expect("run");
            v.push(t.elapsed());
            assert_eq!(status.exit_code(), Some(0));
        }
        rows.extend(latency_rows(
            "exec-latency",
            "WebSocket stream (new TLS conn)",
            v,
            "",
        ));
    });
    let mut v = Vec::with_capacity(sizes.cli_runs);
    for _ in 0..sizes.cli_runs {
        let t = Instant::now();
        let st = c
            .admin()
            .args(["session", "exec", "hub-1", "true"])
            .stdin(Stdio::null())
            .status()
            .expect("cli");
        v.push(t.elapsed());
        assert!(st.success());
    }
    rows.extend(latency_rows("exec-latency", "gatekey-admin process", v, ""));
    rows
}

/// `head -c N /dev/zero` through `gatekey-admin session exec` into
/// /dev/null, and N bytes of stdin the other way into `cat > /dev/null`.
fn throughput(bins: &Bins, sizes: Sizes) -> Vec<Row> {
    let c = Cluster::start(bins);
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let n = sizes.throughput_bytes;
    let devnull = || std::fs::File::create("/dev/null").expect("/dev/null");
    let t = Instant::now();
    let st = c
        .admin()
        .args([
            "session",
            "exec",
            "hub-1",
            &format!("head -c {n} /dev/zero"),
        ])
        .stdin(Stdio::null())
        .stdout(devnull())
        .status()
        .expect("cli");
    let down = t.elapsed();
    assert!(st.success());
    let mut head = Command::new("head")
        .args(["-c", &n.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("head");
    let t = Instant::now();
    let st = c
        .admin()
        .args(["session", "exec", "hub-1", "cat > /dev/null"])
        .stdin(head.stdout.take().expect("head stdout"))
        .stdout(devnull())
        .status()
        .expect("cli");
    let up = t.elapsed();
    let _ = head.wait();
    assert!(st.success());
    let mbps = |d: Duration| format!("{:.0} MB/s", n as f64 / d.as_secs_f64() / 1e6);
    vec![
        Row {
            scenario: "throughput",
            metric: format!("stdout, {} MiB", n >> 20),
            value: mbps(down),
            target: ">= 1000 MB/s",
        },
        Row {
            scenario: "throughput",
            metric: format!("stdin, {} MiB", n >> 20),
            value: mbps(up),
            target: "",
        },
    ]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// N idle agents (simulated, real TLS and handshake): control-plane memory
/// per agent and the time for all to connect.
fn idle_agents(bins: &Bins, rt: &tokio::runtime::Runtime, sizes: Sizes) -> Vec<Row> {
    let c = Cluster::start(bins);
    let client = client(&c);
    let n = sizes.idle_agents;
    let pid = c.server_pid().expect("server pid");
    rt.block_on(async {
        let mut agents = Vec::with_capacity(n);
        for i in 0..n {
            let node = client
                .create_node(NodeType::Spoke, &format!("sim-{i}"), None, Some(true))
                .await
                .expect("create node");
            agents.push(SimAgent {
                name: format!("sim-{i}"),
                agent_type: "spoke".into(),
                token: node.token.unwrap_or_default(),
            });
        }
        // Let the server settle after the API burst, then take the baseline.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid);
        let endpoint = gatekey_proto::transport::Endpoint::parse(&c.url).expect("url");
        let tls = sim::tls(&c.ca_cert);
        let started = Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, a) in agents.into_iter().enumerate() {
            let (endpoint, tls, sem) = (endpoint.clone(), tls.clone(), sem.clone());
            tasks.spawn(async move {
                let _p = sem.acquire_owned().await;
                sim::connect(&endpoint, tls, Some(sim::source_addr(i)), &a).await
            });
        }
        let mut links = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            links.push(r.expect("task").expect("simulated agent connects"));
        }
        let connect_time = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let connected = client.list_agents(true).await.expect("list").len();
        let after = rss_kib(pid);
        let per_agent = (after.saturating_sub(before)) as f64 / n as f64;
        drop(links);
        vec![
            Row {
                scenario: "idle-agents",
                metric: format!("agents connected (of {n})"),
                value: connected.to_string(),
                target: "",
            },
            Row {
                scenario: "idle-agents",
                metric: "time for all to connect".into(),
                value: ms(connect_time),
                target: "",
            },
            Row {
                scenario: "idle-agents",
                metric: "control-plane RSS per idle agent".into(),
                value: format!("{per_agent:.1} KiB"),
                target: "<= 64 KiB",
            },
        ]
    })
}

/// Many connections need many descriptors: raise the soft limit to the hard
/// one (children, the control plane included, inherit it).
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

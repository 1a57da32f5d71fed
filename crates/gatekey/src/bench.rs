//! gatekey-bench: measures gatekey on this machine with real processes on
//! loopback and real TLS, and prints a table (and writes JSON).
//!
//! `gatekey-bench all` runs every scenario at full size; `gatekey-bench smoke`
//! runs each one tiny so CI keeps the programs working (nothing asserts a
//! duration). `gatekey-bench [smoke] SCENARIO...` runs some of them:
//! `exec-latency`, `console-echo`, `throughput`, `idle-agents` (alias
//! `capacity`), `reconnect-storm`, `fan-out`, `cluster` (replicas over NATS
//! and RabbitMQ, bench_cluster.rs). OpenSSH runs beside gatekey
//! inside exec-latency, console-echo and throughput (bench_ssh.rs).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gatekey_admin::api::{ExecRequest, NodeType};
use gatekey_admin::{Client, ClientConfig, ExecOptions};
use serde_json::json;

use crate::sim::SimAgent;
use crate::testkit::{Bins, Cluster};
use ssh::Sshd;

// One module per scenario, beside this file (declared here so the crate
// root stays as it is).
#[path = "bench_capacity.rs"]
mod capacity;
#[path = "bench_cluster.rs"]
mod cluster;
#[path = "bench_fanout.rs"]
mod fanout;
#[path = "bench_ssh.rs"]
pub(crate) mod ssh;
#[path = "bench_storm.rs"]
mod storm;

/// Sizes of one run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Tiny sizes for CI: OpenSSH comparisons are skipped when sshd is absent.
    pub smoke: bool,
    pub latency_runs: usize,
    pub cli_runs: usize,
    pub ssh_runs: usize,
    pub throughput_bytes: u64,
    /// Idle-agent counts measured one after the other.
    pub capacity_steps: &'static [usize],
    pub storm_agents: usize,
    pub fanout_agents: usize,
    pub fanout_rounds: usize,
    pub echo_runs: usize,
    /// The cluster scenario's one broker (`nats` or `rabbitmq`); both if None.
    pub broker: Option<&'static str>,
}

impl Sizes {
    pub const FULL: Sizes = Sizes {
        smoke: false,
        latency_runs: 1000,
        cli_runs: 200,
        ssh_runs: 1000,
        throughput_bytes: 2 << 30,
        capacity_steps: &[1000, 10_000, 50_000],
        storm_agents: 10_000,
        fanout_agents: 1000,
        fanout_rounds: 5,
        echo_runs: 2000,
        broker: None,
    };
    pub const SMOKE: Sizes = Sizes {
        smoke: true,
        latency_runs: 20,
        cli_runs: 5,
        ssh_runs: 10,
        throughput_bytes: 16 << 20,
        capacity_steps: &[20, 100],
        storm_agents: 50,
        fanout_agents: 20,
        fanout_rounds: 2,
        echo_runs: 50,
        broker: None,
    };
}

/// Every scenario, in the order `all` and `smoke` run them.
const SCENARIOS: &[&str] = &[
    "exec-latency",
    "console-echo",
    "throughput",
    "idle-agents",
    "reconnect-storm",
    "fan-out",
    "cluster",
];

/// One line of the result table.
pub(crate) struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub value: String,
    pub target: &'static str,
}

impl Row {
    pub(crate) fn new(
        scenario: &'static str,
        metric: impl Into<String>,
        value: impl Into<String>,
        target: &'static str,
    ) -> Row {
        Row {
            scenario,
            metric: metric.into(),
            value: value.into(),
            target,
        }
    }
}

fn usage() -> i32 {
    eprintln!(
        "usage: gatekey-bench [all | smoke | [smoke] SCENARIO...] [--agents N] [--broker NAME]\n\
         scenarios: {} (capacity = idle-agents)\n\
         --agents N: simulated agents for idle-agents (one step), reconnect-storm and fan-out\n\
         --broker nats|rabbitmq: the cluster scenario over that broker only",
        SCENARIOS.join(", ")
    );
    2
}

pub fn main() -> i32 {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        usage();
        return 0;
    }
    let mut agents = None;
    if let Some(i) = args.iter().position(|a| a == "--agents") {
        match args.get(i + 1).and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n > 0 => agents = Some(n),
            _ => return usage(),
        }
        args.drain(i..i + 2);
    }
    let mut broker = None;
    if let Some(i) = args.iter().position(|a| a == "--broker") {
        match args.get(i + 1).map(String::as_str) {
            Some("nats") => broker = Some("nats"),
            Some("rabbitmq") => broker = Some("rabbitmq"),
            _ => return usage(),
        }
        args.drain(i..i + 2);
    }
    let smoke = args.first().is_some_and(|a| a == "smoke");
    if smoke || args.first().is_some_and(|a| a == "all") {
        args.remove(0);
    }
    let mut sizes = if smoke { Sizes::SMOKE } else { Sizes::FULL };
    sizes.broker = broker;
    if let Some(n) = agents {
        sizes.capacity_steps = Vec::leak(vec![n]);
        sizes.storm_agents = n;
        sizes.fanout_agents = n;
    }
    let mut scenarios: Vec<&'static str> = Vec::new();
    for a in &args {
        let name = if a == "capacity" { "idle-agents" } else { a };
        match SCENARIOS.iter().find(|s| **s == name) {
            Some(s) => scenarios.push(s),
            None => return usage(),
        }
    }
    let mut label = match (smoke, scenarios.is_empty()) {
        (false, true) => "all".to_string(),
        (true, true) => "smoke".to_string(),
        (false, false) => scenarios.join("+"),
        (true, false) => format!("smoke-{}", scenarios.join("+")),
    };
    if let Some(n) = agents {
        label.push_str(&format!("-{n}-agents"));
    }
    if let Some(b) = broker {
        label.push_str(&format!("-{b}"));
    }
    if scenarios.is_empty() {
        scenarios = SCENARIOS.to_vec();
    }
    raise_nofile_limit();
    let bins = Bins::beside_current_exe();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    let started = Instant::now();
    for s in scenarios {
        eprintln!("== {s}");
        let t = Instant::now();
        let r = match s {
            "exec-latency" => exec_latency(&bins, &rt, sizes),
            "console-echo" => {
                crate::bench_echo::console_echo(&bins, &rt, sizes.echo_runs, sizes.smoke)
            }
            "throughput" => throughput(&bins, sizes),
            "idle-agents" => capacity::idle_agents(&bins, &rt, sizes),
            "reconnect-storm" => storm::reconnect_storm(&bins, &rt, sizes),
            "fan-out" => fanout::fan_out(&bins, &rt, sizes),
            "cluster" => cluster::cluster(&bins, &rt, sizes),
            _ => unreachable!("scenario names are checked above"),
        };
        eprintln!("== {s}: {:.1} s", t.elapsed().as_secs_f64());
        rows.extend(r);
    }
    eprintln!("== total {:.1} s", started.elapsed().as_secs_f64());
    print_table(&rows);
    let out = json!(rows
        .iter()
        .map(|r| json!({"scenario": r.scenario, "metric": r.metric, "value": r.value, "target": r.target}))
        .collect::<Vec<_>>());
    let dir = std::path::Path::new("bench-results");
    if std::fs::create_dir_all(dir).is_ok() {
        let file = dir.join(format!("{label}.json"));
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

pub fn client_config(c: &Cluster) -> ClientConfig {
    let mut cfg = ClientConfig::new(c.url.clone());
    cfg.api_key = Some(c.admin_key.clone());
    cfg.ca_cert = Some(c.ca_cert.clone());
    cfg
}

pub fn client(c: &Cluster) -> Client {
    Client::new(client_config(c)).expect("client")
}

/// The value at quantile `p` (0..=1) of `v`, which must be sorted.
pub(crate) fn quantile(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (quantile(&v, 0.50), quantile(&v, 0.90), quantile(&v, 0.99))
}

pub(crate) fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    quantile(&v, 0.5)
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
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
        Row::new(scenario, format!("{what} p50 (n={n})"), ms(p50), target),
        Row::new(scenario, format!("{what} p90"), ms(p90), ""),
        Row::new(scenario, format!("{what} p99"), ms(p99), ""),
    ]
}

/// `a / b` as a row, for the gatekey/OpenSSH comparisons.
pub(crate) fn ratio_row(scenario: &'static str, metric: &str, a: f64, b: f64) -> Row {
    Row::new(scenario, metric, format!("{:.2}", a / b), "")
}

/// `true` on `agent` through the one-shot API on a warm connection, after
/// 20 runs of warm-up: the time of each of `runs`.
pub(crate) async fn oneshot_latency(client: &Client, agent: &str, runs: usize) -> Vec<Duration> {
    for _ in 0..20 {
        client
            .exec_oneshot(agent, true_exec())
            .await
            .expect("warm-up exec");
    }
    oneshot_latency_unwarmed(client, agent, runs).await
}

fn true_exec() -> ExecRequest {
    ExecRequest {
        command: "true".into(),
        timeout_seconds: None,
        stdin: None,
    }
}

/// `runs` one-shot execs of `true` on a connection already warm.
pub(crate) async fn oneshot_latency_unwarmed(
    client: &Client,
    agent: &str,
    runs: usize,
) -> Vec<Duration> {
    let req = true_exec;
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let r = client.exec_oneshot(agent, req()).await.expect("exec");
        v.push(t.elapsed());
        assert_eq!(r.exit_code, Some(0));
    }
    v
}

/// `true` through control plane and agent: the client library on a warm
/// connection (one-shot API over keep-alive, and a WebSocket stream per
/// exec), and a whole `gatekey-admin session exec` process. Beside it,
/// `ssh host true` over a ControlMaster connection.
fn exec_latency(bins: &Bins, rt: &tokio::runtime::Runtime, sizes: Sizes) -> Vec<Row> {
    let c = Cluster::start(bins);
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let client = client(&c);
    let mut rows = Vec::new();
    let oneshot = rt.block_on(async {
        let v = oneshot_latency(&client, "hub-1", sizes.latency_runs).await;
        let oneshot = median(&v);
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
        oneshot
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
    let cli = median(&v);
    rows.extend(latency_rows("exec-latency", "gatekey-admin process", v, ""));
    drop(c);
    let ssh = Sshd::start(sizes.smoke).and_then(|sshd| sshd.mux_exec_latency(sizes.ssh_runs));
    match ssh {
        Ok(v) => {
            let ssh = median(&v).as_secs_f64();
            rows.extend(latency_rows(
                "exec-latency",
                "ssh true, ControlMaster (process)",
                v,
                "",
            ));
            rows.push(ratio_row(
                "exec-latency",
                "time ratio gatekey-admin / ssh, p50",
                cli.as_secs_f64(),
                ssh,
            ));
            rows.push(ratio_row(
                "exec-latency",
                "time ratio one-shot API / ssh, p50",
                oneshot.as_secs_f64(),
                ssh,
            ));
        }
        Err(why) => eprintln!("exec-latency: OpenSSH comparison skipped: {why}"),
    }
    rows
}

fn devnull() -> std::fs::File {
    std::fs::File::create("/dev/null").expect("/dev/null")
}

/// `head -c N /dev/zero` on `agent` through `gatekey-admin session exec`
/// into /dev/null: the time it took.
pub(crate) fn stdout_transfer(c: &Cluster, agent: &str, n: u64) -> Duration {
    let t = Instant::now();
    let st = c
        .admin()
        .args(["session", "exec", agent, &format!("head -c {n} /dev/zero")])
        .stdin(Stdio::null())
        .stdout(devnull())
        .status()
        .expect("cli");
    let took = t.elapsed();
    assert!(st.success());
    took
}

/// `n` bytes of stdin into `cat > /dev/null` on `agent`: the time it took.
pub(crate) fn stdin_transfer(c: &Cluster, agent: &str, n: u64) -> Duration {
    let mut head = Command::new("head")
        .args(["-c", &n.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("head");
    let t = Instant::now();
    let st = c
        .admin()
        .args(["session", "exec", agent, "cat > /dev/null"])
        .stdin(head.stdout.take().expect("head stdout"))
        .stdout(devnull())
        .status()
        .expect("cli");
    let took = t.elapsed();
    let _ = head.wait();
    assert!(st.success());
    took
}

/// CPU time used so far by each process of a transfer.
#[derive(Clone, Copy)]
struct TransferCpu {
    control_plane: Duration,
    agent: Duration,
    /// The remote command (`sh`, `head`): children the agent has reaped.
    command: Duration,
    /// `gatekey-admin`: children this bench has reaped.
    cli: Duration,
}

impl TransferCpu {
    fn now(server: u32, agent: u32) -> TransferCpu {
        TransferCpu {
            control_plane: cpu_time(server),
            agent: cpu_time(agent),
            command: children_cpu_time(agent),
            cli: own_children_cpu_time(),
        }
    }

    fn since(self, before: TransferCpu) -> TransferCpu {
        TransferCpu {
            control_plane: self.control_plane.saturating_sub(before.control_plane),
            agent: self.agent.saturating_sub(before.agent),
            command: self.command.saturating_sub(before.command),
            cli: self.cli.saturating_sub(before.cli),
        }
    }

    fn total(&self) -> Duration {
        self.control_plane + self.agent + self.command + self.cli
    }
}

/// `head -c N /dev/zero | cat > /dev/null` on this machine: the same bytes
/// through one pipe, with no network, TLS or framing. No tool that moves
/// them between processes can beat it here.
fn local_pipe(n: u64) -> (Duration, Duration) {
    let before = own_children_cpu_time();
    let t = Instant::now();
    let st = Command::new("sh")
        .args(["-c", &format!("head -c {n} /dev/zero | cat > /dev/null")])
        .status()
        .expect("sh");
    let took = t.elapsed();
    assert!(st.success());
    (took, own_children_cpu_time().saturating_sub(before))
}

/// Stdout and stdin throughput through gatekey, then the same through ssh,
/// and the local pipe they are bounded by.
fn throughput(bins: &Bins, sizes: Sizes) -> Vec<Row> {
    let c = Cluster::start(bins);
    let (_, agent) = c.agent("mesh hub", "hub-1", true);
    let n = sizes.throughput_bytes;
    let server = c.server_pid().expect("control plane running");
    let before = TransferCpu::now(server, agent.pid());
    let down = stdout_transfer(&c, "hub-1", n);
    let cpu = TransferCpu::now(server, agent.pid()).since(before);
    let up = stdin_transfer(&c, "hub-1", n);
    drop(agent);
    drop(c);
    let (pipe, pipe_cpu) = local_pipe(n);
    let mb_s = |d: Duration| n as f64 / d.as_secs_f64() / 1e6;
    let mbps = |d: Duration| format!("{:.0} MB/s", mb_s(d));
    // CPU seconds per GB moved, the unit that says where the time goes.
    let per_gb = |d: Duration| d.as_secs_f64() * 1e9 / n as f64;
    let mut rows = vec![
        Row::new(
            "throughput",
            format!("stdout, {} MiB", n >> 20),
            mbps(down),
            ">= 1000 MB/s",
        ),
        Row::new(
            "throughput",
            format!("stdin, {} MiB", n >> 20),
            mbps(up),
            "",
        ),
        Row::new(
            "throughput",
            "stdout, CPU-s per GB: control plane / agent / head / CLI = total",
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2} = {:.2}",
                per_gb(cpu.control_plane),
                per_gb(cpu.agent),
                per_gb(cpu.command),
                per_gb(cpu.cli),
                per_gb(cpu.total())
            ),
            "",
        ),
        Row::new(
            "throughput",
            format!("local pipe, no network: head -c {} MiB | cat", n >> 20),
            mbps(pipe),
            "",
        ),
        Row::new(
            "throughput",
            "local pipe, CPU-s per GB",
            format!("{:.2}", per_gb(pipe_cpu)),
            "",
        ),
    ];
    let ssh = Sshd::start(sizes.smoke).and_then(|sshd| {
        let cipher = sshd.cipher();
        let ssh_down = sshd.stdout_throughput(n)?;
        let ssh_up = sshd.stdin_throughput(n)?;
        Ok((cipher, ssh_down, ssh_up))
    });
    match ssh {
        Ok((cipher, ssh_down, ssh_up)) => {
            rows.extend([
                Row::new(
                    "throughput",
                    format!("ssh stdout, {} MiB ({cipher})", n >> 20),
                    mbps(ssh_down),
                    "",
                ),
                Row::new(
                    "throughput",
                    format!("ssh stdin, {} MiB", n >> 20),
                    mbps(ssh_up),
                    "",
                ),
                ratio_row(
                    "throughput",
                    "rate ratio gatekey / ssh, stdout",
                    mb_s(down),
                    mb_s(ssh_down),
                ),
                ratio_row(
                    "throughput",
                    "rate ratio gatekey / ssh, stdin",
                    mb_s(up),
                    mb_s(ssh_up),
                ),
            ]);
        }
        Err(why) => eprintln!("throughput: OpenSSH comparison skipped: {why}"),
    }
    rows
}

/// Resident memory of a process, KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User plus system CPU time a process has used so far.
pub(crate) fn cpu_time(pid: u32) -> Duration {
    stat_ticks(pid, 11) + stat_ticks(pid, 12)
}

/// CPU time of the children a process has waited for.
fn children_cpu_time(pid: u32) -> Duration {
    stat_ticks(pid, 13) + stat_ticks(pid, 14)
}

/// Field `i` (counted after the command name, which may contain spaces) of
/// /proc/PID/stat, in clock ticks (100 per second on Linux).
fn stat_ticks(pid: u32, i: usize) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let ticks = rest
        .split_whitespace()
        .nth(i)
        .and_then(|x| x.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// CPU time of this process's children that have been waited for.
fn own_children_cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

/// The soft RLIMIT_NOFILE of a process, from /proc (to check what the
/// control plane inherited).
pub(crate) fn nofile_of(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Registers `n` spokes `sim-0`, `sim-1`, … through the API and returns
/// their identities. There is no bulk API: a few clients, each on its own
/// keep-alive connection, create nodes concurrently (the server writes one
/// audit record per node, serially, so more clients would not help). Ids
/// are given, not drawn: random 32-bit ids collide within 50,000 nodes.
pub async fn register_sim_nodes(c: &Cluster, n: usize) -> Vec<SimAgent> {
    const CLIENTS: usize = 8;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS.min(n.max(1)) {
        let (cfg, next) = (client_config(c), next.clone());
        tasks.spawn(async move {
            let client = Client::new(cfg).expect("client");
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return made;
                }
                let name = format!("sim-{i}");
                let node = client
                    .create_node(NodeType::Spoke, &name, Some(&format!("sim{i}")), Some(true))
                    .await
                    .unwrap_or_else(|e| panic!("create node {name}: {e}"));
                made.push((
                    i,
                    SimAgent {
                        name,
                        agent_type: "spoke".into(),
                        token: node.token.expect("a new node's token"),
                    },
                ));
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("registration task"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, a)| a).collect()
}

/// Many connections need many descriptors: raise the soft limit to the hard
/// one. Children, the control plane included, inherit it (the capacity
/// scenario checks /proc/PID/limits). Raising the hard limit itself needs
/// CAP_SYS_RESOURCE; containers often lack it.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        // Try for a million first, as the systemd unit sets; fall back to the hard limit.
        if setrlimit(Resource::RLIMIT_NOFILE, 1 << 20, (1 << 20).max(hard)).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// This process's soft RLIMIT_NOFILE (the control plane inherits it).
pub(crate) fn nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

//! Capacity: N idle agents on one control plane — 1,000, then 10,000, then
//! 50,000 — from the agent simulator (real TCP, TLS, WebSocket and
//! hello/welcome per agent, spread over 127.0.x.y source addresses). Per
//! step: control-plane RSS growth per agent, the time for all N to connect
//! and the control plane's CPU per connection. Registering the nodes is
//! setup and timed separately.

use std::time::{Duration, Instant};

use crate::bench::{
    Row, Sizes, client, cpu_time, nofile_limit, nofile_of, register_sim_nodes, rss_kib, secs,
};
use crate::sim::{self, Fleet};
use crate::testkit::{Bins, Cluster};

const SCENARIO: &str = "idle-agents";

/// Descriptors kept free in each process for everything but agent links
/// (database, log, listener, API clients, the runtime).
const FD_HEADROOM: u64 = 1000;

/// First connections in flight at once: enough to keep both cores busy
/// with handshakes, few enough not to overflow the control plane's listen
/// queue (1024) and time out.
pub(crate) const CONNECT_CONCURRENCY: usize = 128;

/// The largest agent count the descriptor limit allows: each agent is one
/// socket in the control plane and one in this process, and the control
/// plane inherits this process's limit.
pub(crate) fn max_agents() -> usize {
    let n = nofile_limit().saturating_sub(FD_HEADROOM) as usize;
    if n >= 1000 { n / 1000 * 1000 } else { n }
}

pub fn idle_agents(bins: &Bins, rt: &tokio::runtime::Runtime, sizes: Sizes) -> Vec<Row> {
    let max = max_agents();
    let mut rows = Vec::new();
    // Steps beyond what the descriptor limit allows run at the largest count it does.
    let mut steps: Vec<(usize, usize)> = Vec::new();
    for &want in sizes.capacity_steps {
        let n = want.min(max);
        if steps.iter().any(|&(_, m)| m == n) {
            rows.push(skipped_row(want, n));
            continue;
        }
        steps.push((want, n));
    }
    let largest = steps.iter().map(|&(_, n)| n).max().unwrap_or(0);
    let mut c = Cluster::start(bins);
    let server_nofile = c.server_pid().and_then(nofile_of).unwrap_or(0);
    rows.push(Row::new(
        SCENARIO,
        "RLIMIT_NOFILE of bench / control plane",
        format!("{} / {server_nofile}", nofile_limit()),
        "",
    ));
    let t = Instant::now();
    let agents = rt.block_on(register_sim_nodes(&c, largest));
    let setup = t.elapsed();
    rows.push(Row::new(
        SCENARIO,
        format!("setup: register {largest} nodes through the API"),
        format!(
            "{} ({:.0}/s)",
            secs(setup),
            largest as f64 / setup.as_secs_f64()
        ),
        "",
    ));
    for (want, n) in steps {
        if n < want {
            rows.push(skipped_row(want, n));
        }
        // A fresh control-plane process per step: the baseline is not
        // inflated by the registration burst or the previous step.
        c.restart_server(false);
        let pid = c.server_pid().expect("server pid");
        let target = if want == *sizes.capacity_steps.last().unwrap_or(&0) {
            "<= 64 KiB at 50,000"
        } else {
            ""
        };
        rows.extend(rt.block_on(step(&c, pid, agents[..n].to_vec(), target)));
    }
    rows
}

fn skipped_row(want: usize, ran: usize) -> Row {
    Row::new(
        SCENARIO,
        format!("{want} agents"),
        format!("not run: RLIMIT_NOFILE {} allows {ran}", nofile_limit()),
        "",
    )
}

/// Connects `agents`, waits until all are connected and the control plane
/// is idle, and reports memory, time and CPU.
async fn step(c: &Cluster, pid: u32, agents: Vec<sim::SimAgent>, target: &'static str) -> Vec<Row> {
    let n = agents.len();
    let client = client(c);
    // Warm the API path so its one-time allocations are in the baseline.
    client.list_agents(true).await.expect("list agents");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid);
    let cpu_before = cpu_time(pid);
    let sim_cpu_before = cpu_time(std::process::id());
    let endpoint = gatekey_proto::transport::Endpoint::parse(&c.url).expect("url");
    let started = Instant::now();
    let fleet = Fleet::start(&endpoint, sim::tls(&c.ca_cert), agents, CONNECT_CONCURRENCY);
    let all = fleet
        .wait_connected(started, n, Duration::from_secs(300))
        .await;
    let cpu = cpu_time(pid).saturating_sub(cpu_before);
    let sim_cpu = cpu_time(std::process::id()).saturating_sub(sim_cpu_before);
    let up = fleet.connected_since(started);
    // Let heartbeats and the per-connection database writes settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let listed = client.list_agents(true).await.map(|l| l.len()).unwrap_or(0);
    let attempts = fleet.attempts();
    for e in fleet.errors() {
        eprintln!("{SCENARIO}: a connect attempt failed: {e}");
    }
    fleet.stop().await;
    let per_agent = after.saturating_sub(before) as f64 / n as f64;
    let mut rows = vec![
        Row::new(
            SCENARIO,
            format!("{n} agents: time for all to connect"),
            match all {
                Some(t) => {
                    let d = t - started;
                    format!("{} ({:.0}/s)", secs(d), n as f64 / d.as_secs_f64())
                }
                None => format!("only {up} within 300 s"),
            },
            "",
        ),
        Row::new(
            SCENARIO,
            format!("{n} agents: control-plane RSS per idle agent"),
            format!("{per_agent:.1} KiB"),
            target,
        ),
        Row::new(
            SCENARIO,
            format!("{n} agents: control-plane CPU per connect"),
            format!("{:.0} µs", cpu.as_secs_f64() * 1e6 / n as f64),
            "",
        ),
        Row::new(
            SCENARIO,
            format!("{n} agents: simulator CPU per connect (same 2 cores)"),
            format!("{:.0} µs", sim_cpu.as_secs_f64() * 1e6 / n as f64),
            "",
        ),
        Row::new(
            SCENARIO,
            format!("{n} agents: listed as connected by the API"),
            listed.to_string(),
            "",
        ),
    ];
    if attempts.failures > 0 {
        rows.push(Row::new(
            SCENARIO,
            format!("{n} agents: failed connect attempts (retried)"),
            attempts.failures.to_string(),
            "",
        ));
    }
    rows
}

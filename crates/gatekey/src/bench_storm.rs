//! Reconnect storm: N simulated agents connected, the control plane killed
//! (SIGKILL, as a crash or an OOM kill would) and started again on the same
//! port and data directory; how long until all N are connected again. The
//! simulated agents reconnect with the real agent's policy (full-jitter
//! exponential backoff from 1 s, sim.rs), so the first wave comes within a
//! second and those that find the port closed back off to 2 s, 4 s, ….

use std::time::{Duration, Instant};

use crate::bench::capacity::{CONNECT_CONCURRENCY, max_agents};
use crate::bench::{Row, Sizes, client, latency_rows, register_sim_nodes, rss_kib, secs};
use crate::sim::{self, Fleet};
use crate::testkit::{Bins, Cluster};

const SCENARIO: &str = "reconnect-storm";

/// Give up waiting after this long (nothing asserts a duration; this only
/// keeps a broken run from hanging).
const GIVE_UP: Duration = Duration::from_secs(180);

pub fn reconnect_storm(bins: &Bins, rt: &tokio::runtime::Runtime, sizes: Sizes) -> Vec<Row> {
    let n = sizes.storm_agents.min(max_agents());
    let mut rows = Vec::new();
    if n < sizes.storm_agents {
        rows.push(Row::new(
            SCENARIO,
            format!("{} agents", sizes.storm_agents),
            format!("not run: the descriptor limit allows {n}"),
            "",
        ));
    }
    let mut c = Cluster::start(bins);
    let endpoint = gatekey_proto::transport::Endpoint::parse(&c.url).expect("url");
    let tls = sim::tls(&c.ca_cert);
    let fleet = rt.block_on(async {
        let agents = register_sim_nodes(&c, n).await;
        let started = Instant::now();
        let fleet = Fleet::start(&endpoint, tls, agents, CONNECT_CONCURRENCY);
        let all = fleet.wait_connected(started, n, GIVE_UP).await;
        assert!(
            all.is_some(),
            "only {} of {n} agents connected before the restart",
            fleet.connected_since(started)
        );
        // Settle: the per-connection database writes and audit records finish.
        tokio::time::sleep(Duration::from_secs(2)).await;
        fleet
    });
    let before = fleet.attempts();
    let overflows_before = listen_drops();
    let killed = Instant::now();
    // Kill -9, then start again on the same address and data directory.
    c.restart_server(true);
    let listening = Instant::now();
    let pid = c.server_pid().expect("server pid");
    let all = rt.block_on(fleet.wait_connected(killed, n, GIVE_UP));
    let up = fleet.connected_since(killed);
    let times = fleet.link_times_since(killed);
    let after = fleet.attempts();
    let overflows = listen_drops().saturating_sub(overflows_before);
    let alive = server_alive(pid);
    let (listed, rss) = rt.block_on(async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let listed = client(&c).list_agents(true).await.map(|l| l.len());
        (listed, rss_kib(pid))
    });
    for e in fleet.errors() {
        eprintln!("{SCENARIO}: a connect attempt failed: {e}");
    }
    rt.block_on(fleet.stop());
    rows.push(Row::new(
        SCENARIO,
        format!("{n} agents: kill -9 to all connected again"),
        match all {
            Some(t) => secs(t - killed),
            None => format!("only {up} of {n} within {}", secs(GIVE_UP)),
        },
        "<= 30 s for 10,000",
    ));
    rows.push(Row::new(
        SCENARIO,
        "of which: control plane restarting (kill to listening)",
        secs(listening - killed),
        "",
    ));
    if !times.is_empty() {
        rows.extend(latency_rows(
            SCENARIO,
            "per agent: kill to connected",
            times,
            "",
        ));
    }
    rows.push(Row::new(
        SCENARIO,
        "connect attempts / failed during the storm",
        format!(
            "{} / {}",
            after.attempts - before.attempts,
            after.failures - before.failures
        ),
        "",
    ));
    rows.push(Row::new(
        SCENARIO,
        "listen queue overflows + drops (kernel)",
        overflows.to_string(),
        "",
    ));
    rows.push(Row::new(
        SCENARIO,
        "control plane after the storm",
        match (alive, listed) {
            (true, Ok(l)) => format!("up, lists {l} agents, RSS {} MiB", rss / 1024),
            (true, Err(e)) => format!("up, but listing failed: {e}"),
            (false, _) => "DIED".into(),
        },
        "stays up",
    ));
    rows
}

/// Whether our child `pid` is still running (not gone, not a zombie).
fn server_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// TcpExt ListenOverflows + ListenDrops of this network namespace: SYNs or
/// completed handshakes the kernel dropped because an accept queue was full.
fn listen_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        return names
            .split_whitespace()
            .zip(values.split_whitespace())
            .filter(|(k, _)| *k == "ListenOverflows" || *k == "ListenDrops")
            .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
            .sum();
    }
    0
}

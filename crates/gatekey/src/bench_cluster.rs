//! Cross-replica cost: two replicas on PostgreSQL joined by NATS, then by
//! RabbitMQ, with the agent on r2. The same exec latency and throughput are
//! measured with the client on r2 (same replica) and on r1 (carried over
//! the broker), and the difference printed. Skipped (with a message) for a
//! broker or database that is not running.

use std::time::Duration;

use super::{
    Row, Sizes, client, cpu_time, latency_rows, median, ms, oneshot_latency,
    oneshot_latency_unwarmed, stdin_transfer, stdout_transfer,
};
use crate::testkit::{Bins, Cluster, postgres_schema_url, start_replicas};

/// Name, address, URL, and the broker's process name (for its CPU time).
const BROKERS: &[(&str, &str, &str, &str)] = &[
    (
        "nats",
        "127.0.0.1:4222",
        "nats://127.0.0.1:4222",
        "nats-server",
    ),
    (
        "rabbitmq",
        "127.0.0.1:5672",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "beam.smp",
    ),
];

/// Throughput transfers per figure.
const THROUGHPUT_ROUNDS: usize = 5;

pub(crate) fn cluster(bins: &Bins, rt: &tokio::runtime::Runtime, sizes: Sizes) -> Vec<Row> {
    let mut rows = Vec::new();
    for &(name, addr, url, process) in BROKERS {
        if sizes.broker.is_some_and(|b| b != name) {
            continue;
        }
        let reachable = addr.parse().ok().is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
        });
        if !reachable {
            eprintln!("cluster: {name} skipped: nothing listens on {addr}");
            continue;
        }
        let Some(db) = postgres_schema_url("bench") else {
            eprintln!("cluster: skipped: no PostgreSQL (GATEKEY_TEST_POSTGRES_URL)");
            return rows;
        };
        let replicas = start_replicas(bins, 2, &db, url, "replica_timeout: 15s\n");
        let (near, far) = (&replicas[1], &replicas[0]);
        let node = far.create_node("mesh hub", "hub-1");
        let cfg = near.agent_config("hub-1", &node.token, true, "");
        let agent = near.spawn_agent(&cfg);
        near.wait_for_agent("hub-1", true, &agent);
        let scenario: &'static str = if name == "nats" {
            "cluster-nats"
        } else {
            "cluster-rabbitmq"
        };
        let (same, across) = exec_latency(near, far, rt, sizes.latency_runs);
        let (same_p50, across_p50) = (median(&same), median(&across));
        rows.extend(latency_rows(
            scenario,
            "one-shot exec, same replica",
            same,
            "",
        ));
        rows.extend(latency_rows(
            scenario,
            "one-shot exec, across replicas",
            across,
            "",
        ));
        rows.push(Row::new(
            scenario,
            "added by crossing replicas, p50",
            ms(across_p50.saturating_sub(same_p50)),
            "<= 1 ms",
        ));
        let n = sizes.throughput_bytes / 4;
        // One transfer is at the mercy of whatever else the machine does:
        // same and across alternate, and each figure is the median.
        let rounds = if sizes.smoke { 1 } else { THROUGHPUT_ROUNDS };
        let mut runs: [Vec<Duration>; 4] = Default::default();
        // CPU time per stdout transfer: the replicas, and the broker.
        let mut cpu: [Vec<Duration>; 3] = Default::default();
        let pids: Vec<u32> = [near, far].iter().filter_map(|c| c.server_pid()).collect();
        let broker = pids_named(process);
        let replicas_cpu = || pids.iter().map(|&p| cpu_time(p)).sum::<Duration>();
        let broker_cpu = || broker.iter().map(|&p| cpu_time(p)).sum::<Duration>();
        for _ in 0..rounds {
            let before = replicas_cpu();
            let same_down = stdout_transfer(near, "hub-1", n);
            cpu[0].push(replicas_cpu().saturating_sub(before));
            let same_up = stdin_transfer(near, "hub-1", n);
            let (before, before_broker) = (replicas_cpu(), broker_cpu());
            let far_down = stdout_transfer(far, "hub-1", n);
            cpu[1].push(replicas_cpu().saturating_sub(before));
            cpu[2].push(broker_cpu().saturating_sub(before_broker));
            let far_up = stdin_transfer(far, "hub-1", n);
            for (v, d) in runs.iter_mut().zip([same_down, same_up, far_down, far_up]) {
                v.push(d);
            }
        }
        let [same_down, same_up, far_down, far_up] = runs.map(|v| median(&v));
        let per_gb = |d: Duration| format!("{:.2} s", d.as_secs_f64() * 1e9 / n as f64);
        let [same_cpu, far_cpu, broker_cpu] = cpu.map(|v| median(&v));
        let mb = |d: Duration| n as f64 / d.as_secs_f64() / 1e6;
        for (what, same, across) in [("stdout", same_down, far_down), ("stdin", same_up, far_up)] {
            rows.push(Row::new(
                scenario,
                format!("{what} {} MiB, same replica, median of {rounds}", n >> 20),
                format!("{:.0} MB/s", mb(same)),
                "",
            ));
            rows.push(Row::new(
                scenario,
                format!(
                    "{what} {} MiB, across replicas, median of {rounds}",
                    n >> 20
                ),
                format!("{:.0} MB/s", mb(across)),
                "",
            ));
            rows.push(Row::new(
                scenario,
                format!("{what} across / same"),
                format!("{:.0}%", 100.0 * mb(across) / mb(same)),
                ">= 50%",
            ));
        }
        rows.push(Row::new(
            scenario,
            "stdout CPU per GB, same replica: replica",
            per_gb(same_cpu),
            "",
        ));
        rows.push(Row::new(
            scenario,
            "stdout CPU per GB, across: replicas",
            per_gb(far_cpu),
            "",
        ));
        if !broker.is_empty() {
            rows.push(Row::new(
                scenario,
                format!("stdout CPU per GB, across: {process}"),
                per_gb(broker_cpu),
                "",
            ));
        }
        drop(agent);
    }
    rows
}

/// Processes of this name (the broker's, when it runs on this machine).
fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .collect()
}

/// One-shot exec latency through `near` (the agent's replica) and `far`,
/// interleaved call by call, so that whatever else the machine does weighs
/// on both alike.
fn exec_latency(
    near: &Cluster,
    far: &Cluster,
    rt: &tokio::runtime::Runtime,
    runs: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let (near, far) = (client(near), client(far));
    rt.block_on(async {
        oneshot_latency(&near, "hub-1", 0).await;
        oneshot_latency(&far, "hub-1", 0).await;
        let (mut same, mut across) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        for i in 0..runs {
            // Alternate which goes first, so neither always follows the other.
            let order = if i % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_near in order {
                let (c, into) = if is_near {
                    (&near, &mut same)
                } else {
                    (&far, &mut across)
                };
                into.extend(oneshot_latency_unwarmed(c, "hub-1", 1).await);
            }
        }
        (same, across)
    })
}

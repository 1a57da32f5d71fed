//! Fan-out: `true` on N simulated agents at once through the client
//! library's one-shot exec, timed from the first request to the last
//! result, plus each exec's own latency. The agents answer every exec with
//! exit 0 at once, so what is measured is the control plane's and the
//! client's share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gatekey_admin::Client;
use gatekey_admin::api::ExecRequest;

use crate::bench::capacity::CONNECT_CONCURRENCY;
use crate::bench::{Row, Sizes, client, cpu_time, latency_rows, median, register_sim_nodes, secs};
use crate::sim::{self, Fleet};
use crate::testkit::{Bins, Cluster};

const SCENARIO: &str = "fan-out";

pub fn fan_out(bins: &Bins, rt: &tokio::runtime::Runtime, sizes: Sizes) -> Vec<Row> {
    let n = sizes.fanout_agents;
    let c = Cluster::start(bins);
    rt.block_on(async {
        let agents = register_sim_nodes(&c, n).await;
        let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
        let endpoint = gatekey_proto::transport::Endpoint::parse(&c.url).expect("url");
        let started = Instant::now();
        let fleet = Fleet::start(&endpoint, sim::tls(&c.ca_cert), agents, CONNECT_CONCURRENCY);
        assert!(
            fleet
                .wait_connected(started, n, Duration::from_secs(120))
                .await
                .is_some(),
            "the agents did not all connect"
        );
        // One client, i.e. one keep-alive connection, per request in flight:
        // a Client sends its requests one after another (HTTP/1.1). The
        // connections are opened before the clock starts.
        let clients: Vec<Arc<Client>> = (0..n).map(|_| Arc::new(client(&c))).collect();
        let mut warm = tokio::task::JoinSet::new();
        for cl in &clients {
            let cl = cl.clone();
            warm.spawn(async move { cl.whoami().await.map(drop) });
        }
        while let Some(r) = warm.join_next().await {
            r.expect("task").expect("warm-up request");
        }
        let mut totals = Vec::new();
        let mut each = Vec::new();
        let mut failed = 0;
        let pid = c.server_pid().expect("server pid");
        let mut cpu = Duration::ZERO;
        // Round 0 warms the agent links' first streams and is not counted.
        for round in 0..=sizes.fanout_rounds {
            let cpu_before = cpu_time(pid);
            let (total, latencies, failures) = fan_out_once(&clients, &names).await;
            if round > 0 {
                cpu += cpu_time(pid).saturating_sub(cpu_before);
                totals.push(total);
                each.extend(latencies);
                failed += failures;
            }
        }
        fleet.stop().await;
        let worst = totals.iter().max().copied().unwrap_or_default();
        let mut rows = vec![
            Row::new(
                SCENARIO,
                format!(
                    "{n} agents, first request to last result (median of {})",
                    totals.len()
                ),
                secs(median(&totals)),
                "<= 1 s for 1,000",
            ),
            Row::new(SCENARIO, "slowest round", secs(worst), ""),
            Row::new(
                SCENARIO,
                "control-plane CPU per exec",
                format!(
                    "{:.0} µs",
                    cpu.as_secs_f64() * 1e6 / (n * totals.len()).max(1) as f64
                ),
                "",
            ),
        ];
        rows.extend(latency_rows(SCENARIO, "each exec", each, ""));
        if failed > 0 {
            rows.push(Row::new(
                SCENARIO,
                "execs that failed",
                failed.to_string(),
                "",
            ));
        }
        rows
    })
}

/// Sends `true` to every agent at once; returns the time from the first
/// request to the last result, each exec's latency and how many failed.
async fn fan_out_once(
    clients: &[Arc<Client>],
    names: &[String],
) -> (Duration, Vec<Duration>, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for (cl, name) in clients.iter().zip(names) {
        let (cl, name) = (cl.clone(), name.clone());
        tasks.spawn(async move {
            let t = Instant::now();
            let r = cl
                .exec_oneshot(
                    &name,
                    ExecRequest {
                        command: "true".into(),
                        timeout_seconds: None,
                        stdin: None,
                    },
                )
                .await;
            let ok = match r {
                Ok(r) if r.exit_code == Some(0) => true,
                Ok(r) => {
                    eprintln!("{SCENARIO}: {name}: exit {:?}", r.exit_code);
                    false
                }
                Err(e) => {
                    eprintln!("{SCENARIO}: {name}: {e}");
                    false
                }
            };
            (t.elapsed(), Instant::now(), ok)
        });
    }
    let mut latencies = Vec::with_capacity(names.len());
    let mut last = start;
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        let (latency, done, ok) = r.expect("exec task");
        latencies.push(latency);
        last = last.max(done);
        failed += usize::from(!ok);
    }
    (last - start, latencies, failed)
}

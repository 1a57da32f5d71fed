//! Dropping a run closes everything it opened. A test binary of its own: the check counts
//! the process's file descriptors, which concurrent tests would disturb.

mod common;

use std::time::Duration;

use common::request;
use gatekey_diag::{Limits, Request};
use serde_json::json;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn dropping_the_future_closes_its_sockets() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let limits = Limits::default();
        let dns = common::DnsServer::start("127.0.0.1:0");
        let _listeners: Vec<std::net::UdpSocket> = (33434..33434 + 15)
            .filter_map(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).ok())
            .collect();
        let silent: Vec<_> = (0..20)
            .map(|_| common::silent_port("127.0.0.1".parse().unwrap()))
            .collect();
        let silent_ports: Vec<String> = silent.iter().map(|s| s.0.to_string()).collect();
        let silent_ports = silent_ports.join(",");
        let requests: Vec<Request> = vec![
            request(json!({"tool":"ping","host":"127.0.0.1","count":100,"interval_ms":200})),
            // Probes to ports somebody listens on get no answer: the hops stay silent.
            request(json!({"tool":"traceroute","host":"127.0.0.1","numeric":true})),
            request(
                json!({"tool":"nmap","host":"127.0.0.1","ports":silent_ports,"timeout_ms":5000}),
            ),
            // The server never answers this name.
            request(json!({"tool":"nslookup","host":"slow.test","server":dns.addr.to_string()})),
        ];
        for req in &requests {
            let before = open_fds();
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            let mut run = Box::pin(gatekey_diag::run(req, &limits, tx));
            let during = tokio::select! {
                r = &mut run => match r {
                    // Without ICMP sockets ping cannot start; nothing to check then.
                    Err(gatekey_diag::DiagError::Permission(_)) => continue,
                    r => panic!("{} finished early: {r:?}", req.tool()),
                },
                _ = async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    while rx.try_recv().is_ok() {}
                } => open_fds(),
            };
            drop(run);
            // The resolver's connection tasks notice they were dropped on their next turn.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let after = open_fds();
            println!(
                "{}: fds before {before}, during {during}, after {after}",
                req.tool()
            );
            assert!(during > before, "{}: the run opened nothing?", req.tool());
            assert!(
                after <= before,
                "{}: fds before {before}, after {after}",
                req.tool()
            );
        }
    });
}

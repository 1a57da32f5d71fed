//! The tools through real routers: a client, two forwarding routers and a target, each in its
//! own network namespace joined by veth pairs (see `common::Topology`). The tools run inside
//! the client namespace on a current_thread runtime. Needs root; skips (saying so) otherwise.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, UdpSocket};

use common::{
    BANNER, CLOSED, DnsServer, FILTERED, OPEN, Topology, block_on_in, drop_cap_net_raw, in_ns,
    request, run, sysctl, texts,
};
use gatekey_diag::{ConnectState, DiagError, Event, IcmpSocketKind, PortState};
use serde_json::{Value, json};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs one request inside the client namespace.
fn run_in(ns: &str, req: Value) -> (Result<gatekey_diag::Outcome, DiagError>, Vec<Event>) {
    let req = request(req);
    block_on_in(ns, move || async move { run(&req).await })
}

fn replies(events: &[Event]) -> Vec<(u16, Option<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::PingReply { seq, ttl, .. } => Some((*seq, *ttl)),
            _ => None,
        })
        .collect()
}

fn socket_kind(events: &[Event]) -> IcmpSocketKind {
    match &events[0] {
        Event::PingStart { socket, .. } => *socket,
        e => panic!("{e:?}"),
    }
}

#[test]
fn ping_through_two_routers() {
    let Some(topo) = Topology::new() else { return };
    let c = topo.client.as_str();

    // A new namespace's ping_group_range is "1 0": root gets a raw socket.
    let (res, ev) = run_in(
        c,
        json!({"tool":"ping","host":"10.91.3.2","count":3,"interval_ms":200}),
    );
    let outcome = res.unwrap();
    assert!(outcome.success, "{}", texts(&ev));
    assert_eq!(socket_kind(&ev), IcmpSocketKind::Raw);
    // Two routers on the way: TTL 64 - 2.
    assert_eq!(
        replies(&ev),
        vec![(1, Some(62)), (2, Some(62)), (3, Some(62))]
    );
    assert!(texts(&ev).contains("64 bytes from 10.91.3.2: icmp_seq=1 ttl=62 time="));
    assert!(texts(&ev).contains("3 packets transmitted, 3 received, 0% packet loss"));

    // Once the group range allows it, unprivileged datagram sockets, IPv4 and IPv6.
    sysctl(c, "net.ipv4.ping_group_range", "0 2147483647");
    for host in ["10.91.3.2", "fd91:3::2"] {
        let (res, ev) = run_in(
            c,
            json!({"tool":"ping","host":host,"count":2,"interval_ms":200,"size":100}),
        );
        assert!(res.unwrap().success, "{}", texts(&ev));
        assert_eq!(socket_kind(&ev), IcmpSocketKind::Datagram, "{host}");
        assert_eq!(
            replies(&ev),
            vec![(1, Some(62)), (2, Some(62))],
            "{host}: {}",
            texts(&ev)
        );
        assert!(texts(&ev).contains(&format!("108 bytes from {host}: icmp_seq=1")));
    }
}

#[test]
fn ping_losses_and_icmp_errors() {
    let Some(topo) = Topology::new() else { return };
    let c = topo.client.as_str();
    for range in ["1 0", "0 2147483647"] {
        // Raw sockets first, then datagram sockets (errors on the error queue).
        sysctl(c, "net.ipv4.ping_group_range", range);

        // Nobody has this address on the target's link: silence, 100% loss.
        let (res, ev) = run_in(
            c,
            json!({"tool":"ping","host":"10.91.3.99","count":2,"interval_ms":200,"timeout_ms":500}),
        );
        let outcome = res.unwrap();
        assert!(!outcome.success);
        assert_eq!(
            outcome.summary,
            "2 packets transmitted, 0 received, 100% packet loss"
        );
        let timeouts = ev
            .iter()
            .filter(|e| matches!(e, Event::PingTimeout { .. }))
            .count();
        assert_eq!(timeouts, 2, "{}", texts(&ev));
        let Some(Event::PingSummary {
            loss_percent, rtt, ..
        }) = ev.last()
        else {
            panic!()
        };
        assert_eq!((*loss_percent, *rtt), (100.0, None));

        // No route at router1: it answers "net unreachable" right away.
        let (res, ev) = run_in(
            c,
            json!({"tool":"ping","host":"10.99.0.1","count":2,"interval_ms":200,"timeout_ms":1000}),
        );
        let outcome = res.unwrap();
        assert!(!outcome.success);
        let all = texts(&ev);
        assert!(
            all.contains("From 10.91.1.1 icmp_seq=1 Destination Net Unreachable"),
            "{range}: {all}"
        );
        assert!(
            all.contains("+2 errors, 100% packet loss"),
            "{range}: {all}"
        );

        // The same over IPv6.
        let (res, ev) = run_in(
            c,
            json!({"tool":"ping","host":"fd99::1","count":1,"timeout_ms":1000}),
        );
        assert!(!res.unwrap().success);
        let all = texts(&ev);
        assert!(
            all.contains("From fd91:1::1 icmp_seq=1 Destination unreachable: No route"),
            "{range}: {all}"
        );
    }
}

/// Per hop: who answered each probe, and their names.
type Hops = Vec<(Vec<Option<IpAddr>>, Vec<Option<String>>)>;

fn hops(events: &[Event]) -> Hops {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Hop { probes, .. } => Some((
                probes.iter().map(|p| p.addr).collect(),
                probes.iter().map(|p| p.name.clone()).collect(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn traceroute_hops_in_order() {
    let Some(topo) = Topology::new() else { return };
    let c = topo.client.as_str();
    // Hop names come from a DNS server inside the client namespace.
    let ptrs: HashMap<IpAddr, String> = [
        ("10.91.1.1", "r1.test."),
        ("10.91.2.2", "r2.test."),
        ("10.91.3.2", "target.test."),
        ("fd91:1::1", "r1.test."),
        ("fd91:2::2", "r2.test."),
        ("fd91:3::2", "target.test."),
    ]
    .into_iter()
    .map(|(a, n)| (ip(a), n.to_string()))
    .collect();
    let socket = in_ns(c, || UdpSocket::bind("127.0.0.1:0")).unwrap();
    let dns = DnsServer::start_on(socket, ptrs);
    let names = ["r1.test", "r2.test", "target.test"];

    // An unroutable destination: router1's "net unreachable" (!N) ends the trace. First, as
    // the kernel allows a router only a burst of 5 such errors per peer (then 1/s,
    // net.ipv4.route.error_cost), and time-exceeded messages drain the same budget.
    let (res, ev) = run_in(
        c,
        json!({"tool":"traceroute","host":"10.99.0.1","numeric":true}),
    );
    let outcome = res.unwrap();
    assert!(!outcome.success);
    let all = texts(&ev);
    assert!(
        all.contains(" 1  10.91.1.1  ") && all.contains(" !N"),
        "{all}"
    );
    assert_eq!(hops(&ev).len(), 1, "{all}");

    let cases = [
        ("10.91.3.2", "udp", ["10.91.1.1", "10.91.2.2", "10.91.3.2"]),
        ("10.91.3.2", "icmp", ["10.91.1.1", "10.91.2.2", "10.91.3.2"]),
        ("fd91:3::2", "udp", ["fd91:1::1", "fd91:2::2", "fd91:3::2"]),
        ("fd91:3::2", "icmp", ["fd91:1::1", "fd91:2::2", "fd91:3::2"]),
    ];
    // ICMP probes through raw sockets, then through datagram sockets.
    for range in ["1 0", "0 2147483647"] {
        sysctl(c, "net.ipv4.ping_group_range", range);
        for (host, method, expected) in &cases {
            if range != "1 0" && *method == "udp" {
                continue;
            }
            let (res, ev) = run_in(
                c,
                json!({"tool":"traceroute","host":host,"method":method,"timeout_ms":1500,
                       "server":dns.addr.to_string()}),
            );
            let outcome = res.unwrap();
            let all = texts(&ev);
            assert!(outcome.success, "{host} {method}: {all}");
            assert_eq!(
                outcome.summary,
                format!("reached {host} in 3 hops"),
                "{all}"
            );
            let got = hops(&ev);
            assert_eq!(got.len(), 3, "{all}");
            for (i, (addrs, hop_names)) in got.iter().enumerate() {
                assert_eq!(
                    addrs,
                    &vec![Some(ip(expected[i])); 3],
                    "{host} {method}: {all}"
                );
                assert_eq!(hop_names, &vec![Some(names[i].to_string()); 3], "{all}");
            }
            let Event::TraceStart { packet_bytes, .. } = &ev[0] else {
                panic!()
            };
            assert_eq!(*packet_bytes, if host.contains(':') { 80 } else { 60 });
            assert!(
                all.contains(&format!(" 1  r1.test ({})  ", expected[0])),
                "{all}"
            );
        }
    }

    // Numeric, and not reaching the target within max_hops.
    let (res, ev) = run_in(
        c,
        json!({"tool":"traceroute","host":"10.91.3.2","max_hops":2,"numeric":true,"queries":1}),
    );
    let outcome = res.unwrap();
    assert!(!outcome.success);
    assert_eq!(outcome.summary, "10.91.3.2 not reached within 2 hops");
    assert_eq!(
        hops(&ev),
        vec![
            (vec![Some(ip("10.91.1.1"))], vec![None]),
            (vec![Some(ip("10.91.2.2"))], vec![None])
        ]
    );
}

#[test]
fn tcp_states_through_routers() {
    let Some(topo) = Topology::new() else { return };
    let c = topo.client.as_str();
    println!("filtered port dropped with: {}", topo.filter);
    let ports = format!("{OPEN}-{CLOSED}");
    for host in ["10.91.3.2", "fd91:3::2"] {
        let (res, ev) = run_in(
            c,
            json!({"tool":"nmap","host":host,"ports":ports,"timeout_ms":700}),
        );
        let outcome = res.unwrap();
        let all = texts(&ev);
        assert!(outcome.success, "{all}");
        let Some(Event::HostReport { ports, up, .. }) =
            ev.iter().find(|e| matches!(e, Event::HostReport { .. }))
        else {
            panic!("{all}")
        };
        assert!(up);
        let states: Vec<(u16, PortState)> = ports.iter().map(|p| (p.port, p.state)).collect();
        assert_eq!(
            states,
            vec![
                (OPEN, PortState::Open),
                (FILTERED, PortState::Filtered),
                (CLOSED, PortState::Closed)
            ],
            "{all}"
        );
        assert!(
            all.contains(&format!("Discovered open port {OPEN}/tcp on {host}")),
            "{all}"
        );
        assert!(all.contains(&format!("{FILTERED}/tcp filtered")), "{all}");

        let (res, ev) = run_in(
            c,
            json!({"tool":"nc","host":host,"port":OPEN,"banner":true}),
        );
        assert!(res.unwrap().success);
        assert!(matches!(
            ev[0],
            Event::Connect {
                state: ConnectState::Open,
                ..
            }
        ));
        let Event::Banner { text, .. } = &ev[1] else {
            panic!("{ev:?}")
        };
        assert_eq!(text.as_bytes(), b"SSH-2.0-gatekey-test\\r\\n");
        assert_eq!(BANNER.len(), 22);

        let (res, ev) = run_in(c, json!({"tool":"nc","host":host,"port":CLOSED}));
        assert!(!res.unwrap().success);
        assert!(matches!(
            ev[0],
            Event::Connect {
                state: ConnectState::Refused,
                ..
            }
        ));

        let (res, ev) = run_in(
            c,
            json!({"tool":"nc","host":host,"port":FILTERED,"timeout_ms":500}),
        );
        let outcome = res.unwrap();
        assert!(!outcome.success);
        assert!(
            matches!(
                ev[0],
                Event::Connect {
                    state: ConnectState::Timeout,
                    ..
                }
            ),
            "{ev:?}"
        );
        assert_eq!(
            outcome.summary,
            format!("{host} port {FILTERED} timed out after 500 ms")
        );
    }

    // Small networks: the target is up with its open port; reports only for hosts that are up.
    for (net, target) in [("10.91.3.0/30", "10.91.3.2"), ("fd91:3::/126", "fd91:3::2")] {
        let (res, ev) = run_in(
            c,
            json!({"tool":"nmap","host":net,"ports":format!("{OPEN},{CLOSED}"),"timeout_ms":500}),
        );
        let outcome = res.unwrap();
        let all = texts(&ev);
        assert!(outcome.success, "{all}");
        let target_report = ev.iter().find_map(|e| match e {
            Event::HostReport { addr, ports, .. } if *addr == ip(target) => Some(ports.clone()),
            _ => None,
        });
        let ports = target_report.unwrap_or_else(|| panic!("{all}"));
        assert_eq!(ports[0].state, PortState::Open);
        assert_eq!(ports[1].state, PortState::Closed);
        let Some(Event::ScanSummary {
            addresses,
            hosts_up,
            open_ports,
            ..
        }) = ev.last()
        else {
            panic!()
        };
        assert_eq!(*addresses, 4);
        assert!(*hosts_up >= 1);
        assert_eq!(*open_ports, 1);
    }
}

#[test]
fn unprivileged_client() {
    let Some(topo) = Topology::new() else { return };
    let c = topo.client.clone();
    // ping_group_range stays "1 0", and this thread gives up CAP_NET_RAW.
    in_ns(&c, || {
        drop_cap_net_raw();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (res, ev) = run(&request(
                json!({"tool":"ping","host":"10.91.3.2","count":1}),
            ))
            .await;
            let Err(DiagError::Permission(msg)) = res else {
                panic!("{res:?}")
            };
            assert!(
                msg.starts_with(
                    "ping needs ICMP sockets: set net.ipv4.ping_group_range to include gid 0"
                ),
                "{msg}"
            );
            assert!(msg.contains("or grant CAP_NET_RAW"), "{msg}");
            assert!(ev.is_empty());

            let (res, _) = run(&request(
                json!({"tool":"traceroute","host":"10.91.3.2","method":"icmp"}),
            ))
            .await;
            let Err(DiagError::Permission(msg)) = res else {
                panic!("{res:?}")
            };
            assert!(msg.starts_with("traceroute needs ICMP sockets"), "{msg}");

            // UDP probing needs no privilege.
            for host in ["10.91.3.2", "fd91:3::2"] {
                let (res, ev) = run(&request(
                    json!({"tool":"traceroute","host":host,"numeric":true,"timeout_ms":1500}),
                ))
                .await;
                assert!(res.unwrap().success, "{}", texts(&ev));
                assert_eq!(hops(&ev).len(), 3);
            }
        });
    });
}

/// nslookup without `server` asks the system resolver: a namespace whose `/etc/resolv.conf`
/// (bind-mounted by `ip netns exec`) names a local test server, and this test binary re-run
/// inside it.
#[test]
fn nslookup_uses_the_system_resolver() {
    let Some(ns) = common::Netns::new() else {
        return;
    };
    let socket = in_ns(&ns.name, || UdpSocket::bind("127.0.0.1:53")).unwrap();
    let _dns = DnsServer::start_on(socket, HashMap::new());
    ns.etc_file(
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    );
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(exe)
        .args([
            "--exact",
            "child_system_resolver",
            "--include-ignored",
            "--nocapture",
        ])
        .env("GKD_SYSTEM_RESOLVER_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{stdout}");
    assert!(
        stdout.contains("Server:\t\t127.0.0.1\nAddress:\t127.0.0.1#53"),
        "{stdout}"
    );
}

#[test]
#[ignore = "runs inside a namespace, started by nslookup_uses_the_system_resolver"]
fn child_system_resolver() {
    if std::env::var_os("GKD_SYSTEM_RESOLVER_CHILD").is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (res, ev) = run(&request(json!({"tool":"nslookup","host":"a.test"}))).await;
        println!("{}", texts(&ev));
        assert!(res.unwrap().success);
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, Event::DnsAnswer { .. }))
                .count(),
            2
        );
        let (res, ev) = run(&request(json!({"tool":"nslookup","host":"nx.test"}))).await;
        assert!(!res.unwrap().success);
        assert!(texts(&ev).contains("NXDOMAIN"));
    });
}

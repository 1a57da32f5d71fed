//! Tools against loopback only: TCP listeners on 127.0.0.1 and ::1, ping to loopback, and a
//! DNS server on loopback. No root needed (ping skips when the host allows neither ICMP
//! datagram nor raw sockets).

mod common;

use std::time::{Duration, Instant};

use common::{DnsServer, request, run, texts};
use gatekey_diag::{
    ConnectState, DiagError, DnsRecord, DnsStatus, Event, Limits, PortState, Request, Tool,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

async fn listen(bind: &str) -> TcpListener {
    TcpListener::bind(bind).await.unwrap()
}

/// Sends `greeting` to whoever connects, then holds the connection.
fn serve(listener: TcpListener, greeting: &'static [u8]) {
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.write_all(greeting).await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            });
        }
    });
}

/// A port nothing listens on.
async fn closed_port(bind: &str) -> u16 {
    TcpListener::bind(bind)
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "current_thread")]
async fn nc_open_with_banner_and_refused() {
    for (bind, host) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "::1")] {
        let l = listen(bind).await;
        let port = l.local_addr().unwrap().port();
        serve(l, b"SSH-2.0-test\r\n\x01\xff");
        let (res, events) = run(&request(
            json!({"tool":"nc","host":host,"port":port,"banner":true,"timeout_ms":2000}),
        ))
        .await;
        let outcome = res.unwrap();
        assert!(outcome.success, "{}", texts(&events));
        assert_eq!(outcome.tool, Tool::Nc);
        assert!(matches!(
            events[0],
            Event::Connect {
                state: ConnectState::Open,
                ..
            }
        ));
        let Event::Banner { text, bytes, .. } = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(text, "SSH-2.0-test\\r\\n\\x01\\xff");
        assert_eq!(*bytes, 16);
        assert!(
            events[0]
                .text()
                .contains(&format!("Connection to {host} {port} port"))
        );
        assert!(events[0].text().contains("succeeded!"));

        let port = closed_port(bind).await;
        let (res, events) = run(&request(json!({"tool":"nc","host":host,"port":port}))).await;
        let outcome = res.unwrap();
        assert!(!outcome.success);
        assert!(matches!(
            events[0],
            Event::Connect {
                state: ConnectState::Refused,
                ..
            }
        ));
        assert!(
            events[0].text().contains("Connection refused"),
            "{}",
            events[0].text()
        );
        assert!(outcome.summary.contains("refused"));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn nc_times_out_on_a_silent_port() {
    let (port, _keep, _filler) = common::silent_port("127.0.0.1".parse().unwrap());
    let start = Instant::now();
    let (res, events) = run(&request(
        json!({"tool":"nc","host":"127.0.0.1","port":port,"timeout_ms":300}),
    ))
    .await;
    let outcome = res.unwrap();
    assert!(!outcome.success);
    assert!(matches!(
        events[0],
        Event::Connect {
            state: ConnectState::Timeout,
            ..
        }
    ));
    assert!(
        events[0].text().contains("timed out after"),
        "{}",
        events[0].text()
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "current_thread")]
async fn nc_banner_is_bounded_and_waits_briefly() {
    let l = listen("127.0.0.1:0").await;
    let port = l.local_addr().unwrap().port();
    serve(l, &[b'x'; 5000]);
    let (res, events) = run(&request(
        json!({"tool":"nc","host":"127.0.0.1","port":port,"banner":true}),
    ))
    .await;
    assert!(res.unwrap().success);
    let Event::Banner {
        bytes, truncated, ..
    } = &events[1]
    else {
        panic!()
    };
    assert_eq!(*bytes, Limits::default().max_banner_bytes);
    assert!(*truncated);

    // A silent service: no banner, after at most the timeout.
    let l = listen("127.0.0.1:0").await;
    let port = l.local_addr().unwrap().port();
    serve(l, b"");
    let start = Instant::now();
    let (res, events) = run(&request(
        json!({"tool":"nc","host":"127.0.0.1","port":port,"banner":true,"timeout_ms":300}),
    ))
    .await;
    assert!(res.unwrap().success);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(events[1].text(), "no banner received");
}

#[tokio::test(flavor = "current_thread")]
async fn nmap_loopback_v4_v6() {
    for (bind, host) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "::1")] {
        let a = listen(bind).await;
        let b = listen(bind).await;
        let (pa, pb) = (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        );
        let closed = closed_port(bind).await;
        let (silent, _keep, _filler) = common::silent_port(host.parse().unwrap());
        let ports = format!("{pa},{pb},{closed},{silent}");
        let (res, events) = run(&request(
            json!({"tool":"nmap","host":host,"ports":ports,"timeout_ms":500}),
        ))
        .await;
        let outcome = res.unwrap();
        assert!(outcome.success, "{}", texts(&events));
        let opened: Vec<u16> = events
            .iter()
            .filter_map(|e| match e {
                Event::PortOpen { port, .. } => Some(*port),
                _ => None,
            })
            .collect();
        assert_eq!(opened.len(), 2);
        let report = events
            .iter()
            .find_map(|e| match e {
                Event::HostReport { ports, up, .. } => Some((ports.clone(), *up)),
                _ => None,
            })
            .unwrap();
        assert!(report.1);
        let state = |p: u16| report.0.iter().find(|r| r.port == p).unwrap().state;
        assert_eq!(state(pa), PortState::Open);
        assert_eq!(state(pb), PortState::Open);
        assert_eq!(state(closed), PortState::Closed);
        assert_eq!(state(silent), PortState::Filtered);
        let all = texts(&events);
        assert!(all.contains("Host is up"), "{all}");
        assert!(
            all.contains("Nmap done: 1 IP address (1 host up) scanned in"),
            "{all}"
        );
        drop((a, b));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn nmap_small_cidr_on_loopback() {
    // Every 127/8 address is local: a listener on 127.0.0.2 only is open there, and the
    // other addresses answer with resets (closed).
    let l = listen("127.0.0.2:0").await;
    let port = l.local_addr().unwrap().port();
    let (res, events) = run(&request(
        json!({"tool":"nmap","host":"127.0.0.1/30","ports":port.to_string(),"concurrency":2}),
    ))
    .await;
    let outcome = res.unwrap();
    assert!(outcome.success);
    let Event::ScanStart { hosts, probes, .. } = &events[0] else {
        panic!()
    };
    assert_eq!((*hosts, *probes), (4, 4));
    let reports: Vec<(String, PortState)> = events
        .iter()
        .filter_map(|e| match e {
            Event::HostReport { addr, ports, .. } => Some((addr.to_string(), ports[0].state)),
            _ => None,
        })
        .collect();
    // Reports come in address order.
    let addrs: Vec<&str> = reports.iter().map(|r| r.0.as_str()).collect();
    let mut sorted = addrs.clone();
    sorted.sort_by_key(|a| a.parse::<std::net::Ipv4Addr>().unwrap());
    assert_eq!(addrs, sorted);
    assert!(
        reports.contains(&("127.0.0.2".into(), PortState::Open)),
        "{reports:?}"
    );
    assert!(
        reports.contains(&("127.0.0.1".into(), PortState::Closed)),
        "{reports:?}"
    );
    drop(l);
}

#[tokio::test(flavor = "current_thread")]
async fn nmap_cap_is_enforced_before_sending() {
    let (res, events) = run(&request(
        json!({"tool":"nmap","host":"127.0.0.0/24","ports":"1-5"}),
    ))
    .await;
    let Err(DiagError::InvalidArgument(e)) = res else {
        panic!("{res:?}")
    };
    assert_eq!(e.argument, "ports");
    assert!(events.is_empty(), "nothing may be sent: {events:?}");
    let limits = Limits {
        max_scan_probes: 2000,
        ..Limits::default()
    };
    let req = request(json!({"tool":"nmap","host":"127.0.0.0/24","ports":"1-5"}));
    assert!(req.validate(&limits).is_ok());
}

fn is_permission(res: &Result<gatekey_diag::Outcome, DiagError>) -> bool {
    matches!(res, Err(DiagError::Permission(_)))
}

#[tokio::test(flavor = "current_thread")]
async fn ping_loopback() {
    for host in ["127.0.0.1", "::1"] {
        let (res, events) = run(&request(
            json!({"tool":"ping","host":host,"count":3,"interval_ms":200}),
        ))
        .await;
        if is_permission(&res) {
            println!(
                "skipped: ping needs ICMP sockets here: {}",
                res.unwrap_err()
            );
            return;
        }
        let outcome = res.unwrap();
        let all = texts(&events);
        assert!(outcome.success, "{all}");
        assert_eq!(
            outcome.summary,
            "3 packets transmitted, 3 received, 0% packet loss"
        );
        let replies: Vec<u16> = events
            .iter()
            .filter_map(|e| match e {
                Event::PingReply { seq, bytes, .. } => {
                    assert_eq!(*bytes, 64);
                    Some(*seq)
                }
                _ => None,
            })
            .collect();
        assert_eq!(replies, vec![1, 2, 3], "{all}");
        assert!(
            all.contains(&format!("64 bytes from {host}: icmp_seq=1 ttl=64 time=")),
            "{all}"
        );
        assert!(all.contains("rtt min/avg/max/mdev = "), "{all}");
        let Some(Event::PingSummary { time_ms, .. }) = events.last() else {
            panic!()
        };
        // Three requests 200 ms apart.
        assert!(*time_ms >= 400, "{all}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn ping_size_zero_and_large() {
    for size in [0u32, 3000] {
        let (res, events) = run(&request(
            json!({"tool":"ping","host":"127.0.0.1","count":1,"size":size}),
        ))
        .await;
        if is_permission(&res) {
            println!("skipped: no ICMP sockets");
            return;
        }
        assert!(res.unwrap().success, "{}", texts(&events));
        assert!(events.iter().any(|e| matches!(e,
            Event::PingReply { bytes, .. } if *bytes == size + 8)));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn closed_receiver_stops_the_run() {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let req = request(json!({"tool":"ping","host":"127.0.0.1","count":50,"interval_ms":200}));
    let limits = Limits::default();
    let run = gatekey_diag::run(&req, &limits, tx);
    let consumer = async {
        let first = rx.recv().await;
        drop(rx);
        first
    };
    let start = Instant::now();
    let (res, first) = tokio::join!(run, consumer);
    if is_permission(&res) {
        println!("skipped: no ICMP sockets");
        return;
    }
    assert!(matches!(first, Some(Event::PingStart { .. })));
    assert!(matches!(res, Err(DiagError::Cancelled)), "{res:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

// ---------------------------------------------------------------------------------------------
// nslookup against a local server

async fn lookup(
    server: &DnsServer,
    host: &str,
    rtype: Option<&str>,
) -> (gatekey_diag::Outcome, Vec<Event>) {
    let mut j =
        json!({"tool":"nslookup","host":host,"server":server.addr.to_string(),"timeout_ms":800});
    if let Some(t) = rtype {
        j["type"] = json!(t);
    }
    let (res, events) = run(&request(j)).await;
    (res.unwrap(), events)
}

fn records(events: &[Event]) -> Vec<DnsRecord> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::DnsAnswer { record, .. } => Some(record.clone()),
            _ => None,
        })
        .collect()
}

fn status(events: &[Event]) -> Option<DnsStatus> {
    events.iter().find_map(|e| match e {
        Event::DnsError { status, .. } => Some(*status),
        _ => None,
    })
}

#[tokio::test(flavor = "current_thread")]
async fn nslookup_record_types() {
    let server = DnsServer::start("127.0.0.1:0");
    let (o, ev) = lookup(&server, "a.test", Some("A")).await;
    assert!(o.success);
    assert_eq!(
        records(&ev),
        vec![DnsRecord::A {
            address: "10.0.0.1".parse().unwrap()
        }]
    );
    let all = texts(&ev);
    assert!(
        all.starts_with(&format!(
            "Server:\t\t127.0.0.1\nAddress:\t127.0.0.1#{}",
            server.addr.port()
        )),
        "{all}"
    );
    assert!(all.contains("Name:\ta.test\nAddress: 10.0.0.1"), "{all}");

    let (_, ev) = lookup(&server, "a.test", Some("aaaa")).await;
    assert_eq!(
        records(&ev),
        vec![DnsRecord::Aaaa {
            address: "fd00::1".parse().unwrap()
        }]
    );

    // Default: A and AAAA.
    let (o, ev) = lookup(&server, "a.test", None).await;
    assert_eq!(records(&ev).len(), 2, "{}", texts(&ev));
    assert_eq!(o.summary, "2 answers for a.test");

    let (_, ev) = lookup(&server, "www.test", Some("CNAME")).await;
    assert_eq!(
        records(&ev),
        vec![DnsRecord::Cname {
            target: "a.test.".into()
        }]
    );
    // An A query through a CNAME shows the chain.
    let (_, ev) = lookup(&server, "www.test", Some("A")).await;
    let all = texts(&ev);
    assert!(all.contains("www.test\tcanonical name = a.test."), "{all}");
    assert!(all.contains("Name:\ta.test\nAddress: 10.0.0.1"), "{all}");

    let (_, ev) = lookup(&server, "test", Some("MX")).await;
    assert_eq!(
        records(&ev),
        vec![DnsRecord::Mx {
            preference: 10,
            exchange: "mail.test.".into()
        }]
    );
    assert!(texts(&ev).contains("test\tmail exchanger = 10 mail.test."));

    let (_, ev) = lookup(&server, "test", Some("TXT")).await;
    assert_eq!(
        records(&ev),
        vec![DnsRecord::Txt {
            strings: vec!["v=spf1 -all".into(), "bin\\x01\\\"q\\\"".into()]
        }]
    );
    assert!(
        texts(&ev).contains("test\ttext = \"v=spf1 -all\" \"bin\\x01\\\"q\\\"\""),
        "{}",
        texts(&ev)
    );

    let (_, ev) = lookup(&server, "test", Some("NS")).await;
    assert_eq!(
        records(&ev),
        vec![DnsRecord::Ns {
            nameserver: "ns1.test.".into()
        }]
    );
    let (_, ev) = lookup(&server, "test", Some("SOA")).await;
    let Some(DnsRecord::Soa {
        mname,
        serial,
        minimum,
        ..
    }) = records(&ev).pop()
    else {
        panic!("{}", texts(&ev))
    };
    assert_eq!(
        (mname.as_str(), serial, minimum),
        ("ns1.test.", 2024010101, 60)
    );
    assert!(
        texts(&ev).contains(
            "\torigin = ns1.test.\n\tmail addr = hostmaster.test.\n\tserial = 2024010101"
        )
    );

    // An address means PTR.
    let (o, ev) = lookup(&server, "10.0.0.1", None).await;
    assert!(o.success);
    assert_eq!(
        records(&ev),
        vec![DnsRecord::Ptr {
            name: "a.test.".into()
        }]
    );
    assert!(
        texts(&ev).contains("1.0.0.10.in-addr.arpa\tname = a.test."),
        "{}",
        texts(&ev)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn nslookup_failures_are_distinct() {
    let server = DnsServer::start("127.0.0.1:0");

    let (o, ev) = lookup(&server, "nx.test", Some("A")).await;
    assert!(!o.success);
    assert_eq!(status(&ev), Some(DnsStatus::NxDomain));
    assert!(texts(&ev).contains("** server can't find nx.test: NXDOMAIN"));
    assert_eq!(o.summary, "nx.test: NXDOMAIN");
    // Default types: reported once.
    let (_, ev) = lookup(&server, "nx.test", None).await;
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, Event::DnsError { .. }))
            .count(),
        1
    );

    let (o, ev) = lookup(&server, "fail.test", Some("A")).await;
    assert!(!o.success);
    assert_eq!(status(&ev), Some(DnsStatus::ServFail));
    assert!(texts(&ev).contains("** server can't find fail.test: SERVFAIL"));

    let (o, ev) = lookup(&server, "empty.test", Some("MX")).await;
    assert!(!o.success);
    assert_eq!(status(&ev), Some(DnsStatus::NoAnswer));
    assert!(texts(&ev).contains("*** Can't find empty.test: No answer"));
    // AAAA missing while A answers: no complaint, like nslookup.
    let (o, ev) = lookup(&server, "www.test", None).await;
    assert!(o.success);
    assert_eq!(status(&ev), None, "{}", texts(&ev));

    let start = Instant::now();
    let (o, ev) = lookup(&server, "slow.test", Some("A")).await;
    assert!(!o.success);
    assert_eq!(status(&ev), Some(DnsStatus::Timeout));
    assert!(texts(&ev).contains(";; connection timed out; no servers could be reached"));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn nslookup_over_ipv6_server() {
    let server = DnsServer::start("[::1]:0");
    let (o, ev) = lookup(&server, "a.test", Some("A")).await;
    assert!(o.success, "{}", texts(&ev));
    assert!(texts(&ev).starts_with("Server:\t\t::1\nAddress:\t::1#"));
}

#[tokio::test(flavor = "current_thread")]
async fn invalid_requests_fail_before_sending() {
    for (j, arg) in [
        (json!({"tool":"nc","host":"127.0.0.1","port":0}), "port"),
        (json!({"tool":"nc","host":"-h","port":22}), "host"),
        (
            json!({"tool":"ping","host":"127.0.0.1","count":1000}),
            "count",
        ),
        (
            json!({"tool":"ping","host":"127.0.0.1","interval_ms":1}),
            "interval-ms",
        ),
        (
            json!({"tool":"traceroute","host":"127.0.0.1","max_hops":100}),
            "max-hops",
        ),
        (
            json!({"tool":"nslookup","host":"a.test","server":"not-an-ip"}),
            "server",
        ),
    ] {
        let (res, events) = run(&request(j.clone())).await;
        match res {
            Err(DiagError::InvalidArgument(e)) => assert_eq!(e.argument, arg, "{j}"),
            other => panic!("{j}: {other:?}"),
        }
        assert!(events.is_empty());
    }
    // Unknown fields and unknown tools are rejected by the JSON itself.
    assert!(
        serde_json::from_value::<Request>(json!({"tool":"nc","host":"h","port":1,"x":1})).is_err()
    );
    assert!(serde_json::from_value::<Request>(json!({"tool":"dig","host":"h"})).is_err());
}

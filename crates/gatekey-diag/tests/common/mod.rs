//! Shared test kit: running a request and collecting its events, a small DNS server built on
//! hickory-proto messages, and network-namespace topologies.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use gatekey_diag::{DiagError, Event, Limits, Outcome, Request};
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME, MX, NS, PTR, SOA, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::sync::mpsc;

/// Runs `req` and collects its events; every event must survive a JSON round trip and render
/// to non-empty text.
pub async fn run(req: &Request) -> (Result<Outcome, DiagError>, Vec<Event>) {
    run_with(req, &Limits::default()).await
}

pub async fn run_with(req: &Request, limits: &Limits) -> (Result<Outcome, DiagError>, Vec<Event>) {
    // A small channel so that backpressure is exercised.
    let (tx, mut rx) = mpsc::channel(2);
    let collect = async {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            let json = serde_json::to_string(&e).unwrap();
            let back: Event = serde_json::from_str(&json).unwrap();
            assert_eq!(back, e, "round trip of {json}");
            assert!(!e.text().is_empty(), "{json}");
            events.push(e);
        }
        events
    };
    let (result, events) = tokio::join!(gatekey_diag::run(req, limits, tx), collect);
    (result, events)
}

pub fn texts(events: &[Event]) -> String {
    events
        .iter()
        .map(Event::text)
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn request(json: serde_json::Value) -> Request {
    serde_json::from_value(json).unwrap()
}

/// A listening port that never answers: its accept queue (length 0) is filled by one
/// connection nobody accepts, so the kernel drops further SYNs — a "filtered" port without a
/// firewall. Keep the returned pair alive.
pub fn silent_port(ip: IpAddr) -> (u16, socket2::Socket, std::net::TcpStream) {
    use socket2::{Domain, Socket, Type};
    let domain = if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let l = Socket::new(domain, Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (addr.port(), l, filler)
}

// ---------------------------------------------------------------------------------------------
// DNS server

/// A tiny authoritative server for the zone `test.` (blocking, on its own thread):
///
/// - `a.test` A 10.0.0.1, AAAA fd00::1; `www.test` CNAME `a.test`
/// - `test` MX, TXT (with a non-printable byte), NS and SOA
/// - PTR for 10.0.0.1 and for the addresses given to [`DnsServer::start_on`]
/// - `nx.test` NXDOMAIN, `fail.test` SERVFAIL, `empty.test` no records, `slow.test` never
///   answered
pub struct DnsServer {
    pub addr: SocketAddr,
}

impl DnsServer {
    pub fn start(bind: &str) -> DnsServer {
        DnsServer::start_on(UdpSocket::bind(bind).unwrap(), HashMap::new())
    }

    pub fn start_on(socket: UdpSocket, ptrs: HashMap<IpAddr, String>) -> DnsServer {
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(resp) = answer(&query, &ptrs) {
                    let _ = socket.send_to(&resp.to_vec().unwrap(), peer);
                }
            }
        });
        DnsServer { addr }
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn answer(query: &Message, ptrs: &HashMap<IpAddr, String>) -> Option<Message> {
    let q = query.queries.first()?.clone();
    let qname = q.name.to_ascii().to_ascii_lowercase();
    let qtype = q.query_type;
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    resp.add_query(q.clone());
    let soa = Record::from_rdata(
        name("test."),
        300,
        RData::SOA(SOA::new(
            name("ns1.test."),
            name("hostmaster.test."),
            2024010101,
            3600,
            600,
            86400,
            60,
        )),
    );
    let rec = |rdata: RData| Record::from_rdata(q.name.clone(), 300, rdata);
    let mut answers: Vec<Record> = Vec::new();
    match (qname.as_str(), qtype) {
        ("slow.test.", _) => return None,
        ("fail.test.", _) => {
            resp.metadata.response_code = ResponseCode::ServFail;
            return Some(resp);
        }
        ("a.test.", RecordType::A) => answers.push(rec(RData::A(A("10.0.0.1".parse().unwrap())))),
        ("a.test.", RecordType::AAAA) => {
            answers.push(rec(RData::AAAA(AAAA("fd00::1".parse().unwrap()))));
        }
        ("www.test.", RecordType::CNAME) => answers.push(rec(RData::CNAME(CNAME(name("a.test."))))),
        ("www.test.", RecordType::A) => {
            answers.push(rec(RData::CNAME(CNAME(name("a.test.")))));
            answers.push(Record::from_rdata(
                name("a.test."),
                300,
                RData::A(A("10.0.0.1".parse().unwrap())),
            ));
        }
        ("test.", RecordType::MX) => answers.push(rec(RData::MX(MX::new(10, name("mail.test."))))),
        ("test.", RecordType::TXT) => answers.push(rec(RData::TXT(TXT::from_bytes(vec![
            b"v=spf1 -all",
            b"bin\x01\"q\"",
        ])))),
        ("test.", RecordType::NS) => answers.push(rec(RData::NS(NS(name("ns1.test."))))),
        ("test.", RecordType::SOA) => answers.push(soa.clone()),
        ("1.0.0.10.in-addr.arpa.", RecordType::PTR) => {
            answers.push(rec(RData::PTR(PTR(name("a.test.")))));
        }
        (n, RecordType::PTR) => {
            let found = ptrs
                .iter()
                .find(|(ip, _)| Name::from(**ip).to_ascii().eq_ignore_ascii_case(n));
            if let Some((_, target)) = found {
                answers.push(rec(RData::PTR(PTR(name(target)))));
            } else {
                resp.metadata.response_code = ResponseCode::NXDomain;
                resp.add_authority(soa);
            }
        }
        ("a.test." | "www.test." | "test." | "empty.test.", _) => {
            // The name exists, but not with this type.
            resp.add_authority(soa);
        }
        _ => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authority(soa);
        }
    }
    for a in answers {
        resp.add_answer(a);
    }
    Some(resp)
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) {
    let mut v = vec!["ip"];
    v.extend_from_slice(args);
    sh(&v).unwrap();
}

pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `f` on a new thread that joined the network namespace `ns`.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(format!("/run/netns/{ns}")).unwrap();
            // SAFETY: a valid namespace descriptor; setns only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Runs an async block on a current_thread runtime inside the namespace `ns`.
pub fn block_on_in<F: std::future::Future>(ns: &str, f: impl FnOnce() -> F + Send) -> F::Output
where
    F::Output: Send,
{
    in_ns(ns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

/// Writes a sysctl in namespace `ns` (/proc/sys/net follows the writer's namespace).
pub fn sysctl(ns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_ns(ns, || std::fs::write(&path, value)).unwrap_or_else(|e| panic!("{path}: {e}"));
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// client — router1 — router2 — target, over veth pairs:
///
/// ```text
/// client 10.91.1.2 ─ 10.91.1.1 r1 10.91.2.1 ─ 10.91.2.2 r2 10.91.3.1 ─ 10.91.3.2 target
///        fd91:1::2     fd91:1::1   fd91:2::1    fd91:2::2  fd91:3::1     fd91:3::2
/// ```
///
/// Namespaces are named after the pid and a counter; dropping the topology deletes them,
/// also when a test fails.
pub struct Topology {
    pub client: String,
    pub r1: String,
    pub r2: String,
    pub target: String,
    /// How the "filtered" port 8081 is dropped in the target.
    pub filter: &'static str,
}

pub const OPEN: u16 = 8080;
pub const FILTERED: u16 = 8081;
pub const CLOSED: u16 = 8082;
pub const BANNER: &[u8] = b"SSH-2.0-gatekey-test\r\n";

impl Topology {
    /// The topology, or `None` (after saying why) when namespaces cannot be made here.
    pub fn new() -> Option<Topology> {
        if !is_root() {
            println!("skipped: needs root for network namespaces");
            return None;
        }
        let tag = format!(
            "gkd{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut t = Topology {
            client: format!("{tag}c"),
            r1: format!("{tag}r1"),
            r2: format!("{tag}r2"),
            target: format!("{tag}t"),
            filter: "",
        };
        // Created one by one so that Drop removes exactly what exists.
        let mut made: Vec<String> = Vec::new();
        for ns in [&t.client, &t.r1, &t.r2, &t.target] {
            if let Err(e) = sh(&["ip", "netns", "add", ns]) {
                println!("skipped: `ip netns add` failed: {e}");
                for m in &made {
                    let _ = sh(&["ip", "netns", "del", m.as_str()]);
                }
                return None;
            }
            made.push(ns.clone());
        }
        t.build();
        Some(t)
    }

    fn build(&mut self) {
        let (c, r1, r2, t) = (&self.client, &self.r1, &self.r2, &self.target);
        for ns in [c, r1, r2, t] {
            // No duplicate address detection on the links to come: until it finishes, a
            // router has no usable link-local source for neighbour solicitations, and the
            // first IPv6 packets it forwards wait a second or get lost.
            sysctl(ns, "net.ipv6.conf.default.accept_dad", "0");
            sysctl(ns, "net.ipv6.conf.all.accept_dad", "0");
        }
        ip(&[
            "-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", r1,
        ]);
        ip(&[
            "-n", r1, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", r2,
        ]);
        ip(&[
            "-n", r2, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", t,
        ]);
        let addrs: [(&str, &str, &str, &str); 6] = [
            (c, "eth0", "10.91.1.2/24", "fd91:1::2/64"),
            (r1, "eth0", "10.91.1.1/24", "fd91:1::1/64"),
            (r1, "eth1", "10.91.2.1/24", "fd91:2::1/64"),
            (r2, "eth0", "10.91.2.2/24", "fd91:2::2/64"),
            (r2, "eth1", "10.91.3.1/24", "fd91:3::1/64"),
            (t, "eth0", "10.91.3.2/24", "fd91:3::2/64"),
        ];
        for (ns, dev, v4, v6) in addrs {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        for ns in [c, r1, r2, t] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            // Routers and the target answer every probe: no ICMP rate limiting in tests.
            sysctl(ns, "net.ipv4.icmp_ratelimit", "0");
            sysctl(ns, "net.ipv6.icmp.ratelimit", "0");
        }
        ip(&["-n", c, "route", "add", "default", "via", "10.91.1.1"]);
        ip(&["-n", c, "-6", "route", "add", "default", "via", "fd91:1::1"]);
        ip(&["-n", r1, "route", "add", "10.91.3.0/24", "via", "10.91.2.2"]);
        ip(&[
            "-n",
            r1,
            "-6",
            "route",
            "add",
            "fd91:3::/64",
            "via",
            "fd91:2::2",
        ]);
        ip(&["-n", r2, "route", "add", "10.91.1.0/24", "via", "10.91.2.1"]);
        ip(&[
            "-n",
            r2,
            "-6",
            "route",
            "add",
            "fd91:1::/64",
            "via",
            "fd91:2::1",
        ]);
        ip(&["-n", t, "route", "add", "default", "via", "10.91.3.1"]);
        ip(&["-n", t, "-6", "route", "add", "default", "via", "fd91:3::1"]);
        for ns in [r1, r2] {
            sysctl(ns, "net.ipv4.ip_forward", "1");
            sysctl(ns, "net.ipv6.conf.all.forwarding", "1");
        }
        self.filter = self.drop_port(FILTERED);
        self.warm_up();
        // The open port: a dual-stack listener that greets like an SSH server.
        let listener = in_ns(t, || std::net::TcpListener::bind(("::", OPEN))).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let _ = conn.write_all(BANNER);
                    let mut sink = [0u8; 64];
                    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                });
            }
        });
    }

    /// Waits until the client reaches the target both ways over IPv4 and IPv6 (a UDP datagram
    /// to a closed port comes back as "connection refused"): right after setup, neighbour
    /// discovery on fresh links can take a retransmission (1 s) or more, and tests with short
    /// timeouts would see that as loss.
    fn warm_up(&self) {
        in_ns(&self.client, || {
            for target in ["10.91.3.2:9", "[fd91:3::2]:9"] {
                let addr: SocketAddr = target.parse().unwrap();
                let bind = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let s = UdpSocket::bind(bind).unwrap();
                s.connect(addr).unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_millis(250)))
                    .unwrap();
                let ready = (0..40).any(|_| {
                    let _ = s.send(b"warm-up");
                    matches!(s.recv(&mut [0u8; 16]), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
                });
                assert!(ready, "topology: {target} unreachable from the client");
            }
        });
    }

    /// Drops TCP to `port` in the target: nft or iptables when installed, else a
    /// policy-routing blackhole rule (iproute2 only), which drops just as silently.
    fn drop_port(&self, port: u16) -> &'static str {
        let t = self.target.as_str();
        let p = port.to_string();
        if have("nft") {
            let ok = sh(&[
                "ip", "netns", "exec", t, "nft", "add", "table", "inet", "gkd",
            ])
            .and_then(|_| {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    t,
                    "nft",
                    "add",
                    "chain",
                    "inet",
                    "gkd",
                    "input",
                    "{ type filter hook input priority 0 ; }",
                ])
            })
            .and_then(|_| {
                sh(&[
                    "ip", "netns", "exec", t, "nft", "add", "rule", "inet", "gkd", "input", "tcp",
                    "dport", &p, "drop",
                ])
            });
            if ok.is_ok() {
                return "nft";
            }
        }
        if have("iptables") && have("ip6tables") {
            let ok = sh(&[
                "ip", "netns", "exec", t, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", &p,
                "-j", "DROP",
            ])
            .and_then(|_| {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    t,
                    "ip6tables",
                    "-A",
                    "INPUT",
                    "-p",
                    "tcp",
                    "--dport",
                    &p,
                    "-j",
                    "DROP",
                ])
            });
            if ok.is_ok() {
                return "iptables";
            }
        }
        println!(
            "note: neither nft nor iptables works here (Debian packages nftables or iptables); \
             dropping port {port} with `ip rule ... blackhole`"
        );
        // The rule must come before the local table, which is consulted first (pref 0).
        for family in ["-4", "-6"] {
            ip(&[
                "-n", t, family, "rule", "add", "pref", "100", "lookup", "local",
            ]);
            ip(&["-n", t, family, "rule", "del", "pref", "0"]);
            ip(&[
                "-n",
                t,
                family,
                "rule",
                "add",
                "pref",
                "50",
                "ipproto",
                "tcp",
                "dport",
                &p,
                "blackhole",
            ]);
        }
        "ip rule blackhole"
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client, &self.r1, &self.r2, &self.target] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// One empty namespace (loopback up), deleted on drop together with its
/// `/etc/netns/<name>` directory, whose files `ip netns exec` bind-mounts over `/etc`.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Option<Netns> {
        if !is_root() {
            println!("skipped: needs root for network namespaces");
            return None;
        }
        let name = format!(
            "gkd{}x{}n",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        if let Err(e) = sh(&["ip", "netns", "add", &name]) {
            println!("skipped: `ip netns add` failed: {e}");
            return None;
        }
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Some(Netns { name })
    }

    /// Writes `/etc/netns/<name>/<file>`, which processes started with `ip netns exec` see
    /// as `/etc/<file>`.
    pub fn etc_file(&self, file: &str, contents: &str) {
        let dir = format!("/etc/netns/{}", self.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/{file}"), contents).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
        // Also /etc/netns itself, unless something else keeps files there.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

/// Removes `CAP_NET_RAW` from the calling thread's effective and permitted sets.
pub fn drop_cap_net_raw() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAP_NET_RAW: u32 = 13;
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and a two-element data array, as capget/capset (v3) expect.
    unsafe {
        assert_eq!(
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut Header,
                data.as_mut_ptr()
            ),
            0
        );
        data[0].effective &= !(1 << CAP_NET_RAW);
        data[0].permitted &= !(1 << CAP_NET_RAW);
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()),
            0,
            "capset: {}",
            std::io::Error::last_os_error()
        );
    }
}

//! The records a run streams, and their human rendering (iputils, nslookup, traceroute, nc and
//! nmap style).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{QueryType, Tool, TraceMethod};

/// Which kind of ICMP socket `ping` (or ICMP traceroute) got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IcmpSocketKind {
    /// `SOCK_DGRAM`/`IPPROTO_ICMP`: allowed by `net.ipv4.ping_group_range`.
    Datagram,
    /// `SOCK_RAW`: needs `CAP_NET_RAW`.
    Raw,
}

/// Round-trip statistics of a ping run, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RttStats {
    pub min_ms: f64,
    pub avg_ms: f64,
    pub max_ms: f64,
    pub mdev_ms: f64,
}

/// One traceroute probe's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopProbe {
    /// Who answered; none for `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
    /// Reverse name of `addr`, when it has one (and names were asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// traceroute's marks: `!H` host, `!N` network, `!P` protocol unreachable, `!X`
    /// prohibited, `!F` fragmentation needed, `!<errno>` a local error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation: Option<String>,
}

/// Result of one TCP connect attempt (`nc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectState {
    Open,
    Refused,
    Timeout,
    Unreachable,
    Error,
}

/// nmap's port states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortState {
    /// The connection was accepted.
    Open,
    /// Refused with a reset: the host is up, nothing listens.
    Closed,
    /// No answer in time, or an ICMP unreachable: something drops the probes.
    Filtered,
}

impl PortState {
    pub fn name(self) -> &'static str {
        match self {
            PortState::Open => "open",
            PortState::Closed => "closed",
            PortState::Filtered => "filtered",
        }
    }
}

/// One scanned port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortResult {
    pub port: u16,
    pub state: PortState,
    /// nmap's `--reason`: `syn-ack`, `conn-refused`, `no-response`, `host-unreach`, …
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// Ports left out of a host report because there are many in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCount {
    pub state: PortState,
    pub count: u32,
    pub reason: String,
}

/// How a DNS query failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsStatus {
    /// The name does not exist.
    #[serde(rename = "nxdomain")]
    NxDomain,
    /// The server failed to answer.
    #[serde(rename = "servfail")]
    ServFail,
    Refused,
    /// The name exists, but has no record of this type.
    NoAnswer,
    /// No server answered in time.
    Timeout,
    /// Anything else (another response code, a transport error).
    Error,
}

/// One answer record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "UPPERCASE")]
pub enum DnsRecord {
    A {
        address: Ipv4Addr,
    },
    Aaaa {
        address: Ipv6Addr,
    },
    Cname {
        target: String,
    },
    Mx {
        preference: u16,
        exchange: String,
    },
    /// The strings of a TXT record, non-printable bytes escaped.
    Txt {
        strings: Vec<String>,
    },
    Ns {
        nameserver: String,
    },
    Soa {
        mname: String,
        rname: String,
        serial: u32,
        refresh: i32,
        retry: i32,
        expire: i32,
        minimum: u32,
    },
    Ptr {
        name: String,
    },
    /// A record of a type not listed above (e.g. a DNAME in a CNAME chain).
    Other {
        rtype: String,
        data: String,
    },
}

/// What a run reports, as it happens. JSON objects tagged by `"event"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// ping: about to send; `size` is the payload.
    PingStart {
        host: String,
        addr: IpAddr,
        size: u32,
        socket: IcmpSocketKind,
    },
    /// ping: an echo reply; `bytes` counts the ICMP header and payload.
    PingReply {
        from: IpAddr,
        seq: u16,
        bytes: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl: Option<u8>,
        rtt_ms: f64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
    },
    /// ping: an ICMP error about one of our requests, or a failed send.
    PingError {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<IpAddr>,
        seq: u16,
        message: String,
    },
    /// ping: no reply to `seq` within the timeout.
    PingTimeout { seq: u16 },
    PingSummary {
        host: String,
        transmitted: u32,
        received: u32,
        #[serde(default)]
        duplicates: u32,
        #[serde(default)]
        errors: u32,
        loss_percent: f64,
        time_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rtt: Option<RttStats>,
    },
    /// nslookup: the server asked.
    DnsServer { server: String, port: u16 },
    /// nslookup: one answer record; `name` is its owner.
    DnsAnswer {
        name: String,
        ttl: u32,
        record: DnsRecord,
    },
    /// nslookup: a query that got no answer.
    DnsError {
        name: String,
        record_type: QueryType,
        status: DnsStatus,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
    },
    /// traceroute: about to probe.
    TraceStart {
        host: String,
        addr: IpAddr,
        max_hops: u32,
        packet_bytes: u32,
        method: TraceMethod,
    },
    /// traceroute: one hop, one entry per probe in sending order.
    Hop { ttl: u32, probes: Vec<HopProbe> },
    /// nc: one connect attempt.
    Connect {
        host: String,
        addr: SocketAddr,
        state: ConnectState,
        time_ms: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// nc: what the service sent first, non-printable bytes escaped.
    Banner {
        text: String,
        bytes: u32,
        #[serde(default)]
        truncated: bool,
        /// The service closed the connection.
        #[serde(default)]
        closed: bool,
    },
    /// nmap: about to scan.
    ScanStart {
        target: String,
        hosts: u32,
        ports: u32,
        probes: u32,
    },
    /// nmap: an open port, as soon as it is found.
    PortOpen {
        addr: IpAddr,
        port: u16,
        rtt_ms: f64,
    },
    /// nmap: one host's results (every host of a single-host scan; up hosts of a network).
    HostReport {
        addr: IpAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        up: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency_ms: Option<f64>,
        /// Ports shown, by port number.
        ports: Vec<PortResult>,
        /// States with too many ports to list (more than 25), counted instead.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        not_shown: Vec<StateCount>,
    },
    ScanSummary {
        addresses: u32,
        hosts_up: u32,
        open_ports: u32,
        elapsed_ms: u64,
    },
}

impl Event {
    /// The tool that emits this event.
    pub fn tool(&self) -> Tool {
        match self {
            Event::PingStart { .. }
            | Event::PingReply { .. }
            | Event::PingError { .. }
            | Event::PingTimeout { .. }
            | Event::PingSummary { .. } => Tool::Ping,
            Event::DnsServer { .. } | Event::DnsAnswer { .. } | Event::DnsError { .. } => {
                Tool::Nslookup
            }
            Event::TraceStart { .. } | Event::Hop { .. } => Tool::Traceroute,
            Event::Connect { .. } | Event::Banner { .. } => Tool::Nc,
            Event::ScanStart { .. }
            | Event::PortOpen { .. }
            | Event::HostReport { .. }
            | Event::ScanSummary { .. } => Tool::Nmap,
        }
    }

    /// The human rendering: one or more lines, without a trailing newline.
    pub fn text(&self) -> String {
        match self {
            Event::PingStart {
                host, addr, size, ..
            } => match addr {
                IpAddr::V4(_) => {
                    format!("PING {host} ({addr}) {size}({}) bytes of data.", size + 28)
                }
                IpAddr::V6(_) => format!("PING {host} ({addr}) {size} data bytes"),
            },
            Event::PingReply {
                from,
                seq,
                bytes,
                ttl,
                rtt_ms,
                duplicate,
            } => {
                let mut s = format!("{bytes} bytes from {from}: icmp_seq={seq}");
                if let Some(ttl) = ttl {
                    let _ = write!(s, " ttl={ttl}");
                }
                let _ = write!(s, " time={} ms", ping_ms(*rtt_ms));
                if *duplicate {
                    s.push_str(" (DUP!)");
                }
                s
            }
            Event::PingError { from, seq, message } => match from {
                Some(from) => format!("From {from} icmp_seq={seq} {message}"),
                None => format!("ping: {message} (icmp_seq={seq})"),
            },
            Event::PingTimeout { seq } => format!("no answer yet for icmp_seq={seq}"),
            Event::PingSummary {
                host,
                transmitted,
                received,
                duplicates,
                errors,
                loss_percent,
                time_ms,
                rtt,
            } => {
                let mut s = format!(
                    "--- {host} ping statistics ---\n{transmitted} packets transmitted, {received} received, "
                );
                if *duplicates > 0 {
                    let _ = write!(s, "+{duplicates} duplicates, ");
                }
                if *errors > 0 {
                    let _ = write!(s, "+{errors} errors, ");
                }
                let _ = write!(
                    s,
                    "{}% packet loss, time {time_ms}ms",
                    significant(*loss_percent, 6)
                );
                if let Some(r) = rtt {
                    let _ = write!(
                        s,
                        "\nrtt min/avg/max/mdev = {:.3}/{:.3}/{:.3}/{:.3} ms",
                        r.min_ms, r.avg_ms, r.max_ms, r.mdev_ms
                    );
                }
                s
            }
            Event::DnsServer { server, port } => {
                format!("Server:\t\t{server}\nAddress:\t{server}#{port}")
            }
            Event::DnsAnswer { name, record, .. } => match record {
                DnsRecord::A { address } => format!("Name:\t{name}\nAddress: {address}"),
                DnsRecord::Aaaa { address } => format!("Name:\t{name}\nAddress: {address}"),
                DnsRecord::Cname { target } => format!("{name}\tcanonical name = {target}"),
                DnsRecord::Mx {
                    preference,
                    exchange,
                } => format!("{name}\tmail exchanger = {preference} {exchange}"),
                DnsRecord::Txt { strings } => {
                    let quoted: Vec<String> = strings.iter().map(|s| format!("\"{s}\"")).collect();
                    format!("{name}\ttext = {}", quoted.join(" "))
                }
                DnsRecord::Ns { nameserver } => format!("{name}\tnameserver = {nameserver}"),
                DnsRecord::Soa {
                    mname,
                    rname,
                    serial,
                    refresh,
                    retry,
                    expire,
                    minimum,
                } => format!(
                    "{name}\n\torigin = {mname}\n\tmail addr = {rname}\n\tserial = {serial}\n\trefresh = {refresh}\n\tretry = {retry}\n\texpire = {expire}\n\tminimum = {minimum}"
                ),
                DnsRecord::Ptr { name: target } => format!("{name}\tname = {target}"),
                DnsRecord::Other { rtype, data } => format!("{name}\t{rtype} = {data}"),
            },
            Event::DnsError {
                name,
                status,
                message,
                ..
            } => match status {
                DnsStatus::NxDomain => format!("** server can't find {name}: NXDOMAIN"),
                DnsStatus::ServFail => format!("** server can't find {name}: SERVFAIL"),
                DnsStatus::Refused => format!("** server can't find {name}: REFUSED"),
                DnsStatus::NoAnswer => format!("*** Can't find {name}: No answer"),
                DnsStatus::Timeout => {
                    ";; connection timed out; no servers could be reached".to_string()
                }
                DnsStatus::Error => format!("** server can't find {name}: {message}"),
            },
            Event::TraceStart {
                host,
                addr,
                max_hops,
                packet_bytes,
                ..
            } => format!(
                "traceroute to {host} ({addr}), {max_hops} hops max, {packet_bytes} byte packets"
            ),
            Event::Hop { ttl, probes } => {
                let mut s = format!("{ttl:>2} ");
                let mut last: Option<IpAddr> = None;
                for p in probes {
                    let Some(addr) = p.addr else {
                        s.push_str(" *");
                        // A local failure (e.g. no route) has a reason but no address.
                        if let Some(a) = &p.annotation {
                            let _ = write!(s, " {a}");
                        }
                        continue;
                    };
                    if last != Some(addr) {
                        match &p.name {
                            Some(name) => {
                                let _ = write!(s, " {name} ({addr})");
                            }
                            None => {
                                let _ = write!(s, " {addr}");
                            }
                        }
                        last = Some(addr);
                    }
                    if let Some(rtt) = p.rtt_ms {
                        let _ = write!(s, "  {rtt:.3} ms");
                    }
                    if let Some(a) = &p.annotation {
                        let _ = write!(s, " {a}");
                    }
                }
                s
            }
            Event::Connect {
                host,
                addr,
                state,
                time_ms,
                error,
            } => {
                let ip = addr.ip();
                let who = if host.trim_matches(['[', ']']) == ip.to_string() {
                    ip.to_string()
                } else {
                    format!("{host} ({ip})")
                };
                let port = addr.port();
                let t = ping_ms(*time_ms);
                match state {
                    ConnectState::Open => format!(
                        "Connection to {who} {port} port [tcp/{}] succeeded! ({t} ms)",
                        service_name(port).unwrap_or("*")
                    ),
                    ConnectState::Refused => format!(
                        "nc: connect to {who} port {port} (tcp) failed: Connection refused ({t} ms)"
                    ),
                    ConnectState::Timeout => {
                        format!("nc: connect to {who} port {port} (tcp) timed out after {t} ms")
                    }
                    ConnectState::Unreachable | ConnectState::Error => format!(
                        "nc: connect to {who} port {port} (tcp) failed: {} ({t} ms)",
                        error.as_deref().unwrap_or("error")
                    ),
                }
            }
            Event::Banner {
                text,
                bytes,
                truncated,
                closed,
            } => {
                if *bytes == 0 {
                    if *closed {
                        "no banner: the service closed the connection".to_string()
                    } else {
                        "no banner received".to_string()
                    }
                } else if *truncated {
                    format!("banner: {text} (first {bytes} bytes)")
                } else {
                    format!("banner: {text}")
                }
            }
            Event::ScanStart {
                target,
                hosts,
                ports,
                probes,
            } => format!(
                "Scanning {target} ({hosts} {}, {ports} {}, {probes} TCP connect probes)",
                plural(*hosts, "host", "hosts"),
                plural(*ports, "port", "ports")
            ),
            Event::PortOpen { addr, port, .. } => {
                format!("Discovered open port {port}/tcp on {addr}")
            }
            Event::HostReport {
                addr,
                name,
                up,
                latency_ms,
                ports,
                not_shown,
            } => host_report(*addr, name.as_deref(), *up, *latency_ms, ports, not_shown),
            Event::ScanSummary {
                addresses,
                hosts_up,
                elapsed_ms,
                ..
            } => format!(
                "Nmap done: {addresses} IP {} ({hosts_up} {} up) scanned in {:.2} seconds",
                plural(*addresses, "address", "addresses"),
                plural(*hosts_up, "host", "hosts"),
                *elapsed_ms as f64 / 1000.0
            ),
        }
    }
}

fn plural(n: u32, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

fn host_report(
    addr: IpAddr,
    name: Option<&str>,
    up: bool,
    latency_ms: Option<f64>,
    ports: &[PortResult],
    not_shown: &[StateCount],
) -> String {
    let mut s = match name {
        Some(name) => format!("Nmap scan report for {name} ({addr})"),
        None => format!("Nmap scan report for {addr}"),
    };
    match (up, latency_ms) {
        (true, Some(ms)) => {
            let _ = write!(
                s,
                "\nHost is up ({}s latency).",
                significant(ms / 1000.0, 2)
            );
        }
        (true, None) => s.push_str("\nHost is up."),
        (false, _) => s.push_str("\nHost seems down (no port answered)."),
    }
    for n in not_shown {
        let _ = write!(
            s,
            "\nNot shown: {} {} tcp {} ({})",
            n.count,
            n.state.name(),
            plural(n.count, "port", "ports"),
            n.reason
        );
    }
    if ports.is_empty() {
        return s;
    }
    let cells: Vec<(String, &str, &str)> = ports
        .iter()
        .map(|p| {
            (
                format!("{}/tcp", p.port),
                p.state.name(),
                service_name(p.port).unwrap_or("unknown"),
            )
        })
        .collect();
    let w_port = cells.iter().map(|c| c.0.len()).max().unwrap_or(0).max(4) + 1;
    let w_state = cells.iter().map(|c| c.1.len()).max().unwrap_or(0).max(5) + 1;
    let _ = write!(s, "\n{:<w_port$}{:<w_state$}SERVICE", "PORT", "STATE");
    for (port, state, service) in cells {
        let _ = write!(s, "\n{port:<w_port$}{state:<w_state$}{service}");
    }
    s
}

/// iputils' precision: 3 decimals under 1 ms, 2 under 10, 1 under 100, none above.
pub(crate) fn ping_ms(ms: f64) -> String {
    if ms >= 99.95 {
        format!("{ms:.0}")
    } else if ms >= 9.995 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.3}")
    }
}

/// printf's `%.Ng`: `digits` significant digits, trailing zeros dropped.
pub(crate) fn significant(v: f64, digits: i32) -> String {
    if v == 0.0 || !v.is_finite() {
        return "0".to_string();
    }
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (digits - 1 - magnitude).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Renders bytes from the network safely: printable ASCII as is, `\\`, `\r`, `\n`, `\t`, and
/// `\xNN` for everything else (also `\"` when `quote`).
pub(crate) fn escape_bytes(bytes: &[u8], quote: bool) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'"' if quote => s.push_str("\\\""),
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s
}

/// Escapes control characters in text that came from the network (DNS names and data), so
/// that printing it cannot drive a terminal.
pub(crate) fn sanitize(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    let mut s = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(s, "\\u{{{:x}}}", u32::from(c));
        } else {
            s.push(c);
        }
    }
    s
}

/// Well-known TCP services, for nc's and nmap's SERVICE column.
pub(crate) fn service_name(port: u16) -> Option<&'static str> {
    Some(match port {
        21 => "ftp",
        22 => "ssh",
        23 => "telnet",
        25 => "smtp",
        53 => "domain",
        80 => "http",
        110 => "pop3",
        111 => "rpcbind",
        123 => "ntp",
        135 => "msrpc",
        139 => "netbios-ssn",
        143 => "imap",
        179 => "bgp",
        389 => "ldap",
        443 => "https",
        445 => "microsoft-ds",
        465 => "smtps",
        514 => "shell",
        587 => "submission",
        636 => "ldaps",
        853 => "domain-s",
        993 => "imaps",
        995 => "pop3s",
        1194 => "openvpn",
        1723 => "pptp",
        2049 => "nfs",
        2379 => "etcd-client",
        3306 => "mysql",
        3389 => "ms-wbt-server",
        4222 => "nats",
        5432 => "postgresql",
        5672 => "amqp",
        5900 => "vnc",
        6379 => "redis",
        6443 => "kubernetes",
        8080 => "http-proxy",
        8443 => "https-alt",
        9090 => "zeus-admin",
        9100 => "jetdirect",
        27017 => "mongod",
        51820 => "wireguard",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(e: &Event) -> Event {
        let json = serde_json::to_string(e).unwrap();
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, e, "{json}");
        back
    }

    fn samples() -> Vec<Event> {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        vec![
            Event::PingStart {
                host: "gw".into(),
                addr: v4,
                size: 56,
                socket: IcmpSocketKind::Datagram,
            },
            Event::PingReply {
                from: v4,
                seq: 1,
                bytes: 64,
                ttl: Some(64),
                rtt_ms: 0.045,
                duplicate: false,
            },
            Event::PingError {
                from: Some(v4),
                seq: 2,
                message: "Destination Host Unreachable".into(),
            },
            Event::PingTimeout { seq: 3 },
            Event::PingSummary {
                host: "gw".into(),
                transmitted: 3,
                received: 1,
                duplicates: 0,
                errors: 1,
                loss_percent: 66.6667,
                time_ms: 2003,
                rtt: Some(RttStats {
                    min_ms: 0.045,
                    avg_ms: 0.045,
                    max_ms: 0.045,
                    mdev_ms: 0.0,
                }),
            },
            Event::DnsServer {
                server: "10.0.0.53".into(),
                port: 53,
            },
            Event::DnsAnswer {
                name: "example.com".into(),
                ttl: 300,
                record: DnsRecord::Mx {
                    preference: 10,
                    exchange: "mx.example.com.".into(),
                },
            },
            Event::DnsAnswer {
                name: "example.com".into(),
                ttl: 300,
                record: DnsRecord::Soa {
                    mname: "ns1.example.com.".into(),
                    rname: "admin.example.com.".into(),
                    serial: 1,
                    refresh: 2,
                    retry: 3,
                    expire: 4,
                    minimum: 5,
                },
            },
            Event::DnsError {
                name: "nx.example.com".into(),
                record_type: QueryType::A,
                status: DnsStatus::NxDomain,
                message: String::new(),
            },
            Event::TraceStart {
                host: "t".into(),
                addr: v4,
                max_hops: 30,
                packet_bytes: 60,
                method: TraceMethod::Udp,
            },
            Event::Hop {
                ttl: 1,
                probes: vec![
                    HopProbe {
                        addr: Some(v4),
                        name: Some("r1.test".into()),
                        rtt_ms: Some(0.5),
                        annotation: None,
                    },
                    HopProbe {
                        addr: None,
                        name: None,
                        rtt_ms: None,
                        annotation: None,
                    },
                ],
            },
            Event::Connect {
                host: "db".into(),
                addr: "10.0.0.1:5432".parse().unwrap(),
                state: ConnectState::Refused,
                time_ms: 0.3,
                error: None,
            },
            Event::Banner {
                text: "SSH-2.0-x\\r\\n".into(),
                bytes: 11,
                truncated: false,
                closed: false,
            },
            Event::ScanStart {
                target: "10.0.0.0/30".into(),
                hosts: 4,
                ports: 3,
                probes: 12,
            },
            Event::PortOpen {
                addr: v4,
                port: 22,
                rtt_ms: 0.2,
            },
            Event::HostReport {
                addr: v4,
                name: None,
                up: true,
                latency_ms: Some(0.41),
                ports: vec![PortResult {
                    port: 22,
                    state: PortState::Open,
                    reason: "syn-ack".into(),
                    rtt_ms: Some(0.41),
                }],
                not_shown: vec![StateCount {
                    state: PortState::Closed,
                    count: 997,
                    reason: "conn-refused".into(),
                }],
            },
            Event::ScanSummary {
                addresses: 4,
                hosts_up: 1,
                open_ports: 1,
                elapsed_ms: 1234,
            },
        ]
    }

    #[test]
    fn json_round_trip() {
        for e in samples() {
            round_trip(&e);
        }
        let json = serde_json::to_value(&samples()[1]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event":"ping_reply","from":"10.0.0.1","seq":1,"bytes":64,"ttl":64,"rtt_ms":0.045})
        );
        let json = serde_json::to_value(&samples()[6]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event":"dns_answer","name":"example.com","ttl":300,
                "record":{"type":"MX","preference":10,"exchange":"mx.example.com."}})
        );
        let json = serde_json::to_value(&samples()[8]).unwrap();
        assert_eq!(json["status"], "nxdomain");
    }

    #[test]
    fn text_rendering() {
        let t: Vec<String> = samples().iter().map(Event::text).collect();
        assert_eq!(t[0], "PING gw (10.0.0.1) 56(84) bytes of data.");
        assert_eq!(
            t[1],
            "64 bytes from 10.0.0.1: icmp_seq=1 ttl=64 time=0.045 ms"
        );
        assert_eq!(
            t[2],
            "From 10.0.0.1 icmp_seq=2 Destination Host Unreachable"
        );
        assert_eq!(t[3], "no answer yet for icmp_seq=3");
        assert_eq!(
            t[4],
            "--- gw ping statistics ---\n3 packets transmitted, 1 received, +1 errors, 66.6667% packet loss, time 2003ms\nrtt min/avg/max/mdev = 0.045/0.045/0.045/0.000 ms"
        );
        assert_eq!(t[5], "Server:\t\t10.0.0.53\nAddress:\t10.0.0.53#53");
        assert_eq!(t[6], "example.com\tmail exchanger = 10 mx.example.com.");
        assert!(t[7].starts_with("example.com\n\torigin = ns1.example.com.\n\tmail addr = admin.example.com.\n\tserial = 1"));
        assert_eq!(t[8], "** server can't find nx.example.com: NXDOMAIN");
        assert_eq!(
            t[9],
            "traceroute to t (10.0.0.1), 30 hops max, 60 byte packets"
        );
        assert_eq!(t[10], " 1  r1.test (10.0.0.1)  0.500 ms *");
        assert_eq!(
            t[11],
            "nc: connect to db (10.0.0.1) port 5432 (tcp) failed: Connection refused (0.300 ms)"
        );
        assert_eq!(t[12], "banner: SSH-2.0-x\\r\\n");
        assert_eq!(
            t[13],
            "Scanning 10.0.0.0/30 (4 hosts, 3 ports, 12 TCP connect probes)"
        );
        assert_eq!(t[14], "Discovered open port 22/tcp on 10.0.0.1");
        assert_eq!(
            t[15],
            "Nmap scan report for 10.0.0.1\nHost is up (0.00041s latency).\nNot shown: 997 closed tcp ports (conn-refused)\nPORT   STATE SERVICE\n22/tcp open  ssh"
        );
        assert_eq!(
            t[16],
            "Nmap done: 4 IP addresses (1 host up) scanned in 1.23 seconds"
        );

        let stars = Event::Hop {
            ttl: 12,
            probes: vec![
                HopProbe {
                    addr: None,
                    name: None,
                    rtt_ms: None,
                    annotation: None
                };
                3
            ],
        };
        assert_eq!(stars.text(), "12  * * *");
        let open = Event::Connect {
            host: "10.0.0.1".into(),
            addr: "10.0.0.1:22".parse().unwrap(),
            state: ConnectState::Open,
            time_ms: 12.345,
            error: None,
        };
        assert_eq!(
            open.text(),
            "Connection to 10.0.0.1 22 port [tcp/ssh] succeeded! (12.3 ms)"
        );
    }

    #[test]
    fn number_formats() {
        assert_eq!(ping_ms(0.0451), "0.045");
        assert_eq!(ping_ms(1.234), "1.23");
        assert_eq!(ping_ms(12.34), "12.3");
        assert_eq!(ping_ms(123.4), "123");
        assert_eq!(significant(0.0, 6), "0");
        assert_eq!(significant(100.0, 6), "100");
        assert_eq!(significant(25.0, 6), "25");
        assert_eq!(significant(33.333333333, 6), "33.3333");
        assert_eq!(significant(0.00041, 2), "0.00041");
        assert_eq!(significant(0.0123, 2), "0.012");
        assert_eq!(significant(1.5, 2), "1.5");
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escape_bytes(b"SSH-2.0\r\n\x00\xff\\\"x\t", false),
            "SSH-2.0\\r\\n\\x00\\xff\\\\\"x\\t"
        );
        assert_eq!(escape_bytes(b"a\"b", true), "a\\\"b");
        assert_eq!(sanitize("ok.example."), "ok.example.");
        assert_eq!(sanitize("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
    }
}

//! Argument checks, done before anything is sent: hosts, ports, port lists, CIDRs and caps.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{
    Limits, NcRequest, NmapRequest, NslookupRequest, PingRequest, QueryType, Request,
    TracerouteRequest,
};

/// A rejected argument, named as the CLI flag (`port` is `--port`; the positional `host` is
/// just `host`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct InvalidArgument {
    /// The flag without dashes: `host`, `port`, `ports`, `count`, `interval-ms`, …
    pub argument: String,
    pub message: String,
}

impl InvalidArgument {
    pub fn new(argument: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            argument: argument.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for InvalidArgument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.argument == "host" {
            write!(f, "invalid host: {}", self.message)
        } else {
            write!(f, "invalid --{}: {}", self.argument, self.message)
        }
    }
}

/// Longest DNS name in text form.
const MAX_HOST_LEN: usize = 253;
/// Longest port list accepted (keeps parsing cheap).
const MAX_PORT_SPEC_LEN: usize = 4096;

/// A validated target host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Ip(IpAddr),
    Name(String),
}

impl Host {
    pub(crate) fn parse(s: &str) -> Result<Host, InvalidArgument> {
        parse_host(s, "host")
    }
}

fn parse_host(s: &str, arg: &str) -> Result<Host, InvalidArgument> {
    let bad = |m: String| InvalidArgument::new(arg, m);
    if s.is_empty() {
        return Err(bad("must not be empty".into()));
    }
    if s.len() > MAX_HOST_LEN {
        return Err(bad(format!("is longer than {MAX_HOST_LEN} characters")));
    }
    if s.starts_with('-') {
        return Err(bad(format!("{s:?} must not start with '-'")));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(format!(
            "{s:?} must not contain spaces or control characters"
        )));
    }
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    if s.contains(':') || s.contains('[') {
        return Err(bad(format!("{s:?} is not a valid IPv6 address")));
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() {
        return Err(bad(format!("{s:?} is not a hostname")));
    }
    let mut all_numeric = true;
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad(format!("{s:?} has an empty label")));
        }
        if label.len() > 63 {
            return Err(bad(format!("{s:?} has a label longer than 63 characters")));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(bad(format!("{s:?} contains the invalid character {c:?}")));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad(format!(
                "{s:?} has a label that starts or ends with '-'"
            )));
        }
        all_numeric &= label.bytes().all(|b| b.is_ascii_digit());
    }
    // "10.1" or "1.2.3.256" would otherwise reach getaddrinfo, which reads them as odd IPv4
    // shorthands.
    if all_numeric {
        return Err(bad(format!("{s:?} is not a valid IPv4 address")));
    }
    Ok(Host::Name(s.to_string()))
}

/// A TCP/UDP port 1–65535.
pub(crate) fn check_port(port: u32, arg: &str) -> Result<u16, InvalidArgument> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(InvalidArgument::new(
            arg,
            format!("{port} is not in 1-65535"),
        )),
    }
}

/// Parses a port list such as `22,80,443,8000-8100` (also `-1024` and `60000-`) into sorted,
/// distinct ports.
pub fn parse_ports(spec: &str) -> Result<Vec<u16>, InvalidArgument> {
    let bad = |m: String| InvalidArgument::new("ports", m);
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(bad("must not be empty".into()));
    }
    if spec.len() > MAX_PORT_SPEC_LEN {
        return Err(bad(format!(
            "is longer than {MAX_PORT_SPEC_LEN} characters"
        )));
    }
    let number = |s: &str| -> Result<u16, InvalidArgument> {
        let n: u32 = s
            .parse()
            .map_err(|_| bad(format!("{s:?} is not a port number")))?;
        check_port(n, "ports")
    };
    let mut wanted = vec![false; 65536];
    for item in spec.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(bad(format!("{spec:?} has an empty entry")));
        }
        let (lo, hi) = match item.split_once('-') {
            None => {
                let p = number(item)?;
                (p, p)
            }
            Some((a, b)) => {
                let lo = if a.trim().is_empty() {
                    1
                } else {
                    number(a.trim())?
                };
                let hi = if b.trim().is_empty() {
                    65535
                } else {
                    number(b.trim())?
                };
                if lo > hi {
                    return Err(bad(format!("range {item:?} is reversed")));
                }
                (lo, hi)
            }
        };
        for p in lo..=hi {
            wanted[usize::from(p)] = true;
        }
    }
    Ok((1..=65535u16).filter(|p| wanted[usize::from(*p)]).collect())
}

/// What nmap scans: one host, or every address of a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanTarget {
    Host(Host),
    Net { base: IpAddr, prefix: u8 },
}

impl ScanTarget {
    pub(crate) fn parse(s: &str) -> Result<ScanTarget, InvalidArgument> {
        let Some((addr, len)) = s.split_once('/') else {
            return Ok(ScanTarget::Host(Host::parse(s)?));
        };
        let bad = |m: String| InvalidArgument::new("host", m);
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| bad(format!("{s:?}: a CIDR must start with an IP address")))?;
        let bits: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| *p <= bits)
            .ok_or_else(|| bad(format!("{s:?}: the prefix length must be 0-{bits}")))?;
        // Like nmap, 10.0.0.5/30 means the network 10.0.0.4/30.
        let base = match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        Ok(ScanTarget::Net { base, prefix })
    }

    /// Number of addresses, saturating (a /64 is "a lot", never expanded).
    pub(crate) fn host_count(&self) -> u128 {
        match self {
            ScanTarget::Host(_) => 1,
            ScanTarget::Net { base, prefix } => {
                let bits: u32 = if base.is_ipv4() { 32 } else { 128 };
                1u128
                    .checked_shl(bits - u32::from(*prefix))
                    .unwrap_or(u128::MAX)
            }
        }
    }

    /// The network's addresses in order; call only after [`Self::host_count`] was capped.
    pub(crate) fn addresses(&self) -> Vec<IpAddr> {
        let ScanTarget::Net { base, .. } = self else {
            return Vec::new();
        };
        let n = self.host_count();
        match base {
            IpAddr::V4(v4) => {
                let start = u32::from(*v4);
                (0..n as u32)
                    .map(|i| IpAddr::V4(Ipv4Addr::from(start.wrapping_add(i))))
                    .collect()
            }
            IpAddr::V6(v6) => {
                let start = u128::from(*v6);
                (0..n)
                    .map(|i| IpAddr::V6(Ipv6Addr::from(start.wrapping_add(i))))
                    .collect()
            }
        }
    }
}

/// A DNS server: `IP`, `IP:port` or `[IPv6]:port`; port 53 when left out.
pub(crate) fn parse_server(s: &str, arg: &str) -> Result<SocketAddr, InvalidArgument> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(InvalidArgument::new(arg, "port 0 is not in 1-65535"));
        }
        return Ok(sa);
    }
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(InvalidArgument::new(
        arg,
        format!("{s:?} is not an IP address or IP:port"),
    ))
}

fn check_range<T: PartialOrd + fmt::Display + Copy>(
    arg: &str,
    value: Option<T>,
    min: T,
    max: T,
) -> Result<(), InvalidArgument> {
    match value {
        Some(v) if v < min || v > max => Err(InvalidArgument::new(
            arg,
            format!("{v} is not in {min}-{max}"),
        )),
        _ => Ok(()),
    }
}

fn check_timeout(value: Option<u64>, limits: &Limits) -> Result<(), InvalidArgument> {
    check_range("timeout-ms", value, 1, limits.max_timeout_ms)
}

impl PingRequest {
    fn validate(&self, limits: &Limits) -> Result<(), InvalidArgument> {
        Host::parse(&self.host)?;
        // Sequence numbers are 16-bit whatever the limit says.
        check_range("count", self.count, 1, limits.max_count.min(65535))?;
        check_range(
            "interval-ms",
            self.interval_ms,
            limits.min_interval_ms,
            limits.max_timeout_ms.max(limits.min_interval_ms),
        )?;
        check_timeout(self.timeout_ms, limits)?;
        // 65507 is the IPv4 maximum (65535 - IP header - ICMP header).
        check_range("size", self.size, 0, limits.max_size.min(65507))
    }
}

impl NslookupRequest {
    fn validate(&self, limits: &Limits) -> Result<(), InvalidArgument> {
        let host = Host::parse(&self.host)?;
        if let (Host::Ip(_), Some(t)) = (&host, self.record_type)
            && t != QueryType::Ptr
        {
            return Err(InvalidArgument::new(
                "type",
                format!("an IP address is looked up as PTR, not {t}"),
            ));
        }
        if let Some(s) = &self.server {
            parse_server(s, "server")?;
        }
        check_timeout(self.timeout_ms, limits)
    }
}

impl TracerouteRequest {
    fn validate(&self, limits: &Limits) -> Result<(), InvalidArgument> {
        Host::parse(&self.host)?;
        check_range("max-hops", self.max_hops, 1, limits.max_hops.min(255))?;
        check_range("queries", self.queries, 1, limits.max_queries.max(1))?;
        check_timeout(self.timeout_ms, limits)?;
        if let Some(s) = &self.server {
            parse_server(s, "server")?;
        }
        Ok(())
    }
}

impl NcRequest {
    fn validate(&self, limits: &Limits) -> Result<(), InvalidArgument> {
        Host::parse(&self.host)?;
        check_port(self.port, "port")?;
        check_timeout(self.timeout_ms, limits)
    }
}

impl NmapRequest {
    /// The scan's targets and ports, with hosts × ports checked against the cap.
    pub(crate) fn plan(&self, limits: &Limits) -> Result<(ScanTarget, Vec<u16>), InvalidArgument> {
        let target = ScanTarget::parse(&self.host)?;
        let ports = parse_ports(self.ports.as_deref().unwrap_or(Self::DEFAULT_PORTS))?;
        let cap = u128::from(limits.max_scan_probes);
        let hosts = target.host_count();
        if hosts > cap {
            return Err(InvalidArgument::new(
                "host",
                format!(
                    "{:?} has {} addresses, more than the limit of {} probes",
                    self.host,
                    if hosts == u128::MAX {
                        "too many".to_string()
                    } else {
                        hosts.to_string()
                    },
                    limits.max_scan_probes
                ),
            ));
        }
        let probes = hosts * ports.len() as u128;
        if probes > cap {
            return Err(InvalidArgument::new(
                "ports",
                format!(
                    "{hosts} host(s) × {} port(s) = {probes} probes, more than the limit of {}",
                    ports.len(),
                    limits.max_scan_probes
                ),
            ));
        }
        Ok((target, ports))
    }

    fn validate(&self, limits: &Limits) -> Result<(), InvalidArgument> {
        check_timeout(self.timeout_ms, limits)?;
        check_range(
            "concurrency",
            self.concurrency,
            1,
            limits.max_concurrency.max(1),
        )?;
        self.plan(limits).map(drop)
    }
}

impl Request {
    /// Checks every argument against `limits`; nothing is sent before this passes.
    pub fn validate(&self, limits: &Limits) -> Result<(), InvalidArgument> {
        match self {
            Request::Ping(r) => r.validate(limits),
            Request::Nslookup(r) => r.validate(limits),
            Request::Traceroute(r) => r.validate(limits),
            Request::Nc(r) => r.validate(limits),
            Request::Nmap(r) => r.validate(limits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_err(s: &str) -> String {
        Host::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn hosts() {
        assert_eq!(
            Host::parse("10.0.0.1").unwrap(),
            Host::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            Host::parse("::1").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            Host::parse("[fd00::1]").unwrap(),
            Host::Ip("fd00::1".parse().unwrap())
        );
        for ok in [
            "example.com",
            "example.com.",
            "db-1.internal",
            "_srv.example",
            "localhost",
            "a1",
        ] {
            assert_eq!(Host::parse(ok).unwrap(), Host::Name(ok.to_string()), "{ok}");
        }
        assert_eq!(host_err(""), "invalid host: must not be empty");
        assert!(host_err("-oProxyCommand=x").contains("must not start with '-'"));
        assert!(host_err("a b").contains("spaces or control"));
        assert!(host_err("a\nb").contains("spaces or control"));
        assert!(host_err("a\u{7f}b").contains("spaces or control"));
        assert!(host_err(&"a".repeat(254)).contains("longer than 253"));
        assert!(host_err(&format!("{}.com", "a".repeat(64))).contains("longer than 63"));
        assert!(host_err("a..b").contains("empty label"));
        assert!(host_err(".").contains("not a hostname"));
        assert!(host_err("a.-b.c").contains("starts or ends with '-'"));
        assert!(host_err("a-.b").contains("starts or ends with '-'"));
        assert!(host_err("exa$mple.com").contains("invalid character '$'"));
        assert!(host_err("bücher.de").contains("invalid character"));
        assert!(host_err("1.2.3.256").contains("not a valid IPv4"));
        assert!(host_err("10.1").contains("not a valid IPv4"));
        assert!(host_err("fd00::g").contains("not a valid IPv6"));
        assert!(host_err("a/b").contains("invalid character '/'"));
    }

    #[test]
    fn ports() {
        assert_eq!(check_port(22, "port").unwrap(), 22);
        assert_eq!(
            check_port(0, "port").unwrap_err().to_string(),
            "invalid --port: 0 is not in 1-65535"
        );
        assert_eq!(
            check_port(65536, "port").unwrap_err().to_string(),
            "invalid --port: 65536 is not in 1-65535"
        );
        assert_eq!(
            parse_ports("443, 22,80,22,8000-8002").unwrap(),
            vec![22, 80, 443, 8000, 8001, 8002]
        );
        assert_eq!(parse_ports("-3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_ports("65534-").unwrap(), vec![65534, 65535]);
        assert_eq!(parse_ports("1-65535").unwrap().len(), 65535);
        for (bad, why) in [
            ("", "must not be empty"),
            ("22,", "empty entry"),
            ("0", "0 is not in 1-65535"),
            ("70000", "70000 is not in 1-65535"),
            ("http", "not a port number"),
            ("90-80", "reversed"),
            ("1-2-3", "not a port number"),
        ] {
            let e = parse_ports(bad).unwrap_err();
            assert_eq!(e.argument, "ports");
            assert!(e.message.contains(why), "{bad}: {e}");
        }
        // A bare "-" is nmap's "every port".
        assert_eq!(parse_ports("-").unwrap().len(), 65535);
        assert!(parse_ports(&"1,".repeat(3000)).is_err());
    }

    #[test]
    fn cidrs() {
        let t = ScanTarget::parse("10.0.0.5/30").unwrap();
        assert_eq!(t.host_count(), 4);
        assert_eq!(
            t.addresses(),
            ["10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert_eq!(
            ScanTarget::parse("10.0.0.1/32").unwrap().addresses().len(),
            1
        );
        let v6 = ScanTarget::parse("fd00::17/126").unwrap();
        assert_eq!(
            v6.addresses(),
            ["fd00::14", "fd00::15", "fd00::16", "fd00::17"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert_eq!(
            ScanTarget::parse("0.0.0.0/0").unwrap().host_count(),
            1 << 32
        );
        assert_eq!(ScanTarget::parse("::/0").unwrap().host_count(), u128::MAX);
        assert_eq!(
            ScanTarget::parse("::/64").unwrap().host_count(),
            1u128 << 64
        );
        assert!(ScanTarget::parse("10.0.0.0/33").is_err());
        assert!(ScanTarget::parse("fd00::/129").is_err());
        assert!(ScanTarget::parse("host/24").is_err());
        assert!(ScanTarget::parse("10.0.0.0/x").is_err());
        assert_eq!(
            ScanTarget::parse("example.com").unwrap(),
            ScanTarget::Host(Host::Name("example.com".into()))
        );
    }

    #[test]
    fn scan_cap_is_checked_before_expansion() {
        let limits = Limits::default();
        let req = |host: &str, ports: &str| NmapRequest {
            host: host.into(),
            ports: Some(ports.into()),
            ..Default::default()
        };
        assert!(req("10.0.0.0/24", "22,80,443").plan(&limits).is_ok()); // 768
        let e = req("10.0.0.0/24", "22,80,443,8080,8443")
            .plan(&limits)
            .unwrap_err();
        assert_eq!(e.argument, "ports");
        assert!(
            e.message.contains("256 host(s) × 5 port(s) = 1280 probes"),
            "{e}"
        );
        let e = req("::/0", "22").plan(&limits).unwrap_err();
        assert_eq!(e.argument, "host");
        assert!(e.message.contains("too many"), "{e}");
        let e = req("10.0.0.0/16", "22").plan(&limits).unwrap_err();
        assert!(e.message.contains("65536 addresses"), "{e}");
        assert!(req("db", "1-1024").plan(&limits).is_ok());
        assert!(req("db", "1-1025").plan(&limits).is_err());
        let small = Limits {
            max_scan_probes: 4,
            ..Limits::default()
        };
        assert!(req("10.0.0.0/30", "22").plan(&small).is_ok());
        assert!(req("10.0.0.0/30", "22,23").plan(&small).is_err());
        // Default ports when none are given.
        let (_, ports) = NmapRequest::new("db").plan(&limits).unwrap();
        assert!(ports.contains(&22) && ports.contains(&443));
    }

    #[test]
    fn servers() {
        assert_eq!(
            parse_server("10.0.0.53", "server").unwrap(),
            "10.0.0.53:53".parse().unwrap()
        );
        assert_eq!(
            parse_server("10.0.0.53:5353", "server").unwrap(),
            "10.0.0.53:5353".parse().unwrap()
        );
        assert_eq!(
            parse_server("::1", "server").unwrap(),
            "[::1]:53".parse().unwrap()
        );
        assert_eq!(
            parse_server("[::1]:5353", "server").unwrap(),
            "[::1]:5353".parse().unwrap()
        );
        assert!(parse_server("dns.google", "server").is_err());
        assert!(parse_server("10.0.0.1:0", "server").is_err());
        assert!(parse_server("10.0.0.1:99999", "server").is_err());
    }

    #[test]
    fn requests_and_caps() {
        let l = Limits::default();
        let ping = |f: fn(&mut PingRequest)| {
            let mut r = PingRequest::new("10.0.0.1");
            f(&mut r);
            Request::Ping(r).validate(&l)
        };
        assert!(ping(|_| {}).is_ok());
        assert_eq!(
            ping(|r| r.count = Some(0)).unwrap_err().to_string(),
            "invalid --count: 0 is not in 1-100"
        );
        assert!(ping(|r| r.count = Some(101)).is_err());
        assert_eq!(
            ping(|r| r.interval_ms = Some(10)).unwrap_err().to_string(),
            "invalid --interval-ms: 10 is not in 200-60000"
        );
        assert!(ping(|r| r.timeout_ms = Some(0)).is_err());
        assert!(ping(|r| r.timeout_ms = Some(60_001)).is_err());
        assert!(ping(|r| r.size = Some(0)).is_ok());
        assert!(ping(|r| r.size = Some(65_001)).is_err());
        assert!(ping(|r| r.host = "-x".into()).is_err());

        let mut t = TracerouteRequest::new("example.com");
        assert!(Request::Traceroute(t.clone()).validate(&l).is_ok());
        t.max_hops = Some(65);
        assert_eq!(
            Request::Traceroute(t.clone())
                .validate(&l)
                .unwrap_err()
                .to_string(),
            "invalid --max-hops: 65 is not in 1-64"
        );
        t.max_hops = Some(0);
        assert!(Request::Traceroute(t.clone()).validate(&l).is_err());
        t.max_hops = None;
        t.queries = Some(11);
        assert!(Request::Traceroute(t.clone()).validate(&l).is_err());
        t.queries = None;
        t.server = Some("nope".into());
        assert_eq!(
            Request::Traceroute(t).validate(&l).unwrap_err().argument,
            "server"
        );

        assert!(Request::Nc(NcRequest::new("db", 5432)).validate(&l).is_ok());
        let mut nc = NcRequest::new("db", 1);
        nc.port = 0;
        assert_eq!(
            Request::Nc(nc).validate(&l).unwrap_err().to_string(),
            "invalid --port: 0 is not in 1-65535"
        );

        let mut ns = NslookupRequest::new("10.0.0.1");
        assert!(Request::Nslookup(ns.clone()).validate(&l).is_ok());
        ns.record_type = Some(QueryType::Mx);
        assert_eq!(
            Request::Nslookup(ns.clone())
                .validate(&l)
                .unwrap_err()
                .argument,
            "type"
        );
        ns.record_type = Some(QueryType::Ptr);
        assert!(Request::Nslookup(ns).validate(&l).is_ok());

        let mut nmap = NmapRequest::new("10.0.0.0/30");
        nmap.concurrency = Some(0);
        assert_eq!(
            Request::Nmap(nmap.clone())
                .validate(&l)
                .unwrap_err()
                .argument,
            "concurrency"
        );
        nmap.concurrency = Some(257);
        assert!(Request::Nmap(nmap.clone()).validate(&l).is_err());
        nmap.concurrency = None;
        nmap.ports = Some("0".into());
        assert_eq!(
            Request::Nmap(nmap).validate(&l).unwrap_err().to_string(),
            "invalid --ports: 0 is not in 1-65535"
        );
    }
}

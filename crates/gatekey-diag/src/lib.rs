//! Native network diagnostics for gatekey: `ping`, `nslookup`, `traceroute`, `nc` and `nmap`,
//! implemented in Rust on sockets (no system binaries, no shell), runnable on a tokio
//! `current_thread` runtime on the control plane or on any agent.
//!
//! # Tools
//!
//! | tool | what it does | privileges |
//! |---|---|---|
//! | `ping` | ICMP echo (IPv4 and IPv6), iputils-style reply lines and summary | an ICMP datagram socket (`net.ipv4.ping_group_range` covers the process's group; it also governs IPv6) or else a raw socket (`CAP_NET_RAW`) |
//! | `nslookup` | DNS lookup of A, AAAA, CNAME, MX, TXT, NS, SOA or PTR (an IP address means PTR) through the system resolver or a given server | none |
//! | `traceroute` | per hop: address, reverse name and one RTT per probe (`*` for none) | `udp` method (default): none — UDP probes with `IP_RECVERR`/`IPV6_RECVERR`, like tracepath; `icmp` method: as `ping` |
//! | `nc` | TCP connect test: open, refused, timed out or unreachable, and how long it took; optionally the service's banner | none |
//! | `nmap` | TCP connect scan of a port list on a host or a small CIDR: open / closed / filtered | none |
//!
//! # Running
//!
//! [`run`] validates a [`Request`] against [`Limits`] (before anything is sent), runs the tool
//! and streams [`Event`]s into a bounded channel as they happen (a ping reply is sent when it
//! arrives). A full channel slows the tool down; a closed channel stops it
//! ([`DiagError::Cancelled`]). Dropping the future stops all probing and closes every socket:
//! nothing is spawned.
//!
//! # JSON
//!
//! A [`Request`] is what the REST API accepts and what travels to the agent; durations are in
//! milliseconds, optional fields may be left out, unknown fields are rejected:
//!
//! ```json
//! {"tool":"ping","host":"10.0.0.1","count":4,"interval_ms":1000,"timeout_ms":2000,"size":56}
//! {"tool":"nslookup","host":"example.com","type":"MX","server":"10.0.0.53:53","timeout_ms":5000}
//! {"tool":"traceroute","host":"10.0.0.1","max_hops":30,"queries":3,"timeout_ms":3000,"method":"udp","numeric":true}
//! {"tool":"nc","host":"db.internal","port":5432,"timeout_ms":5000,"banner":true}
//! {"tool":"nmap","host":"10.0.0.0/28","ports":"22,80,443,8000-8010","timeout_ms":1000,"concurrency":64}
//! ```
//!
//! `host` is a hostname, an IPv4 or an IPv6 address; for `nmap` it may also be a CIDR
//! (`10.0.0.0/28`, `fd00::/120`), every address of which is scanned.
//!
//! An [`Event`] is a JSON object tagged by `"event"` (the agent sends them as JSON lines, the
//! server and CLI parse them back); [`Event::text`] renders the familiar human line(s):
//!
//! ```json
//! {"event":"ping_reply","from":"10.0.0.1","seq":1,"bytes":64,"ttl":64,"rtt_ms":0.045}
//! ```
//! renders as `64 bytes from 10.0.0.1: icmp_seq=1 ttl=64 time=0.045 ms`.
//!
//! # Success
//!
//! [`Outcome::success`] says whether the target answered:
//! - `ping`: at least one echo reply;
//! - `nslookup`: at least one answer record;
//! - `traceroute`: the destination answered a probe within `max_hops`;
//! - `nc`: the port is open (the connection was accepted);
//! - `nmap`: at least one scanned host is up, i.e. answered on some port (open, or closed with
//!   a reset).
//!
//! A target that does not answer is not an error: the run is `Ok` with `success: false`.
//! [`DiagError`] is for runs that could not take place (bad argument, unresolvable host,
//! missing privilege, socket failure, receiver gone).

mod dns;
mod event;
mod icmp;
mod ping;
mod sys;
mod tcp;
mod trace;
mod validate;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use event::{
    ConnectState, DnsRecord, DnsStatus, Event, HopProbe, IcmpSocketKind, PortResult, PortState,
    RttStats, StateCount,
};
pub use validate::{InvalidArgument, parse_ports};

/// One of the diagnostic tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    Ping,
    Nslookup,
    Traceroute,
    Nc,
    Nmap,
}

impl Tool {
    /// Every tool, in the order `troubleshoot list` shows them.
    pub const ALL: [Tool; 5] = [
        Tool::Ping,
        Tool::Nslookup,
        Tool::Traceroute,
        Tool::Nc,
        Tool::Nmap,
    ];

    /// The tool's command name.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Ping => "ping",
            Tool::Nslookup => "nslookup",
            Tool::Traceroute => "traceroute",
            Tool::Nc => "nc",
            Tool::Nmap => "nmap",
        }
    }

    /// One-line description, as `troubleshoot list` prints it.
    pub fn description(self) -> &'static str {
        match self {
            Tool::Ping => "Test ICMP connectivity to a host",
            Tool::Nslookup => "Perform DNS lookup for a hostname",
            Tool::Traceroute => "Trace the route to a host",
            Tool::Nc => "Test TCP connectivity to a port",
            Tool::Nmap => "Scan ports on a host",
        }
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error of [`Tool::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tool {0:?} (expected one of: ping, nslookup, traceroute, nc, nmap)")]
pub struct UnknownTool(pub String);

impl FromStr for Tool {
    type Err = UnknownTool;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tool::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownTool(s.to_string()))
    }
}

/// A diagnostic to run; the JSON form is tagged by `"tool"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "tool", rename_all = "lowercase")]
pub enum Request {
    Ping(PingRequest),
    Nslookup(NslookupRequest),
    Traceroute(TracerouteRequest),
    Nc(NcRequest),
    Nmap(NmapRequest),
}

impl Request {
    /// The tool this request runs.
    pub fn tool(&self) -> Tool {
        match self {
            Request::Ping(_) => Tool::Ping,
            Request::Nslookup(_) => Tool::Nslookup,
            Request::Traceroute(_) => Tool::Traceroute,
            Request::Nc(_) => Tool::Nc,
            Request::Nmap(_) => Tool::Nmap,
        }
    }

    /// The target as given (hostname, address, or for nmap possibly a CIDR).
    pub fn host(&self) -> &str {
        match self {
            Request::Ping(r) => &r.host,
            Request::Nslookup(r) => &r.host,
            Request::Traceroute(r) => &r.host,
            Request::Nc(r) => &r.host,
            Request::Nmap(r) => &r.host,
        }
    }
}

/// `ping`: ICMP echo requests to `host`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingRequest {
    pub host: String,
    /// Echo requests to send (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Time between requests (default 1000 ms, at least [`Limits::min_interval_ms`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// How long to wait for each reply (default 2000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Payload bytes after the 8-byte ICMP header (default 56).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
}

impl PingRequest {
    pub const DEFAULT_COUNT: u32 = 4;
    pub const DEFAULT_INTERVAL_MS: u64 = 1000;
    pub const DEFAULT_TIMEOUT_MS: u64 = 2000;
    pub const DEFAULT_SIZE: u32 = 56;

    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            ..Self::default()
        }
    }
}

/// DNS record types `nslookup` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum QueryType {
    A,
    Aaaa,
    Cname,
    Mx,
    Txt,
    Ns,
    Soa,
    Ptr,
}

impl QueryType {
    pub const ALL: [QueryType; 8] = [
        QueryType::A,
        QueryType::Aaaa,
        QueryType::Cname,
        QueryType::Mx,
        QueryType::Txt,
        QueryType::Ns,
        QueryType::Soa,
        QueryType::Ptr,
    ];

    /// The type's mnemonic: `A`, `AAAA`, `CNAME`, …
    pub fn name(self) -> &'static str {
        match self {
            QueryType::A => "A",
            QueryType::Aaaa => "AAAA",
            QueryType::Cname => "CNAME",
            QueryType::Mx => "MX",
            QueryType::Txt => "TXT",
            QueryType::Ns => "NS",
            QueryType::Soa => "SOA",
            QueryType::Ptr => "PTR",
        }
    }
}

impl fmt::Display for QueryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QueryType {
    type Err = InvalidArgument;

    /// Case-insensitive: `mx`, `MX` and `Mx` are all MX.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QueryType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                InvalidArgument::new(
                    "type",
                    format!("{s:?} is not one of A, AAAA, CNAME, MX, TXT, NS, SOA, PTR"),
                )
            })
    }
}

// Accept any case in JSON too (the CLI passes `--type mx` through unchanged).
impl<'de> Deserialize<'de> for QueryType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `nslookup`: one DNS lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NslookupRequest {
    /// A name to look up, or an IP address for a reverse (PTR) lookup.
    pub host: String,
    /// Record type; default A and AAAA for a name, PTR for an address.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub record_type: Option<QueryType>,
    /// Resolver to ask, `IP` or `IP:port` (`[v6]:port`); default the system's
    /// (`/etc/resolv.conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Overall time for the answer (default 5000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl NslookupRequest {
    pub const DEFAULT_TIMEOUT_MS: u64 = 5000;

    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            ..Self::default()
        }
    }
}

/// How `traceroute` probes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceMethod {
    /// UDP datagrams to high ports, errors read from the socket error queue: needs no
    /// privilege.
    #[default]
    Udp,
    /// ICMP echo requests (for paths that drop UDP): needs what `ping` needs.
    Icmp,
}

impl TraceMethod {
    pub fn name(self) -> &'static str {
        match self {
            TraceMethod::Udp => "udp",
            TraceMethod::Icmp => "icmp",
        }
    }
}

impl FromStr for TraceMethod {
    type Err = InvalidArgument;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "udp" => Ok(TraceMethod::Udp),
            "icmp" => Ok(TraceMethod::Icmp),
            _ => Err(InvalidArgument::new(
                "method",
                format!("{s:?} is not one of udp, icmp"),
            )),
        }
    }
}

/// `traceroute`: the path to `host`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracerouteRequest {
    pub host: String,
    /// Highest TTL / hop limit probed (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hops: Option<u32>,
    /// Probes per hop (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queries: Option<u32>,
    /// How long to wait for each probe's answer (default 3000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Probe method (default `udp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<TraceMethod>,
    /// Do not look up hop names (traceroute's `-n`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub numeric: bool,
    /// Resolver for hop names, `IP` or `IP:port`; default the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

impl TracerouteRequest {
    pub const DEFAULT_MAX_HOPS: u32 = 30;
    pub const DEFAULT_QUERIES: u32 = 3;
    pub const DEFAULT_TIMEOUT_MS: u64 = 3000;

    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            ..Self::default()
        }
    }
}

/// `nc`: can a TCP connection to `host:port` be made?
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NcRequest {
    pub host: String,
    /// TCP port, 1–65535 (a wider type so that a bad value gets a clear message).
    pub port: u32,
    /// Connect timeout (default 5000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// After connecting, read what the service sends first (at most
    /// [`Limits::max_banner_bytes`], for at most [`NcRequest::BANNER_WAIT_MS`] or the timeout
    /// if shorter).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub banner: bool,
}

impl NcRequest {
    pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
    pub const BANNER_WAIT_MS: u64 = 3000;

    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port: u32::from(port),
            ..Self::default()
        }
    }
}

/// `nmap`: TCP connect scan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NmapRequest {
    /// A hostname, an address, or a CIDR (`10.0.0.0/28`, `fd00::/120`).
    pub host: String,
    /// Port list such as `22,80,443,8000-8100`; default [`NmapRequest::DEFAULT_PORTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
    /// Per-probe connect timeout (default 1000 ms); no answer in time means `filtered`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Probes in flight at once (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

impl NmapRequest {
    /// Well-known service ports scanned when no list is given.
    pub const DEFAULT_PORTS: &'static str = "21,22,23,25,53,80,110,111,135,139,143,443,445,993,995,1723,3306,3389,5432,5900,6379,8080,8443";
    pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
    pub const DEFAULT_CONCURRENCY: u32 = 64;

    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            ..Self::default()
        }
    }
}

/// Caps every request is checked against before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// nmap: hosts × ports.
    pub max_scan_probes: u32,
    /// nmap: probes in flight.
    pub max_concurrency: u32,
    /// ping: echo requests per run.
    pub max_count: u32,
    /// ping: shortest interval between requests.
    pub min_interval_ms: u64,
    /// ping: payload bytes.
    pub max_size: u32,
    /// traceroute: highest hop.
    pub max_hops: u32,
    /// traceroute: probes per hop.
    pub max_queries: u32,
    /// Every timeout and interval.
    pub max_timeout_ms: u64,
    /// nc: banner bytes kept.
    pub max_banner_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_scan_probes: 1024,
            max_concurrency: 256,
            max_count: 100,
            min_interval_ms: 200,
            max_size: 65_000,
            max_hops: 64,
            max_queries: 10,
            max_timeout_ms: 60_000,
            max_banner_bytes: 1024,
        }
    }
}

/// The result of a run that took place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub tool: Tool,
    /// The target answered (see the crate docs for each tool's meaning).
    pub success: bool,
    /// One line, e.g. `4 packets transmitted, 4 received, 0% packet loss`.
    pub summary: String,
}

/// Why a run could not take place.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgument),
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
    /// A privilege is missing; the message says which to grant.
    #[error("{0}")]
    Permission(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled: the event receiver was dropped")]
    Cancelled,
}

impl DiagError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DiagError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Validates `request`, runs it and streams its events into `events`.
///
/// Events are sent as they happen; a full channel applies backpressure, a closed one ends the
/// run with [`DiagError::Cancelled`]. Dropping the returned future stops all probing and closes
/// every socket.
pub async fn run(
    request: &Request,
    limits: &Limits,
    events: mpsc::Sender<Event>,
) -> Result<Outcome, DiagError> {
    request.validate(limits)?;
    let sink = Sink(events);
    match request {
        Request::Ping(r) => ping::run(r, &sink).await,
        Request::Nslookup(r) => dns::run(r, &sink).await,
        Request::Traceroute(r) => trace::run(r, &sink).await,
        Request::Nc(r) => tcp::run_nc(r, limits, &sink).await,
        Request::Nmap(r) => tcp::run_nmap(r, limits, &sink).await,
    }
}

/// The event channel, with a closed receiver turned into [`DiagError::Cancelled`].
pub(crate) struct Sink(mpsc::Sender<Event>);

impl Sink {
    pub(crate) async fn send(&self, event: Event) -> Result<(), DiagError> {
        self.0.send(event).await.map_err(|_| DiagError::Cancelled)
    }
}

/// A run on a thread of its own, for callers that need a `Send` handle (the
/// compiler cannot prove [`run`]'s future `Send` for every lifetime), and so
/// that a long scan never competes with the caller's runtime.
pub struct Detached {
    result: tokio::sync::oneshot::Receiver<Result<Outcome, DiagError>>,
    _cancel: tokio::sync::oneshot::Sender<()>,
}

impl Detached {
    /// Starts `request` on its own thread; events arrive on `events`.
    /// Dropping the handle stops the run and closes its sockets.
    pub fn start(request: Request, limits: Limits, events: mpsc::Sender<Event>) -> Detached {
        let (result_tx, result) = tokio::sync::oneshot::channel();
        let (cancel_tx, mut cancel) = tokio::sync::oneshot::channel::<()>();
        // If no thread can be started the result sender is dropped with the
        // closure, and `finish` reports that.
        let _ = std::thread::Builder::new()
            .name("gatekey-diag".into())
            .spawn(move || {
                let outcome = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(async {
                        tokio::select! {
                            r = run(&request, &limits, events) => r,
                            _ = &mut cancel => Err(DiagError::Cancelled),
                        }
                    }),
                    Err(e) => Err(DiagError::io("cannot start a runtime", e)),
                };
                let _ = result_tx.send(outcome);
            });
        Detached {
            result,
            _cancel: cancel_tx,
        }
    }

    /// Waits for the run's result.
    pub async fn finish(self) -> Result<Outcome, DiagError> {
        let Detached { result, _cancel } = self;
        result.await.unwrap_or_else(|_| {
            Err(DiagError::io(
                "the diagnostic thread could not run",
                std::io::Error::other("thread ended without a result"),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools() {
        let listed: Vec<String> = Tool::ALL
            .iter()
            .map(|t| format!("{:<12} - {}", t.name(), t.description()))
            .collect();
        assert_eq!(
            listed,
            [
                "ping         - Test ICMP connectivity to a host",
                "nslookup     - Perform DNS lookup for a hostname",
                "traceroute   - Trace the route to a host",
                "nc           - Test TCP connectivity to a port",
                "nmap         - Scan ports on a host",
            ]
        );
        for t in Tool::ALL {
            assert_eq!(t.name().parse::<Tool>().unwrap(), t);
            assert_eq!(t.to_string(), t.name());
            assert_eq!(serde_json::to_value(t).unwrap(), t.name());
        }
        assert_eq!("NMAP".parse::<Tool>().unwrap(), Tool::Nmap);
        assert!("dig".parse::<Tool>().is_err());
    }

    /// The examples in the crate docs parse, and every request round-trips through JSON.
    #[test]
    fn request_json() {
        let docs = [
            r#"{"tool":"ping","host":"10.0.0.1","count":4,"interval_ms":1000,"timeout_ms":2000,"size":56}"#,
            r#"{"tool":"nslookup","host":"example.com","type":"MX","server":"10.0.0.53:53","timeout_ms":5000}"#,
            r#"{"tool":"traceroute","host":"10.0.0.1","max_hops":30,"queries":3,"timeout_ms":3000,"method":"udp","numeric":true}"#,
            r#"{"tool":"nc","host":"db.internal","port":5432,"timeout_ms":5000,"banner":true}"#,
            r#"{"tool":"nmap","host":"10.0.0.0/28","ports":"22,80,443,8000-8010","timeout_ms":1000,"concurrency":64}"#,
            r#"{"tool":"ping","host":"gw"}"#,
            r#"{"tool":"nc","host":"gw","port":22}"#,
        ];
        for json in docs {
            let req: Request = serde_json::from_str(json).unwrap();
            assert_eq!(serde_json::to_string(&req).unwrap(), json);
            req.validate(&Limits::default()).unwrap();
        }
        let r: Request =
            serde_json::from_str(r#"{"tool":"nslookup","host":"x.test","type":"aaaa"}"#).unwrap();
        assert_eq!(
            r,
            Request::Nslookup(NslookupRequest {
                record_type: Some(QueryType::Aaaa),
                ..NslookupRequest::new("x.test")
            })
        );
        assert_eq!(r.tool(), Tool::Nslookup);
        assert_eq!(r.host(), "x.test");
        for bad in [
            r#"{"tool":"ping","host":"gw","colour":"red"}"#,
            r#"{"tool":"nc","host":"gw"}"#,
            r#"{"tool":"nslookup","host":"x","type":"SRV"}"#,
            r#"{"tool":"traceroute","host":"x","method":"tcp"}"#,
            r#"{"host":"x"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        let outcome = Outcome {
            tool: Tool::Nc,
            success: true,
            summary: "open".into(),
        };
        let json = serde_json::to_string(&outcome).unwrap();
        assert_eq!(json, r#"{"tool":"nc","success":true,"summary":"open"}"#);
        assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), outcome);
    }

    #[test]
    fn errors_read_as_one_line() {
        let e = DiagError::from(InvalidArgument::new("port", "0 is not in 1-65535"));
        assert_eq!(e.to_string(), "invalid --port: 0 is not in 1-65535");
        let e = DiagError::Resolve {
            host: "db".into(),
            message: "Name or service not known".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot resolve db: Name or service not known"
        );
        let e = DiagError::io(
            "ping: socket",
            std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
        );
        assert!(
            e.to_string()
                .starts_with("ping: socket: Address family not supported")
        );
        let l: Limits = serde_json::from_str(r#"{"max_scan_probes":10}"#).unwrap();
        assert_eq!(l.max_scan_probes, 10);
        assert_eq!(l.max_hops, Limits::default().max_hops);
    }
}

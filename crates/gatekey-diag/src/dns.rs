//! `nslookup` through hickory-resolver, and reverse names for traceroute hops. A fresh
//! resolver per run: a diagnostic must ask the network, not a cache.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::system_conf::read_system_conf;

use crate::event::{DnsRecord, DnsStatus, Event, escape_bytes, sanitize};
use crate::validate::{Host, parse_server};
use crate::{DiagError, NslookupRequest, Outcome, QueryType, Sink, Tool};

pub(crate) type Resolver = hickory_resolver::TokioResolver;

/// A resolver asking `server`, or the system's (`/etc/resolv.conf`) servers. `timeout` bounds
/// each of two attempts. `hosts_file`: consult `/etc/hosts` (as getnameinfo would) —
/// nslookup does not.
pub(crate) fn resolver(
    server: Option<SocketAddr>,
    timeout: Duration,
    hosts_file: bool,
) -> Result<Resolver, NetError> {
    let (config, mut opts) = match server {
        Some(sa) => (server_config(sa), ResolverOpts::default()),
        None => read_system_conf()?,
    };
    tune(&mut opts, timeout, hosts_file);
    let mut builder =
        hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default());
    *builder.options_mut() = opts;
    builder.build()
}

fn server_config(sa: SocketAddr) -> ResolverConfig {
    let mut ns = NameServerConfig::udp_and_tcp(sa.ip());
    for c in &mut ns.connections {
        c.port = sa.port();
    }
    ResolverConfig::from_name_servers(vec![ns])
}

fn tune(opts: &mut ResolverOpts, timeout: Duration, hosts_file: bool) {
    opts.attempts = 2;
    opts.timeout = (timeout / 2).max(Duration::from_millis(50));
    opts.cache_size = 64;
    opts.preserve_intermediates = true;
    opts.use_hosts_file = if hosts_file {
        ResolveHosts::Auto
    } else {
        ResolveHosts::Never
    };
}

/// The PTR name of `ip` without the final dot, if there is one within `limit`.
pub(crate) async fn reverse_name(r: &Resolver, ip: IpAddr, limit: Duration) -> Option<String> {
    let lookup = tokio::time::timeout(limit, r.lookup(Name::from(ip), RecordType::PTR))
        .await
        .ok()?
        .ok()?;
    lookup.answers().iter().find_map(|rec| match &rec.data {
        RData::PTR(p) => Some(display_name(&p.0)),
        _ => None,
    })
}

fn display_name(name: &Name) -> String {
    let s = name.to_string();
    sanitize(s.strip_suffix('.').unwrap_or(&s))
}

fn record_type(t: QueryType) -> RecordType {
    match t {
        QueryType::A => RecordType::A,
        QueryType::Aaaa => RecordType::AAAA,
        QueryType::Cname => RecordType::CNAME,
        QueryType::Mx => RecordType::MX,
        QueryType::Txt => RecordType::TXT,
        QueryType::Ns => RecordType::NS,
        QueryType::Soa => RecordType::SOA,
        QueryType::Ptr => RecordType::PTR,
    }
}

fn to_record(r: &Record) -> DnsRecord {
    let name = |n: &Name| sanitize(&n.to_string());
    match &r.data {
        RData::A(a) => DnsRecord::A { address: a.0 },
        RData::AAAA(a) => DnsRecord::Aaaa { address: a.0 },
        RData::CNAME(c) => DnsRecord::Cname { target: name(&c.0) },
        RData::MX(mx) => DnsRecord::Mx {
            preference: mx.preference,
            exchange: name(&mx.exchange),
        },
        RData::TXT(txt) => DnsRecord::Txt {
            strings: txt.txt_data.iter().map(|s| escape_bytes(s, true)).collect(),
        },
        RData::NS(ns) => DnsRecord::Ns {
            nameserver: name(&ns.0),
        },
        RData::SOA(soa) => DnsRecord::Soa {
            mname: name(&soa.mname),
            rname: name(&soa.rname),
            serial: soa.serial,
            refresh: soa.refresh,
            retry: soa.retry,
            expire: soa.expire,
            minimum: soa.minimum,
        },
        RData::PTR(p) => DnsRecord::Ptr { name: name(&p.0) },
        other => DnsRecord::Other {
            rtype: r.record_type().to_string(),
            data: sanitize(&other.to_string()),
        },
    }
}

/// How a failed lookup is reported.
fn classify(e: &NetError) -> (DnsStatus, String) {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NXDomain =>
        {
            (DnsStatus::NxDomain, String::new())
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => (DnsStatus::NoAnswer, String::new()),
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => {
            (DnsStatus::ServFail, String::new())
        }
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => {
            (DnsStatus::Refused, String::new())
        }
        NetError::Dns(DnsError::ResponseCode(code)) => {
            (DnsStatus::Error, code.to_str().to_string())
        }
        NetError::Timeout => (DnsStatus::Timeout, String::new()),
        NetError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            (DnsStatus::Timeout, String::new())
        }
        other => (DnsStatus::Error, sanitize(&other.to_string())),
    }
}

pub(crate) async fn run(req: &NslookupRequest, sink: &Sink) -> Result<Outcome, DiagError> {
    let host = Host::parse(&req.host)?;
    let timeout = Duration::from_millis(
        req.timeout_ms
            .unwrap_or(NslookupRequest::DEFAULT_TIMEOUT_MS),
    );
    let server = req
        .server
        .as_deref()
        .map(|s| parse_server(s, "server"))
        .transpose()?;
    let shown = match server {
        Some(sa) => Some(sa),
        None => {
            let (config, _) = read_system_conf().map_err(|e| {
                DiagError::io(
                    "nslookup: reading the system resolver configuration",
                    std::io::Error::other(e.to_string()),
                )
            })?;
            config
                .name_servers()
                .first()
                .map(|ns| SocketAddr::new(ns.ip, ns.connections.first().map_or(53, |c| c.port)))
        }
    };
    let resolver = resolver(server, timeout, false)
        .map_err(|e| DiagError::io("nslookup: resolver", std::io::Error::other(e.to_string())))?;
    sink.send(match shown {
        Some(sa) => Event::DnsServer {
            server: sa.ip().to_string(),
            port: sa.port(),
        },
        None => Event::DnsServer {
            server: "(none configured)".into(),
            port: 53,
        },
    })
    .await?;

    let (name, types): (Name, Vec<QueryType>) = match &host {
        Host::Ip(ip) => (Name::from(*ip), vec![QueryType::Ptr]),
        Host::Name(n) => {
            let name = Name::from_ascii(n)
                .map_err(|e| crate::InvalidArgument::new("host", format!("{n:?}: {e}")))?;
            let types = match req.record_type {
                Some(t) => vec![t],
                None => vec![QueryType::A, QueryType::Aaaa],
            };
            (name, types)
        }
    };
    let shown_name = match &host {
        Host::Ip(_) => display_name(&name),
        Host::Name(n) => n.clone(),
    };

    let mut answers = 0u32;
    let mut failures: Vec<(QueryType, DnsStatus, String)> = Vec::new();
    for t in &types {
        // The resolver bounds each attempt; this bounds the whole query.
        let lookup = tokio::time::timeout(
            timeout + Duration::from_millis(500),
            resolver.lookup(name.clone(), record_type(*t)),
        )
        .await;
        let result = match lookup {
            Err(_) => Err((DnsStatus::Timeout, String::new())),
            Ok(Err(e)) => Err(classify(&e)),
            Ok(Ok(l)) if l.answers().is_empty() => Err((DnsStatus::NoAnswer, String::new())),
            Ok(Ok(l)) => Ok(l),
        };
        match result {
            Ok(lookup) => {
                for r in lookup.answers() {
                    answers += 1;
                    sink.send(Event::DnsAnswer {
                        name: display_name(&r.name),
                        ttl: r.ttl,
                        record: to_record(r),
                    })
                    .await?;
                }
            }
            Err((status, message)) => {
                let fatal = matches!(status, DnsStatus::NxDomain | DnsStatus::Timeout);
                failures.push((*t, status, message));
                // A missing name or a dead server is the same for every type: say it once.
                if fatal {
                    break;
                }
            }
        }
    }
    // Like nslookup, "no answer" for one type is not worth a line when another type answered.
    for (t, status, message) in &failures {
        if answers > 0 && *status == DnsStatus::NoAnswer {
            continue;
        }
        sink.send(Event::DnsError {
            name: shown_name.clone(),
            record_type: *t,
            status: *status,
            message: message.clone(),
        })
        .await?;
    }

    let summary = if answers > 0 {
        format!(
            "{answers} {} for {shown_name}",
            if answers == 1 { "answer" } else { "answers" }
        )
    } else {
        match failures.first() {
            Some((_, status, message)) => match status {
                DnsStatus::NxDomain => format!("{shown_name}: NXDOMAIN"),
                DnsStatus::ServFail => format!("{shown_name}: SERVFAIL"),
                DnsStatus::Refused => format!("{shown_name}: REFUSED"),
                DnsStatus::NoAnswer => format!("{shown_name}: no answer"),
                DnsStatus::Timeout => "connection timed out; no servers could be reached".into(),
                DnsStatus::Error => format!("{shown_name}: {message}"),
            },
            None => format!("{shown_name}: no answer"),
        }
    };
    Ok(Outcome {
        tool: Tool::Nslookup,
        success: answers > 0,
        summary,
    })
}

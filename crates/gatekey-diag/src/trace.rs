//! `traceroute`: probes with rising TTL / hop limit. The default `udp` method needs no
//! privilege: each probe is a connected UDP socket with `IP_RECVERR` / `IPV6_RECVERR`, and the
//! routers' ICMP answers are read from its error queue (tracepath's approach). The `icmp`
//! method sends echo requests through the ICMP sockets `ping` uses.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesOrdered;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::dns;
use crate::event::{Event, HopProbe};
use crate::icmp::Meaning;
use crate::ping::{IcmpSocket, Incoming};
use crate::sys::{self, AsyncSocket, SentAt};
use crate::validate::{Host, parse_server};
use crate::{DiagError, Outcome, Sink, Tool, TraceMethod, TracerouteRequest};

/// First UDP destination port, as in traceroute.
const BASE_PORT: u16 = 33434;
/// Probe payload: with the headers, 60-byte IPv4 / 80-byte IPv6 packets like traceroute's.
const PAYLOAD: usize = 32;
/// Hops probed at once: silent hops cost one timeout per window rather than one each.
const WINDOW: usize = 5;
/// Longest wait for a hop's reverse name.
const NAME_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq)]
enum Answer {
    None,
    TimeExceeded,
    /// The destination answered.
    Reached,
    /// ICMP unreachable (or another error) with traceroute's mark.
    Unreachable(String),
    /// The probe could not be sent.
    Local(String),
}

#[derive(Debug, Clone)]
struct Probe {
    addr: Option<IpAddr>,
    rtt: Option<Duration>,
    answer: Answer,
}

impl Probe {
    fn none() -> Self {
        Probe {
            addr: None,
            rtt: None,
            answer: Answer::None,
        }
    }

    fn local(e: &io::Error) -> Self {
        Probe {
            addr: None,
            rtt: None,
            answer: Answer::Local(format!("send failed: {e}")),
        }
    }
}

struct Ctx {
    dst: IpAddr,
    queries: u32,
    timeout: Duration,
    method: TraceMethod,
    resolver: Option<dns::Resolver>,
}

pub(crate) async fn run(req: &TracerouteRequest, sink: &Sink) -> Result<Outcome, DiagError> {
    let host = Host::parse(&req.host)?;
    let dst = sys::resolve(&host, &req.host).await?[0];
    let v6 = dst.is_ipv6();
    let max_hops = req.max_hops.unwrap_or(TracerouteRequest::DEFAULT_MAX_HOPS);
    let queries = req.queries.unwrap_or(TracerouteRequest::DEFAULT_QUERIES);
    let timeout = Duration::from_millis(
        req.timeout_ms
            .unwrap_or(TracerouteRequest::DEFAULT_TIMEOUT_MS),
    );
    let method = match req.method.unwrap_or_default() {
        TraceMethod::Udp if !udp_usable(dst)? => TraceMethod::Icmp,
        m => m,
    };
    if method == TraceMethod::Icmp {
        // Fail with the privilege hint before printing anything.
        IcmpSocket::open(v6, "traceroute")?;
    }
    let resolver = if req.numeric {
        None
    } else {
        let server = req
            .server
            .as_deref()
            .map(|s| parse_server(s, "server"))
            .transpose()?;
        // No resolver (e.g. no resolv.conf) just means no names.
        dns::resolver(server, NAME_TIMEOUT, true).ok()
    };
    let ctx = Ctx {
        dst,
        queries,
        timeout,
        method,
        resolver,
    };
    sink.send(Event::TraceStart {
        host: req.host.clone(),
        addr: dst,
        max_hops,
        packet_bytes: (if v6 { 40 } else { 20 }) + 8 + PAYLOAD as u32,
        method,
    })
    .await?;

    let mut window = FuturesOrdered::new();
    let mut next_ttl = 1;
    let mut last = 0;
    let mut reached = false;
    let mut stopped: Option<String> = None;
    loop {
        while window.len() < WINDOW && next_ttl <= max_hops {
            window.push_back(hop(&ctx, next_ttl));
            next_ttl += 1;
        }
        let Some(result) = window.next().await else {
            break;
        };
        let (ttl, probes) = result?;
        last = ttl;
        sink.send(Event::Hop {
            ttl,
            probes: probes.iter().map(|(p, name)| hop_probe(p, name)).collect(),
        })
        .await?;
        if probes.iter().any(|(p, _)| p.answer == Answer::Reached) {
            reached = true;
            break;
        }
        // Like traceroute: stop when a hop only says "unreachable" (or nothing can be sent).
        let routed = probes
            .iter()
            .any(|(p, _)| matches!(p.answer, Answer::TimeExceeded));
        if let Some(mark) = probes.iter().find_map(|(p, _)| match &p.answer {
            Answer::Unreachable(m) => Some(m.clone()),
            _ => None,
        }) && !routed
        {
            stopped = Some(mark);
            break;
        }
        if probes
            .iter()
            .all(|(p, _)| matches!(p.answer, Answer::Local(_)))
        {
            stopped = probes.first().and_then(|(p, _)| match &p.answer {
                Answer::Local(m) => Some(m.clone()),
                _ => None,
            });
            break;
        }
    }
    // Remaining probes are dropped here, closing their sockets.
    drop(window);
    let summary = if reached {
        format!(
            "reached {dst} in {last} {}",
            if last == 1 { "hop" } else { "hops" }
        )
    } else if let Some(why) = stopped {
        format!("{dst} not reached: stopped at hop {last} ({why})")
    } else {
        format!("{dst} not reached within {max_hops} hops")
    };
    Ok(Outcome {
        tool: Tool::Traceroute,
        success: reached,
        summary,
    })
}

fn hop_probe(p: &Probe, name: &Option<String>) -> HopProbe {
    HopProbe {
        addr: p.addr,
        name: name.clone(),
        rtt_ms: p.rtt.map(sys::ms),
        annotation: match &p.answer {
            Answer::Unreachable(m) | Answer::Local(m) => Some(m.clone()),
            _ => None,
        },
    }
}

/// Whether unprivileged UDP probing works here (it may be blocked by policy).
fn udp_usable(dst: IpAddr) -> Result<bool, DiagError> {
    let socket = match udp_socket(dst, 64, BASE_PORT) {
        Ok(s) => s,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
            return Ok(false);
        }
        Err(e) => return Err(DiagError::io("traceroute: udp socket", e)),
    };
    drop(socket);
    Ok(true)
}

fn udp_socket(dst: IpAddr, ttl: u32, port: u16) -> io::Result<Socket> {
    let v6 = dst.is_ipv6();
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    sys::set_recv_err(&socket, v6)?;
    sys::set_ttl(&socket, v6, ttl)?;
    sys::set_timestamps(&socket)?;
    socket.connect(&SockAddr::from(SocketAddr::new(dst, port)))?;
    Ok(socket)
}

/// One hop: all its probes at once, then the names of whoever answered.
async fn hop(ctx: &Ctx, ttl: u32) -> Result<(u32, Vec<(Probe, Option<String>)>), DiagError> {
    let probes = join_all((0..ctx.queries).map(|i| {
        let n = (ttl - 1) * ctx.queries + i;
        probe(ctx, ttl, n)
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<Probe>, DiagError>>()?;
    let mut addrs: Vec<IpAddr> = Vec::new();
    for a in probes.iter().filter_map(|p| p.addr) {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    let names: Vec<Option<String>> = match &ctx.resolver {
        Some(r) => join_all(addrs.iter().map(|a| dns::reverse_name(r, *a, NAME_TIMEOUT))).await,
        None => vec![None; addrs.len()],
    };
    let named = probes
        .into_iter()
        .map(|p| {
            let name = p
                .addr
                .and_then(|a| addrs.iter().position(|x| *x == a))
                .and_then(|i| names[i].clone());
            (p, name)
        })
        .collect();
    Ok((ttl, named))
}

async fn probe(ctx: &Ctx, ttl: u32, n: u32) -> Result<Probe, DiagError> {
    match ctx.method {
        TraceMethod::Udp => Ok(udp_probe(ctx, ttl, n).await),
        TraceMethod::Icmp => icmp_probe(ctx, ttl, n).await,
    }
}

async fn udp_probe(ctx: &Ctx, ttl: u32, n: u32) -> Probe {
    let v6 = ctx.dst.is_ipv6();
    let port = BASE_PORT.wrapping_add(n as u16);
    let sock = match udp_socket(ctx.dst, ttl, port).and_then(AsyncSocket::new) {
        Ok(s) => s,
        Err(e) => return Probe::local(&e),
    };
    let at = SentAt::now();
    if let Err(e) = sock.send(&[0u8; PAYLOAD]).await {
        return Probe::local(&e);
    }
    let deadline = tokio::time::Instant::from_std(at.mono + ctx.timeout);
    let mut buf = [0u8; 512];
    loop {
        let r = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return Probe::none(),
            Ok(Err(e)) => return Probe::local(&e),
            Ok(Ok(r)) => r,
        };
        let rtt = Some(at.rtt(r.stamp, Instant::now()));
        let Some(ee) = r.error else {
            // A UDP answer: something listens on the port, so this is the destination.
            return Probe {
                addr: r.from.map(|a| a.ip()).or(Some(ctx.dst)),
                rtt,
                answer: Answer::Reached,
            };
        };
        let answer = match ee.origin {
            sys::SO_EE_ORIGIN_ICMP | sys::SO_EE_ORIGIN_ICMP6 => {
                meaning_to_answer(crate::icmp::describe(v6, ee.icmp_type, ee.icmp_code, ee.info).1)
            }
            sys::SO_EE_ORIGIN_LOCAL => {
                Answer::Local(io::Error::from_raw_os_error(ee.errno as i32).to_string())
            }
            _ => continue,
        };
        return Probe {
            addr: ee.offender,
            rtt: ee.offender.and(rtt),
            answer: reached_if_destination(answer, ee.offender, ctx.dst),
        };
    }
}

async fn icmp_probe(ctx: &Ctx, ttl: u32, n: u32) -> Result<Probe, DiagError> {
    let sock = IcmpSocket::open(ctx.dst.is_ipv6(), "traceroute")?;
    if let Err(e) = sock.set_ttl(ttl) {
        return Ok(Probe::local(&e));
    }
    let seq = (n + 1) as u16;
    let at = SentAt::now();
    if let Err(e) = sock.send_echo(ctx.dst, seq, &[0u8; PAYLOAD]).await {
        return Ok(Probe::local(&e));
    }
    let deadline = tokio::time::Instant::from_std(at.mono + ctx.timeout);
    let mut buf = [0u8; 1024];
    loop {
        let incoming = match tokio::time::timeout_at(deadline, sock.recv(&mut buf, ctx.dst)).await {
            Err(_) => return Ok(Probe::none()),
            Ok(Err(e)) => return Ok(Probe::local(&e)),
            Ok(Ok(i)) => i,
        };
        let now = Instant::now();
        return Ok(match incoming {
            Incoming::Reply {
                from,
                seq: s,
                stamp,
                ..
            } if s == seq => Probe {
                addr: Some(from),
                rtt: Some(at.rtt(stamp, now)),
                answer: Answer::Reached,
            },
            Incoming::Error {
                from,
                seq: s,
                meaning,
                stamp,
                ..
            } if s == seq => Probe {
                addr: from,
                rtt: from.map(|_| at.rtt(stamp, now)),
                answer: reached_if_destination(meaning_to_answer(meaning), from, ctx.dst),
            },
            _ => continue,
        });
    }
}

fn meaning_to_answer(m: Meaning) -> Answer {
    match m {
        Meaning::TimeExceeded => Answer::TimeExceeded,
        Meaning::PortUnreachable => Answer::Reached,
        Meaning::Unreachable(mark) => Answer::Unreachable(mark),
        Meaning::Other => Answer::Unreachable("!?".into()),
    }
}

/// An unreachable from the destination itself (e.g. a firewall rejecting with
/// admin-prohibited) still means the path reached it.
fn reached_if_destination(answer: Answer, from: Option<IpAddr>, dst: IpAddr) -> Answer {
    match answer {
        Answer::Unreachable(_) if from == Some(dst) => Answer::Reached,
        a => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let dst: IpAddr = "10.0.0.9".parse().unwrap();
        let r1: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(meaning_to_answer(Meaning::PortUnreachable), Answer::Reached);
        assert_eq!(
            reached_if_destination(Answer::Unreachable("!X".into()), Some(dst), dst),
            Answer::Reached
        );
        assert_eq!(
            reached_if_destination(Answer::Unreachable("!H".into()), Some(r1), dst),
            Answer::Unreachable("!H".into())
        );
        let p = hop_probe(
            &Probe {
                addr: Some(r1),
                rtt: Some(Duration::from_micros(1500)),
                answer: Answer::Unreachable("!H".into()),
            },
            &Some("r1".into()),
        );
        assert_eq!(p.rtt_ms, Some(1.5));
        assert_eq!(p.annotation.as_deref(), Some("!H"));
    }
}

//! `ping`: ICMP echo over an unprivileged datagram socket when `ping_group_range` allows it,
//! a raw socket otherwise; also the ICMP socket the `icmp` traceroute method uses.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::time::{Instant, sleep_until};

use crate::event::{Event, IcmpSocketKind, RttStats, significant};
use crate::icmp::{self, Icmp, Meaning};
use crate::sys::{self, AsyncSocket, SentAt};
use crate::validate::Host;
use crate::{DiagError, Outcome, PingRequest, Sink, Tool};

/// Duplicate replies beyond this many are counted but not reported one by one.
const MAX_DUP_EVENTS: u32 = 100;

/// Something an ICMP socket received that concerns our echo requests.
#[derive(Debug)]
pub(crate) enum Incoming {
    Reply {
        from: IpAddr,
        seq: u16,
        /// ICMP header and payload.
        bytes: usize,
        ttl: Option<u8>,
        stamp: Option<std::time::SystemTime>,
    },
    Error {
        from: Option<IpAddr>,
        seq: u16,
        message: String,
        meaning: Meaning,
        stamp: Option<std::time::SystemTime>,
    },
}

/// An ICMP echo socket: datagram if allowed, raw if privileged.
pub(crate) struct IcmpSocket {
    sock: AsyncSocket,
    pub(crate) kind: IcmpSocketKind,
    v6: bool,
    /// Our echo identifier (raw sockets; the kernel picks and filters it for datagram ones).
    ident: u16,
}

impl IcmpSocket {
    /// Opens an ICMP socket; `who` names the tool in the permission error.
    pub(crate) fn open(v6: bool, who: &str) -> Result<Self, DiagError> {
        let (domain, proto) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6)
        } else {
            (Domain::IPV4, Protocol::ICMPV4)
        };
        let (socket, kind) = match Socket::new(domain, Type::DGRAM, Some(proto)) {
            Ok(s) => (s, IcmpSocketKind::Datagram),
            // EACCES when our group is outside ping_group_range (EPROTONOSUPPORT on kernels
            // without ping sockets): fall back to raw. Anything else (say IPv6 disabled) is
            // not about privileges.
            Err(e)
                if !matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EACCES | libc::EPERM | libc::EPROTONOSUPPORT | libc::ESOCKTNOSUPPORT
                    )
                ) =>
            {
                return Err(DiagError::io(format!("{who}: socket"), e));
            }
            Err(_) => match Socket::new(domain, Type::RAW, Some(proto)) {
                Ok(s) => (s, IcmpSocketKind::Raw),
                Err(e) if is_permission(&e) => return Err(permission_error(who)),
                Err(e) => return Err(DiagError::io(format!("{who}: socket"), e)),
            },
        };
        let setup = |s: &Socket| -> io::Result<()> {
            sys::set_timestamps(s)?;
            if v6 {
                s.set_recv_hoplimit_v6(true)?;
            } else if kind == IcmpSocketKind::Datagram {
                // Raw IPv4 sockets see the IP header (and its TTL); datagram ones need this.
                sys::set_int_opt(s, libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
            }
            if kind == IcmpSocketKind::Datagram {
                // ICMP errors about our requests arrive on the error queue.
                sys::set_recv_err(s, v6)?;
            } else if !v6 {
                // Raw sockets see all ICMP: let only replies and errors through.
                let pass: u32 = (1 << icmp::V4_ECHO_REPLY)
                    | (1 << icmp::V4_UNREACH)
                    | (1 << icmp::V4_TIME_EXCEEDED)
                    | (1 << icmp::V4_PARAM_PROBLEM);
                sys::set_int_opt(s, libc::SOL_RAW, 1 /* ICMP_FILTER */, !pass as i32)?;
            }
            Ok(())
        };
        setup(&socket).map_err(|e| DiagError::io(format!("{who}: setsockopt"), e))?;
        let sock =
            AsyncSocket::new(socket).map_err(|e| DiagError::io(format!("{who}: socket"), e))?;
        Ok(Self {
            sock,
            kind,
            v6,
            ident: sys::random_u64() as u16,
        })
    }

    pub(crate) fn set_ttl(&self, ttl: u32) -> io::Result<()> {
        sys::set_ttl(self.sock.socket(), self.v6, ttl)
    }

    pub(crate) async fn send_echo(&self, dst: IpAddr, seq: u16, payload: &[u8]) -> io::Result<()> {
        let packet = icmp::echo_request(self.v6, self.ident, seq, payload);
        let to = SockAddr::from(SocketAddr::new(dst, 0));
        self.sock.send_to(&packet, &to).await.map(drop)
    }

    /// Waits for the next reply to, or error about, one of our requests to `dst`.
    pub(crate) async fn recv(&self, buf: &mut [u8], dst: IpAddr) -> io::Result<Incoming> {
        loop {
            let r = self.sock.recv(buf).await?;
            let data = &buf[..r.len];
            if let Some(incoming) = self.interpret(&r, data, dst) {
                return Ok(incoming);
            }
        }
    }

    fn interpret(&self, r: &sys::Received, data: &[u8], dst: IpAddr) -> Option<Incoming> {
        if let Some(ee) = r.error {
            // Error queue of a datagram socket: the data is our original request.
            let seq = icmp::quoted_echo_seq(data)?;
            let (message, meaning) = match ee.origin {
                sys::SO_EE_ORIGIN_ICMP | sys::SO_EE_ORIGIN_ICMP6 => {
                    icmp::describe(self.v6, ee.icmp_type, ee.icmp_code, ee.info)
                }
                _ => (
                    io::Error::from_raw_os_error(ee.errno as i32).to_string(),
                    Meaning::Unreachable(format!("!<{}>", ee.errno)),
                ),
            };
            return Some(Incoming::Error {
                from: ee.offender,
                seq,
                message,
                meaning,
                stamp: r.stamp,
            });
        }
        let (from, ttl, msg) = if self.v6 {
            (r.from?.ip(), r.ttl, data)
        } else if self.kind == IcmpSocketKind::Raw {
            let (src, ttl, msg) = icmp::strip_ipv4(data)?;
            (IpAddr::V4(src), Some(ttl), msg)
        } else {
            (r.from?.ip(), r.ttl, data)
        };
        let parsed = if self.v6 {
            icmp::parse_v6(msg)?
        } else {
            icmp::parse_v4(msg)?
        };
        let raw = self.kind == IcmpSocketKind::Raw;
        match parsed {
            Icmp::EchoReply { ident, seq, .. } => {
                if raw && ident != self.ident {
                    return None;
                }
                Some(Incoming::Reply {
                    from,
                    seq,
                    bytes: msg.len(),
                    ttl,
                    stamp: r.stamp,
                })
            }
            // Datagram sockets get errors on the error queue only; on raw ones, keep those
            // quoting our own request.
            Icmp::Error {
                icmp_type,
                code,
                info,
                quoted: Some(q),
            } if raw && q.first == self.ident && q.dst == dst => {
                let (message, meaning) = icmp::describe(self.v6, icmp_type, code, info);
                Some(Incoming::Error {
                    from: Some(from),
                    seq: q.second,
                    message,
                    meaning,
                    stamp: r.stamp,
                })
            }
            _ => None,
        }
    }
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

fn permission_error(who: &str) -> DiagError {
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    DiagError::Permission(format!(
        "{who} needs ICMP sockets: set net.ipv4.ping_group_range to include gid {gid} \
         (e.g. sysctl -w net.ipv4.ping_group_range=\"0 2147483647\"), or grant CAP_NET_RAW"
    ))
}

/// Running RTT statistics (no per-reply storage).
#[derive(Default)]
struct Stats {
    n: u32,
    sum: f64,
    sum2: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn add(&mut self, ms: f64) {
        if self.n == 0 || ms < self.min {
            self.min = ms;
        }
        if ms > self.max {
            self.max = ms;
        }
        self.n += 1;
        self.sum += ms;
        self.sum2 += ms * ms;
    }

    fn result(&self) -> Option<RttStats> {
        if self.n == 0 {
            return None;
        }
        let n = f64::from(self.n);
        let avg = self.sum / n;
        let mdev = (self.sum2 / n - avg * avg).max(0.0).sqrt();
        Some(RttStats {
            min_ms: self.min,
            avg_ms: sys::round(avg, 3),
            max_ms: self.max,
            mdev_ms: sys::round(mdev, 3),
        })
    }
}

pub(crate) async fn run(req: &PingRequest, sink: &Sink) -> Result<Outcome, DiagError> {
    let host = Host::parse(&req.host)?;
    let addr = sys::resolve(&host, &req.host).await?[0];
    let count = req.count.unwrap_or(PingRequest::DEFAULT_COUNT).min(65535) as u16;
    let interval =
        Duration::from_millis(req.interval_ms.unwrap_or(PingRequest::DEFAULT_INTERVAL_MS));
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(PingRequest::DEFAULT_TIMEOUT_MS));
    let size = req.size.unwrap_or(PingRequest::DEFAULT_SIZE);

    let sock = IcmpSocket::open(addr.is_ipv6(), "ping")?;
    sink.send(Event::PingStart {
        host: req.host.clone(),
        addr,
        size,
        socket: sock.kind,
    })
    .await?;

    let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
    // Room for an IP header, the ICMP message, and error messages quoting small requests.
    let mut buf = vec![0u8; (size as usize + 8 + 60).max(2048)];
    let n = usize::from(count);
    let mut sent: Vec<Option<SentAt>> = vec![None; n + 1];
    let mut replies = vec![0u32; n + 1];
    let mut settled = vec![false; n + 1];
    let (mut transmitted, mut received, mut duplicates, mut errors) = (0u16, 0u32, 0u32, 0u32);
    let mut stats = Stats::default();
    let start = Instant::now();
    let mut next_send = start;
    // Lowest sequence number that is neither answered nor timed out.
    let mut oldest: u16 = 1;

    loop {
        while oldest <= transmitted && settled[usize::from(oldest)] {
            oldest += 1;
        }
        if transmitted == count && oldest > count {
            break;
        }
        let deadline = (oldest <= transmitted)
            .then(|| sent[usize::from(oldest)].map(|s| Instant::from_std(s.mono) + timeout))
            .flatten();
        tokio::select! {
            r = sock.recv(&mut buf, addr) => {
                let incoming = r.map_err(|e| DiagError::io("ping: recvmsg", e))?;
                let now = std::time::Instant::now();
                match incoming {
                    Incoming::Reply { from, seq, bytes, ttl, stamp } => {
                        let i = usize::from(seq);
                        let Some(at) = sent.get(i).copied().flatten() else { continue };
                        let rtt = sys::ms(at.rtt(stamp, now));
                        replies[i] += 1;
                        let duplicate = replies[i] > 1;
                        if duplicate {
                            duplicates += 1;
                            if duplicates > MAX_DUP_EVENTS {
                                continue;
                            }
                        } else {
                            received += 1;
                            settled[i] = true;
                            stats.add(rtt);
                        }
                        sink.send(Event::PingReply {
                            from,
                            seq,
                            bytes: bytes as u32,
                            ttl,
                            rtt_ms: rtt,
                            duplicate,
                        })
                        .await?;
                    }
                    Incoming::Error { from, seq, message, .. } => {
                        let i = usize::from(seq);
                        if sent.get(i).copied().flatten().is_none() || settled[i] {
                            continue;
                        }
                        settled[i] = true;
                        errors += 1;
                        sink.send(Event::PingError { from, seq, message }).await?;
                    }
                }
            }
            _ = sleep_until(next_send), if transmitted < count => {
                transmitted += 1;
                let seq = transmitted;
                sent[usize::from(seq)] = Some(SentAt::now());
                next_send += interval;
                if let Err(e) = sock.send_echo(addr, seq, &payload).await {
                    settled[usize::from(seq)] = true;
                    errors += 1;
                    sink.send(Event::PingError {
                        from: None,
                        seq,
                        message: format!("sendmsg: {e}"),
                    })
                    .await?;
                }
            }
            _ = sleep_until(deadline.unwrap_or(start)), if deadline.is_some() => {
                settled[usize::from(oldest)] = true;
                sink.send(Event::PingTimeout { seq: oldest }).await?;
            }
        }
    }

    let transmitted = u32::from(transmitted);
    let loss = if transmitted == 0 {
        0.0
    } else {
        sys::round(
            f64::from(transmitted - received.min(transmitted)) * 100.0 / f64::from(transmitted),
            4,
        )
    };
    let time_ms = start.elapsed().as_millis() as u64;
    sink.send(Event::PingSummary {
        host: req.host.clone(),
        transmitted,
        received,
        duplicates,
        errors,
        loss_percent: loss,
        time_ms,
        rtt: stats.result(),
    })
    .await?;
    Ok(Outcome {
        tool: Tool::Ping,
        success: received > 0,
        summary: format!(
            "{transmitted} packets transmitted, {received} received, {}% packet loss",
            significant(loss, 6)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let mut s = Stats::default();
        assert!(s.result().is_none());
        for v in [1.0, 2.0, 3.0] {
            s.add(v);
        }
        let r = s.result().unwrap();
        assert_eq!((r.min_ms, r.avg_ms, r.max_ms), (1.0, 2.0, 3.0));
        assert_eq!(r.mdev_ms, 0.816);
    }
}

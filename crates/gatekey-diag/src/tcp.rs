//! `nc` (one TCP connect, optionally reading the banner) and `nmap` (TCP connect scan with
//! bounded concurrency). Both only need ordinary sockets.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::event::{ConnectState, Event, PortResult, PortState, StateCount, escape_bytes, ping_ms};
use crate::sys;
use crate::validate::{Host, ScanTarget, check_port};
use crate::{DiagError, Limits, NcRequest, NmapRequest, Outcome, Sink, Tool};

/// Addresses of a name nc tries, in resolver order.
const MAX_NC_ADDRS: usize = 4;
/// Once the banner started, how long to wait for more of it.
const BANNER_LINGER: Duration = Duration::from_millis(200);
/// A state with more ports than this is counted ("Not shown") instead of listed, as nmap does.
const MAX_LISTED_PER_STATE: usize = 25;

/// How a failed connect reads, for nc and for nmap.
fn connect_error(e: &io::Error) -> (ConnectState, PortState, String) {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => (
            ConnectState::Refused,
            PortState::Closed,
            "conn-refused".into(),
        ),
        Some(libc::EHOSTUNREACH) => (
            ConnectState::Unreachable,
            PortState::Filtered,
            "host-unreach".into(),
        ),
        Some(libc::ENETUNREACH) => (
            ConnectState::Unreachable,
            PortState::Filtered,
            "net-unreach".into(),
        ),
        Some(libc::EACCES | libc::EPERM) => (
            ConnectState::Unreachable,
            PortState::Filtered,
            "admin-prohibited".into(),
        ),
        Some(libc::ETIMEDOUT) => (
            ConnectState::Timeout,
            PortState::Filtered,
            "no-response".into(),
        ),
        _ => (
            ConnectState::Error,
            PortState::Filtered,
            format!("error: {}", os_message(e)),
        ),
    }
}

/// "No route to host" rather than "No route to host (os error 113)".
fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

pub(crate) async fn run_nc(
    req: &NcRequest,
    limits: &Limits,
    sink: &Sink,
) -> Result<Outcome, DiagError> {
    let host = Host::parse(&req.host)?;
    let port = check_port(req.port, "port")?;
    let addrs = sys::resolve(&host, &req.host).await?;
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(NcRequest::DEFAULT_TIMEOUT_MS));
    let mut last = String::new();
    for addr in addrs.into_iter().take(MAX_NC_ADDRS) {
        let sa = SocketAddr::new(addr, port);
        let start = Instant::now();
        let result = tokio::time::timeout(timeout, TcpStream::connect(sa)).await;
        let time_ms = sys::ms(start.elapsed());
        let (state, error) = match result {
            Ok(Ok(mut stream)) => {
                sink.send(Event::Connect {
                    host: req.host.clone(),
                    addr: sa,
                    state: ConnectState::Open,
                    time_ms,
                    error: None,
                })
                .await?;
                if req.banner {
                    let wait = timeout.min(Duration::from_millis(NcRequest::BANNER_WAIT_MS));
                    let cap = limits.max_banner_bytes.clamp(1, 65536) as usize;
                    sink.send(read_banner(&mut stream, cap, wait).await).await?;
                }
                return Ok(Outcome {
                    tool: Tool::Nc,
                    success: true,
                    summary: format!("{} port {port} open ({} ms)", sa.ip(), ping_ms(time_ms)),
                });
            }
            Ok(Err(e)) => {
                let (state, _, _) = connect_error(&e);
                (state, Some(os_message(&e)))
            }
            Err(_) => (ConnectState::Timeout, None),
        };
        last = match state {
            ConnectState::Refused => format!("{} port {port} refused", sa.ip()),
            ConnectState::Timeout => format!(
                "{} port {port} timed out after {} ms",
                sa.ip(),
                timeout.as_millis()
            ),
            _ => format!(
                "{} port {port}: {}",
                sa.ip(),
                error.as_deref().unwrap_or("error")
            ),
        };
        sink.send(Event::Connect {
            host: req.host.clone(),
            addr: sa,
            state,
            time_ms,
            error,
        })
        .await?;
    }
    Ok(Outcome {
        tool: Tool::Nc,
        success: false,
        summary: last,
    })
}

/// What the service sends first: at most `cap` bytes, waiting at most `wait` for the start
/// and a moment for the rest.
async fn read_banner(stream: &mut TcpStream, cap: usize, wait: Duration) -> Event {
    let mut buf = vec![0u8; cap];
    let mut n = 0;
    let mut closed = false;
    let deadline = Instant::now() + wait;
    while n < cap {
        let until = if n == 0 {
            deadline
        } else {
            deadline.min(Instant::now() + BANNER_LINGER)
        };
        match tokio::time::timeout_at(until, stream.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(k)) => n += k,
            Err(_) => break,
        }
    }
    Event::Banner {
        text: escape_bytes(&buf[..n], false),
        bytes: n as u32,
        truncated: n == cap,
        closed,
    }
}

async fn scan_port(sa: SocketAddr, timeout: Duration) -> PortResult {
    let start = Instant::now();
    let socket = if sa.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    let result = match socket {
        Ok(s) => tokio::time::timeout(timeout, s.connect(sa)).await,
        Err(e) => Ok(Err(e)),
    };
    let rtt = sys::ms(start.elapsed());
    let (state, reason, rtt_ms) = match result {
        Ok(Ok(stream)) => {
            // Reset rather than close, as nmap does: no TIME_WAIT left behind per open port.
            let _ = stream.set_zero_linger();
            (PortState::Open, "syn-ack".to_string(), Some(rtt))
        }
        Ok(Err(e)) => {
            let (_, state, reason) = connect_error(&e);
            let answered = state == PortState::Closed || reason.ends_with("-unreach");
            (state, reason, answered.then_some(rtt))
        }
        Err(_) => (PortState::Filtered, "no-response".to_string(), None),
    };
    PortResult {
        port: sa.port(),
        state,
        reason,
        rtt_ms,
    }
}

/// One host's report: up when any port answered (open, or closed with a reset).
fn host_report(addr: IpAddr, name: Option<String>, results: &[PortResult]) -> (Event, bool) {
    let up = results
        .iter()
        .any(|r| matches!(r.state, PortState::Open | PortState::Closed));
    let latency_ms = results
        .iter()
        .filter(|r| matches!(r.state, PortState::Open | PortState::Closed))
        .filter_map(|r| r.rtt_ms)
        .min_by(f64::total_cmp);
    let mut not_shown = Vec::new();
    let mut hidden: Vec<PortState> = Vec::new();
    for state in [PortState::Closed, PortState::Filtered] {
        let of_state: Vec<&PortResult> = results.iter().filter(|r| r.state == state).collect();
        if of_state.len() > MAX_LISTED_PER_STATE {
            hidden.push(state);
            // The most common reason stands for all of them.
            let mut reasons: Vec<(&str, u32)> = Vec::new();
            for r in &of_state {
                match reasons.iter_mut().find(|(s, _)| *s == r.reason) {
                    Some((_, c)) => *c += 1,
                    None => reasons.push((&r.reason, 1)),
                }
            }
            let reason = reasons
                .iter()
                .max_by_key(|(_, c)| *c)
                .map_or("", |(s, _)| *s);
            not_shown.push(StateCount {
                state,
                count: of_state.len() as u32,
                reason: reason.to_string(),
            });
        }
    }
    let ports = results
        .iter()
        .filter(|r| !hidden.contains(&r.state))
        .cloned()
        .collect();
    (
        Event::HostReport {
            addr,
            name,
            up,
            latency_ms,
            ports,
            not_shown,
        },
        up,
    )
}

pub(crate) async fn run_nmap(
    req: &NmapRequest,
    limits: &Limits,
    sink: &Sink,
) -> Result<Outcome, DiagError> {
    // Checked against the cap before anything is resolved or sent.
    let (target, ports) = req.plan(limits)?;
    let (addrs, name) = match &target {
        ScanTarget::Host(h) => {
            let addr = sys::resolve(h, &req.host).await?[0];
            let name = match h {
                Host::Name(n) => Some(n.clone()),
                Host::Ip(_) => None,
            };
            (vec![addr], name)
        }
        ScanTarget::Net { .. } => (target.addresses(), None),
    };
    let single = matches!(target, ScanTarget::Host(_));
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(NmapRequest::DEFAULT_TIMEOUT_MS));
    let concurrency = req
        .concurrency
        .unwrap_or(NmapRequest::DEFAULT_CONCURRENCY)
        .clamp(1, limits.max_concurrency.max(1)) as usize;
    let start = Instant::now();
    sink.send(Event::ScanStart {
        target: req.host.clone(),
        hosts: addrs.len() as u32,
        ports: ports.len() as u32,
        probes: (addrs.len() * ports.len()) as u32,
    })
    .await?;

    let jobs = addrs.iter().enumerate().flat_map(|(h, addr)| {
        ports
            .iter()
            .enumerate()
            .map(move |(p, port)| (h, p, SocketAddr::new(*addr, *port)))
    });
    // Every probe future lives inside this stream: dropping the run drops them all.
    let mut results = futures_util::stream::iter(jobs)
        .map(|(h, p, sa)| async move { (h, p, scan_port(sa, timeout).await) })
        .buffer_unordered(concurrency);

    let mut table: Vec<Vec<Option<PortResult>>> = vec![vec![None; ports.len()]; addrs.len()];
    let mut remaining = vec![ports.len(); addrs.len()];
    let mut next_report = 0;
    let (mut hosts_up, mut open_ports) = (0u32, 0u32);
    while let Some((h, p, result)) = results.next().await {
        if result.state == PortState::Open {
            open_ports += 1;
            sink.send(Event::PortOpen {
                addr: addrs[h],
                port: result.port,
                rtt_ms: result.rtt_ms.unwrap_or_default(),
            })
            .await?;
        }
        table[h][p] = Some(result);
        remaining[h] -= 1;
        // Reports go out in address order, each as soon as its host is done.
        while next_report < addrs.len() && remaining[next_report] == 0 {
            let done: Vec<PortResult> = table[next_report]
                .iter_mut()
                .filter_map(Option::take)
                .collect();
            let (report, up) = host_report(addrs[next_report], name.clone(), &done);
            if up {
                hosts_up += 1;
            }
            if up || single {
                sink.send(report).await?;
            }
            next_report += 1;
        }
    }
    sink.send(Event::ScanSummary {
        addresses: addrs.len() as u32,
        hosts_up,
        open_ports,
        elapsed_ms: start.elapsed().as_millis() as u64,
    })
    .await?;
    Ok(Outcome {
        tool: Tool::Nmap,
        success: hosts_up > 0,
        summary: format!(
            "{} IP {} ({hosts_up} {} up), {open_ports} open {}",
            addrs.len(),
            if addrs.len() == 1 {
                "address"
            } else {
                "addresses"
            },
            if hosts_up == 1 { "host" } else { "hosts" },
            if open_ports == 1 { "port" } else { "ports" },
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(port: u16, state: PortState, reason: &str) -> PortResult {
        PortResult {
            port,
            state,
            reason: reason.into(),
            rtt_ms: (state != PortState::Filtered).then_some(0.5),
        }
    }

    #[test]
    fn reports_collapse_large_states() {
        let mut rs: Vec<PortResult> = (1..=30)
            .map(|p| result(p, PortState::Closed, "conn-refused"))
            .collect();
        rs.push(result(31, PortState::Open, "syn-ack"));
        rs.push(result(32, PortState::Filtered, "no-response"));
        let (ev, up) = host_report("10.0.0.1".parse().unwrap(), None, &rs);
        assert!(up);
        let Event::HostReport {
            ports,
            not_shown,
            latency_ms,
            ..
        } = &ev
        else {
            panic!()
        };
        assert_eq!(latency_ms, &Some(0.5));
        assert_eq!(
            ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            vec![31, 32]
        );
        assert_eq!(
            not_shown,
            &vec![StateCount {
                state: PortState::Closed,
                count: 30,
                reason: "conn-refused".into()
            }]
        );
        assert!(
            ev.text()
                .contains("Not shown: 30 closed tcp ports (conn-refused)")
        );

        let filtered = [result(22, PortState::Filtered, "no-response")];
        let (ev, up) = host_report("10.0.0.2".parse().unwrap(), Some("db".into()), &filtered);
        assert!(!up);
        assert!(
            ev.text()
                .starts_with("Nmap scan report for db (10.0.0.2)\nHost seems down")
        );
    }

    #[test]
    fn connect_errors() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(connect_error(&e(libc::ECONNREFUSED)).1, PortState::Closed);
        assert_eq!(connect_error(&e(libc::EHOSTUNREACH)).2, "host-unreach");
        assert_eq!(connect_error(&e(libc::ETIMEDOUT)).0, ConnectState::Timeout);
        assert_eq!(os_message(&e(libc::EHOSTUNREACH)), "No route to host");
    }
}

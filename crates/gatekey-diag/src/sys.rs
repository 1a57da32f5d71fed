//! Low-level socket plumbing: an async socket that reads both data and the error queue with
//! their control messages (TTL, kernel receive time, extended errors), bounds-checked
//! parsing of what the kernel hands back, name resolution and randomness.

use std::io;
use std::mem::{MaybeUninit, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use socket2::{SockAddr, Socket};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::DiagError;
use crate::validate::Host;

/// `struct sock_extended_err` from the error queue, plus the offender address after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExtendedError {
    pub errno: u32,
    pub origin: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub info: u32,
    pub offender: Option<IpAddr>,
}

pub(crate) const SO_EE_ORIGIN_LOCAL: u8 = 1;
pub(crate) const SO_EE_ORIGIN_ICMP: u8 = 2;
pub(crate) const SO_EE_ORIGIN_ICMP6: u8 = 3;

/// One datagram (or error-queue entry) and what came with it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Received {
    /// Bytes placed in the buffer.
    pub len: usize,
    /// Source address (for an error-queue entry: the original destination).
    pub from: Option<SocketAddr>,
    /// IP TTL / hop limit of the packet, when asked for.
    pub ttl: Option<u8>,
    /// Kernel receive time (`SO_TIMESTAMPNS`).
    pub stamp: Option<SystemTime>,
    /// Set for error-queue entries.
    pub error: Option<ExtendedError>,
}

/// A non-blocking socket driven by tokio, reading the error queue as well as data.
pub(crate) struct AsyncSocket {
    fd: AsyncFd<Socket>,
}

impl AsyncSocket {
    pub(crate) fn new(socket: Socket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let interest = Interest::READABLE | Interest::WRITABLE | Interest::ERROR;
        // SAFETY: the Socket owns its descriptor, which stays open (and the same) until the
        // AsyncFd, which owns the Socket, is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(socket, interest) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    pub(crate) fn socket(&self) -> &Socket {
        self.fd.get_ref()
    }

    pub(crate) async fn send_to(&self, buf: &[u8], to: &SockAddr) -> io::Result<usize> {
        loop {
            match self.socket().send_to(buf, to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.fd.writable().await?.clear_ready();
                }
                other => return other,
            }
        }
    }

    pub(crate) async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.socket().send(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.fd.writable().await?.clear_ready();
                }
                other => return other,
            }
        }
    }

    /// The next error-queue entry or datagram, error queue first.
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let fd = self.socket().as_raw_fd();
        loop {
            let mut guard = self.fd.ready(Interest::READABLE | Interest::ERROR).await?;
            match recvmsg(fd, buf, libc::MSG_ERRQUEUE) {
                Ok(r) => return Ok(r),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match recvmsg(fd, buf, 0) {
                Ok(r) => return Ok(r),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                // A pending ICMP-reported error (sk_err) surfaces once on a plain read; its
                // details are in the error queue, which is read first on the next turn.
                Err(e) if is_reported_icmp_error(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_reported_icmp_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EPROTO
                | libc::EMSGSIZE
                | libc::EACCES
                | libc::EPERM
                | libc::ETIMEDOUT
                | libc::EOPNOTSUPP
        )
    )
}

fn recvmsg(fd: i32, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 64];
    let mut name = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: every pointer in msg refers to live, writable memory of the stated size.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let namelen = (msg.msg_namelen as usize).min(size_of::<libc::sockaddr_storage>());
    // SAFETY: the storage is initialised (zeroed) and at least namelen bytes long.
    let name_bytes = unsafe { std::slice::from_raw_parts(name.as_ptr().cast::<u8>(), namelen) };
    let controllen = (msg.msg_controllen as usize).min(size_of_val(&control));
    // SAFETY: control is a live u64 array; viewing its first controllen bytes as u8 is sound.
    let control_bytes =
        unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), controllen) };
    let mut r = Received {
        len: (n as usize).min(buf.len()),
        from: parse_sockaddr(name_bytes),
        ..Received::default()
    };
    for (level, kind, data) in Cmsgs::new(control_bytes) {
        match (level, kind) {
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => r.stamp = parse_timespec(data),
            (libc::IPPROTO_IP, libc::IP_TTL) | (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT) => {
                r.ttl = read_i32(data).and_then(|v| u8::try_from(v).ok());
            }
            (libc::IPPROTO_IP, libc::IP_RECVERR) | (libc::IPPROTO_IPV6, libc::IPV6_RECVERR) => {
                r.error = parse_extended_error(data);
            }
            _ => {}
        }
    }
    Ok(r)
}

/// Iterates `(level, type, data)` over a control buffer, stopping at anything malformed.
pub(crate) struct Cmsgs<'a> {
    rest: &'a [u8],
}

impl<'a> Cmsgs<'a> {
    pub(crate) fn new(control: &'a [u8]) -> Self {
        Self { rest: control }
    }
}

const fn cmsg_align(n: usize) -> usize {
    (n + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
}

impl<'a> Iterator for Cmsgs<'a> {
    type Item = (i32, i32, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let header = size_of::<libc::cmsghdr>();
        if self.rest.len() < header {
            return None;
        }
        let w = size_of::<usize>();
        let len = usize::from_ne_bytes(self.rest[..w].try_into().ok()?);
        let level = i32::from_ne_bytes(self.rest[w..w + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(self.rest[w + 4..w + 8].try_into().ok()?);
        if len < header || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let data = &self.rest[cmsg_align(header)..len];
        self.rest = self.rest.get(cmsg_align(len)..).unwrap_or(&[]);
        Some((level, kind, data))
    }
}

fn read_i32(data: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(data.get(..4)?.try_into().ok()?))
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn parse_timespec(data: &[u8]) -> Option<SystemTime> {
    if data.len() < size_of::<libc::timespec>() {
        return None;
    }
    // SAFETY: the length was checked; read_unaligned copes with any alignment.
    let ts: libc::timespec = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// `struct sock_extended_err` (16 bytes) followed by the offender's sockaddr.
pub(crate) fn parse_extended_error(data: &[u8]) -> Option<ExtendedError> {
    if data.len() < 16 {
        return None;
    }
    Some(ExtendedError {
        errno: read_u32(data, 0)?,
        origin: data[4],
        icmp_type: data[5],
        icmp_code: data[6],
        info: read_u32(data, 8)?,
        offender: parse_sockaddr(&data[16..]).map(|sa| sa.ip()),
    })
}

/// A `sockaddr_in` / `sockaddr_in6` in kernel layout; anything else is `None`.
pub(crate) fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        libc::AF_INET6 => {
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

/// Sets an integer socket option that socket2 does not wrap.
pub(crate) fn set_int_opt(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value is a live c_int and its size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Asks for extended errors on the error queue (`IP_RECVERR` / `IPV6_RECVERR`).
pub(crate) fn set_recv_err(socket: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        set_int_opt(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)
    } else {
        set_int_opt(socket, libc::IPPROTO_IP, libc::IP_RECVERR, 1)
    }
}

/// Sets the TTL / unicast hop limit of outgoing packets.
pub(crate) fn set_ttl(socket: &Socket, v6: bool, ttl: u32) -> io::Result<()> {
    if v6 {
        socket.set_unicast_hops_v6(ttl)
    } else {
        socket.set_ttl_v4(ttl)
    }
}

/// Asks for the kernel's receive time of each packet, so RTTs do not include the time the
/// packet waited for us (e.g. while the event channel was full).
pub(crate) fn set_timestamps(socket: &Socket) -> io::Result<()> {
    set_int_opt(socket, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// When a probe went out, on both clocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SentAt {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl SentAt {
    pub(crate) fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    /// RTT from the kernel receive stamp when it is plausible, else from the monotonic clock.
    pub(crate) fn rtt(&self, stamp: Option<SystemTime>, now: Instant) -> Duration {
        let mono = now.saturating_duration_since(self.mono);
        match stamp.and_then(|s| s.duration_since(self.wall).ok()) {
            Some(kernel) if kernel <= mono => kernel,
            _ => mono,
        }
    }
}

/// Milliseconds to the microsecond: exact enough, short in JSON, and such round values survive a
/// JSON round trip unchanged.
pub(crate) fn ms(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1000.0, 3)
}

/// `v` rounded to `decimals` places.
pub(crate) fn round(v: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (v * scale).round() / scale
}

/// Random bytes from the kernel (identifiers, payload cookies); not security critical, so a
/// failure falls back to the clock.
pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: b is a live 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32)
    }
}

/// How long a name lookup through the system resolver may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(15);

/// The host's addresses (getaddrinfo order, duplicates dropped); an address is itself.
pub(crate) async fn resolve(host: &Host, raw: &str) -> Result<Vec<IpAddr>, DiagError> {
    let name = match host {
        Host::Ip(ip) => return Ok(vec![*ip]),
        Host::Name(name) => name.as_str(),
    };
    let err = |message: String| DiagError::Resolve {
        host: raw.to_string(),
        message,
    };
    let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, 0)))
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| err(resolve_message(&e)))?;
    let mut addrs: Vec<IpAddr> = Vec::new();
    for sa in found {
        if !addrs.contains(&sa.ip()) {
            addrs.push(sa.ip());
        }
    }
    if addrs.is_empty() {
        return Err(err("no addresses".into()));
    }
    Ok(addrs)
}

fn resolve_message(e: &io::Error) -> String {
    // std prefixes getaddrinfo's text with "failed to lookup address information: ".
    let s = e.to_string();
    s.strip_prefix("failed to lookup address information: ")
        .unwrap_or(&s)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let header = size_of::<libc::cmsghdr>();
        let len = header + data.len();
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&level.to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.resize(cmsg_align(header), 0);
        v.extend_from_slice(data);
        v.resize(cmsg_align(len), 0);
        v
    }

    fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut v = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&port.to_be_bytes());
        v.extend_from_slice(&ip);
        v.resize(16, 0);
        v
    }

    #[test]
    fn control_messages() {
        let mut buf = cmsg(libc::IPPROTO_IP, libc::IP_TTL, &61i32.to_ne_bytes());
        let mut ee = Vec::new();
        ee.extend_from_slice(&(libc::EHOSTUNREACH as u32).to_ne_bytes());
        ee.extend_from_slice(&[SO_EE_ORIGIN_ICMP, 11, 0, 0]);
        ee.extend_from_slice(&0u32.to_ne_bytes());
        ee.extend_from_slice(&0u32.to_ne_bytes());
        ee.extend_from_slice(&sockaddr_in([10, 0, 0, 1], 0));
        buf.extend(cmsg(libc::IPPROTO_IP, libc::IP_RECVERR, &ee));
        let all: Vec<_> = Cmsgs::new(&buf).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(read_i32(all[0].2), Some(61));
        let e = parse_extended_error(all[1].2).unwrap();
        assert_eq!(e.origin, SO_EE_ORIGIN_ICMP);
        assert_eq!(e.icmp_type, 11);
        assert_eq!(e.offender, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    }

    #[test]
    fn malformed_control_messages_stop_cleanly() {
        let good = cmsg(libc::IPPROTO_IP, libc::IP_TTL, &61i32.to_ne_bytes());
        // Every truncation of a valid buffer parses without panicking.
        for cut in 0..good.len() {
            let _ = Cmsgs::new(&good[..cut]).count();
        }
        // A length beyond the buffer, and a length below the header.
        let mut huge = good.clone();
        huge[..size_of::<usize>()].copy_from_slice(&10_000usize.to_ne_bytes());
        assert_eq!(Cmsgs::new(&huge).count(), 0);
        let mut tiny = good.clone();
        tiny[..size_of::<usize>()].copy_from_slice(&3usize.to_ne_bytes());
        assert_eq!(Cmsgs::new(&tiny).count(), 0);
        // Short payloads.
        assert_eq!(read_i32(&[1, 2]), None);
        assert_eq!(parse_extended_error(&[0; 15]), None);
        assert_eq!(parse_extended_error(&[0; 16]).unwrap().offender, None);
        assert_eq!(parse_timespec(&[0; 3]), None);
        assert_eq!(parse_sockaddr(&[]), None);
        assert_eq!(parse_sockaddr(&sockaddr_in([1, 2, 3, 4], 53)[..7]), None);
        assert_eq!(
            parse_sockaddr(&sockaddr_in([1, 2, 3, 4], 53)),
            Some("1.2.3.4:53".parse().unwrap())
        );
        let mut v6 = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        v6.extend_from_slice(&33434u16.to_be_bytes());
        v6.extend_from_slice(&[0; 4]);
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        assert_eq!(parse_sockaddr(&v6[..20]), None);
        v6.extend_from_slice(&[0; 4]);
        assert_eq!(parse_sockaddr(&v6), Some("[::1]:33434".parse().unwrap()));
    }

    #[test]
    fn rtt_prefers_plausible_kernel_stamps() {
        let sent = SentAt::now();
        let later = sent.mono + Duration::from_millis(10);
        let stamp = sent.wall + Duration::from_millis(4);
        assert_eq!(sent.rtt(Some(stamp), later), Duration::from_millis(4));
        // A stamp beyond the monotonic RTT (clock jump) is ignored.
        let bogus = sent.wall + Duration::from_secs(60);
        assert_eq!(sent.rtt(Some(bogus), later), Duration::from_millis(10));
        assert_eq!(sent.rtt(None, later), Duration::from_millis(10));
    }
}

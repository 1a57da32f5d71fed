//! ICMP and ICMPv6 packets: echo requests out, replies and errors in (bounds-checked; any
//! malformed input parses to `None` or `Other`, never a panic), and the meaning of error
//! types and codes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub(crate) const V4_ECHO_REPLY: u8 = 0;
pub(crate) const V4_UNREACH: u8 = 3;
pub(crate) const V4_ECHO_REQUEST: u8 = 8;
pub(crate) const V4_TIME_EXCEEDED: u8 = 11;
pub(crate) const V4_PARAM_PROBLEM: u8 = 12;
pub(crate) const V6_UNREACH: u8 = 1;
pub(crate) const V6_TOO_BIG: u8 = 2;
pub(crate) const V6_TIME_EXCEEDED: u8 = 3;
pub(crate) const V6_PARAM_PROBLEM: u8 = 4;
pub(crate) const V6_ECHO_REQUEST: u8 = 128;
pub(crate) const V6_ECHO_REPLY: u8 = 129;

const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

/// An echo request: 8-byte header and `payload`. The IPv4 checksum is filled in (the kernel
/// computes ICMPv6 checksums itself, and rewrites the id of datagram sockets).
pub(crate) fn echo_request(v6: bool, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + payload.len());
    p.push(if v6 { V6_ECHO_REQUEST } else { V4_ECHO_REQUEST });
    p.push(0);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(payload);
    if !v6 {
        let sum = checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// The Internet checksum (RFC 1071).
pub(crate) fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The start of the packet an ICMP error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quoted {
    pub dst: IpAddr,
    pub protocol: u8,
    /// For ICMP echo: identifier and sequence; for UDP: source and destination port.
    pub first: u16,
    pub second: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Icmp<'a> {
    EchoReply {
        ident: u16,
        seq: u16,
        payload: &'a [u8],
    },
    Error {
        icmp_type: u8,
        code: u8,
        /// The header's second word (the MTU of "packet too big").
        info: u32,
        quoted: Option<Quoted>,
    },
    /// Echo requests and everything else we do not care about.
    Other,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Strips an IPv4 header (as raw IPv4 sockets deliver it): source, TTL and the ICMP message.
pub(crate) fn strip_ipv4(packet: &[u8]) -> Option<(Ipv4Addr, u8, &[u8])> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || packet.len() < ihl {
        return None;
    }
    let ttl = packet[8];
    let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
    Some((Ipv4Addr::from(src), ttl, &packet[ihl..]))
}

/// Parses an ICMPv4 message (starting at its type byte).
pub(crate) fn parse_v4(msg: &[u8]) -> Option<Icmp<'_>> {
    if msg.len() < 8 {
        return None;
    }
    let (icmp_type, code) = (msg[0], msg[1]);
    Some(match icmp_type {
        V4_ECHO_REPLY => Icmp::EchoReply {
            ident: be16(msg, 4)?,
            seq: be16(msg, 6)?,
            payload: &msg[8..],
        },
        V4_UNREACH | V4_TIME_EXCEEDED | V4_PARAM_PROBLEM | 4 => Icmp::Error {
            icmp_type,
            code,
            info: be32(msg, 4)?,
            quoted: quoted_v4(&msg[8..]),
        },
        _ => Icmp::Other,
    })
}

fn quoted_v4(inner: &[u8]) -> Option<Quoted> {
    let first = *inner.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let protocol = *inner.get(9)?;
    let dst: [u8; 4] = inner.get(16..20)?.try_into().ok()?;
    let l4 = inner.get(ihl..)?;
    quoted_l4(IpAddr::V4(Ipv4Addr::from(dst)), protocol, l4, PROTO_ICMP)
}

/// Parses an ICMPv6 message (raw and datagram ICMPv6 sockets both deliver it without the
/// IPv6 header).
pub(crate) fn parse_v6(msg: &[u8]) -> Option<Icmp<'_>> {
    if msg.len() < 8 {
        return None;
    }
    let (icmp_type, code) = (msg[0], msg[1]);
    Some(match icmp_type {
        V6_ECHO_REPLY => Icmp::EchoReply {
            ident: be16(msg, 4)?,
            seq: be16(msg, 6)?,
            payload: &msg[8..],
        },
        V6_UNREACH | V6_TOO_BIG | V6_TIME_EXCEEDED | V6_PARAM_PROBLEM => Icmp::Error {
            icmp_type,
            code,
            info: be32(msg, 4)?,
            quoted: quoted_v6(&msg[8..]),
        },
        _ => Icmp::Other,
    })
}

fn quoted_v6(inner: &[u8]) -> Option<Quoted> {
    if inner.first()? >> 4 != 6 {
        return None;
    }
    // Extension headers are not followed: our probes carry none.
    let next = *inner.get(6)?;
    let dst: [u8; 16] = inner.get(24..40)?.try_into().ok()?;
    let l4 = inner.get(40..)?;
    quoted_l4(IpAddr::V6(Ipv6Addr::from(dst)), next, l4, PROTO_ICMPV6)
}

fn quoted_l4(dst: IpAddr, protocol: u8, l4: &[u8], icmp_proto: u8) -> Option<Quoted> {
    let (first, second) = if protocol == icmp_proto {
        (be16(l4, 4)?, be16(l4, 6)?)
    } else if protocol == PROTO_UDP {
        (be16(l4, 0)?, be16(l4, 2)?)
    } else {
        return None;
    };
    Some(Quoted {
        dst,
        protocol,
        first,
        second,
    })
}

/// Sequence number of the echo request an error-queue entry of an ICMP datagram socket
/// quotes (the entry's data is the original ICMP message).
pub(crate) fn quoted_echo_seq(data: &[u8]) -> Option<u16> {
    match *data.first()? {
        V4_ECHO_REQUEST | V6_ECHO_REQUEST => be16(data, 6),
        _ => None,
    }
}

/// What an ICMP error means for a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Meaning {
    /// A router on the way: TTL / hop limit exceeded.
    TimeExceeded,
    /// The destination itself answered (port unreachable to a UDP probe).
    PortUnreachable,
    /// Unreachable for another reason; traceroute's mark (`!H`, `!N`, …).
    Unreachable(String),
    Other,
}

/// iputils' wording of an ICMP error, and what it means for a probe.
pub(crate) fn describe(v6: bool, icmp_type: u8, code: u8, info: u32) -> (String, Meaning) {
    let unreachable = |m: &str| Meaning::Unreachable(m.to_string());
    if v6 {
        match (icmp_type, code) {
            (V6_UNREACH, 0) => (
                "Destination unreachable: No route".into(),
                unreachable("!N"),
            ),
            (V6_UNREACH, 1) => (
                "Destination unreachable: Administratively prohibited".into(),
                unreachable("!X"),
            ),
            (V6_UNREACH, 2) => (
                "Destination unreachable: Beyond scope of source address".into(),
                unreachable("!S"),
            ),
            (V6_UNREACH, 3) => (
                "Destination unreachable: Address unreachable".into(),
                unreachable("!H"),
            ),
            (V6_UNREACH, 4) => (
                "Destination unreachable: Port unreachable".into(),
                Meaning::PortUnreachable,
            ),
            (V6_UNREACH, 5 | 6) => (
                "Destination unreachable: Source address failed policy".into(),
                unreachable("!X"),
            ),
            (V6_UNREACH, c) => (
                format!("Destination unreachable: Unknown code {c}"),
                unreachable(&format!("!<{c}>")),
            ),
            (V6_TOO_BIG, _) => (
                format!("Packet too big: mtu={info}"),
                unreachable(&format!("!F-{info}")),
            ),
            (V6_TIME_EXCEEDED, 0) => ("Time exceeded: Hop limit".into(), Meaning::TimeExceeded),
            (V6_TIME_EXCEEDED, _) => (
                "Time exceeded: Defragmentation failure".into(),
                Meaning::Other,
            ),
            (V6_PARAM_PROBLEM, c) => (format!("Parameter problem: code {c}"), Meaning::Other),
            (t, c) => (format!("Unknown ICMPv6 type {t} code {c}"), Meaning::Other),
        }
    } else {
        match (icmp_type, code) {
            (V4_UNREACH, 0) => ("Destination Net Unreachable".into(), unreachable("!N")),
            (V4_UNREACH, 1) => ("Destination Host Unreachable".into(), unreachable("!H")),
            (V4_UNREACH, 2) => ("Destination Protocol Unreachable".into(), unreachable("!P")),
            (V4_UNREACH, 3) => (
                "Destination Port Unreachable".into(),
                Meaning::PortUnreachable,
            ),
            (V4_UNREACH, 4) => (
                format!("Frag needed and DF set (mtu = {})", info & 0xffff),
                unreachable(&format!("!F-{}", info & 0xffff)),
            ),
            (V4_UNREACH, 5) => ("Source Route Failed".into(), unreachable("!S")),
            (V4_UNREACH, 6) => ("Destination Net Unknown".into(), unreachable("!N")),
            (V4_UNREACH, 7) => ("Destination Host Unknown".into(), unreachable("!H")),
            (V4_UNREACH, 9 | 10) => ("Destination Host Prohibited".into(), unreachable("!X")),
            (V4_UNREACH, 13) => (
                "Communication prohibited by filter".into(),
                unreachable("!X"),
            ),
            (V4_UNREACH, c) => (
                format!("Dest Unreachable, Bad Code: {c}"),
                unreachable(&format!("!<{c}>")),
            ),
            (V4_TIME_EXCEEDED, 0) => ("Time to live exceeded".into(), Meaning::TimeExceeded),
            (V4_TIME_EXCEEDED, _) => ("Frag reassembly time exceeded".into(), Meaning::Other),
            (V4_PARAM_PROBLEM, _) => ("Parameter problem".into(), Meaning::Other),
            (4, _) => ("Source Quench".into(), Meaning::Other),
            (t, c) => (format!("Bad ICMP type: {t} code {c}"), Meaning::Other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_header(protocol: u8, src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, ttl, protocol, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h
    }

    #[test]
    fn echo_request_checksum_verifies() {
        let p = echo_request(false, 0x1234, 7, b"hello");
        assert_eq!(&p[..2], &[8, 0]);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        let p6 = echo_request(true, 1, 2, b"x");
        assert_eq!(p6[0], 128);
        assert_eq!(&p6[2..4], &[0, 0]);
    }

    #[test]
    fn echo_reply_v4_through_raw_header() {
        let mut pkt = ipv4_header(1, [10, 0, 0, 1], [10, 0, 0, 2], 63);
        pkt.extend_from_slice(&[0, 0, 0, 0, 0x12, 0x34, 0, 9, b'a', b'b']);
        let (src, ttl, icmp) = strip_ipv4(&pkt).unwrap();
        assert_eq!(src, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(ttl, 63);
        assert_eq!(
            parse_v4(icmp).unwrap(),
            Icmp::EchoReply {
                ident: 0x1234,
                seq: 9,
                payload: b"ab"
            }
        );
    }

    #[test]
    fn time_exceeded_quoting_udp_and_echo() {
        // Time exceeded quoting a UDP probe to 10.0.3.2:33435.
        let mut msg = vec![11, 0, 0, 0, 0, 0, 0, 0];
        msg.extend(ipv4_header(17, [10, 0, 1, 2], [10, 0, 3, 2], 1));
        msg.extend_from_slice(&[0x9c, 0x40, 0x82, 0x9b, 0, 40, 0, 0]);
        assert_eq!(
            parse_v4(&msg).unwrap(),
            Icmp::Error {
                icmp_type: 11,
                code: 0,
                info: 0,
                quoted: Some(Quoted {
                    dst: "10.0.3.2".parse().unwrap(),
                    protocol: 17,
                    first: 40000,
                    second: 33435
                })
            }
        );
        // Host unreachable quoting an echo request id 0xbeef seq 3.
        let mut msg = vec![3, 1, 0, 0, 0, 0, 0, 0];
        msg.extend(ipv4_header(1, [10, 0, 1, 2], [10, 0, 3, 99], 64));
        msg.extend_from_slice(&[8, 0, 0, 0, 0xbe, 0xef, 0, 3]);
        let Icmp::Error { quoted, .. } = parse_v4(&msg).unwrap() else {
            panic!()
        };
        assert_eq!(quoted.unwrap().first, 0xbeef);
        assert_eq!(quoted.unwrap().second, 3);
    }

    #[test]
    fn v6_messages() {
        assert_eq!(
            parse_v6(&[129, 0, 0, 0, 0, 5, 0, 6]).unwrap(),
            Icmp::EchoReply {
                ident: 5,
                seq: 6,
                payload: &[]
            }
        );
        let mut msg = vec![3, 0, 0, 0, 0, 0, 0, 0];
        let mut ip6 = vec![0x60, 0, 0, 0, 0, 8, 58, 1];
        ip6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        ip6.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        msg.extend(ip6);
        msg.extend_from_slice(&[128, 0, 0, 0, 0, 7, 0, 1]);
        let Icmp::Error {
            icmp_type, quoted, ..
        } = parse_v6(&msg).unwrap()
        else {
            panic!()
        };
        assert_eq!(icmp_type, 3);
        assert_eq!(quoted.unwrap().dst, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(quoted.unwrap().first, 7);
    }

    #[test]
    fn malformed_input_never_panics() {
        // Every prefix of valid packets, plus garbage and hostile header lengths.
        let mut te = vec![11, 0, 0, 0, 0, 0, 0, 0];
        te.extend(ipv4_header(17, [1, 1, 1, 1], [2, 2, 2, 2], 1));
        te.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
        let mut raw = ipv4_header(1, [1, 1, 1, 1], [2, 2, 2, 2], 1);
        raw.extend_from_slice(&te);
        for cut in 0..=raw.len() {
            let b = &raw[..cut];
            if let Some((_, _, icmp)) = strip_ipv4(b) {
                let _ = parse_v4(icmp);
            }
            let _ = parse_v4(b);
            let _ = parse_v6(b);
            let _ = quoted_echo_seq(b);
        }
        // IHL claiming 60 bytes in a 20-byte packet; IHL below 20; wrong versions.
        let mut bad = ipv4_header(1, [1; 4], [2; 4], 1);
        bad[0] = 0x4f;
        assert!(strip_ipv4(&bad).is_none());
        bad[0] = 0x44;
        assert!(strip_ipv4(&bad).is_none());
        bad[0] = 0x65;
        assert!(strip_ipv4(&bad).is_none());
        let mut quoted_bad_ihl = vec![3, 1, 0, 0, 0, 0, 0, 0, 0x4f];
        quoted_bad_ihl.extend_from_slice(&[0; 30]);
        assert!(matches!(
            parse_v4(&quoted_bad_ihl),
            Some(Icmp::Error { quoted: None, .. })
        ));
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = parse_v4(&junk);
            let _ = parse_v6(&junk);
            let _ = strip_ipv4(&junk);
        }
        assert!(parse_v4(&[0; 7]).is_none());
        assert_eq!(parse_v4(&[8, 0, 0, 0, 0, 0, 0, 0]), Some(Icmp::Other));
        assert_eq!(quoted_echo_seq(&[8, 0, 0, 0, 0, 1, 0, 42]), Some(42));
        assert_eq!(quoted_echo_seq(&[0, 0, 0, 0, 0, 1, 0, 42]), None);
    }

    #[test]
    fn meanings() {
        assert_eq!(describe(false, 11, 0, 0).1, Meaning::TimeExceeded);
        assert_eq!(describe(false, 3, 3, 0).1, Meaning::PortUnreachable);
        assert_eq!(
            describe(false, 3, 1, 0),
            (
                "Destination Host Unreachable".to_string(),
                Meaning::Unreachable("!H".into())
            )
        );
        assert_eq!(describe(true, 3, 0, 0).1, Meaning::TimeExceeded);
        assert_eq!(describe(true, 1, 4, 0).1, Meaning::PortUnreachable);
        assert_eq!(describe(true, 1, 3, 0).1, Meaning::Unreachable("!H".into()));
        assert_eq!(describe(true, 2, 0, 1280).0, "Packet too big: mtu=1280");
    }
}

//! The PROXY protocol header (HAProxy's, v1 text and v2 binary) a load
//! balancer in front (an NLB) writes before the client's bytes: what it
//! says, and whether this connection may or must carry one. The parsing
//! is the `ppp` crate's; this module decides.
//!
//! - From a peer in the listener's `trusted` list, a header is required
//!   (`v1`, `v2`: that version) or optional (`auto`: either or none).
//!   Its source address is the connection's client address from then on
//!   (stickiness, `X-Forwarded-For`, the access log, `client_ip`); a v2
//!   `LOCAL` header (the NLB's health checks) and v1 `UNKNOWN` keep the
//!   TCP peer. The AWS VPC endpoint id (TLV 0xEA, subtype 0x01) is kept
//!   for the access log.
//! - From any other peer, a header is refused (a client must not choose
//!   its own address); without one it is an ordinary direct client.
//!
//! Only the first header counts: whatever follows it is the client's
//! HTTP, even if it looks like another header.

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocolMode;

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The v1 maximum (RFC-like spec: 107 bytes with the CRLF).
const V1_MAX: usize = 107;
/// The largest v2 header cutover accepts (16 bytes, IPv6 addresses and
/// TLVs). An NLB's is under 100 bytes.
pub const V2_MAX: usize = 1024;
/// AWS's TLV: `PP2_TYPE_AWS`, subtype `PP2_SUBTYPE_AWS_VPCE_ID`.
const TLV_AWS: u8 = 0xEA;
const AWS_VPCE_ID: u8 = 0x01;

/// What the start of a connection is.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// Too few bytes to tell: read more.
    Incomplete,
    /// Not a PROXY header: the client's own bytes.
    NoHeader,
    /// A whole header, `len` bytes.
    Header(Header),
}

#[derive(Debug, PartialEq, Eq, Default)]
pub struct Header {
    pub len: usize,
    pub version: u8,
    /// The client's address; `None` for v2 `LOCAL`, an unspecified or
    /// UNIX family, or v1 `UNKNOWN` (the TCP peer stays).
    pub source: Option<SocketAddr>,
    /// v2 `LOCAL` (a health check from the load balancer itself).
    pub local: bool,
    /// The AWS VPC endpoint id, visible characters only.
    pub vpce: Option<Box<str>>,
}

/// Read the start of a connection: a PROXY header, or not one. `Err` with
/// what is wrong with a header that does not parse.
pub fn read(buf: &[u8]) -> Result<Start, String> {
    if buf.is_empty() {
        return Ok(Start::Incomplete);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(Start::Incomplete)
        } else {
            v2(buf)
        };
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return if n < V1_PREFIX.len() {
            Ok(Start::Incomplete)
        } else {
            v1(buf)
        };
    }
    Ok(Start::NoHeader)
}

fn v1(buf: &[u8]) -> Result<Start, String> {
    let Some(cr) = buf.iter().take(V1_MAX).position(|&b| b == b'\r') else {
        return if buf.len() < V1_MAX {
            Ok(Start::Incomplete)
        } else {
            Err(format!(
                "v1 header without CRLF in its first {V1_MAX} bytes"
            ))
        };
    };
    if buf.len() < cr + 2 {
        return Ok(Start::Incomplete);
    }
    let len = cr + 2;
    let header = ppp::v1::Header::try_from(&buf[..len]).map_err(|e| format!("v1: {e}"))?;
    let source = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Unknown => None,
    };
    Ok(Start::Header(Header {
        len,
        version: 1,
        source,
        ..Header::default()
    }))
}

fn v2(buf: &[u8]) -> Result<Start, String> {
    if buf.len() < 16 {
        return Ok(Start::Incomplete);
    }
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX {
        return Err(format!("v2 header of {len} bytes (at most {V2_MAX})"));
    }
    if buf.len() < len {
        return Ok(Start::Incomplete);
    }
    let header = ppp::v2::Header::try_from(&buf[..len]).map_err(|e| format!("v2: {e}"))?;
    let local = header.command == ppp::v2::Command::Local;
    let source = match header.addresses {
        _ if local => None,
        ppp::v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    };
    let mut vpce = None;
    for tlv in header.tlvs() {
        let tlv = tlv.map_err(|e| format!("v2 TLV: {e}"))?;
        if tlv.kind == TLV_AWS && tlv.value.first() == Some(&AWS_VPCE_ID) {
            let id = &tlv.value[1..];
            if id.is_empty()
                || id.len() > 64
                || !id.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            {
                return Err("v2 TLV: an AWS VPC endpoint id that is not one".into());
            }
            vpce = Some(String::from_utf8_lossy(id).into());
        }
    }
    Ok(Start::Header(Header {
        len,
        version: 2,
        source,
        local,
        vpce,
    }))
}

/// The `result` label of `cutover_proxy_protocol_connections_total`.
pub const RESULTS: [&str; 8] = [
    "v1",
    "v2",
    "local",
    "none",
    "missing",
    "untrusted",
    "bad",
    "timeout",
];

/// The label index of a header that was served.
pub fn served_label(h: Option<&Header>) -> usize {
    match h {
        Some(h) if h.local => 2,
        Some(h) if h.version == 1 => 0,
        Some(_) => 1,
        None => 3,
    }
}

/// What to do with a connection, given its start and its peer's trust.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it; the header (if any) said this.
    Serve(Option<Header>),
    /// Close it: why, as a metric label.
    Refuse(Refused),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A trusted peer sent no header where one is required.
    Missing,
    /// A header from a peer not in `trusted`.
    Untrusted,
    /// A header of the other version, or one that does not parse.
    Bad,
}

impl Refused {
    pub fn label(self) -> &'static str {
        RESULTS[self.index()]
    }

    /// Its index in [`RESULTS`].
    pub fn index(self) -> usize {
        match self {
            Refused::Missing => 4,
            Refused::Untrusted => 5,
            Refused::Bad => 6,
        }
    }
}

/// The decision for a connection whose start is `start`.
pub fn verdict(mode: ProxyProtocolMode, trusted: bool, start: Start) -> Verdict {
    match start {
        Start::Incomplete => Verdict::Refuse(Refused::Bad),
        Start::NoHeader
            if trusted && matches!(mode, ProxyProtocolMode::V1 | ProxyProtocolMode::V2) =>
        {
            Verdict::Refuse(Refused::Missing)
        }
        Start::NoHeader => Verdict::Serve(None),
        Start::Header(_) if !trusted => Verdict::Refuse(Refused::Untrusted),
        Start::Header(h) => match (mode, h.version) {
            (ProxyProtocolMode::V1, 2) | (ProxyProtocolMode::V2, 1) => {
                Verdict::Refuse(Refused::Bad)
            }
            (ProxyProtocolMode::Off, _) => Verdict::Serve(None),
            _ => Verdict::Serve(Some(h)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(cmd: u8, fam: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend(((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend(addresses);
        h.extend(tlvs);
        h
    }

    const TCP4: [u8; 12] = [192, 0, 2, 7, 10, 0, 0, 5, 0x30, 0x39, 0x1f, 0x90];

    fn header(buf: &[u8]) -> Header {
        match read(buf) {
            Ok(Start::Header(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = header(b"PROXY TCP4 192.0.2.7 10.0.0.5 12345 8080\r\nGET / HTTP/1.1\r\n");
        assert_eq!(h.source, Some("192.0.2.7:12345".parse().unwrap()));
        assert_eq!((h.len, h.version), (42, 1));
        let h = header(b"PROXY TCP6 2001:db8::7 2001:db8::5 1 2\r\n");
        assert_eq!(h.source, Some("[2001:db8::7]:1".parse().unwrap()));
        assert_eq!(header(b"PROXY UNKNOWN\r\n").source, None);
        assert!(read(b"PROXY TCP4 999.0.2.7 10.0.0.5 1 2\r\n").is_err());
        assert!(read(b"PROXY TCP4 192.0.2.7 10.0.0.5 1\r\n").is_err());
        assert!(read(&[b"PROXY ".as_slice(), &[b'x'; 200]].concat()).is_err());
    }

    #[test]
    fn v2_tcp4_tcp6_local_and_tlvs() {
        let vpce = [
            &[TLV_AWS, 0, 23, AWS_VPCE_ID][..],
            b"vpce-08d2bf15fac5001c9",
        ]
        .concat();
        let noop = [4u8, 0, 2, 0, 0];
        let buf = [
            v2_header(1, 0x11, &TCP4, &[&noop[..], &vpce].concat()),
            b"GET".to_vec(),
        ]
        .concat();
        let h = header(&buf);
        assert_eq!(h.source, Some("192.0.2.7:12345".parse().unwrap()));
        assert_eq!(h.vpce.as_deref(), Some("vpce-08d2bf15fac5001c9"));
        assert_eq!(h.len, buf.len() - 3);
        let mut v6 = [0u8; 36];
        v6[..16].copy_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        v6[32..34].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            header(&v2_header(1, 0x21, &v6, &[])).source,
            Some("[2001:db8::7]:443".parse().unwrap())
        );
        let local = header(&v2_header(0, 0x00, &[], &[]));
        assert!(local.local && local.source.is_none());
        // A LOCAL header with addresses still keeps the TCP peer.
        assert!(header(&v2_header(0, 0x11, &TCP4, &[])).source.is_none());
    }

    #[test]
    fn split_headers_are_incomplete_until_whole() {
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.5 12345 8080\r\n";
        let v2 = v2_header(1, 0x11, &TCP4, &[]);
        for whole in [&v1[..], &v2[..]] {
            for cut in 0..whole.len() {
                assert_eq!(read(&whole[..cut]), Ok(Start::Incomplete), "{cut}");
            }
            assert!(matches!(read(whole), Ok(Start::Header(_))));
        }
        assert_eq!(read(b"GET / HTTP/1.1\r\n"), Ok(Start::NoHeader));
        assert_eq!(read(b"POST"), Ok(Start::NoHeader));
        assert_eq!(read(b"\r\n\r\nGET"), Ok(Start::NoHeader));
    }

    #[test]
    fn bad_v2_headers_are_errors_not_panics() {
        for bad in [
            // Version 3.
            {
                let mut h = v2_header(1, 0x11, &TCP4, &[]);
                h[12] = 0x31;
                h
            },
            // Unknown family.
            v2_header(1, 0x51, &TCP4, &[]),
            // Too short for its family.
            v2_header(1, 0x21, &TCP4, &[]),
            // A TLV longer than what is left.
            v2_header(1, 0x11, &TCP4, &[4, 0, 9, 1]),
            // A VPC endpoint id with a control byte.
            v2_header(1, 0x11, &TCP4, &[TLV_AWS, 0, 3, AWS_VPCE_ID, b'v', 0]),
        ] {
            assert!(read(&bad).is_err(), "{bad:?}");
        }
        let mut huge = v2_header(1, 0x11, &TCP4, &[]);
        huge[14..16].copy_from_slice(&60000u16.to_be_bytes());
        assert!(read(&huge).unwrap_err().contains("at most"));
    }

    #[test]
    fn who_may_send_a_header() {
        use ProxyProtocolMode::*;
        let h = || {
            Start::Header(Header {
                version: 2,
                ..Header::default()
            })
        };
        assert!(matches!(verdict(V2, true, h()), Verdict::Serve(Some(_))));
        assert_eq!(verdict(V2, false, h()), Verdict::Refuse(Refused::Untrusted));
        assert_eq!(
            verdict(V2, true, Start::NoHeader),
            Verdict::Refuse(Refused::Missing)
        );
        assert_eq!(verdict(V2, false, Start::NoHeader), Verdict::Serve(None));
        assert_eq!(verdict(Auto, true, Start::NoHeader), Verdict::Serve(None));
        assert!(matches!(verdict(Auto, true, h()), Verdict::Serve(Some(_))));
        assert_eq!(verdict(V1, true, h()), Verdict::Refuse(Refused::Bad));
    }
}

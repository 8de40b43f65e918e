//! The real client address, for stickiness and logs.
//!
//! Like nginx's `real_ip_recursive on`: the header is believed only when the
//! TCP peer is trusted, and then read from the right, skipping trusted hops;
//! the first untrusted address is the client. A header that does not parse is
//! ignored as a whole (never half-believed) and reported to the caller.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

use crate::config::ClientIp;

#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    Peer,
    Header,
    /// The peer was trusted but its header was malformed: the peer address is used.
    MalformedHeader,
}

/// `ip` (an IPv4-mapped address read as IPv4) is in one of `nets`.
pub fn trusted(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// `::ffff:10.0.0.1` (a v4 client on a dual-stack socket) is `10.0.0.1`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn client_ip(settings: &ClientIp, peer: IpAddr, headers: &HeaderMap) -> (IpAddr, Source) {
    match &settings.header {
        Some(name) => client_ip_from(
            settings,
            peer,
            headers.get_all(name).iter().map(|v| v.as_bytes()),
        ),
        None => (canonical(peer), Source::Peer),
    }
}

/// [`client_ip`] over the values of the configured header, in order, however
/// the caller holds them.
pub fn client_ip_from<'a>(
    settings: &ClientIp,
    peer: IpAddr,
    values: impl Iterator<Item = &'a [u8]>,
) -> (IpAddr, Source) {
    let peer = canonical(peer);
    if settings.header.is_none() || !trusted(&settings.trusted, peer) {
        return (peer, Source::Peer);
    }
    let mut values = values.peekable();
    if values.peek().is_none() {
        return (peer, Source::Peer);
    }
    // All header lines form one list, in order.
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in values {
        let Ok(text) = std::str::from_utf8(v) else {
            return (peer, Source::MalformedHeader);
        };
        for item in text.split(',') {
            match parse_hop(item.trim()) {
                Some(ip) => hops.push(canonical(ip)),
                None => return (peer, Source::MalformedHeader),
            }
        }
    }
    let client = hops
        .iter()
        .rev()
        .find(|ip| !trusted(&settings.trusted, **ip))
        .or(hops.first())
        .copied();
    match client {
        Some(ip) => (ip, Source::Header),
        None => (peer, Source::MalformedHeader),
    }
}

/// Whether the client used `https`: on a TLS listener, or as a trusted
/// peer (`client_ip.trusted`: the ALB that terminated the client's TLS)
/// says in `X-Forwarded-Proto` (its last value). What a rewritten
/// `Location` gets as its scheme ([`super::deleak`]).
pub fn client_https(
    settings: &ClientIp,
    peer: Option<IpAddr>,
    tls: bool,
    proto: Option<&[u8]>,
) -> bool {
    if tls {
        return true;
    }
    let Some(proto) = proto else { return false };
    let last = proto.rsplit(|&b| b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"https")
        && peer.is_some_and(|p| trusted(&settings.trusted, p))
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:443`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    s.parse::<std::net::SocketAddr>().ok().map(|sa| sa.ip())
}

/// An IP address as text, on the stack (no allocation per request).
pub struct IpText {
    len: u8,
    buf: [u8; 45],
}

impl IpText {
    pub fn new(ip: IpAddr) -> IpText {
        use std::io::Write;
        let mut buf = [0u8; 45];
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        // 45 bytes hold the longest IPv6 text (IPv4-mapped, full form).
        let _ = write!(cursor, "{ip}");
        let len = cursor.position() as u8;
        IpText { len, buf }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ClientIp {
        ClientIp {
            header: Some(http::HeaderName::from_static("x-forwarded-for")),
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
            forward: Default::default(),
        }
    }

    fn headers(v: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for x in v {
            h.append("x-forwarded-for", x.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn header_believed_only_from_trusted_peers() {
        let h = headers(&["203.0.113.7"]);
        assert_eq!(
            client_ip(&settings(), ip("10.1.2.3"), &h),
            (ip("203.0.113.7"), Source::Header)
        );
        assert_eq!(
            client_ip(&settings(), ip("198.51.100.1"), &h),
            (ip("198.51.100.1"), Source::Peer)
        );
    }

    #[test]
    fn rightmost_untrusted_hop_wins() {
        let h = headers(&["1.1.1.1, 203.0.113.7", "10.9.9.9"]);
        assert_eq!(
            client_ip(&settings(), ip("10.1.2.3"), &h).0,
            ip("203.0.113.7")
        );
        let all_trusted = headers(&["10.0.0.5, 10.0.0.6"]);
        assert_eq!(
            client_ip(&settings(), ip("10.1.2.3"), &all_trusted).0,
            ip("10.0.0.5")
        );
    }

    #[test]
    fn malformed_header_is_ignored_whole() {
        for bad in ["not-an-ip", "1.2.3.4, garbage", "", "1.2.3.4,,"] {
            let h = headers(&[bad]);
            assert_eq!(
                client_ip(&settings(), ip("10.1.2.3"), &h),
                (ip("10.1.2.3"), Source::MalformedHeader),
                "{bad:?}"
            );
        }
        assert_eq!(parse_hop("[2001:db8::1]:443"), Some(ip("2001:db8::1")));
    }
}

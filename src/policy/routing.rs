//! Which route a request's authority belongs to.
//!
//! The authority is normalised the way the spec says (lower-case, port and
//! trailing dot removed) into a stack buffer, so matching allocates nothing.

use std::collections::HashMap;

use crate::config::HostPattern;

/// Longest DNS name; anything longer cannot match a configured host.
const MAX_HOST_LEN: usize = 253;

/// Why an authority could not be used for routing (the client gets 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadAuthority {
    Empty,
    Malformed,
}

/// A normalised host name, held on the stack.
pub struct NormalizedHost {
    buf: [u8; MAX_HOST_LEN],
    len: usize,
}

impl NormalizedHost {
    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever copied in (checked in `normalize_authority`).
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// Normalise an authority (`Host` header value or absolute-URI authority):
/// strip the port and a trailing dot, lower-case. IPv6 literals keep their
/// brackets stripped as well, so `[::1]:80` becomes `::1`.
pub fn normalize_authority(raw: &[u8]) -> Result<NormalizedHost, BadAuthority> {
    let raw = raw.trim_ascii();
    let host = if let Some(rest) = raw.strip_prefix(b"[") {
        let end = rest
            .iter()
            .position(|&b| b == b']')
            .ok_or(BadAuthority::Malformed)?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || is_port_suffix(after)) {
            return Err(BadAuthority::Malformed);
        }
        &rest[..end]
    } else {
        match raw.iter().rposition(|&b| b == b':') {
            Some(i) if is_port_suffix(&raw[i..]) => &raw[..i],
            Some(_) => return Err(BadAuthority::Malformed),
            None => raw,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() {
        return Err(BadAuthority::Empty);
    }
    // An empty label (`a..b`, `.a`, `a..`) is no host name (`..` is found
    // in the copy loop below).
    if host.starts_with(b".") || host.ends_with(b".") {
        return Err(BadAuthority::Malformed);
    }
    if host.len() > MAX_HOST_LEN {
        return Err(BadAuthority::Malformed);
    }
    let mut out = NormalizedHost {
        buf: [0; MAX_HOST_LEN],
        len: host.len(),
    };
    let mut previous = 0u8;
    for (dst, &b) in out.buf.iter_mut().zip(host) {
        if !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
            || (b == b'.' && previous == b'.')
        {
            return Err(BadAuthority::Malformed);
        }
        previous = b;
        *dst = b.to_ascii_lowercase();
    }
    Ok(out)
}

/// `:` followed by 0-5 digits (an empty port is allowed by RFC 3986).
fn is_port_suffix(s: &[u8]) -> bool {
    s.first() == Some(&b':') && s.len() <= 6 && s[1..].iter().all(u8::is_ascii_digit)
}

/// Host name → route index; exact names first, then the longest wildcard suffix.
#[derive(Debug, Default)]
pub struct HostTable {
    exact: HashMap<Box<str>, usize>,
    /// Keyed by the suffix with its leading dot (`.example.com`).
    wildcard: HashMap<Box<str>, usize>,
}

impl HostTable {
    pub fn new<'a>(routes: impl IntoIterator<Item = (usize, &'a [HostPattern])>) -> Self {
        let mut table = HostTable::default();
        for (idx, hosts) in routes {
            for h in hosts {
                match h {
                    HostPattern::Exact(name) => table.exact.insert(name.as_str().into(), idx),
                    HostPattern::Wildcard(suffix) => {
                        table.wildcard.insert(suffix.as_str().into(), idx)
                    }
                };
            }
        }
        table
    }

    /// `*.example.com` matches names any depth below `example.com` (as nginx's
    /// `server_name *.example.com` does), but not `example.com` itself; the most
    /// specific wildcard wins.
    pub fn route_for_host(&self, host: &str) -> Option<usize> {
        if let Some(&idx) = self.exact.get(host) {
            return Some(idx);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        // Suffixes from longest to shortest: ".b.example.com" before ".example.com".
        host.match_indices('.')
            .find_map(|(i, _)| self.wildcard.get(&host[i..]).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, BadAuthority> {
        normalize_authority(s.as_bytes()).map(|h| h.as_str().to_string())
    }

    #[test]
    fn normalises_case_port_and_trailing_dot() {
        assert_eq!(norm("CDN.Example.COM:8080").unwrap(), "cdn.example.com");
        assert_eq!(norm("cdn.example.com.").unwrap(), "cdn.example.com");
        assert_eq!(norm("cdn.example.com.:443").unwrap(), "cdn.example.com");
        assert_eq!(norm("cdn.example.com:").unwrap(), "cdn.example.com");
        assert_eq!(norm("[::1]:80").unwrap(), "::1");
        assert_eq!(norm("10.0.0.1:80").unwrap(), "10.0.0.1");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(norm(""), Err(BadAuthority::Empty));
        assert_eq!(norm(":80"), Err(BadAuthority::Empty));
        assert_eq!(norm("a b"), Err(BadAuthority::Malformed));
        assert_eq!(norm("evil.test/x"), Err(BadAuthority::Malformed));
        assert_eq!(norm("user@evil.test"), Err(BadAuthority::Malformed));
        assert_eq!(norm("host:port"), Err(BadAuthority::Malformed));
        assert_eq!(norm("[::1"), Err(BadAuthority::Malformed));
        assert_eq!(norm(&"a".repeat(300)), Err(BadAuthority::Malformed));
        for empty_label in ["a..b", ".a", "0..", "a.b.."] {
            assert_eq!(
                norm(empty_label),
                Err(BadAuthority::Malformed),
                "{empty_label}"
            );
        }
    }

    #[test]
    fn exact_beats_wildcard_and_longest_wildcard_wins() {
        let r0 = [HostPattern::Exact("cdn.example.com".into())];
        let r1 = [HostPattern::Wildcard(".example.com".into())];
        let r2 = [HostPattern::Wildcard(".img.example.com".into())];
        let t = HostTable::new([(0, &r0[..]), (1, &r1[..]), (2, &r2[..])]);
        assert_eq!(t.route_for_host("cdn.example.com"), Some(0));
        assert_eq!(t.route_for_host("www.example.com"), Some(1));
        assert_eq!(t.route_for_host("a.b.example.com"), Some(1));
        assert_eq!(t.route_for_host("x.img.example.com"), Some(2));
        assert_eq!(t.route_for_host("example.com"), None);
        assert_eq!(t.route_for_host("example.org"), None);
    }
}

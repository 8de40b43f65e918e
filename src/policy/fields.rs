//! Which header fields cross cutover, in either direction, decided once for
//! both carriers.
//!
//! Never forwarded as received (RFC 9110 7.6.1 and what proxies learned
//! since): `Connection` and every field it names, `Keep-Alive`,
//! `Proxy-Connection`, `TE`, `Trailer`, `Upgrade` (unless this is an
//! upgrade), and `Proxy-*` (`Proxy-Authorization` is for a proxy, not for
//! the origin). Requests also lose `Proxy` (httpoxy) and every field whose
//! name has an `_`: CGI-style origins read `X_Forwarded_For` as
//! `X-Forwarded-For`, so a client could set what cutover is the authority
//! on (nginx drops them too, `underscores_in_headers off`). Framing fields
//! (`Content-Length`, `Transfer-Encoding`) are the carrier's: each frames
//! the body it forwards (see [`super::framing`]).

/// What the `Connection` fields of a message ask for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionOptions {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// Some token names another field, which must then not be forwarded.
    pub nominates: bool,
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Read the values of a message's `Connection` fields.
pub fn connection_options<'a>(values: impl Iterator<Item = &'a [u8]>) -> ConnectionOptions {
    let mut o = ConnectionOptions::default();
    for v in values {
        o.add(v);
    }
    o
}

/// Whether a `Connection` value names the field `name` away. A framing
/// field never is: the carrier delimits the body it forwards by it, so
/// the next hop must read the same (`Connection: Transfer-Encoding` on a
/// chunked request would otherwise send the chunks as the next request).
/// RFC 9110 7.6.1 forbids nominating a field meant for every recipient;
/// nginx ignores `Connection` options altogether.
pub fn nominated<'a>(name: &[u8], connection_values: impl Iterator<Item = &'a [u8]>) -> bool {
    !framing(name)
        && connection_values
            .flat_map(tokens)
            .any(|t| t.eq_ignore_ascii_case(name))
}

/// `Content-Length` or `Transfer-Encoding`.
pub fn framing(name: &[u8]) -> bool {
    match name.len() {
        14 => name.eq_ignore_ascii_case(b"content-length"),
        17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
        _ => false,
    }
}

/// A field cutover decides itself in every message, which a route's
/// header edits may not set or remove: the framing fields and the
/// connection's own (hop-by-hop, `Upgrade`).
pub fn carrier_field(name: &[u8]) -> bool {
    framing(name) || hop_by_hop(name) || name.eq_ignore_ascii_case(b"upgrade")
}

impl ConnectionOptions {
    /// Add the tokens of one `Connection` value.
    pub fn add(&mut self, value: &[u8]) {
        for token in tokens(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                self.nominates = true;
            }
        }
    }
}

/// Whether a field name starts with `proxy-` (any case).
fn proxy_dash(name: &[u8]) -> bool {
    name.len() > 6 && name[..6].eq_ignore_ascii_case(b"proxy-")
}

/// Hop-by-hop in both directions, whatever `Connection` says. Called for
/// every field of every message: dispatched on the first byte and the
/// length, so a field that is none of them costs a comparison or two.
fn hop_by_hop(name: &[u8]) -> bool {
    let eq = |h: &[u8]| name.eq_ignore_ascii_case(h);
    match name.first().map(u8::to_ascii_lowercase) {
        Some(b'c') => name.len() == 10 && eq(b"connection"),
        Some(b'k') => name.len() == 10 && eq(b"keep-alive"),
        Some(b't') => match name.len() {
            2 => eq(b"te"),
            7 => eq(b"trailer"),
            _ => false,
        },
        Some(b'p') => proxy_dash(name),
        _ => false,
    }
}

/// Whether a request field goes upstream as the client sent it. `upgrade`:
/// this request is a protocol upgrade that cutover forwards (Pingora path
/// only), which keeps `Upgrade`. Fields named by `Connection` are checked
/// separately ([`nominated`]), only when [`ConnectionOptions::nominates`].
pub fn forward_request_field(name: &[u8], upgrade: bool) -> bool {
    let special = match name.first().map(u8::to_ascii_lowercase) {
        Some(b'u') => name.len() == 7 && !upgrade && name.eq_ignore_ascii_case(b"upgrade"),
        Some(b'p') => name.len() == 5 && name.eq_ignore_ascii_case(b"proxy"),
        _ => false,
    };
    !(special || hop_by_hop(name) || name.contains(&b'_'))
}

/// Whether a response field goes to the client as the upstream sent it.
pub fn forward_response_field(name: &[u8], status: u16) -> bool {
    let upgrade = status != 101 && name.len() == 7 && name.eq_ignore_ascii_case(b"upgrade");
    !(upgrade || hop_by_hop(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens() {
        let o = connection_options([&b"keep-alive, X-Secret"[..], b" Close "].into_iter());
        assert!(o.keep_alive && o.close && o.nominates && !o.upgrade);
        let o = connection_options([&b"Upgrade"[..]].into_iter());
        assert!(o.upgrade && !o.nominates);
        assert_eq!(
            connection_options([&b" , "[..]].into_iter()),
            ConnectionOptions::default()
        );
        assert!(nominated(
            b"x-secret",
            [&b"keep-alive, X-Secret"[..]].into_iter()
        ));
        assert!(!nominated(b"x-secret-2", [&b"X-Secret"[..]].into_iter()));
        // A framing field is never named away.
        let framing = [&b"keep-alive, Content-Length, transfer-encoding"[..]];
        assert!(!nominated(b"content-length", framing.into_iter()));
        assert!(!nominated(b"Transfer-Encoding", framing.into_iter()));
    }

    #[test]
    fn request_fields() {
        for dropped in [
            &b"Connection"[..],
            b"keep-alive",
            b"Proxy-Connection",
            b"TE",
            b"Trailer",
            b"Upgrade",
            b"Proxy-Authorization",
            b"Proxy",
            b"X_Forwarded_For",
            b"Transfer_Encoding",
        ] {
            assert!(
                !forward_request_field(dropped, false),
                "{:?}",
                String::from_utf8_lossy(dropped)
            );
        }
        for kept in [
            &b"Host"[..],
            b"Cookie",
            b"X-Forwarded-For",
            b"Content-Length",
            b"Proxyish",
            b"Tex",
        ] {
            assert!(
                forward_request_field(kept, false),
                "{:?}",
                String::from_utf8_lossy(kept)
            );
        }
        assert!(forward_request_field(b"Upgrade", true));
    }

    #[test]
    fn response_fields() {
        assert!(!forward_response_field(b"Keep-Alive", 200));
        assert!(!forward_response_field(b"Proxy-Authenticate", 200));
        assert!(!forward_response_field(b"Upgrade", 200));
        assert!(forward_response_field(b"Upgrade", 101));
        assert!(forward_response_field(b"X_Underscore", 200));
        assert!(forward_response_field(b"Transfer-Encoding", 200));
    }
}

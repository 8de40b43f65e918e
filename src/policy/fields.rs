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
    for token in values.flat_map(tokens) {
        if token.eq_ignore_ascii_case(b"close") {
            o.close = true;
        } else if token.eq_ignore_ascii_case(b"keep-alive") {
            o.keep_alive = true;
        } else if token.eq_ignore_ascii_case(b"upgrade") {
            o.upgrade = true;
        } else {
            o.nominates = true;
        }
    }
    o
}

/// Whether a `Connection` value names the field `name`.
pub fn nominated<'a>(name: &[u8], connection_values: impl Iterator<Item = &'a [u8]>) -> bool {
    connection_values
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case(name))
}

/// Hop-by-hop in both directions, whatever `Connection` says.
fn hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 5] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || (name.len() >= 6 && name[..6].eq_ignore_ascii_case(b"proxy-"))
}

/// Whether a request field goes upstream as the client sent it. `upgrade`:
/// this request is a protocol upgrade that cutover forwards (Pingora path
/// only), which keeps `Upgrade`. Fields named by `Connection` are checked
/// separately ([`nominated`]), only when [`ConnectionOptions::nominates`].
pub fn forward_request_field(name: &[u8], upgrade: bool) -> bool {
    !(hop_by_hop(name)
        || (name.eq_ignore_ascii_case(b"upgrade") && !upgrade)
        || name.eq_ignore_ascii_case(b"proxy")
        || name.contains(&b'_'))
}

/// Whether a response field goes to the client as the upstream sent it.
pub fn forward_response_field(name: &[u8], status: u16) -> bool {
    !(hop_by_hop(name) || (name.eq_ignore_ascii_case(b"upgrade") && status != 101))
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

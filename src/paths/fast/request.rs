//! The client's request head on the fast path: parse, eligibility (what
//! the fast path serves and what it hands to Pingora), routing, and the
//! upstream request it writes.

use std::mem::MaybeUninit;

use super::MAX_REQUEST_HEADERS;
use crate::model::{Model, Upstream};
use crate::policy;
use crate::policy::fields::ConnectionOptions;
use crate::policy::forward::RequestFacts;
use crate::policy::framing::{FramingFields, RequestBody};
use crate::policy::handover::Handover;
use crate::policy::refusal::TargetForm;
use crate::policy::routing::normalize_authority;
use crate::shift::selection::choose;

/// What the client asked for, as far as forwarding needs it.
pub(super) struct Ask<'b> {
    /// The request method, as the client sent it (one the fast path takes).
    pub(super) method: &'b [u8],
    pub(super) head: bool,
    /// How the request body is delimited.
    pub(super) body: RequestBody,
    pub(super) host: &'b [u8],
    pub(super) path: &'b [u8],
    pub(super) client_close: bool,
    /// `Connection` names other fields, which are not forwarded.
    pub(super) nominates: bool,
    /// The client's `X-Forwarded-Proto` (the last one), believed only from
    /// a trusted peer.
    pub(super) proto: Option<&'b [u8]>,
    /// The client used https (known once the model's trust is applied).
    pub(super) https: bool,
    /// The client connection is TLS (a TLS listener).
    pub(super) tls: bool,
}

/// The fast path's part of a request and the route that owns its Host, or
/// why the request is not one it serves.
pub(super) fn route_request<'b>(
    req: &httparse::Request<'_, 'b>,
    model: &Model,
) -> Result<(Ask<'b>, usize), Handover> {
    let ask = eligible(req)?;
    let host = normalize_authority(ask.host).map_err(|_| Handover::Host)?;
    let route = model
        .hosts
        .route_for_host(host.as_str())
        .ok_or(Handover::Host)?;
    Ok((ask, route))
}

/// The per-request work of the fast path that needs no I/O, for the
/// benchmarks: parse a request head, check and route it, and write the
/// upstream request into `out`; `false` if it would be handed over.
pub fn prepare_request(head: &[u8], model: &Model, peer: Option<&str>, out: &mut Vec<u8>) -> bool {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
    let Some(req) = parse_request(head, &mut headers) else {
        return false;
    };
    let Ok((ask, route_idx)) = route_request(&req, model) else {
        return false;
    };
    let route = &model.routes[route_idx];
    let Some(idx) = choose(&route.upstreams, 0, None) else {
        return false;
    };
    build_request(out, &req, &ask, &route.upstreams[idx], peer, None);
    true
}

/// A whole request head, exactly `buf`; `None` for anything else. The header
/// array is left uninitialised (httparse fills what it uses): zeroing 64
/// entries on every request showed up in the profile.
pub(super) fn parse_request<'h, 'b>(
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Option<httparse::Request<'h, 'b>> {
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, headers) {
        Ok(httparse::Status::Complete(n)) if n == buf.len() => Some(req),
        _ => None,
    }
}

/// The methods the fast path carries; any other (CONNECT, TRACE, an
/// extension method) goes to the Pingora path, which refuses or carries it.
const FAST_METHODS: [&[u8]; 7] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
];

/// The request line and headers the fast path forwards, or why the request
/// is not one it serves ([`Handover`]). What it does not serve goes to the
/// Pingora path, which applies the same policy and refuses what must be
/// refused.
pub(super) fn eligible<'b>(req: &httparse::Request<'_, 'b>) -> Result<Ask<'b>, Handover> {
    if req.version != Some(1) {
        return Err(Handover::Version);
    }
    let method = req.method.ok_or(Handover::Malformed)?.as_bytes();
    if !FAST_METHODS.contains(&method) {
        return Err(Handover::Method);
    }
    let path = req.path.ok_or(Handover::Malformed)?.as_bytes();
    if policy::refusal::request_target(method, path) != Ok(TargetForm::Origin) {
        return Err(Handover::TargetForm);
    }
    // One pass over the fields; what the policy decides from them is decided
    // by the policy's own collectors.
    let mut framing = FramingFields::default();
    let mut connection = ConnectionOptions::default();
    let mut host = None;
    let mut proto = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if framing.add(name, h.value) {
            continue;
        }
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") && host.replace(h.value).is_some() => {
                return Err(Handover::Host);
            }
            10 if name.eq_ignore_ascii_case(b"connection") => connection.add(h.value),
            6 if name.eq_ignore_ascii_case(b"expect") => return Err(Handover::Expect),
            7 if name.eq_ignore_ascii_case(b"upgrade") => return Err(Handover::Upgrade),
            17 if name.eq_ignore_ascii_case(b"x-forwarded-proto") => proto = Some(h.value),
            _ => {}
        }
    }
    // Framing the policy refuses goes to Pingora, which answers it.
    let body = framing.request_body(false).map_err(|_| Handover::Body)?;
    if connection.upgrade {
        return Err(Handover::Upgrade);
    }
    Ok(Ask {
        method,
        head: method == b"HEAD",
        body,
        host: host.ok_or(Handover::Host)?,
        path,
        client_close: connection.close,
        nominates: connection.nominates,
        proto,
        https: false,
        tls: false,
    })
}

/// The upstream request: the request line as received (origin-form, so
/// already what goes upstream), then the fields as the upstream's
/// forwarding plan lists them ([`crate::policy::forward`]).
pub(super) fn build_request(
    out: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    ask: &Ask<'_>,
    up: &Upstream,
    peer: Option<&str>,
    client: Option<std::net::IpAddr>,
) {
    let client = client
        .filter(|_| up.plan.wants_client())
        .map(crate::policy::client_ip::IpText::new);
    out.clear();
    out.reserve(2048);
    out.extend_from_slice(ask.method);
    out.push(b' ');
    out.extend_from_slice(ask.path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let facts = RequestFacts {
        authority: ask.host,
        peer: peer.map(str::as_bytes),
        client: client.as_ref().map(|c| c.as_bytes()),
        tls: ask.tls,
        upgrade: false,
        nominates: ask.nominates,
    };
    let fields = req.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    up.plan.request(&facts, fields, out);
    out.extend_from_slice(b"\r\n");
}

pub(super) fn header_values<'a>(
    req: &'a httparse::Request<'_, '_>,
    name: Option<&'a str>,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    req.headers
        .iter()
        .filter(move |h| name.is_some_and(|n| h.name.eq_ignore_ascii_case(n)))
        .map(|h| h.value)
}

pub(super) fn header_str<'a>(req: &'a httparse::Request<'_, '_>, name: &str) -> &'a str {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_model;

    fn eligibility(head: &str) -> Result<(), Handover> {
        let mut headers = [const { MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
        let req = parse_request(head.as_bytes(), &mut headers).ok_or(Handover::Malformed)?;
        route_request(&req, &test_model()).map(|_| ())
    }

    #[test]
    fn what_the_fast_path_serves_and_why_it_hands_the_rest_over() {
        use Handover::*;
        let h = "Host: cdn.example.test\r\n";
        for (head, want) in [
            (format!("GET / HTTP/1.1\r\n{h}\r\n"), Ok(())),
            (format!("HEAD /a?b HTTP/1.1\r\n{h}\r\n"), Ok(())),
            (
                format!("GET / HTTP/1.1\r\n{h}Content-Length: 0\r\n\r\n"),
                Ok(()),
            ),
            (format!("POST / HTTP/1.1\r\n{h}\r\n"), Ok(())),
            (
                format!("PUT /x HTTP/1.1\r\n{h}Content-Length: 3\r\n\r\n"),
                Ok(()),
            ),
            (format!("DELETE /x HTTP/1.1\r\n{h}\r\n"), Ok(())),
            (format!("CONNECT / HTTP/1.1\r\n{h}\r\n"), Err(Method)),
            (format!("TRACE / HTTP/1.1\r\n{h}\r\n"), Err(Method)),
            (format!("PURGE / HTTP/1.1\r\n{h}\r\n"), Err(Method)),
            (format!("OPTIONS * HTTP/1.1\r\n{h}\r\n"), Err(TargetForm)),
            (format!("GET / HTTP/1.0\r\n{h}\r\n"), Err(Version)),
            (
                format!("GET / HTTP/1.1\r\n{h}Content-Length: 3\r\n\r\n"),
                Ok(()),
            ),
            (
                format!("POST / HTTP/1.1\r\n{h}Content-Length: 3\r\nContent-Length: 3\r\n\r\n"),
                Err(Body),
            ),
            (
                format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n"),
                Ok(()),
            ),
            (
                format!(
                    "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                ),
                Err(Body),
            ),
            (
                format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: gzip, chunked\r\n\r\n"),
                Err(Body),
            ),
            (
                format!("GET / HTTP/1.1\r\n{h}Upgrade: websocket\r\n\r\n"),
                Err(Upgrade),
            ),
            (
                format!("GET / HTTP/1.1\r\n{h}Connection: Upgrade\r\n\r\n"),
                Err(Upgrade),
            ),
            (
                format!("GET / HTTP/1.1\r\n{h}Expect: 100-continue\r\n\r\n"),
                Err(Expect),
            ),
            (
                format!("GET http://cdn.example.test/ HTTP/1.1\r\n{h}\r\n"),
                Err(TargetForm),
            ),
            (format!("GET * HTTP/1.1\r\n{h}\r\n"), Err(TargetForm)),
            ("GET / HTTP/1.1\r\n\r\n".to_string(), Err(Host)),
            (format!("GET / HTTP/1.1\r\n{h}{h}\r\n"), Err(Host)),
            (
                "GET / HTTP/1.1\r\nHost: other.test\r\n\r\n".to_string(),
                Err(Host),
            ),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_string(), Err(Host)),
            (
                format!("GET / HTTP/1.1\r\n{h}Bad Name: x\r\n\r\n"),
                Err(Malformed),
            ),
        ] {
            assert_eq!(eligibility(&head), want, "{head:?}");
        }
    }

    #[test]
    fn the_upstream_request_byte_for_byte() {
        let model = test_model();
        let head = b"GET /p?q=1 HTTP/1.1\r\nHost: CDN.example.test\r\nUser-Agent: t\r\n\
            X-Forwarded-For: 192.0.2.9\r\nCookie: s=1\r\nTE: trailers\r\n\
            Connection: X-Hop\r\nX-Hop: 1\r\nAccept: */*\r\n\r\n";
        let mut out = Vec::new();
        assert!(prepare_request(head, &model, Some("127.0.0.1"), &mut out));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?q=1 HTTP/1.1\r\nHost: cdn-new.example.test\r\nUser-Agent: t\r\n\
             Accept: */*\r\nX-Forwarded-For: 192.0.2.9, 127.0.0.1\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Host: CDN.example.test\r\n\
             X-Migration: test\r\n\r\n"
        );
    }
}

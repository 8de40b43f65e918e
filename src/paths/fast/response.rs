//! The upstream's response head on the fast path: read, checked against the
//! process policy, and the head the client gets.

use std::mem::MaybeUninit;
use std::time::Duration;

use pingora::protocols::Stream;

use super::body::Framing;
use super::chunked::ChunkedEnd;
use super::head::{head_end_and_folds, Unfolding};
use super::timer::Timer;
use super::{MAX_HEAD, MAX_RESPONSE_HEADERS, READ_CHUNK};
use crate::policy::cdn::CdnFacts;
use crate::policy::deleak::Public;
use crate::policy::failure::ErrorKind;
use crate::policy::fields::ConnectionOptions;
use crate::policy::forward::Findings;
use crate::policy::forward::{Plan, ResponseFacts};
use crate::policy::framing::{FramingFields, ResponseBody};

/// The same for a response head from the upstream: parse it, find its
/// framing, and write the head the client gets into `out`; `false` if the
/// upstream's head is refused (or is an interim one).
pub fn prepare_response(head: &[u8], plan: &Plan, out: &mut Vec<u8>) -> bool {
    let Some((end, folded)) = head_end_and_folds(head) else {
        return false;
    };
    matches!(
        client_head(&head[..end], folded, false, plan, &BENCH_CLIENT, false, out),
        Ok(UpstreamHead::Final { .. })
    )
}

/// What a response head from the upstream is, for the fast path.
pub(super) enum UpstreamHead {
    /// 1xx (other than 101): skipped, the final response follows.
    Interim,
    /// The final response; its head for the client is in `out`.
    Final {
        status: u16,
        framing: ResponseFraming,
        /// What the de-leak rewrote ([`crate::policy::deleak`]) and who
        /// answered.
        findings: Findings,
    },
}

/// The client the benchmarks and fuzzers stand for.
const BENCH_CLIENT: Public<'static> = Public {
    authority: b"cdn.example.test",
    https: false,
};

/// Read one whole response head (`head`, exactly; `folded`: it holds an
/// obs-fold), check it against the process policy, and for a final response
/// write the head the client gets into `out`; `Err` with the cause when it
/// must not be relayed (502).
pub(super) fn client_head(
    head: &[u8],
    folded: bool,
    head_request: bool,
    plan: &Plan,
    public: &Public<'_>,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<UpstreamHead, String> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let resp = parse_response(head, &mut headers).ok_or("malformed response head")?;
    let status = resp.code.unwrap_or(0);
    if status == 101 || !(100..=599).contains(&status) {
        return Err(format!("unusable status {status}"));
    }
    if status < 200 {
        return Ok(UpstreamHead::Interim);
    }
    let framing =
        response_framing(&resp, head_request).map_err(|why| format!("response framing: {why}"))?;
    let findings = build_response_head(out, &resp, plan, &framing, public, close, folded);
    Ok(UpstreamHead::Final {
        status,
        framing,
        findings,
    })
}

/// For the fuzzers: what [`client_head`] makes of `head` — the final
/// status and the client's head in `out`, or why it is refused; `Ok(None)`
/// for an interim head.
#[doc(hidden)]
pub fn client_head_for_fuzzing(
    head: &[u8],
    head_request: bool,
    plan: &Plan,
    out: &mut Vec<u8>,
) -> Result<Option<u16>, String> {
    // The fast path reads up to the first empty line, and hands exactly
    // that to `client_head`: so does this.
    let (end, folded) = head_end_and_folds(head).ok_or("incomplete head")?;
    client_head(
        &head[..end],
        folded,
        head_request,
        plan,
        &BENCH_CLIENT,
        false,
        out,
    )
    .map(|h| match h {
        UpstreamHead::Interim => None,
        UpstreamHead::Final { status, .. } => Some(status),
    })
}

/// The same for a response head, read as the Pingora path reads it (RFC
/// 9112 5.1, 5.2 allow a proxy this, provided what it forwards is
/// canonical): whitespace before a field's colon is accepted and dropped,
/// and an obs-fold is accepted and forwarded as one space.
pub(super) fn parse_response<'h, 'b>(
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Option<httparse::Response<'h, 'b>> {
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .parse_response_with_uninit_headers(&mut resp, buf, headers);
    match parsed {
        Ok(httparse::Status::Complete(n)) if n == buf.len() => Some(resp),
        _ => None,
    }
}

/// The response head for the client: the upstream's status line, then
/// the fields as the forwarding plan lists them ([`crate::policy::forward`]),
/// each obs-fold of a value written as one space.
pub(super) fn build_response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    plan: &Plan,
    framing: &ResponseFraming,
    public: &Public<'_>,
    close: bool,
    folded: bool,
) -> Findings {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code = itoa::Buffer::new();
    let status = resp.code.unwrap_or(502);
    out.extend_from_slice(code.format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let date = pingora::protocols::http::date::get_cached_date();
    let facts = ResponseFacts {
        status,
        drop_content_length: framing.drop_content_length,
        nominates: framing.nominates,
        date: date.as_bytes(),
        close: close || matches!(framing.body, Framing::Close),
        public: *public,
    };
    let fields = resp.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let findings = if folded {
        plan.response(&facts, fields, &mut Unfolding(out))
    } else {
        plan.response(&facts, fields, out)
    };
    out.extend_from_slice(b"\r\n");
    findings
}

/// A response's framing as the fast path relays it.
pub(super) struct ResponseFraming {
    pub(super) body: Framing,
    pub(super) reusable: bool,
    pub(super) drop_content_length: bool,
    /// The response's `Connection` names fields that are not forwarded.
    pub(super) nominates: bool,
    /// What the CDN's own fields say.
    pub(super) cdn: CdnFacts,
}

/// How the body is delimited (the process policy), and whether the upstream
/// connection may be reused after it; `Err` with the reason for a response
/// whose framing could be read two ways.
pub(super) fn response_framing(
    resp: &httparse::Response<'_, '_>,
    head_request: bool,
) -> Result<ResponseFraming, &'static str> {
    let mut framing = FramingFields::default();
    let mut connection = ConnectionOptions::default();
    let mut cdn = CdnFacts::default();
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if !framing.add(name, h.value) {
            if name.eq_ignore_ascii_case(b"connection") {
                connection.add(h.value);
            } else {
                cdn.add(name, h.value);
            }
        }
    }
    let f = framing.response_body(
        resp.code.unwrap_or(0),
        head_request,
        resp.version != Some(1),
        connection.close,
    )?;
    Ok(ResponseFraming {
        body: match f.body {
            ResponseBody::None => Framing::None,
            ResponseBody::Length(n) => Framing::Length(n),
            ResponseBody::Chunked => Framing::Chunked(ChunkedEnd::default()),
            ResponseBody::UntilClose => Framing::Close,
        },
        reusable: f.reusable,
        drop_content_length: f.drop_content_length,
        nominates: connection.nominates,
        cdn,
    })
}

pub(super) enum HeadError {
    Io(std::io::Error),
    Timeout,
    TooLarge,
}

impl HeadError {
    pub(super) fn kind(&self) -> ErrorKind {
        match self {
            HeadError::Io(_) => ErrorKind::Reset,
            HeadError::Timeout => ErrorKind::Timeout,
            HeadError::TooLarge => ErrorKind::Other,
        }
    }
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::Io(e) => write!(f, "reading the response head: {e}"),
            HeadError::Timeout => f.write_str("no response head within the read timeout"),
            HeadError::TooLarge => f.write_str("response head too large"),
        }
    }
}

/// Read until `buf` holds a whole response head; its length, and whether it
/// holds an obs-fold.
pub(super) async fn read_response_head(
    ups: &mut Stream,
    buf: &mut Vec<u8>,
    timer: &mut Timer,
    limit: Duration,
) -> Result<(usize, bool), HeadError> {
    loop {
        if let Some(found) = head_end_and_folds(buf) {
            return Ok(found);
        }
        if buf.len() >= MAX_HEAD * 4 {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(READ_CHUNK);
        match timer
            .within(limit, crate::model::peer::read_when_ready(ups, buf))
            .await
        {
            Err(_) => return Err(HeadError::Timeout),
            Ok(Err(e)) => return Err(HeadError::Io(e)),
            Ok(Ok(0)) => {
                return Err(HeadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_model;

    /// The client's head for `head` (Date masked), or why it is refused.
    fn relayed(head: &str, head_request: bool) -> Result<Option<String>, String> {
        let model = test_model();
        let mut out = Vec::new();
        let plan = &model.routes[0].upstreams[0].plan;
        client_head_for_fuzzing(head.as_bytes(), head_request, plan, &mut out).map(|status| {
            status.map(|_| {
                let text = String::from_utf8(out).unwrap();
                let date = text.find("Date: ").unwrap();
                let end = date + text[date..].find("\r\n").unwrap();
                format!("{}Date: -{}", &text[..date], &text[end..])
            })
        })
    }

    #[test]
    fn the_client_head_byte_for_byte() {
        assert_eq!(
            relayed(
                "HTTP/1.1 200 OK\r\nServer: origin\r\nContent-Length: 2\r\nKeep-Alive: t=5\r\n\
                 Date: Mon, 01 Jan 2001 00:00:00 GMT\r\nConnection: X-A\r\nX-A: 1\r\n\
                 X-Folded: a\r\n  b\r\n\r\n",
                false
            ),
            Ok(Some(
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: a b\r\n\
                 X-Served-Via: cutover\r\nDate: -\r\nConnection: keep-alive\r\n\r\n"
                    .into()
            ))
        );
        // Until close: the client connection closes after it.
        assert_eq!(
            relayed("HTTP/1.1 200 OK\r\n\r\n", false),
            Ok(Some(
                "HTTP/1.1 200 OK\r\nX-Served-Via: cutover\r\nDate: -\r\nConnection: close\r\n\r\n"
                    .into()
            ))
        );
    }

    #[test]
    fn a_chunked_response_loses_its_content_length() {
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let out = relayed(head, false).unwrap().unwrap();
        assert!(out.contains("\r\nTransfer-Encoding: chunked\r\n"), "{out}");
        assert!(!out.contains("Content-Length"), "{out}");
    }

    #[test]
    fn heads_that_are_not_relayed() {
        assert_eq!(relayed("HTTP/1.1 100 Continue\r\n\r\n", false), Ok(None));
        for head in [
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            // Two empty lines first: the head read ends there (httparse
            // would skip one empty line and read on).
            "\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 600 Odd\r\n\r\n",
        ] {
            assert!(relayed(head, false).is_err(), "{head:?} was relayed");
        }
    }
}

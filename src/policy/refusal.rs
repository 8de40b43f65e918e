//! Requests cutover answers itself, before anything is forwarded, and the
//! checks that decide them. Both carriers call the checks; the Pingora path
//! renders the refusal (the fast path hands such requests over to it).

/// Why a request is refused. Each is counted in
/// `cutover_rejected_requests_total{reason}` and closes the connection: a
/// client that sent one malformed request on a connection (or the ALB that
/// shares it) starts afresh, as nginx does after a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `CONNECT`: cutover is not a forward proxy (405).
    ConnectMethod = 0,
    /// No Host, several, or one that is not a host name (400).
    BadHost = 1,
    /// A target that is neither origin-form, `http(s)://` absolute-form, nor
    /// `*` for OPTIONS (400).
    BadTarget = 2,
    /// Content-Length / Transfer-Encoding that could be read two ways (400).
    BadFraming = 3,
    /// A head larger than [`MAX_REQUEST_HEAD`] (431).
    HeadTooLarge = 4,
    /// A head Pingora's HTTP/1 parser refuses before any hook runs: a bad
    /// request line or field, two Host fields, an unparseable or conflicting
    /// Content-Length (400, answered by Pingora).
    Malformed = 5,
    /// A request head still incomplete after the listener's
    /// `header_timeout` (408, then the connection is closed).
    HeaderTimeout = 6,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::ConnectMethod,
        Refusal::BadHost,
        Refusal::BadTarget,
        Refusal::BadFraming,
        Refusal::HeadTooLarge,
        Refusal::Malformed,
        Refusal::HeaderTimeout,
    ];

    pub fn status(self) -> u16 {
        match self {
            Refusal::ConnectMethod => 405,
            Refusal::HeadTooLarge => 431,
            Refusal::HeaderTimeout => 408,
            Refusal::BadHost | Refusal::BadTarget | Refusal::BadFraming | Refusal::Malformed => 400,
        }
    }

    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ConnectMethod => "connect_method",
            Refusal::BadHost => "bad_host",
            Refusal::BadTarget => "bad_target",
            Refusal::BadFraming => "bad_framing",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::Malformed => "malformed",
            Refusal::HeaderTimeout => "header_timeout",
        }
    }

    /// The one-line body the client gets.
    pub fn body(self) -> &'static str {
        match self {
            Refusal::ConnectMethod => "cutover: CONNECT is not supported\n",
            Refusal::BadHost => "cutover: the request needs exactly one valid Host\n",
            Refusal::BadTarget => "cutover: the request target must be a path (or an http(s) URL)\n",
            Refusal::BadFraming => {
                "cutover: the request body length is ambiguous (Content-Length / Transfer-Encoding)\n"
            }
            Refusal::HeadTooLarge => "cutover: the request head is too large\n",
            Refusal::Malformed => "cutover: the request is not valid HTTP/1.1\n",
            Refusal::HeaderTimeout => "cutover: the request head did not arrive in time\n",
        }
    }
}

/// What a connection past its listener's `max_connections` gets, at once
/// and before anything is read: `503` with `Retry-After`, and the
/// connection closed (nginx's `limit_conn` answers 503 too; HAProxy and
/// nginx's `worker_connections` instead stop accepting, which behind a
/// load balancer shows up as connect timeouts nobody counts). A load
/// balancer passes the 503 on, or retries another target.
pub const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 47\r\nRetry-After: 1\r\nConnection: close\r\n\r\ncutover: too many connections on this listener\n";

/// The largest request head cutover forwards (request line and fields, as
/// received). nginx's default allows at most 32 KiB (`large_client_header_buffers
/// 4 8k`); CloudFront refuses more than 20 KiB of headers anyway.
pub const MAX_REQUEST_HEAD: usize = 32 * 1024;

/// The forms of a request target (RFC 9112 3.2) cutover forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetForm {
    /// `/path?query`
    Origin,
    /// `http://authority/path` (routed by its authority, sent as origin-form)
    Absolute,
    /// `*`, with OPTIONS only
    Asterisk,
}

pub fn request_target(method: &[u8], target: &[u8]) -> Result<TargetForm, &'static str> {
    if target.first() == Some(&b'/') {
        return Ok(TargetForm::Origin);
    }
    if target == b"*" {
        return if method == b"OPTIONS" {
            Ok(TargetForm::Asterisk)
        } else {
            Err("`*` target with a method other than OPTIONS")
        };
    }
    let scheme_end = target
        .iter()
        .position(|&b| b == b':')
        .ok_or("target is not a path")?;
    let scheme = &target[..scheme_end];
    if (scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https"))
        && target[scheme_end..].starts_with(b"://")
    {
        Ok(TargetForm::Absolute)
    } else {
        Err("absolute target with a scheme other than http(s)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_capacity_answer_is_one_whole_response() {
        let m = match crate::rehearsal::strict::read_response(OVER_CAPACITY, false, false) {
            crate::rehearsal::strict::Read::Complete(m) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!((m.status(), m.len), (503, OVER_CAPACITY.len()));
        assert_eq!(m.header("connection"), Some(&b"close"[..]));
    }

    #[test]
    fn target_forms() {
        assert_eq!(request_target(b"GET", b"/a?b"), Ok(TargetForm::Origin));
        assert_eq!(
            request_target(b"GET", b"http://x/a"),
            Ok(TargetForm::Absolute)
        );
        assert_eq!(
            request_target(b"GET", b"HTTPS://x"),
            Ok(TargetForm::Absolute)
        );
        assert_eq!(request_target(b"OPTIONS", b"*"), Ok(TargetForm::Asterisk));
        assert!(request_target(b"GET", b"*").is_err());
        assert!(request_target(b"GET", b"ftp://x/").is_err());
        assert!(request_target(b"GET", b"a/b").is_err());
        assert!(request_target(b"GET", b"http:x").is_err());
        assert!(request_target(b"GET", b"").is_err());
    }

    #[test]
    fn every_refusal_has_a_status_a_label_and_a_line() {
        for r in Refusal::ALL {
            assert!((400..500).contains(&r.status()));
            assert!(!r.reason().is_empty() && r.body().ends_with('\n'));
            assert_eq!(Refusal::ALL[r as usize], r);
        }
    }
}

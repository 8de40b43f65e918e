//! The forwarding plan: which fields, in which order, cutover sends upstream
//! for a request and to the client for a response. Built once per (route,
//! upstream) when the model is built; each carrier only renders what it
//! yields into its own representation (the fast path into bytes, the
//! Pingora path into a `RequestHeader`/`ResponseHeader`), through
//! [`HeadWriter`].
//!
//! A request goes upstream as:
//!
//! ```text
//! METHOD origin-form-target HTTP/1.1      (written by the carrier)
//! Host: <upstream host_header, else the client's>
//! <the client's fields, in the order received, minus those below>
//! X-Forwarded-For: <the client's values>, <the TCP peer>
//! X-Forwarded-Proto: http | https
//! X-Forwarded-Host: <the client's Host>
//! <the route's `request_headers.set`, in config order>
//! ```
//!
//! Dropped from the client's fields: `Host` and the three `X-Forwarded-*`
//! (written above), every field a route edit sets or removes, hop-by-hop
//! fields and those the client's `Connection` names ([`super::fields`]). A
//! route edit that sets or removes an `X-Forwarded-*` field takes it over.
//!
//! A response goes to the client as the upstream's status line and fields
//! in the order received, minus hop-by-hop fields, those its `Connection`
//! names, `Date`, those the route's `response_headers` edit, and a
//! `Content-Length` the framing policy drops; then the route's set
//! edits, `Date` from cutover's clock (as nginx and Pingora do), and
//! `Connection: keep-alive` or `close`. `Location`, `Content-Location`,
//! `Refresh` and `Set-Cookie` values that name an upstream's host are
//! rewritten on the way ([`super::deleak`]).

use http::{HeaderName, HeaderValue};

use std::sync::Arc;

use super::deleak::{self, Field, Names, Outcome, Public, Rewrites};
use super::fields::{forward_request_field, forward_response_field, nominated};
use super::marker::{Marker, Seen};
use crate::config::{HeaderEdits, RewriteMode, XffMode};

/// Where a carrier renders a head, one field at a time.
pub trait HeadWriter {
    fn field(&mut self, name: &[u8], value: &[u8]);
    /// One field whose value is `values` joined by `", "`.
    fn list<'v>(&mut self, name: &[u8], values: impl Iterator<Item = &'v [u8]>);
}

/// The wire format, for the fast path.
impl HeadWriter for Vec<u8> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.extend_from_slice(name);
        self.extend_from_slice(b": ");
        self.extend_from_slice(value);
        self.extend_from_slice(b"\r\n");
    }

    fn list<'v>(&mut self, name: &[u8], values: impl Iterator<Item = &'v [u8]>) {
        self.extend_from_slice(name);
        self.extend_from_slice(b": ");
        for (i, v) in values.enumerate() {
            if i > 0 {
                self.extend_from_slice(b", ");
            }
            self.extend_from_slice(v);
        }
        self.extend_from_slice(b"\r\n");
    }
}

/// One direction's route edits, with the names in the case they are
/// written in (`x-migration` → `X-Migration`).
#[derive(Debug, Clone, Default)]
struct Edits {
    set: Vec<(Vec<u8>, HeaderValue)>,
    /// Every name the edits set or remove, lower case.
    names: Vec<HeaderName>,
}

impl Edits {
    fn new(edits: &HeaderEdits) -> Self {
        Self {
            set: edits
                .set
                .iter()
                .map(|(n, v)| (titled(n.as_str()), v.clone()))
                .collect(),
            names: edits
                .remove
                .iter()
                .chain(edits.set.iter().map(|(n, _)| n))
                .cloned()
                .collect(),
        }
    }

    fn edits(&self, name: &[u8]) -> bool {
        self.names
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
    }
}

/// `x-forwarded-for` → `X-Forwarded-For`.
fn titled(name: &str) -> Vec<u8> {
    let mut up = true;
    name.bytes()
        .map(|b| {
            let c = if up { b.to_ascii_uppercase() } else { b };
            up = b == b'-';
            c
        })
        .collect()
}

const XFF: &[u8] = b"X-Forwarded-For";
const XFP: &[u8] = b"X-Forwarded-Proto";
const XFH: &[u8] = b"X-Forwarded-Host";

/// What cutover sends for one (route, upstream).
#[derive(Debug, Clone)]
pub struct Plan {
    /// The upstream's `host_header`; `None` keeps the client's.
    host: Option<HeaderValue>,
    request: Edits,
    response: Edits,
    /// Which `X-Forwarded-*` fields cutover writes (a route edit of one
    /// takes it over), and what its `X-Forwarded-For` says.
    xff: bool,
    xff_mode: XffMode,
    xfp: bool,
    xfh: bool,
    /// Response fields naming these hosts are rewritten to the client's
    /// ([`super::deleak`]), or only counted.
    deleak: RewriteMode,
    names: Arc<Names>,
    /// The upstream's `expect_header` ([`super::marker`]).
    marker: Option<Marker>,
}

/// What [`Plan::response`] found in a response head besides rendering it.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    /// Fields that named an upstream's host (rewritten, or only counted).
    pub rewrites: Rewrites,
    /// Who answered, by the upstream's `expect_header`.
    pub marker: Seen,
}

/// What a carrier knows about the request, for [`Plan::request`].
pub struct RequestFacts<'a> {
    /// The client's authority (its `Host`, or an absolute-form target's).
    pub authority: &'a [u8],
    /// The TCP peer, as text.
    pub peer: Option<&'a [u8]>,
    /// The client's address as cutover takes it (after `client_ip`
    /// trust), as text; read only with `forward: replace`.
    pub client: Option<&'a [u8]>,
    /// The client connection is TLS.
    pub tls: bool,
    /// A protocol upgrade cutover forwards: `Upgrade` stays, and
    /// `Connection: Upgrade` is written again.
    pub upgrade: bool,
    /// The client's `Connection` names other fields.
    pub nominates: bool,
}

/// What a carrier knows about the response, for [`Plan::response`].
pub struct ResponseFacts<'a> {
    pub status: u16,
    /// The framing policy drops the upstream's `Content-Length`.
    pub drop_content_length: bool,
    /// The upstream's `Connection` names other fields.
    pub nominates: bool,
    /// `Date` for the client (cutover's clock).
    pub date: &'a [u8],
    /// This is the client connection's last response.
    pub close: bool,
    /// Where the client sent the request, for rewritten URLs.
    pub public: Public<'a>,
}

fn is(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len() && name.eq_ignore_ascii_case(lower)
}

impl Plan {
    pub fn new(
        host: Option<HeaderValue>,
        request: &HeaderEdits,
        response: &HeaderEdits,
        xff_mode: XffMode,
        deleak: RewriteMode,
        names: Arc<Names>,
    ) -> Plan {
        let request = Edits::new(request);
        Plan {
            deleak,
            names,
            host,
            xff: !request.edits(b"x-forwarded-for"),
            xff_mode,
            xfp: !request.edits(b"x-forwarded-proto"),
            xfh: !request.edits(b"x-forwarded-host"),
            request,
            response: Edits::new(response),
            marker: None,
        }
    }

    /// Check the upstream's responses for its `expect_header`.
    pub fn with_marker(mut self, marker: Option<Marker>) -> Plan {
        self.marker = marker;
        self
    }

    /// Whether [`RequestFacts::client`] is read (`forward: replace`).
    pub fn wants_client(&self) -> bool {
        self.xff && self.xff_mode == XffMode::Replace
    }

    /// The `Host` sent upstream.
    pub fn host<'a>(&'a self, authority: &'a [u8]) -> &'a [u8] {
        self.host.as_ref().map_or(authority, |h| h.as_bytes())
    }

    /// Render the request's fields (after the request line) into `out`.
    /// `fields` are the client's, in the order received.
    pub fn request<'f, I, W>(&self, facts: &RequestFacts<'_>, fields: I, out: &mut W)
    where
        I: Iterator<Item = (&'f [u8], &'f [u8])> + Clone,
        W: HeadWriter,
    {
        out.field(b"Host", self.host(facts.authority));
        let connection = || {
            fields
                .clone()
                .filter(|(n, _)| is(n, b"connection"))
                .map(|(_, v)| v)
        };
        for (name, value) in fields.clone() {
            let ours = match name.len() {
                4 => is(name, b"host"),
                15 => is(name, b"x-forwarded-for"),
                16 => is(name, b"x-forwarded-host"),
                17 => is(name, b"x-forwarded-proto"),
                _ => false,
            };
            let dropped = ours
                || !forward_request_field(name, facts.upgrade)
                || self.request.edits(name)
                || (facts.nominates && nominated(name, connection()));
            if !dropped {
                out.field(name, value);
            }
        }
        if facts.upgrade {
            out.field(b"Connection", b"Upgrade");
        }
        if self.xff {
            let client = fields
                .clone()
                .filter(|(n, _)| is(n, b"x-forwarded-for"))
                .map(|(_, v)| v.trim_ascii())
                .filter(|v| !v.is_empty());
            match self.xff_mode {
                XffMode::Append => {
                    let mut values = client.chain(facts.peer).peekable();
                    if values.peek().is_some() {
                        out.list(XFF, values);
                    }
                }
                XffMode::Replace => {
                    if let Some(c) = facts.client.or(facts.peer) {
                        out.field(XFF, c);
                    }
                }
                XffMode::Preserve => {
                    let mut values = client.peekable();
                    if values.peek().is_some() {
                        out.list(XFF, values);
                    }
                }
            }
        }
        if self.xfp {
            out.field(XFP, if facts.tls { b"https" } else { b"http" });
        }
        if self.xfh {
            out.field(XFH, facts.authority);
        }
        for (name, value) in &self.request.set {
            out.field(name, value.as_bytes());
        }
    }

    /// Render the response's fields (after the status line) into `out`.
    /// `fields` are the upstream's, in the order received. What it
    /// rewrote (or, in detect mode, would have) and who answered come back
    /// for counting.
    pub fn response<'f, I, W>(&self, facts: &ResponseFacts<'_>, fields: I, out: &mut W) -> Findings
    where
        I: Iterator<Item = (&'f [u8], &'f [u8])> + Clone,
        W: HeadWriter,
    {
        let connection = || {
            fields
                .clone()
                .filter(|(n, _)| is(n, b"connection"))
                .map(|(_, v)| v)
        };
        let mut rewrites = Rewrites::default();
        let mut marker = match self.marker {
            Some(_) => Seen::Missing,
            None => Seen::Unchecked,
        };
        let mut scratch = Vec::new();
        for (name, value) in fields.clone() {
            if let Some(m) = &self.marker {
                m.add(&mut marker, name, value);
            }
            let ours = match name.len() {
                4 => is(name, b"date"),
                14 => facts.drop_content_length && is(name, b"content-length"),
                _ => false,
            };
            let dropped = ours
                || !forward_response_field(name, facts.status)
                || self.response.edits(name)
                || (facts.nominates && nominated(name, connection()));
            if dropped {
                continue;
            }
            match Field::of(name).filter(|_| self.deleak != RewriteMode::Off) {
                None => out.field(name, value),
                Some(field) => {
                    let outcome =
                        deleak::rewrite(field, value, &self.names, &facts.public, &mut scratch);
                    rewrites.add(field, &outcome);
                    if outcome == Outcome::Rewritten && self.deleak == RewriteMode::Rewrite {
                        out.field(name, &scratch);
                    } else {
                        out.field(name, value);
                    }
                }
            }
        }
        for (name, value) in &self.response.set {
            out.field(name, value.as_bytes());
        }
        out.field(b"Date", facts.date);
        if facts.status == 101 {
            out.field(b"Connection", b"Upgrade");
        } else {
            out.field(
                b"Connection",
                if facts.close { b"close" } else { b"keep-alive" },
            );
        }
        Findings { rewrites, marker }
    }
}

/// An answer cutover makes itself (a refusal, or a failure to proxy):
/// its fields after the status line.
pub fn answer<W: HeadWriter>(body: &[u8], date: &[u8], out: &mut W) {
    if !body.is_empty() {
        out.field(b"Content-Type", b"text/plain; charset=utf-8");
    }
    let mut len = itoa::Buffer::new();
    out.field(b"Content-Length", len.format(body.len()).as_bytes());
    out.field(b"Cache-Control", b"private, no-store");
    out.field(b"Date", date);
    out.field(b"Connection", b"close");
}

/// A whole answer of cutover's own with no body (a failure to proxy, a
/// head timeout): status line, [`answer`]'s fields, and the empty line.
pub fn answer_message(status: u16) -> Arc<[u8]> {
    let mut head = Vec::with_capacity(160);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    head.push(b' ');
    head.extend_from_slice(reason(status).as_bytes());
    head.extend_from_slice(b"\r\n");
    let date = pingora::protocols::http::date::get_cached_date();
    answer(b"", date.as_bytes(), &mut head);
    head.extend_from_slice(b"\r\n");
    head.into()
}

/// The reason phrase cutover writes for a status of its own.
pub fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edits(set: &[(&str, &str)], remove: &[&str]) -> HeaderEdits {
        HeaderEdits {
            set: set
                .iter()
                .map(|(n, v)| {
                    (
                        HeaderName::from_bytes(n.as_bytes()).unwrap(),
                        HeaderValue::from_str(v).unwrap(),
                    )
                })
                .collect(),
            remove: remove
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
                .collect(),
        }
    }

    fn fields(raw: &'static [(&'static str, &'static str)]) -> Vec<(&'static [u8], &'static [u8])> {
        raw.iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect()
    }

    /// A plain-listener request, not an upgrade.
    fn plain<'a>(authority: &'a [u8], peer: &'a [u8], nominates: bool) -> RequestFacts<'a> {
        RequestFacts {
            authority,
            peer: Some(peer),
            client: None,
            tls: false,
            upgrade: false,
            nominates,
        }
    }

    #[test]
    fn a_request_in_the_plan_order() {
        let plan = Plan::new(
            Some(HeaderValue::from_static("new.example")),
            &edits(&[("x-migration", "p1")], &["cookie"]),
            &HeaderEdits::default(),
            XffMode::Append,
            RewriteMode::Rewrite,
            Arc::default(),
        );
        let client = fields(&[
            ("Host", "pub.example"),
            ("User-Agent", "t"),
            ("X-Forwarded-For", " 192.0.2.1 "),
            ("Cookie", "s=1"),
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("TE", "trailers"),
            ("X_Forwarded_For", "evil"),
            ("Accept", "*/*"),
        ]);
        let mut out = Vec::new();
        let facts = plain(b"pub.example", b"127.0.0.1", true);
        plan.request(&facts, client.iter().copied(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Host: new.example\r\nUser-Agent: t\r\nAccept: */*\r\n\
             X-Forwarded-For: 192.0.2.1, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\
             X-Forwarded-Host: pub.example\r\nX-Migration: p1\r\n"
        );
    }

    #[test]
    fn x_forwarded_for_appended_replaced_or_preserved() {
        let client = fields(&[
            ("Host", "pub.example"),
            ("X-Forwarded-For", "6.6.6.6, 192.0.2.1"),
        ]);
        let xff = |mode: XffMode, with_client: bool| {
            let plan = Plan::new(
                None,
                &HeaderEdits::default(),
                &HeaderEdits::default(),
                mode,
                RewriteMode::Rewrite,
                Arc::default(),
            );
            let mut facts = plain(b"pub.example", b"10.0.0.5", false);
            if with_client {
                facts.client = Some(b"192.0.2.1");
            }
            let mut out = Vec::new();
            plan.request(&facts, client.iter().copied(), &mut out);
            let text = String::from_utf8(out).unwrap();
            text.lines()
                .filter(|l| l.starts_with("X-Forwarded-For"))
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            xff(XffMode::Append, true),
            ["X-Forwarded-For: 6.6.6.6, 192.0.2.1, 10.0.0.5"]
        );
        // Only the address cutover believes: what a client wrote before it is gone.
        assert_eq!(xff(XffMode::Replace, true), ["X-Forwarded-For: 192.0.2.1"]);
        assert_eq!(xff(XffMode::Replace, false), ["X-Forwarded-For: 10.0.0.5"]);
        assert_eq!(
            xff(XffMode::Preserve, true),
            ["X-Forwarded-For: 6.6.6.6, 192.0.2.1"]
        );
    }

    #[test]
    fn an_edit_of_a_forwarding_field_takes_it_over() {
        let plan = Plan::new(
            None,
            &edits(&[("x-forwarded-proto", "https")], &["x-forwarded-for"]),
            &HeaderEdits::default(),
            XffMode::Append,
            RewriteMode::Rewrite,
            Arc::default(),
        );
        let client = fields(&[("Host", "a.example"), ("X-Forwarded-For", "192.0.2.1")]);
        let mut out = Vec::new();
        let facts = plain(b"a.example", b"10.0.0.1", false);
        plan.request(&facts, client.iter().copied(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Host: a.example\r\nX-Forwarded-Host: a.example\r\nX-Forwarded-Proto: https\r\n"
        );
    }

    #[test]
    fn a_response_in_the_plan_order() {
        let plan = Plan::new(
            None,
            &HeaderEdits::default(),
            &edits(&[("x-served-via", "cutover")], &["server"]),
            XffMode::Append,
            RewriteMode::Rewrite,
            Arc::default(),
        );
        let upstream = fields(&[
            ("Content-Type", "text/plain"),
            ("Date", "Mon, 01 Jan 2001 00:00:00 GMT"),
            ("Server", "origin"),
            ("Keep-Alive", "timeout=5"),
            ("Content-Length", "2"),
            ("Connection", "keep-alive"),
        ]);
        let mut out = Vec::new();
        let facts = ResponseFacts {
            status: 200,
            drop_content_length: false,
            nominates: false,
            date: b"Tue, 02 Jan 2001 00:00:00 GMT",
            close: false,
            public: Public {
                authority: b"pub.example",
                https: false,
            },
        };
        plan.response(&facts, upstream.iter().copied(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Content-Type: text/plain\r\nContent-Length: 2\r\nX-Served-Via: cutover\r\n\
             Date: Tue, 02 Jan 2001 00:00:00 GMT\r\nConnection: keep-alive\r\n"
        );
    }

    #[test]
    fn response_fields_naming_the_upstream_are_rewritten_or_only_counted() {
        let upstream = fields(&[
            ("Location", "https://new.example/moved"),
            ("Set-Cookie", "a=1; Domain=.NEW.example; Path=/"),
            ("Set-Cookie", "b=2; Domain=example"),
            ("Content-Location", "/relative"),
        ]);
        let names = Arc::new(Names::new(["new.example"]));
        let run = |mode| {
            let plan = Plan::new(
                None,
                &HeaderEdits::default(),
                &HeaderEdits::default(),
                XffMode::Append,
                mode,
                names.clone(),
            );
            let facts = ResponseFacts {
                status: 201,
                drop_content_length: false,
                nominates: false,
                date: b"D",
                close: false,
                public: Public {
                    authority: b"pub.example:8443",
                    https: true,
                },
            };
            let mut out = Vec::new();
            let rewrites = plan
                .response(&facts, upstream.iter().copied(), &mut out)
                .rewrites;
            (String::from_utf8(out).unwrap(), rewrites)
        };
        let (text, rewrites) = run(RewriteMode::Rewrite);
        assert_eq!(
            text,
            "Location: https://pub.example:8443/moved\r\n\
             Set-Cookie: a=1; Domain=.pub.example; Path=/\r\n\
             Set-Cookie: b=2; Domain=example\r\nContent-Location: /relative\r\n\
             Date: D\r\nConnection: keep-alive\r\n"
        );
        assert_eq!(rewrites.rewritten, [1, 0, 0, 1]);
        let (text, detected) = run(RewriteMode::Detect);
        assert!(
            text.starts_with("Location: https://new.example/moved\r\n"),
            "{text}"
        );
        assert_eq!(detected, rewrites);
        let (_, off) = run(RewriteMode::Off);
        assert!(!off.any());
    }

    #[test]
    fn an_answer_of_our_own() {
        let mut out = Vec::new();
        answer(b"", b"D", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Content-Length: 0\r\nCache-Control: private, no-store\r\nDate: D\r\nConnection: close\r\n"
        );
        assert_eq!(reason(504), "Gateway Timeout");
    }
}

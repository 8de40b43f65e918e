//! What both carriers do for a request around the bytes they move: the
//! client address and sticky point, a connect failure and the failover it
//! allows, the one status and log line of a failure, and the finished
//! record that feeds the metrics and the access log. Each carrier calls
//! these; neither writes its own version.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use log::debug;
use pingora::{Error, ErrorType};

use crate::config::{RewriteMode, Sticky};
use crate::limited;
use crate::model::{Model, Process, Route, Upstream};
use crate::observe::access_log::{or_dash, Entry};
use crate::observe::metrics::{Failover, ResendResult};
use crate::policy::cdn::{CdnFacts, EdgeAnswer};
use crate::policy::client_ip::{client_ip_from, Source};
use crate::policy::deleak::{Field, Rewrites};
use crate::policy::failure::ErrorKind;
use crate::policy::forward::Findings;
use crate::policy::marker::Seen;
use crate::policy::refusal::Refusal;
use crate::shift::selection::{choose, client_point, Candidate};

/// The client's address: the TCP peer's, or the one a trusted peer wrote
/// in the configured header (`values`: that header's values). A header
/// that does not parse is ignored, counted and logged at debug level.
pub fn client_address<'a>(
    model: &Model,
    peer: Option<IpAddr>,
    values: impl Iterator<Item = &'a [u8]>,
) -> Option<IpAddr> {
    let peer = peer?;
    let (ip, source) = client_ip_from(&model.client_ip, peer, values);
    if source == Source::MalformedHeader {
        model.phase.client_ip_ignored.inc();
        debug!("ignoring malformed client address header from {peer}");
    }
    Some(ip)
}

/// The request's point on the route's upstream range: a stable hash of
/// the client address (`sticky: client_ip`), else random.
pub fn sticky_point(route: &Route, client: Option<IpAddr>) -> u64 {
    match (route.sticky, client) {
        (Sticky::ClientIp, Some(ip)) => client_point(ip),
        _ => fastrand::u64(..),
    }
}

/// The error of an upstream whose name has never resolved: a connect
/// failure, failed over like one.
pub fn unresolved(up: &Upstream) -> Box<Error> {
    Error::explain(
        ErrorType::ConnectNoRoute,
        format!(
            "{}:{} has not resolved to any address yet",
            up.addresses.host, up.addresses.port
        ),
    )
}

/// Count and log a connect or TLS-handshake failure; the upstream to retry
/// on, if this was the first failure and another eligible one exists.
pub fn connect_failed(
    route: &Route,
    failed: usize,
    point: u64,
    first: bool,
    addr: &dyn Display,
    e: &Error,
) -> Option<usize> {
    let kind = ErrorKind::of(e);
    let up = &route.upstreams[failed];
    up.metrics.count_error(kind);
    let next = if first {
        choose(&route.upstreams, point, Some(failed))
    } else {
        None
    };
    if next.is_some() {
        up.metrics.failovers[Failover::Connect as usize].inc();
    }
    limited!(
        warn,
        "upstream {} failed: route={} upstream={} addr={addr} kind={} cause={e}{}",
        if next.is_some() {
            "connect"
        } else {
            "connect (no retry left)"
        },
        route.name,
        up.name,
        kind.label(),
        next.map(|n| format!("; retrying on {}", route.upstreams[n].name))
            .unwrap_or_default()
    );
    next
}

/// The request's upstream: the one its point falls on among the eligible
/// ones. When that is another than the one it would have had but for
/// ejected addresses (every address of that one is out), the failover is
/// counted and logged here, once per request.
pub fn choose_upstream(route: &Route, point: u64) -> Option<usize> {
    let chosen = choose(&route.upstreams, point, None)?;
    if route.upstreams.iter().all(|u| u.addresses.ejections.none()) {
        return Some(chosen);
    }
    let by_health: Vec<ByHealth<'_>> = route.upstreams.iter().map(ByHealth).collect();
    if let Some(own) = choose(&by_health, point, None).filter(|own| *own != chosen) {
        let up = &route.upstreams[own];
        up.metrics.failovers[Failover::NoAddress as usize].inc();
        limited!(
            warn,
            "upstream has no usable address: route={} upstream={} (every address ejected); sent to upstream {}",
            route.name,
            up.name,
            route.upstreams[chosen].name
        );
    }
    Some(chosen)
}

/// An upstream as the selection sees it when ejections are ignored.
struct ByHealth<'a>(&'a Upstream);

impl Candidate for ByHealth<'_> {
    fn weight(&self) -> u32 {
        self.0.live_weight()
    }
    fn is_backup(&self) -> bool {
        self.0.backup
    }
    fn is_healthy(&self) -> bool {
        self.0.health.is_healthy()
    }
}

/// Whether `method` may be sent twice with the same effect (RFC 9110
/// 9.2.2): GET, HEAD, PUT, DELETE, OPTIONS, TRACE.
pub fn idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"PUT" | b"DELETE" | b"OPTIONS" | b"TRACE"
    )
}

/// Whether a request whose reused upstream connection failed before any
/// response byte arrived may be sent again on a fresh one: only an
/// idempotent request whose whole body cutover still holds (nginx's
/// `proxy_next_upstream` default, Pingora's retry buffer). A POST that
/// may have reached the origin is never sent twice: it fails, counted.
pub fn may_resend(method: &[u8], body_whole: bool) -> bool {
    idempotent(method) && body_whole
}

/// What a request does after a connect to one address failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Another address of the same upstream.
    Address,
    /// Another upstream (no usable address of this one is left).
    Upstream(usize),
    /// Nothing left to try.
    No,
}

/// A connect or TLS handshake to `addr` of upstream `failed` failed: count
/// it, eject the address ([`crate::shift::endpoints`]), log it once, and
/// say where the request goes next. `tried`: the addresses of this upstream
/// already tried by this request (`addr` is added); `first_upstream`: no
/// upstream failed over yet for this request.
pub fn address_failed(
    route: &Route,
    failed: usize,
    addr: SocketAddr,
    point: u64,
    first_upstream: bool,
    tried: &mut Vec<SocketAddr>,
    e: &Error,
) -> Retry {
    let kind = ErrorKind::of(e);
    let (retry, ejected_for, then) = eject_and_choose(
        route,
        failed,
        addr,
        point,
        first_upstream,
        tried,
        kind,
        Failover::Connect,
    );
    limited!(
        warn,
        "upstream connect failed: route={} upstream={} addr={addr} kind={} cause={e}; address ejected for {}s; {then}",
        route.name,
        route.upstreams[failed].name,
        kind.label(),
        ejected_for.as_secs()
    );
    retry
}

/// `addr` of upstream `failed` failed a request (`kind`): counted, the
/// address ejected, and where the request goes next, with the words for
/// the log line. Every usable address once (at most `dns::MAX_ADDRESSES`),
/// as nginx's `proxy_next_upstream` tries every server of a group by
/// default: a refused address costs nothing, a silent one its connect
/// timeout once (then it is ejected for every request), and an upstream
/// fails over (counted as `why`) only when none of its addresses works.
#[allow(clippy::too_many_arguments)]
fn eject_and_choose(
    route: &Route,
    failed: usize,
    addr: SocketAddr,
    point: u64,
    first_upstream: bool,
    tried: &mut Vec<SocketAddr>,
    kind: ErrorKind,
    why: Failover,
) -> (Retry, std::time::Duration, String) {
    let up = &route.upstreams[failed];
    up.metrics.count_error(kind);
    let ejected = up.addresses.ejections.eject(addr, Instant::now());
    if ejected.new {
        up.metrics.ejections.inc();
    }
    let ejected_for = ejected.length;
    tried.push(addr);
    let retry = if up.addresses.has_usable(tried) {
        Retry::Address
    } else if let Some(next) = first_upstream
        .then(|| choose(&route.upstreams, point, Some(failed)))
        .flatten()
    {
        Retry::Upstream(next)
    } else {
        Retry::No
    };
    let then = match retry {
        Retry::Address => "retrying on another address".to_string(),
        Retry::Upstream(n) => {
            up.metrics.failovers[why as usize].inc();
            format!(
                "no usable address left; failing over to upstream {}",
                route.upstreams[n].name
            )
        }
        Retry::No => "no retry left".to_string(),
    };
    (retry, ejected_for, then)
}

/// What a request does after its upstream connection failed once the
/// request had started going out, before any response byte reached the
/// client ([`exchange_failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// Again on a fresh connection to the same choice: the failed one was a
    /// reused connection the upstream had closed while idle (the keep-alive
    /// race; the address is not at fault).
    Fresh,
    /// Again on another address of the same upstream.
    Address,
    /// Again on another upstream.
    Upstream(usize),
    /// Not again: the failure is answered (502), already counted or not.
    No { counted: bool },
}

/// A request's connection to `addr` of upstream `failed` failed (`kind`)
/// after the request started going out and before any response byte
/// reached the client. nginx's `proxy_next_upstream error` and HAProxy's
/// `retry-on conn-failure empty-response`: a request that may be sent
/// twice (`resendable`, [`may_resend`]) is sent again; a reused connection
/// on a fresh one (no ejection), a fresh one elsewhere ([`address_failed`]'s
/// order, the address ejected). Not a timeout (`kind` other than `Reset`):
/// an origin too slow for the read timeout is not asked twice (504). Not a
/// request that may have reached the origin (a POST, a streamed body):
/// answered 502 and counted `unsafe`, never sent twice.
#[allow(clippy::too_many_arguments)]
pub fn exchange_failed(
    route: &Route,
    failed: usize,
    addr: SocketAddr,
    point: u64,
    first_upstream: bool,
    tried: &mut Vec<SocketAddr>,
    reused: bool,
    resendable: bool,
    kind: ErrorKind,
    cause: &dyn Display,
) -> Resend {
    let up = &route.upstreams[failed];
    if kind != ErrorKind::Reset {
        return Resend::No { counted: false };
    }
    if !resendable {
        up.metrics.resends[ResendResult::Unsafe as usize].inc();
        return Resend::No { counted: false };
    }
    if reused {
        up.metrics.resends[ResendResult::Stale as usize].inc();
        debug!(
            "idle upstream connection to {addr} was closed ({cause}); sending again on a fresh one"
        );
        return Resend::Fresh;
    }
    let (retry, ejected_for, then) = eject_and_choose(
        route,
        failed,
        addr,
        point,
        first_upstream,
        tried,
        kind,
        Failover::Reset,
    );
    if retry != Retry::No {
        up.metrics.resends[ResendResult::Failed as usize].inc();
    }
    limited!(
        warn,
        "upstream connection failed before answering: route={} upstream={} addr={addr} kind={} cause={cause}; address ejected for {}s; {then}",
        route.name,
        up.name,
        kind.label(),
        ejected_for.as_secs()
    );
    match retry {
        Retry::Address => Resend::Address,
        Retry::Upstream(n) => Resend::Upstream(n),
        Retry::No => Resend::No { counted: true },
    }
}

/// The upstream's final response head arrived (`status`, and what its CDN
/// fields say): its cache result is counted, and an answer the edge made
/// itself is counted by kind and logged with the edge's request id and
/// location ([`crate::policy::cdn`]).
pub fn answered(route: &Route, up: &Upstream, status: u16, cdn: &CdnFacts, findings: &Findings) {
    if findings.rewrites.any() {
        rewrote(route, up, status, &findings.rewrites);
    }
    if findings.marker.is_mismatch() {
        up.metrics.marker_mismatch.inc();
        let said = marker_label(route, findings.marker);
        limited!(
            warn,
            "response {status} was not answered by upstream {}: its {} is {said}: route={} cf_pop={} cf_id={}",
            up.name,
            up.config
                .expect_header
                .as_ref()
                .map_or("marker", |(n, _)| n.as_str()),
            route.name,
            or_dash(cdn.pop.as_str()),
            or_dash(cdn.id.as_str())
        );
    }
    let Some(cache) = cdn.cache else {
        return;
    };
    up.metrics.cache_results[cache as usize].inc();
    if let Some(edge) = cdn.edge_answer(status) {
        up.metrics.edge_answers[edge as usize].inc();
        let hint = match edge {
            EdgeAnswer::Refused => {
                "the distribution does not serve this Host (alternate domain names, certificate) or its WAF blocked the request"
            }
            EdgeAnswer::Error => "the edge could not get an answer from its origin",
        };
        limited!(
            warn,
            "edge answered {status} itself ({}): route={} upstream={} cf_pop={} cf_id={}: {hint}",
            edge.label(),
            route.name,
            up.name,
            or_dash(cdn.pop.as_str()),
            or_dash(cdn.id.as_str())
        );
    }
}

/// What the access log says of a response's marker: empty unless it says
/// someone else answered.
pub fn marker_label(route: &Route, seen: Seen) -> &str {
    match seen {
        Seen::Unchecked | Seen::Matched => "",
        Seen::Missing => "missing",
        Seen::Unknown => "unknown",
        Seen::Names(i) => route
            .upstreams
            .get(i)
            .map_or("unknown", |u| u.name.as_str()),
    }
}

/// Response fields that named an upstream's host: counted by field; in
/// detect mode, and for values cutover could not read, a rate-limited line.
fn rewrote(route: &Route, up: &Upstream, status: u16, rewrites: &Rewrites) {
    for f in Field::ALL {
        let (done, unreadable) = (
            rewrites.rewritten[f as usize],
            rewrites.unreadable[f as usize],
        );
        up.metrics.rewrites[f as usize].inc_by(u64::from(done));
        up.metrics.rewrites_unreadable[f as usize].inc_by(u64::from(unreadable));
        if done > 0 && route.rewrite_response == RewriteMode::Detect {
            limited!(
                info,
                "response {status} {} names an upstream host: route={} upstream={}; not rewritten (rewrite_response: detect)",
                f.label(),
                route.name,
                up.name
            );
        }
        if unreadable > 0 {
            limited!(
                warn,
                "response {status} {} names an upstream host but is not a URL or cookie domain cutover reads: route={} upstream={}; left unchanged",
                f.label(),
                route.name,
                up.name
            );
        }
    }
}

/// A connection to `addr`, new or reused from the pool, is up: the address
/// is back in the rotation. A reused one counts too: the trial after an
/// ejection ([`crate::shift::endpoints::Ejections::take`]) may be carried
/// by a pooled connection, and would otherwise keep the address out until
/// the trial's time ran out, again and again. (One atomic load while
/// nothing is ejected.)
pub fn address_answered(up: &Upstream, addr: SocketAddr) {
    up.addresses.ejections.readmit(addr);
}

/// A request the upstream side failed before the response head reached the
/// client: counted (unless `counted`: a connect failure already was),
/// logged once with route, upstream and kind, and the status to answer.
pub fn failed(
    route: &Route,
    up: &Upstream,
    kind: ErrorKind,
    cause: &dyn Display,
    counted: bool,
) -> u16 {
    let status = kind.status();
    if !counted {
        up.metrics.count_error(kind);
    }
    limited!(
        warn,
        "{status} route={} upstream={} kind={} cause={cause}",
        route.name,
        up.name,
        kind.label()
    );
    status
}

/// The upstream failed after the response head went to the client: the
/// response is cut short (the client connection closes), counted and logged.
pub fn failed_mid_body(route: &Route, up: &Upstream, kind: ErrorKind, cause: &dyn Display) {
    up.metrics.count_error(kind);
    limited!(
        warn,
        "response cut: route={} upstream={} kind={} cause={cause}",
        route.name,
        up.name,
        kind.label()
    );
}

/// A request is done: its metrics (when it reached an upstream decision)
/// and its access-log line, from one record.
pub fn finish(process: &Process, up: Option<&Upstream>, entry: &Entry<'_>) {
    if let Some(up) = up {
        up.metrics.record(entry.status, entry.duration, entry.bytes);
    }
    if let Some(log) = &process.access_log {
        log.log(entry);
    }
}

/// A request body that stopped parsing once its request was routed (a
/// chunk line the strict reader refuses: `BadFraming`; anything else the
/// Pingora path's reader refuses: `Malformed`): counted, logged at most a
/// few lines a second; the status the carrier answers before it closes the
/// connection. The request's access-log line is the carrier's, as usual.
pub fn body_refused(
    model: &Model,
    refusal: Refusal,
    peer: Option<IpAddr>,
    cause: &dyn Display,
) -> u16 {
    model.phase.rejected[refusal as usize].inc();
    let status = refusal.status();
    limited!(
        info,
        "{status} {}: request body: {cause} (from {peer:?})",
        refusal.reason()
    );
    status
}

/// A request head that never became a request: Pingora's parser refused it
/// (`Malformed`, answered 400 by Pingora) or it was still incomplete after
/// the listener's `header_timeout` (`HeaderTimeout`, answered 408 by the
/// carrier). Counted, logged at most a few lines a second, and given its
/// access-log line with what is known: nothing of the head.
pub fn unread_head(process: &Process, refusal: Refusal, peer: Option<IpAddr>, cause: &dyn Display) {
    let model = process.model();
    model.phase.rejected[refusal as usize].inc();
    let status = refusal.status();
    match refusal {
        Refusal::HeaderTimeout => limited!(
            info,
            "{status} header timeout: no whole request head within the listener's header_timeout (from {peer:?})"
        ),
        _ => {
            let cause: String = cause.to_string().chars().take(200).collect();
            limited!(info, "{status} {}: {cause} (from {peer:?})", refusal.reason());
        }
    }
    let entry = Entry {
        time: std::time::SystemTime::now(),
        client: peer,
        method: "-",
        host: "-",
        path: "-",
        version: "-",
        status,
        route: "-",
        upstream: "-",
        upstream_addr: None,
        duration: std::time::Duration::ZERO,
        bytes: 0,
        phase: &model.config.phase,
        referer: "",
        user_agent: "",
        cf_id: "",
        cf_pop: "",
        vpce: "",
        marker: "",
    };
    finish(process, None, &entry);
}

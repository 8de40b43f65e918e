//! The request path: Pingora's `ProxyHttp` stages as cutover fills them in.
//!
//! Each stage only reads the runtime model the request started with; nothing
//! here parses config, takes a lock, or resolves a name.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Method};
use log::debug;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::date::get_cached_date;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorSource;

use crate::limited;
use crate::model::{Model, Process, Route, Upstream};
use crate::paths::client::ClientStream;
use crate::paths::request::{self, Resend, Retry};
use crate::policy;
use crate::policy::cdn::CdnFacts;
use crate::policy::deleak::Public;
use crate::policy::failure::{classify, ErrorKind, Failure};
use crate::policy::fields::connection_options;
use crate::policy::forward::{HeadWriter, RequestFacts, ResponseFacts};
use crate::policy::refusal::Refusal;
use crate::policy::routing::{normalize_authority, BadAuthority};
use crate::policy::timeouts::CLIENT;
use crate::shift::selection::choose;

pub struct PingoraPath {
    pub process: Arc<Process>,
}

/// Per-request state, carried between the stages.
pub struct RequestCtx {
    started: Instant,
    /// The model this request runs on, fixed at its first stage.
    model: Option<Arc<Model>>,
    route: usize,
    upstream: Option<usize>,
    /// Stickiness point: hash of the client address, or random.
    point: u64,
    /// The upstream whose connect failed, excluded from the retry.
    failed: Option<usize>,
    /// The client's authority as received, for X-Forwarded-Host and the default Host.
    original_host: Option<HeaderValue>,
    /// A connect failure already counted in `fail_to_connect`.
    connect_error_counted: bool,
    /// The client address (after `client_ip` trust), for the access log.
    client: Option<IpAddr>,
    /// The upstream address last tried.
    upstream_addr: Option<std::net::SocketAddr>,
    /// The addresses of the current upstream already tried.
    attempted: Vec<std::net::SocketAddr>,
    /// The request is a protocol upgrade cutover forwards (`Upgrade` with
    /// `Connection: upgrade`): a 101 answer is expected, not refused.
    upgrade: bool,
    /// The client's `Connection` names fields that are not forwarded.
    nominates: bool,
    /// Informational responses seen so far.
    interim: usize,
    /// What the final response's CDN fields said.
    cdn: CdnFacts,
    /// Who answered, by the upstream's `expect_header`.
    marker: crate::policy::marker::Seen,
    /// The client used https ([`policy::client_ip::client_https`]).
    https: bool,
}

impl RequestCtx {
    fn route_and_upstream(&self) -> Option<(&Route, &Upstream)> {
        let model = self.model.as_ref()?;
        let route = model.routes.get(self.route)?;
        let upstream = route.upstreams.get(self.upstream?)?;
        Some((route, upstream))
    }
}

/// Answer the client directly, with a one-line body saying why, and close
/// the connection after it.
async fn answer(session: &mut Session, status: u16, body: &'static str) -> Result<bool> {
    write_answer(session, status, body).await?;
    Ok(true)
}

/// An answer of cutover's own, with the head the policy gives it
/// ([`policy::forward::answer`]), the same on both carriers.
async fn write_answer(session: &mut Session, status: u16, body: &'static str) -> Result<()> {
    session.set_keepalive(None);
    let mut resp = ResponseHeader::build(status, Some(6))?;
    let date = get_cached_date();
    let mut render = Render::new(&mut resp);
    policy::forward::answer(body.as_bytes(), date.as_bytes(), &mut render);
    render.finish()?;
    session
        .write_error_response(resp, Bytes::from_static(body.as_bytes()))
        .await
}

/// Where the forwarding plan renders a Pingora head: each field appended,
/// in the plan's order, with its name in the case the plan gives.
trait Append {
    fn append(&mut self, name: Bytes, value: HeaderValue) -> Result<bool>;
}

impl Append for RequestHeader {
    fn append(&mut self, name: Bytes, value: HeaderValue) -> Result<bool> {
        self.append_header(name, value)
    }
}

impl Append for ResponseHeader {
    fn append(&mut self, name: Bytes, value: HeaderValue) -> Result<bool> {
        self.append_header(name, value)
    }
}

struct Render<'h, H> {
    head: &'h mut H,
    error: Option<Box<Error>>,
}

impl<'h, H: Append> Render<'h, H> {
    fn new(head: &'h mut H) -> Self {
        Render { head, error: None }
    }

    fn finish(self) -> Result<()> {
        self.error.map_or(Ok(()), Err)
    }
}

impl<H: Append> HeadWriter for Render<'_, H> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if self.error.is_some() {
            return;
        }
        let appended = HeaderValue::from_bytes(value)
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "field value", e))
            .and_then(|v| self.head.append(Bytes::copy_from_slice(name), v));
        if let Err(e) = appended {
            self.error = Some(e);
        }
    }

    fn list<'v>(&mut self, name: &[u8], values: impl Iterator<Item = &'v [u8]>) {
        let mut joined = Vec::with_capacity(64);
        joined.list(b"", values);
        // `joined` is ": a, b\r\n": the value is between.
        self.field(name, &joined[2..joined.len() - 2]);
    }
}

/// Refuse a request the process policy refuses: counted by reason, logged at
/// most a few times a second, answered, and the connection closed.
async fn refuse(
    session: &mut Session,
    model: &Model,
    refusal: Refusal,
    why: &'static str,
) -> Result<bool> {
    model.phase.rejected[refusal as usize].inc();
    limited!(
        info,
        "{} {}: {why} (from {:?})",
        refusal.status(),
        refusal.reason(),
        peer_ip(session)
    );
    answer(session, refusal.status(), refusal.body()).await
}

/// The request head's size as received: request line and fields.
fn head_size(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.raw_path().len() + 12;
    let fields: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    line + fields + 2
}

/// The framing fields as the client sent them. Pingora drops a
/// `Content-Length` sent with `Transfer-Encoding` before cutover sees the
/// request, so for a request with a transfer coding the head is read again.
fn framing_refusal(session: &Session) -> Option<&'static str> {
    let req = session.req_header();
    let http10 = req.version == http::Version::HTTP_10;
    let fields = req
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    if let Err(why) = policy::framing::request_body(http10, fields) {
        return Some(why);
    }
    if !req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    let raw = session.as_http1()?.get_headers_raw_bytes();
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => policy::framing::request_body(
            http10,
            parsed.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
        )
        .err(),
        _ => Some("unreadable head"),
    }
}

fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

#[async_trait]
impl ProxyHttp for PingoraPath {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default adds a (disabled) response
    /// compression module whose filters still run, and allocate, on every
    /// request. cutover passes bodies through as the origin encoded them.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            model: None,
            route: 0,
            upstream: None,
            point: 0,
            failed: None,
            original_host: None,
            connect_error_counted: false,
            client: None,
            upstream_addr: None,
            attempted: Vec::new(),
            upgrade: false,
            nominates: false,
            interim: 0,
            cdn: CdnFacts::default(),
            marker: Default::default(),
            https: false,
        }
    }

    /// Routing. Rejects what must never be forwarded: CONNECT (405), a missing,
    /// repeated or malformed Host (400), and a host no route owns (421, the
    /// status CloudFront itself uses for a name it does not serve). An
    /// absolute-form target (`GET http://host/`) routes by its authority;
    /// the upstream address never comes from the request.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Requests pipelined behind this one are answered in order (Pingora
        // drops them otherwise, after a response that said keep-alive), and
        // interim responses are not forwarded (as the fast path and nginx),
        // except 100 Continue to a request that expects it.
        session.set_pipelining_enabled(true);
        session.set_ignore_info_resp(true);
        // The client side's timeouts, from the table both carriers use. The
        // listener's idle and head timeouts are the client stream's
        // (`paths::client`): Pingora's own keep-alive timer is off
        // (`Some(0)`, no limit), and only where Pingora has keep-alive on
        // (not after `Connection: close`, not for an HTTP/1.0 client that
        // did not ask for it).
        if let Some(client) = ClientStream::of(session.stream()) {
            client.request_started();
        }
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(0));
        }
        session.set_read_timeout(Some(CLIENT.body));
        session.set_write_timeout(Some(CLIENT.send));
        let model = self.process.model();
        let req = session.req_header();
        let values = model
            .client_ip
            .header
            .as_ref()
            .into_iter()
            .flat_map(|name| req.headers.get_all(name).iter())
            .map(|v| v.as_bytes());
        let client = request::client_address(&model, peer_ip(session), values);
        ctx.client = client;
        if req.method == Method::CONNECT {
            return refuse(session, &model, Refusal::ConnectMethod, "CONNECT").await;
        }
        if head_size(req) > policy::refusal::MAX_REQUEST_HEAD {
            return refuse(
                session,
                &model,
                Refusal::HeadTooLarge,
                "request head too large",
            )
            .await;
        }
        if let Err(why) =
            policy::refusal::request_target(req.method.as_str().as_bytes(), req.raw_path())
        {
            return refuse(session, &model, Refusal::BadTarget, why).await;
        }
        if let Some(why) = framing_refusal(session) {
            return refuse(session, &model, Refusal::BadFraming, why).await;
        }
        let req = session.req_header();
        let connection = connection_options(
            req.headers
                .get_all(http::header::CONNECTION)
                .iter()
                .map(|v| v.as_bytes()),
        );
        ctx.upgrade = connection.upgrade
            && req.version == http::Version::HTTP_11
            && req.headers.contains_key(http::header::UPGRADE);
        ctx.nominates = connection.nominates;
        // Pingora has already refused a Host that contradicts an absolute-form
        // target, userinfo, and repeated Host fields (400); what is left is one
        // authority, from the Host header, the absolute-form target, or HTTP/2's
        // :authority.
        let mut hosts = req.headers.get_all(HOST).iter();
        let authority: HeaderValue = match (hosts.next(), hosts.next()) {
            (Some(_), Some(_)) => {
                return bad_host(session, &model, "more than one Host header").await
            }
            (Some(h), None) => h.clone(),
            (None, _) => {
                let from_target = req
                    .uri
                    .authority()
                    .map(|a| a.as_str().as_bytes())
                    .or_else(|| absolute_form_authority(req.raw_path()));
                match from_target.map(HeaderValue::from_bytes) {
                    Some(Ok(v)) => v,
                    Some(Err(_)) => return bad_host(session, &model, "unusable authority").await,
                    None => return bad_host(session, &model, "no Host header").await,
                }
            }
        };
        let host = match normalize_authority(authority.as_bytes()) {
            Ok(h) => h,
            Err(BadAuthority::Empty) => return bad_host(session, &model, "empty Host").await,
            Err(BadAuthority::Malformed) => {
                return bad_host(session, &model, "malformed Host").await
            }
        };
        let Some(route_idx) = model.hosts.route_for_host(host.as_str()) else {
            model.phase.unmatched.inc();
            limited!(
                info,
                "421 no route for host {:?} from {:?}",
                host.as_str(),
                peer_ip(session)
            );
            return answer(
                session,
                421,
                "cutover: this host is not served here (no route matches it)\n",
            )
            .await;
        };

        let route = &model.routes[route_idx];
        let req = session.req_header();
        let proto = req
            .headers
            .get_all("x-forwarded-proto")
            .iter()
            .next_back()
            .map(|v| v.as_bytes());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        ctx.https = policy::client_ip::client_https(&model.client_ip, peer_ip(session), tls, proto);
        ctx.point = request::sticky_point(route, client);
        ctx.route = route_idx;
        ctx.original_host = Some(authority);
        ctx.model = Some(model);
        Ok(false)
    }

    /// Pick the upstream (excluding one that just failed to connect) and build
    /// its peer from the config: TLS, SNI, certificate check, timeouts. The
    /// address is the latest one DNS gave for the configured name.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let model = ctx
            .model
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route chosen"))?;
        let route = &model.routes[ctx.route];
        let no_upstream = || Error::explain(ErrorType::HTTPStatus(502), "no upstream left to try");
        let first_choice = ctx.failed.is_none() && ctx.upstream.is_none();
        let chosen = if first_choice {
            request::choose_upstream(route, ctx.point)
        } else {
            choose(&route.upstreams, ctx.point, ctx.failed)
        };
        let mut idx = chosen.ok_or_else(no_upstream)?;
        ctx.connect_error_counted = false;
        // A name that has never resolved is a connect failure found here
        // rather than in Pingora: count it and fail over the same way, once.
        if !route.upstreams[idx].addresses.has_addresses() && ctx.failed.is_none() {
            let up = &route.upstreams[idx];
            let shown = format!("{}:{}", up.addresses.host, up.addresses.port);
            ctx.failed = Some(idx);
            match request::connect_failed(
                route,
                idx,
                ctx.point,
                true,
                &shown,
                &request::unresolved(up),
            ) {
                Some(other) => idx = other,
                None => ctx.connect_error_counted = true,
            }
        }
        ctx.upstream = Some(idx);
        let upstream = &route.upstreams[idx];
        let addr = upstream.addresses.choose(&ctx.attempted);
        match addr {
            Some(addr) => {
                ctx.upstream_addr = Some(addr);
                Ok(upstream.peer.for_address(addr))
            }
            None => Err(request::unresolved(upstream).into_up()),
        }
    }

    /// A connect or TLS-handshake failure: nothing was sent, so the request is
    /// retried on another address of the same upstream, else once on another
    /// eligible upstream (a backup counts); [`request::address_failed`]
    /// decides.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let retry = match (ctx.model.clone(), ctx.upstream, ctx.upstream_addr) {
            (Some(model), Some(failed), Some(addr)) => {
                let route = &model.routes[ctx.route];
                let first = ctx.failed.is_none();
                let retry = request::address_failed(
                    route,
                    failed,
                    addr,
                    ctx.point,
                    first,
                    &mut ctx.attempted,
                    &e,
                );
                if let Retry::Upstream(_) = retry {
                    ctx.failed = Some(failed);
                    ctx.attempted.clear();
                }
                retry
            }
            _ => Retry::No,
        };
        ctx.connect_error_counted = true;
        e.set_retry(retry != Retry::No);
        e
    }

    /// A failure after the request started going out (a reused connection
    /// the upstream had closed, a reset before the response): while nothing
    /// of the response reached the client, [`request::exchange_failed`]
    /// decides whether and where it is sent again, the rule the fast path
    /// applies.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        e.set_retry(false);
        let (Some(model), Some(failed), Some(addr)) =
            (ctx.model.clone(), ctx.upstream, ctx.upstream_addr)
        else {
            return e;
        };
        if session.response_written().is_some() || e.esource() != &ErrorSource::Upstream {
            return e;
        }
        let method = session.req_header().method.as_str().as_bytes();
        let whole = !session.as_ref().retry_buffer_truncated();
        let route = &model.routes[ctx.route];
        let resend = request::exchange_failed(
            route,
            failed,
            addr,
            ctx.point,
            ctx.failed.is_none(),
            &mut ctx.attempted,
            client_reused,
            request::may_resend(method, whole),
            ErrorKind::of(&e),
            &e,
        );
        match resend {
            Resend::Fresh | Resend::Address => e.set_retry(true),
            Resend::Upstream(_) => {
                ctx.failed = Some(failed);
                ctx.attempted.clear();
                e.set_retry(true);
            }
            Resend::No { counted } => ctx.connect_error_counted = counted,
        }
        e
    }

    /// A connection to the address: it is back in the rotation if it was out.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some((_, up)), Some(addr)) = (ctx.route_and_upstream(), ctx.upstream_addr) {
            request::address_answered(up, addr);
        }
        Ok(())
    }

    /// Host rewrite and forwarding headers. The Host becomes the upstream's
    /// `host_header` (the name the new distribution owns); X-Forwarded-For gets
    /// the TCP peer appended (`client_ip.forward`); X-Forwarded-Host keeps the
    /// name the client asked for.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some((_, upstream)) = ctx.route_and_upstream() else {
            return Ok(());
        };
        // Origin-form upstream, whatever form the client used: the authority
        // the upstream sees is the rewritten Host, nothing else.
        let absolute =
            absolute_form_authority(req.raw_path()).is_some() || req.uri.authority().is_some();
        let target: Vec<u8> = if absolute {
            req.uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .as_bytes()
                .to_vec()
        } else {
            req.raw_path().to_vec()
        };
        let mut next =
            RequestHeader::build(req.method.clone(), &target, Some(req.headers.len() + 4))?;
        next.set_version(req.version);
        let peer = peer_ip(session).map(|p| p.to_string());
        let authority = ctx
            .original_host
            .as_ref()
            .map_or(&b""[..], |h| h.as_bytes());
        let client = ctx
            .client
            .filter(|_| upstream.plan.wants_client())
            .map(crate::policy::client_ip::IpText::new);
        let facts = RequestFacts {
            authority,
            peer: peer.as_deref().map(str::as_bytes),
            client: client.as_ref().map(|c| c.as_bytes()),
            tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
            upgrade: ctx.upgrade,
            nominates: ctx.nominates,
        };
        let mut render = Render::new(&mut next);
        // The client's fields as received (order and case): Pingora's own
        // header map groups fields of one name together.
        let raw = session.as_http1().map(|h| h.get_headers_raw_bytes());
        let mut storage = [httparse::EMPTY_HEADER; 256];
        let mut parsed = httparse::Request::new(&mut storage);
        match raw.as_deref().map(|raw| parsed.parse(raw)) {
            Some(Ok(httparse::Status::Complete(_))) => {
                let fields = parsed.headers.iter().map(|h| (h.name.as_bytes(), h.value));
                upstream.plan.request(&facts, fields, &mut render);
            }
            _ => {
                let fields: Vec<(&[u8], &[u8])> = req
                    .case_header_iter()
                    .map(|(n, v)| (n.as_slice(), v.as_bytes()))
                    .collect();
                upstream
                    .plan
                    .request(&facts, fields.iter().copied(), &mut render);
            }
        }
        render.finish()?;
        *req = next;
        Ok(())
    }

    /// The upstream's response head, checked and cleaned by the process
    /// policy before anything of it reaches the client: a 101 nobody asked
    /// for, a flood of 1xx, or framing that could be read two ways is a 502
    /// (the upstream connection is not reused); hop-by-hop fields and the
    /// fields its `Connection` names are dropped.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        let bad = |why: &'static str| Error::explain(ErrorType::InvalidHTTPHeader, why).into_up();
        if !(100..=599).contains(&status) {
            return Err(bad("status outside 100..=599"));
        }
        if status == 101 && !ctx.upgrade {
            return Err(bad(
                "101 Switching Protocols to a request that did not ask to upgrade",
            ));
        }
        if (100..200).contains(&status) && status != 101 {
            ctx.interim += 1;
            if ctx.interim > policy::framing::MAX_INTERIM_RESPONSES {
                return Err(bad("too many informational responses"));
            }
            return Ok(());
        }
        let connection = connection_options(
            resp.headers
                .get_all(http::header::CONNECTION)
                .iter()
                .map(|v| v.as_bytes()),
        );
        let mut drop_content_length = false;
        if status != 101 {
            let framing = policy::framing::response_body(
                status,
                session.req_header().method == Method::HEAD,
                resp.version == http::Version::HTTP_10,
                connection.close,
                resp.headers
                    .iter()
                    .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
            )
            .map_err(bad)?;
            drop_content_length = framing.drop_content_length;
        }
        let Some((route, upstream)) = ctx.route_and_upstream() else {
            return Ok(());
        };
        let close = self.process.closing(session.is_process_shutting_down());
        if close {
            session.set_keepalive(None);
        }
        let date = get_cached_date();
        let facts = ResponseFacts {
            status,
            drop_content_length,
            nominates: connection.nominates,
            date: date.as_bytes(),
            close,
            public: Public {
                authority: ctx
                    .original_host
                    .as_ref()
                    .map_or(&b""[..], |h| h.as_bytes()),
                https: ctx.https,
            },
        };
        let mut next = ResponseHeader::build(resp.status, Some(resp.headers.len() + 4))?;
        next.set_version(resp.version);
        next.set_reason_phrase(resp.get_reason_phrase())?;
        let mut render = Render::new(&mut next);
        let fields: Vec<(&[u8], &[u8])> = if resp.has_case() {
            resp.case_header_iter()
                .map(|(n, v)| (n.as_slice(), v.as_bytes()))
                .collect()
        } else {
            resp.headers
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
                .collect()
        };
        let mut cdn = CdnFacts::default();
        for (name, value) in &fields {
            cdn.add(name, value);
        }
        let findings = upstream
            .plan
            .response(&facts, fields.iter().copied(), &mut render);
        request::answered(route, upstream, status, &cdn, &findings);
        render.finish()?;
        *resp = next;
        ctx.cdn = cdn;
        ctx.marker = findings.marker;
        Ok(())
    }

    /// The one place a failure becomes a status: an upstream timeout is 504,
    /// any other upstream failure 502, each logged with route, upstream and
    /// cause and counted by kind.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let status = match classify(e) {
            Failure::Upstream { status, kind } => match ctx.route_and_upstream() {
                Some((route, up)) => request::failed(route, up, kind, e, ctx.connect_error_counted),
                None => {
                    limited!(warn, "{status} cause={e}");
                    status
                }
            },
            Failure::Status(code) => {
                if let Some((route, up)) = ctx.route_and_upstream() {
                    limited!(
                        warn,
                        "{code} route={} upstream={} cause={e}",
                        route.name,
                        up.name
                    );
                }
                code
            }
            Failure::Downstream { status: 400 } => {
                // A request body that does not parse (a chunk line the process
                // policy refuses, see vendor/httparse): refused, counted.
                let refusal = match e.etype() {
                    ErrorType::Custom("InvalidChunk" | "InvalidTrailerEnd") => Refusal::BadFraming,
                    _ => Refusal::Malformed,
                };
                let model = ctx.model.clone().unwrap_or_else(|| self.process.model());
                request::body_refused(&model, refusal, peer_ip(session), e)
            }
            Failure::Downstream { status } => {
                debug!("client side error ({status}): {e}");
                status
            }
            Failure::Internal => {
                limited!(warn, "500 internal error: {e}");
                500
            }
        };
        if status > 0 {
            if let Err(write_err) = write_answer(session, status, "").await {
                debug!("could not send {status} to the client: {write_err}");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// A request head Pingora's parser refused (it answers 400 itself) or a
    /// client connection that failed mid-head: counted and logged here, at
    /// most a few lines a second, instead of Pingora's line per connection
    /// (at `error` level for a failed connection). Needs the hook cutover
    /// adds to Pingora (`vendor/pingora-proxy`).
    fn request_header_error(&self, session: &ServerSession, e: &Error) -> bool {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
            // Pingora answers it 400 itself.
            request::unread_head(&self.process, Refusal::Malformed, peer, e);
        } else if crate::paths::client::is_header_timeout(e) {
            // Answered 408 by the stream (`paths::client`).
            request::unread_head(&self.process, Refusal::HeaderTimeout, peer, e);
        } else {
            debug!("client connection from {peer:?} failed before a whole request head: {e}");
        }
        true
    }

    /// cutover logs every failure itself, with route and upstream, in
    /// `fail_to_connect`/`fail_to_proxy`; Pingora's own line would repeat it.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    /// Metrics for every request that reached an upstream decision. A request
    /// whose client went away before any response counts as 499 (nginx's code
    /// for "client closed request").
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(client) = ClientStream::of(session.stream()) {
            client.request_done();
        }
        let status = session
            .response_written()
            .map_or(499, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let bytes = session.body_bytes_sent() as u64;
        let served = ctx.route_and_upstream();
        let names = served.map(|(route, up)| (route.name.as_str(), up.name.as_str()));
        {
            let req = session.req_header();
            let header = |name: http::header::HeaderName| {
                req.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
            };
            let (route, upstream) = names.unwrap_or(("-", "-"));
            // The model this request ran on (a refused request never took one).
            let model = ctx.model.clone().unwrap_or_else(|| self.process.model());
            let entry = crate::observe::access_log::Entry {
                time: std::time::SystemTime::now(),
                client: ctx.client,
                method: req.method.as_str(),
                host: ctx
                    .original_host
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_else(|| header(HOST)),
                path: std::str::from_utf8(req.raw_path()).unwrap_or("-"),
                version: match req.version {
                    http::Version::HTTP_10 => "HTTP/1.0",
                    http::Version::HTTP_2 => "HTTP/2.0",
                    _ => "HTTP/1.1",
                },
                status,
                route,
                upstream,
                upstream_addr: ctx.upstream_addr,
                duration: elapsed,
                bytes,
                phase: &model.config.phase,
                referer: header(http::header::REFERER),
                user_agent: header(http::header::USER_AGENT),
                cf_id: ctx.cdn.id.as_str(),
                cf_pop: ctx.cdn.pop.as_str(),
                vpce: ClientStream::of(session.stream())
                    .and_then(ClientStream::vpce)
                    .unwrap_or(""),
                marker: served.map_or("", |(route, _)| request::marker_label(route, ctx.marker)),
            };
            request::finish(&self.process, served.map(|(_, up)| up), &entry);
        }
    }
}

/// The authority of an absolute-form request target (`http://host:port/path`).
fn absolute_form_authority(target: &[u8]) -> Option<&[u8]> {
    let scheme_end = target.windows(3).position(|w| w == b"://")?;
    let scheme = &target[..scheme_end];
    if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

async fn bad_host(session: &mut Session, model: &Model, why: &'static str) -> Result<bool> {
    refuse(session, model, Refusal::BadHost, why).await
}

#[cfg(test)]
mod tests {
    use super::absolute_form_authority;

    #[test]
    fn absolute_form() {
        assert_eq!(
            absolute_form_authority(b"http://evil.test/x"),
            Some(&b"evil.test"[..])
        );
        assert_eq!(
            absolute_form_authority(b"HTTPS://a.test:8443?q"),
            Some(&b"a.test:8443"[..])
        );
        assert_eq!(
            absolute_form_authority(b"http://a.test"),
            Some(&b"a.test"[..])
        );
        assert_eq!(absolute_form_authority(b"/path?u=http://x/"), None);
        assert_eq!(absolute_form_authority(b"ftp://a.test/"), None);
    }
}

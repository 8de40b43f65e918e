//! The common request, forwarded without Pingora's general HTTP machinery.
//!
//! Why: under wrk, Pingora's proxy loop cost about 135,000 instructions per
//! request (a ~9 KiB future moved on every request, ~90 allocations, request
//! header clones, and a pool round trip with an idle-watch task per
//! request), twice nginx's CPU for the same job. This module serves the
//! request a CDN migration is made of — HTTP/1.1 `GET`/`HEAD` without a body,
//! on a plain-HTTP listener, with one Host that a route owns — with one parse
//! of the head, one write upstream and one write to the client, and keeps the
//! upstream connection with the client connection between its requests.
//!
//! Everything else — other methods, request bodies, HTTP/1.0, `Upgrade`,
//! `Expect`, absolute-form targets, a missing or unknown Host, anything
//! malformed, TLS listeners — is handed, bytes untouched, to the Pingora
//! proxy ([`crate::paths::pingora::CutoverProxy`]) for the rest of the connection, so
//! each unusual case has exactly one implementation. Both paths share the
//! runtime model, upstream selection, failover, metrics and access log.

use std::future::Future;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

pub mod chunked;

use async_trait::async_trait;
use log::debug;
use pingora::apps::ServerApp;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::timeout;

use crate::config::HeaderEdits;
use crate::limited;
use crate::model::{Route, Runtime, Shared, Upstream};
use crate::paths::fast::chunked::ChunkedEnd;
use crate::paths::pingora::connect_failed;
use crate::policy;
use crate::policy::client_ip::{client_ip_from, Source};
use crate::policy::failure::ErrorKind;
use crate::policy::fields::{nominated, ConnectionOptions};
use crate::policy::framing::{FramingFields, RequestBody, ResponseBody};
use crate::policy::refusal::TargetForm;
use crate::policy::routing::normalize_authority;
use crate::shift::selection::{choose, client_point};

/// Larger request heads go to Pingora, whose limit is higher.
const MAX_HEAD: usize = 16 * 1024;
const MAX_REQUEST_HEADERS: usize = 64;
const MAX_RESPONSE_HEADERS: usize = 128;
/// How long a client connection may wait for its next request: Pingora's
/// default for HTTP/1 keep-alive, so both paths behave alike.
const CLIENT_IDLE: Duration = Duration::from_secs(60);
const READ_CHUNK: usize = 16 * 1024;
/// Body bytes gathered per client write when more is already waiting.
const BODY_BATCH: usize = 64 * 1024;
/// How long an idle client keeps its upstream connection before it goes back
/// to the shared pool (where Pingora watches it for the idle timeout).
const HOLD_UPSTREAM: Duration = Duration::from_secs(1);
/// How long a write to the client may wait (nginx's `send_timeout` default).
const CLIENT_SEND: Duration = Duration::from_secs(60);

pub struct FastPath<A> {
    /// The Pingora proxy that serves whatever this module hands over.
    pub pingora: Arc<A>,
    shared: Arc<Shared>,
    connector: TransportConnector,
    closing: AtomicBool,
    open: crate::paths::memory::OpenConnections,
    close_idle: Notify,
}

impl<A> FastPath<A> {
    pub fn new(pingora: Arc<A>, shared: Arc<Shared>, conf: &ServerConf) -> Self {
        Self {
            pingora,
            shared,
            connector: TransportConnector::new(Some(ConnectorOptions::from_server_conf(conf))),
            closing: AtomicBool::new(false),
            open: crate::paths::memory::OpenConnections::default(),
            close_idle: Notify::new(),
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for FastPath<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _open = self.open.open();
        // Only a plain TCP stream can be rewound for the handover.
        if stream.get_ssl_digest().is_some() || !stream.as_any().is::<L4Stream>() {
            self.shared.metrics.handed_over.inc();
            return self.pingora.process_new(stream, shutdown).await;
        }
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut conn = Conn {
            peer,
            peer_text: peer.map(|p| p.to_string()),
            stream,
            buf: Vec::with_capacity(4096),
            out: Vec::new(),
            resp: Vec::new(),
            held: None,
        };
        let handover = self.serve(&mut conn, shutdown).await;
        if let Some(held) = conn.held.take() {
            held.release(&self.connector);
        }
        if !handover {
            return None;
        }
        self.shared.metrics.handed_over.inc();
        let mut stream = conn.stream;
        let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        l4.rewind(&conn.buf);
        stream = l4;
        self.pingora.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.closing.store(true, Ordering::Release);
        self.close_idle.notify_waiters();
        self.pingora.cleanup().await;
    }
}

/// One client connection's state, kept across its requests.
struct Conn {
    stream: Stream,
    peer: Option<IpAddr>,
    /// `peer` as X-Forwarded-For writes it, formatted once per connection.
    peer_text: Option<String>,
    /// Bytes read from the client and not yet served.
    buf: Vec<u8>,
    /// The head being sent (upstream request, then client response).
    out: Vec<u8>,
    /// Bytes read from the upstream.
    resp: Vec<u8>,
    /// The upstream connection the last request used, while it stays usable.
    held: Option<Held>,
}

/// An upstream connection kept between a client's requests: the next request
/// to the same upstream address, on the same model, uses it without a pool
/// round trip.
struct Held {
    runtime: Arc<Runtime>,
    route: usize,
    upstream: usize,
    addr: SocketAddr,
    reuse_hash: u64,
    idle: Duration,
    stream: Stream,
}

impl Held {
    /// Itself, if nothing arrived on it since its last response. Whatever an
    /// upstream sends after a complete response (a body after a HEAD/204/304
    /// answer, a second response nobody asked for, a 408 before it closes an
    /// idle connection) would otherwise be read as the next request's
    /// response — behind an ALB, another user's. Checked before every reuse,
    /// without a syscall ([`crate::model::peer::quiet`]).
    fn quiet(self) -> Option<Held> {
        let stream = crate::model::peer::quiet(self.stream)?;
        Some(Held { stream, ..self })
    }

    fn release(self, connector: &TransportConnector) {
        connector.release_stream(self.stream, self.reuse_hash, Some(self.idle));
    }

    fn serves(&self, rt: &Arc<Runtime>, route: usize, upstream: usize, addr: SocketAddr) -> bool {
        Arc::ptr_eq(&self.runtime, rt)
            && self.route == route
            && self.upstream == upstream
            && self.addr == addr
    }
}

/// What the client asked for, as far as forwarding needs it.
struct Ask<'b> {
    head: bool,
    host: &'b [u8],
    path: &'b [u8],
    client_close: bool,
    /// `Connection` names other fields, which are not forwarded.
    nominates: bool,
}

/// How the upstream's response body is delimited.
enum Framing {
    None,
    Length(u64),
    Chunked(ChunkedEnd),
    /// Until the upstream closes: the client connection closes after it too.
    Close,
}

/// What one forwarded request came to, for metrics and the access log.
struct Done {
    status: u16,
    bytes: u64,
    keep_client: bool,
}

enum Step {
    /// Served; go on with the next request if the client connection stays.
    Served { keep_client: bool },
    /// Not for the fast path: hand the connection, unread, to Pingora.
    Handover,
}

impl<A: ServerApp + Send + Sync + 'static> FastPath<A> {
    /// Serve requests until the connection ends (`false`) or one must go to
    /// Pingora (`true`, with the unserved bytes still in `conn.buf`).
    async fn serve(&self, conn: &mut Conn, shutdown: &ShutdownWatch) -> bool {
        loop {
            let Some(head_end) = self.read_head(conn).await else {
                return false;
            };
            match self.one_request(conn, head_end, shutdown).await {
                Step::Served { keep_client: true } => {
                    if conn.buf.len() == head_end {
                        conn.buf.clear();
                    } else {
                        conn.buf.drain(..head_end);
                    }
                }
                Step::Served { keep_client: false } => {
                    let _ = to_client(conn.stream.shutdown()).await;
                    return false;
                }
                Step::Handover => return true,
            }
        }
    }

    /// Read until `conn.buf` holds a whole request head; its length, or `None`
    /// when the connection ended or went idle too long. A head that is too
    /// large or never ends is handed over as it is (Pingora answers it).
    async fn read_head(&self, conn: &mut Conn) -> Option<usize> {
        // A started head must be complete within CLIENT_IDLE in all (like
        // nginx's client_header_timeout), not per read: a client trickling
        // one byte at a time cannot hold the connection open forever.
        let mut head_deadline: Option<Instant> = None;
        loop {
            if let Some(end) = head_end(&conn.buf) {
                return Some(end);
            }
            if conn.buf.len() >= MAX_HEAD {
                return Some(conn.buf.len());
            }
            if conn.buf.is_empty() {
                // Between requests. The upstream connection stays with this
                // client for a moment (a busy client's next request reuses
                // it without a pool round trip), then goes back to the
                // shared pool rather than sit idle here.
                let wait = if conn.held.is_some() {
                    HOLD_UPSTREAM
                } else {
                    CLIENT_IDLE
                };
                // A `Notified` sees every `notify_waiters` made after it was
                // created, polled or not; it is polled (and takes the Notify's
                // lock) only when the read has to wait, thanks to `biased`.
                let closed = self.close_idle.notified();
                if self.closing.load(Ordering::Acquire) {
                    return None;
                }
                conn.buf.reserve(4096);
                tokio::select! {
                    biased;
                    r = timeout(wait, conn.stream.read_buf(&mut conn.buf)) => match r {
                        Ok(Ok(n)) if n > 0 => continue,
                        Err(_) if conn.held.is_some() => {
                            if let Some(held) = conn.held.take() {
                                held.release(&self.connector);
                            }
                            // An idle client keeps only its read buffer.
                            conn.out = Vec::new();
                            conn.resp = Vec::new();
                            continue;
                        }
                        _ => return None,
                    },
                    _ = closed => return None,
                }
            }
            let deadline = *head_deadline.get_or_insert_with(|| Instant::now() + CLIENT_IDLE);
            let left = deadline.saturating_duration_since(Instant::now());
            conn.buf.reserve(4096);
            match timeout(left, conn.stream.read_buf(&mut conn.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                // A partial head the client abandoned: nothing to answer.
                _ => return None,
            }
        }
    }

    async fn one_request(
        &self,
        conn: &mut Conn,
        head_end: usize,
        shutdown: &ShutdownWatch,
    ) -> Step {
        let mut headers = [const { MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
        let buf = std::mem::take(&mut conn.buf);
        let step = match parse_request(&buf[..head_end], &mut headers) {
            Some(req) => self.forward(conn, &req, shutdown).await,
            None => Step::Handover,
        };
        conn.buf = buf;
        step
    }

    async fn forward(
        &self,
        conn: &mut Conn,
        req: &httparse::Request<'_, '_>,
        shutdown: &ShutdownWatch,
    ) -> Step {
        let started = Instant::now();
        let rt = self.shared.runtime();
        let Some((ask, route_idx)) = route_request(req, &rt) else {
            return Step::Handover;
        };
        let route = &rt.routes[route_idx];
        let client = conn.peer.map(|peer| {
            let values = header_values(req, rt.client_ip.header.as_ref().map(|h| h.as_str()));
            let (ip, source) = client_ip_from(&rt.client_ip, peer, values);
            if source == Source::MalformedHeader {
                rt.phase.client_ip_ignored.inc();
                debug!("ignoring malformed client address header from {peer}");
            }
            ip
        });
        let point = match route.sticky {
            crate::config::Sticky::None => fastrand::u64(..),
            crate::config::Sticky::ClientIp => {
                client.map_or_else(|| fastrand::u64(..), client_point)
            }
        };
        let Some(mut idx) = choose(&route.upstreams, point, None) else {
            return Step::Handover;
        };
        let closing = self.shared.draining.load(Ordering::Relaxed) || *shutdown.borrow();

        let mut first_attempt = true;
        let mut tried;
        let outcome = loop {
            let up = &route.upstreams[idx];
            tried = up.addresses.pick();
            let Some(addr) = tried else {
                // Never resolved: a connect failure, failed over like one.
                let e = Error::explain(ErrorType::ConnectNoRoute, "the name has no address yet");
                let shown = format!("{}:{}", up.addresses.host, up.addresses.port);
                match connect_failed(route, idx, point, first_attempt, &shown, &e) {
                    Some(next) => {
                        first_attempt = false;
                        idx = next;
                        continue;
                    }
                    None => break Err((ErrorKind::Connect, e.to_string(), true)),
                }
            };
            let mut held = conn.held.take();
            if let Some(other) = held.take_if(|h| !h.serves(&rt, route_idx, idx, addr)) {
                other.release(&self.connector);
            }
            // Something arrived on it, or it closed: not reusable.
            let held = held.and_then(Held::quiet);
            let upstream_stream = match held {
                Some(h) => Ok((h.stream, true, h.reuse_hash)),
                None => {
                    let peer = up.peer.for_address(addr);
                    let hash = peer.reuse_hash();
                    self.connector
                        .get_stream(&*peer)
                        .await
                        .map(|(s, reused)| (s, reused, hash))
                }
            };
            let (ups, reused, reuse_hash) = match upstream_stream {
                Ok(s) => {
                    if !s.1 {
                        crate::model::peer::tune_tls(&s.0);
                    }
                    s
                }
                Err(e) => match connect_failed(route, idx, point, first_attempt, &addr, &e) {
                    Some(next) => {
                        first_attempt = false;
                        idx = next;
                        continue;
                    }
                    None => {
                        let kind = ErrorKind::of(&e);
                        break Err((kind, e.to_string(), true));
                    }
                },
            };
            build_request(
                &mut conn.out,
                req,
                &ask,
                route,
                up,
                conn.peer_text.as_deref(),
            );
            let exchanged = self
                .exchange(conn, ups, reused, &ask, route, up, addr, closing)
                .await;
            match exchanged {
                Ok((done, reusable)) => {
                    if let Some(stream) = reusable {
                        conn.held = Some(Held {
                            runtime: rt.clone(),
                            route: route_idx,
                            upstream: idx,
                            addr,
                            reuse_hash,
                            idle: up.config.timeouts.idle,
                            stream,
                        });
                    }
                    break Ok(done);
                }
                Err(failure) => break Err(failure),
            }
        };

        let up = &route.upstreams[idx];
        let (status, bytes, keep_client) = match outcome {
            Ok(done) => (done.status, done.bytes, done.keep_client),
            Err((kind, cause, counted)) => {
                let status = if kind == ErrorKind::Timeout { 504 } else { 502 };
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
                let status = if write_error(&mut conn.stream, status).await {
                    status
                } else {
                    499
                };
                (status, 0, false)
            }
        };
        let elapsed = started.elapsed();
        up.metrics.record(status, elapsed, bytes);
        if let Some(log) = &self.shared.access_log {
            log.log(&crate::observe::access_log::Entry {
                time: std::time::SystemTime::now(),
                client,
                method: req.method.unwrap_or("-"),
                host: std::str::from_utf8(ask.host).unwrap_or("-"),
                path: std::str::from_utf8(ask.path).unwrap_or("-"),
                version: "HTTP/1.1",
                status,
                route: &route.name,
                upstream: &up.name,
                upstream_addr: tried,
                duration: elapsed,
                bytes,
                phase: &rt.config.phase,
                referer: header_str(req, "referer"),
                user_agent: header_str(req, "user-agent"),
            });
        }
        Step::Served { keep_client }
    }

    /// Send the request in `conn.out` and relay the response. On success, the
    /// upstream stream comes back if it can serve another request. A reused
    /// connection that the upstream closed while idle gets one fresh retry:
    /// the request is a GET or HEAD, so sending it twice is safe.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        conn: &mut Conn,
        mut ups: Stream,
        mut reused: bool,
        ask: &Ask<'_>,
        route: &Route,
        up: &Upstream,
        addr: SocketAddr,
        closing: bool,
    ) -> Result<(Done, Option<Stream>), (ErrorKind, String, bool)> {
        let t = &up.config.timeouts;
        let fail = |kind: ErrorKind, cause: String| Err((kind, cause, false));
        let (mut end, mut folded) = loop {
            conn.resp.clear();
            let sent = match timeout(t.write, async {
                ups.write_all(&conn.out).await?;
                ups.flush().await
            })
            .await
            {
                Ok(r) => r,
                Err(_) => return fail(ErrorKind::Timeout, "writing the request timed out".into()),
            };
            let head = match sent {
                Ok(()) => read_response_head(&mut ups, &mut conn.resp, t.read).await,
                Err(e) => Err(HeadError::Io(e)),
            };
            match head {
                Ok(found) => break found,
                Err(HeadError::Io(e)) if reused && conn.resp.is_empty() => {
                    debug!("idle upstream connection to {addr} was closed ({e}); reconnecting");
                    reused = false;
                    let peer = up.peer.for_address(addr);
                    ups = match self.connector.new_stream(&*peer).await {
                        Ok(s) => {
                            crate::model::peer::tune_tls(&s);
                            s
                        }
                        Err(e) => {
                            let kind = ErrorKind::of(&e);
                            up.metrics.count_error(kind);
                            return Err((kind, e.to_string(), true));
                        }
                    };
                }
                Err(e) => return fail(e.kind(), e.to_string()),
            }
        };
        let mut interim = 0;
        let close = closing || ask.client_close;
        let (status, head_len, framing, upstream_keep) = loop {
            let head = &conn.resp[..end];
            match client_head(head, folded, ask.head, route, close, &mut conn.out) {
                Err(why) => return fail(ErrorKind::Other, why),
                Ok(UpstreamHead::Final { status, framing }) => {
                    break (status, end, framing.body, framing.reusable)
                }
                Ok(UpstreamHead::Interim) => {
                    // Not forwarded (as the Pingora path and nginx); the
                    // final response follows on the same connection.
                    interim += 1;
                    if interim > policy::framing::MAX_INTERIM_RESPONSES {
                        return fail(ErrorKind::Other, "too many informational responses".into());
                    }
                    conn.resp.drain(..end);
                    (end, folded) = match read_response_head(&mut ups, &mut conn.resp, t.read).await
                    {
                        Ok(found) => found,
                        Err(e) => return fail(e.kind(), e.to_string()),
                    };
                }
            }
        };

        // The head, plus what body has arrived, in one write.
        let mut upstream_eof = false;
        if !matches!(framing, Framing::None) {
            let want = head_len + batch_size(&framing);
            upstream_eof = !matches!(read_available(&mut ups, &mut conn.resp, want), Ok(false));
        }
        let keep_client = !(closing || ask.client_close || matches!(framing, Framing::Close));
        let mut framing = framing;
        let mut body_bytes = 0u64;
        let Some(first) = body_part(&mut framing, &conn.resp[head_len..]) else {
            return fail(ErrorKind::Other, "malformed chunked body".into());
        };
        let mut finished = first.finished;
        let mut clean = first.clean;
        let first_body = &conn.resp[head_len..head_len + first.relay];
        body_bytes += first.relay as u64;
        let done = |bytes, keep_client| Done {
            status,
            bytes,
            keep_client,
        };
        if let Err(e) = to_client(write_head_and_body(
            &mut conn.stream,
            &mut conn.out,
            first_body,
            first.tail(),
        ))
        .await
        {
            debug!("client went away before the response head: {e}");
            let gone = Done {
                status: 499,
                bytes: 0,
                keep_client: false,
            };
            // The whole response was read: the upstream connection is fine,
            // keep it (a client giving up must not cost a TLS handshake).
            let reusable = finished && clean && upstream_keep && !upstream_eof;
            return Ok((gone, reusable.then_some(ups)));
        }
        while !finished {
            if upstream_eof {
                if matches!(framing, Framing::Close) {
                    clean = false;
                    break;
                }
                up.metrics.count_error(ErrorKind::Reset);
                limited!(warn, "upstream {} closed the connection mid-body", up.name);
                return Ok((done(body_bytes, false), None));
            }
            conn.resp.clear();
            conn.resp.reserve(READ_CHUNK);
            let n = match timeout(t.read, ups.read_buf(&mut conn.resp)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    up.metrics.count_error(ErrorKind::Reset);
                    limited!(warn, "upstream {} failed mid-body: {e}", up.name);
                    return Ok((done(body_bytes, false), None));
                }
                Err(_) => {
                    up.metrics.count_error(ErrorKind::Timeout);
                    limited!(warn, "upstream {} timed out mid-body", up.name);
                    return Ok((done(body_bytes, false), None));
                }
            };
            if n == 0 {
                // Handled with the other end-of-stream case at the loop's top.
                upstream_eof = true;
                continue;
            }
            // Whatever else is already there goes out in the same client write.
            let want = batch_size(&framing);
            upstream_eof = !matches!(read_available(&mut ups, &mut conn.resp, want), Ok(false));
            let Some(part) = body_part(&mut framing, &conn.resp) else {
                // What went out so far was well-formed; the client sees the
                // response cut short, never the malformed bytes.
                up.metrics.count_error(ErrorKind::Other);
                limited!(
                    warn,
                    "upstream {} sent a malformed chunked body; response cut",
                    up.name
                );
                return Ok((done(body_bytes, false), None));
            };
            finished = part.finished;
            clean = part.clean;
            let sent = to_client(write_parts(
                &mut conn.stream,
                &[&conn.resp[..part.relay], part.tail()],
            ))
            .await;
            if sent.is_err() {
                return Ok((done(body_bytes, false), None));
            }
            body_bytes += part.relay as u64;
        }
        if to_client(conn.stream.flush()).await.is_err() {
            return Ok((done(body_bytes, false), None));
        }
        // A large body grew the buffer; do not keep 64 KiB per idle client.
        if conn.resp.capacity() > 2 * READ_CHUNK {
            conn.resp = Vec::with_capacity(READ_CHUNK);
        }
        let reusable = (upstream_keep && clean && !upstream_eof).then_some(ups);
        Ok((done(body_bytes, keep_client), reusable))
    }
}

/// The fast path's part of a request and the route that owns its Host, or
/// `None` when the request is not one it serves.
fn route_request<'b>(req: &httparse::Request<'_, 'b>, rt: &Runtime) -> Option<(Ask<'b>, usize)> {
    let ask = eligible(req)?;
    let host = normalize_authority(ask.host).ok()?;
    let route = rt.hosts.route_for_host(host.as_str())?;
    Some((ask, route))
}

/// The per-request work of the fast path that needs no I/O, for the
/// benchmarks: parse a request head, check and route it, and write the
/// upstream request into `out`; `false` if it would be handed over.
pub fn prepare_request(head: &[u8], rt: &Runtime, peer: Option<&str>, out: &mut Vec<u8>) -> bool {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
    let Some(req) = parse_request(head, &mut headers) else {
        return false;
    };
    let Some((ask, route_idx)) = route_request(&req, rt) else {
        return false;
    };
    let route = &rt.routes[route_idx];
    let Some(idx) = choose(&route.upstreams, 0, None) else {
        return false;
    };
    build_request(out, &req, &ask, route, &route.upstreams[idx], peer);
    true
}

/// The same for a response head from the upstream: parse it, find its
/// framing, and write the head the client gets into `out`; `false` if the
/// upstream's head is refused (or is an interim one).
pub fn prepare_response(head: &[u8], route: &Route, out: &mut Vec<u8>) -> bool {
    let folded = head_end_and_folds(head).is_some_and(|(_, f)| f);
    matches!(
        client_head(head, folded, false, route, false, out),
        Ok(UpstreamHead::Final { .. })
    )
}

/// What a response head from the upstream is, for the fast path.
enum UpstreamHead {
    /// 1xx (other than 101): skipped, the final response follows.
    Interim,
    /// The final response; its head for the client is in `out`.
    Final {
        status: u16,
        framing: ResponseFraming,
    },
}

/// Read one whole response head (`head`, exactly; `folded`: it holds an
/// obs-fold), check it against the shared policy, and for a final response
/// write the head the client gets into `out`; `Err` with the cause when it
/// must not be relayed (502).
fn client_head(
    head: &[u8],
    folded: bool,
    head_request: bool,
    route: &Route,
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
    build_response_head(out, &resp, route, &framing, close, folded);
    Ok(UpstreamHead::Final { status, framing })
}

/// For the fuzzers: what [`client_head`] makes of `head` — the final
/// status and the client's head in `out`, or why it is refused; `Ok(None)`
/// for an interim head.
#[doc(hidden)]
pub fn client_head_for_fuzzing(
    head: &[u8],
    head_request: bool,
    route: &Route,
    out: &mut Vec<u8>,
) -> Result<Option<u16>, String> {
    let folded = head_end_and_folds(head).is_some_and(|(_, f)| f);
    client_head(head, folded, head_request, route, false, out).map(|h| match h {
        UpstreamHead::Interim => None,
        UpstreamHead::Final { status, .. } => Some(status),
    })
}

/// A whole request head, exactly `buf`; `None` for anything else. The header
/// array is left uninitialised (httparse fills what it uses): zeroing 64
/// entries on every request showed up in the profile.
fn parse_request<'h, 'b>(
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Option<httparse::Request<'h, 'b>> {
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, headers) {
        Ok(httparse::Status::Complete(n)) if n == buf.len() => Some(req),
        _ => None,
    }
}

/// The same for a response head, read as the Pingora path reads it (RFC
/// 9112 5.1, 5.2 allow a proxy this, provided what it forwards is
/// canonical): whitespace before a field's colon is accepted and dropped,
/// and an obs-fold is accepted and forwarded as one space.
fn parse_response<'h, 'b>(
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

/// The request line and headers the fast path forwards, or `None` when the
/// request is not one it serves. What it does not serve goes to the Pingora
/// path, which applies the same policy and refuses what must be refused.
fn eligible<'b>(req: &httparse::Request<'_, 'b>) -> Option<Ask<'b>> {
    if req.version != Some(1) {
        return None;
    }
    let head = match req.method? {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    let path = req.path?.as_bytes();
    if policy::refusal::request_target(b"GET", path) != Ok(TargetForm::Origin) {
        return None;
    }
    // One pass over the fields; what the policy decides from them is decided
    // by the policy's own collectors.
    let mut framing = FramingFields::default();
    let mut connection = ConnectionOptions::default();
    let mut host = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if framing.add(name, h.value) {
            continue;
        }
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") && host.replace(h.value).is_some() => {
                return None;
            }
            10 if name.eq_ignore_ascii_case(b"connection") => connection.add(h.value),
            6 if name.eq_ignore_ascii_case(b"expect") => return None,
            7 if name.eq_ignore_ascii_case(b"upgrade") => return None,
            _ => {}
        }
    }
    if framing.request_body(false) != Ok(RequestBody::None) {
        return None;
    }
    if connection.upgrade {
        return None;
    }
    Some(Ask {
        head,
        host: host?,
        path,
        client_close: connection.close,
        nominates: connection.nominates,
    })
}

/// Whether a client field goes upstream as it came: not a hop-by-hop field
/// (the shared policy), not one cutover writes itself, not one the route
/// edits.
fn forwarded_as_is(
    name: &str,
    req: &httparse::Request<'_, '_>,
    ask: &Ask<'_>,
    route: &Route,
) -> bool {
    const WRITTEN: [&str; 5] = [
        "host",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ];
    let n = name.as_bytes();
    let replaced = WRITTEN.iter().any(|h| name.eq_ignore_ascii_case(h))
        || edited(&route.request_headers, name)
        || (ask.nominates && nominated(n, header_values(req, Some("connection"))));
    policy::fields::forward_request_field(n, false) && !replaced
}

/// Whether the route removes or sets the header `name`.
fn edited(edits: &HeaderEdits, name: &str) -> bool {
    !edits.is_empty()
        && edits
            .remove
            .iter()
            .chain(edits.set.iter().map(|(n, _)| n))
            .any(|h| name.eq_ignore_ascii_case(h.as_str()))
}

/// The upstream request, as the Pingora path would send it: origin-form
/// target, Host rewritten to the upstream's `host_header`, forwarding headers
/// and the route's edits.
fn build_request(
    out: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    ask: &Ask<'_>,
    route: &Route,
    up: &Upstream,
    peer: Option<&str>,
) {
    out.clear();
    out.reserve(2048);
    out.extend_from_slice(if ask.head { b"HEAD " } else { b"GET " });
    out.extend_from_slice(ask.path);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(up.host_header.as_ref().map_or(ask.host, |h| h.as_bytes()));
    out.extend_from_slice(b"\r\n");
    let edits = &route.request_headers;
    let mut xff_seen = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("x-forwarded-for") && !edited(edits, "x-forwarded-for") {
            out.extend_from_slice(if xff_seen {
                b", "
            } else {
                b"X-Forwarded-For: "
            });
            out.extend_from_slice(h.value.trim_ascii());
            xff_seen = true;
        }
    }
    if let Some(peer) = peer.filter(|_| !edited(edits, "x-forwarded-for")) {
        out.extend_from_slice(if xff_seen {
            b", "
        } else {
            b"X-Forwarded-For: "
        });
        out.extend_from_slice(peer.as_bytes());
        xff_seen = true;
    }
    if xff_seen {
        out.extend_from_slice(b"\r\n");
    }
    if !edited(edits, "x-forwarded-proto") {
        out.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
    }
    if !edited(edits, "x-forwarded-host") {
        push_header(out, b"X-Forwarded-Host", ask.host);
    }
    for h in req.headers.iter() {
        if forwarded_as_is(h.name, req, ask, route) {
            push_header(out, h.name.as_bytes(), h.value);
        }
    }
    for (name, value) in &route.request_headers.set {
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// A response field, each obs-fold (CRLF and the whitespace after it) of
/// its value written as one space.
fn push_unfolded(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    let mut rest = value;
    while let Some(i) = memchr::memchr2(b'\r', b'\n', rest) {
        out.extend_from_slice(&rest[..i]);
        out.push(b' ');
        rest = rest[i..].trim_ascii_start();
    }
    out.extend_from_slice(rest);
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The response head for the client: the upstream's, minus the fields the
/// shared policy does not forward, with the route's edits, and
/// `Connection: close` when this is the connection's last response.
fn build_response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    route: &Route,
    framing: &ResponseFraming,
    close: bool,
    folded: bool,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code = itoa::Buffer::new();
    let status = resp.code.unwrap_or(502);
    out.extend_from_slice(code.format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let edits = &route.response_headers;
    let connection_values = || {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .map(|h| h.value)
    };
    let nominates = framing.nominates;
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        let dropped = (framing.drop_content_length
            && h.name.eq_ignore_ascii_case("content-length"))
            || (nominates && nominated(n, connection_values()))
            || edited(edits, h.name);
        if policy::fields::forward_response_field(n, status) && !dropped {
            if folded {
                push_unfolded(out, n, h.value);
            } else {
                push_header(out, n, h.value);
            }
        }
    }
    for (name, value) in &edits.set {
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if close || matches!(framing.body, Framing::Close) {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response's framing as the fast path relays it.
struct ResponseFraming {
    body: Framing,
    reusable: bool,
    drop_content_length: bool,
    /// The response's `Connection` names fields that are not forwarded.
    nominates: bool,
}

/// How the body is delimited (the shared policy), and whether the upstream
/// connection may be reused after it; `Err` with the reason for a response
/// whose framing could be read two ways.
fn response_framing(
    resp: &httparse::Response<'_, '_>,
    head_request: bool,
) -> Result<ResponseFraming, &'static str> {
    let mut framing = FramingFields::default();
    let mut connection = ConnectionOptions::default();
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if !framing.add(name, h.value) && name.eq_ignore_ascii_case(b"connection") {
            connection.add(h.value);
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
    })
}

/// The part of a read that belongs to the body.
struct Part {
    /// How many of the bytes are forwarded as they are.
    relay: usize,
    /// The body is complete.
    finished: bool,
    /// Nothing followed the body (the connection can be reused).
    clean: bool,
    /// The forwarded body needs a final CRLF of cutover's own (its chunked
    /// trailers were dropped).
    terminator: bool,
}

impl Part {
    fn tail(&self) -> &'static [u8] {
        if self.terminator {
            b"\r\n"
        } else {
            b""
        }
    }
}

/// How much of `bytes` belongs to the body; `None`: malformed.
fn body_part(framing: &mut Framing, bytes: &[u8]) -> Option<Part> {
    let part = |relay, finished, clean| Part {
        relay,
        finished,
        clean,
        terminator: false,
    };
    Some(match framing {
        Framing::None => part(0, true, bytes.is_empty()),
        Framing::Length(left) => {
            let take = (*left).min(bytes.len() as u64);
            *left -= take;
            let take = take as usize;
            part(take, *left == 0, take == bytes.len())
        }
        Framing::Chunked(c) => {
            let s = c.feed(bytes).ok()?;
            Part {
                relay: s.relay,
                finished: s.end.is_some(),
                clean: s.end.is_none_or(|e| e == bytes.len()),
                terminator: s.terminator,
            }
        }
        Framing::Close => part(bytes.len(), false, false),
    })
}

enum HeadError {
    Io(std::io::Error),
    Timeout,
    TooLarge,
}

impl HeadError {
    fn kind(&self) -> ErrorKind {
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

/// The response head and the first body bytes in one syscall: a small body
/// is copied behind the head, a large one goes out with a vectored write.
/// `tail` (a chunked body's final CRLF, or nothing) follows the body.
async fn write_head_and_body(
    stream: &mut Stream,
    head: &mut Vec<u8>,
    body: &[u8],
    tail: &[u8],
) -> std::io::Result<()> {
    if body.len() <= 16 * 1024 {
        head.extend_from_slice(body);
        head.extend_from_slice(tail);
        return stream.write_all(head).await;
    }
    write_parts(stream, &[head, body, tail]).await
}

/// Write `parts` in order, as few syscalls as the socket allows.
async fn write_parts(stream: &mut Stream, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut parts: [&[u8]; 3] = [
        parts.first().copied().unwrap_or(b""),
        parts.get(1).copied().unwrap_or(b""),
        parts.get(2).copied().unwrap_or(b""),
    ];
    let mut first = 0;
    while first < parts.len() {
        if parts[first].is_empty() {
            first += 1;
            continue;
        }
        if parts[first + 1..].iter().all(|p| p.is_empty()) {
            return stream.write_all(parts[first]).await;
        }
        let slices = parts.map(std::io::IoSlice::new);
        let mut n = stream.write_vectored(&slices[first..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        for p in parts[first..].iter_mut() {
            let k = n.min(p.len());
            *p = &p[k..];
            n -= k;
        }
    }
    Ok(())
}

/// How many body bytes to gather before writing to the client: up to
/// `BODY_BATCH`, never past the end of a length-delimited body.
fn batch_size(framing: &Framing) -> usize {
    match framing {
        Framing::Length(left) => (*left).min(BODY_BATCH as u64) as usize,
        _ => BODY_BATCH,
    }
}

/// Append what the upstream has already sent, without waiting, until `buf`
/// holds `want` bytes; `Ok(true)` if the upstream closed. OpenSSL hands out
/// one TLS record (at most 16 KiB) per read, so a large body would otherwise
/// cost one client write per record.
fn read_available(ups: &mut Stream, buf: &mut Vec<u8>, want: usize) -> std::io::Result<bool> {
    // Polled once with a no-op waker: a `Pending` here only means "not yet";
    // the caller's next real read registers the task's waker again.
    let mut cx = Context::from_waker(Waker::noop());
    while buf.len() < want {
        buf.reserve(READ_CHUNK.min(want - buf.len()));
        match pin!(ups.read_buf(buf)).poll(&mut cx) {
            Poll::Ready(Ok(0)) => return Ok(true),
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(false)
}

/// Read until `buf` holds a whole response head; its length, and whether it
/// holds an obs-fold.
async fn read_response_head(
    ups: &mut Stream,
    buf: &mut Vec<u8>,
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
        match tokio::time::timeout(limit, ups.read_buf(buf)).await {
            Err(_) => return Err(HeadError::Timeout),
            Ok(Err(e)) => return Err(HeadError::Io(e)),
            Ok(Ok(0)) => {
                return Err(HeadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// The length of the head at the start of `buf`, once it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    head_end_and_folds(buf).map(|(end, _)| end)
}

/// The same, and whether the head holds an obs-fold (a line end followed by
/// whitespace), found in the same walk over its line ends.
fn head_end_and_folds(buf: &[u8]) -> Option<(usize, bool)> {
    // Visit each LF (memchr: no per-call setup, unlike memmem) and look at
    // what follows: CRLF or a bare LF ends the head.
    let mut folded = false;
    memchr::memchr_iter(b'\n', buf).find_map(|i| match buf.get(i + 1..i + 3) {
        Some([b'\r', b'\n']) => Some((i + 3, folded)),
        Some([b'\n', _]) => Some((i + 2, folded)),
        None if buf.get(i + 1) == Some(&b'\n') => Some((i + 2, folded)),
        Some([b' ' | b'\t', _]) => {
            folded = true;
            None
        }
        _ => None,
    })
}

fn header_values<'a>(
    req: &'a httparse::Request<'_, '_>,
    name: Option<&'a str>,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    req.headers
        .iter()
        .filter(move |h| name.is_some_and(|n| h.name.eq_ignore_ascii_case(n)))
        .map(|h| h.value)
}

fn header_str<'a>(req: &'a httparse::Request<'_, '_>, name: &str) -> &'a str {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .unwrap_or("")
}

/// A write to the client, bounded like nginx's `send_timeout`: a client that
/// stops reading must not hold its task, buffers and upstream connection.
async fn to_client<T>(write: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    match timeout(CLIENT_SEND, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Tell the client the proxying failed; `false` if it is gone.
async fn write_error(stream: &mut Stream, status: u16) -> bool {
    let head: &[u8] = match status {
        504 => b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n",
        _ => b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n",
    };
    let sent = to_client(async {
        stream.write_all(head).await?;
        stream.flush().await
    })
    .await
    .is_ok();
    if !sent {
        debug!("could not send {status} to the client");
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_ends_and_folds() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nNEXT"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), None);
        assert_eq!(
            head_end_and_folds(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n"),
            Some((29, true))
        );
        assert_eq!(
            head_end_and_folds(b"HTTP/1.1 200 OK\r\nX: a\r\n\r\n b"),
            Some((25, false)),
            "whitespace after the head is not a fold"
        );
    }

    #[test]
    fn unfolded_values_are_one_space_per_fold() {
        let mut out = Vec::new();
        push_unfolded(&mut out, b"X", b"a\r\n  b\r\n\tc");
        assert_eq!(out, b"X: a b c\r\n");
    }
}

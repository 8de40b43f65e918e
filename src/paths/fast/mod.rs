//! The common request, forwarded without Pingora's general HTTP machinery.
//!
//! Why: under wrk, Pingora's proxy loop cost about 135,000 instructions per
//! request (a ~9 KiB future moved on every request, ~90 allocations, request
//! header clones, and a pool round trip with an idle-watch task per
//! request), twice nginx's CPU for the same job. This module serves the
//! requests a CDN migration is made of — HTTP/1.1 `GET`, `HEAD`, and `POST`,
//! `PUT`, `DELETE`, `OPTIONS`, `PATCH` with no body, a `Content-Length` one
//! or a chunked one, with one Host that a route owns, on plain and TLS
//! listeners alike —
//! with one parse of the head, one write upstream and one write to the
//! client, and keeps the upstream connection with the client connection
//! between its requests.
//!
//! Everything else — other methods, HTTP/1.0, `Upgrade`, `Expect`,
//! absolute-form targets, a missing or unknown Host, anything malformed
//! (a chunked body that does not parse in the bytes read with its head
//! included) — is handed, with the bytes already read replayed first, to
//! the Pingora proxy ([`crate::paths::pingora::PingoraPath`]) for the rest
//! of the connection, so
//! each unusual case has exactly one implementation. Both paths share the
//! runtime model, upstream selection, failover, metrics and access log.

use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod body;
pub mod chunked;
mod forward;
mod head;
mod request;
mod response;
mod timer;
mod upload;

pub use request::prepare_request;
pub use response::{client_head_for_fuzzing, prepare_response};

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::tls::ssl::SslAcceptor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::timeout;

use self::body::{to_client, write_error};
use self::head::head_end;
use self::request::parse_request;

use crate::config::ProxyProtocolMode;
use crate::model::peer::read_when_ready;
use crate::model::{Model, Process};
use crate::paths::client::{
    accept_failed, handshake_failed, read_proxy_start, refuse_over_capacity, set_client_address,
    ClientStream,
};
use crate::paths::request::unread_head;
use crate::policy::handover::Handover;
use crate::policy::refusal::Refusal;
use crate::policy::timeouts::{ClientTimeouts, CLIENT};

/// The TCP peer's address (or, after a PROXY header, the client's).
fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
}
/// Larger request heads go to Pingora, whose limit is higher.
const MAX_HEAD: usize = 16 * 1024;
const MAX_REQUEST_HEADERS: usize = 64;
const MAX_RESPONSE_HEADERS: usize = 128;
const READ_CHUNK: usize = 16 * 1024;
/// The read buffer of a client connection between requests: while it is
/// idle, and while it is busy (room for a head and a 4 KiB body in one
/// read: one syscall fewer per small upload).
const IDLE_READ: usize = 4096;
const BUSY_READ: usize = 8192;
/// Body bytes gathered per client write when more is already waiting.
const BODY_BATCH: usize = 64 * 1024;
/// How long an idle client keeps its upstream connection before it goes back
/// to the process pool (where Pingora watches it for the idle timeout).
const HOLD_UPSTREAM: Duration = Duration::from_secs(1);

pub struct FastPath<A> {
    /// The Pingora proxy that serves whatever this module hands over.
    pub pingora: Arc<A>,
    process: Arc<Process>,
    connector: TransportConnector,
    closing: AtomicBool,
    open: crate::paths::memory::OpenConnections,
    close_idle: Notify,
    /// By listener index: the TLS settings of a TLS listener that reads a
    /// PROXY header first (cutover does its handshake after the header).
    after_proxy: Vec<Option<Arc<SslAcceptor>>>,
}

impl<A> FastPath<A> {
    pub fn new(
        pingora: Arc<A>,
        process: Arc<Process>,
        conf: &ServerConf,
        after_proxy: Vec<Option<Arc<SslAcceptor>>>,
    ) -> Self {
        Self {
            after_proxy,
            pingora,
            process,
            connector: TransportConnector::new(Some(ConnectorOptions::from_server_conf(conf))),
            closing: AtomicBool::new(false),
            open: crate::paths::memory::OpenConnections::default(),
            close_idle: Notify::new(),
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for FastPath<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _open = self.open.open();
        let mut stream = stream;
        let listeners = &self.process.listeners;
        let listener = listeners.same_for_all().or_else(|| {
            let local = stream
                .get_socket_digest()
                .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
            listeners.find(local)
        });
        let timeouts = listener.map_or(CLIENT, |l| l.timeouts);
        // Its place among the listener's connections, held until it
        // closes (on either carrier); past `max_connections`, a 503.
        let _slot = match listener.map(|l| (l, l.limit.admit())) {
            Some((l, None)) => {
                refuse_over_capacity(stream, l).await;
                return None;
            }
            Some((_, slot)) => slot,
            None => None,
        };
        // A PROXY header is read (and the client address taken from it)
        // before either carrier sees the connection.
        let mut first = Vec::new();
        let mut vpce = None;
        if let Some(l) = listener.filter(|l| l.proxy_protocol != ProxyProtocolMode::Off) {
            let tcp_peer = peer_ip(&stream);
            let counters = &self.process.metrics.proxy_protocol;
            let start = read_proxy_start(&mut stream, l, tcp_peer, counters).await?;
            if let Some(h) = start.header {
                if let Some(source) = h.source {
                    set_client_address(&mut stream, source);
                }
                vpce = h.vpce.map(Arc::from);
            }
            first = start.rest;
            if let Some(acceptor) = self.after_proxy.get(l.index).and_then(Option::as_ref) {
                // The bytes read after the header start the TLS handshake.
                let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
                l4.rewind(&first);
                first = Vec::new();
                let handshake = pingora::protocols::tls::server::handshake(acceptor, *l4);
                stream = match timeout(timeouts.idle, handshake).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => {
                        handshake_failed(&self.process.metrics, None, &e);
                        return None;
                    }
                    Err(_) => {
                        let e = pingora::Error::explain(
                            pingora::ErrorType::TLSHandshakeTimedout,
                            "no TLS handshake after the PROXY header within the idle timeout",
                        );
                        handshake_failed(&self.process.metrics, None, &e);
                        return None;
                    }
                };
            }
        }
        let peer = peer_ip(&stream);
        first.reserve(IDLE_READ);
        let tls = stream.get_ssl_digest().is_some();
        if tls {
            crate::model::peer::tune_tls(&stream);
        }
        let mut conn = Conn {
            lean: !tls,
            tls,
            timeouts,
            vpce,
            peer,
            peer_text: peer.map(|p| p.to_string()),
            stream,
            buf: first,
            out: Vec::new(),
            resp: Vec::new(),
            body: Vec::new(),
            held: None,
            timer: timer::Timer::new(),
            ups_timer: timer::Timer::new(),
        };
        let handover = self.serve(&mut conn, shutdown).await;
        if let Some(held) = conn.held.take() {
            held.release(&self.connector);
        }
        let reason = handover?;
        self.process.metrics.handed_over[reason as usize].inc();
        self.to_pingora(conn.stream, timeouts, conn.vpce, conn.buf, shutdown)
            .await
    }

    fn accept_error(&self, error: &pingora::Error) -> bool {
        accept_failed(&self.process.metrics, error)
    }

    fn handshake_error(
        &self,
        peer: Option<&pingora::protocols::l4::socket::SocketAddr>,
        error: &pingora::Error,
    ) -> bool {
        handshake_failed(&self.process.metrics, peer, error)
    }

    async fn cleanup(&self) {
        self.closing.store(true, Ordering::Release);
        self.close_idle.notify_waiters();
        self.pingora.http_cleanup().await;
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> FastPath<A> {
    /// The rest of the connection on the Pingora path: Pingora's HTTP/1
    /// session loop (what its `ServerApp` does for HTTP/1; cutover offers
    /// no HTTP/2), over the client stream that first replays `read` (what
    /// the fast path read and did not serve) and applies the listener's
    /// idle and head timeouts ([`crate::paths::client`]), with Pingora's
    /// own keep-alive timer off.
    async fn to_pingora(
        &self,
        stream: Stream,
        timeouts: ClientTimeouts,
        vpce: Option<Arc<str>>,
        read: Vec<u8>,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream: Stream = Box::new(ClientStream::new(stream, timeouts, vpce, read));
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(0) });
        session.set_keepalive_reuses_remaining(
            self.pingora
                .server_options()
                .and_then(|o| o.keepalive_request_limit),
        );
        let mut result = self.pingora.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            result = self.pingora.process_new_http(session, shutdown).await;
        }
        None
    }
}

/// One client connection's state, kept across its requests.
struct Conn {
    /// A TLS listener's (decrypted by Pingora, or by cutover after a PROXY
    /// header).
    tls: bool,
    /// Its listener's idle and head timeouts.
    timeouts: ClientTimeouts,
    /// The AWS VPC endpoint id of its PROXY header.
    vpce: Option<Arc<str>>,
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
    /// Request body bytes read from the client after its head's read.
    body: Vec<u8>,
    /// The upstream connection the last request used, while it stays usable.
    held: Option<Held>,
    /// Whether it holds no buffer beyond its read buffer: it has been idle
    /// for [`HOLD_UPSTREAM`] since its last request (or its handshake).
    lean: bool,
    /// The waits for the client (its next request, a head, a body) and
    /// those for the upstream (writes, the response): two timers, so that
    /// each deadline moves later at almost every wait ([`timer`]).
    timer: timer::Timer,
    ups_timer: timer::Timer,
}

/// An upstream connection kept between a client's requests: the next request
/// to the same upstream address, on the same model, uses it without a pool
/// round trip.
struct Held {
    model: Arc<Model>,
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

    /// Whether it is a connection to this upstream of this route, on this
    /// model.
    fn serves_upstream(&self, model: &Arc<Model>, route: usize, upstream: usize) -> bool {
        Arc::ptr_eq(&self.model, model) && self.route == route && self.upstream == upstream
    }

    fn serves(&self, model: &Arc<Model>, route: usize, upstream: usize, addr: SocketAddr) -> bool {
        self.serves_upstream(model, route, upstream) && self.addr == addr
    }
}

/// What the client has sent so far.
enum Head {
    /// A whole request head, this long.
    Whole(usize),
    /// No head end within [`MAX_HEAD`] bytes.
    TooLarge,
}

enum Step {
    /// Served; go on with the next request if the client connection stays.
    /// `body_read`: how many bytes after the head in the client's buffer
    /// were the request's body.
    Served { keep_client: bool, body_read: usize },
    /// Not for the fast path: hand the connection, unread, to Pingora.
    Handover(Handover),
}

impl<A: HttpServerApp + Send + Sync + 'static> FastPath<A> {
    /// Serve requests until the connection ends (`None`) or one must go to
    /// Pingora (why, with the unserved bytes still in `conn.buf`).
    async fn serve(&self, conn: &mut Conn, shutdown: &ShutdownWatch) -> Option<Handover> {
        loop {
            let head_end = match self.read_head(conn).await? {
                Head::Whole(end) => end,
                Head::TooLarge => return Some(Handover::HeadSize),
            };
            match self.one_request(conn, head_end, shutdown).await {
                Step::Served {
                    keep_client: true, ..
                } => {}
                Step::Served {
                    keep_client: false, ..
                } => {
                    let _ = to_client(conn.stream.shutdown()).await;
                    return None;
                }
                Step::Handover(reason) => return Some(reason),
            }
        }
    }

    /// Read until `conn.buf` holds a whole request head; `None` when the
    /// connection ended, went idle longer than the listener's
    /// `keepalive_timeout`, or did not finish a head within its
    /// `header_timeout` (answered 408). A head that is too large is handed
    /// over as it is (Pingora answers it).
    async fn read_head(&self, conn: &mut Conn) -> Option<Head> {
        // The idle wait ends at one instant however often the held upstream
        // connection is released meanwhile; a started head must be complete
        // within `head` in all (like nginx's client_header_timeout), not per
        // read: a client trickling one byte at a time cannot hold the
        // connection open.
        let idle_until = Instant::now() + conn.timeouts.idle;
        let mut head_deadline: Option<Instant> = None;
        loop {
            if let Some(end) = head_end(&conn.buf) {
                return Some(Head::Whole(end));
            }
            if conn.buf.len() >= MAX_HEAD {
                return Some(Head::TooLarge);
            }
            if conn.buf.is_empty() {
                // Between requests. The upstream connection stays with this
                // client for a moment (a busy client's next request reuses
                // it without a pool round trip), then goes back to the
                // process pool rather than sit idle here.
                let until = if conn.held.is_some() || !conn.lean {
                    idle_until.min(Instant::now() + HOLD_UPSTREAM)
                } else {
                    idle_until
                };
                // A `Notified` sees every `notify_waiters` made after it was
                // created, polled or not; it is polled (and takes the Notify's
                // lock) only when the read has to wait, thanks to `biased`.
                let closed = self.close_idle.notified();
                if self.closing.load(Ordering::Acquire) {
                    return None;
                }
                // A busy connection reads into room for a head and a small
                // body at once (a 4 KiB POST in one read); an idle one keeps
                // 4 KiB.
                conn.buf
                    .reserve(if conn.lean { IDLE_READ } else { BUSY_READ });
                tokio::select! {
                    biased;
                    r = conn.timer.until(until, read_when_ready(&mut conn.stream, &mut conn.buf)) => match r {
                        Ok(Ok(n)) if n > 0 => {
                            conn.lean = false;
                            continue;
                        }
                        Err(_) if conn.held.is_some() || !conn.lean => {
                            if let Some(held) = conn.held.take() {
                                held.release(&self.connector);
                            }
                            // An idle client keeps only its read buffer.
                            conn.out = Vec::new();
                            conn.resp = Vec::new();
                            conn.body = Vec::new();
                            conn.buf.shrink_to(IDLE_READ);
                            conn.lean = true;
                            continue;
                        }
                        _ => return None,
                    },
                    _ = closed => return None,
                }
            }
            let deadline =
                *head_deadline.get_or_insert_with(|| Instant::now() + conn.timeouts.head);
            conn.buf.reserve(4096);
            match conn
                .timer
                .until(deadline, conn.stream.read_buf(&mut conn.buf))
                .await
            {
                Ok(Ok(n)) if n > 0 => {}
                Err(_) => {
                    unread_head(&self.process, Refusal::HeaderTimeout, conn.peer, &"");
                    write_error(&mut conn.stream, Refusal::HeaderTimeout.status()).await;
                    return None;
                }
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
            Some(req) => self.forward(conn, &req, &buf[head_end..], shutdown).await,
            None => Step::Handover(Handover::Malformed),
        };
        // While it was served, `conn.buf` took what the client sent past
        // the request's body (the next, pipelined request).
        let after = std::mem::replace(&mut conn.buf, buf);
        if let Step::Served {
            keep_client: true,
            body_read,
        } = step
        {
            let used = head_end + body_read;
            if conn.buf.len() == used {
                conn.buf.clear();
            } else {
                conn.buf.drain(..used);
            }
            conn.buf.extend_from_slice(&after);
        }
        step
    }
}

//! The client connection as the Pingora path reads it: first what the fast
//! path read and did not serve (replayed, so a connection changes carrier
//! between requests without losing a byte, on plain and TLS listeners
//! alike), then the stream itself, with the listener's
//! `keepalive_timeout` and `header_timeout` ([`ClientTimeouts`]) applied to
//! the stream itself, because Pingora 0.9.1 has neither (its keep-alive
//! timeout is a fixed 60 s for a connection's first request, applies to
//! each read of a head rather than to the whole head, and ends with a
//! silent close). The fast path applies the same two timeouts in its own
//! read loop.
//!
//! The stream knows where it is in the request cycle from the Pingora
//! path's hooks ([`ClientStream::request_started`] once a head is read,
//! [`ClientStream::request_done`] when its response is finished):
//!
//! - idle (between requests, and before the first): a read that waits
//!   longer than `idle` ends as a clean close (end of stream);
//! - a head has started (its first byte arrived): once `head` has passed
//!   since then, cutover's 408 is written and the read fails with
//!   [`HeaderTimedOut`], which the Pingora path counts and logs
//!   ([`is_header_timeout`]);
//! - in a request (its body, its response): reads pass through (the body's
//!   timeout is Pingora's read timeout).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::limited;
use crate::observe::metrics::Metrics;
use crate::policy::refusal::OVER_CAPACITY;
use crate::policy::timeouts::{ClientTimeouts, ListenerPolicy};

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const REQUEST: u8 = 2;
/// How long the 408 may take to write before the connection is dropped.
const ANSWER_WRITE: Duration = Duration::from_secs(5);

/// Why a read failed: the head was not complete within `header_timeout`.
#[derive(Debug)]
pub struct HeaderTimedOut;

impl std::fmt::Display for HeaderTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request head not complete within the listener's header_timeout")
    }
}

impl std::error::Error for HeaderTimedOut {}

/// Whether Pingora's error for a failed head read is [`HeaderTimedOut`].
pub fn is_header_timeout(e: &pingora::Error) -> bool {
    e.root_cause()
        .downcast_ref::<io::Error>()
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<HeaderTimedOut>())
}

pub struct ClientStream {
    inner: Stream,
    /// Bytes read before this stream took over, read again first.
    replay: Vec<u8>,
    replayed: usize,
    timeouts: ClientTimeouts,
    state: AtomicU8,
    /// The state the timer was last set for.
    armed_for: u8,
    timer: Pin<Box<Sleep>>,
    /// The 408 being written, and how much of it is out.
    answer: Option<(Arc<[u8]>, usize)>,
    /// The AWS VPC endpoint id of the connection's PROXY header.
    vpce: Option<Arc<str>>,
}

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStream")
            .field("inner", &self.inner)
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish()
    }
}

impl ClientStream {
    pub fn new(
        inner: Stream,
        timeouts: ClientTimeouts,
        vpce: Option<Arc<str>>,
        replay: Vec<u8>,
    ) -> ClientStream {
        ClientStream {
            vpce,
            inner,
            replay,
            replayed: 0,
            timeouts,
            state: AtomicU8::new(IDLE),
            armed_for: u8::MAX,
            timer: Box::pin(tokio::time::sleep(timeouts.idle)),
            answer: None,
        }
    }

    /// The stream under `stream`, if it is one of these.
    pub fn of(stream: Option<&Stream>) -> Option<&ClientStream> {
        stream?.as_any().downcast_ref::<ClientStream>()
    }

    pub fn vpce(&self) -> Option<&str> {
        self.vpce.as_deref()
    }

    /// A whole head was read: no header or idle timeout until
    /// [`Self::request_done`].
    pub fn request_started(&self) {
        self.state.store(REQUEST, Ordering::Relaxed);
    }

    /// The response is finished: the connection is idle.
    pub fn request_done(&self) {
        self.state.store(IDLE, Ordering::Relaxed);
    }

    fn arm(&mut self, state: u8) {
        let after = if state == IDLE {
            self.timeouts.idle
        } else {
            self.timeouts.head
        };
        self.timer.as_mut().reset(Instant::now() + after);
        self.armed_for = state;
    }

    /// Write the 408, then fail the read.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let timed_out = || Err(io::Error::new(io::ErrorKind::TimedOut, HeaderTimedOut));
        loop {
            let Some((bytes, sent)) = self.answer.as_mut() else {
                return Poll::Ready(timed_out());
            };
            if *sent == bytes.len() {
                let flushed = Pin::new(&mut self.inner).poll_flush(cx);
                if flushed.is_pending() && self.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.answer = None;
                return Poll::Ready(timed_out());
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*sent..]) {
                Poll::Ready(Ok(n)) if n > 0 => *sent += n,
                Poll::Ready(_) => {
                    self.answer = None;
                    return Poll::Ready(timed_out());
                }
                Poll::Pending => {
                    ready!(self.timer.as_mut().poll(cx));
                    self.answer = None;
                    return Poll::Ready(timed_out());
                }
            }
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.answer.is_some() {
            return this.poll_answer(cx);
        }
        let state = this.state.load(Ordering::Relaxed);
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            if state == IDLE && n > 0 {
                this.state.store(HEAD, Ordering::Relaxed);
                this.arm(HEAD);
            }
            return Poll::Ready(Ok(()));
        }
        if state == REQUEST {
            this.armed_for = REQUEST;
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.armed_for != state {
            this.arm(state);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if state == IDLE && buf.filled().len() > before {
                    this.state.store(HEAD, Ordering::Relaxed);
                    this.arm(HEAD);
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        ready!(this.timer.as_mut().poll(cx));
        if state == IDLE {
            // Idle too long: the end of the connection, as if the client
            // had closed it.
            return Poll::Ready(Ok(()));
        }
        this.answer = Some((crate::policy::forward::answer_message(408), 0));
        this.timer.as_mut().reset(Instant::now() + ANSWER_WRITE);
        this.poll_answer(cx)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.set_socket_digest(socket_digest)
    }
}

#[async_trait]
impl Peek for ClientStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        // Peeking past replayed bytes would see the wrong ones.
        if self.replayed < self.replay.len() {
            return Ok(false);
        }
        self.inner.try_peek(buf).await
    }
}

/// A PROXY header read at the start of a connection (on a listener with
/// `proxy_protocol`), before either carrier sees a byte.
pub struct ProxyStart {
    /// Bytes read after the header: the start of the client's HTTP.
    pub rest: Vec<u8>,
    pub header: Option<crate::policy::proxy_protocol::Header>,
}

/// Read what starts a connection on `listener` from `peer` and decide
/// ([`crate::policy::proxy_protocol`]): `None` when the connection is
/// refused (counted and logged; the caller drops it). The header must be
/// whole within the listener's `keepalive_timeout` (a load balancer sends
/// it with the connection; a direct client's first bytes may wait).
pub async fn read_proxy_start(
    stream: &mut Stream,
    listener: &crate::policy::timeouts::ListenerPolicy,
    peer: Option<std::net::IpAddr>,
    counters: &[prometheus::IntCounter; 8],
) -> Option<ProxyStart> {
    use crate::policy::proxy_protocol::{self as pp, Refused, Start, Verdict};
    use tokio::io::AsyncReadExt;
    let trusted = listener.trusts(peer);
    let deadline = Instant::now() + listener.timeouts.idle;
    let mut buf = Vec::with_capacity(512);
    let refuse = |label: usize, why: &str| {
        counters[label].inc();
        crate::limited!(
            info,
            "PROXY protocol: connection from {peer:?} on {} refused ({}): {why}",
            listener.address,
            pp::RESULTS[label]
        );
        None
    };
    loop {
        let start = match pp::read(&buf) {
            Ok(Start::Incomplete) => None,
            Ok(start) => Some(start),
            // A header attempt from a peer that may not send one is
            // untrusted, whatever its shape.
            Err(why) if !trusted => return refuse(Refused::Untrusted.index(), &why),
            Err(why) => return refuse(Refused::Bad.index(), &why),
        };
        if let Some(start) = start {
            let len = match &start {
                Start::Header(h) => h.len,
                _ => 0,
            };
            return match pp::verdict(listener.proxy_protocol, trusted, start) {
                Verdict::Serve(header) => {
                    counters[pp::served_label(header.as_ref())].inc();
                    Some(ProxyStart {
                        rest: buf.split_off(len),
                        header,
                    })
                }
                Verdict::Refuse(r) => refuse(
                    r.index(),
                    match r {
                        Refused::Missing => {
                            "no PROXY header from a trusted peer (the listener requires one)"
                        }
                        Refused::Untrusted => {
                            "a PROXY header from a peer not in the listener's `trusted`"
                        }
                        Refused::Bad => {
                            "a PROXY header of the version the listener does not accept"
                        }
                    },
                ),
            };
        }
        if buf.len() >= pp::V2_MAX {
            return refuse(Refused::Bad.index(), "no header end within the limit");
        }
        buf.reserve(512);
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) if buf.is_empty() => return None,
            Ok(_) => {
                return refuse(
                    Refused::Bad.index(),
                    "the connection ended inside the header",
                )
            }
            Err(_) => return refuse(7, "the header did not arrive in time"),
        }
    }
}

/// The connection's client address is `source` from now on, for both
/// carriers (they read it from the socket digest); its local address stays.
pub fn set_client_address(stream: &mut Stream, source: std::net::SocketAddr) {
    let local = stream
        .get_socket_digest()
        .and_then(|d| d.local_addr().cloned());
    let digest = SocketDigest::from_raw_fd(stream.id());
    let _ = digest
        .peer_addr
        .set(Some(pingora::protocols::l4::socket::SocketAddr::Inet(
            source,
        )));
    let _ = digest.local_addr.set(local);
    stream.set_socket_digest(digest);
}

/// A connection past its listener's `max_connections`, before either
/// carrier reads from it: counted, logged (a few lines a second at most),
/// answered [`OVER_CAPACITY`], its write side shut, and what the client
/// sends drained for up to a second, so closing with its request unread
/// does not reset the answer away before the client reads it.
pub async fn refuse_over_capacity(mut stream: Stream, listener: &ListenerPolicy) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    listener.limit.refused.inc();
    limited!(
        warn,
        "listener {}: {} client connections open (max_connections): a new connection was answered 503 and closed",
        listener.address,
        listener.limit.max
    );
    let linger = Instant::now() + Duration::from_secs(1);
    let answered = async {
        stream.write_all(OVER_CAPACITY).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    if !matches!(tokio::time::timeout_at(linger, answered).await, Ok(Ok(()))) {
        return;
    }
    let mut sink = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(linger, stream.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// `accept()` failed on a proxy listener (Pingora's accept loop asks,
/// through the `ServerApp::accept_error` hook of the carried patch, see
/// `vendor/README.md`). Out of descriptors (EMFILE, ENFILE) or kernel
/// memory (ENOBUFS, ENOMEM) the loop waits a second before the next
/// `accept()` (no busy loop; the patch's `accept_backoff`) while new
/// connections wait in the listen backlog; anything else (a connection
/// reset while queued) is retried at once. Counted by reason and logged
/// once a second at most.
/// Returns true: Pingora's own line (one per failure) is not written.
pub fn accept_failed(metrics: &Metrics, error: &pingora::Error) -> bool {
    let errno = error
        .root_cause()
        .downcast_ref::<io::Error>()
        .and_then(io::Error::raw_os_error);
    match errno {
        Some(libc::EMFILE) => {
            metrics.accept_errors.fd_limit.inc();
            limited!(
                per_second = 1;
                error,
                "accept() failed: {error}: the process is out of file descriptors; new connections \
                 wait in the listen backlog until some close (raise LimitNOFILE in the unit, or lower \
                 the listeners' max_connections below it)"
            );
        }
        Some(libc::ENFILE) => {
            metrics.accept_errors.fd_limit.inc();
            limited!(
                per_second = 1;
                error,
                "accept() failed: {error}: the system's file table is full (fs.file-max), not this \
                 process's limit; new connections wait in the listen backlog until descriptors are \
                 freed (find the process holding them: /proc/sys/fs/file-nr)"
            );
        }
        Some(libc::ENOBUFS | libc::ENOMEM) => {
            metrics.accept_errors.other.inc();
            limited!(
                per_second = 1;
                error,
                "accept() failed: {error}: the kernel is out of memory for sockets; accepting \
                 resumes a second later"
            );
        }
        _ => {
            metrics.accept_errors.other.inc();
            limited!(per_second = 1; error, "accept() failed: {error}");
        }
    }
    true
}

/// A client's TLS handshake on a proxy listener failed or timed out
/// (Pingora's `ServerApp::handshake_error` hook, and the fast path's own
/// handshake after a PROXY header): a client can cause it at will, so it
/// is counted and logged a few lines a second, never once per connection.
pub fn handshake_failed(
    metrics: &Metrics,
    peer: Option<&pingora::protocols::l4::socket::SocketAddr>,
    error: &pingora::Error,
) -> bool {
    struct FromPeer<'a>(Option<&'a pingora::protocols::l4::socket::SocketAddr>);
    impl std::fmt::Display for FromPeer<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.0 {
                Some(peer) => write!(f, " from {peer}"),
                None => Ok(()),
            }
        }
    }
    let by_reason = &metrics.tls_handshake_failures;
    if error.etype() == &pingora::ErrorType::TLSHandshakeTimedout {
        by_reason.timeout.inc();
    } else {
        by_reason.failed.inc();
    }
    limited!(
        warn,
        "client TLS handshake{} did not complete: {error}",
        FromPeer(peer)
    );
    true
}

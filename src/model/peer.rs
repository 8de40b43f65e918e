//! How cutover connects to an upstream: TLS, SNI, certificate checks, timeouts.
//!
//! The template is built once per upstream when the model is built; a request
//! only copies it and fills in the address DNS gave most recently. The address
//! is always a `SocketAddr`: `HttpPeer::new` with a name would resolve it with a
//! blocking call and panic when that fails.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

use pingora::upstreams::peer::HttpPeer;

use crate::config::UpstreamConfig;

pub struct PeerTemplate {
    peer: HttpPeer,
}

impl PeerTemplate {
    pub fn new(u: &UpstreamConfig) -> Self {
        // The address is a placeholder; `for_address` sets the real one.
        let placeholder = SocketAddr::from(([0, 0, 0, 0], u.port));
        let mut peer = HttpPeer::new(placeholder, u.tls, u.sni.clone());
        let o = &mut peer.options;
        o.verify_cert = u.verify;
        o.verify_hostname = u.verify;
        o.ca = u.ca.clone();
        o.connection_timeout = Some(u.timeouts.connect);
        // Bounds connect + TLS handshake together; a CDN edge that accepts TCP
        // but never finishes the handshake must not hold the request forever.
        o.total_connection_timeout = Some(u.timeouts.connect * 2);
        o.read_timeout = Some(u.timeouts.read);
        o.write_timeout = Some(u.timeouts.write);
        o.idle_timeout = Some(u.timeouts.idle);
        // Pingora's pool key hashes address, SNI and verify flags but not the
        // CA: keep connections verified against different CAs apart.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        u.ca_file.hash(&mut h);
        peer.group_key = h.finish();
        Self { peer }
    }

    pub fn for_address(&self, addr: SocketAddr) -> Box<HttpPeer> {
        let mut peer = Box::new(self.peer.clone());
        peer._address = pingora::protocols::l4::socket::SocketAddr::Inet(addr);
        peer
    }
}

/// Two settings for a new TLS connection that Pingora's connector and
/// acceptor offer no hook for (their `SSL_CTX` is private), measured on the
/// fast path, applied to upstream connections and to client connections on
/// TLS listeners (which have no L4 read buffer of Pingora's, so read-ahead
/// is what keeps a record to one syscall):
/// - read-ahead: OpenSSL otherwise reads each record with two syscalls (the
///   5-byte header, then the rest); with it, one `recvfrom` per response
///   instead of two, and half as many on large bodies;
/// - `SSL_MODE_RELEASE_BUFFERS` (nginx sets it too): the ~17 KiB record
///   buffers are freed whenever they are empty and allocated again for the
///   next record. That is 3 large allocations per request (+6.5%
///   instructions, callgrind), but malloc hands back the buffer just freed,
///   warm in the cache, where buffers kept per connection (64 busy clients:
///   over 4 MiB of them, both sides) have gone cold since that connection's
///   last request. In CPU time it is 2.8-4.8% cheaper per TLS 4 KiB request
///   and level on `/ruok` (an A/B in one interleaved run, `BASE_BIN=…
///   SCENARIOS="plain tls" ROUNDS=6 benches/compare/matrix.sh`,
///   2026-12-07), and an idle connection holds no record buffers.
pub fn tune_tls(stream: &pingora::protocols::Stream) {
    use foreign_types::ForeignTypeRef;
    if let Some(ssl) = stream.get_ssl() {
        let ssl = ssl.as_ptr();
        // SAFETY: `ssl` is the live SSL object the stream owns, used only on
        // this task; both commands just set flags read at the next record.
        unsafe {
            openssl_sys::SSL_ctrl(
                ssl,
                openssl_sys::SSL_CTRL_SET_READ_AHEAD,
                1,
                std::ptr::null_mut(),
            );
            openssl_sys::SSL_ctrl(
                ssl,
                openssl_sys::SSL_CTRL_MODE,
                openssl_sys::SSL_MODE_RELEASE_BUFFERS,
                std::ptr::null_mut(),
            );
        }
    }
}

/// An upstream TLS stream as `TransportConnector` makes it.
type TlsStream = pingora::protocols::tls::SslStream<pingora::protocols::l4::stream::Stream>;

extern "C" {
    /// OpenSSL >= 1.1.0: whether any bytes (decrypted or not) wait in the
    /// SSL object's buffers. The `openssl` crate has no wrapper for it.
    fn SSL_has_pending(ssl: *const openssl_sys::SSL) -> std::ffi::c_int;
}

/// `stream` back if nothing arrived on it since it was last read, `None` if
/// something did (or it closed): bytes an upstream sends after a complete
/// response must never be read as the next request's response.
///
/// The check reads neither through OpenSSL (an empty `SSL_read` costs ~1,600
/// instructions) nor with a syscall: it asks OpenSSL whether its buffers hold
/// anything, then polls the TCP stream under it once with a no-op waker,
/// which tokio answers from the readiness its reactor already has (cleared
/// by the last short read). A raw byte it does read means the connection is
/// dropped anyway. A stream of another kind is not reused.
pub fn quiet(stream: pingora::protocols::Stream) -> Option<pingora::protocols::Stream> {
    use foreign_types::ForeignTypeRef;
    let any = stream.into_any();
    let any = match any.downcast::<TlsStream>() {
        Ok(mut tls) => {
            // SAFETY: the live SSL object this stream owns; a read-only query.
            let buffered = unsafe { SSL_has_pending(tls.ssl().as_ptr()) } != 0;
            return (!buffered && !readable(tls.get_mut())).then_some(tls);
        }
        Err(other) => other,
    };
    match any.downcast::<pingora::protocols::l4::stream::Stream>() {
        Ok(mut plain) => (!readable(&mut plain)).then_some(plain),
        Err(_) => None,
    }
}

/// Read into `buf` once `stream` has something to read, as
/// `read_buf` does, but without reading through OpenSSL while nothing has
/// arrived: such a read costs ~1,600 instructions (the record layer's
/// entry, its error queue, the BIO calls) only to find nothing, and the
/// fast path would pay it twice a request (the upstream's response, the
/// client's next request), each time it waits. For a TLS stream it first
/// waits until OpenSSL holds bytes or the socket under it is reported
/// readable; any other stream is read at once (its empty read is cheap).
pub async fn read_when_ready(
    stream: &mut pingora::protocols::Stream,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    std::future::poll_fn(|cx| poll_read_ready(stream, cx)).await;
    stream.read_buf(buf).await
}

/// Ready when a read of `stream` would find something (or fail); see
/// [`read_when_ready`].
fn poll_read_ready(
    stream: &pingora::protocols::Stream,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    use foreign_types::ForeignTypeRef;
    // `**`: the boxed stream itself, not the `Box` (which is an `IO` too).
    let Some(tls) = (**stream).as_any().downcast_ref::<TlsStream>() else {
        return std::task::Poll::Ready(());
    };
    // SAFETY: the live SSL object this stream owns; a read-only query.
    if unsafe { SSL_has_pending(tls.ssl().as_ptr()) } != 0 {
        return std::task::Poll::Ready(());
    }
    tls.get_ref().poll_read_ready(cx)
}

/// Whether a read would return something now (data, EOF or an error).
fn readable(l4: &mut pingora::protocols::l4::stream::Stream) -> bool {
    use std::task::{Context, Poll, Waker};
    use tokio::io::AsyncRead;
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    !matches!(
        std::pin::Pin::new(l4).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}

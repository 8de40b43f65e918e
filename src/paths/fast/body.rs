//! The response body on the fast path: where it ends, and the writes that
//! relay it to the client.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use log::debug;
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::chunked::ChunkedEnd;
use super::{BODY_BATCH, READ_CHUNK};
use crate::policy;
use crate::policy::timeouts::CLIENT;

/// How the upstream's response body is delimited.
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked(ChunkedEnd),
    /// Until the upstream closes: the client connection closes after it too.
    Close,
}

/// The part of a read that belongs to the body.
pub(super) struct Part {
    /// How many of the bytes are forwarded as they are.
    pub(super) relay: usize,
    /// The body is complete.
    pub(super) finished: bool,
    /// Nothing followed the body (the connection can be reused).
    pub(super) clean: bool,
    /// The forwarded body needs a final CRLF of cutover's own (its chunked
    /// trailers were dropped).
    pub(super) terminator: bool,
}

impl Part {
    pub(super) fn tail(&self) -> &'static [u8] {
        if self.terminator {
            b"\r\n"
        } else {
            b""
        }
    }
}

/// How much of `bytes` belongs to the body; `None`: malformed.
pub(super) fn body_part(framing: &mut Framing, bytes: &[u8]) -> Option<Part> {
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

/// The response head (`head`, built by the policy) and the first `relay`
/// body bytes, which follow the upstream's head (`resp[..head_len]`), in
/// one write: one syscall, and on a TLS stream one record.
///
/// The upstream's head is parsed and done with by now, so when the client
/// head is no longer than it (the usual case: a CDN's heads carry more
/// fields than cutover adds) it is copied over the upstream head's last
/// bytes, right before the body, and the body is not copied at all (a time
/// profile put that copy of a 4 KiB body at ~1% of the proxy's CPU).
/// Otherwise a small body is copied behind the head, and a large one goes
/// out with a vectored write. `tail` (a chunked body's final CRLF, or
/// nothing) follows the body.
pub(super) async fn write_head_and_body(
    stream: &mut Stream,
    head: &mut Vec<u8>,
    resp: &mut [u8],
    head_len: usize,
    relay: usize,
    tail: &[u8],
) -> std::io::Result<()> {
    let body_end = head_len + relay;
    if let Some(start) = in_place_start(head.len(), head_len, tail) {
        resp[start..head_len].copy_from_slice(head);
        return stream.write_all(&resp[start..body_end]).await;
    }
    let body = &resp[head_len..body_end];
    if body.len() <= 16 * 1024 {
        head.extend_from_slice(body);
        head.extend_from_slice(tail);
        return stream.write_all(head).await;
    }
    write_parts(stream, &[head, body, tail]).await
}

/// Where the client head starts when it is written over the upstream's
/// (`None`: it does not fit there, or a tail must follow the body).
fn in_place_start(client_head: usize, upstream_head: usize, tail: &[u8]) -> Option<usize> {
    (tail.is_empty() && client_head <= upstream_head).then(|| upstream_head - client_head)
}

/// Write `parts` in order, as few syscalls as the socket allows.
pub(super) async fn write_parts(stream: &mut Stream, parts: &[&[u8]]) -> std::io::Result<()> {
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
pub(super) fn batch_size(framing: &Framing) -> usize {
    match framing {
        Framing::Length(left) => (*left).min(BODY_BATCH as u64) as usize,
        _ => BODY_BATCH,
    }
}

/// Append what the upstream has already sent, without waiting, until `buf`
/// holds `want` bytes; `Ok(true)` if the upstream closed. OpenSSL hands out
/// one TLS record (at most 16 KiB) per read, so a large body would otherwise
/// cost one client write per record.
pub(super) fn read_available(
    ups: &mut Stream,
    buf: &mut Vec<u8>,
    want: usize,
) -> std::io::Result<bool> {
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

/// A write to the client, bounded like nginx's `send_timeout`: a client that
/// stops reading must not hold its task, buffers and upstream connection.
pub(super) async fn to_client<T>(
    write: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match timeout(CLIENT.send, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Tell the client the proxying failed; `false` if it is gone.
pub(super) async fn write_error(stream: &mut Stream, status: u16) -> bool {
    let head = policy::forward::answer_message(status);
    let sent = to_client(async {
        stream.write_all(&head).await?;
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

    fn parts(mut framing: Framing, reads: &[&[u8]]) -> Vec<(usize, bool, bool)> {
        reads
            .iter()
            .map(|r| {
                let p = body_part(&mut framing, r).expect("well-formed");
                (p.relay, p.finished, p.clean)
            })
            .collect()
    }

    #[test]
    fn where_a_body_ends_in_what_was_read() {
        assert_eq!(parts(Framing::None, &[b""]), [(0, true, true)]);
        assert_eq!(parts(Framing::None, &[b"x"]), [(0, true, false)]);
        assert_eq!(
            parts(Framing::Length(5), &[b"hel", b"loNEXT"]),
            [(3, false, true), (2, true, false)]
        );
        assert_eq!(
            parts(
                Framing::Chunked(ChunkedEnd::default()),
                &[b"2\r\nhi\r\n", b"0\r\n\r\n"]
            ),
            [(7, false, true), (5, true, true)]
        );
        assert_eq!(parts(Framing::Close, &[b"abc"]), [(3, false, false)]);
        let mut chunked = Framing::Chunked(ChunkedEnd::default());
        assert!(
            body_part(&mut chunked, b"zz\r\n").is_none(),
            "not a chunk size"
        );
    }

    /// What the client receives for a head and a first body part, through
    /// a real socket: the head then the body then the tail, whichever way
    /// the bytes were laid out for the write.
    async fn written(head: &[u8], upstream_head: &[u8], body: &[u8], tail: &[u8]) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let mut client = client.unwrap();
        let tcp = accepted.unwrap().0;
        let mut stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
        let mut resp = [upstream_head, body, b"NEXT"].concat();
        let mut head = head.to_vec();
        let (h, n) = (upstream_head.len(), body.len());
        write_head_and_body(&mut stream, &mut head, &mut resp, h, n, tail)
            .await
            .unwrap();
        drop(stream);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn head_and_body_go_out_in_order_in_place_or_copied() {
        let body = b"0123456789";
        let long = b"HTTP/1.1 200 OK\r\nserver: cdn\r\nx-cache: Hit\r\ncontent-length: 10\r\n\r\n";
        let short = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n";
        let ours = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\n";
        // Over the upstream's longer head (in place), and with no room
        // there (copied behind the head).
        assert_eq!(
            in_place_start(ours.len(), long.len(), b""),
            Some(long.len() - ours.len())
        );
        assert_eq!(in_place_start(ours.len(), short.len(), b""), None);
        assert_eq!(in_place_start(3, 3, b"\r\n"), None);
        for upstream_head in [&long[..], &short[..], &ours[..]] {
            let got = written(ours, upstream_head, body, b"").await;
            assert_eq!(got, [&ours[..], body].concat());
        }
        let got = written(ours, long, body, b"\r\n").await;
        assert_eq!(got, [&ours[..], body, b"\r\n"].concat());
        // A body past 16 KiB: a vectored write.
        let big = vec![b'b'; 20 * 1024];
        let got = written(ours, short, &big, b"").await;
        assert_eq!(got, [&ours[..], &big].concat());
    }

    #[test]
    fn batches_never_pass_a_length_delimited_end() {
        assert_eq!(batch_size(&Framing::Length(10)), 10);
        assert_eq!(batch_size(&Framing::Length(1 << 40)), BODY_BATCH);
        assert_eq!(batch_size(&Framing::Close), BODY_BATCH);
    }
}

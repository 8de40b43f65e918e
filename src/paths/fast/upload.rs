//! The request body on the fast path: what came with the head, and the
//! rest read from the client and relayed to the upstream.
//!
//! A `Content-Length` body is relayed byte for byte up to its length. A
//! chunked one is relayed as the client framed it (chunk sizes and
//! extensions as sent), read by the strict scanner of
//! [`super::chunked`], which refuses anything two parsers could read two
//! ways; its trailer fields are dropped (the Pingora path drops them too)
//! and the body ends with the last chunk and a CRLF of cutover's own.
//!
//! A chunked body that does not parse in the bytes that came with the head
//! is handed, unsent, to the Pingora path (whose answer is the same 400);
//! one that stops parsing later, once part of it went upstream, is
//! answered 400 here and both connections are closed.

use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::body::read_available;
use super::chunked::{ChunkedEnd, Malformed};
use super::{Conn, BODY_BATCH, READ_CHUNK};
use crate::policy::failure::BodyStopped;
use crate::policy::framing::RequestBody;

/// A request body on its way upstream.
pub(super) struct Upload<'a> {
    /// The body bytes that came with the head, forwarded as they are.
    early: &'a [u8],
    /// What follows them when the body ended there: a chunked body's final
    /// CRLF (its trailers dropped), or nothing.
    early_tail: &'static [u8],
    /// How many of the bytes after the head were the body's.
    read: usize,
    /// What is still to come from the client.
    late: Late,
    /// More than [`BODY_BATCH`] of the body was read (early bytes
    /// included), so it is not all kept: the request cannot be sent again.
    truncated: bool,
}

enum Late {
    Done,
    /// This many bytes.
    Length(u64),
    /// Until the scanner finds the last chunk (and the trailers' end).
    Chunked(ChunkedEnd),
}

/// Why a body did not reach the upstream whole.
pub(super) enum UploadFailed {
    /// The client stopped short: the policy says what it is answered.
    Client(BodyStopped),
    Upstream(std::io::Error),
    UpstreamTimeout,
}

/// Spare room a body read asks for beyond the bytes it expects.
const READ_SLACK: usize = 1024;

impl<'a> Upload<'a> {
    /// The body as the head frames it, `after_head` being what the client
    /// sent past the head so far. `Err`: a chunked body that does not parse
    /// there (nothing is sent; the request is handed over). The caller
    /// empties `conn.body`, where [`Upload::gather`] puts the rest.
    pub(super) fn start(framing: RequestBody, after_head: &'a [u8]) -> Result<Self, Malformed> {
        let mut upload = Upload {
            early: b"",
            early_tail: b"",
            read: 0,
            late: Late::Done,
            truncated: false,
        };
        match framing {
            RequestBody::None => {}
            RequestBody::Length(n) => {
                let early =
                    usize::try_from(n).map_or(after_head.len(), |n| n.min(after_head.len()));
                upload.early = &after_head[..early];
                upload.read = early;
                let late = n - early as u64;
                if late > 0 {
                    upload.late = Late::Length(late);
                }
            }
            RequestBody::Chunked => {
                let mut scan = ChunkedEnd::default();
                let s = scan.feed(after_head)?;
                upload.early = &after_head[..s.relay];
                match s.end {
                    Some(end) => {
                        upload.read = end;
                        if s.terminator {
                            upload.early_tail = b"\r\n";
                        }
                    }
                    None => {
                        upload.read = after_head.len();
                        upload.late = Late::Chunked(scan);
                    }
                }
            }
        }
        upload.note_held(0);
        Ok(upload)
    }

    /// How many bytes after the head were the body's.
    pub(super) fn read(&self) -> usize {
        self.read
    }

    /// Everything of the body sent so far is at hand (the early bytes and
    /// `conn.body`), so the request can be sent again: the rest, if any,
    /// is still to be read from the client. At most [`BODY_BATCH`] (64
    /// KiB) of body is kept, as the Pingora path's retry buffer keeps.
    pub(super) fn kept(&self) -> bool {
        !self.truncated
    }

    /// `held` body bytes are in `conn.body` besides the early ones: past
    /// [`BODY_BATCH`] in all, the body no longer counts as kept.
    fn note_held(&mut self, held: usize) {
        if self.early.len() + held > BODY_BATCH {
            self.truncated = true;
        }
    }

    /// What goes out right after the head: the body bytes that came with
    /// it, then what follows them (see [`Upload::gather`]'s `conn.body`).
    pub(super) fn early(&self) -> (&'a [u8], &'static [u8]) {
        (self.early, self.early_tail)
    }

    /// Part of the body is still to come from the client.
    pub(super) fn pending(&self) -> bool {
        !matches!(self.late, Late::Done)
    }

    /// Before the first write: a short rest of a `Content-Length` body is
    /// read (waiting for it), and whatever of a chunked body the client has
    /// already sent (without waiting: a client streaming its chunks is not
    /// held up), up to [`BODY_BATCH`], appended to `conn.body`. The request
    /// then goes out in one write, and a body read whole can be sent again.
    /// Bytes past the body go to `conn.buf`.
    pub(super) async fn gather(&mut self, conn: &mut Conn) -> Result<(), BodyStopped> {
        match &mut self.late {
            Late::Length(late) if *late <= BODY_BATCH as u64 => {
                read_rest(conn, *late as usize).await?;
                self.late = Late::Done;
            }
            Late::Chunked(scan) => {
                let start = conn.body.len();
                // An error or the client's close shows in the relay's read.
                let _ = read_available(&mut conn.stream, &mut conn.body, start + BODY_BATCH);
                let s = scan
                    .feed(&conn.body[start..])
                    .map_err(|_| BodyStopped::Malformed)?;
                if let Some(end) = s.end {
                    conn.buf.extend_from_slice(&conn.body[start + end..]);
                    self.late = Late::Done;
                }
                conn.body.truncate(start + s.relay);
                if s.terminator {
                    conn.body.extend_from_slice(b"\r\n");
                }
            }
            _ => {}
        }
        self.note_held(conn.body.len());
        Ok(())
    }

    /// The rest of the body, from the client to the upstream as it
    /// arrives. What it relays is kept after the bytes already in
    /// `conn.body` while the body read so far fits in [`BODY_BATCH`] (a
    /// send on another connection writes them again; see [`Upload::kept`]),
    /// and only the latest read past it. Bytes the client sent past the
    /// body (a pipelined request) go to `conn.buf`, where the next request
    /// is read from.
    pub(super) async fn relay(
        &mut self,
        conn: &mut Conn,
        ups: &mut Stream,
        write_timeout: std::time::Duration,
    ) -> Result<(), UploadFailed> {
        while self.pending() {
            if self.truncated {
                conn.body.clear();
            }
            let start = conn.body.len();
            conn.body.reserve(READ_CHUNK);
            let n = match conn
                .timer
                .within(conn.timeouts.body, conn.stream.read_buf(&mut conn.body))
                .await
            {
                Ok(Ok(n)) if n > 0 => n,
                Ok(_) => return Err(UploadFailed::Client(BodyStopped::Closed)),
                Err(_) => return Err(UploadFailed::Client(BodyStopped::TimedOut)),
            };
            let (relay, end, terminator) = match &mut self.late {
                Late::Length(left) => {
                    let take = usize::try_from(*left).map_or(n, |left| left.min(n));
                    *left -= take as u64;
                    (take, (*left == 0).then_some(take), false)
                }
                Late::Chunked(scan) => {
                    let s = scan
                        .feed(&conn.body[start..])
                        .map_err(|_| UploadFailed::Client(BodyStopped::Malformed))?;
                    (s.relay, s.end, s.terminator)
                }
                Late::Done => (0, Some(0), false),
            };
            if let Some(end) = end {
                conn.buf.extend_from_slice(&conn.body[start + end..]);
                self.late = Late::Done;
            }
            conn.body.truncate(start + relay);
            if terminator {
                conn.body.extend_from_slice(b"\r\n");
            }
            self.note_held(conn.body.len());
            match conn
                .ups_timer
                .within(write_timeout, ups.write_all(&conn.body[start..]))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(UploadFailed::Upstream(e)),
                Err(_) => return Err(UploadFailed::UpstreamTimeout),
            }
        }
        Ok(())
    }
}

/// Read the rest of a request body, `late` bytes, into `conn.body`, after
/// what it holds (on a resend: what was relayed before); bytes past the
/// body go to `conn.buf`. `Err`: nothing within the body timeout, or the
/// client closed.
async fn read_rest(conn: &mut Conn, late: usize) -> Result<(), BodyStopped> {
    let end = conn.body.len() + late;
    // Room past the body: a read that fills its buffer exactly leaves the
    // socket marked readable, and the next request's first read would be
    // a syscall that finds nothing (EAGAIN); a short read does not.
    conn.body.reserve(late + READ_SLACK);
    while conn.body.len() < end {
        match conn
            .timer
            .within(conn.timeouts.body, conn.stream.read_buf(&mut conn.body))
            .await
        {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Err(BodyStopped::Closed),
            Err(_) => return Err(BodyStopped::TimedOut),
        }
    }
    if conn.body.len() > end {
        conn.buf.extend_from_slice(&conn.body[end..]);
        conn.body.truncate(end);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `start` makes of the bytes after a head: the early bytes and
    /// their tail, how many bytes were the body's, and whether more is due.
    fn split(framing: RequestBody, after_head: &[u8]) -> Option<(Vec<u8>, usize, bool)> {
        let u = Upload::start(framing, after_head).ok()?;
        let (early, tail) = u.early();
        Some(([early, tail].concat(), u.read(), u.pending()))
    }

    /// A connected pair of TCP streams: (a pingora stream, its peer).
    async fn pair() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (ours, theirs) = tokio::join!(connect, listener.accept());
        let ours = pingora::protocols::l4::stream::Stream::from(ours.unwrap());
        (Box::new(ours), theirs.unwrap().0)
    }

    fn conn(stream: Stream) -> Conn {
        Conn {
            tls: false,
            timeouts: crate::policy::timeouts::CLIENT,
            vpce: None,
            stream,
            peer: None,
            peer_text: None,
            buf: Vec::new(),
            out: Vec::new(),
            resp: Vec::new(),
            body: Vec::new(),
            held: None,
            lean: false,
            timer: super::super::timer::Timer::new(),
            ups_timer: super::super::timer::Timer::new(),
        }
    }

    /// A resend after part of a `Content-Length` body was relayed: what is
    /// kept stays, and only the rest is read from the client (before, the
    /// rest was counted from zero: the upstream got the body short by what
    /// was kept, and the client's last bytes were read as the next request).
    #[tokio::test]
    async fn a_resend_reads_only_what_is_still_to_come() {
        let (stream, mut client) = pair().await;
        let mut conn = conn(stream);
        let relayed = vec![b'r'; 16 * 1024];
        conn.body.extend_from_slice(&relayed);
        let mut upload = Upload {
            early: b"eee",
            early_tail: b"",
            read: 3,
            late: Late::Length(1000),
            truncated: false,
        };
        let rest = vec![b's'; 1000];
        client
            .write_all(&[&rest[..], b"GET /next"].concat())
            .await
            .unwrap();
        upload.gather(&mut conn).await.expect("gathered");
        assert!(!upload.pending());
        assert!(upload.kept());
        assert!(conn.body == [&relayed[..], &rest[..]].concat(), "the body");
        assert_eq!(conn.buf, b"GET /next");
    }

    /// Carry a body the way `forward` does: `pieces[0]` came with the head,
    /// the rest the client writes one after the other. What the upstream
    /// got, what a resend would write again (when kept), and what is left
    /// for the next request.
    async fn carry(framing: RequestBody, pieces: &[&[u8]]) -> (Vec<u8>, Option<Vec<u8>>, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let (stream, mut client) = pair().await;
        let (mut ups, mut upstream) = pair().await;
        let mut conn = conn(stream);
        let rest: Vec<Vec<u8>> = pieces[1..].iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for p in rest {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                client.write_all(&p).await.unwrap();
            }
            client
        });
        let mut upload = Upload::start(framing, pieces[0]).expect("well-formed");
        if upload.pending() {
            // As the first write would find them: the second piece is there.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let (early, tail) = upload.early();
        let mut first = [early, tail].concat();
        upload.gather(&mut conn).await.expect("gathered");
        first.extend_from_slice(&conn.body);
        ups.write_all(&first).await.unwrap();
        if upload.pending() {
            let relayed = upload
                .relay(&mut conn, &mut ups, std::time::Duration::from_secs(5))
                .await;
            assert!(relayed.is_ok(), "relay failed");
        }
        let again = upload
            .kept()
            .then(|| [early, tail, &conn.body[..]].concat());
        drop(ups);
        drop(writer.await.unwrap());
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        (got, again, conn.buf)
    }

    #[tokio::test]
    async fn a_body_in_any_pieces_reaches_the_upstream_whole_and_stays_resendable() {
        use crate::rehearsal::strict::{decode_chunked, Chunked};
        let data: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut chunked = Vec::new();
        for part in data.chunks(3000) {
            chunked.extend_from_slice(format!("{:x};n=\"v\"\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\nX-Sum: 1\r\n\r\n");
        let next = b"GET /next HTTP/1.1\r\n";
        for (framing, body) in [
            (RequestBody::Length(data.len() as u64), &data),
            (RequestBody::Chunked, &chunked),
        ] {
            let whole = [&body[..], next].concat();
            // Cut at a few places, and into 70 pieces (inside size lines,
            // the CRLFs and the trailers).
            let mut cuts: Vec<Vec<usize>> = vec![vec![0], vec![1], vec![body.len() - 3]];
            cuts.push((1..70).map(|i| i * whole.len() / 70).collect());
            for cut in cuts {
                let mut pieces: Vec<&[u8]> = Vec::new();
                let mut at = 0;
                for c in cut.iter().chain([&whole.len()]) {
                    pieces.push(&whole[at..*c]);
                    at = *c;
                }
                let (got, again, left) = carry(framing, &pieces).await;
                let what = format!("{framing:?} cut at {:?}", &cut[..cut.len().min(3)]);
                let decoded = match framing {
                    RequestBody::Chunked => match decode_chunked(&got) {
                        Chunked::Complete {
                            body,
                            trailers,
                            len,
                        } => {
                            assert_eq!(len, got.len(), "{what}: bytes after the body");
                            assert!(trailers.is_empty(), "{what}: trailers forwarded");
                            body
                        }
                        other => panic!("{what}: {other:?}"),
                    },
                    _ => got.clone(),
                };
                assert!(decoded == data, "{what}: the body differs");
                assert_eq!(left, next, "{what}: the next request");
                // Under 64 KiB: a resend writes exactly what went upstream.
                assert_eq!(again.as_ref(), Some(&got), "{what}: not kept whole");
            }
        }
        // Past 64 KiB the body is not all kept: no resend.
        let big = vec![b'b'; 200_000];
        let pieces: Vec<&[u8]> = big.chunks(50_000).collect();
        let (got, again, _) = carry(RequestBody::Length(big.len() as u64), &pieces).await;
        assert!(got == big, "the big body differs");
        assert_eq!(again, None, "a body past 64 KiB reported kept");
    }

    #[test]
    fn the_body_bytes_that_came_with_the_head() {
        use RequestBody::*;
        assert_eq!(split(None, b"GET /next"), Some((vec![], 0, false)));
        assert_eq!(
            split(Length(3), b"abcGET"),
            Some((b"abc".to_vec(), 3, false))
        );
        assert_eq!(split(Length(9), b"abc"), Some((b"abc".to_vec(), 3, true)));
        assert_eq!(split(Length(9), b""), Some((vec![], 0, true)));
        // Chunked: the whole body and the next request.
        let body = b"5\r\nhello\r\n0\r\n\r\n";
        let next = [&body[..], b"GET /next"].concat();
        assert_eq!(
            split(Chunked, &next),
            Some((body.to_vec(), body.len(), false))
        );
        // Part of it: all of it forwarded, the rest due.
        assert_eq!(
            split(Chunked, b"5\r\nhel"),
            Some((b"5\r\nhel".to_vec(), 6, true))
        );
        // Trailers are dropped and a CRLF of cutover's own ends the body.
        let trailed = b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\nGET";
        assert_eq!(
            split(Chunked, trailed),
            Some((body.to_vec(), trailed.len() - 3, false))
        );
        // A size line two parsers could read apart: not started at all.
        assert_eq!(split(Chunked, b"5\nhello\r\n0\r\n\r\n"), Option::None);
    }
}

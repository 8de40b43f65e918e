//! The request body on the fast path: what came with the head, and the
//! rest read from the client and relayed to the upstream.

use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Conn, READ_CHUNK};

/// A request body on its way upstream: what came with the head, and how
/// much is still to be read from the client.
pub(super) struct Upload<'a> {
    pub(super) early: &'a [u8],
    pub(super) late: u64,
}

pub(super) enum UploadFailed {
    Client(u16),
    Upstream(std::io::Error),
    UpstreamTimeout,
}

/// Spare room a body read asks for beyond the bytes it expects.
const READ_SLACK: usize = 1024;

/// Read the rest of a request body, `late` bytes, into `conn.body` (bytes
/// past it go to `conn.buf`); `Err` with the status the client gets: 408
/// (nothing within the body timeout) or 499 (it closed).
pub(super) async fn read_rest(conn: &mut Conn, late: usize) -> Result<(), u16> {
    // Room past the body: a read that fills its buffer exactly leaves the
    // socket marked readable, and the next request's first read would be
    // a syscall that finds nothing (EAGAIN); a short read does not.
    conn.body.reserve(late + READ_SLACK);
    while conn.body.len() < late {
        match conn
            .timer
            .within(conn.timeouts.body, conn.stream.read_buf(&mut conn.body))
            .await
        {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Err(499),
            Err(_) => return Err(408),
        }
    }
    if conn.body.len() > late {
        conn.buf.extend_from_slice(&conn.body[late..]);
        conn.body.truncate(late);
    }
    Ok(())
}

/// The rest of a request body, from the client to the upstream as it
/// arrives. Bytes the client sent past the body (a pipelined request) go
/// to `conn.buf`, where the next request is read from.
pub(super) async fn relay_upload(
    conn: &mut Conn,
    ups: &mut Stream,
    upload: &mut Upload<'_>,
    write_timeout: std::time::Duration,
) -> Result<(), UploadFailed> {
    while upload.late > 0 {
        conn.body.clear();
        conn.body.reserve(READ_CHUNK);
        let n = match conn
            .timer
            .within(conn.timeouts.body, conn.stream.read_buf(&mut conn.body))
            .await
        {
            Ok(Ok(n)) if n > 0 => n,
            Ok(_) => return Err(UploadFailed::Client(499)),
            Err(_) => return Err(UploadFailed::Client(408)),
        };
        let take = usize::try_from(upload.late).map_or(n, |late| late.min(n));
        conn.buf.extend_from_slice(&conn.body[take..]);
        match conn
            .ups_timer
            .within(write_timeout, ups.write_all(&conn.body[..take]))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(UploadFailed::Upstream(e)),
            Err(_) => return Err(UploadFailed::UpstreamTimeout),
        }
        upload.late -= take as u64;
    }
    Ok(())
}

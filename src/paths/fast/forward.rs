//! One request forwarded: upstream choice and failover, the exchange with
//! the upstream, and what it came to (metrics, access log).

use std::net::SocketAddr;
use std::time::Instant;

use log::debug;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::Peer;
use tokio::io::AsyncWriteExt;

use super::body::{
    batch_size, body_part, read_available, to_client, write_error, write_head_and_body,
    write_parts, Framing,
};
use super::request::{build_request, header_str, header_values, route_request, Ask};
use super::response::{client_head, read_response_head, HeadError, UpstreamHead};
use super::upload::{Upload, UploadFailed};
use super::{Conn, FastPath, Held, Step, READ_CHUNK};
use crate::model::peer::read_when_ready;
use crate::model::{Route, Upstream};
use crate::observe::access_log::Entry;
use crate::paths::request::{self, Resend, Retry};
use crate::policy;
use crate::policy::cdn::CdnFacts;
use crate::policy::deleak::Public;
use crate::policy::failure::{BodyStopped, ErrorKind};
use crate::policy::handover::Handover;
use crate::policy::marker::Seen;
use crate::policy::refusal::Refusal;

impl<A: ServerApp + Send + Sync + 'static> FastPath<A> {
    /// `after_head`: what the client's buffer holds after the head (the
    /// body's start, perhaps more).
    pub(super) async fn forward(
        &self,
        conn: &mut Conn,
        req: &httparse::Request<'_, '_>,
        after_head: &[u8],
        shutdown: &ShutdownWatch,
    ) -> Step {
        let started = Instant::now();
        let model = self.process.model();
        let (mut ask, route_idx) = match route_request(req, &model) {
            Ok(routed) => routed,
            Err(reason) => return Step::Handover(reason),
        };
        // The body: what came with the head, then the rest from the client.
        // A chunked body that does not parse here has sent nothing yet: the
        // Pingora path answers it (400), as every malformed request.
        let Ok(mut upload) = Upload::start(ask.body, after_head) else {
            return Step::Handover(Handover::Body);
        };
        conn.body.clear();
        ask.tls = conn.tls;
        ask.https =
            policy::client_ip::client_https(&model.client_ip, conn.peer, conn.tls, ask.proto);
        let route = &model.routes[route_idx];
        let values = header_values(req, model.client_ip.header.as_ref().map(|h| h.as_str()));
        let client = request::client_address(&model, conn.peer, values);
        let point = request::sticky_point(route, client);
        let Some(mut idx) = request::choose_upstream(route, point) else {
            return Step::Handover(Handover::NoUpstream);
        };
        let closing = self.process.closing(*shutdown.borrow());
        let mut first_attempt = true;
        // A reused connection found closed: the next connect is a fresh one
        // (which cannot be stale).
        let mut fresh_only = false;
        // Addresses of the current upstream this request tried (no
        // allocation unless a connect fails).
        let mut attempted: Vec<SocketAddr> = Vec::new();
        let mut tried;
        let outcome = loop {
            let up = &route.upstreams[idx];
            // The held connection's address while it is usable: a client
            // keeps its upstream connection (and its address) while it works.
            let held_addr = conn
                .held
                .as_ref()
                .filter(|h| attempted.is_empty() && h.serves_upstream(&model, route_idx, idx))
                .map(|h| h.addr)
                // Still in the name's answer and not ejected: an address
                // that left DNS retires its connection here.
                .filter(|a| !up.addresses.is_ejected(*a) && up.addresses.contains(*a));
            tried = held_addr.or_else(|| up.addresses.choose(&attempted));
            let Some(addr) = tried else {
                let e = request::unresolved(up);
                let shown = format!("{}:{}", up.addresses.host, up.addresses.port);
                match request::connect_failed(route, idx, point, first_attempt, &shown, &e) {
                    Some(next) => {
                        first_attempt = false;
                        idx = next;
                        continue;
                    }
                    None => break Err((ErrorKind::Connect, e.to_string(), true)),
                }
            };
            let mut held = conn.held.take();
            if let Some(other) = held.take_if(|h| !h.serves(&model, route_idx, idx, addr)) {
                other.release(&self.connector);
            }
            // Something arrived on it, or it closed: not reusable.
            let held = held.and_then(Held::quiet);
            let upstream_stream = match held {
                Some(h) => Ok((h.stream, true, h.reuse_hash)),
                None => {
                    let peer = up.peer.for_address(addr);
                    let hash = peer.reuse_hash();
                    if fresh_only {
                        self.connector
                            .new_stream(&*peer)
                            .await
                            .map(|s| (s, false, hash))
                    } else {
                        self.connector
                            .get_stream(&*peer)
                            .await
                            .map(|(s, reused)| (s, reused, hash))
                    }
                }
            };
            let (ups, reused, reuse_hash) = match upstream_stream {
                Ok(s) => {
                    if !s.1 {
                        crate::model::peer::tune_tls(&s.0);
                    }
                    request::address_answered(up, addr);
                    s
                }
                Err(e) => {
                    let retry = request::address_failed(
                        route,
                        idx,
                        addr,
                        point,
                        first_attempt,
                        &mut attempted,
                        &e,
                    );
                    match retry {
                        Retry::Address => continue,
                        Retry::Upstream(next) => {
                            first_attempt = false;
                            attempted.clear();
                            idx = next;
                            continue;
                        }
                        Retry::No => {
                            let kind = ErrorKind::of(&e);
                            break Err((kind, e.to_string(), true));
                        }
                    }
                }
            };
            build_request(
                &mut conn.out,
                req,
                &ask,
                up,
                conn.peer_text.as_deref(),
                client,
            );
            let exchanged = self
                .exchange(conn, ups, &ask, route, up, closing, &mut upload)
                .await;
            match exchanged {
                Ok((done, reusable)) => {
                    if let Some(stream) = reusable {
                        conn.held = Some(Held {
                            model: model.clone(),
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
                Err(Exchange::Died(cause)) => {
                    match request::exchange_failed(
                        route,
                        idx,
                        addr,
                        point,
                        first_attempt,
                        &mut attempted,
                        reused,
                        request::may_resend(ask.method, upload.kept()),
                        ErrorKind::Reset,
                        &cause,
                    ) {
                        // The retry is fresh: only a reused one is stale.
                        Resend::Fresh => fresh_only = true,
                        Resend::Address => {}
                        Resend::Upstream(next) => {
                            first_attempt = false;
                            attempted.clear();
                            idx = next;
                        }
                        Resend::No { counted } => break Err((ErrorKind::Reset, cause, counted)),
                    }
                    continue;
                }
                Err(Exchange::Client(stopped)) => {
                    // The client stopped sending its body, or sent a chunk
                    // that does not parse: answered as the Pingora path
                    // answers it, the half-sent upstream connection dropped.
                    let status = match stopped {
                        BodyStopped::Malformed => request::body_refused(
                            &model,
                            Refusal::BadFraming,
                            conn.peer,
                            &"a chunk line that does not parse",
                        ),
                        other => other.status(),
                    };
                    let status = if status != 499 && write_error(&mut conn.stream, status).await {
                        status
                    } else {
                        499
                    };
                    break Ok(Done {
                        status,
                        bytes: 0,
                        keep_client: false,
                        cdn: (CdnFacts::default(), Seen::Unchecked),
                    });
                }
                Err(Exchange::Failed(kind, cause, counted)) => break Err((kind, cause, counted)),
            }
        };

        let up = &route.upstreams[idx];
        let mut cdn = CdnFacts::default();
        let mut marker = Seen::Unchecked;
        let (status, bytes, keep_client) = match outcome {
            Ok(done) => {
                (cdn, marker) = done.cdn;
                (done.status, done.bytes, done.keep_client)
            }
            Err((kind, cause, counted)) => {
                let status = request::failed(route, up, kind, &cause, counted);
                let status = if write_error(&mut conn.stream, status).await {
                    status
                } else {
                    499
                };
                (status, 0, false)
            }
        };
        let entry = Entry {
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
            duration: started.elapsed(),
            bytes,
            phase: &model.config.phase,
            referer: header_str(req, "referer"),
            user_agent: header_str(req, "user-agent"),
            cf_id: cdn.id.as_str(),
            cf_pop: cdn.pop.as_str(),
            vpce: conn.vpce.as_deref().unwrap_or(""),
            marker: request::marker_label(route, marker),
        };
        request::finish(&self.process, Some(up), &entry);
        Step::Served {
            keep_client,
            body_read: upload.read(),
        }
    }

    /// Send the request in `conn.out` and relay the response. On success, the
    /// upstream stream comes back if it can serve another request.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn exchange(
        &self,
        conn: &mut Conn,
        ups: Stream,
        ask: &Ask<'_>,
        route: &Route,
        up: &Upstream,
        closing: bool,
        upload: &mut Upload<'_>,
    ) -> Result<(Done, Option<Stream>), Exchange> {
        let t = &up.config.timeouts;
        let fail = |kind: ErrorKind, cause: String| Err(Exchange::Failed(kind, cause, false));
        let (mut ups, (mut end, mut folded)) = self.send(conn, ups, up, upload).await?;
        let mut interim = 0;
        let close = closing || ask.client_close;
        let public = &Public {
            authority: ask.host,
            https: ask.https,
        };
        let (status, head_len, framing, upstream_keep, cdn) = loop {
            let head = &conn.resp[..end];
            match client_head(
                head,
                folded,
                ask.head,
                &up.plan,
                public,
                close,
                &mut conn.out,
            ) {
                Err(why) => return fail(ErrorKind::Other, why),
                Ok(UpstreamHead::Final {
                    status,
                    framing,
                    findings,
                }) => {
                    request::answered(route, up, status, &framing.cdn, &findings);
                    let cdn = (framing.cdn, findings.marker);
                    break (status, end, framing.body, framing.reusable, cdn);
                }
                Ok(UpstreamHead::Interim) => {
                    // Not forwarded (as the Pingora path and nginx); the
                    // final response follows on the same connection.
                    interim += 1;
                    if interim > policy::framing::MAX_INTERIM_RESPONSES {
                        return fail(ErrorKind::Other, "too many informational responses".into());
                    }
                    conn.resp.drain(..end);
                    (end, folded) = match read_response_head(
                        &mut ups,
                        &mut conn.resp,
                        &mut conn.ups_timer,
                        t.read,
                    )
                    .await
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
        let keep_client = !(close || matches!(framing, Framing::Close));
        let mut framing = framing;
        let Some(first) = body_part(&mut framing, &conn.resp[head_len..]) else {
            return fail(ErrorKind::Other, "malformed chunked body".into());
        };
        let done = |bytes, keep_client| Done {
            status,
            bytes,
            keep_client,
            cdn,
        };
        if let Err(e) = to_client(write_head_and_body(
            &mut conn.stream,
            &mut conn.out,
            &mut conn.resp,
            head_len,
            first.relay,
            first.tail(),
        ))
        .await
        {
            debug!("client went away before the response head: {e}");
            let gone = Done {
                status: 499,
                bytes: 0,
                keep_client: false,
                cdn,
            };
            // The whole response was read: the upstream connection is fine,
            // keep it (a client giving up must not cost a TLS handshake).
            let reusable = first.finished && first.clean && upstream_keep && !upstream_eof;
            return Ok((gone, reusable.then_some(ups)));
        }
        let mut relayed = first.relay as u64;
        let mut clean = first.clean && !upstream_eof;
        if !first.finished {
            let rest = relay_body(conn, &mut ups, &mut framing, upstream_eof, route, up).await;
            match rest {
                Ok((bytes, rest_clean)) => {
                    relayed += bytes;
                    clean = rest_clean;
                }
                Err(bytes) => return Ok((done(relayed + bytes, false), None)),
            }
        }
        if to_client(conn.stream.flush()).await.is_err() {
            return Ok((done(relayed, false), None));
        }
        // A large body grew the buffers; do not keep 64 KiB per idle client.
        if conn.resp.capacity() > 2 * READ_CHUNK {
            conn.resp = Vec::with_capacity(READ_CHUNK);
        }
        if conn.body.capacity() > 2 * READ_CHUNK {
            conn.body = Vec::new();
        }
        let reusable = (upstream_keep && clean).then_some(ups);
        Ok((done(relayed, keep_client), reusable))
    }

    /// Write the request in `conn.out` and its body, and read the response
    /// head into `conn.resp`; the stream it came on, the head's length and
    /// whether it holds an obs-fold. A connection that failed before the
    /// head arrived is [`Exchange::Died`]: the caller sends again where
    /// [`request::exchange_failed`] says.
    async fn send(
        &self,
        conn: &mut Conn,
        mut ups: Stream,
        up: &Upstream,
        upload: &mut Upload<'_>,
    ) -> Result<(Stream, (usize, bool)), Exchange> {
        let t = &up.config.timeouts;
        let timed_out = || {
            let cause = "writing the request timed out".to_string();
            Err(Exchange::Failed(ErrorKind::Timeout, cause, false))
        };
        conn.resp.clear();
        // What of the body can be had now is read first, so the whole
        // request goes out in one write (one TLS record, one syscall fewer).
        upload.gather(conn).await.map_err(Exchange::Client)?;
        // The head and the body bytes at hand in one write: copied behind
        // the head when small (a TLS stream writes one buffer per record),
        // else a vectored write. A tail follows the early bytes only when
        // the body ended with them, so nothing was gathered after them.
        let (early, tail) = upload.early();
        let small = early.len() <= 16 * 1024;
        let (early, rest): (&[u8], &[u8]) = if small {
            conn.out.extend_from_slice(early);
            conn.out.extend_from_slice(tail);
            conn.out.extend_from_slice(&conn.body);
            (b"", b"")
        } else if tail.is_empty() {
            (early, &conn.body)
        } else {
            (early, tail)
        };
        let parts: [&[u8]; 3] = [&conn.out, early, rest];
        let mut sent = match conn
            .ups_timer
            .within(t.write, write_parts(&mut ups, &parts))
            .await
        {
            Ok(r) => r,
            Err(_) => return timed_out(),
        };
        if sent.is_ok() && upload.pending() {
            match upload.relay(conn, &mut ups, t.write).await {
                Ok(()) => {}
                Err(UploadFailed::Client(status)) => return Err(Exchange::Client(status)),
                Err(UploadFailed::UpstreamTimeout) => return timed_out(),
                Err(UploadFailed::Upstream(e)) => sent = Err(e),
            }
        }
        if sent.is_ok() {
            sent = match conn.ups_timer.within(t.write, ups.flush()).await {
                Ok(r) => r,
                Err(_) => return timed_out(),
            };
        }
        let head = match sent {
            Ok(()) => {
                read_response_head(&mut ups, &mut conn.resp, &mut conn.ups_timer, t.read).await
            }
            Err(e) => Err(HeadError::Io(e)),
        };
        match head {
            Ok(found) => Ok((ups, found)),
            Err(e @ HeadError::Io(_)) => Err(Exchange::Died(e.to_string())),
            Err(e) => Err(Exchange::Failed(e.kind(), e.to_string(), false)),
        }
    }
}

/// Why an exchange with the upstream did not produce a response.
pub(super) enum Exchange {
    /// Failed: the kind, the cause, and whether it was already counted.
    Failed(ErrorKind, String, bool),
    /// The connection failed (reset, closed) before the response head was
    /// read: nothing reached the client, so the request may be sent again
    /// ([`request::exchange_failed`] decides). The cause, for the log.
    Died(String),
    /// The client stopped short of sending the request body whole.
    Client(BodyStopped),
}

/// Relay the rest of a response body, after what went out with the head
/// (`upstream_eof`: the upstream already closed). `Ok` with the bytes
/// relayed and whether the upstream connection ended clean (reusable);
/// `Err` with the bytes relayed when the response was cut short.
async fn relay_body(
    conn: &mut Conn,
    ups: &mut Stream,
    framing: &mut Framing,
    mut upstream_eof: bool,
    route: &Route,
    up: &Upstream,
) -> Result<(u64, bool), u64> {
    let t = &up.config.timeouts;
    let mut relayed = 0u64;
    loop {
        if upstream_eof {
            if matches!(framing, Framing::Close) {
                return Ok((relayed, false));
            }
            let cause = "the upstream closed the connection mid-body";
            request::failed_mid_body(route, up, ErrorKind::Reset, &cause);
            return Err(relayed);
        }
        conn.resp.clear();
        conn.resp.reserve(READ_CHUNK);
        let n = match conn
            .ups_timer
            .within(t.read, read_when_ready(ups, &mut conn.resp))
            .await
        {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                let cause = format_args!("reading the body: {e}");
                request::failed_mid_body(route, up, ErrorKind::Reset, &cause);
                return Err(relayed);
            }
            Err(_) => {
                let cause = "no body bytes within the read timeout";
                request::failed_mid_body(route, up, ErrorKind::Timeout, &cause);
                return Err(relayed);
            }
        };
        if n == 0 {
            // Handled with the other end-of-stream case at the loop's top.
            upstream_eof = true;
            continue;
        }
        // Whatever else is already there goes out in the same client write.
        let want = batch_size(framing);
        upstream_eof = !matches!(read_available(ups, &mut conn.resp, want), Ok(false));
        let Some(part) = body_part(framing, &conn.resp) else {
            // What went out so far was well-formed; the client sees the
            // response cut short, never the malformed bytes.
            let cause = "malformed chunked body";
            request::failed_mid_body(route, up, ErrorKind::Other, &cause);
            return Err(relayed);
        };
        let sent = to_client(write_parts(
            &mut conn.stream,
            &[&conn.resp[..part.relay], part.tail()],
        ))
        .await;
        if sent.is_err() {
            return Err(relayed);
        }
        relayed += part.relay as u64;
        if part.finished {
            return Ok((relayed, part.clean && !upstream_eof));
        }
    }
}

/// What one forwarded request came to, for metrics and the access log.
pub(super) struct Done {
    pub(super) status: u16,
    pub(super) bytes: u64,
    pub(super) keep_client: bool,
    /// What the CDN's fields said, and who answered by the marker.
    pub(super) cdn: (CdnFacts, Seen),
}

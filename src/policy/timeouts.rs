//! The client side's timeouts, one table for both carriers (the upstream
//! side's are per upstream, in the config's `timeouts`). The values are
//! nginx's defaults, except `idle`, which is Pingora's keep-alive.

use std::time::Duration;

pub struct ClientTimeouts {
    /// A keep-alive connection waiting for its next request (nginx's
    /// `keepalive_timeout` is 75 s; Pingora's keep-alive 60 s).
    pub idle: Duration,
    /// A started request head must be complete within this, in all (nginx's
    /// `client_header_timeout`): a client trickling one byte at a time
    /// cannot hold a connection. The fast path; Pingora applies its own
    /// to the first head of a connection.
    pub head: Duration,
    /// Between two reads of a request body (nginx's `client_body_timeout`).
    pub body: Duration,
    /// A write to the client that makes no progress (nginx's `send_timeout`):
    /// a client that stops reading must not hold its task, buffers and
    /// upstream connection.
    pub send: Duration,
}

pub const CLIENT: ClientTimeouts = ClientTimeouts {
    idle: Duration::from_secs(60),
    head: Duration::from_secs(60),
    body: Duration::from_secs(60),
    send: Duration::from_secs(60),
};

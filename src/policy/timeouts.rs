//! The client side's timeouts (and each listener's other settings), one table for both carriers (the upstream
//! side's are per upstream, in the config's `timeouts`). `idle` and `head`
//! are per listener (`keepalive_timeout`, `header_timeout`); the others are
//! nginx's defaults.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use prometheus::{IntCounter, IntGauge};

use crate::observe::metrics::{ListenerMetrics, Metrics};

use crate::config::{
    Listener, ProxyProtocolMode, DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEPALIVE_TIMEOUT,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// A connection waiting for its next request, the first one included
    /// (the listener's `keepalive_timeout`): then it is closed, silently.
    /// Longer than the load balancer's idle timeout, so the load balancer
    /// closes first and never reuses a connection cutover is closing.
    pub idle: Duration,
    /// A started request head must be complete within this, in all (the
    /// listener's `header_timeout`, nginx's `client_header_timeout`): a
    /// client trickling one byte at a time cannot hold a connection. Then
    /// it is answered 408 and closed.
    pub head: Duration,
    /// Between two reads of a request body (nginx's `client_body_timeout`).
    pub body: Duration,
    /// A write to the client that makes no progress (nginx's `send_timeout`):
    /// a client that stops reading must not hold its task, buffers and
    /// upstream connection.
    pub send: Duration,
}

pub const CLIENT: ClientTimeouts = ClientTimeouts {
    idle: DEFAULT_KEEPALIVE_TIMEOUT,
    head: DEFAULT_HEADER_TIMEOUT,
    body: Duration::from_secs(60),
    send: Duration::from_secs(60),
};

impl ClientTimeouts {
    pub fn of(l: &Listener) -> ClientTimeouts {
        ClientTimeouts {
            idle: l.keepalive_timeout,
            head: l.header_timeout,
            ..CLIENT
        }
    }
}

/// What a connection gets from the listener it arrived on.
#[derive(Debug)]
pub struct ListenerPolicy {
    /// Its place in the config's `listeners`.
    pub index: usize,
    pub address: SocketAddr,
    pub timeouts: ClientTimeouts,
    pub proxy_protocol: ProxyProtocolMode,
    /// Peers allowed to send a PROXY header.
    pub proxy_trusted: Vec<IpNet>,
    /// Its client connections against its `max_connections`.
    pub limit: ConnectionLimit,
}

/// The file descriptors a process keeps for itself (listeners, log
/// files, the resolver, health checks, reload and upgrade sockets) before
/// the default `max_connections` shares out the rest.
const RESERVED_FDS: usize = 256;

/// `max_connections` when a listener sets none: half the process's
/// file-descriptor limit after [`RESERVED_FDS`] (a client connection can
/// hold an upstream connection: two descriptors), as HAProxy derives its
/// `maxconn` from `ulimit -n`. Connections past it are refused with a 503
/// instead of every accept, connect and file open failing at the limit.
/// With the unit's `LimitNOFILE=1048576`: 524,160. At least 64.
pub fn default_max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    (soft.saturating_sub(RESERVED_FDS) / 2).max(64)
}

/// A listener's open client connections, against its `max_connections`:
/// [`ConnectionLimit::admit`] gives a connection its [`Slot`] or refuses it.
#[derive(Debug)]
pub struct ConnectionLimit {
    pub max: usize,
    open: AtomicUsize,
    gauge: IntGauge,
    /// Connections refused (answered 503 and closed).
    pub refused: IntCounter,
}

impl ConnectionLimit {
    fn new(max: usize, m: ListenerMetrics) -> ConnectionLimit {
        m.max.set(i64::try_from(max).unwrap_or(i64::MAX));
        ConnectionLimit {
            max,
            open: AtomicUsize::new(0),
            gauge: m.open,
            refused: m.refused,
        }
    }

    /// A slot for one more connection, held while it is open; `None` when
    /// `max` are open already.
    pub fn admit(&self) -> Option<Slot<'_>> {
        let mut open = self.open.load(Ordering::Relaxed);
        loop {
            if open >= self.max {
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.gauge.inc();
                    return Some(Slot(self));
                }
                Err(now) => open = now,
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Slot<'a>(&'a ConnectionLimit);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.gauge.dec();
    }
}

impl ListenerPolicy {
    /// Whether `peer` may (and with `v1`/`v2` must) send a PROXY header.
    pub fn trusts(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|p| super::client_ip::trusted(&self.proxy_trusted, p))
    }
}

/// Each listener's settings, found by the local address a connection
/// arrived on. Fixed for the process (listeners change only with `run
/// --upgrade`).
#[derive(Debug, Default)]
pub struct ListenerTable(Vec<ListenerPolicy>);

impl ListenerTable {
    pub fn new(listeners: &[Listener], metrics: &Metrics) -> ListenerTable {
        let default_max = default_max_connections();
        ListenerTable(
            listeners
                .iter()
                .enumerate()
                .map(|(index, l)| {
                    let max = l.max_connections.unwrap_or(default_max);
                    let m = metrics.listener(&l.address.to_string());
                    ListenerPolicy {
                        index,
                        address: l.address,
                        timeouts: ClientTimeouts::of(l),
                        proxy_protocol: l.proxy_protocol,
                        proxy_trusted: l.proxy_trusted.clone(),
                        limit: ConnectionLimit::new(max, m),
                    }
                })
                .collect(),
        )
    }

    /// The listener every connection gets whatever its local address: the
    /// only one. Spares a `getsockname` per connection. (With several,
    /// each connection is counted against its own listener's limit.)
    pub fn same_for_all(&self) -> Option<&ListenerPolicy> {
        match &self.0[..] {
            [only] => Some(only),
            _ => None,
        }
    }

    /// The listener `local` belongs to (a wildcard listener by port).
    pub fn find(&self, local: Option<SocketAddr>) -> Option<&ListenerPolicy> {
        let local = local?;
        // Exact address first, then a wildcard listener of that port.
        let of_port = || self.0.iter().filter(|l| l.address.port() == local.port());
        of_port()
            .find(|l| l.address.ip() == local.ip())
            .or_else(|| of_port().find(|l| l.address.ip().is_unspecified()))
    }

    /// The timeouts of that listener; the defaults when none matches.
    pub fn timeouts(&self, local: Option<SocketAddr>) -> ClientTimeouts {
        self.find(local).map_or(CLIENT, |l| l.timeouts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(addr: &str, idle: u64) -> Listener {
        Listener {
            address: addr.parse().unwrap(),
            tls: None,
            keepalive_timeout: Duration::from_secs(idle),
            header_timeout: Duration::from_secs(5),
            proxy_protocol: ProxyProtocolMode::Off,
            proxy_trusted: Vec::new(),
            max_connections: None,
        }
    }

    #[test]
    fn a_connection_gets_its_listeners_timeouts() {
        let metrics = Metrics::new();
        let t = ListenerTable::new(
            &[
                listener("0.0.0.0:8080", 75),
                listener("127.0.0.1:8081", 2),
                listener("[::]:8082", 90),
            ],
            &metrics,
        );
        let idle = |a: &str| t.timeouts(Some(a.parse().unwrap())).idle.as_secs();
        assert_eq!(idle("10.0.0.5:8080"), 75);
        assert_eq!(idle("127.0.0.1:8081"), 2);
        assert_eq!(idle("[2001:db8::1]:8082"), 90);
        assert_eq!(idle("[::ffff:10.0.0.5]:8082"), 90);
        // No listener of that port: the defaults.
        assert_eq!(idle("10.0.0.5:9999"), CLIENT.idle.as_secs());
        assert_eq!(t.timeouts(None), CLIENT);
        // Several listeners: the address decides (each counts its own
        // connections).
        assert!(t.same_for_all().is_none());
        let one = ListenerTable::new(&[listener("0.0.0.0:8080", 75)], &Metrics::new());
        assert_eq!(one.same_for_all().map(|l| l.index), Some(0));
    }

    #[test]
    fn a_listener_admits_up_to_its_max_connections() {
        let mut l = listener("0.0.0.0:8080", 75);
        l.max_connections = Some(2);
        let metrics = Metrics::new();
        let t = ListenerTable::new(&[l], &metrics);
        let limit = &t.same_for_all().unwrap().limit;
        let a = limit.admit().expect("first");
        let b = limit.admit().expect("second");
        assert!(limit.admit().is_none(), "a third past max_connections: 2");
        assert_eq!(limit.open(), 2);
        drop(a);
        let c = limit.admit().expect("a place freed");
        drop((b, c));
        assert_eq!(limit.open(), 0);
        let mut body = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &metrics.registry.gather(),
            &mut body,
        )
        .unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains("cutover_client_connections{listener=\"0.0.0.0:8080\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("cutover_client_connections_max{listener=\"0.0.0.0:8080\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn the_default_limit_leaves_descriptors_for_upstreams_and_the_process() {
        let max = default_max_connections();
        assert!(max >= 64);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) writes the struct it is given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        if lim.rlim_cur > 1024 {
            assert_eq!(max as u64, (lim.rlim_cur - 256) / 2);
        }
    }
}

//! The client side's timeouts (and each listener's other settings), one table for both carriers (the upstream
//! side's are per upstream, in the config's `timeouts`). `idle` and `head`
//! are per listener (`keepalive_timeout`, `header_timeout`); the others are
//! nginx's defaults.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

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
    pub fn new(listeners: &[Listener]) -> ListenerTable {
        ListenerTable(
            listeners
                .iter()
                .enumerate()
                .map(|(index, l)| ListenerPolicy {
                    index,
                    address: l.address,
                    timeouts: ClientTimeouts::of(l),
                    proxy_protocol: l.proxy_protocol,
                    proxy_trusted: l.proxy_trusted.clone(),
                })
                .collect(),
        )
    }

    /// The listener every connection gets whatever its local address: the
    /// only one, or the first when all have the same settings and none
    /// reads a PROXY header. Spares a `getsockname` per connection.
    pub fn same_for_all(&self) -> Option<&ListenerPolicy> {
        let first = self.0.first()?;
        let alike = |l: &ListenerPolicy| {
            l.timeouts == first.timeouts && l.proxy_protocol == ProxyProtocolMode::Off
        };
        (self.0.len() == 1 || self.0.iter().all(alike)).then_some(first)
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
        }
    }

    #[test]
    fn a_connection_gets_its_listeners_timeouts() {
        let t = ListenerTable::new(&[
            listener("0.0.0.0:8080", 75),
            listener("127.0.0.1:8081", 2),
            listener("[::]:8082", 90),
        ]);
        let idle = |a: &str| t.timeouts(Some(a.parse().unwrap())).idle.as_secs();
        assert_eq!(idle("10.0.0.5:8080"), 75);
        assert_eq!(idle("127.0.0.1:8081"), 2);
        assert_eq!(idle("[2001:db8::1]:8082"), 90);
        assert_eq!(idle("[::ffff:10.0.0.5]:8082"), 90);
        // No listener of that port: the defaults.
        assert_eq!(idle("10.0.0.5:9999"), CLIENT.idle.as_secs());
        assert_eq!(t.timeouts(None), CLIENT);
        // Different settings: the address decides.
        assert!(t.same_for_all().is_none());
        let alike =
            ListenerTable::new(&[listener("0.0.0.0:8080", 75), listener("0.0.0.0:8443", 75)]);
        assert_eq!(alike.same_for_all().map(|l| l.index), Some(0));
    }
}

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

//! The two carriers of a request: the fast path ([`fast`]) for the common
//! plain-HTTP GET/HEAD, Pingora's `ProxyHttp` ([`pingora`]) for everything
//! else. They never import each other; both call [`request`] (what is done around a
//! request), [`crate::policy`] and [`crate::shift`], and only move bytes.
//! [`client`] is the client stream the Pingora path reads, with the
//! listener's timeouts that Pingora does not have.

pub mod client;
pub mod fast;
pub mod memory;
pub mod pingora;
pub mod request;

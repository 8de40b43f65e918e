//! Decisions about a request that both carriers (the fast path and the
//! Pingora path) make the same way: they call these functions and only
//! render the answer in their own representation.

pub mod cdn;
pub mod client_ip;
pub mod deleak;
pub mod failure;
pub mod fields;
pub mod forward;
pub mod framing;
pub mod handover;
pub mod marker;
pub mod proxy_protocol;
pub mod refusal;
pub mod routing;
pub mod timeouts;

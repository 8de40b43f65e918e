//! The offline rehearsal: a CloudFront-like edge, a throwaway CA, and the
//! `cutover demo` that puts the proxy in front of them. Tests use the same
//! pieces, so the demo and the test bed cannot drift apart.

pub mod demo;
pub mod edge;
pub mod pki;
pub mod strict;

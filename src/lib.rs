//! cutover: a Pingora reverse proxy for zero-downtime CDN distribution migrations.
//!
//! Stages, each its own module: the config file is parsed and checked once
//! ([`config`]) into an immutable model; [`runtime`] joins it with live handles
//! (DNS, metrics, health) and is swapped whole on reload; the request path
//! ([`fast_path`] for the common request, [`proxy`] for everything else) only
//! reads that model.

pub mod access_log;
pub mod admin;
pub mod chunked;
pub mod client_ip;
pub mod config;
pub mod dns;
pub mod drain;
pub mod errors;
pub mod fast_path;
pub mod health;
pub mod log_limit;
pub mod memory;
pub mod metrics;
pub mod peer;
pub mod policy;
pub mod probe;
pub mod proxy;
pub mod rehearsal;
pub mod routing;
pub mod runtime;
pub mod selection;
pub mod server;
pub mod signals;
pub mod verify;

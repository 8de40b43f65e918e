//! cutover: a Pingora reverse proxy for zero-downtime CDN distribution migrations.
//!
//! # Layout
//!
//! Folders by concern, one level deep. A folder uses only the folders above
//! it in this list; nothing uses a folder below it.
//!
//! - [`config`]: the config file → a validated, immutable `Config`; every
//!   problem with its key path; a bootstrap file joined with a served
//!   document (`config::source`). No I/O but reading files.
//! - [`policy`]: the decisions about a request that both carriers make the
//!   same way: routing by Host, the client address, framing, which fields
//!   are forwarded, refusals, failure → status, what a CDN edge's own
//!   fields say (`policy::cdn`), response fields that would send the
//!   client to an upstream's name (`policy::deleak`). Pure functions over bytes and config
//!   values.
//! - [`observe`]: metrics, the access log, rate-limited log lines.
//! - [`shift`]: upstream choice (weights, stickiness, failover) and the
//!   health state it reads; knows nothing of the model (a `Candidate` is
//!   anything with a weight, a backup flag and a health flag); a rollout's
//!   schedule, gates and state (`shift::rollout`, pure: the caller brings
//!   the clock and the numbers).
//! - [`model`]: the runtime model a request runs on: config joined with
//!   live handles (DNS entries, metric handles, health), built on load and
//!   reload and swapped whole; the background services that keep those
//!   handles fresh (DNS refresh with its answer checks, per-address active
//!   health checks, the rollout controller that samples the counters, asks
//!   Prometheus and publishes each rollout's share).
//! - [`paths`]: the two carriers, the fast path and Pingora's `ProxyHttp`,
//!   and [`paths::request`], what both do around a request (sticky point,
//!   failover, the failure line, the finished record) and
//!   [`paths::client`], the client connection before and under them (the
//!   PROXY header, the listener's timeouts on the Pingora path). The
//!   carriers never import each other; they render what `policy` and `paths::request`
//!   decide, and `tests/parity.rs` checks they send the same bytes.
//! - [`lifecycle`]: the process: server assembly (the only module that
//!   names both carriers), signals and reload, the config document pulled
//!   from a URL (`lifecycle::source`), drain, admin endpoints,
//!   `/status` with `cutover status` and `cutover rollout`, `cutover verify`.
//! - [`rehearsal`]: the offline CloudFront-like edge, the throwaway CA, the
//!   strict RFC 9112 reader and `cutover demo`.

pub mod config;
pub mod lifecycle;
pub mod model;
pub mod observe;
pub mod paths;
pub mod policy;
pub mod rehearsal;
pub mod shift;

//! What the operator sees of each request: Prometheus metrics, the access
//! log, and log lines limited to a few per second per site.

pub mod access_log;
pub mod log_limit;
pub mod metrics;

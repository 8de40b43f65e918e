//! The YAML file format, exactly as an operator writes it.
//!
//! These structs only describe shape: every field that needs checking (addresses,
//! durations, header names, file paths) stays a string here and is checked in
//! [`super::validate`], so that one run reports every problem with its key path
//! instead of stopping at the first one serde meets.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where the document (phase, client_ip, dns_refresh, routes) comes
    /// from, when this file is a bootstrap ([`super::source`]).
    pub config_source: Option<SourceFile>,
    pub phase: Option<String>,
    #[serde(default)]
    pub listeners: Vec<ListenerFile>,
    pub admin: Option<AdminFile>,
    pub server: Option<ServerFile>,
    pub access_log: Option<AccessLogFile>,
    pub client_ip: Option<ClientIpFile>,
    pub dns_refresh: Option<String>,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
}

impl FileConfig {
    /// The top-level keys set here that a served document holds.
    pub fn document_keys(&self) -> Vec<&'static str> {
        [
            ("phase", self.phase.is_some()),
            ("client_ip", self.client_ip.is_some()),
            ("dns_refresh", self.dns_refresh.is_some()),
            ("routes", !self.routes.is_empty()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    /// The top-level keys set here that each instance's bootstrap holds.
    pub fn bootstrap_keys(&self) -> Vec<&'static str> {
        [
            ("config_source", self.config_source.is_some()),
            ("listeners", !self.listeners.is_empty()),
            ("admin", self.admin.is_some()),
            ("server", self.server.is_some()),
            ("access_log", self.access_log.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// `https://…` (or `http://` to a loopback address); `run --config-url`
    /// gives it instead.
    pub url: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    /// The last good document, kept for a start while the source is down.
    pub cache: Option<String>,
    pub ca_file: Option<String>,
    /// A file holding one `Name: value` line sent with every fetch.
    pub header_file: Option<String>,
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub address: String,
    pub tls: Option<ListenerTlsFile>,
    /// Idle time allowed between a client's requests (default 75s).
    pub keepalive_timeout: Option<String>,
    /// Time allowed for a whole request head once it has started (default 20s).
    pub header_timeout: Option<String>,
    /// The idle timeout of the load balancer in front, checked against
    /// `keepalive_timeout` (default: the ALB's, 60s).
    pub alb_idle_timeout: Option<String>,
    /// `off` (the default), `v1`, `v2` or `auto`.
    pub proxy_protocol: Option<String>,
    /// Peers allowed (and, with `v1`/`v2`, required) to send a PROXY header.
    #[serde(default)]
    pub trusted: Vec<String>,
    /// Client connections open at once on this listener; past it a new
    /// connection is answered 503 and closed (default: from the process's
    /// file-descriptor limit).
    pub max_connections: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsFile {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub threads: Option<usize>,
    pub grace_period: Option<String>,
    pub graceful_shutdown_timeout: Option<String>,
    pub upgrade_sock: Option<String>,
    pub pid_file: Option<String>,
    pub upstream_keepalive_pool_size: Option<usize>,
    pub work_stealing: Option<bool>,
}

/// `access_log: off`, or `{ format: json, path: stdout }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum AccessLogFile {
    Switch(String),
    Settings(AccessLogSettingsFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSettingsFile {
    pub format: Option<String>,
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIpFile {
    pub header: Option<String>,
    #[serde(default)]
    pub trusted: Vec<String>,
    /// What `X-Forwarded-For` upstream says: `append` (the default),
    /// `replace` or `preserve`.
    pub forward: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub sticky: Option<String>,
    pub canary: Option<String>,
    #[serde(default)]
    pub request_headers: HeaderEditsFile,
    #[serde(default)]
    pub response_headers: HeaderEditsFile,
    /// `rewrite` (the default), `detect` or `off`.
    pub rewrite_response: Option<String>,
    /// Names besides the upstreams' own whose URLs and cookie domains are
    /// rewritten to the client's Host.
    #[serde(default)]
    pub rewrite_names: Vec<String>,
    #[serde(default)]
    pub upstreams: Vec<UpstreamFile>,
    /// A schedule that moves traffic from one upstream to another.
    pub rollout: Option<RolloutFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutFile {
    pub from: String,
    pub to: String,
    /// Percent to `to`, kept as YAML values for a message naming the step.
    #[serde(default)]
    pub steps: Vec<serde_yaml::Value>,
    /// One duration for every step, or one per step.
    pub hold: Option<HoldFile>,
    pub start: Option<String>,
    pub gates: Option<GatesFile>,
    /// `rollback` (the default), `previous` or `hold`.
    pub on_failure: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum HoldFile {
    One(String),
    PerStep(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatesFile {
    pub max_5xx_ratio: Option<f64>,
    pub max_5xx_ratio_vs_from: Option<f64>,
    pub max_p99: Option<String>,
    pub max_edge_refused_ratio: Option<f64>,
    pub max_marker_mismatch_ratio: Option<f64>,
    pub max_connect_error_ratio: Option<f64>,
    pub min_requests: Option<u64>,
    pub interval: Option<String>,
    pub window: Option<String>,
    pub failure_limit: Option<u32>,
    /// Base URL of a Prometheus server for the `queries` gates.
    pub prometheus: Option<String>,
    pub prometheus_timeout: Option<String>,
    #[serde(default)]
    pub queries: Vec<QueryGateFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryGateFile {
    pub name: String,
    pub query: String,
    pub max: Option<f64>,
    pub min: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectHeaderFile {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEditsFile {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub name: String,
    pub address: String,
    pub tls: Option<bool>,
    pub host_header: Option<String>,
    pub sni: Option<String>,
    pub verify: Option<bool>,
    pub ca_file: Option<String>,
    /// Kept as a YAML value so that `-1` or `2.5` get a message naming the key
    /// rather than serde's generic "invalid type".
    pub weight: Option<serde_yaml::Value>,
    pub backup: Option<bool>,
    pub expect_body: Option<String>,
    /// A response field this upstream's answers carry (who really answered).
    pub expect_header: Option<ExpectHeaderFile>,
    /// `auto` (the default), `ipv4` or `ipv6`.
    pub address_family: Option<String>,
    pub health_check: Option<HealthCheckFile>,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub expect_status: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    pub connect: Option<String>,
    pub read: Option<String>,
    pub write: Option<String>,
    pub idle: Option<String>,
}

//! The validated configuration. Every value here has been checked; types say
//! what the value is (a `SocketAddr`, a `Duration`, a `HeaderName`), not how it
//! was spelled in the file.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use pingora::tls::x509::X509;

#[derive(Debug, Clone)]
pub struct Config {
    pub phase: String,
    pub listeners: Vec<Listener>,
    pub admin: Option<SocketAddr>,
    pub server: ServerSettings,
    pub access_log: AccessLog,
    pub client_ip: ClientIp,
    pub dns_refresh: Duration,
    pub routes: Vec<RouteConfig>,
    /// Accepted but worth an operator's attention (e.g. `verify: false`).
    pub warnings: Vec<String>,
    /// Set when the document comes from a URL (a bootstrap file's
    /// `config_source`); changes only with `run --upgrade`.
    pub source: Option<ConfigSource>,
    /// Hex SHA-256 of the document this config was read from (the whole
    /// file, or the served document): `cutover_config_info{sha256}`.
    pub sha256: String,
}

/// `config_source:` in a bootstrap file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    pub url: SourceUrl,
    pub interval: Duration,
    /// One fetch, connect to last body byte.
    pub timeout: Duration,
    pub cache: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub header_file: Option<PathBuf>,
    /// A bigger body is refused as soon as it passes this.
    pub max_bytes: usize,
}

pub const DEFAULT_SOURCE_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_SOURCE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_SOURCE_CACHE: &str = "/var/lib/cutover/source.yaml";
pub const DEFAULT_SOURCE_MAX_BYTES: usize = 1 << 20;

/// A source URL, split for the fetcher. Its query (an S3 presigned URL's
/// signature) is a credential: `Display` leaves it out.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query as sent, at least `/`.
    pub path_and_query: String,
}

impl std::fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let (path, query) = match self.path_and_query.split_once('?') {
            Some((p, _)) => (p, "?…"),
            None => (self.path_and_query.as_str(), ""),
        };
        let default_port = if self.https { 443 } else { 80 };
        if self.port == default_port {
            write!(f, "{scheme}://{host}{path}{query}")
        } else {
            write!(f, "{scheme}://{host}:{}{path}{query}", self.port)
        }
    }
}

impl std::fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: SocketAddr,
    pub tls: Option<ListenerTls>,
    pub keepalive_timeout: Duration,
    pub header_timeout: Duration,
    pub proxy_protocol: ProxyProtocolMode,
    /// Peers allowed to send a PROXY header (required from them with
    /// `v1`/`v2`).
    pub proxy_trusted: Vec<IpNet>,
    /// `max_connections`, when set; otherwise the process derives one from
    /// its file-descriptor limit ([`crate::policy::timeouts::default_max_connections`]).
    pub max_connections: Option<usize>,
}

/// Whether a listener reads a PROXY protocol header
/// ([`crate::policy::proxy_protocol`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyProtocolMode {
    #[default]
    Off,
    V1,
    V2,
    /// Either version, or none.
    Auto,
}

impl ProxyProtocolMode {
    pub fn label(self) -> &'static str {
        match self {
            ProxyProtocolMode::Off => "off",
            ProxyProtocolMode::V1 => "v1",
            ProxyProtocolMode::V2 => "v2",
            ProxyProtocolMode::Auto => "auto",
        }
    }
}

/// nginx's `keepalive_timeout`: longer than an ALB's default idle timeout
/// (60 s), so the ALB, not cutover, closes an idle connection.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// A whole request head once its first byte arrived (nginx's
/// `client_header_timeout` is 60 s; a load balancer sends a head at once).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// An ALB's default idle timeout.
pub const ALB_DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Pingora server settings; changing them needs `run --upgrade`, not a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub threads: usize,
    pub grace_period: Duration,
    pub graceful_shutdown_timeout: Duration,
    pub upgrade_sock: String,
    pub pid_file: String,
    pub upstream_keepalive_pool_size: usize,
    /// Pingora's work-stealing runtime (the default); off = one single-threaded
    /// runtime per thread, each connection staying on its thread.
    pub work_stealing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    On {
        format: AccessLogFormat,
        destination: LogDestination,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Json,
    Combined,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogDestination {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// Where the real client address comes from.
#[derive(Debug, Clone, Default)]
pub struct ClientIp {
    /// Header carrying the client address (its last untrusted entry is used).
    pub header: Option<HeaderName>,
    /// Peers allowed to set that header.
    pub trusted: Vec<IpNet>,
    /// What `X-Forwarded-For` upstream says.
    pub forward: XffMode,
}

/// What cutover sends upstream as `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XffMode {
    /// The client's list (when it sent one) with the TCP peer appended, as
    /// nginx's `$proxy_add_x_forwarded_for` and an ALB's default `append`.
    #[default]
    Append,
    /// Only the address cutover takes as the client's (after `trusted`): a
    /// WAF or geo rule at the new distribution that reads the first entry
    /// then sees the real client, not what a client wrote.
    Replace,
    /// The client's list unchanged, nothing added.
    Preserve,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub hosts: Vec<HostPattern>,
    pub sticky: Sticky,
    pub canary: Option<String>,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    /// What happens to response fields naming the upstreams' hosts.
    pub rewrite_response: RewriteMode,
    /// Extra names (lower case) treated as the upstreams' own.
    pub rewrite_names: Vec<String>,
    pub upstreams: Vec<UpstreamConfig>,
    pub rollout: Option<Rollout>,
}

/// A schedule moving a route's traffic from one upstream to another
/// ([`crate::shift::rollout`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Index of the upstream traffic leaves, in the route's `upstreams`.
    pub from: usize,
    /// Index of the upstream traffic moves to.
    pub to: usize,
    /// Share of `to` at each step, in basis points (1% = 100), increasing.
    pub steps: Vec<u32>,
    /// How long each step holds, one per step.
    pub holds: Vec<Duration>,
    /// When the first step takes effect.
    pub start: std::time::SystemTime,
    pub gates: Option<Gates>,
    pub on_failure: OnFailure,
}

/// Basis points of a whole route: 100%.
pub const ALL_BASIS_POINTS: u32 = 10_000;

/// What a rollout does after `failure_limit` failed evaluations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Back to 0% for `to`.
    Rollback,
    /// Back one step.
    Previous,
    /// Stay at this step, stop advancing.
    Hold,
}

/// When a rollout may advance: thresholds on the new upstream over a
/// sliding window, compared with the old one over the same window.
#[derive(Debug, Clone, PartialEq)]
pub struct Gates {
    pub max_5xx_ratio: Option<f64>,
    pub max_5xx_ratio_vs_from: Option<f64>,
    pub max_p99: Option<Duration>,
    pub max_edge_refused_ratio: Option<f64>,
    pub max_marker_mismatch_ratio: Option<f64>,
    pub max_connect_error_ratio: Option<f64>,
    pub min_requests: u64,
    pub interval: Duration,
    pub window: Duration,
    pub failure_limit: u32,
    pub fleet: Option<FleetGates>,
}

impl Gates {
    /// Whether any threshold reads this instance's own counters.
    pub fn has_local(&self) -> bool {
        self.max_5xx_ratio.is_some()
            || self.max_5xx_ratio_vs_from.is_some()
            || self.max_p99.is_some()
            || self.max_edge_refused_ratio.is_some()
            || self.max_marker_mismatch_ratio.is_some()
            || self.max_connect_error_ratio.is_some()
    }
}

/// Gates on the whole fleet's numbers: PromQL against a Prometheus server.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetGates {
    pub url: HttpUrl,
    pub timeout: Duration,
    pub queries: Vec<QueryGate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueryGate {
    pub name: String,
    /// With `$window` replaced by the gates' window (e.g. `30s`).
    pub query: String,
    pub max: Option<f64>,
    pub min: Option<f64>,
}

/// An `http://` or `https://` URL, split for a client that needs no parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Without a trailing `/` (empty for the root).
    pub path: String,
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
    }
}

/// What a route does with response fields that name its upstreams'
/// hosts ([`crate::policy::deleak`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RewriteMode {
    /// Rewrite them (the default).
    #[default]
    Rewrite,
    /// Leave them, but count and log what would have been rewritten.
    Detect,
    Off,
}

/// A route's host: `cdn.example.com`, or `*.example.com` (any name below it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// Stored as the suffix with its leading dot: `.example.com`.
    Wildcard(String),
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    /// Same client address, same upstream, while weights stay.
    ClientIp,
    /// Weighted random per request.
    None,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Host part of `address`: a DNS name, or an IP literal.
    pub host: String,
    pub port: u16,
    /// Set when `address` is an IP literal: no DNS involved.
    pub ip: Option<IpAddr>,
    pub tls: bool,
    /// Host header sent upstream; `None` keeps the client's.
    pub host_header: Option<HeaderValue>,
    /// TLS server name, also the name the certificate must be valid for.
    pub sni: String,
    pub verify: bool,
    pub ca_file: Option<PathBuf>,
    /// Certificates loaded from `ca_file`: they replace the system roots for this upstream.
    pub ca: Option<Arc<Box<[X509]>>>,
    pub weight: u32,
    pub backup: bool,
    pub expect_body: Option<String>,
    /// A field its responses carry, naming it: `x-origin-id: new`.
    pub expect_header: Option<(HeaderName, HeaderValue)>,
    pub address_family: AddressFamily,
    pub health_check: Option<HealthCheck>,
    pub timeouts: Timeouts,
}

/// Which of a name's addresses an upstream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AddressFamily {
    /// Both families, minus the addresses this host has no route to (checked
    /// at every DNS refresh, as `getaddrinfo`'s `AI_ADDRCONFIG` does per
    /// family but per address).
    #[default]
    Auto,
    Ipv4,
    Ipv6,
}

impl AddressFamily {
    /// Whether `ip` is of this family.
    pub fn admits(self, ip: IpAddr) -> bool {
        match self {
            AddressFamily::Auto => true,
            AddressFamily::Ipv4 => ip.is_ipv4(),
            AddressFamily::Ipv6 => ip.is_ipv6(),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            AddressFamily::Auto => "auto",
            AddressFamily::Ipv4 => "ipv4",
            AddressFamily::Ipv6 => "ipv6",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub expect_status: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            read: Duration::from_secs(30),
            write: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }
}

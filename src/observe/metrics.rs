//! Prometheus metrics. Label handles are resolved when a runtime model is built
//! (at start and on reload), so recording a request is a few atomic adds.

use std::sync::OnceLock;

use prometheus::core::Metric;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::policy::cdn::{CacheResult, EdgeAnswer};
use crate::policy::deleak::Field;
use crate::policy::failure::ErrorKind;
use crate::policy::handover::Handover;

/// Bounds of `cutover_request_duration_seconds` (a rollout's p99 gate
/// reads the same buckets).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The metric families, registered once per process.
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    unmatched: IntCounterVec,
    rejected: IntCounterVec,
    client_ip_ignored: IntCounterVec,
    healthy: IntGaugeVec,
    weight: IntGaugeVec,
    ejections: IntCounterVec,
    failovers: IntCounterVec,
    resends: IntCounterVec,
    response_bytes: IntCounterVec,
    addresses: IntGaugeVec,
    cache_results: IntCounterVec,
    edge_answers: IntCounterVec,
    rewrites: IntCounterVec,
    rewrites_unreadable: IntCounterVec,
    marker_mismatch: IntCounterVec,
    pub rollout: RolloutFamilies,
    dns_lookups: IntCounterVec,
    dns_dropped: IntCounterVec,
    hosts_file_bad_lines: IntCounter,
    reloads: IntCounterVec,
    upgrades: IntCounterVec,
    phase_info: IntGaugeVec,
    config_info: IntGaugeVec,
    /// The `config_source` families: series exist only in that mode.
    pub source: SourceFamilies,
    _build_info: IntGaugeVec,
    pub access_log_dropped: IntCounter,
    pub access_log_write_errors: IntCounter,
    /// Connections on PROXY protocol listeners, by
    /// [`crate::policy::proxy_protocol::RESULTS`].
    pub proxy_protocol: [IntCounter; 8],
    /// Client connections the fast path handed to Pingora's general path.
    /// By [`Handover`] reason.
    pub handed_over: [IntCounter; Handover::ALL.len()],
    client_connections: IntGaugeVec,
    client_connections_max: IntGaugeVec,
    client_connections_refused: IntCounterVec,
    /// Failed `accept()` calls (see [`crate::paths::client::accept_failed`]).
    pub accept_errors: AcceptErrors,
    /// Client TLS handshakes that did not complete.
    pub tls_handshake_failures: HandshakeFailures,
    process_open_fds: IntGauge,
    process_max_fds: IntGauge,
}

/// `cutover_accept_errors_total`, by reason.
pub struct AcceptErrors {
    /// EMFILE or ENFILE: out of file descriptors.
    pub fd_limit: IntCounter,
    pub other: IntCounter,
}

/// `cutover_client_tls_handshake_failures_total`, by reason.
pub struct HandshakeFailures {
    pub failed: IntCounter,
    pub timeout: IntCounter,
}

/// One listener's connection handles ([`crate::policy::timeouts::ConnectionLimit`]).
pub struct ListenerMetrics {
    pub open: IntGauge,
    pub max: IntGauge,
    pub refused: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn plain_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("static metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn plain_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "cutover_request_duration_seconds",
                "Time from request start to the last response byte, by upstream",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["phase", "route", "upstream"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(duration.clone()))
            .expect("metric registered once");
        let build_info = gauge(
            r,
            "cutover_build_info",
            "Always 1; the version label says which cutover is running",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // The standard process-collector metric: an alert can count from a
        // process's start (CutoverConfigSourceUnusable for an instance that
        // has not reached its source since it started). The registry is
        // made within milliseconds of exec.
        plain_gauge(
            r,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
        )
        .set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0)),
        );
        Self {
            proxy_protocol: {
                let by_result = counter(
                    r,
                    "cutover_proxy_protocol_connections_total",
                    "Connections on listeners with proxy_protocol, by what their start was: v1, \
                     v2, local (a v2 LOCAL header: the load balancer's own check), none (no \
                     header, allowed), or refused: missing (none from a trusted peer where one \
                     is required), untrusted (a header from a peer not in `trusted`), bad (the \
                     other version, or one that does not parse), timeout",
                    &["result"],
                );
                crate::policy::proxy_protocol::RESULTS.map(|l| by_result.with_label_values(&[l]))
            },
            handed_over: {
                let by_reason = counter(
                    r,
                    "cutover_connections_handed_over_total",
                    "Client connections passed from the fast path to the Pingora path, by the \
                     reason of the first request it did not serve",
                    &["reason"],
                );
                Handover::ALL.map(|h| by_reason.with_label_values(&[h.label()]))
            },
            requests: counter(
                r,
                "cutover_requests_total",
                "Requests answered, by upstream and status code",
                &["phase", "route", "upstream", "code"],
            ),
            duration,
            upstream_errors: counter(
                r,
                "cutover_upstream_errors_total",
                "Failed upstream attempts, by cause (connect, tls, timeout, reset, other)",
                &["phase", "route", "upstream", "kind"],
            ),
            unmatched: counter(
                r,
                "cutover_unmatched_requests_total",
                "Requests for a host no route has (answered 421)",
                &["phase"],
            ),
            rejected: counter(
                r,
                "cutover_rejected_requests_total",
                "Malformed requests answered 4xx before routing, by reason",
                &["phase", "reason"],
            ),
            client_ip_ignored: counter(
                r,
                "cutover_client_ip_header_ignored_total",
                "Client-address headers from trusted peers that did not parse (the peer address was used)",
                &["phase"],
            ),
            failovers: counter(
                r,
                "cutover_upstream_failovers_total",
                "Requests sent to another upstream than their own, by the upstream they left and why \
                 (connect: its connect failed; no_address: every address of it was ejected; \
                 reset: its connection failed before answering)",
                &["route", "upstream", "reason"],
            ),
            resends: counter(
                r,
                "cutover_upstream_resends_total",
                "Requests whose upstream connection failed before any response byte reached the client, \
                 by the upstream it failed on and what became of them (stale: a reused connection found \
                 closed, sent again on a fresh one; failed: sent again to another address or upstream; \
                 unsafe: not sent again, answered 502, because the method is not idempotent or the body \
                 was already streamed)",
                &["route", "upstream", "result"],
            ),
            ejections: counter(
                r,
                "cutover_upstream_address_ejections_total",
                "Upstream addresses taken out of the rotation after a failed connect or TLS handshake",
                &["route", "upstream"],
            ),
            cache_results: counter(
                r,
                "cutover_cdn_cache_results_total",
                "Responses by the CDN's X-Cache result (hit, miss, refresh_hit, error, redirect, \
                 generated, other); responses without X-Cache are not counted",
                &["route", "upstream", "result"],
            ),
            edge_answers: counter(
                r,
                "cutover_edge_answers_total",
                "Error answers the CDN edge made itself (X-Cache: Error from cloudfront with \
                 Server: CloudFront), by kind: refused (400, 403, 421: the edge does not serve \
                 this name or request) or error (any other status)",
                &["route", "upstream", "kind"],
            ),
            rewrites: counter(
                r,
                "cutover_response_rewrites_total",
                "Response fields that named an upstream's host (Location, Content-Location, \
                 Refresh, Set-Cookie Domain) and were rewritten to the client's Host, or with \
                 rewrite_response: detect would have been",
                &["route", "header"],
            ),
            rewrites_unreadable: counter(
                r,
                "cutover_response_rewrites_unreadable_total",
                "Response fields that named an upstream's host but could not be read as a URL \
                 or cookie domain: left unchanged",
                &["route", "header"],
            ),
            marker_mismatch: counter(
                r,
                "cutover_marker_mismatch_total",
                "Responses of an upstream with `expect_header` that lacked the field or named \
                 something else (another upstream's value, or an unknown one): someone else \
                 answered",
                &["route", "upstream"],
            ),
            rollout: RolloutFamilies::new(r),
            addresses: gauge(
                r,
                "cutover_upstream_addresses",
                "Addresses of the upstream's name in use, by state (active, ejected after failed \
                 connects or checks); sampled at each scrape",
                &["route", "upstream", "state"],
            ),
            dns_lookups: counter(
                r,
                "cutover_dns_lookups_total",
                "Refreshes of an upstream name, by result (changed, unchanged; empty and failed \
                 keep the last good addresses)",
                &["name", "result"],
            ),
            dns_dropped: counter(
                r,
                "cutover_dns_addresses_dropped_total",
                "Addresses in a DNS or hosts-file answer that cutover does not use, by reason \
                 (unusable: 0.0.0.0, ::, multicast, broadcast; over_cap: beyond the per-name cap; \
                 unroutable: this host has no route to it)",
                &["name", "reason"],
            ),
            hosts_file_bad_lines: plain_counter(
                r,
                "cutover_hosts_file_bad_lines_total",
                "Lines of the hosts file that are neither an `IP name...` entry nor a comment",
            ),
            healthy: gauge(
                r,
                "cutover_upstream_healthy",
                "1 when the upstream takes traffic, 0 when its health check fails",
                &["route", "upstream"],
            ),
            weight: gauge(
                r,
                "cutover_upstream_weight",
                "Configured weight of the upstream",
                &["route", "upstream"],
            ),
            response_bytes: counter(
                r,
                "cutover_response_bytes_total",
                "Response body bytes sent to clients, by upstream",
                &["phase", "route", "upstream"],
            ),
            reloads: counter(
                r,
                "cutover_config_reloads_total",
                "Config reloads (SIGHUP), by result",
                &["result"],
            ),
            upgrades: counter(
                r,
                "cutover_binary_upgrades_total",
                "In-place binary upgrades (SIGUSR2), by result (started, failure)",
                &["result"],
            ),
            phase_info: gauge(
                r,
                "cutover_phase_info",
                "Always 1 for the phase currently configured",
                &["phase"],
            ),
            config_info: gauge(
                r,
                "cutover_config_info",
                "Always 1 for the config document running: its SHA-256 (as sha256sum prints it) and phase; a fleet with one document has one sha256",
                &["sha256", "phase"],
            ),
            source: SourceFamilies::new(r),
            client_connections: gauge(
                r,
                "cutover_client_connections",
                "Client connections open, by listener",
                &["listener"],
            ),
            client_connections_max: gauge(
                r,
                "cutover_client_connections_max",
                "The listener's max_connections: past it a new connection is answered 503 and closed",
                &["listener"],
            ),
            client_connections_refused: counter(
                r,
                "cutover_client_connections_refused_total",
                "Client connections answered 503 and closed because the listener had max_connections open",
                &["listener"],
            ),
            accept_errors: {
                let by_reason = counter(
                    r,
                    "cutover_accept_errors_total",
                    "Failed accept() calls on the proxy listeners, by reason: fd_limit (EMFILE or \
                     ENFILE: out of file descriptors; new connections wait in the backlog and \
                     accepting resumes a second later), other",
                    &["reason"],
                );
                AcceptErrors {
                    fd_limit: by_reason.with_label_values(&["fd_limit"]),
                    other: by_reason.with_label_values(&["other"]),
                }
            },
            tls_handshake_failures: {
                let by_reason = counter(
                    r,
                    "cutover_client_tls_handshake_failures_total",
                    "Client connections on TLS listeners whose handshake did not complete, by \
                     reason: failed (bad or no ClientHello, no shared cipher, the client closed \
                     or reset), timeout",
                    &["reason"],
                );
                HandshakeFailures {
                    failed: by_reason.with_label_values(&["failed"]),
                    timeout: by_reason.with_label_values(&["timeout"]),
                }
            },
            process_open_fds: plain_gauge(
                r,
                "process_open_fds",
                "Open file descriptors (the standard process-collector metric, read at each scrape)",
            ),
            process_max_fds: plain_gauge(
                r,
                "process_max_fds",
                "The process's file-descriptor limit (soft RLIMIT_NOFILE)",
            ),
            _build_info: build_info,
            access_log_dropped: plain_counter(
                r,
                "cutover_access_log_dropped_total",
                "Access-log lines dropped because the writer fell behind",
            ),
            access_log_write_errors: plain_counter(
                r,
                "cutover_access_log_write_errors_total",
                "Access-log writes that failed (e.g. disk full)",
            ),
            registry,
        }
    }

    /// Read the process's descriptor count and limit into their gauges (at
    /// each scrape: a process near its limit refuses connections and
    /// fails connects, so `process_open_fds / process_max_fds` is what to
    /// alert on).
    pub fn sample_process(&self) {
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of them.
            let open = fds.count().saturating_sub(1);
            self.process_open_fds
                .set(i64::try_from(open).unwrap_or(i64::MAX));
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            self.process_max_fds
                .set(i64::try_from(lim.rlim_cur).unwrap_or(i64::MAX));
        }
    }

    /// Handles for one listener (`listener`: its configured address).
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        ListenerMetrics {
            open: self.client_connections.with_label_values(&[listener]),
            max: self.client_connections_max.with_label_values(&[listener]),
            refused: self
                .client_connections_refused
                .with_label_values(&[listener]),
        }
    }

    /// Handles for one upstream of one route in one phase.
    pub fn upstream(&self, phase: &str, route: &str, upstream: &str) -> UpstreamMetrics {
        let labels = [phase, route, upstream];
        let errors = ErrorKind::ALL.map(|k| {
            self.upstream_errors
                .with_label_values(&[phase, route, upstream, k.label()])
        });
        UpstreamMetrics {
            requests: self.requests.clone(),
            labels: [phase.to_string(), route.to_string(), upstream.to_string()],
            by_code: std::array::from_fn(|_| OnceLock::new()),
            duration: self.duration.with_label_values(&labels),
            response_bytes: self.response_bytes.with_label_values(&labels),
            errors,
            healthy: self.healthy.with_label_values(&[route, upstream]),
            ejections: self.ejections.with_label_values(&[route, upstream]),
            failovers: Failover::ALL.map(|f| {
                self.failovers
                    .with_label_values(&[route, upstream, f.label()])
            }),
            resends: ResendResult::ALL.map(|f| {
                self.resends
                    .with_label_values(&[route, upstream, f.label()])
            }),
            weight: self.weight.with_label_values(&[route, upstream]),
            cache_results: CacheResult::ALL.map(|c| {
                self.cache_results
                    .with_label_values(&[route, upstream, c.label()])
            }),
            edge_answers: EdgeAnswer::ALL.map(|k| {
                self.edge_answers
                    .with_label_values(&[route, upstream, k.label()])
            }),
            rewrites: Field::ALL.map(|f| self.rewrites.with_label_values(&[route, f.label()])),
            rewrites_unreadable: Field::ALL.map(|f| {
                self.rewrites_unreadable
                    .with_label_values(&[route, f.label()])
            }),
            marker_mismatch: self.marker_mismatch.with_label_values(&[route, upstream]),
            addresses_active: self
                .addresses
                .with_label_values(&[route, upstream, "active"]),
            addresses_ejected: self
                .addresses
                .with_label_values(&[route, upstream, "ejected"]),
        }
    }

    /// Handles for the resolver.
    pub fn dns(&self) -> DnsMetrics {
        DnsMetrics {
            lookups: self.dns_lookups.clone(),
            dropped: self.dns_dropped.clone(),
            hosts_file_bad_lines: self.hosts_file_bad_lines.clone(),
        }
    }

    pub fn phase(&self, phase: &str) -> PhaseMetrics {
        PhaseMetrics {
            unmatched: self.unmatched.with_label_values(&[phase]),
            rejected: crate::policy::refusal::Refusal::ALL
                .map(|r| self.rejected.with_label_values(&[phase, r.reason()])),
            client_ip_ignored: self.client_ip_ignored.with_label_values(&[phase]),
        }
    }

    /// Make `phase` the only phase with `cutover_phase_info` = 1.
    pub fn set_phase(&self, phase: &str) {
        self.phase_info.reset();
        self.phase_info.with_label_values(&[phase]).set(1);
    }

    /// The document running now (one series: the old one goes).
    pub fn set_config(&self, sha256: &str, phase: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[sha256, phase]).set(1);
    }

    /// Forget the per-upstream gauges of a model being replaced, so a removed
    /// upstream does not linger as "healthy" forever.
    pub fn clear_upstream_gauges(&self) {
        self.healthy.reset();
        self.weight.reset();
        self.addresses.reset();
    }

    pub fn reload_result(&self, success: bool) {
        self.reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    pub fn upgrade_result(&self, started: bool) {
        self.upgrades
            .with_label_values(&[if started { "started" } else { "failure" }])
            .inc();
    }

    /// Make both reload results visible as 0 from the start, so alerts on
    /// `increase(...{result="failure"})` have a series to work with.
    pub fn init_reload_counters(&self) {
        for r in ["success", "failure"] {
            self.reloads.with_label_values(&[r]);
        }
        for r in ["started", "failure"] {
            self.upgrades.with_label_values(&[r]);
        }
    }
}

/// Status codes 100..=599, each a lazily created counter handle.
const CODES: usize = 500;

pub struct UpstreamMetrics {
    requests: IntCounterVec,
    labels: [String; 3],
    by_code: [OnceLock<IntCounter>; CODES],
    pub duration: Histogram,
    pub response_bytes: IntCounter,
    errors: [IntCounter; ErrorKind::ALL.len()],
    pub healthy: IntGauge,
    pub weight: IntGauge,
    pub ejections: IntCounter,
    /// By [`Failover`] reason: requests that left this upstream for another.
    pub failovers: [IntCounter; Failover::ALL.len()],
    /// By [`ResendResult`]: requests whose connection to this upstream failed
    /// before answering.
    pub resends: [IntCounter; ResendResult::ALL.len()],
    pub addresses_active: IntGauge,
    pub addresses_ejected: IntGauge,
    /// By [`CacheResult`].
    pub cache_results: [IntCounter; CacheResult::ALL.len()],
    /// By [`EdgeAnswer`].
    pub edge_answers: [IntCounter; EdgeAnswer::ALL.len()],
    /// By [`Field`], labelled by route only.
    pub rewrites: [IntCounter; Field::ALL.len()],
    pub rewrites_unreadable: [IntCounter; Field::ALL.len()],
    pub marker_mismatch: IntCounter,
}

/// The resolver's counters (labelled by name: names come from the config).
#[derive(Clone)]
pub struct DnsMetrics {
    pub lookups: IntCounterVec,
    pub dropped: IntCounterVec,
    pub hosts_file_bad_lines: IntCounter,
}

impl DnsMetrics {
    /// Counters registered nowhere, for a resolver outside a server
    /// (`cutover verify`, unit tests).
    pub fn unregistered() -> Self {
        Metrics::new().dns()
    }
}

/// Why a request left its upstream for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    /// A connect or TLS handshake failed on its last usable address (or the
    /// name never resolved).
    Connect = 0,
    /// Every address of it was ejected: not tried at all.
    NoAddress = 1,
    /// Its connection failed after the request went out, before any
    /// response byte, on its last usable address.
    Reset = 2,
}

impl Failover {
    pub const ALL: [Failover; 3] = [Failover::Connect, Failover::NoAddress, Failover::Reset];

    pub fn label(self) -> &'static str {
        match self {
            Failover::Connect => "connect",
            Failover::NoAddress => "no_address",
            Failover::Reset => "reset",
        }
    }
}

/// What became of a request whose upstream connection failed before any
/// response byte reached the client ([`crate::paths::request::exchange_failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResendResult {
    /// A reused connection was found closed: sent again on a fresh one.
    Stale = 0,
    /// Sent again to another address or upstream.
    Failed = 1,
    /// Not sent again (not idempotent, or its body already streamed): 502.
    Unsafe = 2,
}

impl ResendResult {
    pub const ALL: [ResendResult; 3] = [
        ResendResult::Stale,
        ResendResult::Failed,
        ResendResult::Unsafe,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ResendResult::Stale => "stale",
            ResendResult::Failed => "failed",
            ResendResult::Unsafe => "unsafe",
        }
    }
}

impl UpstreamMetrics {
    /// Count one response; the handle for a code is looked up in the family once,
    /// then reused lock-free.
    pub fn count_response(&self, code: u16) {
        let idx = usize::from(code.clamp(100, 599) - 100);
        self.by_code[idx]
            .get_or_init(|| {
                let mut buf = itoa::Buffer::new();
                let [p, r, u] = &self.labels;
                self.requests
                    .with_label_values(&[p.as_str(), r, u, buf.format(code)])
            })
            .inc();
    }

    /// One finished request: its status, duration and response body bytes.
    pub fn record(&self, status: u16, elapsed: std::time::Duration, bytes: u64) {
        self.count_response(status);
        self.duration.observe(elapsed.as_secs_f64());
        self.response_bytes.inc_by(bytes);
    }

    pub fn count_error(&self, kind: ErrorKind) {
        self.errors[kind as usize].inc();
    }

    /// What a rollout's gates read, now: one sample of the counters.
    pub fn rollout_counts(&self) -> crate::shift::rollout::Counts {
        let h = self.duration.metric();
        let buckets = h
            .get_histogram()
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect();
        crate::shift::rollout::Counts {
            requests: self.duration.get_sample_count(),
            errors_5xx: self.by_code[400..500]
                .iter()
                .filter_map(OnceLock::get)
                .map(IntCounter::get)
                .sum(),
            edge_refused: self.edge_answers[EdgeAnswer::Refused as usize].get(),
            marker_mismatch: self.marker_mismatch.get(),
            connect_errors: self.errors[ErrorKind::Connect as usize].get()
                + self.errors[ErrorKind::Tls as usize].get(),
            buckets,
        }
    }
}

/// A rollout's metric families ([`crate::shift::rollout`]).
pub struct RolloutFamilies {
    pub step: IntGaugeVec,
    pub percent: prometheus::GaugeVec,
    pub state: IntGaugeVec,
    pub decisions: IntCounterVec,
    pub gate_value: prometheus::GaugeVec,
    pub gate_limit: prometheus::GaugeVec,
}

impl RolloutFamilies {
    /// Forget the gauges of a model being replaced (a removed rollout must
    /// not stay "holding" forever); the next model publishes its own.
    pub fn clear(&self) {
        self.step.reset();
        self.percent.reset();
        self.state.reset();
        self.gate_value.reset();
        self.gate_limit.reset();
    }

    fn new(r: &Registry) -> Self {
        let fgauge = |name: &str, help: &str, labels: &[&str]| {
            let g = prometheus::GaugeVec::new(Opts::new(name, help), labels)
                .expect("static metric definition");
            r.register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        Self {
            step: gauge(
                r,
                "cutover_rollout_step",
                "The rollout step in effect, counted from 1 (0: before the first step, or \
                 rolled back or aborted to 0%)",
                &["route"],
            ),
            percent: fgauge(
                "cutover_rollout_percent",
                "Percent of the route's traffic the rollout sends to its `to` upstream now",
                &["route"],
            ),
            state: gauge(
                r,
                "cutover_rollout_state",
                "1 for the rollout's state (waiting, stepping, holding, rolled_back, paused, \
                 aborted, done), 0 for the others",
                &["route", "state"],
            ),
            decisions: counter(
                r,
                "cutover_rollout_decisions_total",
                "Rollout decisions: evaluations (pass, fail, no_data) and what followed (join, \
                 advance, hold, rollback, pause, resume, abort, done)",
                &["route", "decision"],
            ),
            gate_value: fgauge(
                "cutover_rollout_gate_value",
                "Each gate's value at the last evaluation (NaN: no data)",
                &["route", "gate"],
            ),
            gate_limit: fgauge(
                "cutover_rollout_gate_limit",
                "Each gate's threshold",
                &["route", "gate"],
            ),
        }
    }
}

pub struct PhaseMetrics {
    pub unmatched: IntCounter,
    /// By [`crate::policy::refusal::Refusal`], in its order.
    pub rejected: [IntCounter; crate::policy::refusal::Refusal::ALL.len()],
    pub client_ip_ignored: IntCounter,
}

/// What one fetch of the config source came to
/// (`cutover_config_fetches_total{result}`).
pub const FETCH_RESULTS: [&str; 9] = [
    // A new document, checked and running.
    "applied",
    // 304 to our If-None-Match / If-Modified-Since.
    "not_modified",
    // 200 with the document already running.
    "unchanged",
    // Not a config: YAML or validation problems (each fetch of a refused document), HTML,
    // not UTF-8.
    "invalid",
    // An HTTP status other than 200, 304 or a redirect.
    "status",
    // More than the allowed redirects, or one from https to http.
    "redirects",
    "too_large",
    "timeout",
    // DNS, connect, TLS, a broken connection, an unreadable header_file.
    "error",
];

/// `cutover_config_fetches_total`, `cutover_config_last_success_timestamp_seconds`,
/// `cutover_config_from_cache`, `cutover_config_cache_write_errors_total`,
/// `cutover_config_cache_damaged_total`.
pub struct SourceFamilies {
    fetches: IntCounterVec,
    last_success: prometheus::GaugeVec,
    from_cache: IntGaugeVec,
    cache_write_errors: IntCounterVec,
    cache_damaged: IntCounterVec,
}

impl SourceFamilies {
    fn new(r: &Registry) -> Self {
        let last_success = prometheus::GaugeVec::new(
            Opts::new(
                "cutover_config_last_success_timestamp_seconds",
                "When the config source last brought or confirmed the running document (Unix time; 0: not since the process started); only with config_source",
            ),
            &[],
        )
        .expect("static metric definition");
        r.register(Box::new(last_success.clone()))
            .expect("metric registered once");
        Self {
            fetches: counter(
                r,
                "cutover_config_fetches_total",
                "Fetches of the config source, by result",
                &["result"],
            ),
            last_success,
            from_cache: gauge(
                r,
                "cutover_config_from_cache",
                "1 while the running document was read from the local cache and the source has not confirmed it",
                &[],
            ),
            cache_write_errors: counter(
                r,
                "cutover_config_cache_write_errors_total",
                "Writes of the last good document to the local cache that failed",
                &[],
            ),
            cache_damaged: counter(
                r,
                "cutover_config_cache_damaged_total",
                "Times the local cache was found missing, unreadable, damaged or holding another \
                 document after the source confirmed the running one (it is then written again)",
                &[],
            ),
        }
    }

    /// Make every series visible (at 0) once the process runs from a source.
    pub fn init(&self) {
        for r in FETCH_RESULTS {
            self.fetches.with_label_values(&[r]);
        }
        self.cache_write_errors.with_label_values(&[] as &[&str]);
        self.cache_damaged.with_label_values(&[] as &[&str]);
        self.from_cache.with_label_values(&[] as &[&str]);
        // 0 until the first success: an instance that started from its
        // cache and never reached the source is as stale as can be.
        self.last_success.with_label_values(&[] as &[&str]).set(0.0);
    }

    pub fn fetched(&self, result: &str) {
        debug_assert!(FETCH_RESULTS.contains(&result));
        self.fetches.with_label_values(&[result]).inc();
    }

    pub fn succeeded(&self, at: std::time::SystemTime) {
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_success
            .with_label_values(&[] as &[&str])
            .set(secs);
    }

    pub fn set_from_cache(&self, yes: bool) {
        self.from_cache
            .with_label_values(&[] as &[&str])
            .set(i64::from(yes));
    }

    pub fn cache_damaged(&self) {
        self.cache_damaged.with_label_values(&[] as &[&str]).inc();
    }

    pub fn cache_write_failed(&self) {
        self.cache_write_errors
            .with_label_values(&[] as &[&str])
            .inc();
    }
}

//! The model the request path runs on: a validated [`Config`] joined with the
//! live handles it needs (DNS entries, metric handles, health flags). Built at
//! start and on every reload, then swapped in whole; a request keeps the
//! `Arc<Model>` it started with, so a reload never changes a request midway.

pub mod checks;
pub mod dns;
pub mod peer;
pub mod prometheus;
pub mod rollout;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::config::{ClientIp, Config, HeaderEdits, Sticky, UpstreamConfig};
use crate::model::dns::{ResolvedName, Resolver};
use crate::model::peer::PeerTemplate;
use crate::observe::access_log::AccessLog;
use crate::observe::metrics::{Metrics, PhaseMetrics, UpstreamMetrics};
use crate::policy::deleak::Names;
use crate::policy::forward::Plan;
use crate::policy::routing::HostTable;
use crate::shift::health::Health;

pub struct Model {
    pub config: Arc<Config>,
    pub phase: PhaseMetrics,
    pub hosts: HostTable,
    pub routes: Vec<Route>,
    pub client_ip: ClientIp,
}

pub struct Route {
    pub name: String,
    pub sticky: Sticky,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub rewrite_response: crate::config::RewriteMode,
    pub upstreams: Vec<Upstream>,
    /// The route's rollout, when it has one: its schedule and live state.
    pub rollout: Option<rollout::RouteRollout>,
    /// Its upstreams' counters over the last minutes ([`rollout`]).
    pub history: rollout::SharedHistory,
}

pub struct Upstream {
    pub name: String,
    pub weight: u32,
    pub backup: bool,
    /// Host header to send, `None` = the client's.
    pub host_header: Option<HeaderValue>,
    pub addresses: Arc<ResolvedName>,
    pub peer: PeerTemplate,
    /// What is sent to it and what comes back from it, field by field.
    pub plan: Plan,
    pub health: Arc<Health>,
    pub metrics: UpstreamMetrics,
    pub config: UpstreamConfig,
    /// Set for a rollout's `from` (`false`) and `to` (`true`): the weight
    /// is the rollout's share, read at each choice.
    pub rollout: Option<(Arc<rollout::RolloutRuntime>, bool)>,
}

impl Upstream {
    /// The weight a choice uses now: the configured one, or the rollout's.
    pub fn live_weight(&self) -> u32 {
        match &self.rollout {
            None => self.weight,
            Some((rt, is_to)) => {
                rollout::weight_of(rt.share.load(std::sync::atomic::Ordering::Relaxed), *is_to)
            }
        }
    }
}

/// The hosts a route's responses must not send the client to: every name
/// cutover sends its upstreams (`host_header`, `sni`, the address's host)
/// and the route's `rewrite_names`.
fn rewrite_names(r: &crate::config::RouteConfig) -> Names {
    let mut names: Vec<String> = Vec::new();
    for u in &r.upstreams {
        if let Some(h) = u.host_header.as_ref() {
            if let Ok(h) = crate::policy::routing::normalize_authority(h.as_bytes()) {
                names.push(h.as_str().to_string());
            }
        }
        names.push(u.sni.clone());
        names.push(u.host.clone());
    }
    names.extend(r.rewrite_names.iter().cloned());
    Names::new(names.iter().map(String::as_str))
}

/// What makes two upstreams "the same" across a reload, for keeping health state.
fn identity(route: &str, u: &UpstreamConfig) -> String {
    format!(
        "{route}\0{}\0{}:{}\0{:?}\0{}\0{}\0{:?}\0{:?}",
        u.name, u.host, u.port, u.address_family, u.tls, u.sni, u.host_header, u.health_check
    )
}

/// Everything that outlives one runtime model: the process-wide handles a
/// reload reuses.
pub struct Process {
    pub current: ArcSwap<Model>,
    pub metrics: Arc<Metrics>,
    pub resolver: Arc<Resolver>,
    /// `None` when `access_log: off`.
    pub access_log: Option<AccessLog>,
    /// Set just before this process stops accepting (SIGTERM, SIGQUIT,
    /// SIGUSR2): responses then carry `Connection: close`, so keep-alive
    /// clients move to a fresh connection instead of having an idle one
    /// closed under them when Pingora drains.
    pub draining: std::sync::atomic::AtomicBool,
    /// Each listener's client timeouts, from the config the process started
    /// with (listeners change only with `run --upgrade`).
    pub listeners: crate::policy::timeouts::ListenerTable,
    health: std::sync::Mutex<HashMap<String, std::sync::Weak<Health>>>,
    rollouts: std::sync::Mutex<HashMap<String, std::sync::Weak<rollout::RolloutRuntime>>>,
}

impl Process {
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        resolver: Arc<Resolver>,
        access_log: Option<AccessLog>,
    ) -> Arc<Self> {
        let health = std::sync::Mutex::new(HashMap::new());
        let rollouts = std::sync::Mutex::new(HashMap::new());
        let first = build(&config, &metrics, &resolver, &health, &rollouts);
        metrics.init_reload_counters();
        Arc::new(Self {
            listeners: crate::policy::timeouts::ListenerTable::new(&config.listeners, &metrics),
            current: ArcSwap::from_pointee(first),
            metrics,
            resolver,
            access_log,
            draining: std::sync::atomic::AtomicBool::new(false),
            health,
            rollouts,
        })
    }

    /// Whether a response now is the connection's last (`Connection:
    /// close`): while draining, and once the server is shutting down
    /// (`shutting_down`, as the carrier learns it).
    pub fn closing(&self, shutting_down: bool) -> bool {
        shutting_down || self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn model(&self) -> Arc<Model> {
        self.current.load_full()
    }

    /// Build a model for `config` beside the running one and swap it in.
    /// Names new to this config are resolved before the swap, so the first
    /// requests to a new upstream have somewhere to go.
    pub async fn install(&self, config: Config) {
        let next = build(
            &config,
            &self.metrics,
            &self.resolver,
            &self.health,
            &self.rollouts,
        );
        self.resolver.refresh(true).await;
        self.current.store(Arc::new(next));
    }
}

fn build(
    config: &Config,
    metrics: &Metrics,
    resolver: &Resolver,
    health: &std::sync::Mutex<HashMap<String, std::sync::Weak<Health>>>,
    rollouts: &std::sync::Mutex<HashMap<String, std::sync::Weak<rollout::RolloutRuntime>>>,
) -> Model {
    let now = std::time::SystemTime::now();
    let mut rollouts = rollouts.lock().unwrap_or_else(|e| e.into_inner());
    rollouts.retain(|_, r| r.strong_count() > 0);
    metrics.rollout.clear();
    let config = Arc::new(config.clone());
    let phase = config.phase.as_str();
    metrics.set_phase(phase);
    metrics.set_config(&config.sha256, phase);
    metrics.clear_upstream_gauges();
    let mut health = health.lock().unwrap_or_else(|e| e.into_inner());
    health.retain(|_, h| h.strong_count() > 0);

    let routes = config
        .routes
        .iter()
        .map(|r| (r, Arc::new(rewrite_names(r))))
        .map(|(r, names)| {
            let ro = r.rollout.as_ref().map(|ro| {
                let key = rollout::identity(r, ro);
                let runtime = match rollouts.get(&key).and_then(std::sync::Weak::upgrade) {
                    Some(rt) => rt,
                    None => {
                        let rt = rollout::RolloutRuntime::new(&r.name, ro, &metrics.rollout, now);
                        rollouts.insert(key, Arc::downgrade(&rt));
                        rt
                    }
                };
                runtime.publish(&metrics.rollout, &r.name, ro);
                rollout::RouteRollout {
                    config: ro.clone(),
                    runtime,
                }
            });
            let expectations: Vec<_> = r
                .upstreams
                .iter()
                .map(|u| u.expect_header.clone())
                .collect();
            Route {
                name: r.name.clone(),
                sticky: r.sticky,
                request_headers: r.request_headers.clone(),
                response_headers: r.response_headers.clone(),
                rewrite_response: r.rewrite_response,
                upstreams: r
                    .upstreams
                    .iter()
                    .enumerate()
                    .map(|(k, u)| {
                        let addresses = match u.ip {
                            Some(ip) => ResolvedName::fixed(ip, u.port),
                            None => resolver.entry(&u.host, u.port, u.address_family),
                        };
                        let key = identity(&r.name, u);
                        let h = match health.get(&key).and_then(std::sync::Weak::upgrade) {
                            Some(h) => h,
                            None => {
                                let h = Arc::new(Health::default());
                                health.insert(key, Arc::downgrade(&h));
                                h
                            }
                        };
                        let m = metrics.upstream(phase, &r.name, &u.name);
                        let moving = ro.as_ref().and_then(|ro| {
                            (k == ro.config.from || k == ro.config.to)
                                .then(|| (ro.runtime.clone(), k == ro.config.to))
                        });
                        m.healthy.set(i64::from(h.is_healthy()));
                        let up = Upstream {
                            name: u.name.clone(),
                            weight: u.weight,
                            backup: u.backup,
                            host_header: u.host_header.clone(),
                            addresses,
                            peer: PeerTemplate::new(u),
                            plan: Plan::new(
                                u.host_header.clone(),
                                &r.request_headers,
                                &r.response_headers,
                                config.client_ip.forward,
                                r.rewrite_response,
                                names.clone(),
                            )
                            .with_marker(
                                crate::policy::marker::Marker::for_upstream(&expectations, k),
                            ),
                            health: h,
                            metrics: m,
                            config: u.clone(),
                            rollout: moving,
                        };
                        up.metrics.weight.set(i64::from(up.live_weight()));
                        up
                    })
                    .collect(),
                rollout: ro,
                history: Default::default(),
            }
        })
        .collect();

    Model {
        phase: metrics.phase(phase),
        hosts: HostTable::new(
            config
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| (i, r.hosts.as_slice())),
        ),
        routes,
        client_ip: config.client_ip.clone(),
        config,
    }
}

impl Model {
    /// Why the proxy is not ready, if it is not: a route none of whose
    /// upstreams has a live address (resolved, not ejected) and passes its
    /// checks.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        self.routes
            .iter()
            .filter(|r| {
                !r.upstreams.iter().any(|u| {
                    u.addresses.has_addresses() && u.addresses.usable() && u.health.is_healthy()
                })
            })
            .map(|r| format!("route {}: no healthy upstream with a live address", r.name))
            .collect()
    }

    /// The upstreams with no live address, one line each: shown by
    /// `/readyz` whether or not the proxy is ready (a backup may serve
    /// while the new distribution has none).
    pub fn dead_upstreams(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for r in &self.routes {
            for u in &r.upstreams {
                let (active, ejected) = u.addresses.states();
                if active == 0 {
                    lines.push(if ejected == 0 {
                        format!(
                            "route {} upstream {}: no live address ({}:{} has not resolved)",
                            r.name, u.name, u.addresses.host, u.addresses.port
                        )
                    } else {
                        format!(
                            "route {} upstream {}: no live address (all {ejected} of {} ejected)",
                            r.name, u.name, u.addresses.host
                        )
                    });
                }
            }
        }
        lines
    }

    /// Set `cutover_upstream_addresses` from the addresses' state now (at a
    /// scrape: the state changes with time, not only with events).
    pub fn sample_address_gauges(&self) {
        for u in self.routes.iter().flat_map(|r| &r.upstreams) {
            let (active, ejected) = u.addresses.states();
            u.metrics.addresses_active.set(active as i64);
            u.metrics.addresses_ejected.set(ejected as i64);
        }
    }
}

impl crate::shift::selection::Candidate for Upstream {
    fn weight(&self) -> u32 {
        self.live_weight()
    }
    fn is_backup(&self) -> bool {
        self.backup
    }
    /// Its checks pass and not every one of its addresses is ejected after
    /// failed connects.
    fn is_healthy(&self) -> bool {
        self.health.is_healthy() && self.addresses.usable()
    }
}

/// A model for unit tests: one route for `cdn.example.test` with request
/// and response edits and a trusted `X-Forwarded-For`, one upstream at a
/// fixed address (no DNS) whose Host is `cdn-new.example.test`.
#[cfg(test)]
pub(crate) fn test_model() -> Arc<Model> {
    const CONFIG: &str = "
phase: test
listeners:
  - address: 127.0.0.1:8080
client_ip: { header: X-Forwarded-For, trusted: [127.0.0.1] }
routes:
  - name: cdn
    hosts: [cdn.example.test]
    request_headers: { set: { X-Migration: test }, remove: [Cookie] }
    response_headers: { set: { X-Served-Via: cutover }, remove: [Server] }
    upstreams:
      - name: new
        address: 127.0.0.1:443
        host_header: cdn-new.example.test
";
    let config = crate::config::parse(std::path::Path::new("test.yaml"), CONFIG).unwrap();
    Process::new(
        config,
        Arc::new(Metrics::new()),
        Arc::new(Resolver::new(None)),
        None,
    )
    .model()
}

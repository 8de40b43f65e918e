//! Active health checks: each upstream with a `health_check` is asked for its
//! check path the way the proxy would ask it (same address, SNI, Host, CA), and
//! the answer must have the expected status and, when `expect_body` is set,
//! contain that marker. The marker is how a check notices that the *wrong
//! distribution* answers, which a status code alone cannot show.
//!
//! Every address of the upstream's name is checked: one that fails is
//! ejected as a failed connect would eject it (and counted the same way),
//! one that passes is readmitted. The upstream is healthy while one of its
//! addresses passes. The results go to each upstream's
//! [`crate::shift::health::Health`]; the request path reads one atomic flag
//! there, and the ejections per address.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::model::{Process, Upstream};
use crate::shift::probe::{self, Target, TlsTarget};

/// How often the scheduler looks for due checks.
const TICK: Duration = Duration::from_millis(100);

/// Check every address of `upstream`; `Err` says why none passed.
async fn check(model: Arc<crate::model::Model>, r: usize, u: usize) -> Result<(), String> {
    let up = &model.routes[r].upstreams[u];
    let addrs = up.addresses.addresses();
    if addrs.is_empty() {
        return Err(format!(
            "{}:{} has no address",
            up.config.host, up.config.port
        ));
    }
    let mut probes = tokio::task::JoinSet::new();
    for addr in addrs.iter().copied() {
        let model = model.clone();
        probes.spawn(async move {
            let up = &model.routes[r].upstreams[u];
            (addr, check_address(up, addr).await)
        });
    }
    let mut failures = Vec::new();
    let mut passed = false;
    while let Some(done) = probes.join_next().await {
        let Ok((addr, result)) = done else { continue };
        match result {
            Ok(()) => {
                up.addresses.ejections.readmit(addr);
                passed = true;
            }
            Err(why) => {
                if up.addresses.ejections.eject(addr, Instant::now()).new {
                    up.metrics.ejections.inc();
                }
                failures.push(why);
            }
        }
    }
    if passed {
        if !failures.is_empty() {
            crate::limited!(
                warn,
                "health: route={} upstream={}: {} of {} addresses fail their check, ejected: {}",
                model.routes[r].name,
                up.name,
                failures.len(),
                addrs.len(),
                failures.join("; ")
            );
        }
        Ok(())
    } else {
        failures.sort();
        Err(failures.join("; "))
    }
}

/// Ask one address of `upstream` for its check path.
async fn check_address(upstream: &Upstream, addr: std::net::SocketAddr) -> Result<(), String> {
    let cfg = &upstream.config;
    let Some(hc) = &cfg.health_check else {
        return Ok(());
    };
    let host = cfg
        .host_header
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .map(String::from)
        .unwrap_or_else(|| {
            if cfg.sni.is_empty() {
                cfg.host.clone()
            } else {
                cfg.sni.clone()
            }
        });
    let target = Target {
        connect: addr,
        tls: cfg.tls.then(|| TlsTarget {
            sni: cfg.sni.clone(),
            ca_files: cfg.ca_file.iter().cloned().collect(),
            // Same trust as the proxy: `ca_file` replaces the system roots.
            system_roots: cfg.ca_file.is_none(),
            verify: cfg.verify,
        }),
        host,
        path: hc.path.clone(),
    };
    let reply = probe::get(&target, hc.timeout)
        .await
        .map_err(|e| format!("{addr}: {e:#}"))?;
    if reply.status.as_u16() != hc.expect_status {
        return Err(format!(
            "status {} (expected {}) from {addr}",
            reply.status.as_u16(),
            hc.expect_status
        ));
    }
    if let Some(marker) = &cfg.expect_body {
        let body = String::from_utf8_lossy(&reply.body);
        if !body.contains(marker.as_str()) {
            let first = body
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(80)
                .collect::<String>();
            return Err(format!(
                "body from {addr} lacks the marker {marker:?} (starts {first:?}): another distribution may be answering"
            ));
        }
    }
    Ok(())
}

/// The background service running every due check of the current model.
pub struct HealthChecker {
    pub process: Arc<Process>,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => self.run_due_checks(),
            }
        }
    }
}

impl HealthChecker {
    fn run_due_checks(&self) {
        let model = self.process.model();
        let now = Instant::now();
        for (r, route) in model.routes.iter().enumerate() {
            for (u, up) in route.upstreams.iter().enumerate() {
                let Some(hc) = &up.config.health_check else {
                    continue;
                };
                if !up.health.claim(now, hc.interval) {
                    continue;
                }
                let model = model.clone();
                tokio::spawn(async move {
                    let result = check(model.clone(), r, u).await;
                    let route = &model.routes[r];
                    let up = &route.upstreams[u];
                    let Some(healthy) = up.health.record(result.is_ok()) else {
                        return;
                    };
                    up.metrics.healthy.set(i64::from(healthy));
                    match result {
                        Ok(()) => info!("health: route={} upstream={} is healthy again", route.name, up.name),
                        Err(why) => warn!(
                            "health: route={} upstream={} is unhealthy, out of the selection: {why}",
                            route.name, up.name
                        ),
                    }
                    if !route.upstreams.iter().any(|u| u.health.is_healthy()) {
                        warn!(
                            "health: route={}: every upstream is unhealthy; failing open (requests still go to them by weight)",
                            route.name
                        );
                    }
                });
            }
        }
    }
}

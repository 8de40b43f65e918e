//! Active health checks: each upstream with a `health_check` is asked for its
//! check path the way the proxy would ask it (same address, SNI, Host, CA), and
//! the answer must have the expected status and, when `expect_body` is set,
//! contain that marker. The marker is how a check notices that the *wrong
//! distribution* answers, which a status code alone cannot show.
//!
//! Two failures in a row take an upstream out of the selection, two successes
//! bring it back (HAProxy's `fall`/`rise`, at 2/2). The request path reads one
//! atomic flag; everything else here runs on the health service.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::model::{Shared, Upstream};
use crate::shift::probe::{self, Target, TlsTarget};

/// Consecutive results needed to change state.
const FALL: u32 = 2;
const RISE: u32 = 2;
/// How often the scheduler looks for due checks.
const TICK: Duration = Duration::from_millis(100);

/// Health of one upstream; shared across reloads while the upstream keeps its
/// identity (route, name, address, TLS settings, check settings).
#[derive(Debug)]
pub struct Health {
    healthy: AtomicBool,
    schedule: Mutex<Schedule>,
}

#[derive(Debug, Default)]
struct Schedule {
    next_due: Option<Instant>,
    /// Consecutive results that disagree with the current state.
    streak: u32,
}

impl Default for Health {
    /// Upstreams start healthy, so a start or reload never waits for checks.
    fn default() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            schedule: Mutex::default(),
        }
    }
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Claim the next check if it is due; schedules the one after.
    fn claim(&self, now: Instant, interval: Duration) -> bool {
        let mut s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        if s.next_due.is_some_and(|due| now < due) {
            return false;
        }
        s.next_due = Some(now + interval);
        true
    }

    /// Record one check result; returns the new state when it changed.
    fn record(&self, ok: bool) -> Option<bool> {
        let mut s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        let healthy = self.is_healthy();
        if ok == healthy {
            s.streak = 0;
            return None;
        }
        s.streak += 1;
        let needed = if healthy { FALL } else { RISE };
        if s.streak < needed {
            return None;
        }
        s.streak = 0;
        self.healthy.store(ok, Ordering::Relaxed);
        Some(ok)
    }
}

/// Ask `upstream` for its check path; `Err` says why it is unhealthy.
async fn check(upstream: &Upstream) -> Result<(), String> {
    let cfg = &upstream.config;
    let Some(hc) = &cfg.health_check else {
        return Ok(());
    };
    let addr = upstream
        .addresses
        .pick()
        .ok_or_else(|| format!("{}:{} has no address", cfg.host, cfg.port))?;
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
        .map_err(|e| format!("{e:#}"))?;
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
    pub shared: Arc<Shared>,
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
        let rt = self.shared.runtime();
        let now = Instant::now();
        for (r, route) in rt.routes.iter().enumerate() {
            for (u, up) in route.upstreams.iter().enumerate() {
                let Some(hc) = &up.config.health_check else {
                    continue;
                };
                if !up.health.claim(now, hc.interval) {
                    continue;
                }
                let rt = rt.clone();
                tokio::spawn(async move {
                    let route = &rt.routes[r];
                    let up = &route.upstreams[u];
                    let result = check(up).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_failures_to_fall_two_successes_to_rise() {
        let h = Health::default();
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a success resets the streak");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert!(!h.is_healthy());
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert!(h.is_healthy());
    }

    #[test]
    fn checks_are_claimed_once_per_interval() {
        let h = Health::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(5);
        assert!(h.claim(t0, every));
        assert!(!h.claim(t0 + Duration::from_secs(1), every));
        assert!(h.claim(t0 + every, every));
    }
}

//! The rollout controller: a background service that, for every route,
//! samples its upstreams' counters once a second (the sliding window the
//! gates and `/status` read), moves each rollout along its schedule,
//! evaluates its gates at the schedule's instants (asking Prometheus for
//! the fleet-wide ones), and publishes the share of the `to` upstream the
//! request path reads: one atomic per rollout.
//!
//! What decides is [`crate::shift::rollout`]; this module only feeds it the
//! clock and the numbers, and records, counts and logs what it decided. A
//! rollout's state survives a reload that keeps its schedule (same
//! `from`, `to`, steps, holds and `start`); a new schedule starts over.
//! The window is the model's: a reload starts a new one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use log::{info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::{FleetGates, Rollout, ALL_BASIS_POINTS};
use crate::model::{Process, Route};
use crate::observe::metrics::{RolloutFamilies, DURATION_BUCKETS};
use crate::shift::rollout::{self, Counts, Decision, Progress, Reading, State, Verdict};

/// How often the controller looks at the clock.
const TICK: Duration = Duration::from_millis(200);
/// How often the window is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Decisions kept for `/status`.
const KEPT_DECISIONS: usize = 20;
/// The window `/status` shows shares over when a route has no gates.
pub const STATUS_WINDOW: Duration = Duration::from_secs(60);

/// One route's counters over time, per upstream in route order.
#[derive(Default)]
pub struct History {
    samples: VecDeque<(SystemTime, Vec<Counts>)>,
}

impl History {
    /// Sample the counters, unless the last sample is recent (`force`:
    /// sample anyway, as an evaluation does: its window ends now).
    fn sample(&mut self, route: &Route, now: SystemTime, keep: Duration, force: bool) {
        if !force
            && self
                .samples
                .back()
                .is_some_and(|(t, _)| now.duration_since(*t).unwrap_or_default() < SAMPLE_EVERY)
        {
            return;
        }
        let counts = route
            .upstreams
            .iter()
            .map(|u| u.metrics.rollout_counts())
            .collect();
        self.samples.push_back((now, counts));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t).unwrap_or_default() > keep)
        {
            self.samples.pop_front();
        }
    }

    /// Each upstream's counts over the `window` ending at the latest
    /// sample, and the span actually covered: from the latest sample at or
    /// before the window's start (so a window covers at least `window`, at
    /// most one sample period more), or the oldest one when the history is
    /// shorter.
    pub fn window(&self, window: Duration) -> (Vec<Counts>, Duration) {
        let Some(last) = self.samples.back() else {
            return (Vec::new(), Duration::ZERO);
        };
        let from = last.0.checked_sub(window).unwrap_or(last.0);
        let first = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= from)
            .or(self.samples.front())
            .unwrap_or(last);
        let span = last.0.duration_since(first.0).unwrap_or_default();
        (
            last.1
                .iter()
                .zip(&first.1)
                .map(|(now, then)| now.since(then))
                .collect(),
            span,
        )
    }
}

/// One decision as `/status` lists it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub at: SystemTime,
    pub decision: Decision,
    pub detail: String,
}

/// A rollout's live state, shared by the models that carry the same
/// schedule.
pub struct RolloutRuntime {
    /// Basis points of the route's traffic to `to`; the request path reads it.
    pub share: AtomicU32,
    inner: Mutex<Inner>,
}

pub struct Inner {
    pub progress: Progress,
    pub last_evaluation: Option<SystemTime>,
    pub last_verdict: Option<Verdict>,
    pub readings: Vec<Reading>,
    pub decisions: VecDeque<Logged>,
}

/// What makes two rollouts the same across a reload.
pub fn identity(route: &crate::config::RouteConfig, r: &Rollout) -> String {
    format!(
        "{}\0{}\0{}\0{:?}\0{:?}\0{:?}",
        route.name,
        route.upstreams[r.from].name,
        route.upstreams[r.to].name,
        r.steps,
        r.holds,
        r.start
    )
}

impl RolloutRuntime {
    /// A rollout seen for the first time: it joins its schedule at `now`.
    pub fn new(route: &str, r: &Rollout, f: &RolloutFamilies, now: SystemTime) -> Arc<Self> {
        let progress = Progress::join(r, now);
        for d in Decision::ALL {
            f.decisions.with_label_values(&[route, d.label()]);
        }
        let rt = Arc::new(Self {
            share: AtomicU32::new(progress.share(r)),
            inner: Mutex::new(Inner {
                progress,
                last_evaluation: None,
                last_verdict: None,
                readings: Vec::new(),
                decisions: VecDeque::new(),
            }),
        });
        let detail = describe(r, &rt.lock().progress, now);
        rt.record(f, route, r, now, &[Decision::Join], &detail);
        rt
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set the share and the gauges from the state (after a reload
    /// cleared the gauges, too).
    pub fn publish(&self, f: &RolloutFamilies, route: &str, r: &Rollout) {
        let p = self.lock().progress.clone();
        self.share.store(p.share(r), Ordering::Relaxed);
        f.step
            .with_label_values(&[route])
            .set(p.step.map_or(0, |k| k as i64 + 1));
        f.percent
            .with_label_values(&[route])
            .set(f64::from(p.share(r)) / 100.0);
        for s in State::ALL {
            f.state
                .with_label_values(&[route, s.label()])
                .set(i64::from(s == p.state));
        }
    }

    /// Publish the state after `decisions`, count, log and keep them.
    fn record(
        &self,
        f: &RolloutFamilies,
        route: &str,
        r: &Rollout,
        now: SystemTime,
        decisions: &[Decision],
        detail: &str,
    ) {
        self.publish(f, route, r);
        let mut inner = self.lock();
        for d in decisions {
            f.decisions.with_label_values(&[route, d.label()]).inc();
            let line = format!("rollout {}: route={route} {detail}", d.label());
            match d {
                Decision::Fail | Decision::Rollback | Decision::Pause | Decision::Abort => {
                    warn!("{line}")
                }
                _ => info!("{line}"),
            }
            inner.decisions.push_back(Logged {
                at: now,
                decision: *d,
                detail: detail.to_string(),
            });
            if inner.decisions.len() > KEPT_DECISIONS {
                inner.decisions.pop_front();
            }
        }
    }

    /// An operator's `resume` or `abort` (the admin listener).
    pub fn operate(
        &self,
        f: &RolloutFamilies,
        route: &str,
        r: &Rollout,
        abort: bool,
    ) -> Result<String, String> {
        let now = SystemTime::now();
        let (decision, detail) = {
            let mut inner = self.lock();
            let d = if abort {
                inner.progress.abort()?
            } else {
                inner.progress.resume()?
            };
            (d, describe(r, &inner.progress, now))
        };
        let detail = format!("by the operator; {detail}");
        self.record(f, route, r, now, &[decision], &detail);
        Ok(detail)
    }
}

fn percent(bp: u32) -> String {
    let p = f64::from(bp) / 100.0;
    format!("{p}%")
}

/// Where a rollout is, in words, for its log lines.
fn describe(r: &Rollout, p: &Progress, now: SystemTime) -> String {
    let step = match p.step {
        None => "0% (before the first step)".to_string(),
        Some(k) => format!(
            "step {} of {} ({})",
            k + 1,
            r.steps.len(),
            percent(r.steps[k])
        ),
    };
    let scheduled = match rollout::scheduled(r, now) {
        None => "scheduled: waiting".to_string(),
        Some(k) if k >= r.steps.len() => "scheduled: done".to_string(),
        Some(k) => format!("scheduled: step {}", k + 1),
    };
    format!("state={} {step}, {scheduled}", p.state.label())
}

/// The request path's weight of an upstream in a rollout.
pub fn weight_of(share: u32, is_to: bool) -> u32 {
    if is_to {
        share
    } else {
        ALL_BASIS_POINTS - share.min(ALL_BASIS_POINTS)
    }
}

/// The background service.
pub struct RolloutController {
    pub process: Arc<Process>,
}

#[async_trait]
impl BackgroundService for RolloutController {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => {
                    let model = self.process.model();
                    for route in &model.routes {
                        tick(&self.process, route, SystemTime::now()).await;
                    }
                }
            }
        }
    }
}

/// How much history a route keeps: its gates' window and an interval.
fn keep(route: &Route) -> Duration {
    let gates = route.rollout.as_ref().and_then(|r| r.config.gates.as_ref());
    gates.map_or(STATUS_WINDOW, |g| g.window.max(STATUS_WINDOW) + g.interval) + 2 * SAMPLE_EVERY
}

async fn tick(process: &Process, route: &Route, now: SystemTime) {
    route
        .history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .sample(route, now, keep(route), false);
    let Some(ro) = &route.rollout else { return };
    let (r, rt) = (&ro.config, &ro.runtime);
    let moved = {
        let mut inner = rt.lock();
        let d = inner.progress.on_clock(r, now);
        (!d.is_empty()).then(|| (d, describe(r, &inner.progress, now)))
    };
    let families = &process.metrics.rollout;
    if let Some((d, detail)) = moved {
        rt.record(families, &route.name, r, now, &d, &detail);
    }
    for k in [r.from, r.to] {
        let up = &route.upstreams[k];
        up.metrics.weight.set(i64::from(up.live_weight()));
    }
    let Some(gates) = &r.gates else { return };
    let Some(at) = rollout::evaluation_at(r.start, gates.interval, now) else {
        return;
    };
    let local = {
        let mut inner = rt.lock();
        if inner.last_evaluation.is_some_and(|t| t >= at) {
            return;
        }
        inner.last_evaluation = Some(at);
        if !matches!(inner.progress.state, State::Stepping | State::Holding) {
            return;
        }
        drop(inner);
        let mut history = route.history.lock().unwrap_or_else(|e| e.into_inner());
        history.sample(route, now, keep(route), true);
        let (counts, _) = history.window(gates.window);
        if gates.has_local() {
            // An empty history (just built) reads as no requests: no data.
            let none = Counts::default();
            let of = |k: usize| counts.get(k).unwrap_or(&none);
            rollout::read_local(gates, of(r.to), of(r.from), &DURATION_BUCKETS)
        } else {
            Vec::new()
        }
    };
    let mut readings = local;
    if let Some(fleet) = &gates.fleet {
        readings.extend(read_fleet(fleet).await);
    }
    let verdict = rollout::verdict(&readings);
    for reading in &readings {
        families
            .gate_value
            .with_label_values(&[route.name.as_str(), reading.gate.as_str()])
            .set(reading.value.unwrap_or(f64::NAN));
        families
            .gate_limit
            .with_label_values(&[route.name.as_str(), reading.gate.as_str()])
            .set(reading.limit);
    }
    let (decisions, detail) = {
        let mut inner = rt.lock();
        let d = inner.progress.on_evaluation(r, at, verdict);
        inner.last_verdict = Some(verdict);
        inner.readings = readings.clone();
        let numbers: Vec<String> = readings.iter().map(reading_text).collect();
        let failures = format!(
            "failures={}/{}",
            inner.progress.failures, gates.failure_limit
        );
        (
            d,
            format!(
                "{}; {failures}; {}",
                describe(r, &inner.progress, now),
                if numbers.is_empty() {
                    "no gates".to_string()
                } else {
                    numbers.join(", ")
                }
            ),
        )
    };
    rt.record(families, &route.name, r, now, &decisions, &detail);
}

fn reading_text(g: &Reading) -> String {
    let op = if g.is_max { "<=" } else { ">=" };
    match g.value {
        Some(v) if !v.is_nan() => format!(
            "{}={v:.4} ({op} {}) {}",
            g.gate,
            g.limit,
            g.verdict().label()
        ),
        _ => format!("{}=no data ({})", g.gate, g.note),
    }
}

/// Ask Prometheus each fleet gate's query; an error, a timeout, an empty
/// or NaN result is no data (the rollout holds).
async fn read_fleet(fleet: &FleetGates) -> Vec<Reading> {
    let mut out = Vec::new();
    for q in &fleet.queries {
        let (value, note) =
            match super::prometheus::query(&fleet.url, fleet.timeout, &q.query).await {
                Ok(v) => (Some(v), String::new()),
                Err(why) => {
                    crate::limited!(
                        warn,
                        "rollout gate {}: Prometheus at {} gave no number: {why}; holding",
                        q.name,
                        fleet.url
                    );
                    (None, why)
                }
            };
        for (limit, is_max) in [(q.max, true), (q.min, false)] {
            if let Some(limit) = limit {
                out.push(Reading {
                    gate: q.name.clone(),
                    value,
                    limit,
                    is_max,
                    note: note.clone(),
                });
            }
        }
    }
    out
}

/// A route's rollout in a model: its config and the shared live state.
pub struct RouteRollout {
    pub config: Rollout,
    pub runtime: Arc<RolloutRuntime>,
}

/// The shares each upstream served over `window`, from a route's history:
/// (requests, share of the route's requests).
pub fn served(route: &Route, window: Duration) -> (Vec<(u64, f64)>, Duration) {
    let history = route.history.lock().unwrap_or_else(|e| e.into_inner());
    let (counts, span) = history.window(window);
    let total: u64 = counts.iter().map(|c| c.requests).sum();
    (
        counts
            .iter()
            .map(|c| {
                (
                    c.requests,
                    if total == 0 {
                        0.0
                    } else {
                        c.requests as f64 / total as f64
                    },
                )
            })
            .collect(),
        span,
    )
}

pub type SharedHistory = Arc<Mutex<History>>;

//! A rollout's decisions: where its wall-clock schedule is, what one
//! window's numbers say about the new upstream against the old, and the
//! state that follows. Pure: the caller brings the clock and the numbers
//! (`model::rollout` reads them from the metrics and Prometheus).
//!
//! # The rules
//! - Step `k` is *scheduled* from `start + hold[0] + … + hold[k-1]`; after
//!   the last step's hold the rollout is scheduled *done*. Every instance
//!   with the same config computes the same instants, so a fleet steps
//!   together without talking, and a process that starts late joins at
//!   the scheduled step.
//! - Gates are evaluated at `start + n × interval` (wall clock, so the
//!   fleet evaluates at the same instants), over the window ending then.
//! - An evaluation that passes lets the rollout advance **one** step
//!   toward the scheduled one. Holds are whole intervals, so a rollout
//!   whose gates pass follows the schedule exactly.
//! - No data (fewer than `min_requests` to the new upstream, or a fleet
//!   query that failed or came back empty) never advances, never passes
//!   and never counts as a failure: the rollout *holds*, and catches up one
//!   step per passing evaluation once data comes.
//! - `failure_limit` failed evaluations in a row (a pass resets the count,
//!   no data does not) → `on_failure`, and the rollout stays there until an
//!   operator resumes or aborts it, or a reload brings a new schedule.
//! - The first step needs no evaluation: at 0% the new upstream has no
//!   traffic to judge.

use std::time::{Duration, SystemTime};

use crate::config::{Gates, OnFailure, Rollout};

/// Where the wall clock puts a rollout: `None` before `start`, `Some(k)`
/// at step `k`, `Some(steps.len())` once the last step's hold is over.
pub fn scheduled(r: &Rollout, now: SystemTime) -> Option<usize> {
    let since = now.duration_since(r.start).ok()?;
    let mut end = Duration::ZERO;
    for (k, hold) in r.holds.iter().enumerate() {
        end += *hold;
        if since < end {
            return Some(k);
        }
    }
    Some(r.steps.len())
}

/// When step `k` is scheduled to begin (`k == steps.len()`: done).
pub fn step_instant(r: &Rollout, k: usize) -> SystemTime {
    r.start + r.holds.iter().take(k).sum::<Duration>()
}

/// The latest evaluation instant at or before `now` (none before the first,
/// `start + interval`).
pub fn evaluation_at(start: SystemTime, interval: Duration, now: SystemTime) -> Option<SystemTime> {
    let since = now.duration_since(start).ok()?;
    let n = since.as_nanos() / interval.as_nanos();
    (n >= 1).then(|| start + interval * n as u32)
}

/// One upstream's counters at an instant, or their difference over a window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub errors_5xx: u64,
    pub edge_refused: u64,
    pub marker_mismatch: u64,
    /// Failed connects and TLS handshakes (attempts that never became a
    /// response from this upstream).
    pub connect_errors: u64,
    /// Cumulative histogram bucket counts of the request duration, one per
    /// bound of [`crate::observe::metrics::DURATION_BUCKETS`].
    pub buckets: Vec<u64>,
}

impl Counts {
    /// `self - earlier`; counters that went down (a reset) count from 0.
    pub fn since(&self, earlier: &Counts) -> Counts {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Counts {
            requests: d(self.requests, earlier.requests),
            errors_5xx: d(self.errors_5xx, earlier.errors_5xx),
            edge_refused: d(self.edge_refused, earlier.edge_refused),
            marker_mismatch: d(self.marker_mismatch, earlier.marker_mismatch),
            connect_errors: d(self.connect_errors, earlier.connect_errors),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| d(*b, earlier.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    fn ratio(&self, n: u64) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            n as f64 / self.requests as f64
        }
    }

    /// The `q` quantile of the duration, estimated from the buckets as
    /// Prometheus's `histogram_quantile` does (linear within a bucket; in
    /// the last, open bucket: the largest bound).
    pub fn quantile(&self, q: f64, bounds: &[f64]) -> Option<f64> {
        if self.requests == 0 {
            return None;
        }
        let rank = q * self.requests as f64;
        let mut lower_bound = 0.0;
        let mut lower_count = 0u64;
        for (i, &bound) in bounds.iter().enumerate() {
            let count = self.buckets.get(i).copied().unwrap_or(0);
            if count as f64 >= rank {
                let in_bucket = (count - lower_count) as f64;
                if in_bucket == 0.0 {
                    return Some(bound);
                }
                return Some(
                    lower_bound + (bound - lower_bound) * (rank - lower_count as f64) / in_bucket,
                );
            }
            lower_bound = bound;
            lower_count = count;
        }
        bounds.last().copied()
    }
}

/// What one evaluation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Not enough to judge: hold.
    NoData,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::NoData => "no_data",
        }
    }
}

/// One gate's reading: its value (`None`: no data) against its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub gate: String,
    pub value: Option<f64>,
    pub limit: f64,
    /// `true`: fails above the limit; `false`: fails below it.
    pub is_max: bool,
    /// Why there is no value, when there is none.
    pub note: String,
}

impl Reading {
    pub fn verdict(&self) -> Verdict {
        match self.value {
            None => Verdict::NoData,
            Some(v) if v.is_nan() => Verdict::NoData,
            Some(v) if (self.is_max && v > self.limit) || (!self.is_max && v < self.limit) => {
                Verdict::Fail
            }
            Some(_) => Verdict::Pass,
        }
    }
}

/// The old upstream's 5xx ratio counts as at least this for
/// `max_5xx_ratio_vs_from`, so one 5xx of the new upstream in a quiet
/// window against an old one with none is not "infinitely worse".
pub const VS_FROM_FLOOR: f64 = 0.001;

/// Read the local gates over one window: `to` and `from` are the two
/// upstreams' counts over the same window.
pub fn read_local(g: &Gates, to: &Counts, from: &Counts, bounds: &[f64]) -> Vec<Reading> {
    let enough = to.requests >= g.min_requests;
    let short = format!(
        "{} of {} requests to the new upstream in the window",
        to.requests, g.min_requests
    );
    let reading = |gate: &str, value: Option<f64>, limit: f64, note: String| Reading {
        gate: gate.to_string(),
        value: if enough { value } else { None },
        limit,
        is_max: true,
        note: if enough { note } else { short.clone() },
    };
    let mut out = Vec::new();
    if let Some(max) = g.max_5xx_ratio {
        out.push(reading(
            "5xx_ratio",
            Some(to.ratio(to.errors_5xx)),
            max,
            String::new(),
        ));
    }
    if let Some(factor) = g.max_5xx_ratio_vs_from {
        let baseline = from.requests >= g.min_requests;
        let value = baseline
            .then(|| to.ratio(to.errors_5xx) / from.ratio(from.errors_5xx).max(VS_FROM_FLOOR));
        let note = if baseline {
            String::new()
        } else {
            format!(
                "{} of {} requests to the old upstream in the window",
                from.requests, g.min_requests
            )
        };
        out.push(reading("5xx_ratio_vs_from", value, factor, note));
    }
    if let Some(max) = g.max_p99 {
        out.push(reading(
            "p99_seconds",
            to.quantile(0.99, bounds),
            max.as_secs_f64(),
            String::new(),
        ));
    }
    if let Some(max) = g.max_edge_refused_ratio {
        out.push(reading(
            "edge_refused_ratio",
            Some(to.ratio(to.edge_refused)),
            max,
            String::new(),
        ));
    }
    if let Some(max) = g.max_marker_mismatch_ratio {
        out.push(reading(
            "marker_mismatch_ratio",
            Some(to.ratio(to.marker_mismatch)),
            max,
            String::new(),
        ));
    }
    if let Some(max) = g.max_connect_error_ratio {
        let attempts = to.requests + to.connect_errors;
        let value = if attempts == 0 {
            0.0
        } else {
            to.connect_errors as f64 / attempts as f64
        };
        out.push(reading(
            "connect_error_ratio",
            Some(value),
            max,
            String::new(),
        ));
    }
    out
}

/// The verdict of a set of readings: any failure fails (a failing gate
/// with data is a failure even when another gate has none); else any
/// missing value holds; else pass.
pub fn verdict(readings: &[Reading]) -> Verdict {
    let verdicts: Vec<Verdict> = readings.iter().map(Reading::verdict).collect();
    if verdicts.contains(&Verdict::Fail) {
        Verdict::Fail
    } else if verdicts.contains(&Verdict::NoData) {
        Verdict::NoData
    } else {
        Verdict::Pass
    }
}

/// A rollout's state, as `cutover_rollout_state{state}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Before `start`.
    Waiting,
    /// Following the schedule.
    Stepping,
    /// Behind the schedule: the last evaluation had no data or failed.
    Holding,
    /// `on_failure: rollback|previous` after `failure_limit` failures.
    RolledBack,
    /// `on_failure: hold` after `failure_limit` failures.
    Paused,
    /// An operator aborted it: 0% to `to` until a reload with a new schedule.
    Aborted,
    Done,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Waiting,
        State::Stepping,
        State::Holding,
        State::RolledBack,
        State::Paused,
        State::Aborted,
        State::Done,
    ];

    pub fn label(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Stepping => "stepping",
            State::Holding => "holding",
            State::RolledBack => "rolled_back",
            State::Paused => "paused",
            State::Aborted => "aborted",
            State::Done => "done",
        }
    }

    /// Whether the schedule moves it (not stopped by a failure or an operator).
    fn follows(self) -> bool {
        matches!(self, State::Waiting | State::Stepping | State::Holding)
    }
}

/// What happened, as `cutover_rollout_decisions_total{decision}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A process (or a new schedule) joined at the scheduled step.
    Join,
    /// An evaluation passed.
    Pass,
    /// An evaluation failed.
    Fail,
    /// An evaluation had no data.
    NoData,
    /// One step up (the first step needs no evaluation).
    Advance,
    /// Behind the schedule and not advancing.
    Hold,
    Rollback,
    Pause,
    Resume,
    Abort,
    Done,
}

impl Decision {
    pub const ALL: [Decision; 11] = [
        Decision::Join,
        Decision::Pass,
        Decision::Fail,
        Decision::NoData,
        Decision::Advance,
        Decision::Hold,
        Decision::Rollback,
        Decision::Pause,
        Decision::Resume,
        Decision::Abort,
        Decision::Done,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Decision::Join => "join",
            Decision::Pass => "pass",
            Decision::Fail => "fail",
            Decision::NoData => "no_data",
            Decision::Advance => "advance",
            Decision::Hold => "hold",
            Decision::Rollback => "rollback",
            Decision::Pause => "pause",
            Decision::Resume => "resume",
            Decision::Abort => "abort",
            Decision::Done => "done",
        }
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub state: State,
    /// The step in effect; `None`: 0% to `to`.
    pub step: Option<usize>,
    /// Failed evaluations in a row.
    pub failures: u32,
}

impl Progress {
    /// A rollout seen for the first time at `now`: at the scheduled step.
    pub fn join(r: &Rollout, now: SystemTime) -> Progress {
        let last = r.steps.len() - 1;
        match scheduled(r, now) {
            None => Progress {
                state: State::Waiting,
                step: None,
                failures: 0,
            },
            Some(k) if k > last => Progress {
                state: State::Done,
                step: Some(last),
                failures: 0,
            },
            Some(k) => Progress {
                state: State::Stepping,
                step: Some(k),
                failures: 0,
            },
        }
    }

    /// Basis points to `to`.
    pub fn share(&self, r: &Rollout) -> u32 {
        self.step.map_or(0, |k| r.steps[k])
    }

    /// The schedule moved without an evaluation: the first step (needs
    /// none), and every step when the rollout has no gates.
    pub fn on_clock(&mut self, r: &Rollout, now: SystemTime) -> Vec<Decision> {
        if !self.state.follows() {
            return Vec::new();
        }
        let Some(target) = scheduled(r, now) else {
            return Vec::new();
        };
        let last = r.steps.len() - 1;
        let mut out = Vec::new();
        if self.step.is_none() {
            self.step = Some(0);
            self.state = State::Stepping;
            out.push(Decision::Advance);
        }
        if r.gates.is_none() {
            let want = target.min(last);
            if self.step < Some(want) {
                self.step = Some(want);
                out.push(Decision::Advance);
            }
            if target > last {
                self.state = State::Done;
                out.push(Decision::Done);
            }
        }
        out
    }

    /// An evaluation at `at` (an evaluation instant) found `verdict`.
    pub fn on_evaluation(
        &mut self,
        r: &Rollout,
        at: SystemTime,
        verdict: Verdict,
    ) -> Vec<Decision> {
        let Some(gates) = &r.gates else {
            return Vec::new();
        };
        if !matches!(self.state, State::Stepping | State::Holding) {
            return Vec::new();
        }
        let target = scheduled(r, at).unwrap_or(0);
        let last = r.steps.len() - 1;
        let behind = |p: &Progress| match p.step {
            None => true,
            Some(k) => k < target.min(last) || target > last,
        };
        let mut out = vec![match verdict {
            Verdict::Pass => Decision::Pass,
            Verdict::Fail => Decision::Fail,
            Verdict::NoData => Decision::NoData,
        }];
        match verdict {
            Verdict::Pass => {
                self.failures = 0;
                if behind(self) {
                    match self.step {
                        Some(k) if k == last => {
                            self.state = State::Done;
                            out.push(Decision::Done);
                            return out;
                        }
                        Some(k) => self.step = Some(k + 1),
                        None => self.step = Some(0),
                    }
                    out.push(Decision::Advance);
                }
            }
            Verdict::Fail => {
                self.failures += 1;
                if self.failures >= gates.failure_limit {
                    match r.on_failure {
                        OnFailure::Rollback => {
                            self.step = None;
                            self.state = State::RolledBack;
                            out.push(Decision::Rollback);
                        }
                        OnFailure::Previous => {
                            self.step = self.step.and_then(|k| k.checked_sub(1));
                            self.state = State::RolledBack;
                            out.push(Decision::Rollback);
                        }
                        OnFailure::Hold => {
                            self.state = State::Paused;
                            out.push(Decision::Pause);
                        }
                    }
                    return out;
                }
            }
            Verdict::NoData => {}
        }
        let holding = behind(self);
        if holding && self.state != State::Holding {
            out.push(Decision::Hold);
        }
        self.state = if holding {
            State::Holding
        } else {
            State::Stepping
        };
        out
    }

    /// An operator resumed a rolled-back or paused rollout: it follows the
    /// schedule again from where it is, one step per passing evaluation.
    pub fn resume(&mut self) -> Result<Decision, String> {
        match self.state {
            State::RolledBack | State::Paused => {
                self.state = State::Stepping;
                self.failures = 0;
                Ok(Decision::Resume)
            }
            State::Aborted => {
                Err("the rollout was aborted: reload with a new `start` to run it again".into())
            }
            other => Err(format!(
                "the rollout is {}, not rolled back or paused: nothing to resume",
                other.label()
            )),
        }
    }

    /// An operator aborted: 0% to `to`, for good (until a new schedule).
    pub fn abort(&mut self) -> Result<Decision, String> {
        if self.state == State::Aborted {
            return Err("the rollout is already aborted".into());
        }
        self.state = State::Aborted;
        self.step = None;
        Ok(Decision::Abort)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(gates: bool) -> Rollout {
        Rollout {
            from: 0,
            to: 1,
            steps: vec![100, 1000, 5000, 10000],
            holds: vec![Duration::from_secs(10); 4],
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            gates: gates.then(|| Gates {
                max_5xx_ratio: Some(0.01),
                max_5xx_ratio_vs_from: None,
                max_p99: None,
                max_edge_refused_ratio: None,
                max_marker_mismatch_ratio: None,
                max_connect_error_ratio: None,
                min_requests: 10,
                interval: Duration::from_secs(5),
                window: Duration::from_secs(5),
                failure_limit: 2,
                fleet: None,
            }),
            on_failure: OnFailure::Rollback,
        }
    }

    fn at(r: &Rollout, secs: u64) -> SystemTime {
        r.start + Duration::from_secs(secs)
    }

    #[test]
    fn schedule_instants() {
        let r = rollout(false);
        assert_eq!(scheduled(&r, r.start - Duration::from_secs(1)), None);
        assert_eq!(scheduled(&r, at(&r, 0)), Some(0));
        assert_eq!(scheduled(&r, at(&r, 9)), Some(0));
        assert_eq!(scheduled(&r, at(&r, 10)), Some(1));
        assert_eq!(scheduled(&r, at(&r, 39)), Some(3));
        assert_eq!(scheduled(&r, at(&r, 40)), Some(4));
        assert_eq!(step_instant(&r, 2), at(&r, 20));
        let i = Duration::from_secs(5);
        assert_eq!(evaluation_at(r.start, i, at(&r, 4)), None);
        assert_eq!(evaluation_at(r.start, i, at(&r, 5)), Some(at(&r, 5)));
        assert_eq!(evaluation_at(r.start, i, at(&r, 14)), Some(at(&r, 10)));
    }

    #[test]
    fn without_gates_the_clock_alone_steps_and_late_joiners_land_on_the_step() {
        let r = rollout(false);
        let mut p = Progress::join(&r, r.start - Duration::from_secs(1));
        assert_eq!((p.state, p.share(&r)), (State::Waiting, 0));
        p.on_clock(&r, at(&r, 21));
        assert_eq!((p.state, p.share(&r)), (State::Stepping, 5000));
        assert_eq!(
            p.on_clock(&r, at(&r, 40)),
            vec![Decision::Advance, Decision::Done]
        );
        assert_eq!(p.state, State::Done);
        assert_eq!(Progress::join(&r, at(&r, 25)).share(&r), 5000);
        assert_eq!(Progress::join(&r, at(&r, 99)).state, State::Done);
    }

    #[test]
    fn passing_gates_follow_the_schedule_no_data_holds_then_catches_up() {
        let r = rollout(true);
        let mut p = Progress::join(&r, at(&r, 0));
        assert_eq!(p.step, Some(0));
        // Mid-step evaluation: pass, not behind, nothing moves.
        assert_eq!(
            p.on_evaluation(&r, at(&r, 5), Verdict::Pass),
            vec![Decision::Pass]
        );
        assert_eq!(p.step, Some(0));
        // Step boundary: pass → advance.
        p.on_evaluation(&r, at(&r, 10), Verdict::Pass);
        assert_eq!(p.step, Some(1));
        // Boundary with no data: hold, never fails.
        for s in [15, 20, 25, 30] {
            let d = p.on_evaluation(&r, at(&r, s), Verdict::NoData);
            assert!(!d.contains(&Decision::Advance), "{d:?}");
        }
        assert_eq!((p.state, p.step, p.failures), (State::Holding, Some(1), 0));
        // Data again: one step per passing evaluation.
        p.on_evaluation(&r, at(&r, 35), Verdict::Pass);
        assert_eq!((p.state, p.step), (State::Holding, Some(2)));
        p.on_evaluation(&r, at(&r, 40), Verdict::Pass);
        assert_eq!(p.step, Some(3));
        assert_eq!(
            p.on_evaluation(&r, at(&r, 45), Verdict::Pass),
            vec![Decision::Pass, Decision::Done]
        );
        assert_eq!(p.state, State::Done);
    }

    #[test]
    fn failures_in_a_row_roll_back_and_stay_until_resumed() {
        let r = rollout(true);
        let mut p = Progress::join(&r, at(&r, 12));
        p.on_evaluation(&r, at(&r, 15), Verdict::Fail);
        p.on_evaluation(&r, at(&r, 20), Verdict::Pass);
        assert_eq!(p.failures, 0, "a pass resets the count");
        p.on_evaluation(&r, at(&r, 25), Verdict::Fail);
        p.on_evaluation(&r, at(&r, 30), Verdict::NoData);
        assert_eq!(p.failures, 1, "no data is not a failure, nor a pass");
        let d = p.on_evaluation(&r, at(&r, 35), Verdict::Fail);
        assert_eq!(d, vec![Decision::Fail, Decision::Rollback]);
        assert_eq!((p.state, p.share(&r)), (State::RolledBack, 0));
        assert!(p.on_evaluation(&r, at(&r, 40), Verdict::Pass).is_empty());
        assert!(p.on_clock(&r, at(&r, 40)).is_empty());
        assert_eq!(p.resume(), Ok(Decision::Resume));
        assert_eq!(p.on_clock(&r, at(&r, 41)), vec![Decision::Advance]);
        assert_eq!(
            p.share(&r),
            100,
            "resumed: the first step, then up by evaluations"
        );
        assert_eq!(p.abort(), Ok(Decision::Abort));
        assert!(p.resume().is_err());
        assert_eq!(p.share(&r), 0);
    }

    #[test]
    fn previous_and_hold_on_failure() {
        let mut r = rollout(true);
        r.on_failure = OnFailure::Previous;
        let mut p = Progress::join(&r, at(&r, 22));
        p.on_evaluation(&r, at(&r, 25), Verdict::Fail);
        p.on_evaluation(&r, at(&r, 30), Verdict::Fail);
        assert_eq!((p.state, p.step), (State::RolledBack, Some(1)));
        r.on_failure = OnFailure::Hold;
        let mut p = Progress::join(&r, at(&r, 22));
        p.on_evaluation(&r, at(&r, 25), Verdict::Fail);
        p.on_evaluation(&r, at(&r, 30), Verdict::Fail);
        assert_eq!((p.state, p.step), (State::Paused, Some(2)));
    }

    #[test]
    fn local_gates_read_ratios_and_hold_below_min_requests() {
        let r = rollout(true);
        let mut g = r.gates.clone().unwrap();
        g.max_5xx_ratio_vs_from = Some(2.0);
        g.max_p99 = Some(Duration::from_millis(500));
        let bounds = [0.1, 0.5, 1.0];
        let to = Counts {
            requests: 100,
            errors_5xx: 5,
            buckets: vec![90, 99, 100],
            ..Counts::default()
        };
        let from = Counts {
            requests: 1000,
            errors_5xx: 10,
            buckets: vec![1000, 1000, 1000],
            ..Counts::default()
        };
        let readings = read_local(&g, &to, &from, &bounds);
        let values: Vec<(String, Option<f64>)> =
            readings.iter().map(|r| (r.gate.clone(), r.value)).collect();
        assert_eq!(values[0], ("5xx_ratio".into(), Some(0.05)));
        assert_eq!(values[1], ("5xx_ratio_vs_from".into(), Some(5.0)));
        assert_eq!(values[2], ("p99_seconds".into(), Some(0.5)));
        assert_eq!(verdict(&readings), Verdict::Fail);
        let quiet = Counts {
            requests: 9,
            ..Counts::default()
        };
        let readings = read_local(&g, &quiet, &from, &bounds);
        assert_eq!(verdict(&readings), Verdict::NoData);
        assert!(readings[0].note.contains("9 of 10"), "{:?}", readings[0]);
    }

    #[test]
    fn quantile_like_histogram_quantile() {
        let bounds = [0.1, 0.2, 0.4];
        let c = Counts {
            requests: 100,
            buckets: vec![50, 90, 100],
            ..Counts::default()
        };
        assert!((c.quantile(0.5, &bounds).unwrap() - 0.1).abs() < 1e-9);
        assert!((c.quantile(0.7, &bounds).unwrap() - 0.15).abs() < 1e-9);
        // Beyond every bound: the largest bound.
        let slow = Counts {
            requests: 10,
            buckets: vec![0, 0, 0],
            ..Counts::default()
        };
        assert_eq!(slow.quantile(0.99, &bounds), Some(0.4));
        assert_eq!(Counts::default().quantile(0.99, &bounds), None);
    }
}

//! The health state of one upstream: the flag the request path reads, and
//! the fall/rise rule that changes it. Two failures in a row take an
//! upstream out of the selection, two successes bring it back (HAProxy's
//! `fall`/`rise`, at 2/2). The checks themselves run in
//! [`crate::model::checks`], which feeds their results in here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive results needed to change state.
const FALL: u32 = 2;
const RISE: u32 = 2;

/// Health of one upstream; process across reloads while the upstream keeps its
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
    pub(crate) fn claim(&self, now: Instant, interval: Duration) -> bool {
        let mut s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        if s.next_due.is_some_and(|due| now < due) {
            return false;
        }
        s.next_due = Some(now + interval);
        true
    }

    /// Record one check result; returns the new state when it changed.
    pub(crate) fn record(&self, ok: bool) -> Option<bool> {
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

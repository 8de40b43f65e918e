//! Passive outlier detection for the addresses of an upstream name.
//!
//! A CloudFront name resolves to several addresses; one of them refusing or
//! not completing a TLS handshake says nothing about the others. An address
//! that fails a connect is ejected for a while, the next request goes to
//! another address of the same upstream, and only when no address is usable
//! does the upstream itself stop being a candidate (so a request fails over
//! to another upstream). The ejection doubles while the address keeps
//! failing when it is tried again, up to [`MAX_EJECTION`] (CloudFront's DNS
//! TTL: by then the name's answer has probably changed); a successful
//! connect readmits it and resets the count, as Envoy's outlier detection
//! does. When an ejection ends, one connect at a time tries the address
//! ([`Ejections::take`]; nginx's `fail_timeout` lets one request through
//! the same way): a dead address costs one connect timeout per ejection,
//! not one for every request that arrives while the trial connect waits.
//!
//! The request path asks [`Ejections::is_ejected`] for each address it
//! considers: one atomic load while nothing is ejected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first ejection of an address.
pub const BASE_EJECTION: Duration = Duration::from_secs(5);
/// The longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(60);
/// How long the address stays out for others while one connect tries it
/// after an ejection; longer than any connect timeout, so the trial's
/// outcome (a readmit or an eject) normally ends it first.
pub const TRIAL: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Entry {
    addr: SocketAddr,
    until: Instant,
    /// Ejections in a row without a successful connect in between.
    times: u32,
    /// `until` is a trial's end: one connect is trying the address.
    trial: bool,
}

impl Entry {
    /// Whether this entry keeps `addr` out at `now`.
    fn holds(&self, addr: SocketAddr, now: Instant) -> bool {
        self.addr == addr && now < self.until
    }
}

/// What [`Ejections::eject`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejected {
    /// How long the address is out from now.
    pub length: Duration,
    /// A new ejection (counted in `cutover_upstream_address_ejections_total`);
    /// false for a failure while the address was already out (a request
    /// that picked it before its ejection).
    pub new: bool,
}

/// The ejected addresses of one name.
#[derive(Debug, Default)]
pub struct Ejections {
    /// How many entries `entries` holds: the request path's fast check.
    count: AtomicUsize,
    entries: Mutex<Vec<Entry>>,
}

impl Ejections {
    /// Nothing is ejected (one atomic load).
    pub fn none(&self) -> bool {
        self.count.load(Ordering::Relaxed) == 0
    }

    /// Whether `addr` is out of the rotation at `now`.
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().any(|e| e.holds(addr, now))
    }

    /// Whether a connect may go to `addr` at `now`. An address whose
    /// ejection has ended is then on trial: this connect tries it, and it
    /// stays out for the others until the trial's outcome ([`Self::eject`]
    /// or [`Self::readmit`]) or [`TRIAL`] has passed.
    pub fn take(&self, addr: SocketAddr, now: Instant) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.iter_mut().find(|e| e.addr == addr) {
            None => true,
            Some(e) if now < e.until => false,
            Some(e) => {
                e.until = now + TRIAL;
                e.trial = true;
                true
            }
        }
    }

    /// Take `addr` out after a failed connect.
    pub fn eject(&self, addr: SocketAddr, now: Instant) -> Ejected {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let times = match entries.iter_mut().find(|e| e.addr == addr) {
            // The trial failed: ejected again, for longer.
            Some(e) if e.trial => {
                e.trial = false;
                e.times += 1;
                e.times
            }
            // Failed while still ejected (a request that picked it before
            // the ejection): the same ejection, not a longer one.
            Some(e) if now < e.until => {
                return Ejected {
                    length: e.until - now,
                    new: false,
                }
            }
            Some(e) => {
                e.times += 1;
                e.times
            }
            None => {
                entries.push(Entry {
                    addr,
                    until: now,
                    times: 1,
                    trial: false,
                });
                self.count.store(entries.len(), Ordering::Relaxed);
                1
            }
        };
        let length = BASE_EJECTION
            .saturating_mul(1 << (times - 1).min(16))
            .min(MAX_EJECTION);
        if let Some(e) = entries.iter_mut().find(|e| e.addr == addr) {
            e.until = now + length;
        }
        Ejected { length, new: true }
    }

    /// `addr` connected: back in, its count reset.
    pub fn readmit(&self, addr: SocketAddr) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|e| e.addr != addr);
        self.count.store(entries.len(), Ordering::Relaxed);
    }

    /// Whether any address in `addrs` is usable at `now`.
    pub fn any_usable(&self, addrs: &[SocketAddr], now: Instant) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return !addrs.is_empty();
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        addrs
            .iter()
            .any(|a| !entries.iter().any(|e| e.holds(*a, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 443))
    }

    #[test]
    fn an_ejection_grows_while_the_address_keeps_failing() {
        let e = Ejections::default();
        let t0 = Instant::now();
        assert!(!e.is_ejected(addr(1), t0));
        assert_eq!(e.eject(addr(1), t0).length, BASE_EJECTION);
        assert!(e.is_ejected(addr(1), t0 + Duration::from_secs(1)));
        assert!(!e.is_ejected(addr(2), t0));
        // A second failure during the ejection does not lengthen it.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            e.eject(addr(1), t1),
            Ejected {
                length: BASE_EJECTION - Duration::from_secs(1),
                new: false
            }
        );
        // Tried again after it and failing: twice as long, then capped.
        let t2 = t0 + BASE_EJECTION;
        assert!(!e.is_ejected(addr(1), t2));
        assert_eq!(e.eject(addr(1), t2).length, 2 * BASE_EJECTION);
        let mut t = t2;
        for _ in 0..10 {
            t += MAX_EJECTION;
            e.eject(addr(1), t);
        }
        assert_eq!(e.eject(addr(1), t + MAX_EJECTION).length, MAX_EJECTION);
    }

    #[test]
    fn after_an_ejection_one_connect_at_a_time_tries_the_address() {
        let e = Ejections::default();
        let t0 = Instant::now();
        assert!(e.take(addr(1), t0), "nothing ejected");
        e.eject(addr(1), t0);
        assert!(!e.take(addr(1), t0 + Duration::from_secs(1)));
        assert!(e.take(addr(2), t0), "another address");
        // The ejection ends: one trial, the others kept out meanwhile.
        let t1 = t0 + BASE_EJECTION;
        assert!(!e.is_ejected(addr(1), t1));
        assert!(e.take(addr(1), t1));
        assert!(e.is_ejected(addr(1), t1));
        assert!(!e.take(addr(1), t1 + Duration::from_secs(1)));
        assert!(!e.any_usable(&[addr(1)], t1 + Duration::from_secs(1)));
        // It fails: out for twice as long (not the trial's remainder).
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            e.eject(addr(1), t2),
            Ejected {
                length: 2 * BASE_EJECTION,
                new: true
            }
        );
        assert!(!e.take(addr(1), t2 + BASE_EJECTION));
        // The next trial succeeds: back in for every connect.
        let t3 = t2 + 2 * BASE_EJECTION;
        assert!(e.take(addr(1), t3));
        e.readmit(addr(1));
        assert!(e.take(addr(1), t3) && e.take(addr(1), t3));
        // A trial whose outcome never came ends after TRIAL.
        e.eject(addr(2), t3);
        let t4 = t3 + BASE_EJECTION;
        assert!(e.take(addr(2), t4));
        assert!(!e.take(addr(2), t4 + TRIAL - Duration::from_millis(1)));
        assert!(e.take(addr(2), t4 + TRIAL));
    }

    #[test]
    fn a_successful_connect_readmits_and_resets() {
        let e = Ejections::default();
        let t0 = Instant::now();
        e.eject(addr(1), t0);
        let addrs = [addr(1), addr(2)];
        assert!(e.any_usable(&addrs, t0));
        assert!(!e.any_usable(&addrs[..1], t0));
        e.readmit(addr(1));
        assert!(!e.is_ejected(addr(1), t0));
        assert_eq!(
            e.eject(addr(1), t0).length,
            BASE_EJECTION,
            "the count starts again"
        );
    }
}

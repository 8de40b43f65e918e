//! Which upstream of a route takes a request.
//!
//! A request carries a point in `[0, 2^64)`: a stable hash of the client address
//! (`sticky: client_ip`) or a random number (`sticky: none`). The eligible
//! upstreams own contiguous slices of that range in config order, each as wide
//! as its weight. Raising one upstream's weight widens its slice and narrows
//! the others' proportionally, so its old slice is inside its new one: clients
//! only ever move onto it, never off it. The hash is fixed (not seeded per
//! process), so every instance of a fleet sends a client to the same upstream.

use std::net::IpAddr;

/// What the selector needs to know about an upstream.
pub trait Candidate {
    fn weight(&self) -> u32;
    fn is_backup(&self) -> bool;
    fn is_healthy(&self) -> bool;
}

/// A stable 64-bit hash of a client address (FNV-1a, then the splitmix64
/// finaliser to spread nearby addresses across the range).
pub fn client_point(ip: IpAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match ip {
        IpAddr::V4(v4) => feed(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => feed(&v4.octets()),
            None => feed(&v6.octets()),
        },
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pick an upstream index for `point`, never `exclude` (the one that just
/// failed). Order of preference: healthy weighted upstreams; healthy backups;
/// then, if nothing is healthy, any of them (fail open: a health check that is
/// wrong must not take the whole route down).
pub fn choose<C: Candidate>(upstreams: &[C], point: u64, exclude: Option<usize>) -> Option<usize> {
    let allowed = |i: usize| Some(i) != exclude;
    let primary = |i: usize, u: &C| allowed(i) && !u.is_backup() && u.weight() > 0;
    let backup = |i: usize, u: &C| allowed(i) && u.is_backup();
    pick_weighted(upstreams, point, |i, u| primary(i, u) && u.is_healthy())
        .or_else(|| pick_even(upstreams, point, |i, u| backup(i, u) && u.is_healthy()))
        .or_else(|| pick_weighted(upstreams, point, primary))
        .or_else(|| pick_even(upstreams, point, backup))
}

/// The upstream whose slice holds `point`, slices sized by weight.
fn pick_weighted<C: Candidate>(
    upstreams: &[C],
    point: u64,
    eligible: impl Fn(usize, &C) -> bool,
) -> Option<usize> {
    let total: u64 = upstreams
        .iter()
        .enumerate()
        .filter(|(i, u)| eligible(*i, u))
        .map(|(_, u)| u64::from(u.weight()))
        .sum();
    if total == 0 {
        return None;
    }
    // Scale the point into [0, total) without bias from a modulo.
    let target = ((u128::from(point) * u128::from(total)) >> 64) as u64;
    let mut end = 0u64;
    for (i, u) in upstreams.iter().enumerate() {
        if !eligible(i, u) {
            continue;
        }
        end += u64::from(u.weight());
        if target < end {
            return Some(i);
        }
    }
    None
}

/// Backups may have weight 0; they share the range evenly.
fn pick_even<C: Candidate>(
    upstreams: &[C],
    point: u64,
    eligible: impl Fn(usize, &C) -> bool,
) -> Option<usize> {
    let count = upstreams
        .iter()
        .enumerate()
        .filter(|(i, u)| eligible(*i, u))
        .count() as u64;
    if count == 0 {
        return None;
    }
    let nth = ((u128::from(point) * u128::from(count)) >> 64) as usize;
    upstreams
        .iter()
        .enumerate()
        .filter(|(i, u)| eligible(*i, u))
        .nth(nth)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct U(u32, bool, bool);
    impl Candidate for U {
        fn weight(&self) -> u32 {
            self.0
        }
        fn is_backup(&self) -> bool {
            self.1
        }
        fn is_healthy(&self) -> bool {
            self.2
        }
    }

    fn points(n: u32) -> impl Iterator<Item = u64> {
        (0..n).map(|i| client_point(IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])))
    }

    #[test]
    fn shares_follow_weights() {
        let ups = [U(90, false, true), U(10, false, true)];
        let new = points(10_000)
            .filter(|p| choose(&ups, *p, None) == Some(1))
            .count();
        assert!((900..=1100).contains(&new), "new share {new} of 10000");
    }

    #[test]
    fn raising_a_weight_only_moves_clients_onto_it() {
        for (order_new_first, from, to) in [(true, 10, 50), (false, 10, 50), (false, 1, 99)] {
            let make = |w: u32| {
                if order_new_first {
                    [U(w, false, true), U(100 - w, false, true)]
                } else {
                    [U(100 - w, false, true), U(w, false, true)]
                }
            };
            let new_idx = if order_new_first { 0 } else { 1 };
            let (before, after) = (make(from), make(to));
            for p in points(5_000) {
                if choose(&before, p, None) == Some(new_idx) {
                    assert_eq!(choose(&after, p, None), Some(new_idx));
                }
            }
        }
    }

    #[test]
    fn unhealthy_backup_and_exclusion() {
        let ups = [U(100, false, false), U(0, true, true), U(0, false, true)];
        // The only weighted upstream is unhealthy: the healthy backup takes it.
        assert_eq!(choose(&ups, 42, None), Some(1));
        // Nothing healthy but the excluded backup: fail open to the weighted one.
        assert_eq!(choose(&ups, 42, Some(1)), Some(0));
        let ups = [U(50, false, true), U(50, false, true)];
        assert_eq!(choose(&ups, u64::MAX, Some(1)), Some(0));
        assert_eq!(choose(&ups, 0, Some(0)), Some(1));
        assert_eq!(choose(&[U(1, false, true)], 7, Some(0)), None);
    }
}

//! Upstream name resolution, kept off the request path.
//!
//! Each upstream holds an `Arc<ResolvedName>`; the request path only reads its
//! current address list (one atomic load). A background service re-resolves
//! every name each `dns_refresh`; a failed or empty answer keeps the last good
//! addresses, because an upstream that loses its addresses to a DNS blip would
//! fail every request for nothing.
//!
//! Every answer is cleaned before use ([`clean`]): addresses nobody can
//! connect to (`0.0.0.0`, `::`, multicast, broadcast) are dropped, so is the
//! other family for `address_family: ipv4|ipv6`, and with `auto` every
//! address this host has no route to (a UDP `connect`, which sends nothing:
//! an EC2 instance without IPv6 drops the AAAA answers here instead of
//! failing a connect on each of them); at most [`MAX_ADDRESSES`] are kept,
//! both families represented. What is dropped is counted by reason and
//! logged once per change of the answer.
//!
//! An optional hosts file (`/etc/hosts` format, re-read at every refresh) is
//! consulted before DNS: it is how `cutover demo` and the tests point
//! CloudFront-style names at loopback, and how an operator can pin a name
//! during a rehearsal without touching the system resolver.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::{info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::AddressFamily;
use crate::observe::metrics::DnsMetrics;
use crate::shift::endpoints::Ejections;

/// The most addresses one name keeps (CloudFront answers 4 A + 4 AAAA).
pub const MAX_ADDRESSES: usize = 16;

/// The current addresses of one `name:port`.
#[derive(Debug)]
pub struct ResolvedName {
    pub host: String,
    pub port: u16,
    pub family: AddressFamily,
    addrs: ArcSwap<Vec<SocketAddr>>,
    /// Round-robin cursor across the name's addresses.
    next: AtomicUsize,
    /// Addresses out of the rotation after failed connects.
    pub ejections: Ejections,
    /// The last answer logged, so a refresh logs only a change.
    last_note: Mutex<String>,
}

impl ResolvedName {
    fn new(host: String, port: u16, family: AddressFamily, addrs: Vec<SocketAddr>) -> Self {
        Self {
            host,
            port,
            family,
            addrs: ArcSwap::from_pointee(addrs),
            next: AtomicUsize::new(0),
            ejections: Ejections::default(),
            last_note: Mutex::default(),
        }
    }

    /// Log `note` unless it is what was logged last for this name.
    fn note(&self, note: String, warn_level: bool) {
        let mut last = self.last_note.lock().unwrap_or_else(|e| e.into_inner());
        if *last != note {
            if warn_level {
                warn!("dns: {note}");
            } else {
                info!("dns: {note}");
            }
            *last = note;
        }
    }

    /// A fixed address: IP literals in the config never go through DNS.
    pub fn fixed(ip: IpAddr, port: u16) -> Arc<Self> {
        Arc::new(Self::new(
            ip.to_string(),
            port,
            AddressFamily::Auto,
            vec![SocketAddr::new(ip, port)],
        ))
    }

    /// Next address in round-robin order, or `None` if the name never resolved.
    pub fn pick(&self) -> Option<SocketAddr> {
        let addrs = self.addrs.load();
        if addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(addrs[i % addrs.len()])
    }

    /// Whether an address not in `tried` is usable now (neither ejected
    /// nor on trial): where a failed request can go next.
    pub fn has_usable(&self, tried: &[SocketAddr]) -> bool {
        let addrs = self.addrs.load();
        let now = Instant::now();
        addrs.iter().any(|a| {
            !tried.contains(a) && (self.ejections.none() || !self.ejections.is_ejected(*a, now))
        })
    }

    /// The address a connect goes to: the next in round-robin order that
    /// is neither ejected nor in `tried`, an address whose ejection just
    /// ended to one connect at a time ([`Ejections::take`]); with none
    /// usable, any address (the upstream was chosen with nothing better,
    /// or while another request was taking the last usable one for its
    /// trial: a window of microseconds).
    /// `None` only when the name never resolved. One rule for both
    /// carriers.
    pub fn choose(&self, tried: &[SocketAddr]) -> Option<SocketAddr> {
        let addrs = self.addrs.load();
        if addrs.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        if tried.is_empty() && self.ejections.none() {
            return Some(addrs[start % addrs.len()]);
        }
        let now = Instant::now();
        (0..addrs.len())
            .map(|k| addrs[(start + k) % addrs.len()])
            .find(|a| !tried.contains(a) && self.ejections.take(*a, now))
            .or(Some(addrs[start % addrs.len()]))
    }

    /// Whether `addr` is out of the rotation now.
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        !self.ejections.none() && self.ejections.is_ejected(addr, Instant::now())
    }

    /// Whether the name is not out of the rotation: not every one of its
    /// addresses ejected. (A name that never resolved is not ejected: it
    /// fails over as a connect failure, where that is counted.)
    pub fn usable(&self) -> bool {
        self.ejections.none()
            || self
                .ejections
                .any_usable(&self.addrs.load(), Instant::now())
    }

    pub fn addresses(&self) -> Arc<Vec<SocketAddr>> {
        self.addrs.load_full()
    }

    pub fn has_addresses(&self) -> bool {
        !self.addrs.load().is_empty()
    }

    /// Whether `addr` is one of the name's current addresses (a held
    /// connection to an address that left the answer is not reused).
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.addrs.load().contains(&addr)
    }

    /// (active, ejected) among the current addresses.
    pub fn states(&self) -> (usize, usize) {
        let addrs = self.addrs.load();
        if self.ejections.none() {
            return (addrs.len(), 0);
        }
        let now = Instant::now();
        let ejected = addrs
            .iter()
            .filter(|a| self.ejections.is_ejected(**a, now))
            .count();
        (addrs.len() - ejected, ejected)
    }
}

/// Why an address of an answer is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// `0.0.0.0`, `::`, multicast, broadcast: nothing to connect to.
    Unusable,
    /// Beyond [`MAX_ADDRESSES`].
    OverCap,
    /// This host has no route to it (`auto` only).
    Unroutable,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Dropped::Unusable => "unusable",
            Dropped::OverCap => "over_cap",
            Dropped::Unroutable => "unroutable",
        }
    }
}

fn unusable(ip: IpAddr) -> bool {
    ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// Whether this host has a route to `addr`: a UDP socket `connect`, which
/// only looks the route up. Fails with ENETUNREACH / EADDRNOTAVAIL /
/// EAFNOSUPPORT where the family (or that network) is unreachable.
pub fn routable(addr: SocketAddr) -> bool {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(local)
        .and_then(|s| s.connect(addr))
        .is_ok()
}

/// The addresses of an answer that are used, sorted, and those that are
/// not, with why. `route`: whether the host can reach an address (only
/// asked with `auto`). Family filtering (`ipv4`/`ipv6`) is not a drop: the
/// operator asked for it.
pub fn clean(
    answer: Vec<SocketAddr>,
    family: AddressFamily,
    route: impl Fn(SocketAddr) -> bool,
) -> (Vec<SocketAddr>, Vec<(SocketAddr, Dropped)>) {
    let mut dropped = Vec::new();
    let mut kept: Vec<SocketAddr> = Vec::with_capacity(answer.len());
    for a in answer {
        if !family.admits(a.ip()) || kept.contains(&a) {
            continue;
        }
        if unusable(a.ip()) {
            dropped.push((a, Dropped::Unusable));
        } else {
            kept.push(a);
        }
    }
    if family == AddressFamily::Auto {
        let (reach, unreach): (Vec<_>, Vec<_>) = kept.into_iter().partition(|a| route(*a));
        // None routable: keep them all, so the failure shows as a connect
        // error on this upstream rather than as an empty answer.
        if reach.is_empty() {
            kept = unreach;
        } else {
            kept = reach;
            dropped.extend(unreach.into_iter().map(|a| (a, Dropped::Unroutable)));
        }
    }
    if kept.len() > MAX_ADDRESSES {
        // Alternate the families (RFC 8305 section 4), so the cap never
        // drops a whole family.
        let (v6, v4): (Vec<_>, Vec<_>) = kept.iter().partition(|a| a.is_ipv6());
        let mut both = Vec::with_capacity(kept.len());
        for i in 0..v6.len().max(v4.len()) {
            both.extend(v6.get(i));
            both.extend(v4.get(i));
        }
        dropped.extend(both[MAX_ADDRESSES..].iter().map(|a| (*a, Dropped::OverCap)));
        both.truncate(MAX_ADDRESSES);
        kept = both;
    }
    kept.sort();
    (kept, dropped)
}

/// Owns the set of names in use and refreshes them.
pub struct Resolver {
    hosts_file: Option<PathBuf>,
    /// Weak, so names dropped by a reload stop being refreshed.
    names: Mutex<HashMap<(String, u16, AddressFamily), Weak<ResolvedName>>>,
    metrics: DnsMetrics,
    /// Bad lines in the hosts file at the last read, logged on a change.
    hosts_bad_lines: Mutex<usize>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("hosts_file", &self.hosts_file)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver whose counters are registered nowhere.
    pub fn new(hosts_file: Option<PathBuf>) -> Self {
        Self::with_metrics(hosts_file, DnsMetrics::unregistered())
    }

    pub fn with_metrics(hosts_file: Option<PathBuf>, metrics: DnsMetrics) -> Self {
        Self {
            hosts_file,
            names: Mutex::default(),
            metrics,
            hosts_bad_lines: Mutex::new(0),
        }
    }

    /// The process entry for `host:port`; a reload that keeps a name keeps its
    /// addresses (and so its pooled connections).
    pub fn entry(&self, host: &str, port: u16, family: AddressFamily) -> Arc<ResolvedName> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let key = (host.to_string(), port, family);
        if let Some(existing) = names.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        let fresh = Arc::new(ResolvedName::new(
            host.to_string(),
            port,
            family,
            Vec::new(),
        ));
        names.insert(key, Arc::downgrade(&fresh));
        fresh
    }

    fn live_names(&self) -> Vec<Arc<ResolvedName>> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.retain(|_, w| w.strong_count() > 0);
        names.values().filter_map(Weak::upgrade).collect()
    }

    /// Re-resolve every live name; with `only_unresolved`, just the ones that
    /// have no address yet (new names after a reload).
    pub async fn refresh(&self, only_unresolved: bool) {
        let hosts = self.read_hosts_file().await;
        for name in self.live_names() {
            if only_unresolved && name.has_addresses() {
                continue;
            }
            let answer = self.lookup(&hosts, &name.host, name.port).await;
            self.install(&name, answer);
        }
    }

    /// Use an answer for `name`: cleaned, counted, logged on a change; an
    /// empty or failed one keeps the last good addresses.
    fn install(&self, name: &ResolvedName, answer: io::Result<Vec<SocketAddr>>) {
        let result = |r: &str| {
            self.metrics
                .lookups
                .with_label_values(&[&name.host, r])
                .inc()
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                result("failed");
                let note = format!(
                    "cannot resolve {}: {e}; keeping {:?}",
                    name.host,
                    name.addresses()
                );
                return name.note(note, true);
            }
        };
        let (addrs, dropped) = clean(answer, name.family, routable);
        for (_, why) in &dropped {
            self.metrics
                .dropped
                .with_label_values(&[&name.host, why.label()])
                .inc();
        }
        let dropped_text = if dropped.is_empty() {
            String::new()
        } else {
            let shown: Vec<String> = dropped
                .iter()
                .map(|(a, why)| format!("{} ({})", a.ip(), why.label()))
                .collect();
            format!("; not using {}", shown.join(", "))
        };
        if addrs.is_empty() {
            result("empty");
            let note = format!(
                "{} resolved to no usable {} address{dropped_text}; keeping {:?}",
                name.host,
                name.family.label(),
                name.addresses()
            );
            return name.note(note, true);
        }
        let changed = *name.addresses() != addrs;
        result(if changed { "changed" } else { "unchanged" });
        let note = format!(
            "{}:{} resolves to {addrs:?}{dropped_text}",
            name.host, name.port
        );
        name.note(note, !dropped.is_empty());
        if changed {
            name.addrs.store(Arc::new(addrs));
        }
    }

    async fn lookup(
        &self,
        hosts: &HashMap<String, Vec<IpAddr>>,
        host: &str,
        port: u16,
    ) -> io::Result<Vec<SocketAddr>> {
        if let Some(ips) = hosts.get(host) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        // getaddrinfo on tokio's blocking pool, bounded so a hung resolver
        // cannot stall the refresh loop.
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::lookup_host((host, port)),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "DNS lookup timed out"))??;
        Ok(answer.collect())
    }

    async fn read_hosts_file(&self) -> HashMap<String, Vec<IpAddr>> {
        let Some(path) = &self.hosts_file else {
            return HashMap::new();
        };
        match tokio::fs::read_to_string(path).await {
            Ok(text) => {
                let (map, bad) = parse_hosts(&text);
                self.metrics.hosts_file_bad_lines.inc_by(bad.len() as u64);
                let mut last = self
                    .hosts_bad_lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if *last != bad.len() {
                    if let Some(first) = bad.first() {
                        warn!(
                            "dns: hosts file {}: {} line(s) ignored, not `IP name...` (first: line {first})",
                            path.display(),
                            bad.len()
                        );
                    }
                    *last = bad.len();
                }
                map
            }
            Err(e) => {
                warn!("dns: cannot read hosts file {}: {e}", path.display());
                HashMap::new()
            }
        }
    }
}

/// `/etc/hosts` format: `IP name [name...]`, `#` comments. Also the numbers
/// (1-based) of the lines that are none of these: ignored, and reported.
pub fn parse_hosts(text: &str) -> (HashMap<String, Vec<IpAddr>>, Vec<usize>) {
    let mut map: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        let ip = match first.parse::<IpAddr>() {
            Ok(ip) if fields.clone().next().is_some() => ip,
            _ => {
                bad.push(n + 1);
                continue;
            }
        };
        for name in fields {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            map.entry(name).or_default().push(ip);
        }
    }
    (map, bad)
}

/// Background service: refresh all names every `interval`.
pub struct DnsRefresh {
    pub resolver: Arc<Resolver>,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for DnsRefresh {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; startup already resolved
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => self.resolver.refresh(false).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_format() {
        let (map, bad) = parse_hosts(
            "# comment\n127.0.0.1 a.test B.test. # x\n::1 a.test\nnot-an-ip c.test\n\n10.0.0.1\n",
        );
        assert_eq!(bad, vec![4, 6]);
        assert_eq!(
            map["a.test"],
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(map["b.test"], vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(!map.contains_key("c.test"));
    }

    #[tokio::test]
    async fn failed_lookup_keeps_last_good_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.2 edge.invalid\n").unwrap();
        let resolver = Resolver::new(Some(hosts.clone()));
        let name = resolver.entry("edge.invalid", 443, AddressFamily::Auto);
        resolver.refresh(false).await;
        assert_eq!(name.pick(), Some("127.0.0.2:443".parse().unwrap()));
        std::fs::write(&hosts, "127.0.0.3 edge.invalid\n").unwrap();
        resolver.refresh(false).await;
        assert_eq!(name.pick(), Some("127.0.0.3:443".parse().unwrap()));
        // Both names leave the hosts file; DNS knows neither (`.invalid` never
        // resolves, RFC 6761), so edge.invalid keeps its last good address.
        let gone = resolver.entry("nowhere.invalid", 443, AddressFamily::Auto);
        std::fs::write(&hosts, "").unwrap();
        resolver.refresh(false).await;
        assert_eq!(gone.pick(), None);
        assert_eq!(name.pick(), Some("127.0.0.3:443".parse().unwrap()));
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn answers_are_cleaned() {
        let answer = vec![
            sa("0.0.0.0:443"),
            sa("[::]:443"),
            sa("224.0.0.1:443"),
            sa("255.255.255.255:443"),
            sa("10.0.0.2:443"),
            sa("10.0.0.1:443"),
            sa("10.0.0.1:443"),
            sa("[2001:db8::1]:443"),
        ];
        let all = |_| true;
        let (kept, dropped) = clean(answer.clone(), AddressFamily::Auto, all);
        assert_eq!(
            kept,
            vec![
                sa("10.0.0.1:443"),
                sa("10.0.0.2:443"),
                sa("[2001:db8::1]:443")
            ]
        );
        assert_eq!(dropped.len(), 4);
        assert!(dropped.iter().all(|(_, d)| *d == Dropped::Unusable));
        let (v4, _) = clean(answer.clone(), AddressFamily::Ipv4, all);
        assert_eq!(v4, vec![sa("10.0.0.1:443"), sa("10.0.0.2:443")]);
        let (v6, _) = clean(answer.clone(), AddressFamily::Ipv6, all);
        assert_eq!(v6, vec![sa("[2001:db8::1]:443")]);
        // auto: the family the host cannot reach is dropped ...
        let (kept, dropped) = clean(answer.clone(), AddressFamily::Auto, |a| a.is_ipv4());
        assert_eq!(kept, vec![sa("10.0.0.1:443"), sa("10.0.0.2:443")]);
        assert!(dropped.contains(&(sa("[2001:db8::1]:443"), Dropped::Unroutable)));
        // ... unless nothing is reachable: then all stay, to fail visibly.
        let (kept, _) = clean(answer, AddressFamily::Auto, |_| false);
        assert_eq!(kept.len(), 3);
    }

    #[test]
    fn hundreds_of_addresses_are_capped_keeping_both_families() {
        let mut answer: Vec<SocketAddr> = (0..300u16)
            .map(|i| SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 443)))
            .collect();
        answer.push(sa("[2001:db8::1]:443"));
        answer.push(sa("[2001:db8::2]:443"));
        let (kept, dropped) = clean(answer, AddressFamily::Auto, |_| true);
        assert_eq!(kept.len(), MAX_ADDRESSES);
        assert_eq!(kept.iter().filter(|a| a.is_ipv6()).count(), 2);
        assert_eq!(dropped.len(), 302 - MAX_ADDRESSES);
        assert!(dropped.iter().all(|(_, d)| *d == Dropped::OverCap));
    }

    #[test]
    fn loopback_is_routable() {
        // The unroutable half needs a host without a route: the network
        // namespace test in tests/addresses.rs.
        assert!(routable(sa("127.0.0.1:443")));
    }

    #[tokio::test]
    async fn a_bad_answer_keeps_the_last_good_addresses_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.2 edge.invalid\n").unwrap();
        let metrics = crate::observe::metrics::Metrics::new();
        let resolver = Resolver::with_metrics(Some(hosts.clone()), metrics.dns());
        let name = resolver.entry("edge.invalid", 443, AddressFamily::Auto);
        resolver.refresh(false).await;
        assert_eq!(name.pick(), Some(sa("127.0.0.2:443")));
        std::fs::write(
            &hosts,
            "0.0.0.0 edge.invalid\n:: edge.invalid\ngarbage\n\u{0}\u{1}zz\n",
        )
        .unwrap();
        resolver.refresh(false).await;
        assert_eq!(name.pick(), Some(sa("127.0.0.2:443")), "last good kept");
        let dns = metrics.dns();
        assert_eq!(
            dns.lookups
                .with_label_values(&["edge.invalid", "empty"])
                .get(),
            1
        );
        assert_eq!(
            dns.dropped
                .with_label_values(&["edge.invalid", "unusable"])
                .get(),
            2
        );
        assert_eq!(dns.hosts_file_bad_lines.get(), 2);
    }
}

//! Upstream name resolution, kept off the request path.
//!
//! Each upstream holds an `Arc<ResolvedName>`; the request path only reads its
//! current address list (one atomic load). A background service re-resolves
//! every name each `dns_refresh`; a failed or empty answer keeps the last good
//! addresses, because an upstream that loses its addresses to a DNS blip would
//! fail every request for nothing.
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

use crate::shift::endpoints::Ejections;

/// The current addresses of one `name:port`.
#[derive(Debug)]
pub struct ResolvedName {
    pub host: String,
    pub port: u16,
    addrs: ArcSwap<Vec<SocketAddr>>,
    /// Round-robin cursor across the name's addresses.
    next: AtomicUsize,
    /// Addresses out of the rotation after failed connects.
    pub ejections: Ejections,
}

impl ResolvedName {
    fn new(host: String, port: u16, addrs: Vec<SocketAddr>) -> Self {
        Self {
            host,
            port,
            addrs: ArcSwap::from_pointee(addrs),
            next: AtomicUsize::new(0),
            ejections: Ejections::default(),
        }
    }

    /// A fixed address: IP literals in the config never go through DNS.
    pub fn fixed(ip: IpAddr, port: u16) -> Arc<Self> {
        Arc::new(Self::new(
            ip.to_string(),
            port,
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

    /// The next address in round-robin order that is neither ejected nor
    /// in `tried`; `None` when there is none (or the name never resolved).
    pub fn pick_usable(&self, tried: &[SocketAddr]) -> Option<SocketAddr> {
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
            .find(|a| !tried.contains(a) && !self.ejections.is_ejected(*a, now))
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
}

/// Owns the set of names in use and refreshes them.
#[derive(Debug, Default)]
pub struct Resolver {
    hosts_file: Option<PathBuf>,
    /// Weak, so names dropped by a reload stop being refreshed.
    names: Mutex<HashMap<(String, u16), Weak<ResolvedName>>>,
}

impl Resolver {
    pub fn new(hosts_file: Option<PathBuf>) -> Self {
        Self {
            hosts_file,
            names: Mutex::default(),
        }
    }

    /// The process entry for `host:port`; a reload that keeps a name keeps its
    /// addresses (and so its pooled connections).
    pub fn entry(&self, host: &str, port: u16) -> Arc<ResolvedName> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let key = (host.to_string(), port);
        if let Some(existing) = names.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        let fresh = Arc::new(ResolvedName::new(host.to_string(), port, Vec::new()));
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
            match self.lookup(&hosts, &name.host, name.port).await {
                Ok(mut addrs) if !addrs.is_empty() => {
                    addrs.sort();
                    addrs.dedup();
                    if *name.addresses() != addrs {
                        info!(
                            "dns: {}:{} now resolves to {:?}",
                            name.host, name.port, addrs
                        );
                        name.addrs.store(Arc::new(addrs));
                    }
                }
                Ok(_) => warn!(
                    "dns: {} resolved to no address; keeping {:?}",
                    name.host,
                    name.addresses()
                ),
                Err(e) => warn!(
                    "dns: cannot resolve {}: {e}; keeping {:?}",
                    name.host,
                    name.addresses()
                ),
            }
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
            Ok(text) => parse_hosts(&text),
            Err(e) => {
                warn!("dns: cannot read hosts file {}: {e}", path.display());
                HashMap::new()
            }
        }
    }
}

/// `/etc/hosts` format: `IP name [name...]`, `#` comments.
pub fn parse_hosts(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut map: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(ip) = fields.next().and_then(|f| f.parse::<IpAddr>().ok()) else {
            continue;
        };
        for name in fields {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            map.entry(name).or_default().push(ip);
        }
    }
    map
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
        let map =
            parse_hosts("# comment\n127.0.0.1 a.test B.test. # x\n::1 a.test\nnot-an-ip c.test\n");
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
        let name = resolver.entry("edge.invalid", 443);
        resolver.refresh(false).await;
        assert_eq!(name.pick(), Some("127.0.0.2:443".parse().unwrap()));
        std::fs::write(&hosts, "127.0.0.3 edge.invalid\n").unwrap();
        resolver.refresh(false).await;
        assert_eq!(name.pick(), Some("127.0.0.3:443".parse().unwrap()));
        // Both names leave the hosts file; DNS knows neither (`.invalid` never
        // resolves, RFC 6761), so edge.invalid keeps its last good address.
        let gone = resolver.entry("nowhere.invalid", 443);
        std::fs::write(&hosts, "").unwrap();
        resolver.refresh(false).await;
        assert_eq!(gone.pick(), None);
        assert_eq!(name.pick(), Some("127.0.0.3:443".parse().unwrap()));
    }
}

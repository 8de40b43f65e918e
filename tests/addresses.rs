//! A CloudFront name as it really is: several addresses in two families,
//! some of them dead. cutover runs in a network namespace of the test's own
//! (so the edge can have four IPv4 and four IPv6 addresses without touching
//! the host's), the rehearsal edge listens on the host side of the veth
//! link, and the old distribution waits as a backup at weight 0.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::*;
use cutover::rehearsal::demo::{distributions, NEW_DIST, NEW_NAME, OLD_DIST, PUBLIC_NAME};
use cutover::rehearsal::edge::{AddressMode, Edge};
use cutover::rehearsal::pki::TestCa;
use cutover::shift::probe::{self, Target, TlsTarget};

/// The connect timeout of the new distribution's upstream: a blackholed
/// address costs a request up to twice this (TCP connect, then TLS).
const CONNECT: Duration = Duration::from_secs(1);

struct Migration {
    _dir: tempfile::TempDir,
    ns: Netns,
    new: Edge,
    old: Edge,
    proxy: Proxy,
    v4: Vec<SocketAddr>,
    v6: Vec<SocketAddr>,
}

/// d-new on 4 IPv4 + 4 IPv6 host-side addresses, d-old on one more, cutover
/// in the namespace (`ipv6`: whether the namespace has IPv6 at all).
async fn migration(ipv6: bool) -> Migration {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("address test CA").unwrap();
    let ca_path = ca.write_cert(dir.path()).unwrap();
    let ns = Netns::create(ipv6);
    let mut binds: Vec<SocketAddr> = (1..=4).map(|k| SocketAddr::new(ns.host_v4(k), 0)).collect();
    binds.extend((1..=4).map(|k| SocketAddr::new(ns.host_v6(k), 0)));
    let new = Edge::start_on(&binds, &ca, distributions()).await.unwrap();
    let old = Edge::start(SocketAddr::new(ns.host_v4(9), 0), &ca, distributions())
        .await
        .unwrap();
    let addrs = new.addrs();
    let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.iter().partition(|a| a.is_ipv4());
    let hosts = dir.path().join("hosts");
    let mut text = format!(
        "# d-new: 4 A + 4 AAAA, as CloudFront answers\n{} {OLD_DIST}\n",
        old.addr().ip()
    );
    for a in &addrs {
        text.push_str(&format!("{} {NEW_DIST}\n", a.ip()));
    }
    std::fs::write(&hosts, text).unwrap();
    let listen = SocketAddr::new(ns.inside(), 8080);
    let admin = SocketAddr::new(ns.inside(), 9090);
    let d = dir.path().display();
    let ca_file = ca_path.display();
    let yaml = format!(
        "phase: addresses\n\
         listeners:\n  - address: {listen}\n\
         admin:\n  address: {admin}\n\
         server:\n  threads: 2\n  grace_period: 1s\n  graceful_shutdown_timeout: 2s\n  upgrade_sock: {d}/upgrade.sock\n  pid_file: {d}/cutover.pid\n\
         routes:\n  - name: cdn\n    hosts: [{PUBLIC_NAME}]\n    upstreams:\n\
         \x20     - name: new-cloudfront\n        address: {NEW_DIST}:{port}\n        host_header: {NEW_NAME}\n        ca_file: {ca_file}\n        timeouts: {{ connect: 1s }}\n\
         \x20     - name: old-cloudfront\n        address: {OLD_DIST}:{old_port}\n        sni: {PUBLIC_NAME}\n        ca_file: {ca_file}\n        weight: 0\n        backup: true\n",
        port = addrs[0].port(),
        old_port = old.addr().port(),
    );
    let proxy = Proxy::start_in_netns(&ns.name, dir.path(), &yaml, listen, admin, Some(&hosts));
    Migration {
        _dir: dir,
        ns,
        new,
        old,
        proxy,
        v4,
        v6,
    }
}

/// What a load of GETs saw.
#[derive(Debug, Default)]
struct Load {
    sent: usize,
    errors: Vec<String>,
    /// Answers not from the new distribution.
    not_new: usize,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Load {
    fn absorb(&mut self, other: Load) {
        self.sent += other.sent;
        self.errors.extend(other.errors);
        self.not_new += other.not_new;
        self.latencies.extend(other.latencies);
        self.elapsed = self.elapsed.max(other.elapsed);
    }

    fn quantile(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }
}

/// `keep_alive` clients on one connection each and `per_request` clients
/// opening a connection per request, `each` GETs per client, `want` the
/// marker every answer must carry.
async fn load(
    proxy: SocketAddr,
    keep_alive: usize,
    per_request: usize,
    each: usize,
    want: &'static str,
) -> Load {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..keep_alive + per_request {
        let fresh = c >= keep_alive;
        tasks.spawn(async move {
            let mut seen = Load::default();
            let mut client = None;
            for _ in 0..each {
                let t = Instant::now();
                seen.sent += 1;
                if fresh || client.is_none() {
                    client = match Client::connect(proxy).await {
                        Ok(c) => Some(c),
                        Err(e) => {
                            seen.errors.push(format!("connect: {e}"));
                            continue;
                        }
                    };
                }
                let c = client.as_mut().unwrap();
                match c.get(PUBLIC_NAME, "/ruok", &[]).await {
                    Ok(a) if a.status == 200 => {
                        if a.body != want {
                            seen.not_new += 1;
                        }
                    }
                    Ok(a) => seen.errors.push(format!("{} {}", a.status, a.body)),
                    Err(e) => {
                        seen.errors.push(format!("{e}"));
                        client = None;
                    }
                }
                seen.latencies.push(t.elapsed());
            }
            seen
        });
    }
    let mut all = Load::default();
    while let Some(done) = tasks.join_next().await {
        all.absorb(done.unwrap());
    }
    all.elapsed = started.elapsed();
    all
}

/// `clients` clients sending `each` requests with a chunked body (each on a
/// new connection, with a method the fast path hands to the Pingora path).
async fn posts(proxy: SocketAddr, clients: usize, each: usize) -> Load {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(async move {
            let mut seen = Load::default();
            for _ in 0..each {
                let t = Instant::now();
                seen.sent += 1;
                let mut answer = Vec::new();
                let sent = async {
                    let mut c = tokio::net::TcpStream::connect(proxy).await?;
                    c.write_all(
                        format!(
                            "{VIA_PINGORA} /echo HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nTransfer-Encoding: chunked\r\n\
                             Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await?;
                    c.read_to_end(&mut answer).await
                };
                if let Err(e) = sent.await {
                    seen.errors.push(format!("{VIA_PINGORA}: {e}"));
                    continue;
                }
                let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
                // The body echoed back, chunked as it came.
                let echoed = text.ends_with("\r\n5\r\nhello\r\n0\r\n\r\n");
                if !text.starts_with("http/1.1 200") || !echoed {
                    seen.errors
                        .push(text.lines().next().unwrap_or("").to_string());
                } else if !text.contains("x-edge-distribution: d-new\r\n") {
                    seen.not_new += 1;
                }
                seen.latencies.push(t.elapsed());
            }
            seen
        });
    }
    let mut all = Load::default();
    while let Some(done) = tasks.join_next().await {
        all.absorb(done.unwrap());
    }
    all
}

fn labels(upstream: &str) -> [(&str, &str); 2] {
    [("route", "cdn"), ("upstream", upstream)]
}

/// The acceptance run of both namespaces: two IPv4 addresses refusing, one
/// blackholed; 5,000 GETs from keep-alive and connect-per-request clients;
/// then every address of d-new dead.
async fn dead_addresses_never_send_traffic_to_the_old_distribution(ipv6: bool) {
    let m = migration(ipv6).await;
    m.new.set_mode(m.v4[1], AddressMode::Refuse).await.unwrap();
    m.new.set_mode(m.v4[2], AddressMode::Refuse).await.unwrap();
    m.new
        .set_mode(m.v4[3], AddressMode::Blackhole)
        .await
        .unwrap();

    // 8 keep-alive clients x 375 + 8 connect-per-request clients x 250.
    let keep = load(m.proxy.listen, 8, 0, 375, "ok-new-cdn");
    let fresh = load(m.proxy.listen, 0, 8, 250, "ok-new-cdn");
    // And requests with bodies, on the Pingora path, at the same time.
    let post = posts(m.proxy.listen, 2, 50);
    let (keep, fresh, post) = tokio::join!(keep, fresh, post);
    assert!(post.errors.is_empty(), "bodies: {:?}", post.errors);
    assert_eq!((post.sent, post.not_new), (100, 0), "bodies all to d-new");
    let mut all = keep;
    all.absorb(fresh);
    let metrics = m.proxy.metrics().await;
    eprintln!(
        "ipv6={ipv6}: {} GETs in {:.1?}: {} errors, {} not from d-new; p50 {:.1?} p99 {:.1?} max {:.1?}",
        all.sent,
        all.elapsed,
        all.errors.len(),
        all.not_new,
        all.quantile(0.5),
        all.quantile(0.99),
        all.quantile(1.0)
    );
    assert_eq!(all.sent, 5000);
    assert!(
        all.errors.is_empty(),
        "{:?}\n{}",
        &all.errors[..all.errors.len().min(5)],
        m.proxy.log()
    );
    assert_eq!(all.not_new, 0, "answers from the old distribution");
    assert_eq!(m.old.arrived(), 0, "the old distribution got requests");
    let old_served = sample_sum(
        &metrics
            .lines()
            .filter(|l| l.contains("upstream=\"old-cloudfront\""))
            .collect::<Vec<_>>()
            .join("\n"),
        "cutover_requests_total",
    );
    assert_eq!(old_served, 0.0, "{metrics}");
    let ejections = sample(
        &metrics,
        "cutover_upstream_address_ejections_total",
        &labels("new-cloudfront"),
    )
    .unwrap();
    assert!(
        ejections >= 3.0,
        "two refusing and one blackholed address: {ejections}\n{metrics}"
    );
    let failovers = sample_sum(&metrics, "cutover_upstream_failovers_total");
    assert_eq!(failovers, 0.0, "no request may leave d-new: {metrics}");
    // A request waits for the blackholed address at most once (its connect
    // and TLS budget, 2 x CONNECT), and only requests that picked it before
    // it was ejected (or in the moment its ejection ends) wait at all.
    let slow = all.latencies.iter().filter(|l| **l >= CONNECT).count();
    let periods = 1 + (all.elapsed.as_secs() / 5) as usize;
    assert!(
        all.quantile(1.0) < 3 * CONNECT,
        "a request waited twice: {:?}",
        all.quantile(1.0)
    );
    assert!(
        slow <= 16 * periods,
        "{slow} requests waited for the blackhole in {periods} ejection periods"
    );
    if !ipv6 {
        // The AAAA answers were dropped as unroutable, never tried.
        let dropped = sample(
            &metrics,
            "cutover_dns_addresses_dropped_total",
            &[("name", NEW_DIST), ("reason", "unroutable")],
        );
        assert!(dropped.is_some_and(|d| d >= 4.0), "{metrics}");
        assert_eq!(
            m.new.seen().iter().filter(|s| s.path == "/ruok").count(),
            5000
        );
    } else {
        // Both families served.
        let active = sample(
            &metrics,
            "cutover_upstream_addresses",
            &[
                ("route", "cdn"),
                ("upstream", "new-cloudfront"),
                ("state", "active"),
            ],
        );
        assert!(active.is_some_and(|a| a >= 5.0), "{metrics}");
    }

    // Every address of d-new dead: the backup serves, counted as a failover,
    // and /readyz names the upstream with no live address.
    for a in [m.v4[0]].iter().chain(&m.v6) {
        m.new.set_mode(*a, AddressMode::Refuse).await.unwrap();
    }
    let dead = load(m.proxy.listen, 4, 0, 25, "ok-old-cdn").await;
    assert!(dead.errors.is_empty(), "{:?}", dead.errors);
    assert_eq!(dead.not_new, 0, "every answer from the old distribution");
    let metrics = m.proxy.metrics().await;
    let failovers = sample_sum(&metrics, "cutover_upstream_failovers_total");
    assert!(failovers >= 100.0, "{metrics}");
    let ready = m.proxy.admin_get("/readyz").await;
    let body = ready.body_text();
    assert_eq!(ready.status.as_u16(), 200, "the backup serves: {body}");
    assert!(
        body.contains("route cdn upstream new-cloudfront: no live address"),
        "{body}"
    );
    drop(m.proxy);
    drop(m.ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_a_and_four_aaaa_with_three_dead_serve_everything_from_the_new_distribution() {
    dead_addresses_never_send_traffic_to_the_old_distribution(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_host_without_ipv6_the_aaaa_addresses_are_never_tried() {
    dead_addresses_never_send_traffic_to_the_old_distribution(false).await;
}

/// A CA (its certificate in a fresh folder) and an edge on 127.0.0.1 and
/// 127.0.0.2, one port.
async fn loopback_edge() -> (tempfile::TempDir, std::path::PathBuf, Edge) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("loopback edge CA").unwrap();
    let ca_path = ca.write_cert(dir.path()).unwrap();
    let binds: [SocketAddr; 2] = [
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.2:0".parse().unwrap(),
    ];
    let edge = Edge::start_on(&binds, &ca, distributions()).await.unwrap();
    (dir, ca_path, edge)
}

/// The rehearsal edge itself: CloudFront's fields, its own 403 and 421,
/// idle connections closed, and each address's switch.
#[tokio::test]
async fn the_rehearsal_edge_behaves_like_cloudfront() {
    let (_dir, ca_path, edge) = loopback_edge().await;
    let [a, b] = [edge.addrs()[0], edge.addrs()[1]];
    assert_eq!(a.port(), b.port());
    let get = |addr: SocketAddr, sni: &str, host: &str, path: &str| {
        let target = Target {
            connect: addr,
            tls: Some(TlsTarget {
                sni: sni.into(),
                ca_files: vec![ca_path.clone()],
                system_roots: false,
                verify: true,
            }),
            host: host.into(),
            path: path.into(),
        };
        async move { probe::get(&target, Duration::from_millis(1500)).await }
    };
    let field = |r: &probe::Reply, name: &str| {
        r.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let first = get(a, NEW_NAME, NEW_NAME, "/ruok").await.unwrap();
    let second = get(b, NEW_NAME, NEW_NAME, "/ruok").await.unwrap();
    assert_eq!(field(&first, "x-cache"), "Miss from cloudfront");
    assert_eq!(field(&second, "x-cache"), "Hit from cloudfront");
    assert_ne!(
        field(&first, "x-amz-cf-pop"),
        field(&second, "x-amz-cf-pop")
    );
    assert_eq!(field(&first, "x-amz-cf-id").len(), 56);
    assert!(field(&first, "via").ends_with("(CloudFront)"));
    let unknown = get(a, NEW_NAME, "unknown.example.test", "/").await.unwrap();
    assert_eq!(unknown.status.as_u16(), 403);
    assert_eq!(field(&unknown, "server"), "CloudFront");
    assert_eq!(field(&unknown, "x-cache"), "Error from cloudfront");
    assert!(unknown
        .body_text()
        .contains("The request could not be satisfied"));
    let mismatch = get(a, PUBLIC_NAME, NEW_NAME, "/").await.unwrap();
    assert_eq!(mismatch.status.as_u16(), 421);
    assert_eq!(field(&mismatch, "x-cache"), "Error from cloudfront");

    // An idle keep-alive connection is closed by the edge after IDLE.
    let tcp = tokio::net::TcpStream::connect(a).await.unwrap();
    let mut connector =
        openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    connector.set_ca_file(&ca_path).unwrap();
    let ssl = connector
        .build()
        .configure()
        .unwrap()
        .into_ssl(NEW_NAME)
        .unwrap();
    let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    std::pin::Pin::new(&mut tls).connect().await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(format!("GET /ruok HTTP/1.1\r\nHost: {NEW_NAME}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("ok-new-cdn") {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
    let idle_from = Instant::now();
    let end = tokio::time::timeout(cutover::rehearsal::edge::IDLE * 2, tls.read(&mut buf))
        .await
        .expect("the edge keeps an idle connection open for more than twice IDLE");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert!(
        idle_from.elapsed() >= cutover::rehearsal::edge::IDLE - Duration::from_millis(500),
        "closed after {:?}",
        idle_from.elapsed()
    );

    // The switches.
    edge.set_mode(b, AddressMode::Refuse).await.unwrap();
    let refused = tokio::net::TcpStream::connect(b).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    edge.set_mode(b, AddressMode::Blackhole).await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(b).await.is_ok(),
        "a blackhole accepts TCP"
    );
    let e = get(b, NEW_NAME, NEW_NAME, "/ruok").await.unwrap_err();
    assert!(format!("{e:#}").contains("no answer"), "{e:#}");
    edge.set_mode(b, AddressMode::Reset).await.unwrap();
    assert!(
        get(b, NEW_NAME, NEW_NAME, "/ruok").await.is_err(),
        "reset after the handshake"
    );
    edge.set_mode(b, AddressMode::Serve).await.unwrap();
    assert_eq!(
        get(b, NEW_NAME, NEW_NAME, "/ruok")
            .await
            .unwrap()
            .body_text()
            .trim(),
        "ok-new-cdn"
    );
}

/// A keep-alive client's upstream connection dies with its address (the
/// edge address stops and closes it): the next request on that client
/// connection reconnects through the address choice, ejects the dead
/// address and is served by another address of the same distribution, not
/// answered 502 and not sent to the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_connection_whose_address_dies_moves_to_another_address() {
    let (dir, ca_path, edge) = loopback_edge().await;
    let port = edge.addr().port();
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 {NEW_DIST} {OLD_DIST}\n127.0.0.2 {NEW_DIST}\n"),
    )
    .unwrap();
    let log = dir.path().join("access.log");
    let upstreams = format!(
        "      - name: new-cloudfront\n        address: {NEW_DIST}:{port}\n        host_header: {NEW_NAME}\n        ca_file: {ca}\n\
         \x20     - name: old-cloudfront\n        address: {OLD_DIST}:{port}\n        sni: {PUBLIC_NAME}\n        ca_file: {ca}\n        weight: 0\n        backup: true\n",
        ca = ca_path.display()
    );
    let yaml = config_yaml(&edge.addr(), &ca_path, dir.path(), &upstreams).replacen(
        "routes:",
        &format!(
            "access_log: {{ format: json, path: {} }}\nroutes:",
            log.display()
        ),
        1,
    );
    let proxy = Proxy::start(dir.path(), &yaml, Some(&hosts));
    let last_addr = || -> String {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let line = text.lines().last().unwrap_or("{}").to_string();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["upstream_addr"].as_str().unwrap_or("").to_string()
    };
    let mut client = Client::connect(proxy.listen).await.unwrap();
    let first = client.get(PUBLIC_NAME, "/ruok", &[]).await.unwrap();
    assert_eq!(first.body, "ok-new-cdn");
    // The access-log writer flushes every 20 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut held = last_addr();
    while held.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        held = last_addr();
    }
    let held: SocketAddr = held.parse().expect("the first request's upstream address");
    edge.set_mode(held, AddressMode::Refuse).await.unwrap();
    let second = client.get(PUBLIC_NAME, "/ruok", &[]).await.unwrap();
    assert_eq!(
        (second.status, second.body.as_str()),
        (200, "ok-new-cdn"),
        "{}",
        proxy.log()
    );
    let m = proxy.metrics().await;
    assert_eq!(
        sample_sum(&m, "cutover_upstream_failovers_total"),
        0.0,
        "{m}"
    );
    // Served from the other address (the dead one was ejected if the
    // fresh connect tried it first).
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no second access-log record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(last_addr(), held.to_string());
}

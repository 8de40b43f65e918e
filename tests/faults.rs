//! What a production network does to a migration, on real sockets with real
//! servers: an edge (Debian's nginx over TLS) dying under load with the old
//! distribution as the backup, an origin closing its idle keep-alive
//! connections at any moment (the upstream side of the keep-alive race),
//! and through a fault relay ([`common::relay`]) or a network namespace of
//! the test's own: latency, stalls, cut connections, resets after the TLS
//! handshake, half-open connections, addresses whose packets vanish, a
//! slow link, a slow edge. For the faults on the wire, nginx doing
//! cutover's job through the same relay or namespace is the reference.
//!
//! Every request a client sent is accounted for: answered 200, or failed
//! and counted as a request that could not be sent again. A GET must never
//! fail while a backup answers (nginx's `proxy_next_upstream error`), and
//! the process must hold no more descriptors after the load than before.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nginx::Nginx;
use common::strict_origin::RawClient;
use common::*;
use cutover::rehearsal::demo::PUBLIC_NAME;
use cutover::rehearsal::pki::TestCa;

const NEW_EDGE: &str = "new-edge.example.test";
const OLD_EDGE: &str = "old-edge.example.test";

/// Descriptors the process holds now.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Two nginx edges over TLS answering `new` and `old`, and cutover with the
/// new one at weight 100 and the old one as its backup.
struct Edges {
    dir: tempfile::TempDir,
    new: Nginx,
    _old: Nginx,
    proxy: Proxy,
    /// The relay in front of the new edge, when there is one.
    relay: Option<common::relay::Relay>,
    ca_path: std::path::PathBuf,
}

async fn edges() -> Edges {
    edges_with("", None).await
}

/// [`edges`] with `new_body` added to the new edge's `server` block, and
/// cutover reaching the new edge through a relay with `faults`.
async fn edges_with(new_body: &str, faults: Option<common::relay::Faults>) -> Edges {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("faults CA").unwrap();
    let ca_path = ca.write_cert(dir.path()).unwrap();
    let issued = ca.issue(&[NEW_EDGE, OLD_EDGE]).unwrap();
    let (cert, key) = issued.write_pair(dir.path(), "edge").unwrap();
    let edge = |name: &str, says: &str, extra: &str| {
        Nginx::start(
            &dir.path().join(name),
            free_port(),
            Some((&cert, &key)),
            &format!("{extra}location / {{ return 200 \"{says}\\n\"; }}"),
        )
    };
    let new = edge("new", "new", new_body);
    let old = edge("old", "old", "");
    let relay = match faults {
        Some(f) => Some(common::relay::Relay::start(new.addr, f).await),
        None => None,
    };
    let upstream = |name: &str, addr: std::net::SocketAddr, host: &str, extra: &str| {
        format!(
            "      - name: {name}\n        address: {addr}\n        sni: {host}\n        host_header: {host}\n        ca_file: {ca}\n        timeouts: {{ connect: 1s, read: 10s, idle: 1s }}\n{extra}",
            ca = ca_path.display()
        )
    };
    let new_addr = relay.as_ref().map_or(new.addr, |r| r.addr);
    let yaml = config_yaml(
        &new.addr,
        &ca_path,
        dir.path(),
        &format!(
            "{}{}",
            upstream("new", new_addr, NEW_EDGE, ""),
            upstream(
                "old",
                old.addr,
                OLD_EDGE,
                "        weight: 0\n        backup: true\n"
            )
        ),
    );
    let proxy = Proxy::start(dir.path(), &yaml, None);
    Edges {
        dir,
        new,
        _old: old,
        proxy,
        relay,
        ca_path,
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    sent: u64,
    /// Answered 200, by the edge that answered.
    by_new: u64,
    by_old: u64,
    /// Answered 200 by someone saying neither (the rehearsal edge).
    by_other: u64,
    /// Everything else: what, for which request.
    failed: Vec<String>,
    /// Milliseconds per answered request.
    latencies: Vec<f64>,
    /// Pingora-path connections whose opening request (a method the fast
    /// path hands over, not idempotent) was answered 502: a request caught
    /// by the race, rightly not resent and counted `unsafe`; the client
    /// opened another connection.
    warmups_refused: u64,
}

impl Tally {
    fn absorb(&mut self, o: Tally) {
        self.sent += o.sent;
        self.by_new += o.by_new;
        self.by_other += o.by_other;
        self.by_old += o.by_old;
        self.failed.extend(o.failed);
        self.latencies.extend(o.latencies);
        self.warmups_refused += o.warmups_refused;
    }

    fn quantile(&mut self, q: f64) -> f64 {
        self.latencies.sort_by(f64::total_cmp);
        let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies.get(i).copied().unwrap_or(0.0)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Keep-alive GETs on the fast path.
    Get,
    /// Keep-alive GETs on the Pingora path (the connection opens with a
    /// request whose method the fast path hands over).
    PingoraGet,
    /// Keep-alive POSTs with a small body (the fast path).
    Post,
}

/// One client: requests until `stop`, a new connection after a failure;
/// with `pace`, a pause of 0-4 ms (varying per request, from that seed)
/// before each request.
async fn client(
    proxy: std::net::SocketAddr,
    kind: Kind,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicU64>,
    pace: Option<u64>,
) -> Tally {
    let mut t = Tally::default();
    let request = match kind {
        Kind::Get | Kind::PingoraGet => {
            format!("GET /fault HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n\r\n")
        }
        Kind::Post => {
            format!("POST /fault HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nContent-Length: 5\r\n\r\nhello")
        }
    };
    let open = || async {
        let mut c = RawClient::connect(proxy).await;
        if kind == Kind::PingoraGet {
            c.send(
                format!("{VIA_PINGORA} /warm HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
                    .as_bytes(),
            )
            .await;
            let answer = c.response(false).await?;
            if answer.status() != 200 {
                return Err(format!("warm-up answered {}", answer.status()));
            }
            Ok(c)
        } else {
            Ok(c)
        }
    };
    let mut conn = None;
    let mut n = pace.unwrap_or(0);
    while !stop.load(Ordering::Relaxed) {
        if pace.is_some() {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            tokio::time::sleep(Duration::from_micros((n >> 33) % 4000)).await;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => match open().await {
                Ok(c) => c,
                Err(e) if e == "warm-up POST answered 502" => {
                    t.warmups_refused += 1;
                    continue;
                }
                Err(e) => {
                    t.failed.push(format!("opening: {e}"));
                    continue;
                }
            },
        };
        t.sent += 1;
        let started = Instant::now();
        in_flight.fetch_add(1, Ordering::SeqCst);
        c.send(request.as_bytes()).await;
        let answer = c.response(false).await;
        in_flight.fetch_sub(1, Ordering::SeqCst);
        match answer {
            Ok(m) if m.status() == 200 => {
                t.latencies.push(started.elapsed().as_secs_f64() * 1e3);
                match &m.body[..] {
                    b"new\n" => t.by_new += 1,
                    b"old\n" => t.by_old += 1,
                    _ => t.by_other += 1,
                }
                // A keep-alive client honours `Connection: close` (nginx
                // sends it on a connection's 1000th answer).
                if !m
                    .header_str("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    conn = Some(c);
                }
            }
            Ok(m) => t.failed.push(format!("{}", m.status())),
            Err(e) => t.failed.push(e),
        }
    }
    t
}

/// `clients` paced keep-alive GET clients against `proxy` for `for_`:
/// what they saw, together.
async fn paced_gets(proxy: std::net::SocketAddr, clients: u64, for_: Duration) -> Tally {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let in_flight = Arc::new(AtomicU64::new(0));
            tokio::spawn(client(proxy, Kind::Get, stop.clone(), in_flight, Some(i)))
        })
        .collect();
    tokio::time::sleep(for_).await;
    stop.store(true, Ordering::Relaxed);
    let mut gets = Tally::default();
    for t in tasks {
        gets.absorb(t.await.unwrap());
    }
    gets
}

/// 12 keep-alive GET clients, 4 on the Pingora path and 2 POSTing through
/// `listen`; `new` frozen (SIGSTOP) with a request from each in flight,
/// then killed (SIGKILL), the load going on 1.5 s more: what the GETs and
/// the POSTs saw.
async fn freeze_and_kill(listen: std::net::SocketAddr, new: &mut Nginx) -> (Tally, Tally) {
    let stop = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicU64::new(0));
    let kinds = [Kind::Get; 12]
        .into_iter()
        .chain([Kind::PingoraGet; 4])
        .chain([Kind::Post; 2]);
    let tasks: Vec<_> = kinds
        .map(|k| {
            let t = tokio::spawn(client(listen, k, stop.clone(), in_flight.clone(), None));
            (k, t)
        })
        .collect();
    let clients = tasks.len() as u64;
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Frozen: every client's next request reaches it and waits.
    new.signal(libc::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_flight.load(Ordering::SeqCst) < clients {
        assert!(
            Instant::now() < deadline,
            "only {} of {clients} requests in flight at the frozen edge",
            in_flight.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let every request reach the edge's socket, then kill it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    new.signal(libc::SIGKILL);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut gets, mut posts) = (Tally::default(), Tally::default());
    for (k, t) in tasks {
        let seen = t.await.unwrap();
        if k == Kind::Post {
            posts.absorb(seen);
        } else {
            gets.absorb(seen);
        }
    }
    (gets, posts)
}

/// The sum of `name`'s samples whose labels include every one of `labels`.
fn summed(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The new edge is frozen with a request from every client in flight, then
/// killed: each GET in flight is sent again to the backup, each POST in
/// flight fails with 502 and is counted as not resent, and the load goes
/// on against the old edge without a failed GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_under_load_loses_no_get() {
    let Edges {
        dir,
        mut new,
        _old,
        proxy,
        relay: _,
        ca_path: _,
    } = edges().await;
    let fds_before = open_fds(proxy.pid());
    let (mut gets, posts) = freeze_and_kill(proxy.listen, &mut new).await;
    let m = proxy.metrics().await;
    let resent = summed(&m, "cutover_upstream_resends_total", &[("upstream", "new")]);
    let not_resent = summed(
        &m,
        "cutover_upstream_resends_total",
        &[("upstream", "new"), ("result", "unsafe")],
    );
    let (p50, p99, max) = (gets.quantile(0.5), gets.quantile(0.99), gets.quantile(1.0));
    eprintln!(
        "edge killed under load: {} GETs ({} new, {} old), {} failed; {} POSTs, {} failed; \
         resent {}, not resent {}; GET p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
        gets.sent,
        gets.by_new,
        gets.by_old,
        gets.failed.len(),
        posts.sent,
        posts.failed.len(),
        resent - not_resent,
        not_resent,
        p50,
        p99,
        max
    );
    assert!(gets.failed.is_empty(), "GETs failed: {:?}", gets.failed);
    assert!(
        gets.by_new > 0 && gets.by_old > 0,
        "{} / {}",
        gets.by_new,
        gets.by_old
    );
    // Every GET that was in flight at the edge was sent again.
    assert!(
        resent - not_resent >= 16.0,
        "{resent} resends for 16 GETs in flight:\n{m}"
    );
    // A POST in flight at the edge may have reached it: it failed, and
    // each failure is counted as such; the ones after went to the backup.
    let refused = posts.failed.len() as f64 + gets.warmups_refused as f64;
    assert_eq!(
        refused, not_resent,
        "POST failures {:?} against {not_resent} counted:\n{m}",
        posts.failed
    );
    assert!(
        posts.failed.iter().all(|f| f == "502"),
        "{:?}",
        posts.failed
    );
    assert!(posts.failed.len() <= 2, "{:?}", posts.failed);
    assert!(posts.by_old > 0, "no POST reached the backup");
    let log = proxy.log();
    assert!(
        log.contains("upstream connect failed: route=cdn upstream=new"),
        "{log}"
    );

    no_descriptor_left(&proxy, fds_before).await;
    drop(dir);

    // nginx doing the same job, through edges of its own, as the reference
    // (its default `proxy_next_upstream error timeout`, the old edge as a
    // `backup` server).
    let mut e = edges().await;
    let reference = reference_nginx(&e, e.new.addr);
    let (mut gets, posts) = freeze_and_kill(reference.addr, &mut e.new).await;
    let (p50, p99, max) = (gets.quantile(0.5), gets.quantile(0.99), gets.quantile(1.0));
    eprintln!(
        "nginx, the same: {} GETs ({} new, {} old), {} failed {:?}; {} POSTs, {} failed; \
         GET p50 {p50:.1} ms p99 {p99:.1} ms max {max:.1} ms",
        gets.sent,
        gets.by_new,
        gets.by_old,
        gets.failed.len(),
        gets.failed.iter().take(3).collect::<Vec<_>>(),
        posts.sent,
        posts.failed.len(),
    );
    assert!(gets.by_old > 0, "the reference never reached the backup");
}

/// nginx doing cutover's job for `e` as the reference: `new` (the new
/// edge, or the relay in front of it) first, the old edge as a `backup`
/// server, over TLS with the same checks and timeouts (`connect: 1s`, which
/// in nginx covers the TLS handshake too, `read: 10s`) and its default
/// `proxy_next_upstream error timeout`.
fn reference_nginx(e: &Edges, new: std::net::SocketAddr) -> Nginx {
    Nginx::start_with_http(
        &e.dir.path().join("reference"),
        free_port(),
        None,
        &format!(
            "upstream edges {{ server {new}; server {} backup; keepalive 64; }}",
            e._old.addr
        ),
        &format!(
            "location / {{ proxy_pass https://edges; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; proxy_set_header Host {NEW_EDGE}; \
             proxy_ssl_server_name on; proxy_ssl_name {NEW_EDGE}; proxy_ssl_verify on; \
             proxy_ssl_trusted_certificate {ca}; proxy_ssl_session_reuse on; \
             proxy_connect_timeout 1s; proxy_read_timeout 10s; }}",
            ca = e.ca_path.display()
        ),
    )
}

/// A config whose route has one plain-HTTP upstream, `new` at `addr`,
/// with `timeouts` (the inside of a YAML flow map).
fn one_plain_upstream(addr: std::net::SocketAddr, dir: &std::path::Path, timeouts: &str) -> String {
    config_yaml(
        &addr,
        dir,
        dir,
        &format!(
            "      - name: new\n        address: {addr}\n        tls: false\n        host_header: {NEW_EDGE}\n        timeouts: {{ {timeouts} }}\n"
        ),
    )
}

/// No descriptor left behind once the clients are gone and the upstream
/// connections idled out (the tests' upstreams have `idle: 1s`): back to
/// what the process held before the load, give or take 2, within 10 s.
async fn no_descriptor_left(proxy: &Proxy, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fds = open_fds(proxy.pid());
    while fds > before + 2 {
        assert!(
            Instant::now() < deadline,
            "{fds} descriptors open after the load, {before} before"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        fds = open_fds(proxy.pid());
    }
    eprintln!("descriptors: {before} before the load, {fds} after");
}

/// The origin (nginx) closes every keep-alive connection idle for 2 ms, so
/// under a load with pauses of 0-4 ms between requests cutover keeps
/// reusing connections the origin is closing at that moment. Every GET is
/// answered (sent again on a fresh connection); a POST caught by the race
/// may have reached the origin, so it fails with 502 and is counted as not
/// resent, exactly as many as the clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_closing_idle_connections_at_any_moment_fails_no_get() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Nginx::start(
        &dir.path().join("origin"),
        free_port(),
        None,
        "keepalive_timeout 2ms;\n    location / { return 200 \"new\\n\"; }",
    );
    let yaml = one_plain_upstream(origin.addr, dir.path(), "idle: 1s");
    let proxy = Proxy::start(dir.path(), &yaml, None);
    let fds_before = open_fds(proxy.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, kind) in [Kind::Get; 6]
        .into_iter()
        .chain([Kind::PingoraGet; 2])
        .chain([Kind::Post; 2])
        .enumerate()
    {
        let in_flight = Arc::new(AtomicU64::new(0));
        let task = client(proxy.listen, kind, stop.clone(), in_flight, Some(i as u64));
        tasks.push((kind, tokio::spawn(task)));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut gets, mut posts) = (Tally::default(), Tally::default());
    for (k, t) in tasks {
        let seen = t.await.unwrap();
        if k == Kind::Post {
            posts.absorb(seen);
        } else {
            gets.absorb(seen);
        }
    }
    let m = proxy.metrics().await;
    let result = |r: &str| summed(&m, "cutover_upstream_resends_total", &[("result", r)]);
    let (stale, not_resent) = (result("stale"), result("unsafe"));
    eprintln!(
        "origin closing idle connections: {} GETs, {} failed; {} POSTs, {} failed; \
         {stale} sent again on a fresh connection, {not_resent} POSTs not resent \
         ({} of them opening a Pingora-path connection)",
        gets.sent,
        gets.failed.len(),
        posts.sent,
        posts.failed.len(),
        gets.warmups_refused
    );
    assert!(gets.failed.is_empty(), "GETs failed: {:?}", gets.failed);
    assert!(
        stale > 0.0,
        "the race never happened: the test proves nothing\n{m}"
    );
    assert_eq!(
        posts.failed.len() as f64 + gets.warmups_refused as f64,
        not_resent,
        "{:?} and {} refused warm-ups\n{m}",
        posts.failed,
        gets.warmups_refused
    );
    assert!(
        posts.failed.iter().all(|f| f == "502"),
        "{:?}",
        posts.failed
    );
    assert!(posts.by_new > 0);
    no_descriptor_left(&proxy, fds_before).await;
}

/// The new edge behind a relay that adds 1-4 ms per read and, on 2% of
/// the reads from the edge, resets the connection instead of passing the
/// response on (and stalls 0.5% of them 300 ms); the old edge, as backup,
/// behind a relay with the same latency and no faults. cutover and nginx
/// (`proxy_next_upstream error`, upstream keep-alive, the old edge as
/// `backup`) each carry the same load through them: cutover fails no GET;
/// both sides' figures are printed, nginx's as the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_latency_stalls_and_cut_connections_no_get_fails() {
    use common::relay::{Faults, Relay};
    let dir = tempfile::tempdir().unwrap();
    let edge = |name: &str, says: &str| {
        Nginx::start(
            &dir.path().join(name),
            free_port(),
            None,
            &format!("location / {{ return 200 \"{says}\\n\"; }}"),
        )
    };
    let (new, old) = (edge("new", "new"), edge("old", "old"));
    let latency = Faults {
        latency: Duration::from_millis(1),
        jitter: Duration::from_millis(3),
        ..Faults::default()
    };
    let faulty = Relay::start(
        new.addr,
        Faults {
            cut_per_mille: 20,
            stall_per_mille: 5,
            stall: Duration::from_millis(300),
            ..latency.clone()
        },
    )
    .await;
    let healthy = Relay::start(old.addr, latency).await;
    let upstream = |name: &str, addr: std::net::SocketAddr, extra: &str| {
        format!("      - name: {name}\n        address: {addr}\n        tls: false\n        host_header: {NEW_EDGE}\n        timeouts: {{ connect: 1s, read: 5s, idle: 1s }}\n{extra}")
    };
    let yaml = config_yaml(
        &faulty.addr,
        dir.path(),
        dir.path(),
        &format!(
            "{}{}",
            upstream("new", faulty.addr, ""),
            upstream(
                "old",
                healthy.addr,
                "        weight: 0\n        backup: true\n"
            )
        ),
    );
    let proxy = Proxy::start(dir.path(), &yaml, None);
    let fds_before = open_fds(proxy.pid());
    let reference = Nginx::start_with_http(
        &dir.path().join("reference"),
        free_port(),
        None,
        &format!(
            "upstream edges {{ server {}; server {} backup; keepalive 64; }}",
            faulty.addr, healthy.addr
        ),
        &format!(
            "location / {{ proxy_pass http://edges; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; proxy_set_header Host {NEW_EDGE}; \
             proxy_read_timeout 5s; proxy_connect_timeout 1s; }}"
        ),
    );

    let mut figures = Vec::new();
    for (who, addr) in [("cutover", proxy.listen), ("nginx", reference.addr)] {
        let cuts_before = faulty.stats.cuts.load(Ordering::Relaxed);
        let mut gets = paced_gets(addr, 8, Duration::from_secs(4)).await;
        let cuts = faulty.stats.cuts.load(Ordering::Relaxed) - cuts_before;
        let (p50, p99) = (gets.quantile(0.5), gets.quantile(0.99));
        eprintln!(
            "{who} through latency, stalls and cuts: {} GETs, {} failed, {} cut, p50 {p50:.1} ms, p99 {p99:.1} ms",
            gets.sent,
            gets.failed.len(),
            cuts
        );
        figures.push((who, gets, cuts));
    }
    let (_, cutover, cuts) = &figures[0];
    assert!(*cuts > 0, "no connection was cut: the test proves nothing");
    assert!(
        cutover.failed.is_empty(),
        "GETs failed: {:?}",
        cutover.failed
    );
    let m = proxy.metrics().await;
    let resent = summed(&m, "cutover_upstream_resends_total", &[("upstream", "new")]);
    assert!(resent >= 1.0, "{m}");
    no_descriptor_left(&proxy, fds_before).await;
}

/// 256 KiB answers through the relay: one read in 200 (after a
/// connection's first) forwarded half and then both sides reset, one in
/// 100 stalled 300 ms. A GET whose answer had started reaching the client
/// cannot be sent again: the client's connection closes before the body's
/// end (never a complete-looking answer with a wrong or short body), the
/// failure counted and logged ("response cut"); a cut before any byte went
/// on is resent; every other answer arrives whole and byte-identical.
/// nginx through the same relay as the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cut_or_stalled_mid_body_close_the_client_connection_never_complete_wrong() {
    use common::relay::{Faults, Relay};
    const SIZE: usize = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(www.join("big.bin"), &body).unwrap();
    let origin = Nginx::start(
        &dir.path().join("origin"),
        free_port(),
        None,
        &format!(
            "location / {{ root {}; keepalive_requests 100000; }}",
            www.display()
        ),
    );
    let relay = Relay::start(
        origin.addr,
        Faults {
            cut_mid_per_mille: 5,
            stall_per_mille: 10,
            stall: Duration::from_millis(300),
            ..Faults::default()
        },
    )
    .await;
    let yaml = one_plain_upstream(relay.addr, dir.path(), "connect: 1s, read: 5s, idle: 1s");
    let proxy = Proxy::start(dir.path(), &yaml, None);
    let fds_before = open_fds(proxy.pid());
    let reference = Nginx::start_with_http(
        &dir.path().join("reference"),
        free_port(),
        None,
        &format!("upstream edges {{ server {}; keepalive 64; }}", relay.addr),
        &format!(
            "location / {{ proxy_pass http://edges; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; proxy_set_header Host {NEW_EDGE}; \
             proxy_read_timeout 5s; proxy_connect_timeout 1s; }}"
        ),
    );
    let body = Arc::new(body);
    for (who, addr) in [("cutover", proxy.listen), ("nginx", reference.addr)] {
        let cuts_before = relay.stats.mid_cuts.load(Ordering::Relaxed);
        let until = Instant::now() + Duration::from_secs(5);
        let mut clients = Vec::new();
        for _ in 0..4 {
            let body = body.clone();
            clients.push(tokio::spawn(async move {
                // (whole, cut short, wrong, latencies in ms)
                let (mut whole, mut cut, mut wrong, mut ms) = (0u64, 0u64, Vec::new(), Vec::new());
                let mut c = RawClient::connect(addr).await;
                while Instant::now() < until {
                    let t = Instant::now();
                    c.send(
                        format!("GET /big.bin HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n\r\n").as_bytes(),
                    )
                    .await;
                    match c.response_within(false, Duration::from_secs(20)).await {
                        Ok(m) if m.status() == 200 && m.body[..] == body[..] => {
                            whole += 1;
                            ms.push(t.elapsed().as_secs_f64() * 1e3);
                            continue;
                        }
                        Ok(m) => wrong.push(format!("{} with {} bytes", m.status(), m.body.len())),
                        Err(e) if e.starts_with("connection closed mid-response") => cut += 1,
                        Err(e) => wrong.push(e),
                    }
                    c = RawClient::connect(addr).await;
                }
                (whole, cut, wrong, ms)
            }));
        }
        let (mut whole, mut cut, mut wrong, mut ms) = (0, 0, Vec::new(), Vec::new());
        for t in clients {
            let (w, c, bad, m) = t.await.unwrap();
            (whole, cut) = (whole + w, cut + c);
            wrong.extend(bad);
            ms.extend(m);
        }
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| {
            ms.get(((ms.len().max(1) - 1) as f64 * p) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let mid_cuts = relay.stats.mid_cuts.load(Ordering::Relaxed) - cuts_before;
        eprintln!(
            "{who}, 256 KiB answers cut or stalled mid-body: {whole} whole, {cut} cut short, {} wrong; \
             {mid_cuts} cut by the relay; p50 {:.1} ms, p99 {:.1} ms",
            wrong.len(),
            q(0.5),
            q(0.99)
        );
        assert!(wrong.is_empty(), "{who}: {wrong:?}");
        assert!(whole > 20, "{who}: {whole} whole answers");
        assert!(
            cut <= mid_cuts,
            "{who}: {cut} cut short, the relay cut {mid_cuts}"
        );
        if who == "cutover" {
            assert!(mid_cuts > 0, "nothing was cut: the test proves nothing");
            let m = proxy.metrics().await;
            let errors = summed(&m, "cutover_upstream_errors_total", &[("upstream", "new")]);
            assert!(
                errors >= cut as f64,
                "{cut} cut short, {errors} counted:\n{m}"
            );
            if cut > 0 {
                assert!(
                    proxy.log().contains("response cut: route=cdn upstream=new"),
                    "{}",
                    proxy.log()
                );
            }
        }
    }
    no_descriptor_left(&proxy, fds_before).await;
}

/// cutover in a network namespace of the test's own (the listener and
/// admin on its address), the rehearsal edge outside on the link, and the
/// new distribution's name resolving to the edge and to `extra` addresses.
/// (Fields drop in order: cutover before its namespace.)
struct InNamespace {
    proxy: Proxy,
    edge: cutover::rehearsal::edge::Edge,
    ns: common::netns::Netns,
    dir: tempfile::TempDir,
    listen: std::net::SocketAddr,
    ca_path: std::path::PathBuf,
    /// The addresses the name resolves to beside the edge's.
    extra: Vec<std::net::IpAddr>,
    /// The edge is not the new name's but the backup's.
    backup: bool,
}

impl InNamespace {
    /// nginx in the same namespace doing cutover's job, as the reference:
    /// the edge and the `extra` addresses as the servers of one upstream
    /// (what the name resolves to), the same TLS checks, `connect: 1s`
    /// (covering the handshake) and 1 s idle upstream connections, its
    /// default `proxy_next_upstream error timeout` and `max_fails=1
    /// fail_timeout=10s`; with `backup`, the edge is a `backup` server.
    fn reference(&self) -> Nginx {
        use cutover::rehearsal::demo::{NEW_DIST, NEW_NAME};
        let port = self.edge.addr().port();
        let mut servers = String::new();
        for a in &self.extra {
            servers.push_str(&format!("server {a}:{port}; "));
        }
        let edge = format!(
            "server {}{}; ",
            self.edge.addr(),
            if self.backup { " backup" } else { "" }
        );
        servers.insert_str(0, &edge);
        Nginx::start_in_netns(
            &self.ns.name,
            &self.dir.path().join("reference"),
            std::net::SocketAddr::new(self.ns.inside(), 8081),
            &format!("upstream edges {{ {servers}keepalive 64; keepalive_timeout 1s; }}"),
            &format!(
                "location / {{ proxy_pass https://edges; proxy_http_version 1.1; \
                 proxy_set_header Connection \"\"; proxy_set_header Host {NEW_NAME}; \
                 proxy_ssl_server_name on; proxy_ssl_name {NEW_DIST}; proxy_ssl_verify on; \
                 proxy_ssl_trusted_certificate {ca}; proxy_ssl_session_reuse on; \
                 proxy_connect_timeout 1s; }}",
                ca = self.ca_path.display()
            ),
        )
    }
}

impl InNamespace {
    /// [`beside_vanishing_addresses`] through the nginx reference, for
    /// `for_`, its figures printed after `who`: it must reach the edge.
    async fn reference_beside_vanishing(&self, for_: Duration, who: &str) {
        let reference = self.reference();
        let (mut gets, fresh_ok, fresh_failed) =
            beside_vanishing_addresses(reference.addr, for_).await;
        let (p50, p99, max) = (gets.quantile(0.5), gets.quantile(0.99), gets.quantile(1.0));
        eprintln!(
            "{who}: {} keep-alive GETs and {fresh_ok} connect-per-request GETs, {} failed {:?}; \
             p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            gets.sent,
            gets.failed.len() + fresh_failed.len(),
            gets.failed
                .iter()
                .chain(&fresh_failed)
                .take(3)
                .collect::<Vec<_>>()
        );
        assert!(gets.by_other > 0, "the reference reached no edge");
    }
}

/// cutover in a namespace of the test's own; the new distribution's name
/// resolves to the edge and to `extra`'s addresses; with `backup`, to
/// `extra` only, and the old distribution (the edge) is the backup.
async fn in_namespace(
    extra: impl Fn(&common::netns::Netns) -> Vec<std::net::IpAddr>,
    backup: bool,
) -> InNamespace {
    use cutover::rehearsal::demo::{distributions, NEW_DIST, NEW_NAME, OLD_DIST};
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("namespace CA").unwrap();
    let ca_path = ca.write_cert(dir.path()).unwrap();
    let ns = common::netns::Netns::create(false);
    let edge = cutover::rehearsal::edge::Edge::start(
        std::net::SocketAddr::new(ns.host_v4(1), 0),
        &ca,
        distributions(),
    )
    .await
    .unwrap();
    let hosts = dir.path().join("hosts");
    let mut text = if backup {
        format!("{} {OLD_DIST}\n", edge.addr().ip())
    } else {
        format!("{} {NEW_DIST}\n", edge.addr().ip())
    };
    let extra = extra(&ns);
    for a in &extra {
        text.push_str(&format!("{a} {NEW_DIST}\n"));
    }
    std::fs::write(&hosts, text).unwrap();
    let listen = std::net::SocketAddr::new(ns.inside(), 8080);
    let admin = std::net::SocketAddr::new(ns.inside(), 9090);
    let yaml = format!(
        "phase: namespace\n\
         listeners:\n  - address: {listen}\n\
         admin:\n  address: {admin}\n\
         server:\n  threads: 2\n  grace_period: 1s\n  graceful_shutdown_timeout: 2s\n  upgrade_sock: {d}/upgrade.sock\n  pid_file: {d}/cutover.pid\n\
         routes:\n  - name: cdn\n    hosts: [{PUBLIC_NAME}]\n    upstreams:\n\
         \x20     - name: new-cloudfront\n        address: {NEW_DIST}:{port}\n        host_header: {NEW_NAME}\n        ca_file: {ca}\n        timeouts: {{ connect: 1s, idle: 1s }}\n{old}",
        d = dir.path().display(),
        port = edge.addr().port(),
        ca = ca_path.display(),
        old = if backup {
            format!(
                "\x20     - name: old-cloudfront\n        address: {OLD_DIST}:{port}\n        sni: {PUBLIC_NAME}\n        ca_file: {ca}\n        weight: 0\n        backup: true\n        timeouts: {{ connect: 1s, idle: 1s }}\n",
                port = edge.addr().port(),
                ca = ca_path.display(),
            )
        } else {
            String::new()
        },
    );
    let proxy = Proxy::start_in_netns(&ns.name, dir.path(), &yaml, listen, admin, Some(&hosts));
    InNamespace {
        proxy,
        edge,
        ns,
        dir,
        listen,
        ca_path,
        extra,
        backup,
    }
}

/// cutover in a network namespace of the test's own, the edge outside,
/// the link toward cutover limited to 8 Mbit/s (`tc tbf`): a 2 MiB body
/// comes through whole at the link's pace, and small GETs on other
/// connections keep being answered meanwhile. nginx in the same namespace,
/// over the same link, as the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_carries_a_large_body_whole_while_small_requests_go_on() {
    let bed = in_namespace(|_| Vec::new(), false).await;
    let fds_before = open_fds(bed.proxy.pid());
    bed.ns.limit_rate("8mbit");
    let reference = bed.reference();
    for (who, listen) in [("cutover", bed.listen), ("nginx", reference.addr)] {
        let (took, ok, failed, worst) = over_slow_link(listen).await;
        eprintln!(
            "{who}, 8 Mbit/s link: {LEN} bytes in {took:.2?} ({:.1} Mbit/s); meanwhile {ok} small GETs, {} failed, slowest {worst:.0?}",
            LEN as f64 * 8.0 / took.as_secs_f64() / 1e6,
            failed.len()
        );
        if who == "cutover" {
            // 2 MiB cannot cross 8 Mbit/s in less than ~2.1 s: the limit held.
            assert!(
                took >= Duration::from_millis(1800),
                "{took:?}: the link was not limited"
            );
            assert!(failed.is_empty(), "{failed:?}");
            assert!(ok > 0);
        }
    }
    drop(reference);
    no_descriptor_left(&bed.proxy, fds_before).await;
}

const LEN: usize = 2 << 20;

/// A [`LEN`]-byte GET through `listen` (checked whole and unaltered) while
/// 4 clients send small GETs: how long it took, how many small GETs were
/// answered, which failed, the slowest.
async fn over_slow_link(listen: std::net::SocketAddr) -> (Duration, u64, Vec<String>, Duration) {
    use cutover::rehearsal::edge::pattern_byte;
    let big = tokio::spawn(async move {
        let mut c = RawClient::connect(listen).await;
        let t = Instant::now();
        c.send(format!("GET /bytes/{LEN} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n\r\n").as_bytes())
            .await;
        let m = c.response(false).await.expect("the large body");
        (m, t.elapsed())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let small: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed, mut worst) = (0, Vec::new(), Duration::ZERO);
                let mut c = RawClient::connect(listen).await;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    c.send(format!("GET /ruok HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n\r\n").as_bytes())
                        .await;
                    match c.response(false).await {
                        Ok(m) if m.status() == 200 => {
                            ok += 1;
                            worst = worst.max(t.elapsed());
                        }
                        Ok(m) => failed.push(m.status().to_string()),
                        Err(e) => {
                            failed.push(e);
                            c = RawClient::connect(listen).await;
                        }
                    }
                }
                (ok, failed, worst)
            })
        })
        .collect();
    let (m, took) = big.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed, mut worst) = (0, Vec::new(), Duration::ZERO);
    for s in small {
        let (o, f, w) = s.await.unwrap();
        ok += o;
        failed.extend(f);
        worst = worst.max(w);
    }
    assert_eq!(m.status(), 200);
    assert_eq!(m.body.len(), LEN);
    assert!(
        m.body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(i as u64)),
        "the body arrived altered"
    );
    (took, ok, failed, worst)
}

/// The new distribution's name resolves to the edge and to two addresses
/// whose packets vanish (routed into a veth whose peer is down, inside the
/// namespace: a connect hangs until cutover's connect timeout, 1 s; `ip
/// route add blackhole` would not do: the kernel refuses a connect to a
/// blackholed address at once, EINVAL, where a lost route hangs). Keep-alive and
/// connect-per-request GETs for 4 s: none fails; a request that picked a
/// vanishing address waits its connect timeout once, the address is
/// ejected, and the request goes on to the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_whose_packets_vanish_cost_a_connect_timeout_and_fail_no_get() {
    let bed = in_namespace(|ns| vec![ns.vanishing_v4(1), ns.vanishing_v4(2)], false).await;
    let fds_before = open_fds(bed.proxy.pid());
    let (mut gets, fresh_ok, fresh_failed) =
        beside_vanishing_addresses(bed.listen, Duration::from_secs(4)).await;
    let m = bed.proxy.metrics().await;
    let timeouts = summed(&m, "cutover_upstream_errors_total", &[("kind", "timeout")]);
    let ejections = summed(&m, "cutover_upstream_address_ejections_total", &[]);
    let (p50, p99, max) = (gets.quantile(0.5), gets.quantile(0.99), gets.quantile(1.0));
    eprintln!(
        "2 of 3 addresses vanishing: {} keep-alive GETs and {fresh_ok} connect-per-request GETs, {} failed; \
         {timeouts} connect timeouts, {ejections} ejections; p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
        gets.sent,
        gets.failed.len() + fresh_failed.len()
    );
    assert!(gets.failed.is_empty(), "{:?}", gets.failed);
    assert!(fresh_failed.is_empty(), "{fresh_failed:?}");
    assert!(gets.by_other > 0);
    // Each vanishing address cost a connect timeout before it was ejected.
    assert!(timeouts >= 2.0 && ejections >= 2.0, "{m}");
    // ... in the first wave only: the 9 clients' first requests may all
    // pick one at once, after which both are out for the ejection period
    // (5 s, longer than the test).
    assert!(timeouts <= 9.0, "{timeouts} connect timeouts:\n{m}");
    no_descriptor_left(&bed.proxy, fds_before).await;

    // nginx in the same namespace, the three addresses its upstream's servers.
    bed.reference_beside_vanishing(Duration::from_secs(4), "nginx, the same")
        .await;
}

/// The new distribution's only address vanishes (its connects hang), the
/// old distribution as backup: for 12 s of keep-alive and
/// connect-per-request GETs none fails. A request that picks the address
/// waits one connect timeout (1 s) and goes to the backup; the address is
/// ejected for 5 s, then tried again by a request (another timeout, and an
/// ejection twice as long): connect timeouts in the first wave and once
/// per ejection period, not per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_edge_with_a_backup_fails_no_get_and_costs_a_timeout_per_ejection() {
    let bed = in_namespace(|ns| vec![ns.vanishing_v4(1)], true).await;
    let fds_before = open_fds(bed.proxy.pid());
    let (mut gets, fresh_ok, fresh_failed) =
        beside_vanishing_addresses(bed.listen, Duration::from_secs(12)).await;
    let m = bed.proxy.metrics().await;
    let timeouts = summed(&m, "cutover_upstream_errors_total", &[("kind", "timeout")]);
    let ejections = summed(&m, "cutover_upstream_address_ejections_total", &[]);
    let resent = summed(&m, "cutover_upstream_failovers_total", &[]);
    let (p50, p99, max) = (gets.quantile(0.5), gets.quantile(0.99), gets.quantile(1.0));
    eprintln!(
        "the edge's only address vanishing, a backup: {} keep-alive GETs and {fresh_ok} connect-per-request GETs in 12 s, {} failed; \
         {timeouts} connect timeouts, {ejections} ejections, {resent} failovers; p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
        gets.sent,
        gets.failed.len() + fresh_failed.len()
    );
    assert!(gets.failed.is_empty(), "{:?}", gets.failed);
    assert!(fresh_failed.is_empty(), "{fresh_failed:?}");
    assert!(
        gets.by_other > 100 && fresh_ok > 10,
        "{} and {fresh_ok}",
        gets.by_other
    );
    // Ejected at about 1 s for 5 s, tried again at about 6 s by one
    // request and ejected again for 10 s: two ejections, and no more
    // timeouts than the first wave's nine clients plus the trial (and one
    // for a request that raced the trial).
    assert_eq!(ejections, 2.0, "{m}");
    assert!(
        bed.proxy.log().contains("ejected for 10s"),
        "the trial's failure did not double the ejection:\n{}",
        bed.proxy.log()
    );
    assert!(
        (2.0..=11.0).contains(&timeouts),
        "{timeouts} connect timeouts:\n{m}"
    );
    no_descriptor_left(&bed.proxy, fds_before).await;

    bed.reference_beside_vanishing(
        Duration::from_secs(12),
        "nginx, the same (the edge a backup server)",
    )
    .await;
}

/// 8 paced keep-alive GET clients and one opening a connection per
/// request, for `for_` through `listen`: the keep-alive ones' tally, and
/// the other's answered and failed requests.
async fn beside_vanishing_addresses(
    listen: std::net::SocketAddr,
    for_: Duration,
) -> (Tally, u64, Vec<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let fresh = tokio::spawn(async move {
        let (mut ok, mut failed) = (0, Vec::new());
        while !stop2.load(Ordering::Relaxed) {
            let mut c = RawClient::connect(listen).await;
            c.send(
                format!("GET /ruok HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
            match c.response(false).await {
                Ok(m) if m.status() == 200 => ok += 1,
                Ok(m) => failed.push(m.status().to_string()),
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    });
    let gets = paced_gets(listen, 8, for_).await;
    stop.store(true, Ordering::Relaxed);
    let (fresh_ok, fresh_failed) = fresh.await.unwrap();
    (gets, fresh_ok, fresh_failed)
}

/// The new edge (nginx over TLS, closing each connection after 5 requests,
/// so cutover keeps opening new ones) behind a relay that resets 30% of
/// the connections as soon as their TLS handshake is done, before they
/// answer anything; the old edge as backup. No GET fails: each is sent
/// again, on the backup while the new edge's address is ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_right_after_the_tls_handshake_fail_no_get() {
    let faults = common::relay::Faults {
        reset_after_handshake_per_mille: 300,
        ..Default::default()
    };
    let e = edges_with("keepalive_requests 5;\n    ", Some(faults)).await;
    let fds_before = open_fds(e.proxy.pid());
    let mut gets = paced_gets(e.proxy.listen, 8, Duration::from_secs(4)).await;
    let resets = e
        .relay
        .as_ref()
        .unwrap()
        .stats
        .handshake_resets
        .load(Ordering::Relaxed);
    let m = e.proxy.metrics().await;
    let resent = summed(
        &m,
        "cutover_upstream_resends_total",
        &[("result", "failed")],
    );
    let (p50, p99) = (gets.quantile(0.5), gets.quantile(0.99));
    eprintln!(
        "reset after the TLS handshake: {} GETs ({} new, {} old), {} failed; {resets} resets, {resent} resent elsewhere; p50 {p50:.1} ms, p99 {p99:.1} ms",
        gets.sent,
        gets.by_new,
        gets.by_old,
        gets.failed.len()
    );
    assert!(
        resets > 0,
        "no connection was reset: the test proves nothing"
    );
    assert!(gets.failed.is_empty(), "{:?}", gets.failed);
    assert!(resent >= 1.0, "{m}");
    assert!(gets.by_new > 0 && gets.by_old > 0);
    no_descriptor_left(&e.proxy, fds_before).await;

    // nginx through the same relay, as the reference.
    let relay = e.relay.as_ref().unwrap();
    let reference = reference_nginx(&e, relay.addr);
    let before = relay.stats.handshake_resets.load(Ordering::Relaxed);
    let mut gets = paced_gets(reference.addr, 8, Duration::from_secs(4)).await;
    let resets = relay.stats.handshake_resets.load(Ordering::Relaxed) - before;
    let (p50, p99) = (gets.quantile(0.5), gets.quantile(0.99));
    eprintln!(
        "nginx, the same: {} GETs ({} new, {} old), {} failed {:?}; {resets} resets; p50 {p50:.1} ms, p99 {p99:.1} ms",
        gets.sent,
        gets.by_new,
        gets.by_old,
        gets.failed.len(),
        gets.failed.iter().take(3).collect::<Vec<_>>()
    );
    assert!(resets > 0, "the reference met no reset");
}

/// The new edge behind a relay that leaves 20% of the connections
/// half-open (accepted, never answered, never closed: the TLS handshake
/// hangs), the new edge closing each connection after 5 requests so that
/// cutover keeps opening new ones; the old edge as backup. A hung
/// handshake costs the connect timeout (1 s, which covers the handshake),
/// the address is ejected and the GET goes to the backup: none fails.
/// nginx through the same relay as the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_cost_a_connect_timeout_and_fail_no_get() {
    let faults = common::relay::Faults {
        half_open_per_mille: 200,
        ..Default::default()
    };
    let e = edges_with("keepalive_requests 5;\n    ", Some(faults)).await;
    let relay = e.relay.as_ref().unwrap();
    let fds_before = open_fds(e.proxy.pid());
    let mut figures = Vec::new();
    let reference = reference_nginx(&e, relay.addr);
    for (who, addr) in [("cutover", e.proxy.listen), ("nginx", reference.addr)] {
        let before = relay.stats.half_open.load(Ordering::Relaxed);
        let mut gets = paced_gets(addr, 8, Duration::from_secs(4)).await;
        let hung = relay.stats.half_open.load(Ordering::Relaxed) - before;
        let (p50, p99, max) = (gets.quantile(0.5), gets.quantile(0.99), gets.quantile(1.0));
        eprintln!(
            "{who}, 20% of connections half-open: {} GETs ({} new, {} old), {} failed {:?}; {hung} half-open; \
             p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            gets.sent,
            gets.by_new,
            gets.by_old,
            gets.failed.len(),
            gets.failed.iter().take(3).collect::<Vec<_>>()
        );
        figures.push((gets, hung));
    }
    let (gets, hung) = &figures[0];
    assert!(
        *hung > 0,
        "no connection was left half-open: the test proves nothing"
    );
    assert!(gets.failed.is_empty(), "{:?}", gets.failed);
    assert!(gets.by_new > 0 && gets.by_old > 0);
    let m = e.proxy.metrics().await;
    let timeouts = summed(&m, "cutover_upstream_errors_total", &[("kind", "timeout")])
        + summed(&m, "cutover_upstream_errors_total", &[("kind", "tls")]);
    let ejections = summed(&m, "cutover_upstream_address_ejections_total", &[]);
    eprintln!("cutover counted {timeouts} connect/handshake failures, {ejections} ejections");
    assert!(timeouts >= 1.0 && ejections >= 1.0, "{m}");
    drop(reference);
    no_descriptor_left(&e.proxy, fds_before).await;
}

/// An edge whose first byte comes after 10 s (every read from it stalled,
/// the way a struggling origin answers), against `timeouts.read`: with
/// `read: 5s` the GET gets 504 after ~5 s, counted as a timeout and not
/// sent again (README: Decisions, resending), and the stalled upstream
/// connection is closed (no descriptor left); with `read: 15s` it waits
/// and gets the answer. The two proxies run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_answering_after_10_s_meets_the_read_timeout() {
    use common::relay::{Faults, Relay};
    let dir = tempfile::tempdir().unwrap();
    let origin = Nginx::start(
        &dir.path().join("origin"),
        free_port(),
        None,
        "location / { return 200 \"slow\\n\"; }",
    );
    let slow = Relay::start(
        origin.addr,
        Faults {
            stall_per_mille: 1000,
            stall: Duration::from_secs(10),
            ..Faults::default()
        },
    )
    .await;
    let one = |read: &'static str, want: u16| {
        let (dir, slow) = (dir.path(), slow.addr);
        async move {
            let own = dir.join(format!("read-{read}"));
            std::fs::create_dir_all(&own).unwrap();
            let yaml = config_yaml(
                &slow,
                dir,
                &own,
                &format!(
                    "      - name: slow\n        address: {slow}\n        tls: false\n        host_header: {NEW_EDGE}\n        timeouts: {{ read: {read} }}\n",
                ),
            );
            let proxy = Proxy::start(&own, &yaml, None);
            let fds_before = open_fds(proxy.pid());
            let mut c = RawClient::connect(proxy.listen).await;
            let t = Instant::now();
            c.send(format!("GET /slow HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n\r\n").as_bytes())
                .await;
            let m = c
                .response_within(false, Duration::from_secs(20))
                .await
                .expect("an answer");
            let took = t.elapsed();
            let metrics = proxy.metrics().await;
            let timeouts = summed(
                &metrics,
                "cutover_upstream_errors_total",
                &[("kind", "timeout")],
            );
            let resent = summed(&metrics, "cutover_upstream_resends_total", &[]);
            eprintln!("read timeout {read}, first byte after 10 s: {} in {took:.2?}; {timeouts} timeouts counted", m.status());
            assert_eq!(m.status(), want, "read: {read}");
            assert_eq!(resent, 0.0, "a timeout is not sent again:\n{metrics}");
            if want == 504 {
                assert!(
                    took >= Duration::from_secs(5) && took < Duration::from_millis(6500),
                    "{took:?}"
                );
                assert_eq!(timeouts, 1.0, "{metrics}");
                assert!(
                    proxy
                        .log()
                        .contains("504 route=cdn upstream=slow kind=timeout"),
                    "{}",
                    proxy.log()
                );
            } else {
                assert!(took >= Duration::from_secs(10), "{took:?}");
                assert_eq!(timeouts, 0.0, "{metrics}");
                assert_eq!(&m.body[..], b"slow\n");
            }
            drop(c);
            no_descriptor_left(&proxy, fds_before).await;
        }
    };
    tokio::join!(one("5s", 504), one("15s", 200));
}

//! The phased shift inside the proxy: weights, sticky monotone selection,
//! health checks with markers, failover, and SIGHUP reload under load.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use cutover::rehearsal::demo::{NEW_DIST, NEW_NAME, OLD_DIST, PUBLIC_NAME};

/// A two-upstream migration route: new (Host/SNI rewritten) and old (the
/// public name, which it owns). `extra_new`/`extra_old` are appended to each.
fn shift_yaml(
    bed: &Bed,
    phase: &str,
    new_w: u32,
    old_w: u32,
    extra_new: &str,
    extra_old: &str,
    trusted: &str,
) -> String {
    let port = bed.edge.addr().port();
    let ca = bed.ca_path.display();
    format!(
        "phase: {phase}\n\
         listeners:\n  - address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         server:\n  threads: 2\n  grace_period: 1s\n  graceful_shutdown_timeout: 5s\n  upgrade_sock: {dir}/upgrade.sock\n  pid_file: {dir}/cutover.pid\n\
         client_ip:\n  header: X-Forwarded-For\n  trusted: [{trusted}]\n\
         dns_refresh: 1s\n\
         routes:\n  - name: cdn\n    hosts: [{PUBLIC_NAME}]\n    sticky: client_ip\n    canary: /ruok\n    upstreams:\n\
         \x20     - name: new-cloudfront\n        address: {NEW_DIST}:{port}\n        host_header: {NEW_NAME}\n        ca_file: {ca}\n        weight: {new_w}\n        expect_body: ok-new-cdn\n{extra_new}\
         \x20     - name: old-cloudfront\n        address: {OLD_DIST}:{port}\n        sni: {PUBLIC_NAME}\n        ca_file: {ca}\n        weight: {old_w}\n        expect_body: ok-old-cdn\n{extra_old}",
        dir = bed.dir.path().display()
    )
}

/// Rewrite the config keeping the ports the running proxy uses, then SIGHUP.
fn reload_with(proxy: &Proxy, yaml: &str) {
    let yaml = yaml
        .replacen("127.0.0.1:0", &proxy.listen.to_string(), 1)
        .replacen("127.0.0.1:0", &proxy.admin.to_string(), 1);
    write_atomically(&proxy.config_path, &yaml);
    proxy.signal(libc::SIGHUP);
}

/// Which distribution each client of `clients` lands on, over `conns` connections.
async fn assign(proxy: &Proxy, clients: std::ops::Range<u32>, conns: u32) -> HashMap<u32, String> {
    let mut tasks = Vec::new();
    for c in 0..conns {
        let listen = proxy.listen;
        let mine: Vec<u32> = clients.clone().filter(|i| i % conns == c).collect();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(listen).await.unwrap();
            let mut out = Vec::new();
            for i in mine {
                let xff = client_addr(i);
                // Not the canary path: health tests change what /ruok answers.
                let a = client
                    .get(PUBLIC_NAME, "/", &[("x-forwarded-for", &xff)])
                    .await
                    .unwrap();
                assert_eq!(a.status, 200, "{a:?}");
                out.push((i, a.distribution));
            }
            out
        }));
    }
    let mut map = HashMap::new();
    for t in tasks {
        map.extend(t.await.unwrap());
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_sticky_and_monotone_shift() {
    let bed = Bed::start().await;
    let yaml = shift_yaml(&bed, "phase-2-10pct", 10, 90, "", "", "127.0.0.0/8");
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));

    let before = assign(&proxy, 0..10_000, 4).await;
    let new = before.values().filter(|d| *d == "d-new").count();
    assert!(
        (900..=1100).contains(&new),
        "new share {new}/10000, expected 10% ± 1 point"
    );
    assert_eq!(
        before.values().filter(|d| *d == "d-old").count(),
        10_000 - new
    );

    // The same client, 100 times: the same upstream.
    let mut client = Client::connect(proxy.listen).await.unwrap();
    let first = client
        .get(PUBLIC_NAME, "/ruok", &[("x-forwarded-for", "10.9.9.9")])
        .await
        .unwrap();
    for _ in 0..100 {
        let a = client
            .get(PUBLIC_NAME, "/ruok", &[("x-forwarded-for", "10.9.9.9")])
            .await
            .unwrap();
        assert_eq!(a.distribution, first.distribution);
    }

    // 10 -> 50: clients only move onto the new distribution.
    reload_with(
        &proxy,
        &shift_yaml(&bed, "phase-2-50pct", 50, 50, "", "", "127.0.0.0/8"),
    );
    let m = proxy
        .metrics_when(
            "cutover_upstream_weight",
            &[("upstream", "new-cloudfront")],
            50.0,
        )
        .await;
    assert_eq!(
        sample(&m, "cutover_phase_info", &[("phase", "phase-2-50pct")]),
        Some(1.0),
        "{m}"
    );
    let after = assign(&proxy, 0..10_000, 4).await;
    let moved_back = before
        .iter()
        .filter(|(i, d)| *d == "d-new" && after[i] != "d-new")
        .count();
    assert_eq!(moved_back, 0, "clients moved from new back to old");
    let new_after = after.values().filter(|d| *d == "d-new").count();
    assert!(
        (4_900..=5_100).contains(&new_after),
        "new share after {new_after}/10000"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "cutover_config_reloads_total", &[("result", "success")]),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_address_header_needs_a_trusted_peer() {
    let bed = Bed::start().await;
    // 127.0.0.1 is not trusted: X-Forwarded-For is ignored, stickiness uses the peer.
    let yaml = shift_yaml(&bed, "p", 50, 50, "", "", "10.0.0.0/8");
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    let all = assign(&proxy, 0..200, 2).await;
    let first = all[&0].clone();
    assert!(
        all.values().all(|d| *d == first),
        "untrusted X-Forwarded-For changed the choice"
    );

    // From a trusted peer, a malformed header is ignored (peer address used) and counted.
    let yaml = shift_yaml(&bed, "p", 50, 50, "", "", "127.0.0.0/8");
    let dir = bed.path("trusted");
    std::fs::create_dir_all(&dir).unwrap();
    let proxy = Proxy::start(&dir, &yaml, Some(&bed.hosts_file));
    let mut client = Client::connect(proxy.listen).await.unwrap();
    for bad in ["not-an-ip", "10.0.0.1, <script>", "999.1.1.1"] {
        let a = client
            .get(PUBLIC_NAME, "/ruok", &[("x-forwarded-for", bad)])
            .await
            .unwrap();
        assert_eq!(a.status, 200);
    }
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "cutover_client_ip_header_ignored_total", &[]),
        Some(3.0),
        "{m}"
    );
}

const CHECK: &str = "        health_check: { path: /ruok, interval: 1s, timeout: 500ms }\n";

async fn wait_healthy(proxy: &Proxy, upstream: &str, want: f64) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    loop {
        let m = proxy.metrics().await;
        if sample(&m, "cutover_upstream_healthy", &[("upstream", upstream)]) == Some(want) {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{upstream} never became {want}:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn distributions_of(proxy: &Proxy, n: u32) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for d in assign(proxy, 0..n, 2).await.into_values() {
        *counts.entry(d).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_notice_the_wrong_distribution_and_recover() {
    let bed = Bed::start().await;
    let yaml = shift_yaml(&bed, "p", 50, 50, CHECK, CHECK, "127.0.0.0/8");
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    let both = distributions_of(&proxy, 200).await;
    assert!(both.get("d-new").is_some_and(|n| *n > 50), "{both:?}");

    // The new distribution starts answering with the old one's marker.
    bed.edge.set_canary("d-new", "ok-old-cdn", 200);
    let took = wait_healthy(&proxy, "new-cloudfront", 0.0).await;
    // Two failed checks: at most two intervals plus the check timeout and scheduling.
    assert!(
        took <= Duration::from_millis(2 * 1000 + 500 + 300),
        "left after {took:?}"
    );
    assert!(
        proxy.log().contains("lacks the marker \"ok-new-cdn\""),
        "{}",
        proxy.log()
    );
    let only_old = distributions_of(&proxy, 200).await;
    assert_eq!(only_old.get("d-old"), Some(&200), "{only_old:?}");

    bed.edge.set_canary("d-new", "ok-new-cdn", 200);
    wait_healthy(&proxy, "new-cloudfront", 1.0).await;
    let back = distributions_of(&proxy, 200).await;
    assert!(back.get("d-new").is_some_and(|n| *n > 50), "{back:?}");

    // A 500 is unhealthy too.
    bed.edge.set_canary("d-new", "ok-new-cdn", 500);
    wait_healthy(&proxy, "new-cloudfront", 0.0).await;

    // Everything unhealthy: fail open, by weight, and say so.
    bed.edge.set_canary("d-old", "ok-old-cdn", 500);
    wait_healthy(&proxy, "old-cloudfront", 0.0).await;
    let open = distributions_of(&proxy, 200).await;
    assert!(
        open.get("d-new").is_some_and(|n| *n > 50) && open.get("d-old").is_some_and(|n| *n > 50),
        "{open:?}"
    );
    assert!(proxy.log().contains("failing open"), "{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_fail_over_to_the_backup() {
    let bed = Bed::start().await;
    let closed = free_port(); // bound and released: nothing listens there now
    let port = bed.edge.addr().port();
    // New at weight 100, old as a weight-0 backup.
    let phase3 = shift_yaml(
        &bed,
        "phase-3",
        100,
        0,
        "",
        "        backup: true\n",
        "127.0.0.0/8",
    );
    let yaml = phase3.replace(
        &format!("address: {NEW_DIST}:{port}"),
        &format!("address: {closed}\n        sni: {NEW_NAME}"),
    );
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    let done = distributions_of(&proxy, 1000).await;
    assert_eq!(done.get("d-old"), Some(&1000), "{done:?}");
    let m = proxy
        .metrics_when(
            "cutover_requests_total",
            &[("upstream", "old-cloudfront"), ("code", "200")],
            1000.0,
        )
        .await;
    // The refused address is ejected at its first failure (for 5 s), so
    // the requests after it go to the backup without trying it again; a
    // few that picked it at the same moment fail too.
    let refused = sample(
        &m,
        "cutover_upstream_errors_total",
        &[("upstream", "new-cloudfront"), ("kind", "connect")],
    )
    .unwrap();
    assert!(
        (1.0..=10.0).contains(&refused),
        "{refused} connect errors: {m}"
    );
    // Every request left the new distribution: counted as a failover, by why.
    let failovers = |reason| {
        sample(
            &m,
            "cutover_upstream_failovers_total",
            &[("upstream", "new-cloudfront"), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(failovers("connect"), refused, "{m}");
    assert_eq!(
        failovers("connect") + failovers("no_address"),
        1000.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "cutover_upstream_address_ejections_total",
            &[("upstream", "new-cloudfront")]
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "cutover_requests_total",
            &[("upstream", "old-cloudfront"), ("code", "200")]
        ),
        Some(1000.0),
        "{m}"
    );

    // A name that never resolves fails over the same way.
    let yaml = phase3.replace(
        &format!("address: {NEW_DIST}:{port}"),
        "address: nowhere.invalid:443",
    );
    let dir = bed.path("unresolved");
    std::fs::create_dir_all(&dir).unwrap();
    let proxy = Proxy::start(&dir, &yaml, Some(&bed.hosts_file));
    let done = distributions_of(&proxy, 50).await;
    assert_eq!(done.get("d-old"), Some(&50), "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_reloads_under_load_fail_no_request() {
    let bed = Bed::start().await;
    let proxy = Proxy::start(
        bed.dir.path(),
        &shift_yaml(&bed, "reload-0", 50, 50, "", "", "127.0.0.0/8"),
        Some(&bed.hosts_file),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for c in 0..6u32 {
        let (stop, ok, failed, listen) = (stop.clone(), ok.clone(), failed.clone(), proxy.listen);
        load.push(tokio::spawn(async move {
            let mut client = Client::connect(listen).await.expect("connect");
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let path = if i.is_multiple_of(10) {
                    "/bytes/65536"
                } else {
                    "/ruok"
                };
                let xff = client_addr(c * 100_000 + i);
                match client
                    .get(PUBLIC_NAME, path, &[("x-forwarded-for", &xff)])
                    .await
                {
                    Ok(a) if a.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(a) => {
                        eprintln!("failed request: {a:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("connection error: {e:#}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        // A connection error ends this client: count it, and reconnect.
                        client = Client::connect(listen).await.expect("reconnect");
                        0
                    }
                };
            }
        }));
    }

    let mut successes = 0.0;
    for i in 1..=100u32 {
        if i == 50 {
            // An invalid file in the middle changes nothing.
            write_atomically(&proxy.config_path, "phase: broken\nroutes: []\n");
            proxy.signal(libc::SIGHUP);
            let m = proxy
                .metrics_when(
                    "cutover_config_reloads_total",
                    &[("result", "failure")],
                    1.0,
                )
                .await;
            assert_eq!(
                sample(&m, "cutover_config_reloads_total", &[("result", "failure")]),
                Some(1.0),
                "{m}"
            );
            assert_eq!(
                sample(
                    &m,
                    "cutover_phase_info",
                    &[("phase", &format!("reload-{}", i - 1))]
                ),
                Some(1.0),
                "{m}"
            );
        }
        let new_w = (i * 37) % 101;
        let yaml = shift_yaml(
            &bed,
            &format!("reload-{i}"),
            new_w,
            100 - new_w + 1,
            "",
            "",
            "127.0.0.0/8",
        );
        reload_with(&proxy, &yaml);
        successes += 1.0;
        let m = proxy
            .metrics_when(
                "cutover_config_reloads_total",
                &[("result", "success")],
                successes,
            )
            .await;
        assert_eq!(
            sample(&m, "cutover_config_reloads_total", &[("result", "success")]),
            Some(successes),
            "{m}\n{}",
            proxy.log()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("reload under load: {ok} requests ok, {failed} failed, 100 reloads + 1 invalid");
    assert_eq!(failed, 0);
    assert!(ok > 1000, "too little load to mean anything: {ok}");
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "cutover_phase_info", &[("phase", "reload-100")]),
        Some(1.0),
        "{m}"
    );
    assert!(
        proxy
            .log()
            .contains("reload failed, keeping the running config"),
        "{}",
        proxy.log()
    );
    // Pooled upstream connections survived the reloads: at most one per
    // concurrent client and upstream, not one per reload.
    let handshakes = bed.edge.tls_connections();
    assert!(
        handshakes <= 2 * 6 + 2,
        "{handshakes} TLS handshakes across 100 reloads"
    );

    // Server settings cannot change on reload; the log says what to do.
    let yaml = shift_yaml(&bed, "reload-101", 50, 50, "", "", "127.0.0.0/8")
        .replace("threads: 2", "threads: 3");
    reload_with(&proxy, &yaml);
    proxy
        .metrics_when(
            "cutover_config_reloads_total",
            &[("result", "success")],
            101.0,
        )
        .await;
    assert!(
        proxy
            .log()
            .contains("take effect only with `cutover run --upgrade`"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_address_is_ejected_and_the_old_distribution_gets_nothing() {
    let bed = Bed::start().await;
    // d-new resolves to the edge's address and to one where nothing listens
    // (the seed's failure: round robin sent every other request to the
    // backup, the old distribution).
    std::fs::write(
        &bed.hosts_file,
        format!("127.0.0.1 {OLD_DIST} {NEW_DIST}\n127.0.0.2 {NEW_DIST}\n"),
    )
    .unwrap();
    let yaml = shift_yaml(
        &bed,
        "phase-3",
        100,
        0,
        "",
        "        backup: true\n",
        "127.0.0.0/8",
    );
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    // Keep-alive clients (the fast path) ...
    let done = distributions_of(&proxy, 400).await;
    assert_eq!(done.get("d-new"), Some(&400), "{done:?}");
    // ... connect-per-request clients ...
    for _ in 0..50 {
        let r = proxy.get(PUBLIC_NAME, "/").await;
        assert_eq!(r.status.as_u16(), 200);
    }
    // ... and the Pingora path (a method the fast path hands over).
    for _ in 0..50 {
        let (head, _) = raw_request(
            proxy.listen,
            format!("{VIA_PINGORA} / HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1\r\nx\r\n0\r\n\r\n")
                .as_bytes(),
        );
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let m = proxy
        .metrics_when(
            "cutover_requests_total",
            &[("upstream", "new-cloudfront"), ("code", "200")],
            500.0,
        )
        .await;
    assert_eq!(
        sample(
            &m,
            "cutover_requests_total",
            &[("upstream", "old-cloudfront")]
        ),
        None,
        "the old distribution served requests: {m}"
    );
    let ejections = sample(
        &m,
        "cutover_upstream_address_ejections_total",
        &[("upstream", "new-cloudfront")],
    )
    .unwrap_or(0.0);
    let left: String = m
        .lines()
        .filter(|l| l.contains("upstream=\"new-cloudfront\""))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        sample_sum(&left, "cutover_upstream_failovers_total"),
        0.0,
        "no request left the new distribution: {m}"
    );
    // Ejected at its first refusal, for 5 s, then 10 s: a handful at most.
    assert!(
        (1.0..=4.0).contains(&ejections),
        "{ejections} ejections: {m}"
    );
    assert!(
        proxy
            .log()
            .contains("address ejected for 5s; retrying on another address"),
        "{}",
        proxy.log()
    );
}

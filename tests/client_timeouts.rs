//! The client side's timeouts per listener, on every carrier: the fast path
//! (a plain listener's GET), the Pingora path (the same connection after a
//! request whose method the fast path hands over) and the TLS listener (its GETs on the fast path, over TLS).
//!
//! - With the defaults, a connection idle for 61 s (past an ALB's default
//!   idle timeout, before cutover's 75 s) is still served.
//! - With `keepalive_timeout: 2s`, connections reused after 1.9 s are
//!   served 1,000 times on each carrier with no reset (the ALB pattern:
//!   100 connections, 10 reuses each), and one idle for
//!   2.5 s is closed, silently.
//! - A head trickled past `header_timeout` is answered 408 and closed,
//!   counted and in the access log.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::strict_origin::{RawClient, Script, StrictOrigin};
use common::*;
use cutover::rehearsal::demo::PUBLIC_NAME;
use cutover::rehearsal::pki::TestCa;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Carrier {
    Fast,
    Pingora,
    Tls,
}

const CARRIERS: [Carrier; 3] = [Carrier::Fast, Carrier::Pingora, Carrier::Tls];

struct Bed {
    _dir: tempfile::TempDir,
    _origin: StrictOrigin,
    proxy: Proxy,
    tls: std::net::SocketAddr,
    ca_path: PathBuf,
    access_log: PathBuf,
}

/// cutover with a plain and a TLS listener, both with `listener_extra`
/// (e.g. `keepalive_timeout: 2s`), in front of a plain recording origin.
async fn start(listener_extra: &str) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("timeouts CA").unwrap();
    let ca_path = ca.write_cert(dir.path()).unwrap();
    let issued = ca.issue(&[PUBLIC_NAME]).unwrap();
    let (cert, key) = issued.write_pair(dir.path(), "l").unwrap();
    let script: Script = Arc::new(|_| None);
    let origin = StrictOrigin::start_plain(script).await;
    let tls = free_port();
    let access_log = dir.path().join("access.log");
    let yaml = format!(
        "phase: timeouts\n\
         listeners:\n  - {{ address: 127.0.0.1:0{listener_extra} }}\n  - {{ address: {tls}, tls: {{ cert: {}, key: {} }}{listener_extra} }}\n\
         admin: {{ address: 127.0.0.1:0 }}\n\
         server: {{ threads: 2, grace_period: 1s, graceful_shutdown_timeout: 1s, upgrade_sock: {d}/u.sock, pid_file: {d}/c.pid }}\n\
         access_log: {{ format: json, path: {log} }}\n\
         routes:\n  - name: cdn\n    hosts: [{PUBLIC_NAME}]\n    upstreams:\n      - {{ name: origin, address: \"{}\", tls: false }}\n",
        cert.display(),
        key.display(),
        origin.addr,
        d = dir.path().display(),
        log = access_log.display(),
    );
    let proxy = Proxy::start(dir.path(), &yaml, None);
    Bed {
        _dir: dir,
        _origin: origin,
        proxy,
        tls,
        ca_path,
        access_log,
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n\r\n")
}

/// A connection on `carrier`, ready for its next request: on the Pingora
/// path, after a request that handed it over.
async fn open(bed: &Bed, carrier: Carrier) -> RawClient {
    match carrier {
        Carrier::Tls => RawClient::connect_tls(bed.tls, &bed.ca_path, PUBLIC_NAME).await,
        Carrier::Fast => RawClient::connect(bed.proxy.listen).await,
        Carrier::Pingora => {
            let mut c = RawClient::connect(bed.proxy.listen).await;
            c.send(
                format!(
                    "{VIA_PINGORA} /warm HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            let r = c.response(false).await.expect("the warm-up is answered");
            assert_eq!(r.status(), 200);
            c
        }
    }
}

/// One request on `c`; its status, or why there was none.
async fn request(c: &mut RawClient, path: &str) -> Result<u16, String> {
    c.send(get(path).as_bytes()).await;
    c.response(false).await.map(|r| r.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_past_an_albs_timeout_is_still_served_with_the_defaults() {
    let bed = start("").await;
    let runs = CARRIERS.map(|carrier| {
        let bed = &bed;
        async move {
            let mut c = open(bed, carrier).await;
            // A fresh TLS connection waits for its first request; the
            // others for their next.
            if carrier != Carrier::Tls {
                assert_eq!(request(&mut c, "/before").await, Ok(200), "{carrier:?}");
            }
            tokio::time::sleep(Duration::from_secs(61)).await;
            (carrier, request(&mut c, "/after-61s").await)
        }
    });
    let [a, b, c] = runs;
    let (a, b, c) = tokio::join!(a, b, c);
    for (carrier, result) in [a, b, c] {
        assert_eq!(result, Ok(200), "{carrier:?}: 61 s idle, then a request");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reused_just_inside_the_keepalive_timeout_never_see_a_reset() {
    let bed = start(", keepalive_timeout: 2s").await;
    const CONNECTIONS: usize = 100;
    const REUSES: usize = 10;
    let mut failures = Vec::new();
    // On a TLS listener each reuse also comes after the connection freed
    // its TLS record buffers (1 s idle) and has to allocate them again.
    // The TLS connections run on their own after the others, with one
    // connector between them: their setup (in a debug build, on 2 cores)
    // would otherwise delay the other clients' requests past the 0.1 s of
    // margin.
    let connector = RawClient::tls_connector(&bed.ca_path);
    for phase in [&CARRIERS[..2], &CARRIERS[2..]] {
        let mut tasks = Vec::new();
        for &carrier in phase {
            for i in 0..CONNECTIONS {
                let (listen, tls, connector) = (bed.proxy.listen, bed.tls, connector.clone());
                tasks.push(tokio::spawn(async move {
                    // Spread the connections over the 1.9 s.
                    tokio::time::sleep(Duration::from_millis(i as u64 * 1900 / CONNECTIONS as u64))
                        .await;
                    let mut c = match carrier {
                        Carrier::Tls => {
                            RawClient::connect_tls_using(tls, &connector, PUBLIC_NAME).await
                        }
                        _ => RawClient::connect(listen).await,
                    };
                    if carrier == Carrier::Pingora {
                        c.send(
                            format!(
                            "{VIA_PINGORA} /w HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nContent-Length: 0\r\n\r\n"
                        )
                            .as_bytes(),
                        )
                        .await;
                    } else {
                        c.send(get("/first").as_bytes()).await;
                    }
                    let mut failures = Vec::new();
                    if let Err(e) = c.response(false).await {
                        failures.push(format!("first: {e}"));
                    }
                    for n in 0..REUSES {
                        tokio::time::sleep(Duration::from_millis(1900)).await;
                        match request(&mut c, "/reuse").await {
                            Ok(200) => {}
                            other => {
                                failures.push(format!("{carrier:?} reuse {n}: {other:?}"));
                                break;
                            }
                        }
                    }
                    failures
                }));
            }
        }
        for t in tasks {
            failures.extend(t.await.unwrap());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} reuses failed: {failures:?}",
        failures.len(),
        CARRIERS.len() * CONNECTIONS * REUSES
    );

    // Past the timeout, each carrier closes the connection without a word.
    for carrier in CARRIERS {
        let mut c = open(&bed, carrier).await;
        if carrier == Carrier::Fast {
            assert_eq!(request(&mut c, "/x").await, Ok(200));
        }
        let started = std::time::Instant::now();
        c.closes_within(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{carrier:?}: {e}"));
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(1900) && after < Duration::from_secs(4),
            "{carrier:?}: closed after {after:?}, keepalive_timeout is 2s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickled_past_the_header_timeout_gets_408_and_the_connection_closes() {
    let bed = start(", header_timeout: 1s").await;
    for carrier in CARRIERS {
        let mut c = open(&bed, carrier).await;
        let head = get("/trickled");
        let started = std::time::Instant::now();
        let mut answered = None;
        // One byte every 200 ms: 40 bytes would take 8 s.
        for b in head.as_bytes().iter().take(40) {
            c.send(&[*b]).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if started.elapsed() > Duration::from_millis(1500) {
                answered = Some(c.response(false).await);
                break;
            }
        }
        let answer = answered.expect("still sending after 1.5 s");
        let answer = answer.unwrap_or_else(|e| panic!("{carrier:?}: no 408: {e}"));
        assert_eq!(answer.status(), 408, "{carrier:?}");
        c.closes()
            .await
            .unwrap_or_else(|e| panic!("{carrier:?}: {e}"));
    }
    let metrics = bed.proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "cutover_rejected_requests_total",
            &[("reason", "header_timeout")]
        ),
        Some(3.0),
        "{metrics}"
    );
    // The access log is written in batches: wait for its lines.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(&bed.access_log).unwrap_or_default();
        let timed_out = log.lines().filter(|l| l.contains("\"status\":408")).count();
        if timed_out == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{timed_out} lines of 408: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A head that arrives whole is still served at once.
    let mut c = RawClient::connect(bed.proxy.listen).await;
    assert_eq!(request(&mut c, "/whole").await, Ok(200));
}

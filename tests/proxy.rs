//! The request path end to end: real sockets, real TLS with certificates made
//! here, the rehearsal edge behind the real `cutover` binary.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use cutover::rehearsal::demo::{NEW_DIST, NEW_NAME, PUBLIC_NAME};
use cutover::rehearsal::edge::pattern_byte;
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_rewritten_and_new_distribution_answers() {
    let bed = Bed::start().await;
    let proxy = Proxy::start(bed.dir.path(), &bed.config(""), Some(&bed.hosts_file));

    let r = proxy.get(PUBLIC_NAME, "/ruok").await;
    assert_eq!(r.status, 200, "{}", proxy.log());
    assert_eq!(r.body_text(), "ok-new-cdn");

    let seen = bed.edge.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.distribution.as_deref(), Some("d-new"));
    assert_eq!(s.host.as_deref(), Some(NEW_NAME));
    assert_eq!(s.sni.as_deref(), Some(NEW_NAME));
    assert_eq!(s.x_forwarded_for.as_deref(), Some("127.0.0.1"));
    assert_eq!(s.x_forwarded_proto.as_deref(), Some("http"));
    assert_eq!(s.x_forwarded_host.as_deref(), Some(PUBLIC_NAME));

    // Host matching ignores case, port and a trailing dot.
    let r = proxy.get("CDN.Example.TEST.:8080", "/ruok").await;
    assert_eq!(r.body_text(), "ok-new-cdn");

    let labels = [
        ("upstream", "new-cloudfront"),
        ("code", "200"),
        ("phase", "test"),
    ];
    let m = proxy
        .metrics_when("cutover_requests_total", &labels, 2.0)
        .await;
    assert_eq!(
        sample(&m, "cutover_requests_total", &labels),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let bed = Bed::start().await;
    let proxy = Proxy::start(bed.dir.path(), &bed.config(""), Some(&bed.hosts_file));
    // One keep-alive client: a handful of upstream TLS connections carry
    // everything. (Pingora returns an upstream connection to the pool just
    // after the response, so the next request sometimes finds it still out.)
    let mut client = Client::connect(proxy.listen).await.unwrap();
    for _ in 0..200 {
        assert_eq!(
            client.get(PUBLIC_NAME, "/ruok", &[]).await.unwrap().status,
            200
        );
    }
    let handshakes = bed.edge.tls_connections();
    assert!(
        handshakes <= 5,
        "{handshakes} TLS connections for 200 keep-alive requests"
    );
    // A new client connection per request, spread over the proxy's threads:
    // still pooled upstream. (A request can start before the previous one's
    // upstream connection is back in the pool, so a few extra are normal.)
    for _ in 0..200 {
        assert_eq!(proxy.get(PUBLIC_NAME, "/ruok").await.status, 200);
    }
    let handshakes = bed.edge.tls_connections();
    assert!(
        handshakes <= 20,
        "{handshakes} TLS connections for 400 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_for_another_name_gives_502_and_nothing_is_served() {
    let bed = Bed::start().await;
    // SNI names a host no distribution owns: the edge shows its default
    // `*.cloudfront.test` certificate, which is not valid for that name.
    let yaml = bed.config("        sni: wrong.example.test\n");
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    let r = proxy.get(PUBLIC_NAME, "/ruok").await;
    assert_eq!(r.status, 502);
    assert!(bed.edge.seen().is_empty(), "{:?}", bed.edge.seen());
    let m = proxy.metrics().await;
    assert!(
        sample(
            &m,
            "cutover_upstream_errors_total",
            &[("kind", "tls"), ("upstream", "new-cloudfront")]
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert!(
        proxy.log().contains("route=cdn upstream=new-cloudfront"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_an_untrusted_ca_gives_502() {
    let bed = Bed::start().await;
    let other = cutover::rehearsal::pki::TestCa::new("someone else").unwrap();
    let other_dir = bed.path("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_ca = other.write_cert(&other_dir).unwrap();
    let yaml = config_yaml(
        &bed.edge.addr(),
        &bed.ca_path,
        bed.dir.path(),
        &format!(
            "      - name: new-cloudfront\n        address: {NEW_DIST}:{}\n        host_header: {NEW_NAME}\n        ca_file: {}\n",
            bed.edge.addr().port(),
            other_ca.display()
        ),
    );
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    assert_eq!(proxy.get(PUBLIC_NAME, "/ruok").await.status, 502);
    assert!(bed.edge.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hosts_get_421_and_reach_nothing() {
    let bed = Bed::start().await;
    let proxy = Proxy::start(bed.dir.path(), &bed.config(""), Some(&bed.hosts_file));

    let r = proxy.get("evil.test", "/ruok").await;
    assert_eq!(r.status, 421);
    // The upstream names themselves are not routes either.
    assert_eq!(proxy.get(NEW_NAME, "/ruok").await.status, 421);
    assert_eq!(proxy.get(NEW_DIST, "/ruok").await.status, 421);

    // Absolute-form: the target's authority decides, never an address in it.
    let (status, _) = raw_request(
        proxy.listen,
        b"GET http://evil.test/ruok HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    );
    assert!(status.contains(" 421 "), "{status}");
    let (status, _) = raw_request(
        proxy.listen,
        b"GET http://evil.test/ruok HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(status.contains(" 421 "), "{status}");
    // A Host that contradicts the target is refused before routing.
    let (status, _) = raw_request(
        proxy.listen,
        b"GET http://evil.test/ruok HTTP/1.1\r\nHost: cdn.example.test\r\nConnection: close\r\n\r\n",
    );
    assert!(status.contains(" 400 "), "{status}");
    assert!(bed.edge.seen().is_empty(), "{:?}", bed.edge.seen());

    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "cutover_unmatched_requests_total", &[("phase", "test")]),
        Some(5.0),
        "{m}"
    );

    // An absolute-form request for a routed name goes upstream in origin-form
    // with the rewritten Host.
    let (status, body) = raw_request(
        proxy.listen,
        b"GET http://cdn.example.test/ruok HTTP/1.1\r\nHost: cdn.example.test\r\nConnection: close\r\n\r\n",
    );
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("ok-new-cdn"));
    let seen = bed.edge.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].host.as_deref(), Some(NEW_NAME));
    assert_eq!(seen[0].path, "/ruok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_and_the_proxy_keeps_serving() {
    let bed = Bed::start().await;
    let mut proxy = Proxy::start(bed.dir.path(), &bed.config(""), Some(&bed.hosts_file));
    let cases: &[(&[u8], &str)] = &[
        (b"GET /ruok HTTP/1.1\r\nConnection: close\r\n\r\n", " 400 "),
        (b"GET /ruok HTTP/1.1\r\nHost: cdn.example.test\r\nHost: cdn.example.test\r\n\r\n", " 400 "),
        (b"GET /ruok HTTP/1.1\r\nHost: cdn example test\r\n\r\n", " 400 "),
        (b"GET /ruok HTTP/1.1\r\nHost: \r\n\r\n", " 400 "),
        (b"GET /ruok HTTP/1.1\r\nHost: user@cdn.example.test\r\n\r\n", " 400 "),
        (b"CONNECT cdn.example.test:443 HTTP/1.1\r\nHost: cdn.example.test:443\r\n\r\n", " 405 "),
        (b"NONSENSE\r\n\r\n", " 400 "),
        (b"GET /ruok HTTP/1.1\r\nHost: cdn.example.test\r\nContent-Length: banana\r\n\r\n", " 400 "),
        (b"POST /ruok HTTP/1.1\r\nHost: cdn.example.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", " 400 "),
    ];
    for (req, want) in cases {
        let (status, _) = raw_request(proxy.listen, req);
        assert!(
            status.contains(want),
            "{:?} -> {status:?}",
            String::from_utf8_lossy(req)
        );
        // Still serving after each.
        assert_eq!(
            proxy.get(PUBLIC_NAME, "/ruok").await.body_text(),
            "ok-new-cdn"
        );
    }
    assert!(bed
        .edge
        .seen()
        .iter()
        .all(|s| s.path == "/ruok" && s.host.as_deref() == Some(NEW_NAME)));
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "proxy died:\n{}",
        proxy.log()
    );
    let log = proxy.log();
    assert!(log.contains("400 bad_host: no Host header"), "{log}");
    assert!(log.contains("405 connect_method"), "{log}");
    let m = proxy.metrics().await;
    // Two Host fields, userinfo, a bad request line and bad Content-Lengths
    // are refused by Pingora's parser itself (counted through its hook).
    for (reason, n) in [
        ("bad_host", 3.0),
        ("connect_method", 1.0),
        ("malformed", 5.0),
    ] {
        assert_eq!(
            sample(&m, "cutover_rejected_requests_total", &[("reason", reason)]),
            Some(n),
            "{reason}: {m}"
        );
    }
}

/// A streaming GET through the proxy; checks every byte against the edge's pattern.
async fn download_and_check(proxy: &Proxy, len: u64) {
    let tcp = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("/bytes/{len}"))
        .header("host", PUBLIC_NAME)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut offset = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            for (i, b) in data.iter().enumerate() {
                assert_eq!(
                    *b,
                    pattern_byte(offset + i as u64),
                    "byte {}",
                    offset + i as u64
                );
            }
            offset += data.len() as u64;
        }
    }
    assert_eq!(offset, len);
}

/// A streaming POST, body generated as it is sent, to `path`; returns the
/// response body. The edge's `/upload` checks every byte as it arrives.
async fn upload(proxy: &Proxy, path: &str, len: u64) -> String {
    let tcp = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >(4);
    tokio::spawn(async move {
        let mut offset = 0u64;
        while offset < len {
            let n = (256 * 1024).min(len - offset);
            let chunk: Vec<u8> = (offset..offset + n).map(pattern_byte).collect();
            if tx
                .send(Ok(hyper::body::Frame::data(Bytes::from(chunk))))
                .await
                .is_err()
            {
                return;
            }
            offset += n;
        }
    });
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let req = http::Request::post(path)
        .header("host", PUBLIC_NAME)
        .header("content-length", len)
        .body(body)
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).trim().to_string()
}

/// Adapt an mpsc receiver to the `Stream` that `StreamBody` wants.
fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct S<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_both_ways() {
    let bed = Bed::start().await;
    let proxy = Proxy::start(bed.dir.path(), &bed.config(""), Some(&bed.hosts_file));
    download_and_check(&proxy, 1 << 20).await;
    download_and_check(&proxy, 64 << 20).await;
    assert_eq!(
        upload(&proxy, "/upload", 1 << 20).await,
        "received=1048576 pattern=ok"
    );
    assert_eq!(
        upload(&proxy, "/upload", 64 << 20).await,
        "received=67108864 pattern=ok"
    );
    // Streaming, not buffering: 64 MiB each way never sat in the proxy's memory.
    let peak = proxy.peak_rss_kib();
    assert!(
        peak < 48 * 1024,
        "peak RSS {peak} KiB suggests a body was buffered whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_gives_504_within_its_read_timeout() {
    let bed = Bed::start().await;
    let proxy = Proxy::start(
        bed.dir.path(),
        &bed.config("        timeouts: { read: 1s }\n"),
        Some(&bed.hosts_file),
    );
    let started = Instant::now();
    let r = proxy.get(PUBLIC_NAME, "/stall").await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(
        proxy.get(PUBLIC_NAME, "/ruok").await.body_text(),
        "ok-new-cdn"
    );
    let m = proxy
        .metrics_when("cutover_requests_total", &[("code", "504")], 1.0)
        .await;
    assert_eq!(
        sample(&m, "cutover_upstream_errors_total", &[("kind", "timeout")]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "cutover_requests_total", &[("code", "504")]),
        Some(1.0),
        "{m}"
    );
    assert!(
        proxy
            .log()
            .contains("504 route=cdn upstream=new-cloudfront kind=timeout"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_resets_or_never_handshakes_gives_502_or_504() {
    let bed = Bed::start().await;
    // One listener that resets every connection, one that accepts and stays silent.
    let reset = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (reset_addr, silent_addr) = (reset.local_addr().unwrap(), silent.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in reset.incoming().flatten() {
            let sock = socket2_linger_zero(s);
            drop(sock);
        }
    });
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let held2 = held.clone();
    std::thread::spawn(move || {
        for s in silent.incoming().flatten() {
            held2.lock().unwrap().push(s);
        }
    });
    let yaml = format!(
        "{}  - name: broken\n    hosts: [reset.example.test]\n    upstreams:\n      - name: resetter\n        address: {reset_addr}\n        sni: {NEW_NAME}\n  - name: silent\n    hosts: [silent.example.test]\n    upstreams:\n      - name: mute\n        address: {silent_addr}\n        sni: {NEW_NAME}\n        timeouts: {{ connect: 1s }}\n",
        bed.config("")
    );
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    assert_eq!(proxy.get("reset.example.test", "/").await.status, 502);
    let started = Instant::now();
    assert_eq!(proxy.get("silent.example.test", "/").await.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        proxy.get(PUBLIC_NAME, "/ruok").await.body_text(),
        "ok-new-cdn"
    );
    let m = proxy.metrics().await;
    assert!(
        sample(
            &m,
            "cutover_upstream_errors_total",
            &[("upstream", "resetter"), ("kind", "tls")]
        )
        .unwrap_or(0.0)
            + sample(
                &m,
                "cutover_upstream_errors_total",
                &[("upstream", "resetter"), ("kind", "reset")]
            )
            .unwrap_or(0.0)
            + sample(
                &m,
                "cutover_upstream_errors_total",
                &[("upstream", "resetter"), ("kind", "connect")]
            )
            .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "cutover_upstream_errors_total",
            &[("upstream", "mute"), ("kind", "timeout")]
        ),
        Some(1.0),
        "{m}"
    );
}

/// Close with an RST instead of a FIN: SO_LINGER with a zero timeout.
fn socket2_linger_zero(s: std::net::TcpStream) -> std::net::TcpStream {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid socket we own, with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_follow_a_dns_change_without_restart() {
    // Two edges on different loopback addresses, same port.
    let bed = Bed::start_on("127.0.0.2:0".parse().unwrap()).await;
    let port = bed.edge.addr().port();
    let second = cutover::rehearsal::edge::Edge::start(
        format!("127.0.0.3:{port}").parse().unwrap(),
        &bed.ca,
        cutover::rehearsal::demo::distributions(),
    )
    .await
    .unwrap();
    // Short idle timeout so pooled connections to the old address do not linger.
    let proxy = Proxy::start(
        bed.dir.path(),
        &bed.config("        timeouts: { idle: 1s }\n"),
        Some(&bed.hosts_file),
    );
    assert_eq!(
        proxy.get(PUBLIC_NAME, "/ruok").await.body_text(),
        "ok-new-cdn"
    );
    assert_eq!(bed.edge.seen().len(), 1);
    assert!(second.seen().is_empty());

    write_hosts(&bed.hosts_file, "127.0.0.3".parse().unwrap());
    // dns_refresh is 1s: within a few refreshes, requests land on the second edge.
    let deadline = Instant::now() + Duration::from_secs(15);
    while second.seen().is_empty() {
        assert!(
            Instant::now() < deadline,
            "requests never moved:\n{}",
            proxy.log()
        );
        assert_eq!(proxy.get(PUBLIC_NAME, "/ruok").await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = bed.edge.seen().len();
    for _ in 0..20 {
        assert_eq!(
            proxy.get(PUBLIC_NAME, "/ruok").await.body_text(),
            "ok-new-cdn"
        );
    }
    assert_eq!(
        bed.edge.seen().len(),
        before,
        "old address still used after the change"
    );
    assert!(
        proxy.log().contains("resolves to [127.0.0.3:"),
        "{}",
        proxy.log()
    );

    // A name that stops resolving keeps its last good address.
    std::fs::write(&bed.hosts_file, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !proxy.log().contains("cannot resolve d-new.cloudfront.test") {
        assert!(
            Instant::now() < deadline,
            "no resolution failure logged:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        proxy.get(PUBLIC_NAME, "/ruok").await.body_text(),
        "ok-new-cdn"
    );

    // An answer of nothing usable, and lines that are not hosts lines:
    // counted, logged, the last good address kept, the proxy serving.
    std::fs::write(
        &bed.hosts_file,
        format!("0.0.0.0 {NEW_DIST}\n:: {NEW_DIST}\nthis is not a hosts line\n\u{1}\u{2}\n"),
    )
    .unwrap();
    let m = proxy
        .metrics_when(
            "cutover_dns_addresses_dropped_total",
            &[("name", NEW_DIST), ("reason", "unusable")],
            2.0,
        )
        .await;
    assert_eq!(
        sample(
            &m,
            "cutover_dns_addresses_dropped_total",
            &[("name", NEW_DIST), ("reason", "unusable")]
        ),
        Some(2.0),
        "{m}"
    );
    assert!(
        sample_sum(&m, "cutover_hosts_file_bad_lines_total") >= 2.0,
        "{m}"
    );
    assert!(
        proxy.log().contains("resolved to no usable auto address"),
        "{}",
        proxy.log()
    );
    for _ in 0..5 {
        assert_eq!(
            proxy.get(PUBLIC_NAME, "/ruok").await.body_text(),
            "ok-new-cdn"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_header_edits_and_verify_false_warning() {
    let bed = Bed::start().await;
    let issued = bed.ca.issue(&[PUBLIC_NAME]).unwrap();
    let (cert, key) = issued.write_pair(bed.dir(), "listener").unwrap();
    let tls_port = free_port();
    let yaml = bed
        .config("")
        .replace(
            "listeners:\n  - address: 127.0.0.1:0\n",
            &format!(
                "listeners:\n  - address: 127.0.0.1:0\n  - address: {tls_port}\n    tls: {{ cert: {}, key: {} }}\n",
                cert.display(),
                key.display()
            ),
        )
        .replace(
            "    upstreams:\n",
            "    request_headers: { set: { X-Migration: test }, remove: [Cookie] }\n    response_headers: { set: { X-Served-Via: cutover }, remove: [x-edge-sni] }\n    upstreams:\n",
        );
    // A second route whose upstream skips certificate checks: allowed, but loud.
    let yaml = format!(
        "{yaml}  - name: lax\n    hosts: [lax.example.test]\n    upstreams:\n      - name: unverified\n        address: {NEW_DIST}:{}\n        host_header: {NEW_NAME}\n        verify: false\n",
        bed.edge.addr().port()
    );
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    assert!(
        proxy
            .log()
            .contains("verify: false, the upstream certificate is NOT checked"),
        "{}",
        proxy.log()
    );

    let r = cutover::shift::probe::get(
        &cutover::shift::probe::Target {
            connect: tls_port,
            tls: Some(cutover::shift::probe::TlsTarget {
                sni: PUBLIC_NAME.into(),
                ca_files: vec![bed.ca_path.clone()],
                system_roots: true,
                verify: true,
            }),
            host: PUBLIC_NAME.into(),
            path: "/ruok".into(),
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.body_text(), "ok-new-cdn");
    assert_eq!(r.headers.get("x-served-via").unwrap(), "cutover");
    assert!(r.headers.get("x-edge-sni").is_none());
    assert_eq!(r.headers.get("x-edge-distribution").unwrap(), "d-new");
    let seen = bed.edge.seen();
    assert_eq!(seen[0].x_forwarded_proto.as_deref(), Some("https"));

    // Client X-Forwarded-For is kept and the peer appended.
    let (status, _) = raw_request(
        proxy.listen,
        b"GET /ruok HTTP/1.1\r\nHost: cdn.example.test\r\nX-Forwarded-For: 203.0.113.9\r\nCookie: a=b\r\nConnection: close\r\n\r\n",
    );
    assert!(status.contains(" 200 "), "{status}");
    let seen = bed.edge.seen();
    assert_eq!(
        seen[1].x_forwarded_for.as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(seen[1].x_migration.as_deref(), Some("test"));
    assert_eq!(seen[1].cookie, None);

    assert_eq!(
        proxy.get("lax.example.test", "/ruok").await.body_text(),
        "ok-new-cdn"
    );
}

/// A TCP stream whose writes can be held back and then sent in one piece,
/// so that two TLS records arrive in one segment.
#[derive(Debug)]
struct HeldWrites {
    tcp: std::net::TcpStream,
    hold: bool,
    pending: Vec<u8>,
}

impl std::io::Read for HeldWrites {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tcp.read(buf)
    }
}

impl std::io::Write for HeldWrites {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.hold {
            self.pending.extend_from_slice(buf);
            return Ok(buf.len());
        }
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// Two requests in two TLS records that arrive together: OpenSSL reads both
/// records off the socket (read-ahead) but returns one at a time, so the
/// second request waits in OpenSSL's buffer while the socket has nothing.
/// The fast path waits for the socket before reading through OpenSSL
/// (`model::peer::read_when_ready`); it must see the buffered record and
/// answer at once, not wait for bytes that will never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tls_records_in_one_segment_are_two_answered_requests() {
    use std::io::{Read, Write};
    let bed = Bed::start().await;
    let issued = bed.ca.issue(&[PUBLIC_NAME]).unwrap();
    let (cert, key) = issued.write_pair(bed.dir(), "listener").unwrap();
    let tls_port = free_port();
    let yaml = bed.config("").replace(
        "listeners:\n  - address: 127.0.0.1:0\n",
        &format!(
            "listeners:\n  - address: 127.0.0.1:0\n  - address: {tls_port}\n    tls: {{ cert: {}, key: {} }}\n",
            cert.display(),
            key.display()
        ),
    );
    let _proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    let ca = bed.ca_path.clone();
    let got = tokio::task::spawn_blocking(move || {
        let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
        b.set_ca_file(&ca).unwrap();
        let tcp = std::net::TcpStream::connect(tls_port).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let held = HeldWrites {
            tcp,
            hold: false,
            pending: Vec::new(),
        };
        let mut tls = b.build().connect(PUBLIC_NAME, held).unwrap();
        // A first exchange, so the session tickets are read and the
        // connection is in its steady state.
        let first = b"GET /ruok HTTP/1.1\r\nHost: cdn.example.test\r\n\r\n";
        tls.write_all(first).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("ok-new-cdn") {
            let n = tls.read(&mut buf).expect("the first answer");
            assert!(n > 0, "closed before the first answer");
            seen.extend_from_slice(&buf[..n]);
        }
        // Two records (one write each), sent in one segment.
        tls.get_mut().hold = true;
        tls.write_all(first).unwrap();
        tls.write_all(b"GET /ruok HTTP/1.1\r\nHost: cdn.example.test\r\nConnection: close\r\n\r\n")
            .unwrap();
        let held = tls.get_mut();
        held.hold = false;
        let both = std::mem::take(&mut held.pending);
        held.tcp.write_all(&both).unwrap();
        let mut rest = Vec::new();
        loop {
            match tls.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&rest).matches("ok-new-cdn").count() == 2 {
                break;
            }
        }
        String::from_utf8_lossy(&rest).into_owned()
    })
    .await
    .unwrap();
    assert_eq!(got.matches("HTTP/1.1 200 ").count(), 2, "{got}");
    assert_eq!(got.matches("ok-new-cdn").count(), 2, "{got}");
}

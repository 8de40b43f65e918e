//! Micro-benchmarks of the per-request work that is cutover's own (not Pingora's):
//! authority normalisation + route match, upstream choice, client address,
//! metric recording, and the fast path's head handling as a whole.
//! Run: `cargo bench --bench request_path`.

use std::net::IpAddr;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use cutover::config::{ClientIp, HostPattern};
use cutover::observe::metrics::Metrics;
use cutover::policy::client_ip::client_ip;
use cutover::policy::routing::{normalize_authority, HostTable};
use cutover::shift::selection::{choose, client_point, Candidate};

struct U(u32, bool);
impl Candidate for U {
    fn weight(&self) -> u32 {
        self.0
    }
    fn is_backup(&self) -> bool {
        self.1
    }
    fn is_healthy(&self) -> bool {
        true
    }
}

fn routing(c: &mut Criterion) {
    let hosts: Vec<Vec<HostPattern>> = (0..50)
        .map(|i| vec![HostPattern::Exact(format!("cdn{i}.example.com"))])
        .chain(std::iter::once(vec![HostPattern::Wildcard(
            ".img.example.com".into(),
        )]))
        .collect();
    let table = HostTable::new(hosts.iter().enumerate().map(|(i, h)| (i, h.as_slice())));
    c.bench_function("route_for_host exact (Host: CDN7.Example.com:443)", |b| {
        b.iter(|| {
            let h = normalize_authority(black_box(b"CDN7.Example.com:443")).unwrap();
            black_box(table.route_for_host(h.as_str()))
        })
    });
    c.bench_function("route_for_host wildcard (a.b.img.example.com)", |b| {
        b.iter(|| {
            let h = normalize_authority(black_box(b"a.b.img.example.com")).unwrap();
            black_box(table.route_for_host(h.as_str()))
        })
    });
    c.bench_function("route_for_host miss (evil.test)", |b| {
        b.iter(|| {
            let h = normalize_authority(black_box(b"evil.test")).unwrap();
            black_box(table.route_for_host(h.as_str()))
        })
    });
}

fn selection(c: &mut Criterion) {
    let two = [U(90, false), U(10, false)];
    let three = [U(50, false), U(50, false), U(0, true)];
    let ip: IpAddr = "203.0.113.77".parse().unwrap();
    c.bench_function("choose sticky 90/10 (hash + pick)", |b| {
        b.iter(|| black_box(choose(&two, client_point(black_box(ip)), None)))
    });
    c.bench_function("choose failover (exclude first, backup present)", |b| {
        b.iter(|| black_box(choose(&three, black_box(0x1234_5678_9abc_def0), Some(0))))
    });
    let settings = ClientIp {
        header: Some(http::HeaderName::from_static("x-forwarded-for")),
        trusted: vec!["10.0.0.0/8".parse().unwrap()],
        forward: Default::default(),
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("x-forwarded-for", "198.51.100.4, 10.1.2.3".parse().unwrap());
    let peer: IpAddr = "10.0.0.9".parse().unwrap();
    c.bench_function("client_ip from trusted X-Forwarded-For", |b| {
        b.iter(|| black_box(client_ip(&settings, black_box(peer), &headers)))
    });
}

fn metrics(c: &mut Criterion) {
    let m = Metrics::new();
    let up = m.upstream("phase-2", "cdn", "new-cloudfront");
    c.bench_function("record request (count + histogram + bytes)", |b| {
        b.iter(|| {
            up.count_response(black_box(200));
            up.duration.observe(black_box(0.0042));
            up.response_bytes.inc_by(black_box(4096));
        })
    });
}

/// The upstream request rewrite: Host plus the three X-Forwarded-* headers on
/// a Pingora request header, with header names given as `HeaderName` (what
/// cutover did first) and as titled `&'static str` (what it does now).
fn header_rewrite(c: &mut Criterion) {
    use pingora::http::RequestHeader;
    let host = http::HeaderValue::from_static("cdn-new.example.test");
    let original = http::HeaderValue::from_static("cdn.example.test");
    let fresh = || {
        let mut req = RequestHeader::build("GET", b"/ruok", None).unwrap();
        req.insert_header("Host", "cdn.example.test").unwrap();
        req
    };
    c.bench_function("header rewrite, HeaderName names", |b| {
        b.iter_batched(
            fresh,
            |mut req| {
                req.insert_header(http::header::HOST, host.clone()).unwrap();
                req.insert_header(
                    http::HeaderName::from_static("x-forwarded-for"),
                    "127.0.0.1",
                )
                .unwrap();
                req.insert_header(http::HeaderName::from_static("x-forwarded-proto"), "http")
                    .unwrap();
                req.insert_header(
                    http::HeaderName::from_static("x-forwarded-host"),
                    original.clone(),
                )
                .unwrap();
                req
            },
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("header rewrite, titled &'static str names", |b| {
        b.iter_batched(
            fresh,
            |mut req| {
                req.insert_header(http::header::HOST, host.clone()).unwrap();
                req.insert_header("X-Forwarded-For", "127.0.0.1").unwrap();
                req.insert_header("X-Forwarded-Proto", "http").unwrap();
                req.insert_header("X-Forwarded-Host", original.clone())
                    .unwrap();
                req
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// The fast path's whole per-request work apart from I/O: parse the client's
/// head (as wrk sends it), check it, route it, choose the upstream, write the
/// upstream request; then parse the upstream's response head and write the
/// client's.
fn fast_path(c: &mut Criterion) {
    use cutover::model::Process;
    let yaml = "phase: bench\nlisteners:\n  - address: 127.0.0.1:8080\nroutes:\n  - name: cdn\n    hosts: [cdn.example.test]\n    upstreams:\n      - name: new\n        address: 127.0.0.1:443\n        sni: cdn-new.example.test\n        host_header: cdn-new.example.test\n";
    let config = cutover::config::parse(std::path::Path::new("bench.yaml"), yaml).unwrap();
    let process = Process::new(
        config,
        std::sync::Arc::new(Metrics::new()),
        std::sync::Arc::new(cutover::model::dns::Resolver::new(None)),
        None,
    );
    let model = process.model();
    let request = b"GET /ruok HTTP/1.1\r\nHost: cdn.example.test\r\n\r\n";
    let browser = b"GET /assets/app.js?v=3 HTTP/1.1\r\nHost: cdn.example.test\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0\r\nAccept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nReferer: https://www.example.test/\r\nConnection: keep-alive\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 28 Nov 2026 08:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: keep-alive\r\n\r\n";
    let redirect = b"HTTP/1.1 302 Found\r\nServer: nginx\r\nDate: Sat, 28 Nov 2026 08:00:00 GMT\r\nLocation: https://cdn-new.example.test/moved\r\nSet-Cookie: s=1; Domain=cdn-new.example.test; Path=/\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n";
    let mut out = Vec::with_capacity(4096);
    c.bench_function("fast path request head (wrk request)", |b| {
        b.iter(|| {
            assert!(cutover::paths::fast::prepare_request(
                black_box(request),
                &model,
                Some("127.0.0.1"),
                &mut out
            ))
        })
    });
    c.bench_function("fast path request head (browser request, 8 headers)", |b| {
        b.iter(|| {
            assert!(cutover::paths::fast::prepare_request(
                black_box(browser),
                &model,
                Some("127.0.0.1"),
                &mut out
            ))
        })
    });
    c.bench_function("fast path response head (6 headers)", |b| {
        b.iter(|| {
            assert!(cutover::paths::fast::prepare_response(
                black_box(response),
                &model.routes[0].upstreams[0].plan,
                &mut out
            ))
        })
    });
    c.bench_function(
        "fast path response head (302, Location + Set-Cookie rewritten)",
        |b| {
            b.iter(|| {
                assert!(cutover::paths::fast::prepare_response(
                    black_box(redirect),
                    &model.routes[0].upstreams[0].plan,
                    &mut out
                ))
            })
        },
    );
}

criterion_group!(
    benches,
    routing,
    selection,
    metrics,
    header_rewrite,
    fast_path
);
criterion_main!(benches);

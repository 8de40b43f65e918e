//! Metrics, admin endpoints, access logs and `cutover verify`, against the
//! rehearsal edge and the real binary.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use cutover::rehearsal::demo::{NEW_DIST, NEW_NAME, PUBLIC_NAME};

/// Parse a scrape with a real Prometheus text-format parser; samples by
/// metric name and sorted label pairs.
type Samples = HashMap<(String, Vec<(String, String)>), f64>;

fn parse(text: &str) -> Samples {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    scrape
        .samples
        .into_iter()
        .filter_map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            Some(((s.metric, labels), value))
        })
        .collect()
}

fn get(map: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    map.get(&(name.to_string(), l)).copied()
}

fn promtool_check_metrics(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`) must be installed; .ci/run installs it");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn with_broken_route(bed: &Bed, base: &str) -> String {
    format!(
        "{base}  - name: broken\n    hosts: [broken.example.test]\n    upstreams:\n      - name: wrong-cert\n        address: {NEW_DIST}:{}\n        sni: wrong.example.test\n        ca_file: {}\n",
        bed.edge.addr().port(),
        bed.ca_path.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic_exactly() {
    let bed = Bed::start().await;
    let proxy = Proxy::start(
        bed.dir.path(),
        &with_broken_route(&bed, &bed.config("")),
        Some(&bed.hosts_file),
    );
    let mut client = Client::connect(proxy.listen).await.unwrap();
    for _ in 0..5 {
        assert_eq!(
            client.get(PUBLIC_NAME, "/ruok", &[]).await.unwrap().status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            client
                .get(PUBLIC_NAME, "/status/404", &[])
                .await
                .unwrap()
                .status,
            404
        );
    }
    assert_eq!(proxy.get("unknown.example.test", "/").await.status, 421);
    assert_eq!(proxy.get("broken.example.test", "/").await.status, 502);

    // Requests are counted when their logging stage runs, just after the
    // client has its answer: wait for the last one.
    proxy
        .metrics_when(
            "cutover_requests_total",
            &[("route", "broken"), ("code", "502")],
            1.0,
        )
        .await;
    let text = proxy
        .metrics_when(
            "cutover_request_duration_seconds_count",
            &[("upstream", "new-cloudfront")],
            7.0,
        )
        .await;
    let m = parse(&text);
    let cdn = |code: &str| {
        get(
            &m,
            "cutover_requests_total",
            &[
                ("phase", "test"),
                ("route", "cdn"),
                ("upstream", "new-cloudfront"),
                ("code", code),
            ],
        )
    };
    assert_eq!(cdn("200"), Some(5.0), "{text}");
    assert_eq!(cdn("404"), Some(2.0), "{text}");
    assert_eq!(cdn("502"), None, "{text}");
    assert_eq!(
        get(
            &m,
            "cutover_requests_total",
            &[
                ("phase", "test"),
                ("route", "broken"),
                ("upstream", "wrong-cert"),
                ("code", "502")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        get(
            &m,
            "cutover_upstream_errors_total",
            &[
                ("phase", "test"),
                ("route", "broken"),
                ("upstream", "wrong-cert"),
                ("kind", "tls")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            &m,
            "cutover_upstream_errors_total",
            &[
                ("phase", "test"),
                ("route", "cdn"),
                ("upstream", "new-cloudfront"),
                ("kind", "tls")
            ]
        ),
        Some(0.0)
    );
    assert_eq!(
        get(&m, "cutover_unmatched_requests_total", &[("phase", "test")]),
        Some(1.0)
    );
    // "ok-new-cdn\n" five times; the 404s have empty bodies.
    assert_eq!(
        get(
            &m,
            "cutover_response_bytes_total",
            &[
                ("phase", "test"),
                ("route", "cdn"),
                ("upstream", "new-cloudfront")
            ]
        ),
        Some(55.0)
    );
    assert_eq!(
        get(
            &m,
            "cutover_upstream_weight",
            &[("route", "cdn"), ("upstream", "new-cloudfront")]
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            &m,
            "cutover_upstream_healthy",
            &[("route", "cdn"), ("upstream", "new-cloudfront")]
        ),
        Some(1.0)
    );
    assert_eq!(
        get(&m, "cutover_phase_info", &[("phase", "test")]),
        Some(1.0)
    );
    assert_eq!(
        get(
            &m,
            "cutover_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(
        get(&m, "cutover_config_reloads_total", &[("result", "success")]),
        Some(0.0)
    );
    assert_eq!(
        get(&m, "cutover_config_reloads_total", &[("result", "failure")]),
        Some(0.0)
    );
    assert!(
        text.contains("cutover_request_duration_seconds_bucket{"),
        "{text}"
    );
    promtool_check_metrics(&text);
}

async fn admin_get(proxy: &Proxy, path: &str) -> (u16, String) {
    let r = cutover::shift::probe::get(
        &cutover::shift::probe::Target {
            connect: proxy.admin,
            tls: None,
            host: "localhost".into(),
            path: path.into(),
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    (r.status.as_u16(), r.body_text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz() {
    let bed = Bed::start().await;
    let proxy = Proxy::start(bed.dir.path(), &bed.config(""), Some(&bed.hosts_file));
    assert_eq!(admin_get(&proxy, "/healthz").await.0, 200);
    assert_eq!(
        admin_get(&proxy, "/readyz").await,
        (200, "ready".to_string())
    );
    assert_eq!(admin_get(&proxy, "/nope").await.0, 404);

    // A route whose only upstream never resolves: alive, not ready.
    let yaml = bed.config("").replace(
        &format!("{NEW_DIST}:{}", bed.edge.addr().port()),
        "nowhere.invalid:443",
    );
    let dir = bed.path("unready");
    std::fs::create_dir_all(&dir).unwrap();
    let unready = Proxy::start(&dir, &yaml, Some(&bed.hosts_file));
    assert_eq!(admin_get(&unready, "/healthz").await.0, 200);
    let (status, body) = admin_get(&unready, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("route cdn"), "{body}");
    // It still answers, with a 502, and keeps serving.
    assert_eq!(unready.get(PUBLIC_NAME, "/ruok").await.status, 502);
    assert_eq!(unready.get(PUBLIC_NAME, "/ruok").await.status, 502);
}

/// The standard test config with an access log in `format` written to `path`.
fn with_access_log(bed: &Bed, format: &str, path: &str) -> String {
    bed.config("").replace(
        "dns_refresh: 1s\n",
        &format!("dns_refresh: 1s\naccess_log: {{ format: {format}, path: {path} }}\n"),
    )
}

/// The file's lines once one contains `needle` (or after 10 s).
fn wait_for_line_with(path: &std::path::Path, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = wait_for_lines(path, 1);
        if lines.iter().any(|l| l.contains(needle)) || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_survives_rotation() {
    let bed = Bed::start().await;
    let log = bed.path("access.log");
    let yaml = with_access_log(&bed, "json", &log.display().to_string());
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    let mut client = Client::connect(proxy.listen).await.unwrap();
    client
        .get(PUBLIC_NAME, "/ruok?x=1", &[("user-agent", "test")])
        .await
        .unwrap();
    assert_eq!(proxy.get("evil.test", "/").await.status, 421);

    let lines = wait_for_lines(&log, 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    // Each request logs when it ends, on whichever thread served it: find
    // the lines by content, not by order.
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = parsed
        .iter()
        .find(|v| v["status"] == 200)
        .expect("the 200 line");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], PUBLIC_NAME);
    assert_eq!(first["path"], "/ruok?x=1");
    assert_eq!(first["route"], "cdn");
    assert_eq!(first["upstream"], "new-cloudfront");
    assert_eq!(first["upstream_addr"], bed.edge.addr().to_string());
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["phase"], "test");
    assert_eq!(first["bytes"], 11);
    assert!(first["duration"].as_f64().unwrap() > 0.0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    let second = parsed
        .iter()
        .find(|v| v["status"] == 421)
        .expect("the 421 line");
    assert_eq!(second["route"], "-");

    // logrotate without copytruncate: the file is moved away; a new one appears.
    let rotated = bed.path("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() {
        assert!(
            Instant::now() < deadline,
            "log not reopened:\n{}",
            proxy.log()
        );
        client.get(PUBLIC_NAME, "/ruok", &[]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
        .get(PUBLIC_NAME, "/after-rotation", &[])
        .await
        .unwrap();
    let lines = wait_for_line_with(&log, "/after-rotation");
    assert!(
        lines.iter().any(|l| l.contains("/after-rotation")),
        "{lines:?}"
    );
    assert!(wait_for_lines(&rotated, 2).len() >= 2);
    // Deleted outright: reopened too.
    std::fs::remove_file(&log).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() {
        assert!(
            Instant::now() < deadline,
            "log not recreated:\n{}",
            proxy.log()
        );
        client.get(PUBLIC_NAME, "/ruok", &[]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_access_log_and_a_full_disk() {
    let bed = Bed::start().await;
    let log = bed.path("combined.log");
    let yaml = with_access_log(&bed, "combined", &log.display().to_string());
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    let mut client = Client::connect(proxy.listen).await.unwrap();
    client
        .get(
            PUBLIC_NAME,
            "/ruok",
            &[
                ("user-agent", "curl/8 \"quoted\""),
                ("referer", "https://r.example/"),
            ],
        )
        .await
        .unwrap();
    let lines = wait_for_lines(&log, 1);
    let line = &lines[0];
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains(
            "] \"GET /ruok HTTP/1.1\" 200 11 \"https://r.example/\" \"curl/8 \\x22quoted\\x22\""
        ),
        "{line}"
    );

    // /dev/full: every write fails with ENOSPC. Logged and counted; requests unaffected.
    let yaml = with_access_log(&bed, "json", "/dev/full");
    let dir = bed.path("full");
    std::fs::create_dir_all(&dir).unwrap();
    let full = Proxy::start(&dir, &yaml, Some(&bed.hosts_file));
    let mut client = Client::connect(full.listen).await.unwrap();
    for _ in 0..20 {
        assert_eq!(
            client.get(PUBLIC_NAME, "/ruok", &[]).await.unwrap().body,
            "ok-new-cdn"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = full.metrics().await;
        if sample(&m, "cutover_access_log_write_errors_total", &[]).unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        full.log().contains("access log: No space left on device"),
        "{}",
        full.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_during_reloads_always_succeed() {
    let bed = Bed::start().await;
    let proxy = Proxy::start(bed.dir.path(), &bed.config(""), Some(&bed.hosts_file));
    let yaml = std::fs::read_to_string(&proxy.config_path).unwrap();
    let admin = proxy.admin;
    let scraper = tokio::spawn(async move {
        let mut n = 0;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let r = cutover::shift::probe::get(
                &cutover::shift::probe::Target {
                    connect: admin,
                    tls: None,
                    host: "x".into(),
                    path: "/metrics".into(),
                },
                Duration::from_secs(5),
            )
            .await
            .expect("scrape");
            assert_eq!(r.status, 200);
            parse(&String::from_utf8_lossy(&r.body));
            n += 1;
        }
        n
    });
    for i in 0..30 {
        write_atomically(
            &proxy.config_path,
            &yaml.replace("phase: test", &format!("phase: p{i}")),
        );
        proxy.signal(libc::SIGHUP);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scrapes = scraper.await.unwrap();
    assert!(scrapes > 10, "{scrapes}");
    let m = proxy
        .metrics_when("cutover_phase_info", &[("phase", "p29")], 1.0)
        .await;
    assert_eq!(
        sample(&m, "cutover_phase_info", &[("phase", "p29")]),
        Some(1.0),
        "{m}"
    );
    // The previous phase's info series is gone; its counters stay.
    assert_eq!(
        sample(&m, "cutover_phase_info", &[("phase", "p28")]),
        None,
        "{m}"
    );
}

fn run_verify(config: &std::path::Path, hosts: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("verify")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("CUTOVER_HOSTS_FILE", hosts)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// new 100 / old 0 (backup), both with markers and the canary.
fn phase3_yaml(bed: &Bed, new_marker: &str) -> String {
    let port = bed.edge.addr().port();
    let ca = bed.ca_path.display();
    bed.config("")
        .replace("    hosts: [", "    canary: /ruok\n    hosts: [")
        .replace("expect_body: ok-new-cdn\n", &format!("expect_body: {new_marker}\n        weight: 100\n"))
        + &format!(
            "      - name: old-cloudfront\n        address: d-old.cloudfront.test:{port}\n        sni: {PUBLIC_NAME}\n        ca_file: {ca}\n        weight: 0\n        backup: true\n        expect_body: ok-old-cdn\n"
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_trap_and_passes_the_fix() {
    let bed = Bed::start().await;
    // The proxy also serves the public name over TLS, as it does behind the ALB.
    let issued = bed.ca.issue(&[PUBLIC_NAME]).unwrap();
    let (cert, key) = issued.write_pair(bed.dir(), "pub").unwrap();
    let tls_listen = free_port();
    let yaml = phase3_yaml(&bed, "ok-new-cdn").replace(
        "listeners:\n  - address: 127.0.0.1:0\n",
        &format!(
            "listeners:\n  - address: 127.0.0.1:0\n  - address: {tls_listen}\n    tls: {{ cert: {}, key: {} }}\n",
            cert.display(),
            key.display()
        ),
    );
    let proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    let edge = bed.edge.addr().to_string();
    let proxy_arg = proxy.listen.to_string();

    // The trap: DNS for the public name points at the CDN edge, where the old
    // distribution still owns it.
    let (code, out) = run_verify(
        &proxy.config_path,
        &bed.hosts_file,
        &[
            "--proxy",
            &proxy_arg,
            "--resolve",
            &format!("{PUBLIC_NAME}={edge}"),
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("is served by `old-cloudfront`, which this config gives no weight"),
        "{out}"
    );
    assert!(out.contains("CloudFront trap"), "{out}");

    // The fix: DNS points at cutover.
    let (code, out) = run_verify(
        &proxy.config_path,
        &bed.hosts_file,
        &[
            "--proxy",
            &proxy_arg,
            "--resolve",
            &format!("{PUBLIC_NAME}={tls_listen}"),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("OK: every path lands where the config says"),
        "{out}"
    );
    assert!(
        out.contains("ok-new-cdn") && out.contains("ok-old-cdn"),
        "{out}"
    );

    // A wrong marker in the config is named.
    let wrong = bed.path("wrong.yaml");
    std::fs::write(
        &wrong,
        phase3_yaml(&bed, "ok-newer-cdn")
            .replacen("127.0.0.1:0", &proxy.listen.to_string(), 1)
            .replacen("127.0.0.1:0", "127.0.0.1:1", 1),
    )
    .unwrap();
    let (code, out) = run_verify(
        &wrong,
        &bed.hosts_file,
        &["--resolve", &format!("{PUBLIC_NAME}={tls_listen}")],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("upstream `new-cloudfront` answered without its marker \"ok-newer-cdn\""),
        "{out}"
    );

    // An upstream whose SNI and Host lead to different distributions is named.
    let mismatch = bed.path("mismatch.yaml");
    std::fs::write(
        &mismatch,
        std::fs::read_to_string(&proxy.config_path)
            .unwrap()
            .replace(
                &format!("        sni: {PUBLIC_NAME}\n"),
                &format!("        sni: {PUBLIC_NAME}\n        host_header: {NEW_NAME}\n"),
            ),
    )
    .unwrap();
    let (code, out) = run_verify(
        &mismatch,
        &bed.hosts_file,
        &["--resolve", &format!("{PUBLIC_NAME}={tls_listen}")],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("lead to different distributions (421"),
        "{out}"
    );

    // An unreachable public name is a message, not a crash.
    let (code, out) = run_verify(
        &proxy.config_path,
        &bed.hosts_file,
        &["--resolve", &format!("{PUBLIC_NAME}=127.0.0.1:1")],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("could not be checked"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}

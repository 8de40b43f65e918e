//! `config_source`: one document for the fleet, served by a real nginx on
//! loopback (Debian's, started by the test with its own config, ETags and
//! 304s its own), fetched by three cutover processes with a bootstrap file
//! each. A change reaches all three within one interval; a 304 reloads
//! nothing; a malformed document is refused everywhere with the running
//! config kept; an instance started while the server is down runs from its
//! cache; every bad answer a web server can give is counted and logged and
//! leaves the proxy serving; a damaged cache stops a start with a reason.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::nginx::Nginx;
use common::*;
use cutover::config::sha256_hex;
use cutover::rehearsal::demo::{NEW_DIST, NEW_NAME, OLD_DIST, PUBLIC_NAME};

const CONFIG_HOST: &str = "config.test";
const TOKEN: &str = "Bearer fleet-token-1";

/// The served document: the migration route, old and new at the given
/// weights (or a rollout), every path absolute.
fn document(bed: &Bed, phase: &str, route_extra: &str, old_weight: u32, new_weight: u32) -> String {
    let port = bed.edge.addr().port();
    let ca = bed.ca_path.display();
    let weights = |w: u32| {
        if route_extra.contains("rollout:") {
            String::new()
        } else {
            format!("        weight: {w}\n")
        }
    };
    format!(
        "phase: {phase}\n\
         client_ip: {{ header: X-Forwarded-For, trusted: [127.0.0.1] }}\n\
         dns_refresh: 1s\n\
         routes:\n  - name: cdn\n    hosts: [{PUBLIC_NAME}]\n    sticky: client_ip\n    upstreams:\n\
         \x20     - name: old-cloudfront\n        address: {OLD_DIST}:{port}\n        sni: {PUBLIC_NAME}\n        ca_file: {ca}\n{old}\
         \x20     - name: new-cloudfront\n        address: {NEW_DIST}:{port}\n        host_header: {NEW_NAME}\n        ca_file: {ca}\n{new}\
         {route_extra}",
        old = weights(old_weight),
        new = weights(new_weight),
    )
}

/// Each instance's bootstrap: its own listeners, admin, server files and
/// cache; the document from `url`.
fn bootstrap(dir: &Path, source: &str) -> String {
    format!(
        "config_source: {{ {source} }}\n\
         listeners:\n  - address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         server:\n  threads: 2\n  grace_period: 1s\n  graceful_shutdown_timeout: 5s\n  upgrade_sock: {dir}/upgrade.sock\n  pid_file: {dir}/cutover.pid\n",
        dir = dir.display()
    )
}

/// The `sha256` label of `cutover_config_info`, when there is one.
async fn running_sha(p: &Proxy) -> Option<String> {
    let m = p.metrics().await;
    let line = m.lines().find(|l| l.starts_with("cutover_config_info{"))?;
    let rest = &line[line.find("sha256=\"")? + 8..];
    Some(rest[..rest.find('"')?].to_string())
}

async fn fetches(p: &Proxy, result: &str) -> f64 {
    let m = p.metrics().await;
    sample(&m, "cutover_config_fetches_total", &[("result", result)]).unwrap_or(0.0)
}

async fn reloads(p: &Proxy, result: &str) -> f64 {
    let m = p.metrics().await;
    sample(&m, "cutover_config_reloads_total", &[("result", result)]).unwrap_or(0.0)
}

/// Poll every proxy until it runs `sha`; how long each took from `since`.
async fn converge(proxies: &[&Proxy], sha: &str, since: Instant, limit: Duration) -> Vec<Duration> {
    let mut took = vec![None; proxies.len()];
    let deadline = since + limit;
    while took.iter().any(Option::is_none) {
        for (i, p) in proxies.iter().enumerate() {
            if took[i].is_none() && running_sha(p).await.as_deref() == Some(sha) {
                took[i] = Some(since.elapsed());
            }
        }
        if Instant::now() > deadline {
            let mut why = String::new();
            for p in proxies {
                why.push_str(&format!("{:?}\n{}\n", running_sha(p).await, p.log()));
            }
            panic!("not every instance runs {sha} within {limit:?}: {took:?}\n{why}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    took.into_iter().map(Option::unwrap).collect()
}

/// Poll until `f` holds for `p`, for at most `limit`.
async fn until<F, Fut>(p: &Proxy, limit: Duration, what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The distribution that serves client `client` through `p`.
async fn served_by(p: &Proxy, client: u32) -> String {
    let mut c = Client::connect(p.listen).await.unwrap();
    let a = c
        .get(
            PUBLIC_NAME,
            "/ruok",
            &[("x-forwarded-for", &client_addr(client))],
        )
        .await
        .unwrap_or_else(|e| panic!("GET through {}: {e:#}\n{}", p.listen, p.log()));
    assert_eq!(a.status, 200, "{a:?}");
    a.body
}

/// A hosts file naming both distributions and the config server.
fn hosts(bed: &Bed) -> PathBuf {
    let path = bed.path("hosts-with-source");
    std::fs::write(
        &path,
        format!("127.0.0.1 {OLD_DIST} {NEW_DIST} {CONFIG_HOST}\n"),
    )
    .unwrap();
    path
}

/// nginx serving `www/cutover.yaml` over TLS for `config.test`, to a
/// client that sends the token only (S3's answer otherwise).
fn https_server(bed: &Bed, www: &Path, addr: SocketAddr) -> Nginx {
    let issued = bed.ca.issue(&[CONFIG_HOST]).unwrap();
    let (cert, key) = issued.write_pair(bed.dir(), "config-server").unwrap();
    let nginx_dir = bed.path("nginx");
    Nginx::start_with_http(
        &nginx_dir,
        addr,
        Some((&cert, &key)),
        // What each fetch asked conditionally, beside the usual log.
        &format!(
            "log_format validators '$status inm=[$http_if_none_match] ims=[$http_if_modified_since]';
  access_log {}/validators.log validators;",
            nginx_dir.display()
        ),
        &format!(
            "location = /cutover.yaml {{
      if ($http_authorization != \"{TOKEN}\") {{ return 403 \"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>\"; }}
      root {www};
      default_type application/yaml;
    }}",
            www = www.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_follow_one_document_over_https() {
    let bed = Bed::start().await;
    let hosts = hosts(&bed);
    let www = bed.path("www");
    std::fs::create_dir_all(&www).unwrap();
    let doc_path = www.join("cutover.yaml");
    let token = bed.path("source-token");
    std::fs::write(&token, format!("Authorization: {TOKEN}\n")).unwrap();
    let server_addr = free_port();
    let interval = Duration::from_secs(2);
    let source = format!(
        "url: \"https://{CONFIG_HOST}:{port}/cutover.yaml\", interval: 2s, timeout: 1s, cache: state/source.yaml, ca_file: {ca}, header_file: {token}",
        port = server_addr.port(),
        ca = bed.ca_path.display(),
        token = token.display()
    );

    // All traffic on the old distribution.
    let v1 = document(&bed, "one", "", 100, 0);
    write_atomically(&doc_path, &v1);
    let mut nginx = https_server(&bed, &www, server_addr);
    let start_member = |i: usize| {
        let dir = bed.path(&format!("member{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        Proxy::start(&dir, &bootstrap(&dir, &source), Some(&hosts))
    };
    let mut members: Vec<Proxy> = (0..3).map(start_member).collect();
    for p in &members {
        assert_eq!(
            running_sha(p).await.as_deref(),
            Some(sha256_hex(v1.as_bytes()).as_str())
        );
        assert_eq!(served_by(p, 1).await, "ok-old-cdn");
        // The cache holds the document, checked by its digest.
        let cached =
            std::fs::read_to_string(p.config_path.parent().unwrap().join("state/source.yaml"))
                .unwrap();
        assert!(cached.ends_with(&v1), "{cached}");
        assert_eq!(reloads(p, "success").await, 0.0);
    }

    // The weights flip: every instance runs the new document within one
    // interval (plus the fetch itself) and sends traffic to the new one.
    let v2 = document(&bed, "split", "", 0, 100);
    let written = Instant::now();
    write_atomically(&doc_path, &v2);
    let sha2 = sha256_hex(v2.as_bytes());
    let refs: Vec<&Proxy> = members.iter().collect();
    let took = converge(&refs, &sha2, written, interval + Duration::from_secs(1)).await;
    eprintln!("weight change reached the three instances after {took:?} (interval {interval:?})");
    for p in &members {
        assert_eq!(served_by(p, 1).await, "ok-new-cdn");
        assert_eq!(reloads(p, "success").await, 1.0);
        let m = p.metrics().await;
        assert_eq!(
            sample(
                &m,
                "cutover_config_info",
                &[("sha256", &sha2), ("phase", "split")]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&m, "cutover_phase_info", &[("phase", "split")]),
            Some(1.0)
        );
        assert!(
            sample(&m, "cutover_config_info", &[("phase", "one")]).is_none(),
            "the old hash lingers:\n{m}"
        );
    }

    // Nothing changes: nginx answers 304 to If-None-Match, nothing reloads.
    let not_modified: Vec<f64> = {
        let mut v = Vec::new();
        for p in &members {
            v.push(fetches(p, "not_modified").await);
        }
        v
    };
    for (p, before) in members.iter().zip(&not_modified) {
        until(p, interval * 3, "two 304s", || async {
            fetches(p, "not_modified").await >= before + 2.0
        })
        .await;
        assert_eq!(
            reloads(p, "success").await,
            1.0,
            "a 304 reloaded:\n{}",
            p.log()
        );
        let m = p.metrics().await;
        let last = sample(&m, "cutover_config_last_success_timestamp_seconds", &[]).unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            now - last < interval.as_secs_f64() + 1.5,
            "a 304 confirms the running document: {last} vs {now}"
        );
    }
    let log = nginx.access_log();
    assert!(
        log.lines().filter(|l| l.contains("\" 304 ")).count() >= 6,
        "{log}"
    );
    assert!(!log.contains("\" 403 "), "the token was not sent:\n{log}");
    // Both validators of the last 200 go with every conditional fetch.
    let asked = std::fs::read_to_string(bed.path("nginx").join("validators.log")).unwrap();
    let conditional: Vec<&str> = asked.lines().filter(|l| l.starts_with("304 ")).collect();
    assert!(conditional.len() >= 6, "{asked}");
    for line in conditional {
        assert!(
            !line.contains("inm=[]") && !line.contains("ims=[]") && line.contains(" GMT]"),
            "a 304 to a fetch without both validators: {line}"
        );
    }

    // A malformed document: refused by all three, the running config kept,
    // logged once per instance with where the problem is.
    let broken = format!("{v2}  - name: [unclosed\n");
    let refused_at = SystemTime::now();
    write_atomically(&doc_path, &broken);
    for p in &members {
        until(
            p,
            interval * 2,
            "the malformed document refused",
            || async { fetches(p, "invalid").await >= 1.0 },
        )
        .await;
        assert_eq!(reloads(p, "failure").await, 1.0);
        assert_eq!(running_sha(p).await.as_deref(), Some(sha2.as_str()));
        assert_eq!(served_by(p, 1).await, "ok-new-cdn");
    }
    for p in &members {
        let before = fetches(p, "not_modified").await;
        until(p, interval * 3, "two fetches after the refusal", || async {
            fetches(p, "not_modified").await >= before + 2.0
        })
        .await;
        let log = p.log();
        assert_eq!(
            log.matches("serves a document that is refused").count(),
            1,
            "{log}"
        );
        assert!(
            log.contains("keeping the running config (sha256=") && log.contains(&sha2),
            "{log}"
        );
        // A refused document confirms nothing: the alert on the last
        // success sees the source as unusable.
        let m = p.metrics().await;
        let last = sample(&m, "cutover_config_last_success_timestamp_seconds", &[]).unwrap();
        let refused = refused_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(last < refused + 0.5, "{last} >= {refused}");
        // The cache still holds the last good document.
        let cached =
            std::fs::read_to_string(p.config_path.parent().unwrap().join("state/source.yaml"))
                .unwrap();
        assert!(cached.ends_with(&v2));
    }

    // The server goes away; an instance restarted meanwhile starts from
    // its cache and says so; the others keep running and count the errors.
    nginx.stop();
    members.pop();
    let restarted = start_member(2);
    assert!(
        restarted.log().contains("starting from the cache"),
        "{}",
        restarted.log()
    );
    assert_eq!(
        running_sha(&restarted).await.as_deref(),
        Some(sha2.as_str())
    );
    let m = restarted.metrics().await;
    assert_eq!(sample(&m, "cutover_config_from_cache", &[]), Some(1.0));
    assert_eq!(served_by(&restarted, 1).await, "ok-new-cdn");
    members.push(restarted);
    for p in &members[..2] {
        until(
            p,
            interval * 2,
            "the unreachable source counted",
            || async { fetches(p, "error").await >= 1.0 },
        )
        .await;
    }

    // A rollout: one document, one `start`, so
    // every instance is at the same step and sends each client the same way.
    let (_, start) = {
        let t = SystemTime::now() - Duration::from_secs(60);
        (t, humantime::format_rfc3339_seconds(t).to_string())
    };
    let v3 = document(
        &bed,
        "rollout",
        &format!("    rollout: {{ from: old-cloudfront, to: new-cloudfront, steps: [10, 50, 100], hold: 1h, start: {start} }}\n"),
        0,
        0,
    );
    // The server is back with the running document (the malformed one
    // replaced): the restarted instance finds it unchanged, leaves its
    // cache mode, and every 304 after that confirms it (the unreachable
    // alert's timestamp moves on).
    write_atomically(&doc_path, &v2);
    nginx.start_again();
    {
        let p = &members[2];
        until(p, interval * 3, "the cached document confirmed", || async {
            fetches(p, "unchanged").await >= 1.0
        })
        .await;
        let last = |m: String| sample(&m, "cutover_config_last_success_timestamp_seconds", &[]);
        let confirmed = last(p.metrics().await).unwrap();
        let before = fetches(p, "not_modified").await;
        until(p, interval * 3, "a 304 after it", || async {
            fetches(p, "not_modified").await >= before + 1.0
        })
        .await;
        let m = p.metrics().await;
        assert_eq!(
            sample(&m, "cutover_config_from_cache", &[]),
            Some(0.0),
            "{m}"
        );
        assert!(
            last(m.clone()).unwrap() > confirmed,
            "a 304 after a start from the cache confirmed nothing:\n{m}"
        );
    }
    write_atomically(&doc_path, &v3);
    let sha3 = sha256_hex(v3.as_bytes());
    let back = Instant::now();
    let refs: Vec<&Proxy> = members.iter().collect();
    let took = converge(&refs, &sha3, back, interval + Duration::from_secs(1)).await;
    eprintln!("after the server came back: {took:?}");
    let mut shares = Vec::new();
    for p in &members {
        let m = p.metrics().await;
        assert_eq!(
            sample(&m, "cutover_config_from_cache", &[]),
            Some(0.0),
            "{m}"
        );
        assert_eq!(
            sample(&m, "cutover_rollout_percent", &[("route", "cdn")]),
            Some(10.0),
            "{m}"
        );
        assert_eq!(
            sample(&m, "cutover_rollout_step", &[("route", "cdn")]),
            Some(1.0),
            "{m}"
        );
        let mut by_client = Vec::new();
        for client in 0..40 {
            by_client.push(served_by(p, client).await);
        }
        shares.push(by_client);
    }
    assert!(
        shares[0].iter().any(|b| b == "ok-new-cdn") && shares[0].iter().any(|b| b == "ok-old-cdn"),
        "{:?}",
        shares[0]
    );
    assert_eq!(shares[0], shares[1]);
    assert_eq!(shares[0], shares[2]);

    // A cache removed or damaged while the source is fine is found at the
    // next fetch that confirms the running document, counted and written
    // again, so a later restart with the source down still starts.
    let cache_of = |p: &Proxy| p.config_path.parent().unwrap().join("state/source.yaml");
    std::fs::remove_file(cache_of(&members[0])).unwrap();
    let whole = std::fs::read_to_string(cache_of(&members[1])).unwrap();
    std::fs::write(cache_of(&members[1]), &whole[..whole.len() / 2]).unwrap();
    for (i, p) in members.iter().enumerate() {
        let damaged = if i < 2 { 1.0 } else { 0.0 };
        until(p, interval * 3, "the cache checked", || async {
            let m = p.metrics().await;
            sample(&m, "cutover_config_cache_damaged_total", &[]) == Some(damaged)
                && std::fs::read_to_string(cache_of(p)).is_ok_and(|c| c.ends_with(&v3))
        })
        .await;
        let written_again = p
            .log()
            .matches("writing it again with the running document")
            .count();
        assert_eq!(written_again, usize::from(i < 2), "{}", p.log());
    }
    assert!(
        members[0].log().contains("cannot be read"),
        "{}",
        members[0].log()
    );
    assert!(
        members[1].log().contains("is truncated or altered"),
        "{}",
        members[1].log()
    );
}

/// A listener that accepts and never answers.
fn silent_listener() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_answer_is_counted_logged_and_leaves_the_proxy_serving() {
    let bed = Bed::start().await;
    let hosts = hosts(&bed);
    let www = bed.path("www");
    std::fs::create_dir_all(&www).unwrap();
    let good = document(&bed, "good", "", 0, 100);
    std::fs::write(www.join("cutover.yaml"), &good).unwrap();
    let sha = sha256_hex(good.as_bytes());
    // A valid YAML document that is no valid config: every problem named.
    std::fs::write(
        www.join("invalid.yaml"),
        document(&bed, "invalid", "", 0, 0).replace("hosts: [", "hosts: [cdn.example.test, "),
    )
    .unwrap();
    std::fs::write(www.join("binary.yaml"), b"phase: \xff\xfe\x00\n").unwrap();
    // 1 GiB, sparse.
    let big = www.join("big.yaml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let silent = silent_listener();

    let server_addr = free_port();
    let serve = |location: &str| format!("location = /cutover.yaml {{ {location} }}");
    let file = |name: &str| {
        format!(
            "alias {}; default_type application/yaml;",
            www.join(name).display()
        )
    };
    let mut nginx = Nginx::start(
        &bed.path("nginx"),
        server_addr,
        None,
        &serve(&file("cutover.yaml")),
    );
    let dir = bed.path("member");
    std::fs::create_dir_all(&dir).unwrap();
    let source = format!(
        "url: \"http://127.0.0.1:{}/cutover.yaml\", interval: 1s, timeout: 1s, cache: state/source.yaml",
        server_addr.port()
    );
    let p = Proxy::start(&dir, &bootstrap(&dir, &source), Some(&hosts));
    assert_eq!(running_sha(&p).await.as_deref(), Some(sha.as_str()));

    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "an upstream of the server that never answers",
            format!("proxy_pass http://{silent}; proxy_read_timeout 60s;"),
            "timeout",
            "gave no whole answer within 1s (config_source.timeout)",
        ),
        (
            "a redirect to itself, forever",
            "return 302 /cutover.yaml;".into(),
            "redirects",
            "redirected more than 5 times",
        ),
        (
            "200 with an HTML sign-in page",
            "default_type text/html; return 200 '<html><body><h1>Sign in</h1></body></html>';".into(),
            "invalid",
            "answered 200 with text/html (an error or sign-in page?), not a YAML document: <html><body><h1>Sign in</h1></body></html>",
        ),
        (
            "1 GiB with its Content-Length",
            file("big.yaml"),
            "too_large",
            "sent too much: the body is 1073741824 bytes, over the limit of 1048576",
        ),
        (
            "1 GiB chunked, no length announced",
            format!("{} ssi on; ssi_types *;", file("big.yaml")),
            "too_large",
            "sent too much: the body passed the limit of 1048576 bytes",
        ),
        (
            "valid YAML, invalid config",
            file("invalid.yaml"),
            "invalid",
            "routes[0].upstreams: every upstream has weight 0 and none is a backup",
        ),
        (
            "bytes that are not UTF-8",
            file("binary.yaml"),
            "invalid",
            "a body that is not UTF-8 text",
        ),
        (
            "S3's 403 with its XML reason",
            // A new RequestId in every answer, as S3 sends: still one problem.
            "return 403 '<?xml version=\"1.0\"?>\n<Error><Code>AccessDenied</Code><Message>Request has expired</Message><RequestId>$request_id</RequestId></Error>';".into(),
            "status",
            "answered 403: <?xml version=\"1.0\"?> <Error><Code>AccessDenied</Code><Message>Request has expired</Message><RequestId>",
        ),
    ];
    let all_fetches = || async {
        let mut n = 0.0;
        for r in cutover::observe::metrics::FETCH_RESULTS {
            n += fetches(&p, r).await;
        }
        n
    };
    for (what, location, result, line) in &cases {
        let before = fetches(&p, result).await;
        nginx.restart(&serve(location));
        until(&p, Duration::from_secs(10), what, || async {
            fetches(&p, result).await > before
        })
        .await;
        // Two more fetches with the same problem (a refused document
        // comes back as a 304): logged at the first only.
        let counted = all_fetches().await;
        until(&p, Duration::from_secs(10), what, || async {
            all_fetches().await >= counted + 2.0
        })
        .await;
        assert_eq!(
            running_sha(&p).await.as_deref(),
            Some(sha.as_str()),
            "{what}"
        );
        assert_eq!(served_by(&p, 1).await, "ok-new-cdn", "{what}");
        let log = p.log();
        assert!(log.contains(line), "{what}: expected {line:?} in\n{log}");
        assert_eq!(
            log.matches(line).count(),
            1,
            "{what}: logged more than once per change of problem\n{log}"
        );
    }
    // Every one of them was a failure for the alert: no success since start.
    let m = p.metrics().await;
    let last = sample(&m, "cutover_config_last_success_timestamp_seconds", &[]).unwrap();
    assert_eq!(
        sample(&m, "cutover_config_reloads_total", &[("result", "success")]),
        Some(0.0)
    );

    // The source serves a good document again: it lands.
    let next = document(&bed, "next", "", 50, 50);
    std::fs::write(www.join("cutover.yaml"), &next).unwrap();
    nginx.restart(&serve(&file("cutover.yaml")));
    let next_sha = sha256_hex(next.as_bytes());
    until(&p, Duration::from_secs(5), "the good document", || async {
        running_sha(&p).await.as_deref() == Some(next_sha.as_str())
    })
    .await;
    let m = p.metrics().await;
    assert!(sample(&m, "cutover_config_last_success_timestamp_seconds", &[]).unwrap() > last);
    assert!(
        p.log()
            .contains("answering with the running document again")
            || p.log().contains("applied document"),
        "{}",
        p.log()
    );
    assert!(
        p.peak_rss_kib() < 200 * 1024,
        "a 1 GiB answer was buffered: {} KiB",
        p.peak_rss_kib()
    );
}

/// `cutover run` with `bootstrap` and the source down: its exit and stderr.
fn run_without_source(dir: &Path, bootstrap: &str) -> (Option<i32>, String) {
    let path = dir.join("cutover.yaml");
    let yaml = bootstrap
        .replacen("127.0.0.1:0", &free_port().to_string(), 1)
        .replacen("127.0.0.1:0", &free_port().to_string(), 1);
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_missing_cache_stops_a_start_with_the_reason() {
    let bed = Bed::start().await;
    let hosts = hosts(&bed);
    let dir = bed.path("member");
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let cache = dir.join("state/source.yaml");
    let down = free_port();
    let source = format!(
        "url: \"http://127.0.0.1:{}/cutover.yaml\", interval: 1s, timeout: 1s, cache: state/source.yaml",
        down.port()
    );
    let boot = bootstrap(&dir, &source);
    let url = cutover::config::SourceUrl {
        https: false,
        host: "127.0.0.1".into(),
        port: down.port(),
        path_and_query: "/cutover.yaml".into(),
    };

    // No cache at all.
    let (code, err) = run_without_source(&dir, &boot);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot start: the config source http://127.0.0.1:"),
        "{err}"
    );
    assert!(
        err.contains("could not be fetched") && err.contains("Connection refused"),
        "{err}"
    );
    assert!(err.contains("cannot be read: No such file"), "{err}");

    // Truncated (a crash while an old version wrote it, a full disk).
    let good = document(&bed, "cached", "", 0, 100);
    cutover::lifecycle::source::write_cache(&cache, &good, &url).unwrap();
    let whole = std::fs::read_to_string(&cache).unwrap();
    std::fs::write(&cache, &whole[..whole.len() - 20]).unwrap();
    let (code, err) = run_without_source(&dir, &boot);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is truncated or altered"), "{err}");

    // Not a cache file (someone copied a config there).
    std::fs::write(&cache, &good).unwrap();
    let (code, err) = run_without_source(&dir, &boot);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not a cutover cache file"), "{err}");

    // Unreadable (a directory where the file should be).
    std::fs::remove_file(&cache).unwrap();
    std::fs::create_dir(&cache).unwrap();
    let (code, err) = run_without_source(&dir, &boot);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot be read"), "{err}");
    std::fs::remove_dir(&cache).unwrap();

    // Whole, but no longer a valid config (this cutover checks more).
    cutover::lifecycle::source::write_cache(&cache, "phase: old\nroutes: []\n", &url).unwrap();
    let (code, err) = run_without_source(&dir, &boot);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no longer checks") && err.contains("at least one route"),
        "{err}"
    );

    // A good cache: it starts, serves, and says where its config came from.
    cutover::lifecycle::source::write_cache(&cache, &good, &url).unwrap();
    let p = Proxy::start(&dir, &boot, Some(&hosts));
    assert!(p.log().contains("starting from the cache"), "{}", p.log());
    assert_eq!(
        running_sha(&p).await.as_deref(),
        Some(sha256_hex(good.as_bytes()).as_str())
    );
    assert_eq!(served_by(&p, 1).await, "ok-new-cdn");
    drop(p);

    // A cache that cannot be written: the document still runs; the
    // failure is counted and logged.
    let www = bed.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("cutover.yaml"), &good).unwrap();
    let server = free_port();
    let _nginx = Nginx::start(
        &bed.path("nginx"),
        server,
        None,
        &format!(
            "location = /cutover.yaml {{ alias {}/cutover.yaml; }}",
            www.display()
        ),
    );
    std::fs::write(dir.join("not-a-dir"), "").unwrap();
    let source = format!(
        "url: \"http://127.0.0.1:{}/cutover.yaml\", interval: 1s, timeout: 1s, cache: not-a-dir/source.yaml",
        server.port()
    );
    let p = Proxy::start(&dir, &bootstrap(&dir, &source), Some(&hosts));
    let m = p.metrics().await;
    assert_eq!(
        sample(&m, "cutover_config_cache_write_errors_total", &[]),
        Some(1.0),
        "{m}"
    );
    assert!(p.log().contains("cannot write the cache"), "{}", p.log());
    assert_eq!(served_by(&p, 1).await, "ok-new-cdn");
}

/// Kills a process that is not our child (a SIGUSR2 successor) when the
/// test ends, however it ends.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on a PID this test started (through cutover).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

fn pid_in(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_fetches_at_once_and_an_upgrade_keeps_the_url() {
    let bed = Bed::start().await;
    let hosts = hosts(&bed);
    let www = bed.path("www");
    std::fs::create_dir_all(&www).unwrap();
    let doc = www.join("cutover.yaml");
    let v1 = document(&bed, "one", "", 100, 0);
    write_atomically(&doc, &v1);
    let server = free_port();
    let _nginx = Nginx::start(
        &bed.path("nginx"),
        server,
        None,
        &format!("location = /cutover.yaml {{ alias {}; }}", doc.display()),
    );
    let url = format!("http://127.0.0.1:{}/cutover.yaml", server.port());

    // The bootstrap names no URL: `--config-url` gives it. An hour between
    // fetches: only a SIGHUP can bring a change within the test.
    let dir = bed.path("member");
    std::fs::create_dir_all(&dir).unwrap();
    let (listen, admin) = (free_port(), free_port());
    let path = dir.join("cutover.yaml");
    std::fs::write(
        &path,
        bootstrap(&dir, "interval: 1h, timeout: 2s, cache: state/source.yaml")
            .replacen("127.0.0.1:0", &listen.to_string(), 1)
            .replacen("127.0.0.1:0", &admin.to_string(), 1),
    )
    .unwrap();
    let mut p = Proxy::start_with(
        &dir,
        path,
        listen,
        admin,
        Some(&hosts),
        &["--config-url", &url],
    );
    assert_eq!(running_sha(&p).await, Some(sha256_hex(v1.as_bytes())));

    // The same length and modification second as v1: nginx's ETag (mtime
    // seconds and size) cannot tell them apart and answers a conditional
    // fetch 304. A SIGHUP asks unconditionally.
    let v2 = document(&bed, "two", "", 0, 100);
    assert_eq!(v1.len(), v2.len());
    let mtime = std::fs::metadata(&doc).unwrap().modified().unwrap();
    write_atomically(&doc, &v2);
    std::fs::File::options()
        .write(true)
        .open(&doc)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let sent = Instant::now();
    p.signal(libc::SIGHUP);
    let took = converge(
        &[&p],
        &sha256_hex(v2.as_bytes()),
        sent,
        Duration::from_secs(5),
    )
    .await;
    eprintln!("SIGHUP to the new document: {took:?}");
    assert!(p.log().contains("SIGHUP: fetching"), "{}", p.log());
    assert_eq!(served_by(&p, 1).await, "ok-new-cdn");

    // A package upgrade (SIGUSR2): the successor is started with the same
    // `--config-url` and fetches the document itself.
    let v3 = document(&bed, "three", "", 50, 50);
    write_atomically(&doc, &v3);
    let pid_file = dir.join("cutover.pid");
    let first = p.child.id();
    p.signal(libc::SIGUSR2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid_in(&pid_file).is_none_or(|pid| pid == first) {
        assert!(Instant::now() < deadline, "no successor:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let successor = KillOnDrop(pid_in(&pid_file));
    let status = tokio::task::block_in_place(|| p.wait_exit(Duration::from_secs(20)));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", p.log());
    // Same admin and proxy sockets, handed over.
    assert_eq!(running_sha(&p).await, Some(sha256_hex(v3.as_bytes())));
    served_by(&p, 1).await;
    drop(successor);
}

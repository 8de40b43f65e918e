//! One policy, two carriers: the same request served by the fast path and
//! by the Pingora path must reach the origin as the same bytes, come back as
//! the same response head, and leave the same access-log record and metrics.
//!
//! A request takes the fast path on a fresh connection; after a request
//! with a method the fast path hands over, on the same connection, every
//! later request takes the Pingora path (the connection was handed over).
//! The warm-up goes to another route (`warm.example.test`), so it touches
//! none of the records compared here.
//!
//! What may differ, by design, and is masked before comparing:
//! - `Date` in the client's response head (the clock);
//! - `time` and `duration` in the access-log record;
//! - the metrics that describe the connection rather than the request
//!   (`cutover_connections_handed_over_total`, `cutover_client_connections`,
//!   `cutover_proxy_protocol_connections_total`) and the duration histogram's
//!   buckets and sum (its count is compared);
//! - `cutover_upstream_addresses`, the addresses' state at the scrape (an
//!   address the first carrier's request ejected is still out for the
//!   second; the ejection counter is compared).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::strict_origin::{echo_answer, RawClient, Script, Step, StrictOrigin, ORIGIN_NAME};
use common::*;
use cutover::rehearsal::demo::PUBLIC_NAME;
use cutover::rehearsal::pki::TestCa;
use cutover::rehearsal::strict::Message;

const WARM_NAME: &str = "warm.example.test";
const REFUSE_NAME: &str = "refuse.example.test";
const STALL_NAME: &str = "stall.example.test";
const DETECT_NAME: &str = "detect.example.test";
/// Routes whose own upstream closes every connection it gets a request on
/// without answering (an edge dying with requests in flight), the origin
/// under its real name as the backup: one for a GET, one for a POST.
const DIE_NAME: &str = "die.example.test";
const DIE_POST_NAME: &str = "die-post.example.test";
/// The Host the dying upstreams send: the origin closes on it.
const DYING_HOST: &str = "dying.example.test";
/// A route whose upstreams carry `expect_header` markers.
const MARKED_NAME: &str = "marked.example.test";
/// A route's `rewrite_names`: a name besides the upstream's own.
const EXTRA_NAME: &str = "assets-new.example.test";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Carrier {
    Fast,
    Pingora,
    /// The TLS listener, fast path (a fresh connection).
    TlsFast,
    /// The TLS listener, Pingora path (after a handed-over request).
    TlsPingora,
}

impl Carrier {
    const ALL: [Carrier; 4] = [
        Carrier::Fast,
        Carrier::Pingora,
        Carrier::TlsFast,
        Carrier::TlsPingora,
    ];

    fn tls(self) -> bool {
        matches!(self, Carrier::TlsFast | Carrier::TlsPingora)
    }

    fn pingora(self) -> bool {
        matches!(self, Carrier::Pingora | Carrier::TlsPingora)
    }
}

struct Bed {
    dir: tempfile::TempDir,
    origin: StrictOrigin,
    proxy: Proxy,
    access_log: PathBuf,
    /// The TLS listener, with a certificate for the public names from `ca`.
    tls: SocketAddr,
    ca_path: PathBuf,
}

async fn start() -> Bed {
    start_forwarding("append").await
}

/// The bed with `client_ip.forward: {forward}`.
async fn start_forwarding(forward: &str) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("parity CA").unwrap();
    let ca_path = ca.write_cert(dir.path()).unwrap();
    let script: Script = Arc::new(|msg: &Message| {
        let target = msg.target();
        if msg.header("host") == Some(DYING_HOST.as_bytes()) {
            return Some(vec![Step::Close]);
        }
        if target.contains("/stall") {
            return Some(vec![Step::Hang]);
        }
        if let Some(status) = ["/edge403", "/edge421"]
            .iter()
            .find(|p| target.contains(*p))
            .map(|p| &p[5..])
        {
            // What a CloudFront edge answers itself: 403 for a name it has
            // no distribution for, 421 for SNI and Host of two.
            let reason = if status == "403" {
                "Forbidden"
            } else {
                "Misdirected Request"
            };
            let body = "<HTML><HEAD><TITLE>ERROR: The request could not be satisfied</TITLE></HEAD></HTML>\n";
            return Some(vec![Step::Send(
                format!(
                    "HTTP/1.1 {status} {reason}\r\nServer: CloudFront\r\nContent-Type: text/html\r\n\
                     Content-Length: {}\r\nX-Cache: Error from cloudfront\r\n\
                     Via: 1.1 0f1e2d3c.cloudfront.net (CloudFront)\r\nX-Amz-Cf-Pop: IAD89-C1\r\n\
                     X-Amz-Cf-Id: q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c2v3b4n5m6QQ==\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            )]);
        }
        if let Some(said) = target.strip_prefix("/marker/") {
            // `/marker/strict`, `/marker/old`, …: X-Origin-Id says it;
            // `/marker/-` has none.
            let said = said.split('?').next().unwrap_or("");
            let field = if said == "-" {
                String::new()
            } else {
                format!("X-Origin-Id: {said}\r\n")
            };
            return Some(vec![Step::Send(
                format!("HTTP/1.1 200 OK\r\n{field}Content-Length: 2\r\n\r\nok").into_bytes(),
            )]);
        }
        if let Some(status) = target.strip_prefix("/deleak/").and_then(|t| t.get(..3)) {
            // `/deleak/301`, `/deleak/bad`: see `deleak_answer`.
            return Some(vec![Step::Send(deleak_answer(status))]);
        }
        let mut answer = echo_answer(msg);
        // Fields the response edits remove and the policy drops.
        let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
        answer.splice(
            head_end..head_end,
            b"X-Origin-Secret: s3cret\r\nKeep-Alive: timeout=5\r\nCache-Control: max-age=60\r\n"
                .iter()
                .copied(),
        );
        Some(vec![Step::Send(answer)])
    });
    let origin = StrictOrigin::start(&ca, script).await;
    let closed = free_port();
    let access_log = dir.path().join("access.log");
    let issued = ca.issue(&[PUBLIC_NAME, DETECT_NAME]).unwrap();
    let (cert, key) = issued.write_pair(dir.path(), "listener").unwrap();
    let tls = free_port();
    let upstream = |name: &str, addr: SocketAddr, read: &str| {
        format!(
            "      - name: {name}\n        address: {addr}\n        sni: {ORIGIN_NAME}\n        host_header: {ORIGIN_NAME}\n        ca_file: {ca}\n        timeouts: {{ connect: 1s, read: {read} }}\n",
            ca = ca_path.display()
        )
    };
    let marked = format!(
            "{}        expect_header: {{ name: X-Origin-Id, value: strict }}\n{}        weight: 0\n        expect_header: {{ name: x-origin-id, value: old }}\n",
        upstream("strict", origin.addr, "3s"),
        upstream("old-one", closed, "3s")
    );
    let yaml = format!(
        "phase: parity\n\
         listeners:\n  - address: 127.0.0.1:0\n    proxy_protocol: auto\n    trusted: [127.0.0.1]\n    header_timeout: 2s\n  - address: {tls}\n    header_timeout: 2s\n    tls: {{ cert: {cert}, key: {key} }}\n\
         admin:\n  address: 127.0.0.1:0\n\
         server:\n  threads: 2\n  grace_period: 4s\n  graceful_shutdown_timeout: 2s\n  upgrade_sock: {dir}/upgrade.sock\n  pid_file: {dir}/cutover.pid\n\
         client_ip:\n  header: X-Forwarded-For\n  trusted: [127.0.0.0/8]\n  forward: {forward}\n\
         access_log: {{ format: json, path: {log} }}\n\
         routes:\n\
         \x20 - name: cdn\n    hosts: [{PUBLIC_NAME}]\n    sticky: client_ip\n\
         \x20   request_headers: {{ set: {{ X-Migration: parity }}, remove: [Cookie] }}\n\
         \x20   response_headers: {{ set: {{ X-Served-Via: cutover }}, remove: [X-Origin-Secret] }}\n\
         \x20   rewrite_names: [{EXTRA_NAME}]\n\
         \x20   upstreams:\n{cdn}\
         \x20 - name: detect\n    hosts: [{DETECT_NAME}]\n    rewrite_response: detect\n    upstreams:\n{detect}\
         \x20 - name: marked\n    hosts: [{MARKED_NAME}]\n    response_headers: {{ remove: [X-Origin-Id] }}\n    upstreams:\n{marked}\
         \x20 - name: warm\n    hosts: [{WARM_NAME}]\n    upstreams:\n{warm}\
         \x20 - name: refuse\n    hosts: [{REFUSE_NAME}]\n    upstreams:\n{refuse}\
         \x20 - name: stall\n    hosts: [{STALL_NAME}]\n    upstreams:\n{stall}\
         \x20 - name: die\n    hosts: [{DIE_NAME}]\n    upstreams:\n{dying}{backup}\
         \x20 - name: die-post\n    hosts: [{DIE_POST_NAME}]\n    upstreams:\n{dying}{backup}",
        dir = dir.path().display(),
        log = access_log.display(),
        cdn = upstream("strict", origin.addr, "3s"),
        detect = upstream("strict", origin.addr, "3s"),
        cert = cert.display(),
        key = key.display(),
        warm = upstream("strict", origin.addr, "3s"),
        refuse = upstream("closed", closed, "3s"),
        stall = upstream("stalling", origin.addr, "1s"),
        dying = upstream("dying", origin.addr, "3s").replace(
            &format!("host_header: {ORIGIN_NAME}"),
            &format!("host_header: {DYING_HOST}")
        ),
        backup = format!(
            "{}        weight: 0\n        backup: true\n",
            upstream("backup", origin.addr, "3s")
        ),
    );
    let proxy = Proxy::start(dir.path(), &yaml, None);
    Bed {
        dir,
        origin,
        proxy,
        access_log,
        tls,
        ca_path,
    }
}

/// A connection on the wanted carrier: for Pingora's, a request the fast
/// path hands over, to the warm route, first.
async fn open(bed: &Bed, carrier: Carrier) -> RawClient {
    open_after(bed, carrier, b"").await
}

/// The same, with `prefix` (a PROXY header) the first bytes sent.
async fn open_after(bed: &Bed, carrier: Carrier, prefix: &[u8]) -> RawClient {
    let mut c = if carrier.tls() {
        assert!(prefix.is_empty(), "the TLS listener reads no PROXY header");
        RawClient::connect_tls(bed.tls, &bed.ca_path, PUBLIC_NAME).await
    } else {
        RawClient::connect(bed.proxy.listen).await
    };
    if !prefix.is_empty() {
        c.send(prefix).await;
    }
    if carrier.pingora() {
        // A method the fast path hands over.
        let handed = handed_over(&bed.proxy).await;
        c.send(
            format!(
                "{VIA_PINGORA} /parity/warm HTTP/1.1\r\nHost: {WARM_NAME}\r\nContent-Length: 4\r\n\r\nwarm"
            )
            .as_bytes(),
        )
        .await;
        let warm = c
            .response(false)
            .await
            .expect("the warm-up POST is answered");
        assert_eq!(warm.status(), 200);
        wait_for_log(&bed.access_log, "/parity/warm", 1).await;
        assert_eq!(
            handed_over(&bed.proxy).await,
            handed + 1.0,
            "the warm-up did not hand its connection to the Pingora path"
        );
    }
    c
}

/// Connections the fast path handed to the Pingora path so far.
async fn handed_over(proxy: &Proxy) -> f64 {
    sample_sum(
        &proxy.metrics().await,
        "cutover_connections_handed_over_total",
    )
}

/// The access-log records for `path`, once there are `n` of them.
async fn wait_for_log(log: &Path, path: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<serde_json::Value> = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(path)))
            .collect();
        if records.len() >= n {
            return records;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} access-log records for {path} never appeared; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every sample of `/metrics` that describes requests, by name and labels.
async fn samples(proxy: &Proxy) -> BTreeMap<String, f64> {
    let text = proxy.metrics().await;
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (key, value) = line.rsplit_once(' ').unwrap();
        let by_design = key.starts_with("cutover_connections_handed_over_total")
            || key.starts_with("cutover_client_connections{")
            || key.starts_with("cutover_proxy_protocol_connections_total")
            || key.starts_with("cutover_request_duration_seconds_bucket")
            || key.starts_with("cutover_request_duration_seconds_sum")
            || key.starts_with("cutover_upstream_addresses{")
            || key.contains("route=\"warm\"");
        if key.starts_with("cutover_") && !by_design {
            out.insert(key.to_string(), value.parse().unwrap());
        }
    }
    out
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d != 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

/// The response head as the client got it, `Date` masked.
fn client_head(m: &Message) -> String {
    let head = String::from_utf8_lossy(&m.raw_head).into_owned();
    head.split("\r\n")
        .map(|l| {
            if l.len() > 5 && l[..5].eq_ignore_ascii_case("date:") {
                "Date: (masked)"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn record_fields(mut r: serde_json::Value) -> serde_json::Value {
    let o = r.as_object_mut().unwrap();
    assert!(o.remove("time").is_some() && o.remove("duration").is_some());
    r
}

/// What one carrier made of one request.
#[derive(Debug)]
struct Seen {
    response: Message,
    upstream_head: Option<String>,
    /// The request body the origin read (decoded).
    upstream_body: Option<Vec<u8>>,
    record: serde_json::Value,
    metrics: BTreeMap<String, f64>,
    closed_after: bool,
}

/// Send `request` (with `{T}` the target) on `carrier`, and collect what
/// the origin, the client, the access log and the metrics saw of it.
async fn serve(bed: &Bed, carrier: Carrier, target: &str, request: &str) -> Seen {
    serve_after(bed, carrier, b"", target, request).await
}

/// The same on a connection that starts with `prefix`.
async fn serve_after(
    bed: &Bed,
    carrier: Carrier,
    prefix: &[u8],
    target: &str,
    request: &str,
) -> Seen {
    let c = open_after(bed, carrier, prefix).await;
    serve_on(bed, carrier, c, target, request).await
}

/// The same on the connection `c`.
async fn serve_on(
    bed: &Bed,
    carrier: Carrier,
    mut c: RawClient,
    target: &str,
    request: &str,
) -> Seen {
    let before_upstream = bed.origin.requests(target).len();
    let before_log = wait_for_log(&bed.access_log, target, 0).await.len();
    let before = samples(&bed.proxy).await;
    c.send(request.replace("{T}", target).as_bytes()).await;
    let response = c
        .response(request.starts_with("HEAD"))
        .await
        .unwrap_or_else(|e| panic!("{carrier:?}: no response to {target}: {e}"));
    let record = wait_for_log(&bed.access_log, target, before_log + 1)
        .await
        .pop()
        .unwrap();
    let metrics = delta(&before, &samples(&bed.proxy).await);
    let upstream = bed.origin.requests(target);
    let upstream_head = upstream
        .get(before_upstream)
        .map(|r| String::from_utf8_lossy(&r.msg.raw_head).into_owned());
    let upstream_body = upstream.get(before_upstream).map(|r| r.msg.body.clone());
    let closed_after = c.closes_within(Duration::from_millis(500)).await.is_ok();
    Seen {
        response,
        upstream_head,
        upstream_body,
        record: record_fields(record),
        metrics,
        closed_after,
    }
}

/// The request on the TLS listener, on both carriers: the same, and
/// returned (fast, Pingora) for the caller's own checks.
async fn serve_tls_pair(bed: &Bed, name: &str, target: &str, request: &str) -> (Seen, Seen) {
    let fast = serve(bed, Carrier::TlsFast, target, request).await;
    let pingora = serve(bed, Carrier::TlsPingora, target, request).await;
    assert_same(&format!("{name} (TLS listener)"), &fast, &pingora);
    (fast, pingora)
}

fn assert_same(name: &str, fast: &Seen, pingora: &Seen) {
    assert_eq!(
        fast.upstream_head, pingora.upstream_head,
        "{name}: the origin got different request heads (fast, then Pingora)"
    );
    assert_eq!(
        fast.upstream_body, pingora.upstream_body,
        "{name}: the origin got different request bodies (fast, then Pingora)"
    );
    assert_eq!(
        client_head(&fast.response),
        client_head(&pingora.response),
        "{name}: the client got different response heads (fast, then Pingora)"
    );
    assert_eq!(
        fast.response.body, pingora.response.body,
        "{name}: different response bodies"
    );
    assert_eq!(
        fast.record, pingora.record,
        "{name}: different access-log records (fast, then Pingora)"
    );
    assert_eq!(
        fast.metrics, pingora.metrics,
        "{name}: the metrics moved differently (fast, then Pingora)"
    );
    assert_eq!(
        fast.closed_after, pingora.closed_after,
        "{name}: one carrier closed the connection after the response, the other did not"
    );
}

const GET: &str = "GET {T}?q=1 HTTP/1.1\r\nHost: cdn.example.test\r\nUser-Agent: parity/1\r\nAccept: */*\r\nX-Forwarded-For: 203.0.113.7\r\nCookie: secret=1\r\nReferer: https://example.test/\r\nX-Extra: kept\r\nTE: trailers\r\nConnection: X-Hop\r\nX-Hop: dropped\r\n\r\n";

#[tokio::test]
async fn a_get_reaches_the_origin_and_the_client_the_same_on_both_carriers() {
    let bed = start().await;
    let fast = serve(&bed, Carrier::Fast, "/parity/get", GET).await;
    let pingora = serve(&bed, Carrier::Pingora, "/parity/get", GET).await;
    assert_eq!(fast.response.status(), 200, "{fast:?}");
    let head = fast
        .upstream_head
        .as_deref()
        .expect("the origin got the GET");
    for (want, why) in [
        (format!("Host: {ORIGIN_NAME}\r\n"), "Host rewritten"),
        (
            "X-Forwarded-For: 203.0.113.7, 127.0.0.1\r\n".to_string(),
            "peer appended to a trusted X-Forwarded-For",
        ),
        ("X-Forwarded-Proto: http\r\n".to_string(), "plain listener"),
        (
            format!("X-Forwarded-Host: {PUBLIC_NAME}\r\n"),
            "the name the client asked for",
        ),
        ("X-Migration: parity\r\n".to_string(), "request edit"),
        ("X-Extra: kept\r\n".to_string(), "ordinary field"),
    ] {
        assert!(head.contains(&want), "{why}: {want:?} missing in {head:?}");
    }
    for gone in ["cookie:", "te:", "x-hop:", "connection:"] {
        assert!(
            !head.to_ascii_lowercase().contains(&format!("\r\n{gone}")),
            "{gone} must not reach the origin: {head:?}"
        );
    }
    let client = client_head(&fast.response).to_ascii_lowercase();
    assert!(client.contains("x-served-via: cutover"), "{client}");
    assert!(!client.contains("x-origin-secret"), "{client}");
    assert!(!client.contains("\r\nkeep-alive:"), "{client}");
    assert!(
        client.contains("\r\nconnection: keep-alive\r\n"),
        "{client}"
    );
    assert_eq!(fast.record["client"], "203.0.113.7", "{:?}", fast.record);
    assert_same("GET", &fast, &pingora);

    // The TLS listener: the same on both carriers, and what differs from
    // the plain listener is the scheme the client used, only.
    let (tls, _) = serve_tls_pair(&bed, "GET", "/parity/get", GET).await;
    let tls_head = tls.upstream_head.as_deref().expect("the origin got it");
    assert_eq!(
        tls_head,
        head.replace(
            "X-Forwarded-Proto: http\r\n",
            "X-Forwarded-Proto: https\r\n"
        ),
        "the TLS listener's request differs from the plain one's by more than the scheme"
    );
    assert_eq!(client_head(&tls.response), client_head(&fast.response));
}

#[tokio::test]
async fn the_edges_own_403_and_421_are_told_apart_counted_and_logged_the_same() {
    let bed = start().await;
    for status in [403, 421] {
        edge_answer(&bed, status).await;
    }
    // An origin's answer has neither field in its record.
    let plain = serve(&bed, Carrier::Fast, "/parity/plain", GET).await;
    assert!(plain.record.get("cf_id").is_none(), "{:?}", plain.record);
}

async fn edge_answer(bed: &Bed, status: u16) {
    let target = format!("/parity/edge{status}");
    let before = samples(&bed.proxy).await;
    let fast = serve(bed, Carrier::Fast, &target, GET).await;
    let pingora = serve(bed, Carrier::Pingora, &target, GET).await;
    assert_eq!(fast.response.status(), status, "{fast:?}");
    let refused = "cutover_edge_answers_total{kind=\"refused\",route=\"cdn\",upstream=\"strict\"}";
    assert_eq!(fast.metrics.get(refused), Some(&1.0), "{:?}", fast.metrics);
    let error_result =
        "cutover_cdn_cache_results_total{result=\"error\",route=\"cdn\",upstream=\"strict\"}";
    assert_eq!(
        fast.metrics.get(error_result),
        Some(&1.0),
        "{:?}",
        fast.metrics
    );
    assert_eq!(fast.record["cf_pop"], "IAD89-C1", "{:?}", fast.record);
    assert_eq!(
        fast.record["cf_id"],
        "q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c2v3b4n5m6QQ=="
    );
    assert_same(&target, &fast, &pingora);
    serve_tls_pair(bed, &target, &target, GET).await;
    let all = delta(&before, &samples(&bed.proxy).await);
    assert_eq!(all.get(refused), Some(&4.0), "one per carrier: {all:?}");
}

#[tokio::test]
async fn x_forwarded_for_replaced_by_the_trusted_client_address_the_same() {
    let bed = start_forwarding("replace").await;
    // The client's own claim first, then what the trusted ALB (the
    // loopback peer here) appended: only that reaches the origin.
    let req = GET.replace(
        "X-Forwarded-For: 203.0.113.7\r\n",
        "X-Forwarded-For: 6.6.6.6, 203.0.113.7\r\n",
    );
    let fast = serve(&bed, Carrier::Fast, "/parity/xff", &req).await;
    let pingora = serve(&bed, Carrier::Pingora, "/parity/xff", &req).await;
    let head = fast.upstream_head.as_deref().expect("the origin got it");
    assert!(
        head.contains("\r\nX-Forwarded-For: 203.0.113.7\r\n"),
        "{head}"
    );
    assert!(!head.contains("6.6.6.6"), "{head}");
    assert_same("XFF replace", &fast, &pingora);
}

/// An origin's answer that names its own host (and the route's extra
/// name) everywhere a browser would follow or keep it.
fn deleak_answer(status: &str) -> Vec<u8> {
    if status == "rel" {
        // A relative redirect and a third party's URL: not ours.
        return b"HTTP/1.1 302 Found\r\nLocation: /moved?to=origin.example.test\r\n\
                 Content-Location: https://third.example.test/x\r\nContent-Length: 0\r\n\r\n"
            .to_vec();
    }
    if status == "bad" {
        // Values that name the origin but are not what cutover reads.
        return format!(
            "HTTP/1.1 302 Found\r\nLocation: https://user@{ORIGIN_NAME}/x\r\n\
             Refresh: soon; url=https://{ORIGIN_NAME}/\r\n\
             Set-Cookie: a=1; Domain=\"{ORIGIN_NAME}\"\r\n\
             Set-Cookie: b=2; Domain={ORIGIN_NAME}:443\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes();
    }
    let reason = match status {
        "301" => "Moved Permanently",
        "302" => "Found",
        "201" => "Created",
        _ => "OK",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Location: https://{ORIGIN_NAME}/moved?a=1\r\n\
         Content-Location: //{EXTRA_NAME}/assets/x.css\r\n\
         Refresh: 0; url=http://{ORIGIN_NAME}/next\r\n\
         Link: <https://{ORIGIN_NAME}/style.css>; rel=preload\r\n\
         Set-Cookie: s=1; Domain={ORIGIN_NAME}; Path=/\r\n\
         Set-Cookie: t=2; Domain=.ORIGIN.example.test; Secure\r\n\
         Set-Cookie: u=3; Domain=example.test; Path=/\r\n\
         Content-Length: 2\r\n\r\nok"
    )
    .into_bytes()
}

/// The request as each test sends it, with `{{T}}` the target.
fn to(host: &str, request: &str) -> String {
    request.replace("Host: cdn.example.test", &format!("Host: {host}"))
}

fn field(m: &Message, name: &str) -> Vec<String> {
    m.headers_named(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

#[tokio::test]
async fn responses_naming_the_upstream_go_back_with_the_clients_name_on_every_carrier() {
    let bed = start().await;
    let post =
        format!("POST {{T}} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nContent-Length: 3\r\n\r\nabc");
    for status in ["301", "302", "201"] {
        let target = format!("/deleak/{status}");
        let fast = serve(&bed, Carrier::Fast, &target, GET).await;
        let pingora = serve(&bed, Carrier::Pingora, &target, GET).await;
        assert_same(&target, &fast, &pingora);
        let r = &fast.response;
        assert_eq!(r.status().to_string(), status);
        // A plain listener, no X-Forwarded-Proto: the client used http,
        // but an https URL is never downgraded (an origin's redirect to
        // https would loop); an http one gets the client's http.
        assert_eq!(
            field(r, "location"),
            [format!("https://{PUBLIC_NAME}/moved?a=1")]
        );
        assert_eq!(
            field(r, "content-location"),
            [format!("//{PUBLIC_NAME}/assets/x.css")]
        );
        assert_eq!(
            field(r, "refresh"),
            [format!("0; url=http://{PUBLIC_NAME}/next")]
        );
        assert_eq!(
            field(r, "set-cookie"),
            [
                format!("s=1; Domain={PUBLIC_NAME}; Path=/"),
                format!("t=2; Domain=.{PUBLIC_NAME}; Secure"),
                "u=3; Domain=example.test; Path=/".to_string(),
            ]
        );
        // Not a field cutover reads: untouched.
        assert_eq!(
            field(r, "link"),
            [format!("<https://{ORIGIN_NAME}/style.css>; rel=preload")]
        );
        for header in ["location", "content-location", "refresh"] {
            let key =
                format!("cutover_response_rewrites_total{{header=\"{header}\",route=\"cdn\"}}");
            assert_eq!(
                fast.metrics.get(&key),
                Some(&1.0),
                "{key}: {:?}",
                fast.metrics
            );
        }
        let cookies = "cutover_response_rewrites_total{header=\"set-cookie\",route=\"cdn\"}";
        assert_eq!(fast.metrics.get(cookies), Some(&2.0), "{:?}", fast.metrics);

        // A POST, and the TLS listener: the client's scheme is https there.
        let posted = serve(&bed, Carrier::Fast, &target, &post).await;
        assert_eq!(
            field(&posted.response, "refresh"),
            [format!("0; url=http://{PUBLIC_NAME}/next")]
        );
        let (tls_fast, _) = serve_tls_pair(&bed, &target, &target, GET).await;
        let tls_post = serve(&bed, Carrier::TlsFast, &target, &post).await;
        for tls in [tls_fast, tls_post] {
            assert_eq!(
                field(&tls.response, "location"),
                [format!("https://{PUBLIC_NAME}/moved?a=1")],
            );
            assert_eq!(
                field(&tls.response, "refresh"),
                [format!("0; url=https://{PUBLIC_NAME}/next")]
            );
        }
    }

    // Behind an ALB that terminated the client's TLS: a trusted peer's
    // X-Forwarded-Proto says https, on both carriers.
    let alb = GET.replace(
        "X-Extra: kept\r\n",
        "X-Extra: kept\r\nX-Forwarded-Proto: https\r\n",
    );
    let fast = serve(&bed, Carrier::Fast, "/deleak/302", &alb).await;
    let pingora = serve(&bed, Carrier::Pingora, "/deleak/302", &alb).await;
    assert_same("X-Forwarded-Proto: https", &fast, &pingora);
    assert_eq!(
        field(&fast.response, "refresh"),
        [format!("0; url=https://{PUBLIC_NAME}/next")]
    );
}

#[tokio::test]
async fn relative_and_third_party_urls_are_left_alone_the_same() {
    let bed = start().await;
    let fast = serve(&bed, Carrier::Fast, "/deleak/rel", GET).await;
    let pingora = serve(&bed, Carrier::Pingora, "/deleak/rel", GET).await;
    assert_same("relative", &fast, &pingora);
    assert_eq!(
        field(&fast.response, "location"),
        ["/moved?to=origin.example.test"]
    );
    assert_eq!(
        field(&fast.response, "content-location"),
        ["https://third.example.test/x"]
    );
    assert!(
        !fast
            .metrics
            .keys()
            .any(|k| k.starts_with("cutover_response_rewrites")),
        "{:?}",
        fast.metrics
    );
}

#[tokio::test]
async fn values_naming_the_upstream_that_are_not_urls_are_left_counted_and_logged() {
    let bed = start().await;
    let fast = serve(&bed, Carrier::Fast, "/deleak/bad", GET).await;
    let pingora = serve(&bed, Carrier::Pingora, "/deleak/bad", GET).await;
    assert_same("unreadable", &fast, &pingora);
    let r = &fast.response;
    assert_eq!(
        field(r, "location"),
        [format!("https://user@{ORIGIN_NAME}/x")]
    );
    assert_eq!(
        field(r, "set-cookie"),
        [
            format!("a=1; Domain=\"{ORIGIN_NAME}\""),
            format!("b=2; Domain={ORIGIN_NAME}:443")
        ]
    );
    for (header, n) in [("location", 1.0), ("refresh", 1.0), ("set-cookie", 2.0)] {
        let key = format!(
            "cutover_response_rewrites_unreadable_total{{header=\"{header}\",route=\"cdn\"}}"
        );
        assert_eq!(
            fast.metrics.get(&key),
            Some(&n),
            "{key}: {:?}",
            fast.metrics
        );
    }
    assert!(
        bed.proxy
            .log()
            .contains("is not a URL or cookie domain cutover reads"),
        "{}",
        bed.proxy.log()
    );
    // Still serving.
    let after = serve(&bed, Carrier::Fast, "/parity/after-bad", GET).await;
    assert_eq!(after.response.status(), 200);
}

#[tokio::test]
async fn who_answered_is_checked_counted_and_logged_the_same() {
    let bed = start().await;
    let get = to(MARKED_NAME, GET);
    let key = "cutover_marker_mismatch_total{route=\"marked\",upstream=\"strict\"}";
    for (said, want) in [
        ("strict", None),
        ("STRICT", None),
        ("-", Some("missing")),
        ("old", Some("old-one")),
        ("staging", Some("unknown")),
    ] {
        let target = format!("/marker/{said}");
        let fast = serve(&bed, Carrier::Fast, &target, &get).await;
        let pingora = serve(&bed, Carrier::Pingora, &target, &get).await;
        assert_same(&target, &fast, &pingora);
        assert_eq!(fast.response.status(), 200);
        assert_eq!(
            fast.record.get("marker_mismatch").and_then(|v| v.as_str()),
            want,
            "{target}: {:?}",
            fast.record
        );
        assert_eq!(
            fast.metrics.get(key).copied(),
            want.map(|_| 1.0),
            "{target}: {:?}",
            fast.metrics
        );
        // Read before the route's edits, which remove it from the answer.
        assert!(field(&fast.response, "x-origin-id").is_empty());
    }
    assert!(
        bed.proxy
            .log()
            .contains("was not answered by upstream strict: its x-origin-id is old-one"),
        "{}",
        bed.proxy.log()
    );
}

#[tokio::test]
async fn detect_mode_changes_nothing_and_counts_the_same() {
    let bed = start().await;
    let get = to(DETECT_NAME, GET);
    let fast = serve(&bed, Carrier::Fast, "/deleak/301", &get).await;
    let pingora = serve(&bed, Carrier::Pingora, "/deleak/301", &get).await;
    assert_same("detect", &fast, &pingora);
    assert_eq!(
        field(&fast.response, "location"),
        [format!("https://{ORIGIN_NAME}/moved?a=1")]
    );
    assert_eq!(
        field(&fast.response, "set-cookie")[0],
        format!("s=1; Domain={ORIGIN_NAME}; Path=/")
    );
    // The route's extra name is the cdn route's, not this one's.
    assert_eq!(
        field(&fast.response, "content-location"),
        [format!("//{EXTRA_NAME}/assets/x.css")]
    );
    let key = "cutover_response_rewrites_total{header=\"location\",route=\"detect\"}";
    assert_eq!(fast.metrics.get(key), Some(&1.0), "{:?}", fast.metrics);
    assert!(
        bed.proxy
            .log()
            .contains("not rewritten (rewrite_response: detect)"),
        "{}",
        bed.proxy.log()
    );
}

#[tokio::test]
async fn a_proxy_headers_client_is_the_same_on_both_carriers() {
    let bed = start().await;
    // PROXY v2, TCP4 from 198.51.100.77: an NLB in front. The header's
    // address is the TCP peer from then on: not in client_ip.trusted, so
    // the client's own X-Forwarded-For is not believed, only appended to.
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend([198, 51, 100, 77, 127, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x90]);
    let fast = serve_after(&bed, Carrier::Fast, &header, "/parity/pp", GET).await;
    let pingora = serve_after(&bed, Carrier::Pingora, &header, "/parity/pp", GET).await;
    assert_same("PROXY v2", &fast, &pingora);
    assert_eq!(fast.record["client"], "198.51.100.77", "{:?}", fast.record);
    let head = fast.upstream_head.as_deref().expect("the origin got it");
    assert!(
        head.contains("\r\nX-Forwarded-For: 203.0.113.7, 198.51.100.77\r\n"),
        "{head}"
    );
}

#[tokio::test]
async fn a_head_that_does_not_finish_in_time_is_the_same_408() {
    let bed = start().await;
    let mut seen = Vec::new();
    let all = [
        Carrier::Fast,
        Carrier::Pingora,
        Carrier::TlsFast,
        Carrier::TlsPingora,
    ];
    for carrier in all {
        let mut c = open(&bed, carrier).await;
        let before = samples(&bed.proxy).await;
        let log_before = std::fs::read_to_string(&bed.access_log).unwrap_or_default();
        c.send(format!("GET /parity/slow HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n").as_bytes())
            .await;
        let response = c.response(false).await.expect("a 408 within 10 s");
        assert!(
            c.closes().await.is_ok(),
            "{carrier:?}: still open after the 408"
        );
        // Its access-log line (nothing of the head is known).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let record = loop {
            let log = std::fs::read_to_string(&bed.access_log).unwrap_or_default();
            if let Some(line) = log[log_before.len()..]
                .lines()
                .find(|l| l.contains("\"status\":408"))
            {
                break record_fields(serde_json::from_str(line).unwrap());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{carrier:?}: no 408 record"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let metrics = delta(&before, &samples(&bed.proxy).await);
        seen.push((client_head(&response), record, metrics));
    }
    let fast = &seen[0];
    assert!(
        fast.0.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{}",
        fast.0
    );
    for (carrier, other) in all.iter().zip(&seen).skip(1) {
        assert_eq!(
            fast.0, other.0,
            "different 408 heads (fast, then {carrier:?})"
        );
        assert_eq!(
            fast.1, other.1,
            "different access-log records ({carrier:?})"
        );
        assert_eq!(
            fast.2, other.2,
            "the metrics moved differently ({carrier:?})"
        );
    }
    let key = "cutover_rejected_requests_total{phase=\"parity\",reason=\"header_timeout\"}";
    assert_eq!(fast.2.get(key), Some(&1.0), "{:?}", fast.2);
}

#[tokio::test]
async fn requests_with_a_body_are_carried_the_same() {
    let bed = start().await;
    let body = "b".repeat(4096);
    let post = format!(
        "POST {{T}} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n{body}",
        body.len()
    );
    let head = carried_the_same(&bed, "POST 4 KiB", "/parity/post", &post, &body).await;
    assert!(head.starts_with("POST /parity/post HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nContent-Length: 4096\r\n"), "{head}");

    // A body of 256 KiB arrives after its head, in pieces; a PUT and a
    // DELETE without one.
    let big = "x".repeat(256 * 1024);
    for (method, body) in [("PUT", big.as_str()), ("DELETE", ""), ("PATCH", "p")] {
        let target = format!("/parity/{}", method.to_ascii_lowercase());
        let mut seen = Vec::new();
        for carrier in [Carrier::Fast, Carrier::Pingora, Carrier::TlsFast] {
            let head = format!(
                "{method} {target} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let mut c = open(&bed, carrier).await;
            let what = format!("{method} on {carrier:?}");
            let (got, head) = sent_in_pieces(
                &bed,
                &mut c,
                &target,
                &head,
                body.as_bytes(),
                64 * 1024,
                &what,
            )
            .await;
            assert!(got == body.as_bytes(), "{what}: body differs");
            seen.push(head);
        }
        assert_eq!(seen[0], seen[1], "{method}: different heads upstream");
    }

    // A body and the next request in one write: each its own answer.
    let first = format!(
        "POST /parity/pipe1 HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nContent-Length: 5\r\n\r\nhello"
    );
    a_body_then_the_next_request(&bed, &first, "/parity/pipe1", "/parity/pipe2").await;
}

/// `request` (for `target`, with a body that reads as `body`) on the four
/// carriers: 200, the same everywhere, and the fast path carried it (no
/// handover). The head the origin got.
async fn carried_the_same(
    bed: &Bed,
    name: &str,
    target: &str,
    request: &str,
    body: &str,
) -> String {
    let fast = serve(bed, Carrier::Fast, target, request).await;
    let pingora = serve(bed, Carrier::Pingora, target, request).await;
    assert_eq!(fast.response.status(), 200, "{name}: {fast:?}");
    assert_eq!(
        fast.upstream_body.as_deref(),
        Some(body.as_bytes()),
        "{name}"
    );
    assert_same(name, &fast, &pingora);
    serve_tls_pair(bed, name, target, request).await;
    assert!(
        !fast
            .metrics
            .keys()
            .any(|k| k.starts_with("cutover_connections_handed_over_total")),
        "{name}: {:?}",
        fast.metrics
    );
    fast.upstream_head.unwrap()
}

/// `first` (a request for `first_path`) and a GET for `then` in one write,
/// on both plain carriers: each gets its own answer, in order.
async fn a_body_then_the_next_request(bed: &Bed, first: &str, first_path: &str, then: &str) {
    for carrier in [Carrier::Fast, Carrier::Pingora] {
        let mut c = open(bed, carrier).await;
        c.send(format!("{first}GET {then} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n\r\n").as_bytes())
            .await;
        for want in [first_path, then] {
            let r = c.response(false).await.expect("answered");
            assert_eq!(r.status(), 200, "{carrier:?} {want}");
            assert!(
                String::from_utf8_lossy(&r.body).contains(want),
                "{carrier:?}: {:?} is not the answer to {want}",
                String::from_utf8_lossy(&r.body)
            );
        }
    }
}

/// Send `head`, then `framed` in pieces of `piece` bytes 20 ms apart, on
/// `c`; the body the origin read for `target` and the head it got.
async fn sent_in_pieces(
    bed: &Bed,
    c: &mut RawClient,
    target: &str,
    head: &str,
    framed: &[u8],
    piece: usize,
    what: &str,
) -> (Vec<u8>, String) {
    let before = bed.origin.requests(target).len();
    c.send(head.as_bytes()).await;
    for part in framed.chunks(piece) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.send(part).await;
    }
    let r = c.response(false).await.expect("answered");
    assert_eq!(r.status(), 200, "{what}");
    let got = bed.origin.requests(target);
    assert_eq!(got.len(), before + 1, "{what}");
    let msg = &got[before].msg;
    (
        msg.body.clone(),
        String::from_utf8_lossy(&msg.raw_head).into_owned(),
    )
}

/// A chunked request body: the origin reads the same body whatever the
/// carrier. The fast path forwards the chunks as the client framed them
/// and Pingora re-frames them; both drop trailers. Heads, decoded bodies,
/// responses, records and metrics are compared.
#[tokio::test]
async fn chunked_bodies_are_carried_the_same() {
    let bed = start().await;
    let chunk = "c".repeat(4096);
    let post = format!(
        "POST {{T}} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n1000\r\n{chunk}\r\n3;ext=\"a b\"\r\nend\r\n0\r\nX-Checksum: 1\r\n\r\n"
    );
    let want = format!("{chunk}end");
    let head = carried_the_same(&bed, "chunked POST", "/parity/chunked", &post, &want).await;
    assert!(
        head.contains("\r\nTransfer-Encoding: chunked\r\n"),
        "{head}"
    );
    assert!(!head.contains("Content-Length"), "{head}");

    // 256 KiB in chunks of 10,000 bytes, in pieces that cut chunk lines,
    // sent 20 ms apart: streamed upstream as it comes, on every carrier.
    let target = "/parity/chunked-stream";
    let mut framed = String::new();
    let mut body = String::new();
    for i in 0..26 {
        let piece = ((b'a' + i as u8) as char).to_string().repeat(10_000);
        framed.push_str(&format!("{:x}\r\n{piece}\r\n", piece.len()));
        body.push_str(&piece);
    }
    framed.push_str("0\r\n\r\n");
    let mut heads = Vec::new();
    for carrier in [
        Carrier::Fast,
        Carrier::Pingora,
        Carrier::TlsFast,
        Carrier::TlsPingora,
    ] {
        let mut c = open(&bed, carrier).await;
        let head = format!(
            "PUT {target} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let what = format!("{carrier:?}");
        let (got, head) = sent_in_pieces(
            &bed,
            &mut c,
            target,
            &head,
            framed.as_bytes(),
            64 * 1024 + 7,
            &what,
        )
        .await;
        assert!(
            got == body.as_bytes(),
            "{carrier:?}: a body of {} bytes arrived, not the {} sent",
            got.len(),
            body.len()
        );
        heads.push(head);
        // The connection serves the next request.
        c.send(
            format!("GET /parity/after-chunked HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n\r\n").as_bytes(),
        )
        .await;
        let r = c
            .response(false)
            .await
            .expect("the next request is answered");
        assert_eq!(r.status(), 200, "{carrier:?}");
    }
    assert_eq!(heads[0], heads[1], "different heads upstream");

    // A chunked body and the next request in one write: each its own answer.
    let first = format!(
        "POST /parity/cpipe1 HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    a_body_then_the_next_request(&bed, &first, "/parity/cpipe1", "/parity/cpipe2").await;
}

/// A chunked body that stops parsing after part of it went upstream: 400,
/// counted `bad_framing`, the connection closed, the same record on every
/// carrier; the origin never sees the bad bytes.
#[tokio::test]
async fn a_chunked_body_that_stops_parsing_midway_is_the_same_400() {
    let bed = start().await;
    let mut records = Vec::new();
    for (i, carrier) in Carrier::ALL.into_iter().enumerate() {
        let target = format!("/parity/badchunk{i}");
        let mut c = open(&bed, carrier).await;
        let before = samples(&bed.proxy).await;
        c.send(
            format!("POST {target} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .as_bytes(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A size line ended by a bare LF: two parsers could read it apart.
        c.send(b"5\nworld\r\n0\r\n\r\n").await;
        let r = c.response(false).await.expect("answered");
        assert_eq!(r.status(), 400, "{carrier:?}");
        c.closes_within(Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("{carrier:?}: {e}"));
        let r = record_without_path(&bed, &target).await;
        let moved = delta(&before, &samples(&bed.proxy).await);
        let refused = moved
            .iter()
            .filter(|(k, _)| k.starts_with("cutover_rejected_requests_total"))
            .map(|(k, v)| (k.clone(), *v))
            .collect::<Vec<_>>();
        assert_eq!(
            refused,
            [(
                "cutover_rejected_requests_total{phase=\"parity\",reason=\"bad_framing\"}"
                    .to_string(),
                1.0
            )],
            "{carrier:?}"
        );
        records.push((carrier, r));
    }
    assert_one_record(&records, 400);
    assert!(
        bed.origin.violations().is_empty(),
        "{:?}",
        bed.origin.violations()
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_is_the_same_499() {
    let bed = start().await;
    let mut records = Vec::new();
    for (i, carrier) in Carrier::ALL.into_iter().enumerate() {
        let target = format!("/parity/gone{i}");
        let mut c = open(&bed, carrier).await;
        c.send(
            format!("POST {target} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nContent-Length: 1000\r\n\r\nonly part")
                .as_bytes(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(c);
        let r = record_without_path(&bed, &target).await;
        records.push((carrier, r));
    }
    assert_one_record(&records, 499);
}

/// The access-log record of the one request for `target`, without its
/// path (each carrier's request has its own).
async fn record_without_path(bed: &Bed, target: &str) -> serde_json::Value {
    let mut r = wait_for_log(&bed.access_log, target, 1)
        .await
        .pop()
        .unwrap();
    r["path"] = serde_json::Value::Null;
    record_fields(r)
}

/// Every carrier left the same record, with `status`.
fn assert_one_record(records: &[(Carrier, serde_json::Value)], status: u16) {
    assert_eq!(records[0].1["status"], status, "{:?}", records[0]);
    for (carrier, r) in &records[1..] {
        assert_eq!(&records[0].1, r, "{carrier:?}: a different record");
    }
}

#[tokio::test]
async fn a_head_request_is_carried_the_same() {
    let bed = start().await;
    let req = GET.replacen("GET", "HEAD", 1);
    let fast = serve(&bed, Carrier::Fast, "/parity/head", &req).await;
    let pingora = serve(&bed, Carrier::Pingora, "/parity/head", &req).await;
    assert_eq!(fast.response.status(), 200);
    assert_same("HEAD", &fast, &pingora);
    serve_tls_pair(&bed, "HEAD", "/parity/head", &req).await;
}

#[tokio::test]
async fn an_upstream_that_refuses_is_the_same_502() {
    let bed = start().await;
    let req = GET.replace("cdn.example.test", REFUSE_NAME);
    // The first failure ejects the address (counted once, as a new
    // ejection); every carrier compared after it meets the same state: the
    // only address out, tried anyway, refused again.
    let first = serve(&bed, Carrier::Fast, "/parity/refused", &req).await;
    assert!(
        first
            .metrics
            .keys()
            .any(|k| k.contains("address_ejections_total")),
        "{:?}",
        first.metrics
    );
    let fast = serve(&bed, Carrier::Fast, "/parity/refused", &req).await;
    let pingora = serve(&bed, Carrier::Pingora, "/parity/refused", &req).await;
    assert_eq!(fast.response.status(), 502, "{fast:?}");
    assert!(
        fast.metrics.keys().any(|k| k.contains("kind=\"connect\"")),
        "{:?}",
        fast.metrics
    );
    assert_same("502", &fast, &pingora);
    serve_tls_pair(&bed, "502", "/parity/refused", &req).await;
    // One log line per failure, the same words from every carrier.
    let log = bed.proxy.log();
    for line in [
        "upstream connect failed: route=refuse upstream=closed addr=",
        "502 route=refuse upstream=closed kind=connect cause=",
    ] {
        assert_eq!(log.matches(line).count(), 5, "{line:?} 5 times in:\n{log}");
    }
}

#[tokio::test]
async fn an_upstream_that_stalls_is_the_same_504() {
    let bed = start().await;
    let req = GET.replace("cdn.example.test", STALL_NAME);
    let fast = serve(&bed, Carrier::Fast, "/parity/stall", &req).await;
    let pingora = serve(&bed, Carrier::Pingora, "/parity/stall", &req).await;
    assert_eq!(fast.response.status(), 504, "{fast:?}");
    assert_same("504", &fast, &pingora);
    serve_tls_pair(&bed, "504", "/parity/stall", &req).await;
    let log = bed.proxy.log();
    let line = "504 route=stall upstream=stalling kind=timeout cause=";
    assert_eq!(log.matches(line).count(), 4, "{line:?} 4 times in:\n{log}");
}

#[tokio::test]
async fn an_unknown_host_is_the_same_421() {
    let bed = start().await;
    let req = GET.replace("cdn.example.test", "unknown.example.test");
    let fast = serve(&bed, Carrier::Fast, "/parity/unknown", &req).await;
    let pingora = serve(&bed, Carrier::Pingora, "/parity/unknown", &req).await;
    assert_eq!(fast.response.status(), 421, "{fast:?}");
    assert!(fast.upstream_head.is_none());
    assert_same("421", &fast, &pingora);
    serve_tls_pair(&bed, "421", "/parity/unknown", &req).await;
}

#[tokio::test]
async fn a_malformed_request_is_refused_the_same() {
    let bed = start().await;
    let req = "GET {T} HTTP/1.1\r\nHost: cdn.example.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let fast = serve(&bed, Carrier::Fast, "/parity/malformed", req).await;
    let pingora = serve(&bed, Carrier::Pingora, "/parity/malformed", req).await;
    assert_eq!(fast.response.status(), 400, "{fast:?}");
    assert!(fast.upstream_head.is_none());
    assert!(
        fast.metrics
            .keys()
            .any(|k| k.contains("reason=\"bad_framing\"")),
        "{:?}",
        fast.metrics
    );
    assert_same("400", &fast, &pingora);
    serve_tls_pair(&bed, "400", "/parity/malformed", req).await;
}

#[tokio::test]
async fn a_head_pingoras_parser_refuses_is_answered_counted_and_logged_on_both() {
    let bed = start().await;
    let mut heads = Vec::new();
    for carrier in [Carrier::Fast, Carrier::Pingora] {
        let before = samples(&bed.proxy).await;
        let mut c = open(&bed, carrier).await;
        c.send(b"GET /parity/bad-name HTTP/1.1\r\nHost: cdn.example.test\r\nX(A): 1\r\n\r\n")
            .await;
        let r = c.response(false).await.expect("answered");
        assert_eq!(r.status(), 400, "{carrier:?}");
        heads.push(client_head(&r));
        let delta = delta(&before, &samples(&bed.proxy).await);
        assert!(
            delta
                .iter()
                .any(|(k, v)| k.contains("reason=\"malformed\"") && *v == 1.0),
            "{carrier:?}: {delta:?}"
        );
    }
    assert_eq!(heads[0], heads[1]);
    let records = wait_for_log(&bed.access_log, "-", 2).await;
    assert!(
        records
            .iter()
            .all(|r| r["status"] == 400 && r["route"] == "-"),
        "{records:?}"
    );
    assert!(bed.origin.requests("/parity/bad-name").is_empty());
}

/// An upstream whose connection closes with the request in flight (an
/// edge killed under load): a GET is sent again, on the backup, and the
/// client never sees the failure; a POST, which may have reached the
/// origin, is answered 502 and counted as not resent. The same on every
/// carrier. A bed per carrier: the failure ejects the dying upstream's
/// address, which would send the next carrier's request straight to the
/// backup.
#[tokio::test]
async fn a_connection_dying_before_the_answer_resends_a_get_and_not_a_post_the_same() {
    let get = GET.replace("cdn.example.test", DIE_NAME);
    let post =
        format!("POST {{T}} HTTP/1.1\r\nHost: {DIE_POST_NAME}\r\nContent-Length: 5\r\n\r\nhello");
    let mut seen = Vec::new();
    for carrier in [
        Carrier::Fast,
        Carrier::Pingora,
        Carrier::TlsFast,
        Carrier::TlsPingora,
    ] {
        let bed = start().await;
        // Every carrier with a pooled connection to the origin first (the
        // Pingora carriers' warm-up leaves one): the dying upstream gets it
        // from the pool, finds it closed, and dies again on a fresh one.
        let mut c = open(&bed, carrier).await;
        if !carrier.pingora() {
            c.send(format!("GET /parity/warm HTTP/1.1\r\nHost: {WARM_NAME}\r\n\r\n").as_bytes())
                .await;
            assert_eq!(c.response(false).await.unwrap().status(), 200);
            wait_for_log(&bed.access_log, "/parity/warm", 1).await;
        }
        let mut g = serve_on(&bed, carrier, c, "/parity/die", &get).await;
        let mut p = serve(&bed, carrier, "/parity/die-post", &post).await;
        // Each bed's origin has a port of its own.
        for s in [&mut g, &mut p] {
            let addr = s.record["upstream_addr"].take();
            assert_eq!(addr, bed.origin.addr.to_string(), "{carrier:?}");
        }
        assert_eq!(g.response.status(), 200, "{carrier:?}: {g:?}");
        assert_eq!(g.response.body, b"GET /parity/die?q=1", "{carrier:?}");
        // The origin got it three times: on the pooled connection and on a
        // fresh one from the dying upstream, then from the backup.
        let hosts: Vec<String> = bed
            .origin
            .requests("/parity/die?")
            .iter()
            .map(|r| r.msg.header_str("host").unwrap_or("").to_string())
            .collect();
        assert_eq!(hosts, [DYING_HOST, DYING_HOST, ORIGIN_NAME], "{carrier:?}");
        let key = |name: &str, route: &str, rest: &str| {
            // Labels in the exposition's (alphabetical) order.
            format!("{name}{{{rest},route=\"{route}\",upstream=\"dying\"}}")
        };
        for result in ["stale", "failed"] {
            let resent = key(
                "cutover_upstream_resends_total",
                "die",
                &format!("result=\"{result}\""),
            );
            assert_eq!(
                g.metrics.get(&resent),
                Some(&1.0),
                "{carrier:?}: {:?}",
                g.metrics
            );
        }
        let failover = key(
            "cutover_upstream_failovers_total",
            "die",
            "reason=\"reset\"",
        );
        assert_eq!(
            g.metrics.get(&failover),
            Some(&1.0),
            "{carrier:?}: {:?}",
            g.metrics
        );
        assert_eq!(g.record["upstream"], "backup", "{carrier:?}");

        assert_eq!(p.response.status(), 502, "{carrier:?}: {p:?}");
        assert_eq!(
            bed.origin.requests("/parity/die-post").len(),
            1,
            "{carrier:?}: sent twice"
        );
        let not_resent = key(
            "cutover_upstream_resends_total",
            "die-post",
            "result=\"unsafe\"",
        );
        assert_eq!(
            p.metrics.get(&not_resent),
            Some(&1.0),
            "{carrier:?}: {:?}",
            p.metrics
        );
        let log = bed.proxy.log();
        for line in [
            "upstream connection failed before answering: route=die upstream=dying addr=",
            "502 route=die-post upstream=dying kind=reset cause=",
        ] {
            assert_eq!(
                log.matches(line).count(),
                1,
                "{carrier:?}: {line:?} once in:\n{log}"
            );
        }
        seen.push((carrier, g, p));
    }
    // Plain listener and TLS listener each: fast path, then Pingora path.
    for pair in seen.chunks(2) {
        let [(_, fast_get, fast_post), (carrier, g, p)] = pair else {
            unreachable!()
        };
        assert_same(&format!("resent GET ({carrier:?})"), fast_get, g);
        assert_same(&format!("POST not resent ({carrier:?})"), fast_post, p);
    }
}

/// A PUT whose chunked body arrives in pieces, on a connection that dies
/// before the answer: sent again to the backup with the whole body, as the
/// body is still held (up to 64 KiB: Pingora's retry buffer, the fast
/// path's kept body); one past 64 KiB is not (502, counted `unsafe`).
#[tokio::test]
async fn a_put_whose_body_came_in_pieces_is_resent_while_held_the_same() {
    let small: Vec<String> = (0..3).map(|i| format!("{i}").repeat(1000)).collect();
    let large: Vec<String> = (0..5).map(|i| format!("{i}").repeat(20_000)).collect();
    let mut records = Vec::new();
    for carrier in Carrier::ALL {
        let bed = start().await;
        // The one not resent first: it ejects nothing, and the other then
        // finds the dying address still in.
        for (name, pieces, resent) in [("large", &large, false), ("small", &small, true)] {
            let target = format!("/parity/die-put-{name}");
            let mut c = open(&bed, carrier).await;
            c.send(
                format!("PUT {target} HTTP/1.1\r\nHost: {DIE_NAME}\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .as_bytes(),
            )
            .await;
            for piece in pieces.iter() {
                tokio::time::sleep(Duration::from_millis(30)).await;
                c.send(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes())
                    .await;
            }
            c.send(b"0\r\n\r\n").await;
            let r = c.response(false).await.expect("answered");
            let got = bed.origin.requests(&target);
            let by_backup: Vec<_> = got
                .iter()
                .filter(|r| r.msg.header_str("host") == Some(ORIGIN_NAME))
                .collect();
            let what = format!("{carrier:?} {name}");
            if resent {
                assert_eq!(r.status(), 200, "{what}");
                assert_eq!(by_backup.len(), 1, "{what}");
                assert!(
                    by_backup[0].msg.body == pieces.concat().as_bytes(),
                    "{what}: the backup got {} bytes",
                    by_backup[0].msg.body.len()
                );
            } else {
                assert_eq!(r.status(), 502, "{what}");
                assert!(by_backup.is_empty(), "{what}: sent again");
            }
            let mut r = record_without_path(&bed, &target).await;
            r["upstream_addr"].take();
            records.push(((carrier, name), r));
        }
        let m = bed.proxy.metrics().await;
        for (result, want) in [("failed", 1.0), ("unsafe", 1.0)] {
            assert_eq!(
                sample(
                    &m,
                    "cutover_upstream_resends_total",
                    &[("route", "die"), ("upstream", "dying"), ("result", result)]
                ),
                Some(want),
                "{carrier:?} {result}: {m}"
            );
        }
    }
    for ((carrier, name), r) in &records {
        let first = &records.iter().find(|((_, n), _)| n == name).unwrap().1;
        assert_eq!(first, r, "{carrier:?} {name}: a different record");
    }
}

#[tokio::test]
async fn while_draining_both_carriers_answer_with_connection_close() {
    let mut bed = start().await;
    let fast_conn = open(&bed, Carrier::Fast).await;
    let pingora_conn = open(&bed, Carrier::Pingora).await;
    bed.proxy.signal(libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !bed
        .proxy
        .log()
        .contains("draining: answering with Connection: close")
    {
        assert!(tokio::time::Instant::now() < deadline, "never drained");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut seen = Vec::new();
    for (carrier, mut c) in [(Carrier::Fast, fast_conn), (Carrier::Pingora, pingora_conn)] {
        c.send(GET.replace("{T}", "/parity/drain").as_bytes()).await;
        let response = c.response(false).await.expect("answered while draining");
        let closed = c.closes_within(Duration::from_secs(2)).await.is_ok();
        seen.push((carrier, client_head(&response), closed));
    }
    for (carrier, head, closed) in &seen {
        assert!(
            head.to_ascii_lowercase().contains("\r\nconnection: close"),
            "{carrier:?}: {head}"
        );
        assert!(
            closed,
            "{carrier:?}: the connection stayed open after its last response"
        );
    }
    assert_eq!(
        seen[0].1, seen[1].1,
        "different response heads while draining"
    );
    bed.proxy.wait_exit(Duration::from_secs(15));
    drop(bed.dir);
}

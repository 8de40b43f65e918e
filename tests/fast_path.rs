//! The fast path (plain-HTTP GET/HEAD) against an origin that answers with
//! scripted raw bytes over real TLS, so every framing a CDN can send is
//! exercised exactly: chunked with trailers, close-delimited, informational
//! responses, HEAD, 204, `Connection: close`, an idle connection closed by
//! the origin, garbage. Also the handover to the Pingora path mid-connection,
//! pipelining, and header edits on a plain listener.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use cutover::rehearsal::demo::PUBLIC_NAME;
use cutover::rehearsal::edge::pattern_byte;
use cutover::rehearsal::pki::TestCa;
use http_body_util::{BodyExt, Full};
use openssl::ssl::Ssl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORIGIN_NAME: &str = "origin.example.test";
const BIG: u64 = 1 << 20;

/// A TLS origin that records every request head and answers by path with
/// fixed bytes (see `script`).
struct ScriptedOrigin {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicU64>,
    /// Signalled once the bogus body after a HEAD answer (`/late-body`) is sent.
    late: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum After {
    KeepOpen,
    Close,
}

/// The raw answer for a request; the default echoes the request head so a
/// test sees exactly what cutover sent.
fn script(method: &str, path: &str, head: &str) -> (Vec<Vec<u8>>, After) {
    let one = |s: &str| vec![s.as_bytes().to_vec()];
    match path {
        "/chunked" => (
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_vec(),
                b"lo\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec(),
            ],
            After::KeepOpen,
        ),
        "/big-chunked" => {
            let mut parts = vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()];
            let mut offset = 0;
            while offset < BIG {
                let n = (7919).min(BIG - offset);
                let mut chunk = format!("{n:x}\r\n").into_bytes();
                chunk.extend((offset..offset + n).map(pattern_byte));
                chunk.extend_from_slice(b"\r\n");
                parts.push(chunk);
                offset += n;
            }
            parts.push(b"0\r\n\r\n".to_vec());
            (parts, After::KeepOpen)
        }
        "/close-delimited" => (
            one("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-close"),
            After::Close,
        ),
        "/early-hints" => (
            vec![
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            ],
            After::KeepOpen,
        ),
        "/upstream-close" => (
            one("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"),
            After::Close,
        ),
        // Closes without saying so: the next request on this connection would fail.
        "/drop-idle" => (
            one("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ndropped"),
            After::Close,
        ),
        "/late-body" if method == "HEAD" => (
            one("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            After::KeepOpen,
        ),
        "/head" if method == "HEAD" => (
            one("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
            After::KeepOpen,
        ),
        "/no-content" => (
            one("HTTP/1.1 204 No Content\r\nX-Empty: yes\r\n\r\n"),
            After::KeepOpen,
        ),
        "/edits" => (
            one("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Drop-Me: 1\r\nX-Keep: 1\r\n\r\nok"),
            After::KeepOpen,
        ),
        "/garbage" => (one("SURPRISE\r\n\r\n"), After::Close),
        _ => (
            one(&format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}",
                head.len()
            )),
            After::KeepOpen,
        ),
    }
}

impl ScriptedOrigin {
    async fn start(ca: &TestCa) -> ScriptedOrigin {
        let acceptor = tls_acceptor(ca, ORIGIN_NAME);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let late = Arc::new(tokio::sync::Notify::new());
        let (h, c, l) = (heads.clone(), connections.clone(), late.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let ssl = Ssl::new(acceptor.context()).unwrap();
                let heads = h.clone();
                let late = l.clone();
                tokio::spawn(async move {
                    let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                    if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                        return;
                    }
                    serve_scripted(tls, heads, late).await;
                });
            }
        });
        ScriptedOrigin {
            addr,
            heads,
            connections,
            late,
            task,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn serve_scripted(
    mut tls: tokio_openssl::SslStream<tokio::net::TcpStream>,
    heads: Arc<Mutex<Vec<String>>>,
    late: Arc<tokio::sync::Notify>,
) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        // A request body (the handover test's POST) is read and dropped.
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or("").to_string();
        let path = words.next().unwrap_or("").to_string();
        heads.lock().unwrap().push(head.clone());
        let (parts, after) = script(&method, &path, &head);
        for part in parts {
            if tls.write_all(&part).await.is_err() {
                return;
            }
            // Separate TLS records, often separate reads on the proxy side.
            let _ = tls.flush().await;
            tokio::task::yield_now().await;
        }
        if path == "/late-body" {
            // A broken origin: a body after a HEAD answer, in a later record.
            if tls.write_all(b"hello").await.is_err() || tls.flush().await.is_err() {
                return;
            }
            late.notify_one();
        }
        if let After::Close = after {
            let _ = tls.shutdown().await;
            return;
        }
    }
}

struct Setup {
    _bed_dir: tempfile::TempDir,
    origin: ScriptedOrigin,
    proxy: Proxy,
}

async fn setup(route_extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fast path test CA").unwrap();
    let ca_path = ca.write_cert(dir.path()).unwrap();
    let origin = ScriptedOrigin::start(&ca).await;
    let upstreams = format!(
        "      - name: scripted\n        address: 127.0.0.1:{}\n        sni: {ORIGIN_NAME}\n        host_header: {ORIGIN_NAME}\n        ca_file: {}\n",
        origin.addr.port(),
        ca_path.display()
    );
    let mut yaml = config_yaml(&origin.addr, &ca_path, dir.path(), &upstreams);
    if !route_extra.is_empty() {
        yaml = yaml.replacen(
            "    upstreams:\n",
            &format!("{route_extra}    upstreams:\n"),
            1,
        );
    }
    let proxy = Proxy::start(dir.path(), &yaml, None);
    Setup {
        _bed_dir: dir,
        origin,
        proxy,
    }
}

/// One keep-alive client connection that can send any method and body.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        Conn { sender }
    }

    async fn send(&mut self, method: &str, path: &str, body: &'static str) -> Got {
        self.sender.ready().await.expect("connection still open");
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", PUBLIC_NAME)
            .header("x-forwarded-for", "192.0.2.7")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Got {
            status,
            headers,
            body,
        }
    }
}

fn text(b: &Bytes) -> &str {
    std::str::from_utf8(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_framing_passes_through_one_keep_alive_connection() {
    let s = setup("").await;
    let mut c = Conn::open(s.proxy.listen).await;

    let r = c.send("GET", "/", "").await;
    assert_eq!(r.status, 200, "{}", s.proxy.log());
    let head = text(&r.body).to_ascii_lowercase();
    assert!(head.starts_with("get / http/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("host: {ORIGIN_NAME}\r\n")), "{head}");
    assert!(
        head.contains("x-forwarded-for: 192.0.2.7, 127.0.0.1\r\n"),
        "{head}"
    );
    assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
    assert!(
        head.contains(&format!("x-forwarded-host: {PUBLIC_NAME}\r\n")),
        "{head}"
    );
    assert_eq!(
        head.matches("host: ").count(),
        2,
        "one Host, one X-Forwarded-Host: {head}"
    );

    let r = c.send("GET", "/chunked", "").await;
    assert_eq!((r.status, text(&r.body)), (200, "hello world"));
    assert_eq!(r.headers.get("transfer-encoding").unwrap(), "chunked");

    let r = c.send("GET", "/early-hints", "").await;
    assert_eq!((r.status, text(&r.body)), (200, "ok"));

    let r = c.send("HEAD", "/head", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("content-length").unwrap(), "1000");
    assert!(r.body.is_empty());

    let r = c.send("GET", "/no-content", "").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.headers.get("x-empty").unwrap(), "yes");

    let r = c.send("GET", "/big-chunked", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as u64, BIG);
    assert!(r
        .body
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern_byte(i as u64)));

    // Everything so far went over the one upstream connection the client
    // connection held on to.
    assert_eq!(s.origin.connections.load(Ordering::SeqCst), 1);

    // A body that ends when the origin closes: the client connection ends
    // with it, and is told so.
    let r = c.send("GET", "/close-delimited", "").await;
    assert_eq!((r.status, text(&r.body)), (200, "until-close"));
    assert_eq!(r.headers.get("connection").unwrap(), "close");

    let labels = [("upstream", "scripted"), ("code", "200")];
    let m = s
        .proxy
        .metrics_when("cutover_requests_total", &labels, 6.0)
        .await;
    assert_eq!(
        sample(&m, "cutover_requests_total", &labels),
        Some(6.0),
        "{m}"
    );
    // All of it on the fast path.
    assert_eq!(
        sample_sum(&m, "cutover_connections_handed_over_total"),
        0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_closed_while_idle_is_replaced_without_an_error() {
    let s = setup("").await;
    let mut c = Conn::open(s.proxy.listen).await;
    for _ in 0..3 {
        let r = c.send("GET", "/drop-idle", "").await;
        assert_eq!(
            (r.status, text(&r.body)),
            (200, "dropped"),
            "{}",
            s.proxy.log()
        );
    }
    let r = c.send("GET", "/upstream-close", "").await;
    assert_eq!((r.status, text(&r.body)), (200, "ok"));
    let r = c.send("GET", "/", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.origin.heads().len(),
        5,
        "each request reached the origin once"
    );
    let m = s.proxy.metrics().await;
    for kind in ["connect", "tls", "timeout", "reset", "other"] {
        assert_eq!(
            sample(&m, "cutover_upstream_errors_total", &[("kind", kind)]),
            Some(0.0),
            "{kind}: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_requests_are_handed_to_pingora_mid_connection() {
    let s = setup("").await;
    let mut c = Conn::open(s.proxy.listen).await;
    let r = c.send("GET", "/", "").await;
    assert_eq!(r.status, 200);
    let handed_over = |m: &str| sample_sum(m, "cutover_connections_handed_over_total");
    assert_eq!(handed_over(&s.proxy.metrics().await), 0.0);
    // A POST with a Content-Length body stays on the fast path.
    let r = c.send("POST", "/", "field=value").await;
    assert_eq!(r.status, 200, "{}", s.proxy.log());
    assert!(
        text(&r.body).starts_with("POST / HTTP/1.1\r\n"),
        "{}",
        text(&r.body)
    );
    assert_eq!(handed_over(&s.proxy.metrics().await), 0.0);
    // An extension method: Pingora's path takes the connection from here on.
    let r = c.send("PURGE", "/", "").await;
    assert_eq!(r.status, 200, "{}", s.proxy.log());
    assert!(
        text(&r.body).starts_with("PURGE / HTTP/1.1\r\n"),
        "{}",
        text(&r.body)
    );
    let r = c.send("GET", "/chunked", "").await;
    assert_eq!((r.status, text(&r.body)), (200, "hello world"));
    let m = s.proxy.metrics().await;
    assert_eq!(handed_over(&m), 1.0, "{m}");
    assert_eq!(
        sample(
            &m,
            "cutover_connections_handed_over_total",
            &[("reason", "method")]
        ),
        Some(1.0),
        "an extension method is handed over for its method: {m}"
    );

    // Pipelined: two requests in one write, answered in order; the second
    // asks to close, and the connection ends after its answer.
    let req = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n{extra}\r\n")
    };
    let both = format!(
        "{}{}",
        req("/first", ""),
        req("/second", "Connection: close\r\n")
    );
    let (status, reply) = raw_request(s.proxy.listen, both.as_bytes());
    assert!(status.starts_with("HTTP/1.1 200"), "{reply}");
    let first = reply.find("GET /first").expect("first answered");
    let second = reply.find("GET /second").expect("second answered");
    assert!(first < second, "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 2, "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );

    // HTTP/1.0 and a missing Host take Pingora's path too, with its answers.
    let (status, _) = raw_request(
        s.proxy.listen,
        format!("GET / HTTP/1.0\r\nHost: {PUBLIC_NAME}\r\n\r\n").as_bytes(),
    );
    assert!(status.contains(" 200"), "{status}");
    let (status, _) = raw_request(s.proxy.listen, b"GET / HTTP/1.1\r\n\r\n");
    assert!(status.contains(" 400"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_edits_apply_on_a_plain_listener() {
    let s = setup(
        "    request_headers: { set: { X-Migration: test }, remove: [Cookie] }\n    response_headers: { set: { X-Served-Via: cutover }, remove: [x-drop-me] }\n",
    )
    .await;
    let mut c = Conn::open(s.proxy.listen).await;
    let r = c.send("GET", "/", "").await;
    let head = text(&r.body).to_ascii_lowercase();
    assert!(head.contains("x-migration: test\r\n"), "{head}");
    let r = c.send("GET", "/edits", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("x-served-via").unwrap(), "cutover");
    assert_eq!(r.headers.get("x-keep").unwrap(), "1");
    assert!(r.headers.get("x-drop-me").is_none());

    let (_, reply) = raw_request(
        s.proxy.listen,
        format!("GET / HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nCookie: secret=1\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(!reply.to_ascii_lowercase().contains("cookie"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_upstream_is_a_502_and_the_proxy_keeps_serving() {
    let s = setup("").await;
    let mut c = Conn::open(s.proxy.listen).await;
    let r = c.send("GET", "/garbage", "").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.headers.get("connection").unwrap(), "close");
    let mut c = Conn::open(s.proxy.listen).await;
    let r = c.send("GET", "/", "").await;
    assert_eq!(r.status, 200);
    let labels = [("upstream", "scripted"), ("kind", "other")];
    let m = s
        .proxy
        .metrics_when("cutover_upstream_errors_total", &labels, 1.0)
        .await;
    assert_eq!(
        sample(&m, "cutover_upstream_errors_total", &labels),
        Some(1.0),
        "{m}"
    );
    assert!(
        s.proxy
            .log()
            .contains("502 route=cdn upstream=scripted kind=other"),
        "{}",
        s.proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_bodiless_answer_are_never_read_as_the_next_response() {
    let s = setup("").await;
    let mut c = Conn::open(s.proxy.listen).await;
    let r = c.send("HEAD", "/late-body", "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    tokio::time::timeout(std::time::Duration::from_secs(10), s.origin.late.notified())
        .await
        .expect("origin sent its late bytes");
    // The held upstream connection has "hello" waiting on it: it must not
    // carry the next request.
    let r = c.send("GET", "/", "").await;
    assert_eq!(r.status, 200, "{}", s.proxy.log());
    assert!(
        text(&r.body).starts_with("GET / HTTP/1.1\r\n"),
        "{}",
        text(&r.body)
    );
    assert_eq!(s.origin.connections.load(Ordering::SeqCst), 2);
}

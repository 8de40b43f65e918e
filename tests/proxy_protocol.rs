//! PROXY protocol listeners (what an NLB sends): v1, v2 (TCP4, TCP6,
//! LOCAL, TLVs with the AWS VPC endpoint id), a header split across two
//! writes, a second header inside the stream, untrusted peers, missing
//! headers and bad ones, on both carriers (a GET on the fast path, a POST
//! on the Pingora path). The client address the header names must be the
//! one in the access log, in `X-Forwarded-For` upstream and in the sticky
//! choice.
//!
//! The test client is trusted from 127.0.0.1 and untrusted from 127.0.0.2
//! (both loopback).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::strict_origin::{Script, StrictOrigin};
use common::*;
use cutover::rehearsal::demo::PUBLIC_NAME;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

struct Bed {
    _dir: tempfile::TempDir,
    origin: StrictOrigin,
    proxy: Proxy,
    v1: SocketAddr,
    auto: SocketAddr,
    /// A TLS listener with `proxy_protocol: v2`.
    tls: SocketAddr,
    ca_path: PathBuf,
    access_log: PathBuf,
}

async fn start() -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let script: Script = Arc::new(|_| None);
    let origin = StrictOrigin::start_plain(script).await;
    let (v1, auto, tls) = (free_port(), free_port(), free_port());
    let ca = cutover::rehearsal::pki::TestCa::new("pp CA").unwrap();
    let ca_path = ca.write_cert(dir.path()).unwrap();
    let issued = ca.issue(&[PUBLIC_NAME]).unwrap();
    let (cert, key) = issued.write_pair(dir.path(), "l").unwrap();
    let access_log = dir.path().join("access.log");
    let upstream = |name: &str| {
        format!(
            "      - {{ name: {name}, address: \"{}\", tls: false, weight: 50 }}\n",
            origin.addr
        )
    };
    let yaml = format!(
        "phase: pp\n\
         listeners:\n\
         \x20 - {{ address: 127.0.0.1:0, proxy_protocol: v2, trusted: [127.0.0.1] }}\n\
         \x20 - {{ address: {v1}, proxy_protocol: v1, trusted: [127.0.0.1] }}\n\
         \x20 - {{ address: {auto}, proxy_protocol: auto, trusted: [127.0.0.1] }}\n\
         \x20 - {{ address: {tls}, proxy_protocol: v2, trusted: [127.0.0.1], tls: {{ cert: {cert}, key: {key} }} }}\n\
         admin: {{ address: 127.0.0.1:0 }}\n\
         server: {{ threads: 2, grace_period: 1s, graceful_shutdown_timeout: 1s, upgrade_sock: {d}/u.sock, pid_file: {d}/c.pid }}\n\
         access_log: {{ format: json, path: {log} }}\n\
         routes:\n  - name: cdn\n    hosts: [{PUBLIC_NAME}]\n    sticky: client_ip\n    upstreams:\n{a}{b}",
        d = dir.path().display(),
        log = access_log.display(),
        a = upstream("a"),
        b = upstream("b"),
        cert = cert.display(),
        key = key.display(),
    );
    let proxy = Proxy::start(dir.path(), &yaml, None);
    Bed {
        _dir: dir,
        origin,
        proxy,
        v1,
        auto,
        tls,
        ca_path,
        access_log,
    }
}

fn v2(cmd: u8, fam: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
    let mut h = SIG.to_vec();
    h.push(0x20 | cmd);
    h.push(fam);
    h.extend(((addresses.len() + tlvs.len()) as u16).to_be_bytes());
    h.extend(addresses);
    h.extend(tlvs);
    h
}

/// TCP4 from `src`:40000 to 10.0.0.5:8080.
fn tcp4(src: [u8; 4]) -> Vec<u8> {
    let mut a = src.to_vec();
    a.extend([10, 0, 0, 5]);
    a.extend(40000u16.to_be_bytes());
    a.extend(8080u16.to_be_bytes());
    a
}

fn tcp6(src: &str) -> Vec<u8> {
    let mut a = src.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    a.extend(
        "2001:db8::5"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    a.extend(40000u16.to_be_bytes());
    a.extend(8080u16.to_be_bytes());
    a
}

const VPCE: &str = "vpce-0123456789abcdef0";

fn vpce_tlv() -> Vec<u8> {
    let mut t = vec![0xEA];
    t.extend(((VPCE.len() + 1) as u16).to_be_bytes());
    t.push(0x01);
    t.extend(VPCE.as_bytes());
    t
}

/// A GET (the fast path) or a request with a chunked body and a method
/// the fast path hands over (the Pingora path) for `path`.
fn request(path: &str, post: bool) -> Vec<u8> {
    if post {
        format!("{VIA_PINGORA} {path} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    } else {
        format!("GET {path} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nConnection: close\r\n\r\n")
    }
    .into_bytes()
}

/// Connect to `to` from `from` (a loopback address), write `parts` one
/// write each (20 ms apart), and read until the proxy closes.
async fn exchange(from: &str, to: SocketAddr, parts: &[&[u8]]) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The proxy may have closed already (a refused header).
        if s.write_all(p).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The access-log record for `path`, once written.
async fn record(bed: &Bed, path: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(&bed.access_log).unwrap_or_default();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains(&format!("\"path\":\"{path}\"")))
        {
            return serde_json::from_str(line).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no record for {path}: {log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The X-Forwarded-For the origin got for `path`.
fn forwarded_for(bed: &Bed, path: &str) -> String {
    let got = bed.origin.requests(path);
    let head =
        String::from_utf8_lossy(&got.last().expect("the origin got it").msg.raw_head).into_owned();
    head.lines()
        .find_map(|l| l.strip_prefix("X-Forwarded-For: "))
        .unwrap_or("")
        .to_string()
}

async fn proxy_results(bed: &Bed) -> String {
    bed.proxy.metrics().await
}

fn result(metrics: &str, label: &str) -> f64 {
    sample(
        metrics,
        "cutover_proxy_protocol_connections_total",
        &[("result", label)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_names_the_client_on_both_carriers() {
    let bed = start().await;
    let listen = bed.proxy.listen;
    for post in [false, true] {
        let carrier = if post { "pingora" } else { "fast" };
        let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
            (
                "tcp4",
                vec![v2(1, 0x11, &tcp4([192, 0, 2, 7]), &[])],
                "192.0.2.7",
            ),
            (
                "tcp6",
                vec![v2(1, 0x21, &tcp6("2001:db8::7"), &[])],
                "2001:db8::7",
            ),
            // An NLB health check: the connection's own peer.
            ("local", vec![v2(0, 0x00, &[], &[])], "127.0.0.1"),
            (
                "tlvs",
                vec![v2(
                    1,
                    0x11,
                    &tcp4([192, 0, 2, 8]),
                    &[&[4u8, 0, 1, 0][..], &vpce_tlv()].concat(),
                )],
                "192.0.2.8",
            ),
            // The header in two writes, cut inside the addresses.
            (
                "split",
                {
                    let h = v2(1, 0x11, &tcp4([192, 0, 2, 9]), &[]);
                    vec![h[..20].to_vec(), h[20..].to_vec()]
                },
                "192.0.2.9",
            ),
        ];
        for (name, header, client) in cases {
            let path = format!("/{carrier}/{name}");
            let mut parts: Vec<&[u8]> = header.iter().map(Vec::as_slice).collect();
            let req = request(&path, post);
            parts.push(&req);
            let answer = exchange("127.0.0.1", listen, &parts).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
            let r = record(&bed, &path).await;
            assert_eq!(r["client"], client, "{path}: {r}");
            assert!(
                forwarded_for(&bed, &path).ends_with(client),
                "{path}: X-Forwarded-For {:?}",
                forwarded_for(&bed, &path)
            );
            if name == "tlvs" {
                assert_eq!(r["vpce"], VPCE, "{r}");
            } else {
                assert!(r.get("vpce").is_none(), "{r}");
            }
        }
    }
    let metrics = proxy_results(&bed).await;
    assert_eq!(result(&metrics, "v2"), 8.0, "{metrics}");
    assert_eq!(result(&metrics, "local"), 2.0, "{metrics}");

    // v1 on its listener, TCP4 and TCP6.
    for (header, client) in [
        (
            "PROXY TCP4 198.51.100.4 10.0.0.5 40000 8080\r\n",
            "198.51.100.4",
        ),
        (
            "PROXY TCP6 2001:db8::44 2001:db8::5 40000 8080\r\n",
            "2001:db8::44",
        ),
    ] {
        let path = format!("/v1/{client}");
        let answer = exchange(
            "127.0.0.1",
            bed.v1,
            &[header.as_bytes(), &request(&path, false)],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(record(&bed, &path).await["client"], client);
    }
    // `auto`: a trusted peer may send none.
    let answer = exchange("127.0.0.1", bed.auto, &[&request("/auto/none", false)]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(record(&bed, "/auto/none").await["client"], "127.0.0.1");
}

/// On the TLS listener: `header` in clear, then the TLS handshake and
/// `request` inside it; what came back.
async fn exchange_tls(bed: &Bed, header: &[u8], request: &[u8]) -> Result<String, String> {
    let mut tcp = tokio::net::TcpStream::connect(bed.tls).await.unwrap();
    tcp.write_all(header).await.unwrap();
    let mut connector =
        openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    connector.set_ca_file(&bed.ca_path).unwrap();
    let ssl = connector
        .build()
        .configure()
        .unwrap()
        .into_ssl(PUBLIC_NAME)
        .unwrap();
    let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    std::pin::Pin::new(&mut tls)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_reads_the_header_before_the_handshake() {
    let bed = start().await;
    for post in [false, true] {
        let path = format!("/tls/{post}");
        let header = v2(1, 0x11, &tcp4([192, 0, 2, 40]), &vpce_tlv());
        let answer = exchange_tls(&bed, &header, &request(&path, post))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let r = record(&bed, &path).await;
        assert_eq!(r["client"], "192.0.2.40", "{r}");
        assert_eq!(r["vpce"], VPCE, "{r}");
        let xff = forwarded_for(&bed, &path);
        assert!(xff.ends_with("192.0.2.40"), "{xff}");
    }
    // A trusted peer without the header: refused before any handshake.
    let before = result(&proxy_results(&bed).await, "missing");
    assert!(exchange_tls(&bed, b"", &request("/tls/none", false))
        .await
        .is_err());
    assert_eq!(result(&proxy_results(&bed).await, "missing") - before, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_header_inside_the_stream_is_the_clients_bytes() {
    let bed = start().await;
    let first = v2(1, 0x11, &tcp4([192, 0, 2, 20]), &[]);
    let second = b"PROXY TCP4 6.6.6.6 10.0.0.5 1 2\r\n".to_vec();
    let get =
        format!("GET /after-second HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nConnection: close\r\n\r\n");
    let answer = exchange(
        "127.0.0.1",
        bed.proxy.listen,
        &[&first, &second, get.as_bytes()],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(bed.origin.requests("/after-second").is_empty());
    // The refusal's record names the client of the first header.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(&bed.access_log).unwrap_or_default();
        assert!(!log.contains("6.6.6.6"), "{log}");
        if log.contains("\"client\":\"192.0.2.20\"") && log.contains("\"status\":400") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_missing_and_bad_headers_are_refused_counted_and_the_proxy_keeps_serving() {
    let bed = start().await;
    let listen = bed.proxy.listen;
    let get = request("/refused", false);
    let good = v2(1, 0x11, &tcp4([192, 0, 2, 30]), &[]);
    let mut bad_version = good.clone();
    bad_version[12] = 0x31;
    let mut wrong_length = good.clone();
    wrong_length[15] = 4; // shorter than TCP4's 12 address bytes
    let cases: Vec<(&str, &str, SocketAddr, Vec<u8>)> = vec![
        ("untrusted", "127.0.0.2", listen, good.clone()),
        ("missing", "127.0.0.1", listen, Vec::new()),
        ("bad", "127.0.0.1", listen, bad_version),
        ("bad", "127.0.0.1", listen, wrong_length),
        (
            "bad",
            "127.0.0.1",
            listen,
            v2(1, 0x51, &tcp4([192, 0, 2, 31]), &[]),
        ),
        (
            "bad",
            "127.0.0.1",
            listen,
            v2(1, 0x11, &tcp4([192, 0, 2, 32]), &[4, 0, 40, 1, 2]),
        ),
        (
            "bad",
            "127.0.0.1",
            listen,
            v2(1, 0x11, &tcp4([192, 0, 2, 33]), &[0xEA, 0, 3, 1, b'\n', 0]),
        ),
        // A signature with a typo is no header: missing, from a trusted peer.
        (
            "missing",
            "127.0.0.1",
            listen,
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c".to_vec(),
        ),
        // v2 on the v1 listener, and a v1 header that is not one.
        ("bad", "127.0.0.1", bed.v1, good.clone()),
        (
            "bad",
            "127.0.0.1",
            bed.v1,
            b"PROXY TCP4 300.1.1.1 10.0.0.5 1 2\r\n".to_vec(),
        ),
        (
            "untrusted",
            "127.0.0.2",
            bed.v1,
            b"PROXY TCP4 6.6.6.6 10.0.0.5 1 2\r\n".to_vec(),
        ),
    ];
    let before = proxy_results(&bed).await;
    for (want, from, to, header) in &cases {
        let answer = exchange(from, *to, &[header, &get]).await;
        assert_eq!(
            answer, "",
            "{want} from {from} to {to}: {header:?} got an answer"
        );
    }
    assert!(bed.origin.requests("/refused").is_empty());
    let after = proxy_results(&bed).await;
    for (label, n) in [("untrusted", 2.0), ("missing", 2.0), ("bad", 7.0)] {
        assert_eq!(
            result(&after, label) - result(&before, label),
            n,
            "{label}: {after}"
        );
    }
    assert!(
        bed.proxy.log().contains("PROXY protocol: connection from"),
        "{}",
        bed.proxy.log()
    );

    // An untrusted peer without a header is an ordinary direct client.
    let answer = exchange("127.0.0.2", listen, &[&request("/direct", false)]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(record(&bed, "/direct").await["client"], "127.0.0.2");
    // And a proper header still works.
    let answer = exchange("127.0.0.1", listen, &[&good, &request("/still", false)]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sticky_choice_follows_the_headers_client() {
    let bed = start().await;
    let mut by_client = std::collections::HashMap::new();
    for i in 0..24u8 {
        for round in 0..3 {
            let path = format!("/sticky/{i}/{round}");
            let header = v2(1, 0x11, &tcp4([198, 51, 100, i]), &[]);
            let answer = exchange(
                "127.0.0.1",
                bed.proxy.listen,
                &[&header, &request(&path, false)],
            )
            .await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            let r = record(&bed, &path).await;
            by_client
                .entry(i)
                .or_insert_with(std::collections::HashSet::new)
                .insert(r["upstream"].as_str().unwrap().to_string());
        }
    }
    // Each client sticks to one upstream; with the TCP peer (127.0.0.1 for
    // all) as the key, every client would get the same one.
    assert!(by_client.values().all(|u| u.len() == 1), "{by_client:?}");
    let used: std::collections::HashSet<_> = by_client.values().flatten().collect();
    assert_eq!(used.len(), 2, "{by_client:?}");
}

//! A CDN edge that behaves like CloudFront where it matters for a migration:
//! one IP serves several distributions; the TLS certificate is chosen by SNI and
//! the distribution by the Host header; each distribution answers only for the
//! names it owns; a request whose SNI and Host belong to different
//! distributions gets `421 Misdirected Request`.
//!
//! It serves `cutover demo` and is the test bed of `tests/`. Paths:
//! - `/ruok`: the distribution's marker (`ok-old-cdn`, `ok-new-cdn`);
//! - `/bytes/N`: N bytes of a fixed pattern (byte i = i mod 251), streamed;
//! - `/echo`: the request body streamed back;
//! - `/upload`: reads the request body as it streams in and answers
//!   `received=N pattern=ok` when every byte matches the `/bytes` pattern;
//! - `/stall`: never answers;
//! - `/slow/MS`: answers the marker after MS milliseconds;
//! - `/status/N`: an empty response with status N;
//! - anything else: a line naming the distribution, Host and SNI.
//!
//! Every response carries `x-edge-distribution`, `x-edge-host`, `x-edge-sni`,
//! and CloudFront's own fields: `X-Cache` (`Miss from cloudfront` the first
//! time a distribution serves a path, `Hit from cloudfront` after, `Error
//! from cloudfront` for an error status), `Via: 1.1 ….cloudfront.net
//! (CloudFront)`, `X-Amz-Cf-Pop` (one per listening address) and a fresh
//! `X-Amz-Cf-Id`. What the edge refuses itself (403 for a Host no
//! distribution owns, 421 for SNI and Host of different distributions) also
//! says `Server: CloudFront`, with CloudFront's HTML body.
//!
//! Like a CloudFront name, an edge can listen on several addresses (one
//! port, [`Edge::start_on`]), and each address can be switched
//! ([`Edge::set_mode`]) to refuse connections, reset them right after the
//! TLS handshake, or blackhole them (accept, never answer). Idle keep-alive
//! connections are closed after [`IDLE`], as an edge closes idle upstream
//! connections of a proxy.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use openssl::pkey::PKey;
use openssl::ssl::{NameType, Ssl, SslAcceptor, SslAcceptorBuilder, SslContext, SslMethod};
use openssl::x509::X509;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_openssl::SslStream;

use super::pki::TestCa;

/// How long a keep-alive connection may sit idle before the edge closes it.
pub const IDLE: std::time::Duration = std::time::Duration::from_secs(4);

/// What one listening address of the edge does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressMode {
    Serve = 0,
    /// Nothing listens: a connect is refused.
    Refuse,
    /// The TLS handshake completes, then the connection is reset.
    Reset,
    /// The TCP connection is accepted and never answered (no TLS handshake).
    Blackhole,
}

impl AddressMode {
    fn from_u8(v: u8) -> AddressMode {
        match v {
            1 => AddressMode::Refuse,
            2 => AddressMode::Reset,
            3 => AddressMode::Blackhole,
            _ => AddressMode::Serve,
        }
    }
}

/// One listening address.
struct Listening {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// The accept loop; `None` while the address refuses.
    task: Mutex<Option<JoinHandle<()>>>,
}

/// One distribution: its own domain (`d-new.cloudfront.test`), the alternate
/// names it owns, and the marker its `/ruok` answers.
#[derive(Debug, Clone)]
pub struct Distribution {
    pub id: String,
    pub domain: String,
    pub aliases: Vec<String>,
    pub marker: String,
}

impl Distribution {
    pub fn new(id: &str, domain: &str, aliases: &[&str], marker: &str) -> Self {
        Self {
            id: id.into(),
            domain: domain.into(),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
            marker: marker.into(),
        }
    }

    fn owns(&self, name: &str) -> bool {
        self.domain == name || self.aliases.iter().any(|a| a == name)
    }
}

/// One request the edge answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub sni: Option<String>,
    pub host: Option<String>,
    /// The distribution that served it (`None` when refused).
    pub distribution: Option<String>,
    pub path: String,
    pub status: u16,
    pub x_forwarded_for: Option<String>,
    pub x_forwarded_proto: Option<String>,
    pub x_forwarded_host: Option<String>,
    pub x_migration: Option<String>,
    pub cookie: Option<String>,
}

/// What `/ruok` answers for one distribution; tests change it to play a
/// distribution that starts serving the wrong content.
#[derive(Debug, Clone)]
struct Canary {
    body: String,
    status: u16,
}

struct State {
    dists: Vec<Distribution>,
    canaries: Mutex<Vec<Canary>>,
    seen: Mutex<Vec<Seen>>,
    tls_connections: AtomicU64,
    /// Requests received, counted on arrival (`seen` records them when answered).
    arrived: AtomicU64,
    /// (distribution, path) pairs served once: the next answer is a "Hit".
    cached: Mutex<HashSet<(usize, String)>>,
    acceptor: SslContext,
    /// Per distribution: every N-th request it serves is answered 503 by
    /// its origin (0: never); and its requests so far.
    fail_every: Vec<AtomicU64>,
    served: Vec<AtomicU64>,
}

pub struct Edge {
    listening: Vec<Listening>,
    state: Arc<State>,
}

impl Edge {
    /// Bind `bind` (port 0 for any) and serve until [`Edge::stop`] or drop.
    pub async fn start(
        bind: SocketAddr,
        ca: &TestCa,
        dists: Vec<Distribution>,
    ) -> anyhow::Result<Edge> {
        Self::start_on(&[bind], ca, dists).await
    }

    /// Listen on every address of `binds` with one port (the first one's,
    /// or a free one when it is 0), as the addresses of one CloudFront name.
    pub async fn start_on(
        binds: &[SocketAddr],
        ca: &TestCa,
        dists: Vec<Distribution>,
    ) -> anyhow::Result<Edge> {
        anyhow::ensure!(!binds.is_empty(), "an edge needs an address");
        let acceptor = build_acceptor(ca, &dists)?;
        let state = Arc::new(State {
            canaries: Mutex::new(
                dists
                    .iter()
                    .map(|d| Canary {
                        body: d.marker.clone(),
                        status: 200,
                    })
                    .collect(),
            ),
            seen: Mutex::default(),
            tls_connections: AtomicU64::new(0),
            arrived: AtomicU64::new(0),
            cached: Mutex::default(),
            acceptor,
            fail_every: dists.iter().map(|_| AtomicU64::new(0)).collect(),
            served: dists.iter().map(|_| AtomicU64::new(0)).collect(),
            dists,
        });
        let first = TcpListener::bind(binds[0]).await?;
        let port = first.local_addr()?.port();
        let mut listeners = vec![first];
        for b in &binds[1..] {
            listeners.push(TcpListener::bind(SocketAddr::new(b.ip(), port)).await?);
        }
        let mut listening = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let addr = listener.local_addr()?;
            let mode = Arc::new(AtomicU8::new(AddressMode::Serve as u8));
            let task = accept_loop(listener, state.clone(), mode.clone(), pop(i));
            listening.push(Listening {
                addr,
                mode,
                task: Mutex::new(Some(task)),
            });
        }
        Ok(Edge { listening, state })
    }

    /// The addresses it listens on (one port).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.listening.iter().map(|l| l.addr).collect()
    }

    /// Switch what the address `addr` (of [`Edge::addrs`]) does with new
    /// connections. Refusing closes its listening socket; leaving that mode
    /// binds it again. In any mode but `Serve`, an open connection of the
    /// address is closed when its next request arrives, unanswered (as a
    /// dying edge does; deterministic for a test, unlike closing it now,
    /// which races with the proxy's check of an idle connection).
    pub async fn set_mode(&self, addr: SocketAddr, mode: AddressMode) -> anyhow::Result<()> {
        let (i, l) = self
            .listening
            .iter()
            .enumerate()
            .find(|(_, l)| l.addr == addr)
            .ok_or_else(|| anyhow::anyhow!("the edge does not listen on {addr}"))?;
        l.mode.store(mode as u8, Ordering::Relaxed);
        let running = l.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        match (mode, running) {
            (AddressMode::Refuse, Some(task)) => {
                task.abort();
                let _ = task.await;
            }
            (AddressMode::Refuse, None) => {}
            (_, Some(task)) => {
                *l.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
            }
            (_, None) => {
                let listener = TcpListener::bind(addr).await?;
                let task = accept_loop(listener, self.state.clone(), l.mode.clone(), pop(i));
                *l.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
            }
        }
        Ok(())
    }

    /// Its first address.
    pub fn addr(&self) -> SocketAddr {
        self.listening[0].addr
    }

    /// Every request answered so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests received so far, including those still being answered.
    pub fn arrived(&self) -> u64 {
        self.state.arrived.load(Ordering::Relaxed)
    }

    /// TLS handshakes completed: with keep-alive this stays far below the request count.
    pub fn tls_connections(&self) -> u64 {
        self.state.tls_connections.load(Ordering::Relaxed)
    }

    /// Make distribution `id` answer `/ruok` with `body` and `status`.
    pub fn set_canary(&self, id: &str, body: &str, status: u16) {
        if let Some(i) = self.state.dists.iter().position(|d| d.id == id) {
            self.state
                .canaries
                .lock()
                .unwrap_or_else(|e| e.into_inner())[i] = Canary {
                body: body.into(),
                status,
            };
        }
    }

    /// Make distribution `id`'s origin answer every `n`-th request with 503
    /// (`n` = 20: 5% of its answers); 0 stops it.
    pub fn fail_every(&self, id: &str, n: u64) {
        if let Some(i) = self.state.dists.iter().position(|d| d.id == id) {
            self.state.fail_every[i].store(n, Ordering::Relaxed);
        }
    }

    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        for l in &self.listening {
            if let Some(task) = l.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
        }
    }
}

/// The `X-Amz-Cf-Pop` of the edge's `i`-th address.
fn pop(i: usize) -> Arc<str> {
    format!("TST5{i}-C1").into()
}

/// Accept on `listener` and treat each connection as `mode` says.
fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    mode: Arc<AtomicU8>,
    pop: Arc<str>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let state = state.clone();
            let pop = pop.clone();
            let live_mode = mode.clone();
            let mode = AddressMode::from_u8(mode.load(Ordering::Relaxed));
            tokio::spawn(async move {
                if mode == AddressMode::Blackhole {
                    // Read and drop whatever comes, never answer, until the
                    // peer gives up.
                    let mut tcp = tcp;
                    let mut sink = [0u8; 1024];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                    return;
                }
                let Ok(ssl) = Ssl::new(&state.acceptor) else {
                    return;
                };
                let Ok(mut tls) = SslStream::new(ssl, tcp) else {
                    return;
                };
                if Pin::new(&mut tls).accept().await.is_err() {
                    return;
                }
                if mode == AddressMode::Reset {
                    // A zero linger makes the close a reset; it never blocks
                    // (the deprecation is about a non-zero linger).
                    #[allow(deprecated)]
                    let _ = tls.get_ref().set_linger(Some(std::time::Duration::ZERO));
                    return;
                }
                state.tls_connections.fetch_add(1, Ordering::Relaxed);
                let sni = tls
                    .ssl()
                    .servername(NameType::HOST_NAME)
                    .map(|s| s.to_ascii_lowercase());
                let service = service_fn(move |req| {
                    let state = state.clone();
                    let sni = sni.clone();
                    let pop = pop.clone();
                    let dead = live_mode.load(Ordering::Relaxed) != AddressMode::Serve as u8;
                    async move {
                        if dead {
                            // hyper closes the connection without an answer.
                            return Err(std::io::Error::other("edge address switched off"));
                        }
                        Ok(handle(&state, sni, &pop, req).await)
                    }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(IDLE)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    })
}

/// An acceptor presenting a fresh certificate for `names`.
fn acceptor_for(ca: &TestCa, names: &[&str]) -> anyhow::Result<SslAcceptorBuilder> {
    let issued = ca.issue(names)?;
    let cert = X509::from_pem(issued.cert_pem.as_bytes())?;
    let key = PKey::private_key_from_pem(issued.key_pem.as_bytes())?;
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
    b.set_certificate(&cert)?;
    b.set_private_key(&key)?;
    Ok(b)
}

fn build_acceptor(ca: &TestCa, dists: &[Distribution]) -> anyhow::Result<SslContext> {
    let mut per_dist = Vec::new();
    for d in dists {
        let mut names: Vec<&str> = vec![d.domain.as_str()];
        names.extend(d.aliases.iter().map(String::as_str));
        per_dist.push((d.clone(), acceptor_for(ca, &names)?.build().into_context()));
    }
    // Like CloudFront's default `*.cloudfront.net` certificate: what a client
    // gets with no SNI or an SNI no distribution owns.
    let default_names: Vec<String> = dists
        .iter()
        .filter_map(|d| {
            d.domain
                .split_once('.')
                .map(|(_, rest)| format!("*.{rest}"))
        })
        .collect();
    let default_refs: Vec<&str> = default_names.iter().map(String::as_str).collect();
    let mut b = acceptor_for(
        ca,
        if default_refs.is_empty() {
            &["edge.invalid"]
        } else {
            &default_refs
        },
    )?;
    b.set_servername_callback(move |ssl, _alert| {
        let name = ssl
            .servername(NameType::HOST_NAME)
            .map(str::to_ascii_lowercase);
        if let Some((_, ctx)) = name.and_then(|n| per_dist.iter().find(|(d, _)| d.owns(&n))) {
            ssl.set_ssl_context(ctx)
                .map_err(|_| openssl::ssl::SniError::ALERT_FATAL)?;
        }
        Ok(())
    });
    Ok(b.build().into_context())
}

type EdgeBody = BoxBody<Bytes, hyper::Error>;

fn full(text: impl Into<Bytes>) -> EdgeBody {
    http_body_util::Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn host_of(req: &Request<Incoming>) -> Option<String> {
    let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
    let h = h.rsplit_once(':').map_or(h, |(n, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            n
        } else {
            h
        }
    });
    Some(h.trim_end_matches('.').to_ascii_lowercase())
}

/// CloudFront's page for an answer the edge makes itself.
fn edge_page(status: u16, why: &str) -> EdgeBody {
    full(format!(
        "<!DOCTYPE HTML PUBLIC \"-//W3C//DTD HTML 4.01 Transitional//EN\">\n\
         <HTML><HEAD><TITLE>ERROR: The request could not be satisfied</TITLE></HEAD><BODY>\n\
         <H1>{status} ERROR</H1><H2>The request could not be satisfied.</H2>\n<HR>{why}\n\
         </BODY></HTML>\n"
    ))
}

/// A fresh `X-Amz-Cf-Id`: 56 characters of CloudFront's alphabet.
fn cf_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut id: String = (0..54)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect();
    id.push_str("==");
    id
}

async fn handle(
    state: &State,
    sni: Option<String>,
    pop: &str,
    req: Request<Incoming>,
) -> Response<EdgeBody> {
    state.arrived.fetch_add(1, Ordering::Relaxed);
    let host = host_of(&req);
    let path = req.uri().path().to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let mut seen = Seen {
        sni: sni.clone(),
        host: host.clone(),
        distribution: None,
        path: path.clone(),
        status: 0,
        x_forwarded_for: header("x-forwarded-for"),
        x_forwarded_proto: header("x-forwarded-proto"),
        x_forwarded_host: header("x-forwarded-host"),
        x_migration: header("x-migration"),
        cookie: header("cookie"),
    };
    let by_host = host
        .as_deref()
        .and_then(|h| state.dists.iter().position(|d| d.owns(h)));
    let by_sni = sni
        .as_deref()
        .and_then(|s| state.dists.iter().position(|d| d.owns(s)));

    let mut cache = "Error from cloudfront";
    let mut edge_made = true;
    let (status, body): (u16, EdgeBody) = match (by_host, by_sni) {
        (None, _) => (
            403,
            edge_page(
                403,
                "Bad request. We can't connect to the server for this app or website at this time. \
                 (edge: no distribution owns this Host)",
            ),
        ),
        (Some(h), Some(s)) if h != s => (
            421,
            edge_page(
                421,
                &format!(
                    "Misdirected Request: SNI {} belongs to {}, Host {} to {}",
                    sni.as_deref().unwrap_or(""),
                    state.dists[s].id,
                    host.as_deref().unwrap_or(""),
                    state.dists[h].id
                ),
            ),
        ),
        (Some(h), _) => {
            seen.distribution = Some(state.dists[h].id.clone());
            edge_made = false;
            let key = (h, path.clone());
            let nth = state.served[h].fetch_add(1, Ordering::Relaxed) + 1;
            let every = state.fail_every[h].load(Ordering::Relaxed);
            let (status, body) = if every > 0 && nth.is_multiple_of(every) {
                (503, full("origin failed (the test asked for it)\n"))
            } else {
                serve(state, h, &path, req, &sni, &host).await
            };
            if status < 400 {
                let mut cached = state.cached.lock().unwrap_or_else(|e| e.into_inner());
                cache = if cached.insert(key) {
                    "Miss from cloudfront"
                } else {
                    "Hit from cloudfront"
                };
            }
            (status, body)
        }
    };
    seen.status = status;
    let dist = seen.distribution.clone().unwrap_or_default();
    state
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(seen);
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-edge-distribution", dist),
        ("x-edge-host", host.unwrap_or_default()),
        ("x-edge-sni", sni.unwrap_or_default()),
        ("x-cache", cache.to_string()),
        (
            "via",
            "1.1 5b2f3c1e0d.cloudfront.test (CloudFront)".to_string(),
        ),
        ("x-amz-cf-pop", pop.to_string()),
        ("x-amz-cf-id", cf_id()),
    ] {
        if let Ok(v) = value.parse() {
            h.insert(name, v);
        }
    }
    if edge_made {
        h.insert(
            http::header::SERVER,
            http::HeaderValue::from_static("CloudFront"),
        );
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/html"),
        );
    }
    resp
}

async fn serve(
    state: &State,
    dist: usize,
    path: &str,
    req: Request<Incoming>,
    sni: &Option<String>,
    host: &Option<String>,
) -> (u16, EdgeBody) {
    if path == "/ruok" {
        let canary = state.canaries.lock().unwrap_or_else(|e| e.into_inner())[dist].clone();
        return (canary.status, full(format!("{}\n", canary.body)));
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        return (200, PatternBody { offset: 0, len: n }.boxed());
    }
    if path == "/echo" {
        return (200, req.into_body().boxed());
    }
    if path == "/upload" {
        return match check_upload(req.into_body()).await {
            Ok((n, intact)) => (
                200,
                full(format!(
                    "received={n} pattern={}\n",
                    if intact { "ok" } else { "bad" }
                )),
            ),
            Err(e) => (400, full(format!("upload failed: {e}\n"))),
        };
    }
    if path == "/stall" {
        std::future::pending::<()>().await;
    }
    if let Some(ms) = path
        .strip_prefix("/slow/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return (200, full(format!("{}\n", state.dists[dist].marker)));
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|n| n.parse::<u16>().ok())
    {
        if StatusCode::from_u16(code).is_ok() {
            return (code, full(""));
        }
    }
    (
        200,
        full(format!(
            "distribution={} host={} sni={} path={path}\n",
            state.dists[dist].id,
            host.as_deref().unwrap_or(""),
            sni.as_deref().unwrap_or("")
        )),
    )
}

/// Read a request body as it streams in, checking it against the pattern.
async fn check_upload(mut body: Incoming) -> Result<(u64, bool), hyper::Error> {
    let (mut n, mut intact) = (0u64, true);
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            intact &= data
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern_byte(n + i as u64));
            n += data.len() as u64;
        }
    }
    Ok((n, intact))
}

/// Byte `i` of a `/bytes/N` body; tests check every byte that comes through.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

struct PatternBody {
    offset: u64,
    len: u64,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        const CHUNK: u64 = 64 * 1024;
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let n = CHUNK.min(self.len - self.offset);
        let start = self.offset;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        self.offset += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.len - self.offset)
    }
}

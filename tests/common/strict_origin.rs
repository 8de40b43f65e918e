//! A recording TLS origin with a strict RFC 9112 reader, and a raw-bytes
//! client: the two ends of the framing battery and the carrier parity test.
//!
//! The origin splits what cutover sends it with
//! [`cutover::rehearsal::strict`]: every request it reads is recorded whole
//! (head and decoded body) with the connection it came on; anything a strict
//! server would refuse is recorded as a violation and the connection closed.
//! It answers by script (raw bytes, pauses, signals), or by default with a
//! 200 whose body names the request (`GET /x`), so a client can tell which
//! request each response belongs to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover::rehearsal::pki::TestCa;
use cutover::rehearsal::strict::{self, Message, Read};
use openssl::ssl::Ssl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::tls_acceptor;

pub const ORIGIN_NAME: &str = "origin.example.test";

/// One step of a scripted answer.
pub enum Step {
    /// Write these bytes (one TLS record).
    Send(Vec<u8>),
    /// Write these bytes, wait until the peer's kernel has acknowledged
    /// them (they are in cutover's socket buffer), then fire the named signal.
    SendThenSignal(Vec<u8>, String),
    /// Wait before the next step.
    Pause(Duration),
    /// Close the connection (TLS close_notify, then TCP FIN).
    Close,
    /// Never answer; keep the connection open.
    Hang,
}

/// The answer for a request: `None` = the default echo answer.
pub type Script = Arc<dyn Fn(&Message) -> Option<Vec<Step>> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub conn: u64,
    pub msg: Message,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub conn: u64,
    pub why: String,
    pub bytes: Vec<u8>,
}

#[derive(Default)]
pub struct OriginLog {
    pub requests: Vec<Recorded>,
    pub violations: Vec<Violation>,
}

pub struct StrictOrigin {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<OriginLog>>,
    pub connections: Arc<AtomicU64>,
    signals: Arc<Signals>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StrictOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct Signals(Mutex<HashMap<String, Arc<Notify>>>);

impl Signals {
    fn get(&self, name: &str) -> Arc<Notify> {
        self.0
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

/// The default answer: 200, and a body that names the request.
pub fn echo_answer(msg: &Message) -> Vec<u8> {
    let body = format!("{} {}", msg.method(), msg.target());
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl StrictOrigin {
    /// The origin over TLS, with a certificate for [`ORIGIN_NAME`] from `ca`.
    pub async fn start(ca: &TestCa, script: Script) -> StrictOrigin {
        Self::start_with(Some(tls_acceptor(ca, ORIGIN_NAME)), script).await
    }

    /// The same over plain HTTP (an upstream with `tls: false`).
    pub async fn start_plain(script: Script) -> StrictOrigin {
        Self::start_with(None, script).await
    }

    async fn start_with(
        acceptor: Option<openssl::ssl::SslAcceptor>,
        script: Script,
    ) -> StrictOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(OriginLog::default()));
        let connections = Arc::new(AtomicU64::new(0));
        let signals = Arc::new(Signals::default());
        let (l, c, sig) = (log.clone(), connections.clone(), signals.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let conn = c.fetch_add(1, Ordering::SeqCst) + 1;
                let (log, signals, script) = (l.clone(), sig.clone(), script.clone());
                let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
                let Some(acceptor) = &acceptor else {
                    tokio::spawn(serve(tcp, fd, conn, log, signals, script));
                    continue;
                };
                let ssl = Ssl::new(acceptor.context()).unwrap();
                tokio::spawn(async move {
                    let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                    if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                        return;
                    }
                    serve(tls, fd, conn, log, signals, script).await;
                });
            }
        });
        StrictOrigin {
            addr,
            log,
            connections,
            signals,
            task,
        }
    }

    /// Wait (at most 10 s) for the named signal of a script.
    pub async fn signalled(&self, name: &str) {
        tokio::time::timeout(Duration::from_secs(10), self.signals.get(name).notified())
            .await
            .unwrap_or_else(|_| panic!("the origin never signalled {name:?}"));
    }

    /// Requests whose target starts with `prefix`, in arrival order.
    pub fn requests(&self, prefix: &str) -> Vec<Recorded> {
        self.log
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.msg.target().starts_with(prefix))
            .cloned()
            .collect()
    }

    pub fn violations(&self) -> Vec<Violation> {
        self.log.lock().unwrap().violations.clone()
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut tls: S,
    fd: std::os::fd::RawFd,
    conn: u64,
    log: Arc<Mutex<OriginLog>>,
    signals: Arc<Signals>,
    script: Script,
) {
    let mut buf = Vec::new();
    loop {
        let msg = loop {
            match strict::read_request(&buf) {
                Read::Complete(m) => break m,
                Read::Invalid(why) => {
                    log.lock().unwrap().violations.push(Violation {
                        conn,
                        why,
                        bytes: buf.clone(),
                    });
                    return;
                }
                Read::Partial => {}
            }
            let mut chunk = [0u8; 16 * 1024];
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..msg.len);
        log.lock().unwrap().requests.push(Recorded {
            conn,
            msg: msg.clone(),
        });
        let steps = script(&msg).unwrap_or_else(|| vec![Step::Send(echo_answer(&msg))]);
        for step in steps {
            match step {
                Step::Send(bytes) => {
                    if tls.write_all(&bytes).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                }
                Step::SendThenSignal(bytes, name) => {
                    if tls.write_all(&bytes).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                    acknowledged(fd).await;
                    signals.get(&name).notify_one();
                }
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::Close => {
                    let _ = tls.shutdown().await;
                    return;
                }
                Step::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
            }
        }
    }
}

/// Wait until everything written on socket `fd` has been acknowledged by the peer
/// (`SIOCOUTQ` is 0): the bytes are then in the peer's receive buffer, so a
/// test can order "the proxy has these bytes" before its next step.
pub async fn acknowledged(fd: std::os::fd::RawFd) {
    for _ in 0..1000 {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int into `queued`; `fd` is open.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
        if rc != 0 || queued == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the peer never acknowledged {fd}'s bytes");
}

/// What a [`RawClient`] talks over: TCP, or TLS over TCP.
pub trait ClientIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientIo for T {}

/// A client that writes raw bytes and reads responses with the strict reader.
pub struct RawClient {
    stream: Box<dyn ClientIo>,
    buf: Vec<u8>,
    eof: bool,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        Self::over(Box::new(tcp))
    }

    /// Over TLS, checking the listener's certificate for `name` against `ca`.
    pub async fn connect_tls(addr: SocketAddr, ca: &std::path::Path, name: &str) -> RawClient {
        Self::connect_tls_using(addr, &Self::tls_connector(ca), name).await
    }

    /// A connector trusting `ca`, to share between connections: building
    /// one reads the system's CA store, milliseconds of CPU that a test
    /// opening many connections on a tight schedule cannot spend on each.
    pub fn tls_connector(ca: &std::path::Path) -> openssl::ssl::SslConnector {
        let mut connector =
            openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
        connector.set_ca_file(ca).unwrap();
        connector.build()
    }

    pub async fn connect_tls_using(
        addr: SocketAddr,
        connector: &openssl::ssl::SslConnector,
        name: &str,
    ) -> RawClient {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let ssl = connector.configure().unwrap().into_ssl(name).unwrap();
        let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
        std::pin::Pin::new(&mut tls).connect().await.unwrap();
        Self::over(Box::new(tls))
    }

    fn over(stream: Box<dyn ClientIo>) -> RawClient {
        RawClient {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // A write can fail when the proxy already closed: that shows up as a
        // missing response, which is what the caller asserts on.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next response, strictly read (an interim 1xx is a response of its
    /// own); `Err` with the reason when it is malformed, the connection
    /// closed first, or nothing came within 10 s.
    pub async fn response(&mut self, head_request: bool) -> Result<Message, String> {
        self.response_within(head_request, Duration::from_secs(10))
            .await
    }

    /// [`RawClient::response`], waiting up to `wait`.
    pub async fn response_within(
        &mut self,
        head_request: bool,
        wait: Duration,
    ) -> Result<Message, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if !self.buf.is_empty() || self.eof {
                match strict::read_response(&self.buf, head_request, self.eof) {
                    Read::Complete(m) => {
                        self.buf.drain(..m.len);
                        return Ok(m);
                    }
                    Read::Invalid(why) => {
                        return Err(format!(
                            "malformed response ({why}): {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ))
                    }
                    Read::Partial if self.eof => {
                        return Err(if self.buf.is_empty() {
                            "connection closed".to_string()
                        } else {
                            format!(
                                "connection closed mid-response: {:?}",
                                String::from_utf8_lossy(&self.buf)
                            )
                        })
                    }
                    Read::Partial => {}
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(format!("no response within {wait:?}")),
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether the proxy closes the connection (within 10 s) without
    /// sending anything more.
    pub async fn closes(&mut self) -> Result<(), String> {
        self.closes_within(Duration::from_secs(10)).await
    }

    /// The same, waiting at most `wait`.
    pub async fn closes_within(&mut self, wait: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + wait;
        while !self.eof {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(format!("still open after {wait:?}")),
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "unexpected bytes before the close: {:?}",
                String::from_utf8_lossy(&self.buf)
            ))
        }
    }
}

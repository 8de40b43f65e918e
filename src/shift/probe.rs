//! A one-shot HTTP(S) GET where the caller controls every part the CloudFront
//! trap depends on: which address to connect to, which SNI to send, which Host
//! to send, and which CAs to trust. `cutover demo` uses it to show both paths;
//! health checks and `verify` ask the same questions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use openssl::ssl::{SslConnector, SslMethod};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct TlsTarget {
    pub sni: String,
    /// Trusted CA files.
    pub ca_files: Vec<PathBuf>,
    /// Also trust the system roots (the proxy does only when no `ca_file` is set).
    pub system_roots: bool,
    pub verify: bool,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub connect: SocketAddr,
    pub tls: Option<TlsTarget>,
    pub host: String,
    pub path: String,
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub remote: SocketAddr,
}

impl Reply {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

/// GET `target` with an overall deadline.
pub async fn get(target: &Target, timeout: Duration) -> anyhow::Result<Reply> {
    tokio::time::timeout(timeout, get_inner(target, &[], usize::MAX))
        .await
        .map_err(|_| anyhow!("no answer from {} within {timeout:?}", target.connect))?
}

/// A body longer than the caller's limit: reading stopped there.
#[derive(Debug)]
pub struct TooLarge {
    pub limit: usize,
    /// The length the response announced, if it did.
    pub announced: Option<u64>,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.announced {
            Some(n) => write!(f, "the body is {n} bytes, over the limit of {}", self.limit),
            None => write!(f, "the body passed the limit of {} bytes", self.limit),
        }
    }
}

impl std::error::Error for TooLarge {}

/// GET `target` with `extra` header fields, reading at most `max_body`
/// bytes of body (more is a [`TooLarge`] error); no deadline of its own.
pub async fn get_limited(
    target: &Target,
    extra: &[(http::HeaderName, http::HeaderValue)],
    max_body: usize,
) -> anyhow::Result<Reply> {
    get_inner(target, extra, max_body).await
}

async fn get_inner(
    target: &Target,
    extra: &[(http::HeaderName, http::HeaderValue)],
    max_body: usize,
) -> anyhow::Result<Reply> {
    let tcp = TcpStream::connect(target.connect)
        .await
        .with_context(|| format!("connecting to {}", target.connect))?;
    let remote = tcp.peer_addr()?;
    let mut req = Request::get(target.path.as_str())
        .header(http::header::HOST, target.host.as_str())
        .header(
            http::header::USER_AGENT,
            concat!("cutover/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())?;
    for (name, value) in extra {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    let resp = match &target.tls {
        None => send(TokioIo::new(tcp), req).await?,
        Some(tls) => {
            let mut b = SslConnector::builder(SslMethod::tls_client())?;
            if !tls.system_roots {
                b.set_cert_store(openssl::x509::store::X509StoreBuilder::new()?.build());
            }
            for ca in &tls.ca_files {
                b.set_ca_file(ca)
                    .with_context(|| format!("loading CA file {}", ca.display()))?;
            }
            let mut cfg = b.build().configure()?;
            if !tls.verify {
                cfg.set_verify(openssl::ssl::SslVerifyMode::NONE);
                cfg.set_verify_hostname(false);
            }
            let ssl = cfg.into_ssl(&tls.sni)?;
            let mut stream = tokio_openssl::SslStream::new(ssl, tcp)?;
            std::pin::Pin::new(&mut stream)
                .connect()
                .await
                .with_context(|| {
                    format!("TLS handshake with {} (SNI {})", target.connect, tls.sni)
                })?;
            send(TokioIo::new(stream), req).await?
        }
    };
    let (parts, body) = resp.into_parts();
    let announced = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max_body as u64) {
        return Err(TooLarge {
            limit: max_body,
            announced,
        }
        .into());
    }
    let body = match http_body_util::Limited::new(body, max_body).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(TooLarge {
                limit: max_body,
                announced,
            }
            .into())
        }
        Err(e) => return Err(anyhow!("reading the response body: {e}")),
    };
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
        remote,
    })
}

async fn send<IO>(
    io: TokioIo<IO>,
    req: Request<Empty<Bytes>>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}

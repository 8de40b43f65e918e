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
    tokio::time::timeout(timeout, get_inner(target))
        .await
        .map_err(|_| anyhow!("no answer from {} within {timeout:?}", target.connect))?
}

async fn get_inner(target: &Target) -> anyhow::Result<Reply> {
    let tcp = TcpStream::connect(target.connect)
        .await
        .with_context(|| format!("connecting to {}", target.connect))?;
    let remote = tcp.peer_addr()?;
    let req = Request::get(target.path.as_str())
        .header(http::header::HOST, target.host.as_str())
        .header(
            http::header::USER_AGENT,
            concat!("cutover/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())?;
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
    let body = body
        .collect()
        .await
        .context("reading the response body")?
        .to_bytes();
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

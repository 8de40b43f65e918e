//! One TLS library (the cargo feature picks it), measured on the work a
//! proxy like cutover does with it, in one thread over in-memory pipes (no
//! sockets, no scheduler: only the library's own cost):
//!
//! - per request: a TLS-in/TLS-out proxy is the server of the client's
//!   connection (reads the request record, writes the response) and the
//!   client of the upstream's (writes the request, reads the response). One
//!   exchange here is exactly that work once: a 250-byte request, then a
//!   response of 210 bytes (`/ruok`), 4,296 (`/obj4k`) or 65,736 (`/obj64k`);
//! - a full TLS 1.3 handshake and a resumed one (ECDSA P-256 certificate,
//!   X25519, AES-128-GCM, the chain and the host name verified by the
//!   client), per side;
//! - memory per established connection, per side (glibc's allocator
//!   statistics, which count the C libraries' allocations and Rust's).
//!
//! Every library is configured as cutover would use it: TLS 1.3 with
//! AES-128-GCM (the bench origin's suite) and X25519, the server side
//! releasing its record buffers when idle (Pingora's acceptor, nginx,
//! HAProxy), the client side keeping them (cutover's upstream connections).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

#[cfg(feature = "boring-lib")]
use boring as ossl;
#[cfg(feature = "openssl-lib")]
use openssl as ossl;

pub const NAME: &str = "origin.test";

/// One direction of an in-memory connection.
#[derive(Clone, Default)]
pub struct Pipe {
    rx: Rc<RefCell<VecDeque<u8>>>,
    tx: Rc<RefCell<VecDeque<u8>>>,
}

impl Pipe {
    pub fn pair() -> (Pipe, Pipe) {
        let a = Rc::new(RefCell::new(VecDeque::new()));
        let b = Rc::new(RefCell::new(VecDeque::new()));
        (
            Pipe {
                rx: a.clone(),
                tx: b.clone(),
            },
            Pipe { rx: b, tx: a },
        )
    }
}

/// While measuring memory, an emptied pipe gives its buffer back, so only
/// the libraries' own allocations remain.
static SHRINK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = self.rx.borrow_mut();
        if rx.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rx.read(buf)?;
        if rx.is_empty() && SHRINK.load(std::sync::atomic::Ordering::Relaxed) {
            *rx = VecDeque::new();
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.borrow_mut().extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One end of a TLS connection.
pub trait Conn {
    /// One handshake step; `true` once the handshake is complete.
    fn handshake(&mut self) -> bool;
    /// Write `data` as application data (all of it).
    fn send(&mut self, data: &[u8]);
    /// Read what application data is there; 0 when none yet.
    fn recv(&mut self, buf: &mut [u8]) -> usize;
    fn resumed(&self) -> bool;
}

/// A library, configured: makes clients and servers.
pub trait Library {
    type Client: Conn;
    type Server: Conn;
    fn name(&self) -> String;
    fn client(&self, pipe: Pipe, resume: bool) -> Self::Client;
    fn server(&self, pipe: Pipe) -> Self::Server;
    /// Remember the client's session for a resumed handshake later.
    fn keep_session(&self, client: &Self::Client);
}

struct Certs {
    ca_der: Vec<u8>,
    ca_pem: String,
    leaf_der: Vec<u8>,
    leaf_pem: String,
    key_der: Vec<u8>,
    key_pem: String,
}

fn certs() -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "tls-libraries bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec![NAME.to_string()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, NAME);
    let leaf = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    Certs {
        ca_der: ca_cert.der().to_vec(),
        ca_pem: ca_cert.pem(),
        leaf_der: leaf.der().to_vec(),
        leaf_pem: leaf.pem(),
        key_der: leaf_key.serialize_der(),
        key_pem: leaf_key.serialize_pem(),
    }
}

#[cfg(any(feature = "openssl-lib", feature = "boring-lib"))]
mod openssl_family {
    use super::*;
    use ossl::pkey::PKey;
    use ossl::ssl::{
        ErrorCode, Ssl, SslAcceptor, SslContext, SslMethod, SslMode, SslSession, SslStream,
        SslVersion,
    };
    use ossl::x509::X509;

    pub struct Lib {
        server: SslContext,
        client: SslContext,
        session: RefCell<Option<SslSession>>,
    }

    pub struct End {
        stream: SslStream<Pipe>,
        server: bool,
    }

    impl Lib {
        pub fn new() -> Lib {
            let c = certs();
            let _ = (&c.ca_der, &c.leaf_der, &c.key_der);
            let mut s = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
            s.set_certificate(&X509::from_pem(c.leaf_pem.as_bytes()).unwrap())
                .unwrap();
            s.set_private_key(&PKey::private_key_from_pem(c.key_pem.as_bytes()).unwrap())
                .unwrap();
            s.set_min_proto_version(Some(SslVersion::TLS1_3)).unwrap();
            // (AWS-LC and BoringSSL have no TLS 1.3 suite setting: with
            // AES instructions they prefer AES-128-GCM themselves.)
            #[cfg(all(feature = "openssl-lib", not(feature = "aws-lc")))]
            s.set_ciphersuites("TLS_AES_128_GCM_SHA256").unwrap();
            #[cfg(feature = "openssl-lib")]
            s.set_groups_list("X25519").unwrap();
            #[cfg(feature = "boring-lib")]
            s.set_curves_list("X25519").unwrap();
            s.set_mode(SslMode::RELEASE_BUFFERS);
            // A plain context rather than SslConnector's, which releases
            // record buffers: cutover keeps its upstream connections'.
            let mut k = SslContext::builder(SslMethod::tls()).unwrap();
            k.set_verify(ossl::ssl::SslVerifyMode::PEER);
            k.cert_store_mut()
                .add_cert(X509::from_pem(c.ca_pem.as_bytes()).unwrap())
                .unwrap();
            k.set_min_proto_version(Some(SslVersion::TLS1_3)).unwrap();
            #[cfg(all(feature = "openssl-lib", not(feature = "aws-lc")))]
            k.set_ciphersuites("TLS_AES_128_GCM_SHA256").unwrap();
            #[cfg(feature = "openssl-lib")]
            k.set_groups_list("X25519").unwrap();
            #[cfg(feature = "boring-lib")]
            k.set_curves_list("X25519").unwrap();
            k.set_session_cache_mode(ossl::ssl::SslSessionCacheMode::CLIENT);
            Lib {
                server: s.build().into_context(),
                client: k.build(),
                session: RefCell::new(None),
            }
        }
    }

    impl Conn for End {
        fn handshake(&mut self) -> bool {
            let r = if self.server {
                self.stream.accept()
            } else {
                self.stream.connect()
            };
            match r {
                Ok(()) => true,
                Err(e) if e.code() == ErrorCode::WANT_READ => false,
                Err(e) => panic!("handshake: {e}"),
            }
        }

        fn send(&mut self, data: &[u8]) {
            self.stream.write_all(data).unwrap();
        }

        fn recv(&mut self, buf: &mut [u8]) -> usize {
            match self.stream.ssl_read(buf) {
                Ok(n) => n,
                Err(e) if e.code() == ErrorCode::WANT_READ => 0,
                Err(e) => panic!("read: {e}"),
            }
        }

        fn resumed(&self) -> bool {
            self.stream.ssl().session_reused()
        }
    }

    impl Library for Lib {
        type Client = End;
        type Server = End;

        fn name(&self) -> String {
            #[cfg(feature = "boring-lib")]
            return "BoringSSL (boring 5)".to_string();
            #[cfg(feature = "openssl-lib")]
            return ossl::version::version().to_string();
        }

        fn client(&self, pipe: Pipe, resume: bool) -> End {
            let mut ssl = Ssl::new(&self.client).unwrap();
            ssl.set_hostname(NAME).unwrap();
            ssl.param_mut().set_host(NAME).unwrap();
            if resume {
                if let Some(s) = self.session.borrow().as_ref() {
                    // SAFETY: the session came from this connector's context.
                    unsafe { ssl.set_session(s).unwrap() };
                }
            }
            End {
                stream: SslStream::new(ssl, pipe).unwrap(),
                server: false,
            }
        }

        fn server(&self, pipe: Pipe) -> End {
            End {
                stream: SslStream::new(Ssl::new(&self.server).unwrap(), pipe).unwrap(),
                server: true,
            }
        }

        fn keep_session(&self, client: &End) {
            *self.session.borrow_mut() = client.stream.ssl().session().map(|s| s.to_owned());
        }
    }
}

#[cfg(any(feature = "rustls-ring", feature = "rustls-aws-lc"))]
mod rustls_lib {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
    use std::sync::Arc;

    pub struct Lib {
        server: Arc<ServerConfig>,
        resuming: Arc<ClientConfig>,
        fresh: Arc<ClientConfig>,
    }

    pub struct End<C> {
        conn: C,
        pipe: Pipe,
    }

    fn provider() -> rustls::crypto::CryptoProvider {
        #[cfg(feature = "rustls-aws-lc")]
        let p = rustls::crypto::aws_lc_rs::default_provider();
        #[cfg(all(feature = "rustls-ring", not(feature = "rustls-aws-lc")))]
        let p = rustls::crypto::ring::default_provider();
        let mut p = p;
        p.cipher_suites
            .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        p.kx_groups
            .retain(|g| g.name() == rustls::NamedGroup::X25519);
        p
    }

    impl Lib {
        pub fn new() -> Lib {
            let c = certs();
            let _ = (&c.ca_pem, &c.leaf_pem, &c.key_pem);
            let provider = Arc::new(provider());
            let server = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![CertificateDer::from(c.leaf_der.clone())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der.clone())),
                )
                .unwrap();
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from(c.ca_der.clone())).unwrap();
            let client = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let mut fresh = client.clone();
            fresh.resumption = rustls::client::Resumption::disabled();
            Lib {
                server: Arc::new(server),
                resuming: Arc::new(client),
                fresh: Arc::new(fresh),
            }
        }
    }

    macro_rules! conn_impl {
        ($t:ty) => {
            impl Conn for End<$t> {
                fn handshake(&mut self) -> bool {
                    self.pump();
                    !self.conn.is_handshaking()
                }

                fn send(&mut self, mut data: &[u8]) {
                    // rustls takes a bounded amount of plaintext at a time.
                    while !data.is_empty() {
                        let n = self.conn.writer().write(data).unwrap();
                        data = &data[n..];
                        while self.conn.wants_write() {
                            self.conn.write_tls(&mut self.pipe).unwrap();
                        }
                    }
                }

                fn recv(&mut self, buf: &mut [u8]) -> usize {
                    // Decrypt one read of records at a time: rustls bounds
                    // the plaintext it holds.
                    loop {
                        match self.conn.reader().read(buf) {
                            Ok(n) if n > 0 => return n,
                            Ok(_) => return 0,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => panic!("read: {e}"),
                        }
                        match self.conn.read_tls(&mut self.pipe) {
                            Ok(0) => return 0,
                            Ok(_) => {
                                self.conn.process_new_packets().unwrap();
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                while self.conn.wants_write() {
                                    self.conn.write_tls(&mut self.pipe).unwrap();
                                }
                                return 0;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }

                fn resumed(&self) -> bool {
                    self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
                }
            }

            impl End<$t> {
                fn pump(&mut self) {
                    loop {
                        match self.conn.read_tls(&mut self.pipe) {
                            Ok(0) => break,
                            Ok(_) => {
                                self.conn.process_new_packets().unwrap();
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    while self.conn.wants_write() {
                        self.conn.write_tls(&mut self.pipe).unwrap();
                    }
                }
            }
        };
    }
    conn_impl!(ClientConnection);
    conn_impl!(ServerConnection);

    impl Library for Lib {
        type Client = End<ClientConnection>;
        type Server = End<ServerConnection>;

        fn name(&self) -> String {
            #[cfg(feature = "rustls-aws-lc")]
            return "rustls 0.23 (aws-lc-rs)".to_string();
            #[cfg(all(feature = "rustls-ring", not(feature = "rustls-aws-lc")))]
            return "rustls 0.23 (ring)".to_string();
        }

        fn client(&self, pipe: Pipe, resume: bool) -> Self::Client {
            let config = if resume { &self.resuming } else { &self.fresh };
            let name = ServerName::try_from(NAME).unwrap();
            End {
                conn: ClientConnection::new(config.clone(), name).unwrap(),
                pipe,
            }
        }

        fn server(&self, pipe: Pipe) -> Self::Server {
            End {
                conn: ServerConnection::new(self.server.clone()).unwrap(),
                pipe,
            }
        }

        fn keep_session(&self, _client: &Self::Client) {
            // The resuming config's session store keeps it.
        }
    }
}

#[cfg(any(feature = "openssl-lib", feature = "boring-lib"))]
use openssl_family::Lib;
#[cfg(all(
    any(feature = "rustls-ring", feature = "rustls-aws-lc"),
    not(any(feature = "openssl-lib", feature = "boring-lib"))
))]
use rustls_lib::Lib;

/// A connected pair and what each side's handshake cost.
fn connect<L: Library>(lib: &L, resume: bool) -> (L::Client, L::Server, Duration, Duration) {
    let (a, b) = Pipe::pair();
    let t = Instant::now();
    let mut c = lib.client(a, resume);
    let mut client_time = t.elapsed();
    let t = Instant::now();
    let mut s = lib.server(b);
    let mut server_time = t.elapsed();
    let (mut c_done, mut s_done) = (false, false);
    for _ in 0..16 {
        if !c_done {
            let t = Instant::now();
            c_done = c.handshake();
            client_time += t.elapsed();
        }
        if !s_done {
            let t = Instant::now();
            s_done = s.handshake();
            server_time += t.elapsed();
        }
        if c_done && s_done {
            break;
        }
    }
    assert!(c_done && s_done, "handshake did not finish");
    (c, s, client_time, server_time)
}

/// One request and its response through the pair; what each side spent.
fn exchange<C: Conn, S: Conn>(
    c: &mut C,
    s: &mut S,
    req: &[u8],
    resp: &[u8],
    buf: &mut [u8],
) -> (Duration, Duration) {
    let t = Instant::now();
    c.send(req);
    let mut client = t.elapsed();
    // Each side reads until the library says "nothing more yet", as an
    // async stream does (tokio-openssl, tokio-rustls): the would-block path
    // is part of every request's cost.
    let t = Instant::now();
    let mut got = 0;
    while got < req.len() {
        let n = s.recv(buf);
        assert!(n > 0, "the request did not arrive");
        got += n;
    }
    assert_eq!(s.recv(buf), 0);
    s.send(resp);
    let server = t.elapsed();
    let t = Instant::now();
    let mut got = 0;
    while got < resp.len() {
        let n = c.recv(buf);
        assert!(n > 0, "the response did not arrive");
        got += n;
    }
    assert_eq!(c.recv(buf), 0);
    client += t.elapsed();
    (client, server)
}

/// Bytes in use by the allocator (heap and mmapped blocks).
fn heap_in_use() -> i64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as i64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let lib = Lib::new();
    let rounds = 5;
    let req = vec![b'q'; 250];
    let mut buf = vec![0u8; 1 << 17];
    println!("library: {}", lib.name());

    // Per request, both sides: the median of `rounds` runs of n exchanges.
    for (label, size, n) in [
        ("/ruok", 210, 200_000),
        ("/obj4k", 4_296, 100_000),
        ("/obj64k", 65_736, 10_000),
    ] {
        let resp = vec![b'r'; size];
        let (mut c, mut s, _, _) = connect(&lib, false);
        for _ in 0..1000 {
            exchange(&mut c, &mut s, &req, &resp, &mut buf);
        }
        let (mut total, mut client, mut server) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            for _ in 0..n {
                exchange(&mut c, &mut s, &req, &resp, &mut buf);
            }
            total.push(t.elapsed().as_nanos() as f64 / n as f64);
            let (mut cs, mut ss) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..n / 4 {
                let (cd, sd) = exchange(&mut c, &mut s, &req, &resp, &mut buf);
                cs += cd;
                ss += sd;
            }
            client.push(cs.as_nanos() as f64 / (n / 4) as f64);
            server.push(ss.as_nanos() as f64 / (n / 4) as f64);
        }
        println!(
            "exchange {label}: {:.0} ns per request (both sides); client side {:.0} ns, server side {:.0} ns",
            median(total),
            median(client),
            median(server)
        );
    }

    // Handshakes: full, then resumed.
    for resume in [false, true] {
        let n = 2_000;
        let (mut client, mut server) = (Vec::new(), Vec::new());
        let mut resumed = 0;
        for _ in 0..rounds {
            let (mut cs, mut ss) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..n {
                let (mut c, mut s, cd, sd) = connect(&lib, resume);
                // A request, so TLS 1.3's session ticket reaches the client.
                let (ce, se) = exchange(&mut c, &mut s, &req, &req, &mut buf);
                cs += cd + ce;
                ss += sd + se;
                resumed += usize::from(c.resumed());
                lib.keep_session(&c);
            }
            client.push(cs.as_nanos() as f64 / n as f64);
            server.push(ss.as_nanos() as f64 / n as f64);
        }
        let kind = if resume { "resumed" } else { "full" };
        if resume && resumed == 0 {
            println!("handshake resumed: the client's sessions were not resumed (not measured)");
            continue;
        }
        println!(
            "handshake {kind}: client side {:.0} ns, server side {:.0} ns (with one request each); {} of {} resumed",
            median(client),
            median(server),
            resumed,
            n * rounds
        );
    }

    // Memory per established, idle connection, per side.
    let n = 1_000;
    let resp = vec![b'r'; 4_296];
    SHRINK.store(true, std::sync::atomic::Ordering::Relaxed);
    let base = heap_in_use();
    let mut pairs = Vec::new();
    for _ in 0..n {
        let (mut c, mut s, _, _) = connect(&lib, false);
        exchange(&mut c, &mut s, &req, &resp, &mut buf);
        pairs.push((Some(c), s));
    }
    let both = heap_in_use() - base;
    for p in &mut pairs {
        p.0 = None;
    }
    let servers = heap_in_use() - base;
    drop(pairs);
    println!(
        "memory per idle connection after a 4 KiB exchange: client side {:.1} KiB, server side {:.1} KiB",
        (both - servers) as f64 / n as f64 / 1024.0,
        servers as f64 / n as f64 / 1024.0
    );
}

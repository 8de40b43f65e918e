//! Test bed process by the integration tests: a throwaway CA, the rehearsal
//! edge on loopback, and the real `cutover` binary started as a child process
//! on free ports and stopped by its PID.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cutover::rehearsal::demo::{distributions, NEW_DIST, NEW_NAME, OLD_DIST, PUBLIC_NAME};
use cutover::rehearsal::edge::Edge;
use cutover::rehearsal::pki::TestCa;
use cutover::shift::probe::{self, Reply, Target};

pub mod netns;
pub mod nginx;
pub mod relay;
pub mod strict_origin;

pub const BIN: &str = env!("CARGO_BIN_EXE_cutover");

/// The binary the tests run as the proxy: this build's, or the one
/// `CUTOVER_TEST_BIN` names (the README's fault figures run the `dist`
/// build through the same tests: a debug build's latencies say little).
pub fn proxy_bin() -> String {
    std::env::var("CUTOVER_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A method the fast path does not carry (an extension method, here the
/// cache-purge one CDNs and Varnish know): a request with it is handed,
/// with the rest of its connection, to the Pingora path, which forwards it
/// like any other. Tests that must run on the Pingora path send one.
pub const VIA_PINGORA: &str = "PURGE";

pub struct Bed {
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub ca_path: PathBuf,
    pub edge: Edge,
    pub hosts_file: PathBuf,
}

impl Bed {
    /// CA, edge on `127.0.0.1:0`, and a hosts file pointing both distribution names at it.
    pub async fn start() -> Bed {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(bind: SocketAddr) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("cutover test CA").unwrap();
        let ca_path = ca.write_cert(dir.path()).unwrap();
        let edge = Edge::start(bind, &ca, distributions()).await.unwrap();
        let hosts_file = dir.path().join("hosts");
        write_hosts(&hosts_file, edge.addr().ip());
        Bed {
            dir,
            ca,
            ca_path,
            edge,
            hosts_file,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The standard migration route: `cdn.example.test` → new distribution,
    /// Host and SNI rewritten, verified against the test CA. `extra` is
    /// appended to the upstream (e.g. `timeouts: { read: 1s }`).
    pub fn config(&self, upstream_extra: &str) -> String {
        config_yaml(
            &self.edge.addr(),
            &self.ca_path,
            self.dir.path(),
            &format!(
                "      - name: new-cloudfront\n        address: {NEW_DIST}:{port}\n        host_header: {NEW_NAME}\n        ca_file: {ca}\n        expect_body: ok-new-cdn\n{upstream_extra}",
                port = self.edge.addr().port(),
                ca = self.ca_path.display()
            ),
        )
    }
}

pub fn write_hosts(path: &Path, ip: std::net::IpAddr) {
    std::fs::write(path, format!("{ip} {OLD_DIST} {NEW_DIST}\n")).unwrap();
}

/// A config with one route for the public name and the given upstream list.
pub fn config_yaml(_edge: &SocketAddr, _ca: &Path, dir: &Path, upstreams: &str) -> String {
    format!(
        "phase: test\n\
         listeners:\n  - address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         server:\n  threads: 2\n  grace_period: 1s\n  graceful_shutdown_timeout: 5s\n  upgrade_sock: {dir}/upgrade.sock\n  pid_file: {dir}/cutover.pid\n\
         dns_refresh: 1s\n\
         routes:\n  - name: cdn\n    hosts: [{PUBLIC_NAME}]\n    upstreams:\n{upstreams}",
        dir = dir.display()
    )
}

/// A TLS server context with a certificate for `name` issued by `ca`.
pub fn tls_acceptor(ca: &TestCa, name: &str) -> openssl::ssl::SslAcceptor {
    use openssl::ssl::{SslAcceptor, SslMethod};
    let issued = ca.issue(&[name]).unwrap();
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    b.set_certificate(&openssl::x509::X509::from_pem(issued.cert_pem.as_bytes()).unwrap())
        .unwrap();
    b.set_private_key(
        &openssl::pkey::PKey::private_key_from_pem(issued.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    b.build()
}

/// A free loopback port (bound then released; the child binds it next).
/// Never one this test process was given before: the kernel may hand a
/// just-released port out again, and two listeners of one config on the
/// same port fail the config check.
pub fn free_port() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// Write `yaml` into `dir` as `cutover.yaml`, its first two `127.0.0.1:0`
/// (the listener, then admin) replaced by free ports: the path and both.
fn write_config(dir: &Path, yaml: &str) -> (PathBuf, SocketAddr, SocketAddr) {
    let listen = free_port();
    let admin = free_port();
    let yaml = yaml
        .replacen("127.0.0.1:0", &listen.to_string(), 1)
        .replacen("127.0.0.1:0", &admin.to_string(), 1);
    let config_path = dir.join("cutover.yaml");
    std::fs::write(&config_path, yaml).unwrap();
    (config_path, listen, admin)
}

/// A running `cutover run`.
pub struct Proxy {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Proxy {
    /// Write `yaml` (its `127.0.0.1:0` listener and admin replaced by free
    /// ports) and start the binary; returns once the listener accepts.
    pub fn start(dir: &Path, yaml: &str, hosts_file: Option<&Path>) -> Proxy {
        let (config_path, listen, admin) = write_config(dir, yaml);
        Self::start_with(dir, config_path, listen, admin, hosts_file, &[])
    }

    pub fn start_with(
        dir: &Path,
        config_path: PathBuf,
        listen: SocketAddr,
        admin: SocketAddr,
        hosts_file: Option<&Path>,
        extra_args: &[&str],
    ) -> Proxy {
        Self::spawn(
            Command::new(proxy_bin()),
            dir,
            config_path,
            listen,
            admin,
            hosts_file,
            extra_args,
        )
    }

    /// cutover running in the network namespace `netns` (`ip netns exec`
    /// execs it: the child's PID is cutover's) with `yaml` as its config,
    /// whose listener and admin addresses are `listen` and `admin`.
    pub fn start_in_netns(
        netns: &str,
        dir: &Path,
        yaml: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        hosts_file: Option<&Path>,
    ) -> Proxy {
        let config_path = dir.join("cutover.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, &proxy_bin()]);
        Self::spawn(cmd, dir, config_path, listen, admin, hosts_file, &[])
    }

    /// [`Proxy::start`] with the process's file-descriptor limit (soft and
    /// hard) set to `nofile` before it runs, as `ulimit -n` or the unit's
    /// `LimitNOFILE` would.
    pub fn start_with_nofile(dir: &Path, yaml: &str, nofile: u64) -> Proxy {
        use std::os::unix::process::CommandExt;
        let (config_path, listen, admin) = write_config(dir, yaml);
        let mut cmd = Command::new(proxy_bin());
        // SAFETY: setrlimit(2) only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Self::spawn(cmd, dir, config_path, listen, admin, None, &[])
    }

    /// [`Proxy::start`] with more environment variables (an `LD_PRELOAD`).
    pub fn start_with_env(dir: &Path, yaml: &str, env: &[(&str, &Path)]) -> Proxy {
        let (config_path, listen, admin) = write_config(dir, yaml);
        let mut cmd = Command::new(proxy_bin());
        cmd.envs(env.iter().copied());
        Self::spawn(cmd, dir, config_path, listen, admin, None, &[])
    }

    fn spawn(
        mut cmd: Command,
        dir: &Path,
        config_path: PathBuf,
        listen: SocketAddr,
        admin: SocketAddr,
        hosts_file: Option<&Path>,
        extra_args: &[&str],
    ) -> Proxy {
        let log_path = dir.join(format!("cutover-{}.log", listen.port()));
        let log = std::fs::File::create(&log_path).unwrap();
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("CUTOVER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(h) = hosts_file {
            cmd.env("CUTOVER_HOSTS_FILE", h);
        }
        let child = cmd.spawn().unwrap();
        let mut p = Proxy {
            child,
            listen,
            admin,
            config_path,
            log_path,
        };
        p.wait_listening();
        p
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("cutover exited early ({status}):\n{}", self.log());
            }
            // The admin listener is a separate Pingora service: wait for both.
            if TcpStream::connect(self.listen).is_ok() && TcpStream::connect(self.admin).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("cutover did not listen on {}:\n{}", self.listen, self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's PID.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// GET `path` through the proxy with `Host: host`.
    pub async fn get(&self, host: &str, path: &str) -> Reply {
        probe::get(
            &Target {
                connect: self.listen,
                tls: None,
                host: host.into(),
                path: path.into(),
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("GET {host}{path} through cutover: {e:#}\n{}", self.log()))
    }

    pub async fn metrics(&self) -> String {
        let r = self.admin_get("/metrics").await;
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    /// GET `path` from the admin listener.
    pub async fn admin_get(&self, path: &str) -> Reply {
        probe::get(
            &Target {
                connect: self.admin,
                tls: None,
                host: "localhost".into(),
                path: path.into(),
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap()
    }

    /// Scrape until `name{labels}` equals `want`, or return the last scrape
    /// after 5 s. Metrics are recorded when a request's logging stage runs,
    /// which can be just after the client has read the response.
    pub async fn metrics_when(&self, name: &str, labels: &[(&str, &str)], want: f64) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.metrics().await;
            if sample(&m, name, labels) == Some(want) || Instant::now() > deadline {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Virtual memory high-water mark of the process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send raw bytes on a fresh connection; return the status line and whole reply.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply).to_string();
    let status = text.lines().next().unwrap_or("").to_string();
    (status, text)
}

/// The value of one sample in Prometheus text output, e.g.
/// `sample(&text, "cutover_requests_total", &[("code","200")])`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The sum of every sample of `name` (all label sets).
pub fn sample_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Read lines from a child's stdout until one contains `needle` (or EOF).
pub fn read_until(reader: &mut BufReader<std::process::ChildStdout>, needle: &str) -> String {
    let mut all = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        all.push_str(&line);
        if line.contains(needle) {
            break;
        }
        line.clear();
    }
    all
}

/// One keep-alive HTTP/1.1 client connection (hyper), for many requests.
pub struct Client {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    /// The server answered `Connection: close`: the next request reconnects,
    /// as any HTTP/1.1 client does.
    server_closed: bool,
}

/// What a test needs from one response.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    /// The edge distribution that served it (`x-edge-distribution`).
    pub distribution: String,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Client {
            addr,
            sender,
            server_closed: false,
        })
    }

    pub async fn get(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Answer> {
        use http_body_util::BodyExt;
        if self.server_closed {
            *self = Client::connect(self.addr).await?;
        }
        self.sender.ready().await?;
        let mut req = http::Request::get(path).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .sender
            .send_request(req.body(http_body_util::Empty::new())?)
            .await?;
        let status = resp.status().as_u16();
        self.server_closed = resp
            .headers()
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let distribution = resp
            .headers()
            .get("x-edge-distribution")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&body).trim().to_string(),
            distribution,
        })
    }
}

/// The client address `i` of a test population: 10.x.y.z, all distinct.
pub fn client_addr(i: u32) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

/// Write a file atomically (temp + rename), as an operator's tooling should,
/// so a reload never reads half a file.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

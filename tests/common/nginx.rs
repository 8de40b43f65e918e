//! Debian's nginx as a real web server of the test's own: started on a port
//! the test chose, with one `server` block's body the test writes, in a
//! folder of the test's own; restarted on the same port with another body;
//! stopped by its PID.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
    /// `ssl` and the certificate lines, or empty for plain HTTP.
    tls: String,
    /// The `server` body it runs (or ran) with.
    body: String,
    /// Lines for the `http` block, before the `server` (an `upstream`).
    http_extra: String,
    /// The network namespace it runs in (`ip netns exec`), if not ours.
    netns: Option<String>,
}

fn binary() -> &'static str {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nginx (Debian package nginx-light) must be installed; .ci/run installs it")
}

impl Nginx {
    /// nginx on `addr` with `server_body` inside its one `server` block;
    /// TLS with `cert`/`key` (PEM files) when given. Returns once it
    /// accepts connections.
    pub fn start(
        dir: &Path,
        addr: SocketAddr,
        tls: Option<(&Path, &Path)>,
        server_body: &str,
    ) -> Nginx {
        Self::start_with_http(dir, addr, tls, "", server_body)
    }

    /// The same with `http_extra` in the `http` block (e.g. an `upstream`
    /// group for `proxy_pass`: nginx as the reference proxy).
    pub fn start_with_http(
        dir: &Path,
        addr: SocketAddr,
        tls: Option<(&Path, &Path)>,
        http_extra: &str,
        server_body: &str,
    ) -> Nginx {
        std::fs::create_dir_all(dir).unwrap();
        let tls = match tls {
            None => String::new(),
            Some((cert, key)) => format!(
                " ssl;\n    ssl_certificate {};\n    ssl_certificate_key {}",
                cert.display(),
                key.display()
            ),
        };
        let mut n = Nginx {
            child: None,
            addr,
            dir: dir.to_path_buf(),
            tls,
            body: String::new(),
            http_extra: http_extra.to_string(),
            netns: None,
        };
        n.restart(server_body);
        n
    }

    /// [`Nginx::start_with_http`] inside the network namespace `netns`
    /// (`addr` one of its addresses, reachable from the test's namespace).
    pub fn start_in_netns(
        netns: &str,
        dir: &Path,
        addr: SocketAddr,
        http_extra: &str,
        server_body: &str,
    ) -> Nginx {
        std::fs::create_dir_all(dir).unwrap();
        let mut n = Nginx {
            child: None,
            addr,
            dir: dir.to_path_buf(),
            tls: String::new(),
            body: String::new(),
            http_extra: http_extra.to_string(),
            netns: Some(netns.to_string()),
        };
        n.restart(server_body);
        n
    }

    /// Stop it (if running) and start it again on the same address with
    /// another `server` body: what an operator's `nginx -s reload` would
    /// serve, without a master process to orphan workers.
    pub fn restart(&mut self, server_body: &str) {
        self.stop();
        self.body = server_body.to_string();
        let d = self.dir.display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  {http_extra}
  server {{
    listen {addr}{tls};
    {server_body}
  }}
}}
",
            addr = self.addr,
            tls = self.tls,
            server_body = self.body,
            http_extra = self.http_extra,
        );
        let path = self.dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        // `ip netns exec` execs nginx: the child's PID is nginx's.
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, binary()]);
                c
            }
            None => Command::new(binary()),
        };
        let child = command
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "nginx exited ({status}):\n{}",
                    std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start it again, after [`Nginx::stop`], as it was.
    pub fn start_again(&mut self) {
        let body = self.body.clone();
        self.restart(&body);
    }

    /// Stop it (SIGTERM, then wait): its port refuses connections after.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's PID.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    /// Send `sig` to it (SIGSTOP freezes it with connections open; SIGKILL
    /// is an edge dying: the kernel resets every connection with unread
    /// bytes). After SIGKILL it is gone; [`Nginx::start_again`] restarts it.
    pub fn signal(&mut self, sig: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's PID.
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
        }
        if sig == libc::SIGKILL {
            if let Some(mut child) = self.child.take() {
                let _ = child.wait();
            }
        }
    }

    /// Requests it logged (one line each), to count what clients asked.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

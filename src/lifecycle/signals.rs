//! Signals. Pingora handles SIGTERM (drain), SIGINT (stop now) and SIGQUIT
//! (hand the listening sockets to a `run --upgrade` process). cutover adds:
//! - SIGHUP: reload the config (Pingora has no handler, and the default
//!   action would kill the process);
//! - SIGUSR2: binary upgrade in place. The running process validates the
//!   config, starts the binary it was started from (a package upgrade has
//!   replaced it) with `run --upgrade`, waits until that process listens on
//!   the upgrade socket, then hands its sockets over exactly as on SIGQUIT.
//!   The successor is our child, so it stays in the service's cgroup, and it
//!   writes the PID file before we exit, so systemd follows it (PIDFile=).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{error, info, warn};
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{self, Config};
use crate::model::Process;

/// How long a successor may take to start listening on the upgrade socket.
const SUCCESSOR_START: Duration = Duration::from_secs(15);

/// Pingora's shutdown signals, plus SIGHUP = reload, which Pingora lacks.
pub struct Signals {
    pub process: Arc<Process>,
    pub config_path: PathBuf,
    /// `run --config-url`, given again to a successor.
    pub config_url: Option<String>,
    /// The document's URL, when `config_path` is a bootstrap: SIGHUP
    /// fetches it now instead of re-reading the file.
    pub source: Option<Arc<crate::lifecycle::source::Source>>,
    /// The config whose listeners/admin/server settings this process runs with.
    pub running: Config,
    /// The binary a SIGUSR2 upgrade starts.
    pub exe: PathBuf,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (mut quit, mut term, mut int, mut hup, mut usr2) = match (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(q), Ok(t), Ok(i), Ok(h), Ok(u)) => (q, t, i, h, u),
            _ => {
                error!("cannot install signal handlers; stopping");
                return ShutdownSignal::FastShutdown;
            }
        };
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    self.announce_drain();
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = hup.recv() => self.reload().await,
                _ = usr2.recv() => {
                    if self.start_successor().await {
                        self.announce_drain();
                        return ShutdownSignal::GracefulUpgrade;
                    }
                }
            }
        }
    }
}

impl Signals {
    /// Re-read the file; on any problem keep the running model and say why.
    async fn reload(&self) {
        let metrics = &self.process.metrics;
        // logrotate's postrotate sends SIGHUP too: reopen whatever the config says.
        if let Some(log) = &self.process.access_log {
            log.reopen();
        }
        if let Some(source) = &self.source {
            info!(
                "SIGHUP: fetching {} now (the bootstrap file {} is read only at start and by `run --upgrade`)",
                source.bootstrap.source().url,
                self.config_path.display()
            );
            source.wake();
            return;
        }
        let config = match config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                metrics.reload_result(false);
                error!("reload failed, keeping the running config. {e}");
                return;
            }
        };
        for w in &config.warnings {
            warn!("config: {w}");
        }
        let r = &self.running;
        if config.listeners != r.listeners
            || config.admin != r.admin
            || config.server != r.server
            || config.access_log != r.access_log
        {
            warn!(
                "reload: listeners/admin/server/access_log changed in {}; those take effect only with `cutover run --upgrade` (routes, upstreams, weights, phase and headers are reloaded now)",
                self.config_path.display()
            );
        }

        let summary = format!("phase {:?}, {} route(s)", config.phase, config.routes.len());
        self.process.install(config).await;
        metrics.reload_result(true);
        info!("reloaded {}: {summary}", self.config_path.display());
    }
}

impl Signals {
    /// A handover: Pingora sends the sockets, then keeps accepting beside the
    /// successor for a few seconds; answering `Connection: close` meanwhile
    /// moves keep-alive clients to fresh connections, which the successor
    /// takes more and more of. (On SIGTERM, [`crate::lifecycle::drain`] does this.)
    fn announce_drain(&self) {
        self.process
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Start the successor for a SIGUSR2 upgrade; `true` once it waits for
    /// our sockets. On any failure the successor is stopped, we keep serving,
    /// and the failure is logged and counted.
    async fn start_successor(&self) -> bool {
        let metrics = &self.process.metrics;
        let fail = |why: String| {
            metrics.upgrade_result(false);
            error!("binary upgrade aborted, still serving: {why}");
            false
        };
        // A bootstrap is checked here; its document the successor fetches.
        let next = match config::load_file(&self.config_path, self.config_url.as_deref()) {
            Ok(config::Loaded::Whole(c)) => c,
            Ok(config::Loaded::Bootstrap(b)) => b.settings().clone(),
            Err(e) => return fail(format!("the config does not load. {e}")),
        };
        let sock = PathBuf::from(&self.running.server.upgrade_sock);
        if next.server.upgrade_sock != self.running.server.upgrade_sock {
            return fail(format!(
                "server.upgrade_sock changed ({} -> {}); both processes must use the same socket",
                self.running.server.upgrade_sock, next.server.upgrade_sock
            ));
        }
        // The successor binds the socket when it is ready for our sockets:
        // its appearance is the readiness signal, so clear a stale one first.
        let _ = std::fs::remove_file(&sock);
        let mut child = match Command::new(&self.exe)
            .arg("run")
            .arg("--upgrade")
            .arg("--config")
            .arg(&self.config_path)
            .args(
                self.config_url
                    .iter()
                    .flat_map(|u| ["--config-url", u.as_str()]),
            )
            .stdin(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => return fail(format!("cannot start {}: {e}", self.exe.display())),
        };
        info!(
            "binary upgrade: started {} (pid {}), waiting for it on {}",
            self.exe.display(),
            child.id(),
            sock.display()
        );
        let deadline = Instant::now() + SUCCESSOR_START;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return fail(format!("the new process exited at start ({status})"));
            }
            if sock.exists() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return fail(format!(
                    "the new process did not listen on {} within {SUCCESSOR_START:?}",
                    sock.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        metrics.upgrade_result(true);
        info!(
            "binary upgrade: handing the listening sockets to pid {}",
            child.id()
        );
        true
    }
}

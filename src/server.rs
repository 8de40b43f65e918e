//! Assemble and run the Pingora server: proxy listeners, admin listener, DNS
//! refresh, and the signal handling that adds SIGHUP reload to Pingora's
//! SIGTERM (drain), SIGINT (stop now) and SIGQUIT (hand sockets to `run --upgrade`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use log::{error, info, warn};
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::proxy::ProxyServiceBuilder;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use tokio::signal::unix::{signal, SignalKind};

use crate::access_log::AccessLog;
use crate::admin::AdminApp;
use crate::config::{self, AccessLog as AccessLogConfig, Config};
use crate::dns::{DnsRefresh, Resolver};
use crate::health::HealthChecker;
use crate::metrics::Metrics;
use crate::proxy::CutoverProxy;
use crate::runtime::Shared;

pub struct RunOptions {
    /// Re-read on SIGHUP.
    pub config_path: PathBuf,
    /// Take the listening sockets over from a running instance.
    pub upgrade: bool,
    /// Names resolved before DNS (see [`crate::dns`]).
    pub hosts_file: Option<PathBuf>,
}

fn whole_seconds(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn pingora_conf(config: &Config) -> ServerConf {
    let s = &config.server;
    ServerConf {
        threads: s.threads,
        grace_period_seconds: Some(whole_seconds(s.grace_period)),
        graceful_shutdown_timeout_seconds: Some(whole_seconds(s.graceful_shutdown_timeout)),
        upgrade_sock: s.upgrade_sock.clone(),
        pid_file: s.pid_file.clone(),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        ..ServerConf::default()
    }
}

/// Build everything, then serve until a shutdown signal. Blocks.
pub fn run(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    for w in &config.warnings {
        warn!("config: {w}");
    }
    let metrics = Arc::new(Metrics::new());
    let resolver = Arc::new(Resolver::new(opts.hosts_file.clone()));
    let access_log = match &config.access_log {
        AccessLogConfig::Off => None,
        AccessLogConfig::On {
            format,
            destination,
        } => Some(
            AccessLog::start(
                destination.clone(),
                *format,
                metrics.access_log_dropped.clone(),
                metrics.access_log_write_errors.clone(),
            )
            .context("starting the access log")?,
        ),
    };
    let shared = Shared::new(config.clone(), metrics, resolver.clone(), access_log);

    // Resolve every upstream name before accepting traffic; a name that does
    // not resolve is logged and retried each refresh, it does not stop startup.
    let startup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the startup runtime")?;
    startup.block_on(async {
        // Installing a handler now means SIGHUP never kills the process, even
        // before the server's own signal loop is running.
        let _ = signal(SignalKind::hangup());
        resolver.refresh(false).await;
    });
    drop(startup);

    let server = build_server(&config, &shared, &opts)?;
    info!(
        "cutover {} serving phase {:?}: {} route(s), listeners {}",
        env!("CARGO_PKG_VERSION"),
        config.phase,
        config.routes.len(),
        config
            .listeners
            .iter()
            .map(|l| format!(
                "{}{}",
                l.address,
                if l.tls.is_some() { " (tls)" } else { "" }
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            shared,
            config_path: opts.config_path,
            running: config,
        }),
    });
    info!("cutover stopped");
    Ok(())
}

fn build_server(
    config: &Config,
    shared: &Arc<Shared>,
    opts: &RunOptions,
) -> anyhow::Result<Server> {
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, pingora_conf(config));
    server.bootstrap();

    // CONNECT is let through Pingora's own 405 so that `request_filter`
    // refuses it with a log line and a counter, like every other bad request.
    let mut server_options = HttpServerOptions::default();
    server_options.allow_connect_method_proxying = true;
    let mut proxy = ProxyServiceBuilder::new(
        &server.configuration,
        CutoverProxy {
            shared: shared.clone(),
        },
    )
    .name("cutover proxy")
    .server_options(server_options)
    .build();
    for l in &config.listeners {
        let addr = l.address.to_string();
        match &l.tls {
            None => proxy.add_tcp(&addr),
            Some(tls) => {
                let settings = TlsSettings::intermediate(
                    &tls.cert.to_string_lossy(),
                    &tls.key.to_string_lossy(),
                )
                .map_err(|e| {
                    anyhow::anyhow!(
                        "listener {addr}: cannot load TLS certificate {} / key {}: {e}",
                        tls.cert.display(),
                        tls.key.display()
                    )
                })?;
                proxy.add_tls_with_settings(&addr, None, settings);
            }
        }
    }
    server.add_service(proxy);

    if let Some(admin) = config.admin {
        let mut svc = Service::new(
            "cutover admin".to_string(),
            AdminApp {
                shared: shared.clone(),
            },
        );
        svc.add_tcp(&admin.to_string());
        server.add_service(svc);
    }

    server.add_service(background_service(
        "health checks",
        HealthChecker {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "dns refresh",
        DnsRefresh {
            resolver: shared.resolver.clone(),
            interval: config.dns_refresh,
        },
    ));
    Ok(server)
}

/// Pingora's shutdown signals, plus SIGHUP = reload, which Pingora lacks.
struct Signals {
    shared: Arc<Shared>,
    config_path: PathBuf,
    /// The config whose listeners/admin/server settings this process runs with.
    running: Config,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (mut quit, mut term, mut int, mut hup) = match (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(q), Ok(t), Ok(i), Ok(h)) => (q, t, i, h),
            _ => {
                error!("cannot install signal handlers; stopping");
                return ShutdownSignal::FastShutdown;
            }
        };
        loop {
            tokio::select! {
                _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = hup.recv() => self.reload().await,
            }
        }
    }
}

impl Signals {
    /// Re-read the file; on any problem keep the running model and say why.
    async fn reload(&self) {
        let metrics = &self.shared.metrics;
        // logrotate's postrotate sends SIGHUP too: reopen whatever the config says.
        if let Some(log) = &self.shared.access_log {
            log.reopen();
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
        self.shared.install(config).await;
        metrics.reload_result(true);
        info!("reloaded {}: {summary}", self.config_path.display());
    }
}

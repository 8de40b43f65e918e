//! Assemble and run the Pingora server: proxy listeners, admin listener,
//! health checks, DNS refresh; signals are handled in [`crate::lifecycle::signals`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use log::{info, warn};
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{AccessLog as AccessLogConfig, Config, Loaded, ProxyProtocolMode};
use crate::lifecycle::admin::AdminApp;
use crate::lifecycle::drain::DrainingApp;
use crate::lifecycle::signals::Signals;
use crate::model::checks::HealthChecker;
use crate::model::dns::{DnsRefresh, Resolver};
use crate::model::Process;
use crate::observe::access_log::AccessLog;
use crate::observe::metrics::Metrics;
use crate::paths::fast::FastPath;
use crate::paths::pingora::PingoraPath;

pub struct RunOptions {
    /// Re-read on SIGHUP (a bootstrap file: read at start only).
    pub config_path: PathBuf,
    /// `run --config-url`, passed on to a SIGUSR2 successor.
    pub config_url: Option<String>,
    /// Take the listening sockets over from a running instance.
    pub upgrade: bool,
    /// Names resolved before DNS (see [`crate::model::dns`]).
    pub hosts_file: Option<PathBuf>,
    /// The binary to start for an in-place upgrade (SIGUSR2): the path this
    /// process was started from, which a package upgrade has replaced.
    pub exe: PathBuf,
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
        work_stealing: s.work_stealing,
        ..ServerConf::default()
    }
}

/// Build everything, then serve until a shutdown signal. Blocks. A
/// bootstrap's document is fetched (or read from the cache) first.
pub fn run(start: Loaded, opts: RunOptions) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (config, source) = match start {
        Loaded::Whole(config) => (config, None),
        Loaded::Bootstrap(bootstrap) => {
            let started =
                crate::lifecycle::source::start(bootstrap, &metrics, opts.hosts_file.clone())?;
            (started.config, Some(started.source))
        }
    };
    for w in &config.warnings {
        warn!("config: {w}");
    }
    let resolver = Arc::new(Resolver::with_metrics(
        opts.hosts_file.clone(),
        metrics.dns(),
    ));
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
    let process = Process::new(config.clone(), metrics, resolver.clone(), access_log);

    // Resolve every upstream name before accepting traffic; a name that does
    // not resolve is logged and retried each refresh, it does not stop startup.
    let startup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the startup runtime")?;
    startup.block_on(async {
        // Installing handlers now means SIGHUP/SIGUSR2 never kill the process
        // (their default action), even before the server's signal loop runs.
        let _ = signal(SignalKind::hangup());
        let _ = signal(SignalKind::user_defined2());
        resolver.refresh(false).await;
    });
    drop(startup);

    let mut server = build_server(&config, &process, &opts)?;
    if let Some(source) = &source {
        server.add_service(background_service(
            "config source",
            crate::lifecycle::source::SourcePoller {
                source: source.clone(),
                process: process.clone(),
            },
        ));
    }
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
    let pid_file = PidFile::write(&config.server.pid_file);
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            process,
            config_path: opts.config_path,
            config_url: opts.config_url,
            source,
            running: config,
            exe: opts.exe,
        }),
    });
    drop(pid_file);
    info!("cutover stopped");
    Ok(())
}

/// The PID file, for `systemctl` (PIDFile=) and for operators sending
/// SIGQUIT/SIGUSR2. A successor writes its own PID over ours during a binary
/// upgrade; we remove the file at exit only while it still names us.
struct PidFile {
    path: PathBuf,
}

impl PidFile {
    fn write(path: &str) -> Option<PidFile> {
        let path = PathBuf::from(path);
        match std::fs::write(&path, format!("{}\n", std::process::id())) {
            Ok(()) => Some(PidFile { path }),
            Err(e) => {
                warn!("cannot write the pid file {}: {e}", path.display());
                None
            }
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|s| s.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The TLS server settings Pingora's `TlsSettings::intermediate` makes
/// (Mozilla intermediate, HTTP/1.1 only), for a listener whose handshake
/// cutover does itself after the PROXY header.
fn tls_acceptor(
    addr: &std::net::SocketAddr,
    tls: &crate::config::ListenerTls,
) -> anyhow::Result<Arc<pingora::tls::ssl::SslAcceptor>> {
    use pingora::tls::ssl::{SslAcceptor, SslFiletype, SslMethod};
    let fail = |e: pingora::tls::error::ErrorStack| {
        anyhow::anyhow!(
            "listener {addr}: cannot load TLS certificate {} / key {}: {e}",
            tls.cert.display(),
            tls.key.display()
        )
    };
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(fail)?;
    b.set_private_key_file(&tls.key, SslFiletype::PEM)
        .map_err(fail)?;
    b.set_certificate_chain_file(&tls.cert).map_err(fail)?;
    b.check_private_key().map_err(fail)?;
    Ok(Arc::new(b.build()))
}

fn build_server(
    config: &Config,
    process: &Arc<Process>,
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
    let mut http = pingora::proxy::http_proxy(
        &server.configuration,
        PingoraPath {
            process: process.clone(),
        },
    );
    http.server_options = Some(server_options);
    // A TLS listener that reads a PROXY header first is a TCP listener to
    // Pingora: cutover reads the header, then does the handshake itself.
    let mut after_proxy = Vec::new();
    for l in &config.listeners {
        after_proxy.push(match &l.tls {
            Some(tls) if l.proxy_protocol != ProxyProtocolMode::Off => {
                Some(tls_acceptor(&l.address, tls)?)
            }
            _ => None,
        });
    }
    let mut proxy = Service::new(
        "cutover proxy".to_string(),
        DrainingApp {
            inner: Arc::new(FastPath::new(
                Arc::new(http),
                process.clone(),
                &server.configuration,
                after_proxy.clone(),
            )),
            process: process.clone(),
            notice: (config.server.grace_period / 2).min(std::time::Duration::from_secs(1)),
        },
    );
    for (l, after_proxy) in config.listeners.iter().zip(&after_proxy) {
        let addr = l.address.to_string();
        match &l.tls {
            // No L4 read buffer: the fast path reads into its own, and
            // Pingora's default (64 KiB per connection, allocated at accept)
            // would be most of the memory an idle keep-alive client costs.
            _ if after_proxy.is_some() => proxy.add_listener(
                ListenerConfig::tcp(addr.clone()).l4_buffer(L4BufferSettings::default().read(0)),
            ),
            None => proxy.add_listener(
                ListenerConfig::tcp(addr.clone()).l4_buffer(L4BufferSettings::default().read(0)),
            ),
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
                // No L4 read buffer either (64 KiB per connection): OpenSSL
                // reads ahead into its own record buffer instead
                // (`model::peer::tune_tls`).
                proxy.add_listener(
                    ListenerConfig::tcp(addr.clone())
                        .tls(settings)
                        .l4_buffer(L4BufferSettings::default().read(0)),
                );
            }
        }
    }
    server.add_service(proxy);

    if let Some(admin) = config.admin {
        let mut svc = Service::new(
            "cutover admin".to_string(),
            AdminApp {
                process: process.clone(),
            },
        );
        svc.add_tcp(&admin.to_string());
        server.add_service(svc);
    }

    server.add_service(background_service(
        "health checks",
        HealthChecker {
            process: process.clone(),
        },
    ));
    server.add_service(background_service(
        "rollouts",
        crate::model::rollout::RolloutController {
            process: process.clone(),
        },
    ));
    server.add_service(background_service(
        "dns refresh",
        DnsRefresh {
            resolver: process.resolver.clone(),
            interval: config.dns_refresh,
        },
    ));
    Ok(server)
}

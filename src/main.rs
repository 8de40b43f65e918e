use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cutover::config;

const DEFAULT_CONFIG: &str = "/etc/cutover/cutover.yaml";

/// Reverse proxy for zero-downtime CDN distribution migrations.
#[derive(Parser)]
#[command(name = "cutover", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve in the foreground (SIGHUP reloads, SIGTERM drains, SIGQUIT hands over to `run --upgrade`)
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Fetch phase, client_ip, dns_refresh and routes from this URL (the config file is then a bootstrap: listeners, admin, server, access_log, config_source)
        #[arg(long, value_name = "URL")]
        config_url: Option<String>,
        /// Take the listening sockets over from the running instance (Pingora graceful upgrade)
        #[arg(long)]
        upgrade: bool,
    },
    /// Probe each route's canary through the public name, the proxy and each upstream; exit 1 unless every path lands where the config says
    Verify {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The proxy to test (default: the config's first plain listener)
        #[arg(long)]
        proxy: Option<std::net::SocketAddr>,
        /// Send the public name's requests to ADDR:PORT instead of where DNS points (like curl --connect-to)
        #[arg(long, value_name = "NAME=ADDR:PORT", value_parser = parse_resolve)]
        resolve: Vec<(String, std::net::SocketAddr)>,
    },
    /// Offline rehearsal: a two-distribution CDN edge and the proxy on loopback, the DNS-flip trap and the fix side by side
    Demo,
    /// Parse and validate the config; print a one-line summary or every problem
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// With a bootstrap --config: the URL it would fetch from (as `run --config-url`)
        #[arg(long, value_name = "URL")]
        config_url: Option<String>,
        /// With a bootstrap --config: check this file as the served document, exactly as every instance will before it runs it
        #[arg(long, value_name = "FILE")]
        document: Option<PathBuf>,
    },
    /// Show each route's weights, the shares actually served, and its rollout (from the admin listener's /status)
    Status {
        /// The admin listener (default: `admin.address` of --config)
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Redraw every 2 seconds
        #[arg(long)]
        watch: bool,
    },
    /// Resume a rolled-back or paused rollout, or abort one (to 0% until a reload with a new start)
    Rollout {
        #[arg(value_parser = ["resume", "abort"])]
        action: String,
        /// The route whose rollout to act on
        route: String,
        /// The admin listener (default: `admin.address` of --config)
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// Names in this hosts(5)-format file resolve before DNS, re-read at every refresh.
const HOSTS_FILE_ENV: &str = "CUTOVER_HOSTS_FILE";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server logs what it does; one-shot commands only what went wrong.
    let default_level = match cli.command {
        Command::Run { .. } | Command::Demo => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .format_timestamp_millis()
        .init();
    match cli.command {
        Command::Check {
            config,
            config_url,
            document,
        } => check(&config, config_url.as_deref(), document.as_deref()),
        Command::Verify {
            config,
            proxy,
            resolve,
        } => verify(&config, proxy, resolve),
        Command::Status {
            admin,
            config,
            watch,
        } => match admin_address(admin, &config)
            .and_then(|a| cutover::lifecycle::status::status_command(a, watch))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cutover status: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Rollout {
            action,
            route,
            admin,
            config,
        } => {
            let path = format!("/rollout/{route}/{action}");
            match admin_address(admin, &config)
                .and_then(|a| cutover::lifecycle::status::admin_request(a, "POST", &path))
            {
                Ok((200, body)) => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Ok((_, body)) => {
                    eprint!("cutover rollout: {body}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("cutover rollout: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo => match cutover::rehearsal::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cutover demo: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            config_url,
            upgrade,
        } => {
            let loaded = match config::load_file(&config, config_url.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = cutover::lifecycle::server::RunOptions {
                config_path: config,
                config_url,
                upgrade,
                hosts_file: std::env::var_os(HOSTS_FILE_ENV).map(PathBuf::from),
                exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/cutover")),
            };
            match cutover::lifecycle::server::run(loaded, opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cutover: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `--admin`, else the config's `admin.address`.
fn admin_address(
    admin: Option<std::net::SocketAddr>,
    config: &std::path::Path,
) -> Result<std::net::SocketAddr, String> {
    if let Some(a) = admin {
        return Ok(a);
    }
    let cfg = match config::load_file(config, None) {
        Ok(config::Loaded::Whole(c)) => c,
        Ok(config::Loaded::Bootstrap(b)) => b.settings().clone(),
        Err(e) => return Err(format!("{e}(or give --admin ADDR:PORT)")),
    };
    cfg.admin.ok_or_else(|| {
        format!(
            "{} has no `admin.address`: give --admin ADDR:PORT",
            config.display()
        )
    })
}

fn parse_resolve(s: &str) -> Result<(String, std::net::SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=ADDR:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not ADDR:PORT (e.g. 192.0.2.10:443)"))?;
    Ok((name.trim_end_matches('.').to_ascii_lowercase(), addr))
}

fn verify(
    path: &std::path::Path,
    proxy: Option<std::net::SocketAddr>,
    resolve: Vec<(String, std::net::SocketAddr)>,
) -> ExitCode {
    let hosts_file = std::env::var_os(HOSTS_FILE_ENV).map(PathBuf::from);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cutover verify: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = match config::load_file(path, None) {
        Ok(config::Loaded::Whole(c)) => c,
        // A bootstrap: verify what the fleet runs, the served document.
        Ok(config::Loaded::Bootstrap(b)) => {
            match rt.block_on(cutover::lifecycle::source::document_now(
                &b,
                hosts_file.as_deref(),
            )) {
                Ok((c, note)) => {
                    if let Some(note) = note {
                        eprintln!("cutover verify: {note}");
                    }
                    c
                }
                Err(e) => {
                    eprintln!("cutover verify: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Err(e) => {
            eprint!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = cutover::lifecycle::verify::VerifyOptions {
        proxy,
        resolve: resolve.into_iter().collect(),
        hosts_file,
    };
    let outcome = rt.block_on(cutover::lifecycle::verify::verify(&cfg, &opts));
    print!("{}", outcome.report);
    if outcome.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One line: what a checked config holds.
fn summary(c: &config::Config) -> String {
    let upstreams: usize = c.routes.iter().map(|r| r.upstreams.len()).sum();
    format!(
        "phase {:?}, {} listener(s), {} route(s), {} upstream(s)",
        c.phase,
        c.listeners.len(),
        c.routes.len(),
        upstreams
    )
}

/// A bootstrap is checked offline (no fetch); `--document` checks a file
/// as the served document, joined with the bootstrap, as `run` will.
fn check(
    path: &std::path::Path,
    url: Option<&str>,
    document: Option<&std::path::Path>,
) -> ExitCode {
    let warn_all = |c: &config::Config| {
        for w in &c.warnings {
            eprintln!("warning: {w}");
        }
    };
    match (config::load_file(path, url), document) {
        (Ok(config::Loaded::Whole(c)), None) => {
            warn_all(&c);
            println!("{}: ok: {}", path.display(), summary(&c));
            ExitCode::SUCCESS
        }
        (Ok(config::Loaded::Whole(_)), Some(_)) => {
            eprintln!(
                "{}: --document needs a bootstrap config (one with `config_source`, or give --config-url)",
                path.display()
            );
            ExitCode::FAILURE
        }
        (Ok(config::Loaded::Bootstrap(b)), None) => {
            let s = b.settings();
            warn_all(s);
            let src = b.source();
            println!(
                "{}: ok: bootstrap, {} listener(s), document from {} every {}, cache {} (check a document with --document FILE)",
                path.display(),
                s.listeners.len(),
                src.url,
                humantime::format_duration(src.interval),
                src.cache.display()
            );
            ExitCode::SUCCESS
        }
        (Ok(config::Loaded::Bootstrap(b)), Some(doc)) => {
            let text = match std::fs::read_to_string(doc) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{}: cannot read the document: {e}", doc.display());
                    return ExitCode::FAILURE;
                }
            };
            match b.with_document(&doc.display().to_string(), &text) {
                Ok(c) => {
                    warn_all(&c);
                    println!(
                        "{}: ok: document sha256={} for {}: {}",
                        doc.display(),
                        c.sha256,
                        path.display(),
                        summary(&c)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprint!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        (Err(e), _) => {
            eprint!("{e}");
            ExitCode::FAILURE
        }
    }
}

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
        /// Take the listening sockets over from the running instance (Pingora graceful upgrade)
        #[arg(long)]
        upgrade: bool,
    },
    /// Offline rehearsal: a two-distribution CDN edge and the proxy on loopback, the DNS-flip trap and the fix side by side
    Demo,
    /// Parse and validate the config; print a one-line summary or every problem
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// Names in this hosts(5)-format file resolve before DNS, re-read at every refresh.
const HOSTS_FILE_ENV: &str = "CUTOVER_HOSTS_FILE";

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Demo => match cutover::rehearsal::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cutover demo: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, upgrade } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = cutover::server::RunOptions {
                config_path: config,
                upgrade,
                hosts_file: std::env::var_os(HOSTS_FILE_ENV).map(PathBuf::from),
            };
            match cutover::server::run(cfg, opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cutover: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            let upstreams: usize = c.routes.iter().map(|r| r.upstreams.len()).sum();
            println!(
                "{}: ok: phase {:?}, {} listener(s), {} route(s), {} upstream(s)",
                path.display(),
                c.phase,
                c.listeners.len(),
                c.routes.len(),
                upstreams
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            ExitCode::FAILURE
        }
    }
}

//! File format → validated [`Config`], collecting every problem with its key path.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use pingora::tls::x509::X509;

use super::file::*;
use super::model::*;
use super::Problem;

const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(30);
const DEFAULT_UPGRADE_SOCK: &str = "/run/cutover/upgrade.sock";
const DEFAULT_PID_FILE: &str = "/run/cutover/cutover.pid";
/// Largest accepted weight: keeps sums far from overflow and slices meaningful.
const MAX_WEIGHT: u64 = 1_000_000;

pub(super) struct Checker<'a> {
    base_dir: &'a Path,
    problems: Vec<Problem>,
    pub(super) warnings: Vec<String>,
}

impl Checker<'_> {
    pub(super) fn base_dir(&self) -> &Path {
        self.base_dir
    }

    pub(super) fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
            position: None,
        });
    }

    pub(super) fn duration(
        &mut self,
        path: &str,
        text: Option<&str>,
        default: Duration,
    ) -> Duration {
        let Some(text) = text else { return default };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() => {
                self.problem(path, "must be longer than 0");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(
                    path,
                    format!("`{text}` is not a duration ({e}); write e.g. `500ms`, `5s`, `1m`"),
                );
                default
            }
        }
    }

    fn socket_addr(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        match text.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    path,
                    format!(
                        "`{text}` is not an IP:port address (e.g. `0.0.0.0:8080`, `[::]:8443`)"
                    ),
                );
                None
            }
        }
    }

    /// Resolve `text` against the config file's folder and check it can be read.
    pub(super) fn readable_file(&mut self, path: &str, text: &str) -> Option<PathBuf> {
        let file = self.base_dir.join(text);
        match std::fs::read(&file) {
            Ok(_) => Some(file),
            Err(e) => {
                self.problem(path, format!("cannot read `{}`: {e}", file.display()));
                None
            }
        }
    }

    pub(super) fn header_name(&mut self, path: &str, text: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(text.as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                self.problem(path, format!("`{text}` is not a valid HTTP header name"));
                None
            }
        }
    }
}

/// What a file must hold: a whole config, or a bootstrap's part only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Whole,
    Bootstrap,
}

impl Part {
    fn needs_document(self) -> bool {
        self == Part::Whole
    }
}

/// `url_override` is `run --config-url`'s URL, which stands for
/// `config_source.url`.
pub fn validate(
    raw: FileConfig,
    base_dir: &Path,
    part: Part,
    url_override: Option<&str>,
) -> Result<Config, Vec<Problem>> {
    let mut c = Checker {
        base_dir,
        problems: Vec::new(),
        warnings: Vec::new(),
    };

    let phase = raw.phase.as_deref().map(str::trim).unwrap_or_default();
    if part.needs_document() {
        match &raw.phase {
            None => c.problem(
                "phase",
                "missing: name the migration phase (e.g. `phase: split`); it labels every traffic metric",
            ),
            Some(_) if phase.is_empty() => {
                c.problem("phase", "must not be empty: it labels every traffic metric")
            }
            Some(_) => {}
        }
    }
    let source = match (&raw.config_source, url_override) {
        (None, None) => None,
        (file, url) => super::source::check_source(&mut c, file.as_ref(), url),
    };

    let listeners = check_listeners(&mut c, &raw.listeners);
    let admin = raw
        .admin
        .as_ref()
        .and_then(|a| c.socket_addr("admin.address", &a.address));
    let server = check_server(&mut c, &raw.server.unwrap_or_default());
    let access_log = check_access_log(&mut c, raw.access_log.as_ref());
    let client_ip = check_client_ip(&mut c, raw.client_ip.as_ref());
    let dns_refresh = c.duration(
        "dns_refresh",
        raw.dns_refresh.as_deref(),
        DEFAULT_DNS_REFRESH,
    );

    if raw.routes.is_empty() && part.needs_document() {
        c.problem("routes", "at least one route is needed");
    }
    let mut route_names = HashSet::new();
    let mut host_owner: HashMap<HostPattern, usize> = HashMap::new();
    let mut routes = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        if !route_names.insert(r.name.as_str()) {
            c.problem(
                format!("{path}.name"),
                format!("route name `{}` is used twice", r.name),
            );
        }
        let (hosts, route) = check_route(&mut c, &path, r, &raw.routes);
        // Checked even when the route has other problems, so that one run
        // reports everything.
        for (j, host) in hosts {
            if let Some(&other) = host_owner.get(&host) {
                c.problem(
                    format!("{path}.hosts[{j}]"),
                    format!(
                        "host `{host}` is already in routes[{other}]: a host belongs to one route"
                    ),
                );
            } else {
                host_owner.insert(host, i);
            }
        }
        routes.extend(route);
    }

    if c.problems.is_empty() {
        Ok(Config {
            phase: phase.to_string(),
            source,
            sha256: String::new(),
            listeners,
            admin,
            server,
            access_log,
            client_ip,
            dns_refresh,
            routes,
            warnings: c.warnings,
        })
    } else {
        Err(c.problems)
    }
}

fn check_listeners(c: &mut Checker, raw: &[ListenerFile]) -> Vec<Listener> {
    if raw.is_empty() {
        c.problem("listeners", "at least one listener is needed");
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        let path = format!("listeners[{i}]");
        let Some(address) = c.socket_addr(&format!("{path}.address"), &l.address) else {
            continue;
        };
        if !seen.insert(address) {
            c.problem(
                format!("{path}.address"),
                format!("{address} is listed twice"),
            );
        }
        let tls = l.tls.as_ref().and_then(|t| {
            let cert = c.readable_file(&format!("{path}.tls.cert"), &t.cert);
            let key = c.readable_file(&format!("{path}.tls.key"), &t.key);
            let (cert, key) = (cert?, key?);
            check_cert_and_key(c, &path, &cert, &key);
            Some(ListenerTls { cert, key })
        });
        let keepalive_timeout = c.duration(
            &format!("{path}.keepalive_timeout"),
            l.keepalive_timeout.as_deref(),
            DEFAULT_KEEPALIVE_TIMEOUT,
        );
        let header_timeout = c.duration(
            &format!("{path}.header_timeout"),
            l.header_timeout.as_deref(),
            DEFAULT_HEADER_TIMEOUT,
        );
        let (alb, alb_named) = match l.alb_idle_timeout.as_deref() {
            Some(t) => (
                c.duration(
                    &format!("{path}.alb_idle_timeout"),
                    Some(t),
                    ALB_DEFAULT_IDLE_TIMEOUT,
                ),
                true,
            ),
            None => (ALB_DEFAULT_IDLE_TIMEOUT, false),
        };
        if keepalive_timeout <= alb {
            let whose = if alb_named {
                format!(
                    "the load balancer's idle timeout (alb_idle_timeout: {})",
                    humantime::format_duration(alb)
                )
            } else {
                "an ALB's default idle timeout (60s)".to_string()
            };
            c.warnings.push(format!(
                "{path}.keepalive_timeout: {} is not longer than {whose}: the load balancer may reuse a connection cutover is closing, and answer that request 502; make it longer (the default is 75s)",
                humantime::format_duration(keepalive_timeout)
            ));
        }
        let proxy_protocol = match l.proxy_protocol.as_deref().map(str::trim) {
            None | Some("off") => Some(ProxyProtocolMode::Off),
            Some("v1") => Some(ProxyProtocolMode::V1),
            Some("v2") => Some(ProxyProtocolMode::V2),
            Some("auto") => Some(ProxyProtocolMode::Auto),
            Some(other) => {
                c.problem(
                    format!("{path}.proxy_protocol"),
                    format!("`{other}` is not a mode: use off, v1, v2 or auto"),
                );
                None
            }
        };
        let proxy_trusted = check_nets(c, &format!("{path}.trusted"), &l.trusted);
        if proxy_protocol.is_none() {
            // Already reported; the rest depends on the mode.
        } else if proxy_protocol != Some(ProxyProtocolMode::Off) {
            if l.trusted.is_empty() {
                c.problem(
                    format!("{path}.trusted"),
                    "list the load balancer's addresses allowed to send the PROXY header (e.g. the VPC's CIDR, `[10.0.0.0/8]`): from any other peer a header is refused",
                );
            }
        } else if !l.trusted.is_empty() {
            c.problem(
                format!("{path}.trusted"),
                "only read with `proxy_protocol: v1 | v2 | auto` (client addresses from X-Forwarded-For are trusted in `client_ip.trusted`)",
            );
        }
        let max_connections = match l.max_connections {
            Some(0) => {
                c.problem(
                    format!("{path}.max_connections"),
                    "must be at least 1 (leave it out for the default, derived from the file-descriptor limit)",
                );
                None
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        out.push(Listener {
            address,
            tls,
            keepalive_timeout,
            header_timeout,
            proxy_protocol: proxy_protocol.unwrap_or_default(),
            proxy_trusted,
            max_connections,
        });
    }
    out
}

/// A listener whose PEM files do not load would fail at bind time with a vague
/// OpenSSL error; check now so the message names the file.
fn check_cert_and_key(c: &mut Checker, path: &str, cert: &Path, key: &Path) {
    let cert_ok = std::fs::read(cert)
        .ok()
        .and_then(|pem| X509::stack_from_pem(&pem).ok())
        .is_some_and(|certs| !certs.is_empty());
    if !cert_ok {
        c.problem(
            format!("{path}.tls.cert"),
            format!("`{}` holds no PEM certificate", cert.display()),
        );
    }
    let key_ok = std::fs::read(key)
        .ok()
        .and_then(|pem| pingora::tls::pkey::PKey::private_key_from_pem(&pem).ok())
        .is_some();
    if !key_ok {
        c.problem(
            format!("{path}.tls.key"),
            format!("`{}` holds no PEM private key", key.display()),
        );
    }
}

fn check_server(c: &mut Checker, raw: &ServerFile) -> ServerSettings {
    let threads = match raw.threads {
        Some(0) => {
            c.problem("server.threads", "must be at least 1");
            1
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let upstream_keepalive_pool_size = match raw.upstream_keepalive_pool_size {
        Some(0) => {
            c.problem(
                "server.upstream_keepalive_pool_size",
                "must be at least 1: without a pool every request opens a TLS connection",
            );
            128
        }
        Some(n) => n,
        None => 1024,
    };
    ServerSettings {
        threads,
        grace_period: c.duration(
            "server.grace_period",
            raw.grace_period.as_deref(),
            Duration::from_secs(10),
        ),
        graceful_shutdown_timeout: c.duration(
            "server.graceful_shutdown_timeout",
            raw.graceful_shutdown_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        upgrade_sock: raw
            .upgrade_sock
            .clone()
            .unwrap_or_else(|| DEFAULT_UPGRADE_SOCK.into()),
        pid_file: raw
            .pid_file
            .clone()
            .unwrap_or_else(|| DEFAULT_PID_FILE.into()),
        upstream_keepalive_pool_size,
        work_stealing: raw.work_stealing.unwrap_or(true),
    }
}

fn check_access_log(c: &mut Checker, raw: Option<&AccessLogFile>) -> AccessLog {
    let settings = match raw {
        None => return AccessLog::Off,
        Some(AccessLogFile::Switch(s)) if s == "off" => return AccessLog::Off,
        Some(AccessLogFile::Switch(s)) => {
            c.problem(
                "access_log",
                format!(
                    "`{s}` is neither `off` nor a mapping like `{{ format: json, path: stdout }}`"
                ),
            );
            return AccessLog::Off;
        }
        Some(AccessLogFile::Settings(s)) => s,
    };
    let format = match settings.format.as_deref().unwrap_or("json") {
        "json" => AccessLogFormat::Json,
        "combined" => AccessLogFormat::Combined,
        other => {
            c.problem(
                "access_log.format",
                format!("`{other}` is not a format: use `json` or `combined`"),
            );
            AccessLogFormat::Json
        }
    };
    let destination = match settings.path.as_deref().unwrap_or("stdout") {
        "stdout" => LogDestination::Stdout,
        "stderr" => LogDestination::Stderr,
        "" => {
            c.problem(
                "access_log.path",
                "must be `stdout`, `stderr` or a file path",
            );
            LogDestination::Stdout
        }
        file => LogDestination::File(c.base_dir.join(file)),
    };
    AccessLog::On {
        format,
        destination,
    }
}

fn check_client_ip(c: &mut Checker, raw: Option<&ClientIpFile>) -> ClientIp {
    let Some(raw) = raw else {
        return ClientIp::default();
    };
    let header = raw
        .header
        .as_deref()
        .and_then(|h| c.header_name("client_ip.header", h));
    let trusted = check_nets(c, "client_ip.trusted", &raw.trusted);
    if header.is_some() && trusted.is_empty() {
        c.warnings.push(
            "client_ip.header is set but client_ip.trusted is empty: the header is never believed"
                .into(),
        );
    }
    let forward = match raw.forward.as_deref().map(str::trim) {
        None | Some("append") => XffMode::Append,
        Some("replace") => XffMode::Replace,
        Some("preserve") => XffMode::Preserve,
        Some(other) => {
            c.problem(
                "client_ip.forward",
                format!("`{other}` is not a mode: use append, replace or preserve"),
            );
            XffMode::Append
        }
    };
    ClientIp {
        header,
        trusted,
        forward,
    }
}

/// A list of CIDRs or addresses (`10.0.0.0/8`, `192.0.2.7`).
fn check_nets(c: &mut Checker, path: &str, raw: &[String]) -> Vec<IpNet> {
    let mut nets = Vec::new();
    for (i, t) in raw.iter().enumerate() {
        let t = t.trim();
        let parsed = t
            .parse::<IpNet>()
            .or_else(|_| t.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => nets.push(net.trunc()),
            Err(_) => c.problem(
                format!("{path}[{i}]"),
                format!("`{t}` is not a CIDR (e.g. `10.0.0.0/8`) or an IP address"),
            ),
        }
    }
    nets
}

/// The route's valid hosts (with their index in `hosts`), and the route if it
/// has no problem at all.
fn check_route(
    c: &mut Checker,
    path: &str,
    r: &RouteFile,
    all: &[RouteFile],
) -> (Vec<(usize, HostPattern)>, Option<RouteConfig>) {
    let before = c.problems.len();
    if r.name.trim().is_empty() {
        c.problem(format!("{path}.name"), "must not be empty");
    }
    if r.hosts.is_empty() {
        c.problem(
            format!("{path}.hosts"),
            "a route needs at least one host (e.g. `cdn.example.com` or `*.example.com`)",
        );
    }
    let mut hosts: Vec<(usize, HostPattern)> = Vec::new();
    for (j, h) in r.hosts.iter().enumerate() {
        match parse_host_pattern(h) {
            Ok(p) if hosts.iter().any(|(_, seen)| *seen == p) => c.problem(
                format!("{path}.hosts[{j}]"),
                format!("host `{p}` is listed twice"),
            ),
            Ok(p) => hosts.push((j, p)),
            Err(why) => c.problem(format!("{path}.hosts[{j}]"), why),
        }
    }
    let sticky = match r.sticky.as_deref() {
        None | Some("client_ip") => Sticky::ClientIp,
        Some("none") => Sticky::None,
        Some(other) => {
            c.problem(
                format!("{path}.sticky"),
                format!("`{other}` is not a stickiness: use `client_ip` or `none`"),
            );
            Sticky::None
        }
    };
    if let Some(canary) = &r.canary {
        if !canary.starts_with('/') {
            c.problem(
                format!("{path}.canary"),
                format!("`{canary}` must be a path starting with `/`"),
            );
        }
    }
    let request_headers = check_header_edits(
        c,
        &format!("{path}.request_headers"),
        &r.request_headers,
        true,
    );
    let response_headers = check_header_edits(
        c,
        &format!("{path}.response_headers"),
        &r.response_headers,
        false,
    );
    let rewrite_response = match r.rewrite_response.as_deref().map(str::trim) {
        None | Some("rewrite") => RewriteMode::Rewrite,
        Some("detect") => RewriteMode::Detect,
        Some("off") => RewriteMode::Off,
        Some(other) => {
            c.problem(
                format!("{path}.rewrite_response"),
                format!("`{other}` is not a mode: use rewrite, detect or off"),
            );
            RewriteMode::Rewrite
        }
    };
    let mut rewrite_names = Vec::new();
    for (j, n) in r.rewrite_names.iter().enumerate() {
        match parse_host_pattern(n) {
            Ok(HostPattern::Exact(h)) => rewrite_names.push(h),
            _ => c.problem(
                format!("{path}.rewrite_names[{j}]"),
                format!("`{n}` is not a host name (write e.g. `assets-new.example.com`; no wildcards, ports or URLs)"),
            ),
        }
    }

    if r.upstreams.is_empty() {
        c.problem(
            format!("{path}.upstreams"),
            "a route needs at least one upstream",
        );
    }
    let mut names = HashSet::new();
    let mut upstreams = Vec::new();
    for (k, u) in r.upstreams.iter().enumerate() {
        let upath = format!("{path}.upstreams[{k}]");
        if !names.insert(u.name.as_str()) {
            c.problem(
                format!("{upath}.name"),
                format!("upstream name `{}` is used twice in this route", u.name),
            );
        }
        if let Some(up) = check_upstream(c, &upath, &r.name, u) {
            upstreams.push(up);
        }
    }
    if !upstreams.is_empty()
        && upstreams.len() == r.upstreams.len()
        && upstreams.iter().all(|u| u.weight == 0 || u.backup)
        && !upstreams.iter().any(|u| u.backup)
    {
        c.problem(
            format!("{path}.upstreams"),
            "every upstream has weight 0 and none is a backup: the route could serve nothing",
        );
    }
    if upstreams.iter().all(|u| u.backup) && !upstreams.is_empty() {
        c.problem(
            format!("{path}.upstreams"),
            "every upstream is a backup: at least one must take traffic normally",
        );
    }

    let rollout = r
        .rollout
        .as_ref()
        .and_then(|ro| super::rollout::check_rollout(c, &format!("{path}.rollout"), ro, r, all));

    let route = (c.problems.len() == before).then(|| RouteConfig {
        name: r.name.trim().to_string(),
        hosts: hosts.iter().map(|(_, h)| h.clone()).collect(),
        sticky,
        canary: r.canary.clone(),
        request_headers,
        response_headers,
        rewrite_response,
        rewrite_names,
        upstreams,
        rollout,
    });
    (hosts, route)
}

/// Lower-case and check a host pattern; `*.` is allowed only as the whole first label.
pub fn parse_host_pattern(raw: &str) -> Result<HostPattern, String> {
    let h = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    if let Some(rest) = h.strip_prefix("*.") {
        if is_dns_name(rest) && rest.contains('.') {
            return Ok(HostPattern::Wildcard(format!(".{rest}")));
        }
        return Err(format!(
            "`{raw}` is not a valid wildcard: write `*.example.com` (a `*` only as the first label, above a domain)"
        ));
    }
    if is_dns_name(&h) {
        Ok(HostPattern::Exact(h))
    } else {
        Err(format!(
            "`{raw}` is not a host name (letters, digits, `-` and `.`; no port, scheme or path)"
        ))
    }
}

fn is_dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Why a header edit may not name a framing or hop-by-hop field.
const CARRIER_FIELD: &str = "this field frames the message or belongs to one connection \
     (Content-Length, Transfer-Encoding, Connection, Keep-Alive, TE, Trailer, Upgrade, \
     Proxy-*): cutover sets it on each hop itself; remove this edit";

fn check_header_edits(
    c: &mut Checker,
    path: &str,
    raw: &HeaderEditsFile,
    is_request: bool,
) -> HeaderEdits {
    let mut out = HeaderEdits::default();
    for (name, value) in &raw.set {
        let key = format!("{path}.set.{name}");
        let Some(n) = c.header_name(&key, name) else {
            continue;
        };
        if is_request && n == http::header::HOST {
            c.problem(
                key,
                "set the upstream Host with the upstream's `host_header`",
            );
            continue;
        }
        if crate::policy::fields::carrier_field(n.as_str().as_bytes()) {
            c.problem(key, CARRIER_FIELD);
            continue;
        }
        match HeaderValue::from_str(value) {
            Ok(v) => out.set.push((n, v)),
            Err(_) => c.problem(key, "value has characters not allowed in a header"),
        }
    }
    for (i, name) in raw.remove.iter().enumerate() {
        let key = format!("{path}.remove[{i}]");
        if let Some(n) = c.header_name(&key, name) {
            if is_request && n == http::header::HOST {
                c.problem(key, "Host cannot be removed: HTTP/1.1 requires it");
                continue;
            }
            if crate::policy::fields::carrier_field(n.as_str().as_bytes()) {
                c.problem(key, CARRIER_FIELD);
                continue;
            }
            out.remove.push(n);
        }
    }
    out
}

/// Split `host:port` (IPv6 in brackets); the port defaults from the scheme.
fn split_address(text: &str, tls: bool) -> Result<(String, u16, Option<IpAddr>), String> {
    let text = text.trim();
    let default_port = if tls { 443 } else { 80 };
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port(), Some(sa.ip())));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((ip.to_string(), default_port, Some(ip)));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))?;
            (h, port)
        }
        None => (text, default_port),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if !is_dns_name(&host) {
        return Err(format!(
            "`{text}` is not `name:port` or `ip:port` (e.g. `d-new.cloudfront.net:443`)"
        ));
    }
    Ok((host, port, None))
}

fn check_weight(c: &mut Checker, path: &str, raw: Option<&serde_yaml::Value>) -> u32 {
    let Some(v) = raw else { return 1 };
    match v.as_u64() {
        Some(w) if w <= MAX_WEIGHT => w as u32,
        _ => {
            let shown = serde_yaml::to_string(v).unwrap_or_default();
            c.problem(
                path,
                format!(
                    "`{}` is not a weight: use a whole number from 0 to {MAX_WEIGHT}",
                    shown.trim()
                ),
            );
            0
        }
    }
}

fn check_upstream(
    c: &mut Checker,
    path: &str,
    route: &str,
    u: &UpstreamFile,
) -> Option<UpstreamConfig> {
    let before = c.problems.len();
    if u.name.trim().is_empty() {
        c.problem(format!("{path}.name"), "must not be empty");
    }
    let tls = u.tls.unwrap_or(true);
    let verify = u.verify.unwrap_or(true);
    let address = split_address(&u.address, tls)
        .map_err(|why| c.problem(format!("{path}.address"), why))
        .ok();

    let host_header = u.host_header.as_deref().and_then(|h| {
        let value = HeaderValue::from_str(h.trim()).ok();
        let authority_ok = h.trim().parse::<http::uri::Authority>().is_ok();
        if value.is_none() || !authority_ok || h.contains('@') {
            c.problem(
                format!("{path}.host_header"),
                format!("`{h}` is not a host name (optionally with `:port`)"),
            );
        }
        value
    });

    let sni = match (&u.sni, &u.host_header, &address) {
        (Some(sni), ..) => {
            let s = sni.trim().trim_end_matches('.').to_ascii_lowercase();
            if !is_dns_name(&s) {
                c.problem(format!("{path}.sni"), format!("`{sni}` is not a DNS name"));
            }
            s
        }
        (None, Some(h), _) => {
            // The Host may carry a port; the certificate name does not.
            let h = h.trim();
            let name = h.rsplit_once(':').map_or(h, |(n, _)| n);
            name.trim_end_matches('.').to_ascii_lowercase()
        }
        (None, None, Some((host, _, None))) => host.clone(),
        _ => String::new(),
    };
    if tls && verify && sni.is_empty() && address.is_some() {
        c.problem(
            format!("{path}.sni"),
            "the address is an IP: set `sni` (or `host_header`) to the name its certificate is for",
        );
    }
    if tls && !verify {
        c.warnings.push(format!(
            "{path} ({route}/{}): verify: false, the upstream certificate is NOT checked",
            u.name
        ));
    }

    let (ca_file, ca) = match &u.ca_file {
        None => (None, None),
        Some(f) => {
            let key = format!("{path}.ca_file");
            match c.readable_file(&key, f) {
                None => (None, None),
                Some(file) => {
                    let certs = std::fs::read(&file)
                        .ok()
                        .and_then(|pem| X509::stack_from_pem(&pem).ok())
                        .filter(|certs| !certs.is_empty());
                    match certs {
                        Some(certs) => (Some(file), Some(Arc::new(certs.into_boxed_slice()))),
                        None => {
                            c.problem(
                                key,
                                format!("`{}` holds no PEM certificate", file.display()),
                            );
                            (None, None)
                        }
                    }
                }
            }
        }
    };
    if ca_file.is_some() && !tls {
        c.warnings
            .push(format!("{path}.ca_file is ignored: tls is false"));
    }

    let weight = check_weight(c, &format!("{path}.weight"), u.weight.as_ref());
    if let Some(marker) = &u.expect_body {
        if marker.is_empty() {
            c.problem(format!("{path}.expect_body"), "must not be empty");
        }
    }
    let expect_header = u.expect_header.as_ref().and_then(|e| {
        let name = c.header_name(&format!("{path}.expect_header.name"), &e.name);
        let value = match HeaderValue::from_str(e.value.trim()) {
            Ok(v) if !v.is_empty() => Some(v),
            _ => {
                c.problem(
                    format!("{path}.expect_header.value"),
                    format!("`{}` is not a non-empty header value", e.value),
                );
                None
            }
        };
        Some((name?, value?))
    });
    let health_check = u.health_check.as_ref().map(|h| {
        let hpath = format!("{path}.health_check");
        let check_path = h.path.clone().unwrap_or_else(|| "/".into());
        if !check_path.starts_with('/') {
            c.problem(
                format!("{hpath}.path"),
                format!("`{check_path}` must start with `/`"),
            );
        }
        let interval = c.duration(
            &format!("{hpath}.interval"),
            h.interval.as_deref(),
            Duration::from_secs(5),
        );
        let timeout = c.duration(
            &format!("{hpath}.timeout"),
            h.timeout.as_deref(),
            Duration::from_secs(2),
        );
        if timeout > interval {
            c.problem(
                format!("{hpath}.timeout"),
                "must not be longer than the interval",
            );
        }
        let expect_status = h.expect_status.unwrap_or(200);
        if !(100..=599).contains(&expect_status) {
            c.problem(
                format!("{hpath}.expect_status"),
                format!("{expect_status} is not an HTTP status"),
            );
        }
        HealthCheck {
            path: check_path,
            interval,
            timeout,
            expect_status,
        }
    });
    let defaults = Timeouts::default();
    let t = &u.timeouts;
    let tpath = format!("{path}.timeouts");
    let timeouts = Timeouts {
        connect: c.duration(
            &format!("{tpath}.connect"),
            t.connect.as_deref(),
            defaults.connect,
        ),
        read: c.duration(&format!("{tpath}.read"), t.read.as_deref(), defaults.read),
        write: c.duration(
            &format!("{tpath}.write"),
            t.write.as_deref(),
            defaults.write,
        ),
        idle: c.duration(&format!("{tpath}.idle"), t.idle.as_deref(), defaults.idle),
    };

    let address_family = match u.address_family.as_deref().map(str::trim) {
        None | Some("auto") => AddressFamily::Auto,
        Some("ipv4") => AddressFamily::Ipv4,
        Some("ipv6") => AddressFamily::Ipv6,
        Some(other) => {
            c.problem(
                format!("{path}.address_family"),
                format!("`{other}` is not an address family: use auto, ipv4 or ipv6"),
            );
            AddressFamily::Auto
        }
    };
    if let Some((_, _, Some(ip))) = &address {
        if !address_family.admits(*ip) {
            c.problem(
                format!("{path}.address_family"),
                format!(
                    "is {} but the address {ip} is not: drop one of them",
                    address_family.label()
                ),
            );
        }
    }

    let (host, port, ip) = address?;
    (c.problems.len() == before).then(|| UpstreamConfig {
        name: u.name.trim().to_string(),
        host,
        port,
        ip,
        tls,
        host_header,
        sni,
        verify,
        ca_file,
        ca,
        weight,
        backup: u.backup.unwrap_or(false),
        expect_body: u.expect_body.clone(),
        expect_header,
        address_family,
        health_check,
        timeouts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        assert_eq!(
            parse_host_pattern("CDN.Example.com."),
            Ok(HostPattern::Exact("cdn.example.com".into()))
        );
        assert_eq!(
            parse_host_pattern("*.example.com"),
            Ok(HostPattern::Wildcard(".example.com".into()))
        );
        assert!(parse_host_pattern("a.*.example.com").is_err());
        assert!(parse_host_pattern("*.com").is_err());
        assert!(parse_host_pattern("cdn.example.com:443").is_err());
        assert!(parse_host_pattern("http://x").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            split_address("d.cloudfront.net:443", true),
            Ok(("d.cloudfront.net".into(), 443, None))
        );
        assert_eq!(
            split_address("d.cloudfront.net", false),
            Ok(("d.cloudfront.net".into(), 80, None))
        );
        let (_, port, ip) = split_address("[::1]:8443", true).unwrap();
        assert_eq!((port, ip), (8443, Some("::1".parse().unwrap())));
        assert!(split_address("d.cloudfront.net:0", true).is_err());
        assert!(split_address("d.cloudfront.net:https", true).is_err());
        assert!(split_address("http://d.cloudfront.net", true).is_err());
    }
}

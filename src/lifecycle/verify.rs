//! `cutover verify`: prove where each path lands, by the canary markers.
//!
//! For every route with a `canary`, the canary is requested three ways:
//! the way the public reaches it (the public name, by DNS or `--resolve`, over
//! TLS with SNI and Host = that name), through the proxy, and from each
//! upstream directly with its own SNI, Host and CA. Each body is matched
//! against the upstreams' `expect_body` markers. The checks are the ones that
//! caught the CloudFront trap in the first place: DNS pointing at the new path
//! while the old distribution still owns the name and still answers.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{Config, HostPattern, RouteConfig, UpstreamConfig};
use crate::model::dns::Resolver;
use crate::shift::probe::{self, Reply, Target, TlsTarget};

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct VerifyOptions {
    pub proxy: Option<SocketAddr>,
    /// `--resolve NAME=ADDR:PORT`: where the public name's requests go instead of DNS.
    pub resolve: HashMap<String, SocketAddr>,
    /// Resolve upstream names like the proxy does (see [`crate::model::dns`]).
    pub hosts_file: Option<PathBuf>,
}

/// The report to print, and whether every path landed where the config says.
pub struct Outcome {
    pub report: String,
    pub ok: bool,
}

struct Row {
    path: String,
    status: String,
    marker: String,
    upstream: String,
    remote: String,
}

/// Which upstream a body identifies, by its marker.
fn identify<'a>(route: &'a RouteConfig, body: &str) -> Option<&'a UpstreamConfig> {
    route
        .upstreams
        .iter()
        .find(|u| u.expect_body.as_deref().is_some_and(|m| body.contains(m)))
}

fn weighted(u: &UpstreamConfig) -> bool {
    u.weight > 0 && !u.backup
}

/// The default proxy address: the first plain listener, wildcard → loopback.
fn default_proxy(config: &Config) -> Option<SocketAddr> {
    let l = config.listeners.iter().find(|l| l.tls.is_none())?;
    let mut a = l.address;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Some(a)
}

pub async fn verify(config: &Config, opts: &VerifyOptions) -> Outcome {
    let ca_files: Vec<PathBuf> = config
        .routes
        .iter()
        .flat_map(|r| r.upstreams.iter().filter_map(|u| u.ca_file.clone()))
        .collect();
    let resolver = Resolver::new(opts.hosts_file.clone());
    let entries: Vec<_> = config
        .routes
        .iter()
        .flat_map(|r| &r.upstreams)
        .filter(|u| u.ip.is_none())
        .map(|u| resolver.entry(&u.host, u.port, u.address_family))
        .collect();
    resolver.refresh(false).await;
    let proxy = opts.proxy.or_else(|| default_proxy(config));

    let mut out = String::new();
    let mut problems: Vec<String> = Vec::new();
    let mut checked = 0;
    for route in &config.routes {
        let Some(canary) = &route.canary else {
            let _ = writeln!(out, "route {}: no canary path, skipped", route.name);
            continue;
        };
        for host in &route.hosts {
            let HostPattern::Exact(name) = host else {
                let _ = writeln!(
                    out,
                    "route {}: {host} is a wildcard, skipped (verify needs a concrete name)",
                    route.name
                );
                continue;
            };
            checked += 1;
            let _ = writeln!(out, "\nroute {}, host {name}, canary {canary}", route.name);
            let mut rows = Vec::new();

            // (a) the public path.
            let public = match opts.resolve.get(name) {
                Some(addr) => Ok(*addr),
                None => tokio::net::lookup_host((name.as_str(), 443))
                    .await
                    .map_err(|e| format!("cannot resolve {name}: {e}"))
                    .and_then(|mut a| {
                        a.next()
                            .ok_or_else(|| format!("{name} resolves to no address"))
                    }),
            };
            let public_target = public.map(|addr| Target {
                connect: addr,
                tls: Some(TlsTarget {
                    sni: name.clone(),
                    ca_files: ca_files.clone(),
                    system_roots: true,
                    verify: true,
                }),
                host: name.clone(),
                path: canary.clone(),
            });
            let label = format!("public  https://{name}{canary}");
            match probe_row(route, label, public_target).await {
                Ok((row, answered_by)) => {
                    match answered_by {
                        Some(u) if !weighted(u) => problems.push(format!(
                            "the public name {name} is served by `{}`, which this config gives no weight: DNS sends {name} to {}, and that distribution still owns the name (the CloudFront trap). Move the name, or point DNS at cutover",
                            u.name, row.remote
                        )),
                        Some(_) => {}
                        None => problems.push(format!(
                            "the public name {name} answered {canary} without any configured marker ({})",
                            row.marker
                        )),
                    }
                    rows.push(row);
                }
                Err((row, why)) => {
                    problems.push(format!(
                        "the public name {name} could not be checked: {why}"
                    ));
                    rows.push(row);
                }
            }

            // (b) through the proxy.
            let proxy_target = proxy
                .ok_or_else(|| "no plain listener in the config; pass --proxy ADDR".to_string())
                .map(|addr| Target {
                    connect: addr,
                    tls: None,
                    host: name.clone(),
                    path: canary.clone(),
                });
            let label = format!(
                "proxy   http://{}{canary}",
                proxy.map_or("-".into(), |p| p.to_string())
            );
            match probe_row(route, label, proxy_target).await {
                Ok((row, Some(u))) if weighted(u) => rows.push(row),
                Ok((row, answered_by)) => {
                    problems.push(format!(
                        "through the proxy, {name} reached {} instead of an upstream with weight",
                        answered_by
                            .map_or("no known upstream".to_string(), |u| format!("`{}`", u.name))
                    ));
                    rows.push(row);
                }
                Err((row, why)) => {
                    problems.push(format!("the proxy path could not be checked: {why} (is cutover running? pass --proxy ADDR)"));
                    rows.push(row);
                }
            }

            // (c) each upstream directly.
            for u in &route.upstreams {
                let host_header = u
                    .host_header
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or(name)
                    .to_string();
                let addr = match u.ip {
                    Some(ip) => Some(SocketAddr::new(ip, u.port)),
                    None => entries
                        .iter()
                        .find(|e| e.host == u.host && e.port == u.port)
                        .and_then(|e| e.pick()),
                };
                let target = addr
                    .ok_or_else(|| format!("{}:{} does not resolve", u.host, u.port))
                    .map(|addr| Target {
                        connect: addr,
                        tls: u.tls.then(|| TlsTarget {
                            sni: u.sni.clone(),
                            ca_files: u.ca_file.iter().cloned().collect(),
                            system_roots: u.ca_file.is_none(),
                            verify: u.verify,
                        }),
                        host: host_header.clone(),
                        path: canary.clone(),
                    });
                let label = format!(
                    "direct  {} (SNI {}, Host {host_header})",
                    u.name,
                    if u.tls { u.sni.as_str() } else { "-" }
                );
                match probe_row(route, label, target).await {
                    Ok((row, answered_by)) => {
                        if row.status == "421" {
                            problems.push(format!(
                                "upstream `{}`: SNI {} and Host {host_header} lead to different distributions (421 Misdirected Request)",
                                u.name, u.sni
                            ));
                        } else if u.expect_body.is_none() {
                            let _ = writeln!(out, "  note: upstream `{}` has no expect_body; its answers cannot be identified", u.name);
                        } else {
                            match answered_by {
                                Some(v) if v.name == u.name => {}
                                Some(v) => problems.push(format!(
                                    "upstream `{}` answered with `{}`'s marker: its SNI {} / Host {host_header} reach another distribution",
                                    u.name, v.name, u.sni
                                )),
                                None => problems.push(format!(
                                    "upstream `{}` answered without its marker {:?} ({}): wrong expect_body, or the wrong content is deployed",
                                    u.name,
                                    u.expect_body.as_deref().unwrap_or(""),
                                    row.marker
                                )),
                            }
                        }
                        rows.push(row);
                    }
                    Err((row, why)) => {
                        problems.push(format!("upstream `{}` could not be checked: {why}", u.name));
                        rows.push(row);
                    }
                }
            }
            out.push_str(&table(&rows));
        }
    }
    if checked == 0 {
        problems.push("no route has a canary path and a concrete host: nothing to verify".into());
    }
    if problems.is_empty() {
        out.push_str("\nOK: every path lands where the config says it should.\n");
    } else {
        let _ = writeln!(out, "\nFAIL: {} problem(s):", problems.len());
        for p in &problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    Outcome {
        report: out,
        ok: problems.is_empty(),
    }
}

type ProbeResult<'a> = Result<(Row, Option<&'a UpstreamConfig>), (Row, String)>;

async fn probe_row<'a>(
    route: &'a RouteConfig,
    path: String,
    target: Result<Target, String>,
) -> ProbeResult<'a> {
    let failed = |path: String, why: String| {
        (
            Row {
                path,
                status: "error".into(),
                marker: "-".into(),
                upstream: "-".into(),
                remote: "-".into(),
            },
            why,
        )
    };
    let target = target.map_err(|why| failed(path.clone(), why))?;
    let reply: Reply = probe::get(&target, TIMEOUT)
        .await
        .map_err(|e| failed(path.clone(), format!("{e:#}")))?;
    let body = reply.body_text();
    let answered_by = identify(route, &body);
    let first_line: String = body.lines().next().unwrap_or("").chars().take(40).collect();
    Ok((
        Row {
            path,
            status: reply.status.as_u16().to_string(),
            marker: answered_by
                .and_then(|u| u.expect_body.clone())
                .unwrap_or_else(|| format!("none: {first_line:?}")),
            upstream: answered_by.map_or("-".into(), |u| u.name.clone()),
            remote: reply.remote.to_string(),
        },
        answered_by,
    ))
}

fn table(rows: &[Row]) -> String {
    let header = Row {
        path: "path".into(),
        status: "status".into(),
        marker: "marker".into(),
        upstream: "upstream".into(),
        remote: "remote".into(),
    };
    let all: Vec<&Row> = std::iter::once(&header).chain(rows).collect();
    let w = |f: fn(&Row) -> &str| all.iter().map(|r| f(r).chars().count()).max().unwrap_or(0);
    let (wp, ws, wm, wu) = (
        w(|r| &r.path),
        w(|r| &r.status),
        w(|r| &r.marker),
        w(|r| &r.upstream),
    );
    let mut s = String::new();
    for r in all {
        let _ = writeln!(
            s,
            "  {:<wp$}  {:<ws$}  {:<wm$}  {:<wu$}  {}",
            r.path, r.status, r.marker, r.upstream, r.remote
        );
    }
    s
}

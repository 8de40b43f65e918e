//! `cutover demo`: the CloudFront trap and its fix, offline, on loopback.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::edge::{AddressMode, Distribution, Edge};
use super::pki::TestCa;
use crate::shift::probe::{self, Target, TlsTarget};

pub const PUBLIC_NAME: &str = "cdn.example.test";
pub const NEW_NAME: &str = "cdn-new.example.test";
pub const OLD_DIST: &str = "d-old.cloudfront.test";
pub const NEW_DIST: &str = "d-new.cloudfront.test";
/// The new distribution's second address, dead in the demo.
const DEAD_ADDRESS: &str = "127.0.0.2:0";
/// Requests the demo sends through cutover to show the dead address.
const THROUGH: usize = 20;

/// The two distributions of the rehearsal: the old one still owns the public name.
pub fn distributions() -> Vec<Distribution> {
    vec![
        Distribution::new("d-old", OLD_DIST, &[PUBLIC_NAME], "ok-old-cdn"),
        Distribution::new("d-new", NEW_DIST, &[NEW_NAME], "ok-new-cdn"),
    ]
}

/// Port `preferred` on loopback if free, else any free port.
fn loopback_port(preferred: u16) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| TcpListener::bind(("127.0.0.1", 0)))
        .context("no free loopback port")?;
    Ok(l.local_addr()?)
}

fn demo_config(
    dir: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    edge: SocketAddr,
    ca: &Path,
) -> String {
    let port = edge.port();
    format!(
        r#"# Written by `cutover demo`: the proxy in front of the rehearsal edge.
phase: demo
listeners:
  - address: {listen}
admin:
  address: {admin}
server:
  threads: 1
  grace_period: 1s
  graceful_shutdown_timeout: 1s
  upgrade_sock: {dir}/upgrade.sock
  pid_file: {dir}/cutover.pid
dns_refresh: 5s
routes:
  - name: cdn
    hosts: [{PUBLIC_NAME}]
    canary: /ruok
    upstreams:
      - name: new-cloudfront
        address: {NEW_DIST}:{port}
        host_header: {NEW_NAME}
        ca_file: {ca}
        weight: 100
        expect_body: ok-new-cdn
      - name: old-cloudfront
        address: {OLD_DIST}:{port}
        sni: {PUBLIC_NAME}
        ca_file: {ca}
        weight: 0
        backup: true
        expect_body: ok-old-cdn
"#,
        dir = dir.display(),
        ca = ca.display(),
    )
}

pub fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cutover-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = TestCa::new("cutover demo CA")?;
    let ca_path = ca.write_cert(&dir)?;

    let edge_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // The new distribution's name has two addresses, as CloudFront names
    // have several; the second one is dead (refuses connections), and
    // cutover routes around it without touching the old distribution.
    let binds: [SocketAddr; 2] = ["127.0.0.1:0".parse()?, DEAD_ADDRESS.parse()?];
    let edge = edge_rt.block_on(Edge::start_on(&binds, &ca, distributions()))?;
    let edge_addr = edge.addr();
    let dead = SocketAddr::new(DEAD_ADDRESS.parse::<SocketAddr>()?.ip(), edge_addr.port());
    edge_rt.block_on(edge.set_mode(dead, AddressMode::Refuse))?;

    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1 {OLD_DIST} {NEW_DIST}\n{} {NEW_DIST}\n",
            dead.ip()
        ),
    )?;
    let listen = loopback_port(8080)?;
    let admin = loopback_port(9091)?;
    let config_path = dir.join("cutover.yaml");
    std::fs::write(
        &config_path,
        demo_config(&dir, listen, admin, edge_addr, &ca_path),
    )?;
    let config = crate::config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;

    let handle = edge_rt.handle().clone();
    let ca_for_probe = ca_path.clone();
    let dir_for_probe = dir.clone();
    let config_for_probe = config_path.clone();
    std::thread::spawn(move || {
        let report = handle.block_on(rehearse(listen, admin, edge_addr, &ca_for_probe));
        match report {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("demo: probing failed: {e:#}"),
        }
        println!(
            "Try it yourself (files in {dir}):\n\
             \x20 # the DNS flip: the public name at the edge, old distribution answers\n\
             \x20 curl --cacert {ca} --resolve {PUBLIC_NAME}:{port}:127.0.0.1 https://{PUBLIC_NAME}:{port}/ruok\n\
             \x20 # through cutover: the new distribution answers\n\
             \x20 curl -H 'Host: {PUBLIC_NAME}' http://{listen}/ruok\n\
             \x20 curl http://{admin}/metrics | grep cutover_requests_total\n\
             \x20 cutover check --config {config}\n\
             Serving until Ctrl-C.",
            dir = dir_for_probe.display(),
            ca = ca_for_probe.display(),
            port = edge_addr.port(),
            config = config_for_probe.display(),
        );
    });

    let opts = crate::lifecycle::server::RunOptions {
        config_path,
        config_url: None,
        upgrade: false,
        hosts_file: Some(hosts),
        exe: std::env::current_exe()?,
    };
    let result = crate::lifecycle::server::run(crate::config::Loaded::Whole(config), opts);
    drop(edge);
    edge_rt.shutdown_timeout(Duration::from_secs(1));
    // The rehearsal's CA, config and hosts file are throwaway.
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn wait_for_listener(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("cutover did not start listening on {addr}")
}

struct Row {
    label: &'static str,
    how: String,
    outcome: String,
    marker: Option<String>,
}

async fn probe_row(label: &'static str, how: String, target: Target) -> Row {
    match probe::get(&target, Duration::from_secs(5)).await {
        Ok(r) => {
            let dist = r
                .headers
                .get("x-edge-distribution")
                .and_then(|v| v.to_str().ok())
                .filter(|d| !d.is_empty())
                .map_or("refused by the edge".to_string(), |d| {
                    format!("served by {d}")
                });
            let body = r.body_text();
            // An edge-made page: its explanation, after the rule.
            let text = body.find("<HR>").map_or(body.as_str(), |i| &body[i + 4..]);
            let first_line = text.lines().next().unwrap_or("").to_string();
            Row {
                label,
                how,
                outcome: format!("{} {first_line}  ({dist})", r.status.as_u16()),
                marker: Some(first_line),
            }
        }
        Err(e) => Row {
            label,
            how,
            outcome: format!("failed: {e:#}"),
            marker: None,
        },
    }
}

/// Ask the same question three ways and say who answered.
async fn rehearse(
    listen: SocketAddr,
    admin: SocketAddr,
    edge: SocketAddr,
    ca: &Path,
) -> anyhow::Result<String> {
    wait_for_listener(listen).await?;
    let tls = |sni: &str| {
        Some(TlsTarget {
            sni: sni.into(),
            ca_files: vec![ca.to_path_buf()],
            system_roots: true,
            verify: true,
        })
    };
    let rows = vec![
        probe_row(
            "DNS flip",
            format!("{PUBLIC_NAME} CNAME {NEW_DIST} -> edge {edge}, SNI+Host {PUBLIC_NAME}"),
            Target {
                connect: edge,
                tls: tls(PUBLIC_NAME),
                host: PUBLIC_NAME.into(),
                path: "/ruok".into(),
            },
        )
        .await,
        probe_row(
            "Host-only rewrite",
            format!("SNI {PUBLIC_NAME}, Host {NEW_NAME}"),
            Target {
                connect: edge,
                tls: tls(PUBLIC_NAME),
                host: NEW_NAME.into(),
                path: "/ruok".into(),
            },
        )
        .await,
        probe_row(
            "cutover",
            format!("http://{listen} Host {PUBLIC_NAME} -> SNI+Host {NEW_NAME}"),
            Target {
                connect: listen,
                tls: None,
                host: PUBLIC_NAME.into(),
                path: "/ruok".into(),
            },
        )
        .await,
    ];
    let mut out = String::new();
    out.push_str(&format!(
        "\ncutover demo: moving {PUBLIC_NAME} from {OLD_DIST} to {NEW_DIST}\n\
         The edge at {edge} serves both distributions; {OLD_DIST} still owns {PUBLIC_NAME},\n\
         and CloudFront will not attach it to {NEW_DIST} while it does.\n\n"
    ));
    for r in &rows {
        out.push_str(&format!(
            "  {:<18} {:<70}\n  {:<18} -> {}\n",
            r.label, r.how, "", r.outcome
        ));
    }
    out.push_str(&dead_address_row(listen, admin, edge).await);
    let flip_old = rows[0].marker.as_deref() == Some("ok-old-cdn");
    let proxy_new = rows[2].marker.as_deref() == Some("ok-new-cdn");
    out.push_str(&format!(
        "\nverdict: {}\n",
        if flip_old && proxy_new {
            "the DNS flip still lands on the OLD distribution (ok-old-cdn); through cutover the NEW one answers (ok-new-cdn)."
        } else {
            "UNEXPECTED: the rehearsal did not show the trap and the fix; see the rows above."
        }
    ));
    out.push_str(&format!("metrics: http://{admin}/metrics\n"));
    Ok(out)
}

/// Requests through cutover while one address of the new distribution's
/// name refuses: who served them, and what the metrics say.
async fn dead_address_row(listen: SocketAddr, admin: SocketAddr, edge: SocketAddr) -> String {
    let mut served_new = 0;
    for _ in 0..THROUGH {
        let target = Target {
            connect: listen,
            tls: None,
            host: PUBLIC_NAME.into(),
            path: "/ruok".into(),
        };
        if let Ok(r) = probe::get(&target, Duration::from_secs(5)).await {
            served_new += usize::from(r.body_text().trim() == "ok-new-cdn");
        }
    }
    let metrics = probe::get(
        &Target {
            connect: admin,
            tls: None,
            host: "localhost".into(),
            path: "/metrics".into(),
        },
        Duration::from_secs(5),
    )
    .await
    .map(|r| r.body_text())
    .unwrap_or_default();
    let sum = |prefix: &str, needle: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(needle))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    let old = sum("cutover_requests_total{", "upstream=\"old-cloudfront\"");
    let ejections = sum(
        "cutover_upstream_address_ejections_total{",
        "new-cloudfront",
    );
    format!(
        "  {:<18} {:<70}\n  {:<18} -> {served_new} of {THROUGH} answered ok-new-cdn, {old} by old-cloudfront; \
         address ejections: {ejections}\n",
        "dead edge address",
        format!(
            "{NEW_DIST} -> 127.0.0.1 and {} (refuses)",
            DEAD_ADDRESS.replace(":0", &format!(":{}", edge.port()))
        ),
        ""
    )
}

//! The rollout autopilot against the rehearsal edge, with steps of a few
//! seconds: a healthy schedule completes on time with sticky clients only
//! moving forward; 5% 5xx from the new distribution rolls back within
//! `failure_limit` evaluations and every client returns; no traffic holds;
//! two processes step together and agree on every client; a fleet-wide
//! gate on a real Prometheus rolls two processes back, and an empty or
//! unreachable Prometheus holds.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use cutover::rehearsal::demo::{NEW_DIST, NEW_NAME, OLD_DIST, PUBLIC_NAME};

/// A start `lead` from now, on a whole second, as RFC 3339.
fn start_in(lead: Duration) -> (SystemTime, String) {
    let t = SystemTime::now() + lead;
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 1;
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    (t, humantime::format_rfc3339_seconds(t).to_string())
}

/// The migration route with a rollout from old to new; `rollout` is the
/// block's body (indented 6), `dir` the process's own directory.
fn rollout_yaml(bed: &Bed, dir: &Path, rollout: &str) -> String {
    let port = bed.edge.addr().port();
    let ca = bed.ca_path.display();
    format!(
        "phase: rollout\n\
         listeners:\n  - address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         server:\n  threads: 2\n  grace_period: 1s\n  graceful_shutdown_timeout: 5s\n  upgrade_sock: {dir}/upgrade.sock\n  pid_file: {dir}/cutover.pid\n\
         client_ip:\n  header: X-Forwarded-For\n  trusted: [127.0.0.1]\n\
         dns_refresh: 1s\n\
         routes:\n  - name: cdn\n    hosts: [{PUBLIC_NAME}]\n    sticky: client_ip\n    upstreams:\n\
         \x20     - name: old-cloudfront\n        address: {OLD_DIST}:{port}\n        sni: {PUBLIC_NAME}\n        ca_file: {ca}\n        expect_header: {{ name: x-edge-distribution, value: d-old }}\n\
         \x20     - name: new-cloudfront\n        address: {NEW_DIST}:{port}\n        host_header: {NEW_NAME}\n        ca_file: {ca}\n        expect_header: {{ name: x-edge-distribution, value: d-new }}\n\
         \x20   rollout:\n{rollout}",
        dir = dir.display()
    )
}

fn start_proxy(bed: &Bed, name: &str, rollout: &str) -> Proxy {
    let dir = bed.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = rollout_yaml(bed, &dir, rollout);
    Proxy::start(&dir, &yaml, Some(&bed.hosts_file))
}

/// The route's rollout as `/status` shows it.
async fn rollout_of(p: &Proxy) -> serde_json::Value {
    let r = p.admin_get("/status").await;
    let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    doc["routes"][0]["rollout"].clone()
}

/// One answer the load saw.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    client: u32,
    status: u16,
    distribution: String,
}

/// Keep-alive clients sending GETs for `clients` (by X-Forwarded-For)
/// round-robin until stopped; every answer recorded.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: u32, conns: u32, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..conns)
            .map(|c| {
                let (stop, seen) = (stop.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut client = Client::connect(addr).await.unwrap();
                    let mine: Vec<u32> = (0..clients).filter(|i| i % conns == c).collect();
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let i = mine[k % mine.len()];
                        k += 1;
                        let xff = client_addr(i);
                        match client
                            .get(PUBLIC_NAME, "/", &[("x-forwarded-for", &xff)])
                            .await
                        {
                            Ok(a) => seen.lock().unwrap().push(Seen {
                                at: Instant::now(),
                                client: i,
                                status: a.status,
                                distribution: a.distribution,
                            }),
                            Err(e) => panic!("request through cutover failed: {e:#}"),
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Load { stop, seen, tasks }
    }

    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

/// Poll `/status` until `done` says so; the instant it did.
async fn wait_for(
    p: &Proxy,
    limit: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        let ro = rollout_of(p).await;
        if done(&ro) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; rollout now:\n{ro:#}\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn instant_of(t: SystemTime) -> Instant {
    let now_sys = SystemTime::now();
    let now = Instant::now();
    match t.duration_since(now_sys) {
        Ok(ahead) => now + ahead,
        Err(e) => now - e.duration(),
    }
}

/// Each client's distributions in time order never go from new back to old.
fn assert_only_forward(seen: &[Seen]) {
    let mut on_new: HashMap<u32, Instant> = HashMap::new();
    for s in seen {
        match s.distribution.as_str() {
            "d-new" => {
                on_new.entry(s.client).or_insert(s.at);
            }
            "d-old" => {
                if let Some(t) = on_new.get(&s.client) {
                    panic!(
                        "client {} was on the new distribution at {t:?} and back on the old at {:?}",
                        s.client, s.at
                    );
                }
            }
            other => panic!("answer from {other:?}"),
        }
    }
}

fn cutover(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_traffic_completes_the_schedule_on_time_moving_clients_only_forward() {
    let bed = Bed::start().await;
    let (start, start_text) = start_in(Duration::from_secs(3));
    let proxy = start_proxy(
        &bed,
        "p",
        &format!(
            "      from: old-cloudfront\n      to: new-cloudfront\n      steps: [10, 50, 100]\n      hold: 4s\n      start: {start_text}\n\
             \x20     gates: {{ max_5xx_ratio: 0.01, max_p99: 1s, max_marker_mismatch_ratio: 0, max_connect_error_ratio: 0,\n\
             \x20              min_requests: 10, interval: 2s, window: 2s, failure_limit: 2 }}\n"
        ),
    );
    assert_eq!(rollout_of(&proxy).await["state"], "waiting");
    let load = Load::start(proxy.listen, 300, 4, Duration::from_millis(10));

    let start_i = instant_of(start);
    let mut reached = Vec::new();
    let mut mid = String::new();
    for step in 1..=3u64 {
        reached.push(
            wait_for(
                &proxy,
                Duration::from_secs(20),
                &format!("step {step}"),
                |ro| ro["step"].as_u64() >= Some(step),
            )
            .await,
        );
        if step == 2 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            mid = cutover(&["status", "--admin", &proxy.admin.to_string()]).1;
        }
    }
    let done = wait_for(&proxy, Duration::from_secs(10), "done", |ro| {
        ro["state"] == "done"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = load.stop().await;

    for (k, at) in reached.iter().chain([&done]).enumerate() {
        let want = start_i + Duration::from_secs(4 * k as u64);
        let off = if *at > want { *at - want } else { want - *at };
        assert!(
            off <= Duration::from_millis(1200),
            "step {} at {off:?} from its instant (seen {at:?}, scheduled {want:?})",
            k + 1
        );
    }
    assert!(seen.iter().all(|s| s.status == 200));
    assert_only_forward(&seen);
    // After done: everyone on the new distribution.
    let late: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.at > done + Duration::from_millis(300))
        .collect();
    assert!(!late.is_empty());
    assert!(late.iter().all(|s| s.distribution == "d-new"), "{late:?}");
    // While at 10%: about a tenth of the clients on new.
    let at_10: std::collections::HashSet<u32> = seen
        .iter()
        .filter(|s| s.at > reached[0] + Duration::from_millis(300) && s.at < reached[1])
        .filter(|s| s.distribution == "d-new")
        .map(|s| s.client)
        .collect();
    assert!(
        (10..=60).contains(&at_10.len()),
        "{} of 300 clients on new at 10%",
        at_10.len()
    );

    let m = proxy.metrics().await;
    assert_eq!(sample_sum(&m, "cutover_marker_mismatch_total"), 0.0);
    assert_eq!(
        sample(&m, "cutover_rollout_state", &[("state", "done")]),
        Some(1.0)
    );
    assert_eq!(sample(&m, "cutover_rollout_percent", &[]), Some(100.0));
    assert_eq!(
        sample(
            &m,
            "cutover_rollout_decisions_total",
            &[("decision", "rollback")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &m,
            "cutover_rollout_decisions_total",
            &[("decision", "advance")]
        ),
        Some(3.0)
    );
    let (ok, view) = cutover(&["status", "--admin", &proxy.admin.to_string()]);
    assert!(ok, "{view}");
    assert!(
        view.contains("rollout old-cloudfront → new-cloudfront: DONE"),
        "{view}"
    );
    assert!(view.contains("✔ 5xx_ratio"), "{view}");
    assert!(!view.contains('\x1b'), "colour only on a terminal:\n{view}");
    println!("{mid}\n{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_5xx_at_step_2_rolls_back_and_every_client_returns() {
    let bed = Bed::start().await;
    let (start, start_text) = start_in(Duration::from_secs(2));
    let interval = Duration::from_secs(2);
    let proxy = start_proxy(
        &bed,
        "p",
        &format!(
            "      from: old-cloudfront\n      to: new-cloudfront\n      steps: [10, 50, 100]\n      hold: 10s\n      start: {start_text}\n\
             \x20     gates: {{ max_5xx_ratio: 0.01, min_requests: 10, interval: 2s, window: 2s, failure_limit: 2 }}\n"
        ),
    );
    let load = Load::start(proxy.listen, 300, 4, Duration::from_millis(10));
    wait_for(&proxy, Duration::from_secs(20), "step 2", |ro| {
        ro["step"] == 2
    })
    .await;
    // Just after an evaluation, so the next window is all failures.
    let since = SystemTime::now().duration_since(start).unwrap();
    let next = start + interval * (since.as_nanos() / interval.as_nanos() + 1) as u32;
    tokio::time::sleep(
        next.duration_since(SystemTime::now()).unwrap() + Duration::from_millis(150),
    )
    .await;
    bed.edge.fail_every("d-new", 20);
    let injected = Instant::now();
    let rolled = wait_for(&proxy, Duration::from_secs(15), "rollback", |ro| {
        ro["state"] == "rolled_back"
    })
    .await;
    let took = rolled - injected;
    assert!(
        took <= 2 * interval + Duration::from_millis(800),
        "rolled back {took:?} after the failures began (failure_limit 2 × interval 2s)"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bed.edge.fail_every("d-new", 0);
    let seen = load.stop().await;
    let after: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.at > rolled + Duration::from_millis(300))
        .collect();
    assert!(
        after.len() > 100,
        "{} answers after the rollback",
        after.len()
    );
    assert!(
        after.iter().all(|s| s.distribution == "d-old"),
        "every client is back on the old distribution"
    );
    let before: std::collections::HashSet<u32> = seen
        .iter()
        .filter(|s| s.at < injected && s.distribution == "d-new")
        .map(|s| s.client)
        .collect();
    assert!(
        before.len() > 100,
        "{} clients were on new at 50%",
        before.len()
    );
    let ro = rollout_of(&proxy).await;
    assert_eq!(
        (ro["percent"].as_f64(), ro["step"].as_u64()),
        (Some(0.0), Some(0))
    );
    let log = proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains("rollout rollback: route=cdn"))
        .unwrap_or_else(|| panic!("no rollback line:\n{log}"));
    assert!(
        line.contains("5xx_ratio=") && line.contains("failures=2/2"),
        "{line}"
    );

    // It stays rolled back: no advance on the clock.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rollout_of(&proxy).await["state"], "rolled_back");
    // The operator resumes: the first step, then up by evaluations.
    let admin = proxy.admin.to_string();
    let (ok, out) = cutover(&["rollout", "resume", "cdn", "--admin", &admin]);
    assert!(ok, "{out}");
    wait_for(&proxy, Duration::from_secs(3), "resumed", |ro| {
        ro["state"] != "rolled_back" && ro["step"].as_u64() >= Some(1)
    })
    .await;
    let (ok, out) = cutover(&["rollout", "abort", "cdn", "--admin", &admin]);
    assert!(ok, "{out}");
    let ro = rollout_of(&proxy).await;
    assert_eq!(
        (ro["state"].as_str(), ro["percent"].as_f64()),
        (Some("aborted"), Some(0.0))
    );
    let (ok, out) = cutover(&["rollout", "resume", "cdn", "--admin", &admin]);
    assert!(!ok && out.contains("aborted"), "{out}");
    let (ok, out) = cutover(&["rollout", "resume", "nope", "--admin", &admin]);
    assert!(!ok && out.contains("no route `nope`"), "{out}");
    // A reload with the same schedule keeps the state; a new `start` is a
    // new rollout, joined afresh.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    write_atomically(
        &proxy.config_path,
        &text.replace("hold: 10s", "hold: 10s # same"),
    );
    proxy.signal(libc::SIGHUP);
    proxy
        .metrics_when(
            "cutover_config_reloads_total",
            &[("result", "success")],
            1.0,
        )
        .await;
    assert_eq!(rollout_of(&proxy).await["state"], "aborted");
    let (_, later) = start_in(Duration::from_secs(60));
    write_atomically(&proxy.config_path, &text.replace(&start_text, &later));
    proxy.signal(libc::SIGHUP);
    proxy
        .metrics_when(
            "cutover_config_reloads_total",
            &[("result", "success")],
            2.0,
        )
        .await;
    let ro = rollout_of(&proxy).await;
    assert_eq!(
        (ro["state"].as_str(), ro["percent"].as_f64()),
        (Some("waiting"), Some(0.0))
    );
    let m = proxy.metrics().await;
    for (d, n) in [("rollback", 1.0), ("resume", 1.0), ("abort", 1.0)] {
        assert_eq!(
            sample(&m, "cutover_rollout_decisions_total", &[("decision", d)]),
            Some(n),
            "{d}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_traffic_holds_at_the_first_step_then_catches_up_one_step_per_evaluation() {
    let bed = Bed::start().await;
    let (start, start_text) = start_in(Duration::from_secs(1));
    let proxy = start_proxy(
        &bed,
        "p",
        &format!(
            "      from: old-cloudfront\n      to: new-cloudfront\n      steps: [10, 50, 100]\n      hold: 1s\n      start: {start_text}\n\
             \x20     gates: {{ max_5xx_ratio: 0.01, min_requests: 5, interval: 1s, window: 1s }}\n"
        ),
    );
    let settle = instant_of(start) + Duration::from_secs(6);
    tokio::time::sleep(settle - Instant::now()).await;
    let ro = rollout_of(&proxy).await;
    assert_eq!(
        (
            ro["state"].as_str(),
            ro["step"].as_u64(),
            ro["failures"].as_u64()
        ),
        (Some("holding"), Some(1), Some(0)),
        "{ro:#}"
    );
    assert_eq!(ro["scheduled_done"], true);
    assert_eq!(ro["gates"][0]["verdict"], "no_data", "{ro:#}");
    let m = proxy.metrics().await;
    assert!(
        sample(
            &m,
            "cutover_rollout_decisions_total",
            &[("decision", "no_data")]
        ) >= Some(4.0)
    );
    assert_eq!(
        sample(
            &m,
            "cutover_rollout_decisions_total",
            &[("decision", "fail")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "cutover_rollout_state", &[("state", "holding")]),
        Some(1.0)
    );

    let load = Load::start(proxy.listen, 100, 2, Duration::from_millis(5));
    let caught_up = Instant::now();
    wait_for(&proxy, Duration::from_secs(10), "done", |ro| {
        ro["state"] == "done"
    })
    .await;
    // Three passing evaluations at least: 10% → 50% → 100% → done.
    assert!(
        caught_up.elapsed() >= Duration::from_secs(2),
        "{:?}",
        caught_up.elapsed()
    );
    let seen = load.stop().await;
    assert_only_forward(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_started_apart_step_together_and_agree_on_every_client() {
    let bed = Bed::start().await;
    let (start, start_text) = start_in(Duration::from_secs(2));
    let block = format!(
        "      from: old-cloudfront\n      to: new-cloudfront\n      steps: [5, 30, 100]\n      hold: 4s\n      start: {start_text}\n\
         \x20     gates: {{ max_5xx_ratio: 0.01, min_requests: 5, interval: 2s, window: 2s }}\n"
    );
    let a = start_proxy(&bed, "a", &block);
    let load_a = Load::start(a.listen, 200, 2, Duration::from_millis(5));
    // The second joins late, in the middle of the first step.
    tokio::time::sleep(instant_of(start) + Duration::from_millis(1500) - Instant::now()).await;
    let b = start_proxy(&bed, "b", &block);
    let load_b = Load::start(b.listen, 200, 2, Duration::from_millis(5));
    assert_eq!(
        rollout_of(&b).await["step"],
        1,
        "joins at the scheduled step"
    );

    let ask_all = |p: SocketAddr| async move {
        let mut c = Client::connect(p).await.unwrap();
        let mut out = Vec::new();
        for i in 1000..1200u32 {
            let a = c
                .get(PUBLIC_NAME, "/", &[("x-forwarded-for", &client_addr(i))])
                .await
                .unwrap();
            out.push(a.distribution);
        }
        out
    };
    for step in 2..=3u64 {
        let ta = wait_for(&a, Duration::from_secs(15), "a steps", |ro| {
            ro["step"] == step
        })
        .await;
        let tb = wait_for(&b, Duration::from_secs(15), "b steps", |ro| {
            ro["step"] == step
        })
        .await;
        let off = if ta > tb { ta - tb } else { tb - ta };
        assert!(off <= Duration::from_secs(1), "step {step}: {off:?} apart");
        let (on_a, on_b) = (ask_all(a.listen).await, ask_all(b.listen).await);
        assert_eq!(rollout_of(&a).await["step"], step, "asked within the step");
        assert_eq!(
            on_a, on_b,
            "step {step}: the same client, the same upstream"
        );
        let new = on_a.iter().filter(|d| *d == "d-new").count();
        assert!(
            new > 0 && (step == 3 || new < 200),
            "step {step}: {new} of 200 on new"
        );
    }
    let seen = load_a.stop().await;
    assert_only_forward(&seen);
    let seen = load_b.stop().await;
    assert_only_forward(&seen);
}

/// Debian's `prometheus`, on a free port, scraping `targets` every second.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_port();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
                 scrape_configs:\n  - job_name: cutover\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "prometheus (Debian package `prometheus`) must be installed; .ci/run installs it",
            );
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = cutover::lifecycle::status::admin_request(addr, "GET", "/-/ready")
            {
                return p;
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_gate_on_prometheus_rolls_both_back_and_an_empty_or_unreachable_one_holds() {
    let bed = Bed::start().await;
    let (_, start_text) = start_in(Duration::from_secs(4));
    let schedule = format!(
        "      from: old-cloudfront\n      to: new-cloudfront\n      steps: [10, 50, 100]\n      hold: 8s\n      start: {start_text}\n"
    );
    // Addresses first: Prometheus must know its targets; the processes'
    // admin ports are chosen here and written into their configs.
    let dirs: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| {
            let d = bed.path(n);
            std::fs::create_dir_all(&d).unwrap();
            d
        })
        .collect();
    let admins: Vec<SocketAddr> = (0..4).map(|_| free_port()).collect();
    let prom = Prometheus::start(&admins[..2]);
    let ratio = "(sum(rate(cutover_requests_total{route=\"cdn\",upstream=\"new-cloudfront\",code=~\"5..\"}[$window])) or vector(0)) / sum(rate(cutover_requests_total{route=\"cdn\",upstream=\"new-cloudfront\"}[$window]))";
    let fleet = |url: &str, query: &str| {
        format!(
            "{schedule}      gates:\n        interval: 2s\n        window: 6s\n        failure_limit: 2\n        prometheus: {url}\n        prometheus_timeout: 1s\n        queries:\n          - {{ name: fleet_5xx_ratio, max: 0.01, query: '{query}' }}\n"
        )
    };
    let url = format!("http://{}", prom.addr);
    let blocks = [
        fleet(&url, ratio),
        fleet(&url, ratio),
        fleet(
            &url,
            "sum(rate(cutover_requests_total{route=\"nope\"}[$window]))",
        ),
        fleet(&format!("http://{}", free_port()), ratio),
    ];
    let mut procs = Vec::new();
    for i in 0..4 {
        let yaml = rollout_yaml(&bed, &dirs[i], &blocks[i]);
        let listen = free_port();
        let yaml = yaml
            .replacen("127.0.0.1:0", &listen.to_string(), 1)
            .replacen("127.0.0.1:0", &admins[i].to_string(), 1);
        let path = dirs[i].join("cutover.yaml");
        std::fs::write(&path, yaml).unwrap();
        procs.push(Proxy::start_with(
            &dirs[i],
            path,
            listen,
            admins[i],
            Some(&bed.hosts_file),
            &[],
        ));
    }
    let loads: Vec<Load> = procs[..2]
        .iter()
        .map(|p| Load::start(p.listen, 200, 2, Duration::from_millis(10)))
        .collect();
    for p in &procs[..2] {
        wait_for(
            p,
            Duration::from_secs(30),
            "step 2 on fleet numbers",
            |ro| ro["step"] == 2,
        )
        .await;
    }
    bed.edge.fail_every("d-new", 20);
    let injected = Instant::now();
    for p in &procs[..2] {
        wait_for(p, Duration::from_secs(20), "fleet rollback", |ro| {
            ro["state"] == "rolled_back"
        })
        .await;
    }
    let took = injected.elapsed();
    for l in loads {
        l.stop().await;
    }
    println!("both rolled back {took:?} after the failures began");
    for (p, why) in [(&procs[2], "empty result"), (&procs[3], "")] {
        let ro = rollout_of(p).await;
        assert_eq!(
            (ro["state"].as_str(), ro["step"].as_u64()),
            (Some("holding"), Some(1)),
            "{ro:#}"
        );
        assert_eq!(ro["gates"][0]["verdict"], "no_data", "{ro:#}");
        let note = ro["gates"][0]["note"].as_str().unwrap_or("");
        assert!(note.contains(why), "{note}");
        let m = p.metrics().await;
        assert_eq!(
            sample(
                &m,
                "cutover_rollout_decisions_total",
                &[("decision", "fail")]
            ),
            Some(0.0)
        );
    }
    let line = procs[0]
        .log()
        .lines()
        .find(|l| l.contains("rollout rollback"))
        .map(String::from)
        .unwrap();
    assert!(line.contains("fleet_5xx_ratio="), "{line}");
}

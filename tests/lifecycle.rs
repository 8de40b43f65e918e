//! Process lifecycle under load: binary upgrades (`run --upgrade` + SIGQUIT,
//! and the in-place SIGUSR2 path a package upgrade uses), SIGTERM draining,
//! and a broken config at upgrade time.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use cutover::rehearsal::demo::PUBLIC_NAME;

struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Keep-alive clients plus clients that open a new connection per request
/// (those would see any refused connection during a handover).
fn start_load(listen: std::net::SocketAddr, keepalive: u32, fresh: u32) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..keepalive + fresh {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let reuse = c < keepalive;
        tasks.push(tokio::spawn(async move {
            let mut client: Option<Client> = None;
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    match Client::connect(listen).await {
                        Ok(cl) => client = Some(cl),
                        Err(e) => {
                            eprintln!("connect failed: {e:#}");
                            failed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                let result = client
                    .as_mut()
                    .expect("connected")
                    .get(PUBLIC_NAME, "/ruok", &[])
                    .await;
                match result {
                    Ok(a) if a.status == 200 && a.body == "ok-new-cdn" => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(a) => {
                        eprintln!("bad answer: {a:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("request failed: {e:#}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        client = None;
                    }
                }
                if !reuse {
                    client = None;
                }
            }
        }));
    }
    Load {
        stop,
        ok,
        failed,
        tasks,
    }
}

impl Load {
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn spawn_upgrade(config: &Path, hosts: &Path, log: &Path) -> Child {
    Command::new(BIN)
        .args(["run", "--upgrade", "--config"])
        .arg(config)
        .env("CUTOVER_HOSTS_FILE", hosts)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_binary_upgrades_under_load_refuse_nothing() {
    let bed = Bed::start().await;
    let mut first = Proxy::start(bed.dir.path(), &bed.config(""), Some(&bed.hosts_file));
    let sock = bed.path("upgrade.sock");
    let load = start_load(first.listen, 4, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Each successor takes the sockets, writes the pid file, and becomes the
    // next one to be replaced; the old processes drain in the background.
    let pid_file = bed.path("cutover.pid");
    let mut current = first.child.id();
    let mut children: Vec<Child> = Vec::new();
    for i in 0..10 {
        let _ = std::fs::remove_file(&sock);
        let log = bed.path(&format!("upgrade-{i}.log"));
        let child = spawn_upgrade(&first.config_path, &bed.hosts_file, &log);
        let next = child.id();
        tokio::task::block_in_place(|| {
            wait_for(
                "the new process to wait on the upgrade socket",
                Duration::from_secs(15),
                || sock.exists(),
            );
        });
        kill(current, libc::SIGQUIT);
        tokio::task::block_in_place(|| {
            wait_for(
                "the new process to take the sockets",
                Duration::from_secs(15),
                || pid_in(&pid_file) == Some(next),
            );
        });
        current = next;
        children.push(child);
    }
    // Every replaced process drains and exits cleanly.
    let status = tokio::task::block_in_place(|| first.wait_exit(Duration::from_secs(30)));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", first.log());
    let last = children.pop().unwrap();
    for mut c in children {
        let status = tokio::task::block_in_place(|| c.wait()).unwrap();
        assert_eq!(status.code(), Some(0));
    }
    let mut children = vec![last];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed) = load.finish().await;
    eprintln!("10 upgrades under load: {ok} requests ok, {failed} failed or refused");
    assert_eq!(failed, 0, "{ok} ok");
    assert!(ok > 1000, "{ok}");
    for mut c in children.drain(..) {
        kill(c.id(), libc::SIGINT);
        let _ = c.wait();
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

fn pid_in(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_in_place_and_a_broken_config_aborts_it() {
    let bed = Bed::start().await;
    let mut proxy = Proxy::start(bed.dir.path(), &bed.config(""), Some(&bed.hosts_file));
    let pid_file = bed.path("cutover.pid");
    let first_pid = proxy.child.id();
    assert_eq!(pid_in(&pid_file), Some(first_pid));
    let load = start_load(proxy.listen, 3, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A broken config: the upgrade is refused, the old process keeps serving.
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    write_atomically(&proxy.config_path, "phase: broken\n");
    kill(first_pid, libc::SIGUSR2);
    let m = proxy
        .metrics_when(
            "cutover_binary_upgrades_total",
            &[("result", "failure")],
            1.0,
        )
        .await;
    assert_eq!(
        sample(
            &m,
            "cutover_binary_upgrades_total",
            &[("result", "failure")]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        proxy
            .log()
            .contains("binary upgrade aborted, still serving"),
        "{}",
        proxy.log()
    );
    assert_eq!(pid_in(&pid_file), Some(first_pid));

    // The real thing.
    write_atomically(&proxy.config_path, &good);
    kill(first_pid, libc::SIGUSR2);
    tokio::task::block_in_place(|| {
        wait_for(
            "the successor to write the pid file",
            Duration::from_secs(20),
            || pid_in(&pid_file).is_some_and(|p| p != first_pid),
        )
    });
    let successor = pid_in(&pid_file).unwrap();
    let status = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(20)));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", proxy.log());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed) = load.finish().await;
    eprintln!("SIGUSR2 upgrade under load: {ok} ok, {failed} failed");
    assert_eq!(failed, 0);
    // The successor serves and is alive.
    assert_eq!(
        proxy.get(PUBLIC_NAME, "/ruok").await.body_text(),
        "ok-new-cdn"
    );
    assert!(Path::new(&format!("/proc/{successor}")).exists());
    kill(successor, libc::SIGINT);
    wait_for("the successor to stop", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{successor}")).exists() || is_zombie(successor)
    });
    assert!(!pid_file.exists(), "pid file left behind by a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let bed = Bed::start().await;
    // In-flight requests get the grace period (Pingora cancels what is left
    // after it), so it must be longer than the slowest request.
    let yaml = bed
        .config("")
        .replace("grace_period: 1s", "grace_period: 3s");
    let mut proxy = Proxy::start(bed.dir.path(), &yaml, Some(&bed.hosts_file));
    let mut inflight = Vec::new();
    for _ in 0..10 {
        let listen = proxy.listen;
        inflight.push(tokio::spawn(async move {
            let mut c = Client::connect(listen).await.unwrap();
            c.get(PUBLIC_NAME, "/slow/1500", &[]).await
        }));
    }
    // Every request has reached the edge before the signal.
    tokio::task::block_in_place(|| {
        wait_for("requests in flight", Duration::from_secs(10), || {
            bed.edge.arrived() >= 10
        })
    });
    assert!(bed.edge.seen().is_empty(), "none answered yet");
    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);
    for t in inflight {
        let a = t.await.unwrap().expect("in-flight request completed");
        assert_eq!((a.status, a.body.as_str()), (200, "ok-new-cdn"));
    }
    let status = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", proxy.log());
    // Finished within the grace period (plus the runtimes' wind-down).
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    // Once the signal arrived, nothing new was accepted.
    assert!(std::net::TcpStream::connect(proxy.listen).is_err());
}

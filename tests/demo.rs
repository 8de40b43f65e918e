//! `cutover demo` shows the trap and the fix within seconds and stops cleanly on Ctrl-C.

mod common;

use std::io::BufReader;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_until, BIN};

#[test]
fn demo_shows_trap_and_fix_then_stops_on_ctrl_c() {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let text = read_until(&mut out, "Serving until Ctrl-C.");
    assert!(text.contains("Serving until Ctrl-C."), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // The DNS flip row is answered by the old distribution, cutover's by the new.
    let flip = text
        .lines()
        .skip_while(|l| !l.contains("DNS flip"))
        .nth(1)
        .unwrap_or("");
    assert!(
        flip.contains("200 ok-old-cdn") && flip.contains("d-old"),
        "{text}"
    );
    let fix = text
        .lines()
        .skip_while(|l| !l.contains("-> SNI+Host"))
        .nth(1)
        .unwrap_or("");
    assert!(
        fix.contains("200 ok-new-cdn") && fix.contains("d-new"),
        "{text}"
    );
    assert!(text.contains("Misdirected"), "{text}");
    // One address of the new distribution refuses: cutover routes around
    // it, the old distribution serves nothing.
    let dead = text
        .lines()
        .skip_while(|l| !l.contains("dead edge address"))
        .nth(1)
        .unwrap_or("");
    assert!(
        dead.contains("20 of 20 answered ok-new-cdn, 0 by old-cloudfront")
            && !dead.contains("ejections: 0"),
        "{text}"
    );
    assert!(
        text.contains("verdict: the DNS flip still lands on the OLD"),
        "{text}"
    );
    assert!(text.contains("curl "), "{text}");

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

//! `cutover check` on every shipped config and every fixture: valid files exit
//! 0; each invalid fixture exits 1 and names what its `# expect:` lines say.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

fn check(file: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn shipped_configs_and_valid_fixtures_pass() {
    let mut files = yaml_files(&root().join("conf"));
    files.extend(yaml_files(&root().join("tests/config/valid")));
    for f in files {
        let (code, stdout, stderr) = check(&f);
        assert_eq!(code, Some(0), "{}:\n{stdout}{stderr}", f.display());
        assert!(stdout.contains(": ok: phase"), "{}: {stdout}", f.display());
        assert_eq!(
            stdout.lines().count(),
            1,
            "one-line summary expected: {stdout}"
        );
    }
}

#[test]
fn invalid_fixtures_fail_naming_every_problem() {
    for f in yaml_files(&root().join("tests/config/invalid")) {
        let text = std::fs::read_to_string(&f).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            f.display()
        );
        let (code, stdout, stderr) = check(&f);
        assert_eq!(code, Some(1), "{}:\n{stdout}{stderr}", f.display());
        assert!(
            stderr.contains(&f.display().to_string()),
            "message must name the file: {stderr}"
        );
        for want in expected {
            assert!(
                stderr.contains(want),
                "{}: expected {want:?} in:\n{stderr}",
                f.display()
            );
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn every_problem_of_a_file_is_reported_in_one_run() {
    let f = root().join("tests/config/invalid/many-problems.yaml");
    let (_, _, stderr) = check(&f);
    let problems = stderr.lines().filter(|l| l.starts_with("  ")).count();
    assert_eq!(problems, 18, "{stderr}");
    assert!(stderr.contains("18 problems"), "{stderr}");
}

#[test]
fn missing_file_and_garbage_are_messages_not_panics() {
    let (code, _, stderr) = check(Path::new("/nonexistent/cutover.yaml"));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot read the config file"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    for (name, content) in [
        ("empty.yaml", &b""[..]),
        ("binary.yaml", &[0xff, 0xfe, 0x00, 0x01][..]),
        ("list.yaml", &b"- a\n- b\n"[..]),
        ("deep.yaml", "[".repeat(10_000).as_bytes()),
        ("anchors.yaml", &b"a: &a [*a]\n"[..]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let (code, _, stderr) = check(&p);
        assert_eq!(code, Some(1), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
}

#[test]
fn run_with_an_invalid_config_exits_1_with_the_message() {
    let f = root().join("tests/config/invalid/ip-without-sni.yaml");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("routes[0].upstreams[0].sni"), "{stderr}");
}

#[test]
fn a_keepalive_timeout_the_load_balancer_outlasts_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("alb.yaml");
    std::fs::write(
        &p,
        "phase: p\nlisteners:\n  - { address: 0.0.0.0:8080, keepalive_timeout: 60s }\n  - { address: 0.0.0.0:8081, keepalive_timeout: 100s, alb_idle_timeout: 120s }\n  - { address: 0.0.0.0:8082 }\nroutes:\n  - name: r\n    hosts: [a.example.com]\n    upstreams: [{ name: u, address: \"d.example.net:443\" }]\n",
    )
    .unwrap();
    let (code, stdout, stderr) = check(&p);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stderr.contains("listeners[0].keepalive_timeout: 1m is not longer than an ALB's default idle timeout (60s)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("listeners[1].keepalive_timeout: 1m 40s is not longer than the load balancer's idle timeout (alb_idle_timeout: 2m)"),
        "{stderr}"
    );
    // The default (75s) outlasts an ALB's default.
    assert!(!stderr.contains("listeners[2]"), "{stderr}");
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
}

fn check_args(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).arg("check").args(args).output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_bootstrap_and_a_document_are_checked_apart_and_together() {
    let fleet = root().join("conf/fleet");
    let boot = fleet.join("bootstrap.yaml");
    let doc = fleet.join("document.yaml");
    let (code, out) = check_args(&["--config", boot.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok: bootstrap, 1 listener(s), document from https://config.example.com/cutover/cutover.yaml every 10s, cache /var/lib/cutover/source.yaml"),
        "{out}"
    );
    let (code, out) = check_args(&[
        "--config",
        boot.to_str().unwrap(),
        "--document",
        doc.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}");
    let sha = cutover::config::sha256_hex(&std::fs::read(&doc).unwrap());
    assert!(
        out.contains(&format!("ok: document sha256={sha}")) && out.contains("1 route(s)"),
        "{out}"
    );

    // Keys in the wrong part are named, with where they are.
    let dir = tempfile::tempdir().unwrap();
    let bad_boot = dir.path().join("boot.yaml");
    std::fs::write(
        &bad_boot,
        "config_source: { url: \"http://config.internal/c.yaml\", interval: 500ms }\nlisteners: [{ address: 0.0.0.0:8080 }]\nphase: p\nroutes:\n  - { name: r, hosts: [a.example.com], upstreams: [{ name: u, address: \"d.example.net:443\" }] }\n",
    )
    .unwrap();
    let (code, out) = check_args(&["--config", bad_boot.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    for want in [
        "1:18: config_source.url: http:// is allowed only to a loopback address; `config.internal` needs https://",
        "config_source.interval: must be at least 1s",
        "3:1: phase: comes from the served document",
        "4:1: routes: comes from the served document",
        "4 problems",
    ] {
        assert!(out.contains(want), "{want:?} in\n{out}");
    }
    let bad_doc = dir.path().join("doc.yaml");
    std::fs::write(
        &bad_doc,
        "phase: p\nlisteners: [{ address: 0.0.0.0:9999 }]\nroutes:\n  - name: r\n    hosts: [a.example.com]\n    upstreams: [{ name: u, address: \"d.example.net:443\", weight: 0 }]\n",
    )
    .unwrap();
    let (code, out) = check_args(&[
        "--config",
        boot.to_str().unwrap(),
        "--document",
        bad_doc.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}");
    for want in [
        "doc.yaml",
        "2:1: listeners: is set in each instance's bootstrap file",
        "6:5: routes[0].upstreams: every upstream has weight 0",
    ] {
        assert!(out.contains(want), "{want:?} in\n{out}");
    }
    // `--document` needs a bootstrap; `--config-url` makes one.
    let whole = root().join("tests/config/valid/minimal.yaml");
    let (code, out) = check_args(&[
        "--config",
        whole.to_str().unwrap(),
        "--document",
        doc.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--document needs a bootstrap config"), "{out}");
    let (code, out) = check_args(&[
        "--config",
        whole.to_str().unwrap(),
        "--config-url",
        "https://config.example.com/c.yaml",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("routes: comes from the served document"),
        "{out}"
    );
}

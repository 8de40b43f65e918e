//! The shipped Prometheus rules and Grafana dashboard: rules pass promtool's
//! checks and unit tests; every dashboard query is valid PromQL; every metric
//! either of them names is one cutover exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package `prometheus`) must be installed; .ci/run installs it");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Names of every metric family cutover exports, series suffixes included.
fn exported_names() -> BTreeSet<String> {
    let m = cutover::observe::metrics::Metrics::new();
    // Create one child of every labelled family so that it is gathered.
    let up = m.upstream("p", "r", "u");
    up.count_response(200);
    up.count_error(cutover::policy::failure::ErrorKind::Tls);
    up.duration.observe(0.1);
    up.response_bytes.inc();
    let phase = m.phase("p");
    phase.unmatched.inc();
    m.set_phase("p");
    m.init_reload_counters();
    m.set_config("0123", "p");
    m.source.init();
    let ro = &m.rollout;
    ro.step.with_label_values(&["r"]).set(1);
    ro.percent.with_label_values(&["r"]).set(1.0);
    ro.state.with_label_values(&["r", "holding"]).set(1);
    ro.decisions.with_label_values(&["r", "no_data"]).inc();
    ro.gate_value.with_label_values(&["r", "g"]).set(1.0);
    ro.gate_limit.with_label_values(&["r", "g"]).set(1.0);
    let _listener = m.listener("0.0.0.0:8080");
    let mut names = BTreeSet::new();
    for family in m.registry.gather() {
        let name = family.name().to_string();
        if family.get_field_type() == prometheus::proto::MetricType::HISTOGRAM {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name);
    }
    names
}

/// `cutover_...` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("cutover_") {
        let start = i + pos;
        let preceded_by_ident =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if !preceded_by_ident {
            out.push(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

fn dashboard_exprs() -> Vec<String> {
    let text =
        std::fs::read_to_string(root().join("packaging/grafana/cutover-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is valid JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    if k == "expr" {
                        out.push(v.as_str().expect("expr is a string").to_string());
                    } else {
                        walk(v, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    exprs
}

#[test]
fn alert_rules_pass_promtool_checks_and_unit_tests() {
    let dir = root().join("packaging/prometheus");
    let checked = promtool(&["check", "rules", "cutover-alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS: 16 rules found"), "{checked}");
    promtool(&["test", "rules", "cutover-alerts.test.yml"], &dir);
}

#[test]
fn dashboard_queries_are_valid_promql() {
    // promtool validates PromQL in rule files: wrap each query as a recording
    // rule, with Grafana's variables replaced by match-all values.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs().iter().enumerate() {
        let e = expr
            .replace("$instance", ".*")
            .replace("$route", ".*")
            .replace("$new_upstream", "new-cloudfront");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    promtool(&["check", "rules", "dashboard.yml"], dir.path());
}

#[test]
fn every_metric_named_in_dashboard_and_rules_exists() {
    let exported = exported_names();
    let rules =
        std::fs::read_to_string(root().join("packaging/prometheus/cutover-alerts.yml")).unwrap();
    let mut used = BTreeSet::new();
    for expr in dashboard_exprs().iter().chain(std::iter::once(&rules)) {
        used.extend(metric_names(expr));
    }
    assert!(used.len() >= 8, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named but not exported: {missing:?}\nexported: {exported:?}"
    );
    // And the dashboard shows what the issue asks for.
    let all = dashboard_exprs().join("\n");
    for needle in [
        "histogram_quantile(0.99",
        "code=~\"5..\"",
        "$new_upstream",
        "by (phase, upstream)",
    ] {
        assert!(all.contains(needle), "dashboard lacks {needle}");
    }
}

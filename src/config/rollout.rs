//! A route's `rollout:` → [`Rollout`], every problem with its key path.

use std::time::{Duration, SystemTime};

use super::file::{GatesFile, HoldFile, RolloutFile, RouteFile};
use super::model::*;
use super::validate::Checker;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_MIN_REQUESTS: u64 = 100;
const DEFAULT_FAILURE_LIMIT: u32 = 3;
const DEFAULT_PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn check_rollout(
    c: &mut Checker,
    path: &str,
    ro: &RolloutFile,
    route: &RouteFile,
    all: &[RouteFile],
) -> Option<Rollout> {
    let from = upstream_index(c, &format!("{path}.from"), &ro.from, route, all);
    let to = upstream_index(c, &format!("{path}.to"), &ro.to, route, all);
    if let (Some(f), Some(t)) = (from, to) {
        if f == t {
            c.problem(
                format!("{path}.to"),
                "is the same upstream as `from`: a rollout moves traffic between two",
            );
        }
    }
    // Which weights count: the rollout's. Refused rather than silently
    // overridden, so the file says what runs.
    for (k, u) in route.upstreams.iter().enumerate() {
        let upath = format!("{}.upstreams[{k}]", path.trim_end_matches(".rollout"));
        let moving = Some(k) == from || Some(k) == to;
        if moving && u.weight.is_some() {
            c.problem(
                format!("{upath}.weight"),
                "this upstream's weight is set by the route's rollout: remove `weight`",
            );
        }
        if moving && u.backup == Some(true) {
            c.problem(
                format!("{upath}.backup"),
                "a rollout's `from` and `to` take traffic: they cannot be backups",
            );
        }
        if !moving && u.backup != Some(true) {
            c.problem(
                upath,
                "in a route with a rollout, every upstream but `from` and `to` must be a backup (`backup: true`)",
            );
        }
    }

    let steps = check_steps(c, &format!("{path}.steps"), &ro.steps);
    let holds = match &ro.hold {
        None => {
            c.problem(
                format!("{path}.hold"),
                "how long each step holds is needed (e.g. `hold: 10m`)",
            );
            Vec::new()
        }
        Some(HoldFile::One(h)) => {
            let d = c.duration(&format!("{path}.hold"), Some(h), Duration::ZERO);
            vec![d; steps.len()]
        }
        Some(HoldFile::PerStep(list)) => {
            if list.len() != ro.steps.len() {
                c.problem(
                    format!("{path}.hold"),
                    format!(
                        "has {} durations for {} steps: give one per step, or a single one",
                        list.len(),
                        ro.steps.len()
                    ),
                );
            }
            list.iter()
                .enumerate()
                .map(|(i, h)| c.duration(&format!("{path}.hold[{i}]"), Some(h), Duration::ZERO))
                .collect()
        }
    };
    let start = match &ro.start {
        None => {
            c.problem(
                format!("{path}.start"),
                "when the first step takes effect is needed, e.g. `start: 2026-12-02T02:00:00Z`",
            );
            None
        }
        Some(s) => match parse_rfc3339(s) {
            Ok(t) => Some(t),
            Err(why) => {
                c.problem(format!("{path}.start"), why);
                None
            }
        },
    };
    let gates = ro
        .gates
        .as_ref()
        .map(|g| check_gates(c, &format!("{path}.gates"), g));
    if let Some(g) = &gates {
        for (i, h) in holds.iter().enumerate() {
            if !h.is_zero() && h.as_nanos() % g.interval.as_nanos() != 0 {
                let key = match &ro.hold {
                    Some(HoldFile::PerStep(_)) => format!("{path}.hold[{i}]"),
                    _ => format!("{path}.hold"),
                };
                c.problem(
                    key,
                    format!(
                        "{} is not a whole number of gate intervals ({}): a step advances at an evaluation",
                        humantime::format_duration(*h),
                        humantime::format_duration(g.interval)
                    ),
                );
                break;
            }
        }
    }
    let on_failure = match ro.on_failure.as_deref().map(str::trim) {
        None | Some("rollback") => OnFailure::Rollback,
        Some("previous") => OnFailure::Previous,
        Some("hold") => OnFailure::Hold,
        Some(other) => {
            c.problem(
                format!("{path}.on_failure"),
                format!("`{other}` is not a choice: use rollback, previous or hold"),
            );
            OnFailure::Rollback
        }
    };
    Some(Rollout {
        from: from?,
        to: to?,
        steps,
        holds,
        start: start?,
        gates,
        on_failure,
    })
}

/// The index of upstream `name` in `route`, or a problem saying where the
/// name is (another route's upstream, or nowhere).
fn upstream_index(
    c: &mut Checker,
    path: &str,
    name: &str,
    route: &RouteFile,
    all: &[RouteFile],
) -> Option<usize> {
    let name = name.trim();
    if let Some(i) = route.upstreams.iter().position(|u| u.name.trim() == name) {
        return Some(i);
    }
    let elsewhere = all
        .iter()
        .find(|r| r.upstreams.iter().any(|u| u.name.trim() == name));
    let known: Vec<&str> = route.upstreams.iter().map(|u| u.name.as_str()).collect();
    c.problem(
        path,
        match elsewhere {
            Some(r) => format!(
                "`{name}` is an upstream of route `{}`, not of this one (its upstreams: {})",
                r.name,
                known.join(", ")
            ),
            None => format!(
                "`{name}` is not an upstream of this route (its upstreams: {})",
                known.join(", ")
            ),
        },
    );
    None
}

fn check_steps(c: &mut Checker, path: &str, raw: &[serde_yaml::Value]) -> Vec<u32> {
    if raw.is_empty() {
        c.problem(
            path,
            "at least one step is needed: percent to `to`, e.g. `[1, 10, 50, 100]`",
        );
    }
    let mut steps = Vec::new();
    for (i, v) in raw.iter().enumerate() {
        let percent = v.as_f64().filter(|p| p.is_finite());
        let bp = percent.map(|p| p * 100.0);
        match bp {
            Some(bp)
                if bp > 0.0 && bp <= f64::from(ALL_BASIS_POINTS) && bp.fract().abs() < 1e-6 =>
            {
                let bp = bp.round() as u32;
                if steps.last().is_some_and(|&last| bp <= last) {
                    c.problem(
                        format!("{path}[{i}]"),
                        "steps must increase: each step sends more traffic to `to` than the one before",
                    );
                }
                steps.push(bp);
            }
            _ => {
                let shown = serde_yaml::to_string(v).unwrap_or_default();
                c.problem(
                    format!("{path}[{i}]"),
                    format!(
                        "`{}` is not a step: a percent above 0 and at most 100 (two decimals at most)",
                        shown.trim()
                    ),
                );
            }
        }
    }
    steps
}

fn check_gates(c: &mut Checker, path: &str, g: &GatesFile) -> Gates {
    let mut ratio = |key: &str, v: Option<f64>| -> Option<f64> {
        let v = v?;
        if !(0.0..=1.0).contains(&v) {
            c.problem(
                format!("{path}.{key}"),
                format!("{v} is not a ratio: write a number from 0 to 1 (0.01 = 1%)"),
            );
        }
        Some(v)
    };
    let max_5xx_ratio = ratio("max_5xx_ratio", g.max_5xx_ratio);
    let max_edge_refused_ratio = ratio("max_edge_refused_ratio", g.max_edge_refused_ratio);
    let max_marker_mismatch_ratio = ratio("max_marker_mismatch_ratio", g.max_marker_mismatch_ratio);
    let max_connect_error_ratio = ratio("max_connect_error_ratio", g.max_connect_error_ratio);
    if let Some(v) = g.max_5xx_ratio_vs_from {
        if !(v.is_finite() && v >= 1.0) {
            c.problem(
                format!("{path}.max_5xx_ratio_vs_from"),
                format!("{v} is not a factor: write a number of at least 1 (2 = twice the old upstream's 5xx ratio)"),
            );
        }
    }
    let max_p99 = g
        .max_p99
        .as_deref()
        .map(|t| c.duration(&format!("{path}.max_p99"), Some(t), Duration::from_secs(1)));
    let interval = c.duration(
        &format!("{path}.interval"),
        g.interval.as_deref(),
        DEFAULT_INTERVAL,
    );
    let window = c.duration(&format!("{path}.window"), g.window.as_deref(), interval);
    if window < interval {
        c.problem(
            format!("{path}.window"),
            "must be at least the interval: requests between two windows would never be judged",
        );
    }
    let min_requests = g.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS);
    if min_requests == 0 {
        c.problem(
            format!("{path}.min_requests"),
            "must be at least 1: a gate judged on no requests passes on no data",
        );
    }
    let failure_limit = g.failure_limit.unwrap_or(DEFAULT_FAILURE_LIMIT);
    if failure_limit == 0 {
        c.problem(format!("{path}.failure_limit"), "must be at least 1");
    }
    let window_text = prom_duration(window);
    let mut queries = Vec::new();
    for (i, q) in g.queries.iter().enumerate() {
        let qpath = format!("{path}.queries[{i}]");
        if q.name.trim().is_empty() {
            c.problem(format!("{qpath}.name"), "must not be empty");
        }
        if let Err(why) = check_promql(&q.query) {
            c.problem(format!("{qpath}.query"), why);
        }
        if q.max.is_none() && q.min.is_none() {
            c.problem(
                qpath.clone(),
                "a query gate needs `max` (fails above it) or `min` (fails below it)",
            );
        }
        queries.push(QueryGate {
            name: q.name.trim().to_string(),
            query: q.query.replace("$window", &window_text),
            max: q.max,
            min: q.min,
        });
    }
    let fleet = match (&g.prometheus, queries.is_empty()) {
        (None, true) => None,
        (None, false) => {
            c.problem(
                format!("{path}.prometheus"),
                "the `queries` gates need the Prometheus server to ask: set `prometheus: http://HOST:9090`",
            );
            None
        }
        (Some(_), true) => {
            c.problem(
                format!("{path}.queries"),
                "`prometheus` is set but no query gate uses it: add `queries: [{ name, query, max }]`",
            );
            None
        }
        (Some(url), false) => {
            let url = parse_http_url(url)
                .map_err(|why| c.problem(format!("{path}.prometheus"), why))
                .ok();
            let timeout = c.duration(
                &format!("{path}.prometheus_timeout"),
                g.prometheus_timeout.as_deref(),
                DEFAULT_PROMETHEUS_TIMEOUT,
            );
            if timeout >= interval {
                c.problem(
                    format!("{path}.prometheus_timeout"),
                    "must be shorter than the interval",
                );
            }
            url.map(|url| FleetGates {
                url,
                timeout,
                queries,
            })
        }
    };
    Gates {
        max_5xx_ratio,
        max_5xx_ratio_vs_from: g.max_5xx_ratio_vs_from,
        max_p99,
        max_edge_refused_ratio,
        max_marker_mismatch_ratio,
        max_connect_error_ratio,
        min_requests,
        interval,
        window,
        failure_limit,
        fleet,
    }
}

/// A duration as PromQL writes it: whole milliseconds (`1500ms`) or
/// seconds (`30s`).
fn prom_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A light check of a PromQL expression: not empty, brackets balanced,
/// strings closed. Prometheus itself judges the rest; an expression it
/// refuses makes the rollout hold, with Prometheus's message in the log.
pub(super) fn check_promql(q: &str) -> Result<(), String> {
    if q.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let mut open: Vec<char> = Vec::new();
    let mut chars = q.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '"' | '\'' | '`' => {
                let mut closed = false;
                while let Some(n) = chars.next() {
                    if n == '\\' && ch != '`' {
                        chars.next();
                    } else if n == ch {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    return Err(format!("a string opened with {ch} is never closed"));
                }
            }
            '(' | '[' | '{' => open.push(ch),
            ')' | ']' | '}' => {
                let want = match ch {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if open.pop() != Some(want) {
                    return Err(format!("`{ch}` closes nothing that is open"));
                }
            }
            _ => {}
        }
    }
    match open.last() {
        Some(ch) => Err(format!("`{ch}` is never closed")),
        None => Ok(()),
    }
}

/// `http://host:port/prefix` or `https://…`; no user info, query or fragment.
pub fn parse_http_url(text: &str) -> Result<HttpUrl, String> {
    let bad = || {
        format!(
            "`{text}` is not an http:// or https:// URL (e.g. `http://prometheus.internal:9090`)"
        )
    };
    let uri: http::Uri = text.trim().parse().map_err(|_| bad())?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad()),
    };
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.as_str().contains('@') || uri.query().is_some() {
        return Err(bad());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(bad());
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(HttpUrl {
        https,
        host,
        port,
        path: uri.path().trim_end_matches('/').to_string(),
    })
}

/// RFC 3339: `2026-12-02T02:00:00Z`, or with an offset (`+01:00`).
fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    let t = text.trim();
    let bad = |why: &str| {
        format!("`{text}` is not an RFC 3339 time ({why}); write e.g. `2026-12-02T02:00:00Z`")
    };
    let (base, offset_secs): (&str, i64) = if let Some(b) = t.strip_suffix(['Z', 'z']) {
        (b, 0)
    } else if t.len() > 6 && matches!(t.as_bytes()[t.len() - 6], b'+' | b'-') {
        let (b, off) = t.split_at(t.len() - 6);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (h, m) = off[1..].split_once(':').ok_or_else(|| bad("offset"))?;
        let (h, m): (i64, i64) = (
            h.parse().map_err(|_| bad("offset"))?,
            m.parse().map_err(|_| bad("offset"))?,
        );
        (b, sign * (h * 3600 + m * 60))
    } else {
        return Err(bad("no `Z` or offset"));
    };
    let utc = humantime::parse_rfc3339_weak(&base.replace(['t', 'T'], " "))
        .map_err(|e| bad(&e.to_string()))?;
    let shifted = if offset_secs >= 0 {
        utc.checked_sub(Duration::from_secs(offset_secs as u64))
    } else {
        utc.checked_add(Duration::from_secs(offset_secs.unsigned_abs()))
    };
    shifted.ok_or_else(|| bad("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_with_z_and_offsets() {
        let z = parse_rfc3339("2026-12-02T02:00:00Z").unwrap();
        assert_eq!(parse_rfc3339("2026-12-02T03:00:00+01:00").unwrap(), z);
        assert_eq!(parse_rfc3339("2026-12-01T21:30:00-04:30").unwrap(), z);
        assert_eq!(
            parse_rfc3339("2026-12-02T02:00:00.5Z").unwrap(),
            z + Duration::from_millis(500)
        );
        for bad in [
            "2026-12-02 02:00",
            "2026-12-02T02:00:00",
            "tomorrow",
            "2026-13-02T02:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn promql_brackets_and_strings() {
        assert!(check_promql(r#"sum(rate(x{a="b)"}[1m]))"#).is_ok());
        assert!(check_promql("sum(rate(x[1m])").is_err());
        assert!(check_promql("x{a=\"b}").is_err());
        assert!(check_promql("x)").is_err());
        assert!(check_promql(" ").is_err());
    }

    #[test]
    fn urls() {
        let u = parse_http_url("http://127.0.0.1:9090/").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 9090, "")
        );
        let u = parse_http_url("https://prom.internal/prometheus").unwrap();
        assert_eq!(
            (u.https, u.port, u.path.as_str()),
            (true, 443, "/prometheus")
        );
        let u = parse_http_url("http://[::1]:9090").unwrap();
        assert_eq!(u.host, "::1");
        for bad in ["prom:9090", "ftp://x", "http://u:p@x", "http://x/?q=1"] {
            assert!(parse_http_url(bad).is_err(), "{bad}");
        }
    }
}

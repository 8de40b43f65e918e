//! `/status` on the admin listener (JSON, schema in the README) and the
//! `cutover status` and `cutover rollout` commands that read and act on it.

use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::config::OnFailure;
use crate::model::rollout::{served, STATUS_WINDOW};
use crate::model::Process;
use crate::shift::rollout::{scheduled, step_instant, Reading};
use crate::shift::selection::Candidate;

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn percent(bp: u32) -> f64 {
    f64::from(bp) / 100.0
}

/// The document `/status` serves.
pub fn status_json(process: &Process) -> Value {
    let model = process.model();
    let now = SystemTime::now();
    let routes: Vec<Value> = model
        .routes
        .iter()
        .map(|route| {
            let window = route
                .rollout
                .as_ref()
                .and_then(|r| r.config.gates.as_ref())
                .map_or(STATUS_WINDOW, |g| g.window);
            let (shares, span) = served(route, window);
            let total_weight: u64 = route
                .upstreams
                .iter()
                .filter(|u| !u.backup)
                .map(|u| u64::from(u.weight()))
                .sum();
            let upstreams: Vec<Value> = route
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    let (requests, share) = shares.get(i).copied().unwrap_or((0, 0.0));
                    json!({
                        "name": u.name,
                        "backup": u.backup,
                        "weight": u.weight(),
                        "weight_share": if u.backup || total_weight == 0 { 0.0 }
                            else { f64::from(u.weight()) / total_weight as f64 },
                        "healthy": u.is_healthy(),
                        "requests": requests,
                        "served_share": share,
                    })
                })
                .collect();
            let rollout = route.rollout.as_ref().map(|ro| {
                let r = &ro.config;
                let inner = ro.runtime.lock();
                let p = &inner.progress;
                let sched = scheduled(r, now);
                let next = match sched {
                    None => Some((0, r.start)),
                    Some(k) if k < r.steps.len() => Some((k + 1, step_instant(r, k + 1))),
                    _ => None,
                };
                json!({
                    "from": route.upstreams[r.from].name,
                    "to": route.upstreams[r.to].name,
                    "state": p.state.label(),
                    "step": p.step.map_or(0, |k| k + 1),
                    "steps": r.steps.iter().map(|s| percent(*s)).collect::<Vec<_>>(),
                    "percent": percent(p.share(r)),
                    "start": time(r.start),
                    "scheduled_step": sched.map_or(0, |k| (k + 1).min(r.steps.len())),
                    "scheduled_done": sched.is_some_and(|k| k >= r.steps.len()),
                    "next_step": next.map(|(k, _)| k + 1),
                    "next_step_at": next.map(|(_, t)| time(t)),
                    "seconds_to_next": next.map(|(_, t)| t.duration_since(now).unwrap_or_default().as_secs_f64()),
                    "failures": p.failures,
                    "failure_limit": r.gates.as_ref().map(|g| g.failure_limit),
                    "on_failure": match r.on_failure {
                        OnFailure::Rollback => "rollback",
                        OnFailure::Previous => "previous",
                        OnFailure::Hold => "hold",
                    },
                    "interval_seconds": r.gates.as_ref().map(|g| g.interval.as_secs_f64()),
                    "last_evaluation": inner.last_evaluation.map(time),
                    "verdict": inner.last_verdict.map(|v| v.label()),
                    "gates": inner.readings.iter().map(reading_json).collect::<Vec<_>>(),
                    "decisions": inner.decisions.iter().rev().map(|d| json!({
                        "time": time(d.at),
                        "decision": d.decision.label(),
                        "detail": d.detail,
                    })).collect::<Vec<_>>(),
                })
            });
            json!({
                "name": route.name,
                "window_seconds": span.as_secs_f64(),
                "upstreams": upstreams,
                "rollout": rollout,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "phase": model.config.phase,
        "time": time(now),
        "routes": routes,
    })
}

fn reading_json(g: &Reading) -> Value {
    json!({
        "gate": g.gate,
        "value": g.value.filter(|v| !v.is_nan()),
        "limit": g.limit,
        "op": if g.is_max { "<=" } else { ">=" },
        "verdict": g.verdict().label(),
        "note": g.note,
    })
}

/// `POST /rollout/ROUTE/resume|abort`: the status and the answer's text.
pub fn operate(process: &Process, path: &str) -> (u16, String) {
    let rest = path.trim_start_matches("/rollout/");
    let Some((route, action)) = rest.rsplit_once('/') else {
        return (
            404,
            "use POST /rollout/ROUTE/resume or /rollout/ROUTE/abort\n".into(),
        );
    };
    let abort = match action {
        "abort" => true,
        "resume" => false,
        _ => return (404, format!("`{action}` is not resume or abort\n")),
    };
    let model = process.model();
    let Some(r) = model.routes.iter().find(|r| r.name == route) else {
        return (404, format!("no route `{route}`\n"));
    };
    let Some(ro) = &r.rollout else {
        return (409, format!("route `{route}` has no rollout\n"));
    };
    match ro
        .runtime
        .operate(&process.metrics.rollout, route, &ro.config, abort)
    {
        Ok(detail) => (200, format!("route {route}: {}: {detail}\n", action)),
        Err(why) => (409, format!("route {route}: {why}\n")),
    }
}

/// One request to the admin listener; the status and body.
pub fn admin_request(admin: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(3))
        .map_err(|e| format!("cannot reach the admin listener at {admin}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("writing to {admin}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("reading from {admin}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{admin} did not answer HTTP"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{admin} did not answer HTTP"))?;
    Ok((status, body.to_string()))
}

struct Paint {
    on: bool,
}

impl Paint {
    fn wrap(&self, code: &str, text: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn verdict(&self, v: &str, text: &str) -> String {
        match v {
            "pass" | "stepping" | "done" => self.wrap("32", text),
            "fail" | "rolled_back" | "aborted" | "paused" => self.wrap("31", text),
            "no_data" | "holding" | "waiting" => self.wrap("33", text),
            _ => text.to_string(),
        }
    }
}

fn secs(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |s| {
        humantime::format_duration(Duration::from_secs(s.round() as u64)).to_string()
    })
}

/// The terminal view of a `/status` document.
pub fn render(doc: &Value, color: bool) -> String {
    let p = Paint { on: color };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cutover {} · phase {} · {}",
        doc["version"].as_str().unwrap_or("?"),
        doc["phase"].as_str().unwrap_or("?"),
        doc["time"].as_str().unwrap_or("?")
    );
    for route in doc["routes"].as_array().into_iter().flatten() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "route {}  (served: last {})",
            p.wrap("1", route["name"].as_str().unwrap_or("?")),
            secs(&route["window_seconds"])
        );
        let _ = writeln!(
            out,
            "  {:<24} {:>8} {:>8} {:>9}  health",
            "upstream", "weight", "served", "requests"
        );
        for u in route["upstreams"].as_array().into_iter().flatten() {
            let weight = if u["backup"].as_bool() == Some(true) {
                "backup".to_string()
            } else {
                format!("{:.1}%", u["weight_share"].as_f64().unwrap_or(0.0) * 100.0)
            };
            let healthy = u["healthy"].as_bool() == Some(true);
            let _ = writeln!(
                out,
                "  {:<24} {:>8} {:>7.1}% {:>9}  {}",
                u["name"].as_str().unwrap_or("?"),
                weight,
                u["served_share"].as_f64().unwrap_or(0.0) * 100.0,
                u["requests"].as_u64().unwrap_or(0),
                if healthy {
                    p.wrap("32", "ok")
                } else {
                    p.wrap("31", "down")
                }
            );
        }
        let ro = &route["rollout"];
        if ro.is_null() {
            continue;
        }
        let state = ro["state"].as_str().unwrap_or("?");
        let steps: Vec<String> = ro["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| format!("{}%", s.as_f64().unwrap_or(0.0)))
            .collect();
        let _ = writeln!(
            out,
            "  rollout {} → {}: {}  step {}/{} ({}% to {})  steps [{}]",
            ro["from"].as_str().unwrap_or("?"),
            ro["to"].as_str().unwrap_or("?"),
            p.verdict(state, &state.to_uppercase()),
            ro["step"],
            steps.len(),
            ro["percent"].as_f64().unwrap_or(0.0),
            ro["to"].as_str().unwrap_or("?"),
            steps.join(", ")
        );
        let scheduled = if ro["scheduled_done"].as_bool() == Some(true) {
            "done".to_string()
        } else {
            format!("step {}", ro["scheduled_step"])
        };
        let next = match ro["next_step"].as_u64() {
            Some(k) if k as usize > steps.len() => {
                format!("; done in {}", secs(&ro["seconds_to_next"]))
            }
            Some(k) => format!("; step {k} in {}", secs(&ro["seconds_to_next"])),
            None => String::new(),
        };
        let _ = writeln!(out, "    schedule: at {scheduled}{next}");
        if let Some(limit) = ro["failure_limit"].as_u64() {
            let _ = writeln!(
                out,
                "    gates: every {}, last {} → {}; failures {}/{limit}, then {}",
                secs(&ro["interval_seconds"]),
                ro["last_evaluation"].as_str().unwrap_or("never"),
                p.verdict(
                    ro["verdict"].as_str().unwrap_or(""),
                    ro["verdict"].as_str().unwrap_or("-")
                ),
                ro["failures"],
                ro["on_failure"].as_str().unwrap_or("?")
            );
            for g in ro["gates"].as_array().into_iter().flatten() {
                let v = g["verdict"].as_str().unwrap_or("");
                let mark = match v {
                    "pass" => "✔",
                    "fail" => "✖",
                    _ => "…",
                };
                let value = match g["value"].as_f64() {
                    Some(x) => format!("{x:.4}"),
                    None => "no data".into(),
                };
                let note = g["note"].as_str().filter(|n| !n.is_empty());
                let _ = writeln!(
                    out,
                    "      {} {:<24} {:>10} {} {}{}",
                    p.verdict(v, mark),
                    g["gate"].as_str().unwrap_or("?"),
                    value,
                    g["op"].as_str().unwrap_or(""),
                    g["limit"],
                    note.map(|n| format!("  ({n})")).unwrap_or_default()
                );
            }
        }
        let decisions = ro["decisions"].as_array().map_or(&[][..], Vec::as_slice);
        if !decisions.is_empty() {
            let _ = writeln!(out, "    last decisions:");
            for d in decisions.iter().take(5) {
                let t = d["time"].as_str().unwrap_or("");
                let _ = writeln!(
                    out,
                    "      {} {:<9} {}",
                    t.get(11..19).unwrap_or(t),
                    p.verdict(
                        match d["decision"].as_str().unwrap_or("") {
                            "rollback" | "fail" | "abort" | "pause" => "fail",
                            "no_data" | "hold" => "no_data",
                            _ => "",
                        },
                        d["decision"].as_str().unwrap_or("?")
                    ),
                    d["detail"].as_str().unwrap_or("")
                );
            }
        }
    }
    out
}

/// `cutover status`: print the view once, or every 2 s with `watch`.
pub fn status_command(admin: SocketAddr, watch: bool) -> Result<(), String> {
    let terminal = std::io::stdout().is_terminal();
    let color = terminal && std::env::var_os("NO_COLOR").is_none();
    loop {
        let (code, body) = admin_request(admin, "GET", "/status")?;
        if code != 200 {
            return Err(format!("{admin}/status answered {code}: {}", body.trim()));
        }
        let doc: Value = serde_json::from_str(&body)
            .map_err(|e| format!("{admin}/status is not the JSON cutover serves: {e}"))?;
        let view = render(&doc, color);
        if watch && terminal {
            print!("\x1b[H\x1b[2J{view}");
        } else {
            print!("{view}");
        }
        let _ = std::io::stdout().flush();
        if !watch {
            return Ok(());
        }
        if !terminal {
            println!("---");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

//! The one question a rollout asks Prometheus: an instant query
//! (`GET /api/v1/query?query=…`) that must come back as one number.

use std::time::Duration;

use crate::config::HttpUrl;
use crate::shift::probe::{self, Target, TlsTarget};

/// The query's value; `Err` says why there is none (unreachable, an
/// error answer, an empty or NaN result, more than one series).
pub async fn query(url: &HttpUrl, timeout: Duration, expr: &str) -> Result<f64, String> {
    let connect = tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((url.host.as_str(), url.port)),
    )
    .await
    .map_err(|_| format!("resolving {} timed out", url.host))?
    .map_err(|e| format!("resolving {}: {e}", url.host))?
    .next()
    .ok_or_else(|| format!("{} has no address", url.host))?;
    let host = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let target = Target {
        connect,
        tls: url.https.then(|| TlsTarget {
            sni: url.host.clone(),
            ca_files: Vec::new(),
            system_roots: true,
            verify: true,
        }),
        host,
        path: format!("{}/api/v1/query?query={}", url.path, encode(expr)),
    };
    let reply = probe::get(&target, timeout)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let body: serde_json::Value = serde_json::from_slice(&reply.body).map_err(|_| {
        format!(
            "status {} and a body that is not Prometheus's JSON",
            reply.status.as_u16()
        )
    })?;
    value_of(&body)
}

/// The number in an instant query's answer.
fn value_of(body: &serde_json::Value) -> Result<f64, String> {
    if body["status"] != "success" {
        return Err(format!(
            "Prometheus refused the query: {}: {}",
            body["errorType"].as_str().unwrap_or("error"),
            body["error"].as_str().unwrap_or("")
        ));
    }
    let data = &body["data"];
    let sample = match data["resultType"].as_str() {
        Some("scalar") => &data["result"],
        Some("vector") => {
            let series = data["result"].as_array().map_or(&[][..], Vec::as_slice);
            match series {
                [] => return Err("empty result (no series): no data".into()),
                [one] => &one["value"],
                many => {
                    return Err(format!(
                        "{} series: a gate's query must give one number (wrap it in sum(...) or max(...))",
                        many.len()
                    ))
                }
            }
        }
        other => {
            return Err(format!(
                "a {} result, not a number",
                other.unwrap_or("missing")
            ))
        }
    };
    let v: f64 = sample[1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "a sample without a value".to_string())?;
    if v.is_nan() {
        return Err("NaN (a ratio over no requests?): no data".into());
    }
    Ok(v)
}

/// Percent-encode a query parameter (RFC 3986 unreserved bytes stay).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let v = |s: &str| value_of(&serde_json::from_str(s).unwrap());
        assert_eq!(
            v(
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.0,"0.25"]}]}}"#
            ),
            Ok(0.25)
        );
        assert_eq!(
            v(r#"{"status":"success","data":{"resultType":"scalar","result":[1.0,"3"]}}"#),
            Ok(3.0)
        );
        assert!(
            v(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#)
                .unwrap_err()
                .contains("no data")
        );
        assert!(v(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"NaN"]}]}}"#
        )
        .unwrap_err()
        .contains("NaN"));
        assert!(
            v(r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#)
                .unwrap_err()
                .contains("bad_data: parse error")
        );
        assert!(v(r#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#)
            .unwrap_err()
            .contains("2 series"));
        assert_eq!(encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }
}

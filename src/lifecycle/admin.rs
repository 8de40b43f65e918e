//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process
//! serves), `/readyz` (config loaded and every route has an upstream it can use;
//! the body also names every upstream with no live address), `/status`
//! (JSON: routes, weights, shares served, rollouts; [`super::status`]) and
//! `POST /rollout/ROUTE/resume|abort`.
//! Meant for Prometheus and for an ALB target-group health check.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};

use crate::model::Process;

pub struct AdminApp {
    pub process: Arc<Process>,
}

fn text(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let post = session.req_header().method == http::Method::POST;
        let plain = "text/plain; charset=utf-8";
        if path.starts_with("/rollout/") {
            if !post {
                return text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    plain,
                    b"use POST (cutover rollout resume|abort ROUTE)\n".to_vec(),
                );
            }
            let (code, body) = super::status::operate(&self.process, &path);
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return text(code, plain, body.into_bytes());
        }
        match path.as_str() {
            "/status" => {
                let mut body = serde_json::to_vec_pretty(&super::status::status_json(&self.process))
                    .unwrap_or_default();
                body.push(b'\n');
                text(StatusCode::OK, "application/json", body)
            }
            "/metrics" => {
                self.process.model().sample_address_gauges();
                self.process.metrics.sample_process();
                let families = self.process.metrics.registry.gather();
                let mut body = Vec::with_capacity(16 * 1024);
                match TextEncoder::new().encode(&families, &mut body) {
                    Ok(()) => text(StatusCode::OK, prometheus::TEXT_FORMAT, body),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        plain,
                        format!("cannot encode metrics: {e}\n").into_bytes(),
                    ),
                }
            }
            "/healthz" => text(StatusCode::OK, plain, b"ok\n".to_vec()),
            "/readyz" => {
                let model = self.process.model();
                let reasons = model.not_ready_reasons();
                let mut body = if reasons.is_empty() {
                    "ready\n".to_string()
                } else {
                    format!("not ready:\n{}\n", reasons.join("\n"))
                };
                for line in model.dead_upstreams() {
                    body.push_str(&line);
                    body.push('\n');
                }
                let status = if reasons.is_empty() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                text(status, plain, body.into_bytes())
            }
            _ => text(
                StatusCode::NOT_FOUND,
                plain,
                b"cutover admin: /metrics, /healthz, /readyz, /status, POST /rollout/ROUTE/resume|abort\n"
                    .to_vec(),
            ),
        }
    }
}

//! The model the fuzz targets run the request path on: one route for
//! `cdn.example.test` and `*.img.example.test`, request and response header
//! edits, a trusted client-address header, one upstream at a fixed address
//! (no DNS) with a rewritten Host. Built once per process.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use cutover::model::{Model, Process};

pub const HOST_HEADER: &str = "cdn-new.example.test";

const CONFIG: &str = "
phase: fuzz
listeners:
  - address: 127.0.0.1:8080
client_ip: { header: X-Forwarded-For, trusted: [10.0.0.0/8, 127.0.0.1] }
routes:
  - name: cdn
    hosts: [cdn.example.test, \"*.img.example.test\"]
    request_headers: { set: { X-Migration: fuzz }, remove: [Cookie] }
    response_headers: { set: { X-Served-Via: cutover }, remove: [Server] }
    upstreams:
      - name: new
        address: 127.0.0.1:443
        host_header: cdn-new.example.test
        sni: cdn-new.example.test
";

pub fn model() -> Arc<Model> {
    static PROCESS: OnceLock<Arc<Process>> = OnceLock::new();
    PROCESS
        .get_or_init(|| {
            let config = cutover::config::parse(std::path::Path::new("fuzz.yaml"), CONFIG)
                .expect("the fuzz config is valid");
            Process::new(
                config,
                Arc::new(cutover::observe::metrics::Metrics::new()),
                Arc::new(cutover::model::dns::Resolver::new(None)),
                None,
            )
        })
        .model()
}

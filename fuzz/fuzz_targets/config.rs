//! Config text → parse and validate: never panics, and every problem says
//! where it is (a key path, or a line and column). The text is read three
//! ways: as a whole config or a bootstrap (`config_source`), and as a
//! document served to a fixed bootstrap.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use cutover::config::{Bootstrap, ConfigError, Loaded};
use libfuzzer_sys::fuzz_target;

fn assert_locates_every_problem(e: &ConfigError) {
    assert!(!e.problems.is_empty(), "an error without a problem");
    for p in &e.problems {
        assert!(
            !p.path.is_empty() || p.position.is_some(),
            "a problem that says neither key path nor position: {p:?}"
        );
        assert!(!p.message.is_empty(), "a problem without a message: {p:?}");
    }
    // The report renders.
    let _ = e.to_string();
}

fn bootstrap() -> &'static Bootstrap {
    static B: OnceLock<Bootstrap> = OnceLock::new();
    B.get_or_init(|| {
        let text = "config_source: { url: \"https://config.example.com/c.yaml\" }\nlisteners: [{ address: 127.0.0.1:8080 }]\n";
        match cutover::config::parse_file(Path::new("/nonexistent/boot.yaml"), text.into(), None) {
            Ok(Loaded::Bootstrap(b)) => b,
            _ => panic!("the fixed bootstrap must check"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/fuzz.yaml");
    if let Err(e) = cutover::config::parse_file(path, text.to_string(), None) {
        assert_locates_every_problem(&e);
    }
    match bootstrap().with_document("https://config.example.com/c.yaml", text) {
        Err(e) => assert_locates_every_problem(&e),
        Ok(c) => assert_eq!(c.sha256, cutover::config::sha256_hex(data)),
    }
});

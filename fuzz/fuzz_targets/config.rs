//! Config text → parse and validate: never panics, and every problem says
//! where it is (a key path, or a line and column).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = cutover::config::parse(std::path::Path::new("/nonexistent/fuzz.yaml"), text) {
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
});

//! Any Host value → routing's normalisation: never panics; a name it keeps
//! is lower-case host characters only, at most 253 bytes, without port or
//! trailing dot, and normalising it again changes nothing.
#![no_main]

use cutover::policy::routing::normalize_authority;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(host) = normalize_authority(data) else {
        return;
    };
    let h = host.as_str();
    assert!(!h.is_empty() && h.len() <= 253, "{h:?}");
    assert!(!h.ends_with('.'), "{h:?}");
    assert!(
        h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._:".contains(&b)),
        "{h:?}"
    );
    if !h.contains(':') {
        let again = normalize_authority(h.as_bytes()).expect("a normalised name normalises");
        assert_eq!(again.as_str(), h);
    }
});

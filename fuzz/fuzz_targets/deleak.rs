//! A response field's value → the de-leak rewrite. Never panics; leaves
//! alone any value that does not name one of ours; what it writes is a
//! valid field value, no longer names ours where it rewrote, and keeps
//! everything after the part it replaced.
#![no_main]

use cutover::policy::deleak::{rewrite, Field, Names, Outcome, Public};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, value)) = data.split_first() else {
        return;
    };
    // What a parsed field value can hold (httparse refuses the rest).
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return;
    }
    let field = Field::ALL[usize::from(flags & 3)];
    let names = Names::new(["cdn-new.example.test", "d1.cloudfront.net"]);
    let public = Public {
        authority: if flags & 4 == 0 { b"www.example.test:8443" } else { b"[2001:db8::1]:8080" },
        https: flags & 8 == 0,
    };
    let mut out = Vec::new();
    let outcome = rewrite(field, value, &names, &public, &mut out);
    let lower = value.to_ascii_lowercase();
    let mentions = |v: &[u8]| {
        [&b"cdn-new.example.test"[..], b"d1.cloudfront.net"]
            .iter()
            .any(|n| v.windows(n.len()).any(|w| w == *n))
    };
    match outcome {
        Outcome::Untouched | Outcome::Unreadable => assert!(out.is_empty()),
        Outcome::Rewritten => {
            assert!(mentions(&lower), "rewrote a value naming nothing of ours");
            assert!(
                out.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80),
                "not a field value: {:?}",
                String::from_utf8_lossy(&out)
            );
            assert_ne!(out, value, "a rewrite that changed nothing");
            if matches!(field, Field::Location | Field::ContentLocation) {
                let text = out.to_ascii_lowercase();
                let start = text.iter().position(|&b| b == b'/').unwrap_or(0) + 2;
                let host_end = text[start..]
                    .iter()
                    .position(|&b| matches!(b, b'/' | b'?' | b'#'))
                    .map_or(text.len(), |i| start + i);
                assert!(
                    !mentions(&text[..host_end]),
                    "our name left in the authority: {:?}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
    }
});

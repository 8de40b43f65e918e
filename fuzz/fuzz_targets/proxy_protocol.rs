//! The start of a connection → the PROXY header reader. Never panics; a
//! header it accepts lies within the bytes given, and reading any longer
//! prefix of the same bytes gives the same answer (a header split across
//! reads is read the same as a whole one); "incomplete" only for a prefix
//! of something that could still be a header.
#![no_main]

use cutover::policy::proxy_protocol::{read, Start, V2_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = read(data);
    match &whole {
        Ok(Start::Header(h)) => {
            assert!(h.len <= data.len() && h.len <= V2_MAX.max(107));
            assert!(!(h.local && h.source.is_some()));
            if let Some(id) = &h.vpce {
                assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            }
            // Any prefix that holds the header reads the same header.
            assert_eq!(read(&data[..h.len]), whole);
            for cut in 0..h.len {
                assert!(
                    matches!(read(&data[..cut]), Ok(Start::Incomplete)),
                    "a {cut}-byte prefix of a {}-byte header is not incomplete",
                    h.len
                );
            }
        }
        Ok(Start::NoHeader) => {
            assert!(!data.starts_with(b"PROXY ") && !data.starts_with(b"\r\n\r\n\0\r\nQUIT\n"));
        }
        Ok(Start::Incomplete) => assert!(data.len() < V2_MAX + 16),
        Err(_) => {}
    }
});

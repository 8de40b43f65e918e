//! A chunked body, fed to the fast path's scanner in pieces, against the
//! strict reference decoder: the scanner finds the same end wherever the
//! input is cut; what it forwards is always a strictly valid chunked body
//! with the same data; and it accepts every body the strict decoder accepts.
//! And the Pingora path's chunk-size parser (httparse, as patched in
//! `vendor/httparse`) reads the first size line as the scanner does: a
//! chunked request is accepted or refused alike on both carriers.
#![no_main]

use cutover::paths::fast::chunked::ChunkedEnd;
use cutover::rehearsal::strict::{decode_chunked, Chunked};
use libfuzzer_sys::fuzz_target;

/// Feed `body` cut after each offset in `cuts`; the forwarded bytes and the end.
fn scan(body: &[u8], cuts: &[usize]) -> Option<(Vec<u8>, Option<usize>)> {
    let mut c = ChunkedEnd::default();
    let mut forwarded = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
        let cut = cut.clamp(start, body.len());
        let piece = &body[start..cut];
        let s = c.feed(piece).ok()?;
        forwarded.extend_from_slice(&piece[..s.relay]);
        if let Some(n) = s.end {
            if s.terminator {
                forwarded.extend_from_slice(b"\r\n");
            }
            return Some((forwarded, Some(start + n)));
        }
        start = cut;
    }
    Some((forwarded, None))
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    // The first bytes say where to cut the body.
    let n = usize::from(n % 8).min(rest.len());
    let (cut_bytes, body) = rest.split_at(n);
    let mut cuts: Vec<usize> = cut_bytes.iter().map(|&b| usize::from(b)).collect();
    cuts.sort_unstable();

    // The first line as far as either could read it (up to its LF).
    let line = body
        .iter()
        .position(|&b| b == b'\n')
        .map_or(body, |lf| &body[..=lf]);
    if line.len() < 4000 {
        let scanner = ChunkedEnd::default().feed(line).is_ok();
        match httparse::parse_chunk_size(line) {
            Ok(_) => assert!(
                scanner,
                "Pingora's parser accepts a size line the scanner refuses: {:?}",
                String::from_utf8_lossy(line)
            ),
            Err(_) => assert!(
                !scanner,
                "the scanner accepts a size line Pingora's parser refuses: {:?}",
                String::from_utf8_lossy(line)
            ),
        }
    }

    let whole = scan(body, &[]);
    let pieces = scan(body, &cuts);
    assert_eq!(
        whole.as_ref().map(|w| w.1),
        pieces.as_ref().map(|p| p.1),
        "the end depends on the cuts"
    );
    if let (Some((a, _)), Some((b, _))) = (&whole, &pieces) {
        assert_eq!(a, b, "the forwarded bytes depend on the cuts");
    }
    let reference = decode_chunked(body);
    if let Chunked::Complete { len, .. } = &reference {
        assert_eq!(
            whole.as_ref().and_then(|w| w.1),
            Some(*len),
            "refused or misplaced the end of a valid body"
        );
    }
    if let Some((forwarded, Some(end))) = whole {
        match decode_chunked(&forwarded) {
            Chunked::Complete {
                body: data,
                trailers,
                len,
            } => {
                assert_eq!(len, forwarded.len(), "forwarded bytes after the body");
                assert!(trailers.is_empty(), "trailers were forwarded");
                // The data is the input's, chunk for chunk.
                if let Chunked::Complete { body: expected, .. } = decode_chunked(&body[..end]) {
                    assert_eq!(data, expected);
                }
            }
            other => panic!(
                "forwarded a body the strict decoder refuses ({other:?}): {:?}",
                String::from_utf8_lossy(&forwarded)
            ),
        }
    }
});

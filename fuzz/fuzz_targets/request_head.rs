//! A client's request head → the fast path's parse, eligibility check,
//! routing and upstream request. Never panics; whatever it writes is one
//! request head that the strict reader reads back whole (followed by the body
//! the client declared, which the fast path relays as it comes: so many
//! bytes, or chunks), with the client's method and target, the configured
//! Host, the framing policy's body framing, and no field the policy does
//! not forward.
#![no_main]

mod common;

use cutover::policy::fields::forward_request_field;
use cutover::policy::framing::{request_body, RequestBody};
use cutover::rehearsal::strict::{self, Read};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let model = common::model();
    let mut out = Vec::new();
    if !cutover::paths::fast::prepare_request(data, &model, Some("192.0.2.1"), &mut out) {
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    assert!(
        matches!(req.parse(data), Ok(httparse::Status::Complete(_))),
        "served a head httparse does not read"
    );
    // The framing the policy gives the body; the fast path relays exactly
    // that many bytes after the head it wrote, or the client's chunks (a
    // strictly valid chunked body, the scanner's own fuzz target shows).
    let fields = req.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let body = match request_body(false, fields) {
        Ok(RequestBody::None) => Vec::new(),
        Ok(RequestBody::Length(n)) => {
            let Ok(filler) = usize::try_from(n) else {
                return;
            };
            if filler > 1 << 20 {
                // Too large to build here: the head alone must still be one
                // whole head that waits for its body.
                assert!(matches!(strict::read_request(&out), Read::Partial));
                return;
            }
            out.resize(out.len() + filler, b'b');
            vec![b'b'; filler]
        }
        Ok(RequestBody::Chunked) => {
            out.extend_from_slice(b"1\r\nb\r\n0\r\n\r\n");
            b"b".to_vec()
        }
        Err(e) => panic!("served a request whose framing the policy refuses: {e}"),
    };
    let msg = match strict::read_request(&out) {
        Read::Complete(m) => m,
        other => panic!(
            "the upstream request does not read strictly ({other:?}): {:?}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(msg.len, out.len(), "more than one request written");
    assert_eq!(msg.method(), req.method.unwrap());
    assert_eq!(msg.target(), req.path.unwrap());
    assert_eq!(
        msg.headers_named("host").collect::<Vec<_>>(),
        [common::HOST_HEADER.as_bytes()]
    );
    assert_eq!(msg.body, body, "the body does not read as the client's");
    for (name, _) in &msg.headers {
        assert!(
            forward_request_field(name.as_bytes(), false),
            "{name} was forwarded"
        );
        assert!(
            !name.eq_ignore_ascii_case("cookie"),
            "a removed field was forwarded"
        );
    }
});

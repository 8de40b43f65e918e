//! An upstream's response head → the fast path's check and the head it
//! writes for the client. Never panics; what it writes reads strictly, has
//! the upstream's status, at most one framing field, and no field the policy
//! does not forward.
#![no_main]

mod common;

use cutover::policy::fields::forward_response_field;
use cutover::rehearsal::strict::{self, Read};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, head)) = data.split_first() else {
        return;
    };
    let model = common::model();
    let plan = &model.routes[0].upstreams[0].plan;
    let mut out = Vec::new();
    let head_request = flags & 1 == 1;
    let Ok(Some(status)) =
        cutover::paths::fast::client_head_for_fuzzing(head, head_request, plan, &mut out)
    else {
        return;
    };
    // Read as the head of a HEAD answer: the body is not the point here.
    let msg = match strict::read_response(&out, true, false) {
        Read::Complete(m) => m,
        other => panic!(
            "the client's head does not read strictly ({other:?}): {:?}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(msg.len, out.len());
    assert_eq!(msg.status(), status);
    let lengths = msg.headers_named("content-length").count();
    let codings = msg.headers_named("transfer-encoding").count();
    assert!(
        lengths + codings <= 1,
        "framing fields: {:?}",
        String::from_utf8_lossy(&out)
    );
    for (name, _) in &msg.headers {
        assert!(
            forward_response_field(name.as_bytes(), status)
                || name.eq_ignore_ascii_case("connection"),
            "{name} reached the client"
        );
        assert!(
            !name.eq_ignore_ascii_case("server"),
            "a removed field reached the client"
        );
    }
});

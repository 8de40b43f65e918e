//! Why the fast path hands a client connection to the Pingora path: the
//! `reason` label of `cutover_connections_handed_over_total`. The fast
//! path serves HTTP/1.1 requests of the common methods with no body or a
//! `Content-Length` one, in origin form, with one Host a route owns, on any
//! listener; the first request that is
//! anything else takes its connection to Pingora, which applies the same
//! policy (and refuses what must be refused).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// Not one of GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH.
    Method = 0,
    /// Body framing the policy refuses, or a chunked body that does not
    /// parse in the bytes read with its head (Pingora answers both 400).
    Body = 1,
    /// Not HTTP/1.1.
    Version = 2,
    /// `Upgrade`, or `Connection: upgrade`.
    Upgrade = 3,
    /// `Expect`.
    Expect = 4,
    /// An absolute-form, authority-form or asterisk-form target.
    TargetForm = 5,
    /// No Host, several, one that does not parse, or one no route owns.
    Host = 6,
    /// A head the fast path's parser does not read whole.
    Malformed = 7,
    /// A head larger than the fast path reads.
    HeadSize = 8,
    /// The route has no upstream to choose from (Pingora answers 502).
    NoUpstream = 9,
}

impl Handover {
    pub const ALL: [Handover; 10] = [
        Handover::Method,
        Handover::Body,
        Handover::Version,
        Handover::Upgrade,
        Handover::Expect,
        Handover::TargetForm,
        Handover::Host,
        Handover::Malformed,
        Handover::HeadSize,
        Handover::NoUpstream,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Handover::Method => "method",
            Handover::Body => "body",
            Handover::Version => "version",
            Handover::Upgrade => "upgrade",
            Handover::Expect => "expect",
            Handover::TargetForm => "target_form",
            Handover::Host => "host",
            Handover::Malformed => "malformed",
            Handover::HeadSize => "head_size",
            Handover::NoUpstream => "no_upstream",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Handover;

    #[test]
    fn all_is_in_discriminant_order() {
        for (i, h) in Handover::ALL.iter().enumerate() {
            assert_eq!(*h as usize, i, "{h:?}");
        }
    }
}

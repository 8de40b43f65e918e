//! What a CDN edge's own response fields say: whether the answer came from
//! its cache (`X-Cache`), whether the edge made the answer itself instead of
//! relaying the origin's, and the request's identity at the edge
//! (`X-Amz-Cf-Id`, `X-Amz-Cf-Pop`), which AWS support asks for.
//!
//! An edge-made answer is told from an origin's by two fields together:
//! `X-Cache: Error from cloudfront` *and* `Server: CloudFront`. The first
//! alone is not enough: CloudFront also says "Error" for an origin's own
//! 4xx/5xx (an S3 origin's 403 `AccessDenied` comes with `Server:
//! AmazonS3`). Among edge-made answers, 400, 403 and 421 are *refusals*:
//! the edge does not serve this name or this request (no alternate domain
//! name for the Host, a certificate of another account, a WAF block); other
//! statuses are the edge's own errors (502/504: it cannot reach the origin).
//!
//! Both carriers feed the response's fields to [`CdnFacts::add`] as they
//! read them; nothing here allocates.

/// What `X-Cache` says, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit = 0,
    Miss,
    RefreshHit,
    Error,
    Redirect,
    /// Made by an edge function (`LambdaGeneratedResponse`,
    /// `FunctionGeneratedResponse`).
    Generated,
    Other,
}

impl CacheResult {
    pub const ALL: [CacheResult; 7] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::RefreshHit,
        CacheResult::Error,
        CacheResult::Redirect,
        CacheResult::Generated,
        CacheResult::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::RefreshHit => "refresh_hit",
            CacheResult::Error => "error",
            CacheResult::Redirect => "redirect",
            CacheResult::Generated => "generated",
            CacheResult::Other => "other",
        }
    }

    /// The first word of an `X-Cache` value's last entry: CloudFront's
    /// `Hit from cloudfront`, Varnish's `HIT`, Fastly's `MISS, HIT` (one
    /// entry per cache on the way, the edge nearest the client last).
    fn of(value: &[u8]) -> CacheResult {
        let word = value
            .rsplit(|b| *b == b',')
            .next()
            .unwrap_or(value)
            .split(|b| *b == b' ' || *b == b'\t')
            .find(|w| !w.is_empty())
            .unwrap_or(b"");
        let is = |w: &[u8]| word.eq_ignore_ascii_case(w);
        if is(b"hit") {
            CacheResult::Hit
        } else if is(b"miss") {
            CacheResult::Miss
        } else if is(b"refreshhit") {
            CacheResult::RefreshHit
        } else if is(b"error") {
            CacheResult::Error
        } else if is(b"redirect") {
            CacheResult::Redirect
        } else if word.len() > 17
            && word[word.len() - 17..].eq_ignore_ascii_case(b"generatedresponse")
        {
            CacheResult::Generated
        } else {
            CacheResult::Other
        }
    }
}

/// An answer the edge made itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeAnswer {
    /// 400, 403, 421: the edge does not serve this name or request.
    Refused = 0,
    /// Any other error status the edge made (502/504: origin unreachable).
    Error,
}

impl EdgeAnswer {
    pub const ALL: [EdgeAnswer; 2] = [EdgeAnswer::Refused, EdgeAnswer::Error];

    pub fn label(self) -> &'static str {
        match self {
            EdgeAnswer::Refused => "refused",
            EdgeAnswer::Error => "error",
        }
    }
}

/// A short field value kept inline (no allocation); empty when absent, too
/// long or not visible ASCII.
#[derive(Clone, Copy)]
pub struct Stamp<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> Default for Stamp<N> {
    fn default() -> Self {
        Self {
            len: 0,
            bytes: [0; N],
        }
    }
}

impl<const N: usize> Stamp<N> {
    fn set(&mut self, value: &[u8]) {
        let value = value.trim_ascii();
        if value.len() <= N && value.len() <= 255 && value.iter().all(|b| b.is_ascii_graphic()) {
            self.bytes[..value.len()].copy_from_slice(value);
            self.len = value.len() as u8;
        }
    }

    pub fn as_str(&self) -> &str {
        // Only visible ASCII is ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl<const N: usize> std::fmt::Debug for Stamp<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// The CDN facts of one response.
#[derive(Debug, Clone, Copy, Default)]
pub struct CdnFacts {
    pub cache: Option<CacheResult>,
    server_is_cloudfront: bool,
    /// `X-Amz-Cf-Id` (CloudFront's are 56 characters).
    pub id: Stamp<72>,
    /// `X-Amz-Cf-Pop` (`IAD89-C1`).
    pub pop: Stamp<24>,
}

impl CdnFacts {
    /// One field of the response head, in any case.
    #[inline]
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        match name.len() {
            7 if name.eq_ignore_ascii_case(b"x-cache") => {
                self.cache = Some(CacheResult::of(value));
            }
            6 if name.eq_ignore_ascii_case(b"server") => {
                self.server_is_cloudfront = value.trim_ascii().eq_ignore_ascii_case(b"cloudfront");
            }
            11 if name.eq_ignore_ascii_case(b"x-amz-cf-id") => self.id.set(value),
            12 if name.eq_ignore_ascii_case(b"x-amz-cf-pop") => self.pop.set(value),
            _ => {}
        }
    }

    /// Whether the edge made this `status` itself, and which kind.
    pub fn edge_answer(&self, status: u16) -> Option<EdgeAnswer> {
        if self.cache != Some(CacheResult::Error) || !self.server_is_cloudfront || status < 400 {
            return None;
        }
        Some(match status {
            400 | 403 | 421 => EdgeAnswer::Refused,
            _ => EdgeAnswer::Error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(fields: &[(&str, &str)]) -> CdnFacts {
        let mut f = CdnFacts::default();
        for (n, v) in fields {
            f.add(n.as_bytes(), v.as_bytes());
        }
        f
    }

    #[test]
    fn cache_results() {
        for (value, result) in [
            ("Hit from cloudfront", CacheResult::Hit),
            ("Miss from cloudfront", CacheResult::Miss),
            ("RefreshHit from cloudfront", CacheResult::RefreshHit),
            ("Error from cloudfront", CacheResult::Error),
            ("Redirect from cloudfront", CacheResult::Redirect),
            (
                "LambdaGeneratedResponse from cloudfront",
                CacheResult::Generated,
            ),
            (
                "FunctionGeneratedResponse from cloudfront",
                CacheResult::Generated,
            ),
            ("LimitExceeded from cloudfront", CacheResult::Other),
            ("MISS, HIT", CacheResult::Hit),
            ("  hit ", CacheResult::Hit),
            ("", CacheResult::Other),
            ("\u{7f}\u{0}", CacheResult::Other),
        ] {
            assert_eq!(
                facts(&[("X-Cache", value)]).cache,
                Some(result),
                "{value:?}"
            );
        }
        assert_eq!(facts(&[("X-Cache-Status", "HIT")]).cache, None);
    }

    #[test]
    fn the_edges_own_answers_and_the_origins() {
        let edge = facts(&[
            ("server", "CloudFront"),
            ("x-cache", "Error from cloudfront"),
            ("X-Amz-Cf-Pop", "IAD89-C1"),
            (
                "X-Amz-Cf-Id",
                "Xn3l0FMLp0wLc_1ZyM2ZyQmd3bD3p6vL1zP1QF-4pBkFVrFlS8bR0A==",
            ),
        ]);
        assert_eq!(edge.edge_answer(403), Some(EdgeAnswer::Refused));
        assert_eq!(edge.edge_answer(421), Some(EdgeAnswer::Refused));
        assert_eq!(edge.edge_answer(502), Some(EdgeAnswer::Error));
        assert_eq!(edge.edge_answer(200), None);
        assert_eq!(edge.pop.as_str(), "IAD89-C1");
        assert_eq!(edge.id.as_str().len(), 56);
        // An S3 origin's 403 through CloudFront: the origin's, not the edge's.
        let origin = facts(&[("Server", "AmazonS3"), ("X-Cache", "Error from cloudfront")]);
        assert_eq!(origin.edge_answer(403), None);
        // No X-Cache: not a CDN answer.
        assert_eq!(facts(&[("Server", "CloudFront")]).edge_answer(403), None);
    }

    #[test]
    fn stamps_keep_only_short_visible_values() {
        let f = facts(&[
            ("x-amz-cf-pop", "IAD\u{1}89"),
            ("x-amz-cf-id", &"a".repeat(200)),
        ]);
        assert_eq!(f.pop.as_str(), "");
        assert_eq!(f.id.as_str(), "");
        let f = facts(&[("x-amz-cf-pop", " FRA56-P5 ")]);
        assert_eq!(f.pop.as_str(), "FRA56-P5");
    }
}

//! How a message's body is delimited, decided once for both carriers.
//!
//! cutover sits between an ALB that shares connections among users and a CDN
//! edge: wherever two parsers could disagree on where a message ends, one
//! of them can be made to see a request or a response the other does not.
//! So the rules here accept one reading only and refuse everything else —
//! as nginx does for requests, and stricter than most proxies for responses:
//!
//! - `Content-Length`: one field, `1*DIGIT` (no sign, no list, no
//!   duplicates, at most 18 digits);
//! - `Transfer-Encoding`: one field whose value is exactly `chunked` (no
//!   other coding, no list), never with `Content-Length` in a request, and
//!   never in an HTTP/1.0 request;
//! - a response to HEAD, a 204 and a 304 have no body whatever they say.
//!
//! The fast path and the Pingora path both call these functions on the
//! fields they parsed (httparse's, or Pingora's `HeaderMap`), and render the
//! refusal their own way. The chunk lines themselves are checked by
//! [`crate::paths::fast::chunked`] (fast path) and by httparse's `parse_chunk_size`
//! (Pingora, with the patch in `vendor/httparse`).

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    None,
    Length(u64),
    Chunked,
}

/// How a response body is delimited, and whether the upstream connection
/// can carry another request after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFraming {
    pub body: ResponseBody,
    pub reusable: bool,
    /// A `Content-Length` came with `Transfer-Encoding: chunked`: the
    /// length is wrong by definition and must not be forwarded.
    pub drop_content_length: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// At most this many interim (1xx) responses before the final one; more is
/// an upstream that never answers, and gets a 502.
pub const MAX_INTERIM_RESPONSES: usize = 16;

/// `1*DIGIT`, nothing else (Rust's integer parser takes a `+`), at most 18
/// digits so the value fits in a u64 with room.
pub fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 {
        return None;
    }
    let mut n = 0u64;
    for &b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Some(n)
}

/// The framing fields of a message, collected in the carrier's own pass
/// over its fields ([`FramingFields::add`]), then judged here.
#[derive(Default)]
pub struct FramingFields<'a> {
    length: Option<&'a [u8]>,
    lengths: usize,
    coding: Option<&'a [u8]>,
    codings: usize,
}

impl<'a> FramingFields<'a> {
    pub fn collect(fields: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut f = FramingFields::default();
        for (name, value) in fields {
            f.add(name, value);
        }
        f
    }

    /// Note one field; `true` if it is a framing field.
    pub fn add(&mut self, name: &[u8], value: &'a [u8]) -> bool {
        if name.len() == 14 && name.eq_ignore_ascii_case(b"content-length") {
            self.lengths += 1;
            self.length = Some(value.trim_ascii());
            true
        } else if name.len() == 17 && name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.codings += 1;
            self.coding = Some(value.trim_ascii());
            true
        } else {
            false
        }
    }

    /// The length, if one is given; `Err` unless there is at most one field
    /// of each kind and the length is a number.
    fn length(&self) -> Result<Option<u64>, &'static str> {
        if self.lengths > 1 {
            return Err("more than one Content-Length");
        }
        if self.codings > 1 {
            return Err("more than one Transfer-Encoding");
        }
        match self.length {
            Some(v) => parse_content_length(v)
                .map(Some)
                .ok_or("Content-Length is not a number"),
            None => Ok(None),
        }
    }
}

/// The body of a request, or why its framing is refused (400).
pub fn request_body<'a>(
    http10: bool,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<RequestBody, &'static str> {
    FramingFields::collect(fields).request_body(http10)
}

/// The body of a final (status >= 200) response, or why it is refused (502).
/// `http10`: the response said HTTP/1.0; `close`: its Connection field
/// asked to close.
pub fn response_body<'a>(
    status: u16,
    head_request: bool,
    http10: bool,
    close: bool,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<ResponseFraming, &'static str> {
    FramingFields::collect(fields).response_body(status, head_request, http10, close)
}

impl FramingFields<'_> {
    /// [`request_body`] for fields collected already.
    pub fn request_body(&self, http10: bool) -> Result<RequestBody, &'static str> {
        let length = self.length()?;
        match self.coding {
            Some(_) if http10 => Err("Transfer-Encoding in an HTTP/1.0 request"),
            Some(_) if length.is_some() => Err("both Transfer-Encoding and Content-Length"),
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => Ok(RequestBody::Chunked),
            Some(_) => Err("a transfer coding other than chunked"),
            None => Ok(match length {
                None | Some(0) => RequestBody::None,
                Some(n) => RequestBody::Length(n),
            }),
        }
    }

    /// [`response_body`] for fields collected already.
    pub fn response_body(
        &self,
        status: u16,
        head_request: bool,
        http10: bool,
        close: bool,
    ) -> Result<ResponseFraming, &'static str> {
        let length = self.length()?;
        let chunked = match self.coding {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => true,
            Some(_) => return Err("a transfer coding other than chunked"),
            None => false,
        };
        let both = chunked && length.is_some();
        let body = if head_request || status == 204 || status == 304 {
            ResponseBody::None
        } else if chunked {
            ResponseBody::Chunked
        } else {
            match length {
                Some(0) => ResponseBody::None,
                Some(n) => ResponseBody::Length(n),
                None => ResponseBody::UntilClose,
            }
        };
        Ok(ResponseFraming {
            body,
            // Both framings at once: read as chunked (RFC 9112 6.3), but the
            // upstream is suspect, so its connection is not used again.
            reusable: !(http10 || close || both || body == ResponseBody::UntilClose),
            drop_content_length: both,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(raw: &[(&'static str, &'static str)]) -> Vec<(&'static [u8], &'static [u8])> {
        raw.iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect()
    }

    fn req(raw: &[(&'static str, &'static str)]) -> Result<RequestBody, &'static str> {
        request_body(false, fields(raw).into_iter())
    }

    fn resp(
        status: u16,
        raw: &[(&'static str, &'static str)],
    ) -> Result<ResponseFraming, &'static str> {
        response_body(status, false, false, false, fields(raw).into_iter())
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"123"), Some(123));
        assert_eq!(
            parse_content_length(b"999999999999999999"),
            Some(999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"5, 5",
            b"0x5",
            b"1 2",
            b"1.5",
            b"9999999999999999999",
        ] {
            assert_eq!(
                parse_content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn request_framing() {
        assert_eq!(req(&[]), Ok(RequestBody::None));
        assert_eq!(req(&[("Content-Length", "0")]), Ok(RequestBody::None));
        assert_eq!(
            req(&[("content-length", " 5 ")]),
            Ok(RequestBody::Length(5))
        );
        assert_eq!(
            req(&[("Transfer-Encoding", "CHUNKED")]),
            Ok(RequestBody::Chunked)
        );
        assert!(req(&[("Content-Length", "5"), ("Content-Length", "5")]).is_err());
        assert!(req(&[("Content-Length", "+5")]).is_err());
        assert!(req(&[("Transfer-Encoding", "chunked"), ("Content-Length", "5")]).is_err());
        assert!(req(&[("Transfer-Encoding", "chunked, chunked")]).is_err());
        assert!(req(&[("Transfer-Encoding", "gzip, chunked")]).is_err());
        assert!(req(&[
            ("Transfer-Encoding", "chunked"),
            ("Transfer-Encoding", "chunked")
        ])
        .is_err());
        assert!(request_body(
            true,
            fields(&[("Transfer-Encoding", "chunked")]).into_iter()
        )
        .is_err());
        // Not framing fields: the underscore variant is dropped elsewhere.
        assert_eq!(
            req(&[("Transfer_Encoding", "chunked")]),
            Ok(RequestBody::None)
        );
    }

    #[test]
    fn response_framing() {
        let f = resp(200, &[("Content-Length", "5")]).unwrap();
        assert_eq!((f.body, f.reusable), (ResponseBody::Length(5), true));
        let f = resp(200, &[]).unwrap();
        assert_eq!((f.body, f.reusable), (ResponseBody::UntilClose, false));
        let f = resp(
            200,
            &[("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        )
        .unwrap();
        assert_eq!(
            (f.body, f.reusable, f.drop_content_length),
            (ResponseBody::Chunked, false, true)
        );
        let f = resp(204, &[("Content-Length", "5")]).unwrap();
        assert_eq!((f.body, f.reusable), (ResponseBody::None, true));
        let f = response_body(
            200,
            true,
            false,
            false,
            fields(&[("Content-Length", "5")]).into_iter(),
        )
        .unwrap();
        assert_eq!(f.body, ResponseBody::None);
        let f = response_body(
            200,
            false,
            false,
            true,
            fields(&[("Content-Length", "5")]).into_iter(),
        )
        .unwrap();
        assert!(!f.reusable);
        for bad in [
            &[("Content-Length", "+5")][..],
            &[("Content-Length", "5, 5")],
            &[("Content-Length", "5"), ("Content-Length", "5")],
            &[("Content-Length", "-1")],
            &[("Transfer-Encoding", "gzip")],
            &[("Transfer-Encoding", "chunked, chunked")],
        ] {
            assert!(resp(200, bad).is_err(), "{bad:?}");
        }
    }
}

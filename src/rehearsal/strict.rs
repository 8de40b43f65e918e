//! A strict RFC 9112 message reader: the yardstick that the tests' recording
//! origin, the raw test client and the fuzzers hold cutover's output against.
//!
//! It accepts only what the grammar allows — CRLF line ends, token field
//! names, no obs-fold, no control bytes, one `Content-Length` of digits, a
//! `Transfer-Encoding` of exactly `chunked`, chunk lines with nothing but hex
//! digits and well-formed extensions — and says why when it refuses. It is
//! not on the request path: cutover's own parsing is `httparse` (fast path)
//! and Pingora's; this is the independent second opinion.

/// What a message starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Request { method: String, target: String },
    Response { status: u16, reason: Vec<u8> },
}

/// One whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub start: Start,
    /// Field names as sent, values as bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The decoded body (chunked framing removed).
    pub body: Vec<u8>,
    /// The trailer fields of a chunked body.
    pub trailers: Vec<(String, Vec<u8>)>,
    /// How many bytes of the input the message took.
    pub len: usize,
    /// The head as received, for assertions on exact bytes.
    pub raw_head: Vec<u8>,
    /// The body ran until the connection closed.
    pub close_delimited: bool,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn status(&self) -> u16 {
        match self.start {
            Start::Response { status, .. } => status,
            Start::Request { .. } => 0,
        }
    }

    pub fn target(&self) -> &str {
        match &self.start {
            Start::Request { target, .. } => target,
            Start::Response { .. } => "",
        }
    }

    pub fn method(&self) -> &str {
        match &self.start {
            Start::Request { method, .. } => method,
            Start::Response { .. } => "",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Complete(Message),
    /// More bytes are needed.
    Partial,
    /// Not a valid message; the reason.
    Invalid(String),
}

const MAX_HEAD: usize = 64 * 1024;

/// Read one request from the start of `buf`.
pub fn read_request(buf: &[u8]) -> Read {
    read_message(buf, Kind::Request)
}

/// Read one response from the start of `buf`; `head_request` says the
/// request was HEAD (no body whatever the head says), `eof` that the
/// connection has closed after `buf` (ends a close-delimited body).
pub fn read_response(buf: &[u8], head_request: bool, eof: bool) -> Read {
    read_message(buf, Kind::Response { head_request, eof })
}

#[derive(Clone, Copy)]
enum Kind {
    Request,
    Response { head_request: bool, eof: bool },
}

macro_rules! invalid {
    ($($arg:tt)*) => { return Read::Invalid(format!($($arg)*)) };
}

fn read_message(buf: &[u8], kind: Kind) -> Read {
    let Some(head_len) = find_crlfcrlf(buf) else {
        if let Some(bad) = bare_line_end(buf) {
            invalid!("{bad} in the head");
        }
        if buf.len() > MAX_HEAD {
            invalid!("head larger than {MAX_HEAD} bytes");
        }
        return Read::Partial;
    };
    let head = &buf[..head_len];
    if let Some(bad) = bare_line_end(&head[..head_len - 2]) {
        invalid!("{bad} in the head");
    }
    let mut lines = head[..head_len - 4].split(|&b| b == b'\n').map(|l| {
        l.strip_suffix(b"\r").unwrap_or(l) // every LF is preceded by CR (checked above)
    });
    let first = lines.next().unwrap_or(b"");
    let start = match kind {
        Kind::Request => match request_line(first) {
            Ok(s) => s,
            Err(e) => return Read::Invalid(e),
        },
        Kind::Response { .. } => match status_line(first) {
            Ok(s) => s,
            Err(e) => return Read::Invalid(e),
        },
    };
    let mut headers = Vec::new();
    for line in lines {
        match field_line(line) {
            Ok(f) => headers.push(f),
            Err(e) => return Read::Invalid(e),
        }
    }
    let mut msg = Message {
        start,
        headers,
        body: Vec::new(),
        trailers: Vec::new(),
        len: head_len,
        raw_head: head.to_vec(),
        close_delimited: false,
    };
    let framing = match framing(&msg, kind) {
        Ok(f) => f,
        Err(e) => return Read::Invalid(e),
    };
    let rest = &buf[head_len..];
    match framing {
        Framing::None => Read::Complete(msg),
        Framing::Length(n) => {
            if (rest.len() as u64) < n {
                return Read::Partial;
            }
            msg.body = rest[..n as usize].to_vec();
            msg.len += n as usize;
            Read::Complete(msg)
        }
        Framing::Chunked => match decode_chunked(rest) {
            Chunked::Complete {
                body,
                trailers,
                len,
            } => {
                msg.body = body;
                msg.trailers = trailers;
                msg.len += len;
                Read::Complete(msg)
            }
            Chunked::Partial => Read::Partial,
            Chunked::Invalid(e) => Read::Invalid(format!("chunked body: {e}")),
        },
        Framing::UntilClose { eof } => {
            if !eof {
                return Read::Partial;
            }
            msg.body = rest.to_vec();
            msg.len = buf.len();
            msg.close_delimited = true;
            Read::Complete(msg)
        }
    }
}

enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose { eof: bool },
}

fn framing(msg: &Message, kind: Kind) -> Result<Framing, String> {
    let te: Vec<&[u8]> = msg.headers_named("transfer-encoding").collect();
    let cl: Vec<&[u8]> = msg.headers_named("content-length").collect();
    let (no_body, eof) = match kind {
        Kind::Request => (false, false),
        Kind::Response { head_request, eof } => {
            let status = msg.status();
            (
                head_request || status < 200 || status == 204 || status == 304,
                eof,
            )
        }
    };
    if !te.is_empty() && !cl.is_empty() {
        return Err("both Transfer-Encoding and Content-Length".into());
    }
    if cl.len() > 1 {
        return Err("more than one Content-Length".into());
    }
    let length = match cl.first() {
        Some(v) => Some(content_length(v).ok_or_else(|| {
            format!(
                "Content-Length {:?} is not 1*DIGIT",
                String::from_utf8_lossy(v)
            )
        })?),
        None => None,
    };
    if te.len() > 1 {
        return Err("more than one Transfer-Encoding field".into());
    }
    let chunked = match te.first() {
        Some(v) if v.eq_ignore_ascii_case(b"chunked") => true,
        Some(v) => {
            return Err(format!(
                "Transfer-Encoding {:?} is not exactly `chunked`",
                String::from_utf8_lossy(v)
            ))
        }
        None => false,
    };
    if no_body {
        return Ok(Framing::None);
    }
    Ok(match (chunked, length, kind) {
        (true, _, _) => Framing::Chunked,
        (false, Some(n), _) => Framing::Length(n),
        (false, None, Kind::Request) => Framing::None,
        (false, None, Kind::Response { .. }) => Framing::UntilClose { eof },
    })
}

/// `1*DIGIT`, at most 18 digits (fits in a u64 with room).
pub fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn find_crlfcrlf(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// A CR not followed by LF or an LF not preceded by CR.
fn bare_line_end(buf: &[u8]) -> Option<&'static str> {
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' && (i == 0 || buf[i - 1] != b'\r') {
            return Some("a bare LF");
        }
        if b == b'\r' && buf.get(i + 1).is_some_and(|&n| n != b'\n') {
            return Some("a bare CR");
        }
    }
    None
}

pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_field_vchar(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) || b >= 0x80
}

fn request_line(line: &[u8]) -> Result<Start, String> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "request line {:?} is not `method SP target SP version`",
            String::from_utf8_lossy(line)
        ));
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err("method is not a token".into());
    }
    // Bytes above 0x7F are let through as nginx and Pingora pass them (raw
    // UTF-8 from clients that do not percent-encode); controls and spaces not.
    if target.is_empty() || !target.iter().all(|&b| b > 0x20 && b != 0x7f) {
        return Err(format!(
            "target {:?} has control bytes or spaces",
            String::from_utf8_lossy(target)
        ));
    }
    if version != b"HTTP/1.1" {
        return Err(format!(
            "version {:?} is not HTTP/1.1",
            String::from_utf8_lossy(version)
        ));
    }
    Ok(Start::Request {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
    })
}

fn status_line(line: &[u8]) -> Result<Start, String> {
    let bad = || {
        format!(
            "status line {:?} is not `HTTP/1.x SP 3DIGIT SP reason`",
            String::from_utf8_lossy(line)
        )
    };
    let (Some(b"HTTP/1.1" | b"HTTP/1.0"), Some(b' ')) = (line.get(..8), line.get(8)) else {
        return Err(bad());
    };
    let code = line.get(9..12).ok_or_else(bad)?;
    if !code.iter().all(u8::is_ascii_digit) || line.get(12) != Some(&b' ') {
        return Err(bad());
    }
    let reason = &line[13..];
    if !reason
        .iter()
        .all(|&b| b == b'\t' || b == b' ' || is_field_vchar(b))
    {
        return Err("reason phrase has control bytes".into());
    }
    let status = std::str::from_utf8(code)
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    if !(100..=599).contains(&status) {
        return Err(bad());
    }
    Ok(Start::Response {
        status,
        reason: reason.to_vec(),
    })
}

fn field_line(line: &[u8]) -> Result<(String, Vec<u8>), String> {
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err("obs-fold (a line starting with whitespace)".into());
    }
    let colon = line.iter().position(|&b| b == b':').ok_or_else(|| {
        format!(
            "field line {:?} has no colon",
            String::from_utf8_lossy(line)
        )
    })?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(format!(
            "field name {:?} is not a token",
            String::from_utf8_lossy(name)
        ));
    }
    // OWS is SP and HTAB only (`trim_ascii` would also take CR and FF).
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let raw = &line[colon + 1..];
    let start = raw.iter().position(|b| !ows(b)).unwrap_or(raw.len());
    let end = raw.iter().rposition(|b| !ows(b)).map_or(start, |e| e + 1);
    let value = &raw[start..end];
    if !value
        .iter()
        .all(|&b| b == b'\t' || b == b' ' || is_field_vchar(b))
    {
        return Err(format!(
            "field {:?} has control bytes in its value",
            String::from_utf8_lossy(name)
        ));
    }
    Ok((String::from_utf8_lossy(name).into_owned(), value.to_vec()))
}

/// The result of decoding a chunked body.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunked {
    Complete {
        body: Vec<u8>,
        trailers: Vec<(String, Vec<u8>)>,
        /// Bytes of the input the body took, trailers and final CRLF included.
        len: usize,
    },
    Partial,
    Invalid(String),
}

/// Decode a chunked body from the start of `buf`, strictly.
pub fn decode_chunked(buf: &[u8]) -> Chunked {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let Some(eol) = find_crlf(&buf[at..]) else {
            if let Some(bad) = bare_line_end(&buf[at..]) {
                return Chunked::Invalid(format!("{bad} in a chunk-size line"));
            }
            if buf.len() - at > 4096 {
                return Chunked::Invalid("chunk-size line longer than 4 KiB".into());
            }
            return Chunked::Partial;
        };
        let line = &buf[at..at + eol];
        let size = match chunk_size_line(line) {
            Ok(s) => s,
            Err(e) => return Chunked::Invalid(e),
        };
        at += eol + 2;
        if size == 0 {
            break;
        }
        let Some(end) = at.checked_add(size as usize) else {
            return Chunked::Invalid("chunk size overflows".into());
        };
        if buf.len() < end + 2 {
            return Chunked::Partial;
        }
        body.extend_from_slice(&buf[at..end]);
        if &buf[end..end + 2] != b"\r\n" {
            return Chunked::Invalid("chunk data not followed by CRLF".into());
        }
        at = end + 2;
    }
    let mut trailers = Vec::new();
    loop {
        let Some(eol) = find_crlf(&buf[at..]) else {
            if let Some(bad) = bare_line_end(&buf[at..]) {
                return Chunked::Invalid(format!("{bad} in the trailer section"));
            }
            return Chunked::Partial;
        };
        let line = &buf[at..at + eol];
        at += eol + 2;
        if line.is_empty() {
            return Chunked::Complete {
                body,
                trailers,
                len: at,
            };
        }
        match field_line(line) {
            Ok(f) => trailers.push(f),
            Err(e) => return Chunked::Invalid(format!("trailer: {e}")),
        }
    }
}

/// Where the first line ends (the index of its CR); `None` when no whole
/// line is there yet, or when the first LF is bare (the caller reports it).
fn find_crlf(buf: &[u8]) -> Option<usize> {
    let lf = buf.iter().position(|&b| b == b'\n')?;
    if lf > 0 && buf[lf - 1] == b'\r' {
        Some(lf - 1)
    } else {
        None
    }
}

/// `chunk-size [ chunk-ext ]` (RFC 9112 7.1.1), the CRLF already removed.
fn chunk_size_line(line: &[u8]) -> Result<u64, String> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(format!(
            "chunk-size line {:?} does not start with a hex digit",
            String::from_utf8_lossy(line)
        ));
    }
    if digits > 16 {
        return Err("chunk size longer than 16 hex digits".into());
    }
    let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap_or("x"), 16)
        .map_err(|_| "chunk size does not fit in 64 bits".to_string())?;
    chunk_extensions(&line[digits..])?;
    Ok(size)
}

/// `*( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )`.
fn chunk_extensions(mut s: &[u8]) -> Result<(), String> {
    let bws = |s: &mut &[u8]| {
        while let Some((b' ' | b'\t', rest)) = s.split_first() {
            *s = rest;
        }
    };
    let token = |s: &mut &[u8]| -> bool {
        let n = s.iter().take_while(|&&b| is_tchar(b)).count();
        *s = &s[n..];
        n > 0
    };
    loop {
        // Whitespace only before a `;`: `5 \r\n` is not a chunk line.
        if s.is_empty() {
            return Ok(());
        }
        bws(&mut s);
        let Some((b';', rest)) = s.split_first() else {
            return Err(format!(
                "chunk extension {:?} does not start with `;`",
                String::from_utf8_lossy(s)
            ));
        };
        s = rest;
        bws(&mut s);
        if !token(&mut s) {
            return Err("chunk extension without a name".into());
        }
        let mut look = s;
        bws(&mut look);
        if let Some((b'=', rest)) = look.split_first() {
            s = rest;
            bws(&mut s);
            if s.first() == Some(&b'"') {
                s = quoted_string(&s[1..])?;
            } else if !token(&mut s) {
                return Err("chunk extension value is neither a token nor a quoted string".into());
            }
        }
    }
}

/// The rest after a quoted string whose opening quote is already consumed.
fn quoted_string(mut s: &[u8]) -> Result<&[u8], String> {
    loop {
        match s.split_first() {
            None => return Err("unterminated quoted string in a chunk extension".into()),
            Some((b'"', rest)) => return Ok(rest),
            Some((b'\\', rest)) => match rest.split_first() {
                Some((&b, rest)) if b == b'\t' || b == b' ' || is_field_vchar(b) => s = rest,
                _ => return Err("bad quoted-pair in a chunk extension".into()),
            },
            Some((&b, rest)) if b == b'\t' || b == b' ' || b == 0x21 || is_qdtext(b) => s = rest,
            Some(_) => return Err("control byte in a quoted chunk extension".into()),
        }
    }
}

fn is_qdtext(b: u8) -> bool {
    matches!(b, 0x23..=0x5b | 0x5d..=0x7e) || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(r: Read) -> Message {
        match r {
            Read::Complete(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests() {
        let m = complete(read_request(
            b"POST /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET",
        ));
        assert_eq!(
            (m.method(), m.target(), &m.body[..], m.len),
            ("POST", "/a?b", &b"abc"[..], 53)
        );
        let m = complete(read_request(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b;c=\"d e\"\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
        ));
        assert_eq!(m.body, b"abc");
        assert_eq!(m.trailers, vec![("X-T".to_string(), b"1".to_vec())]);
        assert_eq!(
            read_request(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Read::Partial
        );
    }

    #[test]
    fn refuses_what_the_grammar_does_not_allow() {
        for bad in [
            &b"GET / HTTP/1.1\nHost: x\r\n\r\n"[..],
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x0c\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;\nxx\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;a=\"b\r\nx\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\njunk\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\n\n",
        ] {
            assert!(
                matches!(read_request(bad), Read::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn responses() {
        let m = complete(read_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP",
            false,
            false,
        ));
        assert_eq!((m.status(), &m.body[..], m.len), (200, &b"ok"[..], 40));
        let head = complete(read_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
            true,
            false,
        ));
        assert!(head.body.is_empty());
        assert_eq!(
            read_response(b"HTTP/1.1 200 OK\r\n\r\nuntil", false, false),
            Read::Partial
        );
        let m = complete(read_response(b"HTTP/1.1 200 OK\r\n\r\nuntil", false, true));
        assert!(m.close_delimited);
        assert_eq!(m.body, b"until");
        let m = complete(read_response(
            b"HTTP/1.1 103 Early Hints\r\nLink: a\r\n\r\n",
            false,
            false,
        ));
        assert_eq!(m.status(), 103);
        assert!(matches!(
            read_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                false,
                false
            ),
            Read::Invalid(_)
        ));
    }
}

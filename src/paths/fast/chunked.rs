//! Where a chunked body ends, found without decoding it, strictly.
//!
//! The fast path forwards a chunked response's chunks byte for byte, so
//! every byte it forwards must read the same way to any parser behind it.
//! The scanner therefore accepts the RFC 9112 grammar only: chunk sizes of
//! hex digits, extensions as `;name[=token|"quoted"]` with whitespace only
//! around `;` and `=`, CRLF line ends (no bare CR or LF, anywhere), and
//! trailer lines with CRLF ends. Anything else is [`Malformed`]: the caller
//! answers 502, or cuts the response if its head already went out.
//!
//! Trailer fields are not forwarded (the Pingora path drops them too): when
//! a body has some, the scanner reports that the forwarded part ends after
//! the last-chunk line, and the caller writes the final CRLF itself.

/// Longest chunk-size line (size and extensions) accepted, as Pingora.
const MAX_SIZE_LINE: u32 = 4096;
/// Longest trailer section accepted.
const MAX_TRAILERS: u32 = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size; `digits` counts them: at most 16 (a u64,
    /// and what httparse allows under the Pingora path).
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size: only a `;` may follow.
    SizeBws {
        size: u64,
    },
    /// After `;`: optional whitespace, then a name.
    ExtStart {
        size: u64,
    },
    /// A name: `=`, `;` or the line end may follow it, or whitespace.
    ExtName {
        size: u64,
    },
    /// Whitespace after a name: only `=` or `;` may follow.
    ExtNameBws {
        size: u64,
    },
    /// After `=`: whitespace, then a token or a quoted string.
    ExtValueStart {
        size: u64,
    },
    ExtToken {
        size: u64,
    },
    ExtQuoted {
        size: u64,
    },
    ExtQuotedPair {
        size: u64,
    },
    /// Just after a closing quote: whitespace, `;` or the line end.
    ExtValueEnd {
        size: u64,
    },
    /// Whitespace after a value: only `;` may follow (none before the CRLF).
    ExtValueBws {
        size: u64,
    },
    /// The LF of the size line.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// What one [`ChunkedEnd::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Scanned {
    /// How many of the fed bytes (a prefix) are forwarded as they are.
    pub relay: usize,
    /// `Some(n)`: the body (trailers included) ends after `bytes[..n]`.
    pub end: Option<usize>,
    /// The body ended and its trailers were dropped: the caller ends the
    /// forwarded body with a CRLF of its own.
    pub terminator: bool,
}

#[derive(Debug)]
pub struct ChunkedEnd {
    state: State,
    /// Bytes of the current size line, or of the trailer section.
    line: u32,
    /// A trailer field was seen (and dropped).
    trailers: bool,
}

impl Default for ChunkedEnd {
    fn default() -> Self {
        Self {
            state: State::Size { size: 0, digits: 0 },
            line: 0,
            trailers: false,
        }
    }
}

fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte allowed inside a quoted string or after a backslash there
/// (HTAB, SP, VCHAR, obs-text): no control bytes, so never a line end.
fn quoted_ok(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

impl ChunkedEnd {
    /// Feed the next bytes of the body.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Scanned, Malformed> {
        use State::*;
        let mut i = 0;
        let mut relay = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if let Data { left } = self.state {
                let take = left.min((bytes.len() - i) as u64);
                i += take as usize;
                relay = i;
                self.state = if take == left {
                    DataCr
                } else {
                    Data { left: left - take }
                };
                continue;
            }
            let before = self.state;
            match before {
                Size { .. }
                | SizeBws { .. }
                | ExtStart { .. }
                | ExtName { .. }
                | ExtNameBws { .. }
                | ExtValueStart { .. }
                | ExtToken { .. }
                | ExtQuoted { .. }
                | ExtQuotedPair { .. }
                | ExtValueEnd { .. }
                | ExtValueBws { .. } => {
                    self.line += 1;
                    if self.line > MAX_SIZE_LINE {
                        return Err(Malformed);
                    }
                }
                TrailerStart | TrailerLine | TrailerLf | EndLf => {
                    self.line += 1;
                    if self.line > MAX_TRAILERS {
                        return Err(Malformed);
                    }
                }
                _ => {}
            }
            self.state = match (before, b) {
                (Size { size, digits }, b) if b.is_ascii_hexdigit() => {
                    if digits >= 16 {
                        return Err(Malformed);
                    }
                    let d = (b as char).to_digit(16).unwrap_or(0);
                    Size {
                        size: size * 16 + u64::from(d),
                        digits: digits + 1,
                    }
                }
                (Size { digits: 0, .. }, _) => return Err(Malformed),
                (Size { size, .. }, b'\r') => SizeLf { size },
                (Size { size, .. }, b' ' | b'\t') => SizeBws { size },
                (Size { size, .. } | SizeBws { size }, b';') => ExtStart { size },
                (SizeBws { size }, b' ' | b'\t') => SizeBws { size },
                (ExtStart { size }, b' ' | b'\t') => ExtStart { size },
                (ExtStart { size } | ExtName { size }, b) if tchar(b) => ExtName { size },
                (ExtName { size } | ExtNameBws { size }, b' ' | b'\t') => ExtNameBws { size },
                (ExtName { size } | ExtNameBws { size }, b'=') => ExtValueStart { size },
                (ExtValueStart { size }, b' ' | b'\t') => ExtValueStart { size },
                (ExtValueStart { size }, b'"') => ExtQuoted { size },
                (ExtValueStart { size } | ExtToken { size }, b) if tchar(b) => ExtToken { size },
                (ExtQuoted { size }, b'"') => ExtValueEnd { size },
                (ExtQuoted { size }, b'\\') => ExtQuotedPair { size },
                (ExtQuoted { size }, b) if quoted_ok(b) => ExtQuoted { size },
                (ExtQuotedPair { size }, b) if quoted_ok(b) => ExtQuoted { size },
                (ExtToken { size } | ExtValueEnd { size } | ExtValueBws { size }, b' ' | b'\t') => {
                    ExtValueBws { size }
                }
                (
                    ExtName { size }
                    | ExtNameBws { size }
                    | ExtToken { size }
                    | ExtValueEnd { size }
                    | ExtValueBws { size },
                    b';',
                ) => ExtStart { size },
                (ExtName { size } | ExtToken { size } | ExtValueEnd { size }, b'\r') => {
                    SizeLf { size }
                }
                (SizeLf { size }, b'\n') => {
                    self.line = 0;
                    if size == 0 {
                        TrailerStart
                    } else {
                        Data { left: size }
                    }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size { size: 0, digits: 0 },
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | TrailerLine, b) if b != b'\r' && b != b'\n' => {
                    self.trailers = true;
                    TrailerLine
                }
                (TrailerLine, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(Malformed),
            };
            i += 1;
            // Everything up to the trailer section is forwarded, and the
            // final CRLF too when there were no trailers: a prefix.
            if !self.trailers {
                relay = i;
            }
            if self.state == Done {
                return Ok(Scanned {
                    relay,
                    end: Some(i),
                    terminator: self.trailers,
                });
            }
        }
        Ok(Scanned {
            relay,
            end: None,
            terminator: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `parts` in order; the forwarded bytes and where the body ended.
    fn scan(parts: &[&[u8]]) -> Result<(Vec<u8>, Option<usize>), Malformed> {
        let mut c = ChunkedEnd::default();
        let mut offset = 0;
        let mut relayed = Vec::new();
        for p in parts {
            let s = c.feed(p)?;
            relayed.extend_from_slice(&p[..s.relay]);
            if let Some(n) = s.end {
                if s.terminator {
                    relayed.extend_from_slice(b"\r\n");
                }
                return Ok((relayed, Some(offset + n)));
            }
            offset += p.len();
        }
        Ok((relayed, None))
    }

    #[test]
    fn finds_the_end_in_one_piece_or_byte_by_byte() {
        let body =
            b"5\r\nhello\r\n1a;ext=1;q=\"a \\\" b\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        // The trailer is dropped; the body still ends in a CRLF.
        let mut relayed = body[..end - b"X-T: 1\r\n\r\n".len()].to_vec();
        relayed.extend_from_slice(b"\r\n");
        assert_eq!(scan(&[body]), Ok((relayed.clone(), Some(end))));
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(scan(&bytes), Ok((relayed.to_vec(), Some(end))));
        for split in 1..body.len() {
            assert_eq!(
                scan(&[&body[..split], &body[split..]]),
                Ok((relayed.to_vec(), Some(end))),
                "split at {split}"
            );
        }
    }

    #[test]
    fn incomplete_bodies() {
        assert_eq!(scan(&[b"5\r\nhel"]), Ok((b"5\r\nhel".to_vec(), None)));
        assert_eq!(scan(&[b"0\r\n"]), Ok((b"0\r\n".to_vec(), None)));
        // Without trailers the whole body is forwarded as it came.
        assert_eq!(scan(&[b"0\r\n\r\n"]), Ok((b"0\r\n\r\n".to_vec(), Some(5))));
        assert_eq!(
            scan(&[b"0\r\n\r", b"\n"]),
            Ok((b"0\r\n\r\n".to_vec(), Some(5)))
        );
        assert_eq!(
            scan(&[b"0\r\nA: 1\r", b"\n\r\n"]),
            Ok((b"0\r\n\r\n".to_vec(), Some(11)))
        );
        assert_eq!(
            scan(&[b"5 ;a = b\r\nhello\r\n0\r\n\r\n"]).map(|r| r.1),
            Ok(Some(22))
        );
    }

    /// The Pingora path reads chunk-size lines with httparse's parser
    /// (under Pingora's body reader, both directions), patched in
    /// `vendor/httparse` to this grammar: both carriers accept and refuse
    /// the same lines (the `chunked` fuzz target checks any). Without the
    /// patch httparse accepts most of the refused ones.
    #[test]
    fn pingoras_parser_reads_size_lines_as_the_scanner_does() {
        for line in [
            &b"5\r\n"[..],
            b"0\r\n",
            b"ffffffffffffffff\r\n",
            b"5;a\r\n",
            b"5;a=b\r\n",
            b"5 ; a = b ; c\r\n",
            b"5;a=\"x;\\\"y \"\r\n",
            b"5;name=\"a b\"\r\n",
            b"2;\nxx\r\n",
            b"1;a=\"x\r\n0\r\n\"\r\n",
            b"5\t;a\r\n",
            b"1ffffffffffffffff\r\n",
            b"\r\n",
            b"5 \r\n",
            b"5;\r\n",
            b"5;a b\r\n",
            b"5;a\tb\r\n",
            b"5;a=\r\n",
            b"5;a \r\n",
            b"5;a=b \r\n",
            b"5;a=\"b\" \r\n",
            b"5;a=\"b\"c\r\n",
            b"5;=b\r\n",
            b"5;a@\r\n",
            b"5;a\n",
            b"5\n",
            b"5;a=\"x\r\n",
            b"5;a\x00\r\n",
            b"-5\r\n",
            b"0x5\r\n",
        ] {
            let scanner = ChunkedEnd::default().feed(line).is_ok();
            let pingora = httparse::parse_chunk_size(line).is_ok();
            assert_eq!(scanner, pingora, "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn refuses_what_two_parsers_could_read_differently() {
        for bad in [
            &b"zz\r\n"[..],
            b"2\r\nabX",
            b"fffffffffffffffff\r\n",
            b"00000000000000000\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r\n0\n\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5\t\r\nhello\r\n0\r\n\r\n",
            b"5;\nhello\r\n",
            b"5;\r\nhello\r\n",
            b"5;a=\r\nhello\r\n",
            b"5;a=\"b\r\nhello\r\n",
            b"5;a\x00\r\nhello\r\n",
            b"5;a b\r\nhello\r\n",
            b"5;a \r\nhello\r\n",
            b"5;a=b \r\nhello\r\n",
            b"5;a=\"b\" \r\nhello\r\n",
            b"\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b"5\r\nhello\r\n0\r\nX: 1\nY: 2\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\r\n",
        ] {
            assert_eq!(
                scan(&[bad]),
                Err(Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Junk trailer lines are dropped, not refused (as Pingora does).
        assert!(scan(&[b"0\r\njunk\r\n\r\n"]).is_ok());
        let long = format!("5;{}\r\n", "a".repeat(5000));
        assert_eq!(scan(&[long.as_bytes()]), Err(Malformed));
    }
}

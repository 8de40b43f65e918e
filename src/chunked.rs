//! Where a chunked body ends, found without decoding it.
//!
//! The fast path forwards a chunked response byte for byte; it only needs to
//! know when the last chunk and the trailers are over, to reuse the upstream
//! connection and to answer the client's next request.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size; `digits` counts them (a bound against overflow).
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: chunk extensions, ignored up to the line end.
    Extension {
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
    EndLf,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

#[derive(Debug)]
pub struct ChunkedEnd {
    state: State,
}

impl Default for ChunkedEnd {
    fn default() -> Self {
        Self {
            state: State::Size { size: 0, digits: 0 },
        }
    }
}

impl ChunkedEnd {
    /// Feed the next bytes of the body. `Ok(Some(n))`: the body ends after
    /// `bytes[..n]`; `Ok(None)`: all of `bytes` belongs to it and more follows.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                State::Size { size, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' if digits < 15 => {
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        State::Size {
                            size: size * 16 + u64::from(d),
                            digits: digits + 1,
                        }
                    }
                    _ if digits == 0 => return Err(Malformed),
                    b'\r' => State::SizeLf { size },
                    b'\n' => after_size(size),
                    b';' | b' ' | b'\t' => State::Extension { size },
                    _ => return Err(Malformed),
                },
                State::Extension { size } => match b {
                    b'\r' => State::SizeLf { size },
                    b'\n' => after_size(size),
                    _ => State::Extension { size },
                },
                State::SizeLf { size } if b == b'\n' => after_size(size),
                State::Data { left } => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == left {
                        State::DataCr
                    } else {
                        State::Data { left: left - take }
                    };
                    continue;
                }
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataCr | State::DataLf if b == b'\n' => State::Size { size: 0, digits: 0 },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b'\n' => State::Done,
                    _ => State::TrailerLine,
                },
                State::TrailerLine if b == b'\n' => State::TrailerStart,
                State::TrailerLine => State::TrailerLine,
                State::EndLf if b == b'\n' => State::Done,
                State::Done => return Ok(Some(i)),
                _ => return Err(Malformed),
            };
            i += 1;
            if self.state == State::Done {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

fn after_size(size: u64) -> State {
    if size == 0 {
        State::TrailerStart
    } else {
        State::Data { left: size }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_of(parts: &[&[u8]]) -> Result<Option<usize>, Malformed> {
        let mut c = ChunkedEnd::default();
        let mut offset = 0;
        for p in parts {
            if let Some(n) = c.feed(p)? {
                return Ok(Some(offset + n));
            }
            offset += p.len();
        }
        Ok(None)
    }

    #[test]
    fn finds_the_end_in_one_piece_or_byte_by_byte() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(end_of(&[body]), Ok(Some(end)));
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(end_of(&bytes), Ok(Some(end)));
        assert_eq!(end_of(&[&body[..10], &body[10..]]), Ok(Some(end)));
    }

    #[test]
    fn incomplete_and_malformed_bodies() {
        assert_eq!(end_of(&[b"5\r\nhel"]), Ok(None));
        assert_eq!(end_of(&[b"0\r\n"]), Ok(None));
        assert_eq!(end_of(&[b"0\r\n\r\n"]), Ok(Some(5)));
        assert_eq!(end_of(&[b"0\n\n"]), Ok(Some(3)));
        assert_eq!(end_of(&[b"zz\r\n"]), Err(Malformed));
        assert_eq!(end_of(&[b"2\r\nabX"]), Err(Malformed));
        assert_eq!(end_of(&[b"ffffffffffffffffff\r\n"]), Err(Malformed));
    }
}

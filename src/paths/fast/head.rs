//! Byte-level helpers for message heads: where a head ends, and writing
//! one field.

use crate::policy::forward::HeadWriter;

/// A head writer that writes each obs-fold (CRLF and the whitespace after
/// it) of a value as one space.
pub(super) struct Unfolding<'a>(pub(super) &'a mut Vec<u8>);

impl HeadWriter for Unfolding<'_> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        let out = &mut *self.0;
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        let mut rest = value;
        while let Some(i) = memchr::memchr2(b'\r', b'\n', rest) {
            out.extend_from_slice(&rest[..i]);
            out.push(b' ');
            rest = rest[i..].trim_ascii_start();
        }
        out.extend_from_slice(rest);
        out.extend_from_slice(b"\r\n");
    }

    fn list<'v>(&mut self, name: &[u8], values: impl Iterator<Item = &'v [u8]>) {
        self.0.list(name, values);
    }
}

/// The length of the head at the start of `buf`, once it is complete.
pub(super) fn head_end(buf: &[u8]) -> Option<usize> {
    head_end_and_folds(buf).map(|(end, _)| end)
}

/// The same, and whether the head holds an obs-fold (a line end followed by
/// whitespace), found in the same walk over its line ends.
pub(super) fn head_end_and_folds(buf: &[u8]) -> Option<(usize, bool)> {
    // Visit each LF (memchr: no per-call setup, unlike memmem) and look at
    // what follows: CRLF or a bare LF ends the head.
    let mut folded = false;
    memchr::memchr_iter(b'\n', buf).find_map(|i| match buf.get(i + 1..i + 3) {
        Some([b'\r', b'\n']) => Some((i + 3, folded)),
        Some([b'\n', _]) => Some((i + 2, folded)),
        None if buf.get(i + 1) == Some(&b'\n') => Some((i + 2, folded)),
        Some([b' ' | b'\t', _]) => {
            folded = true;
            None
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn head_ends_and_folds() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nNEXT"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), None);
        assert_eq!(
            head_end_and_folds(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n"),
            Some((29, true))
        );
        assert_eq!(
            head_end_and_folds(b"HTTP/1.1 200 OK\r\nX: a\r\n\r\n b"),
            Some((25, false)),
            "whitespace after the head is not a fold"
        );
    }

    #[test]
    pub(super) fn unfolded_values_are_one_space_per_fold() {
        let mut out = Vec::new();
        Unfolding(&mut out).field(b"X", b"a\r\n  b\r\n\tc");
        assert_eq!(out, b"X: a b c\r\n");
    }
}

//! Who really answered: an upstream's `expect_header` (`x-origin-id: new`)
//! checked on each of its responses, the live form of `cutover verify`'s
//! `/ruok` check. A response that lacks the field, or whose field names
//! another upstream of the route (or something unknown), was answered by
//! someone else: a DNS flip that sent the new name to the old
//! distribution, an origin behind the wrong distribution, a cache that
//! kept the old answer.
//!
//! The value is compared whole, ASCII case-insensitively, surrounding
//! white space ignored; with several fields of that name, one matching is
//! enough. The field is read as the upstream sent it, before
//! `response_headers` edits (so an operator may `remove` it from what
//! clients see).

use http::{HeaderName, HeaderValue};

/// The check for one upstream.
#[derive(Debug, Clone)]
pub struct Marker {
    name: HeaderName,
    own: HeaderValue,
    /// The same field's value for the route's other upstreams, with their
    /// index in the route.
    others: Vec<(HeaderValue, usize)>,
}

/// What a response's marker said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seen {
    /// No `expect_header` on this upstream, or no response head yet.
    #[default]
    Unchecked,
    Matched,
    Missing,
    /// Another upstream's value: the index of that upstream in the route.
    Names(usize),
    /// A value no upstream of the route has.
    Unknown,
}

impl Seen {
    pub fn is_mismatch(self) -> bool {
        matches!(self, Seen::Missing | Seen::Names(_) | Seen::Unknown)
    }
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.trim_ascii().eq_ignore_ascii_case(b.trim_ascii())
}

impl Marker {
    /// The marker of upstream `index` among a route's `(name, value)`
    /// expectations (`None` for upstreams without one).
    pub fn for_upstream(
        expectations: &[Option<(HeaderName, HeaderValue)>],
        index: usize,
    ) -> Option<Marker> {
        let (name, own) = expectations.get(index)?.clone()?;
        let others = expectations
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .filter_map(|(i, e)| {
                let (n, v) = e.as_ref()?;
                (*n == name && !same(v.as_bytes(), own.as_bytes())).then(|| (v.clone(), i))
            })
            .collect();
        Some(Marker { name, own, others })
    }

    /// The header name this marker reads.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// Fold one response field into what has been seen so far (start from
    /// [`Seen::Missing`]).
    pub fn add(&self, seen: &mut Seen, name: &[u8], value: &[u8]) {
        if !name.eq_ignore_ascii_case(self.name.as_str().as_bytes()) || *seen == Seen::Matched {
            return;
        }
        *seen = if same(value, self.own.as_bytes()) {
            Seen::Matched
        } else if let Some((_, i)) = self.others.iter().find(|(v, _)| same(value, v.as_bytes())) {
            Seen::Names(*i)
        } else if matches!(*seen, Seen::Names(_)) {
            *seen
        } else {
            Seen::Unknown
        };
    }

    /// The marker of a whole response head.
    pub fn check<'f>(&self, fields: impl Iterator<Item = (&'f [u8], &'f [u8])>) -> Seen {
        let mut seen = Seen::Missing;
        for (n, v) in fields {
            self.add(&mut seen, n, v);
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Vec<Option<(HeaderName, HeaderValue)>> {
        let e = |v: &str| {
            Some((
                HeaderName::from_static("x-origin-id"),
                HeaderValue::from_str(v).unwrap(),
            ))
        };
        vec![e("old"), e("new"), None]
    }

    #[test]
    fn matched_missing_other_and_unknown() {
        let m = Marker::for_upstream(&route(), 1).unwrap();
        let check = |fields: &[(&str, &str)]| {
            m.check(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
        };
        assert_eq!(check(&[("X-Origin-Id", " NEW ")]), Seen::Matched);
        assert_eq!(check(&[("x-other", "new")]), Seen::Missing);
        assert_eq!(check(&[("x-origin-id", "old")]), Seen::Names(0));
        assert_eq!(check(&[("x-origin-id", "staging")]), Seen::Unknown);
        // One matching field is enough, in any position.
        assert_eq!(
            check(&[("x-origin-id", "old"), ("x-origin-id", "new")]),
            Seen::Matched
        );
        assert_eq!(
            check(&[("x-origin-id", "new"), ("x-origin-id", "x")]),
            Seen::Matched
        );
        // Naming another upstream outweighs an unknown value.
        assert_eq!(
            check(&[("x-origin-id", "old"), ("x-origin-id", "x")]),
            Seen::Names(0)
        );
        assert!(Marker::for_upstream(&route(), 2).is_none());
        assert!(!Seen::Unchecked.is_mismatch() && !Seen::Matched.is_mismatch());
    }
}

//! The intermediate name never leaks back: response fields that name a host
//! cutover rewrote the request to (an upstream's `host_header`, `sni` or
//! address name, or a route's `rewrite_names`) are rewritten to the Host
//! the client used, with the scheme the client used.
//!
//! - `Location` and `Content-Location`, on every status: an absolute URL
//!   (`http://`, `https://`) or a scheme-relative one (`//name/…`) whose
//!   host is ours gets the client's scheme and authority; its path, query
//!   and fragment stay. Relative URLs and other hosts are untouched.
//! - `Refresh: 5; url=…`: the URL inside, the same way.
//! - `Set-Cookie`: a `Domain` attribute that is ours (with or without a
//!   leading dot, any case) becomes the client's host, without its port;
//!   for a client that used an IP address the attribute is dropped (a
//!   host-only cookie for that address). Every other attribute stays.
//!
//! A value that names one of ours but cannot be read as one of these
//! (a URL with user info or a bad port, a quoted `Domain`, a `Domain` with a
//! port) is left as it is and reported as [`Outcome::Unreadable`]: cutover
//! never rewrites what it does not understand. Bodies are not rewritten
//! (see the README: the fix at the source is the origin honouring
//! `X-Forwarded-Host`).
//!
//! Nothing here allocates unless a value is rewritten.

pub use crate::config::RewriteMode as Mode;

/// A response field this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Location,
    ContentLocation,
    Refresh,
    SetCookie,
}

impl Field {
    pub const ALL: [Field; 4] = [
        Field::Location,
        Field::ContentLocation,
        Field::Refresh,
        Field::SetCookie,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Field::Location => "location",
            Field::ContentLocation => "content-location",
            Field::Refresh => "refresh",
            Field::SetCookie => "set-cookie",
        }
    }

    /// The field `name` is, if it is one of these.
    pub fn of(name: &[u8]) -> Option<Field> {
        let is = |lower: &[u8]| name.eq_ignore_ascii_case(lower);
        match name.len() {
            7 if is(b"refresh") => Some(Field::Refresh),
            8 if is(b"location") => Some(Field::Location),
            10 if is(b"set-cookie") => Some(Field::SetCookie),
            16 if is(b"content-location") => Some(Field::ContentLocation),
            _ => None,
        }
    }
}

/// The names that are ours, lower case, without a trailing dot.
#[derive(Debug, Clone, Default)]
pub struct Names(Box<[Box<[u8]>]>);

impl Names {
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Names {
        let mut out: Vec<Box<[u8]>> = Vec::new();
        for n in names {
            let n = n.trim().trim_end_matches('.').to_ascii_lowercase();
            if !n.is_empty() && !out.iter().any(|o| **o == *n.as_bytes()) {
                out.push(n.into_bytes().into_boxed_slice());
            }
        }
        Names(out.into_boxed_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `host` (any case, an optional trailing dot, an IPv6 literal with
    /// or without brackets) is one of ours.
    fn contains(&self, host: &[u8]) -> bool {
        let host = host.strip_suffix(b".").unwrap_or(host);
        let host = host
            .strip_prefix(b"[")
            .and_then(|h| h.strip_suffix(b"]"))
            .unwrap_or(host);
        self.0.iter().any(|n| n.eq_ignore_ascii_case(host))
    }

    /// `value` mentions one of ours anywhere (any case).
    fn mentioned_in(&self, value: &[u8]) -> bool {
        self.0
            .iter()
            .any(|n| value.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n)))
    }
}

/// Where the client sent the request: what a rewritten value points to.
#[derive(Debug, Clone, Copy)]
pub struct Public<'a> {
    /// The client's authority, as it sent it (`www.example.com:8443`).
    pub authority: &'a [u8],
    /// The client used `https` (a TLS listener, or a trusted proxy's
    /// `X-Forwarded-Proto: https`).
    pub https: bool,
}

impl Public<'_> {
    /// The authority without its port, and whether it is an IP literal.
    fn host(&self) -> (&[u8], bool) {
        let a = self.authority.trim_ascii();
        if a.starts_with(b"[") {
            let close = a.iter().position(|&b| b == b']').unwrap_or(a.len() - 1);
            return (&a[..=close], true);
        }
        let host = match a.iter().rposition(|&b| b == b':') {
            Some(i) => &a[..i],
            None => a,
        };
        let ip = !host.is_empty() && host.iter().all(|b| b.is_ascii_digit() || *b == b'.');
        (host, ip)
    }
}

/// What [`rewrite`] did with one value.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing of ours in it.
    Untouched,
    /// Ours; the new value is in `out`.
    Rewritten,
    /// It names one of ours but is not readable as the field's syntax:
    /// left as it is.
    Unreadable,
}

/// Rewrite one value of `field`, writing the new value into `out` (cleared
/// first) when it is [`Outcome::Rewritten`].
pub fn rewrite(
    field: Field,
    value: &[u8],
    names: &Names,
    public: &Public<'_>,
    out: &mut Vec<u8>,
) -> Outcome {
    out.clear();
    if names.is_empty() || !names.mentioned_in(value) {
        return Outcome::Untouched;
    }
    let outcome = match field {
        Field::Location | Field::ContentLocation => url(value, names, public, out),
        Field::Refresh => refresh(value, names, public, out),
        Field::SetCookie => cookie(value, names, public, out),
    };
    if outcome != Outcome::Rewritten {
        out.clear();
    }
    outcome
}

/// A URL reference: absolute (`http`/`https`) or scheme-relative.
fn url(value: &[u8], names: &Names, public: &Public<'_>, out: &mut Vec<u8>) -> Outcome {
    let v = value.trim_ascii();
    let (after_scheme, relative) = if starts_with_ci(v, b"http://") {
        (7, false)
    } else if starts_with_ci(v, b"https://") {
        (8, false)
    } else if v.starts_with(b"//") {
        (2, true)
    } else {
        // A relative reference (or another scheme) that mentions a name of
        // ours in its path or query is not ours to change; anything else
        // that mentions one is not a URL cutover reads.
        return if is_reference(v) {
            Outcome::Untouched
        } else {
            Outcome::Unreadable
        };
    };
    let rest = &v[after_scheme..];
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let Some(host) = url_host(authority) else {
        return if names.mentioned_in(authority) {
            Outcome::Unreadable
        } else {
            Outcome::Untouched
        };
    };
    if !names.contains(host) || same_host(host, public) {
        return Outcome::Untouched;
    }
    if !is_reference(tail) {
        return Outcome::Unreadable;
    }
    // Never a downgrade: an origin that redirects to https (its own name)
    // must not be turned into a redirect to the http URL just requested,
    // a loop. Upgraded from the client's http, the client's port (its
    // plain-HTTP one) is dropped.
    let https = !relative && (public.https || starts_with_ci(v, b"https:"));
    if !relative {
        out.extend_from_slice(if https { b"https:" } else { b"http:" });
    }
    out.extend_from_slice(b"//");
    if https && !public.https {
        out.extend_from_slice(public.host().0);
    } else {
        out.extend_from_slice(public.authority.trim_ascii());
    }
    out.extend_from_slice(tail);
    Outcome::Rewritten
}

/// The host of a URL authority (`host`, `host:port`, `[v6]:port`); `None`
/// when it has user info or is not one cutover reads.
fn url_host(authority: &[u8]) -> Option<&[u8]> {
    if authority.is_empty() || authority.contains(&b'@') {
        return None;
    }
    let (host, port) = if authority.starts_with(b"[") {
        let close = authority.iter().position(|&b| b == b']')?;
        let port = &authority[close + 1..];
        (
            &authority[..=close],
            port.strip_prefix(b":").unwrap_or(port),
        )
    } else {
        match authority.iter().position(|&b| b == b':') {
            Some(i) => (&authority[..i], &authority[i + 1..]),
            None => (authority, &b""[..]),
        }
    };
    let host_ok = host
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':'));
    (host_ok && port.iter().all(u8::is_ascii_digit) && port.len() <= 5).then_some(host)
}

/// The URL already names the client's own host.
fn same_host(host: &[u8], public: &Public<'_>) -> bool {
    let (mine, _) = public.host();
    let host = host.strip_suffix(b".").unwrap_or(host);
    let mine = mine.strip_suffix(b".").unwrap_or(mine);
    host.eq_ignore_ascii_case(mine)
}

/// Visible ASCII only: what a URL reference in a field can hold.
fn is_reference(v: &[u8]) -> bool {
    v.iter().all(|b| (0x21..0x7f).contains(b))
}

fn starts_with_ci(v: &[u8], prefix: &[u8]) -> bool {
    v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// `Refresh: <delay>[;,] [url=]<url>`, the URL optionally quoted.
fn refresh(value: &[u8], names: &Names, public: &Public<'_>, out: &mut Vec<u8>) -> Outcome {
    let v = value;
    let mut i = 0;
    while i < v.len() && (v[i].is_ascii_digit() || v[i] == b'.' || v[i] == b' ') {
        i += 1;
    }
    if i == 0 || i == v.len() || !matches!(v[i], b';' | b',') {
        return Outcome::Unreadable;
    }
    i += 1;
    while i < v.len() && v[i] == b' ' {
        i += 1;
    }
    if starts_with_ci(&v[i..], b"url") {
        let mut j = i + 3;
        while j < v.len() && v[j] == b' ' {
            j += 1;
        }
        if j < v.len() && v[j] == b'=' {
            i = j + 1;
            while i < v.len() && v[i] == b' ' {
                i += 1;
            }
        }
    }
    let (start, end) = match v.get(i) {
        Some(&q @ (b'"' | b'\'')) => match v[i + 1..].iter().position(|&b| b == q) {
            Some(len) => (i + 1, i + 1 + len),
            None => return Outcome::Unreadable,
        },
        _ => (i, v.len()),
    };
    let mut url_out = Vec::new();
    match url(&v[start..end], names, public, &mut url_out) {
        Outcome::Rewritten => {
            out.extend_from_slice(&v[..start]);
            out.extend_from_slice(&url_out);
            out.extend_from_slice(&v[end..]);
            Outcome::Rewritten
        }
        other => other,
    }
}

/// `Set-Cookie: name=value; Domain=…; …`: the `Domain` attributes.
fn cookie(value: &[u8], names: &Names, public: &Public<'_>, out: &mut Vec<u8>) -> Outcome {
    let (host, ip) = public.host();
    let mut rewritten = false;
    let mut unreadable = false;
    let mut parts = value.split(|&b| b == b';');
    let first = parts.next().unwrap_or_default();
    out.extend_from_slice(first);
    for attr in parts {
        let (name, domain) = match attr.iter().position(|&b| b == b'=') {
            Some(eq) => (attr[..eq].trim_ascii(), Some(&attr[eq + 1..])),
            None => (attr.trim_ascii(), None),
        };
        let Some(domain) = domain.filter(|_| name.eq_ignore_ascii_case(b"domain")) else {
            out.push(b';');
            out.extend_from_slice(attr);
            continue;
        };
        let d = domain.trim_ascii();
        let (dot, bare) = match d.strip_prefix(b".") {
            Some(bare) => (true, bare),
            None => (false, d),
        };
        let readable = bare
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !readable {
            unreadable |= names.mentioned_in(d);
        } else if names.contains(bare) && !same_host(bare, public) {
            rewritten = true;
            if ip {
                // An address cannot be a cookie domain: host-only instead.
                continue;
            }
            out.extend_from_slice(b"; Domain=");
            if dot {
                out.push(b'.');
            }
            out.extend_from_slice(host);
            continue;
        }
        out.push(b';');
        out.extend_from_slice(attr);
    }
    match (rewritten, unreadable) {
        (true, _) => Outcome::Rewritten,
        (false, true) => Outcome::Unreadable,
        (false, false) => Outcome::Untouched,
    }
}

/// Per field, how many values one response had rewritten (or would have,
/// in detect mode) and how many it had that cutover could not read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewrites {
    pub rewritten: [u8; 4],
    pub unreadable: [u8; 4],
}

impl Rewrites {
    pub fn any(&self) -> bool {
        self.rewritten
            .iter()
            .chain(&self.unreadable)
            .any(|&n| n > 0)
    }

    pub fn add(&mut self, field: Field, outcome: &Outcome) {
        let slot = match outcome {
            Outcome::Untouched => return,
            Outcome::Rewritten => &mut self.rewritten[field as usize],
            Outcome::Unreadable => &mut self.unreadable[field as usize],
        };
        *slot = slot.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names::new(["cdn-new.example.test", "d111.cloudfront.net."])
    }

    const PUB: Public<'static> = Public {
        authority: b"www.example.test",
        https: true,
    };

    fn run(field: Field, value: &str, public: &Public<'_>) -> (Outcome, String) {
        let mut out = Vec::new();
        let o = rewrite(field, value.as_bytes(), &names(), public, &mut out);
        let text = match o {
            Outcome::Rewritten => String::from_utf8(out).unwrap(),
            _ => value.to_string(),
        };
        (o, text)
    }

    fn loc(value: &str) -> (Outcome, String) {
        run(Field::Location, value, &PUB)
    }

    use Outcome::*;

    #[test]
    fn absolute_urls_to_our_names_get_the_clients_scheme_and_host() {
        assert_eq!(
            loc("https://cdn-new.example.test/moved?a=1#f"),
            (Rewritten, "https://www.example.test/moved?a=1#f".into())
        );
        // The client's scheme, not the upstream's; its port, not the URL's.
        assert_eq!(
            loc("http://CDN-NEW.example.test.:8443/x"),
            (Rewritten, "https://www.example.test/x".into())
        );
        let plain = Public {
            authority: b"www.example.test:8080",
            https: false,
        };
        assert_eq!(
            run(Field::ContentLocation, "http://d111.cloudfront.net", &plain),
            (Rewritten, "http://www.example.test:8080".into())
        );
        // Never downgraded (an origin's redirect to https would loop); the
        // client's plain-HTTP port does not go with https.
        assert_eq!(
            run(Field::Location, "https://d111.cloudfront.net/x", &plain),
            (Rewritten, "https://www.example.test/x".into())
        );
        let v6 = Names::new(["2001:db8::1"]);
        let mut out = Vec::new();
        assert_eq!(
            rewrite(
                Field::Location,
                b"https://[2001:db8::1]:443/a",
                &v6,
                &PUB,
                &mut out
            ),
            Rewritten
        );
        assert_eq!(out, b"https://www.example.test/a");
        assert_eq!(
            loc("//cdn-new.example.test/a"),
            (Rewritten, "//www.example.test/a".into())
        );
    }

    #[test]
    fn relative_urls_and_other_hosts_are_untouched() {
        for v in [
            "/moved",
            "moved",
            "https://example.test/x",
            "https://other.test/?next=https://cdn-new.example.test/",
            "/go?to=cdn-new.example.test",
            "https://cdn-new.example.test.evil.test/",
            "https://evilcdn-new.example.test/",
            "ftp://cdn-new.example.test/x",
            "",
        ] {
            assert_eq!(loc(v).0, Untouched, "{v}");
        }
    }

    #[test]
    fn what_is_not_a_url_is_left_and_reported() {
        for v in [
            "https://user@cdn-new.example.test/",
            "https://cdn-new.example.test:44x/",
            "https://cdn-new.example.test:1234567/",
            "https://cdn-new.example.test/a b",
            "cdn-new.example.test is moved",
            "https://cdn-new.example.test/\u{e9}",
        ] {
            assert_eq!(loc(v), (Unreadable, v.to_string()), "{v}");
        }
    }

    #[test]
    fn refresh_urls() {
        let r = |v: &str| run(Field::Refresh, v, &PUB);
        assert_eq!(
            r("0; url=https://cdn-new.example.test/next"),
            (Rewritten, "0; url=https://www.example.test/next".into())
        );
        assert_eq!(
            r("5;URL='http://cdn-new.example.test/a'"),
            (Rewritten, "5;URL='https://www.example.test/a'".into())
        );
        assert_eq!(
            r("3, https://cdn-new.example.test/"),
            (Rewritten, "3, https://www.example.test/".into())
        );
        assert_eq!(r("0; url=/relative").0, Untouched);
        assert_eq!(r("0; url=\"https://cdn-new.example.test/").0, Unreadable);
        assert_eq!(r("soon; url=https://cdn-new.example.test/").0, Unreadable);
    }

    #[test]
    fn cookie_domains() {
        let c = |v: &str| run(Field::SetCookie, v, &PUB);
        assert_eq!(
            c("s=1; Domain=cdn-new.example.test; Path=/"),
            (Rewritten, "s=1; Domain=www.example.test; Path=/".into())
        );
        assert_eq!(
            c("s=2; domain=.CDN-NEW.example.test; Secure; HttpOnly"),
            (
                Rewritten,
                "s=2; Domain=.www.example.test; Secure; HttpOnly".into()
            )
        );
        assert_eq!(c("s=3; Domain=example.test; Path=/").0, Untouched);
        // The cookie's own value and other attributes are not ours.
        assert_eq!(
            c("cdn-new.example.test=1; Path=/cdn-new.example.test").0,
            Untouched
        );
        assert_eq!(c("s=1; Domain=cdn-new.example.test:443").0, Unreadable);
        assert_eq!(c("s=1; Domain=\"cdn-new.example.test\"").0, Unreadable);
        let ip = Public {
            authority: b"192.0.2.7:8080",
            https: false,
        };
        assert_eq!(
            run(
                Field::SetCookie,
                "s=1; Domain=cdn-new.example.test; Path=/",
                &ip
            ),
            (Rewritten, "s=1; Path=/".into())
        );
    }

    #[test]
    fn the_clients_own_name_is_not_a_rewrite() {
        let own = Names::new(["www.example.test"]);
        let mut out = Vec::new();
        for (f, v) in [
            (Field::Location, "https://www.example.test/x"),
            (Field::SetCookie, "s=1; Domain=www.example.test"),
        ] {
            assert_eq!(rewrite(f, v.as_bytes(), &own, &PUB, &mut out), Untouched);
        }
    }

    #[test]
    fn field_names() {
        assert_eq!(Field::of(b"LOCATION"), Some(Field::Location));
        assert_eq!(Field::of(b"content-location"), Some(Field::ContentLocation));
        assert_eq!(Field::of(b"Set-Cookie"), Some(Field::SetCookie));
        assert_eq!(Field::of(b"refresh"), Some(Field::Refresh));
        assert_eq!(Field::of(b"Locations"), None);
    }
}

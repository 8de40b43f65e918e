//! A config split in two: a **bootstrap** file on each instance (what only
//! `run --upgrade` may change: `config_source`, listeners, admin, server,
//! access_log) and a **document** served from one URL for the whole fleet
//! (what a reload may change: phase, client_ip, dns_refresh, routes).
//! Each key belongs to one of them; a key in the wrong one is a problem
//! with its key path, so the two never merge silently.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::file::{FileConfig, SourceFile};
use super::validate::{self, Checker, Part};
use super::*;

/// The keys a bootstrap holds; every other top-level key is the document's.
const BOOTSTRAP_KEYS: [&str; 5] = [
    "config_source",
    "listeners",
    "admin",
    "server",
    "access_log",
];

/// Whether a problem's key path is in the bootstrap's part.
pub(super) fn bootstrap_key(path: &str) -> bool {
    let top = path.split(['.', '[']).next().unwrap_or("");
    BOOTSTRAP_KEYS.contains(&top)
}

/// What a config file turned out to be.
pub enum Loaded {
    /// Everything in one file (SIGHUP re-reads it).
    Whole(Config),
    /// A bootstrap: the document comes from its `config_source`.
    Bootstrap(Bootstrap),
}

/// A checked bootstrap file, ready to be joined with each fetched document.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub path: PathBuf,
    text: String,
    url_override: Option<String>,
    settings: Config,
}

/// Read `path`; with `url` (`run --config-url`) or a `config_source`, it
/// is a bootstrap.
pub fn load_file(path: &Path, url: Option<&str>) -> Result<Loaded, ConfigError> {
    parse_file(path, read(path)?, url)
}

/// [`load_file`] on text already read; `path` names it in messages and
/// anchors relative paths.
pub fn parse_file(path: &Path, text: String, url: Option<&str>) -> Result<Loaded, ConfigError> {
    let raw = deserialize(path, &text)?;
    if raw.config_source.is_none() && url.is_none() {
        return parse(path, &text).map(Loaded::Whole);
    }
    let misplaced = misplaced(
        &raw.document_keys(),
        "comes from the served document (config_source.url); remove it from this bootstrap file, which holds config_source, listeners, admin, server and access_log",
    );
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let settings = checked(
        path,
        &text,
        None,
        |raw| {
            after(
                misplaced,
                validate::validate(raw, base_dir, Part::Bootstrap, url),
            )
        },
        raw,
    )?;
    Ok(Loaded::Bootstrap(Bootstrap {
        path: path.to_path_buf(),
        text,
        url_override: url.map(str::to_string),
        settings,
    }))
}

impl Bootstrap {
    /// The bootstrap's own settings (listeners, admin, server, access_log,
    /// the source); it has no phase and no routes.
    pub fn settings(&self) -> &Config {
        &self.settings
    }

    pub fn source(&self) -> &ConfigSource {
        self.settings
            .source
            .as_ref()
            .expect("a bootstrap has a source")
    }

    /// Check a served document (named `name` in messages) exactly as a
    /// local file is checked, joined with this bootstrap.
    pub fn with_document(&self, name: &str, text: &str) -> Result<Config, ConfigError> {
        let doc_path = Path::new(name);
        let doc = deserialize(doc_path, text)?;
        let misplaced = misplaced(
            &doc.bootstrap_keys(),
            &format!(
                "is set in each instance's bootstrap file ({}), not in the served document, which holds phase, client_ip, dns_refresh and routes; it changes only with `cutover run --upgrade`",
                self.path.display()
            ),
        );
        let boot = deserialize(&self.path, &self.text)?;
        let joined = FileConfig {
            config_source: boot.config_source,
            phase: doc.phase,
            listeners: boot.listeners,
            admin: boot.admin,
            server: boot.server,
            access_log: boot.access_log,
            client_ip: doc.client_ip,
            dns_refresh: doc.dns_refresh,
            routes: doc.routes,
        };
        let base_dir = self.path.parent().unwrap_or(Path::new("."));
        let url = self.url_override.as_deref();
        let mut config = checked(
            doc_path,
            text,
            Some((&self.path, &self.text)),
            |raw| {
                after(
                    misplaced,
                    validate::validate(raw, base_dir, Part::Whole, url),
                )
            },
            joined,
        )?;
        config.sha256 = sha256_hex(text.as_bytes());
        Ok(config)
    }
}

/// One problem for each key set in the part it does not belong to.
fn misplaced(keys: &[&'static str], message: &str) -> Vec<Problem> {
    keys.iter()
        .map(|key| Problem {
            path: key.to_string(),
            message: message.to_string(),
            position: None,
        })
        .collect()
}

/// `checked`, with the misplaced keys' problems first: a file with any is
/// refused, whatever the rest says.
fn after(
    mut misplaced: Vec<Problem>,
    checked: Result<Config, Vec<Problem>>,
) -> Result<Config, Vec<Problem>> {
    match checked {
        Ok(c) if misplaced.is_empty() => Ok(c),
        Ok(_) => Err(misplaced),
        Err(problems) => {
            misplaced.extend(problems);
            Err(misplaced)
        }
    }
}

/// Hex SHA-256, as `sha256sum` prints it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    openssl::sha::sha256(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `config_source:` (or `run --config-url`, which stands for its `url`).
pub(super) fn check_source(
    c: &mut Checker,
    file: Option<&SourceFile>,
    url_override: Option<&str>,
) -> Option<ConfigSource> {
    let default = SourceFile::default();
    let f = file.unwrap_or(&default);
    let url = match (url_override, &f.url) {
        (Some(u), _) => parse_source_url(u).map_err(|e| ("--config-url", e)),
        (None, Some(u)) => parse_source_url(u).map_err(|e| ("config_source.url", e)),
        (None, None) => Err((
            "config_source.url",
            "missing: the URL every instance fetches its document from (or give `cutover run --config-url URL`)".to_string(),
        )),
    };
    let url = match url {
        Ok(u) => Some(u),
        Err((key, e)) => {
            c.problem(key, e);
            None
        }
    };
    let interval = c.duration(
        "config_source.interval",
        f.interval.as_deref(),
        DEFAULT_SOURCE_INTERVAL,
    );
    // Unset, the timeout is 5s or the interval, whichever is shorter.
    let timeout = c.duration(
        "config_source.timeout",
        f.timeout.as_deref(),
        DEFAULT_SOURCE_TIMEOUT.min(interval),
    );
    if interval < std::time::Duration::from_secs(1) {
        c.problem(
            "config_source.interval",
            "must be at least 1s (every instance fetches once per interval)",
        );
    } else if timeout > interval {
        c.problem(
            "config_source.timeout",
            format!("must not be longer than config_source.interval ({interval:?})"),
        );
    }
    let cache = c
        .base_dir()
        .join(f.cache.as_deref().unwrap_or(DEFAULT_SOURCE_CACHE));
    if cache.file_name().is_none() {
        c.problem("config_source.cache", "must name a file");
    }
    let ca_file = f.ca_file.as_ref().and_then(|ca| {
        let file = c.readable_file("config_source.ca_file", ca)?;
        let ok = std::fs::read(&file)
            .ok()
            .and_then(|pem| pingora::tls::x509::X509::stack_from_pem(&pem).ok())
            .is_some_and(|certs| !certs.is_empty());
        if !ok {
            c.problem(
                "config_source.ca_file",
                format!("`{}` holds no PEM certificate", file.display()),
            );
        }
        Some(file)
    });
    if ca_file.is_some() && url.as_ref().is_some_and(|u| !u.https) {
        c.problem(
            "config_source.ca_file",
            "is set but the URL is http://: use https:// or remove ca_file",
        );
    }
    let header_file = f.header_file.as_ref().and_then(|h| {
        let file = c.readable_file("config_source.header_file", h)?;
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if let Err(e) = parse_header_line(&text) {
            c.problem(
                "config_source.header_file",
                format!("`{}`: {e}", file.display()),
            );
        }
        Some(file)
    });
    let max_bytes = match f.max_bytes {
        None => DEFAULT_SOURCE_MAX_BYTES,
        Some(0) => {
            c.problem("config_source.max_bytes", "must be more than 0");
            DEFAULT_SOURCE_MAX_BYTES
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    Some(ConfigSource {
        url: url?,
        interval,
        timeout,
        cache,
        ca_file,
        header_file,
        max_bytes,
    })
}

/// A header file holds one `Name: value` line (e.g. `Authorization:
/// Bearer …`); a trailing newline and surrounding blanks are ignored.
pub fn parse_header_line(text: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let line = text.trim();
    if line.lines().count() != 1 {
        return Err("must hold exactly one `Name: value` line".to_string());
    }
    let (name, value) = line
        .split_once(':')
        .ok_or("must hold one `Name: value` line (e.g. `Authorization: Bearer …`)")?;
    let name = http::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("`{}` is not a header name", name.trim()))?;
    if name == http::header::HOST {
        return Err("Host is sent from the URL; name another header".to_string());
    }
    let value = http::HeaderValue::from_str(value.trim())
        .map_err(|_| "the value holds a character a header cannot carry".to_string())?;
    Ok((name, value))
}

/// `https://host[:port]/path[?query]`, or `http://` to a loopback address
/// only (a document read in clear text off the machine could be changed
/// on the way).
pub(super) fn parse_source_url(text: &str) -> Result<SourceUrl, String> {
    let bad = || {
        "is not an https:// URL (e.g. `https://config.internal/cutover.yaml`, or an S3 presigned URL)"
            .to_string()
    };
    let uri: http::Uri = text.trim().parse().map_err(|_| bad())?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad()),
    };
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.as_str().contains('@') {
        return Err("must not carry a user:password (send a token with `header_file`)".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if host.is_empty() {
        return Err(bad());
    }
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !https && !loopback {
        return Err(format!(
            "http:// is allowed only to a loopback address; `{host}` needs https:// (the document decides where all traffic goes)"
        ));
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/")
        .to_string();
    Ok(SourceUrl {
        https,
        host,
        port,
        path_and_query,
    })
}

impl SourceUrl {
    /// Where a redirect's `Location` points, from this URL. `None` when it
    /// is no URL or leaves https for http.
    pub fn follow(&self, location: &str) -> Option<SourceUrl> {
        let next = if location.starts_with('/') && !location.starts_with("//") {
            SourceUrl {
                path_and_query: location.to_string(),
                ..self.clone()
            }
        } else {
            parse_source_url(location).ok()?
        };
        (next.https || !self.https).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_source_url(
            "https://bucket.s3.eu-west-1.amazonaws.com/cutover.yaml?X-Amz-Signature=abc%2F",
        )
        .unwrap();
        assert_eq!(u.port, 443);
        assert_eq!(u.path_and_query, "/cutover.yaml?X-Amz-Signature=abc%2F");
        // The signature never reaches a log line.
        assert_eq!(
            u.to_string(),
            "https://bucket.s3.eu-west-1.amazonaws.com/cutover.yaml?…"
        );
        let l = parse_source_url("http://127.0.0.1:8000").unwrap();
        assert_eq!((l.https, l.path_and_query.as_str()), (false, "/"));
        assert!(parse_source_url("http://[::1]:81/x").is_ok());
        assert!(parse_source_url("http://config.internal/x")
            .unwrap_err()
            .contains("loopback"));
        assert!(parse_source_url("https://u:p@h/x").is_err());
        assert!(parse_source_url("ftp://h/x").is_err());
        assert!(parse_source_url("config.internal/x").is_err());
    }

    #[test]
    fn redirects_never_downgrade() {
        let u = parse_source_url("https://a.test/x").unwrap();
        assert_eq!(u.follow("/y?z").unwrap().path_and_query, "/y?z");
        assert_eq!(u.follow("https://b.test/w").unwrap().host, "b.test");
        assert!(u.follow("http://127.0.0.1/w").is_none());
        assert!(u.follow("not a url").is_none());
        let l = parse_source_url("http://127.0.0.1:1/x").unwrap();
        assert!(l.follow("https://b.test/").is_some());
    }

    #[test]
    fn header_lines() {
        let (n, v) = parse_header_line("Authorization: Bearer abc\n").unwrap();
        assert_eq!(
            (n.as_str(), v.to_str().unwrap()),
            ("authorization", "Bearer abc")
        );
        assert!(parse_header_line("no colon").is_err());
        assert!(parse_header_line("A: 1\nB: 2").is_err());
        assert!(parse_header_line("Host: x").is_err());
        assert!(parse_header_line("Bad Name: x").is_err());
    }

    #[test]
    fn keys_belong_to_one_part() {
        assert!(bootstrap_key("listeners[0].address"));
        assert!(bootstrap_key("config_source.url"));
        assert!(!bootstrap_key("routes[1].upstreams[0].weight"));
        assert!(!bootstrap_key("phase"));
    }

    #[test]
    fn digest_is_sha256sum() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

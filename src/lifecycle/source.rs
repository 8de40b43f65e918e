//! The config document pulled from `config_source.url`: fetched at start
//! and every `interval` (and at once on SIGHUP) with `If-None-Match` /
//! `If-Modified-Since`, checked exactly like a local file
//! ([`Bootstrap::with_document`]) and swapped in whole like a SIGHUP
//! reload. A failure (fetch or check) keeps the running model; it is
//! counted in `cutover_config_fetches_total{result}` and logged once per
//! change of problem. The last good document is kept in `cache`, written
//! atomically, so an instance (re)started while the source is down starts
//! from it; with neither, `run` refuses to start and says why.
//!
//! Redirects are followed (at most [`MAX_REDIRECTS`], never from https to
//! http); the `header_file` line (a token) is read at every fetch, so it
//! can rotate, and is sent only to the configured host, as curl does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use log::{error, info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::{sha256_hex, Bootstrap, Config, ConfigSource, SourceUrl};
use crate::model::Process;
use crate::observe::metrics::{Metrics, SourceFamilies};
use crate::shift::probe::{self, Target, TlsTarget, TooLarge};

pub const MAX_REDIRECTS: usize = 5;

/// Why a fetch gave no document; [`FetchError::result`] is its counter label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    Status(u16, String),
    Redirects(String),
    TooLarge(String),
    Timeout(Duration),
    Failed(String),
    /// An answer that is no config document (HTML, not UTF-8).
    NotADocument(String),
}

impl FetchError {
    pub fn result(&self) -> &'static str {
        match self {
            FetchError::Status(..) => "status",
            FetchError::Redirects(_) => "redirects",
            FetchError::TooLarge(_) => "too_large",
            FetchError::Timeout(_) => "timeout",
            FetchError::Failed(_) => "error",
            FetchError::NotADocument(_) => "invalid",
        }
    }
}

impl FetchError {
    /// What the problem is without what changes from one fetch to the next
    /// (the RequestId in an S3 error's body, which of a name's rotating
    /// addresses was tried last): a problem is logged again only when this
    /// changes.
    pub fn identity(&self) -> String {
        match self {
            FetchError::Status(code, body) => {
                format!("status {code} {}", without_request_ids(body))
            }
            FetchError::Failed(why) => without_addresses(why),
            // What follows the colon is a snippet of the page.
            FetchError::NotADocument(why) => why.split(':').next().unwrap_or(why).to_string(),
            other => other.to_string(),
        }
    }
}

/// An error body without S3's per-request `<RequestId>` and `<HostId>`
/// (its `<Code>` and `<Message>` say what is wrong: `AccessDenied` for a
/// bucket policy, `Request has expired` for a presigned URL).
fn without_request_ids(body: &str) -> String {
    let mut rest = body;
    let mut kept = String::with_capacity(body.len());
    while let Some((at, tag)) = ["<RequestId>", "<HostId>"]
        .iter()
        .filter_map(|tag| rest.find(tag).map(|at| (at, *tag)))
        .min()
    {
        kept.push_str(&rest[..at]);
        let close = format!("</{}", &tag[1..]);
        rest = match rest[at..].find(&close) {
            Some(end) => &rest[at + end + close.len()..],
            // Cut off by the snippet's length: nothing after it counts.
            None => "",
        };
    }
    kept.push_str(rest);
    kept
}

/// `why` with every IP address and socket address in it replaced by `*`.
fn without_addresses(why: &str) -> String {
    why.split(' ')
        .map(|word| {
            let bare = word.trim_end_matches([':', ',', ';', ')']);
            if bare.parse::<std::net::SocketAddr>().is_ok()
                || bare.parse::<std::net::IpAddr>().is_ok()
            {
                word.replacen(bare, "*", 1)
            } else {
                word.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Status(code, body) if body.is_empty() => write!(f, "answered {code}"),
            FetchError::Status(code, body) => write!(f, "answered {code}: {body}"),
            FetchError::Redirects(why) | FetchError::NotADocument(why) => f.write_str(why),
            FetchError::TooLarge(why) => write!(f, "sent too much: {why}"),
            FetchError::Failed(why) => write!(f, "could not be fetched: {why}"),
            FetchError::Timeout(t) => write!(
                f,
                "gave no whole answer within {t:?} (config_source.timeout)"
            ),
        }
    }
}

/// What makes the next fetch conditional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<HeaderValue>,
}

#[derive(Debug)]
pub enum Answer {
    NotModified,
    Document {
        text: String,
        validators: Validators,
    },
}

/// One fetch: redirects followed, the deadline over all of it.
pub async fn fetch(
    source: &ConfigSource,
    validators: &Validators,
    hosts_file: Option<&Path>,
) -> Result<Answer, FetchError> {
    match tokio::time::timeout(source.timeout, fetch_inner(source, validators, hosts_file)).await {
        Ok(answer) => answer,
        Err(_) => Err(FetchError::Timeout(source.timeout)),
    }
}

async fn fetch_inner(
    source: &ConfigSource,
    validators: &Validators,
    hosts_file: Option<&Path>,
) -> Result<Answer, FetchError> {
    let mut extra: Vec<(HeaderName, HeaderValue)> = Vec::new();
    if let Some(v) = &validators.etag {
        extra.push((http::header::IF_NONE_MATCH, v.clone()));
    }
    if let Some(v) = &validators.last_modified {
        extra.push((http::header::IF_MODIFIED_SINCE, v.clone()));
    }
    let token = match &source.header_file {
        None => None,
        Some(file) => {
            let text = tokio::fs::read_to_string(file).await.map_err(|e| {
                FetchError::Failed(format!(
                    "cannot read config_source.header_file {}: {e}",
                    file.display()
                ))
            })?;
            Some(crate::config::parse_header_line(&text).map_err(|e| {
                FetchError::Failed(format!("config_source.header_file {}: {e}", file.display()))
            })?)
        }
    };
    let mut url = source.url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let mut headers = extra.clone();
        if url.host == source.url.host {
            headers.extend(token.clone());
        }
        let reply = get_once(source, &url, &headers, hosts_file).await?;
        match reply.status {
            StatusCode::OK => return document(reply),
            StatusCode::NOT_MODIFIED => return Ok(Answer::NotModified),
            s if s.is_redirection() => {
                let location = reply
                    .headers
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        FetchError::Status(s.as_u16(), "a redirect without Location".into())
                    })?;
                url = url.follow(location).ok_or_else(|| {
                    FetchError::Redirects(format!(
                        "answered {} to `{}`, which is no https:// URL (a redirect never leaves https)",
                        s.as_u16(),
                        location.split('?').next().unwrap_or("")
                    ))
                })?;
            }
            s => return Err(FetchError::Status(s.as_u16(), snippet(&reply.body))),
        }
    }
    Err(FetchError::Redirects(format!(
        "redirected more than {MAX_REDIRECTS} times (last to {url}); point config_source.url at the final location"
    )))
}

/// A 200's body as a document, or why it is none.
fn document(reply: probe::Reply) -> Result<Answer, FetchError> {
    let header = |name| {
        reply
            .headers
            .get(name)
            .filter(|v: &&HeaderValue| !v.is_empty())
            .cloned()
    };
    let content_type = reply
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with("text/html") {
        return Err(FetchError::NotADocument(format!(
            "answered 200 with text/html (an error or sign-in page?), not a YAML document: {}",
            snippet(&reply.body)
        )));
    }
    let validators = Validators {
        etag: header(http::header::ETAG),
        last_modified: header(http::header::LAST_MODIFIED),
    };
    let text = String::from_utf8(reply.body.to_vec()).map_err(|e| {
        FetchError::NotADocument(format!(
            "answered 200 with a body that is not UTF-8 text (byte {}): not a YAML document",
            e.utf8_error().valid_up_to()
        ))
    })?;
    Ok(Answer::Document { text, validators })
}

/// The first printable characters of a body, on one line, for a log line
/// (S3 says why in `<Code>` and `<Message>`).
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(400)]);
    let one_line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    one_line
}

/// One GET to `url`, each of its addresses in turn until one answers.
async fn get_once(
    source: &ConfigSource,
    url: &SourceUrl,
    headers: &[(HeaderName, HeaderValue)],
    hosts_file: Option<&Path>,
) -> Result<probe::Reply, FetchError> {
    let addresses = resolve(&url.host, url.port, hosts_file).await?;
    let default_port = if url.https { 443 } else { 80 };
    let host = match (url.host.contains(':'), url.port == default_port) {
        (true, true) => format!("[{}]", url.host),
        (true, false) => format!("[{}]:{}", url.host, url.port),
        (false, true) => url.host.clone(),
        (false, false) => format!("{}:{}", url.host, url.port),
    };
    let mut last = String::new();
    for connect in addresses {
        let target = Target {
            connect,
            tls: url.https.then(|| TlsTarget {
                sni: url.host.clone(),
                ca_files: source.ca_file.iter().cloned().collect(),
                system_roots: source.ca_file.is_none(),
                verify: true,
            }),
            host: host.clone(),
            path: url.path_and_query.clone(),
        };
        match probe::get_limited(&target, headers, source.max_bytes).await {
            Ok(reply) => return Ok(reply),
            Err(e) => {
                if let Some(t) = e.downcast_ref::<TooLarge>() {
                    return Err(FetchError::TooLarge(format!(
                        "{t} (config_source.max_bytes); a config document is far smaller"
                    )));
                }
                last = format!("{connect}: {e:#}");
            }
        }
    }
    Err(FetchError::Failed(last))
}

async fn resolve(
    host: &str,
    port: u16,
    hosts_file: Option<&Path>,
) -> Result<Vec<std::net::SocketAddr>, FetchError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![(ip, port).into()]);
    }
    if let Some(file) = hosts_file {
        if let Ok(text) = tokio::fs::read_to_string(file).await {
            if let Some(ips) = crate::model::dns::parse_hosts(&text).0.get(host) {
                return Ok(ips.iter().map(|ip| (*ip, port).into()).collect());
            }
        }
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(found) => {
            let found: Vec<_> = found.collect();
            if found.is_empty() {
                Err(FetchError::Failed(format!(
                    "`{host}` resolves to no address"
                )))
            } else {
                Ok(found)
            }
        }
        Err(e) => Err(FetchError::Failed(format!("cannot resolve `{host}`: {e}"))),
    }
}

/// The first line of a cache file; the document follows it byte for byte.
const CACHE_MARK: &str = "# cutover config_source cache sha256=";

/// Keep `text` as the last good document: a temporary file beside the
/// cache, synced, then renamed over it, so a reader sees the old file or
/// the new one, never part of one.
pub fn write_cache(path: &Path, text: &str, url: &SourceUrl) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("cache"),
        std::process::id()
    ));
    let fetched = humantime::format_rfc3339_seconds(SystemTime::now());
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write!(
            f,
            "{CACHE_MARK}{} fetched={fetched} from={url}\n{text}",
            sha256_hex(text.as_bytes())
        )?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The cached document, checked against the digest it was written with.
pub fn read_cache(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot be read: {e}"))?;
    let (first, doc) = text
        .split_once('\n')
        .ok_or("is not a cutover cache file (no header line)")?;
    let digest = first
        .strip_prefix(CACHE_MARK)
        .and_then(|rest| rest.split(' ').next())
        .ok_or("is not a cutover cache file (its first line is not cutover's)")?;
    if sha256_hex(doc.as_bytes()) != digest {
        return Err(format!(
            "is truncated or altered: its document does not match sha256={digest}"
        ));
    }
    Ok(doc.to_string())
}

/// What the fetcher remembers between fetches.
#[derive(Debug, Default)]
struct State {
    validators: Validators,
    /// The last document a 200 brought, and whether it checked.
    seen: Option<(String, bool)>,
    /// The running document's digest, and the document.
    running: String,
    running_text: String,
    /// The identity of the problem last logged, so each is logged once.
    problem: Option<String>,
    /// The last cache write failed, this way (logged once per change; a
    /// source that answers fine meanwhile does not clear it).
    cache_failed: Option<String>,
    from_cache: bool,
    /// Conditional fetches since the last unconditional one.
    conditional: u32,
    /// The next fetch asks unconditionally (SIGHUP: "fetch now").
    force: bool,
}

/// Every this many fetches one is unconditional (5 minutes at the default
/// interval). A validator can miss a change: nginx's ETag is the file's
/// modification second and size, so two edits of the same length within
/// one second share it, and the second would be answered 304 until the
/// file changes again.
pub const UNCONDITIONAL_EVERY: u32 = 30;

impl State {
    /// The validators for the next fetch: none when forced or when the
    /// last unconditional fetch is [`UNCONDITIONAL_EVERY`] fetches ago.
    fn next_validators(&mut self) -> Validators {
        if std::mem::take(&mut self.force) || self.conditional + 1 >= UNCONDITIONAL_EVERY {
            self.conditional = 0;
            Validators::default()
        } else {
            self.conditional += 1;
            self.validators.clone()
        }
    }
}

/// The source of a running process; SIGHUP wakes it.
pub struct Source {
    pub bootstrap: Bootstrap,
    hosts_file: Option<PathBuf>,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
}

/// The config a process starts with, and its source.
pub struct Started {
    pub config: Config,
    pub source: Arc<Source>,
}

/// One fetch, and the document checked against the bootstrap.
pub enum Fetched {
    NotModified,
    Document {
        text: String,
        sha: String,
        validators: Validators,
        checked: Result<Box<Config>, crate::config::ConfigError>,
    },
    Failed(FetchError),
}

impl Fetched {
    /// Its `cutover_config_fetches_total{result}` label, when it is final
    /// (a document still to compare with the running one is not).
    fn result(&self) -> &'static str {
        match self {
            Fetched::NotModified => "not_modified",
            Fetched::Document { checked: Ok(_), .. } => "applied",
            Fetched::Document {
                checked: Err(_), ..
            } => "invalid",
            Fetched::Failed(e) => e.result(),
        }
    }

    /// What [`Source::problem`] tells problems apart by.
    fn identity(&self) -> String {
        match self {
            Fetched::NotModified => "status 304".into(),
            Fetched::Document { sha, .. } => refused(sha),
            Fetched::Failed(e) => e.identity(),
        }
    }

    /// Why this gives no config to run, or `None` when it does. (A 304 is
    /// a failure only where nothing was asked conditionally.)
    fn failure(&self) -> Option<String> {
        match self {
            Fetched::Document { checked: Ok(_), .. } => None,
            Fetched::Document {
                checked: Err(e), ..
            } => Some(refusal(e)),
            Fetched::NotModified => Some("answered 304 to a request without validators".into()),
            Fetched::Failed(e) => Some(e.to_string()),
        }
    }
}

pub async fn fetch_checked(
    bootstrap: &Bootstrap,
    validators: &Validators,
    hosts_file: Option<&Path>,
) -> Fetched {
    let source = bootstrap.source();
    match fetch(source, validators, hosts_file).await {
        Ok(Answer::NotModified) => Fetched::NotModified,
        Err(e) => Fetched::Failed(e),
        Ok(Answer::Document { text, validators }) => Fetched::Document {
            sha: sha256_hex(text.as_bytes()),
            checked: bootstrap
                .with_document(&source.url.to_string(), &text)
                .map(Box::new),
            text,
            validators,
        },
    }
}

/// The cached document joined with `bootstrap`: its digest, its text and
/// the config.
pub fn cached(bootstrap: &Bootstrap) -> Result<(String, String, Config), String> {
    let cache = &bootstrap.source().cache;
    let text = read_cache(cache)?;
    let config = bootstrap
        .with_document(&cache.display().to_string(), &text)
        .map_err(|e| format!("no longer checks: {e}"))?;
    Ok((sha256_hex(text.as_bytes()), text, config))
}

/// The document a one-shot command (`verify`) works on: fetched now, else
/// the cache (with a note saying why), else why there is none.
pub async fn document_now(
    bootstrap: &Bootstrap,
    hosts_file: Option<&Path>,
) -> Result<(Config, Option<String>), String> {
    let name = bootstrap.source().url.to_string();
    let fetched = fetch_checked(bootstrap, &Validators::default(), hosts_file).await;
    let why = match (fetched.failure(), fetched) {
        (None, Fetched::Document { checked: Ok(c), .. }) => return Ok((*c, None)),
        (why, _) => why.unwrap_or_default(),
    };
    match cached(bootstrap) {
        Ok((sha, _, c)) => Ok((
            c,
            Some(format!(
                "the config source {name} {why}; using the cache {} (sha256={sha})",
                bootstrap.source().cache.display()
            )),
        )),
        Err(cache_why) => Err(format!(
            "the config source {name} {why}\nand the cache {} {cache_why}",
            bootstrap.source().cache.display()
        )),
    }
}

/// Fetch once (the deadline is `timeout`); on any problem fall back to the
/// cache; with neither, the reason `run` refuses to start.
pub fn start(
    bootstrap: Bootstrap,
    metrics: &Metrics,
    hosts_file: Option<PathBuf>,
) -> anyhow::Result<Started> {
    let m = &metrics.source;
    m.init();
    let source = bootstrap.source().clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fetched = rt.block_on(fetch_checked(
        &bootstrap,
        &Validators::default(),
        hosts_file.as_deref(),
    ));
    m.fetched(match fetched {
        // Nothing was asked conditionally: a 304 is the server's fault.
        Fetched::NotModified => "status",
        ref f => f.result(),
    });
    let mut state = State::default();
    let name = source.url.to_string();
    let why = fetched.failure().unwrap_or_default();
    let identity = fetched.identity();
    match fetched {
        Fetched::Document {
            text,
            sha,
            validators,
            checked,
        } => {
            state.validators = validators;
            match checked {
                Ok(config) => {
                    m.succeeded(SystemTime::now());
                    m.set_from_cache(false);
                    if let Err(e) = write_cache(&source.cache, &text, &source.url) {
                        m.cache_write_failed();
                        warn!(
                            "config source: cannot write the cache {}: {e}",
                            source.cache.display()
                        );
                        state.cache_failed = Some(format!("{:?}", e.kind()));
                    }
                    info!("config source {name}: document sha256={sha} fetched and checked");
                    state.seen = Some((sha.clone(), true));
                    state.running = sha;
                    state.running_text = text;
                    return Ok(Started {
                        config: *config,
                        source: Arc::new(Source::new(bootstrap, hosts_file, state)),
                    });
                }
                Err(_) => {
                    metrics.reload_result(false);
                    state.seen = Some((sha, false));
                }
            }
        }
        Fetched::NotModified | Fetched::Failed(_) => {}
    }
    match cached(&bootstrap) {
        Ok((sha, text, config)) => {
            warn!(
                "config source {name} {why}: starting from the cache {} (sha256={sha}); the next good fetch replaces it",
                source.cache.display()
            );
            m.set_from_cache(true);
            state.running = sha;
            state.running_text = text;
            state.from_cache = true;
            state.problem = Some(identity);
            Ok(Started {
                config,
                source: Arc::new(Source::new(bootstrap, hosts_file, state)),
            })
        }
        Err(cache_why) => anyhow::bail!(
            "cannot start: the config source {name} {why}\nand the cache {} {cache_why}\n(fix the source or the network path to it; or start with a whole local config: `cutover run --config FILE` without config_source)",
            source.cache.display()
        ),
    }
}

impl Source {
    fn new(bootstrap: Bootstrap, hosts_file: Option<PathBuf>, state: State) -> Self {
        Self {
            bootstrap,
            hosts_file,
            state: Mutex::new(state),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Fetch now, unconditionally (SIGHUP).
    pub fn wake(&self) {
        self.lock().force = true;
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One round: fetch, check, swap in, keep the cache. Never holds the
    /// state lock across an await.
    pub async fn poll(&self, process: &Process) {
        let source = self.bootstrap.source();
        let m = &process.metrics.source;
        let validators = self.lock().next_validators();
        let fetched = fetch_checked(&self.bootstrap, &validators, self.hosts_file.as_deref()).await;
        let (text, sha, checked) = match fetched {
            Fetched::NotModified => {
                m.fetched("not_modified");
                let good = self.lock().seen.as_ref().is_some_and(|(_, ok)| *ok);
                if good {
                    self.succeeded(m);
                    self.keep_cache(m);
                }
                return;
            }
            Fetched::Failed(e) => {
                m.fetched(e.result());
                self.problem(e.identity(), &e);
                return;
            }
            Fetched::Document {
                text,
                sha,
                validators,
                checked,
            } => {
                let mut state = self.lock();
                state.validators = validators;
                // The same refused bytes again: nothing to install, no
                // reload to count; logged again only after another problem.
                if state.seen.as_ref() == Some(&(sha.clone(), false)) {
                    drop(state);
                    m.fetched("invalid");
                    if let Err(e) = &checked {
                        self.problem(refused(&sha), &refusal(e));
                    }
                    return;
                }
                if sha == state.running {
                    // What a 304 to the next fetch confirms (after a start
                    // from the cache, nothing else has set it).
                    state.seen = Some((sha, true));
                    drop(state);
                    m.fetched("unchanged");
                    self.succeeded(m);
                    self.keep_cache(m);
                    return;
                }
                (text, sha, checked)
            }
        };
        let name = source.url.to_string();
        match checked {
            Err(e) => {
                m.fetched("invalid");
                process.metrics.reload_result(false);
                self.problem(refused(&sha), &refusal(&e));
                self.lock().seen = Some((sha, false));
            }
            Ok(config) => {
                for w in &config.warnings {
                    warn!("config: {w}");
                }
                let summary = format!("phase {:?}, {} route(s)", config.phase, config.routes.len());
                process.install(*config).await;
                process.metrics.reload_result(true);
                m.fetched("applied");
                {
                    let mut state = self.lock();
                    state.seen = Some((sha.clone(), true));
                    state.running = sha.clone();
                    state.running_text = text.clone();
                }
                info!("config source {name}: applied document sha256={sha}: {summary}");
                self.succeeded(m);
                self.store_cache(m, &text);
            }
        }
    }

    fn succeeded(&self, m: &SourceFamilies) {
        m.succeeded(SystemTime::now());
        let mut state = self.lock();
        if state.from_cache {
            state.from_cache = false;
            m.set_from_cache(false);
        }
        if state.problem.take().is_some() {
            info!(
                "config source {}: answering with the running document again",
                self.bootstrap.source().url
            );
        }
    }

    /// The source confirmed the running document, so the cache must hold
    /// it: a restart while the source is down starts from the cache. Found
    /// missing, unreadable, damaged or holding another document (removed or
    /// edited by hand), it is counted, logged and written again.
    fn keep_cache(&self, m: &SourceFamilies) {
        let source = self.bootstrap.source();
        let (running, text, failed) = {
            let state = self.lock();
            let failed = state.cache_failed.is_some();
            (state.running.clone(), state.running_text.clone(), failed)
        };
        // The last write failed: try again (counted as a write, not as
        // damage).
        if !failed {
            let why = match read_cache(&source.cache) {
                Ok(doc) if sha256_hex(doc.as_bytes()) == running => return,
                Ok(_) => "holds another document".to_string(),
                Err(why) => why,
            };
            m.cache_damaged();
            warn!(
                "config source: the cache {} {why}; writing it again with the running document (sha256={running})",
                source.cache.display()
            );
        }
        self.store_cache(m, &text);
    }

    /// Keep `text` in the cache. A failure is counted at every attempt and
    /// logged once per change of error, apart from the source's problems
    /// (the source may answer fine meanwhile); the first write that works
    /// again says so.
    fn store_cache(&self, m: &SourceFamilies, text: &str) {
        let source = self.bootstrap.source();
        match write_cache(&source.cache, text, &source.url) {
            Ok(()) => {
                if self.lock().cache_failed.take().is_some() {
                    info!(
                        "config source: the cache {} is written again",
                        source.cache.display()
                    );
                }
            }
            Err(e) => {
                m.cache_write_failed();
                let kind = format!("{:?}", e.kind());
                let mut state = self.lock();
                if state.cache_failed.as_deref() != Some(kind.as_str()) {
                    error!(
                        "config source: cannot write the cache {}: {e}; a restart while the source is down would not find the running document",
                        source.cache.display()
                    );
                    state.cache_failed = Some(kind);
                }
            }
        }
    }

    /// Log `why` unless `identity` is the problem already logged.
    fn problem(&self, identity: String, why: &dyn std::fmt::Display) {
        let mut state = self.lock();
        if state.problem.as_deref() != Some(identity.as_str()) {
            error!(
                "config source {}: {why}; keeping the running config (sha256={})",
                self.bootstrap.source().url,
                state.running
            );
            state.problem = Some(identity);
        }
    }
}

/// The identity of a refused document's problem: its digest.
fn refused(sha: &str) -> String {
    format!("refused {sha}")
}

fn refusal(e: &crate::config::ConfigError) -> String {
    format!("serves a document that is refused. {e}")
}

/// Polls the source every `interval` and at each SIGHUP.
pub struct SourcePoller {
    pub source: Arc<Source>,
    pub process: Arc<Process>,
}

#[async_trait]
impl BackgroundService for SourcePoller {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticker = tokio::time::interval(self.source.bootstrap.source().interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is now: start() has just fetched
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => {}
                _ = self.source.wake.notified() => ticker.reset(),
            }
            self.source.poll(&self.process).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_told_apart_without_what_changes_per_fetch() {
        let refused = |at: &str| {
            FetchError::Failed(format!(
                "{at}: connecting to {at}: Connection refused (os error 111)"
            ))
        };
        assert_eq!(
            refused("192.0.2.1:443").identity(),
            refused("[2001:db8::7]:443").identity()
        );
        assert_eq!(
            refused("192.0.2.1:443").identity(),
            "*: connecting to *: Connection refused (os error 111)"
        );
        assert_ne!(
            refused("192.0.2.1:443").identity(),
            FetchError::Failed("cannot resolve `config.test`: failed to lookup".into()).identity()
        );
        let denied =
            |id: &str| FetchError::Status(403, format!("<Error><RequestId>{id}</RequestId>"));
        assert_eq!(denied("A1").identity(), denied("B2").identity());
        let s3 = |message: &str, id: &str| {
            FetchError::Status(
                403,
                format!("<Error><Code>AccessDenied</Code><Message>{message}</Message><RequestId>{id}</RequestId><HostId>h{id}=</HostId></Error>"),
            )
        };
        assert_eq!(
            s3("Access Denied", "A1").identity(),
            s3("Access Denied", "B2").identity()
        );
        assert_ne!(
            s3("Access Denied", "A1").identity(),
            s3("Request has expired", "A1").identity(),
            "another reason behind the same status is another problem"
        );
        // The snippet cut inside the id.
        assert_eq!(
            FetchError::Status(403, "<Code>AccessDenied</Code><RequestId>ABC".into()).identity(),
            FetchError::Status(403, "<Code>AccessDenied</Code><RequestId>XY".into()).identity()
        );
        assert_ne!(
            denied("A1").identity(),
            FetchError::Status(404, String::new()).identity()
        );
        assert_ne!(
            FetchError::Timeout(Duration::from_secs(1)).identity(),
            FetchError::TooLarge("x".into()).identity()
        );
        assert_ne!(
            FetchError::TooLarge("x".into()).identity(),
            FetchError::TooLarge("y".into()).identity()
        );
        let page = |token: &str| {
            FetchError::NotADocument(format!("answered 200 with text/html: <form csrf={token}>"))
        };
        assert_eq!(page("1").identity(), page("2").identity());
    }

    #[test]
    fn cache_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/source.yaml");
        let url = SourceUrl {
            https: true,
            host: "h.test".into(),
            port: 443,
            path_and_query: "/c.yaml?X-Amz-Signature=secret".into(),
        };
        write_cache(&path, "phase: a\nroutes: []\n", &url).unwrap();
        assert_eq!(read_cache(&path).unwrap(), "phase: a\nroutes: []\n");
        let written = std::fs::read_to_string(&path).unwrap();
        assert!(!written.contains("secret"), "{written}");
        // No temporary file is left beside it.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        std::fs::write(&path, &written[..written.len() - 4]).unwrap();
        assert!(read_cache(&path).unwrap_err().contains("truncated"));
        std::fs::write(&path, "phase: a\n").unwrap();
        assert!(read_cache(&path)
            .unwrap_err()
            .contains("not a cutover cache"));
        assert!(read_cache(&dir.path().join("none"))
            .unwrap_err()
            .contains("cannot be read"));
    }

    #[test]
    fn one_fetch_in_thirty_and_every_forced_one_is_unconditional() {
        let mut state = State {
            validators: Validators {
                etag: Some(HeaderValue::from_static("\"5f-1a\"")),
                last_modified: None,
            },
            ..State::default()
        };
        let asked: Vec<bool> = (0..60)
            .map(|_| state.next_validators().etag.is_some())
            .collect();
        let unconditional: Vec<usize> = (0..60).filter(|i| !asked[*i]).collect();
        assert_eq!(unconditional, [29, 59]);
        state.force = true;
        assert!(state.next_validators().etag.is_none());
        assert!(state.next_validators().etag.is_some());
    }

    #[test]
    fn snippets_are_one_short_line() {
        let s = snippet(b"<Error>\n  <Code>AccessDenied</Code>\n  <Message>Request has expired</Message>\n</Error>");
        assert_eq!(
            s,
            "<Error> <Code>AccessDenied</Code> <Message>Request has expired</Message> </Error>"
        );
        assert_eq!(snippet(&[b'a'; 1000]).len(), 200);
    }

    #[test]
    fn html_and_binary_are_no_documents() {
        let reply = |ct: &str, body: &'static [u8]| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_str(ct).unwrap(),
            );
            headers.insert(http::header::ETAG, HeaderValue::from_static("\"v1\""));
            probe::Reply {
                status: StatusCode::OK,
                headers,
                body: bytes::Bytes::from_static(body),
                remote: "127.0.0.1:1".parse().unwrap(),
            }
        };
        let e = document(reply("text/html; charset=utf-8", b"<html>sign in</html>")).unwrap_err();
        assert_eq!(e.result(), "invalid");
        assert!(e.to_string().contains("text/html"));
        let e = document(reply("application/octet-stream", b"\xff\xfe")).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"));
        match document(reply("binary/octet-stream", b"phase: a\n")).unwrap() {
            Answer::Document { text, validators } => {
                assert_eq!(text, "phase: a\n");
                assert_eq!(validators.etag.unwrap(), "\"v1\"");
            }
            Answer::NotModified => panic!(),
        }
    }
}

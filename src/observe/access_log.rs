//! Access log: one line per request, `json` or `combined`, to stdout, stderr or
//! a file. The request path only formats the line and appends it to a shared
//! in-memory batch (a short critical section, never held across an await); a
//! writer thread swaps the batch out every few milliseconds and does the I/O,
//! so there is no per-request syscall or thread wake-up. When the writer falls
//! behind (slow disk) and the batch is full, lines are dropped and counted,
//! never waited for; a write error (full disk) is logged once a minute and
//! counted, never fatal.
//!
//! Log rotation: the writer notices within a second when its file was moved or
//! deleted (logrotate without `copytruncate`) and opens a new one at the path;
//! SIGHUP also reopens it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use log::{error, info};
use prometheus::IntCounter;
use serde::Serialize;

use crate::config::{AccessLogFormat, LogDestination};

/// Bytes waiting for the writer; beyond this, lines are dropped.
const MAX_PENDING: usize = 8 << 20;
/// How long a line may wait before it is written.
const WRITE_EVERY: Duration = Duration::from_millis(20);
const CHECK_ROTATION_EVERY: Duration = Duration::from_secs(1);
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// What the request path shares with the writer thread.
#[derive(Default)]
struct Pending {
    pending: Mutex<Vec<u8>>,
    reopen: AtomicBool,
    stop: AtomicBool,
}

pub struct AccessLog {
    pending: Arc<Pending>,
    format: AccessLogFormat,
    dropped: IntCounter,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What one access-log line says.
pub struct Entry<'a> {
    pub time: SystemTime,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub route: &'a str,
    pub upstream: &'a str,
    pub upstream_addr: Option<SocketAddr>,
    pub duration: Duration,
    pub bytes: u64,
    pub phase: &'a str,
    pub referer: &'a str,
    pub user_agent: &'a str,
    /// The CDN's request id and edge location (`X-Amz-Cf-Id`,
    /// `X-Amz-Cf-Pop`), empty when the response had none.
    pub cf_id: &'a str,
    pub cf_pop: &'a str,
    /// The AWS VPC endpoint id the connection's PROXY header named, empty
    /// without one.
    pub vpce: &'a str,
    /// Who answered when the upstream's `expect_header` says someone else
    /// did: `missing`, `unknown`, or the upstream its marker names; empty
    /// otherwise ([`crate::policy::marker`]).
    pub marker: &'a str,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    time: String,
    client: Option<IpAddr>,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    status: u16,
    route: &'a str,
    upstream: &'a str,
    upstream_addr: Option<SocketAddr>,
    duration: f64,
    bytes: u64,
    phase: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    cf_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    cf_pop: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    vpce: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    marker_mismatch: &'a str,
}

impl AccessLog {
    pub fn start(
        destination: LogDestination,
        format: AccessLogFormat,
        dropped: IntCounter,
        write_errors: IntCounter,
    ) -> io::Result<AccessLog> {
        let sink = Sink::open(destination)?;
        let shared = Arc::new(Pending::default());
        let for_writer = shared.clone();
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(sink, &for_writer, write_errors))?;
        Ok(AccessLog {
            pending: shared,
            format,
            dropped,
            writer: Some(writer),
        })
    }

    pub fn log(&self, e: &Entry) {
        let mut line = Vec::with_capacity(256);
        match self.format {
            AccessLogFormat::Json => {
                let json = JsonLine {
                    time: humantime::format_rfc3339_millis(e.time).to_string(),
                    client: e.client,
                    method: e.method,
                    host: e.host,
                    path: e.path,
                    status: e.status,
                    route: e.route,
                    upstream: e.upstream,
                    upstream_addr: e.upstream_addr,
                    duration: e.duration.as_secs_f64(),
                    bytes: e.bytes,
                    phase: e.phase,
                    cf_id: e.cf_id,
                    cf_pop: e.cf_pop,
                    vpce: e.vpce,
                    marker_mismatch: e.marker,
                };
                if serde_json::to_writer(&mut line, &json).is_err() {
                    return;
                }
            }
            AccessLogFormat::Combined => {
                let client = e.client.map_or("-".to_string(), |c| c.to_string());
                let _ = write!(
                    line,
                    "{client} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\"",
                    combined_time(e.time),
                    escape(e.method),
                    escape(e.path),
                    e.version,
                    e.status,
                    e.bytes,
                    escape(or_dash(e.referer)),
                    escape(or_dash(e.user_agent)),
                );
            }
        }
        line.push(b'\n');
        let mut pending = self
            .pending
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if pending.len() + line.len() > MAX_PENDING {
            drop(pending);
            self.dropped.inc();
            return;
        }
        pending.extend_from_slice(&line);
    }

    /// Reopen the file (after logrotate); a no-op for stdout/stderr.
    pub fn reopen(&self) {
        self.pending.reopen.store(true, Ordering::Relaxed);
    }
}

impl Drop for AccessLog {
    /// Write what is pending before the process exits.
    fn drop(&mut self) {
        self.pending.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// `-` for an empty value, as log formats write a missing one.
pub fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Quotes, backslashes and control bytes as `\xHH`, as nginx does.
fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s
        .bytes()
        .any(|b| b == b'"' || b == b'\\' || b < 0x20 || b == 0x7f)
    {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '"' | '\\' | '\x00'..='\x1f' | '\x7f' => out.push_str(&format!("\\x{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out.into()
}

/// `10/Oct/2000:13:55:36 +0000`, from the RFC 3339 form humantime gives.
fn combined_time(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string(); // 2000-10-10T13:55:36Z
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = s
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .copied()
        .unwrap_or("Jan");
    format!(
        "{}/{month}/{}:{} +0000",
        s.get(8..10).unwrap_or("01"),
        s.get(0..4).unwrap_or("1970"),
        s.get(11..19).unwrap_or("00:00:00")
    )
}

enum Sink {
    Stdout,
    Stderr,
    File {
        path: PathBuf,
        file: io::BufWriter<File>,
        identity: (u64, u64),
    },
}

fn open_append(path: &Path) -> io::Result<(File, (u64, u64))> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let meta = file.metadata()?;
    Ok((file, (meta.dev(), meta.ino())))
}

impl Sink {
    fn open(destination: LogDestination) -> io::Result<Sink> {
        Ok(match destination {
            LogDestination::Stdout => Sink::Stdout,
            LogDestination::Stderr => Sink::Stderr,
            LogDestination::File(path) => {
                let (file, identity) = open_append(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("access log {}: {e}", path.display()))
                })?;
                Sink::File {
                    path,
                    file: io::BufWriter::with_capacity(64 * 1024, file),
                    identity,
                }
            }
        })
    }

    fn write(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout => io::stdout().lock().write_all(line),
            Sink::Stderr => io::stderr().lock().write_all(line),
            Sink::File { file, .. } => file.write_all(line),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout => io::stdout().flush(),
            Sink::Stderr => Ok(()),
            Sink::File { file, .. } => file.flush(),
        }
    }

    /// Reopen when forced, or when the path no longer names the open file.
    fn maybe_reopen(&mut self, force: bool) -> io::Result<()> {
        let Sink::File {
            path,
            file,
            identity,
        } = self
        else {
            return Ok(());
        };
        let moved = match std::fs::metadata(&*path) {
            Ok(meta) => (meta.dev(), meta.ino()) != *identity,
            Err(_) => true,
        };
        if force || moved {
            let _ = file.flush();
            let (fresh, id) = open_append(path)?;
            *file = io::BufWriter::with_capacity(64 * 1024, fresh);
            *identity = id;
            info!("access log reopened: {}", path.display());
        }
        Ok(())
    }
}

fn write_loop(mut sink: Sink, shared: &Pending, write_errors: IntCounter) {
    let mut last_rotation_check = Instant::now();
    let mut last_error_log: Option<Instant> = None;
    let mut report = |e: io::Error| {
        write_errors.inc();
        if last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
            error!(
                "access log: {e} (lines are being lost; repeated errors are logged once a minute)"
            );
            last_error_log = Some(Instant::now());
        }
    };
    // Swapped with the shared batch, so neither side allocates in steady state.
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed);
        if !stopping {
            std::thread::sleep(WRITE_EVERY);
        }
        {
            let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *pending, &mut batch);
        }
        if !batch.is_empty() {
            if let Err(e) = sink.write(&batch).and_then(|()| sink.flush()) {
                report(e);
            }
            batch.clear();
        }
        if stopping {
            return;
        }
        let force = shared.reopen.swap(false, Ordering::Relaxed);
        if force || last_rotation_check.elapsed() >= CHECK_ROTATION_EVERY {
            last_rotation_check = Instant::now();
            if let Err(e) = sink.maybe_reopen(force) {
                report(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_time_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(971_186_136);
        assert_eq!(combined_time(t), "10/Oct/2000:13:55:36 +0000");
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("plain/path?q=1"), "plain/path?q=1");
        assert_eq!(escape("a\"b\\c\n"), "a\\x22b\\x5Cc\\x0A");
    }
}

//! Configuration: the YAML file ([`file`]) is parsed once and checked as a whole
//! ([`validate`]) into [`Config`], an immutable model that holds only checked
//! values (socket addresses, durations, header names, loaded CA certificates).
//! Nothing downstream of this module parses text from the file again.

mod file;
mod model;
mod positions;
mod rollout;
mod source;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use model::*;
pub use source::{load_file, parse_file, parse_header_line, sha256_hex, Bootstrap, Loaded};

/// One thing wrong with a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `routes[0].upstreams[1].sni`; empty for the whole file.
    pub path: String,
    pub message: String,
    /// 1-based line and column, where the file position is known.
    pub position: Option<(usize, usize)>,
}

/// Everything wrong with one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(
            f,
            "{}: {} problem{}:",
            self.file.display(),
            count,
            if count == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "  {}", self.file.display())?;
            if let Some((line, col)) = p.position {
                write!(f, ":{line}:{col}")?;
            }
            if p.path.is_empty() {
                writeln!(f, ": {}", p.message)?;
            } else {
                writeln!(f, ": {}: {}", p.path, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn whole(file: &Path, message: String) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            problems: vec![Problem {
                path: String::new(),
                message,
                position: None,
            }],
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::whole(path, format!("cannot read the config file: {e}")))
}

/// Read, parse and check the config file at `path`: a whole config (a
/// bootstrap file, which names a `config_source`, is refused here: see
/// [`load_file`]).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(path, &read(path)?)
}

/// Parse and check config text; `path` names the file in messages and anchors
/// relative `ca_file`/`cert`/`key` paths.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw = deserialize(path, text)?;
    if raw.config_source.is_some() {
        return Err(ConfigError::whole(
            path,
            "this is a bootstrap file (it has `config_source`): its routes come from the URL"
                .to_string(),
        ));
    }
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut config = checked(
        path,
        text,
        None,
        |raw| validate::validate(raw, base_dir, validate::Part::Whole, None),
        raw,
    )?;
    config.sha256 = sha256_hex(text.as_bytes());
    Ok(config)
}

/// Run `check` on `raw`; its problems get positions in `text` (or, for the
/// keys a bootstrap holds, in `bootstrap`'s text).
fn checked(
    path: &Path,
    text: &str,
    bootstrap: Option<(&Path, &str)>,
    check: impl FnOnce(file::FileConfig) -> Result<Config, Vec<Problem>>,
    raw: file::FileConfig,
) -> Result<Config, ConfigError> {
    check(raw).map_err(|mut problems| {
        let index = positions::KeyPositions::index(text);
        let other = bootstrap.map(|(_, t)| positions::KeyPositions::index(t));
        for p in &mut problems {
            let from_bootstrap = other.is_some() && source::bootstrap_key(&p.path);
            p.position = p.position.or_else(|| match (&other, from_bootstrap) {
                (Some(b), true) => b.find(&p.path),
                _ => index.find(&p.path),
            });
        }
        ConfigError {
            file: path.to_path_buf(),
            problems,
        }
    })
}

/// YAML → the file's shape, with serde's one error made readable.
fn deserialize(path: &Path, text: &str) -> Result<file::FileConfig, ConfigError> {
    let fail = |problems| ConfigError {
        file: path.to_path_buf(),
        problems,
    };
    let deserializer = serde_yaml::Deserializer::from_str(text);
    match serde_path_to_error::deserialize(deserializer) {
        Ok(raw) => Ok(raw),
        Err(e) => {
            let key_path = e.path().to_string();
            let inner = e.into_inner();
            let mut position = inner.location().map(|l| (l.line(), l.column()));
            let mut message = clean_serde_message(&inner.to_string(), &key_path);
            if position.is_none() && message.contains("more than one document") {
                // serde_yaml says neither where nor what to do.
                message = match positions::second_document(text) {
                    Some(second) => {
                        position = Some(second);
                        "a second YAML document starts here (after `---` or `...`); \
                         the config is one document"
                    }
                    None => {
                        position = Some((1, 1));
                        "the file holds more than one YAML document; the config is one document"
                    }
                }
                .to_string();
            }
            Err(fail(vec![Problem {
                path: if key_path == "." {
                    String::new()
                } else {
                    key_path
                },
                message,
                position,
            }]))
        }
    }
}

/// serde_yaml puts the key path before its messages and " at line X column Y"
/// after them; we print both ourselves, in the `file:line:col: path:` form
/// editors understand.
fn clean_serde_message(message: &str, key_path: &str) -> String {
    let mut m = match message.find(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    if let Some((prefix, rest)) = m.split_once(": ") {
        if !prefix.contains(' ') && key_path.starts_with(prefix) {
            m = rest;
        }
    }
    m.to_string()
}

//! Where each key path sits in the YAML text, so that problems found after
//! deserialisation (duplicate hosts, unreadable files) can still say `file:line:col`.
//! serde_yaml does not keep positions; yaml-rust2's event parser does.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Default)]
pub struct KeyPositions {
    by_path: HashMap<String, (usize, usize)>,
}

enum Frame {
    Mapping { path: String, key: Option<String> },
    Sequence { path: String, next_index: usize },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    positions: KeyPositions,
}

impl Walker {
    /// The path of the value that starts now, or `None` when the event is a mapping key.
    fn value_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Mapping { path, key }) => key.take().map(|k| join(path, &k)),
            Some(Frame::Sequence { path, next_index }) => {
                let p = format!("{path}[{next_index}]");
                *next_index += 1;
                Some(p)
            }
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        self.positions
            .by_path
            .entry(path.to_string())
            .or_insert((mark.line(), mark.col() + 1));
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => match self.value_path() {
                Some(path) => self.record(&path, mark),
                None => {
                    if let Some(Frame::Mapping { path, key }) = self.stack.last_mut() {
                        let full = join(path, &text);
                        *key = Some(text);
                        self.record(&full, mark);
                    }
                }
            },
            Event::Alias(_) => {
                self.value_path();
            }
            Event::MappingStart(..) => {
                let path = self.value_path().unwrap_or_default();
                self.record(&path, mark);
                self.stack.push(Frame::Mapping { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.value_path().unwrap_or_default();
                self.record(&path, mark);
                self.stack.push(Frame::Sequence {
                    path,
                    next_index: 0,
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl KeyPositions {
    /// Index every key path of `text`; a text that does not parse gives an empty index.
    pub fn index(text: &str) -> Self {
        let mut walker = Walker::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut walker, false).is_err() {
            return Self::default();
        }
        walker.positions
    }

    /// Position of `path`, or of its nearest ancestor that has one.
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(pos) = self.by_path.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_sequence_items() {
        let text = "phase: p\nroutes:\n  - name: a\n    upstreams:\n      - name: x\n        sni: bad name\n";
        let idx = KeyPositions::index(text);
        assert_eq!(idx.find("phase"), Some((1, 1)));
        assert_eq!(idx.find("routes[0].upstreams[0].sni"), Some((6, 9)));
        // A key that is absent falls back to its parent.
        assert_eq!(
            idx.find("routes[0].upstreams[0].weight").map(|p| p.0),
            Some(5)
        );
    }
}

/// Where a second YAML document starts in `text` (after `---` or `...`),
/// which serde_yaml refuses without saying where.
pub fn second_document(text: &str) -> Option<(usize, usize)> {
    #[derive(Default)]
    struct Documents {
        seen: usize,
        second: Option<(usize, usize)>,
    }
    impl MarkedEventReceiver for Documents {
        fn on_event(&mut self, ev: Event, mark: Marker) {
            if let Event::DocumentStart = ev {
                self.seen += 1;
                if self.seen == 2 && self.second.is_none() {
                    self.second = Some((mark.line(), mark.col() + 1));
                }
            }
        }
    }
    let mut docs = Documents::default();
    // A parse error after the second document started still leaves its mark.
    let _ = Parser::new_from_str(text).load(&mut docs, true);
    docs.second.or_else(|| {
        // yaml-rust2 gave up before it: the first marker line after the start.
        text.lines().enumerate().skip(1).find_map(|(i, line)| {
            let marker = line.starts_with("---") || line.starts_with("...");
            let ends = matches!(line.as_bytes().get(3), None | Some(b' ' | b'\t'));
            (marker && ends).then_some((i + 1, 1))
        })
    })
}

#[cfg(test)]
mod document_tests {
    use super::second_document;

    #[test]
    fn finds_where_a_second_document_starts() {
        assert_eq!(second_document("phase: a\n"), None);
        assert_eq!(second_document("---\nphase: a\n"), None);
        assert_eq!(
            second_document("phase: a\n---\nphase: b\n").map(|p| p.0),
            Some(2)
        );
        assert_eq!(second_document("phase: a\n...\n.\n").map(|p| p.0), Some(3));
        assert_eq!(second_document("a: [\n... b: c\n").map(|p| p.0), Some(2));
    }
}

//! The seeds' example of a state machine: a replicated hash table. Every member applies the
//! same commands in the same order, so every member holds the same table.
//!
//! Commands are text: `put <key> <value>` and `delete <key>`. A key has no whitespace; a
//! value is the rest of the line. The table is a `BTreeMap`, so that a snapshot (one line
//! per key) is the same bytes on every member.

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla_runtime::{Index, RememberedOutput, SmallStateMachine};

/// A command of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Put { key: String, value: String },
    Delete { key: String },
}

impl Command {
    /// Parses `put <key> <value>` or `delete <key>`; the error says what was wrong.
    pub fn parse(line: &str) -> Result<Command, String> {
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
        if key.is_empty() {
            return Err(format!("no key in {line:?}"));
        }
        match verb {
            "put" => Ok(Command::Put {
                key: key.into(),
                value: value.into(),
            }),
            "delete" if value.is_empty() => Ok(Command::Delete { key: key.into() }),
            "delete" => Err(format!("delete takes a key only: {line:?}")),
            _ => Err(format!("unknown command {verb:?} (put, delete)")),
        }
    }

    /// The command as it is proposed.
    pub fn encode(&self) -> Bytes {
        match self {
            Command::Put { key, value } => format!("put {key} {value}").into(),
            Command::Delete { key } => format!("delete {key}").into(),
        }
    }
}

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The value the key had before, if any.
    Done { previous: Option<String> },
    /// The command did not parse (every member refuses it alike).
    Malformed(String),
    /// Not a command: a blank or membership entry.
    Other,
}

/// An outcome as client sessions remember it (`flotilla_runtime::Sessions`): a tag byte, then
/// the previous value or the reason.
impl RememberedOutput for Outcome {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Outcome::Done { previous: None } => out.push(0),
            Outcome::Done {
                previous: Some(previous),
            } => {
                out.push(1);
                out.extend_from_slice(previous.as_bytes());
            }
            Outcome::Malformed(reason) => {
                out.push(2);
                out.extend_from_slice(reason.as_bytes());
            }
            Outcome::Other => out.push(3),
        }
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (&tag, rest) = bytes.split_first().ok_or("an empty remembered outcome")?;
        let text =
            || String::from_utf8(rest.to_vec()).map_err(|_| "a remembered outcome is not UTF-8");
        match tag {
            0 => Ok(Outcome::Done { previous: None }),
            1 => Ok(Outcome::Done {
                previous: Some(text()?),
            }),
            2 => Ok(Outcome::Malformed(text()?)),
            3 => Ok(Outcome::Other),
            _ => Err(format!("unknown remembered outcome tag {tag}")),
        }
    }
}

/// The replicated table.
#[derive(Debug, Default)]
pub struct HashMap {
    applied: Index,
    entries: BTreeMap<String, String>,
}

impl HashMap {
    /// The value of `key`, as this member has applied it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }
}

impl SmallStateMachine for HashMap {
    type Output = Outcome;

    fn applied_index(&self) -> Index {
        self.applied
    }

    fn apply_command(&mut self, index: Index, command: &[u8]) -> Outcome {
        self.applied = index;
        let parsed = std::str::from_utf8(command)
            .map_err(|_| "not UTF-8".to_string())
            .and_then(Command::parse);
        match parsed {
            Ok(Command::Put { key, value }) => Outcome::Done {
                previous: self.entries.insert(key, value),
            },
            Ok(Command::Delete { key }) => Outcome::Done {
                previous: self.entries.remove(&key),
            },
            Err(reason) => Outcome::Malformed(reason),
        }
    }

    fn apply_other(&mut self, index: Index) -> Outcome {
        self.applied = index;
        Outcome::Other
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = format!("applied {}\n", self.applied);
        for (key, value) in &self.entries {
            out.push_str(&format!("{key} {value}\n"));
        }
        out.into_bytes()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(snapshot).map_err(|_| "the snapshot is not UTF-8")?;
        let mut lines = text.lines();
        let applied = lines.next().and_then(|line| line.strip_prefix("applied "));
        self.applied = applied
            .and_then(|index| index.parse().ok())
            .ok_or("the snapshot does not start with its applied index")?;
        for line in lines {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("a snapshot line without a value: {line:?}"))?;
            self.entries.insert(key.into(), value.into());
        }
        Ok(())
    }
}

//! Histories: what every client invoked and how each operation ended, as JSON Lines.
//!
//! One event per line: `{"process": 3, "type": "invoke", "f": "write", "key": "register/7",
//! "value": 12, "time": 1234567}`. A process is sequential: its invoke is completed by the next
//! `ok`, `fail` or `info` of the same process. After an `info` (outcome unknown) the worker
//! takes a new process number, as Jepsen's workers do, because the old operation may still be
//! in flight. Times are nanoseconds since the run started, from one monotonic clock.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kind of a history event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Invoke,
    /// The operation took effect (a read returned its value).
    Ok,
    /// The operation definitely did not take effect.
    Fail,
    /// The operation may or may not have taken effect.
    Info,
}

/// The operation of a history event. The register workload uses `read`, `write` and `cas`; the
/// set and counter workloads record their additions as `add`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Function {
    Read,
    Write,
    Cas,
    Add,
}

/// One line of a history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub f: Function,
    pub key: String,
    pub value: Value,
    /// Nanoseconds since the run started.
    pub time: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("line {line}: {source}")]
    Parse {
        line: usize,
        source: serde_json::Error,
    },
    #[error("line {line}: process {process} completes an operation it never invoked")]
    CompletionWithoutInvoke { line: usize, process: u64 },
    #[error("line {line}: process {process} invokes an operation while one is still pending")]
    ConcurrentInvoke { line: usize, process: u64 },
    #[error("line {line}: process {process} completes {completed} but invoked {invoked}")]
    MismatchedCompletion {
        line: usize,
        process: u64,
        invoked: String,
        completed: String,
    },
    #[error("line {line}: time goes backwards for process {process}")]
    TimeBackwards { line: usize, process: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Completion {
    /// Took effect; carries the completion's value (a read's result).
    Ok(Value),
    /// Definitely did not take effect.
    Fail,
    /// Unknown: may have taken effect at any time after its invocation, or never.
    Info,
}

/// An invocation paired with its completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub process: u64,
    pub f: Function,
    pub key: String,
    /// The invocation's value: the value written, `[expected, new]` for a cas, null for a read.
    pub value: Value,
    pub completion: Completion,
    pub invoke_ns: u64,
    /// `None` when the outcome is unknown: such an operation is concurrent with everything
    /// after its invocation.
    pub complete_ns: Option<u64>,
}

impl Operation {
    pub fn describe(&self) -> String {
        let time = |ns: u64| format!("{:.6}s", ns as f64 / 1e9);
        let end = self.complete_ns.map_or("?".to_string(), time);
        let result = match &self.completion {
            Completion::Ok(value) if self.f == Function::Read => format!(" -> {value}"),
            Completion::Ok(_) => String::new(),
            Completion::Fail => " (fail)".into(),
            Completion::Info => " (info)".into(),
        };
        let argument = if self.f == Function::Read {
            String::new()
        } else {
            format!(" {}", self.value)
        };
        format!(
            "process {} {:?} {}{argument}{result} [{} .. {end}]",
            self.process,
            self.f,
            self.key,
            time(self.invoke_ns)
        )
        .to_lowercase()
    }
}

/// Pairs invocations with completions. An invocation never completed (the history ends
/// first) counts as `info`.
pub fn pair_operations(events: &[Event]) -> Result<Vec<Operation>, HistoryError> {
    let mut pending: BTreeMap<u64, (usize, &Event)> = BTreeMap::new();
    let mut operations: Vec<Option<Operation>> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let line = index + 1;
        let process = event.process;
        if event.kind == EventType::Invoke {
            if pending.contains_key(&process) {
                return Err(HistoryError::ConcurrentInvoke { line, process });
            }
            pending.insert(process, (operations.len(), event));
            operations.push(None);
            continue;
        }
        let (slot, invoke) = pending
            .remove(&process)
            .ok_or(HistoryError::CompletionWithoutInvoke { line, process })?;
        if invoke.f != event.f || invoke.key != event.key {
            return Err(HistoryError::MismatchedCompletion {
                line,
                process,
                invoked: format!("{:?} {}", invoke.f, invoke.key),
                completed: format!("{:?} {}", event.f, event.key),
            });
        }
        if event.time < invoke.time {
            return Err(HistoryError::TimeBackwards { line, process });
        }
        let (completion, complete_ns) = match event.kind {
            EventType::Ok => (Completion::Ok(event.value.clone()), Some(event.time)),
            EventType::Fail => (Completion::Fail, Some(event.time)),
            EventType::Info | EventType::Invoke => (Completion::Info, None),
        };
        operations[slot] = Some(operation_from(invoke, completion, complete_ns));
    }
    for (slot, invoke) in pending.into_values() {
        operations[slot] = Some(operation_from(invoke, Completion::Info, None));
    }
    Ok(operations.into_iter().flatten().collect())
}

fn operation_from(invoke: &Event, completion: Completion, complete_ns: Option<u64>) -> Operation {
    Operation {
        process: invoke.process,
        f: invoke.f,
        key: invoke.key.clone(),
        value: invoke.value.clone(),
        completion,
        invoke_ns: invoke.time,
        complete_ns,
    }
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Event>, HistoryError> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut events = Vec::new();
    for (index, line) in file.lines().enumerate() {
        let line_text = line?;
        if line_text.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str(&line_text).map_err(|source| HistoryError::Parse {
            line: index + 1,
            source,
        })?;
        events.push(event);
    }
    Ok(events)
}

pub fn write_jsonl(path: &Path, events: &[Event]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for event in events {
        serde_json::to_writer(&mut out, event)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Records events from many workers in the order they happen, stamped by one clock.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub fn new(start: Instant) -> Recorder {
        Recorder {
            start,
            events: Mutex::new(Vec::new()),
        }
    }

    pub fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Appends an event stamped now. The stamp is taken under the lock, so file order and
    /// time order agree.
    pub fn record(&self, process: u64, kind: EventType, f: Function, key: &str, value: Value) {
        let mut events = self.events.lock().expect("history lock");
        let time = self.elapsed_ns();
        events.push(Event {
            process,
            kind,
            f,
            key: key.to_string(),
            value,
            time,
        });
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("history lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(process: u64, kind: EventType, f: Function, value: Value, time: u64) -> Event {
        Event {
            process,
            kind,
            f,
            key: "k".into(),
            value,
            time,
        }
    }

    #[test]
    fn events_serialise_in_the_documented_format() {
        let line = serde_json::to_string(&event(
            3,
            EventType::Invoke,
            Function::Cas,
            json!([1, 2]),
            42,
        ))
        .unwrap();
        assert_eq!(
            line,
            r#"{"process":3,"type":"invoke","f":"cas","key":"k","value":[1,2],"time":42}"#
        );
        let parsed: Event = serde_json::from_str(
            r#"{"process": 1, "type": "ok", "f": "read", "key": "k", "value": null, "time": 7}"#,
        )
        .unwrap();
        assert_eq!(parsed.kind, EventType::Ok);
        assert_eq!(parsed.value, Value::Null);
    }

    #[test]
    fn pairs_by_process_and_leaves_unfinished_operations_unknown() {
        let events = vec![
            event(1, EventType::Invoke, Function::Write, json!(5), 10),
            event(2, EventType::Invoke, Function::Read, Value::Null, 11),
            event(2, EventType::Ok, Function::Read, json!(5), 20),
            event(1, EventType::Info, Function::Write, json!(5), 30),
            event(2, EventType::Invoke, Function::Write, json!(6), 31),
        ];
        let operations = pair_operations(&events).unwrap();
        assert_eq!(operations.len(), 3);
        assert_eq!(operations[0].completion, Completion::Info);
        assert_eq!(operations[0].complete_ns, None);
        assert_eq!(operations[1].completion, Completion::Ok(json!(5)));
        assert_eq!(operations[1].complete_ns, Some(20));
        assert_eq!(
            operations[2].completion,
            Completion::Info,
            "never completed"
        );
    }

    #[test]
    fn malformed_histories_are_rejected() {
        let orphan = vec![event(1, EventType::Ok, Function::Read, Value::Null, 1)];
        assert!(matches!(
            pair_operations(&orphan),
            Err(HistoryError::CompletionWithoutInvoke { line: 1, .. })
        ));
        let twice = vec![
            event(1, EventType::Invoke, Function::Read, Value::Null, 1),
            event(1, EventType::Invoke, Function::Read, Value::Null, 2),
        ];
        assert!(matches!(
            pair_operations(&twice),
            Err(HistoryError::ConcurrentInvoke { line: 2, .. })
        ));
        let mismatched = vec![
            event(1, EventType::Invoke, Function::Read, Value::Null, 1),
            event(1, EventType::Ok, Function::Write, json!(1), 2),
        ];
        assert!(matches!(
            pair_operations(&mismatched),
            Err(HistoryError::MismatchedCompletion { .. })
        ));
    }

    #[test]
    fn recorded_events_round_trip_through_a_file() {
        let recorder = Recorder::new(Instant::now());
        recorder.record(0, EventType::Invoke, Function::Read, "k", Value::Null);
        recorder.record(0, EventType::Ok, Function::Read, "k", json!(3));
        let events = recorder.events();
        assert!(events[0].time <= events[1].time);
        let path = std::env::temp_dir().join(format!("history-{}.jsonl", std::process::id()));
        write_jsonl(&path, &events).unwrap();
        assert_eq!(read_jsonl(&path).unwrap(), events);
        std::fs::write(&path, "{\"process\": 1}\n").unwrap();
        assert!(matches!(
            read_jsonl(&path),
            Err(HistoryError::Parse { line: 1, .. })
        ));
        let _ = std::fs::remove_file(path);
    }
}

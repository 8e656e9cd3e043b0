//! What the simulated clients ask for: etcd-shaped key-value requests, encoded as the server
//! proposes them (`flotilla_kv::Command`, tagged with the client's session and sequence number as
//! Flotilla's client does), and the history they leave for the checks at the end of a run.
//!
//! Keys under `reg/` are registers: every put, delete, compare-and-set and linearizable read
//! of them goes into the history that is checked for linearizability. Keys under `lease/` hold
//! values attached to leases (a revocation deletes them, which no register operation
//! explains), so they are checked for exactly-once application only. Leases are short (one or
//! two seconds of simulated time) and kept alive now and then, so they expire in most runs:
//! when a client is slow to renew, when it is cut off, and around leader changes.

use flotilla_chaos::history::{Event, EventType, Function};
use flotilla_kv::Command;
use flotilla_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, compare, request_op,
};
use flotilla_raft::Prng;
use serde_json::Value;

/// How many register keys the clients share (few, so that they contend).
pub const REGISTER_KEYS: u64 = 3;

/// One client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Opens the session that tags the client's writes.
    RegisterSession,
    Put {
        key: String,
        value: String,
        lease: i64,
    },
    Delete {
        key: String,
    },
    /// A transaction: if the key holds `expected` (or is absent, for `None`), put `new`.
    Cas {
        key: String,
        expected: Option<String>,
        new: String,
    },
    LeaseGrant {
        ttl_seconds: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    /// A keep-alive: answered by the leader's lease clock, through the log only when a
    /// checkpointed TTL must be cleared first.
    KeepAlive {
        id: i64,
    },
    Compact {
        revision: i64,
    },
    /// A range of one key: linearizable through the Raft read path, or serializable (the
    /// member's own state, no Raft).
    Read {
        key: String,
        serializable: bool,
    },
}

impl Request {
    /// True for requests that go through the log (and carry the session when there is one).
    pub fn is_write(&self) -> bool {
        !matches!(self, Request::Read { .. } | Request::KeepAlive { .. })
    }

    /// The command proposed for a write.
    pub fn command(&self) -> Command {
        match self {
            Request::RegisterSession => Command::register_session(),
            Request::Put { key, value, lease } => Command::put(PutRequest {
                key: key.clone().into(),
                value: value.clone().into(),
                lease: *lease,
                ..Default::default()
            }),
            Request::Delete { key } => Command::delete_range(DeleteRangeRequest {
                key: key.clone().into(),
                ..Default::default()
            }),
            Request::Cas { key, expected, new } => {
                let compare = match expected {
                    Some(value) => Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Value as i32,
                        key: key.clone().into(),
                        target_union: Some(compare::TargetUnion::Value(value.clone().into())),
                        ..Default::default()
                    },
                    None => Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Create as i32,
                        key: key.clone().into(),
                        target_union: Some(compare::TargetUnion::CreateRevision(0)),
                        ..Default::default()
                    },
                };
                let put = RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.clone().into(),
                        value: new.clone().into(),
                        ..Default::default()
                    })),
                };
                Command::txn(TxnRequest {
                    compare: vec![compare],
                    success: vec![put],
                    failure: vec![],
                })
            }
            Request::LeaseGrant { ttl_seconds } => Command::lease_grant(LeaseGrantRequest {
                ttl: *ttl_seconds,
                id: 0,
            }),
            Request::LeaseRevoke { id } => Command::lease_revoke(LeaseRevokeRequest { id: *id }),
            Request::Compact { revision } => Command::compaction(CompactionRequest {
                revision: *revision,
                physical: false,
            }),
            Request::Read { .. } => unreachable!("a read is not proposed"),
            Request::KeepAlive { .. } => unreachable!("a keep-alive is not proposed as such"),
        }
    }

    /// The range a read asks for.
    pub fn range(&self) -> Option<RangeRequest> {
        match self {
            Request::Read { key, .. } => Some(RangeRequest {
                key: key.clone().into(),
                ..Default::default()
            }),
            _ => None,
        }
    }

    /// The register operation this request is in the history, if it is one: (function,
    /// key, invocation value).
    pub fn register_op(&self) -> Option<(Function, &str, Value)> {
        match self {
            Request::Put { key, value, .. } if is_register(key) => {
                Some((Function::Write, key, Value::from(value.as_str())))
            }
            Request::Delete { key } if is_register(key) => {
                Some((Function::Write, key, Value::Null))
            }
            Request::Cas { key, expected, new } => Some((
                Function::Cas,
                key,
                Value::Array(vec![
                    expected.as_deref().map_or(Value::Null, Value::from),
                    Value::from(new.as_str()),
                ]),
            )),
            Request::Read {
                key,
                serializable: false,
            } => Some((Function::Read, key, Value::Null)),
            _ => None,
        }
    }
}

fn is_register(key: &str) -> bool {
    key.starts_with("reg/")
}

/// What one client knows, to make its next request meaningful.
#[derive(Clone, Debug, Default)]
pub struct ClientMemory {
    /// The last value it saw of each register key (by a read or its own write).
    pub seen: Vec<Option<String>>,
    /// A lease it holds, if any.
    pub lease: Option<i64>,
    /// The highest revision it saw in a response.
    pub revision_seen: i64,
}

/// Picks a client's next request. `unique` is a value no other request uses.
pub fn next_request(prng: &mut Prng, memory: &ClientMemory, unique: String) -> Request {
    let key_index = prng.range(0, REGISTER_KEYS) as usize;
    let key = format!("reg/{key_index}");
    match prng.range(0, 100) {
        0..=29 => Request::Read {
            key,
            serializable: false,
        },
        30..=34 => Request::Read {
            key,
            serializable: true,
        },
        35..=59 => Request::Put {
            key,
            value: unique,
            lease: 0,
        },
        60..=69 => Request::Delete { key },
        70..=84 => Request::Cas {
            expected: memory.seen.get(key_index).cloned().flatten(),
            key,
            new: unique,
        },
        85..=89 => match memory.lease {
            None => lease_grant(prng),
            Some(lease) => Request::Put {
                key: format!("lease/{lease}/{}", prng.range(0, 3)),
                value: unique,
                lease,
            },
        },
        90..=92 => match memory.lease {
            Some(id) => Request::KeepAlive { id },
            None => lease_grant(prng),
        },
        93 => match memory.lease {
            Some(id) => Request::LeaseRevoke { id },
            None => lease_grant(prng),
        },
        94..=96 if memory.revision_seen > 8 => Request::Compact {
            revision: memory.revision_seen / 2,
        },
        _ => Request::Read {
            key,
            serializable: false,
        },
    }
}

/// A grant of a short lease: one or two seconds, ten or twenty election timeouts.
fn lease_grant(prng: &mut Prng) -> Request {
    Request::LeaseGrant {
        ttl_seconds: prng.range(1, 3) as i64,
    }
}

/// The register history, as the chaos suite records real clusters': each operation an
/// invocation, then `ok`, `fail` or `info`; a process that ends with `info` is replaced by a
/// new one, since its operation may still take effect.
#[derive(Debug, Default)]
pub struct History {
    pub events: Vec<Event>,
    next_process: u64,
}

/// How a client's request ended.
#[derive(Debug)]
pub enum Outcome {
    /// A write took effect.
    Done,
    /// A read returned this value.
    Read(Option<String>),
    /// It certainly took no effect.
    Fail,
    /// It may or may not take effect.
    Unknown,
}

impl History {
    /// Records how `process`'s operation ended. After an `info` its operation may still take
    /// effect, so the process is replaced: `process` becomes a new one.
    pub fn complete(
        &mut self,
        process: &mut u64,
        f: Function,
        key: &str,
        outcome: &Outcome,
        time: u64,
    ) {
        let (kind, value) = match outcome {
            Outcome::Done => (EventType::Ok, Value::Null),
            Outcome::Read(value) => (
                EventType::Ok,
                value.as_deref().map_or(Value::Null, Value::from),
            ),
            Outcome::Fail => (EventType::Fail, Value::Null),
            Outcome::Unknown => (EventType::Info, Value::Null),
        };
        self.record(*process, kind, f, key, value, time);
        if kind == EventType::Info {
            *process = self.new_process();
        }
    }

    pub fn new_process(&mut self) -> u64 {
        self.next_process += 1;
        self.next_process
    }

    pub fn record(
        &mut self,
        process: u64,
        kind: EventType,
        f: Function,
        key: &str,
        value: Value,
        time: u64,
    ) {
        self.events.push(Event {
            process,
            kind,
            f,
            key: key.to_string(),
            value,
            time,
        });
    }
}

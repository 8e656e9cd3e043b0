//! The client workers of each workload. A worker is a sequential process: it invokes one
//! operation, records it, waits for the outcome, records that, and goes on until the
//! deadline. Outcomes follow the client's contract: a response is `ok`, an error whose
//! outcome is *not applied* is `fail`, an *unknown* one is `info` (and the worker takes a new
//! process number, as the old operation may still be in flight).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_client::{
    Client, ClientConfig, ClientError, Outcome, SessionPolicy, prefix_range_end,
};
use flotilla_proto::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RequestOp, TxnRequest, compare, request_op,
};
use serde_json::{Value, json};

use crate::history::{EventType, Function, Recorder};
use crate::rng::Rng;

/// Each register key takes this many operations, then the workers move to a fresh key:
/// per-key histories stay small enough to check quickly.
pub const REGISTER_OPS_PER_KEY: u64 = 250;
/// Keys in use at once by the register workload.
pub const REGISTER_ACTIVE_KEYS: usize = 3;
pub const SET_PREFIX: &str = "set/";
pub const COUNTER_KEY: &str = "counter";
pub const WATCH_PREFIX: &str = "watch/";
const WATCH_KEYS: u64 = 4;

/// What every worker shares.
#[derive(Clone, Debug)]
pub struct WorkerContext {
    pub recorder: Arc<Recorder>,
    pub deadline: Instant,
    /// Mean time between a worker's operations.
    pub pace: Duration,
    /// Process numbers advance by this after an `info`, so they never collide.
    pub workers: u64,
}

/// A worker's process number, renewed after each unknown outcome.
#[derive(Debug)]
struct Process {
    id: u64,
    stride: u64,
}

impl Process {
    fn record_outcome(
        &mut self,
        recorder: &Recorder,
        kind: EventType,
        f: Function,
        key: &str,
        value: Value,
    ) {
        recorder.record(self.id, kind, f, key, value);
        if kind == EventType::Info {
            self.id += self.stride;
        }
    }
}

/// A worker's client: every endpoint, starting with its own member so reads spread.
pub async fn worker_client(
    endpoints: &[String],
    worker: usize,
    sessions: SessionPolicy,
    call_timeout: Duration,
) -> Result<Client, ClientError> {
    let mut rotated = endpoints.to_vec();
    rotated.rotate_left(worker % endpoints.len());
    let config = ClientConfig::new(rotated)
        .with_dial_timeout(Duration::from_secs(1))
        .with_sessions(sessions)
        .with_call_timeout(call_timeout);
    Client::connect(config).await
}

/// Waits about `pace` (between half and one and a half times it) unless the deadline comes
/// first. Returns false when the deadline has passed.
async fn pause_between_operations(context: &WorkerContext, rng: &mut Rng) -> bool {
    let pace_us = context.pace.as_micros() as u64;
    let wait = Duration::from_micros(rng.between(pace_us / 2, pace_us + pace_us / 2));
    let wake = (Instant::now() + wait).min(context.deadline);
    tokio::time::sleep_until(wake.into()).await;
    Instant::now() < context.deadline
}

/// The history type of a failed write.
fn write_failure(error: &ClientError) -> EventType {
    match error.outcome() {
        Outcome::NotApplied => EventType::Fail,
        Outcome::Unknown => EventType::Info,
        Outcome::Applied => EventType::Ok,
    }
}

// --- Register ----------------------------------------------------------------------------

#[derive(Debug)]
struct KeySlot {
    key: u64,
    operations: u64,
    /// The last value seen or written: what a cas expects.
    last_value: Option<i64>,
}

/// Keys and values shared by the register workers.
#[derive(Debug)]
pub struct RegisterShared {
    slots: Vec<Mutex<KeySlot>>,
    next_key: AtomicU64,
    next_value: AtomicI64,
    pub serializable_reads: bool,
}

impl RegisterShared {
    pub fn new(serializable_reads: bool) -> RegisterShared {
        RegisterShared {
            slots: (0..REGISTER_ACTIVE_KEYS as u64)
                .map(|key| {
                    Mutex::new(KeySlot {
                        key,
                        operations: 0,
                        last_value: None,
                    })
                })
                .collect(),
            next_key: AtomicU64::new(REGISTER_ACTIVE_KEYS as u64),
            next_value: AtomicI64::new(1),
            serializable_reads,
        }
    }

    /// Every key used so far.
    pub fn keys(&self) -> Vec<String> {
        (0..self.next_key.load(Ordering::Relaxed))
            .map(register_key)
            .collect()
    }

    /// A key for the next operation (moving the slot to a fresh key when it has had its
    /// share), and the value a cas on it should expect.
    fn take_key(&self, rng: &mut Rng) -> (usize, String, Option<i64>) {
        let slot_index = rng.below(self.slots.len() as u64) as usize;
        let mut slot = self.slots[slot_index].lock().expect("slot lock");
        if slot.operations >= REGISTER_OPS_PER_KEY {
            slot.key = self.next_key.fetch_add(1, Ordering::Relaxed);
            slot.operations = 0;
            slot.last_value = None;
        }
        slot.operations += 1;
        (slot_index, register_key(slot.key), slot.last_value)
    }

    fn saw(&self, slot_index: usize, key: &str, value: Option<i64>) {
        let mut slot = self.slots[slot_index].lock().expect("slot lock");
        if register_key(slot.key) == key && value.is_some() {
            slot.last_value = value;
        }
    }
}

pub fn register_key(index: u64) -> String {
    format!("register/{index}")
}

fn decode_register_value(bytes: &[u8]) -> Value {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse::<i64>().ok())
        .map_or_else(
            || Value::String(String::from_utf8_lossy(bytes).into_owned()),
            |number| json!(number),
        )
}

/// Reads, writes and compare-and-sets on a few rotating keys. Reads go through
/// `read_client`: the worker's own client, or, for serializable reads, one pinned to the
/// worker's member so that a member cut off by a partition keeps answering from its own,
/// stale, state.
pub async fn register_worker(
    worker: usize,
    client: Client,
    read_client: Client,
    shared: Arc<RegisterShared>,
    context: WorkerContext,
    mut rng: Rng,
) {
    let mut process = Process {
        id: worker as u64,
        stride: context.workers,
    };
    while pause_between_operations(&context, &mut rng).await {
        let (slot, key, expected) = shared.take_key(&mut rng);
        let choice = rng.below(4);
        if choice < 2 {
            let value = register_read(
                &read_client,
                &mut process,
                &context,
                &key,
                shared.serializable_reads,
            )
            .await;
            shared.saw(slot, &key, value);
        } else if choice == 2 || expected.is_none() {
            let value = shared.next_value.fetch_add(1, Ordering::Relaxed);
            if register_write(&client, &mut process, &context, &key, value).await {
                shared.saw(slot, &key, Some(value));
            }
        } else {
            let new = shared.next_value.fetch_add(1, Ordering::Relaxed);
            let expected = expected.expect("checked above");
            if register_cas(&client, &mut process, &context, &key, expected, new).await {
                shared.saw(slot, &key, Some(new));
            }
        }
    }
}

/// One read. A failed read is `fail`: reads change nothing.
async fn register_read(
    client: &Client,
    process: &mut Process,
    context: &WorkerContext,
    key: &str,
    serializable: bool,
) -> Option<i64> {
    let recorder = &context.recorder;
    recorder.record(
        process.id,
        EventType::Invoke,
        Function::Read,
        key,
        Value::Null,
    );
    let request = RangeRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        serializable,
        ..Default::default()
    };
    match client.range(request).await {
        Ok(response) => {
            let value = response
                .kvs
                .first()
                .map_or(Value::Null, |kv| decode_register_value(&kv.value));
            let seen = value.as_i64();
            process.record_outcome(recorder, EventType::Ok, Function::Read, key, value);
            seen
        }
        Err(_) => {
            process.record_outcome(recorder, EventType::Fail, Function::Read, key, Value::Null);
            None
        }
    }
}

/// One write; true if acknowledged.
async fn register_write(
    client: &Client,
    process: &mut Process,
    context: &WorkerContext,
    key: &str,
    value: i64,
) -> bool {
    let recorder = &context.recorder;
    recorder.record(
        process.id,
        EventType::Invoke,
        Function::Write,
        key,
        json!(value),
    );
    let kind = match client.put(key.to_string(), value.to_string()).await {
        Ok(_) => EventType::Ok,
        Err(error) => write_failure(&error),
    };
    process.record_outcome(recorder, kind, Function::Write, key, json!(value));
    kind == EventType::Ok
}

/// One compare-and-set (a Txn comparing the value); true if it took effect. A comparison
/// that did not hold is `fail`: nothing was written.
async fn register_cas(
    client: &Client,
    process: &mut Process,
    context: &WorkerContext,
    key: &str,
    expected: i64,
    new: i64,
) -> bool {
    let recorder = &context.recorder;
    let value = json!([expected, new]);
    recorder.record(
        process.id,
        EventType::Invoke,
        Function::Cas,
        key,
        value.clone(),
    );
    let key_bytes = Bytes::copy_from_slice(key.as_bytes());
    let request = TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            key: key_bytes.clone(),
            target_union: Some(compare::TargetUnion::Value(expected.to_string().into())),
            ..Default::default()
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key_bytes,
                value: new.to_string().into(),
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    };
    let kind = match client.txn(request).await {
        Ok(response) if response.succeeded => EventType::Ok,
        Ok(_) => EventType::Fail,
        // Applied but the response is lost: whether the comparison held is unknown.
        Err(error) if error.outcome() == Outcome::Applied => EventType::Info,
        Err(error) => write_failure(&error),
    };
    process.record_outcome(recorder, kind, Function::Cas, key, value);
    kind == EventType::Ok
}

/// Final linearizable reads of every key, recorded as one more process.
pub async fn register_final_reads(
    client: &Client,
    keys: &[String],
    process_id: u64,
    context: &WorkerContext,
) -> usize {
    let mut process = Process {
        id: process_id,
        stride: 1,
    };
    let mut succeeded = 0;
    for key in keys {
        if register_read(client, &mut process, context, key, false)
            .await
            .is_some()
        {
            succeeded += 1;
        }
    }
    succeeded
}

// --- Set ---------------------------------------------------------------------------------

/// Adds unique elements: a put of `set/<element>`.
pub async fn set_worker(worker: usize, client: Client, context: WorkerContext, mut rng: Rng) {
    let mut process = Process {
        id: worker as u64,
        stride: context.workers,
    };
    let mut sequence = 0u64;
    while pause_between_operations(&context, &mut rng).await {
        sequence += 1;
        let element = format!("{worker}-{sequence}");
        let recorder = &context.recorder;
        recorder.record(
            process.id,
            EventType::Invoke,
            Function::Add,
            "set",
            json!(element),
        );
        let kind = match client.put(format!("{SET_PREFIX}{element}"), "1").await {
            Ok(_) => EventType::Ok,
            Err(error) => write_failure(&error),
        };
        process.record_outcome(recorder, kind, Function::Add, "set", json!(element));
    }
}

/// The set's elements as one member sees them (a linearizable range over the prefix).
pub async fn read_set(client: &Client) -> Result<BTreeSet<String>, ClientError> {
    let request = RangeRequest {
        key: SET_PREFIX.into(),
        range_end: prefix_range_end(SET_PREFIX.as_bytes()),
        keys_only: true,
        ..Default::default()
    };
    let response = client.range(request).await?;
    Ok(response
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key[SET_PREFIX.len()..]).into_owned())
        .collect())
}

// --- Counter -----------------------------------------------------------------------------

/// Increments (puts to one key: its version counts them) through sessions, so a retried
/// increment applies once; and reads of the count.
pub async fn counter_worker(worker: usize, client: Client, context: WorkerContext, mut rng: Rng) {
    let mut process = Process {
        id: worker as u64,
        stride: context.workers,
    };
    let mut sequence = 0u64;
    while pause_between_operations(&context, &mut rng).await {
        let recorder = &context.recorder;
        if rng.chance(1, 5) {
            recorder.record(
                process.id,
                EventType::Invoke,
                Function::Read,
                COUNTER_KEY,
                Value::Null,
            );
            let (kind, value) = match read_counter(&client).await {
                Ok(count) => (EventType::Ok, json!(count)),
                Err(_) => (EventType::Fail, Value::Null),
            };
            process.record_outcome(recorder, kind, Function::Read, COUNTER_KEY, value);
            continue;
        }
        sequence += 1;
        recorder.record(
            process.id,
            EventType::Invoke,
            Function::Add,
            COUNTER_KEY,
            json!(1),
        );
        let kind = match client
            .put(COUNTER_KEY, format!("{worker}-{sequence}"))
            .await
        {
            Ok(_) => EventType::Ok,
            Err(error) => write_failure(&error),
        };
        process.record_outcome(recorder, kind, Function::Add, COUNTER_KEY, json!(1));
    }
}

/// The count: the counter key's version (its number of puts since creation).
pub async fn read_counter(client: &Client) -> Result<u64, ClientError> {
    let response = client.get(COUNTER_KEY).await?;
    Ok(response
        .kvs
        .first()
        .map_or(0, |kv| u64::try_from(kv.version).unwrap_or(0)))
}

// --- Watch writers -----------------------------------------------------------------------

/// Writes of unique values to a few keys under the watched prefix; acknowledged revisions are
/// kept for the watch checker.
pub async fn watch_writer(
    worker: usize,
    client: Client,
    context: WorkerContext,
    writes: Arc<Mutex<Vec<crate::checkers::WatchedWrite>>>,
    next_value: Arc<AtomicI64>,
    mut rng: Rng,
) {
    let mut process = Process {
        id: worker as u64,
        stride: context.workers,
    };
    while pause_between_operations(&context, &mut rng).await {
        let key = format!("{WATCH_PREFIX}{}", rng.below(WATCH_KEYS));
        let value = next_value.fetch_add(1, Ordering::Relaxed);
        let recorder = &context.recorder;
        recorder.record(
            process.id,
            EventType::Invoke,
            Function::Write,
            &key,
            json!(value),
        );
        let (kind, revision) = match client.put(key.clone(), value.to_string()).await {
            Ok(response) => (EventType::Ok, response.header.map(|header| header.revision)),
            Err(error) => (write_failure(&error), None),
        };
        process.record_outcome(recorder, kind, Function::Write, &key, json!(value));
        if kind != EventType::Fail {
            writes
                .lock()
                .expect("writes lock")
                .push(crate::checkers::WatchedWrite {
                    key,
                    value: value.to_string(),
                    revision: if kind == EventType::Ok {
                        revision
                    } else {
                        None
                    },
                });
        }
    }
}

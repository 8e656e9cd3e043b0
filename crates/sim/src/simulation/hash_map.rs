//! The replicated hash map: the runtime's example state machine (the very file the examples
//! run, `crates/runtime/examples/shared/hash_map.rs`) behind the runtime's client sessions
//! (`flotilla_runtime::Sessions`), applied, snapshotted and restored only through the
//! runtime's `StateMachine` trait, as the runtime's apply thread and snapshot pipe drive it.
//!
//! Each client registers a session, then puts unique values, deletes, and reads three shared
//! keys (linearizable reads through ReadIndex, from the leader or any member), numbering its
//! commands and resending the same bytes when an attempt gets no answer, so the sessions must
//! answer a retry of something already applied from memory. The session table is small (two
//! to eight clients), so clients expire one another and register again. Checked:
//!
//! - **Identical state**: every member's output at every index, and its whole state (the map
//!   and the session table, as its snapshot encodes them) after every entry and at every
//!   snapshot (by the simulation).
//! - **Exactly once**: every value put is unique, so a value applied at two indexes was
//!   applied twice.
//! - **Acknowledged means applied**: a put a client was told succeeded was applied.
//! - **Fresh reads**: a linearizable read sees every write acknowledged before it began.
//! - **Linearizability** of the whole history (put and delete as writes, reads) at the end.

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla_chaos::history::{EventType, Function};
use flotilla_raft::{Entry, EntryId, EntryPayload, Index, NodeId};
use flotilla_runtime::driver::Refusal;
use flotilla_runtime::{SessionClient, SessionReply, Sessions, StateMachine};
use serde_json::Value;

use super::application::{Application, Waiter};
use super::clients::NS_PER_TIME_UNIT;
use super::{Event, Phase, RunReport, SNAPSHOT_STEP_BYTES, Simulation};
use crate::checker::Violation;
use crate::digest::Fnv;
use crate::hash_map_example::{Command, HashMap, Outcome};
use crate::kv_checker::KvChecker;
use crate::options::{SimOptions, TICK_TIME};
use crate::storage::SimStorage;
use crate::workload::{History, Outcome as Ending};

/// How many keys the clients share (few, so that they contend).
const KEYS: u64 = 3;

/// The session header's length (client id and sequence, see `flotilla_runtime::sessions`).
const SESSION_HEADER_BYTES: usize = 16;

/// The client id the simulator's own commands carry: never registered (ids are log indexes),
/// so the sessions refuse them as from an unknown client, and they only fill the log.
const INTERNAL_CLIENT: u64 = u64::MAX;

/// A member's state machine.
pub(super) type Machine = Sessions<HashMap>;

/// The run's side of the hash-map application: its clients and its checks.
#[derive(Debug)]
pub struct HashMapApp {
    clients: Vec<MapClient>,
    /// How many clients a member's session table holds.
    sessions_max: usize,
    /// The highest index of a write acknowledged so far: a read invoked later must see it.
    acked_write_index_max: Index,
    /// Every value put, with the index that applied it.
    written: BTreeMap<String, Index>,
    /// The simulator's own commands so far.
    internal_commands: u64,
    history: History,
}

/// One client request.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Request {
    Register,
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    /// A command the map refuses (every member alike).
    Malformed,
    /// A linearizable read of one key.
    Read {
        key: String,
    },
}

impl Request {
    /// The map's command for a write.
    fn command(&self) -> Option<Bytes> {
        match self {
            Request::Put { key, value } => Some(
                Command::Put {
                    key: key.clone(),
                    value: value.clone(),
                }
                .encode(),
            ),
            Request::Delete { key } => Some(Command::Delete { key: key.clone() }.encode()),
            Request::Malformed => Some(Bytes::from_static(b"increment k0")),
            Request::Register | Request::Read { .. } => None,
        }
    }

    /// This request in the history: (function, key, invocation value).
    fn history_op(&self) -> Option<(Function, &str, Value)> {
        match self {
            Request::Put { key, value } => {
                Some((Function::Write, key, Value::from(value.as_str())))
            }
            Request::Delete { key } => Some((Function::Write, key, Value::Null)),
            Request::Read { key } => Some((Function::Read, key, Value::Null)),
            Request::Register | Request::Malformed => None,
        }
    }
}

#[derive(Debug)]
struct MapOp {
    request: Request,
    /// What is proposed, the same bytes for every attempt (a write's session number is
    /// taken once).
    proposal: Option<Bytes>,
    attempts: u32,
    invoked_at: u64,
    /// For a read: the highest index of a write acknowledged before it began.
    floor_index: Index,
}

#[derive(Clone, Copy, Debug)]
struct MapAttempt {
    id: u64,
    node: NodeId,
    proposed: Option<EntryId>,
}

#[derive(Debug, Default)]
struct MapClient {
    session: Option<SessionClient>,
    leader_hint: Option<NodeId>,
    op: Option<MapOp>,
    attempt: Option<MapAttempt>,
    next_attempt: u64,
    requests_started: u64,
    /// The history process; a new one after an `info`.
    process: u64,
    /// In the liveness phase each client must complete one write.
    final_write_ok: bool,
}

impl<S: SimStorage> Application<S> for HashMapApp {
    type Member = Machine;
    type Output = SessionReply<Outcome>;

    // The state is a few keys and sessions: compare all of it after every entry.
    const STATE_DIGEST_EVERY: Index = 1;

    fn new(options: &SimOptions) -> Self {
        HashMapApp {
            clients: (0..options.clients).map(|_| MapClient::default()).collect(),
            sessions_max: options.hash_map_sessions_max,
            acked_write_index_max: 0,
            written: BTreeMap::new(),
            internal_commands: 0,
            history: History::default(),
        }
    }

    fn start_member(sim: &Simulation<S, Self>, id: NodeId, snapshot: Option<&[u8]>) -> Machine {
        let mut machine = Sessions::new(HashMap::default(), sim.app.sessions_max);
        if let Some(data) = snapshot {
            restore(&mut machine, data)
                .unwrap_or_else(|err| panic!("node {id}: bad stored snapshot: {err}"));
        }
        machine
    }

    fn applied_index(member: &Machine) -> Index {
        member.applied_index()
    }

    fn state_digest(member: &mut Machine) -> u64 {
        let encoded = encode(member).expect("encoding a small state in memory");
        let mut hash = Fnv::default();
        hash.write(&encoded);
        hash.value()
    }

    fn apply_entry(
        sim: &mut Simulation<S, Self>,
        id: NodeId,
        entry: &Entry,
        first_anywhere: bool,
    ) -> SessionReply<Outcome> {
        let output = StateMachine::apply(&mut sim.member_mut(id).app, entry);
        if first_anywhere {
            if let SessionReply::Repeated(_) = output {
                sim.report.session_repeats += 1;
            }
            if let Err(violation) = sim.app.record_put(entry, &output) {
                panic!("{violation}");
            }
        }
        output
    }

    fn answer(
        sim: &mut Simulation<S, Self>,
        id: NodeId,
        waiter: Waiter,
        index: Index,
        output: &SessionReply<Outcome>,
    ) {
        let Waiter::Client { client, attempt } = waiter else {
            return;
        };
        if sim.app.current(client, attempt) {
            sim.write_answered(id, client, index, output);
        }
    }

    fn restore(member: &mut Machine, snapshot: &[u8]) -> Result<(), String> {
        restore(member, snapshot)
    }

    fn encode_snapshot(member: &mut Machine) -> std::io::Result<Bytes> {
        encode(member).map(Bytes::from)
    }

    fn refused(sim: &mut Simulation<S, Self>, _id: NodeId, waiter: Waiter, refusal: &Refusal) {
        if let Waiter::Client { client, attempt } = waiter
            && sim.app.current(client, attempt)
        {
            sim.map_retry(client, refusal);
        }
    }

    fn read_ready(sim: &mut Simulation<S, Self>, id: NodeId, waiter: Waiter) {
        if let Waiter::Client { client, attempt } = waiter
            && sim.app.current(client, attempt)
        {
            sim.answer_map_read(id, client);
        }
    }

    fn member_stopped(sim: &mut Simulation<S, Self>, id: NodeId) {
        for client in 0..sim.app.clients.len() {
            if sim.app.clients[client]
                .attempt
                .is_some_and(|attempt| attempt.node == id)
            {
                sim.map_retry(client, &Refusal::Stopped);
            }
        }
    }

    fn client_wake(sim: &mut Simulation<S, Self>, client: usize) {
        let c = &sim.app.clients[client];
        if c.attempt.is_some() || (sim.phase == Phase::Liveness && c.final_write_ok) {
            return;
        }
        if c.op.is_none() {
            sim.start_map_request(client);
        }
        sim.send_map_attempt(client);
    }

    fn client_timeout(sim: &mut Simulation<S, Self>, client: usize, attempt: u64) {
        if sim.app.current(client, attempt) {
            sim.trace.record(&[14, client as u64, attempt]);
            sim.map_retry(client, &Refusal::TimedOut);
        }
    }

    fn proposed_index_max(&self) -> Option<Index> {
        self.clients
            .iter()
            .filter_map(|c| c.attempt?.proposed.map(|entry| entry.index))
            .max()
    }

    fn internal_command(&mut self, value_bytes: usize) -> Bytes {
        self.internal_commands += 1;
        let mut value = format!("internal-{}-", self.internal_commands);
        value.extend(std::iter::repeat_n(
            '.',
            value_bytes.saturating_sub(value.len()),
        ));
        let put = Command::Put {
            key: "internal".into(),
            value,
        };
        SessionClient::new(INTERNAL_CLIENT).next(&put.encode())
    }

    fn converged(sim: &Simulation<S, Self>, _leader: NodeId) -> bool {
        sim.app
            .clients
            .iter()
            .all(|c| c.op.is_none() && c.attempt.is_none() && c.final_write_ok)
    }

    fn describe_member(member: &Machine) -> String {
        format!("sessions={}", member.clients())
    }

    fn describe_clients(&self) -> String {
        let clients: Vec<String> = self
            .clients
            .iter()
            .map(|c| {
                format!(
                    "{:?} attempt {:?} final_write_ok={}",
                    c.op.as_ref().map(|op| &op.request),
                    c.attempt,
                    c.final_write_ok
                )
            })
            .collect();
        clients.join("; ")
    }

    fn check_history(&self) -> Result<(), Violation> {
        KvChecker::check_history(&self.history)
    }

    fn finish(&self, report: &mut RunReport) {
        report.history_operations = self.history.events.len() as u64;
    }
}

/// Restores `machine` from a snapshot as the runtime does: an empty state beside it, filled
/// from the bytes, then put in its place.
fn restore(machine: &mut Machine, mut snapshot: &[u8]) -> Result<(), String> {
    let mut restored = machine.empty();
    restored.restore(&mut snapshot)?;
    machine.replace(restored);
    Ok(())
}

/// Encodes `machine`'s state in steps, as the runtime's snapshot pipe does: pinned, encoded
/// step by step, released (also after a failed step).
fn encode(machine: &mut Machine) -> std::io::Result<Vec<u8>> {
    let mut cursor = machine.begin_snapshot();
    let mut data = Vec::new();
    let encoded = loop {
        match machine.continue_snapshot(&mut cursor, &mut data, SNAPSHOT_STEP_BYTES) {
            Ok(true) => break Ok(data),
            Ok(false) => {}
            Err(err) => break Err(err),
        }
    };
    machine.end_snapshot(cursor);
    encoded
}

impl HashMapApp {
    /// The attempt `id` of `client`, if it is still the one waited for.
    fn current(&self, client: usize, id: u64) -> bool {
        self.clients[client]
            .attempt
            .is_some_and(|attempt| attempt.id == id)
    }

    /// Learns the value a newly applied put wrote (from the first member that applies it:
    /// every other member's output is compared with its output).
    fn record_put(
        &mut self,
        entry: &Entry,
        output: &SessionReply<Outcome>,
    ) -> Result<(), Violation> {
        let SessionReply::Applied(Outcome::Done { .. }) = output else {
            return Ok(());
        };
        let EntryPayload::Command(data) = &entry.payload else {
            return Ok(());
        };
        let command = std::str::from_utf8(&data[SESSION_HEADER_BYTES..])
            .map_err(|_| "a command the map applied is not UTF-8".to_string())
            .and_then(Command::parse)?;
        let Command::Put { value, .. } = command else {
            return Ok(());
        };
        if let Some(earlier) = self.written.insert(value.clone(), entry.index) {
            return Err(format!(
                "exactly once: value {value:?} was put at index {earlier} and again at index {}: \
                 a retry was applied twice",
                entry.index
            ));
        }
        Ok(())
    }
}

/// The hash-map clients, which behave as a user of the runtime's sessions would: register,
/// number every command, resend the same bytes after an attempt without an answer (to the
/// leader it was told of, or any member), one request at a time.
impl<S: SimStorage> Simulation<S, HashMapApp> {
    fn start_map_request(&mut self, client: usize) {
        let liveness = self.phase == Phase::Liveness;
        let c = &mut self.app.clients[client];
        c.requests_started += 1;
        let key = format!("k{}", self.prng.range(0, KEYS));
        let value = format!("c{client}-{}", c.requests_started);
        let request = match (&c.session, liveness, self.prng.range(0, 100)) {
            (None, ..) => Request::Register,
            (Some(_), true, _) | (Some(_), false, 0..=34) => Request::Put { key, value },
            (Some(_), false, 35..=49) => Request::Delete { key },
            (Some(_), false, 50..=54) => Request::Malformed,
            (Some(_), false, _) => Request::Read { key },
        };
        let proposal = match (&request, c.session.as_mut()) {
            (Request::Register, _) => Some(SessionClient::register()),
            (request, Some(session)) => request.command().map(|command| session.next(&command)),
            (_, None) => unreachable!("a client without a session registers first"),
        };
        if c.process == 0 {
            c.process = self.app.history.new_process();
        }
        if let Some((f, key, value)) = request.history_op() {
            let time = self.now * NS_PER_TIME_UNIT;
            self.app
                .history
                .record(c.process, EventType::Invoke, f, key, value, time);
        }
        self.trace.record(&[13, client as u64, c.requests_started]);
        c.op = Some(MapOp {
            request,
            proposal,
            attempts: 0,
            invoked_at: self.now,
            floor_index: self.app.acked_write_index_max,
        });
    }

    fn send_map_attempt(&mut self, client: usize) {
        let c = &self.app.clients[client];
        let op = c.op.as_ref().expect("a request to send");
        // Reads go to any member half the time (a follower asks the leader for the index).
        let hint = match op.request {
            Request::Read { .. } if self.prng.chance(1, 2) => None,
            _ => c.leader_hint,
        };
        let Some(node) = self.pick_node(hint) else {
            self.schedule(TICK_TIME * 5, Event::ClientWake { client });
            return;
        };
        let c = &mut self.app.clients[client];
        let op = c.op.as_ref().expect("a request to send");
        let proposal = op.proposal.clone();
        let id = c.next_attempt;
        c.next_attempt += 1;
        let waiter = Waiter::Client {
            client,
            attempt: id,
        };
        let driver = &mut self.member_mut(node).driver;
        let sent = match proposal {
            Some(command) => driver.propose(command, waiter).map(Some),
            None => driver.read(waiter).map(|()| None),
        };
        match sent {
            Ok(proposed) => {
                self.app.clients[client].attempt = Some(MapAttempt { id, node, proposed });
                self.trace.record(&[21, client as u64, id, node]);
                let timeout = self.options.client_timeout_time;
                self.schedule(
                    timeout,
                    Event::ClientTimeout {
                        client,
                        attempt: id,
                    },
                );
                self.process(node);
            }
            Err((_, refusal)) => self.map_retry(client, &refusal),
        }
    }

    /// The attempt ended without an answer that decides the request: try again, or, after
    /// too many attempts in the fault phase, give up (its outcome stays unknown).
    fn map_retry(&mut self, client: usize, refusal: &Refusal) {
        let c = &mut self.app.clients[client];
        c.attempt = None;
        c.leader_hint = refusal.leader_hint();
        let op = c.op.as_mut().expect("a request in progress");
        op.attempts += 1;
        let (invoked_at, attempts) = (op.invoked_at, op.attempts);
        match self.retry_delay(invoked_at, attempts, refusal) {
            Some(delay) => self.schedule(delay, Event::ClientWake { client }),
            None => self.finish_map_request(client, Ending::Unknown),
        }
    }

    /// A client's proposal was applied at `index` on member `id`, with `output`.
    fn write_answered(
        &mut self,
        id: NodeId,
        client: usize,
        index: Index,
        output: &SessionReply<Outcome>,
    ) {
        let c = &mut self.app.clients[client];
        c.leader_hint = Some(id);
        let request =
            c.op.as_ref()
                .expect("a request in progress")
                .request
                .clone();
        let ending = match (&request, output) {
            (Request::Register, SessionReply::Registered { client_id }) => {
                c.session = Some(SessionClient::new(*client_id));
                Ending::Done
            }
            (
                Request::Put { .. } | Request::Delete { .. },
                SessionReply::Applied(Outcome::Done { .. })
                | SessionReply::Repeated(Outcome::Done { .. }),
            ) => Ending::Done,
            (
                Request::Malformed,
                SessionReply::Applied(Outcome::Malformed(_))
                | SessionReply::Repeated(Outcome::Malformed(_)),
            ) => Ending::Fail,
            // Expired to make room for another client: the command was not applied now, but
            // an earlier attempt may have been. Register again.
            (_, SessionReply::Expired { .. }) => {
                c.session = None;
                self.report.sessions_expired += 1;
                Ending::Unknown
            }
            (request, output) => {
                panic!("node {id}: client {client}'s {request:?} was answered with {output:?}")
            }
        };
        if let (Request::Put { value, .. }, Ending::Done) = (&request, &ending)
            && !self.app.written.contains_key(value)
        {
            panic!(
                "acknowledged write lost: the put of {value:?} was answered as done (index \
                 {index}) but no member ever applied it"
            );
        }
        if matches!(ending, Ending::Done) && request != Request::Register {
            self.app.acked_write_index_max = self.app.acked_write_index_max.max(index);
            self.report.writes_ok += 1;
        }
        self.finish_map_request(client, ending);
    }

    /// Reads the key from member `id`'s map and completes the request.
    fn answer_map_read(&mut self, id: NodeId, client: usize) {
        let machine = &self.nodes[&id].member().expect("running").app;
        let op = self.app.clients[client]
            .op
            .as_ref()
            .expect("a read in progress");
        let Request::Read { key } = &op.request else {
            panic!("client {client}: a read answered for {:?}", op.request);
        };
        let applied = machine.applied_index();
        let value = machine.inner().get(key).map(str::to_string);
        let floor_index = op.floor_index;
        self.read_answered(id, client, applied, Some(floor_index));
        self.app.clients[client].leader_hint = Some(id);
        self.finish_map_request(client, Ending::Read(value));
    }

    /// Ends the request in progress and schedules the next.
    fn finish_map_request(&mut self, client: usize, ending: Ending) {
        let liveness = self.phase == Phase::Liveness;
        let c = &mut self.app.clients[client];
        c.attempt = None;
        let op = c.op.take().expect("a request in progress");
        let write = !matches!(op.request, Request::Read { .. } | Request::Register);
        if liveness && write && matches!(ending, Ending::Done) {
            c.final_write_ok = true;
        }
        if let Some((f, key, _)) = op.request.history_op() {
            let time = self.now * NS_PER_TIME_UNIT;
            self.app
                .history
                .complete(&mut c.process, f, key, &ending, time);
        }
        let started = c.requests_started;
        self.request_ended(client, started, write, &ending);
    }
}

//! The simulated clients, which behave as Flotilla's client does: open a session, tag every
//! write with it and a sequence number, and retry a write that got no answer with the same
//! sequence (on the same member or another), so that the session answers a retry of something
//! already applied from memory. One request at a time per client.
//!
//! Register operations go into the history as invocations and completions; a request that
//! never got a definite answer ends as `info` after a bounded number of attempts.

use bytes::Bytes;
use flotilla_chaos::history::EventType;
use flotilla_kv::{Command, ErrorKind, Response};
use flotilla_proto::etcdserverpb::PutRequest;
use flotilla_raft::{EntryId, Index, NodeId};

use super::application::Waiter;
use super::etcd::EtcdApp;
use super::leases::lease_time;
use super::{Event, Phase, SimNode, Simulation};
use crate::options::TICK_TIME;
use crate::storage::SimStorage;
use crate::workload::{ClientMemory, Outcome, REGISTER_KEYS, Request, next_request};
use flotilla_runtime::driver::Refusal;
use flotilla_server::lease::RenewDecision;
use flotilla_server::state_machine::Applied;

/// History times are nanoseconds; a unit of simulated time reads as a millisecond.
pub(super) const NS_PER_TIME_UNIT: u64 = 1_000_000;

#[derive(Debug)]
struct ClientOp {
    request: Request,
    /// The session sequence number of a write (none for the session's registration and for
    /// reads).
    sequence: Option<u64>,
    attempts: u32,
    invoked_at: u64,
    /// For a linearizable read: the highest index of a write acknowledged before it began.
    floor_index: Index,
    /// True if the request is in the register history.
    in_history: bool,
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    id: u64,
    node: NodeId,
    /// Where the proposal went into the log, for a write.
    proposed: Option<EntryId>,
    /// A keep-alive the leader renewed, answered once its clear is applied.
    renewal: Option<Renewal>,
}

/// A renewal decided by the leader's lease clock, waiting for its clear.
#[derive(Clone, Copy, Debug)]
struct Renewal {
    ttl_seconds: i64,
    generation: u64,
    decided_at: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Client {
    session: Option<u64>,
    next_sequence: u64,
    leader_hint: Option<NodeId>,
    memory: ClientMemory,
    op: Option<ClientOp>,
    attempt: Option<Attempt>,
    next_attempt: u64,
    requests_started: u64,
    /// The history process; a new one after an `info`.
    process: u64,
    /// In the liveness phase each client must complete one write.
    final_write_ok: bool,
}

impl Client {
    pub(crate) fn is_done(&self) -> bool {
        self.op.is_none() && self.attempt.is_none() && self.final_write_ok
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "{:?} attempt {:?} final_write_ok={}",
            self.op.as_ref().map(|op| &op.request),
            self.attempt,
            self.final_write_ok
        )
    }

    /// The log index of the write this client waits for, if it waits for one.
    pub(crate) fn proposed_index(&self) -> Option<Index> {
        self.attempt?.proposed.map(|entry| entry.index)
    }
}

/// A write the simulator itself proposes: a unique value under `internal/`.
pub(super) fn internal_put(unique: u64, value_bytes: usize) -> Bytes {
    let mut value = format!("internal-{unique}-").into_bytes();
    value.resize(value_bytes.max(value.len()), b'.');
    Command::put(PutRequest {
        key: format!("internal/{}", unique % 4).into(),
        value: value.into(),
        ..Default::default()
    })
    .encode()
}

impl<S: SimStorage> Simulation<S, EtcdApp> {
    pub(super) fn client_wake(&mut self, client: usize) {
        let c = &self.app.clients[client];
        if c.attempt.is_some() || (self.phase == Phase::Liveness && c.final_write_ok) {
            return;
        }
        if c.op.is_none() {
            self.start_request(client);
        }
        self.send_attempt(client);
    }

    fn start_request(&mut self, client: usize) {
        let liveness = self.phase == Phase::Liveness;
        let c = &mut self.app.clients[client];
        c.requests_started += 1;
        let unique = format!("c{client}-{}", c.requests_started);
        let request = if c.session.is_none() {
            Request::RegisterSession
        } else if liveness {
            let key = self.prng.range(0, REGISTER_KEYS);
            Request::Put {
                key: format!("reg/{key}"),
                value: unique,
                lease: 0,
            }
        } else {
            next_request(&mut self.prng, &c.memory, unique)
        };
        if let Request::LeaseRevoke { id } = request {
            self.app.leases.revoke_requested(id);
        }
        let sequence = (request.is_write() && request != Request::RegisterSession).then(|| {
            c.next_sequence += 1;
            c.next_sequence
        });
        if c.process == 0 {
            c.process = self.app.history.new_process();
        }
        let in_history = match request.register_op() {
            Some((f, key, value)) => {
                self.app.history.record(
                    c.process,
                    EventType::Invoke,
                    f,
                    key,
                    value,
                    self.now * NS_PER_TIME_UNIT,
                );
                true
            }
            None => false,
        };
        self.trace.record(&[13, client as u64, c.requests_started]);
        c.op = Some(ClientOp {
            request,
            sequence,
            attempts: 0,
            invoked_at: self.now,
            floor_index: self.app.acked_write_index_max,
            in_history,
        });
    }

    fn send_attempt(&mut self, client: usize) {
        // Reads go to any member half the time, as etcd's clients balance them across their
        // endpoints (a follower asks the leader for the read index).
        let is_read = matches!(
            self.app.clients[client].op.as_ref().map(|op| &op.request),
            Some(Request::Read { .. })
        );
        let hint = if is_read && self.prng.chance(1, 2) {
            None
        } else {
            self.app.clients[client].leader_hint
        };
        let Some(node) = self.pick_node(hint) else {
            self.schedule(TICK_TIME * 5, Event::ClientWake { client });
            return;
        };
        let c = &mut self.app.clients[client];
        let op = c.op.as_ref().expect("a request to send");
        let request = op.request.clone();
        let tag = c.session.zip(op.sequence);
        let id = c.next_attempt;
        c.next_attempt += 1;
        let waiter = Waiter::Client {
            client,
            attempt: id,
        };
        let mut attempt = Attempt {
            id,
            node,
            proposed: None,
            renewal: None,
        };
        if let Request::Read {
            serializable: true, ..
        } = request
        {
            // Served by the member's own state, without Raft.
            self.app.clients[client].attempt = Some(attempt);
            return self.answer_read(node, client, id, false);
        }
        // Borrowed field by field: the requests below also touch the clients and the trace.
        let member = self
            .nodes
            .get_mut(&node)
            .and_then(SimNode::member_mut)
            .expect("picked a running node");
        let sent = match &request {
            Request::KeepAlive { id: lease } => {
                let state = member.app.state.read().expect("one thread: never poisoned");
                let decision =
                    member
                        .app
                        .leases
                        .clock
                        .renew(lease_time(self.now), &state.kv, *lease);
                drop(state);
                match decision {
                    RenewDecision::NotPrimary => {
                        Err(Refusal::NotLeader(member.driver.node().leader()))
                    }
                    RenewDecision::Answer { ttl_seconds } => {
                        self.app.clients[client].attempt = Some(attempt);
                        return self.answer_keep_alive(node, client, ttl_seconds, self.now);
                    }
                    RenewDecision::ClearFirst {
                        ttl_seconds,
                        generation,
                        clear,
                    } => match member.driver.propose(clear.encode(), waiter) {
                        Ok(entry) => {
                            attempt.proposed = Some(entry);
                            attempt.renewal = Some(Renewal {
                                ttl_seconds,
                                generation,
                                decided_at: self.now,
                            });
                            Ok(())
                        }
                        Err((_, refusal)) => Err(refusal),
                    },
                }
            }
            Request::Read { .. } => match member.driver.node().lease_read_index() {
                Some(lease) => {
                    self.app
                        .lease_reads_waiting
                        .retain(|&(_, waiting, _, _)| waiting != client);
                    self.app
                        .lease_reads_waiting
                        .push((node, client, id, lease.index));
                    Ok(())
                }
                None => member.driver.read(waiter).map_err(|(_, refusal)| refusal),
            },
            request => {
                let mut command = request.command();
                if let Some((session, sequence)) = tag {
                    command = command.with_client_request(session, sequence);
                }
                match member.driver.propose(command.encode(), waiter) {
                    Ok(entry) => {
                        attempt.proposed = Some(entry);
                        Ok(())
                    }
                    Err((_, refusal)) => Err(refusal),
                }
            }
        };
        match sent {
            Ok(()) => {
                self.app.clients[client].attempt = Some(attempt);
                self.trace.record(&[21, client as u64, id, node]);
                let timeout = self.options.client_timeout_time;
                self.schedule(
                    timeout,
                    Event::ClientTimeout {
                        client,
                        attempt: id,
                    },
                );
                self.resolve_lease_reads(node);
                self.process(node);
            }
            Err(refusal) => self.retry(client, &refusal),
        }
    }

    /// The attempt `id` of `client`, if it is still the one waited for.
    fn current(&self, client: usize, id: u64) -> bool {
        self.app
            .clients
            .get(client)
            .and_then(|c| c.attempt)
            .is_some_and(|attempt| attempt.id == id)
    }

    /// The attempt ended without an answer that decides the request: try again, or, after
    /// too many attempts in the fault phase, give up (its outcome stays unknown).
    fn retry(&mut self, client: usize, refusal: &Refusal) {
        let c = &mut self.app.clients[client];
        c.attempt = None;
        c.leader_hint = refusal.leader_hint();
        let op = c.op.as_mut().expect("a request in progress");
        op.attempts += 1;
        let (invoked_at, attempts) = (op.invoked_at, op.attempts);
        match self.retry_delay(invoked_at, attempts, refusal) {
            Some(delay) => self.schedule(delay, Event::ClientWake { client }),
            None => self.finish_request(client, Outcome::Unknown),
        }
    }

    pub(super) fn client_timeout(&mut self, client: usize, attempt: u64) {
        if self.current(client, attempt) {
            self.trace.record(&[14, client as u64, attempt]);
            self.retry(client, &Refusal::TimedOut);
        }
    }

    /// A member stopped: the attempts waiting on it will never be answered.
    pub(super) fn attempts_lost(&mut self, id: NodeId) {
        for client in 0..self.app.clients.len() {
            if self.app.clients[client]
                .attempt
                .is_some_and(|attempt| attempt.node == id)
            {
                self.retry(client, &Refusal::Stopped);
            }
        }
        self.app
            .lease_reads_waiting
            .retain(|&(node, ..)| node != id);
    }

    /// A proposal or read of member `id` was refused.
    pub(super) fn attempt_refused(&mut self, id: NodeId, waiter: Waiter, refusal: &Refusal) {
        match waiter {
            Waiter::Client { client, attempt } if self.current(client, attempt) => {
                self.retry(client, refusal);
            }
            Waiter::Lessor(waiter) => self.lessor_answered(id, waiter, false),
            _ => {}
        }
    }

    /// A proposal applied on member `id` with its waiter: the state machine's answer.
    pub(super) fn attempt_applied(&mut self, id: NodeId, waiter: Waiter, applied: &Applied) {
        let Waiter::Client { client, attempt } = waiter else {
            return;
        };
        if !self.current(client, attempt) {
            return;
        }
        let Applied::Kv(result) = applied else {
            panic!("node {id}: a key-value command applied as {applied:?}");
        };
        if let Some(renewal) = self.app.clients[client].attempt.and_then(|a| a.renewal) {
            return self.renewal_cleared(id, client, renewal, result);
        }
        let c = &mut self.app.clients[client];
        c.leader_hint = Some(id);
        let request =
            c.op.as_ref()
                .expect("a request in progress")
                .request
                .clone();
        let outcome = match &result.outcome {
            Err(error) => match error.kind() {
                ErrorKind::LeaseNotFound => {
                    // Expired (or revoked): a lease the client held is gone.
                    c.memory.lease = None;
                    Outcome::Fail
                }
                ErrorKind::SessionNotFound => {
                    c.session = None;
                    Outcome::Unknown
                }
                ErrorKind::ResponseNotRetained => Outcome::Unknown,
                ErrorKind::StaleSequence => panic!(
                    "node {id}: the session refused client {client}'s current request as \
                     stale: {error}"
                ),
                // Refused at apply: it changed nothing.
                _ => Outcome::Fail,
            },
            Ok(response) => self.take_response(client, &request, response),
        };
        if !matches!(outcome, Outcome::Fail | Outcome::Unknown) && request.is_write() {
            self.app.acked_write_index_max = self.app.acked_write_index_max.max(result.index);
            self.report.writes_ok += 1;
        }
        self.finish_request(client, outcome);
    }

    /// What a successful answer means for the request, after checking what it claims.
    fn take_response(&mut self, client: usize, request: &Request, response: &Response) -> Outcome {
        let revision = response_revision(response);
        let memory = &mut self.app.clients[client].memory;
        memory.revision_seen = memory.revision_seen.max(revision);
        let acknowledged = match (request, response) {
            (Request::RegisterSession, Response::SessionRegistered { session_id, .. }) => {
                let c = &mut self.app.clients[client];
                c.session = Some(*session_id);
                c.next_sequence = 0;
                return Outcome::Done;
            }
            (Request::Put { value, .. }, Response::Put(_)) => Some(value.clone()),
            (Request::Cas { new, .. }, Response::Txn(txn)) if txn.succeeded => Some(new.clone()),
            (Request::Cas { .. }, Response::Txn(_)) => return Outcome::Fail,
            (Request::Delete { .. }, Response::DeleteRange(_)) => None,
            (Request::LeaseGrant { .. }, Response::LeaseGrant(grant)) => {
                memory.lease = Some(grant.id);
                None
            }
            (Request::LeaseRevoke { .. }, Response::LeaseRevoke(_)) => {
                memory.lease = None;
                None
            }
            (Request::Compact { .. }, Response::Compaction(_)) => None,
            (request, response) => {
                panic!("client {client}: {request:?} was answered with {response:?}")
            }
        };
        if let Some(value) = &acknowledged
            && let Err(violation) = self.app.kv.check_acknowledged(value, revision)
        {
            panic!("{violation}");
        }
        self.remember_register(client, request, acknowledged.as_deref());
        Outcome::Done
    }

    /// Remembers what a register holds after the client's own write.
    fn remember_register(&mut self, client: usize, request: &Request, value: Option<&str>) {
        let key = match request {
            Request::Put { key, .. } | Request::Cas { key, .. } | Request::Delete { key } => key,
            _ => return,
        };
        if let Some(index) = register_index(key) {
            let seen = &mut self.app.clients[client].memory.seen;
            seen.resize(REGISTER_KEYS as usize, None);
            seen[index] = value.map(str::to_string);
        }
    }

    /// The clear a renewal waited for was applied on member `id`: the renewal is acknowledged,
    /// as the server's Lease service does.
    fn renewal_cleared(
        &mut self,
        id: NodeId,
        client: usize,
        renewal: Renewal,
        result: &flotilla_kv::ApplyResult,
    ) {
        let lease = self.keep_alive_in_progress(client);
        if let Err(error) = &result.outcome {
            panic!("node {id}: the clear of lease {lease}'s checkpoint failed at apply: {error}");
        }
        if let Some(member) = self.nodes.get_mut(&id).and_then(SimNode::member_mut) {
            member
                .app
                .leases
                .clock
                .checkpoint_cleared(lease, renewal.generation);
        }
        self.answer_keep_alive(id, client, renewal.ttl_seconds, renewal.decided_at);
    }

    /// The lease of the keep-alive `client` has in progress.
    fn keep_alive_in_progress(&self, client: usize) -> i64 {
        match self.app.clients[client].op.as_ref().map(|op| &op.request) {
            Some(Request::KeepAlive { id }) => *id,
            other => panic!("client {client}: a keep-alive answer for {other:?}"),
        }
    }

    /// Completes a keep-alive answered with `ttl_seconds`, renewed by the leader at
    /// `decided_at` (0: the lease is gone, and the client forgets it).
    fn answer_keep_alive(&mut self, id: NodeId, client: usize, ttl_seconds: i64, decided_at: u64) {
        let lease = self.keep_alive_in_progress(client);
        let c = &mut self.app.clients[client];
        c.leader_hint = Some(id);
        if ttl_seconds > 0 {
            self.app
                .leases
                .keep_alive_acked(lease, ttl_seconds, decided_at);
        } else if c.memory.lease == Some(lease) {
            c.memory.lease = None;
        }
        self.trace
            .record(&[31, client as u64, lease as u64, ttl_seconds as u64]);
        self.finish_request(client, Outcome::Done);
    }

    /// A linearizable read may be answered by member `id` now.
    pub(super) fn read_ready(&mut self, id: NodeId, waiter: Waiter) {
        if let Waiter::Client { client, attempt } = waiter
            && self.current(client, attempt)
        {
            self.answer_read(id, client, attempt, true);
        }
    }

    /// Answers the lease reads waiting on `id` that its state machine has reached.
    pub(super) fn resolve_lease_reads(&mut self, id: NodeId) {
        let Some(applied) = self.nodes.get(&id).and_then(SimNode::member) else {
            return;
        };
        let applied = applied.app.state().applied_index();
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .app
            .lease_reads_waiting
            .drain(..)
            .partition(|&(node, _, _, index)| node == id && index <= applied);
        self.app.lease_reads_waiting = waiting;
        for (node, client, attempt, _) in ready {
            if self.current(client, attempt) {
                self.answer_read(node, client, attempt, true);
                self.report.lease_reads_ok += 1;
            }
        }
    }

    /// Reads the key from member `id`'s state machine and completes the request.
    fn answer_read(&mut self, id: NodeId, client: usize, attempt: u64, linearizable: bool) {
        debug_assert!(self.current(client, attempt));
        let member = self.nodes[&id].member().expect("running");
        let c = &self.app.clients[client];
        let op = c.op.as_ref().expect("a read in progress");
        let state = member.app.state();
        let applied = state.applied_index();
        let floor_index = linearizable.then_some(op.floor_index);
        let range = op.request.range().expect("a read");
        let response = state
            .kv
            .range(&range)
            .unwrap_or_else(|err| panic!("node {id}: a range of one key failed: {err}"));
        drop(state);
        let value = response
            .kvs
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        let key = String::from_utf8_lossy(&range.key).into_owned();
        if let Some(index) = register_index(&key) {
            let seen = &mut self.app.clients[client].memory.seen;
            seen.resize(REGISTER_KEYS as usize, None);
            seen[index] = value.clone();
        }
        self.read_answered(id, client, applied, floor_index);
        self.app.clients[client].leader_hint = Some(id);
        self.finish_request(client, Outcome::Read(value));
    }

    /// Ends the request in progress and schedules the next.
    fn finish_request(&mut self, client: usize, outcome: Outcome) {
        let liveness = self.phase == Phase::Liveness;
        let c = &mut self.app.clients[client];
        c.attempt = None;
        let op = c.op.take().expect("a request in progress");
        if liveness && op.request.is_write() && matches!(outcome, Outcome::Done) {
            c.final_write_ok = !matches!(op.request, Request::RegisterSession);
        }
        if op.in_history {
            let (f, key, _) = op.request.register_op().expect("a register operation");
            let time = self.now * NS_PER_TIME_UNIT;
            self.app
                .history
                .complete(&mut c.process, f, key, &outcome, time);
        }
        let started = c.requests_started;
        self.request_ended(client, started, op.request.is_write(), &outcome);
    }
}

/// The revision a response's header carries.
fn response_revision(response: &Response) -> i64 {
    let header = match response {
        Response::Put(r) => r.header.as_ref(),
        Response::DeleteRange(r) => r.header.as_ref(),
        Response::Txn(r) => r.header.as_ref(),
        Response::Compaction(r) => r.header.as_ref(),
        Response::LeaseGrant(r) => r.header.as_ref(),
        Response::LeaseRevoke(r) => r.header.as_ref(),
        _ => None,
    };
    header.map_or(0, |h| h.revision)
}

fn register_index(key: &str) -> Option<usize> {
    key.strip_prefix("reg/")?.parse().ok()
}

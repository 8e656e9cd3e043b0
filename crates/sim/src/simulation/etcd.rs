//! The etcd application: what `flotilla-server` runs on every member (the state machine with
//! its key-value store, the watch hub apply feeds, watchers on it, the lease clock), with
//! etcd-shaped clients as Flotilla's client behaves (see `clients`, `leases`, `watchers`).

use std::sync::{RwLock, RwLockReadGuard};

use bytes::Bytes;
use flotilla_kv::Limits;
use flotilla_raft::{Entry, Index, NodeId};
use flotilla_runtime::driver::Refusal;
use flotilla_server::members::MemberTable;
use flotilla_server::state_machine::{Applied, EventSink, StateMachine};
use flotilla_server::watch::hub::{QueueBounds, WatchHub};

use super::application::{Application, Waiter};
use super::clients::{Client, internal_put};
use super::leases::MemberLeases;
use super::watchers::{RESUME_BEHIND_REVISIONS, SimWatcher};
use super::{RunReport, SNAPSHOT_STEP_BYTES, Simulation};
use crate::checker::Violation;
use crate::kv_checker::{FULL_DIGEST_EVERY, KvChecker};
use crate::lease_checker::LeaseChecker;
use crate::options::SimOptions;
use crate::storage::SimStorage;
use crate::workload::History;

/// The run's side of the etcd application: its clients and its checks.
#[derive(Debug)]
pub struct EtcdApp {
    pub(super) clients: Vec<Client>,
    /// The highest index of a write acknowledged so far: a read invoked later must see it.
    pub(super) acked_write_index_max: Index,
    /// Reads a leader answered from its lease, waiting for its state machine to reach their
    /// index: (node, client, attempt, index). At most one per client.
    pub(super) lease_reads_waiting: Vec<(NodeId, usize, u64, Index)>,
    pub(super) kv: KvChecker,
    pub(super) leases: LeaseChecker,
    /// When a member's lease clock was last promoted.
    pub(super) last_lease_promotion: u64,
    /// Writes the simulator itself proposed (each puts a unique value).
    internal_writes: u64,
    /// The register operations of every client, for the linearizability check.
    pub(super) history: History,
}

/// A member's side: the state machine (behind the lock the server's readers and watchers
/// take), the watch hub apply feeds, the watchers on it, and the lease clock.
#[allow(missing_debug_implementations)]
pub struct EtcdMember {
    pub(super) state: RwLock<StateMachine>,
    pub(super) hub: WatchHub,
    pub(super) watchers: Vec<SimWatcher>,
    pub(super) leases: MemberLeases,
}

impl EtcdMember {
    pub(super) fn state(&self) -> RwLockReadGuard<'_, StateMachine> {
        self.state.read().expect("one thread: never poisoned")
    }

    pub(super) fn state_mut(&mut self) -> &mut StateMachine {
        self.state.get_mut().expect("one thread: never poisoned")
    }
}

impl<S: SimStorage> Application<S> for EtcdApp {
    type Member = EtcdMember;
    type Output = Applied;

    const STATE_DIGEST_EVERY: Index = FULL_DIGEST_EVERY;

    fn new(options: &SimOptions) -> Self {
        EtcdApp {
            clients: (0..options.clients).map(|_| Client::default()).collect(),
            acked_write_index_max: 0,
            lease_reads_waiting: Vec::new(),
            kv: KvChecker::default(),
            leases: LeaseChecker::default(),
            last_lease_promotion: 0,
            internal_writes: 0,
            history: History::default(),
        }
    }

    fn start_member(sim: &Simulation<S, Self>, id: NodeId, snapshot: Option<&[u8]>) -> EtcdMember {
        let state = match snapshot {
            Some(mut data) => StateMachine::restore(&mut data, Limits::default())
                .unwrap_or_else(|err| panic!("node {id}: bad stored snapshot: {err}")),
            None => StateMachine::new(Limits::default(), MemberTable::default()),
        };
        let bounds = QueueBounds {
            revisions_max: sim.options.watch_queue_revisions_max,
            ..QueueBounds::default()
        };
        let mut member = EtcdMember {
            state: RwLock::new(state),
            hub: WatchHub::new(bounds),
            watchers: Vec::new(),
            leases: MemberLeases::new(),
        };
        member.start_watcher(1);
        // A client resuming a few revisions back: with the one from revision 1, two watchers
        // catch up on one range from different revisions, sharing their reads of history.
        let current = member.current_revision();
        if current > RESUME_BEHIND_REVISIONS + 1 {
            member.start_watcher(current - RESUME_BEHIND_REVISIONS);
        }
        member.start_watcher(0);
        member
    }

    fn applied_index(member: &EtcdMember) -> Index {
        member.state().applied_index()
    }

    fn state_digest(member: &mut EtcdMember) -> u64 {
        member.state().kv.digest()
    }

    fn apply_entry(
        sim: &mut Simulation<S, Self>,
        id: NodeId,
        entry: &Entry,
        first_anywhere: bool,
    ) -> Applied {
        let member = sim.member_mut(id);
        let applied = member.app.state_mut().apply_entry(entry);
        if let Applied::Kv(result) = &applied
            && !result.events.is_empty()
        {
            member.app.hub.publish(result.revision, &result.events);
        }
        if let Applied::Kv(result) = &applied
            && let Err(violation) = sim.app.kv.record_writes(entry.index, result)
        {
            panic!("{violation}");
        }
        if let Err(violation) = sim.lease_entry_applied(id, entry, &applied, first_anywhere) {
            panic!("{violation}");
        }
        applied
    }

    fn answer(
        sim: &mut Simulation<S, Self>,
        id: NodeId,
        waiter: Waiter,
        _index: Index,
        applied: &Applied,
    ) {
        match waiter {
            Waiter::Lessor(waiter) => sim.lessor_answered(id, waiter, true),
            waiter => sim.attempt_applied(id, waiter, applied),
        }
    }

    fn restore(member: &mut EtcdMember, mut snapshot: &[u8]) -> Result<(), String> {
        let state =
            StateMachine::restore(&mut snapshot, Limits::default()).map_err(|e| e.to_string())?;
        let previous_revision = member.state().kv.current_revision();
        *member.state_mut() = state;
        member.hub.state_replaced(previous_revision);
        Ok(())
    }

    fn encode_snapshot(member: &mut EtcdMember) -> std::io::Result<Bytes> {
        let mut cursor = member.state_mut().begin_snapshot();
        let mut data = Vec::new();
        let encoded = loop {
            match member
                .state()
                .continue_snapshot(&mut cursor, &mut data, SNAPSHOT_STEP_BYTES)
            {
                Ok(true) => break Ok(Bytes::from(data)),
                Ok(false) => {}
                Err(err) => break Err(err),
            }
        };
        member.state_mut().end_snapshot(cursor);
        encoded
    }

    fn after_apply(sim: &mut Simulation<S, Self>, id: NodeId) {
        sim.step_watchers(id);
        if !sim.app.lease_reads_waiting.is_empty() {
            sim.resolve_lease_reads(id);
        }
    }

    fn ticked(sim: &mut Simulation<S, Self>, id: NodeId) {
        sim.lease_round(id);
    }

    fn idle(sim: &mut Simulation<S, Self>, id: NodeId) {
        // As the lessor task wakes on each status change.
        sim.follow_leases(id);
    }

    fn refused(sim: &mut Simulation<S, Self>, id: NodeId, waiter: Waiter, refusal: &Refusal) {
        sim.attempt_refused(id, waiter, refusal);
    }

    fn read_ready(sim: &mut Simulation<S, Self>, id: NodeId, waiter: Waiter) {
        sim.read_ready(id, waiter);
    }

    fn member_stopped(sim: &mut Simulation<S, Self>, id: NodeId) {
        sim.attempts_lost(id);
    }

    fn client_wake(sim: &mut Simulation<S, Self>, client: usize) {
        sim.client_wake(client);
    }

    fn client_timeout(sim: &mut Simulation<S, Self>, client: usize, attempt: u64) {
        sim.client_timeout(client, attempt);
    }

    fn proposed_index_max(&self) -> Option<Index> {
        self.clients.iter().filter_map(Client::proposed_index).max()
    }

    fn internal_command(&mut self, value_bytes: usize) -> Bytes {
        self.internal_writes += 1;
        internal_put(self.internal_writes, value_bytes)
    }

    fn converged(sim: &Simulation<S, Self>, leader: NodeId) -> bool {
        sim.app.clients.iter().all(Client::is_done)
            && (!sim.leases_must_expire() || sim.leases_gone(leader))
    }

    fn describe_member(member: &EtcdMember) -> String {
        format!(
            "leases={} lease-clock={}",
            member.state().kv.leases().len(),
            member.leases.describe()
        )
    }

    fn describe_clients(&self) -> String {
        let clients: Vec<String> = self.clients.iter().map(Client::describe).collect();
        clients.join("; ")
    }

    fn check_history(&self) -> Result<(), Violation> {
        KvChecker::check_history(&self.history)
    }

    fn finish(&self, report: &mut RunReport) {
        report.history_operations = self.history.events.len() as u64;
        report.keep_alives_acked = self.leases.keep_alives_acked;
        report.lease_expiries_checked = self.leases.expiries_checked;
    }
}

//! What the simulated members run on top of Raft: an application's state machine and its
//! clients. The simulation owns Raft (ticks, the network, the disk, crashes and recovery, the
//! nemesis, the safety checks); an [`Application`] owns what a member applies, what its
//! clients ask, and what must hold of their answers.
//!
//! Hooks take the whole simulation: an application's clients send through the members'
//! drivers, as the application's front end does in a real member.

use bytes::Bytes;
use flotilla_raft::{Entry, Index, NodeId};
use flotilla_runtime::driver::Refusal;

use super::{RunReport, Simulation};
use crate::checker::Violation;
use crate::options::SimOptions;
use crate::storage::SimStorage;

/// Who waits for a proposal or a read: an attempt of a client's request, a member's lease
/// clock (the etcd application's), or the simulator itself (fault bursts, log fillers,
/// membership changes), which waits for nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiter {
    Client { client: usize, attempt: u64 },
    Lessor(LessorWaiter),
    Internal,
}

/// A proposal of a member's lease clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LessorWaiter {
    /// The revoke of an expired lease.
    Revoke(i64),
    /// A checkpoint, by its round.
    Checkpoint(u64),
}

/// An application the simulated members run, with its clients and its checks.
pub trait Application<S: SimStorage>: Sized {
    /// A member's side: its state machine and whatever feeds on it.
    type Member;
    /// What applying one entry gives its waiter. Its `Debug` text is the entry's effect, which
    /// every member must agree on.
    type Output: std::fmt::Debug;

    /// How often (in log indexes) every member's whole state is compared, besides at every
    /// snapshot taken or installed.
    const STATE_DIGEST_EVERY: Index;

    /// The run's side, before any member starts.
    fn new(options: &SimOptions) -> Self;

    /// A member's side, from its stored snapshot if it has one.
    fn start_member(sim: &Simulation<S, Self>, id: NodeId, snapshot: Option<&[u8]>)
    -> Self::Member;

    /// The index of the last entry the member's state machine applied.
    fn applied_index(member: &Self::Member) -> Index;

    /// A digest of the member's whole state (equal on members that applied the same entries).
    fn state_digest(member: &mut Self::Member) -> u64;

    /// Applies a committed entry on running member `id` (`first_anywhere`: no member applied
    /// this index before) and checks what the application requires of it.
    fn apply_entry(
        sim: &mut Simulation<S, Self>,
        id: NodeId,
        entry: &Entry,
        first_anywhere: bool,
    ) -> Self::Output;

    /// A proposal of `waiter`'s was applied at `index` on member `id`.
    fn answer(
        sim: &mut Simulation<S, Self>,
        id: NodeId,
        waiter: Waiter,
        index: Index,
        output: &Self::Output,
    );

    /// Replaces the member's state with a snapshot's; an error says what was wrong with it.
    fn restore(member: &mut Self::Member, snapshot: &[u8]) -> Result<(), String>;

    /// The member's state at its applied index, encoded in steps as a snapshot.
    fn encode_snapshot(member: &mut Self::Member) -> std::io::Result<Bytes>;

    /// Member `id` applied a batch of entries.
    fn after_apply(_sim: &mut Simulation<S, Self>, _id: NodeId) {}

    /// Member `id` ticked.
    fn ticked(_sim: &mut Simulation<S, Self>, _id: NodeId) {}

    /// Member `id` has no more output for now.
    fn idle(_sim: &mut Simulation<S, Self>, _id: NodeId) {}

    /// A proposal or read of `waiter`'s was refused by member `id`.
    fn refused(sim: &mut Simulation<S, Self>, id: NodeId, waiter: Waiter, refusal: &Refusal);

    /// A linearizable read of `waiter`'s may be answered by member `id` now.
    fn read_ready(sim: &mut Simulation<S, Self>, id: NodeId, waiter: Waiter);

    /// Member `id` stopped: whatever waits on it will never be answered.
    fn member_stopped(sim: &mut Simulation<S, Self>, id: NodeId);

    /// Client `client` may send its next request, or its current one again.
    fn client_wake(sim: &mut Simulation<S, Self>, client: usize);

    /// Client `client`'s attempt `attempt` got no answer in time.
    fn client_timeout(sim: &mut Simulation<S, Self>, client: usize, attempt: u64);

    /// The highest log index a client's write waits at, if any waits.
    fn proposed_index_max(&self) -> Option<Index>;

    /// A command of the simulator's own (a fault burst's, the log filler's), about
    /// `value_bytes` long.
    fn internal_command(&mut self, value_bytes: usize) -> Bytes;

    /// True once the application has nothing outstanding (in the liveness phase, under a
    /// leader `leader` that has committed its whole log).
    fn converged(sim: &Simulation<S, Self>, leader: NodeId) -> bool;

    /// A member's application side, for a liveness failure's report.
    fn describe_member(member: &Self::Member) -> String;

    /// The clients, for a liveness failure's report.
    fn describe_clients(&self) -> String;

    /// Checks the clients' complete history at the end of a run.
    fn check_history(&self) -> Result<(), Violation>;

    /// Fills in the report's application counts.
    fn finish(&self, report: &mut RunReport);
}

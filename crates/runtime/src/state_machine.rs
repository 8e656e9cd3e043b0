//! What the runtime applies committed entries to: the application's state machine.
//!
//! The runtime calls [`StateMachine::apply`] on one thread, in log order, for every committed
//! entry (commands, and the blank and membership entries the core commits too), holding the
//! state's write lock; readers take the read lock beside it. A snapshot is taken at the
//! applied index in steps ([`StateMachine::begin_snapshot`], then
//! [`StateMachine::continue_snapshot`] under the read lock while apply goes on, then
//! [`StateMachine::end_snapshot`]), so a large state is never copied whole nor blocks apply
//! while it is encoded. A state machine that is small enough to encode at once implements
//! [`SmallStateMachine`] instead and gets the steps for free.
//!
//! Every member applies the same entries in the same order, so `apply` must be deterministic:
//! the same entries from the same state give the same state and outputs (no clocks, no
//! randomness, no iteration over unordered collections that reaches the output).

use std::io::{self, Read};

use flotilla_raft::{Entry, EntryPayload, Index};

/// Where a forwarded command came from: the member that forwarded it and a number of that
/// member's, carried inside the command by the application (see
/// [`StateMachine::origin`] and [`crate::NodeHandle::track_forwarded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The member that forwarded the command.
    pub member_id: flotilla_raft::NodeId,
    /// The member's number for it, unique across its restarts.
    pub request: u64,
}

/// An application's replicated state.
pub trait StateMachine: Send + Sync + Sized + 'static {
    /// What applying one entry gives the client that proposed it.
    type Output: Send + 'static;
    /// The state pinned for a snapshot in progress (see [`StateMachine::begin_snapshot`]).
    type SnapshotCursor: Send + 'static;

    /// The index of the last entry applied (0 for an empty state). The runtime hands the core
    /// this index at start, so the core never hands these entries out again.
    fn applied_index(&self) -> Index;

    /// Applies one committed entry: a command, or a blank or membership entry (which must
    /// still advance [`StateMachine::applied_index`]).
    fn apply(&mut self, entry: &Entry) -> Self::Output;

    /// The origin a forwarding member tagged this entry's command with, if any: its
    /// forwarded write then gets this output even if the leader's answer was lost.
    fn origin(_output: &Self::Output) -> Option<Origin> {
        None
    }

    /// Pins the state at the applied index for a snapshot. Called under the write lock, then
    /// apply goes on; what apply changes afterwards must not reach the snapshot.
    fn begin_snapshot(&mut self) -> Self::SnapshotCursor;

    /// Encodes the next step of the pinned state into `out` (about `bytes_max` bytes); true
    /// when the snapshot is complete. Called under the read lock, once per step.
    fn continue_snapshot(
        &self,
        cursor: &mut Self::SnapshotCursor,
        out: &mut Vec<u8>,
        bytes_max: usize,
    ) -> io::Result<bool>;

    /// Releases what [`StateMachine::begin_snapshot`] pinned. Called under the write lock,
    /// also when the snapshot failed half way.
    fn end_snapshot(&mut self, cursor: Self::SnapshotCursor);

    /// A new state machine with nothing applied and this one's configuration, for
    /// [`StateMachine::restore`] to fill beside this one (readers go on meanwhile).
    fn empty(&self) -> Self;

    /// Replaces this (empty) state with a snapshot's; afterwards its applied index must be
    /// the snapshot's. On an error, which says what was wrong with the bytes, this state is
    /// discarded.
    fn restore(&mut self, snapshot: &mut dyn Read) -> Result<(), String>;

    /// Puts a restored state in this one's place, under the write lock. Override it to tell
    /// observers that the whole state was replaced.
    fn replace(&mut self, restored: Self) {
        *self = restored;
    }
}

/// A state machine small enough to encode whole at the moment of a snapshot (a few megabytes
/// at most: apply waits while it is encoded). Implementing this gives [`StateMachine`]; its
/// `Default` is the empty state a snapshot is restored into.
pub trait SmallStateMachine: Default + Send + Sync + Sized + 'static {
    /// As [`StateMachine::Output`].
    type Output: Send + 'static;

    /// As [`StateMachine::applied_index`].
    fn applied_index(&self) -> Index;

    /// Applies a command at `index`.
    fn apply_command(&mut self, index: Index, command: &[u8]) -> Self::Output;

    /// Notes that a blank or membership entry at `index` was applied (nothing to change but
    /// the applied index); returns what a waiter on it gets.
    fn apply_other(&mut self, index: Index) -> Self::Output;

    /// The whole state (with its applied index) as bytes.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces this (empty) state with the one a snapshot's bytes hold; an error says what
    /// was wrong with them.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
}

/// The encoded state of a [`SmallStateMachine`] and how much of it was handed out.
#[derive(Debug)]
pub struct EncodedSnapshot {
    bytes: Vec<u8>,
    sent: usize,
}

impl<T: SmallStateMachine> StateMachine for T {
    type Output = T::Output;
    type SnapshotCursor = EncodedSnapshot;

    fn applied_index(&self) -> Index {
        SmallStateMachine::applied_index(self)
    }

    fn apply(&mut self, entry: &Entry) -> Self::Output {
        match &entry.payload {
            EntryPayload::Command(command) => self.apply_command(entry.index, command),
            _ => self.apply_other(entry.index),
        }
    }

    fn begin_snapshot(&mut self) -> EncodedSnapshot {
        EncodedSnapshot {
            bytes: self.snapshot(),
            sent: 0,
        }
    }

    fn continue_snapshot(
        &self,
        cursor: &mut EncodedSnapshot,
        out: &mut Vec<u8>,
        bytes_max: usize,
    ) -> io::Result<bool> {
        let end = cursor.bytes.len().min(cursor.sent + bytes_max.max(1));
        out.extend_from_slice(&cursor.bytes[cursor.sent..end]);
        cursor.sent = end;
        Ok(end == cursor.bytes.len())
    }

    fn end_snapshot(&mut self, _cursor: EncodedSnapshot) {}

    fn empty(&self) -> Self {
        T::default()
    }

    fn restore(&mut self, snapshot: &mut dyn Read) -> Result<(), String> {
        let mut bytes = Vec::new();
        snapshot
            .read_to_end(&mut bytes)
            .map_err(|err| format!("reading the snapshot: {err}"))?;
        SmallStateMachine::restore(self, &bytes)
    }
}

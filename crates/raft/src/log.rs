//! The node's view of its log: the durable part in [`LogStorage`], the part not yet known to be
//! durable in memory, and the cursors that move along it.
//!
//! ```text
//!   compacted   applied <= applying <= committed        persisted        last
//!       |          |                    |                  |              |
//!  ...--+----------+--------------------+------------------+--------------+
//!       |<----- storage (durable, matches memory) ------->|<- unstable ->|
//! ```
//!
//! The unstable suffix starts at `unstable_offset <= persisted + 1`: entries below it are read
//! from storage, entries from it on are held here. When a persist batch is acknowledged the
//! durable prefix grows and the unstable suffix shrinks. A truncation (a follower's conflicting
//! suffix replaced) lowers `persisted` below the truncation point at once, because from then on
//! the durable log no longer matches memory there.
//!
//! The log also tracks the configurations in it (§6: a configuration takes effect as soon as
//! its entry is in the log), so that a truncation falls back to the previous one.

use std::collections::VecDeque;

use crate::membership::Membership;
use crate::storage::{InitialState, LogStorage, SnapshotMeta, StorageError};
use crate::types::{Entry, EntryId, EntryPayload, Index, Term, entries_size_bytes};

pub(crate) struct RaftLog<S> {
    pub(crate) storage: S,
    /// Entries up to and including this one are gone (compacted, or covered by an installed
    /// snapshot). Its term is still known.
    /// Invariant: `compacted.index <= snapshot.index`.
    compacted: EntryId,
    /// The newest snapshot's last entry (saved locally or received from a leader), or the
    /// empty id if there never was one.
    /// Invariant: `snapshot.index <= committed`.
    snapshot: EntryId,
    /// Entries `unstable_offset..=last.index`, not yet known durable.
    unstable: VecDeque<Entry>,
    /// Invariant: `compacted.index < unstable_offset <= last.index + 1`.
    unstable_offset: Index,
    /// The last entry of the log (the snapshot's last entry if the log is empty).
    last: EntryId,
    /// Invariant: `committed <= last.index`, and `committed` never decreases.
    committed: Index,
    /// The durable log matches this log up to here.
    /// Invariant: `persisted <= last.index`; `unstable_offset <= persisted + 1` unless a
    /// snapshot install is waiting to be persisted.
    persisted: Index,
    /// The highest index handed out for apply.
    /// Invariant: `applied <= applying <= committed`.
    applying: Index,
    /// The highest index the caller reported applied.
    applied: Index,
    /// The first index not yet handed to a persist batch.
    /// Invariant: `unstable_offset <= write_from <= last.index + 1`.
    write_from: Index,
    /// The configuration in force at `snapshot.index`.
    membership_base: Membership,
    /// Configurations in the log after `snapshot.index`, by index, ascending.
    memberships: Vec<(Index, Membership)>,
}

impl<S> std::fmt::Debug for RaftLog<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLog")
            .field("compacted", &self.compacted)
            .field("snapshot", &self.snapshot)
            .field("unstable_offset", &self.unstable_offset)
            .field("last", &self.last)
            .field("committed", &self.committed)
            .field("persisted", &self.persisted)
            .field("applying", &self.applying)
            .field("applied", &self.applied)
            .field("write_from", &self.write_from)
            .finish_non_exhaustive()
    }
}

/// How many bytes of entries to read at a time when scanning the log at start-up.
const SCAN_BYTES_MAX: u64 = 4 << 20;

impl<S: LogStorage> RaftLog<S> {
    /// Opens the log over `storage`. `applied` is the index the caller's state machine has
    /// already applied durably (0 for a state machine rebuilt from scratch at every start).
    pub(crate) fn new(
        storage: S,
        init: &InitialState,
        applied: Index,
    ) -> Result<Self, StorageError> {
        let first_index = storage.first_index();
        let last_index = storage.last_index();
        let compacted = EntryId::new(storage.term(first_index - 1)?, first_index - 1);
        let last = EntryId::new(storage.term(last_index)?, last_index);
        let (snapshot, membership_base) = match &init.snapshot {
            Some(info) => (info.meta.last, info.meta.membership.clone()),
            None => (EntryId::default(), init.bootstrap_membership.clone()),
        };
        let corrupt = |what: String| Err(StorageError::Io(format!("inconsistent storage: {what}")));
        if snapshot.index < compacted.index || snapshot.index > last_index {
            return corrupt(format!(
                "snapshot {snapshot} lies outside the log ({first_index}..={last_index})"
            ));
        }
        if init.hard_state.commit > last_index {
            return corrupt(format!(
                "commit index {} is past the last index {last_index}",
                init.hard_state.commit
            ));
        }
        if applied > init.hard_state.commit.max(snapshot.index) {
            return corrupt(format!("applied index {applied} is past the commit index"));
        }
        let committed = init.hard_state.commit.max(snapshot.index);
        let mut log = Self {
            storage,
            compacted,
            snapshot,
            unstable: VecDeque::new(),
            unstable_offset: last_index + 1,
            last,
            committed,
            persisted: last_index,
            applying: applied,
            applied,
            write_from: last_index + 1,
            membership_base,
            memberships: Vec::new(),
        };
        log.memberships = log.scan_memberships(snapshot.index + 1)?;
        Ok(log)
    }

    /// Reads the configurations in the log from `low` on.
    fn scan_memberships(&self, low: Index) -> Result<Vec<(Index, Membership)>, StorageError> {
        let mut found = Vec::new();
        let mut next = low;
        while next <= self.last.index {
            let batch = self.entries(next, self.last.index + 1, SCAN_BYTES_MAX)?;
            assert!(
                !batch.is_empty(),
                "storage returned no entries for a non-empty range"
            );
            next += batch.len() as u64;
            found.extend(batch.into_iter().filter_map(membership_of));
        }
        Ok(found)
    }

    pub(crate) fn last_id(&self) -> EntryId {
        self.last
    }

    pub(crate) fn last_index(&self) -> Index {
        self.last.index
    }

    /// The first index still in the log.
    pub(crate) fn first_index(&self) -> Index {
        self.compacted.index + 1
    }

    pub(crate) fn snapshot_id(&self) -> EntryId {
        self.snapshot
    }

    pub(crate) fn committed(&self) -> Index {
        self.committed
    }

    pub(crate) fn persisted(&self) -> Index {
        self.persisted
    }

    pub(crate) fn applied(&self) -> Index {
        self.applied
    }

    pub(crate) fn applying(&self) -> Index {
        self.applying
    }

    /// The configuration in force: the newest one in the log, or the snapshot's.
    pub(crate) fn membership(&self) -> &Membership {
        self.memberships
            .last()
            .map(|(_, m)| m)
            .unwrap_or(&self.membership_base)
    }

    /// The index of the newest configuration entry (the snapshot's index if there is none).
    pub(crate) fn membership_index(&self) -> Index {
        self.memberships
            .last()
            .map(|&(index, _)| index)
            .unwrap_or(self.snapshot.index)
    }

    /// The configuration in force at `index` (which must not be before the snapshot).
    pub(crate) fn membership_at(&self, index: Index) -> &Membership {
        assert!(
            index >= self.snapshot.index,
            "membership_at({index}) before the snapshot"
        );
        self.memberships
            .iter()
            .rev()
            .find(|(at, _)| *at <= index)
            .map(|(_, m)| m)
            .unwrap_or(&self.membership_base)
    }

    /// The term of the entry at `index`.
    pub(crate) fn term(&self, index: Index) -> Result<Term, StorageError> {
        if index == self.compacted.index {
            return Ok(self.compacted.term);
        }
        if index < self.compacted.index {
            return Err(StorageError::Compacted {
                index,
                first_index: self.first_index(),
            });
        }
        if index > self.last.index {
            return Err(StorageError::Unavailable {
                index,
                last_index: self.last.index,
            });
        }
        if index >= self.unstable_offset {
            return Ok(self.unstable[(index - self.unstable_offset) as usize].term);
        }
        self.storage.term(index)
    }

    /// True if the log holds `id`. A compacted or missing index is simply not a match.
    pub(crate) fn match_term(&self, id: EntryId) -> Result<bool, StorageError> {
        match self.term(id.index) {
            Ok(term) => Ok(term == id.term),
            Err(StorageError::Compacted { .. } | StorageError::Unavailable { .. }) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// §5.4.1: a candidate's log is at least as up to date as ours if its last term is higher,
    /// or equal with an index at least as high.
    pub(crate) fn is_up_to_date(&self, candidate_last: EntryId) -> bool {
        candidate_last >= self.last
    }

    /// The entries in `[low, high)`, at most `bytes_max` bytes of them but at least one.
    pub(crate) fn entries(
        &self,
        low: Index,
        high: Index,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if low <= self.compacted.index {
            return Err(StorageError::Compacted {
                index: low,
                first_index: self.first_index(),
            });
        }
        assert!(
            high <= self.last.index + 1,
            "entries({low}, {high}) past the last index"
        );
        if low >= high {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if low < self.unstable_offset {
            let stable_high = high.min(self.unstable_offset);
            out = self.storage.entries(low, stable_high, bytes_max)?;
            assert!(
                !out.is_empty(),
                "storage returned no entries for {low}..{stable_high}"
            );
            assert_eq!(
                out[0].index, low,
                "storage returned entries from the wrong index"
            );
            if out.len() as u64 != stable_high - low {
                return Ok(out);
            }
        }
        let mut total_bytes = entries_size_bytes(&out);
        let start = low.max(self.unstable_offset);
        for index in start..high {
            let entry = &self.unstable[(index - self.unstable_offset) as usize];
            total_bytes += entry.size_bytes();
            if !out.is_empty() && total_bytes > bytes_max {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    /// Finds the last entry at or below `index` whose term is at most `term`: the point from
    /// which to search for agreement with a log whose entry at `index` has `term` (the conflict
    /// hint of fast backtracking). Stops at the compaction point.
    pub(crate) fn find_conflict_by_term(
        &self,
        index: Index,
        term: Term,
    ) -> Result<EntryId, StorageError> {
        let mut index = index.min(self.last.index);
        if index < self.compacted.index {
            // The terms there are gone; the caller probes from the index itself, which leads to
            // a snapshot if it is compacted.
            return Ok(EntryId::new(0, index));
        }
        loop {
            let entry_term = self.term(index)?;
            if entry_term <= term || index == self.compacted.index {
                return Ok(EntryId::new(entry_term, index));
            }
            index -= 1;
        }
    }

    /// Appends entries a leader created at the end of its own log.
    pub(crate) fn append(&mut self, entries: Vec<Entry>) {
        let Some(first) = entries.first() else { return };
        assert_eq!(
            first.index,
            self.last.index + 1,
            "leader append must extend the log"
        );
        self.truncate_and_append(entries);
    }

    /// The follower's side of AppendEntries (§5.3): if the log holds `prev`, merge `entries`
    /// in, replacing any conflicting suffix, and return the index of the last new entry.
    /// Returns `None` if the consistency check fails.
    pub(crate) fn maybe_append(
        &mut self,
        prev: EntryId,
        mut entries: Vec<Entry>,
    ) -> Result<Option<Index>, StorageError> {
        if !self.match_term(prev)? {
            return Ok(None);
        }
        let last_new = prev.index + entries.len() as u64;
        for (offset, entry) in entries.iter().enumerate() {
            assert_eq!(
                entry.index,
                prev.index + 1 + offset as u64,
                "append entries not contiguous"
            );
            if self.match_term(entry.id())? {
                continue;
            }
            // The first entry that is missing or conflicts: everything from here is replaced.
            assert!(
                entry.index > self.committed,
                "conflict at {} would truncate committed entries (commit {})",
                entry.index,
                self.committed
            );
            entries.drain(..offset);
            self.truncate_and_append(entries);
            break;
        }
        Ok(Some(last_new))
    }

    fn truncate_and_append(&mut self, entries: Vec<Entry>) {
        let after = entries[0].index;
        assert!(
            after > self.compacted.index,
            "append at {after} into the compacted log"
        );
        assert!(
            after <= self.last.index + 1,
            "append at {after} leaves a gap"
        );
        if after <= self.unstable_offset {
            self.unstable.clear();
            self.unstable_offset = after;
        } else {
            self.unstable
                .truncate((after - self.unstable_offset) as usize);
        }
        self.persisted = self.persisted.min(after - 1);
        self.write_from = self.write_from.min(after);
        self.memberships.retain(|&(index, _)| index < after);
        self.memberships
            .extend(entries.iter().cloned().filter_map(membership_of));
        self.last = entries.last().expect("non-empty").id();
        self.unstable.extend(entries);
        self.check_invariants();
    }

    /// Advances the commit index. It never moves backwards.
    pub(crate) fn commit_to(&mut self, index: Index) -> bool {
        if index <= self.committed {
            return false;
        }
        assert!(
            index <= self.last.index,
            "commit {index} past the last index {}",
            self.last
        );
        self.committed = index;
        true
    }

    /// Entries from `write_from` on, which the next persist batch must write; the cursor moves
    /// past them.
    pub(crate) fn take_unwritten(&mut self) -> Vec<Entry> {
        if self.write_from > self.last.index {
            return Vec::new();
        }
        let start = (self.write_from - self.unstable_offset) as usize;
        let entries: Vec<Entry> = self.unstable.range(start..).cloned().collect();
        self.write_from = self.last.index + 1;
        entries
    }

    /// The index below which everything is either durable or in a batch already handed out.
    pub(crate) fn write_from(&self) -> Index {
        self.write_from
    }

    /// A persist batch that wrote up to `id` is durable.
    pub(crate) fn persisted_to(&mut self, id: EntryId) -> Result<(), StorageError> {
        // If the entry was replaced since the batch was written, the durable copy no longer
        // matches; a later batch carries the replacement.
        if !self.match_term(id)? || id.index <= self.persisted {
            return Ok(());
        }
        self.persisted = id.index;
        while self
            .unstable
            .front()
            .is_some_and(|e| e.index <= self.persisted)
        {
            self.unstable.pop_front();
            self.unstable_offset += 1;
        }
        self.check_invariants();
        Ok(())
    }

    /// The next committed entries to apply: committed, not yet handed out, within
    /// `bytes_max`. Advances `applying`.
    ///
    /// An entry need not be durable *here* to be applied: committed means a majority holds it
    /// durably, so no leader can ever lose it (thesis §10.2.1: the leader may commit before its
    /// own write finishes). A stalled local disk therefore delays only this node's own
    /// acknowledgements, not the answers to clients. After a crash the node recovers what it
    /// had made durable and gets the rest again from the leader.
    pub(crate) fn next_to_apply(&mut self, bytes_max: u64) -> Result<Vec<Entry>, StorageError> {
        let high = self.committed;
        if self.applying >= high {
            return Ok(Vec::new());
        }
        let entries = self.entries(self.applying + 1, high + 1, bytes_max)?;
        self.applying = entries.last().map(|e| e.index).unwrap_or(self.applying);
        Ok(entries)
    }

    /// The caller's state machine applied everything up to `index`.
    pub(crate) fn applied_to(&mut self, index: Index) {
        assert!(
            index <= self.applying,
            "applied {index} but only {} handed out",
            self.applying
        );
        assert!(
            index >= self.applied,
            "applied index went back from {} to {index}",
            self.applied
        );
        self.applied = index;
    }

    /// Installs a snapshot received from a leader (§7). Returns the `keep_through` bound for
    /// storage (see [`crate::SnapshotInstall`]).
    ///
    /// If the log holds the snapshot's last entry, the suffix after it is kept; otherwise the
    /// whole log is replaced by the snapshot.
    pub(crate) fn restore(&mut self, meta: &SnapshotMeta) -> Result<Index, StorageError> {
        let last = meta.last;
        assert!(
            last.index > self.committed,
            "restoring snapshot {last} at or below the commit"
        );
        let retain = self.match_term(last)?;
        if retain {
            while self.unstable.front().is_some_and(|e| e.index <= last.index) {
                self.unstable.pop_front();
            }
            self.unstable_offset = self.unstable_offset.max(last.index + 1);
            self.write_from = self.write_from.max(last.index + 1);
        } else {
            self.unstable.clear();
            self.unstable_offset = last.index + 1;
            self.write_from = last.index + 1;
            self.last = last;
            // The durable log differs from the snapshot at its last entry; nothing of the new
            // log is durable until the install is.
            self.persisted = self.persisted.min(last.index - 1);
        }
        self.compacted = last;
        self.snapshot = last;
        self.committed = last.index;
        self.membership_base = meta.membership.clone();
        self.memberships.retain(|&(index, _)| index > last.index);
        // Storage keeps exactly what it holds consistently with memory: every index below
        // `write_from` was written by this or an earlier batch.
        let keep_through = (self.write_from - 1).min(self.last.index);
        Ok(keep_through)
    }

    /// The snapshot ending at `index` was handed out for the state machine to load.
    pub(crate) fn snapshot_handed_out(&mut self, index: Index) {
        assert!(
            index <= self.committed,
            "snapshot {index} handed out past the commit"
        );
        assert!(
            index == self.snapshot.index,
            "snapshot {index} is not the current one"
        );
        self.applying = self.applying.max(index);
        self.check_invariants();
    }

    /// Records a snapshot the caller saved locally at `meta.last` and compacts the log up to
    /// `compact_to` (at most the snapshot). Returns true if the compaction point moved.
    pub(crate) fn snapshot_saved(&mut self, meta: &SnapshotMeta, compact_to: Index) -> bool {
        let last = meta.last;
        assert!(
            last.index <= self.applied,
            "snapshot {last} of unapplied entries"
        );
        assert!(compact_to <= last.index);
        if last.index > self.snapshot.index {
            self.membership_base = self.membership_at(last.index).clone();
            self.memberships.retain(|&(index, _)| index > last.index);
            self.snapshot = last;
        }
        if compact_to <= self.compacted.index {
            return false;
        }
        let term = self
            .term(compact_to)
            .expect("an applied entry is in the log");
        self.compacted = EntryId::new(term, compact_to);
        self.check_invariants();
        true
    }

    pub(crate) fn check_invariants(&self) {
        assert!(self.compacted.index <= self.snapshot.index, "{self:?}");
        assert!(self.snapshot.index <= self.committed, "{self:?}");
        assert!(self.compacted.index < self.unstable_offset, "{self:?}");
        assert!(self.unstable_offset <= self.last.index + 1, "{self:?}");
        assert!(self.unstable_offset <= self.write_from, "{self:?}");
        assert!(self.write_from <= self.last.index + 1, "{self:?}");
        assert!(self.committed <= self.last.index, "{self:?}");
        assert!(self.applied <= self.applying, "{self:?}");
        assert!(self.applying <= self.committed, "{self:?}");
        assert!(self.persisted <= self.last.index, "{self:?}");
        assert_eq!(
            self.unstable.len() as u64,
            self.last.index + 1 - self.unstable_offset,
            "{self:?}"
        );
        debug_assert!(
            self.unstable.back().is_none_or(|e| e.id() == self.last),
            "the unstable suffix ends at the last entry: {self:?}"
        );
    }
}

fn membership_of(entry: Entry) -> Option<(Index, Membership)> {
    match entry.payload {
        EntryPayload::Membership(change) => Some((entry.index, change.membership)),
        _ => None,
    }
}

//! The in-memory index of the log: where each live entry's record is, the terms, the hard state
//! and the current snapshot. Entries themselves stay on disk (and in the page cache); the index
//! costs 12 bytes per entry plus one pair per run of equal terms.
//!
//! Recovery builds it by replaying records; the writer updates it after each write. Both go
//! through the same methods, so the two cannot disagree about what a record means.

use std::collections::VecDeque;

use flotilla_raft::{EntryId, HardState, Index, StorageError, Term};

use crate::record::SnapshotRef;

/// Where an entry's record lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryLocation {
    pub segment_seq: u32,
    pub offset: u32,
    pub record_bytes: u32,
}

impl EntryLocation {
    /// An entry whose segment was deleted before recovery started replaying. Only recovery
    /// creates these; it refuses to open if any remains in the live log.
    pub const MISSING: Self = Self {
        segment_seq: u32::MAX,
        offset: 0,
        record_bytes: 0,
    };

    pub fn is_missing(&self) -> bool {
        self.segment_seq == u32::MAX
    }
}

/// A term not known, for entries in deleted segments during recovery.
const TERM_UNKNOWN: Term = Term::MAX;

#[derive(Clone, Debug, Default)]
pub(crate) struct LogIndex {
    /// Every entry up to and including this one is gone; its term is still known.
    pub compacted: EntryId,
    /// Invariant: `locations[i]` is the entry at index `compacted.index + 1 + i`.
    locations: VecDeque<EntryLocation>,
    /// `(first index, term)` for each run of equal terms among the live entries, ascending.
    /// Invariant: empty iff `locations` is; the first run starts at or before the first live
    /// index.
    term_runs: VecDeque<(Index, Term)>,
    pub hard_state: HardState,
    pub snapshot: Option<SnapshotRef>,
}

impl LogIndex {
    /// The index as a checkpoint describes it: entries `(compacted, last]` exist but lie in
    /// segments that are not being replayed.
    pub fn from_checkpoint(
        compacted: EntryId,
        last: EntryId,
        hard_state: HardState,
        snapshot: Option<SnapshotRef>,
    ) -> Self {
        assert!(
            last.index >= compacted.index,
            "checkpoint last before compacted"
        );
        let mut index = Self {
            compacted,
            hard_state,
            snapshot,
            ..Self::default()
        };
        if last.index > compacted.index {
            let count = (last.index - compacted.index) as usize;
            index.locations = VecDeque::from(vec![EntryLocation::MISSING; count]);
            if count > 1 {
                index
                    .term_runs
                    .push_back((compacted.index + 1, TERM_UNKNOWN));
            }
            index.term_runs.push_back((last.index, last.term));
        }
        index
    }

    pub fn first_index(&self) -> Index {
        self.compacted.index + 1
    }

    pub fn last_index(&self) -> Index {
        self.compacted.index + self.locations.len() as u64
    }

    pub fn last_id(&self) -> EntryId {
        let last = self.last_index();
        EntryId::new(self.term(last).expect("the last index has a term"), last)
    }

    /// The term of `index`, answering for the compaction point too (as `MemStorage` does).
    pub fn term(&self, index: Index) -> Result<Term, StorageError> {
        if index == self.compacted.index {
            return Ok(self.compacted.term);
        }
        if index < self.compacted.index {
            return Err(StorageError::Compacted {
                index,
                first_index: self.first_index(),
            });
        }
        if index > self.last_index() {
            return Err(StorageError::Unavailable {
                index,
                last_index: self.last_index(),
            });
        }
        let run = self.term_runs.partition_point(|&(first, _)| first <= index);
        assert!(run > 0, "no term run covers index {index}");
        Ok(self.term_runs[run - 1].1)
    }

    pub fn location(&self, index: Index) -> Option<EntryLocation> {
        let offset = index.checked_sub(self.first_index())?;
        self.locations.get(offset as usize).copied()
    }

    /// The first live entry that lies in a deleted segment, if any.
    pub fn first_missing(&self) -> Option<Index> {
        let position = self.locations.iter().position(EntryLocation::is_missing)?;
        Some(self.first_index() + position as u64)
    }

    /// The last live entry that lies in a deleted segment, if any.
    pub fn last_missing(&self) -> Option<Index> {
        let position = self.locations.iter().rposition(EntryLocation::is_missing)?;
        Some(self.first_index() + position as u64)
    }

    /// Where the last live entry in segment `seq` ends (offset + record bytes); `None` if the
    /// segment holds no live entry. Locations ascend by (segment, offset), so this is a
    /// binary search.
    pub fn segment_end(&self, seq: u32) -> Option<u64> {
        let after = self.locations.partition_point(|l| l.segment_seq <= seq);
        let last = self.locations.get(after.checked_sub(1)?)?;
        (last.segment_seq == seq).then(|| u64::from(last.offset) + u64::from(last.record_bytes))
    }

    /// The segment of the first live entry: every older segment holds nothing live.
    pub fn first_live_segment(&self) -> Option<u32> {
        self.locations.front().map(|location| location.segment_seq)
    }

    /// Appends an entry, first removing any entry at or after its index.
    pub fn append(&mut self, id: EntryId, location: EntryLocation) -> Result<(), String> {
        if id.index <= self.compacted.index || id.index > self.last_index() + 1 {
            return Err(format!(
                "entry {id} does not follow the log (compacted through {}, last index {})",
                self.compacted.index,
                self.last_index()
            ));
        }
        self.truncate_after(id.index - 1);
        if let Some(&previous) = self.locations.back() {
            debug_assert!(
                previous.is_missing()
                    || (previous.segment_seq, previous.offset)
                        < (location.segment_seq, location.offset),
                "entry records go forwards in the log"
            );
        }
        self.locations.push_back(location);
        if self.term_runs.back().map(|&(_, term)| term) != Some(id.term) {
            self.term_runs.push_back((id.index, id.term));
        }
        Ok(())
    }

    /// Removes the entries after `last` (a no-op if there are none).
    fn truncate_after(&mut self, last: Index) {
        assert!(
            last >= self.compacted.index,
            "truncation below the compaction point"
        );
        let keep = (last - self.compacted.index) as usize;
        self.locations.truncate(keep);
        while self
            .term_runs
            .back()
            .is_some_and(|&(first, _)| first > last)
        {
            self.term_runs.pop_back();
        }
    }

    /// Discards the entries up to and including `to`.
    pub fn compact(&mut self, to: EntryId) -> Result<(), String> {
        if to.index <= self.compacted.index || to.index > self.last_index() {
            return Err(format!(
                "compaction to {to} is outside the log ({}..={})",
                self.first_index(),
                self.last_index()
            ));
        }
        let term = self.term(to.index).expect("inside the log");
        if term != TERM_UNKNOWN && term != to.term {
            return Err(format!(
                "compaction to {to} but the log has term {term} there"
            ));
        }
        self.discard_through(to);
        Ok(())
    }

    fn discard_through(&mut self, to: EntryId) {
        let drop = (to.index - self.compacted.index).min(self.locations.len() as u64);
        self.locations.drain(..drop as usize);
        self.compacted = to;
        if self.locations.is_empty() {
            self.term_runs.clear();
            return;
        }
        let first = self.first_index();
        while self.term_runs.len() >= 2 && self.term_runs[1].0 <= first {
            self.term_runs.pop_front();
        }
    }

    /// Makes `snapshot` current and keeps only the entries in `(snapshot.last, keep_through]`.
    pub fn install_snapshot(
        &mut self,
        snapshot: SnapshotRef,
        keep_through: Index,
    ) -> Result<(), String> {
        let last = snapshot.meta.last;
        if last.index < self.compacted.index || keep_through < last.index {
            return Err(format!(
                "snapshot {last} with keep_through {keep_through} does not fit the log \
                 (compacted through {})",
                self.compacted.index
            ));
        }
        if keep_through < self.last_index() {
            self.truncate_after(keep_through.max(self.compacted.index));
        }
        self.discard_through(last);
        self.snapshot = Some(snapshot);
        Ok(())
    }

    /// Records a snapshot the state machine saved; the log is untouched.
    pub fn save_snapshot(&mut self, snapshot: SnapshotRef) -> Result<(), String> {
        let current = self.snapshot.as_ref().map_or(0, |s| s.meta.last.index);
        let index = snapshot.meta.last.index;
        if index < current || index < self.compacted.index || index > self.last_index() {
            return Err(format!(
                "snapshot at {index} is older than the current snapshot at {current} or outside \
                 the log ({}..={})",
                self.compacted.index,
                self.last_index()
            ));
        }
        self.snapshot = Some(snapshot);
        Ok(())
    }

    /// Checks the cheap invariants; called after every batch and at the end of recovery.
    pub fn check_invariants(&self) {
        assert_eq!(self.locations.is_empty(), self.term_runs.is_empty());
        if let Some(&(first, _)) = self.term_runs.front() {
            assert!(
                first <= self.first_index(),
                "first term run starts too late"
            );
        }
        if let Some(snapshot) = &self.snapshot {
            assert!(snapshot.meta.last.index >= self.compacted.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u32) -> EntryLocation {
        EntryLocation {
            segment_seq: 1,
            offset,
            record_bytes: 8,
        }
    }

    #[test]
    fn append_truncate_compact_and_terms() {
        let mut log = LogIndex::default();
        for (i, term) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)] {
            log.append(EntryId::new(term, i), at(i as u32 * 8)).unwrap();
        }
        assert_eq!(log.last_id(), EntryId::new(3, 5));
        assert_eq!(log.term(3), Ok(2));
        log.append(EntryId::new(4, 3), at(100)).unwrap();
        assert_eq!(log.last_id(), EntryId::new(4, 3));
        assert_eq!(log.term(2), Ok(1));
        assert!(log.append(EntryId::new(4, 5), at(108)).is_err(), "gap");
        log.compact(EntryId::new(1, 2)).unwrap();
        assert_eq!(log.term(2), Ok(1));
        assert_eq!(
            log.term(1),
            Err(StorageError::Compacted {
                index: 1,
                first_index: 3
            })
        );
        assert_eq!(log.term(3), Ok(4));
        assert!(log.compact(EntryId::new(9, 3)).is_err(), "wrong term");
        log.check_invariants();
    }

    #[test]
    fn a_checkpoint_knows_the_last_term_but_not_the_entries() {
        let log = LogIndex::from_checkpoint(
            EntryId::new(1, 10),
            EntryId::new(3, 15),
            HardState::default(),
            None,
        );
        assert_eq!(log.last_id(), EntryId::new(3, 15));
        assert_eq!(log.first_missing(), Some(11));
        assert_eq!(log.last_missing(), Some(15));
        assert_eq!(log.term(10), Ok(1));
    }
}

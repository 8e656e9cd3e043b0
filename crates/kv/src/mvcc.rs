//! The multi-version keyspace (etcd-api.md §1.3): every key's versions since the last
//! compaction, the store revision, and a log of which keys changed at each revision.
//!
//! Layout, chosen for memory per key revision:
//! - `keys`: key -> [`KeyHistory`], the key's versions oldest first, one per revision at most.
//!   A deletion is a tombstone version (`version == 0`).
//! - `changes`: for each revision from `changes_first_revision` to the current one, the keys
//!   changed at it, in the order they changed. Revisions only advance when something changes,
//!   so this is dense and indexed by revision. It lets a watcher on a wide range catch up
//!   without scanning every key.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use flotilla_proto::mvccpb::{Event, KeyValue, event::EventType};

use crate::error::{ErrorKind, KvError};
use crate::key_range::KeyRange;

/// The first revision any write gets: the store starts at revision 1 (etcd-api.md §1.3).
const FIRST_WRITE_REVISION: i64 = 2;

/// What one stored version costs beyond its key and value bytes, for `Keyspace::size_bytes`:
/// the version's fixed fields, its place in the key's history and in the change log.
pub const VERSION_OVERHEAD_BYTES: u64 = 64;

/// The bytes one version of `key` with `value` counts for in `Keyspace::size_bytes`.
pub fn version_cost_bytes(key_bytes: usize, value_bytes: usize) -> u64 {
    key_bytes as u64 + value_bytes as u64 + VERSION_OVERHEAD_BYTES
}

/// One version of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyVersion {
    pub mod_revision: i64,
    pub create_revision: i64,
    /// 0 marks a tombstone.
    pub version: i64,
    pub lease: i64,
    /// Position of this change among the changes of its revision (one txn changes many keys).
    pub sub_revision: u32,
    pub value: Bytes,
}

impl KeyVersion {
    pub fn is_tombstone(&self) -> bool {
        self.version == 0
    }

    pub fn to_key_value(&self, key: &Bytes) -> KeyValue {
        debug_assert!(!self.is_tombstone());
        KeyValue {
            key: key.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.clone(),
            lease: self.lease,
        }
    }
}

/// A key's versions, strictly increasing in `mod_revision`; never empty while in the map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct KeyHistory {
    versions: Vec<KeyVersion>,
}

impl KeyHistory {
    /// Builds a history from restored versions, checking the ordering invariant.
    pub fn from_versions(versions: Vec<KeyVersion>) -> Result<KeyHistory, String> {
        if versions.is_empty() {
            return Err("a key has no versions".into());
        }
        if !versions
            .windows(2)
            .all(|pair| pair[0].mod_revision < pair[1].mod_revision)
        {
            return Err("versions are not in increasing revision order".into());
        }
        Ok(KeyHistory { versions })
    }

    /// Index of the newest version at or before `revision`.
    fn position_at(&self, revision: i64) -> Option<usize> {
        let newer_start = self
            .versions
            .partition_point(|version| version.mod_revision <= revision);
        newer_start.checked_sub(1)
    }

    /// The key's value as of `revision`, if it existed then.
    pub fn live_at(&self, revision: i64) -> Option<&KeyVersion> {
        let position = self.position_at(revision)?;
        Some(&self.versions[position]).filter(|version| !version.is_tombstone())
    }

    pub fn latest_live(&self) -> Option<&KeyVersion> {
        self.versions
            .last()
            .filter(|version| !version.is_tombstone())
    }

    fn push(&mut self, version: KeyVersion) {
        if let Some(last) = self.versions.last() {
            // The txn duplicate-key check guarantees one change per key per revision.
            assert!(
                last.mod_revision < version.mod_revision,
                "key changed twice at revision {}",
                version.mod_revision
            );
        }
        // Most keys have one or two versions: grow exactly while small, so a single-version
        // key costs one element, not the four a first push would allocate.
        if self.versions.len() < 4 {
            self.versions.reserve_exact(1);
        }
        self.versions.push(version);
    }

    /// Where the versions a compaction at `revision` keeps begin: the version visible at
    /// `revision` stays (reading at the compaction revision is allowed) unless it is a
    /// tombstone older than `revision`, which nothing can read; everything older goes.
    ///
    /// A tombstone *at* the compaction revision stays (until a later compaction): a watcher may
    /// start at the compaction revision (etcd's clients restart a compacted watch from
    /// `compact_revision`), and its history must then hold that revision's delete event. The
    /// simulator's watch check found it missing when it was dropped here.
    fn retained_start(&self, revision: i64) -> usize {
        match self.position_at(revision) {
            None => 0,
            Some(position)
                if self.versions[position].is_tombstone()
                    && self.versions[position].mod_revision < revision =>
            {
                position + 1
            }
            Some(position) => position,
        }
    }

    /// The versions a compaction at `revision` keeps (all of them once it has run; while a
    /// snapshot defers it, the older ones are still here but no longer part of the state).
    pub fn retained(&self, compacted_revision: i64) -> &[KeyVersion] {
        &self.versions[self.retained_start(compacted_revision)..]
    }

    /// What this key's versions count for in `Keyspace::size_bytes`.
    fn cost_bytes(&self, key: &[u8]) -> u64 {
        self.versions
            .iter()
            .map(|version| version_cost_bytes(key.len(), version.value.len()))
            .sum()
    }

    /// Drops versions not needed to read at `revision` or later. Returns false when nothing is
    /// left (the key was deleted at or before `revision`), and the bytes dropped (as
    /// `Keyspace::size_bytes` counts them).
    fn compact(&mut self, key: &[u8], revision: i64) -> (bool, u64) {
        let keep_from = self.retained_start(revision);
        let dropped_bytes = self
            .versions
            .drain(..keep_from)
            .map(|version| version_cost_bytes(key.len(), version.value.len()))
            .sum();
        if self.versions.capacity() > 2 * self.versions.len() {
            self.versions.shrink_to_fit();
        }
        (!self.versions.is_empty(), dropped_bytes)
    }

    /// The watch event for the version at `position`, with `prev_kv` when the version before it
    /// is kept by the compaction at `compacted_revision` and live.
    fn event_at(&self, key: &Bytes, position: usize, compacted_revision: i64) -> Event {
        let version = &self.versions[position];
        let prev_kv = position
            .checked_sub(1)
            .filter(|&previous| previous >= self.retained_start(compacted_revision))
            .map(|previous| &self.versions[previous])
            .filter(|previous| !previous.is_tombstone())
            .map(|previous| previous.to_key_value(key));
        if version.is_tombstone() {
            delete_event(key, version.mod_revision, prev_kv)
        } else {
            put_event(version.to_key_value(key), prev_kv)
        }
    }
}

fn put_event(kv: KeyValue, prev_kv: Option<KeyValue>) -> Event {
    Event {
        r#type: EventType::Put as i32,
        kv: Some(kv),
        prev_kv,
    }
}

/// A DELETE event's kv holds only the key and the delete's revision (etcd-api.md §1.2).
fn delete_event(key: &Bytes, revision: i64, prev_kv: Option<KeyValue>) -> Event {
    Event {
        r#type: EventType::Delete as i32,
        kv: Some(KeyValue {
            key: key.clone(),
            mod_revision: revision,
            ..KeyValue::default()
        }),
        prev_kv,
    }
}

/// The changes of one write request, made at `revision` = current + 1. They are visible to
/// later reads of the same request at once; the store revision moves when the write commits,
/// and only if something changed.
#[derive(Debug)]
pub(crate) struct PendingWrite {
    revision: i64,
    changed_keys: Vec<Bytes>,
    events: Vec<Event>,
}

impl PendingWrite {
    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn has_changes(&self) -> bool {
        !self.changed_keys.is_empty()
    }

    /// The revision a read inside this write sees: its own changes once it has made some.
    pub fn view_revision(&self) -> i64 {
        if self.has_changes() {
            self.revision
        } else {
            self.revision - 1
        }
    }

    fn next_sub_revision(&self) -> u32 {
        u32::try_from(self.changed_keys.len()).expect("fewer than 2^32 changes per revision")
    }
}

/// A batch of watch events and where to continue from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventBatch {
    /// In revision order, each with `prev_kv` when the previous version is kept.
    pub events: Vec<Event>,
    /// The revision to ask from next; `current_revision + 1` (or the start, if later) when the
    /// history is exhausted.
    pub next_revision: i64,
}

/// How many revisions one `events_since` call examines at most, so a watcher far behind on a
/// narrow range cannot make one call scan the whole history.
pub const EVENT_SCAN_REVISIONS_MAX: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Keyspace {
    keys: BTreeMap<Bytes, KeyHistory>,
    changes: VecDeque<Box<[Bytes]>>,
    changes_first_revision: i64,
    current_revision: i64,
    /// Reads below it are refused. The versions it drops leave `keys` at once, except while a
    /// snapshot is pinned: then they stay (unseen: every reader goes through `retained`) until
    /// the pin is released, so the snapshot can still read its revision.
    compacted_revision: i64,
    /// The compaction the versions in `keys` have had: `compacted_revision` unless pinned.
    versions_compacted_revision: i64,
    /// The pins of the snapshots reading the versions in steps (a Raft snapshot, backups,
    /// hashes): while any is held, versions may be added, not removed.
    pins: BTreeSet<u64>,
    /// The sum of [`version_cost_bytes`] over every version in `keys` (what the space quota
    /// measures): it grows with each write and shrinks only when a compaction drops versions.
    size_bytes: u64,
}

impl Default for Keyspace {
    fn default() -> Self {
        Keyspace {
            keys: BTreeMap::new(),
            changes: VecDeque::new(),
            changes_first_revision: FIRST_WRITE_REVISION,
            current_revision: FIRST_WRITE_REVISION - 1,
            compacted_revision: 0,
            versions_compacted_revision: 0,
            pins: BTreeSet::new(),
            size_bytes: 0,
        }
    }
}

impl Keyspace {
    pub fn current_revision(&self) -> i64 {
        self.current_revision
    }

    pub fn compacted_revision(&self) -> i64 {
        self.compacted_revision
    }

    /// The bytes the stored versions count for (see `Keyspace::size_bytes` on the field).
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Keys with any history; while a snapshot defers a compaction, also the keys it empties.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Every key's versions kept by the compaction at `compacted_revision` (at or after the
    /// current one), in key order from `from` (from the first key if `None`); keys with none
    /// kept are skipped.
    pub fn histories_from<'a>(
        &'a self,
        from: Option<&'a Bytes>,
        compacted_revision: i64,
    ) -> impl Iterator<Item = (&'a Bytes, &'a [KeyVersion])> + 'a {
        use std::ops::Bound;
        debug_assert!(compacted_revision >= self.versions_compacted_revision);
        let start = from.map_or(Bound::Unbounded, Bound::Included);
        self.keys
            .range::<Bytes, _>((start, Bound::Unbounded))
            .map(move |(key, history)| (key, history.retained(compacted_revision)))
            .filter(|(_, versions)| !versions.is_empty())
    }

    /// Holds every version in place until [`Keyspace::unpin`] with the same `pin`: a
    /// compaction meanwhile only moves `compacted_revision`. Several pins may be held at once.
    pub fn pin(&mut self, pin: u64) {
        let new = self.pins.insert(pin);
        assert!(new, "pin {pin} is already held");
    }

    /// Whether `pin` is held (false once released, or on another keyspace).
    pub fn is_pinned_by(&self, pin: u64) -> bool {
        self.pins.contains(&pin)
    }

    /// Releases `pin`; once no pin is held, drops the versions a compaction meanwhile left in
    /// place. Does nothing if `pin` is not held.
    pub fn unpin(&mut self, pin: u64) {
        if !self.pins.remove(&pin) {
            return;
        }
        if self.pins.is_empty() && self.versions_compacted_revision < self.compacted_revision {
            self.drop_compacted_versions();
        }
    }

    /// Checks a requested read revision (etcd-api.md §1.4): <= 0 means `latest`; above the
    /// current revision is a future revision; below the compaction point is compacted (reading
    /// *at* it is allowed).
    pub fn check_read_revision(&self, requested: i64, latest: i64) -> Result<i64, KvError> {
        if requested <= 0 {
            return Ok(latest);
        }
        if requested > self.current_revision {
            return Err(KvError::with_detail(
                ErrorKind::FutureRevision,
                format!(
                    "asked for revision {requested}, current is {}",
                    self.current_revision
                ),
            ));
        }
        if requested < self.compacted_revision {
            return Err(compacted_error(requested, self.compacted_revision));
        }
        Ok(requested)
    }

    pub fn live_at(&self, key: &[u8], revision: i64) -> Option<&KeyVersion> {
        self.keys.get(key)?.live_at(revision)
    }

    /// The keys that existed at `revision` within `range`, in key order.
    pub fn live_range<'a>(
        &'a self,
        range: KeyRange<'a>,
        revision: i64,
    ) -> impl Iterator<Item = (&'a Bytes, &'a KeyVersion)> + 'a {
        range
            .bounds()
            .into_iter()
            .flat_map(move |bounds| self.keys.range::<[u8], _>(bounds))
            .filter_map(move |(key, history)| Some((key, history.live_at(revision)?)))
    }

    pub fn begin_write(&self) -> PendingWrite {
        PendingWrite {
            revision: self.current_revision + 1,
            changed_keys: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Writes `key` at the pending revision. Returns the key as stored (to share its
    /// allocation) and the previous live value, if any.
    pub fn put(
        &mut self,
        write: &mut PendingWrite,
        key: Bytes,
        value: Bytes,
        lease: i64,
    ) -> (Bytes, Option<KeyValue>) {
        assert_eq!(write.revision, self.current_revision + 1);
        let revision = write.revision;
        let sub_revision = write.next_sub_revision();
        let (map_key, history) = match self.keys.entry(key) {
            Entry::Occupied(entry) => (entry.key().clone(), entry.into_mut()),
            Entry::Vacant(entry) => {
                let map_key = entry.key().clone();
                (map_key, entry.insert(KeyHistory::default()))
            }
        };
        let prev_kv = history
            .latest_live()
            .map(|previous| previous.to_key_value(&map_key));
        let (create_revision, version) = match &prev_kv {
            Some(previous) => (previous.create_revision, previous.version + 1),
            None => (revision, 1),
        };
        let new_version = KeyVersion {
            mod_revision: revision,
            create_revision,
            version,
            lease,
            sub_revision,
            value,
        };
        let event = put_event(new_version.to_key_value(&map_key), prev_kv.clone());
        self.size_bytes += version_cost_bytes(map_key.len(), new_version.value.len());
        history.push(new_version);
        write.events.push(event);
        write.changed_keys.push(map_key.clone());
        (map_key, prev_kv)
    }

    /// Deletes `key` at the pending revision if it is live. Returns its previous value.
    pub fn delete(&mut self, write: &mut PendingWrite, key: &[u8]) -> Option<KeyValue> {
        assert_eq!(write.revision, self.current_revision + 1);
        let (map_key, history) = self.keys.get_key_value(key)?;
        let prev_kv = history.latest_live()?.to_key_value(map_key);
        let map_key = map_key.clone();
        let tombstone = KeyVersion {
            mod_revision: write.revision,
            create_revision: 0,
            version: 0,
            lease: 0,
            sub_revision: write.next_sub_revision(),
            value: Bytes::new(),
        };
        self.size_bytes += version_cost_bytes(map_key.len(), 0);
        self.keys
            .get_mut(key)
            .expect("key found just above")
            .push(tombstone);
        write.events.push(delete_event(
            &map_key,
            write.revision,
            Some(prev_kv.clone()),
        ));
        write.changed_keys.push(map_key);
        Some(prev_kv)
    }

    /// Ends a write: the revision advances by one if anything changed. Returns its events.
    pub fn commit(&mut self, write: PendingWrite) -> Vec<Event> {
        assert_eq!(write.revision, self.current_revision + 1);
        if write.has_changes() {
            self.current_revision = write.revision;
            self.changes
                .push_back(write.changed_keys.into_boxed_slice());
        }
        assert_eq!(
            self.changes_first_revision + self.changes.len() as i64,
            self.current_revision + 1,
            "the change log covers every revision since the compaction point"
        );
        write.events
    }

    /// Drops history before `revision`; every key's value as of `revision` stays readable.
    pub fn compact(&mut self, revision: i64) {
        assert!(revision > self.compacted_revision && revision <= self.current_revision);
        while self.changes_first_revision < revision {
            self.changes
                .pop_front()
                .expect("change log covers the revision");
            self.changes_first_revision += 1;
        }
        self.compacted_revision = revision;
        if self.pins.is_empty() {
            self.drop_compacted_versions();
        }
    }

    fn drop_compacted_versions(&mut self) {
        let revision = self.compacted_revision;
        let mut dropped_bytes = 0;
        self.keys.retain(|key, history| {
            let (kept, dropped) = history.compact(key, revision);
            dropped_bytes += dropped;
            kept
        });
        self.size_bytes = self
            .size_bytes
            .checked_sub(dropped_bytes)
            .expect("a compaction drops only counted versions");
        self.versions_compacted_revision = revision;
    }

    /// Events at revisions >= `start_revision` on keys in `range`, whole revisions at a time,
    /// until at least `events_max` events or [`EVENT_SCAN_REVISIONS_MAX`] revisions.
    pub fn events_since(
        &self,
        start_revision: i64,
        range: KeyRange<'_>,
        events_max: usize,
    ) -> Result<EventBatch, KvError> {
        if start_revision < self.compacted_revision {
            return Err(compacted_error(start_revision, self.compacted_revision));
        }
        let start = start_revision.max(self.changes_first_revision);
        match range {
            KeyRange::Single(key) => Ok(self.key_events_since(key, start, events_max)),
            _ => Ok(self.range_events_since(start, range, events_max)),
        }
    }

    fn key_events_since(&self, key: &[u8], start: i64, events_max: usize) -> EventBatch {
        let mut batch = EventBatch {
            events: Vec::new(),
            next_revision: (self.current_revision + 1).max(start),
        };
        let Some((map_key, history)) = self.keys.get_key_value(key) else {
            return batch;
        };
        let first = history
            .versions
            .partition_point(|version| version.mod_revision < start);
        for position in first..history.versions.len() {
            if batch.events.len() >= events_max.max(1) {
                batch.next_revision = history.versions[position].mod_revision;
                break;
            }
            batch
                .events
                .push(history.event_at(map_key, position, self.compacted_revision));
        }
        batch
    }

    fn range_events_since(&self, start: i64, range: KeyRange<'_>, events_max: usize) -> EventBatch {
        let mut batch = EventBatch {
            events: Vec::new(),
            next_revision: (self.current_revision + 1).max(start),
        };
        let first_offset = (start - self.changes_first_revision) as usize;
        for (scanned, offset) in (first_offset..self.changes.len()).enumerate() {
            let revision = self.changes_first_revision + offset as i64;
            if batch.events.len() >= events_max.max(1) || scanned >= EVENT_SCAN_REVISIONS_MAX {
                batch.next_revision = revision;
                break;
            }
            for key in self.changes[offset].iter() {
                if range.contains(key) {
                    batch.events.extend(self.event_at_revision(key, revision));
                }
            }
        }
        batch
    }

    fn event_at_revision(&self, key: &[u8], revision: i64) -> Option<Event> {
        let (map_key, history) = self.keys.get_key_value(key)?;
        // A change before the compaction revision may still be here but dropped (while a
        // snapshot defers the compaction): the same to a reader as gone.
        let retained_start = history.retained_start(self.compacted_revision);
        let position = retained_start
            + history.versions[retained_start..]
                .binary_search_by_key(&revision, |version| version.mod_revision)
                .ok()?;
        Some(history.event_at(map_key, position, self.compacted_revision))
    }

    /// Rebuilds a keyspace from restored parts, checking what can be checked cheaply.
    pub fn from_parts(
        keys: BTreeMap<Bytes, KeyHistory>,
        current_revision: i64,
        compacted_revision: i64,
    ) -> Result<Keyspace, String> {
        if current_revision < FIRST_WRITE_REVISION - 1 {
            return Err(format!("current revision {current_revision} is below 1"));
        }
        if compacted_revision < 0 || compacted_revision > current_revision {
            return Err(format!(
                "compacted revision {compacted_revision} is outside 0..={current_revision}"
            ));
        }
        let changes_first_revision = compacted_revision.max(FIRST_WRITE_REVISION);
        let revisions = (current_revision + 1 - changes_first_revision) as usize;
        // Every revision after the compaction point keeps at least one version, so a header
        // claiming more revisions than there are versions is corrupt (and must not make us
        // allocate for it).
        let versions: usize = keys.values().map(|history| history.versions.len()).sum();
        if revisions > versions + 1 {
            return Err(format!(
                "{revisions} revisions since the compaction point but only {versions} versions"
            ));
        }
        let mut changes: Vec<Vec<(u32, Bytes)>> = vec![Vec::new(); revisions];
        for (key, history) in &keys {
            for version in &history.versions {
                if version.mod_revision > current_revision {
                    return Err(format!(
                        "key {key:?} has revision {} above the current {current_revision}",
                        version.mod_revision
                    ));
                }
                if version.mod_revision >= changes_first_revision {
                    let offset = (version.mod_revision - changes_first_revision) as usize;
                    changes[offset].push((version.sub_revision, key.clone()));
                }
            }
        }
        let changes = changes
            .into_iter()
            .map(|mut revision_changes| {
                revision_changes.sort_unstable_by_key(|(sub_revision, _)| *sub_revision);
                revision_changes.into_iter().map(|(_, key)| key).collect()
            })
            .collect();
        let size_bytes = keys
            .iter()
            .map(|(key, history)| history.cost_bytes(key))
            .sum();
        Ok(Keyspace {
            keys,
            changes,
            changes_first_revision,
            current_revision,
            compacted_revision,
            versions_compacted_revision: compacted_revision,
            pins: BTreeSet::new(),
            size_bytes,
        })
    }
}

pub(crate) fn compacted_error(requested: i64, compacted: i64) -> KvError {
    KvError::with_detail(
        ErrorKind::Compacted,
        format!("asked for revision {requested}, compacted at {compacted}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(keyspace: &mut Keyspace, key: &str, value: &str) -> i64 {
        let mut write = keyspace.begin_write();
        keyspace.put(
            &mut write,
            Bytes::copy_from_slice(key.as_bytes()),
            Bytes::copy_from_slice(value.as_bytes()),
            0,
        );
        keyspace.commit(write);
        keyspace.current_revision()
    }

    fn delete(keyspace: &mut Keyspace, key: &str) -> i64 {
        let mut write = keyspace.begin_write();
        keyspace.delete(&mut write, key.as_bytes());
        keyspace.commit(write);
        keyspace.current_revision()
    }

    /// §1.3: the store starts at revision 1 and each write raises it by one.
    #[test]
    fn revisions_start_at_one_and_advance_per_write() {
        let mut keyspace = Keyspace::default();
        assert_eq!(keyspace.current_revision(), 1);
        assert_eq!(put(&mut keyspace, "a", "1"), 2);
        assert_eq!(put(&mut keyspace, "b", "1"), 3);
    }

    /// §1.3: a delete that matches nothing changes nothing.
    #[test]
    fn empty_write_keeps_the_revision() {
        let mut keyspace = Keyspace::default();
        put(&mut keyspace, "a", "1");
        assert_eq!(delete(&mut keyspace, "missing"), 2);
    }

    /// §1.2: version is 1 at creation, +1 per put, and a delete resets it; a re-created key
    /// gets a new create_revision.
    #[test]
    fn versions_and_create_revisions() {
        let mut keyspace = Keyspace::default();
        put(&mut keyspace, "k", "1");
        put(&mut keyspace, "k", "1");
        let live = keyspace.live_at(b"k", 3).unwrap();
        assert_eq!(
            (live.version, live.create_revision, live.mod_revision),
            (2, 2, 3)
        );
        delete(&mut keyspace, "k");
        assert!(keyspace.live_at(b"k", 4).is_none());
        put(&mut keyspace, "k", "2");
        let live = keyspace.live_at(b"k", 5).unwrap();
        assert_eq!((live.version, live.create_revision), (1, 5));
        // History stays readable.
        assert_eq!(keyspace.live_at(b"k", 2).unwrap().version, 1);
    }

    /// §1.4: compaction keeps the value as of the compaction revision.
    #[test]
    fn compaction_keeps_the_state_at_its_revision() {
        let mut keyspace = Keyspace::default();
        put(&mut keyspace, "a", "1"); // 2
        put(&mut keyspace, "a", "2"); // 3
        put(&mut keyspace, "b", "1"); // 4
        delete(&mut keyspace, "b"); // 5
        put(&mut keyspace, "a", "3"); // 6
        keyspace.compact(5);
        assert_eq!(keyspace.live_at(b"a", 5).unwrap().value, "2");
        assert!(
            keyspace.live_at(b"a", 2).is_none(),
            "older versions are gone"
        );
        assert!(keyspace.live_at(b"b", 5).is_none());
        let watched = keyspace
            .events_since(5, KeyRange::new(b"a", b"\0"), 10)
            .unwrap();
        let types: Vec<_> = watched.events.iter().map(|event| event.r#type).collect();
        assert_eq!(
            types,
            vec![EventType::Delete as i32, EventType::Put as i32],
            "a watcher from the compaction revision sees its delete"
        );
        assert_eq!(keyspace.keys[&b"a"[..]].versions.len(), 2);
        assert!(keyspace.check_read_revision(4, 6).is_err());
        assert_eq!(keyspace.check_read_revision(5, 6), Ok(5));
        keyspace.compact(6);
        assert!(
            !keyspace.keys.contains_key(&b"b"[..]),
            "a deleted key is dropped once its delete is older than the compaction"
        );
    }

    #[test]
    fn events_since_walks_revisions_in_order_with_prev_kv() {
        let mut keyspace = Keyspace::default();
        put(&mut keyspace, "a", "1"); // 2
        put(&mut keyspace, "b", "1"); // 3
        put(&mut keyspace, "a", "2"); // 4
        delete(&mut keyspace, "a"); // 5
        let all = KeyRange::new(b"a", b"\0");
        let batch = keyspace.events_since(3, all, 100).unwrap();
        let revisions: Vec<_> = batch
            .events
            .iter()
            .map(|event| event.kv.as_ref().unwrap().mod_revision)
            .collect();
        assert_eq!(revisions, vec![3, 4, 5]);
        assert_eq!(batch.next_revision, 6);
        assert_eq!(batch.events[1].prev_kv.as_ref().unwrap().value, "1");
        assert_eq!(batch.events[2].r#type, EventType::Delete as i32);
        assert_eq!(batch.events[2].prev_kv.as_ref().unwrap().value, "2");
        let single = keyspace
            .events_since(2, KeyRange::new(b"a", b""), 2)
            .unwrap();
        assert_eq!(single.events.len(), 2);
        assert_eq!(single.next_revision, 5);
    }

    /// The running size equals the size recounted from the versions, through writes,
    /// deletes, a pinned compaction and its release, and a restore.
    #[test]
    fn size_counts_every_stored_version_until_compaction_drops_it() {
        let recount = |keyspace: &Keyspace| -> u64 {
            keyspace
                .keys
                .iter()
                .map(|(key, history)| history.cost_bytes(key))
                .sum()
        };
        let mut keyspace = Keyspace::default();
        assert_eq!(keyspace.size_bytes(), 0);
        put(&mut keyspace, "a", "1234"); // 2
        assert_eq!(keyspace.size_bytes(), version_cost_bytes(1, 4));
        put(&mut keyspace, "a", "12"); // 3
        put(&mut keyspace, "bb", "1"); // 4
        delete(&mut keyspace, "bb"); // 5
        let before = version_cost_bytes(1, 4) + version_cost_bytes(1, 2);
        let before = before + version_cost_bytes(2, 1) + version_cost_bytes(2, 0);
        assert_eq!(keyspace.size_bytes(), before);
        keyspace.pin(7);
        keyspace.compact(5);
        assert_eq!(keyspace.size_bytes(), before, "a pin holds the versions");
        keyspace.unpin(7);
        // The delete at the compaction revision stays (for watchers starting there).
        assert_eq!(
            keyspace.size_bytes(),
            version_cost_bytes(1, 2) + version_cost_bytes(2, 0)
        );
        assert_eq!(keyspace.size_bytes(), recount(&keyspace));
        let restored = Keyspace::from_parts(keyspace.keys.clone(), 5, 5).unwrap();
        assert_eq!(restored.size_bytes(), keyspace.size_bytes());
    }

    #[test]
    fn restore_refuses_a_revision_count_the_versions_cannot_back() {
        let error = Keyspace::from_parts(BTreeMap::new(), 1_000_000_000_000_000, 0).unwrap_err();
        assert!(error.contains("revisions since the compaction point"));
    }

    #[test]
    fn restored_keyspace_rebuilds_the_change_log() {
        let mut keyspace = Keyspace::default();
        let mut write = keyspace.begin_write();
        keyspace.put(&mut write, "b".into(), "1".into(), 0);
        keyspace.put(&mut write, "a".into(), "1".into(), 0);
        keyspace.commit(write);
        put(&mut keyspace, "c", "1");
        keyspace.compact(3);
        let rebuilt = Keyspace::from_parts(keyspace.keys.clone(), 3, 3).unwrap();
        assert_eq!(rebuilt, keyspace);
    }
}

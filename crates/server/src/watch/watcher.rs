//! One watcher: where it is in the revision sequence, and how it moves on, either live (from
//! its queue, filled by the hub) or catching up (from the store's history).
//!
//! The invariant: every event of the watched range with a revision below `next_revision` has
//! been handed out, exactly once and in order; none at or above it has. Both ways of moving on
//! keep it:
//!
//! - **Live**: revisions come from the queue in order; the first revision queued is the first
//!   one applied after the subscription was made.
//! - **Catching up**: a bounded read of history from `next_revision`, under the state's read
//!   lock. If that read reaches the store's current revision, the watcher subscribes before
//!   the lock is released, so the next revision applied is queued for it: no gap, no overlap.
//!
//! No I/O and no waiting here: the stream task (`stream.rs`) sends what [`Watcher::step`]
//! returns, so the seam and the catch-up are unit-tested without a network.

use std::sync::{Arc, RwLock};

use flotilla_kv::ErrorKind;
use flotilla_proto::etcdserverpb::WatchCreateRequest;
use flotilla_proto::etcdserverpb::watch_create_request::FilterType;
use flotilla_proto::mvccpb::Event;
use flotilla_proto::mvccpb::event::EventType;
use tokio::sync::Notify;

use super::hub::{Drained, SubscriptionId, WatchHub, WatchedRange, WatcherQueue};
use crate::state_machine::StateMachine;

/// Revisions taken from the queue in one step, so one busy watcher cannot hold up the others
/// of its stream.
const LIVE_REVISIONS_PER_STEP: usize = 64;
/// The encoded bytes of events one live batch (one response) gathers from consecutive
/// revisions before a new one starts. A watcher that keeps up gets a response per revision; one
/// that lags gets what queued meanwhile in few responses (as etcd's catch-up batches do),
/// instead of a response per revision that costs the server and the client as much again.
pub const LIVE_BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Events read from history in one step (whole revisions, so possibly a few more), bounding
/// how long the state's read lock is held and how large one response grows.
pub const HISTORY_EVENTS_PER_STEP: usize = 256;

/// What the state and the hub are, for a watcher.
#[derive(Clone, Copy, Debug)]
pub struct Sources<'a> {
    pub state: &'a RwLock<StateMachine>,
    pub hub: &'a WatchHub,
}

impl Sources<'_> {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, StateMachine> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the client asked of one watcher (etcd-api.md §1.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSpec {
    pub watch_id: i64,
    pub range: WatchedRange,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub fragment: bool,
}

impl WatchSpec {
    /// From a create request, with etcd's conventions: an empty key means "\0" (the smallest
    /// key), a `range_end` of "\0" means every key from `key` on.
    pub fn from_request(request: &WatchCreateRequest, watch_id: i64) -> WatchSpec {
        let key = if request.key.is_empty() {
            bytes::Bytes::from_static(b"\0")
        } else {
            request.key.clone()
        };
        let has = |filter: FilterType| request.filters.contains(&(filter as i32));
        WatchSpec {
            watch_id,
            range: WatchedRange {
                key,
                range_end: request.range_end.clone(),
            },
            no_put: has(FilterType::Noput),
            no_delete: has(FilterType::Nodelete),
            prev_kv: request.prev_kv,
            progress_notify: request.progress_notify,
            fragment: request.fragment,
        }
    }

    /// An interval whose end is not after its start holds no key: etcd refuses it.
    pub fn is_empty_range(&self) -> bool {
        self.range.as_key_range().is_empty()
    }

    /// The events this watcher wants, as it wants them.
    fn select(&self, events: &[Event]) -> Vec<Event> {
        let range = self.range.as_key_range();
        events
            .iter()
            .filter(|event| {
                event.kv.as_ref().is_some_and(|kv| range.contains(&kv.key))
                    && !(self.no_put && event.r#type == EventType::Put as i32)
                    && !(self.no_delete && event.r#type == EventType::Delete as i32)
            })
            .map(|event| {
                let mut event = event.clone();
                if !self.prev_kv {
                    event.prev_kv = None;
                }
                event
            })
            .collect()
    }
}

/// Events to send in one response; `revision` is the highest among them.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub revision: i64,
    pub events: Vec<Event>,
}

/// What one step produced.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Batches to send, in order (none if every event was filtered out).
    Batches(Vec<Batch>),
    /// The history this watcher needs is compacted away: cancel it with this compact
    /// revision.
    Compacted(i64),
}

#[derive(Debug)]
pub struct Watcher {
    pub spec: WatchSpec,
    /// The first revision not handed out yet.
    next_revision: i64,
    queue: Arc<WatcherQueue>,
    /// Set while live (subscribed to the hub).
    subscription: Option<SubscriptionId>,
    /// Something was sent since the last progress tick (etcd notifies only quiet watchers).
    pub sent_since_tick: bool,
}

impl Watcher {
    /// Starts a watcher from `start_revision` (0: the next revision). Returns it and the
    /// store's revision at creation, for the `created` response.
    pub fn create(
        spec: WatchSpec,
        start_revision: i64,
        sources: Sources<'_>,
        wake: Arc<Notify>,
    ) -> (Watcher, i64) {
        let mut watcher = Watcher {
            spec,
            next_revision: 0,
            queue: WatcherQueue::new(wake),
            subscription: None,
            sent_since_tick: false,
        };
        let state = sources.read();
        let current = state.kv.current_revision();
        watcher.next_revision = if start_revision > 0 {
            start_revision
        } else {
            current + 1
        };
        // From now (or the future): nothing to read from history; subscribe at once, under the
        // read lock, so no revision after `current` is missed.
        if watcher.next_revision > current {
            watcher.subscribe(sources.hub);
        }
        (watcher, current)
    }

    fn subscribe(&mut self, hub: &WatchHub) {
        self.queue.clear();
        self.subscription = Some(hub.subscribe(self.spec.range.clone(), self.queue.clone()));
    }

    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    pub fn is_live(&self) -> bool {
        self.subscription.is_some()
    }

    /// Live with nothing queued: it has every event up to the store's revision.
    pub fn is_synced(&self) -> bool {
        self.is_live() && self.queue.is_idle()
    }

    /// Something to do now (queued revisions, a fall behind, or history to read).
    pub fn has_work(&self) -> bool {
        !self.is_live() || !self.queue.is_idle()
    }

    /// The highest revision such that every event of this watcher up to it has been handed
    /// out, given the store's current revision. Call under the state's read lock, so nothing
    /// is published meanwhile.
    pub fn delivered_through(&self, current_revision: i64) -> i64 {
        if self.is_synced() {
            current_revision.max(self.next_revision - 1)
        } else {
            self.next_revision - 1
        }
    }

    /// Moves on by a bounded amount of work.
    pub fn step(&mut self, sources: Sources<'_>) -> Step {
        if self.is_live() {
            self.step_live()
        } else {
            self.step_history(sources)
        }
    }

    fn step_live(&mut self) -> Step {
        match self.queue.drain(LIVE_REVISIONS_PER_STEP) {
            Drained::Revisions(revisions) => {
                let mut batches: Vec<Batch> = Vec::new();
                let mut last_batch_bytes = 0;
                for revision in revisions {
                    // A watcher that starts in the future skips what comes before.
                    if revision.revision < self.next_revision {
                        continue;
                    }
                    self.next_revision = revision.revision + 1;
                    let events = self.spec.select(&revision.events);
                    if events.is_empty() {
                        continue;
                    }
                    let bytes: usize = events.iter().map(prost::Message::encoded_len).sum();
                    match batches.last_mut() {
                        Some(batch) if last_batch_bytes + bytes <= LIVE_BATCH_BYTES_MAX => {
                            batch.events.extend(events);
                            batch.revision = revision.revision;
                            last_batch_bytes += bytes;
                        }
                        _ => {
                            batches.push(Batch {
                                revision: revision.revision,
                                events,
                            });
                            last_batch_bytes = bytes;
                        }
                    }
                }
                Step::Batches(batches)
            }
            Drained::FellBehind(revision) => {
                // The hub has already dropped the subscription.
                self.subscription = None;
                self.next_revision = self.next_revision.max(revision);
                Step::Batches(Vec::new())
            }
        }
    }

    fn step_history(&mut self, sources: Sources<'_>) -> Step {
        let state = sources.read();
        let current = state.kv.current_revision();
        let range = &self.spec.range;
        let batch = match state.kv.events_since(
            self.next_revision,
            &range.key,
            &range.range_end,
            HISTORY_EVENTS_PER_STEP,
        ) {
            Ok(batch) => batch,
            Err(error) => {
                debug_assert_eq!(error.kind(), ErrorKind::Compacted);
                return Step::Compacted(state.kv.compacted_revision());
            }
        };
        if batch.next_revision > current {
            // History is exhausted: the seam. Subscribing under the read lock means the first
            // revision queued is `current + 1`.
            self.subscribe(sources.hub);
        }
        drop(state);
        self.next_revision = batch.next_revision;
        let events = self.spec.select(&batch.events);
        match events.last().and_then(|event| event.kv.as_ref()) {
            Some(kv) => {
                let revision = kv.mod_revision;
                Step::Batches(vec![Batch { revision, events }])
            }
            None => Step::Batches(Vec::new()),
        }
    }

    /// Stops the watcher's subscription.
    pub fn close(&mut self, hub: &WatchHub) {
        if let Some(id) = self.subscription.take() {
            hub.unsubscribe(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use flotilla_kv::{Command, Limits};
    use flotilla_proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest};
    use flotilla_raft::{Entry, EntryPayload};

    use super::super::hub::QueueBounds;
    use super::*;
    use crate::members::MemberTable;
    use crate::state_machine::EventSink;

    /// A state machine and a hub, applied to as the apply thread does: under the write lock,
    /// publishing each entry's events before the lock is released.
    struct Store {
        state: RwLock<StateMachine>,
        hub: WatchHub,
        index: u64,
    }

    impl Store {
        fn new(bounds: QueueBounds) -> Store {
            Store {
                state: RwLock::new(StateMachine::new(Limits::default(), MemberTable::default())),
                hub: WatchHub::new(bounds),
                index: 0,
            }
        }

        fn sources(&self) -> Sources<'_> {
            Sources {
                state: &self.state,
                hub: &self.hub,
            }
        }

        fn apply(&mut self, command: Command) -> i64 {
            self.index += 1;
            let entry = Entry {
                term: 1,
                index: self.index,
                payload: EntryPayload::Command(command.encode()),
            };
            let mut state = self.state.write().unwrap();
            let applied = state.apply_entry(&entry);
            if let crate::state_machine::Applied::Kv(result) = &applied
                && !result.events.is_empty()
            {
                self.hub.publish(result.revision, &result.events);
            }
            applied.revision()
        }

        fn put(&mut self, key: &str, value: &str) -> i64 {
            self.apply(Command::put(PutRequest {
                key: Bytes::from(key.to_string()),
                value: Bytes::from(value.to_string()),
                ..Default::default()
            }))
        }

        fn delete(&mut self, key: &str) -> i64 {
            self.apply(Command::delete_range(DeleteRangeRequest {
                key: Bytes::from(key.to_string()),
                ..Default::default()
            }))
        }

        fn compact(&mut self, revision: i64) {
            self.apply(Command::compaction(CompactionRequest {
                revision,
                physical: false,
            }));
        }

        fn watch(&self, key: &str, end: &str, start: i64) -> Watcher {
            let request = WatchCreateRequest {
                key: Bytes::from(key.to_string()),
                range_end: Bytes::from(end.to_string()),
                prev_kv: true,
                ..Default::default()
            };
            let spec = WatchSpec::from_request(&request, 0);
            Watcher::create(spec, start, self.sources(), Arc::new(Notify::new())).0
        }

        /// Steps the watcher until it has nothing to do; the (revision, key) of each event.
        fn drain(&self, watcher: &mut Watcher) -> Vec<(i64, String)> {
            let mut seen = Vec::new();
            for _ in 0..10_000 {
                if !watcher.has_work() {
                    return seen;
                }
                match watcher.step(self.sources()) {
                    Step::Batches(batches) => {
                        for batch in batches {
                            for event in batch.events {
                                let kv = event.kv.unwrap();
                                assert!(kv.mod_revision <= batch.revision);
                                seen.push((
                                    kv.mod_revision,
                                    String::from_utf8_lossy(&kv.key).into_owned(),
                                ));
                            }
                        }
                    }
                    Step::Compacted(at) => panic!("compacted at {at}"),
                }
            }
            panic!("the watcher never settled");
        }
    }

    fn keys_of(seen: &[(i64, String)]) -> Vec<&str> {
        seen.iter().map(|(_, key)| key.as_str()).collect()
    }

    #[test]
    fn a_watch_from_now_sees_only_later_writes() {
        let mut store = Store::new(QueueBounds::default());
        store.put("k", "old");
        let mut watcher = store.watch("k", "", 0);
        assert!(watcher.is_live());
        let revision = store.put("k", "new");
        assert_eq!(store.drain(&mut watcher), vec![(revision, "k".into())]);
    }

    /// History, then live, with writes landing between every step: each revision exactly
    /// once, in order.
    #[test]
    fn history_then_live_without_gap_or_duplicate() {
        let mut store = Store::new(QueueBounds::default());
        let mut expected = Vec::new();
        for i in 0..(3 * HISTORY_EVENTS_PER_STEP) {
            expected.push((store.put(&format!("p/{i:04}"), "v"), format!("p/{i:04}")));
            store.put("other", "v");
        }
        let mut watcher = store.watch("p/", "p0", 1);
        assert!(!watcher.is_live());
        let mut seen = Vec::new();
        let mut i = 0;
        while watcher.has_work() || i < 40 {
            // A write between every step, the seam included.
            let key = format!("p/late{i:03}");
            expected.push((store.put(&key, "v"), key));
            i += 1;
            if let Step::Batches(batches) = watcher.step(store.sources()) {
                for batch in batches {
                    for event in batch.events {
                        let kv = event.kv.unwrap();
                        seen.push((
                            kv.mod_revision,
                            String::from_utf8_lossy(&kv.key).into_owned(),
                        ));
                    }
                }
            }
        }
        assert!(watcher.is_live());
        seen.extend(store.drain(&mut watcher));
        assert_eq!(seen, expected);
    }

    #[test]
    fn filters_and_prev_kv() {
        let mut store = Store::new(QueueBounds::default());
        store.put("a", "1");
        let create = |no_put: bool, prev_kv: bool| {
            let mut filters = Vec::new();
            if no_put {
                filters.push(FilterType::Noput as i32);
            } else {
                filters.push(FilterType::Nodelete as i32);
            }
            let request = WatchCreateRequest {
                key: Bytes::from_static(b"a"),
                filters,
                prev_kv,
                ..Default::default()
            };
            let spec = WatchSpec::from_request(&request, 0);
            Watcher::create(spec, 0, store.sources(), Arc::new(Notify::new())).0
        };
        let mut deletes_only = create(true, true);
        let mut puts_only = create(false, false);
        store.put("a", "2");
        store.delete("a");
        let Step::Batches(deletes) = deletes_only.step(store.sources()) else {
            panic!()
        };
        assert_eq!(deletes.len(), 1);
        let delete = &deletes[0].events[0];
        assert_eq!(delete.r#type, EventType::Delete as i32);
        assert_eq!(delete.prev_kv.as_ref().unwrap().value, "2");
        let Step::Batches(puts) = puts_only.step(store.sources()) else {
            panic!()
        };
        assert_eq!(puts.len(), 1);
        assert_eq!(puts[0].events[0].kv.as_ref().unwrap().value, "2");
        assert_eq!(puts[0].events[0].prev_kv, None, "prev_kv not asked for");
    }

    /// Revisions queued while a watcher was not stepped leave in one response, in order, up to
    /// the batch bound; one that keeps up gets a response per revision.
    #[test]
    fn queued_revisions_are_gathered_into_bounded_batches() {
        let mut store = Store::new(QueueBounds::default());
        let mut watcher = store.watch("k", "", 0);
        let first = store.put("k", "1");
        let Step::Batches(batches) = watcher.step(store.sources()) else {
            panic!()
        };
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].revision, first);

        let revisions: Vec<i64> = (0..5).map(|i| store.put("k", &i.to_string())).collect();
        let Step::Batches(batches) = watcher.step(store.sources()) else {
            panic!()
        };
        assert_eq!(batches.len(), 1, "one response for what queued");
        assert_eq!(batches[0].revision, revisions[4]);
        let got: Vec<i64> = batches[0]
            .events
            .iter()
            .map(|event| event.kv.as_ref().unwrap().mod_revision)
            .collect();
        assert_eq!(got, revisions);

        // Events of a third of the bound (a value and the previous one, as the watch asks for
        // prev_kv): three fit in a batch, not four.
        let value = "v".repeat(LIVE_BATCH_BYTES_MAX / 6 - 64);
        store.put("k", &value);
        watcher.step(store.sources());
        let big: Vec<i64> = (0..7).map(|_| store.put("k", &value)).collect();
        let Step::Batches(batches) = watcher.step(store.sources()) else {
            panic!()
        };
        let shape: Vec<(i64, usize)> = batches
            .iter()
            .map(|b| (b.revision, b.events.len()))
            .collect();
        assert_eq!(shape, vec![(big[2], 3), (big[5], 3), (big[6], 1)]);
        for batch in &batches {
            let bytes: usize = batch.events.iter().map(prost::Message::encoded_len).sum();
            assert!(bytes <= LIVE_BATCH_BYTES_MAX);
        }
    }

    /// A watcher that is not drained falls behind, catches up from history and goes live
    /// again, with every revision exactly once.
    #[test]
    fn a_slow_watcher_catches_up_from_history() {
        let mut store = Store::new(QueueBounds {
            revisions_max: 4,
            bytes_max: usize::MAX,
        });
        let mut watcher = store.watch("k", "", 0);
        let mut expected = Vec::new();
        for i in 0..50 {
            expected.push((store.put("k", &i.to_string()), "k".to_string()));
        }
        assert_eq!(store.hub.subscription_count(), 0, "fell behind");
        let seen = store.drain(&mut watcher);
        assert_eq!(seen, expected);
        assert!(watcher.is_live(), "live again");
        let revision = store.put("k", "after");
        assert_eq!(store.drain(&mut watcher), vec![(revision, "k".into())]);
    }

    /// A watcher that fell behind while the history it needs was compacted is cancelled with
    /// the compact revision, as etcd does.
    #[test]
    fn a_slow_watcher_behind_a_compaction_is_cancelled() {
        let mut store = Store::new(QueueBounds {
            revisions_max: 1,
            bytes_max: usize::MAX,
        });
        let mut watcher = store.watch("k", "", 0);
        let first = store.put("k", "1");
        let missed = store.put("k", "2");
        let last = store.put("k", "3");
        store.compact(last);
        let Step::Batches(batches) = watcher.step(store.sources()) else {
            panic!()
        };
        assert_eq!(batches[0].revision, first);
        assert_eq!(watcher.step(store.sources()), Step::Batches(Vec::new()));
        assert_eq!(watcher.next_revision(), missed);
        assert_eq!(watcher.step(store.sources()), Step::Compacted(last));
    }

    #[test]
    fn a_watch_from_a_compacted_revision_is_cancelled() {
        let mut store = Store::new(QueueBounds::default());
        store.put("k", "1");
        let revision = store.put("k", "2");
        store.compact(revision);
        let mut watcher = store.watch("k", "", revision - 1);
        assert_eq!(watcher.step(store.sources()), Step::Compacted(revision));
        // At the compact revision itself is fine.
        let mut watcher = store.watch("k", "", revision);
        assert_eq!(store.drain(&mut watcher), vec![(revision, "k".into())]);
    }

    #[test]
    fn a_watch_from_the_future_starts_there() {
        let mut store = Store::new(QueueBounds::default());
        let now = store.put("k", "1");
        let mut watcher = store.watch("k", "", now + 3);
        store.put("k", "2");
        store.put("k", "3");
        let revision = store.put("k", "4");
        assert_eq!(store.drain(&mut watcher), vec![(revision, "k".into())]);
    }

    /// A snapshot installed under a live watcher: it continues from history in the new state.
    #[test]
    fn a_replaced_state_is_caught_up_from_history() {
        let mut store = Store::new(QueueBounds::default());
        let mut watcher = store.watch("", "\0", 0);
        let before = store.put("a", "1");
        assert_eq!(store.drain(&mut watcher), vec![(before, "a".into())]);
        // Another store that applied more, as a leader's snapshot would hold.
        let mut other = Store::new(QueueBounds::default());
        other.put("a", "1");
        let missed = other.put("b", "2");
        let snapshot = std::mem::replace(
            &mut *other.state.write().unwrap(),
            StateMachine::new(Limits::default(), MemberTable::default()),
        );
        let previous = {
            let mut state = store.state.write().unwrap();
            let previous = state.kv.current_revision();
            *state = snapshot;
            store.hub.state_replaced(previous);
            previous
        };
        store.index = 2;
        let after = store.put("c", "3");
        let seen = store.drain(&mut watcher);
        assert_eq!(
            keys_of(&seen),
            vec!["b", "c"],
            "after revision {previous}: {seen:?}"
        );
        assert_eq!(seen[0].0, missed);
        assert_eq!(seen[1].0, after);
    }

    #[test]
    fn delivered_through_is_safe_for_progress() {
        let mut store = Store::new(QueueBounds::default());
        let mut watcher = store.watch("k", "", 0);
        let current = store.put("other", "x");
        {
            let _state = store.state.read().unwrap();
            assert_eq!(watcher.delivered_through(current), current);
        }
        let revision = store.put("k", "1");
        // Queued but not handed out: not yet.
        assert!(watcher.delivered_through(revision) < revision);
        store.drain(&mut watcher);
        assert_eq!(watcher.delivered_through(revision), revision);
        let mut from_history = store.watch("k", "", 1);
        assert_eq!(from_history.delivered_through(revision), 0);
        store.drain(&mut from_history);
        assert_eq!(from_history.delivered_through(revision), revision);
    }
}

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

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use flotilla_kv::ErrorKind;
use flotilla_proto::etcdserverpb::WatchCreateRequest;
use flotilla_proto::etcdserverpb::watch_create_request::FilterType;
use flotilla_proto::mvccpb::event::EventType;
use tokio::sync::Notify;

use super::event::{SharedEvent, WatchEvent};
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
    fn select(&self, events: &[Arc<SharedEvent>]) -> Vec<WatchEvent> {
        let range = self.range.as_key_range();
        events
            .iter()
            .filter(|shared| {
                let event = shared.event();
                event.kv.as_ref().is_some_and(|kv| range.contains(&kv.key))
                    && !(self.no_put && event.r#type == EventType::Put as i32)
                    && !(self.no_delete && event.r#type == EventType::Delete as i32)
            })
            .map(|shared| WatchEvent::new(shared.clone(), self.prev_kv))
            .collect()
    }
}

/// Events to send in one response; `revision` is the highest among them.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub revision: i64,
    pub events: Vec<WatchEvent>,
}

/// One step of every watcher given that has work, as a stream's task takes them: catching-up
/// watchers of one range share their reads of history ([`Watcher::step_history_together`]),
/// the others step alone. The steps come in key order.
pub fn step_all<'w, K: Ord>(
    watchers: impl IntoIterator<Item = (K, &'w mut Watcher)>,
    sources: Sources<'_>,
) -> Vec<(K, Step)> {
    let mut steps = Vec::new();
    let mut catching_up: BTreeMap<WatchedRange, Vec<(K, &mut Watcher)>> = BTreeMap::new();
    for (key, watcher) in watchers {
        if !watcher.has_work() {
            continue;
        }
        match watcher.catching_up_on() {
            Some(range) => catching_up
                .entry(range.clone())
                .or_default()
                .push((key, watcher)),
            None => steps.push((key, watcher.step(sources))),
        }
    }
    for group in catching_up.into_values() {
        let (keys, mut group): (Vec<K>, Vec<&mut Watcher>) = group.into_iter().unzip();
        let group_steps = Watcher::step_history_together(&mut group, sources);
        steps.extend(keys.into_iter().zip(group_steps));
    }
    steps.sort_by(|(a, _), (b, _)| a.cmp(b));
    steps
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
                // One revision alone is one batch: its size is needed only to gather several.
                let gathering = revisions.len() > 1;
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
                    let bytes: usize = if gathering {
                        events.iter().map(|event| event.encoded().len()).sum()
                    } else {
                        0
                    };
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
        let mut steps = Watcher::step_history_together(&mut [self], sources);
        steps.pop().expect("one step for one watcher")
    }

    /// The range a catching-up watcher reads history of; `None` while live. Watchers catching
    /// up on equal ranges may share their reads ([`Watcher::step_history_together`]).
    pub fn catching_up_on(&self) -> Option<&WatchedRange> {
        (!self.is_live()).then_some(&self.spec.range)
    }

    /// Steps catching-up watchers of one range (equal [`Watcher::catching_up_on`]) with shared
    /// reads of history, as etcd's unsynced watchers share a backend read: a thousand watchers
    /// that fell behind together cost one read a step, not a thousand. Each read starts at the
    /// lowest next revision among the watchers it has not served yet and serves every one whose
    /// next revision it passes: each gets the events from its own next revision on (its
    /// filters applied), and all of them continue from the same revision, so watchers that fell
    /// behind a few revisions apart move in step from then on. The steps come in the order
    /// of `group`.
    pub fn step_history_together(group: &mut [&mut Watcher], sources: Sources<'_>) -> Vec<Step> {
        let Some(first) = group.first() else {
            return Vec::new();
        };
        let range = first.spec.range.clone();
        assert!(
            group.iter().all(|w| w.catching_up_on() == Some(&range)),
            "a shared history read for watchers of different ranges, or live ones"
        );
        let mut steps: Vec<Option<Step>> = group.iter().map(|_| None).collect();
        // A sweep in next-revision order: each read serves a run of watchers from the first
        // not yet served (at least that one), so there are at most as many reads as watchers.
        let mut order: Vec<usize> = (0..group.len()).collect();
        order.sort_by_key(|&i| group[i].next_revision);
        let mut next = 0;
        while let Some(&lowest) = order.get(next) {
            let state = sources.read();
            let current = state.kv.current_revision();
            let read = state.kv.events_since(
                group[lowest].next_revision,
                &range.key,
                &range.range_end,
                HISTORY_EVENTS_PER_STEP,
            );
            let batch = match read {
                Ok(batch) => batch,
                Err(error) => {
                    debug_assert_eq!(error.kind(), ErrorKind::Compacted);
                    // Every watcher behind the compaction, the lowest among them.
                    let compacted = state.kv.compacted_revision();
                    while let Some(&i) = order.get(next)
                        && group[i].next_revision < compacted
                    {
                        steps[i] = Some(Step::Compacted(compacted));
                        next += 1;
                    }
                    continue;
                }
            };
            let exhausted = batch.next_revision > current;
            let served_end = next
                + order[next..]
                    .iter()
                    .take_while(|&&i| exhausted || group[i].next_revision < batch.next_revision)
                    .count();
            let served = &order[next..served_end];
            if exhausted {
                // The seam. Subscribing under the read lock means the first revision queued
                // is `current + 1`.
                for &i in served {
                    group[i].subscribe(sources.hub);
                }
            }
            drop(state);
            let events = SharedEvent::shared(batch.events);
            for &i in served {
                steps[i] = Some(group[i].take_history(&events, batch.next_revision));
            }
            next = served_end;
        }
        steps
            .into_iter()
            .map(|step| step.expect("every watcher served"))
            .collect()
    }

    /// This watcher's part of a history read that starts at or before its next revision.
    fn take_history(&mut self, events: &[Arc<SharedEvent>], next_revision: i64) -> Step {
        let from = self.next_revision;
        let first = events.partition_point(|shared| {
            (shared.event().kv.as_ref()).is_some_and(|kv| kv.mod_revision < from)
        });
        self.next_revision = self.next_revision.max(next_revision);
        let events = self.spec.select(&events[first..]);
        match events.last().and_then(WatchEvent::revision) {
            Some(revision) => Step::Batches(vec![Batch { revision, events }]),
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
                                let kv = event.to_event().kv.unwrap();
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
                        let kv = event.to_event().kv.unwrap();
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
        let delete = deletes[0].events[0].to_event();
        assert_eq!(delete.r#type, EventType::Delete as i32);
        assert_eq!(delete.prev_kv.as_ref().unwrap().value, "2");
        let Step::Batches(puts) = puts_only.step(store.sources()) else {
            panic!()
        };
        assert_eq!(puts.len(), 1);
        assert_eq!(puts[0].events[0].to_event().kv.as_ref().unwrap().value, "2");
        assert_eq!(
            puts[0].events[0].to_event().prev_kv,
            None,
            "prev_kv not asked for"
        );
    }

    /// Watchers catching up on one range from one revision share each read of history and get,
    /// step by step, what each would have got alone, through the seam to live.
    #[test]
    fn a_shared_history_read_gives_each_watcher_its_own_step() {
        let mut store = Store::new(QueueBounds::default());
        for i in 0..(2 * HISTORY_EVENTS_PER_STEP + 10) {
            store.put(&format!("p/{i:04}"), "v");
            if i % 7 == 0 {
                store.delete(&format!("p/{i:04}"));
            }
        }
        let deletes_skipped = |store: &Store| {
            let request = WatchCreateRequest {
                key: Bytes::from_static(b"p/"),
                range_end: Bytes::from_static(b"p0"),
                filters: vec![FilterType::Nodelete as i32],
                ..Default::default()
            };
            let spec = WatchSpec::from_request(&request, 0);
            Watcher::create(spec, 1, store.sources(), Arc::new(Notify::new())).0
        };
        let mut together = [store.watch("p/", "p0", 1), deletes_skipped(&store)];
        let mut alone = [store.watch("p/", "p0", 1), deletes_skipped(&store)];
        let mut steps = 0;
        while together.iter().any(|w| !w.is_live()) {
            let [a, b] = &mut together;
            let shared = Watcher::step_history_together(&mut [a, b], store.sources());
            let own: Vec<Step> = alone.iter_mut().map(|w| w.step(store.sources())).collect();
            assert_eq!(shared, own);
            assert!(matches!(&shared[1], Step::Batches(b) if b.iter().all(|b| b
                .events
                .iter()
                .all(|e| e.to_event().r#type == EventType::Put as i32))));
            // A write between steps, the seam included.
            store.put(&format!("p/late{steps:02}"), "v");
            steps += 1;
            assert!(steps < 10, "the watchers never caught up");
        }
        assert_eq!(steps, 3);
        assert!(alone.iter().all(Watcher::is_live));
        let revision = store.put("p/after", "v");
        for watcher in together.iter_mut().chain(alone.iter_mut()) {
            assert_eq!(
                store.drain(watcher).last(),
                Some(&(revision, "p/after".into()))
            );
        }
    }

    /// Watchers a few revisions apart share the reads from the lowest one, each getting its
    /// own events once and in order, and move in step from the first shared read on; one past
    /// the first read's end is served by a read of its own in the same step; a watcher behind a
    /// compaction is cancelled while the others go on.
    #[test]
    fn staggered_watchers_converge_on_shared_reads() {
        let mut store = Store::new(QueueBounds::default());
        let mut expected = Vec::new();
        for i in 0..(HISTORY_EVENTS_PER_STEP + 40) {
            let key = format!("p/{i:04}");
            expected.push((store.put(&key, "v"), key));
        }
        let starts = [expected[0].0, expected[5].0, expected[20].0];
        let mut watchers: Vec<Watcher> =
            starts.iter().map(|&s| store.watch("p/", "p0", s)).collect();
        let mut seen: Vec<Vec<(i64, String)>> = vec![Vec::new(); 3];
        let mut rounds = 0;
        while watchers.iter().any(|w| !w.is_live()) {
            let mut group: Vec<&mut Watcher> = watchers.iter_mut().collect();
            let steps = Watcher::step_history_together(&mut group, store.sources());
            for (i, step) in steps.into_iter().enumerate() {
                let Step::Batches(batches) = step else {
                    panic!("{step:?}")
                };
                for event in batches.into_iter().flat_map(|b| b.events) {
                    let kv = event.to_event().kv.unwrap();
                    seen[i].push((kv.mod_revision, String::from_utf8_lossy(&kv.key).into()));
                }
            }
            rounds += 1;
            assert!(rounds < 10, "the watchers never caught up");
            let next: Vec<i64> = watchers.iter().map(Watcher::next_revision).collect();
            assert!(
                next.windows(2).all(|w| w[0] == w[1]),
                "in step after a shared read: {next:?}"
            );
        }
        assert_eq!(rounds, 2);
        for (i, &start) in starts.iter().enumerate() {
            let from = expected.iter().position(|(r, _)| *r == start).unwrap();
            assert_eq!(seen[i], expected[from..], "watcher {i}");
        }

        // Beyond the first read's end: a second read, in the same step.
        let near = expected[0].0;
        let far = expected[HISTORY_EVENTS_PER_STEP + 30].0;
        let mut group = [store.watch("p/", "p0", near), store.watch("p/", "p0", far)];
        let [a, b] = &mut group;
        let steps = Watcher::step_history_together(&mut [a, b], store.sources());
        let firsts: Vec<i64> = steps
            .iter()
            .map(|step| match step {
                Step::Batches(batches) => batches[0].events[0].revision().unwrap(),
                Step::Compacted(_) => panic!("{step:?}"),
            })
            .collect();
        assert_eq!(firsts, vec![near, far]);
        assert!(!group[0].is_live() && group[1].is_live());

        // A compaction past one watcher's next revision cancels that one only.
        store.put("other", "v");
        let mut behind = store.watch("p/", "p0", expected[10].0);
        let mut ahead = store.watch("p/", "p0", expected[200].0);
        store.compact(expected[100].0);
        let steps = Watcher::step_history_together(&mut [&mut behind, &mut ahead], store.sources());
        assert_eq!(steps[0], Step::Compacted(expected[100].0));
        let Step::Batches(batches) = &steps[1] else {
            panic!()
        };
        assert_eq!(batches[0].events[0].revision().unwrap(), expected[200].0);
    }

    #[test]
    #[should_panic(expected = "a shared history read for watchers of different ranges")]
    fn watchers_of_different_ranges_cannot_share_a_read() {
        let mut store = Store::new(QueueBounds::default());
        store.put("p/a", "v");
        let mut prefix = store.watch("p/", "p0", 1);
        let mut key = store.watch("p/a", "", 1);
        Watcher::step_history_together(&mut [&mut prefix, &mut key], store.sources());
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
            .map(|event| event.revision().unwrap())
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
            let bytes: usize = batch.events.iter().map(|e| e.encoded().len()).sum();
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

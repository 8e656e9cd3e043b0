//! The hub: fans the events of every applied write out to the live watchers, each into its own
//! bounded queue, without ever waiting for a watcher.
//!
//! The apply thread calls [`WatchHub::publish`] while it holds the state machine's write lock,
//! so "the store is at revision R" and "every event up to R was offered to every subscribed
//! watcher" are true at the same instants. A watcher subscribes while it holds the read lock
//! (see `watcher.rs`): whatever revision it sees then, every later revision reaches its queue.
//! That is the seam between history and live events.
//!
//! A queue that would grow past its bounds is not grown: the hub drops the subscription and
//! records the first revision the watcher missed. The watcher drains what it has, then reads
//! the rest from the store's history and subscribes again (catch-up).
//!
//! Lock order: state machine, then hub, then a queue.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flotilla_kv::KeyRange;
use flotilla_proto::mvccpb::Event;
use tokio::sync::Notify;

use super::event::SharedEvent;
use crate::metrics::Metrics;
use crate::state_machine::EventSink;

/// The events of one revision, shared by every watcher that gets them.
#[derive(Debug)]
pub struct RevisionEvents {
    pub revision: i64,
    pub events: Vec<Arc<SharedEvent>>,
    /// About how much memory the events hold (keys and values), for queue bounds.
    pub bytes: usize,
}

impl RevisionEvents {
    pub fn new(revision: i64, events: Vec<Event>) -> RevisionEvents {
        let bytes = events.iter().map(event_bytes).sum();
        RevisionEvents {
            revision,
            events: SharedEvent::shared(events),
            bytes,
        }
    }
}

fn event_bytes(event: &Event) -> usize {
    const OVERHEAD_BYTES: usize = 64;
    let kv_bytes = |kv: &Option<flotilla_proto::mvccpb::KeyValue>| {
        kv.as_ref().map_or(0, |kv| kv.key.len() + kv.value.len())
    };
    OVERHEAD_BYTES + kv_bytes(&event.kv) + kv_bytes(&event.prev_kv)
}

/// How much one watcher's queue may hold before the watcher is switched to catching up from
/// history. A queue always takes one revision when empty, however large.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueBounds {
    pub revisions_max: usize,
    pub bytes_max: usize,
}

impl Default for QueueBounds {
    fn default() -> Self {
        QueueBounds {
            revisions_max: 1024,
            bytes_max: 16 << 20,
        }
    }
}

/// One watcher's queue: filled by the hub, drained by the watcher's stream task.
#[derive(Debug)]
pub struct WatcherQueue {
    state: Mutex<QueueState>,
    /// The stream task's wake-up: shared by every watcher of one stream.
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct QueueState {
    revisions: VecDeque<Arc<RevisionEvents>>,
    bytes: usize,
    /// Set when the hub dropped the subscription: the first revision not queued.
    fell_behind_at: Option<i64>,
}

/// What a watcher finds in its queue.
#[derive(Debug)]
pub enum Drained {
    /// Revisions in order (possibly none).
    Revisions(Vec<Arc<RevisionEvents>>),
    /// Everything queued was taken before; the watcher must continue from history at this
    /// revision.
    FellBehind(i64),
}

impl WatcherQueue {
    pub fn new(wake: Arc<Notify>) -> Arc<WatcherQueue> {
        Arc::new(WatcherQueue {
            state: Mutex::new(QueueState::default()),
            wake,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes up to `revisions_max` revisions; once the queue is empty, reports a fall behind.
    pub fn drain(&self, revisions_max: usize) -> Drained {
        let mut state = self.lock();
        if state.revisions.is_empty()
            && let Some(revision) = state.fell_behind_at.take()
        {
            return Drained::FellBehind(revision);
        }
        let count = revisions_max.min(state.revisions.len());
        let taken: Vec<_> = state.revisions.drain(..count).collect();
        state.bytes -= taken.iter().map(|r| r.bytes).sum::<usize>();
        Drained::Revisions(taken)
    }

    /// True when nothing is queued and no fall behind is pending.
    pub fn is_idle(&self) -> bool {
        let state = self.lock();
        state.revisions.is_empty() && state.fell_behind_at.is_none()
    }

    /// Forgets anything queued (the watcher is about to subscribe afresh).
    pub fn clear(&self) {
        *self.lock() = QueueState::default();
    }

    /// Queues a revision unless the bounds forbid it; false means the watcher fell behind at
    /// this revision (recorded).
    fn offer(&self, revision: &Arc<RevisionEvents>, bounds: QueueBounds) -> bool {
        let mut state = self.lock();
        let full = !state.revisions.is_empty()
            && (state.revisions.len() >= bounds.revisions_max
                || state.bytes + revision.bytes > bounds.bytes_max);
        if full {
            state.fell_behind_at = Some(revision.revision);
        } else {
            state.bytes += revision.bytes;
            state.revisions.push_back(revision.clone());
        }
        drop(state);
        self.wake.notify_one();
        !full
    }

    /// The hub dropped the subscription without queueing `revision`.
    fn fall_behind(&self, revision: i64) {
        self.lock().fell_behind_at = Some(revision);
        self.wake.notify_one();
    }
}

/// An owned key range, in etcd's three forms (see [`KeyRange`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WatchedRange {
    pub key: Bytes,
    pub range_end: Bytes,
}

impl WatchedRange {
    pub fn as_key_range(&self) -> KeyRange<'_> {
        KeyRange::new(&self.key, &self.range_end)
    }

    pub fn is_single_key(&self) -> bool {
        self.range_end.is_empty()
    }
}

/// A subscription's handle, to unsubscribe.
pub type SubscriptionId = u64;

#[derive(Debug)]
struct Subscription {
    range: WatchedRange,
    queue: Arc<WatcherQueue>,
}

#[derive(Debug, Default)]
struct HubState {
    next_id: SubscriptionId,
    subscriptions: HashMap<SubscriptionId, Subscription>,
    /// Watchers of one key, by key: found with one lookup per event.
    by_key: HashMap<Bytes, Vec<SubscriptionId>>,
    /// Watchers of ranges, by range: each distinct range is checked once against the
    /// revision's sorted keys, however many watch it (10,000 watchers of one prefix cost one
    /// check, then one queue offer each, with no lookup).
    ranges: BTreeMap<WatchedRange, BTreeMap<SubscriptionId, Arc<WatcherQueue>>>,
}

/// Fans applied events out to subscribed watchers (see the module documentation).
#[derive(Debug, Default)]
pub struct WatchHub {
    state: Mutex<HubState>,
    bounds: QueueBounds,
    metrics: Arc<Metrics>,
}

impl WatchHub {
    pub fn new(bounds: QueueBounds) -> WatchHub {
        WatchHub::with_metrics(bounds, Arc::default())
    }

    /// A hub that counts overflowing watchers in `metrics`.
    pub fn with_metrics(bounds: QueueBounds, metrics: Arc<Metrics>) -> WatchHub {
        WatchHub {
            state: Mutex::default(),
            bounds,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes a watcher: every revision published from now on that touches `range` goes to
    /// `queue`. Call while holding the state machine's read lock, having read its revision.
    pub fn subscribe(&self, range: WatchedRange, queue: Arc<WatcherQueue>) -> SubscriptionId {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        if range.is_single_key() {
            state.by_key.entry(range.key.clone()).or_default().push(id);
        } else {
            let watchers = state.ranges.entry(range.clone()).or_default();
            watchers.insert(id, queue.clone());
        }
        state
            .subscriptions
            .insert(id, Subscription { range, queue });
        id
    }

    pub fn unsubscribe(&self, id: SubscriptionId) {
        remove_subscription(&mut self.lock(), id);
    }

    pub fn subscription_count(&self) -> usize {
        self.lock().subscriptions.len()
    }

    /// Offers `events` (of `revision`) to the queue of every watcher they concern, each
    /// once: single-key watchers by lookup, then every watcher of each distinct range that
    /// holds one of the keys. Returns the watchers whose queues were full.
    fn offer_matching(
        &self,
        state: &HubState,
        revision: i64,
        events: &[Event],
    ) -> Vec<SubscriptionId> {
        let mut keys: Vec<&[u8]> = events
            .iter()
            .filter_map(|event| event.kv.as_ref().map(|kv| &kv.key[..]))
            .collect();
        let mut single: Vec<SubscriptionId> = Vec::new();
        for key in &keys {
            if let Some(ids) = state.by_key.get(*key) {
                single.extend_from_slice(ids);
            }
        }
        // A key may appear in several events of a revision (a transaction).
        single.sort_unstable();
        single.dedup();
        keys.sort_unstable();
        let ranges: Vec<_> = (state.ranges.iter())
            .filter(|(range, _)| range_holds_any(&range.as_key_range(), &keys))
            .map(|(_, watchers)| watchers)
            .collect();
        if single.is_empty() && ranges.is_empty() {
            return Vec::new();
        }
        let shared = Arc::new(RevisionEvents::new(revision, events.to_vec()));
        let single = (single.iter()).map(|id| (id, &state.subscriptions[id].queue));
        let ranged = ranges.into_iter().flatten();
        single
            .chain(ranged)
            .filter(|(_, queue)| !queue.offer(&shared, self.bounds))
            .map(|(&id, _)| id)
            .collect()
    }
}

/// True if any of the sorted `keys` lies in `range` (a binary search, not a scan).
fn range_holds_any(range: &KeyRange<'_>, sorted_keys: &[&[u8]]) -> bool {
    let (start, end) = match *range {
        KeyRange::Single(key) => (key, Some((key, true))),
        KeyRange::Interval { start, end } => (start, Some((end, false))),
        KeyRange::From(start) => (start, None),
    };
    let first = sorted_keys.partition_point(|key| *key < start);
    sorted_keys.get(first).is_some_and(|key| match end {
        None => true,
        Some((end, true)) => *key <= end,
        Some((end, false)) => *key < end,
    })
}

fn remove_subscription(state: &mut HubState, id: SubscriptionId) {
    let Some(subscription) = state.subscriptions.remove(&id) else {
        return;
    };
    if subscription.range.is_single_key() {
        if let Some(ids) = state.by_key.get_mut(&subscription.range.key) {
            ids.retain(|&other| other != id);
            if ids.is_empty() {
                state.by_key.remove(&subscription.range.key);
            }
        }
    } else if let Some(watchers) = state.ranges.get_mut(&subscription.range) {
        watchers.remove(&id);
        if watchers.is_empty() {
            state.ranges.remove(&subscription.range);
        }
    }
}

impl EventSink for WatchHub {
    fn publish(&self, revision: i64, events: &[Event]) {
        let mut state = self.lock();
        if state.subscriptions.is_empty() {
            return;
        }
        for id in self.offer_matching(&state, revision, events) {
            remove_subscription(&mut state, id);
            self.metrics
                .watchers_fell_behind
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A snapshot replaced the state: the revisions between `previous_revision` and the
    /// snapshot's were never published, so every watcher continues from history.
    fn state_replaced(&self, previous_revision: i64) {
        let mut state = self.lock();
        for (_, subscription) in state.subscriptions.drain() {
            subscription.queue.fall_behind(previous_revision + 1);
        }
        state.by_key.clear();
        state.ranges.clear();
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::mvccpb::KeyValue;

    use super::*;

    fn put_event(key: &str, revision: i64) -> Event {
        Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: Bytes::from(key.to_string()),
                mod_revision: revision,
                value: Bytes::from_static(b"v"),
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn range(key: &str, end: &str) -> WatchedRange {
        WatchedRange {
            key: Bytes::from(key.to_string()),
            range_end: Bytes::from(end.to_string()),
        }
    }

    fn revisions(drained: Drained) -> Vec<i64> {
        match drained {
            Drained::Revisions(list) => list.iter().map(|r| r.revision).collect(),
            Drained::FellBehind(at) => panic!("fell behind at {at}"),
        }
    }

    #[test]
    fn events_reach_only_the_watchers_of_their_keys() {
        let hub = WatchHub::default();
        let wake = Arc::new(Notify::new());
        let single = WatcherQueue::new(wake.clone());
        let prefix = WatcherQueue::new(wake.clone());
        let from = WatcherQueue::new(wake.clone());
        hub.subscribe(range("a", ""), single.clone());
        hub.subscribe(range("b", "c"), prefix.clone());
        hub.subscribe(range("bz", "\0"), from.clone());
        hub.publish(2, &[put_event("a", 2)]);
        hub.publish(3, &[put_event("b1", 3), put_event("a", 3)]);
        hub.publish(4, &[put_event("c", 4)]);
        hub.publish(5, &[put_event("0", 5)]);
        assert_eq!(revisions(single.drain(10)), vec![2, 3]);
        assert_eq!(revisions(prefix.drain(10)), vec![3]);
        assert_eq!(revisions(from.drain(10)), vec![4]);
    }

    #[test]
    fn every_watcher_of_a_shared_range_gets_its_events_until_it_leaves() {
        let hub = WatchHub::default();
        let wake = Arc::new(Notify::new());
        let queues: Vec<_> = (0..3).map(|_| WatcherQueue::new(wake.clone())).collect();
        let ids: Vec<_> = (queues.iter())
            .map(|queue| hub.subscribe(range("p/", "p0"), queue.clone()))
            .collect();
        let other = WatcherQueue::new(wake.clone());
        hub.subscribe(range("q", "\0"), other.clone());
        hub.publish(2, &[put_event("p/a", 2)]);
        hub.unsubscribe(ids[1]);
        hub.publish(3, &[put_event("p/b", 3), put_event("q", 3)]);
        assert_eq!(revisions(queues[0].drain(10)), vec![2, 3]);
        assert_eq!(revisions(queues[1].drain(10)), vec![2]);
        assert_eq!(revisions(queues[2].drain(10)), vec![2, 3]);
        assert_eq!(revisions(other.drain(10)), vec![3]);
        for id in [ids[0], ids[2]] {
            hub.unsubscribe(id);
        }
        assert_eq!(hub.subscription_count(), 1);
        assert!(
            hub.lock().ranges.keys().all(|r| r.key == "q"),
            "no empty group left"
        );
    }

    #[test]
    fn a_full_queue_drops_the_subscription_and_records_where() {
        let hub = WatchHub::new(QueueBounds {
            revisions_max: 2,
            bytes_max: usize::MAX,
        });
        let queue = WatcherQueue::new(Arc::new(Notify::new()));
        hub.subscribe(range("k", ""), queue.clone());
        for revision in 2..=6 {
            hub.publish(revision, &[put_event("k", revision)]);
        }
        assert_eq!(hub.subscription_count(), 0, "dropped at revision 4");
        assert_eq!(revisions(queue.drain(1)), vec![2]);
        assert_eq!(revisions(queue.drain(10)), vec![3]);
        assert!(matches!(queue.drain(10), Drained::FellBehind(4)));
        assert!(queue.is_idle());
    }

    #[test]
    fn an_empty_queue_takes_one_revision_whatever_its_size() {
        let hub = WatchHub::new(QueueBounds {
            revisions_max: 4,
            bytes_max: 1,
        });
        let queue = WatcherQueue::new(Arc::new(Notify::new()));
        hub.subscribe(range("k", ""), queue.clone());
        hub.publish(2, &[put_event("k", 2)]);
        hub.publish(3, &[put_event("k", 3)]);
        assert_eq!(revisions(queue.drain(10)), vec![2]);
        assert!(matches!(queue.drain(10), Drained::FellBehind(3)));
    }

    #[test]
    fn a_replaced_state_sends_every_watcher_to_history() {
        let hub = WatchHub::default();
        let queue = WatcherQueue::new(Arc::new(Notify::new()));
        hub.subscribe(range("a", "\0"), queue.clone());
        hub.publish(2, &[put_event("a", 2)]);
        hub.state_replaced(7);
        assert_eq!(hub.subscription_count(), 0);
        assert_eq!(revisions(queue.drain(10)), vec![2]);
        assert!(matches!(queue.drain(10), Drained::FellBehind(8)));
    }

    #[test]
    fn unsubscribed_watchers_get_nothing() {
        let hub = WatchHub::default();
        let queue = WatcherQueue::new(Arc::new(Notify::new()));
        let id = hub.subscribe(range("k", ""), queue.clone());
        hub.unsubscribe(id);
        hub.publish(2, &[put_event("k", 2)]);
        assert!(queue.is_idle());
    }

    #[test]
    fn range_matching_by_binary_search() {
        let keys: Vec<&[u8]> = vec![b"a", b"c", b"e"];
        assert!(range_holds_any(&KeyRange::new(b"b", b"d"), &keys));
        assert!(!range_holds_any(&KeyRange::new(b"f", b"\0"), &keys));
        assert!(range_holds_any(&KeyRange::new(b"e", b"\0"), &keys));
        assert!(!range_holds_any(&KeyRange::new(b"c1", b"e"), &keys));
        assert!(range_holds_any(&KeyRange::new(b"c", b""), &keys));
    }
}

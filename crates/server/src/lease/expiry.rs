//! Deadlines by lease id, in a min-heap: the next deadline and every lease due by a time are
//! found without looking at the others, so a million leases cost nothing per tick but the ones
//! that expire.
//!
//! Changing a deadline (a renewal) does not search the heap: it pushes a new entry and leaves
//! the old one behind, recognised as stale when it surfaces because the map holds another
//! deadline for that id. Stale entries are bounded: when they outnumber the live ones (plus a
//! slack), the heap is rebuilt from the map, which keeps renewals O(log n) amortised.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

/// Stale heap entries tolerated beyond the number of live ones before a rebuild.
const STALE_SLACK: usize = 1024;

#[derive(Debug, Default)]
pub struct ExpiryQueue {
    deadlines: HashMap<i64, Duration>,
    heap: BinaryHeap<Reverse<(Duration, i64)>>,
}

impl ExpiryQueue {
    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }

    pub fn deadline(&self, id: i64) -> Option<Duration> {
        self.deadlines.get(&id).copied()
    }

    /// Sets (or moves) the deadline of `id`.
    pub fn set(&mut self, id: i64, deadline: Duration) {
        if self.deadlines.insert(id, deadline) == Some(deadline) {
            return;
        }
        self.heap.push(Reverse((deadline, id)));
        if self.heap.len() > 2 * self.deadlines.len() + STALE_SLACK {
            self.rebuild();
        }
    }

    pub fn remove(&mut self, id: i64) -> Option<Duration> {
        self.deadlines.remove(&id)
    }

    pub fn clear(&mut self) {
        self.deadlines.clear();
        self.heap.clear();
    }

    /// The earliest deadline.
    pub fn next_deadline(&mut self) -> Option<Duration> {
        while let Some(&Reverse((deadline, id))) = self.heap.peek() {
            if self.is_current(id, deadline) {
                return Some(deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// Removes and returns up to `max` ids whose deadline is at or before `now`, earliest
    /// first.
    pub fn pop_due(&mut self, now: Duration, max: usize) -> Vec<i64> {
        let mut due = Vec::new();
        while due.len() < max {
            let Some(&Reverse((deadline, id))) = self.heap.peek() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.heap.pop();
            if self.is_current(id, deadline) {
                self.deadlines.remove(&id);
                due.push(id);
            }
        }
        due
    }

    fn is_current(&self, id: i64, deadline: Duration) -> bool {
        self.deadlines.get(&id) == Some(&deadline)
    }

    fn rebuild(&mut self) {
        self.heap = self
            .deadlines
            .iter()
            .map(|(&id, &deadline)| Reverse((deadline, id)))
            .collect();
    }

    /// Heap entries, stale ones included (for tests of the bound).
    pub fn heap_len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Duration, ms: u64) -> Duration {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn due_ids_come_out_earliest_first_and_only_once() {
        let base = Duration::ZERO;
        let mut queue = ExpiryQueue::default();
        queue.set(1, at(base, 30));
        queue.set(2, at(base, 10));
        queue.set(3, at(base, 20));
        assert_eq!(queue.next_deadline(), Some(at(base, 10)));
        assert_eq!(queue.pop_due(at(base, 5), 10), Vec::<i64>::new());
        assert_eq!(queue.pop_due(at(base, 20), 10), vec![2, 3]);
        assert_eq!(queue.pop_due(at(base, 100), 10), vec![1]);
        assert!(queue.is_empty());
        assert_eq!(queue.next_deadline(), None);
    }

    #[test]
    fn a_moved_deadline_replaces_the_old_one() {
        let base = Duration::ZERO;
        let mut queue = ExpiryQueue::default();
        queue.set(1, at(base, 10));
        queue.set(1, at(base, 50));
        queue.set(2, at(base, 20));
        queue.remove(2);
        assert_eq!(queue.next_deadline(), Some(at(base, 50)));
        assert_eq!(queue.pop_due(at(base, 40), 10), Vec::<i64>::new());
        assert_eq!(queue.pop_due(at(base, 50), 10), vec![1]);
    }

    #[test]
    fn renewals_do_not_grow_the_heap_without_bound() {
        let base = Duration::ZERO;
        let mut queue = ExpiryQueue::default();
        for id in 0..100 {
            queue.set(id, at(base, 1_000));
        }
        for round in 0..1_000u64 {
            for id in 0..100 {
                queue.set(id, at(base, 1_000 + round + 1));
            }
        }
        assert!(queue.heap_len() <= 2 * 100 + STALE_SLACK + 1);
        assert_eq!(queue.pop_due(at(base, 5_000), 1_000).len(), 100);
    }

    #[test]
    fn a_wave_is_handed_out_in_bounded_batches() {
        let base = Duration::ZERO;
        let mut queue = ExpiryQueue::default();
        for id in 0..10_000 {
            queue.set(id, at(base, 10));
        }
        let mut batches = 0;
        loop {
            let batch = queue.pop_due(at(base, 10), 500);
            if batch.is_empty() {
                break;
            }
            assert!(batch.len() <= 500);
            batches += 1;
        }
        assert_eq!(batches, 20);
    }

    /// A million leases with staggered deadlines (a pseudo-random spread over an hour), one in
    /// ten renewed on the way: each comes out at the first tick at or after its deadline, in
    /// deadline order. Prints the time taken (`cargo test --release -p flotilla-server
    /// million -- --nocapture` for the numbers).
    #[test]
    fn a_million_staggered_leases_expire_in_order() {
        const LEASES: usize = 1_000_000;
        const TICK_MS: u64 = 100;
        let base = Duration::ZERO;
        let mut random = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next_random = move || {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random
        };
        let mut deadlines_ms: Vec<u64> = (0..LEASES).map(|_| next_random() % 3_600_000).collect();
        let mut queue = ExpiryQueue::default();
        let started = std::time::Instant::now();
        for (id, &ms) in deadlines_ms.iter().enumerate() {
            queue.set(id as i64, at(base, ms));
        }
        let inserted = started.elapsed();
        let started = std::time::Instant::now();
        for id in (0..LEASES).step_by(10) {
            deadlines_ms[id] += next_random() % 60_000;
            queue.set(id as i64, at(base, deadlines_ms[id]));
        }
        let renewed = started.elapsed();
        let started = std::time::Instant::now();
        let (mut expired, mut ticks, mut busiest_tick) = (0, 0u64, 0);
        let mut last_ms = 0;
        while expired < LEASES {
            let now_ms = ticks * TICK_MS;
            ticks += 1;
            let mut popped_this_tick = 0;
            loop {
                let due = queue.pop_due(at(base, now_ms), 5_000);
                if due.is_empty() {
                    break;
                }
                for id in due {
                    let ms = deadlines_ms[id as usize];
                    assert!(ms <= now_ms && ms + TICK_MS > now_ms, "on time");
                    assert!(ms >= last_ms, "in deadline order");
                    last_ms = ms;
                    popped_this_tick += 1;
                }
            }
            expired += popped_this_tick;
            busiest_tick = busiest_tick.max(popped_this_tick);
        }
        let drained = started.elapsed();
        println!(
            "expiry queue: {LEASES} leases set in {inserted:?}, {} renewed in {renewed:?}; \
             drained over {ticks} ticks of {TICK_MS} ms in {drained:?} ({:.1} us per tick, \
             at most {busiest_tick} in one tick)",
            LEASES / 10,
            drained.as_secs_f64() * 1e6 / ticks as f64
        );
        assert!(queue.is_empty());
    }
}

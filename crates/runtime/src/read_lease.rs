//! The leader's read lease in real time (thesis §6.4.1), as the raft task publishes it for the
//! request handlers.
//!
//! The core counts a lease in ticks: a round sent at tick `s` and acknowledged by a quorum keeps
//! every voter of that quorum from electing anyone for at least `T - 1` tick intervals after it
//! received the round. Ticks are only as good as the ticker, though: a leader process paused
//! (stopped, swapped out, starved of CPU) misses ticks, and on resuming its tick count says the
//! lease still holds while in real time the followers have long since elected someone else.
//! So the shell turns the lease into a deadline on the monotonic clock, counted from the moment
//! its clock read tick `s` (the round left after that), `T - 1` tick intervals long less a margin
//! for the followers' clocks running fast, and a handler checks the deadline against the clock
//! itself at the moment of the read. A follower's ticker can only run slow (missed ticks are
//! delayed, never bunched), which makes its side of the lease longer, never shorter.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_raft::{Index, LeaseRead};

/// Ticks remembered with the instant each began. A lease round older than an election timeout
/// is useless, so a few dozen suffice.
const TICKS_REMEMBERED_MAX: usize = 64;

/// When the raft task's ticks began, for the recent ones. Owned by the raft task.
#[derive(Debug)]
pub struct TickClock {
    /// (tick, the instant just before the core counted it), ascending.
    ticks: VecDeque<(u64, Instant)>,
}

impl TickClock {
    /// A clock whose tick `first` began at `now` (before the core sent anything).
    pub fn new(first: u64, now: Instant) -> Self {
        Self {
            ticks: VecDeque::from([(first, now)]),
        }
    }

    /// Tick `tick` began at `now`: read the clock before handing the tick to the core.
    pub fn record(&mut self, tick: u64, now: Instant) {
        if self.ticks.len() == TICKS_REMEMBERED_MAX {
            self.ticks.pop_front();
        }
        self.ticks.push_back((tick, now));
    }

    /// When the clock read `tick`, if it is remembered.
    pub fn instant_of(&self, tick: u64) -> Option<Instant> {
        self.ticks
            .iter()
            .rev()
            .find(|&&(t, _)| t == tick)
            .map(|&(_, instant)| instant)
    }
}

/// The lease as the raft task last published it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The leader's commit index when published: reads may be answered once applied this far.
    pub index: Index,
    /// Until when, on the monotonic clock.
    pub deadline: Instant,
}

/// The real-time deadline of the core's lease, or `None` if the tick it counts from is
/// forgotten (then there is no lease).
pub fn deadline_of(lease: LeaseRead, clock: &TickClock, duration: Duration) -> Option<Instant> {
    clock
        .instant_of(lease.sent_tick)
        .map(|start| start + duration)
}

/// The published lease, shared by the raft task (writer) and the handlers (readers).
#[derive(Debug, Default)]
pub struct PublishedLease {
    lease: Mutex<Option<Lease>>,
}

impl PublishedLease {
    /// Publishes the raft task's latest lease, or withdraws it.
    pub fn publish(&self, lease: Option<Lease>) {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = lease;
    }

    /// The read index, if the lease holds at `now`.
    pub fn read_index_at(&self, now: Instant) -> Option<Index> {
        let lease = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
        lease
            .filter(|lease| now < lease.deadline)
            .map(|lease| lease.index)
    }
}

/// The lease's length in real time: `T - 1` tick intervals less the drift margin, or `None`
/// if the margin leaves nothing (the configuration is refused then).
pub fn lease_duration(
    tick: Duration,
    election_timeout_ticks: u64,
    drift_margin: Duration,
) -> Option<Duration> {
    let guaranteed = tick * u32::try_from(election_timeout_ticks.checked_sub(1)?).ok()?;
    guaranteed
        .checked_sub(drift_margin)
        .filter(|left| !left.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease_read(sent_tick: u64) -> LeaseRead {
        LeaseRead {
            index: 7,
            sent_tick,
            expires_tick: sent_tick + 8,
        }
    }

    #[test]
    fn the_lease_is_counted_from_when_the_clock_read_its_tick() {
        let start = Instant::now();
        let mut clock = TickClock::new(0, start);
        clock.record(1, start + Duration::from_millis(100));
        clock.record(2, start + Duration::from_millis(350));
        let duration = Duration::from_millis(800);
        assert_eq!(
            deadline_of(lease_read(2), &clock, duration),
            Some(start + Duration::from_millis(1150))
        );
        assert_eq!(
            deadline_of(lease_read(0), &clock, duration),
            Some(start + duration)
        );
        assert_eq!(deadline_of(lease_read(3), &clock, duration), None);
    }

    #[test]
    fn a_forgotten_tick_gives_no_lease() {
        let start = Instant::now();
        let mut clock = TickClock::new(0, start);
        for tick in 1..=TICKS_REMEMBERED_MAX as u64 {
            clock.record(tick, start + Duration::from_millis(tick));
        }
        assert_eq!(clock.instant_of(0), None, "the oldest is dropped");
        assert!(clock.instant_of(1).is_some());
        assert_eq!(
            deadline_of(lease_read(0), &clock, Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn a_published_lease_holds_until_its_deadline_and_not_at_it() {
        let published = PublishedLease::default();
        let now = Instant::now();
        assert_eq!(published.read_index_at(now), None);
        let deadline = now + Duration::from_millis(500);
        published.publish(Some(Lease { index: 9, deadline }));
        assert_eq!(published.read_index_at(now), Some(9));
        assert_eq!(
            published.read_index_at(deadline - Duration::from_nanos(1)),
            Some(9)
        );
        assert_eq!(published.read_index_at(deadline), None);
        published.publish(None);
        assert_eq!(published.read_index_at(now), None);
    }

    #[test]
    fn the_lease_is_t_minus_one_ticks_less_the_margin() {
        let tick = Duration::from_millis(100);
        assert_eq!(
            lease_duration(tick, 10, Duration::from_millis(100)),
            Some(Duration::from_millis(800))
        );
        assert_eq!(lease_duration(tick, 2, Duration::from_millis(100)), None);
        assert_eq!(lease_duration(tick, 0, Duration::ZERO), None);
    }
}

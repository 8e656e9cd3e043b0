//! Writes this member forwarded to the leader and waits to see applied here.
//!
//! A follower forwards a client's write to the leader and answers with the leader's answer.
//! If the leader dies (or the connection breaks) after the entry was replicated, that answer
//! is lost while the entry may still commit under the next leader. Without a session the
//! write cannot be sent again (it might apply twice), so the follower tags the forwarded
//! command with an [`Origin`] (this member, a number of its own) and, when the answer is
//! lost, waits for its own apply thread to meet the entry: the outcome applied here is the
//! outcome the leader would have sent, since every member applies the same log alike. etcd's
//! members wait for their own proposals the same way, by the id each one carries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_raft::NodeId;
use tokio::sync::oneshot;

use crate::state_machine::Origin;

/// The forwarded writes of one member that wait for their entry; `O` is the state machine's
/// output.
#[derive(Debug)]
pub(crate) struct ForwardedWrites<O> {
    member_id: NodeId,
    /// The next request number. Starts from the wall clock in nanoseconds, so that an entry
    /// tagged by a previous run of this member (replayed from the log, or committed late)
    /// never matches a request of this run.
    next_request: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<O>>>,
    /// `waiting.len()`, read without the lock: the apply thread looks up nothing while no
    /// forwarded write waits, which is always the case on the leader.
    waiting_count: AtomicUsize,
}

/// One forwarded write's claim on its entry; dropping it withdraws the claim. At most one per
/// client request in flight, so the requests' own bounds (streams per connection, held
/// requests) bound these too.
#[derive(Debug)]
pub struct TrackedWrite<O> {
    /// What to tag the command with.
    pub origin: Origin,
    applied: oneshot::Receiver<O>,
    writes: Arc<ForwardedWrites<O>>,
}

impl<O> ForwardedWrites<O> {
    pub(crate) fn new(member_id: NodeId) -> ForwardedWrites<O> {
        let started_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |since| since.as_nanos() as u64);
        ForwardedWrites {
            member_id,
            next_request: AtomicU64::new(started_nanos.max(1)),
            waiting: Mutex::default(),
            waiting_count: AtomicUsize::new(0),
        }
    }

    /// A new origin for a write about to be forwarded; the entry that carries it, once applied
    /// here, is handed to the returned claim.
    pub(crate) fn track(self: &Arc<ForwardedWrites<O>>) -> TrackedWrite<O> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (sender, applied) = oneshot::channel();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let previous = waiting.insert(request, sender);
        assert!(previous.is_none(), "request number {request} given twice");
        self.waiting_count.store(waiting.len(), Ordering::Release);
        TrackedWrite {
            origin: Origin {
                member_id: self.member_id,
                request,
            },
            applied,
            writes: self.clone(),
        }
    }

    /// The claim on an entry tagged with `origin`, if it is one of this member's and still
    /// waited for. Called by the apply thread for every applied command that has an origin.
    pub(super) fn take(&self, origin: &Origin) -> Option<oneshot::Sender<O>> {
        if origin.member_id != self.member_id || self.waiting_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let claim = waiting.remove(&origin.request);
        self.waiting_count.store(waiting.len(), Ordering::Release);
        claim
    }

    fn withdraw(&self, request: u64) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.remove(&request);
        self.waiting_count.store(waiting.len(), Ordering::Release);
    }
}

impl<O> TrackedWrite<O> {
    /// Waits for the entry to be applied here. `None` if the apply thread stopped; the caller
    /// bounds the wait with its deadline.
    pub async fn applied(&mut self) -> Option<O> {
        (&mut self.applied).await.ok()
    }
}

impl<O> Drop for TrackedWrite<O> {
    fn drop(&mut self) {
        self.writes.withdraw(self.origin.request);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An origin is handed out once, its entry reaches its claim, and a dropped claim is
    /// withdrawn; another member's origin or an unknown number finds nothing.
    #[tokio::test]
    async fn an_entry_reaches_the_claim_of_its_origin_only() {
        let writes = Arc::new(ForwardedWrites::<i64>::new(7));
        let mut first = writes.track();
        let second = writes.track();
        assert_ne!(first.origin, second.origin);
        assert_eq!(first.origin.member_id, 7);

        let other_member = Origin {
            member_id: 8,
            ..first.origin
        };
        assert!(writes.take(&other_member).is_none());
        let unknown = Origin {
            request: second.origin.request + 1,
            ..second.origin
        };
        assert!(writes.take(&unknown).is_none());

        writes.take(&first.origin).unwrap().send(5).unwrap();
        assert_eq!(first.applied().await, Some(5));
        // Taken once only.
        assert!(writes.take(&first.origin).is_none());

        let dropped = second.origin;
        drop(second);
        assert!(writes.take(&dropped).is_none());
        assert_eq!(writes.waiting_count.load(Ordering::Acquire), 0);
    }
}

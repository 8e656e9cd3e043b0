//! Watchers on every member, run by the server's own watch code (`watch::Watcher` over the
//! member's `WatchHub`, fed by apply as the apply thread feeds it), and checked for
//! completeness: each delivers exactly the events the store's history holds for its range,
//! in revision order, none missing, none twice, none invented.
//!
//! Every member starts two on the register keys: one from revision 1 (it catches up from
//! history, and across compactions and snapshots) and one from the present. A watcher whose
//! history was compacted away is cancelled, as etcd cancels it, and started again from the
//! present, as a client would.

use std::sync::Arc;

use bytes::Bytes;
use flotilla_proto::mvccpb::Event;
use flotilla_raft::NodeId;
use flotilla_server::watch::hub::WatchedRange;
use flotilla_server::watch::watcher::{Sources, Step, WatchSpec, Watcher};
use tokio::sync::Notify;

use super::{Member, SimNode, Simulation};
use crate::storage::SimStorage;

/// The range every simulated watcher watches: the register keys.
const WATCHED_PREFIX: &[u8] = b"reg/";
const WATCHED_END: &[u8] = b"reg0";

/// Steps one watcher may take after one apply (each is bounded work in the watch code).
const STEPS_MAX: usize = 10_000;

pub(super) struct SimWatcher {
    watcher: Watcher,
    /// The revision its expectations start at.
    from_revision: i64,
    /// How many events it has delivered since then.
    delivered: usize,
}

/// True if an event is one a register watcher must see.
pub(crate) fn is_watched(event: &Event) -> bool {
    event
        .kv
        .as_ref()
        .is_some_and(|kv| kv.key.starts_with(WATCHED_PREFIX))
}

fn spec() -> WatchSpec {
    WatchSpec {
        watch_id: 1,
        range: WatchedRange {
            key: Bytes::from_static(WATCHED_PREFIX),
            range_end: Bytes::from_static(WATCHED_END),
        },
        no_put: false,
        no_delete: false,
        prev_kv: false,
        progress_notify: false,
        fragment: false,
    }
}

impl<S: SimStorage> Member<S> {
    /// Starts a watcher from `start_revision` (0: the next revision), as a Watch request does.
    pub(super) fn start_watcher(&mut self, start_revision: i64) {
        let sources = Sources {
            state: &self.state,
            hub: &self.hub,
        };
        let (watcher, current) =
            Watcher::create(spec(), start_revision, sources, Arc::new(Notify::new()));
        let from_revision = if start_revision > 0 {
            start_revision
        } else {
            current + 1
        };
        self.watchers.push(SimWatcher {
            watcher,
            from_revision,
            delivered: 0,
        });
    }
}

impl<S: SimStorage> Simulation<S> {
    /// Lets member `id`'s watchers deliver what they can, and checks every event they deliver
    /// and, once a watcher is in sync, that it missed nothing.
    pub(super) fn step_watchers(&mut self, id: NodeId) {
        let Some(member) = self.nodes.get_mut(&id).and_then(SimNode::member_mut) else {
            return;
        };
        let expected = self.kv.watched_events();
        let mut restart = Vec::new();
        for (slot, sim_watcher) in member.watchers.iter_mut().enumerate() {
            let sources = Sources {
                state: &member.state,
                hub: &member.hub,
            };
            let start =
                expected.partition_point(|(revision, _)| *revision < sim_watcher.from_revision);
            let mut steps = 0;
            while sim_watcher.watcher.has_work() {
                steps += 1;
                assert!(steps <= STEPS_MAX, "node {id}: a watcher never caught up");
                match sim_watcher.watcher.step(sources) {
                    Step::Compacted(_) => {
                        restart.push(slot);
                        break;
                    }
                    Step::Batches(batches) => {
                        for event in batches.into_iter().flat_map(|batch| batch.events) {
                            let position = start + sim_watcher.delivered;
                            let want = expected.get(position).map(|(_, event)| event);
                            assert_eq!(
                                Some(&event),
                                want,
                                "watch: a watcher on node {id} from revision {} delivered, as \
                                 its event number {}, not the store's next event",
                                sim_watcher.from_revision,
                                sim_watcher.delivered
                            );
                            sim_watcher.delivered += 1;
                            self.report.watch_events_checked += 1;
                        }
                    }
                }
            }
            if sim_watcher.watcher.is_synced() {
                let current = member
                    .state
                    .read()
                    .expect("one thread: never poisoned")
                    .kv
                    .current_revision();
                let due = expected[start..]
                    .iter()
                    .take_while(|(revision, _)| *revision <= current)
                    .count();
                assert_eq!(
                    sim_watcher.delivered, due,
                    "watch: a watcher on node {id} from revision {} is in sync at revision \
                     {current} but delivered {} of the {due} events the store holds for it",
                    sim_watcher.from_revision, sim_watcher.delivered
                );
            }
        }
        // Cancelled by a compaction: a client watches again from the present.
        for slot in restart.into_iter().rev() {
            let mut cancelled = member.watchers.remove(slot);
            cancelled.watcher.close(&member.hub);
            member.start_watcher(0);
            self.report.watchers_restarted += 1;
        }
    }
}

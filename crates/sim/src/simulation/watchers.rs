//! Watchers on every member, run by the server's own watch code (`watch::Watcher` over the
//! member's `WatchHub`, fed by apply as the apply thread feeds it), and checked for
//! completeness: each delivers exactly the events the store's history holds for its range,
//! in revision order, none missing, none twice, none invented.
//!
//! Every member starts watchers on the register keys: one from revision 1 (it catches up from
//! history, and across compactions and snapshots), one from the present, and, when it restarts
//! with a history, one resuming a few revisions back (so two watchers catch up on one range
//! from different revisions and share their reads of history, as the server's stream task
//! steps them: `step_all`). A watcher whose history was compacted away is cancelled, as etcd
//! cancels it, and started again from the present, as a client would.

use std::sync::Arc;

use bytes::Bytes;
use flotilla_proto::etcdserverpb::WatchResponse;
use flotilla_proto::mvccpb::Event;
use flotilla_raft::NodeId;
use flotilla_server::watch::hub::WatchedRange;
use flotilla_server::watch::watcher::{Sources, Step, WatchSpec, Watcher, step_all};
use prost::Message as _;
use tokio::sync::Notify;

use super::etcd::{EtcdApp, EtcdMember};
use super::{SimNode, Simulation};
use crate::storage::SimStorage;

/// The range every simulated watcher watches: the register keys.
const WATCHED_PREFIX: &[u8] = b"reg/";
const WATCHED_END: &[u8] = b"reg0";

/// Rounds of steps the watchers may take after one apply (each step is bounded work in the
/// watch code).
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

/// How far back a restarted member's resuming watcher starts (see `start_node`).
pub(super) const RESUME_BEHIND_REVISIONS: i64 = 5;

impl EtcdMember {
    /// The store's revision.
    pub(super) fn current_revision(&self) -> i64 {
        let state = self.state.read().expect("one thread: never poisoned");
        state.kv.current_revision()
    }

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

impl<S: SimStorage> Simulation<S, EtcdApp> {
    /// Lets member `id`'s watchers deliver what they can, and checks every event they deliver
    /// and, once a watcher is in sync, that it missed nothing.
    pub(super) fn step_watchers(&mut self, id: NodeId) {
        let Some(member) = self.nodes.get_mut(&id).and_then(SimNode::member_mut) else {
            return;
        };
        let expected = self.app.kv.watched_events();
        let starts: Vec<usize> = member
            .app
            .watchers
            .iter()
            .map(|w| expected.partition_point(|(revision, _)| *revision < w.from_revision))
            .collect();
        let mut restart = Vec::new();
        // Every watcher with work steps together, as a stream's task steps its watchers
        // (catching-up ones sharing their reads of history), until none has work.
        let mut rounds = 0;
        loop {
            let sources = Sources {
                state: &member.app.state,
                hub: &member.app.hub,
            };
            let watchers = member.app.watchers.iter_mut().enumerate();
            let active = watchers.filter(|(slot, _)| !restart.contains(slot));
            let steps = step_all(active.map(|(slot, w)| (slot, &mut w.watcher)), sources);
            if steps.is_empty() {
                break;
            }
            rounds += 1;
            assert!(rounds <= STEPS_MAX, "node {id}: a watcher never caught up");
            for (slot, step) in steps {
                let sim_watcher = &mut member.app.watchers[slot];
                match step {
                    Step::Compacted(_) => restart.push(slot),
                    Step::Batches(batches) => {
                        for event in batches.into_iter().flat_map(|batch| batch.events) {
                            let position = starts[slot] + sim_watcher.delivered;
                            let want = expected.get(position).map(|(_, event)| event);
                            // As the client decodes it: an event's encoded entry is a whole
                            // WatchResponse holding that one event.
                            let wire = WatchResponse::decode(event.encoded().clone())
                                .expect("an event's encoding decodes")
                                .events;
                            assert_eq!(
                                wire,
                                [event.to_event()],
                                "watch: node {id} encodes an event otherwise than it holds it"
                            );
                            assert_eq!(
                                wire.first(),
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
        }
        let current = member.app.current_revision();
        for (slot, sim_watcher) in member.app.watchers.iter().enumerate() {
            if sim_watcher.watcher.is_synced() {
                let due = expected[starts[slot]..]
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
        restart.sort_unstable();
        // Cancelled by a compaction: a client watches again from the present.
        for slot in restart.into_iter().rev() {
            let mut cancelled = member.app.watchers.remove(slot);
            cancelled.watcher.close(&member.app.hub);
            member.app.start_watcher(0);
            self.report.watchers_restarted += 1;
        }
    }
}

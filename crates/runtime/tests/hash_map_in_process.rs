//! The replicated hash map of `examples/shared/hash_map.rs`, three members in one process on
//! the in-process network with in-memory storage: a template for testing a state machine of
//! your own under the runtime. Copy it, replace the state machine and the commands.

// Shared with the examples; each user of it uses a part.
#[allow(dead_code)]
#[path = "../examples/shared/hash_map.rs"]
mod hash_map;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use flotilla_runtime::raft::{ConfChange, ConfChangeStep};
use flotilla_runtime::{
    Config, DurableStorage, LocalNetwork, MemDurable, Membership, NoMetrics, NodeError, NodeHandle,
    NodeId, NodeOptions, NodeParts, Refusal, Role, RunningNode, raft::MemStorage,
};
use hash_map::{Command, HashMap, Outcome};
use tokio::sync::watch;

/// Long enough for any election here; a test that needs it has failed.
const DEADLINE: Duration = Duration::from_secs(20);
const VOTERS: [NodeId; 3] = [1, 2, 3];

fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

/// A membership change of one step.
fn change(step: ConfChangeStep) -> ConfChange {
    ConfChange {
        steps: vec![step],
        context: Default::default(),
    }
}

type Handle = NodeHandle<HashMap, NoMetrics>;

/// One member: its node and what stops it.
struct Member {
    running: RunningNode<HashMap, NoMetrics>,
    stop: watch::Sender<bool>,
}

impl Member {
    fn start(network: &LocalNetwork, id: NodeId) -> Member {
        let mut raft = Config::new(id);
        // Keep few entries behind a snapshot, so that a member far behind needs the snapshot.
        raft.snapshot_trailing_entries = 10;
        Member::start_with(network, id, Membership::with_voters(VOTERS), raft)
    }

    /// A member whose storage starts with `membership`: the cluster's voters for a founding
    /// member, none for one the cluster will add (it waits to hear from the leader).
    fn start_with(
        network: &LocalNetwork,
        id: NodeId,
        membership: Membership,
        raft: Config,
    ) -> Member {
        let storage: Arc<dyn DurableStorage> =
            Arc::new(MemDurable::new(MemStorage::new_with_membership(membership)));
        let joined = network.join(id);
        let (stop, shutdown) = watch::channel(false);
        let options = NodeOptions {
            // Elections in 100-200 ms: the test is quick, and still far from the scheduler's
            // granularity.
            tick: Duration::from_millis(10),
            ..NodeOptions::new(raft)
        };
        let running = flotilla_runtime::start(NodeParts {
            options,
            storage,
            state: Arc::new(RwLock::new(HashMap::default())),
            transport: joined.transport,
            inbox: joined.inbox,
            transport_events: joined.events,
            metrics: Arc::new(NoMetrics),
            shutdown,
        })
        .expect("start the node");
        Member { running, stop }
    }

    fn handle(&self) -> &Handle {
        &self.running.handle
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.running.join().await.expect("the node stops cleanly");
    }
}

fn start_cluster(network: &LocalNetwork) -> Vec<Member> {
    VOTERS
        .iter()
        .map(|&id| Member::start(network, id))
        .collect()
}

async fn stop_all(members: Vec<Member>) {
    for member in members {
        member.stop().await;
    }
}

/// Waits until some member other than `former` leads and the others follow it.
async fn leader_among(members: &[&Member], former: Option<NodeId>) -> NodeId {
    let deadline = deadline();
    let first = members[0]
        .handle()
        .wait_for(deadline, |s| s.leader.is_some() && s.leader != former)
        .await
        .expect("a leader within the deadline");
    let leader = first.leader.expect("waited for it");
    for member in members {
        let agreed = member
            .handle()
            .wait_for(deadline, |s| s.leader == Some(leader))
            .await;
        assert!(
            agreed.is_some(),
            "member {} never followed {leader}",
            member.handle().id()
        );
    }
    leader
}

fn member<'a>(members: &[&'a Member], id: NodeId) -> &'a Member {
    members
        .iter()
        .find(|m| m.handle().id() == id)
        .expect("a member of the cluster")
}

async fn put(handle: &Handle, key: &str, value: &str) -> Result<Outcome, NodeError> {
    let command = Command::Put {
        key: key.into(),
        value: value.into(),
    };
    handle.propose(command.encode(), deadline()).await
}

/// A linearizable read: the member confirms with a quorum that it may serve the read
/// (ReadIndex), waits until it has applied that far, then reads its own table.
async fn read(handle: &Handle, key: &str) -> Option<String> {
    handle.read_index(deadline()).await.expect("a read barrier");
    handle.state.read().unwrap().get(key).map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_agree_and_go_on_without_one() {
    let network = LocalNetwork::new();
    let members = start_cluster(&network);
    let all: Vec<&Member> = members.iter().collect();
    let leader = leader_among(&all, None).await;

    // Writes go through the leader; a follower refuses them and names the leader.
    for i in 0..50 {
        let outcome = put(member(&all, leader).handle(), &format!("k{i}"), "one").await;
        assert_eq!(outcome.unwrap(), Outcome::Done { previous: None });
    }
    let follower = VOTERS.into_iter().find(|&id| id != leader).unwrap();
    let refused = put(member(&all, follower).handle(), "k0", "two").await;
    assert!(
        matches!(refused, Err(NodeError::Refused(Refusal::NotLeader(Some(l)))) if l == leader),
        "{refused:?}"
    );
    // A malformed command is committed like any other and refused alike everywhere.
    let malformed = member(&all, leader)
        .handle()
        .propose("get k0".into(), deadline())
        .await
        .unwrap();
    assert!(matches!(malformed, Outcome::Malformed(_)), "{malformed:?}");

    // Every member reads every write, linearizably, from its own table.
    for member in &all {
        assert_eq!(read(member.handle(), "k49").await.as_deref(), Some("one"));
    }

    // The leader stops; the two others elect a new one and go on.
    let mut members = members;
    let position = members
        .iter()
        .position(|m| m.handle().id() == leader)
        .unwrap();
    members.remove(position).stop().await;
    let survivors: Vec<&Member> = members.iter().collect();
    let new_leader = leader_among(&survivors, Some(leader)).await;
    assert_ne!(new_leader, leader);
    let outcome = put(member(&survivors, new_leader).handle(), "k0", "two").await;
    assert_eq!(
        outcome.unwrap(),
        Outcome::Done {
            previous: Some("one".into())
        }
    );
    for member in &survivors {
        assert_eq!(read(member.handle(), "k0").await.as_deref(), Some("two"));
        assert_eq!(read(member.handle(), "k1").await.as_deref(), Some("one"));
    }
    stop_all(members).await;
}

/// An isolated leader cannot commit: its proposal fails or times out, never succeeds, while
/// the majority elects a new leader whose writes succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_commits_nothing() {
    let network = LocalNetwork::new();
    let members = start_cluster(&network);
    let all: Vec<&Member> = members.iter().collect();
    let leader = leader_among(&all, None).await;
    network.isolate(leader);

    let isolated = member(&all, leader).handle();
    let lost = isolated
        .propose(
            Command::Put {
                key: "lost".into(),
                value: "x".into(),
            }
            .encode(),
            Instant::now() + Duration::from_secs(2),
        )
        .await;
    assert!(lost.is_err(), "an isolated leader committed: {lost:?}");

    let majority: Vec<&Member> = all
        .iter()
        .copied()
        .filter(|m| m.handle().id() != leader)
        .collect();
    let new_leader = leader_among(&majority, Some(leader)).await;
    put(member(&majority, new_leader).handle(), "kept", "y")
        .await
        .unwrap();

    network.heal();
    let rejoined = isolated
        .wait_for(deadline(), |s| s.leader == Some(new_leader))
        .await;
    assert!(
        rejoined.is_some(),
        "the old leader never followed the new one"
    );
    assert_eq!(read(isolated, "kept").await.as_deref(), Some("y"));
    assert_eq!(read(isolated, "lost").await, None);
    stop_all(members).await;
}

/// Bad requests get typed errors that say what was wrong, and the cluster goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_what_was_wrong() {
    use flotilla_runtime::raft::{Error, MembershipError};

    let network = LocalNetwork::new();
    let members = start_cluster(&network);
    let all: Vec<&Member> = members.iter().collect();
    let leader = member(&all, leader_among(&all, None).await).handle();

    let huge = Command::Put {
        key: "huge".into(),
        value: "x".repeat(9 << 20),
    };
    let refused = leader.propose(huge.encode(), deadline()).await;
    assert!(
        matches!(
            refused,
            Err(NodeError::Refused(Refusal::TooLarge { limit_bytes, .. })) if limit_bytes == 8 << 20
        ),
        "{refused:?}"
    );

    let unknown = leader
        .transfer_leader(Some(9), Vec::new(), deadline())
        .await;
    assert!(
        matches!(
            unknown,
            Err(NodeError::Refused(Refusal::Refused(Error::NotAVoter(9))))
        ),
        "{unknown:?}"
    );
    let remove_unknown = leader
        .propose_membership(change(ConfChangeStep::Remove(9)), deadline())
        .await;
    assert!(
        matches!(
            remove_unknown,
            Err(NodeError::Refused(Refusal::Refused(Error::Membership(
                MembershipError::UnknownMember(9)
            ))))
        ),
        "{remove_unknown:?}"
    );

    // A second change sent right behind the first finds it pending (uncommitted until a
    // quorum has it on disk) and is refused as in progress; were the first committed already,
    // the second would apply. Never anything else.
    let first = leader.propose_membership(change(ConfChangeStep::AddLearner(4)), deadline());
    let second = leader.propose_membership(change(ConfChangeStep::AddLearner(5)), deadline());
    let (first, second) = tokio::join!(first, second);
    assert!(first.is_ok(), "{first:?}");
    assert!(
        matches!(
            second,
            Ok(_)
                | Err(NodeError::Refused(Refusal::Refused(
                    Error::MembershipChangeInProgress { .. }
                )))
        ),
        "{second:?}"
    );

    put(leader, "after", "ok")
        .await
        .expect("the cluster goes on");
    stop_all(members).await;
}

/// Membership and leadership through the handle: a fourth member joins as a learner, catches
/// up from a snapshot (the log before it was compacted), is promoted, and takes leadership by
/// a transfer; then a founding member is removed, and the majority is counted without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_by_snapshot_is_promoted_and_takes_over() {
    use flotilla_runtime::raft::SnapshotPolicy;

    let network = LocalNetwork::new();
    let mut members = start_cluster(&network);
    let all: Vec<&Member> = members.iter().collect();
    let leader = member(&all, leader_among(&all, None).await)
        .handle()
        .clone();
    for i in 0..100 {
        put(&leader, &format!("k{i}"), "before").await.unwrap();
    }
    // A snapshot now, and the log compacted behind it: the new member can only catch up from
    // the snapshot.
    leader.save_snapshot().await.unwrap();
    let saved = leader.wait_for(deadline(), |s| s.snapshot_index > 0).await;
    assert!(saved.is_some(), "the leader saved no snapshot");

    // Added before it runs: the leader's first messages to it are lost, as when a member is
    // added before its process starts.
    leader
        .propose_membership(change(ConfChangeStep::AddLearner(4)), deadline())
        .await
        .expect("add a learner");
    let mut raft = Config::new(4);
    raft.snapshot_policy = SnapshotPolicy {
        entries_max: 1_000,
        bytes_max: 1 << 20,
    };
    members.push(Member::start_with(&network, 4, Membership::default(), raft));
    let joined = members[3].handle().clone();
    let learner = joined
        .wait_for(deadline(), |s| s.is_learner && s.applied >= 100)
        .await;
    assert!(
        learner.is_some(),
        "the learner never caught up: {:?}",
        joined.status()
    );
    assert!(
        joined.status().snapshot_index > 0,
        "it caught up from a snapshot"
    );

    leader
        .propose_membership(change(ConfChangeStep::Promote(4)), deadline())
        .await
        .expect("promote the learner");
    let target = leader
        .transfer_leader(Some(4), Vec::new(), deadline())
        .await
        .expect("hand leadership to member 4");
    assert_eq!(target, 4);
    let led = joined
        .wait_for(deadline(), |s| s.role == Role::Leader)
        .await;
    assert!(led.is_some(), "member 4 never took over");
    assert_eq!(
        put(&joined, "k0", "after").await.unwrap(),
        Outcome::Done {
            previous: Some("before".into())
        }
    );

    // A founding member is removed. Then it and another founding member stop: the two left
    // are a majority of the three voters after the removal (they would not be of the four
    // before it), so writes go on.
    let removed = leader.id();
    joined
        .propose_membership(change(ConfChangeStep::Remove(removed)), deadline())
        .await
        .expect("remove a member");
    let other = VOTERS.into_iter().find(|&id| id != removed).unwrap();
    for id in [removed, other] {
        let position = members.iter().position(|m| m.handle().id() == id).unwrap();
        members.remove(position).stop().await;
    }
    let outcome = put(&joined, "k1", "after").await;
    assert!(
        outcome.is_ok(),
        "no majority after the removal: {outcome:?}"
    );
    stop_all(members).await;
}

//! The replicated hash map of `examples/shared/hash_map.rs`, three members in one process on
//! the in-process network with in-memory storage: a template for testing a state machine of
//! your own under the runtime. Copy it, replace the state machine and the commands.

// Shared with the examples; each user of it uses a part.
#[allow(dead_code)]
#[path = "../examples/shared/hash_map.rs"]
mod hash_map;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use flotilla_runtime::{
    Config, DurableStorage, LocalNetwork, MemDurable, Membership, NoMetrics, NodeError, NodeHandle,
    NodeId, NodeOptions, NodeParts, Refusal, RunningNode, raft::MemStorage,
};
use hash_map::{Command, HashMap, Outcome};
use tokio::sync::watch;

/// Long enough for any election here; a test that needs it has failed.
const DEADLINE: Duration = Duration::from_secs(20);
const VOTERS: [NodeId; 3] = [1, 2, 3];

type Handle = NodeHandle<HashMap, NoMetrics>;

/// One member: its node and what stops it.
struct Member {
    running: RunningNode<HashMap, NoMetrics>,
    stop: watch::Sender<bool>,
}

impl Member {
    fn start(network: &LocalNetwork, id: NodeId) -> Member {
        let storage: Arc<dyn DurableStorage> = Arc::new(MemDurable::new(
            MemStorage::new_with_membership(Membership::with_voters(VOTERS)),
        ));
        let joined = network.join(id);
        let (stop, shutdown) = watch::channel(false);
        let options = NodeOptions {
            // Elections in 100-200 ms: the test is quick, and still far from the scheduler's
            // granularity.
            tick: Duration::from_millis(10),
            ..NodeOptions::new(Config::new(id))
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
    let deadline = Instant::now() + DEADLINE;
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
    handle
        .propose(command.encode(), Instant::now() + DEADLINE)
        .await
}

/// A linearizable read: the member confirms with a quorum that it may serve the read
/// (ReadIndex), waits until it has applied that far, then reads its own table.
async fn read(handle: &Handle, key: &str) -> Option<String> {
    handle
        .read_index(Instant::now() + DEADLINE)
        .await
        .expect("a read barrier");
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
        .propose("get k0".into(), Instant::now() + DEADLINE)
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
        .wait_for(Instant::now() + DEADLINE, |s| s.leader == Some(new_leader))
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
    use flotilla_runtime::raft::{ConfChange, ConfChangeStep, Error, MembershipError};

    let change = |step| ConfChange {
        steps: vec![step],
        context: Default::default(),
    };

    let network = LocalNetwork::new();
    let members = start_cluster(&network);
    let all: Vec<&Member> = members.iter().collect();
    let leader = member(&all, leader_among(&all, None).await).handle();
    let deadline = || Instant::now() + DEADLINE;

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

mod common;

use bytes::Bytes;
use common::*;
use flotilla_raft::{ConfChange, ConfChangeStep, MemStorage, Membership};

#[test]
fn three_nodes_elect_replicate_and_commit() {
    let mut net = Network::new(&[1, 2, 3], config);
    net.campaign(1);
    assert_eq!(net.leader(), Some(1));
    net.propose(1, "a");
    net.propose(1, "b");
    net.tick_all(2);
    for id in [1, 2, 3] {
        assert_eq!(net.applied_commands(id), vec!["a", "b"], "node {id}");
    }
}

/// Thesis §6.4: a follower forwards a read to the leader. If the request is lost while the
/// leader stays the same, the read must not wait forever (nor hold a slot of the bounded
/// queue): it fails after an election timeout, and not before.
#[test]
fn a_forwarded_read_whose_request_is_lost_times_out() {
    let mut net = Network::new(&[1, 2, 3], config);
    net.campaign(1);
    net.propose(1, "a");
    net.cut.insert((2, 1));
    net.node(2).read_index(7).unwrap();
    net.tick(2, 9);
    assert!(
        net.reads_failed
            .get(&2)
            .is_none_or(|failed| failed.is_empty()),
        "not yet"
    );
    net.tick(2, 1);
    assert_eq!(
        net.reads_failed[&2],
        vec![(7, flotilla_raft::ReadFailure::TimedOut)]
    );
    assert_eq!(net.node(2).leader(), Some(1), "the leader did not change");
    // With the link healed, a new read is served.
    net.heal();
    net.node(2).read_index(8).unwrap();
    net.deliver();
    net.tick_all(1);
    assert_eq!(
        net.reads[&2].iter().map(|r| r.context).collect::<Vec<_>>(),
        vec![8]
    );
}

/// A member added while it cannot be reached (its process not started yet, its address not
/// known) loses the leader's first probe. Once it can be reached it must catch up at the next
/// heartbeat response, even if nothing new is written: the leader does not know where its
/// log ends, and that is reason enough to probe again.
#[test]
fn a_member_added_before_it_is_reachable_catches_up_on_an_idle_cluster() {
    let mut net = Network::new(&[1, 2, 3], config);
    net.campaign(1);
    net.propose(1, "a");
    net.propose(1, "b");
    let change = ConfChange {
        steps: vec![ConfChangeStep::AddLearner(4)],
        context: Bytes::new(),
    };
    net.node(1).propose_membership(change).unwrap();
    // Node 4 is not in the network yet: everything sent to it is lost, and the transport
    // says so, as a real one does when it cannot connect.
    net.tick_all(3);
    net.node(1).report_unreachable(4);
    net.tick_all(1);
    net.node(1).report_unreachable(4);
    let storage = MemStorage::new_with_membership(Membership::default());
    net.nodes.insert(4, new_node(config(4), storage));
    net.tick_all(3);
    let leader_last = net.node(1).last_id();
    assert_eq!(net.node(4).last_id(), leader_last, "the learner caught up");
    assert_eq!(net.node(4).committed(), net.node(1).committed());
}

/// A member added later catches up from the leader's log, which does not hold the founders'
/// configuration (it is in their storage). A snapshot it took of an index before the first
/// configuration entry would carry a configuration without voters, and a founder installing it
/// would conclude it had been removed (found by the simulator: a joiner became leader and sent
/// such a snapshot). The core refuses that snapshot, and takes one once the index is past a
/// configuration entry.
#[test]
fn a_joiner_takes_no_snapshot_of_a_configuration_it_never_saw() {
    let mut net = Network::new(&[1, 2, 3], config);
    net.campaign(1);
    let before_change = net.propose(1, "a");
    let change = ConfChange {
        steps: vec![ConfChangeStep::AddLearner(4)],
        context: Bytes::new(),
    };
    net.node(1).propose_membership(change).unwrap();
    let storage = MemStorage::new_with_membership(Membership::default());
    net.nodes.insert(4, new_node(config(4), storage));
    net.tick_all(3);
    let caught_up = net.node(1).committed();
    assert_eq!(
        net.node(4).applied(),
        caught_up,
        "the learner caught up and applied"
    );
    assert!(
        matches!(
            net.node(4).snapshot_meta(before_change.index),
            Err(flotilla_raft::Error::InvalidSnapshot { .. })
        ),
        "a snapshot of an index whose configuration the joiner never saw"
    );
    let meta = net.node(4).snapshot_meta(caught_up).unwrap();
    assert_eq!(meta.membership, net.node(1).membership().clone());
    // A founder knows the configuration at every index.
    let founder = net.node(2).snapshot_meta(before_change.index).unwrap();
    assert_eq!(founder.membership.voters.len(), 3);
}

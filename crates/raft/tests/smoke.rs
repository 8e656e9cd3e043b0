mod common;

use common::*;

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

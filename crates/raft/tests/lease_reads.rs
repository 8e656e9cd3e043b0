//! Leader leases for reads (thesis §6.4.1): when a leader may answer a read without a heartbeat
//! round, and every way it loses that right.

mod common;

use common::*;
use flotilla_raft::*;

/// Election timeout T = 10 ticks: a lease lasts until T - 2 = 8 ticks after the acknowledged
/// round was sent.
fn lease_config(id: NodeId) -> Config {
    let mut config = config(id);
    config.lease_reads = true;
    config
}

/// A 3-node cluster with lease reads and node 1 leading, its first entry committed. The nodes
/// first let an election timeout pass: until then they ignore elections (they may have
/// acknowledged a leader before a restart).
fn leased_cluster() -> Network {
    let mut net = Network::new(&[1, 2, 3], lease_config);
    net.tick_all(10);
    net.campaign(1);
    assert_eq!(net.leader(), Some(1));
    net.propose(1, "a");
    net
}

#[test]
fn lease_reads_are_off_by_default() {
    let mut net = Network::new(&[1, 2, 3], config);
    net.campaign(1);
    net.propose(1, "a");
    net.tick(1, 1);
    assert_eq!(net.node(1).lease_read_index(), None);
}

#[test]
fn lease_reads_need_check_quorum() {
    let mut config = lease_config(1);
    config.check_quorum = false;
    let err = config.validate().unwrap_err();
    assert!(err.0.contains("check_quorum"), "{err}");
}

#[test]
fn a_heartbeat_acknowledged_by_a_quorum_gives_a_lease_of_t_minus_2_ticks_from_its_sending() {
    let mut net = leased_cluster();
    let commit = net.node(1).committed();
    net.tick(1, 1);
    let sent_tick = net.node(1).ticks();
    let lease = net
        .node(1)
        .lease_read_index()
        .expect("a quorum acknowledged the heartbeat");
    assert_eq!(
        lease,
        LeaseRead {
            index: commit,
            sent_tick,
            expires_tick: sent_tick + 8,
        }
    );

    // Cut off, the leader keeps its lease for exactly 8 more ticks, then loses it.
    net.isolate(1);
    for _ in 0..8 {
        net.tick(1, 1);
        assert!(
            net.node(1).lease_read_index().is_some(),
            "tick {}",
            net.node(1).ticks()
        );
    }
    net.tick(1, 1);
    assert_eq!(net.node(1).lease_read_index(), None);
    assert!(
        net.node(1).is_leader(),
        "still leader: only the lease ran out"
    );
}

#[test]
fn one_acknowledgement_of_two_followers_keeps_the_lease() {
    let mut net = leased_cluster();
    net.cut.insert((1, 3));
    net.cut.insert((3, 1));
    for _ in 0..20 {
        net.tick(1, 1);
    }
    let ticks = net.node(1).ticks();
    let lease = net
        .node(1)
        .lease_read_index()
        .expect("node 2 makes a quorum");
    assert_eq!(lease.sent_tick, ticks);
}

#[test]
fn the_lease_index_is_the_commit_index_and_follows_it() {
    let mut net = leased_cluster();
    net.propose(1, "b");
    net.propose(1, "c");
    net.tick(1, 1);
    let commit = net.node(1).committed();
    assert_eq!(net.node(1).lease_read_index().unwrap().index, commit);
}

#[test]
fn a_follower_or_a_deposed_leader_has_no_lease() {
    let mut net = leased_cluster();
    net.tick(1, 1);
    assert_eq!(net.node(2).lease_read_index(), None, "a follower");
    // Node 1 is cut off: after an election timeout check-quorum deposes it.
    net.isolate(1);
    net.tick_all(30);
    assert!(!net.node(1).is_leader(), "check-quorum deposed it");
    assert_eq!(net.node(1).lease_read_index(), None);
}

#[test]
fn a_leader_that_sent_timeout_now_serves_no_lease_read_again_in_its_term() {
    let mut net = leased_cluster();
    net.tick(1, 1);
    assert!(net.node(1).lease_read_index().is_some());
    // The TimeoutNow to node 2 is lost, so node 1 stays leader and node 3 keeps acknowledging.
    net.cut.insert((1, 2));
    net.node(1).transfer_leader(2).unwrap();
    net.deliver();
    assert_eq!(net.node(1).lease_read_index(), None);
    // The transfer is abandoned after an election timeout; the lease stays revoked, since the
    // TimeoutNow might still arrive and its election ignores the followers' leases.
    for _ in 0..12 {
        net.tick(1, 1);
    }
    net.heal();
    net.tick(1, 1);
    assert!(net.node(1).is_leader());
    assert_eq!(net.node(1).lease_read_index(), None);
}

#[test]
fn with_lease_reads_a_node_ignores_elections_for_an_election_timeout_after_it_starts() {
    // Without lease reads, a fresh node grants at once.
    let mut net = Network::new(&[1, 2, 3], config);
    net.campaign(1);
    assert_eq!(net.leader(), Some(1));

    // With lease reads, it ignores the (pre-)votes until it has run T ticks.
    let mut net = Network::new(&[1, 2, 3], lease_config);
    net.campaign(1);
    assert_eq!(net.leader(), None);
    net.tick_all(9);
    net.campaign(1);
    assert_eq!(net.leader(), None, "9 ticks: still ignoring");
    net.tick_all(1);
    net.campaign(1);
    assert_eq!(net.leader(), Some(1));
}

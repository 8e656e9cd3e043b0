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

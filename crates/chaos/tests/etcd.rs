//! The harness against real etcd 3.4 in network namespaces: a correct cluster passes under kill -9; serializable
//! reads under partitions are caught as not linearizable (the checker can fail); the network
//! drops exactly the links asked for; nothing is left behind.
//!
//! They need root, `ip`, `nft` and the `etcd` binary, so they are ignored by the plain test
//! command (a run without them says "ignored", never "passed") and run explicitly by `.ci/run`:
//! `cargo nextest run --run-ignored only -p flotilla-chaos --test etcd`. Asked to run without
//! what they need, they fail saying what is missing.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_chaos::history::{pair_operations, read_jsonl};
use flotilla_chaos::linearizability::{DEFAULT_CONFIGURATIONS_MAX, check_register};
use flotilla_chaos::network::{Network, NetworkKind, namespaces_available};
use flotilla_chaos::{ChaosArgs, NemesisKind, SystemKind, Verdict, Workload, run_with_verdict};

/// The tests share the machine's nftables and namespaces, and check that nothing named after
/// this process is left: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Each scenario finishes well within this.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

/// Fails the test, saying what is missing, unless etcd, root, `ip` and `nft` are there.
fn require_etcd_and_namespaces() {
    let etcd = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        etcd,
        "this test needs the `etcd` binary (apt-get install etcd-server)"
    );
    assert!(
        namespaces_available(),
        "this test needs root with `ip` and `nft` (apt-get install iproute2 nftables)"
    );
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("flotilla-chaos-test-{}-{name}", std::process::id()))
}

fn args(out: PathBuf, nemesis: NemesisKind, duration: u64) -> ChaosArgs {
    ChaosArgs {
        members: 3,
        workload: Workload::Register,
        nemesis,
        duration,
        clients: 6,
        out,
        system: SystemKind::Etcd,
        binary: None,
        network: NetworkKind::Namespaces,
        serializable_reads: false,
        rate: 150,
        seed: Some(42),
    }
}

async fn bounded_run(args: ChaosArgs) -> Verdict {
    tokio::time::timeout(SCENARIO_TIMEOUT, run_with_verdict(args))
        .await
        .expect("the run exceeded its time bound")
}

fn command_output(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Nothing of this process's runs remains: no table, namespace or bridge named after it.
fn assert_nothing_left_behind() {
    let pid = std::process::id().to_string();
    let tables = command_output("nft", &["list", "tables"]);
    assert!(
        !tables.contains(&format!("flotilla_chaos_{pid}")),
        "{tables}"
    );
    let namespaces = command_output("ip", &["netns", "list"]);
    assert!(
        !namespaces.contains(&format!("flotilla-chaos-{pid}")),
        "{namespaces}"
    );
    let links = command_output("ip", &["-o", "link", "show"]);
    assert!(!links.contains(&format!("fchaos{pid}")), "{links}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root, ip, nft and etcd 3.4; .ci/run runs it"]
async fn a_correct_cluster_passes_and_stale_reads_are_caught() {
    require_etcd_and_namespaces();
    let _serial = ONE_AT_A_TIME.lock().await;
    let correct = scratch("correct");
    let verdict = bounded_run(args(correct.clone(), NemesisKind::Kill, 10)).await;
    assert_eq!(verdict, Verdict::Pass, "see {}", correct.display());
    assert!(correct.join("history.jsonl").exists());
    assert!(correct.join("logs/m0.log").exists());
    assert!(
        !correct.join("data").exists(),
        "a passing run drops member data"
    );
    assert_nothing_left_behind();

    let stale = scratch("stale");
    let mut stale_args = args(stale.clone(), NemesisKind::Partition, 15);
    stale_args.serializable_reads = true;
    // Seed 2's schedule isolates the leader from about 3 s to 10 s: a stale read is certain
    // (seed 42 began with a one-way-in cut, which need not give one, and had only 3 s of
    // isolation at the end).
    stale_args.seed = Some(2);
    let verdict = bounded_run(stale_args).await;
    assert_eq!(
        verdict,
        Verdict::Fail,
        "stale reads must be caught; see {}",
        stale.display()
    );
    // The history on disk says so too, checked afresh from the file.
    let events = read_jsonl(&stale.join("history.jsonl")).unwrap();
    let report = check_register(
        &pair_operations(&events).unwrap(),
        DEFAULT_CONFIGURATIONS_MAX,
    );
    assert!(!report.unwrap().is_linearizable());
    assert!(
        stale.join("data").exists(),
        "a failing run keeps member data"
    );
    assert_nothing_left_behind();

    let _ = std::fs::remove_dir_all(correct);
    let _ = std::fs::remove_dir_all(stale);
}

#[test]
#[ignore = "needs root, ip, nft and etcd 3.4; .ci/run runs it"]
fn partitions_are_nftables_set_elements_removed_with_the_network() {
    require_etcd_and_namespaces();
    let _serial = ONE_AT_A_TIME.blocking_lock();
    let mut network = Network::create(NetworkKind::Namespaces, 3).unwrap();
    let table = network.table().unwrap().to_string();
    assert_eq!(network.namespaces().len(), 3);
    network
        .set_blocked(BTreeSet::from([(0, 1), (2, 1)]))
        .unwrap();
    let set = command_output("nft", &["list", "set", "bridge", &table, "blocked"]);
    let (a, b, c) = (network.address(0), network.address(1), network.address(2));
    assert!(set.contains(&format!("{a} . {b}")), "{set}");
    assert!(set.contains(&format!("{c} . {b}")), "{set}");
    assert!(!set.contains(&format!("{b} . {a}")), "{set}");
    network.heal().unwrap();
    let healed = command_output("nft", &["list", "set", "bridge", &table, "blocked"]);
    assert!(!healed.contains(&a.to_string()), "{healed}");
    let namespaces = network.namespaces().to_vec();
    drop(network);
    let tables = command_output("nft", &["list", "tables"]);
    assert!(!tables.contains(&table), "{tables}");
    let listed = command_output("ip", &["netns", "list"]);
    for namespace in namespaces {
        assert!(!listed.contains(&namespace), "{listed}");
    }
}

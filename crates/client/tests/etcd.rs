//! The client and the CLI against real etcd 3.4 processes: plain-mode fallback, etcdctl-identical output, leader discovery,
//! move-leader, failover after the leader is killed, and a short bench.
//!
//! They need the `etcd` and `etcdctl` binaries, so they are ignored by the plain test command
//! (a run without them says "ignored", never "passed") and run explicitly by `.ci/run`, which
//! installs etcd: `cargo nextest run --run-ignored only -p flotilla-client --test etcd`. Asked
//! to run without etcd, they fail saying what is missing.

mod support;

use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::Parser;
use flotilla_client::cli::{ClientCommand, GlobalArgs, run_with_io};
use flotilla_client::{Client, ClientConfig, ClientError, Outcome, SessionMode};
use flotilla_proto::etcdserverpb::RangeRequest;
use support::{EtcdCluster, etcdctl_available, require_etcd};

/// Each test finishes well within this.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test exceeded its time bound")
}

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: ClientCommand,
}

/// Runs one of our CLI commands; returns its exit code and stdout.
async fn flotilla(endpoints: &[String], args: &[&str], stdin: &str) -> (ExitCode, String) {
    let endpoints = endpoints.join(",");
    let words = ["flotilla", "--endpoints", &endpoints]
        .into_iter()
        .chain(args.iter().copied());
    let cli = Cli::try_parse_from(words).unwrap();
    let mut out = Vec::new();
    let code = run_with_io(&cli.global, cli.command, &mut stdin.as_bytes(), &mut out)
        .await
        .unwrap();
    (code, String::from_utf8(out).unwrap())
}

/// Runs etcdctl (API v3) with the same arguments.
fn etcdctl(endpoints: &[String], args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoints.join(","))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
#[ignore = "needs etcd 3.4 (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn writes_fall_back_to_plain_mode_and_etcd_errors_are_definite() {
    require_etcd();
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let client = cluster.client().await;

        let put = client.put("k", "v1").await.unwrap();
        assert_eq!(
            client.session_mode(),
            SessionMode::Plain,
            "etcd has no Session service"
        );
        let revision = put.header.unwrap().revision;
        let got = client.get("k").await.unwrap();
        assert_eq!(&got.kvs[0].value[..], b"v1");

        let future = RangeRequest {
            key: "k".into(),
            revision: revision + 100,
            ..Default::default()
        };
        let error = client.range(future).await.unwrap_err();
        assert!(matches!(error, ClientError::Rejected(_)), "{error:?}");
        assert_eq!(
            error.to_string(),
            "etcdserver: mvcc: required revision is a future revision"
        );
        assert_eq!(error.outcome(), Outcome::NotApplied);
        let error = client.put("", "v").await.unwrap_err();
        assert_eq!(error.to_string(), "etcdserver: key is not provided");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs etcd 3.4 (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn cli_output_is_identical_to_etcdctl() {
    require_etcd();
    assert!(
        etcdctl_available(),
        "this test needs the `etcdctl` binary (apt-get install etcd-client)"
    );
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let endpoints = cluster.endpoints();
        for (key, value) in [("foo", "bar"), ("foo2", "bar 2"), ("other", "x")] {
            let (code, out) = flotilla(&endpoints, &["put", key, value], "").await;
            assert_eq!((code, out.as_str()), (ExitCode::SUCCESS, "OK\n"));
        }
        // Reads and a transaction that takes the read-only branch, so both tools see the same
        // revision.
        let read_only_txn =
            "value(\"foo\") = \"nope\"\n\nput foo never\n\nget foo\nget --prefix foo\n\n";
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["get", "foo"], ""),
            (vec!["get", "--prefix", "foo"], ""),
            (vec!["get", "--prefix", "foo", "-w", "json"], ""),
            (vec!["get", "--prefix", ""], ""),
            (vec!["get", "--from-key", "foo2"], ""),
            (vec!["get", "--prefix", "foo", "--keys-only"], ""),
            (
                vec!["get", "--prefix", "foo", "--limit", "1", "-w", "json"],
                "",
            ),
            (vec!["get", "foo", "--print-value-only"], ""),
            (vec!["get", "missing", "-w", "json"], ""),
            (
                vec![
                    "get",
                    "--prefix",
                    "foo",
                    "--sort-by",
                    "MODIFY",
                    "--order",
                    "DESCEND",
                ],
                "",
            ),
            (vec!["member", "list"], ""),
            (vec!["member", "list", "-w", "table"], ""),
            (vec!["member", "list", "-w", "json"], ""),
            (vec!["txn"], read_only_txn),
            (vec!["txn", "-w", "json"], read_only_txn),
        ];
        for (args, stdin) in cases {
            let (code, ours) = flotilla(&endpoints, &args, stdin).await;
            let theirs = etcdctl(&endpoints, &args, stdin);
            assert_eq!(code, ExitCode::SUCCESS, "{args:?}");
            assert_eq!(ours, theirs, "output of {args:?} differs from etcdctl's");
        }
        // Writes print the same too (each tool on its own key).
        let (_, ours) = flotilla(&endpoints, &["del", "--prefix", "foo"], "").await;
        assert_eq!(ours, "2\n");
        let theirs = etcdctl(&endpoints, &["del", "other"], "");
        assert_eq!(theirs, "1\n");
        // Unsupported table output and bad input use etcdctl's exit codes.
        assert_eq!(
            flotilla(&endpoints, &["get", "foo", "-w", "table"], "")
                .await
                .0,
            ExitCode::from(4)
        );
        assert_eq!(
            flotilla(&endpoints, &["txn"], "bogus\n\n").await.0,
            ExitCode::from(3)
        );
        assert_eq!(
            flotilla(&endpoints, &["get", "foo", "--rev", "999"], "")
                .await
                .0,
            ExitCode::from(1)
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs etcd 3.4 (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn leader_discovery_move_leader_status_and_failover_on_a_three_member_cluster() {
    require_etcd();
    bounded(async {
        let mut cluster = EtcdCluster::start(3).await;
        let endpoints = cluster.endpoints();
        let config =
            ClientConfig::new(endpoints.clone()).with_call_timeout(Duration::from_secs(15));
        let client = Client::connect(config).await.unwrap();

        let leader = client.find_leader().await.unwrap();
        assert_eq!(leader.member_id, cluster.await_leader().await);

        // `status`: one row per endpoint, exactly one of them the leader.
        let (code, table) = flotilla(&endpoints, &["status"], "").await;
        assert_eq!(code, ExitCode::SUCCESS);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 3, "{table}");
        assert_eq!(
            rows.iter()
                .filter(|row| row.split(", ").nth(4) == Some("true"))
                .count(),
            1
        );

        // move-leader to a follower, through the CLI.
        let members = client.member_list().await.unwrap().members;
        let target = members
            .iter()
            .find(|member| member.id != leader.member_id)
            .unwrap()
            .id;
        let (code, out) = flotilla(&endpoints, &["move-leader", &format!("{target:x}")], "").await;
        assert_eq!(code, ExitCode::SUCCESS, "{out}");
        assert_eq!(
            out,
            format!(
                "Leadership transferred from {:x} to {target:x}\n",
                leader.member_id
            )
        );
        assert_eq!(cluster.await_leader().await, target);

        // Kill the leader. During the election etcd may answer a forwarded write with
        // "request timed out": without sessions (etcd has none) that is an unknown outcome,
        // never a wrong "not applied".
        client.put("before", "1").await.unwrap();
        let leader_index = cluster.index_of(target).await;
        cluster.members[leader_index].kill();
        match client.put("during", "1").await {
            Ok(_) => {}
            Err(error) => assert_eq!(error.outcome(), Outcome::Unknown, "{error:?}"),
        }
        // Once a new leader is elected, writes routed to the dead one fail over.
        cluster.await_leader().await;
        client
            .put("after", "2")
            .await
            .expect("the write fails over to the new leader");
        let got = client.get("after").await.unwrap();
        assert_eq!(&got.kvs[0].value[..], b"2");
        let new_leader = client.find_leader().await.unwrap();
        assert_ne!(new_leader.member_id, target);

        // Status reports the dead endpoint as an error and exits 1.
        let (code, out) = flotilla(&endpoints, &["status", "-w", "json"], "").await;
        assert_eq!(code, ExitCode::from(1));
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(rows.as_array().unwrap().len(), 2);
    })
    .await;
}

#[tokio::test]
#[ignore = "needs etcd 3.4 (apt-get install etcd-server etcd-client); .ci/run runs it"]
async fn bench_reports_throughput_and_percentiles() {
    require_etcd();
    bounded(async {
        let cluster = EtcdCluster::start(1).await;
        let args = [
            "bench",
            "--clients",
            "4",
            "--duration",
            "1s",
            "--read-ratio",
            "0.5",
            "--json",
        ];
        let (code, out) = flotilla(&cluster.endpoints(), &args, "").await;
        assert_eq!(code, ExitCode::SUCCESS, "{out}");
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        for kind in ["writes", "reads"] {
            let stats = &report[kind];
            assert!(stats["count"].as_u64().unwrap() > 0, "{report}");
            assert_eq!(stats["errors"].as_u64(), Some(0), "{report}");
            let latency = &stats["latency_ms"];
            let p50 = latency["p50"].as_f64().unwrap();
            let p999 = latency["p99.9"].as_f64().unwrap();
            assert!(p50 > 0.0 && p50 <= p999, "{report}");
        }
        // The keys written are 256-byte values under the bench prefix.
        let client = cluster.client().await;
        let request = RangeRequest {
            key: "bench/".into(),
            range_end: flotilla_client::prefix_range_end(b"bench/"),
            limit: 1,
            ..Default::default()
        };
        let written = client.range(request).await.unwrap();
        assert_eq!(written.kvs[0].value.len(), 256);
    })
    .await;
}

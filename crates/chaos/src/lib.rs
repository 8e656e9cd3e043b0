//! # flotilla-chaos: fault injection on a real cluster, with linearizability checking
//!
//! Flotilla's Jepsen. `flotilla chaos` starts a cluster of real server processes (flotilla,
//! or etcd to validate the harness), each in its own network namespace with its own data
//! directory; runs concurrent client workers that record every operation and its outcome
//! (`ok`, `fail`, `info`); runs a nemesis that kills, pauses, partitions, moves leadership,
//! removes and re-adds members and restarts the cluster member by member; heals; waits for
//! health; reads the final state; and checks the history:
//!
//! - **register** ([`linearizability`]): reads, writes and compare-and-set on rotating keys,
//!   checked for linearizability per key, Wing & Gong / Lowe style with memoisation;
//! - **set**, **counter**, **watch** ([`checkers`]): lost or phantom elements; increments
//!   lost or applied twice (through the client's duplicate-suppressing sessions); watchers
//!   whose events differ from the write history.
//!
//! The last line printed is the verdict; the exit status is 0 only when no anomaly was
//! found. `DIR/history.jsonl` holds the history ([`history`] documents the format),
//! `DIR/logs/` each member's output, `DIR/nemesis.log` the faults' timeline.
//!
//! The module layout follows a run: [`network`] (namespaces, bridge, nftables), [`cluster`]
//! (processes), [`nemesis`] (faults), [`workloads`] and [`watcher`] (clients), `run` (the
//! orchestration), then the checkers.

pub mod checkers;
pub mod cluster;
pub mod history;
pub mod linearizability;
pub mod nemesis;
pub mod network;
pub mod rng;
mod run;
pub mod watcher;
pub mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;

pub use cluster::SystemKind;
pub use nemesis::NemesisKind;
pub use network::NetworkKind;
pub use run::{Verdict, run, run_with_verdict};

/// What the clients do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Reads, writes and compare-and-set on a few keys; checked for linearizability.
    Register,
    /// Unique adds under a prefix; every acknowledged add must survive.
    Set,
    /// Increments with retries through client sessions; none lost, none applied twice.
    Counter,
    /// Watchers on every member, resumed after disconnects, against the write history.
    Watch,
}

fn parse_members(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(members @ (3 | 5)) => Ok(members),
        _ => Err("the cluster has 3 or 5 members".into()),
    }
}

/// `flotilla chaos`: one run of a workload under a nemesis, checked.
#[derive(clap::Args, Clone, Debug)]
pub struct ChaosArgs {
    /// Cluster size: 3 or 5.
    #[arg(long, default_value = "3", value_parser = parse_members)]
    pub members: usize,
    #[arg(long, value_enum, default_value_t = Workload::Register)]
    pub workload: Workload,
    #[arg(long, value_enum, default_value_t = NemesisKind::Mixed)]
    pub nemesis: NemesisKind,
    /// How long the workload and the faults run, in seconds (healing and checking follow).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Concurrent client workers.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Where the history, the member logs and the summary go.
    #[arg(long)]
    pub out: PathBuf,
    /// The system under test (etcd validates the harness itself).
    #[arg(long, value_enum, default_value_t = SystemKind::Flotilla, env = "FLOTILLA_CHAOS_SYSTEM", hide = true)]
    pub system: SystemKind,
    /// The server binary (default: this `flotilla`, or `etcd` on the PATH).
    #[arg(long, env = "FLOTILLA_CHAOS_BINARY", hide = true)]
    pub binary: Option<PathBuf>,
    /// Where members live: namespaces (partitions; root) or loopback (no partitions).
    #[arg(long, value_enum, default_value_t = NetworkKind::Namespaces, hide = true)]
    pub network: NetworkKind,
    /// Serializable (local, possibly stale) reads in the register workload: a run under
    /// partitions must then be found NOT linearizable, which shows the checker can fail.
    #[arg(long, hide = true)]
    pub serializable_reads: bool,
    /// Operations per second, all workers together.
    #[arg(long, default_value_t = 200, hide = true)]
    pub rate: u32,
    /// Seed of the workload's and the nemesis's choices (default: from the clock).
    #[arg(long, hide = true)]
    pub seed: Option<u64>,
}

/// Runs `flotilla chaos` on a runtime of its own (for a synchronous `main`).
pub fn run_blocking(args: ChaosArgs) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(error) => {
            eprintln!("flotilla chaos: cannot start the runtime: {error}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        chaos: ChaosArgs,
    }

    #[test]
    fn the_documented_command_line_parses() {
        let cli = Cli::try_parse_from([
            "flotilla",
            "--members",
            "5",
            "--workload",
            "set",
            "--nemesis",
            "membership",
            "--duration",
            "30",
            "--clients",
            "4",
            "--out",
            "/tmp/x",
        ])
        .unwrap();
        let args = cli.chaos;
        assert_eq!(args.members, 5);
        assert_eq!(args.workload, Workload::Set);
        assert_eq!(args.nemesis, NemesisKind::Membership);
        assert_eq!((args.duration, args.clients), (30, 4));
        assert_eq!(args.system, SystemKind::Flotilla);
        assert!(!args.serializable_reads);
    }

    #[test]
    fn only_three_or_five_members() {
        let parsed = Cli::try_parse_from(["flotilla", "--members", "4", "--out", "/tmp/x"]);
        assert!(parsed.is_err());
        assert!(Cli::try_parse_from(["flotilla", "--nemesis", "flood", "--out", "x"]).is_err());
    }
}

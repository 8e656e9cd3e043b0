//! `flotilla-chaos`: the `flotilla chaos` subcommand as a binary of its own, e.g.
//! `cargo run --release -p flotilla-chaos --bin flotilla-chaos -- --workload register
//! --nemesis partition --duration 30 --out /tmp/chaos` (with `--system etcd` to run against
//! etcd).

use std::process::ExitCode;

use clap::Parser;
use flotilla_chaos::ChaosArgs;

#[derive(Parser, Debug)]
#[command(
    name = "flotilla-chaos",
    about = "Fault injection on a real cluster, with linearizability checking"
)]
struct Cli {
    #[command(flatten)]
    chaos: ChaosArgs,
}

fn main() -> ExitCode {
    flotilla_chaos::run_blocking(Cli::parse().chaos)
}

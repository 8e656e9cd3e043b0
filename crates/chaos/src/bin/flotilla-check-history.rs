//! `flotilla-check-history FILE`: checks an existing register history (JSON Lines, the format
//! of `flotilla chaos`'s `history.jsonl`) for linearizability, key by key. Exit status 0 when
//! linearizable, 1 when not, 2 when the file cannot be read or checked.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use flotilla_chaos::history::{pair_operations, read_jsonl};
use flotilla_chaos::linearizability::{DEFAULT_CONFIGURATIONS_MAX, KeyVerdict, check_register};

#[derive(Parser, Debug)]
#[command(
    name = "flotilla-check-history",
    about = "Check a register history for linearizability"
)]
struct Cli {
    /// The history (history.jsonl).
    history: PathBuf,
    /// Configurations one key's search may cache before giving up.
    #[arg(long, default_value_t = DEFAULT_CONFIGURATIONS_MAX)]
    configurations_max: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let checked = read_jsonl(&cli.history)
        .map_err(anyhow::Error::from)
        .and_then(|events| Ok(pair_operations(&events)?))
        .and_then(|operations| Ok(check_register(&operations, cli.configurations_max)?));
    let report = match checked {
        Ok(report) => report,
        Err(error) => {
            println!("VERDICT: ERROR: {}: {error:#}", cli.history.display());
            return ExitCode::from(2);
        }
    };
    for key in report.failures() {
        match &key.verdict {
            KeyVerdict::NotLinearizable(explanation) => {
                println!("key {} is NOT linearizable: {explanation}", key.key)
            }
            KeyVerdict::Unknown(reason) => println!("key {}: undecided ({reason})", key.key),
            KeyVerdict::Linearizable => {}
        }
    }
    let verdict = if report.is_linearizable() {
        "linearizable"
    } else {
        "NOT linearizable"
    };
    println!(
        "VERDICT: {verdict}: {} operations on {} keys",
        report.operations_total,
        report.keys.len()
    );
    if report.is_linearizable() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

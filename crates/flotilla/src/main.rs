//! `flotilla`: the one binary. `serve` runs a member, `dev` a local cluster; the client
//! commands (`put`, `get`, `member`, `status`, `bench`, ...) come from `flotilla-client`,
//! `chaos` from `flotilla-chaos`.

mod dev;
mod dev_ui;
mod snapshot;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use flotilla_server::{Exit, ServeArgs};

#[derive(Parser, Debug)]
#[command(
    name = "flotilla",
    version,
    about = "An etcd-compatible, Raft-replicated key-value store"
)]
struct Cli {
    /// Flags of the client commands (`--endpoints`, `-w`, timeouts).
    #[command(flatten)]
    global: flotilla_client::cli::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one member of a cluster (flags named as etcd's).
    Serve(Box<ServeArgs>),
    /// Run a local cluster on 127.0.0.1 (ports 2379/22379/32379, peers 2380/22380/32380).
    Dev(dev::DevArgs),
    /// Fault injection on a local cluster, with linearizability checking (root: namespaces
    /// and nftables). The last line printed is the verdict.
    Chaos(Box<flotilla_chaos::ChaosArgs>),
    /// Backups: save one from a member, check one, restore one into a new cluster.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    #[command(flatten)]
    Client(flotilla_client::cli::ClientCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Dev(args) => dev::run(args),
        Command::Chaos(args) => flotilla_chaos::run_blocking(*args),
        Command::Snapshot(command) => snapshot::main(&cli.global, command),
        Command::Client(command) => client(&cli.global, command),
    }
}

fn client(
    global: &flotilla_client::cli::GlobalArgs,
    command: flotilla_client::cli::ClientCommand,
) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&anyhow::anyhow!("cannot start the runtime: {err}")),
    };
    match runtime.block_on(flotilla_client::cli::run(global, command)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("Error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(config) => config,
        Err(err) => return fail(&err),
    };
    if args.print_config {
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = writeln!(std::io::stdout(), "{config:#?}");
        return ExitCode::SUCCESS;
    }
    flotilla_server::logging::init(config.log_format, &config.log_level);
    tracing::debug!(?config, "effective configuration");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&anyhow::anyhow!("cannot start the runtime: {err}")),
    };
    let opener = Arc::new(flotilla_server::storage::open_storage);
    let result = runtime.block_on(flotilla_server::run(config, &*opener, shutdown_signal()));
    match result {
        Ok(Exit::Shutdown) => ExitCode::SUCCESS,
        Ok(Exit::Removed) => {
            tracing::warn!("this member was removed from the cluster and has stopped");
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err),
    }
}

fn fail(err: &anyhow::Error) -> ExitCode {
    tracing::error!("{err:#}");
    eprintln!("flotilla: error: {err:#}");
    ExitCode::FAILURE
}

/// Ctrl-C or SIGTERM. A second one stops at once (as safe as a crash: the log recovers).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("interrupted; shutting down (again to stop at once)"),
        _ = term.recv() => tracing::info!("terminated; shutting down (again to stop at once)"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("flotilla: second signal; stopping at once");
        std::process::exit(130);
    });
}

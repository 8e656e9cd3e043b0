//! The client commands as a stand-alone binary, for development while the real `flotilla`
//! binary (which flattens the same commands next to `serve` and `dev`) lives elsewhere:
//!
//! ```text
//! cargo run -p flotilla-client --example flotilla-client -- --endpoints 127.0.0.1:2379 put k v
//! ```

use std::process::ExitCode;

use clap::Parser;
use flotilla_client::cli::{ClientCommand, GlobalArgs, run};

#[derive(Parser, Debug)]
#[command(name = "flotilla", about = "Flotilla's client commands")]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: ClientCommand,
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli.global, cli.command).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("Error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

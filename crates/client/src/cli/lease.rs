//! `flotilla lease ...`: etcdctl's lease commands, with its simple output (lease ids in hex,
//! `%016x`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::{OutputFormat, Unsupported, parse_hex_i64};
use crate::Client;

#[derive(Subcommand, Clone, Debug)]
pub enum LeaseCommand {
    /// Grants a lease with a TTL in seconds.
    Grant { ttl_seconds: i64 },
    /// Revokes a lease (hex id); its keys are deleted.
    Revoke {
        #[arg(value_parser = parse_hex_i64)]
        id: i64,
    },
    /// Shows a lease's granted and remaining TTL.
    Timetolive {
        #[arg(value_parser = parse_hex_i64)]
        id: i64,
        /// Also list the keys attached to it.
        #[arg(long)]
        keys: bool,
    },
    /// Lists every lease.
    List,
    /// Keeps a lease alive, renewing it every TTL/3 until it is gone (or once).
    KeepAlive {
        #[arg(value_parser = parse_hex_i64)]
        id: i64,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
}

pub(super) async fn run(
    client: &Client,
    format: OutputFormat,
    command: LeaseCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    if format != OutputFormat::Simple {
        return Err(Unsupported("only simple is").into());
    }
    match command {
        LeaseCommand::Grant { ttl_seconds } => {
            let granted = client.lease_grant(ttl_seconds, 0).await?;
            writeln!(
                out,
                "lease {:016x} granted with TTL({}s)",
                granted.id, granted.ttl
            )?;
        }
        LeaseCommand::Revoke { id } => {
            client.lease_revoke(id).await?;
            writeln!(out, "lease {id:016x} revoked")?;
        }
        LeaseCommand::Timetolive { id, keys } => {
            let answer = client.lease_time_to_live(id, keys).await?;
            if answer.granted_ttl == 0 && answer.ttl == -1 {
                writeln!(out, "lease {id:016x} already expired")?;
            } else {
                write!(
                    out,
                    "lease {id:016x} granted with TTL({}s), remaining({}s)",
                    answer.granted_ttl, answer.ttl
                )?;
                if keys {
                    let names: Vec<String> = answer
                        .keys
                        .iter()
                        .map(|key| String::from_utf8_lossy(key).into_owned())
                        .collect();
                    write!(out, ", attached keys([{}])", names.join(" "))?;
                }
                writeln!(out)?;
            }
        }
        LeaseCommand::List => {
            let leases = client.lease_leases().await?.leases;
            writeln!(out, "found {} leases", leases.len())?;
            for lease in leases {
                writeln!(out, "{:016x}", lease.id)?;
            }
        }
        LeaseCommand::KeepAlive { id, once } => loop {
            let answer = client.lease_keep_alive_once(id).await?;
            if answer.ttl <= 0 {
                writeln!(out, "lease {id:016x} expired or revoked.")?;
                return Ok(ExitCode::from(super::EXIT_ERROR));
            }
            writeln!(out, "lease {id:016x} keepalived with TTL({})", answer.ttl)?;
            out.flush()?;
            if once {
                break;
            }
            // etcd's clients renew every TTL/3.
            let pause = Duration::from_millis((answer.ttl as u64 * 1000 / 3).max(500));
            tokio::time::sleep(pause).await;
        },
    }
    Ok(ExitCode::SUCCESS)
}

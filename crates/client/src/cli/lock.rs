//! `flotilla lock` and `flotilla elect`: etcdctl's commands, built on the server's Lock and
//! Election services (etcdctl builds them from its client-side recipe; both take part in the
//! same locks and elections, since the keys and revisions are the same).
//!
//! Each holds a lease kept alive while it runs. `lock NAME` prints the ownership key and holds
//! the lock until interrupted; `lock NAME COMMAND...` runs the command while holding it
//! (with `ETCD_LOCK_KEY` and `ETCD_LOCK_REV` set, as etcdctl does) and exits with its status.
//! `elect NAME PROPOSAL` campaigns, prints the leader key and value once elected and leads
//! until interrupted; `elect -l NAME` prints each leader as it changes. An interrupt
//! (SIGINT, SIGTERM) releases the lock or resigns before exiting.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;

use super::InvalidInput;
use crate::Client;

#[derive(Args, Clone, Debug)]
pub struct LockArgs {
    pub name: String,
    /// A command to run while holding the lock.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// Seconds the lock's lease lives without renewal (if this process dies).
    #[arg(long, default_value_t = 60)]
    pub ttl: i64,
}

#[derive(Args, Clone, Debug)]
pub struct ElectArgs {
    pub name: String,
    /// The value to lead with (omit with --listen).
    pub proposal: Option<String>,
    /// Print each leader as it changes instead of campaigning.
    #[arg(short = 'l', long)]
    pub listen: bool,
    /// Seconds the leadership's lease lives without renewal (if this process dies).
    #[arg(long, default_value_t = 60)]
    pub ttl: i64,
}

/// SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // No signal handling: never interrupted (the lease still ends if the process dies).
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// A lease renewed a third of its TTL at a time until dropped.
struct KeptLease {
    id: i64,
    renewing: tokio::task::JoinHandle<()>,
}

impl KeptLease {
    async fn grant(client: &Client, ttl: i64) -> anyhow::Result<KeptLease> {
        if ttl <= 0 {
            return Err(InvalidInput(format!("--ttl must be positive, not {ttl}")).into());
        }
        let id = client.lease_grant(ttl, 0).await?.id;
        let renewer = client.clone();
        let period = Duration::from_secs(ttl as u64).max(Duration::from_secs(3)) / 3;
        let renewing = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                if let Err(error) = renewer.lease_keep_alive_once(id).await {
                    tracing::warn!("renewing lease {id:x} failed: {error}");
                }
            }
        });
        Ok(KeptLease { id, renewing })
    }

    /// Stops renewing and revokes the lease (its keys go with it).
    async fn release(self, client: &Client) {
        self.renewing.abort();
        if let Err(error) = client.lease_revoke(self.id).await {
            tracing::warn!("revoking lease {:x} failed: {error}", self.id);
        }
    }
}

/// Waits for `acquiring` (a lock, a leadership) under `lease`. If interrupted first (`None`)
/// or refused, the lease is revoked, and any key queued under it goes with it.
async fn acquire<T>(
    client: &Client,
    lease: KeptLease,
    acquiring: impl std::future::Future<Output = Result<T, crate::ClientError>>,
) -> anyhow::Result<Option<(T, KeptLease)>> {
    let outcome = tokio::select! {
        outcome = acquiring => outcome,
        () = interrupted() => {
            lease.release(client).await;
            return Ok(None);
        }
    };
    match outcome {
        Ok(acquired) => Ok(Some((acquired, lease))),
        Err(error) => {
            lease.release(client).await;
            Err(error.into())
        }
    }
}

pub(super) async fn lock(
    client: &Client,
    args: &LockArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let lease = KeptLease::grant(client, args.ttl).await?;
    let acquiring = client.lock(Bytes::from(args.name.clone()), lease.id);
    let Some((held, lease)) = acquire(client, lease, acquiring).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let revision = held.header.map_or(0, |h| h.revision);
    let code = match args.command.split_first() {
        None => {
            writeln!(out, "{}", String::from_utf8_lossy(&held.key))?;
            out.flush()?;
            interrupted().await;
            ExitCode::SUCCESS
        }
        Some((program, arguments)) => {
            let mut child = tokio::process::Command::new(program)
                .args(arguments)
                .env("ETCD_LOCK_KEY", String::from_utf8_lossy(&held.key).as_ref())
                .env("ETCD_LOCK_REV", revision.to_string())
                .spawn()
                .map_err(|e| InvalidInput(format!("cannot run {program}: {e}")))?;
            tokio::select! {
                status = child.wait() => {
                    let status = status?;
                    ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8)
                }
                () = interrupted() => {
                    let _ = child.kill().await;
                    ExitCode::FAILURE
                }
            }
        }
    };
    if let Err(error) = client.unlock(held.key).await {
        tracing::warn!("unlocking failed (the lease's end releases it): {error}");
    }
    lease.release(client).await;
    Ok(code)
}

pub(super) async fn elect(
    client: &Client,
    args: &ElectArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let name = Bytes::from(args.name.clone());
    match (&args.proposal, args.listen) {
        (None, true) => observe(client, name, out).await,
        (Some(proposal), false) => campaign(client, name, proposal, args.ttl, out).await,
        (Some(_), true) => {
            Err(InvalidInput("--listen takes no proposal: it only watches".into()).into())
        }
        (None, false) => Err(InvalidInput("a proposal is needed to campaign".into()).into()),
    }
}

async fn observe(
    client: &Client,
    name: Bytes,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let mut leaders = client.observe(name).await?;
    loop {
        let next = tokio::select! {
            next = leaders.message() => next?,
            () = interrupted() => return Ok(ExitCode::SUCCESS),
        };
        let Some(leader) = next else {
            return Ok(ExitCode::SUCCESS);
        };
        if let Some(kv) = leader.kv {
            writeln!(out, "{}", String::from_utf8_lossy(&kv.key))?;
            writeln!(out, "{}", String::from_utf8_lossy(&kv.value))?;
            out.flush()?;
        }
    }
}

async fn campaign(
    client: &Client,
    name: Bytes,
    proposal: &str,
    ttl: i64,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let lease = KeptLease::grant(client, ttl).await?;
    let campaigning = client.campaign(name, lease.id, proposal.to_string());
    let Some((won, lease)) = acquire(client, lease, campaigning).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let leader = won.leader.unwrap_or_default();
    writeln!(out, "{}", String::from_utf8_lossy(&leader.key))?;
    writeln!(out, "{proposal}")?;
    out.flush()?;
    interrupted().await;
    if let Err(error) = client.resign(leader).await {
        tracing::warn!("resigning failed (the lease's end does it): {error}");
    }
    lease.release(client).await;
    Ok(ExitCode::SUCCESS)
}

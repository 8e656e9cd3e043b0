//! `flotilla snapshot save|status|restore`: backups, as etcdctl's and etcdutl's `snapshot`
//! commands take and use them (the file format is in `flotilla_server::backup`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use flotilla_client::cli::{GlobalArgs, OutputFormat};
use flotilla_proto::etcdserverpb::SnapshotRequest;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_server::ServeArgs;
use flotilla_server::backup::{BackupStatus, read_backup};

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Saves a backup of one member's state (give one endpoint) to FILE. `etcdctl snapshot
    /// save` makes the same file.
    Save { file: PathBuf },
    /// Checks a backup (size, SHA-256 digest, contents) and prints its hash, revision, number
    /// of keys and size.
    Status { file: PathBuf },
    /// Creates one member's data directory for a new cluster from a backup: run it for every
    /// member with its own --name and --data-dir and the same --initial-cluster and
    /// --initial-cluster-token, then start the members with `flotilla serve`.
    Restore(Box<RestoreArgs>),
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The backup to restore.
    pub file: PathBuf,
    /// The member's flags, as `flotilla serve` takes them (--name, --data-dir,
    /// --initial-cluster, --initial-cluster-token, --initial-advertise-peer-urls).
    #[command(flatten)]
    pub member: ServeArgs,
}

pub fn run(global: &GlobalArgs, command: SnapshotCommand) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Save { file } => save(global, &file),
        SnapshotCommand::Status { file } => {
            let (_, status) =
                read_backup(&file).with_context(|| format!("{} is not usable", file.display()))?;
            print_status(global.write_out, &status)
        }
        SnapshotCommand::Restore(args) => {
            let config = args.member.resolve()?;
            let status = flotilla_server::restore::restore_member(&config, &args.file)?;
            println!(
                "restored {} as member {:?} in {} (revision {}, {} keys, index {})",
                args.file.display(),
                config.name,
                config.data_dir.display(),
                status.revision,
                status.total_keys,
                status.applied_index
            );
            Ok(())
        }
    }
}

fn save(global: &GlobalArgs, file: &Path) -> anyhow::Result<()> {
    let [endpoint] = global.endpoints.as_slice() else {
        bail!(
            "a backup is taken from one member: give one endpoint, not {:?}",
            global.endpoints
        );
    };
    let partial = file.with_extension("part");
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    let bytes = runtime.block_on(async {
        let channel = global.connect_one(endpoint).await?;
        let mut stream = MaintenanceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .snapshot(SnapshotRequest {})
            .await
            .context("the member refused the backup")?
            .into_inner();
        let mut out = std::fs::File::create(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let mut bytes = 0u64;
        while let Some(message) = stream.message().await.context("the backup stream broke")? {
            out.write_all(&message.blob)
                .with_context(|| format!("cannot write {}", partial.display()))?;
            bytes += message.blob.len() as u64;
        }
        out.sync_all()
            .with_context(|| format!("cannot sync {}", partial.display()))?;
        anyhow::Ok(bytes)
    });
    let bytes = match bytes {
        Ok(bytes) => bytes,
        Err(err) => {
            let _ = std::fs::remove_file(&partial);
            return Err(err);
        }
    };
    // Checked before it replaces anything: a backup that does not read back is no backup.
    if let Err(err) = read_backup(&partial) {
        let _ = std::fs::remove_file(&partial);
        bail!("the backup received does not check out: {err}");
    }
    std::fs::rename(&partial, file)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), file.display()))?;
    println!("Snapshot saved at {} ({bytes} bytes)", file.display());
    Ok(())
}

fn print_status(format: OutputFormat, status: &BackupStatus) -> anyhow::Result<()> {
    let text = match format {
        OutputFormat::Json => serde_json::to_string(status)?,
        OutputFormat::Simple => format!(
            "{:x}, {}, {}, {}",
            status.hash, status.revision, status.total_keys, status.total_size
        ),
        OutputFormat::Table => format!(
            "HASH      REVISION  TOTAL KEYS  TOTAL SIZE  APPLIED INDEX  COMPACTED  LEASES\n\
             {:<9x} {:<9} {:<11} {:<11} {:<14} {:<10} {}",
            status.hash,
            status.revision,
            status.total_keys,
            status.total_size,
            status.applied_index,
            status.compacted_revision,
            status.leases
        ),
    };
    println!("{text}");
    Ok(())
}

/// Runs a `snapshot` command, with its error on stderr.
pub fn main(global: &GlobalArgs, command: SnapshotCommand) -> ExitCode {
    match run(global, command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("Error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

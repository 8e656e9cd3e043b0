//! The member's storage: its write-ahead log in the data directory (the runtime's default
//! [`DurableStorage`]).

use flotilla_runtime::DurableStorage;

/// Opens the member's write-ahead log in `<data-dir>/wal`, creating it for a new member. A
/// directory of another cluster or member is refused, naming both.
pub fn open_storage(
    config: &crate::ServerConfig,
    identity: &crate::identity::Identity,
) -> anyhow::Result<std::sync::Arc<dyn DurableStorage>> {
    use anyhow::Context;
    let dir = crate::identity::Identity::wal_dir(&config.data_dir);
    let mut options = flotilla_wal::WalOptions::new(identity.cluster_id, identity.member_id)
        .with_bootstrap_membership(identity.bootstrap_membership());
    if config.unsafe_no_fsync {
        tracing::warn!("--unsafe-no-fsync: a crash may lose acknowledged writes; benchmarks only");
        options = options.with_unsafe_no_fsync_for_benchmarks_only();
    }
    let (wal, report) = flotilla_wal::Wal::open(&dir, options)
        .with_context(|| format!("cannot open the write-ahead log in {}", dir.display()))?;
    tracing::info!(
        dir = %dir.display(),
        created = report.created,
        first_index = report.first_index,
        last_index = report.last_index,
        term = report.hard_state.term,
        snapshot = ?report.snapshot,
        "opened the write-ahead log"
    );
    if let Some(torn) = &report.torn_tail {
        tracing::warn!("cut away a record torn by a crash (never acknowledged): {torn:?}");
    }
    Ok(std::sync::Arc::new(wal))
}

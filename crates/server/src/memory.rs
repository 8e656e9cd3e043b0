//! The store lives in memory, so the space quota is also what keeps a member from the OOM
//! killer: the quota in force is at most a quarter of the memory the member may use (its
//! cgroup's limit, else the machine's). A member whose store reaches it refuses writes that
//! take space with etcd's NOSPACE alarm, which an operator clears as in etcd (compact,
//! defragment, disarm), instead of being killed mid-write.
//!
//! Why a quarter: the process holds about twice what the store counts (measured with 1M and
//! 10M keys of 256 bytes: the key index, the values' allocations and the history's
//! bookkeeping), and a snapshot being encoded, a large list being sent and compaction need
//! room beside it.

/// The share of the member's memory the counted store may take: 1 / this.
pub const MEMORY_PER_QUOTA_BYTE: u64 = 4;

/// What the member may use: the cgroup's memory limit if one is set, else the machine's
/// memory; `None` if neither can be read.
pub fn memory_limit_bytes() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total_bytes(&text));
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok())
    .and_then(|text| cgroup_limit_bytes(&text));
    match (cgroup, machine) {
        (Some(cgroup), Some(machine)) => Some(cgroup.min(machine)),
        (limit, None) | (None, limit) => limit,
    }
}

/// `MemTotal` from /proc/meminfo, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A cgroup memory limit file: bytes, or `max` (none). cgroup v1 says "none" with a number
/// near 2^63, which is no limit either.
fn cgroup_limit_bytes(text: &str) -> Option<u64> {
    let bytes: u64 = text.trim().parse().ok()?;
    (bytes < 1 << 60).then_some(bytes)
}

/// The quota in force, given the configured one and the member's memory, with a warning to
/// log when the configured one was lowered or cannot be guarded.
pub fn effective_quota(
    configured: Option<u64>,
    memory: Option<u64>,
) -> (Option<u64>, Option<String>) {
    let Some(memory) = memory else {
        return (configured, None);
    };
    let ceiling = memory / MEMORY_PER_QUOTA_BYTE;
    match configured {
        None => (
            None,
            Some(format!(
                "no space quota: the store lives in memory, and nothing stops it before the \
                 OOM killer does ({} MiB of memory; a quota of {} MiB would)",
                memory >> 20,
                ceiling >> 20
            )),
        ),
        Some(quota) if quota > ceiling => (
            Some(ceiling),
            Some(format!(
                "the space quota of {} MiB would let the in-memory store outgrow this \
                 member's {} MiB of memory (the process holds about twice what the store \
                 counts, and snapshots need room beside it): NOSPACE is raised at {} MiB, a \
                 quarter of memory, instead",
                quota >> 20,
                memory >> 20,
                ceiling >> 20
            )),
        ),
        Some(quota) => (Some(quota), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_limits_are_read_from_meminfo_and_cgroup_files() {
        let meminfo = "MemTotal:       24626316 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total_bytes(meminfo), Some(24_626_316 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(cgroup_limit_bytes("max\n"), None);
        assert_eq!(cgroup_limit_bytes("4294967296\n"), Some(4 * GIB));
        assert_eq!(
            cgroup_limit_bytes("9223372036854771712\n"),
            None,
            "v1's no limit"
        );
    }

    #[test]
    fn a_quota_past_a_quarter_of_memory_is_lowered_to_it() {
        assert_eq!(
            effective_quota(Some(2 * GIB), Some(24 * GIB)),
            (Some(2 * GIB), None)
        );
        let (quota, warning) = effective_quota(Some(8 * GIB), Some(24 * GIB));
        assert_eq!(quota, Some(6 * GIB));
        assert!(warning.unwrap().contains("NOSPACE is raised at 6144 MiB"));
        let (quota, _) = effective_quota(Some(2 * GIB), Some(4 * GIB));
        assert_eq!(quota, Some(GIB), "the default quota on a small machine");
    }

    #[test]
    fn no_quota_is_kept_with_a_warning_and_unknown_memory_changes_nothing() {
        let (quota, warning) = effective_quota(None, Some(24 * GIB));
        assert_eq!(quota, None);
        assert!(warning.unwrap().contains("OOM killer"));
        assert_eq!(effective_quota(Some(8 * GIB), None), (Some(8 * GIB), None));
        assert_eq!(effective_quota(None, None), (None, None));
    }
}

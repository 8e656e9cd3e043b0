//! The exported conformance suites, run against this workspace's storages and state
//! machines, and against state machines that break the contract (the suite must fail them).

// Shared with the examples; each user of it uses a part.
#[allow(dead_code)]
#[path = "../examples/shared/hash_map.rs"]
mod hash_map;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use flotilla_runtime::conformance::{state_machine, storage};
use flotilla_runtime::raft::MemStorage;
use flotilla_runtime::{
    Entry, EntryPayload, Index, MemDurable, Membership, SessionClient, Sessions, SmallStateMachine,
    StateMachine,
};
use flotilla_wal::{Fs, RealFs, SimFs, Wal, WalOptions};

#[test]
fn mem_durable_passes_the_storage_suite() {
    storage::run_suite(
        |membership| MemDurable::new(MemStorage::new_with_membership(membership)),
        |storage| storage,
    );
}

/// Opens WALs in fresh directories of one file system, and reopens them where they are.
struct Wals {
    fs: Arc<dyn Fs>,
    root: PathBuf,
    opened: AtomicU64,
}

impl Wals {
    fn options(&self, membership: Membership) -> WalOptions {
        WalOptions::new(7, 1)
            .with_fs(self.fs.clone())
            // Small segments: the suite's reads and compactions cross segment boundaries.
            .with_segment_bytes(4096)
            .with_bootstrap_membership(membership)
    }

    fn make(&self, membership: Membership) -> Wal {
        let n = self.opened.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(format!("wal-{n}"));
        Wal::open(&dir, self.options(membership))
            .expect("open a new WAL")
            .0
    }

    fn reopen(&self, wal: Wal) -> Wal {
        let dir = wal.dir().to_path_buf();
        let membership = storage::voters();
        wal.close().expect("close the WAL");
        drop(wal);
        Wal::open(&dir, self.options(membership))
            .expect("reopen the WAL")
            .0
    }

    fn run_suite(&self) {
        storage::run_suite(|m| self.make(m), |wal| self.reopen(wal));
    }
}

#[test]
fn the_wal_on_a_simulated_disk_passes_the_storage_suite() {
    let wals = Wals {
        fs: Arc::new(SimFs::new(11)),
        root: PathBuf::from("/sim"),
        opened: AtomicU64::new(0),
    };
    wals.run_suite();
}

#[test]
fn the_wal_on_the_real_file_system_passes_the_storage_suite() {
    let temp = tempfile::tempdir().expect("a temporary directory");
    let wals = Wals {
        fs: Arc::new(RealFs),
        root: temp.path().to_path_buf(),
        opened: AtomicU64::new(0),
    };
    wals.run_suite();
}

fn hash_map_commands() -> Vec<Bytes> {
    (0..300)
        .map(|i| match i % 5 {
            0 => format!("delete k{}", i % 17).into(),
            4 => Bytes::from_static(b"not a command"),
            _ => format!("put k{} value {i}", i % 23).into(),
        })
        .collect()
}

#[test]
fn the_hash_map_example_passes_the_state_machine_suite() {
    state_machine::run_suite(hash_map::HashMap::default, &hash_map_commands());
}

/// Sessions in front of the hash map, with registrations, repeats, stale and unknown
/// clients in the log.
#[test]
fn sessions_pass_the_state_machine_suite() {
    let mut commands = vec![SessionClient::register(), SessionClient::register()];
    // A client's id is the index of its registration (the suite's log begins with a blank).
    let (mut first, mut second) = (SessionClient::new(2), SessionClient::new(3));
    let mut stranger = SessionClient::new(99);
    for i in 0..100 {
        let put = format!("put k{} v{i}", i % 13);
        let command = if i % 2 == 0 {
            first.next(put.as_bytes())
        } else {
            second.next(put.as_bytes())
        };
        commands.push(command.clone());
        if i % 7 == 0 {
            commands.push(command); // a retry
        }
        if i % 11 == 0 {
            commands.push(stranger.next(b"put x y"));
        }
    }
    // Room for one client: every registration expires the other.
    commands.push(SessionClient::register());
    commands.push(first.next(b"put after expiry"));
    state_machine::run_suite(|| Sessions::new(hash_map::HashMap::default(), 2), &commands);
}

/// A counter whose outputs depend on a clock of the process, not only on the log.
#[derive(Debug, Default)]
struct Nondeterministic {
    applied: Index,
}

static CALLS: AtomicU64 = AtomicU64::new(0);

impl SmallStateMachine for Nondeterministic {
    type Output = u64;
    fn applied_index(&self) -> Index {
        self.applied
    }
    fn apply_command(&mut self, index: Index, _: &[u8]) -> u64 {
        self.applied = index;
        CALLS.fetch_add(1, Ordering::Relaxed)
    }
    fn apply_other(&mut self, index: Index) -> u64 {
        self.applied = index;
        0
    }
    fn snapshot(&self) -> Vec<u8> {
        self.applied.to_le_bytes().to_vec()
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.applied = u64::from_le_bytes(snapshot.try_into().map_err(|_| "8 bytes")?);
        Ok(())
    }
}

#[test]
#[should_panic(expected = "two machines gave different outputs")]
fn the_suite_fails_a_nondeterministic_machine() {
    state_machine::run_suite(Nondeterministic::default, &hash_map_commands());
}

/// Keeps the commands applied; its snapshot walks the live state instead of a pinned one.
#[derive(Debug, Default)]
struct LiveSnapshot {
    commands: Vec<Bytes>,
    applied: Index,
}

impl StateMachine for LiveSnapshot {
    type Output = usize;
    type SnapshotCursor = usize;

    fn applied_index(&self) -> Index {
        self.applied
    }
    fn apply(&mut self, entry: &Entry) -> usize {
        self.applied = entry.index;
        if let EntryPayload::Command(command) = &entry.payload {
            self.commands.push(command.clone());
        }
        self.commands.len()
    }
    fn begin_snapshot(&mut self) -> usize {
        0
    }
    fn continue_snapshot(
        &self,
        next: &mut usize,
        out: &mut Vec<u8>,
        _bytes_max: usize,
    ) -> std::io::Result<bool> {
        if *next == 0 {
            out.extend_from_slice(&self.applied.to_le_bytes());
        }
        if let Some(command) = self.commands.get(*next) {
            out.extend_from_slice(&(command.len() as u32).to_le_bytes());
            out.extend_from_slice(command);
            *next += 1;
        }
        Ok(*next >= self.commands.len())
    }
    fn end_snapshot(&mut self, _: usize) {}
    fn empty(&self) -> Self {
        LiveSnapshot::default()
    }
    fn restore(&mut self, snapshot: &mut dyn Read) -> Result<(), String> {
        let mut bytes = Vec::new();
        snapshot
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        let (applied, mut rest) = bytes.split_at_checked(8).ok_or("ends early")?;
        self.applied = u64::from_le_bytes(applied.try_into().expect("8 bytes"));
        while let Some((length, tail)) = rest.split_at_checked(4) {
            let length = u32::from_le_bytes(length.try_into().expect("4 bytes")) as usize;
            let (command, tail) = tail.split_at_checked(length).ok_or("ends early")?;
            self.commands.push(Bytes::copy_from_slice(command));
            rest = tail;
        }
        Ok(())
    }
}

#[test]
#[should_panic(expected = "holds entries applied after it began")]
fn the_suite_fails_a_snapshot_that_is_not_point_in_time() {
    state_machine::run_suite(LiveSnapshot::default, &hash_map_commands());
}

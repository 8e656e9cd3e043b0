//! A simulated, deterministic file system for crash and fault testing.
//!
//! Everything lives in memory; there is no real I/O, no thread and no clock, and every random
//! choice comes from a PRNG seeded at construction, so the same seed and the same calls give
//! the same result, bit for bit. A simulator can give each node its own `SimFs`.
//!
//! # The fault model
//!
//! * **Page cache.** Writes, size changes and directory changes are visible to reads at once
//!   but are *pending* until made durable: file contents by [`FsFile::sync_data`], directory
//!   entries (create, rename, remove) by [`Fs::sync_dir`] on their directory.
//! * **Crash** ([`SimFs::crash`], power loss). For every file, each pending write is kept or
//!   lost according to a loss mode drawn per file: all lost; all kept; a prefix kept with the
//!   next write torn at a random byte; or each write kept or lost independently (writes reach
//!   the disk out of order), a kept one possibly torn. Pending directory changes survive as a
//!   random prefix of them, in order. Handles opened before the crash stop working.
//! * **Crash in the middle of an operation** ([`SimFs::crash_after_ops`]): after that many more
//!   mutating operations, the operation under way applies a random prefix of its bytes, fails,
//!   and the file system freezes (every call fails) until [`SimFs::crash`] is called.
//! * **Errors** ([`SimFaults`]): a write may fail (possibly after writing a prefix), a sync may
//!   fail, and writes beyond a capacity fail with "no space". A failed sync behaves like Linux:
//!   the pending writes it was to make durable are dropped from the disk's future (a later
//!   successful sync does not bring them back) although reads still return them, which is why
//!   a failed fsync must be fatal to its caller.
//! * **Bit flips** ([`SimFs::flip_bit`]): media corruption of durable data.
//!
//! Directory creation is durable at once (the WAL's directory is created before anything in it
//! matters).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_raft::Prng;

use crate::fs::{Fs, FsFile};

/// Injected failures. `0` in a `*_one_in` field means never.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimFaults {
    /// A write fails (after writing a random prefix of its data) with probability 1/n.
    pub write_error_one_in: u64,
    /// A sync fails with probability 1/n.
    pub sync_error_one_in: u64,
    /// Writes that would grow the total size of all files past this fail with "no space".
    pub capacity_bytes: u64,
}

impl Default for SimFaults {
    fn default() -> Self {
        Self {
            write_error_one_in: 0,
            sync_error_one_in: 0,
            capacity_bytes: u64::MAX,
        }
    }
}

/// Counters for tests and the simulator's reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimFsStats {
    pub crashes: u64,
    pub file_syncs: u64,
    pub dir_syncs: u64,
    pub bytes_written: u64,
    pub injected_write_errors: u64,
    pub injected_sync_errors: u64,
}

/// A simulated file system. Cloning gives another handle to the same one.
#[derive(Clone, Debug)]
pub struct SimFs {
    state: Arc<Mutex<SimState>>,
}

type InodeId = u64;

#[derive(Debug)]
struct SimState {
    prng: Prng,
    /// Incremented at every crash: handles from an earlier boot are dead.
    boot: u64,
    next_inode: InodeId,
    inodes: BTreeMap<InodeId, Inode>,
    /// The namespace the running process sees.
    names: BTreeMap<PathBuf, InodeId>,
    /// The namespace on disk, before the pending directory changes.
    durable_names: BTreeMap<PathBuf, InodeId>,
    pending_dir_ops: Vec<DirOp>,
    dirs: BTreeSet<PathBuf>,
    faults: SimFaults,
    /// Mutating operations left before a scheduled mid-operation crash.
    crash_countdown: Option<u64>,
    /// A mid-operation crash happened: everything fails until `crash()`.
    frozen: bool,
    stats: SimFsStats,
}

#[derive(Debug, Default)]
struct Inode {
    /// What reads return.
    current: Vec<u8>,
    /// What the disk holds for sure.
    durable: Vec<u8>,
    /// Changes since the last sync, in order; each may or may not reach the disk at a crash.
    pending: Vec<PendingWrite>,
}

#[derive(Clone, Debug)]
enum PendingWrite {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone, Debug)]
enum DirOp {
    Link { path: PathBuf, inode: InodeId },
    Unlink { path: PathBuf },
    Rename { from: PathBuf, to: PathBuf },
}

impl DirOp {
    fn touches_dir(&self, dir: &Path) -> bool {
        let parent_is = |path: &Path| path.parent() == Some(dir);
        match self {
            Self::Link { path, .. } | Self::Unlink { path } => parent_is(path),
            Self::Rename { from, to } => parent_is(from) || parent_is(to),
        }
    }

    fn apply(&self, names: &mut BTreeMap<PathBuf, InodeId>) {
        match self {
            Self::Link { path, inode } => {
                names.insert(path.clone(), *inode);
            }
            Self::Unlink { path } => {
                names.remove(path);
            }
            Self::Rename { from, to } => {
                if let Some(inode) = names.remove(from) {
                    names.insert(to.clone(), inode);
                }
            }
        }
    }
}

/// How one file's pending writes fare at a crash.
#[derive(Clone, Copy, Debug)]
enum LossMode {
    LoseAll,
    KeepAll,
    PrefixThenTorn,
    Reordered,
}

fn apply_write(content: &mut Vec<u8>, write: &PendingWrite) {
    match write {
        PendingWrite::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if content.len() < end {
                content.resize(end, 0);
            }
            content[*offset as usize..end].copy_from_slice(data);
        }
        PendingWrite::SetLen(len) => content.resize(*len as usize, 0),
    }
}

/// The write cut at a random byte (possibly keeping none or all of it).
fn torn(write: &PendingWrite, prng: &mut Prng) -> PendingWrite {
    match write {
        PendingWrite::Write { offset, data } => {
            let keep = prng.range(0, data.len() as u64 + 1) as usize;
            PendingWrite::Write {
                offset: *offset,
                data: data[..keep].to_vec(),
            }
        }
        PendingWrite::SetLen(_) => write.clone(),
    }
}

fn dead_process() -> io::Error {
    io::Error::other("simulated crash: the process is dead until SimFs::crash() recovers it")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl SimState {
    fn check_alive(&self) -> io::Result<()> {
        if self.frozen {
            return Err(dead_process());
        }
        Ok(())
    }

    /// Counts a mutating operation towards a scheduled crash. Returns true if this operation
    /// is the one interrupted by the crash.
    fn tick_crash_countdown(&mut self) -> bool {
        match &mut self.crash_countdown {
            Some(0) => {
                self.crash_countdown = None;
                self.frozen = true;
                true
            }
            Some(left) => {
                *left -= 1;
                false
            }
            None => false,
        }
    }

    fn total_bytes(&self) -> u64 {
        self.inodes.values().map(|i| i.current.len() as u64).sum()
    }

    fn inode_mut(&mut self, id: InodeId) -> &mut Inode {
        self.inodes
            .get_mut(&id)
            .expect("handles keep their inode alive")
    }

    fn push_write(&mut self, id: InodeId, write: PendingWrite) {
        if let PendingWrite::Write { data, .. } = &write {
            self.stats.bytes_written += data.len() as u64;
        }
        let inode = self.inode_mut(id);
        apply_write(&mut inode.current, &write);
        inode.pending.push(write);
    }

    fn write_at(&mut self, id: InodeId, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_alive()?;
        if self.tick_crash_countdown() {
            let partial = torn(
                &PendingWrite::Write {
                    offset,
                    data: data.to_vec(),
                },
                &mut self.prng,
            );
            self.push_write(id, partial);
            return Err(dead_process());
        }
        let one_in = self.faults.write_error_one_in;
        if one_in > 0 && self.prng.chance(1, one_in) {
            self.stats.injected_write_errors += 1;
            let keep = self.prng.range(0, data.len() as u64 + 1) as usize;
            self.push_write(
                id,
                PendingWrite::Write {
                    offset,
                    data: data[..keep].to_vec(),
                },
            );
            return Err(io::Error::other("simulated I/O error on write"));
        }
        let len = self.inodes[&id].current.len() as u64;
        let growth = (offset + data.len() as u64).saturating_sub(len);
        if self.total_bytes().saturating_add(growth) > self.faults.capacity_bytes {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "simulated full disk",
            ));
        }
        self.push_write(
            id,
            PendingWrite::Write {
                offset,
                data: data.to_vec(),
            },
        );
        Ok(())
    }

    fn sync(&mut self, id: InodeId) -> io::Result<()> {
        self.check_alive()?;
        if self.tick_crash_countdown() {
            return Err(dead_process());
        }
        let one_in = self.faults.sync_error_one_in;
        if one_in > 0 && self.prng.chance(1, one_in) {
            self.stats.injected_sync_errors += 1;
            // Linux marks the pages clean after a failed writeback: the data stays readable
            // but is never written, even by a later successful fsync.
            self.inode_mut(id).pending.clear();
            return Err(io::Error::other("simulated I/O error on fsync"));
        }
        self.stats.file_syncs += 1;
        let inode = self.inode_mut(id);
        for write in std::mem::take(&mut inode.pending) {
            apply_write(&mut inode.durable, &write);
        }
        Ok(())
    }

    fn set_len(&mut self, id: InodeId, len: u64) -> io::Result<()> {
        self.check_alive()?;
        if self.tick_crash_countdown() {
            return Err(dead_process());
        }
        let current = self.inodes[&id].current.len() as u64;
        if len > current && self.total_bytes() + (len - current) > self.faults.capacity_bytes {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "simulated full disk",
            ));
        }
        self.push_write(id, PendingWrite::SetLen(len));
        Ok(())
    }

    fn dir_op(&mut self, op: DirOp) -> io::Result<()> {
        self.check_alive()?;
        if self.tick_crash_countdown() {
            return Err(dead_process());
        }
        op.apply(&mut self.names);
        self.pending_dir_ops.push(op);
        Ok(())
    }

    fn new_inode(&mut self) -> InodeId {
        let id = self.next_inode;
        self.next_inode += 1;
        self.inodes.insert(id, Inode::default());
        id
    }

    fn draw_loss_mode(&mut self) -> LossMode {
        match self.prng.range(0, 4) {
            0 => LossMode::LoseAll,
            1 => LossMode::KeepAll,
            2 => LossMode::PrefixThenTorn,
            _ => LossMode::Reordered,
        }
    }

    /// Power loss: decides the fate of every pending change, then restarts.
    fn crash(&mut self) {
        let ids: Vec<InodeId> = self.inodes.keys().copied().collect();
        for id in ids {
            let mode = self.draw_loss_mode();
            let pending = std::mem::take(&mut self.inode_mut(id).pending);
            let survivors = self.surviving_writes(&pending, mode);
            let inode = self.inode_mut(id);
            for write in &survivors {
                apply_write(&mut inode.durable, write);
            }
            inode.current = inode.durable.clone();
        }
        let ops = std::mem::take(&mut self.pending_dir_ops);
        let kept = self.prng.range(0, ops.len() as u64 + 1) as usize;
        for op in &ops[..kept] {
            op.apply(&mut self.durable_names);
        }
        self.names = self.durable_names.clone();
        let linked: BTreeSet<InodeId> = self.names.values().copied().collect();
        self.inodes.retain(|id, _| linked.contains(id));
        self.boot += 1;
        self.frozen = false;
        self.crash_countdown = None;
        self.stats.crashes += 1;
    }

    fn surviving_writes(&mut self, pending: &[PendingWrite], mode: LossMode) -> Vec<PendingWrite> {
        match mode {
            LossMode::LoseAll => Vec::new(),
            LossMode::KeepAll => pending.to_vec(),
            LossMode::PrefixThenTorn => {
                let kept = self.prng.range(0, pending.len() as u64 + 1) as usize;
                let mut survivors = pending[..kept].to_vec();
                if let Some(next) = pending.get(kept) {
                    survivors.push(torn(next, &mut self.prng));
                }
                survivors
            }
            LossMode::Reordered => {
                let mut survivors = Vec::new();
                for write in pending {
                    if self.prng.chance(1, 2) {
                        continue;
                    }
                    if self.prng.chance(1, 4) {
                        survivors.push(torn(write, &mut self.prng));
                    } else {
                        survivors.push(write.clone());
                    }
                }
                survivors
            }
        }
    }
}

impl SimFs {
    pub fn new(seed: u64) -> Self {
        let state = SimState {
            prng: Prng::new(seed),
            boot: 0,
            next_inode: 1,
            inodes: BTreeMap::new(),
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            pending_dir_ops: Vec::new(),
            dirs: BTreeSet::new(),
            faults: SimFaults::default(),
            crash_countdown: None,
            frozen: false,
            stats: SimFsStats::default(),
        };
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves plain data behind; carry on with it so that a
        // failing test reports its own panic, not a poisoned lock.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Power loss and restart: applies the loss model to everything not yet durable. Every
    /// handle opened before is dead afterwards.
    pub fn crash(&self) {
        self.lock().crash();
    }

    /// Schedules a crash in the middle of the `ops`-th mutating operation from now (0 = the
    /// next one): it applies part of its effect, fails, and the file system freezes until
    /// [`SimFs::crash`].
    pub fn crash_after_ops(&self, ops: u64) {
        self.lock().crash_countdown = Some(ops);
    }

    /// True once a scheduled crash has happened and until [`SimFs::crash`].
    pub fn is_frozen(&self) -> bool {
        self.lock().frozen
    }

    pub fn set_faults(&self, faults: SimFaults) {
        self.lock().faults = faults;
    }

    pub fn stats(&self) -> SimFsStats {
        self.lock().stats
    }

    /// Flips one bit of a file, on disk and in the cache alike (media corruption), wherever
    /// each is long enough.
    pub fn flip_bit(&self, path: &Path, byte_offset: u64, bit: u8) -> io::Result<()> {
        assert!(bit < 8, "bit {bit} is not in a byte");
        let mut state = self.lock();
        let id = *state.names.get(path).ok_or_else(|| not_found(path))?;
        let inode = state.inode_mut(id);
        let offset = byte_offset as usize;
        if offset >= inode.durable.len() && offset >= inode.current.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: offset {byte_offset} is past the end", path.display()),
            ));
        }
        for content in [&mut inode.durable, &mut inode.current] {
            if let Some(byte) = content.get_mut(offset) {
                *byte ^= 1 << bit;
            }
        }
        Ok(())
    }

    /// The current size of a file, as reads see it.
    pub fn file_len(&self, path: &Path) -> io::Result<u64> {
        let state = self.lock();
        let id = *state.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(state.inodes[&id].current.len() as u64)
    }

    /// A random number from the file system's PRNG, so that a test drawing its own choices
    /// stays reproducible from the one seed.
    pub fn random_range(&self, low: u64, high: u64) -> u64 {
        self.lock().prng.range(low, high)
    }
}

#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    inode: InodeId,
    boot: u64,
}

impl SimFile {
    fn state(&self) -> io::Result<MutexGuard<'_, SimState>> {
        let state = self.fs.lock();
        if state.boot != self.boot {
            return Err(io::Error::other(
                "stale handle: the simulated machine crashed since it was opened",
            ));
        }
        state.check_alive()?;
        Ok(state)
    }
}

impl FsFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.state()?;
        let content = &state.inodes[&self.inode].current;
        let start = offset as usize;
        let end = start + buf.len();
        if end > content.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        buf.copy_from_slice(&content[start..end]);
        Ok(())
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.state()?.write_at(self.inode, data, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.state()?.sync(self.inode)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state()?.inodes[&self.inode].current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.state()?.set_len(self.inode, len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut state = self.state()?;
        if (state.inodes[&self.inode].current.len() as u64) < len {
            state.set_len(self.inode, len)?;
        }
        Ok(())
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_alive()?;
        for ancestor in dir.ancestors() {
            state.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let mut state = self.lock();
        state.check_alive()?;
        if state.names.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists", path.display()),
            ));
        }
        let parent = path.parent().unwrap_or(Path::new(""));
        if !state.dirs.contains(parent) {
            return Err(not_found(parent));
        }
        let inode = state.new_inode();
        let link = DirOp::Link {
            path: path.to_path_buf(),
            inode,
        };
        if let Err(err) = state.dir_op(link) {
            state.inodes.remove(&inode);
            return Err(err);
        }
        let boot = state.boot;
        drop(state);
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            inode,
            boot,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let state = self.lock();
        state.check_alive()?;
        let inode = *state.names.get(path).ok_or_else(|| not_found(path))?;
        let boot = state.boot;
        drop(state);
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            inode,
            boot,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_alive()?;
        if !state.names.contains_key(from) {
            return Err(not_found(from));
        }
        state.dir_op(DirOp::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        })
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_alive()?;
        if !state.names.contains_key(path) {
            return Err(not_found(path));
        }
        state.dir_op(DirOp::Unlink {
            path: path.to_path_buf(),
        })
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        state.check_alive()?;
        if !state.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let names = state
            .names
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        Ok(names)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_alive()?;
        if state.tick_crash_countdown() {
            return Err(dead_process());
        }
        state.stats.dir_syncs += 1;
        let ops = std::mem::take(&mut state.pending_dir_ops);
        let (synced, still_pending): (Vec<DirOp>, Vec<DirOp>) =
            ops.into_iter().partition(|op| op.touches_dir(dir));
        for op in &synced {
            op.apply(&mut state.durable_names);
        }
        state.pending_dir_ops = still_pending;
        Ok(())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let state = self.lock();
        state.check_alive()?;
        Ok(state.names.contains_key(path) || state.dirs.contains(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        PathBuf::from("/sim/node1")
    }

    #[test]
    fn synced_data_survives_a_crash_and_unsynced_data_may_not() {
        let mut lost_some = false;
        for seed in 0..64 {
            let fs = SimFs::new(seed);
            fs.create_dir_all(&dir()).unwrap();
            let path = dir().join("f");
            let file = fs.create_new(&path).unwrap();
            file.write_all_at(b"durable", 0).unwrap();
            file.sync_data().unwrap();
            fs.sync_dir(&dir()).unwrap();
            file.write_all_at(b"-maybe", 7).unwrap();
            fs.crash();
            assert!(file.len().is_err(), "handles die with the crash");
            let file = fs.open(&path).unwrap();
            let len = file.len().unwrap();
            assert!((7..=13).contains(&len));
            let mut buf = vec![0; len as usize];
            file.read_exact_at(&mut buf, 0).unwrap();
            assert_eq!(&buf[..7], b"durable");
            assert_eq!(&buf[7..], &b"-maybe"[..len as usize - 7]);
            lost_some |= len < 13;
        }
        assert!(lost_some, "some seed loses the unsynced write");
    }

    #[test]
    fn a_file_whose_directory_entry_was_not_synced_can_vanish() {
        let mut vanished = 0;
        for seed in 0..32 {
            let fs = SimFs::new(seed);
            fs.create_dir_all(&dir()).unwrap();
            let file = fs.create_new(&dir().join("f")).unwrap();
            file.write_all_at(b"x", 0).unwrap();
            file.sync_data().unwrap();
            fs.crash();
            if !fs.exists(&dir().join("f")).unwrap() {
                vanished += 1;
            }
        }
        assert!(vanished > 0 && vanished < 32);
    }

    #[test]
    fn a_failed_sync_loses_the_data_for_good() {
        let fs = SimFs::new(7);
        fs.create_dir_all(&dir()).unwrap();
        let file = fs.create_new(&dir().join("f")).unwrap();
        fs.sync_dir(&dir()).unwrap();
        file.write_all_at(b"abc", 0).unwrap();
        fs.set_faults(SimFaults {
            sync_error_one_in: 1,
            ..SimFaults::default()
        });
        assert!(file.sync_data().is_err());
        fs.set_faults(SimFaults::default());
        file.sync_data().unwrap();
        let mut buf = [0; 3];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abc", "the cache still has it");
        fs.crash();
        let file = fs.open(&dir().join("f")).unwrap();
        assert_eq!(file.len().unwrap(), 0, "the disk never got it");
    }

    #[test]
    fn a_scheduled_crash_freezes_the_file_system_mid_operation() {
        let fs = SimFs::new(3);
        fs.create_dir_all(&dir()).unwrap();
        let file = fs.create_new(&dir().join("f")).unwrap();
        fs.crash_after_ops(1);
        file.write_all_at(b"one", 0).unwrap();
        assert!(file.write_all_at(b"two", 3).is_err());
        assert!(fs.is_frozen());
        assert!(fs.list(&dir()).is_err());
        fs.crash();
        assert!(!fs.is_frozen());
    }

    #[test]
    fn same_seed_same_outcome() {
        let run = |seed| {
            let fs = SimFs::new(seed);
            fs.create_dir_all(&dir()).unwrap();
            let file = fs.create_new(&dir().join("f")).unwrap();
            fs.sync_dir(&dir()).unwrap();
            for i in 0..20u64 {
                file.write_all_at(&[i as u8; 10], i * 10).unwrap();
            }
            fs.crash();
            let file = fs.open(&dir().join("f")).unwrap();
            let mut buf = vec![0; file.len().unwrap() as usize];
            file.read_exact_at(&mut buf, 0).unwrap();
            buf
        };
        for seed in 0..8 {
            assert_eq!(run(seed), run(seed));
        }
    }
}

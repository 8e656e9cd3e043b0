//! The simulated state machine: a running hash of every command applied, plus the index it
//! reached. Its snapshot is that pair, padded with deterministic bytes so that snapshots span
//! several InstallSnapshot chunks.

use bytes::{BufMut, Bytes};
use flotilla_raft::{Entry, EntryPayload, Index, SnapshotMeta, Term};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateMachine {
    pub applied_index: Index,
    /// FNV-1a over (index, term, payload) of everything applied.
    pub state_hash: u64,
}

/// A digest of one entry's payload, for the cross-node comparison of what was applied.
pub fn payload_digest(entry: &Entry) -> u64 {
    let mut hash = Fnv::default();
    match &entry.payload {
        EntryPayload::Blank => hash.write(&[0]),
        EntryPayload::Command(data) => {
            hash.write(&[1]);
            hash.write(data);
        }
        EntryPayload::Membership(change) => {
            hash.write(&[2]);
            hash.write(change.membership.to_string().as_bytes());
        }
    }
    hash.value()
}

impl StateMachine {
    pub fn apply(&mut self, entry: &Entry) {
        assert_eq!(
            entry.index,
            self.applied_index + 1,
            "entries must be applied in order without gaps"
        );
        let mut hash = Fnv(self.state_hash);
        hash.write(&entry.index.to_le_bytes());
        hash.write(&entry.term.to_le_bytes());
        hash.write(&payload_digest(entry).to_le_bytes());
        self.state_hash = hash.value();
        self.applied_index = entry.index;
    }

    /// The snapshot's data: index, hash, then `padding_bytes` deterministic bytes.
    pub fn encode(&self, padding_bytes: u64) -> Bytes {
        let mut data = Vec::with_capacity(16 + padding_bytes as usize);
        data.put_u64_le(self.applied_index);
        data.put_u64_le(self.state_hash);
        for i in 0..padding_bytes {
            data.put_u8((i as u8).wrapping_mul(31) ^ (self.state_hash as u8));
        }
        Bytes::from(data)
    }

    /// Restores from snapshot data, checking it is intact and matches its metadata.
    pub fn restore(meta: &SnapshotMeta, data: &[u8]) -> Result<Self, String> {
        if data.len() < 16 {
            return Err(format!(
                "snapshot data of {} bytes is too short",
                data.len()
            ));
        }
        let applied_index = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
        let state_hash = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        for (i, &byte) in data[16..].iter().enumerate() {
            if byte != (i as u8).wrapping_mul(31) ^ (state_hash as u8) {
                return Err(format!("snapshot padding corrupt at byte {}", 16 + i));
            }
        }
        if applied_index != meta.last.index {
            return Err(format!(
                "snapshot data is at index {applied_index}, its metadata says {}",
                meta.last
            ));
        }
        Ok(Self {
            applied_index,
            state_hash,
        })
    }
}

/// FNV-1a, 64 bits.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= byte as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn value(self) -> u64 {
        self.0
    }
}

/// What the cluster as a whole applied at one index: every node must apply the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppliedRecord {
    pub term: Term,
    pub payload_digest: u64,
    /// The state machine's hash after applying it.
    pub state_hash: u64,
}

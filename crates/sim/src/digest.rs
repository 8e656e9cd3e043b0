//! Digests of what was applied, for the cross-node comparisons: FNV-1a over an entry's payload
//! and over what applying it did.

use flotilla_raft::{Entry, EntryPayload, Term};

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
    /// A digest of what applying it answered and changed (the state machine's result: its
    /// outcome, watch events and revision).
    pub effect_digest: u64,
}

/// FNV-1a of a text (a result's debug form: every part of it is ordered, so it is
/// deterministic).
pub fn text_digest(text: &str) -> u64 {
    let mut hash = Fnv::default();
    hash.write(text.as_bytes());
    hash.value()
}

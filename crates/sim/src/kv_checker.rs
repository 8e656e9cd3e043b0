//! Checks on the key-value store the members run, made as entries apply and when the run ends.
//!
//! - **Identical state**: every member's state machine answers and changes alike at every
//!   index (a digest of each entry's effect), and its whole store is identical at every
//!   sixteenth index and at every snapshot (the full store digest, compared by the
//!   simulation's `Checker`; every index would cost a store encoding per entry per member).
//! - **Exactly once**: every value a client writes is unique, so a value that appears in two
//!   revisions was applied twice (a retry that the session should have answered from memory).
//! - **Acknowledged means applied, at the revision reported**: a write a client was told
//!   succeeded must be in the store's history, at the very revision its answer carried.
//! - **Watch completeness**: the events of the watched keys, in revision order, which every
//!   member's watchers must deliver (see `simulation::watchers`).
//! - **Linearizability** of the register history, at the end of the run (the chaos suite's
//!   checker).

use std::collections::{BTreeMap, BTreeSet};

use flotilla_chaos::history::pair_operations;
use flotilla_chaos::linearizability::check_register;
use flotilla_kv::ApplyResult;
use flotilla_proto::mvccpb::Event;
use flotilla_proto::mvccpb::event::EventType;
use flotilla_raft::Index;

use crate::checker::Violation;
use crate::simulation::is_watched;
use crate::workload::History;

/// How often (in log indexes) the whole store is compared.
pub const FULL_DIGEST_EVERY: Index = 16;

/// The most configurations the linearizability search may cache per key.
const CONFIGURATIONS_MAX: usize = 2_000_000;

#[derive(Debug, Default)]
pub struct KvChecker {
    /// Every value put, with the revision that put it.
    written: BTreeMap<Vec<u8>, i64>,
    /// Every event on the watched keys, in revision order (without `prev_kv`, which the
    /// simulated watchers do not ask for).
    watched: Vec<(i64, Event)>,
    /// Indexes whose results were already recorded (the first member to apply one records it).
    recorded_through: BTreeSet<Index>,
}

impl KvChecker {
    /// Learns the values a newly applied entry put (once per index, from the first member
    /// that applies it: every other member's effect digest is compared with it).
    pub fn record_writes(&mut self, index: Index, result: &ApplyResult) -> Result<(), Violation> {
        if !self.recorded_through.insert(index) {
            return Ok(());
        }
        for event in result.events.iter().filter(|event| is_watched(event)) {
            let mut event = event.clone();
            event.prev_kv = None;
            let revision = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            self.watched.push((revision, event));
        }
        for event in &result.events {
            if event.r#type != EventType::Put as i32 {
                continue;
            }
            let Some(kv) = &event.kv else { continue };
            if kv.value.is_empty() {
                continue;
            }
            let value = kv.value.to_vec();
            if let Some(&earlier) = self.written.get(&value) {
                return Err(format!(
                    "exactly once: value {:?} was put at revision {earlier} and again at \
                     revision {} (index {index}): a retry was applied twice",
                    String::from_utf8_lossy(&value),
                    kv.mod_revision
                ));
            }
            self.written.insert(value, kv.mod_revision);
        }
        Ok(())
    }

    /// The events a watcher of the register keys must deliver, in order.
    pub fn watched_events(&self) -> &[(i64, Event)] {
        &self.watched
    }

    /// A client was told its put of `value` succeeded at `revision`.
    pub fn check_acknowledged(&self, value: &str, revision: i64) -> Result<(), Violation> {
        match self.written.get(value.as_bytes()) {
            Some(&put_at) if put_at == revision => Ok(()),
            Some(&put_at) => Err(format!(
                "acknowledged revision: the put of {value:?} was answered with revision \
                 {revision}, but it was applied at revision {put_at}"
            )),
            None => Err(format!(
                "acknowledged write lost: the put of {value:?} was answered as done (revision \
                 {revision}) but no member ever applied it"
            )),
        }
    }

    /// Checks the register history for linearizability.
    pub fn check_history(history: &History) -> Result<(), Violation> {
        let operations = pair_operations(&history.events)
            .map_err(|err| format!("the simulator recorded a malformed history: {err}"))?;
        let report = check_register(&operations, CONFIGURATIONS_MAX)
            .map_err(|err| format!("the simulator recorded a malformed history: {err}"))?;
        match report.failures().next() {
            None => Ok(()),
            Some(failure) => Err(format!(
                "linearizability: key {}: {:?}",
                failure.key, failure.verdict
            )),
        }
    }
}

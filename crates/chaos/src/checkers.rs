//! The checkers of the set, counter and watch workloads. (The register workload's is in
//! [`crate::linearizability`].) Each returns a report whose `anomalies` are empty when the
//! history is correct.

use std::collections::{BTreeMap, BTreeSet};

use crate::history::{Completion, Function, Operation};

/// Anomalies are listed up to this many per kind, then counted.
const LISTED_MAX: usize = 10;

fn listed<T: std::fmt::Display>(items: &[T]) -> String {
    let shown: Vec<String> = items
        .iter()
        .take(LISTED_MAX)
        .map(ToString::to_string)
        .collect();
    let more = items.len().saturating_sub(LISTED_MAX);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

// --- Set ---------------------------------------------------------------------------------

/// The set workload's verdict: every acknowledged add present in the final read, nothing
/// present that was never added (or whose add definitely failed).
#[derive(Clone, Debug, Default)]
pub struct SetReport {
    pub acknowledged: usize,
    pub unknown: usize,
    pub failed: usize,
    /// Unknown adds that turned out present.
    pub unknown_present: usize,
    pub final_size: usize,
    pub anomalies: Vec<String>,
}

/// The element an `add` adds: its value (a string).
pub fn set_element(add: &Operation) -> String {
    match &add.value {
        serde_json::Value::String(element) => element.clone(),
        other => other.to_string(),
    }
}

/// `adds` are the history's `add` operations (value: the element); `present` the elements the
/// final read found.
pub fn check_set(adds: &[Operation], present: &BTreeSet<String>) -> SetReport {
    let mut report = SetReport {
        final_size: present.len(),
        ..SetReport::default()
    };
    let mut invoked = BTreeSet::new();
    let mut lost = Vec::new();
    let mut failed_present = Vec::new();
    for add in adds.iter().filter(|operation| operation.f == Function::Add) {
        let element = set_element(add);
        let is_present = present.contains(&element);
        invoked.insert(element.clone());
        match add.completion {
            Completion::Ok(_) => {
                report.acknowledged += 1;
                if !is_present {
                    lost.push(element.clone());
                }
            }
            Completion::Info => {
                report.unknown += 1;
                report.unknown_present += usize::from(is_present);
            }
            Completion::Fail => {
                report.failed += 1;
                if is_present {
                    failed_present.push(element.clone());
                }
            }
        }
    }
    let never_added: Vec<&String> = present
        .iter()
        .filter(|element| !invoked.contains(*element))
        .collect();
    if !lost.is_empty() {
        report.anomalies.push(format!(
            "{} acknowledged adds lost: {}",
            lost.len(),
            listed(&lost)
        ));
    }
    if !failed_present.is_empty() {
        report.anomalies.push(format!(
            "{} adds reported as failed are present: {}",
            failed_present.len(),
            listed(&failed_present)
        ));
    }
    if !never_added.is_empty() {
        report.anomalies.push(format!(
            "{} elements present that were never added: {}",
            never_added.len(),
            listed(&never_added)
        ));
    }
    report
}

// --- Counter -----------------------------------------------------------------------------

/// The counter workload's verdict. Increments are `add` operations, reads `read` operations
/// whose value is the count.
#[derive(Clone, Debug, Default)]
pub struct CounterReport {
    pub invoked: u64,
    pub acknowledged: u64,
    pub unknown: u64,
    pub failed: u64,
    pub reads_checked: usize,
    pub final_value: Option<u64>,
    pub anomalies: Vec<String>,
}

/// Checks every read against what had certainly happened before it and what could have
/// happened by its end, and the final value against the acknowledged, unknown and issued
/// increments (a value above acknowledged + unknown means an increment applied twice).
pub fn check_counter(operations: &[Operation], final_value: Option<u64>) -> CounterReport {
    let adds: Vec<&Operation> = operations
        .iter()
        .filter(|operation| operation.f == Function::Add)
        .collect();
    let mut report = CounterReport {
        invoked: adds.len() as u64,
        final_value,
        ..CounterReport::default()
    };
    let mut acknowledged_ends = Vec::new();
    let mut possible_starts = Vec::new();
    for add in &adds {
        match add.completion {
            Completion::Ok(_) => {
                report.acknowledged += 1;
                acknowledged_ends.push(add.complete_ns.expect("acknowledged"));
                possible_starts.push(add.invoke_ns);
            }
            Completion::Info => {
                report.unknown += 1;
                possible_starts.push(add.invoke_ns);
            }
            Completion::Fail => report.failed += 1,
        }
    }
    acknowledged_ends.sort_unstable();
    possible_starts.sort_unstable();
    let mut bad_reads = Vec::new();
    for read in operations
        .iter()
        .filter(|operation| operation.f == Function::Read)
    {
        let (Completion::Ok(value), Some(complete_ns)) = (&read.completion, read.complete_ns)
        else {
            continue;
        };
        report.reads_checked += 1;
        let value = value.as_u64().unwrap_or(u64::MAX);
        let at_least = acknowledged_ends.partition_point(|&end| end < read.invoke_ns) as u64;
        let at_most = possible_starts.partition_point(|&start| start <= complete_ns) as u64;
        if value < at_least || value > at_most {
            bad_reads.push(format!(
                "{} (expected {at_least}..={at_most})",
                read.describe()
            ));
        }
    }
    if !bad_reads.is_empty() {
        report.anomalies.push(format!(
            "{} reads outside what the increments allow: {}",
            bad_reads.len(),
            listed(&bad_reads)
        ));
    }
    match final_value {
        None => report
            .anomalies
            .push("no final read of the counter succeeded".into()),
        Some(value) => {
            if value < report.acknowledged {
                report.anomalies.push(format!(
                    "final value {value} is below the {} acknowledged increments (lost \
                     increments)",
                    report.acknowledged
                ));
            }
            if value > report.acknowledged + report.unknown {
                report.anomalies.push(format!(
                    "final value {value} is above the {} acknowledged + {} unknown increments \
                     (an increment applied twice, or a failed one applied)",
                    report.acknowledged, report.unknown
                ));
            }
            if value > report.invoked {
                report.anomalies.push(format!(
                    "final value {value} is above the {} increments issued (double apply)",
                    report.invoked
                ));
            }
        }
    }
    report
}

// --- Watch -------------------------------------------------------------------------------

/// One event a watcher received.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WatchEvent {
    pub revision: i64,
    pub key: String,
    pub value: String,
}

impl std::fmt::Display for WatchEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}={}", self.key, self.revision, self.value)
    }
}

/// What one write did, as far as its client knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedWrite {
    pub key: String,
    pub value: String,
    /// `Some(revision)` when acknowledged, `None` when unknown. Failed writes are left out.
    pub revision: Option<i64>,
}

/// The events one watcher saw, in the order it saw them.
#[derive(Clone, Debug, Default)]
pub struct WatcherLog {
    pub name: String,
    pub events: Vec<WatchEvent>,
    pub resumptions: u32,
}

#[derive(Clone, Debug, Default)]
pub struct WatchReport {
    pub writes_acknowledged: usize,
    pub history_len: usize,
    pub watchers: usize,
    pub resumptions: u32,
    pub anomalies: Vec<String>,
}

/// `history`: the write history, from a watch opened from revision 1 after the run on a
/// healthy cluster. It must agree with the writers (every acknowledged write at its
/// revision, nothing never written, nothing twice), and every watcher's events, in order,
/// must equal it.
pub fn check_watch(
    writes: &[WatchedWrite],
    history: &[WatchEvent],
    watchers: &[WatcherLog],
) -> WatchReport {
    let mut report = WatchReport {
        writes_acknowledged: writes
            .iter()
            .filter(|write| write.revision.is_some())
            .count(),
        history_len: history.len(),
        watchers: watchers.len(),
        resumptions: watchers.iter().map(|watcher| watcher.resumptions).sum(),
        anomalies: Vec::new(),
    };
    report
        .anomalies
        .extend(history_against_writes(writes, history));
    for watcher in watchers {
        if let Some(difference) = first_difference(&watcher.events, history) {
            report
                .anomalies
                .push(format!("watcher {}: {difference}", watcher.name));
        }
    }
    report
}

fn history_against_writes(writes: &[WatchedWrite], history: &[WatchEvent]) -> Vec<String> {
    let mut anomalies = Vec::new();
    if let Some(pair) = history
        .windows(2)
        .find(|pair| pair[0].revision >= pair[1].revision)
    {
        anomalies.push(format!(
            "the history is not in revision order: {} then {}",
            pair[0], pair[1]
        ));
    }
    let by_revision: BTreeMap<i64, &WatchEvent> = history
        .iter()
        .map(|event| (event.revision, event))
        .collect();
    let written: BTreeSet<(&str, &str)> = writes
        .iter()
        .map(|write| (write.key.as_str(), write.value.as_str()))
        .collect();
    let mut missing = Vec::new();
    for write in writes {
        let Some(revision) = write.revision else {
            continue;
        };
        let matches = by_revision
            .get(&revision)
            .is_some_and(|event| event.key == write.key && event.value == write.value);
        if !matches {
            missing.push(format!("{}@{revision}={}", write.key, write.value));
        }
    }
    if !missing.is_empty() {
        anomalies.push(format!(
            "{} acknowledged writes missing from the history at their revision: {}",
            missing.len(),
            listed(&missing)
        ));
    }
    let mut seen = BTreeSet::new();
    let mut unexpected = Vec::new();
    for event in history {
        let pair = (event.key.as_str(), event.value.as_str());
        if !written.contains(&pair) || !seen.insert(pair) {
            unexpected.push(event.to_string());
        }
    }
    if !unexpected.is_empty() {
        anomalies.push(format!(
            "{} events in the history that no write explains (never written, failed, or \
             applied twice): {}",
            unexpected.len(),
            listed(&unexpected)
        ));
    }
    anomalies
}

/// Where a watcher's events first differ from the history: a gap, a duplicate, a
/// reordering, a wrong value, or an early end.
fn first_difference(events: &[WatchEvent], history: &[WatchEvent]) -> Option<String> {
    for (index, (seen, expected)) in events.iter().zip(history).enumerate() {
        if seen == expected {
            continue;
        }
        let kind = if seen.revision > expected.revision {
            "gap: skipped"
        } else if index > 0 && seen.revision <= events[index - 1].revision {
            "duplicate or out of order, instead of"
        } else {
            "wrong event, instead of"
        };
        return Some(format!("event {index} is {seen}: {kind} {expected}"));
    }
    match events.len().cmp(&history.len()) {
        std::cmp::Ordering::Less => Some(format!(
            "saw {} of {} events; first missing {}",
            events.len(),
            history.len(),
            history[events.len()]
        )),
        std::cmp::Ordering::Greater => Some(format!(
            "saw {} events beyond the history, first {}",
            events.len() - history.len(),
            events[history.len()]
        )),
        std::cmp::Ordering::Equal => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn add(element: &str, completion: Completion, invoke_ns: u64, complete_ns: u64) -> Operation {
        let complete_ns = (completion != Completion::Info).then_some(complete_ns);
        Operation {
            process: 1,
            f: Function::Add,
            key: "set".into(),
            value: json!(element),
            completion,
            invoke_ns,
            complete_ns,
        }
    }

    fn read(value: u64, invoke_ns: u64, complete_ns: u64) -> Operation {
        Operation {
            process: 2,
            f: Function::Read,
            key: "counter".into(),
            value: Value::Null,
            completion: Completion::Ok(json!(value)),
            invoke_ns,
            complete_ns: Some(complete_ns),
        }
    }

    fn ok() -> Completion {
        Completion::Ok(json!(1))
    }

    fn elements(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_set_with_every_acknowledged_add_passes() {
        let adds = [
            add("a", ok(), 0, 1),
            add("b", Completion::Info, 2, 3),
            add("c", Completion::Info, 4, 5),
            add("d", Completion::Fail, 6, 7),
        ];
        let report = check_set(&adds, &elements(&["a", "b"]));
        assert!(report.anomalies.is_empty(), "{:?}", report.anomalies);
        assert_eq!(
            (report.acknowledged, report.unknown, report.failed),
            (1, 2, 1)
        );
        assert_eq!(report.unknown_present, 1);
    }

    #[test]
    fn set_anomalies_are_named() {
        let adds = [add("a", ok(), 0, 1), add("d", Completion::Fail, 6, 7)];
        let report = check_set(&adds, &elements(&["d", "zz"]));
        assert_eq!(report.anomalies.len(), 3, "{:?}", report.anomalies);
        assert!(report.anomalies[0].contains("lost: a"));
        assert!(report.anomalies[1].contains("failed are present: d"));
        assert!(report.anomalies[2].contains("never added: zz"));
    }

    #[test]
    fn a_counter_within_bounds_passes() {
        let operations = [
            add("counter", ok(), 0, 10),
            add("counter", Completion::Info, 20, 0),
            read(1, 15, 18),
            read(2, 25, 30),
            add("counter", Completion::Fail, 40, 50),
        ];
        let report = check_counter(&operations, Some(2));
        assert!(report.anomalies.is_empty(), "{:?}", report.anomalies);
        assert_eq!(report.reads_checked, 2);
    }

    #[test]
    fn counter_anomalies_are_named() {
        let operations = [
            add("counter", ok(), 0, 10),
            read(0, 15, 18), // misses an acknowledged increment
            read(5, 20, 30), // more than ever issued by then
        ];
        let lost = check_counter(&operations, Some(0));
        assert_eq!(lost.anomalies.len(), 2, "{:?}", lost.anomalies);
        assert!(lost.anomalies[1].contains("lost increments"));
        let doubled = check_counter(&operations[..1], Some(2));
        assert!(
            doubled.anomalies[0].contains("applied twice"),
            "{:?}",
            doubled.anomalies
        );
        assert!(doubled.anomalies[1].contains("double apply"));
        assert!(!check_counter(&operations[..1], None).anomalies.is_empty());
    }

    fn event(revision: i64, value: &str) -> WatchEvent {
        WatchEvent {
            revision,
            key: "w/1".into(),
            value: value.into(),
        }
    }

    fn written(value: &str, revision: Option<i64>) -> WatchedWrite {
        WatchedWrite {
            key: "w/1".into(),
            value: value.into(),
            revision,
        }
    }

    fn watcher(events: Vec<WatchEvent>) -> WatcherLog {
        WatcherLog {
            name: "m0".into(),
            events,
            resumptions: 1,
        }
    }

    #[test]
    fn watchers_that_saw_the_history_pass() {
        let writes = [
            written("a", Some(2)),
            written("b", None),
            written("c", None),
        ];
        let history = [event(2, "a"), event(3, "b")];
        let report = check_watch(&writes, &history, &[watcher(history.to_vec())]);
        assert!(report.anomalies.is_empty(), "{:?}", report.anomalies);
    }

    #[test]
    fn watch_gaps_duplicates_and_unexplained_events_are_caught() {
        let writes = [
            written("a", Some(2)),
            written("b", Some(3)),
            written("c", Some(4)),
        ];
        let history = [event(2, "a"), event(3, "b"), event(4, "c")];
        let gap = check_watch(
            &writes,
            &history,
            &[watcher(vec![event(2, "a"), event(4, "c")])],
        );
        assert!(gap.anomalies[0].contains("gap"), "{:?}", gap.anomalies);
        let duplicate = vec![event(2, "a"), event(2, "a"), event(3, "b"), event(4, "c")];
        let duplicated = check_watch(&writes, &history, &[watcher(duplicate)]);
        assert!(
            duplicated.anomalies[0].contains("duplicate"),
            "{:?}",
            duplicated.anomalies
        );
        let short = check_watch(&writes, &history, &[watcher(history[..2].to_vec())]);
        assert!(
            short.anomalies[0].contains("saw 2 of 3"),
            "{:?}",
            short.anomalies
        );
        let wrong_history = [event(2, "a"), event(3, "b"), event(4, "zz")];
        let report = check_watch(&writes, &wrong_history, &[]);
        assert_eq!(report.anomalies.len(), 2, "{:?}", report.anomalies);
        assert!(report.anomalies[0].contains("missing"));
        assert!(report.anomalies[1].contains("no write explains"));
    }
}

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::{Value, json};

use super::*;
use crate::history::{Completion, Function, Operation};

/// An operation on key "k" over [invoke, complete] (complete `None`: unknown outcome).
fn op(
    process: u64,
    f: Function,
    value: Value,
    completion: Completion,
    invoke_ns: u64,
    complete_ns: Option<u64>,
) -> Operation {
    Operation {
        process,
        f,
        key: "k".into(),
        value,
        completion,
        invoke_ns,
        complete_ns,
    }
}

fn write(process: u64, value: i64, from: u64, to: u64) -> Operation {
    op(
        process,
        Function::Write,
        json!(value),
        Completion::Ok(json!(value)),
        from,
        Some(to),
    )
}

fn write_unknown(process: u64, value: i64, from: u64) -> Operation {
    op(
        process,
        Function::Write,
        json!(value),
        Completion::Info,
        from,
        None,
    )
}

fn write_failed(process: u64, value: i64, from: u64, to: u64) -> Operation {
    op(
        process,
        Function::Write,
        json!(value),
        Completion::Fail,
        from,
        Some(to),
    )
}

fn read(process: u64, value: Option<i64>, from: u64, to: u64) -> Operation {
    op(
        process,
        Function::Read,
        Value::Null,
        Completion::Ok(value.map_or(Value::Null, |value| json!(value))),
        from,
        Some(to),
    )
}

fn cas(process: u64, expected: i64, new: i64, from: u64, to: Option<u64>) -> Operation {
    let completion = match to {
        Some(_) => Completion::Ok(json!([expected, new])),
        None => Completion::Info,
    };
    op(
        process,
        Function::Cas,
        json!([expected, new]),
        completion,
        from,
        to,
    )
}

fn verdict(operations: &[Operation]) -> KeyVerdict {
    let report = check_register(operations, DEFAULT_CONFIGURATIONS_MAX).unwrap();
    assert!(report.keys.len() <= 1);
    report
        .keys
        .first()
        .map_or(KeyVerdict::Linearizable, |key| key.verdict.clone())
}

fn assert_linearizable(operations: &[Operation]) {
    assert_eq!(verdict(operations), KeyVerdict::Linearizable);
}

fn assert_not_linearizable(operations: &[Operation]) -> String {
    match verdict(operations) {
        KeyVerdict::NotLinearizable(explanation) => explanation,
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[test]
fn sequential_write_then_read_is_linearizable() {
    assert_linearizable(&[
        read(1, None, 0, 5),
        write(1, 1, 10, 20),
        read(2, Some(1), 30, 40),
    ]);
}

#[test]
fn a_stale_read_after_an_acknowledged_write_is_not() {
    let explanation = assert_not_linearizable(&[write(1, 1, 10, 20), read(2, None, 30, 40)]);
    assert!(explanation.contains("read k -> null"), "{explanation}");
}

#[test]
fn a_read_concurrent_with_a_write_may_see_either_value() {
    assert_linearizable(&[
        write(1, 1, 0, 5),
        write(1, 2, 10, 30),
        read(2, Some(1), 15, 20),
    ]);
    assert_linearizable(&[
        write(1, 1, 0, 5),
        write(1, 2, 10, 30),
        read(2, Some(2), 15, 20),
    ]);
}

#[test]
fn reads_may_not_go_back_once_a_new_value_was_seen() {
    // Both reads overlap the write, but the second starts after the first saw the new value.
    assert_not_linearizable(&[
        write(1, 1, 0, 5),
        write(1, 2, 10, 100),
        read(2, Some(2), 20, 30),
        read(3, Some(1), 40, 50),
    ]);
}

#[test]
fn a_lost_write_is_caught() {
    assert_not_linearizable(&[
        write(1, 1, 0, 10),
        write(1, 2, 20, 30),
        read(2, Some(1), 40, 50),
    ]);
}

#[test]
fn an_unknown_write_may_have_happened_or_not() {
    assert_linearizable(&[
        write(1, 1, 0, 10),
        write_unknown(2, 2, 20),
        read(3, Some(2), 30, 40),
        read(3, Some(2), 50, 60),
    ]);
    assert_linearizable(&[
        write(1, 1, 0, 10),
        write_unknown(2, 2, 20),
        read(3, Some(1), 30, 40),
    ]);
    // ... but not before it was invoked.
    assert_not_linearizable(&[
        write(1, 1, 0, 10),
        read(3, Some(2), 12, 18),
        write_unknown(2, 2, 20),
    ]);
    // ... and not twice: once overwritten, it cannot come back.
    assert_not_linearizable(&[
        write_unknown(2, 2, 0),
        read(3, Some(2), 10, 20),
        write(1, 3, 30, 40),
        read(3, Some(2), 50, 60),
    ]);
}

#[test]
fn a_failed_write_never_happened() {
    assert_not_linearizable(&[write_failed(1, 5, 0, 10), read(2, Some(5), 20, 30)]);
    assert_linearizable(&[write_failed(1, 5, 0, 10), read(2, None, 20, 30)]);
}

#[test]
fn cas_needs_its_expected_value() {
    assert_linearizable(&[
        write(1, 1, 0, 10),
        cas(2, 1, 2, 20, Some(30)),
        read(3, Some(2), 40, 50),
    ]);
    assert_not_linearizable(&[write(1, 3, 0, 10), cas(2, 1, 2, 20, Some(30))]);
    // Two successful cas from the same value: only one can have found it.
    assert_not_linearizable(&[
        write(1, 1, 0, 10),
        cas(2, 1, 2, 20, Some(30)),
        cas(3, 1, 3, 20, Some(30)),
    ]);
}

#[test]
fn an_unknown_cas_may_have_applied() {
    assert_linearizable(&[
        write(1, 1, 0, 10),
        cas(2, 1, 2, 20, None),
        read(3, Some(2), 40, 50),
    ]);
    // An unknown write enables an unknown cas whose result is read: both must be kept.
    assert_linearizable(&[
        write(1, 1, 0, 10),
        write_unknown(2, 7, 20),
        cas(3, 7, 8, 30, None),
        read(4, Some(8), 40, 50),
    ]);
}

#[test]
fn keys_are_checked_separately() {
    let mut operations = vec![write(1, 1, 0, 10), read(2, Some(1), 20, 30)];
    let mut other = write(3, 9, 0, 10);
    other.key = "other".into();
    operations.push(other);
    let mut other_read = read(4, Some(1), 40, 50);
    other_read.key = "other".into();
    operations.push(other_read);
    let report = check_register(&operations, DEFAULT_CONFIGURATIONS_MAX).unwrap();
    assert_eq!(report.keys.len(), 2);
    assert_eq!(report.keys[0].key, "k");
    assert_eq!(report.keys[0].verdict, KeyVerdict::Linearizable);
    assert!(matches!(
        report.keys[1].verdict,
        KeyVerdict::NotLinearizable(_)
    ));
    assert!(!report.is_linearizable());
}

#[test]
fn unobserved_unknown_writes_are_pruned() {
    let operations = [
        write(1, 1, 0, 10),
        write_unknown(2, 2, 20),
        write_unknown(3, 3, 20),
        read(4, Some(3), 30, 40),
    ];
    let report = check_register(&operations, DEFAULT_CONFIGURATIONS_MAX).unwrap();
    assert_eq!(
        report.keys[0].operations_checked, 3,
        "the write of 2 is pruned"
    );
    assert!(report.is_linearizable());
}

#[test]
fn the_search_gives_up_when_out_of_budget() {
    // Many concurrent writes with every value read later: many configurations.
    let mut operations: Vec<Operation> = (0..12)
        .map(|value| write(value as u64, value, 0, 100))
        .collect();
    operations.push(read(99, Some(13), 200, 210));
    let report = check_register(&operations, 50).unwrap();
    assert!(matches!(report.keys[0].verdict, KeyVerdict::Unknown(_)));
}

#[test]
fn a_long_concurrent_history_is_checked_quickly() {
    // Ten processes, 4000 operations, many unknown outcomes: a register history as a chaos run
    // would make it, linearizable by construction (each operation takes effect at its
    // midpoint).
    let ops = generated_history(4000, 10, 7);
    let started = std::time::Instant::now();
    let checked = prune_unobserved_unknowns(ops);
    assert!(matches!(
        search(&checked, DEFAULT_CONFIGURATIONS_MAX),
        SearchResult::Linearizable
    ));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn malformed_cas_and_foreign_functions_are_errors() {
    let bad_cas = op(1, Function::Cas, json!(5), Completion::Info, 0, None);
    assert!(matches!(
        check_register(&[bad_cas], 10),
        Err(RegisterHistoryError::MalformedCas(_))
    ));
    let add = op(
        1,
        Function::Add,
        json!(1),
        Completion::Ok(json!(1)),
        0,
        Some(1),
    );
    assert!(matches!(
        check_register(&[add], 10),
        Err(RegisterHistoryError::UnexpectedFunction(_))
    ));
}

/// A deterministic pseudo-random history: `processes` workers, each operation taking effect at
/// the midpoint of its interval on a sequential register.
fn generated_history(len: usize, processes: u64, seed: u64) -> Vec<ModelOp> {
    let mut random = crate::rng::Rng::new(seed);
    let mut busy_until = vec![0u64; processes as usize];
    let mut effects: Vec<(u64, usize)> = Vec::new();
    let mut ops = Vec::new();
    for _ in 0..len {
        let process = random.below(processes) as usize;
        let call_ns = busy_until[process] + random.below(50);
        let length = 1 + random.below(400);
        busy_until[process] = call_ns + length;
        // The kind now (reads are always acknowledged), the values once the order is known.
        let input = match random.below(3) {
            0 => Input::Read(ABSENT),
            1 => Input::Write(ABSENT),
            _ => Input::Cas {
                expected: ABSENT,
                new: ABSENT,
            },
        };
        let unknown = !matches!(input, Input::Read(_)) && random.below(20) == 0;
        ops.push(ModelOp {
            input,
            call_ns,
            return_ns: (!unknown).then_some(call_ns + length),
            source: ops.len(),
        });
        effects.push((call_ns + length / 2, ops.len() - 1));
    }
    effects.sort_unstable();
    let mut state = ABSENT;
    let mut next_value = 1;
    for (_, index) in effects {
        let op = &mut ops[index];
        op.input = match op.input {
            Input::Read(_) => Input::Read(state),
            Input::Write(_) => {
                state = next_value;
                next_value += 1;
                Input::Write(state)
            }
            Input::Cas { .. } => {
                let expected = state;
                state = next_value;
                next_value += 1;
                Input::Cas {
                    expected,
                    new: state,
                }
            }
        };
    }
    ops
}

/// Raw material of a small history: per operation its kind, two values, the slack of its
/// interval around its linearization point, and whether its outcome is unknown.
fn raw_history(
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<(u8, u32, u32, u64, u64, u8)>> {
    prop::collection::vec((0u8..3, 0u32..4, 1u32..4, 0u64..45, 0u64..45, 0u8..10), len)
}

/// Runs the raw operations on a sequential register, each at its own point (20 apart), and
/// stretches each into an interval around its point: linearizable by construction.
/// Operations with unknown outcome either took effect or never happened.
fn sequential_with_concurrency(raw: &[(u8, u32, u32, u64, u64, u8)]) -> Vec<ModelOp> {
    let mut state = ABSENT;
    let mut ops = Vec::new();
    for (index, &(kind, a, b, before, after, outcome)) in raw.iter().enumerate() {
        let point = 100 + 20 * index as u64;
        let unknown = outcome == 0;
        let never_happened = outcome == 1 && kind != 0;
        let input = match kind {
            0 => Input::Read(state),
            1 => Input::Write(b),
            _ => Input::Cas {
                expected: a,
                new: b,
            },
        };
        if never_happened {
            ops.push(ModelOp {
                input,
                call_ns: point - before,
                return_ns: None,
                source: index,
            });
            continue;
        }
        let Some(next) = step(state, input) else {
            continue; // a cas whose comparison failed: recorded as fail, not checked
        };
        state = next;
        if unknown && kind == 0 {
            continue; // an unknown read constrains nothing
        }
        ops.push(ModelOp {
            input,
            call_ns: point - before,
            return_ns: (!unknown).then_some(point + after),
            source: index,
        });
    }
    ops
}

fn is_linearizable(ops: &[ModelOp]) -> bool {
    let pruned = prune_unobserved_unknowns(ops.to_vec());
    match search(&pruned, DEFAULT_CONFIGURATIONS_MAX) {
        SearchResult::Linearizable => true,
        SearchResult::NotLinearizable(_) => false,
        SearchResult::Unknown => panic!("out of budget on a small history"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sequential_histories_with_concurrency_are_accepted(raw in raw_history(1..60)) {
        let ops = sequential_with_concurrency(&raw);
        prop_assert!(is_linearizable(&ops), "{ops:?}");
    }

    #[test]
    fn mutated_histories_agree_with_brute_force(
        raw in raw_history(1..8),
        victim in 0usize..8,
        new_value in 0u32..4,
        shift in 0u64..200,
        mutation in 0u8..3,
    ) {
        let mut ops = sequential_with_concurrency(&raw);
        if ops.is_empty() {
            return Ok(());
        }
        let victim = victim % ops.len();
        match mutation {
            // Change what a read returned (or what a write wrote).
            0 => ops[victim].input = match ops[victim].input {
                Input::Read(_) => Input::Read(new_value),
                Input::Write(_) => Input::Write(new_value),
                Input::Cas { new, .. } => Input::Cas { expected: new_value, new },
            },
            // Move an operation later in time.
            1 => {
                ops[victim].call_ns += shift;
                if let Some(return_ns) = ops[victim].return_ns.as_mut() {
                    *return_ns += shift;
                }
            }
            // Make an unknown operation acknowledged, or the reverse.
            _ => ops[victim].return_ns = match ops[victim].return_ns {
                Some(_) => None,
                None => Some(ops[victim].call_ns + shift),
            },
        }
        prop_assert_eq!(is_linearizable(&ops), brute_force(&ops), "{:?}", ops);
    }
}

/// Arbitrary small histories: random intervals, random values, some unknown outcomes.
fn arbitrary_history() -> impl Strategy<Value = Vec<ModelOp>> {
    prop::collection::vec(
        (0u8..3, 0u32..3, 0u32..3, 0u64..100, 1u64..60, 0u8..6),
        1..8,
    )
    .prop_map(|raw| {
        raw.into_iter()
            .enumerate()
            .map(|(source, (kind, a, b, call_ns, length, outcome))| ModelOp {
                input: match kind {
                    0 => Input::Read(a),
                    1 => Input::Write(a),
                    _ => Input::Cas {
                        expected: a,
                        new: b,
                    },
                },
                call_ns,
                return_ns: (outcome != 0 || kind == 0).then_some(call_ns + length),
                source,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn arbitrary_histories_agree_with_brute_force(ops in arbitrary_history()) {
        prop_assert_eq!(is_linearizable(&ops), brute_force(&ops), "{:?}", ops);
    }
}

#[test]
fn the_property_tests_see_both_verdicts() {
    // Guards the tests above against testing only one side: among arbitrary small histories,
    // the brute force finds both linearizable and non-linearizable ones.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut accepted, mut rejected) = (0, 0);
    for _ in 0..300 {
        let ops = arbitrary_history().new_tree(&mut runner).unwrap().current();
        if brute_force(&ops) {
            accepted += 1;
        } else {
            rejected += 1;
        }
    }
    assert!(
        accepted > 30 && rejected > 30,
        "{accepted} accepted, {rejected} rejected"
    );
}

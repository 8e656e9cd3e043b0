//! A linearizability checker for registers with read, write and compare-and-set.
//!
//! The search is Wing & Gong's, with Lowe's improvements (as Knossos and Porcupine describe
//! them): operations are events on a time line, kept in a linked list; the search walks the
//! list from its head, and at an invocation tries to linearize that operation next (apply it
//! to the model, lift its invocation and completion out of the list, start again from the
//! head); at a completion it has met an operation that had to be linearized already, so it
//! backtracks. A cache of (set of linearized operations, model state) prunes every
//! configuration seen before, which is what makes the search fast on real histories.
//!
//! - **Per key** (P-compositionality): each key's history is checked on its own.
//! - **Unknown outcomes** (`info`): such an operation may take effect at any time after its
//!   invocation or never; it has no completion event, so it never forces a backtrack, and
//!   the search succeeds once every acknowledged operation is linearized (the rest can take
//!   effect after everything else, where nothing observes them).
//! - **Failures** (`fail`) took no effect and are dropped, as are reads with unknown outcome
//!   (they constrain nothing).
//! - **Pruning**: a write or cas with an unknown outcome whose new value nobody ever observed
//!   (no acknowledged read returned it, no cas expected it) can be dropped: wherever it might
//!   take effect, the next operation to see the register must overwrite it.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use crate::history::{Completion, Function, Operation};

/// The register's value: [`ABSENT`] or an interned value.
type State = u32;
const ABSENT: State = 0;

/// The most configurations one key's search may cache before it gives up (each costs about a
/// hundred bytes).
pub const DEFAULT_CONFIGURATIONS_MAX: usize = 3_000_000;

/// What an operation does to the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Input {
    /// A read that returned this value.
    Read(State),
    Write(State),
    Cas {
        expected: State,
        new: State,
    },
}

/// One operation as the search sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ModelOp {
    pub(crate) input: Input,
    pub(crate) call_ns: u64,
    /// `None`: outcome unknown.
    pub(crate) return_ns: Option<u64>,
    /// Index of the operation in the caller's list, for reports.
    pub(crate) source: usize,
}

fn step(state: State, input: Input) -> Option<State> {
    match input {
        Input::Read(value) => (value == state).then_some(state),
        Input::Write(value) => Some(value),
        Input::Cas { expected, new } => (expected == state).then_some(new),
    }
}

/// The outcome of checking one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyVerdict {
    Linearizable,
    /// With an explanation naming the operations involved.
    NotLinearizable(String),
    /// The search ran out of its budget.
    Unknown(String),
}

#[derive(Clone, Debug)]
pub struct KeyReport {
    pub key: String,
    /// Operations the search had to place (after dropping failures and pruning).
    pub operations_checked: usize,
    pub verdict: KeyVerdict,
}

/// Every key's verdict.
#[derive(Clone, Debug, Default)]
pub struct RegisterReport {
    pub keys: Vec<KeyReport>,
    /// Operations in the history (all keys, every outcome).
    pub operations_total: usize,
}

impl RegisterReport {
    pub fn is_linearizable(&self) -> bool {
        self.keys
            .iter()
            .all(|key| key.verdict == KeyVerdict::Linearizable)
    }

    pub fn failures(&self) -> impl Iterator<Item = &KeyReport> {
        self.keys
            .iter()
            .filter(|key| key.verdict != KeyVerdict::Linearizable)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterHistoryError {
    #[error("{0}: a register history has only read, write and cas")]
    UnexpectedFunction(String),
    #[error("{0}: a cas carries [expected, new]")]
    MalformedCas(String),
}

/// Checks a register history, key by key.
pub fn check_register(
    operations: &[Operation],
    configurations_max: usize,
) -> Result<RegisterReport, RegisterHistoryError> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for operation in operations {
        by_key.entry(&operation.key).or_default().push(operation);
    }
    let mut report = RegisterReport {
        keys: Vec::new(),
        operations_total: operations.len(),
    };
    for (key, key_operations) in by_key {
        let mut values = Interner::default();
        let model_ops = to_model_ops(&key_operations, &mut values)?;
        let checked = prune_unobserved_unknowns(model_ops);
        let verdict = match search(&checked, configurations_max) {
            SearchResult::Linearizable => KeyVerdict::Linearizable,
            SearchResult::Unknown => KeyVerdict::Unknown(format!(
                "gave up after caching {configurations_max} configurations"
            )),
            SearchResult::NotLinearizable(counterexample) => KeyVerdict::NotLinearizable(
                counterexample.explain(&checked, &key_operations, &values),
            ),
        };
        report.keys.push(KeyReport {
            key: key.to_string(),
            operations_checked: checked.len(),
            verdict,
        });
    }
    Ok(report)
}

/// Maps JSON values to small integers; null is [`ABSENT`].
#[derive(Debug, Default)]
struct Interner {
    ids: HashMap<String, State>,
    values: Vec<Value>,
}

impl Interner {
    fn intern(&mut self, value: &Value) -> State {
        if value.is_null() {
            return ABSENT;
        }
        let text = value.to_string();
        if let Some(&id) = self.ids.get(&text) {
            return id;
        }
        self.values.push(value.clone());
        let id = State::try_from(self.values.len()).expect("fewer than 2^32 values");
        self.ids.insert(text, id);
        id
    }

    fn show(&self, state: State) -> String {
        match state {
            ABSENT => "absent".into(),
            id => self.values[id as usize - 1].to_string(),
        }
    }
}

fn to_model_ops(
    operations: &[&Operation],
    values: &mut Interner,
) -> Result<Vec<ModelOp>, RegisterHistoryError> {
    let mut model_ops = Vec::new();
    for (source, operation) in operations.iter().enumerate() {
        let ok_value = match &operation.completion {
            Completion::Fail => continue,
            Completion::Info if operation.f == Function::Read => continue,
            Completion::Info => None,
            Completion::Ok(value) => Some(value),
        };
        let input = match operation.f {
            Function::Read => Input::Read(values.intern(ok_value.unwrap_or(&Value::Null))),
            Function::Write => Input::Write(values.intern(&operation.value)),
            Function::Cas => match operation.value.as_array().map(Vec::as_slice) {
                Some([expected, new]) => Input::Cas {
                    expected: values.intern(expected),
                    new: values.intern(new),
                },
                _ => return Err(RegisterHistoryError::MalformedCas(operation.describe())),
            },
            Function::Add => {
                return Err(RegisterHistoryError::UnexpectedFunction(
                    operation.describe(),
                ));
            }
        };
        model_ops.push(ModelOp {
            input,
            call_ns: operation.invoke_ns,
            return_ns: operation.complete_ns,
            source,
        });
    }
    Ok(model_ops)
}

/// Drops unknown-outcome writes and cas whose new value nothing observed (see the module
/// documentation for why that is sound).
pub(crate) fn prune_unobserved_unknowns(ops: Vec<ModelOp>) -> Vec<ModelOp> {
    let mut observed = HashSet::new();
    for op in &ops {
        match op.input {
            Input::Read(value) => {
                observed.insert(value);
            }
            Input::Cas { expected, .. } => {
                observed.insert(expected);
            }
            Input::Write(_) => {}
        }
    }
    ops.into_iter()
        .filter(|op| match (op.return_ns, op.input) {
            (None, Input::Write(new) | Input::Cas { new, .. }) => observed.contains(&new),
            _ => true,
        })
        .collect()
}

pub(crate) enum SearchResult {
    Linearizable,
    NotLinearizable(Counterexample),
    Unknown,
}

/// The deepest point the search reached: the operations linearized and the state after them.
pub(crate) struct Counterexample {
    linearized: Vec<usize>,
    state: State,
}

/// A fixed-size set of operation indices, the cache key together with the model state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Bits(Box<[u64]>);

impl Bits {
    fn new(len: usize) -> Bits {
        Bits(vec![0; len.div_ceil(64)].into_boxed_slice())
    }
    fn set(&mut self, index: usize) {
        self.0[index / 64] |= 1 << (index % 64);
    }
    fn clear(&mut self, index: usize) {
        self.0[index / 64] &= !(1 << (index % 64));
    }
}

const NIL: usize = usize::MAX;

/// The time line: invocations and completions in time order, as a doubly linked list from
/// which an operation's two events can be lifted and put back (in reverse order).
struct TimeLine {
    /// Per list node: the operation, and whether the node is its invocation.
    op_of: Vec<usize>,
    is_call: Vec<bool>,
    next: Vec<usize>,
    prev: Vec<usize>,
    head: usize,
    call_node: Vec<usize>,
    return_node: Vec<usize>,
}

impl TimeLine {
    fn new(ops: &[ModelOp]) -> TimeLine {
        // (time, invocations before completions at equal times, op, is_call)
        let mut events: Vec<(u64, u8, usize, bool)> = Vec::with_capacity(2 * ops.len());
        for (index, op) in ops.iter().enumerate() {
            events.push((op.call_ns, 0, index, true));
            if let Some(return_ns) = op.return_ns {
                events.push((return_ns, 1, index, false));
            }
        }
        events.sort_unstable();
        let len = events.len();
        let head = len;
        let mut line = TimeLine {
            op_of: events.iter().map(|event| event.2).collect(),
            is_call: events.iter().map(|event| event.3).collect(),
            next: (1..=len)
                .map(|next| if next == len { NIL } else { next })
                .collect(),
            prev: (0..len).map(|node| node.wrapping_sub(1)).collect(),
            head,
            call_node: vec![NIL; ops.len()],
            return_node: vec![NIL; ops.len()],
        };
        if len > 0 {
            line.prev[0] = head;
        }
        line.next.push(if len == 0 { NIL } else { 0 });
        line.prev.push(NIL);
        for (node, event) in events.iter().enumerate() {
            if event.3 {
                line.call_node[event.2] = node;
            } else {
                line.return_node[event.2] = node;
            }
        }
        line
    }

    fn first(&self) -> usize {
        self.next[self.head]
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call_node[op]);
        if self.return_node[op] != NIL {
            self.unlink(self.return_node[op]);
        }
    }

    fn unlift(&mut self, op: usize) {
        if self.return_node[op] != NIL {
            self.relink(self.return_node[op]);
        }
        self.relink(self.call_node[op]);
    }
}

pub(crate) fn search(ops: &[ModelOp], configurations_max: usize) -> SearchResult {
    let mut line = TimeLine::new(ops);
    let mut acknowledged_left = ops.iter().filter(|op| op.return_ns.is_some()).count();
    let mut state = ABSENT;
    let mut linearized = Bits::new(ops.len());
    let mut seen: HashSet<(Bits, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut deepest = Counterexample {
        linearized: Vec::new(),
        state,
    };
    let mut node = line.first();
    while acknowledged_left > 0 {
        let op = line.op_of[node];
        if line.is_call[node] {
            if let Some(next_state) = step(state, ops[op].input) {
                linearized.set(op);
                if seen.insert((linearized.clone(), next_state)) {
                    if seen.len() > configurations_max {
                        return SearchResult::Unknown;
                    }
                    stack.push((op, state));
                    state = next_state;
                    line.lift(op);
                    if ops[op].return_ns.is_some() {
                        acknowledged_left -= 1;
                    }
                    if stack.len() > deepest.linearized.len() {
                        deepest.linearized = stack.iter().map(|&(op, _)| op).collect();
                        deepest.state = state;
                    }
                    node = line.first();
                    continue;
                }
                linearized.clear(op);
            }
            node = line.next[node];
        } else {
            // A completion: its operation had to be linearized by now. Undo the latest choice.
            let Some((undone, previous_state)) = stack.pop() else {
                return SearchResult::NotLinearizable(deepest);
            };
            linearized.clear(undone);
            state = previous_state;
            line.unlift(undone);
            if ops[undone].return_ns.is_some() {
                acknowledged_left += 1;
            }
            node = line.next[line.call_node[undone]];
        }
    }
    SearchResult::Linearizable
}

/// How many operations an explanation lists at most, per part.
const EXPLANATION_OPS_MAX: usize = 8;

impl Counterexample {
    /// Names the first acknowledged operation that could not be placed after the deepest
    /// linearization found, the state it faced, and what else was pending then.
    fn explain(&self, ops: &[ModelOp], operations: &[&Operation], values: &Interner) -> String {
        let placed: HashSet<usize> = self.linearized.iter().copied().collect();
        let Some(blocker) = (0..ops.len())
            .filter(|op| !placed.contains(op) && ops[*op].return_ns.is_some())
            .min_by_key(|op| ops[*op].return_ns)
        else {
            return "no linearization found".into();
        };
        let blocker_return = ops[blocker].return_ns.expect("acknowledged");
        let describe = |op: usize| operations[ops[op].source].describe();
        let mut text = format!(
            "after linearizing {} of {} operations the register is {}, and no order of the \
             pending operations lets this one take effect before it completed:\n    {}",
            self.linearized.len(),
            ops.len(),
            values.show(self.state),
            describe(blocker)
        );
        let last_placed = self.linearized.iter().rev().take(EXPLANATION_OPS_MAX).rev();
        text.push_str("\n  last operations linearized:");
        for &op in last_placed {
            text.push_str(&format!("\n    {}", describe(op)));
        }
        let pending: Vec<usize> = (0..ops.len())
            .filter(|&op| op != blocker && !placed.contains(&op))
            .filter(|&op| ops[op].call_ns <= blocker_return)
            .take(EXPLANATION_OPS_MAX)
            .collect();
        if !pending.is_empty() {
            text.push_str("\n  other operations pending then:");
            for op in pending {
                text.push_str(&format!("\n    {}", describe(op)));
            }
        }
        text
    }
}

/// Tries every order (and every subset of the unknown-outcome operations): the reference the
/// property tests compare [`search`] with. Exponential; for a handful of operations only.
#[cfg(test)]
pub(crate) fn brute_force(ops: &[ModelOp]) -> bool {
    fn extend(ops: &[ModelOp], done: &mut Vec<bool>, state: State) -> bool {
        let all_acknowledged_done = ops
            .iter()
            .zip(done.iter())
            .all(|(op, &done)| done || op.return_ns.is_none());
        if all_acknowledged_done {
            return true;
        }
        for candidate in 0..ops.len() {
            if done[candidate] {
                continue;
            }
            // Nothing still to be placed may have completed before the candidate was invoked.
            let must_wait = (0..ops.len()).any(|other| {
                !done[other]
                    && other != candidate
                    && ops[other]
                        .return_ns
                        .is_some_and(|other_return| other_return < ops[candidate].call_ns)
            });
            if must_wait {
                continue;
            }
            if let Some(next) = step(state, ops[candidate].input) {
                done[candidate] = true;
                let found = extend(ops, done, next);
                done[candidate] = false;
                if found {
                    return true;
                }
            }
        }
        false
    }
    extend(ops, &mut vec![false; ops.len()], ABSENT)
}

#[cfg(test)]
mod tests;

//! Model-based property test: random sequences of puts, deletes, txns, compactions and
//! ranges (at current and past revisions) against a deliberately simple reference model, a
//! plain `BTreeMap` per revision. Every answer (responses, errors, watch events) must match.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::bytes;
use flotilla_kv::{Command, ErrorKind, KvStore, Limits, Response};
use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use flotilla_proto::etcdserverpb::request_op::Request;
use flotilla_proto::etcdserverpb::response_op::Response as OpResponse;
use flotilla_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp,
    TxnRequest, TxnResponse,
};
use flotilla_proto::mvccpb::{Event, KeyValue, event::EventType};
use proptest::prelude::*;

// ----- the reference model -------------------------------------------------------------------

type State = BTreeMap<Vec<u8>, KeyValue>;

/// Every state the store has been in, indexed by revision (index 0 unused), plus the
/// compaction point.
struct Model {
    states: Vec<State>,
    compacted: i64,
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..ResponseHeader::default()
    })
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        _ => key >= start && key < end,
    }
}

fn keys_in<'a>(
    state: &'a State,
    start: &'a [u8],
    end: &'a [u8],
) -> impl Iterator<Item = &'a KeyValue> {
    state
        .values()
        .filter(move |kv| in_range(&kv.key, start, end))
}

/// One write request being applied: a copy of the current state and what changed.
struct Writing {
    state: State,
    revision: i64,
    events: Vec<Event>,
}

impl Writing {
    fn view(&self) -> i64 {
        if self.events.is_empty() {
            self.revision - 1
        } else {
            self.revision
        }
    }

    fn put(&mut self, request: &PutRequest) -> PutResponse {
        let previous = self.state.get(&request.key[..]).cloned();
        let kv = KeyValue {
            key: request.key.clone(),
            create_revision: previous
                .as_ref()
                .map_or(self.revision, |p| p.create_revision),
            mod_revision: self.revision,
            version: previous.as_ref().map_or(1, |p| p.version + 1),
            value: request.value.clone(),
            lease: 0,
        };
        self.state.insert(request.key.to_vec(), kv.clone());
        self.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: previous.clone(),
        });
        PutResponse {
            header: header(self.revision),
            prev_kv: previous.filter(|_| request.prev_kv),
        }
    }

    fn delete(&mut self, request: &DeleteRangeRequest) -> DeleteRangeResponse {
        let doomed: Vec<KeyValue> = keys_in(&self.state, &request.key, &request.range_end)
            .cloned()
            .collect();
        for kv in &doomed {
            self.state.remove(&kv.key[..]);
            self.events.push(Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: kv.key.clone(),
                    mod_revision: self.revision,
                    ..KeyValue::default()
                }),
                prev_kv: Some(kv.clone()),
            });
        }
        DeleteRangeResponse {
            header: header(self.view()),
            deleted: doomed.len() as i64,
            prev_kvs: if request.prev_kv { doomed } else { Vec::new() },
        }
    }
}

impl Model {
    fn new() -> Model {
        Model {
            states: vec![State::new(), State::new()],
            compacted: 0,
        }
    }

    fn current(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    fn begin(&self) -> Writing {
        Writing {
            state: self.states.last().unwrap().clone(),
            revision: self.current() + 1,
            events: Vec::new(),
        }
    }

    fn finish(&mut self, writing: Writing) -> Vec<Event> {
        if !writing.events.is_empty() {
            self.states.push(writing.state);
        }
        writing.events
    }

    fn range(
        &self,
        request: &RangeRequest,
        view: &State,
        view_revision: i64,
    ) -> Result<RangeResponse, ErrorKind> {
        let state = match request.revision {
            revision if revision <= 0 => view,
            revision if revision > self.current() => return Err(ErrorKind::FutureRevision),
            revision if revision < self.compacted => return Err(ErrorKind::Compacted),
            revision => &self.states[revision as usize],
        };
        let all: Vec<KeyValue> = keys_in(state, &request.key, &request.range_end)
            .cloned()
            .collect();
        let count = all.len() as i64;
        let mut kvs: Vec<KeyValue> = all
            .into_iter()
            .filter(|kv| {
                request.min_mod_revision == 0 || kv.mod_revision >= request.min_mod_revision
            })
            .filter(|kv| {
                request.max_mod_revision == 0 || kv.mod_revision <= request.max_mod_revision
            })
            .collect();
        let target = SortTarget::try_from(request.sort_target).unwrap();
        let order = SortOrder::try_from(request.sort_order).unwrap();
        let sort_key = |kv: &KeyValue| -> (Vec<u8>, i64) {
            match target {
                SortTarget::Key => (kv.key.to_vec(), 0),
                SortTarget::Version => (Vec::new(), kv.version),
                SortTarget::Create => (Vec::new(), kv.create_revision),
                SortTarget::Mod => (Vec::new(), kv.mod_revision),
                SortTarget::Value => (kv.value.to_vec(), 0),
            }
        };
        // Ties (same target) stay in key order, in both directions.
        match order {
            SortOrder::Descend => {
                kvs.sort_by(|a, b| sort_key(b).cmp(&sort_key(a)).then(a.key.cmp(&b.key)))
            }
            _ => kvs.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)).then(a.key.cmp(&b.key))),
        }
        let mut more = false;
        if request.limit > 0 && kvs.len() > request.limit as usize {
            kvs.truncate(request.limit as usize);
            more = true;
        }
        if request.count_only {
            kvs.clear();
            more = false;
        }
        if request.keys_only {
            kvs.iter_mut().for_each(|kv| kv.value = Bytes::new());
        }
        Ok(RangeResponse {
            header: header(view_revision),
            kvs,
            more,
            count,
        })
    }

    fn compare(&self, compare: &Compare, state: &State) -> bool {
        let matching: Vec<&KeyValue> = keys_in(state, &compare.key, &compare.range_end).collect();
        let target = CompareTarget::try_from(compare.target).unwrap();
        if matching.is_empty() && target == CompareTarget::Value {
            return false;
        }
        let zero = KeyValue::default();
        let candidates = if matching.is_empty() {
            vec![&zero]
        } else {
            matching
        };
        candidates.into_iter().all(|kv| {
            let ordering = match (&compare.target_union, target) {
                (Some(TargetUnion::Value(v)), CompareTarget::Value) => kv.value.cmp(v),
                (Some(TargetUnion::Version(v)), CompareTarget::Version) => kv.version.cmp(v),
                (Some(TargetUnion::CreateRevision(v)), CompareTarget::Create) => {
                    kv.create_revision.cmp(v)
                }
                (Some(TargetUnion::ModRevision(v)), CompareTarget::Mod) => kv.mod_revision.cmp(v),
                other => panic!("generator makes matching operands only: {other:?}"),
            };
            match CompareResult::try_from(compare.result).unwrap() {
                CompareResult::Equal => ordering.is_eq(),
                CompareResult::NotEqual => ordering.is_ne(),
                CompareResult::Greater => ordering.is_gt(),
                CompareResult::Less => ordering.is_lt(),
            }
        })
    }

    fn has_duplicates(ops: &[RequestOp]) -> bool {
        let puts: Vec<&Bytes> = ops
            .iter()
            .filter_map(|op| match &op.request {
                Some(Request::RequestPut(put)) => Some(&put.key),
                _ => None,
            })
            .collect();
        let deletes: Vec<&DeleteRangeRequest> = ops
            .iter()
            .filter_map(|op| match &op.request {
                Some(Request::RequestDeleteRange(delete)) => Some(delete),
                _ => None,
            })
            .collect();
        let repeated = (0..puts.len()).any(|i| puts[i + 1..].contains(&puts[i]));
        let deleted = puts
            .iter()
            .any(|key| deletes.iter().any(|d| in_range(key, &d.key, &d.range_end)));
        repeated || deleted
    }

    fn txn(&mut self, request: &TxnRequest) -> (Result<TxnResponse, ErrorKind>, Vec<Event>) {
        if Model::has_duplicates(&request.success) || Model::has_duplicates(&request.failure) {
            return (Err(ErrorKind::DuplicateKey), Vec::new());
        }
        let before = self.states.last().unwrap().clone();
        let succeeded = request.compare.iter().all(|c| self.compare(c, &before));
        let ops = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        for op in ops {
            if let Some(Request::RequestRange(range)) = &op.request
                && let Err(error) = self.range(range, &before, self.current())
            {
                return (Err(error), Vec::new());
            }
        }
        let mut writing = self.begin();
        let mut responses = Vec::new();
        for op in ops {
            let response = match op.request.as_ref().unwrap() {
                Request::RequestRange(range) => {
                    let view = writing.view();
                    OpResponse::ResponseRange(self.range(range, &writing.state, view).unwrap())
                }
                Request::RequestPut(put) => OpResponse::ResponsePut(writing.put(put)),
                Request::RequestDeleteRange(delete) => {
                    OpResponse::ResponseDeleteRange(writing.delete(delete))
                }
                Request::RequestTxn(_) => unreachable!("not generated"),
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        let events = self.finish(writing);
        let response = TxnResponse {
            header: header(self.current()),
            succeeded,
            responses,
        };
        (Ok(response), events)
    }

    fn compact(&mut self, revision: i64) -> Result<CompactionResponse, ErrorKind> {
        if revision <= self.compacted {
            return Err(ErrorKind::Compacted);
        }
        if revision > self.current() {
            return Err(ErrorKind::FutureRevision);
        }
        self.compacted = revision;
        Ok(CompactionResponse {
            header: header(self.current()),
        })
    }
}

// ----- generated operations --------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(i64),
    Range(RangeRequest),
}

const KEYS: &[&str] = &["a", "ab", "b", "ba", "c", "d"];

fn key() -> impl Strategy<Value = Bytes> {
    prop::sample::select(KEYS).prop_map(bytes)
}

fn range_end() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        2 => Just(Bytes::new()),
        1 => Just(bytes("\0")),
        2 => key(),
        1 => Just(bytes("z")),
    ]
}

fn value() -> impl Strategy<Value = Bytes> {
    prop::sample::select(&["x", "y", "z", ""][..]).prop_map(bytes)
}

fn put() -> impl Strategy<Value = PutRequest> {
    (key(), value(), any::<bool>()).prop_map(|(key, value, prev_kv)| PutRequest {
        key,
        value,
        prev_kv,
        ..PutRequest::default()
    })
}

fn delete() -> impl Strategy<Value = DeleteRangeRequest> {
    (key(), range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

/// `revision_choice` is mapped onto -1..=current+1 when the op runs.
fn range(past_revisions: bool) -> impl Strategy<Value = RangeRequest> {
    (
        key(),
        range_end(),
        0i64..4,
        if past_revisions { 0i64..40 } else { 0i64..1 },
        0i32..3,
        0i32..5,
        any::<bool>(),
        any::<bool>(),
        prop_oneof![3 => Just(0i64), 1 => 1i64..20],
        prop_oneof![3 => Just(0i64), 1 => 1i64..20],
    )
        .prop_map(
            |(
                key,
                range_end,
                limit,
                revision,
                sort_order,
                sort_target,
                keys_only,
                count_only,
                min_mod,
                max_mod,
            )| {
                RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision,
                    sort_order,
                    sort_target,
                    keys_only,
                    count_only,
                    min_mod_revision: min_mod,
                    max_mod_revision: max_mod,
                    ..RangeRequest::default()
                }
            },
        )
}

fn compare() -> impl Strategy<Value = Compare> {
    (key(), range_end(), 0i32..4, 0usize..4, value(), 0i64..12).prop_map(
        |(key, range_end, result, target, value, number)| {
            let (target, operand) = match target {
                0 => (CompareTarget::Value, TargetUnion::Value(value)),
                1 => (CompareTarget::Version, TargetUnion::Version(number / 3)),
                2 => (CompareTarget::Create, TargetUnion::CreateRevision(number)),
                _ => (CompareTarget::Mod, TargetUnion::ModRevision(number)),
            };
            Compare {
                result,
                target: target as i32,
                key,
                target_union: Some(operand),
                range_end,
            }
        },
    )
}

fn request_op() -> impl Strategy<Value = RequestOp> {
    prop_oneof![
        3 => put().prop_map(|p| RequestOp { request: Some(Request::RequestPut(p)) }),
        1 => delete().prop_map(|d| RequestOp { request: Some(Request::RequestDeleteRange(d)) }),
        2 => range(false).prop_map(|r| RequestOp { request: Some(Request::RequestRange(r)) }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => put().prop_map(Op::Put),
        2 => delete().prop_map(Op::Delete),
        3 => (prop::collection::vec(compare(), 0..3), prop::collection::vec(request_op(), 0..4), prop::collection::vec(request_op(), 0..3))
            .prop_map(|(compare, success, failure)| Op::Txn(TxnRequest { compare, success, failure })),
        1 => (0i64..40).prop_map(Op::Compact),
        4 => range(true).prop_map(Op::Range),
    ]
}

/// Maps a generated revision number onto the interesting span around the live history.
fn pick_revision(choice: i64, current: i64) -> i64 {
    if choice == 0 {
        0
    } else {
        choice % (current + 2)
    }
}

fn kind<T>(result: Result<T, flotilla_kv::KvError>) -> Result<T, ErrorKind> {
    result.map_err(|error| error.kind())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut store = KvStore::new(Limits::default());
    let mut model = Model::new();
    for (position, op) in ops.into_iter().enumerate() {
        let index = position as u64 + 1;
        match op {
            Op::Put(request) => {
                let result = store.apply(index, &Command::put(request.clone()).encode());
                let mut writing = model.begin();
                let response = writing.put(&request);
                let events = model.finish(writing);
                prop_assert_eq!(result.outcome, Ok(Response::Put(response)));
                prop_assert_eq!(result.events, events);
            }
            Op::Delete(request) => {
                let result = store.apply(index, &Command::delete_range(request.clone()).encode());
                let mut writing = model.begin();
                let response = writing.delete(&request);
                let events = model.finish(writing);
                prop_assert_eq!(result.outcome, Ok(Response::DeleteRange(response)));
                prop_assert_eq!(result.events, events);
            }
            Op::Txn(request) => {
                let result = store.apply(index, &Command::txn(request.clone()).encode());
                let (expected, events) = model.txn(&request);
                prop_assert_eq!(kind(result.outcome), expected.map(Response::Txn));
                prop_assert_eq!(result.events, events);
            }
            Op::Compact(choice) => {
                let revision = pick_revision(choice, model.current());
                let request = CompactionRequest {
                    revision,
                    physical: false,
                };
                let result = store.apply(index, &Command::compaction(request).encode());
                prop_assert_eq!(
                    kind(result.outcome),
                    model.compact(revision).map(Response::Compaction)
                );
            }
            Op::Range(mut request) => {
                store.skip_index(index);
                request.revision = pick_revision(request.revision, model.current());
                let current = model.states.last().unwrap().clone();
                let expected = model.range(&request, &current, model.current());
                prop_assert_eq!(kind(store.range(&request)), expected, "{:?}", request);
            }
        }
        prop_assert_eq!(store.current_revision(), model.current());
    }
    // Every revision still readable gives the model's state.
    for revision in model.compacted.max(1)..=model.current() {
        let request = RangeRequest {
            key: bytes("\0"),
            range_end: bytes("\0"),
            revision,
            ..RangeRequest::default()
        };
        let state = &model.states[revision as usize];
        let expected: Vec<KeyValue> = state.values().cloned().collect();
        prop_assert_eq!(
            store.range(&request).unwrap().kvs,
            expected,
            "revision {}",
            revision
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}

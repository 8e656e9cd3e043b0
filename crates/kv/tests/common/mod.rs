//! Helpers shared by the integration tests: a store with its own log index, and builders for
//! etcd requests.
#![allow(dead_code)]

use bytes::Bytes;
use flotilla_kv::{ApplyResult, Command, KvStore, Limits, Response};
use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::request_op::Request;
use flotilla_proto::etcdserverpb::response_op::Response as OpResponse;
use flotilla_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
    TxnResponse,
};
use flotilla_proto::mvccpb::KeyValue;

pub fn bytes(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

/// A store plus the next log index, applying commands through their encoding as the server
/// does.
#[derive(Debug)]
pub struct Harness {
    pub store: KvStore,
    pub index: u64,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Harness {
        Harness {
            store: KvStore::new(limits),
            index: 0,
        }
    }

    pub fn apply(&mut self, command: Command) -> ApplyResult {
        self.index += 1;
        self.store.apply(self.index, &command.encode())
    }

    pub fn put(&mut self, key: &str, value: &str) -> ApplyResult {
        self.apply(Command::put(put_request(key, value)))
    }

    pub fn put_with_lease(&mut self, key: &str, value: &str, lease: i64) -> ApplyResult {
        let mut request = put_request(key, value);
        request.lease = lease;
        self.apply(Command::put(request))
    }

    pub fn delete(&mut self, key: &str, range_end: &str) -> ApplyResult {
        self.apply(Command::delete_range(DeleteRangeRequest {
            key: bytes(key),
            range_end: bytes(range_end),
            prev_kv: true,
        }))
    }

    pub fn txn(&mut self, request: TxnRequest) -> ApplyResult {
        self.apply(Command::txn(request))
    }

    pub fn get(&self, key: &str) -> Option<KeyValue> {
        let response = self.store.range(&range_request(key, "")).unwrap();
        response.kvs.into_iter().next()
    }

    pub fn range(&self, request: &RangeRequest) -> RangeResponse {
        self.store.range(request).unwrap()
    }

    pub fn revision(&self) -> i64 {
        self.store.current_revision()
    }
}

pub fn put_request(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: bytes(key),
        value: bytes(value),
        ..PutRequest::default()
    }
}

pub fn range_request(key: &str, range_end: &str) -> RangeRequest {
    RangeRequest {
        key: bytes(key),
        range_end: bytes(range_end),
        ..RangeRequest::default()
    }
}

pub fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(put_request(key, value))),
    }
}

pub fn delete_op(key: &str, range_end: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: bytes(key),
            range_end: bytes(range_end),
            prev_kv: false,
        })),
    }
}

pub fn range_op(key: &str, range_end: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(range_request(key, range_end))),
    }
}

pub fn txn_op(request: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestTxn(request)),
    }
}

pub fn compare(
    key: &str,
    target: CompareTarget,
    result: CompareResult,
    operand: TargetUnion,
) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: bytes(key),
        target_union: Some(operand),
        range_end: Bytes::new(),
    }
}

pub fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure,
    }
}

pub fn expect_txn(result: &ApplyResult) -> &TxnResponse {
    match &result.outcome {
        Ok(Response::Txn(response)) => response,
        other => panic!("expected a txn response, got {other:?}"),
    }
}

pub fn op_range(response: &TxnResponse, position: usize) -> &RangeResponse {
    match &response.responses[position].response {
        Some(OpResponse::ResponseRange(range)) => range,
        other => panic!("expected a range response, got {other:?}"),
    }
}

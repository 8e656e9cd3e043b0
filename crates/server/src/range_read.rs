//! Range reads a page at a time, for the unary Range and for RangeStream.
//!
//! A read holds the state machine's read lock, which the apply thread needs to write: one
//! read of 200,000 keys held it for tens of milliseconds, and every write waited that long.
//! So a read visits at most [`PAGE_KEYS_MAX`] keys per hold, at a revision pinned when it
//! starts ([`flotilla_kv::RangePager`]), and yields to the runtime between pages. Writes go
//! on between pages; MVCC keeps what the read sees unchanged. A compaction past the pinned
//! revision fails the read with `Compacted`; a read of the latest revision then starts over
//! at the new latest revision instead (it may read any revision after its barrier).

use flotilla_kv::{Author, ErrorKind, KvError, RangePager};
use flotilla_proto::etcdserverpb::{RangeRequest, RangeResponse, RangeStreamResponse};
use flotilla_proto::mvccpb::KeyValue;
use tokio::sync::mpsc;
use tonic::Status;

use crate::errors::kv_status;
use crate::services::ClientServices;

/// Keys visited per hold of the state's lock: about a millisecond of the apply thread's
/// wait.
pub const PAGE_KEYS_MAX: usize = 4096;
/// Bytes of keys and values gathered per page of a unary read.
pub const PAGE_BYTES_MAX: usize = 4 << 20;
/// Bytes of keys and values per RangeStream message: under every client's default receive
/// limit (tonic's is 4 MiB).
pub const STREAM_MESSAGE_BYTES_MAX: usize = 1 << 20;
/// Times a read of the latest revision starts over when a compaction passes it.
pub const RESTARTS_MAX: usize = 3;
/// RangeStream messages encoded ahead of the client.
const STREAM_QUEUE: usize = 2;

/// Why a read stopped: a KV error (a compaction is told apart) or any other refusal.
enum ReadError {
    Kv(KvError),
    Refused(Status),
}

impl From<KvError> for ReadError {
    fn from(err: KvError) -> Self {
        ReadError::Kv(err)
    }
}

impl From<ReadError> for Status {
    fn from(err: ReadError) -> Status {
        match err {
            ReadError::Kv(err) => kv_status(&err),
            ReadError::Refused(status) => status,
        }
    }
}

impl ReadError {
    fn is_compacted(&self) -> bool {
        matches!(self, ReadError::Kv(err) if err.kind() == ErrorKind::Compacted)
    }
}

/// The whole response of a unary Range, read in pages. The header holds only the revision.
pub async fn read_range(
    services: &ClientServices,
    caller: &Author,
    request: &RangeRequest,
) -> Result<RangeResponse, Status> {
    let mut restarts = 0;
    loop {
        match read_range_once(services, caller, request).await {
            Err(err) if err.is_compacted() && request.revision == 0 && restarts < RESTARTS_MAX => {
                restarts += 1;
            }
            result => return result.map_err(Status::from),
        }
    }
}

async fn read_range_once(
    services: &ClientServices,
    caller: &Author,
    request: &RangeRequest,
) -> Result<RangeResponse, ReadError> {
    let (mut pager, mut kvs) = first_page(services, caller, request, PAGE_BYTES_MAX)?;
    while !pager.is_done() {
        tokio::task::yield_now().await;
        let page = services.read_state(|state| {
            state
                .kv
                .range_page(&mut pager, PAGE_KEYS_MAX, PAGE_BYTES_MAX)
        })?;
        kvs.extend(page);
    }
    Ok(pager.finish(kvs))
}

/// Starts a read: the permission check and the first page under one hold of the state, so
/// both are at the same applied index.
fn first_page(
    services: &ClientServices,
    caller: &Author,
    request: &RangeRequest,
    bytes_max: usize,
) -> Result<(RangePager, Vec<KeyValue>), ReadError> {
    services.read_state(|state| {
        state
            .auth
            .check_keys(
                &caller.user,
                caller.auth_revision,
                crate::auth::Access::Read,
                &request.key,
                &request.range_end,
            )
            .map_err(|err| ReadError::Refused(Status::from(err)))?;
        let mut pager = state.kv.start_range(request.clone())?;
        let page = state.kv.range_page(&mut pager, PAGE_KEYS_MAX, bytes_max)?;
        Ok((pager, page))
    })
}

/// Starts a RangeStream: the first page is read before this returns, so a refused request
/// fails the call itself; a task sends the pages as the client takes them. As etcd 3.7 does,
/// the header, `more` and `count` come with the last message only (a client that merges the
/// messages gets the unary response; one that does not sees the end of the stream). A sort
/// other than ascending keys is refused, as etcd does: it needs every key before the first
/// can be sent.
pub fn stream_range(
    services: &ClientServices,
    caller: &Author,
    request: RangeRequest,
) -> Result<mpsc::Receiver<Result<RangeStreamResponse, Status>>, Status> {
    let (mut pager, first) = first_page(services, caller, &request, STREAM_MESSAGE_BYTES_MAX)?;
    if pager.needs_sort() {
        return Err(Status::invalid_argument(
            "etcdserver: RangeStream sends keys in ascending key order only; use Range for \
             another sort order",
        ));
    }
    let header = services.frontend.header(pager.view_revision());
    let (out, messages) = mpsc::channel(STREAM_QUEUE);
    let services = services.clone();
    tokio::spawn(async move {
        let mut message = RangeResponse {
            kvs: first,
            ..RangeResponse::default()
        };
        loop {
            if pager.is_done() {
                message.header = header;
                (message.more, message.count) = pager.finish_streamed();
                let _ = out.send(Ok(wrap(message))).await;
                return;
            }
            let page = services.read_state(|state| {
                state
                    .kv
                    .range_page(&mut pager, PAGE_KEYS_MAX, STREAM_MESSAGE_BYTES_MAX)
            });
            let page = match page {
                Ok(page) => page,
                Err(err) => {
                    let _ = out.send(Err(kv_status(&err))).await;
                    return;
                }
            };
            // A page that only counted (past the limit) adds nothing to send.
            if page.is_empty() {
                continue;
            }
            let ready = std::mem::replace(
                &mut message,
                RangeResponse {
                    kvs: page,
                    ..RangeResponse::default()
                },
            );
            if out.send(Ok(wrap(ready))).await.is_err() {
                return; // the client went away
            }
        }
    });
    Ok(messages)
}

fn wrap(range_response: RangeResponse) -> RangeStreamResponse {
    RangeStreamResponse {
        range_response: Some(range_response),
    }
}

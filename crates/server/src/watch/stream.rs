//! One Watch stream: a task that reads the client's requests (create, cancel, progress), moves
//! its watchers on (`watcher.rs`) and sends their responses, in order, through a bounded
//! channel. A slow client only slows its own task: while the task waits to send, its watchers'
//! queues fill up and the hub switches them to catching up from history.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::frontend::Credentials;
use flotilla_proto::etcdserverpb::{
    WatchCreateRequest, WatchRequest, WatchResponse, watch_request::RequestUnion,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::event::WatchOut;
use super::hub::WatchHub;
use super::watcher::{Batch, Sources, Step, WatchSpec, Watcher, step_all};
use crate::errors::{NO_LEADER, SERVER_STOPPED};
use crate::frontend::Frontend;
use crate::node::RoleStatus;

/// etcd's texts for refused creations.
pub const DUPLICATE_WATCH_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
pub const EMPTY_WATCHER_RANGE: &str = "mvcc: watcher range is empty";

/// Responses waiting for the client, per stream.
const OUTBOUND_RESPONSES: usize = 16;
/// etcd cancels a "require leader" stream after this many election timeouts without a
/// leader.
const NO_LEADER_ELECTION_TIMEOUTS: u32 = 3;

/// What every Watch stream of a member shares.
#[derive(Debug)]
pub struct WatchContext {
    pub frontend: Arc<Frontend>,
    pub hub: Arc<WatchHub>,
    /// How often quiet watchers that asked for it get a progress notification.
    pub progress_interval: Duration,
    /// Responses of watchers that asked for fragments are split above this size (etcd uses
    /// the request size limit).
    pub fragment_bytes_max: usize,
    /// Becomes true when the member stops: streams end.
    pub stopping: watch::Receiver<bool>,
}

pub type ResponseStream = ReceiverStream<Result<WatchOut, Status>>;

/// The client's side of a Watch stream: the gRPC stream, or the JSON gateway's requests.
pub type Inbound = std::pin::Pin<Box<dyn Stream<Item = Result<WatchRequest, Status>> + Send>>;

/// How many rounds of work a progress request gives the watchers to catch up first.
const PROGRESS_PUMPS_MAX: usize = 64;

/// Starts serving one Watch stream.
pub fn serve(
    context: Arc<WatchContext>,
    inbound: Inbound,
    require_leader: bool,
    credentials: Credentials,
) -> ResponseStream {
    let (out, responses) = mpsc::channel(OUTBOUND_RESPONSES);
    let session = Session {
        credentials,
        wake: Arc::new(Notify::new()),
        context,
        watchers: BTreeMap::new(),
        next_watch_id: 0,
        out,
    };
    tokio::spawn(session.run(inbound, require_leader));
    ReceiverStream::new(responses)
}

/// The client went away: stop.
struct Gone;

struct Session {
    context: Arc<WatchContext>,
    /// What the stream presented: each create is checked against it (etcd's rule: at
    /// creation only; a running watcher is not re-checked when a permission is revoked).
    credentials: Credentials,
    watchers: BTreeMap<i64, Watcher>,
    next_watch_id: i64,
    /// Every watcher's queue wakes the task through this.
    wake: Arc<Notify>,
    out: mpsc::Sender<Result<WatchOut, Status>>,
}

impl Session {
    fn sources(&self) -> Sources<'_> {
        Sources {
            state: &self.context.frontend.node.state,
            hub: &self.context.hub,
        }
    }

    async fn run(mut self, mut inbound: Inbound, require_leader: bool) {
        let interval = self.context.progress_interval;
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let no_leader_limit = NO_LEADER_ELECTION_TIMEOUTS * self.context.frontend.election_timeout;
        let leader_lost = leader_lost_for(
            self.context.frontend.node.role_watch(),
            no_leader_limit,
            require_leader,
        );
        tokio::pin!(leader_lost);
        let mut stopping = self.context.stopping.clone();
        let out = self.out.clone();
        loop {
            let Ok(busy) = self.pump().await else { break };
            let outcome = tokio::select! {
                message = inbound.next() => match message {
                    Some(Ok(request)) => self.handle(request).await,
                    // The client closed its side, or the connection broke: etcd drops every
                    // watcher of the stream.
                    None | Some(Err(_)) => Err(Gone),
                },
                () = self.wake.notified(), if !busy => Ok(()),
                () = std::future::ready(()), if busy => Ok(()),
                _ = progress.tick() => self.notify_progress().await,
                () = &mut leader_lost => {
                    let _ = self.out.send(Err(Status::unavailable(NO_LEADER))).await;
                    Err(Gone)
                }
                () = stopped(&mut stopping) => {
                    let _ = self.out.send(Err(Status::unavailable(SERVER_STOPPED))).await;
                    Err(Gone)
                }
                () = out.closed() => Err(Gone),
            };
            if outcome.is_err() {
                break;
            }
        }
        self.close_all();
    }

    async fn send(&self, response: WatchResponse) -> Result<(), Gone> {
        self.send_out(WatchOut::new(response)).await
    }

    async fn send_out(&self, out: WatchOut) -> Result<(), Gone> {
        self.out.send(Ok(out)).await.map_err(|_| Gone)
    }

    fn response(&self, watch_id: i64, revision: i64) -> WatchResponse {
        WatchResponse {
            header: self.context.frontend.header(revision),
            watch_id,
            ..Default::default()
        }
    }

    fn current_revision(&self) -> i64 {
        self.context.frontend.current_revision()
    }

    async fn handle(&mut self, request: WatchRequest) -> Result<(), Gone> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(&create).await,
            Some(RequestUnion::CancelRequest(cancel)) => self.cancel(cancel.watch_id).await,
            Some(RequestUnion::ProgressRequest(_)) => self.progress().await,
            None => Ok(()),
        }
    }

    /// One `created` response per create request, in order, before any event of the watcher.
    async fn create(&mut self, request: &WatchCreateRequest) -> Result<(), Gone> {
        let refusal = if request.watch_id != 0 && self.watchers.contains_key(&request.watch_id) {
            Some(DUPLICATE_WATCH_ID.to_string())
        } else if WatchSpec::from_request(request, 0).is_empty_range() {
            Some(EMPTY_WATCHER_RANGE.to_string())
        } else if self.context.frontend.refuse_if_corrupt().is_err() {
            Some("etcdserver: corrupt cluster".to_string())
        } else {
            self.permission_refusal(request)
        };
        if let Some(reason) = refusal {
            let mut response = self.response(-1, self.current_revision());
            response.created = true;
            response.canceled = true;
            response.cancel_reason = reason;
            return self.send(response).await;
        }
        let watch_id = self.assign_watch_id(request.watch_id);
        let spec = WatchSpec::from_request(request, watch_id);
        let (watcher, current) = Watcher::create(
            spec,
            request.start_revision,
            self.sources(),
            self.wake.clone(),
        );
        self.watchers.insert(watch_id, watcher);
        let mut response = self.response(watch_id, current);
        response.created = true;
        self.send(response).await
    }

    /// Why the stream's caller may not watch the request's keys, in etcd's words (the gRPC
    /// error's full text, as etcd puts it in the cancel reason).
    fn permission_refusal(&self, request: &WatchCreateRequest) -> Option<String> {
        let frontend = &self.context.frontend;
        let checked = frontend
            .resolve(&self.credentials)
            .and_then(|caller| frontend.check_read(&caller, &request.key, &request.range_end));
        checked.err().map(|status| {
            format!(
                "rpc error: code = {:?} desc = {}",
                status.code(),
                status.message()
            )
        })
    }

    /// The client's id, or the lowest free one from where the last assignment stopped (etcd's
    /// ids start at 0 on every stream).
    fn assign_watch_id(&mut self, requested: i64) -> i64 {
        if requested != 0 {
            return requested;
        }
        while self.watchers.contains_key(&self.next_watch_id) {
            self.next_watch_id += 1;
        }
        let id = self.next_watch_id;
        self.next_watch_id += 1;
        id
    }

    async fn cancel(&mut self, watch_id: i64) -> Result<(), Gone> {
        let Some(mut watcher) = self.watchers.remove(&watch_id) else {
            return Ok(()); // etcd answers nothing for an unknown id
        };
        watcher.close(&self.context.hub);
        let mut response = self.response(watch_id, self.current_revision());
        response.canceled = true;
        self.send(response).await
    }

    /// A progress request: one response for the whole stream (watch id -1) at a revision
    /// every watcher of the stream has been brought to, so "no event at or below it is still
    /// to come" holds for each.
    ///
    /// The answer is linearizable, unlike etcd 3.4's: first a read barrier (bounded by two
    /// election timeouts; without one the answer falls back to the local revision, as etcd's
    /// would), then the watchers are brought up to what is applied, so a member that lags
    /// still answers at a revision at or after every write acknowledged before the request.
    /// kube-apiserver's consistent reads from its watch cache wait for exactly that (found by
    /// interop/kubernetes-contract when the progress request reached a lagging follower).
    async fn progress(&mut self) -> Result<(), Gone> {
        let frontend = self.context.frontend.clone();
        let limit = 2 * frontend.election_timeout;
        match tokio::time::timeout(limit, frontend.linearizable_barrier()).await {
            Ok(Ok(())) => {}
            Ok(Err(status)) => tracing::debug!("progress request without a barrier: {status}"),
            Err(_) => tracing::debug!("progress request without a barrier: timed out"),
        }
        for _ in 0..PROGRESS_PUMPS_MAX {
            if !self.pump().await? {
                break;
            }
        }
        let revision = {
            let state = self
                .context
                .frontend
                .node
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let current = state.kv.current_revision();
            self.watchers
                .values()
                .map(|watcher| watcher.delivered_through(current))
                .min()
                .unwrap_or(current)
                .min(current)
        };
        self.send(self.response(-1, revision)).await
    }

    /// The periodic notification: to each watcher that asked for it, is in sync, and sent
    /// nothing since the last tick.
    async fn notify_progress(&mut self) -> Result<(), Gone> {
        let due: Vec<(i64, i64)> = {
            let state = self
                .context
                .frontend
                .node
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let current = state.kv.current_revision();
            self.watchers
                .values()
                .filter(|w| w.spec.progress_notify && !w.sent_since_tick && w.is_synced())
                .map(|w| (w.spec.watch_id, w.delivered_through(current).min(current)))
                .collect()
        };
        for watcher in self.watchers.values_mut() {
            watcher.sent_since_tick = false;
        }
        for (watch_id, revision) in due {
            self.send(self.response(watch_id, revision)).await?;
        }
        Ok(())
    }

    /// Moves every watcher with work on by one step and sends what it produced. True if some
    /// watcher still has work. Catching-up watchers of one range share their reads of history
    /// (see [`Watcher::step_history_together`]).
    async fn pump(&mut self) -> Result<bool, Gone> {
        let sources = Sources {
            state: &self.context.frontend.node.state,
            hub: &self.context.hub,
        };
        let steps = step_all(
            self.watchers.iter_mut().map(|(&id, watcher)| (id, watcher)),
            sources,
        );
        for (id, step) in steps {
            match step {
                Step::Batches(batches) => {
                    let Some(watcher) = self.watchers.get_mut(&id) else {
                        continue;
                    };
                    if !batches.is_empty() {
                        watcher.sent_since_tick = true;
                    }
                    let fragment = watcher.spec.fragment;
                    for batch in batches {
                        self.send_batch(id, fragment, batch).await?;
                    }
                }
                Step::Compacted(compact_revision) => {
                    let mut watcher = self.watchers.remove(&id).expect("present");
                    watcher.close(&self.context.hub);
                    let mut response = self.response(id, self.current_revision());
                    response.canceled = true;
                    response.compact_revision = compact_revision;
                    self.send(response).await?;
                }
            }
        }
        Ok(self.watchers.values().any(Watcher::has_work))
    }

    async fn send_batch(&self, watch_id: i64, fragment: bool, batch: Batch) -> Result<(), Gone> {
        let out = WatchOut {
            response: self.response(watch_id, batch.revision),
            events: batch.events,
        };
        if !fragment {
            return self.send_out(out).await;
        }
        for piece in fragments(out, self.context.fragment_bytes_max) {
            self.send_out(piece).await?;
        }
        Ok(())
    }

    fn close_all(&mut self) {
        for watcher in self.watchers.values_mut() {
            watcher.close(&self.context.hub);
        }
        self.watchers.clear();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// Splits a response whose encoding exceeds `bytes_max` into pieces of at least one event
/// each; every piece but the last is marked `fragment`.
pub fn fragments(out: WatchOut, bytes_max: usize) -> Vec<WatchOut> {
    if out.encoded_len() <= bytes_max || out.events.len() <= 1 {
        return vec![out];
    }
    let empty = WatchOut::new(out.response);
    let base_bytes = empty.encoded_len();
    let mut pieces = Vec::new();
    let mut piece = empty.clone();
    let mut piece_bytes = base_bytes;
    for event in out.events {
        let event_bytes = event.encoded().len();
        if !piece.events.is_empty() && piece_bytes + event_bytes > bytes_max {
            piece.response.fragment = true;
            pieces.push(std::mem::replace(&mut piece, empty.clone()));
            piece_bytes = base_bytes;
        }
        piece_bytes += event_bytes;
        piece.events.push(event);
    }
    pieces.push(piece);
    pieces
}

/// Resolves once `stopping` becomes true (never if its sender is gone).
pub async fn stopped(stopping: &mut watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves once the member has had no leader for `limit` on end (never, unless
/// `require_leader`).
async fn leader_lost_for(
    mut status: watch::Receiver<RoleStatus>,
    limit: Duration,
    require_leader: bool,
) {
    if !require_leader {
        return std::future::pending().await;
    }
    loop {
        if status.wait_for(|s| s.leader.is_none()).await.is_err() {
            return std::future::pending().await;
        }
        let regained = tokio::time::timeout(limit, status.wait_for(|s| s.leader.is_some()));
        if regained.await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use flotilla_proto::mvccpb::{Event, KeyValue};

    use super::*;
    use crate::watch::event::{SharedEvent, WatchEvent};

    fn event(size: usize) -> Event {
        Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: Bytes::from_static(b"k"),
                value: Bytes::from(vec![b'x'; size]),
                mod_revision: 5,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn out(events: Vec<Event>) -> WatchOut {
        WatchOut {
            response: WatchResponse {
                watch_id: 3,
                ..Default::default()
            },
            events: SharedEvent::shared(events)
                .into_iter()
                .map(|shared| WatchEvent::new(shared, false))
                .collect(),
        }
    }

    #[test]
    fn large_responses_are_split_into_fragments() {
        let whole = out((0..10).map(|_| event(100)).collect());
        let pieces = fragments(whole.clone(), 350);
        assert!(pieces.len() > 1);
        assert!(pieces.iter().all(|p| p.encoded_len() <= 350));
        assert!(
            pieces[..pieces.len() - 1]
                .iter()
                .all(|p| p.response.fragment)
        );
        assert!(!pieces.last().unwrap().response.fragment);
        let events: Vec<Event> = pieces
            .into_iter()
            .flat_map(|p| p.into_response().events)
            .collect();
        assert_eq!(events, whole.clone().into_response().events);
        // Small enough: one piece, not a fragment.
        let unsplit = fragments(whole.clone(), usize::MAX);
        assert_eq!(unsplit.len(), 1);
        assert_eq!(
            unsplit[0].clone().into_response(),
            whole.clone().into_response()
        );
        // An event larger than the limit still goes, alone.
        assert_eq!(fragments(out(vec![event(1000), event(1000)]), 10).len(), 2);
    }
}

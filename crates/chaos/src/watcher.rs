//! Watchers for the watch workload: one stream per watcher over the watched prefix, on its
//! own member; when the stream breaks, is cancelled or stalls, it resumes on the next member
//! from the last revision it saw + 1. It stops once it has seen the target revision (set
//! after the run: the last write's), or when its time is up.
//!
//! Progress requests are not used to learn that a watcher is caught up: etcd 3.4 answers
//! them with the store's revision even while the watcher is still replaying older events.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_client::prefix_range_end;
use flotilla_proto::etcdserverpb::{
    WatchCreateRequest, WatchRequest, watch_client::WatchClient, watch_request::RequestUnion,
};
use flotilla_proto::mvccpb::event::EventType;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::checkers::{WatchEvent, WatcherLog};
use crate::workloads::WATCH_PREFIX;

/// No message for this long means the stream is stuck (its member partitioned or paused):
/// resume elsewhere.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Between attempts on a member that refused.
const RESUME_BACKOFF: Duration = Duration::from_millis(200);

/// Why a watch could not go on.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the server does not implement Watch: {0}")]
    Unimplemented(String),
}

/// The target revision: `None` while the run goes on.
pub type Target = watch::Receiver<Option<i64>>;

/// Watches `WATCH_PREFIX` from revision 1, starting at `endpoints[home]`, until the target
/// revision is reached or `give_up_after` has passed since the target was set.
pub async fn run_watcher(
    name: String,
    endpoints: Vec<String>,
    home: usize,
    mut target: Target,
    give_up_after: Duration,
    log: Arc<Mutex<WatcherLog>>,
) -> Result<(), WatchError> {
    log.lock().expect("watcher log").name = name;
    let mut next_revision = 1i64;
    let mut member = home;
    let mut target_since: Option<Instant> = None;
    loop {
        let outcome = watch_once(&endpoints[member], next_revision, &mut target, &log).await;
        if let Some(last) = log.lock().expect("watcher log").events.last() {
            next_revision = last.revision + 1;
        }
        match outcome {
            StreamEnd::CaughtUp => return Ok(()),
            StreamEnd::Unimplemented(message) => return Err(WatchError::Unimplemented(message)),
            StreamEnd::Broken => {}
        }
        if target.borrow().is_some() {
            let since = *target_since.get_or_insert_with(Instant::now);
            if since.elapsed() > give_up_after {
                return Ok(());
            }
        }
        member = (member + 1) % endpoints.len();
        log.lock().expect("watcher log").resumptions += 1;
        tokio::time::sleep(RESUME_BACKOFF).await;
    }
}

/// Opens a watch on `endpoint` and waits for it to be created: a server without Watch says
/// so at once, before a run spends its duration.
pub async fn probe(endpoint: &str) -> Result<(), WatchError> {
    let (_target_sender, mut target) = watch::channel(Some(0));
    let log = Mutex::new(WatcherLog::default());
    match watch_once(endpoint, 1, &mut target, &log).await {
        StreamEnd::Unimplemented(message) => Err(WatchError::Unimplemented(message)),
        StreamEnd::CaughtUp | StreamEnd::Broken => Ok(()),
    }
}

enum StreamEnd {
    CaughtUp,
    Broken,
    Unimplemented(String),
}

async fn watch_once(
    endpoint: &str,
    start_revision: i64,
    target: &mut Target,
    log: &Mutex<WatcherLog>,
) -> StreamEnd {
    let Ok(channel_endpoint) = Endpoint::from_shared(format!("http://{endpoint}")) else {
        return StreamEnd::Broken;
    };
    let channel = channel_endpoint
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    let (requests, request_stream) = mpsc::channel(4);
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: WATCH_PREFIX.into(),
            range_end: prefix_range_end(WATCH_PREFIX.as_bytes()),
            start_revision,
            ..Default::default()
        })),
    };
    if requests.send(create).await.is_err() {
        return StreamEnd::Broken;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(request_stream));
    // etcd's WithRequireLeader: a member without a leader cancels the watch instead of
    // going silent.
    request
        .metadata_mut()
        .insert("hasleader", "true".parse().expect("ascii"));
    let mut client = WatchClient::new(channel);
    let opened = tokio::time::timeout(STALL_TIMEOUT, client.watch(request)).await;
    let mut stream = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            return StreamEnd::Unimplemented(status.message().to_string());
        }
        Ok(Err(_)) | Err(_) => return StreamEnd::Broken,
    };
    let mut last_message = Instant::now();
    loop {
        let wanted = *target.borrow();
        if wanted.is_some_and(|wanted| seen_up_to(log) >= wanted) {
            return StreamEnd::CaughtUp;
        }
        tokio::select! {
            message = stream.message() => {
                let response = match message {
                    Ok(Some(response)) => response,
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        return StreamEnd::Unimplemented(status.message().to_string());
                    }
                    Ok(None) | Err(_) => return StreamEnd::Broken,
                };
                last_message = Instant::now();
                if response.canceled {
                    return StreamEnd::Broken;
                }
                let mut log = log.lock().expect("watcher log");
                for event in &response.events {
                    let Some(kv) = &event.kv else { continue };
                    let value = if event.r#type == EventType::Delete as i32 {
                        "<deleted>".to_string()
                    } else {
                        String::from_utf8_lossy(&kv.value).into_owned()
                    };
                    log.events.push(WatchEvent {
                        revision: kv.mod_revision,
                        key: String::from_utf8_lossy(&kv.key).into_owned(),
                        value,
                    });
                }
            }
            _ = target.changed() => {}
            _ = tokio::time::sleep_until((last_message + STALL_TIMEOUT).into()) => {
                return StreamEnd::Broken;
            }
        }
    }
}

/// The revision of the last event the watcher saw.
fn seen_up_to(log: &Mutex<WatcherLog>) -> i64 {
    let log = log.lock().expect("watcher log");
    log.events.last().map_or(0, |event| event.revision)
}

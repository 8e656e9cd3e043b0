//! `flotilla watch`: etcdctl's `watch` with its simple output (event type, then the previous
//! key and value if asked for, then the key and value). A broken stream is resumed on the
//! next endpoint from the last revision seen + 1, so no event is missed or repeated.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use flotilla_proto::etcdserverpb::watch_request::RequestUnion;
use flotilla_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
use flotilla_proto::mvccpb::event::EventType;

use super::{InvalidInput, OutputFormat, Unsupported, output};
use crate::{Client, ClientError, prefix_range_end};

/// Attempts to open a stream before giving up.
const REOPEN_ATTEMPTS_MAX: u32 = 10;
const REOPEN_PAUSE: Duration = Duration::from_millis(200);

#[derive(Args, Clone, Debug)]
pub struct WatchArgs {
    pub key: String,
    /// End of the range [key, range_end).
    pub range_end: Option<String>,
    /// Watch every key with this prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Start at this revision (0: the next one); history is replayed first.
    #[arg(long, default_value_t = 0)]
    pub rev: i64,
    /// Also print each event's previous key-value pair.
    #[arg(long)]
    pub prev_kv: bool,
    /// Exit after this many events (0: never).
    #[arg(long, default_value_t = 0)]
    pub max_events: u64,
}

pub(super) async fn run(
    client: &Client,
    format: OutputFormat,
    args: &WatchArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    if format != OutputFormat::Simple {
        return Err(Unsupported("only simple is").into());
    }
    let key = Bytes::from(args.key.clone());
    let range_end = match (&args.range_end, args.prefix) {
        (Some(_), true) => {
            return Err(
                InvalidInput("`--prefix` and a range end exclude each other".into()).into(),
            );
        }
        (Some(end), false) => Bytes::from(end.clone()),
        (None, true) => prefix_range_end(&key),
        (None, false) => Bytes::new(),
    };
    let mut next_revision = args.rev;
    let mut printed = 0u64;
    let mut failures = 0;
    let mut attempt = 0;
    loop {
        let opened = client.watch_stream(attempt).await;
        // Whatever happens to this stream, the next one goes to the next endpoint.
        attempt += 1;
        let (requests, mut responses) = match opened {
            Ok(stream) => stream,
            Err(error) if failures < REOPEN_ATTEMPTS_MAX => {
                failures += 1;
                tracing::debug!("opening a watch stream failed: {error}");
                tokio::time::sleep(REOPEN_PAUSE).await;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let create = WatchCreateRequest {
            key: key.clone(),
            range_end: range_end.clone(),
            start_revision: next_revision,
            prev_kv: args.prev_kv,
            ..Default::default()
        };
        let request = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(create)),
        };
        if requests.send(request).await.is_err() {
            continue;
        }
        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                // The stream broke: resume on another endpoint.
                Ok(None) | Err(_) => break,
            };
            if response.canceled {
                let reason = if response.compact_revision != 0 {
                    "etcdserver: mvcc: required revision has been compacted".to_string()
                } else {
                    response.cancel_reason
                };
                writeln!(out, "watch was canceled ({reason})")?;
                return Err(ClientError::Rejected(tonic::Status::out_of_range(reason)).into());
            }
            failures = 0;
            if response.created && next_revision == 0 {
                // Watching "from now": a resumed watch starts where this one did.
                next_revision = response.header.as_ref().map_or(0, |h| h.revision + 1);
            }
            for event in &response.events {
                let delete = event.r#type == EventType::Delete as i32;
                writeln!(out, "{}", if delete { "DELETE" } else { "PUT" })?;
                if let Some(prev) = &event.prev_kv {
                    output::simple_kvs(out, std::slice::from_ref(prev), false)?;
                }
                if let Some(kv) = &event.kv {
                    output::simple_kvs(out, std::slice::from_ref(kv), false)?;
                    next_revision = kv.mod_revision + 1;
                }
                printed += 1;
            }
            out.flush()?;
            if args.max_events != 0 && printed >= args.max_events {
                return Ok(ExitCode::SUCCESS);
            }
        }
        failures += 1;
        if failures > REOPEN_ATTEMPTS_MAX {
            return Err(ClientError::Unavailable {
                message: "the watch stream keeps breaking".into(),
                attempts: failures,
            }
            .into());
        }
        tokio::time::sleep(REOPEN_PAUSE).await;
    }
}

//! Events as watchers send them: one copy of each event for all its watchers, and its wire
//! encoding made once for all of them.
//!
//! With 10,000 watchers on one prefix, every put is sent 10,000 times. Built as prost
//! messages, each of those copies cost a clone of the event (its key and value handles), the
//! message's length computed twice and every field encoded again: about 40% of the serving
//! member's CPU in that benchmark. Here a watcher's response holds handles to shared events,
//! and its encoding copies each event's bytes, encoded by the first watcher that sent it.

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes};
use flotilla_proto::etcdserverpb::WatchResponse;
use flotilla_proto::mvccpb::Event;
use prost::Message;

/// The field number of `WatchResponse.events`.
const EVENTS_FIELD: u32 = 11;

/// One event, shared by every watcher that gets it.
#[derive(Debug)]
pub struct SharedEvent {
    event: Event,
    /// The event as an entry of `WatchResponse.events` (tag, length, message), with its
    /// `prev_kv` and without, each made when first needed.
    with_prev_kv: OnceLock<Bytes>,
    without_prev_kv: OnceLock<Bytes>,
}

impl SharedEvent {
    pub fn new(event: Event) -> Arc<SharedEvent> {
        Arc::new(SharedEvent {
            event,
            with_prev_kv: OnceLock::new(),
            without_prev_kv: OnceLock::new(),
        })
    }

    pub fn event(&self) -> &Event {
        &self.event
    }

    pub fn shared(events: Vec<Event>) -> Vec<Arc<SharedEvent>> {
        events.into_iter().map(SharedEvent::new).collect()
    }
}

/// One event of a watcher's batch: a shared event, as this watcher asked for it.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    shared: Arc<SharedEvent>,
    /// Whether the watcher asked for the previous key-value.
    prev_kv: bool,
}

impl WatchEvent {
    pub fn new(shared: Arc<SharedEvent>, prev_kv: bool) -> WatchEvent {
        WatchEvent { shared, prev_kv }
    }

    /// The event as this watcher gets it (a copy; the wire path does not need one).
    pub fn to_event(&self) -> Event {
        let mut event = self.shared.event.clone();
        if !self.prev_kv {
            event.prev_kv = None;
        }
        event
    }

    /// The revision of the event's key-value.
    pub fn revision(&self) -> Option<i64> {
        self.shared.event.kv.as_ref().map(|kv| kv.mod_revision)
    }

    /// The event as an entry of `WatchResponse.events`: exactly prost's encoding of it.
    pub fn encoded(&self) -> &Bytes {
        let event = &self.shared.event;
        if self.prev_kv || event.prev_kv.is_none() {
            self.shared.with_prev_kv.get_or_init(|| encode_entry(event))
        } else {
            self.shared.without_prev_kv.get_or_init(|| {
                encode_entry(&Event {
                    prev_kv: None,
                    ..event.clone()
                })
            })
        }
    }
}

/// Equal when the events as their watchers get them are equal.
impl PartialEq for WatchEvent {
    fn eq(&self, other: &WatchEvent) -> bool {
        self.to_event() == other.to_event()
    }
}

fn encode_entry(event: &Event) -> Bytes {
    let mut buf = Vec::with_capacity(prost::encoding::message::encoded_len(EVENTS_FIELD, event));
    prost::encoding::message::encode(EVENTS_FIELD, event, &mut buf);
    Bytes::from(buf)
}

/// A Watch response on its way out: everything but the events as a message, and the events as
/// handles to their shared encodings.
#[derive(Clone, Debug, Default)]
pub struct WatchOut {
    /// The response without its events (`events` is empty).
    pub response: WatchResponse,
    pub events: Vec<WatchEvent>,
}

impl WatchOut {
    pub fn new(response: WatchResponse) -> WatchOut {
        debug_assert!(response.events.is_empty(), "events go in `events`");
        WatchOut {
            response,
            events: Vec::new(),
        }
    }

    /// The response as a message (for the JSON gateway and tests; copies every event).
    pub fn into_response(self) -> WatchResponse {
        let mut response = self.response;
        response.events = self.events.iter().map(WatchEvent::to_event).collect();
        response
    }

    pub fn encoded_len(&self) -> usize {
        self.response.encoded_len() + self.events.iter().map(|e| e.encoded().len()).sum::<usize>()
    }

    /// Writes the response's encoding: the message's other fields, then each event's entry.
    /// prost writes fields in number order and `events` (11) is the last, so the bytes are
    /// the same as prost's encoding of [`WatchOut::into_response`].
    pub fn encode(&self, buf: &mut impl BufMut) {
        debug_assert!(self.response.events.is_empty());
        self.response.encode_raw(buf);
        for event in &self.events {
            buf.put_slice(event.encoded());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::etcdserverpb::ResponseHeader;
    use flotilla_proto::mvccpb::KeyValue;
    use flotilla_proto::mvccpb::event::EventType;

    fn event(key: &str, revision: i64, prev: bool) -> Event {
        let kv = |value: &str, revision: i64| KeyValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            create_revision: 2,
            mod_revision: revision,
            version: 3,
            lease: 7,
        };
        Event {
            r#type: EventType::Put as i32,
            kv: Some(kv("new value", revision)),
            prev_kv: prev.then(|| kv("old", revision - 1)),
        }
    }

    fn out(events: &[(Arc<SharedEvent>, bool)]) -> WatchOut {
        WatchOut {
            response: WatchResponse {
                header: Some(ResponseHeader {
                    cluster_id: 11,
                    member_id: 12,
                    revision: 40,
                    raft_term: 3,
                }),
                watch_id: 5,
                fragment: true,
                ..Default::default()
            },
            events: events
                .iter()
                .map(|(shared, prev_kv)| WatchEvent::new(shared.clone(), *prev_kv))
                .collect(),
        }
    }

    #[test]
    fn the_encoding_is_prosts_for_every_mix_of_events() {
        let with_prev = SharedEvent::new(event("a", 30, true));
        let without_prev = SharedEvent::new(event("bb", 31, false));
        let cases = [
            vec![],
            vec![(with_prev.clone(), true)],
            vec![(with_prev.clone(), false)],
            vec![(without_prev.clone(), true), (without_prev.clone(), false)],
            vec![
                (with_prev.clone(), false),
                (without_prev.clone(), true),
                (with_prev.clone(), true),
            ],
        ];
        for events in cases {
            let out = out(&events);
            let mut ours = Vec::new();
            out.encode(&mut ours);
            let expected = out.clone().into_response().encode_to_vec();
            assert_eq!(ours, expected, "{} events", events.len());
            assert_eq!(out.encoded_len(), expected.len());
            let decoded = WatchResponse::decode(&ours[..]).expect("decodes");
            assert_eq!(decoded, out.into_response());
        }
    }

    #[test]
    fn a_watcher_without_prev_kv_gets_none_and_one_with_it_gets_it() {
        let shared = SharedEvent::new(event("a", 30, true));
        let plain = WatchEvent::new(shared.clone(), false);
        let with = WatchEvent::new(shared.clone(), true);
        assert_eq!(plain.to_event().prev_kv, None);
        assert_eq!(with.to_event().prev_kv, shared.event().prev_kv);
        assert_ne!(plain.encoded(), with.encoded());
        // Each encoding is made once and shared.
        assert_eq!(
            plain.encoded().as_ptr(),
            WatchEvent::new(shared.clone(), false).encoded().as_ptr()
        );
        assert_eq!(plain.revision(), Some(30));
    }
}

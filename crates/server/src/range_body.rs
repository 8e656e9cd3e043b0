//! Unary Range responses encoded while they are sent, a bounded chunk at a time.
//!
//! tonic encodes a unary response whole into one buffer before the first byte leaves: a
//! Range over 200,000 values of 1 KiB is a 200 MB buffer, and twenty such lists at once are
//! 4 GB (etcd builds its responses the same way, which is how large Kubernetes LISTs run it
//! out of memory, etcd issue #12342). The response's key-values already share the store's
//! key and value buffers (`Bytes`), so the only copy a list needs is the wire encoding: this
//! module writes it in [`CHUNK_BYTES`] pieces as HTTP/2 flow control takes them, and drops
//! each key-value once encoded. A list then holds about 100 bytes per key (its key-value
//! handles) plus one chunk, not its whole encoding.
//!
//! The route takes the gRPC method `/etcdserverpb.KV/Range` ahead of the generated KV
//! service, runs the same handler ([`Kv::range`]: authentication, linearizable barrier,
//! auth check, metrics), and frames the answer itself: one length-prefixed message, then the
//! `grpc-status` trailers, exactly what the generated service would send.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, Response, header};
use bytes::{BufMut, Bytes, BytesMut};
use flotilla_proto::etcdserverpb::RangeResponse;
use flotilla_proto::etcdserverpb::kv_server::Kv;
use flotilla_proto::mvccpb::KeyValue;
use prost::Message;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::services::ClientServices;

/// The gRPC path this module serves.
pub const RANGE_PATH: &str = "/etcdserverpb.KV/Range";

/// Encoded bytes handed to HTTP/2 at a time; one key-value larger than this is one chunk.
pub const CHUNK_BYTES: usize = 64 << 10;

/// gRPC's length prefix: a compression flag byte, then the length as a big-endian u32.
const PREFIX_BYTES: usize = 5;

#[derive(Clone, Debug)]
pub struct RangeRoute {
    pub services: ClientServices,
    /// The largest request accepted, as for the generated services (etcd's request limit
    /// plus its 512 KiB of slack).
    pub receive_bytes_max: usize,
}

/// An axum router serving [`RANGE_PATH`]; merge it with the gRPC routes.
pub fn router(route: RangeRoute) -> axum::Router {
    axum::Router::new()
        .route(RANGE_PATH, axum::routing::post(serve_range))
        .with_state(route)
}

async fn serve_range(State(route): State<RangeRoute>, request: Request<Body>) -> Response<Body> {
    match answer(&route, request).await {
        Ok(response) => match EncodedRange::new(response) {
            Ok(body) => {
                route
                    .services
                    .frontend
                    .node
                    .metrics
                    .range_bytes_streamed
                    .fetch_add(u64::from(body.length), std::sync::atomic::Ordering::Relaxed);
                grpc_response(body)
            }
            Err(status) => status.into_http(),
        },
        Err(status) => status.into_http(),
    }
}

async fn answer(route: &RangeRoute, request: Request<Body>) -> Result<RangeResponse, Status> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, route.receive_bytes_max + PREFIX_BYTES)
        .await
        .map_err(|err| {
            Status::out_of_range(format!(
                "the request is over {} bytes, the largest this server accepts, or its body \
                 could not be read: {err}",
                route.receive_bytes_max
            ))
        })?;
    let message = decode_request(&bytes)?;
    let request = tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        message,
    );
    Kv::range(&route.services, request)
        .await
        .map(tonic::Response::into_inner)
}

/// The one message of a unary gRPC request body.
fn decode_request(body: &[u8]) -> Result<flotilla_proto::etcdserverpb::RangeRequest, Status> {
    let Some((prefix, message)) = body.split_first_chunk::<PREFIX_BYTES>() else {
        return Err(Status::internal(format!(
            "the request body is {} bytes, shorter than gRPC's {PREFIX_BYTES}-byte message prefix",
            body.len()
        )));
    };
    if prefix[0] != 0 {
        return Err(Status::unimplemented(
            "the request message is compressed; this server accepts only uncompressed messages",
        ));
    }
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if length != message.len() {
        return Err(Status::internal(format!(
            "the request's gRPC prefix says {length} bytes, but {} follow it (a unary call \
             carries exactly one message)",
            message.len()
        )));
    }
    prost::Message::decode(message)
        .map_err(|err| Status::internal(format!("the RangeRequest cannot be decoded: {err}")))
}

fn grpc_response(body: EncodedRange) -> Response<Body> {
    let mut response = Response::new(Body::new(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A RangeResponse as a gRPC response body: the length prefix and the fields before `kvs`,
/// the key-values a chunk at a time, the fields after them, then the OK trailers. The bytes
/// are exactly `response.encode_to_vec()` behind its prefix (prost writes fields in number
/// order: header 1, kvs 2, more 3, count 4).
#[derive(Debug)]
pub struct EncodedRange {
    /// The message's encoded length (the prefix's).
    length: u32,
    /// The prefix and the header field, until the first chunk takes them.
    head: Option<BytesMut>,
    kvs: std::vec::IntoIter<KeyValue>,
    more: bool,
    count: i64,
    data_done: bool,
    trailers_sent: bool,
}

impl EncodedRange {
    /// Refuses a response over gRPC's 4 GiB message limit, which its prefix cannot express.
    pub fn new(response: RangeResponse) -> Result<EncodedRange, Status> {
        let length = response.encoded_len();
        let length = u32::try_from(length).map_err(|_| {
            Status::resource_exhausted(format!(
                "the range's response would be {length} bytes, over gRPC's 4 GiB message \
                 limit; ask for fewer keys at a time (limit, then continue from the last key)"
            ))
        })?;
        let mut head = BytesMut::with_capacity(CHUNK_BYTES);
        head.put_u8(0);
        head.put_u32(length);
        if let Some(h) = &response.header {
            prost::encoding::message::encode(1, h, &mut head);
        }
        Ok(EncodedRange {
            length,
            head: Some(head),
            kvs: response.kvs.into_iter(),
            more: response.more,
            count: response.count,
            data_done: false,
            trailers_sent: false,
        })
    }

    /// The next chunk of the message: whole key-values until the chunk is full, and the
    /// closing fields once they run out.
    fn next_chunk(&mut self) -> Bytes {
        let mut chunk = self
            .head
            .take()
            .unwrap_or_else(|| BytesMut::with_capacity(CHUNK_BYTES));
        while chunk.len() < CHUNK_BYTES {
            let Some(kv) = self.kvs.next() else {
                if self.more {
                    prost::encoding::bool::encode(3, &self.more, &mut chunk);
                }
                if self.count != 0 {
                    prost::encoding::int64::encode(4, &self.count, &mut chunk);
                }
                self.data_done = true;
                break;
            };
            prost::encoding::message::encode(2, &kv, &mut chunk);
        }
        chunk.freeze()
    }
}

impl http_body::Body for EncodedRange {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            return Poll::Ready(Some(Ok(http_body::Frame::data(this.next_chunk()))));
        }
        if this.trailers_sent {
            return Poll::Ready(None);
        }
        this.trailers_sent = true;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.trailers_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::etcdserverpb::ResponseHeader;
    use http_body_util::BodyExt as _;

    fn kv(i: usize, value_bytes: usize) -> KeyValue {
        KeyValue {
            key: Bytes::from(format!("key/{i:06}")),
            create_revision: 2 + i as i64,
            mod_revision: 3 + i as i64,
            version: 1,
            value: Bytes::from(vec![b'v'; value_bytes]),
            lease: i as i64 % 3,
        }
    }

    fn response(keys: usize, value_bytes: usize, more: bool, header: bool) -> RangeResponse {
        RangeResponse {
            header: header.then_some(ResponseHeader {
                cluster_id: 7,
                member_id: 9,
                revision: 1234,
                raft_term: 5,
            }),
            kvs: (0..keys).map(|i| kv(i, value_bytes)).collect(),
            more,
            count: keys as i64 + i64::from(more),
        }
    }

    /// The data frames (each chunk) and the trailers of a body.
    async fn frames(body: EncodedRange) -> (Vec<Bytes>, Option<HeaderMap>) {
        let mut body = std::pin::pin!(body);
        let mut chunks = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(data) => {
                    assert!(trailers.is_none(), "data after the trailers");
                    chunks.push(data);
                }
                Err(frame) => trailers = Some(frame.into_trailers().unwrap()),
            }
        }
        (chunks, trailers)
    }

    #[tokio::test]
    async fn the_streamed_bytes_are_the_whole_encoding_behind_its_prefix() {
        let cases = [
            response(0, 0, false, false),
            response(0, 0, false, true),
            response(1, 10, false, true),
            response(3, 0, true, true),
            // Many chunks, and a value larger than a chunk.
            response(2_000, 300, true, true),
            response(3, CHUNK_BYTES * 2, false, true),
        ];
        for case in cases {
            let expected = case.encode_to_vec();
            let (chunks, trailers) = frames(EncodedRange::new(case).unwrap()).await;
            let sent: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(sent[0], 0, "not compressed");
            assert_eq!(
                u32::from_be_bytes(sent[1..5].try_into().unwrap()) as usize,
                expected.len()
            );
            assert_eq!(&sent[5..], &expected[..]);
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        }
    }

    #[tokio::test]
    async fn a_big_response_leaves_in_bounded_chunks() {
        let value_bytes = 1000;
        let (chunks, _) =
            frames(EncodedRange::new(response(5_000, value_bytes, false, true)).unwrap()).await;
        assert!(chunks.len() > 70, "{} chunks for 5 MB", chunks.len());
        let one_kv_max = kv(0, value_bytes).encoded_len() + 8;
        for chunk in &chunks {
            assert!(
                chunk.len() < CHUNK_BYTES + one_kv_max,
                "a chunk of {} bytes",
                chunk.len()
            );
        }
    }

    #[test]
    fn requests_are_decoded_from_exactly_one_uncompressed_message() {
        let request = flotilla_proto::etcdserverpb::RangeRequest {
            key: b"a".to_vec().into(),
            range_end: b"b".to_vec().into(),
            limit: 5,
            ..Default::default()
        };
        let message = request.encode_to_vec();
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
        assert_eq!(decode_request(&body).unwrap(), request);

        let mut compressed = body.clone();
        compressed[0] = 1;
        let err = decode_request(&compressed).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        assert!(err.message().contains("compressed"), "{}", err.message());

        let mut two = body.clone();
        two.extend_from_slice(&body);
        let err = decode_request(&two).unwrap_err();
        assert!(
            err.message().contains("exactly one message"),
            "{}",
            err.message()
        );

        let err = decode_request(&body[..3]).unwrap_err();
        assert!(err.message().contains("shorter than"), "{}", err.message());

        let mut garbage = vec![0, 0, 0, 0, 3];
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = decode_request(&garbage).unwrap_err();
        assert!(
            err.message().contains("cannot be decoded"),
            "{}",
            err.message()
        );
    }
}

//! The gRPC Watch method, `/etcdserverpb.Watch/Watch`, with a codec of its own.
//!
//! The generated service would encode each response as a prost message, so every watcher's
//! copy of an event is encoded again. This route runs the same handler through tonic's own
//! gRPC machinery (request decoding, framing, trailers and limits are tonic's, as for every
//! other method), but its encoder writes each event's shared encoding as it is
//! ([`WatchOut::encode`]): the bytes on the wire are the same as before.

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, Response};
use flotilla_proto::etcdserverpb::WatchRequest;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, BoxStream};
use tonic::{Status, Streaming};

use super::event::WatchOut;
use crate::services::ClientServices;

/// The gRPC path this module serves.
pub const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

/// An axum router serving [`WATCH_PATH`]; merge it with the gRPC routes.
pub fn router(services: ClientServices) -> axum::Router {
    axum::Router::new()
        .route(WATCH_PATH, axum::routing::post(serve_watch))
        .with_state(services)
}

async fn serve_watch(
    State(services): State<ClientServices>,
    request: Request<Body>,
) -> Response<Body> {
    let mut grpc = tonic::server::Grpc::new(WatchCodec);
    grpc.streaming(WatchMethod(services), request)
        .await
        .map(Body::new)
}

struct WatchMethod(ClientServices);

impl tonic::server::StreamingService<WatchRequest> for WatchMethod {
    type Response = WatchOut;
    type ResponseStream = BoxStream<WatchOut>;
    type Future = BoxFuture<tonic::Response<BoxStream<WatchOut>>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<WatchRequest>>) -> Self::Future {
        let services = self.0.clone();
        Box::pin(async move { services.watch(request).await })
    }
}

/// Requests decoded by prost; responses written by [`WatchOut::encode`].
#[derive(Clone, Copy, Debug, Default)]
struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = WatchOut;
    type Decode = WatchRequest;
    type Encoder = WatchOutEncoder;
    type Decoder = tonic_prost::ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> WatchOutEncoder {
        WatchOutEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct WatchOutEncoder;

impl Encoder for WatchOutEncoder {
    type Item = WatchOut;
    type Error = Status;

    fn encode(&mut self, item: WatchOut, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf);
        Ok(())
    }
}

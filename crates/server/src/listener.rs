//! Socket options for every connection a member accepts (client, peer and metrics listeners).
//!
//! tonic's `Server::builder().tcp_nodelay(..)` and `.tcp_keepalive(..)` apply only to sockets
//! tonic binds itself; a server started with `serve_with_incoming*` over a listener of ours
//! silently keeps the kernel defaults. With Nagle's algorithm left on, a gRPC response written
//! in two pieces (headers and data, then trailers) waits for the client's delayed ACK: about
//! 40 ms per request for etcd's Go client. So the options are set here, on each accepted
//! socket, by the one function every listener goes through. (The HTTP/2 settings given to
//! the builder, such as windows and stream limits, are not dropped that way: they belong to
//! the connection, not the socket.)

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt as _};

/// TCP keepalive idle time on accepted connections: a client or peer that vanished without a
/// FIN (power loss, a cut cable) is noticed and its connection's resources freed. etcd's
/// peer listener uses the same period.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// A gRPC listener's stream of accepted connections, each configured by
/// [`configure_accepted`].
pub fn grpc_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.map(|mut stream| {
            configure_accepted(&mut stream);
            stream
        })
    })
}

/// How long a client gets to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose handshake finished, waiting for the server to take them.
const HANDSHAKEN_QUEUE: usize = 64;

/// An https listener's stream of connections, each configured by [`configure_accepted`] and
/// then through its TLS handshake. Handshakes run each on a task of its own (a slow or silent
/// client holds up no other), bounded by [`TLS_HANDSHAKE_TIMEOUT`]; a failed one is logged
/// with the reason (a client without a certificate the trusted CA signed, a wrong CA, plain
/// HTTP on an https port) and the connection closed. The listener is closed once the stream
/// is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    tls: std::sync::Arc<flotilla_tls::ServerTls>,
) -> impl Stream<Item = std::io::Result<TlsConnection>> {
    let (handshaken, incoming) = tokio::sync::mpsc::channel(HANDSHAKEN_QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = handshaken.closed() => return,
            };
            let (mut stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, usually: pause rather than spin.
                    tracing::warn!("accepting a connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            configure_accepted(&mut stream);
            let acceptor = tls.acceptor();
            let handshaken = handshaken.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = handshaken.send(Ok(TlsConnection(stream))).await;
                    }
                    Ok(Err(err)) => tracing::warn!(%peer, "rejected a TLS connection: {err}"),
                    Err(_) => {
                        tracing::warn!(%peer, "rejected a TLS connection: no handshake within {TLS_HANDSHAKE_TIMEOUT:?}")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(incoming)
}

/// An accepted TLS connection. tonic puts its [`ClientCertificates`] in every request's
/// extensions, so a handler can name the user by the certificate (--client-cert-auth).
#[derive(Debug)]
pub struct TlsConnection(flotilla_tls::TlsStream<TcpStream>);

/// The certificate chain a client presented (verified by the handshake), if any.
#[derive(Clone, Debug, Default)]
pub struct ClientCertificates(
    pub Option<std::sync::Arc<Vec<flotilla_tls::CertificateDer<'static>>>>,
);

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = ClientCertificates;

    fn connect_info(&self) -> ClientCertificates {
        let (_, session) = self.0.get_ref();
        ClientCertificates(
            session
                .peer_certificates()
                .map(|certificates| std::sync::Arc::new(certificates.to_vec())),
        )
    }
}

impl tokio::io::AsyncRead for TlsConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Nagle's algorithm off, TCP keepalive on. Failing to set an option is logged, not fatal:
/// the connection still works, only slower or less watched.
pub fn configure_accepted(stream: &mut TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::warn!("cannot set TCP_NODELAY on an accepted connection: {err}");
    }
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    if let Err(err) = socket2::SockRef::from(&*stream).set_tcp_keepalive(&keepalive) {
        tracing::warn!("cannot set TCP keepalive on an accepted connection: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grpc_incoming_configures_each_accepted_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = std::pin::pin!(grpc_incoming(listener));
        for _ in 0..2 {
            let _client = TcpStream::connect(addr).await.unwrap();
            let accepted = incoming.next().await.unwrap().unwrap();
            assert!(accepted.nodelay().unwrap());
            let socket = socket2::SockRef::from(&accepted);
            assert!(socket.keepalive().unwrap());
            assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE);
        }
    }

    #[tokio::test]
    async fn a_plainly_accepted_socket_has_nagle_on() {
        // The negative space: the kernel default that `configure_accepted` must override.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        assert!(!accepted.nodelay().unwrap());
        assert!(!socket2::SockRef::from(&accepted).keepalive().unwrap());
        configure_accepted(&mut accepted);
        assert!(accepted.nodelay().unwrap());
    }
}

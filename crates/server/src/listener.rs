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

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt as _};

use crate::write_coalescing::CoalescingWriter;

/// TCP keepalive idle time on accepted connections: a client or peer that vanished without a
/// FIN (power loss, a cut cable) is noticed and its connection's resources freed. etcd's
/// peer listener uses the same period.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// The accept queue a listener asks for when the kernel's limit cannot be read.
const LISTEN_BACKLOG_DEFAULT: i32 = 4096;

/// Listens on `addr` with the longest accept queue the kernel allows (`net.core.somaxconn`),
/// as Go's servers, etcd among them, do. The standard library's (and so tokio's) 128 overflows
/// when a burst of clients connects at once (a thousand keep-alive clients reconnecting after
/// a restart or a leader change): the kernel drops the SYNs past it, and those clients wait
/// for TCP's retransmission, a second and then three more, before they are even accepted.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(listen_backlog())?;
    TcpListener::from_std(socket.into())
}

/// Gives a listening socket made elsewhere (handed over by a supervisor or a test) the same
/// accept queue as [`bind`]: on Linux, `listen` again on a listening socket only resizes it.
pub fn widen_backlog(listener: &TcpListener) -> std::io::Result<()> {
    socket2::SockRef::from(listener).listen(listen_backlog())
}

fn listen_backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|&backlog: &i32| backlog > 0)
        .unwrap_or(LISTEN_BACKLOG_DEFAULT)
}

/// A gRPC listener's stream of accepted connections, each configured by
/// [`configure_accepted`], their writes coalesced (see [`crate::write_coalescing`]).
pub fn grpc_incoming(
    listener: TcpListener,
) -> impl Stream<Item = std::io::Result<CoalescingWriter<TcpStream>>> {
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.map(|mut stream| {
            configure_accepted(&mut stream);
            CoalescingWriter::new(stream)
        })
    })
}

impl tonic::transport::server::Connected for CoalescingWriter<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
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
            let accepted = accepted.get_ref();
            assert!(accepted.nodelay().unwrap());
            let socket = socket2::SockRef::from(accepted);
            assert!(socket.keepalive().unwrap());
            assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE);
        }
    }

    /// Opens `count` connections to `addr` at once, none of them accepted; how many the
    /// kernel completed (each connect gets 2 s, past TCP's first SYN retransmission).
    async fn connects_completed(addr: SocketAddr, count: usize) -> (usize, Vec<TcpStream>) {
        let mut attempts = tokio::task::JoinSet::new();
        for _ in 0..count {
            attempts.spawn(tokio::time::timeout(
                Duration::from_secs(2),
                TcpStream::connect(addr),
            ));
        }
        let mut streams = Vec::new();
        while let Some(attempt) = attempts.join_next().await {
            if let Ok(Ok(stream)) = attempt.unwrap() {
                streams.push(stream);
            }
        }
        (streams.len(), streams)
    }

    const BURST: usize = 600;

    fn somaxconn_allows_a_burst() -> bool {
        if listen_backlog() < BURST as i32 + 50 {
            eprintln!(
                "SKIPPED: net.core.somaxconn is {}, below a burst of {BURST}",
                listen_backlog()
            );
            return false;
        }
        true
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_connections_fits_the_accept_queue() {
        if !somaxconn_allows_a_burst() {
            return;
        }
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (completed, _streams) = connects_completed(listener.local_addr().unwrap(), BURST).await;
        assert_eq!(
            completed, BURST,
            "connections the kernel completed before any accept"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_standard_accept_queue_drops_a_burst() {
        // The negative space: what `bind` must not do (std's and tokio's backlog of 128).
        if !somaxconn_allows_a_burst() {
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (completed, _streams) = connects_completed(listener.local_addr().unwrap(), BURST).await;
        assert!(completed < BURST, "all {BURST} fitted a queue of 128");
        // And a listener handed over with that queue is widened like one of ours.
        let handed_over = TcpListener::bind("127.0.0.1:0").await.unwrap();
        widen_backlog(&handed_over).unwrap();
        let (completed, _streams) =
            connects_completed(handed_over.local_addr().unwrap(), BURST).await;
        assert_eq!(completed, BURST);
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

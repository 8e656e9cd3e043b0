//! Listening sockets handed to a member by the process that starts it (`--listen-fds`), in the
//! manner of socket activation.
//!
//! A supervisor or test harness that binds a member's ports itself can restart the member on
//! them without ever letting them go: between the member's death and its restart no other
//! process can take a port, which rebinding a released port cannot promise (an ephemeral
//! port, above all, goes to the next outgoing connection on the machine). Each inherited
//! socket serves the listen URL whose address it is bound to, so the URLs stay the one
//! statement of what the member serves and advertises.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, anyhow, bail};

/// Inherited listening sockets not yet claimed by a listen URL, by local address.
#[derive(Debug, Default)]
pub struct InheritedListeners {
    /// Invariant: every entry is an open, listening, non-blocking, close-on-exec TCP socket
    /// this process owns, bound to its key.
    by_addr: BTreeMap<SocketAddr, (RawFd, TcpListener)>,
}

impl InheritedListeners {
    /// Takes ownership of the descriptors, checking that each is an open, listening TCP
    /// socket and that no two are bound to the same address.
    pub fn adopt(fds: &[RawFd]) -> anyhow::Result<InheritedListeners> {
        // Before anything is owned: a number given twice would be closed twice.
        for (position, fd) in fds.iter().enumerate() {
            if fds[..position].contains(fd) {
                bail!("--listen-fds: descriptor {fd} is given twice");
            }
        }
        let mut by_addr = BTreeMap::new();
        for &fd in fds {
            let listener =
                adopt_one(fd).with_context(|| format!("--listen-fds: descriptor {fd}"))?;
            let addr = listener.local_addr()?;
            if let Some((other, _)) = by_addr.insert(addr, (fd, listener)) {
                bail!("--listen-fds: descriptors {other} and {fd} are both bound to {addr}");
            }
        }
        Ok(InheritedListeners { by_addr })
    }

    /// The inherited socket bound to `addr`, if there is one.
    pub fn take(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        self.by_addr.remove(&addr).map(|(_, listener)| listener)
    }

    /// Fails if a socket was inherited that no listen URL claimed: a mistake in the command
    /// line, which would otherwise hold a port open that nothing serves.
    pub fn finish(self) -> anyhow::Result<()> {
        match self.by_addr.iter().next() {
            None => Ok(()),
            Some((addr, (fd, _))) => bail!(
                "--listen-fds: descriptor {fd} is bound to {addr}, which no --listen-client-urls, \
                 --listen-peer-urls or --listen-metrics-urls entry names"
            ),
        }
    }
}

/// Owns descriptor `fd` as a listening TCP socket, or says what it is instead. A descriptor
/// that is not one is left as it was (not closed: it may be the process's standard output).
#[allow(unsafe_code)] // Claiming a descriptor by number; see the SAFETY notes.
fn adopt_one(fd: RawFd) -> anyhow::Result<TcpListener> {
    if fd < 0 {
        bail!("is not a descriptor number");
    }
    // SAFETY: `fd` is not -1; fcntl on a number that is not open only reports EBADF.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).map_err(|_| anyhow!("is not open"))?;
    // The checks look through a borrow: nothing is closed if one fails.
    let socket = socket2::SockRef::from(&borrowed);
    let kind = socket.r#type().map_err(|_| anyhow!("is not a socket"))?;
    let addr = socket.local_addr().ok().and_then(|addr| addr.as_socket());
    let Some(addr) = addr.filter(|_| kind == socket2::Type::STREAM) else {
        bail!("is not a TCP socket");
    };
    if !socket.is_listener()? {
        bail!("is a TCP socket bound to {addr} but not listening");
    }
    // SAFETY: the descriptor is an open listening socket, handed to this process for the
    // member to own; nothing else here refers to it (`adopt` refuses a number given twice).
    let socket = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Not passed on to any process this one starts.
    socket.set_cloexec(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    /// A listening socket on an ephemeral loopback port, released to a bare descriptor number
    /// as a parent process hands it over.
    fn handed_over_listener() -> (RawFd, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (listener.into_raw_fd(), addr)
    }

    #[test]
    fn a_listener_is_taken_by_its_address_and_accepts() {
        let (fd, addr) = handed_over_listener();
        let mut inherited = InheritedListeners::adopt(&[fd]).unwrap();
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(inherited.take(other).is_none());
        let listener = inherited.take(addr).expect("the socket bound to addr");
        assert_eq!(listener.as_raw_fd(), fd);
        assert!(inherited.take(addr).is_none(), "taken once");
        inherited.finish().unwrap();
        // It is the very socket: a connection to the address arrives on it.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.set_nonblocking(false).unwrap();
        listener.accept().unwrap();
    }

    #[test]
    fn an_unclaimed_listener_is_an_error_naming_it() {
        let (fd, addr) = handed_over_listener();
        let error = InheritedListeners::adopt(&[fd])
            .unwrap()
            .finish()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "--listen-fds: descriptor {fd} is bound to {addr}, which no --listen-client-urls, \
                 --listen-peer-urls or --listen-metrics-urls entry names"
            )
        );
    }

    #[test]
    fn what_is_not_a_listening_tcp_socket_is_refused_with_what_it_is() {
        let error = |fds: &[RawFd]| format!("{:#}", InheritedListeners::adopt(fds).unwrap_err());
        assert_eq!(
            error(&[-3]),
            "--listen-fds: descriptor -3: is not a descriptor number"
        );
        // A number far above anything open.
        assert_eq!(
            error(&[1 << 20]),
            format!("--listen-fds: descriptor {}: is not open", 1 << 20)
        );
        let file = tempfile::tempfile().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let bound =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        bound
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let bound_addr = bound.local_addr().unwrap().as_socket().unwrap();
        let (file_fd, udp_fd, bound_fd) = (file.as_raw_fd(), udp.as_raw_fd(), bound.as_raw_fd());
        assert_eq!(
            error(&[file_fd]),
            format!("--listen-fds: descriptor {file_fd}: is not a socket")
        );
        assert_eq!(
            error(&[udp_fd]),
            format!("--listen-fds: descriptor {udp_fd}: is not a TCP socket")
        );
        assert_eq!(
            error(&[bound_fd]),
            format!(
                "--listen-fds: descriptor {bound_fd}: is a TCP socket bound to {bound_addr} but \
                 not listening"
            )
        );
        // Refused, and left open: a descriptor that is not a listener is not taken or closed.
        assert!(file.metadata().is_ok());
        assert_eq!(udp.local_addr().unwrap().ip().to_string(), "127.0.0.1");
        assert_eq!(bound.local_addr().unwrap().as_socket(), Some(bound_addr));
    }

    #[test]
    fn a_descriptor_given_twice_is_refused_before_it_is_owned() {
        let (fd, addr) = handed_over_listener();
        let error = InheritedListeners::adopt(&[fd, fd]).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("--listen-fds: descriptor {fd} is given twice")
        );
        // Still open, still ours: nothing closed it.
        InheritedListeners::adopt(&[fd])
            .unwrap()
            .take(addr)
            .unwrap();
    }
}

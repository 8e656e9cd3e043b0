//! Ports for test members that the kernel picks (port 0) and that no other process can take
//! while the test runs, across any number of member restarts.
//!
//! The harness binds each port itself and keeps that socket bound but not listening, with
//! SO_REUSEPORT: the port's reservation. The kernel then gives the port to no outgoing
//! connection and to no other bind (each would need SO_REUSEPORT and this user), while a
//! connection to it is refused, as one to a stopped server should be. For each start of a
//! member the harness binds a second socket to the port (allowed beside the reservation),
//! listens on it and hands it to the member by descriptor (`flotilla serve --listen-fds`),
//! closing its own copy once the member has it: when the member dies its listener dies with
//! it, and a restart gets a new one on the same port.
//!
//! Binding port 0 and passing the number on instead would leave a gap between the release
//! and the member's bind in which another test's outgoing connection can take the port: it is
//! an ephemeral port.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

use socket2::{Domain, Socket, Type};

/// Pending connections a member's listener queues before it accepts them.
const LISTEN_BACKLOG: i32 = 1024;

/// A loopback port held for the test's life.
#[derive(Debug)]
pub struct ReservedPort {
    /// Bound to 127.0.0.1:`port`, never listening.
    reservation: Socket,
    port: u16,
}

impl ReservedPort {
    /// A port the kernel chooses.
    pub fn new() -> ReservedPort {
        let reservation = reusable_socket();
        bind(&reservation, 0);
        let port = reservation
            .local_addr()
            .expect("the reservation's address")
            .as_socket()
            .expect("an IPv4 address")
            .port();
        ReservedPort { reservation, port }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A listening socket on the port, for one start of a member. It is close-on-exec: only
    /// [`hand_over`] passes it on.
    pub fn listener(&self) -> OwnedFd {
        debug_assert!(!self.reservation.is_listener().unwrap());
        let listener = reusable_socket();
        bind(&listener, self.port);
        listener
            .listen(LISTEN_BACKLOG)
            .expect("listen on a reserved port");
        listener.into()
    }
}

/// A TCP socket that may share its port with the reservation.
fn reusable_socket() -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a TCP socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    socket
}

fn bind(socket: &Socket, port: u16) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    socket
        .bind(&addr.into())
        .unwrap_or_else(|err| panic!("bind {addr}: {err}"));
}

/// Passes `sockets` to the process `command` starts, under their own descriptor numbers,
/// named by `--listen-fds`. The command owns them until it is dropped.
pub fn hand_over(command: &mut Command, sockets: Vec<OwnedFd>) {
    let numbers: Vec<String> = sockets
        .iter()
        .map(|socket| socket.as_raw_fd().to_string())
        .collect();
    command.args(["--listen-fds", &numbers.join(",")]);
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: it makes one fcntl system call per descriptor (rustix calls the
    // kernel directly), allocates nothing and takes no lock.
    #[allow(unsafe_code)]
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            for socket in &sockets {
                rustix::io::fcntl_setfd(socket, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
}

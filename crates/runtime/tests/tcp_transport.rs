//! The TCP transport on loopback: delivery both ways, refusals of a connection that is not a
//! member of the cluster (wrong cluster, wrong receiver, a message from someone else, a frame
//! over the limit), a reconnection after the peer restarts, and the events it reports.

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_runtime::raft::{Heartbeat, Message, MessageBody};
use flotilla_runtime::transport::MESSAGE_BYTES_MAX;
use flotilla_runtime::{PeerAddresses, TcpMember, TcpTransport, Transport, TransportEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLUSTER: u64 = 0xc1;
/// Bounds every wait: a test that needs it has failed.
const DEADLINE: Duration = Duration::from_secs(20);

fn heartbeat(from: u64, to: u64, commit: u64) -> Message {
    Message {
        from,
        to,
        term: 3,
        body: MessageBody::Heartbeat(Heartbeat {
            commit,
            read_round: 0,
        }),
    }
}

async fn bind(id: u64, addresses: &PeerAddresses) -> TcpMember {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let member = TcpTransport::bind(CLUSTER, id, any, addresses.clone())
        .await
        .expect("bind on loopback");
    addresses.set(id, member.local_addr);
    member
}

async fn next(member: &mut TcpMember) -> Message {
    tokio::time::timeout(DEADLINE, member.inbox.recv())
        .await
        .expect("a message within the deadline")
        .expect("the inbox is open")
}

#[tokio::test]
async fn messages_cross_both_ways_in_order() {
    let addresses = PeerAddresses::default();
    let mut one = bind(1, &addresses).await;
    let mut two = bind(2, &addresses).await;
    for commit in 1..=100 {
        assert!(one.transport.send(heartbeat(1, 2, commit)));
    }
    for commit in 1..=100 {
        assert_eq!(next(&mut two).await, heartbeat(1, 2, commit));
    }
    assert!(two.transport.send(heartbeat(2, 1, 7)));
    assert_eq!(next(&mut one).await, heartbeat(2, 1, 7));
    one.transport.shutdown();
    two.transport.shutdown();
}

/// Writes a hello and a frame on a raw connection to `to`, then waits for the receiver to
/// close it; nothing reaches the inbox.
async fn refused(hello: [u64; 3], frame: Vec<u8>, to: &mut TcpMember) {
    let mut stream = TcpStream::connect(to.local_addr).await.unwrap();
    let mut bytes = b"FLRTTCP1".to_vec();
    for field in hello {
        bytes.extend_from_slice(&field.to_le_bytes());
    }
    bytes.extend_from_slice(&frame);
    stream.write_all(&bytes).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the receiver kept the connection open");
    assert!(
        to.inbox.try_recv().is_err(),
        "a refused message was delivered"
    );
}

fn frame_of(msg: &Message) -> Vec<u8> {
    let mut encoded = Vec::new();
    flotilla_runtime::raft::codec::encode_message(&mut encoded, msg);
    let mut frame = (encoded.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&encoded);
    frame
}

#[tokio::test]
async fn strangers_are_refused() {
    let addresses = PeerAddresses::default();
    let mut two = bind(2, &addresses).await;
    let valid = frame_of(&heartbeat(1, 2, 1));
    // Another cluster; another receiver; a message not from the member the hello named.
    refused([CLUSTER + 1, 1, 2], valid.clone(), &mut two).await;
    refused([CLUSTER, 1, 3], valid.clone(), &mut two).await;
    refused([CLUSTER, 4, 2], valid.clone(), &mut two).await;
    // A frame over the limit is refused before anything is read into memory.
    let oversize = ((MESSAGE_BYTES_MAX + 1) as u32).to_le_bytes().to_vec();
    refused([CLUSTER, 1, 2], oversize, &mut two).await;
    // Garbage where a message should be.
    refused([CLUSTER, 1, 2], vec![3, 0, 0, 0, 1, 2, 3], &mut two).await;
    // And a well-formed connection still gets through.
    let mut stream = TcpStream::connect(two.local_addr).await.unwrap();
    let mut bytes = b"FLRTTCP1".to_vec();
    for field in [CLUSTER, 1, 2] {
        bytes.extend_from_slice(&field.to_le_bytes());
    }
    bytes.extend_from_slice(&valid);
    stream.write_all(&bytes).await.unwrap();
    assert_eq!(next(&mut two).await, heartbeat(1, 2, 1));
    two.transport.shutdown();
}

#[tokio::test]
async fn a_sender_reconnects_to_a_restarted_peer() {
    let addresses = PeerAddresses::default();
    let mut one = bind(1, &addresses).await;
    let mut two = bind(2, &addresses).await;
    assert!(one.transport.send(heartbeat(1, 2, 1)));
    assert_eq!(next(&mut two).await, heartbeat(1, 2, 1));

    // Member 2 stops and comes back on a new port; member 1 learns the new address.
    two.transport.shutdown();
    drop(two);
    let mut two = bind(2, &addresses).await;
    // Messages sent while the connection is broken are lost (Raft sends again), so keep
    // sending until one gets through; the deadline bounds it.
    let delivered = tokio::time::timeout(DEADLINE, async {
        let mut commit = 2;
        loop {
            one.transport.send(heartbeat(1, 2, commit));
            tokio::select! {
                msg = two.inbox.recv() => return msg,
                () = tokio::time::sleep(Duration::from_millis(20)) => commit += 1,
            }
        }
    })
    .await
    .expect("reconnected within the deadline")
    .expect("the inbox is open");
    assert_eq!(delivered.from, 1);
    // The failed connection was reported.
    let event = one.events.try_recv();
    assert_eq!(event, Ok(TransportEvent::Unreachable(2)));
    one.transport.shutdown();
    two.transport.shutdown();
}

#[tokio::test]
async fn a_peer_without_an_address_is_reported_unreachable() {
    let addresses = PeerAddresses::default();
    let mut one = bind(1, &addresses).await;
    one.transport.send(heartbeat(1, 9, 1));
    let event = tokio::time::timeout(DEADLINE, one.events.recv()).await;
    assert_eq!(event, Ok(Some(TransportEvent::Unreachable(9))));
    one.transport.shutdown();
}

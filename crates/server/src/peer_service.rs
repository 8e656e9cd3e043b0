//! The receiving side of the peer protocol: Raft streams into the raft task's inbox, forwarded
//! client requests, and cluster information for joining members.

use std::sync::Arc;

use flotilla_raft::{Message, NodeId, codec};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::frontend::Frontend;
use crate::members::Member;
use crate::peer_proto::peer_server::Peer;
use crate::peer_proto::{
    ClusterInfoRequest, ClusterInfoResponse, ForwardRequest, ForwardResponse, MemberInfo,
    RaftBatch, StreamClosed,
};
use crate::routing::{Answer, RouteError};
use crate::transport::{CLUSTER_ID_HEADER, FROM_HEADER, REMOVED_MESSAGE, TO_HEADER, header_u64};

#[derive(Debug)]
pub struct PeerService {
    pub frontend: Arc<Frontend>,
    pub inbox: mpsc::Sender<Message>,
    /// The members the cluster was created with, for joining members.
    pub bootstrap_members: Vec<Member>,
}

impl PeerService {
    /// Checks who is calling; returns the sender's id.
    fn check_peer<T>(&self, request: &Request<T>) -> Result<NodeId, Status> {
        let metadata = request.metadata();
        let identity = &self.frontend.identity;
        let cluster = header_u64(metadata, CLUSTER_ID_HEADER);
        let from = header_u64(metadata, FROM_HEADER).unwrap_or(0);
        let to = header_u64(metadata, TO_HEADER);
        if cluster != Some(identity.cluster_id) {
            let theirs = cluster.map_or("none".to_string(), |id| format!("{id:x}"));
            tracing::error!(
                peer = from,
                "refusing a peer of another cluster: it belongs to cluster {theirs}, this \
                 member to cluster {:x} (check --initial-cluster-token and --data-dir)",
                identity.cluster_id
            );
            return Err(Status::failed_precondition(format!(
                "flotilla: cluster id mismatch: this member ({:x}) belongs to cluster {:x}, the \
                 caller to cluster {theirs}",
                identity.member_id, identity.cluster_id
            )));
        }
        if to.is_some_and(|to| to != identity.member_id) {
            return Err(Status::failed_precondition(format!(
                "flotilla: member id mismatch: this is member {:x}, the caller wanted {:x}",
                identity.member_id,
                to.unwrap_or(0)
            )));
        }
        if self.is_removed(from) {
            return Err(Status::failed_precondition(REMOVED_MESSAGE));
        }
        Ok(from)
    }

    fn is_removed(&self, member: NodeId) -> bool {
        let state = self
            .frontend
            .node
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner());
        state.members.is_removed(member)
    }

    /// [`Self::is_removed`], or false at once if the state lock is taken.
    fn is_removed_if_free(&self, member: NodeId) -> bool {
        match self.frontend.node.state.try_read() {
            Ok(state) => state.members.is_removed(member),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                poisoned.into_inner().members.is_removed(member)
            }
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    async fn receive(&self, request: Request<Streaming<RaftBatch>>) -> Result<(), Status> {
        let from = self.check_peer(&request)?;
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            // A stream opened before its member was removed: the removed member must hear it
            // (and stop) rather than go on sending pre-votes into a cluster that ignores it.
            // Never waits for the state lock (an apply may hold it): a later batch checks.
            if self.is_removed_if_free(from) {
                return Err(Status::failed_precondition(REMOVED_MESSAGE));
            }
            if self.frontend.identity.is_cut_off_from(from) {
                continue; // lost in the (dev) partition
            }
            self.frontend.note_peer_activity(from);
            for bytes in batch.messages {
                let msg = codec::decode_message_exact(bytes)
                    .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
                if msg.from != from {
                    return Err(Status::invalid_argument(format!(
                        "a message from {:x} on the stream of {from:x}",
                        msg.from
                    )));
                }
                // Back-pressure: a full inbox slows the stream down.
                self.inbox
                    .send(msg)
                    .await
                    .map_err(|_| Status::unavailable("etcdserver: server stopped"))?;
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<StreamClosed>, Status> {
        self.receive(request).await?;
        Ok(Response::new(StreamClosed {}))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<StreamClosed>, Status> {
        self.receive(request).await?;
        Ok(Response::new(StreamClosed {}))
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let from = self.check_peer(&request)?;
        if self.frontend.identity.is_cut_off_from(from) {
            return Err(Status::unavailable(format!(
                "flotilla: cut off from {from:x} (a partition made by flotilla dev)"
            )));
        }
        let forward = request.into_inner();
        let Some(leader_request) = forward.request else {
            return Err(Status::invalid_argument("flotilla: empty forward request"));
        };
        let me = self.frontend.identity.member_id;
        let answered = if self.frontend.node.leader() == Some(me) {
            let deadline = self.frontend.deadline();
            self.frontend
                .serve_here(&leader_request, forward.session_id, deadline)
                .await
        } else {
            Err(RouteError::NotLeader)
        };
        Ok(Response::new(Answer::into_wire(answered)))
    }

    async fn hash_kv(
        &self,
        request: Request<flotilla_proto::etcdserverpb::HashKvRequest>,
    ) -> Result<Response<flotilla_proto::etcdserverpb::HashKvResponse>, Status> {
        self.check_peer(&request)?;
        Ok(Response::new(
            self.frontend.hash_kv(request.get_ref().revision)?,
        ))
    }

    async fn cluster_info(
        &self,
        request: Request<ClusterInfoRequest>,
    ) -> Result<Response<ClusterInfoResponse>, Status> {
        // A joining member does not know the cluster id yet: only the token must match, and
        // the caller checks that itself.
        let _ = request;
        let members: Vec<MemberInfo> = {
            let state = self
                .frontend
                .node
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner());
            state.members.infos()
        };
        Ok(Response::new(ClusterInfoResponse {
            cluster_id: self.frontend.identity.cluster_id,
            cluster_token: self.frontend.cluster_token.clone(),
            bootstrap_members: self.bootstrap_members.iter().map(Member::to_info).collect(),
            members,
        }))
    }
}

//! Raft's view of the peers. Multi-member clusters arrive with the QUIC transport (issue 5); a
//! single member never calls out, and any call to a peer reports it unreachable, which Raft
//! treats as a peer that is down.

use std::future::Future;

use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft::OptionalSend;

use super::{Member, TypeConfig};

type TC = TypeConfig;

/// Creates a connection per peer.
pub struct Network;

/// A connection to one peer.
pub struct Peer {
    target: u64,
    addr: String,
}

impl Peer {
    fn unreachable(&self) -> Unreachable<TC> {
        Unreachable::from_string(format!("peer {:x} at {}: no peer transport in this build", self.target, self.addr))
    }
}

impl RaftNetworkFactory<TC> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Member) -> Self::Network {
        Peer { target, addr: node.peer_addr.clone() }
    }
}

impl RaftNetworkV2<TC> for Peer {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TC>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TC>, RPCError<TC>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn vote(&mut self, _rpc: VoteRequest<TC>, _option: RPCOption) -> Result<VoteResponse<TC>, RPCError<TC>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: VoteOf<TC>,
        _snapshot: SnapshotOf<TC, Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TC>, StreamingError<TC>> {
        Err(StreamingError::Unreachable(self.unreachable()))
    }
}

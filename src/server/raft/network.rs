//! Raft's view of the peers, over [`crate::transport`]: one QUIC connection per peer, shared by
//! openraft's replication and by this node's own requests to the leader (forwarded writes, read
//! indexes, lease keep-alives). Requests and replies are postcard-encoded.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::OptionalSend;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::membership::MemberError;
use super::quorum::{QuorumView, Replicate};
use super::{Member, TypeConfig};
use crate::config::Role;
use crate::transport::{self, Connection, Transport, TransportError};
use geolock_core::limits::{PEER_MESSAGE_BYTES_MAX, PEER_SNAPSHOT_BYTES_MAX, SNAPSHOT_CHUNK_BYTES};
use geolock_core::machine::ApplyError;

type TC = TypeConfig;

/// What a peer request asks for: the first byte of each request stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    AppendEntries = 1,
    Vote = 2,
    PreVote = 3,
    /// One piece of a snapshot; the last piece installs it.
    SnapshotChunk = 4,
    TransferLeader = 5,
    /// A client write proposed through the leader on behalf of a follower.
    ForwardWrite = 6,
    /// The leader's read index, for a linearizable read on a follower.
    ReadIndex = 7,
    /// A lease keep-alive or time-to-live, which only the leader answers.
    LeaseKeepAlive = 8,
    LeaseTimeToLive = 9,
    /// A membership change, made by the leader on behalf of a follower.
    ChangeMembers = 10,
    /// A stream of AppendEntries, pipelined: the leader sends the next batch without waiting
    /// for the answer to the last, and the follower answers them in order.
    StreamAppend = 11,
    /// The leader tells a witness how far every data-bearing voter has confirmed the log.
    WitnessPurge = 12,
    /// A member's last log id, asked by a witness deciding whether to step in.
    LogState = 13,
    /// Every member's replication lag, as the leader sees it.
    Lag = 14,
    /// A member's own account, for the cluster page (`view`).
    View = 15,
}

impl Kind {
    /// The kind of a request byte.
    pub fn of(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            AppendEntries,
            Vote,
            PreVote,
            SnapshotChunk,
            TransferLeader,
            ForwardWrite,
            ReadIndex,
            LeaseKeepAlive,
            LeaseTimeToLive,
            ChangeMembers,
            StreamAppend,
            WitnessPurge,
            LogState,
            Lag,
            View,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// One piece of a snapshot on its way to a peer. Every piece carries the vote and metadata, so
/// the last one can be installed on its own terms.
#[derive(Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub vote: VoteOf<TC>,
    pub meta: SnapshotMetaOf<TC>,
    pub offset: u64,
    pub total: u64,
    pub data: Vec<u8>,
}

/// Reassembles the snapshot a leader is sending, piece by piece, in order. One at a time: a
/// piece that does not continue the snapshot being assembled starts over or is refused, and the
/// sender retries from the start.
#[derive(Default)]
pub struct SnapshotInbox {
    assembling: Mutex<Option<Vec<u8>>>,
}

impl SnapshotInbox {
    /// Take a piece; returns the whole snapshot once its last piece has arrived.
    pub fn take(&self, c: &SnapshotChunk) -> Result<Option<Vec<u8>>, TransportError> {
        if c.total as usize > PEER_SNAPSHOT_BYTES_MAX {
            return Err(TransportError::SnapshotTooLarge { total: c.total, max: PEER_SNAPSHOT_BYTES_MAX });
        }
        let mut slot = self.assembling.lock().unwrap();
        if c.offset == 0 {
            *slot = Some(Vec::with_capacity((c.total as usize).min(SNAPSHOT_CHUNK_BYTES * 16)));
        }
        let buf = match slot.as_mut() {
            Some(b) if b.len() as u64 == c.offset && c.offset + c.data.len() as u64 <= c.total => b,
            _ => {
                *slot = None;
                return Err(TransportError::SnapshotOutOfOrder { offset: c.offset });
            }
        };
        buf.extend_from_slice(&c.data);
        if buf.len() as u64 == c.total {
            return Ok(slot.take());
        }
        Ok(None)
    }
}

/// A peer refused or failed a forwarded request: [`super::NodeError`] as it travels between
/// members (`Other` carries the text of one that has no typed form on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteError {
    #[error("not leader")]
    NotLeader,
    #[error("no leader")]
    NoLeader,
    #[error("timed out")]
    Timeout,
    #[error("stopped")]
    Stopped,
    #[error("{0}")]
    Other(String),
    #[error("leader changed")]
    LeaderChanged,
    #[error(transparent)]
    Apply(ApplyError),
    #[error(transparent)]
    Member(MemberError),
    #[error("too many requests (proposals_in_flight_max {max})")]
    TooManyProposals { max: usize },
    #[error("fenced by the failover to revision epoch {epoch}")]
    Fenced { epoch: u64 },
    #[error("no region write lease ({vantages} vantage points, {lease_ms} ms)")]
    NoWriteLease { vantages: usize, lease_ms: u64 },
}

/// Encode a message for a peer.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("peer messages encode")
}

/// Decode a message from a peer.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, TransportError> {
    Ok(postcard::from_bytes(b)?)
}

/// Connections to peers, one per peer, made on first use and remade after a failure.
pub struct Peers {
    transport: Option<Arc<Transport>>,
    conns: Mutex<HashMap<u64, Slot>>,
    /// The latest connection each peer (by name) dialed to this member, for its traffic figures.
    accepted: Mutex<HashMap<String, Connection>>,
    /// Each connection's bytes (sent, received) at the last sample, by `stable_id`.
    sampled: Mutex<HashMap<usize, (u64, u64)>>,
}

/// etcd's per-peer figures (labels `To`/`From`: the peer's member ID in hex). Round-trip time
/// is QUIC's smoothed estimate, sampled each second; etcd's buckets: 0.1 ms doubling to 3.28 s.
pub(super) struct PeerMetrics {
    sent: prometheus::IntCounterVec,
    received: prometheus::IntCounterVec,
    failures: prometheus::IntCounterVec,
    rtt: prometheus::HistogramVec,
}

pub(super) static PEER_METRICS: std::sync::LazyLock<PeerMetrics> = std::sync::LazyLock::new(|| {
    use crate::metrics::{counter_vec, exponential, histogram_vec};
    PeerMetrics {
        sent: counter_vec("etcd_network_peer_sent_bytes_total", "Bytes sent to each peer (QUIC datagrams).", &["To"]),
        received: counter_vec(
            "etcd_network_peer_received_bytes_total",
            "Bytes received from each peer (QUIC datagrams).",
            &["From"],
        ),
        failures: counter_vec(
            "etcd_network_peer_sent_failures_total",
            "Requests to each peer that failed: no connection, or no answer.",
            &["To"],
        ),
        rtt: histogram_vec(
            "etcd_network_peer_round_trip_time_seconds",
            "Round-trip time to each peer, sampled each second.",
            &["To"],
            exponential(0.0001, 2.0, 16),
        ),
    }
});

/// A peer's connection, or the dial that will make it.
enum Slot {
    Ready(Connection),
    /// A dial runs as a task of its own and callers wait on it, so a caller that gives up (a
    /// heartbeat times out after one interval, shorter than a WAN handshake) does not abort the
    /// handshake for everyone: over a slow link, the dial would otherwise never finish.
    Dialing(Shared<BoxFuture<'static, Result<Connection, String>>>),
}

impl Peers {
    /// Peers reached through `transport` (none for a single member without peer TLS).
    pub fn new(transport: Option<Arc<Transport>>) -> Arc<Peers> {
        Arc::new(Peers {
            transport,
            conns: Mutex::new(HashMap::new()),
            accepted: Mutex::new(HashMap::new()),
            sampled: Mutex::new(HashMap::new()),
        })
    }

    /// Note a connection `peer` dialed to this member, so that its traffic is counted.
    pub fn accepted(&self, peer: &str, conn: &Connection) {
        self.accepted.lock().unwrap().insert(peer.to_string(), conn.clone());
    }

    /// QUIC's smoothed round-trip time to each member this one has a live connection with
    /// (dialed or accepted; the dialed one where there are both).
    /// `ids` names the members by ID.
    pub fn rtts(&self, ids: &[(u64, String)]) -> std::collections::BTreeMap<u64, std::time::Duration> {
        // Accepted first, so that a member's dialed connection, where there is one, wins.
        self.connections(ids)
            .into_iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(id, c)| (id, c.rtt()))
            .collect()
    }

    /// Every peer connection by member ID: those peers dialed to this member, then those it
    /// dialed. Closed accepted connections are forgotten after this listing.
    fn connections(&self, ids: &[(u64, String)]) -> Vec<(u64, Connection)> {
        let mut conns = Vec::new();
        {
            let mut accepted = self.accepted.lock().unwrap();
            for (name, c) in accepted.iter() {
                if let Some((id, _)) = ids.iter().find(|(_, n)| n == name) {
                    conns.push((*id, c.clone()));
                }
            }
            accepted.retain(|_, c| c.close_reason().is_none());
        }
        for (id, slot) in self.conns.lock().unwrap().iter() {
            if let Slot::Ready(c) = slot {
                conns.push((*id, c.clone()));
            }
        }
        conns
    }

    /// Add every peer connection's traffic since the last sample to etcd's byte counters and
    /// sample its round-trip time. `ids` names the members by ID.
    pub fn sample_metrics(&self, ids: &[(u64, String)]) {
        let conns = self.connections(ids);
        let m = &*PEER_METRICS;
        let mut sampled = self.sampled.lock().unwrap();
        let mut live = std::collections::HashSet::new();
        for (id, c) in conns {
            let peer = format!("{id:x}");
            let stats = c.stats();
            let (tx, rx) = (stats.udp_tx.bytes, stats.udp_rx.bytes);
            let last = sampled.entry(c.stable_id()).or_default();
            m.sent.with_label_values(&[&peer]).inc_by(tx.saturating_sub(last.0));
            m.received.with_label_values(&[&peer]).inc_by(rx.saturating_sub(last.1));
            *last = (tx, rx);
            if c.close_reason().is_none() {
                live.insert(c.stable_id());
                m.rtt.with_label_values(&[&peer]).observe(c.rtt().as_secs_f64());
            }
        }
        sampled.retain(|id, _| live.contains(id));
    }

    pub async fn conn(&self, target: u64, member: &Member) -> Result<Connection, TransportError> {
        let dial = {
            let mut conns = self.conns.lock().unwrap();
            match conns.get(&target) {
                Some(Slot::Ready(c)) if c.close_reason().is_none() => return Ok(c.clone()),
                Some(Slot::Dialing(d)) => d.clone(),
                _ => {
                    let transport = self.transport.clone().ok_or_else(|| TransportError::Connect {
                        peer: member.name.clone(),
                        reason: "this node has no peer transport (start it with peer TLS files)".into(),
                    })?;
                    let member = member.clone();
                    let task = tokio::spawn(async move {
                        let addr = tokio::net::lookup_host(&member.peer_addr)
                            .await
                            .map_err(|e| e.to_string())?
                            .next()
                            .ok_or_else(|| format!("peer {}: no address for {}", member.name, member.peer_addr))?;
                        transport.connect(addr, &member.name).await.map_err(|e| e.to_string())
                    });
                    let dial = async move { task.await.map_err(|e| e.to_string())? }.boxed().shared();
                    conns.insert(target, Slot::Dialing(dial.clone()));
                    dial
                }
            }
        };
        let done = dial.clone().await;
        let mut conns = self.conns.lock().unwrap();
        // Only the dial that is still current settles the slot.
        if matches!(conns.get(&target), Some(Slot::Dialing(d)) if Shared::ptr_eq(d, &dial)) {
            match &done {
                Ok(c) => conns.insert(target, Slot::Ready(c.clone())),
                Err(_) => conns.remove(&target),
            };
        }
        done.map_err(|reason| TransportError::Connect { peer: member.name.clone(), reason })
    }

    /// One request to `target`; a failed connection is dropped so the next call redials.
    pub async fn call<Req: Serialize, Rep: DeserializeOwned>(
        &self,
        target: u64,
        member: &Member,
        kind: Kind,
        req: &Req,
    ) -> Result<Rep, TransportError> {
        let conn = self.conn(target, member).await?;
        match transport::call(&conn, kind as u8, &encode(req), PEER_MESSAGE_BYTES_MAX).await {
            Ok(bytes) => decode(&bytes),
            Err(e) => {
                PEER_METRICS.failures.with_label_values(&[&format!("{target:x}")]).inc();
                let mut conns = self.conns.lock().unwrap();
                if matches!(conns.get(&target), Some(Slot::Ready(c)) if c.stable_id() == conn.stable_id()) {
                    conns.remove(&target);
                }
                Err(e)
            }
        }
    }
}

/// Creates openraft's per-peer clients.
pub struct Network {
    pub peers: Arc<Peers>,
    /// This node's own role.
    pub role: Role,
    /// Whether this node leads with a quorum, told to followers on every AppendEntries.
    pub quorum: Arc<QuorumView>,
}

/// openraft's client for one peer.
pub struct Peer {
    peers: Arc<Peers>,
    target: u64,
    member: Member,
    /// This node's own role.
    role: Role,
    quorum: Arc<QuorumView>,
}

impl RaftNetworkFactory<TC> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Member) -> Self::Network {
        Peer { peers: self.peers.clone(), target, member: node.clone(), role: self.role, quorum: self.quorum.clone() }
    }
}

fn unreachable(e: TransportError) -> Unreachable<TC> {
    Unreachable::from_string(e.to_string())
}

impl Peer {
    async fn rpc<Req: Serialize, Rep: DeserializeOwned, E: std::fmt::Display>(
        &self,
        kind: Kind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Rep, RPCError<TC>>
    where
        Result<Rep, E>: DeserializeOwned,
    {
        let call = self.peers.call::<Req, Result<Rep, E>>(self.target, &self.member, kind, req);
        match tokio::time::timeout(option.soft_ttl(), call).await {
            Err(_) => Err(RPCError::Unreachable(Unreachable::from_string(format!(
                "{kind:?} to {} timed out",
                self.member.name
            )))),
            Ok(Err(e)) => Err(RPCError::Unreachable(unreachable(e))),
            Ok(Ok(Err(remote))) => Err(RPCError::Network(NetworkError::from_string(format!(
                "{} answered {kind:?} with: {remote}",
                self.member.name
            )))),
            Ok(Ok(Ok(rep))) => Ok(rep),
        }
    }
}

/// What the follower sends back for each AppendEntries of a stream.
pub type StreamAppendReply = Result<openraft::raft::StreamAppendResult<TC>, openraft::errors::Fatal<TC>>;

/// Aborts the task that feeds a replication stream once its replies are no longer wanted.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RaftNetworkV2<TC> for Peer {
    type SnapshotData = Vec<u8>;

    /// Replication over one QUIC stream: every request is written as soon as openraft yields
    /// it, so a write does not wait for the acknowledgement of the one before (over a WAN, the
    /// sequential default costs a whole extra round trip per commit). QUIC keeps the stream in
    /// order and the follower answers in order. A dead peer ends the stream through the
    /// connection's idle timeout.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> openraft::base::BoxFuture<
        's,
        Result<
            openraft::base::BoxStream<'s, Result<openraft::raft::StreamAppendResult<TC>, RPCError<TC>>>,
            RPCError<TC>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TC>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            let conn =
                self.peers.conn(self.target, &self.member).await.map_err(|e| RPCError::Unreachable(unreachable(e)))?;
            let (mut frames, replies) = transport::open_duplex(&conn, Kind::StreamAppend as u8)
                .await
                .map_err(|e| RPCError::Unreachable(unreachable(e)))?;
            let quorum = self.quorum.clone();
            let feed = tokio::spawn(async move {
                let mut input = input;
                while let Some(req) = futures::StreamExt::next(&mut input).await {
                    if frames.write(&encode(&Replicate { leads: quorum.leads(), req })).await.is_err() {
                        return;
                    }
                }
                frames.finish();
            });
            let name = self.member.name.clone();
            let out = futures::stream::unfold(Some((replies, AbortOnDrop(feed), name)), |state| async move {
                let (mut replies, feed, name) = state?;
                let reply = match replies.read(PEER_MESSAGE_BYTES_MAX).await {
                    Ok(None) => return None,
                    Ok(Some(bytes)) => decode::<StreamAppendReply>(&bytes),
                    Err(e) => Err(e),
                };
                match reply {
                    Ok(Ok(result)) => Some((Ok(result), Some((replies, feed, name)))),
                    Ok(Err(fatal)) => Some((
                        Err(RPCError::Network(NetworkError::from_string(format!("{name} stopped: {fatal}")))),
                        None,
                    )),
                    Err(e) => Some((Err(RPCError::Unreachable(unreachable(e))), None)),
                }
            });
            Ok(Box::pin(out) as openraft::base::BoxStream<'s, _>)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TC>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TC>, RPCError<TC>> {
        let frame = Replicate { leads: self.quorum.leads(), req: rpc };
        self.rpc::<_, _, openraft::errors::RaftError<TC>>(Kind::AppendEntries, &frame, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<TC>, option: RPCOption) -> Result<VoteResponse<TC>, RPCError<TC>> {
        self.rpc::<_, _, openraft::errors::RaftError<TC>>(Kind::Vote, &rpc, &option).await
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<TC>, option: RPCOption) -> Result<VoteResponse<TC>, RPCError<TC>> {
        self.rpc::<_, _, openraft::errors::RaftError<TC>>(Kind::PreVote, &rpc, &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TC>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TC>, RPCError<TC>> {
        self.rpc::<_, _, openraft::errors::Fatal<TC>>(Kind::TransferLeader, &req, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TC>,
        snapshot: SnapshotOf<TC, Vec<u8>>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TC>, StreamingError<TC>> {
        if self.role == Role::Witness {
            // A witness's snapshot has no data; sent to a data-bearing member it would erase
            // that member's key space. A member that needs a snapshot gets one from the data
            // voter the witness hands leadership to.
            return Err(StreamingError::Unreachable(Unreachable::from_string(format!(
                "a witness sends no snapshots ({} needs one from a data-bearing leader)",
                self.member.name
            ))));
        }
        let (meta, mut data) = (snapshot.meta, snapshot.snapshot);
        if self.member.role == super::MemberRole::Witness {
            // It keeps the auth store (it checks who may change the membership) and the
            // metadata: spare the link the key space.
            data = super::format::decode::<super::format::SnapshotData>(&data)
                .map(|full| super::format::encode(&full.only(geolock_core::storage::Cf::Auth)))
                .map_err(|e| StreamingError::Unreachable(Unreachable::from_string(format!("snapshot: {e}"))))?;
        }
        let total = data.len();
        let send = async {
            let mut offset = 0;
            loop {
                let end = (offset + SNAPSHOT_CHUNK_BYTES).min(total);
                let chunk = SnapshotChunk {
                    vote,
                    meta: meta.clone(),
                    offset: offset as u64,
                    total: total as u64,
                    data: data[offset..end].to_vec(),
                };
                let installed: Option<SnapshotResponse<TC>> =
                    self.rpc::<_, _, openraft::errors::Fatal<TC>>(Kind::SnapshotChunk, &chunk, &option).await?;
                if end == total {
                    return installed.ok_or_else(|| {
                        RPCError::Network(NetworkError::from_string(format!(
                            "{} did not install the snapshot",
                            self.member.name
                        )))
                    });
                }
                offset = end;
            }
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r.map_err(StreamingError::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(offset: u64, total: u64, data: &[u8]) -> SnapshotChunk {
        SnapshotChunk { vote: openraft::Vote::new(1, 1), meta: Default::default(), offset, total, data: data.to_vec() }
    }

    #[test]
    fn snapshot_pieces_reassemble_in_order_only() {
        let inbox = SnapshotInbox::default();
        assert_eq!(inbox.take(&piece(0, 6, b"abc")).unwrap(), None);
        assert_eq!(inbox.take(&piece(3, 6, b"def")).unwrap(), Some(b"abcdef".to_vec()));
        // A gap, or a piece past the end, drops what was assembled; a new start begins again.
        assert_eq!(inbox.take(&piece(0, 6, b"abc")).unwrap(), None);
        assert!(inbox.take(&piece(4, 6, b"ef")).is_err());
        assert!(inbox.take(&piece(3, 6, b"def")).is_err());
        assert_eq!(inbox.take(&piece(0, 4, b"ab")).unwrap(), None);
        assert!(inbox.take(&piece(2, 4, b"cde")).is_err());
        // An empty snapshot is whole at once; an oversized one is refused up front.
        assert_eq!(inbox.take(&piece(0, 0, b"")).unwrap(), Some(Vec::new()));
        assert!(inbox.take(&piece(0, PEER_SNAPSHOT_BYTES_MAX as u64 + 1, b"a")).is_err());
    }
}

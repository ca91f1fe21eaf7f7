//! The peer server: a member's answers to the other members over QUIC (openraft's RPCs, the
//! replication stream, snapshots, and the requests forwarded to the leader).

use std::sync::{Arc, Weak};

use openraft::async_runtime::watch::WatchReceiver;

use super::network::{self, Kind, RemoteError};
use super::{fence, quorum, Node, NodeError, TypeConfig};
use crate::config::Role;
use crate::transport;

/// Accept peers and answer their requests.
pub(super) async fn serve_peers(node: Weak<Node>) {
    let Some((transport, founders)) = node.upgrade().and_then(|n| Some((n.transport.clone()?, n.founders.clone())))
    else {
        return;
    };
    let members = {
        let node = node.clone();
        move || {
            let Some(n) = node.upgrade() else { return Vec::new() };
            let m = n.raft.metrics();
            let m = m.borrow_watched();
            let mut names: Vec<String> =
                m.membership_config.membership().nodes().map(|(_, n)| n.name.clone()).collect();
            if names.is_empty() {
                names = founders.clone();
            }
            names
        }
    };
    while let Some((conn, peer)) = transport.accept(&members).await {
        if let Some(n) = node.upgrade() {
            n.peers.accepted(&peer, &conn);
        }
        let node = node.clone();
        tokio::spawn(async move {
            let max = geolock_core::limits::PEER_MESSAGE_BYTES_MAX;
            while let Some(req) = transport::next_request(&conn, max, Kind::StreamAppend as u8).await {
                let req = match req {
                    Ok(transport::Incoming::Call(r)) => r,
                    Ok(transport::Incoming::Duplex { frames, replies, .. }) => {
                        let Some(n) = node.upgrade() else { return };
                        if n.fenced_epoch().is_some() {
                            continue;
                        }
                        tokio::spawn(n.answer_append_stream(frames, replies));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("peer {peer}: {e}");
                        continue;
                    }
                };
                let Some(n) = node.upgrade() else { return };
                tokio::spawn(async move {
                    let feeds_raft = !Kind::of(req.kind).is_some_and(fence::answered_when_fenced);
                    let _gate = match feeds_raft {
                        true => Some(n.failover_gate.read().await),
                        false => None,
                    };
                    // A fenced member is, to Raft, as if cut off: no answer at all.
                    if feeds_raft && n.fenced_epoch().is_some() {
                        return;
                    }
                    let reply = match Kind::of(req.kind) {
                        Some(kind) => n.answer_peer(kind, &req.body).await,
                        _ => Err(transport::TransportError::UnknownKind { kind: req.kind }),
                    };
                    match reply {
                        Ok(bytes) => {
                            let _ = req.reply(&bytes).await;
                        }
                        Err(e) => tracing::warn!("peer request: {e}"),
                    }
                });
            }
        });
    }
}

impl Node {
    /// Feed a leader's stream of AppendEntries to Raft and send back its answers, in order,
    /// until either side ends the stream.
    async fn answer_append_stream(
        self: Arc<Self>,
        frames: transport::FrameReader,
        mut replies: transport::FrameWriter,
    ) {
        use futures::StreamExt;
        let requests = futures::stream::unfold((frames, self.clone()), |(mut frames, me)| async move {
            match frames.read(geolock_core::limits::PEER_MESSAGE_BYTES_MAX).await {
                // A stream opened before the fence ends at it: no entry is taken after.
                Ok(Some(_)) if me.fenced_epoch().is_some() => None,
                Ok(Some(bytes)) => {
                    match network::decode::<quorum::Replicate<openraft::raft::AppendEntriesRequest<TypeConfig>>>(&bytes)
                    {
                        Ok(frame) => {
                            if frame.leads {
                                me.leader_heard();
                            }
                            Some((frame.req, (frames, me)))
                        }
                        Err(e) => {
                            tracing::warn!("replication stream: {e}");
                            None
                        }
                    }
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!("replication stream: {e}");
                    None
                }
            }
        });
        let answers = self.raft.stream_append(requests);
        let mut answers = std::pin::pin!(answers);
        while let Some(answer) = answers.next().await {
            let stop = answer.is_err();
            let answer: network::StreamAppendReply = answer;
            // An entry taken just before a fence is not acknowledged after it.
            let _gate = self.failover_gate.read().await;
            if self.fenced_epoch().is_some() {
                return;
            }
            if replies.write(&network::encode(&answer)).await.is_err() || stop {
                return;
            }
        }
        replies.finish();
    }

    /// Answer one request from a peer.
    async fn answer_peer(self: &Arc<Self>, kind: Kind, body: &[u8]) -> Result<Vec<u8>, transport::TransportError> {
        use network::{decode, encode};
        let remote = |e: NodeError| RemoteError::from(&e);
        Ok(match kind {
            Kind::AppendEntries => {
                let frame: quorum::Replicate<openraft::raft::AppendEntriesRequest<TypeConfig>> = decode(body)?;
                if frame.leads {
                    self.leader_heard();
                }
                encode(&self.raft.append_entries(frame.req).await)
            }
            Kind::StreamAppend => return Err(transport::TransportError::NotACall { kind: Kind::StreamAppend as u8 }),
            Kind::Vote => encode(&self.raft.vote(decode(body)?).await),
            Kind::PreVote => encode(&self.raft.pre_vote(decode(body)?).await),
            Kind::SnapshotChunk => {
                let chunk: network::SnapshotChunk = decode(body)?;
                match self.snapshot_inbox.take(&chunk)? {
                    None => encode(&Ok::<_, openraft::errors::Fatal<TypeConfig>>(
                        None::<openraft::raft::SnapshotResponse<TypeConfig>>,
                    )),
                    Some(snapshot) if snapshot.is_empty() && self.role != Role::Witness => {
                        tracing::warn!(
                            "refused a snapshot without data (a witness's): installing it would erase the key space"
                        );
                        return Err(transport::TransportError::SnapshotWithoutData);
                    }
                    Some(snapshot) => {
                        let meta = chunk.meta;
                        tracing::info!(
                            "installing a snapshot of {} bytes up to {:?}",
                            snapshot.len(),
                            meta.last_log_id
                        );
                        let snapshot = openraft::Snapshot { meta, snapshot };
                        encode(&self.raft.install_full_snapshot(chunk.vote, snapshot).await.map(Some))
                    }
                }
            }
            Kind::ChangeMembers => encode(&self.change_members_here(decode(body)?).await.map_err(remote)),
            Kind::TransferLeader => encode(&self.raft.handle_transfer_leader(decode(body)?).await),
            Kind::ForwardWrite => encode(&self.propose_here(decode(body)?).await.map_err(remote)),
            Kind::ReadIndex => encode(&self.read_index_here().await.map_err(remote)),
            Kind::WitnessPurge => encode(&self.witness_purge(decode(body)?).await.map_err(remote)),
            Kind::LogState => encode(&self.last_log_id()),
            Kind::Lag => encode(&Ok::<_, RemoteError>(self.lags_here())),
            Kind::View => encode(&Ok::<_, RemoteError>(self.view_here())),
            Kind::LeaseKeepAlive => encode(&self.lease_keep_alive_here(decode(body)?).map_err(remote)),
            Kind::LeaseTimeToLive => {
                let (id, keys): (i64, bool) = decode(body)?;
                encode(&self.lease_time_to_live_here(id, keys).map_err(remote))
            }
        })
    }
}

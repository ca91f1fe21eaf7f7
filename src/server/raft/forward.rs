//! Which member answers: this one when it leads, else the leader, asked over the peer
//! transport. Every request only the leader can answer goes through [`Node::on_leader`]; waiting
//! out an election goes through [`Node::with_leader`] and [`Node::with_leader_idempotent`].

use std::future::Future;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::network::{Kind, RemoteError};
use super::quorum::Leadership;
use super::{now_ms, Member, Node, NodeError, TypeConfig};

impl Node {
    /// Answer a request only the leader can answer: `here` when this member leads, else the
    /// leader's answer to a `kind` request carrying `req`, waited for at most `wait` (a leader
    /// that does not answer by then has most likely been replaced, and the caller asks again).
    pub(super) async fn on_leader<Req: Serialize, Rep: DeserializeOwned, F: Future<Output = Result<Rep, NodeError>>>(
        &self,
        kind: Kind,
        req: &Req,
        wait: Duration,
        here: impl FnOnce() -> F,
    ) -> Result<Rep, NodeError> {
        let Some((leader, member)) = self.leader()? else { return here().await };
        let call = self.peers.call::<_, Result<Rep, RemoteError>>(leader, &member, kind, req);
        match tokio::time::timeout(wait, call).await {
            Err(_) => Err(NodeError::Timeout),
            Ok(Err(e)) => Err(NodeError::Peer(e)),
            Ok(Ok(rep)) => rep.map_err(NodeError::from),
        }
    }

    /// Run `attempt` until it is not refused for want of a leader: during an election a request
    /// waits for the outcome, as etcd's do, rather than failing at once. Only refusals are tried
    /// again: a request refused as "not leader" or "no leader" was never proposed, so it cannot
    /// take effect twice.
    pub(super) async fn with_leader<T, F: std::future::Future<Output = Result<T, NodeError>>>(
        &self,
        attempt: impl FnMut() -> F,
    ) -> Result<T, NodeError> {
        self.retry_until_led(attempt, |e| matches!(e, NodeError::NotLeader { .. } | NodeError::NoLeader)).await
    }

    /// As [`Node::with_leader`], for a request that may run twice (a read index, a keep-alive, a
    /// time-to-live): also tried again when the leader could not be reached or did not answer in
    /// time, which is how a leader change looks from a member that was talking to the old one.
    /// etcd's server retries its lease renewals to the leader the same way.
    pub(super) async fn with_leader_idempotent<T, F: std::future::Future<Output = Result<T, NodeError>>>(
        &self,
        attempt: impl FnMut() -> F,
    ) -> Result<T, NodeError> {
        self.retry_until_led(attempt, NodeError::is_transient).await
    }

    async fn retry_until_led<T, F: std::future::Future<Output = Result<T, NodeError>>>(
        &self,
        mut attempt: impl FnMut() -> F,
        retry: impl Fn(&NodeError) -> bool,
    ) -> Result<T, NodeError> {
        let deadline = tokio::time::Instant::now() + self.election_timeout * 3;
        loop {
            match attempt().await {
                Err(e) if retry(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!("waiting for a leader: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// The leader, if it is another member (`None` if this node leads).
    pub(super) fn leader(&self) -> Result<Option<(u64, Member)>, NodeError> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        match self.live_leader(&m) {
            None => Err(NodeError::NoLeader),
            Some(l) if l == self.id => Ok(None),
            Some(l) => match m.membership_config.membership().get_node(&l) {
                Some(member) => Ok(Some((l, member.clone()))),
                None => Err(NodeError::NoLeader),
            },
        }
    }

    /// The leader as this member knows it now: itself if it leads with a quorum (see
    /// [`super::quorum`]), another member only if that one's AppendEntries or heartbeats, sent while it
    /// held a quorum, arrived within an election timeout. openraft keeps a dead or cut-off
    /// leader as the current one until a new one is elected (which may take a witness's help);
    /// etcd's members, like this, report no leader once they stop hearing from a live one.
    pub(super) fn live_leader(&self, m: &openraft::RaftMetrics<TypeConfig>) -> Option<u64> {
        match m.current_leader {
            Some(l) if l == self.id => (self.quorum.of(m) == Leadership::Leads).then_some(l),
            Some(l) => {
                let heard = self.leader_contact_ms.load(std::sync::atomic::Ordering::Relaxed);
                (now_ms().saturating_sub(heard) <= self.election_timeout.as_millis() as u64).then_some(l)
            }
            None => None,
        }
    }

    /// Note that the leader was just heard from.
    pub(super) fn leader_heard(&self) {
        self.leader_contact_ms.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn not_leader(&self) -> NodeError {
        match self.live_leader(&self.raft.metrics().borrow_watched()) {
            Some(l) => NodeError::NotLeader { leader: Some(l) },
            None => NodeError::NoLeader,
        }
    }
}

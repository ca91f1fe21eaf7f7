//! Membership changes, as etcd's Cluster API and `Maintenance.MoveLeader` ask for them. Every
//! change is made by the leader (a follower forwards it); a new member always joins as a learner
//! and becomes a voter only once it has caught up, so adding a member never weakens the quorum
//! of the members that hold the data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};

use super::network::Kind;
use super::node::PROPOSE_TIMEOUT;
use super::{Member, Node, NodeError};
use geolock_core::limits::{LEARNER_CATCH_UP_WAIT, LEARNER_IN_SYNC_PERCENT};

/// A membership change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MemberChange {
    /// Add a member as a learner; unless `learner`, promote it once it has caught up.
    Add { id: u64, member: Member, learner: bool },
    /// Make a caught-up learner a voter.
    Promote { id: u64 },
    /// Take a member out of the cluster.
    Remove { id: u64 },
    /// New peer URLs for a member.
    Update { id: u64, peer_urls: Vec<String>, peer_addr: String },
    /// A member states its own addresses, role and region (etcd's "publish" on start).
    Publish { id: u64, member: Member },
    /// Hand leadership to a voter.
    MoveLeader { to: u64 },
}

/// Why a membership change was refused; messages are etcd's where etcd has one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MemberError {
    #[error("etcdserver: member ID already exist")]
    Exists,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: member not found")]
    NotFound,
    #[error("etcdserver: can only promote a learner member")]
    NotLearner,
    #[error(
        "etcdserver: can only promote a learner member which is in sync with leader \
         (it has {matched} of {last} entries; learner_in_sync_percent {percent})"
    )]
    LearnerNotReady { matched: u64, last: u64, percent: u64 },
    #[error("etcdserver: bad leader transferee")]
    BadTransferee,
    #[error(
        "etcdserver: re-configuration failed due to not enough started members (the last voter cannot be removed)"
    )]
    LastVoter,
    #[error("etcdserver: another membership change is in progress, retry")]
    InProgress,
    #[error("etcdserver: leader transfer to {to:x} did not complete within {waited_ms} ms")]
    TransferTimeout { to: u64, waited_ms: u64 },
}

impl Node {
    /// Make a membership change: here if this node leads, else through the leader. Returns once
    /// this node has applied the change (so a member list read here shows it).
    pub async fn change_members(self: &Arc<Self>, change: MemberChange) -> Result<(), NodeError> {
        // Leadership may be changing hands: a leader asked to remove itself hands over first and
        // answers "not leader".
        self.with_leader(|| self.change_members_once(change.clone())).await
    }

    async fn change_members_once(self: &Arc<Self>, change: MemberChange) -> Result<(), NodeError> {
        let removes_me = matches!(change, MemberChange::Remove { id } if id == self.id);
        let here = || self.change_members_here(change.clone());
        let index = self.on_leader(Kind::ChangeMembers, &change, PROPOSE_TIMEOUT, here).await?;
        if removes_me {
            // The leader replicates nothing more to a member it removed.
            return Ok(());
        }
        self.wait_applied(index).await
    }

    /// Make the change on this node, which must lead. Returns the log index that carries it.
    pub(super) async fn change_members_here(self: &Arc<Self>, change: MemberChange) -> Result<u64, NodeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let (voters, nodes) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            let membership = m.membership_config.membership();
            let voters: BTreeSet<u64> = membership.voter_ids().collect();
            let nodes: BTreeMap<u64, Member> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
            (voters, nodes)
        };
        let found = |id: u64| nodes.get(&id).cloned().ok_or(NodeError::Member(MemberError::NotFound));
        let change = match change {
            MemberChange::Add { id, member, learner } => {
                return self.add_member(id, member, learner, &nodes, voters.len()).await
            }
            MemberChange::Promote { id } => {
                found(id)?;
                if voters.contains(&id) {
                    return Err(MemberError::NotLearner.into());
                }
                self.learner_in_sync(id)?;
                warn_if_even(voters.len() + 1);
                ChangeMembers::AddVoterIds(BTreeSet::from([id]))
            }
            MemberChange::Remove { id } => {
                found(id)?;
                if id == self.id {
                    // openraft's own step-down could pick any voter, a witness too: hand over
                    // to the voter with the most of the log, and let the new leader remove us.
                    self.hand_over_leadership().await;
                    return Err(self.not_leader());
                }
                if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(MemberError::LastVoter.into());
                    }
                    warn_if_even(voters.len() - 1);
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                }
            }
            MemberChange::Update { id, peer_urls, peer_addr } => {
                let mut member = found(id)?;
                if nodes.iter().any(|(other, n)| *other != id && n.peer_addr == peer_addr) {
                    return Err(MemberError::PeerUrlExists.into());
                }
                member.peer_urls = peer_urls;
                member.peer_addr = peer_addr;
                ChangeMembers::SetNodes(BTreeMap::from([(id, member)]))
            }
            MemberChange::Publish { id, member } => {
                if found(id)? == member {
                    return Ok(0);
                }
                ChangeMembers::SetNodes(BTreeMap::from([(id, member)]))
            }
            MemberChange::MoveLeader { to } => {
                if !voters.contains(&to) || nodes.get(&to).is_some_and(|n| n.role == super::MemberRole::Witness) {
                    return Err(MemberError::BadTransferee.into());
                }
                if to != self.id {
                    self.transfer_leadership(to).await?;
                }
                return Ok(0);
            }
        };
        // retain = false: a removed voter leaves the cluster rather than staying on as a learner.
        self.write_membership(self.raft.change_membership(change, false)).await
    }

    /// Add member `id` as a learner; unless `learner`, promote it once it has caught up.
    async fn add_member(
        self: &Arc<Self>,
        id: u64,
        member: Member,
        learner: bool,
        nodes: &BTreeMap<u64, Member>,
        voters: usize,
    ) -> Result<u64, NodeError> {
        if nodes.contains_key(&id) {
            return Err(MemberError::Exists.into());
        }
        if nodes.values().any(|n| n.peer_addr == member.peer_addr) {
            return Err(MemberError::PeerUrlExists.into());
        }
        let index = self.write_membership(self.raft.add_learner(id, member, false)).await?;
        if !learner {
            tokio::spawn(promote_when_caught_up(Arc::downgrade(self), id));
        }
        warn_if_even(voters);
        Ok(index)
    }

    async fn write_membership(
        &self,
        call: impl std::future::Future<
            Output = Result<
                openraft::raft::ClientWriteResponse<super::TypeConfig>,
                RaftError<super::TypeConfig, ClientWriteError<super::TypeConfig>>,
            >,
        >,
    ) -> Result<u64, NodeError> {
        match tokio::time::timeout(PROPOSE_TIMEOUT, call).await {
            Err(_) => Err(NodeError::Timeout),
            Ok(Ok(resp)) => Ok(resp.log_id.index),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Whether learner `id` has replicated enough of the leader's log to vote (etcd's rule: at
    /// least 90 % of it).
    fn learner_in_sync(&self, id: u64) -> Result<(), NodeError> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map_or(0, |l| l.index);
        if matched == 0 || matched * 100 < last * LEARNER_IN_SYNC_PERCENT {
            return Err(MemberError::LearnerNotReady { matched, last, percent: LEARNER_IN_SYNC_PERCENT }.into());
        }
        Ok(())
    }

    /// Hand leadership to voter `to` and wait until it leads: for as long as etcd's request
    /// timeout (its `ReqTimeout`, 5 s plus two election timeouts), which bounds etcd's own
    /// MoveLeader wait besides the client's deadline. Three election timeouts, the wait before,
    /// timed out under the load of a full test run (the transferee must catch up and win a
    /// vote on a machine shared with a dozen clusters).
    pub(super) async fn transfer_leadership(&self, to: u64) -> Result<(), NodeError> {
        self.refuse_if_fenced()?;
        self.raft.trigger().transfer_leader(to).await.map_err(|_| NodeError::Stopped)?;
        let waited = Duration::from_secs(5) + self.election_timeout * 2;
        self.raft
            .wait(Some(waited))
            .metrics(|m| m.current_leader == Some(to), "leadership transferred")
            .await
            .map(|_| ())
            .map_err(|_| MemberError::TransferTimeout { to, waited_ms: waited.as_millis() as u64 }.into())
    }

    /// Wait (up to `limit`) until this member is ready to serve, as etcd's members are once they
    /// have published themselves: its own addresses are in the membership, and it has applied
    /// everything the cluster had committed of its log when it started, so that no read here
    /// shows an older state than one it showed before a restart (the commit index is not kept
    /// on disk: saving it on every commit cost each write a storage write).
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut rx = self.published.subscribe();
        let published = tokio::time::timeout_at(deadline, rx.wait_for(|p| *p)).await.is_ok_and(|r| r.is_ok());
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        published && self.raft.wait_for_recovery(Some(left)).await.is_ok()
    }

    /// State this node's own addresses, role and region in the membership once a leader is
    /// known, as etcd's members publish theirs on start: a member added by MemberAdd is known
    /// only by its peer URL until it does.
    pub(super) async fn publish_self(node: Weak<Node>, me: Member) {
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let Some(node) = node.upgrade() else { return };
            let current = {
                let m = node.raft.metrics();
                let m = m.borrow_watched();
                if m.state == ServerState::Shutdown {
                    return;
                }
                if m.current_leader.is_none() {
                    continue;
                }
                m.membership_config.membership().get_node(&node.id).cloned()
            };
            match current {
                None => continue,
                Some(c) if c == me => {
                    node.published.send_replace(true);
                    return;
                }
                Some(_) => {}
            }
            match node.change_members(MemberChange::Publish { id: node.id, member: me.clone() }).await {
                Ok(()) => {
                    tracing::info!("published this member's addresses to the cluster");
                    node.published.send_replace(true);
                    return;
                }
                Err(e) => tracing::debug!("publish: {e}"),
            }
        }
    }
}

fn warn_if_even(voters: usize) {
    if voters.is_multiple_of(2) {
        tracing::warn!(
            "the cluster will have {voters} voters: an even count tolerates no more failures than one voter fewer; add or remove one more"
        );
    }
}

/// Promote learner `id` once it is in sync (MemberAdd without `is_learner`), giving up after
/// [`LEARNER_CATCH_UP_WAIT`] or when this node stops leading.
async fn promote_when_caught_up(node: Weak<Node>, id: u64) {
    let deadline = tokio::time::Instant::now() + LEARNER_CATCH_UP_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(node) = node.upgrade() else { return };
        if !node.is_leader() {
            return;
        }
        if node.learner_in_sync(id).is_err() {
            continue;
        }
        let still_learner = {
            let m = node.raft.metrics();
            let m = m.borrow_watched();
            let membership = m.membership_config.membership();
            membership.get_node(&id).is_some() && !membership.voter_ids().any(|v| v == id)
        };
        if !still_learner {
            return;
        }
        let promote = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        match node.write_membership(node.raft.change_membership(promote, false)).await {
            Ok(_) => {
                tracing::info!("promoted member {id:x}, which has caught up");
                return;
            }
            Err(e) => tracing::debug!("promote {id:x}: {e}"),
        }
    }
    tracing::warn!("member {id:x} did not catch up within {LEARNER_CATCH_UP_WAIT:?}; it stays a learner");
}

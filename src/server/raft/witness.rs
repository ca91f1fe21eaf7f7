//! The witness (DESIGN.md "The witness on openraft"): a voter that keeps no key space. openraft
//! sees an ordinary voter; this module keeps the witness's log short and lets it lead only to
//! hand leadership over.
//!
//! - The leader computes W, the highest index every data-bearing voter has flushed, and tells
//!   each witness; the witness snapshots its metadata and purges its log up to W. A stale W only
//!   makes it keep more. While a data voter is down W stands still, and past
//!   [`WITNESS_LOG_ENTRIES_ALARM`] entries the leader raises an alarm rather than purge.
//! - A supervisor on the witness campaigns only when there has been no leader for
//!   [`WITNESS_TAKEOVER_ELECTION_TIMEOUTS`] election timeouts, it can reach a data voter, and its
//!   log is ahead of every data voter it reaches: the entries only it still holds must reach a
//!   data voter. As leader it waits until the most up-to-date data voter holds its whole log,
//!   then hands leadership to it.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::async_runtime::watch::WatchReceiver;
use openraft::type_config::alias::LogIdOf;
use openraft::ServerState;

use super::network::Kind;
use super::{Node, NodeError, TypeConfig};
use crate::config::Role;
use geolock_core::limits::{WITNESS_LOG_ENTRIES_ALARM, WITNESS_PURGE_INTERVAL, WITNESS_TAKEOVER_ELECTION_TIMEOUTS};

type LogId = LogIdOf<TypeConfig>;

/// The highest log index every one of `data_voters` has confirmed, given what each has
/// confirmed (`None`: nothing yet, or unknown). `None` while any of them has confirmed nothing.
pub(super) fn confirmed_by_all(data_voters: &[u64], confirmed: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    data_voters.iter().map(|id| confirmed(*id)).min().flatten()
}

/// Whether a witness should lead for a while: it reaches at least one data voter, and its log is
/// ahead of the log of every data voter it reaches.
pub(super) fn should_step_in(mine: &Option<LogId>, reachable: &[Option<LogId>]) -> bool {
    !reachable.is_empty() && reachable.iter().all(|theirs| mine > theirs)
}

impl Node {
    /// Voters of the membership that hold data, and those that are witnesses.
    pub(super) fn voters_by_kind(&self) -> (Vec<u64>, Vec<u64>) {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .partition(|id| membership.get_node(id).is_none_or(|n| n.role != super::MemberRole::Witness))
    }

    /// The voter sets of the newest membership this member knows: one, or two during a joint
    /// change.
    pub fn voter_configs(&self) -> Vec<Vec<u64>> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.membership_config.membership().get_joint_config().iter().map(|c| c.iter().copied().collect()).collect()
    }

    /// This member's last log id.
    pub(super) fn last_log_id(&self) -> Option<LogId> {
        self.raft.data_metrics().borrow_watched().last_log
    }

    /// On a witness: keep only the log after `upto`, the index every data voter has confirmed.
    pub(super) async fn witness_purge(&self, upto: u64) -> Result<(), NodeError> {
        if self.role != Role::Witness {
            return Err(NodeError::Role { role: self.role, what: "witness log purges" });
        }
        let (applied, snapshot) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.last_applied.as_ref().map(|l| l.index), m.snapshot.as_ref().map(|l| l.index))
        };
        // openraft purges only what a snapshot covers: a witness's snapshot is its metadata, so
        // taking one costs nothing, and the purge follows it (up to `upto`, never past it).
        if applied > snapshot {
            self.raft.trigger().snapshot().await.map_err(|_| NodeError::Stopped)?;
        }
        self.raft.trigger().purge_log(upto).await.map_err(|_| NodeError::Stopped)
    }
}

/// On the leader: every [`WITNESS_PURGE_INTERVAL`], tell each witness how far every data voter
/// has confirmed the log.
pub(super) async fn tell_witnesses(node: Weak<Node>) {
    let mut alarmed_at: Option<Instant> = None;
    loop {
        tokio::time::sleep(WITNESS_PURGE_INTERVAL).await;
        let Some(node) = node.upgrade() else { return };
        if node.role == Role::Witness || !node.is_leader() {
            continue;
        }
        let (data, witnesses) = node.voters_by_kind();
        if witnesses.is_empty() {
            continue;
        }
        let (upto, last, behind) = {
            let m = node.raft.metrics();
            let m = m.borrow_watched();
            let replication = m.replication.clone().unwrap_or_default();
            let confirmed = |id: u64| replication.get(&id).cloned().flatten().map(|l| l.index);
            let upto = confirmed_by_all(&data, confirmed);
            let last = m.last_log_index.unwrap_or(0);
            let behind: BTreeSet<u64> = data.iter().copied().filter(|id| confirmed(*id) == upto).collect();
            (upto, last, behind)
        };
        let kept = last.saturating_sub(upto.unwrap_or(0));
        if kept > WITNESS_LOG_ENTRIES_ALARM && alarmed_at.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            alarmed_at = Some(Instant::now());
            tracing::warn!(
                "alarm: witnesses keep {kept} log entries (witness_log_entries_alarm {WITNESS_LOG_ENTRIES_ALARM}): \
                 data voters {behind:x?} have confirmed only up to index {upto:?}; the witnesses cannot purge until they do"
            );
        }
        let Some(upto) = upto else { continue };
        for w in witnesses {
            let Some(member) = node.member_record(w) else { continue };
            let n = node.clone();
            tokio::spawn(async move {
                let call =
                    n.peers.call::<_, Result<(), super::network::RemoteError>>(w, &member, Kind::WitnessPurge, &upto);
                match tokio::time::timeout(WITNESS_PURGE_INTERVAL, call).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => tracing::debug!("witness {} purge to {upto}: {e}", member.name),
                    Ok(Err(e)) => tracing::debug!("witness {} purge to {upto}: {e}", member.name),
                    Err(_) => tracing::debug!("witness {} purge to {upto}: no answer", member.name),
                }
            });
        }
    }
}

/// On a witness: step in when the data voters cannot elect a leader without the entries only
/// the witness holds, and hand leadership to a data voter as soon as it holds them.
pub(super) async fn supervise(node: Weak<Node>, election_timeout: Duration) {
    let tick = election_timeout / 4;
    let patience = election_timeout * WITNESS_TAKEOVER_ELECTION_TIMEOUTS;
    let mut leader_seen = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let Some(node) = node.upgrade() else { return };
        let (state, leader) = {
            let m = node.raft.metrics();
            let m = m.borrow_watched();
            (m.state, node.live_leader(&m))
        };
        if state == ServerState::Shutdown {
            return;
        }
        if state == ServerState::Leader {
            hand_over(&node).await;
            leader_seen = Instant::now();
            continue;
        }
        if leader.is_some() {
            leader_seen = Instant::now();
            continue;
        }
        if leader_seen.elapsed() < patience {
            continue;
        }
        let (data, _) = node.voters_by_kind();
        let asks = data.into_iter().filter(|id| *id != node.id).filter_map(|id| {
            let member = node.member_record(id)?;
            let n = node.clone();
            Some(async move {
                let call = n.peers.call::<_, Option<LogId>>(id, &member, Kind::LogState, &());
                tokio::time::timeout(election_timeout / 2, call).await.ok()?.ok()
            })
        });
        let reachable: Vec<Option<LogId>> = futures::future::join_all(asks).await.into_iter().flatten().collect();
        let mine = node.last_log_id();
        // A fenced witness takes no part in Raft, not even to hand entries over.
        if node.fenced_epoch().is_some() {
            return;
        }
        if should_step_in(&mine, &reachable) {
            tracing::info!(
                "no leader for {:?}, and this witness holds entries up to {mine:?} that the data voters it reaches \
                 lack ({reachable:?}): leading to hand them over",
                leader_seen.elapsed()
            );
            if node.raft.trigger().elect(true).await.is_err() {
                return;
            }
            leader_seen = Instant::now();
        }
    }
}

/// As a witness that leads: once the most up-to-date data voter holds the whole log, make it
/// the leader.
async fn hand_over(node: &Arc<Node>) {
    let (data, _) = node.voters_by_kind();
    let (target, holds_all) = {
        let m = node.raft.metrics();
        let m = m.borrow_watched();
        let replication = m.replication.clone().unwrap_or_default();
        let last = m.last_log_index;
        let best = data
            .iter()
            .filter(|id| **id != node.id)
            .map(|id| (*id, replication.get(id).cloned().flatten().map(|l| l.index)))
            .max_by_key(|(_, matched)| *matched);
        match best {
            Some((id, matched)) => (id, matched >= last),
            None => return,
        }
    };
    if !holds_all {
        return;
    }
    match node.transfer_leadership(target).await {
        Ok(()) => tracing::info!("witness handed leadership to data voter {target:x}, which holds every entry"),
        Err(e) => tracing::warn!("witness hand-over to {target:x}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(term: u64, index: u64) -> Option<LogId> {
        Some(openraft::testing::log_id::<TypeConfig>(term, 1, index))
    }

    #[test]
    fn purge_point_is_what_every_data_voter_confirmed() {
        let confirmed = |id: u64| match id {
            1 => Some(40),
            2 => Some(35),
            3 => Some(50),
            _ => None,
        };
        assert_eq!(confirmed_by_all(&[1, 2, 3], confirmed), Some(35));
        // One data voter that confirmed nothing (down since before it joined): keep everything.
        assert_eq!(confirmed_by_all(&[1, 2, 3, 4], confirmed), None);
        assert_eq!(confirmed_by_all(&[], confirmed), None);
    }

    #[test]
    fn a_witness_steps_in_only_ahead_of_every_reachable_data_voter() {
        let mine = log_id(3, 120);
        assert!(should_step_in(&mine, &[log_id(3, 100), log_id(2, 130)]));
        // A data voter as far along: it can lead without the witness.
        assert!(!should_step_in(&mine, &[log_id(3, 100), log_id(3, 120)]));
        assert!(!should_step_in(&mine, &[log_id(4, 1)]));
        // No data voter reachable: leading would help nobody.
        assert!(!should_step_in(&mine, &[]));
        assert!(should_step_in(&mine, &[None]));
    }
}

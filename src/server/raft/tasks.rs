//! The work a member does beside answering requests, as [`Task`]s; `roles` lists which each
//! role runs.

use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use super::quorum::Leadership;
use super::{now_ms, peer_server, witness, Node};
use geolock_core::limits::LEASE_EXPIRIES_PER_PROPOSAL_MAX;
use geolock_core::machine::Command;

/// A background task of a member. Each runs until the [`Node`] is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Answer the other members over the peer transport (none without one).
    PeerServer,
    /// Follow this member's leadership: lease expiry, and members' lag while leading.
    Leadership,
    /// While leading, tell witnesses how far every data voter holds the log.
    WitnessPurgePoint,
    /// On a witness: campaign when only it can bring the data voters' logs up to date.
    WitnessSupervisor,
    /// A snapshot at least every `SNAPSHOT_INTERVAL`.
    Snapshots,
    /// State this member's addresses, role and region in the membership.
    Publish,
    /// Progress notifications for watchers that asked for them, every `every`.
    WatchProgress { every: Duration },
    /// While leading an active-passive primary, renew the region write lease.
    WriteLease,
    /// Each second, sample the peer connections' traffic and round-trip times for metrics.
    PeerMetrics,
}

impl Node {
    /// Start `task` in the background.
    pub fn spawn(self: &Arc<Self>, task: Task) {
        let node = Arc::downgrade(self);
        match task {
            Task::PeerServer => tokio::spawn(peer_server::serve_peers(node)),
            Task::Leadership => tokio::spawn(leadership_loop(node)),
            Task::WitnessPurgePoint => tokio::spawn(witness::tell_witnesses(node)),
            Task::WitnessSupervisor => tokio::spawn(witness::supervise(node, self.election_timeout)),
            Task::Snapshots => tokio::spawn(snapshot_loop(node)),
            Task::Publish => tokio::spawn(Node::publish_self(node, self.me.clone())),
            Task::WatchProgress { every } => tokio::spawn(progress_notify_loop(node, every)),
            Task::WriteLease => tokio::spawn(super::write_lease::renew_loop(node)),
            Task::PeerMetrics => tokio::spawn(peer_metrics_loop(node)),
        };
    }
}

/// Follows this node's leadership: a new leader takes over lease expiry (granting every lease a
/// full TTL plus an election timeout), and while leading it revokes expired leases. A leader
/// that no quorum has acknowledged within the lease stops here too (see `quorum`): it hands
/// expiry back, so that it neither expires leases nobody could renew while no side had a
/// majority, nor keeps clocks the next leader will reset anyway.
async fn leadership_loop(node: Weak<Node>) {
    let tick = Duration::from_millis(50);
    let mut leading = false;
    let mut was = Leadership::Follows;
    let mut leader_seen = None;
    loop {
        tokio::time::sleep(tick).await;
        let Some(node) = node.upgrade() else { return };
        // As etcd counts them: every change to a new known leader, the first one included.
        let leader = node.raft.metrics().borrow_watched().current_leader;
        if leader.is_some() && leader != leader_seen {
            leader_seen = leader;
            super::metrics::LEADER_CHANGES.inc();
        }
        let now = node.quorum.leadership();
        match (was, now) {
            (Leadership::Leads, Leadership::LostQuorum { since_ack }) => tracing::warn!(
                "stepping down: no quorum acknowledged this leader within {:?} (last {:?} ago); it answers no \
                 keep-alive, lease or status query as leader until one does or another member is elected",
                node.quorum.lease(),
                since_ack
            ),
            (Leadership::LostQuorum { .. }, Leadership::Leads) => {
                tracing::info!("a quorum acknowledges this leader again")
            }
            _ => {}
        }
        was = now;
        let now_leader = now == Leadership::Leads;
        if now_leader != leading {
            leading = now_leader;
            node.lag.lock().unwrap().clear();
            let mut st = node.shared.lock();
            if leading {
                st.machine.leases.promote(now_ms(), node.election_timeout.as_millis() as u64);
            } else {
                st.machine.leases.demote();
            }
        }
        if !leading {
            continue;
        }
        let last = node.raft.metrics().borrow_watched().last_log_index.unwrap_or(0);
        node.lag.lock().unwrap().record(last, now_ms());
        let expired = node.shared.lock().machine.leases.take_expired(
            now_ms(),
            node.election_timeout.as_millis() as u64,
            LEASE_EXPIRIES_PER_PROPOSAL_MAX,
        );
        for id in expired {
            super::metrics::LEASES_EXPIRED.inc();
            let n = node.clone();
            tokio::spawn(async move {
                if let Err(e) = n.propose(Command::LeaseRevoke { id }).await {
                    tracing::debug!("expire lease {id:x}: {e}");
                }
            });
        }
    }
}

/// A snapshot at least every [`SNAPSHOT_INTERVAL`], however few entries were applied, so the
/// log behind it can be purged on a quiet cluster too.
async fn snapshot_loop(node: Weak<Node>) {
    let mut ticker = tokio::time::interval(geolock_core::limits::SNAPSHOT_INTERVAL);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else { return };
        if let Err(e) = node.raft.trigger().snapshot().await {
            tracing::warn!("hourly snapshot: {e}");
        }
    }
}

/// Samples the peer connections for metrics each second: etcd's peer prober also measures
/// round trips about once a second.
async fn peer_metrics_loop(node: Weak<Node>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else { return };
        let ids: Vec<(u64, String)> = node.members().into_iter().map(|m| (m.id, m.name)).collect();
        node.peers.sample_metrics(&ids);
    }
}

/// Progress notifications for watchers that asked for them.
async fn progress_notify_loop(node: Weak<Node>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else { return };
        let mut st = node.shared.lock();
        let st = &mut *st;
        let out = st.hub.progress_tick(&st.machine.kv);
        st.deliver(out);
    }
}

//! CheckQuorum on our side of openraft: which member may answer for the cluster's current state.
//!
//! openraft already refuses proposals on a leader that no quorum has acknowledged within its
//! leader lease (`election_timeout_max`), but it keeps such a leader in `ServerState::Leader`
//! (it cannot step down without raising its term; see openraft's `docs::protocol::check_quorum`).
//! Answers that do not go through the log — lease keep-alives and time-to-live, the leader in
//! Maintenance.Status, the lessor's expiry clock — used that state alone, so a leader cut off
//! from the majority kept acknowledging keep-alives for leases the new majority had already
//! revoked. etcd's leader steps down when it has not heard from a quorum for an election
//! timeout (the Raft library's `CheckQuorum`, which etcd's server always turns on).
//!
//! Here a member *leads* only while openraft says it is leader **and** a quorum acknowledged one
//! of its AppendEntries sent within the last `lease`. A follower counts the leader as live only
//! from replication frames that say the sender led so at sending time ([`Replicate`]), so the
//! followers on a cut-off leader's side stop naming it too.

use std::sync::OnceLock;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::{Raft, TypeConfig};

/// Whether a leader holds a quorum now: it is the only voter, or a quorum acknowledged an
/// AppendEntries it sent `acked_age` ago, less than `lease` ago.
pub fn holds_quorum(sole_voter: bool, acked_age: Option<Duration>, lease: Duration) -> bool {
    sole_voter || acked_age.is_some_and(|age| age < lease)
}

/// What a leader's replication frame carries besides openraft's request.
#[derive(Serialize, Deserialize)]
pub struct Replicate<R> {
    /// The sender led with a quorum's acknowledgement when it sent this ([`holds_quorum`]).
    pub leads: bool,
    pub req: R,
}

/// This member's view of its own leadership, shared with the network layer (which is built
/// before the Raft instance it reports on, hence the `OnceLock`).
pub struct QuorumView {
    raft: OnceLock<Raft>,
    id: u64,
    /// openraft's leader lease: a quorum's acknowledgement counts for this long.
    lease: Duration,
}

/// Where this member stands as a leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// Not openraft's leader.
    Follows,
    /// Leader, acknowledged by a quorum within the lease: it answers for the cluster.
    Leads,
    /// Still openraft's leader, but no quorum acknowledged it within the lease: it answers for
    /// nothing (as etcd's leader that stepped down under CheckQuorum).
    LostQuorum { since_ack: Option<Duration> },
}

impl QuorumView {
    pub fn new(id: u64, lease: Duration) -> QuorumView {
        QuorumView { raft: OnceLock::new(), id, lease }
    }

    /// Attach the Raft instance once it exists.
    pub fn attach(&self, raft: Raft) {
        let _ = self.raft.set(raft);
    }

    /// The lease a quorum's acknowledgement lasts.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Where this member stands now.
    pub fn leadership(&self) -> Leadership {
        let Some(raft) = self.raft.get() else { return Leadership::Follows };
        let m = raft.metrics();
        let m = m.borrow_watched();
        self.of(&m)
    }

    /// Where this member stands according to metrics `m`.
    pub fn of(&self, m: &openraft::RaftMetrics<TypeConfig>) -> Leadership {
        if m.state != ServerState::Leader || m.current_leader != Some(self.id) {
            return Leadership::Follows;
        }
        let membership = m.membership_config.membership();
        let mut voters = membership.voter_ids();
        let sole_voter = voters.next() == Some(self.id) && voters.next().is_none();
        let since_ack = m.last_quorum_acked.as_ref().map(|t| openraft::Instant::elapsed(&**t));
        if holds_quorum(sole_voter, since_ack, self.lease) {
            Leadership::Leads
        } else {
            Leadership::LostQuorum { since_ack }
        }
    }

    /// Whether this member leads with a quorum now.
    pub fn leads(&self) -> bool {
        self.leadership() == Leadership::Leads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_holds_a_quorum_only_within_the_lease_of_its_last_acknowledgement() {
        let lease = Duration::from_millis(1000);
        assert!(holds_quorum(false, Some(Duration::from_millis(999)), lease));
        assert!(!holds_quorum(false, Some(Duration::from_millis(1000)), lease));
        // Never acknowledged (just elected, or cut off since): it answers for nothing yet.
        assert!(!holds_quorum(false, None, lease));
        // A cluster of one is its own quorum.
        assert!(holds_quorum(true, None, lease));
    }
}

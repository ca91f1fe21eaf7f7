//! Rejoin (DESIGN.md "Region failover", PROMOTE and ROLLBACK): a member of the lost cluster (a
//! standby learner PROMOTE did not choose, or an old primary's member once its region is back)
//! becomes an empty learner of the new primary, in place.
//!
//! Its storage is wiped in one synced batch, which leaves only the [`Joined`] record: the new
//! cluster's ID and its leader's name. The process then starts again (as after PROMOTE, same
//! PID and arguments) with no log and no membership, accepting Raft traffic from that leader
//! alone until the leader's MemberAdd reaches it with a snapshot. Its old state is not kept:
//! what it held is a prefix of the old cluster's log, which the new primary started from or
//! (for an old primary's member) the lost window, which FENCE already reported. The record
//! wins over the flags it was started with, which still describe the old cluster.

use super::format::{encode, read};
use super::{promote, Node, NodeError};
use crate::config::Role;
use geolock_core::kv::epoch_of;
use geolock_core::machine::ApplyError;
use geolock_core::storage::{Cf, Engine, StorageError, WriteBatch};

/// The [`Joined`] record's key in [`Cf::RaftMeta`].
const JOINED: &[u8] = b"joined";

/// The end (exclusive) of the key range wiped in each column family: above every key the
/// stores write (the longest is a 12-byte revision key; the metadata keys are short ASCII).
/// [`wipe_and_join`] checks that nothing is left.
const WIPE_END: [u8; 32] = [0xff; 32];

/// The cluster a wiped member joins.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Joined {
    /// The new primary's cluster ID.
    pub cluster_id: u64,
    /// The member name of its leader, the only peer accepted until a membership arrives.
    pub leader: String,
}

/// The cluster this member was wiped to join, if it was.
pub(super) fn joined(engine: &dyn Engine) -> Result<Option<Joined>, StorageError> {
    read(engine, Cf::RaftMeta, JOINED, "joined record")
}

/// Delete everything the stopped member holds, its fence record and any seeded cluster ID
/// included, and record `joined`; one synced batch.
pub(super) fn wipe_and_join(engine: &dyn Engine, joined: &Joined) -> Result<(), StorageError> {
    let mut b = WriteBatch::default();
    for cf in Cf::ALL {
        b.delete_range(cf, Vec::new(), WIPE_END.to_vec());
    }
    b.put(Cf::RaftMeta, JOINED, encode(joined));
    engine.write(b, true)?;
    for cf in Cf::ALL {
        let left = engine.scan(cf, &[], None, 2)?;
        if left.iter().any(|(k, _)| !(cf == Cf::RaftMeta && k == JOINED)) {
            return Err(StorageError::Corrupt { what: "wiped store", detail: format!("keys left in {}", cf.name()) });
        }
    }
    Ok(())
}

impl Node {
    /// Make this member an empty learner of the new primary `cluster_id`, led by the member
    /// named `leader`, in revision epoch `epoch`: stop Raft, wipe, and ask for the process to
    /// start again (see [`Node::promote`]). Returns false, doing nothing, when this member
    /// already is in that cluster.
    ///
    /// Errors: `NotRejoinable` on a witness, on the new cluster's leader, and while a restart
    /// is under way; `EpochNotAfter` unless `epoch` is above this member's key space's;
    /// `Stopped` when the storage could not be wiped.
    pub async fn rejoin(&self, epoch: u64, cluster_id: u64, leader: &str) -> Result<bool, NodeError> {
        if self.role == Role::Witness {
            return Err(NodeError::NotRejoinable { why: "a witness keeps no data set to serve as a learner" });
        }
        if self.cluster_id == cluster_id {
            return match self.me.name == leader {
                true => Err(NodeError::NotRejoinable { why: "it leads the new primary" }),
                false => Ok(false),
            };
        }
        let current = epoch_of(self.current_rev());
        if epoch <= current {
            return Err(ApplyError::Kv(geolock_core::kv::KvError::EpochNotAfter { epoch, current }).into());
        }
        let _one = self.failover_gate.write().await;
        if *self.restart.borrow() {
            return Err(NodeError::NotRejoinable { why: "a restart is already under way" });
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown before rejoining: {e}");
        }
        let joined = Joined { cluster_id, leader: leader.to_string() };
        {
            let mut sm = self.shared.lock();
            sm.sealed = true;
            wipe_and_join(&*self.shared.engine, &joined)
        }
        .and_then(|()| match std::fs::remove_file(self.shared.snapshot_file()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StorageError::Engine(format!("removing the old snapshot: {e}")))
            }
            _ => Ok(()),
        })
        .map_err(|e| {
            tracing::error!("wiping to rejoin: {e}");
            NodeError::Stopped
        })?;
        tracing::warn!(
            "wiped to rejoin cluster {cluster_id:x} (revision epoch {epoch}, leader {leader}) as a learner; restarting"
        );
        self.restart.send_replace(true);
        Ok(true)
    }
}

/// The cluster ID, founders and role a member starts with, given what its storage records of a
/// failover: a seeded cluster (it is that cluster's voter) wins over a joined one (it is that
/// cluster's learner, its leader the only founder), which wins over the flags.
pub(super) fn start_as(
    engine: &dyn Engine,
    flags: (u64, Vec<String>, Role),
) -> Result<(u64, Vec<String>, Role, bool), StorageError> {
    let (cluster_id, founders, role) = flags;
    if let Some(seeded) = promote::seeded_cluster_id(engine)? {
        let role = if role == Role::Learner { Role::Voter } else { role };
        return Ok((seeded, founders, role, true));
    }
    Ok(match joined(engine)? {
        Some(j) => (j.cluster_id, vec![j.leader], Role::Learner, true),
        None => (cluster_id, founders, role, false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use geolock_core::storage::MemEngine;

    #[test]
    fn wiping_leaves_only_the_joined_record_whatever_the_keys() {
        let engine = MemEngine::new();
        let mut b = WriteBatch::default();
        for cf in Cf::ALL {
            // The highest keys each store can write, and short ones.
            for key in [vec![0xff; 12], vec![0xff; 8], b"vote".to_vec(), vec![0]] {
                b.put(cf, key, b"x".to_vec());
            }
        }
        engine.write(b, true).unwrap();
        let j = Joined { cluster_id: 0xc1, leader: "west-1".into() };
        wipe_and_join(&*engine, &j).unwrap();
        assert_eq!(joined(&*engine).unwrap(), Some(j));
        for cf in [Cf::Log, Cf::Kv, Cf::Lease, Cf::SmMeta, Cf::Auth] {
            assert_eq!(engine.last(cf).unwrap(), None, "{cf:?}");
        }
        assert_eq!(engine.scan(Cf::RaftMeta, &[], None, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_seeded_cluster_wins_over_a_joined_one_which_wins_over_the_flags() {
        let engine = MemEngine::new();
        let flags = || (7, vec!["east-1".to_string()], Role::Learner);
        assert_eq!(start_as(&*engine, flags()).unwrap(), (7, vec!["east-1".into()], Role::Learner, false));
        let j = Joined { cluster_id: 0xc1, leader: "west-1".into() };
        wipe_and_join(&*engine, &j).unwrap();
        let voter = (7, vec!["east-1".to_string()], Role::Voter);
        assert_eq!(start_as(&*engine, voter).unwrap(), (0xc1, vec!["west-1".into()], Role::Learner, true));
        let mut b = WriteBatch::default();
        b.put(Cf::RaftMeta, promote::CLUSTER_ID, encode(&0xc2u64));
        engine.write(b, true).unwrap();
        assert_eq!(start_as(&*engine, flags()).unwrap(), (0xc2, vec!["east-1".into()], Role::Voter, true));
    }
}

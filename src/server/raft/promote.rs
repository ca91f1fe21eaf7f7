//! PROMOTE (DESIGN.md "Region failover"): a standby learner of a lost primary becomes the only
//! voter of a new cluster, with the state it holds, in a new revision epoch.
//!
//! As etcd's `--force-new-cluster` rewrites its WAL, the member's Raft storage is rewritten into
//! what the leader of a one-member cluster would leave had it been killed just after appending
//! two entries: the membership `{this member}` and `EnterEpoch(epoch)`, after the last entry it
//! applied, in a term above every term it has seen, with its vote for itself in that term. On
//! its next start openraft finds a one-voter membership, elects this member, and commits both
//! entries before any client write can follow them; every revision it hands out is then in the
//! new epoch. Entries it had received but not applied are dropped (etcd drops the uncommitted
//! ones): whether the old primary committed them is unknown, and they count in the lost window.
//!
//! The new cluster's ID, and the member's new role, are kept in its Raft metadata and win over
//! the flags it was started with, which still describe the old cluster.

use std::collections::{BTreeMap, BTreeSet};

use openraft::entry::RaftEntry;
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::vote::{RaftLeaderId, RaftLeaderIdExt};
use openraft::{Membership, RaftTypeConfig};

use super::format::{decode, encode, read};
use super::{bootstrap, log_store, state_machine, Member, MemberRole, Node, NodeError, TypeConfig};
use crate::config::Role;
use geolock_core::kv::{epoch_of, KvError, EPOCH_MAX};
use geolock_core::machine::ApplyError;
use geolock_core::machine::Command;
use geolock_core::storage::{Cf, Engine, StorageError, WriteBatch};

type TC = TypeConfig;

/// The new cluster's ID, in [`Cf::RaftMeta`], once this member seeded one.
pub(super) const CLUSTER_ID: &[u8] = b"cluster_id";

/// What seeding left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seeded {
    /// The last entry of the old cluster kept: the last one this member applied.
    pub applied_index: u64,
    /// Entries it had received after that and dropped.
    pub dropped_entries: u64,
    /// The term the new cluster's first entries are in.
    pub term: u64,
    /// The new cluster's ID.
    pub cluster_id: u64,
}

/// The ID of the cluster this member seeded, if it seeded one.
pub(super) fn seeded_cluster_id(engine: &dyn Engine) -> Result<Option<u64>, StorageError> {
    read(engine, Cf::RaftMeta, CLUSTER_ID, "cluster id")
}

/// Rewrite the stopped member `id`'s storage so that it starts as the only voter `me` of cluster
/// `cluster_id`, entering revision `epoch` first. Written in one synced batch.
pub(super) fn seed_new_cluster(
    engine: &dyn Engine,
    id: u64,
    mut me: Member,
    cluster_id: u64,
    epoch: u64,
) -> Result<Seeded, StorageError> {
    let applied: Option<LogIdOf<TC>> =
        read(engine, Cf::SmMeta, state_machine::APPLIED, "last applied log id")?.flatten();
    let vote: Option<VoteOf<TC>> = read(engine, Cf::RaftMeta, log_store::VOTE, "vote")?;
    let last: Option<LogIdOf<TC>> = match engine.last(Cf::Log)? {
        Some((_, v)) => Some(
            decode::<EntryOf<TC>>(&v)
                .map_err(|e| StorageError::Corrupt { what: "log entry", detail: e.to_string() })?
                .log_id,
        ),
        None => None,
    };
    let term_of = |l: &Option<LogIdOf<TC>>| l.as_ref().map_or(0, |l| l.committed_leader_id().term);
    let term = term_of(&applied).max(term_of(&last)).max(vote.as_ref().map_or(0, |v| v.leader_id().term())) + 1;
    let from = applied.as_ref().map_or(0, |l| l.index() + 1);
    let dropped_entries = last.as_ref().map_or(0, |l| (l.index() + 1).saturating_sub(from));

    let mut b = WriteBatch::default();
    b.delete_range(Cf::Log, from.to_be_bytes().to_vec(), u64::MAX.to_be_bytes().to_vec());
    b.delete(Cf::Log, u64::MAX.to_be_bytes().to_vec());
    me.role = MemberRole::Voter;
    let membership =
        Membership::new(vec![BTreeSet::from([id])], BTreeMap::from([(id, me)])).expect("one voter that is also a node");
    let log_id = |index| LogIdOf::<TC>::new(<TC as RaftTypeConfig>::LeaderId::new_committed(term, id), index);
    let entries: [EntryOf<TC>; 2] = [
        EntryOf::<TC>::new_membership(log_id(from), membership),
        EntryOf::<TC>::new_normal(log_id(from + 1), Command::EnterEpoch { epoch }),
    ];
    for e in &entries {
        b.put(Cf::Log, e.log_id.index().to_be_bytes().to_vec(), encode(e));
    }
    b.put(Cf::RaftMeta, log_store::VOTE, encode(&VoteOf::<TC>::new_committed(term, id)));
    b.put(Cf::RaftMeta, CLUSTER_ID, encode(&cluster_id));
    engine.write(b, true)?;
    Ok(Seeded { applied_index: from.saturating_sub(1), dropped_entries, term, cluster_id })
}

impl Node {
    /// PROMOTE this learner: stop Raft, seed a new cluster from what it applied, in revision
    /// epoch `epoch`, and ask for the process to start again (`roles::run` re-executes it, same
    /// PID and arguments), from which it serves as the new cluster's leader. The new cluster's
    /// ID is derived from the old one's and the epoch, so every promotion names a new cluster.
    ///
    /// Errors: `NotPromotable` unless this member is a learner and no promotion is under way;
    /// `Fenced`; `EpochNotAfter` unless `epoch` is above the key space's; `Stopped` when the
    /// storage could not be rewritten (nothing was, or all of it was: one synced batch).
    pub async fn promote(&self, epoch: u64) -> Result<Seeded, NodeError> {
        // A learner by the membership: started with --role learner, or added as one.
        if !self.status().is_learner || self.role == Role::Witness {
            return Err(NodeError::NotPromotable { why: "only a learner of the lost primary seeds the new one" });
        }
        self.refuse_if_fenced()?;
        let current = epoch_of(self.current_rev());
        if epoch <= current {
            return Err(ApplyError::Kv(KvError::EpochNotAfter { epoch, current }).into());
        }
        // Checked here, not at apply: a seeded cluster whose EnterEpoch is refused would stay
        // in the old epoch for good.
        if epoch > EPOCH_MAX {
            return Err(ApplyError::Kv(KvError::EpochTooLarge { epoch }).into());
        }
        let _one = self.failover_gate.write().await;
        if *self.restart.borrow() {
            return Err(NodeError::NotPromotable { why: "a promotion is already under way" });
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown before seeding: {e}");
        }
        let cluster_id = bootstrap::cluster_id(&format!("{:x}/epoch-{epoch}", self.cluster_id));
        let seeded = {
            let mut sm = self.shared.lock();
            sm.sealed = true;
            seed_new_cluster(&*self.shared.engine, self.id, self.me.clone(), cluster_id, epoch)
        }
        .map_err(|e| {
            tracing::error!("seeding the new cluster: {e}");
            NodeError::Stopped
        })?;
        tracing::warn!(
            "seeded cluster {:x} in revision epoch {epoch} from applied index {} ({} received entries dropped); restarting",
            seeded.cluster_id,
            seeded.applied_index,
            seeded.dropped_entries
        );
        self.restart.send_replace(true);
        Ok(seeded)
    }

    /// Resolves once this process must start again (see [`Node::promote`]).
    pub async fn restart_requested(&self) {
        let _ = self.restart.subscribe().wait_for(|r| *r).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geolock_core::storage::MemEngine;

    fn put<T: serde::Serialize>(engine: &dyn Engine, cf: Cf, key: &[u8], v: &T) {
        let mut b = WriteBatch::default();
        b.put(cf, key.to_vec(), encode(v));
        engine.write(b, true).unwrap();
    }

    fn entry(term: u64, index: u64) -> EntryOf<TC> {
        let id = LogIdOf::<TC>::new(<TC as RaftTypeConfig>::LeaderId::new_committed(term, 9), index);
        EntryOf::<TC>::new_normal(id, Command::Compact { revision: 1 })
    }

    #[test]
    fn seeding_keeps_what_was_applied_drops_the_rest_and_leads_in_a_term_above_all_seen() {
        let engine = MemEngine::new();
        for i in 3..=7 {
            put(&*engine, Cf::Log, &u64::to_be_bytes(i), &entry(4, i));
        }
        put(&*engine, Cf::SmMeta, state_machine::APPLIED, &Some(entry(4, 5).log_id));
        // It voted in term 6 (an election it saw but whose leader sent it nothing).
        put(&*engine, Cf::RaftMeta, log_store::VOTE, &VoteOf::<TC>::new(6, 9));
        assert_eq!(seeded_cluster_id(&*engine).unwrap(), None);
        let me = Member { name: "l1".into(), role: MemberRole::Learner, ..Member::default() };
        let seeded = seed_new_cluster(&*engine, 2, me, 0xc1, 3).unwrap();
        assert_eq!(seeded, Seeded { applied_index: 5, dropped_entries: 2, term: 7, cluster_id: 0xc1 });
        assert_eq!(seeded_cluster_id(&*engine).unwrap(), Some(0xc1));
        let log: Vec<EntryOf<TC>> =
            engine.scan(Cf::Log, &[], None, 100).unwrap().iter().map(|(_, v)| decode(v).unwrap()).collect();
        let shown: Vec<String> = log.iter().map(|e| format!("{}:{}", e.log_id, e.payload)).collect();
        assert_eq!(&shown[..3], ["4.3:normal:compact 1", "4.4:normal:compact 1", "4.5:normal:compact 1"]);
        assert_eq!(shown[4], "7.7:normal:enter-epoch 3");
        assert_eq!(log.len(), 5);
        assert_eq!(log[3].log_id.index(), 6);
        assert_eq!(log[3].log_id.committed_leader_id().term, 7);
        let membership = log[3].get_membership().expect("a membership entry").clone();
        assert_eq!(membership.voter_ids().collect::<Vec<_>>(), [2]);
        assert_eq!(membership.get_node(&2).unwrap().role, MemberRole::Voter);
        let vote: VoteOf<TC> = read(&*engine, Cf::RaftMeta, log_store::VOTE, "vote").unwrap().unwrap();
        assert_eq!(vote, VoteOf::<TC>::new_committed(7, 2));
    }
}

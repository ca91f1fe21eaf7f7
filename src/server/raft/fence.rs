//! The failover fence (DESIGN.md "Region failover", FENCE): a member of an old primary records
//! `fenced(epoch)` durably, and from then on refuses every write (naming the epoch), ends its
//! client streams so clients re-resolve the client name, and takes no part in Raft: it neither
//! campaigns, nor sends heartbeats, nor accepts entries, votes or snapshots. Once a majority of
//! the old voters is fenced, no leader of the old cluster can commit again, which is what lets
//! the controller promote the standby without waiting out the region write lease.
//!
//! The record lives in the member's own Raft metadata (never replicated, never replaced by a
//! snapshot) and is read at start, so a fenced member restarted stays fenced; only `lockctl
//! failover rejoin`, which wipes it and makes it a learner of the new primary, ends it.

use std::sync::atomic::Ordering;

use super::format::{encode, read};
use super::network::Kind;
use super::{Node, NodeError, Raft};
use geolock_core::storage::{Cf, Engine, StorageError, WriteBatch};

/// The fence record's key in [`Cf::RaftMeta`]: the epoch, in the versioned format.
const FENCED_EPOCH: &[u8] = b"fenced_epoch";

/// The epoch this member was fenced by, 0 if it never was.
pub(super) fn load(engine: &dyn Engine) -> Result<u64, StorageError> {
    Ok(read(engine, Cf::RaftMeta, FENCED_EPOCH, "fence record")?.unwrap_or(0))
}

/// Whether a fenced member still answers a peer request of `kind`: only those that change
/// nothing, and the forwarded requests, which it answers with [`NodeError::Fenced`] so the
/// client learns why.
pub(super) fn answered_when_fenced(kind: Kind) -> bool {
    match kind {
        Kind::LogState | Kind::Lag | Kind::View | Kind::LeaseTimeToLive => true,
        Kind::ForwardWrite | Kind::ReadIndex | Kind::LeaseKeepAlive => true,
        Kind::AppendEntries
        | Kind::StreamAppend
        | Kind::Vote
        | Kind::PreVote
        | Kind::SnapshotChunk
        | Kind::TransferLeader
        | Kind::ChangeMembers
        | Kind::WitnessPurge => false,
    }
}

/// Take no part in Raft: no campaign, no heartbeat. (Requests from peers are refused in
/// `peer_server`.)
pub(super) fn stop_taking_part(raft: &Raft) {
    let rc = raft.runtime_config();
    rc.elect(false);
    rc.heartbeat(false);
}

impl Node {
    /// Record `fenced(epoch)` durably (synced before this returns), then stop taking part in
    /// Raft and end the client streams. Idempotent; a later fence with a higher epoch raises
    /// the recorded one, a lower one changes nothing. Returns the epoch now recorded.
    ///
    /// Errors: [`NodeError::Stopped`] when the record could not be written (it may not be
    /// durable: the caller tries again).
    pub async fn fence(&self, epoch: u64) -> Result<u64, NodeError> {
        let recorded = {
            // One fence at a time, so a lower epoch never overwrites a higher one on disk.
            let _one = self.failover_gate.write().await;
            let current = self.fenced_epoch.load(Ordering::SeqCst);
            if epoch > current {
                let mut b = WriteBatch::default();
                b.put(Cf::RaftMeta, FENCED_EPOCH, encode(&epoch));
                if let Err(e) = self.shared.engine.write(b, true) {
                    tracing::error!("recording fenced({epoch}): {e}");
                    return Err(NodeError::Stopped);
                }
                self.fenced_epoch.store(epoch, Ordering::SeqCst);
                tracing::warn!("fenced by the failover to revision epoch {epoch}: refusing writes and Raft traffic");
            }
            epoch.max(current)
        };
        stop_taking_part(&self.raft);
        self.shared.lock().close_client_streams();
        Ok(recorded)
    }

    /// The epoch of the failover that fenced this member, if one did.
    pub fn fenced_epoch(&self) -> Option<u64> {
        Some(self.fenced_epoch.load(Ordering::SeqCst)).filter(|e| *e > 0)
    }

    /// `Err(Fenced)` once this member is fenced: checked before every write.
    pub(super) fn refuse_if_fenced(&self) -> Result<(), NodeError> {
        match self.fenced_epoch() {
            Some(epoch) => Err(NodeError::Fenced { epoch }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geolock_core::storage::MemEngine;

    #[test]
    fn the_fence_record_reads_back_and_nothing_reads_as_never_fenced() {
        let engine = MemEngine::new();
        assert_eq!(load(&*engine).unwrap(), 0);
        let mut b = WriteBatch::default();
        b.put(Cf::RaftMeta, FENCED_EPOCH, encode(&7u64));
        engine.write(b, true).unwrap();
        assert_eq!(load(&*engine).unwrap(), 7);
        let mut b = WriteBatch::default();
        b.put(Cf::RaftMeta, FENCED_EPOCH, vec![1, 0xff]);
        engine.write(b, true).unwrap();
        assert!(matches!(load(&*engine), Err(StorageError::Corrupt { what: "fence record", .. })));
    }

    #[test]
    fn a_fenced_member_answers_only_what_changes_nothing_and_what_it_must_refuse_by_name() {
        let answered: Vec<u8> =
            (0..=u8::MAX).filter_map(Kind::of).filter(|k| answered_when_fenced(*k)).map(|k| k as u8).collect();
        assert_eq!(answered, [6, 7, 8, 9, 13, 14, 15]);
    }
}

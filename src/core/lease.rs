//! Leases: which exist, their granted TTL, the keys attached to each, and (on the leader) when
//! each expires.
//!
//! Pure: time is an argument (`now_ms`, milliseconds on a monotonic clock of the caller's choice).
//! The replicated part is the set of leases, their TTLs and keys; deadlines are volatile leader
//! state, recomputed generously (TTL plus one election timeout) whenever a node becomes leader,
//! so that no lease ever expires earlier than its TTL after its last acknowledged keep-alive.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::storage::{Cf, Engine, StorageError, WriteBatch};

/// TTL bounds, in seconds, from configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlBounds {
    /// Shorter TTLs are raised to this, as etcd raises them to its minimum.
    pub min_ttl_s: i64,
    /// Longer TTLs are refused.
    pub max_ttl_s: i64,
    /// TTL of a grant that asks for none (TTL 0).
    pub default_ttl_s: i64,
}

/// Why a lease operation was refused. Messages are etcd's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LeaseError {
    #[error("etcdserver: requested lease not found")]
    NotFound { lease: i64 },
    #[error("etcdserver: lease already exists")]
    Exists { lease: i64 },
    #[error("etcdserver: too large lease TTL (max_ttl {max_ttl_s}s)")]
    TtlTooLarge { ttl_s: i64, max_ttl_s: i64 },
    #[error("etcdserver: too many leases (leases_max {max})")]
    TooMany { max: usize },
    /// A grant no API path proposes (the API bounds IDs and TTLs first), refused at apply.
    #[error("geolock: invalid lease grant (ID {lease}, TTL {ttl_s} s)")]
    Invalid { lease: i64, ttl_s: i64 },
}

/// One lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// TTL granted, in seconds.
    pub ttl_s: i64,
    /// Keys attached.
    pub keys: BTreeSet<Vec<u8>>,
    /// When it expires, on the leader's clock; `None` on a node that is not leader.
    deadline_ms: Option<u64>,
    /// An expiry proposal is in flight; don't propose again before this time.
    revoking_until_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct StoredLease {
    ttl_s: i64,
}

/// All leases.
#[derive(Clone, Debug, Default)]
pub struct Lessor {
    leases: BTreeMap<i64, Lease>,
    leader: bool,
}

impl Lessor {
    /// No leases.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuild the replicated part from storage; keys are attached by the caller from the key
    /// space, which is their source of truth.
    pub fn load(engine: &dyn Engine) -> Result<Self, StorageError> {
        let mut l = Lessor::new();
        for (k, v) in engine.scan(Cf::Lease, &[], None, usize::MAX)? {
            let id = i64::from_be_bytes(k.as_slice().try_into().map_err(|_| StorageError::Corrupt {
                what: "lease id",
                detail: format!("{} bytes, not 8", k.len()),
            })?);
            let s: StoredLease =
                postcard::from_bytes(&v).map_err(|e| StorageError::Corrupt { what: "lease", detail: e.to_string() })?;
            l.leases.insert(
                id,
                Lease { ttl_s: s.ttl_s, keys: BTreeSet::new(), deadline_ms: None, revoking_until_ms: None },
            );
        }
        Ok(l)
    }

    /// The TTL a grant asking for `ttl_s` gets, or why it gets none.
    pub fn effective_ttl(bounds: &TtlBounds, ttl_s: i64) -> Result<i64, LeaseError> {
        if ttl_s > bounds.max_ttl_s {
            return Err(LeaseError::TtlTooLarge { ttl_s, max_ttl_s: bounds.max_ttl_s });
        }
        Ok(if ttl_s == 0 { bounds.default_ttl_s } else { ttl_s.max(bounds.min_ttl_s) })
    }

    /// Look up a lease.
    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Whether a lease exists.
    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// IDs of every lease, ascending.
    pub fn ids(&self) -> Vec<i64> {
        self.leases.keys().copied().collect()
    }

    /// Number of leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True if there are no leases.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Create a lease with an already-bounded TTL.
    pub fn grant(&mut self, id: i64, ttl_s: i64, now_ms: u64, batch: &mut WriteBatch) -> Result<(), LeaseError> {
        if id == 0 || ttl_s <= 0 || ttl_s > crate::limits::LEASE_TTL_S_MAX {
            return Err(LeaseError::Invalid { lease: id, ttl_s });
        }
        if self.leases.contains_key(&id) {
            return Err(LeaseError::Exists { lease: id });
        }
        if self.leases.len() >= crate::limits::LEASES_MAX {
            return Err(LeaseError::TooMany { max: crate::limits::LEASES_MAX });
        }
        let deadline_ms = self.leader.then(|| now_ms + ttl_s as u64 * 1000);
        self.leases.insert(id, Lease { ttl_s, keys: BTreeSet::new(), deadline_ms, revoking_until_ms: None });
        batch.put(
            Cf::Lease,
            id.to_be_bytes().to_vec(),
            postcard::to_allocvec(&StoredLease { ttl_s }).expect("encodes"),
        );
        Ok(())
    }

    /// Remove a lease, returning the keys that were attached (the caller deletes them).
    pub fn revoke(&mut self, id: i64, batch: &mut WriteBatch) -> Result<BTreeSet<Vec<u8>>, LeaseError> {
        let lease = self.leases.remove(&id).ok_or(LeaseError::NotFound { lease: id })?;
        batch.delete(Cf::Lease, id.to_be_bytes().to_vec());
        Ok(lease.keys)
    }

    /// Record that `key` moved from lease `from` to lease `to` (0 = none).
    pub fn move_key(&mut self, key: &[u8], from: i64, to: i64) {
        if let Some(l) = self.leases.get_mut(&from) {
            l.keys.remove(key);
        }
        if let Some(l) = self.leases.get_mut(&to) {
            l.keys.insert(key.to_vec());
        }
    }

    /// This node became leader: every lease gets a full TTL plus `extend_ms` from now, because
    /// the last keep-alive may have reached the old leader just before it failed.
    pub fn promote(&mut self, now_ms: u64, extend_ms: u64) {
        self.leader = true;
        for l in self.leases.values_mut() {
            l.deadline_ms = Some(now_ms + l.ttl_s as u64 * 1000 + extend_ms);
            l.revoking_until_ms = None;
        }
    }

    /// This node stopped leading: it no longer decides expiry.
    pub fn demote(&mut self) {
        self.leader = false;
        for l in self.leases.values_mut() {
            l.deadline_ms = None;
            l.revoking_until_ms = None;
        }
    }

    /// Whether this lessor decides expiry.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// A keep-alive on the leader: the lease gets its full TTL from now. Returns the TTL.
    ///
    /// A lease past its deadline is not renewed: its revocation may already be on its way
    /// through the log, and a keep-alive acknowledged now would be followed by the lease's end
    /// (etcd's lessor refuses to renew an expired lease for the same reason). It is reported as
    /// gone, which a keep-alive answers with TTL 0.
    pub fn renew(&mut self, id: i64, now_ms: u64) -> Result<i64, LeaseError> {
        let leader = self.leader;
        let l = self.leases.get_mut(&id).ok_or(LeaseError::NotFound { lease: id })?;
        if leader {
            if l.deadline_ms.is_some_and(|d| d <= now_ms) {
                return Err(LeaseError::NotFound { lease: id });
            }
            l.deadline_ms = Some(now_ms + l.ttl_s as u64 * 1000);
        }
        Ok(l.ttl_s)
    }

    /// Seconds left before the lease expires, as etcd reports it (rounded down); the granted
    /// TTL on a node that does not track deadlines.
    pub fn remaining_s(&self, id: i64, now_ms: u64) -> Result<i64, LeaseError> {
        let l = self.leases.get(&id).ok_or(LeaseError::NotFound { lease: id })?;
        Ok(match l.deadline_ms {
            Some(d) => (d.saturating_sub(now_ms) / 1000) as i64,
            None => l.ttl_s,
        })
    }

    /// Leases past their deadline that have no expiry proposal in flight, at most `max`; they
    /// are marked so that they are not returned again for `retry_ms`.
    pub fn take_expired(&mut self, now_ms: u64, retry_ms: u64, max: usize) -> Vec<i64> {
        let mut out = Vec::new();
        for (id, l) in self.leases.iter_mut() {
            if out.len() >= max {
                break;
            }
            let due = l.deadline_ms.is_some_and(|d| d <= now_ms);
            let free = l.revoking_until_ms.is_none_or(|t| t <= now_ms);
            if due && free {
                l.revoking_until_ms = Some(now_ms + retry_ms);
                out.push(*id);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: TtlBounds = TtlBounds { min_ttl_s: 5, max_ttl_s: 3600, default_ttl_s: 30 };

    #[test]
    fn ttl_bounds_follow_etcd() {
        assert_eq!(Lessor::effective_ttl(&B, 1), Ok(5));
        assert_eq!(Lessor::effective_ttl(&B, 0), Ok(30));
        assert_eq!(Lessor::effective_ttl(&B, 60), Ok(60));
        assert_eq!(Lessor::effective_ttl(&B, 3601), Err(LeaseError::TtlTooLarge { ttl_s: 3601, max_ttl_s: 3600 }));
    }

    #[test]
    fn expiry_is_decided_only_by_the_leader_and_never_early() {
        let mut l = Lessor::new();
        let mut b = WriteBatch::default();
        l.grant(1, 10, 0, &mut b).unwrap();
        assert!(l.take_expired(1_000_000, 100, 10).is_empty(), "a follower expires nothing");
        l.promote(1_000, 1_000);
        assert!(l.take_expired(11_999, 100, 10).is_empty());
        assert_eq!(l.take_expired(12_000, 100, 10), vec![1]);
        assert!(l.take_expired(12_050, 100, 10).is_empty(), "in flight");
        assert_eq!(l.take_expired(12_100, 100, 10), vec![1], "retried");
    }

    #[test]
    fn a_lease_past_its_deadline_is_not_renewed_while_its_revocation_may_be_in_flight() {
        let mut l = Lessor::new();
        let mut b = WriteBatch::default();
        l.grant(1, 10, 0, &mut b).unwrap();
        l.promote(0, 0);
        assert_eq!(l.renew(1, 9_999), Ok(10));
        assert_eq!(l.remaining_s(1, 10_500), Ok(9));
        assert_eq!(l.take_expired(19_998, 100, 10), Vec::<i64>::new());
        assert_eq!(l.take_expired(19_999, 100, 10), vec![1]);
        // The revocation is proposed; a keep-alive now must not be acknowledged.
        assert_eq!(l.renew(1, 20_000), Err(LeaseError::NotFound { lease: 1 }));
        // A new leader (or this one, once a quorum acknowledges it again) gives it a full TTL
        // plus the extension, and renewals are acknowledged again.
        l.demote();
        l.promote(30_000, 1_000);
        assert_eq!(l.renew(1, 30_001), Ok(10));
        assert!(l.take_expired(40_000, 100, 10).is_empty());
        assert_eq!(l.take_expired(40_001, 100, 10), vec![1]);
    }

    #[test]
    fn revoke_returns_attached_keys() {
        let mut l = Lessor::new();
        let mut b = WriteBatch::default();
        l.grant(7, 10, 0, &mut b).unwrap();
        assert_eq!(l.grant(7, 10, 0, &mut b), Err(LeaseError::Exists { lease: 7 }));
        l.move_key(b"a", 0, 7);
        l.move_key(b"b", 0, 7);
        l.move_key(b"a", 7, 0);
        assert_eq!(l.revoke(7, &mut b).unwrap(), BTreeSet::from([b"b".to_vec()]));
        assert_eq!(l.revoke(7, &mut b), Err(LeaseError::NotFound { lease: 7 }));
    }
}

//! The region write lease of an active-passive primary (DESIGN.md "Region failover", FENCE): its
//! leader takes writes only while a majority of the vantage points (the failover controller in
//! the standby region, the arbiter in a third) granted it a lease, and stops by itself when the
//! lease lapses, so a primary cut off from them stops writing before the controller may promote
//! the standby.
//!
//! The lease runs from before the leader asked (its own clock), and a vantage point's promise
//! from when it granted (its clock), which is later: the leader's lease always ends first, by
//! the network delay at least, plus the stated clock-drift bound the controller adds (Gray and
//! Cheriton's leases; the controller waits lease + drift from its last grant).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;
use std::time::Duration;

use geolock_core::kv::epoch_of;
use geolock_proto::geolockpb as fpb;

use super::{now_ms, Node, NodeError};

/// How many renewals a lease gets before it would lapse: one lost round leaves two.
const RENEWALS_PER_LEASE: u32 = 3;

/// The lease as this member holds it.
#[derive(Debug)]
pub struct WriteLease {
    vantages: Vec<String>,
    lease: Duration,
    /// Until when ([`now_ms`]) this member may write; 0 when it holds no lease.
    until_ms: AtomicU64,
}

impl WriteLease {
    /// A lease granted by a majority of `vantages` (endpoints), `lease` long.
    pub fn new(vantages: Vec<String>, lease: Duration) -> WriteLease {
        WriteLease { vantages, lease, until_ms: AtomicU64::new(0) }
    }

    /// `Err(NoWriteLease)` unless this member holds the lease at `now_ms`.
    pub(super) fn check(&self, now_ms: u64) -> Result<(), NodeError> {
        if now_ms < self.until_ms.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(NodeError::NoWriteLease { vantages: self.vantages.len(), lease_ms: self.lease.as_millis() as u64 })
        }
    }

    /// A round of grants asked at `asked_ms` came back with `granted` of them: how long the lease
    /// now runs (never shortened by a round, since an earlier majority's lease still holds).
    fn renewed(&self, asked_ms: u64, granted: usize) -> u64 {
        let until = lease_until(asked_ms, granted, self.vantages.len(), self.lease.as_millis() as u64);
        self.until_ms.fetch_max(until.unwrap_or(0), Ordering::SeqCst).max(until.unwrap_or(0))
    }

    /// This member stopped leading: whatever it held is given up.
    fn drop_lease(&self) {
        self.until_ms.store(0, Ordering::SeqCst);
    }
}

/// When a lease asked for at `asked_ms` ends, if `granted` of `vantages` vantage points granted
/// it: a strict majority is needed (two of two, two of three).
pub(super) fn lease_until(asked_ms: u64, granted: usize, vantages: usize, lease_ms: u64) -> Option<u64> {
    (vantages > 0 && granted > vantages / 2).then_some(asked_ms + lease_ms)
}

impl Node {
    /// `Err(NoWriteLease)` on a member with a write lease configured that does not hold it now.
    pub(super) fn check_write_lease(&self) -> Result<(), NodeError> {
        match &self.write_lease {
            Some(l) => l.check(now_ms()),
            None => Ok(()),
        }
    }
}

/// While this member leads, ask every vantage point for the lease, `RENEWALS_PER_LEASE` times a
/// lease, each round bounded by that interval; while it follows, hold none.
pub(super) async fn renew_loop(node: Weak<Node>) {
    let Some(lease) = node.upgrade().and_then(|n| n.write_lease.as_ref().map(|l| l.lease)) else { return };
    let every = lease / RENEWALS_PER_LEASE;
    let mut clients: Vec<Option<fpb::vantage_client::VantageClient<tonic::transport::Channel>>> = Vec::new();
    let mut held = false;
    // Said once each time they change, not every round.
    let mut told_refusals: Vec<String> = Vec::new();
    loop {
        let round = tokio::time::sleep(every);
        let Some(n) = node.upgrade() else { return };
        let Some(wl) = n.write_lease.as_ref() else { return };
        if clients.is_empty() {
            clients = wl.vantages.iter().map(|v| vantage_client(v)).collect();
        }
        let mut granted = 0;
        if n.quorum.leads() {
            let asked_ms = now_ms();
            let request = fpb::GrantWriteLeaseRequest {
                cluster_id: n.cluster_id,
                member_id: n.id,
                epoch: epoch_of(n.current_rev()),
                lease_ms: lease.as_millis() as u64,
                vantages: wl.vantages.len() as u32,
            };
            let asks = clients.iter().map(|c| {
                let c = c.clone();
                async move {
                    let mut c = c?;
                    let answer = tokio::time::timeout(every, c.grant_write_lease(request)).await.ok()?.ok()?;
                    Some(answer.into_inner())
                }
            });
            let answers = futures::future::join_all(asks).await;
            granted = answers.iter().flatten().filter(|a| a.granted).count();
            let mut refusals: Vec<String> =
                answers.into_iter().flatten().filter(|a| !a.granted).map(|a| a.reason).collect();
            refusals.sort();
            if refusals != told_refusals && !refusals.is_empty() {
                tracing::warn!("vantage points refused the region write lease: {}", refusals.join("; "));
            }
            told_refusals = refusals;
            wl.renewed(asked_ms, granted);
        } else {
            wl.drop_lease();
        }
        let holds = wl.check(now_ms()).is_ok();
        if held != holds {
            let of = wl.vantages.len();
            match holds {
                true => tracing::info!("holding the region write lease: {granted} of {of} vantage points granted it"),
                false => tracing::warn!(
                    "no region write lease ({granted} of {of} vantage points granted it): refusing writes"
                ),
            }
            held = holds;
        }
        drop(n);
        round.await;
    }
}

/// A lazily connecting client for vantage point `endpoint` (`None` if it is not a URL).
fn vantage_client(endpoint: &str) -> Option<fpb::vantage_client::VantageClient<tonic::transport::Channel>> {
    let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let channel =
        tonic::transport::Channel::from_shared(url).ok()?.connect_timeout(Duration::from_secs(1)).connect_lazy();
    Some(fpb::vantage_client::VantageClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strict_majority_of_vantage_points_grants_a_lease_from_before_it_was_asked() {
        assert_eq!(lease_until(1_000, 2, 2, 3_000), Some(4_000));
        assert_eq!(lease_until(1_000, 1, 2, 3_000), None, "one of two is no majority");
        assert_eq!(lease_until(1_000, 2, 3, 3_000), Some(4_000));
        assert_eq!(lease_until(1_000, 1, 3, 3_000), None);
        assert_eq!(lease_until(1_000, 0, 0, 3_000), None);
    }

    #[test]
    fn a_round_without_a_majority_does_not_shorten_the_lease_it_leaves_to_lapse() {
        let l = WriteLease::new(vec!["a".into(), "b".into()], Duration::from_millis(3_000));
        assert!(matches!(l.check(0), Err(NodeError::NoWriteLease { vantages: 2, lease_ms: 3_000 })));
        assert_eq!(l.renewed(1_000, 2), 4_000);
        assert!(l.check(3_999).is_ok());
        assert_eq!(l.renewed(2_000, 1), 4_000);
        assert!(l.check(3_999).is_ok() && l.check(4_000).is_err());
        l.drop_lease();
        assert!(l.check(1_500).is_err());
    }
}

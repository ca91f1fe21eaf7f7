//! This member's figures as Prometheus metrics: etcd's `etcd_server_*` and `etcd_mvcc_*` names
//! for what etcd also has, `geolock_*` for roles, regions and lag. Gauges are read from the
//! node at each scrape ([`Node::refresh_metrics`]); counters are moved where things happen.

use std::sync::LazyLock;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use prometheus::{IntCounter, IntGauge, IntGaugeVec};

use super::{now_ms, Node};
use crate::metrics::{counter, gauge, gauge_vec};

/// The server version `etcd_server_version` states: the etcd API we speak.
const SERVER_VERSION: &str = "3.5.0";
/// `etcd_cluster_version`: etcd's major.minor of [`SERVER_VERSION`].
const CLUSTER_VERSION: &str = "3.5";

pub(super) static LEADER_CHANGES: LazyLock<IntCounter> =
    LazyLock::new(|| counter("etcd_server_leader_changes_seen_total", "Leader changes this member has seen."));
pub(super) static PROPOSALS_FAILED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_server_proposals_failed_total",
        "Proposals from this member that failed (no leader, timeout, refused).",
    )
});
pub(super) static LEASES_EXPIRED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter("etcd_debugging_server_lease_expired_total", "Leases this member, as leader, revoked because they expired.")
});

/// etcd's counts of key-space operations, as its mvcc layer counts them: every put, delete-range
/// and range wherever it runs (inside a Txn too), and every store transaction of more than one
/// operation (a lone put is not counted as a transaction; etcd's `metricsTxnWrite.End`).
/// Applied entries count on every member, reads where they are served.
struct MvccCounts {
    put: IntCounter,
    delete: IntCounter,
    range: IntCounter,
    txn: IntCounter,
}

static MVCC: LazyLock<MvccCounts> = LazyLock::new(|| MvccCounts {
    put: counter("etcd_mvcc_put_total", "Puts applied, in requests and transactions."),
    delete: counter("etcd_mvcc_delete_total", "Delete-ranges applied, in requests and transactions."),
    range: counter("etcd_mvcc_range_total", "Ranges served, in requests and transactions."),
    txn: counter("etcd_mvcc_txn_total", "Transactions of more than one operation."),
});

/// Count what an applied entry did.
pub(super) fn count_mvcc(done: &geolock_core::machine::Response) {
    use geolock_core::machine::Response;
    match done {
        Response::Put(_) => MVCC.put.inc(),
        Response::DeleteRange(_) => MVCC.delete.inc(),
        Response::Txn(t) => count_txn(t),
        _ => {}
    }
}

/// Count a transaction's operations (a read-only one's where it is served).
pub fn count_txn(t: &geolock_core::kv::TxnResponse) {
    fn ops(t: &geolock_core::kv::TxnResponse) -> u64 {
        use geolock_core::kv::ResponseOp;
        t.responses
            .iter()
            .map(|op| match op {
                ResponseOp::Put(_) => {
                    MVCC.put.inc();
                    1
                }
                ResponseOp::DeleteRange(_) => {
                    MVCC.delete.inc();
                    1
                }
                ResponseOp::Range(_) => {
                    MVCC.range.inc();
                    1
                }
                ResponseOp::Txn(inner) => ops(inner),
            })
            .sum()
    }
    if ops(t) > 1 {
        MVCC.txn.inc();
    }
}

/// Count a range served here.
pub fn count_range() {
    MVCC.range.inc();
}

/// Lock contention by lock name (its first path segment, see [`lock_label`]): waiters queued
/// on this member, how long each waited for the lock it got, and hand-overs (a waiter woken
/// holding the lock its predecessor released). Wait buckets: 1 ms doubling to 65.5 s.
pub(super) struct LockMetrics {
    pub waiters: IntGaugeVec,
    pub wait_seconds: prometheus::HistogramVec,
    pub handovers: prometheus::IntCounterVec,
}

pub(super) static LOCKS: LazyLock<LockMetrics> = LazyLock::new(|| LockMetrics {
    waiters: gauge_vec("geolock_lock_waiters", "Lock and election waiters queued on this member.", &["name"]),
    wait_seconds: crate::metrics::histogram_vec(
        "geolock_lock_wait_seconds",
        "Time from queuing to holding, for waiters that got the lock.",
        &["name"],
        crate::metrics::exponential(0.001, 2.0, 17),
    ),
    handovers: crate::metrics::counter_vec(
        "geolock_lock_handovers_total",
        "Waiters that were handed the lock when the key before theirs went.",
        &["name"],
    ),
});

/// One queued waiter in [`LockMetrics::waiters`], however its wait ends (a client that goes
/// away drops it mid-wait).
pub(super) struct Waiting(IntGauge);

impl Waiting {
    pub(super) fn start(gauge: IntGauge) -> Waiting {
        gauge.inc();
        Waiting(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The label for lock name `prefix` (the lock's key prefix, `name/`): its first path segment
/// (`/jobs/build/` and `jobs/x/` are both `jobs`), so that per-job names share one series;
/// past [`LOCK_METRIC_NAMES_MAX`] distinct labels, `other`.
///
/// [`LOCK_METRIC_NAMES_MAX`]: geolock_core::limits::LOCK_METRIC_NAMES_MAX
pub(super) fn lock_label(prefix: &[u8]) -> String {
    static SEEN: LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> = LazyLock::new(Default::default);
    let name = String::from_utf8_lossy(prefix);
    let first = name.split('/').find(|s| !s.is_empty()).unwrap_or("").to_string();
    let mut seen = SEEN.lock().expect("lock label set");
    if seen.contains(&first) || seen.len() < geolock_core::limits::LOCK_METRIC_NAMES_MAX {
        seen.insert(first.clone());
        first
    } else {
        "other".to_string()
    }
}

/// Register every metric of this layer, so that each is exported (at zero) from the first
/// scrape, as etcd's are, rather than from its first update.
pub fn register() {
    LazyLock::force(&LEADER_CHANGES);
    LazyLock::force(&PROPOSALS_FAILED);
    LazyLock::force(&LEASES_EXPIRED);
    LazyLock::force(&GAUGES);
    LazyLock::force(&LOCKS);
    LazyLock::force(&super::log_store::WAL_FSYNC_SECONDS);
    LazyLock::force(&super::state_machine::BACKEND_COMMIT_SECONDS);
    LazyLock::force(&MVCC);
    LazyLock::force(&super::network::PEER_METRICS);
}

/// The gauges a scrape reads from the node.
struct Gauges {
    has_leader: IntGauge,
    is_leader: IntGauge,
    is_learner: IntGauge,
    server_id: IntGaugeVec,
    server_version: IntGaugeVec,
    cluster_version: IntGaugeVec,
    committed: IntGauge,
    applied: IntGauge,
    pending: IntGauge,
    quota: IntGauge,
    db_size: IntGauge,
    db_size_debugging: IntGauge,
    db_in_use: IntGauge,
    keys: IntGauge,
    current_rev: IntGauge,
    compact_rev: IntGauge,
    watchers: IntGauge,
    watch_streams: IntGauge,
    member: IntGaugeVec,
    term: IntGauge,
    lag_entries: IntGaugeVec,
    lag_seconds: prometheus::GaugeVec,
    apply_lag: IntGauge,
    leader_contact_age: prometheus::Gauge,
    log_entries: IntGauge,
    purged: IntGauge,
}

static GAUGES: LazyLock<Gauges> = LazyLock::new(|| Gauges {
    has_leader: gauge("etcd_server_has_leader", "1 if this member knows a live leader, else 0."),
    is_leader: gauge("etcd_server_is_leader", "1 if this member leads, else 0."),
    is_learner: gauge("etcd_server_is_learner", "1 if this member is a learner, else 0."),
    server_id: gauge_vec("etcd_server_id", "This member's ID (hex) as a label; always 1.", &["server_id"]),
    server_version: gauge_vec(
        "etcd_server_version",
        "The etcd API version served, as a label; always 1.",
        &["server_version"],
    ),
    cluster_version: gauge_vec(
        "etcd_cluster_version",
        "The cluster's etcd API version, as a label; always 1.",
        &["cluster_version"],
    ),
    committed: gauge("etcd_server_proposals_committed_total", "The highest log index this member knows committed."),
    applied: gauge("etcd_server_proposals_applied_total", "The highest log index this member has applied."),
    pending: gauge("etcd_server_proposals_pending", "Proposals from this member waiting to be applied."),
    quota: gauge("etcd_server_quota_backend_bytes", "The key space quota in bytes (--quota-backend-bytes)."),
    db_size: gauge("etcd_mvcc_db_total_size_in_bytes", "Bytes the storage engine holds on disk."),
    db_size_debugging: gauge("etcd_debugging_mvcc_db_total_size_in_bytes", "Bytes the storage engine holds on disk."),
    db_in_use: gauge("etcd_mvcc_db_total_size_in_use_in_bytes", "Bytes of keys and values the key space holds."),
    keys: gauge("etcd_debugging_mvcc_keys_total", "Live keys in the key space."),
    current_rev: gauge("etcd_debugging_mvcc_current_revision", "The key space's current revision."),
    compact_rev: gauge("etcd_debugging_mvcc_compact_revision", "The revision last compacted to (-1 before any)."),
    watchers: gauge("etcd_debugging_mvcc_watcher_total", "Watchers on this member."),
    watch_streams: gauge("etcd_debugging_mvcc_watch_stream_total", "Watch streams open on this member."),
    member: gauge_vec(
        "geolock_member_info",
        "This member's name, role (voter, learner, witness) and region as labels; always 1.",
        &["name", "role", "region"],
    ),
    term: gauge("geolock_raft_term", "The Raft term this member is in."),
    lag_entries: gauge_vec(
        "geolock_replication_lag_entries",
        "On the leader: log entries each other member lacks.",
        &["member", "role", "region"],
    ),
    lag_seconds: crate::metrics::float_gauge_vec(
        "geolock_replication_lag_seconds",
        "On the leader: the age of the oldest entry each other member lacks.",
        &["member", "role", "region"],
    ),
    apply_lag: gauge("geolock_apply_lag_entries", "Entries this member knows committed and has not applied yet."),
    leader_contact_age: crate::metrics::float_gauge(
        "geolock_leader_contact_age_seconds",
        "On a follower or learner: time since the leader was last heard from.",
    ),
    log_entries: gauge("geolock_raft_log_entries", "Log entries this member keeps (on a witness: its bounded tail)."),
    purged: gauge("geolock_raft_log_purged_index", "The highest log index purged from this member's log."),
});

impl Node {
    /// Bring the gauges read from this member's state up to date; called before each scrape.
    /// Lag per member is the leader's to tell: on other members those series are absent.
    pub fn refresh_metrics(&self) {
        let g = &*GAUGES;
        let st = self.status();
        let (keys, in_use, compacted, watchers, streams) = {
            let s = self.shared.lock();
            let kv = &s.machine.kv;
            (kv.live_keys() as i64, kv.bytes() as i64, kv.compact_rev(), s.hub.len() as i64, s.streams.len() as i64)
        };
        let (committed, purged, contact) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            let purged = m.purged.map_or(0, |l| l.index);
            (m.local_committed.map_or(0, |l| l.index), purged, m.state != ServerState::Leader)
        };
        g.has_leader.set(i64::from(st.leader != 0));
        g.is_leader.set(i64::from(st.leader == self.id));
        g.is_learner.set(i64::from(st.is_learner));
        g.server_id.with_label_values(&[&format!("{:x}", self.id)]).set(1);
        g.server_version.with_label_values(&[SERVER_VERSION]).set(1);
        g.cluster_version.with_label_values(&[CLUSTER_VERSION]).set(1);
        g.committed.set(committed as i64);
        g.applied.set(st.applied_index as i64);
        g.pending.set((geolock_core::limits::PROPOSALS_IN_FLIGHT_MAX - self.proposals.available_permits()) as i64);
        g.quota.set(self.quota_bytes as i64);
        g.db_size.set(st.db_size_bytes as i64);
        g.db_size_debugging.set(st.db_size_bytes as i64);
        g.db_in_use.set(in_use);
        g.keys.set(keys);
        g.current_rev.set(st.revision);
        g.compact_rev.set(if compacted > 0 { compacted } else { -1 });
        g.watchers.set(watchers);
        g.watch_streams.set(streams);
        // A learner is started as a voter would be and told its role by the membership.
        let role = if st.is_learner { "learner".to_string() } else { self.role.to_string() };
        g.member.reset();
        g.member.with_label_values(&[&self.me.name, &role, &self.me.region]).set(1);
        g.term.set(st.raft_term as i64);
        g.apply_lag.set(committed.saturating_sub(st.applied_index) as i64);
        let heard = self.leader_contact_ms.load(std::sync::atomic::Ordering::Relaxed);
        g.leader_contact_age.set(if contact && heard > 0 {
            now_ms().saturating_sub(heard) as f64 / 1000.0
        } else {
            0.0
        });
        g.log_entries.set(st.raft_index.saturating_sub(purged) as i64);
        g.purged.set(purged as i64);
        g.lag_entries.reset();
        g.lag_seconds.reset();
        let members = self.members();
        for (id, lag) in self.lags_here() {
            let Some(m) = members.iter().find(|m| m.id == id && id != self.id) else { continue };
            let role = if m.is_learner { "learner".to_string() } else { m.role.to_string() };
            let labels = [m.name.as_str(), &role, &m.region];
            g.lag_entries.with_label_values(&labels).set(lag.entries as i64);
            g.lag_seconds.with_label_values(&labels).set(lag.ms as f64 / 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lock_labels_are_first_segments_and_bounded() {
        assert_eq!(super::lock_label(b"/jobs/build/"), "jobs");
        assert_eq!(super::lock_label(b"jobs/x/"), "jobs");
        assert_eq!(super::lock_label(b"leader/"), "leader");
        for i in 0..geolock_core::limits::LOCK_METRIC_NAMES_MAX * 2 {
            super::lock_label(format!("n{i}/").as_bytes());
        }
        assert_eq!(super::lock_label(b"brand-new/"), "other");
        assert_eq!(super::lock_label(b"/jobs/again/"), "jobs", "a name seen before keeps its label");
    }
}

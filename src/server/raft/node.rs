//! [`Node`], the handle the client API drives: proposals, linearizable reads, leases, status,
//! watches and lock waits, each answered here or by the leader (see `forward`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::{ReadPolicy, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

use super::lag::{Lag, LagClock};
use super::network::{Kind, Peers, SnapshotInbox};
use super::quorum::QuorumView;
use super::state_machine::{LockWake, Shared};
use super::{now_ms, Member, NodeError, Raft};
use crate::config::Role;
use crate::transport::Transport;
use geolock_core::lease::{LeaseError, TtlBounds};
use geolock_core::limits::PROPOSALS_IN_FLIGHT_MAX;
use geolock_core::machine::{Applied, ApplyError, Command, Machine};
use geolock_core::watch::{Reply, StreamId, WatchSpec};

/// What every response header carries besides the revision.
#[derive(Clone, Copy, Debug)]
pub struct HeaderInfo {
    pub cluster_id: u64,
    pub member_id: u64,
    pub raft_term: u64,
}

/// Maintenance.Status figures.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub revision: i64,
    pub db_size_bytes: u64,
    pub leader: u64,
    pub raft_index: u64,
    pub raft_term: u64,
    pub applied_index: u64,
    pub is_learner: bool,
    pub role: Role,
}

/// A member as Cluster.MemberList shows it.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
    pub role: Role,
    pub region: String,
}

/// LeaseTimeToLive figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub remaining_s: i64,
    pub granted_s: i64,
    pub keys: Vec<Vec<u8>>,
}

/// How long a client write may wait for its entry to be applied.
pub(super) const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running member.
pub struct Node {
    pub(super) raft: Raft,
    pub(super) shared: Arc<Shared>,
    pub(super) id: u64,
    /// This member as it states itself in the membership (see `Task::Publish`).
    pub(super) me: Member,
    /// The initial cluster's members, whose peers are accepted before a membership is known.
    pub(super) founders: Vec<String>,
    /// The role this member was started in (DESIGN.md "Roles").
    pub(super) role: Role,
    /// While leading: when the log reached which index, for members' lag in time.
    pub(super) lag: std::sync::Mutex<LagClock>,
    /// When ([`now_ms`]) an AppendEntries or heartbeat last arrived from a leader that held a
    /// quorum when it sent it.
    pub(super) leader_contact_ms: std::sync::atomic::AtomicU64,
    /// Whether this member leads with a quorum's acknowledgement (CheckQuorum).
    pub(super) quorum: Arc<QuorumView>,
    pub(super) cluster_id: u64,
    pub(super) ttl_bounds: TtlBounds,
    pub(super) quota_bytes: u64,
    pub(super) election_timeout: Duration,
    pub(super) proposals: Semaphore,
    pub(super) next_stream: std::sync::atomic::AtomicU64,
    pub(super) next_waiter: std::sync::atomic::AtomicU64,
    pub(super) peers: Arc<Peers>,
    pub(super) transport: Option<Arc<Transport>>,
    pub(super) snapshot_inbox: SnapshotInbox,
    /// Whether this member's own addresses are in the membership.
    pub(super) published: tokio::sync::watch::Sender<bool>,
    /// The epoch of the failover that fenced this member, 0 if none (see `fence`).
    pub(super) fenced_epoch: std::sync::atomic::AtomicU64,
    /// Written while a fence is recorded or a promotion seeds (one failover step at a time);
    /// read by each answer to a peer that feeds Raft, from its fence check until its reply is
    /// sent. So a fence, once recorded, has no acknowledgement of an entry, vote or snapshot
    /// still to go out: the old leader cannot count one towards a commit made after it.
    pub(super) failover_gate: tokio::sync::RwLock<()>,
    /// An active-passive primary's region write lease, when vantage points are configured.
    pub(super) write_lease: Option<super::write_lease::WriteLease>,
    /// Set once PROMOTE has rewritten this member's storage: the process must start again.
    pub(super) restart: tokio::sync::watch::Sender<bool>,
}

impl Node {
    /// Stop Raft and the peer transport. A leader first hands leadership to the voter that has
    /// replicated the most of its log, so the cluster does not wait out an election timeout.
    pub async fn shutdown(self: Arc<Self>) {
        self.hand_over_leadership().await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        if let Some(t) = &self.transport {
            t.close();
        }
    }

    pub(super) async fn hand_over_leadership(&self) {
        if !self.is_leader() {
            return;
        }
        // Never a witness: it would only hand leadership on again.
        let (data_voters, _) = self.voters_by_kind();
        let target = {
            let replication = self.raft.metrics().borrow_watched().replication.clone().unwrap_or_default();
            data_voters
                .into_iter()
                .filter(|v| *v != self.id)
                .max_by_key(|v| replication.get(v).cloned().flatten().map(|l| l.index))
        };
        let Some(to) = target else { return };
        match self.transfer_leadership(to).await {
            Ok(_) => tracing::info!("handed leadership to {to:x}"),
            Err(e) => tracing::warn!("leadership hand-over to {to:x} did not complete: {e}"),
        }
    }

    /// This member's name and peer URLs, as it states them in the membership.
    pub fn identity(&self) -> (&str, &[String]) {
        (&self.me.name, &self.me.peer_urls)
    }

    /// Header fields of this member.
    pub fn header(&self) -> HeaderInfo {
        let m = self.raft.metrics();
        let term = m.borrow_watched().current_term;
        HeaderInfo { cluster_id: self.cluster_id, member_id: self.id, raft_term: term }
    }

    /// The latest applied revision.
    pub fn current_rev(&self) -> i64 {
        self.shared.lock().machine.kv.current_rev()
    }

    /// Lease TTL bounds.
    pub fn ttl_bounds(&self) -> TtlBounds {
        self.ttl_bounds
    }

    /// This member's space quota in bytes ([`crate::config::Config::quota_bytes`]).
    pub fn quota_bytes(&self) -> u64 {
        self.quota_bytes
    }

    /// A fresh lease ID, positive, not in use now.
    pub fn new_lease_id(&self) -> i64 {
        loop {
            let id = rand::random::<i64>() & i64::MAX;
            if id != 0 && !self.shared.lock().machine.leases.contains(id) {
                return id;
            }
        }
    }

    /// Who a simple token names: its user, at the auth revision now (etcd's simple tokens carry
    /// no revision of their own). A token made by an entry this member has not applied yet is
    /// waited for, at most an election timeout; `None` for a token no member made, or expired.
    pub async fn token_caller(&self, token: &str) -> Option<geolock_core::auth::Caller> {
        let user = match self.shared.tokens.user(token, std::time::Instant::now()) {
            Some(user) => user,
            None => {
                let index = crate::auth::token_index(token)?;
                let applied = self.shared.lock().last_applied.map_or(0, |l| l.index);
                if index <= applied {
                    return None;
                }
                tokio::time::timeout(self.election_timeout, self.wait_applied(index)).await.ok()?.ok()?;
                self.shared.tokens.user(token, std::time::Instant::now())?
            }
        };
        Some(geolock_core::auth::Caller { user, revision: self.read(|m| m.auth.revision()) })
    }

    /// Run `f` on the state as applied so far.
    pub fn read<R>(&self, f: impl FnOnce(&Machine) -> R) -> R {
        f(&self.shared.lock().machine)
    }

    /// Propose a command and wait until it is applied here: on the leader directly, on a
    /// follower through the leader, then until this node has applied it too (so a read here
    /// after the write sees it).
    pub async fn propose(&self, cmd: Command) -> Result<Applied, NodeError> {
        use opentelemetry::trace::{FutureExt, TraceContextExt, Tracer};
        // A child of the RPC's span when traces are on (a no-op span when they are off).
        let cx = opentelemetry::Context::current_with_span(opentelemetry::global::tracer("geolock").start("propose"));
        let done = async {
            self.refuse_if_fenced()?;
            let _permit = self
                .proposals
                .try_acquire()
                .map_err(|_| NodeError::TooManyProposals { max: PROPOSALS_IN_FLIGHT_MAX })?;
            self.with_leader(|| async {
                let here = || self.propose_here(cmd.clone());
                let (applied, index) = self.on_leader(Kind::ForwardWrite, &cmd, PROPOSE_TIMEOUT, here).await?;
                let apply = opentelemetry::global::tracer("geolock").start("apply");
                let waited =
                    self.wait_applied(index).with_context(opentelemetry::Context::current_with_span(apply)).await;
                waited?;
                Ok(applied)
            })
            .await
        }
        .with_context(cx.clone())
        .await;
        if done.is_err() {
            super::metrics::PROPOSALS_FAILED.inc();
        }
        cx.span().end();
        done
    }

    /// Propose on this node, which must lead. Returns the result and the entry's log index.
    pub(super) async fn propose_here(&self, cmd: Command) -> Result<(Applied, u64), NodeError> {
        self.may_serve_as_leader()?;
        // openraft answers a write once it is committed and applied here, on the leader.
        let _commit = opentelemetry::trace::Tracer::start(&opentelemetry::global::tracer("geolock"), "commit");
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(cmd)).await {
            Err(_) => Err(NodeError::Timeout),
            // A commit that lands after the region write lease lapsed is not acknowledged: the
            // standby may be promoted by then. Its outcome is reported unknown, as a timeout.
            Ok(Ok(resp)) => match self.check_write_lease() {
                Ok(()) => Ok((resp.data, resp.log_id.index)),
                Err(_) => Err(NodeError::Timeout),
            },
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Wait until this node has applied log index `index`.
    pub(super) async fn wait_applied(&self, index: u64) -> Result<(), NodeError> {
        self.raft
            .wait(Some(PROPOSE_TIMEOUT))
            .applied_index_at_least(Some(index), "forwarded request")
            .await
            .map(|_| ())
            .map_err(|_| NodeError::Timeout)
    }

    /// Wait until this node has applied everything committed when the call began, confirmed by
    /// a quorum (a read index, asked of the leader when this node follows): reads after this are
    /// linearizable.
    pub async fn linearize(&self) -> Result<(), NodeError> {
        self.with_leader_idempotent(|| async {
            let index = self.on_leader(Kind::ReadIndex, &(), self.election_timeout, || self.read_index_here()).await?;
            self.wait_applied(index).await
        })
        .await
    }

    /// The read index on this node, which must lead; waits until it is applied here.
    pub(super) async fn read_index_here(&self) -> Result<u64, NodeError> {
        // After a failover the old primary's reads are stale: it answers none past its lease,
        // checked again once the quorum confirmed the index.
        self.may_serve_as_leader()?;
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Err(_) => Err(NodeError::Timeout),
            Ok(Ok(read)) => self.check_write_lease().map(|()| read.index()),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Whether this member may answer for the cluster as its leader: not fenced (`Fenced`),
    /// holding the region write lease if it has one (`NoWriteLease`), and not a witness
    /// (`NotLeader`). Checked before every write, read index and lease keep-alive it answers.
    pub(super) fn may_serve_as_leader(&self) -> Result<(), NodeError> {
        self.refuse_if_fenced()?;
        self.check_write_lease()?;
        self.serves_clients_as_leader()
    }

    /// A witness that leads does so only to hand over: it answers no client request, and the
    /// member that forwarded one tries again once a data voter leads.
    pub(super) fn serves_clients_as_leader(&self) -> Result<(), NodeError> {
        match self.role {
            Role::Witness => Err(NodeError::NotLeader { leader: None }),
            Role::Voter | Role::Learner => Ok(()),
        }
    }

    /// The role this member was started in.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The membership's record of member `id`.
    pub(super) fn member_record(&self, id: u64) -> Option<Member> {
        self.raft.metrics().borrow_watched().membership_config.membership().get_node(&id).cloned()
    }

    /// Every member's replication lag: computed here on the leader, asked of it elsewhere
    /// (empty when it cannot be reached).
    pub async fn lags(&self) -> BTreeMap<u64, Lag> {
        let here = || async { Ok(self.lags_here()) };
        self.on_leader(Kind::Lag, &(), self.election_timeout, here).await.unwrap_or_default()
    }

    pub(super) fn lags_here(&self) -> BTreeMap<u64, Lag> {
        if !self.quorum.leads() {
            return BTreeMap::new();
        }
        let (replication, last) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.replication.clone().unwrap_or_default(), m.last_log_index.unwrap_or(0))
        };
        let clock = self.lag.lock().unwrap();
        let now = now_ms();
        replication
            .into_iter()
            .map(|(id, matched)| {
                let lag =
                    if id == self.id { Lag::default() } else { clock.lag(matched.map_or(0, |l| l.index), last, now) };
                (id, lag)
            })
            .collect()
    }

    /// Whether openraft has this member as leader. Raft's own operations (membership changes,
    /// hand-overs, the witness's purge point) go by this, and openraft gates them; answers given
    /// outside the log go by [`QuorumView::leads`] instead.
    pub(super) fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// A keep-alive: the leader restarts the lease's TTL (asked of it when this node follows).
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64, NodeError> {
        self.with_leader_idempotent(|| {
            self.on_leader(Kind::LeaseKeepAlive, &id, self.election_timeout, || async {
                self.lease_keep_alive_here(id)
            })
        })
        .await
    }

    pub(super) fn lease_keep_alive_here(&self, id: i64) -> Result<i64, NodeError> {
        self.may_serve_as_leader()?;
        if !self.quorum.leads() {
            return Err(self.not_leader());
        }
        let ttl = self.shared.lock().machine.leases.renew(id, now_ms()).map_err(ApplyError::from)?;
        Ok(ttl)
    }

    /// TTL left and keys of a lease, as the leader sees it (asked of it when this node follows).
    pub async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseInfo, NodeError> {
        let (req, here) = ((id, keys), || async { self.lease_time_to_live_here(id, keys) });
        self.with_leader_idempotent(|| self.on_leader(Kind::LeaseTimeToLive, &req, self.election_timeout, here)).await
    }

    pub(super) fn lease_time_to_live_here(&self, id: i64, keys: bool) -> Result<LeaseInfo, NodeError> {
        self.serves_clients_as_leader()?;
        if !self.quorum.leads() {
            return Err(self.not_leader());
        }
        let st = self.shared.lock();
        let leases = &st.machine.leases;
        let lease = leases.get(id).ok_or(ApplyError::Lease(LeaseError::NotFound { lease: id }))?;
        Ok(LeaseInfo {
            remaining_s: leases.remaining_s(id, now_ms()).map_err(ApplyError::from)?,
            granted_s: lease.ttl_s,
            keys: if keys {
                lease.keys.iter().take(geolock_core::limits::LEASE_KEYS_LISTED_MAX).cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    /// Maintenance.Status figures.
    pub fn status(&self) -> NodeStatus {
        let (revision, applied) = {
            let st = self.shared.lock();
            (st.machine.kv.current_rev(), st.last_applied.map_or(0, |l| l.index))
        };
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        NodeStatus {
            revision,
            db_size_bytes: self.shared.db_size_bytes(),
            leader: self.live_leader(&m).unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            applied_index: applied,
            is_learner: m.state == ServerState::Learner,
            role: self.role,
        }
    }

    /// Every member, voters first.
    pub fn members(&self) -> Vec<MemberInfo> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| MemberInfo {
                id: *id,
                name: node.name.clone(),
                peer_urls: node.peer_urls.clone(),
                client_urls: node.client_urls.clone(),
                is_learner: !voters.contains(id),
                role: node.role.into(),
                region: node.region.clone(),
            })
            .collect()
    }

    /// Register a watch stream whose replies go to `tx`.
    pub fn watch_open(&self, tx: mpsc::Sender<Reply>) -> StreamId {
        let id = self.next_stream.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.lock().streams.insert(id, tx);
        id
    }

    /// Create a watcher and start catching it up.
    pub fn watch_create(&self, stream: StreamId, spec: WatchSpec) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let created = st.hub.create(stream, spec, &st.machine.kv);
        st.deliver(vec![created]);
        let out = st.hub.catch_up(stream, &st.machine.kv);
        st.deliver(out);
    }

    /// Cancel a watcher.
    pub fn watch_cancel(&self, stream: StreamId, watch_id: i64) {
        let mut st = self.shared.lock();
        if let Some(o) = st.hub.cancel(stream, watch_id) {
            st.deliver(vec![o]);
        }
    }

    /// Answer a progress request (now, or once every watcher of the stream is level).
    pub fn watch_progress(&self, stream: StreamId) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        if let Some(o) = st.hub.request_progress(stream, &st.machine.kv) {
            st.deliver(vec![o]);
        }
    }

    /// Send unsynced watchers of `stream` their next batch of history, if the stream's queue has
    /// room. Returns whether some are still behind.
    pub fn watch_catch_up(&self, stream: StreamId) -> bool {
        let mut st = self.shared.lock();
        let st = &mut *st;
        if !st.hub.has_unsynced(stream) {
            return false;
        }
        let room = st.streams.get(&stream).is_some_and(|tx| tx.capacity() > 0);
        if room {
            let out = st.hub.catch_up(stream, &st.machine.kv);
            st.deliver(out);
        }
        st.hub.has_unsynced(stream)
    }

    /// Wait until the key created at `rev` is the oldest under `prefix` (this caller holds the
    /// lock or leads the election), or until it is deleted. Woken by the apply that settles it;
    /// dropping the future withdraws the waiter.
    pub async fn wait_for_lock(&self, prefix: &[u8], rev: i64) -> LockWake {
        let id = self.next_waiter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut st = self.shared.lock();
            let st = &mut *st;
            match st.locks.wait(prefix, rev, id, &st.machine.kv) {
                geolock_core::lock::Wait::Holding => return LockWake::Holding,
                geolock_core::lock::Wait::Gone => return LockWake::Lost,
                geolock_core::lock::Wait::Queued => {
                    st.lock_waiters.insert(id, tx);
                }
            }
        }
        let _withdraw = WithdrawOnDrop { shared: &self.shared, prefix, rev, id };
        let locks = &super::metrics::LOCKS;
        let label = super::metrics::lock_label(prefix);
        let _waiting = super::metrics::Waiting::start(locks.waiters.with_label_values(&[&label]));
        let queued = std::time::Instant::now();
        let woken = rx.await.unwrap_or(LockWake::Lost);
        if woken == LockWake::Holding {
            locks.handovers.with_label_values(&[&label]).inc();
            locks.wait_seconds.with_label_values(&[&label]).observe(queued.elapsed().as_secs_f64());
        }
        woken
    }

    /// Forget a stream.
    pub fn watch_close(&self, stream: StreamId) {
        let mut st = self.shared.lock();
        st.streams.remove(&stream);
        st.hub.close_stream(stream);
    }
}

/// Removes a lock waiter however its wait ends (a no-op once the apply woke it).
struct WithdrawOnDrop<'a> {
    shared: &'a Shared,
    prefix: &'a [u8],
    rev: i64,
    id: u64,
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.locks.cancel(self.prefix, self.rev, self.id);
        st.lock_waiters.remove(&self.id);
    }
}
